"""Disk size of a full-size retrieval checkpoint before and after `albef export`.

The ALBEF of configs/Retrieval_coco.yaml (ViT-B/16 at 384 px, BERT-base split 6 + 6, momentum
encoders, queues of 65,536) with random weights, saved as the task scripts save it: {'model'
(with momentum encoders and queues), 'optimizer' (AdamW state after one step on zero gradients),
'lr_scheduler', 'config', 'epoch'}. Then exported in fp32 and fp16; prints the files' sizes in MB
(10^6 bytes), what each part of the checkpoint weighs, and the ratios. It needs about 5.5 GB of
memory and a minute or two on two CPU cores.

    python -m benchmarks.export_size [--dir /tmp/albef_export_size] [--keep]

The tokenizer is a stand-in vocabulary of the special tokens (bert-base-uncased may be neither
cached nor reachable); its real files add about 0.9 MB to an export folder.
"""
import argparse
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import utils
from albef.export import WEIGHTS, export_model, training_only
from models.checkpoint import has_momentum
from models.model_retrieval import ALBEF
from models.tokenization_bert import BertTokenizer
from optim import create_optimizer
from scheduler import create_scheduler

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6


def stand_in_tokenizer(folder):
    """A BERT-layout vocabulary ([PAD]=0, [unused*], [UNK]=100, [CLS], [SEP], [MASK], letters)."""
    words = (['[PAD]'] + [f'[unused{i}]' for i in range(99)] + ['[UNK]', '[CLS]', '[SEP]', '[MASK]']
             + list('abcdefghijklmnopqrstuvwxyz'))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'vocab.txt').write_text('\n'.join(words) + '\n')
    return BertTokenizer.from_pretrained(str(folder))


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def training_checkpoint(path, tokenizer):
    """Save the full training-style checkpoint; returns {part: bytes} of what it holds."""
    config = utils.load_config(ROOT / 'configs/Retrieval_coco.yaml')
    config.update(text_encoder=None, bert_config=str(ROOT / 'configs/config_bert.json'))
    torch.manual_seed(0)
    model = ALBEF(config=config, text_encoder=None, tokenizer=tokenizer)  # no BERT download
    optimizer = create_optimizer(config['optimizer'], model)
    lr_scheduler = create_scheduler(config['schedular'], optimizer)
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    optimizer.step()  # creates AdamW's exp_avg / exp_avg_sq for every trained parameter
    optimizer.zero_grad(set_to_none=True)
    state = model.state_dict()
    optimizer_state = optimizer.state_dict()
    parts = {
        'online weights': nbytes(v for k, v in state.items() if not training_only(k)),
        'momentum encoders': nbytes(v for k, v in state.items()
                                    if training_only(k) and has_momentum([k])),
        'queues': nbytes(v for k, v in state.items() if training_only(k) and not has_momentum([k])),
        'optimizer state': nbytes(t for s in optimizer_state['state'].values()
                                  for t in s.values() if torch.is_tensor(t)),
    }
    utils.save_checkpoint({'model': state, 'optimizer': optimizer_state,
                           'lr_scheduler': lr_scheduler.state_dict(), 'config': config,
                           'epoch': 0}, path)
    return parts


def folder_size(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob('*') if p.is_file())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dir', default=None, help='work folder (default: a temporary one)')
    parser.add_argument('--keep', action='store_true', help='keep the files written')
    args = parser.parse_args(argv)
    work = Path(args.dir or tempfile.mkdtemp(prefix='albef_export_size.'))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = stand_in_tokenizer(work / 'tokenizer')
        checkpoint = work / 'checkpoint.pth'
        start = time.perf_counter()
        parts = training_checkpoint(checkpoint, tokenizer)
        gc.collect()
        print(f'training checkpoint written in {time.perf_counter() - start:.0f} s')
        full = checkpoint.stat().st_size
        rows = [('training checkpoint (.pth)', full)]
        for dtype in ('fp32', 'fp16'):
            start = time.perf_counter()
            out = work / f'export_{dtype}'
            manifest = export_model(checkpoint, out, dtype=dtype, tokenizer=tokenizer)
            gc.collect()
            print(f'export {dtype}: {manifest["tensors"]} tensors kept, '
                  f'{manifest["dropped_training_tensors"]} left out, '
                  f'{time.perf_counter() - start:.0f} s')
            rows += [(f'export {dtype}: {WEIGHTS}', (out / WEIGHTS).stat().st_size),
                     (f'export {dtype}: whole folder', folder_size(out))]
        print('\nwhat the training checkpoint holds (tensor bytes):')
        for name, size in parts.items():
            print(f'  {name:<20} {size / MB:9.1f} MB  {size / full:6.1%}')
        print(f'\n{"file":<34} {"MB":>9} {"of .pth":>8} {"smaller":>8}')
        for name, size in rows:
            print(f'{name:<34} {size / MB:9.1f} {size / full:8.1%} {full / size:7.2f}x')
        return dict(rows)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
