"""Pre-training step: the plain path (the original computation) against the fast path, same run.

The full-size ALBEF of configs/Pretrain.yaml (ViT-B/16 at 256 px, BERT-base split 6 + 6, queue
65,536) with random weights, random images and captions, a few AdamW steps at a small batch on
the available device. The plain path is fast_train: false with AdamW as configured (the
original's computation); the fast path is fast_train with the fused AdamW kernel. Prints seconds
per step (forward + backward + optimiser step; median over the timed steps, the two paths
interleaved; wall clock and process CPU time, which a shared machine disturbs less), samples per
second, the ratios, the model FLOPs
utilisation against a matrix-multiply peak measured in the same run, and memory: activations
(held from the end of the forward to the backward) and the step's peak above the model and
optimiser state, for both paths and with activation checkpointing (grad_checkpointing).
Memory is RSS on CPU (read from /proc in a child process whose allocator returns freed memory
to the OS) and allocated bytes on GPU.

    python -m benchmarks.bench_train_step --batch 2 --steps 3
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import types

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine import set_grad_checkpointing
from models.model_pretrain import ALBEF
from optim import create_optimizer
from utils import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOKENIZER = types.SimpleNamespace(pad_token_id=0, cls_token_id=101, sep_token_id=102,
                                  mask_token_id=103)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def build(args, device):
    torch.manual_seed(0)
    config = load_config(os.path.join(ROOT, args.config))
    config['bert_config'] = os.path.join(ROOT, config['bert_config'])
    model = ALBEF(config=config, text_encoder=None, tokenizer=TOKENIZER, init_deit=False)
    model = model.to(device).train()
    # Plain: AdamW as configured (the original's per-tensor loop); fast: the fused kernel.
    # Two optimisers with their own state over the same weights.
    optimizers = {'plain': create_optimizer(config['optimizer'], model),
                  'fast': create_optimizer({**config['optimizer'], 'fused': True}, model)}
    g = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, 3, config['image_res'], config['image_res'], generator=g)
    lengths = torch.randint(config['max_tokens'] * 2 // 3, config['max_tokens'] + 1,
                            (args.batch,), generator=g)
    lengths[0] = config['max_tokens']  # padded to the longest caption, as the tokenizer does
    atts = (torch.arange(config['max_tokens'])[None] < lengths[:, None]).long()
    with open(config['bert_config']) as f:
        vocab_size = json.load(f)['vocab_size']
    ids = torch.randint(104, vocab_size, atts.shape, generator=g) * atts
    ids[:, 0] = TOKENIZER.cls_token_id
    text = types.SimpleNamespace(input_ids=ids.to(device), attention_mask=atts.to(device))
    return model, optimizers, image.to(device), text, config


def clocks(device):
    sync(device)
    return time.perf_counter(), time.process_time()


def train_step(model, optimizers, image, text, path, after_forward=None):
    """One step of `path` ('plain' or 'fast'); returns (wall, CPU) seconds of forward +
    backward and of the optimiser step."""
    model.fast_train = path == 'fast'
    optimizer = optimizers[path]
    device = image.device
    optimizer.zero_grad(set_to_none=True)
    start = clocks(device)
    loss = sum(model(image, text, alpha=0.4))
    if after_forward:
        after_forward()
    loss.backward()
    middle = clocks(device)
    optimizer.step()
    end = clocks(device)
    return [[m - s for m, s in zip(middle, start)], [e - m for e, m in zip(end, middle)]]


def matmul_peak(device, n=2048, reps=5):
    """Best FLOP/s of an n x n float32 matrix product (the same threads as the training)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float('inf')
    for _ in range(reps + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


class RSSSampler:
    """Peak resident set size while running, sampled from /proc/self/statm (CPU)."""

    def __init__(self, interval=0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss():
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def measure_memory(args):
    """Child process: activation and peak step memory (MB) of each configuration."""
    device = torch.device(args.device)
    model, optimizers, image, text, _ = build(args, device)
    for path in optimizers:  # AdamW states exist from here on
        train_step(model, optimizers, image, text, path)
    results = {}
    for name, path, checkpointing in (('plain', 'plain', False), ('fast', 'fast', False),
                                      ('plain + checkpointing', 'plain', True),
                                      ('fast + checkpointing', 'fast', True)):
        set_grad_checkpointing(model, checkpointing)
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        if device.type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            marks = {}
            train_step(model, optimizers, image, text, path,
                       lambda: marks.update(forward=torch.cuda.memory_allocated()))
            peak = torch.cuda.max_memory_allocated()
        else:
            before, marks = RSSSampler.rss(), {}
            with RSSSampler() as sampler:
                train_step(model, optimizers, image, text, path,
                           lambda: marks.update(forward=RSSSampler.rss()))
            peak = sampler.peak
        results[name] = {'activations_mb': (marks['forward'] - before) / 2 ** 20,
                         'step_peak_mb': (peak - before) / 2 ** 20}
    results['process_max_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print('MEMORY ' + json.dumps(results), flush=True)


def memory_in_child(args):
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536'}  # freed tensors leave the RSS
    cmd = [sys.executable, '-m', 'benchmarks.bench_train_step', '--memory_child',
           '--batch', str(args.batch), '--device', args.device, '--config', args.config]
    if args.threads:
        cmd += ['--threads', str(args.threads)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith('MEMORY '))[7:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--steps', type=int, default=3, help='timed steps per path')
    parser.add_argument('--config', default='configs/Pretrain.yaml')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads (default: torch\'s); 1 gives the steadiest figures on '
                             'a shared machine')
    parser.add_argument('--skip_memory', action='store_true')
    parser.add_argument('--profile', action='store_true',
                        help='print the top operators of one step of each path')
    parser.add_argument('--memory_child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return measure_memory(args)

    device = torch.device(args.device)
    model, optimizers, image, text, config = build(args, device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'device {device}, threads {torch.get_num_threads()}, batch {args.batch}, image '
          f'{config["image_res"]} px, caption {text.input_ids.shape[1]} tokens, queue '
          f'{config["queue_size"]}, {n_params / 1e6:.0f}M trainable parameters', flush=True)
    print('plain: fast_train false + AdamW as configured; fast: fast_train + fused AdamW')

    # Warm-up step of each path, counting its FLOPs (forward + backward).
    flops = {}
    for path in ('plain', 'fast'):
        with FlopCounterMode(display=False) as counter:
            train_step(model, optimizers, image, text, path)
        flops[path] = counter.get_total_flops()
    peak = matmul_peak(device)

    # Per path: [(wall, CPU) of forward + backward, (wall, CPU) of the optimiser step] per step.
    runs = {'plain': [], 'fast': []}
    for _ in range(args.steps):  # interleaved, so load changes on a shared machine hit both
        for path in ('plain', 'fast'):
            runs[path].append(train_step(model, optimizers, image, text, path))
            (fb_wall, fb_cpu), (opt_wall, opt_cpu) = runs[path][-1]
            print(f'  {path} step: {fb_wall + opt_wall:.2f} s wall ({fb_wall:.2f} forward + '
                  f'backward, {opt_wall:.2f} AdamW), {fb_cpu + opt_cpu:.2f} s CPU', flush=True)

    def median(path, part=None, clock=0):
        parts = (0, 1) if part is None else (part,)
        return statistics.median(sum(step[p][clock] for p in parts) for step in runs[path])

    print(f'matrix-multiply peak (2048^2 float32): {peak / 1e9:.1f} GFLOP/s')
    print('MFU counts the plain path\'s FLOPs (the work of the original step) for both paths.')
    for path in ('plain', 'fast'):
        t = median(path)
        print(f'{path:5s}: {t:7.2f} s/step  {args.batch / t:6.3f} samples/s  '
              f'counted {flops[path] / 1e12:.3f} TFLOP/step  MFU {flops["plain"] / t / peak:.1%}  '
              f'(CPU time {median(path, clock=1):.2f} s: forward + backward '
              f'{median(path, 0, 1):.2f} s, AdamW {median(path, 1, 1):.2f} s)')
    for clock, label in ((0, 'wall clock'), (1, 'process CPU time')):
        print(f'speed-up fast vs plain ({label}): {median("plain", clock=clock) / median("fast", clock=clock):.2f}x '
              f'per step, {median("plain", 0, clock) / median("fast", 0, clock):.2f}x forward + backward')

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for path in ('plain', 'fast'):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                train_step(model, optimizers, image, text, path)
            print(f'--- {path}\n' + prof.key_averages().table(sort_by='self_cpu_time_total',
                                                              row_limit=15))

    if not args.skip_memory:
        del model, optimizers
        memory = memory_in_child(args)
        unit = 'RSS' if device.type == 'cpu' else 'allocated'
        print(f'memory ({unit}, MB above the model and AdamW state; separate process):')
        for name, m in memory.items():
            if isinstance(m, dict):
                print(f'  {name:22s} activations {m["activations_mb"]:8.0f}   '
                      f'step peak {m["step_peak_mb"]:8.0f}')
        for path in ('plain', 'fast'):
            saved = 1 - (memory[f'{path} + checkpointing']['activations_mb']
                         / memory[path]['activations_mb'])
            print(f'  activation checkpointing saves {saved:.0%} of the {path} path\'s '
                  'activation memory')
        print(f'  process max RSS (memory run): {memory["process_max_rss_mb"]:.0f} MB')


if __name__ == '__main__':
    main()
