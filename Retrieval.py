r"""Image-text retrieval fine-tuning and evaluation on COCO / Flickr30K (paper section 4.1).

From a pre-training checkpoint (position embeddings resized to the config's resolution):
    torchrun --nproc_per_node=8 Retrieval.py --config configs/Retrieval_coco.yaml \
        --output_dir output/retrieval_coco --checkpoint ALBEF.pth
Continue a killed run where its newest checkpoint in --output_dir left it (the same command
with --resume; `checkpoint_every_steps` in the config adds checkpoints inside epochs):
    torchrun --nproc_per_node=8 Retrieval.py --config configs/Retrieval_coco.yaml \
        --output_dir output/retrieval_coco --checkpoint ALBEF.pth --resume
Evaluate a fine-tuned checkpoint (a training save or the released mscoco.pth / flickr30k.pth):
    torchrun --nproc_per_node=8 Retrieval.py --config configs/Retrieval_coco.yaml \
        --output_dir output/retrieval_coco_eval --checkpoint mscoco.pth --evaluate
On the synthetic data:
    python Retrieval.py --config configs/tiny/Retrieval.yaml --output_dir output/retrieval_tiny \
        --checkpoint output/pretrain_tiny/checkpoint_07.pth
"""
import logging
import time

import torch

import engine
import utils
from dataset import create_dataset
from models.model_retrieval import ALBEF
from models.retrieval_eval import evaluation as score_matrices
from models.retrieval_eval import itm_eval
from models.tokenization_bert import BertTokenizer

logger = logging.getLogger('albef.retrieval')

MAX_CAPTION_TOKENS = 30


def make_train_step(tokenizer, device):
    def train_step(model, batch, alpha):
        image, caption, idx = batch
        # NOTE(faithful): max_length without truncation=True truncates nothing.
        text = tokenizer(list(caption), padding='longest', max_length=MAX_CAPTION_TOKENS,
                         return_tensors='pt').to(device)
        loss_ita, loss_itm = model(image.to(device, non_blocking=True), text, alpha=alpha,
                                   idx=idx.to(device, non_blocking=True))
        return {'loss_ita': loss_ita, 'loss_itm': loss_itm}
    return train_step


@torch.no_grad()
def evaluation(model, data_loader, tokenizer, device, config):
    """The original's call: the (score_i2t (I, T), score_t2i (T, I)) numpy matrices of one split,
    ITC candidates re-ranked by ITM, every rank taking part. config: k_test, and fast_eval,
    precision and print_freq when present (an original config has none: their defaults)."""
    option = lambda key: config.get(key, utils.KEYS[key].default)
    dataset = data_loader.dataset
    start = time.time()
    text = tokenizer(dataset.text, padding='max_length', truncation=True,
                     max_length=MAX_CAPTION_TOKENS, return_tensors='pt').to(device)

    def progress(items, header):
        return utils.MetricLogger().log_every(items, option('print_freq'), header)
    with engine.autocast_context(option('precision'), device):
        scores_i2t, scores_t2i = score_matrices(
            model, progress(data_loader, 'Evaluation (images):'), text.input_ids,
            text.attention_mask, config['k_test'], fast=option('fast_eval'),
            rank=utils.get_rank(), world_size=utils.get_world_size(),
            progress=lambda items: progress(items, 'Evaluation (ITM re-ranking):'))
    logger.info('evaluation of %d images and %d texts took %.1f s', len(dataset), len(dataset.text),
                time.time() - start)
    return scores_i2t.float().cpu().numpy(), scores_t2i.float().cpu().numpy()


def main(argv=None):
    args = utils.get_args_parser(__doc__).parse_args(argv)
    run = engine.setup(args, 'retrieval')
    config = run.config

    train_set, val_set, test_set = create_dataset('re', config)
    train_loader = run.train_loader(train_set, config['batch_size_train'])
    # Evaluation loaders are not sharded: every rank reads every image; `evaluation` shares the
    # encoding (fast path) and the ITM re-ranking between the ranks.
    val_loader, test_loader = run.eval_loaders([val_set, test_set], config['batch_size_test'],
                                               sharded=False)

    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, text_encoder=config['text_encoder'], tokenizer=tokenizer)
    run.prepare(model, train_loader)  # options, optimiser, schedule, starting weights, DDP
    train_step = make_train_step(tokenizer, run.device)

    val_result = test_result = None
    for epoch in run.epochs():
        train_stats = run.train_epoch(epoch, train_step)
        val_result = itm_eval(*evaluation(model, val_loader, tokenizer, run.device, config),
                              val_set.txt2img, val_set.img2txt)
        test_result = itm_eval(*evaluation(model, test_loader, tokenizer, run.device, config),
                               test_set.txt2img, test_set.img2txt)
        logger.info('epoch %d val %s', epoch, val_result)
        logger.info('epoch %d test %s', epoch, test_result)
        run.log(epoch, train_stats, **{f'val_{k}': v for k, v in val_result.items()},
                **{f'test_{k}': v for k, v in test_result.items()})
        # every rank computes the same recalls (from the all-reduced score matrices)
        run.end_epoch(epoch, metric=val_result['r_mean'], best_file='checkpoint_best.pth')
    run.finish('val r_mean')
    return {'val': val_result, 'test': test_result, 'best_epoch': run.best_epoch}


if __name__ == '__main__':
    utils.run(main)
