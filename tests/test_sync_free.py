"""The training paths' pieces written so that a GPU step never waits for the device (no host
sync; tests/test_cuda.py counts the syncs on a GPU) compute what they replace: the same draws,
values and gradients, checked here on the CPU."""
import types

import torch
import torch.nn.functional as F

from models.albef_base import mask_tokens, sample_negatives_batched, sparse_embedding
from models.xbert import BertConfig, BertModel, masked_lm_loss
from tests.test_fast_train import assert_same_fusion

TOKENIZER = types.SimpleNamespace(pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)


def test_batched_negatives_are_torch_multinomial_draws():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        weights = F.softmax(3 * torch.randn(9, 9, generator=g), dim=1).fill_diagonal_(0)
        torch.manual_seed(seed)
        expected, after = torch.multinomial(weights, 1).squeeze(1), torch.rand(3)
        torch.manual_seed(seed)
        assert torch.equal(sample_negatives_batched(weights), expected)
        assert torch.equal(torch.rand(3), after)  # the random stream moved alike


def test_a_row_without_weight_draws_another_column():
    weights = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    torch.manual_seed(0)
    draws = torch.stack([sample_negatives_batched(weights) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 2}  # uniform over the other columns, no error
    assert set(draws[:, 1].tolist()) == {0, 2} and set(draws[:, 2].tolist()) == {1}


def test_masking_candidates_hold_every_predicted_position():
    ids = torch.randint(4, 64, (6, 11))
    ids[:, 0] = TOKENIZER.cls_token_id
    ids[2, 5:] = ids[4, 8:] = TOKENIZER.pad_token_id
    torch.manual_seed(3)
    masked, labels = mask_tokens(ids, 64, TOKENIZER, 0.3, targets=ids.clone())
    torch.manual_seed(3)
    masked_c, labels_c, positions = mask_tokens(ids, 64, TOKENIZER, 0.3, targets=ids.clone(),
                                                candidates=True)
    assert torch.equal(masked, masked_c) and torch.equal(labels, labels_c)
    predicted = (labels.flatten() != -100).nonzero().squeeze(1)
    assert set(predicted.tolist()) <= set(positions.tolist())
    assert torch.equal(positions, torch.unique(positions))  # sorted, no repeats


def test_mlm_loss_on_candidate_rows_equals_predicted_rows():
    torch.manual_seed(0)
    logits, soft = torch.randn(12, 7), F.softmax(torch.randn(12, 7), dim=-1)
    labels = torch.randint(0, 7, (12,))
    labels[[1, 4, 5, 9]] = -100
    kept = labels != -100
    expected = masked_lm_loss(logits[kept], labels[kept], soft[kept], alpha=0.4)
    assert torch.allclose(masked_lm_loss(logits, labels, soft, alpha=0.4), expected, atol=1e-6)


def test_sparse_embedding_gradient_skips_the_padding_row():
    embedding = torch.nn.Embedding(10, 4, padding_idx=0)
    ids = torch.tensor([[3, 0, 5, 0], [3, 3, 9, 0]])
    weight_grad = torch.randn(2, 4, 4)
    reference = F.embedding(ids, embedding.weight, 0, sparse=True)
    out = sparse_embedding(ids, embedding)
    assert torch.equal(out, reference)
    (g_ref,) = torch.autograd.grad((reference * weight_grad).sum(), embedding.weight)
    (g_new,) = torch.autograd.grad((out * weight_grad).sum(), embedding.weight)
    assert g_new.is_sparse and torch.equal(g_ref.to_dense(), g_new.to_dense())
    assert torch.equal(g_new.to_dense()[0], torch.zeros(4))


def test_block_cross_attention_equals_gathered_keys_values():
    """select_blocks (own-image blocks' queries stacked per image, drawn blocks gathered) ==
    select (keys/values copied per text): outputs and gradients, an image drawn twice."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, fusion_layer=2,
                        num_attention_heads=2, intermediate_size=64, encoder_width=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert = BertModel(config, add_pooling_layer=False).train()
    image_embeds = torch.randn(3, 5, 32, requires_grad=True)
    text_embeds = torch.randn(9, 7, 32, requires_grad=True)
    atts = torch.ones(9, 7, dtype=torch.long)
    atts[2, 4:] = atts[7, 3:] = 0
    drawn = torch.tensor([2, 0, 2])
    rows = torch.arange(3)
    assert_same_fusion(bert, image_embeds, text_embeds, atts,
                       lambda kv: kv.select(torch.cat([rows, drawn, rows])),
                       lambda kv: kv.select_blocks([None, drawn, None]))


def test_compiled_layers_keep_their_graphs_across_steps():
    """engine.compile_layers on the fast path: steps with new draws (masks, negatives) reuse the
    graphs of the first (the fusion rows' layout fixes every shape), and one set of graphs
    serves every fusion layer (no guard on the layer index: a deeper model has no more)."""
    from torch._dynamo.utils import counters

    from engine import compile_layers
    from models.model_pretrain import ALBEF
    from tests.test_fast_train import BERT, CONFIG, inputs
    image, text, _ = inputs()
    graphs = []
    for layers in (4, 6):  # 2 and 4 fusion layers
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = ALBEF(config={**CONFIG, 'bert_config': {**BERT, 'num_hidden_layers': layers}},
                      tokenizer=TOKENIZER, init_deit=False).train()
        compile_layers(model, 'eager')  # dynamo alone: the guards are what is checked
        for seed in range(3 if layers == 4 else 1):
            torch.manual_seed(seed)
            with torch._dynamo.config.patch(error_on_recompile=seed > 0):
                sum(model(image, text, alpha=0.4)).backward()
        graphs.append(counters['stats']['unique_graphs'])
    torch._dynamo.reset()
    assert graphs[0] == graphs[1] > 0, graphs
