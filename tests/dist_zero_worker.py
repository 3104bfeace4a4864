"""Run by test_train_options under torchrun: AdamW sharded with ZeroRedundancyOptimizer
(optimizer_sharding: zero) makes the same updates as plain AdamW, each rank holding part of
the state, and the checkpointed state is gathered on rank 0."""
import argparse
import copy
import gc
import sys

import torch
import torch.nn as nn

import utils
from optim import create_optimizer, optimizer_state_dict

OPT = {'opt': 'adamW', 'lr': 1e-2, 'weight_decay': 0.02}


def main():
    utils.init_distributed_mode(argparse.Namespace(device='cpu', dist_url='env://'))
    rank = utils.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    sharded = create_optimizer(OPT, model, sharding='zero')
    plain = create_optimizer(OPT, reference)
    assert type(sharded).__name__ == 'ZeroRedundancyOptimizer', type(sharded)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(5, 6, generator=g)
        for net, opt in ((model, sharded), (reference, plain)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), (rank, name)
    n_params = len(list(model.parameters()))
    local = len(sharded.optim.state)
    assert 0 < local < n_params, (rank, local)
    state = optimizer_state_dict(sharded)
    if rank == 0:
        assert len(state['state']) == n_params, len(state['state'])
    else:
        assert state is None
    utils.barrier()
    print(f'rank {rank}: zero ok, {local} of {n_params} states', flush=True)
    del sharded, state  # the optimiser holds the process group's work objects
    gc.collect()
    utils.destroy_distributed()


if __name__ == '__main__':
    sys.exit(main())
