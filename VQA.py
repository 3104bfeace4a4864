r"""VQA fine-tuning and answer ranking (paper section 5.1).

Fine-tunes the answer decoder, then answers the test questions by ranking `answer_list` and
writes `result/vqa_result_epoch{E}.json` in the evaluation server's format
([{"question_id": id, "answer": str}], every question once, each id as the question file gives
it: int as in VQA v2, or str) plus `..._topk.json` with the best
answers and their scores. A `val_file` with human answers (optional) is answered too and scored
locally with the VQA accuracy (dataset/vqa_eval.py).

From a pre-training checkpoint:
    torchrun --nproc_per_node=8 VQA.py --config configs/VQA.yaml --output_dir output/vqa \
        --checkpoint ALBEF.pth
Continue a killed run where its newest checkpoint in --output_dir left it (the same command
with --resume; a run killed while answering answers on resuming):
    torchrun --nproc_per_node=8 VQA.py --config configs/VQA.yaml --output_dir output/vqa \
        --checkpoint ALBEF.pth --resume
Answer the test questions with a fine-tuned checkpoint:
    torchrun --nproc_per_node=8 VQA.py --config configs/VQA.yaml --output_dir output/vqa_eval \
        --checkpoint output/vqa/checkpoint_07.pth --evaluate
On the synthetic data (trains on vqa_train, scores vqa_val):
    python VQA.py --config configs/tiny/VQA.yaml --output_dir output/vqa_tiny \
        --checkpoint output/pretrain_tiny/checkpoint_07.pth
"""
import json
import logging
import os

import torch

import engine
import utils
from dataset import create_dataset, vqa_collate_fn, vqa_eval_dataset
from dataset.vqa_dataset import vqa_test_collate_fn
from dataset.vqa_eval import vqa_accuracy
from models.model_vqa import ALBEF
from models.tokenization_bert import BertTokenizer

logger = logging.getLogger('albef.vqa')

MAX_QUESTION_TOKENS = 25  # training questions only; test questions are not truncated
TOPK_KEPT = 5  # answers (with scores) kept per question in the *_topk.json file


def make_train_step(tokenizer, device):
    def train_step(model, batch, alpha):
        image, questions, answers, weights, counts = batch
        question = tokenizer(list(questions), padding='longest', truncation=True,
                             max_length=MAX_QUESTION_TOKENS, return_tensors='pt').to(device)
        answer = tokenizer(list(answers), padding='longest', return_tensors='pt').to(device)
        loss = model(image.to(device, non_blocking=True), question, answer, alpha=alpha, k=counts,
                     weights=weights.to(device, non_blocking=True), train=True)
        return {'loss': loss}
    return train_step


@torch.no_grad()
def answer_questions(model, data_loader, tokenizer, device, config, print_freq=50):
    """Rank the answer list for every question of `data_loader` (all ranks merged).

    Returns one result per distinct question id, in dataset order:
    {"question_id", "answer", "topk": [{"answer", "score"}, ...]} (best first).
    """
    model.eval()
    answer_list = data_loader.dataset.answer_list
    # The answer list is tokenised once, with eos (the decoder's stop token) appended.
    answers = tokenizer([answer + config['eos'] for answer in answer_list], padding='longest',
                        return_tensors='pt').to(device)
    k = min(config['k_test'], len(answer_list))  # the original needs k_test <= len(answer_list)
    results = []
    metric_logger = utils.MetricLogger(delimiter='  ')
    for image, questions, question_ids in metric_logger.log_every(data_loader, print_freq,
                                                                  'Answering:'):
        question = tokenizer(list(questions), padding='longest', return_tensors='pt').to(device)
        topk_ids, topk_probs = model(image.to(device, non_blocking=True), question, answers, k=k,
                                     train=False)  # (B, k) each, best first
        # NOTE(fixed): the original cast every id to int; the ids stay as the file gives them
        # (a list from vqa_test_collate_fn; a tensor from the default collate of int ids).
        if torch.is_tensor(question_ids):
            question_ids = question_ids.tolist()
        for qid, ids, probs in zip(question_ids, topk_ids.tolist(), topk_probs.tolist()):
            results.append({'question_id': qid, 'answer': answer_list[ids[0]],
                            'topk': [{'answer': answer_list[i], 'score': p}
                                     for i, p in zip(ids[:TOPK_KEPT], probs[:TOPK_KEPT])]})
    return merge_results(utils.all_gather_objects(results),
                         [ann['question_id'] for ann in data_loader.dataset.ann])


def merge_results(per_rank, question_ids):
    """The ranks' results as one list in `question_ids` order, each question once.

    NOTE(fixed): the DistributedSampler pads the last ranks with repeated questions, which the
    original left in its result file; the first answer of each question id is kept here.
    """
    by_id = {}
    for results in per_rank:
        for result in results:
            by_id.setdefault(result['question_id'], result)
    missing = set(question_ids) - set(by_id)
    if missing:
        raise RuntimeError(f'{len(missing)} questions were not answered, e.g. '
                           f'{sorted(missing, key=repr)[:5]}')
    return [by_id[qid] for qid in dict.fromkeys(question_ids)]


def save_results(results, result_dir, name):
    """`name`.json in the server format and `name`_topk.json with the scored candidates."""
    os.makedirs(result_dir, exist_ok=True)
    path = os.path.join(result_dir, f'{name}.json')
    with open(path, 'w') as f:
        json.dump([{'question_id': r['question_id'], 'answer': r['answer']} for r in results], f)
    with open(os.path.join(result_dir, f'{name}_topk.json'), 'w') as f:
        json.dump(results, f)
    logger.info('%d answers written to %s', len(results), path)
    return path


def main(argv=None):
    parser = utils.get_args_parser(__doc__)
    parser.add_argument('--text_decoder', default=None,
                        help="BERT weights of the answer decoder; overrides the config's text_decoder")
    args = parser.parse_args(argv)
    run = engine.setup(args, 'vqa')
    config = run.config

    train_set, test_set = create_dataset('vqa', config)
    eval_sets = {'test': test_set}
    if config.get('val_file'):  # questions with human answers, answered and scored locally
        eval_sets['val'] = vqa_eval_dataset(config, 'val_file')
    train_loader = run.train_loader(train_set, config['batch_size_train'], collate_fn=vqa_collate_fn)
    eval_loaders = run.eval_loaders(list(eval_sets.values()), config['batch_size_test'],
                                    collate_fn=vqa_test_collate_fn)

    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, text_encoder=config['text_encoder'],
                  text_decoder=config['text_decoder'], tokenizer=tokenizer)
    run.prepare(model, train_loader)  # options, optimiser, schedule, starting weights, DDP
    train_step = make_train_step(tokenizer, run.device)

    for epoch in run.epochs():  # nothing to train with --evaluate
        train_stats = run.train_epoch(epoch, train_step)
        run.log(epoch, train_stats)
        run.end_epoch(epoch)  # checkpoint_NN.pth

    # The final model answers every evaluation split (the original: the test split only).
    epoch, result_dir = run.last_epoch, os.path.join(args.output_dir, 'result')
    summary = {'epoch': epoch}
    for split, loader in zip(eval_sets, eval_loaders):
        with run.autocast():
            results = answer_questions(model, loader, tokenizer, run.device, config,
                                       config['print_freq'])
        if utils.is_main_process():
            name = f'vqa_result_epoch{epoch}' if split == 'test' else f'vqa_{split}_result_epoch{epoch}'
            summary[f'{split}_result_file'] = save_results(results, result_dir, name)
        if all('answer' in ann for ann in loader.dataset.ann):  # human answers to score against
            summary[f'{split}_vqa_acc'] = vqa_accuracy(results, loader.dataset.ann)
            logger.info('%s VQA accuracy: %.4f', split, summary[f'{split}_vqa_acc'])
        utils.barrier()
    utils.append_log(args.output_dir, {k: v for k, v in summary.items() if not k.endswith('_file')})
    run.finish()
    return summary


if __name__ == '__main__':
    utils.run(main)
