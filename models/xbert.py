"""Text and multimodal encoder: BERT with ALBEF's fusion layers (paper section 3.1).

A self-contained post-LayerNorm BERT whose state-dict names are those of Hugging Face BERT, so
`bert-base-uncased` weights and the released ALBEF checkpoints load by name. Layers with index
>= `config.fusion_layer` add cross-attention to image tokens. `mode` selects the layers:
`text` = [0, fusion_layer), `fusion` = [fusion_layer, L) on given hidden states,
`multi_modal` = all layers. transformers is used only to read pretrained weights.
"""
import copy
import json
import logging
import math
from dataclasses import dataclass, fields
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from models.attention import AttentionRecorder

logger = logging.getLogger(__name__)


class BertConfig:
    """BERT hyper-parameters plus ALBEF's `fusion_layer` and `encoder_width`."""

    defaults = dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, hidden_act='gelu', hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
        initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, fusion_layer=6,
        encoder_width=768, add_cross_attention=False, is_decoder=False)

    def __init__(self, **kwargs):
        for key, value in {**self.defaults, **kwargs}.items():
            setattr(self, key, value)

    @classmethod
    def from_dict(cls, config_dict):
        return cls(**config_dict)

    @classmethod
    def from_json_file(cls, path):
        try:
            with open(path, encoding='utf-8') as f:
                return cls.from_dict(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f'cannot read the BERT config {path!r}: {e}') from e

    def to_dict(self):
        return dict(vars(self))

    def copy(self):
        return copy.deepcopy(self)

    def __repr__(self):
        return f'BertConfig({self.to_dict()})'


@dataclass
class ModelOutput:
    """Encoder/head outputs; indexable by name or, like a tuple, by position."""
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    last_hidden_state: Optional[torch.Tensor] = None
    pooler_output: Optional[torch.Tensor] = None

    def to_tuple(self):
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


def activation(name):
    if name == 'gelu':
        return nn.GELU()  # exact (erf) GELU, as BERT
    if name in ('gelu_new', 'gelu_pytorch_tanh'):
        return nn.GELU(approximate='tanh')
    if name == 'relu':
        return nn.ReLU()
    raise ValueError(f'unsupported hidden_act {name!r}; expected gelu, gelu_new or relu')


def extended_attention_mask(attention_mask, dtype, is_decoder=False):
    """Additive self-attention mask (B, 1, 1|L, L): 0 where attended, -10000 elsewhere."""
    mask = attention_mask[:, None, None, :].to(dtype)  # (B, 1, 1, L)
    if is_decoder:
        L = attention_mask.shape[1]
        causal = torch.ones(L, L, device=attention_mask.device, dtype=dtype).tril()
        mask = causal[None, None] * mask  # (B, 1, L, L)
    # NOTE(faithful): BERT's -10000 (not -inf): a fully padded row still averages all keys.
    return (1.0 - mask) * -10000.0


def invert_attention_mask(encoder_attention_mask, dtype):
    """Additive cross-attention mask (B, 1, 1, N) with the dtype's minimum at masked keys."""
    mask = encoder_attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


class ImageKeyValues:
    """Precomputed cross-attention keys and values of the fusion layers for a set of images.

    Retrieval re-ranking pairs each image with hundreds of texts; projecting its tokens once per
    layer and gathering them per text (`select`) skips the dominant cost of the fusion pass. The
    result equals passing the images themselves up to float rounding. Gathering is per layer, so
    only one layer's (texts, H, N, d) copy exists at a time.
    """

    def __init__(self, per_layer, index=None, groups=None, blocks=None):
        self.per_layer = per_layer  # layer -> (keys, values), each (I, H, N, d)
        self.index = index  # (B,) image of every text, or None: text b uses image b
        self.groups = groups  # QueryGroups of `index`, or None
        self.blocks = blocks  # see select_blocks, or None

    def select(self, index):
        return ImageKeyValues(self.per_layer, index)

    def select_blocks(self, blocks):
        """Texts laid out in len(blocks) blocks of I texts (I images): in block j, text b
        attends to image b where blocks[j] is None, else to image blocks[j][b]. The training
        paths' rows have this layout (ITM positives, hard negatives, MLM rows, each block one
        row per image or per drawn image). An unmasked cross-attention stacks each image's
        queries of the None blocks (`BlockKeyValues`: no per-text copies) and gathers keys and
        values per text for the other blocks. Unlike `select_grouped`, every shape follows
        from the layout alone, so nothing is read back from the device (no host sync) and a
        compiled layer sees the same shapes at every step."""
        return ImageKeyValues(self.per_layer, blocks=list(blocks))

    def select_grouped(self, index):
        """Like `select`, but an unmasked cross-attention gathers the texts' queries per image
        (`GroupedKeyValues`) instead of copying every image's keys/values once per text: the
        same attention (each query row attends to its own image), no (texts, H, N, d) copies
        and no scatter of their gradients back onto the images."""
        keys = next(iter(self.per_layer.values()))[0]
        return ImageKeyValues(self.per_layer, index, groups=QueryGroups(index, keys.shape[0]))

    def for_layer(self, i):
        """What fusion layer i is given as its encoder states: after `select_blocks` or
        `select_grouped` the layer's keys/values themselves (nothing is gathered; a compiled
        layer then gets the same kind of argument at every layer, so one graph serves them
        all), otherwise `layer(i)` deferred, so that the per-text gather happens inside a
        checkpointed layer too (recomputed in backward rather than kept)."""
        if self.blocks is not None or self.groups is not None:
            return self.layer(i)
        return partial(self.layer, i)

    def layer(self, i):
        """(keys, values) of fusion layer i for every text: gathered here, so a caller that
        defers this call (see BertEncoder) keeps only the per-image tensors alive. After
        `select_grouped`, a `GroupedKeyValues` instead (nothing gathered)."""
        keys, values = self.per_layer[i]
        if self.blocks is not None:
            return BlockKeyValues(keys, values, self.blocks)
        if self.groups is not None:
            return GroupedKeyValues(keys, values, self.index, self.groups)
        if self.index is None:
            return keys, values
        return keys[self.index], values[self.index]


class QueryGroups:
    """Slots that lay out R texts by image: image i owns slots [i * C, (i + 1) * C), C = the
    most texts any image has, and text r sits in slot `slot[r]` of its image (unused slots hold
    zero queries whose outputs are never read)."""

    def __init__(self, image_of_row, num_images):
        rows = image_of_row.numel()
        counts = torch.bincount(image_of_row, minlength=num_images)
        self.num_images, self.per_image = num_images, int(counts.max())
        order = torch.argsort(image_of_row, stable=True)
        first = torch.cumsum(counts, 0) - counts  # first sorted position of each image
        rank = torch.empty_like(order)
        rank[order] = torch.arange(rows, device=order.device) - first[image_of_row[order]]
        self.slot = image_of_row * self.per_image + rank  # (R,), all different


class _RowsAt(torch.autograd.Function):
    """x[index] for an index without repeats: the gradient is written back into zeros without
    accumulation (autograd's accumulating scatter for x[index] is serial on CPU)."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        index, = ctx.saved_tensors
        return grad.new_zeros((ctx.rows,) + grad.shape[1:]).index_put_((index,), grad), None


class GroupedKeyValues:
    """One fusion layer's per-image keys/values with the texts' image assignment; see
    `ImageKeyValues.select_grouped`."""

    def __init__(self, keys, values, index, groups):
        self.keys, self.values, self.index, self.groups = keys, values, index, groups

    def gathered(self):
        """(keys, values) per text, as `ImageKeyValues.layer` without grouping."""
        return self.keys[self.index], self.values[self.index]

    def attend(self, q, dropout_p=0.0):
        """Context (R, L, H * d) of queries q (R, H, L, d) without a key mask: each image's
        texts are stacked along the query axis, (I, H, C * L, d), and attend to that image's
        keys once. Query rows are independent, so this equals per-text attention."""
        groups = self.groups
        R, H, L, d = q.shape
        I, C = groups.num_images, groups.per_image
        # Queries into their slots (backward: a plain gather of the slots' gradients).
        q = q.new_zeros(I * C, H, L, d).index_put((groups.slot,), q)
        q = q.view(I, C, H, L, d).transpose(1, 2).reshape(I, H, C * L, d)
        context = F.scaled_dot_product_attention(q, self.keys, self.values, dropout_p=dropout_p)
        context = context.view(I, H, C, L, d).permute(0, 2, 3, 1, 4).reshape(I * C, L, H * d)
        return _RowsAt.apply(context, groups.slot)


class BlockKeyValues:
    """One fusion layer's per-image keys/values (I, H, N, d) for texts in blocks of I; see
    `ImageKeyValues.select_blocks`."""

    def __init__(self, keys, values, blocks):
        self.keys, self.values, self.blocks = keys, values, blocks

    def gathered(self):
        """(keys, values) per text, as `ImageKeyValues.layer` without grouping."""
        rows = torch.arange(self.keys.size(0), device=self.keys.device)
        index = torch.cat([rows if block is None else block for block in self.blocks])
        return self.keys[index], self.values[index]

    def attend(self, q, dropout_p=0.0):
        """Context (R, L, H * d) of queries q (R, H, L, d), R = len(blocks) * I, without a key
        mask. Query rows are independent, so this equals per-text attention."""
        I = self.keys.size(0)
        _, H, L, d = q.shape
        per_block = q.view(len(self.blocks), I, H, L, d).unbind(0)
        own = [j for j, block in enumerate(self.blocks) if block is None]
        context = [None] * len(self.blocks)
        if own:
            # Image i's queries of every own-image block, stacked: (I, H, S * L, d).
            stacked = torch.stack([per_block[j] for j in own], dim=2).flatten(2, 3)
            out = F.scaled_dot_product_attention(stacked, self.keys, self.values,
                                                 dropout_p=dropout_p)
            for j, c in zip(own, out.unflatten(2, (len(own), L)).unbind(2)):
                context[j] = c
        for j, block in enumerate(self.blocks):
            if block is not None:
                # index_select: its backward adds into the images' rows (index_add_), with
                # repeats, without reading anything back to the host.
                context[j] = F.scaled_dot_product_attention(
                    per_block[j], self.keys.index_select(0, block),
                    self.values.index_select(0, block), dropout_p=dropout_p)
        return torch.cat([c.transpose(1, 2).reshape(I, L, H * d) for c in context])


def gather_rows(x, index):
    """x[index] for an index without repeats (autograd without an accumulating scatter)."""
    return _RowsAt.apply(x, index)


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Persistent because the released checkpoints carry it.
        self.register_buffer('position_ids',
                             torch.arange(config.max_position_embeddings).unsqueeze(0))

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                past_key_values_length=0):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq_length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, past_key_values_length:past_key_values_length + seq_length]
        if token_type_ids is None:
            token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long,
                                         device=inputs_embeds.device)
        embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(AttentionRecorder, nn.Module):
    """Multi-head attention; cross-attention takes keys/values from `encoder_width` inputs.

    SDPA by default. With `save_attention` on a cross-attention module, the explicit softmax path
    records the probabilities and their gradient (Grad-CAM).
    """

    def __init__(self, config, is_cross_attention=False):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f'hidden_size {config.hidden_size} is not a multiple of '
                             f'num_attention_heads {config.num_attention_heads}')
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = config.hidden_size
        self.is_cross_attention = is_cross_attention
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(kv_width, self.all_head_size)
        self.value = nn.Linear(kv_width, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def split_heads(self, x):  # (B, L, D) -> (B, H, L, d)
        B, L, _ = x.shape
        return x.view(B, L, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def key_values(self, source):
        """Keys and values (B, H, N, d) of the attended sequence (B, N, kv_width)."""
        return self.split_heads(self.key(source)), self.split_heads(self.value(source))

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, rows=None):
        """`rows` (an index of positions, self-attention only): outputs for those query
        positions only, attending to every position as usual."""
        if self.is_cross_attention:
            source, mask = encoder_hidden_states, encoder_attention_mask
        else:
            source, mask = hidden_states, attention_mask
        queries = hidden_states if rows is None else hidden_states[:, rows]
        q = self.split_heads(self.query(queries))
        # Precomputed (keys, values) from BertModel.image_key_values, possibly deferred.
        if callable(source):
            source = source()
        if isinstance(source, (GroupedKeyValues, BlockKeyValues)):
            if mask is None and not self.save_attention:
                return source.attend(q, dropout_p=self.dropout.p if self.training else 0.0)
            source = source.gathered()
        if mask is not None:
            mask = mask.to(q.dtype)
            if rows is not None and mask.size(-2) > 1:  # a per-query (causal) mask
                mask = mask[:, :, rows]
        k, v = source if isinstance(source, tuple) else self.key_values(source)
        if self.save_attention and self.is_cross_attention:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size)
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(dim=-1)  # (B, H, L, N)
            self.record_attention(probs)
            context = self.dropout(probs) @ v
        else:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout.p if self.training else 0.0)
        B, H, L, d = context.shape
        return context.transpose(1, 2).reshape(B, L, H * d)


class BertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, config, is_cross_attention=False):
        super().__init__()
        self.self = BertSelfAttention(config, is_cross_attention)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, rows=None):
        context = self.self(hidden_states, attention_mask, encoder_hidden_states,
                            encoder_attention_mask, rows=rows)
        return self.output(context, hidden_states if rows is None else hidden_states[:, rows])


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = activation(config.hidden_act)

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    """Self-attention, cross-attention to the image (fusion layers only), feed-forward."""

    def __init__(self, config, layer_num):
        super().__init__()
        self.layer_num = layer_num
        self.attention = BertAttention(config)
        self.has_cross_attention = layer_num >= config.fusion_layer
        if self.has_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, rows=None):
        """`rows` (an index of positions): the layer's output at those positions only (every
        position is still attended to); e.g. `slice(0, 1)` for the [CLS] state alone."""
        attention_output = self.attention(hidden_states, attention_mask, rows=rows)
        return self.fuse(attention_output, encoder_hidden_states, encoder_attention_mask)

    def fuse(self, attention_output, encoder_hidden_states=None, encoder_attention_mask=None):
        """The layer after its self-attention: cross-attention (fusion layers), feed-forward.
        Every step is per position, so it may run on any subset of the positions."""
        if self.has_cross_attention:
            if encoder_hidden_states is None:
                raise ValueError(f'layer {self.layer_num} is a fusion layer and needs '
                                 'encoder_hidden_states (the image tokens)')
            attention_output = self.crossattention(attention_output, None, encoder_hidden_states,
                                                   encoder_attention_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BertLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def layer_range(self, mode):
        n, fusion = self.config.num_hidden_layers, self.config.fusion_layer
        ranges = {'text': (0, fusion), 'fusion': (fusion, n), 'multi_modal': (0, n)}
        if mode not in ranges:
            raise ValueError(f'unknown mode {mode!r}; expected one of {sorted(ranges)}')
        return ranges[mode]

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, mode='multi_modal'):
        start, end = self.layer_range(mode)
        for i in range(start, end):
            layer = self.layer[i]
            image_states, image_mask = encoder_hidden_states, encoder_attention_mask
            if isinstance(encoder_hidden_states, (list, tuple)):
                # Two-image fusion (NLVR): fusion layers alternate between the images.
                which = (i - self.config.fusion_layer) % len(encoder_hidden_states)
                image_states, image_mask = encoder_hidden_states[which], encoder_attention_mask[which]
            elif isinstance(encoder_hidden_states, ImageKeyValues):
                image_states = (encoder_hidden_states.for_layer(i)
                                if layer.has_cross_attention else None)
            args = (hidden_states, attention_mask, image_states, image_mask)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden_states = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden_states = layer(*args)
        return hidden_states


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


class BertPreTrainedModel(nn.Module):
    """Weight init and pretrained-weight loading shared by the BERT models."""

    base_model_prefix = 'bert'

    def __init__(self, config):
        super().__init__()
        self.config = config

    @property
    def base_model(self):
        """The BertModel inside (itself for a BertModel), as transformers' `base_model`: the
        original's Grounding.py and Grad-CAM notebook reach the cross-attention through
        `text_encoder.base_model.base_model.encoder.layer[k].crossattention.self`."""
        return getattr(self, self.base_model_prefix, self)

    def init_weights(self):
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.tie_weights()

    def tie_weights(self):
        pass

    @classmethod
    def from_pretrained(cls, name_or_path, config, **kwargs):
        """Build from `config` and copy in BERT weights (a hub name or a local HF directory).

        Cross-attention and any layer beyond the pretrained depth stay newly initialised, as in
        the original; every other parameter must load, otherwise this raises.
        """
        from models.pretrained import load_bert_weights
        model = cls(config, **kwargs)
        load_bert_weights(model, name_or_path)
        return model


class BertModel(BertPreTrainedModel):
    def __init__(self, config, add_pooling_layer=True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def image_key_values(self, image_embeds):
        """Cross-attention keys/values of every fusion layer for image tokens (I, N, Dv), to pass
        as `encoder_hidden_states` (after `.select`) instead of the image tokens."""
        return ImageKeyValues({i: layer.crossattention.self.key_values(image_embeds)
                               for i, layer in enumerate(self.encoder.layer)
                               if layer.has_cross_attention})

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                head_mask=None, inputs_embeds=None, encoder_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None,
                use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, is_decoder=False, mode='multi_modal'):
        if encoder_embeds is not None:
            hidden_states = encoder_embeds  # (B, L, D): the output of a `text` pass
        else:
            if input_ids is None and inputs_embeds is None:
                raise ValueError('pass input_ids, inputs_embeds or encoder_embeds')
            hidden_states = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                                            position_ids=position_ids, inputs_embeds=inputs_embeds)
        dtype = hidden_states.dtype
        if attention_mask is None:
            attention_mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        self_mask = extended_attention_mask(attention_mask, dtype, is_decoder)
        if isinstance(encoder_hidden_states, (list, tuple)):
            if encoder_attention_mask is None:
                encoder_attention_mask = [None] * len(encoder_hidden_states)
            cross_mask = [None if m is None else invert_attention_mask(m, dtype)
                          for m in encoder_attention_mask]
        elif encoder_attention_mask is not None:
            cross_mask = invert_attention_mask(encoder_attention_mask, dtype)
        else:
            cross_mask = None
        sequence_output = self.encoder(hidden_states, self_mask, encoder_hidden_states, cross_mask,
                                       mode=mode)
        pooled = self.pooler(sequence_output) if self.pooler is not None else None
        return ModelOutput(last_hidden_state=sequence_output, pooler_output=pooled)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        # The decoder weight is tied to the word embeddings by the owning model.
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output):
        return self.predictions(sequence_output)


class _BertWithLMHead(BertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.init_weights()

    def tie_weights(self):
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias

    def get_output_embeddings(self):
        return self.cls.predictions.decoder


def masked_lm_loss(logits, labels, soft_labels=None, alpha=0):
    """Cross-entropy over the predicted tokens (labels != -100), mixed with the distillation
    loss -sum(soft_labels * log_softmax(logits)) averaged over the same tokens.
    logits (..., V), labels (...): all positions, or any subset that holds the predicted ones."""
    logits = logits.reshape(-1, logits.size(-1))
    labels = labels.reshape(-1)
    loss = F.cross_entropy(logits, labels)
    if soft_labels is not None:
        distill = -(F.log_softmax(logits, dim=-1) * soft_labels.reshape(logits.shape)).sum(dim=-1)
        # The mean over the predicted tokens without boolean indexing (which reads the count
        # back from the device: a host sync on a GPU); unpredicted rows are never read.
        predicted = labels != -100
        distill = torch.where(predicted, distill, 0).sum() / predicted.sum()
        loss = (1 - alpha) * loss + alpha * distill
    return loss


class BertForMaskedLM(_BertWithLMHead):
    """BERT + MLM head; the loss can mix in momentum-distilled soft labels."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                head_mask=None, inputs_embeds=None, encoder_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None,
                is_decoder=False, mode='multi_modal', soft_labels=None, alpha=0,
                return_logits=False):
        outputs = self.bert(input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, encoder_embeds=encoder_embeds,
                            encoder_hidden_states=encoder_hidden_states,
                            encoder_attention_mask=encoder_attention_mask,
                            is_decoder=is_decoder, mode=mode)
        logits = self.cls(outputs.last_hidden_state)  # (B, L, V)
        if return_logits:
            return logits
        loss = masked_lm_loss(logits, labels, soft_labels, alpha) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, last_hidden_state=outputs.last_hidden_state)


class BertLMHeadModel(_BertWithLMHead):
    """Causal BERT decoder with LM head (the VQA answer decoder); per-sequence summed loss."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                head_mask=None, inputs_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, labels=None, past_key_values=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None,
                return_logits=False, is_decoder=True, reduction='mean', soft_labels=None,
                alpha=0, mode='multi_modal'):
        outputs = self.bert(input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids, position_ids=position_ids,
                            inputs_embeds=inputs_embeds,
                            encoder_hidden_states=encoder_hidden_states,
                            encoder_attention_mask=encoder_attention_mask,
                            is_decoder=is_decoder, mode=mode)
        logits = self.cls(outputs.last_hidden_state)  # (B, L, V)
        if return_logits:
            return logits[:, :-1].contiguous()
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].contiguous()  # position t predicts token t+1
            targets = labels[:, 1:].contiguous()
            loss = F.cross_entropy(shifted.view(-1, shifted.size(-1)), targets.view(-1),
                                   reduction=reduction)
            if reduction == 'none':
                loss = loss.view(logits.size(0), -1).sum(1)  # (B,) summed over tokens
            # NOTE(fixed): the original crashed here for reduction='mean'; it now returns the mean.
            if soft_labels is not None:
                distill = -(F.log_softmax(shifted, dim=-1) * soft_labels).sum(dim=-1)  # (B, L-1)
                distill = (distill * (targets != -100)).sum(1)
                loss = (1 - alpha) * loss + alpha * distill
        return ModelOutput(loss=loss, logits=logits, last_hidden_state=outputs.last_hidden_state)
