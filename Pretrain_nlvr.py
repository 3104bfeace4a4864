"""Text-assignment (TA) pre-training for NLVR2 (paper section 5.3, spec 8.3): one epoch on the
pre-training images that teaches the two-image encoder which image of a pair a caption
describes. Starts from a pre-training checkpoint; its output starts NLVR.py.

One node, 8 GPUs:
    torchrun --nproc_per_node=8 Pretrain_nlvr.py --config configs/NLVR_pretrain.yaml \
        --output_dir output/nlvr_pretrain --checkpoint ALBEF.pth
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
import utils
from dataset import create_dataset, create_loader, create_sampler
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
    samplers = (create_sampler([dataset], [True], utils.get_world_size(), utils.get_rank())
                if args.distributed else [None])
    data_loader = create_loader([dataset], samplers, batch_size=[config['batch_size']],
                                num_workers=[config.get('num_workers', 4)], is_trains=[True],
                                collate_fns=[None])[0]

    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, text_encoder=config['text_encoder'], tokenizer=tokenizer)
    if args.checkpoint:
        load_for_finetuning(model, args.checkpoint, target_kind='pretrain_nlvr')
    model = model.to(device)
    optimizer = create_optimizer(config['optimizer'], model)
    lr_scheduler = create_scheduler(config['schedular'], optimizer)

    model_without_ddp = model
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
    for epoch in range(0, max_epoch):
        if epoch > 0:
            lr_scheduler.step(epoch + warmup_epochs)
        if args.distributed:
            data_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, data_loader, optimizer, lr_scheduler, epoch, device,
                                      config, train_step, warmup_steps=100 * warmup_epochs,
                                      print_freq=config.get('print_freq', 50), stats_fmt=None)
        if utils.is_main_process():
            state = {'model': model_without_ddp.state_dict(), 'optimizer': optimizer.state_dict(),
                     'lr_scheduler': lr_scheduler.state_dict(), 'config': config, 'epoch': epoch}
            utils.save_checkpoint(state, os.path.join(args.output_dir, f'checkpoint_{epoch:02d}.pth'))
            utils.append_log(args.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()},
                                               'epoch': epoch})
        utils.barrier()

    logger.info('training time %s', datetime.timedelta(seconds=int(time.time() - start_time)))
    utils.destroy_distributed()
    return train_stats


if __name__ == '__main__':
    utils.run(main)
