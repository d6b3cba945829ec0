"""The attention product of the compact paths (ATS, A-ViT, AdaViT) on a (B, heads, L, d) buffer.

Compact execution leaves few tokens per sample in the later blocks, and batches pad them into a
short buffer with a key mask. On CPU, PyTorch's fused SDPA kernel (flash attention for CPU) pays a
fixed cost per call and per (sample, head) that dominates such short sequences: on 2 cores, at
batch 32 with 3 heads of 32 channels (the embedded default), SDPA took 180-300 us for L = 8-32 and
about 600 us at L = 40, where the explicit product q k^T, softmax, @ v (timm's unfused path) took
100-220 and 260-330 us; from L = 48 on the explicit product was the slower one (a different
batched-GEMM path, 1.3 ms), so the switch-over is conservative. Measured side by side by
``tools/attention_speed.py``. Longer sequences and every other device keep fused SDPA, which is
also what the dense timm model runs.

A restriction of SDPA's backends (``--attention flash`` etc., ``torch.nn.attention.sdpa_kernel``)
is honoured: the explicit product is the math backend's computation, so it is only used while
that backend is allowed. Its softmax pads a last dim shorter than 16 to 16 (``_softmax``): PyTorch's
CPU softmax takes a scalar path below 16 that was 10x slower than at 16.

Where the packed rows go (``packed_layout``): the rows themselves when every sample has the same
count; on CPU, for at most ``DIAGONAL_MAX_ROWS`` rows, one product over all rows with a
block-diagonal mask (at batch 32, 72-150 rows: 82-178 us against 198-371 us for the padded buffer,
whose scatter, mask and gather cost more than the product); otherwise a (batch, longest) buffer
with a key mask, cut into two length groups in one buffer when one long sample would pad all the
others (block 2 of the embedded default at batch 32: 0.65 ms against 1.17 ms).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EXPLICIT_MAX_LEN = 40  # longest key length that takes the explicit product on CPU


def use_explicit(q: torch.Tensor, length: int, dropout_p: float) -> bool:
    return (
        q.device.type == "cpu"
        and length <= EXPLICIT_MAX_LEN
        and dropout_p == 0.0
        and torch.backends.cuda.math_sdp_enabled()
    )


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, ...)`` with the same result, by
    the explicit product on CPU for short key sequences (see the module docstring).

    ``mask``: bool (True = attend) or additive, broadcastable to (B, heads, Lq, Lk). A query row
    whose keys are all masked (a padding row) gets finite values here, where fused SDPA may give
    NaN; callers drop those rows either way.
    """
    if not use_explicit(q, k.shape[-2], dropout_p):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * s) @ k.transpose(-2, -1)
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        else:
            logits = logits + mask.to(logits.dtype)
    return _softmax(logits) @ v


SOFTMAX_MIN_LEN = 16  # PyTorch's CPU softmax over a last dim shorter than this takes a scalar path


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.softmax(-1)``; on CPU a last dim of 2-15 is padded to 16 with -inf first.

    Measured on 2 cores (torch 2.15, (32, 3, L, L) fp32): softmax took 142 us at L = 13 and
    186 us at L = 15 but 18 us at L = 16, 10x less for more work; padded, L = 13 takes ~25 us.
    Small tensors (fewer than 256 rows) gain nothing and keep the plain call."""
    length = logits.shape[-1]
    if 1 < length < SOFTMAX_MIN_LEN and logits.device.type == "cpu" and logits.numel() >= 256 * length:
        padded = F.pad(logits, (0, SOFTMAX_MIN_LEN - length), value=float("-inf"))
        return padded.softmax(-1)[..., :length]
    return logits.softmax(-1)


# --------------------------------------------------------------------------------------------
# Packed rows and their attention layout


SPLIT_GAIN = 0.6  # split a batch into two length groups when that leaves at most this share of the slots^2
DIAGONAL_MAX_ROWS = 160  # on CPU, at most this many packed rows run one block-diagonal product


@dataclass
class Layout:
    """Where packed rows (one per active token, samples one after another, each sample's rows in
    order) sit in the (batch, length) buffer that the attention product runs in.

    ``flat``: (T,) slot of each row in the (batch * length) buffer, or None when the rows are the
    buffer (no padding); ``pad``: the other slots, given with ``flat``. ``mask``: (batch, 1, 1,
    length) key mask, True = real (or an additive bias); for the block-diagonal layout (batch 1,
    length = all rows) a (1, 1, T, T) same-sample mask. ``groups``: when the samples' row counts differ a lot, the buffer holds two length
    groups one after the other, each padded to its own length: a list of (first slot of the
    group, the group's layout over its part of the buffer); ``flat`` and ``pad`` then index the
    whole buffer (``batch`` and ``length`` keep the single buffer's shape)."""

    batch: int
    length: int
    flat: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    groups: list[tuple[int, "Layout"]] | None = None
    pad: torch.Tensor | None = None
    real: torch.Tensor | None = None  # (batch, length) bool, True on real slots (plain padded layouts)
    offsets: torch.Tensor | None = None  # (batch,) packed position of each sample's first row (idem)

    @property
    def slots(self) -> int:
        """Buffer slots the attention product runs over (padding included)."""
        if self.groups:
            return sum(g.slots for _, g in self.groups)
        return self.batch * self.length

    @property
    def pairs(self) -> int:
        """Query-key pairs the attention product computes (padding and other samples' keys included)."""
        if self.groups:
            return sum(g.pairs for _, g in self.groups)
        return self.batch * self.length * self.length


def packed_layout(sample: torch.Tensor, batch: int, split: bool = True, diagonal: bool = True) -> Layout:
    """Layout of packed rows whose sample ids ``sample`` (T,) are sorted ascending.

    Sample b's j-th row goes to slot b * length + j: in row-major order these are exactly the True
    entries of the (batch, length) key mask, so one ``nonzero`` gives every row's slot.

    With ``diagonal``, on CPU, when there are at most ``DIAGONAL_MAX_ROWS`` rows in all, the
    product runs once over all rows with a block-diagonal (same-sample) mask instead: no scatter
    into a padded buffer and no gather back, which is what such small products cost (see the
    module docstring); no token slot is padding, but T^2 query-key pairs are computed where the
    padded buffer computes batch * length^2 (both against sum over samples of n^2).

    With ``split``, when the counts are so uneven that the padded product would be mostly padding,
    the samples are cut into two length groups, the longest few and the rest (the cut that
    minimises sum over groups of samples * length^2, used if it keeps at most ``SPLIT_GAIN`` of
    the single buffer's): one long sample no longer pads every other one to its length.
    """
    rows = sample.shape[0]
    counts = torch.bincount(sample, minlength=batch)
    length = int(counts.max())
    if rows == batch * length:  # every sample has the same count: the rows are the buffer
        return Layout(batch, length)
    if diagonal and sample.device.type == "cpu" and rows <= DIAGONAL_MAX_ROWS:
        return Layout(1, rows, None, (sample.unsqueeze(1) == sample.unsqueeze(0)).view(1, 1, rows, rows))
    if split and batch > 1:
        grouped = _length_groups(sample, counts, batch, length)
        if grouped is not None:
            return grouped
    real = torch.arange(length, device=sample.device) < counts.unsqueeze(1)
    slots = real.view(-1)
    return Layout(batch, length, slots.nonzero().squeeze(1), real[:, None, None, :], pad=(~slots).nonzero().squeeze(1))


def _length_groups(sample: torch.Tensor, counts: torch.Tensor, batch: int, length: int) -> Layout | None:
    """Two length groups in one buffer: the longest samples (padded to ``length``) in the first
    slots, the others (padded to the cut length) after them; each row's slot in ``flat``."""
    per_sample = counts.tolist()  # Python over <= batch counts: cheaper than a dozen tiny tensor ops
    ordered = sorted(per_sample, reverse=True)
    best, cut = batch * length * length * SPLIT_GAIN, 0
    for s in range(1, batch):
        if ordered[s] == 0:
            break
        cost = s * length * length + (batch - s) * ordered[s] ** 2
        if cost < best:
            best, cut = cost, s
    if cut == 0:
        return None
    short = ordered[cut]  # samples longer than this form the long group (ties go to the short one)
    long_counts = [c for c in per_sample if c > short]
    short_counts = [c for c in per_sample if 0 < c <= short]
    n_long = len(long_counts)
    base, start, i_long, i_short = [], 0, 0, 0
    for c in per_sample:  # slot of each sample's first row, minus the index of its first packed row
        if c > short:
            base.append(i_long * length - start)
            i_long += 1
        else:
            base.append(n_long * length + i_short * short - start)
            i_short += c > 0
        start += c
    dev = sample.device
    flat = torch.tensor(base, device=dev).index_select(0, sample) + torch.arange(sample.shape[0], device=dev)
    groups = []
    offset = 0
    for n, size, group_counts in ((n_long, length, long_counts), (len(short_counts), short, short_counts)):
        real = torch.arange(size, device=dev) < torch.tensor(group_counts, device=dev).unsqueeze(1)
        groups.append((offset, Layout(n, size, mask=None if min(group_counts) == size else real[:, None, None, :])))
        offset += n * size
    free = torch.ones(offset, dtype=torch.bool, device=dev).index_fill_(0, flat, False)
    return Layout(batch, length, flat, groups=groups, pad=free.nonzero().squeeze(1))


def packed_attention(
    qkv: torch.Tensor, lay: Layout, num_heads: int, head_dim: int, q_norm=None, k_norm=None, dropout_p: float = 0.0, product=None
) -> torch.Tensor:
    """softmax(q k^T / sqrt d) v per sample for packed rows: ``qkv`` (T, 3 * heads * d) as timm's
    fused qkv projection gives it; returns (T, heads * d). Products run in ``lay``'s buffer: the
    rows scattered into it (padding slots zeroed), one product per length group, rows gathered back.
    ``product(q, k, v, layout)`` (normed q, k) replaces the masked softmax attention if given."""
    if lay.flat is not None:  # only the padding slots need zeroing (finite keys and values)
        buf = qkv.new_empty(lay.slots, qkv.shape[-1]).index_copy_(0, lay.flat, qkv)
        qkv = buf.index_fill_(0, lay.pad, 0.0)
    if lay.groups:
        o = qkv.new_empty(lay.slots, num_heads * head_dim)
        for offset, sub in lay.groups:
            part = slice(offset, offset + sub.slots)
            o[part].view(sub.batch, sub.length, num_heads, head_dim).copy_(
                _attend(qkv[part], sub, num_heads, head_dim, q_norm, k_norm, dropout_p, product).transpose(1, 2)
            )
    else:
        o = _attend(qkv, lay, num_heads, head_dim, q_norm, k_norm, dropout_p, product)
        o = o.transpose(1, 2).reshape(lay.slots, num_heads * head_dim)
    return o if lay.flat is None else o.index_select(0, lay.flat)


def _attend(qkv: torch.Tensor, lay: Layout, num_heads: int, head_dim: int, q_norm, k_norm, dropout_p: float, product=None) -> torch.Tensor:
    """The product over a (batch * length, 3 * heads * d) buffer: (batch, heads, length, d)."""
    q, k, v = qkv.view(lay.batch, lay.length, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    if product is not None:
        return product(q, k, v, lay)
    mask = lay.mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return sdpa(q, k, v, mask, dropout_p)
