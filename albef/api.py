"""Inference with a released or trained ALBEF checkpoint of any task, preprocessing included.

    from albef import ALBEFInference
    albef = ALBEFInference.from_checkpoint('output/retrieval/checkpoint_best.pth')
    albef.itm_scores('dog.jpg', ['a dog on the grass', 'a plate of food'])
    albef.retrieve_texts('dog.jpg', captions, k=5)

    model, image_transform, tokenizer = albef.load_model('exports/retrieval')   # the bare model

A checkpoint is a file, an export folder (albef.export) or a registry name (albef.hub). Its kind
is read from its keys (models.checkpoint.checkpoint_kind) and the matching `models.model_*.ALBEF`
is built from the config stored in the checkpoint (the task scripts store it, an export holds
it; for a released file pass `config=` the YAML it was trained with). Loading is strict.

What each kind supports:
  pretrain, retrieval (= grounding)  image/text embeddings, ITM scores, retrieval, Grad-CAM
  vqa                                 answer
  ve, nlvr                            classify
  pretrain_nlvr                       nothing beyond loading (text-assignment head only)
"""
import functools
import json
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from albef import hub
from dataset.images import decode_errors, load_image, sixteen_to_eight_bits, to_rgb
from dataset.nlvr_dataset import LABELS as NLVR_LABELS
from dataset.transforms import create_transform
from dataset.utils import pre_caption, pre_question
from dataset.ve_dataset import LABELS as VE_LABELS
from dataset.vqa_dataset import MAX_QUESTION_WORDS
from models import (model_nlvr, model_pretrain, model_pretrain_nlvr, model_retrieval, model_ve,
                    model_vqa)
from models.checkpoint import (CheckpointError, checkpoint_kind, has_momentum, load_weights,
                               read_checkpoint, state_dict_of)
from engine import autocast_context
from models.gradcam import default_block, heatmaps
from models.tokenization_bert import BertTokenizer
from utils import load_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = {'pretrain': model_pretrain, 'retrieval': model_retrieval, 'vqa': model_vqa,
          've': model_ve, 'nlvr': model_nlvr, 'pretrain_nlvr': model_pretrain_nlvr}
ITC_ITM_KINDS = ('pretrain', 'retrieval')
MAX_CAPTION_WORDS = 30  # pre_caption's word limit in every dataset
MAX_CAPTION_TOKENS = 30  # retrieval evaluation's tokenizer truncation


class KindError(ValueError):
    """A method was called on a checkpoint kind that lacks the head it needs."""


@dataclass
class Gallery:
    """Items (image sources or caption strings) and their normalised ITC features (N, E)."""
    items: list
    features: torch.Tensor


@dataclass
class GradCAMMaps:
    image: Image.Image  # the input as RGB
    tokens: list  # word pieces of the cleaned text ([CLS] dropped)
    token_maps: torch.Tensor  # (len(tokens), H, W) at the image's own resolution
    average: torch.Tensor  # (H, W): the mean over the word pieces

    def save(self, out_dir):
        """The overlays of paper Fig. 5: <out_dir>/00_average.png, then one PNG per word piece
        (NN_<piece>.png); returns the written paths."""
        os.makedirs(out_dir, exist_ok=True)
        paths = [os.path.join(out_dir, '00_average.png')]
        overlay(self.image, self.average.numpy()).save(paths[0])
        for i, (token, heat) in enumerate(zip(self.tokens, self.token_maps.numpy()), start=1):
            name = re.sub(r'[^A-Za-z0-9]+', '', token) or 'token'
            paths.append(os.path.join(out_dir, f'{i:02d}_{name}.png'))
            overlay(self.image, heat).save(paths[-1])
        return paths


def colorize(heat):
    """A (H, W) map in [0, 1] as an RGB 'jet'-style uint8 image."""
    x = np.clip(heat, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * x - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (255 * rgb).astype(np.uint8)


def overlay(image, heat, weight=0.5):
    """Blend a (H, W) heat map (any range) onto a PIL image of the same size."""
    heat = heat - heat.min()
    heat = heat / heat.max() if heat.max() > 0 else heat
    blended = (1 - weight) * np.asarray(image, dtype=np.float32) + weight * colorize(heat)
    return Image.fromarray(blended.astype(np.uint8))


def resolve_repo_path(path):
    """A relative path from a stored config, tried from the working directory, then the repository."""
    if isinstance(path, str) and not os.path.isabs(path) and not os.path.exists(path) \
            and (ROOT / path).exists():
        return str(ROOT / path)
    return path


def check_device(device):
    """`device` as a torch.device, or a ValueError saying why this machine cannot use it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f'device {device!r}: not a torch device ({error})') from error
    if device.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device '{device}': CUDA is not available here (torch "
                             f"{torch.__version__} sees no GPU); use device 'cpu'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device '{device}': this machine has {count} GPU(s), "
                             f"cuda:0..cuda:{count - 1}")
    elif device.type == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f"device '{device}': MPS is not available here; use device 'cpu'")
    return device


def positive_count(name, value):
    """`value` as an int >= 1 (k, k_test, batch sizes), else a ValueError naming it."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}')
    return number


def image_from_array(array):
    """An RGB PIL image from a uint8 or uint16 array (H, W) or (H, W, 1|3|4), converted by the
    rule that reads image files (dataset.images.to_rgb): 16-bit values are scaled, not clipped."""
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
    if array.dtype.kind != 'u' or array.dtype.itemsize not in (1, 2) or not shape_ok:
        raise TypeError(f'image arrays must be uint8 or uint16 (H, W) or (H, W, 1|3|4), got '
                        f'{array.dtype} {array.shape} (scale other types to uint8 0..255 first)')
    if array.size == 0:
        raise ValueError(f'the image array is empty: shape {array.shape}')
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder('='))  # any byte order
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype == np.uint16 and array.ndim == 3:
        array = sixteen_to_eight_bits(array)  # PIL has no 16-bit colour mode to go through
    return to_rgb(Image.fromarray(array))


def build_model(kind, config, tokenizer, state_dict):
    """The task's ALBEF for `config`, random weights, sized to fit `state_dict`.

    Keys that only matter for training get defaults, the feature-queue length is the
    checkpoint's, and the distilled tasks build momentum models only if the file holds them.
    """
    config = {'distill': False, 'momentum': 0.995, 'temp': 0.07, 'queue_size': 256,
              'mlm_probability': 0.15, **config}
    config['bert_config'] = resolve_repo_path(config['bert_config'])
    if 'image_queue' in state_dict:
        config['queue_size'] = state_dict['image_queue'].shape[1]
    if kind in ('vqa', 've', 'nlvr'):
        config['distill'] = has_momentum(state_dict)
    # Every weight comes from the checkpoint: no BERT / DeiT initialisation is downloaded.
    extra = {'pretrain': {'init_deit': False}, 'vqa': {'text_decoder': None}}.get(kind, {})
    try:
        return MODELS[kind].ALBEF(config=config, text_encoder=None, tokenizer=tokenizer, **extra)
    except KeyError as error:
        raise ValueError(f'the config has no {error.args[0]!r}, which the {kind!r} model of this '
                         f'checkpoint needs (is it the YAML of another task?)') from None


def model_from_state_dict(state_dict, config, tokenizer, source='the checkpoint'):
    """(kind, model) with `state_dict` loaded strictly into the ALBEF of its kind."""
    kind = checkpoint_kind(state_dict)
    if kind not in MODELS:
        raise CheckpointError(f'{source}: not an ALBEF checkpoint of a known task (kinds: '
                              f'{sorted(MODELS)})')
    model = build_model(kind, config, tokenizer, state_dict)
    # Online-only weights (the released fine-tuned files, exports) start the momentum encoders
    # as copies, with fresh queues.
    load_weights(model, state_dict, kind)
    return kind, model


# ---- what a name or path refers to: an export folder, a checkpoint file, a registry name --------

def source_state(name_or_path):
    """(state_dict, config, source, weights_file) of an export folder, a checkpoint file or a
    registry name; config is the one stored (a dict), the registry's (a YAML path) or None."""
    from albef import export  # albef.export builds on this module
    path = str(name_or_path)
    if export.is_export(path):
        state_dict, config, _ = export.read_export(path)
        return state_dict, config, path, os.path.join(path, export.WEIGHTS)
    if os.path.isdir(path):
        raise CheckpointError(f'{path}: a folder without {export.MANIFEST}, so not an albef '
                              f'export (`albef export CHECKPOINT --out DIR` writes one)')
    config = None
    if not os.path.exists(path) and (entry := registry_entry(path)) is not None:
        path, config = entry
    checkpoint = read_checkpoint(path)
    state_dict = state_dict_of(checkpoint, path)
    stored = checkpoint.get('config') if isinstance(checkpoint, dict) else None
    return state_dict, stored if isinstance(stored, dict) else config, str(name_or_path), path


def registry_entry(name):
    """(local file, paired config YAML or None) of a released checkpoint's name or an http(s)
    URL, fetched into albef.hub's cache on first use; None when `name` is neither (a path that
    does not exist is then reported as such)."""
    entry = hub.lookup(name)
    if entry is None and not name.startswith(('http://', 'https://')):
        return None
    if entry is not None and entry.kind not in MODELS:  # refused before a download
        raise CheckpointError(f'{name!r} is the {entry.kind} initialisation for training, not an '
                              f'ALBEF model: `albef list` shows the models (kinds '
                              f'{", ".join(sorted(MODELS))})')
    return hub.resolve_checkpoint(name), entry.config if entry is not None else None


def source_config(config, stored, source):
    """The config to build the model with: `config` (a YAML path or dict) if given, else the
    stored or registered one; a ValueError when there is none."""
    config = stored if config is None else config
    if config is None:
        raise ValueError(f'{source} stores no config (released files do not): pass config= '
                         f'(--config) the YAML it was trained with, e.g. '
                         f'configs/Retrieval_coco.yaml')
    return dict(config) if isinstance(config, dict) else load_config(resolve_repo_path(str(config)))


def tokenizer_for(tokenizer, config):
    """`tokenizer` if it is one, else the BertTokenizer of that name or folder (default: the
    config's `tokenizer`, else its `text_encoder`, else bert-base-uncased)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    name = tokenizer or config.get('tokenizer') or config.get('text_encoder') or 'bert-base-uncased'
    return BertTokenizer.from_pretrained(resolve_repo_path(str(name)))


def open_model(name_or_path, config=None, tokenizer=None):
    """(kind, model, config, tokenizer) of an export folder, a checkpoint file or a registry
    name."""
    state_dict, stored, source, _ = source_state(name_or_path)
    config = source_config(config, stored, source)
    tokenizer = tokenizer_for(tokenizer, config)
    kind, model = model_from_state_dict(state_dict, config, tokenizer, source=source)
    return kind, model, config, tokenizer


PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def default_device(device):
    if device is not None:
        return check_device(device)
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def load_model(name_or_path, device=None, precision='fp32', config=None, tokenizer=None):
    """`(model, image_transform, tokenizer)` of an export folder, a checkpoint file (released or
    trained) or a registry name, as LAVIS' load_model_and_preprocess and open_clip's
    create_model_and_transforms give them:

    model            the task's models.model_*.ALBEF in eval mode on `device` (default: cuda if
                     available), its weights in `precision` ('fp32', 'fp16' or 'bf16': the
                     weights themselves are cast, as open_clip's pure_fp16 / pure_bf16)
    image_transform  PIL RGB image -> (3, R, R) tensor in the model's dtype: the test transform
                     (square bicubic resize to image_res, CLIP normalisation)
    tokenizer        the checkpoint's BertTokenizer (`[CLS] text`, no [SEP]), fitted to the
                     text encoder's position table

    config: the training YAML (path or dict) of a file that stores none (the released files).
    For preprocessing, batching and the task heads in one object, use ALBEFInference."""
    if precision not in PRECISIONS:
        raise ValueError(f'precision {precision!r}: allowed {", ".join(PRECISIONS)}')
    device = default_device(device)  # checked before the weights are read
    _, model, config, tokenizer = open_model(name_or_path, config, tokenizer)
    dtype = PRECISIONS[precision]
    model = model.to(device=device, dtype=dtype).eval()
    transform = create_transform('test', config['image_res'])
    if dtype != torch.float32:
        transform = transforms.Compose([transform, transforms.ConvertImageDtype(dtype)])
    return model, transform, tokenizer


def _at_precision(method):
    """Run an inference method under the autocast of the instance's `precision`."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with autocast_context(self.precision, self.device):
            return method(self, *args, **kwargs)
    return wrapper


class ALBEFInference:
    """A loaded checkpoint in eval mode with preprocessing. Public methods take images as paths,
    PIL images or uint8 arrays (H, W[, 3|4]) and texts as raw strings; results are on the CPU."""

    def __init__(self, model, kind, config, tokenizer, device='cpu', source='the model',
                 batch_size=32, precision='fp32'):
        device = check_device(device)
        self.model = model.to(device).eval()
        self.kind, self.config, self.tokenizer = kind, config, tokenizer
        self.device, self.source, self.batch_size = torch.device(device), source, batch_size
        self.transform = create_transform('test', config['image_res'])
        self.precision = precision

    @classmethod
    def from_checkpoint(cls, path, config=None, tokenizer=None, device=None, precision='fp32'):
        """path: an export folder (`albef export`), a checkpoint file or a registry name;
        config: the YAML path or dict the checkpoint was trained with (default: the one stored
        in the file or folder, or registered with the name); tokenizer: a BertTokenizer, a hub
        name or a folder (default: the config's); device: default cuda if available;
        precision: 'fp32', 'bf16' or 'fp16' autocast (the weights stay fp32)."""
        device = default_device(device)  # checked before the checkpoint is read
        kind, model, config, tokenizer = open_model(path, config, tokenizer)
        return cls(model, kind, config, tokenizer, device, source=str(path), precision=precision)

    # ---- preprocessing ----------------------------------------------------------------------

    @staticmethod
    def to_pil(image):
        """An RGB PIL image from a path (dataset.images.load_image), a PIL image of any mode or a
        uint8 / uint16 array, all converted by the same rule as image files."""
        if isinstance(image, (str, os.PathLike)):
            return load_image(image)
        if isinstance(image, Image.Image):
            name = (f'given as a PIL image ({image.format or "in memory"} {image.width} x '
                    f'{image.height}, mode {image.mode})')
            with decode_errors(name):  # a lazily opened file is decoded here: damage shows here
                image.load()
                return to_rgb(image)
        if isinstance(image, np.ndarray):
            return image_from_array(image)
        raise TypeError(f'an image is a path, a PIL image or a uint8 / uint16 array, not '
                        f'{type(image).__name__}')

    def preprocess_images(self, images):
        """The test transform (square bicubic resize to image_res, CLIP normalisation):
        (B, 3, R, R) on the model's device; B = 0 for no images."""
        images = list(images)
        if not images:
            res = self.config['image_res']
            return torch.empty(0, 3, res, res, device=self.device)
        return torch.stack([self.transform(self.to_pil(image)) for image in images]).to(self.device)

    def tokenize(self, texts, question=False):
        """pre_caption (or pre_question) cleaning, then `[CLS] text` padded to the longest."""
        if question:  # as VQA's test split: no token truncation
            texts = [pre_question(text, MAX_QUESTION_WORDS['test']) for text in texts]
            return self.tokenizer(texts, padding='longest', return_tensors='pt').to(self.device)
        texts = [pre_caption(text, MAX_CAPTION_WORDS) for text in texts]
        return self.tokenizer(texts, padding='longest', truncation=True,
                              max_length=MAX_CAPTION_TOKENS, return_tensors='pt').to(self.device)

    def _require(self, method, kinds, what):
        if self.kind not in kinds:
            names = ' / '.join('retrieval / grounding' if k == 'retrieval' else k for k in kinds)
            raise KindError(f'{method} needs {what} ({names} checkpoints); {self.source} is a '
                            f'{self.kind!r} checkpoint')

    def _itc_itm(self, method):
        self._require(method, ITC_ITM_KINDS, 'the ITC projections and the ITM head')
        return self.model

    def _no_features(self):
        """The (0, E) result of embedding nothing."""
        return torch.empty(0, self.model.vision_proj.out_features)

    @staticmethod
    def _check_k(k, k_test):
        return positive_count('k', k), None if k_test is None else positive_count('k_test', k_test)

    @staticmethod
    def _batches(items, size):
        items = list(items)
        return [items[i:i + size] for i in range(0, len(items), size)]

    @staticmethod
    def _images(images):
        """A list of images from one image or a sequence of them."""
        return list(images) if isinstance(images, (list, tuple)) else [images]

    @staticmethod
    def _texts(texts):
        return [texts] if isinstance(texts, str) else list(texts)

    # ---- embeddings and matching -------------------------------------------------------------

    @_at_precision
    @torch.no_grad()
    def image_embeddings(self, images):
        """Normalised projected [CLS] features (N, E) of the images (ITC space)."""
        model = self._itc_itm('image_embeddings')
        feats = [model.image_features(model.encode_image(self.preprocess_images(batch)))
                 for batch in self._batches(self._images(images), self.batch_size)]
        return torch.cat(feats).float().cpu() if feats else self._no_features()

    @_at_precision
    @torch.no_grad()
    def text_embeddings(self, texts):
        """Normalised projected [CLS] features (N, E) of the texts (ITC space)."""
        model = self._itc_itm('text_embeddings')
        feats = []
        for batch in self._batches(self._texts(texts), self.batch_size):
            text = self.tokenize(batch)
            feats.append(model.text_features(model.encode_text(text.input_ids, text.attention_mask)))
        return torch.cat(feats).float().cpu() if feats else self._no_features()

    @torch.no_grad()
    def _itm(self, image_embeds, texts):
        """ITM logits (P, 2) of image_embeds[p] with texts[p], P = len(texts)."""
        logits = []
        for start in range(0, len(texts), self.batch_size):
            text = self.tokenize(texts[start:start + self.batch_size])
            text_embeds = self.model.encode_text(text.input_ids, text.attention_mask)
            logits.append(self.model.itm_scores(text_embeds, text.attention_mask,
                                                image_embeds[start:start + len(text.input_ids)]))
        return torch.cat(logits).float()

    @_at_precision
    @torch.no_grad()
    def itm_scores(self, images, texts, logits=False):
        """ITM match probability (P,) of each (image, text) pair (raw match logit if `logits`).

        `images` and `texts` have the same length, or one of them is a single item paired with
        every item of the other (an empty list: no pairs, an empty result)."""
        self._itc_itm('itm_scores')
        images, texts = self._images(images), self._texts(texts)
        if len(images) != len(texts) and 1 not in (len(images), len(texts)):
            raise ValueError(f'{len(images)} images and {len(texts)} texts: give equal numbers, '
                             'or one image or one text')
        if not images or not texts:
            return torch.empty(0)
        pairs = max(len(images), len(texts))
        scores = []
        for start in range(0, pairs, self.batch_size):
            idx = range(start, min(pairs, start + self.batch_size))
            batch_images = images if len(images) == 1 else [images[i] for i in idx]
            image_embeds = self.model.encode_image(self.preprocess_images(batch_images))
            image_embeds = image_embeds.expand(len(idx), -1, -1)
            out = self._itm(image_embeds, [texts[0 if len(texts) == 1 else i] for i in idx])
            scores.append(out[:, 1] if logits else out.softmax(dim=1)[:, 1])
        return torch.cat(scores).cpu()

    def encode_images(self, images):
        """A gallery to search with retrieve_images (features computed once)."""
        return Gallery(self._images(images), self.image_embeddings(images))

    def encode_texts(self, texts):
        """A gallery to search with retrieve_texts (features computed once)."""
        return Gallery(self._texts(texts), self.text_embeddings(texts))

    def _rank(self, sims, rescore, k, k_test, gallery):
        """Top `k_test` by ITC cosine, re-ranked by the raw ITM match logit (as retrieval
        evaluation does); the best `k` as dicts (none from an empty gallery)."""
        if len(sims) == 0:
            return []
        k_test = min(k_test or self.config.get('k_test', 128), len(sims))
        candidates = sims.topk(k_test).indices.tolist()
        logits = rescore(candidates)  # (k_test, 2)
        order = logits[:, 1].argsort(descending=True)[:k].tolist()
        probs = logits.softmax(dim=1)[:, 1]
        return [{'index': candidates[j], 'item': gallery.items[candidates[j]],
                 'itm': float(probs[j]), 'itm_logit': float(logits[j, 1]),
                 'itc': float(sims[candidates[j]])} for j in order]

    @_at_precision
    @torch.no_grad()
    def retrieve_texts(self, image, texts, k=5, k_test=None):
        """The k best texts for `image` among `texts` (a list or an encode_texts gallery):
        [{'index', 'item', 'itm', 'itm_logit', 'itc'}, ...], best first. k_test: the ITC
        shortlist re-ranked by ITM (default: the config's k_test, else 128)."""
        model = self._itc_itm('retrieve_texts')
        k, k_test = self._check_k(k, k_test)
        gallery = texts if isinstance(texts, Gallery) else self.encode_texts(texts)
        image_embeds = model.encode_image(self.preprocess_images([image]))  # (1, N, Dv)
        sims = gallery.features @ model.image_features(image_embeds)[0].float().cpu()  # (T,)

        def rescore(candidates):
            return self._itm(image_embeds.expand(len(candidates), -1, -1),
                             [gallery.items[c] for c in candidates]).cpu()
        return self._rank(sims, rescore, k, k_test, gallery)

    @_at_precision
    @torch.no_grad()
    def retrieve_images(self, text, images, k=5, k_test=None):
        """The k best images for `text` among `images` (a list or an encode_images gallery),
        as retrieve_texts. Only the shortlisted images go through the ViT a second time, so a
        gallery never holds more than `batch_size` images' token states."""
        model = self._itc_itm('retrieve_images')
        k, k_test = self._check_k(k, k_test)
        gallery = images if isinstance(images, Gallery) else self.encode_images(images)
        sims = gallery.features @ self.text_embeddings([text])[0]  # (I,)

        def rescore(candidates):
            logits = []
            for batch in self._batches(candidates, self.batch_size):
                image_embeds = model.encode_image(self.preprocess_images(
                    [gallery.items[c] for c in batch]))
                logits.append(self._itm(image_embeds, [text] * len(batch)))
            return torch.cat(logits).cpu()
        return self._rank(sims, rescore, k, k_test, gallery)

    # ---- task heads ------------------------------------------------------------------------

    def answer_list(self):
        """The config's answer_list file (VQA's candidate answers)."""
        path = resolve_repo_path(self.config.get('answer_list'))
        if not path or not os.path.isfile(path):
            raise ValueError(f'no candidate answers: pass candidates=[...] (the config\'s '
                             f'answer_list {path!r} is not a file)')
        with open(path) as f:
            return json.load(f)

    @_at_precision
    @torch.no_grad()
    def answer(self, image, question, candidates=None, k=5, k_test=None):
        """The k best answers to `question` about `image` among `candidates` (default: the
        config's answer list): [{'answer', 'score'}, ...], best first. As VQA evaluation, the
        k_test answers with the likeliest first token are re-ranked by their full likelihood;
        scores are a softmax over that shortlist."""
        self._require('answer', ('vqa',), 'the answer decoder')
        k, k_test = self._check_k(k, k_test)
        if candidates is None:
            candidates = self.answer_list()
        candidates = [candidates] if isinstance(candidates, str) else list(candidates)
        if not candidates:
            raise ValueError('answer needs at least one candidate answer')
        wrong = next((c for c in candidates if not isinstance(c, str)), None)
        if wrong is not None:
            raise TypeError(f'candidate answers are strings, got {wrong!r} '
                            f'({type(wrong).__name__})')
        eos = self.config.get('eos', '[SEP]')
        answers = self.tokenizer([c + eos for c in candidates], padding='longest',
                                 return_tensors='pt').to(self.device)
        shortlist = min(k_test or self.config.get('k_test', 128), len(candidates))
        ids, probs = self.model(self.preprocess_images([image]), self.tokenize([question], True),
                                answers, k=shortlist, train=False)
        return [{'answer': candidates[i], 'score': p}
                for i, p in zip(ids[0, :k].tolist(), probs[0, :k].tolist())]

    @_at_precision
    @torch.no_grad()
    def classify(self, images, text):
        """SNLI-VE: `images` is one image and `text` a hypothesis -> {'entailment', 'neutral',
        'contradiction'} probabilities. NLVR2: `images` is the (left, right) pair and `text` a
        statement -> {'True', 'False'} probabilities."""
        self._require('classify', ('ve', 'nlvr'), 'a classification head')
        pair = self.kind == 'nlvr'
        if pair and (not isinstance(images, (list, tuple)) or len(images) != 2):
            raise ValueError('an NLVR2 checkpoint classifies a pair of images: pass (left, right)')
        pixels = self.preprocess_images(list(images) if pair else [images])  # (1 or 2, 3, R, R)
        probs = self.model(pixels, self.tokenize([text]), None, train=False).softmax(dim=1)[0]
        labels = NLVR_LABELS if pair else VE_LABELS
        return {name: float(probs[index]) for name, index in labels.items()}

    @_at_precision
    def gradcam(self, image, text, block_num=None):
        """Grad-CAM of the ITM match score through the cross-attention of text-encoder layer
        `block_num` (default: fusion_layer + 2, i.e. 8 in BERT-base as in the paper): one map
        per word piece and their average, at the image's resolution. In the last layer only the
        [CLS] row reaches the ITM head, so its word maps are zero; the default stays below it
        when the model has more than one fusion layer."""
        model = self._itc_itm('gradcam')
        bert = model.text_bert.config
        if block_num is None:
            block_num = default_block(bert)
        if not bert.fusion_layer <= block_num < bert.num_hidden_layers:
            raise ValueError(f'block_num {block_num}: the fusion layers with cross-attention are '
                             f'{bert.fusion_layer}..{bert.num_hidden_layers - 1}')
        if not isinstance(text, str):
            raise TypeError(f'gradcam localises one text (a string), not {type(text).__name__}')
        picture = self.to_pil(image)
        text_input = self.tokenize([text])
        if text_input.input_ids.shape[1] < 2:  # [CLS] alone: no word piece to give a map
            raise ValueError(f'gradcam needs a text with at least one word, got {text!r}')
        token_maps, average = heatmaps(model, self.preprocess_images([picture]), text_input.input_ids,
                                       text_input.attention_mask, block_num,
                                       size=(picture.height, picture.width))
        model.zero_grad(set_to_none=True)  # the backward pass left parameter gradients
        tokens = self.tokenizer.convert_ids_to_tokens(text_input.input_ids[0].tolist())
        return GradCAMMaps(picture, tokens[1:], token_maps[0, 1:].detach().float().cpu(),
                           average[0].detach().float().cpu())
