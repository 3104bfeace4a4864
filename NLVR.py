"""NLVR2 fine-tuning and evaluation (paper section 5.3, spec 8.6): is a sentence true of a
pair of images? Starts from the text-assignment checkpoint written by Pretrain_nlvr.py.

From the text-assignment checkpoint:
    torchrun --nproc_per_node=8 NLVR.py --config configs/NLVR.yaml --output_dir output/nlvr \
        --checkpoint output/nlvr_pretrain/checkpoint_00.pth
Evaluate a fine-tuned checkpoint:
    torchrun --nproc_per_node=8 NLVR.py --config configs/NLVR.yaml --output_dir output/nlvr_eval \
        --checkpoint output/nlvr/checkpoint_03.pth --evaluate
On the synthetic data:
    python NLVR.py --config configs/tiny/NLVR.yaml --output_dir output/nlvr_tiny \
        --checkpoint output/nlvr_pretrain_tiny/checkpoint_00.pth
"""
import logging
import os

import torch

import config_schema
import utils
from dataset import create_dataset, create_loader, create_sampler
from engine import evaluate_accuracy, train_one_epoch
from models.checkpoint import load_checkpoint, load_for_finetuning
from models.model_nlvr import ALBEF
from models.tokenization_bert import BertTokenizer
from optim import create_optimizer
from scheduler import create_scheduler

logger = logging.getLogger('albef.nlvr')


def make_steps(tokenizer, device):
    """(train_step, predict) on batches (left images, right images, sentences, labels)."""
    def inputs(batch):
        image0, image1, sentence, label = batch
        images = torch.cat([image0, image1], dim=0).to(device, non_blocking=True)  # (2B, 3, H, W)
        text = tokenizer(list(sentence), padding='longest', return_tensors='pt').to(device)
        return images, text, label.to(device, non_blocking=True)

    def train_step(model, batch, alpha):
        images, text, label = inputs(batch)
        return {'loss': model(images, text, targets=label, alpha=alpha, train=True)}

    def predict(model, batch):
        images, text, label = inputs(batch)
        return model(images, text, targets=label, train=False), label
    return train_step, predict


def main(argv=None):
    parser = utils.get_args_parser('ALBEF NLVR2')
    parser.add_argument('--evaluate', action='store_true', help='only evaluate --checkpoint')
    args = parser.parse_args(argv)
    if args.evaluate and not args.checkpoint:
        parser.error('--evaluate needs --checkpoint (a fine-tuned NLVR2 checkpoint)')
    utils.init_distributed_mode(args)
    config = config_schema.load_task_config(args, 'nlvr')
    os.makedirs(args.output_dir, exist_ok=True)
    utils.setup_logging(args.output_dir)
    device = torch.device(args.device)
    utils.set_seed(args.seed)
    if utils.is_main_process():
        utils.save_config(config, os.path.join(args.output_dir, 'config.yaml'))

    datasets = create_dataset('nlvr', config)
    samplers = (create_sampler(datasets, [True, False, False], utils.get_world_size(),
                               utils.get_rank()) if args.distributed else [None] * 3)
    train_loader, dev_loader, test_loader = create_loader(
        datasets, samplers, batch_size=[config['batch_size']] * 3,
        num_workers=[config.get('num_workers', 4)] * 3, is_trains=[not args.evaluate, False, False],
        collate_fns=[None] * 3)

    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, text_encoder=config['text_encoder'], tokenizer=tokenizer)
    if args.evaluate:
        load_checkpoint(model, args.checkpoint, kind='nlvr')
    elif args.checkpoint:
        # NOTE(faithful): the momentum models keep the copy made at construction (before this
        # load), as in the original; they catch up through the EMA.
        load_for_finetuning(model, args.checkpoint, target_kind='nlvr')
    model = model.to(device)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None)
    optimizer = create_optimizer(config['optimizer'], model_without_ddp)
    lr_scheduler = create_scheduler(config['schedular'], optimizer)

    max_epoch = config['schedular']['epochs']
    warmup_epochs = config['schedular']['warmup_epochs']
    print_freq = config.get('print_freq', 50)
    train_step, predict = make_steps(tokenizer, device)
    best, best_epoch = -1.0, None
    for epoch in range(0, 1 if args.evaluate else max_epoch):
        train_stats = {}
        if not args.evaluate:
            if args.distributed:
                train_loader.sampler.set_epoch(epoch)
            train_stats = train_one_epoch(model, train_loader, optimizer, lr_scheduler, epoch,
                                          device, config, train_step,
                                          warmup_steps=100 * warmup_epochs,
                                          warm_up=config['warm_up'], print_freq=print_freq,
                                          stats_fmt=None)
        dev_acc = evaluate_accuracy(model_without_ddp, dev_loader, predict, header='Dev:',
                                    print_freq=print_freq)
        test_acc = evaluate_accuracy(model_without_ddp, test_loader, predict, header='Test:',
                                     print_freq=print_freq)
        logger.info('epoch %d: dev acc %.4f, test acc %.4f', epoch, dev_acc, test_acc)
        utils.append_log(args.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()},
                                           'dev_acc': dev_acc, 'test_acc': test_acc, 'epoch': epoch})
        if not args.evaluate and dev_acc > best:  # the same on every rank (counts are gathered)
            best, best_epoch = dev_acc, epoch
            if utils.is_main_process():
                # NOTE(faithful): one file per improving epoch, named by the epoch.
                utils.save_checkpoint({'model': model_without_ddp.state_dict(),
                                       'optimizer': optimizer.state_dict(),
                                       'lr_scheduler': lr_scheduler.state_dict(),
                                       'config': config, 'epoch': epoch},
                                      os.path.join(args.output_dir, f'checkpoint_{epoch:02d}.pth'))
        if not args.evaluate:
            lr_scheduler.step(epoch + warmup_epochs + 1)
        utils.barrier()

    if best_epoch is not None:
        logger.info('best epoch: %d (dev acc %.4f)', best_epoch, best)
        utils.append_log(args.output_dir, {'best_epoch': best_epoch})
    utils.destroy_distributed()
    return {'dev_acc': dev_acc, 'test_acc': test_acc, 'best_epoch': best_epoch}


if __name__ == '__main__':
    utils.run(main)
