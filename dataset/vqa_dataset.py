"""VQA v2 (+ Visual Genome QA) questions for answer generation (paper section 4.2).

Records: `{"question_id", "question", "answer": [10 answers], "image", "dataset": "vqa"}` with the
image under `vqa_root` (question_id: an int as in VQA v2, or a string), or
`{"question", "answer": str, "image", "dataset": "vg"}` under `vg_root`.
Test records carry no answer; predictions are ranked over the strings of `answer_list`.
"""
import os

import torch
from torch.utils.data import Dataset

from dataset.faults import require_text
from dataset.images import load_image
from dataset.pretrain_dataset import check_fields, load_annotations, load_json_list
from dataset.utils import pre_question

SPLITS = ('train', 'test')
SOURCES = ('vqa', 'vg')
# NOTE(faithful): the training question keeps 30 words; at test time up to 50 are kept.
MAX_QUESTION_WORDS = {'train': 30, 'test': 50}
VG_ANSWER_WEIGHT = 0.5  # Visual Genome has one answer per question: trusted half as much


def _check_human_answers(record, where):
    # Answers of a question that is answered and scored locally (a val_file): vqa_accuracy needs
    # at least one for every question.
    answer = record['answer']
    answers = answer if isinstance(answer, list) else [answer]
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError(f'{where}: "answer" must be a non-blank string or a non-empty list of them')


def _record_checker(split):
    first_record = {}  # test split: question_id -> where it was first seen

    def check(record, where):
        check_fields(record, where, image=str, question=str, dataset=str)
        if record['dataset'] not in SOURCES:
            raise ValueError(f'{where}: "dataset" must be one of {SOURCES}, got {record["dataset"]!r}')
        if split == 'test':
            # The ids are the records' own (int in VQA v2, any string in a user's data) and come
            # back unchanged in the result files.
            check_fields(record, where, question_id=(int, str))
            if 'answer' in record:
                _check_human_answers(record, where)
            # NOTE(fixed): the results are merged by question_id (one answer each, VQA.py), which
            # would drop one of two questions sharing an id; the original wrote both under it.
            question_id = record['question_id']
            if question_id in first_record:
                raise ValueError(f'{where}: question_id {question_id!r} repeats that of '
                                 f'{first_record[question_id]}; test question ids must be unique')
            first_record[question_id] = where
        elif record['dataset'] == 'vg':
            check_fields(record, where, answer=str)
        else:
            check_fields(record, where, answer=list)
            if not record['answer'] or not all(isinstance(a, str) and a.strip() for a in record['answer']):
                raise ValueError(f'{where}: "answer" must be a non-empty list of non-blank strings')
    return check


def answer_weights(ann):
    """(distinct answers in order of first appearance, their weights) for one training record.

    VQA: each distinct answer weighs its share of the annotators' answers; VG: its one answer
    weighs VG_ANSWER_WEIGHT.
    """
    if ann['dataset'] == 'vg':
        return [ann['answer']], [VG_ANSWER_WEIGHT]
    weights = {}
    share = 1 / len(ann['answer'])
    for answer in ann['answer']:
        # NOTE(faithful): shares are summed one by one (0.1 + 0.1 + 0.1 = 0.30000000000000004),
        # not counted and divided, so the float64 weights are the original's bit for bit.
        weights[answer] = weights.get(answer, 0) + share
    return list(weights), list(weights.values())


def load_answer_list(path):
    """The candidate answers of `path`: a non-empty JSON list of strings."""
    if not path:
        raise ValueError('the VQA test split needs answer_list (a JSON list of answer strings)')
    answers = load_json_list(path)
    if not answers:
        raise ValueError(f'answer_list {path} holds no answers')
    for index, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise ValueError(f'answer_list {path}, entry {index}: expected a string, '
                             f'got {type(answer).__name__} {answer!r}')
    return answers


class vqa_dataset(Dataset):  # original class name kept
    """split 'train': `__getitem__` -> (image, question, answers + eos, weights as floats);
    split 'test': -> (image, question, question_id), and `.answer_list` holds the candidates.
    Batch test items with vqa_test_collate_fn (question ids int or str, kept as given).
    """

    def __init__(self, ann_files, transform, vqa_root, vg_root, eos='[SEP]', split='train',
                 answer_list='', on_bad_sample='fail'):
        if split not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
        self.split = split
        self.ann = load_annotations(ann_files, _record_checker(split), on_bad_sample)
        self.transform = transform
        self.roots = {'vqa': vqa_root, 'vg': vg_root}
        self.eos = eos
        self.max_ques_words = MAX_QUESTION_WORDS[split]
        if split == 'test':
            self.answer_list = load_answer_list(answer_list)

    def __len__(self):
        return len(self.ann)

    def inputs(self, ann):
        """(image files, cleaned question) that `__getitem__` reads for `ann`."""
        question = require_text(pre_question(ann['question'], self.max_ques_words), ann['question'],
                                'question')
        return (os.path.join(self.roots[ann['dataset']], ann['image']),), question

    def __getitem__(self, index):
        ann = self.ann[index]
        (path,), question = self.inputs(ann)
        image = self.transform(load_image(path))
        if self.split == 'test':
            return image, question, ann['question_id']
        answers, weights = answer_weights(ann)
        # The decoder learns to stop: eos is glued to the raw (uncleaned) answer, no space.
        return image, question, [answer + self.eos for answer in answers], weights


def vqa_collate_fn(batch):
    """Training batch -> (images (B, 3, H, W), questions [B], answers [sum n], weights float32
    (sum n,), n [B]) where n[i] is the number of distinct answers of question i, so that the model
    can repeat question i's states n[i] times against the flattened answers."""
    images, questions, answers, weights, n = [], [], [], [], []
    for image, question, item_answers, item_weights in batch:
        images.append(image)
        questions.append(question)
        answers += item_answers
        weights += item_weights
        n.append(len(item_answers))
    return torch.stack(images, dim=0), questions, answers, torch.tensor(weights, dtype=torch.float32), n


def vqa_test_collate_fn(batch):
    """Test batch -> (images (B, 3, H, W), questions [B], question ids [B]). The ids stay a list
    of the records' own values: the default collate would make int ids a tensor and cannot mix
    int and str ids."""
    images, questions, question_ids = zip(*batch)
    return torch.stack(images, dim=0), list(questions), list(question_ids)
