"""Runs launched by SLURM's srun: rank, world size and local rank from SLURM_PROCID /
SLURM_NTASKS / SLURM_LOCALID, the master address from SLURM_JOB_NODELIST, the port from the job
id; simulated here with two local processes."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import utils
from dataset.synthetic import generate
from tests.tiny import ROOT, python_path, tiny_config

SLURM_AND_TORCHRUN_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')


@pytest.mark.parametrize('nodelist, first', [
    ('node01', 'node01'),
    ('gpu[03-05,9],cpu1', 'gpu03'),
    ('rack[2-3]-n[10-11],login', 'rack2-n10'),
    ('a-[7],b[1-2]', 'a-7'),
    ('127.0.0.1', '127.0.0.1'),
])
def test_first_host_of_a_node_list(nodelist, first):
    assert utils.slurm_first_host(nodelist) == first


def test_port_from_the_job_id():
    assert utils.slurm_port('123456') == 20000 + 123456 % 20000
    assert 20000 <= utils.slurm_port('4294967295') < 40000


def test_one_task_is_a_single_process(monkeypatch):
    """A batch script running python without srun: SLURM_PROCID 0 of one task."""
    for var in SLURM_AND_TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('SLURM_PROCID', '0')
    monkeypatch.setenv('SLURM_NTASKS', '1')
    args = utils.argparse.Namespace(device='cpu', dist_url='env://', world_size=1, dist_timeout=1)
    utils.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size) == (False, 0, 1)


@pytest.fixture(scope='module')
def config_path(tmp_path_factory):
    data = tmp_path_factory.mktemp('synthetic')
    generate(data, seed=0, size='tiny')
    path = data / 'pretrain.yaml'
    tiny_config('Pretrain.yaml', data, path, batch_size=4, queue_size=16,
                schedular=dict(epochs=1, warmup_epochs=1))
    return path


def srun_task(config_path, output_dir, procid, ntasks, job_id, *extra):
    env = {key: value for key, value in os.environ.items()
           if key not in SLURM_AND_TORCHRUN_VARS and not key.startswith('SLURM_')}
    env.update(PYTHONPATH=python_path(), OMP_NUM_THREADS='1', SLURM_PROCID=str(procid),
               SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(procid), SLURM_JOB_ID=str(job_id),
               SLURM_JOB_NODELIST='127.0.0.[1]')
    cmd = [sys.executable, 'Pretrain.py', '--config', str(config_path), '--output_dir',
           str(output_dir), '--device', 'cpu', *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_two_srun_tasks_train_together_without_master_variables(config_path, tmp_path):
    job_id = 10000 + os.getpid() % 9000  # port 30000 + ...: not the other tests' ports
    tasks = [srun_task(config_path, tmp_path, rank, 2, job_id) for rank in range(2)]
    outputs = [task.communicate(timeout=300) for task in tasks]
    for task, (out, err) in zip(tasks, outputs):
        assert task.returncode == 0, err[-3000:]
    log = [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()]
    assert [entry['epoch'] for entry in log] == [0]
    # one run of two processes: the checkpoint holds both ranks' RNG states
    assert len(torch.load(tmp_path / 'checkpoint_00.pth', weights_only=True)['resume']['rng']) == 2


def test_a_task_that_cannot_reach_the_others_fails_clearly_in_bounded_time(config_path, tmp_path):
    start = time.time()
    task = srun_task(config_path, tmp_path, 1, 2, 19999, '--dist_timeout', '0.1')  # 6 s
    _, err = task.communicate(timeout=120)
    assert task.returncode != 0
    assert 'process 1 of 2 could not join the others at 127.0.0.1:39999 within --dist_timeout 0.1 min' in err
    assert time.time() - start < 90
