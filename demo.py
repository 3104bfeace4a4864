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


# tools/unimodal_init.py arguments: ~1.5 minutes on 2 CPU cores.
UNIMODAL_INIT = ['--vit_epochs', '10', '--bert_steps', '300']


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
    from dataset.baselines import vqa_baselines
    summary = VQA.main(ctx.args('VQA.yaml', 'vqa', '--checkpoint', ctx.pretrained()))
    levels = vqa_baselines(read_json('vqa_train.json'), read_json('vqa_val.json'),
                           read_json('answer_list.json'))
    return {'metric': 'val VQA accuracy', 'value': summary['val_vqa_acc'], **levels}


def stage_nlvr_pretrain(ctx):
    import Pretrain_nlvr
    stats = Pretrain_nlvr.main(ctx.args('NLVR_pretrain.yaml', 'nlvr_pretrain', '--checkpoint',
                                        ctx.pretrained()))
    return {'train': stats}


def stage_nlvr(ctx):
    import NLVR
    from dataset.baselines import classification_baselines
    result = NLVR.main(ctx.args('NLVR.yaml', 'nlvr', '--checkpoint',
                                ctx.pretrained('nlvr_pretrain')))
    levels = classification_baselines(read_json('nlvr_train.json'), read_json('nlvr_test.json'))
    return {'metric': 'test accuracy', 'value': result['test_acc'], **levels,
            'details': result}


def stage_ve(ctx):
    import VE
    from dataset.baselines import classification_baselines
    result = VE.main(ctx.args('VE.yaml', 've', '--checkpoint', ctx.pretrained()))
    levels = classification_baselines(read_json('ve_train.json'), read_json('ve_test.json'))
    return {'metric': 'test accuracy', 'value': result['test_acc'], **levels,
            'details': result}


def stage_grounding(ctx):
    import Grounding
    from dataset.baselines import grounding_chance
    from dataset.grounding_dataset import load_refer
    block = str(ctx.gradcam_block())
    result = Grounding.main(ctx.args('Grounding.yaml', 'grounding', '--checkpoint',
                                     ctx.pretrained(), '--block_num', block))
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
    ('init', 90, stage_init),
    ('pretrain', 170, stage_pretrain),
    ('retrieval', 50, stage_retrieval),
    ('vqa', 55, stage_vqa),
    ('nlvr_pretrain', 30, stage_nlvr_pretrain),
    ('nlvr', 130, stage_nlvr),
    ('ve', 40, stage_ve),
    ('grounding', 30, stage_grounding),
    ('report', 10, stage_report),
]
TASKS = ('retrieval', 'vqa', 'nlvr', 've', 'grounding')


# ------------------------------------------------------------------------------------- helpers

def read_json(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


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


def read_log(folder):
    path = os.path.join(folder, 'log.txt')
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(ctx):
    """One PNG per training stage: its per-epoch training losses from log.txt."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    written = []
    for stage in ('pretrain', 'retrieval', 'vqa', 'nlvr_pretrain', 'nlvr', 've', 'grounding'):
        epochs = [entry for entry in read_log(ctx.out(stage)) if 'epoch' in entry]
        names = sorted({k for e in epochs for k in e if k.startswith('train_loss')})
        if not epochs or not names:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        for name in names:
            points = [(e['epoch'], float(e[name])) for e in epochs if name in e]
            ax.plot(*zip(*points), marker='o', label=name.removeprefix('train_'))
        ax.set_xlabel('epoch')
        ax.set_ylabel('training loss')
        ax.set_title(stage)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(ctx.output_dir, f'loss_{stage}.png')
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
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


def run(output_dir, device, seed=42, stages=None, workdir=ROOT):
    """Run (or continue) the demo; returns the results dict also written to results.json.

    `workdir` holds data/synthetic and configs/tiny (the repository; tests use a copy with
    smaller settings)."""
    output_dir = os.path.abspath(output_dir)
    ctx = Context(output_dir, device, seed)
    done_dir = os.path.join(output_dir, 'stages')
    os.makedirs(done_dir, exist_ok=True)
    selected = [s for s in STAGES if stages is None or s[0] in stages]
    results, start = {}, time.time()
    expected_left = sum(seconds for _, seconds, _ in selected)
    spent_expected, spent = 0.0, 0.0
    with in_directory(workdir):
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        forget_stale_stages(ctx, done_dir, settings_fingerprint(seed))
        for number, (name, expected, function) in enumerate(selected, 1):
            marker = os.path.join(done_dir, f'{name}.json')
            if os.path.isfile(marker):
                with open(marker) as f:
                    results[name] = json.load(f)
                print(f'[demo] stage {number}/{len(selected)} {name}: done before, skipped',
                      flush=True)
                expected_left -= expected
                continue
            # ETA: the expected seconds left, scaled by how this machine compares so far.
            pace = spent / spent_expected if spent_expected >= 60 else 1.0
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
            expected_left -= expected
            with open(marker, 'w') as f:
                json.dump(result, f, indent=1, default=str)
            results[name] = result
    results['total_seconds'] = sum(r['seconds'] for r in results.values()
                                   if isinstance(r, dict) and 'seconds' in r)
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
    args = parser.parse_args(argv)
    results = run(args.output_dir, args.device, args.seed, args.stages)
    print('\n' + results_table(results))
    print(f'\ntotal {format_seconds(results["total_seconds"])}; results, loss curves and '
          f'Grad-CAM overlays in {os.path.abspath(args.output_dir)}')
    return results


if __name__ == '__main__':
    main()
