"""Retrieval.py end to end on synthetic data: fine-tune from a pre-training checkpoint, keep the
best checkpoint, evaluate it again with --evaluate; fast and plain evaluation agree."""
import json

import pytest
import torch

import Retrieval
from tests.tiny import synthetic_with_pretrained, tiny_config

METRICS = ('txt_r1', 'txt_r5', 'txt_r10', 'txt_r_mean', 'img_r1', 'img_r5', 'img_r10',
           'img_r_mean', 'r_mean')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    data, _ = synthetic_with_pretrained(tmp_path_factory.mktemp('synthetic'))
    path = data / 'retrieval.yaml'
    tiny_config('Retrieval.yaml', data, path, batch_size_train=4, batch_size_test=4,
                queue_size=16, k_test=4, schedular=dict(epochs=1))
    return data, path


def read_log(folder):
    return [json.loads(line) for line in (folder / 'log.txt').read_text().splitlines()]


def test_finetune_then_evaluate_the_best_checkpoint(setup, tmp_path):
    data, config_path = setup
    out = tmp_path / 'finetune'
    result = Retrieval.main(['--config', str(config_path), '--output_dir', str(out), '--device',
                             'cpu', '--checkpoint', str(data / 'pretrained.pth')])
    log = read_log(out)
    assert log[0]['epoch'] == 0 and log[-1] == {'best_epoch': 0}
    for split in ('val', 'test'):
        for name in METRICS:
            assert 0 <= log[0][f'{split}_{name}'] <= 100
    assert torch.isfinite(torch.tensor(log[0]['train_loss_ita']))
    assert (out / 'checkpoint_best.pth').is_file()

    evaluated = Retrieval.main(['--config', str(config_path), '--output_dir', str(tmp_path / 'eval'),
                                '--device', 'cpu', '--checkpoint', str(out / 'checkpoint_best.pth'),
                                '--evaluate'])
    assert evaluated['best_epoch'] is None
    assert evaluated['test'] == pytest.approx(result['test'])  # the saved model is the evaluated one
    plain = Retrieval.main(['--config', str(config_path), '--output_dir', str(tmp_path / 'plain'),
                            '--device', 'cpu', '--checkpoint', str(out / 'checkpoint_best.pth'),
                            '--evaluate', '--opts', 'fast_eval=false'])
    assert plain['test'] == pytest.approx(evaluated['test'])
    assert plain['val'] == pytest.approx(evaluated['val'])


def test_evaluate_a_pretraining_checkpoint(setup, tmp_path):
    """Zero-shot retrieval: --evaluate straight from a pre-training checkpoint (the layout of
    ALBEF.pth: `text_encoder.bert.*`, MLM heads, no idx_queue) gives recall figures, and the
    retrieval model evaluated is the pre-trained one (same weights, no interpolation at the
    checkpoint's own resolution)."""
    data, config_path = setup
    out = tmp_path / 'zeroshot'
    result = Retrieval.main(['--config', str(config_path), '--output_dir', str(out), '--device',
                             'cpu', '--checkpoint', str(data / 'pretrained.pth'), '--evaluate'])
    assert result['best_epoch'] is None
    for split in ('val', 'test'):
        assert set(METRICS) <= set(result[split])
        for name in METRICS:
            assert 0 <= result[split][name] <= 100
    log = read_log(out)
    assert len(log) == 1 and log[0]['epoch'] == 0 and 'test_r_mean' in log[0]
    assert not any(key.startswith('train_') for key in log[0])  # nothing was trained
    assert not list(out.glob('*.pth'))  # and nothing saved

    # The same figures from the weights renamed by hand into the retrieval layout: the loader
    # maps every pre-trained tensor the evaluation uses, and only those.
    pretrained = torch.load(data / 'pretrained.pth', map_location='cpu')['model']
    assert pretrained['visual_encoder.pos_embed'].shape[1] == 1 + (32 // 8) ** 2  # 32 px, as the config
    converted = {key.replace('text_encoder.bert.', 'text_encoder.').replace(
                     'text_encoder_m.bert.', 'text_encoder_m.'): value
                 for key, value in pretrained.items() if '.cls.predictions.' not in key}
    converted['idx_queue'] = torch.full((1, 16), -100, dtype=torch.long)
    renamed = tmp_path / 'renamed.pth'
    torch.save({'model': converted}, renamed)
    again = Retrieval.main(['--config', str(config_path), '--output_dir', str(tmp_path / 'renamed'),
                            '--device', 'cpu', '--checkpoint', str(renamed), '--evaluate'])
    assert again['val'] == pytest.approx(result['val'])
    assert again['test'] == pytest.approx(result['test'])

    # and the loaded model holds the pre-trained tensors themselves (both runs start from the
    # same seeded random model, so equal figures alone would not show that anything loaded)
    from models.checkpoint import load_weights
    from models.model_retrieval import ALBEF
    from models.tokenization_bert import BertTokenizer
    from utils import load_config

    config = load_config(config_path)
    model = ALBEF(config=config, text_encoder=None,
                  tokenizer=BertTokenizer.from_pretrained(config['tokenizer']))
    report = load_weights(model, data / 'pretrained.pth', 'retrieval')
    assert not report.errors and report.expected_missing == ['idx_queue']
    assert report.expected_unexpected and all('.cls.predictions.' in k
                                              for k in report.expected_unexpected)
    state = model.state_dict()
    for key, value in converted.items():
        if key != 'idx_queue':
            assert torch.equal(state[key], value), key


@pytest.mark.parametrize('name, like', [('Retrieval_flickr_zeroshot.yaml', 'Retrieval_coco.yaml'),
                                        ('Retrieval_coco_zeroshot_pretrained.yaml', 'Pretrain.yaml')])
def test_zero_shot_configs(name, like):
    """The zero-shot configs validate for the retrieval task on the paper's 8 GPUs, and their
    model matches the checkpoint they are meant for: Flickr30K from a COCO-fine-tuned file at its
    384 px; COCO from a pre-training file at its own 256 px and queue (which are loaded as is)."""
    import utils
    from tests.tiny import ROOT
    from utils import load_config

    config = utils.with_defaults(load_config(ROOT / 'configs' / name), 'retrieval')
    assert utils.validate(config, 'retrieval', world_size=8) is config
    source = load_config(ROOT / 'configs' / like)
    for key in ('image_res', 'patch_size', 'vision_width', 'vit_depth', 'vit_heads', 'embed_dim',
                'bert_config', 'queue_size'):
        assert config[key] == source[key], key
