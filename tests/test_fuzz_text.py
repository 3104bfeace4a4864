"""1,000 random texts (seeded: random Unicode with surrogates, control characters, long runs of
punctuation and symbols, over-long words, special-token literals, empty and whitespace-only
strings) through every dataset's text path, the task scripts' tokenizer calls and one batched
forward of the tiny text encoder, and through the inference API: no crash. The only errors
allowed are the documented ones: SampleError from the bad-sample policy (naming the record), or
a ValueError with a message while an evaluation file is read.
"""
import json
import random

import pytest
import torch

import utils
from albef import ALBEFInference
from dataset.caption_dataset import re_eval_dataset, re_train_dataset
from dataset.faults import BadSamplePolicy, SampleError
from dataset.grounding_dataset import grounding_dataset
from dataset.nlvr_dataset import nlvr_dataset
from dataset.pretrain_dataset import pretrain_dataset
from dataset.synthetic import generate
from dataset.ve_dataset import ve_dataset
from dataset.vqa_dataset import vqa_dataset
from models import model_retrieval, model_vqa
from models.tokenization_bert import BertTokenizer
from tests.tiny import tiny_config

COUNT = 1000
POSITIONS = 64  # max_position_embeddings of the tiny BERT
WORDS = ['a', 'red', 'circle', 'left', 'of', 'the', 'square', 'two', 'what', 'color', 'is']
SYMBOLS = '$%&+<=>@[]^_`{|}\\,.!?-/~*#:;\'"()'
CONTROL = [chr(c) for c in range(32)] + ['\x7f', '\x85', '\u200b', '\u200e', '\u2028', '\ufeff',
                                         '\ufffd', '\uffff']
WHITESPACE = [' ', '\t', '\n', '\r', '\xa0', '\u3000', '\u2003']
SPECIAL = ['[SEP]', '[CLS]', '[MASK]', '[PAD]', '[UNK]', '<person>']


def random_text(rng):
    kind = rng.randrange(9)
    if kind == 0:  # any code point, lone surrogates included
        return ''.join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(1, 200)))
    if kind == 1:  # mostly surrogates and other BMP code points
        return ''.join(chr(rng.choice([rng.randrange(0xd800, 0xe000), rng.randrange(0x10000)]))
                       for _ in range(rng.randrange(1, 60)))
    if kind == 2:  # a long run of punctuation and symbols, with or without spaces
        sep = rng.choice(['', ' ', '  '])
        return sep.join(rng.choice(SYMBOLS) for _ in range(rng.randrange(50, 1500)))
    if kind == 3:
        return rng.choice(['', *WHITESPACE, ''.join(rng.choices(WHITESPACE, k=rng.randrange(1, 30)))])
    if kind == 4:  # control characters among words
        return ' '.join(rng.choice(WORDS + CONTROL) for _ in range(rng.randrange(1, 80)))
    if kind == 5:  # special-token literals, over-long words, CJK
        pieces = SPECIAL + ['x' * rng.randrange(90, 300), '漢字かな', '😀', 'e\u0301']
        return rng.choice(['', ' ']).join(rng.choice(pieces + WORDS) for _ in range(rng.randrange(1, 60)))
    if kind == 6:  # a plausible caption
        return ' '.join(rng.choice(WORDS) for _ in range(rng.randrange(1, 20))).capitalize() + '.'
    return ''.join(rng.choice([rng.choice(WORDS) + ' ', rng.choice(SYMBOLS), rng.choice(CONTROL),
                               chr(rng.randrange(0x110000)), rng.choice(WHITESPACE)])
                   for _ in range(rng.randrange(1, 300)))


TEXTS = [random_text(random.Random(seed)) for seed in range(COUNT)]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    data = tmp_path_factory.mktemp('synthetic')
    generate(data, seed=0, size='tiny', image_size=32)
    config = tiny_config('Retrieval.yaml', data, data / 'retrieval.yaml', queue_size=16, k_test=4)
    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    torch.manual_seed(0)
    model = model_retrieval.ALBEF(config=config, tokenizer=tokenizer).eval()
    image = next((data / 'images').glob('*.jpg')).name
    return data, config, tokenizer, model, f'images/{image}'


def write(folder, name, records):
    path = folder / f'{name}.json'
    path.write_text(json.dumps(records))  # lone surrogates travel as JSON escapes ("\ud83d")
    return str(path)


def dataset_texts(dataset):
    """The texts that the task scripts would tokenise, one per record (None: a SampleError)."""
    policy = BadSamplePolicy(dataset, 'fail')
    texts = []
    for index in range(len(policy)):
        try:
            item = policy[index]
        except SampleError as error:
            assert f'record {index}' in str(error)
            texts.append(None)
            continue
        texts.append(item)
    return texts


def build(name, data, image):
    """(dataset, how to read the script's texts off an item, tokenizer calls) for `name`."""
    n = [{'image': image}] * COUNT
    root = str(data)
    pick = lambda i: (lambda item: [item[i]])
    longest = dict(padding='longest')
    if name == 'pretrain':
        records = [{**r, 'caption': [t]} for r, t in zip(n, TEXTS)]
        return (pretrain_dataset(write(data, name, records), None, image_root=root,
                                 on_bad_sample='skip'), pick(1),
                [dict(padding='longest', truncation=True, max_length=25)])
    if name == 're_train':
        records = [{**r, 'caption': t, 'image_id': i} for i, (r, t) in enumerate(zip(n, TEXTS))]
        return (re_train_dataset(write(data, name, records), None, root, on_bad_sample='skip'),
                pick(1), [dict(padding='longest', max_length=30)])
    if name == 'vqa_train':
        records = [{**r, 'question': t, 'answer': [t, 'red'], 'dataset': 'vqa', 'question_id': i}
                   for i, (r, t) in enumerate(zip(n, TEXTS))]
        dataset = vqa_dataset(write(data, name, records), None, root, root, split='train',
                              on_bad_sample='skip')
        return (dataset, lambda item: [item[1], *item[2]],  # the question, then answers + eos
                [dict(padding='longest', truncation=True, max_length=25), longest])
    if name == 'vqa_test':
        records = [{**r, 'question': t, 'dataset': 'vqa', 'question_id': i}
                   for i, (r, t) in enumerate(zip(n, TEXTS))]
        answers = write(data, 'answers', ['red'])
        return (vqa_dataset(write(data, name, records), None, root, root, split='test',
                            answer_list=answers, on_bad_sample='skip'), pick(1), [longest])
    if name == 'nlvr':
        records = [{'images': [image, image], 'sentence': t, 'label': 'True'} for t in TEXTS]
        return (nlvr_dataset(write(data, name, records), None, root, on_bad_sample='skip'), pick(2),
                [longest])
    if name == 've':
        records = [{'image': image[:-len('.jpg')], 'sentence': t, 'label': 'neutral'} for t in TEXTS]
        return (ve_dataset(write(data, name, records), None, root, on_bad_sample='skip'), pick(1),
                [longest])
    if name == 'grounding':
        records = [{**r, 'text': t, 'ref_id': i} for i, (r, t) in enumerate(zip(n, TEXTS))]
        return (grounding_dataset(write(data, name, records), None, root, mode='test',
                                  on_bad_sample='skip'), pick(1), [longest])
    raise KeyError(name)


def encode(model, tokenizer, texts, **kwargs):
    """The scripts' tokenizer call and one forward of the text encoder on all `texts`."""
    text = tokenizer(texts, return_tensors='pt', **kwargs)
    assert text.input_ids.shape[1] <= POSITIONS
    with torch.no_grad():
        embeds = model.encode_text(text.input_ids, text.attention_mask)
    assert embeds.shape[:2] == text.input_ids.shape and torch.isfinite(embeds).all()


def test_the_texts_hold_what_crashed_runs(setup):
    tokenizer = BertTokenizer.from_pretrained(setup[1]['tokenizer'])  # not fitted to a model
    surrogates = [t for t in TEXTS if any(0xd800 <= ord(c) < 0xe000 for c in t)]
    lengths = [len(ids) for ids in tokenizer(TEXTS).input_ids]
    assert len(surrogates) > COUNT // 20 and sum(n > POSITIONS for n in lengths) > COUNT // 10
    assert TEXTS.count('') > 5 and sum(t.isspace() for t in TEXTS) > 5


DATASETS = ['pretrain', 're_train', 'vqa_train', 'vqa_test', 'nlvr', 've', 'grounding']


@pytest.mark.parametrize('name', DATASETS)
def test_random_texts_through_a_dataset_the_tokenizer_and_the_text_encoder(setup, name):
    data, _, tokenizer, model, image = setup
    dataset, read, calls = build(name, data, image)
    dataset.transform = lambda picture: torch.zeros(3)  # the text path is under test here
    items = dataset_texts(dataset)
    texts = [text for item in items if item is not None for text in read(item)]
    assert len(texts) >= COUNT // 2  # blank records are dropped at load; the rest mostly pass
    for kwargs in calls:
        encode(model, tokenizer, texts, **kwargs)


def test_random_texts_through_retrieval_evaluation_files(setup, tmp_path):
    data, _, tokenizer, model, image = setup
    kept = []
    for i, text in enumerate(TEXTS):
        path = write(tmp_path, f'val_{i}', [{'image': image, 'caption': [text]}])
        try:
            kept += re_eval_dataset(path, None, str(data)).text
        except ValueError as error:  # blank, or empty after cleaning: refused with a message
            assert 'caption' in str(error) and path in str(error)
    assert len(kept) >= COUNT // 2
    encode(model, tokenizer, kept, padding='max_length', truncation=True, max_length=30)


def test_random_texts_through_the_inference_api(setup, tmp_path):
    data, config, _, model, image = setup
    utils.save_checkpoint({'model': model.state_dict(), 'config': config}, tmp_path / 'ret.pth')
    albef = ALBEFInference.from_checkpoint(tmp_path / 'ret.pth', device='cpu')
    albef.batch_size = 250
    picture = data / image
    assert albef.text_embeddings(TEXTS).shape[0] == COUNT
    scores = albef.itm_scores(picture, TEXTS)
    assert scores.shape == (COUNT,) and torch.isfinite(scores).all()

    vqa_config = tiny_config('VQA.yaml', data, data / 'vqa.yaml', k_test=4)
    vqa = model_vqa.ALBEF(config=vqa_config, tokenizer=albef.tokenizer)
    utils.save_checkpoint({'model': vqa.state_dict(), 'config': vqa_config}, tmp_path / 'vqa.pth')
    vqa = ALBEFInference.from_checkpoint(tmp_path / 'vqa.pth', device='cpu')
    answers = vqa.answer(picture, TEXTS[0], candidates=TEXTS, k=3)  # every text a candidate
    assert len(answers) == 3
    questions = vqa.tokenize(TEXTS, question=True)  # answer()'s question path, all at once
    assert questions.input_ids.shape == (COUNT, POSITIONS)
    with torch.no_grad():
        assert torch.isfinite(vqa.model.encode_text(questions.input_ids,
                                                    questions.attention_mask)).all()
    for question in TEXTS[::100]:
        assert len(vqa.answer(picture, question, candidates=['red', 'two', TEXTS[2]], k=2)) == 2
