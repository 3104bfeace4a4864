"""What every task script shares, checked on all seven: each speed/memory option takes effect
(training and evaluation), --checkpoint / --resume / --evaluate mean the same everywhere, and
config, data and checkpoint errors end in one `error: ...` line with exit code 2.

Options are checked by their effect where torch sees it (autocast dtypes of the Linear layers in
training and in evaluation, checkpoint() calls, compiled layers, optimiser steps and its fused
flag, DataLoader workers, progress lines), on one-epoch runs of the tiny model.
"""
import json
import logging
import math
import re

import pytest
import torch
import torch.utils.checkpoint
from torch.utils.data import DataLoader

import engine
import Pretrain
import utils
from dataset import loaders
from models import retrieval_eval
from tests.test_resume_tasks import SCRIPTS, Script
from tests.tiny import synthetic_with_pretrained, tiny_config

ALL = {**SCRIPTS, 'pretrain': Script(Pretrain, 'Pretrain.yaml', dict(batch_size=4, queue_size=16), 10,
                                     from_pretrained=False, evaluates=False)}
EVALUATES = {name for name, s in ALL.items() if s.module.__name__ not in ('Pretrain', 'Pretrain_nlvr')}
FAST_TRAIN = ('pretrain', 'retrieval', 'grounding', 'vqa')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    data, pretrained = synthetic_with_pretrained(tmp_path_factory.mktemp('synthetic'))
    for name, script in ALL.items():
        tiny_config(script.template, data, data / f'{name}.yaml', **script.changes,
                    schedular=dict(epochs=1, warmup_epochs=1))
    return data, pretrained


def argv(data, name, output_dir, *extra, checkpoint=True):
    data, pretrained = data
    script = ALL[name]
    with_checkpoint = checkpoint and script.from_pretrained
    return ['--config', str(data / f'{name}.yaml'), '--output_dir', str(output_dir),
            '--device', 'cpu', *(['--checkpoint', str(pretrained)] if with_checkpoint else []),
            *script.args, *extra]


class Spy:
    """Records what reached torch during a run."""

    def __init__(self, monkeypatch):
        self.linear = []       # (module.training, output dtype) of every Linear call
        self.checkpointed = 0  # torch.utils.checkpoint.checkpoint calls
        self.compiled = []     # (module class name, backend) of Module.compile calls
        self.optimizer_steps = 0
        self.micro_batches = 0
        self.optimizers, self.models, self.workers, self.sharding = [], [], [], []
        self.scaler_steps = 0
        self.plain_eval = 0
        spy = self

        linear_forward = torch.nn.Linear.forward
        def linear(module, x):
            out = linear_forward(module, x)
            spy.linear.append((module.training, out.dtype))
            return out
        monkeypatch.setattr(torch.nn.Linear, 'forward', linear)

        checkpoint = torch.utils.checkpoint.checkpoint
        def counted(*args, **kwargs):
            spy.checkpointed += 1
            return checkpoint(*args, **kwargs)
        monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint', counted)
        # Recorded, not compiled: compiling the tiny layers would cost more than the runs; the
        # compiled layers' numerics are tested in test_train_options.
        monkeypatch.setattr(torch.nn.Module, 'compile',
                            lambda module, backend='inductor', **kw: spy.compiled.append(
                                (type(module).__name__, backend)))

        micro_step = engine.micro_step
        def counting_micro_step(*args, **kwargs):
            spy.micro_batches += 1
            return micro_step(*args, **kwargs)
        monkeypatch.setattr(engine, 'micro_step', counting_micro_step)

        create_optimizer = engine.create_optimizer
        def recording_optimizer(config, model, sharding=None):
            optimizer = create_optimizer(config, model, sharding=sharding)
            optimizer.register_step_post_hook(lambda *a: setattr(spy, 'optimizer_steps',
                                                                 spy.optimizer_steps + 1))
            spy.optimizers.append(optimizer)
            spy.sharding.append(sharding)
            return optimizer
        monkeypatch.setattr(engine, 'create_optimizer', recording_optimizer)

        prepare = engine.Run.prepare
        def recording_prepare(run, model, *args, **kwargs):
            spy.models.append(model)
            return prepare(run, model, *args, **kwargs)
        monkeypatch.setattr(engine.Run, 'prepare', recording_prepare)

        class RecordingLoader(DataLoader):
            def __init__(self, *args, **kwargs):
                spy.workers.append(kwargs.get('num_workers', 0))
                super().__init__(*args, **kwargs)
        monkeypatch.setattr(loaders, 'DataLoader', RecordingLoader)

        scaler_step = torch.amp.GradScaler.step
        def counted_scaler_step(scaler, *args, **kwargs):
            spy.scaler_steps += 1
            return scaler_step(scaler, *args, **kwargs)
        monkeypatch.setattr(torch.amp.GradScaler, 'step', counted_scaler_step)

        plain = retrieval_eval.itm_score_matrices_plain
        def counted_plain(*args, **kwargs):
            spy.plain_eval += 1
            return plain(*args, **kwargs)
        monkeypatch.setattr(retrieval_eval, 'itm_score_matrices_plain', counted_plain)

    def dtypes(self, training):
        return {dtype for mode, dtype in self.linear if mode is training}


def options_a(name):
    return ['precision=bf16', 'grad_checkpointing=true', 'accum_steps=2', 'optimizer.fused=true',
            'print_freq=1', 'compile=eager', 'optimizer.lr_scale={visual_encoder: 0.5}']


def options_b(name):
    return (['precision=fp16', 'num_workers=1', 'optimizer_sharding=zero', 'compile=true']
            + (['fast_train=false'] if name in FAST_TRAIN else [])
            + (['fast_eval=false'] if name == 'retrieval' else []))


@pytest.mark.parametrize('name', sorted(ALL))
def test_options_a_take_effect(data, name, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    spy = Spy(monkeypatch)
    ALL[name].module.main(argv(data, name, tmp_path, '--opts', *options_a(name)))
    # precision=bf16: the Linear layers ran in bf16 in training, and in evaluation
    assert spy.dtypes(training=True) == {torch.bfloat16}
    if name in EVALUATES:
        assert torch.bfloat16 in spy.dtypes(training=False)
    assert spy.checkpointed > 0                                            # grad_checkpointing
    assert {cls for cls, _ in spy.compiled} == {'Block', 'BertLayer'}     # compile=eager
    assert {backend for _, backend in spy.compiled} == {'eager'}
    assert spy.optimizer_steps == math.ceil(spy.micro_batches / 2) > 0    # accum_steps=2
    assert spy.optimizers[0].defaults['fused'] is True                    # optimizer.fused
    groups = spy.optimizers[0].param_groups                                # optimizer.lr_scale
    assert {g['lr_scale'] for g in groups} == {1.0, 0.5}
    assert all(g['lr'] == pytest.approx(0.5 * groups[0]['lr']) for g in groups if g['lr_scale'] == 0.5)
    progress = [r.getMessage() for r in caplog.records if 'Train Epoch' in r.getMessage()
                and 'eta:' in r.getMessage()]
    assert len(progress) == spy.micro_batches                             # print_freq=1
    # Retrieval and grounding evaluation show their progress with an ETA too.
    header = {'retrieval': 'Evaluation (ITM re-ranking):', 'grounding': 'Grad-CAM:'}.get(name)
    if header:
        assert any(r.getMessage().startswith(header) and 'eta:' in r.getMessage()
                   for r in caplog.records)
    assert utils.load_config(tmp_path / 'config.yaml')['precision'] == 'bf16'


@pytest.mark.parametrize('name', sorted(ALL))
def test_options_b_take_effect(data, name, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    ALL[name].module.main(argv(data, name, tmp_path, '--opts', *options_b(name)))
    # precision=fp16: fp16 layers in training (with a gradient scaler) and in evaluation
    assert spy.dtypes(training=True) == {torch.float16}
    assert spy.scaler_steps == spy.micro_batches > 0  # one scaled step per batch (accum 1)
    if name in EVALUATES:
        assert torch.float16 in spy.dtypes(training=False)
    assert spy.workers and set(spy.workers) == {1}                       # num_workers=1
    assert spy.sharding == ['zero']  # optimizer_sharding (one process: plain AdamW, warned)
    assert {backend for _, backend in spy.compiled} == {'inductor'}       # compile=true
    if name in FAST_TRAIN:
        assert spy.models[0].fast_train is False                          # fast_train=false
    if name == 'retrieval':
        assert spy.plain_eval == 2                                        # fast_eval=false: val, test


@pytest.mark.parametrize('name', ['ve', 'nlvr', 'pretrain_nlvr'])
def test_fast_train_is_refused_where_the_model_has_one_path(data, name, tmp_path):
    with pytest.raises(utils.ConfigError, match="fast_train' does not apply"):
        ALL[name].module.main(argv(data, name, tmp_path, '--opts', 'fast_train=false'))


def test_fast_eval_is_refused_outside_retrieval(data, tmp_path):
    with pytest.raises(utils.ConfigError, match="key 'fast_eval' does not apply to ve"):
        ALL['ve'].module.main(argv(data, 've', tmp_path, '--opts', 'fast_eval=false'))


# ------------------------------------------------------------- --checkpoint, --resume, --evaluate

@pytest.mark.parametrize('name', sorted(ALL))
def test_checkpoint_starts_and_resume_continues_in_every_script(data, name, tmp_path, monkeypatch):
    loads, resumes = [], []
    load_weights = engine.load_weights
    monkeypatch.setattr(engine, 'load_weights', lambda *a, **k: loads.append(a[1]) or load_weights(*a, **k))
    resume = engine.Run.resume
    monkeypatch.setattr(engine.Run, 'resume', lambda run, path=None: resumes.append(path) or resume(run, path))
    module, first = ALL[name].module, tmp_path / 'first'

    # --resume in a folder without checkpoints: the run starts as without it, from --checkpoint
    module.main(argv(data, name, first, '--resume'))
    assert resumes == [None] and len(loads) == int(ALL[name].from_pretrained)
    written = engine.checkpoints(first)
    assert written, 'the epoch left a checkpoint'
    for path in [*written, *first.glob('checkpoint_best.pth')]:  # plain data: no unpickling
        assert torch.load(path, weights_only=True)['model']

    # --checkpoint is weights only: a new run from the first one's checkpoint trains epoch 0 again
    loads.clear()
    second = tmp_path / 'second'
    module.main(argv(data, name, second, checkpoint=False) + ['--checkpoint', written[0]])
    assert loads == [written[0]] and len(resumes) == 1
    assert [e['epoch'] for e in _log(second) if 'epoch' in e][:1] == [0]

    # --resume PATH continues from that file (its epoch is done: nothing left to train), and
    # --checkpoint is not loaded over it
    loads.clear()
    third = tmp_path / 'third'
    module.main(argv(data, name, third, '--resume', written[0]))
    assert resumes[-1] == written[0] and loads == []
    assert not any('train_loss' in e or 'train_loss_ita' in e for e in _log(third))


def _log(folder):
    path = folder / 'log.txt'
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize('name', sorted(EVALUATES))
def test_evaluate_needs_a_checkpoint_in_every_script(data, name, tmp_path):
    with pytest.raises(utils.ConfigError, match='--evaluate needs --checkpoint'):
        ALL[name].module.main(argv(data, name, tmp_path / 'out', '--evaluate', checkpoint=False))
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('name', ['pretrain', 'pretrain_nlvr'])
def test_training_only_scripts_have_no_evaluate(data, name, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        ALL[name].module.main(argv(data, name, tmp_path, '--evaluate'))
    assert exit_.value.code == 2 and 'unrecognized arguments: --evaluate' in capsys.readouterr().err


# ---------------------------------------------------------------------------- one-line errors

def _bad_config(data, name, tmp_path):
    config = utils.load_config(data[0] / f'{name}.yaml')
    config['quee_size'] = 16
    path = tmp_path / 'bad.yaml'
    utils.save_config(config, path)
    return path


ERRORS = {
    'unknown key': (lambda d, n, t: ['--opts', 'quee_size=1'], r"unknown config key 'quee_size'"),
    'key in the file': (lambda d, n, t: None, r"unknown key 'quee_size'"),
    'missing file': (lambda d, n, t: ['--config', str(t / 'nowhere.yaml')], r'config file not found'),
    'not a checkpoint': (lambda d, n, t: (t / 'junk.pth').write_bytes(b'not a checkpoint') and
                         ['--checkpoint', str(t / 'junk.pth')], r"junk.pth' is unreadable"),
}


@pytest.mark.parametrize('error', sorted(ERRORS))
@pytest.mark.parametrize('name', sorted(ALL))
def test_errors_are_one_line_with_exit_code_2(data, name, error, tmp_path, capsys):
    extra, message = ERRORS[error]
    args = argv(data, name, tmp_path / 'out', checkpoint=False)
    change = extra(data, name, tmp_path)
    if change is None:
        args[1] = str(_bad_config(data, name, tmp_path))
    elif change[0] == '--config':
        args[1] = change[1]
    else:
        args += change
    with pytest.raises(SystemExit) as exit_:
        utils.run(ALL[name].module.main, args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    assert re.search(message, lines[0]), lines[0]


def test_debug_shows_the_traceback(data, tmp_path):
    args = argv(data, 've', tmp_path, '--opts', 'quee_size=1', '--debug')
    with pytest.raises(utils.ConfigError, match='quee_size'):
        utils.run(ALL['ve'].module.main, args)


@pytest.mark.parametrize('name', sorted(ALL))
def test_help_names_every_flag_and_ends_with_the_examples(name, capsys, monkeypatch):
    parsers = []
    parse_args = utils.argparse.ArgumentParser.parse_args
    monkeypatch.setattr(utils.argparse.ArgumentParser, 'parse_args',
                        lambda parser, *a, **k: parsers.append(parser) or parse_args(parser, *a, **k))
    with pytest.raises(SystemExit) as exit_:
        ALL[name].module.main(['--help'])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(action.help for action in parsers[0]._actions), 'a flag without help'
    assert '--resume [PATH]' in text and '(default: 42)' in text  # --seed's default is shown
    # the docstring's usage examples end the help, as written
    assert text.rstrip().splitlines()[-1] == ALL[name].module.__doc__.rstrip().splitlines()[-1]
    assert 'torchrun --nproc_per_node=8' in text or name == 'pretrain' and 'torchrun' in text


def test_resume_refuses_a_folder_whose_checkpoints_are_all_unreadable(data, tmp_path):
    (tmp_path / 'checkpoint_00.pth').write_bytes(b'torn')
    (tmp_path / 'checkpoint_01.pth').write_bytes(b'')
    with pytest.raises(engine.CheckpointError, match='no checkpoint in .* is readable '
                                                     r'\(checkpoint_01.pth, checkpoint_00.pth\)'):
        ALL['pretrain'].module.main(argv(data, 'pretrain', tmp_path, '--resume'))


@pytest.mark.parametrize('name', sorted(ALL))
def test_a_new_run_refuses_a_folder_holding_an_earlier_run(data, name, tmp_path):
    """Runs never mix: a later --resume would continue from the earlier run's checkpoints."""
    earlier = tmp_path / 'earlier'
    earlier.mkdir()
    (earlier / 'checkpoint_01.pth').write_bytes(b'an earlier run')
    (earlier / 'log.txt').write_text('{"epoch": 1}\n')
    with pytest.raises(utils.ConfigError, match=r'holds an earlier run \(checkpoint_01.pth, '
                                                r'log.txt\): continue it with --resume'):
        ALL[name].module.main(argv(data, name, earlier))
    assert sorted(p.name for p in earlier.iterdir()) == ['checkpoint_01.pth', 'log.txt']


def test_partial_checkpoint_writes_of_a_killed_process_are_removed(data, tmp_path, caplog):
    out = tmp_path / 'out'
    out.mkdir()
    partial = out / '.checkpoint_00.pth.x1y2.tmp'
    partial.write_bytes(b'half a checkpoint')
    with caplog.at_level(logging.WARNING, logger='engine'):
        ALL['ve'].module.main(argv(data, 've', out, '--resume'))
    assert not partial.exists() and 'unfinished write of a killed process' in caplog.text
    assert engine.checkpoints(out)


@pytest.mark.parametrize('name', ['pretrain', 'retrieval', 'grounding', 'pretrain_nlvr'])
def test_a_diverged_step_reaches_the_skip_policy_on_the_fast_path(data, name, tmp_path, monkeypatch):
    """NaN similarities make the hard-negative weights NaN: the step's loss is skipped by
    skip_nonfinite_steps instead of torch.multinomial raising inside the model."""
    module = ALL[name].module
    make_train_step = module.make_train_step

    def diverging_at_step_1(*args, **kwargs):
        train_step, calls = make_train_step(*args, **kwargs), []

        def step(model, batch, alpha):
            calls.append(1)
            if len(calls) == 2:
                batch = [torch.full_like(x, float('nan')) if torch.is_tensor(x) and x.is_floating_point()
                         else x for x in batch]
            return train_step(model, batch, alpha)
        return step
    monkeypatch.setattr(module, 'make_train_step', diverging_at_step_1)
    out = tmp_path / 'out'
    module.main(argv(data, name, out, '--opts', 'skip_nonfinite_steps=1'))
    checkpoint = torch.load(engine.checkpoints(out)[0], weights_only=True)
    assert checkpoint['resume']['skipped_nonfinite_steps'] == 1
    # the skipped step left nothing non-finite behind (weights, momentum encoders, queues)
    assert all(torch.isfinite(v).all() for v in checkpoint['model'].values() if v.is_floating_point())


def _with_missing_image(record):
    """A copy of `record` whose image path(s) name files that do not exist."""
    missing = {'image': 'no/such/image', 'images': ['no/such/image_0', 'no/such/image_1']}
    return {**record, **{key: value for key, value in missing.items() if key in record}}


@pytest.mark.parametrize('name', sorted(ALL))
def test_every_script_logs_the_samples_it_skipped(data, name, tmp_path):
    config = utils.load_config(data[0] / f'{name}.yaml')
    train_files = config['train_file'] if isinstance(config['train_file'], list) else [config['train_file']]
    records = json.loads(open(train_files[0]).read())
    broken = tmp_path / 'train.json'
    # more copies than a batch holds: the incomplete last batch that is dropped cannot hold all
    broken.write_text(json.dumps([_with_missing_image(records[0])] * 10 + records))
    out = tmp_path / 'out'
    train_file = f'[{json.dumps(str(broken))}]' if isinstance(config['train_file'], list) else broken
    ALL[name].module.main(argv(data, name, out, '--opts', 'on_bad_sample=skip',
                               f'train_file={train_file}'))
    trained = [entry for entry in _log(out) if any(k.startswith('train_') for k in entry)]
    assert trained and trained[0]['skipped_samples'] >= 1
    assert trained[0]['skipped_nonfinite_steps'] == 0
