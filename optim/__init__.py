"""The one optimiser ALBEF uses: AdamW with the original weight-decay grouping."""
import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_ALLOWED_KEYS = ('opt', 'lr', 'weight_decay', 'fused', 'lr_scale')


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


def _check_lr_scale(lr_scale, model):
    """{module path: multiplier} from `optimizer.lr_scale`, each path naming a module of `model`
    with trainable parameters."""
    if not isinstance(lr_scale, dict) or not lr_scale:
        raise TypeError('optimizer config: lr_scale must be a mapping {module path: multiplier}, '
                        f'e.g. {{visual_encoder: 0.1}}; got {lr_scale!r}')
    modules = dict(model.named_modules())
    for path, scale in lr_scale.items():
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
            raise ValueError(f'optimizer config: lr_scale.{path} must be a number >= 0, got {scale!r}')
        if path not in modules:
            raise KeyError(f'optimizer config: lr_scale names {path!r}, not a module of '
                           f'{type(model).__name__}; its top-level modules: '
                           f'{sorted(n for n, _ in model.named_children())}')
        if not any(p.requires_grad for p in modules[path].parameters()):
            raise ValueError(f'optimizer config: lr_scale.{path}: the module has no trainable '
                             'parameters')
    return {path: float(scale) for path, scale in lr_scale.items()}


def param_groups_lr_scale(model, weight_decay, lr_scale):
    """The weight-decay groups, each split by LR multiplier: a parameter under a module path of
    `lr_scale` (the longest one that matches) gets that group's `lr_scale`; the scheduler
    multiplies its LR by it (as MAE's layer-wise decay does). Groups are [no-decay, decay] at
    scale 1, then a pair per multiplier, in the order of the config."""
    def scale_of(name):
        matches = [path for path in lr_scale if name == path or name.startswith(path + '.')]
        return lr_scale[max(matches, key=len)] if matches else 1.0

    scale = {id(p): scale_of(name) for name, p in model.named_parameters()}
    by_decay, groups = param_groups_weight_decay(model, weight_decay), []
    for value in [1.0] + [s for s in dict.fromkeys(lr_scale.values()) if s != 1.0]:
        for group in by_decay:
            params = [p for p in group['params'] if scale[id(p)] == value]
            groups.append({**group, 'params': params, 'lr_scale': value})
    return groups


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

    lr_scale = config_optimizer.get('lr_scale')
    if lr_scale is None:
        groups = param_groups_weight_decay(model, weight_decay)
    else:
        groups = param_groups_lr_scale(model, weight_decay, _check_lr_scale(lr_scale, model))
        for group in groups:  # the schedule's base LR stays `lr`; the group runs at lr x scale
            group['initial_lr'], group['lr'] = lr, lr * group['lr_scale']
    params = [p for group in groups for p in group['params']]
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
