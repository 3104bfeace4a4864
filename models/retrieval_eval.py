"""Image-text retrieval evaluation (paper section 4.1) as library functions.

Candidates are ranked by ITC cosine similarity; the top `k_test` of every query are re-scored by
the fusion encoder (raw ITM "match" logit) and every other cell stays -100. Two equivalent paths:
- `itm_score_matrices_plain`: the original loop, one fusion call of k pairs per query;
- `itm_score_matrices`: the same matrices, faster: each (image, text) pair is scored once even
  when both directions ask for it, an image's cross-attention keys/values are computed once per
  fusion layer and shared by all its texts, the first fusion layer's self-attention (which does
  not see the image) once per text, many pairs of similar text length go through one fusion
  call with padding beyond its longest text dropped, and the last fusion layer computes the
  [CLS] position only. Equal to the plain path up to float rounding.
`itm_eval` turns the matrices into Recall@K.
"""
import numpy as np
import torch
import torch.distributed as dist

from models.albef_base import concat_all_gather
from models.xbert import extended_attention_mask


def _distributed(world_size):
    return world_size > 1 and dist.is_available() and dist.is_initialized()


@torch.no_grad()
def encode_texts(model, text_ids, text_atts, batch_size=256):
    """Unimodal text states (T, L, D) and normalised text features (T, E), in chunks."""
    embeds, feats = [], []
    for start in range(0, text_ids.size(0), batch_size):
        text_embeds = model.encode_text(text_ids[start:start + batch_size],
                                        text_atts[start:start + batch_size])
        embeds.append(text_embeds)
        feats.append(model.text_features(text_embeds))
    return torch.cat(embeds), torch.cat(feats)


@torch.no_grad()
def encode_images(model, images):
    """ViT token states (I, N, Dv) and normalised image features (I, E).

    `images` is a tensor (I, 3, H, W) or an iterable of batches (tensors, or tuples whose first
    element is the image tensor, as the evaluation loaders yield)."""
    batches = [images] if torch.is_tensor(images) else images
    embeds, feats = [], []
    device = next(model.parameters()).device
    for batch in batches:
        batch = batch if torch.is_tensor(batch) else batch[0]
        image_embeds = model.encode_image(batch.to(device))
        embeds.append(image_embeds)
        feats.append(model.image_features(image_embeds))
    return torch.cat(embeds), torch.cat(feats)


def _gather_padded(tensor, rows):
    """Every rank's `tensor` padded to `rows` rows, concatenated in rank order (W * rows, ...)."""
    padded = tensor.new_zeros((rows,) + tensor.shape[1:])
    padded[:tensor.size(0)] = tensor
    return concat_all_gather(padded)


@torch.no_grad()
def encode_texts_sharded(model, text_ids, text_atts, rank, world_size, batch_size=256):
    """`encode_texts` with the captions split into contiguous shards, one per rank, and the
    results gathered: every rank ends with all (T, L, D) states and (T, E) features."""
    total = text_ids.size(0)
    share = -(-total // world_size)
    start, end = min(total, rank * share), min(total, (rank + 1) * share)
    if end > start:
        embeds, feats = encode_texts(model, text_ids[start:end], text_atts[start:end], batch_size)
    else:  # an empty shard still takes part in the gather, with the right shapes
        embeds, feats = (t[:0] for t in encode_texts(model, text_ids[:1], text_atts[:1]))
    # Only the last shards can be short, so the padding all sits after the last caption.
    return _gather_padded(embeds, share)[:total], _gather_padded(feats, share)[:total]


@torch.no_grad()
def encode_images_sharded(model, images, rank, world_size):
    """`encode_images` with the batches dealt round-robin to the ranks (batch b to rank
    b % world_size; every rank still reads them all from its loader) and the results gathered
    in dataset order on every rank."""
    batches = [images] if torch.is_tensor(images) else images
    device = next(model.parameters()).device
    sizes, mine, last = [], [], None
    for b, batch in enumerate(batches):
        last = batch if torch.is_tensor(batch) else batch[0]
        sizes.append(last.size(0))
        if b % world_size == rank:
            image_embeds = model.encode_image(last.to(device))
            mine.append((image_embeds, model.image_features(image_embeds)))
    if not mine:  # fewer batches than ranks: the shapes from a one-image pass
        image_embeds = model.encode_image(last[:1].to(device))
        mine.append((image_embeds[:0], model.image_features(image_embeds)[:0]))
    empty = tuple(t[:0] for t in mine[0])
    rows = max(sizes)
    embeds, feats = [], []
    for round_number, first in enumerate(range(0, len(sizes), world_size)):
        # This round gathers batch first + r from every rank r (an empty one past the end).
        own = mine[round_number] if first + rank < len(sizes) else empty
        parts_embeds, parts_feats = (_gather_padded(t, rows).unflatten(0, (world_size, rows))
                                     for t in own)
        for r, b in enumerate(range(first, min(first + world_size, len(sizes)))):
            embeds.append(parts_embeds[r][:sizes[b]])
            feats.append(parts_feats[r][:sizes[b]])
    return torch.cat(embeds), torch.cat(feats)


def itc_similarity(image_feats, text_feats):
    """Cosine similarities (I, T); no temperature (ranking only)."""
    return image_feats @ text_feats.t()


def _top_k(sims, k_test):
    # NOTE(fixed): k is capped at the number of candidates (the original's topk raised).
    return sims.topk(k=min(k_test, sims.size(1)), dim=1).indices


@torch.no_grad()
def itm_score_matrices_plain(model, image_embeds, text_embeds, text_atts, sims, k_test,
                             rank=0, world_size=1, progress=None):
    """(score_i2t (I, T), score_t2i (T, I)) exactly as the original evaluation loop.

    With several ranks each computes a block of rows and the matrices are summed across ranks.
    NOTE(faithful): the -100 fill is summed too, so with W ranks computed cells are shifted by
    -100*(W-1) and the rest read -100*W; rankings within a row are unaffected.
    """
    n_img, n_txt = sims.shape
    score_i2t = torch.full((n_img, n_txt), -100.0, dtype=sims.dtype, device=sims.device)
    score_t2i = torch.full((n_txt, n_img), -100.0, dtype=sims.dtype, device=sims.device)
    for scores, query_sims, rows in ((score_i2t, sims, n_img), (score_t2i, sims.t(), n_txt)):
        step = rows // world_size + 1
        start, end = rank * step, min(rows, rank * step + step)
        if start >= end:
            continue
        top = _top_k(query_sims[start:end], k_test)
        for row, topk_idx in (progress or iter)(list(zip(range(start, end), top))):
            k = topk_idx.numel()
            if scores is score_i2t:  # image `row` against its k texts
                logits = model.itm_scores(text_embeds[topk_idx], text_atts[topk_idx],
                                          image_embeds[row].repeat(k, 1, 1))
            else:  # text `row` against its k images
                logits = model.itm_scores(text_embeds[row].repeat(k, 1, 1),
                                          text_atts[row].repeat(k, 1), image_embeds[topk_idx])
            scores[row, topk_idx] = logits[:, 1].to(scores.dtype)
    if _distributed(world_size):
        dist.all_reduce(score_i2t, op=dist.ReduceOp.SUM)
        dist.all_reduce(score_t2i, op=dist.ReduceOp.SUM)
    return score_i2t, score_t2i


def candidate_pairs(sims, k_test):
    """Every (image, text) pair either direction re-scores, once, sorted by image.

    Returns (pairs (P,) as image * T + text codes, i2t_codes (I, k), t2i_codes (T, k)).
    """
    n_img, n_txt = sims.shape
    img_rows = torch.arange(n_img, device=sims.device)[:, None]
    txt_rows = torch.arange(n_txt, device=sims.device)[:, None]
    i2t_codes = img_rows * n_txt + _top_k(sims, k_test)  # (I, k)
    t2i_codes = _top_k(sims.t(), k_test) * n_txt + txt_rows  # (T, k)
    pairs = torch.unique(torch.cat([i2t_codes.flatten(), t2i_codes.flatten()]))  # sorted
    return pairs, i2t_codes, t2i_codes


def _length_batches(order, lengths, batch, full_width, trim_padding):
    """(rows, width) of consecutive `batch`-sized slices of `order` (indices sorted by
    `lengths`, ascending): width is the slice's longest length when `trim_padding`, else
    `full_width`."""
    widths = lengths[order].tolist()
    for start in range(0, order.numel(), batch):
        rows = order[start:start + batch]
        yield rows, widths[start + rows.numel() - 1] if trim_padding else full_width


def _first_fusion_attention(layer, text_embeds, text_atts, lengths, batch, trim_padding):
    """Self-attention output (U, L, D) of the first fusion layer for U texts: its input is the
    text encoder's output, so it does not depend on the image and is computed once per text.
    Texts run `batch` at a time in length order, each batch trimmed to its longest text when
    `trim_padding`; positions beyond a text's batch width stay 0 (padding, never attended)."""
    out = torch.zeros_like(text_embeds)
    order = torch.argsort(lengths, stable=True)
    for rows, width in _length_batches(order, lengths, batch, out.size(1), trim_padding):
        atts = text_atts[rows, :width]
        out[rows, :width] = layer.attention(text_embeds[rows, :width],
                                            extended_attention_mask(atts, out.dtype))
    return out


def _fusion_cls(encoder, first_attention, text_atts, key_values):
    """The [CLS] state after the fusion layers, from the first fusion layer's self-attention
    output; the last layer computes the [CLS] position only (the others are not read)."""
    start, end = encoder.layer_range('fusion')
    hidden = first_attention if end - start > 1 else first_attention[:, :1]
    hidden = encoder.layer[start].fuse(hidden, key_values.layer(start))
    mask = extended_attention_mask(text_atts, hidden.dtype)
    for i in range(start + 1, end):
        hidden = encoder.layer[i](hidden, mask, key_values.layer(i),
                                  rows=slice(0, 1) if i == end - 1 else None)
    return hidden[:, 0]


@torch.no_grad()
def score_pairs(model, image_embeds, text_embeds, text_atts, image_idx, text_idx,
                pair_batch=256, image_batch=32, trim_padding=True, progress=None):
    """Raw ITM match logits (P,) of the pairs (image_idx[p], text_idx[p]).

    Pairs must be grouped by image (sorted image_idx). The first fusion layer's self-attention
    is computed once per text (it does not see the image). Images are processed `image_batch`
    at a time: their cross-attention keys/values are projected once per fusion layer; their
    pairs are ordered by text length (then image) and run `pair_batch` per fusion call, each
    call attending group-wise to its images' keys/values (no per-pair copies). With
    `trim_padding`, each call drops the columns beyond its longest text (masked keys get exactly
    zero weight, so only rounding changes). The last fusion layer computes [CLS] only.
    """
    scores = torch.empty(image_idx.numel(), dtype=text_embeds.dtype, device=text_embeds.device)
    if image_idx.numel() == 0:
        return scores
    encoder = model.text_encoder.encoder
    fusion_start, _ = encoder.layer_range('fusion')
    lengths = text_atts.sum(1)
    texts, pair_text = torch.unique(text_idx, return_inverse=True)
    first_attention = _first_fusion_attention(encoder.layer[fusion_start], text_embeds[texts],
                                              text_atts[texts], lengths[texts], pair_batch,
                                              trim_padding)
    pair_len = lengths[text_idx]
    bounds = torch.searchsorted(image_idx, torch.arange(0, image_embeds.size(0) + image_batch,
                                                        image_batch, device=image_idx.device))
    chunks = list(enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())))
    for chunk, (lo, hi) in (progress or iter)(chunks):
        if lo == hi:
            continue
        first = chunk * image_batch
        key_values = model.text_encoder.image_key_values(image_embeds[first:first + image_batch])
        local_image = image_idx[lo:hi] - first
        order = lo + torch.argsort(pair_len[lo:hi] * image_batch + local_image, stable=True)
        for sel, width in _length_batches(order, pair_len, pair_batch, text_atts.size(1),
                                          trim_padding):
            cls = _fusion_cls(encoder, first_attention[pair_text[sel], :width],
                              text_atts[text_idx[sel], :width],
                              key_values.select_grouped(image_idx[sel] - first))
            scores[sel] = model.itm_head(cls)[:, 1].to(scores.dtype)  # autocast: bf16/fp16
    return scores


def rank_share(count, rank, world_size):
    """The slice of `count` items rank `rank` of `world_size` handles: contiguous, sizes differ
    by at most one."""
    return slice(rank * count // world_size, (rank + 1) * count // world_size)


@torch.no_grad()
def itm_score_matrices(model, image_embeds, text_embeds, text_atts, sims, k_test, rank=0,
                       world_size=1, pair_batch=256, image_batch=32, trim_padding=True,
                       progress=None):
    """The plain path's (score_i2t, score_t2i), computed faster (see the module docstring).

    With several ranks each scores an equal share of the pairs and the scores are summed over
    ranks (an all-reduce), so the matrices do not depend on the world size. The pairs are sorted
    by image: a share is a run of images (one at a boundary is projected by both ranks). Equal
    shares of images instead would leave the ranks whose images are frequent ITC candidates of
    the texts with more pairs, and the others waiting for them in the all-reduce.
    NOTE(fixed): the plain path's summed -100 fill shifts scores by the world size; here
    uncomputed cells read exactly -100.
    """
    n_img, n_txt = sims.shape
    pairs, i2t_codes, t2i_codes = candidate_pairs(sims, k_test)
    image_idx, text_idx = pairs // n_txt, pairs % n_txt
    mine = rank_share(pairs.numel(), rank, world_size)
    scores = torch.zeros(pairs.numel(), dtype=sims.dtype, device=sims.device)
    scores[mine] = score_pairs(model, image_embeds, text_embeds, text_atts, image_idx[mine],
                               text_idx[mine], pair_batch, image_batch, trim_padding,
                               progress).to(sims.dtype)
    if _distributed(world_size):
        dist.all_reduce(scores, op=dist.ReduceOp.SUM)  # each pair is scored on one rank only
    score_i2t = torch.full((n_img, n_txt), -100.0, dtype=sims.dtype, device=sims.device)
    score_t2i = torch.full((n_txt, n_img), -100.0, dtype=sims.dtype, device=sims.device)
    score_i2t.view(-1)[i2t_codes.flatten()] = scores[torch.searchsorted(pairs, i2t_codes.flatten())]
    t2i_scores = scores[torch.searchsorted(pairs, t2i_codes.flatten())]
    t2i_rows = t2i_codes % n_txt
    score_t2i[t2i_rows.flatten(), (t2i_codes // n_txt).flatten()] = t2i_scores
    return score_i2t, score_t2i


@torch.no_grad()
def evaluation(model, images, text_ids, text_atts, k_test, fast=True, rank=0, world_size=1,
               text_batch=256, progress=None, **fast_options):
    """Score matrices (score_i2t (I, T), score_t2i (T, I)) of a retrieval split, in eval mode.

    images: a tensor or an iterable of image batches in dataset order; text_ids/text_atts: all
    captions tokenised as in the original (padded to 30 tokens). progress: wraps the ITM
    re-ranking loop (e.g. a MetricLogger.log_every, for an ETA); it needs a sized iterable.
    """
    was_training = model.training
    model.eval()
    try:
        if fast and _distributed(world_size):
            text_embeds, text_feats = encode_texts_sharded(model, text_ids, text_atts, rank,
                                                           world_size, text_batch)
            image_embeds, image_feats = encode_images_sharded(model, images, rank, world_size)
        else:  # NOTE(faithful): the original encodes the whole split on every rank
            text_embeds, text_feats = encode_texts(model, text_ids, text_atts, text_batch)
            image_embeds, image_feats = encode_images(model, images)
        sims = itc_similarity(image_feats, text_feats).float()  # float32 under autocast too
        score = itm_score_matrices if fast else itm_score_matrices_plain
        kwargs = fast_options if fast else {}
        return score(model, image_embeds, text_embeds, text_atts, sims, k_test, rank=rank,
                     world_size=world_size, progress=progress, **kwargs)
    finally:
        model.train(was_training)


def _as_numpy(scores):
    return scores.detach().cpu().numpy() if torch.is_tensor(scores) else np.asarray(scores)


def itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """Recall@{1,5,10} in percent for text retrieval (txt_*) and image retrieval (img_*).

    img2txt[i]: the caption ids of image i; txt2img[t]: the image id of caption t. A query's rank
    is the best position of its ground truth in `np.argsort(scores)[::-1]`. NOTE(faithful):
    among tied scores (the -100 fillers) the order is numpy's, which is platform-dependent.
    """
    scores_i2t, scores_t2i = _as_numpy(scores_i2t), _as_numpy(scores_t2i)

    def position(row, item):
        return np.where(np.argsort(row)[::-1] == item)[0][0]

    def recalls(ranks):
        return [100.0 * np.count_nonzero(ranks < k) / len(ranks) for k in (1, 5, 10)]

    txt_ranks = np.array([min(position(row, int(t)) for t in img2txt[i])
                          for i, row in enumerate(scores_i2t)])
    img_ranks = np.array([position(row, int(txt2img[t])) for t, row in enumerate(scores_t2i)])
    tr1, tr5, tr10 = recalls(txt_ranks)
    ir1, ir5, ir10 = recalls(img_ranks)
    tr_mean, ir_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
    return {'txt_r1': tr1, 'txt_r5': tr5, 'txt_r10': tr10, 'txt_r_mean': tr_mean,
            'img_r1': ir1, 'img_r5': ir5, 'img_r10': ir10, 'img_r_mean': ir_mean,
            'r_mean': (tr_mean + ir_mean) / 2}
