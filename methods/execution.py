"""The execution layer: a timm ViT's own blocks run on the tokens a method's policy keeps.

A method decides which tokens (ATS, A-ViT), heads or sub-layers (AdaViT) each sample keeps; this
module runs the backbone's own modules (``norm1``, ``attn.qkv``, ``attn.proj``, ``mlp``, ...) on
exactly that work, so any timm ``Block`` / ``Attention`` variant keeps working:

* ``compact`` execution keeps the batch's active tokens *packed*, one row per token, samples one
  after another (:class:`~methods.attention.Layout` says where each row sits in the attention
  buffer). Token-wise layers run on the real rows only; only the attention product needs a
  per-sample layout (:func:`block_on_rows`).
* ``reference`` execution is the official codes' masked form: every token stays in a dense
  (B * N, C) tensor and halted or dropped tokens are zeroed and masked (:func:`masked_block`).

Rows of a padded (B, L, ...) tensor are addressed by flat index (:func:`flat_rows`,
:func:`take_rows`): on the CPU ``index_select`` is far cheaper than a batched gather with an
expanded index (20 us against 200 us at batch 32 on the digits ViT).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .attention import Layout, packed_attention
from .macs import ViTShape

Product = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Layout], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Packed rows


def padded_layout(counts: torch.Tensor, length: int, dtype: torch.dtype) -> Layout:
    """Packed rows (``counts[b]`` rows of sample b, sample after sample) in a plain (B, ``length``)
    buffer, padding zeroed and masked with an additive -inf key mask; ``real`` (B, L) marks the
    real slots and ``offsets`` (B,) is the packed position of each sample's first row."""
    real = torch.arange(length, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)
    mask = torch.zeros(real.shape, dtype=dtype, device=counts.device).masked_fill_(~real, float("-inf"))
    slots = real.reshape(-1)
    return Layout(counts.shape[0], length, slots.nonzero().squeeze(1), mask[:, None, None, :], pad=(~slots).nonzero().squeeze(1),
                  real=real, offsets=counts.cumsum(0) - counts)


def unpack(rows: torch.Tensor, lay: Layout) -> torch.Tensor:
    """(T, F) packed rows -> (B, L, F) in ``lay``'s buffer, zeros on padding."""
    out = rows.new_zeros(lay.batch * lay.length, rows.shape[-1]).index_copy_(0, lay.flat, rows)
    return out.view(lay.batch, lay.length, -1)


def flat_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """(B, R) row indices into (B, n, ...) -> flat indices into (B * n, ...)."""
    if rows.shape[0] == 1:
        return rows[0]
    return (rows + torch.arange(rows.shape[0], device=rows.device).unsqueeze(1) * n).reshape(-1)


def take_rows(t: torch.Tensor, flat: torch.Tensor, b: int) -> torch.Tensor:
    """Rows of a (B, n, C) tensor by flat index, as (B, R, C)."""
    if b == 1:
        return t.index_select(1, flat)
    return t.reshape(-1, t.shape[-1]).index_select(0, flat).reshape(b, -1, t.shape[-1])


# --------------------------------------------------------------------------------------------
# timm Attention and Block on packed or masked rows


def attention_tail(attn: nn.Module, o: torch.Tensor, y_rows: torch.Tensor | None = None) -> torch.Tensor:
    """timm ``Attention`` after the attention product: its norm, the optional output gate (on the
    block input rows ``y_rows``), proj and dropout."""
    o = attn.norm(o)
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(y_rows).sigmoid()
    return attn.proj_drop(attn.proj(o))


def attention_on_rows(attn: nn.Module, y: torch.Tensor, lay: Layout, product: Product | None = None) -> torch.Tensor:
    """timm ``Attention`` on packed rows ``y`` (T, C); the products run in ``lay``'s buffer(s).
    ``product(q, k, v, lay)`` replaces the softmax attention where a method's official code
    computes it differently (ATS's policy-aware softmax)."""
    if hasattr(attn, "mix_rows"):  # a token-mixing MLP in the attention slot (methods/variants.py)
        return attn.mix_rows(y, lay)
    drop = attn.attn_drop.p if attn.training else 0.0
    o = packed_attention(attn.qkv(y), lay, attn.num_heads, attn.head_dim, attn.q_norm, attn.k_norm, drop, product)
    return attention_tail(attn, o, y)


def block_on_rows(
    blk: nn.Module, x: torch.Tensor, lay: Layout, product: Product | None = None, between: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """A timm pre-LN ``Block`` on packed rows ``x`` (T, C) (compact execution). ``between`` maps
    the rows after the attention residual to the rows the MLP sees, for methods that reduce the
    tokens inside a block (ToMe merges, EViT fuses)."""
    x = x + blk.drop_path1(blk.ls1(attention_on_rows(blk.attn, blk.norm1(x), lay, product)))
    if between is not None:
        x = between(x)
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def check_cls_pooling(vit: nn.Module, method: str) -> None:
    """Refuse backbones without exactly one prefix token, the CLS token, read by the head: methods
    that score tokens by the CLS attention row or never merge CLS need it."""
    if getattr(vit, "cls_token", None) is None or vit.num_prefix_tokens != 1:
        raise ValueError(f"{method} needs a ViT with exactly one prefix token, the CLS token; this model has {vit.num_prefix_tokens}")
    if getattr(vit, "global_pool", "token") != "token" or getattr(vit, "attn_pool", None) is not None:
        raise ValueError(f"{method} needs CLS-token pooling (global_pool='token'); this model pools by {vit.global_pool!r}")


def masked_block(blk: nn.Module, x: torch.Tensor, keep: torch.Tensor, lay: Layout) -> torch.Tensor:
    """The official codes' masked block on (B * N, C) rows: ``keep`` (B * N, 1) is 1 for active
    tokens; ``lay.mask`` masks (or biases) the inactive keys. Zeroing the outputs of the row-wise
    LayerNorms also zeroes what an official code that zeroes their inputs feeds on, in half the passes."""
    x = x + blk.drop_path1(blk.ls1(attention_on_rows(blk.attn, blk.norm1(x) * keep, lay)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x) * keep)))


def check_timm_blocks(vit: nn.Module, method: str) -> None:
    """Refuse backbones whose blocks are not timm's pre-LN ``Block`` with ``Attention`` (the layer
    calls their sub-modules one by one)."""
    from timm.models.vision_transformer import Attention, Block

    for i, blk in enumerate(vit.blocks):
        pre_ln = isinstance(blk, Block) and type(blk).forward is Block.forward
        mixes = hasattr(blk.attn, "mix_rows")  # methods/variants.py: its backbone refuses what it cannot run
        if not pre_ln or not (mixes or type(blk.attn).forward is Attention.forward):
            raise TypeError(f"{method} supports timm's pre-LN Block with Attention; block {i} is {type(blk).__name__}")


# --------------------------------------------------------------------------------------------
# MAC and padding accounting


def tokens_from_depths(depths: torch.Tensor, depth: int) -> torch.Tensor:
    """(B, depth) tokens entering each block from (B, N) per-token depths: block l (0-based) sees
    the tokens with depth > l."""
    levels = torch.arange(depth, device=depths.device)
    return (depths.unsqueeze(-1) > levels).sum(dim=1)


def forward_reducing(model: nn.Module, img: torch.Tensor, make_state: Callable, step: Callable, index_name: str,
                     extra_macs: Callable[[int, int], int] | None = None) -> torch.Tensor:
    """The forward of a method that reduces every sample to the same count inside its blocks (ToMe,
    EViT). ``make_state(B, N, device)`` holds the method's per-forward state, whose ``origin``
    (B, n) is the original index of each token entering a block (recorded per block as the trace
    field ``index_name``); ``step(state, block index, block, tokens entering)`` gives the block's
    attention ``product`` and its ``between`` step (``block_on_rows``)."""
    x = model.embed_tokens(img)
    b, n, c = x.shape
    state = make_state(b, n, x.device)
    rows = x.reshape(b * n, c)
    tokens, entered = [], []
    for i, blk in enumerate(model.blocks):
        n = rows.shape[0] // b
        tokens.append(n)
        entered.append(state.origin)
        product, between = step(state, i, blk, n)
        rows = block_on_rows(blk, rows, Layout(b, n), product, between)
    logits = model.forward_head(model.norm(rows.view(b, -1, c)))
    record_reduction(model, b, tokens, rows.shape[0] // b, extra_macs, **{index_name: tuple(entered)})
    return logits


def record_reduction(model: nn.Module, batch: int, tokens: list[int], n_final: int, extra_macs: Callable[[int, int], int] | None = None, **extras) -> None:
    """The trace of a forward in which every sample keeps the same count (ToMe, EViT): ``tokens``
    entering each block, ``n_final`` left at the end. Each block counts attention on the tokens it
    receives and its MLP on those it passes on (``ViTShape.reduced_block``), plus ``extra_macs(n_in,
    n_out)`` the method spends deciding; the final norm runs on every token left."""
    shape = model.bench_shape
    t_out = tokens[1:] + [n_final]
    macs = shape.embed_macs + shape.final(n_final)
    macs += sum(shape.reduced_block(n, m) + (extra_macs(n, m) if extra_macs else 0) for n, m in zip(tokens, t_out))
    model.record(torch.tensor([tokens] * batch), gmacs=torch.full((batch,), macs / 1e9, dtype=torch.float64),
                 tokens_kept=torch.tensor([t_out] * batch), **extras)


@dataclass(frozen=True)
class BlockTable:
    """GMACs of one block for 0..N tokens and of everything outside the blocks: the closed form of
    ``methods.macs`` evaluated once per model, so a forward at batch 1 pays one lookup."""

    shape: ViTShape
    block: torch.Tensor  # (N + 1,) GMACs of one block on n tokens
    fixed: float  # GMACs of the embedding, final norm and head
    n_final: int | None  # tokens the final norm sees (1: the CLS token); None: every token

    def gmacs(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample GMACs in all and in the blocks, from (B, depth) tokens entering each block."""
        if int(tokens.max()) < len(self.block):
            blocks = self.block[tokens].sum(dim=1)
            return blocks + self.fixed, blocks
        # more tokens than the model was built for (e.g. a dynamic image size)
        n_final = tokens[:, 0].to(torch.float64) if self.n_final is None else torch.full((len(tokens),), float(self.n_final), dtype=torch.float64)
        gmacs = self.shape.gmacs_from_tokens(tokens, n_final)
        return gmacs, gmacs - self.shape.gmacs_from_tokens(torch.zeros_like(tokens), n_final)

    def padding_waste(self, tokens: torch.Tensor, blocks: torch.Tensor, rows: int, pairs: int) -> float:
        """Share of the executed block MACs no sample needed, from the ``rows`` and query-key
        ``pairs`` the blocks computed: attention over padding slots (or, in a block-diagonal
        product, over other samples' keys) and rows kept in place for a halted token."""
        attn = 2 * self.shape.attn_dim
        per_row = float(self.block[1]) * 1e9 - attn  # block(n) = per_row * n + 2 A n^2
        spare = per_row * (rows - int(tokens.sum())) + attn * (pairs - int((tokens * tokens).sum()))
        return spare / (float(blocks.sum()) * 1e9 + spare) if spare > 0 else 0.0


def block_table(model: nn.Module, n_final: int | None) -> BlockTable:
    """The (cached) :class:`BlockTable` of ``model``; ``n_final``: tokens its final norm sees
    (1 for CLS pooling, None for every token)."""
    cached = model.__dict__.get("_bench_block_table")
    if cached is None or cached.n_final != n_final:
        shape = model.bench_shape
        counts = torch.arange(shape.num_tokens + 1, dtype=torch.float64)
        fixed = shape.embed_macs + shape.final(shape.num_tokens if n_final is None else n_final)
        cached = BlockTable(shape, shape.block(counts) / 1e9, float(fixed) / 1e9, n_final)
        model.__dict__["_bench_block_table"] = cached
    return cached


__all__ = [
    "BlockTable",
    "Layout",
    "block_table",
    "tokens_from_depths",
    "attention_on_rows",
    "attention_tail",
    "block_on_rows",
    "check_cls_pooling",
    "check_timm_blocks",
    "flat_rows",
    "forward_reducing",
    "masked_block",
    "padded_layout",
    "record_reduction",
    "take_rows",
    "unpack",
]
