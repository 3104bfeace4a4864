"""The fast training path (config `fast_train`) against the plain path that mirrors the
original: same weights, inputs, masks and negative choices -> same losses, gradients, momentum
weights and queues, to float32 rounding."""
import copy
import types

import torch

from models.albef_base import mask_tokens, sample_negatives_batched
from models.model_pretrain import ALBEF

TOKENIZER = types.SimpleNamespace(pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, fusion_layer=2,
            num_attention_heads=2, intermediate_size=64, encoder_width=32,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CONFIG = dict(image_res=32, patch_size=8, vision_width=32, vit_depth=2, vit_heads=2, embed_dim=16,
              bert_config=BERT, mlm_probability=0.3, queue_size=16, momentum=0.9, temp=0.07)
B, L = 4, 9


def inputs():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(B, 3, 32, 32, generator=g)
    ids = torch.randint(4, 64, (B, L), generator=g)
    ids[:, 0] = TOKENIZER.cls_token_id
    att = torch.ones(B, L, dtype=torch.long)
    for b, length in enumerate([9, 7, 5, 8]):  # padded captions
        ids[b, length:] = TOKENIZER.pad_token_id
        att[b, length:] = 0
    torch.manual_seed(2)
    masked_ids, labels = mask_tokens(ids, 64, TOKENIZER, 0.3, targets=ids.clone())
    draws = dict(neg_img_idx=torch.tensor([1, 0, 1, 2]), neg_txt_idx=torch.tensor([3, 3, 0, 1]),
                 masked_ids=masked_ids, mlm_labels=labels)
    return image, types.SimpleNamespace(input_ids=ids, attention_mask=att), draws


def plain_and_fast(**config):
    torch.manual_seed(0)
    plain = ALBEF(config={**CONFIG, **config, 'fast_train': False}, tokenizer=TOKENIZER,
                  init_deit=False)
    with torch.no_grad():  # online != momentum weights, so the EMA step is exercised
        for p in plain.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    fast = copy.deepcopy(plain)
    fast.fast_train = True
    return plain.train(), fast.train()


def step(model, image, text, draws, alpha=0.4):
    model.zero_grad()
    losses = model(image, text, alpha=alpha, **draws)
    sum(losses).backward()
    return losses


def assert_same_step(plain, fast, atol=1e-5):
    image, text, draws = inputs()
    for _ in range(2):  # the second step sees the updated queues and momentum weights
        for name, p, f in zip(('mlm', 'ita', 'itm'), step(plain, image, text, draws),
                              step(fast, image, text, draws)):
            assert torch.allclose(p, f, atol=atol, rtol=0), (name, p.item(), f.item())
        fast_params = dict(fast.named_parameters())
        checked = 0
        for name, p in plain.named_parameters():
            f = fast_params[name]
            if f.grad is not None:  # dense, as the optimisers expect (fused AdamW too)
                assert f.grad.layout == torch.strided, name
            if p.grad is None:
                assert f.grad is None, name
                continue
            assert torch.allclose(p.grad, f.grad, atol=atol, rtol=1e-4), \
                f'{name}: max diff {(p.grad - f.grad).abs().max():.3g}'
            checked += 1
        assert checked > 50
        # The image encoder gets gradients through the shared cross-attention keys/values.
        assert fast.visual_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        for (name, p), f in zip(plain.named_parameters(), fast.parameters()):
            if not p.requires_grad:  # momentum weights after the EMA step
                assert torch.allclose(p, f, atol=1e-6, rtol=0), name
        for name in ('image_queue', 'text_queue', 'queue_ptr'):
            assert torch.allclose(getattr(plain, name).float(), getattr(fast, name).float(),
                                  atol=1e-6, rtol=0), name


def test_fast_path_equals_plain_path():
    assert_same_step(*plain_and_fast())


def test_fast_train_is_the_default_and_plain_is_selectable():
    assert ALBEF(config=CONFIG, tokenizer=TOKENIZER, init_deit=False).fast_train is True
    assert ALBEF(config={**CONFIG, 'fast_train': False}, tokenizer=TOKENIZER,
                 init_deit=False).fast_train is False


def test_fast_path_draws_its_own_choices():
    _, fast = plain_and_fast()
    image, text, _ = inputs()
    torch.manual_seed(0)
    losses = fast(image, text, alpha=0.4)
    assert all(torch.isfinite(loss) for loss in losses)
    sum(losses).backward()
    assert fast.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_batched_negative_sampling_follows_the_weights():
    weights = torch.tensor([[0.0, 0.7, 0.2, 0.1], [0.5, 0.0, 0.5, 0.0],
                            [0.1, 0.1, 0.0, 0.8], [0.25, 0.25, 0.5, 0.0]])
    torch.manual_seed(0)
    n = 20000
    draws = sample_negatives_batched(weights.repeat(n, 1)).view(n, 4)  # (n, 4), one call
    freq = torch.stack([torch.bincount(draws[:, r], minlength=4) for r in range(4)]).float() / n
    assert torch.all(freq[weights == 0] == 0)
    assert torch.allclose(freq, weights, atol=0.015)


def test_retrieval_fast_itm_equals_plain():
    from models.model_retrieval import ALBEF as RetrievalALBEF
    config = {**CONFIG, 'distill': True, 'queue_size': 16}
    torch.manual_seed(0)
    plain = RetrievalALBEF(config={**config, 'fast_train': False}, tokenizer=TOKENIZER).train()
    with torch.no_grad():
        for p in plain.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    fast = copy.deepcopy(plain)
    fast.fast_train = True
    image, text, draws = inputs()
    idx = torch.tensor([7, 8, 7, 9])  # texts 0 and 2 share an image id
    draws = dict(neg_img_idx=torch.tensor([1, 2, 1, 0]), neg_txt_idx=torch.tensor([1, 0, 3, 2]))
    for _ in range(2):
        results = []
        for model in (plain, fast):
            model.zero_grad()
            losses = model(image, text, 0.4, idx, **draws)
            sum(losses).backward()
            results.append((losses, {n: p.grad for n, p in model.named_parameters()}))
        (plain_losses, plain_grads), (fast_losses, fast_grads) = results
        for p, f in zip(plain_losses, fast_losses):
            assert torch.allclose(p, f, atol=1e-5, rtol=0)
        for name, g in plain_grads.items():
            if g is None:
                assert fast_grads[name] is None, name
            else:
                assert torch.allclose(g, fast_grads[name], atol=1e-5, rtol=1e-4), name
        assert fast_grads['visual_encoder.blocks.0.attn.qkv.weight'].abs().sum() > 0
    for name in ('image_queue', 'text_queue', 'idx_queue'):
        assert torch.allclose(getattr(plain, name).float(), getattr(fast, name).float(), atol=1e-6)


def test_vqa_fast_answer_loss_equals_plain():
    from models.model_vqa import ALBEF as VQAALBEF
    torch.manual_seed(0)
    plain = VQAALBEF(config={**CONFIG, 'distill': True, 'fast_train': False},
                     tokenizer=TOKENIZER).train()
    with torch.no_grad():
        for p in plain.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    fast = copy.deepcopy(plain)
    fast.fast_train = True
    image, question, _ = inputs()
    g = torch.Generator().manual_seed(3)
    k = [2, 1, 3, 1]  # answers per question
    answer_ids = torch.randint(4, 64, (sum(k), 5), generator=g)
    answer_ids[:, 0] = TOKENIZER.cls_token_id
    answer_ids[::2, 3:] = TOKENIZER.pad_token_id
    answer = types.SimpleNamespace(input_ids=answer_ids,
                                   attention_mask=(answer_ids != 0).long())
    weights = torch.rand(sum(k), generator=g)
    for _ in range(2):
        grads = []
        for model in (plain, fast):
            model.zero_grad()
            loss = model(image, question, answer, alpha=0.4, k=k, weights=weights, train=True)
            loss.backward()
            grads.append((loss, {n: p.grad for n, p in model.named_parameters()}))
        assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5, rtol=0)
        for name, g_plain in grads[0][1].items():
            g_fast = grads[1][1][name]
            assert (g_plain is None) == (g_fast is None), name
            if g_plain is not None:
                assert torch.allclose(g_plain, g_fast, atol=1e-5, rtol=1e-4), name
    for (name, p), f in zip(plain.named_parameters(), fast.parameters()):
        assert torch.allclose(p, f, atol=1e-6, rtol=0), name


def test_grouped_cross_attention_equals_gathered_keys_values():
    """select_grouped (queries stacked per image) == select (keys/values copied per text):
    outputs and gradients of queries, keys and values; images used 0, 1 and 3 times."""
    from models.xbert import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(**{**BERT, 'hidden_dropout_prob': 0.0})
    bert = BertModel(config, add_pooling_layer=False).train()
    image_embeds = torch.randn(4, 5, 32, requires_grad=True)
    text_embeds = torch.randn(6, 7, 32, requires_grad=True)
    atts = torch.ones(6, 7, dtype=torch.long)
    atts[2, 4:] = 0
    image_of_row = torch.tensor([2, 0, 2, 3, 2, 0])  # image 1 unused
    assert_same_fusion(bert, image_embeds, text_embeds, atts,
                       lambda kv: kv.select(image_of_row), lambda kv: kv.select_grouped(image_of_row))


def assert_same_fusion(bert, image_embeds, text_embeds, atts, *layouts):
    """The fusion layers' output and the gradients of the text states, the image states and a
    cross-attention weight are the same for every `layout` (image key/values -> the rows'
    key/values)."""
    results = []
    for layout in layouts:
        bert.zero_grad()
        image_embeds.grad = text_embeds.grad = None
        key_values = layout(bert.image_key_values(image_embeds))
        out = bert(encoder_embeds=text_embeds, attention_mask=atts,
                   encoder_hidden_states=key_values, mode='fusion').last_hidden_state
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), image_embeds.grad, text_embeds.grad,
                        bert.encoder.layer[2].crossattention.self.key.weight.grad))
    for first, other in zip(results[0], results[1]):
        assert torch.allclose(first, other, atol=1e-6, rtol=1e-5)
