"""Deterministic synthetic data for every ALBEF task, in the original file formats.

    python -m dataset.synthetic --out data/synthetic --seed 0 [--size tiny|small|medium]

Scenes are 1-4 coloured shapes (5 shapes, 6 colours, small/large) on a light plain or noisy
background, one per cell of a 3x3 grid (jittered), so "left of" / "above" hold between objects
in different columns / rows and never depend on a few pixels. No two objects of a scene share
both colour and shape, so "the red circle" always names at most one object.

Written under `out` (all paths inside the JSONs are relative to `out`: configs set `image_root`,
`vqa_root` and `refcoco_data` to `out`):

- `images/<task>_<n>.jpg` (JPEG quality 95).
- `pretrain.json`: {image, caption: [3-5 variants]}.
- `retrieval_train.json` (one record per caption, with image_id); `retrieval_{val,test}.json`
  (one record per image, caption = 5 strings). Disjoint images per split.
- `vqa_{train,val}.json`: {question_id, question, answer: 10 human-style answers, image,
  dataset: 'vqa'}; `vqa_test.json` without answers; `answer_list.json`.
- `nlvr_{train,dev,test}.json`: {images: [left, right], sentence, label: 'True'|'False'}.
- `ve_{train,dev,test}.json`: {image, sentence, label}. As in SNLI-VE, `image` is an id without
  extension: the file is `<image_root>/<image>.jpg` (ids look like 'images/ve_train_000123').
  Hypotheses are about one object ("the red circle is large", "... is at the top"): entailment
  if it holds, contradiction if the object is there but differs, neutral if the image has no
  such object. (Vertical positions only: the faithful training transform flips images
  horizontally, which makes "left"/"right" statements noisy; captions, VQA and grounding
  still use them, as the original data do.)
- `refcoco+_{train,val,test}.json`: {image, text, ref_id} (test = testA + testB images);
  `dets.json` (str(image_id) -> jittered object boxes plus distractors, [x, y, w, h]);
  `cocos.json` (str(image_id) -> exact object boxes [x, y, w, h, category_id]);
  `refcoco+/refs(unc).p` and `refcoco+/instances.json` in the REFER formats.
- `tokenizer/vocab.txt` + `tokenizer_config.json`: a BERT-layout WordPiece vocabulary learnt
  on the corpus by tools/build_vocab.py (every corpus word is one token; every ASCII character
  alone and as ##character, so any ASCII text tokenizes).

Labels are drawn before the scene and the scene is sampled to satisfy them, so a text-only model
sees the same question/sentence with every answer/label and cannot beat the per-type prior.
The same seed and sizes always give byte-identical files.
"""
import argparse
import json
import logging
import os
import pickle
import random
import string
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross')
COLORS = {'red': (215, 40, 40), 'green': (40, 160, 60), 'blue': (40, 80, 220),
          'yellow': (235, 205, 30), 'purple': (135, 55, 175), 'orange': (245, 130, 30)}
SIZES = {'small': 0.09, 'large': 0.14}  # radius as a fraction of the image side
GRID = 3
ROW_NAMES = ('top', 'middle', 'bottom')
COL_NAMES = ('left', 'center', 'right')
NUMBERS = ('zero', 'one', 'two', 'three', 'four')
RELATION_WORDS = {'left': 'to the left of', 'right': 'to the right of',
                  'above': 'above', 'below': 'below'}
VE_LABELS = ('entailment', 'neutral', 'contradiction')

SIZE_PRESETS = {
    'tiny': dict(pretrain=24, re_train=12, re_val=6, re_test=6, vqa_train=40, vqa_val=10, vqa_test=10,
                 nlvr_train=24, nlvr_dev=10, nlvr_test=10, ve_train=30, ve_dev=12, ve_test=12,
                 grounding_train=12, grounding_val=4, grounding_testA=4, grounding_testB=4),
    'small': dict(pretrain=2000, re_train=300, re_val=100, re_test=100, vqa_train=6000, vqa_val=300,
                  vqa_test=150, nlvr_train=1500, nlvr_dev=200, nlvr_test=300, ve_train=1500,
                  ve_dev=300, ve_test=300, grounding_train=300, grounding_val=50, grounding_testA=50,
                  grounding_testB=50),
    'medium': dict(pretrain=10000, re_train=1500, re_val=300, re_test=300, vqa_train=5000,
                   vqa_val=1000, vqa_test=1000, nlvr_train=3000, nlvr_dev=600, nlvr_test=600,
                   ve_train=4500, ve_dev=900, ve_test=900, grounding_train=1500, grounding_val=200,
                   grounding_testA=200, grounding_testB=200),
}


# ----------------------------------------------------------------------------- scenes

@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    col: int
    row: int
    cx: float
    cy: float
    r: float

    def phrase(self, with_size=True):
        return f'{self.size} {self.color} {self.shape}' if with_size else f'{self.color} {self.shape}'

    def box(self):
        side = round(2 * self.r, 2)
        return [round(self.cx - self.r, 2), round(self.cy - self.r, 2), side, side]


@dataclass(frozen=True)
class Scene:
    objects: tuple
    background: tuple
    noise_seed: int  # -1: plain background


def sample_scene(rng, side, n=None, include=(), forbid=None):
    """`include`: partial specs (dicts of shape/color/size) that must be present; `forbid(shape,
    color, size)` rejects the randomly added objects (never the included ones)."""
    n = n if n is not None else rng.randint(max(1, len(include)), 4)
    cells = rng.sample(range(GRID * GRID), n)
    cell = side / GRID
    used, objects = set(), []
    for i in range(n):
        spec = include[i] if i < len(include) else {}
        for _ in range(1000):
            shape = spec.get('shape') or rng.choice(SHAPES)
            color = spec.get('color') or rng.choice(sorted(COLORS))
            size = spec.get('size') or rng.choice(sorted(SIZES))
            if (shape, color) in used or (i >= len(include) and forbid and forbid(shape, color, size)):
                continue
            break
        else:
            raise RuntimeError(f'cannot place an object matching {spec} in a scene')
        used.add((shape, color))
        r = SIZES[size] * side
        jitter = max(0.0, cell / 2 - r - 1)
        col, row = cells[i] % GRID, cells[i] // GRID
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
        objects.append(Obj(shape, color, size, col, row, round(cx, 2), round(cy, 2), round(r, 2)))
    rng.shuffle(objects)
    background = tuple(rng.randint(195, 245) for _ in range(3))
    noise_seed = rng.getrandbits(32) if rng.random() < 0.5 else -1
    return Scene(tuple(objects), background, noise_seed)


def render(scene, side):
    if scene.noise_seed >= 0:  # light texture: grey noise
        noise = np.random.default_rng(scene.noise_seed).integers(-10, 11, (side, side, 1), np.int16)
        pixels = (np.array(scene.background, dtype=np.int16) + noise).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new('RGB', (side, side), scene.background)
    _draw_objects(ImageDraw.Draw(image), scene.objects, lambda o: COLORS[o.color])
    return image


def label_map(scene, side, value):
    """(side, side) uint8 array: `value(o)` (1-255) on the pixels render() paints with object
    o, 0 on the background; for dense (per-patch) labels of rendered scenes."""
    image = Image.new('L', (side, side), 0)
    _draw_objects(ImageDraw.Draw(image), scene.objects, value)
    return np.array(image)


def _draw_objects(draw, objects, fill_of):
    for o in objects:
        fill, (x0, y0, x1, y1) = fill_of(o), (o.cx - o.r, o.cy - o.r, o.cx + o.r, o.cy + o.r)
        if o.shape == 'circle':
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == 'square':
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif o.shape == 'triangle':
            draw.polygon([(o.cx, y0), (x1, y1), (x0, y1)], fill=fill)
        elif o.shape == 'diamond':
            draw.polygon([(o.cx, y0), (x1, o.cy), (o.cx, y1), (x0, o.cy)], fill=fill)
        else:  # cross
            arm = o.r / 3
            draw.rectangle((x0, o.cy - arm, x1, o.cy + arm), fill=fill)
            draw.rectangle((o.cx - arm, y0, o.cx + arm, y1), fill=fill)


def scene_with(rng, side, present, shape=None, color=None):
    """A random scene that has (`present`) or lacks an object of this shape and/or colour."""
    if present:
        return sample_scene(rng, side, include=[{'shape': shape, 'color': color}])
    return sample_scene(rng, side, forbid=lambda s, c, z: shape in (None, s) and color in (None, c))


def relation(a, b, axis):
    """'left'/'right' (axis 'x') or 'above'/'below' (axis 'y') of a relative to b, None if level."""
    da, db = (a.col, b.col) if axis == 'x' else (a.row, b.row)
    if da == db:
        return None
    return ('left', 'right')[da > db] if axis == 'x' else ('above', 'below')[da > db]


class _Writer:
    """Renders scenes into `out/images/`; `save` returns the path relative to `out`."""

    def __init__(self, out_dir, side):
        self.out_dir, self.side = out_dir, side
        os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)

    def save(self, scene, name):
        rel = f'images/{name}.jpg'
        render(scene, self.side).save(os.path.join(self.out_dir, rel), quality=95)
        return rel


# ----------------------------------------------------------------------------- captions

def _a(phrase):
    return f'an {phrase}' if phrase[0] in 'aeiou' else f'a {phrase}'


def _join(phrases):
    phrases = [_a(p) for p in phrases]
    return phrases[0] if len(phrases) == 1 else ', '.join(phrases[:-1]) + ' and ' + phrases[-1]


def _position(o):
    row, col = ROW_NAMES[o.row], COL_NAMES[o.col]
    return 'center' if (row, col) == ('middle', 'center') else (
        col if row == 'middle' else row if col == 'center' else f'{row} {col}')


def _relation_caption(scene, rng):
    pairs = [(a, b, axis) for a in scene.objects for b in scene.objects if a is not b
             for axis in 'xy' if relation(a, b, axis)]
    if not pairs:
        return f'only one shape: {_a(scene.objects[0].phrase())}'
    a, b, axis = rng.choice(pairs)
    return f'{_a(a.phrase(False))} {RELATION_WORDS[relation(a, b, axis)]} {_a(b.phrase(False))}'


def caption_variants(scene, rng):
    """Five differently worded, all true, descriptions of a scene."""
    objs, n = scene.objects, len(scene.objects)
    plural = 'shape' if n == 1 else 'shapes'
    variants = [
        _join([o.phrase() for o in objs]),
        f'{NUMBERS[n]} {plural}: ' + _join([o.phrase(False) for o in objs]),
        _join([f'{o.phrase(False)} at the {_position(o)}' for o in objs]),
        _relation_caption(scene, rng),
        f'{NUMBERS[n]} {plural} on a {"textured" if scene.noise_seed >= 0 else "plain"} '
        f'background, ' + _join([f'{o.size} {o.shape}' for o in objs]),
    ]
    # Some human-like noise for the cleaning functions: capitals and final full stops.
    return [v[0].upper() + v[1:] + '.' if rng.random() < 0.5 else v for v in variants]


def make_pretrain(rng, writer, n):
    records = []
    for i in range(n):
        scene = sample_scene(rng, writer.side)
        captions = caption_variants(scene, rng)
        records.append({'image': writer.save(scene, f'pretrain_{i:06d}'),
                        'caption': rng.sample(captions, rng.randint(3, 5))})
    return records


def make_retrieval(rng, writer, split, n):
    records = []
    for i in range(n):
        scene = sample_scene(rng, writer.side)
        image, captions = writer.save(scene, f're_{split}_{i:06d}'), caption_variants(scene, rng)
        if split == 'train':
            records += [{'image': image, 'caption': c, 'image_id': f're_{split}_{i}'} for c in captions]
        else:
            records.append({'image': image, 'caption': captions})
    return records


# ----------------------------------------------------------------------------- VQA

VQA_ANSWERS = {'color': sorted(COLORS), 'shape': list(SHAPES), 'count': ['1', '2', '3', '4'],
               'yes/no': ['yes', 'no'], 'left/right': ['left', 'right'],
               'above/below': ['above', 'below']}


def _vqa_color(rng, side):
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    scene = sample_scene(rng, side, include=[{'shape': shape, 'color': color}],
                         forbid=lambda s, c, z: s == shape)
    q = rng.choice([f'What color is the {shape}?', f'What is the color of the {shape}?'])
    return q, color, 'color', scene


def _vqa_shape(rng, side):
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    scene = sample_scene(rng, side, include=[{'shape': shape, 'color': color}],
                         forbid=lambda s, c, z: c == color)
    q = rng.choice([f'What shape is the {color} object?', f'Which shape is {color}?'])
    return q, shape, 'shape', scene


def _vqa_count(rng, side):
    n = rng.randint(1, 4)
    q = rng.choice(['How many shapes are there?', 'How many objects are in the picture?'])
    return q, str(n), 'count', sample_scene(rng, side, n=n)


def _vqa_exist(rng, side):
    shape, color, present = rng.choice(SHAPES), rng.choice(sorted(COLORS)), rng.random() < 0.5
    scene = scene_with(rng, side, present, shape, color)
    return f'Is there {_a(color)} {shape}?', 'yes' if present else 'no', 'yes/no', scene


def _vqa_relation(rng, side):
    """Two named objects; either a yes/no relation question or "left or right?"."""
    a, b = rng.sample([(s, c) for s in SHAPES for c in sorted(COLORS)], 2)
    axis, yes_no = rng.choice('xy'), rng.random() < 0.5
    words = ('left', 'right') if axis == 'x' else ('above', 'below')
    target = rng.choice(words)  # the true relation of a to b, drawn before the scene
    include = [{'shape': a[0], 'color': a[1]}, {'shape': b[0], 'color': b[1]}]
    while True:
        scene = sample_scene(rng, side, n=rng.randint(2, 4), include=include)
        oa, ob = (next(o for o in scene.objects if (o.shape, o.color) == x) for x in (a, b))
        if relation(oa, ob, axis) == target:
            break
    na, nb = f'{a[1]} {a[0]}', f'{b[1]} {b[0]}'
    if not yes_no:
        if axis == 'x':
            return f'Is the {na} to the left or to the right of the {nb}?', target, 'left/right', scene
        return f'Is the {na} above or below the {nb}?', target, 'above/below', scene
    asked = rng.choice(words)
    answer = 'yes' if asked == target else 'no'
    return f'Is the {na} {RELATION_WORDS[asked]} the {nb}?', answer, 'yes/no', scene


VQA_TYPES = (_vqa_color, _vqa_shape, _vqa_count, _vqa_exist, _vqa_relation)


def _human_answers(rng, answer, kind):
    """Ten annotator answers: each one wrong (another answer of the same kind) with p=0.1."""
    wrong = [a for a in VQA_ANSWERS[kind] if a != answer]
    return [rng.choice(wrong) if rng.random() < 0.1 else answer for _ in range(10)]


def make_vqa(rng, writer, split, n, first_id):
    records = []
    for i in range(n):
        question, answer, kind, scene = VQA_TYPES[i % len(VQA_TYPES)](rng, writer.side)
        record = {'question_id': first_id + i, 'question': question,
                  'image': writer.save(scene, f'vqa_{split}_{i:06d}'), 'dataset': 'vqa'}
        if split != 'test':
            record['answer'] = _human_answers(rng, answer, kind)
        records.append(record)
    rng.shuffle(records)
    return records


# ----------------------------------------------------------------------------- NLVR2

def _nlvr_pair(rng, side, label):
    """(sentence, left scene, right scene) with the sentence's truth equal to `label`."""
    kind = rng.randrange(4)
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    if kind in (0, 1):  # one named image contains an object
        named, other = scene_with(rng, side, label, shape, color), sample_scene(rng, side)
        pair = (named, other) if kind == 0 else (other, named)
        return f'The {("left", "right")[kind]} image contains {_a(color)} {shape}.', *pair
    if kind == 2:  # both images contain something of a colour
        present = (True, True) if label else rng.choice([(True, False), (False, True), (False, False)])
        left, right = (scene_with(rng, side, p, color=color) for p in present)
        return f'Both images contain {_a(color)} shape.', left, right
    # kind 3: compare the numbers of shapes
    counts = [(a, b) for a in range(1, 5) for b in range(1, 5) if (a > b) == label]
    n_left, n_right = rng.choice(counts)
    return ('There are more shapes in the left image than in the right image.',
            sample_scene(rng, side, n=n_left), sample_scene(rng, side, n=n_right))


def make_nlvr(rng, writer, split, n):
    records = []
    for i in range(n):
        label = i % 2 == 0
        sentence, left, right = _nlvr_pair(rng, writer.side, label)
        images = [writer.save(scene, f'nlvr_{split}_{i:06d}_{k}')
                  for k, scene in enumerate((left, right))]
        records.append({'images': images, 'sentence': sentence, 'label': str(label)})
    rng.shuffle(records)
    return records


# ----------------------------------------------------------------------------- SNLI-VE

def _ve_example(rng, side, label):
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    prop = rng.choice(['size', 'position'])
    value = rng.choice(sorted(SIZES) if prop == 'size' else ['top', 'bottom'])
    if label == 'neutral':  # the hypothesis is about an object the image does not show
        scene = scene_with(rng, side, False, shape, color)
    elif prop == 'size':
        actual = value if label == 'entailment' else next(z for z in SIZES if z != value)
        scene = sample_scene(rng, side, include=[{'shape': shape, 'color': color, 'size': actual}])
    else:  # the object must be in the top or bottom row, never the ambiguous middle one
        wanted_row = 0 if (value == 'top') == (label == 'entailment') else GRID - 1
        while True:
            scene = sample_scene(rng, side, include=[{'shape': shape, 'color': color}])
            if next(o for o in scene.objects if (o.shape, o.color) == (shape, color)).row == wanted_row:
                break
    verb = 'is' if prop == 'size' else 'is at the'
    return f'The {color} {shape} {verb} {value}.', scene


def make_ve(rng, writer, split, n):
    records = []
    for i in range(n):
        label = VE_LABELS[i % 3]
        sentence, scene = _ve_example(rng, writer.side, label)
        image_id = writer.save(scene, f've_{split}_{i:06d}')[:-len('.jpg')]
        records.append({'image': image_id, 'sentence': sentence, 'label': label})
    rng.shuffle(records)
    return records


# ----------------------------------------------------------------------------- grounding

def referring_expressions(o, objs):
    """Every expression below names `o` and nothing else in `objs`."""
    others = [x for x in objs if x is not o]

    def unique(match):
        return not any(match(x) for x in others)

    exprs = [f'the {o.color} {o.shape}']
    if unique(lambda x: x.color == o.color):
        exprs += [f'the {o.color} shape', f'the {o.color} one']
    if unique(lambda x: x.shape == o.shape):
        exprs.append(f'the {o.shape}')
    elif unique(lambda x: (x.size, x.shape) == (o.size, o.shape)):
        exprs.append(f'the {o.size} {o.shape}')
    if unique(lambda x: x.size == o.size):
        exprs.append(f'the {o.size} shape')
    for axis, first, last in (('col', 'on the left', 'on the right'),
                              ('row', 'at the top', 'at the bottom')):
        mine, theirs = getattr(o, axis), [getattr(x, axis) for x in others]
        if theirs and mine < min(theirs):
            exprs.append(f'the shape {first}')
        if theirs and mine > max(theirs):
            exprs.append(f'the shape {last}')
    return exprs


def make_grounding(rng, writer, sizes):
    """Returns (split records, dets, cocos, refs, instances)."""
    splits = {'train': [], 'val': [], 'test': []}
    dets, cocos, refs = {}, {}, []
    categories = [{'id': k + 1, 'name': name, 'supercategory': 'shape'} for k, name in enumerate(SHAPES)]
    instances = {'images': [], 'annotations': [], 'categories': categories}
    image_id = ann_id = sent_id = 0
    for ref_split in ('train', 'val', 'testA', 'testB'):
        for _ in range(sizes[f'grounding_{ref_split}']):
            image_id += 1
            scene = sample_scene(rng, writer.side, n=rng.randint(2, 4))
            file_name = f'grd_{image_id:06d}.jpg'
            path = writer.save(scene, file_name[:-len('.jpg')])
            instances['images'].append({'id': image_id, 'width': writer.side, 'height': writer.side,
                                        'file_name': file_name})
            dets[str(image_id)] = _detections(rng, scene, writer.side)
            cocos[str(image_id)] = [o.box() + [SHAPES.index(o.shape) + 1] for o in scene.objects]
            for o in scene.objects:
                ann_id += 1
                x, y, w, h = o.box()
                x2, y2 = round(x + w, 2), round(y + h, 2)
                instances['annotations'].append({
                    'id': ann_id, 'image_id': image_id, 'category_id': SHAPES.index(o.shape) + 1,
                    'bbox': [x, y, w, h], 'area': round(w * h, 2), 'iscrowd': 0,
                    'segmentation': [[x, y, x2, y, x2, y2, x, y2]]})
                exprs = referring_expressions(o, scene.objects)
                sentences = []
                for text in rng.sample(exprs, min(2, len(exprs))):
                    sent_id += 1
                    sentences.append({'sent': text, 'raw': text, 'tokens': text.split(),
                                      'sent_id': sent_id})
                ref_id = len(refs)
                refs.append({'ref_id': ref_id, 'ann_id': ann_id, 'image_id': image_id,
                             'split': ref_split, 'sentences': sentences,
                             'sent_ids': [sent['sent_id'] for sent in sentences],
                             'file_name': file_name, 'category_id': SHAPES.index(o.shape) + 1})
                out_split = 'test' if ref_split.startswith('test') else ref_split
                splits[out_split] += [{'image': path, 'text': sent['sent'], 'ref_id': ref_id}
                                      for sent in sentences]
    return splits, dets, cocos, refs, instances


def _detections(rng, scene, side):
    """Every object's box jittered by up to 10% plus two or three distractor boxes, all inside
    the image (the evaluation slices the map with int(x), int(y))."""
    def clipped(x, y, w, h):
        x, y = min(max(x, 0.0), side - 2.0), min(max(y, 0.0), side - 2.0)
        return [round(x, 2), round(y, 2), round(min(w, side - x), 2), round(min(h, side - y), 2)]

    boxes = []
    for o in scene.objects:
        x, y, w, h = o.box()
        jitter = [rng.uniform(-0.1, 0.1) * w for _ in range(4)]
        boxes.append(clipped(x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]))
    for _ in range(rng.randint(2, 3)):
        w, h = rng.uniform(0.1, 0.4) * side, rng.uniform(0.1, 0.4) * side
        boxes.append(clipped(rng.uniform(0, side - w), rng.uniform(0, side - h), w, h))
    rng.shuffle(boxes)
    return boxes


# ----------------------------------------------------------------------------- tokenizer

# At most the tiny BERT's vocab_size (configs/tiny/config_bert.json).
VOCAB_SIZE = 512


def write_vocab(out_dir, texts):
    """BERT-layout vocabulary of the corpus (tools/build_vocab.py, the tool for users' data):
    [PAD]=0, [unused0-98]=1-99, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, then the WordPiece
    tokens, every character of the corpus alone and as ##character. Returns its size."""
    from tools.build_vocab import build_vocab
    # ASCII letters, digits and punctuation are in the corpus too, so that any ASCII text
    # tokenizes (a user's question at inference time, say) without [UNK].
    alphabet = string.punctuation + string.digits + string.ascii_lowercase
    return build_vocab(list(texts) + [' '.join(alphabet)], out_dir, vocab_size=VOCAB_SIZE)


# ----------------------------------------------------------------------------- driver

def _dump(obj, path):
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f)


def _rng(seed, name):
    # One stream per file, so resizing one split leaves every other file unchanged.
    return random.Random(f'albef-synthetic:{seed}:{name}')


def resolve_sizes(size='small', **sizes):
    if size not in SIZE_PRESETS:
        raise ValueError(f'unknown size preset {size!r}; choose from {sorted(SIZE_PRESETS)}')
    unknown = sorted(set(sizes) - set(SIZE_PRESETS[size]))
    if unknown:
        raise ValueError(f'unknown size keys {unknown}; known: {sorted(SIZE_PRESETS[size])}')
    return {**SIZE_PRESETS[size], **sizes}


# Raised whenever the generator writes different data for the same arguments, so that folders
# written by an older one are not taken for the data wanted.
GENERATOR_VERSION = 3  # 3: the vocabulary learnt by tools/build_vocab.py


def manifest(seed=0, size='small', image_size=96, sizes=None):
    """What a generated folder holds (written last, as manifest.json): compare it to decide
    whether an existing folder is the data wanted."""
    return {'version': GENERATOR_VERSION, 'seed': seed, 'size': size, 'image_size': image_size,
            'sizes': sizes if sizes is not None else resolve_sizes(size)}


def generate(out_dir, seed=0, size='small', image_size=96, **sizes):
    """Write every task's data under `out_dir`; returns {name: written path}.

    `size` picks a preset of SIZE_PRESETS; keyword arguments (e.g. `vqa_train=200`) override it.
    """
    sizes = resolve_sizes(size, **sizes)
    writer = _Writer(out_dir, image_size)
    files, texts = {}, []

    def emit(name, records):
        files[name] = os.path.join(out_dir, f'{name}.json')
        _dump(records, files[name])

    records = make_pretrain(_rng(seed, 'pretrain'), writer, sizes['pretrain'])
    emit('pretrain', records)
    texts += [c for r in records for c in r['caption']]
    for split in ('train', 'val', 'test'):
        records = make_retrieval(_rng(seed, f're_{split}'), writer, split, sizes[f're_{split}'])
        emit(f'retrieval_{split}', records)
        for r in records:
            texts += r['caption'] if isinstance(r['caption'], list) else [r['caption']]
    for k, split in enumerate(('train', 'val', 'test')):
        first_id = (k + 1) * 1_000_000
        records = make_vqa(_rng(seed, f'vqa_{split}'), writer, split, sizes[f'vqa_{split}'], first_id)
        emit(f'vqa_{split}', records)
        texts += [r['question'] for r in records]
    answer_list = [a for kind in VQA_ANSWERS.values() for a in kind]
    emit('answer_list', list(dict.fromkeys(answer_list)))
    texts += answer_list
    for split in ('train', 'dev', 'test'):
        nlvr = make_nlvr(_rng(seed, f'nlvr_{split}'), writer, split, sizes[f'nlvr_{split}'])
        ve = make_ve(_rng(seed, f've_{split}'), writer, split, sizes[f've_{split}'])
        emit(f'nlvr_{split}', nlvr)
        emit(f've_{split}', ve)
        texts += [r['sentence'] for r in nlvr + ve]
    splits, dets, cocos, refs, instances = make_grounding(_rng(seed, 'grounding'), writer, sizes)
    for split, records in splits.items():
        emit(f'refcoco+_{split}', records)
        texts += [r['text'] for r in records]
    emit('dets', dets)
    emit('cocos', cocos)
    refer_dir = os.path.join(out_dir, 'refcoco+')
    os.makedirs(refer_dir, exist_ok=True)
    files['refs'] = os.path.join(refer_dir, 'refs(unc).p')
    with open(files['refs'], 'wb') as f:
        pickle.dump(refs, f, protocol=4)
    files['instances'] = os.path.join(refer_dir, 'instances.json')
    _dump(instances, files['instances'])
    files['tokenizer'] = os.path.join(out_dir, 'tokenizer')
    vocab_size = write_vocab(files['tokenizer'], texts)
    emit('manifest', manifest(seed, size, image_size, sizes))
    logger.info('synthetic data in %s: vocabulary of %d tokens', out_dir, vocab_size)
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='data/synthetic')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--size', default='small', choices=sorted(SIZE_PRESETS))
    parser.add_argument('--image_size', type=int, default=96)
    args = parser.parse_args(argv)
    files = generate(args.out, seed=args.seed, size=args.size, image_size=args.image_size)
    with open(os.path.join(files['tokenizer'], 'vocab.txt'), encoding='utf-8') as f:
        vocab_size = sum(1 for _ in f)
    for name, path in files.items():
        print(f'{name:18s} {path}')
    print(f'vocab_size {vocab_size} (set vocab_size >= this in the BERT config)')


if __name__ == '__main__':
    main()
