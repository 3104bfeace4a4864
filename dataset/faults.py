"""What a dataset does with a sample it cannot use (an unreadable, truncated or missing image, a
caption that is empty after cleaning): the `on_bad_sample` policy of the config.

'fail' raises an error naming the record and the file; 'skip' logs it, counts it and serves the
next usable record instead, so batches keep their size (the momentum queue needs full batches).
Web-scale pre-training corpora always hold some dead images: skipping is the default there.
"""
import logging

import torch
from torch.utils.data import Dataset, get_worker_info

from dataset.images import ImageLoadError

logger = logging.getLogger(__name__)

POLICIES = ('fail', 'skip')
MAX_CONSECUTIVE_BAD = 100  # so many bad records in a row is a broken dataset, not bad samples
_LOGGED_PER_PROCESS = 20   # individual warnings before only the counts are reported
_COUNTER_SLOTS = 64        # one per loader worker (+1 for the main process): no shared increments


class SampleError(ValueError):
    """A record cannot be turned into a sample; the message names the record (and file)."""


def check_policy(policy):
    if policy not in POLICIES:
        raise ValueError(f"on_bad_sample must be one of {POLICIES}, got {policy!r}")
    return policy


def describe_record(dataset, index, limit=160):
    """'record <index> {...}' with the record's JSON (shortened) when the dataset has `ann`."""
    ann = getattr(dataset, 'ann', None)
    text = ''
    if isinstance(ann, list) and 0 <= index < len(ann):
        text = repr(ann[index])
        text = ' ' + (text if len(text) <= limit else text[:limit] + '...')
    return f'record {index}{text}'


class BadSamplePolicy(Dataset):
    """Wraps a map-style dataset; attributes of the wrapped dataset (ann, text, transform, ...)
    read through. `skipped()` counts the samples skipped in this process and its workers."""

    def __init__(self, dataset, policy='fail'):
        self.dataset = dataset
        self.policy = check_policy(policy)
        # Shared memory: loader workers (separate processes) count into the parent's tensor.
        self._skipped = torch.zeros(_COUNTER_SLOTS, dtype=torch.int64).share_memory_()
        self._logged = 0

    def __getattr__(self, name):
        if name == 'dataset':  # not yet set (unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def skipped(self):
        return int(self._skipped.sum())

    def __getitem__(self, index):
        first_error = None
        for attempt in range(min(MAX_CONSECUTIVE_BAD, len(self.dataset))):
            current = (index + attempt) % len(self.dataset)
            try:
                return self.dataset[current]
            except (ImageLoadError, SampleError) as error:
                message = f'{type(self.dataset).__name__} {describe_record(self.dataset, current)}: {error}'
                if self.policy == 'fail':
                    raise type(error)(f'{message} (set on_bad_sample: skip to skip such samples)') from error
                first_error = first_error or message
                self._count(message)
        raise SampleError(f'{MAX_CONSECUTIVE_BAD} consecutive unusable samples from index {index} of '
                          f'{type(self.dataset).__name__}; the first: {first_error}')

    def _count(self, message):
        worker = get_worker_info()
        self._skipped[(worker.id + 1 if worker else 0) % _COUNTER_SLOTS] += 1
        self._logged += 1
        if self._logged <= _LOGGED_PER_PROCESS:
            more = ' (further skips are only counted)' if self._logged == _LOGGED_PER_PROCESS else ''
            logger.warning('skipped %s%s', message, more)


def skipped_samples(dataset):
    """Samples skipped so far by `dataset` (a BadSamplePolicy, or a wrapper around one), else 0."""
    while not isinstance(dataset, BadSamplePolicy):
        dataset = vars(dataset).get('dataset') if hasattr(dataset, '__dict__') else None
        if dataset is None:
            return 0
    return dataset.skipped()


def require_text(text, raw, what='caption'):
    """`text` (a cleaned caption, sentence or question) unless cleaning left nothing of `raw`."""
    if not text:
        raise SampleError(f'{what} {raw!r} is empty after cleaning')
    return text
