"""Downstream-task datasets (retrieval, VQA, NLVR2, SNLI-VE, grounding), their create_dataset
builders, the VQA collate function and the REFER reader, on a tiny synthetic set."""
import collections
import json
import os
import pickle

import pytest
import torch

from dataset import create_dataset, vqa_collate_fn
from dataset.caption_dataset import re_eval_dataset, re_train_dataset
from dataset.grounding_dataset import grounding_dataset, load_refer
from dataset.grounding_eval import grounding_eval
from dataset.images import ImageLoadError
from dataset.nlvr_dataset import nlvr_dataset
from dataset.synthetic import generate
from dataset.transforms import create_transform
from dataset.utils import pre_caption, pre_question
from dataset.ve_dataset import ve_dataset
from dataset.vqa_dataset import answer_weights, vqa_dataset

RES = 32


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('task_data'))
    generate(folder, seed=0, size='tiny', image_size=64)
    return folder


def path(folder, name):
    return os.path.join(folder, f'{name}.json')


def load(folder, name):
    with open(path(folder, name)) as f:
        return json.load(f)


def write(tmp_path, name, records):
    file = tmp_path / f'{name}.json'
    file.write_text(json.dumps(records))
    return str(file)


def configs(folder):
    def p(name):
        return path(folder, name)
    common = dict(image_res=RES, image_root=folder)
    return {
        're': dict(common, train_file=[p('retrieval_train')], val_file=p('retrieval_val'),
                   test_file=p('retrieval_test')),
        'vqa': dict(common, train_file=[p('vqa_train'), p('vqa_val')], test_file=[p('vqa_test')],
                    vqa_root=folder, vg_root=folder, answer_list=p('answer_list'), eos='[SEP]'),
        'nlvr': dict(common, train_file=[p('nlvr_train')], val_file=[p('nlvr_dev')],
                     test_file=[p('nlvr_test')]),
        've': dict(common, train_file=p('ve_train'), val_file=p('ve_dev'), test_file=p('ve_test')),
        'grounding': dict(common, train_file=[p('refcoco+_train')],
                          test_file=[p('refcoco+_val'), p('refcoco+_test')]),
    }


def assert_image(tensor):
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, RES, RES) and tensor.dtype == torch.float32


# ----------------------------------------------------------------------------- create_dataset

@pytest.mark.parametrize('name, splits, train_geometry', [
    ('re', 3, 'RandomResizedCrop'), ('vqa', 2, 'RandomResizedCrop'), ('nlvr', 3, 'RandomResizedCrop'),
    ('ve', 3, 'RandomResizedCrop'), ('grounding', 2, 'Resize'),
])
def test_create_dataset_returns_original_splits_and_transforms(data, name, splits, train_geometry):
    datasets = create_dataset(name, configs(data)[name])
    assert isinstance(datasets, tuple) and len(datasets) == splits
    train, *evals = datasets
    assert type(train.transform.transforms[0]).__name__ == train_geometry
    assert any(type(t).__name__ == 'RandomHorizontalFlip' for t in train.transform.transforms)
    for dataset in evals:  # evaluation never augments
        assert [type(t).__name__ for t in dataset.transform.transforms] == ['Resize', 'ToTensor', 'Normalize']


# ----------------------------------------------------------------------------- retrieval

def test_retrieval_train_items_and_idx(data):
    train, _, _ = create_dataset('re', configs(data)['re'])
    records = load(data, 'retrieval_train')
    assert len(train) == len(records) == 60
    image, caption, idx = train[7]
    assert_image(image)
    assert caption == pre_caption(records[7]['caption'])
    ids = [train.img_ids[r['image_id']] for r in records]
    assert idx == ids[7] and sorted(set(ids)) == list(range(12))
    # same image <=> same idx
    for r, i in zip(records, ids):
        assert all((r['image'] == s['image']) == (i == j) for s, j in zip(records, ids))


def test_retrieval_train_idx_in_order_of_first_appearance(data, tmp_path):
    image = load(data, 'retrieval_train')[0]['image']
    records = [{'image': image, 'caption': f'caption {k}', 'image_id': i}
               for k, i in enumerate(['b', 'a', 'b', 7, 'a'])]
    first = write(tmp_path, 'first', records[:2])
    second = write(tmp_path, 'second', records[2:])
    dataset = re_train_dataset([first, second], create_transform('test', RES), data)
    assert [dataset[k][2] for k in range(5)] == [0, 1, 0, 2, 1]


def test_retrieval_eval_text_and_maps(data):
    _, val, test = create_dataset('re', configs(data)['re'])
    records = load(data, 'retrieval_val')
    assert len(val) == len(val.image) == 6 and len(test) == 6
    assert val.image == [r['image'] for r in records]
    assert val.text == [pre_caption(c) for r in records for c in r['caption']]
    assert len(val.text) == 30 and len(val.txt2img) == 30
    assert sorted(t for ts in val.img2txt.values() for t in ts) == list(range(30))
    for img, txts in val.img2txt.items():
        assert len(txts) == len(records[img]['caption'])
        assert all(val.txt2img[t] == img for t in txts)
    image, index = val[4]
    assert_image(image)
    assert index == 4


# ----------------------------------------------------------------------------- VQA

def test_vqa_train_items_answers_and_weights(data):
    train, _ = create_dataset('vqa', configs(data)['vqa'])
    records = load(data, 'vqa_train') + load(data, 'vqa_val')
    assert len(train) == len(records) == 50
    for index in (0, 13, 44):
        image, question, answers, weights = train[index]
        assert_image(image)
        assert question == pre_question(records[index]['question'], 30)
        raw = records[index]['answer']
        counts = collections.Counter(raw)
        assert answers == [a + '[SEP]' for a in dict.fromkeys(raw)]  # distinct, first-appearance order
        assert weights == pytest.approx([counts[a[:-len('[SEP]')]] / len(raw) for a in answers])
        assert sum(weights) == pytest.approx(1.0)


def test_vqa_weights_are_summed_shares_and_vg_weighs_half():
    ann = {'dataset': 'vqa', 'answer': ['a', 'b', 'a', 'a', 'b', 'b', 'b', 'b', 'b', 'b']}
    answers, weights = answer_weights(ann)
    assert answers == ['a', 'b']
    assert weights[0] == 0.1 + 0.1 + 0.1 != 0.3  # the original's repeated addition, not 3/10
    assert answer_weights({'dataset': 'vg', 'answer': 'green'}) == (['green'], [0.5])


def test_vqa_visual_genome_records_use_vg_root(data, tmp_path):
    vqa_record = load(data, 'vqa_train')[0]
    vg_root = os.path.join(data, 'images')
    vg = write(tmp_path, 'vg', [{'question': 'What color is it?', 'answer': 'red',
                                 'image': os.path.basename(vqa_record['image']), 'dataset': 'vg'}])
    dataset = vqa_dataset([path(data, 'vqa_train'), vg], create_transform('test', RES),
                          vqa_root=data, vg_root=vg_root, eos='<eos>')
    _, question, answers, weights = dataset[len(dataset) - 1]
    assert (question, answers, weights) == ('what color is it', ['red<eos>'], [0.5])
    # the vqa root is not looked at for a vg record
    swapped = vqa_dataset([vg], create_transform('test', RES), vqa_root=vg_root, vg_root=data)
    with pytest.raises(ImageLoadError, match=os.path.join(data, os.path.basename(vqa_record['image']))):
        swapped[0]


def test_vqa_test_items_and_question_lengths(data, tmp_path):
    _, test = create_dataset('vqa', configs(data)['vqa'])
    records = load(data, 'vqa_test')
    assert len(test) == len(records)
    image, question, question_id = test[2]
    assert_image(image)
    assert (question, question_id) == (pre_question(records[2]['question'], 50), records[2]['question_id'])
    assert test.answer_list == load(data, 'answer_list')
    long = dict(records[0], question=' '.join(f'w{i}' for i in range(60)), answer=['x'] * 10)
    file = write(tmp_path, 'long', [long])
    kwargs = dict(transform=create_transform('test', RES), vqa_root=data, vg_root=data)
    assert len(vqa_dataset([file], split='train', **kwargs)[0][1].split(' ')) == 30
    test_set = vqa_dataset([file], split='test', answer_list=path(data, 'answer_list'), **kwargs)
    assert len(test_set[0][1].split(' ')) == 50
    with pytest.raises(ValueError, match='answer_list'):
        vqa_dataset([file], split='test', **kwargs)


def test_vqa_collate(data):
    train, _ = create_dataset('vqa', configs(data)['vqa'])
    batch = [train[i] for i in range(3)]
    images, questions, answers, weights, n = vqa_collate_fn(batch)
    assert images.shape == (3, 3, RES, RES)
    assert questions == [item[1] for item in batch]
    assert n == [len(item[2]) for item in batch]
    assert answers == [a for item in batch for a in item[2]]
    assert weights.dtype == torch.float32 and weights.shape == (sum(n),)
    assert torch.equal(weights, torch.tensor([w for item in batch for w in item[3]], dtype=torch.float32))
    loader = torch.utils.data.DataLoader(train, batch_size=4, collate_fn=vqa_collate_fn)
    images, _, answers, weights, n = next(iter(loader))
    assert images.shape[0] == len(n) == 4 and len(answers) == weights.numel() == sum(n)


# ----------------------------------------------------------------------------- NLVR2 / SNLI-VE

def test_nlvr_items_and_labels(data):
    train, val, test = create_dataset('nlvr', configs(data)['nlvr'])
    assert (len(train), len(val), len(test)) == (24, 10, 10)
    records = load(data, 'nlvr_dev')
    image0, image1, sentence, label = val[0]
    assert_image(image0)
    assert_image(image1)
    assert not torch.equal(image0, image1)  # two different files
    assert sentence == pre_caption(records[0]['sentence'])
    assert type(label) is int
    labels = [val[i][3] for i in range(len(val))]
    assert labels == [int(r['label'] == 'True') for r in records] and set(labels) == {0, 1}


def test_ve_items_labels_and_path(data, tmp_path):
    train, val, test = create_dataset('ve', configs(data)['ve'])
    assert (len(train), len(val), len(test)) == (30, 12, 12)
    records = load(data, 've_dev')
    image, sentence, label = val[0]
    assert_image(image)
    assert sentence == pre_caption(records[0]['sentence'])
    mapping = {'entailment': 2, 'neutral': 1, 'contradiction': 0}
    assert [val[i][2] for i in range(len(val))] == [mapping[r['label']] for r in records]
    # `image` is an id: '.jpg' is appended to it, never taken from the record
    file = write(tmp_path, 've', [dict(records[0], image=records[0]['image'] + '.jpg')])
    with pytest.raises(ImageLoadError, match=r'\.jpg\.jpg'):
        ve_dataset(file, create_transform('test', RES), data)[0]


# ----------------------------------------------------------------------------- grounding

def test_grounding_train_idx_is_image_file_order(data):
    train, test = create_dataset('grounding', configs(data)['grounding'])
    records = load(data, 'refcoco+_train')
    assert len(train) == len(records)
    names = list(dict.fromkeys(r['image'].split('/')[-1] for r in records))
    image, text, idx = train[5]
    assert_image(image)
    assert text == pre_caption(records[5]['text'])
    assert [train[i][2] for i in range(0, len(train), 7)] == \
        [names.index(records[i]['image'].split('/')[-1]) for i in range(0, len(train), 7)]
    assert len(train.img_ids) == len(names) == 12


def test_grounding_test_returns_ref_ids(data):
    _, test = create_dataset('grounding', configs(data)['grounding'])
    records = load(data, 'refcoco+_val') + load(data, 'refcoco+_test')
    assert len(test) == len(records)
    image, text, ref_id = test[len(test) - 1]
    assert_image(image)
    assert (text, ref_id) == (pre_caption(records[-1]['text']), records[-1]['ref_id'])


def test_load_refer_matches_instances(data):
    refer = load_refer(data, 'refcoco+', 'unc')
    with open(os.path.join(data, 'refcoco+', 'instances.json')) as f:
        instances = json.load(f)
    with open(os.path.join(data, 'refcoco+', 'refs(unc).p'), 'rb') as f:
        refs = pickle.load(f)
    anns = {a['id']: a for a in instances['annotations']}
    images = {i['id']: i for i in instances['images']}
    assert sorted(refer.Refs) == sorted(r['ref_id'] for r in refs)
    for ref in refs:
        assert refer.Refs[ref['ref_id']]['split'] == ref['split']
        assert refer.refToAnn[ref['ref_id']]['bbox'] == anns[ref['ann_id']]['bbox']
        image = refer.Imgs[refer.Refs[ref['ref_id']]['image_id']]
        assert (image['width'], image['height']) == (images[ref['image_id']]['width'],
                                                     images[ref['image_id']]['height'])
    assert {s: len(refer.ref_ids(s)) for s in ('train', 'val', 'testA', 'testB')} == \
        dict(collections.Counter(r['split'] for r in refs))
    # every test expression can be evaluated
    test_ids = {r['ref_id'] for r in load(data, 'refcoco+_val') + load(data, 'refcoco+_test')}
    assert test_ids <= set(refer.ref_ids('val') + refer.ref_ids('testA') + refer.ref_ids('testB'))


def test_load_refer_feeds_grounding_eval(data):
    # A map equal to 1 inside the ground-truth box selects that box among the image's boxes.
    refer = load_refer(data)
    dets = collections.defaultdict(list)
    for ref_id, ann in refer.refToAnn.items():
        dets[str(refer.Refs[ref_id]['image_id'])].append(ann['bbox'])
    results = []
    for ref_id in refer.ref_ids('val') + refer.ref_ids('testA') + refer.ref_ids('testB'):
        image = refer.Imgs[refer.Refs[ref_id]['image_id']]
        x, y, w, h = refer.refToAnn[ref_id]['bbox']
        pred = torch.zeros(image['height'], image['width'])
        pred[int(y):int(y + h), int(x):int(x + w)] = 1
        results.append({'ref_id': ref_id, 'pred': pred})
    assert grounding_eval(results, dets, refer) == {'val_d': 1.0, 'testA_d': 1.0, 'testB_d': 1.0}


def test_load_refer_errors(data, tmp_path):
    folder = tmp_path / 'refcoco+'
    folder.mkdir()
    with open(os.path.join(data, 'refcoco+', 'refs(unc).p'), 'rb') as f:
        refs = pickle.load(f)
    (folder / 'instances.json').write_bytes(open(os.path.join(data, 'refcoco+', 'instances.json'), 'rb').read())
    refs[3]['ann_id'] = 10 ** 9
    (folder / 'refs(unc).p').write_bytes(pickle.dumps(refs))
    with pytest.raises(ValueError, match=r'refs\(unc\)\.p, record 3: ann_id 1000000000'):
        load_refer(str(tmp_path))
    # a pickle naming a class (here a harmless one) is refused rather than executed
    (folder / 'refs(unc).p').write_bytes(pickle.dumps([collections.OrderedDict(ref_id=0)]))
    with pytest.raises(ValueError, match='refusing to load collections.OrderedDict'):
        load_refer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r'refs\(google\)\.p'):
        load_refer(str(tmp_path), split_by='google')


# ----------------------------------------------------------------------------- malformed records

def _build(kind, file, data):
    transform = create_transform('test', RES)
    if kind == 're_train':
        return re_train_dataset([file], transform, data)
    if kind == 're_eval':
        return re_eval_dataset(file, transform, data)
    if kind == 'vqa_train':
        return vqa_dataset([file], transform, data, data)
    if kind == 'vqa_test':
        return vqa_dataset([file], transform, data, data, split='test', answer_list=path(data, 'answer_list'))
    if kind == 'nlvr':
        return nlvr_dataset([file], transform, data)
    if kind == 've':
        return ve_dataset(file, transform, data)
    return grounding_dataset([file], transform, data, mode=kind.split('_')[1])


@pytest.mark.parametrize('kind, source, change, message', [
    ('re_train', 'retrieval_train', lambda r: r.pop('image_id'), "missing key 'image_id'"),
    ('re_train', 'retrieval_train', lambda r: r.update(image_id=[1]), "'image_id' must be str or int"),
    ('re_eval', 'retrieval_val', lambda r: r.update(caption='one string'), "'caption' must be list"),
    ('re_eval', 'retrieval_val', lambda r: r.update(caption=[]), 'non-empty list'),
    ('vqa_train', 'vqa_train', lambda r: r.pop('answer'), "missing key 'answer'"),
    ('vqa_train', 'vqa_train', lambda r: r.update(dataset='coco'), '"dataset" must be one of'),
    ('vqa_test', 'vqa_test', lambda r: r.pop('question_id'), "missing key 'question_id'"),
    ('nlvr', 'nlvr_train', lambda r: r.update(label='true'), '"label" must be "True" or "False"'),
    ('nlvr', 'nlvr_train', lambda r: r.update(label=True), "'label' must be str"),
    ('nlvr', 'nlvr_train', lambda r: r.update(images=r['images'][:1]), 'list of two image paths'),
    ('ve', 've_train', lambda r: r.update(label='maybe'), '"label" must be one of'),
    ('ve', 've_train', lambda r: r.pop('sentence'), "missing key 'sentence'"),
    ('grounding_train', 'refcoco+_train', lambda r: r.pop('text'), "missing key 'text'"),
    ('grounding_test', 'refcoco+_val', lambda r: r.pop('ref_id'), "missing key 'ref_id'"),
])
def test_malformed_record_names_file_and_index(data, tmp_path, kind, source, change, message):
    records = load(data, source)[:3]
    change(records[1])
    file = write(tmp_path, 'bad', records)
    with pytest.raises(ValueError) as error:
        _build(kind, file, data)
    assert f'{file}, record 1: ' in str(error.value) and message in str(error.value)


def test_missing_image_file_is_named(data, tmp_path):
    record = dict(load(data, 'nlvr_train')[0])
    record['images'] = [record['images'][0], 'images/nowhere.jpg']
    dataset = nlvr_dataset([write(tmp_path, 'nlvr', [record])], create_transform('test', RES), data)
    with pytest.raises(ImageLoadError, match=os.path.join(data, 'images/nowhere.jpg')):
        dataset[0]
