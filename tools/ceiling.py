"""The attainable speedup of a token- or head-dropping method with the dense model's own kernels.

A `compact` implementation can only be as fast as the work it keeps. This module replays that
work with none of the method's policy logic: for each block, timm's own operations on exactly as
many token rows (and, for AdaViT, heads; for ATS, kept queries) as the method kept, taken from its trace, as contiguous
tensors (no gathers, no masks, no padding). A batch runs every sample at the mean count of the
batch (a perfectly balanced batch: no implementation that batches samples does better). Timed
against the dense model side by side, this gives the speedup the kernels allow for that schedule
on this machine; a compact path's speedup divided by it says how much its own bookkeeping costs.

On CPUs, a GEMM over fewer rows costs more per row (weights streamed from memory once per call,
kernel blocking), so this ceiling sits below the MAC bound: that part of a shortfall against a
"share of the GMACs ratio" target is the hardware's, not the method's implementation's.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

import methods
from bench.measure import timing_batches


class _Replay(nn.Module):
    """Runs ``block_fn(l, blk, x)`` over the blocks of a timm ViT on the per-block row counts of a
    schedule chosen by the input batch's storage address (``add``), then the dense model's head.
    ``x`` given to ``block_fn`` is the (B, N, C) stream; it returns the new stream."""

    def __init__(self, vit: nn.Module, block_fn) -> None:
        super().__init__()
        self.vit = vit.eval()
        self.block_fn = block_fn
        self.schedules: dict[int, list] = {}
        self.__dict__["_bench_trace"] = types.SimpleNamespace(extras={})  # for bench.measure

    def add(self, batch: torch.Tensor, schedule: list) -> None:
        self.schedules[batch.data_ptr()] = schedule

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        schedule = self.schedules[img.data_ptr()]
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(img))))
        for l, blk in enumerate(vit.blocks):
            x = self.block_fn(schedule[l], blk, x)
        return vit.forward_head(vit.norm(x))


def median_rounds(pairs: dict[str, tuple[nn.Module, nn.Module]], rounds: int, time) -> dict[str, list[dict]]:
    """``time(model, reference)`` for every named pair, ``rounds`` times, the pairs taking turns
    within a round so a slow phase of a shared machine hits them alike; per pair, the runs sorted
    by speedup (the median round is ``runs[rounds // 2]``: a burst of other work inside one round
    hits its interleaved pair unevenly, so single rounds are not reported)."""
    runs: dict[str, list[dict]] = {name: [] for name in pairs}
    for _ in range(rounds):
        for name, (model, reference) in pairs.items():
            runs[name].append(time(model, reference))
    return {name: sorted(r, key=lambda run: run["speedup"]) for name, r in runs.items()}


def _batches(inputs: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """The batches ``time_side_by_side`` times (views of ``inputs``: the replay finds each batch's
    schedule by its storage address, so a cycled short input could not be matched)."""
    if inputs.shape[0] < batch:
        raise ValueError(f"the ceiling needs at least {batch} inputs for batch size {batch}, got {inputs.shape[0]}")
    return timing_batches(inputs, batch)


@torch.no_grad()
def avit(vit: nn.Module, compact: nn.Module, inputs: torch.Tensor, batch: int) -> nn.Module:
    """A-ViT's kept work: block l on the mean number of tokens entering it (from ``compact``'s
    trace on the same batch), the leading ones, as one contiguous (B, n, C) tensor; timm's Block."""

    def block(n: int, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return blk(x if n >= x.shape[1] else x[:, :n].contiguous())

    replay = _Replay(methods.build("deit", vit), block)
    for xb in _batches(inputs, batch):
        compact(xb)
        tokens = methods.trace(compact).tokens.float().mean(0)
        replay.add(xb, [max(1, round(float(t))) for t in tokens])
    return replay


@torch.no_grad()
def adavit(vit: nn.Module, compact: nn.Module, inputs: torch.Tensor, batch: int) -> nn.Module:
    """AdaViT's kept work, including the parts its design runs on every token: LayerNorm 1 and the
    patch gate (a C -> 1 linear) on all N tokens of the block input; then, on the mean number of
    kept tokens, the MSA with the mean number of kept heads (q, k, v and proj sliced to them,
    weights pre-sliced) and the FFN reading the kept heads' channels, each sub-layer run when at
    least half the samples ran it; the kept rows written back into the stream (the carry)."""
    H = vit.blocks[0].attn.num_heads
    d = vit.blocks[0].attn.head_dim
    C = H * d
    sliced: dict[tuple[int, int], tuple] = {}
    gate = nn.Linear(C, 1, device=vit.blocks[0].attn.qkv.weight.device)

    def weights(l: int, blk: nn.Module, h: int) -> tuple:
        if (l, h) not in sliced:
            a, m = blk.attn, blk.mlp
            qkv_w = a.qkv.weight.view(3, H, d, C)[:, :h].reshape(3 * h * d, C).contiguous()
            qkv_b = None if a.qkv.bias is None else a.qkv.bias.view(3, H, d)[:, :h].reshape(-1).contiguous()
            sliced[(l, h)] = (qkv_w, qkv_b, a.proj.weight[:, : h * d].contiguous(), m.fc1.weight[:, : h * d].contiguous())
        return sliced[(l, h)]

    def block(step: tuple, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        l, n, h, attn_on, mlp_on = step
        if not (attn_on or mlp_on):
            return x
        B = x.shape[0]
        y = blk.norm1(x)
        gate(y[:, 1:])  # the patch gate's logits (its decisions are already in the schedule)
        xs = x[:, :n].contiguous()
        qkv_w, qkv_b, proj_w, fc1_w = weights(l, blk, h)
        cu = h * d
        if attn_on and h > 0:
            q, k, v = F.linear(y[:, :n], qkv_w, qkv_b).view(B, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, n, cu)
            xs = xs + F.linear(o, proj_w, blk.attn.proj.bias)
        if mlp_on:
            z = blk.norm2(xs)[..., :cu]
            xs = xs + blk.mlp.fc2(blk.mlp.act(F.linear(z, fc1_w, blk.mlp.fc1.bias)))
        return torch.cat([xs, x[:, n:]], 1)

    replay = _Replay(methods.build("deit", vit), block)
    for xb in _batches(inputs, batch):
        compact(xb)
        tr = methods.trace(compact)
        tokens = tr.tokens.float().mean(0)
        heads = tr.heads.float().mean(0)
        subs = tr.sublayers.float().mean(0)  # (depth, 2): share of samples running MSA / FFN
        replay.add(
            xb,
            [
                (l, max(1, round(float(tokens[l]))), round(float(heads[l])), bool(subs[l, 0] >= 0.5), bool(subs[l, 1] >= 0.5))
                for l in range(len(tokens))
            ],
        )
    return replay


@torch.no_grad()
def ats(vit: nn.Module, compact: nn.Module, inputs: torch.Tensor, batch: int) -> nn.Module:
    """ATS's kept work (the count of METHODS.md test 18): block l with the mean number of tokens
    entering it, n_in, and leaving it, n_out (``compact``'s trace on the same batch): LN1 and qkv on
    n_in rows, fused attention of the first n_out queries over all n_in keys, then proj, LN2 and
    the MLP on n_out rows; blocks that keep everything are timm's Block. Scoring and sampling are
    policy logic and are left out."""

    def block(step: tuple, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n_in, n_out = step
        x = x if n_in >= x.shape[1] else x[:, :n_in].contiguous()
        if n_out >= n_in:
            return blk(x)
        a = blk.attn
        B = x.shape[0]
        q, k, v = a.qkv(blk.norm1(x)).view(B, n_in, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q[:, :, :n_out], k, v).transpose(1, 2).reshape(B, n_out, -1)
        xs = x[:, :n_out] + blk.ls1(a.proj(o))
        return xs + blk.ls2(blk.mlp(blk.norm2(xs)))

    replay = _Replay(methods.build("deit", vit), block)
    for xb in _batches(inputs, batch):
        compact(xb)
        tr = methods.trace(compact)
        t_in, t_out = tr.tokens.float().mean(0), tr.extras["tokens_kept"].float().mean(0)
        replay.add(xb, [(max(1, round(float(i))), max(1, round(float(o)))) for i, o in zip(t_in, t_out)])
    return replay
