"""Run by test_distributed under torchrun: the fast retrieval evaluation with the captions and
image batches sharded across the ranks and gathered gives, on every rank, the encodings and
score matrices of a single process."""
import argparse
import sys

import torch

import utils
from models import retrieval_eval
from models.model_retrieval import ALBEF
from tests.reference import STUB_TOKENIZER, load_kind
from tests.test_parity_retrieval import padded_captions


def main():
    args = argparse.Namespace(device='cpu', dist_url='env://')
    utils.init_distributed_mode(args)
    rank, world = utils.get_rank(), utils.get_world_size()
    assert world == 2, world
    config = load_kind('retrieval')[0]
    torch.manual_seed(3)
    model = ALBEF(config=config, tokenizer=STUB_TOKENIZER).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(7, 3, 64, 64, generator=gen)
    text_ids, text_atts = padded_captions(gen, 11, 4, 16)
    # 7 images in batches of 3, 3, 1 (rank 0 encodes batches 0 and 2, rank 1 batch 1); 11
    # captions in shards of 6 and 5.
    batches = [(images[i:i + 3],) for i in range(0, 7, 3)]
    for name, sharded, whole in (
            ('texts', retrieval_eval.encode_texts_sharded(model, text_ids, text_atts, rank, world),
             retrieval_eval.encode_texts(model, text_ids, text_atts)),
            ('images', retrieval_eval.encode_images_sharded(model, batches, rank, world),
             retrieval_eval.encode_images(model, images))):
        for got, ref in zip(sharded, whole):
            assert got.shape == ref.shape, (name, got.shape, ref.shape)
            assert torch.allclose(got, ref, atol=1e-5), (rank, name, (got - ref).abs().max())
    # One image batch only: rank 1 has nothing to encode and still takes part.
    got = retrieval_eval.encode_images_sharded(model, [(images[:2],)], rank, world)
    assert torch.allclose(got[1], retrieval_eval.encode_images(model, images[:2])[1], atol=1e-5)

    distributed = retrieval_eval.evaluation(model, batches, text_ids, text_atts, 4,
                                            rank=rank, world_size=world)
    single = retrieval_eval.evaluation(model, images, text_ids, text_atts, 4)
    for got, ref in zip(distributed, single):
        assert torch.allclose(got, ref, atol=1e-5), (rank, (got - ref).abs().max())
    assert distributed[0].std() > 1e-2
    utils.barrier()
    print(f'rank {rank}: sharded evaluation equals one process', flush=True)
    utils.destroy_distributed()


if __name__ == '__main__':
    sys.exit(main())
