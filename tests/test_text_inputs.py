"""Texts and tokenizer names that used to crash a run late, or to train it on nothing.

- A text longer than the text encoder's position table (symbols survive cleaning and become one
  word piece each) is truncated there: every task script's training step and evaluation, and the
  inference API, run on it; texts that fit tokenize exactly as before.
- Lone surrogates are dropped, as the original's tokenizer dropped them.
- A tokenizer name that is neither a folder with vocab.txt nor a cached / reachable Hugging Face
  model is an error naming it, at once when offline (it gave a tokenizer of [UNK]s).
"""
import json
import math
import time

import huggingface_hub
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

import Grounding
import NLVR
import Pretrain
import Retrieval
import utils
import VE
import VQA
from albef import ALBEFInference
from dataset import create_dataset, vqa_collate_fn
from dataset.synthetic import generate
from models import model_nlvr, model_pretrain, model_retrieval, model_ve, model_vqa
from models.tokenization_bert import BertTokenizer, TokenizerNotFoundError
from tests.tiny import tiny_config

SYMBOLS = '$%&+<=>@[]^_`{|}'  # BERT punctuation: one word piece per character
LONG = ' '.join([SYMBOLS] * 30)  # 30 words (pre_caption's limit) of 16 pieces: 480 > 64 positions
SURROGATE = 'a red \ud83d circle \udfff'  # lone surrogates, as a JSON "\ud83d" decodes
POSITIONS = 64  # max_position_embeddings of configs/tiny/config_bert.json


def edit_json(path, change):
    records = json.loads(path.read_text())
    change(records)
    path.write_text(json.dumps(records))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """Tiny synthetic data whose first records (train and evaluation) hold LONG texts and whose
    second training records hold lone surrogates."""
    data = tmp_path_factory.mktemp('synthetic')
    generate(data, seed=0, size='tiny', image_size=32)

    def first_two(key, wrap=lambda text: text):
        def change(records):
            records[0][key], records[1][key] = wrap(LONG), wrap(SURROGATE)
        return change
    edit_json(data / 'pretrain.json', first_two('caption', lambda text: [text]))
    edit_json(data / 'retrieval_train.json', first_two('caption'))
    edit_json(data / 'retrieval_val.json', lambda r: r[0]['caption'].insert(0, LONG))
    edit_json(data / 'vqa_train.json', first_two('question'))
    edit_json(data / 'vqa_train.json', lambda r: r[0].update(answer=[LONG] * 10))
    edit_json(data / 'vqa_test.json', first_two('question'))
    edit_json(data / 'answer_list.json', lambda answers: answers.insert(0, LONG))
    for name in ('nlvr_train', 'nlvr_dev', 've_train', 've_dev'):
        edit_json(data / f'{name}.json', first_two('sentence'))
    for name in ('refcoco+_train', 'refcoco+_val'):
        edit_json(data / f'{name}.json', first_two('text'))
    return data


def config_for(data, template, **changes):
    return tiny_config(template, data, data / template, **changes)


def tokenizer_for(config):
    return BertTokenizer.from_pretrained(config['tokenizer'])


def first(dataset, n=4, collate=default_collate, image=None, start=0):
    """A batch of n records from `start` on; with `image` (a record's image key), of n different
    images (the retrieval ITM draws its negatives among other images)."""
    indices, seen = [], set()
    for index, record in enumerate(dataset.ann[start:], start=start):
        if image is None or record[image] not in seen:
            indices.append(index)
            seen.add(image and record[image])
    return collate([dataset[i] for i in indices[:n]])


def assert_finite(losses):
    assert losses and all(math.isfinite(float(loss.detach())) for loss in losses.values()), losses


# ---- over-long texts ------------------------------------------------------------------------

def test_texts_that_fit_tokenize_as_before_and_longer_ones_stop_at_the_table(data):
    config = config_for(data, 'Retrieval.yaml', queue_size=16)
    plain = tokenizer_for(config)  # model_max_length 512 from the folder's tokenizer_config.json
    fitted = tokenizer_for(config)
    model_retrieval.ALBEF(config=config, tokenizer=fitted)  # the model sets its position table
    assert (plain.model_max_length, fitted.model_max_length) == (512, POSITIONS)
    texts = [record['caption'] for record in json.loads((data / 'retrieval_test.json').read_text())]
    texts = [caption for captions in texts for caption in captions] + [' '.join([SYMBOLS] * 3)]
    calls = [dict(padding='longest'), dict(padding='longest', max_length=30),
             dict(padding='longest', truncation=True, max_length=25),
             dict(padding='max_length', truncation=True, max_length=30)]
    for kwargs in calls:  # the task scripts' calls: identical ids and masks for texts that fit
        assert fitted(texts, **kwargs) == plain(texts, **kwargs), kwargs

    for kwargs in calls[:2]:  # no truncation asked: [CLS] and the first 63 word pieces
        ids = fitted([LONG, 'a red circle'], return_tensors='pt', **kwargs).input_ids
        assert ids.shape == (2, POSITIONS)
        assert ids[0].tolist() == plain(LONG, truncation=True, max_length=POSITIONS).input_ids
    # an explicit max_length above the table is lowered to it (Pretrain's max_tokens: 100)
    assert len(fitted(LONG, truncation=True, max_length=100).input_ids) == POSITIONS
    assert len(fitted('red', padding='max_length', max_length=100).input_ids) == POSITIONS
    # without a model, the folder's model_max_length (BERT-base's 512 positions) holds
    assert len(plain(' '.join(['$'] * 600)).input_ids) == 512


def test_retrieval_trains_and_evaluates_on_an_over_long_caption(data):
    config = config_for(data, 'Retrieval.yaml', queue_size=16, k_test=4)
    train_set, val_set, _ = create_dataset('re', config)
    tokenizer = tokenizer_for(config)
    model = model_retrieval.ALBEF(config=config, tokenizer=tokenizer)
    batch = first(train_set, image='image_id')
    assert batch[1][0] == LONG
    assert_finite(Retrieval.make_train_step(tokenizer, 'cpu')(model, batch, alpha=0.4))
    model.eval()
    assert val_set.text[0] == LONG
    i2t, t2i = Retrieval.evaluation(model, DataLoader(val_set, batch_size=4), tokenizer, 'cpu',
                                    config)
    assert t2i.shape == (len(val_set.text), len(val_set)) and i2t.shape == t2i.T.shape


def test_grounding_trains_and_localises_an_over_long_expression(data):
    config = config_for(data, 'Grounding.yaml', queue_size=16, batch_size=4)
    train_set, test_set = create_dataset('grounding', config)
    tokenizer = tokenizer_for(config)
    model = model_retrieval.ALBEF(config=config, tokenizer=tokenizer)
    batch = first(train_set, image='image')
    assert batch[1][0] == LONG
    assert_finite(Grounding.make_train_step(tokenizer, 'cpu')(model, batch, alpha=0.4))
    results = Grounding.localise(model, DataLoader(test_set, batch_size=8), tokenizer, 'cpu', 'itm',
                                 block_num=1)
    assert {r['ref_id'] for r in results} == {record['ref_id'] for record in test_set.ann}


def test_vqa_trains_and_answers_over_long_questions_and_answers(data):
    config = config_for(data, 'VQA.yaml', k_test=4)
    train_set, test_set = create_dataset('vqa', config)
    tokenizer = tokenizer_for(config)
    model = model_vqa.ALBEF(config=config, tokenizer=tokenizer)
    batch = first(train_set, collate=vqa_collate_fn)
    assert batch[1][0] == LONG and batch[2][0] == LONG + '[SEP]'
    assert_finite(VQA.make_train_step(tokenizer, 'cpu')(model, batch, alpha=0.4))
    assert test_set[0][1] == LONG and test_set.answer_list[0] == LONG
    results = VQA.answer_questions(model, DataLoader(test_set, batch_size=4), tokenizer, 'cpu',
                                   config)
    assert len(results) == len(test_set)


@pytest.mark.parametrize('task', ['nlvr', 've'])
def test_classifiers_train_and_evaluate_an_over_long_sentence(data, task):
    script, module, template = {'nlvr': (NLVR, model_nlvr, 'NLVR.yaml'),
                                've': (VE, model_ve, 'VE.yaml')}[task]
    config = config_for(data, template)
    train_set, dev_set, _ = create_dataset(task, config)
    tokenizer = tokenizer_for(config)
    model = module.ALBEF(config=config, tokenizer=tokenizer)
    train_step, predict = script.make_steps(tokenizer, 'cpu')
    batch = first(train_set)
    assert batch[-2][0] == LONG
    assert_finite(train_step(model, batch, alpha=0.4))
    model.eval()
    with torch.no_grad():
        logits, labels = predict(model, first(dev_set))
    assert logits.shape[0] == len(labels) == 4 and torch.isfinite(logits).all()


def test_pretraining_max_tokens_above_the_table_is_lowered_to_it(data):
    config = config_for(data, 'Pretrain.yaml', queue_size=16, max_tokens=100)
    dataset = create_dataset('pretrain', config)
    tokenizer = tokenizer_for(config)
    model = model_pretrain.ALBEF(config=config, tokenizer=tokenizer, init_deit=False)
    batch = first(dataset)
    assert batch[1][0] == LONG
    assert_finite(Pretrain.make_train_step(tokenizer, config, 'cpu')(model, batch, alpha=0.4))


@pytest.fixture(scope='module')
def inference(data, tmp_path_factory):
    """ALBEFInference of a retrieval and a VQA checkpoint (random tiny weights)."""
    folder = tmp_path_factory.mktemp('checkpoints')
    loaded = {}
    for kind, module, template in (('retrieval', model_retrieval, 'Retrieval.yaml'),
                                   ('vqa', model_vqa, 'VQA.yaml')):
        config = config_for(data, template, queue_size=16, k_test=4)
        model = module.ALBEF(config=config, tokenizer=tokenizer_for(config))
        utils.save_checkpoint({'model': model.state_dict(), 'config': config}, folder / kind)
        loaded[kind] = ALBEFInference.from_checkpoint(folder / kind, device='cpu')
    image = str(next((data / 'images').glob('*.jpg')))
    return loaded, image


def test_inference_api_takes_over_long_texts(inference):
    loaded, image = inference
    albef = loaded['retrieval']
    assert albef.tokenizer.model_max_length == POSITIONS
    assert albef.itm_scores(image, [LONG, 'a red circle']).shape == (2,)
    assert albef.text_embeddings([LONG]).shape[0] == 1
    assert len(albef.gradcam(image, LONG, block_num=1).tokens) == 29  # caption truncation: 30
    answers = loaded['vqa'].answer(image, LONG, candidates=[LONG, 'red', 'two'], k=3)
    assert sorted(a['answer'] for a in answers) == sorted([LONG, 'red', 'two'])


# ---- lone surrogates --------------------------------------------------------------------------

def test_lone_surrogates_are_dropped_as_the_original_tokenizer_did(data):
    tokenizer = BertTokenizer.from_pretrained(str(data / 'tokenizer'))
    clean = 'a red  circle '
    assert tokenizer(SURROGATE).input_ids == tokenizer(clean).input_ids
    assert tokenizer([SURROGATE, 'x'], padding='longest') == tokenizer([clean, 'x'], padding='longest')
    assert tokenizer('\ud83d', 'red\udc00').input_ids == tokenizer('', 'red').input_ids
    assert tokenizer('\ud83d\ude00 red').input_ids == tokenizer(' red').input_ids  # two lone halves


def test_a_caption_with_a_lone_surrogate_trains(data):
    config = config_for(data, 'Retrieval.yaml', queue_size=16)
    train_set, _, _ = create_dataset('re', config)
    tokenizer = tokenizer_for(config)
    model = model_retrieval.ALBEF(config=config, tokenizer=tokenizer)
    batch = first(train_set, image='image_id', start=1)
    assert batch[1][0] == SURROGATE
    assert_finite(Retrieval.make_train_step(tokenizer, 'cpu')(model, batch, alpha=0.4))


def test_inference_api_takes_lone_surrogates(inference):
    loaded, image = inference
    albef = loaded['retrieval']
    scores = albef.itm_scores(image, [SURROGATE, 'a red  circle'])
    assert torch.allclose(scores[0], scores[1])
    assert loaded['vqa'].answer(image, 'what \ud83d color', candidates=['red\udfff', 'two'], k=2)


# ---- tokenizer names --------------------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 (read by huggingface_hub at import, hence the constant too); any hub
    download fails the test."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)

    def no_download(*args, **kwargs):
        raise AssertionError('the hub was asked while offline')
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_download)


@pytest.mark.parametrize('name', ['bert-base-uncase', 'nowhere/tokenizr', 'data/synthetic/tokenizr'])
def test_an_unknown_tokenizer_name_is_an_error_naming_it_at_once(offline, name):
    start = time.monotonic()
    with pytest.raises(TokenizerNotFoundError, match=f"tokenizer '{name}' not found"):
        BertTokenizer.from_pretrained(name)
    assert time.monotonic() - start < 5


def test_a_folder_without_vocabulary_is_an_error_naming_it(offline, tmp_path):
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'do_lower_case': True}))
    with pytest.raises(TokenizerNotFoundError, match=f"tokenizer '{tmp_path}' not found: the "
                                                      "folder has none of"):
        BertTokenizer.from_pretrained(str(tmp_path))


def test_a_cached_hub_name_loads_from_the_cache_alone(offline, data, tmp_path):
    # The Hugging Face cache layout: models--<name>/refs/main -> snapshots/<commit>/<files>.
    repo = tmp_path / 'models--bert-base-uncased'
    snapshot = repo / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('0' * 40)
    for file in ('vocab.txt', 'tokenizer_config.json'):
        (snapshot / file).write_bytes((data / 'tokenizer' / file).read_bytes())
    cached = BertTokenizer.from_pretrained('bert-base-uncased', cache_dir=str(tmp_path))
    folder = BertTokenizer.from_pretrained(str(data / 'tokenizer'))
    assert cached('A red circle, left').input_ids == folder('A red circle, left').input_ids
    assert 100 not in cached('a red circle').input_ids  # words, not [UNK]


def test_a_script_with_a_misspelt_tokenizer_stops_with_one_line(offline, data, tmp_path, capsys):
    config = tiny_config('VE.yaml', data, tmp_path / 'VE.yaml', tokenizer='bert-base-uncase')
    with pytest.raises(SystemExit) as stop:
        utils.run(VE.main, ['--config', str(tmp_path / 'VE.yaml'), '--output_dir',
                            str(tmp_path / 'out'), '--device', 'cpu'])
    assert stop.value.code == 2 and config['tokenizer'] == 'bert-base-uncase'
    assert "tokenizer 'bert-base-uncase' not found" in capsys.readouterr().err


def test_inference_api_with_a_misspelt_tokenizer_is_an_error(offline, inference, tmp_path):
    loaded, _ = inference
    path = tmp_path / 'retrieval.pth'
    utils.save_checkpoint({'model': loaded['retrieval'].model.state_dict(),
                           'config': loaded['retrieval'].config}, path)
    with pytest.raises(TokenizerNotFoundError, match="'nowhere/tokenizr' not found"):
        ALBEFInference.from_checkpoint(path, tokenizer='nowhere/tokenizr', device='cpu')
