"""Tiny model settings and synthetic data shared by the script tests."""
import json
import os
from pathlib import Path

from utils import load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def python_path():
    """PYTHONPATH for a child process: the repository first, then what the caller's had
    (packages installed with --target, e.g. on a GPU machine, stay importable)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH')) if p)

# A model small enough for a few CPU steps per test: ViT 1x32 at 32 px, BERT 1+1 layers of 32.
TINY_MODEL = dict(image_res=32, patch_size=8, vision_width=32, vit_depth=1, vit_heads=2,
                  embed_dim=16)
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, fusion_layer=1, num_attention_heads=2,
                 intermediate_size=64, encoder_width=32)


def write_tiny_bert(folder):
    bert = json.loads((ROOT / 'configs/tiny/config_bert.json').read_text())
    bert.update(TINY_BERT)
    path = Path(folder) / 'config_bert.json'
    path.write_text(json.dumps(bert))
    return path


def tiny_config(template, data_dir, path, unimodal_init=False, **changes):
    """configs/tiny/<template> pointed at `data_dir` with the tiny model; saved to `path`.
    Random initial weights unless `unimodal_init` (then tools/unimodal_init.py must have written
    `data_dir/init`)."""
    config = load_config(ROOT / 'configs/tiny' / template)
    if not unimodal_init and 'init_deit' in config:
        config.update(init_deit=False, text_encoder=None)
    if 'distill' in config:  # the tiny fine-tuning configs turn it off; tests cover the full path
        config['distill'] = True
    for key, value in config.items():
        if isinstance(value, str) and value.startswith('data/synthetic'):
            config[key] = value.replace('data/synthetic', str(data_dir), 1)
        elif isinstance(value, list):
            config[key] = [v.replace('data/synthetic', str(data_dir), 1) if isinstance(v, str) else v
                           for v in value]
    config.update(bert_config=str(write_tiny_bert(data_dir)), num_workers=0, print_freq=2,
                  **{k: v for k, v in TINY_MODEL.items() if k in config})
    if 'warmup_steps' in config['schedular']:  # sized for the demo's data, longer than a test's run
        config['schedular']['warmup_steps'] = 0
    schedular = changes.pop('schedular', {})
    config.update(changes)
    config['schedular'].update(schedular)
    save_config(config, path)
    return config


def synthetic_with_pretrained(folder):
    """Tiny synthetic data in `folder` and a randomly initialised tiny pre-training checkpoint
    (`pretrained.pth`, the released layout) for the fine-tuning scripts."""
    import torch

    from dataset.synthetic import generate
    from models.model_pretrain import ALBEF
    from models.tokenization_bert import BertTokenizer

    folder = Path(folder)
    generate(folder, seed=0, size='tiny')
    config = tiny_config('Pretrain.yaml', folder, folder / 'pretrain.yaml', batch_size=4,
                         queue_size=16)
    torch.manual_seed(0)
    model = ALBEF(config=config, tokenizer=BertTokenizer.from_pretrained(config['tokenizer']),
                  init_deit=False)
    torch.save({'model': model.state_dict()}, folder / 'pretrained.pth')
    return folder, folder / 'pretrained.pth'
