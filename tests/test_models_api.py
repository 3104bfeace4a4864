"""The original public surface: call signatures, outputs, modes and attention recording."""
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.model_pretrain import ALBEF
from models.xbert import BertConfig, BertLMHeadModel
from tests.reference import STUB_TOKENIZER, load_kind


@pytest.fixture(scope='module')
def model():
    config, checkpoint, _, _ = load_kind('pretrain')
    model = ALBEF(config=config, text_encoder=None, tokenizer=STUB_TOKENIZER, init_deit=False)
    load_checkpoint(model, checkpoint, kind='pretrain')
    return model.eval()


@pytest.fixture(scope='module')
def inputs():
    return load_kind('pretrain')[2]


def test_text_then_fusion_equals_multi_modal(model, inputs):
    ids, att = inputs['text_ids'], inputs['text_att']
    image_embeds = model.visual_encoder(inputs['image'])
    bert = model.text_encoder.bert
    with torch.no_grad():
        text = bert(ids, attention_mask=att, return_dict=True, mode='text')
        fused = bert(encoder_embeds=text.last_hidden_state, attention_mask=att,
                     encoder_hidden_states=image_embeds, return_dict=True, mode='fusion')
        full = bert(ids, attention_mask=att, encoder_hidden_states=image_embeds, return_dict=False)
    assert torch.allclose(fused.last_hidden_state, full.last_hidden_state, atol=1e-6)
    assert torch.equal(full[0], full.last_hidden_state)  # tuple-style access still works
    with pytest.raises(ValueError, match='needs encoder_hidden_states'):
        bert(ids, attention_mask=att, mode='multi_modal')
    with pytest.raises(ValueError, match='unknown mode'):
        bert(ids, attention_mask=att, mode='vision')


def test_vit_records_attention_map_and_gradient_of_the_registered_block(model, inputs):
    image = inputs['image'][:2]
    out = model.visual_encoder(image, register_blk=1)
    out[:, 0].sum().backward()
    attn = model.visual_encoder.blocks[1].attn
    assert attn.get_attention_map().shape == (2, 4, 17, 17)
    assert attn.get_attn_gradients().shape == (2, 4, 17, 17)
    assert torch.allclose(attn.get_attention_map().sum(-1), torch.ones(2, 4, 17))
    assert model.visual_encoder.blocks[0].attn.get_attention_map() is None
    # the recording path gives the same output as the fused SDPA path
    assert torch.allclose(out, model.visual_encoder(image), atol=1e-5)
    model.zero_grad()


def test_cross_attention_records_maps_for_gradcam(model, inputs):
    layer = model.text_encoder.bert.encoder.layer[3].crossattention.self
    ids, att = inputs['text_ids'], inputs['text_att']
    image_embeds = model.visual_encoder(inputs['image']).detach()
    layer.save_attention = True
    try:
        out = model.text_encoder.bert(ids, attention_mask=att, encoder_hidden_states=image_embeds,
                                      return_dict=True)
        model.itm_head(out.last_hidden_state[:, 0])[:, 1].sum().backward()
    finally:
        layer.save_attention = False
    assert layer.get_attention_map().shape == (4, 4, ids.shape[1], 17)
    assert layer.get_attn_gradients().shape == (4, 4, ids.shape[1], 17)
    model.zero_grad()


def test_decoder_loss_is_summed_per_sequence():
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, fusion_layer=0, encoder_width=16,
                        max_position_embeddings=16)
    decoder = BertLMHeadModel(config).eval()
    ids = torch.randint(5, 50, (3, 6))
    att = torch.ones_like(ids)
    states = torch.randn(3, 4, 16)
    labels = ids.masked_fill(torch.arange(6) >= 4, -100)
    out = decoder(ids, attention_mask=att, encoder_hidden_states=states, labels=labels,
                  reduction='none')
    logits = out.logits[:, :-1]
    manual = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:],
                                               reduction='none').sum(1)
    assert out.loss.shape == (3,) and torch.allclose(out.loss, manual, atol=1e-5)
    # causal: changing a later token does not change earlier logits
    ids2 = ids.clone()
    ids2[:, -1] = 7
    out2 = decoder(ids2, attention_mask=att, encoder_hidden_states=states, return_logits=True)
    assert torch.allclose(out2[:, :-1], logits[:, :-1], atol=1e-5)


def test_decoder_mean_reduction_is_the_token_mean():
    """NOTE(fixed) in xbert.BertLMHeadModel: reduction='mean' crashed in the original; it is
    the mean over the predicted (non -100) tokens."""
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, fusion_layer=0, encoder_width=16,
                        max_position_embeddings=16)
    torch.manual_seed(0)
    decoder = BertLMHeadModel(config).eval()
    ids = torch.randint(5, 50, (3, 6))
    labels = ids.masked_fill(torch.arange(6) >= 4, -100)
    out = decoder(ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=torch.randn(3, 4, 16),
                  labels=labels, reduction='mean')
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), labels[:, 1:])
    assert out.loss.dim() == 0 and torch.allclose(out.loss, manual, atol=1e-6)
