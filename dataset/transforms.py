"""Image transforms per task: CLIP normalisation, bicubic resizing, RandAugment."""
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from dataset.randaugment import ALBEF_AUGS, RandomAugment

# NOTE(faithful): CLIP's statistics, not ImageNet's, everywhere in ALBEF.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# RandomResizedCrop area range for each kind that crops.
_CROP_SCALE = {'pretrain': (0.2, 1.0), 'train': (0.5, 1.0)}
KINDS = ('pretrain', 'train', 'grounding_train', 'test')


def create_transform(kind, image_res, augment=None):
    """`kind`: 'pretrain', 'train' (retrieval, VQA, NLVR, VE), 'grounding_train' or 'test'.
    `augment` (the config's optional `augment` section) overrides the training augmentation:
    `crop_scale` [low, high] of RandomResizedCrop, `hflip` and `randaugment` on/off; absent keys
    keep the original recipe. Test transforms ignore it.

    Takes an RGB PIL image, returns a normalised float tensor (3, image_res, image_res).
    """
    if kind not in KINDS:
        raise ValueError(f'unknown transform kind {kind!r}; expected one of {KINDS}')
    augment = augment or {}
    bicubic = InterpolationMode.BICUBIC
    tail = [transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)]
    if kind == 'test':
        # Square resize: the aspect ratio is not kept.
        return transforms.Compose([transforms.Resize((image_res, image_res), interpolation=bicubic)]
                                  + tail)
    if kind == 'grounding_train':
        # NOTE(faithful): flipped although expressions may say "left"/"right"; no crop so the
        # referred object stays in the image.
        geometry = transforms.Resize((image_res, image_res), interpolation=bicubic)
    else:
        scale = tuple(augment.get('crop_scale', _CROP_SCALE[kind]))
        geometry = transforms.RandomResizedCrop(image_res, scale=scale, interpolation=bicubic)
    steps = [geometry]
    if augment.get('hflip', True):
        steps.append(transforms.RandomHorizontalFlip())
    if augment.get('randaugment', True):
        steps.append(RandomAugment(2, 7, isPIL=True, augs=ALBEF_AUGS))
    return transforms.Compose(steps + tail)
