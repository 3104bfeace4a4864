"""Grad-CAM overlays: one PNG per word of a caption, plus the phrase average (paper Fig. 5).

    python -m tools.gradcam_overlay --config configs/Grounding.yaml --checkpoint refcoco.pth \
        --image dog.jpg --text "the dog on the left" --block_num 8 --out output/gradcam
"""
import argparse
import os
import re

import numpy as np
import torch
from PIL import Image

from dataset.images import load_image
from dataset.transforms import create_transform
from dataset.utils import pre_caption
from models.checkpoint import load_weights
from models.gradcam import heatmaps
from models.model_retrieval import ALBEF
from models.tokenization_bert import BertTokenizer
from utils import load_config


def colorize(heat):
    """A (H, W) map in [0, 1] as an RGB 'jet'-style uint8 image."""
    x = np.clip(heat, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * x - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (255 * rgb).astype(np.uint8)


def overlay(image, heat, weight=0.5):
    """Blend a (H, W) heat map (any range) onto a PIL image of the same size."""
    heat = heat - heat.min()
    heat = heat / heat.max() if heat.max() > 0 else heat
    blended = (1 - weight) * np.asarray(image, dtype=np.float32) + weight * colorize(heat)
    return Image.fromarray(blended.astype(np.uint8))


def save_overlays(image, tokens, token_maps, average, out_dir):
    """Write <out_dir>/00_average.png and one PNG per word piece (`token_maps[i]` for
    `tokens[i]`, maps (H, W) at the size of the PIL `image`); returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, '00_average.png')]
    overlay(image, np.asarray(average)).save(paths[0])
    for i, (token, heat) in enumerate(zip(tokens, token_maps), start=1):
        name = re.sub(r'[^A-Za-z0-9]+', '', token) or 'token'
        paths.append(os.path.join(out_dir, f'{i:02d}_{name}.png'))
        overlay(image, np.asarray(heat)).save(paths[-1])
    return paths


def write_overlays(model, tokenizer, image_path, text, block_num, image_res, out_dir, device='cpu'):
    """Grad-CAM of `text` on the image at `image_path`, written by save_overlays."""
    image = load_image(image_path)
    pixels = create_transform('test', image_res)(image).unsqueeze(0).to(device)
    text_input = tokenizer([pre_caption(text, 30)], return_tensors='pt').to(device)
    token_maps, average = heatmaps(model, pixels, text_input.input_ids,
                                   text_input.attention_mask, block_num,
                                   size=(image.height, image.width))
    tokens = tokenizer.convert_ids_to_tokens(text_input.input_ids[0].tolist())
    return save_overlays(image, tokens[1:], token_maps[0, 1:].cpu().numpy(),  # [CLS] skipped
                         average[0].cpu().numpy(), out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Grad-CAM overlays of an image and a caption')
    parser.add_argument('--config', required=True, help='a retrieval or grounding config')
    parser.add_argument('--checkpoint', required=True)
    parser.add_argument('--image', required=True)
    parser.add_argument('--text', required=True)
    parser.add_argument('--block_num', type=int, default=8, help='fusion layer whose '
                        'cross-attention is used (8 = the 3rd of 6 in BERT-base)')
    parser.add_argument('--out', required=True)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
    config = load_config(args.config)
    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, text_encoder=None, tokenizer=tokenizer)
    load_weights(model, args.checkpoint, 'retrieval')
    model = model.to(args.device).eval()
    for path in write_overlays(model, tokenizer, args.image, args.text, args.block_num,
                               config['image_res'], args.out, args.device):
        print(path)


if __name__ == '__main__':
    main()
