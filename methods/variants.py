"""The A-ViT design study's backbone options for the embedded default (docs/avit_study.md).

The digits ViT (methods/backbones.py) with one design choice changed at a time, each built from
timm's own layers so the execution layer (methods/execution.py) keeps calling the usual
sub-modules (``norm1``, ``attn.qkv``, ``attn.q_norm`` / ``attn.k_norm``, ``attn.proj``, ``mlp``):

* ``pos``: ``learned`` (timm's table), ``sincos`` (timm's fixed 2-D sin-cos table, CLS row zero),
  ``rope`` (timm's 2-D rotary embedding on the patch tokens' queries and keys, in the attention's
  ``q_norm`` / ``k_norm`` slots, as EVA applies it; no absolute table).
* ``norm``: ``layer`` (LayerNorm) or ``instance`` (instance norm over each token's channels,
  without affine parameters: a LayerNorm without its scale and shift).
* ``attn``: ``dot`` or ``cosine`` (Swin V2: cosine similarity of q and k times a learned, clamped
  per-head logit scale, again in the ``q_norm`` / ``k_norm`` slots).
* ``block``: ``attention`` or ``mixer`` (MLP-Mixer's token-mixing MLP, timm's ``Mlp`` over the
  token axis, in the block's attention slot).

Which methods run on which option, and why the others are refused: :meth:`StudyViT.unsupported_reason`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp, RotaryEmbeddingCat, apply_rot_embed_cat, build_sincos2d_pos_embed
from timm.models import register_model
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .backbones import create_digits_vit, study_builder
from .macs import ViTShape, linear

OPTIONS = {"pos": ("learned", "sincos", "rope"), "norm": ("layer", "instance"), "attn": ("dot", "cosine"), "block": ("attention", "mixer")}
DEFAULTS = {"pos": "learned", "norm": "layer", "attn": "dot", "block": "attention"}
# One option changed at a time, as in the study (docs/avit_study.md#variants).
NAMED = {
    "digits_vit_sincos": {"pos": "sincos"},
    "digits_vit_rope": {"pos": "rope"},
    "digits_vit_instnorm": {"norm": "instance"},
    "digits_vit_cosine": {"attn": "cosine"},
    "digits_vit_mixer": {"block": "mixer"},
}
LOGIT_SCALE_INIT = math.log(10.0)  # Swin V2's initial and maximum logit scale (docs/avit_study.md#cosine-attention)
LOGIT_SCALE_MAX = math.log(100.0)
TOKEN_MLP_RATIO = 0.5  # MLP-Mixer's token-mixing width, as a share of the channel width (timm's mixer models)
TOKEN_MOVING = ("ats", "avit", "adavit")  # methods whose compact mode hands attention packed rows


def check_options(options: dict[str, str]) -> dict[str, str]:
    """The four options, defaults filled in; ValueError names a bad one or a contradictory pair."""
    chosen = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    for key, value in chosen.items():
        if key not in OPTIONS:
            raise ValueError(f"unknown digits ViT option {key!r}; options: {', '.join(OPTIONS)}")
        if value not in OPTIONS[key]:
            raise ValueError(f"{key}={value!r} is not a digits ViT option; use one of {', '.join(OPTIONS[key])}")
    if chosen["block"] == "mixer" and (chosen["pos"] == "rope" or chosen["attn"] == "cosine"):
        raise ValueError("block=mixer has no queries or keys: pos=rope and attn=cosine need attention blocks")
    return chosen


# --------------------------------------------------------------------------------------------
# Layers


class TokenInstanceNorm(nn.InstanceNorm1d):
    """Instance norm over each token's channels (no affine): rows of any shape (..., C)."""

    def __init__(self, dim: int, eps: float = 1e-6, **_timm_extras):
        super().__init__(1, eps=eps, affine=False)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, 1, x.shape[-1])).view(x.shape)


class CosineQuery(nn.Module):
    """``q_norm`` of cosine attention: unit q times exp(logit scale) per head, times sqrt(d) to undo
    the 1/sqrt(d) every attention path applies, so that q.k/sqrt(d) = cos(q, k) * exp(scale)."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), LOGIT_SCALE_INIT))
        self.rescale = head_dim**0.5

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.normalize(q, dim=-1) * (self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp() * self.rescale).to(q.dtype)


class UnitKey(nn.Module):
    """``k_norm`` of cosine attention: unit keys."""

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        return F.normalize(k, dim=-1)


class RopeRotation(nn.Module):
    """``q_norm`` / ``k_norm`` slot: rotates the patch tokens of (B, H, N, d) by their grid position
    (timm's RotaryEmbeddingCat); prefix tokens stay as they are. Needs every token in grid order."""

    def __init__(self, head_dim: int, grid: tuple[int, int], num_prefix: int):
        super().__init__()
        rope = RotaryEmbeddingCat(head_dim, in_pixels=False, feat_shape=list(grid))
        self.register_buffer("embed", rope.get_embed(), persistent=False)  # a function of the shape: not a weight
        self.num_prefix = num_prefix

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        p, n = self.num_prefix, self.embed.shape[0] + self.num_prefix
        if t.shape[-2] != n:
            raise ValueError(f"rotary embedding needs all {n} tokens in grid order, got {t.shape[-2]} rows")
        return torch.cat([t[..., :p, :], apply_rot_embed_cat(t[..., p:, :], self.embed.to(t.dtype))], dim=-2)


class CosineAttention(Attention):
    """timm Attention with cosine similarity and a learned logit scale (Swin V2)."""

    def __init__(self, dim: int, num_heads: int = 8, **kwargs):
        kwargs.pop("qk_norm", None)
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.q_norm, self.k_norm = CosineQuery(self.num_heads, self.head_dim), UnitKey()


class RopeAttention(Attention):
    """timm Attention with 2-D rotary position embedding on the patch tokens' q and k; ``grid``
    is a class attribute because timm's Block takes an attention class (:func:`rope_attention`)."""

    grid: tuple[int, int] = (8, 8)
    num_prefix = 1

    def __init__(self, dim: int, num_heads: int = 8, **kwargs):
        kwargs.pop("qk_norm", None)
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.q_norm = RopeRotation(self.head_dim, self.grid, self.num_prefix)
        self.k_norm = RopeRotation(self.head_dim, self.grid, self.num_prefix)


def rope_attention(grid: int) -> type[RopeAttention]:
    """RopeAttention for a ``grid`` x ``grid`` patch grid."""
    return RopeAttention if grid == 8 else type(f"RopeAttention{grid}", (RopeAttention,), {"grid": (grid, grid)})


class TokenMixer(nn.Module):
    """MLP-Mixer's token-mixing MLP in a Block's attention slot: (B, N, C) -> (B, N, C) for the
    fixed N it was built for (one weight per token position)."""

    def __init__(self, num_tokens: int, hidden: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.num_tokens = num_tokens
        self.mlp_tokens = Mlp(num_tokens, hidden, act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("a token-mixing MLP takes no attention mask")
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"this token-mixing MLP mixes exactly {self.num_tokens} tokens, got {x.shape[1]}")
        return self.mlp_tokens(x.transpose(1, 2)).transpose(1, 2)

    def mix_rows(self, y: torch.Tensor, lay) -> torch.Tensor:
        """The execution layer's masked path (methods/execution.py): ``y`` holds whole samples'
        rows in order, (B * N, C), inactive rows zeroed, so they feed zeros into the mixing."""
        if lay.flat is not None or lay.length != self.num_tokens or y.shape[0] != lay.batch * lay.length:
            raise ValueError("a Mixer block mixes a fixed token count: it runs only on whole samples (reference masking)")
        return self(y.view(lay.batch, lay.length, -1)).reshape(y.shape)


class TokenMixingBlock(Block):
    """timm's pre-norm Block with MLP-Mixer's token-mixing MLP in place of attention."""

    def __init__(self, dim: int, num_heads: int, num_tokens: int = 65, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        act, drop = kwargs.get("act_layer", nn.GELU), kwargs.get("proj_drop", 0.0)
        self.attn = TokenMixer(num_tokens, int(TOKEN_MLP_RATIO * dim), act_layer=act, drop=drop)


@dataclass(frozen=True)
class MixerShape(ViTShape):
    """Closed form of a token-mixing block on n of its N tokens (docs/avit_study.md#gmacs): the
    token MLP's columns for the n inputs and rows for the n outputs, C times each, 2*n*C*T; the
    norms and the channel MLP on the n tokens. n = N is the dense block fvcore counts."""

    token_hidden: int = 0

    def block(self, n_in, n_out=None):
        if n_out is not None:
            raise NotImplementedError("no closed form for token sampling inside a Mixer block")
        c, h = self.embed_dim, self.mlp_hidden
        return 2 * self.norm(n_in) + 2 * n_in * c * self.token_hidden + linear(n_in, c, h) + linear(n_in, h, c)


# --------------------------------------------------------------------------------------------
# The model


class StudyViT(VisionTransformer):
    """The digits ViT with study options (``self.options``); says which methods run on it."""

    def __init__(self, options: dict[str, str], **kwargs):
        self.options = check_options(options)
        grid = kwargs["img_size"] // kwargs["patch_size"]
        if self.options["norm"] == "instance":
            kwargs["norm_layer"] = TokenInstanceNorm
        if self.options["attn"] == "cosine":
            kwargs["attn_layer"] = CosineAttention
        if self.options["pos"] == "rope":
            kwargs.update(pos_embed="none", attn_layer=rope_attention(grid))
        if self.options["block"] == "mixer":
            kwargs["block_fn"] = partial(TokenMixingBlock, num_tokens=grid * grid + 1)
        super().__init__(**kwargs)
        if self.options["pos"] == "sincos":
            table = build_sincos2d_pos_embed([grid, grid], self.embed_dim)
            table = torch.cat([table.new_zeros(1, self.embed_dim), table])  # the CLS token gets no position
            self.pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)

    def bench_make_shape(self, fields: dict) -> ViTShape:
        """methods/macs.py: the closed form of these blocks."""
        if self.options["block"] == "mixer":
            return MixerShape(token_hidden=self.blocks[0].attn.mlp_tokens.fc1.out_features, **fields)
        return ViTShape(**fields)

    def unsupported_reason(self, method_id: str, mode: str | None = None) -> str | None:
        """Why ``method_id`` (in ``mode``) cannot run on this variant, or None (methods/registry.py asks)."""
        if self.options["block"] == "mixer":
            return mixer_refusal(method_id, mode)
        if self.options["pos"] == "rope":
            return rope_refusal(method_id, mode)
        return None


def rope_refusal(method_id: str, mode: str | None) -> str | None:
    """docs/avit_study.md#which-methods-run-where, for pos=rope: rotary embeddings need each token's
    grid position inside the attention, which only whole (masked) samples keep."""
    if method_id == "ats":
        return ("ats gathers its sampled tokens out of grid order in both modes, and the attention then no longer knows "
                "their grid positions, which rotary embeddings need")
    if method_id in TOKEN_MOVING and mode == "compact":
        return (f"{method_id} compact hands the attention packed rows without their grid positions, which rotary "
                "embeddings need; use mode 'reference' (halted or dropped tokens masked in place)")
    return None


def mixer_refusal(method_id: str, mode: str | None) -> str | None:
    """docs/avit_study.md#which-methods-run-where, for block=mixer."""
    if method_id in ("ats", "adavit"):
        what = "samples tokens by the CLS token's attention" if method_id == "ats" else "gates attention heads"
        return f"{method_id} {what}; a Mixer block has no attention"
    if method_id == "avit" and mode == "compact":
        return ("a Mixer block mixes a fixed token count (one weight per token position): halted tokens cannot "
                "leave it, so avit compact is impossible; use mode 'reference' (halted tokens masked to zero)")
    return None


def create_study_vit(options: dict[str, str], **kwargs) -> StudyViT:
    """The digits ViT (methods/backbones.py create_digits_vit's settings) with study ``options``."""
    return create_digits_vit(vit_class=partial(StudyViT, options), **kwargs)


study_builder[0] = create_study_vit


def _register(name: str, preset: dict[str, str]) -> None:
    def factory(pretrained: bool = False, **kwargs) -> StudyViT:
        if pretrained:
            raise ValueError(f"{name} has no hub weights: bench trains and caches one")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm factory extras
            kwargs.pop(key, None)
        options = {**preset, **{k: kwargs.pop(k) for k in OPTIONS if k in kwargs}}
        return create_study_vit(options, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"The digits ViT with {', '.join(f'{k}={v}' for k, v in preset.items())} (docs/avit_study.md)."
    register_model(factory)


for _name, _preset in NAMED.items():
    _register(_name, _preset)
