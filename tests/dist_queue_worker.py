"""Run by test_distributed under torchrun: each rank feeds its half of the fixture batch through
the pre-training forward; the queues must then hold the momentum features of both ranks."""
import argparse
import sys

import torch

import utils
from models.checkpoint import load_checkpoint
from models.model_pretrain import ALBEF
from tests.reference import STUB_TOKENIZER, load_kind, text_batch


def main():
    args = argparse.Namespace(device='cpu', dist_url='env://')
    utils.init_distributed_mode(args)
    rank, world = utils.get_rank(), utils.get_world_size()
    assert world == 2, world
    config, checkpoint, inputs, expected = load_kind('pretrain')
    model = ALBEF(config=config, tokenizer=STUB_TOKENIZER, init_deit=False)
    load_checkpoint(model, checkpoint, kind='pretrain')
    model.eval()
    half = slice(2 * rank, 2 * rank + 2)
    text = text_batch(inputs['text_ids'][half], inputs['text_att'][half])
    torch.manual_seed(rank)
    with torch.no_grad():
        model(inputs['image'][half], text, alpha=float(inputs['alpha']))
    # Momentum features of samples 0,1 (rank 0) then 2,3 (rank 1) = the single-process fixture.
    for name in ('image_queue', 'text_queue'):
        got, ref = getattr(model, name), expected[f'fwd_{name}']
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (rank, name, (got - ref).abs().max())
    assert int(model.queue_ptr) == 4, int(model.queue_ptr)
    utils.barrier()
    print(f'rank {rank}: queues hold both ranks\' features', flush=True)
    utils.destroy_distributed()


if __name__ == '__main__':
    sys.exit(main())
