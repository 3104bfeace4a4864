"""Evaluation inputs are checked while the datasets are built, before the first training step:
an empty evaluation file, a grounding expression the REFER refs or the detections do not know,
grounding training without the val split, repeated VQA test question ids, a missing evaluation
image, a text that cleaning empties, a bad answer list. Each run below must stop with a one-line
error naming the file and the record, and without having trained (no log.txt, no checkpoint)."""
import json
import math
import pickle
import re

import pytest

import Grounding
import NLVR
import Retrieval
import utils
import VE
import VQA
from dataset import create_dataset, vqa_eval_dataset
from dataset.faults import SampleError
from dataset.images import ImageLoadError
from tests.tiny import synthetic_with_pretrained, tiny_config

# script module, config template, config changes, extra arguments
SCRIPTS = {
    'retrieval': (Retrieval, 'Retrieval.yaml', dict(batch_size_train=8, batch_size_test=8,
                                                    queue_size=16, k_test=4), ()),
    'grounding': (Grounding, 'Grounding.yaml', dict(batch_size=8, queue_size=16), ('--block_num', '1')),
    'vqa': (VQA, 'VQA.yaml', dict(batch_size_train=8, batch_size_test=4, k_test=4), ()),
    'nlvr': (NLVR, 'NLVR.yaml', dict(batch_size=8), ()),
    've': (VE, 'VE.yaml', dict(batch_size_train=8, batch_size_test=16), ()),
}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return synthetic_with_pretrained(tmp_path_factory.mktemp('synthetic'))


def config(data, name, tmp_path, **changes):
    """configs/tiny/<name> on the synthetic data with `changes`, saved under tmp_path."""
    folder, _ = data
    _, template, tiny, _ = SCRIPTS[name]
    path = tmp_path / f'{name}.yaml'
    return path, tiny_config(template, folder, path, **tiny, **changes, schedular=dict(epochs=1))


def records(data, name):
    return json.loads((data[0] / f'{name}.json').read_text())


def write(tmp_path, name, content):
    path = tmp_path / f'{name}.json'
    path.write_text(json.dumps(content))
    return str(path)


def refused(data, name, config_path, tmp_path, error, match, *extra):
    """Run the script; it must raise `error` matching `match` before training anything."""
    module, _, _, args = SCRIPTS[name]
    out = tmp_path / 'out'
    with pytest.raises(error, match=match) as raised:
        module.main(['--config', str(config_path), '--output_dir', str(out), '--device', 'cpu',
                     *args, *extra])
    written = {p.name for p in out.iterdir()} if out.exists() else set()
    # no log.txt, checkpoint or results
    assert written <= {'config.yaml', 'train.log', 'run_info.json'}, written
    if (out / 'train.log').exists():
        assert 'Train Epoch' not in (out / 'train.log').read_text()
    return str(raised.value)


# ----------------------------------------------------------------------------- empty evaluation files

@pytest.mark.parametrize('name, key', [('retrieval', 'val_file'), ('retrieval', 'test_file'),
                                       ('vqa', 'test_file'), ('vqa', 'val_file'),
                                       ('grounding', 'test_file'), ('nlvr', 'val_file'),
                                       ('ve', 'test_file')])
def test_an_empty_evaluation_file_is_refused_before_training(data, tmp_path, name, key):
    empty = write(tmp_path, 'empty', [])
    path, _ = config(data, name, tmp_path, **{key: empty if name in ('retrieval', 've') else [empty]})
    refused(data, name, path, tmp_path, ValueError, f'^{key} {re.escape(empty)} holds no records$')


def test_the_error_is_one_line(data, tmp_path, capsys):
    empty = write(tmp_path, 'empty', [])
    path, _ = config(data, 'retrieval', tmp_path, val_file=empty)
    with pytest.raises(SystemExit) as exit_:
        utils.run(Retrieval.main, ['--config', str(path), '--output_dir', str(tmp_path / 'out'),
                                   '--device', 'cpu'])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert lines == [f'error: val_file {empty} holds no records (--debug shows the traceback)']


# ----------------------------------------------------------------------------- grounding

def test_grounding_ref_id_missing_from_the_refs(data, tmp_path):
    test = records(data, 'refcoco+_val')
    test[3] = dict(test[3], ref_id=10 ** 6)
    test_file = write(tmp_path, 'test', test)
    path, _ = config(data, 'grounding', tmp_path, test_file=[test_file])
    message = refused(data, 'grounding', path, tmp_path, ValueError, 'ref_id 1000000 is not in')
    assert f'test_file {test_file}: record 3 ' in message
    assert message.endswith(str(data[0] / 'refcoco+' / 'refs(unc).p'))


def test_grounding_image_without_detections(data, tmp_path):
    folder = data[0]
    dets = json.loads((folder / 'dets.json').read_text())
    refs = {r['ref_id']: r for r in pickle.loads((folder / 'refcoco+' / 'refs(unc).p').read_bytes())}
    test = records(data, 'refcoco+_val') + records(data, 'refcoco+_test')  # the test_file order
    image_id = str(refs[test[-5]['ref_id']]['image_id'])  # a testA/testB image
    first = next(i for i, r in enumerate(test) if str(refs[r['ref_id']]['image_id']) == image_id)
    del dets[image_id]
    det_file = write(tmp_path, 'dets', dets)
    path, _ = config(data, 'grounding', tmp_path, det_file=det_file)
    message = refused(data, 'grounding', path, tmp_path, ValueError,
                      f'image_id {image_id}\\) has no detection proposals in det_file')
    assert f'record {first} ' in message
    assert message.endswith(det_file)


def test_grounding_malformed_detections(data, tmp_path):
    folder = data[0]
    dets = json.loads((folder / 'dets.json').read_text())
    for image_id in dets:
        dets[image_id] = [[1, 2, 3]]  # three numbers: not a box
    path, _ = config(data, 'grounding', tmp_path, det_file=write(tmp_path, 'dets', dets))
    refused(data, 'grounding', path, tmp_path, ValueError, r'expected a list of boxes \[x, y, w, h')
    (tmp_path / 'list.json').write_text('[]')
    path, _ = config(data, 'grounding', tmp_path, det_file=str(tmp_path / 'list.json'))
    refused(data, 'grounding', path, tmp_path, ValueError, 'must hold a JSON object')


def test_grounding_training_needs_the_val_split_evaluate_does_not(data, tmp_path):
    folder, pretrained = data
    path, _ = config(data, 'grounding', tmp_path, test_file=[str(folder / 'refcoco+_test.json')])
    refused(data, 'grounding', path, tmp_path, utils.ConfigError,
            "holds no expression of the REFER 'val' split.*checkpoint_best.pth",
            '--checkpoint', str(pretrained))
    # scoring a checkpoint reads whichever splits there are
    result = Grounding.main(['--config', str(path), '--output_dir', str(tmp_path / 'eval'),
                             '--device', 'cpu', '--block_num', '1', '--checkpoint', str(pretrained),
                             '--evaluate'])
    accuracy = result['accuracy']
    assert math.isnan(accuracy['val_d'])
    assert 0 <= accuracy['testA_d'] <= 1 and 0 <= accuracy['testB_d'] <= 1


# ----------------------------------------------------------------------------- VQA

@pytest.mark.parametrize('key, source', [('test_file', 'vqa_test'), ('val_file', 'vqa_val')])
def test_vqa_repeated_question_id_names_both_records(data, tmp_path, key, source):
    questions = records(data, source)
    questions[4] = dict(questions[4], question_id=questions[1]['question_id'])
    file = write(tmp_path, 'questions', questions)
    path, _ = config(data, 'vqa', tmp_path, **{key: [file]})
    message = refused(data, 'vqa', path, tmp_path, ValueError,
                      f'question_id {questions[1]["question_id"]} repeats')
    assert message.startswith(f'{file}, record 4: ') and f'that of {file}, record 1;' in message


def test_vqa_answer_list(data, tmp_path):
    path, _ = config(data, 'vqa', tmp_path, answer_list=write(tmp_path, 'answers', []))
    refused(data, 'vqa', path, tmp_path, ValueError, r'answer_list .*answers\.json holds no answers')
    path, _ = config(data, 'vqa', tmp_path, answer_list=write(tmp_path, 'answers', ['yes', 2]))
    refused(data, 'vqa', path, tmp_path, ValueError, r'answers\.json, entry 1: expected a string, got int 2')
    path, _ = config(data, 'vqa', tmp_path, answer_list=str(tmp_path / 'nowhere.json'))
    refused(data, 'vqa', path, tmp_path, FileNotFoundError, 'nowhere.json')


def test_vqa_val_question_without_human_answers(data, tmp_path):
    questions = records(data, 'vqa_val')
    questions[2] = dict(questions[2], answer=[])
    file = write(tmp_path, 'val', questions)
    path, config_ = config(data, 'vqa', tmp_path, val_file=[file])
    with pytest.raises(ValueError, match=f'{re.escape(file)}, record 2: "answer" must be'):
        vqa_eval_dataset(config_, 'val_file')
    refused(data, 'vqa', path, tmp_path, ValueError, 'record 2: "answer" must be')


# ----------------------------------------------------------------------------- images and texts

@pytest.mark.parametrize('name, key, source, change', [
    ('retrieval', 'test_file', 'retrieval_test', lambda r: r.update(image='images/nowhere.jpg')),
    ('vqa', 'test_file', 'vqa_test', lambda r: r.update(image='images/nowhere.jpg')),
    ('nlvr', 'test_file', 'nlvr_test', lambda r: r.update(images=[r['images'][0], 'images/nowhere.jpg'])),
    ('ve', 'val_file', 've_dev', lambda r: r.update(image='images/nowhere')),
    ('grounding', 'test_file', 'refcoco+_val', lambda r: r.update(image='images/nowhere.jpg')),
])
def test_a_missing_evaluation_image_is_refused_before_training(data, tmp_path, name, key, source,
                                                                 change):
    items = records(data, source)
    change(items[2])
    file = write(tmp_path, 'eval', items)
    path, _ = config(data, name, tmp_path, **{key: file if name in ('retrieval', 've') else [file]})
    message = refused(data, name, path, tmp_path, ImageLoadError,
                      f'^{key} {re.escape(file)}: record 2 .*image file not found: ')
    assert message.endswith(str(data[0] / 'images' / 'nowhere.jpg'))


@pytest.mark.parametrize('name, key, source, field, error', [
    ('retrieval', 'val_file', 'retrieval_val', 'caption', ValueError),
    ('vqa', 'test_file', 'vqa_test', 'question', SampleError),
    ('nlvr', 'val_file', 'nlvr_dev', 'sentence', SampleError),
    ('ve', 'test_file', 've_test', 'sentence', SampleError),
    ('grounding', 'test_file', 'refcoco+_test', 'text', SampleError),
])
def test_an_evaluation_text_that_cleaning_empties_is_refused(data, tmp_path, name, key, source,
                                                             field, error):
    items = records(data, source)
    items[1][field] = ['a caption', '?!...'] if field == 'caption' else '?!...'
    file = write(tmp_path, 'eval', items)
    path, _ = config(data, name, tmp_path, **{key: file if name in ('retrieval', 've') else [file]})
    message = refused(data, name, path, tmp_path, error, 'is empty after cleaning')
    assert re.search(f'{re.escape(file)}(, |: )record 1', message), message


def test_valid_evaluation_sets_build_unchanged(data, tmp_path):
    # the checks read the records only: the evaluation sets keep their length and order
    _, config_ = config(data, 'retrieval', tmp_path)
    _, val, test = create_dataset('re', config_)
    assert [a['image'] for a in test.ann] == [r['image'] for r in records(data, 'retrieval_test')]
    assert len(val) == len(records(data, 'retrieval_val'))
