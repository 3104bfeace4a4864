"""Weakly-supervised referring-expression grounding accuracy (paper section 4.4).

A Grad-CAM map (models/gradcam.py) is upsampled to the image size; every detector box is scored
by the map mass inside it divided by (box area)^alpha; the best box is correct when its IoU with
the annotated box is at least 0.5. Accuracy is reported per RefCOCO+ split (val, testA, testB).
"""
import collections
import logging
import numbers

import torch

from dataset.faults import describe_record
from dataset.pretrain_dataset import file_names
from models.gradcam import upsample

logger = logging.getLogger(__name__)

SPLIT_KEYS = {'val': 'val_d', 'testA': 'testA_d', 'testB': 'testB_d'}


def _is_box(box):
    return (isinstance(box, (list, tuple)) and len(box) >= 4 and
            all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in box[:4]))


def check_inputs(dataset, refer, dets, *, test_file, det_file):
    """Check, before any training, that `grounding_eval` can score every expression of
    `dataset` (the test set of the config's `test_file`): its ref_id is in the REFER refs and
    its image has an entry in `dets` (read from `det_file`) whose boxes are [x, y, w, h, ...]
    numbers. Errors name the record and the files. Returns the number of expressions per
    REFER split (a Counter)."""
    names = file_names(test_file)
    refs_file = getattr(refer, 'refs_file', '') or 'the REFER refs'
    splits, checked = collections.Counter(), set()
    for index, ann in enumerate(dataset.ann):
        ref_id = ann['ref_id']
        where = f'test_file {names}: {describe_record(dataset, index)}'
        if ref_id not in refer.Refs:
            raise ValueError(f'{where}: ref_id {ref_id} is not in {refs_file}')
        ref = refer.Refs[ref_id]
        splits[ref['split']] += 1
        image_id = str(ref['image_id'])
        if image_id in checked:
            continue
        if image_id not in dets:
            raise ValueError(f'{where}: its image (image_id {image_id}) has no detection proposals '
                             f'in det_file {det_file}')
        boxes = dets[image_id]
        if not isinstance(boxes, list) or not all(_is_box(box) for box in boxes):
            raise ValueError(f'det_file {det_file}: image_id {image_id} (ref_id {ref_id}): expected a '
                             f'list of boxes [x, y, w, h, ...], got {boxes!r:.200}')
        checked.add(image_id)
    unscored = {split: n for split, n in splits.items() if split not in SPLIT_KEYS}
    if unscored:
        # NOTE(faithful): grounding_eval counts the val, testA and testB expressions only.
        logger.warning('test_file %s: expressions of REFER splits %s are not scored', names, unscored)
    return splits


def upsample_map(cam, height, width):
    """A (h, w) map resized bicubically (align_corners False) to (height, width)."""
    return upsample(cam, (int(height), int(width)))


def box_scores(mask, boxes, alpha=0.5):
    """Score of every [x, y, w, h] box: the mask summed over rows int(y)..int(y+h)-1 and
    columns int(x)..int(x+w)-1, divided by (w*h)^alpha (in the mask's dtype)."""
    scores = []
    for x, y, w, h in (box[:4] for box in boxes):
        inside = mask[int(y):int(y + h), int(x):int(x + w)]
        scores.append(float(inside.sum() / (w * h) ** alpha))
    return scores


def best_box(scores):
    """Index of the first strictly highest score above 0, or None when none is positive.

    Bicubic overshoot can make scores negative, so a map may select nothing."""
    best, best_score = None, 0
    for i, score in enumerate(scores):
        if score > best_score:
            best, best_score = i, score
    return best


def compute_iou(box1, box2):
    """IoU of two [x, y, w, h] boxes with the original's inclusive-pixel convention: the
    intersection spans x1..x2 with x2 = x+w-1 and counts only when x1 < x2 and y1 < y2."""
    inter_x1 = max(box1[0], box2[0])
    inter_y1 = max(box1[1], box2[1])
    inter_x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    inter_y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    if inter_x1 < inter_x2 and inter_y1 < inter_y2:
        inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1)
    else:
        inter = 0
    union = box1[2] * box1[3] + box2[2] * box2[3] - inter
    return float(inter) / union


def grounding_eval(results, dets, refer, alpha=0.5):
    """{'val_d', 'testA_d', 'testB_d'}: the fraction of expressions grounded with IoU >= 0.5.

    results: [{'ref_id', 'pred': (h, w) map}]; dets: image id (str) -> boxes [x, y, w, h, ...];
    refer: the REFER API (or anything with its `Refs`, `refToAnn` and `Imgs` mappings).
    """
    correct = dict.fromkeys(SPLIT_KEYS, 0)
    total = dict.fromkeys(SPLIT_KEYS, 0)
    pred_box = None
    for res in results:
        ref = refer.Refs[res['ref_id']]
        image = refer.Imgs[ref['image_id']]
        boxes = dets[str(ref['image_id'])]
        mask = upsample_map(torch.as_tensor(res['pred']), image['height'], image['width'])
        chosen = best_box(box_scores(mask, boxes, alpha))
        # NOTE(faithful): when no box scores above 0 the previous expression's box is reused.
        if chosen is not None:
            pred_box = boxes[chosen][:4]
        # NOTE(fixed): the original crashed (unbound pred_box) if that happened first; a miss.
        ref_box = refer.refToAnn[res['ref_id']]['bbox']
        iou = compute_iou(ref_box, pred_box) if pred_box is not None else 0.0
        split = ref['split']
        if split in total:
            total[split] += 1
            correct[split] += iou >= 0.5
    # NOTE(fixed): a split without expressions reads nan (the original divided by zero).
    return {key: correct[split] / total[split] if total[split] else float('nan')
            for split, key in SPLIT_KEYS.items()}
