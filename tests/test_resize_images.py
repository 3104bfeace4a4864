"""tools/resize_images.py on a small generated tree: sizes, formats, RGB, the kept tree and
names, corrupt files listed without stopping, small images not upscaled, resumption."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from dataset.images import load_image
from tools import resize_images


def noise(width, height, mode='RGB', seed=0):
    """Smooth random blobs (what JPEG compresses well, like a photo) of the given size and mode."""
    rng = np.random.default_rng(seed)
    channels = {'RGB': 3, 'RGBA': 4, 'L': 1}[mode]
    coarse = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), channels), dtype=np.uint8)
    image = Image.fromarray(coarse[..., 0] if channels == 1 else coarse, mode)
    return image.resize((width, height), Image.BILINEAR)


@pytest.fixture
def tree(tmp_path):
    """src/ with nested folders: big JPEGs (landscape and portrait), a grayscale JPEG, an RGBA
    PNG, a small JPEG, a corrupt JPEG, an EXIF-rotated JPEG and a non-image file."""
    src = tmp_path / 'src'
    (src / 'train2014').mkdir(parents=True)
    (src / 'vg' / 'VG_100K').mkdir(parents=True)
    noise(200, 100).save(src / 'train2014' / 'landscape.jpg', quality=90)
    noise(90, 180, seed=1).save(src / 'vg' / 'VG_100K' / 'portrait.JPEG', quality=90)
    noise(120, 160, 'L', seed=2).save(src / 'vg' / 'gray.jpg')
    noise(150, 120, 'RGBA', seed=3).save(src / 'vg' / 'VG_100K' / 'alpha.png')
    noise(40, 30, seed=4).save(src / 'small.jpg', quality=90)
    (src / 'train2014' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg' * 10)
    exif = Image.Exif()
    exif[resize_images.ORIENTATION] = 6
    noise(160, 120, seed=5).save(src / 'rotated.jpg', exif=exif)
    (src / 'README.txt').write_text('not an image')
    return src, tmp_path / 'dst'


def run(src, dst, *extra):
    return resize_images.main(['--src', str(src), '--dst', str(dst), '--size', '64',
                               '--print_every', '0', *extra])


def test_target_size():
    assert resize_images.target_size(640, 480, 384) == (512, 384)
    assert resize_images.target_size(480, 640, 384) == (384, 512)
    assert resize_images.target_size(300, 200, 384) == (300, 200)  # never upscaled
    assert resize_images.target_size(384, 1000, 384) == (384, 1000)


@pytest.mark.parametrize('workers', ['1', '2'])
def test_resize_tree(tree, workers, capsys):
    src, dst = tree
    assert run(src, dst, '--workers', workers) == 1  # one file could not be read
    out = capsys.readouterr().out
    assert '7 images' in out and '1 other files left out' in out
    assert 'done: 0 skipped, 5 resized, 1 copied, 0 converted, 1 failed' in out
    assert 'train2014/corrupt.jpg: ' in out  # listed at the end, with the reason
    failed = (dst / resize_images.FAILED_LIST).read_text().splitlines()
    assert len(failed) == 1 and failed[0].startswith('train2014/corrupt.jpg\t')

    # the same tree and file names (so the annotation JSONs stay valid), no partial files
    written = sorted(str(p.relative_to(dst)) for p in dst.rglob('*') if p.is_file())
    assert written == sorted([resize_images.MARKER, resize_images.FAILED_LIST,
                              'train2014/landscape.jpg', 'vg/VG_100K/portrait.JPEG',
                              'vg/gray.jpg', 'vg/VG_100K/alpha.png', 'small.jpg', 'rotated.jpg'])
    expected = {'train2014/landscape.jpg': ((128, 64), 'JPEG'),
                'vg/VG_100K/portrait.JPEG': ((64, 128), 'JPEG'),
                'vg/gray.jpg': ((64, 85), 'JPEG'),
                'vg/VG_100K/alpha.png': ((80, 64), 'PNG'),
                'small.jpg': ((40, 30), 'JPEG'),   # shorter side 30 < 64: not upscaled
                'rotated.jpg': ((85, 64), 'JPEG')}
    for rel, (size, fmt) in expected.items():
        with Image.open(dst / rel) as image:
            assert (image.size, image.format, image.mode) == (size, fmt, 'RGB'), rel
    # the small RGB JPEG is the same file; a resized image is the bicubic resize of the original
    # decoded as the datasets decode it (exactly for the lossless PNG, up to quality 95 for JPEG)
    assert (dst / 'small.jpg').read_bytes() == (src / 'small.jpg').read_bytes()
    png = load_image(src / 'vg' / 'VG_100K' / 'alpha.png').resize((80, 64), Image.BICUBIC)
    assert np.array_equal(np.asarray(load_image(dst / 'vg' / 'VG_100K' / 'alpha.png')),
                          np.asarray(png))
    original = load_image(src / 'train2014' / 'landscape.jpg').resize((128, 64), Image.BICUBIC)
    difference = np.abs(np.asarray(load_image(dst / 'train2014' / 'landscape.jpg'), dtype=float)
                        - np.asarray(original, dtype=float))
    assert difference.mean() < 2
    # the orientation tag is kept, the pixels stay in stored orientation (as the datasets read them)
    with Image.open(dst / 'rotated.jpg') as image:
        assert image.getexif().get(resize_images.ORIENTATION) == 6
    assert json.loads((dst / resize_images.MARKER).read_text()) == {'size': 64}


def test_second_run_skips_everything_done(tree, capsys):
    src, dst = tree
    assert run(src, dst, '--workers', '1') == 1
    stamps = {p: p.stat().st_mtime_ns for p in dst.rglob('*.jpg')}
    capsys.readouterr()
    assert run(src, dst, '--workers', '1') == 1  # the corrupt file is tried again, and fails again
    out = capsys.readouterr().out
    assert '6 already in' in out and '1 to do' in out
    assert 'done: 6 skipped, 0 resized, 0 copied, 0 converted, 1 failed' in out
    assert {p: p.stat().st_mtime_ns for p in dst.rglob('*.jpg')} == stamps  # nothing rewritten

    # once the bad file is gone (re-downloaded or removed), the run succeeds and the list goes
    os.remove(src / 'train2014' / 'corrupt.jpg')
    assert run(src, dst, '--workers', '1') == 0
    assert not (dst / resize_images.FAILED_LIST).exists()


def test_interrupted_output_is_redone(tree):
    """A file missing from --dst (e.g. the run was killed before it) is written by the next run;
    a leftover temporary file from the killed run is neither taken for an image nor kept."""
    src, dst = tree
    run(src, dst, '--workers', '1')
    os.remove(dst / 'vg' / 'gray.jpg')
    (dst / 'vg' / '.gray.jpg.part').write_bytes(b'partial')
    run(src, dst, '--workers', '1')
    with Image.open(dst / 'vg' / 'gray.jpg') as image:
        assert image.size == (64, 85)
    assert not (dst / 'vg' / '.gray.jpg.part').exists()


def test_refuses_another_size_or_dst_inside_src(tree):
    src, dst = tree
    run(src, dst, '--workers', '1')
    with pytest.raises(SystemExit, match='--size 64'):
        resize_images.main(['--src', str(src), '--dst', str(dst), '--size', '32'])
    with pytest.raises(SystemExit, match='inside'):
        resize_images.main(['--src', str(src), '--dst', str(src / 'resized'), '--size', '64'])
