"""Build a VQA answer list (the candidates VQA.py ranks) from training annotations: the most
frequent answers, most frequent first.

    python -m tools.build_answer_list --train data/vqa_train.json data/vqa_val.json \
        --out data/answer_list.json --top 3128
    python -m tools.build_answer_list --train data/vqa_train.json --out answers.json --min_count 9

Every human answer counts once (a VQA question has ten, a Visual Genome question one). Ties
are broken by first appearance, so the output is deterministic. With --normalize the answers
are first put in the VQA evaluation's normal form (dataset/vqa_eval.py), merging spellings
that the metric treats as equal.
"""
import argparse
import collections
import json
import logging
import os

from dataset.vqa_eval import normalize_answer

logger = logging.getLogger('albef.build_answer_list')


def count_answers(ann_files, normalize=False):
    """Counter of human answers over the records of `ann_files` (insertion = first appearance)."""
    counts = collections.Counter()
    for path in ann_files:
        with open(path) as f:
            records = json.load(f)
        for i, record in enumerate(records):
            answers = record.get('answer')
            if answers is None:
                raise ValueError(f'{path}, record {i}: no "answer" (test files cannot be used)')
            for answer in answers if isinstance(answers, list) else [answers]:
                answer = normalize_answer(answer) if normalize else answer.strip()
                if answer:
                    counts[answer] += 1
    return counts


def build_answer_list(counts, top=None, min_count=1):
    """Answers seen at least `min_count` times, most frequent first, at most `top` of them."""
    ranked = [answer for answer, n in counts.most_common() if n >= min_count]  # stable for ties
    return ranked[:top] if top else ranked


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--train', nargs='+', required=True, help='VQA / VG training JSON files')
    parser.add_argument('--out', required=True, help='answer list JSON to write')
    parser.add_argument('--top', type=int, default=None, help='keep the K most frequent answers')
    parser.add_argument('--min_count', type=int, default=1, help='drop rarer answers')
    parser.add_argument('--normalize', action='store_true',
                        help='count answers in the VQA evaluation normal form')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')

    counts = count_answers(args.train, normalize=args.normalize)
    answers = build_answer_list(counts, top=args.top, min_count=args.min_count)
    covered = sum(counts[a] for a in answers) / max(1, sum(counts.values()))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(answers, f)
    logger.info('%d of %d distinct answers written to %s (%.1f%% of the human answers)',
                len(answers), len(counts), args.out, 100 * covered)
    return answers


if __name__ == '__main__':
    main()
