"""Text-assignment (TA) pre-training for NLVR2 (paper section 5.3, spec 8.3): one epoch on the
pre-training images that teaches the two-image encoder which image of a pair a caption
describes. Starts from a pre-training checkpoint; its output starts NLVR.py.

One node, 8 GPUs:
    torchrun --nproc_per_node=8 Pretrain_nlvr.py --config configs/NLVR_pretrain.yaml \
        --output_dir output/nlvr_pretrain --checkpoint ALBEF.pth
Continue a killed run where its newest checkpoint in --output_dir left it: the same command
with --resume.
On the synthetic data:
    python Pretrain_nlvr.py --config configs/tiny/NLVR_pretrain.yaml \
        --output_dir output/nlvr_pretrain_tiny --checkpoint output/pretrain_tiny/checkpoint_07.pth
"""
import datetime
import logging
import os
import time

import torch

import config_schema
import resume
import utils
from dataset import create_dataset
from engine import train_one_epoch
from models.checkpoint import load_for_finetuning
from models.model_pretrain_nlvr import ALBEF
from models.tokenization_bert import BertTokenizer
from optim import create_optimizer
from scheduler import create_scheduler

logger = logging.getLogger('albef.pretrain_nlvr')

MAX_TOKENS = 25  # captions are truncated as in pre-training (spec section 3)


def make_train_step(tokenizer, device):
    def train_step(model, batch, alpha):
        image, captions = batch
        text = tokenizer(list(captions), padding='longest', truncation=True,
                         max_length=MAX_TOKENS, return_tensors='pt').to(device)
        return {'loss': model(image.to(device, non_blocking=True), text)}
    return train_step


def main(argv=None):
    parser = utils.get_args_parser('ALBEF text-assignment pre-training for NLVR2')
    resume.add_argument(parser)
    args = parser.parse_args(argv)
    utils.init_distributed_mode(args)
    config = config_schema.load_task_config(args, 'pretrain_nlvr')
    os.makedirs(args.output_dir, exist_ok=True)
    utils.setup_logging(args.output_dir)
    device = torch.device(args.device)
    utils.set_seed(args.seed)
    if utils.is_main_process():
        utils.save_config(config, os.path.join(args.output_dir, 'config.yaml'))

    dataset = create_dataset('pretrain', config)
    data_loader = resume.train_loader(dataset, config['batch_size'], config.get('num_workers', 4),
                                      seed=args.seed)

    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, text_encoder=config['text_encoder'], tokenizer=tokenizer)
    model = model.to(device)
    optimizer = create_optimizer(config['optimizer'], model)
    lr_scheduler = create_scheduler(config['schedular'], optimizer)
    run = resume.TrainingRun(args.output_dir, config, model, optimizer, lr_scheduler, data_loader,
                             kind='pretrain_nlvr')
    start_epoch = run.resume() if args.resume else 0
    if args.checkpoint and not run.resumed_from:
        load_for_finetuning(model, args.checkpoint, target_kind='pretrain_nlvr')

    if args.distributed:
        # text_proj and temp take no part in the loss (spec 6.6).
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None,
            find_unused_parameters=True)

    max_epoch = config['schedular']['epochs']
    warmup_epochs = config['schedular']['warmup_epochs']
    train_step = make_train_step(tokenizer, device)
    logger.info('text-assignment pre-training for %d epochs, %d steps per epoch',
                max_epoch, len(data_loader))
    start_time = time.time()
    train_stats = {}
    for epoch in range(start_epoch, max_epoch):
        if epoch > 0:
            lr_scheduler.step(epoch + warmup_epochs)
        train_stats = run.train_epoch(epoch, lambda start_step: train_one_epoch(
            model, data_loader, optimizer, lr_scheduler, epoch, device, config, train_step,
            warmup_steps=100 * warmup_epochs, print_freq=config.get('print_freq', 50),
            stats_fmt=None, start_step=start_step, hooks=run))
        run.end_epoch(epoch)  # checkpoint_NN.pth
        utils.append_log(args.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()},
                                           'epoch': epoch})
        utils.barrier()

    logger.info('training time %s', datetime.timedelta(seconds=int(time.time() - start_time)))
    utils.destroy_distributed()
    return train_stats


if __name__ == '__main__':
    utils.run(main)
