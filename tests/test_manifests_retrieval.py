"""The full-size retrieval/grounding model has exactly the released state-dict layout
(tests/fixtures/original/state_dict_manifests.json, built on the meta device), and the three
checkpoint layouts it is fed (pre-trained, retrieval training save, released online-only file)
load with the expected differences."""
import pytest
import torch

from models.checkpoint import (CheckpointError, load_weights, read_checkpoint,
                               state_dict_of)
from models.model_retrieval import ALBEF
from tests.reference import STUB_TOKENIZER, load_kind
from tests.test_manifests import layout, manifest
from utils import load_config


@pytest.mark.parametrize('config_file', ['configs/Retrieval_coco.yaml',
                                         'configs/Retrieval_flickr.yaml', 'configs/Grounding.yaml'])
def test_retrieval_model_matches_released_layout(config_file):
    config = load_config(config_file)
    with torch.device('meta'):
        model = ALBEF(config=config, text_encoder=None, tokenizer=STUB_TOKENIZER)
    assert layout(model) == manifest('retrieval')


def tiny_model():
    config, checkpoint, _, _ = load_kind('retrieval')
    torch.manual_seed(0)
    return ALBEF(config=config, tokenizer=STUB_TOKENIZER), checkpoint


def test_pretrained_checkpoint_is_renamed_into_the_retrieval_model():
    model, _ = tiny_model()
    _, pretrain_checkpoint, _, _ = load_kind('pretrain')  # same tiny sizes
    source = state_dict_of(read_checkpoint(pretrain_checkpoint))
    report = load_weights(model, pretrain_checkpoint, 'retrieval')
    assert report.expected_missing == ['idx_queue']
    assert sorted(report.expected_unexpected) == sorted(
        k for k in source if '.cls.predictions.' in k)
    assert len(report.expected_unexpected) == 14
    state = model.state_dict()
    for key in ('text_encoder.encoder.layer.3.crossattention.self.key.weight',
                'text_encoder_m.embeddings.word_embeddings.weight', 'image_queue', 'temp'):
        original = key.replace('text_encoder.', 'text_encoder.bert.').replace(
            'text_encoder_m.', 'text_encoder_m.bert.')
        assert torch.equal(state[key], source[original]), key
    assert (model.idx_queue == -100).all()


def test_released_online_only_file_initialises_momentum_from_online_weights():
    model, checkpoint = tiny_model()
    full = state_dict_of(read_checkpoint(checkpoint))
    online = {k: v for k, v in full.items()
              if '_m.' not in k and k not in ('image_queue', 'text_queue', 'idx_queue', 'queue_ptr')}
    report = load_weights(model, online, 'retrieval')
    # position_ids buffers are tolerated, not "expected": every other absent key is expected.
    assert set(report.expected_missing) == set(full) - set(online) - {
        'text_encoder_m.embeddings.position_ids'}
    state = model.state_dict()
    assert torch.equal(state['visual_encoder_m.blocks.1.attn.qkv.weight'],
                       full['visual_encoder.blocks.1.attn.qkv.weight'])
    assert torch.equal(state['text_proj_m.weight'], full['text_proj.weight'])
    assert not torch.equal(state['text_proj_m.weight'], full['text_proj_m.weight'])


def test_full_retrieval_checkpoint_loads_strictly():
    model, checkpoint = tiny_model()
    report = load_weights(model, checkpoint, 'retrieval')
    assert not report.expected_missing and not report.expected_unexpected
    full = state_dict_of(read_checkpoint(checkpoint))
    broken = {k: v for k, v in full.items() if k != 'text_proj_m.bias'}
    with pytest.raises(CheckpointError, match='text_proj_m.bias'):
        load_weights(model, broken, 'retrieval')
