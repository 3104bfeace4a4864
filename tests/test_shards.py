"""Pre-training from webdataset shards (dataset/shards.py, tools/write_shards.py): the same samples
as from the JSON, a split over ranks and loader workers without duplicates or losses that resumes
exactly at any step, bad samples under on_bad_sample, the writer's index and resizing, and
Pretrain.py on shards, killed and resumed, against an uninterrupted run."""
import io
import json
import logging
import shutil
import sys
import tarfile
from collections import Counter

import pytest
from PIL import Image

import Pretrain_nlvr
from dataset import create_dataset
from dataset.faults import SampleError, skipped_samples
from dataset.images import ImageLoadError
from dataset.loaders import train_loader
from dataset.pretrain_dataset import pretrain_dataset
from dataset.shards import INDEX_NAME, PretrainShards, count_samples, tar_samples
from dataset.synthetic import generate
from dataset.transforms import create_transform
from dataset.utils import pre_caption
from tests.test_resume import EXIT_CODE, assert_same_training_state, pretrain, pretrain_here
from tests.tiny import tiny_config
from tools import write_shards

pytest.importorskip('webdataset')

SAMPLES = 24  # the tiny synthetic pre-training set
PATTERN = '{00000..00004}.tar'  # 5 samples per shard, the last 4


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('shards')
    generate(root / 'data', seed=0, size='tiny')
    records = json.loads((root / 'data' / 'pretrain.json').read_text())
    assert len(records) == SAMPLES and all(isinstance(r['caption'], list) for r in records)
    # the same pairs with one caption each: captions then compare exactly
    single = [{'image': r['image'], 'caption': r['caption'][0]} for r in records]
    (root / 'data' / 'single.json').write_text(json.dumps(single))
    for name in ('pretrain', 'single'):
        assert write_shards.main(['--train_file', str(root / 'data' / f'{name}.json'), '--image_root',
                                  str(root / 'data'), '--out', str(root / name), '--shard_size', '5']) == 0
    return root


def shards(data, name='pretrain', transform=None, **kwargs):
    return PretrainShards([str(data / name / PATTERN)], transform or create_transform('test', 32), **kwargs)


def fingerprint(image):
    return hash(image.numpy().tobytes())


class Keys(PretrainShards):
    """Serves each sample's key with its seed instead of the image and caption."""

    def _parse(self, item):
        return item.key

    def _render(self, parsed, seed, in_worker):
        return parsed, seed


def batches(dataset, batch_size, workers, world_size, rank, epoch=0, steps_done=0, loader=None):
    loader = loader or train_loader(dataset, batch_size, workers, seed=42, world_size=world_size,
                                    rank=rank)
    dataset.set_position(epoch, steps_done)
    out = [(list(keys), seeds.tolist()) for keys, seeds in loader]
    assert len(out) == len(loader) == dataset.steps_per_epoch - steps_done
    return out


# ----------------------------------------------------------------------------- the samples

@pytest.mark.parametrize('name', ['single', 'pretrain'])
def test_shards_hold_the_json_samples(data, name):
    transform = create_transform('test', 32)
    from_json = pretrain_dataset(str(data / 'data' / f'{name}.json'), transform,
                                 image_root=str(data / 'data'))
    expected = {}  # image -> the cleaned captions its record may serve
    for index, ann in enumerate(from_json.ann):
        image, _ = from_json[index]
        captions = ann['caption'] if isinstance(ann['caption'], list) else [ann['caption']]
        expected[fingerprint(image)] = [pre_caption(c, 30) for c in captions]
    assert len(expected) == SAMPLES

    served = list(shards(data, name))
    assert Counter(fingerprint(image) for image, _ in served) == Counter(list(expected))  # each once
    for image, caption in served:
        assert caption in expected[fingerprint(image)]
    if name == 'single':
        assert Counter(c for _, c in served) == Counter(c for cs in expected.values() for c in cs)


@pytest.mark.filterwarnings('ignore:This DataLoader will create')
def test_split_over_ranks_and_workers_resumes_at_every_step(data):
    dataset = Keys([str(data / 'pretrain' / PATTERN)], None)
    for world_size, batch_size in ((1, 4), (2, 4), (3, 2)):
        for workers in (0, 2, 3):
            everything = []
            for rank in range(world_size):
                # one loader: its persistent workers read each new position
                loader = train_loader(dataset, batch_size, workers, seed=42, world_size=world_size,
                                      rank=rank)
                whole = batches(dataset, batch_size, workers, world_size, rank, loader=loader)
                everything += [key for keys, _ in whole for key in keys]
                for steps_done in range(1, len(whole)):  # resumed after any step: the same batches
                    assert batches(dataset, batch_size, workers, world_size, rank,
                                   steps_done=steps_done, loader=loader) == whole[steps_done:]
            # 24 samples divide into whole batches of every rank: each is served once
            assert sorted(everything) == [f'{k:09d}' for k in range(SAMPLES)], (world_size, workers)
    # another epoch: another order, the same samples
    epoch0, epoch1 = batches(dataset, 4, 2, 1, 0), batches(dataset, 4, 2, 1, 0, epoch=1)
    assert epoch0 != epoch1
    assert sorted(k for keys, _ in epoch1 for k in keys) == sorted(k for keys, _ in epoch0 for k in keys)


def test_json_files_beside_shards_and_epoch_length(data):
    dataset = PretrainShards([str(data / 'pretrain' / PATTERN), str(data / 'data' / 'pretrain.json')],
                             create_transform('test', 32), image_root=str(data / 'data'))
    assert dataset.num_samples == 2 * SAMPLES
    loader = train_loader(dataset, 5, 0, seed=0, world_size=2, rank=1)
    assert len(loader) == dataset.steps_per_epoch == (2 * SAMPLES) // 10
    images = Counter(fingerprint(image) for image, _ in shards(data))
    mixed = Counter(fingerprint(image) for image, _ in PretrainShards(
        [str(data / 'pretrain' / PATTERN), str(data / 'data' / 'pretrain.json')],
        create_transform('test', 32), image_root=str(data / 'data')))
    assert mixed == images + images  # every pair twice: once from a shard, once from the JSON


# ----------------------------------------------------------------------------- bad samples

@pytest.fixture(scope='module')
def damaged(data):
    """The shards with the image of key 000000007 (the third sample of 00001.tar) cut short,
    and no index (the counts come from the tar headers)."""
    folder = data / 'damaged'
    folder.mkdir()
    for k in range(5):
        name = f'{k:05d}.tar'
        with tarfile.open(data / 'pretrain' / name) as src, tarfile.open(folder / name, 'w') as dst:
            for member in src.getmembers():
                content = src.extractfile(member).read()
                if member.name == '000000007.jpg':
                    content = content[:len(content) // 2]
                member.size = len(content)
                dst.addfile(member, io.BytesIO(content))
    assert not (folder / INDEX_NAME).exists()
    return folder


def test_bad_sample_skipped_counted_and_replaced(damaged, caplog):
    caplog.set_level(logging.WARNING)
    dataset = PretrainShards([str(damaged / PATTERN)], create_transform('test', 32), on_bad_sample='skip')
    assert dataset.num_samples == SAMPLES
    for workers in (0, 2):
        keys = Keys([str(damaged / PATTERN)], None)
        order = [k for ks, _ in batches(keys, 4, workers, 1, 0) for k in ks]
        served = [fingerprint(image) for images, _ in batches_of(dataset, 4, workers) for image in images]
        assert len(served) == SAMPLES  # batches keep their size
        assert skipped_samples(dataset) == (1 if workers == 0 else 2)  # counted in workers too
        # the bad sample's place serves another sample of the stream: one image twice
        assert sorted(Counter(served).values()) == [1] * (SAMPLES - 2) + [2]
        if workers == 0:  # one range in one block: the next one served
            bad = order.index('000000007')
            assert served[bad] == served[bad + 1]
    assert f'shard {damaged / "00001.tar"}, key 000000007: cannot read image 000000007.jpg' in caplog.text


def batches_of(dataset, batch_size, workers):
    loader = train_loader(dataset, batch_size, workers, seed=42)
    dataset.set_position(0, 0)
    return list(loader)


def test_bad_sample_fails_naming_shard_and_key(damaged):
    dataset = PretrainShards([str(damaged / PATTERN)], create_transform('test', 32), on_bad_sample='fail')
    with pytest.raises(ImageLoadError, match=r'shard .*00001\.tar, key 000000007: cannot read image'):
        list(dataset)


def test_shard_cut_short(data, tmp_path):
    for k in range(5):
        (tmp_path / f'{k:05d}.tar').write_bytes((data / 'pretrain' / f'{k:05d}.tar').read_bytes())
    datasets = {policy: PretrainShards([str(tmp_path / PATTERN)], create_transform('test', 32),
                                       on_bad_sample=policy) for policy in ('skip', 'fail')}
    damaged = tmp_path / '00002.tar'
    content = damaged.read_bytes()
    damaged.write_bytes(content[:len(content) * 6 // 10])
    # cut after the samples were counted: the positions it no longer holds are bad samples
    assert len(list(datasets['skip'])) == SAMPLES and 0 < skipped_samples(datasets['skip']) < 5
    with pytest.raises(SampleError, match=r'cannot read shard .*00002\.tar after \d samples: ReadError'):
        list(datasets['fail'])
    # a shard that cannot be counted stops the run before training
    with pytest.raises(ValueError, match=r'shard .*00002\.tar is not a readable tar file'):
        PretrainShards([str(tmp_path / PATTERN)], create_transform('test', 32))


def test_without_webdataset_the_error_names_the_extra(data, monkeypatch):
    monkeypatch.setitem(sys.modules, 'webdataset', None)  # import fails as if not installed
    config = tiny_config('Pretrain.yaml', data / 'data', data / 'no_wds.yaml',
                         train_file=[str(data / 'pretrain' / PATTERN)])
    with pytest.raises(ImportError, match=r'pip install -e "\.\[webdataset\]"'):
        create_dataset('pretrain', config)


# ----------------------------------------------------------------------------- the writer

def test_writer_keeps_caption_lists_and_indexes(data):
    records = json.loads((data / 'data' / 'pretrain.json').read_text())
    index = json.loads((data / 'pretrain' / INDEX_NAME).read_text())
    assert [s['samples'] for s in index['shards']] == [5, 5, 5, 5, 4] and index['samples'] == SAMPLES
    assert [count_samples(data / 'pretrain' / s['name']) for s in index['shards']] == [5, 5, 5, 5, 4]
    key, files = next(tar_samples(data / 'pretrain' / '00001.tar', start=2))
    assert key == '000000007' and set(files) == {'jpg', 'txt', 'json'}
    assert json.loads(files['json']) == records[7]  # the caption list, drawn from at every read
    assert files['txt'].decode() == records[7]['caption'][0]
    # --index writes the same counts for shards from elsewhere
    copy = data / 'reindexed'
    copy.mkdir()
    for s in index['shards']:
        (copy / s['name']).write_bytes((data / 'pretrain' / s['name']).read_bytes())
    assert write_shards.main(['--index', str(copy)]) == 0
    assert json.loads((copy / INDEX_NAME).read_text())['shards'] == index['shards']


def test_writer_resizes_by_the_resize_images_rule(data, tmp_path):
    assert write_shards.main(['--train_file', str(data / 'data' / 'single.json'), '--image_root',
                              str(data / 'data'), '--out', str(tmp_path), '--shard_size', '10',
                              '--resize', '40']) == 0
    sizes = [Image.open(io.BytesIO(files['jpg'])).size for _, files in tar_samples(tmp_path / '00000.tar')]
    original = Image.open(data / 'data' / json.loads((data / 'data' / 'single.json').read_text())[0]['image'])
    assert min(original.size) > 40 and all(min(size) == 40 for size in sizes) and len(sizes) == 10
    # a folder with shards is not written into again
    with pytest.raises(SystemExit, match='already holds shards'):
        write_shards.main(['--train_file', str(data / 'data' / 'single.json'), '--out', str(tmp_path)])


# ----------------------------------------------------------------------------- Pretrain.py

def test_pretrain_on_shards_killed_and_resumed_equals_uninterrupted(data, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    config = tmp_path / 'pretrain.yaml'
    # 6 steps per epoch; 2 loader workers; a step checkpoint every 3 steps
    tiny_config('Pretrain.yaml', data / 'data', config, train_file=[str(data / 'pretrain' / PATTERN)],
                batch_size=4, queue_size=16, num_workers=2, checkpoint_every_steps=3,
                schedular=dict(epochs=2, warmup_epochs=1))
    whole, killed = tmp_path / 'whole', tmp_path / 'killed'
    pretrain_here(config, whole)
    log = [json.loads(line) for line in (whole / 'log.txt').read_text().splitlines()]
    assert [entry['epoch'] for entry in log] == [0, 1] and all(e['skipped_samples'] == 0 for e in log)

    # killed after step 4: resumed after step 3 of epoch 0, which worker 1 serves (the workers'
    # roles rotate), inside the warm-up and the alpha ramp
    result = pretrain(config, killed, exit_after=4)
    assert result.returncode == EXIT_CODE, result.stderr[-3000:]
    assert sorted(p.name for p in killed.glob('checkpoint_*.pth')) == ['checkpoint_00_step000003.pth']
    pretrain_here(config, killed, resume_run=True)
    assert 'epoch 0 after step 3' in caplog.text
    assert_same_training_state(whole, killed)


def test_pretrain_on_shards_two_processes_resumed_inside_an_epoch(data, tmp_path):
    config = tmp_path / 'pretrain.yaml'
    # 3 steps per epoch and rank, one loader worker each; a step checkpoint after every step
    tiny_config('Pretrain.yaml', data / 'data', config, train_file=[str(data / 'pretrain' / PATTERN)],
                batch_size=4, queue_size=16, num_workers=1, checkpoint_every_steps=1,
                schedular=dict(epochs=2, warmup_epochs=1))
    whole, resumed = tmp_path / 'whole', tmp_path / 'resumed'
    result = pretrain(config, whole, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    # the uninterrupted run's checkpoint after step 1 of epoch 1, continued in another folder
    # (tests/test_resume.py kills real processes of the same path)
    resumed.mkdir()
    shutil.copy(whole / 'checkpoint_01_step000001.pth', resumed)
    result = pretrain(config, resumed, nproc=2, resume_run=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training_state(whole, resumed)


def test_text_assignment_pretraining_on_shards_logs_skipped_samples(data, damaged, tmp_path):
    config = tmp_path / 'ta.yaml'
    tiny_config('NLVR_pretrain.yaml', data / 'data', config, train_file=[str(damaged / PATTERN)],
                batch_size=8, num_workers=0, schedular=dict(epochs=1))
    Pretrain_nlvr.main(['--config', str(config), '--output_dir', str(tmp_path / 'out'), '--device', 'cpu'])
    log = [json.loads(line) for line in (tmp_path / 'out' / 'log.txt').read_text().splitlines()]
    assert [(entry['epoch'], entry['skipped_samples']) for entry in log] == [(0, 1)]
