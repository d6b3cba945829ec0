"""Backbones: the embedded-default digits ViT (registered with timm) and strict checkpoint loading.

The digits ViT is a stock timm ``VisionTransformer`` whose patch embedding is a small convolutional
stem (three 3x3 stride-2 convolutions, ViTc-style) that still emits one token per 8x8 patch:
docs/design.md#the-embedded-default reports that a plain linear patch embedding barely learns this
task in a few epochs while the stem reaches about 96%.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class ConvStemPatchEmbed(PatchEmbed):
    """timm PatchEmbed with ``proj`` replaced by conv-BN-ReLU x2 + conv, total stride = patch size."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        in_chans = self.proj.in_channels
        embed_dim = self.proj.out_channels
        stride = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or stride != 8:
            raise ValueError("ConvStemPatchEmbed supports square 8x8 patches (three stride-2 convolutions)")
        c1, c2 = max(embed_dim // 4, 8), max(embed_dim // 2, 16)
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, c1, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.Conv2d(c2, embed_dim, 3, stride=2, padding=1),
        )
        # Channels-last weights make oneDNN run the stem in NHWC end to end. Measured on 2 cores,
        # batch 32, fp32: 2.2 ms instead of 2.9 ms, and instead of 6 ms in the runs where glibc
        # hands the NCHW path's large scratch buffers back to the system after each call. Same
        # values; a checkpoint saves and loads as usual (state dicts are made contiguous on save).
        self.proj.to(memory_format=torch.channels_last)


def create_digits_vit(
    img_size: int = 64,
    in_chans: int = 1,
    num_classes: int = 10,
    embed_dim: int = 96,
    depth: int = 6,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
    vit_class=VisionTransformer,
    **kwargs,
) -> VisionTransformer:
    """The dense backbone of the embedded default: 8x8 patches on a 64x64 canvas -> 64 + 1 tokens.
    ``vit_class`` builds it (methods/variants.py passes its study variants' class)."""
    return vit_class(
        img_size=img_size,
        patch_size=8,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        embed_layer=ConvStemPatchEmbed,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        **kwargs,
    )


# Set by methods/variants.py when it loads: the variants build on this module, not the other way.
study_builder: list = [None]


@register_model
def digits_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    if pretrained:
        raise ValueError("digits_vit has no hub weights: pass a checkpoint file (bench trains and caches one)")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm factory extras
        kwargs.pop(key, None)
    options = {k: kwargs.pop(k) for k in ("pos", "norm", "attn", "block") if k in kwargs}
    if options:  # bench.toml [model] pos / norm / attn / block: a study variant (docs/avit_study.md)
        return study_builder[0](options, **kwargs)
    return create_digits_vit(**kwargs)
