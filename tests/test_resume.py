"""Exact resumption (engine.Run, dataset/loaders.py): a Pretrain.py run killed part-way through an epoch and resumed
ends with the same parameters, queues and optimizer state as a run never interrupted, in one
process and in two processes under torchrun (gloo). Also the sampler, the checkpoint rotation
and the non-finite-loss policy."""
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

import Pretrain
import engine
from dataset.loaders import ResumableSampler, SeededDataset
from dataset.synthetic import generate
from tests.tiny import ROOT, python_path, tiny_config

EXIT_CODE = 75  # engine.Run's abrupt exit


@pytest.fixture(scope='module')
def config_path(tmp_path_factory):
    data = tmp_path_factory.mktemp('synthetic')
    generate(data, seed=0, size='tiny')  # 24 images
    path = data / 'pretrain.yaml'
    tiny_config('Pretrain.yaml', data, path, batch_size=4, queue_size=16, checkpoint_every_steps=2,
                keep_checkpoints=2, schedular=dict(epochs=2, warmup_epochs=1))
    return path


def pretrain(config_path, output_dir, *opts, nproc=1, exit_after=None, resume_run=False):
    env = {**os.environ, 'PYTHONPATH': python_path(), 'OMP_NUM_THREADS': '1'}
    env.pop(engine.EXIT_AFTER_STEPS_ENV, None)
    if exit_after is not None:
        env[engine.EXIT_AFTER_STEPS_ENV] = str(exit_after)
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
                     '--master_port', str(31500 + os.getpid() % 1000)]
    cmd = launcher + ['Pretrain.py', '--config', str(config_path), '--output_dir', str(output_dir),
                      '--device', 'cpu', *(['--resume'] if resume_run else []),
                      *(['--opts', *opts] if opts else [])]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def final_state(output_dir):
    checkpoint = torch.load(output_dir / 'checkpoint_01.pth', weights_only=False)
    return checkpoint['model'], checkpoint['optimizer']


def assert_same_training_state(a_dir, b_dir):
    (model_a, optim_a), (model_b, optim_b) = final_state(a_dir), final_state(b_dir)
    assert model_a.keys() == model_b.keys()
    assert {'image_queue', 'text_queue', 'queue_ptr', 'visual_encoder_m.cls_token'} <= model_a.keys()
    different = [key for key in model_a if not torch.equal(model_a[key], model_b[key])]
    assert not different, f'resumed run differs from the uninterrupted one in {different[:5]}'
    for index, state in optim_a['state'].items():
        for name, value in state.items():
            assert torch.equal(value, optim_b['state'][index][name]), (index, name)
    assert optim_a['param_groups'] == optim_b['param_groups']


def epochs_logged(output_dir):
    return [json.loads(line)['epoch'] for line in (output_dir / 'log.txt').read_text().splitlines()]


def pretrain_here(config_path, output_dir, *opts, resume_run=False):
    """Pretrain.main in this process, with one intra-op thread as the subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Pretrain.main(['--config', str(config_path), '--output_dir', str(output_dir), '--device', 'cpu',
                       *(['--resume'] if resume_run else []), *(['--opts', *opts] if opts else [])])
    finally:
        torch.set_num_threads(threads)


def test_killed_and_resumed_equals_uninterrupted_single_process(config_path, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    whole, killed, fallback = tmp_path / 'whole', tmp_path / 'killed', tmp_path / 'fallback'
    pretrain_here(config_path, whole)
    # 6 steps per epoch; step checkpoints every 2 global steps, 2 kept; epoch-end ones all kept
    assert sorted(p.name for p in whole.glob('checkpoint_*.pth')) == [
        'checkpoint_00.pth', 'checkpoint_01.pth',
        'checkpoint_01_step000002.pth', 'checkpoint_01_step000004.pth']

    # killed (another process, hard exit) after global step 5: its last checkpoint is step 4 of
    # epoch 0, inside the warm-up and the alpha ramp. With a loader worker: per-sample seeds
    # make the data the same as in the worker-less uninterrupted run.
    result = pretrain(config_path, killed, 'num_workers=1', exit_after=5)
    assert result.returncode == EXIT_CODE, result.stderr[-3000:]
    assert sorted(p.name for p in killed.glob('checkpoint_*.pth')) == [
        'checkpoint_00_step000002.pth', 'checkpoint_00_step000004.pth']
    shutil.copytree(killed, fallback)

    pretrain_here(config_path, killed, 'num_workers=1', resume_run=True)
    assert 'epoch 0 after step 4' in caplog.text
    assert epochs_logged(killed) == [0, 1]
    assert_same_training_state(whole, killed)

    # the newest checkpoint unreadable (a disk fault; the atomic write rules out a torn save):
    # the run resumes from the one before
    caplog.clear()
    newest = fallback / 'checkpoint_00_step000004.pth'
    newest.write_bytes(newest.read_bytes()[:1000])
    pretrain_here(config_path, fallback, resume_run=True)
    assert 'cannot resume from' in caplog.text and 'checkpoint_00_step000004.pth' in caplog.text
    assert 'epoch 0 after step 2' in caplog.text
    assert_same_training_state(whole, fallback)


def test_killed_and_resumed_equals_uninterrupted_two_processes(config_path, tmp_path):
    whole, killed = tmp_path / 'whole', tmp_path / 'killed'
    result = pretrain(config_path, whole, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    # 3 steps per epoch and rank; killed after global step 5, last checkpoint after step 1 of
    # epoch 1 (global step 4)
    result = pretrain(config_path, killed, nproc=2, exit_after=5)
    assert result.returncode != 0
    assert (killed / 'checkpoint_01_step000001.pth').is_file()
    assert not (killed / 'checkpoint_01.pth').exists()
    checkpoint = torch.load(killed / 'checkpoint_01_step000001.pth', weights_only=False)
    assert len(checkpoint['resume']['rng']) == 2  # each rank's own RNG states
    assert not torch.equal(checkpoint['resume']['rng'][0]['torch'], checkpoint['resume']['rng'][1]['torch'])
    result = pretrain(config_path, killed, nproc=2, resume_run=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training_state(whole, killed)


# ----------------------------------------------------------------------------- units

def test_sampler_matches_distributed_sampler_and_skips_seen_samples():
    data = list(range(23))
    for world, rank in ((1, 0), (2, 1), (3, 2)):
        reference = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, seed=0)
        sampler = ResumableSampler(data, world, rank, seed=7)
        for epoch in (0, 3):
            reference.set_epoch(epoch)
            sampler.set_epoch(epoch)
            sampler.start = 0
            full = list(sampler)
            assert [index for index, _ in full] == list(reference)
            sampler.start = 4
            assert list(sampler) == full[4:] and len(sampler) == len(full) - 4
    # seeds depend on the epoch and the place in the permutation, and differ between ranks
    a, b = ResumableSampler(data, 2, 0), ResumableSampler(data, 2, 1)
    seeds_a, seeds_b = [s for _, s in a], [s for _, s in b]
    assert len(set(seeds_a) | set(seeds_b)) == len(seeds_a) + len(seeds_b)
    a.set_epoch(1)
    assert [s for _, s in a] != seeds_a


def test_seeded_dataset_is_deterministic_and_leaves_global_rng_alone():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.rand(2)

    dataset = SeededDataset(Noise())
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    first = dataset[(1, 123)]
    assert torch.equal(torch.rand(1), expected_next)  # the global stream did not move
    assert torch.equal(dataset[(3, 123)], first) and not torch.equal(dataset[(1, 124)], first)
    # A sample's draws are those of torch.manual_seed(seed) (runs resumed across versions see
    # the same augmentations), though only the CPU generator is reseeded.
    torch.manual_seed(123)
    assert torch.equal(first, torch.rand(2))


def test_checkpoint_ordering_and_names(tmp_path):
    for name in ('checkpoint_00_step000004.pth', 'checkpoint_00.pth', 'checkpoint_01_step000002.pth',
                 'checkpoint_00_step000002.pth', 'checkpoint_best.pth', 'other.pth'):
        (tmp_path / name).write_bytes(b'')
    assert [os.path.basename(p) for p in engine.checkpoints(tmp_path)] == [
        'checkpoint_01_step000002.pth', 'checkpoint_00.pth', 'checkpoint_00_step000004.pth',
        'checkpoint_00_step000002.pth']
