"""ALBEF pre-training: ITC + ITM + MLM with momentum distillation (paper section 3).

One process (CPU or one GPU):
    python Pretrain.py --config configs/tiny/Pretrain.yaml --output_dir output/pretrain_tiny
One node, 8 GPUs:
    torchrun --nproc_per_node=8 Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain
Several nodes (run on each, node_rank 0..N-1):
    torchrun --nnodes=N --node_rank=R --master_addr=HOST --master_port=29500 --nproc_per_node=8 \
        Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain
Continue a killed run (latest checkpoint in --output_dir, or the one given):
    ... Pretrain.py --config ... --output_dir output/pretrain --resume
"""
import datetime
import glob
import logging
import os
import re
import time

import torch

import utils
from dataset import create_dataset, create_loader, create_sampler
from engine import train_one_epoch
from models.checkpoint import load_checkpoint, read_checkpoint
from models.model_pretrain import ALBEF
from models.tokenization_bert import BertTokenizer
from optim import optimizer_state_dict
from scheduler import create_scheduler
from train_options import build_optimizer, configure_model

logger = logging.getLogger('albef.pretrain')


def make_train_step(tokenizer, config, device):
    def train_step(model, batch, alpha):
        image, captions = batch
        image = image.to(device, non_blocking=True)
        text = tokenizer(list(captions), padding='longest', truncation=True,
                         max_length=config['max_tokens'], return_tensors='pt').to(device)
        loss_mlm, loss_ita, loss_itm = model(image, text, alpha=alpha)
        return {'loss_mlm': loss_mlm, 'loss_ita': loss_ita, 'loss_itm': loss_itm}
    return train_step


def latest_checkpoint(output_dir):
    """The checkpoint_NN.pth of the highest epoch in output_dir, or None."""
    paths = glob.glob(os.path.join(output_dir, 'checkpoint_[0-9]*.pth'))
    epoch = lambda p: int(re.search(r'checkpoint_(\d+)\.pth$', p).group(1))
    return max(paths, key=epoch) if paths else None


def main(argv=None):
    parser = utils.get_args_parser('ALBEF pre-training')
    parser.add_argument('--resume', type=utils.str2bool, nargs='?', const=True, default=False,
                        help='continue from --checkpoint (or the latest checkpoint in --output_dir)')
    args = parser.parse_args(argv)
    config = utils.load_config(args.config)
    config = utils.apply_overrides(config, args.opts)
    if args.text_encoder:
        config['text_encoder'] = config['tokenizer'] = args.text_encoder

    os.makedirs(args.output_dir, exist_ok=True)
    utils.init_distributed_mode(args)
    utils.setup_logging(args.output_dir)
    device = torch.device(args.device)
    utils.set_seed(args.seed)
    if utils.is_main_process():
        utils.save_config(config, os.path.join(args.output_dir, 'config.yaml'))

    torch.backends.cudnn.benchmark = True
    dataset = create_dataset('pretrain', config)
    samplers = (create_sampler([dataset], [True], utils.get_world_size(), utils.get_rank())
                if args.distributed else [None])
    data_loader = create_loader([dataset], samplers, batch_size=[config['batch_size']],
                                num_workers=[config['num_workers']], is_trains=[True],
                                collate_fns=[None])[0]

    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, text_encoder=config['text_encoder'], tokenizer=tokenizer,
                  init_deit=config['init_deit']).to(device)
    configure_model(model, config)  # grad_checkpointing, compile
    optimizer = build_optimizer(config, model)  # optimizer_sharding
    lr_scheduler = create_scheduler(config['schedular'], optimizer)

    start_epoch = 0
    resume_from = args.checkpoint or (latest_checkpoint(args.output_dir) if args.resume else None)
    if args.resume and resume_from:
        checkpoint = read_checkpoint(resume_from)
        load_checkpoint(model, checkpoint, kind='pretrain', interpolate=())
        optimizer.load_state_dict(checkpoint['optimizer'])
        lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
        start_epoch = checkpoint['epoch'] + 1
        logger.info('resumed from %s at epoch %d', resume_from, start_epoch)
    elif args.checkpoint:
        load_checkpoint(model, args.checkpoint, kind='pretrain')

    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None)

    max_epoch = config['schedular']['epochs']
    warmup_epochs = config['schedular']['warmup_epochs']
    train_step = make_train_step(tokenizer, config, device)
    logger.info('pre-training for %d epochs from epoch %d, %d steps per epoch',
                max_epoch, start_epoch, len(data_loader))
    start_time = time.time()
    for epoch in range(start_epoch, max_epoch):
        if epoch > 0:
            lr_scheduler.step(epoch + warmup_epochs)
        if args.distributed:
            data_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, data_loader, optimizer, lr_scheduler, epoch, device,
                                      config, train_step, warmup_steps=100 * warmup_epochs,
                                      warm_up=True, print_freq=config['print_freq'], stats_fmt=None)
        optimizer_state = optimizer_state_dict(optimizer)  # on every rank (sharded state)
        if utils.is_main_process():
            state = {'model': model_without_ddp.state_dict(), 'optimizer': optimizer_state,
                     'lr_scheduler': lr_scheduler.state_dict(), 'config': config, 'epoch': epoch}
            utils.save_checkpoint(state, os.path.join(args.output_dir, f'checkpoint_{epoch:02d}.pth'))
            utils.append_log(args.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()},
                                               'epoch': epoch})
        utils.barrier()

    total = datetime.timedelta(seconds=int(time.time() - start_time))
    logger.info('training time %s', total)
    utils.destroy_distributed()
    return train_stats if max_epoch > start_epoch else {}


if __name__ == '__main__':
    main()
