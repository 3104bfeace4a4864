"""Synthetic data generator: formats of every file, balance, determinism, the offline tokenizer,
and that answers/labels depend on the image rather than on the text."""
import collections
import filecmp
import json
import os
import pickle
import random

import numpy as np
import pytest
from PIL import Image

from dataset import synthetic
from dataset.utils import pre_caption, pre_question
from models.tokenization_bert import BertTokenizer

SIZES = dict(size='tiny', image_size=64)


@pytest.fixture(scope='module')
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp('synthetic')
    files = synthetic.generate(str(folder), seed=0, **SIZES)
    return str(folder), files


def load(folder, name):
    with open(os.path.join(folder, f'{name}.json')) as f:
        return json.load(f)


def assert_image(folder, rel):
    assert not os.path.isabs(rel)
    with Image.open(os.path.join(folder, rel)) as image:
        assert image.size == (64, 64) and image.mode == 'RGB'


def test_every_file_exists_and_parses(out):
    folder, files = out
    for name, path in files.items():
        assert os.path.exists(path), name
        if path.endswith('.json'):
            with open(path) as f:
                json.load(f)
    sizes = synthetic.SIZE_PRESETS['tiny']
    assert len(load(folder, 'pretrain')) == sizes['pretrain']
    assert len(load(folder, 'vqa_test')) == sizes['vqa_test']
    assert len(load(folder, 've_dev')) == sizes['ve_dev']


def test_pretrain_and_retrieval_records(out):
    folder, _ = out
    for record in load(folder, 'pretrain'):
        assert set(record) == {'image', 'caption'} and 3 <= len(record['caption']) <= 5
        assert_image(folder, record['image'])
    train = load(folder, 'retrieval_train')
    assert set(train[0]) == {'image', 'caption', 'image_id'} and isinstance(train[0]['caption'], str)
    per_image = collections.Counter(r['image_id'] for r in train)
    assert set(per_image.values()) == {5}
    images = {split: {r['image'] for r in load(folder, f'retrieval_{split}')}
              for split in ('train', 'val', 'test')}
    assert not (images['train'] & images['val']) and not (images['val'] & images['test'])
    for record in load(folder, 'retrieval_test'):
        assert set(record) == {'image', 'caption'} and len(record['caption']) == 5
        assert_image(folder, record['image'])


def test_vqa_records(out):
    folder, _ = out
    answer_list = load(folder, 'answer_list')
    assert len(answer_list) == len(set(answer_list)) and {'yes', 'no', 'red', '3'} <= set(answer_list)
    ids = []
    for split in ('train', 'val'):
        for record in load(folder, f'vqa_{split}'):
            assert set(record) == {'question_id', 'question', 'answer', 'image', 'dataset'}
            assert record['dataset'] == 'vqa' and len(record['answer']) == 10
            assert set(record['answer']) <= set(answer_list)
            top, count = collections.Counter(record['answer']).most_common(1)[0]
            assert count >= 6  # annotators mostly agree
            ids.append(record['question_id'])
    test = load(folder, 'vqa_test')
    assert all(set(r) == {'question_id', 'question', 'image', 'dataset'} for r in test)
    ids += [r['question_id'] for r in test]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    assert_image(folder, test[0]['image'])


def test_nlvr_and_ve_records_are_balanced(out):
    folder, _ = out
    for split in ('train', 'dev', 'test'):
        nlvr = load(folder, f'nlvr_{split}')
        assert all(set(r) == {'images', 'sentence', 'label'} and len(r['images']) == 2 for r in nlvr)
        labels = collections.Counter(r['label'] for r in nlvr)
        assert set(labels) == {'True', 'False'} and abs(labels['True'] - labels['False']) <= 1
        ve = load(folder, f've_{split}')
        labels = collections.Counter(r['label'] for r in ve)
        assert set(labels) == set(synthetic.VE_LABELS)
        assert max(labels.values()) - min(labels.values()) <= 1
        assert_image(folder, nlvr[0]['images'][1])
        assert not ve[0]['image'].endswith('.jpg')
        assert_image(folder, ve[0]['image'] + '.jpg')  # SNLI-VE rule: image_root/<image>.jpg


def test_grounding_files(out):
    folder, _ = out
    refs = pickle.load(open(os.path.join(folder, 'refcoco+', 'refs(unc).p'), 'rb'))
    instances = json.load(open(os.path.join(folder, 'refcoco+', 'instances.json')))
    dets, cocos = load(folder, 'dets'), load(folder, 'cocos')
    anns = {a['id']: a for a in instances['annotations']}
    images = {i['id']: i for i in instances['images']}
    assert {r['split'] for r in refs} == {'train', 'val', 'testA', 'testB'}
    by_id = {r['ref_id']: r for r in refs}
    for split, wanted in (('train', {'train'}), ('val', {'val'}), ('test', {'testA', 'testB'})):
        records = load(folder, f'refcoco+_{split}')
        assert {by_id[r['ref_id']]['split'] for r in records} == wanted
        for record in records:
            ref = by_id[record['ref_id']]
            assert record['text'] in [s['sent'] for s in ref['sentences']]
            assert record['image'] == 'images/' + images[ref['image_id']]['file_name']
    for ref in refs:
        box = anns[ref['ann_id']]['bbox']
        assert str(ref['image_id']) in dets and str(ref['image_id']) in cocos
        assert max(iou(box, d) for d in dets[str(ref['image_id'])]) > 0.5  # a proposal hits it
        assert all(d[0] >= 0 and d[1] >= 0 and d[0] + d[2] <= 64.01 and d[1] + d[3] <= 64.01
                   for d in dets[str(ref['image_id'])])


def test_grounding_colour_words_match_the_pixels(out):
    """The referred object's box centre has the colour its expression names."""
    folder, _ = out
    refs = pickle.load(open(os.path.join(folder, 'refcoco+', 'refs(unc).p'), 'rb'))
    instances = json.load(open(os.path.join(folder, 'refcoco+', 'instances.json')))
    anns = {a['id']: a for a in instances['annotations']}
    checked = 0
    for ref in refs:
        for sentence in ref['sentences']:
            named = [c for c in synthetic.COLORS if c in sentence['sent'].split()]
            if not named:
                continue
            x, y, w, h = anns[ref['ann_id']]['bbox']
            image = np.asarray(Image.open(os.path.join(folder, 'images', ref['file_name'])))
            pixel = image[int(y + h / 2), int(x + w / 2)]
            distance = {c: np.abs(np.array(rgb) - pixel).sum() for c, rgb in synthetic.COLORS.items()}
            nearest = min(distance, key=distance.get)
            assert nearest == named[0], (ref, pixel)
            checked += 1
    assert checked > 10


def iou(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0, x2 - x1) * max(0, y2 - y1)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_generation_is_deterministic(out, tmp_path):
    folder, files = out
    again = synthetic.generate(str(tmp_path), seed=0, **SIZES)
    for name, path in files.items():
        if os.path.isdir(path):
            assert not filecmp.dircmp(path, again[name]).diff_files
        else:
            assert filecmp.cmp(path, again[name], shallow=False), name
    for rel in os.listdir(os.path.join(folder, 'images')):
        assert filecmp.cmp(os.path.join(folder, 'images', rel), os.path.join(tmp_path, 'images', rel),
                           shallow=False), rel
    other = synthetic.generate(str(tmp_path / 'seed1'), seed=1, **SIZES)
    assert not filecmp.cmp(files['vqa_train'], other['vqa_train'], shallow=False)


def test_tokenizer_loads_and_round_trips_the_corpus(out):
    folder, files = out
    tokenizer = BertTokenizer.from_pretrained(files['tokenizer'])
    vocab = open(os.path.join(files['tokenizer'], 'vocab.txt')).read().split('\n')[:-1]
    assert vocab[:1] == ['[PAD]'] and vocab[100:104] == ['[UNK]', '[CLS]', '[SEP]', '[MASK]']
    assert len(vocab) < 1000
    texts = [pre_caption(c) for r in load(folder, 'pretrain') for c in r['caption']]
    texts += [pre_question(r['question']) for r in load(folder, 'vqa_train')]
    texts += [pre_caption(r['sentence']) for r in load(folder, 'nlvr_dev') + load(folder, 've_test')]
    texts += [pre_caption(r['text']) for r in load(folder, 'refcoco+_test')]
    texts += load(folder, 'answer_list')
    encoded = tokenizer(texts, padding='longest', return_tensors='pt')
    assert not (encoded.input_ids == tokenizer.unk_token_id).any()
    for text, ids in zip(texts[::5], encoded.input_ids[::5]):
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.unk_token_id not in tokenizer('Zebra-42 ?!').input_ids


def test_bad_sizes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match='huge'):
        synthetic.generate(str(tmp_path), size='huge')
    with pytest.raises(ValueError, match='vqa_trian'):
        synthetic.generate(str(tmp_path), vqa_trian=3)


# ------------------------------------------------------------------ statistics without writing images

RELATIONS = ('left', 'right', 'above', 'below')


class _NoImages:
    """Stands in for the image writer: the statistics below only need texts and labels."""
    side = 96

    def save(self, scene, name):
        return f'images/{name}.jpg'


def _held_out_text_only_accuracy(train, test, text_key, label_of):
    """Majority label per distinct text, fitted on `train` (global majority for unseen texts)."""
    per_text = collections.defaultdict(collections.Counter)
    for r in train:
        per_text[r[text_key]][label_of(r)] += 1
    overall = collections.Counter(label_of(r) for r in train).most_common(1)[0][0]
    guess = lambda t: per_text[t].most_common(1)[0][0] if t in per_text else overall
    return np.mean([guess(r[text_key]) == label_of(r) for r in test])


def test_ve_and_nlvr_labels_are_not_a_function_of_the_text():
    label = lambda r: r['label']
    ve_train = synthetic.make_ve(random.Random(0), _NoImages(), 'train', 1500)
    ve_test = synthetic.make_ve(random.Random(1), _NoImages(), 'test', 600)
    assert _held_out_text_only_accuracy(ve_train, ve_test, 'sentence', label) < 0.42  # chance: 1/3
    counts = collections.defaultdict(set)
    for r in ve_train:
        counts[r['sentence']].add(r['label'])
    assert np.mean([len(v) == 3 for v in counts.values()]) > 0.5  # texts recur with every label
    nlvr_train = synthetic.make_nlvr(random.Random(0), _NoImages(), 'train', 1000)
    nlvr_test = synthetic.make_nlvr(random.Random(1), _NoImages(), 'test', 600)
    assert _held_out_text_only_accuracy(nlvr_train, nlvr_test, 'sentence', label) < 0.58  # chance: 1/2


def test_vqa_answers_are_not_a_function_of_the_question():
    majority = lambda r: collections.Counter(r['answer']).most_common(1)[0][0]
    train = synthetic.make_vqa(random.Random(0), _NoImages(), 'train', 2000, 0)
    test = synthetic.make_vqa(random.Random(1), _NoImages(), 'val', 800, 10_000)
    accuracy = _held_out_text_only_accuracy(train, test, 'question', majority)
    # Per-type priors: colour 1/6, shape 1/5, count 1/4, yes/no and relation words 1/2 -> ~0.33.
    assert accuracy < 0.42


def test_vqa_and_ve_labels_agree_with_the_scene():
    """Re-derive answers from the sampled scenes with an independent reading of the text."""
    rng = random.Random(0)
    kinds = collections.Counter()
    for i in range(210):
        question, answer, kind, scene = synthetic.VQA_TYPES[i % len(synthetic.VQA_TYPES)](rng, 96)
        words = question.lower().rstrip('?').split()
        objs = scene.objects
        if question.startswith('How many'):
            assert answer == str(len(objs))
        elif question.startswith('Is there'):
            color, shape = words[-2:]
            assert (answer == 'yes') == any((o.color, o.shape) == (color, shape) for o in objs)
        elif question.startswith(('What color', 'What is the color')):
            assert [o.color for o in objs if o.shape == words[-1]] == [answer]
        elif kind == 'shape':
            color = next(w for w in words if w in synthetic.COLORS)
            assert [o.shape for o in objs if o.color == color] == [answer]
        else:  # "Is the <colour> <shape> ... the <colour> <shape>?": two named objects
            (a,), (b,) = ([o for o in objs if (o.color, o.shape) == tuple(words[k:k + 2])]
                          for k in (2, len(words) - 2))
            left_of, above = a.col < b.col, a.row < b.row
            if 'or' in words:  # the answer names the relation
                truth = (('right', 'left')[left_of] if 'left' in words else
                         ('below', 'above')[above])
                assert answer == truth and (a.col != b.col if 'left' in words else a.row != b.row)
            else:
                holds = {'left': left_of, 'right': a.col > b.col, 'above': above,
                         'below': a.row > b.row}[next(w for w in words if w in RELATIONS)]
                assert answer == ('yes' if holds else 'no')
        kinds[kind] += 1
    assert set(kinds) == set(synthetic.VQA_ANSWERS)  # every question type was checked
    for i in range(150):
        label = synthetic.VE_LABELS[i % 3]
        sentence, scene = synthetic._ve_example(rng, 96, label)
        words = sentence.lower().rstrip('.').split()
        color, shape = words[1], words[2]
        target = [o for o in scene.objects if (o.color, o.shape) == (color, shape)]
        if label == 'neutral':
            assert not target
            continue
        (o,) = target
        if words[-1] in synthetic.SIZES:
            holds = o.size == words[-1]
        else:  # "at the top/bottom": decided by the row, never the ambiguous middle one
            assert o.row in (0, 2)
            holds = o.row == (0 if words[-1] == 'top' else 2)
        assert holds == (label == 'entailment')



def test_nlvr_labels_agree_with_the_two_scenes():
    """Re-derive the truth of every statement kind from the sampled pair of scenes."""
    rng = random.Random(0)
    seen = collections.Counter()

    def has(scene, **want):
        return any(all(getattr(o, k) == v for k, v in want.items()) for o in scene.objects)

    for i in range(400):
        label = i % 2 == 0
        sentence, left, right = synthetic._nlvr_pair(rng, 96, label)
        words = sentence.lower().rstrip('.').split()
        if words[0] == 'both':  # "both images contain a <colour> shape"
            truth, kind = has(left, color=words[-2]) and has(right, color=words[-2]), 'both'
        elif words[0] == 'there':  # "there are more shapes in the left image than in the right"
            truth, kind = len(left.objects) > len(right.objects), 'more'
        else:  # "the left/right image contains a <colour> <shape>"
            named = left if words[1] == 'left' else right
            truth, kind = has(named, color=words[-2], shape=words[-1]), words[1]
        assert truth == label, sentence
        seen[kind, label] += 1
    assert set(seen) == {(k, b) for k in ('left', 'right', 'both', 'more') for b in (True, False)}

def test_manifest_names_what_was_generated(out):
    folder, _ = out
    written = load(folder, 'manifest')
    assert written == synthetic.manifest(seed=0, **SIZES)
    assert written['sizes']['vqa_train'] == synthetic.SIZE_PRESETS['tiny']['vqa_train']
    assert written != synthetic.manifest(seed=1, **SIZES)
    assert written['version'] == synthetic.GENERATOR_VERSION
    assert written != synthetic.manifest(seed=0, size='tiny', image_size=64, sizes={
        **synthetic.SIZE_PRESETS['tiny'], 'vqa_train': 41})
