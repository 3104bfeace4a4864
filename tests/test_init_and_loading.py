"""Initialisation from BERT / DeiT files written by transformers and timm themselves, and the
checkpoint loader's report and errors."""
import copy
import random

import numpy as np
import pytest
import timm
import torch
import transformers

from models.checkpoint import TRUST_PICKLE_ENV, CheckpointError, load_checkpoint, read_checkpoint
from models.model_pretrain import ALBEF
from models.pretrained import PretrainedWeightsError
from models.vit import interpolate_pos_embed
from tests.reference import STUB_TOKENIZER, load_kind


@pytest.fixture(scope='module')
def tiny():
    config, checkpoint, _, _ = load_kind('pretrain')
    return config, checkpoint


def hf_bert_dir(tmp_path, hidden=64, layers=4, vocab=1000):
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(config)
    path = tmp_path / f'bert_{hidden}_{layers}'
    hf.save_pretrained(path)
    return path, hf.state_dict()


def test_bert_weights_load_into_text_encoder(tmp_path, tiny):
    config, _ = tiny
    path, hf_state = hf_bert_dir(tmp_path)
    model = ALBEF(config=config, text_encoder=str(path), tokenizer=STUB_TOKENIZER, init_deit=False)
    ours = model.text_encoder.state_dict()
    for key in ('bert.embeddings.word_embeddings.weight',
                'bert.encoder.layer.0.attention.self.query.weight',
                'bert.encoder.layer.3.output.dense.weight', 'cls.predictions.transform.dense.weight',
                'cls.predictions.bias'):
        assert torch.equal(ours[key], hf_state[key]), key
    # the decoder stays tied to the word embeddings after loading
    assert model.text_encoder.cls.predictions.decoder.weight is \
        model.text_encoder.bert.embeddings.word_embeddings.weight
    # the momentum copy starts from the loaded weights
    assert torch.equal(model.text_encoder_m.state_dict()['bert.encoder.layer.1.attention.self.key.weight'],
                       hf_state['bert.encoder.layer.1.attention.self.key.weight'])


def test_bert_weights_of_the_wrong_size_fail_loudly(tmp_path, tiny):
    config, _ = tiny
    path, _ = hf_bert_dir(tmp_path, hidden=32)
    with pytest.raises(PretrainedWeightsError, match='shape mismatches'):
        ALBEF(config=config, text_encoder=str(path), tokenizer=STUB_TOKENIZER, init_deit=False)
    with pytest.raises(PretrainedWeightsError, match='cannot load BERT weights'):
        ALBEF(config=config, text_encoder=str(tmp_path / 'missing'), tokenizer=STUB_TOKENIZER,
              init_deit=False)


def deit_file(tmp_path, width=64, depth=2, heads=4):
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=width, depth=depth, num_heads=heads, num_classes=10)
    path = tmp_path / f'deit_{width}.pth'
    torch.save({'model': vit.state_dict()}, path)
    return path, vit.state_dict()


def test_deit_weights_load_with_interpolated_positions(tmp_path, tiny):
    config, _ = tiny
    path, deit_state = deit_file(tmp_path)
    model = ALBEF(config=config, tokenizer=STUB_TOKENIZER, init_deit=str(path))
    ours = model.visual_encoder.state_dict()
    assert torch.equal(ours['blocks.1.attn.qkv.weight'], deit_state['blocks.1.attn.qkv.weight'])
    assert torch.equal(ours['cls_token'], deit_state['cls_token'])
    expected_pos = interpolate_pos_embed(deit_state['pos_embed'], model.visual_encoder)
    assert expected_pos.shape == (1, 17, 64)
    assert torch.equal(ours['pos_embed'], expected_pos)
    assert torch.equal(model.visual_encoder_m.state_dict()['blocks.0.mlp.fc1.weight'],
                       deit_state['blocks.0.mlp.fc1.weight'])


def test_deit_weights_that_do_not_fit_fail_loudly(tmp_path, tiny):
    config, _ = tiny
    path, _ = deit_file(tmp_path, width=32)
    with pytest.raises(PretrainedWeightsError, match='do not fit'):
        ALBEF(config=config, tokenizer=STUB_TOKENIZER, init_deit=str(path))
    with pytest.raises(PretrainedWeightsError, match='does not exist'):
        ALBEF(config=config, tokenizer=STUB_TOKENIZER, init_deit=str(tmp_path / 'nope.pth'))
    bogus = tmp_path / 'bogus.pth'
    torch.save({'model': {'foo': torch.zeros(1)}}, bogus)
    with pytest.raises(PretrainedWeightsError, match='no pos_embed'):
        ALBEF(config=config, tokenizer=STUB_TOKENIZER, init_deit=str(bogus))


def fresh(config, **changes):
    return ALBEF(config={**config, **changes}, tokenizer=STUB_TOKENIZER, init_deit=False)


def test_loader_accepts_released_and_plain_layouts(tmp_path, tiny):
    config, checkpoint = tiny
    model = fresh(config)
    report = load_checkpoint(model, checkpoint, kind='pretrain')
    assert not report.errors and len(report.loaded) == len(model.state_dict())
    state = torch.load(checkpoint, weights_only=True)['model']
    plain = {k: v for k, v in state.items() if not k.endswith('position_ids')}
    report = load_checkpoint(fresh(config), plain, kind='pretrain')
    assert len(report.tolerated) == 2  # the two position_ids buffers


def test_loader_interpolates_positions_for_another_resolution(tiny):
    config, checkpoint = tiny
    model = fresh(config, image_res=96)  # 6x6 grid instead of 4x4
    load_checkpoint(model, checkpoint, kind='pretrain')
    assert model.visual_encoder.pos_embed.shape == (1, 37, 64)
    state = torch.load(checkpoint, weights_only=True)['model']
    assert torch.equal(model.visual_encoder.pos_embed[:, 0], state['visual_encoder.pos_embed'][:, 0])


def test_loader_rejects_wrong_kind_shapes_and_corrupt_files(tmp_path, tiny):
    config, checkpoint = tiny
    retrieval = load_kind('retrieval')[1]
    with pytest.raises(CheckpointError, match="looks like a 'retrieval' checkpoint"):
        load_checkpoint(fresh(config), retrieval, kind='pretrain')
    state = torch.load(checkpoint, weights_only=True)['model']
    bad = copy.copy(state)
    bad['itm_head.weight'] = torch.zeros(3, 64)
    model = fresh(config)
    before = model.visual_encoder.cls_token.detach().clone()
    with pytest.raises(CheckpointError, match=r'itm_head.weight: checkpoint \(3, 64\)'):
        load_checkpoint(model, bad)
    assert torch.equal(model.visual_encoder.cls_token, before), 'nothing may load on error'
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match='unreadable'):
        load_checkpoint(fresh(config), truncated)
    with pytest.raises(CheckpointError, match='does not exist'):
        load_checkpoint(fresh(config), tmp_path / 'nothing.pth')


class _CreatesAFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


def test_a_checkpoint_holding_python_objects_is_refused_before_any_code_runs(tmp_path, monkeypatch):
    marker = tmp_path / 'code_ran'
    path = tmp_path / 'malicious.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'payload': _CreatesAFileWhenUnpickled(str(marker))},
               path)
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    with pytest.raises(CheckpointError, match=r"malicious.pth' holds Python objects beyond tensors "
                                              r"and plain data \(it names .*open\).*ALBEF_TRUST_PICKLE=1"):
        read_checkpoint(path)
    assert not marker.exists()
    # the explicit opt-in unpickles it
    monkeypatch.setenv(TRUST_PICKLE_ENV, '1')
    assert read_checkpoint(path)['model']['w'].shape == (1,) and marker.exists()


def test_training_checkpoints_load_weights_only(tmp_path):
    """Everything engine.Run stores (RNG states included) is tensors and plain data."""
    import engine
    path = tmp_path / 'run.pth'
    torch.save({'resume': {'rng': [engine.rng_state()]}}, path)
    state = torch.load(path, weights_only=True)['resume']['rng'][0]
    before = torch.rand(3), np.random.rand(3), random.random()
    engine.set_rng_state(state)
    again = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(before[0], again[0]) and (before[1] == again[1]).all() and before[2] == again[2]


def test_training_checkpoints_of_earlier_versions_with_numpy_rng_states_still_load(tmp_path):
    path = tmp_path / 'earlier.pth'
    torch.save({'resume': {'rng': [{'numpy': np.random.get_state()}]}}, path)
    keys = read_checkpoint(path)['resume']['rng'][0]['numpy'][1]
    assert isinstance(keys, np.ndarray) and keys.dtype == np.uint32
