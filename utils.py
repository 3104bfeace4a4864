"""What every task script shares: the config (YAML, every key's default and check, `--opts`),
the command line, torch.distributed set-up and no-op-safe collectives, seeding, rank-0 logging,
the MetricLogger and atomic checkpoint files. Models never import this module."""
import argparse
import collections
import contextlib
import copy
import datetime
import difflib
import io
import json
import logging
import numbers
import os
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """A config that cannot run; the message names the file, the key and what is allowed."""


class UnknownKeyError(ConfigError, KeyError):
    """An override of a key the config does not have (a KeyError too, as a dict lookup)."""
    __str__ = ValueError.__str__


def _yaml():
    # YAML 1.2 safe loader: `1e-4` is a float (PyYAML's 1.1 resolver would give a string).
    yaml = YAML(typ='safe', pure=True)
    yaml.default_flow_style = False
    return yaml


def load_config(path):
    """The YAML file at `path` as a dict (original key names kept, e.g. `schedular`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'config file not found: {path}')
    try:
        with open(path) as f:
            config = _yaml().load(f)
    except YAMLError as e:
        raise ConfigError(f'config file {path} is not valid YAML: {e}') from e
    if not isinstance(config, dict):
        raise ConfigError(f'config file {path} must hold a mapping of keys, '
                          f'got {type(config).__name__}')
    return config


def save_config(config, path):
    """Dump `config` as YAML to `path` (main process only)."""
    if not is_main_process():
        return
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
        _yaml().dump(config, f)


# ---------------------------------------------------------------------------------------------
# Every config key: type, allowed values, default
# To add a key: one `Key(...)` line in KEYS (or in a section such as OPTIMIZER); give it a
# `default` when scripts rely on it being present, list it in REQUIRED for the tasks that cannot
# run without it.
# ---------------------------------------------------------------------------------------------

_NO_DEFAULT = object()  # the key is simply absent when not given

TASKS = ('pretrain', 'pretrain_nlvr', 'retrieval', 'grounding', 'vqa', 'nlvr', 've')


@dataclass(frozen=True)
class Key:
    """types: accepted Python types (int is also accepted for float); choices: allowed values;
    low/high: inclusive numeric bounds; items: the type of list elements; default: the value
    filled in when the key is absent (per task if a dict {task: value}); tasks: the tasks the key
    applies to (default all), elsewhere it is refused."""
    types: tuple
    doc: str = ''
    choices: tuple = ()
    low: float = None
    high: float = None
    items: type = None
    default: object = _NO_DEFAULT
    tasks: tuple = TASKS

    def describe(self):
        if self.choices:
            return 'one of ' + ', '.join(repr(c) for c in self.choices)
        names = [t.__name__ if t is not type(None) else 'null' for t in self.types]
        if self.items is not None and list in self.types:
            names[self.types.index(list)] = f'list of {self.items.__name__}'
        text = ' or '.join(names)
        if self.low is not None and self.high is not None:
            text += f' in [{self.low}, {self.high}]'
        elif self.low is not None:
            text += f' >= {self.low}'
        return text

    def default_for(self, task):
        if isinstance(self.default, dict):
            return self.default.get(task, _NO_DEFAULT)
        return self.default if task in self.tasks else _NO_DEFAULT


PATH = Key((str,), 'a file or folder')
PATHS = Key((str, list), 'one file or a list of files', items=str)
POSITIVE_INT = Key((int,), low=1)
PROBABILITY = Key((float,), low=0.0, high=1.0)
MAYBE_NAME = Key((str, type(None)), 'hub name or local folder; null for random init')
FLAG = Key((bool,))

OPTIMIZER = {
    'opt': Key((str,), choices=('adamW', 'adamw', 'AdamW')),
    'lr': Key((float,), low=0.0),
    'weight_decay': Key((float,), low=0.0),
    'fused': Key((bool,), "torch's fused AdamW kernel (same update up to rounding)", default=False),
    'lr_scale': Key((dict,), 'LR multiplier per module path, e.g. {visual_encoder: 0.1}'),
}

SCHEDULE = {  # `schedular`: the original's spelling is the key
    'sched': Key((str,), choices=('cosine',)),
    'lr': Key((float,), low=0.0),
    'epochs': POSITIVE_INT,
    'min_lr': Key((float,), low=0.0),
    'decay_rate': Key((float,)),
    'warmup_lr': Key((float,), low=0.0),
    'warmup_epochs': Key((int,), low=0),
    'cooldown_epochs': Key((int,), low=0),
    'step_every': Key((str,), "'epoch': the original's per-epoch cosine with a warm-up in "
                      "100-iteration units; 'step': warm-up and cosine per optimiser step",
                      choices=('epoch', 'step'), default='epoch'),
    'warmup_steps': Key((int,), 'per-step warm-up length (step_every: step); absent: '
                        'warmup_epochs epochs of steps', low=0),
}

KEYS = {
    # data
    'train_file': PATHS, 'val_file': PATHS, 'test_file': PATHS,
    'answer_list': PATH, 'vqa_root': PATH, 'vg_root': PATH,
    'image_root': Key((str,), 'the folder image paths are relative to',
                      default={'pretrain': '', 'pretrain_nlvr': ''}),
    'refcoco_data': PATH, 'det_file': PATH, 'coco_file': PATH,
    'max_words': Key((int,), 'words kept by the caption cleaning', low=1, default=30),
    'max_tokens': POSITIVE_INT,
    'eos': Key((str,), 'the answer decoder stop token', default={'vqa': '[SEP]'}),
    'num_workers': Key((int,), 'data loader worker processes per rank', low=0, default=4),
    'threads': Key((int, type(None)), 'intra-op CPU threads per process in CPU runs; null: '
                   "torch's default", low=1, default=None),
    # model
    'bert_config': PATH, 'text_encoder': MAYBE_NAME, 'text_decoder': MAYBE_NAME,
    'tokenizer': Key((str,), 'hub name or local folder'),
    'init_deit': Key((bool, str), 'true/false, a URL, a local file or a timm model name'),
    'image_res': POSITIVE_INT, 'patch_size': POSITIVE_INT, 'vision_width': POSITIVE_INT,
    'vit_depth': POSITIVE_INT, 'vit_heads': POSITIVE_INT, 'embed_dim': POSITIVE_INT,
    'temp': Key((float,), low=0.0), 'mlm_probability': PROBABILITY, 'queue_size': POSITIVE_INT,
    'momentum': PROBABILITY, 'alpha': PROBABILITY, 'distill': FLAG,
    # training and evaluation
    'batch_size': POSITIVE_INT, 'batch_size_train': POSITIVE_INT, 'batch_size_test': POSITIVE_INT,
    'warm_up': Key((bool,), 'ramp alpha from 0 over epoch 0', default=True),
    'k_test': POSITIVE_INT, 'eval_ema': Key((bool,), 'unused by the original'),
    'print_freq': Key((int,), 'iterations between progress lines', low=1, default=50),
    'optimizer': Key((dict,)), 'schedular': Key((dict,)),
    'augment': Key((dict,), 'training augmentation overrides: crop_scale, hflip, randaugment'),
    # speed and memory options: every one leaves the losses the same up to float rounding
    'fast_train': Key((bool,), "the models' faster computation of the same losses", default=True,
                      tasks=('pretrain', 'retrieval', 'grounding', 'vqa')),  # the others have one
    'fast_eval': Key((bool,), "retrieval evaluation's faster computation of the same scores",
                     default=True, tasks=('retrieval',)),
    'precision': Key((str,), 'autocast dtype in training and evaluation (fp16 with a gradient '
                     'scaler)', choices=('fp32', 'bf16', 'fp16'), default='fp32'),
    'grad_checkpointing': Key((bool,), 'recompute ViT blocks and BERT layers in backward',
                              default=False),
    'compile': Key((bool, str), 'torch.compile the transformer layers: true (inductor) or a '
                   'backend name', default=False),
    'accum_steps': Key((int,), 'micro-batches per optimiser step', low=1, default=1),
    'optimizer_sharding': Key((str,), "'zero': AdamW state sharded across ranks",
                              choices=('none', 'zero'), default='none'),
    # reliability
    'checkpoint_every_steps': Key((int,), '0 = at the end of every epoch only', low=0, default=0),
    'keep_checkpoints': Key((int,), 'step checkpoints kept (older ones are deleted)', low=1,
                            default=2),
    'on_bad_sample': Key((str,), 'unreadable image or empty caption in training data',
                         choices=('fail', 'skip'),
                         default={task: 'skip' if task.startswith('pretrain') else 'fail'
                                  for task in TASKS}),
    'skip_nonfinite_steps': Key((int,), 'steps with a NaN/inf loss skipped before stopping',
                                low=0, default=0),
    # logs: log.txt (per epoch) and log_steps.jsonl (per step) are always written
    'tensorboard': Key((bool,), 'also write the per-step scalars as TensorBoard events '
                       '(output_dir/tensorboard; the tensorboard package)', default=False),
}
AUGMENT = {  # training augmentation; each absent key keeps the original recipe
    'crop_scale': Key((list,), 'RandomResizedCrop area range [low, high]', items=float),
    'hflip': FLAG,
    'randaugment': FLAG,
}
SECTIONS = {'optimizer': OPTIMIZER, 'schedular': SCHEDULE, 'augment': AUGMENT}

_COMMON = ('train_file', 'bert_config', 'tokenizer', 'image_res', 'optimizer', 'schedular')
REQUIRED = {
    'pretrain': _COMMON + ('batch_size', 'embed_dim', 'temp', 'mlm_probability', 'queue_size',
                           'momentum', 'alpha', 'max_tokens'),
    'pretrain_nlvr': _COMMON + ('batch_size',),
    'retrieval': _COMMON + ('val_file', 'test_file', 'image_root', 'batch_size_train',
                            'batch_size_test', 'queue_size', 'embed_dim', 'k_test', 'distill'),
    'grounding': _COMMON + ('test_file', 'image_root', 'refcoco_data', 'det_file', 'batch_size',
                            'queue_size', 'embed_dim', 'distill'),
    'vqa': _COMMON + ('test_file', 'answer_list', 'vqa_root', 'vg_root', 'batch_size_train',
                      'batch_size_test', 'k_test', 'distill'),
    'nlvr': _COMMON + ('val_file', 'test_file', 'image_root', 'batch_size', 'distill'),
    've': _COMMON + ('val_file', 'test_file', 'image_root', 'batch_size_train', 'batch_size_test',
                     'distill'),
}
# Tasks whose momentum queue receives the gathered batch of every rank at each step.
QUEUE_BATCH = {'pretrain': 'batch_size', 'retrieval': 'batch_size_train', 'grounding': 'batch_size'}
# Section keys a task cannot run without.
REQUIRED_IN_SECTION = {'optimizer': ('opt', 'lr', 'weight_decay'),
                       'schedular': ('lr', 'epochs', 'min_lr', 'warmup_lr', 'warmup_epochs')}


def _suggest(key, allowed):
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ''


def _check_value(name, value, spec):
    types = spec.types + ((int,) if float in spec.types else ())
    # bool is an int subclass: `true` where a number is expected is a mistake.
    if (isinstance(value, bool) and bool not in spec.types) or not isinstance(value, types):
        return f'{name} = {value!r} ({type(value).__name__}): expected {spec.describe()}'
    if spec.choices and value not in spec.choices:
        return f'{name} = {value!r}: expected {spec.describe()}'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high):
            return f'{name} = {value!r}: expected {spec.describe()}'
    if isinstance(value, list) and spec.items is not None:
        if not value or not all(isinstance(v, spec.items) for v in value):
            return f'{name} = {value!r}: expected {spec.describe()} (non-empty)'
    return None


def _check_mapping(config, table, prefix, errors, task):
    for key, value in config.items():
        name = f'{prefix}{key}'
        if key not in table:
            errors.append(f"unknown key '{name}'{_suggest(key, table)} "
                          f'(every key is listed in utils.KEYS)')
            continue
        spec = table[key]
        if task not in spec.tasks:
            errors.append(f"key '{name}' does not apply to {task} (it is read by: "
                          f"{', '.join(spec.tasks)})")
            continue
        problem = _check_value(name, value, spec)
        if problem:
            errors.append(problem)
        elif key in SECTIONS and not prefix:
            _check_mapping(value, SECTIONS[key], f'{key}.', errors, task)


def with_defaults(config, task):
    """A copy of `config` with every key that has a default filled in when absent (sections
    too), so that `--opts key=value` can set it and the saved config.yaml shows the value used."""
    config = copy.deepcopy(config)
    for table, node in [(KEYS, config)] + [(SECTIONS[s], config[s]) for s in SECTIONS
                                           if isinstance(config.get(s), dict)]:
        for key, spec in table.items():
            default = spec.default_for(task)
            if key not in node and default is not _NO_DEFAULT:
                node[key] = default
    return config


def validate(config, task, world_size=1, source='config'):
    """Raise ConfigError listing every problem of `config` for `task` (one of TASKS), or return
    `config` unchanged."""
    if task not in REQUIRED:
        raise ValueError(f'unknown task {task!r}; known: {sorted(REQUIRED)}')
    errors = []
    _check_mapping(config, KEYS, '', errors, task)
    errors += [f"missing key '{key}' (needed by {task})" for key in REQUIRED[task] if key not in config]
    for section, keys in REQUIRED_IN_SECTION.items():
        if isinstance(config.get(section), dict):
            errors += [f"missing key '{section}.{key}'" for key in keys if key not in config[section]]
    if errors:  # the cross-key rules below assume the types are right
        raise ConfigError(f'{source}: ' + '; '.join(errors))

    res, patch = config['image_res'], config.get('patch_size', 16)
    if res % patch:
        errors.append(f'image_res = {res} is not divisible by patch_size = {patch}: the ViT '
                      f'needs a whole number of patches (allowed: multiples of {patch}, e.g. '
                      f'{max(patch, res - res % patch)} or {res - res % patch + patch})')
    scale = config.get('augment', {}).get('crop_scale')
    if scale is not None and not (len(scale) == 2 and 0.0 < scale[0] <= scale[1] <= 1.0):
        errors.append(f'augment.crop_scale = {scale!r}: expected [low, high] with '
                      f'0 < low <= high <= 1 (fractions of the image area)')
    schedule = config['schedular']
    if 'warmup_steps' in schedule and schedule.get('step_every', 'epoch') != 'step':
        errors.append('schedular.warmup_steps needs schedular.step_every: step (the per-epoch '
                      'schedule warms up over warmup_epochs x 100 iterations)')
    batch_key = QUEUE_BATCH.get(task)
    if batch_key and config.get('queue_size') is not None:
        global_batch = config[batch_key] * world_size
        if config['queue_size'] % global_batch:
            errors.append(f'queue_size = {config["queue_size"]} is not divisible by the global batch '
                          f'{batch_key} x world size = {config[batch_key]} x {world_size} = '
                          f'{global_batch}: the queue is filled one gathered batch at a time '
                          f'(allowed: multiples of {global_batch})')
    if errors:
        raise ConfigError(f'{source}: ' + '; '.join(errors))
    return config


def _flat_keys(config, prefix=''):
    for key, value in config.items():
        yield f'{prefix}{key}'
        if isinstance(value, dict):
            yield from _flat_keys(value, f'{prefix}{key}.')


_TRUE = ('true', '1', 'yes', 'y', 't', 'on')
_FALSE = ('false', '0', 'no', 'n', 'f', 'off')


def _parse_bool(text):
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise ValueError(f'expected a boolean ({"/".join(_TRUE[:3])} or {"/".join(_FALSE[:3])})')


def _convert_like(text, old, spec=None):
    """`text` converted to the type of the value it replaces (`spec`: the key's, if known)."""
    if isinstance(old, bool):
        if spec is not None and str in spec.types and text.strip().lower() not in _TRUE + _FALSE:
            return text  # a bool-or-name key such as `compile=aot_eager`
        return _parse_bool(text)
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    if isinstance(old, str):
        return text
    value = _yaml().load(io.StringIO(text))
    if old is not None and not isinstance(value, type(old)):
        raise ValueError(f'expected a {type(old).__name__} such as {old!r}')
    return value


def _convert_new(item, text, spec):
    """`text` for a key the config does not have, as the first of the key's types it parses as."""
    for kind in spec.types:
        try:
            if kind is bool:
                return _parse_bool(text)
            if kind in (int, float):
                return kind(text)
            if kind is str:
                return text
            if kind is type(None) and text.strip().lower() in ('null', 'none'):
                return None
            value = _yaml().load(io.StringIO(text))
            if isinstance(value, kind):
                return value
        except (ValueError, YAMLError):
            continue
    raise ConfigError(f'override {item!r}: cannot convert {text!r}: expected {spec.describe()}')


_NULL = ('null', 'Null', 'NULL', '~')  # YAML's spellings of null


def apply_overrides(config, overrides, task=None):
    """A copy of `config` with `key.sub=value` overrides applied (as given by `--opts`).

    A key must be in the config (every key with a default is, after `with_defaults`) or in the
    tables (KEYS, SECTIONS); the value takes the type of the value it replaces, or the key's
    type (bools accept true/false/1/0/yes/no; lists and dicts are parsed as YAML); validate()
    then checks it. `key=null` sets a key that accepts null (text_encoder) to None and removes
    any other key, as if the YAML did not have it (a key with a default gets its default back
    from with_defaults); a key `task` cannot run without, or a required section key, is refused.
    """
    config = copy.deepcopy(config)
    for item in overrides or ():
        key, sep, text = item.partition('=')
        if not sep or not key:
            raise ConfigError(f'override {item!r} must look like key.sub=value')
        *parents, leaf = key.split('.')
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        table = SECTIONS.get(parents[0], {}) if len(parents) == 1 else KEYS if not parents else {}
        spec = table.get(leaf)
        if text.strip() in _NULL and (spec is None or type(None) not in spec.types):
            required = (REQUIRED.get(task, ()) if not parents else
                        REQUIRED_IN_SECTION.get(parents[0], ()) if len(parents) == 1 else ())
            if leaf in required:
                raise ConfigError(f'override {item!r}: {key!r} is required'
                                  f'{f" by {task}" if task else ""}: it cannot be removed')
            if isinstance(node, dict) and leaf in node:
                del node[leaf]
                continue
            if spec is not None and (isinstance(node, dict) or len(parents) == 1):
                continue  # a known key that is absent already
        elif text.strip() in _NULL and isinstance(node, dict):
            node[leaf] = None  # a key whose null means something (random init for text_encoder)
            continue
        if isinstance(node, dict) and leaf not in node and spec is not None:
            # A known key without a default, absent from this config: typed by the table;
            # validate() then says whether it applies to the task.
            node[leaf] = _convert_new(item, text, spec)
            continue
        if not isinstance(node, dict) or leaf not in node:
            close = difflib.get_close_matches(key, list(_flat_keys(config)), n=3, cutoff=0.6)
            hint = f'; did you mean {", ".join(close)}?' if close else ''
            raise UnknownKeyError(f'override {item!r}: unknown config key {key!r}{hint}')
        try:
            node[leaf] = _convert_like(text, node[leaf], spec)
        except (ValueError, YAMLError) as e:
            raise ConfigError(f'override {item!r}: cannot convert {text!r} for key {key!r} '
                              f'(currently {node[leaf]!r}): {e}') from e
    return config


def load_task_config(args, task):
    """The config of a task script: the YAML of --config with every default filled in, --opts
    applied, --text_encoder (and --text_decoder) applied, validated for `task` at the world size
    of `args` (call after init_distributed_mode)."""
    config = with_defaults(load_config(args.config), task)
    config = with_defaults(apply_overrides(config, args.opts, task), task)  # null: the default
    if getattr(args, 'text_encoder', None):
        config['text_encoder'] = config['tokenizer'] = args.text_encoder
    if getattr(args, 'text_decoder', None):
        config['text_decoder'] = args.text_decoder
    return validate(config, task, getattr(args, 'world_size', 1),
                    source=f'config {args.config} (with --opts)')


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def str2bool(text):
    """argparse type for boolean flags: `--resume false` is False (argparse's bool() is not)."""
    if isinstance(text, bool):
        return text
    try:
        return _parse_bool(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f'{text!r}: {e}') from None


def bool_or_path(text):
    """argparse type of --resume: true/false words as booleans, anything else a checkpoint path."""
    if isinstance(text, bool):
        return text
    try:
        return _parse_bool(text)
    except ValueError:
        return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag with its default (where it has one); the description and examples as written."""

    def _get_help_string(self, action):
        shown = action.default not in (None, '', False, argparse.SUPPRESS) and not action.required
        return f'{action.help} (default: {action.default})' if shown and action.help else action.help


def get_args_parser(doc, evaluate=True):
    """The arguments every task script shares; `doc` is the script's docstring (its first
    paragraph describes the script, the rest, with the usage examples, ends --help). Scripts add
    their own."""
    description, _, examples = doc.strip().partition('\n\n')
    parser = argparse.ArgumentParser(description=description, epilog=examples.strip() or None,
                                     formatter_class=HelpFormatter)
    parser.add_argument('--config', default=None,
                        help='task YAML file (configs/*.yaml); may be left out with --evaluate '
                             'and a released --checkpoint name: the config it pairs with')
    parser.add_argument('--output_dir', required=True,
                        help='folder for log.txt, config.yaml, checkpoints and results')
    parser.add_argument('--checkpoint', default='',
                        help='weights to start from: a pre-training checkpoint to fine-tune, or '
                             'with --evaluate the checkpoint to evaluate (never resumes a run); '
                             'a file, a released name (albef_14m, mscoco.pth, ...: '
                             'docs/checkpoints.md) or an http(s) URL')
    parser.add_argument('--cache_dir', default=None,
                        help='download cache of --checkpoint names and URLs (default: '
                             '$ALBEF_CACHE, else ~/.cache/albef; docs/checkpoints.md)')
    parser.add_argument('--resume', type=bool_or_path, nargs='?', const=True, default=False,
                        metavar='PATH',
                        help='continue the interrupted run in --output_dir from its newest '
                             'readable checkpoint (model, optimizer, schedule, RNG, data '
                             'position), or from the checkpoint file PATH; without any, the run '
                             'starts as it would without --resume')
    if evaluate:
        parser.add_argument('--evaluate', action='store_true',
                            help='only evaluate --checkpoint (no training)')
    parser.add_argument('--text_encoder', default=None,
                        help="BERT weights and tokenizer (hub name or local directory); "
                             "overrides the config's text_encoder and tokenizer")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cpu, cuda or cuda:N')
    parser.add_argument('--seed', default=42, type=int, help='random seed (plus the rank)')
    parser.add_argument('--world_size', default=1, type=int,
                        help='number of processes (set by torchrun)')
    parser.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    parser.add_argument('--dist_timeout', default=30, type=float,
                        help='minutes a collective may wait for a dead rank before failing')
    parser.add_argument('--opts', nargs='*', default=[], metavar='KEY=VALUE',
                        help='config overrides, e.g. optimizer.lr=2e-5 precision=bf16 '
                             '(every key of utils.KEYS)')
    parser.add_argument('--debug', action='store_true',
                        help='show the full traceback of an error (also: ALBEF_DEBUG=1)')
    return parser


def error_types():
    """The errors a user can fix (config, data, checkpoint, command line): reported in one line."""
    from dataset.faults import SampleError
    from dataset.images import ImageLoadError
    from models.checkpoint import CheckpointError
    from models.pretrained import PretrainedWeightsError
    return (ConfigError, SampleError, ImageLoadError, CheckpointError, PretrainedWeightsError,
            FileNotFoundError, FloatingPointError, KeyError, ValueError, OSError)


def run(main, argv=None):
    """Run a script's main(argv) as a command.

    A config, data or checkpoint error prints one line `error: ...` on stderr and exits with
    code 2 (`--debug` or ALBEF_DEBUG=1: the traceback instead). In a distributed run, an error
    caused by another rank dying or hanging is re-raised naming the rank and the time limit
    (--dist_timeout), so that every surviving rank exits with a clear message instead of a bare
    transport error."""
    debug = '--debug' in (sys.argv[1:] if argv is None else argv) or \
        os.environ.get('ALBEF_DEBUG', '') not in ('', '0')
    try:
        return main(argv)
    except Exception as error:
        if is_dist_avail_and_initialized() and is_peer_failure(error):
            raise RuntimeError(f'rank {get_rank()} of {get_world_size()}: lost contact with another '
                               'process (it exited, crashed or did not answer within '
                               '--dist_timeout); stopping this one too. The failing process\'s own '
                               f'log names the cause. ({type(error).__name__}: {str(error)[:300]})'
                               ) from error
        if debug or not isinstance(error, error_types()):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        prefix = f'rank {get_rank()}: ' if get_world_size() > 1 else ''
        print(f'error: {prefix}{" ".join(str(message).split())} (--debug shows the traceback)',
              file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------

def init_distributed_mode(args):
    """Join the process group described by torchrun's (or SLURM's) environment variables.

    Sets args.distributed, args.rank, args.world_size and args.gpu. Without those variables
    this is a single process and nothing else happens; every collective below is then a no-op.
    """
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank = int(os.environ['RANK'])
        args.world_size = int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', 0))
    elif 'SLURM_PROCID' in os.environ and _slurm_tasks() > 1:
        # NOTE(fixed): the original took the rank from SLURM but the world size from
        # --world_size and needed MASTER_ADDR set by hand (otherwise it stopped or hung).
        args.rank, args.world_size = int(os.environ['SLURM_PROCID']), _slurm_tasks()
        args.gpu = int(os.environ.get('SLURM_LOCALID', args.rank % max(torch.cuda.device_count(), 1)))
        if args.dist_url == 'env://':
            os.environ.setdefault('MASTER_ADDR', slurm_first_host(os.environ['SLURM_JOB_NODELIST']))
            os.environ.setdefault('MASTER_PORT', str(slurm_port(os.environ.get('SLURM_JOB_ID', '0'))))
            os.environ['RANK'], os.environ['WORLD_SIZE'] = str(args.rank), str(args.world_size)
            os.environ['LOCAL_RANK'] = str(args.gpu)
    else:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        return

    args.distributed = True
    on_gpu = str(args.device).startswith('cuda') and torch.cuda.is_available()
    args.dist_backend = 'nccl' if on_gpu else 'gloo'
    kwargs = {}
    if on_gpu:
        torch.cuda.set_device(args.gpu)
        kwargs['device_id'] = torch.device('cuda', args.gpu)
    if on_gpu:
        # A failed or timed-out NCCL collective tears the process down instead of leaving it
        # blocked in a later kernel (the default on recent torch; set for older ones).
        os.environ.setdefault('TORCH_NCCL_ASYNC_ERROR_HANDLING', '1')
    timeout = datetime.timedelta(minutes=getattr(args, 'dist_timeout', 30))
    logger.info('distributed init (rank %d of %d, %s): %s', args.rank, args.world_size,
                args.dist_backend, args.dist_url)
    try:
        dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                                world_size=args.world_size, rank=args.rank, timeout=timeout, **kwargs)
        barrier()
    except (RuntimeError, dist.DistError) as error:
        where = (f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
                 if args.dist_url == 'env://' else args.dist_url)
        raise RuntimeError(f'process {args.rank} of {args.world_size} could not join the others at '
                           f'{where} within --dist_timeout {args.dist_timeout:g} min: {error}') from error


def _slurm_tasks():
    # SLURM_STEP_NUM_TASKS is the size of this srun step; SLURM_NTASKS that of the allocation
    # (a batch script that runs `python` without srun is one task: SLURM_PROCID is 0).
    return int(os.environ.get('SLURM_STEP_NUM_TASKS') or os.environ.get('SLURM_NTASKS') or 1)


def slurm_first_host(nodelist):
    """The first host name of a SLURM node list ('gpu[03-05,9],cpu1' -> 'gpu03'), parsed here
    rather than with `scontrol show hostnames` (not installed on every compute node)."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first entry: up to a comma outside brackets
        depth += {'[': 1, ']': -1}.get(char, 0)
        if char == ',' and depth == 0:
            end = i
            break
    # every bracketed range list stands for its first value ('[03-05,9]' -> '03')
    return re.sub(r'\[([^\]]*)\]', lambda m: re.split(r'[-,]', m.group(1))[0], nodelist[:end])


def slurm_port(job_id):
    """A port from the job id, so that jobs sharing a node do not collide: 20000..39999."""
    digits = re.sub(r'\D', '', str(job_id)) or '0'
    return 20000 + int(digits) % 20000


# Phrases of gloo / NCCL / c10d errors raised when another rank died or stopped responding.
_PEER_FAILURE_MARKERS = ('connection reset', 'connection closed', 'connection refused', 'timed out',
                         'timeout', 'broken pipe', 'socket', 'nccl', 'gloo')


def is_peer_failure(error):
    """Whether `error` (raised in a collective) means that another rank died or hangs."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(marker in text for marker in _PEER_FAILURE_MARKERS)


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist_avail_and_initialized() and get_world_size() > 1:
        dist.barrier()


def destroy_distributed():
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def _collective_device():
    # NCCL only reduces CUDA tensors; gloo reduces CPU tensors.
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def all_reduce_mean(value):
    """Mean of `value` (a tensor or a number) over ranks; returned as given at world size 1."""
    if not is_dist_avail_and_initialized() or get_world_size() == 1:
        return value
    if isinstance(value, torch.Tensor):
        reduced = value.detach().to(_collective_device(), copy=True)
        dist.all_reduce(reduced)
        return (reduced / get_world_size()).to(value.device)
    reduced = torch.tensor(float(value), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(reduced)
    return reduced.item() / get_world_size()


def all_reduce_sum(number):
    """Sum of a number over ranks (returned as given at world size 1)."""
    if not is_dist_avail_and_initialized() or get_world_size() == 1:
        return number
    reduced = torch.tensor(float(number), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(reduced)
    return reduced.item()


# ---------------------------------------------------------------------------------------------
# Seeding and logging
# ---------------------------------------------------------------------------------------------

def set_seed(seed):
    """Seed torch, numpy and python `random` with seed + rank (so ranks draw different data)."""
    seed = seed + get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def setup_logging(output_dir=None):
    """stdlib logging: INFO on rank 0 (console and output_dir/train.log), WARNING elsewhere.

    Safe to call again: the handlers it installed before are replaced.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, '_albef', False)]:
        root.removeHandler(handler)
        handler.close()
    rank = get_rank()
    prefix = '' if rank == 0 else f'[rank {rank}] '
    formatter = logging.Formatter(f'%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s',
                                  datefmt='%Y-%m-%d %H:%M:%S')
    handlers = [logging.StreamHandler(sys.stdout)]
    if output_dir and rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, 'train.log')))
    for handler in handlers:
        handler._albef = True
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _to_json(value):
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f'{type(value).__name__} is not JSON serialisable')


def append_log(output_dir, stats):
    """Append `stats` as one JSON line to output_dir/log.txt (main process only)."""
    if not is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, 'log.txt'), 'a') as f:
        f.write(json.dumps(stats, default=_to_json) + '\n')


class StepLog:
    """Per-step scalars of a training run (main process only): one JSON line per optimiser
    step in output_dir/log_steps.jsonl, always; TensorBoard events in output_dir/tensorboard
    as well with `tensorboard=True`. Lines are flushed every `flush_every` steps and on close,
    so a killed run loses at most those."""

    FILE = 'log_steps.jsonl'

    def __init__(self, output_dir, tensorboard=False, flush_every=50):
        self.file = self.writer = None
        self.flush_every, self._unflushed = flush_every, 0
        if not is_main_process():
            return
        self.file = open(os.path.join(output_dir, self.FILE), 'a')
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ConfigError('tensorboard: true needs the tensorboard package '
                                  '(pip install tensorboard)') from error
            self.writer = SummaryWriter(os.path.join(output_dir, 'tensorboard'))

    def write(self, step, epoch, **scalars):
        """Record `scalars` (name -> number) of global optimiser step `step`."""
        if self.file is None:
            return
        self.file.write(json.dumps({'step': step, 'epoch': epoch, **scalars}, default=_to_json) + '\n')
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f'train/{name}', value, step)
        self._unflushed += 1
        if self._unflushed >= self.flush_every:
            self.flush()

    def flush(self):
        if self.file is not None:
            self.file.flush()
            if self.writer is not None:
                self.writer.flush()
            self._unflushed = 0

    def close(self):
        if self.file is not None:
            self.flush()
            self.file.close()
            if self.writer is not None:
                self.writer.close()
            self.file = self.writer = None


def read_step_log(output_dir):
    """The records of output_dir/log_steps.jsonl; a resumed run's repeated steps keep their
    last record (what the final model was trained with), in step order."""
    path = os.path.join(output_dir, StepLog.FILE)
    if not os.path.isfile(path):
        return []
    records = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                records[record['step']] = record
    return [records[step] for step in sorted(records)]


def run_info(argv=None):
    """What reproduces a run: command line, git commit, library versions, processes, devices.
    Every rank calls it (device names are gathered)."""
    import importlib.metadata
    import platform
    import socket
    versions = {}
    for package in ('torch', 'timm', 'transformers', 'tokenizers', 'numpy', 'pillow',
                    'ruamel.yaml', 'webdataset', 'safetensors'):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    device = (torch.cuda.get_device_name() if torch.cuda.is_available() and torch.cuda.is_initialized()
              else platform.processor() or platform.machine())
    return {'argv': list(sys.argv if argv is None else argv),
            'started': datetime.datetime.now().isoformat(timespec='seconds'),
            'git_commit': _git_commit(), 'python': platform.python_version(), 'versions': versions,
            'world_size': get_world_size(),
            'hosts_and_devices': all_gather_objects(f'{socket.gethostname()}: {device}')}


def _git_commit():
    """The commit of the repository this file is in (with '+changes' when the tree differs),
    None outside a git checkout."""
    import subprocess
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ('+changes' if dirty else '')


def save_run_info(output_dir, info):
    """Append `info` to output_dir/run_info.json ({"runs": [...]}: a resumed run adds its own
    start), atomically, on the main process."""
    if not is_main_process():
        return
    path = os.path.join(output_dir, 'run_info.json')
    runs = []
    if os.path.isfile(path):
        with contextlib.suppress(ValueError, OSError), open(path) as f:
            runs = json.load(f).get('runs', [])
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump({'runs': [*runs, info]}, f, indent=1, default=_to_json)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

class SmoothedValue:
    """A series of values: statistics over the last `window_size` and over everything."""

    def __init__(self, window_size=20, fmt='{median:.4f} ({global_avg:.4f})'):
        self.window = collections.deque(maxlen=window_size)
        self.total, self.count = 0.0, 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.window.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over ranks (the window stays local)."""
        if not is_dist_avail_and_initialized() or get_world_size() == 1:
            return
        both = torch.tensor([self.count, self.total], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(both)
        self.count, self.total = int(both[0].item()), both[1].item()

    @property
    def median(self):
        # Lower median, as torch.median (which the original used) returns.
        return statistics.median_low(self.window)

    @property
    def avg(self):
        return statistics.fmean(self.window)

    @property
    def global_avg(self):
        return self.total / self.count if self.count else float('nan')

    @property
    def max(self):
        return max(self.window)

    @property
    def value(self):
        return self.window[-1]

    def __str__(self):
        if not self.window:
            return 'n/a'
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """Named SmoothedValues, and a progress log while iterating a data loader."""

    def __init__(self, delimiter='  '):
        self.meters = collections.defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **values):
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f'MetricLogger.update: {name} has shape {tuple(value.shape)}, '
                                     'expected a single number')
                value = value.item()
            if not isinstance(value, numbers.Real):
                raise TypeError(f'MetricLogger.update: {name} must be a number, '
                                f'got {type(value).__name__}')
            self.meters[name].update(float(value))

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __str__(self):
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def global_avg(self, fmt='{:.3f}'):
        """{name: average over the epoch}, formatted with `fmt` as the original's log.txt
        entries ('{:.3f}' strings); fmt=None gives floats."""
        return {name: meter.global_avg if fmt is None else fmt.format(meter.global_avg)
                for name, meter in self.meters.items()}

    def log_every(self, iterable, print_freq, header=''):
        """Yield the items of `iterable`, logging progress every `print_freq` items and after the
        last: i/N, ETA, the meters, seconds per iteration and seconds waiting for data."""
        try:
            total = len(iterable)
        except TypeError:
            raise TypeError('MetricLogger.log_every needs an iterable with a length') from None
        if print_freq < 1:
            raise ValueError(f'print_freq must be >= 1, got {print_freq}')
        iter_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        width = len(str(total))
        start = end = time.time()
        for i, item in enumerate(iterable):
            data_time.update(time.time() - end)
            yield item
            iter_time.update(time.time() - end)
            end = time.time()
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [f'{header} [{i:>{width}}/{total}]'.lstrip(), f'eta: {eta}', str(self),
                         f'time: {iter_time}', f'data: {data_time}']
                if torch.cuda.is_available():
                    parts.append(f'max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB')
                logger.info(self.delimiter.join(p for p in parts if p))
        elapsed = time.time() - start
        logger.info('%s Total time: %s (%.4f s / it)', header,
                    datetime.timedelta(seconds=int(elapsed)), elapsed / max(total, 1))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

PARTIAL_CHECKPOINT_GLOB = '.checkpoint*.pth.*.tmp'  # save_checkpoint's temporary files


def save_checkpoint(state, path):
    """torch.save `state` to `path` on the main process, atomically: the data goes to a temporary
    file in the same directory that replaces `path` only once complete, so a crash mid-save
    leaves the previous checkpoint intact. A failed write (a full disk) removes its temporary
    file and raises an OSError saying so."""
    if not is_main_process():
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        # torch.save reports a full disk as an OSError or, from its zip writer, a RuntimeError.
        if isinstance(error, (OSError, RuntimeError)):
            kept = 'the previous file is unchanged' if os.path.exists(path) else 'nothing was written'
            reason = getattr(error, 'strerror', None) or str(error)
            raise OSError(f'cannot write checkpoint {path}: {reason}; its partial temporary file '
                          f'was removed ({kept})') from error
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def all_gather_objects(obj):
    """A list with every rank's `obj` (picklable), in rank order; [obj] in a single process."""
    if not is_dist_avail_and_initialized() or get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
