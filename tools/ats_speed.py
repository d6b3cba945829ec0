"""Side-by-side wall-clock speed of ATS ``compact`` against the dense model (issue 3 numbers).

    HF_HUB_OFFLINE=1 .venv/bin/python tools/ats_speed.py            # digits b1/b32 + deit_small b1
    HF_HUB_OFFLINE=1 .venv/bin/python tools/ats_speed.py --only digits --keeps 1.0,0.5

The digits ViT runs on real test canvases of the embedded default with a trained checkpoint when
one is cached or shipped (kept counts then vary per sample, so batches pad), else with random
weights. deit_small_patch16_224 runs with random weights at 224 (random weights serve for speed).
Each row prints the speedup as the ratio of medians (``bench.measure.time_side_by_side``: the two
models interleaved in one process) next to the gmacs ratio of the same batches (dense / ATS).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import timm
import torch

import methods
from bench.measure import time_side_by_side


def digits_backbone(checkpoint: str | None) -> tuple[torch.nn.Module, str]:
    """The digits ViT: the given checkpoint, else a trained one from the bench cache or the shipped
    assets (newest ``digits_vit-*.safetensors``), else random weights."""
    vit = timm.create_model("digits_vit")
    if checkpoint is None:
        from bench.cache import ASSETS, cache_dir

        found = sorted(
            [
                p
                for d in (cache_dir(), ASSETS)
                if d.is_dir()
                for p in d.glob("digits_vit-*.safetensors")
                if re.fullmatch(r"digits_vit-[0-9a-f]{16}\.safetensors", p.name)  # the backbone, not a method's
            ],
            key=lambda p: p.stat().st_mtime,
        )
        checkpoint = str(found[-1]) if found else None
    if checkpoint:
        from methods.convert import load_checkpoint

        load_checkpoint(vit, checkpoint)
    return vit.eval(), checkpoint or "random weights"


def digits_inputs(n: int) -> torch.Tensor:
    """Test canvases of the embedded default (normalised as the harness feeds them)."""
    from bench.data import digits as dd

    x, _ = dd.make_split(dd.DigitsConfig(), "test", n=n)
    return dd.normalize(x)


def gmacs_of(model, x: torch.Tensor, batch: int) -> float:
    vals = []
    with torch.inference_mode():
        for i in range(0, x.shape[0] - batch + 1, batch):
            model(x[i : i + batch])
            vals.append(methods.trace(model).gmacs)
    return float(torch.cat(vals).mean())


def row(name: str, vit, x, batch: int, knobs: dict, args) -> dict:
    dense = methods.build("deit", vit).eval()
    ats = methods.build("ats", vit, mode="compact", **knobs).eval()
    g_dense, g_ats = gmacs_of(dense, x, batch), gmacs_of(ats, x, batch)
    r = time_side_by_side(
        ats, dense, x, batch, torch.device("cpu"), "fp32",
        args.warmup, args.min_iters, args.max_iters, args.min_seconds,
    )
    out = {
        "backbone": name,
        "batch": batch,
        "knobs": knobs,
        "gmacs_dense": g_dense,
        "gmacs_ats": g_ats,
        "gmacs_ratio": g_dense / g_ats,
        "speedup": r["speedup"],
        "speedup_over_gmacs_ratio": r["speedup"] / (g_dense / g_ats),
        # Ratio of 10th percentiles: the least-disturbed iterations, robust when the machine is shared.
        "speedup_p10": float(np.percentile(r["raw_dense_seconds"], 10) / np.percentile(r["raw_seconds"], 10)),
        # Median of per-iteration ratios (each ATS iteration against the dense one next to it).
        "speedup_pairs": float(np.median(np.asarray(r["raw_dense_seconds"]) / np.asarray(r["raw_seconds"]))),
        "ats_ms_p50": r["latency_ms_p50"],
        "dense_ms_p50": r["dense_latency_ms_p50"],
        "padding_waste": r["padding_waste"],
        "iters": r["iters"],
    }
    print(
        f"{name:12s} b={batch:<3d} {knobs!s:28s} gmacs {g_ats:.4f}/{g_dense:.4f} ratio {out['gmacs_ratio']:.3f}  "
        f"speedup {out['speedup']:.3f} ({out['speedup_over_gmacs_ratio']:.2f} of ratio; p10 {out['speedup_p10']:.3f}, "
        f"pairs {out['speedup_pairs']:.3f})  "
        f"ats {out['ats_ms_p50']:.2f} ms dense {out['dense_ms_p50']:.2f} ms  waste {out['padding_waste']:.3f}  iters {out['iters']}",
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["digits", "deit_small"], default=None)
    ap.add_argument("--keeps", default="1.0,0.5,0.25")
    ap.add_argument("--batches", default="1,32", help="digits batch sizes")
    ap.add_argument("--digits-checkpoint", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-iters", type=int, default=30)
    ap.add_argument("--max-iters", type=int, default=400)
    ap.add_argument("--min-seconds", type=float, default=8.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    keeps = [float(k) for k in args.keeps.split(",")]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, cpu", flush=True)
    if args.only in (None, "digits"):
        vit, source = digits_backbone(args.digits_checkpoint)
        print(f"digits_vit weights: {source}", flush=True)
        x = digits_inputs(256)
        for batch in [int(b) for b in args.batches.split(",")]:
            for keep in keeps:
                row("digits_vit", vit, x, batch, {"keep": keep}, args)
    if args.only in (None, "deit_small"):
        vit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
        x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        for keep in keeps:
            row("deit_small", vit, x, 1, {"keep": keep}, args)
        row("deit_small", vit, x, 1, {"tokens": 108, "single_stage": True}, args)

    print(f"load average at the end: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
