"""The full-size VQA, NLVR2, SNLI-VE and text-assignment models, built from the paper configs,
have exactly the keys, shapes and dtypes (in order) of the original state dicts
(tests/fixtures/original/state_dict_manifests.json). Built on the meta device: no memory,
no time."""
import importlib

import pytest
import torch

from tests.reference import STUB_TOKENIZER
from tests.test_manifests import layout, manifest
from utils import load_config

CASES = {'vqa': ('models.model_vqa', 'configs/VQA.yaml'),
         'nlvr': ('models.model_nlvr', 'configs/NLVR.yaml'),
         've': ('models.model_ve', 'configs/VE.yaml'),
         'pretrain_nlvr': ('models.model_pretrain_nlvr', 'configs/NLVR_pretrain.yaml')}


@pytest.mark.parametrize('kind', list(CASES))
def test_task_model_matches_released_layout(kind):
    module, config_path = CASES[kind]
    ALBEF = importlib.import_module(module).ALBEF
    with torch.device('meta'):
        model = ALBEF(config=load_config(config_path), text_encoder=None, tokenizer=STUB_TOKENIZER)
    assert layout(model) == manifest(kind)


def test_two_image_encoder_is_18_layers_with_six_shared_pairs():
    from models.model_nlvr import ALBEF
    with torch.device('meta'):
        model = ALBEF(config=load_config('configs/NLVR.yaml'), tokenizer=STUB_TOKENIZER)
    layers = model.text_encoder_m.encoder.layer
    assert len(layers) == 18
    shared = [n for n in range(6, 18) if layers[n].crossattention.self.key.weight
              is layers[n + (1 if n % 2 == 0 else -1)].crossattention.self.key.weight]
    assert shared == list(range(6, 18))


def manifest_state_dict(kind):
    return {key: torch.empty(shape, dtype=getattr(torch, dtype), device='meta')
            for key, shape, dtype in manifest(kind)}


@pytest.mark.parametrize('source,target', [('pretrain', 'vqa'), ('pretrain', 've'),
                                           ('pretrain', 'pretrain_nlvr'),
                                           ('pretrain_nlvr', 'nlvr')])
def test_full_size_fine_tuning_rules_account_for_every_key(source, target):
    """Released-layout checkpoint -> full-size model: everything loads except what the
    original leaves out on purpose; anything else would raise CheckpointError."""
    from models.checkpoint import load_weights
    module, config_path = CASES[target]
    ALBEF = importlib.import_module(module).ALBEF
    with torch.device('meta'):
        model = ALBEF(config=load_config(config_path), text_encoder=None, tokenizer=STUB_TOKENIZER)
    report = load_weights(model, manifest_state_dict(source), source_kind=source,
                                 target_kind=target)
    missing = {k.split('.')[0] for k in report.expected_missing}
    unexpected = {k.split('.')[0] for k in report.expected_unexpected}
    expected = {
        'vqa': (set(), {'temp', 'image_queue', 'text_queue', 'queue_ptr', 'vision_proj',
                        'text_proj', 'itm_head', 'vision_proj_m', 'text_proj_m'}),
        've': ({'cls_head', 'cls_head_m'},
               {'temp', 'image_queue', 'text_queue', 'queue_ptr', 'vision_proj', 'text_proj',
                'itm_head', 'vision_proj_m', 'text_proj_m', 'text_encoder', 'text_encoder_m'}),
        'pretrain_nlvr': ({'ta_head'}, {'image_queue', 'text_queue', 'queue_ptr', 'itm_head',
                                        'text_encoder', 'visual_encoder_m', 'text_encoder_m',
                                        'vision_proj_m', 'text_proj_m'}),
        'nlvr': ({'cls_head', 'visual_encoder_m', 'text_encoder_m', 'cls_head_m'},
                 {'vision_proj', 'text_proj', 'temp', 'ta_head'}),
    }[target]
    assert (missing, unexpected) == expected
    if target == 've':  # only the MLM heads are left over from the text encoders
        assert all('.cls.predictions.' in k for k in report.expected_unexpected
                   if k.startswith('text_encoder'))
    if target == 'vqa':  # the decoder is complete: embeddings, 6 fusion layers, LM head
        assert sum(k.startswith('text_decoder.') for k in report.loaded) == 169


# ---- the same rules on real (tiny) weights: values land where the original puts them --------

def tiny_model(kind, **overrides):
    from tests.reference import load_kind
    config = {**load_kind(kind)[0], **overrides}
    return importlib.import_module(CASES[kind][0]).ALBEF(config=config, tokenizer=STUB_TOKENIZER)


@pytest.fixture(scope='module')
def tiny_pretrain():
    from models.checkpoint import read_checkpoint, state_dict_of
    from tests.reference import load_kind
    return state_dict_of(read_checkpoint(load_kind('pretrain')[1]))


def test_vqa_from_pretrain_moves_fusion_layers_into_the_decoder(tiny_pretrain):
    from models.checkpoint import load_weights
    model = tiny_model('vqa', image_res=128)  # 8x8 grid: pos_embed is interpolated
    load_weights(model, tiny_pretrain, target_kind='vqa')  # source kind guessed
    state = model.state_dict()
    for suffix in ('', '_m'):  # tiny: 4 layers, fusion 2 -> decoder layers 0, 1 = layers 2, 3
        key = 'encoder.layer.{}.crossattention.self.key.weight'
        source = tiny_pretrain[f'text_encoder{suffix}.bert.' + key.format(3)]
        assert torch.equal(state[f'text_decoder{suffix}.bert.' + key.format(1)], source)
        assert torch.equal(state[f'text_encoder{suffix}.' + key.format(3)], source)
        assert torch.equal(state[f'text_decoder{suffix}.cls.predictions.bias'],
                           tiny_pretrain[f'text_encoder{suffix}.cls.predictions.bias'])
        pos = state[f'visual_encoder{suffix}.pos_embed']
        assert pos.shape == (1, 65, 64)
        assert torch.equal(pos[:, 0], tiny_pretrain[f'visual_encoder{suffix}.pos_embed'][:, 0])
    assert len(model.text_decoder.bert.encoder.layer) == 2


def test_text_assignment_from_pretrain_duplicates_each_fusion_layer(tiny_pretrain):
    from models.checkpoint import load_weights
    model = tiny_model('pretrain_nlvr')
    report = load_weights(model, tiny_pretrain, 'pretrain_nlvr', 'pretrain')
    layers = model.text_encoder.encoder.layer
    for src, dst in [(2, 2), (2, 3), (3, 4), (3, 5)]:
        key = f'text_encoder.bert.encoder.layer.{src}.crossattention.self.query.weight'
        assert torch.equal(layers[dst].crossattention.self.query.weight, tiny_pretrain[key])
    text_layer_key = 'text_encoder.bert.encoder.layer.1.attention.self.query.weight'
    assert torch.equal(layers[1].attention.self.query.weight, tiny_pretrain[text_layer_key])
    assert report.expected_missing == ['ta_head.weight', 'ta_head.bias']


@pytest.mark.parametrize('copy_after', [False, True])
def test_nlvr_from_text_assignment_momentum_start(copy_after):
    from models.checkpoint import load_weights, read_checkpoint, state_dict_of
    from tests.reference import load_kind
    ta = state_dict_of(read_checkpoint(load_kind('pretrain_nlvr')[1]))
    model = tiny_model('nlvr')
    load_weights(model, ta, 'nlvr', 'pretrain_nlvr', copy_momentum_after_load=copy_after)
    key = 'encoder.layer.4.crossattention.self.value.weight'
    assert torch.equal(model.text_encoder.state_dict()[key], ta[f'text_encoder.{key}'])
    # NOTE(faithful) default: the momentum encoders keep their pre-load (random) weights
    momentum_value = model.text_encoder_m.state_dict()[key]
    assert torch.equal(momentum_value, ta[f'text_encoder.{key}']) == copy_after


def test_ve_from_pretrain_and_unknown_pairs(tiny_pretrain):
    from models.checkpoint import CheckpointError, load_weights
    model = tiny_model('ve')
    load_weights(model, tiny_pretrain, 've', 'pretrain')
    assert torch.equal(model.text_encoder_m.embeddings.word_embeddings.weight,
                       tiny_pretrain['text_encoder_m.bert.embeddings.word_embeddings.weight'])
    with pytest.raises(CheckpointError, match='no rule'):
        load_weights(tiny_model('vqa'), tiny_pretrain, 'nlvr', 'pretrain')
    with pytest.raises(CheckpointError):  # a VE checkpoint is not a VQA one
        load_weights(tiny_model('vqa'), model.state_dict(), 've', 've')
