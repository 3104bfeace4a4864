"""Faults a long run meets, and the clear errors or policies they get: bad samples (fail / skip
and count), image modes and sizes, a fuzz test of the datasets, config validation, unreadable
checkpoints, non-finite losses (stop naming the last good checkpoint, or skip and count) and a
rank that dies."""
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import engine
import utils
from dataset import create_dataset, skipped_samples
from dataset import images as images_module
from dataset.caption_dataset import re_train_dataset
from dataset.faults import BadSamplePolicy, SampleError
from dataset.grounding_dataset import grounding_dataset
from dataset.images import ImageLoadError, load_image
from dataset.nlvr_dataset import nlvr_dataset
from dataset.pretrain_dataset import pretrain_dataset
from dataset.transforms import create_transform
from dataset.ve_dataset import ve_dataset
from dataset.vqa_dataset import vqa_dataset
from dataset.loaders import SeededDataset, train_loader
from engine import train_one_epoch
from models.checkpoint import CheckpointError, read_checkpoint
from scheduler import create_scheduler
from tests.tiny import ROOT, python_path, tiny_config

TRANSFORM = create_transform('pretrain', 16)


def colour_image(path, size=(12, 10), colour=(200, 40, 90), **save):
    Image.new('RGB', size, colour).save(path, **save)
    return path


# ----------------------------------------------------------------------------- bad samples

@pytest.fixture
def captions(tmp_path):
    colour_image(tmp_path / 'good.png')
    (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    records = [{'image': 'good.png', 'caption': 'a pink square'},
               {'image': 'missing.jpg', 'caption': 'gone'},
               {'image': 'broken.jpg', 'caption': 'corrupt'},
               {'image': 'good.png', 'caption': '?!...'},  # nothing left after cleaning
               {'image': 'good.png', 'caption': 'another pink square'}]
    path = tmp_path / 'ann.json'
    path.write_text(json.dumps(records))
    return tmp_path, path


def test_fail_policy_names_record_and_file(captions):
    root, path = captions
    dataset = BadSamplePolicy(pretrain_dataset([str(path)], TRANSFORM, image_root=str(root)), 'fail')
    assert dataset[0][1] == 'a pink square'
    with pytest.raises(ImageLoadError, match=r"record 1 \{'image': 'missing.jpg'.*not found: .*missing.jpg"):
        dataset[1]
    with pytest.raises(ImageLoadError, match=r'record 2 .*cannot read image .*broken.jpg.*on_bad_sample: skip'):
        dataset[2]
    with pytest.raises(SampleError, match=r"record 3 .*caption '\?!\.\.\.' is empty after cleaning"):
        dataset[3]


def test_skip_policy_serves_the_next_good_record_and_counts(captions, caplog):
    root, path = captions
    dataset = BadSamplePolicy(pretrain_dataset([str(path)], TRANSFORM, image_root=str(root)), 'skip')
    assert dataset[1][1] == 'another pink square'  # 1, 2 and 3 are unusable
    assert dataset.skipped() == 3
    assert 'missing.jpg' in caplog.text and 'broken.jpg' in caplog.text
    # the count crosses loader worker processes (shared memory)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=1)
    images, texts = next(iter(loader))
    assert images.shape == (5, 3, 16, 16) and 'gone' not in texts
    assert dataset.skipped() == 3 + (3 + 2 + 1)  # items 1, 2, 3 each skip to item 4
    assert skipped_samples(SeededDataset(dataset)) == 9


def test_skip_policy_gives_up_on_a_dataset_without_usable_records(tmp_path):
    path = tmp_path / 'ann.json'
    path.write_text(json.dumps([{'image': f'no{i}.jpg', 'caption': 'x'} for i in range(3)]))
    dataset = BadSamplePolicy(pretrain_dataset([str(path)], TRANSFORM, image_root=str(tmp_path)), 'skip')
    with pytest.raises(SampleError, match='consecutive unusable samples.*no0.jpg'):
        dataset[0]


def test_malformed_records_skipped_when_the_policy_says_so(tmp_path, caplog):
    path = tmp_path / 'ann.json'
    path.write_text(json.dumps([{'image': 'a.png', 'caption': 'fine'}, {'image': 'b.png'}, 7,
                                {'image': 'c.png', 'caption': ['ok', 3]}]))
    with pytest.raises(ValueError, match=r"ann.json, record 1: missing key 'caption'"):
        pretrain_dataset([str(path)], None)
    dataset = pretrain_dataset([str(path)], None, on_bad_sample='skip')
    assert [record['image'] for record in dataset.ann] == ['a.png']
    assert 'skipped 3 malformed record(s)' in caplog.text and 'record 1' in caplog.text


def test_create_dataset_policy_defaults_train_and_evaluation(tmp_path):
    from dataset.synthetic import generate
    generate(tmp_path, seed=0, size='tiny', image_size=16)
    for task, template in (('pretrain', 'Pretrain.yaml'), ('retrieval', 'Retrieval.yaml')):
        config = utils.with_defaults(tiny_config(template, tmp_path, tmp_path / 'c.yaml'), task)
        built = create_dataset('pretrain' if task == 'pretrain' else 're', config)
        built = built if isinstance(built, tuple) else (built,)
        assert built[0].policy == ('skip' if task == 'pretrain' else 'fail')
        assert all(dataset.policy == 'fail' for dataset in built[1:])  # evaluation never skips
        assert len(built[0]) == len(built[0].ann) > 0  # attributes read through the wrapper


# ----------------------------------------------------------------------------- image modes and sizes

@pytest.mark.parametrize('mode, extension', [('L', 'png'), ('RGBA', 'png'), ('P', 'gif'),
                                             ('CMYK', 'jpg'), ('I;16', 'png'), ('LA', 'png')])
def test_image_modes_load_as_rgb_through_a_dataset(tmp_path, mode, extension):
    image = Image.new('RGB', (9, 7), (30, 160, 220))
    if mode == 'I;16':
        image = Image.fromarray(np.full((7, 9), 40000, dtype=np.uint16))
    else:
        image = image.convert(mode)
    image.save(tmp_path / f'x.{extension}')
    loaded = load_image(str(tmp_path / f'x.{extension}'))
    assert loaded.mode == 'RGB' and loaded.size == (9, 7)
    if mode == 'I;16':
        assert np.asarray(loaded).max() == round(40000 / 257)
    (tmp_path / 'a.json').write_text(json.dumps([{'image': f'x.{extension}', 'caption': 'c'}]))
    tensor, _ = pretrain_dataset([str(tmp_path / 'a.json')], TRANSFORM, image_root=str(tmp_path))[0]
    assert tensor.shape == (3, 16, 16) and torch.isfinite(tensor).all()


def test_exif_rotated_image_keeps_stored_pixels_unless_asked(tmp_path):
    array = np.zeros((4, 8, 3), dtype=np.uint8)
    array[:, :4] = 255  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(tmp_path / 'r.png', exif=exif)
    stored = np.asarray(load_image(str(tmp_path / 'r.png')))
    assert stored.shape == (4, 8, 3) and stored[0, 0].tolist() == [255] * 3
    upright = np.asarray(load_image(str(tmp_path / 'r.png'), exif_transpose=True))
    assert upright.shape == (8, 4, 3)
    assert upright[0, -1].tolist() == [255] * 3 and upright[-1, 0].tolist() == [0] * 3  # turned 90 deg cw


def test_very_large_images(tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, 'MAX_PIXELS', 100_000)
    # a JPEG above the budget decodes at a reduced scale that fits, with the same content
    gradient = np.tile(np.linspace(0, 255, 640, dtype=np.uint8)[None, :, None], (480, 1, 3))
    Image.fromarray(gradient).save(tmp_path / 'big.jpg', quality=95)
    loaded = load_image(str(tmp_path / 'big.jpg'))
    assert loaded.size == (320, 240)  # 1/2 scale: the largest that fits
    assert abs(int(np.asarray(loaded)[120, 160, 0]) - int(gradient[240, 320, 0])) < 8
    # other formats above the budget are refused by name, before decoding
    Image.new('L', (640, 480)).save(tmp_path / 'big.png')
    with pytest.raises(ImageLoadError, match=r'big.png is too large: 640 x 480'):
        load_image(str(tmp_path / 'big.png'))
    monkeypatch.undo()
    assert load_image(str(tmp_path / 'big.png')).size == (640, 480)


# ----------------------------------------------------------------------------- fuzz

@contextmanager
def time_limit(seconds):
    def expire(*_):
        raise TimeoutError(f'no answer within {seconds} s: a hang')
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _image_bytes(rng):
    buffer = io.BytesIO()
    size = (rng.randint(1, 24), rng.randint(1, 24))
    image = Image.fromarray(np.random.default_rng(rng.randint(0, 999)).integers(
        0, 255, (size[1], size[0], 3), dtype=np.uint8))
    image.save(buffer, format=rng.choice(['PNG', 'JPEG', 'GIF', 'BMP', 'TIFF', 'WEBP']))
    data = bytearray(buffer.getvalue())
    damage = rng.choice(['none', 'truncate', 'flip', 'random', 'empty', 'header_only'])
    if damage == 'truncate':
        data = data[:rng.randint(0, len(data))]
    elif damage == 'flip':
        for _ in range(rng.randint(1, 12)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif damage == 'random':
        data = bytearray(rng.randbytes(rng.randint(1, 200)))
    elif damage == 'empty':
        data = bytearray()
    elif damage == 'header_only':
        data = data[:16]
    return bytes(data)


def _json_value(rng, depth=0):
    kind = rng.choice(['str', 'int', 'float', 'bool', 'null', 'list', 'dict'] if depth < 2 else
                      ['str', 'int', 'null'])
    if kind == 'str':
        return rng.choice(['', ' ', '?!', 'a b', 'x.png', 'img0.jpg', '\u00e9\u4e2d', 'True',
                           'entailment', 'vqa', 'word ' * 40])
    if kind == 'int':
        return rng.choice([0, -1, 3, 2 ** 40])
    if kind == 'float':
        return rng.choice([0.5, -1e300, 1e308])
    if kind == 'bool':
        return rng.random() < 0.5
    if kind == 'null':
        return None
    if kind == 'list':
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(['image', 'caption', 'x']): _json_value(rng, depth + 1) for _ in range(2)}


# (builder(ann_path, root, policy), a valid record); the fuzzer perturbs valid records
FUZZ_TARGETS = {
    'pretrain': (lambda p, r, pol: pretrain_dataset([p], TRANSFORM, image_root=r, on_bad_sample=pol),
                 {'image': 'img0.jpg', 'caption': ['a red circle', 'b']}),
    'retrieval': (lambda p, r, pol: re_train_dataset([p], TRANSFORM, r, on_bad_sample=pol),
                  {'image': 'img0.jpg', 'caption': 'a red circle', 'image_id': 3}),
    'vqa': (lambda p, r, pol: vqa_dataset([p], TRANSFORM, r, r, on_bad_sample=pol),
            {'image': 'img0.jpg', 'question': 'what colour?', 'answer': ['red', 'red'], 'dataset': 'vqa'}),
    'nlvr': (lambda p, r, pol: nlvr_dataset([p], TRANSFORM, r, on_bad_sample=pol),
             {'images': ['img0.jpg', 'img1.jpg'], 'sentence': 'two circles', 'label': 'True'}),
    've': (lambda p, r, pol: ve_dataset(p, TRANSFORM, r, on_bad_sample=pol),
           {'image': 'img0', 'sentence': 'a circle', 'label': 'neutral'}),
    'grounding': (lambda p, r, pol: grounding_dataset([p], TRANSFORM, r, on_bad_sample=pol),
                  {'image': 'img0.jpg', 'text': 'left circle'}),
}


def _fuzz_record(rng, valid):
    record = dict(valid)
    for _ in range(rng.randint(0, 3)):
        action = rng.choice(['drop', 'set', 'add', 'replace'])
        key = rng.choice(sorted(record) or ['image'])
        if action == 'drop':
            record.pop(key, None)
        elif action == 'set':
            record[key] = _json_value(rng)
        elif action == 'add':
            record[rng.choice(['extra', 'label', 'dataset'])] = _json_value(rng)
        else:
            return _json_value(rng)
    return record


def _fuzz_annotation_text(rng, records):
    text = json.dumps(records)
    damage = rng.random()
    if damage < 0.05:
        return text[:rng.randint(0, len(text))].encode()
    if damage < 0.08:
        return b'\xff\xfe' + text.encode()
    if damage < 0.10:
        return json.dumps({'not': 'a list'}).encode()
    return text.encode()


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL on corrupt files
def test_fuzz_datasets_fail_only_with_clear_errors(tmp_path):
    rng = random.Random(1234)
    cases, errors = 300, {}
    with time_limit(120):
        for case in range(cases):
            folder = tmp_path / f'case{case}'
            folder.mkdir()
            for name in ('img0.jpg', 'img1.jpg'):
                (folder / name).write_bytes(_image_bytes(rng))
            target = rng.choice(sorted(FUZZ_TARGETS))
            build, valid = FUZZ_TARGETS[target]
            records = [_fuzz_record(rng, valid) for _ in range(rng.randint(1, 3))]
            ann = folder / 'ann.json'
            ann.write_bytes(_fuzz_annotation_text(rng, records))
            policy = rng.choice(['fail', 'skip'])
            started = time.time()
            try:
                dataset = BadSamplePolicy(build(str(ann), str(folder), policy), policy)
                for index in range(len(dataset)):
                    dataset[index]
            except (ValueError, FileNotFoundError, ImageLoadError) as error:
                # the documented errors: each names the annotation file, a record or an image
                message = str(error)
                assert str(folder) in message or 'record' in message, (target, records, message)
                errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
            assert time.time() - started < 10, f'case {case} took too long'
    # the fuzzer reached every kind of failure and also produced usable datasets
    assert {'ValueError', 'ImageLoadError', 'SampleError'} <= set(errors), errors
    assert sum(errors.values()) < cases


# ----------------------------------------------------------------------------- config

TASK_OF = {'Pretrain': 'pretrain', 'NLVR_pretrain': 'pretrain_nlvr', 'Retrieval_coco': 'retrieval',
           'Retrieval_flickr': 'retrieval', 'Retrieval_flickr_zeroshot': 'retrieval',
           'Retrieval_coco_zeroshot_pretrained': 'retrieval', 'Retrieval': 'retrieval',
           'Grounding': 'grounding',
           'VQA': 'vqa', 'NLVR': 'nlvr', 'VE': 've'}


@pytest.mark.parametrize('path', sorted(str(p.relative_to(ROOT)) for p in ROOT.glob('configs/**/*.yaml')))
def test_every_shipped_config_validates(path):
    task = TASK_OF[os.path.basename(path)[:-len('.yaml')]]
    config = utils.with_defaults(utils.load_config(ROOT / path), task)
    world_size = 1 if '/tiny/' in path else 8  # the paper's 8 GPUs
    assert utils.validate(config, task, world_size) is config


def paper_config():
    return utils.with_defaults(utils.load_config(ROOT / 'configs/Pretrain.yaml'), 'pretrain')


@pytest.mark.parametrize('change, message', [
    (dict(quee_size=4096), r"unknown key 'quee_size'; did you mean 'queue_size'\?"),
    (dict(optimizer={'opt': 'adamW', 'lr': 1e-4, 'weight_decay': 0.02, 'wd': 0.1}),
     r"unknown key 'optimizer.wd'"),
    (dict(batch_size='64'), r"batch_size = '64' \(str\): expected int >= 1"),
    (dict(alpha=True), r'alpha = True \(bool\): expected float in \[0.0, 1.0\]'),
    (dict(precision='fp8'), r"precision = 'fp8': expected one of 'fp32', 'bf16', 'fp16'"),
    (dict(on_bad_sample='ignore'), r"on_bad_sample = 'ignore': expected one of 'fail', 'skip'"),
    (dict(train_file=[]), r'train_file = \[\]: expected str or list of str'),
    (dict(image_res=250), r'image_res = 250 is not divisible by patch_size = 16.*240 or 256'),
    (dict(batch_size=48), r'queue_size = 65536 is not divisible by the global batch.*48 x 8 = 384'),
    (dict(augment={'crop_scal': [0.5, 1.0]}), r"unknown key 'augment.crop_scal'; did you mean 'crop_scale'"),
    (dict(augment={'crop_scale': [0.9, 0.5]}), r'augment.crop_scale = \[0.9, 0.5\]: expected \[low, high\]'),
    (dict(augment={'hflip': 'no'}), r"augment.hflip = 'no' \(str\): expected bool"),
])
def test_config_errors_name_the_key_and_what_is_allowed(change, message):
    config = {**paper_config(), **change}
    with pytest.raises(utils.ConfigError, match=message):
        utils.validate(config, 'pretrain', world_size=8)


def test_missing_keys_and_speed_options():
    config = paper_config()
    del config['queue_size']
    with pytest.raises(utils.ConfigError, match="missing key 'queue_size'"):
        utils.validate(config, 'pretrain')
    options = dict(fast_train=True, precision='bf16', grad_checkpointing=True, compile=False,
                   accum_steps=4, optimizer_sharding='zero')
    utils.validate({**paper_config(), **options}, 'pretrain', world_size=8)
    with pytest.raises(utils.ConfigError, match='accum_steps = 0'):
        utils.validate({**paper_config(), 'accum_steps': 0}, 'pretrain')


def test_defaults_can_be_overridden_and_pretrain_stops_before_any_work(tmp_path):
    config = utils.apply_overrides(paper_config(), ['checkpoint_every_steps=500', 'on_bad_sample=fail'])
    assert config['checkpoint_every_steps'] == 500 and config['keep_checkpoints'] == 2
    assert utils.with_defaults({}, 'retrieval')['on_bad_sample'] == 'fail'
    import Pretrain
    out = tmp_path / 'never_created'
    with pytest.raises(utils.ConfigError, match="did you mean 'queue_size'"):
        Pretrain.main(['--config', str(_config_with(tmp_path, quee_size=256)), '--output_dir', str(out),
                       '--device', 'cpu'])
    assert not out.exists()


def _config_with(tmp_path, **extra):
    config = utils.load_config(ROOT / 'configs/tiny/Pretrain.yaml')
    config.update(init_deit=False, text_encoder=None, **extra)
    path = tmp_path / 'bad.yaml'
    utils.save_config(config, path)
    return path


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize('keep', [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, keep):
    path = tmp_path / 'full.pth'
    torch.save({'model': {'w': torch.randn(64, 64)}, 'epoch': 3, 'config': {'a': 1}}, path)
    data = path.read_bytes()
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"checkpoint '.*cut.pth' is unreadable \(truncated"):
        read_checkpoint(cut)


# ----------------------------------------------------------------------------- non-finite losses

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)

    def forward(self, x):
        return self.linear(x).squeeze(1)


def toy_run(tmp_path, nan_at, **config):
    config = {'optimizer': {}, 'checkpoint_every_steps': 2, 'keep_checkpoints': 5, **config}
    model = Toy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = create_scheduler({'sched': 'cosine', 'lr': 1e-2, 'epochs': 2, 'min_lr': 1e-4,
                                  'warmup_lr': 1e-2, 'warmup_epochs': 0}, optimizer)
    data = torch.utils.data.TensorDataset(torch.randn(20, 4), torch.randn(20))
    loader = train_loader(data, batch_size=2, num_workers=0, seed=0)
    run = engine.Run(config, tmp_path, 'pretrain')
    run.prepare(model, loader, optimizer=optimizer, lr_scheduler=scheduler)
    calls = []

    def train_step(model, batch, alpha):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        calls.append(len(calls))
        if len(calls) - 1 in nan_at:
            loss = loss * float('inf')
        return {'loss_mse': loss, 'loss_zero': loss.detach() * 0}

    run.begin_epoch(0)
    stats = train_one_epoch(model, loader, optimizer, scheduler, 0, 'cpu', config, train_step,
                            warmup_steps=0, hooks=run, stats_fmt=None)
    return run, optimizer, stats


def test_non_finite_loss_stops_naming_step_losses_and_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError) as error:
        toy_run(tmp_path, nan_at={5})
    message = str(error.value)
    assert 'epoch 0, iteration 5: loss_mse=inf, loss_zero=nan' in message
    assert f'last good checkpoint is {tmp_path}/checkpoint_00_step000004.pth' in message
    assert (tmp_path / 'checkpoint_00_step000004.pth').is_file()
    with pytest.raises(FloatingPointError, match='no checkpoint was written yet'):
        toy_run(tmp_path / 'early', nan_at={0})


def test_non_finite_steps_skipped_within_the_budget_and_counted(tmp_path, caplog):
    run, optimizer, stats = toy_run(tmp_path, nan_at={3, 7}, skip_nonfinite_steps=2)
    assert run.skipped_steps == 2
    assert {int(s['step']) for s in optimizer.state.values()} == {10 - 2}  # no update on skips
    assert np.isfinite(stats['loss_mse'])
    assert caplog.text.count('step skipped') == 2
    checkpoint = torch.load(tmp_path / 'checkpoint_00_step000008.pth', weights_only=False)
    assert checkpoint['resume']['skipped_nonfinite_steps'] == 2
    with pytest.raises(FloatingPointError, match=r'iteration 7.*after skipping 1 such step'):
        toy_run(tmp_path / 'over', nan_at={3, 7}, skip_nonfinite_steps=1)


# ----------------------------------------------------------------------------- a rank dies

def test_a_dead_rank_makes_the_other_exit_with_a_clear_error(tmp_path):
    data = tmp_path / 'data'
    from dataset.synthetic import generate
    generate(data, seed=0, size='tiny')
    config = data / 'pretrain.yaml'
    tiny_config('Pretrain.yaml', data, config, batch_size=4, queue_size=16,
                schedular=dict(epochs=3, warmup_epochs=1))
    base = {**os.environ, 'PYTHONPATH': python_path(), 'OMP_NUM_THREADS': '1', 'WORLD_SIZE': '2',
            'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(32500 + os.getpid() % 1000)}
    base.pop(engine.EXIT_AFTER_STEPS_ENV, None)
    cmd = [sys.executable, 'Pretrain.py', '--config', str(config), '--output_dir', str(tmp_path / 'out'),
           '--device', 'cpu', '--dist_timeout', '0.4']  # 24 s for a collective
    ranks = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**base, 'RANK': str(rank), 'LOCAL_RANK': str(rank),
                                   **({engine.EXIT_AFTER_STEPS_ENV: '2'} if rank == 1 else {})})
             for rank in (0, 1)]
    try:
        ranks[1].wait(timeout=240)
        died = time.time()
        assert ranks[1].returncode == 75
        _, stderr = ranks[0].communicate(timeout=60)
        waited = time.time() - died
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
    assert ranks[0].returncode != 0
    assert waited < 40, f'rank 0 needed {waited:.0f} s to notice'
    assert 'rank 0 of 2: lost contact with another process' in stderr, stderr[-2000:]
