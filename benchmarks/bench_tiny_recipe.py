"""The demo's tiny pre-training step, BERT dropout off (configs/tiny) against on (BERT's 0.1);
the loading of its samples, per-sample seeding of the CPU generator against torch.manual_seed;
and its VQA fine-tuning step, the same questions in batches of 32 (configs/tiny/VQA.yaml)
against two batches of 16 (the recipe before). Each pair timed in the same run, interleaved.

Reads the synthetic data of `python demo.py` (data/synthetic: run its `data` stage first) and
configs/tiny/Pretrain.yaml and VQA.yaml, with random initial weights. Prints seconds per step
(median over the timed steps; forward + backward + AdamW step, batch_size of the config),
milliseconds per batch of samples and seconds per 1,000 VQA questions, with the ratios.

    python -m benchmarks.bench_tiny_recipe --steps 10
"""
import argparse
import copy
import random
import statistics
import time

import numpy as np
import torch

import dataset.loaders as loaders
import VQA
from dataset import create_dataset, vqa_collate_fn
from models.albef_base import load_bert_config
from models.model_pretrain import ALBEF
from models.model_vqa import ALBEF as VQAModel
from models.tokenization_bert import BertTokenizer
from utils import load_config, with_defaults


def torch_manual_seed_all(seed):
    """The seeding before: torch.manual_seed (every device's generator), numpy, python."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default='configs/tiny/Pretrain.yaml')
    parser.add_argument('--steps', type=int, default=10, help='timed steps per variant')
    parser.add_argument('--batches', type=int, default=20, help='timed batches per seeding')
    parser.add_argument('--vqa_config', default='configs/tiny/VQA.yaml')
    args = parser.parse_args()

    config = with_defaults(load_config(args.config), 'pretrain')
    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    data = create_dataset('pretrain', config)
    batch_size = config['batch_size']

    # Sample loading: the same (index, seed) items through SeededDataset, both seedings.
    items = list(loaders.ResumableSampler(data))[:args.batches * batch_size]
    seeded, seedings = loaders.SeededDataset(data), {'cpu generator': loaders._seed_all,
                                                    'torch.manual_seed': torch_manual_seed_all}
    load_ms = {name: [] for name in seedings}
    for start in range(0, len(items), batch_size):
        for name, seed_all in seedings.items():
            loaders._seed_all = seed_all
            began = time.perf_counter()
            for item in items[start:start + batch_size]:
                seeded[item]
            load_ms[name].append(1000 * (time.perf_counter() - began))
    loaders._seed_all = seedings['cpu generator']

    # Training steps: one model per dropout setting, the same starting weights and batches.
    bert = load_bert_config(config)
    with_dropout = copy.deepcopy(bert)
    with_dropout.hidden_dropout_prob = with_dropout.attention_probs_dropout_prob = 0.1
    variants = {}
    for name, bert_config in (('configured', bert), ('dropout 0.1', with_dropout)):
        torch.manual_seed(0)
        model = ALBEF(config={**config, 'bert_config': bert_config}, text_encoder=None,
                      tokenizer=tokenizer, init_deit=False)
        model.train()
        variants[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    batches = [batch for batch, _ in zip(loader, range(args.steps + 2))]
    step_s = {name: [] for name in variants}
    for i, (image, captions) in enumerate(batches):
        text = tokenizer(list(captions), padding='longest', truncation=True,
                         max_length=config['max_tokens'], return_tensors='pt')
        for name, (model, optimizer) in variants.items():
            began = time.perf_counter()
            loss = sum(model(image, text, alpha=config['alpha']))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if i >= 2:  # the first two steps warm up allocators and kernels
                step_s[name].append(time.perf_counter() - began)

    print(f'BERT dropout as configured: {bert.hidden_dropout_prob}; {torch.get_num_threads()} threads')
    steps = {name: statistics.median(v) for name, v in step_s.items()}
    for name, value in steps.items():
        print(f'pre-training step, {name:<12} {value:.3f} s')
    print(f'  ratio dropout 0.1 / configured: {steps["dropout 0.1"] / steps["configured"]:.2f}')
    loads = {name: statistics.median(v) for name, v in load_ms.items()}
    for name, value in loads.items():
        print(f'loading {batch_size} samples, {name:<17} {value:.1f} ms')
    print(f'  ratio torch.manual_seed / cpu generator: '
          f'{loads["torch.manual_seed"] / loads["cpu generator"]:.2f}')
    vqa_per_question(args)


def vqa_per_question(args):
    """Seconds per 1,000 training questions: one step on a batch of the config's size against
    two steps on its halves (the same questions), interleaved."""
    config = with_defaults(load_config(args.vqa_config), 'vqa')
    tokenizer = BertTokenizer.from_pretrained(config['tokenizer'])
    train_set = create_dataset('vqa', config)[0]
    batch_size = config['batch_size_train']
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True,
                                         collate_fn=vqa_collate_fn,
                                         generator=torch.Generator().manual_seed(0))
    batches = [batch for batch, _ in zip(loader, range(args.steps + 2))]
    half = batch_size // 2

    def halves(batch):  # the first and second half of a collated batch, as two batches
        image, questions, answers, weights, counts = batch
        cut = sum(counts[:half])
        return [(image[:half], questions[:half], answers[:cut], weights[:cut], counts[:half]),
                (image[half:], questions[half:], answers[cut:], weights[cut:], counts[half:])]

    train_step = VQA.make_train_step(tokenizer, 'cpu')
    models = {}
    for name in (f'batches of {batch_size}', f'batches of {half}'):
        torch.manual_seed(0)
        model = VQAModel(config=config, text_encoder=None, text_decoder=None, tokenizer=tokenizer)
        model.train()
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    per_question = {name: [] for name in models}
    for i, batch in enumerate(batches):
        for (name, (model, optimizer)), parts in zip(models.items(), ([batch], halves(batch))):
            began = time.perf_counter()
            for part in parts:
                loss = train_step(model, part, config['alpha'])['loss']
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if i >= 2:
                per_question[name].append(1000 * (time.perf_counter() - began) / batch_size)
    seconds = {name: statistics.median(v) for name, v in per_question.items()}
    for name, value in seconds.items():
        print(f'VQA training, {name:<15} {value:.2f} s per 1,000 questions')
    small, large = seconds[f'batches of {half}'], seconds[f'batches of {batch_size}']
    print(f'  ratio batches of {batch_size} / batches of {half}: {large / small:.2f}')


if __name__ == '__main__':
    main()
