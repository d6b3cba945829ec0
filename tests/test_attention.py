"""The compact paths' attention: the explicit product for short keys on CPU, packed layouts with
length groups, and the attention over packed rows against plain per-sample attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from methods import attention


def _qkv(b=4, h=3, length=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("length", [5, attention.EXPLICIT_MAX_LEN])
def test_explicit_product_equals_fused_sdpa(length):
    q, k, v = _qkv(length=length)
    mask = torch.rand(4, 1, 1, length, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    assert attention.use_explicit(q, length, 0.0)
    for m in (None, mask, torch.where(mask, 0.0, -1000.0)):
        out = attention.sdpa(q, k, v, m)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        assert (out - ref).abs().max() < 1e-5
    scaled = attention.sdpa(q, k, v, mask, scale=0.3)
    assert (scaled - F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)).abs().max() < 1e-5


def test_explicit_product_only_where_chosen():
    q, _, _ = _qkv()
    assert not attention.use_explicit(q, attention.EXPLICIT_MAX_LEN + 1, 0.0)  # long keys: fused SDPA
    assert not attention.use_explicit(q, 8, 0.1)  # dropout: fused SDPA
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # --attention flash: the math path is not allowed
        assert not attention.use_explicit(q, 8, 0.0)
    with sdpa_kernel([SDPBackend.MATH]):
        assert attention.use_explicit(q, 8, 0.0)


def test_a_fully_masked_padding_row_stays_finite():
    q, k, v = _qkv(b=2)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[1] = False  # sample 1 has no real key (all padding)
    assert torch.isfinite(attention.sdpa(q, k, v, mask)).all()


def _rows_of(counts, c=6, seed=0):
    sample = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return sample, torch.randn(len(sample), c, generator=torch.Generator().manual_seed(seed))


def _per_sample(qkv, sample, heads, d):
    outs = []
    for b in sample.unique():
        rows = qkv[sample == b]
        q, k, v = rows.view(1, -1, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        outs.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, heads * d))
    return torch.cat(outs)


@pytest.mark.parametrize(
    "counts, grouped",
    [
        ([5, 5, 5], False),  # equal counts: the rows are the buffer
        ([7, 3, 5, 6], False),  # mildly uneven: one padded buffer
        ([52, 3, 4, 8, 2, 7, 5, 6], True),  # one long sample: two length groups
        ([30, 0, 2, 28, 1, 0, 3, 2], True),  # samples without rows, ties at the cut
    ],
)
def test_packed_attention_equals_per_sample_attention(counts, grouped):
    heads, d = 2, 4
    sample, qkv = _rows_of(counts, 3 * heads * d)
    lay = attention.packed_layout(sample, len(counts), diagonal=False)
    assert bool(lay.groups) == grouped
    out = attention.packed_attention(qkv, lay, heads, d)
    assert out.shape == (len(sample), heads * d)
    assert (out - _per_sample(qkv, sample, heads, d)).abs().max() < 1e-5
    longest = max(counts)
    assert len(sample) <= lay.slots <= len(counts) * longest
    if lay.flat is not None:  # the buffer is allocated empty: rows and zeroed padding cover every slot once
        assert torch.equal(torch.cat([lay.flat, lay.pad]).sort().values, torch.arange(lay.slots))
    if grouped:  # back to back in one buffer, each group padded to its own length, less than one buffer
        (first, long), (second, short) = lay.groups
        assert first == 0 and second == long.slots and lay.slots == long.slots + short.slots
        assert long.length == longest and short.length < longest
        assert long.batch + short.batch == sum(c > 0 for c in counts)  # samples without rows get no slots
        assert lay.slots < len(counts) * longest


@pytest.mark.parametrize("counts", [[7, 3, 5, 6], [52, 3, 4, 8, 2, 7, 5, 6], [30, 0, 2, 28, 1, 0, 3, 2]])
def test_block_diagonal_layout_equals_per_sample_attention(counts):
    heads, d = 2, 4
    sample, qkv = _rows_of(counts, 3 * heads * d)
    lay = attention.packed_layout(sample, len(counts))  # few rows on CPU: one block-diagonal product
    rows = len(sample)
    assert (lay.batch, lay.length, lay.flat, lay.groups) == (1, rows, None, None)
    assert lay.slots == rows and lay.pairs == rows * rows  # no padded slot, but every pair computed
    assert torch.equal(lay.mask[0, 0], sample[:, None] == sample[None, :])
    out = attention.packed_attention(qkv, lay, heads, d)
    assert (out - _per_sample(qkv, sample, heads, d)).abs().max() < 1e-5


def test_block_diagonal_layout_only_for_few_rows(monkeypatch):
    sample, _ = _rows_of([9, 4, 6])
    assert attention.packed_layout(sample, 3).mask.shape == (1, 1, 19, 19)
    monkeypatch.setattr(attention, "DIAGONAL_MAX_ROWS", 18)
    lay = attention.packed_layout(sample, 3)
    assert (lay.batch, lay.length) == (3, 9) and lay.mask.shape == (3, 1, 1, 9)
    one, _ = _rows_of([19])
    assert attention.packed_layout(one, 1).batch == 1 and attention.packed_layout(one, 1).mask is None


@pytest.mark.parametrize("length", [2, 5, 13, 15, 16, 17])
def test_short_softmax_equals_torch_softmax(length):
    g = torch.Generator().manual_seed(length)
    logits = torch.randn(32, 3, 16, length, generator=g) * 4  # 1536 rows: enough for the padded path
    logits[..., -1] = torch.finfo(logits.dtype).min  # a masked key, as the explicit product writes it
    padded_path = 1 < length < attention.SOFTMAX_MIN_LEN
    out = attention._softmax(logits)
    assert out.shape == logits.shape
    assert (out - logits.softmax(-1)).abs().max() < 1e-6
    assert (out[..., -1] == 0).all() and torch.allclose(out.sum(-1), torch.ones(()))
    if padded_path:  # the slice of a 16-wide buffer, not a fresh softmax of the same shape
        assert out.stride(-2) == attention.SOFTMAX_MIN_LEN
