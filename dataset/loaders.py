"""Data loaders of the task scripts: the resumable training loader (a sampler that can start
inside an epoch, per-sample seeds) and the evaluation loaders.

What makes a resumed epoch continue exactly:
- the sampler draws the same permutation per epoch (DistributedSampler's seed + epoch, in one
  process too) and starts after the batches already seen;
- every sample is augmented with RNGs seeded from (seed, epoch, its place in the permutation),
  in loader workers and in the main process alike, so augmentations depend neither on the
  number of workers nor on where the run was resumed, and data loading never draws from the
  global RNGs that the training step uses (MLM masks, hard negatives);
- no loader draws from the global RNG when an iterator is made (each has its own generator).
Streams of webdataset shards (dataset/shards.py) split themselves between ranks and workers
and resume exactly by their own rules (their batches also depend on the number of workers);
train_loader gives them stream_loader.
"""
import contextlib
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info


def sample_seed(seed, epoch, position):
    """The 32-bit seed of the sample at `position` of epoch `epoch`'s permutation."""
    # Tuples of ints hash the same in every process (no hash randomisation for ints).
    return hash((seed, epoch, position)) & 0xFFFFFFFF


class ResumableSampler(DistributedSampler):
    """DistributedSampler's shuffled epoch permutation (seed 0 + epoch, padded to a multiple of
    the world size, rank k takes every world_size-th index from k) that yields (index, seed)
    pairs for SeededDataset and can start after the first `start` samples of this rank.

    NOTE(faithful): with several processes the permutation is the original's; in one process
    it replaces the DataLoader's RandomSampler so that it can be resumed.
    """

    def __init__(self, dataset, num_replicas=1, rank=0, seed=42):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=0)
        self.sample_seed = seed
        self.start = 0

    def __iter__(self):
        indices = list(super().__iter__())
        for k in range(self.start, len(indices)):
            position = self.rank + k * self.num_replicas  # place in the padded permutation
            yield indices[k], sample_seed(self.sample_seed, self.epoch, position)

    def __len__(self):
        return super().__len__() - self.start


@contextlib.contextmanager
def _rng_seeded(seed):
    """torch (CPU), numpy and python RNGs seeded with `seed` inside, restored on exit."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        _seed_all(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


def _seed_all(seed):
    # The CPU generator only, which is all a transform draws from: torch.manual_seed would also
    # queue a reseed of every accelerator's generators (formatting a stack trace for each: a
    # third of a tiny pre-training sample's loading time, benchmarks/bench_tiny_recipe.py) and,
    # in the main process, clobber the CUDA RNG streams that fork_rng(devices=[]) does not
    # restore.
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class SeededDataset(Dataset):
    """Reads (index, seed) items from ResumableSampler: the wrapped dataset's item `index`,
    produced with the RNGs seeded by `seed`. Attributes of the wrapped dataset read through."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getattr__(self, name):
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        if get_worker_info() is not None:  # a loader worker: its RNGs serve the data only
            _seed_all(seed)
            return self.dataset[index]
        with _rng_seeded(seed):  # the main process: keep the training step's RNG streams intact
            return self.dataset[index]


def train_loader(dataset, batch_size, num_workers, seed, collate_fn=None, world_size=1, rank=0):
    """The training DataLoader of a resumable run: ResumableSampler over this process's rank,
    per-sample seeds, the last incomplete batch dropped. A stream of shards (dataset/shards.py)
    splits itself between ranks and workers instead."""
    if isinstance(dataset, IterableDataset):
        return stream_loader(dataset, batch_size, num_workers, seed, collate_fn, world_size, rank)
    sampler = ResumableSampler(dataset, world_size, rank, seed=seed)
    if len(sampler) < batch_size:
        raise ValueError(f'training dataset {type(dataset).__name__} has {len(sampler)} samples '
                         f'per process, fewer than one batch of {batch_size}: the loader would be empty')
    return DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate_fn, drop_last=True,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      # Its own generator: creating an iterator must not draw from the global RNG
                      # (a resumed epoch creates one where the uninterrupted run did not).
                      generator=torch.Generator())


def stream_loader(dataset, batch_size, num_workers, seed, collate_fn=None, world_size=1, rank=0):
    """The training DataLoader of a dataset/shards.py stream: no sampler; the stream serves this
    rank's batches, each worker whole batches (engine.Run.begin_epoch sets its position)."""
    dataset.split(batch_size, world_size, rank, seed)
    if dataset.steps_per_epoch == 0:
        raise ValueError(f'training stream {type(dataset).__name__} has {dataset.num_samples} samples, '
                         f'fewer than one batch of {batch_size} for each of {world_size} processes')
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                      collate_fn=collate_fn, drop_last=True, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, generator=torch.Generator())


def eval_loader(dataset, batch_size, num_workers, collate_fn=None, world_size=1, rank=0,
                sharded=True):
    """An evaluation DataLoader in dataset order: with several processes and `sharded`, each rank
    reads its share (DistributedSampler without shuffling pads the last ranks with repeats, as the
    original; the scripts merge or count accordingly); otherwise every rank reads everything."""
    sampler = (DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
               if sharded and world_size > 1 else None)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, generator=torch.Generator())


# The original's loader factories, kept for users' scripts; the task scripts use train_loader
# and eval_loader above.
def create_sampler(datasets, shuffles, num_tasks, global_rank):
    """One DistributedSampler per dataset (eval samplers pad with duplicates, as the original)."""
    return [DistributedSampler(dataset, num_replicas=num_tasks, rank=global_rank, shuffle=shuffle)
            for dataset, shuffle in zip(datasets, shuffles, strict=True)]


def create_loader(datasets, samplers, batch_size, num_workers, is_trains, collate_fns):
    """One DataLoader per dataset; training loaders drop the last incomplete batch."""
    loaders = []
    for dataset, sampler, bs, workers, is_train, collate_fn in zip(
            datasets, samplers, batch_size, num_workers, is_trains, collate_fns, strict=True):
        if is_train:
            per_rank = len(sampler) if sampler is not None else len(dataset)
            if per_rank < bs:
                raise ValueError(f'training dataset {type(dataset).__name__} has {per_rank} samples '
                                 f'per process, fewer than one batch of {bs}: the loader would be empty')
        loaders.append(DataLoader(
            dataset,
            batch_size=bs,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            sampler=sampler,
            shuffle=is_train and sampler is None,
            collate_fn=collate_fn,
            drop_last=is_train,
            persistent_workers=workers > 0,
        ))
    return loaders
