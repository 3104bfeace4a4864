"""The learning-rate schedule ALBEF uses: linear warm-up, then one cosine cycle.

The original built timm's CosineLRScheduler (t_mul 1, cycle_limit 1, warmup_prefix True, no
noise); this is that schedule and nothing else. It runs in one of two time units, chosen by
`schedular.step_every`:

- 'epoch' (default, the original's): `t` is in epochs, except in epoch 0 where the engine steps
  it in units of 100 iterations (see engine.train_one_epoch). A run of a few hundred steps then
  spends most of its first epoch at warmup_lr or at a jump to lr, and keeps a constant LR within
  each later epoch.
- 'step': `t` counts optimiser steps: a linear warm-up over `warmup_steps` (or `warmup_epochs`
  epochs of steps) from warmup_lr to lr, then a cosine from lr to min_lr over the remaining
  steps of the run, updated after every optimiser step. The same as timm's CosineLRScheduler
  with t_in_epochs=False driven by step_update(num_updates) (tests/test_sched_optim.py).
"""
import math

_ALLOWED_KEYS = ('sched', 'lr', 'epochs', 'min_lr', 'warmup_lr', 'warmup_epochs',
                 'decay_rate', 'cooldown_epochs', 'step_every', 'warmup_steps')
_STATE_KEYS = ('base_lrs', 'epochs', 'min_lr', 'warmup_lr', 'warmup_epochs', 'last_t')
UNITS = ('epoch', 'step')


def cosine_lr(t, base_lr, *, epochs, min_lr, warmup_lr, warmup_epochs):
    """LR at time `t`: linear from warmup_lr to base_lr over warmup_epochs, then cosine from
    base_lr to min_lr over `epochs` (time counted after the warm-up), then min_lr."""
    if t < warmup_epochs:
        return warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs
    t = t - warmup_epochs
    if t < epochs:
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * t / epochs))
    # NOTE(faithful): decay_rate would only scale later cycles, and there is one cycle.
    return min_lr


class CosineLRScheduler:
    """Sets the LR of every optimiser group to cosine_lr(t) on `step(t)`.

    The base LR of each group is its `lr` when the scheduler is built (kept as `initial_lr` in
    the group, so a loaded optimiser state keeps the right base). `unit` is 'epoch' or 'step'
    (see the module docstring); `epochs` and `warmup_epochs` are the cosine and warm-up lengths
    in that unit. A per-step schedule is driven by `step_update(steps done)`.
    """

    def __init__(self, optimizer, *, epochs, min_lr, warmup_lr, warmup_epochs, unit='epoch'):
        if epochs <= 0:
            raise ValueError(f'schedular.epochs must be positive, got {epochs}')
        if warmup_epochs < 0:
            raise ValueError(f'schedular.warmup_epochs must be >= 0, got {warmup_epochs}')
        if unit not in UNITS:
            raise ValueError(f'schedule unit must be one of {UNITS}, got {unit!r}')
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault('initial_lr', group['lr'])
        self.base_lrs = [group['initial_lr'] for group in optimizer.param_groups]
        self.epochs, self.min_lr = epochs, min_lr
        self.warmup_lr, self.warmup_epochs = warmup_lr, warmup_epochs
        self.unit = unit
        self.last_t = None
        if warmup_epochs:
            self._set_lrs([warmup_lr] * len(self.base_lrs))

    @property
    def per_step(self):
        """Whether the engine updates this schedule after every optimiser step."""
        return self.unit == 'step'

    def lr_at(self, t):
        """The LR of each group at time `t` (no side effect)."""
        return [cosine_lr(t, base_lr, epochs=self.epochs, min_lr=self.min_lr,
                          warmup_lr=self.warmup_lr, warmup_epochs=self.warmup_epochs)
                for base_lr in self.base_lrs]

    def step(self, t):
        self.last_t = t
        self._set_lrs(self.lr_at(t))

    def step_update(self, num_updates):
        """Per-step schedule: set the LR of the next optimiser step, `num_updates` steps done."""
        if not self.per_step:
            raise RuntimeError('step_update drives a per-step schedule (schedular.step_every: '
                               'step); this one steps per epoch')
        self.step(num_updates)

    def _set_lrs(self, lrs):
        # `lr_scale` (optimizer.lr_scale): the group runs at that multiple of the schedule.
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group['lr'] = lr * group.get('lr_scale', 1.0)

    def state_dict(self):
        state = {key: getattr(self, key) for key in _STATE_KEYS}
        if self.per_step:  # per-epoch states keep the layout of earlier checkpoints
            state['unit'] = self.unit
        return state

    def load_state_dict(self, state):
        """Restore from our own `state_dict()` or from an original (timm) scheduler `__dict__`.

        Like the original, the optimiser's LRs are left alone: they come from its own state.
        """
        if 'base_values' in state:  # an original ALBEF checkpoint
            state = {'base_lrs': state['base_values'], 'epochs': state['t_initial'],
                     'min_lr': state['lr_min'], 'warmup_lr': state['warmup_lr_init'],
                     'warmup_epochs': state['warmup_t'], 'last_t': None}
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise KeyError(f'lr_scheduler state: missing key(s) {missing}')
        if len(state['base_lrs']) != len(self.optimizer.param_groups):
            raise ValueError(f"lr_scheduler state has {len(state['base_lrs'])} base LRs for "
                             f'{len(self.optimizer.param_groups)} optimiser groups')
        unit = state.get('unit', 'epoch')
        if unit != self.unit:
            # Times of one unit read in the other would put the run at another point of it.
            raise ValueError(f'lr_scheduler state steps every {unit}, the config every '
                             f'{self.unit} (schedular.step_every): resume with the setting the '
                             'run started with')
        for key in _STATE_KEYS:
            setattr(self, key, state[key])
        self.base_lrs = list(self.base_lrs)


def create_scheduler(config_schedular, optimizer, steps_per_epoch=None):
    """CosineLRScheduler from the `schedular` section (original spelling) of a task config.

    `steps_per_epoch` (optimiser steps) is needed with `step_every: step`: the cosine spans the
    run's epochs x steps_per_epoch steps.
    """
    unknown = sorted(set(config_schedular) - set(_ALLOWED_KEYS))
    if unknown:
        raise KeyError(f'schedular config: unknown key(s) {unknown}; allowed: {list(_ALLOWED_KEYS)}')
    sched = config_schedular.get('sched', 'cosine')
    if sched != 'cosine':
        raise ValueError(f"schedular config: sched={sched!r} is not supported; allowed: 'cosine'")
    for key in ('epochs', 'min_lr', 'warmup_lr', 'warmup_epochs'):
        if key not in config_schedular:
            raise KeyError(f"schedular config: missing key '{key}'")
        value = config_schedular[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f'schedular config: {key} must be a number, got {value!r}')
    unit = config_schedular.get('step_every', 'epoch')
    if unit not in UNITS:
        raise ValueError(f'schedular config: step_every={unit!r}; allowed: {", ".join(UNITS)}')
    epochs, warmup = config_schedular['epochs'], config_schedular['warmup_epochs']
    if 'warmup_steps' in config_schedular and unit != 'step':
        raise ValueError('schedular config: warmup_steps needs step_every: step (the per-epoch '
                         'schedule warms up over warmup_epochs x 100 iterations)')
    if unit == 'step':
        if not steps_per_epoch or steps_per_epoch < 1:
            raise ValueError(f'a per-step schedule needs the steps per epoch, got {steps_per_epoch!r}')
        total = epochs * steps_per_epoch
        warmup = config_schedular.get('warmup_steps', warmup * steps_per_epoch)
        if warmup >= total:
            raise ValueError(f'schedular config: the warm-up ({warmup} steps) must be shorter than '
                             f'the run ({epochs} epochs x {steps_per_epoch} steps = {total})')
        epochs = total - warmup  # the cosine fills the rest of the run
    # NOTE(faithful): `schedular.lr` is ignored (the base LR is the optimiser's), and
    # `decay_rate` / `cooldown_epochs` do not change the schedule of a single cycle.
    return CosineLRScheduler(optimizer, epochs=epochs, min_lr=float(config_schedular['min_lr']),
                             warmup_lr=float(config_schedular['warmup_lr']),
                             warmup_epochs=warmup, unit=unit)
