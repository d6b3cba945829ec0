"""How each method's compute is counted besides our closed form (docs/counting.md#every-counter).

A method's :class:`~methods.registry.Counting` (``MethodSpec.counting``) says, as functions of one
forward's model and trace, per sample, in G:

* ``traced``: what fvcore's ``torch.jit`` trace of the ``compact`` model at batch 1 counts, i.e. our
  closed form minus (or plus) the work the documented rules move: compute the compact path skips
  or adds, and work whose result never reaches the logits (the trace prunes it).
* ``executed``: what the ``compact`` model runs at batch 1, everything included (ptflops' ``aten``
  backend sees this, before its own rules on norms and biases).
* ``conventions``: the papers' (and third parties') own ways of counting, where they differ
  from ours (docs/methods/*.md#compute).

Nothing here branches on a method id: each method's spec names its own functions.
"""
from __future__ import annotations

import torch
from torch import nn

from .macs import official_table_entry, sampled_gmacs
from .registry import Counting, CountRule
from .trace import Trace


def closed_form(model: nn.Module, trace: Trace) -> torch.Tensor:
    """Our per-sample count: the trace's ``gmacs``."""
    return trace.gmacs.detach().cpu().to(torch.float64)


# ATS (docs/methods/ats.md#compute)


def ats_compact_executed(model: nn.Module, trace: Trace) -> torch.Tensor:
    """An ATS block of ``compact`` forms the CLS row of q.k^T over all n_in keys, then q.k^T only
    for the n_out kept queries: (1 + n_out) * n_in * A where the closed form counts n_in^2 * A
    (docs/methods/ats.md#compact)."""
    shape = model.bench_shape
    blocks = list(model.ats_config.blocks)
    n_in = trace.tokens[:, blocks].cpu().to(torch.float64)
    n_out = trace.tokens_kept[:, blocks].cpu().to(torch.float64)
    skipped = ((n_in - 1 - n_out) * n_in * shape.attn_dim).sum(dim=1)
    return closed_form(model, trace) - skipped / 1e9


def ats_padded_per_batch(model: nn.Module, trace: Trace) -> torch.Tensor:
    """Every sample charged the batch's padded shapes, as a shape-based count of the released code
    per batch gives (ATS issue #2: 3.4 G where the paper's per-sample mean is 2.9 G)."""
    t_in, t_out = trace.tokens.cpu(), trace.tokens_kept.cpu()
    longest_in = t_in.max(dim=0, keepdim=True).values.expand_as(t_in)
    longest_out = t_out.max(dim=0, keepdim=True).values.expand_as(t_out)
    return sampled_gmacs(model.bench_shape, longest_in, longest_out)


ATS = Counting(
    traced=ats_compact_executed,
    executed=ats_compact_executed,
    conventions=(
        CountRule("padded batch", "ATS issue #2: the released code's padded batch shapes, per sample "
                  "(the paper's own count is the per-sample mean, = ours)", ats_padded_per_batch),
    ),
)


# A-ViT (docs/methods/avit.md#compute)


def avit_reaches_logits(model: nn.Module, trace: Trace) -> torch.Tensor:
    """With CLS pooling the logits read only the CLS token's states: blocks from the CLS token's
    halting depth on cannot change them, so fvcore's trace drops them (docs/counting.md#every-counter)."""
    gmacs = closed_form(model, trace)
    if not model._cls_only():
        return gmacs
    shape = model.bench_shape
    tokens = trace.tokens.cpu().to(torch.float64)
    cls_depth = trace.depths[:, 0].cpu().unsqueeze(1)
    after = torch.arange(tokens.shape[1]).unsqueeze(0) >= cls_depth
    return gmacs - (shape.block(tokens) * after).sum(dim=1) / 1e9


def avit_active_tokens(model: nn.Module, trace: Trace) -> torch.Tensor:
    """embedding + sum over blocks of block(active tokens) + the dense model's final norm and head:
    FLOPs of the tokens still active, each sample's count averaged over the set (A-ViT issue #8); we
    normalise only the CLS token at the end."""
    shape = model.bench_shape
    tokens = trace.tokens.cpu()
    return shape.gmacs_from_tokens(tokens, torch.full((tokens.shape[0],), shape.num_tokens))


AVIT = Counting(
    traced=avit_reaches_logits,
    conventions=(CountRule("active tokens", "A-ViT issue #8: active tokens per block, dense final norm", avit_active_tokens),),
)


# AdaViT (docs/methods/adavit.md#compute)


def adavit_executed(model: nn.Module, trace: Trace) -> torch.Tensor:
    """What ``compact`` runs: projection to C outputs, LN2 on kept tokens, the decision network."""
    return trace.gmacs_executed.detach().cpu().to(torch.float64)


def adavit_gate_macs(model: nn.Module) -> int:
    """MACs of the head and block gates on CLS over all blocks that have them."""
    shape = model.bench_shape
    gated = sum(1 for g in model.adavit_gates if g.head is not None)
    return gated * (shape.num_heads + 2) * shape.embed_dim


def adavit_traced(model: nn.Module, trace: Trace) -> torch.Tensor:
    """What fvcore's trace keeps of ``compact`` at batch 1. It prunes work whose result only
    steers Python control flow: the head and block gates (which heads to slice, whether a
    sub-layer runs); in a block that keeps every patch, the patch gate (its decision then selects
    nothing), and LN1 too when that block's MSA is off (LN1 only fed the gate)."""
    shape = model.bench_shape
    n, c = shape.num_tokens, shape.embed_dim
    ran = trace.tokens.cpu() > 0
    all_kept = trace.patch_keep.cpu().bool().all(dim=2) & ran
    msa_off = ~trace.sublayers.cpu().bool()[..., 0]
    pruned = all_kept * (n - shape.num_prefix_tokens) * c + (all_kept & msa_off) * 5 * n * c
    return adavit_executed(model, trace) - (adavit_gate_macs(model) + pruned.sum(dim=1).to(torch.float64)) / 1e9


def adavit_table(model: nn.Module, trace: Trace) -> torch.Tensor:
    """base + sum over blocks of T[h, t, a, m], the shipped lookup table with its truncated token
    counts (docs/methods/adavit.md#the-shipped-lookup-table); base = embedding + final norm + head
    (the official code hard-codes 0.06 G for DeiT, ours gives 0.0586 G for DeiT-S)."""
    shape = model.bench_shape
    n = shape.num_tokens
    table = {}
    sub = trace.sublayers.cpu().to(torch.int64)
    rows = []
    for h_row, t_row, s_row in zip(trace.heads.cpu().tolist(), trace.tokens.cpu().tolist(), sub.tolist()):
        total = 0.0
        for key in zip(h_row, t_row, (a for a, _ in s_row), (m for _, m in s_row)):
            if key not in table:
                table[key] = official_table_entry(shape.embed_dim, shape.num_heads, shape.mlp_hidden, n, *key)
            total += table[key]
        rows.append(total)
    base = (shape.embed_macs + shape.final(n)) / 1e9
    return torch.tensor(rows, dtype=torch.float64) + base


def adavit_table_with_policy(model: nn.Module, trace: Trace) -> torch.Tensor:
    """The lookup table plus the decision network's own MACs (the official count leaves them out)."""
    return adavit_table(model, trace) + trace.policy_gmacs.detach().cpu().to(torch.float64)


ADAVIT = Counting(
    traced=adavit_traced,
    executed=adavit_executed,
    conventions=(
        CountRule("lookup table", "AdaViT's shipped table over kept heads/tokens/blocks, no decision network", adavit_table),
        CountRule("table + policy", "the same table plus the decision network", adavit_table_with_policy),
    ),
)
