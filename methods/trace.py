"""Per-sample record of what the last forward pass of an adaptive model really did.

docs/design.md#contracts: every forward leaves a trace, and multiply-accumulates
per sample are derived from it by closed forms (``methods.macs``), never from tensor shapes of a
padded or masked batch (docs/counting.md#per-sample-counts-from-traces).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Trace:
    """What one forward did, per sample.

    tokens: (B, depth) int64, tokens entering each block, prefix (CLS) tokens included.
    gmacs:  (B,) float64, multiply-accumulates of each sample in G (fvcore convention).
    extras: method-specific per-sample records (halting depths, kept heads, executed
            sub-layers, padding waste, ...), reachable as attributes: ``trace.depths``.
    """

    tokens: torch.Tensor
    gmacs: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        extras = self.__dict__.get("extras", {})
        if name in extras:
            return extras[name]
        raise AttributeError(f"trace has no field {name!r}; fields: tokens, gmacs, {', '.join(extras)}")

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    def detach_cpu(self) -> "Trace":
        def move(v: Any) -> Any:
            return v.detach().cpu() if isinstance(v, torch.Tensor) else v

        return Trace(move(self.tokens), move(self.gmacs), {k: move(v) for k, v in self.extras.items()})
