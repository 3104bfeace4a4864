"""demo.py end to end on the tiny synthetic preset with a tiny model (one epoch per stage), its
resumption, and the chance / text-only reference levels of dataset/baselines.py."""
import json
import shutil
from types import SimpleNamespace

import pytest

import demo
from dataset.baselines import (classification_baselines, grounding_chance, retrieval_chance,
                               vqa_baselines)
from dataset.grounding_dataset import load_refer
from dataset.synthetic import generate
from tests.tiny import tiny_config


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A copy of the repository's data/synthetic + configs/tiny layout with smaller settings."""
    work = tmp_path_factory.mktemp('demo')
    data = work / 'data' / 'synthetic'
    generate(data, seed=0, size='tiny')
    configs = work / 'configs' / 'tiny'
    configs.mkdir(parents=True)
    one_epoch = dict(schedular=dict(epochs=1))
    settings = {
        'Pretrain.yaml': dict(batch_size=4, queue_size=16, **one_epoch),
        'Retrieval.yaml': dict(batch_size_train=4, batch_size_test=8, queue_size=16, k_test=4,
                               **one_epoch),
        'VQA.yaml': dict(batch_size_train=8, batch_size_test=4, k_test=4, **one_epoch),
        'NLVR_pretrain.yaml': dict(batch_size=4),
        'NLVR.yaml': dict(batch_size=8, **one_epoch),
        'VE.yaml': dict(batch_size_train=8, batch_size_test=16, **one_epoch),
        'Grounding.yaml': dict(batch_size=4, queue_size=16, **one_epoch),
    }
    for name, changes in settings.items():
        tiny_config(name, data, configs / name, unimodal_init=True, **changes)
    return work


@pytest.fixture(autouse=True)
def tiny_demo(monkeypatch):
    monkeypatch.setattr(demo, 'DATA_SPEC', dict(seed=0, size='tiny'))
    monkeypatch.setattr(demo, 'UNIMODAL_INIT', ['--vit_scenes', '16', '--bert_steps', '4',
                                                '--batch_size', '8'])


def test_demo_runs_every_stage_then_skips_them(workdir, tmp_path, capsys):
    """The whole demo, its fine-tuning stages in two parallel lanes (the CPU default)."""
    out = tmp_path / 'demo'
    results = demo.run(out, 'cpu', workdir=workdir, jobs=2)
    for task in demo.TASKS:
        r = results[task]
        assert 0 <= r['value'] <= (100 if '%' in r['metric'] else 1), task
        assert r['chance'] is not None and r['seconds'] > 0
    assert results['vqa']['text_only'] is not None and results['nlvr']['text_only'] is not None
    similarity = results['vqa']['question_similarity']  # cosines of different questions' states
    assert set(similarity) == {'pretrained', 'fine-tuned'}
    assert all(-1 <= v <= 1 for v in similarity.values())
    assert (out / 'results.json').is_file()
    assert json.loads((out / 'results.json').read_text())['vqa']['value'] == results['vqa']['value']
    assert all((out / 'stages' / f'{name}.json').is_file() for name, _, _ in demo.STAGES)
    plots = results['report']['plots']
    assert {p.split('loss_')[-1] for p in plots} >= {'pretrain.png', 'vqa.png', 'grounding.png'}
    overlays = results['report']['gradcam']
    assert overlays and all((tmp_path / o / '00_average.png').is_file() for o in overlays)
    log = capsys.readouterr().out
    assert '[demo] stage 3/10 pretrain' in log and 'ETA' in log
    assert ('[demo] 6 stages in 2 parallel lanes: retrieval, vqa, nlvr_pretrain, nlvr, ve, '
            'grounding | elapsed') in log
    assert results['lanes'] == [['vqa'], ['retrieval', 'nlvr_pretrain', 'nlvr', 've', 'grounding']]
    for name in demo.PARALLEL:  # each reported as it finished, its output in its lane's log
        assert f'[demo] {name} finished in lane ' in log
    assert 'val VQA accuracy' in (out / 'logs' / 'lane1.log').read_text()

    table = demo.results_table(results)
    assert all(task in table for task in demo.TASKS)
    # per question type / statement kind: the records of each split, the model's accuracy there
    # adding up to the task's metric (NLVR2 / SNLI-VE: the inference API's predictions agree
    # with the script's evaluation)
    for task in ('vqa', 'nlvr', 've'):
        groups = results[task]['groups']
        assert 'other' not in groups and all({'value', 'chance', 'text_only'} <= set(g) for g in groups.values())
        total = sum(g['n'] for g in groups.values())
        assert sum(g['n'] * g['value'] for g in groups.values()) / total == pytest.approx(results[task]['value'])
        assert sum(g['n'] * g['text_only'] for g in groups.values()) / total == pytest.approx(results[task]['text_only'])
    assert 'count' in demo.groups_table(results)

    # A second call finds every stage done: nothing is re-run, the figures are the same.
    again = demo.run(out, 'cpu', workdir=workdir)
    assert again['vqa']['value'] == results['vqa']['value']
    assert capsys.readouterr().out.count('done before, skipped') == len(demo.STAGES)


def test_lanes_balance_the_expected_time_and_keep_nlvr_after_its_text_assignment():
    lanes, longest = demo.plan_lanes(list(demo.PARALLEL), 2)
    assert lanes == [['vqa'], ['retrieval', 'nlvr_pretrain', 'nlvr', 've', 'grounding']]
    expected = {name: seconds for name, seconds, _ in demo.STAGES}
    assert longest == max(sum(expected[n] for n in lane) for lane in lanes)
    assert demo.plan_lanes(['nlvr', 've'], 2)[0] == [['nlvr'], ['ve']]  # its step done before
    assert demo.plan_lanes(['nlvr_pretrain', 'nlvr'], 4)[0] == [['nlvr_pretrain', 'nlvr']]
    assert demo.plan_lanes(list(demo.PARALLEL), 1)[0] == [
        ['retrieval', 'vqa', 'nlvr_pretrain', 'nlvr', 've', 'grounding']]
    # the ETA: the stages before and after the lanes, plus the longest lane
    names = [name for name, _, _ in demo.STAGES]
    assert demo.expected_seconds(names, 1) == sum(expected.values())
    assert demo.expected_seconds(names, 2) == sum(
        expected[n] for n in names if n not in demo.PARALLEL) + longest
    assert demo.expected_seconds(['ve'], 2) == expected['ve']


def test_a_failed_lane_names_its_log_and_the_other_lane_finishes(workdir, tmp_path):
    work = tmp_path / 'work'
    shutil.copytree(workdir / 'configs', work / 'configs')  # a private copy to break
    (work / 'data').symlink_to(workdir / 'data', target_is_directory=True)
    retrieval = work / 'configs' / 'tiny' / 'Retrieval.yaml'
    retrieval.write_text(retrieval.read_text() + '\nbatch_szie_train: 4\n')
    out = tmp_path / 'demo'
    with pytest.raises(RuntimeError, match=r'lane \d \(retrieval\) ended with exit status 1: see .*lane\d.log'):
        demo.run(out, 'cpu', workdir=work, stages=['data', 'init', 'pretrain', 'retrieval', 've'],
                 jobs=2)
    assert (out / 'stages' / 've.json').is_file()  # the other lane's stage is kept
    assert not (out / 'stages' / 'retrieval.json').exists()
    logs = ''.join(p.read_text() for p in (out / 'logs').glob('lane*.log'))
    assert 'batch_szie_train' in logs


def test_jobs_default_to_two_lanes_on_a_multicore_cpu_and_refuse_zero(monkeypatch, capsys):
    monkeypatch.setattr(demo, 'usable_cores', lambda: 2)
    assert demo.default_jobs('cpu') == 2 and demo.default_jobs('cuda') == 1
    monkeypatch.setattr(demo, 'usable_cores', lambda: 1)
    assert demo.default_jobs('cpu') == 1
    with pytest.raises(SystemExit):
        demo.main(['--jobs', '0'])
    assert '--jobs 0: at least 1' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(['--workdir', '/nonexistent/albef'])
    assert '--workdir /nonexistent/albef: no such folder' in capsys.readouterr().err


def test_demo_continues_after_a_lost_stage(workdir, tmp_path):
    out = tmp_path / 'demo'
    demo.run(out, 'cpu', workdir=workdir, stages=['data', 'init', 'pretrain', 've'])
    first = json.loads((out / 'stages' / 've.json').read_text())
    (out / 'stages' / 've.json').unlink()  # as if the run was killed during VE
    again = demo.run(out, 'cpu', workdir=workdir, stages=['data', 'init', 'pretrain', 've'])
    assert again['ve']['value'] == first['value']  # same checkpoint, same seed
    assert again['pretrain']['seconds'] == json.loads(
        (out / 'stages' / 'pretrain.json').read_text())['seconds']  # not re-run



def test_demo_runs_stages_again_after_the_settings_change(workdir, tmp_path, capsys):
    work = tmp_path / 'work'
    shutil.copytree(workdir / 'configs', work / 'configs')  # a private copy to edit
    (work / 'data').symlink_to(workdir / 'data', target_is_directory=True)
    out = tmp_path / 'demo'
    demo.run(out, 'cpu', workdir=work, stages=['data', 'init'])
    (out / 'init' / 'kept.txt').parent.mkdir(exist_ok=True)
    (out / 'init' / 'kept.txt').write_text('written by the finished run')
    demo.run(out, 'cpu', workdir=work, stages=['data', 'init'])
    assert capsys.readouterr().out.count('done before, skipped') == 2
    assert (out / 'init' / 'kept.txt').is_file()  # same settings: nothing removed

    ve = work / 'configs' / 'tiny' / 'VE.yaml'
    ve.write_text(ve.read_text() + '\n# edited\n')
    demo.run(out, 'cpu', workdir=work, stages=['data', 'init'])
    log = capsys.readouterr().out
    assert 'changed since the stages' in log and 'done before, skipped' not in log
    assert not (out / 'init' / 'kept.txt').exists()  # the stale stage's folder was removed
    assert (out / 'stages' / 'init.json').is_file()



def test_data_stage_regenerates_a_folder_with_a_damaged_manifest(tmp_path):
    with demo.in_directory(tmp_path):
        assert demo.stage_data(None) == {}  # absent: written
        assert demo.stage_data(None) == {'reused': demo.DATA}
        manifest = tmp_path / demo.DATA / 'manifest.json'
        manifest.write_text('{"seed": 0, "si')  # cut off mid-write
        (tmp_path / demo.DATA / 'init').mkdir()
        assert demo.stage_data(None) == {}
        assert json.loads(manifest.read_text())['seed'] == 0
        assert not (tmp_path / demo.DATA / 'init').exists()  # weights of unknown data dropped

def test_eta_ignores_stages_that_reused_files(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, 'STAGES', [('a', 100, lambda ctx: {'reused': 'files'}),
                                         ('b', 200, lambda ctx: {})])
    demo.run(tmp_path / 'demo', 'cpu', workdir=workdir)
    log = capsys.readouterr().out
    # the instant reuse of stage a must not make the machine look 100x faster than expected
    assert 'stage 2/2 b | elapsed 0m00s | ETA 3m20s' in log

def test_retrieval_chance_matches_a_direct_count():
    # 2 images with 2 captions each among 4 texts: image->text R@1 = 2/4, R@5 = 1; text->image
    # R@1 = 1/2.
    chance = retrieval_chance([[0, 1], [2, 3]], 4)
    assert chance['txt_r1'] == pytest.approx(50) and chance['txt_r5'] == pytest.approx(100)
    assert chance['img_r1'] == pytest.approx(50) and chance['img_r10'] == pytest.approx(100)
    # one caption per image among 100: both directions k / 100
    chance = retrieval_chance([[i] for i in range(100)], 100)
    assert chance['txt_r5'] == pytest.approx(5) and chance['img_r10'] == pytest.approx(10)
    assert chance['r_mean'] == pytest.approx((1 + 5 + 10) / 3)


def test_vqa_baselines():
    train = [{'question': 'What colour is the circle?', 'answer': ['red'] * 6 + ['blue'] * 4},
             {'question': 'What colour is the circle?', 'answer': ['red'] * 10},
             {'question': 'How many shapes?', 'answer': ['two'] * 10}]
    evaluation = [{'question': 'what colour is the circle', 'answer': ['blue'] * 10},
                  {'question': 'Is there a cross?', 'answer': ['yes'] * 10}]
    levels = vqa_baselines(train, evaluation, ['red', 'blue', '2', 'yes'])
    # text-only: 'red' for the seen question (wrong), the most frequent answer 'red' otherwise
    assert levels['text_only'] == 0
    # chance: each question has one right answer among 4 candidates
    assert levels['chance'] == pytest.approx(0.25)


def test_classification_baselines():
    train = [{'sentence': 'A red circle.', 'label': 'True'},
             {'sentence': 'a red circle', 'label': 'True'},
             {'sentence': 'a blue square', 'label': 'False'},
             {'sentence': 'a blue square', 'label': 'False'},
             {'sentence': 'a green cross', 'label': 'False'}]
    evaluation = [{'sentence': 'a red circle', 'label': 'True'},
                  {'sentence': 'a yellow diamond', 'label': 'True'}]
    levels = classification_baselines(train, evaluation)
    assert levels == {'chance': 0.5, 'majority': 0.0, 'text_only': 0.5}


def test_grounding_chance_on_the_synthetic_detections(tmp_path):
    generate(tmp_path, seed=0, size='tiny')
    refer = load_refer(tmp_path, 'refcoco+', 'unc')
    dets = json.loads((tmp_path / 'dets.json').read_text())
    chance = grounding_chance(refer, dets)
    for key in ('val_d', 'testA_d', 'testB_d'):
        assert 0 < chance[key] < 1, chance

    # hand-made: image 10 has 1 good box of 2, image 11 one good box of 4 for each ref
    fake = SimpleNamespace(
        Refs={1: {'split': 'val', 'image_id': 10}, 2: {'split': 'testA', 'image_id': 11},
              3: {'split': 'testB', 'image_id': 11}, 4: {'split': 'train', 'image_id': 12}},
        refToAnn={1: {'bbox': [0, 0, 10, 10]}, 2: {'bbox': [0, 0, 10, 10]},
                  3: {'bbox': [20, 20, 10, 10]}, 4: {'bbox': [0, 0, 1, 1]}})
    boxes = {'10': [[0, 0, 10, 10], [50, 50, 5, 5]],
             '11': [[0, 0, 10, 10, 1], [20, 20, 10, 10, 1], [40, 40, 5, 5, 1], [60, 60, 5, 5, 1]],
             '12': []}
    assert grounding_chance(fake, boxes) == {'val_d': 0.5, 'testA_d': 0.25, 'testB_d': 0.25}


def test_question_similarity_is_one_for_the_same_question(workdir, tmp_path, monkeypatch):
    """The collapse measure: one question asked four times gives identical fused states."""
    out = tmp_path / 'demo'
    demo.run(out, 'cpu', workdir=workdir, stages=['data', 'init', 'pretrain'])
    monkeypatch.chdir(workdir)
    checkpoint = demo.Context(str(out), 'cpu', 42).pretrained()
    records = json.loads((workdir / demo.DATA / 'vqa_val.json').read_text())
    monkeypatch.setattr(demo, 'PROBE_QUESTIONS', ('what color is the shape?',) * 4)
    assert demo.question_similarity(checkpoint, records, 'cpu', count=3) == pytest.approx(1, abs=1e-5)
