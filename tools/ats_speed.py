"""Side-by-side wall-clock speed of ATS ``compact`` against the dense model (issue 3 numbers).

    HF_HUB_OFFLINE=1 .venv/bin/python tools/ats_speed.py            # digits b1/b32 + deit_small b1
    HF_HUB_OFFLINE=1 .venv/bin/python tools/ats_speed.py --only digits --keeps 1.0,0.5

Random weights serve for speed (the kept counts depend on the weights: the digits backbone is
loaded from the bench cache when a trained checkpoint exists, else its attention is sharpened
with a fixed seed so that token counts vary per sample, as they do in a trained model). Each row
prints the speedup as the ratio of medians (``bench.measure.time_side_by_side``, interleaved) next
to the gmacs ratio of the same batches (dense gmacs / ATS gmacs).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import timm  # noqa: E402
import torch  # noqa: E402

import methods  # noqa: E402
from bench.measure import time_side_by_side  # noqa: E402


def digits_backbone(checkpoint: str | None) -> torch.nn.Module:
    vit = timm.create_model("digits_vit")
    if checkpoint:
        methods.backbones.load_checkpoint(vit, checkpoint)
    return vit.eval()


def digits_inputs(n: int) -> torch.Tensor:
    try:  # real canvases when the data module offers them
        from bench.data import digits as dd  # noqa: F401
    except Exception:  # pragma: no cover
        pass
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 64, 64, generator=g)


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
        "ats_ms_p50": r["latency_ms_p50"],
        "dense_ms_p50": r["dense_latency_ms_p50"],
        "padding_waste": r["padding_waste"],
        "iters": r["iters"],
    }
    print(
        f"{name:12s} b={batch:<3d} {str(knobs):28s} gmacs {g_ats:.4f}/{g_dense:.4f} ratio {out['gmacs_ratio']:.3f}  "
        f"speedup {out['speedup']:.3f} ({out['speedup_over_gmacs_ratio']:.2f} of ratio)  "
        f"ats {out['ats_ms_p50']:.2f} ms dense {out['dense_ms_p50']:.2f} ms  waste {out['padding_waste']:.3f}  iters {out['iters']}",
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["digits", "deit_small"], default=None)
    ap.add_argument("--keeps", default="1.0,0.5,0.25")
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
        vit = digits_backbone(args.digits_checkpoint)
        x = digits_inputs(256)
        for batch in (1, 32):
            for keep in keeps:
                row("digits_vit", vit, x, batch, {"keep": keep}, args)
    if args.only in (None, "deit_small"):
        vit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
        x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        for keep in keeps:
            row("deit_small", vit, x, 1, {"keep": keep}, args)
        row("deit_small", vit, x, 1, {"tokens": 108, "single_stage": True}, args)


if __name__ == "__main__":
    main()
