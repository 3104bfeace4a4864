"""Images as every dataset and the inference API read them: truncated files are errors naming
the file (never grey-filled), and PIL images / arrays of any bit depth convert to RGB by the same
rule as files (dataset.images.to_rgb)."""
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image, ImageFile

import utils
from albef import ALBEFInference
from dataset import create_dataset
from dataset import images as images_module
from dataset.faults import BadSamplePolicy
from dataset.images import ImageLoadError, load_image, to_rgb
from dataset.pretrain_dataset import pretrain_dataset
from dataset.transforms import create_transform
from tests.tiny import tiny_config

TRANSFORM = create_transform('test', 16)


def photo(size=(48, 40), seed=0):
    """A noisy RGB image: its compressed bytes are spread over the whole file."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def truncated(path, fraction, image_format='JPEG'):
    buffer = io.BytesIO()
    photo().save(buffer, format=image_format)
    data = buffer.getvalue()
    path.write_bytes(data[:int(len(data) * fraction)])
    return path


# ----------------------------------------------------------------------------- truncated files

@pytest.mark.parametrize('fraction', [0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path, fraction):
    path = truncated(tmp_path / 'cut.jpg', fraction)
    with pytest.raises(ImageLoadError, match=r'cannot read image .*cut\.jpg'):
        load_image(str(path))


def test_truncated_png_is_an_error_naming_the_file(tmp_path):
    path = truncated(tmp_path / 'cut.png', 0.5, 'PNG')
    with pytest.raises(ImageLoadError, match=r'cut\.png.*truncated'):
        load_image(str(path))


def test_importing_the_project_leaves_pil_settings_alone():
    import albef  # noqa: F401 - everything that reads images is imported
    import dataset  # noqa: F401
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's decompression-bomb check still on


def test_a_process_that_tolerates_truncation_itself_is_warned(tmp_path, monkeypatch, caplog):
    path = truncated(tmp_path / 'cut.jpg', 0.5)
    monkeypatch.setattr(ImageFile, 'LOAD_TRUNCATED_IMAGES', True)  # as another library might
    monkeypatch.setattr(images_module, '_warned_truncation_tolerated', False)
    with caplog.at_level(logging.WARNING, logger='dataset.images'):
        assert load_image(str(path)).size == (48, 40)  # that process's choice: grey-filled
        load_image(str(path))
    assert caplog.text.count('LOAD_TRUNCATED_IMAGES is True') == 1


def test_huge_jpeg_beyond_pils_bomb_limit_still_decodes_at_reduced_scale(tmp_path, monkeypatch):
    # PIL refuses such files at open time; the pixel budget decides instead (JPEG: draft mode)
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 40_000)  # PIL refuses above 80,000 pixels
    monkeypatch.setattr(images_module, 'MAX_PIXELS', 100_000)
    photo((640, 480)).save(tmp_path / 'big.jpg')
    assert load_image(str(tmp_path / 'big.jpg')).size == (320, 240)
    photo((640, 480)).save(tmp_path / 'big.png')
    with pytest.raises(ImageLoadError, match=r'big\.png is too large'):
        load_image(str(tmp_path / 'big.png'))


def _records(tmp_path, names):
    path = tmp_path / 'ann.json'
    path.write_text(json.dumps([{'image': name, 'caption': f'picture {i}'}
                                for i, name in enumerate(names)]))
    return str(path)


def test_truncated_training_image_follows_the_bad_sample_policy(tmp_path):
    photo().save(tmp_path / 'good.jpg')
    truncated(tmp_path / 'cut.jpg', 0.5)
    ann = _records(tmp_path, ['cut.jpg', 'good.jpg'])
    failing = BadSamplePolicy(pretrain_dataset([ann], TRANSFORM, image_root=str(tmp_path)), 'fail')
    with pytest.raises(ImageLoadError, match=r'record 0 .*cut\.jpg.*on_bad_sample: skip'):
        failing[0]
    skipping = BadSamplePolicy(pretrain_dataset([ann], TRANSFORM, image_root=str(tmp_path)), 'skip')
    assert skipping[0][1] == 'picture 1' and skipping.skipped() == 1


def test_truncated_evaluation_image_stops_the_evaluation(tmp_path):
    from dataset.synthetic import generate
    generate(tmp_path, seed=0, size='tiny', image_size=16)
    config = utils.with_defaults(tiny_config('VE.yaml', tmp_path, tmp_path / 'c.yaml',
                                             on_bad_sample='skip'), 've')
    _, _, test = create_dataset('ve', config)
    name = test.ann[0]['image']  # VE records name the image without its .jpg
    image = tmp_path / f'{name}.jpg'
    image.write_bytes(image.read_bytes()[:len(image.read_bytes()) // 2])
    with pytest.raises(ImageLoadError, match=f'{name}.jpg'):
        test[0]


# ----------------------------------------------------------------------------- bit depths and inputs

def sixteen_bit_png(path, value=40000, size=(9, 7)):
    array = np.full((size[1], size[0]), value, dtype=np.uint16)
    array[0, 0] = 1000
    Image.fromarray(array).save(path)
    return path, array


@pytest.mark.parametrize('mode', ['I;16', 'I'])
def test_16_bit_pil_image_converts_as_its_file(tmp_path, mode):
    path, _ = sixteen_bit_png(tmp_path / 'deep.png')
    from_file = np.asarray(load_image(str(path)))
    assert from_file.max() == round(40000 / 257)  # not clipped to white
    with Image.open(path) as image:
        opened = image if image.mode == mode else image.convert(mode)
        assert np.array_equal(np.asarray(ALBEFInference.to_pil(opened)), from_file)


def test_arrays_convert_as_files_or_are_refused_clearly(tmp_path):
    path, array = sixteen_bit_png(tmp_path / 'deep.png')
    from_file = np.asarray(load_image(str(path)))
    assert np.array_equal(np.asarray(ALBEFInference.to_pil(array)), from_file)
    colour = np.stack([array, array // 2, array // 4], axis=-1)  # (H, W, 3) uint16
    assert np.array_equal(np.asarray(ALBEFInference.to_pil(colour)),
                          np.round(colour / 257).astype(np.uint8))
    grey = np.full((7, 9, 1), 77, dtype=np.uint8)
    assert np.asarray(ALBEFInference.to_pil(grey)).tolist() == np.full((7, 9, 3), 77).tolist()
    for bad, message in ((np.zeros((7, 9, 3), np.float32), 'float32'),
                         (np.zeros((7, 9, 5), np.uint8), r'\(7, 9, 5\)')):
        with pytest.raises(TypeError, match=message):
            ALBEFInference.to_pil(bad)
    with pytest.raises(ValueError, match='empty'):
        ALBEFInference.to_pil(np.zeros((0, 9, 3), np.uint8))


def test_to_rgb_is_the_files_rule():
    grey = Image.fromarray(np.full((3, 4), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(grey)).tolist() == np.full((3, 4, 3), 255).tolist()
    palette = Image.new('P', (4, 3))
    palette.info['transparency'] = 0
    assert to_rgb(palette).mode == 'RGB'


def test_truncated_image_through_the_api_is_an_error_naming_it(tmp_path):
    path = truncated(tmp_path / 'cut.jpg', 0.5)
    with pytest.raises(ImageLoadError, match=r'cut\.jpg'):
        ALBEFInference.to_pil(str(path))
    opened = Image.open(io.BytesIO(path.read_bytes()))  # lazily decoded by PIL
    with pytest.raises(ImageLoadError, match=r'cannot read image given as a PIL image \(JPEG 48 x 40'):
        ALBEFInference.to_pil(opened)
