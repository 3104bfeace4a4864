"""Config, command line, distributed helpers, logging, metrics and checkpoint files (utils.py)."""
import argparse
import json
import logging
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

import utils
from models.checkpoint import CheckpointError, read_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

YAML_TEXT = """\
train_file: ['data/coco.json', 'data/vg.json']
image_res: 256
alpha: 0.4
distill: true
eos: '[SEP]'
optimizer: {opt: adamW, lr: 1e-4, weight_decay: 0.02}
schedular: {sched: cosine, lr: 1e-4, epochs: 30, min_lr: 1e-5, warmup_lr: 1e-5, warmup_epochs: 20}
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / 'Pretrain.yaml'
    path.write_text(YAML_TEXT)
    return utils.load_config(str(path))


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level


# --- config ----------------------------------------------------------------------------------

def test_load_config_yaml12_floats(config):
    assert config['optimizer']['lr'] == 1e-4 and isinstance(config['optimizer']['lr'], float)
    assert isinstance(config['schedular']['min_lr'], float)
    assert config['distill'] is True and config['image_res'] == 256
    assert config['train_file'] == ['data/coco.json', 'data/vg.json']


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.yaml'):
        utils.load_config(str(tmp_path / 'nope.yaml'))
    bad = tmp_path / 'bad.yaml'
    bad.write_text('a: [1, 2\nb: 3\n')
    with pytest.raises(ValueError, match='bad.yaml'):
        utils.load_config(str(bad))
    listing = tmp_path / 'list.yaml'
    listing.write_text('- 1\n- 2\n')
    with pytest.raises(ValueError, match='list.yaml.*mapping'):
        utils.load_config(str(listing))


def test_overrides_convert_to_existing_types(config):
    new = utils.apply_overrides(config, [
        'optimizer.lr=2e-5', 'distill=false', 'image_res=384', 'alpha=1',
        'eos=[EOS]', 'train_file=[a.json, b.json]', 'schedular.warmup_epochs=4'])
    assert new['optimizer']['lr'] == 2e-5 and isinstance(new['optimizer']['lr'], float)
    assert new['distill'] is False
    assert new['image_res'] == 384 and isinstance(new['image_res'], int)
    assert new['alpha'] == 1.0 and isinstance(new['alpha'], float)
    assert new['eos'] == '[EOS]'
    assert new['train_file'] == ['a.json', 'b.json']
    assert new['schedular']['warmup_epochs'] == 4
    assert config['optimizer']['lr'] == 1e-4  # the input is not modified
    for text, expected in [('yes', True), ('0', False), ('True', True), ('no', False)]:
        assert utils.apply_overrides(config, [f'distill={text}'])['distill'] is expected


def test_override_errors(config):
    with pytest.raises(KeyError, match="'optimizer.lrr'.*optimizer.lr"):
        utils.apply_overrides(config, ['optimizer.lrr=1'])
    with pytest.raises(KeyError, match="'distil'.*distill"):
        utils.apply_overrides(config, ['distil=false'])
    with pytest.raises(KeyError, match="'alpha.x'"):
        utils.apply_overrides(config, ['alpha.x=1'])
    with pytest.raises(ValueError, match="image_res"):
        utils.apply_overrides(config, ['image_res=1.5'])
    with pytest.raises(ValueError, match="distill"):
        utils.apply_overrides(config, ['distill=maybe'])
    with pytest.raises(ValueError, match="train_file.*list"):
        utils.apply_overrides(config, ['train_file=a.json'])
    with pytest.raises(ValueError, match='key.sub=value'):
        utils.apply_overrides(config, ['alpha'])


def test_save_config_round_trip(config, tmp_path):
    path = tmp_path / 'out' / 'config.yaml'
    utils.save_config(config, str(path))
    assert utils.load_config(str(path)) == config
    assert 'schedular:' in path.read_text()


# --- command line ----------------------------------------------------------------------------

def test_str2bool():
    for text in ('true', 'True', '1', 'yes'):
        assert utils.str2bool(text) is True
    for text in ('false', 'FALSE', '0', 'no'):
        assert utils.str2bool(text) is False
    with pytest.raises(argparse.ArgumentTypeError, match='maybe'):
        utils.str2bool('maybe')


def test_args_parser():
    parser = utils.get_args_parser('test')
    args = parser.parse_args(['--config', 'c.yaml', '--output_dir', 'out', '--resume', 'false',
                              '--opts', 'optimizer.lr=2e-5', 'distill=false'])
    assert args.resume is False and args.evaluate is False and args.debug is False
    # --resume alone: the newest checkpoint of --output_dir; with a path: that file
    assert parser.parse_args(['--config', 'c', '--output_dir', 'o', '--resume']).resume is True
    assert parser.parse_args(['--config', 'c', '--output_dir', 'o', '--resume',
                              'out/checkpoint_03.pth']).resume == 'out/checkpoint_03.pth'
    assert args.opts == ['optimizer.lr=2e-5', 'distill=false']
    assert (args.checkpoint, args.text_encoder, args.seed, args.world_size, args.dist_url) == \
        ('', None, 42, 1, 'env://')
    assert args.device == ('cuda' if torch.cuda.is_available() else 'cpu')
    with pytest.raises(SystemExit):
        parser.parse_args(['--config', 'c.yaml'])  # --output_dir is required


# --- distributed, single process --------------------------------------------------------------

def test_single_process_without_env(monkeypatch):
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID'):
        monkeypatch.delenv(var, raising=False)
    args = argparse.Namespace(device='cpu', dist_url='env://', world_size=4)
    utils.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size) == (False, 0, 1)
    assert not dist.is_initialized()
    assert utils.get_rank() == 0 and utils.get_world_size() == 1 and utils.is_main_process()
    utils.barrier()
    assert utils.all_reduce_mean(3.0) == 3.0
    t = torch.tensor([1.0, 2.0])
    assert utils.all_reduce_mean(t) is t
    meter = utils.SmoothedValue()
    meter.update(2.0)
    meter.synchronize_between_processes()
    assert (meter.count, meter.total) == (1, 2.0)
    utils.destroy_distributed()


def test_set_seed_reproducible():
    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()
    utils.set_seed(42)
    first = draws()
    utils.set_seed(42)
    assert draws() == first
    utils.set_seed(43)
    assert draws() != first


# --- logging ---------------------------------------------------------------------------------

def test_setup_logging_writes_train_log(tmp_path, restore_logging):
    utils.setup_logging(str(tmp_path))
    utils.setup_logging(str(tmp_path))  # again: handlers replaced, not duplicated
    logging.getLogger('some.module').info('hello %d', 7)
    logging.getLogger('some.module').debug('not shown')
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = (tmp_path / 'train.log').read_text()
    assert text.count('hello 7') == 1 and 'not shown' not in text
    assert logging.getLogger().level == logging.INFO


def test_append_log(tmp_path):
    utils.append_log(str(tmp_path), {'train_loss': '1.234', 'epoch': 0})
    utils.append_log(str(tmp_path), {'val_acc': torch.tensor(0.5), 'epoch': 1})
    lines = (tmp_path / 'log.txt').read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{'train_loss': '1.234', 'epoch': 0},
                                                    {'val_acc': 0.5, 'epoch': 1}]


# --- metrics ---------------------------------------------------------------------------------

def test_smoothed_value():
    meter = utils.SmoothedValue(
        window_size=3, fmt='{median:.1f} {avg:.1f} {global_avg:.1f} {max:.0f} {value:.0f}')
    for v in [1.0, 2.0, 3.0, 4.0, 6.0]:
        meter.update(v)
    assert meter.median == 4.0 and meter.avg == pytest.approx(13 / 3)
    assert meter.global_avg == pytest.approx(16 / 5) and meter.max == 6.0 and meter.value == 6.0
    assert str(meter) == '4.0 4.3 3.2 6 6'
    meter.update(5.0)
    assert meter.median == 5.0
    even = utils.SmoothedValue()
    even.update(1.0)
    even.update(3.0)
    assert even.median == 1.0  # lower median, as torch.median


def test_metric_logger_update_and_averages():
    ml = utils.MetricLogger()
    ml.update(loss=torch.tensor(1.0), lr=0.1)
    ml.update(loss=torch.tensor([2.0]), lr=np.float32(0.3))
    assert ml.global_avg() == {'loss': '1.500', 'lr': '0.200'}
    assert ml.global_avg(fmt=None) == {'loss': 1.5, 'lr': pytest.approx(0.2)}
    with pytest.raises(ValueError, match='loss'):
        ml.update(loss=torch.ones(2))
    with pytest.raises(TypeError, match='name'):
        ml.update(name='x')


def test_log_every_logs_progress(caplog):
    caplog.set_level(logging.INFO)
    ml = utils.MetricLogger(delimiter='  ')
    ml.add_meter('lr', utils.SmoothedValue(fmt='{value:.6f}'))
    seen = []
    for i, item in enumerate(ml.log_every(['a', 'b', 'c', 'd', 'e'], 2, 'Train Epoch: [0]')):
        seen.append(item)
        ml.update(lr=0.001 * (i + 1), loss_itm=0.5)
    assert seen == ['a', 'b', 'c', 'd', 'e']
    progress = [r.getMessage() for r in caplog.records if 'eta:' in r.getMessage()]
    assert [line.split(']')[1].split('/')[0].strip(' [') for line in progress] == ['0', '2', '4']
    assert progress[-1].startswith('Train Epoch: [0] [4/5]')
    assert 'lr: 0.005000' in progress[-1] and 'loss_itm: 0.5000' in progress[-1]
    assert 'time: ' in progress[-1] and 'data: ' in progress[-1]
    assert any('Total time' in r.getMessage() for r in caplog.records)
    with pytest.raises(TypeError, match='length'):
        list(ml.log_every(iter([1]), 1))


# --- checkpoints -----------------------------------------------------------------------------

def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint_00.pth'
    utils.save_checkpoint({'model': {'w': torch.ones(3)}, 'epoch': 0}, str(path))
    assert read_checkpoint(str(path))['epoch'] == 0

    def crash(obj, f, *args, **kwargs):
        f.write(b'PK\x03\x04 partial bytes')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError, match='disk full'):
        utils.save_checkpoint({'model': {'w': torch.zeros(3)}, 'epoch': 1}, str(path))
    monkeypatch.undo()

    state = read_checkpoint(str(path))
    assert state['epoch'] == 0 and torch.equal(state['model']['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['checkpoint_00.pth']  # no temporary file left behind
    utils.save_checkpoint({'epoch': 1}, str(path))
    assert read_checkpoint(str(path)) == {'epoch': 1}


@pytest.mark.parametrize('cut', [0, 10, 100, 0.5])
def test_load_truncated_checkpoint_names_file(tmp_path, cut):
    good = tmp_path / 'good.pth'
    torch.save({'model': {'w': torch.randn(64, 64)}}, str(good))
    data = good.read_bytes()
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(data[:int(len(data) * cut) if isinstance(cut, float) else cut])
    with pytest.raises(CheckpointError, match='bad.pth.*truncated'):
        read_checkpoint(str(bad))


def test_load_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match='missing.pth.*does not exist'):
        read_checkpoint(str(tmp_path / 'missing.pth'))


# --- distributed, two processes --------------------------------------------------------------

WORKER = """\
import json, os, sys
import torch
import utils
from models.checkpoint import read_checkpoint

out = sys.argv[1]
args = utils.get_args_parser('worker').parse_args(
    ['--config', 'x', '--output_dir', out, '--device', 'cpu'])
utils.init_distributed_mode(args)
utils.setup_logging(out)
rank = utils.get_rank()
ml = utils.MetricLogger()
for v in ([1.0, 2.0] if rank == 0 else [6.0]):
    ml.update(loss=v)
ml.synchronize_between_processes()
utils.set_seed(42)
seeded = torch.rand(1).item()
mean_float = utils.all_reduce_mean(float(rank))
mean_tensor = utils.all_reduce_mean(torch.tensor([rank, 2.0 * rank])).tolist()
utils.save_checkpoint({'rank': rank}, os.path.join(out, 'ckpt.pth'))
utils.append_log(out, {'rank': rank})
utils.barrier()
result = dict(distributed=args.distributed, rank=rank, world=utils.get_world_size(),
              main=utils.is_main_process(), mean_float=mean_float, mean_tensor=mean_tensor,
              loss=ml.global_avg(fmt=None)['loss'], count=ml.meters['loss'].count,
              ckpt_rank=read_checkpoint(os.path.join(out, 'ckpt.pth'))['rank'],
              seeded=seeded, backend=args.dist_backend)
with open(os.path.join(out, f'result_{rank}.json'), 'w') as f:
    json.dump(result, f)
utils.destroy_distributed()
"""


def test_two_process_gloo(tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    env = {**os.environ, 'PYTHONPATH': REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
           'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID'):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           '--nproc_per_node=2', str(script), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = [json.loads((tmp_path / f'result_{r}.json').read_text()) for r in range(2)]
    for rank, res in enumerate(results):
        assert res['distributed'] is True and res['rank'] == rank and res['world'] == 2
        assert res['main'] is (rank == 0) and res['backend'] == 'gloo'
        assert res['mean_float'] == 0.5 and res['mean_tensor'] == [0.5, 1.0]
        assert res['count'] == 3 and res['loss'] == pytest.approx(3.0)  # (1 + 2 + 6) / 3
        assert res['ckpt_rank'] == 0  # only the main process writes
    assert results[0]['seeded'] != results[1]['seeded']  # seed + rank
    assert (tmp_path / 'log.txt').read_text().splitlines() == ['{"rank": 0}']


@pytest.mark.parametrize('failure', [OSError(28, 'No space left on device'),
                                     RuntimeError('PytorchStreamWriter failed writing file data/0')])
def test_a_full_disk_during_a_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch, failure):
    path = tmp_path / 'checkpoint_00.pth'
    utils.save_checkpoint({'epoch': 0}, path)
    before = path.read_bytes()

    def full_disk(state, f):
        f.write(b'the first bytes')
        raise failure
    monkeypatch.setattr(utils.torch, 'save', full_disk)
    with pytest.raises(OSError, match=r'cannot write checkpoint .*checkpoint_00.pth: .*; its partial '
                                      r'temporary file was removed \(the previous file is unchanged\)'):
        utils.save_checkpoint({'epoch': 1}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint_00.pth']
    assert path.read_bytes() == before
