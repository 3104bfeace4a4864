"""Speed and memory options of the training scripts, one config key each (README, "Speed and
memory"). All leave the losses the same up to float rounding; all are off by default except
fast_train.

fast_train          the models' fast training path (read by the model classes; default true)
precision           'fp32' (default) or 'bf16' autocast (engine.autocast_context)
grad_checkpointing  recompute ViT blocks and BERT layers during backward instead of keeping
                    their activations (less memory, about one more forward of compute)
compile             torch.compile the encoders' transformer layers: true (inductor) or a
                    backend name ('aot_eager', ...)
accum_steps         micro-batches per optimiser step (engine.train_one_epoch)
optimizer_sharding  'zero': AdamW state sharded across ranks (optim.create_optimizer)
"""
import logging

from timm.models.vision_transformer import Block

from models.xbert import BertLayer
from optim import create_optimizer

logger = logging.getLogger(__name__)

TRAIN_OPTION_KEYS = ('fast_train', 'precision', 'grad_checkpointing', 'compile', 'accum_steps',
                     'optimizer_sharding')


def configure_model(model, config):
    """Apply grad_checkpointing and compile to `model` (before DDP wrapping); returns it."""
    set_grad_checkpointing(model, bool(config.get('grad_checkpointing', False)))
    backend = config.get('compile', False)
    if backend:
        compiled = compile_layers(model, 'inductor' if backend is True else backend)
        logger.info('compile: %d transformer layers compiled (%s)', compiled, backend)
    return model


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
    layers = [m for m in model.modules() if isinstance(m, (Block, BertLayer))]
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


def accum_steps(config):
    """Micro-batches per optimiser step (config `accum_steps`, default 1)."""
    steps = config.get('accum_steps', 1)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f'config key accum_steps must be a positive integer, got {steps!r}')
    return steps


def build_optimizer(config, model):
    """AdamW from config['optimizer'], sharded across ranks with optimizer_sharding: zero."""
    return create_optimizer(config['optimizer'], model,
                            sharding=config.get('optimizer_sharding', 'none'))
