"""Exact resumption of the fine-tuning scripts (Retrieval, Grounding, VQA, NLVR, VE and the NLVR2
text-assignment pre-training): a run killed inside an epoch, or during the evaluation that follows
an epoch, and resumed with --resume ends with the same parameters, optimizer state, metrics and
best epoch as a run never interrupted.

The kill is the ALBEF_EXIT_AFTER_STEPS hook of engine.Run, made to raise instead of
ending the process so that everything runs in this process (a subprocess per run would cost
more than the runs); nothing in the scripts catches it, so no checkpoint is written on the way
out. tests/test_resume.py kills real processes (Pretrain.py, one process and torchrun).
"""
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import Grounding
import NLVR
import Pretrain_nlvr
import Retrieval
import VE
import VQA
import engine
from tests.tiny import ROOT, python_path, synthetic_with_pretrained, tiny_config


class Killed(BaseException):
    """Raised where the process would have ended (not an Exception: nothing catches it)."""


@dataclass(frozen=True)
class Script:
    module: object
    template: str
    changes: dict
    steps_per_epoch: int     # single process, on the tiny synthetic data
    from_pretrained: bool = True
    args: tuple = ()
    evaluates: bool = True   # evaluates after each epoch (engine.Run's `evaluates`)


SCRIPTS = {
    'retrieval': Script(Retrieval, 'Retrieval.yaml', dict(batch_size_train=8, batch_size_test=8,
                                                          queue_size=16, k_test=4), 7),
    'grounding': Script(Grounding, 'Grounding.yaml', dict(batch_size=8, queue_size=16), 8,
                        args=('--block_num', '1')),
    'vqa': Script(VQA, 'VQA.yaml', dict(batch_size_train=8, batch_size_test=4, k_test=4), 5,
                  evaluates=False),
    # from a random initialisation: a text-assignment checkpoint would need its own run
    'nlvr': Script(NLVR, 'NLVR.yaml', dict(batch_size=8), 3, from_pretrained=False),
    've': Script(VE, 'VE.yaml', dict(batch_size_train=8, batch_size_test=16), 3),
    'pretrain_nlvr': Script(Pretrain_nlvr, 'NLVR_pretrain.yaml', dict(batch_size=8), 3,
                            evaluates=False),
}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    data, pretrained = synthetic_with_pretrained(tmp_path_factory.mktemp('synthetic'))
    for name, script in SCRIPTS.items():
        # a step checkpoint one step into epoch 1, none in epoch 0
        # loader workers as in every shipped config: their RNG use must not shift a resumed run
        tiny_config(script.template, data, data / f'{name}.yaml', **script.changes,
                    num_workers=2,
                    checkpoint_every_steps=script.steps_per_epoch + 1, keep_checkpoints=2,
                    schedular=dict(epochs=2, warmup_epochs=1))
    return data, pretrained, tmp_path_factory.mktemp('uninterrupted'), {}


def run(setup, name, output_dir, *extra):
    data, pretrained, _, _ = setup
    script = SCRIPTS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return script.module.main([
            '--config', str(data / f'{name}.yaml'), '--output_dir', str(output_dir), '--device', 'cpu',
            *(['--checkpoint', str(pretrained)] if script.from_pretrained else []),
            *script.args, *extra])
    finally:
        torch.set_num_threads(threads)


def uninterrupted(setup, name):
    """(output folder, result) of the run never interrupted, once per script."""
    _, _, folder, done = setup
    if name not in done:
        done[name] = folder / name, run(setup, name, folder / name)
    return done[name]


def final_checkpoint(output_dir):
    return torch.load(engine.checkpoints(output_dir)[0], weights_only=False)


def assert_same_training_state(a_dir, b_dir, epoch=1):
    a, b = final_checkpoint(a_dir), final_checkpoint(b_dir)
    assert a['epoch'] == b['epoch'] == epoch
    assert a['model'].keys() == b['model'].keys()
    different = [key for key in a['model'] if not torch.equal(a['model'][key], b['model'][key])]
    assert not different, f'resumed run differs from the uninterrupted one in {different[:5]}'
    for index, state in a['optimizer']['state'].items():
        for key, value in state.items():
            assert torch.equal(value, b['optimizer']['state'][index][key]), (index, key)
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']
    assert a['lr_scheduler'] == b['lr_scheduler']


def read_log(folder):
    return [json.loads(line) for line in (folder / 'log.txt').read_text().splitlines()]


def without_train_stats(log):
    return [{k: v for k, v in entry.items() if not k.startswith('train_')} for entry in log]


def metrics(name, result):
    """What a script returns that a resumed run must reproduce: its metrics and best epoch
    (Pretrain_nlvr returns training averages, which a resumed run has for its last part only)."""
    if name == 'pretrain_nlvr':
        return None
    return {k: v for k, v in result.items() if not k.endswith('_file')}  # VQA: paths differ


def kill(monkeypatch, after_steps=None):
    def exit_abruptly(code):
        raise Killed(code)
    monkeypatch.setattr(engine, 'exit_abruptly', exit_abruptly)
    if after_steps is not None:
        monkeypatch.setenv(engine.EXIT_AFTER_STEPS_ENV, str(after_steps))


@pytest.mark.parametrize('name', SCRIPTS)
def test_killed_inside_an_epoch_and_resumed_equals_uninterrupted(setup, name, tmp_path, monkeypatch):
    script, steps = SCRIPTS[name], SCRIPTS[name].steps_per_epoch
    whole, expected = uninterrupted(setup, name)
    killed = tmp_path / 'killed'

    # killed after step 2 of epoch 1: the newest checkpoint is after its step 1
    kill(monkeypatch, after_steps=steps + 2)
    with pytest.raises(Killed):
        run(setup, name, killed)
    monkeypatch.delenv(engine.EXIT_AFTER_STEPS_ENV)
    newest = engine.checkpoints(killed)[0]
    assert newest.endswith('checkpoint_01_step000001.pth')
    epoch_end = 'checkpoint_00_step%06d.pth' % steps if script.evaluates else 'checkpoint_00.pth'
    assert (killed / epoch_end).is_file()
    state = torch.load(newest, weights_only=False)['resume']
    assert (state['epoch'], state['step'], state['epoch_trained']) == (1, 1, False)
    if script.evaluates:  # the best epoch so far travels in the checkpoint
        assert state['best']['epoch'] == 0 and state['best']['value'] >= 0

    result = run(setup, name, killed, '--resume')
    assert_same_training_state(whole, killed)
    assert metrics(name, result) == metrics(name, expected)
    # each epoch logged once, with the same evaluation (epoch 1's training averages cover the
    # steps after the resumed checkpoint only)
    assert without_train_stats(read_log(killed)) == without_train_stats(read_log(whole))


@pytest.mark.parametrize('name, evaluation', [('ve', 'evaluate_accuracy'),
                                              ('retrieval', 'evaluation'),
                                              ('vqa', 'answer_questions')])
def test_killed_during_evaluation_and_resumed_evaluates_that_epoch(setup, name, evaluation,
                                                                   tmp_path, monkeypatch):
    """Killed in the first evaluation (after epoch 0; for VQA, after the last epoch): the resumed
    run does not train that epoch again, evaluates it, and ends as the uninterrupted run."""
    whole, expected = uninterrupted(setup, name)
    killed = tmp_path / 'killed'
    module = engine if evaluation == 'evaluate_accuracy' else SCRIPTS[name].module
    original = getattr(module, evaluation)

    def dies(*args, **kwargs):
        raise Killed()
    monkeypatch.setattr(module, evaluation, dies)
    with pytest.raises(Killed):
        run(setup, name, killed)
    monkeypatch.setattr(module, evaluation, original)
    resumed_from = engine.checkpoints(killed)[0]
    position = torch.load(resumed_from, weights_only=False)['resume']
    result = run(setup, name, killed, '--resume')

    assert_same_training_state(whole, killed)
    assert metrics(name, result) == metrics(name, expected)
    # every epoch evaluated and logged once, with the averages of its whole training
    assert read_log(killed) == read_log(whole)
    if name == 'vqa':
        assert resumed_from.endswith('checkpoint_01.pth')
        assert (position['epoch'], position['step']) == (2, 0)  # training finished
        for result_file in ('vqa_result_epoch1.json', 'vqa_val_result_epoch1.json'):
            assert ((killed / 'result' / result_file).read_text()
                    == (whole / 'result' / result_file).read_text())
    else:
        steps = SCRIPTS[name].steps_per_epoch
        assert resumed_from.endswith('checkpoint_00_step%06d.pth' % steps)
        assert (position['epoch'], position['step'], position['epoch_trained']) == (0, steps, True)


def run_process(setup, name, output_dir, *extra, exit_after=None):
    """The script as its own process (one intra-op thread, as `run`), killed by the engine's
    abrupt-exit hook (no clean-up, as kill -9) once `exit_after` steps are done."""
    data, pretrained, _, _ = setup
    script = SCRIPTS[name]
    env = {**os.environ, 'PYTHONPATH': python_path(), 'OMP_NUM_THREADS': '1'}
    env.pop(engine.EXIT_AFTER_STEPS_ENV, None)
    if exit_after is not None:
        env[engine.EXIT_AFTER_STEPS_ENV] = str(exit_after)
    cmd = [sys.executable, f'{script.module.__name__}.py', '--config', str(data / f'{name}.yaml'),
           '--output_dir', str(output_dir), '--device', 'cpu',
           *(['--checkpoint', str(pretrained)] if script.from_pretrained else []),
           *script.args, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('name', ['retrieval', 've'])
def test_killed_processes_resume_exactly_with_loader_workers(setup, name, tmp_path):
    """Real processes with loader workers (the shipped configs have them), three epochs: killed
    in epoch 0, resumed and killed again in epoch 1, resumed to the end: the same final state
    and evaluations as the run never interrupted. (Persistent evaluation workers that drew
    from the global RNG on their first use only shifted everything after a resumed epoch.)"""
    opts = ('--opts', 'schedular.epochs=3', 'checkpoint_every_steps=2')
    whole = tmp_path / 'whole'
    run(setup, name, whole, *opts)
    steps, killed = SCRIPTS[name].steps_per_epoch, tmp_path / 'killed'
    first = run_process(setup, name, killed, *opts, exit_after=3)
    assert first.returncode == 75, first.stderr[-2000:]
    assert engine.checkpoints(killed)[0].endswith('checkpoint_00_step000002.pth')
    second = run_process(setup, name, killed, '--resume', *opts, exit_after=steps + 2)
    assert second.returncode == 75, second.stderr[-2000:]
    assert 'resumed from' in second.stdout + second.stderr
    assert os.path.basename(engine.checkpoints(killed)[0]).startswith('checkpoint_01_step')
    last = run_process(setup, name, killed, '--resume', *opts)
    assert last.returncode == 0, last.stderr[-2000:]
    assert_same_training_state(whole, killed, epoch=2)
    assert without_train_stats(read_log(killed)) == without_train_stats(read_log(whole))
