"""Reference levels a task metric must beat to show that a model used the image: the chance
level (a uniformly random choice) and, where the text alone carries information, the best
text-only predictor estimated on the training split. All from the annotation files, in the
units the task scripts report (accuracies in [0, 1], recalls in percent)."""
import collections
import math

from dataset.grounding_eval import SPLIT_KEYS, compute_iou
from dataset.utils import pre_caption, pre_question
from dataset.vqa_eval import answer_accuracy, normalize_answer


def retrieval_chance(img2txt, num_texts):
    """Expected recalls (percent, itm_eval's keys) of a uniformly random ranking.

    img2txt: for every image, the ids of its captions (each caption belongs to one image), as a
    list or as a dict keyed by image index.
    """
    if isinstance(img2txt, dict):
        img2txt = list(img2txt.values())
    def hit_any(relevant, k):  # P(at least one of `relevant` items in a random top-k)
        k = min(k, num_texts)
        return 1 - math.comb(num_texts - relevant, k) / math.comb(num_texts, k)

    num_images = len(img2txt)
    result = {}
    for k in (1, 5, 10):
        result[f'txt_r{k}'] = 100 * sum(hit_any(len(t), k) for t in img2txt) / num_images
        result[f'img_r{k}'] = 100 * min(k, num_images) / num_images
    for side in ('txt', 'img'):
        result[f'{side}_r_mean'] = sum(result[f'{side}_r{k}'] for k in (1, 5, 10)) / 3
    result['r_mean'] = (result['txt_r_mean'] + result['img_r_mean']) / 2
    return result


def _humans(ann):
    return ann['answer'] if isinstance(ann['answer'], list) else [ann['answer']]


def by_group(records, values, group):
    """{group name: {'n': count, 'mean': mean of `values`}} over `records` (parallel to
    `values`), grouped by `group(record)`, in order of first appearance."""
    sums, counts = {}, collections.Counter()
    for record, value in zip(records, values, strict=True):
        name = group(record)
        sums[name] = sums.get(name, 0.0) + value
        counts[name] += 1
    return {name: {'n': counts[name], 'mean': sums[name] / counts[name]} for name in sums}


def _levels(records, scores, group):
    """{'chance', 'text_only'...} means of per-record `scores` ({level: [score per record]}),
    with 'groups' {name: {'n', level: mean}} when `group` is given."""
    result = {level: sum(values) / len(values) for level, values in scores.items()}
    if group is not None:
        per_level = {level: by_group(records, values, group) for level, values in scores.items()}
        result['groups'] = {name: {'n': entry['n'],
                                   **{level: per_level[level][name]['mean'] for level in scores}}
                            for name, entry in next(iter(per_level.values())).items()}
    return result


def vqa_baselines(train_ann, eval_ann, answer_list, group=None):
    """{'chance', 'text_only'} VQA accuracies on `eval_ann` (records with human answers).

    chance: the expected accuracy of an answer drawn uniformly from `answer_list`.
    text_only: for each question, the training answer most often given to the same (cleaned)
    question, falling back to the most frequent training answer for unseen questions.
    With `group` (record -> name, e.g. a question type) also 'groups': {name: {'n', 'chance',
    'text_only'}}.
    """
    by_question = collections.defaultdict(collections.Counter)
    overall = collections.Counter()
    for ann in train_ann:
        answers = [normalize_answer(a) for a in _humans(ann)]
        by_question[pre_question(ann['question'])].update(answers)
        overall.update(answers)
    fallback = overall.most_common(1)[0][0]
    scores = {'chance': [], 'text_only': []}
    for ann in eval_ann:
        humans = _humans(ann)
        scores['chance'].append(sum(answer_accuracy(a, humans) for a in answer_list) / len(answer_list))
        prior = by_question.get(pre_question(ann['question']))
        scores['text_only'].append(answer_accuracy(prior.most_common(1)[0][0] if prior else fallback,
                                                   humans))
    return _levels(eval_ann, scores, group)


def classification_baselines(train_ann, eval_ann, text_key='sentence', label_key='label',
                             group=None):
    """{'chance', 'majority', 'text_only'} accuracies on `eval_ann` (NLVR2, SNLI-VE).

    chance: uniform over the labels seen in training; majority: the most frequent training label;
    text_only: the training label most often paired with the same (cleaned) sentence, falling
    back to the majority label. With `group` (record -> name, e.g. a statement kind) also
    'groups': {name: {'n', 'chance', 'majority', 'text_only'}}.
    """
    overall = collections.Counter(ann[label_key] for ann in train_ann)
    by_text = collections.defaultdict(collections.Counter)
    for ann in train_ann:
        by_text[pre_caption(ann[text_key], 10 ** 6)][ann[label_key]] += 1
    majority = overall.most_common(1)[0][0]

    def text_label(ann):
        seen = by_text.get(pre_caption(ann[text_key], 10 ** 6))
        return seen.most_common(1)[0][0] if seen else majority

    scores = {'chance': [1 / len(overall)] * len(eval_ann),
              'majority': [float(ann[label_key] == majority) for ann in eval_ann],
              'text_only': [float(ann[label_key] == text_label(ann)) for ann in eval_ann]}
    result = _levels(eval_ann, scores, group)
    result['chance'] = 1 / len(overall)  # exact, not a mean of equal terms
    return result


def grounding_chance(refer, dets):
    """Expected accuracy per split ({'val_d', ...}) of picking one detection at random:
    for each expression, the fraction of its image's boxes with IoU >= 0.5 to the answer."""
    hits = collections.defaultdict(float)
    total = collections.Counter()
    for ref_id, ref in refer.Refs.items():
        if ref['split'] not in SPLIT_KEYS:
            continue
        boxes = dets[str(ref['image_id'])]
        answer = refer.refToAnn[ref_id]['bbox']
        good = sum(compute_iou(answer, box[:4]) >= 0.5 for box in boxes)
        # NOTE(faithful): grounding_eval scores each ref once (its last expression's map).
        hits[ref['split']] += good / len(boxes)
        total[ref['split']] += 1
    return {key: hits[split] / total[split] if total[split] else float('nan')
            for split, key in SPLIT_KEYS.items()}
