"""Grounding.py end to end on synthetic referring expressions: fine-tune, localise with
Grad-CAM (itm and itc modes), score proposals, keep and re-evaluate the best checkpoint."""
import json
import math

import pytest

import Grounding
from tests.tiny import synthetic_with_pretrained, tiny_config


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    data, pretrained = synthetic_with_pretrained(tmp_path_factory.mktemp('synthetic'))
    path = data / 'grounding.yaml'
    tiny_config('Grounding.yaml', data, path, batch_size=4, queue_size=16,
                schedular=dict(epochs=1))
    return path, pretrained


def run(config_path, out, *args):
    return Grounding.main(['--config', str(config_path), '--output_dir', str(out),
                           '--device', 'cpu', *args])


def test_finetune_localise_and_reevaluate(setup, tmp_path):
    config_path, pretrained = setup
    out = tmp_path / 'train'
    result = run(config_path, out, '--checkpoint', str(pretrained), '--block_num', '1')
    log = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert log[-1] == {'best_epoch': 0}
    for split in ('val_d', 'testA_d', 'testB_d'):
        assert 0.0 <= log[0][split] <= 1.0, log[0]
    again = run(config_path, tmp_path / 'eval', '--checkpoint', str(out / 'checkpoint_best.pth'),
                '--block_num', '1', '--evaluate')
    assert again['accuracy'] == pytest.approx(result['accuracy'])
    assert again['best_epoch'] is None


def test_itc_mode_and_a_layer_without_cross_attention(setup, tmp_path):
    config_path, pretrained = setup
    result = run(config_path, tmp_path / 'itc', '--checkpoint', str(pretrained), '--evaluate',
                 '--gradcam_mode', 'itc', '--block_num', '0')
    assert all(not math.isnan(v) and 0 <= v <= 1 for v in result['accuracy'].values())
    with pytest.raises(ValueError, match='has no cross-attention'):
        run(config_path, tmp_path / 'bad', '--checkpoint', str(pretrained), '--evaluate',
            '--block_num', '0')


def test_gradcam_overlays_one_png_per_word(setup, tmp_path):
    from PIL import Image

    from tools.gradcam_overlay import main as overlay_main
    config_path, pretrained = setup
    image = config_path.parent / 'images' / sorted(p.name for p in (config_path.parent / 'images').iterdir())[0]
    overlay_main(['--config', str(config_path), '--checkpoint', str(pretrained), '--image',
                  str(image), '--text', 'the red circle', '--block_num', '1', '--out',
                  str(tmp_path), '--device', 'cpu'])
    written = sorted(p.name for p in tmp_path.glob('*.png'))
    assert written == ['00_average.png', '01_the.png', '02_red.png', '03_circle.png']
    with Image.open(image) as original, Image.open(tmp_path / '02_red.png') as picture:
        assert picture.size == original.size


def test_heatmaps_at_any_resolution(setup):
    import torch

    from models.gradcam import heatmaps
    from models.model_retrieval import ALBEF
    from models.checkpoint import load_weights
    from models.tokenization_bert import BertTokenizer
    from utils import load_config
    config_path, pretrained = setup
    config = load_config(config_path)
    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, tokenizer=tokenizer)
    load_weights(model, pretrained, 'retrieval')
    model.eval()
    text = tokenizer(['a red circle', 'the big blue square'], padding='longest', return_tensors='pt')
    image = torch.randn(2, 3, config['image_res'], config['image_res'])
    token_maps, average = heatmaps(model, image, text.input_ids, text.attention_mask, 1, size=(50, 70))
    assert token_maps.shape == (2, text.input_ids.shape[1], 50, 70) and average.shape == (2, 50, 70)
    # padded positions of the shorter caption get no heat
    assert torch.all(token_maps[0, text.attention_mask[0] == 0] == 0)
