"""The dense reference (`deit`): any timm VisionTransformer, run unchanged (docs/design.md#method-ids)."""
from __future__ import annotations

import torch

from .base import TracedViT, adapt
from .registry import MethodSpec, register


DENSE = "deit"  # id of the dense reference, the model every ratio and speedup is taken against


class DenseViT(TracedViT):
    bench_method = DENSE

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = super().forward(x)
        shape = self.bench_shape
        tokens = torch.full((x.shape[0], shape.depth), shape.num_tokens, dtype=torch.int64)
        self.record(tokens)
        return logits


def _build(vit, mode: str):
    return adapt(vit, DenseViT, mode, {})


SPEC = register(
    MethodSpec(
        id=DENSE,
        paper="Touvron et al. 2021, Training data-efficient image transformers (DeiT)",
        arxiv="2012.12877",
        summary="dense reference: every token through every block",
        build=_build,
        modes=("compact",),
    )
)
