"""AdaViT wall-clock speed: ``compact`` against the dense model and against ``reference``,
side by side in one process (bench.measure.time_side_by_side interleaves the two), each speedup
next to its MAC ratio. Random backbone weights serve for speed; the gates are set so that about
half of the work is kept (patch gates calibrated to a keep fraction per block, a fixed subset of
heads, every sub-layer on).

    .venv/bin/python tools/adavit_speed.py                 # digits b1 + b32, deit_small b1
    .venv/bin/python tools/adavit_speed.py --only digits --min-seconds 3
"""
from __future__ import annotations

import argparse
import json
import math

import torch

import methods
from bench import measure
from methods.backbones import create_digits_vit

import ceiling  # tools/ceiling.py


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@torch.no_grad()
def set_half_gates(model, x: torch.Tensor, keep_tokens: float, keep_heads: int, seed: int = 0) -> None:
    """Random patch-gate directions with biases at the per-block quantile that keeps
    ``keep_tokens`` of the patches (calibrated block by block on ``x``), the first ``keep_heads``
    heads of every gated block kept, every sub-layer on. Defaults keep about half the MACs: digits
    50% of the patches and 2 of 3 heads (2.2x), deit_small 65% and 4 of 6 heads (2.0x)."""
    g = torch.Generator(model.blocks[0].attn.qkv.weight.device).manual_seed(seed)  # the gates' device (cuda too)
    H = model.blocks[0].attn.num_heads
    thr = model.bench_knobs["patch_threshold"]
    mode = model.bench_mode
    model.bench_mode = "reference"
    gates = model.adavit_gates
    for gt in gates:
        gt.patch.weight.normal_(0, 1.0, generator=g)
        gt.patch.bias.fill_(50.0)  # keep all while calibrating later blocks
        if gt.head is not None:
            gt.head.weight.zero_()
            gt.head.bias.copy_(torch.tensor([5.0 if h < keep_heads else -5.0 for h in range(H)]))
            gt.block.weight.zero_()
            gt.block.bias.fill_(5.0)
    P = model.num_prefix_tokens
    # calibrate block by block: run the model, read LN1 of block i, set its bias, repeat
    for i, (blk, gt) in enumerate(zip(model.blocks, gates)):
        captured: dict = {}
        h = blk.norm1.register_forward_hook(lambda m, a, out, store=captured: store.setdefault("y", out))
        model(x)
        h.remove()
        logits = gt.patch(captured["y"][:, P:]).squeeze(-1).flatten()
        cut = torch.quantile(logits.float(), 1 - keep_tokens)
        gt.patch.bias.add_(-float(cut) + _logit(thr) + 1e-4)  # bias now 50 - cut + logit(thr)
    model.bench_mode = mode


def side_by_side(name: str, vit, x_calib: torch.Tensor, inputs: torch.Tensor, batch: int, keep_tokens: float, keep_heads: int, args) -> dict:
    dense = methods.build("deit", vit).eval()
    comp = methods.build("adavit", vit, mode="compact").eval()
    set_half_gates(comp, x_calib, keep_tokens, keep_heads)
    ref = methods.build("adavit", vit, mode="reference").eval()
    ref.load_state_dict(comp.state_dict())
    with torch.no_grad():
        comp(inputs[: max(batch, 32)])
    tr = methods.trace(comp)
    dense_g = methods.vit_shape(vit).dense_gmacs()
    out = {
        "model": name,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "gmacs_dense": round(dense_g, 5),
        "gmacs_adavit": round(float(tr.gmacs.mean()), 5),
        "mac_ratio_official": round(dense_g / float(tr.gmacs.mean()), 3),
        "mac_ratio_executed": round(dense_g / float(tr.gmacs_executed.mean()), 3),
        "tokens_per_block": [round(float(v), 1) for v in tr.tokens.float().mean(0)],
        "heads_per_block": [round(float(v), 2) for v in tr.heads.float().mean(0)],
    }
    kw = {
        "batch_size": batch,
        "device": torch.device("cpu"),
        "precision": "fp32",
        "warmup_iters": args.warmup,
        "min_iters": args.min_iters,
        "max_iters": args.max_iters,
        "min_seconds": args.min_seconds,
    }
    # the dense model's own kernels on the work the gates kept (tools/ceiling.py)
    ceil = ceiling.adavit(vit, comp, inputs, batch)
    runs = ceiling.median_rounds(
        {"dense": (comp, dense), "ceil": (ceil, dense), "ref": (comp, ref)},
        args.rounds,
        lambda m, r: measure.time_side_by_side(m, r, inputs, **kw),
    )
    vs_dense, vs_ref, vs_ceil = (runs[k][args.rounds // 2] for k in ("dense", "ref", "ceil"))
    out.update(
        {
            "speedup_vs_dense": round(vs_dense["speedup"], 3),
            "speedup_vs_reference": round(vs_ref["speedup"], 3),
            "compact_ms_p50": round(vs_dense["latency_ms_p50"], 2),
            "dense_ms_p50": round(vs_dense["dense_latency_ms_p50"], 2),
            "reference_ms_p50": round(vs_ref["dense_latency_ms_p50"], 2),
            "padding_waste": round(vs_dense["padding_waste"], 3),
            "ceiling_speedup_vs_dense": round(vs_ceil["speedup"], 3),
            "speedups_vs_dense_all_rounds": [round(r["speedup"], 3) for r in runs["dense"]],
            "ceiling_speedups_all_rounds": [round(r["speedup"], 3) for r in runs["ceil"]],
            "iters": vs_dense["iters"],
        }
    )
    out["speedup_over_mac_ratio"] = round(out["speedup_vs_dense"] / out["mac_ratio_official"], 3)
    out["ceiling_over_mac_ratio"] = round(out["ceiling_speedup_vs_dense"] / out["mac_ratio_official"], 3)
    out["compact_share_of_ceiling"] = round(out["speedup_vs_dense"] / out["ceiling_speedup_vs_dense"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["digits", "deit_small"], default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-iters", type=int, default=20)
    ap.add_argument("--max-iters", type=int, default=300)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds per pair; the median-speedup round is reported")
    ap.add_argument("--keep-tokens", type=float, default=0.5, help="digits: patches kept per block (2 of 3 heads)")
    ap.add_argument("--deit-keep-tokens", type=float, default=0.65, help="deit_small: patches kept per block (4 of 6 heads)")
    ap.add_argument("--digits-checkpoint", default=None, help="dense digits backbone state dict (random weights if omitted)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    if args.only in (None, "digits"):
        from bench.data import digits

        vit = create_digits_vit().eval()
        if args.digits_checkpoint:
            from methods.convert import read_state_dict

            vit.load_state_dict(read_state_dict(args.digits_checkpoint))
        x, _ = digits.make_split(digits.DigitsConfig(), "test", n=256)
        x = digits.normalize(x)
        for batch in (1, 32):
            rows.append(side_by_side("digits_vit", vit, x[:128], x, batch, args.keep_tokens, 2, args))
            print(json.dumps(rows[-1]), flush=True)
    if args.only in (None, "deit_small"):
        import timm

        vit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 3, 224, 224, generator=g)
        rows.append(side_by_side("deit_small_patch16_224", vit, x, x, 1, args.deit_keep_tokens, 4, args))
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
