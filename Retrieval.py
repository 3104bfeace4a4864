"""Image-text retrieval fine-tuning and evaluation on COCO / Flickr30K (paper section 4.1).

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
import os
import time

import torch

import config_schema
import resume
import utils
from dataset import create_dataset, create_loader
from engine import train_one_epoch
from models.checkpoint import load_retrieval_checkpoint
from models.model_retrieval import ALBEF
from models.retrieval_eval import evaluation, itm_eval
from models.tokenization_bert import BertTokenizer
from optim import create_optimizer
from scheduler import create_scheduler

logger = logging.getLogger('albef.retrieval')


def make_train_step(tokenizer, device):
    def train_step(model, batch, alpha):
        image, caption, idx = batch
        # NOTE(faithful): max_length without truncation=True truncates nothing.
        text = tokenizer(list(caption), padding='longest', max_length=30,
                         return_tensors='pt').to(device)
        loss_ita, loss_itm = model(image.to(device, non_blocking=True), text, alpha=alpha,
                                   idx=idx.to(device, non_blocking=True))
        return {'loss_ita': loss_ita, 'loss_itm': loss_itm}
    return train_step


@torch.no_grad()
def evaluate(model, data_loader, tokenizer, device, config):
    """Recall@K of one split: ITC candidates re-ranked by ITM (spec 8.4)."""
    dataset = data_loader.dataset
    start = time.time()
    text = tokenizer(dataset.text, padding='max_length', truncation=True, max_length=30,
                     return_tensors='pt').to(device)
    scores_i2t, scores_t2i = evaluation(model, data_loader, text.input_ids, text.attention_mask,
                                        config['k_test'], fast=config['fast_eval'],
                                        rank=utils.get_rank(), world_size=utils.get_world_size())
    logger.info('evaluation of %d images and %d texts took %.1f s', len(dataset), len(dataset.text),
                time.time() - start)
    return itm_eval(scores_i2t, scores_t2i, dataset.txt2img, dataset.img2txt)


def main(argv=None):
    parser = utils.get_args_parser('ALBEF image-text retrieval')
    parser.add_argument('--evaluate', action='store_true', help='only evaluate --checkpoint')
    resume.add_argument(parser)
    args = parser.parse_args(argv)
    utils.init_distributed_mode(args)
    config = config_schema.load_task_config(args, 'retrieval')
    os.makedirs(args.output_dir, exist_ok=True)
    utils.setup_logging(args.output_dir)
    device = torch.device(args.device)
    utils.set_seed(args.seed)
    if utils.is_main_process():
        utils.save_config(config, os.path.join(args.output_dir, 'config.yaml'))

    train_set, val_set, test_set = create_dataset('re', config)
    train_loader = resume.train_loader(train_set, config['batch_size_train'], config['num_workers'],
                                       seed=args.seed)
    # Evaluation loaders are not sharded: every rank reads every image; `evaluation` shares the
    # encoding (fast path) and the ITM re-ranking between the ranks.
    val_loader, test_loader = create_loader(
        [val_set, test_set], [None, None], batch_size=[config['batch_size_test']] * 2,
        num_workers=[config['num_workers']] * 2, is_trains=[False, False], collate_fns=[None] * 2)

    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, text_encoder=config['text_encoder'], tokenizer=tokenizer)
    model = model.to(device)
    optimizer = create_optimizer(config['optimizer'], model)
    lr_scheduler = create_scheduler(config['schedular'], optimizer)
    run = resume.TrainingRun(args.output_dir, config, model, optimizer, lr_scheduler, train_loader,
                             kind='retrieval', evaluates=True)
    start_epoch = run.resume() if args.resume and not args.evaluate else 0
    if args.checkpoint and not run.resumed_from:
        load_retrieval_checkpoint(model, args.checkpoint)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None)

    max_epoch = config['schedular']['epochs']
    warmup_epochs = config['schedular']['warmup_epochs']
    train_step = make_train_step(tokenizer, device)
    val_result = test_result = None
    for epoch in range(start_epoch, 1 if args.evaluate else max_epoch):
        train_stats = {}
        if not args.evaluate:
            train_stats = run.train_epoch(epoch, lambda start_step: train_one_epoch(
                model, train_loader, optimizer, lr_scheduler, epoch, device, config, train_step,
                warmup_steps=100 * warmup_epochs, warm_up=config['warm_up'],
                print_freq=config['print_freq'], stats_fmt=None, start_step=start_step, hooks=run))
        val_result = evaluate(model_without_ddp, val_loader, tokenizer, device, config)
        test_result = evaluate(model_without_ddp, test_loader, tokenizer, device, config)
        logger.info('epoch %d val %s', epoch, val_result)
        logger.info('epoch %d test %s', epoch, test_result)
        utils.append_log(args.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()},
                                           **{f'val_{k}': v for k, v in val_result.items()},
                                           **{f'test_{k}': v for k, v in test_result.items()},
                                           'epoch': epoch})
        if not args.evaluate:
            # every rank computes the same recalls (from the all-reduced score matrices)
            if run.improved(epoch, val_result['r_mean']):
                utils.save_checkpoint({'model': model_without_ddp.state_dict(),
                                       'optimizer': optimizer.state_dict(),
                                       'lr_scheduler': lr_scheduler.state_dict(),
                                       'config': config, 'epoch': epoch},
                                      os.path.join(args.output_dir, 'checkpoint_best.pth'))
            lr_scheduler.step(epoch + warmup_epochs + 1)
            run.end_epoch(epoch)
        utils.barrier()

    if run.best_epoch is not None:
        logger.info('best epoch: %d (val r_mean %.2f)', run.best_epoch, run.best_value)
        utils.append_log(args.output_dir, {'best_epoch': run.best_epoch})
    utils.destroy_distributed()
    return {'val': val_result, 'test': test_result, 'best_epoch': run.best_epoch}


if __name__ == '__main__':
    utils.run(main)
