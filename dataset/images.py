"""Image loading shared by every dataset (PIL, RGB, truncated images tolerated, as the original)."""
import numpy as np
from PIL import Image, ImageFile, ImageOps

# NOTE(faithful): the original sets this process-wide so that a truncated JPEG in a web-scale
# corpus is decoded as far as possible (the rest grey) instead of killing a training run.
ImageFile.LOAD_TRUNCATED_IMAGES = True
# PIL's decompression-bomb check at open time is replaced by MAX_PIXELS below, which can decode a
# huge JPEG at reduced scale instead of refusing it.
Image.MAX_IMAGE_PIXELS = None

# Decoded pixels allowed per image (PIL's own bomb limit is 89.5M with an error beyond twice that).
# Larger JPEGs are decoded at a reduced scale (draft mode) to fit; other formats are refused.
MAX_PIXELS = 2 * 89_478_485

_HIGH_BIT_DEPTH_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F')  # 1-channel, >8-bit


class ImageLoadError(OSError):
    """An image file is missing or cannot be decoded; the message names the file."""


def _to_rgb(image):
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        # NOTE(fixed): PIL's convert('RGB') clips 16/32-bit values at 255 (a nearly white image).
        # Integer images are read as 16-bit (divided by 257), float images are stretched from
        # their own min..max. ALBEF's corpora are 8-bit JPEGs, where this path is never taken.
        array = np.asarray(image, dtype=np.float64)
        if image.mode == 'F':
            low, high = float(array.min()), float(array.max())
            array = (array - low) * (255.0 / (high - low) if high > low else 0.0)
        else:
            array = array / 257.0
        image = Image.fromarray(array.clip(0, 255).round().astype(np.uint8))
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
    try:
        with Image.open(path) as image:
            _fit_pixel_budget(image, path)
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except FileNotFoundError as error:
        raise ImageLoadError(f'image file not found: {path}') from error
    except ImageLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - decoders raise anything on corrupt bytes
        # PIL reports corrupt data as OSError, SyntaxError, ValueError, zlib.error, struct.error,
        # DecompressionBombError, IndexError, ...: one clear error naming the file for all.
        raise ImageLoadError(f'cannot read image {path}: {type(error).__name__}: {error}') from error


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
