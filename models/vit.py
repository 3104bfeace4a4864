"""Image encoder: the DeiT-style ViT-B/16 of ALBEF (paper section 3.1).

Built from timm's PatchEmbed, Block and Mlp so the state-dict names are the ones the released
checkpoints use (`patch_embed.proj`, `blocks.N.attn.qkv`, ...). Attention runs through
`scaled_dot_product_attention`; a block asked to record its attention (Grad-CAM) switches to the
explicit softmax path and keeps the map and its gradient.
"""
import logging
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import PatchEmbed, trunc_normal_
from timm.layers.attention import Attention as TimmAttention
from timm.models.vision_transformer import Block

from models.attention import AttentionRecorder

logger = logging.getLogger(__name__)

# ViT-B/16, the paper's image encoder; tiny models override these through the config.
VIT_DEFAULTS = dict(patch_size=16, vision_width=768, vit_depth=12, vit_heads=12)


class Attention(AttentionRecorder, TimmAttention):
    """timm attention plus the original's attention-map recording for Grad-CAM."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0, **_unused):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        # Each (B, H, N, d), the same views as permute(2, 0, 3, 1, 4).unbind(0); unbinding dim 2
        # lets backward stack the three gradients straight into the (B, N, 3, H, d) layout of
        # the qkv output instead of stacking and then copying to it.
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        if self.save_attention:
            # NOTE(faithful): the scale multiplies after q @ k^T, as in the original.
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = self.attn_drop(attn.softmax(dim=-1))  # (B, H, N, N)
            self.record_attention(attn)
            x = attn @ v
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class VisionTransformer(nn.Module):
    """ViT returning the whole token sequence (B, 1 + P, D) after the final LayerNorm.

    The constructor keeps the original's arguments; `num_classes`, `representation_size` and
    `qk_scale` are accepted for compatibility and unused (ALBEF has no classifier head).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                 representation_size=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        drop_path = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth decay
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  proj_drop=drop_rate, attn_drop=attn_drop_rate, drop_path=drop_path[i],
                  norm_layer=norm_layer, attn_layer=Attention)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.gradient_checkpointing = False

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, register_blk=-1):
        B = x.shape[0]
        x = self.patch_embed(x)  # (B, P, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, N, D)
        x = self.pos_drop(x + self.pos_embed[:, :x.size(1)])
        for i, blk in enumerate(self.blocks):
            blk.attn.save_attention = i == register_blk
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)


def vit_from_config(config):
    """The ALBEF image encoder sized by the config keys image_res, patch_size, vision_width,
    vit_depth, vit_heads (defaults: ViT-B/16)."""
    get = lambda key: config.get(key, VIT_DEFAULTS[key])
    return VisionTransformer(img_size=config['image_res'], patch_size=get('patch_size'),
                             embed_dim=get('vision_width'), depth=get('vit_depth'),
                             num_heads=get('vit_heads'), mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6))


def interpolate_pos_embed(pos_embed_checkpoint, visual_encoder):
    """Resize a checkpoint's position embeddings to the encoder's patch grid (bicubic).

    The extra (CLS) rows are kept; returns the tensor unchanged when the grids already match.
    """
    embedding_size = pos_embed_checkpoint.shape[-1]
    num_patches = visual_encoder.patch_embed.num_patches
    num_extra_tokens = visual_encoder.pos_embed.shape[-2] - num_patches
    orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
    new_size = int(num_patches ** 0.5)
    if orig_size == new_size:
        return pos_embed_checkpoint
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
    grid = pos_embed_checkpoint[:, num_extra_tokens:]
    grid = grid.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_size, new_size), mode='bicubic',
                         align_corners=False).to(pos_embed_checkpoint.dtype)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2)
    logger.info('reshaped position embedding from %dx%d to %dx%d', orig_size, orig_size,
                new_size, new_size)
    return torch.cat((extra_tokens, grid), dim=1)
