"""The training epoch every task script shares (spec sections 7 and 8): forward through a
script-supplied `train_step`, summed named losses, AdamW step, the epoch-0 alpha ramp and LR
warm-up, and metric logging."""
import contextlib
import logging
import math

import torch

from train_options import accum_steps as get_accum_steps
from utils import MetricLogger, SmoothedValue, all_gather_objects

logger = logging.getLogger(__name__)

# NOTE(faithful): in epoch 0 the scheduler's warm-up time advances in units of 100 iterations.
WARMUP_STEP_SIZE = 100


def autocast_context(precision, device):
    """Mixed precision from the config's `precision`: 'fp32' (the original's, default) or 'bf16'."""
    if precision == 'fp32':
        return contextlib.nullcontext()
    if precision == 'bf16':
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"config key 'precision': {precision!r} is not supported; allowed: 'fp32', 'bf16'")


def train_one_epoch(model, data_loader, optimizer, lr_scheduler, epoch, device, config, train_step,
                    *, warmup_steps, warm_up=True, print_freq=50, header=None, stats_fmt='{:.3f}',
                    start_step=0, hooks=None):
    """Train `model` for one pass over `data_loader`; return the epoch averages of the meters.

    train_step(model, batch, alpha) -> {loss name: scalar tensor} moves the batch to the device,
    runs the model and names its losses (e.g. loss_mlm, loss_ita, loss_itm); they are summed
    with equal weights. alpha is config['alpha'] (None if the config has none), ramped linearly
    from 0 over epoch 0 when `warm_up`. `warmup_steps` is in iterations:
    100 * schedular.warmup_epochs. The scripts step the scheduler per epoch (and call the
    sampler's set_epoch) themselves.

    With config `accum_steps` N > 1, N consecutive batches make one optimiser step (global batch
    batch_size * world * N); `warmup_steps` then counts optimiser steps, the alpha ramp still
    follows the fraction of the epoch, and the momentum encoders move once per optimiser step.
    The feature queues advance by every micro-batch.

    Returns {name: average}, formatted with `stats_fmt` as the original's log.txt ('{:.3f}'
    strings; NLVR and VE used '{:.4f}'); stats_fmt=None gives floats.

    Resuming inside an epoch: `data_loader` yields the remaining batches and `start_step` is the
    number already done. `hooks` (resume.TrainingRun) decides on non-finite losses (stop or
    skip, agreed over ranks) and writes step checkpoints; without hooks a non-finite loss stops.
    """
    model.train()
    metric_logger = MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', SmoothedValue(window_size=50, fmt='{value:.6f}'))
    header = header or f'Train Epoch: [{epoch}]'
    num_batches = start_step + len(data_loader)
    alpha_max = config.get('alpha')  # None for tasks without distillation (TA pre-training)
    precision = config.get('precision', 'fp32')
    accum_steps = get_accum_steps(config)

    for i, batch in enumerate(metric_logger.log_every(data_loader, print_freq, header), start_step):
        alpha = alpha_max
        if epoch == 0 and warm_up and alpha_max is not None:
            alpha = alpha_max * min(1, i / num_batches)

        # Gradient accumulation: optimiser step `step` sums the gradients of `group` micro-batches
        # (fewer in a last, incomplete group), each loss scaled by 1/group.
        step, micro = divmod(i, accum_steps)
        group = min(accum_steps, num_batches - step * accum_steps)
        if micro == 0:
            optimizer.zero_grad()
        with micro_step(model, first=micro == 0, last=micro == group - 1), \
                autocast_context(precision, device):
            losses = train_step(model, batch, alpha)
        if not isinstance(losses, dict) or not losses:
            raise TypeError(f'train_step must return a non-empty dict of named losses, got {losses!r}')
        loss = sum(losses.values())
        values = {name: value.item() for name, value in losses.items()}
        finite = math.isfinite(sum(values.values()))
        if hooks is not None:
            finite = hooks.all_finite(finite)
        if not finite:
            detail = ', '.join(f'{name}={value}' for name, value in values.items())
            # A skipped step drops the gradient update only: the momentum update and the queue
            # enqueue inside the model's forward have already happened.
            if hooks is None or not hooks.skip_nonfinite(epoch, i, detail):
                note = hooks.failure_note() if hooks is not None else ''
                raise FloatingPointError(f'non-finite loss in epoch {epoch}, iteration {i}: {detail}{note}')
        else:
            (loss / group).backward()
            if micro == group - 1:
                optimizer.step()
            for name in values:
                if name not in metric_logger.meters:
                    metric_logger.add_meter(name, SmoothedValue(window_size=50, fmt='{value:.4f}'))
            metric_logger.update(lr=optimizer.param_groups[0]['lr'], **values)

        # NOTE(faithful): warm-up is stepped after the optimiser step, every 100 steps, so steps
        # 0..100 run at warmup_lr (steps = iterations without accumulation).
        if micro == group - 1 and epoch == 0 and step % WARMUP_STEP_SIZE == 0 and step <= warmup_steps:
            lr_scheduler.step(step // WARMUP_STEP_SIZE)
        # Step checkpoints only between optimiser steps (no half-accumulated gradients are lost).
        if hooks is not None and micro == group - 1:
            hooks.step_done(epoch, i + 1)

    metric_logger.synchronize_between_processes()
    logger.info('Averaged stats: %s', metric_logger.global_avg())
    return metric_logger.global_avg(stats_fmt)


@contextlib.contextmanager
def micro_step(model, first, last):
    """The forward of one micro-batch of an accumulated step: DDP all-reduces the gradients
    only in the backward of the last (no_sync is read at forward time), and the momentum
    encoders (modules with `momentum_updates`) move only on the first, i.e. once per optimiser
    step as without accumulation."""
    modules = [m for m in model.modules() if hasattr(m, 'momentum_updates')]
    for m in modules:
        m.momentum_updates = first
    sync = contextlib.nullcontext() if last or not hasattr(model, 'no_sync') else model.no_sync()
    try:
        with sync:
            yield
    finally:
        for m in modules:
            m.momentum_updates = True


@torch.no_grad()
def evaluate_accuracy(model, data_loader, predict, *, header='Evaluation:', print_freq=50):
    """Classification accuracy in [0, 1] of the argmax of `predict(model, batch)` -> (logits
    (B, C), targets (B,)) over `data_loader`, counted over all ranks (NLVR2, SNLI-VE; spec 8.6).

    NOTE(faithful): with a DistributedSampler the duplicates padding the last ranks are counted,
    as in the original (exact in one process).
    """
    model.eval()
    metric_logger = MetricLogger(delimiter='  ')
    correct, total = 0, 0
    for batch in metric_logger.log_every(data_loader, print_freq, header):
        logits, targets = predict(model, batch)
        correct += (logits.argmax(dim=1) == targets).sum().item()
        total += targets.numel()
    counts = all_gather_objects((correct, total))
    correct, total = sum(c for c, _ in counts), sum(t for _, t in counts)
    if total == 0:
        raise ValueError('evaluate_accuracy: the loader yielded no samples')
    return correct / total
