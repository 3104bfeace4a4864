"""VE.py, Pretrain_nlvr.py -> NLVR.py and VQA.py end to end on synthetic data with a tiny model
(one epoch each, then --evaluate of the written checkpoint); the VQA accuracy metric and its
answer normalisation; the answer-list builder."""
import json
import os
import subprocess
import sys

import pytest

import NLVR
import Pretrain_nlvr
import VE
import VQA
from dataset.vqa_eval import answer_accuracy, normalize_answer, vqa_accuracy
from models.checkpoint import CheckpointError
from tests.tiny import ROOT, synthetic_with_pretrained, tiny_config
from tools import build_answer_list


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    data, pretrained = synthetic_with_pretrained(tmp_path_factory.mktemp('synthetic'))
    one_epoch = dict(schedular=dict(epochs=1))
    configs = {
        've': tiny_config('VE.yaml', data, data / 've.yaml', batch_size_train=8,
                          batch_size_test=16, **one_epoch),
        'ta': tiny_config('NLVR_pretrain.yaml', data, data / 'ta.yaml', batch_size=8,
                          **one_epoch),
        'nlvr': tiny_config('NLVR.yaml', data, data / 'nlvr.yaml', batch_size=8, **one_epoch),
        'vqa': tiny_config('VQA.yaml', data, data / 'vqa.yaml', batch_size_train=8,
                           batch_size_test=4, k_test=4, **one_epoch),
    }
    assert all(config['schedular']['epochs'] == 1 for config in configs.values())
    return data, pretrained


def run(script, config, output_dir, checkpoint, *extra):
    return script.main(['--config', str(config), '--output_dir', str(output_dir), '--device', 'cpu',
                        '--checkpoint', str(checkpoint), *extra])


def read_log(folder):
    return [json.loads(line) for line in (folder / 'log.txt').read_text().splitlines()]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_ve_finetune_then_evaluate(setup, tmp_path):
    data, pretrained = setup
    out = tmp_path / 've'
    result = run(VE, data / 've.yaml', out, pretrained)
    log = read_log(out)
    assert log[0]['epoch'] == 0 and log[-1] == {'best_epoch': 0}
    assert {'train_loss', 'train_lr', 'val_acc', 'test_acc'} <= set(log[0])
    assert 0 <= log[0]['val_acc'] <= 1 and 0 <= log[0]['test_acc'] <= 1
    assert (out / 'checkpoint_best.pth').is_file() and (out / 'config.yaml').is_file()

    evaluated = run(VE, data / 've.yaml', tmp_path / 'eval', out / 'checkpoint_best.pth',
                    '--evaluate')
    assert evaluated['best_epoch'] is None
    assert evaluated['val_acc'] == result['val_acc'] and evaluated['test_acc'] == result['test_acc']
    # --evaluate loads fine-tuned checkpoints only: a pre-training file is refused, not half-loaded
    with pytest.raises(CheckpointError):
        run(VE, data / 've.yaml', tmp_path / 'wrong', pretrained, '--evaluate')


def test_text_assignment_then_nlvr(setup, tmp_path):
    data, pretrained = setup
    ta_out = tmp_path / 'ta'
    stats = run(Pretrain_nlvr, data / 'ta.yaml', ta_out, pretrained)
    assert set(stats) == {'lr', 'loss'}
    log = read_log(ta_out)
    assert [entry['epoch'] for entry in log] == [0] and set(log[0]) == {
        'train_lr', 'train_loss', 'skipped_samples', 'skipped_nonfinite_steps', 'epoch'}
    assert (ta_out / 'checkpoint_00.pth').is_file()

    out = tmp_path / 'nlvr'
    result = run(NLVR, data / 'nlvr.yaml', out, ta_out / 'checkpoint_00.pth')
    log = read_log(out)
    assert log[-1] == {'best_epoch': 0}
    assert {'train_loss', 'train_lr', 'dev_acc', 'test_acc', 'epoch'} <= set(log[0])
    assert 0 <= log[0]['dev_acc'] <= 1 and 0 <= log[0]['test_acc'] <= 1
    assert (out / 'checkpoint_00.pth').is_file()  # saved because dev accuracy improved

    evaluated = run(NLVR, data / 'nlvr.yaml', tmp_path / 'eval', out / 'checkpoint_00.pth',
                    '--evaluate')
    assert (evaluated['dev_acc'], evaluated['test_acc']) == (result['dev_acc'], result['test_acc'])


def test_vqa_answers_every_question_once(setup, tmp_path):
    data, pretrained = setup
    out = tmp_path / 'vqa'
    summary = run(VQA, data / 'vqa.yaml', out, pretrained)
    log = read_log(out)
    assert log[0]['epoch'] == 0 and 'train_loss' in log[0]
    assert (out / 'checkpoint_00.pth').is_file()

    results = read_json(out / 'result' / 'vqa_result_epoch0.json')
    test_ids = [q['question_id'] for q in read_json(data / 'vqa_test.json')]
    assert sorted(r['question_id'] for r in results) == sorted(test_ids)  # each exactly once
    answer_list = read_json(data / 'answer_list.json')
    assert all(set(r) == {'question_id', 'answer'} and r['answer'] in answer_list for r in results)
    topk = read_json(out / 'result' / 'vqa_result_epoch0_topk.json')
    assert [r['answer'] for r in topk] == [r['answer'] for r in results]
    for r in topk:
        scores = [c['score'] for c in r['topk']]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        assert r['topk'][0]['answer'] == r['answer']

    # the val split has human answers: scored locally, and the score is the file's score
    val_results = read_json(out / 'result' / 'vqa_val_result_epoch0.json')
    assert 0 <= summary['val_vqa_acc'] <= 1 and log[-1]['val_vqa_acc'] == summary['val_vqa_acc']
    assert vqa_accuracy(val_results, read_json(data / 'vqa_val.json')) == summary['val_vqa_acc']
    assert 'test_vqa_acc' not in summary  # no answers to score against

    evaluated = run(VQA, data / 'vqa.yaml', tmp_path / 'eval', out / 'checkpoint_00.pth',
                    '--evaluate')
    assert read_json(tmp_path / 'eval' / 'result' / 'vqa_result_epoch0.json') == results
    assert evaluated['val_vqa_acc'] == summary['val_vqa_acc']


def test_vqa_merge_drops_sampler_padding():
    # Two ranks over five questions: DistributedSampler gives rank 0 [0, 2, 4], rank 1 [1, 3, 0].
    rank0 = [{'question_id': q, 'answer': str(q)} for q in (10, 12, 14)]
    rank1 = [{'question_id': q, 'answer': str(q)} for q in (11, 13, 10)]
    merged = VQA.merge_results([rank0, rank1], [10, 11, 12, 13, 14])
    assert [r['question_id'] for r in merged] == [10, 11, 12, 13, 14]
    with pytest.raises(RuntimeError, match='not answered'):
        VQA.merge_results([rank0], [10, 11, 12, 13, 14])


@pytest.mark.parametrize('raw, normal', [
    ('Yes', 'yes'),
    ('  two\n', '2'),
    ('Ten dogs.', '10 dogs'),
    ('none', '0'),
    ('the red one', 'red 1'),
    ('an apple', 'apple'),
    ('2.5', '2.5'),                  # a period before a digit stays
    ('yes.', 'yes'),
    ('dont know', "don't know"),     # contractions get their apostrophe back
    ("don't", "don't"),
    ('couldntve', "couldn't've"),
    ('its', 'its'),                  # an ordinary word is not a contraction
    ('t-shirt', 't shirt'),          # punctuation inside a word becomes a space
    ('red, white', 'red white'),     # ... and is deleted next to a space
    ('1,000', '1000'),               # digit,digit: every mark is deleted
    ('left/right', 'left right'),
    ('(a) hat!', 'hat'),
])
def test_vqa_answer_normalisation(raw, normal):
    assert normalize_answer(raw) == normal


def test_vqa_accuracy_known_cases():
    humans = ['yes'] * 3 + ['no'] * 7
    # 3 matching humans: leave-one-out subsets have 2 matches (x3) or 3 (x7) -> (3 * 2/3 + 7) / 10
    assert answer_accuracy('yes', humans) == pytest.approx(0.9)
    assert answer_accuracy('no', humans) == pytest.approx(1.0)
    assert answer_accuracy('yes', ['yes'] * 2 + ['no'] * 8) == pytest.approx(0.6)
    assert answer_accuracy('yes', ['yes'] + ['no'] * 9) == pytest.approx(0.3)
    assert answer_accuracy('maybe', humans) == 0
    assert answer_accuracy('Two', ['2'] * 10) == 1  # normalised on both sides
    assert answer_accuracy('dog', ['dog']) == 1  # one human answer: exact match

    annotations = [{'question_id': 1, 'answer': humans}, {'question_id': 2, 'answer': ['2'] * 10}]
    results = [{'question_id': 1, 'answer': 'yes'}, {'question_id': 2, 'answer': 'two'}]
    assert vqa_accuracy(results, annotations) == pytest.approx((0.9 + 1) / 2)
    with pytest.raises(ValueError, match='twice'):
        vqa_accuracy(results + results[:1], annotations)
    with pytest.raises(ValueError, match='no predicted answer'):
        vqa_accuracy(results[:1], annotations)


def test_build_answer_list(setup, tmp_path):
    data, _ = setup
    train = [{'question_id': 1, 'question': 'q', 'image': 'x.jpg', 'dataset': 'vqa',
              'answer': ['cat'] * 6 + ['Cat.'] * 3 + ['dog']},
             {'question': 'q', 'image': 'y.jpg', 'dataset': 'vg', 'answer': 'dog'}]
    path = tmp_path / 'train.json'
    path.write_text(json.dumps(train))
    out = tmp_path / 'answers.json'
    assert build_answer_list.main(['--train', str(path), '--out', str(out)]) == ['cat', 'Cat.', 'dog']
    assert read_json(out) == ['cat', 'Cat.', 'dog']
    assert build_answer_list.main(['--train', str(path), '--out', str(out), '--normalize']) == [
        'cat', 'dog']
    assert build_answer_list.main(['--train', str(path), '--out', str(out), '--min_count', '3']) == [
        'cat', 'Cat.']
    assert build_answer_list.main(['--train', str(path), '--out', str(out), '--top', '1']) == ['cat']
    # the synthetic training answers are all in the synthetic answer list
    built = build_answer_list.main(['--train', str(data / 'vqa_train.json'), '--out', str(out)])
    assert set(built) <= set(read_json(data / 'answer_list.json'))


def test_vqa_three_process_torchrun_answers_each_question_once(setup, tmp_path):
    """10 test questions over 3 ranks: the sampler pads to 12, the result file still has 10."""
    data, pretrained = setup
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=3',
           '--master_port', str(31500 + os.getpid() % 1000), 'VQA.py',
           '--config', str(data / 'vqa.yaml'), '--output_dir', str(tmp_path), '--device', 'cpu',
           '--checkpoint', str(pretrained)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name, ann_file in (('vqa_result_epoch0', 'vqa_test.json'),
                           ('vqa_val_result_epoch0', 'vqa_val.json')):
        ids = [r['question_id'] for r in read_json(tmp_path / 'result' / f'{name}.json')]
        assert sorted(ids) == sorted(q['question_id'] for q in read_json(data / ann_file))
    assert 0 <= read_log(tmp_path)[-1]['val_vqa_acc'] <= 1
