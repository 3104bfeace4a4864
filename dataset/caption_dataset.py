"""Image-text retrieval data: COCO / Flickr30K Karpathy splits (paper section 4.1).

Training files hold one record per caption, `{"image", "caption": str, "image_id"}`; evaluation
files hold one record per image, `{"image", "caption": [str, ...]}`. Image paths are relative to
`image_root`.
"""
import os

from torch.utils.data import Dataset

from dataset.faults import require_text
from dataset.images import load_image
from dataset.pretrain_dataset import check_fields, load_annotations
from dataset.utils import pre_caption


def _check_train_record(record, where):
    # image_id is any JSON scalar naming the image ('coco_391895', 391895, ...).
    check_fields(record, where, image=str, caption=str, image_id=(str, int))


def _check_eval_record(record, where):
    check_fields(record, where, image=str, caption=list)
    # The original iterates over "caption": a single string would silently become one "caption"
    # per character, hence the list type above and the items checked here.
    if not record['caption'] or not all(isinstance(c, str) and c.strip() for c in record['caption']):
        raise ValueError(f'{where}: "caption" must be a non-empty list of non-blank strings')
    # NOTE(fixed): the original ranked a caption that cleaning empties ("...") as an empty text;
    # training refuses such a caption (require_text), evaluation does here.
    for caption in record['caption']:
        if not pre_caption(caption):
            raise ValueError(f'{where}: caption {caption!r} is empty after cleaning')


class re_train_dataset(Dataset):  # original class name kept
    """`__getitem__` -> (image tensor, cleaned caption, idx).

    idx numbers the distinct `image_id`s 0, 1, ... in order of first appearance over all files;
    captions of the same image share it, which the retrieval ITC targets rely on.
    """

    def __init__(self, ann_files, transform, image_root, max_words=30, on_bad_sample='fail'):
        self.ann = load_annotations(ann_files, _check_train_record, on_bad_sample)
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.img_ids = {}
        for ann in self.ann:
            self.img_ids.setdefault(ann['image_id'], len(self.img_ids))

    def __len__(self):
        return len(self.ann)

    def __getitem__(self, index):
        ann = self.ann[index]
        image = self.transform(load_image(os.path.join(self.image_root, ann['image'])))
        caption = require_text(pre_caption(ann['caption'], self.max_words), ann['caption'])
        return image, caption, self.img_ids[ann['image_id']]


class re_eval_dataset(Dataset):  # original class name kept
    """`__getitem__` -> (image tensor, image index); the texts are encoded separately from `.text`.

    Attributes: `text` (every cleaned caption, numbered in file order), `image` (image paths as
    written in the file), `txt2img` (text id -> image index), `img2txt` (image index -> list of
    its text ids).
    """

    def __init__(self, ann_file, transform, image_root, max_words=30):
        self.ann = load_annotations(ann_file, _check_eval_record)
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.text, self.image, self.txt2img, self.img2txt = [], [], {}, {}
        for img_id, ann in enumerate(self.ann):
            self.image.append(ann['image'])
            self.img2txt[img_id] = []
            for caption in ann['caption']:
                txt_id = len(self.text)
                self.text.append(pre_caption(caption, max_words))
                self.txt2img[txt_id] = img_id
                self.img2txt[img_id].append(txt_id)

    def __len__(self):
        return len(self.ann)

    def inputs(self, ann):
        """(image files, None) that `__getitem__` reads for `ann` (the texts are in `.text`)."""
        return (os.path.join(self.image_root, ann['image']),), None

    def __getitem__(self, index):
        (path,), _ = self.inputs(self.ann[index])
        return self.transform(load_image(path)), index
