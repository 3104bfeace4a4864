"""Full-size models have exactly the keys, shapes and dtypes of the released checkpoints
(tests/fixtures/original/state_dict_manifests.json). Built on the meta device: no memory,
no time."""
import json
import types

import torch

from tests.reference import REFERENCE_DIR, require_reference
from utils import load_config

STUB_TOKENIZER = types.SimpleNamespace(pad_token_id=0, cls_token_id=101, sep_token_id=102,
                                       mask_token_id=103)


def manifest(kind):
    require_reference()
    entries = json.loads((REFERENCE_DIR / 'state_dict_manifests.json').read_text())[kind]
    return [(key, tuple(shape), dtype) for key, shape, dtype in entries]


def layout(model):
    return [(k, tuple(v.shape), str(v.dtype).replace('torch.', ''))
            for k, v in model.state_dict().items()]


def test_pretrain_model_matches_released_layout():
    from models.model_pretrain import ALBEF
    config = load_config('configs/Pretrain.yaml')
    with torch.device('meta'):
        model = ALBEF(config=config, text_encoder=None, tokenizer=STUB_TOKENIZER, init_deit=False)
    assert layout(model) == manifest('pretrain')
