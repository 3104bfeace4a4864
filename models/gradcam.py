"""Grad-CAM maps of ALBEF for weakly-supervised visual grounding (paper section 4.4).

- itm mode: the cross-attention of one fusion layer (`text_encoder.encoder.layer[block_num]`),
  weighted by the gradient of the ITM "match" logit; a map per text token and their average.
- itc mode: the [CLS] row of one ViT block's self-attention, weighted by the gradient of the
  image-text ITC similarity.
Maps are on the patch grid of the model (image_res / patch_size per side), patch row-major.
Works with the pre-training and retrieval (grounding) models through the encoder API of
models.albef_base.ALBEFBase.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class GradCAM:
    scores: torch.Tensor  # itm: ITM logits (B, 2); itc: similarities / temp (B, B)
    attention: torch.Tensor  # itm: (B, H, L, N) cross-attention; itc: (B, H, N, N) ViT attention
    gradients: torch.Tensor  # d(loss)/d(attention), same shape
    maps: torch.Tensor  # (B, h, w): the map Grounding.py scores boxes with
    token_maps: Optional[torch.Tensor] = None  # itm only: (B, L, h, w), one map per text token


def patch_grid(model):
    """(h, w) patches per image side, from the ViT's configuration."""
    return tuple(model.visual_encoder.patch_embed.grid_size)


def default_block(bert_config):
    """The fusion layer whose cross-attention Grad-CAM reads by default: fusion_layer + 2 (8 in
    BERT-base, as in the paper), kept below the last layer when there is more than one fusion
    layer: only the [CLS] row of the last layer reaches the ITM head, so its word maps are 0."""
    fusion, layers = bert_config.fusion_layer, bert_config.num_hidden_layers
    return min(fusion + 2, max(fusion, layers - 2))


@contextmanager
def recording(module):
    """Record `module`'s attention probabilities and their gradient inside the block."""
    previous = module.save_attention
    module.save_attention = True
    try:
        yield module
    finally:
        module.save_attention = previous


def backward_from(model, loss):
    model.zero_grad()
    loss.backward()


def itm_token_maps(attention, gradients, text_atts, grid):
    """Per-token Grad-CAM (B, L, h, w): head average of attention x positive gradient, over
    image patches (the [CLS] image token dropped); padded tokens are zero."""
    mask = text_atts.view(text_atts.size(0), 1, -1, 1, 1)  # (B, 1, L, 1, 1)
    cams = attention[..., 1:].unflatten(-1, grid) * mask  # (B, H, L, h, w)
    grads = gradients[..., 1:].clamp(min=0).unflatten(-1, grid) * mask
    return (cams * grads).mean(1)


def itm_gradcam(model, image, text_ids, text_atts, block_num):
    """Grad-CAM of the ITM match logit through the cross-attention of layer `block_num`.

    `maps` averages the token maps over ALL L positions. NOTE(faithful): padded positions count
    as zeros in that mean, so a phrase's map is scaled by (its length / padded length).
    """
    module = model.cross_attention(block_num)
    with torch.enable_grad(), recording(module):
        image_embeds = model.encode_image(image)  # (B, N, Dv)
        # The text layers then the fusion layers: the original's one multi_modal pass.
        logits = model.itm_scores(model.encode_text(text_ids, text_atts), text_atts,
                                  image_embeds)  # (B, 2)
        backward_from(model, logits[:, 1].sum())
    attention = module.get_attention_map().detach()
    gradients = module.get_attn_gradients().detach()
    token_maps = itm_token_maps(attention, gradients, text_atts, patch_grid(model))
    return GradCAM(scores=logits.detach(), attention=attention, gradients=gradients,
                   maps=token_maps.mean(1), token_maps=token_maps)


def itc_gradcam(model, image, text_ids, text_atts, block_num):
    """Grad-CAM of the matched-pair ITC similarity through ViT block `block_num`: the [CLS]
    query's attention over patches times its positive gradient, averaged over heads."""
    with torch.enable_grad():
        image_feat = model.image_features(model.encode_image(image, register_blk=block_num))
        text_feat = model.text_features(model.encode_text(text_ids, text_atts))  # (B, E)
        sim = image_feat @ text_feat.t() / model.temp  # (B, B)
        backward_from(model, sim.diag().sum())
    attn = model.visual_encoder.blocks[block_num].attn
    attention = attn.get_attention_map().detach()
    gradients = attn.get_attn_gradients().detach()
    grid = patch_grid(model)
    cam = attention[:, :, 0, 1:].unflatten(-1, grid)  # (B, H, h, w)
    grad = gradients[:, :, 0, 1:].unflatten(-1, grid).clamp(0)
    return GradCAM(scores=sim.detach(), attention=attention, gradients=gradients,
                   maps=(cam * grad).mean(1))


def gradcam(model, image, text_ids, text_atts, mode='itm', block_num=8):
    """Grounding.py's map for `mode` 'itm' (text-encoder layer) or 'itc' (ViT block)."""
    if mode == 'itm':
        return itm_gradcam(model, image, text_ids, text_atts, block_num)
    if mode == 'itc':
        return itc_gradcam(model, image, text_ids, text_atts, block_num)
    raise ValueError(f"unknown gradcam mode {mode!r}; expected 'itm' or 'itc'")


def upsample(maps, size):
    """Bicubic resize of (..., h, w) maps to `size` (H, W), as grounding evaluation does."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    resized = F.interpolate(flat, size=size, mode='bicubic', align_corners=False)
    return resized.reshape(*lead, *size)


def heatmaps(model, image, text_ids, text_atts, block_num, size=None):
    """Per-token and averaged ITM Grad-CAM maps of one or more (image, text) pairs.

    Returns (token_maps (B, L, H, W), average (B, H, W)) on the patch grid, or resized to
    `size` = (H, W) (e.g. the original image size). Unlike grounding, the average runs over the
    real tokens only (no [CLS], no padding), which is what a per-phrase picture wants.
    """
    cam = itm_gradcam(model, image, text_ids, text_atts, block_num)
    token_maps = cam.token_maps  # (B, L, h, w)
    words = text_atts.clone()
    words[:, 0] = 0  # the [CLS] token
    average = (token_maps * words[:, :, None, None]).sum(1) / words.sum(1).clamp(min=1)[:, None, None]
    if size is not None:
        token_maps, average = upsample(token_maps, size), upsample(average, size)
    return token_maps, average
