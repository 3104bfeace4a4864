"""AdamW weight-decay groups and the warm-up + cosine schedule."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from optim import create_optimizer
from scheduler import cosine_lr, create_scheduler

OPT = {'opt': 'adamW', 'lr': 1e-4, 'weight_decay': 0.02}
# Pretrain.yaml's schedular section.
SCHED = {'sched': 'cosine', 'lr': 1e-4, 'epochs': 30, 'min_lr': 1e-5, 'decay_rate': 1,
         'warmup_lr': 1e-5, 'warmup_epochs': 20, 'cooldown_epochs': 0}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.temp = nn.Parameter(torch.tensor(0.07))        # 0-D
        self.norm = nn.LayerNorm(3)                         # 1-D weight and bias
        self.proj = nn.Linear(3, 2)                         # 2-D weight, bias
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 3))
        self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)


def ids(params):
    return {id(p) for p in params}


def test_weight_decay_groups():
    model = Tiny()
    opt = create_optimizer(OPT, model)
    assert isinstance(opt, torch.optim.AdamW)
    no_decay, decay = opt.param_groups
    assert no_decay['weight_decay'] == 0.0 and decay['weight_decay'] == 0.02
    assert ids(no_decay['params']) == ids([model.norm.weight, model.norm.bias, model.proj.bias])
    # NOTE(faithful): the 0-D temp and pos_embed decay; frozen parameters are left out.
    assert ids(decay['params']) == ids([model.temp, model.proj.weight, model.pos_embed])
    for group in opt.param_groups:
        assert group['lr'] == 1e-4 and group['betas'] == (0.9, 0.999) and group['eps'] == 1e-8
        assert group['amsgrad'] is False and not group['fused']


def test_bias_by_name_even_if_not_1d():
    model = nn.Module()
    model.odd = nn.Module()
    model.odd.bias = nn.Parameter(torch.zeros(2, 2))
    model.w = nn.Parameter(torch.zeros(2, 2))
    no_decay, decay = create_optimizer(OPT, model).param_groups
    assert ids(no_decay['params']) == ids([model.odd.bias])
    assert ids(decay['params']) == ids([model.w])


def test_optimizer_config_errors():
    model = Tiny()
    create_optimizer({**OPT, 'opt': 'ADAMW'}, model)  # case-insensitive
    with pytest.raises(ValueError, match="sgd.*adamW"):
        create_optimizer({**OPT, 'opt': 'sgd'}, model)
    with pytest.raises(KeyError, match='momentum'):
        create_optimizer({**OPT, 'momentum': 0.9}, model)
    with pytest.raises(KeyError, match="'lr'"):
        create_optimizer({'opt': 'adamW', 'weight_decay': 0.02}, model)
    with pytest.raises(TypeError, match='fused'):
        create_optimizer({**OPT, 'fused': 'yes'}, model)


def test_fused_adamw_makes_the_same_update():
    torch.manual_seed(0)
    plain_model = Tiny()
    fused_model = copy.deepcopy(plain_model)
    initial = copy.deepcopy(plain_model)
    plain = create_optimizer(OPT, plain_model)
    fused = create_optimizer({**OPT, 'fused': True}, fused_model)  # CPU here, CUDA on GPUs
    assert not plain.defaults['fused'] and fused.defaults['fused']
    for _ in range(3):
        for model, opt in ((plain_model, plain), (fused_model, fused)):
            opt.zero_grad()
            sum((p - 1).pow(3).sum() for p in model.parameters() if p.requires_grad).backward()
            opt.step()
    assert not torch.equal(plain_model.proj.weight, initial.proj.weight)
    for p, q in zip(plain_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def make_scheduler(sched=SCHED, lr=1e-4):
    opt = torch.optim.AdamW(Tiny().parameters(), lr=lr)
    return opt, create_scheduler(sched, opt)


def lrs(opt):
    return [group['lr'] for group in opt.param_groups]


def test_construction_sets_warmup_lr_and_ignores_schedular_lr():
    opt, sched = make_scheduler({**SCHED, 'lr': 123.0}, lr=1e-4)
    assert lrs(opt) == [1e-5]
    assert sched.base_lrs == [1e-4]


@pytest.mark.parametrize('t, expected', [
    (0, 1e-5),
    (5, 1e-5 + 5 * 9e-5 / 20),
    (19.5, 1e-5 + 19.5 * 9e-5 / 20),
    (20, 1e-4),                                          # cosine start: t' = 0
    (35, 1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi * 15 / 30))),
    (49, 1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi * 29 / 30))),
    (50, 1e-5),                                          # t' = epochs: min_lr
    (80, 1e-5),
])
def test_schedule_formula(t, expected):
    opt, sched = make_scheduler()
    sched.step(t)
    assert lrs(opt)[0] == pytest.approx(expected, rel=1e-12)
    assert sched.lr_at(t) == lrs(opt)
    assert cosine_lr(t, 1e-4, epochs=30, min_lr=1e-5, warmup_lr=1e-5, warmup_epochs=20) == lrs(opt)[0]


def test_epoch0_warmup_in_100_iteration_units():
    # VQA.yaml: lr 2e-5, warm-up from 1e-5 over 4 units of 100 iterations, then cosine per epoch.
    opt, sched = make_scheduler({'sched': 'cosine', 'epochs': 8, 'min_lr': 1e-6,
                                 'warmup_lr': 1e-5, 'warmup_epochs': 4}, lr=2e-5)
    used = []
    for i in range(600):
        used.append(lrs(opt)[0])
        if i % 100 == 0 and i <= 400:  # the driving rule of engine.train_one_epoch
            sched.step(i // 100)
    assert set(used[:101]) == {1e-5}
    assert used[101:201] == [pytest.approx(1.25e-5)] * 100
    assert used[301:401] == [pytest.approx(1.75e-5)] * 100
    assert used[401:] == [pytest.approx(2e-5)] * 199
    sched.step(1 + 4)  # epoch 1
    assert lrs(opt)[0] == pytest.approx(1e-6 + 0.5 * (2e-5 - 1e-6) * (1 + math.cos(math.pi / 8)))


def test_no_warmup_keeps_base_lr():
    opt, sched = make_scheduler({**SCHED, 'warmup_epochs': 0}, lr=3e-4)
    assert lrs(opt) == [3e-4]
    sched.step(0)
    assert lrs(opt) == [3e-4]


def test_state_dict_round_trip():
    opt, sched = make_scheduler()
    sched.step(23.5)
    state = sched.state_dict()
    assert state['last_t'] == 23.5 and state['base_lrs'] == [1e-4]
    assert all(isinstance(v, (int, float, list)) for v in state.values())

    opt2, sched2 = make_scheduler({**SCHED, 'epochs': 3, 'min_lr': 0.0}, lr=5.0)
    sched2.load_state_dict(state)
    assert sched2.state_dict() == state
    assert sched2.lr_at(30) == sched.lr_at(30)
    with pytest.raises(KeyError, match='min_lr'):
        sched2.load_state_dict({k: v for k, v in state.items() if k != 'min_lr'})


def test_loads_original_timm_scheduler_state():
    opt, sched = make_scheduler(lr=1.0)
    sched.load_state_dict({'base_values': [1e-4], 't_initial': 30, 'lr_min': 1e-5,
                           'warmup_t': 20, 'warmup_lr_init': 1e-5, 'decay_rate': 1})
    assert sched.lr_at(35) == make_scheduler()[1].lr_at(35)


def test_scheduler_config_errors():
    opt = torch.optim.AdamW(Tiny().parameters(), lr=1e-4)
    with pytest.raises(ValueError, match="step.*cosine"):
        create_scheduler({**SCHED, 'sched': 'step'}, opt)
    with pytest.raises(KeyError, match='warmup_epoch'):
        create_scheduler({**SCHED, 'warmup_epoch': 1}, opt)
    with pytest.raises(KeyError, match="'epochs'"):
        create_scheduler({k: v for k, v in SCHED.items() if k != 'epochs'}, opt)
    with pytest.raises(TypeError, match='min_lr'):
        create_scheduler({**SCHED, 'min_lr': '1e-5'}, opt)


class TwoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual_encoder = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
        self.text_encoder = nn.Linear(3, 3)


def test_lr_scale_runs_a_module_at_a_multiple_of_the_schedule():
    model = TwoTowers()
    opt = create_optimizer({**OPT, 'lr': 1e-3, 'lr_scale': {'visual_encoder': 0.1,
                                                            'visual_encoder.1': 0.0}}, model)
    by_param = {id(p): g for g in opt.param_groups for p in g['params']}
    assert len(by_param) == sum(1 for _ in model.parameters())  # each parameter once
    scale = {name: by_param[id(p)]['lr_scale'] for name, p in model.named_parameters()}
    # The longest matching module path wins; unnamed modules run at the schedule's LR.
    assert scale == {'visual_encoder.0.weight': 0.1, 'visual_encoder.0.bias': 0.1,
                     'visual_encoder.1.weight': 0.0, 'visual_encoder.1.bias': 0.0,
                     'text_encoder.weight': 1.0, 'text_encoder.bias': 1.0}
    # Weight decay keeps its grouping inside every multiplier.
    assert by_param[id(model.visual_encoder[0].bias)]['weight_decay'] == 0.0
    assert by_param[id(model.visual_encoder[0].weight)]['weight_decay'] == 0.02
    sched = create_scheduler({**SCHED, 'warmup_epochs': 1, 'warmup_lr': 1e-4, 'epochs': 4}, opt)
    for t in (0, 1, 3):
        sched.step(t)
        for group in opt.param_groups:
            expected = cosine_lr(t, 1e-3, epochs=4, min_lr=1e-5, warmup_lr=1e-4, warmup_epochs=1)
            assert group['lr'] == pytest.approx(expected * group['lr_scale'])
    # A module at scale 0 does not move; the others do.
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3)
    loss = model.visual_encoder(x).pow(2).sum() + model.text_encoder(x).pow(2).sum()
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert torch.equal(before['visual_encoder.1.weight'], after['visual_encoder.1.weight'])
    assert not torch.equal(before['visual_encoder.0.weight'], after['visual_encoder.0.weight'])
    assert not torch.equal(before['text_encoder.weight'], after['text_encoder.weight'])


def test_lr_scale_survives_a_checkpoint_round_trip():
    model = TwoTowers()
    config = {**OPT, 'lr_scale': {'visual_encoder': 0.5}}
    opt = create_optimizer(config, model)
    sched = create_scheduler({**SCHED, 'warmup_epochs': 0}, opt)
    sched.step(5)
    fresh = create_optimizer(config, model)
    fresh.load_state_dict(opt.state_dict())
    resumed = create_scheduler({**SCHED, 'warmup_epochs': 0}, fresh)
    resumed.load_state_dict(sched.state_dict())
    resumed.step(6)
    sched.step(6)
    assert [g['lr'] for g in fresh.param_groups] == [g['lr'] for g in opt.param_groups]
    assert {g['lr_scale'] for g in fresh.param_groups} == {1.0, 0.5}


def test_lr_scale_errors():
    model = TwoTowers()
    with pytest.raises(KeyError, match="'vision'.*not a module.*text_encoder"):
        create_optimizer({**OPT, 'lr_scale': {'vision': 0.1}}, model)
    with pytest.raises(ValueError, match='>= 0'):
        create_optimizer({**OPT, 'lr_scale': {'visual_encoder': -1}}, model)
    with pytest.raises(TypeError, match='mapping'):
        create_optimizer({**OPT, 'lr_scale': 0.1}, model)
    model.text_encoder.requires_grad_(False)
    with pytest.raises(ValueError, match='no trainable'):
        create_optimizer({**OPT, 'lr_scale': {'text_encoder': 0.1}}, model)
