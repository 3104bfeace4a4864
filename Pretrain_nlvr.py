r"""Text-assignment (TA) pre-training for NLVR2 (paper section 5.3): one epoch on the pre-training
images that teaches the two-image encoder which image of a pair a caption describes. Starts from
a pre-training checkpoint; its output starts NLVR.py.

One node, 8 GPUs:
    torchrun --nproc_per_node=8 Pretrain_nlvr.py --config configs/NLVR_pretrain.yaml \
        --output_dir output/nlvr_pretrain --checkpoint ALBEF.pth
Continue a killed run where its newest checkpoint in --output_dir left it: the same command
with --resume.
On the synthetic data:
    python Pretrain_nlvr.py --config configs/tiny/NLVR_pretrain.yaml \
        --output_dir output/nlvr_pretrain_tiny --checkpoint output/pretrain_tiny/checkpoint_07.pth
"""
import logging

import engine
import utils
from dataset import create_dataset
from models.model_pretrain_nlvr import ALBEF
from models.tokenization_bert import BertTokenizer

logger = logging.getLogger('albef.pretrain_nlvr')

MAX_TOKENS = 25  # captions are truncated as in pre-training


def make_train_step(tokenizer, device):
    def train_step(model, batch, alpha):
        image, captions = batch
        text = tokenizer(list(captions), padding='longest', truncation=True,
                         max_length=MAX_TOKENS, return_tensors='pt').to(device)
        return {'loss': model(image.to(device, non_blocking=True), text)}
    return train_step


def main(argv=None):
    args = utils.get_args_parser(__doc__, evaluate=False).parse_args(argv)
    run = engine.setup(args, 'pretrain_nlvr')
    config = run.config

    dataset = create_dataset('pretrain', config)
    train_loader = run.train_loader(dataset, config['batch_size'])

    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, text_encoder=config['text_encoder'], tokenizer=tokenizer)
    # text_proj and temp take no part in the loss: DDP must not wait for their gradients.
    run.prepare(model, train_loader, find_unused_parameters=True)
    train_step = make_train_step(tokenizer, run.device)

    logger.info('text-assignment pre-training for %d epochs, %d steps per epoch',
                config['schedular']['epochs'], len(train_loader))
    train_stats = {}
    for epoch in run.epochs():
        train_stats = run.train_epoch(epoch, train_step)
        run.log(epoch, train_stats)
        run.end_epoch(epoch)  # checkpoint_NN.pth
    run.finish()
    return train_stats


if __name__ == '__main__':
    utils.run(main)
