"""Parity of the pre-training model with the original implementation's outputs
(tests/fixtures/original/tiny_a/pretrain, see its README.md)."""
import pytest
import torch
import torch.nn.functional as F

from models.model_pretrain import ALBEF
from models.albef_base import itc_loss
from tests.reference import STUB_TOKENIZER, assert_close, load_kind, text_batch
from models.checkpoint import load_checkpoint


@pytest.fixture(scope='module')
def fixture():
    return load_kind('pretrain')


def build(fixture):
    config, checkpoint, _, _ = fixture
    # The plain path: the seeded probes replay the original's random stream.
    model = ALBEF(config={**config, 'fast_train': False}, text_encoder=None,
                  tokenizer=STUB_TOKENIZER, init_deit=False)
    load_checkpoint(model, checkpoint, kind='pretrain')
    return model.eval()


def itc_probes(model, image_feat, text_feat, image_feat_m, text_feat_m, alpha):
    sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m = model.itc_similarities(
        image_feat, text_feat, image_feat_m, text_feat_m)
    eye = torch.zeros_like(sim_i2t_m)
    eye.fill_diagonal_(1)
    targets_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * eye
    targets_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * eye
    loss_i2t, loss_t2i = itc_loss(sim_i2t, targets_i2t), itc_loss(sim_t2i, targets_t2i)
    loss_ita, _, _ = model.forward_itc(image_feat, text_feat, image_feat_m, text_feat_m, alpha)
    return dict(sim_i2t=sim_i2t, sim_t2i=sim_t2i, sim_i2t_m=sim_i2t_m, sim_t2i_m=sim_t2i_m,
                sim_i2t_targets=targets_i2t, sim_t2i_targets=targets_t2i, loss_i2t=loss_i2t,
                loss_t2i=loss_t2i, loss_ita=loss_ita)


def momentum_encode(model, image, text):
    image_embeds_m = model.visual_encoder_m(image)
    text_embeds_m = model.text_encoder_m.bert(text.input_ids, attention_mask=text.attention_mask,
                                              mode='text').last_hidden_state
    return dict(image_embeds_m=image_embeds_m,
                image_feat_m=F.normalize(model.vision_proj_m(image_embeds_m[:, 0]), dim=-1),
                text_embeds_m=text_embeds_m,
                text_feat_m=F.normalize(model.text_proj_m(text_embeds_m[:, 0]), dim=-1))


def mlm_probes(model, inputs, image_embeds, image_embeds_m, alpha):
    ids, att, labels = inputs['mlm_input_ids'], inputs['text_att'], inputs['mlm_labels']
    logits_m = model.text_encoder_m(ids, attention_mask=att, encoder_hidden_states=image_embeds_m,
                                    return_logits=True)
    logits = model.text_encoder(ids, attention_mask=att, encoder_hidden_states=image_embeds,
                                return_logits=True)
    plain = model.text_encoder(ids, attention_mask=att, encoder_hidden_states=image_embeds,
                               labels=labels).loss
    distill = model.forward_mlm(inputs['text_ids'], att, image_embeds, image_embeds_m, alpha,
                                masked_ids=ids, labels=labels)
    return dict(mlm_logits_m=logits_m, mlm_logits=logits, loss_mlm_plain=plain,
                loss_mlm_distill=distill)


@torch.no_grad()
def test_static_probes(fixture):
    _, _, inputs, expected = fixture
    model = build(fixture)
    alpha = float(inputs['alpha'])
    text = text_batch(inputs['text_ids'], inputs['text_att'])
    image_embeds, image_feat, text_embeds, text_feat = model.encode(inputs['image'], text)
    got = dict(image_embeds=image_embeds, image_feat=image_feat, text_embeds=text_embeds,
               text_feat=text_feat,
               fusion_hidden=model.fusion(text_embeds, inputs['text_att'], image_embeds))
    got.update(momentum_encode(model, inputs['image'], text))
    got.update(itc_probes(model, image_feat, text_feat, got['image_feat_m'], got['text_feat_m'], alpha))
    w_i2t, w_t2i = model.negative_weights(got['sim_i2t'], got['sim_t2i'])
    got.update(itm_neg_weights_i2t=w_i2t, itm_neg_weights_t2i=w_t2i)
    got['loss_itm'] = model.forward_itm(image_embeds, text_embeds, inputs['text_att'],
                                        neg_img_idx=inputs['neg_img_idx'],
                                        neg_txt_idx=inputs['neg_txt_idx'])
    neg_img, neg_txt = inputs['neg_img_idx'], inputs['neg_txt_idx']
    pos = model.fusion(text_embeds, inputs['text_att'], image_embeds)
    neg = model.fusion(torch.cat([text_embeds, text_embeds[neg_txt]]),
                       torch.cat([inputs['text_att'], inputs['text_att'][neg_txt]]),
                       torch.cat([image_embeds[neg_img], image_embeds]))
    got['itm_logits'] = model.itm_head(torch.cat([pos[:, 0], neg[:, 0]]))
    got['itm_logits_pos'] = got['itm_logits'][:4]
    got.update(mlm_probes(model, inputs, image_embeds, got['image_embeds_m'], alpha))
    static = [k for k in expected if not k.startswith(('fwd_', 'seeded_'))]
    assert set(static) == set(got), set(static) ^ set(got)
    for name in static:
        assert_close(got[name], expected[name], name)


@torch.no_grad()
def test_forward_probes_after_momentum_update(fixture):
    _, _, inputs, expected = fixture
    model = build(fixture)
    alpha = float(inputs['alpha'])
    text = text_batch(inputs['text_ids'], inputs['text_att'])
    image_embeds, image_feat, _, text_feat = model.encode(inputs['image'], text)
    image_feat_m, text_feat_m, image_embeds_m = model.momentum_features(inputs['image'], text)
    state = model.state_dict()
    for name in [k for k in expected if k.startswith('fwd_param.')]:
        assert_close(state[name[len('fwd_param.'):]], expected[name], name)
    got = {f'fwd_{k}': v for k, v in momentum_encode(model, inputs['image'], text).items()}
    assert_close(image_feat_m, expected['fwd_image_feat_m'], 'momentum_features image')
    assert_close(text_feat_m, expected['fwd_text_feat_m'], 'momentum_features text')
    got.update({f'fwd_{k}': v for k, v in
                itc_probes(model, image_feat, text_feat, image_feat_m, text_feat_m, alpha).items()})
    got['fwd_mlm_logits_m'] = model.text_encoder_m(
        inputs['mlm_input_ids'], attention_mask=inputs['text_att'],
        encoder_hidden_states=image_embeds_m, return_logits=True)
    got['fwd_loss_mlm_distill'] = model.forward_mlm(
        inputs['text_ids'], inputs['text_att'], image_embeds, image_embeds_m, alpha,
        masked_ids=inputs['mlm_input_ids'], labels=inputs['mlm_labels'])
    model._dequeue_and_enqueue(image_feat_m, text_feat_m)
    got.update(fwd_image_queue=model.image_queue, fwd_text_queue=model.text_queue,
               fwd_queue_ptr=model.queue_ptr)
    names = [k for k in expected if k.startswith('fwd_') and not k.startswith('fwd_param.')]
    assert set(names) == set(got), set(names) ^ set(got)
    for name in names:
        assert_close(got[name], expected[name], name)


def test_seeded_forward_replays_the_original_random_stream(fixture):
    _, _, inputs, expected = fixture
    model = build(fixture)
    torch.manual_seed(int(inputs['seeded_forward_seed']))
    with torch.no_grad():
        loss_mlm, loss_ita, loss_itm = model(inputs['image'],
                                             text_batch(inputs['text_ids'], inputs['text_att']),
                                             alpha=float(inputs['alpha']))
    assert_close(loss_mlm, expected['seeded_loss_mlm'], 'seeded_loss_mlm')
    assert_close(loss_ita, expected['seeded_loss_ita'], 'seeded_loss_ita')
    assert_close(loss_itm, expected['seeded_loss_itm'], 'seeded_loss_itm')
    assert_close(model.image_queue, expected['seeded_image_queue'], 'seeded_image_queue')
    assert_close(model.text_queue, expected['seeded_text_queue'], 'seeded_text_queue')
    assert_close(model.queue_ptr, expected['seeded_queue_ptr'], 'seeded_queue_ptr')


def test_seeded_draws_match_recorded_choices(fixture):
    """The negative indices and MLM masking drawn after the seed are the original's."""
    _, _, inputs, expected = fixture
    model = build(fixture)
    text = text_batch(inputs['text_ids'], inputs['text_att'])
    torch.manual_seed(int(inputs['seeded_forward_seed']))
    with torch.no_grad():
        image_embeds, image_feat, text_embeds, text_feat = model.encode(inputs['image'], text)
        image_feat_m, text_feat_m, _ = model.momentum_features(inputs['image'], text)
        _, sim_i2t, sim_t2i = model.forward_itc(image_feat, text_feat, image_feat_m, text_feat_m, 0.4)
        w_i2t, w_t2i = model.negative_weights(sim_i2t, sim_t2i)
        from models.albef_base import sample_negatives
        neg_img, neg_txt = sample_negatives(w_t2i), sample_negatives(w_i2t)
        ids, labels = model.mask(inputs['text_ids'], 1000, 'cpu', targets=inputs['text_ids'].clone())
    assert torch.equal(neg_img, expected['seeded_neg_img_idx'])
    assert torch.equal(neg_txt, expected['seeded_neg_txt_idx'])
    assert torch.equal(ids, expected['seeded_mlm_input_ids'])
    assert torch.equal(labels, expected['seeded_mlm_labels'])
