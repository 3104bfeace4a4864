"""Image-caption pairs for pre-training from webdataset tar shards: the web corpora of the paper's
4M / 14M pre-training sets (CC3M, CC12M, SBU; section 3.4) as img2dataset writes them,
`{key}.jpg` + `{key}.txt` [+ `{key}.json`], or as tools/write_shards.py writes them from
annotation JSONs.

`train_file` entries ending in `.tar` are shard patterns (`/data/cc3m/{00000..00331}.tar`,
brace-expanded as webdataset does); the other entries are annotation JSONs, read as
dataset/pretrain_dataset.py reads them and served in the same stream. A sample is cleaned,
decoded and transformed as a JSON record is: the caption (`"caption"` of the `.json` member,
a string or a list as in the JSON records, else the `.txt` member) through pre_caption, the image
by dataset/images.py's rules (RGB, damaged data an ImageLoadError), a list caption sampled anew
at every read.

The epoch. Samples per shard come from the `shards.json` index beside the shards (written by
tools/write_shards.py, also for img2dataset's shards with --index), else from one pass over the
tar headers. Epoch e concatenates the shards (and the JSON records, in chunks) in a seeded
order of (seed, e) into one stream of N samples. With batch B and W processes an epoch has
T = N // (W * B) steps (the schedule, the alpha ramp and checkpoints count them as with JSON
files); rank r reads stream positions [r T B, (r + 1) T B), split further between its loader
workers by whole batches (each worker a contiguous range, in the order the DataLoader
collects batches from its workers); the remaining N - W T B positions are left out of this
epoch (other samples next epoch, as the shard order changes). Every worker reads its range in
blocks of SHUFFLE_BLOCK samples and serves each block in a seeded random order.

Resuming is exact at step granularity: the samples, their order and augmentations of every step
are a function of (seed, epoch, step) for a given number of processes, loader workers and batch
size, so a run resumed after step s serves the batches s, s + 1, ... that an uninterrupted run
serves. A worker starts inside a shard by skipping tar headers (random access), not by reading
the samples before.

A bad sample (undecodable image, missing or empty caption, unreadable tar data) follows
on_bad_sample as the JSON datasets do: 'fail' raises naming the shard and key; 'skip' counts
it (dataset.faults.skipped_samples) and serves the next good sample of the stream in its place,
so that batches keep their size and later positions do not move (which keeps resuming exact).
MAX_CONSECUTIVE_BAD unusable samples in a row stop the run, as for JSON records; a shard that
is not a readable tar when it is counted stops it at the start.
"""
import bisect
import io
import json
import logging
import os
import random
import re
import tarfile
import time
from itertools import groupby, islice
from operator import itemgetter

import numpy as np
import torch
from PIL import Image, JpegImagePlugin
from torch.utils.data import IterableDataset, get_worker_info

from dataset.faults import MAX_CONSECUTIVE_BAD, BadSamplePolicy, SampleError, describe_record, require_text
from dataset.images import ImageLoadError, _fit_pixel_budget, decode_errors, load_image, to_rgb
from dataset.loaders import _rng_seeded, _seed_all, sample_seed
from dataset.pretrain_dataset import file_names, pretrain_dataset
from dataset.utils import pre_caption

logger = logging.getLogger(__name__)

INDEX_NAME = 'shards.json'     # beside the shards: {"shards": [{"name", "samples", "bytes"}, ...]}
INDEX_FORMAT = 'albef-shards/1'
IMAGE_SUFFIXES = ('jpg', 'jpeg', 'png', 'webp')  # the first present is the sample's image
SHUFFLE_BLOCK = 1000    # samples a worker reads, then serves in a seeded random order
RECORDS_PER_CHUNK = 1000  # JSON records per unit of the shard order, like a shard
EXTRA = 'webdataset'    # the pyproject extra that installs webdataset
_META = re.compile(r'__[^/]*__($|/)')  # webdataset's metadata members, never sample files
_SEED_MASK = 0xFFFFFFFF


def is_shard_pattern(entry):
    """Whether a train_file entry names tar shards (a path or brace pattern ending in .tar)."""
    return str(entry).endswith('.tar')


def require_webdataset(what):
    try:
        import webdataset
    except ImportError as error:
        raise ImportError(f'{what} needs the webdataset package: pip install -e ".[{EXTRA}]" '
                          f'(or pip install webdataset)') from error
    return webdataset


def expand_shards(pattern):
    """The shard files of a pattern (webdataset's expansion: braces, `::` lists), which must exist."""
    wds = require_webdataset(f'train_file {pattern!r} (webdataset shards)')
    paths = wds.shardlists.expand_urls(str(pattern))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f' (and {len(missing) - 1} more of its {len(paths)} shards)' if len(missing) > 1 else ''
        raise FileNotFoundError(f'train_file {pattern}: shard not found: {missing[0]}{more}')
    return paths


# ----------------------------------------------------------------------------- tar files

def base_plus_ext(name):
    """(key, suffix) of a member name by webdataset's rule: the key ends at the first dot of the
    file name ('a/b.c.jpg' -> 'a/b', 'c.jpg'); (None, None) without a dot."""
    match = re.match(r'^((?:.*/|)[^.]+)[.]([^/]*)$', name)
    return (match.group(1), match.group(2)) if match else (None, None)


def _members(tar):
    """(key, lower-case suffix, TarInfo) of a shard's sample files in tar order; consecutive
    files with one key are a sample, as webdataset groups them."""
    for info in tar:
        if not info.isreg() or _META.match(info.name):
            continue
        key, suffix = base_plus_ext(info.name)
        if key is not None:
            yield key, suffix.lower(), info


def tar_samples(path, start=0):
    """(key, {suffix: bytes}) of the samples of shard `path` from the `start`-th on. The tar is
    read in random-access mode: the samples before `start` cost their headers only."""
    with open(path, 'rb') as f, tarfile.open(fileobj=f, mode='r:') as tar:
        for index, (key, files) in enumerate(groupby(_members(tar), key=itemgetter(0))):
            if index >= start:
                yield key, {suffix: tar.extractfile(info).read() for _, suffix, info in files}


def count_samples(path):
    """Samples in shard `path` (tar headers only)."""
    with open(path, 'rb') as f, tarfile.open(fileobj=f, mode='r:') as tar:
        return sum(1 for _ in groupby(_members(tar), key=itemgetter(0)))


def read_index(folder):
    """{shard file name: (samples, bytes)} of `folder`'s shards.json; {} without one."""
    path = os.path.join(folder, INDEX_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding='utf-8') as f:
            index = json.load(f)
        return {s['name']: (int(s['samples']), int(s['bytes'])) for s in index['shards']}
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f'shard index {path} is not valid ({type(error).__name__}: {error}); '
                         f'rewrite it with python -m tools.write_shards --index {folder}') from error


def shard_sizes(paths):
    """Samples per shard, from each folder's shards.json where it lists the shard with its
    current size in bytes, else counted from the tar headers."""
    indexes, sizes, counted, start = {}, [], 0, time.time()
    for path in paths:
        folder, name = os.path.split(os.path.abspath(path))
        if folder not in indexes:
            indexes[folder] = read_index(folder)
        entry = indexes[folder].get(name)
        if entry is not None and entry[1] == os.path.getsize(path):
            sizes.append(entry[0])
        else:  # no index, or the shard changed since it was indexed
            try:
                sizes.append(count_samples(path))
            except (OSError, tarfile.TarError) as error:
                raise ValueError(f'shard {path} is not a readable tar file: {error}') from error
            counted += 1
    if counted:
        logger.info('counted the samples of %d shard(s) from their tar headers (%.1f s); '
                    'python -m tools.write_shards --index FOLDER writes %s so that runs read the '
                    'counts instead', counted, time.time() - start, INDEX_NAME)
    return sizes


def decode_image(data, name):
    """The bytes of an image file as an RGB PIL image by load_image's rules (dataset/images.py:
    the pixel budget, to_rgb, every decoder error one ImageLoadError naming `name`)."""
    with decode_errors(name):
        stream = io.BytesIO(data)
        try:
            image = Image.open(stream)
        except Image.DecompressionBombError as error:
            if data[:3] != b'\xff\xd8\xff':
                raise ImageLoadError(f'image {name} is too large: {error}') from error
            image = JpegImagePlugin.JpegImageFile(stream)  # decoded at reduced scale below
        with image:
            _fit_pixel_budget(image, name)
            image.load()
            return to_rgb(image)


# ----------------------------------------------------------------------------- the stream

class _Item:
    """One position of the stream: a shard's sample (its files), a JSON record (its index), or
    what could not be read there (`failure`)."""
    __slots__ = ('shard', 'key', 'files', 'failure')

    def __init__(self, shard, key, files=None, failure=None):
        self.shard, self.key, self.files, self.failure = shard, key, files, failure


class _Shard:
    def __init__(self, path, count):
        self.path, self.count = path, count

    def read(self, start):
        """Exactly count - start items: the samples from `start` on; positions the tar does not
        deliver (damaged, shorter than indexed) are failures."""
        done = start
        try:
            for key, files in tar_samples(self.path, start):
                if done == self.count:  # more than indexed: the index is stale; extras unused
                    return
                yield _Item(self, key, files)
                done += 1
        except (OSError, tarfile.TarError) as error:
            failure = f'cannot read shard {self.path} after {done} samples: {type(error).__name__}: {error}'
        else:
            failure = f'shard {self.path} ends after {done} samples; its index says {self.count}'
        for k in range(done, self.count):
            yield _Item(self, f'#{k}', failure=failure)


class _Records:
    """A chunk of the JSON records, ordered among the shards like one."""

    def __init__(self, first, count):
        self.first, self.count = first, count

    def read(self, start):
        for index in range(self.first + start, self.first + self.count):
            yield _Item(self, index)


class PretrainShards(IterableDataset):
    """The pre-training pairs of shard patterns and annotation JSONs as one stream; iterating
    yields (image tensor, cleaned caption) as pretrain_dataset does.

    dataset/loaders.py's train_loader calls `split(batch_size, world_size, rank, seed)`;
    engine.Run calls `set_position(epoch, steps_done)` before each epoch. `self.dataset` is the
    on_bad_sample policy over the JSON records, and counts the bad shard samples as well, so
    that dataset.faults.skipped_samples (log.txt's skipped_samples) sees them.
    """

    def __init__(self, train_files, transform, max_words=30, image_root='', on_bad_sample='skip'):
        entries = [train_files] if isinstance(train_files, (str, os.PathLike)) else list(train_files)
        json_files = [e for e in entries if not is_shard_pattern(e)]
        records = pretrain_dataset(json_files, transform, max_words=max_words,
                                   image_root=image_root, on_bad_sample=on_bad_sample)
        self.dataset = BadSamplePolicy(records, on_bad_sample)
        self.transform, self.max_words, self.image_root = transform, max_words, image_root
        self.json_names = file_names(json_files)
        self.patterns = [str(e) for e in entries if is_shard_pattern(e)]
        paths = [path for pattern in self.patterns for path in expand_shards(pattern)]
        self.sources = [_Shard(p, n) for p, n in zip(paths, shard_sizes(paths), strict=True) if n]
        self.sources += [_Records(first, min(RECORDS_PER_CHUNK, len(records) - first))
                         for first in range(0, len(records), RECORDS_PER_CHUNK)]
        self.num_samples = sum(source.count for source in self.sources)
        self.num_shards = len(paths)
        if not self.num_samples:
            raise ValueError(f'train_file {entries} holds no samples')
        # (epoch, steps done) in shared memory: persistent loader workers read the position of
        # each epoch when it starts, although their copy of the dataset was made before.
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.split(batch_size=1, world_size=1, rank=0, seed=0)

    # -- the split and the position ----------------------------------------------------------

    def split(self, batch_size, world_size, rank, seed):
        """Read rank `rank`'s share of each epoch for batches of `batch_size` (per process),
        from the start of epoch 0."""
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        self.steps_per_epoch = self.num_samples // (world_size * batch_size)
        self.set_position(0, 0)

    def set_position(self, epoch, steps_done=0):
        """Serve `epoch` from its step `steps_done` on (set before an iterator is made)."""
        if not 0 <= steps_done <= self.steps_per_epoch:
            raise ValueError(f'steps_done {steps_done} outside 0..{self.steps_per_epoch}')
        self._position[0], self._position[1] = epoch, steps_done

    def __len__(self):
        """The samples this rank still serves in the current epoch (whole batches)."""
        return (self.steps_per_epoch - int(self._position[1])) * self.batch_size

    def shard_order(self, epoch):
        """The order of the shards (and JSON chunks) in `epoch`'s stream: the same in every
        process and worker."""
        return np.random.default_rng([self.seed & _SEED_MASK, epoch, 0]).permutation(len(self.sources))

    def worker_range(self, worker, num_workers, steps_done=0):
        """(first stream position, length, first position served) of this rank's worker `worker`
        when the epoch resumes after `steps_done` steps (0: from the start).

        The DataLoader collects batch i of an iterator from worker i % num_workers, so worker
        `worker` serves the epoch's steps steps_done + worker + k * num_workers: the steps of
        `role` below, whose contiguous range is assigned from the step number alone; the batches
        therefore do not depend on where the epoch was resumed.
        """
        steps, batch = self.steps_per_epoch, self.batch_size
        role = (steps_done + worker) % num_workers
        first_step = (steps_done + worker) // num_workers  # counted among the role's steps
        steps_of = [max(0, -(-(steps - r) // num_workers)) for r in range(num_workers)]
        start = self.rank * steps * batch + batch * sum(steps_of[:role])
        length = steps_of[role] * batch
        return start, length, min(first_step * batch, length)

    # -- iterating ---------------------------------------------------------------------------

    def __iter__(self):
        epoch, steps_done = (int(v) for v in self._position)
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start, length, begin = self.worker_range(worker, num_workers, steps_done)
        if begin < length:
            yield from self._serve(epoch, start, length, begin, in_worker=info is not None)

    def _stream(self, order, position):
        """The items of the epoch's stream from `position` on, wrapping around at its end."""
        starts = np.cumsum([0] + [self.sources[i].count for i in order[:-1]]).tolist()
        i = bisect.bisect_right(starts, position) - 1
        offset = position - starts[i]
        while True:
            yield from self.sources[order[i]].read(offset)
            i, offset = (i + 1) % len(order), 0

    def _emissions(self, epoch, items, start, first, length):
        """(index in the range, item) in serving order from the block holding index `first`:
        each block of the range shuffled by its own seed, then the items after the range in
        stream order (they only stand in for bad samples at the range's end)."""
        q = first
        while q < length:
            block = list(islice(items, min(SHUFFLE_BLOCK, length - q)))
            order = np.random.default_rng([self.seed & _SEED_MASK, epoch, 1, start + q]).permutation(len(block))
            for t, k in enumerate(order):
                yield q + t, block[k]
            q += len(block)
        for item in items:
            yield q, item
            q += 1

    def _serve(self, epoch, start, length, begin, in_worker):
        """The samples at range indexes begin..length-1 of the range at stream position `start`.

        A bad sample's index waits for the next good item, which is served for it (with the
        index's own seed) and then for its own index: what a position serves depends on the
        items from it on only, so a resumed range serves what the whole range did."""
        block_start = begin - begin % SHUFFLE_BLOCK
        items = self._stream(self.shard_order(epoch), start + block_start)
        waiting, failures = [], []
        for q, item in self._emissions(epoch, items, start, block_start, length):
            if q < begin:
                continue
            if q < length:
                waiting.append(q)
            try:
                parsed = self._parse(item)
            except (ImageLoadError, SampleError) as error:
                self._bad(item, error, counted=q < length, failures=failures)
                continue
            failures.clear()
            for p in waiting:
                yield self._render(parsed, sample_seed(self.seed, epoch, start + p), in_worker)
            waiting.clear()
            if q >= length - 1:
                return

    def _bad(self, item, error, counted, failures):
        message = f'{self.describe(item)}: {error}'
        if self.dataset.policy == 'fail':
            raise type(error)(f'{message} (set on_bad_sample: skip to skip such samples)') from error
        if counted:  # a stand-in read past the range is its owner's to count
            self.dataset._count(message)
        failures.append(message)
        if len(failures) >= MAX_CONSECUTIVE_BAD:
            raise SampleError(f'{MAX_CONSECUTIVE_BAD} consecutive unusable samples in the '
                              f'pre-training stream; the first: {failures[0]}')

    def describe(self, item):
        if isinstance(item.shard, _Shard):
            return f'shard {item.shard.path}, key {item.key}'
        return f'{self.json_names} {describe_record(self.dataset.dataset, item.key)}'

    # -- one sample --------------------------------------------------------------------------

    def _parse(self, item):
        """(RGB image, cleaned captions, whether the caption is a list): everything about a
        sample that does not depend on its seed, so that it is bad or good wherever it is."""
        if item.failure is not None:
            raise SampleError(item.failure)
        if isinstance(item.shard, _Records):
            ann = self.dataset.dataset.ann[item.key]
            captions = self._clean(ann['caption'])
            # os.path.join keeps absolute paths as they are (the original's pre-training JSONs).
            return load_image(os.path.join(self.image_root, ann['image'])), *captions
        files = item.files
        suffix = next((s for s in IMAGE_SUFFIXES if s in files), None)
        if suffix is None:
            raise SampleError(f'no image file ({", ".join("." + s for s in IMAGE_SUFFIXES)}); the '
                              f'sample has {", ".join("." + s for s in sorted(files))}')
        captions = self._clean(self._caption(item))
        return decode_image(files[suffix], f'{os.path.basename(item.key)}.{suffix}'), *captions

    def _caption(self, item):
        files, caption = item.files, None
        if 'json' in files:
            try:
                meta = json.loads(files['json'].decode('utf-8'))
            except (ValueError, UnicodeDecodeError) as error:
                raise SampleError(f'its .json is not valid JSON: {error}') from error
            caption = meta.get('caption') if isinstance(meta, dict) else None
        if caption is None and 'txt' in files:
            try:
                caption = files['txt'].decode('utf-8')
            except UnicodeDecodeError as error:
                raise SampleError(f'its .txt is not UTF-8: {error}') from error
        if caption is None:
            raise SampleError('no caption (a .txt file or "caption" in its .json)')
        return caption

    def _clean(self, caption):
        texts = caption if isinstance(caption, list) else [caption]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise SampleError(f'caption must be a string or a non-empty list of them, got {caption!r}')
        # Every caption of a list is checked, not the one drawn: a sample is bad or good whatever
        # its seed (pretrain_dataset skips a draw that cleaning empties).
        return [require_text(pre_caption(t, self.max_words), t) for t in texts], isinstance(caption, list)

    def _render(self, parsed, seed, in_worker):
        image, captions, is_list = parsed
        if in_worker:  # a loader worker: its RNGs serve the data only
            _seed_all(seed)
            return self._transform(image, captions, is_list)
        with _rng_seeded(seed):  # the main process: keep the training step's RNG streams intact
            return self._transform(image, captions, is_list)

    def _transform(self, image, captions, is_list):
        # NOTE(faithful): python's `random` picks the caption before the image is transformed.
        caption = random.choice(captions) if is_list else captions[0]
        return self.transform(image), caption
