"""Access to the parity fixtures in tests/fixtures/original (see its README.md).

ALBEF_REFERENCE_DIR, when set, points at another copy of them."""
import os
import types
from pathlib import Path

import pytest
import torch
from ruamel.yaml import YAML

REFERENCE_DIR = Path(os.environ.get('ALBEF_REFERENCE_DIR',
                                    Path(__file__).resolve().parent / 'fixtures' / 'original'))
TINY_A = REFERENCE_DIR / 'tiny_a'

# The fixtures' special-token ids ([PAD]=0, [CLS]=101, [SEP]=102, [MASK]=103).
STUB_TOKENIZER = types.SimpleNamespace(pad_token_id=0, cls_token_id=101, sep_token_id=102,
                                       mask_token_id=103)


def require_reference():
    if not TINY_A.is_dir():
        pytest.fail(f'parity fixtures not found at {TINY_A}; set ALBEF_REFERENCE_DIR')


def load_kind(kind):
    """(config, checkpoint path, inputs, expected) of one fixture kind."""
    require_reference()
    folder = TINY_A / kind
    config = YAML(typ='safe').load((folder / 'config.yaml').read_text())
    config['bert_config'] = str(folder / config['bert_config'])
    inputs = torch.load(folder / 'inputs.pt', weights_only=True)
    expected = torch.load(folder / 'expected.pt', weights_only=True)
    return config, folder / 'checkpoint.pth', inputs, expected


def text_batch(ids, att):
    return types.SimpleNamespace(input_ids=ids, attention_mask=att)


def assert_close(actual, expected, name, rtol=1e-5, atol=1e-5):
    actual = actual.detach()
    assert actual.shape == expected.shape, f'{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}'
    if expected.dtype in (torch.int64, torch.int32, torch.bool):
        assert torch.equal(actual.to(expected.dtype), expected), f'{name}: integers differ'
        return
    diff = (actual.double() - expected.double()).abs().max().item()
    assert torch.allclose(actual.double(), expected.double(), rtol=rtol, atol=atol), \
        f'{name}: max abs diff {diff:.3g}'
