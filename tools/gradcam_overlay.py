"""Grad-CAM overlays: one PNG per word of a caption, plus the phrase average (paper Fig. 5).

    python -m tools.gradcam_overlay --config configs/Grounding.yaml --checkpoint refcoco.pth \
        --image dog.jpg --text "the dog on the left" --block_num 8 --out output/gradcam

The same as `albef gradcam` (albef.api.ALBEFInference.gradcam, GradCAMMaps.save).
"""
import argparse

import torch

from albef.api import ALBEFInference


def main(argv=None):
    parser = argparse.ArgumentParser(description='Grad-CAM overlays of an image and a caption')
    parser.add_argument('--config', required=True, help='a retrieval or grounding config')
    parser.add_argument('--checkpoint', required=True, help='a pre-training, retrieval or grounding checkpoint')
    parser.add_argument('--image', required=True, help='an image file')
    parser.add_argument('--text', required=True, help='the caption or phrase')
    parser.add_argument('--block_num', type=int, default=8, help='fusion layer whose '
                        'cross-attention is used (8 = the 3rd of 6 in BERT-base)')
    parser.add_argument('--out', required=True, help='a folder for the PNGs')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='torch device')
    args = parser.parse_args(argv)
    albef = ALBEFInference.from_checkpoint(args.checkpoint, config=args.config, device=args.device)
    for path in albef.gradcam(args.image, args.text, block_num=args.block_num).save(args.out):
        print(path)


if __name__ == '__main__':
    main()
