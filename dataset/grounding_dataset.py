"""RefCOCO+ referring expressions for weakly-supervised grounding (paper section 4.4).

Training records `{"image", "text"}` are trained like retrieval pairs, with the image as idx;
test records add `"ref_id"`, whose ground truth (box, split, image size) comes from the REFER
files read by `load_refer`.
"""
import os
import pickle
from dataclasses import dataclass

from torch.utils.data import Dataset

from dataset.faults import require_text
from dataset.images import load_image
from dataset.pretrain_dataset import check_fields, load_annotations, read_json
from dataset.utils import pre_caption

MODES = ('train', 'test')


def _record_checker(mode):
    def check(record, where):
        if mode == 'test':
            check_fields(record, where, image=str, text=str, ref_id=int)
        else:
            check_fields(record, where, image=str, text=str)
    return check


def _file_name(path):
    # NOTE(faithful): images are told apart by file name alone (the last '/'-separated part), as
    # in the original; COCO names are unique, so the folder never matters there.
    return path.split('/')[-1]


class grounding_dataset(Dataset):  # original class name kept
    """mode 'train': `__getitem__` -> (image, cleaned text, idx) where idx numbers the distinct
    image file names in order of first appearance (expressions of one image are positives of
    each other in ITC); mode 'test': -> (image, cleaned text, ref_id)."""

    def __init__(self, ann_files, transform, image_root, max_words=30, mode='train',
                 on_bad_sample='fail'):
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        self.mode = mode
        self.ann = load_annotations(ann_files, _record_checker(mode), on_bad_sample)
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.img_ids = {}
        if mode == 'train':
            for ann in self.ann:
                self.img_ids.setdefault(_file_name(ann['image']), len(self.img_ids))

    def __len__(self):
        return len(self.ann)

    def inputs(self, ann):
        """(image files, cleaned expression) that `__getitem__` reads for `ann`."""
        text = require_text(pre_caption(ann['text'], self.max_words), ann['text'], 'text')
        return (os.path.join(self.image_root, ann['image']),), text

    def __getitem__(self, index):
        ann = self.ann[index]
        (path,), text = self.inputs(ann)
        image = self.transform(load_image(path))
        if self.mode == 'test':
            return image, text, ann['ref_id']
        return image, text, self.img_ids[_file_name(ann['image'])]


# ----------------------------------------------------------------------------- REFER files

@dataclass
class Refer:
    """The part of the REFER API that grounding evaluation reads, under the same names.

    Refs: ref_id -> ref record ('split', 'image_id', 'ann_id', 'sentences', ...);
    refToAnn: ref_id -> its COCO annotation ('bbox' [x, y, w, h] in pixels, ...);
    Imgs: image_id -> COCO image record ('width', 'height', 'file_name').
    """
    Refs: dict
    refToAnn: dict
    Imgs: dict
    refs_file: str = ''  # where Refs were read, for messages

    def ref_ids(self, split=None):
        """Every ref_id, or those of one split ('train', 'val', 'testA', 'testB'), in file order."""
        return [ref_id for ref_id, ref in self.Refs.items() if split is None or ref['split'] == split]


class _PlainUnpickler(pickle.Unpickler):
    """Refs are lists of dicts of plain values; refusing every class keeps a tampered pickle from
    running code (pickle.load would import and call whatever the file names)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f'refusing to load {module}.{name}: REFER refs hold plain values only')


def _load_refs(path):
    try:
        with open(path, 'rb') as f:
            # The released refs were pickled by Python 2: its byte strings are read as text.
            return _PlainUnpickler(f, encoding='utf-8').load()
    except FileNotFoundError as error:
        raise FileNotFoundError(f'REFER refs file not found: {path}') from error
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f'cannot read REFER refs file {path}: {error}') from error


def _check_box(record, where):
    box = record['bbox']
    if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise ValueError(f'{where}: "bbox" must be 4 numbers [x, y, w, h], got {box!r}')


def load_refer(refcoco_data_dir, dataset='refcoco+', split_by='unc'):
    """Read `<dir>/<dataset>/refs(<split_by>).p` and `<dir>/<dataset>/instances.json` into a Refer.

    Every ref must point at an annotation and an image of instances.json; errors name the file
    and record index.
    """
    folder = os.path.join(refcoco_data_dir, dataset)
    refs_path = os.path.join(folder, f'refs({split_by}).p')
    instances_path = os.path.join(folder, 'instances.json')
    refs = _load_refs(refs_path)
    if not isinstance(refs, list):
        raise ValueError(f'REFER refs file {refs_path} must hold a list, got {type(refs).__name__}')
    instances = read_json(instances_path, 'REFER instances file')
    check_fields(instances, instances_path, images=list, annotations=list)

    images, anns = {}, {}
    for index, image in enumerate(instances['images']):
        check_fields(image, f'{instances_path}, images[{index}]', id=int, width=int, height=int)
        images[image['id']] = image
    for index, ann in enumerate(instances['annotations']):
        where = f'{instances_path}, annotations[{index}]'
        check_fields(ann, where, id=int, image_id=int, bbox=list)
        _check_box(ann, where)
        anns[ann['id']] = ann

    ref_by_id, ref_to_ann = {}, {}
    for index, ref in enumerate(refs):
        where = f'{refs_path}, record {index}'
        check_fields(ref, where, ref_id=int, ann_id=int, image_id=int, split=str)
        if ref['ann_id'] not in anns:
            raise ValueError(f'{where}: ann_id {ref["ann_id"]} is not in {instances_path}')
        if ref['image_id'] not in images:
            raise ValueError(f'{where}: image_id {ref["image_id"]} is not in {instances_path}')
        if ref['ref_id'] in ref_by_id:
            raise ValueError(f'{where}: duplicate ref_id {ref["ref_id"]}')
        ref_by_id[ref['ref_id']] = ref
        ref_to_ann[ref['ref_id']] = anns[ref['ann_id']]
    return Refer(Refs=ref_by_id, refToAnn=ref_to_ann, Imgs=images, refs_file=refs_path)


def load_dets(path):
    """The detection proposals of `path` (the config's det_file): a JSON object mapping an image
    id (as a string) to its boxes [x, y, w, h, ...]. The boxes of the test images are checked by
    grounding_eval.check_inputs."""
    dets = read_json(path, 'det_file')
    if not isinstance(dets, dict):
        raise ValueError(f'det_file {path} must hold a JSON object (image id -> boxes), '
                         f'got {type(dets).__name__}')
    return dets
