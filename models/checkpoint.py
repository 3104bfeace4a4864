"""Loading ALBEF checkpoints into models: the one place for reading checkpoint files, key
remapping between training stages, position-embedding interpolation and the load report
(spec section 9).

A released file (`{'model': state_dict, ...}`) or a plain state dict both work. Every key that
does not load is classified: expected (listed by the caller's rule), tolerated (`position_ids`
buffers) or a real error. Real errors raise `CheckpointError`; nothing loads partially in silence.
"""
import logging
import re
from dataclasses import dataclass, field

import torch

from models.vit import interpolate_pos_embed

logger = logging.getLogger(__name__)

POS_EMBED_KEYS = ('visual_encoder.pos_embed', 'visual_encoder_m.pos_embed')


class CheckpointError(RuntimeError):
    pass


@dataclass
class LoadReport:
    loaded: list = field(default_factory=list)
    expected_missing: list = field(default_factory=list)
    expected_unexpected: list = field(default_factory=list)
    tolerated: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)

    @property
    def errors(self):
        return self.missing + self.unexpected + self.mismatched

    def summary(self):
        def show(keys, limit=8):
            more = f' ... (+{len(keys) - limit})' if len(keys) > limit else ''
            return ', '.join(keys[:limit]) + more
        lines = [f'loaded {len(self.loaded)} tensors']
        for name in ('expected_missing', 'expected_unexpected', 'tolerated', 'missing',
                     'unexpected', 'mismatched'):
            keys = getattr(self, name)
            if keys:
                lines.append(f'{name.replace("_", " ")} ({len(keys)}): {show(keys)}')
        return '\n  '.join(lines)


def read_checkpoint(path):
    """The object stored in a checkpoint file, with a clear error for missing/corrupt files."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f'checkpoint {str(path)!r} does not exist') from e
    except Exception:
        pass
    try:
        # Training checkpoints also hold the config and optimizer state (plain Python objects).
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise CheckpointError(f'checkpoint {str(path)!r} is unreadable (truncated or not a '
                              f'torch checkpoint): {type(e).__name__}: {e}') from e


def state_dict_of(checkpoint, source='checkpoint'):
    """The model state dict inside a checkpoint object (`{'model': ...}` or a plain dict)."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get('model'), dict):
        checkpoint = checkpoint['model']
    if not isinstance(checkpoint, dict) or not checkpoint or not all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointError(f'{source} holds no model state dict (expected {{"model": '
                              'state_dict}} or a plain state dict of tensors)')
    return dict(checkpoint)


def checkpoint_kind(state_dict):
    """Best guess of which ALBEF model produced a state dict (for error messages)."""
    keys = state_dict.keys()
    layers = {int(m.group(1)) for k in keys if (m := re.match(r'text_encoder\.encoder\.layer\.(\d+)\.', k))}
    if any(k.startswith('text_decoder.') for k in keys):
        return 'vqa'
    if 'ta_head.weight' in keys:
        return 'pretrain_nlvr'
    if 'cls_head.2.weight' in keys:
        return 've' if state_dict['cls_head.2.weight'].shape[0] == 3 else 'nlvr'
    if 'text_encoder.cls.predictions.bias' in keys:
        return 'pretrain'
    if 'itm_head.weight' in keys and layers:
        return 'retrieval'
    return 'unknown'


def _matches(key, patterns):
    return any(re.fullmatch(p, key) for p in patterns)


def load_checkpoint(model, checkpoint, kind=None, remap=None, allow_missing=(),
                    allow_unexpected=(), interpolate=POS_EMBED_KEYS):
    """Load `checkpoint` (a path, a checkpoint dict or a state dict) into `model`.

    remap: function state_dict -> state_dict applied after reading (stage-to-stage renaming).
    allow_missing / allow_unexpected: regexes of keys the caller expects to differ.
    interpolate: pos_embed keys resized to the model's patch grid.
    Returns a LoadReport; raises CheckpointError when anything else does not fit.
    """
    source = checkpoint if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, '__fspath__') else 'checkpoint'
    if source != 'checkpoint':
        checkpoint = read_checkpoint(checkpoint)
    state_dict = state_dict_of(checkpoint, str(source))
    found_kind = checkpoint_kind(state_dict)
    if remap is not None:
        state_dict = remap(state_dict)
    for key in interpolate:
        owner = model.get_submodule(key.rsplit('.', 1)[0]) if key in model.state_dict() else None
        if owner is not None and key in state_dict:
            state_dict[key] = interpolate_pos_embed(state_dict[key], owner)

    target = model.state_dict()
    report = LoadReport()
    loadable = {}
    for key, tensor in state_dict.items():
        if key not in target:
            if key.endswith('position_ids'):
                report.tolerated.append(key)
            elif _matches(key, allow_unexpected):
                report.expected_unexpected.append(key)
            else:
                report.unexpected.append(key)
        elif tensor.shape != target[key].shape:
            if key.endswith('position_ids'):
                report.tolerated.append(key)
            else:
                report.mismatched.append(f'{key}: checkpoint {tuple(tensor.shape)} vs model '
                                         f'{tuple(target[key].shape)}')
        else:
            loadable[key] = tensor
            report.loaded.append(key)
    for key in target:
        if key not in state_dict:
            if key.endswith('position_ids'):
                report.tolerated.append(key)
            elif _matches(key, allow_missing):
                report.expected_missing.append(key)
            else:
                report.missing.append(key)

    if report.errors:
        hint = ''
        if kind and found_kind not in (kind, 'unknown'):
            hint = f' The file looks like a {found_kind!r} checkpoint; this model expects {kind!r}.'
        raise CheckpointError(f'checkpoint {str(source)!r} does not fit {type(model).__module__}.'
                              f'{type(model).__name__}.{hint}\n  {report.summary()}')
    model.load_state_dict(loadable, strict=False)
    logger.info('loaded %s\n  %s', source, report.summary())
    return report
