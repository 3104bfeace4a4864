"""Weakly-supervised visual grounding on RefCOCO+ (paper section 4.4): retrieval-style
fine-tuning on referring expressions (image ids as ITC positives), then each expression is
localised by Grad-CAM and the detection proposal its map covers best.

    torchrun --nproc_per_node=8 Grounding.py --config configs/Grounding.yaml \
        --output_dir output/grounding --checkpoint ALBEF.pth --gradcam_mode itm --block_num 8
Continue a killed run where its newest checkpoint in --output_dir left it: the same command
with --resume.
Evaluate the released refcoco.pth:
    python Grounding.py --config configs/Grounding.yaml --output_dir output/grounding_eval \
        --checkpoint refcoco.pth --evaluate
On the synthetic data (the tiny BERT's last fusion layer is 3):
    python Grounding.py --config configs/tiny/Grounding.yaml --output_dir output/grounding_tiny \
        --checkpoint output/pretrain_tiny/checkpoint_07.pth --block_num 3
"""
import json
import logging
import os

import torch

import config_schema
import resume
import utils
from dataset import create_dataset, create_loader, create_sampler
from dataset.grounding_dataset import load_refer
from dataset.grounding_eval import grounding_eval
from engine import train_one_epoch
from models.checkpoint import load_retrieval_checkpoint
from models.gradcam import gradcam
from models.model_retrieval import ALBEF
from models.tokenization_bert import BertTokenizer
from optim import create_optimizer
from scheduler import create_scheduler
from Retrieval import make_train_step

logger = logging.getLogger('albef.grounding')


def localise(model, data_loader, tokenizer, device, mode, block_num):
    """Grad-CAM map (on the patch grid) of every test expression: [{'ref_id', 'pred'}]."""
    model.eval()
    results = []
    for image, text, ref_ids in data_loader:
        text_input = tokenizer(list(text), padding='longest', return_tensors='pt').to(device)
        cam = gradcam(model, image.to(device), text_input.input_ids, text_input.attention_mask,
                      mode=mode, block_num=block_num)
        results += [{'ref_id': int(ref_id), 'pred': cam_map.cpu()}
                    for ref_id, cam_map in zip(ref_ids, cam.maps)]
    model.zero_grad(set_to_none=True)
    # The distributed sampler pads with duplicates: keep each expression once.
    merged = {}
    for part in utils.all_gather_objects(results):
        merged.update((r['ref_id'], r) for r in part)
    return list(merged.values())


def main(argv=None):
    parser = utils.get_args_parser('ALBEF weakly-supervised grounding')
    parser.add_argument('--gradcam_mode', default='itm', choices=['itm', 'itc'])
    parser.add_argument('--block_num', default=8, type=int,
                        help='text-encoder layer (itm) or ViT block (itc) whose attention is used')
    parser.add_argument('--evaluate', action='store_true', help='only evaluate --checkpoint')
    resume.add_argument(parser)
    args = parser.parse_args(argv)
    utils.init_distributed_mode(args)
    config = config_schema.load_task_config(args, 'grounding')
    os.makedirs(args.output_dir, exist_ok=True)
    utils.setup_logging(args.output_dir)
    device = torch.device(args.device)
    utils.set_seed(args.seed)
    if utils.is_main_process():
        utils.save_config(config, os.path.join(args.output_dir, 'config.yaml'))

    train_set, test_set = create_dataset('grounding', config)
    train_loader = resume.train_loader(train_set, config['batch_size'], config['num_workers'],
                                       seed=args.seed)
    samplers = (create_sampler([test_set], [False], utils.get_world_size(), utils.get_rank())
                if args.distributed else [None])
    test_loader, = create_loader([test_set], samplers, batch_size=[config['batch_size']],
                                 num_workers=[config['num_workers']], is_trains=[False],
                                 collate_fns=[None])
    refer = load_refer(config['refcoco_data'], 'refcoco+', 'unc')
    with open(config['det_file'], encoding='utf-8') as f:
        dets = json.load(f)

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
    accuracy = None
    for epoch in range(start_epoch, 1 if args.evaluate else max_epoch):
        train_stats = {}
        if not args.evaluate:
            train_stats = run.train_epoch(epoch, lambda start_step: train_one_epoch(
                model, train_loader, optimizer, lr_scheduler, epoch, device, config, train_step,
                warmup_steps=100 * warmup_epochs, warm_up=config['warm_up'],
                print_freq=config['print_freq'], stats_fmt=None, start_step=start_step, hooks=run))
        results = localise(model_without_ddp, test_loader, tokenizer, device, args.gradcam_mode,
                           args.block_num)
        accuracy = grounding_eval(results, dets, refer, alpha=0.5)
        logger.info('epoch %d grounding accuracy %s', epoch, accuracy)
        utils.append_log(args.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()},
                                           **accuracy, 'epoch': epoch})
        if not args.evaluate:
            # every rank scores the same merged maps
            if run.improved(epoch, accuracy['val_d']):
                utils.save_checkpoint({'model': model_without_ddp.state_dict(),
                                       'optimizer': optimizer.state_dict(),
                                       'lr_scheduler': lr_scheduler.state_dict(),
                                       'config': config, 'epoch': epoch},
                                      os.path.join(args.output_dir, 'checkpoint_best.pth'))
            lr_scheduler.step(epoch + warmup_epochs + 1)
            run.end_epoch(epoch)
        utils.barrier()

    if run.best_epoch is not None:
        logger.info('best epoch: %d (val_d %.4f)', run.best_epoch, run.best_value)
        utils.append_log(args.output_dir, {'best_epoch': run.best_epoch})
    utils.destroy_distributed()
    return {'accuracy': accuracy, 'best_epoch': run.best_epoch}


if __name__ == '__main__':
    utils.run(main)
