"""AdaViT (Meng et al., CVPR 2022, arXiv 2111.15668): learned patch, head and block policies.

Method id ``adavit`` (not A-ViT: docs/design.md#method-ids); the official code is MengLcool/AdaViT
@ 9857f92. Each block gets a small decision network, stored beside the timm weights as
``adavit_gates.{block}.{patch,head,block}``: a head gate and an MSA / FFN gate on the CLS vector
(blocks 1..), a patch gate on LN1's output per patch token; Gumbel-sigmoid with straight-through
thresholds in training, plain thresholds at evaluation (docs/methods/adavit.md#decision-network).
Gates start at zero weights and bias +3, so a fresh model keeps everything and equals the dense
backbone, and a plain timm state dict loads with only the gate keys missing.

``reference`` reproduces the official masking (docs/methods/adavit.md#official-masking-semantics;
dropped heads as zeroed channels, the default, or the paper's identity attention); ``compact``
removes the work: skipped blocks, kept tokens packed, dropped heads sliced out of the weights
(docs/methods/adavit.md#compact). Training runs ``reference``. The trace and the MAC closed form
(the shipped lookup table's, plus the decision network): docs/methods/adavit.md#trace-fields.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .heads import attention_with_heads, head_union, mlp_with_heads
from .macs import official_block_macs, official_table_entry, official_table_tokens  # noqa: F401 (public here too)
from .base import TracedViT, adapt
from .registry import Knob, MatchedCompute, MethodSpec, TrainData, register
from .training import Recipe, fit, timed, validate

HEAD_VARIANTS = ("zero_channels", "identity_attn")
TAU = 5.0  # official: the tau flags are parsed but never reach the blocks (docs/methods/adavit.md#binarisation)
TRAIN_THRESHOLDS = {"patch": 0.6, "head": 0.5, "block": 0.5}  # the official thresholds, used in training
GATE_INIT_BIAS = 3.0  # sigmoid(3) = 0.95 > every threshold: a fresh model keeps everything
GATE_PREFIX = "adavit_gates."


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

    def tokens_entered(self, trace) -> torch.Tensor:
        return trace.patch_keep.cpu().bool()

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

    def _head_and_block_decisions(self, i: int, gates: AdaGates, x: torch.Tensor, rec: dict):
        """The head and MSA / FFN gates on the CLS vector (blocks 1..): ``(ia, hk, dec)`` with ``ia``
        the rows with at least one sub-layer on (None: all), ``hk`` their (rows, H) kept heads and
        ``dec`` per row [attention on, FFN on, head 0 kept, ...], read to the host once per block;
        ``ia`` is empty when the whole block is skipped."""
        if gates.head is None:
            return None, None, None
        thr = self._thresholds
        cls = x[:, 0]
        hk = _eval_decision(gates.head(cls), thr["head"])  # (B, H) bool
        sk = _eval_decision(gates.block(cls), thr["block"])  # (B, 2) bool
        rec["heads"][:, i] = hk.sum(1)
        rec["sublayers"][:, i] = sk
        dec = torch.cat([sk, hk], 1).tolist()
        on = [r for r, d in enumerate(dec) if d[0] or d[1]]
        if len(on) == len(dec):
            return None, hk, dec
        ia = torch.tensor(on, dtype=torch.int64, device=x.device)
        return ia, (hk.index_select(0, ia) if on else hk), [dec[r] for r in on]

    def _compact_block(self, i: int, blk: nn.Module, gates: AdaGates, x: torch.Tensor, rec: dict) -> torch.Tensor:
        B, N, C = x.shape
        P = self.num_prefix_tokens
        H = blk.attn.num_heads
        thr = self._thresholds
        ia, hk, dec = self._head_and_block_decisions(i, gates, x, rec)
        if ia is not None and ia.numel() == 0:
            return x  # the whole block skipped: no LN1, no patch gate
        xa = x if ia is None else x.index_select(0, ia)
        Ba = xa.shape[0]
        y = blk.norm1(xa)
        keep = _eval_decision(gates.patch(y[:, P:]).squeeze(-1), thr["patch"])
        keep = torch.cat([keep.new_ones(Ba, P), keep], dim=1)  # (Ba, N)
        t = keep.sum(1)
        rows = slice(None) if ia is None else ia
        rec["patch_keep"][rows, i] = keep
        rec["tokens"][rows, i] = t
        # kept tokens of every row, packed without padding (sample-major, token order kept):
        # the token-wise layers (qkv, proj, LN2, FFN) run on exactly these rows; only the
        # attention matmuls see a padded layout (methods/heads.py)
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
            union = head_union(self, None if dec is None else [dec[r][2:] for r in (rows or range(Ba))], H, x.device)
            hk_p = hk if (hk is None or sel is None) else hk.index_select(0, sel)
            t_p = t if sel is None else t.index_select(0, sel)
            src = yp if part == 0 else xp  # attention reads LN1's output, the FFN the residual stream
            xin = src if prow is None else src.index_select(0, prow)
            if part == 0:
                out, macs = attention_with_heads(self, blk, xin, t_p, hk_p, union, identity)
                out = blk.ls1(out).to(xp.dtype)
            else:
                uniform = union[2]
                hk_rows = None if uniform or identity else hk_p.repeat_interleave(t_p, dim=0)
                out, macs = mlp_with_heads(self, blk, xin, union, hk_rows, identity)
                out = blk.ls2(out).to(xp.dtype)
            rec["padded_macs"] += macs
            xp = xp + out if prow is None else xp.index_add(0, prow, out)
        # carry the dropped tokens through unchanged
        if flat is None:
            xa = xp.reshape(Ba, N, C)
        else:
            xa = xa.reshape(Ba * N, C).index_copy(0, flat, xp).reshape(Ba, N, C)
        return xa if ia is None else x.index_copy(0, ia, xa)


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

from . import counting as _counting  # noqa: E402  (docs/counting.md#every-counter)

SPEC = register(
    MethodSpec(
        counting=_counting.ADAVIT,
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
        # fine-tuned towards the target usage, then the patch gate's threshold puts it on the target
        matched=MatchedCompute("patch_threshold", 0.02, 0.98, increasing=False, train_from_target=lambda t: {"target": round(t, 4)}),
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
