"""The one optimiser ALBEF uses: AdamW with the original weight-decay grouping."""
import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_ALLOWED_KEYS = ('opt', 'lr', 'weight_decay', 'fused')


def param_groups_weight_decay(model, weight_decay):
    """[no-decay group, decay group] over the trainable parameters of `model`.

    No decay for 1-D tensors (LayerNorm weights, biases) and names ending in `.bias`.
    NOTE(faithful): everything else decays, including the 0-D `temp`, `pos_embed` and
    `cls_token`; ALBEF declares no exceptions.
    """
    no_decay, decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name.endswith('.bias'):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{'params': no_decay, 'weight_decay': 0.0},
            {'params': decay, 'weight_decay': weight_decay}]


def create_optimizer(config_optimizer, model, sharding=None):
    """torch AdamW from the `optimizer` section of a task config: {opt: adamW, lr, weight_decay}.

    Optional `fused: true` uses torch's fused AdamW kernel (CUDA or CPU; the same update up to
    float rounding); it is ignored (with a warning) for parameters spread over devices. Both
    groups start at `lr`. sharding='zero' (the config key
    `optimizer_sharding`) wraps AdamW in ZeroRedundancyOptimizer when several processes train:
    each rank keeps the AdamW state of about 1/world of the parameters and broadcasts its
    updated share (same update; save with `optimizer_state_dict`).
    """
    if sharding not in (None, 'none', 'zero'):
        raise ValueError(f"optimizer_sharding={sharding!r} is not supported; allowed: 'none', 'zero'")
    unknown = sorted(set(config_optimizer) - set(_ALLOWED_KEYS))
    if unknown:
        raise KeyError(f'optimizer config: unknown key(s) {unknown}; allowed: {list(_ALLOWED_KEYS)}')
    for key in ('opt', 'lr', 'weight_decay'):
        if key not in config_optimizer:
            raise KeyError(f"optimizer config: missing key '{key}'")
    opt = config_optimizer['opt']
    if not isinstance(opt, str) or opt.lower() != 'adamw':
        raise ValueError(f"optimizer config: opt={opt!r} is not supported; allowed: 'adamW'")
    lr, weight_decay = float(config_optimizer['lr']), float(config_optimizer['weight_decay'])

    groups = param_groups_weight_decay(model, weight_decay)
    params = groups[0]['params'] + groups[1]['params']
    if not params:
        raise ValueError('create_optimizer: the model has no trainable parameters')
    # The original (timm) used a single group when weight_decay was 0; the update is the same,
    # and two groups keep optimizer state dicts alike whatever the config.
    fused = config_optimizer.get('fused', False)
    if not isinstance(fused, bool):
        raise TypeError(f'optimizer config: fused must be true or false, got {fused!r}')
    kwargs = {}
    if fused:
        # One kernel per step over all tensors: on CUDA, and on CPU (float32, torch >= 2.4).
        if all(p.is_cuda for p in params) or all(p.device.type == 'cpu' for p in params):
            kwargs['fused'] = True
        else:
            logger.warning('optimizer.fused ignored: the parameters are neither all on CUDA '
                           'nor all on the CPU')
    kwargs.update(lr=lr, betas=(0.9, 0.999), eps=1e-8, amsgrad=False)
    if sharding == 'zero':
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer
            return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **kwargs)
        logger.warning('optimizer_sharding: zero ignored: a single process has nothing to shard')
    return torch.optim.AdamW(groups, **kwargs)


def optimizer_state_dict(optimizer):
    """The optimiser state to checkpoint. Call on every rank: a sharded optimiser first gathers
    the shards on rank 0, which alone gets the full state (other ranks get None)."""
    if type(optimizer).__name__ != 'ZeroRedundancyOptimizer':
        return optimizer.state_dict()
    optimizer.consolidate_state_dict(to=0)
    return optimizer.state_dict() if dist.get_rank() == 0 else None
