"""The execution layer for methods that drop attention heads per sample (AdaViT): timm
``Attention`` and ``Mlp`` on packed token rows with only the kept heads' weights.

Weights are sliced to the union of the heads the rows' samples keep, once per head set and
weight, never per sample (``sliced`` caches them at inference, keyed by the weight's storage and
version, so loading new weights invalidates the cache); where samples disagree, a per-row head
mask zeroes the rest. Each function also returns the MACs it executed, padding included, for the
method's ``padding_waste``. ``identity``: a dropped head passes its values through (the paper's
Eq. 8) instead of being zeroed, and the FFN reads every channel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Layout, packed_attention, packed_layout


def sliced(owner: nn.Module, w: torch.Tensor, heads: torch.Tensor | None, key: tuple | None, part: str, make) -> torch.Tensor:
    """``make()``: the rows / columns of the kept heads of weight ``w`` (a view of ``w`` when every
    head is kept). Without autograd the slice is cached per (weight, version, head set ``key``):
    weights are fixed at inference, so a repeated head set costs no copy (the slicing was about a
    tenth of DeiT-S's compact time at batch 1). One slice per head set and weight, never per
    sample; the cache is bounded and keyed by the weight's storage and version, so loading new
    weights or an in-place update invalidates it."""
    if heads is None or torch.is_grad_enabled() and w.requires_grad:
        return make()  # no heads dropped: a view, no copy
    cache = owner.__dict__.setdefault("_adavit_slices", {})
    full = (part, w.data_ptr(), w._version, w.dtype, w.device, key)
    hit = cache.get(full)
    if hit is None:
        if len(cache) >= 1024:
            cache.clear()
        hit = cache[full] = make()
    return hit

def head_union(owner: nn.Module, kept: list | None, H: int, device: torch.device) -> tuple[torch.Tensor | None, int, bool, tuple | None]:
    """From the rows' head decisions (lists of H bools; None: all heads): the heads kept by any
    row (None: all), how many, whether every row keeps exactly those, and the head set as a
    tuple (the slice-cache key)."""
    if kept is None:
        return None, H, True, None
    union = tuple(h for h in range(H) if any(r[h] for r in kept))
    uniform = all(sum(r) == len(union) for r in kept)  # each row's heads lie inside the union
    if len(union) == H:
        return None, H, uniform, None
    cache = owner.__dict__.setdefault("_adavit_head_sets", {})
    heads = cache.get((union, device))
    if heads is None:
        heads = cache[(union, device)] = torch.tensor(union, dtype=torch.int64, device=device)
    return heads, len(union), uniform, union

def attention_with_heads(owner: nn.Module, blk, yp, t, hk, union, identity: bool) -> tuple[torch.Tensor, int]:
    """MSA of packed token rows ``yp`` (S, C) of Bs samples with ``t`` (Bs,) rows each.
    qkv and proj run on the S rows, sliced to the union of the heads the samples keep; the
    attention matmuls run in ``methods.attention.packed_layout``'s layout (each sample padded
    to the longest with a key mask unless all counts are equal, length groups when the counts
    are very uneven, one block-diagonal product for few rows on CPU); ``union``: the
    ``head_union`` of the samples; ``hk`` (Bs, H) zeroes (or, identity_attn, passes V
    through for) the heads a sample dropped where the samples disagree."""
    attn = blk.attn
    S, C = yp.shape
    Bs = t.shape[0]
    H, d = attn.num_heads, attn.head_dim
    heads, nu, uniform, key = union
    cu = nu * d
    if not identity and nu == 0:  # every head dropped: q/k/v are zero, the MSA output is proj's bias
        out = yp.new_zeros(S, C)
        return (out + attn.proj.bias.to(out.dtype) if attn.proj.bias is not None else out), 0
    W, b = attn.qkv.weight, attn.qkv.bias
    parts = 2 if identity else 3  # identity_attn: V of every head comes from its own linear
    W = sliced(owner, W, heads, key, f"qkv_w{parts}", lambda: head_rows(W[: parts * C], heads, parts, H, d))
    b = None if b is None else sliced(owner, b, heads, key, f"qkv_b{parts}", lambda: head_rows(b[: parts * C], heads, parts, H, d))
    qkv = F.linear(yp, W, b)  # (S, parts * cu)
    v_all = F.linear(yp, attn.qkv.weight[2 * C :], None if attn.qkv.bias is None else attn.qkv.bias[2 * C :]) if identity else None
    hk_rows = None if uniform else hk.repeat_interleave(t, dim=0)  # (S, H)
    o = None
    pairs = 0  # query-key pairs the attention products compute (padding included)
    if nu > 0:
        qkv3 = torch.cat([qkv, head_cols(v_all, heads, H, d)], 1) if identity else qkv
        # the products run in methods.attention's layout: a padded (Bs, T) buffer with a key
        # mask, length groups, or one block-diagonal product; the padded MACs below count its pairs
        if Bs == 1:  # one sample: its rows are the buffer (no index tensors to build)
            lay = Layout(1, S)
        else:
            lay = packed_layout(torch.arange(Bs, device=yp.device).repeat_interleave(t), Bs)
        pairs = lay.pairs
        o = packed_attention(qkv3, lay, nu, d, attn.q_norm, attn.k_norm)
        if hk_rows is not None:
            hm = head_cols(hk_rows, heads, H, 1).repeat_interleave(d, dim=1)
            o = torch.where(hm, o, head_cols(v_all, heads, H, d)) if identity else o * hm.to(o.dtype)
    if identity:
        if o is not None:
            o = o.to(v_all.dtype)
            o = o if heads is None else v_all.view(S, H, d).index_copy(1, heads, o.view(S, nu, d)).view(S, C)
        else:
            o = v_all
        out = attn.proj_drop(attn.proj(o))
        return out, S * C * (2 * cu + C) + 2 * pairs * cu + S * C * C
    Wp = sliced(owner, attn.proj.weight, heads, key, "proj_w", lambda: head_cols(attn.proj.weight, heads, H, d))
    out = attn.proj_drop(F.linear(o, Wp, attn.proj.bias))
    return out, S * C * 3 * cu + 2 * pairs * cu + S * cu * C


def mlp_with_heads(owner: nn.Module, blk, xp, union, hk_rows, identity: bool) -> tuple[torch.Tensor, int]:
    """FFN on packed token rows ``xp`` (S, C). zero_channels: fc1 reads only the channels of
    the heads in ``union`` (``head_union`` of the rows' samples), and ``hk_rows`` (S, H) zeroes per row the
    heads a row's sample dropped when the rows disagree."""
    mlp = blk.mlp
    S, C = xp.shape
    H, d = blk.attn.num_heads, blk.attn.head_dim
    R = mlp.fc1.out_features
    heads, nu, _, key = union
    z = blk.norm2(xp)
    if identity:
        h, cu = mlp.fc1(z), C
    else:
        cu = nu * d
        if hk_rows is not None:
            z = z * hk_rows.to(z.dtype).repeat_interleave(d, dim=1)
        w1 = sliced(owner, mlp.fc1.weight, heads, key, "fc1_w", lambda: head_cols(mlp.fc1.weight, heads, H, d))
        h = F.linear(head_cols(z, heads, H, d), w1, mlp.fc1.bias)
    h = mlp.drop1(mlp.act(h))
    h = mlp.norm(h)
    out = mlp.drop2(mlp.fc2(h))
    return out, S * (5 * C + cu * R + R * C)


def head_rows(w: torch.Tensor, heads: torch.Tensor | None, parts: int, num_heads: int, d: int) -> torch.Tensor:
    """Rows of the given heads (None: all) of a (parts * H * d, ...) weight or bias, e.g. q, k, v
    of qkv; one index_select over the head axis (fast on the CPU, unlike row gathers)."""
    if heads is None:
        return w
    rest = w.shape[1:]
    return w.reshape(parts, num_heads, d, *rest).index_select(1, heads).reshape(-1, *rest)


def head_cols(w: torch.Tensor, heads: torch.Tensor | None, num_heads: int, d: int) -> torch.Tensor:
    """Columns (last axis, H * d wide) of the given heads (None: all)."""
    if heads is None:
        return w
    lead = w.shape[:-1]
    return w.reshape(*lead, num_heads, d).index_select(-2, heads).reshape(*lead, -1)
