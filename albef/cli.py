"""Command line for albef.api: `albef <command> --checkpoint C ...` (or `python -m albef ...`).

    albef embed-images --checkpoint C --images DIR --out feats.pt   (or .npy)
    albef embed-texts  --checkpoint C --texts "a dog" "a cat" --out feats.npy
    albef score        --checkpoint C --image I --captions "a dog" "a cat"
    albef answer       --checkpoint C --image I --question "what color?" --k 5
    albef gradcam      --checkpoint C --image I --text "the dog" --out overlays/
    albef export       C --out DIR [--dtype fp16]    (an inference-only folder: albef.export)
    albef list                                       (the released checkpoints by name)

C is a checkpoint file, an export folder or a released checkpoint's name (`albef list`). A
released file (no stored config) needs --config, the YAML it was trained with (a name brings
the config it pairs with). Errors
(a wrong file, kind, config, device, image or argument) print one line and exit with status 2;
--debug (or ALBEF_DEBUG=1) shows the full traceback instead.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import utils
from albef import hub
from albef.api import ALBEFInference
from albef.export import DTYPES, export_model

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff'}


def positive_int(text):
    """argparse type of counts (--k, --batch_size)."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return number


def image_files(folder):
    """Every image file under `folder` (recursively), sorted."""
    if not Path(folder).is_dir():
        raise ValueError(f'--images {folder}: not a folder')
    paths = sorted(str(p) for p in Path(folder).rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f'no images ({", ".join(sorted(IMAGE_SUFFIXES))}) under {folder}')
    return paths


def check_out(out):
    if Path(out).suffix not in ('.pt', '.npy'):
        raise ValueError(f'--out must end in .pt or .npy, got {out}')


def read_texts(args):
    texts = list(args.texts or [])
    if args.file:
        texts += [line.strip() for line in Path(args.file).read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError('embed-texts needs --texts or --file (with at least one non-empty line)')
    return texts


def read_answers(value):
    """--answers: a JSON file holding a list of candidate answers, or such a list inline."""
    if value is None:
        return None
    in_file = Path(value).is_file()
    if not in_file and not value.lstrip().startswith('['):
        raise ValueError(f'--answers {value}: no such file (give a JSON file or an inline JSON '
                         'list such as \'["yes", "no"]\')')
    name = f'--answers {value}' if in_file else '--answers'
    try:
        answers = json.loads(Path(value).read_text() if in_file else value)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f'{name}: not JSON ({error})') from None
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f'{name}: must be a JSON list of strings, got {str(answers)[:80]}')
    if not answers:
        raise ValueError(f'{name}: answer needs at least one candidate answer, got []')
    return answers


def save_features(out, name, items, features):
    """`.pt`: {name: items, 'features': (N, E) tensor}; `.npy`: the (N, E) array, with the
    items as a JSON list beside it (<stem>.<name>.json)."""
    out = Path(out)
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == '.pt':
        torch.save({name: list(items), 'features': features}, out)
    else:
        np.save(out, features.numpy())
        out.with_suffix(f'.{name}.json').write_text(json.dumps(list(items)))
    print(f'{len(items)} {name} x {features.shape[1]} features -> {out}')


def embed_images(albef, args):
    save_features(args.out, 'paths', args.inputs, albef.image_embeddings(args.inputs))
    return args.inputs


def embed_texts(albef, args):
    save_features(args.out, 'texts', args.inputs, albef.text_embeddings(args.inputs))
    return args.inputs


def score(albef, args):
    itm = albef.itm_scores(args.image, args.captions).tolist()
    itc = (albef.text_embeddings(args.captions) @ albef.image_embeddings([args.image])[0]).tolist()
    rows = sorted(({'caption': c, 'itm': s, 'itc': t} for c, s, t in zip(args.captions, itm, itc)),
                  key=lambda row: -row['itm'])
    print(f'{"ITM":>7} {"ITC":>7}  caption')
    for row in rows:
        print(f'{row["itm"]:7.4f} {row["itc"]:7.4f}  {row["caption"]}')
    return rows


def answer(albef, args):
    answers = albef.answer(args.image, args.question, args.inputs, k=args.k)
    for row in answers:
        print(f'{row["score"]:7.4f}  {row["answer"]}')
    return answers


def gradcam(albef, args):
    paths = albef.gradcam(args.image, args.text, block_num=args.block_num).save(args.out)
    print('\n'.join(paths))
    return paths


COMMANDS = {'embed-images': embed_images, 'embed-texts': embed_texts, 'score': score,
            'answer': answer, 'gradcam': gradcam}


def export(args):
    manifest = export_model(args.source, args.out, dtype=args.dtype, config=args.config)
    print(f'{manifest["kind"]} model, {manifest["tensors"]} tensors in {manifest["dtype"]} '
          f'({manifest["dropped_training_tensors"]} training-only tensors left out) -> {args.out}')
    return manifest


def list_released(args):
    return hub.list_pretrained(file=sys.stdout)


# Commands that load no model for inference.
OTHER_COMMANDS = {'export': export, 'list': list_released}


def read_inputs(args):
    """The command's own inputs, checked before the checkpoint is loaded (a mistake costs no
    model loading): the image paths, the texts or the candidate answers (None: none needed)."""
    if args.command in ('embed-images', 'embed-texts'):
        check_out(args.out)
    if args.command == 'embed-images':
        return image_files(args.images)
    if args.command == 'embed-texts':
        return read_texts(args)
    if args.command == 'answer':
        return read_answers(args.answers)
    return None


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--checkpoint', required=True,
                        help='a checkpoint file (.pth), an export folder or a released name')
    common.add_argument('--config', default=None,
                        help='its training YAML (required when the file stores no config)')
    common.add_argument('--device', default=None,
                        help='torch device (default: cuda if available, else cpu)')
    common.add_argument('--batch_size', type=positive_int, default=32,
                        help='images or texts encoded per forward pass')
    common.add_argument('--precision', default='fp32', choices=('fp32', 'bf16', 'fp16'),
                        help='autocast dtype of the model (bf16 / fp16 on a GPU)')
    common.add_argument('--debug', action='store_true',
                        help='show the full traceback on errors')
    parser = argparse.ArgumentParser(prog='albef', description=__doc__,
                                     formatter_class=utils.HelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    add = lambda name, help: sub.add_parser(name, parents=[common], help=help, description=help,
                                            formatter_class=utils.HelpFormatter)
    p = add('embed-images', 'ITC features of every image in a folder')
    p.add_argument('--images', required=True, help='a folder (searched recursively)')
    p.add_argument('--out', required=True, help='a .pt or .npy file')
    p = add('embed-texts', 'ITC features of texts')
    p.add_argument('--texts', nargs='+', help='the texts (and/or --file)')
    p.add_argument('--file', help='a text file, one text per line')
    p.add_argument('--out', required=True, help='a .pt or .npy file')
    p = add('score', 'ITM and ITC scores of an image against captions, best first')
    p.add_argument('--image', required=True, help='an image file')
    p.add_argument('--captions', nargs='+', required=True, help='the captions to score')
    p = add('answer', 'answer a question about an image (VQA checkpoint)')
    p.add_argument('--image', required=True, help='an image file')
    p.add_argument('--question', required=True, help='the question')
    p.add_argument('--answers', help='a JSON file with a list of candidate answers, or the list '
                                     "itself (default: the config's answer_list)")
    p.add_argument('--k', type=positive_int, default=5, help='how many answers to print, best first')
    p = add('gradcam', 'Grad-CAM overlays, one PNG per word piece and their average')
    p.add_argument('--image', required=True, help='an image file')
    p.add_argument('--text', required=True, help='the phrase to localise')
    p.add_argument('--out', required=True, help='a folder')
    p.add_argument('--block_num', type=int, default=None,
                   help='fusion layer (default: fusion_layer + 2, 8 for BERT-base)')
    help = ('an inference-only folder: model.safetensors without momentum encoders, queues or '
            'optimizer state, with its config, BERT config and tokenizer')
    p = sub.add_parser('export', help=help, description=help, formatter_class=utils.HelpFormatter)
    p.add_argument('source', metavar='CHECKPOINT',
                   help='a checkpoint file, a released name or an export folder')
    p.add_argument('--out', required=True, help='the folder to write (new or empty)')
    p.add_argument('--dtype', default='fp32', choices=tuple(DTYPES),
                   help='of the stored weights')
    p.add_argument('--config', default=None,
                   help='its training YAML (required when the file stores no config)')
    p.add_argument('--debug', action='store_true', help='show the full traceback on errors')
    help = 'the released checkpoints by name (usable as --checkpoint NAME)'
    p = sub.add_parser('list', help=help, description=help, formatter_class=utils.HelpFormatter)
    p.add_argument('--debug', action='store_true', help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command in OTHER_COMMANDS:
        return OTHER_COMMANDS[args.command](args)
    args.inputs = read_inputs(args)
    albef = ALBEFInference.from_checkpoint(args.checkpoint, config=args.config, device=args.device,
                                           precision=args.precision)
    albef.batch_size = args.batch_size
    return COMMANDS[args.command](albef, args)


def run(argv=None):
    """The `albef` console script: main(), with a wrong file, kind, config, device, image or
    argument reported as one line `error: ...` on stderr and exit status 2 (the full traceback
    with --debug or ALBEF_DEBUG=1), as the task scripts.

    From the command line (argv None) it returns exit status 0: the console script passes the
    return value to sys.exit, which would print a result (rows, paths) and exit with 1. Called
    with argv from Python it returns the command's result."""
    result = utils.run(main, argv)
    return 0 if argv is None else result
