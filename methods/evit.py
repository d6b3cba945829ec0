"""EViT (Liang et al., ICLR 2022, arXiv 2202.07800) as method ``evit``: attentive tokens kept,
inattentive ones fused.

In each reduction block, between attention and MLP, the patch tokens are ranked by the attention
the CLS token pays them (mean over heads); the top ``ceil(keep * (n - 1))`` are kept (most
attended first) and the others are fused into one extra token, their sum weighted by that
attention (the paper's Eq. 4; ``fuse = false`` drops them, the Top-K baseline). The released
configuration reduces in the 4th, 7th and 10th of 12 blocks. Every sample keeps the same count,
so a batch never pads. Training-free here (the paper also fine-tunes). docs/methods/evit.md.

Both modes remove tokens, as the released code does. ``reference`` computes the full attention
matrix and reads its CLS row, as the released code does; ``compact`` runs the execution layer's
fused attention and computes the CLS row alone for the ranking (methods/execution.py).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .attention import Layout, sdpa
from .base import TracedViT, adapt
from .execution import check_cls_pooling, check_timm_blocks, forward_reducing
from .knobs import int_list, knob_error
from .registry import Knob, MatchedCompute, MethodSpec, register

RELEASED_BLOCKS = (3, 6, 9)  # 0-based reduction blocks of the released 12-block configuration


def reduction_blocks(depth: int, blocks: Any = None) -> list[int]:
    """The released blocks 3, 6, 9 of 12 scaled to ``depth`` (block floor(j * depth / 4), j = 1..3),
    or the ``blocks`` knob ('3/6/9', a list, '-1' for the last block)."""
    if blocks is None:
        return sorted({j * depth // 4 for j in (1, 2, 3)})
    allowed = f"block indices in 0..{depth - 1} (or -{depth}..-1 from the end), e.g. '3/6/9', no repeats"
    chosen = int_list("evit", "blocks", blocks, allowed)
    if any(not -depth <= i < depth for i in chosen) or len({i % depth for i in chosen}) != len(chosen):
        raise knob_error("evit", "blocks", allowed, blocks)
    return sorted(i % depth for i in chosen)


def tokens_kept(n: int, keep: float) -> int:
    """Patch tokens kept of ``n`` tokens (CLS included) at keep rate ``keep``, as released: ceil."""
    return math.ceil(keep * (n - 1))


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, n - 1): the CLS query's softmax attention over the patch tokens, mean over heads."""
    row = ((q[:, :, :1] * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return row[:, :, 0, 1:].mean(dim=1)


def keep_attentive(x: torch.Tensor, attention: torch.Tensor, left: int, fuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n, C) -> CLS, the ``left`` most attended patch tokens (most attended first) and, with
    ``fuse``, one token: the others summed, each weighted by its CLS attention. Also returns the
    kept patches' positions (B, left) among the n - 1 patch tokens."""
    patches = x[:, 1:]
    order = attention.argsort(dim=-1, descending=True)
    top, rest = order[:, :left], order[:, left:]
    rows = lambda idx: idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # noqa: E731
    parts = [x[:, :1], patches.gather(1, rows(top))]
    if fuse and rest.shape[1] > 0:
        weights = attention.gather(1, rest).unsqueeze(-1).to(x.dtype)
        parts.append((patches.gather(1, rows(rest)) * weights).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1), top


class _Reorganising:
    """The state of one forward: what the current block's attention product left for the ranking,
    and each token's original index (-1 for a fused token)."""

    def __init__(self, b: int, n: int, device: torch.device, explicit: bool):
        self.origin = torch.arange(n, device=device).expand(b, n)
        self.explicit = explicit
        self.attention: torch.Tensor | None = None

    def product(self, q, k, v, lay: Layout, attn: nn.Module, rank: bool) -> torch.Tensor:
        drop = attn.attn_drop.p if attn.training else 0.0
        if not self.explicit:
            if rank:
                self.attention = cls_attention(q, k, attn.scale)
            return sdpa(q, k, v, None, drop, attn.scale)
        a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        a = attn.attn_drop(a)
        if rank:  # the released code reads the CLS row of the (dropped-out) attention matrix
            self.attention = a[:, :, 0, 1:].mean(dim=1)
        return a @ v

    def reorganise(self, x: torch.Tensor, b: int, keep: float, fuse: bool) -> torch.Tensor:
        x = x.view(b, -1, x.shape[-1])
        left = tokens_kept(x.shape[1], keep)
        if left >= x.shape[1] - 1:
            return x.reshape(-1, x.shape[-1])
        x, top = keep_attentive(x, self.attention, left, fuse)
        kept = [self.origin[:, :1], self.origin[:, 1:].gather(1, top)]
        if x.shape[1] > left + 1:
            kept.append(torch.full_like(self.origin[:, :1], -1))
        self.origin = torch.cat(kept, dim=1)
        return x.reshape(-1, x.shape[-1])


class EViT(TracedViT):
    """A timm VisionTransformer that keeps attentive tokens in ``reduction_blocks`` (docs/methods/evit.md)."""

    bench_method = "evit"

    def forward(self, img: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        knobs = self.bench_knobs
        stages = set(reduction_blocks(len(self.blocks), knobs["blocks"]))
        keep, fuse, explicit = float(knobs["keep"]), bool(knobs["fuse"]), self.bench_mode == "reference"

        def step(state: _Reorganising, i: int, blk: nn.Module, n: int):
            rank = i in stages and tokens_kept(n, keep) < n - 1
            product = lambda q, k, v, lay: state.product(q, k, v, lay, blk.attn, rank)  # noqa: E731
            return product, (lambda t: state.reorganise(t, t.shape[0] // n, keep, fuse)) if rank else None

        make_state = lambda b, n, device: _Reorganising(b, n, device, explicit)  # noqa: E731
        return forward_reducing(self, img, make_state, step, "kept_index")

    def tokens_entered(self, trace) -> torch.Tensor:
        """Original tokens entering each block; fused tokens stand for no single patch and are left
        out, so after the first fusion a block's count here is ``trace.tokens`` less its fused tokens."""
        b, depth = trace.tokens.shape
        n = self.bench_shape.num_tokens
        out = torch.zeros(b, depth, n + 1, dtype=torch.bool)  # column n catches the fused token (-1)
        for l, origin in enumerate(trace.kept_index):
            origin = origin.cpu()
            out[:, l].scatter_(1, origin.where(origin >= 0, n), True)
        return out[:, :, :n]


def _build(vit: nn.Module, mode: str, keep: float = 1.0, fuse: bool = True, blocks: Any = None) -> nn.Module:
    check_timm_blocks(vit, "evit")
    check_cls_pooling(vit, "evit")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"knob 'keep' of method 'evit' must lie in (0, 1] (share of patch tokens kept per reduction), got {keep!r}")
    reduction_blocks(len(vit.blocks), blocks)  # refuse bad blocks now, not at the first forward
    return adapt(vit, EViT, mode, {"keep": keep, "fuse": fuse, "blocks": blocks})


SPEC = register(
    MethodSpec(
        id="evit",
        paper="Liang et al., ICLR 2022, Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations",
        arxiv="2202.07800",
        summary="keeps the patch tokens the CLS token attends to most, fuses the rest into one token (training-free here)",
        build=_build,
        knobs=(
            Knob("keep", float, 1.0, "share of patch tokens kept at each reduction block (ceil(keep * patches)); 1.0 = dense"),
            Knob("fuse", bool, True, "fuse the dropped tokens into one attention-weighted token (false: drop them, Top-K)"),
            Knob("blocks", object, None, "reduction blocks, 0-based ('3/6/9'); default: the released 4th, 7th, 10th of 12 scaled to the depth"),
        ),
        modes=("compact", "reference"),
        primary_knob="keep",
        matched=MatchedCompute("keep", 0.02, 1.0),
        default_budgets=("0.9", "0.7", "0.5"),
        extras={
            "tokens_kept": "(B, depth) tokens leaving each block (a reduction block's kept tokens plus the fused token)",
            "kept_index": "one (B, n_l) tensor per block: original index of each token entering block l, -1 for the fused token",
        },
    )
)
