"""The speed and memory options (engine.py): activation checkpointing, torch.compile and
bf16 give the same training step; gradient accumulation gives the same update as one large
batch where that holds; optimizer_sharding: zero matches AdamW across two processes."""
import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.test_distributed import torchrun
from tests.test_engine import RecordingScheduler, make_model, toy_losses
from tests.test_fast_train import inputs, plain_and_fast, step
import utils
from engine import (accum_steps, autocast_context, build_optimizer, compile_layers,
                    configure_model, set_grad_checkpointing, train_one_epoch)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(reference, changed, atol=1e-5):
    image, text, draws = inputs()
    ref_losses = step(reference, image, text, draws)
    new_losses = step(changed, image, text, draws)
    for r, n in zip(ref_losses, new_losses):
        assert torch.allclose(r, n, atol=atol, rtol=0), (r.item(), n.item())
    ref_grads, new_grads = grads(reference), grads(changed)
    assert ref_grads.keys() == new_grads.keys() and len(ref_grads) > 50
    for name, g in ref_grads.items():
        assert torch.allclose(g, new_grads[name], atol=atol, rtol=1e-4), name


def count_calls(modules):
    """Count forward runs (hooks do not fire when checkpointing recomputes a module)."""
    calls = []
    for m in modules:
        def counted(*args, _forward=m.forward, **kwargs):
            calls.append(1)
            return _forward(*args, **kwargs)
        m.forward = counted
    return calls


@pytest.mark.parametrize('path', ['plain', 'fast'])
def test_grad_checkpointing_keeps_losses_and_gradients(path):
    model = dict(zip(('plain', 'fast'), plain_and_fast()))[path]
    checkpointed = copy.deepcopy(model)
    assert set_grad_checkpointing(checkpointed, True) == 4  # ViT, BERT, and their momentum twins
    # Recomputation runs every online ViT block and BERT layer a second time in backward.
    layers = list(checkpointed.visual_encoder.blocks) + list(checkpointed.text_encoder.bert.encoder.layer)
    calls = count_calls(layers)
    assert_same_training_step(model, checkpointed)
    plain_calls = count_calls(list(model.visual_encoder.blocks) + list(model.text_encoder.bert.encoder.layer))
    step(model, *inputs())
    assert len(calls) == 2 * len(plain_calls) > 0


def test_compile_keeps_losses_and_gradients():
    _, model = plain_and_fast()
    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    # aot_eager traces forward and backward like inductor without generating C++ (fast on CPU);
    # `compile: true` selects inductor.
    assert compile_layers(compiled, backend='aot_eager') == 12
    assert compiled.state_dict().keys() == model.state_dict().keys()
    assert_same_training_step(model, compiled)


def test_bf16_autocast_trains_the_model_on_cpu():
    _, model = plain_and_fast()
    bf16 = copy.deepcopy(model)
    image, text, draws = inputs()
    ref = step(model, image, text, draws)
    with autocast_context('bf16', 'cpu'):
        losses = bf16(image, text, alpha=0.4, **draws)
    sum(losses).backward()
    for r, b in zip(ref, losses):
        assert torch.isfinite(b) and abs(b.item() - r.item()) < 0.05 * abs(r.item()) + 0.02
    for name, g in grads(bf16).items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
    assert bf16.visual_encoder.pos_embed.dtype == torch.float32


def test_configure_model_reads_the_config_keys():
    _, model = plain_and_fast()
    configure_model(model, {'grad_checkpointing': True, 'compile': False})
    assert model.visual_encoder.gradient_checkpointing and model.text_encoder.bert.encoder.gradient_checkpointing
    configure_model(model, utils.with_defaults({}, 'pretrain'))
    assert not model.visual_encoder.gradient_checkpointing
    options = {'precision': 'fp32', 'grad_checkpointing': False,
               'compile': False, 'accum_steps': 1, 'optimizer_sharding': 'none',
               'num_workers': 4, 'print_freq': 50}
    for task in utils.TASKS:  # every option has its default in every task's config
        defaults = utils.with_defaults({'optimizer': {}}, task)
        assert {k: defaults[k] for k in options} == options and defaults['optimizer'] == {'fused': False}
    assert utils.with_defaults({}, 'retrieval')['fast_eval'] is True
    for task in utils.TASKS:  # fast_train where a model has a fast path; refused elsewhere
        has_fast_path = task in ('pretrain', 'retrieval', 'grounding', 'vqa')
        assert utils.with_defaults({}, task).get('fast_train') is (True if has_fast_path else None)
    assert accum_steps({}) == 1 and accum_steps({'accum_steps': 4}) == 4
    for bad in (0, -1, 2.0, True, '2'):
        with pytest.raises(ValueError, match='accum_steps'):
            accum_steps({'accum_steps': bad})
    with pytest.raises(ValueError, match='optimizer_sharding'):
        build_optimizer({'optimizer': {'opt': 'adamW', 'lr': 1e-3, 'weight_decay': 0.0},
                         'optimizer_sharding': 'fsdp'}, model)
    # zero in a single process: nothing to shard, plain AdamW
    opt = build_optimizer({'optimizer': {'opt': 'adamW', 'lr': 1e-3, 'weight_decay': 0.0},
                           'optimizer_sharding': 'zero'}, model)
    assert isinstance(opt, torch.optim.AdamW)


# --- gradient accumulation (engine.train_one_epoch) ---

def loader(batch_size, n=10):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def train(batch_size, accum, n=10, epochs=3):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.02)
    scheduler = RecordingScheduler(optimizer)
    for epoch in range(epochs):
        train_one_epoch(model, loader(batch_size, n), optimizer, scheduler, epoch, 'cpu',
                        {'accum_steps': accum}, lambda m, b, a: toy_losses(m, b),
                        warmup_steps=0)
    return model, scheduler


def test_accumulation_equals_one_large_batch():
    """Per-sample-mean losses: 2 micro-batches of 2 = one batch of 4 (10 samples per epoch, so
    the last step of each epoch has one micro-batch of 2 against a batch of 2)."""
    large, large_sched = train(batch_size=4, accum=1)
    accumulated, accum_sched = train(batch_size=2, accum=2)
    assert accum_sched.optimizer_steps == large_sched.optimizer_steps == 9
    assert not torch.equal(large.weight, make_model().weight)
    for p, q in zip(large.parameters(), accumulated.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)
    # Not the same as stepping every micro-batch.
    assert not torch.allclose(train(batch_size=2, accum=1)[0].weight, large.weight, atol=1e-4)


def test_accumulation_warmup_counts_optimizer_steps():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = RecordingScheduler(optimizer)
    train_one_epoch(model, loader(1, n=500), optimizer, scheduler, 0, 'cpu',
                    {'accum_steps': 2}, lambda m, b, a: toy_losses(m, b), warmup_steps=200)
    # 250 optimiser steps; warm-up after steps 0, 100 and 200.
    assert scheduler.calls == [(0, 1), (1, 101), (2, 201)]


def test_accumulation_moves_momentum_encoders_once_per_step():
    model = make_model()
    model.momentum_updates = True
    seen = []

    def train_step(m, batch, alpha):
        seen.append(m.momentum_updates)
        return toy_losses(m, batch)
    train_one_epoch(model, loader(2), torch.optim.AdamW(model.parameters()),
                    RecordingScheduler(torch.optim.AdamW(model.parameters())), 1, 'cpu',
                    {'accum_steps': 3}, train_step, warmup_steps=0)
    assert seen == [True, False, False, True, False]
    assert model.momentum_updates is True


def test_albef_skips_the_ema_step_when_told():
    _, model = plain_and_fast()
    before = [p.clone() for p in model.visual_encoder_m.parameters()]
    image, text, draws = inputs()
    model.momentum_updates = False
    with torch.no_grad():
        model(image, text, alpha=0.4, **draws)
    assert all(torch.equal(b, p) for b, p in zip(before, model.visual_encoder_m.parameters()))
    model.momentum_updates = True
    with torch.no_grad():
        model(image, text, alpha=0.4, **draws)
    assert not all(torch.equal(b, p) for b, p in zip(before, model.visual_encoder_m.parameters()))


def test_zero_sharded_adamw_matches_adamw_on_two_ranks():
    result = torchrun(['tests/dist_zero_worker.py'])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        assert f'rank {rank}: zero ok' in result.stdout
