"""Image-caption pairs for pre-training.

Each JSON file is a list of `{"image": path, "caption": str or [str, ...]}`; the files are
concatenated in the given order. A list caption is sampled anew every time the record is read.
"""
import json
import logging
import os
import random

from torch.utils.data import Dataset

from dataset.faults import SampleError, check_policy, describe_record, require_text
from dataset.images import ImageLoadError, load_image
from dataset.utils import pre_caption

logger = logging.getLogger(__name__)


def read_json(path, what='annotation file'):
    """The content of the JSON file `path`; a missing or malformed file is an error naming
    `what` and the path."""
    try:
        with open(path, 'r', encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError as error:
        raise FileNotFoundError(f'{what} not found: {path}') from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f'{what} {path} is not valid JSON: {error}') from error


def load_json_list(path):
    """Read a JSON file that must hold a list; errors name the file."""
    records = read_json(path)
    if not isinstance(records, list):
        raise ValueError(f'annotation file {path} must hold a JSON list, got {type(records).__name__}')
    return records


def _check_caption_record(record, where):
    check_fields(record, where, image=str, caption=(str, list))
    caption = record['caption']
    captions = caption if isinstance(caption, list) else [caption]
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError(f'{where}: "caption" must be a non-empty string or a non-empty list of them')


# ----------------------------------------------------------------------------- shared by every task

def load_annotations(ann_files, check_record, on_bad_sample='fail'):
    """The records of `ann_files` (one path or a list of paths) concatenated in order.

    `check_record(record, where)` validates every record at construction, where `where` reads
    '<file>, record <index>', so a malformed record fails before training starts and points at
    itself instead of failing in a DataLoader worker hours later. With on_bad_sample='skip'
    malformed records are dropped instead, counted and the first one logged per file.
    """
    check_policy(on_bad_sample)
    if isinstance(ann_files, (str, os.PathLike)):
        ann_files = [ann_files]
    records = []
    for path in ann_files:
        loaded, dropped = load_json_list(path), []
        for index, record in enumerate(loaded):
            try:
                check_record(record, f'{path}, record {index}')
            except ValueError as error:
                if on_bad_sample == 'fail':
                    raise
                dropped.append(str(error))
            else:
                records.append(record)
        if dropped:
            logger.warning('skipped %d malformed record(s) of %s (on_bad_sample: skip); the first: %s',
                           len(dropped), path, dropped[0])
    return records


def check_fields(record, where, **types):
    """`record` must be an object holding every key of `types` with a value of that type (a type
    or a tuple of types); strings must not be blank. Returns the record."""
    if not isinstance(record, dict):
        raise ValueError(f'{where}: expected an object, got {type(record).__name__}')
    for key, expected in types.items():
        if key not in record:
            raise ValueError(f'{where}: missing key {key!r}')
        value = record[key]
        expected = expected if isinstance(expected, tuple) else (expected,)
        # bool is an int subclass; a JSON true where an id or a string is expected is a mistake.
        if isinstance(value, bool) or not isinstance(value, expected):
            names = ' or '.join(t.__name__ for t in expected)
            raise ValueError(f'{where}: {key!r} must be {names}, got {type(value).__name__} {value!r}')
        if isinstance(value, str) and not value.strip():
            raise ValueError(f'{where}: {key!r} must not be blank')
    return record


def file_names(ann_files):
    """'a.json' or 'a.json, b.json': the annotation file(s) of a config key, for messages."""
    if isinstance(ann_files, (str, os.PathLike)):
        return str(ann_files)
    return ', '.join(str(path) for path in ann_files)


def check_evaluation_set(dataset, key, ann_files):
    """Refuse now what would stop an evaluation set's first read, which comes after training.

    `dataset` (built from `ann_files`, the value of the config key `key`) must hold records; for
    each record `dataset.inputs(ann)` (the image files and cleaned text that `__getitem__`
    reads, without decoding) must give a non-empty text and files that exist. Images are not
    decoded here: a corrupt file still fails when it is read. Returns `dataset`.
    """
    names = file_names(ann_files)
    if len(dataset) == 0:
        raise ValueError(f'{key} {names} holds no records')
    checked, missing, first_missing = set(), 0, None
    for index, ann in enumerate(dataset.ann):
        try:
            paths, _ = dataset.inputs(ann)
        except SampleError as error:  # a text that is empty after cleaning
            raise SampleError(f'{key} {names}: {describe_record(dataset, index)}: {error}') from error
        for path in paths:
            if path in checked:
                continue
            checked.add(path)
            if not os.path.isfile(path):
                missing += 1
                first_missing = first_missing or (index, path)
    if missing:
        index, path = first_missing
        more = f' ({missing} image files of {key} are missing)' if missing > 1 else ''
        raise ImageLoadError(f'{key} {names}: {describe_record(dataset, index)}: image file not '
                             f'found: {path}{more}')
    return dataset


class pretrain_dataset(Dataset):  # original class name kept
    """`__getitem__` returns (image tensor, cleaned caption string)."""

    def __init__(self, ann_files, transform, max_words=30, image_root='', on_bad_sample='fail'):
        self.ann = load_annotations(ann_files, _check_caption_record, on_bad_sample)
        self.transform = transform
        self.max_words = max_words
        self.image_root = image_root

    def __len__(self):
        return len(self.ann)

    def __getitem__(self, index):
        ann = self.ann[index]
        caption = ann['caption']
        if isinstance(caption, list):
            # NOTE(faithful): python's `random` picks the caption before the image is transformed.
            caption = random.choice(caption)
        caption = require_text(pre_caption(caption, self.max_words), caption)
        # os.path.join keeps absolute paths as they are (the original's pre-training JSONs).
        image = load_image(os.path.join(self.image_root, ann['image']))
        return self.transform(image), caption
