"""Visual entailment fine-tuning and evaluation on SNLI-VE (paper section 5.2, spec 8.6).

From a pre-training checkpoint (position embeddings resized to the config's resolution):
    torchrun --nproc_per_node=8 VE.py --config configs/VE.yaml --output_dir output/ve \
        --checkpoint ALBEF.pth
Continue a killed run where its newest checkpoint in --output_dir left it (the same command
with --resume; `checkpoint_every_steps` in the config adds checkpoints inside epochs):
    torchrun --nproc_per_node=8 VE.py --config configs/VE.yaml --output_dir output/ve \
        --checkpoint ALBEF.pth --resume
Evaluate a fine-tuned checkpoint:
    torchrun --nproc_per_node=8 VE.py --config configs/VE.yaml --output_dir output/ve_eval \
        --checkpoint output/ve/checkpoint_best.pth --evaluate
On the synthetic data:
    python VE.py --config configs/tiny/VE.yaml --output_dir output/ve_tiny \
        --checkpoint output/pretrain_tiny/checkpoint_07.pth
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
from models.model_ve import ALBEF
from models.tokenization_bert import BertTokenizer
from optim import create_optimizer
from scheduler import create_scheduler

logger = logging.getLogger('albef.ve')


def make_steps(tokenizer, device):
    """(train_step, predict) on batches (images, hypotheses, labels)."""
    def inputs(batch):
        image, sentence, label = batch
        text = tokenizer(list(sentence), padding='longest', return_tensors='pt').to(device)
        return image.to(device, non_blocking=True), text, label.to(device, non_blocking=True)

    def train_step(model, batch, alpha):
        image, text, label = inputs(batch)
        return {'loss': model(image, text, targets=label, alpha=alpha, train=True)}

    def predict(model, batch):
        image, text, label = inputs(batch)
        return model(image, text, targets=label, train=False), label
    return train_step, predict


def main(argv=None):
    parser = utils.get_args_parser('ALBEF visual entailment (SNLI-VE)')
    parser.add_argument('--evaluate', action='store_true', help='only evaluate --checkpoint')
    resume.add_argument(parser)
    args = parser.parse_args(argv)
    if args.evaluate and not args.checkpoint:
        parser.error('--evaluate needs --checkpoint (a fine-tuned VE checkpoint)')
    utils.init_distributed_mode(args)
    config = config_schema.load_task_config(args, 've')
    os.makedirs(args.output_dir, exist_ok=True)
    utils.setup_logging(args.output_dir)
    device = torch.device(args.device)
    utils.set_seed(args.seed)
    if utils.is_main_process():
        utils.save_config(config, os.path.join(args.output_dir, 'config.yaml'))

    train_set, *eval_sets = create_dataset('ve', config)
    num_workers = config.get('num_workers', 4)
    train_loader = resume.train_loader(train_set, config['batch_size_train'], num_workers,
                                       seed=args.seed)
    samplers = (create_sampler(eval_sets, [False, False], utils.get_world_size(), utils.get_rank())
                if args.distributed else [None] * 2)
    val_loader, test_loader = create_loader(
        eval_sets, samplers, batch_size=[config['batch_size_test']] * 2,
        num_workers=[num_workers] * 2, is_trains=[False, False], collate_fns=[None] * 2)

    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, text_encoder=config['text_encoder'], tokenizer=tokenizer)
    model = model.to(device)
    optimizer = create_optimizer(config['optimizer'], model)
    lr_scheduler = create_scheduler(config['schedular'], optimizer)
    run = resume.TrainingRun(args.output_dir, config, model, optimizer, lr_scheduler, train_loader,
                             kind='ve', evaluates=True)
    start_epoch = run.resume() if args.resume and not args.evaluate else 0
    if args.evaluate:
        load_checkpoint(model, args.checkpoint, kind='ve')
    elif args.checkpoint and not run.resumed_from:
        load_for_finetuning(model, args.checkpoint, target_kind='ve')
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None)

    max_epoch = config['schedular']['epochs']
    warmup_epochs = config['schedular']['warmup_epochs']
    print_freq = config.get('print_freq', 50)
    train_step, predict = make_steps(tokenizer, device)
    val_acc = test_acc = None
    for epoch in range(start_epoch, 1 if args.evaluate else max_epoch):
        train_stats = {}
        if not args.evaluate:
            # NOTE(faithful): configs/VE.yaml turns the epoch-0 alpha ramp off (warm_up: false).
            train_stats = run.train_epoch(epoch, lambda start_step: train_one_epoch(
                model, train_loader, optimizer, lr_scheduler, epoch, device, config, train_step,
                warmup_steps=100 * warmup_epochs, warm_up=config['warm_up'],
                print_freq=print_freq, stats_fmt=None, start_step=start_step, hooks=run))
        val_acc = evaluate_accuracy(model_without_ddp, val_loader, predict,
                                    header='Validation:', print_freq=print_freq)
        test_acc = evaluate_accuracy(model_without_ddp, test_loader, predict, header='Test:',
                                     print_freq=print_freq)
        logger.info('epoch %d: val acc %.4f, test acc %.4f', epoch, val_acc, test_acc)
        utils.append_log(args.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()},
                                           'val_acc': val_acc, 'test_acc': test_acc, 'epoch': epoch})
        if not args.evaluate:
            # the same on every rank (counts are gathered); saved by the main process
            if run.improved(epoch, val_acc):
                utils.save_checkpoint({'model': model_without_ddp.state_dict(),
                                       'optimizer': optimizer.state_dict(),
                                       'lr_scheduler': lr_scheduler.state_dict(),
                                       'config': config, 'epoch': epoch},
                                      os.path.join(args.output_dir, 'checkpoint_best.pth'))
            lr_scheduler.step(epoch + warmup_epochs + 1)
            run.end_epoch(epoch)
        utils.barrier()

    if run.best_epoch is not None:
        logger.info('best epoch: %d (val acc %.4f)', run.best_epoch, run.best_value)
        utils.append_log(args.output_dir, {'best_epoch': run.best_epoch})
    utils.destroy_distributed()
    return {'val_acc': val_acc, 'test_acc': test_acc, 'best_epoch': run.best_epoch}


if __name__ == '__main__':
    utils.run(main)
