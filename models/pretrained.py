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


def rank_zero_first(fetch, then=None, error=PretrainedWeightsError):
    """`fetch()` on rank 0 while the other ranks of a distributed run wait, so that a file is
    downloaded once; then `then()` (default `fetch`) on the others, which finds it cached. An error
    on rank 0 is raised on every rank with its message (as `error` on the others), instead of
    leaving them waiting.
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
        raise error(f'rank 0 failed ({outcome[0][0]}): {outcome[0][1]}')
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


def _offline():
    return any(os.environ.get(env, '').strip().lower() in ('1', 'true', 'yes', 'on')
               for env in ('ALBEF_OFFLINE', 'HF_HUB_OFFLINE'))


def _timm_pretrained_cfg(name):
    """timm's pretrained config of `name` ('deit_base_patch16_224.fb_in1k'), None if timm has
    no such model (a name with an unknown tag is an error naming the tag)."""
    from timm.models import get_pretrained_cfg
    try:
        return get_pretrained_cfg(name)
    except RuntimeError as e:
        raise PretrainedWeightsError(f'init_deit {name!r}: {e}') from e


def _download_deit_url(url):
    try:
        return torch.hub.load_state_dict_from_url(url, map_location='cpu', check_hash=True,
                                                  weights_only=True)
    except Exception as e:  # network, hash or format errors all mean: no init happened
        raise PretrainedWeightsError(
            f'cannot download DeiT weights from {url}: {e}. Download the file and pass its '
            'local path as init_deit.') from e


def _read_timm_weights(name, cfg):
    """The state dict of timm's pretrained weights for `name`, where timm finds them: the
    Hugging Face hub (its local cache first; only the cache offline) or the config's URL."""
    if not cfg.hf_hub_id:
        if not cfg.url:
            raise PretrainedWeightsError(f'timm lists no pretrained weights for {name!r}')
        return _download_deit_url(cfg.url)
    from huggingface_hub import hf_hub_download
    repo, _, revision = cfg.hf_hub_id.partition('@')
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ['model.safetensors',
                                                               'pytorch_model.bin']
    error = None
    for filename in files:
        try:
            path = hf_hub_download(repo, filename, revision=revision or None,
                                   local_files_only=_offline())
        except Exception as e:  # not there (this file name, or offline and not cached): next
            error = e
            continue
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path, device='cpu')
        from models.checkpoint import read_checkpoint  # models.checkpoint imports this module
        return read_checkpoint(path)
    raise PretrainedWeightsError(
        f'cannot load timm weights {name!r} (Hugging Face repository {repo}, '
        f'{" or ".join(files)}): {error}. Offline, the file must be in the local Hugging Face '
        f'cache (HF_HOME / HF_HUB_CACHE), or pass its local path as init_deit.')


def load_deit_weights(visual_encoder, source=True):
    """Initialise the ViT from a DeiT/timm checkpoint: True (the DeiT-B/16 release), a URL, a
    local file or a timm model name ('deit_base_patch16_224.fb_in1k', found by timm on the
    Hugging Face hub or in its local cache). Downloads happen on rank 0 while the other ranks
    wait. Position embeddings are resized to the encoder's grid. Only the classifier head may be
    left over; anything else is an error."""
    url_or_path = DEIT_BASE_URL if source is True else str(source)
    if re.match(r'^https?://', url_or_path):
        checkpoint = rank_zero_first(lambda: _download_deit_url(url_or_path))
    elif os.path.isfile(url_or_path):
        from models.checkpoint import read_checkpoint  # models.checkpoint imports this module
        checkpoint = read_checkpoint(url_or_path)
    elif (cfg := _timm_pretrained_cfg(url_or_path)) is not None:
        checkpoint = rank_zero_first(lambda: _read_timm_weights(url_or_path, cfg))
    else:
        raise PretrainedWeightsError(f'DeiT checkpoint {url_or_path!r} does not exist (neither '
                                     'a local file, a URL nor a timm model name)')
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
