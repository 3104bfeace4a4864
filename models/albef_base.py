"""What every ALBEF variant shares (paper section 3): building the encoders and the API to run
them (encode image / text, fuse, ITM logits, cross-attention maps), momentum pairs (MoCo-style
EMA), the feature queues and their cross-rank gather, and the ITC, hard-negative and MLM-masking
helpers."""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models.vit import vit_from_config
from models.xbert import BertConfig


def load_bert_config(config):
    """`config['bert_config']`: a path to a BERT JSON config, a dict, or a BertConfig."""
    bert_config = config['bert_config']
    if isinstance(bert_config, BertConfig):
        return bert_config.copy()
    if isinstance(bert_config, dict):
        return BertConfig.from_dict(bert_config)
    return BertConfig.from_json_file(bert_config)


def fit_tokenizer(tokenizer, bert_config):
    """Make `tokenizer` (models.tokenization_bert.BertTokenizer; None: nothing to do) truncate
    every text to the position table of a BERT of `bert_config`: longer input would crash the
    text encoder. The models call it on the tokenizer given to their constructor (the
    caller's own object: the scripts' and albef.api's)."""
    if tokenizer is not None:
        tokenizer.model_max_length = bert_config.max_position_embeddings
    return tokenizer


def build_text_model(cls, bert_config, text_encoder=None, **kwargs):
    """A BERT module of class `cls`: random (text_encoder=None) or from pretrained weights."""
    if text_encoder:
        return cls.from_pretrained(text_encoder, config=bert_config, **kwargs)
    return cls(bert_config, **kwargs)


@torch.no_grad()
def concat_all_gather(tensor):
    """Concatenate `tensor` from every rank along dim 0 (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def itc_loss(sim, targets):
    """Cross-entropy of similarity rows against (soft) target distributions."""
    return -(F.log_softmax(sim, dim=1) * targets).sum(dim=1).mean()


def finite_sampling_weights(weights):
    """`weights` (B, B) with every row that holds a non-finite value made uniform over the other
    columns. Such rows come from a diverged step (NaN similarities): its loss is non-finite too
    and the run's non-finite-loss policy (skip or stop) decides, instead of torch.multinomial
    failing first. NOTE(fixed): finite rows, hence the random draws, are unchanged; no host sync."""
    finite_rows = torch.isfinite(weights).all(dim=1, keepdim=True)
    return torch.where(finite_rows, weights, _uniform_off_diagonal(weights))


def sample_negatives(weights):
    """One index per row of `weights`, drawn row by row.

    NOTE(faithful): one multinomial call per sample, in row order, so the draws follow the
    original's random-number stream.
    """
    return torch.stack([torch.multinomial(w, 1)[0] for w in finite_sampling_weights(weights)])


def sample_negatives_batched(weights):
    """One index per row of `weights` (B, B) in a single call: the same distribution as
    `sample_negatives`, no per-row launch or host sync, a different random stream.

    The draw is torch.multinomial(weights, 1)'s own for one sample per row, argmax of
    weights / Exponential(1) noise from the same generator, written out because
    torch.multinomial first checks the weights with `.item()` calls (two host syncs on a
    GPU). Same indices and random stream as torch.multinomial(weights, 1) (tests/test_sync_free.py
    on the CPU, tests/test_cuda.py on CUDA). A row without positive weight (retrieval: every
    sample of the batch shares the anchor's image id), where torch.multinomial raised, draws
    uniformly from the other columns instead.
    """
    weights = finite_sampling_weights(weights)
    weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights,
                          _uniform_off_diagonal(weights))
    noise = torch.empty_like(weights).exponential_(1)
    return (weights / noise).argmax(dim=1)


def _uniform_off_diagonal(weights):
    uniform = torch.ones_like(weights)
    if weights.size(0) == weights.size(1):
        uniform.fill_diagonal_(0)
    return uniform


def mask_tokens(input_ids, vocab_size, tokenizer, mlm_probability, targets=None,
                masked_indices=None, probability_matrix=None, candidates=False):
    """BERT masking (80% [MASK], 10% random token, 10% unchanged) of a copy of `input_ids`.

    Returns (masked_ids, targets) on the device of `input_ids`; targets are -100 where nothing
    is predicted. NOTE(faithful): every draw covers the full (B, L) shape and comes from the CPU
    generator in the original order (selection, replace, random, random ids), whatever the
    device, so masking is identical on CPU and GPU. The draws do not depend on the ids: they
    are made on the CPU, sent to the ids' device in one non-blocking copy and combined with
    the ids there, so the ids never travel back to the host (no host sync on a GPU).

    With `candidates`, also returns the flat positions (P,) on that device that the selection
    draw picked before [PAD] and [CLS] are excluded: a superset of the predicted positions
    (targets != -100), in order, known without reading the ids.
    """
    device = input_ids.device
    shape = input_ids.shape
    if probability_matrix is None:
        probability_matrix = torch.full(shape, mlm_probability)
    if masked_indices is None:
        masked_indices = torch.bernoulli(probability_matrix).bool()
    masked_indices = masked_indices.cpu()
    replaced = torch.bernoulli(torch.full(shape, 0.8)).bool()
    randomised = torch.bernoulli(torch.full(shape, 0.5)).bool()
    random_words = torch.randint(vocab_size, shape, dtype=torch.long)
    draws = to_device(torch.stack([masked_indices.long(), replaced.long(), randomised.long(),
                                   random_words]), device)
    selected, replaced, randomised, random_words = draws.unbind(0)
    selected = (selected.bool() & (input_ids != tokenizer.pad_token_id)
                & (input_ids != tokenizer.cls_token_id))
    replaced = replaced.bool() & selected
    randomised = randomised.bool() & selected & ~replaced
    ids = torch.where(replaced, tokenizer.mask_token_id, input_ids.detach())
    ids = torch.where(randomised, random_words, ids)
    out = (ids,)
    if targets is not None:
        out += (torch.where(selected, targets.detach().to(device), -100),)
    if candidates:
        out += (to_device(masked_indices.flatten().nonzero().squeeze(1), device),)
    return out if len(out) > 1 else ids


def to_device(tensor, device):
    """A CPU tensor on `device`; to a GPU through pinned memory without waiting (the pinned
    block is not reused before the copy is done)."""
    if torch.device(device).type == 'cuda':
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class ALBEFBase(nn.Module):
    """Momentum-pair bookkeeping and the ViT builder for the ALBEF model classes.

    `fast_train` (config key, set by the models that have a fast training path) selects the
    faster computation of the same losses; False keeps the original's operations and random
    stream. `momentum_updates` = False skips the EMA step (gradient accumulation: the teacher
    moves once per optimiser step, not once per micro-batch).
    """

    model_pairs: list
    fast_train = False
    momentum_updates = True

    @staticmethod
    def build_visual_encoder(config):
        return vit_from_config(config)

    # ---- the encoders, one API for the models, Grad-CAM, retrieval evaluation and albef.api ----
    # `*_embeds`: token states (B, L, D); `*_feat`: normalised projected [CLS] vectors (B, E).

    def _module(self, name, momentum):
        return getattr(self, f'{name}_m' if momentum else name)

    @property
    def text_bert(self):
        """The BertModel of the text encoder (the pre-training model's BertForMaskedLM wraps one)."""
        return getattr(self.text_encoder, 'bert', self.text_encoder)

    def encode_image(self, image, momentum=False, register_blk=-1):
        """ViT token states (B, 1 + P, Dv); `register_blk` records that block's attention."""
        return self._module('visual_encoder', momentum)(image, register_blk=register_blk)

    def image_features(self, image_embeds, momentum=False):
        return F.normalize(self._module('vision_proj', momentum)(image_embeds[:, 0]), dim=-1)

    def encode_text(self, input_ids, attention_mask, momentum=False):
        """The unimodal text layers [0, fusion_layer): token states (B, L, D)."""
        encoder = self._module('text_encoder', momentum)
        encoder = getattr(encoder, 'bert', encoder)
        return encoder(input_ids, attention_mask=attention_mask, return_dict=True,
                       mode='text').last_hidden_state

    def text_features(self, text_embeds, momentum=False):
        return F.normalize(self._module('text_proj', momentum)(text_embeds[:, 0]), dim=-1)

    def encode(self, image, text):
        """Unimodal encodings: (image_embeds, image_feat, text_embeds, text_feat)."""
        image_embeds = self.encode_image(image)  # (B, N, Dv)
        text_embeds = self.encode_text(text.input_ids, text.attention_mask)  # (B, L, D)
        return (image_embeds, self.image_features(image_embeds), text_embeds,
                self.text_features(text_embeds))

    def fusion(self, text_embeds, text_atts, image_embeds):
        """The fusion layers [fusion_layer, L) on text states, cross-attending to image tokens."""
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                device=image_embeds.device)
        return self.text_bert(encoder_embeds=text_embeds, attention_mask=text_atts,
                              encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                              return_dict=True, mode='fusion').last_hidden_state

    def itm_scores(self, text_embeds, text_atts, image_embeds):
        """ITM logits (B, 2) of (text b, image b) pairs; column 1 is "match"."""
        return self.itm_head(self.fusion(text_embeds, text_atts, image_embeds)[:, 0])

    def cross_attention(self, layer):
        """The cross-attention module of text-encoder layer `layer` (a fusion layer), whose
        `save_attention` records the attention map and its gradient (Grad-CAM)."""
        block = self.text_bert.encoder.layer[layer]
        if not block.has_cross_attention:
            raise ValueError(f'text-encoder layer {layer} has no cross-attention (fusion layers '
                             f'start at {self.text_bert.config.fusion_layer})')
        return block.crossattention.self

    def momentum_parameter_pairs(self):
        for model, model_m in self.model_pairs:
            yield from zip(model.parameters(), model_m.parameters())

    @torch.no_grad()
    def copy_params(self):
        for param, param_m in self.momentum_parameter_pairs():
            param_m.data.copy_(param.data)
            param_m.requires_grad = False

    @torch.no_grad()
    def _momentum_update(self):
        if not self.momentum_updates:
            return
        if self.fast_train:
            # In place, one pass over every tensor: p_m + (1 - m) * (p - p_m), equal to the
            # original's p_m * m + p * (1 - m) up to float rounding (one read of each tensor
            # pair and one write, instead of two passes).
            params, params_m = zip(*self.momentum_parameter_pairs())
            torch._foreach_lerp_(params_m, params, 1.0 - self.momentum)
            return
        # NOTE(faithful): p_m * m + p * (1 - m) as two products and a sum (not lerp).
        for param, param_m in self.momentum_parameter_pairs():
            param_m.data = param_m.data * self.momentum + param.data * (1.0 - self.momentum)

    def itc_similarities(self, image_feat, text_feat, image_feat_m, text_feat_m):
        """Online rows against [batch momentum features | queue] columns, and the teacher's."""
        if self.fast_train:
            # One copy of each queue, not two: the concatenation is already a snapshot that the
            # in-place enqueue cannot touch before backward.
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue], dim=1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue], dim=1)
        else:
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
        sim_i2t = image_feat @ text_feat_all / self.temp  # (B, B + Q)
        sim_t2i = text_feat @ image_feat_all / self.temp
        with torch.no_grad():
            sim_i2t_m = image_feat_m @ text_feat_all / self.temp
            sim_t2i_m = text_feat_m @ image_feat_all / self.temp
        return sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat, text_feat, idx=None):
        """Write the gathered momentum features (and image ids) into the queues at the pointer."""
        image_feats = concat_all_gather(image_feat)
        text_feats = concat_all_gather(text_feat)
        batch_size = image_feats.shape[0]
        if self.queue_size % batch_size != 0:
            raise ValueError(f'queue_size {self.queue_size} is not a multiple of the global '
                             f'batch size {batch_size}')
        # NOTE(fixed): a sample whose features are not finite (a diverged step, which the run's
        # non-finite policy may skip) leaves its queue slot as it was: one NaN entry would make
        # every later contrastive loss NaN. Finite features are written as in the original.
        finite = (torch.isfinite(image_feats).all(dim=1) & torch.isfinite(text_feats).all(dim=1))[None]
        # The columns ptr .. ptr + batch - 1, indexed with the pointer tensor itself: the
        # original's int(queue_ptr) waits for the device (a host sync) at every step.
        window = self.queue_ptr + torch.arange(batch_size, device=self.queue_ptr.device)

        def write(queue, columns):
            queue.index_copy_(1, window, torch.where(finite, columns.to(queue.dtype),
                                                     queue.index_select(1, window)))
        write(self.image_queue, image_feats.T)
        write(self.text_queue, text_feats.T)
        if idx is not None:
            write(self.idx_queue, concat_all_gather(idx).T)
        self.queue_ptr.copy_((self.queue_ptr + batch_size) % self.queue_size)

    def register_queues(self, embed_dim, queue_size, with_idx=False):
        self.register_buffer('image_queue', F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer('text_queue', F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        if with_idx:
            self.register_buffer('idx_queue', torch.full((1, queue_size), -100))
        self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))


def hard_negative_batch(text_embeds, text_atts, image_embeds, neg_img_idx, neg_txt_idx):
    """The 2B ITM negative pairs in the original order: every text b with image
    neg_img_idx[b], then text neg_txt_idx[b] (with its own mask) with every image b.

    Returns (text_embeds, text_atts, image_embeds), each with 2B rows.
    """
    text_embeds_all = torch.cat([text_embeds, text_embeds[neg_txt_idx]], dim=0)  # (2B, L, D)
    text_atts_all = torch.cat([text_atts, text_atts[neg_txt_idx]], dim=0)
    image_embeds_all = torch.cat([image_embeds[neg_img_idx], image_embeds], dim=0)  # (2B, N, Dv)
    return text_embeds_all, text_atts_all, image_embeds_all


def itm_labels(bs, device):
    """ITM targets of B positives then 2B negatives, made on the device (a copy from the
    host's pageable memory would wait for the device)."""
    return torch.cat([torch.ones(bs, dtype=torch.long, device=device),
                      torch.zeros(2 * bs, dtype=torch.long, device=device)])


def sparse_embedding(ids, embedding):
    """`embedding`(ids) with a sparse weight gradient that skips the padding row, as
    F.embedding(..., padding_idx, sparse=True) computes it, but without its host sync (that
    backward drops the padding positions by boolean indexing): the padding positions send a
    zero gradient instead, which adds nothing to the dense gradient it joins."""
    out = F.embedding(ids, embedding.weight, sparse=True)
    if embedding.padding_idx is None:
        return out
    return torch.where((ids == embedding.padding_idx).unsqueeze(-1), out.detach(), out)
