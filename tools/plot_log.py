"""Draw the training-loss curves of one or more runs (their --output_dir folders).

    python -m tools.plot_log output/pretrain --out pretrain_loss.png
    python -m tools.plot_log output/ve_lr1e-4 output/ve_lr5e-5 --out compare.png --smooth 50

Per step from log_steps.jsonl (every run writes it), else per epoch from log.txt (runs of
earlier versions, the original's). One panel per loss, one line per run; `--smooth N` draws
the running mean over N steps. Needs matplotlib (`pip install -e .[viz]`).
"""
import argparse
import json
import os

import utils


def loss_curves(output_dir):
    """(x label, {loss name: [(x, value), ...]}) of a run: per step when it has a step log."""
    steps = utils.read_step_log(output_dir)
    if steps:
        curves = {}
        for record in steps:
            for name, value in record.items():
                if name.startswith('loss'):
                    curves.setdefault(name, []).append((record['step'], float(value)))
        return 'step', curves
    path = os.path.join(output_dir, 'log.txt')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{output_dir} holds neither {utils.StepLog.FILE} nor log.txt')
    curves = {}
    with open(path) as f:
        for line in f:
            entry = json.loads(line) if line.strip() else {}
            for name, value in entry.items():
                if name.startswith('train_loss') and 'epoch' in entry:
                    curves.setdefault(name.removeprefix('train_'), []).append(
                        (entry['epoch'], float(value)))
    return 'epoch', curves


def running_mean(values, window):
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(output_dirs, path, title=None, smooth=1):
    """Write a PNG to `path` with the loss curves of every run in `output_dirs`; returns `path`."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    runs = [(os.path.basename(os.path.normpath(d)), *loss_curves(d)) for d in output_dirs]
    names = sorted({name for _, _, curves in runs for name in curves})
    if not names:
        raise ValueError(f'no training losses logged in {", ".join(map(str, output_dirs))}')
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), dpi=100,
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        for run, x_label, curves in runs:
            if name in curves:
                x, y = zip(*curves[name])
                y = running_mean(list(y), smooth) if smooth > 1 else y
                ax.plot(x, y, marker='o' if len(x) < 30 else None, label=run)
                ax.set_xlabel(x_label)
        ax.set_title(name)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n\n', 1)[1])
    parser.add_argument('output_dirs', nargs='+', help='run folders (--output_dir of a script)')
    parser.add_argument('--out', default='loss.png', help='the PNG written (default: loss.png)')
    parser.add_argument('--title', default=None)
    parser.add_argument('--smooth', type=int, default=1, help='running mean over N steps')
    args = parser.parse_args(argv)
    print(plot_runs(args.output_dirs, args.out, args.title, max(args.smooth, 1)))


if __name__ == '__main__':
    utils.run(main)
