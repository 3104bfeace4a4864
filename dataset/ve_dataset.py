"""SNLI-VE image/hypothesis pairs (paper section 4.3).

Records: `{"image": id, "sentence", "label"}` where `image` is a Flickr30K id without extension:
the file is `<image_root>/<image>.jpg`.
"""
import os

from torch.utils.data import Dataset

from dataset.faults import require_text
from dataset.images import load_image
from dataset.pretrain_dataset import check_fields, load_annotations
from dataset.utils import pre_caption

# The classifier's output order; the released heads depend on it.
LABELS = {'entailment': 2, 'neutral': 1, 'contradiction': 0}


def _check_record(record, where):
    # SNLI-VE ids are strings; a bare integer id names the same file.
    check_fields(record, where, image=(str, int), sentence=str, label=str)
    if record['label'] not in LABELS:
        raise ValueError(f'{where}: "label" must be one of {sorted(LABELS)}, got {record["label"]!r}')


class ve_dataset(Dataset):  # original class name kept
    """`__getitem__` -> (image, cleaned sentence, label: entailment 2, neutral 1, contradiction 0)."""

    def __init__(self, ann_file, transform, image_root, max_words=30, on_bad_sample='fail'):
        self.ann = load_annotations(ann_file, _check_record, on_bad_sample)
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words

    def __len__(self):
        return len(self.ann)

    def inputs(self, ann):
        """(image files, cleaned sentence) that `__getitem__` reads for `ann`."""
        sentence = require_text(pre_caption(ann['sentence'], self.max_words), ann['sentence'], 'sentence')
        return (os.path.join(self.image_root, f'{ann["image"]}.jpg'),), sentence

    def __getitem__(self, index):
        ann = self.ann[index]
        (path,), sentence = self.inputs(ann)
        return self.transform(load_image(path)), sentence, LABELS[ann['label']]
