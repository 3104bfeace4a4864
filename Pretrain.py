r"""ALBEF pre-training: ITC + ITM + MLM with momentum distillation (paper section 3).

One process (CPU or one GPU):
    python Pretrain.py --config configs/tiny/Pretrain.yaml --output_dir output/pretrain_tiny
One node, 8 GPUs:
    torchrun --nproc_per_node=8 Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain
Several nodes (run on each, node_rank 0..N-1):
    torchrun --nnodes=N --node_rank=R --master_addr=HOST --master_port=29500 --nproc_per_node=8 \
        Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain
Continue a killed run exactly where its newest checkpoint in --output_dir left it
(`checkpoint_every_steps` in the config adds checkpoints inside epochs):
    ... Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain --resume
Start from the weights of a checkpoint (e.g. the released ALBEF.pth):
    ... Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain --checkpoint ALBEF.pth
"""
import logging

import engine
import utils
from dataset import create_dataset
from models.model_pretrain import ALBEF
from models.tokenization_bert import BertTokenizer

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


def main(argv=None):
    args = utils.get_args_parser(__doc__, evaluate=False).parse_args(argv)
    run = engine.setup(args, 'pretrain')
    config = run.config

    dataset = create_dataset('pretrain', config)
    train_loader = run.train_loader(dataset, config['batch_size'])

    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, text_encoder=config['text_encoder'], tokenizer=tokenizer,
                  init_deit=config['init_deit'])
    run.prepare(model, train_loader)  # options, optimiser, schedule, starting weights, DDP
    train_step = make_train_step(tokenizer, config, run.device)

    logger.info('pre-training for %d epochs, %d steps per epoch', config['schedular']['epochs'],
                len(train_loader))
    train_stats = {}
    for epoch in run.epochs():
        train_stats = run.train_epoch(epoch, train_step)
        run.log(epoch, train_stats)
        run.end_epoch(epoch)  # checkpoint_NN.pth
    run.finish()
    return train_stats


if __name__ == '__main__':
    utils.run(main)
