"""Image loading shared by every dataset (spec section 4: PIL, RGB, truncated images tolerated)."""
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# NOTE(faithful): the original sets this process-wide so that a truncated JPEG in a web-scale
# corpus is decoded as far as possible (the rest grey) instead of killing a training run.
ImageFile.LOAD_TRUNCATED_IMAGES = True

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
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except FileNotFoundError as error:
        raise ImageLoadError(f'image file not found: {path}') from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ImageLoadError(f'cannot read image {path}: {error}') from error
