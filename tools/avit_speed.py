"""A-ViT wall-clock: `compact` (token zipping) against the dense model and against `reference`
(the official masked execution), side by side in one process, each next to its GMACs ratio.

    .venv/bin/python tools/avit_speed.py                      # random weights, as in the issue note
    .venv/bin/python tools/avit_speed.py --digits-checkpoint PATH --digits-gate-center 20
        # a fine-tuned A-ViT from the bench cache (~/.cache/bench/digits_vit-avit-*.safetensors)

Random weights serve for speed: the gate centre is calibrated on the timing inputs so that the
model keeps about ``--keep`` of the dense GMACs (about half the tokens halt). Speedup = ratio of
median latencies, measured interleaved by ``bench.measure.time_side_by_side``.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import methods
from bench.measure import time_side_by_side

import ceiling  # tools/ceiling.py


@torch.no_grad()
def gmacs_ratio(model, inputs: torch.Tensor, batch: int = 64) -> float:
    total = 0.0
    for i in range(0, len(inputs), batch):
        model(inputs[i : i + batch])
        total += float(methods.trace(model).gmacs.sum())
    return total / len(inputs) / model.bench_shape.dense_gmacs()


def calibrate(vit, inputs: torch.Tensor, gate_scale: float, keep: float, lo: float = -20.0, hi: float = 20.0) -> float:
    """Gate centre (bisection) at which the compact model keeps ``keep`` of the dense GMACs."""
    model = methods.build("avit", vit, gate_scale=gate_scale, gate_center=0.0).eval()
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        model.bench_knobs["gate_center"] = mid
        if gmacs_ratio(model, inputs) > keep:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def measure(name: str, vit, inputs: torch.Tensor, batches: list[int], knobs: dict, timing: dict, rounds: int = 1) -> list[dict]:
    dense = methods.build("deit", vit).eval()
    compact = methods.build("avit", vit, mode="compact", **knobs).eval()
    reference = methods.build("avit", vit, mode="reference", **knobs).eval()
    ratio = gmacs_ratio(compact, inputs)
    depth = float(methods.trace(compact).depths.float().mean())
    rows = []
    cpu = torch.device("cpu")
    for b in batches:
        # The dense model's own blocks on the token counts compact kept (tools/ceiling.py): the
        # speedup these kernels allow for this halting schedule on this machine.
        ceil = ceiling.avit(vit, compact, inputs, b)
        runs = ceiling.median_rounds(
            {"dense": (compact, dense), "ceil": (ceil, dense), "ref": (compact, reference)},
            rounds,
            lambda m, r: time_side_by_side(m, r, inputs, b, cpu, "fp32", **timing),
        )
        runs_dense, runs_ref, runs_ceil = runs["dense"], runs["ref"], runs["ceil"]
        vs_dense, vs_ref, vs_ceil = runs_dense[rounds // 2], runs_ref[rounds // 2], runs_ceil[rounds // 2]
        row = {
            "model": name,
            "batch": b,
            "gate_center": round(knobs["gate_center"], 3),
            "gate_scale": knobs["gate_scale"],
            "mean_depth": round(depth, 2),
            "gmacs_ratio": round(ratio, 3),
            "macs_speedup_bound": round(1 / ratio, 3),
            "speedup_vs_dense": round(vs_dense["speedup"], 3),
            "share_of_bound_vs_dense": round(vs_dense["speedup"] * ratio, 3),
            "speedup_vs_reference": round(vs_ref["speedup"], 3),
            "share_of_bound_vs_reference": round(vs_ref["speedup"] * ratio, 3),
            "ceiling_speedup_vs_dense": round(vs_ceil["speedup"], 3),
            "ceiling_share_of_bound": round(vs_ceil["speedup"] * ratio, 3),
            "compact_share_of_ceiling": round(vs_dense["speedup"] / vs_ceil["speedup"], 3),
            "compact_ms_p50": round(vs_dense["latency_ms_p50"], 2),
            "dense_ms_p50": round(vs_dense["dense_latency_ms_p50"], 2),
            "reference_ms_p50": round(vs_ref["dense_latency_ms_p50"], 2),
            "padding_waste": round(vs_dense["padding_waste"], 3),
            "iters": vs_dense["iters"],
            "speedups_vs_dense_all_rounds": [round(r["speedup"], 3) for r in runs_dense],
            "speedups_vs_reference_all_rounds": [round(r["speedup"], 3) for r in runs_ref],
            "ceiling_speedups_all_rounds": [round(r["speedup"], 3) for r in runs_ceil],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=float, default=0.5, help="target GMACs ratio for the calibrated gate centre")
    ap.add_argument("--digits-checkpoint", default=None, help="state dict of a digits backbone (or a fine-tuned A-ViT)")
    ap.add_argument("--digits-gate-center", type=float, default=None, help="use this gate centre instead of calibrating")
    ap.add_argument("--digits-gate-scale", type=float, default=None)
    ap.add_argument("--skip-deit", action="store_true")
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--min-seconds", type=float, default=6.0)
    ap.add_argument("--max-iters", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds per cell; the median-speedup round is reported")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    timing = {"warmup_iters": 5, "min_iters": 20, "max_iters": args.max_iters, "min_seconds": args.min_seconds}

    from bench.data import digits
    from methods.backbones import create_digits_vit

    vit = create_digits_vit().eval()
    if args.digits_checkpoint:
        from methods.convert import read_state_dict

        vit.load_state_dict(read_state_dict(args.digits_checkpoint))
    x, _ = digits.make_split(digits.DigitsConfig(), "test", n=256)
    x = digits.normalize(x)
    scale = args.digits_gate_scale or (methods.avit.DEFAULT_GATE_SCALE if args.digits_checkpoint else 3.0)
    center = args.digits_gate_center
    if center is None and not args.skip_digits:
        center = calibrate(vit, x, scale, args.keep)
    if not args.skip_digits:
        measure("digits_vit", vit, x, [1, 32], {"gate_scale": scale, "gate_center": center}, timing, args.rounds)

    if not args.skip_deit:
        import timm

        deit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
        imgs = torch.randn(8, 3, 224, 224)
        center = calibrate(deit, imgs, 3.0, args.keep)
        measure("deit_small_patch16_224", deit, imgs, [1], {"gate_scale": 3.0, "gate_center": center}, timing, args.rounds)


if __name__ == "__main__":
    main()
