"""Inference-only export of an ALBEF checkpoint: one folder that loads with nothing else.

    DIR/model.safetensors   the online weights (no momentum encoders, no feature queues, no
                            optimizer or schedule state), in fp32, fp16 or bf16
    DIR/config.yaml         the training config, its file paths pointed at the copies below
    DIR/config_bert.json    the BERT config
    DIR/tokenizer/          the tokenizer files
    DIR/answer_list.json    VQA's candidate answers (when the config names such a file)
    DIR/albef.json          manifest: model kind, dtype, source checkpoint and its sha256

    albef export output/retrieval/checkpoint_best.pth --out exports/retrieval --dtype fp16
    albef.load_model('exports/retrieval')   # or ALBEFInference.from_checkpoint(...)

Weights are stored with safetensors: reading them runs no code (a torch pickle can). Loading an
export goes through models.checkpoint.load_weights like the released fine-tuned files, which hold
online weights only too: the momentum encoders of the models that have them start as copies.
"""
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from albef.api import (MODELS, build_model, resolve_repo_path, source_config, source_state,
                       tokenizer_for)
from models.checkpoint import ONLINE_ONLY, CheckpointError, checkpoint_kind, load_weights
from utils import load_config, save_config

WEIGHTS, CONFIG, BERT_CONFIG, TOKENIZER, ANSWERS, MANIFEST = (
    'model.safetensors', 'config.yaml', 'config_bert.json', 'tokenizer', 'answer_list.json',
    'albef.json')
FORMAT = 'albef-export'
VERSION = 1
DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def is_export(path):
    """Whether `path` is an export folder (it holds the manifest)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def training_only(key):
    """Keys inference never reads: the rule by which load_weights accepts an online-only file
    (momentum copies `*_m.`, image/text/idx queues, queue_ptr)."""
    return any(re.fullmatch(pattern, key) for pattern in ONLINE_ONLY.allow_missing)


def inference_state_dict(state_dict, dtype='fp32'):
    """The online weights of `state_dict`, floating tensors cast to `dtype`. Each tensor is a
    contiguous copy of its own: safetensors refuses tensors that share memory (tied weights)."""
    cast = DTYPES[check_dtype(dtype)]
    return {key: (value.to(cast) if value.is_floating_point() else value).contiguous().clone()
            for key, value in state_dict.items() if not training_only(key)}


def check_dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError(f'dtype {dtype!r}: allowed {", ".join(DTYPES)}')
    return dtype


def sha256_of(path, chunk=1 << 24):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_fits(kind, config, tokenizer, state_dict, source):
    """Refuse weights that do not load into the model of `config` before anything is written
    (a released file given the wrong --config, say): a strict load into a model built on the
    meta device, which costs no memory for the weights."""
    with torch.device('meta'), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # copying into meta parameters is a no-op, as intended
        model = build_model(kind, config, tokenizer, state_dict)
        try:
            load_weights(model, state_dict, kind)
        except CheckpointError as error:
            raise CheckpointError(f'{source} does not fit its config: {error}') from None


def export_model(checkpoint, out_dir, dtype='fp32', config=None, tokenizer=None):
    """Write the inference-only export of `checkpoint` (a checkpoint file, a registry name, or an
    export folder to convert to another dtype) to `out_dir`, which must not exist or be empty.

    config: the training YAML (path or dict) for a file that stores none (the released files);
    tokenizer: a BertTokenizer, a folder or a name (default: the config's). The folder appears
    complete or not at all: it is written beside `out_dir` and renamed. Returns the manifest."""
    dtype = check_dtype(dtype)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f'--out {out_dir}: exists and is not an empty folder; choose a new one')
    state_dict, stored_config, source, path = source_state(checkpoint)
    config = source_config(config, stored_config, source)
    kind = checkpoint_kind(state_dict)
    if kind not in MODELS:
        raise CheckpointError(f'{source}: not an ALBEF checkpoint of a known task (kinds: '
                              f'{sorted(MODELS)})')
    tokenizer = tokenizer_for(tokenizer, config)
    check_fits(kind, config, tokenizer, state_dict, source)
    weights = inference_state_dict(state_dict, dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f'.{out_dir.name}.'))
    try:
        save_file(weights, staging / WEIGHTS, metadata={'format': 'pt', 'albef_kind': kind,
                                                        'dtype': dtype})
        config, replaced = dict(config), {}
        # Paths in the stored config name files of the training machine; the folder carries
        # its own copies, named relative to it.
        shutil.copyfile(resolve_repo_path(config['bert_config']), staging / BERT_CONFIG)
        replaced['bert_config'], config['bert_config'] = config['bert_config'], BERT_CONFIG
        tokenizer.save_pretrained(staging / TOKENIZER)
        replaced['tokenizer'], config['tokenizer'] = config.get('tokenizer'), TOKENIZER
        answers = resolve_repo_path(config.get('answer_list'))
        if kind == 'vqa' and isinstance(answers, str) and os.path.isfile(answers):
            shutil.copyfile(answers, staging / ANSWERS)
            replaced['answer_list'], config['answer_list'] = config['answer_list'], ANSWERS
        save_config(config, staging / CONFIG)
        manifest = {
            'format': FORMAT, 'version': VERSION, 'kind': kind, 'dtype': dtype,
            'source': source, 'source_sha256': sha256_of(path) if path else None,
            'tensors': len(weights), 'dropped_training_tensors': len(state_dict) - len(weights),
            'config_paths_replaced': replaced,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + '\n')
        os.replace(staging, out_dir)  # rename(2) also replaces an empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def read_export(folder):
    """(state_dict, config, manifest) of an export folder, the config's file paths made absolute
    (they are relative to the folder)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f'{folder}: unreadable export manifest {MANIFEST} '
                              f'({error})') from None
    if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
        raise CheckpointError(f'{folder / MANIFEST}: not an ALBEF export manifest')
    if manifest.get('version', VERSION) > VERSION:
        raise CheckpointError(f'{folder}: export format version {manifest["version"]} is newer '
                              f'than this code reads ({VERSION}); update albef')
    try:
        state_dict = load_file(folder / WEIGHTS)
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f'{folder / WEIGHTS}: unreadable ({type(error).__name__}: '
                              f'{error})') from None
    config = load_config(folder / CONFIG)
    for key in ('bert_config', 'tokenizer', 'answer_list'):
        value = config.get(key)
        if isinstance(value, str) and not os.path.isabs(value) and (folder / value).exists():
            config[key] = str((folder / value).resolve())
    return state_dict, config, manifest
