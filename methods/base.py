"""The shared face of every adapted model: a timm VisionTransformer whose class is swapped for a
subclass that records a :class:`~methods.trace.Trace` on each forward (ToMe's patching style, see
docs/design.md#style), so the state dict keeps timm's key layout."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .macs import ViTShape, vit_shape
from .trace import Trace

_SUBCLASSES: dict[tuple[type, type], type] = {}


class TracedViT(nn.Module):
    """Mixin placed in front of the backbone's own class. Subclasses implement ``forward``."""

    bench_method: str = ""

    def bench_setup(self, mode: str, knobs: dict[str, Any]) -> None:
        self.bench_mode = mode
        self.bench_knobs = dict(knobs)
        self.__dict__["_bench_trace"] = None

    @property
    def bench_shape(self) -> ViTShape:
        return vit_shape(self)

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, prefix tokens and position embedding, as timm's forward_features."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def tokens_entered(self, trace: Trace) -> torch.Tensor | None:
        """(B, depth, N) bool on the CPU: token n (prefix tokens first, original order) entered block
        l in the forward ``trace`` records; summing over N gives ``trace.tokens`` (less any token
        that stands for no single original one, EViT's fused token). None for a method
        whose trace has no per-token record. The dense model: every token, every block."""
        b, depth = trace.tokens.shape
        return torch.ones(b, depth, self.bench_shape.num_tokens, dtype=torch.bool)

    def record(self, tokens: torch.Tensor, gmacs: torch.Tensor | None = None, **extras: Any) -> Trace:
        if gmacs is None:
            gmacs = self.bench_shape.gmacs_from_tokens(tokens)
        trace = Trace(tokens=tokens.detach().to(torch.int64), gmacs=gmacs.detach().to(torch.float64), extras=extras)
        self.__dict__["_bench_trace"] = trace
        return trace


def adapt(vit: nn.Module, mixin: type, mode: str, knobs: dict[str, Any]) -> nn.Module:
    """Swap ``vit``'s class for ``mixin`` + its own class, in place, and set the method up."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
    base = type(vit)
    if isinstance(vit, TracedViT):
        raise TypeError(f"model is already adapted by method {vit.bench_method!r}; build from the plain backbone")
    key = (mixin, base)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{mixin.__name__}_{base.__name__}", (mixin, base), {})
    vit.__class__ = _SUBCLASSES[key]
    vit.bench_setup(mode, knobs)
    return vit


def trace(model: nn.Module) -> Trace:
    """The per-sample record of ``model``'s last forward pass."""
    t = model.__dict__.get("_bench_trace") if isinstance(model, nn.Module) else None
    if t is None:
        if not isinstance(model, TracedViT):
            raise TypeError("model was not built by methods.build; no trace is recorded")
        raise RuntimeError("no forward pass recorded yet: call the model first")
    return t
