"""What lets small runs learn: the per-step LR schedule (with accumulation and exact resumption),
`--opts key=null`, the `threads` option, string and integer VQA question ids, the WordPiece
vocabulary tool and the demo's per-type / per-kind report."""
import json
import math
import os
import re
import string

import pytest
import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler as TimmCosine

import demo
import engine
import utils
from dataset.baselines import by_group, classification_baselines, vqa_baselines
from dataset.loaders import train_loader
from dataset.synthetic import generate
from dataset.vqa_dataset import vqa_dataset, vqa_test_collate_fn
from models.tokenization_bert import BertTokenizer
from scheduler import create_scheduler
from tests.test_faults import Toy
from tools import build_vocab

PER_STEP = {'sched': 'cosine', 'lr': 1e-2, 'epochs': 3, 'min_lr': 1e-4, 'warmup_lr': 1e-3,
            'warmup_epochs': 1, 'step_every': 'step'}


def optimizer(lr=1e-2):
    return torch.optim.AdamW(nn.Linear(2, 1).parameters(), lr=lr)


# ----------------------------------------------------------------------------- the schedule

def test_per_step_schedule_is_timms_cosine_per_update():
    ours = create_scheduler({**PER_STEP, 'warmup_steps': 5}, optimizer(), steps_per_epoch=10)
    theirs_opt = optimizer()
    theirs = TimmCosine(theirs_opt, t_initial=30 - 5, lr_min=1e-4, warmup_t=5, warmup_lr_init=1e-3,
                        warmup_prefix=True, t_in_epochs=False)
    assert ours.per_step and ours.optimizer.param_groups[0]['lr'] == 1e-3  # warmup_lr at step 0
    for n in range(32):
        theirs.step_update(n)
        theirs.step(n)  # timm ignores epoch steps when t_in_epochs=False
        ours.step_update(n)
        assert ours.optimizer.param_groups[0]['lr'] == pytest.approx(theirs_opt.param_groups[0]['lr'],
                                                                      rel=1e-12), n
    assert ours.lr_at(5) == [pytest.approx(1e-2)] and ours.lr_at(30) == [pytest.approx(1e-4)]
    assert ours.lr_at(2.5) == [pytest.approx(1e-3 + 0.5 * (1e-2 - 1e-3))]


def test_per_step_warmup_in_epochs_and_the_default_stays_per_epoch():
    sched = create_scheduler(PER_STEP, optimizer(), steps_per_epoch=7)  # warm-up: 1 epoch = 7 steps
    assert (sched.warmup_epochs, sched.epochs) == (7, 3 * 7 - 7)
    faithful = {k: v for k, v in PER_STEP.items() if k != 'step_every'}
    sched = create_scheduler(faithful, optimizer(), steps_per_epoch=7)
    assert not sched.per_step and (sched.warmup_epochs, sched.epochs) == (1, 3)
    # NOTE(faithful): the per-epoch state keeps the layout of the original-format checkpoints
    assert set(sched.state_dict()) == {'base_lrs', 'epochs', 'min_lr', 'warmup_lr',
                                       'warmup_epochs', 'last_t'}
    with pytest.raises(RuntimeError, match='per-step'):
        sched.step_update(3)


def test_per_step_schedule_errors():
    with pytest.raises(ValueError, match='warmup_steps needs step_every: step'):
        create_scheduler({**PER_STEP, 'step_every': 'epoch', 'warmup_steps': 3}, optimizer())
    with pytest.raises(ValueError, match='shorter than the run'):
        create_scheduler({**PER_STEP, 'warmup_steps': 30}, optimizer(), steps_per_epoch=10)
    with pytest.raises(ValueError, match='steps per epoch'):
        create_scheduler(PER_STEP, optimizer())
    with pytest.raises(ValueError, match="step_every='iteration'"):
        create_scheduler({**PER_STEP, 'step_every': 'iteration'}, optimizer(), steps_per_epoch=2)
    per_step = create_scheduler(PER_STEP, optimizer(), steps_per_epoch=4)
    per_epoch = create_scheduler({**PER_STEP, 'step_every': 'epoch'}, optimizer())
    with pytest.raises(ValueError, match='steps every epoch, the config every step'):
        per_step.load_state_dict(per_epoch.state_dict())
    per_step.step_update(3)
    again = create_scheduler(PER_STEP, optimizer(), steps_per_epoch=4)
    again.load_state_dict(per_step.state_dict())
    assert again.state_dict() == per_step.state_dict() and again.last_t == 3


def test_config_schema_has_the_schedule_keys():
    config = utils.with_defaults(utils.load_config('configs/VE.yaml'), 've')
    assert config['schedular']['step_every'] == 'epoch'  # the original's, unless asked
    with pytest.raises(utils.ConfigError, match='warmup_steps needs schedular.step_every: step'):
        utils.validate(utils.apply_overrides(config, ['schedular.warmup_steps=10']), 've')
    stepped = utils.apply_overrides(config, ['schedular.step_every=step', 'schedular.warmup_steps=10'])
    assert utils.validate(stepped, 've')['schedular']['warmup_steps'] == 10
    with pytest.raises(utils.ConfigError, match="schedular.step_every = 'iteration'"):
        utils.validate(utils.apply_overrides(config, ['schedular.step_every=iteration']), 've')


def toy_training(output_dir, resume=False, accum=2, n=22):
    """Two epochs of a toy model through engine.Run with a per-step schedule; returns the LR of
    every optimiser step taken and the final weight."""
    config = {'optimizer': {}, 'accum_steps': accum, 'checkpoint_every_steps': 4,
              'keep_checkpoints': 20, 'print_freq': 100,
              'schedular': {**PER_STEP, 'epochs': 2, 'warmup_steps': 3}}
    model = Toy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lrs = []
    opt.register_step_pre_hook(lambda o, *args: lrs.append(o.param_groups[0]['lr']))
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, generator=g))
    loader = train_loader(data, batch_size=2, num_workers=0, seed=0)
    os.makedirs(output_dir, exist_ok=True)  # as engine.setup
    run = engine.Run(config, output_dir, 'pretrain', resume=resume)
    run.prepare(model, loader, optimizer=opt)

    def train_step(model, batch, alpha):
        x, y = batch
        return {'loss': ((model(x) - y) ** 2).mean()}

    for epoch in run.epochs():
        run.train_epoch(epoch, train_step)
        run.end_epoch(epoch)
    return run, lrs, model.linear.weight.detach().clone()


def test_engine_steps_the_schedule_per_optimizer_step_and_resumes_it(tmp_path):
    whole = tmp_path / 'whole'
    run, lrs, weight = toy_training(whole)
    # 11 batches, 2 per optimiser step: 6 steps per epoch (the last one of a single batch)
    steps = 2 * math.ceil(11 / 2)
    assert len(lrs) == steps
    expected = [run.lr_scheduler.lr_at(k)[0] for k in range(steps)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[0] == pytest.approx(1e-3) and lrs[3] == pytest.approx(1e-2)  # warm-up: 3 steps
    assert lrs[-1] > 1e-4 and run.lr_scheduler.lr_at(steps) == [pytest.approx(1e-4)]

    # a run that stopped after 8 micro-batches (4 optimiser steps) of epoch 0 continues the same
    # per-step LRs and ends with the same weights
    resumed = tmp_path / 'resumed'
    resumed.mkdir()
    (resumed / 'checkpoint_00_step000008.pth').write_bytes(
        (whole / 'checkpoint_00_step000008.pth').read_bytes())
    run, later_lrs, resumed_weight = toy_training(resumed, resume=True)
    assert run.lr_scheduler.per_step
    assert later_lrs == pytest.approx(lrs[4:], rel=1e-12)
    assert torch.equal(resumed_weight, weight)


# ----------------------------------------------------------------------------- --opts key=null

def test_null_override_removes_optional_keys_and_refuses_required_ones(tmp_path):
    config = utils.with_defaults(utils.load_config('configs/tiny/VQA.yaml'), 'vqa')
    assert 'val_file' in config
    removed = utils.apply_overrides(config, ['val_file=null', 'augment.hflip=null'], 'vqa')
    assert 'val_file' not in removed and 'hflip' not in removed['augment']
    assert utils.validate(removed, 'vqa') is removed
    # a key whose null means something is set to None (random init), not removed
    assert utils.apply_overrides(config, ['text_decoder=null'])['text_decoder'] is None
    assert utils.apply_overrides({**config, 'text_encoder': 'bert-base-uncased'},
                                 ['text_encoder=null'])['text_encoder'] is None
    for item in ('test_file=null', 'optimizer.lr=~'):
        with pytest.raises(utils.ConfigError, match=f"'{item.split('=')[0]}' is required"):
            utils.apply_overrides(config, [item], 'vqa')
    with pytest.raises(utils.UnknownKeyError):
        utils.apply_overrides(config, ['val_fil=null'], 'vqa')

    # through a script's config loading: a key with a default gets its default back
    path = tmp_path / 'vqa.yaml'
    utils.save_config(config, path)
    args = utils.get_args_parser('VQA').parse_args(
        ['--config', str(path), '--output_dir', str(tmp_path / 'out'),
         '--opts', 'val_file=null', 'num_workers=null', 'optimizer.fused=null'])
    loaded = utils.load_task_config(args, 'vqa')
    assert 'val_file' not in loaded and loaded['num_workers'] == 4
    assert loaded['optimizer']['fused'] is False


# ----------------------------------------------------------------------------- threads

def test_threads_option_sets_torch_threads_on_cpu_only(tmp_path):
    before = torch.get_num_threads()
    try:
        engine.set_cpu_threads(None, 'cpu')
        assert torch.get_num_threads() == before
        engine.set_cpu_threads(1, 'cuda')
        assert torch.get_num_threads() == before
        path = tmp_path / 've.yaml'
        utils.save_config(utils.load_config('configs/tiny/VE.yaml'), path)
        args = utils.get_args_parser('VE').parse_args(
            ['--config', str(path), '--output_dir', str(tmp_path / 'out'), '--device', 'cpu',
             '--opts', 'threads=1'])
        run = engine.setup(args, 've')
        assert run.config['threads'] == 1 and torch.get_num_threads() == 1
        assert utils.with_defaults({}, 've')['threads'] is None
        with pytest.raises(utils.ConfigError, match='threads = 0'):
            utils.validate(utils.apply_overrides(run.config, ['threads=0']), 've')
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- VQA question ids

def _vqa_file(folder, ids):
    from PIL import Image
    Image.new('RGB', (8, 8)).save(folder / 'q.jpg')
    records = [{'question_id': qid, 'question': f'what is {i}?', 'image': 'q.jpg', 'dataset': 'vqa'}
               for i, qid in enumerate(ids)]
    path = folder / 'test.json'
    path.write_text(json.dumps(records))
    (folder / 'answers.json').write_text(json.dumps(['yes', 'no']))
    return path


def test_vqa_test_split_keeps_str_and_int_question_ids(tmp_path):
    import VQA
    ids = ['COCO_q1', 7, 'q-2', 1, '1']  # int 1 and str '1' are two questions
    dataset = vqa_dataset(str(_vqa_file(tmp_path, ids)), lambda image: torch.zeros(3, 4, 4),
                          str(tmp_path), str(tmp_path), split='test',
                          answer_list=str(tmp_path / 'answers.json'))
    images, questions, batch_ids = vqa_test_collate_fn([dataset[i] for i in range(len(ids))])
    assert images.shape == (5, 3, 4, 4) and batch_ids == ids
    results = [{'question_id': qid, 'answer': 'yes'} for qid in reversed(ids)]
    merged = VQA.merge_results([results[:2], results[2:] + results[:1]], ids)
    assert [r['question_id'] for r in merged] == ids
    path = VQA.save_results(merged, tmp_path / 'result', 'vqa_result_epoch0')
    assert [r['question_id'] for r in json.loads(open(path).read())] == ids  # types kept
    with pytest.raises(RuntimeError, match="'q-3'"):
        VQA.merge_results([results], ids + ['q-3'])
    # repeated ids are still refused, str ones too
    with pytest.raises(ValueError, match="question_id 'q-2' repeats"):
        vqa_dataset(str(_vqa_file(tmp_path, ['q-2', 3, 'q-2'])), None, str(tmp_path),
                    str(tmp_path), split='test', answer_list=str(tmp_path / 'answers.json'))
    with pytest.raises(ValueError, match="'question_id' must be int or str"):
        vqa_dataset(str(_vqa_file(tmp_path, [True])), None, str(tmp_path), str(tmp_path),
                    split='test', answer_list=str(tmp_path / 'answers.json'))


def test_vqa_accuracy_with_str_ids():
    from dataset.vqa_eval import vqa_accuracy
    annotations = [{'question_id': 'a', 'answer': ['yes'] * 10}, {'question_id': 1, 'answer': ['no'] * 10}]
    assert vqa_accuracy([{'question_id': 'a', 'answer': 'yes'}, {'question_id': 1, 'answer': 'yes'}],
                        annotations) == 0.5
    with pytest.raises(ValueError, match="question '1' has no predicted answer"):
        vqa_accuracy([{'question_id': 'a', 'answer': 'yes'}],
                     [{'question_id': '1', 'answer': ['no']}])


# ----------------------------------------------------------------------------- vocabulary

def test_build_vocab_from_annotation_and_text_files(tmp_path):
    (tmp_path / 'captions.json').write_text(json.dumps(
        [{'image': 'a.jpg', 'caption': ['A Red Circle.', 'a red circle left of a square']},
         {'image': 'b.jpg', 'caption': 'Two blue squares'}]))
    (tmp_path / 'vqa.json').write_text(json.dumps(
        [{'question_id': 1, 'question': 'How many squares?', 'answer': ['two', 'two'],
          'image': 'b.jpg', 'dataset': 'vqa'}]))
    (tmp_path / 'answers.json').write_text(json.dumps(['yes', 'no', 'two']))
    (tmp_path / 'extra.txt').write_text('Café crème\n\nthe triangle\n')
    files = [str(tmp_path / n) for n in ('captions.json', 'vqa.json', 'answers.json', 'extra.txt')]
    texts = build_vocab.read_texts(files)
    assert 'How many squares?' in texts and 'two' in texts and 'Café crème' in texts
    assert 'a.jpg' not in texts and 'vqa' not in texts  # not text fields

    out = tmp_path / 'tokenizer'
    size = build_vocab.main([*files, '--out', str(out), '--vocab_size', '300'])
    vocab = (out / 'vocab.txt').read_text(encoding='utf-8').split('\n')[:-1]
    assert len(vocab) == size <= 300
    # bert-base-uncased's layout: the ids of the special tokens are BERT's
    assert vocab[0] == '[PAD]' and vocab[1] == '[unused0]' and vocab[99] == '[unused98]'
    assert vocab[100:104] == ['[UNK]', '[CLS]', '[SEP]', '[MASK]']
    assert len(set(vocab)) == len(vocab)
    assert 'cafe' in vocab and 'Café' not in vocab  # lower-cased, accents stripped (uncased)
    tokenizer = BertTokenizer.from_pretrained(str(out))
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id,
            tokenizer.sep_token_id, tokenizer.mask_token_id) == (0, 100, 101, 102, 103)
    assert tokenizer.tokenize('A red CIRCLE') == ['a', 'red', 'circle']
    # a word never seen, made of seen characters, is word pieces, not [UNK]
    assert tokenizer.unk_token not in tokenizer.tokenize('circus squirrel')

    with pytest.raises(ValueError, match='no room'):
        build_vocab.train_vocab(texts, vocab_size=50)
    (tmp_path / 'boxes.json').write_text(json.dumps({'1': [[0, 0, 1, 1]]}))
    with pytest.raises(ValueError, match='holds no texts'):
        build_vocab.read_texts([str(tmp_path / 'boxes.json')])


def test_synthetic_vocabulary_comes_from_the_tool(tmp_path, monkeypatch):
    calls = []
    real = build_vocab.build_vocab
    monkeypatch.setattr(build_vocab, 'build_vocab', lambda *a, **k: calls.append(k) or real(*a, **k))
    files = generate(tmp_path / 'a', seed=0, size='tiny')
    assert calls == [{'vocab_size': 512}]
    generate(tmp_path / 'b', seed=0, size='tiny')
    vocab = (tmp_path / 'a' / 'tokenizer' / 'vocab.txt').read_text()
    assert (tmp_path / 'b' / 'tokenizer' / 'vocab.txt').read_text() == vocab  # deterministic
    vocab = vocab.split('\n')[:-1]
    assert vocab[0] == '[PAD]' and vocab[100:104] == ['[UNK]', '[CLS]', '[SEP]', '[MASK]']
    bert = json.loads(open('configs/tiny/config_bert.json').read())
    assert len(vocab) <= bert['vocab_size']
    texts = build_vocab.read_texts([files[name] for name in files if name.startswith(
        ('pretrain', 'retrieval', 'vqa', 'answer_list', 'nlvr', 've', 'refcoco+'))])
    tokenizer = BertTokenizer.from_pretrained(str(tmp_path / 'a' / 'tokenizer'))
    words = {w for t in texts for w in re.findall(r'[a-z0-9]+', t.lower())}
    assert all(tokenizer.tokenize(w) == [w] for w in words)  # every corpus word is one token
    assert tokenizer.unk_token not in tokenizer.tokenize('~ xyz 09 {q} ' + string.printable)


# ----------------------------------------------------------------------------- demo report

def test_every_synthetic_record_has_a_type_or_kind(tmp_path):
    generate(tmp_path, seed=0, size='tiny', vqa_val=40, nlvr_test=40, ve_test=40)
    read = lambda name: json.loads((tmp_path / name).read_text())
    types = {demo.vqa_question_type(r) for r in read('vqa_val.json')}
    assert types == {name for name, _ in demo.VQA_QUESTION_TYPES}
    kinds = {demo.nlvr_kind(r) for r in read('nlvr_test.json')}
    assert kinds == {name for name, _ in demo.NLVR_KINDS}
    assert {demo.ve_kind(r) for r in read('ve_test.json')} == {'size', 'position'}


def test_per_group_baselines_and_table():
    train = [{'question': 'How many shapes?', 'answer': ['2'] * 10},
             {'question': 'What color is the cross?', 'answer': ['red'] * 10}]
    val = [{'question': 'How many shapes?', 'answer': ['2'] * 10},
           {'question': 'How many shapes?', 'answer': ['3'] * 10},
           {'question': 'What color is the circle?', 'answer': ['blue'] * 10}]
    levels = vqa_baselines(train, val, ['2', '3', 'red', 'blue'], group=demo.vqa_question_type)
    assert levels['groups'] == {'count': {'n': 2, 'chance': pytest.approx(0.25), 'text_only': 0.5},
                                'color': {'n': 1, 'chance': pytest.approx(0.25), 'text_only': 0.0}}
    assert levels['text_only'] == pytest.approx(1 / 3)
    nlvr = [{'sentence': 'Both images contain a red shape.', 'label': 'True'},
            {'sentence': 'The left image contains a red cross.', 'label': 'False'}]
    levels = classification_baselines(nlvr, nlvr, group=demo.nlvr_kind)
    assert set(levels['groups']) == {'both images: colour', 'one image: colour + shape'}
    model = by_group(nlvr, [1.0, 0.0], demo.nlvr_kind)
    groups = demo.merge_groups(model, levels['groups'])
    assert groups['both images: colour'] == {'n': 1, 'value': 1.0, 'chance': 0.5,
                                             'majority': 1.0, 'text_only': 1.0}
    table = demo.groups_table({'nlvr': {'groups': groups}})
    assert 'one image: colour + shape' in table and '100.0%' in table
    assert demo.groups_table({}) == ''
