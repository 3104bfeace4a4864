"""The training run every task script shares, in the spirit of MAE's engine_finetune.py.

    run = engine.setup(args, 've')             # processes, config, output folder, logs, seed
    train_loader = run.train_loader(train_set, config['batch_size_train'])
    model = run.prepare(ALBEF(...))             # options, AdamW, schedule, DDP; resume | --checkpoint
    for epoch in run.epochs():                  # one pass without training with --evaluate
        train_stats = run.train_epoch(epoch, train_step)
        ... evaluate, run.log(epoch, train_stats, val_acc=...)
        run.end_epoch(epoch, metric=val_acc, best_file='checkpoint_best.pth')
    run.finish()

`--checkpoint` is the weights a run starts from (never an optimizer); `--resume` continues the
run in --output_dir (or the checkpoint file given) exactly where it stopped: a run checkpointed
every `checkpoint_every_steps` steps (and at every epoch end), killed and resumed reaches the same
parameters after the same total number of steps as one never interrupted. A checkpoint holds,
beside the released keys (model with its momentum encoders and queues; optimizer; lr_scheduler;
config; epoch), a `resume` entry: the position (epoch, steps done), every rank's RNG states, the
gradient scaler, the skipped non-finite steps, the best metric so far. The data side of exact
resumption is dataset/loaders.py.

Scripts that evaluate after each epoch also checkpoint the end of its training before the
evaluation: a run killed during the evaluation resumes with that evaluation (training is not
repeated). Their checkpoints are checkpoint_NN_stepSSSSSS.pth, rotated; the others (pre-training,
VQA, text assignment) end each epoch with checkpoint_NN.pth, all kept, as the original's.
"""
import contextlib
import gc
import glob
import logging
import math
import os
import random
import re
import time

import numpy as np
import torch
from timm.models.vision_transformer import Block

import utils
from dataset.faults import skipped_samples
from dataset.loaders import eval_loader, train_loader
from models.checkpoint import CheckpointError, load_checkpoint, load_weights, read_checkpoint
from models.xbert import BertLayer
from optim import create_optimizer, optimizer_state_dict
from scheduler import create_scheduler

logger = logging.getLogger(__name__)

# NOTE(faithful): in epoch 0 the scheduler's warm-up time advances in units of 100 iterations.
WARMUP_STEP_SIZE = 100
# The ALBEF model (and checkpoint) kind each task trains; grounding fine-tunes the retrieval model.
MODEL_KIND = {'pretrain': 'pretrain', 'pretrain_nlvr': 'pretrain_nlvr', 'retrieval': 'retrieval',
              'grounding': 'retrieval', 'vqa': 'vqa', 'nlvr': 'nlvr', 've': 've'}
# Test hook: exit the process abruptly (no clean-up, as a kill) once this many steps are done.
EXIT_AFTER_STEPS_ENV = 'ALBEF_EXIT_AFTER_STEPS'
_CHECKPOINT_NAME = re.compile(r'checkpoint_(\d+)(?:_step(\d+))?\.pth$')


# ---------------------------------------------------------------------------------------------
# Options: precision, grad_checkpointing, compile, optimizer_sharding / optimizer.fused
# ---------------------------------------------------------------------------------------------

_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def autocast_context(precision, device):
    """Mixed precision from the config's `precision`: 'fp32' (the original's, default), 'bf16'
    or 'fp16' autocast."""
    if precision == 'fp32':
        return contextlib.nullcontext()
    if precision in _DTYPES:
        return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])
    raise ValueError(f"config key 'precision': {precision!r} is not supported; "
                     "allowed: 'fp32', 'bf16', 'fp16'")


def grad_scaler(precision, device):
    """fp16 trains with loss scaling (gradients that underflow float16 are kept); None otherwise."""
    return torch.amp.GradScaler(torch.device(device).type) if precision == 'fp16' else None


def set_grad_checkpointing(model, enabled):
    """Activation checkpointing (torch.utils.checkpoint, use_reentrant=False) of every ViT
    block and BERT layer in training mode; returns the number of encoders switched."""
    encoders = [m for m in model.modules() if hasattr(m, 'gradient_checkpointing')]
    for encoder in encoders:
        encoder.gradient_checkpointing = enabled
    return len(encoders)


def compile_layers(model, backend='inductor'):
    """torch.compile every ViT block and BERT layer in place (state-dict names unchanged, so
    checkpoints load and save as without it); returns how many."""
    if backend not in torch.compiler.list_backends(exclude_tags=()):
        raise utils.ConfigError(f'compile = {backend!r}: not a torch.compile backend; allowed: '
                                f'true, false, {", ".join(torch.compiler.list_backends())}')
    layers = [m for m in model.modules() if isinstance(m, (Block, BertLayer))]
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


def configure_model(model, config):
    """Apply grad_checkpointing and compile to `model` (before DDP wrapping); returns it."""
    set_grad_checkpointing(model, config['grad_checkpointing'])
    backend = config['compile']
    if backend:
        compiled = compile_layers(model, 'inductor' if backend is True else backend)
        logger.info('compile: %d transformer layers compiled (%s)', compiled, backend)
    return model


def build_optimizer(config, model):
    """AdamW from config['optimizer'] (`fused`), sharded across ranks with optimizer_sharding."""
    return create_optimizer(config['optimizer'], model, sharding=config['optimizer_sharding'])


# ---------------------------------------------------------------------------------------------
# The training epoch and the evaluation loop
# ---------------------------------------------------------------------------------------------

def accum_steps(config):
    """Micro-batches per optimiser step (config `accum_steps`, default 1)."""
    steps = config.get('accum_steps', 1)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f'config key accum_steps must be a positive integer, got {steps!r}')
    return steps


def train_one_epoch(model, data_loader, optimizer, lr_scheduler, epoch, device, config, train_step,
                    *, warmup_steps, warm_up=True, print_freq=50, header=None, stats_fmt='{:.3f}',
                    start_step=0, hooks=None, scaler=None):
    """Train `model` for one pass over `data_loader`; return the epoch averages of the meters.

    train_step(model, batch, alpha) -> {loss name: scalar tensor} moves the batch to the device,
    runs the model and names its losses (e.g. loss_mlm, loss_ita, loss_itm); they are summed
    with equal weights. alpha is config['alpha'] (None if the config has none), ramped linearly
    from 0 over epoch 0 when `warm_up`. `warmup_steps` is in iterations:
    100 * schedular.warmup_epochs. A scheduler whose `per_step` is true (schedular.step_every:
    step) is instead given the optimiser steps done in the run after every optimiser step
    (`step_update`). config's `precision` and `accum_steps` apply (absent: fp32, 1);
    `scaler` (a GradScaler, fp16) scales the loss.

    With `accum_steps` N > 1, N consecutive batches make one optimiser step (global batch
    batch_size * world * N); `warmup_steps` then counts optimiser steps, the alpha ramp still
    follows the fraction of the epoch, and the momentum encoders move once per optimiser step.
    The feature queues advance by every micro-batch.

    Returns {name: average}, formatted with `stats_fmt` as the original's log.txt ('{:.3f}'
    strings); stats_fmt=None gives floats.

    Resuming inside an epoch: `data_loader` yields the remaining batches and `start_step` is the
    number already done. `hooks` (a Run) decides on non-finite losses (stop or skip, agreed over
    ranks) and writes step checkpoints; without hooks a non-finite loss stops.
    """
    model.train()
    metric_logger = utils.MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=50, fmt='{value:.6f}'))
    header = header or f'Train Epoch: [{epoch}]'
    num_batches = start_step + len(data_loader)
    alpha_max = config.get('alpha')  # None for tasks without distillation (TA pre-training)
    precision = config.get('precision', 'fp32')
    accum = accum_steps(config)
    # A per-step schedule (schedular.step_every: step) is a function of the optimiser steps done
    # in the whole run: set for the first step here (also where a resumed run continues).
    per_step = getattr(lr_scheduler, 'per_step', False)
    steps_per_epoch = math.ceil(num_batches / accum)
    if per_step:
        lr_scheduler.step_update(epoch * steps_per_epoch + start_step // accum)

    for i, batch in enumerate(metric_logger.log_every(data_loader, print_freq, header), start_step):
        alpha = alpha_max
        if epoch == 0 and warm_up and alpha_max is not None:
            alpha = alpha_max * min(1, i / num_batches)

        # Gradient accumulation: optimiser step `step` sums the gradients of `group` micro-batches
        # (fewer in a last, incomplete group), each loss scaled by 1/group.
        step, micro = divmod(i, accum)
        group = min(accum, num_batches - step * accum)
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
            (loss / group if scaler is None else scaler.scale(loss / group)).backward()
            if micro == group - 1:
                if scaler is None:
                    optimizer.step()
                else:
                    scaler.step(optimizer)
                    scaler.update()
            for name in values:
                if name not in metric_logger.meters:
                    metric_logger.add_meter(name, utils.SmoothedValue(window_size=50, fmt='{value:.4f}'))
            metric_logger.update(lr=optimizer.param_groups[0]['lr'], **values)

        if micro == group - 1 and per_step:
            lr_scheduler.step_update(epoch * steps_per_epoch + step + 1)
        # NOTE(faithful): warm-up is stepped after the optimiser step, every 100 steps, so steps
        # 0..100 run at warmup_lr (steps = iterations without accumulation).
        elif micro == group - 1 and epoch == 0 and step % WARMUP_STEP_SIZE == 0 and step <= warmup_steps:
            lr_scheduler.step(step // WARMUP_STEP_SIZE)
        # Step checkpoints only between optimiser steps (no half-accumulated gradients are lost).
        if hooks is not None and micro == group - 1:
            if finite:
                hooks.log_step(epoch, i + 1, values, optimizer.param_groups[0]['lr'], micro_batches=group)
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
    (B, C), targets (B,)) over `data_loader`, counted over all ranks (NLVR2, SNLI-VE).

    NOTE(faithful): with a DistributedSampler the duplicates padding the last ranks are counted,
    as in the original (exact in one process).
    """
    model.eval()
    metric_logger = utils.MetricLogger(delimiter='  ')
    correct, total = 0, 0
    for batch in metric_logger.log_every(data_loader, print_freq, header):
        logits, targets = predict(model, batch)
        correct += (logits.argmax(dim=1) == targets).sum().item()
        total += targets.numel()
    counts = utils.all_gather_objects((correct, total))
    correct, total = sum(c for c, _ in counts), sum(t for _, t in counts)
    if total == 0:
        raise ValueError('evaluate_accuracy: the loader yielded no samples')
    return correct / total


# ---------------------------------------------------------------------------------------------
# RNG states and checkpoint files
# ---------------------------------------------------------------------------------------------

def rng_state():
    """This process's RNG states as tensors and plain Python values, so that checkpoints load
    with torch.load(weights_only=True) (a numpy array would need unpickling)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {'torch': torch.get_rng_state(),
             'numpy': (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss,
                       cached_gaussian),
             'python': random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    name, keys, *rest = state['numpy']
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # older checkpoints: an array
    np.random.set_state((name, keys.astype(np.uint32), *rest))
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def checkpoint_path(output_dir, epoch, step=None):
    """checkpoint_NN.pth at the end of epoch NN (the original's name), checkpoint_NN_stepSSSSSS.pth
    after SSSSSS steps of epoch NN."""
    name = f'checkpoint_{epoch:02d}.pth' if step is None else f'checkpoint_{epoch:02d}_step{step:06d}.pth'
    return os.path.join(output_dir, name)


def _position(path):
    """(epoch, steps done) a checkpoint file name stands for; an epoch-end file sorts last."""
    match = _CHECKPOINT_NAME.search(os.path.basename(path))
    epoch, step = int(match.group(1)), match.group(2)
    return (epoch, float('inf') if step is None else int(step))


def is_epoch_end(path):
    """Whether `path` is named as an epoch-end checkpoint_NN.pth."""
    return _position(path)[1] == float('inf')


def checkpoints(output_dir, step_only=False):
    """The checkpoint files of `output_dir`, newest position first."""
    paths = [p for p in glob.glob(os.path.join(output_dir, 'checkpoint_*.pth'))
             if _CHECKPOINT_NAME.search(os.path.basename(p))]
    if step_only:
        paths = [p for p in paths if not is_epoch_end(p)]
    return sorted(paths, key=_position, reverse=True)


def exit_abruptly(code):
    """End the process at once, as a kill would: no clean-up, no further checkpoint."""
    logging.shutdown()
    os._exit(code)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def setup(args, task):
    """The run of a task script: join the processes (torchrun / SLURM variables), load the
    config (defaults, --opts, checks), create --output_dir with its logs and config.yaml, seed.
    Nothing is created when the config or the command line is wrong."""
    evaluate = getattr(args, 'evaluate', False)
    if evaluate and not args.checkpoint:
        raise utils.ConfigError('--evaluate needs --checkpoint (the checkpoint to evaluate)')
    paired = not args.config
    if paired:
        args.config = paired_config(args.checkpoint, task) if evaluate else None
        if not args.config:
            raise utils.ConfigError('--config is required (it may be left out only with '
                                    '--evaluate and a released --checkpoint name)')
    if not args.resume and not evaluate:
        refuse_previous_run(args.output_dir)
    utils.init_distributed_mode(args)
    config = utils.load_task_config(args, task)
    # A released checkpoint's name or a URL becomes a cached file once the processes are joined
    # (rank 0 downloads, the others wait) and before anything is written. Imported here: albef
    # imports this module.
    from albef.hub import log_resolved, resolve_checkpoint
    checkpoint = resolve_checkpoint(args.checkpoint, getattr(args, 'cache_dir', None)) \
        if args.checkpoint else ''
    os.makedirs(args.output_dir, exist_ok=True)
    if utils.is_main_process():
        remove_partial_checkpoints(args.output_dir)
    utils.setup_logging(args.output_dir)
    if paired:
        logger.info('--checkpoint %s is evaluated with the config it pairs with: %s',
                    args.checkpoint, args.config)
    if checkpoint:
        log_resolved(args.checkpoint, checkpoint, config, evaluate)
    utils.set_seed(args.seed)
    set_cpu_threads(config['threads'], args.device)
    utils.save_config(config, os.path.join(args.output_dir, 'config.yaml'))
    utils.save_run_info(args.output_dir, utils.run_info())
    torch.backends.cudnn.benchmark = True
    return Run(config, args.output_dir, task, device=args.device, seed=args.seed,
               checkpoint=checkpoint, resume=args.resume,
               evaluate=evaluate, gpu=getattr(args, 'gpu', 0))


def set_cpu_threads(threads, device):
    """torch's intra-op threads of a CPU run from the config's `threads` (None: torch's own
    default); a GPU run is left alone."""
    if threads is not None and torch.device(device).type == 'cpu':
        torch.set_num_threads(threads)
        logger.info('threads: %d intra-op CPU threads', threads)


# The task script each task is run by (the registry names the script a released file is for).
TASK_SCRIPT = {'pretrain': 'Pretrain.py', 'pretrain_nlvr': 'Pretrain_nlvr.py',
               'retrieval': 'Retrieval.py', 'grounding': 'Grounding.py', 'vqa': 'VQA.py',
               'nlvr': 'NLVR.py', 've': 'VE.py'}


def paired_config(checkpoint, task):
    """The repository config a released checkpoint name pairs with when evaluated by `task`'s
    script (e.g. albef_flickr30k -> configs/Retrieval_flickr.yaml), else None."""
    from albef.hub import lookup  # albef imports this module
    entry = lookup(checkpoint) if checkpoint else None
    if entry is None or entry.script != TASK_SCRIPT.get(task):
        return None
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), entry.config)


def refuse_previous_run(output_dir):
    """A new run never shares its folder with an earlier one: a later --resume would continue
    from the earlier run's checkpoints, and log.txt would hold both."""
    found = [os.path.basename(p) for p in checkpoints(output_dir)[:3]]
    if os.path.isfile(os.path.join(output_dir, 'log.txt')):
        found.append('log.txt')
    if found:
        raise utils.ConfigError(f'--output_dir {output_dir} holds an earlier run '
                                f'({", ".join(found)}): continue it with --resume, or choose '
                                'another --output_dir')


def remove_partial_checkpoints(output_dir):
    """Delete the temporary files of checkpoint writes that a killed process left behind."""
    for path in glob.glob(os.path.join(output_dir, utils.PARTIAL_CHECKPOINT_GLOB)):
        logger.warning('removing %s, the unfinished write of a killed process', path)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


class Run:
    """One training (or evaluation) run of a task: its loaders, the model's options, optimiser,
    schedule and starting weights, the epochs, checkpoints and the step policies of
    train_one_epoch (passed as its `hooks`).

    Config keys: checkpoint_every_steps (0: epoch checkpoints only), keep_checkpoints (step
    checkpoints kept), skip_nonfinite_steps (steps with a non-finite loss skipped, counted,
    before the run stops), and every option of utils.KEYS.
    """

    def __init__(self, config, output_dir, task, *, device='cpu', seed=42, checkpoint='',
                 resume=False, evaluate=False, gpu=0):
        self.config = utils.with_defaults(config, task)  # a config from setup() is complete
        self.output_dir, self.task = str(output_dir), task
        self.kind = MODEL_KIND.get(task, task)
        self.device, self.seed, self.gpu = torch.device(device), seed, gpu
        self.checkpoint, self.resume_from, self.evaluating = checkpoint, resume, evaluate
        # Scripts that evaluate after every epoch (resumable from the end of its training).
        self.evaluates = task not in ('pretrain', 'pretrain_nlvr', 'vqa')
        self.model = self.ddp_model = self.optimizer = self.lr_scheduler = self.loader = None
        self.scaler = grad_scaler(self.config['precision'], self.device)
        self.steps_per_epoch = 0
        self.every = self.config['checkpoint_every_steps']
        self.keep = self.config['keep_checkpoints']
        self.skip_limit = self.config['skip_nonfinite_steps']
        self.skipped_steps = 0
        self.last_checkpoint = None
        self.resumed_from = None  # the checkpoint resumed from
        self.best_value, self.best_epoch = float('-inf'), None  # see improved()
        self._resume_at = (0, 0)  # (epoch, steps done in it) where training starts
        self._rng = None          # this rank's RNG state to restore when training starts
        self._train_stats = {}    # the averages of an epoch trained before the resumed checkpoint
        self._skipped_samples_logged = 0  # bad samples skipped by this process's loaders, logged
        exit_after = os.environ.get(EXIT_AFTER_STEPS_ENV)
        self._exit_after = int(exit_after) if exit_after else None
        # per-step scalars (utils.StepLog), opened when the first epoch trains
        self.step_log, self._last_step_time = None, None

    # -- data ------------------------------------------------------------------------------

    def train_loader(self, dataset, batch_size, collate_fn=None):
        """The resumable training loader of this rank (dataset/loaders.py)."""
        return train_loader(dataset, batch_size, self.config['num_workers'], seed=self.seed,
                            collate_fn=collate_fn, world_size=utils.get_world_size(),
                            rank=utils.get_rank())

    def eval_loaders(self, datasets, batch_size, sharded=True, collate_fn=None):
        """One evaluation loader per dataset (each rank reads its share, or all when not
        `sharded`)."""
        return [eval_loader(d, batch_size, self.config['num_workers'], collate_fn,
                            utils.get_world_size(), utils.get_rank(), sharded) for d in datasets]

    # -- the model -------------------------------------------------------------------------

    def prepare(self, model, loader, optimizer=None, lr_scheduler=None,
                find_unused_parameters=False):
        """Move `model` to the device, apply the options (grad_checkpointing, compile), build
        AdamW and the schedule (unless given), then start: continue the run with --resume,
        otherwise load --checkpoint's weights (kind rules of models.checkpoint.load_weights;
        with --evaluate a fine-tuned checkpoint); wrap in DDP. Returns the model (unwrapped)."""
        model = configure_model(model.to(self.device), self.config)
        self.model, self.loader, self.steps_per_epoch = model, loader, len(loader)
        self.optimizer = optimizer or build_optimizer(self.config, model)
        self.lr_scheduler = lr_scheduler or create_scheduler(
            self.config['schedular'], self.optimizer,
            steps_per_epoch=math.ceil(len(loader) / accum_steps(self.config)))
        if self.resume_from and not self.evaluating:
            self.resume(None if self.resume_from is True else self.resume_from)
        if self.checkpoint and not self.resumed_from:
            load_weights(model, self.checkpoint, self.kind, evaluate=self.evaluating)
        self.ddp_model = model
        if utils.get_world_size() > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.gpu] if self.device.type == 'cuda' else None,
                find_unused_parameters=find_unused_parameters)
        return model

    def autocast(self):
        """The config's precision, for evaluation code of the scripts."""
        return autocast_context(self.config['precision'], self.device)

    # -- resuming --------------------------------------------------------------------------

    def resume(self, path=None):
        """Load the checkpoint at `path` (default: the newest readable one in output_dir) and
        return the epoch to start from; 0 when there is nothing to resume."""
        candidates = [path] if path else checkpoints(self.output_dir, step_only=self.evaluates)
        for candidate in candidates:
            try:
                checkpoint = read_checkpoint(candidate)
            except CheckpointError as error:
                if path:
                    raise
                logger.warning('cannot resume from %s, trying an older checkpoint: %s', candidate, error)
                continue
            self._load(checkpoint, candidate)
            return self._resume_at[0]
        if candidates:  # never a silent fresh start over a run whose checkpoints are all damaged
            raise CheckpointError(f'--resume: no checkpoint in {self.output_dir} is readable '
                                  f'({", ".join(os.path.basename(c) for c in candidates)})')
        logger.info('no checkpoint to resume from in %s: starting from scratch', self.output_dir)
        return 0

    def _load(self, checkpoint, path):
        for key in ('model', 'optimizer', 'lr_scheduler', 'epoch'):
            if key not in checkpoint:
                raise CheckpointError(f'{path} cannot resume a run: it has no {key!r} entry')
        load_checkpoint(self.model, checkpoint, kind=self.kind, interpolate=())
        self.optimizer.load_state_dict(checkpoint['optimizer'])
        self.lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
        extra = checkpoint.get('resume')
        if extra is None:  # a checkpoint of the original layout: the end of an epoch
            self._resume_at = (checkpoint['epoch'] + 1, 0)
            logger.info('resumed from %s (no RNG or sampler state): epoch %d', path, self._resume_at[0])
        else:
            # An epoch-end checkpoint stands for "training of the epoch done" whatever the number
            # of steps per epoch of this run (another number of processes, say).
            done = self.steps_per_epoch if extra.get('epoch_trained') else extra['step']
            self._resume_at = (extra['epoch'], done)
            self.skipped_steps = extra.get('skipped_nonfinite_steps', 0)
            best = extra.get('best') or {}
            self.best_value = best.get('value', float('-inf'))
            self.best_epoch = best.get('epoch')
            self._train_stats = extra.get('train_stats') or {}
            if self.scaler is not None and extra.get('scaler') is not None:
                self.scaler.load_state_dict(extra['scaler'])
            self._restore_rng(extra['rng'], path)
            logger.info('resumed from %s: epoch %d after step %d', path, *self._resume_at)
        if self._resume_at[1] > self.steps_per_epoch:
            raise CheckpointError(f'{path} was written after step {self._resume_at[1]} of epoch '
                                  f'{self._resume_at[0]}, but an epoch now has {self.steps_per_epoch} '
                                  'steps: the data, batch size or number of processes changed')
        self.last_checkpoint = self.resumed_from = path

    def _restore_rng(self, states, path):
        if len(states) == utils.get_world_size():
            self._rng = states[utils.get_rank()]
        elif 0 < self._resume_at[1] < self.steps_per_epoch:
            raise CheckpointError(f'{path} was written by {len(states)} processes, this run has '
                                  f'{utils.get_world_size()}: resuming inside an epoch needs the same '
                                  'number (an epoch-end checkpoint resumes with any number)')
        else:
            logger.warning('%s was written by %d processes, this run has %d: RNG states not restored',
                           path, len(states), utils.get_world_size())

    # -- epochs ----------------------------------------------------------------------------

    def epochs(self):
        """The epochs to run: from the resumed position to schedular.epochs; with --evaluate
        one pass (epoch 0) that trains nothing."""
        if self.evaluating:
            return range(1)
        return range(self._resume_at[0], self.config['schedular']['epochs'])

    @property
    def last_epoch(self):
        """The last epoch trained (0 when none): VQA names its result files with it."""
        return 0 if self.evaluating else max(self.config['schedular']['epochs'] - 1, 0)

    def begin_epoch(self, epoch):
        """Position the sampler for `epoch` (skipping the batches already done if it is the
        epoch being resumed), restore the RNG states once, and return the steps already done."""
        done = self._resume_at[1] if epoch == self._resume_at[0] else 0
        if hasattr(self.loader.dataset, 'set_position'):  # a shard stream (dataset/shards.py)
            self.loader.dataset.set_position(epoch, done)
        else:
            sampler = self.loader.sampler
            sampler.set_epoch(epoch)
            sampler.start = done * self.loader.batch_size
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None
        return done

    def train_epoch(self, epoch, train_step):
        """Train `epoch` with train_step(model, batch, alpha) -> {loss name: loss} and return the
        epoch's training averages ({} with --evaluate). The schedule moves to `epoch` first;
        with `evaluates`, the end of the training is checkpointed. An epoch whose training had
        ended before the checkpoint resumed from is not trained again (its averages come from
        there)."""
        if self.evaluating:
            return {}
        if epoch > 0 and not getattr(self.lr_scheduler, 'per_step', False):
            self.lr_scheduler.step(epoch + self.config['schedular']['warmup_epochs'])
        start_step = self.begin_epoch(epoch)
        if self.step_log is None:
            self.step_log = utils.StepLog(self.output_dir, self.config['tensorboard'],
                                          flush_every=self.config['print_freq'])
        self._last_step_time = None  # the first step of an epoch includes the loaders' start
        if start_step == self.steps_per_epoch:
            logger.info('epoch %d was trained before the checkpoint: its evaluation follows', epoch)
            return self._train_stats
        stats = train_one_epoch(
            self.ddp_model, self.loader, self.optimizer, self.lr_scheduler, epoch, self.device,
            self.config, train_step,
            warmup_steps=WARMUP_STEP_SIZE * self.config['schedular']['warmup_epochs'],
            warm_up=self.config['warm_up'], print_freq=self.config['print_freq'], stats_fmt=None,
            start_step=start_step, hooks=self, scaler=self.scaler)
        if self.evaluates:
            self._save(self._epoch_path(epoch), epoch, next_position=(epoch, self.steps_per_epoch),
                       train_stats=stats)
        return stats

    def evaluate_accuracy(self, loader, predict, header):
        """engine.evaluate_accuracy at the config's precision and print_freq."""
        with self.autocast():
            return evaluate_accuracy(self.model, loader, predict, header=header,
                                     print_freq=self.config['print_freq'])

    def log(self, epoch, train_stats, **metrics):
        """One JSON line in log.txt: train_<loss> averages, the metrics, the epoch; after
        training, also the samples the data skipped in it (on_bad_sample: skip, all ranks) and
        the non-finite steps skipped so far. Every rank calls it."""
        entry = {f'train_{k}': v for k, v in train_stats.items()}
        if train_stats:
            total = int(utils.all_reduce_sum(skipped_samples(self.loader.dataset)))
            entry.update(skipped_samples=total - self._skipped_samples_logged,
                         skipped_nonfinite_steps=self.skipped_steps)
            self._skipped_samples_logged = total
        if entry or metrics:
            utils.append_log(self.output_dir, {**entry, **metrics, 'epoch': epoch})

    def end_epoch(self, epoch, metric=None, best_file=None):
        """After everything the script does for `epoch` (every rank calls this: the RNG states
        are gathered): with `metric` (higher is better), save `best_file` when it beats every
        earlier epoch, then checkpoint the finished epoch."""
        if not self.evaluating:
            if metric is not None and self.improved(epoch, metric):
                utils.save_checkpoint({'model': self.model.state_dict(),
                                       'optimizer': self.optimizer.state_dict(),
                                       'lr_scheduler': self.lr_scheduler.state_dict(),
                                       'config': self.config, 'epoch': epoch},
                                      os.path.join(self.output_dir, best_file))
            self._save(self._epoch_path(epoch), epoch, next_position=(epoch + 1, 0))
            if self.evaluates:
                self._rotate()
        utils.barrier()

    def finish(self, metric_name=None):
        """Log the best epoch (scripts that keep one) and leave the process group."""
        if self.step_log is not None:
            self.step_log.close()
        if self.best_epoch is not None:
            logger.info('best epoch: %d (%s %.4f)', self.best_epoch, metric_name, self.best_value)
            utils.append_log(self.output_dir, {'best_epoch': self.best_epoch})
        if utils.is_dist_avail_and_initialized():
            # A sharded (ZeRO) optimiser and the DDP wrapper hold the process group's work
            # objects; a ZeRO optimiser still alive when the group was destroyed aborted a
            # two-rank gloo process at exit ('terminate called without an active exception').
            self.optimizer = self.lr_scheduler = None
            self.ddp_model = self.model
            gc.collect()
        utils.destroy_distributed()

    def _epoch_path(self, epoch):
        if self.evaluates:
            return checkpoint_path(self.output_dir, epoch, self.steps_per_epoch)
        return checkpoint_path(self.output_dir, epoch)

    def improved(self, epoch, value):
        """Record `value` (higher is better; NaN never is) of the evaluation of `epoch`; True when
        it beats every earlier epoch. Call it on every rank with the same value."""
        if value > self.best_value:
            # a Python float: checkpoints hold plain data only (see models.checkpoint)
            self.best_value, self.best_epoch = float(value), epoch
            return True
        return False

    def _save(self, path, epoch, next_position, train_stats=None):
        # 'epoch' keeps the released meaning at an epoch end; in a step checkpoint it is the
        # running epoch. Resuming reads the position from 'resume'.
        if self.step_log is not None:  # the step log holds every step a resume will not redo
            self.step_log.flush()
        rng = utils.all_gather_objects(rng_state())
        optimizer_state = optimizer_state_dict(self.optimizer)  # every rank: ZeRO gathers shards
        if utils.is_main_process():
            state = {'model': self.model.state_dict(), 'optimizer': optimizer_state,
                     'lr_scheduler': self.lr_scheduler.state_dict(), 'config': self.config,
                     'epoch': epoch,
                     'resume': {'epoch': next_position[0], 'step': next_position[1],
                                'epoch_trained': next_position[1] == self.steps_per_epoch, 'rng': rng,
                                'scaler': self.scaler.state_dict() if self.scaler is not None else None,
                                'skipped_nonfinite_steps': self.skipped_steps,
                                'best': {'value': self.best_value, 'epoch': self.best_epoch},
                                'train_stats': train_stats}}
            utils.save_checkpoint(state, path)
        self.last_checkpoint = path

    def _rotate(self):
        if utils.is_main_process():
            for old in checkpoints(self.output_dir, step_only=True)[self.keep:]:
                os.remove(old)

    # -- hooks called by train_one_epoch ---------------------------------------------------

    def all_finite(self, finite):
        """Whether the loss is finite on every rank (all ranks must skip or stop together)."""
        return utils.all_reduce_mean(1.0 if finite else 0.0) == 1.0

    def skip_nonfinite(self, epoch, step, detail):
        """True to skip this step (within the skip_nonfinite_steps budget), False to stop."""
        if self.skipped_steps >= self.skip_limit:
            return False
        self.skipped_steps += 1
        logger.warning('non-finite loss in epoch %d, iteration %d (%s): step skipped (%d of at most %d)',
                       epoch, step, detail, self.skipped_steps, self.skip_limit)
        return True

    def failure_note(self):
        budget = f' after skipping {self.skipped_steps} such step(s)' if self.skip_limit else ''
        where = (f'the last good checkpoint is {self.last_checkpoint} (continue with --resume)'
                 if self.last_checkpoint else 'no checkpoint was written yet')
        return f'; the run stops{budget}: {where}'

    def log_step(self, epoch, steps_done, losses, lr, micro_batches=1):
        """One record of log_steps.jsonl (and TensorBoard): the step's losses (its last
        micro-batch's), lr, samples/s over all ranks since the previous record, peak memory."""
        if self.step_log is None:
            return
        now = time.perf_counter()
        seconds, self._last_step_time = now - (self._last_step_time or now), now
        record = {**losses, 'lr': lr}
        if seconds > 0:
            samples = self.loader.batch_size * micro_batches * utils.get_world_size()
            record['samples_per_s'] = samples / seconds
        if self.device.type == 'cuda':
            record['max_mem_mb'] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        self.step_log.write(epoch * self.steps_per_epoch + steps_done, epoch, **record)

    def step_done(self, epoch, steps_done):
        """After each step: the step checkpoint when due."""
        global_step = epoch * self.steps_per_epoch + steps_done
        if self.every and global_step % self.every == 0 and steps_done < self.steps_per_epoch:
            self._save(checkpoint_path(self.output_dir, epoch, steps_done), epoch,
                       next_position=(epoch, steps_done))
            self._rotate()
        if self._exit_after is not None and global_step >= self._exit_after:
            logger.warning('%s=%d: exiting abruptly after step %d', EXIT_AFTER_STEPS_ENV,
                           self._exit_after, global_step)
            exit_abruptly(75)
