"""Unimodal starting weights for the tiny ALBEF, in the formats of the real ones.

ALBEF does not start from random weights: its image encoder starts from DeiT (a ViT trained on
ImageNet labels) and its text encoder from BERT (trained with masked language modelling). This
command makes the same two kinds of weights for the synthetic data, so the tiny pre-training
follows the paper's recipe and goes through the real loading code (`init_deit` reads a DeiT/timm
checkpoint, `text_encoder` a Hugging Face BERT directory):

- a ViT of the config's size trained to name the coloured shapes in each pre-training image
  (multi-label), saved as `<out>/vit.pth` ({'model': state dict with a `head.*` classifier});
- a BERT of the config's `bert_config` size trained with MLM on the pre-training captions, saved
  by transformers in `<out>/bert/` (config.json + weights).

    python -m tools.unimodal_init --config configs/tiny/Pretrain.yaml --out data/synthetic/init

The images and captions are the pre-training ones only; held-out retrieval-test images and
captions are used for the printed check figures.
"""
import argparse
import json
import logging
import os
import re
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset.images import load_image
from dataset.synthetic import COLORS, SHAPES
from dataset.transforms import create_transform
from dataset.utils import pre_caption
from models.albef_base import fit_tokenizer, load_bert_config, mask_tokens
from models.tokenization_bert import BertTokenizer
from models.vit import vit_from_config
from utils import load_config

logger = logging.getLogger('albef.unimodal_init')

LABELS = [f'{color} {shape}' for color in COLORS for shape in SHAPES]
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


class ViTClassifier(nn.Module):
    """The ALBEF ViT with a linear classifier on [CLS] (saved under DeiT's `head.` names)."""

    def __init__(self, config, num_labels):
        super().__init__()
        self.vit = vit_from_config(config)
        self.head = nn.Linear(self.vit.embed_dim, num_labels)

    def forward(self, image):
        return self.head(self.vit(image)[:, 0])

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


def train_vit(config, train_records, test_records, image_root, epochs, lr, batch_size, device):
    transform = create_transform('test', config['image_res'])  # the labels need whole images
    loader = torch.utils.data.DataLoader(LabelledImages(train_records, image_root, transform),
                                         batch_size=batch_size, shuffle=True,
                                         drop_last=len(train_records) > batch_size,
                                         num_workers=config.get('num_workers', 0))
    model = ViTClassifier(config, len(LABELS)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                   pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        for image, target in loader:
            loss = F.binary_cross_entropy_with_logits(model(image.to(device)), target.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        logger.info('ViT epoch %d: loss %.4f', epoch, loss.item())
    model.eval()
    test = LabelledImages(test_records, image_root, transform)
    found = named = 0
    with torch.no_grad():
        for image, target in torch.utils.data.DataLoader(test, batch_size=batch_size):
            scores = model(image.to(device)).cpu()
            for row, labels in zip(scores, target):
                count = int(labels.sum())  # an image's objects among its `count` top labels
                found += labels[row.topk(count).indices].sum().item()
                named += count
    return model, found / max(1, named)


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
    parser.add_argument('--vit_epochs', type=int, default=4)
    parser.add_argument('--vit_lr', type=float, default=1e-3)
    parser.add_argument('--bert_steps', type=int, default=300)
    parser.add_argument('--bert_lr', type=float, default=1e-3)
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
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
    vit, recall = train_vit(config, train, test, config['image_root'], args.vit_epochs,
                           args.vit_lr, args.batch_size, device)
    torch.save({'model': vit.deit_state_dict(), 'labels': LABELS}, os.path.join(args.out, 'vit.pth'))
    logger.info('ViT: %.1f%% of the objects in %d held-out images among their top-ranked labels '
                '(chance %.1f%%; %.0f s)', 100 * recall, len(test), 100 * chance_recall(test),
                time.time() - began)

    began = time.time()
    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    bert, accuracy = train_bert(config, tokenizer, captions(train), captions(test),
                                args.bert_steps, args.bert_lr, args.batch_size, device)
    bert.save_pretrained(os.path.join(args.out, 'bert'))
    logger.info('BERT: %.1f%% of masked held-out tokens predicted (%.0f s)', 100 * accuracy,
                time.time() - began)
    return {'vit_object_recall': recall, 'bert_mlm_accuracy': accuracy}


if __name__ == '__main__':
    main()
