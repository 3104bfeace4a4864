"""Retrieval evaluation: the original per-query loop (plain) against the fast path, same run.

A base-size retrieval ALBEF (ViT-B/16, BERT-base 6+6) with random weights, a few dozen images
and captions, k_test candidates per query. Captions are padded to --text_len (30) exactly as
Retrieval.py's evaluation (and the original's) tokenises them; their real lengths (tokens
including [CLS] and [SEP]) are drawn uniformly from --caption_len MIN MAX, by default 10..22
(8..20 word pieces, mean 16 tokens: an assumed caption-like range, not measured on the
datasets here). `--fixed_len` makes every caption fill all --text_len tokens instead (no
padding: the worst case for the fast path, which drops padding). Prints wall and process CPU
time of the ITM re-scoring for both paths (run alternately --repeats times; the best of each
is compared), the ratio, and the largest difference between their score matrices.

    python -m benchmarks.bench_retrieval_eval --images 24 --texts 120 --k_test 16 --image_res 256
"""
import argparse
import time
import types

import torch

from models.model_retrieval import ALBEF
from models.retrieval_eval import (candidate_pairs, encode_images, encode_texts,
                                   itc_similarity, itm_score_matrices, itm_score_matrices_plain)
from utils import load_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=24)
    parser.add_argument('--texts', type=int, default=120)
    parser.add_argument('--k_test', type=int, default=16)
    parser.add_argument('--image_res', type=int, default=256)
    parser.add_argument('--text_len', type=int, default=30,
                        help='padded caption length (max_length of the evaluation tokenizer)')
    parser.add_argument('--caption_len', type=int, nargs=2, default=(10, 22),
                        metavar=('MIN', 'MAX'),
                        help='caption lengths in tokens incl. [CLS]/[SEP], drawn uniformly')
    parser.add_argument('--fixed_len', action='store_true',
                        help='every caption has --text_len tokens (no padding)')
    parser.add_argument('--repeats', type=int, default=1,
                        help='plain and fast are run alternately this many times each')
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
    low, high = (args.text_len, args.text_len) if args.fixed_len else args.caption_len
    if not 2 <= low <= high <= args.text_len:
        parser.error(f'caption lengths {low}..{high} must lie in 2..{args.text_len}')
    lengths = torch.randint(low, high + 1, (args.texts,))
    positions = torch.arange(args.text_len)[None]
    text_atts = (positions < lengths[:, None]).long().to(device)
    text_ids = torch.randint(1000, 30000, (args.texts, args.text_len), device=device) * text_atts
    text_ids[:, 0] = 101  # [CLS]
    text_ids[positions == lengths[:, None] - 1] = 102  # [SEP]

    with torch.no_grad():
        start = time.perf_counter()
        text_embeds, text_feats = encode_texts(model, text_ids, text_atts)
        image_embeds, image_feats = encode_images(model, images.split(8))
        sims = itc_similarity(image_feats, text_feats)
        encode_time = time.perf_counter() - start
        timings = {'plain': [], 'fast': []}
        results = {}
        for _ in range(args.repeats):
            for name, fn in (('plain', itm_score_matrices_plain), ('fast', itm_score_matrices)):
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                start, cpu_start = time.perf_counter(), time.process_time()
                results[name] = fn(model, image_embeds, text_embeds, text_atts, sims, args.k_test)
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                timings[name].append((time.perf_counter() - start,
                                      time.process_time() - cpu_start))
    diffs = [(results['plain'][i] - results['fast'][i]).abs().max().item() for i in range(2)]
    pairs = candidate_pairs(sims, args.k_test)[0].numel()
    kind = (f'fixed {args.text_len} tokens (no padding)' if args.fixed_len else
            f'uniform {low}..{high} tokens incl. [CLS]/[SEP]')
    print(f'device {device}, threads {torch.get_num_threads()}, {args.images} images at '
          f'{args.image_res} px, {args.texts} texts, k_test {args.k_test}')
    print(f'caption lengths: {kind}, drawn mean {lengths.float().mean():.1f}, padded to '
          f'{args.text_len} as in the evaluation')
    plain_pairs = (args.images * min(args.k_test, args.texts)
                   + args.texts * min(args.k_test, args.images))
    print(f'ITM pairs: plain {plain_pairs} (k per query), fast {pairs} (each distinct pair once)')
    print(f'unimodal encoding (shared by both paths): {encode_time:.2f} s')
    best = {}
    for name, label in (('plain', 'plain (original loop)'), ('fast', 'fast')):
        runs = ', '.join(f'{wall:.2f} s (CPU {cpu:.2f} s)' for wall, cpu in timings[name])
        best[name] = min(timings[name])
        print(f'ITM re-scoring, {label:21s}: {runs}')
    print(f'speed-up (best of {args.repeats}): wall {best["plain"][0] / best["fast"][0]:.2f}x, '
          f'process CPU {best["plain"][1] / best["fast"][1]:.2f}x')
    print(f'max |score difference|: i2t {diffs[0]:.2e}, t2i {diffs[1]:.2e}')

if __name__ == '__main__':
    main()
