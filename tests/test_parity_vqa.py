"""Parity of the VQA model with the original implementation's outputs
(tests/fixtures/original/tiny_a/vqa, see its README.md)."""
import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import load_checkpoint
from models.model_vqa import ALBEF
from tests.reference import STUB_TOKENIZER, assert_close, load_kind, text_batch

# Probes whose values are ~1e-3: compared relative to their own scale (README "Tolerances").
SMALL = ('rank_first_token_probs', 'rank_first_topk_probs')


@pytest.fixture(scope='module')
def fixture():
    return load_kind('vqa')


def build(fixture):
    config, checkpoint, _, _ = fixture
    # The plain training path (fast_train is tested against it in test_fast_train.py).
    model = ALBEF(config={**config, 'fast_train': False}, text_encoder=None, text_decoder=None,
                  tokenizer=STUB_TOKENIZER)
    load_checkpoint(model, checkpoint, kind='vqa')
    return model.eval()


def check(got, expected):
    for name, value in got.items():
        ref = expected[name]
        atol = 1e-4 * ref.abs().max().item() if name in SMALL else 1e-5
        assert_close(value, ref, name, atol=atol)


def batches(inputs):
    question = text_batch(inputs['question_ids'], inputs['question_att'])
    answer_list = text_batch(inputs['answer_list_ids'], inputs['answer_list_att'])
    train_answer = text_batch(inputs['train_answer_ids'], inputs['train_answer_att'])
    return question, answer_list, train_answer


@torch.no_grad()
def test_encoder_and_answer_ranking_probes(fixture):
    _, _, inputs, expected = fixture
    model = build(fixture)
    question, answer_list, _ = batches(inputs)
    k = int(inputs['k'])
    image_embeds = model.visual_encoder(inputs['image'])
    states = model.encode_question(inputs['image'], question, model.visual_encoder,
                                   model.text_encoder)
    ids, atts = answer_list.input_ids, answer_list.attention_mask
    first_probs, first_logits = model.first_token_probs(states, question.attention_mask, ids)
    first_topk_probs, first_topk_ids = first_probs.topk(k, dim=1)
    flat = first_topk_ids.reshape(-1)
    nll = model.candidate_nll(states.repeat_interleave(k, 0),
                              question.attention_mask.repeat_interleave(k, 0), ids[flat],
                              atts[flat]).view(-1, k)
    topk_ids, topk_probs = model(inputs['image'], question, answer_list, k=k, train=False)
    check(dict(image_embeds=image_embeds, question_states=states,
               rank_first_token_logits=first_logits, rank_first_token_probs=first_probs,
               rank_first_topk_probs=first_topk_probs, rank_first_topk_ids=first_topk_ids,
               rank_candidate_nll=nll, rank_candidate_logprob=first_topk_probs.log() - nll,
               rank_topk_ids=topk_ids, rank_topk_probs=topk_probs), expected)


@torch.no_grad()
def test_ranking_equals_a_plain_per_candidate_path(fixture):
    """rank_answer encodes each question once; recomputing image and question states for every
    candidate and decoding candidates one at a time gives the same scores."""
    _, _, inputs, _ = fixture
    model = build(fixture)
    question, answer_list, _ = batches(inputs)
    k = int(inputs['k'])
    vit_calls = []
    hook = model.visual_encoder.register_forward_hook(lambda *args: vit_calls.append(1))
    topk_ids, topk_probs = model(inputs['image'], question, answer_list, k=k, train=False)
    hook.remove()
    assert len(vit_calls) == 1

    ids, atts = answer_list.input_ids, answer_list.attention_mask
    scores = torch.empty(inputs['image'].size(0), k)
    candidates = torch.empty_like(scores, dtype=torch.long)
    for q in range(inputs['image'].size(0)):
        one_question = text_batch(question.input_ids[q:q + 1], question.attention_mask[q:q + 1])
        states = model.encode_question(inputs['image'][q:q + 1], one_question,
                                       model.visual_encoder, model.text_encoder)
        first, _ = model.first_token_probs(states, one_question.attention_mask, ids)
        probs, chosen = first[0].topk(k)
        for j in range(k):
            states = model.encode_question(inputs['image'][q:q + 1], one_question,
                                           model.visual_encoder, model.text_encoder)
            a = chosen[j]
            logits = model.text_decoder(ids[a:a + 1], attention_mask=atts[a:a + 1],
                                        encoder_hidden_states=states,
                                        encoder_attention_mask=one_question.attention_mask).logits
            logp = F.log_softmax(logits[0, :-1], dim=-1)
            target = ids[a, 1:]
            keep = target != STUB_TOKENIZER.pad_token_id
            nll = -logp[torch.arange(len(target))[keep], target[keep]].sum()
            scores[q, j] = probs[j].log() - nll  # first token counted twice, as the original
            candidates[q, j] = a
    probs, order = F.softmax(scores, dim=1).sort(dim=1, descending=True)
    assert torch.equal(topk_ids, candidates.gather(1, order))
    assert_close(topk_probs, probs, 'per-candidate rank_topk_probs')


@torch.no_grad()
def test_teacher_forced_decoder_on_training_answers(fixture):
    _, _, inputs, expected = fixture
    model = build(fixture)
    question, _, answer = batches(inputs)
    states = model.encode_question(inputs['image'], question, model.visual_encoder,
                                   model.text_encoder)
    counts = inputs['train_n']
    question_atts = question.attention_mask.repeat_interleave(counts, 0)
    output = model.text_decoder(answer.input_ids, attention_mask=answer.attention_mask,
                                encoder_hidden_states=states.repeat_interleave(counts, 0),
                                encoder_attention_mask=question_atts,
                                labels=model.answer_targets(answer.input_ids), reduction='none')
    check(dict(train_decoder_logits=output.logits, train_answer_nll=output.loss), expected)


@pytest.mark.parametrize('alpha', ['0', '0.4'])
def test_training_loss_on_a_fresh_model(fixture, alpha):
    _, _, inputs, expected = fixture
    model = build(fixture)
    question, _, answer = batches(inputs)
    loss = model(inputs['image'], question, answer, alpha=float(alpha), k=inputs['train_n'],
                 weights=inputs['train_weights'], train=True)
    assert_close(loss, expected[f'train_loss_alpha{alpha}'], f'train_loss_alpha{alpha}')
    loss.backward()
    assert model.text_decoder.cls.predictions.bias.grad is not None
    assert model.text_decoder_m.cls.predictions.bias.grad is None


@torch.no_grad()
def test_teacher_logits_and_per_answer_loss_after_the_momentum_step(fixture):
    _, _, inputs, expected = fixture
    model = build(fixture)
    question, _, answer = batches(inputs)
    counts = inputs['train_n']
    stale = model.text_decoder_m.cls.predictions.bias.clone()
    teacher = model.teacher_logits(inputs['image'], question, answer, counts)
    assert not torch.equal(stale, model.text_decoder_m.cls.predictions.bias)  # EMA step ran
    model = build(fixture)  # answer_loss runs its own EMA step
    states = model.encode_question(inputs['image'], question, model.visual_encoder,
                                   model.text_encoder)
    per_answer = model.answer_loss(inputs['image'], question, states, answer, counts, alpha=0.4)
    check({'fwd_train_teacher_logits_alpha0.4': teacher,
           'fwd_train_answer_loss_alpha0.4': per_answer}, expected)


def test_without_distillation_the_loss_is_the_weighted_nll(fixture):
    config, checkpoint, inputs, expected = fixture
    model = ALBEF(config={**config, 'distill': False}, tokenizer=STUB_TOKENIZER)
    load_checkpoint(model, checkpoint, allow_unexpected=(r'[a-z_]+_m\..*',))
    assert not hasattr(model, 'text_decoder_m')
    question, _, answer = batches(inputs)
    with torch.no_grad():
        loss = model.eval()(inputs['image'], question, answer, alpha=0.4, k=inputs['train_n'],
                            weights=inputs['train_weights'])
    assert_close(loss, expected['train_loss_alpha0'], 'loss without distillation')
