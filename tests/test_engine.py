"""engine.train_one_epoch on a toy model: optimisation, returned averages, alpha ramp, the
100-iteration LR warm-up and the non-finite-loss stop."""
import logging

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from engine import autocast_context, train_one_epoch
from optim import create_optimizer
from scheduler import create_scheduler

N_BATCHES = 250


def make_loader(n_batches=N_BATCHES):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n_batches, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    return DataLoader(TensorDataset(x, y), batch_size=2, shuffle=False)


def make_model():
    torch.manual_seed(0)
    return nn.Linear(4, 1)


def toy_losses(model, batch):
    x, y = batch
    pred = model(x).squeeze(1)
    return {'loss_mse': ((pred - y) ** 2).mean(), 'loss_l1': (pred - y).abs().mean()}


class RecordingScheduler:
    def __init__(self, optimizer):
        self.calls = []
        self.optimizer_steps = 0
        optimizer.register_step_post_hook(lambda *args: self._count_optimizer_step())

    def _count_optimizer_step(self):
        self.optimizer_steps += 1

    def step(self, t):
        self.calls.append((t, self.optimizer_steps))


def run(epoch=0, config=None, warm_up=True, warmup_steps=200, scheduler=None, n_batches=N_BATCHES,
        train_step=None, **kwargs):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = scheduler(optimizer) if scheduler else RecordingScheduler(optimizer)
    record = {'alpha': [], 'losses': []}

    def default_step(model, batch, alpha):
        record['alpha'].append(alpha)
        losses = toy_losses(model, batch)
        record['losses'].append({k: v.item() for k, v in losses.items()})
        return losses

    stats = train_one_epoch(model, make_loader(n_batches), optimizer, scheduler, epoch, 'cpu',
                            {'alpha': 0.4} if config is None else config, train_step or default_step,
                            warmup_steps=warmup_steps, warm_up=warm_up, **kwargs)
    return model, optimizer, scheduler, record, stats


def test_parameters_follow_manual_adamw_on_summed_losses():
    model, _, _, record, stats = run(stats_fmt=None, n_batches=20)
    ref = make_model()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for batch in make_loader(20):
        opt.zero_grad()
        sum(toy_losses(ref, batch).values()).backward()
        opt.step()
    assert not torch.equal(model.weight, make_model().weight)
    torch.testing.assert_close(model.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.bias, ref.bias, rtol=0, atol=0)
    for name in ('loss_mse', 'loss_l1'):
        values = [losses[name] for losses in record['losses']]
        assert stats[name] == pytest.approx(sum(values) / len(values))
    assert stats['lr'] == pytest.approx(1e-2)


def test_returns_three_decimal_strings_by_default():
    _, _, _, record, stats = run(n_batches=10)
    mean = sum(losses['loss_mse'] for losses in record['losses']) / 10
    assert set(stats) == {'lr', 'loss_mse', 'loss_l1'}
    assert stats['loss_mse'] == '{:.3f}'.format(mean)
    assert run(n_batches=3, stats_fmt='{:.4f}')[4]['lr'] == '0.0100'


def test_warmup_steps_every_100_iterations_after_the_optimizer_step():
    _, _, sched, _, _ = run(warmup_steps=200)
    # (t, optimiser steps done when called): after iterations 0, 100 and 200.
    assert sched.calls == [(0, 1), (1, 101), (2, 201)]
    assert run(warmup_steps=100)[2].calls == [(0, 1), (1, 101)]
    assert run(epoch=1, n_batches=120)[2].calls == []


def test_warmup_lr_values_with_real_scheduler():
    model = make_model()
    optimizer = create_optimizer({'opt': 'adamW', 'lr': 1e-3, 'weight_decay': 0.02}, model)
    scheduler = create_scheduler({'sched': 'cosine', 'epochs': 5, 'min_lr': 1e-6,
                                  'warmup_lr': 1e-4, 'warmup_epochs': 2}, optimizer)
    stats = train_one_epoch(model, make_loader(), optimizer, scheduler, 0, 'cpu', {'alpha': 0.4},
                            lambda m, b, a: toy_losses(m, b), warmup_steps=200, stats_fmt=None)
    # iterations 0..100 at warmup_lr, 101..200 half-way, 201..249 at lr
    expected = (101 * 1e-4 + 100 * 5.5e-4 + 49 * 1e-3) / N_BATCHES
    assert stats['lr'] == pytest.approx(expected)
    assert optimizer.param_groups[1]['lr'] == pytest.approx(1e-3)


def test_alpha_ramp():
    record = run(n_batches=8, warmup_steps=0)[3]
    assert record['alpha'] == pytest.approx([0.4 * i / 8 for i in range(8)])
    assert run(epoch=1, n_batches=8)[3]['alpha'] == [0.4] * 8
    assert run(warm_up=False, n_batches=8)[3]['alpha'] == [0.4] * 8
    assert run(config={}, n_batches=3)[3]['alpha'] == [None] * 3  # no alpha in the config


def test_non_finite_loss_raises_with_iteration():
    def nan_step(model, batch, alpha):
        losses = toy_losses(model, batch)
        if nan_step.calls == 3:
            losses['loss_l1'] = losses['loss_l1'] * float('nan')
        nan_step.calls += 1
        return losses
    nan_step.calls = 0
    with pytest.raises(FloatingPointError, match=r'epoch 0, iteration 3: loss_mse=[\d.]+, loss_l1=nan'):
        run(n_batches=10, train_step=nan_step)


def test_bad_train_step_output():
    with pytest.raises(TypeError, match='dict of named losses'):
        run(n_batches=2, train_step=lambda m, b, a: sum(toy_losses(m, b).values()))


def test_progress_logging(caplog):
    caplog.set_level(logging.INFO)
    run(n_batches=5, print_freq=2)
    lines = [r.getMessage() for r in caplog.records if 'eta:' in r.getMessage()]
    assert len(lines) == 3 and lines[0].startswith('Train Epoch: [0] [0/5]')
    assert 'loss_mse:' in lines[-1] and 'lr: 0.010000' in lines[-1]
    assert any(r.getMessage().startswith('Averaged stats:') for r in caplog.records)


def test_bf16_autocast():
    assert isinstance(autocast_context('fp32', 'cpu'), type(autocast_context('fp32', 'cpu')))
    with autocast_context('bf16', 'cpu'):
        assert (torch.randn(2, 3) @ torch.randn(3, 2)).dtype == torch.bfloat16
    with autocast_context('fp32', 'cpu'):
        assert (torch.randn(2, 3) @ torch.randn(3, 2)).dtype == torch.float32
    with autocast_context('fp16', 'cpu'):  # fp16 too (trained with a gradient scaler)
        assert (torch.randn(2, 3) @ torch.randn(3, 2)).dtype == torch.float16
    with pytest.raises(ValueError, match='precision.*fp8'):
        autocast_context('fp8', 'cpu')
    model, *_ = run(config={'alpha': 0.4, 'precision': 'bf16'}, n_batches=5)
    assert model.weight.dtype == torch.float32
    assert not torch.equal(model.weight, make_model().weight)
