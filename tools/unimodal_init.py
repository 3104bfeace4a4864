"""Unimodal starting weights for the tiny ALBEF, in the formats of the real ones.

ALBEF does not start from random weights: its image encoder starts from DeiT (a ViT trained on
ImageNet labels) and its text encoder from BERT (trained with masked language modelling). This
command makes the same two kinds of weights for the synthetic data, so the tiny pre-training
follows the paper's recipe and goes through the real loading code (`init_deit` reads a DeiT/timm
checkpoint, `text_encoder` a Hugging Face BERT directory):

- a ViT of the config's size trained on freshly drawn synthetic scenes (as DeiT is trained on
  ImageNet, data apart from the pre-training set) to name the coloured shapes of the image on
  its [CLS] token (multi-label) and, on each patch token, the colour, shape and size of the
  object it shows, and its own place in the image (dense labels: the fusion layers read the
  patch tokens, and a classifier on [CLS] alone leaves them blind to shape; labels that do not
  depend on where an object is wash the position embedding out of the tokens, and questions of
  left and right go unanswered), saved as `<out>/vit.pth` ({'model': state dict with a `head.*`
  classifier; the patch heads are not part of the ViT});
- a BERT of the config's `bert_config` size trained with MLM on the pre-training captions, saved
  by transformers in `<out>/bert/` (config.json + weights).

    python -m tools.unimodal_init --config configs/tiny/Pretrain.yaml --out data/synthetic/init

The captions are the pre-training ones; held-out retrieval-test images and captions, and
freshly drawn held-out scenes, are used for the printed check figures.
"""
import argparse
import io
import json
import logging
import os
import random
import re
import time

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

from PIL import Image

from dataset.images import load_image
from dataset.synthetic import (COL_NAMES, COLORS, ROW_NAMES, SHAPES, SIZES, label_map, render,
                               sample_scene)
from dataset.transforms import create_transform
from dataset.utils import pre_caption
from models.albef_base import fit_tokenizer, load_bert_config, mask_tokens
from models.tokenization_bert import BertTokenizer
from models.vit import vit_from_config
from utils import load_config

logger = logging.getLogger('albef.unimodal_init')

LABELS = [f'{color} {shape}' for color in COLORS for shape in SHAPES]
# With --cls_layout the [CLS] classifier also names where each object is: its column and its row
# of the scene's 3x3 layout ("red circle at the left", "red circle at the top").
LAYOUT_LABELS = [f'{label} at the {place}' for label in LABELS for place in COL_NAMES + ROW_NAMES]
# Per-patch labels: 0 background, 1 + index of the object's (colour, shape, size).
PATCH_LABELS = [(color, shape, size) for color in sorted(COLORS) for shape in SHAPES
                for size in sorted(SIZES)]
SCENE_SIDE = 96  # the side dataset.synthetic renders its images at
_OBJECT = re.compile(r'\b(%s) (%s)\b' % ('|'.join(COLORS), '|'.join(SHAPES)))


def object_labels(captions):
    """Multi-hot (len(LABELS),) of the coloured shapes any of the captions names."""
    target = torch.zeros(len(LABELS))
    for caption in captions:
        for color, shape in _OBJECT.findall(caption.lower()):
            target[LABELS.index(f'{color} {shape}')] = 1
    return target


class LabelledImages(torch.utils.data.Dataset):
    def __init__(self, records, image_root, transform):
        self.records, self.image_root, self.transform = records, image_root, transform

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        captions = record['caption'] if isinstance(record['caption'], list) else [record['caption']]
        image = load_image(os.path.join(self.image_root, record['image']))
        return self.transform(image), object_labels(captions)


def patch_labels(scene, grid):
    """(grid * grid,) long: per patch (row-major, as the ViT's tokens), 1 + the PATCH_LABELS
    index of the object covering most of its object pixels, 0 if it shows only background."""
    pixels = label_map(scene, SCENE_SIDE, lambda o: 1 + PATCH_LABELS.index((o.color, o.shape, o.size)))
    cell = -(-SCENE_SIDE // grid)  # a whole number of pixels per patch
    pixels = np.array(Image.fromarray(pixels).resize((grid * cell, grid * cell), Image.NEAREST))
    blocks = pixels.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    counts = np.stack([np.bincount(b, minlength=len(PATCH_LABELS) + 1) for b in blocks])
    counts[:, 0] = 0
    return torch.from_numpy(np.where(counts.max(1) > 0, counts.argmax(1), 0))


class Scenes(torch.utils.data.IterableDataset):
    """`count` random scenes of dataset.synthetic (never the stored ones: a seed of their own),
    JPEG-encoded like the stored images, as (image, object labels, patch labels)."""

    def __init__(self, count, seed, transform, grid):
        self.count, self.seed, self.transform, self.grid = count, seed, transform, grid

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        index, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        rng = random.Random(f'unimodal_init/{self.seed}/{index}')
        for _ in range(index, self.count, workers):
            scene = sample_scene(rng, SCENE_SIDE)
            encoded = io.BytesIO()
            render(scene, SCENE_SIDE).save(encoded, 'JPEG', quality=95)
            image = Image.open(encoded).convert('RGB')
            labels = torch.zeros(len(LABELS) + len(LAYOUT_LABELS))  # objects, then layout
            for o in scene.objects:
                labels[LABELS.index(f'{o.color} {o.shape}')] = 1
                for place in (COL_NAMES[o.col], ROW_NAMES[o.row]):
                    labels[len(LABELS) + LAYOUT_LABELS.index(f'{o.color} {o.shape} at the {place}')] = 1
            yield self.transform(image), labels, patch_labels(scene, self.grid)


POSITION_TARGETS = ('centre', 'cell')


class ViTClassifier(nn.Module):
    """The ALBEF ViT with a linear classifier on [CLS] (saved under DeiT's `head.` names), and
    on every patch token a linear classifier and a linear head for the patch's own place
    (training only): `position_target` 'centre' regresses its (x, y) centre, 'cell' classifies
    its column and its row of the patch grid."""

    def __init__(self, config, num_labels, num_patch_labels=len(PATCH_LABELS) + 1,
                 position_target='centre'):
        super().__init__()
        if position_target not in POSITION_TARGETS:
            raise ValueError(f'position_target {position_target!r}: one of {POSITION_TARGETS}')
        self.vit = vit_from_config(config)
        self.grid = config['image_res'] // config.get('patch_size', 16)
        self.position_target = position_target
        self.head = nn.Linear(self.vit.embed_dim, num_labels)
        self.patch_head = nn.Linear(self.vit.embed_dim, num_patch_labels)
        self.position_head = nn.Linear(self.vit.embed_dim,
                                       2 if position_target == 'centre' else 2 * self.grid)

    def forward(self, image):
        """(image logits (B, num_labels), patch logits (B, N, num_patch_labels), position
        outputs (B, N, 2): the regressed (x, y) centres in [-1, 1], or (B, N, 2 * grid): the
        column then the row logits)."""
        tokens = self.vit(image)
        patches = tokens[:, 1:]
        return self.head(tokens[:, 0]), self.patch_head(patches), self.position_head(patches)

    def predicted_centres(self, positions):
        """(B, N, 2) patch centres in [-1, 1] from the position outputs."""
        if self.position_target == 'centre':
            return positions
        cells = torch.stack([positions[..., :self.grid].argmax(-1),
                             positions[..., self.grid:].argmax(-1)], -1)
        return (cells.float() + 0.5) / self.grid * 2 - 1

    def position_loss(self, positions, centres):
        """The loss of the position outputs (B, N, .) against the true centres (N, 2)."""
        if self.position_target == 'centre':
            return F.mse_loss(positions, centres.expand(positions.shape[0], -1, -1))
        cells = ((centres + 1) / 2 * self.grid).long().clamp(0, self.grid - 1)  # (N, 2): col, row
        cells = cells.expand(positions.shape[0], -1, -1)
        return (F.cross_entropy(positions[..., :self.grid].flatten(0, 1), cells[..., 0].flatten()) +
                F.cross_entropy(positions[..., self.grid:].flatten(0, 1), cells[..., 1].flatten())) / 2

    @classmethod
    def from_file(cls, path, config):
        """A ViT saved by `save` (for the tiny config's sizes: loading is strict)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f'--vit {path}: no such file')
        saved = torch.load(path, map_location='cpu', weights_only=True)
        if not isinstance(saved, dict) or not {'model', 'patch_head', 'position_head'} <= set(saved):
            raise ValueError(f'--vit {path}: not a ViT saved by tools.unimodal_init (its '
                             "'model', 'patch_head' and 'position_head' entries are missing)")
        model = cls(config, len(saved.get('labels', LABELS)),
                    position_target=saved.get('position_target', 'centre'))
        vit = {k: v for k, v in saved['model'].items() if not k.startswith('head.')}
        model.vit.load_state_dict(vit)
        model.head.load_state_dict({k[5:]: v for k, v in saved['model'].items() if k.startswith('head.')})
        model.patch_head.load_state_dict(saved['patch_head'])
        model.position_head.load_state_dict(saved['position_head'])
        return model

    def save(self, path, made_by, checks):
        """DeiT's layout ({'model': ViT + `head.*`}, what init_deit reads), with the patch
        heads (for the checks of a copy), how the file was made and its held-out figures."""
        labels = LABELS + LAYOUT_LABELS[:self.head.out_features - len(LABELS)]
        torch.save({'model': self.deit_state_dict(), 'labels': labels,
                    'patch_head': self.patch_head.state_dict(),
                    'position_head': self.position_head.state_dict(),
                    'position_target': self.position_target, 'made_by': made_by,
                    'checks': checks}, path)

    def deit_state_dict(self):
        return {**self.vit.state_dict(), **{f'head.{k}': v for k, v in self.head.state_dict().items()}}


def chance_recall(records):
    """The expected object recall of a random ranking of the labels: count / len(LABELS)."""
    counts = [int(object_labels(r['caption'] if isinstance(r['caption'], list) else [r['caption']]).sum())
              for r in records]
    return sum(c * c / len(LABELS) for c in counts) / max(1, sum(counts))


def read_records(path):
    with open(path) as f:
        return json.load(f)


def patch_centres(grid):
    """(grid * grid, 2): the (x, y) centre of every patch (row-major) in [-1, 1]."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 - 1
    y, x = torch.meshgrid(centres, centres, indexing='ij')
    return torch.stack([x.flatten(), y.flatten()], -1)


def train_vit(config, test_records, image_root, scenes, lr, batch_size, device, seed=0,
              position_weight=1.0, position_target='centre', cls_layout=False):
    """Train on `scenes` fresh scenes; returns (model, check_vit's figures). `position_weight`
    scales the loss of the patches' places against the two label losses."""
    transform = create_transform('test', config['image_res'])  # the labels need whole images
    grid = config['image_res'] // config.get('patch_size', 16)
    loader = torch.utils.data.DataLoader(Scenes(scenes, seed, transform, grid),
                                         batch_size=batch_size,
                                         num_workers=min(1, config.get('num_workers', 0)))
    num_labels = len(LABELS) + (len(LAYOUT_LABELS) if cls_layout else 0)
    model = ViTClassifier(config, num_labels, position_target=position_target).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = max(1, -(-scenes // batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                   pct_start=0.1)
    centres = patch_centres(grid).to(device)
    model.train()
    for step, (image, labels, patches) in enumerate(loader):
        logits, patch_logits, positions = model(image.to(device))
        loss = (F.binary_cross_entropy_with_logits(logits, labels[:, :num_labels].to(device)) +
                F.cross_entropy(patch_logits.flatten(0, 1), patches.to(device).flatten()) +
                position_weight * model.position_loss(positions, centres))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            logger.info('ViT step %d/%d: loss %.4f', step, steps, loss.item())
    return model, check_vit(model, config, test_records, image_root, batch_size, device, seed)


def check_vit(model, config, test_records, image_root, batch_size, device, seed=0):
    """The share of the objects of the held-out `test_records` among their images' top-ranked
    labels, and on fresh held-out scenes the share of object patches whose colour, shape and
    size the patch classifier names, the mean distance (in patch widths) of the predicted
    patch centres from the true ones and, with the layout labels, the share of the objects'
    columns and rows the [CLS] classifier names."""
    transform = create_transform('test', config['image_res'])
    grid = config['image_res'] // config.get('patch_size', 16)
    model.eval()
    test = LabelledImages(test_records, image_root, transform)
    found = named = 0
    held_out = {'color': 0, 'shape': 0, 'size': 0, 'patches': 0}
    centres, position_error, tokens = patch_centres(grid), 0.0, 0
    layout_right = layout_named = 0
    with torch.no_grad():
        for image, target in torch.utils.data.DataLoader(test, batch_size=batch_size):
            scores = model(image.to(device))[0].cpu()[:, :len(LABELS)]
            for row, labels in zip(scores, target):
                count = int(labels.sum())  # an image's objects among its `count` top labels
                found += labels[row.topk(count).indices].sum().item()
                named += count
        for image, labels, patches in torch.utils.data.DataLoader(
                Scenes(500, f'{seed}/held-out', transform, grid), batch_size=batch_size):
            logits, patch_logits, positions = model(image.to(device))
            if logits.shape[1] > len(LABELS):  # per present object: its column and row of 3
                places = logits.cpu()[:, len(LABELS):].view(-1, len(LABELS), 2, 3)
                truth = labels[:, len(LABELS):].view(-1, len(LABELS), 2, 3)
                present = truth.sum(-1) > 0
                layout_right += (places.argmax(-1) == truth.argmax(-1))[present].sum().item()
                layout_named += int(present.sum())
            predicted = patch_logits.argmax(-1).cpu()
            # a patch is 2 / grid wide in [-1, 1] coordinates
            off = (model.predicted_centres(positions).cpu() - centres).norm(dim=-1)
            position_error += (off * grid / 2).sum().item()
            tokens += positions.shape[0] * positions.shape[1]
            shown = patches > 0
            for name, part in zip(('color', 'shape', 'size'), (0, 1, 2)):
                names = lambda ids: [PATCH_LABELS[i - 1][part] if i else None for i in ids.tolist()]
                held_out[name] += sum(p == t for p, t in zip(names(predicted[shown]),
                                                             names(patches[shown])))
            held_out['patches'] += int(shown.sum())
    checks = {'object_recall': found / max(1, named),
              **{f'patch_{k}': held_out[k] / max(1, held_out['patches']) for k in ('color', 'shape', 'size')},
              'patch_position_error': position_error / max(1, tokens)}
    if layout_named:
        checks['cls_layout'] = layout_right / layout_named
    return checks


def train_bert(config, tokenizer, train_captions, test_captions, steps, lr, batch_size, device):
    from transformers import BertConfig as HFBertConfig
    from transformers import BertForMaskedLM as HFBertForMaskedLM

    ours = load_bert_config(config)
    hf_config = HFBertConfig(**{k: getattr(ours, k) for k in (
        'vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
        'intermediate_size', 'hidden_act', 'hidden_dropout_prob', 'attention_probs_dropout_prob',
        'max_position_embeddings', 'type_vocab_size', 'initializer_range', 'layer_norm_eps',
        'pad_token_id')})
    model = HFBertForMaskedLM(hf_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                   pct_start=0.1)
    max_tokens = config.get('max_tokens', 30)

    fit_tokenizer(tokenizer, ours)  # max_tokens above the position table is lowered to it

    def masked_batch(captions):
        text = tokenizer(captions, padding='longest', truncation=True, max_length=max_tokens,
                         return_tensors='pt')
        ids, labels = mask_tokens(text.input_ids, ours.vocab_size, tokenizer,
                                  config.get('mlm_probability', 0.15), targets=text.input_ids.clone())
        return ids.to(device), text.attention_mask.to(device), labels.to(device)

    model.train()
    order = torch.randperm(len(train_captions))
    for step in range(steps):
        start = (step * batch_size) % max(1, len(train_captions) - batch_size)
        ids, atts, labels = masked_batch([train_captions[i] for i in order[start:start + batch_size]])
        loss = model(input_ids=ids, attention_mask=atts, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info('BERT step %d: MLM loss %.4f', step, loss.item())
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for start in range(0, len(test_captions), batch_size):
            ids, atts, labels = masked_batch(test_captions[start:start + batch_size])
            predicted = model(input_ids=ids, attention_mask=atts).logits.argmax(-1)
            chosen = labels != -100
            correct += (predicted[chosen] == labels[chosen]).sum().item()
            total += chosen.sum().item()
    return model, correct / max(1, total)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default='configs/tiny/Pretrain.yaml',
                        help='pre-training config: model sizes, train_file, image_root, tokenizer')
    parser.add_argument('--out', default='data/synthetic/init')
    parser.add_argument('--test_file', default=None,
                        help='held-out records for the check figures (default: retrieval_test.json '
                             'beside the first train_file)')
    parser.add_argument('--vit_scenes', type=int, default=20000,
                        help='fresh synthetic scenes the ViT is trained on (one pass)')
    parser.add_argument('--vit_lr', type=float, default=1e-3)
    parser.add_argument('--position_weight', type=float, default=1.0,
                        help="weight of the loss of the patches' places in the ViT loss")
    parser.add_argument('--position_target', choices=POSITION_TARGETS, default='centre',
                        help="each patch's place: 'centre' regresses its (x, y) centre, 'cell' "
                             'classifies its column and row')
    parser.add_argument('--cls_layout', action='store_true',
                        help="the [CLS] classifier also names each object's column and row of "
                             "the scene's 3x3 layout")
    parser.add_argument('--vit', default=None,
                        help='a ViT made before by this command (its vit.pth): copied and checked '
                             'instead of training one')
    parser.add_argument('--bert_steps', type=int, default=300)
    parser.add_argument('--bert_lr', type=float, default=1e-3)
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
    if args.vit and not os.path.isfile(args.vit):
        parser.error(f'--vit {args.vit}: no such file')
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
    torch.manual_seed(args.seed)

    config = load_config(args.config)
    train = [r for path in config['train_file'] for r in read_records(path)]
    test_file = args.test_file or os.path.join(os.path.dirname(config['train_file'][0]),
                                               'retrieval_test.json')
    test = read_records(test_file)
    captions = lambda records: [pre_caption(c, config.get('max_words', 30)) for r in records
                                for c in (r['caption'] if isinstance(r['caption'], list)
                                          else [r['caption']])]
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)

    began = time.time()
    if args.vit:
        vit = ViTClassifier.from_file(args.vit, config).to(device)
        checks = check_vit(vit, config, test, config['image_root'], args.batch_size, device,
                           args.seed)
    else:
        vit, checks = train_vit(config, test, config['image_root'], args.vit_scenes,
                                args.vit_lr, args.batch_size, device, seed=args.seed,
                                position_weight=args.position_weight,
                                position_target=args.position_target,
                                cls_layout=args.cls_layout)
    vit.save(os.path.join(args.out, 'vit.pth'), made_by=(
        f'copied from {args.vit}' if args.vit else
        f'tools.unimodal_init --vit_scenes {args.vit_scenes} --vit_lr {args.vit_lr} '
        + (f'--position_weight {args.position_weight} ' if args.position_weight != 1 else '')
        + (f'--position_target {args.position_target} ' if args.position_target != 'centre' else '')
        + ('--cls_layout ' if args.cls_layout else '') +
        f'--batch_size {args.batch_size} --seed {args.seed}'), checks=checks)
    logger.info('ViT: %.1f%% of the objects in %d held-out images among their top-ranked labels '
                '(chance %.1f%%); held-out object patches named right: colour %.1f%%, shape '
                '%.1f%% (chance 20%%), size %.1f%%; patch centres %.2f patch widths off '
                '(%.0f s)', 100 * checks['object_recall'], len(test), 100 * chance_recall(test),
                100 * checks['patch_color'], 100 * checks['patch_shape'], 100 * checks['patch_size'],
                checks['patch_position_error'], time.time() - began)

    began = time.time()
    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    bert, accuracy = train_bert(config, tokenizer, captions(train), captions(test),
                                args.bert_steps, args.bert_lr, args.batch_size, device)
    bert.save_pretrained(os.path.join(args.out, 'bert'))
    logger.info('BERT: %.1f%% of masked held-out tokens predicted (%.0f s)', 100 * accuracy,
                time.time() - began)
    return {**{f'vit_{k}': v for k, v in checks.items()}, 'bert_mlm_accuracy': accuracy}


if __name__ == '__main__':
    main()
