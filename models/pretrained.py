"""Initialisation from pretrained unimodal weights: BERT (text) and DeiT (image).

Both loaders copy weights by name with shape checks and fail loudly: a requested
initialisation that does not load is an error, never a silent random start.
"""
import logging
import os
import re

import torch

from models.vit import interpolate_pos_embed

logger = logging.getLogger(__name__)

DEIT_BASE_URL = 'https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth'


class PretrainedWeightsError(RuntimeError):
    pass


def rank_zero_first(fetch, then=None):
    """`fetch()` on rank 0 while the other ranks of a distributed run wait, so that a file is
    downloaded once; then `then()` (default `fetch`) on the others, which finds it cached. An error
    on rank 0 is raised on every rank with its message, instead of leaving them waiting.
    Outside a distributed run (or at world size 1) this is `fetch()`. The wait is one collective,
    bounded by the process group's timeout (--dist_timeout)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return fetch()
    result, outcome = None, [None]
    if dist.get_rank() == 0:
        try:
            result = fetch()
        except Exception as e:
            outcome = [(type(e).__name__, str(e))]
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    if dist.get_rank() == 0:
        return result
    if outcome[0] is not None:
        raise PretrainedWeightsError(f'rank 0 failed ({outcome[0][0]}): {outcome[0][1]}')
    return (then or fetch)()


def _read_hf_bert_state_dict(name_or_path):
    """The state dict of a Hugging Face BERT checkpoint (hub name or local directory)."""
    from transformers import BertForMaskedLM as HFBertForMaskedLM
    try:
        hf_model = HFBertForMaskedLM.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise PretrainedWeightsError(
            f'cannot load BERT weights from {name_or_path!r}: {e}. Pass a local directory in '
            'the Hugging Face format (config.json + model.safetensors or pytorch_model.bin) '
            'when the hub is not reachable.') from e
    return hf_model.state_dict()


def load_bert_weights(model, name_or_path):
    """Copy BERT weights into one of our BERT modules (BertModel / BertForMaskedLM /
    BertLMHeadModel). Cross-attention and layers deeper than the checkpoint stay newly
    initialised (as in the original); any other parameter that does not load is an error."""
    source = _read_hf_bert_state_dict(name_or_path)
    has_bert_prefix = hasattr(model, 'bert')
    if not has_bert_prefix:
        source = {k[len('bert.'):]: v for k, v in source.items() if k.startswith('bert.')}
    pretrained_layers = {int(m.group(1)) for k in source
                         if (m := re.search(r'encoder\.layer\.(\d+)\.', k))}

    loaded, new, missing, mismatched = [], [], [], []
    target = model.state_dict()
    with torch.no_grad():
        for key, tensor in target.items():
            if key.endswith('position_ids'):
                continue
            if key in source:
                if source[key].shape != tensor.shape:
                    mismatched.append(f'{key}: checkpoint {tuple(source[key].shape)} vs model '
                                      f'{tuple(tensor.shape)}')
                else:
                    tensor.copy_(source[key])
                    loaded.append(key)
                continue
            layer = re.search(r'encoder\.layer\.(\d+)\.', key)
            if 'crossattention' in key or (layer and int(layer.group(1)) not in pretrained_layers):
                new.append(key)
            else:
                missing.append(key)
    if mismatched or missing or not loaded:
        raise PretrainedWeightsError(
            f'BERT weights from {name_or_path!r} do not fit the model: '
            f'{len(mismatched)} shape mismatches {mismatched[:5]}, {len(missing)} missing '
            f'{missing[:5]}, {len(loaded)} loaded')
    model.tie_weights()
    logger.info('loaded %d BERT tensors from %s; %d newly initialised (cross-attention / extra '
                'layers)', len(loaded), name_or_path, len(new))
    return {'loaded': loaded, 'new': new}


def load_deit_weights(visual_encoder, source=True):
    """Initialise the ViT from a DeiT/timm checkpoint: True (the DeiT-B/16 release), a URL or a
    local file. Position embeddings are resized to the encoder's grid. Only the classifier
    head may be left over; anything else is an error."""
    url_or_path = DEIT_BASE_URL if source is True else str(source)
    if re.match(r'^https?://', url_or_path):
        try:
            checkpoint = torch.hub.load_state_dict_from_url(url_or_path, map_location='cpu',
                                                            check_hash=True, weights_only=True)
        except Exception as e:  # network, hash or format errors all mean: no init happened
            raise PretrainedWeightsError(
                f'cannot download DeiT weights from {url_or_path}: {e}. Download the file and '
                'pass its local path as init_deit.') from e
    else:
        if not os.path.isfile(url_or_path):
            raise PretrainedWeightsError(f'DeiT checkpoint {url_or_path!r} does not exist')
        from models.checkpoint import read_checkpoint  # models.checkpoint imports this module
        checkpoint = read_checkpoint(url_or_path)
    state_dict = checkpoint.get('model', checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or 'pos_embed' not in state_dict:
        raise PretrainedWeightsError(f'{url_or_path!r} is not a DeiT/timm ViT checkpoint '
                                     '(no pos_embed)')
    state_dict = dict(state_dict)
    state_dict['pos_embed'] = interpolate_pos_embed(state_dict['pos_embed'], visual_encoder)
    target = visual_encoder.state_dict()
    mismatched = [f'{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}'
                  for k, v in state_dict.items() if k in target and v.shape != target[k].shape]
    if mismatched:
        raise PretrainedWeightsError(f'DeiT weights {url_or_path!r} do not fit the ViT: {mismatched[:5]}')
    result = visual_encoder.load_state_dict(state_dict, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.startswith(('head.', 'head_dist.', 'fc_norm.'))]
    if result.missing_keys or unexpected:
        raise PretrainedWeightsError(
            f'DeiT weights {url_or_path!r} did not load: missing {result.missing_keys[:5]}, '
            f'unexpected {unexpected[:5]}')
    logger.info('initialised the image encoder from %s', url_or_path)
