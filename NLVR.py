r"""NLVR2 fine-tuning and evaluation (paper section 5.3): is a sentence true of a pair of images?
Starts from the text-assignment checkpoint written by Pretrain_nlvr.py.

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

import torch

import engine
import utils
from dataset import create_dataset
from models.model_nlvr import ALBEF
from models.tokenization_bert import BertTokenizer

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
    args = utils.get_args_parser(__doc__).parse_args(argv)
    run = engine.setup(args, 'nlvr')
    config = run.config

    train_set, dev_set, test_set = create_dataset('nlvr', config)
    train_loader = run.train_loader(train_set, config['batch_size'])
    dev_loader, test_loader = run.eval_loaders([dev_set, test_set], config['batch_size'])

    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    # NOTE(faithful): the momentum models keep the copy made at construction (before the
    # text-assignment weights load), as in the original; they catch up through the EMA.
    model = ALBEF(config=config, text_encoder=config['text_encoder'], tokenizer=tokenizer)
    run.prepare(model, train_loader)  # options, optimiser, schedule, starting weights, DDP
    train_step, predict = make_steps(tokenizer, run.device)

    dev_acc = test_acc = None
    for epoch in run.epochs():
        train_stats = run.train_epoch(epoch, train_step)
        dev_acc = run.evaluate_accuracy(dev_loader, predict, header='Dev:')
        test_acc = run.evaluate_accuracy(test_loader, predict, header='Test:')
        logger.info('epoch %d: dev acc %.4f, test acc %.4f', epoch, dev_acc, test_acc)
        run.log(epoch, train_stats, dev_acc=dev_acc, test_acc=test_acc)
        # NOTE(faithful): one file per improving epoch, named by the epoch.
        run.end_epoch(epoch, metric=dev_acc, best_file=f'checkpoint_{epoch:02d}.pth')
    run.finish('dev acc')
    return {'dev_acc': dev_acc, 'test_acc': test_acc, 'best_epoch': run.best_epoch}


if __name__ == '__main__':
    utils.run(main)
