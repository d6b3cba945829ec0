"""TimeSformer: divided space-time attention with a CLS token, as a timm ``VisionTransformer``.

Each block attends in two steps (docs/timesformer.md#the-block): temporal attention among the
``T`` tokens of one spatial position (its own ``temporal_norm1`` / ``temporal_attn``, then the
``temporal_fc`` projection, a residual), then spatial attention among the ``N`` patches of one frame
plus a copy of the CLS token, whose ``T`` per-frame results are averaged back into the one CLS
token; then the MLP over all ``1 + T*N`` tokens. Patches are embedded frame by frame (a 2-D
``Conv2d``), with a learned spatial table (``pos_embed``, CLS + ``N``) and a learned per-frame
table (``time_embed``); the prediction reads the CLS token after the final norm.

Tokens are kept in time-major order (token ``1 + t*N + n`` is patch ``n`` of frame ``t``), as our
other video ViTs (methods/video.py). The official code keeps them position-major; the order is
internal to a forward and the outputs are the same (tests/test_timesformer.py checks it against a
position-major re-statement of the official block).

Parameter names are the official ones (facebookresearch/TimeSformer ``timesformer/models/vit.py``),
so a released ``.pyth`` checkpoint loads strictly once its ``model_state`` wrapper (methods/convert.py)
and the ``model.`` prefix of its wrapper module (:func:`convert_timesformer`) are removed.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.layers import Attention, DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .video import ClipInput

# The official test pipeline normalises with its config defaults (DATA.MEAN / DATA.STD), not
# ImageNet's statistics (docs/timesformer.md#evaluation).
KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)
WRAPPER_PREFIX = "model."  # the official model class holds the ViT as ``self.model``


class FramePatchEmbed(ClipInput, PatchEmbed):
    """timm's PatchEmbed applied to each frame: ``(B, C, T, H, W)`` -> ``(B, T*N, D)``, time-major.

    ``num_patches`` counts every frame's patches (``T*N``), which is what the harness's token
    counts and closed forms read; ``patches_per_frame`` is ``N``.
    """

    def __init__(self, *args, num_frames: int = 8, **kwargs):
        kwargs.pop("dynamic_img_pad", None)  # fixed clip shape: the tables are not resampled
        super().__init__(*args, **kwargs)
        if num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames}")
        self.num_frames = int(num_frames)
        self.frame_grid = self.grid_size
        self.patches_per_frame = self.num_patches
        self.grid_size = (self.num_frames, *self.frame_grid)
        self.num_patches = self.num_frames * self.patches_per_frame
        self.tubelet_size = 1  # one token per frame patch: the tubelet view of methods/video.py

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_clips(x)
        b = x.shape[0]
        frames = x.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W)
        tokens = super().forward(frames)  # (B*T, N, D)
        return tokens.reshape(b, -1, tokens.shape[-1])


class DividedSpaceTimeBlock(nn.Module):
    """Temporal attention, spatial attention (CLS copied per frame, averaged back), MLP.

    Takes and returns ``(B, 1 + T*N, D)`` tokens in time-major order.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_frames: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer=nn.GELU,
        norm_layer=nn.LayerNorm,
        init_values: float | None = None,
        **_timm_extras,  # qk_norm, depth, mlp_layer, ... that timm's VisionTransformer passes every block
    ):
        super().__init__()
        if init_values:
            raise ValueError("TimeSformer blocks have no layer scale (init_values)")
        self.num_frames = int(num_frames)
        attention = partial(Attention, dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.temporal_norm1 = norm_layer(dim)
        self.temporal_attn = attention()
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = norm_layer(dim)
        self.attn = attention()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def temporal(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches after the temporal step: each spatial position attends over its T frames."""
        b, tn, d = patches.shape
        t = self.num_frames
        n = tn // t
        per_position = patches.view(b, t, n, d).transpose(1, 2).reshape(b * n, t, d)
        out = self.drop_path(self.temporal_attn(self.temporal_norm1(per_position)))
        out = out.view(b, n, t, d).transpose(1, 2).reshape(b, tn, d)
        return patches + self.temporal_fc(out)

    def spatial(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatial residuals: (CLS's, averaged over frames; the patches') for one frame's attention."""
        b, tn, d = patches.shape
        t = self.num_frames
        per_frame = torch.cat([cls.expand(b, t, d).reshape(b * t, 1, d), patches.reshape(b * t, tn // t, d)], dim=1)
        out = self.drop_path(self.attn(self.norm1(per_frame)))
        cls_out = out[:, 0].view(b, t, d).mean(dim=1, keepdim=True)
        return cls_out, out[:, 1:].reshape(b, tn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, patches = x[:, :1], x[:, 1:]
        if patches.shape[1] % self.num_frames:
            raise ValueError(f"{patches.shape[1]} patch tokens are not {self.num_frames} whole frames")
        patches = self.temporal(patches)
        cls_res, patch_res = self.spatial(cls, patches)
        x = torch.cat([cls + cls_res, patches + patch_res], dim=1)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TimeSformer(VisionTransformer):
    """timm's VisionTransformer with per-frame patches, space + time tables and divided blocks."""

    attention_layout = "divided"  # methods/macs.py picks the divided closed form by this
    supported_methods = ("deit",)  # methods/registry.py refuses the others (docs/timesformer.md#methods)

    def __init__(self, num_frames: int = 8, **kwargs):
        kwargs["embed_layer"] = partial(FramePatchEmbed, num_frames=num_frames)
        kwargs["block_fn"] = partial(DividedSpaceTimeBlock, num_frames=num_frames)
        fixed = [k for k in ("class_token", "global_pool", "no_embed_class", "reg_tokens", "fc_norm") if k in kwargs]
        if fixed:
            raise ValueError(f"TimeSformer fixes {', '.join(fixed)} (one CLS token, read after the final norm)")
        kwargs.pop("dynamic_img_size", None)  # a fixed clip shape: the tables are not resampled
        super().__init__(**kwargs)
        self.num_frames = int(num_frames)
        dim, per_frame = self.embed_dim, self.patch_embed.patches_per_frame
        # timm sized pos_embed for all T*N tokens; TimeSformer has one spatial table that every frame shares, and a time table
        self.pos_embed = nn.Parameter(torch.zeros(1, per_frame + 1, dim))
        self.time_embed = nn.Parameter(torch.zeros(1, self.num_frames, dim))
        trunc_normal_(self.pos_embed, std=0.02)
        for blk in list(self.blocks)[1:]:  # the official init: temporal steps after the first start as identities
            nn.init.zeros_(blk.temporal_fc.weight)
            nn.init.zeros_(blk.temporal_fc.bias)
        self.pretrained_cfg = {"mean": KINETICS_MEAN, "std": KINETICS_STD, "num_frames": self.num_frames,
                               "input_size": (3, self.num_frames, *self.patch_embed.img_size)}

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial table on every frame's patches, time table on every patch of a frame, then CLS."""
        b, _, d = x.shape
        patches = x.view(b, self.num_frames, -1, d) + self.pos_embed[:, None, 1:] + self.time_embed[:, :, None]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        return self.pos_drop(torch.cat([cls, patches.flatten(1, 2)], dim=1))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "time_embed"}

    def unsupported_reason(self, method_id: str, mode: str | None = None) -> str | None:
        """Why ``method_id`` (in any ``mode``) cannot adapt this model yet, or None (methods/registry.py asks)."""
        if method_id in self.supported_methods:
            return None
        return (f"{method_id} is not adapted to TimeSformer's divided space-time attention yet (each block attends "
                f"across frames, then within a frame: docs/timesformer.md#methods); methods that run on it: "
                f"{', '.join(self.supported_methods)}")

    def checkpoint_filter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert_timesformer(state)


def convert_timesformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official TimeSformer keys -> ours: drop the ``model.`` prefix of the official wrapper module.

    Every other name is already the official one, so what does not fit (a K600 head, another frame
    count or resolution, a joint or space-only model) is listed by the strict load that follows.
    """
    if not any(k.startswith(WRAPPER_PREFIX) for k in state):
        return dict(state)
    return {k.removeprefix(WRAPPER_PREFIX): v for k, v in state.items()}


def _create(pretrained: bool, name: str, **kwargs) -> TimeSformer:
    if pretrained:
        raise ValueError(f"{name} has no hub weights here: pass a local checkpoint file (--checkpoint PATH, e.g. the official .pyth)")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm factory extras
        kwargs.pop(key, None)
    return TimeSformer(**kwargs)


def _base(name: str, pretrained: bool, clip: dict, **kwargs) -> TimeSformer:
    """The official ViT-B/16 TimeSformer: width 768, 12 blocks of 12 heads, LayerNorm eps 1e-6, K400 head."""
    args = dict(patch_size=16, in_chans=3, num_classes=400, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return _create(pretrained, name, **{**args, **clip, **kwargs})


@register_model
def timesformer_base_patch16_224(pretrained: bool = False, **kwargs) -> TimeSformer:
    """TimeSformer (the official 8x32_224 model): 8 frames of 224x224, 8 x 196 + 1 tokens."""
    return _base("timesformer_base_patch16_224", pretrained, dict(img_size=224, num_frames=8), **kwargs)


@register_model
def timesformer_hr_base_patch16_448(pretrained: bool = False, **kwargs) -> TimeSformer:
    """TimeSformer-HR (the official 16x16_448 model): 16 frames of 448x448."""
    return _base("timesformer_hr_base_patch16_448", pretrained, dict(img_size=448, num_frames=16), **kwargs)


@register_model
def timesformer_l_base_patch16_224(pretrained: bool = False, **kwargs) -> TimeSformer:
    """TimeSformer-L (the official 96x4_224 model): 96 frames of 224x224."""
    return _base("timesformer_l_base_patch16_224", pretrained, dict(img_size=224, num_frames=96), **kwargs)
