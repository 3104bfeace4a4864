"""Text cleaning, image loading, RandAugment, transforms, the pre-training dataset and loaders."""
import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from dataset import create_dataset, create_loader, create_sampler
from dataset import randaugment as ra
from dataset.images import ImageLoadError, load_image
from dataset.pretrain_dataset import pretrain_dataset
from dataset.transforms import CLIP_MEAN, CLIP_STD, create_transform
from dataset.utils import pre_caption, pre_question


# ----------------------------------------------------------------------------- text cleaning

@pytest.mark.parametrize('raw, expected', [
    ("A man's dog, (running)!", 'a mans dog running'),
    ('On the-beach/sand: "yes"; #1 * ~ok?', 'on the beach sand yes 1 ok'),
    ('a <person> riding', 'a person riding'),
    ('a - b', 'a b'),                       # the dash leaves a run of spaces, collapsed
    ('  Two   spaces \n\n', 'two spaces'),
    ('tab\tstays', 'tab\tstays'),           # a single whitespace character is not collapsed
    ('x \t y', 'x y'),
    ('...', ''),
])
def test_pre_caption(raw, expected):
    assert pre_caption(raw) == expected


def test_pre_caption_truncates_to_max_words():
    text = ' '.join(f'w{i}' for i in range(40))
    assert pre_caption(text) == ' '.join(f'w{i}' for i in range(30))
    assert pre_caption(text, max_words=3) == 'w0 w1 w2'


@pytest.mark.parametrize('raw, expected', [
    ("What's the <person> doing?", 'whats the <person> doing'),  # no <person> rule
    ('Is it red-ish / blue?  ', 'is it red ish   blue'),           # no collapsing, trailing spaces cut
    (' leading space kept', ' leading space kept'),
    ('ends with newline\n', 'ends with newline\n'),
])
def test_pre_question(raw, expected):
    assert pre_question(raw) == expected


def test_pre_question_truncation_counts_empty_pieces():
    # Words are split on single spaces, so a double space counts as an (empty) word.
    assert pre_question('a  b c', max_words=2) == 'a '
    assert pre_question('one two three', max_words=2) == 'one two'


# ----------------------------------------------------------------------------- images

def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return str(path)


@pytest.mark.parametrize('mode', ['L', 'LA', 'RGBA', 'CMYK', '1', 'P'])
def test_load_image_converts_modes_to_rgb(tmp_path, mode):
    image = Image.new('RGB', (7, 5), (200, 100, 50)).convert(mode)
    path = _save(image, tmp_path / ('x.tiff' if mode == 'CMYK' else 'x.png'))
    out = load_image(path)
    assert out.mode == 'RGB' and out.size == (7, 5)
    assert np.array_equal(np.asarray(out), np.asarray(Image.open(path).convert('RGB')))


def test_load_image_palette_with_transparency(tmp_path):
    image = Image.new('P', (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    path = _save(image, tmp_path / 'p.png', transparency=0)
    assert np.asarray(load_image(path))[0, 0].tolist() == [10, 20, 30]


def test_load_image_16_bit_is_rescaled_not_clipped(tmp_path):
    array = np.array([[0, 257 * 100], [65535, 257 * 10]], dtype=np.uint16)
    path = _save(Image.fromarray(array), tmp_path / 'g16.png')
    out = np.asarray(load_image(path))
    assert out[..., 0].tolist() == [[0, 100], [255, 10]]
    assert (out[..., 0] == out[..., 2]).all()


def test_load_image_truncated_jpeg_is_an_error_unless_the_process_tolerates_it(tmp_path,
                                                                             monkeypatch):
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format='JPEG')
    path = tmp_path / 'cut.jpg'
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # cut inside the scan data
    with pytest.raises(ImageLoadError, match='cut.jpg.*truncated'):
        load_image(str(path))
    # the original's setting, if a process chooses it: decoded as far as the bytes go
    monkeypatch.setattr(ImageFile, 'LOAD_TRUNCATED_IMAGES', True)
    out = np.asarray(load_image(str(path)))
    complete = np.asarray(Image.open(buffer).convert('RGB'))
    assert out.shape == (64, 64, 3)
    assert np.array_equal(out[:8], complete[:8])  # what precedes the cut is decoded
    assert not np.array_equal(out[-8:], complete[-8:])


def test_load_image_exif_orientation_only_on_request(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(Image.new('RGB', (8, 4)), tmp_path / 'o.jpg', exif=exif)
    assert load_image(path).size == (8, 4)
    assert load_image(path, exif_transpose=True).size == (4, 8)


def test_load_image_errors_name_the_file(tmp_path):
    missing = str(tmp_path / 'missing.jpg')
    with pytest.raises(ImageLoadError, match='missing.jpg'):
        load_image(missing)
    garbage = tmp_path / 'garbage.jpg'
    garbage.write_bytes(b'not an image at all')
    with pytest.raises(ImageLoadError, match='garbage.jpg'):
        load_image(str(garbage))
    assert issubclass(ImageLoadError, OSError)


# ----------------------------------------------------------------------------- RandAugment

@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return rng.integers(30, 220, (12, 10, 3), dtype=np.uint8)


@pytest.mark.parametrize('name', ra.ALBEF_AUGS)
def test_every_op_keeps_shape_and_dtype(image, name):
    op, level_to_arg = ra.OPS[name]
    np.random.seed(0)
    out = op(image) if level_to_arg is None else op(image, level_to_arg(7))
    assert out.shape == image.shape and out.dtype == np.uint8


def test_zero_magnitude_geometric_ops_are_identity(image):
    for op in (ra.shear_x, ra.shear_y, ra.translate_x, ra.translate_y, ra.rotate):
        assert np.array_equal(op(image, 0), image)
    assert ra.identity(image) is image
    assert np.array_equal(ra.sharpness(image, 1.0), image)
    assert np.array_equal(ra.brightness(image, 1.0), image)


def test_autocontrast_and_equalize_match_pil(image):
    pil = Image.fromarray(image)
    assert np.array_equal(ra.autocontrast(image), np.asarray(ImageOps.autocontrast(pil)))
    assert np.array_equal(ra.equalize(image), np.asarray(ImageOps.equalize(pil)))
    stretched = ra.autocontrast(image)
    assert stretched[..., 0].min() == 0 and stretched[..., 0].max() == 255
    flat = np.full((4, 4, 3), 77, dtype=np.uint8)
    assert np.array_equal(ra.autocontrast(flat), flat) and np.array_equal(ra.equalize(flat), flat)


def test_brightness_scales_and_clips():
    img = np.array([[[0, 100, 200]]], dtype=np.uint8)
    assert ra.brightness(img, 1.36).tolist() == [[[0, 136, 255]]]


def test_sharpness_leaves_border_and_flat_regions(image):
    out = ra.sharpness(image, 1.36)
    assert np.array_equal(out[0], image[0]) and np.array_equal(out[:, -1], image[:, -1])
    assert not np.array_equal(out[1:-1, 1:-1], image[1:-1, 1:-1])
    flat = np.full((5, 5, 3), 90, dtype=np.uint8)
    assert np.array_equal(ra.sharpness(flat, 1.36), flat)
    spike = np.zeros((3, 3, 3), dtype=np.uint8)
    spike[1, 1] = 250  # extrapolation beyond 255 must clip, not wrap
    assert ra.sharpness(spike, 1.36)[1, 1].tolist() == [255, 255, 255]


def test_translate_moves_content_and_fills_grey():
    # A positive offset moves the content left/up (PIL's convention, as the original).
    img = np.zeros((4, 10, 3), dtype=np.uint8)
    img[:, 9] = 255
    out = ra.translate_x(img, 7.0)
    assert out[:, 2].tolist() == [[255] * 3] * 4
    assert (out[:, 3:] == 128).all() and (out[:, :2] == 0).all()
    down = ra.translate_y(np.full((10, 4, 3), 9, dtype=np.uint8), -7.0)
    assert (down[:7] == 128).all() and (down[7:] == 9).all()


def _replay(img, seed, augs, N=2):
    """Apply RandomAugment's documented RNG protocol by hand with the op functions."""
    np.random.seed(seed)
    magnitudes = {'ShearX': 0.21, 'ShearY': 0.21, 'TranslateX': 7.0, 'TranslateY': 7.0, 'Rotate': 21.0,
                  'Brightness': 1.36, 'Sharpness': 1.36}
    for name in np.random.choice(augs, N):
        if np.random.random() > 0.5:
            continue
        op, level_to_arg = ra.OPS[name]
        if level_to_arg is None:
            img = op(img)
        elif name in ('Brightness', 'Sharpness'):
            img = op(img, magnitudes[name])
        else:
            img = op(img, -magnitudes[name] if np.random.random() > 0.5 else magnitudes[name])
    return img


@pytest.mark.parametrize('augs', [['Rotate'], ['TranslateX', 'ShearY'], list(ra.ALBEF_AUGS)])
def test_random_augment_rng_protocol_and_magnitudes(image, augs):
    augment = ra.RandomAugment(2, 7, augs=augs)
    applied = 0
    for seed in range(12):
        np.random.seed(seed)
        out = augment(image)
        expected = _replay(image, seed, augs)
        assert np.array_equal(out, expected), seed
        applied += not np.array_equal(out, image)
    assert applied > 0


def test_random_augment_deterministic_and_accepts_pil(image):
    augment = ra.RandomAugment(2, 7, isPIL=True)
    np.random.seed(3)
    first = augment(Image.fromarray(image))
    np.random.seed(3)
    assert np.array_equal(first, augment(image))
    assert isinstance(first, np.ndarray)
    with pytest.raises(ValueError, match='Solarize'):
        ra.RandomAugment(augs=['Solarize'])


# ----------------------------------------------------------------------------- transforms

def test_test_transform_is_square_bicubic_resize_and_clip_normalisation():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    out = create_transform('test', 16)(img)
    resized = np.asarray(img.resize((16, 16), Image.BICUBIC), dtype=np.float32) / 255
    expected = (torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(CLIP_MEAN)[:, None, None]) \
        / torch.tensor(CLIP_STD)[:, None, None]
    assert out.shape == (3, 16, 16)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize('kind, scale', [('pretrain', (0.2, 1.0)), ('train', (0.5, 1.0))])
def test_train_transforms(kind, scale):
    transform = create_transform(kind, 24)
    crop, flip, augment = transform.transforms[:3]
    assert crop.scale == scale and crop.size == (24, 24) and crop.interpolation.value == 'bicubic'
    assert flip.p == 0.5 and isinstance(augment, ra.RandomAugment) and augment.M == 7
    out = transform(Image.new('RGB', (40, 31), (10, 200, 30)))
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_augment_section_overrides_the_training_recipe_only():
    light = {'crop_scale': [0.8, 1.0], 'hflip': False, 'randaugment': False}
    transform = create_transform('pretrain', 24, light)
    assert len(transform.transforms) == 3  # crop, ToTensor, Normalize
    assert transform.transforms[0].scale == (0.8, 1.0)
    kept = create_transform('train', 24, {'randaugment': False})
    assert kept.transforms[0].scale == (0.5, 1.0) and kept.transforms[1].p == 0.5
    assert not any(isinstance(t, ra.RandomAugment) for t in kept.transforms)
    assert len(create_transform('test', 24, light).transforms) == 3  # resize, ToTensor, Normalize
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    # crop scale 1 with the image's own aspect ratio and size: the identity geometry
    exact = create_transform('pretrain', 24, {'crop_scale': [1.0, 1.0], 'hflip': False,
                                              'randaugment': False})
    exact.transforms[0].ratio = (1.0, 1.0)
    assert torch.allclose(exact(img), create_transform('test', 24)(img), atol=1e-6)


def test_grounding_transform_resizes_without_crop():
    transform = create_transform('grounding_train', 20)
    assert transform.transforms[0].size == (20, 20)
    assert create_transform('grounding_train', 20)(Image.new('RGB', (9, 40))).shape == (3, 20, 20)
    with pytest.raises(ValueError, match='unknown transform kind'):
        create_transform('val', 20)


# ----------------------------------------------------------------------------- datasets and loaders

@pytest.fixture
def caption_files(tmp_path):
    for name, colour in (('a.jpg', (255, 0, 0)), ('b.jpg', (0, 0, 255))):
        Image.new('RGB', (20, 20), colour).save(tmp_path / name)
    first = [{'image': 'a.jpg', 'caption': 'A red, red square!'},
             {'image': str(tmp_path / 'b.jpg'), 'caption': ['Blue one.', 'Blue two?']}]
    second = [{'image': 'a.jpg', 'caption': 'third'}]
    paths = []
    for name, records in (('one.json', first), ('two.json', second)):
        (tmp_path / name).write_text(json.dumps(records))
        paths.append(str(tmp_path / name))
    return tmp_path, paths


def test_pretrain_dataset_reads_cleans_and_samples(caption_files):
    root, paths = caption_files
    dataset = pretrain_dataset(paths, create_transform('test', 8), image_root=str(root))
    assert len(dataset) == 3
    image, caption = dataset[0]
    assert image.shape == (3, 8, 8) and caption == 'a red red square'
    assert image[0].mean() > image[2].mean()  # red image
    assert dataset[2][1] == 'third'
    random.seed(0)
    seen = {dataset[1][1] for _ in range(30)}
    assert seen == {'blue one', 'blue two'}
    assert dataset[1][0][2].mean() > dataset[1][0][0].mean()  # absolute path kept: blue image


@pytest.mark.parametrize('record, message', [
    (['not', 'a dict'], 'expected an object'),
    ({'caption': 'x'}, "missing key 'image'"),
    ({'image': 'a.jpg'}, "missing key 'caption'"),
    ({'image': 'a.jpg', 'caption': '  '}, 'caption'),
    ({'image': 'a.jpg', 'caption': []}, 'caption'),
])
def test_malformed_records_name_file_and_index(tmp_path, record, message):
    path = tmp_path / 'bad.json'
    path.write_text(json.dumps([{'image': 'a.jpg', 'caption': 'fine'}, record]))
    with pytest.raises(ValueError, match=message) as error:
        pretrain_dataset([str(path)], None)
    assert 'bad.json' in str(error.value) and 'record 1' in str(error.value)


def test_unparsable_json_names_the_file(tmp_path):
    path = tmp_path / 'broken.json'
    path.write_text('[{"image": ')
    with pytest.raises(ValueError, match='broken.json'):
        pretrain_dataset([str(path)], None)
    with pytest.raises(FileNotFoundError, match='nothere.json'):
        pretrain_dataset([str(tmp_path / 'nothere.json')], None)


def test_create_dataset(caption_files):
    root, paths = caption_files
    dataset = create_dataset('pretrain', {'train_file': paths, 'image_res': 16, 'image_root': str(root)})
    assert len(dataset) == 3 and dataset[0][0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="supported: \\['pretrain'"):
        create_dataset('vqa_v3', {})
    import dataset.pretrain_dataset as module  # the package must not shadow its submodule
    assert hasattr(module, 'load_json_list')


def test_samplers_and_loaders():
    data = torch.utils.data.TensorDataset(torch.arange(10))
    samplers = create_sampler([data, data], [True, False], num_tasks=2, global_rank=1)
    assert [len(s) for s in samplers] == [5, 5] and samplers[0].shuffle and not samplers[1].shuffle
    train, test = create_loader([data, data], [None, None], [4, 4], [0, 0], [True, False], [None, None])
    assert len(train) == 2 and train.drop_last
    assert isinstance(train.sampler, torch.utils.data.RandomSampler)
    assert len(test) == 3 and not test.drop_last
    assert isinstance(test.sampler, torch.utils.data.SequentialSampler)
    (with_sampler,) = create_loader([data], samplers[:1], [2], [0], [True], [None])
    assert with_sampler.sampler is samplers[0] and len(with_sampler) == 2


def test_loader_rejects_dataset_smaller_than_a_training_batch():
    data = torch.utils.data.TensorDataset(torch.arange(10))
    with pytest.raises(ValueError, match='fewer than one batch of 16'):
        create_loader([data], [None], [16], [0], [True], [None])
    sampler = create_sampler([data], [True], num_tasks=4, global_rank=0)
    with pytest.raises(ValueError, match='3 samples per process'):
        create_loader([data], sampler, [4], [0], [True], [None])
    create_loader([data], [None], [16], [0], [False], [None])  # evaluation loaders may be short
    with pytest.raises(ValueError):
        create_loader([data, data], [None], [4], [0], [True], [None])
