"""albef.export and albef.load_model on the tiny checkpoints of tests/test_api.py: an export holds
the online weights alone, stands without the files it came from, and scores and answers as the
full checkpoint; released names resolve through albef.hub; the `albef export` and `albef list`
commands, and their mistakes as one-line errors."""
import dataclasses
import hashlib
import json
import shutil
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import utils
from albef import ALBEFInference, export_model, hub, load_model
from albef.cli import main, run
from albef.export import MANIFEST, WEIGHTS, training_only
from dataset.images import load_image
from models.checkpoint import CheckpointError, has_momentum
from models.model_retrieval import ALBEF as RetrievalALBEF
from models.tokenization_bert import BertTokenizer
from optim import create_optimizer
from scheduler import create_scheduler
from tests.test_api import CAPTIONS, setup  # noqa: F401 - the tiny checkpoints of every kind
from tests.test_api_edges import command_error

QUESTION = 'what color is the circle?'


@pytest.fixture(scope='module')
def training_file(setup):  # noqa: F811
    """The retrieval checkpoint as a training run leaves it: optimizer and schedule beside it."""
    data, _, ckpts, _, tokenizer = setup
    checkpoint = torch.load(ckpts['retrieval'], weights_only=True)
    model = RetrievalALBEF(config=checkpoint['config'], tokenizer=tokenizer)
    model.load_state_dict(checkpoint['model'])
    optimizer = create_optimizer(checkpoint['config']['optimizer'], model)
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    path = data / 'retrieval_training.pth'
    utils.save_checkpoint({**checkpoint, 'optimizer': optimizer.state_dict(),
                           'lr_scheduler': create_scheduler(checkpoint['config']['schedular'],
                                                            optimizer, steps_per_epoch=2).state_dict()},
                          path)
    return path


@pytest.fixture(scope='module')
def exports(setup, training_file, tmp_path_factory):  # noqa: F811
    """Exports of the training-style retrieval file (fp32, fp16), pre-training and VQA, each moved
    after it was written: its config names the folder's own files, relative to it."""
    _, _, ckpts, _, _ = setup
    root = tmp_path_factory.mktemp('exports')
    made = {}
    for name, source, dtype in (('retrieval', training_file, 'fp32'),
                                ('retrieval_fp16', training_file, 'fp16'),
                                ('pretrain', ckpts['pretrain'], 'fp32'),
                                ('vqa', ckpts['vqa'], 'fp32')):
        export_model(source, root / 'staging' / name, dtype=dtype)
        made[name] = shutil.move(root / 'staging' / name, root / name)
    return made


def reference(kind, setup):  # noqa: F811
    return ALBEFInference.from_checkpoint(setup[2][kind], device='cpu')


def test_export_holds_the_online_weights_alone(setup, training_file, exports):  # noqa: F811
    full = torch.load(training_file, weights_only=True)
    weights = load_file(exports['retrieval'] / WEIGHTS)
    assert not has_momentum(weights) and not any(training_only(k) for k in weights)
    assert not {'image_queue', 'text_queue', 'idx_queue', 'queue_ptr'} & set(weights)
    assert set(weights) == {k for k in full['model'] if not training_only(k)}
    assert all(torch.equal(weights[k], full['model'][k]) for k in weights)
    manifest = json.loads((exports['retrieval'] / MANIFEST).read_text())
    assert manifest['kind'] == 'retrieval' and manifest['dtype'] == 'fp32'
    assert manifest['source_sha256'] == hashlib.sha256(training_file.read_bytes()).hexdigest()
    assert manifest['dropped_training_tensors'] == len(full['model']) - len(weights) > 0
    config = utils.load_config(exports['retrieval'] / 'config.yaml')
    assert config['bert_config'] == 'config_bert.json' and config['tokenizer'] == 'tokenizer'
    assert {p.name for p in exports['retrieval'].iterdir()} == {
        WEIGHTS, 'config.yaml', 'config_bert.json', 'tokenizer', MANIFEST}
    assert (exports['vqa'] / 'answer_list.json').is_file()  # VQA's default candidates travel too
    half = load_file(exports['retrieval_fp16'] / WEIGHTS)
    assert {v.dtype for v in half.values() if v.is_floating_point()} == {torch.float16}
    assert (exports['retrieval_fp16'] / WEIGHTS).stat().st_size < \
        0.6 * (exports['retrieval'] / WEIGHTS).stat().st_size


@pytest.mark.parametrize('kind', ['pretrain', 'retrieval'])
def test_export_scores_as_the_full_checkpoint(setup, exports, kind):  # noqa: F811
    images = setup[3][:3]
    full, exported = reference(kind, setup), ALBEFInference.from_checkpoint(exports[kind],
                                                                            device='cpu')
    assert exported.kind == kind
    assert torch.allclose(exported.itm_scores(images, CAPTIONS[:3]),
                          full.itm_scores(images, CAPTIONS[:3]), atol=1e-6)
    assert torch.allclose(exported.image_embeddings(images), full.image_embeddings(images),
                          atol=1e-6)
    assert torch.allclose(exported.text_embeddings(CAPTIONS), full.text_embeddings(CAPTIONS),
                          atol=1e-6)
    half = ALBEFInference.from_checkpoint(exports['retrieval_fp16'], device='cpu')
    if kind == 'retrieval':
        assert torch.allclose(half.itm_scores(images, CAPTIONS[:3]),
                              full.itm_scores(images, CAPTIONS[:3]), atol=2e-3)


def test_export_answers_as_the_full_checkpoint(setup, exports):  # noqa: F811
    image = setup[3][0]
    full = reference('vqa', setup)
    exported = ALBEFInference.from_checkpoint(exports['vqa'], device='cpu')
    assert not has_momentum(exported.model.state_dict())  # built without the distillation copies
    assert exported.answer(image, QUESTION, k=4) == full.answer(image, QUESTION, k=4)
    assert exported.answer(image, QUESTION, ['red', 'blue'], k=2) == \
        full.answer(image, QUESTION, ['red', 'blue'], k=2)


@pytest.mark.parametrize('precision, atol', [('fp32', 1e-6), ('fp16', 1e-2), ('bf16', 3e-2)])
def test_load_model_gives_model_transform_tokenizer(setup, exports, precision, atol):  # noqa: F811
    images = setup[3][:2]
    model, transform, tokenizer = load_model(exports['retrieval'], device='cpu',
                                             precision=precision)
    assert not model.training and isinstance(tokenizer, BertTokenizer)
    dtype = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}[precision]
    assert {p.dtype for p in model.parameters()} == {dtype}
    pixels = torch.stack([transform(load_image(p)) for p in images])  # (2, 3, R, R)
    assert pixels.dtype == dtype and pixels.shape[1:] == (3, 32, 32)
    text = tokenizer(CAPTIONS[:2], padding='longest', return_tensors='pt')
    with torch.no_grad():
        image_embeds = model.encode_image(pixels)
        text_embeds = model.encode_text(text.input_ids, text.attention_mask)
        itm = model.itm_scores(text_embeds, text.attention_mask, image_embeds).float()
    expected = reference('retrieval', setup).itm_scores(images, CAPTIONS[:2])
    assert torch.allclose(itm.softmax(dim=1)[:, 1], expected, atol=atol)


def test_load_model_from_checkpoint_files(setup, tmp_path):  # noqa: F811
    data, _, ckpts, images, _ = setup
    model, transform, _ = load_model(ckpts['vqa'], device='cpu')
    assert model.training is False and transform(Image.new('RGB', (50, 20))).shape == (3, 32, 32)
    released = tmp_path / 'mscoco.pth'  # the released layout: online weights, no config
    state = torch.load(ckpts['retrieval'], weights_only=True)['model']
    torch.save({'model': {k: v for k, v in state.items() if not training_only(k)}}, released)
    with pytest.raises(ValueError, match='stores no config'):
        load_model(released, device='cpu')
    model, _, _ = load_model(released, device='cpu', config=data / 'retrieval.yaml')
    assert torch.equal(model.visual_encoder_m.pos_embed, model.visual_encoder.pos_embed)
    with pytest.raises(ValueError, match="precision 'fp8'"):
        load_model(ckpts['vqa'], precision='fp8')


def test_released_names_resolve_through_the_hub(setup, tmp_path, monkeypatch):  # noqa: F811
    """A registry name reads the file from $ALBEF_MIRROR (no network) and brings its paired
    config (here the registry entry points at the tiny one)."""
    data, _, ckpts, images, _ = setup
    mirror = tmp_path / 'mirror'
    mirror.mkdir()
    state = torch.load(ckpts['retrieval'], weights_only=True)['model']
    torch.save({'model': {k: v for k, v in state.items() if not training_only(k)}},
               mirror / 'mscoco.pth')
    monkeypatch.setenv(hub.MIRROR_ENV, str(mirror))
    real_lookup = hub.lookup
    mscoco = dataclasses.replace(real_lookup('albef_mscoco'), config=str(data / 'retrieval.yaml'))
    monkeypatch.setattr(hub, 'lookup', lambda name: mscoco if real_lookup(name) == real_lookup(
        'albef_mscoco') else real_lookup(name))
    by_name = ALBEFInference.from_checkpoint('albef_mscoco', device='cpu')
    expected = reference('retrieval', setup).itm_scores(images[:2], CAPTIONS[:2])
    assert torch.allclose(by_name.itm_scores(images[:2], CAPTIONS[:2]), expected, atol=1e-6)
    model, _, _ = load_model('albef_mscoco', device='cpu')
    assert type(model) is RetrievalALBEF
    manifest = run(['export', 'albef_mscoco', '--out', str(tmp_path / 'named')])
    assert manifest['source'] == 'albef_mscoco' and manifest['kind'] == 'retrieval'
    with pytest.raises(CheckpointError, match='deit initialisation for training'):
        load_model('deit_base_patch16_224', device='cpu')  # nothing downloaded


def test_commands(setup, exports, tmp_path, capsys, monkeypatch):  # noqa: F811
    _, _, ckpts, images, _ = setup
    listed = run(['list'])
    out = capsys.readouterr().out
    assert listed and all(entry.name in out for entry in listed)
    monkeypatch.setattr(sys, 'argv', ['albef', 'list'])
    assert run() == 0  # the console script's sys.exit(run()): status 0, nothing on stderr
    assert capsys.readouterr().err == ''
    manifest = run(['export', str(ckpts['vqa']), '--out', str(tmp_path / 'vqa'), '--dtype', 'bf16'])
    assert manifest['dtype'] == 'bf16' and (tmp_path / 'vqa' / WEIGHTS).is_file()
    # an export re-exported in another dtype
    assert run(['export', str(exports['retrieval']), '--out', str(tmp_path / 'half'),
                '--dtype', 'fp16'])['kind'] == 'retrieval'
    argv = ['score', '--device', 'cpu', '--image', images[0], '--captions', *CAPTIONS[:3]]
    from_export = main([*argv, '--checkpoint', str(exports['retrieval'])])
    from_file = main([*argv, '--checkpoint', str(ckpts['retrieval'])])
    assert [r['caption'] for r in from_export] == [r['caption'] for r in from_file]
    assert [r['itm'] for r in from_export] == pytest.approx([r['itm'] for r in from_file], abs=1e-6)


def test_export_mistakes_are_one_line_errors(setup, exports, tmp_path, capsys):  # noqa: F811
    data, _, ckpts, images, _ = setup
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('')
    released = tmp_path / 'released.pth'
    torch.save({'model': torch.load(ckpts['retrieval'], weights_only=True)['model']}, released)
    for argv, start in (
            ([str(tmp_path / 'none.pth'), '--out', str(tmp_path / 'a')], 'error: checkpoint '),
            ([str(ckpts['vqa']), '--out', str(tmp_path / 'full')], 'error: --out'),
            ([str(data), '--out', str(tmp_path / 'a')], f'error: {data}: a folder without'),
            ([str(released), '--out', str(tmp_path / 'a')], f'error: {released} stores no config'),
            ([str(released), '--out', str(tmp_path / 'a'), '--config', str(data / 'vqa.yaml')],
             "error: the config has no 'embed_dim', which the 'retrieval' model"),
            ([str(released), '--out', str(tmp_path / 'a'), '--config',
              str(data / 'pretrain.yaml')], f'error: {released} does not fit its config'),
            ([str(ckpts['vqa']), '--out', str(tmp_path / 'a'), '--dtype', 'fp8'],
             'albef export: error: argument --dtype: invalid choice')):
        code, line = command_error(capsys, ['export', *argv])
        assert code == 2 and line.startswith(start), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ['full', 'released.pth']  # nothing left
    damaged = tmp_path / 'damaged'
    shutil.copytree(exports['retrieval'], damaged)
    (damaged / WEIGHTS).write_bytes((damaged / WEIGHTS).read_bytes()[:1000])
    code, line = command_error(capsys, ['score', '--checkpoint', str(damaged), '--device', 'cpu',
                                        '--image', images[0], '--captions', 'a circle'])
    assert code == 2 and line.startswith(f'error: {damaged / WEIGHTS}: unreadable'), line
    with pytest.raises(CheckpointError, match='not an ALBEF export manifest'):
        (damaged / MANIFEST).write_text('{}')
        ALBEFInference.from_checkpoint(damaged, device='cpu')
