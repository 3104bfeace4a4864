r"""Visual entailment fine-tuning and evaluation on SNLI-VE (paper section 5.2).

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

import engine
import utils
from dataset import create_dataset
from models.model_ve import ALBEF
from models.tokenization_bert import BertTokenizer

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
    args = utils.get_args_parser(__doc__).parse_args(argv)
    run = engine.setup(args, 've')
    config = run.config

    train_set, val_set, test_set = create_dataset('ve', config)
    train_loader = run.train_loader(train_set, config['batch_size_train'])
    val_loader, test_loader = run.eval_loaders([val_set, test_set], config['batch_size_test'])

    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, text_encoder=config['text_encoder'], tokenizer=tokenizer)
    run.prepare(model, train_loader)  # options, optimiser, schedule, starting weights, DDP
    train_step, predict = make_steps(tokenizer, run.device)

    val_acc = test_acc = None
    for epoch in run.epochs():
        # NOTE(faithful): configs/VE.yaml turns the epoch-0 alpha ramp off (warm_up: false).
        train_stats = run.train_epoch(epoch, train_step)
        val_acc = run.evaluate_accuracy(val_loader, predict, header='Validation:')
        test_acc = run.evaluate_accuracy(test_loader, predict, header='Test:')
        logger.info('epoch %d: val acc %.4f, test acc %.4f', epoch, val_acc, test_acc)
        run.log(epoch, train_stats, val_acc=val_acc, test_acc=test_acc)
        # the same accuracy on every rank (counts are gathered)
        run.end_epoch(epoch, metric=val_acc, best_file='checkpoint_best.pth')
    run.finish('val acc')
    return {'val_acc': val_acc, 'test_acc': test_acc, 'best_epoch': run.best_epoch}


if __name__ == '__main__':
    utils.run(main)
