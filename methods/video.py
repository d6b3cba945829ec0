"""Video ViTs: joint space-time attention over tubelet tokens, as a timm ``VisionTransformer``.

The layout is ViViT's joint model and VideoMAE's ViT: a ``Conv3d`` tubelet embedding (``t x p x p``
voxels per token, tokens in time-major order ``T' x H' x W'``), then the stock timm blocks over all
spatio-temporal tokens at once. Because the model *is* a timm VisionTransformer (only the patch
embedding differs), ``ats``, ``avit`` and ``adavit`` adapt it unchanged and count its compute with
the same closed forms (docs/design.md#contracts; docs/counting.md#closed-forms): the
tokens are just more of them.

Input clips are ``(B, C, T, H, W)`` (VideoMAE / PyTorchVideo order).

Checkpoints: :meth:`VideoVisionTransformer.checkpoint_filter` maps VideoMAE's fine-tuned ViT state
dicts (``attn.q_bias`` / ``attn.v_bias`` beside a bias-free ``attn.qkv``, ``gamma_1/2`` layer
scale, fixed sinusoidal position table not stored) onto timm's keys; ``methods.backbones.
load_checkpoint`` applies it before its strict check.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import to_2tuple
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class ClipInput:
    """What a video patch embedding promises the harness: it takes ``(B, C, T, H, W)`` clips of
    one fixed ``input_shape`` (``num_frames`` frames of ``img_size``), and says so when it does not."""

    num_frames: int
    img_size: tuple[int, int]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(T, H, W) of the clips this embedding takes."""
        return (self.num_frames, *self.img_size)

    def check_clips(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or tuple(x.shape[2:]) != self.input_shape:
            t, h, w = self.input_shape
            raise ValueError(f"expected clips of shape (B, C, {t}, {h}, {w}), got {tuple(x.shape)}")


class TubeletEmbed(ClipInput, nn.Module):
    """``(B, C, T, H, W)`` -> ``(B, T/t * H/p * W/p, D)`` tokens with one ``Conv3d`` (``proj``).

    With ``stem=True`` ``proj`` is a small convolutional stem instead (two per-frame 3x3 stride-2
    conv-BN-ReLU, then a ``t x 3 x 3`` conv of stride ``(t, 2, 2)``): still one token per tubelet of
    ``t x 8 x 8`` voxels. The image digits ViT needed such a stem to learn in a few epochs
    (docs/design.md#the-embedded-default); the moving-digits video model uses the same idea.
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        num_frames: int = 16,
        tubelet_size: int = 2,
        stem: bool = False,
        norm_layer=None,
        dynamic_img_pad: bool = False,
        device=None,
        dtype=None,
        **_unused,
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.num_frames, self.tubelet_size = int(num_frames), int(tubelet_size)
        if self.num_frames % self.tubelet_size or any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(
                f"clip {self.num_frames}x{self.img_size[0]}x{self.img_size[1]} is not a whole number of "
                f"{self.tubelet_size}x{self.patch_size[0]}x{self.patch_size[1]} tubelets"
            )
        self.grid_size = (self.num_frames // self.tubelet_size, *(s // p for s, p in zip(self.img_size, self.patch_size)))
        self.num_patches = math.prod(self.grid_size)
        self.flatten = True
        kernel = (self.tubelet_size, *self.patch_size)
        dd = {"device": device, "dtype": dtype}
        if not stem:
            self.proj = nn.Conv3d(in_chans, embed_dim, kernel, stride=kernel, bias=bias, **dd)
        else:
            if self.patch_size != (8, 8):
                raise ValueError("the tubelet stem makes 8x8 patches (three stride-2 convolutions)")
            c1, c2 = max(embed_dim // 4, 8), max(embed_dim // 2, 16)
            t = self.tubelet_size
            self.proj = nn.Sequential(
                nn.Conv3d(in_chans, c1, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False, **dd),
                nn.BatchNorm3d(c1, **dd),
                nn.ReLU(inplace=True),
                nn.Conv3d(c1, c2, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False, **dd),
                nn.BatchNorm3d(c2, **dd),
                nn.ReLU(inplace=True),
                nn.Conv3d(c2, embed_dim, (t, 3, 3), stride=(t, 2, 2), padding=(0, 1, 1), bias=bias, **dd),
            )
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_clips(x)
        x = self.proj(x).flatten(2).transpose(1, 2)  # time-major, as VideoMAE
        return self.norm(x)


class VideoVisionTransformer(VisionTransformer):
    """timm's VisionTransformer with a tubelet embedding: joint space-time attention."""

    def __init__(self, num_frames: int = 16, tubelet_size: int = 2, stem: bool = False, **kwargs):
        kwargs["embed_layer"] = partial(TubeletEmbed, num_frames=num_frames, tubelet_size=tubelet_size, stem=stem)
        kwargs.pop("dynamic_img_size", None)  # a fixed clip shape; no resampling of the table
        super().__init__(**kwargs)
        self.num_frames = int(num_frames)
        self.tubelet_size = int(tubelet_size)

    def checkpoint_filter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert_videomae(state, self)


def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed position table (its ``get_sinusoid_encoding_table``, the Transformer paper's
    formula): angle = pos / 10000^(2*(j//2)/dim), sine on even channels, cosine on odd ones."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(torch.float32)[None]


def convert_videomae(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Map a VideoMAE ViT state dict (official fine-tuned layout) onto timm keys; a state dict
    already in timm's layout passes through. Returns a new dict."""
    videomae = any(k.endswith("attn.q_bias") for k in state) or any(".gamma_1" in k for k in state)
    if not videomae and "pos_embed" in state:
        return dict(state)
    src = {k.removeprefix("encoder."): v for k, v in state.items()}  # pre-training checkpoints nest the encoder
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        if key.endswith("attn.q_bias"):
            v_bias = src[key.removesuffix("q_bias") + "v_bias"]
            out[key.removesuffix("q_bias") + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])  # k has no bias
        elif key.endswith("attn.v_bias"):
            continue
        elif ".gamma_1" in key or ".gamma_2" in key:
            out[key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")] = value
        else:
            out[key] = value
    if "pos_embed" not in out and getattr(model, "pos_embed", None) is not None:
        n, dim = model.pos_embed.shape[1], model.pos_embed.shape[2]
        out["pos_embed"] = sinusoid_table(n, dim)
    return out


def _create(pretrained: bool, name: str, **kwargs) -> VideoVisionTransformer:
    if pretrained:
        raise ValueError(f"{name} has no hub weights here: pass a local checkpoint file (--checkpoint PATH)")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm factory extras
        kwargs.pop(key, None)
    return VideoVisionTransformer(**kwargs)


@register_model
def digits_video_vit(pretrained: bool = False, **kwargs) -> VideoVisionTransformer:
    """The embedded video default: 8 frames of 32x32, 2x8x8 tubelets (4x4x4 + CLS = 65 tokens)."""
    args = dict(img_size=32, patch_size=8, in_chans=1, num_classes=10, num_frames=8, tubelet_size=2, stem=True,
                embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return _create(pretrained, "digits_video_vit", **{**args, **kwargs})


def _videomae(name: str, pretrained: bool, size: dict, **kwargs) -> VideoVisionTransformer:
    """VideoMAE's fine-tuning ViT: no CLS token, mean pooling + fc_norm, 16x224x224, 2x16x16 tubelets."""
    args = dict(img_size=224, patch_size=16, in_chans=3, num_classes=400, num_frames=16, tubelet_size=2, mlp_ratio=4.0,
                qkv_bias=True, class_token=False, global_pool="avg", fc_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return _create(pretrained, name, **{**args, **size, **kwargs})


@register_model
def videomae_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> VideoVisionTransformer:
    return _videomae("videomae_vit_small_patch16_224", pretrained, dict(embed_dim=384, depth=12, num_heads=6), **kwargs)


@register_model
def videomae_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> VideoVisionTransformer:
    return _videomae("videomae_vit_base_patch16_224", pretrained, dict(embed_dim=768, depth=12, num_heads=12), **kwargs)
