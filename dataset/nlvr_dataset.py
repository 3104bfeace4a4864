"""NLVR2 image pairs with a true/false sentence (paper section 4.3).

Records: `{"images": [left, right], "sentence", "label": "True" | "False"}`, image paths relative
to `image_root`.
"""
import os

from torch.utils.data import Dataset

from dataset.faults import require_text
from dataset.images import load_image
from dataset.pretrain_dataset import check_fields, load_annotations
from dataset.utils import pre_caption

LABELS = {'True': 1, 'False': 0}


def _check_record(record, where):
    check_fields(record, where, images=list, sentence=str, label=str)
    images = record['images']
    if len(images) != 2 or not all(isinstance(p, str) and p for p in images):
        raise ValueError(f'{where}: "images" must be a list of two image paths')
    # NOTE(fixed): the original maps every label other than exactly 'True' to 0, so 'true' or a
    # JSON boolean silently became "False"; anything but the two strings is refused here.
    if record['label'] not in LABELS:
        raise ValueError(f'{where}: "label" must be "True" or "False", got {record["label"]!r}')


class nlvr_dataset(Dataset):  # original class name kept
    """`__getitem__` -> (left image, right image, cleaned sentence, label: 1 iff "True")."""

    def __init__(self, ann_files, transform, image_root, max_words=30, on_bad_sample='fail'):
        self.ann = load_annotations(ann_files, _check_record, on_bad_sample)
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words

    def __len__(self):
        return len(self.ann)

    def inputs(self, ann):
        """(image files, cleaned sentence) that `__getitem__` reads for `ann`."""
        sentence = require_text(pre_caption(ann['sentence'], self.max_words), ann['sentence'], 'sentence')
        return tuple(os.path.join(self.image_root, path) for path in ann['images']), sentence

    def __getitem__(self, index):
        ann = self.ann[index]
        paths, sentence = self.inputs(ann)
        # Each image is transformed on its own: independent crops, flips and augmentations.
        image0, image1 = (self.transform(load_image(path)) for path in paths)
        return image0, image1, sentence, LABELS[ann['label']]
