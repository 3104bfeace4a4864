"""What every task script shares (spec section 8.1): YAML config and `--opts` overrides, the
common command line, torch.distributed set-up and no-op-safe collectives, seeding, rank-0
logging, the MetricLogger and atomic checkpoint files. Models never import this module."""
import argparse
import collections
import copy
import datetime
import difflib
import io
import json
import logging
import numbers
import os
import pickle
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

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
        raise ValueError(f'config file {path} is not valid YAML: {e}') from e
    if not isinstance(config, dict):
        raise ValueError(f'config file {path} must hold a mapping of keys, '
                         f'got {type(config).__name__}')
    return config


def save_config(config, path):
    """Dump `config` as YAML to `path` (main process only)."""
    if not is_main_process():
        return
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
        _yaml().dump(config, f)


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


def _convert_like(text, old):
    """`text` converted to the type of the value it replaces."""
    if isinstance(old, bool):
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


def apply_overrides(config, overrides):
    """A copy of `config` with `key.sub=value` overrides applied (as given by `--opts`).

    Only existing keys can be overridden; the value takes the type of the value it replaces
    (bools accept true/false/1/0/yes/no; lists and dicts are parsed as YAML).
    """
    config = copy.deepcopy(config)
    for item in overrides or ():
        key, sep, text = item.partition('=')
        if not sep or not key:
            raise ValueError(f'override {item!r} must look like key.sub=value')
        *parents, leaf = key.split('.')
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            close = difflib.get_close_matches(key, list(_flat_keys(config)), n=3, cutoff=0.6)
            hint = f'; did you mean {", ".join(close)}?' if close else ''
            raise KeyError(f'override {item!r}: unknown config key {key!r}{hint}')
        try:
            node[leaf] = _convert_like(text, node[leaf])
        except (ValueError, YAMLError) as e:
            raise ValueError(f'override {item!r}: cannot convert {text!r} for key {key!r} '
                             f'(currently {node[leaf]!r}): {e}') from e
    return config


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


def get_args_parser(description):
    """The arguments every task script shares; scripts add their own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--config', required=True, help='task YAML file')
    parser.add_argument('--checkpoint', default='', help='checkpoint to start from')
    parser.add_argument('--output_dir', required=True)
    parser.add_argument('--text_encoder', default=None,
                        help="BERT weights and tokenizer (hub name or local directory); "
                             "overrides the config's text_encoder and tokenizer")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--seed', default=42, type=int)
    parser.add_argument('--world_size', default=1, type=int, help='number of processes')
    parser.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    parser.add_argument('--dist_timeout', default=30, type=float,
                        help='minutes a collective may wait for a dead rank before failing')
    parser.add_argument('--opts', nargs='*', default=[], metavar='KEY=VALUE',
                        help='config overrides, e.g. optimizer.lr=2e-5 distill=false')
    return parser


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
    elif 'SLURM_PROCID' in os.environ:
        # As the original: rank from SLURM, world size from --world_size.
        args.rank = int(os.environ['SLURM_PROCID'])
        args.gpu = args.rank % max(torch.cuda.device_count(), 1)
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
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank, timeout=timeout, **kwargs)
    barrier()


# Phrases of gloo / NCCL / c10d errors raised when another rank died or stopped responding.
_PEER_FAILURE_MARKERS = ('connection reset', 'connection closed', 'connection refused', 'timed out',
                         'timeout', 'broken pipe', 'socket', 'nccl', 'gloo')


def is_peer_failure(error):
    """Whether `error` (raised in a collective) means that another rank died or hangs."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(marker in text for marker in _PEER_FAILURE_MARKERS)


def run(main, argv=None):
    """Run a script's main(argv); in a distributed run, an error caused by another rank dying or
    hanging is re-raised naming the rank and the time limit (--dist_timeout), so that every
    surviving rank exits with a clear message instead of a bare transport error."""
    try:
        return main(argv)
    except Exception as error:
        if not is_dist_avail_and_initialized() or not is_peer_failure(error):
            raise
        raise RuntimeError(f'rank {get_rank()} of {get_world_size()}: lost contact with another process '
                           '(it exited, crashed or did not answer within --dist_timeout); stopping '
                           f'this one too. The failing process\'s own log names the cause. '
                           f'({type(error).__name__}: {str(error)[:300]})') from error


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

def save_checkpoint(state, path):
    """torch.save `state` to `path` on the main process, atomically: the data goes to a temporary
    file in the same directory that replaces `path` only once complete, so a crash mid-save
    leaves the previous checkpoint intact."""
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
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load_checkpoint_file(path, map_location='cpu'):
    """The object saved in the checkpoint file `path`, with a clear error if it is missing,
    truncated or corrupt."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    try:
        # Our own files and the released ALBEF checkpoints hold pickled dicts, not only tensors.
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise RuntimeError(f'cannot load checkpoint file {path} (truncated, corrupt or not a '
                           f'torch checkpoint): {type(e).__name__}: {e}') from e


def all_gather_objects(obj):
    """A list with every rank's `obj` (picklable), in rank order; [obj] in a single process."""
    if not is_dist_avail_and_initialized() or get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
