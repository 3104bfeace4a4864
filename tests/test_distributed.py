"""Two CPU processes under torchrun (gloo): the queues gather the features of both ranks."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from tests.tiny import python_path  # noqa: E402


def torchrun(args, timeout=240):
    env = {**os.environ, 'PYTHONPATH': python_path(), 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
           '--master_port', str(29500 + os.getpid() % 1000)] + args
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_queues_hold_features_of_both_ranks():
    result = torchrun(['tests/dist_queue_worker.py'])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 0: queues hold both ranks' features" in result.stdout
    assert "rank 1: queues hold both ranks' features" in result.stdout


def test_retrieval_evaluation_sharded_over_ranks_equals_one_process():
    result = torchrun(['tests/dist_retrieval_worker.py'])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        assert f'rank {rank}: sharded evaluation equals one process' in result.stdout
