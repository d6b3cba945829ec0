"""AdaViT (Meng et al., CVPR 2022, arXiv 2111.15668): learned patch, head and block policies.

Method id ``adavit`` (docs/design.md#method-ids; not to be confused with A-ViT, docs/design.md#method-ids).
Everything below follows docs/methods/adavit.md#overview (the official code MengLcool/AdaViT @ 9857f92).

Decision network (docs/methods/adavit.md#decision-network), one small set of gates per block, stored beside the timm weights as
``adavit_gates.{block}.{patch,head,block}.{weight,bias}``:
  - ``head``  Linear(C -> H) on the CLS vector of the block input (no LayerNorm), blocks 1.. only;
  - ``block`` Linear(C -> 2) on the same vector (entry 0 gates the MSA, entry 1 the FFN), blocks 1..;
  - ``patch`` Linear(C -> 1) per patch token on LN1(x), the attention input, every block; prefix
    (CLS) tokens are always kept.
Training binarises with a Gumbel-sigmoid (logit plus the difference of two Gumbel(0, 1) draws, over
tau = 5, then a sigmoid) and straight-through hard thresholds; evaluation uses the plain sigmoid and
the thresholds 0.5 (heads, blocks) and 0.6 (patches). The official code applies the same thresholds
to the noisy training sigmoid, so with tau = 5 a patch is kept in training iff logit + noise > 2.03
but at evaluation iff logit > 0.41; we keep that, it is the official behaviour.

Gates are initialised with zero weights and bias +3, so a freshly built model keeps every patch,
head and sub-layer at evaluation and equals the dense backbone. A plain timm state dict therefore
serves as is: build from the loaded timm model (the usual route), or load it with
``strict=False`` and check that only ``adavit_gates.*`` keys are missing
(:func:`load_backbone_state_dict` does exactly that).

Two execution modes (docs/design.md#two-execution-modes):
  - ``reference``: the official masking semantics (docs/methods/adavit.md#official-masking-semantics): dropped pairs (i, j) get -inf
    attention logits except the diagonal, MSA and FFN outputs of dropped tokens are multiplied by 0,
    sub-layer outputs by their gate; head dropping either zeroes the q/k/v channels of the dropped
    heads and the same channel indices at the FFN input (``head_variant="zero_channels"``, the
    default and the README's evaluation) or replaces the head's attention map by the identity
    (``"identity_attn"``, ``--ada-head-attn``, the paper's Eq. 8). Everything is computed densely.
  - ``compact`` (default): the same predictions with the work removed. A block whose two sub-layers
    are both off is skipped (not even LN1 or the patch gate run); dropped patches are taken out of
    the block's computation and carried through unchanged; dropped heads are sliced out of the qkv
    rows and the proj / fc1 input columns (one weight slice per block and batch, never per-sample
    weight copies). Batches: the kept tokens of all samples are packed into one (S, C) matrix with
    no padding, and every token-wise layer (qkv, proj, LN2, FFN) runs on the rows of the samples
    whose sub-layer is on; only the attention matmuls pad each sample to the batch's largest
    kept-token count, with a key-padding mask (``methods.attention.packed_layout``: two length
    groups when the counts are very uneven, one block-diagonal product for few rows on CPU). Heads are sliced to the union of the heads the
    samples keep, and a per-row 0/1 head mask zeroes the rest where samples disagree. The share of
    executed MSA / FFN MACs spent on such padding (or on other samples' keys) is ``trace.padding_waste`` (0 at batch 1, where
    everything is sliced exactly).
Training always runs the ``reference`` path (the masks carry the straight-through gradients).

Trace (``methods.trace(model)``): ``tokens`` (B, depth) tokens each block computed on (CLS plus
kept patches; 0 where both sub-layers were skipped), ``heads`` (B, depth) kept heads, ``sublayers``
(B, depth, 2) executed MSA / FFN, ``patch_keep`` (B, depth, N) the kept-token masks, ``gmacs`` by the
closed form of docs/methods/adavit.md#the-shipped-lookup-table (:func:`official_block_macs`: LayerNorms on all N tokens, head dropping
shrinks qkv, proj and the FFN input) plus patch embedding, final norm and head plus the decision
network's own MACs, which are also reported alone as ``policy_gmacs``; ``gmacs_executed`` is what
``compact`` physically computes per sample (proj has C outputs, LN2 runs on kept tokens only, LN1
on all N tokens because the patch gate needs it), for comparison with the official counting.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Layout, packed_attention, packed_layout
from .base import TracedViT, adapt
from .registry import Knob, MethodSpec, TrainData, register
from .training import Recipe, fit, timed, validate

HEAD_VARIANTS = ("zero_channels", "identity_attn")
TAU = 5.0  # official: the tau flags are parsed but never reach the blocks (docs/methods/adavit.md#binarisation)
TRAIN_THRESHOLDS = {"patch": 0.6, "head": 0.5, "block": 0.5}  # the official thresholds, used in training
GATE_INIT_BIAS = 3.0  # sigmoid(3) = 0.95 > every threshold: a fresh model keeps everything
GATE_PREFIX = "adavit_gates."


# ----------------------------------------------------------------------------------------------
# closed forms (docs/methods/adavit.md#the-shipped-lookup-table)


def official_block_macs(embed_dim: int, num_heads: int, mlp_hidden: int, num_tokens_total: int, heads, tokens, attn, mlp):
    """One block's MACs as AdaViT's shipped lookup table counts them (docs/methods/adavit.md#the-shipped-lookup-table):

        T = 5*N*C*(1 + a) + a*(3*t*C*c + 2*t^2*c + t*c^2) + m*(t*c*rC + t*rC*C),   c = C*h/H

    with N the model's full token count (LayerNorms are counted on all tokens), t the kept tokens
    including CLS, h the kept heads, a / m the MSA / FFN on-off; an entry with h = 0 is 0. Works
    on ints or tensors (element-wise); the h = 0 rule needs tensors or ints alike.
    """
    c_full, rc = embed_dim, mlp_hidden
    c = c_full * heads / num_heads
    t = tokens
    total = (
        5 * num_tokens_total * c_full * (1 + attn)
        + attn * (3 * t * c_full * c + 2 * t * t * c + t * c * c)
        + mlp * (t * c * rc + t * rc * c_full)
    )
    if isinstance(total, torch.Tensor):
        return torch.where(torch.as_tensor(heads) == 0, torch.zeros_like(total), total)
    return 0 if heads == 0 else total


def official_table_tokens(t: int, num_tokens_total: int = 197) -> int:
    """The token count the shipped table's entry t was really built with: the script keeps
    int(float32(t / N) * N) tokens, which is t - 1 for t in {13, 26, 51, 52, 53, 102, 104, 106,
    117, 119, 121} at N = 197 (docs/methods/adavit.md#the-shipped-lookup-table, docs/methods/adavit.md#check-adavit-4-lookup-table-closed-form)."""
    ratio = torch.tensor(t / num_tokens_total, dtype=torch.float32)
    return int(ratio * num_tokens_total)


def official_table_entry(embed_dim: int, num_heads: int, mlp_hidden: int, num_tokens_total: int, heads: int, tokens: int, attn: int, mlp: int) -> float:
    """Entry T[h, t, a, m] of the shipped ``*_flops_dict.pth`` tables in G, truncation included."""
    t = official_table_tokens(tokens, num_tokens_total)
    return official_block_macs(embed_dim, num_heads, mlp_hidden, num_tokens_total, heads, t, attn, mlp) / 1e9


# ----------------------------------------------------------------------------------------------
# the decision network


class AdaGates(nn.Module):
    """The decision network of one block (docs/methods/adavit.md#decision-network): single linear layers, no hidden layer."""

    def __init__(self, dim: int, num_heads: int, head_and_block: bool):
        super().__init__()
        self.patch = nn.Linear(dim, 1)
        self.head = nn.Linear(dim, num_heads) if head_and_block else None
        self.block = nn.Linear(dim, 2) if head_and_block else None
        for lin in (self.patch, self.head, self.block):
            if lin is not None:
                nn.init.zeros_(lin.weight)
                nn.init.constant_(lin.bias, GATE_INIT_BIAS)


def gumbel_sigmoid_st(logits: torch.Tensor, threshold: float, tau: float = TAU) -> torch.Tensor:
    """Training binarisation (docs/methods/adavit.md#binarisation): hard 0/1 forward, gradient of the noisy sigmoid."""
    e1 = torch.empty_like(logits).exponential_()
    e2 = torch.empty_like(logits).exponential_()
    soft = ((logits - e1.log() + e2.log()) / tau).sigmoid()  # -log(E) ~ Gumbel(0, 1)
    hard = (soft > threshold).to(soft.dtype)
    return hard - soft.detach() + soft


def _eval_decision(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    return logits.float().sigmoid() > threshold


# ----------------------------------------------------------------------------------------------
# the model


class AdaViT(TracedViT):
    """timm VisionTransformer + per-block AdaViT gates; ``forward`` returns plain logits."""

    bench_method = "adavit"

    # -- setup --------------------------------------------------------------------------------

    def _adavit_check(self) -> None:
        if getattr(self, "cls_token", None) is None or self.num_prefix_tokens != 1:
            # the head and block gates read the CLS token of each block input (docs/methods/adavit.md#decision-network); on a
            # model without one (VideoMAE: mean pooling) x[:, 0] would be a patch token
            raise TypeError(
                "AdaViT's head and block gates read the CLS token (docs/methods/adavit.md#decision-network); this model has "
                f"{self.num_prefix_tokens} prefix token(s): use a backbone with a class token"
            )
        for i, blk in enumerate(self.blocks):
            attn = blk.attn
            for name in ("qkv", "proj", "q_norm", "k_norm", "norm"):
                if not hasattr(attn, name):
                    raise TypeError(f"block {i}: AdaViT needs timm's Attention (qkv/proj); got {type(attn).__name__}")
            if attn.qkv.out_features != 3 * self.embed_dim:
                raise TypeError("AdaViT shares head channel indices with the residual stream: attention width must equal embed_dim")
            if not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None:
                raise TypeError("AdaViT supports timm Attention without scale_norm or output gating")
            if not hasattr(blk.mlp, "fc1") or not hasattr(blk.mlp, "fc2"):
                raise TypeError(f"block {i}: AdaViT needs a timm Mlp (fc1/fc2)")

    @property
    def _thresholds(self) -> dict[str, float]:
        k = self.bench_knobs
        return {"patch": k["patch_threshold"], "head": k["head_threshold"], "block": k["block_threshold"]}

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = self.embed_tokens(x)
        B, N, _ = x.shape
        depth = len(self.blocks)
        H = self.blocks[0].attn.num_heads
        dev = x.device
        rec = {
            "tokens": torch.zeros(B, depth, dtype=torch.int64, device=dev),
            "heads": torch.full((B, depth), H, dtype=torch.int64, device=dev),
            "sublayers": torch.ones(B, depth, 2, dtype=torch.bool, device=dev),
            "patch_keep": torch.zeros(B, depth, N, dtype=torch.bool, device=dev),
            "padded_macs": 0,  # MSA / FFN MACs the compact calls executed, padding included
        }
        if self.training or self.bench_mode == "reference":
            policy: dict[str, list] = {"heads": [], "sublayers": [], "patches": []}
            for i, (blk, gates) in enumerate(zip(self.blocks, self.adavit_gates)):
                x = self._masked_block(i, blk, gates, x, rec, policy)
            self.__dict__["_adavit_policy"] = policy
        else:
            for i, (blk, gates) in enumerate(zip(self.blocks, self.adavit_gates)):
                x = self._compact_block(i, blk, gates, x, rec)
        x = self.norm(x)
        logits = self.forward_head(x)
        self._record_adavit(rec, N)
        return logits

    def _record_adavit(self, rec: dict, n_total: int) -> None:
        shape = self.bench_shape
        C, H, R = shape.embed_dim, shape.num_heads, shape.mlp_hidden
        tokens = rec["tokens"].to(torch.float64)
        heads = rec["heads"].to(torch.float64)
        sub = rec["sublayers"].to(torch.float64)
        a, m = sub[..., 0], sub[..., 1]
        active = ((a + m) > 0).to(torch.float64)
        identity = self.bench_knobs["head_variant"] == "identity_attn"
        c = C * heads / H
        # the decision network: head and block gates on CLS (blocks 1..), patch gate on every patch
        # token of blocks that run (compact skips it where both sub-layers are off)
        has_hb = torch.tensor([g.head is not None for g in self.adavit_gates], dtype=torch.float64, device=tokens.device)
        policy = has_hb * (C * H + C * 2) + active * (shape.num_patches * C)
        # what compact really executes per sample (no padding)
        qkv_out = (2 * c + C) if identity else 3 * c
        proj_in = C if identity else c
        fc1_in = C if identity else c
        executed = (
            active * 5 * n_total * C
            + a * (tokens * C * qkv_out + 2 * tokens * tokens * c + tokens * proj_in * C)
            + m * (5 * tokens * C + tokens * fc1_in * R + tokens * R * C)
        )
        if identity:  # no official table for this variant: count what runs, LayerNorms as the table does
            blocks = 5 * n_total * C * (1 + a) + a * (tokens * C * (2 * c + C) + 2 * tokens * tokens * c + tokens * C * C) + m * (
                2 * tokens * R * C
            )
        else:
            blocks = official_block_macs(C, H, R, n_total, heads, tokens, a, m)
        base = shape.embed_macs + shape.final(n_total)
        policy_g = policy.sum(1) / 1e9
        gmacs = (base + blocks.sum(1)) / 1e9 + policy_g
        executed_g = (base + executed.sum(1)) / 1e9 + policy_g
        # padding waste: executed MSA / FFN MACs of the padded compact calls against the per-sample
        # work they had to do (everything in ``executed`` except LN1, which runs unpadded)
        run = rec["padded_macs"]
        useful = float((executed - active * 5 * n_total * C).sum())
        waste = 0.0 if run <= 0 else max(0.0, 1.0 - useful / run)
        self.record(
            rec["tokens"],
            gmacs=gmacs,
            heads=rec["heads"],
            sublayers=rec["sublayers"],
            patch_keep=rec["patch_keep"],
            policy_gmacs=policy_g,
            gmacs_executed=executed_g,
            padding_waste=waste,
        )

    # -- reference: the official masking semantics (docs/methods/adavit.md#official-masking-semantics) ----------------------------

    def _gate(self, logits: torch.Tensor, kind: str) -> torch.Tensor:
        if self.training:
            return gumbel_sigmoid_st(logits.float(), TRAIN_THRESHOLDS[kind])
        return _eval_decision(logits, self._thresholds[kind]).to(torch.float32)

    def _masked_block(self, i: int, blk: nn.Module, gates: AdaGates, x: torch.Tensor, rec: dict, policy: dict) -> torch.Tensor:
        B, N, C = x.shape
        attn = blk.attn
        H, d = attn.num_heads, attn.head_dim
        P = self.num_prefix_tokens
        identity = self.bench_knobs["head_variant"] == "identity_attn"
        cls = x[:, 0]
        if gates.head is not None:
            hm = self._gate(gates.head(cls), "head")  # (B, H)
            sm = self._gate(gates.block(cls), "block")  # (B, 2)
            policy["heads"].append(hm)
            policy["sublayers"].append(sm)
        else:
            hm = sm = None
        y = blk.norm1(x)
        pm = self._gate(gates.patch(y[:, P:]).squeeze(-1), "patch")  # (B, N - P)
        pm = torch.cat([pm.new_ones(B, P), pm], dim=1)  # (B, N)
        policy["patches"].append(pm)
        keep = pm.detach() > 0.5
        # --- MSA: pairs with a dropped end are masked except the diagonal (detached policy)
        allowed = (keep[:, :, None] & keep[:, None, :]) | torch.eye(N, dtype=torch.bool, device=x.device)
        qkv = attn.qkv(y).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        h4 = None
        if hm is not None:
            h4 = hm.to(q.dtype)[:, :, None, None]
            if not identity:  # q/k/v output channels of dropped heads zeroed (weights and bias)
                q, k, v = q * h4, k * h4, v * h4
        q, k = attn.q_norm(q), attn.k_norm(k)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[:, None], dropout_p=attn.attn_drop.p if self.training else 0.0
        )
        if h4 is not None:
            o = o * h4 + (v * (1 - h4) if identity else 0)  # zero_channels: proj input channels masked too
        o = o.transpose(1, 2).reshape(B, N, C)
        o = attn.proj_drop(attn.proj(attn.norm(o)))
        o = o * pm.to(o.dtype)[..., None]
        if sm is not None:
            o = o * sm[:, 0].to(o.dtype)[:, None, None]
        x = x + blk.drop_path1(blk.ls1(o))
        # --- FFN: the head mask also zeroes the same channel indices at the FFN input
        z = blk.norm2(x)
        if hm is not None and not identity:
            z = z * hm.to(z.dtype).repeat_interleave(d, dim=1)[:, None, :]
        f = blk.mlp(z)
        f = f * pm.to(f.dtype)[..., None]
        if sm is not None:
            f = f * sm[:, 1].to(f.dtype)[:, None, None]
        x = x + blk.drop_path2(blk.ls2(f))
        # --- trace (hard decisions)
        with torch.no_grad():
            sub = torch.ones(B, 2, dtype=torch.bool, device=x.device) if sm is None else sm.detach() > 0.5
            active = sub.any(1)
            rec["sublayers"][:, i] = sub
            if hm is not None:
                rec["heads"][:, i] = (hm.detach() > 0.5).sum(1)
            rec["patch_keep"][:, i] = keep & active[:, None]
            rec["tokens"][:, i] = torch.where(active, keep.sum(1), 0)
        return x

    # -- compact: the work really removed ------------------------------------------------------

    def _compact_block(self, i: int, blk: nn.Module, gates: AdaGates, x: torch.Tensor, rec: dict) -> torch.Tensor:
        B, N, C = x.shape
        P = self.num_prefix_tokens
        H = blk.attn.num_heads
        thr = self._thresholds
        ia = None  # rows of the batch with at least one sub-layer on (None: all)
        hk = None
        dec = None  # per row: [attention on, FFN on, head 0 kept, ...], read to the host once per block
        if gates.head is not None:
            cls = x[:, 0]
            hk = _eval_decision(gates.head(cls), thr["head"])  # (B, H) bool
            sk = _eval_decision(gates.block(cls), thr["block"])  # (B, 2) bool
            rec["heads"][:, i] = hk.sum(1)
            rec["sublayers"][:, i] = sk
            dec = torch.cat([sk, hk], 1).tolist()
            on = [r for r, d in enumerate(dec) if d[0] or d[1]]
            if not on:
                return x  # the whole block skipped: no LN1, no patch gate
            if len(on) < B:
                dec = [dec[r] for r in on]
                ia = torch.tensor(on, device=x.device)
                hk = hk.index_select(0, ia)
        xa = x if ia is None else x.index_select(0, ia)
        Ba = xa.shape[0]
        y = blk.norm1(xa)
        keep = _eval_decision(gates.patch(y[:, P:]).squeeze(-1), thr["patch"])
        keep = torch.cat([keep.new_ones(Ba, P), keep], dim=1)  # (Ba, N)
        t = keep.sum(1)
        if ia is None:
            rec["patch_keep"][:, i] = keep
            rec["tokens"][:, i] = t
        else:
            rec["patch_keep"][ia, i] = keep
            rec["tokens"][ia, i] = t
        # kept tokens of every row, packed without padding (sample-major, token order kept):
        # the token-wise layers (qkv, proj, LN2, FFN) run on exactly these rows; only the
        # attention matmuls see a padded layout (in _compact_attention)
        flat = keep.reshape(-1).nonzero().squeeze(1)
        if flat.shape[0] == Ba * N:
            flat = None
            xp, yp = xa.reshape(Ba * N, C), y.reshape(Ba * N, C)
        else:
            xp = xa.reshape(Ba * N, C).index_select(0, flat)
            yp = y.reshape(Ba * N, C).index_select(0, flat)
        identity = self.bench_knobs["head_variant"] == "identity_attn"
        # MSA on the rows whose attention is on, then the FFN on the rows whose FFN is on
        for part in (0, 1):
            rows = None if dec is None else [r for r, d in enumerate(dec) if d[part]]
            if rows is not None and not rows:
                continue
            if rows is not None and len(rows) == Ba:
                rows = None
            sel = None if rows is None else torch.tensor(rows, device=x.device)
            flags = None if sel is None else torch.tensor([d[part] for d in dec], dtype=torch.bool, device=x.device)
            prow = None if sel is None else flags.repeat_interleave(t).nonzero().squeeze(1)
            union = self._head_union(None if dec is None else [dec[r][2:] for r in (rows or range(Ba))], H, x.device)
            hk_p = hk if (hk is None or sel is None) else hk.index_select(0, sel)
            t_p = t if sel is None else t.index_select(0, sel)
            src = yp if part == 0 else xp  # attention reads LN1's output, the FFN the residual stream
            xin = src if prow is None else src.index_select(0, prow)
            if part == 0:
                out = blk.ls1(self._compact_attention(blk, xin, t_p, hk_p, union, rec)).to(xp.dtype)
            else:
                uniform = union[2]
                hk_rows = None if uniform or identity else hk_p.repeat_interleave(t_p, dim=0)
                out = blk.ls2(self._compact_mlp(blk, xin, union, hk_rows, rec)).to(xp.dtype)
            xp = xp + out if prow is None else xp.index_add(0, prow, out)
        # carry the dropped tokens through unchanged
        if flat is None:
            xa = xp.reshape(Ba, N, C)
        else:
            xa = xa.reshape(Ba * N, C).index_copy(0, flat, xp).reshape(Ba, N, C)
        return xa if ia is None else x.index_copy(0, ia, xa)

    def _sliced(self, w: torch.Tensor, heads: torch.Tensor | None, key: tuple | None, part: str, make) -> torch.Tensor:
        """``make()``: the rows / columns of the kept heads of weight ``w`` (a view of ``w`` when every
        head is kept). Without autograd the slice is cached per (weight, version, head set ``key``):
        weights are fixed at inference, so a repeated head set costs no copy (the slicing was about a
        tenth of DeiT-S's compact time at batch 1). One slice per head set and weight, never per
        sample; the cache is bounded and keyed by the weight's storage and version, so loading new
        weights or an in-place update invalidates it."""
        if heads is None or torch.is_grad_enabled() and w.requires_grad:
            return make()  # no heads dropped: a view, no copy
        cache = self.__dict__.setdefault("_adavit_slices", {})
        full = (part, w.data_ptr(), w._version, w.dtype, w.device, key)
        hit = cache.get(full)
        if hit is None:
            if len(cache) >= 1024:
                cache.clear()
            hit = cache[full] = make()
        return hit

    def _head_union(self, kept: list | None, H: int, device: torch.device) -> tuple[torch.Tensor | None, int, bool, tuple | None]:
        """From the rows' head decisions (lists of H bools; None: all heads): the heads kept by any
        row (None: all), how many, whether every row keeps exactly those, and the head set as a
        tuple (the slice-cache key)."""
        if kept is None:
            return None, H, True, None
        union = tuple(h for h in range(H) if any(r[h] for r in kept))
        uniform = all(sum(r) == len(union) for r in kept)  # each row's heads lie inside the union
        if len(union) == H:
            return None, H, uniform, None
        cache = self.__dict__.setdefault("_adavit_head_sets", {})
        heads = cache.get((union, device))
        if heads is None:
            heads = cache[(union, device)] = torch.tensor(union, dtype=torch.int64, device=device)
        return heads, len(union), uniform, union

    def _compact_attention(self, blk, yp, t, hk, union, rec) -> torch.Tensor:
        """MSA of packed token rows ``yp`` (S, C) of Bs samples with ``t`` (Bs,) rows each.
        qkv and proj run on the S rows, sliced to the union of the heads the samples keep; the
        attention matmuls run in ``methods.attention.packed_layout``'s layout (each sample padded
        to the longest with a key mask unless all counts are equal, length groups when the counts
        are very uneven, one block-diagonal product for few rows on CPU); ``union``: the
        ``_head_union`` of the samples; ``hk`` (Bs, H) zeroes (or, identity_attn, passes V
        through for) the heads a sample dropped where the samples disagree."""
        attn = blk.attn
        S, C = yp.shape
        Bs = t.shape[0]
        H, d = attn.num_heads, attn.head_dim
        identity = self.bench_knobs["head_variant"] == "identity_attn"
        heads, nu, uniform, key = union
        cu = nu * d
        if not identity and nu == 0:  # every head dropped: q/k/v are zero, the MSA output is proj's bias
            out = yp.new_zeros(S, C)
            return out + attn.proj.bias.to(out.dtype) if attn.proj.bias is not None else out
        W, b = attn.qkv.weight, attn.qkv.bias
        parts = 2 if identity else 3  # identity_attn: V of every head comes from its own linear
        W = self._sliced(W, heads, key, f"qkv_w{parts}", lambda: _head_rows(W[: parts * C], heads, parts, H, d))
        b = None if b is None else self._sliced(b, heads, key, f"qkv_b{parts}", lambda: _head_rows(b[: parts * C], heads, parts, H, d))
        qkv = F.linear(yp, W, b)  # (S, parts * cu)
        v_all = F.linear(yp, attn.qkv.weight[2 * C :], None if attn.qkv.bias is None else attn.qkv.bias[2 * C :]) if identity else None
        hk_rows = None if uniform else hk.repeat_interleave(t, dim=0)  # (S, H)
        o = None
        pairs = 0  # query-key pairs the attention products compute (padding included)
        if nu > 0:
            qkv3 = torch.cat([qkv, _head_cols(v_all, heads, H, d)], 1) if identity else qkv
            # the products run in methods.attention's layout: a padded (Bs, T) buffer with a key
            # mask, length groups, or one block-diagonal product; the padded MACs below count its pairs
            if Bs == 1:  # one sample: its rows are the buffer (no index tensors to build)
                lay = Layout(1, S)
            else:
                lay = packed_layout(torch.arange(Bs, device=yp.device).repeat_interleave(t), Bs)
            pairs = lay.pairs
            o = packed_attention(qkv3, lay, nu, d, attn.q_norm, attn.k_norm)
            if hk_rows is not None:
                hm = _head_cols(hk_rows, heads, H, 1).repeat_interleave(d, dim=1)
                o = torch.where(hm, o, _head_cols(v_all, heads, H, d)) if identity else o * hm.to(o.dtype)
        if identity:
            if o is not None:
                o = o.to(v_all.dtype)
                o = o if heads is None else v_all.view(S, H, d).index_copy(1, heads, o.view(S, nu, d)).view(S, C)
            else:
                o = v_all
            out = attn.proj_drop(attn.proj(o))
            rec["padded_macs"] += S * C * (2 * cu + C) + 2 * pairs * cu + S * C * C
            return out
        Wp = self._sliced(attn.proj.weight, heads, key, "proj_w", lambda: _head_cols(attn.proj.weight, heads, H, d))
        out = attn.proj_drop(F.linear(o, Wp, attn.proj.bias))
        rec["padded_macs"] += S * C * 3 * cu + 2 * pairs * cu + S * cu * C
        return out

    def _compact_mlp(self, blk, xp, union, hk_rows, rec) -> torch.Tensor:
        """FFN on packed token rows ``xp`` (S, C). zero_channels: fc1 reads only the channels of
        the heads in ``union`` (``_head_union`` of the rows' samples), and ``hk_rows`` (S, H) zeroes per row the
        heads a row's sample dropped when the rows disagree."""
        mlp = blk.mlp
        S, C = xp.shape
        H, d = blk.attn.num_heads, blk.attn.head_dim
        R = mlp.fc1.out_features
        heads, nu, _, key = union
        z = blk.norm2(xp)
        if self.bench_knobs["head_variant"] == "identity_attn":
            h, cu = mlp.fc1(z), C
        else:
            cu = nu * d
            if hk_rows is not None:
                z = z * hk_rows.to(z.dtype).repeat_interleave(d, dim=1)
            w1 = self._sliced(mlp.fc1.weight, heads, key, "fc1_w", lambda: _head_cols(mlp.fc1.weight, heads, H, d))
            h = F.linear(_head_cols(z, heads, H, d), w1, mlp.fc1.bias)
        h = mlp.drop1(mlp.act(h))
        h = mlp.norm(h)
        out = mlp.drop2(mlp.fc2(h))
        rec["padded_macs"] += S * (5 * C + cu * R + R * C)
        return out


def _head_rows(w: torch.Tensor, heads: torch.Tensor | None, parts: int, num_heads: int, d: int) -> torch.Tensor:
    """Rows of the given heads (None: all) of a (parts * H * d, ...) weight or bias, e.g. q, k, v
    of qkv; one index_select over the head axis (fast on the CPU, unlike row gathers)."""
    if heads is None:
        return w
    rest = w.shape[1:]
    return w.reshape(parts, num_heads, d, *rest).index_select(1, heads).reshape(-1, *rest)


def _head_cols(w: torch.Tensor, heads: torch.Tensor | None, num_heads: int, d: int) -> torch.Tensor:
    """Columns (last axis, H * d wide) of the given heads (None: all)."""
    if heads is None:
        return w
    lead = w.shape[:-1]
    return w.reshape(*lead, num_heads, d).index_select(-2, heads).reshape(*lead, -1)


# ----------------------------------------------------------------------------------------------
# build and load


def _targets(knobs: dict[str, Any]) -> dict[str, float]:
    out = {}
    for kind in ("patch", "head", "block"):
        v = knobs.get(f"{kind}_target")
        out[kind] = float(knobs["target"] if v is None else v)
        if not 0.0 <= out[kind] <= 1.0:
            raise ValueError(f"adavit {kind}_target must lie in [0, 1], got {out[kind]}")
    return out


def _build(
    vit,
    mode: str,
    target: float,
    patch_target: float | None,
    head_target: float | None,
    block_target: float | None,
    patch_threshold: float,
    head_threshold: float,
    block_threshold: float,
    head_variant: str,
):
    if head_variant not in HEAD_VARIANTS:
        raise ValueError(f"adavit head_variant must be one of {', '.join(HEAD_VARIANTS)}, got {head_variant!r}")
    knobs = {
        "target": target,
        "patch_target": patch_target,
        "head_target": head_target,
        "block_target": block_target,
        "patch_threshold": patch_threshold,
        "head_threshold": head_threshold,
        "block_threshold": block_threshold,
        "head_variant": head_variant,
    }
    _targets(knobs)
    for name in ("patch_threshold", "head_threshold", "block_threshold"):
        if not 0.0 < knobs[name] < 1.0:
            raise ValueError(f"adavit {name} must lie in (0, 1), got {knobs[name]}")
    model = adapt(vit, AdaViT, mode, knobs)
    model._adavit_check()
    param = next(model.parameters())
    gates = nn.ModuleList(
        [AdaGates(model.embed_dim, model.blocks[0].attn.num_heads, head_and_block=i >= 1) for i in range(len(model.blocks))]
    )
    model.adavit_gates = gates.to(device=param.device, dtype=param.dtype)
    return model


def load_backbone_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load a plain timm state dict into an AdaViT model; only the gate keys may be missing (the
    gates keep their keep-everything initialisation unless the dict holds them)."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(GATE_PREFIX)]
    if missing or result.unexpected_keys:
        raise ValueError(f"state dict does not fit: missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}")
    return model


# ----------------------------------------------------------------------------------------------
# training (docs/methods/adavit.md#training)


def usage(policy: dict[str, list]) -> dict[str, torch.Tensor]:
    """Mean usage as the official loss measures it: heads over blocks with at least one sub-layer
    on, sub-layers over blocks 1.., patches over every block's token mask (CLS included, as the
    official token_select tensor holds it)."""
    out = {}
    if policy["heads"]:
        heads = torch.stack(policy["heads"], 1)  # (B, L-1, H)
        sub = torch.stack(policy["sublayers"], 1)  # (B, L-1, 2)
        on = (sub.sum(-1, keepdim=True) > 0).to(heads.dtype).expand_as(heads)
        out["head"] = (heads * on).sum() / (on.sum() + 1e-6)
        out["block"] = sub.mean()
    out["patch"] = torch.stack(policy["patches"], 1).mean()
    return out


def usage_loss(policy: dict[str, list], targets: dict[str, float], weight: float = 2.0) -> tuple[torch.Tensor, dict]:
    """2*|head usage - g_h| + 2*|block usage - g_b| + 2*(patch usage - g_p)^2 (docs/methods/adavit.md#usage-loss)."""
    u = usage(policy)
    loss = weight * (u["patch"] - targets["patch"]) ** 2
    if "head" in u:
        loss = loss + weight * (u["head"] - targets["head"]).abs() + weight * (u["block"] - targets["block"]).abs()
    return loss, {k: float(v.detach()) for k, v in u.items()}


TRAIN_SETTINGS: dict[str, Any] = {
    "epochs": 1,
    "max_steps": 0,  # 0: epochs * steps_per_epoch
    "batch_size": 128,
    "lr": 5e-4,  # backbone
    "gate_lr": 2e-2,  # decision network
    "weight_decay": 0.05,
    "warmup_steps": 5,
    "label_smoothing": 0.1,
    "grad_clip": 1.0,
    "usage_weight": 2.0,
    "seed": 0,
}


def train(model: nn.Module, data: TrainData, settings: dict, progress) -> dict:
    """Fine-tune ``model`` (built by ``methods.build('adavit', ...)``) in place from its dense
    weights with cross-entropy plus the official usage losses at the model's targets.

    Recipe (docs/methods/adavit.md#training, shortened for two CPU cores): AdamW, backbone lr ``lr``, gates
    ``gate_lr`` (no weight decay), linear warm-up then cosine, label smoothing, gradient clipping.
    BatchNorm layers of a convolutional stem are meant to keep their running statistics, but the
    first forward's MAC count (``methods.macs._module_macs``) puts the stem back in training mode,
    so they are frozen for the first step only. Kept as it is so that fine-tunes reproduce the
    cached and baseline weights exactly; a recipe change should fix both together and bump
    ``bench.cache.RECIPE_VERSION``. The official recipe adds mixup / cutmix and 300 epochs.
    """
    s = {**TRAIN_SETTINGS, **(settings or {})}
    targets = _targets(model.bench_knobs)
    steps = int(s["epochs"]) * int(data.steps_per_epoch)
    if int(s["max_steps"]) > 0:
        steps = min(steps, int(s["max_steps"]))
    recipe = Recipe(steps=steps, warmup_steps=int(s["warmup_steps"]), grad_clip=float(s["grad_clip"]), seed=int(s["seed"]),
                    freeze_batchnorm=True)

    def optimizer() -> torch.optim.Optimizer:
        gates = [p for n, p in model.named_parameters() if n.startswith(GATE_PREFIX)]
        other = [p for n, p in model.named_parameters() if not n.startswith(GATE_PREFIX)]
        return torch.optim.AdamW([{"params": other, "lr": float(s["lr"]), "weight_decay": float(s["weight_decay"])},
                                  {"params": gates, "lr": float(s["gate_lr"]), "weight_decay": 0.0}])

    loss = partial(step_loss, targets=targets, settings=s)
    history, seconds = timed(lambda: fit(model, data.batches, optimizer, recipe, loss, progress))
    val = validate(model, data.val_batches(), partial(val_stats, num_heads=model.blocks[0].attn.num_heads))
    return {"train_seconds": seconds, "steps": steps, "targets": targets, "history": history, **val}


def step_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, targets: dict, settings: dict) -> tuple[torch.Tensor, dict]:
    """Cross-entropy plus the usage losses of the policy the forward sampled."""
    logits = model(images)
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=float(settings["label_smoothing"]))
    ul, used = usage_loss(model.__dict__["_adavit_policy"], targets, float(settings["usage_weight"]))
    loss = ce + ul
    return loss, {"loss": loss.item(), "ce": ce.item(), **{f"usage_{k}": v for k, v in used.items()}}


def val_stats(trace, num_heads: int) -> dict[str, torch.Tensor]:
    """Tokens per block, and head and MSA / FFN usage over the gated blocks (1..; 1.0 without any)."""
    heads, sub = trace.heads[:, 1:].to(torch.float64), trace.sublayers[:, 1:].to(torch.float64)
    ones = torch.ones(len(heads), dtype=torch.float64)
    return {
        "val_tokens_per_block": trace.tokens.to(torch.float64),
        "val_head_usage": heads.mean(1) / num_heads if heads.numel() else ones,
        "val_block_usage": sub.mean((1, 2)) if sub.numel() else ones,
    }


# ----------------------------------------------------------------------------------------------

SPEC = register(
    MethodSpec(
        id="adavit",
        paper="Meng et al., CVPR 2022, AdaViT: Adaptive Vision Transformers for Efficient Image Recognition",
        arxiv="2111.15668",
        summary="learned per-input patch, head and block (MSA/FFN) gates; fine-tuned with usage targets",
        build=_build,
        knobs=(
            Knob("target", float, 0.7, "usage target for patches, heads and blocks alike (training)"),
            Knob("patch_target", float, None, "patch usage target; default: target (training)"),
            Knob("head_target", float, None, "head usage target; default: target (training)"),
            Knob("block_target", float, None, "MSA/FFN usage target; default: target (training)"),
            Knob("patch_threshold", float, 0.6, "keep a patch iff sigmoid(logit) > this (inference)"),
            Knob("head_threshold", float, 0.5, "keep a head iff sigmoid(logit) > this (inference)"),
            Knob("block_threshold", float, 0.5, "run MSA / FFN iff sigmoid(logit) > this (inference)"),
            Knob("head_variant", str, "zero_channels", "dropped heads: zero_channels (official default) | identity_attn"),
        ),
        modes=("compact", "reference"),
        primary_knob="target",
        default_budgets=("0.9", "0.7", "0.5"),
        train=train,
        train_knobs=("target", "patch_target", "head_target", "block_target", "head_variant"),
        train_settings=dict(TRAIN_SETTINGS),
        extras={
            "heads": "(B, depth) heads kept per block",
            "sublayers": "(B, depth, 2) MSA / FFN executed per block",
            "patch_keep": "(B, depth, N) tokens each block computed on",
            "policy_gmacs": "(B,) MACs of the decision network itself, included in gmacs",
            "gmacs_executed": "(B,) MACs compact physically runs (proj to C, LN2 on kept tokens)",
            "padding_waste": "share of executed block MACs spent on batch padding (compact)",
        },
    )
)
