"""The whole ALBEF pipeline on synthetic data, in one command:

    python demo.py                      # CPU or the GPU if there is one; output/demo/
    python demo.py --output_dir out/demo --device cpu

Stages, each through the real task script and its configs/tiny YAML: synthetic data (written
to data/synthetic if absent), unimodal starting weights (tools/unimodal_init.py: a ViT that
names the shapes and a BERT trained with MLM, written to data/synthetic/init if absent; the
paper starts from DeiT and BERT), pre-training (ITC + ITM + MLM with momentum distillation),
retrieval, VQA, NLVR2 (text-assignment step, then fine-tuning), SNLI-VE and grounding. The
metrics are measured on held-out synthetic splits that no training stage reads, and are printed
next to the chance level and a text-only baseline estimated on the training split
(dataset/baselines.py). Written to --output_dir: results.json, loss-curve PNGs from the
training logs, Grad-CAM overlays, and every stage's own output folder.

On a CPU of two or more cores the fine-tuning stages run side by side in two child processes
(--jobs; their output in <output_dir>/logs/lane<k>.log).

A finished stage leaves stages/<name>.json; running the command again skips it, and an
interrupted pre-training continues from its last epoch checkpoint. After a change to
configs/tiny or to the data spec, finished stages are stale and run again.
"""
import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
DATA = 'data/synthetic'  # the path the tiny configs read (relative to the repository)
CONFIGS = 'configs/tiny'

logger = logging.getLogger('albef.demo')


# ------------------------------------------------------------------------------------- stages
# Each stage: (name, seconds it takes on 2 CPU cores: only for the ETA, run function).

# The synthetic data the tiny configs are tuned for (dataset/synthetic.py).
DATA_SPEC = dict(seed=0, size='small')


def stage_data(ctx):
    from dataset.synthetic import generate, manifest
    path = os.path.join(DATA, 'manifest.json')
    if os.path.isfile(path):
        with open(path) as f:
            try:
                written = json.load(f)
            except ValueError:  # a damaged manifest: the folder is not known to be the data
                written = None
        if written == manifest(**DATA_SPEC):
            return {'reused': DATA}
    # Absent, unreadable, or another seed / size / version: write it (again); weights made from
    # other data (data/synthetic/init) are stale.
    shutil.rmtree(os.path.join(DATA, 'init'), ignore_errors=True)
    generate(DATA, **DATA_SPEC)
    return {}


# tools/unimodal_init.py arguments: the ViT is the one that ships beside the tiny configs (made
# by tools.unimodal_init --vit_scenes 150000, ~15 minutes on 2 CPU cores, as DeiT's weights are
# made apart from ALBEF), copied and checked; the BERT is trained here (~30 s).
UNIMODAL_INIT = ['--vit', f'{CONFIGS}/vit_init.pth', '--bert_steps', '300']


def stage_init(ctx):
    """The unimodal starting weights the tiny Pretrain.yaml names (init_deit, text_encoder)."""
    from tools import unimodal_init
    from utils import load_config
    config = load_config(os.path.join(CONFIGS, 'Pretrain.yaml'))
    vit, bert = config['init_deit'], config['text_encoder']
    if os.path.isfile(vit) and os.path.isfile(os.path.join(bert, 'config.json')):
        return {'reused': [vit, bert]}
    folder = os.path.dirname(vit)  # tools/unimodal_init.py writes <out>/vit.pth and <out>/bert
    if os.path.normpath(bert) != os.path.join(folder, 'bert'):
        raise ValueError(f'{CONFIGS}/Pretrain.yaml: init_deit {vit!r} and text_encoder {bert!r} '
                         'must be <folder>/vit.pth and <folder>/bert')
    return unimodal_init.main(['--config', os.path.join(CONFIGS, 'Pretrain.yaml'),
                               '--out', folder, '--device', ctx.device,
                               '--seed', str(ctx.seed), *UNIMODAL_INIT])


def stage_pretrain(ctx):
    import Pretrain
    stats = Pretrain.main(ctx.args('Pretrain.yaml', 'pretrain', resume=True))
    return {'train': stats, 'checkpoint': ctx.pretrained()}


def stage_retrieval(ctx):
    import Retrieval
    result = Retrieval.main(ctx.args('Retrieval.yaml', 'retrieval', '--checkpoint',
                                     ctx.pretrained()))
    from dataset.baselines import retrieval_chance
    from dataset.caption_dataset import re_eval_dataset
    test = re_eval_dataset(os.path.join(DATA, 'retrieval_test.json'), None, DATA)
    chance = retrieval_chance(test.img2txt, len(test.text))
    return {'metric': 'test R@mean (%)', 'value': result['test']['r_mean'],
            'chance': chance['r_mean'], 'text_only': None, 'details': result['test']}


def stage_vqa(ctx):
    import VQA
    from dataset.baselines import by_group, vqa_baselines
    from dataset.vqa_eval import answer_accuracy
    summary = VQA.main(ctx.args('VQA.yaml', 'vqa', '--checkpoint', ctx.pretrained()))
    val = read_json('vqa_val.json')
    levels = vqa_baselines(read_json('vqa_train.json'), val, read_json('answer_list.json'),
                           group=vqa_question_type)
    with open(summary['val_result_file']) as f:
        predicted = {r['question_id']: r['answer'] for r in json.load(f)}
    scores = [answer_accuracy(predicted[ann['question_id']], ann['answer']) for ann in val]
    import engine
    similarity = {'pretrained': question_similarity(ctx.pretrained(), val, ctx.device),
                  'fine-tuned': question_similarity(engine.checkpoints(ctx.out('vqa'))[0], val,
                                                    ctx.device)}
    return {'metric': 'val VQA accuracy', 'value': summary['val_vqa_acc'], **levels,
            'question_similarity': similarity,
            'groups': merge_groups(by_group(val, scores, vqa_question_type), levels['groups'])}


def stage_nlvr_pretrain(ctx):
    import Pretrain_nlvr
    stats = Pretrain_nlvr.main(ctx.args('NLVR_pretrain.yaml', 'nlvr_pretrain', '--checkpoint',
                                        ctx.pretrained()))
    return {'train': stats}


def stage_nlvr(ctx):
    import NLVR
    from dataset.baselines import by_group, classification_baselines
    result = NLVR.main(ctx.args('NLVR.yaml', 'nlvr', '--checkpoint',
                                ctx.pretrained('nlvr_pretrain')))
    test = read_json('nlvr_test.json')
    levels = classification_baselines(read_json('nlvr_train.json'), test, group=nlvr_kind)
    correct = correct_labels(ctx, 'nlvr', test, lambda r: [os.path.join(DATA, p) for p in r['images']])
    return {'metric': 'test accuracy', 'value': result['test_acc'], **levels, 'details': result,
            'groups': merge_groups(by_group(test, correct, nlvr_kind), levels['groups'])}


def stage_ve(ctx):
    import VE
    from dataset.baselines import by_group, classification_baselines
    result = VE.main(ctx.args('VE.yaml', 've', '--checkpoint', ctx.pretrained()))
    test = read_json('ve_test.json')
    levels = classification_baselines(read_json('ve_train.json'), test, group=ve_kind)
    correct = correct_labels(ctx, 've', test, lambda r: os.path.join(DATA, r['image'] + '.jpg'))
    return {'metric': 'test accuracy', 'value': result['test_acc'], **levels, 'details': result,
            'groups': merge_groups(by_group(test, correct, ve_kind), levels['groups'])}


def stage_grounding(ctx):
    import Grounding
    from dataset.baselines import grounding_chance
    from dataset.grounding_dataset import load_refer
    from utils import load_config
    # Grounding.py's itc mode (an option of the original): Grad-CAM of the image-text similarity
    # through the last ViT block. On the tiny model it localises better than the itm mode
    # through a fusion layer (measured on one grounding checkpoint: 64% against 36-41%).
    block = str(load_config(os.path.join(CONFIGS, 'Grounding.yaml'))['vit_depth'] - 1)
    result = Grounding.main(ctx.args('Grounding.yaml', 'grounding', '--checkpoint',
                                     ctx.pretrained(), '--gradcam_mode', 'itc',
                                     '--block_num', block))
    with open(os.path.join(DATA, 'dets.json')) as f:
        chance = grounding_chance(load_refer(DATA, 'refcoco+', 'unc'), json.load(f))
    accuracy = result['accuracy']
    test = [key for key in ('testA_d', 'testB_d') if accuracy[key] == accuracy[key]]  # not nan
    mean = lambda d: sum(d[k] for k in test) / len(test)
    return {'metric': 'test accuracy (IoU >= 0.5)', 'value': mean(accuracy),
            'chance': mean(chance), 'text_only': None, 'details': accuracy}


def stage_report(ctx):
    figures = plot_losses(ctx)
    overlays = gradcam_overlays(ctx)
    return {'plots': figures, 'gradcam': overlays}


STAGES = [
    ('data', 10, stage_data),
    ('init', 30, stage_init),
    ('pretrain', 150, stage_pretrain),
    ('retrieval', 45, stage_retrieval),
    ('vqa', 250, stage_vqa),
    ('nlvr_pretrain', 20, stage_nlvr_pretrain),
    ('nlvr', 115, stage_nlvr),
    ('ve', 50, stage_ve),
    ('grounding', 55, stage_grounding),
    ('report', 10, stage_report),
]
TASKS = ('retrieval', 'vqa', 'nlvr', 've', 'grounding')

# The fine-tuning stages read only the pre-trained checkpoint (NLVR2 also its text-assignment
# step's): with --jobs N they run side by side in N child processes, the CPU's cores shared out
# as their threads. A model this small gains little from a second thread (on 2 cores a VQA step
# takes 0.21-0.24 s at one thread beside another stage, 0.17-0.19 s at two threads alone), so
# two lanes finish the fine-tuning in about half the time (docs/demo.md).
PARALLEL = ('retrieval', 'vqa', 'nlvr_pretrain', 'nlvr', 've', 'grounding')
PREREQUISITE = {'nlvr': 'nlvr_pretrain'}  # runs in the same lane, after it


def plan_lanes(names, jobs):
    """`names` (in STAGES order) split into at most `jobs` lanes of about equal expected time
    (the longest first, each onto the least loaded lane), a stage after its prerequisite.
    Returns (lanes, the longest lane's expected seconds)."""
    expected = {name: seconds for name, seconds, _ in STAGES}
    units = []
    for name in names:
        before = PREREQUISITE.get(name)
        if before in names:
            next(unit for unit in units if before in unit).append(name)
        else:
            units.append([name])
    lanes = [[] for _ in range(max(1, min(jobs, len(units))))]
    load = [0] * len(lanes)
    for unit in sorted(units, key=lambda unit: -sum(expected[n] for n in unit)):
        k = load.index(min(load))
        lanes[k] += unit
        load[k] += sum(expected[n] for n in unit)
    order = [name for name, _, _ in STAGES]  # the order a lane runs its stages in
    return [sorted(lane, key=order.index) for lane in lanes], max(load)


def expected_seconds(names, jobs):
    """The expected seconds of running the stages `names`, in lanes when `jobs` > 1."""
    expected = {name: seconds for name, seconds, _ in STAGES}
    parallel = [name for name in names if name in PARALLEL]
    if jobs > 1 and len(parallel) > 1:
        return (sum(expected[n] for n in names if n not in PARALLEL) +
                plan_lanes(parallel, jobs)[1])
    return sum(expected[n] for n in names)


def usable_cores():
    """The cores this process may run on (taskset and container limits count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def default_jobs(device):
    """Two lanes on a CPU of two or more cores, one on a GPU."""
    return 2 if torch.device(device).type == 'cpu' and usable_cores() >= 2 else 1


# ------------------------------------------------------------------------------------- helpers

def read_json(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


# The question types and statement kinds of dataset/synthetic.py, told apart by their templates
# (first match; tests/test_small_runs.py checks that every synthetic record has one).
VQA_QUESTION_TYPES = (('left/right', 'to the left or to the right of'), ('above/below', 'above or below'),
                      ('count', 'how many'), ('color', 'color'), ('shape', 'shape'),
                      ('exists', 'is there'), ('relation yes/no', 'is the '))
NLVR_KINDS = (('one image: colour + shape', 'image contains'),
              ('both images: colour', 'both images contain'), ('count comparison', 'more shapes'))
VE_KINDS = (('position', ' is at the '), ('size', ' is '))


def _kind(text, kinds):
    text = text.lower()
    return next((name for name, phrase in kinds if phrase in text), 'other')


def vqa_question_type(record):
    return _kind(record['question'], VQA_QUESTION_TYPES)


def nlvr_kind(record):
    return _kind(record['sentence'], NLVR_KINDS)


def ve_kind(record):
    return _kind(record['sentence'], VE_KINDS)


def merge_groups(model, levels):
    """{group: {'n', 'value' (the model's), 'chance', 'text_only', ...}} from by_group() of the
    model's per-record scores and the baselines' 'groups'."""
    return {name: {'n': entry['n'], 'value': entry['mean'],
                   **{k: v for k, v in levels[name].items() if k != 'n'}}
            for name, entry in model.items()}


def correct_labels(ctx, stage, records, images):
    """1.0 / 0.0 per record: whether the stage's final model (its newest checkpoint, the one
    the script's test accuracy is of) predicts the record's label, through the inference API;
    `images(record)` gives what ALBEFInference.classify takes."""
    import engine
    from albef.api import ALBEFInference
    model = ALBEFInference.from_checkpoint(engine.checkpoints(ctx.out(stage))[0], device=ctx.device)
    correct = []
    for record in records:
        probs = model.classify(images(record), record['sentence'])
        correct.append(float(max(probs, key=probs.get) == record['label']))
    return correct


# Questions of different types about one image: a model that reads the question gives them
# different fused states; one that ignores it (a fine-tuning LR too high for a short run) gives
# them the same state and answers them alike.
PROBE_QUESTIONS = ('what color is the shape?', 'what shape is the object?',
                   'how many shapes are there?', 'is there a red circle?')


@torch.no_grad()
def question_similarity(checkpoint, records, device, count=50):
    """Mean pairwise cosine similarity of the multimodal encoder's [CLS] states of
    PROBE_QUESTIONS, each over the same held-out image, averaged over `count` images: near 1,
    the question is ignored. `checkpoint`: a pre-training or VQA checkpoint (the VQA question
    encoder starts as the pre-trained text encoder, so the two are compared alike)."""
    from albef.api import load_model
    from dataset.images import load_image
    from dataset.utils import pre_question
    model, transform, tokenizer = load_model(checkpoint, device=device)
    encoder = model.text_encoder.base_model  # the BertModel of a BertForMaskedLM or itself
    question = tokenizer([pre_question(q) for q in PROBE_QUESTIONS], padding='longest',
                         return_tensors='pt').to(device)
    similarities = []
    for record in records[:count]:
        image = transform(load_image(os.path.join(DATA, record['image']))).unsqueeze(0).to(device)
        image_embeds = model.visual_encoder(image).expand(len(PROBE_QUESTIONS), -1, -1)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        states = encoder(question.input_ids, attention_mask=question.attention_mask,
                         encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                         mode='multi_modal').last_hidden_state[:, 0]
        states = torch.nn.functional.normalize(states.float(), dim=-1)
        cosine = states @ states.t()
        pairs = torch.triu_indices(len(PROBE_QUESTIONS), len(PROBE_QUESTIONS), offset=1)
        similarities.append(cosine[pairs[0], pairs[1]].mean().item())
    return sum(similarities) / len(similarities)


class Context:
    def __init__(self, output_dir, device, seed):
        self.output_dir, self.device, self.seed = output_dir, device, seed

    def out(self, stage):
        return os.path.join(self.output_dir, stage)

    def args(self, config, stage, *extra, resume=False):
        """The command line of a stage. A stage that did not finish before (the demo was
        killed) continues with `resume`, else starts again in an emptied folder (a script
        refuses a folder holding an earlier run)."""
        if not resume:
            shutil.rmtree(self.out(stage), ignore_errors=True)
        return ['--config', os.path.join(CONFIGS, config), '--output_dir', self.out(stage),
                '--device', self.device, '--seed', str(self.seed),
                *(['--resume'] if resume else []), *extra]

    def pretrained(self, stage='pretrain'):
        """A pre-training stage's last epoch-end checkpoint (step checkpoints are for resuming)."""
        import engine
        ends = [p for p in engine.checkpoints(self.out(stage)) if '_step' not in p]
        if not ends:
            raise FileNotFoundError(f'no {stage} checkpoint in {self.out(stage)}')
        return ends[0]

    def gradcam_block(self):
        from models.albef_base import load_bert_config
        from models.gradcam import default_block
        from utils import load_config
        return default_block(load_bert_config(load_config(os.path.join(CONFIGS, 'Grounding.yaml'))))


def plot_losses(ctx):
    """One PNG per training stage: its training losses per step (tools/plot_log.py)."""
    from tools.plot_log import plot_runs

    written = []
    for stage in ('pretrain', 'retrieval', 'vqa', 'nlvr_pretrain', 'nlvr', 've', 'grounding'):
        folder = ctx.out(stage)
        if not os.path.isdir(folder) or not (os.path.isfile(os.path.join(folder, 'log.txt')) or
                                             os.path.isfile(os.path.join(folder, 'log_steps.jsonl'))):
            continue
        try:
            written.append(plot_runs([folder], os.path.join(ctx.output_dir, f'loss_{stage}.png'),
                                     title=stage, smooth=5))
        except ValueError:  # a stage that logged no training loss (evaluation only)
            continue
    return written


def gradcam_overlays(ctx, count=3):
    """Grad-CAM overlays (albef.api GradCAMMaps.save) of the grounding model on a few held-out
    referring expressions."""
    from albef.api import ALBEFInference
    from PIL import Image

    checkpoint = os.path.join(ctx.out('grounding'), 'checkpoint_best.pth')
    if not os.path.isfile(checkpoint):
        return []
    model = ALBEFInference.from_checkpoint(checkpoint, device=ctx.device)
    folders = []
    for i, record in enumerate(read_json('refcoco+_test.json')[:count]):
        image = Image.open(os.path.join(DATA, record['image'])).convert('RGB')
        cam = model.gradcam(image, record['text'], block_num=ctx.gradcam_block())
        folder = os.path.join(ctx.output_dir, 'gradcam', f'{i}_{record["text"].replace(" ", "_")}')
        cam.save(folder)
        folders.append(folder)
    return folders


def format_seconds(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f'{minutes}m{seconds:02d}s'


def results_table(results):
    def fmt(value, metric):
        if value is None:
            return '-'
        return f'{value:.1f}' if '%' in metric else f'{100 * value:.1f}%'
    rows = [('task', 'metric (held-out split)', 'ALBEF', 'chance', 'text-only', 'time')]
    for task in TASKS:
        r = results.get(task)
        if r:
            rows.append((task, r['metric'], fmt(r['value'], r['metric']),
                         fmt(r['chance'], r['metric']), fmt(r.get('text_only'), r['metric']),
                         format_seconds(r['seconds'])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ['  '.join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def groups_table(results):
    """Per question type (VQA) and statement kind (NLVR2, SNLI-VE): the model's accuracy next
    to the chance level and the text-only baseline of the same records."""
    rows = [('task', 'type / kind', 'n', 'ALBEF', 'chance', 'text-only')]
    for task in TASKS:
        for name, g in (results.get(task) or {}).get('groups', {}).items():
            rows.append((task, name, str(g['n']), *(f'{100 * g[k]:.1f}%' for k in
                                                   ('value', 'chance', 'text_only'))))
    if len(rows) == 1:
        return ''
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ['  '.join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)


@contextlib.contextmanager
def in_directory(path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def settings_fingerprint(seed):
    """A digest of what the results depend on besides the code: the data spec (with the
    generator's version), the unimodal-init arguments, the seed and every file of configs/tiny."""
    from dataset.synthetic import manifest
    digest = hashlib.sha256(json.dumps([manifest(**DATA_SPEC), UNIMODAL_INIT, seed]).encode())
    for name in sorted(os.listdir(CONFIGS)):
        with open(os.path.join(CONFIGS, name), 'rb') as f:
            digest.update(name.encode() + b'\0' + f.read())
    return digest.hexdigest()


def forget_stale_stages(ctx, done_dir, fingerprint):
    """Finished stages count only for the settings they ran with: after a change of the data
    spec or of configs/tiny, their markers and output folders are removed and they run again
    (an interrupted run with unchanged settings keeps them)."""
    path = os.path.join(done_dir, 'settings.sha256')
    previous = None
    if os.path.isfile(path):
        with open(path) as f:
            previous = f.read().strip()
    markers = [name for name, _, _ in STAGES
               if os.path.isfile(os.path.join(done_dir, f'{name}.json'))]
    if previous != fingerprint and (markers or previous is not None):
        print(f'[demo] the data spec or {CONFIGS} changed since the stages in {done_dir} ran: '
              f'running them again', flush=True)
        for name, _, _ in STAGES:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(done_dir, f'{name}.json'))
            shutil.rmtree(ctx.out(name), ignore_errors=True)
    with open(path, 'w') as f:
        f.write(fingerprint + '\n')


def run_lanes(ctx, lanes, workdir):
    """Run every lane's stages at once, each lane in a child `demo.py --lane` whose output goes
    to <output_dir>/logs/lane<k>.log, and report each stage as it finishes. A lane that fails is
    an error naming its log once every lane has ended; the stages that finished keep their
    markers, so running the demo again continues from there."""
    logs = os.path.join(ctx.output_dir, 'logs')
    os.makedirs(logs, exist_ok=True)
    env = {**os.environ, 'OMP_NUM_THREADS': str(max(1, usable_cores() // len(lanes)))}
    children = []
    try:
        for k, lane in enumerate(lanes, 1):
            log = os.path.join(logs, f'lane{k}.log')
            with open(log, 'w') as f:
                child = subprocess.Popen(
                    [sys.executable, os.path.join(ROOT, 'demo.py'), '--lane', '--jobs', '1',
                     '--workdir', workdir,
                     '--output_dir', ctx.output_dir, '--device', ctx.device, '--seed', str(ctx.seed),
                     '--stages', *lane], stdout=f, stderr=subprocess.STDOUT, env=env)
            children.append((k, lane, log, child))
            print(f'[demo] lane {k}: {", ".join(lane)} (log: {log})', flush=True)
        finished = set()
        while True:
            running = [child for *_, child in children if child.poll() is None]
            for k, lane, _, _ in children:
                for name in lane:
                    try:
                        with open(os.path.join(ctx.output_dir, 'stages', f'{name}.json')) as f:
                            seconds = json.load(f)['seconds']
                    except (OSError, ValueError, KeyError):  # not written yet, or being written
                        continue
                    if name not in finished:
                        finished.add(name)
                        print(f'[demo] {name} finished in lane {k} ({format_seconds(seconds)})',
                              flush=True)
            if not running:
                break
            time.sleep(1)
    finally:
        for *_, child in children:  # interrupted: no lane outlives the demo
            if child.poll() is None:
                child.terminate()
                child.wait()
    failed = [f'lane {k} ({", ".join(lane)}) ended with exit status {child.returncode}: see {log}'
              for k, lane, log, child in children if child.returncode]
    if failed:
        raise RuntimeError('; '.join(failed))


def run(output_dir, device, seed=42, stages=None, workdir=ROOT, jobs=1, lane=False):
    """Run (or continue) the demo; returns the results dict also written to results.json.

    `workdir` holds data/synthetic and configs/tiny (the repository; tests use a copy with
    smaller settings). With `jobs` > 1 the fine-tuning stages run in that many lanes at once
    (`run_lanes`); `lane`: this is one of them (results.json is left to the parent)."""
    workdir = os.path.abspath(workdir)
    jobs = 1 if lane else jobs  # a lane runs its stages one after the other
    output_dir = os.path.abspath(output_dir)
    ctx = Context(output_dir, device, seed)
    done_dir = os.path.join(output_dir, 'stages')
    os.makedirs(done_dir, exist_ok=True)
    selected = [s for s in STAGES if stages is None or s[0] in stages]
    results, start = {}, time.time()
    spent_expected, spent = 0.0, 0.0
    with in_directory(workdir):
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        if not lane:  # a lane's parent has just checked them
            forget_stale_stages(ctx, done_dir, settings_fingerprint(seed))
        in_lanes = set()
        done = lambda stage: os.path.isfile(os.path.join(done_dir, f'{stage}.json'))
        for number, (name, expected, function) in enumerate(selected, 1):
            marker = os.path.join(done_dir, f'{name}.json')
            if name in in_lanes:
                with open(marker) as f:
                    results[name] = json.load(f)
                continue
            if os.path.isfile(marker):
                with open(marker) as f:
                    results[name] = json.load(f)
                print(f'[demo] stage {number}/{len(selected)} {name}: done before, skipped',
                      flush=True)
                continue
            # ETA: the expected seconds left, scaled by how this machine compares so far.
            pace = spent / spent_expected if spent_expected >= 60 else 1.0
            expected_left = expected_seconds([n for n, _, _ in selected[number - 1:] if not done(n)],
                                             jobs)
            pending = [n for n, _, _ in selected[number - 1:] if n in PARALLEL and not done(n)]
            if jobs > 1 and name in PARALLEL and len(pending) > 1:
                lanes, longest = plan_lanes(pending, jobs)
                print(f'[demo] {len(pending)} stages in {len(lanes)} parallel lanes: '
                      f'{", ".join(pending)} | elapsed '
                      f'{format_seconds(time.time() - start)} | ETA '
                      f'{format_seconds(pace * expected_left)}', flush=True)
                began = time.time()
                run_lanes(ctx, lanes, workdir)
                results['lanes'] = lanes
                spent += time.time() - began
                spent_expected += longest
                in_lanes.update(pending)
                with open(marker) as f:
                    results[name] = json.load(f)
                continue
            print(f'[demo] stage {number}/{len(selected)} {name} | elapsed '
                  f'{format_seconds(time.time() - start)} | ETA '
                  f'{format_seconds(pace * expected_left)}', flush=True)
            began = time.time()
            result = function(ctx)
            seconds = time.time() - began
            result['seconds'] = seconds
            if 'reused' not in result:  # reusing files says nothing of this machine's pace
                spent += seconds
                spent_expected += expected
            with open(marker, 'w') as f:
                json.dump(result, f, indent=1, default=str)
            results[name] = result
    results['total_seconds'] = sum(r['seconds'] for r in results.values()
                                   if isinstance(r, dict) and 'seconds' in r)
    results['wall_seconds'] = time.time() - start  # this call's (lanes overlap their stages)
    if not lane:
        with open(os.path.join(output_dir, 'results.json'), 'w') as f:
            json.dump(results, f, indent=1, default=str)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--output_dir', default='output/demo')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--seed', default=42, type=int)
    parser.add_argument('--stages', nargs='+', choices=[s[0] for s in STAGES], default=None,
                        help='run only these stages (default: all)')
    parser.add_argument('--jobs', type=int, default=None,
                        help='fine-tuning stages run side by side in this many processes, the '
                             'cores shared out among them (default: 2 on a CPU of 2 or more '
                             'cores, 1 on a GPU)')
    parser.add_argument('--workdir', default=ROOT,
                        help='the folder holding data/synthetic and configs/tiny (default: the '
                             'repository)')
    parser.add_argument('--lane', action='store_true', help=argparse.SUPPRESS)  # run_lanes' child
    args = parser.parse_args(argv)
    jobs = default_jobs(args.device) if args.jobs is None else args.jobs
    if jobs < 1:
        parser.error(f'--jobs {jobs}: at least 1')
    if not os.path.isdir(args.workdir):
        parser.error(f'--workdir {args.workdir}: no such folder')
    results = run(args.output_dir, args.device, args.seed, args.stages, workdir=args.workdir,
                  jobs=jobs, lane=args.lane)
    if args.lane:
        return results
    print('\n' + results_table(results))
    groups = groups_table(results)
    if groups:
        print('\n' + groups)
    similarity = (results.get('vqa') or {}).get('question_similarity')
    if similarity:
        print(f'\nVQA: mean cosine of the fused [CLS] states of {len(PROBE_QUESTIONS)} questions of '
              f'different types about one image (1.0: the question is ignored): pre-trained '
              f'{similarity["pretrained"]:.2f}, fine-tuned {similarity["fine-tuned"]:.2f}')
    total, wall = results['total_seconds'], results['wall_seconds']
    overlap = (f' ({format_seconds(wall)} on the clock: fine-tuning stages side by side)'
               if 'lanes' in results else '')
    print(f'\ntotal {format_seconds(total)}{overlap}; results, loss curves and '
          f'Grad-CAM overlays in {os.path.abspath(args.output_dir)}')
    return results


if __name__ == '__main__':
    main()
