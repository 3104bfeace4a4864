"""Image loading shared by every dataset and the inference API (PIL, RGB, damaged files named)."""
import logging
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin

logger = logging.getLogger(__name__)

# NOTE(fixed): the original set PIL's process-wide ImageFile.LOAD_TRUNCATED_IMAGES = True, so a
# truncated file decoded with grey where its bytes were missing and trained or evaluated as if it
# were whole. PIL's default (False) is kept: truncation is an ImageLoadError naming the file, which
# the on_bad_sample policy skips or reports. PIL's own decompression-bomb check stays on too
# (Image.MAX_IMAGE_PIXELS); a JPEG it refuses is reopened here and decoded at reduced scale.

# Decoded pixels allowed per image (PIL's own bomb limit is 89.5M with an error beyond twice that).
# Larger JPEGs are decoded at a reduced scale (draft mode) to fit; other formats are refused.
MAX_PIXELS = 2 * 89_478_485

_HIGH_BIT_DEPTH_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F')  # 1-channel, >8-bit
_warned_truncation_tolerated = False


class ImageLoadError(OSError):
    """An image file is missing or cannot be decoded; the message names the file."""


def sixteen_to_eight_bits(array):
    """Integer pixel values read as 16-bit (0..65535) scaled to uint8 0..255."""
    return (np.asarray(array, dtype=np.float64) / 257.0).clip(0, 255).round().astype(np.uint8)


def to_rgb(image):
    """A PIL image of any mode as RGB, as every dataset reads its files (the inference API
    converts the PIL images it is given the same way)."""
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        # NOTE(fixed): PIL's convert('RGB') clips 16/32-bit values at 255 (a nearly white image).
        # Integer images are read as 16-bit (divided by 257), float images are stretched from
        # their own min..max. ALBEF's corpora are 8-bit JPEGs, where this path is never taken.
        if image.mode == 'F':
            array = np.asarray(image, dtype=np.float64)
            low, high = float(array.min()), float(array.max())
            array = (array - low) * (255.0 / (high - low) if high > low else 0.0)
            image = Image.fromarray(array.clip(0, 255).round().astype(np.uint8))
        else:
            image = Image.fromarray(sixteen_to_eight_bits(image))
    elif image.mode == 'P' and 'transparency' in image.info:
        # Going through RGBA avoids PIL's palette-transparency warning; the RGB values are the same.
        image = image.convert('RGBA')
    # RGBA/LA: the alpha channel is dropped, as in the original (no compositing on a background).
    return image.convert('RGB')


def load_image(path, exif_transpose=False):
    """Open `path` as an RGB `PIL.Image` (fully decoded, file closed).

    `exif_transpose=True` applies the EXIF orientation tag. NOTE(faithful): off by default
    because the original ignores it and COCO/RefCOCO boxes are given in stored-pixel
    orientation; rotating such an image would move its objects away from their boxes.
    """
    with decode_errors(path):
        with _open(path) as image:
            _fit_pixel_budget(image, path)
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)


@contextmanager
def decode_errors(name):
    """Whatever a decoder raises inside the block, as one ImageLoadError naming `name` (a path,
    or a description of an in-memory image)."""
    _warn_if_truncation_tolerated()
    try:
        yield
    except ImageLoadError:
        raise
    except FileNotFoundError as error:
        raise ImageLoadError(f'image file not found: {name}') from error
    except Exception as error:  # noqa: BLE001 - decoders raise anything on corrupt bytes
        # PIL reports corrupt or truncated data as OSError, SyntaxError, ValueError, zlib.error,
        # struct.error, IndexError, ...: one clear error naming the image for all.
        raise ImageLoadError(f'cannot read image {name}: {type(error).__name__}: {error}') from error


def _warn_if_truncation_tolerated():
    """Truncation is only detectable with PIL's default; say so once if the process changed it."""
    global _warned_truncation_tolerated
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncation_tolerated:
        _warned_truncation_tolerated = True
        logger.warning('PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process (set by your '
                       'code or a library): truncated images decode with grey where bytes are '
                       'missing instead of raising ImageLoadError')


def _open(path):
    """Image.open, except that a JPEG above PIL's bomb limit is opened anyway (undecoded) so that
    _fit_pixel_budget can decode it at reduced scale."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as error:
        with open(path, 'rb') as f:
            is_jpeg = f.read(3) == b'\xff\xd8\xff'
        if not is_jpeg:
            raise ImageLoadError(f'image {path} is too large: {error}') from error
        return JpegImagePlugin.JpegImageFile(path)  # the plugin itself does not check the size


def _fit_pixel_budget(image, path):
    width, height = image.size
    if width * height <= MAX_PIXELS:
        return
    if image.format == 'JPEG':
        # NOTE(fixed): the original decoded any size (or hit PIL's bomb error); a JPEG above the
        # budget is decoded at 1/2, 1/4 or 1/8 scale, which the resize to image_res hides.
        reduction = 2
        while reduction < 8 and (width / reduction) * (height / reduction) > MAX_PIXELS:
            reduction *= 2
        image.draft('RGB', (-(-width // reduction), -(-height // reduction)))
        if image.size[0] * image.size[1] <= MAX_PIXELS:
            return
    raise ImageLoadError(f'image {path} is too large: {width} x {height} pixels, more than '
                         f'MAX_PIXELS = {MAX_PIXELS}')
