"""ALBEF's RandAugment on numpy uint8 HxWx3 arrays.

Randomness comes from numpy's *global* RNG, in this order per call: the N op names (uniform,
with replacement), then per op one draw for "apply?" (skip if > 0.5) and, for an applied
geometric op, one draw for the sign of its magnitude (negative if > 0.5).
"""
import cv2
import numpy as np
from PIL import Image

MAX_LEVEL = 10
FILL = (128, 128, 128)  # grey for pixels uncovered by shear/translate/rotate
ALBEF_AUGS = ('Identity', 'AutoContrast', 'Equalize', 'Brightness', 'Sharpness',
              'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate')


def identity(img):
    return img


def _per_channel(img, channel_fn):
    return np.stack([channel_fn(img[..., c]) for c in range(img.shape[2])], axis=-1)


def _autocontrast_channel(channel):
    low, high = int(channel.min()), int(channel.max())
    if high <= low:
        return channel
    scale = 255.0 / (high - low)
    table = np.arange(256) * scale - low * scale
    return table.clip(0, 255).astype(np.uint8)[channel]


def autocontrast(img):
    """Stretch each channel's own min..max to 0..255 (no cut-off)."""
    return _per_channel(img, _autocontrast_channel)


def _equalize_channel(channel):
    # PIL's ImageOps.equalize: the step ignores the count of the last occupied grey level.
    hist = np.bincount(channel.ravel(), minlength=256)
    step = int(hist[hist != 0][:-1].sum()) // 255
    if step == 0:
        return channel
    shifted = np.concatenate([[step // 2], hist[:-1]])
    table = (np.cumsum(shifted) // step).clip(0, 255).astype(np.uint8)
    return table[channel]


def equalize(img):
    """PIL-style histogram equalisation, channel by channel."""
    return _per_channel(img, _equalize_channel)


def brightness(img, factor):
    table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    return table[img]


def sharpness(img, factor):
    """Blend with a 3x3 smoothed copy; the one-pixel border is left untouched (as PIL)."""
    if factor == 1.0:
        return img
    kernel = np.ones((3, 3), dtype=np.float32)
    kernel[1, 1] = 5
    kernel /= 13
    blurred = cv2.filter2D(img, -1, kernel)
    if factor == 0.0:
        return blurred
    out = img.astype(np.float32)
    inner = blurred.astype(np.float32)[1:-1, 1:-1]
    out[1:-1, 1:-1] = inner + factor * (out[1:-1, 1:-1] - inner)
    # NOTE(fixed): the original casts to uint8 without clipping, so values pushed past 0/255
    # by the extrapolation wrap around (platform-dependent); clip like PIL does.
    return out.clip(0, 255).astype(np.uint8)


def _warp(img, matrix):
    height, width = img.shape[:2]
    return cv2.warpAffine(img, np.float32(matrix), (width, height),
                          flags=cv2.INTER_LINEAR, borderValue=FILL)


def shear_x(img, factor):
    return _warp(img, [[1, factor, 0], [0, 1, 0]])


def shear_y(img, factor):
    return _warp(img, [[1, 0, 0], [factor, 1, 0]])


def translate_x(img, offset):
    return _warp(img, [[1, 0, -offset], [0, 1, 0]])


def translate_y(img, offset):
    return _warp(img, [[1, 0, 0], [0, 1, -offset]])


def rotate(img, degrees):
    """Counter-clockwise rotation about the image centre, same output size."""
    height, width = img.shape[:2]
    return _warp(img, cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1))


def _enhance_level(level):
    return (level / MAX_LEVEL) * 1.8 + 0.1


def _signed(magnitude):
    return -magnitude if np.random.random() > 0.5 else magnitude


# name -> (function, level -> magnitude or None for ops without one)
OPS = {
    'Identity': (identity, None),
    'AutoContrast': (autocontrast, None),
    'Equalize': (equalize, None),
    'Brightness': (brightness, _enhance_level),
    'Sharpness': (sharpness, _enhance_level),
    'ShearX': (shear_x, lambda level: _signed(level / MAX_LEVEL * 0.3)),
    'ShearY': (shear_y, lambda level: _signed(level / MAX_LEVEL * 0.3)),
    'TranslateX': (translate_x, lambda level: _signed(level / MAX_LEVEL * 10.0)),  # pixels
    'TranslateY': (translate_y, lambda level: _signed(level / MAX_LEVEL * 10.0)),
    'Rotate': (rotate, lambda level: _signed(level / MAX_LEVEL * 30.0)),  # degrees
}


class RandomAugment:
    """Apply `N` ops drawn from `augs`, each with probability 0.5, at magnitude level `M`.

    Input: uint8 HxWx3 array (or a PIL image when `isPIL`); output: uint8 HxWx3 array, which
    `ToTensor` then scales to [0, 1].
    """

    def __init__(self, N=2, M=7, isPIL=False, augs=ALBEF_AUGS):
        unknown = [name for name in augs if name not in OPS]
        if unknown:
            raise ValueError(f'unknown RandomAugment ops {unknown}; known: {sorted(OPS)}')
        self.N, self.M, self.isPIL = N, M, isPIL
        self.augs = list(augs) if augs else list(OPS)

    def __call__(self, img):
        if self.isPIL or isinstance(img, Image.Image):
            img = np.array(img)
        for name in np.random.choice(self.augs, self.N):
            if np.random.random() > 0.5:
                continue
            op, level_to_arg = OPS[name]
            img = op(img) if level_to_arg is None else op(img, level_to_arg(self.M))
        return img

    def __repr__(self):
        return f'{type(self).__name__}(N={self.N}, M={self.M}, augs={self.augs})'
