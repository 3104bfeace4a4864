"""Pretrain.py end to end on generated synthetic data: one process, resume, and two processes
under torchrun (gloo)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import Pretrain
from dataset.synthetic import generate
from models.checkpoint import load_checkpoint
from models.model_pretrain import ALBEF
from models.tokenization_bert import BertTokenizer
from tests.tiny import ROOT, python_path, tiny_config

STEPS_PER_EPOCH = 6  # 24 synthetic images, batch 4


@pytest.fixture(scope='module')
def tiny_setup(tmp_path_factory):
    data = tmp_path_factory.mktemp('synthetic')
    generate(data, seed=0, size='tiny')
    path = data / 'pretrain.yaml'
    config = tiny_config('Pretrain.yaml', data, path, batch_size=4, queue_size=16,
                         schedular=dict(epochs=2, warmup_epochs=1))
    return path, config


def run(config_path, output_dir, *extra):
    return Pretrain.main(['--config', str(config_path), '--output_dir', str(output_dir),
                          '--device', 'cpu', *extra])


def read_log(output_dir):
    return [json.loads(line) for line in (output_dir / 'log.txt').read_text().splitlines()]


def test_single_process_pretraining(tiny_setup, tmp_path):
    config_path, config = tiny_setup
    stats = run(config_path, tmp_path)
    log = read_log(tmp_path)
    assert [entry['epoch'] for entry in log] == [0, 1]
    for entry in log:
        for name in ('train_loss_mlm', 'train_loss_ita', 'train_loss_itm', 'train_lr'):
            assert torch.isfinite(torch.tensor(float(entry[name]))), (name, entry)
    assert set(stats) >= {'loss_mlm', 'loss_ita', 'loss_itm', 'lr'}
    assert (tmp_path / 'config.yaml').is_file()
    checkpoint = torch.load(tmp_path / 'checkpoint_01.pth', weights_only=False)
    # the released keys, plus what exact resumption needs
    assert set(checkpoint) == {'model', 'optimizer', 'lr_scheduler', 'config', 'epoch', 'resume'}
    assert checkpoint['epoch'] == 1
    # the checkpoint is in the released layout: it loads into a fresh model with nothing left over
    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, tokenizer=tokenizer, init_deit=False)
    report = load_checkpoint(model, tmp_path / 'checkpoint_01.pth', kind='pretrain')
    assert not report.errors and not report.tolerated
    assert int(model.queue_ptr) == (2 * STEPS_PER_EPOCH * 4) % 16
    # training moved the weights away from their momentum copy
    assert not torch.equal(model.text_proj.weight, model.text_proj_m.weight)


def test_resume_continues_model_queues_optimizer_and_schedule(tiny_setup, tmp_path):
    config_path, _ = tiny_setup
    run(config_path, tmp_path, '--opts', 'schedular.epochs=1')  # "killed" after epoch 0
    first = torch.load(tmp_path / 'checkpoint_00.pth', weights_only=False)
    assert int(first['model']['queue_ptr']) == (STEPS_PER_EPOCH * 4) % 16

    run(config_path, tmp_path, '--resume')  # picks up checkpoint_00.pth from output_dir
    assert [entry['epoch'] for entry in read_log(tmp_path)] == [0, 1]
    second = torch.load(tmp_path / 'checkpoint_01.pth', weights_only=False)
    # optimizer state carried over: Adam has counted the steps of both epochs
    steps = {int(state['step']) for state in second['optimizer']['state'].values()}
    assert steps == {2 * STEPS_PER_EPOCH}
    # the queue pointer continued from where epoch 0 left it
    assert int(second['model']['queue_ptr']) == (2 * STEPS_PER_EPOCH * 4) % 16
    assert second['lr_scheduler']['last_t'] == 2  # epoch 1 + warmup_epochs 1


def test_bad_checkpoint_and_unknown_config_key_are_clear_errors(tiny_setup, tmp_path):
    config_path, _ = tiny_setup
    broken = tmp_path / 'broken.pth'
    broken.write_bytes(b'not a checkpoint')
    with pytest.raises(RuntimeError, match='unreadable'):
        run(config_path, tmp_path / 'out', '--checkpoint', str(broken))
    with pytest.raises(KeyError, match='unknown config key'):
        run(config_path, tmp_path / 'out', '--opts', 'optimizer.learning_rate=1e-4')


def test_two_process_torchrun_pretraining(tiny_setup, tmp_path):
    """With the AdamW state sharded over the ranks (optimizer_sharding: zero): the checkpoint
    holds every parameter's state, gathered on rank 0, and both ranks leave the process group
    cleanly (the run's sharded optimiser is freed before the group is destroyed)."""
    config_path, _ = tiny_setup
    env = {**os.environ, 'PYTHONPATH': python_path(), 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
           '--master_port', str(30500 + os.getpid() % 1000), 'Pretrain.py',
           '--config', str(config_path), '--output_dir', str(tmp_path), '--device', 'cpu',
           '--opts', 'schedular.epochs=1', 'optimizer_sharding=zero']
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'terminate called' not in result.stderr
    assert 'optimizer_sharding: zero ignored' not in result.stdout + result.stderr  # two ranks shard
    assert [entry['epoch'] for entry in read_log(tmp_path)] == [0]
    checkpoint = torch.load(tmp_path / 'checkpoint_00.pth', weights_only=False)
    # 24 images over 2 ranks = 3 steps of a global batch of 8: the queue advanced by the
    # gathered batch (a per-rank enqueue would have moved it by 12)
    assert int(checkpoint['model']['queue_ptr']) == (3 * 8) % 16
    state = checkpoint['optimizer']['state']  # one rank holds only its shard's
    assert len(state) == sum(len(g['params']) for g in checkpoint['optimizer']['param_groups'])
    assert all('exp_avg' in entry for entry in state.values())
