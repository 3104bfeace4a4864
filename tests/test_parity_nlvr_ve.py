"""Parity of the SNLI-VE, NLVR2 and text-assignment models with the original implementation's
outputs (tests/fixtures/original/tiny_a/{ve,nlvr,pretrain_nlvr}, see its README.md)."""
import pytest
import torch
import torch.nn.functional as F

from models import model_nlvr, model_pretrain_nlvr, model_ve
from models.checkpoint import load_checkpoint
from tests.reference import STUB_TOKENIZER, assert_close, load_kind, text_batch

MODULES = {'ve': model_ve, 'nlvr': model_nlvr, 'pretrain_nlvr': model_pretrain_nlvr}


@pytest.fixture(scope='module')
def fixtures():
    return {kind: load_kind(kind) for kind in MODULES}


def build(kind, fixtures):
    config, checkpoint, _, _ = fixtures[kind]
    model = MODULES[kind].ALBEF(config=config, text_encoder=None, tokenizer=STUB_TOKENIZER)
    load_checkpoint(model, checkpoint, kind=kind)
    return model.eval()


def images_of(kind, inputs):
    if kind == 'nlvr':
        return torch.cat([inputs['image0'], inputs['image1']])  # (2B, 3, H, W)
    return inputs['image']


def shared_pairs(text_encoder):
    config, layers = text_encoder.config, text_encoder.encoder.layer
    return [(layers[n].crossattention.self, layers[n + 1].crossattention.self)
            for n in range(config.fusion_layer, config.num_hidden_layers, 2)]


@torch.no_grad()
def test_ve_static_probes(fixtures):
    _, _, inputs, expected = fixtures['ve']
    model = build('ve', fixtures)
    text = text_batch(inputs['text_ids'], inputs['text_att'])
    image_embeds = model.visual_encoder(inputs['image'])
    hidden = model.encode(inputs['image'], text, model.visual_encoder, model.text_encoder)
    got = dict(image_embeds=image_embeds, last_hidden_state=hidden,
               logits=model(inputs['image'], text, inputs['targets'], train=False))
    for name, value in got.items():
        assert_close(value, expected[name], name)


@torch.no_grad()
def test_nlvr_static_probes(fixtures):
    _, _, inputs, expected = fixtures['nlvr']
    model = build('nlvr', fixtures)
    text = text_batch(inputs['text_ids'], inputs['text_att'])
    images = images_of('nlvr', inputs)
    image0_embeds, image1_embeds = model.visual_encoder(images).chunk(2)
    hidden = model.encode(images, text, model.visual_encoder, model.text_encoder)
    got = dict(image0_embeds=image0_embeds, image1_embeds=image1_embeds, last_hidden_state=hidden,
               logits=model(images, text, inputs['targets'], train=False))
    for name, value in got.items():
        assert_close(value, expected[name], name)


@pytest.mark.parametrize('kind', ['ve', 'nlvr'])
@pytest.mark.parametrize('alpha', ['0', '0.4'])
def test_training_loss_on_a_fresh_model(fixtures, kind, alpha):
    """The training loss of one forward, the teacher taken after the internal EMA step."""
    _, _, inputs, expected = fixtures[kind]
    model = build(kind, fixtures)
    loss = model(images_of(kind, inputs), text_batch(inputs['text_ids'], inputs['text_att']),
                 inputs['targets'], alpha=float(alpha), train=True)
    assert_close(loss, expected[f'train_loss_alpha{alpha}'], f'{kind} train_loss_alpha{alpha}')
    loss.backward()
    assert model.cls_head[0].weight.grad is not None
    assert all(p.grad is None for p in model.cls_head_m.parameters())


def test_distillation_uses_the_teacher_after_the_momentum_step(fixtures):
    """Not the stored momentum weights: the loss with a stale teacher differs."""
    _, _, inputs, expected = fixtures['ve']
    model = build('ve', fixtures)
    text = text_batch(inputs['text_ids'], inputs['text_att'])
    with torch.no_grad():
        logits = model(inputs['image'], text, inputs['targets'], train=False)
        hidden_m = model.encode(inputs['image'], text, model.visual_encoder_m, model.text_encoder_m)
        stale = model_ve.distilled_cross_entropy(logits, inputs['targets'],
                                                 model.cls_head_m(hidden_m[:, 0]), 0.4)
    assert (stale - expected['train_loss_alpha0.4']).abs() > 1e-5
    assert_close(model_ve.distilled_cross_entropy(logits, inputs['targets']),
                 expected['train_loss_alpha0'], 'plain CE')


@pytest.mark.parametrize('kind', ['nlvr', 'pretrain_nlvr'])
def test_two_image_encoder_shares_key_value_within_each_pair(fixtures, kind):
    config = fixtures[kind][0]
    model = MODULES[kind].ALBEF(config=config, tokenizer=STUB_TOKENIZER)
    encoders = [model.text_encoder] + ([model.text_encoder_m] if kind == 'nlvr' else [])
    for encoder in encoders:
        # tiny: 4 layers, fusion 2 -> 2 + 2 * 2 = 6 layers, pairs (2, 3) and (4, 5)
        assert encoder.config.num_hidden_layers == 6
        pairs = shared_pairs(encoder)
        assert len(pairs) == 2
        for first, second in pairs:
            assert first.key.weight is second.key.weight and first.value.bias is second.value.bias
            assert first.query.weight is not second.query.weight
    if kind == 'nlvr':
        online = list(model.text_encoder.parameters())
        momentum = list(model.text_encoder_m.parameters())
        assert [p.shape for p in online] == [p.shape for p in momentum]
        assert len(online) == len(list(model.text_encoder.state_dict())) - 1 - 8  # 8 shared aliases


def test_nlvr_momentum_update_moves_shared_weights_once(fixtures):
    model = build('nlvr', fixtures)
    pair_m = shared_pairs(model.text_encoder_m)[0]
    pair = shared_pairs(model.text_encoder)[0]
    before = pair_m[1].key.weight.clone()
    model._momentum_update()
    expected = before * 0.995 + pair[1].key.weight * 0.005
    assert torch.equal(pair_m[1].key.weight, expected)
    assert pair_m[0].key.weight is pair_m[1].key.weight


@torch.no_grad()
def test_text_assignment_static_probes(fixtures):
    _, _, inputs, expected = fixtures['pretrain_nlvr']
    model = build('pretrain_nlvr', fixtures)
    text = text_batch(inputs['text_ids'], inputs['text_att'])
    image_embeds = model.visual_encoder(inputs['image'])
    img0, img1 = inputs['img0_idx'], inputs['img1_idx']
    atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    hidden = model.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                encoder_hidden_states=[image_embeds[img0], image_embeds[img1]],
                                encoder_attention_mask=[atts, atts]).last_hidden_state
    ta_logits = model.forward_ta(image_embeds, text, img0, img1)
    got = dict(image_embeds=image_embeds,
               image_feat=F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1),
               pair_weights=model.pair_weights(image_embeds), last_hidden_state=hidden,
               ta_logits=ta_logits, loss_ta=F.cross_entropy(ta_logits, inputs['labels']))
    static = [k for k in expected if not k.startswith('seeded_')]
    assert set(static) == set(got)
    for name in static:
        assert_close(got[name], expected[name], name)


def test_text_assignment_seeded_forward_replays_the_original_draws(fixtures):
    _, _, inputs, expected = fixtures['pretrain_nlvr']
    model = build('pretrain_nlvr', fixtures)
    text = text_batch(inputs['text_ids'], inputs['text_att'])
    with torch.no_grad():
        weights = model.pair_weights(model.visual_encoder(inputs['image']))
    torch.manual_seed(int(inputs['seeded_forward_seed']))
    img0, img1, labels = model.sample_assignment(weights)
    assert torch.equal(img0, expected['seeded_img0_idx'])
    assert torch.equal(img1, expected['seeded_img1_idx'])
    assert torch.equal(labels, expected['seeded_labels'])
    # a caption's own image is in the pair exactly when the label is 0 or 1, at that position
    own = torch.arange(len(labels))
    assert torch.equal(labels == 0, img0 == own) and torch.equal(labels == 1, img1 == own)

    torch.manual_seed(int(inputs['seeded_forward_seed']))
    with torch.no_grad():
        loss = model(inputs['image'], text)
    assert_close(loss, expected['seeded_loss_ta'], 'seeded_loss_ta')


@pytest.mark.parametrize('kind', ['ve', 'nlvr'])
def test_without_distillation_no_momentum_model_and_plain_cross_entropy(fixtures, kind):
    config, checkpoint, inputs, expected = fixtures[kind]
    model = MODULES[kind].ALBEF(config={**config, 'distill': False}, tokenizer=STUB_TOKENIZER)
    load_checkpoint(model, checkpoint, allow_unexpected=(r'[a-z_]+_m\..*',))
    assert not any(name.endswith('_m') for name, _ in model.named_children())
    with torch.no_grad():
        text = text_batch(inputs['text_ids'], inputs['text_att'])
        loss = model.eval()(images_of(kind, inputs), text,
                            inputs['targets'], alpha=0.4)
    assert_close(loss, expected['train_loss_alpha0'], f'{kind} loss without distillation')
