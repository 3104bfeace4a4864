"""Every config key the task scripts understand, in one table, and the check run on a config
before any work starts: unknown or misspelt keys (with the closest allowed key suggested), wrong
types, values outside their allowed set, and the cross-key rules (image_res divisible by
patch_size, queue_size divisible by the global batch).

To add a key: one `Key(...)` line in KEYS (or in a section such as OPTIMIZER); give it a
`default` if scripts may rely on it being present, and list it in REQUIRED for the tasks that
cannot run without it.
"""
import difflib
import os
from dataclasses import dataclass

import utils

_ANY = object()  # `default` marker: the key has no default and is simply absent when not given


@dataclass(frozen=True)
class Key:
    """types: accepted Python types (int is also accepted for float); choices: allowed values;
    low/high: inclusive numeric bounds; items: the type of list elements; default: the value
    filled in when the key is absent (per task if a dict {task: value})."""
    types: tuple
    doc: str = ''
    choices: tuple = ()
    low: float = None
    high: float = None
    items: type = None
    default: object = _ANY

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
    'fused': FLAG,
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
}

KEYS = {
    # data
    'train_file': PATHS, 'val_file': PATHS, 'test_file': PATHS,
    'answer_list': PATH, 'image_root': PATH, 'vqa_root': PATH, 'vg_root': PATH,
    'refcoco_data': PATH, 'det_file': PATH, 'coco_file': PATH,
    'max_words': POSITIVE_INT, 'max_tokens': POSITIVE_INT, 'eos': Key((str,)),
    'num_workers': Key((int,), low=0),
    # model
    'bert_config': PATH, 'text_encoder': MAYBE_NAME, 'text_decoder': MAYBE_NAME,
    'tokenizer': Key((str,), 'hub name or local folder'),
    'init_deit': Key((bool, str), 'true/false or a URL / local file'),
    'image_res': POSITIVE_INT, 'patch_size': POSITIVE_INT, 'vision_width': POSITIVE_INT,
    'vit_depth': POSITIVE_INT, 'vit_heads': POSITIVE_INT, 'embed_dim': POSITIVE_INT,
    'temp': Key((float,), low=0.0), 'mlm_probability': PROBABILITY, 'queue_size': POSITIVE_INT,
    'momentum': PROBABILITY, 'alpha': PROBABILITY, 'distill': FLAG,
    # training and evaluation
    'batch_size': POSITIVE_INT, 'batch_size_train': POSITIVE_INT, 'batch_size_test': POSITIVE_INT,
    'warm_up': FLAG, 'k_test': POSITIVE_INT, 'fast_eval': FLAG, 'eval_ema': FLAG,
    'print_freq': POSITIVE_INT,
    'optimizer': Key((dict,)), 'schedular': Key((dict,)),
    'augment': Key((dict,), 'training augmentation overrides: crop_scale, hflip, randaugment'),
    # speed options
    'fast_train': FLAG, 'precision': Key((str,), choices=('fp32', 'bf16')),
    'grad_checkpointing': FLAG, 'compile': FLAG, 'accum_steps': POSITIVE_INT,
    'optimizer_sharding': Key((str,), choices=('none', 'zero')),
    # reliability (README "Reliability")
    'checkpoint_every_steps': Key((int,), '0 = at the end of every epoch only', low=0, default=0),
    'keep_checkpoints': Key((int,), 'step checkpoints kept (older ones are deleted)', low=1,
                            default=2),
    'on_bad_sample': Key((str,), 'unreadable image or empty caption in training data',
                         choices=('fail', 'skip'),
                         default={'pretrain': 'skip', 'pretrain_nlvr': 'skip', None: 'fail'}),
    'skip_nonfinite_steps': Key((int,), 'steps with a NaN/inf loss skipped before stopping',
                                low=0, default=0),
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
    'grounding': _COMMON + ('test_file', 'image_root', 'refcoco_data', 'batch_size', 'queue_size',
                            'embed_dim', 'distill'),
    'vqa': _COMMON + ('test_file', 'answer_list', 'vqa_root', 'vg_root', 'batch_size_train',
                      'batch_size_test', 'k_test', 'distill', 'eos'),
    'nlvr': _COMMON + ('val_file', 'test_file', 'image_root', 'batch_size', 'distill'),
    've': _COMMON + ('val_file', 'test_file', 'image_root', 'batch_size_train', 'batch_size_test',
                     'distill'),
}
# Tasks whose momentum queue receives the gathered batch of every rank at each step.
QUEUE_BATCH = {'pretrain': 'batch_size', 'retrieval': 'batch_size_train', 'grounding': 'batch_size'}
# Section keys a task cannot run without.
REQUIRED_IN_SECTION = {'optimizer': ('opt', 'lr', 'weight_decay'),
                       'schedular': ('lr', 'epochs', 'min_lr', 'warmup_lr', 'warmup_epochs')}


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what is allowed."""


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


def _check_mapping(config, table, prefix, errors):
    for key, value in config.items():
        name = f'{prefix}{key}'
        if key not in table:
            errors.append(f"unknown key '{name}'{_suggest(key, table)} "
                          f'(allowed keys are listed in config_schema.py)')
            continue
        problem = _check_value(name, value, table[key])
        if problem:
            errors.append(problem)
        elif key in SECTIONS and not prefix:
            _check_mapping(value, SECTIONS[key], f'{key}.', errors)


def with_defaults(config, task):
    """A copy of `config` with every key that has a default filled in when absent, so that
    `--opts key=value` can set it and the saved config.yaml shows the value used."""
    config = dict(config)
    for key, spec in KEYS.items():
        if key in config or spec.default is _ANY:
            continue
        default = spec.default
        if isinstance(default, dict):
            default = default.get(task, default.get(None))
        config[key] = default
    return config


def validate(config, task, world_size=1, source='config'):
    """Raise ConfigError listing every problem of `config` for `task` (a key of REQUIRED), or
    return `config` unchanged."""
    if task not in REQUIRED:
        raise ValueError(f'unknown task {task!r}; known: {sorted(REQUIRED)}')
    errors = []
    _check_mapping(config, KEYS, '', errors)
    errors += [f"missing key '{key}' (needed by {task})" for key in REQUIRED[task] if key not in config]
    for section, keys in REQUIRED_IN_SECTION.items():
        if isinstance(config.get(section), dict):
            errors += [f"missing key '{section}.{key}'" for key in keys if key not in config[section]]
    if errors:  # the cross-key rules below assume the types are right
        raise ConfigError(f'{source}: ' + '\n  '.join(errors))

    res, patch = config['image_res'], config.get('patch_size', 16)
    if res % patch:
        errors.append(f'image_res = {res} is not divisible by patch_size = {patch}: the ViT '
                      f'needs a whole number of patches (allowed: multiples of {patch}, e.g. '
                      f'{max(patch, res - res % patch)} or {res - res % patch + patch})')
    scale = config.get('augment', {}).get('crop_scale')
    if scale is not None and not (len(scale) == 2 and 0.0 < scale[0] <= scale[1] <= 1.0):
        errors.append(f'augment.crop_scale = {scale!r}: expected [low, high] with '
                      f'0 < low <= high <= 1 (fractions of the image area)')
    batch_key = QUEUE_BATCH.get(task)
    if batch_key and config.get('queue_size') is not None:
        global_batch = config[batch_key] * world_size
        if config['queue_size'] % global_batch:
            errors.append(f'queue_size = {config["queue_size"]} is not divisible by the global batch '
                          f'{batch_key} x world size = {config[batch_key]} x {world_size} = '
                          f'{global_batch}: the queue is filled one gathered batch at a time '
                          f'(allowed: multiples of {global_batch})')
    if errors:
        raise ConfigError(f'{source}: ' + '\n  '.join(errors))
    return config


def load_task_config(args, task):
    """The config of a task script: the YAML of --config with defaults filled in, --opts applied,
    --text_encoder (and --text_decoder) applied, validated for `task` at the world size of `args` (call after
    utils.init_distributed_mode)."""
    config = with_defaults(utils.load_config(args.config), task)
    config = utils.apply_overrides(config, args.opts)
    if getattr(args, 'text_encoder', None):
        config['text_encoder'] = config['tokenizer'] = args.text_encoder
    if getattr(args, 'text_decoder', None):
        config['text_decoder'] = args.text_decoder
    return validate(config, task, getattr(args, 'world_size', 1),
                    source=f'config {os.path.basename(args.config)} (with --opts)')
