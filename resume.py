"""Exact resumption of a training run, and the step-level policies of train_one_epoch.

A run checkpointed every `checkpoint_every_steps` steps (and at the end of every epoch), killed
and resumed reaches the same parameters after the same total number of steps as a run that was
never interrupted. A checkpoint holds, beside the released keys (model with its momentum
encoders, queues and queue pointer; optimizer; lr_scheduler; config; epoch), a `resume` entry:
the position (epoch, steps done in it), the RNG states of every rank, the grad scaler and the
count of skipped non-finite steps.

What makes the continuation exact:
- the sampler draws the same permutation per epoch (DistributedSampler's seed + epoch, in one
  process too) and starts after the batches already seen;
- every sample is augmented with RNGs seeded from (seed, epoch, its place in the permutation),
  in loader workers and in the main process alike, so augmentations depend neither on the
  number of workers nor on where the run was resumed, and data loading never draws from the
  global RNGs that the training step uses (MLM masks, hard negatives);
- each rank restores its own torch / CUDA / numpy / python RNG state.

Scripts that evaluate after each epoch also checkpoint the end of its training, before the
evaluation: a run killed during the evaluation resumes with that evaluation (training is not
repeated), and the best metric so far travels in the checkpoint (TrainingRun.improved).

Scripts use it in a few lines (see Pretrain.py, VE.py):
    resume.add_argument(parser)
    loader = resume.train_loader(dataset, batch_size, num_workers, seed=args.seed)
    run = resume.TrainingRun(args.output_dir, config, model, optimizer, lr_scheduler, loader, 've',
                             evaluates=True)
    start_epoch = run.resume() if args.resume else 0
    for epoch in range(start_epoch, max_epoch):
        stats = run.train_epoch(epoch, lambda start_step: train_one_epoch(
            ..., start_step=start_step, hooks=run))
        ... evaluate ...
        if run.improved(epoch, metric): save checkpoint_best.pth
        run.end_epoch(epoch)
"""
import contextlib
import glob
import logging
import os
import random
import re

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

import utils
from models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from optim import optimizer_state_dict

logger = logging.getLogger(__name__)

# Test hook: exit the process abruptly (no clean-up, as a kill) once this many steps are done.
EXIT_AFTER_STEPS_ENV = 'ALBEF_EXIT_AFTER_STEPS'
_CHECKPOINT_NAME = re.compile(r'checkpoint_(\d+)(?:_step(\d+))?\.pth$')


def add_argument(parser):
    """The --resume flag of the training scripts."""
    parser.add_argument('--resume', type=utils.str2bool, nargs='?', const=True, default=False,
                        help='continue the run in --output_dir from its newest readable checkpoint '
                             '(starts afresh when there is none)')


# ---------------------------------------------------------------------------------------------
# Data: a resumable sampler and per-sample seeds
# ---------------------------------------------------------------------------------------------

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
    torch.manual_seed(seed)
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


def train_loader(dataset, batch_size, num_workers, seed, collate_fn=None):
    """The training DataLoader of a resumable run: ResumableSampler over this process's rank,
    per-sample seeds, the last incomplete batch dropped."""
    sampler = ResumableSampler(dataset, utils.get_world_size(), utils.get_rank(), seed=seed)
    if len(sampler) < batch_size:
        raise ValueError(f'training dataset {type(dataset).__name__} has {len(sampler)} samples '
                         f'per process, fewer than one batch of {batch_size}: the loader would be empty')
    return DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate_fn, drop_last=True,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      # Its own generator: creating an iterator must not draw from the global RNG
                      # (a resumed epoch creates one where the uninterrupted run did not).
                      generator=torch.Generator())


# ---------------------------------------------------------------------------------------------
# RNG states of every rank
# ---------------------------------------------------------------------------------------------

def rng_state():
    state = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(),
             'python': random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


# ---------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------

def checkpoint_path(output_dir, epoch, step=None):
    """checkpoint_NN.pth at the end of epoch NN (the original's name), checkpoint_NN_stepSSSSSS.pth
    after SSSSSS steps of epoch NN."""
    name = f'checkpoint_{epoch:02d}.pth' if step is None else f'checkpoint_{epoch:02d}_step{step:06d}.pth'
    return os.path.join(output_dir, name)


def _position(path):
    """(epoch, steps done) a checkpoint file name stands for; an epoch-end file sorts last."""
    match = _CHECKPOINT_NAME.search(os.path.basename(path))
    epoch, step = int(match.group(1)), match.group(2)
    return (epoch, float('inf') if step is None else int(step))


def is_epoch_end(path):
    """Whether `path` is named as an epoch-end checkpoint_NN.pth."""
    return _position(path)[1] == float('inf')


def checkpoints(output_dir, step_only=False):
    """The checkpoint files of `output_dir`, newest position first."""
    paths = [p for p in glob.glob(os.path.join(output_dir, 'checkpoint_*.pth'))
             if _CHECKPOINT_NAME.search(os.path.basename(p))]
    if step_only:
        paths = [p for p in paths if not is_epoch_end(p)]
    return sorted(paths, key=_position, reverse=True)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

class TrainingRun:
    """Position, step checkpoints and step policies of one training run; passed to
    engine.train_one_epoch as `hooks`.

    Config keys: checkpoint_every_steps (0: epoch checkpoints only), keep_checkpoints (step
    checkpoints kept), skip_nonfinite_steps (steps with a non-finite loss skipped, counted,
    before the run stops).

    evaluates: the script evaluates after training each epoch (the fine-tuning scripts). The end
    of the training is then checkpointed before the evaluation, so that a kill during it loses
    no training (the resumed run evaluates that epoch), and again once the epoch is finished.
    Both go to checkpoint_NN_stepSSSSSS.pth (SSSSSS: the steps per epoch), rotated with the step
    checkpoints, and only such files are resumed from: the original kept only the best epoch's
    file there. Otherwise (pre-training, VQA) an epoch ends with checkpoint_NN.pth, all kept, as
    the original's.
    """

    def __init__(self, output_dir, config, model, optimizer, lr_scheduler, loader, kind,
                 scaler=None, evaluates=False):
        self.output_dir, self.config, self.kind = output_dir, config, kind
        self.model, self.optimizer, self.lr_scheduler, self.scaler = model, optimizer, lr_scheduler, scaler
        self.loader = loader
        self.steps_per_epoch = len(loader)
        self.evaluates = evaluates
        self.every = config.get('checkpoint_every_steps', 0)
        self.keep = config.get('keep_checkpoints', 2)
        self.skip_limit = config.get('skip_nonfinite_steps', 0)
        self.skipped_steps = 0
        self.last_checkpoint = None
        self.resumed_from = None  # the checkpoint resume() loaded
        self.best_value, self.best_epoch = float('-inf'), None  # see improved()
        self._resume_at = (0, 0)  # (epoch, steps done in it) where training starts
        self._rng = None          # this rank's RNG state to restore when training starts
        self._train_stats = {}    # the averages of an epoch trained before the resumed checkpoint
        exit_after = os.environ.get(EXIT_AFTER_STEPS_ENV)
        self._exit_after = int(exit_after) if exit_after else None

    # -- resuming --------------------------------------------------------------------------

    def resume(self, path=None):
        """Load the checkpoint at `path` (default: the newest readable one in output_dir) and
        return the epoch to start from; 0 when there is nothing to resume."""
        candidates = [path] if path else checkpoints(self.output_dir, step_only=self.evaluates)
        for candidate in candidates:
            try:
                checkpoint = read_checkpoint(candidate)
            except CheckpointError as error:
                if path:
                    raise
                logger.warning('cannot resume from %s, trying an older checkpoint: %s', candidate, error)
                continue
            self._load(checkpoint, candidate)
            return self._resume_at[0]
        logger.info('no checkpoint to resume from in %s: starting from scratch', self.output_dir)
        return 0

    def _load(self, checkpoint, path):
        for key in ('model', 'optimizer', 'lr_scheduler', 'epoch'):
            if key not in checkpoint:
                raise CheckpointError(f'{path} cannot resume a run: it has no {key!r} entry')
        load_checkpoint(self.model, checkpoint, kind=self.kind, interpolate=())
        self.optimizer.load_state_dict(checkpoint['optimizer'])
        self.lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
        extra = checkpoint.get('resume')
        if extra is None:  # a checkpoint of the original layout: the end of an epoch
            self._resume_at = (checkpoint['epoch'] + 1, 0)
            logger.info('resumed from %s (no RNG or sampler state): epoch %d', path, self._resume_at[0])
        else:
            # An epoch-end checkpoint stands for "training of the epoch done" whatever the number
            # of steps per epoch of this run (another number of processes, say).
            done = self.steps_per_epoch if extra.get('epoch_trained') else extra['step']
            self._resume_at = (extra['epoch'], done)
            self.skipped_steps = extra.get('skipped_nonfinite_steps', 0)
            best = extra.get('best') or {}
            self.best_value = best.get('value', float('-inf'))
            self.best_epoch = best.get('epoch')
            self._train_stats = extra.get('train_stats') or {}
            if self.scaler is not None and extra.get('scaler') is not None:
                self.scaler.load_state_dict(extra['scaler'])
            self._restore_rng(extra['rng'], path)
            logger.info('resumed from %s: epoch %d after step %d', path, *self._resume_at)
        if self._resume_at[1] > self.steps_per_epoch:
            raise CheckpointError(f'{path} was written after step {self._resume_at[1]} of epoch '
                                  f'{self._resume_at[0]}, but an epoch now has {self.steps_per_epoch} '
                                  'steps: the data, batch size or number of processes changed')
        self.last_checkpoint = self.resumed_from = path

    def _restore_rng(self, states, path):
        if len(states) == utils.get_world_size():
            self._rng = states[utils.get_rank()]
        elif 0 < self._resume_at[1] < self.steps_per_epoch:
            raise CheckpointError(f'{path} was written by {len(states)} processes, this run has '
                                  f'{utils.get_world_size()}: resuming inside an epoch needs the same '
                                  'number (an epoch-end checkpoint resumes with any number)')
        else:
            logger.warning('%s was written by %d processes, this run has %d: RNG states not restored',
                           path, len(states), utils.get_world_size())

    # -- epochs ----------------------------------------------------------------------------

    def begin_epoch(self, epoch):
        """Position the sampler for `epoch` (skipping the batches already done if it is the
        epoch being resumed), restore the RNG states once, and return the steps already done."""
        done = self._resume_at[1] if epoch == self._resume_at[0] else 0
        sampler = self.loader.sampler
        sampler.set_epoch(epoch)
        sampler.start = done * self.loader.batch_size
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None
        return done

    def train_epoch(self, epoch, train):
        """Train `epoch` by calling train(start_step) (engine.train_one_epoch with
        start_step=start_step, hooks=self) and return the epoch's training averages; with
        `evaluates`, checkpoint the end of the training. An epoch whose training had ended
        before the checkpoint resumed from is not trained again (its averages come from there)."""
        start_step = self.begin_epoch(epoch)
        if start_step == self.steps_per_epoch:
            logger.info('epoch %d was trained before the checkpoint: its evaluation follows', epoch)
            return self._train_stats
        stats = train(start_step)
        if self.evaluates:
            self._save(self._epoch_path(epoch), epoch, next_position=(epoch, self.steps_per_epoch),
                       train_stats=stats)
        return stats

    def end_epoch(self, epoch):
        """Checkpoint the finished epoch, after everything the script does for it (every rank
        calls this: the RNG states are gathered)."""
        self._save(self._epoch_path(epoch), epoch, next_position=(epoch + 1, 0))
        if self.evaluates:
            self._rotate()

    def _epoch_path(self, epoch):
        if self.evaluates:
            return checkpoint_path(self.output_dir, epoch, self.steps_per_epoch)
        return checkpoint_path(self.output_dir, epoch)

    def improved(self, epoch, value):
        """Record `value` (higher is better; NaN never is) of the evaluation of `epoch`; True when
        it beats every earlier epoch. Call it on every rank with the same value."""
        if value > self.best_value:
            self.best_value, self.best_epoch = value, epoch
            return True
        return False

    def _save(self, path, epoch, next_position, train_stats=None):
        # 'epoch' keeps the released meaning at an epoch end; in a step checkpoint it is the
        # running epoch. Resuming reads the position from 'resume'.
        rng = utils.all_gather_objects(rng_state())
        optimizer_state = optimizer_state_dict(self.optimizer)  # every rank: ZeRO gathers shards
        if utils.is_main_process():
            model = getattr(self.model, 'module', self.model)
            state = {'model': model.state_dict(), 'optimizer': optimizer_state,
                     'lr_scheduler': self.lr_scheduler.state_dict(), 'config': self.config,
                     'epoch': epoch,
                     'resume': {'epoch': next_position[0], 'step': next_position[1],
                                'epoch_trained': next_position[1] == self.steps_per_epoch, 'rng': rng,
                                'scaler': self.scaler.state_dict() if self.scaler is not None else None,
                                'skipped_nonfinite_steps': self.skipped_steps,
                                'best': {'value': self.best_value, 'epoch': self.best_epoch},
                                'train_stats': train_stats}}
            utils.save_checkpoint(state, path)
        self.last_checkpoint = path

    def _rotate(self):
        if utils.is_main_process():
            for old in checkpoints(self.output_dir, step_only=True)[self.keep:]:
                os.remove(old)

    # -- hooks called by engine.train_one_epoch -------------------------------------------

    def all_finite(self, finite):
        """Whether the loss is finite on every rank (all ranks must skip or stop together)."""
        return utils.all_reduce_mean(1.0 if finite else 0.0) == 1.0

    def skip_nonfinite(self, epoch, step, detail):
        """True to skip this step (within the skip_nonfinite_steps budget), False to stop."""
        if self.skipped_steps >= self.skip_limit:
            return False
        self.skipped_steps += 1
        logger.warning('non-finite loss in epoch %d, iteration %d (%s): step skipped (%d of at most %d)',
                       epoch, step, detail, self.skipped_steps, self.skip_limit)
        return True

    def failure_note(self):
        budget = f' after skipping {self.skipped_steps} such step(s)' if self.skip_limit else ''
        where = (f'the last good checkpoint is {self.last_checkpoint} (continue with --resume)'
                 if self.last_checkpoint else 'no checkpoint was written yet')
        return f'; the run stops{budget}: {where}'

    def step_done(self, epoch, steps_done):
        """After each step: the step checkpoint when due."""
        global_step = epoch * self.steps_per_epoch + steps_done
        if self.every and global_step % self.every == 0 and steps_done < self.steps_per_epoch:
            self._save(checkpoint_path(self.output_dir, epoch, steps_done), epoch,
                       next_position=(epoch, steps_done))
            self._rotate()
        if self._exit_after is not None and global_step >= self._exit_after:
            logger.warning('%s=%d: exiting abruptly after step %d', EXIT_AFTER_STEPS_ENV,
                           self._exit_after, global_step)
            exit_abruptly(75)


def exit_abruptly(code):
    """End the process at once, as a kill would: no clean-up, no further checkpoint."""
    logging.shutdown()
    os._exit(code)
