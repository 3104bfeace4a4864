"""NLVR2 fine-tuning and evaluation (paper section 5.3, spec 8.6): is a sentence true of a
pair of images? Starts from the text-assignment checkpoint written by Pretrain_nlvr.py.

From the text-assignment checkpoint:
    torchrun --nproc_per_node=8 NLVR.py --config configs/NLVR.yaml --output_dir output/nlvr \
        --checkpoint output/nlvr_pretrain/checkpoint_00.pth
Continue a killed run where its newest checkpoint in --output_dir left it (the same command
with --resume):
    torchrun --nproc_per_node=8 NLVR.py --config configs/NLVR.yaml --output_dir output/nlvr \
        --checkpoint output/nlvr_pretrain/checkpoint_00.pth --resume
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
import resume
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
    resume.add_argument(parser)
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

    train_set, *eval_sets = create_dataset('nlvr', config)
    num_workers = config.get('num_workers', 4)
    train_loader = resume.train_loader(train_set, config['batch_size'], num_workers, seed=args.seed)
    samplers = (create_sampler(eval_sets, [False, False], utils.get_world_size(), utils.get_rank())
                if args.distributed else [None] * 2)
    dev_loader, test_loader = create_loader(
        eval_sets, samplers, batch_size=[config['batch_size']] * 2, num_workers=[num_workers] * 2,
        is_trains=[False, False], collate_fns=[None] * 2)

    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, text_encoder=config['text_encoder'], tokenizer=tokenizer)
    model = model.to(device)
    optimizer = create_optimizer(config['optimizer'], model)
    lr_scheduler = create_scheduler(config['schedular'], optimizer)
    run = resume.TrainingRun(args.output_dir, config, model, optimizer, lr_scheduler, train_loader,
                             kind='nlvr', evaluates=True)
    start_epoch = run.resume() if args.resume and not args.evaluate else 0
    if args.evaluate:
        load_checkpoint(model, args.checkpoint, kind='nlvr')
    elif args.checkpoint and not run.resumed_from:
        # NOTE(faithful): the momentum models keep the copy made at construction (before this
        # load), as in the original; they catch up through the EMA.
        load_for_finetuning(model, args.checkpoint, target_kind='nlvr')
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None)

    max_epoch = config['schedular']['epochs']
    warmup_epochs = config['schedular']['warmup_epochs']
    print_freq = config.get('print_freq', 50)
    train_step, predict = make_steps(tokenizer, device)
    dev_acc = test_acc = None
    for epoch in range(start_epoch, 1 if args.evaluate else max_epoch):
        train_stats = {}
        if not args.evaluate:
            train_stats = run.train_epoch(epoch, lambda start_step: train_one_epoch(
                model, train_loader, optimizer, lr_scheduler, epoch, device, config, train_step,
                warmup_steps=100 * warmup_epochs, warm_up=config['warm_up'],
                print_freq=print_freq, stats_fmt=None, start_step=start_step, hooks=run))
        dev_acc = evaluate_accuracy(model_without_ddp, dev_loader, predict, header='Dev:',
                                    print_freq=print_freq)
        test_acc = evaluate_accuracy(model_without_ddp, test_loader, predict, header='Test:',
                                     print_freq=print_freq)
        logger.info('epoch %d: dev acc %.4f, test acc %.4f', epoch, dev_acc, test_acc)
        utils.append_log(args.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()},
                                           'dev_acc': dev_acc, 'test_acc': test_acc, 'epoch': epoch})
        if not args.evaluate:
            # the same on every rank (counts are gathered); saved by the main process
            if run.improved(epoch, dev_acc):
                # NOTE(faithful): one file per improving epoch, named by the epoch.
                utils.save_checkpoint({'model': model_without_ddp.state_dict(),
                                       'optimizer': optimizer.state_dict(),
                                       'lr_scheduler': lr_scheduler.state_dict(),
                                       'config': config, 'epoch': epoch},
                                      os.path.join(args.output_dir, f'checkpoint_{epoch:02d}.pth'))
            lr_scheduler.step(epoch + warmup_epochs + 1)
            run.end_epoch(epoch)
        utils.barrier()

    if run.best_epoch is not None:
        logger.info('best epoch: %d (dev acc %.4f)', run.best_epoch, run.best_value)
        utils.append_log(args.output_dir, {'best_epoch': run.best_epoch})
    utils.destroy_distributed()
    return {'dev_acc': dev_acc, 'test_acc': test_acc, 'best_epoch': run.best_epoch}


if __name__ == '__main__':
    utils.run(main)
