"""What a run leaves to read: per-step scalars in log_steps.jsonl (and TensorBoard events when
asked), run_info.json, and tools/plot_log.py's curves of any run."""
import json

import pytest

import utils
from tests.test_scripts_common import ALL, argv, data  # noqa: F401 (the module's fixture)
from tools import plot_log


@pytest.mark.parametrize('name', ['pretrain', 've'])
def test_every_step_is_logged_with_its_losses_lr_and_throughput(data, name, tmp_path):  # noqa: F811
    out = tmp_path / 'out'
    ALL[name].module.main(argv(data, name, out))
    records = utils.read_step_log(out)
    assert len(records) >= 3 and [r['step'] for r in records] == list(range(1, len(records) + 1))
    assert all(r['epoch'] == 0 and r['lr'] > 0 for r in records)
    assert all(any(k.startswith('loss') for k in r) for r in records)
    assert all(r['samples_per_s'] > 0 for r in records[1:])
    info = json.loads((out / 'run_info.json').read_text())['runs']
    assert len(info) == 1 and info[0]['world_size'] == 1
    assert info[0]['versions']['torch'] and info[0]['argv']
    assert info[0]['git_commit'] is None or len(info[0]['git_commit']) >= 40


def test_a_resumed_run_adds_its_start_and_keeps_one_record_per_step(data, tmp_path, monkeypatch):  # noqa: F811
    import engine
    from tests.test_resume_tasks import Killed, kill
    out = tmp_path / 'out'
    kill(monkeypatch, after_steps=2)
    with pytest.raises(Killed):
        ALL['ve'].module.main(argv(data, 've', out, '--opts', 'checkpoint_every_steps=1'))
    monkeypatch.delenv(engine.EXIT_AFTER_STEPS_ENV)
    ALL['ve'].module.main(argv(data, 've', out, '--resume', '--opts', 'checkpoint_every_steps=1'))
    assert [r['step'] for r in utils.read_step_log(out)] == [1, 2, 3]
    assert len(json.loads((out / 'run_info.json').read_text())['runs']) == 2


def test_tensorboard_events_when_asked(data, tmp_path):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / 'out'
    ALL['ve'].module.main(argv(data, 've', out, '--opts', 'tensorboard=true'))
    events = EventAccumulator(str(out / 'tensorboard'))
    events.Reload()
    assert {'train/loss', 'train/lr'} <= set(events.Tags()['scalars'])
    assert [e.step for e in events.Scalars('train/loss')] == [1, 2, 3]


def test_plot_log_draws_steps_or_epochs(data, tmp_path):  # noqa: F811
    out = tmp_path / 'run'
    ALL['ve'].module.main(argv(data, 've', out))
    png = plot_log.plot_runs([out, out], tmp_path / 'loss.png', title='ve', smooth=2)
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert plot_log.loss_curves(out)[0] == 'step'
    # a run of the original layout: log.txt only
    old = tmp_path / 'old'
    old.mkdir()
    (old / 'log.txt').write_text('{"train_loss_ita": "1.5", "epoch": 0}\n'
                                 '{"train_loss_ita": "1.2", "epoch": 1}\n')
    assert plot_log.loss_curves(old) == ('epoch', {'loss_ita': [(0, 1.5), (1, 1.2)]})
    with pytest.raises(FileNotFoundError, match='neither log_steps.jsonl nor log.txt'):
        plot_log.loss_curves(tmp_path / 'nowhere')
