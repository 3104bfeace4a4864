"""ALBEF pre-training: ITC + ITM + MLM with momentum distillation (paper section 3).

One process (CPU or one GPU):
    python Pretrain.py --config configs/tiny/Pretrain.yaml --output_dir output/pretrain_tiny
One node, 8 GPUs:
    torchrun --nproc_per_node=8 Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain
Several nodes (run on each, node_rank 0..N-1):
    torchrun --nnodes=N --node_rank=R --master_addr=HOST --master_port=29500 --nproc_per_node=8 \
        Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain
Continue a killed run exactly where its newest checkpoint left it (in --output_dir, or the one
given with --checkpoint; `checkpoint_every_steps` in the config adds checkpoints inside epochs):
    ... Pretrain.py --config ... --output_dir output/pretrain --resume
"""
import datetime
import logging
import os
import time

import torch

import config_schema
import resume
import utils
from dataset import create_dataset, skipped_samples
from engine import train_one_epoch
from models.checkpoint import load_checkpoint
from models.model_pretrain import ALBEF
from models.tokenization_bert import BertTokenizer
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
    """The epoch-end checkpoint_NN.pth of the highest epoch in output_dir, or None."""
    ends = [path for path in resume.checkpoints(output_dir) if resume.is_epoch_end(path)]
    return ends[0] if ends else None


def main(argv=None):
    parser = utils.get_args_parser('ALBEF pre-training')
    parser.add_argument('--resume', type=utils.str2bool, nargs='?', const=True, default=False,
                        help='continue from --checkpoint (or the latest checkpoint in --output_dir)')
    args = parser.parse_args(argv)
    utils.init_distributed_mode(args)
    config = config_schema.load_task_config(args, 'pretrain')
    os.makedirs(args.output_dir, exist_ok=True)
    utils.setup_logging(args.output_dir)
    device = torch.device(args.device)
    utils.set_seed(args.seed)
    if utils.is_main_process():
        utils.save_config(config, os.path.join(args.output_dir, 'config.yaml'))

    torch.backends.cudnn.benchmark = True
    dataset = create_dataset('pretrain', config)
    data_loader = resume.train_loader(dataset, config['batch_size'], config['num_workers'],
                                      seed=args.seed)

    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, text_encoder=config['text_encoder'], tokenizer=tokenizer,
                  init_deit=config['init_deit']).to(device)
    configure_model(model, config)  # grad_checkpointing, compile
    optimizer = build_optimizer(config, model)  # optimizer_sharding
    lr_scheduler = create_scheduler(config['schedular'], optimizer)

    run = resume.TrainingRun(args.output_dir, config, model, optimizer, lr_scheduler, data_loader,
                             kind='pretrain')
    start_epoch = 0
    if args.resume:
        start_epoch = run.resume(args.checkpoint or None)
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
        train_stats = run.train_epoch(epoch, lambda start_step: train_one_epoch(
            model, data_loader, optimizer, lr_scheduler, epoch, device, config, train_step,
            warmup_steps=100 * warmup_epochs, warm_up=True, print_freq=config['print_freq'],
            stats_fmt=None, start_step=start_step, hooks=run))
        run.end_epoch(epoch)  # checkpoint_NN.pth
        faults = {'skipped_samples': int(utils.all_reduce_sum(skipped_samples(dataset))),
                  'skipped_nonfinite_steps': run.skipped_steps}
        if utils.is_main_process():
            utils.append_log(args.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()},
                                               **faults, 'epoch': epoch})
        utils.barrier()

    total = datetime.timedelta(seconds=int(time.time() - start_time))
    logger.info('training time %s', total)
    utils.destroy_distributed()
    return train_stats if max_epoch > start_epoch else {}


if __name__ == '__main__':
    utils.run(main)
