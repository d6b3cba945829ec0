"""ToMe, Token Merging (Bolya et al., ICLR 2023, arXiv 2210.09461) as method ``tome``.

Training-free. In every block, between attention and MLP, the tokens are split alternately into
two sets A and B; each A token is matched to its most similar B token by the cosine similarity of
the attention keys (mean over heads), and the ``r`` best-matched A tokens are merged into their
partners by a size-weighted average. A token's size (how many patches it stands for) biases the
attention: log(size) is added to its key's logits (proportional attention). CLS is never merged.
Every sample merges the same number of tokens, so a batch never pads. A backbone without a CLS
token (VideoMAE, average pooling) merges any token, as in the paper's video experiments.
docs/methods/tome.md.

Both modes remove tokens, as the released code does. ``reference`` computes the attention matrix
explicitly (q k^T + log size, softmax, @ v) as the released code must to add the size bias;
``compact`` passes the bias to the execution layer's fused attention (methods/execution.py).
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
from torch import nn

from .base import TracedViT, adapt
from .execution import check_cls_pooling, check_timm_blocks, forward_reducing
from .attention import Layout, sdpa
from .registry import Knob, MatchedCompute, MethodSpec, register


def merge_schedule(depth: int, r: float, inflect: float = 0.0) -> list[int]:
    """Tokens to merge in each block: ``r`` everywhere (inflect 0; a fractional r alternates
    floor and ceil so that the first l blocks merge floor(r * l)), or a linear ramp with the same
    total from 2r down to 0 (inflect -1, decreasing) or 0 up to 2r (+1); docs/methods/tome.md#schedule."""
    if inflect == 0.0:
        return [math.floor(r * (i + 1) + 1e-9) - math.floor(r * i + 1e-9) for i in range(depth)]
    low = int(r * (1.0 - inflect))
    high = 2 * r - low
    step = (high - low) / max(1, depth - 1)
    return [int(low + step * i) for i in range(depth)]


class Matching(NamedTuple):
    """Bipartite soft matching of one block: indices into set A (even positions) and set B (odd)."""

    unmerged: torch.Tensor  # (B, |A| - r) A tokens kept, in their order (CLS first)
    src: torch.Tensor  # (B, r) A tokens merged away, best-matched first
    dst: torch.Tensor  # (B, r) the B token each one merges into


def bipartite_matching(keys: torch.Tensor, r: int, cls: bool = True) -> Matching | None:
    """The ``r`` most similar (A, B) pairs by cosine similarity of ``keys`` (B, n, d); each A token
    pairs with its best B token; with ``cls``, the CLS token (the first A token) never merges.
    None when nothing merges: at most half of the other tokens can merge in one block
    (docs/methods/tome.md#matching)."""
    r = min(r, (keys.shape[1] - int(cls)) // 2)
    if r <= 0:
        return None
    unit = keys / keys.norm(dim=-1, keepdim=True)
    similarity = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # (B, |A|, |B|)
    if cls:
        similarity[:, 0] = -math.inf
    best, partner = similarity.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    src = ranked[:, :r]
    return Matching(ranked[:, r:].sort(dim=-1).values, src, partner.gather(1, src))


def merge(t: torch.Tensor, m: Matching) -> torch.Tensor:
    """(B, n, F) -> (B, n - r, F): the kept A rows, then the B rows with the merged A rows summed in."""
    a, b = t[:, ::2], t[:, 1::2]
    rows = lambda idx: idx.unsqueeze(-1).expand(-1, -1, t.shape[-1])  # noqa: E731
    moved = a.gather(1, rows(m.src))
    return torch.cat([a.gather(1, rows(m.unmerged)), b.scatter_reduce(1, rows(m.dst), moved, reduce="sum")], dim=1)


def merge_weighted(x: torch.Tensor, size: torch.Tensor, m: Matching) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of merged tokens: x (B, n, C), size (B, n, 1) -> the merged pair."""
    summed = merge(torch.cat([x * size, size], dim=-1), m)
    size = summed[..., -1:]
    return summed[..., :-1] / size, size


def representatives(origin: torch.Tensor, m: Matching) -> torch.Tensor:
    """Original index of the token each merged token is counted as (its B partner's): (B, n - r)."""
    return torch.cat([origin[:, ::2].gather(1, m.unmerged), origin[:, 1::2]], dim=1)


class _Merging:
    """The state of one forward: token sizes, each token's original index, and the attention keys
    the current block's product left for the matching."""

    def __init__(self, b: int, n: int, device: torch.device, proportional: bool, explicit: bool, cls: bool):
        self.cls = cls
        self.size: torch.Tensor | None = None  # (B, n, 1) float; None while every size is 1
        self.origin = torch.arange(n, device=device).expand(b, n)
        self.proportional, self.explicit = proportional, explicit
        self.keys: torch.Tensor | None = None

    def product(self, q, k, v, lay: Layout, attn: nn.Module) -> torch.Tensor:
        """Attention with log(size) on the keys' logits; keeps the mean key over heads."""
        self.keys = k.mean(dim=1)
        bias = self.size.log().view(lay.batch, 1, 1, lay.length).to(q.dtype) if self.proportional and self.size is not None else None
        drop = attn.attn_drop.p if attn.training else 0.0
        if not self.explicit:
            return sdpa(q, k, v, bias, drop, attn.scale)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        return attn.attn_drop(logits.softmax(dim=-1)) @ v

    def merge(self, x: torch.Tensor, r: int, b: int) -> torch.Tensor:
        """Rows (B * n, C) after attention -> rows after merging ``r`` tokens per sample."""
        m = bipartite_matching(self.keys, r, self.cls)
        if m is None:
            return x
        x = x.view(b, -1, x.shape[-1])
        size = self.size if self.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)
        x, self.size = merge_weighted(x, size, m)
        self.origin = representatives(self.origin, m)
        return x.reshape(-1, x.shape[-1])


class ToMeViT(TracedViT):
    """A timm VisionTransformer that merges ``merge_schedule(...)[l]`` tokens in block l."""

    bench_method = "tome"

    def forward(self, img: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        knobs = self.bench_knobs
        schedule = merge_schedule(len(self.blocks), float(knobs["r"]), float(knobs["inflect"]))
        explicit, protect_cls = self.bench_mode == "reference", self.num_prefix_tokens == 1

        def make_state(b: int, n: int, device: torch.device) -> _Merging:
            return _Merging(b, n, device, bool(knobs["proportional"]), explicit, protect_cls)

        def step(state: _Merging, i: int, blk: nn.Module, n: int):
            product = lambda q, k, v, lay: state.product(q, k, v, lay, blk.attn)  # noqa: E731
            return product, lambda t: state.merge(t, schedule[i], t.shape[0] // n)

        head_dim = self.bench_shape.attn_dim // self.bench_shape.num_heads
        return forward_reducing(self, img, make_state, step, "merged_index", partial(matching_macs, head_dim=head_dim))

    def tokens_entered(self, trace) -> torch.Tensor:
        """A merged token counts as its representative's (the B token the others merged into)."""
        b, depth = trace.tokens.shape
        out = torch.zeros(b, depth, self.bench_shape.num_tokens, dtype=torch.bool)
        for l, origin in enumerate(trace.merged_index):
            out[:, l].scatter_(1, origin.cpu(), True)
        return out


def matching_macs(n_in: int, n_out: int, head_dim: int) -> int:
    """The matching's similarity product, |A| x |B| x d, in a block that merges (n_out < n_in);
    normalising and arg-sorting count 0 (docs/methods/tome.md#compute)."""
    return (n_in + 1) // 2 * (n_in // 2) * head_dim if n_out < n_in else 0


def _build(vit: nn.Module, mode: str, r: float = 0.0, inflect: float = 0.0, proportional: bool = True) -> nn.Module:
    check_timm_blocks(vit, "tome")
    if vit.num_prefix_tokens == 1:
        check_cls_pooling(vit, "tome")
    elif vit.num_prefix_tokens > 1:
        raise ValueError(f"tome protects one CLS token or none; this model has {vit.num_prefix_tokens} prefix tokens")
    if r < 0:
        raise ValueError(f"knob 'r' of method 'tome' must be >= 0 (tokens merged per block), got {r!r}")
    if not -1.0 <= inflect <= 1.0:
        raise ValueError(f"knob 'inflect' of method 'tome' must lie in [-1, 1] (-1 decreasing, 0 constant, 1 increasing), got {inflect!r}")
    return adapt(vit, ToMeViT, mode, {"r": r, "inflect": inflect, "proportional": proportional})


SPEC = register(
    MethodSpec(
        id="tome",
        paper="Bolya et al., ICLR 2023, Token Merging: Your ViT But Faster",
        arxiv="2210.09461",
        summary="training-free bipartite merging of similar tokens, r per block, size-weighted, proportional attention",
        build=_build,
        knobs=(
            Knob("r", float, 0.0, "tokens merged per block (at most half of the non-CLS tokens of a block; a fraction "
                 "alternates floor and ceil); 0 = dense"),
            Knob("inflect", float, 0.0, "schedule: 0 = r in every block, -1 = decreasing from 2r to 0, 1 = increasing"),
            Knob("proportional", bool, True, "proportional attention: add log(token size) to the attention logits"),
        ),
        modes=("compact", "reference"),
        primary_knob="r",
        matched=MatchedCompute("r", 0.0, 100.0, increasing=False),
        default_budgets=("4", "6", "8", "r:8+inflect:-1"),
        extras={
            "tokens_kept": "(B, depth) tokens leaving each block after merging",
            "merged_index": "one (B, n_l) tensor per block: original index of the token each token entering block l "
            "is counted as (merged tokens count as the token they merged into)",
        },
    )
)
