"""ATS, the Adaptive Token Sampler (Fayyaz et al., ECCV 2022, arXiv 2111.15667) as method ``ats``.

Training-free and parameter-free: in each ATS block the patch tokens are scored by the CLS
attention they receive times the norm of their value vector, a subset is drawn by inverse
transform sampling on a fixed grid, and only the kept tokens leave the block. The official code's
behaviours we reproduce (policy-aware softmax, the released grid, attention over all keys, the
padding quirk behind ``official_padding``) and the budgeted form we add are in
docs/methods/ats.md#algorithm; the per-sample compute (qkv on the tokens read, proj and MLP on the
tokens kept) in docs/methods/ats.md#compute.

``reference`` writes the official masked semantics out; ``compact`` computes only the kept query
rows and, once samples keep different counts, runs the token-wise layers on packed real rows
(methods/execution.py). Both give the same kept sets and predictions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .attention import Layout, sdpa
from .base import TracedViT, adapt
from .execution import attention_tail, block_on_rows, flat_rows, padded_layout, take_rows, unpack
from .knobs import int_list, knob_error
from .macs import sampled_gmacs
from .registry import Knob, MatchedCompute, MethodSpec, register

EPS = 1e-6  # the policy-aware softmax's eps (docs/methods/ats.md#policy-aware-softmax)
MIN_TOKENS = 2  # CLS + one patch token


# --------------------------------------------------------------------------------------------
# Knobs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ATSConfig:
    """Resolved knobs: the ATS blocks and the K (tokens kept, CLS included) of each."""

    blocks: tuple[int, ...]
    tokens: tuple[int, ...]
    n_ref: int  # initial token count: the released grid has n_ref - 1 points
    official_padding: bool

    @property
    def budgeted_form(self) -> bool:
        """Whether some stage can run the paper's budgeted form (K below its token count)."""
        return any(k < self.n_ref for k in self.tokens)


_knob_error = partial(knob_error, "ats")
_int_list = partial(int_list, "ats")


def resolve_config(
    depth: int,
    n_ref: int,
    keep: float = 1.0,
    tokens: Any = None,
    blocks: Any = None,
    single_stage: bool = False,
    official_padding: bool = False,
) -> ATSConfig:
    """Turn the knobs into stage blocks and per-stage K; every bad value raises a ValueError that
    names the knob and what it accepts."""
    allowed_blocks = (
        f"block indices in 0..{depth - 1}, or -{depth}..-1 counted from the end (an int, a list, 'a-b' or "
        "'a,b,c'), no repeats"
    )
    if blocks is None:
        # The released DeiT-S config runs ATS in blocks 3..11 of 12, i.e. from block 3 to the end;
        # a shallower backbone keeps "from block 3 to the end" (3..5 on the 6-block digits ViT).
        stage_blocks = list(range(min(3, depth - 1), depth))
    else:
        stage_blocks = _int_list("blocks", blocks, allowed_blocks)
        if any(b < -depth or b >= depth for b in stage_blocks):
            raise _knob_error("blocks", allowed_blocks, blocks)
        stage_blocks = [b % depth for b in stage_blocks]  # -1 = the last block, on any depth
        if len(set(stage_blocks)) != len(stage_blocks):
            raise _knob_error("blocks", allowed_blocks, blocks)
        stage_blocks = sorted(stage_blocks)
    if not isinstance(single_stage, bool):
        raise _knob_error("single_stage", "true or false", single_stage)
    if not isinstance(official_padding, bool):
        raise _knob_error("official_padding", "true or false", official_padding)
    if single_stage:
        stage_blocks = stage_blocks[:1]

    allowed_keep = "a number in (0, 1]: tokens kept per ATS stage as a share of the initial tokens"
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep) or not 0 < keep <= 1:
        raise _knob_error("keep", allowed_keep, keep)
    allowed_tokens = (
        f"an integer >= {MIN_TOKENS} (tokens kept per ATS stage, CLS included; >= {n_ref} gives the released "
        f"behaviour), or a list of {len(stage_blocks)} such integers, one per ATS stage"
    )
    if tokens is None:
        k = math.floor(keep * n_ref + 0.5)  # round half up
        if k < MIN_TOKENS:
            raise ValueError(
                f"ats knob 'keep' = {keep!r} keeps round({keep} * {n_ref}) = {k} token(s) per stage; "
                f"it must keep at least {MIN_TOKENS} (CLS + one patch token), i.e. keep >= {MIN_TOKENS / n_ref:.3g}"
            )
        per_stage = [k] * len(stage_blocks)
    else:
        per_stage = _int_list("tokens", tokens, allowed_tokens)
        if any(k < MIN_TOKENS for k in per_stage):
            raise _knob_error("tokens", allowed_tokens, tokens)
        if len(per_stage) == 1:
            per_stage = per_stage * len(stage_blocks)
        elif len(per_stage) != len(stage_blocks):
            raise _knob_error("tokens", allowed_tokens + f" (ATS blocks: {stage_blocks})", tokens)
    return ATSConfig(tuple(stage_blocks), tuple(per_stage), n_ref, official_padding)


# --------------------------------------------------------------------------------------------
# Scoring and sampling (shared by both modes)
# --------------------------------------------------------------------------------------------


def policy_softmax(
    logits: torch.Tensor,
    key_policy: torch.Tensor | None,
    n_eps: torch.Tensor | int,
    max_over_all: bool,
) -> torch.Tensor:
    """The official policy-aware softmax (docs/methods/ats.md#policy-aware-softmax), in float32.

    ``key_policy`` (broadcastable to ``logits``; 1 = attendable key) multiplies the exponentials;
    ``n_eps`` is the N of the eps/N term (the padded length in the released code, the sample's own
    token count for batch invariance); ``max_over_all`` subtracts the row max over every slot, as
    the released code does, instead of over the attendable keys only.
    """
    logits = logits.float()
    if key_policy is None:
        e = (logits - logits.amax(-1, keepdim=True)).exp()
    else:
        if max_over_all:
            e = (logits - logits.amax(-1, keepdim=True)).exp() * key_policy
        else:  # masked before exp: a padded slot's logit can be anything (inf * 0 would be nan)
            logits = logits.masked_fill(key_policy == 0, float("-inf"))
            e = (logits - logits.amax(-1, keepdim=True)).exp()
    return (e + EPS / n_eps) / (e.sum(-1, keepdim=True) + EPS)


def token_scores(cls_attn: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Normalised significance scores of the patch tokens (docs/methods/ats.md#scores, docs/methods/ats.md#check-ats-1-scores).

    cls_attn: (B, H, L) CLS attention row per head; v: (B, H, L, D) values; valid: (B, L) or None.
    Returns (B, L - 1) float32, zero on padding, summing to 1 over each sample's real patches.
    """
    b, h, n, d = v.shape
    v_norm = torch.linalg.vector_norm(v.transpose(1, 2).reshape(b, n, h * d)[:, 1:].float(), dim=-1)  # all heads
    s = cls_attn[:, :, 1:].float().sum(dim=1) * v_norm
    if valid is not None:
        s = s * valid[:, 1:]
    return s / s.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


class Selection(NamedTuple):
    rows: torch.Tensor  # (B, 1 + Kmax) token indices kept, CLS first, then ascending score
    row_valid: torch.Tensor | None  # (B, 1 + Kmax) bool, None when no sample is padded
    n_kept: torch.Tensor  # (B,) tokens kept, CLS included
    budgeted: torch.Tensor  # (B,) bool: the K - 1 point grid was used


_STEPS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _steps(m: int, device: torch.device) -> torch.Tensor:
    key = (m, device)
    if key not in _STEPS:
        _STEPS[key] = torch.arange(m, dtype=torch.float32, device=device)
    return _STEPS[key]


def sample_tokens(
    scores: torch.Tensor,
    valid: torch.Tensor | None,
    n_in: torch.Tensor,
    k: int,
    n_ref: int,
    official_padding: bool,
) -> Selection:
    """Inverse transform sampling on a fixed grid (docs/methods/ats.md#sampling, docs/methods/ats.md#budgeted-form).

    scores: (B, P) normalised patch scores (P = L - 1 patch slots); valid: (B, L) real-token mask
    or None when no slot is padding; n_in: (B,) real tokens per sample, CLS included. Vectorised
    over the batch (no Python loop over samples); one host sync for the compacted length.
    Degenerate rows (a lone patch token, or all scores zero) keep one token.
    """
    b, p = scores.shape
    dev = scores.device
    if valid is not None and not official_padding:
        # Padded slots sort first and stay out of the CDF: the sample samples as it would alone.
        patch_valid = valid[:, 1:]
        sorted_s, order = torch.sort(scores.masked_fill(~patch_valid, -1.0), dim=1, stable=True)
        sorted_s = sorted_s.clamp_min(0.0)
        cdf = sorted_s.cumsum(dim=1)
        lowest = cdf.gather(1, (p + 1 - n_in).unsqueeze(1))  # the first real slot
    else:
        # No padding, or the released quirk: padded slots enter the CDF with score 0.
        sorted_s, order = torch.sort(scores, dim=1, stable=True)
        cdf = sorted_s.cumsum(dim=1)
        lowest = cdf[:, :1]
    span = (cdf[:, -1:] - lowest).clamp_min(torch.finfo(torch.float32).tiny)
    g = (cdf - lowest) / span  # min-max normalised CDF: the lowest-ranked token has G = 0
    if valid is not None and not official_padding:
        g = g.masked_fill(~patch_valid.gather(1, order), -2.0)  # farther than any real token
    y0 = g.masked_fill(g <= 0, 2.0).amin(dim=1, keepdim=True).clamp_max_(1.0)  # smallest G > 0

    # Grid size: the released n_ref - 1 points when K >= N, the budgeted K - 1 points when K < N.
    budgeted = n_in > k
    if valid is None:  # every sample has the same N, so the same grid size
        m = (k - 1) if p + 1 > k else (n_ref - 1)
        if m == 1:
            grid = torch.ones_like(y0)  # a one-point grid sits at 1: the top-score token
        else:
            steps = _steps(m, dev).unsqueeze(0)
            grid = y0 + (steps - y0 * steps) / (m - 1)  # as released: y0 + step * (1 - y0) / (M - 1)
    else:
        m_b = torch.where(budgeted, k - 1, n_ref - 1).unsqueeze(1)
        m = (k - 1) if bool(budgeted.all()) else (n_ref - 1)
        # Columns past a sample's own grid repeat its last point and are dropped as duplicates.
        steps = torch.minimum(_steps(m, dev).unsqueeze(0), (m_b - 1).to(torch.float32))
        grid = y0 + (steps - y0 * steps) / (m_b - 1).clamp_min(1).to(torch.float32)
        if k == 2:
            grid = torch.where(m_b == 1, 1.0, grid)

    # Nearest token to each grid point, first index on ties: G is sorted, so the nearest is one of
    # the two neighbours of the insertion point (O(M log P) instead of a (B, M, P) distance table).
    hi = torch.searchsorted(g, grid)
    lo = (hi - 1).clamp_min_(0)
    hi = hi.clamp_max_(p - 1)
    pick = torch.where(grid - g.gather(1, lo) <= g.gather(1, hi) - grid, lo, hi)  # (B, M)
    picked = torch.zeros(b, p, dtype=torch.uint8, device=dev).scatter_(1, pick, 1)  # duplicates collapse
    if b == 1:
        rows = order.masked_select(picked.bool()).unsqueeze(0)  # ascending score order
        n_kept = torch.full((1,), rows.shape[1] + 1, dtype=n_in.dtype, device=dev)
        row_valid = None
    else:
        n_picked = picked.sum(dim=1)
        k_max = int(n_picked.max())
        pos = torch.sort(picked, dim=1, descending=True, stable=True).indices[:, :k_max]
        rows = order.gather(1, pos)
        n_kept = n_picked + 1
        padded = bool((n_picked < k_max).any())
        row_valid = torch.arange(k_max + 1, device=dev).unsqueeze(0) < n_kept.unsqueeze(1) if padded else None
    rows = F.pad(rows + 1, (1, 0))  # CLS (index 0) first
    return Selection(rows, row_valid, n_kept, budgeted)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _take_index(origin: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    if rows.shape[0] == 1:
        return origin.index_select(1, rows[0])
    return origin.gather(1, rows)


def _check_backbone(vit) -> None:
    if getattr(vit, "cls_token", None) is None or vit.num_prefix_tokens != 1:
        raise ValueError(
            "ats needs a ViT with exactly one prefix token, the CLS token (its attention row scores the "
            f"patches); this model has {vit.num_prefix_tokens} prefix token(s)"
        )
    if getattr(vit, "global_pool", "token") != "token" or getattr(vit, "attn_pool", None) is not None:
        raise ValueError(f"ats needs CLS-token pooling (global_pool='token'); this model pools by {vit.global_pool!r}")
    for i, blk in enumerate(vit.blocks):
        ok = all(hasattr(blk, a) for a in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"))
        attn = getattr(blk, "attn", None)
        ok = ok and all(hasattr(attn, a) for a in ("qkv", "q_norm", "k_norm", "proj", "num_heads", "head_dim", "scale"))
        if not ok or type(blk).__name__ != "Block":
            raise ValueError(f"ats supports timm's pre-LN Block with Attention; block {i} is a {type(blk).__name__}")


class ATSViT(TracedViT):
    """A timm VisionTransformer whose blocks ``ats_config.blocks`` sample tokens (docs/methods/ats.md#overview)."""

    bench_method = "ats"
    ats_config: ATSConfig

    @property
    def budgeted_form(self) -> bool:
        """True when the budget can run the paper's budgeted form (K - 1 point grid), which the
        released code cannot (docs/methods/ats.md#budgeted-form); each forward flags it per sample in the trace."""
        return self.ats_config.budgeted_form

    def tokens_entered(self, trace) -> torch.Tensor:
        """Stage j (ATS in block s_j) keeps ``kept_index[j]``; those tokens enter blocks s_j + 1 .. s_(j+1)."""
        b, depth = trace.tokens.shape
        n = self.bench_shape.num_tokens
        stages = list(self.ats_config.blocks)
        out = torch.zeros(b, depth, n, dtype=torch.bool)
        out[:, : stages[0] + 1] = True
        for j, kept in enumerate(trace.kept_index):
            last = stages[j + 1] if j + 1 < len(stages) else depth - 1
            member = torch.zeros(b, n + 1, dtype=torch.bool)  # column n catches -1 (padding)
            member.scatter_(1, kept.cpu().long().where(kept.cpu() >= 0, n), True)
            out[:, stages[j] + 1 : last + 1] = member[:, None, :n]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        cfg = self.ats_config
        reference = self.bench_mode == "reference"
        stage_k = dict(zip(cfg.blocks, cfg.tokens))
        x = self.embed_tokens(x)
        b, n0, _ = x.shape
        self.__dict__["_n_ref"] = n0  # the released grid has (initial tokens - 1) points
        n_real = torch.full((b,), n0, dtype=torch.int64, device=x.device)
        policy: torch.Tensor | None = None  # reference: the official float policy once a stage ran
        packed: Layout | None = None  # compact: x holds only real rows, (T, C), once a batch pads
        origin: torch.Tensor | None = None  # (B, L) original token index of each slot
        tokens_in, tokens_out, kept_index = [], [], []
        slots, padded = 0, False
        budgeted = torch.zeros(b, dtype=torch.bool, device=x.device)
        for i, blk in enumerate(self.blocks):
            tokens_in.append(n_real)
            slots += x.shape[1] if packed is None else packed.length
            if i in stage_k:
                if reference:
                    x, sel = self._ats_block_reference(blk, x, policy, n_real, stage_k[i])
                    policy = torch.ones(sel.rows.shape, dtype=x.dtype, device=x.device)
                    if sel.row_valid is not None:
                        policy = policy * sel.row_valid
                else:
                    x, sel, packed = self._ats_block_compact(blk, x, packed, n_real, stage_k[i])
                n_real = sel.n_kept
                padded = padded or sel.row_valid is not None
                budgeted = budgeted | sel.budgeted
                origin = sel.rows if origin is None else _take_index(origin, sel.rows)
                kept_index.append(origin if sel.row_valid is None else origin.masked_fill(~sel.row_valid, -1))
            elif reference and policy is not None:
                x = self._block_reference(blk, x, policy, n_real)
            elif packed is not None:
                x = self._block_packed(blk, x, packed)
            else:
                x = blk(x)
            tokens_out.append(n_real)
        if packed is not None:  # only the CLS rows feed the head (token pooling)
            x = x.index_select(0, packed.offsets).unsqueeze(1)
        x = self.norm(x)
        logits = self.forward_head(x)

        t_in = torch.stack(tokens_in, dim=1)
        t_out = torch.stack(tokens_out, dim=1)
        self.record(
            t_in,
            gmacs=sampled_gmacs(self.bench_shape, t_in, t_out),
            tokens_kept=t_out,
            kept_index=tuple(kept_index),
            budgeted_form=budgeted,
            padding_waste=float(1.0 - float(t_in.sum()) / (b * slots)) if padded else 0.0,
        )
        return logits

    # -- compact: dropped work is not done ---------------------------------------------------

    def _ats_block_compact(self, blk, x, packed, n_real, k):
        """One ATS block, dropped work skipped. ``x`` is (B, L, C) with no padding, or (T, C) real
        rows described by ``packed``; returns the kept rows in the same two forms."""
        cfg = self.ats_config
        attn = blk.attn
        h, d = attn.num_heads, attn.head_dim
        a_dim = h * d
        if packed is None:
            b, n = x.shape[0], x.shape[1]
            valid = None
        else:
            b, n = packed.batch, packed.length
            valid = packed.real
        y = blk.norm1(x)
        qkv = attn.qkv(y)
        if packed is not None:
            qkv = unpack(qkv, packed)  # attention needs the (B, L) layout: padded, masked below
        _, kk, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        kk = attn.k_norm(kk)
        # Only the CLS row of the attention matrix, explicitly (SDPA returns no probabilities).
        q_cls = attn.q_norm(qkv[:, :1, :a_dim].reshape(b, 1, h, d).transpose(1, 2))
        cls_logits = (q_cls * attn.scale) @ kk.transpose(-2, -1)  # (B, H, 1, L)
        if valid is None:
            cls_attn = policy_softmax(cls_logits, None, n, True)
        else:
            key_policy = valid[:, None, None, :].to(torch.float32)
            if cfg.official_padding:  # the released code zeroes padded k rows: their logit is 0
                cls_logits = cls_logits.masked_fill(~valid[:, None, None, :], 0.0)
                cls_attn = policy_softmax(cls_logits, key_policy, n, True)
            else:
                cls_attn = policy_softmax(cls_logits, key_policy, n_real[:, None, None, None], False)
        scores = token_scores(cls_attn[:, :, 0], v, valid)
        sel = sample_tokens(scores, valid, n_real, k, self._n_ref, cfg.official_padding)

        rows = sel.rows
        r = rows.shape[1]
        flat = flat_rows(rows, n)
        # Queries of the kept rows only: q.k^T rows of dropped tokens are never computed.
        q_kept = take_rows(qkv, flat, b)[..., :a_dim].reshape(b, r, h, d).transpose(1, 2)
        q_kept = attn.q_norm(q_kept)
        o = self._attend(attn, q_kept, kk, v, packed).transpose(1, 2).reshape(b, r, a_dim)
        # Where the kept rows live in x: flat (B * L) positions, or positions among the packed rows.
        src = flat if packed is None else (rows + packed.offsets.unsqueeze(1)).reshape(-1)
        new_packed = None
        if sel.row_valid is not None:  # samples keep different counts: pack the real rows
            new_packed = padded_layout(sel.n_kept, r, q_kept.dtype)
            src = src.index_select(0, new_packed.flat)
            o = o.reshape(b * r, a_dim).index_select(0, new_packed.flat)

        def rows_of(t: torch.Tensor) -> torch.Tensor:
            kept = t.reshape(-1, t.shape[-1]).index_select(0, src)
            return kept if new_packed is not None else kept.view(b, r, -1)

        y_kept = rows_of(y) if getattr(attn, "gate", None) is not None else None
        o = attention_tail(attn, o, y_kept)
        x = rows_of(x) + blk.drop_path1(blk.ls1(o))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return x, sel, new_packed

    def _block_packed(self, blk, x, packed):
        """A plain block on packed rows (the execution layer's), with the released softmax over
        padded slots where ``official_padding`` asks for it (see ``_attend``)."""
        product = None
        if self.ats_config.official_padding:
            product = lambda q, k, v, lay: self._attend(blk.attn, q, k, v, lay)  # noqa: E731
        return block_on_rows(blk, x, packed, product)

    def _attend(self, attn, q, kk, v, packed):
        """softmax(q.k^T) v over every key of the (B, L) layout, padded keys masked.

        Fused SDPA everywhere except ``official_padding`` with padding present: the released
        softmax subtracts the row max over all slots, padded ones included (logit 0, their k rows
        being zero), so when a sample's real logits all lie far below 0 its eps term distorts the
        attention; that quirk needs the explicit policy-aware softmax to be reproduced.
        """
        drop = attn.attn_drop.p if self.training else 0.0
        if packed is None or not self.ats_config.official_padding:
            mask = None if packed is None else packed.mask
            return sdpa(q, kk, v, mask, drop, attn.scale)
        pad = ~packed.real[:, None, None, :]
        logits = ((q * attn.scale) @ kk.transpose(-2, -1)).masked_fill(pad, 0.0)
        a = policy_softmax(logits, packed.real[:, None, None, :].to(torch.float32), packed.length, True)
        return attn.attn_drop(a).to(v.dtype) @ v.masked_fill(pad.transpose(-2, -1), 0.0)

    # -- reference: the official semantics ---------------------------------------------------

    def _policy_attention(self, blk, x, policy, n_real):
        """q, k, v rows times the policy, full attention matrix with the policy-aware softmax."""
        cfg = self.ats_config
        attn = blk.attn
        b, n, _ = x.shape
        h, d = attn.num_heads, attn.head_dim
        y = blk.norm1(x)
        q, kk, v = attn.qkv(y).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        q, kk = attn.q_norm(q), attn.k_norm(kk)
        p = torch.ones(b, n, dtype=x.dtype, device=x.device) if policy is None else policy
        p4 = p[:, None, :, None].to(q.dtype)
        q, kk, v = q * p4, kk * p4, v * p4
        logits = (q * attn.scale) @ kk.transpose(-2, -1)  # (B, H, L, L)
        pf = p.to(torch.float32)[:, None, None, :]
        eye = torch.eye(n, dtype=torch.float32, device=x.device)
        key_policy = pf + (1.0 - pf) * eye  # the diagonal is always attendable
        if cfg.official_padding or policy is None:
            a = policy_softmax(logits, key_policy, n, True)
        else:
            a = policy_softmax(logits, key_policy, n_real[:, None, None, None], False)
        return y, a, v

    def _ats_block_reference(self, blk, x, policy, n_real, k):
        cfg = self.ats_config
        attn = blk.attn
        b = x.shape[0]
        h, d = attn.num_heads, attn.head_dim
        y, a, v = self._policy_attention(blk, x, policy, n_real)
        valid = None if policy is None else policy > 0
        if valid is not None and bool(valid.all()):
            valid = None
        scores = token_scores(a[:, :, 0], v, valid)
        sel = sample_tokens(scores, valid, n_real, k, self._n_ref, cfg.official_padding)
        rows = sel.rows
        a_kept = attn.attn_drop(a.gather(2, rows[:, None, :, None].expand(-1, h, -1, a.shape[-1])))
        o = (a_kept.to(v.dtype) @ v).transpose(1, 2).reshape(b, rows.shape[1], h * d)
        y_kept = None
        if getattr(attn, "gate", None) is not None:
            y_kept = take_rows(y, flat_rows(rows, y.shape[1]), b)
        o = attention_tail(attn, o, y_kept)
        new_p = torch.ones(rows.shape, dtype=x.dtype, device=x.device)
        if sel.row_valid is not None:
            new_p = new_p * sel.row_valid
        new_p = new_p[..., None]
        x_kept = take_rows(x, flat_rows(rows, x.shape[1]), b) * new_p  # sentinel rows are zero
        x = (x_kept + blk.drop_path1(blk.ls1(o))) * new_p
        x = (x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))) * new_p
        return x, sel

    def _block_reference(self, blk, x, policy, n_real):
        """A plain block after an ATS stage: padding masked by the policy-aware softmax."""
        attn = blk.attn
        b, n, _ = x.shape
        y, a, v = self._policy_attention(blk, x, policy, n_real)
        o = (attn.attn_drop(a).to(v.dtype) @ v).transpose(1, 2).reshape(b, n, -1)
        o = attention_tail(attn, o, y)
        p = policy[..., None]
        x = (x + blk.drop_path1(blk.ls1(o))) * p
        return (x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))) * p


def _build(
    vit,
    mode: str,
    keep: float = 1.0,
    tokens: Any = None,
    blocks: Any = None,
    single_stage: bool = False,
    official_padding: bool = False,
):
    _check_backbone(vit)
    n_ref = vit.patch_embed.num_patches + vit.num_prefix_tokens
    cfg = resolve_config(len(vit.blocks), n_ref, keep, tokens, blocks, single_stage, official_padding)
    model = adapt(
        vit,
        ATSViT,
        mode,
        {"keep": keep, "tokens": tokens, "blocks": blocks, "single_stage": single_stage, "official_padding": official_padding},
    )
    model.ats_config = cfg
    model.__dict__["_n_ref"] = n_ref  # set again by each forward from the tokens it embeds
    return model


from . import counting as _counting  # noqa: E402  (docs/counting.md#every-counter)

SPEC = register(
    MethodSpec(
        counting=_counting.ATS,
        id="ats",
        paper="Fayyaz et al. 2022, Adaptive Token Sampling for Efficient Vision Transformers (ECCV)",
        arxiv="2111.15667",
        summary="parameter-free token sampling by CLS attention x value norm, per stage (no training)",
        build=_build,
        knobs=(
            Knob(
                "keep",
                float,
                1.0,
                "tokens kept per ATS stage as a share of the initial tokens N0 (CLS included): "
                "K = round(keep * N0) at every stage (65 tokens on the digits ViT, 197 on DeiT-S at 224); "
                "1.0 = the released behaviour (K >= N, only duplicate picks are dropped)",
            ),
            Knob(
                "tokens",
                object,
                None,
                "absolute K per ATS stage (CLS included); one integer for every stage or one per stage "
                "('108' or '108/100/90'); overrides keep. K < the current token count is the paper's "
                "budgeted form (K - 1 grid points), which the released code cannot run",
            ),
            Knob(
                "blocks",
                object,
                None,
                "ATS blocks, 0-based ('3-11', '3/6/9' or a list; -1 = the last block); default: block 3 to the "
                "last block (3-11 on 12-block DeiT-S as the released config, 3-5 on the 6-block digits ViT)",
            ),
            Knob("single_stage", bool, False, "ATS only in the first of the ATS blocks (the paper's single-stage variant)"),
            Knob(
                "official_padding",
                bool,
                False,
                "reproduce the released padding quirk: padded slots enter the next stage's CDF with score 0, "
                "so batched results depend on batch mates (docs/methods/ats.md#check-ats-4-batch-invariance); default excludes padding",
            ),
        ),
        modes=("compact", "reference"),
        primary_knob="keep",
        matched=MatchedCompute("keep", 0.035, 1.0),  # keep >= 2 tokens on 65 (digits) and 197 (DeiT) tokens
        # keep ratios (1.0 = the released configuration) at the default stages, then stage placement:
        # on a model with peaky CLS attention (the trained digits ViT) the released mode already keeps
        # few tokens, so where the stages start moves the compute more than K does (digits test list:
        # blocks 3-5 ratio 0.65, blocks 1-5 ratio 0.37, last two blocks 0.82).
        default_budgets=("1.0", "0.5", "0.25", "blocks:1-5", "blocks:1-5+keep:0.25", "blocks:-2/-1"),
        extras={
            "tokens_kept": "(B, depth) tokens leaving each block, CLS included (an ATS block's kept count)",
            "kept_index": "one (B, R) tensor per ATS stage: original token index of each kept token (0 = CLS), "
            "CLS first then ascending score; -1 on padding",
            "budgeted_form": "(B,) bool: some ATS stage ran the paper's K-1 point grid (K < tokens), not the released code",
            "padding_waste": "share of padded token slots in the batch's padded layouts (0 at batch 1); compact pads "
            "only inside attention (token-wise layers run on the real rows), reference pads every layer",
        },
    )
)
