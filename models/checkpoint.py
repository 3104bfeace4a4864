"""Loading ALBEF checkpoints into models: the one place for reading checkpoint files, key
remapping between training stages, position-embedding interpolation and the load report.

A released file (`{'model': state_dict, ...}`) or a plain state dict both work. Every key that
does not load is classified: expected (listed by the caller's rule), tolerated (`position_ids`
buffers) or a real error. Real errors raise `CheckpointError`; nothing loads partially in silence.
"""
import logging
import os
import pickle
import re
from dataclasses import dataclass, field

import numpy as np
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


# Opt-in to unpickling checkpoints that hold arbitrary Python objects (it can run their code).
TRUST_PICKLE_ENV = 'ALBEF_TRUST_PICKLE'
# Plain numpy arrays and scalars are data: training checkpoints of earlier versions store
# numpy's RNG state (uint32 keys) and metrics (float64) as such.
_NUMPY_ARRAY_GLOBALS = [np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.ndarray,
                        np.dtype, np.dtypes.UInt32DType, np.dtypes.Float64DType]


def read_checkpoint(path):
    """The object stored in a checkpoint file, with a clear error for missing/corrupt files.

    Read with torch.load(weights_only=True): tensors and plain Python data only, which is what
    the released files and this repository's checkpoints hold. A file with other Python objects
    is refused (unpickling runs code a malicious file chooses), unless ALBEF_TRUST_PICKLE=1.
    """
    trusted = os.environ.get(TRUST_PICKLE_ENV, '') == '1'
    if trusted:
        logger.warning('%s=1: %s is unpickled, which runs any code it holds', TRUST_PICKLE_ENV, path)
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=not trusted)
    except FileNotFoundError as e:
        raise CheckpointError(f'checkpoint {str(path)!r} does not exist') from e
    except pickle.UnpicklingError as e:
        found = re.search(r'[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)', str(e))
        if found and not trusted:
            raise CheckpointError(
                f'checkpoint {str(path)!r} holds Python objects beyond tensors and plain data '
                f'(it names {found.group(1)}): loading it could run code the file chooses. Only '
                f'if you trust its source, set {TRUST_PICKLE_ENV}=1') from e
        raise CheckpointError(f'checkpoint {str(path)!r} is unreadable (truncated or not a '
                              f'torch checkpoint): {type(e).__name__}: {e}') from e
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
    if isinstance(checkpoint, (str, os.PathLike)):
        source = str(checkpoint)
        checkpoint = read_checkpoint(checkpoint)
    else:
        source = 'the given checkpoint'
    state_dict = state_dict_of(checkpoint, source)
    found_kind = checkpoint_kind(state_dict)
    if remap is not None:
        state_dict = remap(state_dict)
    target = model.state_dict()
    for key in interpolate:
        if key in target and key in state_dict:
            owner = model.get_submodule(key.rsplit('.', 1)[0])
            state_dict[key] = interpolate_pos_embed(state_dict[key], owner)

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
        raise CheckpointError(f'checkpoint {source!r} does not fit {type(model).__module__}.'
                              f'{type(model).__name__}.{hint}\n  {report.summary()}')
    model.load_state_dict(loadable, strict=False)
    logger.info('loaded %s\n  %s', source, report.summary())
    return report


def strip_bert_prefix(state_dict):
    """`text_encoder(_m).bert.X` -> `text_encoder(_m).X`, as the original Retrieval.py renames."""
    return {key.replace('bert.', ''): value for key, value in state_dict.items()}


# ---- Starting a task from an earlier stage: the original's key renaming ----------------------

def _layer_index(key):
    match = re.search(r'\.layer\.(\d+)\.', key)
    return int(match.group(1)) if match else None


def _with_layer(key, layer):
    return re.sub(r'\.layer\.\d+\.', f'.layer.{layer}.', key, count=1)


def fusion_layer_of(state_dict):
    """The first text-encoder layer with cross-attention in a checkpoint (6 for BERT-base)."""
    layers = [_layer_index(k) for k in state_dict
              if k.startswith('text_encoder.') and '.crossattention.' in k]
    if not layers:
        raise CheckpointError('the checkpoint has no text-encoder cross-attention layers')
    return min(layers)


def pretrain_to_vqa(state_dict):
    """The question encoder gets every BERT tensor (without `bert.`); the answer decoder
    (`text_decoder`, keeping `bert.`) gets the embeddings, the fusion layers renumbered from 0
    (with their cross-attention) and the MLM head. Momentum copies alike."""
    fusion = fusion_layer_of(state_dict)
    out = {}
    for key, value in state_dict.items():
        if 'bert.' in key:
            out[key.replace('bert.', '')] = value
        if not key.startswith('text_encoder'):
            out[key] = value
            continue
        layer = _layer_index(key)
        if layer is not None and layer < fusion:
            continue  # text-only layers stay in the encoder only
        decoder_key = key.replace('text_encoder', 'text_decoder', 1)
        out[decoder_key if layer is None else _with_layer(decoder_key, layer - fusion)] = value
    return out


def pretrain_to_text_assignment(state_dict):
    """Keys lose `bert.`; each fusion layer l is written to both layers of its pair,
    fusion + 2(l - fusion) and the next one (layers 6..11 -> 6..17 for BERT-base)."""
    fusion = fusion_layer_of(state_dict)
    out = {}
    for key, value in state_dict.items():
        if 'bert.' not in key:
            out[key] = value
            continue
        key = key.replace('bert.', '')
        layer = _layer_index(key)
        if layer is None or layer < fusion:
            out[key] = value
            continue
        first = fusion + 2 * (layer - fusion)
        out[_with_layer(key, first)] = value
        out[_with_layer(key, first + 1)] = value
    return out


@dataclass(frozen=True)
class FinetuneRule:
    remap: object  # state_dict -> state_dict, or None
    allow_missing: tuple = ()
    allow_unexpected: tuple = ()


# Momentum keys are allowed as unexpected everywhere: a model built with distill off has none.
_MOMENTUM = r'[a-z_]+_m\..*'
_QUEUES = (r'(image|text)_queue', r'queue_ptr')

FINETUNE_RULES = {
    # Keys lose `bert.`; the MLM heads are left over and the id queue is new (it keeps its -100
    # fill). Grounding fine-tunes the retrieval model too.
    ('pretrain', 'retrieval'): FinetuneRule(
        strip_bert_prefix, allow_missing=(r'idx_queue',),
        allow_unexpected=(r'text_encoder(_m)?\.cls\.predictions\..*',)),
    ('pretrain', 'vqa'): FinetuneRule(
        pretrain_to_vqa,
        allow_unexpected=(_MOMENTUM, r'temp', *_QUEUES, r'(vision|text)_proj(_m)?\..*',
                          r'itm_head\..*')),
    ('pretrain', 've'): FinetuneRule(
        strip_bert_prefix, allow_missing=(r'cls_head(_m)?\..*',),
        allow_unexpected=(_MOMENTUM, r'temp', *_QUEUES, r'(vision|text)_proj(_m)?\..*',
                          r'itm_head\..*', r'text_encoder(_m)?\.cls\..*')),
    ('pretrain', 'pretrain_nlvr'): FinetuneRule(
        pretrain_to_text_assignment, allow_missing=(r'ta_head\..*',),
        allow_unexpected=(_MOMENTUM, *_QUEUES, r'itm_head\..*', r'text_encoder\.cls\..*')),
    # NOTE(faithful): the momentum models of NLVR2 are not in the TA checkpoint (see below).
    ('pretrain_nlvr', 'nlvr'): FinetuneRule(
        None, allow_missing=(r'cls_head\..*', _MOMENTUM),
        allow_unexpected=(r'(vision|text)_proj\..*', r'temp', r'ta_head\..*')),
}
# Evaluated without fine-tuning: zero-shot retrieval (and grounding) from a pre-trained model.
ZERO_SHOT = {('pretrain', 'retrieval')}
# The released fine-tuned files (mscoco.pth, flickr30k.pth, refcoco.pth) hold online weights only.
ONLINE_ONLY = FinetuneRule(None, allow_missing=(_MOMENTUM, *_QUEUES, r'idx_queue'))


def has_momentum(keys):
    """Whether state-dict keys include momentum copies (`visual_encoder_m.` and the like)."""
    return any(key.split('.', 1)[0].endswith('_m') for key in keys)


def load_weights(model, checkpoint, target_kind, source_kind=None, evaluate=False,
                 copy_momentum_after_load=False):
    """Start `model` (an ALBEF of `target_kind`) from the weights of `checkpoint` (a path, a
    checkpoint dict or a state dict): the one loader behind every script's --checkpoint.

    - The same kind (a fine-tuned file, or pre-training from a pre-training file) loads as is;
      a file without momentum weights (the released fine-tuned layout) starts the momentum
      encoders as copies of the loaded online weights (`copy_params`), the queues fresh.
    - An earlier stage is renamed by the original's rule (FINETUNE_RULES), with pos_embed
      interpolation; source_kind None = guessed from the keys.
    - evaluate: only the same kind, or a ZERO_SHOT pair (a fine-tuned model is expected).
    copy_momentum_after_load: for NLVR2, start the momentum models from the loaded weights.
    NOTE(faithful): off by default; the original copies before loading, so its momentum ViT
    stays random and its momentum BERT is bert-base-uncased.
    Returns the LoadReport; raises CheckpointError when the file does not fit.
    """
    source = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else 'the given checkpoint'
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    state_dict = state_dict_of(checkpoint, source)
    source_kind = source_kind or checkpoint_kind(state_dict)
    if source_kind == target_kind:
        if has_momentum(model.state_dict()) and not has_momentum(state_dict):
            report = load_checkpoint(model, state_dict, kind=target_kind,
                                     allow_missing=ONLINE_ONLY.allow_missing)
            model.copy_params()
            return report
        return load_checkpoint(model, state_dict, kind=target_kind)
    if evaluate and (source_kind, target_kind) not in ZERO_SHOT:
        raise CheckpointError(f'--evaluate needs a fine-tuned {target_kind!r} checkpoint; '
                              f'{source} looks like a {source_kind!r} checkpoint')
    rule = FINETUNE_RULES.get((source_kind, target_kind))
    if rule is None:
        raise CheckpointError(f'{source}: no rule to start a {target_kind!r} model from a '
                              f'{source_kind!r} checkpoint; known: {sorted(FINETUNE_RULES)}')
    report = load_checkpoint(model, state_dict, kind=target_kind, remap=rule.remap,
                             allow_missing=rule.allow_missing,
                             allow_unexpected=rule.allow_unexpected)
    if copy_momentum_after_load and hasattr(model, 'model_pairs'):
        model.copy_params()
    return report
