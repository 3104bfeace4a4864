"""The CUDA path, on a GPU (every test is skipped without one; `pytest -m cuda` selects them):
bf16 training against fp32, the fused attention kernels, fused AdamW, torch.compile without
graph breaks or recompiles, NCCL (DDP step, the queues' all-gather), pinned loaders and
non-blocking copies, and no host synchronisation inside a training step.

benchmarks/gpu_check.py runs this file and records its outcome with the speed figures. The
NCCL checks run in child processes (this file is also their worker: `python tests/test_cuda.py
ddp|queue`), so a collective that hangs fails its test instead of the whole run."""
import argparse
import contextlib
import copy
import os
import socket
import subprocess
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a worker script
    sys.path.insert(0, ROOT)

from tests.test_fast_train import CONFIG, TOKENIZER, inputs, plain_and_fast  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

CUDA = torch.device('cuda')


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 really float32 in these comparisons (TF32 rounds products to 10 bits)."""
    if not torch.cuda.is_available():
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def to_device(image, text, draws, device=None):
    device = device or CUDA
    text = types.SimpleNamespace(input_ids=text.input_ids.to(device),
                                 attention_mask=text.attention_mask.to(device))
    return image.to(device), text, {k: v.to(device) for k, v in draws.items()}


def cuda_models():
    return tuple(m.to(CUDA) for m in plain_and_fast())


def step(model, image, text, draws, precision='fp32'):
    from engine import autocast_context
    model.zero_grad(set_to_none=True)
    with autocast_context(precision, image.device):
        losses = model(image, text, alpha=0.4, **draws)
    sum(losses).backward()
    return [loss.float() for loss in losses]


def grads(model):
    return {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------

def test_fast_path_equals_plain_path_on_cuda():
    plain, fast = cuda_models()
    batch = to_device(*inputs())
    for _ in range(2):  # the second step sees the updated queues and momentum weights
        for p, f in zip(step(plain, *batch), step(fast, *batch)):
            assert torch.allclose(p, f, atol=1e-5, rtol=0), (p.item(), f.item())
        plain_grads, fast_grads = grads(plain), grads(fast)
        assert plain_grads.keys() == fast_grads.keys() and len(plain_grads) > 50
        for name, g in plain_grads.items():
            assert torch.allclose(g, fast_grads[name], atol=1e-5, rtol=1e-4), name
    for name in ('image_queue', 'text_queue', 'queue_ptr'):
        assert torch.allclose(getattr(plain, name).float(), getattr(fast, name).float(),
                              atol=1e-6), name


def test_bf16_fast_step_matches_fp32_plain_step():
    """Losses and gradients of the bf16 fast step within bf16 rounding of the fp32 plain step
    (bf16 keeps 8 significant bits: about 0.4% per rounding)."""
    plain, fast = cuda_models()
    batch = to_device(*inputs())
    for reference, low in zip(step(plain, *batch), step(fast, *batch, precision='bf16')):
        assert torch.isfinite(low)
        assert abs(low - reference) <= 0.03 * abs(reference) + 0.01, (reference.item(), low.item())
    ref, new = grads(plain), grads(fast)
    assert ref.keys() == new.keys()
    flat_ref = torch.cat([g.flatten() for g in ref.values()])
    flat_new = torch.cat([new[n].flatten() for n in ref])
    cosine = torch.nn.functional.cosine_similarity(flat_ref, flat_new, dim=0)
    assert cosine > 0.995, cosine.item()
    errors = {n: ((new[n] - g).norm() / g.norm()).item() for n, g in ref.items() if g.norm() > 1e-6}
    close = sum(e < 0.05 for e in errors.values()) / len(errors)
    worst = sorted(errors.items(), key=lambda item: -item[1])[:5]
    assert close >= 0.9, worst
    for name, p in fast.named_parameters():
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32), name


def test_fused_adamw_equals_foreach_adamw():
    from optim import create_optimizer
    _, model = cuda_models()
    fused, foreach = model, copy.deepcopy(model)
    config = {'opt': 'adamW', 'lr': 1e-3, 'weight_decay': 0.02}
    optimizers = [create_optimizer({**config, 'fused': True}, fused),
                  create_optimizer({**config, 'fused': False}, foreach)]
    assert optimizers[0].defaults['fused'] and not optimizers[1].defaults.get('fused')
    g = torch.Generator(device=CUDA).manual_seed(0)
    for _ in range(3):
        for p, q in zip(fused.parameters(), foreach.parameters()):
            if p.requires_grad:
                p.grad = torch.randn(p.shape, device=CUDA, generator=g)
                q.grad = p.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    for (name, p), q in zip(fused.named_parameters(), foreach.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), name


def test_negative_draws_are_torch_multinomial_draws_on_cuda():
    from models.albef_base import sample_negatives_batched
    for seed in range(10):
        g = torch.Generator(device=CUDA).manual_seed(seed)
        weights = torch.softmax(3 * torch.randn(16, 16, device=CUDA, generator=g), dim=1)
        weights.fill_diagonal_(0)
        torch.manual_seed(seed)
        expected, after = torch.multinomial(weights, 1).squeeze(1), torch.rand(4, device=CUDA)
        torch.manual_seed(seed)
        assert torch.equal(sample_negatives_batched(weights), expected)
        assert torch.equal(torch.rand(4, device=CUDA), after)


def test_masking_is_the_same_on_cuda_and_cpu():
    from models.albef_base import mask_tokens
    image, text, _ = inputs()
    outs = []
    for device in ('cpu', CUDA):
        torch.manual_seed(5)
        outs.append([t.cpu() for t in mask_tokens(text.input_ids.to(device), 64, TOKENIZER, 0.3,
                                                   targets=text.input_ids.to(device),
                                                   candidates=True)])
    for cpu, cuda in zip(*outs):
        assert torch.equal(cpu, cuda)


# ---------------------------------------------------------------------------------------------
# Kernels and compilation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('precision', ['bf16', 'fp32'])
def test_attention_runs_on_fused_sdpa_kernels(precision):
    """Without an attention map asked for, every attention of training (both paths) and of
    the retrieval evaluation runs on flash or memory-efficient kernels: torch raises inside
    sdpa_kernel when only the math kernel could serve a call (fp32: memory-efficient only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from engine import autocast_context
    from models.model_retrieval import ALBEF as RetrievalALBEF
    from models.retrieval_eval import evaluation
    backends = [SDPBackend.EFFICIENT_ATTENTION]
    if precision == 'bf16':
        backends.insert(0, SDPBackend.FLASH_ATTENTION)
    plain, fast = cuda_models()
    image, text, draws = to_device(*inputs())
    torch.manual_seed(0)
    retrieval = RetrievalALBEF(config={**CONFIG, 'distill': True}, tokenizer=TOKENIZER).to(CUDA)
    with sdpa_kernel(backends):
        for model in (plain, fast):
            step(model, image, text, draws, precision)
            step(model, image, text, {}, precision)  # its own draws
        with autocast_context(precision, CUDA):
            evaluation(retrieval, image, text.input_ids, text.attention_mask, k_test=2, fast=True)
            evaluation(retrieval, image, text.input_ids, text.attention_mask, k_test=2, fast=False)


def _compiled_matches_eager(module, *args, backend='inductor'):
    """`module` compiled in place with fullgraph=True (a graph break raises) gives the eager
    outputs and gradients (of the parameters and of the 3-D inputs)."""
    compiled = copy.deepcopy(module)
    compiled.compile(fullgraph=True, backend=backend)  # names unchanged, as compile_layers
    results = []
    for m in (module, compiled):
        m.zero_grad(set_to_none=True)
        leaves = [a.detach().requires_grad_() if a.dim() == 3 else a for a in args]
        out = m(*leaves)
        (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
        results.append((out.detach(), [a.grad for a in leaves if a.requires_grad],
                        {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (out, arg_grads, param_grads), (c_out, c_arg_grads, c_param_grads) = results
    assert torch.allclose(out, c_out, atol=1e-4, rtol=1e-4)
    assert param_grads.keys() == c_param_grads.keys() and len(arg_grads) == len(c_arg_grads)
    for a, b in zip(arg_grads, c_arg_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    for name, g in param_grads.items():
        assert torch.allclose(g, c_param_grads[name], atol=1e-4, rtol=1e-4), name


def test_vit_block_and_bert_layers_compile_without_graph_breaks():
    """torch.compile(fullgraph=True) of a ViT block and of a fusion, a text and a fast-path
    fusion BERT layer (given `select_blocks` keys/values): one graph each, the eager results.
    Inductor (Triton kernels) for the first two; the graph-break check of the other two does
    not depend on the backend (aot_eager: quicker)."""
    from models.xbert import extended_attention_mask, invert_attention_mask
    torch._dynamo.reset()
    _, model = cuda_models()
    x = torch.randn(4, 17, 32, device=CUDA)
    _compiled_matches_eager(model.visual_encoder.blocks[0], x)
    bert = model.text_encoder.bert
    hidden = torch.randn(4, 9, 32, device=CUDA)
    atts = torch.ones(4, 9, dtype=torch.long, device=CUDA)
    atts[1, 5:] = 0
    mask = extended_attention_mask(atts, torch.float32)
    _compiled_matches_eager(bert.encoder.layer[0], hidden, mask, backend='aot_eager')
    image = torch.randn(4, 17, 32, device=CUDA)
    image_mask = invert_attention_mask(torch.ones(4, 17, dtype=torch.long, device=CUDA),
                                       torch.float32)
    fusion = bert.encoder.layer[CONFIG['bert_config']['fusion_layer']]
    _compiled_matches_eager(fusion, hidden, mask, image, image_mask)
    key_values = bert.image_key_values(image[:2]).select_blocks(
        [None, torch.tensor([1, 1], device=CUDA)])
    compiled = copy.deepcopy(fusion)
    compiled.compile(fullgraph=True, backend='aot_eager')
    layer = CONFIG['bert_config']['fusion_layer']
    with torch.no_grad():
        eager_out = fusion(hidden, mask, key_values.for_layer(layer), None)
        compiled_out = compiled(hidden, mask, key_values.for_layer(layer), None)
    assert torch.allclose(eager_out, compiled_out, atol=1e-4, rtol=1e-4)


def test_compiled_training_step_does_not_recompile_across_steps():
    """engine.compile_layers on the pre-training model: after the first step, steps with new
    draws (masks, negatives) reuse the compiled graphs (static shapes: select_blocks)."""
    from engine import compile_layers
    torch._dynamo.reset()
    _, model = cuda_models()
    compile_layers(model, 'aot_eager')
    image, text, _ = to_device(*inputs())
    torch.manual_seed(0)
    step(model, image, text, {})
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (1, 2):
            torch.manual_seed(seed)
            losses = step(model, image, text, {})
    assert all(torch.isfinite(loss) for loss in losses)


# ---------------------------------------------------------------------------------------------
# Host synchronisation, loaders and copies
# ---------------------------------------------------------------------------------------------

def _phases(model, optimizer, image, text, precision, call):
    from engine import autocast_context
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(precision, image.device):
        losses = call(model, image, text)
    yield
    sum(losses).backward()
    yield
    optimizer.step()
    yield


def _syncs_of_a_step(model, image, text, precision, fused, call):
    from benchmarks.gpu_check import host_syncs
    from optim import create_optimizer
    optimizer = create_optimizer({'opt': 'adamW', 'lr': 1e-4, 'weight_decay': 0.02,
                                  'fused': fused}, model)
    for _ in _phases(model, optimizer, image, text, precision, call):  # warm-up: AdamW state
        pass
    torch.cuda.synchronize()
    found = {}
    phases = _phases(model, optimizer, image, text, precision, call)
    for phase in ('forward', 'backward', 'optimizer step'):
        with host_syncs() as where:
            next(phases)
        found[phase] = where
    return found


@pytest.mark.parametrize('precision, fused, checkpointing', [
    ('fp32', True, False), ('bf16', True, False), ('bf16', True, True), ('fp32', False, False)])
def test_pretraining_step_has_no_host_sync(precision, fused, checkpointing):
    """The fast pre-training step (forward with its own draws, backward, AdamW) never waits
    for the GPU: torch's sync debug mode reports nothing (the engine's logging .item() calls,
    after the step, are outside)."""
    from engine import set_grad_checkpointing
    _, model = cuda_models()
    set_grad_checkpointing(model, checkpointing)
    image, text, _ = to_device(*inputs())
    found = _syncs_of_a_step(model, image, text, precision, fused,
                             lambda m, i, t: m(i, t, alpha=0.4))
    assert not any(found.values()), found


def test_retrieval_training_step_has_no_host_sync():
    from models.model_retrieval import ALBEF as RetrievalALBEF
    torch.manual_seed(0)
    model = RetrievalALBEF(config={**CONFIG, 'distill': True}, tokenizer=TOKENIZER).to(CUDA).train()
    image, text, _ = to_device(*inputs())
    idx = torch.tensor([7, 8, 7, 9], device=CUDA)
    found = _syncs_of_a_step(model, image, text, 'bf16', True,
                             lambda m, i, t: m(i, t, 0.4, idx))
    assert not any(found.values()), found


def test_training_loaders_pin_memory():
    from dataset.loaders import eval_loader, train_loader
    dataset = torch.utils.data.TensorDataset(torch.randn(8, 3, 4, 4), torch.arange(8))
    for loader in (train_loader(dataset, 4, num_workers=0, seed=0),
                   eval_loader(dataset, 4, num_workers=0)):
        assert loader.pin_memory
        images, ids = next(iter(loader))
        assert images.is_pinned() and ids.is_pinned()


def test_pretraining_script_copies_images_without_waiting():
    """Pretrain.py's train_step copies the (pinned) image batch non-blocking: no host sync
    (the stub tokenizer hands over captions already on the GPU; the real one's copy of the
    tokenised captions is a blocking copy from pageable memory)."""
    import Pretrain
    from benchmarks.gpu_check import host_syncs
    ids = torch.tensor([[101, 5, 6, 0]], device=CUDA)
    encoded = types.SimpleNamespace(input_ids=ids, attention_mask=(ids > 0).long())
    encoded.to = lambda device: encoded
    tokenizer = lambda captions, **kwargs: encoded  # noqa: E731
    seen = {}

    def model(image, text, alpha):
        seen['image'] = image
        zero = image.sum() * 0
        return zero, zero, zero
    train_step = Pretrain.make_train_step(tokenizer, {'max_tokens': 30}, CUDA)
    image = torch.randn(2, 3, 8, 8).pin_memory()
    with host_syncs() as where:
        train_step(model, (image, ['a caption', 'another']), 0.4)
    assert not where, where
    assert seen['image'].is_cuda


# ---------------------------------------------------------------------------------------------
# NCCL (child processes)
# ---------------------------------------------------------------------------------------------

def _free_port():
    with contextlib.closing(socket.socket()) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _child_env(**extra):
    path = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
    return {**os.environ, 'PYTHONPATH': path, 'MASTER_ADDR': '127.0.0.1',
            'MASTER_PORT': str(_free_port()), **extra}


def test_one_process_nccl_ddp_step():
    env = _child_env(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0')
    result = subprocess.run([sys.executable, os.path.abspath(__file__), 'ddp'], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'ddp worker: ok' in result.stdout


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
def test_queues_gather_both_ranks_under_nccl():
    env = _child_env()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
           '--master_port', env['MASTER_PORT'], os.path.abspath(__file__), 'queue']
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count('queue worker: ok') == 2


def _join():
    import torch.distributed as dist

    import utils
    args = argparse.Namespace(device='cuda', dist_url='env://')
    utils.init_distributed_mode(args)
    assert dist.get_backend() == 'nccl', dist.get_backend()
    return args.gpu


def worker_ddp():
    """World size 1 under NCCL: a DDP-wrapped fast model takes the gradients of the unwrapped
    one (all-reduced over one rank) for two steps with fused AdamW; the queues' all-gather and
    enqueue run on CUDA tensors."""
    import torch.distributed as dist

    import utils
    from models.albef_base import concat_all_gather
    from optim import create_optimizer
    gpu = _join()
    device = torch.device('cuda', gpu)
    _, model = plain_and_fast()
    model.to(device)
    reference = copy.deepcopy(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[gpu])
    optimizers = [create_optimizer({'opt': 'adamW', 'lr': 1e-4, 'weight_decay': 0.02,
                                    'fused': True}, m) for m in (model, reference)]
    batch = to_device(*inputs(), device=device)
    for _ in range(2):
        losses = step(ddp, *batch)
        ref_losses = step(reference, *batch)
        for a, b in zip(losses, ref_losses):
            assert torch.allclose(a, b, atol=1e-6), (a.item(), b.item())
        ref = grads(reference)
        for name, g in grads(model).items():
            assert torch.allclose(g, ref[name], atol=1e-6, rtol=1e-5), name
        for optimizer in optimizers:
            optimizer.step()
    features = torch.randn(4, 16, device=device)
    gathered = [torch.empty_like(features)]
    dist.all_gather(gathered, features)  # the collective concat_all_gather runs with 2+ ranks
    assert torch.equal(gathered[0], features) and concat_all_gather(features) is features
    pointer = int(model.queue_ptr)
    model._dequeue_and_enqueue(features, -features)
    window = slice(pointer, pointer + 4)
    assert torch.equal(model.image_queue[:, window], features.T)
    assert torch.equal(model.text_queue[:, window], -features.T)
    assert int(model.queue_ptr) == (pointer + 4) % CONFIG['queue_size']
    utils.destroy_distributed()
    print('ddp worker: ok', flush=True)


def worker_queue():
    """Two ranks under NCCL, each with half of the batch: afterwards both queues hold the
    momentum features of the whole batch, rank 0's samples first."""
    import utils
    gpu = _join()
    device = torch.device('cuda', gpu)
    rank = utils.get_rank()
    _, model = plain_and_fast()
    model.to(device).eval()
    model.momentum_updates = False  # the features below and in the forward: the same weights
    image, text, _ = to_device(*inputs(), device=device)
    with torch.no_grad():
        image_feat = model.image_features(model.encode_image(image, momentum=True), momentum=True)
        text_feat = model.text_features(model.encode_text(text.input_ids, text.attention_mask,
                                                          momentum=True), momentum=True)
        half = slice(2 * rank, 2 * rank + 2)
        mine = types.SimpleNamespace(input_ids=text.input_ids[half],
                                     attention_mask=text.attention_mask[half])
        model(image[half], mine, alpha=0.4)
    assert torch.allclose(model.image_queue[:, :4], image_feat.T, atol=1e-5), rank
    assert torch.allclose(model.text_queue[:, :4], text_feat.T, atol=1e-5), rank
    assert int(model.queue_ptr) == 4
    utils.barrier()
    utils.destroy_distributed()
    print('queue worker: ok', flush=True)


if __name__ == '__main__':
    sys.exit({'ddp': worker_ddp, 'queue': worker_queue}[sys.argv[1]]())
