r"""Weakly-supervised visual grounding on RefCOCO+ (paper section 4.4): retrieval-style
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
import logging

import engine
import utils
from dataset import create_dataset
from dataset.grounding_dataset import load_dets, load_refer
from dataset.grounding_eval import check_inputs, grounding_eval
from models.gradcam import gradcam
from models.model_retrieval import ALBEF
from models.tokenization_bert import BertTokenizer

logger = logging.getLogger('albef.grounding')


def make_train_step(tokenizer, device):
    """Retrieval's training on (image, expression, image id): ITC with image ids as positives,
    ITM with hard negatives."""
    def train_step(model, batch, alpha):
        image, expressions, image_ids = batch
        text = tokenizer(list(expressions), padding='longest', return_tensors='pt').to(device)
        return dict(zip(('loss_ita', 'loss_itm'), model(image.to(device), text, alpha=alpha,
                                                        idx=image_ids.to(device))))
    return train_step


def localise(model, data_loader, tokenizer, device, mode, block_num, print_freq=50):
    """Grad-CAM map (on the patch grid) of every test expression: [{'ref_id', 'pred'}]."""
    model.eval()
    results = []
    metric_logger = utils.MetricLogger(delimiter='  ')
    for image, text, ref_ids in metric_logger.log_every(data_loader, print_freq, 'Grad-CAM:'):
        text_input = tokenizer(list(text), padding='longest', return_tensors='pt').to(device)
        cam = gradcam(model, image.to(device), text_input.input_ids, text_input.attention_mask,
                      mode=mode, block_num=block_num)
        results += [{'ref_id': int(ref_id), 'pred': cam_map.float().cpu()}
                    for ref_id, cam_map in zip(ref_ids, cam.maps)]
    model.zero_grad(set_to_none=True)
    # The distributed sampler pads with duplicates: keep each expression once.
    merged = {}
    for part in utils.all_gather_objects(results):
        merged.update((r['ref_id'], r) for r in part)
    return list(merged.values())


def main(argv=None):
    parser = utils.get_args_parser(__doc__)
    parser.add_argument('--gradcam_mode', default='itm', choices=['itm', 'itc'],
                        help='Grad-CAM of the ITM score (text-encoder cross-attention) or of the '
                             'ITC similarity (ViT self-attention)')
    parser.add_argument('--block_num', default=8, type=int,
                        help='text-encoder layer (itm) or ViT block (itc) whose attention is used')
    args = parser.parse_args(argv)
    run = engine.setup(args, 'grounding')
    config = run.config

    train_set, test_set = create_dataset('grounding', config)
    refer = load_refer(config['refcoco_data'], 'refcoco+', 'unc')
    dets = load_dets(config['det_file'])
    splits = check_inputs(test_set, refer, dets, test_file=config['test_file'],
                          det_file=config['det_file'])
    if not run.evaluating and not splits['val']:
        # NOTE(fixed): the original divided by zero after the first epoch; val_d would be nan
        # here and checkpoint_best.pth silently never written.
        raise utils.ConfigError(
            f"test_file {config['test_file']} holds no expression of the REFER 'val' split: "
            "training keeps checkpoint_best.pth by val accuracy (val_d), so test_file must include "
            "the val expressions (--evaluate alone scores whichever splits it holds)")
    train_loader = run.train_loader(train_set, config['batch_size'])
    test_loader, = run.eval_loaders([test_set], config['batch_size'])

    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    model = ALBEF(config=config, text_encoder=config['text_encoder'], tokenizer=tokenizer)
    run.prepare(model, train_loader)  # options, optimiser, schedule, starting weights, DDP
    train_step = make_train_step(tokenizer, run.device)

    accuracy = None
    for epoch in run.epochs():
        train_stats = run.train_epoch(epoch, train_step)
        with run.autocast():
            results = localise(model, test_loader, tokenizer, run.device, args.gradcam_mode,
                               args.block_num, config['print_freq'])
        accuracy = grounding_eval(results, dets, refer, alpha=0.5)
        logger.info('epoch %d grounding accuracy %s', epoch, accuracy)
        run.log(epoch, train_stats, **accuracy)
        # every rank scores the same merged maps
        run.end_epoch(epoch, metric=accuracy['val_d'], best_file='checkpoint_best.pth')
    run.finish('val_d')
    return {'accuracy': accuracy, 'best_epoch': run.best_epoch}


if __name__ == '__main__':
    utils.run(main)
