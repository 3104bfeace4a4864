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
