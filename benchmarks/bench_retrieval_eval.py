"""Retrieval evaluation: the original per-query loop (plain) against the fast path, same run.

A base-size retrieval ALBEF (ViT-B/16, BERT-base 6+6) with random weights, a few dozen images
and captions, k_test candidates per query. Prints wall time of the ITM re-scoring for both
paths, the ratio, and checks that the score matrices are the same.

    python benchmarks/bench_retrieval_eval.py --images 24 --texts 120 --k_test 16 --image_res 256
"""
import argparse
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.model_retrieval import ALBEF  # noqa: E402
from models.retrieval_eval import (encode_images, encode_texts, itc_similarity,  # noqa: E402
                                   itm_score_matrices, itm_score_matrices_plain)
from utils import load_config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=24)
    parser.add_argument('--texts', type=int, default=120)
    parser.add_argument('--k_test', type=int, default=16)
    parser.add_argument('--image_res', type=int, default=256)
    parser.add_argument('--text_len', type=int, default=30)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()

    torch.manual_seed(0)
    config = load_config('configs/Retrieval_coco.yaml')
    config.update(image_res=args.image_res, queue_size=args.images * 16)
    tokenizer = types.SimpleNamespace(pad_token_id=0, cls_token_id=101, sep_token_id=102,
                                      mask_token_id=103)
    device = torch.device(args.device)
    model = ALBEF(config=config, text_encoder=None, tokenizer=tokenizer).to(device).eval()
    images = torch.randn(args.images, 3, args.image_res, args.image_res, device=device)
    lengths = torch.randint(8, args.text_len + 1, (args.texts,))
    text_atts = (torch.arange(args.text_len)[None] < lengths[:, None]).long().to(device)
    text_ids = torch.randint(1000, 30000, (args.texts, args.text_len), device=device) * text_atts
    text_ids[:, 0] = 101

    with torch.no_grad():
        start = time.perf_counter()
        text_embeds, text_feats = encode_texts(model, text_ids, text_atts)
        image_embeds, image_feats = encode_images(model, images.split(8))
        sims = itc_similarity(image_feats, text_feats)
        encode_time = time.perf_counter() - start
        timings = {}
        results = {}
        for name, fn in (('plain', itm_score_matrices_plain), ('fast', itm_score_matrices)):
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = fn(model, image_embeds, text_embeds, text_atts, sims, args.k_test)
            if device.type == 'cuda':
                torch.cuda.synchronize()
            timings[name] = time.perf_counter() - start
    diff = max((results['plain'][i] - results['fast'][i]).abs().max().item() for i in range(2))
    print(f'device {device}, threads {torch.get_num_threads()}, {args.images} images at '
          f'{args.image_res} px, {args.texts} texts, k_test {args.k_test}')
    print(f'unimodal encoding (shared by both paths): {encode_time:.2f} s')
    print(f'ITM re-scoring, plain (original loop): {timings["plain"]:.2f} s')
    print(f'ITM re-scoring, fast:                  {timings["fast"]:.2f} s')
    print(f'speed-up: {timings["plain"] / timings["fast"]:.2f}x; '
          f'max |score difference|: {diff:.2e}')


if __name__ == '__main__':
    main()
