"""The CUDA path measured in one call: environment, the CUDA tests, training steps, retrieval.

Sections (`--sections`, in this order; each one guarded, so a failure is recorded and the next
runs; the results are written to `--out` as JSON after every section and every variant, so a
run stopped by a time limit keeps what it measured; a short table is printed last):

- environment: device, torch / CUDA / cuDNN / timm / transformers versions, the optional
  modules the repository imports, and the matrix-multiply peaks measured here (bf16, fp32 with
  TF32 off and on: n^3 products timed with CUDA events), which MFU is measured against;
- tests: `pytest -q tests/test_cuda.py` in a child process (counts, each test's outcome, the
  end of its output);
- pretrain: the full-size pre-training step of configs/Pretrain.yaml (ViT-B/16 at 256 px, BERT
  6 + 6, queue 65,536, random weights, random images and captions, as
  benchmarks/bench_train_step.py builds it: no tokenizer, no downloads) at --batch per GPU, in
  the variants plain fp32 (fast_train false, AdamW as configured = torch's foreach kernel,
  TF32 off), fast fp32 (fast_train, fused AdamW, TF32 off), fast tf32 (TF32 on), fast bf16
  (autocast), fast bf16 + compile (engine.compile_layers) and + grad_checkpointing: median
  s/step over --steps timed steps after --warmup, images/s, peak allocated memory, MFU =
  the plain step's counted FLOPs (forward + backward, FlopCounterMode) / time / measured bf16
  peak, the ratio to plain fp32, and the host syncs of one step of plain fp32 and fast bf16;
- vqa: the VQA fine-tuning step of configs/VQA.yaml (384 px, answer decoder, random weights),
  plain fp32 against fast bf16: s/step and memory;
- retrieval: the retrieval evaluation of models/retrieval_eval.py on a Flickr30K-sized split
  (--images, --captions, --k_test) with the Flickr30K model (384 px, random weights), the
  original loop (fast_eval false) against the fast path, in fp32 (TF32 off) and bf16: seconds,
  ratio, largest score difference, and whether the recalls are equal.

    python -m benchmarks.gpu_check                        # one H200: well under 9 minutes
    python -m benchmarks.gpu_check --smoke --device cpu   # every section, tiny configs, CPU

`--smoke` runs every section with the tiny configs of configs/tiny (patch 8, 64 px), a batch of
4, one timed step and a few images: it exercises the script (tests/test_gpu_check.py), its
numbers mean nothing. The issue's targets are printed beside the measured figures.
"""
import argparse
import contextlib
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import types
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ('environment', 'tests', 'pretrain', 'vqa', 'retrieval')
VARIANTS = {  # name: (fast_train, fused AdamW, precision, TF32, compile, grad_checkpointing)
    'plain_fp32': (False, False, 'fp32', False, False, False),
    'fast_fp32': (True, True, 'fp32', False, False, False),
    'fast_tf32': (True, True, 'fp32', True, False, False),
    'fast_bf16': (True, True, 'bf16', True, False, False),
    'fast_bf16_compile': (True, True, 'bf16', True, True, False),
    'fast_bf16_compile_ckpt': (True, True, 'bf16', True, True, True),
}
TARGETS = {'compile_speedup': 3.0, 'mfu': 0.35, 'retrieval_speedup': 5.0}
OPTIONAL_MODULES = ('ruamel.yaml', 'cv2', 'PIL', 'numpy', 'safetensors', 'tokenizers',
                    'webdataset', 'tensorboard', 'pytest', 'pytest_timeout', 'triton')
SYNC_MESSAGE = 'synchroniz'  # torch's sync debug mode: "called a synchronizing CUDA operation"


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def default_out():
    return os.path.join(os.environ['OUT'], 'gpu_check.json') if os.environ.get('OUT') \
        else 'gpu_check.json'


def is_cuda(device):
    return torch.device(device).type == 'cuda'


def sync(device):
    if is_cuda(device):
        torch.cuda.synchronize()


def set_tf32(enabled):
    """TF32 for float32 matrix products and cuDNN convolutions (the patch embedding), through
    the legacy flags only: mixing them with torch's newer fp32_precision flags is an error."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def tf32_state():
    return {'matmul': torch.backends.cuda.matmul.allow_tf32,
            'cudnn': torch.backends.cudnn.allow_tf32}


def gb(nbytes):
    return None if nbytes is None else nbytes / 2 ** 30


def reset_memory(device):
    if is_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device):
    return torch.cuda.max_memory_allocated() if is_cuda(device) else None


def allocated(device):
    return torch.cuda.memory_allocated() if is_cuda(device) else None


def time_steps(step, steps, device):
    """Seconds of each of `steps` back-to-back calls of `step` (CUDA events between the
    steps, one synchronisation at the end: the device's pace, with no host wait added)."""
    if is_cuda(device):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            step()
            events[i + 1].record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000 for a, b in zip(events, events[1:])]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def _repo_frames(stack):
    """The repository's frames of a Python stack, innermost first (this file excluded)."""
    here = os.path.abspath(__file__)
    frames = [f for f in reversed(stack)
              if os.path.abspath(f.filename).startswith(ROOT + os.sep)
              and os.path.abspath(f.filename) != here]
    return ' <- '.join(f'{os.path.relpath(f.filename, ROOT)}:{f.lineno}' for f in frames[:4])


@contextlib.contextmanager
def host_syncs():
    """The host synchronisations torch's CUDA sync debug mode reports inside the block: a
    list, filled on exit, of where each happened (the repository's frames of the Python stack
    when it was reported; syncs in backward are reported at the `.backward()` call)."""
    import traceback as tb
    found, stacks = [], []
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter('always')
        original = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if SYNC_MESSAGE in str(message):
                stacks.append(_repo_frames(tb.extract_stack()[:-1]) or f'{filename}:{lineno}')
            else:
                original(message, category, filename, lineno, file, line)
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode('warn')
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            warnings.showwarning = original
    found.extend(stacks)


def median(values):
    return statistics.median(values) if values else None


def error_record(error):
    return {'status': 'error', 'error': f'{type(error).__name__}: {error}',
            'traceback': traceback.format_exc()[-3000:]}


class Results:
    """The JSON record, rewritten (atomically) after every change."""

    def __init__(self, path, meta):
        self.path, self.data = path, {'meta': meta}
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.save()

    def save(self):
        tmp = self.path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def section(self, name):
        return self.data.setdefault(name, {'status': 'running'})


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------

def matmul_tflops(device, dtype, n, reps):
    """Median TFLOP/s of an n x n x n product in `dtype` (random operands)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    sync(device)
    times = time_steps(lambda: a @ b, reps, device)
    return 2 * n ** 3 / median(times) / 1e12


def module_version(name):
    try:
        module = importlib.import_module(name)
    except Exception as error:  # any failure to import is what we want to know
        return f'missing ({type(error).__name__})'
    return getattr(module, '__version__', 'present')


def environment(args, record):
    device = torch.device(args.device)
    record.update(python=platform.python_version(), torch=torch.__version__,
                  cuda=torch.version.cuda, device=str(device),
                  modules={name: module_version(name) for name in ('timm', 'transformers')
                           + OPTIONAL_MODULES})
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        record.update(name=props.name, capability=f'{props.major}.{props.minor}',
                      memory_gb=gb(props.total_memory), multiprocessors=props.multi_processor_count,
                      cudnn=torch.backends.cudnn.version(),
                      sdpa={'flash': torch.backends.cuda.flash_sdp_enabled(),
                            'mem_efficient': torch.backends.cuda.mem_efficient_sdp_enabled(),
                            'math': torch.backends.cuda.math_sdp_enabled()})
        try:
            query = '--query-gpu=driver_version,clocks.sm,clocks.max.sm'
            smi = subprocess.run(['nvidia-smi', query, '--format=csv,noheader'],
                                 capture_output=True, text=True, timeout=20)
            record['nvidia_smi'] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            record['nvidia_smi'] = f'unavailable ({type(error).__name__})'
    else:
        record.update(name=platform.processor() or platform.machine(),
                      threads=torch.get_num_threads())
    before = tf32_state()
    try:
        peaks = {'bf16': matmul_tflops(device, torch.bfloat16, args.matmul_n, args.matmul_reps)}
        set_tf32(False)
        peaks['fp32'] = matmul_tflops(device, torch.float32, args.matmul_n, args.matmul_reps)
        set_tf32(True)
        peaks['tf32'] = (matmul_tflops(device, torch.float32, args.matmul_n, args.matmul_reps)
                         if is_cuda(device) else peaks['fp32'])  # no TF32 on a CPU
    finally:
        set_tf32(before['matmul'])
        torch.backends.cudnn.allow_tf32 = before['cudnn']
    record.update(matmul_n=args.matmul_n, peak_tflops=peaks, tf32_default=before)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

_COUNT = re.compile(r'(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)')


def parse_pytest(output, junit):
    """({outcome: count} from pytest's summary line, {test: {outcome, seconds, message}} from
    its JUnit XML report)."""
    import xml.etree.ElementTree as ElementTree
    counts, outcomes = {}, {}
    summary = [line for line in output.splitlines() if re.search(r'\bin [\d.]+s\b', line)]
    if summary:
        for number, kind in _COUNT.findall(summary[-1]):
            counts['error' if kind.startswith('error') else kind] = int(number)
    if os.path.isfile(junit):
        for case in ElementTree.parse(junit).getroot().iter('testcase'):
            outcome, message = 'passed', ''
            for child in case:
                if child.tag in ('failure', 'error', 'skipped'):
                    outcome = {'failure': 'failed'}.get(child.tag, child.tag)
                    message = (child.get('message') or '')[:400]
            outcomes[case.get('name')] = {'outcome': outcome, 'seconds': float(case.get('time', 0)),
                                          **({'message': message} if message else {})}
    return counts, outcomes


def run_tests(args, record, deadline):
    stem = os.path.splitext(args.out)[0]
    junit = stem + '_junit.xml'
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', f'--junitxml={junit}',
           args.tests]
    if importlib.util.find_spec('pytest_timeout') is not None:  # its plugin loads itself
        cmd += ['--timeout', str(args.test_timeout)]
    timeout = max(10.0, min(args.tests_timeout, deadline - time.monotonic()))
    record.update(command=' '.join(cmd[1:]), timeout_s=timeout)
    with contextlib.suppress(FileNotFoundError):
        os.remove(junit)
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        record['returncode'] = process.returncode
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        record['returncode'] = 'timeout'
    counts, outcomes = parse_pytest(output, junit)
    record.update(counts=counts, outcomes=outcomes, output_tail=output[-6000:])
    with open(stem + '_pytest.log', 'w') as f:
        f.write(output)
    record['log'] = stem + '_pytest.log'
    if record['returncode'] not in (0, 5):  # 5: nothing collected
        record['status'] = 'failed'


# ---------------------------------------------------------------------------------------------
# pretrain
# ---------------------------------------------------------------------------------------------

def pretrain_model(args, device):
    """The pre-training ALBEF, a batch of random images and captions, its config: built as
    benchmarks/bench_train_step.py builds them (its optimisers are not used here)."""
    from benchmarks.bench_train_step import build
    model, _, image, text, config = build(types.SimpleNamespace(config=args.pretrain_config,
                                                                batch=args.batch), device)
    return model, image, text, config


def pretrain_step(model, optimizer, image, text, precision, device):
    from engine import autocast_context
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(precision, device):
        losses = model(image, text, alpha=0.4)
    sum(losses).backward()
    optimizer.step()
    return losses


def count_flops(model, image, text, fast):
    """FLOPs of the forward + backward of one step (fp32, eager) of the plain or fast path."""
    from torch.utils.flop_counter import FlopCounterMode
    model.fast_train = fast
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        sum(model(image, text, alpha=0.4)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def step_syncs(step_parts):
    """Host syncs per phase of one step: step_parts() yields after forward, backward, step."""
    counts = {}
    parts = step_parts()
    for phase in ('forward', 'backward', 'optimizer'):
        with host_syncs() as found:
            next(parts)
        counts[phase] = found
    return {'total': sum(len(v) for v in counts.values()),
            **{phase: len(v) for phase, v in counts.items()},
            'where': sorted(set(w for v in counts.values() for w in v))[:12]}


def dynamo_counters():
    """torch.compile's counts so far: graphs, graph breaks, the recompile limit per function
    (past it dynamo runs the function eagerly)."""
    from torch._dynamo import config
    from torch._dynamo.utils import counters
    return {'stats': dict(counters['stats']), 'graph_breaks': sum(counters['graph_break'].values()),
            'recompile_limit': getattr(config, 'recompile_limit',
                                       getattr(config, 'cache_size_limit', None))}


def pretrain(args, record, results, deadline):
    from engine import autocast_context, compile_layers, set_grad_checkpointing
    from optim import create_optimizer

    device = torch.device(args.device)
    model, image, text, config = pretrain_model(args, device)
    record.update(config=args.pretrain_config, batch=args.batch, image_res=config['image_res'],
                  caption_tokens=text.input_ids.shape[1], queue_size=config['queue_size'],
                  trainable_params_m=sum(p.numel() for p in model.parameters()
                                         if p.requires_grad) / 1e6,
                  steps=args.steps, warmup=args.warmup)
    set_tf32(True)  # counting only; the FLOPs do not depend on it
    record['flops_per_step'] = {'plain': count_flops(model, image, text, False),
                                'fast': count_flops(model, image, text, True)}
    results.save()
    flops = record['flops_per_step']['plain']
    peak = (results.data.get('environment', {}).get('peak_tflops') or {}).get('bf16')
    record['mfu_against'] = {'bf16_peak_tflops': peak,
                             'flops': 'the plain step\'s (the work of the original step)'}
    variants = record.setdefault('variants', {})
    compiled = False
    for name in args.variants:
        if time.monotonic() > deadline:
            variants[name] = {'status': 'skipped', 'why': 'time limit'}
            results.save()
            continue
        fast, fused, precision, tf32, compile_, checkpointing = VARIANTS[name]
        entry = variants[name] = {'status': 'running', 'fast_train': fast, 'precision': precision,
                                  'optimizer': 'AdamW fused' if fused else
                                  'AdamW as configured (torch default: foreach on CUDA)',
                                  'compile': compile_ and args.compile_backend,
                                  'grad_checkpointing': checkpointing}
        try:
            set_tf32(tf32)
            entry['tf32'] = tf32_state()
            model.fast_train = fast
            if compile_ and not compiled:
                entry['compiled_layers'] = compile_layers(model, args.compile_backend)
                compiled = True
            set_grad_checkpointing(model, checkpointing)
            optimizer = create_optimizer({**config['optimizer'], 'fused': fused}, model)
            reset_memory(device)

            def one_step():
                pretrain_step(model, optimizer, image, text, precision, device)
            start = time.perf_counter()
            for _ in range(args.warmup):  # the first compiles (with compile) and makes AdamW state
                one_step()
            sync(device)
            entry['warmup_s'] = time.perf_counter() - start
            if is_cuda(device) and name in ('plain_fp32', 'fast_bf16'):
                def parts():
                    optimizer.zero_grad(set_to_none=True)
                    with autocast_context(precision, device):
                        losses = model(image, text, alpha=0.4)
                    yield
                    sum(losses).backward()
                    yield
                    optimizer.step()
                    yield
                sync(device)
                entry['host_syncs'] = step_syncs(parts)
            sync(device)
            entry['allocated_before_steps_gb'] = gb(allocated(device))
            times = time_steps(one_step, args.steps, device)
            t = median(times)
            entry.update(step_times_s=times, s_per_step=t, images_per_s=args.batch / t,
                         peak_allocated_gb=gb(peak_memory(device)),
                         tflops_per_s=flops / t / 1e12, status='ok')
            entry['mfu'] = flops / t / (peak * 1e12) if peak else None
            plain = variants.get('plain_fp32', {}).get('s_per_step')
            entry['speedup_vs_plain_fp32'] = plain / t if plain else None
            if compile_:
                entry['dynamo'] = dynamo_counters()
        except Exception as error:
            entry.update(error_record(error))
        optimizer = None  # its state goes before the next variant's is made
        results.save()
        print(f'  pretrain {name}: {entry.get("s_per_step")} s/step ({entry["status"]})',
              flush=True)
    set_grad_checkpointing(model, False)
    model = None
    reset_memory(device)


# ---------------------------------------------------------------------------------------------
# vqa
# ---------------------------------------------------------------------------------------------

def random_ids(lengths, width, vocab_size, g, last=None):
    """Token ids (N, width): [CLS] first, random word pieces, `last` at each length's end, 0
    (padding) after; and the attention mask."""
    atts = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = torch.randint(104, vocab_size, atts.shape, generator=g) * atts
    ids[:, 0] = 101
    if last is not None:
        ids[torch.arange(len(lengths)), lengths - 1] = last
    return ids, atts


def vqa(args, record, results, deadline):
    from engine import autocast_context
    from models.model_vqa import ALBEF as VQAModel
    from optim import create_optimizer
    from utils import load_config
    from benchmarks.bench_train_step import TOKENIZER

    device = torch.device(args.device)
    config = load_config(os.path.join(ROOT, args.vqa_config))
    config['bert_config'] = os.path.join(ROOT, config['bert_config'])
    with open(config['bert_config']) as f:
        vocab_size = json.load(f)['vocab_size']
    torch.manual_seed(0)
    model = VQAModel(config=config, text_encoder=None, text_decoder=None,
                     tokenizer=TOKENIZER).to(device).train()
    g = torch.Generator().manual_seed(0)
    batch = args.vqa_batch
    image = torch.randn(batch, 3, config['image_res'], config['image_res'], generator=g)
    q_lengths = torch.randint(8, 26, (batch,), generator=g)
    q_lengths[0] = 25  # padded to the longest question (25 tokens at most, as VQA.py)
    q_ids, q_atts = random_ids(q_lengths, 25, vocab_size, g)
    counts = torch.randint(1, 5, (batch,), generator=g)  # distinct answers per question
    a_lengths = torch.randint(3, 7, (int(counts.sum()),), generator=g)
    a_ids, a_atts = random_ids(a_lengths, int(a_lengths.max()), vocab_size, g, last=102)
    weights = (1.0 / counts.float()).repeat_interleave(counts)
    question = types.SimpleNamespace(input_ids=q_ids.to(device), attention_mask=q_atts.to(device))
    answer = types.SimpleNamespace(input_ids=a_ids.to(device), attention_mask=a_atts.to(device))
    image, weights = image.to(device), weights.to(device)
    record.update(config=args.vqa_config, batch=batch, image_res=config['image_res'],
                  answers=int(counts.sum()), distill=config['distill'])
    variants = record.setdefault('variants', {})
    for name, (fast, fused, precision, tf32) in (('plain_fp32', (False, False, 'fp32', False)),
                                                  ('fast_bf16', (True, True, 'bf16', True))):
        if time.monotonic() > deadline:
            variants[name] = {'status': 'skipped', 'why': 'time limit'}
            continue
        entry = variants[name] = {'status': 'running', 'fast_train': fast, 'precision': precision,
                                  'fused_adamw': fused}
        try:
            set_tf32(tf32)
            entry['tf32'] = tf32_state()
            model.fast_train = fast
            optimizer = create_optimizer({**config['optimizer'], 'fused': fused}, model)
            reset_memory(device)

            def one_step():
                optimizer.zero_grad(set_to_none=True)
                with autocast_context(precision, device):
                    loss = model(image, question, answer, alpha=0.4, k=counts, weights=weights,
                                 train=True)
                loss.backward()
                optimizer.step()
            for _ in range(args.warmup):
                one_step()
            times = time_steps(one_step, args.steps, device)
            t = median(times)
            entry.update(step_times_s=times, s_per_step=t, images_per_s=batch / t,
                         peak_allocated_gb=gb(peak_memory(device)), status='ok')
            plain = variants.get('plain_fp32', {}).get('s_per_step')
            entry['speedup_vs_plain_fp32'] = plain / t if plain else None
        except Exception as error:
            entry.update(error_record(error))
        optimizer = None
        results.save()
        print(f'  vqa {name}: {entry.get("s_per_step")} s/step ({entry["status"]})', flush=True)
    model = None
    reset_memory(device)


# ---------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------

def retrieval(args, record, results, deadline):
    from engine import autocast_context
    from models.model_retrieval import ALBEF as RetrievalModel
    from models.retrieval_eval import (candidate_pairs, encode_images, encode_texts,
                                       itc_similarity, itm_eval, itm_score_matrices,
                                       itm_score_matrices_plain)
    from utils import load_config
    from benchmarks.bench_train_step import TOKENIZER

    device = torch.device(args.device)
    config = load_config(os.path.join(ROOT, args.retrieval_config))
    config['bert_config'] = os.path.join(ROOT, config['bert_config'])
    with open(config['bert_config']) as f:
        vocab_size = json.load(f)['vocab_size']
    torch.manual_seed(0)
    model = RetrievalModel(config=config, text_encoder=None, tokenizer=TOKENIZER).to(device).eval()
    n_img, n_txt, res = args.images, args.captions, config['image_res']
    g = torch.Generator().manual_seed(0)
    # Captions as benchmarks/bench_retrieval_eval.py draws them: 10..22 tokens with [CLS] and
    # [SEP], padded to the evaluation's 30.
    lengths = torch.randint(10, 23, (n_txt,), generator=g)
    text_ids, text_atts = random_ids(lengths, 30, vocab_size, g, last=102)
    text_ids, text_atts = text_ids.to(device), text_atts.to(device)
    images = torch.randn(n_img, 3, res, res, device=device,
                         generator=torch.Generator(device=device).manual_seed(0))
    # Ground truth of a Flickr30K-like split: caption t describes image t * I // T.
    txt2img = [t * n_img // n_txt for t in range(n_txt)]
    img2txt = [[] for _ in range(n_img)]
    for t, i in enumerate(txt2img):
        img2txt[i].append(t)
    record.update(config=args.retrieval_config, images=n_img, captions=n_txt, image_res=res,
                  k_test=args.k_test, caption_tokens='10..22 padded to 30')
    runs = record.setdefault('runs', {})
    reference = None  # the plain fp32 score matrices
    for precision in ('fp32', 'bf16'):
        if time.monotonic() > deadline:
            runs[precision] = {'status': 'skipped', 'why': 'time limit'}
            continue
        entry = runs[precision] = {'status': 'running'}
        try:
            set_tf32(False)
            entry['tf32'] = tf32_state()
            with torch.no_grad(), autocast_context(precision, device):
                sync(device)
                start = time.perf_counter()
                text_embeds, text_feats = encode_texts(model, text_ids, text_atts)
                image_embeds, image_feats = encode_images(model, images.split(args.image_batch))
                sims = itc_similarity(image_feats, text_feats).float()
                sync(device)
                entry['encode_s'] = time.perf_counter() - start
                entry['pairs'] = {'plain': n_img * min(args.k_test, n_txt)
                                  + n_txt * min(args.k_test, n_img),
                                  'fast': candidate_pairs(sims, args.k_test)[0].numel()}
                scores = {}
                for path, fn in (('plain', itm_score_matrices_plain), ('fast', itm_score_matrices)):
                    sync(device)
                    start = time.perf_counter()
                    scores[path] = fn(model, image_embeds, text_embeds, text_atts, sims,
                                      args.k_test)
                    sync(device)
                    entry[f'{path}_s'] = time.perf_counter() - start
                    results.save()
            entry['speedup'] = entry['plain_s'] / entry['fast_s']
            entry['max_abs_score_diff'] = max(
                (a.float() - b.float()).abs().max().item()
                for a, b in zip(scores['plain'], scores['fast']))
            recalls = {path: itm_eval(*s, txt2img, img2txt) for path, s in scores.items()}
            entry['recalls'] = recalls
            entry['recalls_equal'] = recalls['plain'] == recalls['fast']
            entry['max_recall_diff'] = max(abs(recalls['plain'][k] - recalls['fast'][k])
                                           for k in recalls['plain'])
            entry['status'] = 'ok'
            if precision == 'fp32':
                reference = [s.float().cpu() for s in scores['plain']]
            elif reference is not None:
                entry['max_abs_diff_fast_bf16_vs_plain_fp32'] = max(
                    (a - b.float().cpu()).abs().max().item()
                    for a, b in zip(reference, scores['fast']))
            del scores, text_embeds, image_embeds
        except Exception as error:
            entry.update(error_record(error))
        results.save()
        print(f'  retrieval {precision}: plain {entry.get("plain_s")} s, fast '
              f'{entry.get("fast_s")} s ({entry["status"]})', flush=True)
    model = None
    reset_memory(device)


# ---------------------------------------------------------------------------------------------
# The table and the command line
# ---------------------------------------------------------------------------------------------

def _fmt(value, spec='.3f', missing='-'):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def table(data):
    lines = []
    env = data.get('environment', {})
    peaks = env.get('peak_tflops') or {}
    if data.get('meta', {}).get('smoke'):
        lines.append('SMOKE RUN (tiny configs): the figures below only show that the script runs')
    lines.append(f'device: {env.get("name", "?")} | torch {env.get("torch", "?")} | CUDA '
                 f'{env.get("cuda")} | cuDNN {env.get("cudnn", "-")} | matmul peak TFLOP/s: bf16 '
                 f'{_fmt(peaks.get("bf16"), ".4g")}, fp32 {_fmt(peaks.get("fp32"), ".4g")}, tf32 '
                 f'{_fmt(peaks.get("tf32"), ".4g")}')
    tests = data.get('tests', {})
    if tests:
        lines.append(f'tests/test_cuda.py: {tests.get("counts")} (returncode '
                     f'{tests.get("returncode")}, {tests.get("status")})')
    pre = data.get('pretrain', {})
    if pre:
        lines.append(f'pre-training step, batch {pre.get("batch")} at {pre.get("image_res")} px '
                     f'({pre.get("status")}):')
        lines.append(f'  {"variant":24s} {"s/step":>8s} {"img/s":>8s} {"peak GB":>8s} '
                     f'{"MFU":>6s} {"x plain":>8s} {"syncs":>6s}')
        for name, v in (pre.get('variants') or {}).items():
            syncs = (v.get('host_syncs') or {}).get('total')
            lines.append(f'  {name:24s} {_fmt(v.get("s_per_step"), "8.3f")} '
                         f'{_fmt(v.get("images_per_s"), "8.1f")} '
                         f'{_fmt(v.get("peak_allocated_gb"), "8.2f")} {_fmt(v.get("mfu"), "6.1%")} '
                         f'{_fmt(v.get("speedup_vs_plain_fp32"), "8.2f")} '
                         f'{"" if syncs is None else syncs:>6}'
                         + ('' if v.get('status') == 'ok' else f'  [{v.get("status")}]'))
    vq = data.get('vqa', {})
    if vq:
        lines.append(f'VQA step, batch {vq.get("batch")} at {vq.get("image_res")} px '
                     f'({vq.get("status")}):')
        for name, v in (vq.get('variants') or {}).items():
            lines.append(f'  {name:24s} {_fmt(v.get("s_per_step"), "8.3f")} s/step  peak '
                         f'{_fmt(v.get("peak_allocated_gb"), ".2f")} GB  x plain '
                         f'{_fmt(v.get("speedup_vs_plain_fp32"), ".2f")}'
                         + ('' if v.get('status') == 'ok' else f'  [{v.get("status")}]'))
    ret = data.get('retrieval', {})
    if ret:
        lines.append(f'retrieval evaluation, {ret.get("images")} images, {ret.get("captions")} '
                     f'captions, k_test {ret.get("k_test")} ({ret.get("status")}):')
        for precision, v in (ret.get('runs') or {}).items():
            lines.append(f'  {precision}: plain {_fmt(v.get("plain_s"), ".2f")} s, fast '
                         f'{_fmt(v.get("fast_s"), ".2f")} s, x{_fmt(v.get("speedup"), ".2f")}, max '
                         f'|score diff| {_fmt(v.get("max_abs_score_diff"), ".2e")}, recalls equal '
                         f'{v.get("recalls_equal")}' + ('' if v.get('status') == 'ok'
                                                        else f'  [{v.get("status")}]'))
    lines.extend(target_lines(data))
    return '\n'.join(lines)


def target_lines(data):
    variants = (data.get('pretrain') or {}).get('variants') or {}
    compiled = variants.get('fast_bf16_compile') or {}
    best_mfu = max((v.get('mfu') or 0 for v in variants.values()), default=0) or None
    fp32 = ((data.get('retrieval') or {}).get('runs') or {}).get('fp32') or {}

    def verdict(value, target, extra=True):
        if value is None:
            return 'not measured'
        return 'met' if value >= target and extra else 'NOT met'
    return [
        'targets:',
        f'  fast bf16 + compile >= {TARGETS["compile_speedup"]:.0f}x plain fp32 step: '
        f'{_fmt(compiled.get("speedup_vs_plain_fp32"), ".2f")}x '
        f'({verdict(compiled.get("speedup_vs_plain_fp32"), TARGETS["compile_speedup"])})',
        f'  MFU >= {TARGETS["mfu"]:.0%} of the measured bf16 peak (best variant): '
        f'{_fmt(best_mfu, ".1%")} ({verdict(best_mfu, TARGETS["mfu"])})',
        f'  retrieval evaluation fast >= {TARGETS["retrieval_speedup"]:.0f}x plain at equal '
        f'recalls (fp32): {_fmt(fp32.get("speedup"), ".2f")}x, recalls equal '
        f'{fp32.get("recalls_equal")} ('
        f'{verdict(fp32.get("speedup"), TARGETS["retrieval_speedup"], fp32.get("recalls_equal"))})',
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=None, help='JSON results (default $OUT/gpu_check.json '
                                                    'if OUT is set, else gpu_check.json)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--smoke', action='store_true',
                        help='every section with the tiny configs (CPU, under a minute)')
    parser.add_argument('--sections', default=','.join(SECTIONS),
                        help=f'comma-separated subset of {",".join(SECTIONS)}')
    parser.add_argument('--variants', default=','.join(VARIANTS),
                        help='pre-training variants, comma-separated')
    parser.add_argument('--batch', type=int, default=None, help='pre-training batch (64; smoke 4)')
    parser.add_argument('--vqa_batch', type=int, default=None, help='VQA batch (the config\'s '
                                                                    'batch_size_train; smoke 4)')
    parser.add_argument('--steps', type=int, default=None,
                        help='timed steps per variant (5; smoke 1)')
    parser.add_argument('--warmup', type=int, default=None, help='steps before timing (2; smoke 1)')
    parser.add_argument('--images', type=int, default=None, help='retrieval images (1000; smoke 8)')
    parser.add_argument('--captions', type=int, default=None,
                        help='retrieval captions (5000; smoke 40)')
    parser.add_argument('--k_test', type=int, default=None,
                        help='retrieval candidates per query (16, the paper\'s Flickr30K 128 '
                             'scaled down to fit the call; smoke 4)')
    parser.add_argument('--image_batch', type=int, default=64,
                        help='images per ViT call (retrieval)')
    parser.add_argument('--matmul_n', type=int, default=None, help='matmul size (8192; smoke 256)')
    parser.add_argument('--matmul_reps', type=int, default=10)
    parser.add_argument('--compile_backend', default=None,
                        help='torch.compile backend (inductor; smoke on CPU: eager)')
    parser.add_argument('--tests', default='tests/test_cuda.py')
    parser.add_argument('--tests_timeout', type=float, default=240, help='seconds for the tests')
    parser.add_argument('--test_timeout', type=int, default=150,
                        help='seconds per test where pytest-timeout is installed')
    parser.add_argument('--time_limit', type=float, default=510,
                        help='seconds after which the remaining variants and sections are '
                             'skipped (recorded as such)')
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = dict(batch=4 if smoke else 64, steps=1 if smoke else 5, warmup=1 if smoke else 2,
                    images=8 if smoke else 1000, captions=40 if smoke else 5000,
                    k_test=4 if smoke else 16, matmul_n=256 if smoke else 8192,
                    # dynamo alone on a CPU smoke run: inductor would compile C++ for minutes
                    compile_backend='eager' if smoke and not is_cuda(args.device)
                    else 'inductor')
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    folder = 'configs/tiny' if smoke else 'configs'
    args.pretrain_config = f'{folder}/Pretrain.yaml'
    args.vqa_config = f'{folder}/VQA.yaml'
    args.retrieval_config = f'{folder}/Retrieval.yaml' if smoke else 'configs/Retrieval_flickr.yaml'
    if args.vqa_batch is None:
        args.vqa_batch = 4 if smoke else 32  # configs/VQA.yaml batch_size_train
    args.out = args.out or default_out()
    args.sections = [s for s in args.sections.split(',') if s]
    args.variants = [v for v in args.variants.split(',') if v]
    for name, allowed, what in ((args.sections, SECTIONS, 'section'),
                                (args.variants, VARIANTS, 'variant')):
        unknown = sorted(set(name) - set(allowed))
        if unknown:
            parser.error(f'unknown {what}(s) {unknown}; allowed: {", ".join(allowed)}')
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.time_limit
    torch.backends.cudnn.benchmark = True  # as engine.setup sets it for every run
    results = Results(args.out, {'argv': sys.argv[1:] if argv is None else list(argv),
                                 'started': datetime.datetime.now().isoformat(timespec='seconds'),
                                 'smoke': args.smoke, 'device': args.device,
                                 'sections': args.sections, 'targets': TARGETS})
    runners = {'environment': lambda record: environment(args, record),
               'tests': lambda record: run_tests(args, record, deadline),
               'pretrain': lambda record: pretrain(args, record, results, deadline),
               'vqa': lambda record: vqa(args, record, results, deadline),
               'retrieval': lambda record: retrieval(args, record, results, deadline)}
    for name in SECTIONS:
        if name not in args.sections:
            continue
        record = results.section(name)
        if time.monotonic() > deadline:
            record.update(status='skipped', why='time limit')
            results.save()
            continue
        print(f'[{time.monotonic() - started:6.1f} s] {name}', flush=True)
        start = time.perf_counter()
        try:
            runners[name](record)
            if record.get('status') == 'running':
                record['status'] = 'ok'
        except Exception as error:
            record.update(error_record(error))
            print(record['traceback'], flush=True)
        record['seconds'] = time.perf_counter() - start
        results.save()
    results.data['meta']['seconds'] = time.monotonic() - started
    results.save()
    print(table(results.data), flush=True)
    print(f'results: {args.out} ({results.data["meta"]["seconds"]:.0f} s)', flush=True)
    return results.data


if __name__ == '__main__':
    main()
