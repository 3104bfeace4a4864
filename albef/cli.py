"""Command line for albef.api: `albef <command> --checkpoint C ...` (or `python -m albef ...`).

    albef embed-images --checkpoint C --images DIR --out feats.pt   (or .npy)
    albef embed-texts  --checkpoint C --texts "a dog" "a cat" --out feats.npy
    albef score        --checkpoint C --image I --captions "a dog" "a cat"
    albef answer       --checkpoint C --image I --question "what color?" --k 5
    albef gradcam      --checkpoint C --image I --text "the dog" --out overlays/

A released checkpoint (no stored config) needs --config, the YAML it was trained with. Errors
(a wrong file, kind or config) print one line and exit with status 2; --debug (or ALBEF_DEBUG=1)
shows the full traceback instead.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

import utils
from albef.api import ALBEFInference

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff'}


def image_files(folder):
    """Every image file under `folder` (recursively), sorted."""
    paths = sorted(str(p) for p in Path(folder).rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f'no images ({", ".join(sorted(IMAGE_SUFFIXES))}) under {folder}')
    return paths


def save_features(out, name, items, features):
    """`.pt`: {name: items, 'features': (N, E) tensor}; `.npy`: the (N, E) array, with the
    items as a JSON list beside it (<stem>.<name>.json)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == '.pt':
        torch.save({name: list(items), 'features': features}, out)
    elif out.suffix == '.npy':
        np.save(out, features.numpy())
        out.with_suffix(f'.{name}.json').write_text(json.dumps(list(items)))
    else:
        raise SystemExit(f'--out must end in .pt or .npy, got {out}')
    print(f'{len(items)} {name} x {features.shape[1]} features -> {out}')


def embed_images(albef, args):
    paths = image_files(args.images)
    save_features(args.out, 'paths', paths, albef.image_embeddings(paths))
    return paths


def embed_texts(albef, args):
    texts = list(args.texts or [])
    if args.file:
        texts += [line.strip() for line in Path(args.file).read_text().splitlines() if line.strip()]
    if not texts:
        raise SystemExit('embed-texts needs --texts or --file')
    save_features(args.out, 'texts', texts, albef.text_embeddings(texts))
    return texts


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
    candidates = json.loads(Path(args.answers).read_text()) if args.answers else None
    answers = albef.answer(args.image, args.question, candidates, k=args.k)
    for row in answers:
        print(f'{row["score"]:7.4f}  {row["answer"]}')
    return answers


def gradcam(albef, args):
    paths = albef.gradcam(args.image, args.text, block_num=args.block_num).save(args.out)
    print('\n'.join(paths))
    return paths


COMMANDS = {'embed-images': embed_images, 'embed-texts': embed_texts, 'score': score,
            'answer': answer, 'gradcam': gradcam}


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--checkpoint', required=True,
                        help='a released or trained checkpoint (.pth)')
    common.add_argument('--config', default=None,
                        help='its training YAML (required when the file stores no config)')
    common.add_argument('--device', default=None,
                        help='torch device (default: cuda if available, else cpu)')
    common.add_argument('--batch_size', type=int, default=32,
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
    p.add_argument('--answers', help="a JSON list of candidate answers (default: the config's "
                                     'answer_list)')
    p.add_argument('--k', type=int, default=5, help='how many answers to print, best first')
    p = add('gradcam', 'Grad-CAM overlays, one PNG per word piece and their average')
    p.add_argument('--image', required=True, help='an image file')
    p.add_argument('--text', required=True, help='the phrase to localise')
    p.add_argument('--out', required=True, help='a folder')
    p.add_argument('--block_num', type=int, default=None,
                   help='fusion layer (default: fusion_layer + 2, 8 for BERT-base)')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    albef = ALBEFInference.from_checkpoint(args.checkpoint, config=args.config, device=args.device,
                                           precision=args.precision)
    albef.batch_size = args.batch_size
    return COMMANDS[args.command](albef, args)


def run(argv=None):
    """The `albef` console script: main(), with a wrong file, kind or config reported as one
    line `error: ...` on stderr and exit status 2 (the full traceback with --debug or
    ALBEF_DEBUG=1), as the task scripts."""
    return utils.run(main, argv)
