"""1,000 seeded random image files through every reader of images: dataset.images.load_image (all
1,000), each dataset class, and the inference API (a path, and a PIL image opened from the
bytes). The only outcomes allowed are a valid RGB image (for a damaged file: the very pixels
of the undamaged one, never grey-filled) or an ImageLoadError naming the file; a dataset with
on_bad_sample: skip serves the next usable record instead."""
import io
import json
import random
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from albef import ALBEFInference
from dataset.caption_dataset import re_eval_dataset, re_train_dataset
from dataset.faults import BadSamplePolicy
from dataset.grounding_dataset import grounding_dataset
from dataset import images as images_module
from dataset.images import ImageLoadError, load_image
from dataset.nlvr_dataset import nlvr_dataset
from dataset.pretrain_dataset import pretrain_dataset
from dataset.transforms import create_transform
from dataset.ve_dataset import ve_dataset
from dataset.vqa_dataset import vqa_dataset
from models import model_retrieval
from tests.tiny import tiny_config

CASES = 1000
FORMATS = ['JPEG', 'PNG', 'GIF', 'BMP', 'WEBP', 'TIFF']
MODES = {'JPEG': ['RGB', 'L', 'CMYK'], 'PNG': ['RGB', 'RGBA', 'L', 'P', 'I;16', 'LA'],
         'GIF': ['P', 'L'], 'BMP': ['RGB', 'L', '1'], 'WEBP': ['RGB', 'RGBA'],
         'TIFF': ['RGB', 'L', 'I;16', 'F', 'CMYK']}
DAMAGES = ['none', 'truncate', 'truncate', 'flip', 'random', 'empty', 'header', 'huge']
TRANSFORM = create_transform('test', 16)


def encode(rng, image_format):
    size = (rng.randint(1, 40), rng.randint(1, 40))
    pixels = np.random.default_rng(rng.randrange(2 ** 32)).integers(0, 256, (size[1], size[0], 3),
                                                                     dtype=np.uint8)
    image = Image.fromarray(pixels)
    mode = rng.choice(MODES[image_format])
    if mode == 'I;16':
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    elif mode == 'F':
        image = Image.fromarray(pixels[..., 0].astype(np.float32) / 7)
    elif mode != 'RGB':
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def huge_header(rng, image_format):
    """A few bytes declaring an image of 400M+ pixels (a decompression bomb, or a lie)."""
    width, height = rng.randint(20_000, 65_000), rng.randint(20_000, 65_000)
    if image_format == 'PNG':
        return (b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height,
                                                                      8, 2, 0, 0, 0))
                + png_chunk(b'IDAT', zlib.compress(b'\x00' * 64)))
    if image_format == 'GIF':
        return (b'GIF89a' + struct.pack('<HHBBB', width, height, 0, 0, 0) + b',' +
                struct.pack('<HHHHB', 0, 0, width, height, 0) + b'\x02\x02\x44\x01\x00;')
    if image_format == 'BMP':
        return (b'BM' + struct.pack('<IHHI', 54, 0, 0, 54) +
                struct.pack('<IiiHHIIiiII', 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0))
    data = bytearray(encode(rng, 'JPEG'))
    sof = data.find(b'\xff\xc0')  # baseline frame header: length, precision, height, width
    data[sof + 5:sof + 9] = struct.pack('>HH', height, width)
    return bytes(data)


def fuzz_case(rng):
    """(bytes, the undamaged file or None, damage)."""
    image_format = rng.choice(FORMATS)
    original = encode(rng, image_format)
    damage = rng.choice(DAMAGES)
    data = bytearray(original)
    if damage == 'truncate':
        data = data[:rng.randint(1, len(data) - 1)]
    elif damage == 'flip':
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif damage == 'random':
        data = bytearray(rng.randbytes(rng.randint(1, 300)))
    elif damage == 'empty':
        data = bytearray()
    elif damage == 'header':
        data = data[:rng.randint(8, 40)]
    elif damage == 'huge':
        data = bytearray(huge_header(rng, rng.choice(['PNG', 'GIF', 'BMP', 'JPEG'])))
    return bytes(data), original, damage


def check_loaded(image, case, original):
    assert isinstance(image, Image.Image) and image.mode == 'RGB', case
    assert image.width >= 1 and image.height >= 1, case
    if case[1] == 'truncate':  # decoding a cut file is only right if nothing was lost
        assert np.array_equal(np.asarray(image), np.asarray(load_image(io.BytesIO(original)))), case


@pytest.fixture(scope='module', autouse=True)
def small_pixel_budget():
    """A JPEG header may declare 4G pixels over a few bytes of data; with the real budget it
    decodes (grey, as libjpeg fills what its data lacks) at 1/8 scale: 60M pixels, a second and
    a quarter gigabyte per case. A 2M budget refuses such a header by the same rule, at once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(images_module, 'MAX_PIXELS', 2_000_000)
        yield


@pytest.fixture(scope='module')
def fuzz_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp('fuzz')
    rng = random.Random(20240601)
    cases = []
    for index in range(CASES):
        data, original, damage = fuzz_case(rng)
        path = folder / f'case{index:04d}.jpg'  # PIL reads the content, not the suffix
        path.write_bytes(data)
        cases.append((str(path), damage, data, original))
    return folder, cases


@pytest.mark.filterwarnings('ignore::UserWarning')  # PIL on corrupt files
@pytest.mark.filterwarnings('ignore::RuntimeWarning')  # PIL's decompression-bomb warning
def test_load_image_and_the_api_give_rgb_or_a_named_error(fuzz_files, tmp_path):
    folder, cases = fuzz_files
    config = tiny_config('Retrieval.yaml', tmp_path, tmp_path / 'r.yaml', queue_size=16)
    torch.manual_seed(0)
    api = ALBEFInference(model_retrieval.ALBEF(config=config), 'retrieval', config, None)
    outcomes, usable, started = {}, [], time.time()
    for path, damage, data, original in cases:
        case = (path, damage)
        try:
            image = load_image(path)
        except ImageLoadError as error:
            assert path in str(error), (case, str(error))
            assert damage != 'none', (case, str(error))  # an undamaged file always loads
            outcome = 'error'
        else:
            check_loaded(image, case, original)
            usable.append(path)
            outcome = 'image'
        outcomes[damage, outcome] = outcomes.get((damage, outcome), 0) + 1

        try:  # the API given the path: the same outcome
            pixels = api.preprocess_images([path])
            assert outcome == 'image' and pixels.shape == (1, 3, 32, 32), case
        except ImageLoadError as error:
            assert outcome == 'error' and path in str(error), (case, str(error))

        try:  # the API given a PIL image the caller opened from the bytes (decoded lazily)
            opened = Image.open(io.BytesIO(data))
        except Exception:  # noqa: BLE001 - the caller's own open failed: nothing reaches the API
            continue
        try:
            picture = api.to_pil(opened)
        except ImageLoadError as error:
            assert 'given as a PIL image' in str(error), (case, str(error))
        else:
            check_loaded(picture, case, original)
            assert torch.isfinite(api.preprocess_images([picture])).all(), case
    # every kind of damage was met, and both outcomes
    assert {'none', 'truncate', 'flip', 'random', 'empty', 'header', 'huge'} == \
        {damage for damage, _ in outcomes}, outcomes
    assert outcomes.get(('none', 'image')) and outcomes.get(('truncate', 'error')), outcomes
    features = api.image_embeddings(usable)  # the model's own input path, batched
    assert features.shape == (len(usable), 16) and torch.isfinite(features).all()
    bad = next(path for path, damage, *_ in cases if path not in usable)
    with pytest.raises(ImageLoadError, match=bad):
        api.image_embeddings([usable[0], bad])
    assert time.time() - started < 40, 'too slow: a decoder hung on some input?'


# each dataset class: (builder(ann, root, policy), a record for image file(s) `names`)
DATASETS = {
    'pretrain': (lambda a, r, p: pretrain_dataset([a], TRANSFORM, image_root=r, on_bad_sample=p),
                 lambda names: {'image': names[0], 'caption': 'a red circle'}),
    'retrieval train': (lambda a, r, p: re_train_dataset([a], TRANSFORM, r, on_bad_sample=p),
                        lambda names: {'image': names[0], 'caption': 'a red circle', 'image_id': 3}),
    'retrieval evaluation': (lambda a, r, p: re_eval_dataset(a, TRANSFORM, r),
                             lambda names: {'image': names[0], 'caption': ['a red circle']}),
    'vqa': (lambda a, r, p: vqa_dataset([a], TRANSFORM, r, r, on_bad_sample=p),
            lambda names: {'image': names[0], 'question': 'what colour?', 'answer': ['red'],
                           'dataset': 'vqa'}),
    'nlvr': (lambda a, r, p: nlvr_dataset([a], TRANSFORM, r, on_bad_sample=p),
             lambda names: {'images': names[:2], 'sentence': 'two circles', 'label': 'True'}),
    've': (lambda a, r, p: ve_dataset(a, TRANSFORM, r, on_bad_sample=p),
           lambda names: {'image': names[0][:-len('.jpg')], 'sentence': 'a circle',
                          'label': 'neutral'}),
    'grounding': (lambda a, r, p: grounding_dataset([a], TRANSFORM, r, on_bad_sample=p),
                  lambda names: {'image': names[0], 'text': 'left circle'}),
}


def readable(path):
    try:
        load_image(path)
        return True
    except ImageLoadError:
        return False


@pytest.mark.filterwarnings('ignore::UserWarning')
@pytest.mark.filterwarnings('ignore::RuntimeWarning')
@pytest.mark.parametrize('name', sorted(DATASETS))
def test_every_dataset_fails_naming_the_file_or_skips(fuzz_files, name):
    """'fail': a record raises exactly when one of its files is unreadable, naming the record
    and the file; 'skip': every index serves a sample (evaluation data always fail)."""
    folder, cases = fuzz_files
    build, record = DATASETS[name]
    rng = random.Random(name)
    good = next(path for path, damage, *_ in cases if damage == 'none')
    paths = [path for path, *_ in rng.sample(cases, 24)]
    files = [[paths[i], paths[(i + 1) % len(paths)]] for i in range(len(paths))] + [[good, good]]
    files = [pair[:2 if name == 'nlvr' else 1] for pair in files]
    records = [record([p.rsplit('/', 1)[1] for p in pair]) for pair in files]
    ann = folder / f'{name.replace(" ", "_")}.json'
    ann.write_text(json.dumps(records))
    policies = ['fail'] if name == 'retrieval evaluation' else ['fail', 'skip']
    for policy in policies:
        dataset = BadSamplePolicy(build(str(ann), str(folder), policy), policy)
        for index, pair in enumerate(files):
            unreadable = [p for p in pair if not readable(p)]
            try:
                sample = dataset[index]
            except ImageLoadError as error:
                assert policy == 'fail' and unreadable, str(error)
                assert f'record {index}' in str(error) and unreadable[0] in str(error), str(error)
            else:
                assert policy == 'skip' or not unreadable, (index, pair)
                assert torch.isfinite(sample[0]).all()
        if policy == 'skip':
            assert dataset.skipped() > 0
    assert any(not readable(p) for pair in files for p in pair)  # the sample held bad files
