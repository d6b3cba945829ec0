"""The two steps of tools/gpu_check.py that are not `bench run`: ``prepare`` (weights and knobs for
the methods' cells) and ``extras`` (the kernel ceiling and a plain timm loop). Each runs in its own
process, on the device and sizes of a bench.toml profile (gpu-check, or gpu-check-dry on the CPU).

    python tools/gpu_steps.py prepare --profile gpu-check --work results/gpu/STAMP
    python tools/gpu_steps.py extras  --profile gpu-check --work results/gpu/STAMP --backbones a,b,c

``prepare`` makes the profile's backbone with random weights (seeded as ``bench run --checkpoint
random`` makes it), sets each method's knob to about half the dense GMACs on the profile's
synthetic test images, in the measured precision, as tools/avit_speed.py and tools/adavit_speed.py
do on the CPU (ATS ``keep`` and A-ViT ``gate_center`` by bisection; AdaViT's random patch gates
with 2 of 3 heads kept, the kept-patch share by bisection), and saves the weights with AdaViT's
gates as one checkpoint that the methods' `bench run` steps load. Random weights decide arbitrarily
which tokens to drop, but the amount is set, so the speed at that GMACs ratio is meaningful.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

import methods
from bench import budgets, config, datasets, measure, runner
from bench.cache import file_sha256

import adavit_speed  # tools/: set_half_gates
import avit_speed  # tools/: gmacs_ratio
import ceiling  # tools/

PRECISION = "bf16"  # the methods' cells (gpu_check.py passes --precision bf16)
TARGET = 0.5  # GMACs ratio the knobs aim at
BISECTION_STEPS = 12  # per knob; --bisection-steps (the dry run takes fewer)
AVIT_GATE_SCALE = 3.0  # tools/avit_speed.py's scale for random weights
CHECKPOINT = "{backbone}-random-seed{seed}-adavit-gates.safetensors"  # what each record's `checkpoint` shows
CALIBRATION = "calibration.json"
EXTRAS = "extras.jsonl"
REPLAYS = {"ats": ceiling.ats, "avit": ceiling.avit, "adavit": ceiling.adavit}


def setup(profile: str) -> tuple[config.RunConfig, torch.device]:
    """The profile, and its device and threads set as `bench run` sets them."""
    cfg = config.resolve(profile)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return cfg, runner.resolve_device(cfg.devices[0])


def bisect(ratio_at: Callable[[float], float], lo: float, hi: float, steps: int) -> float:
    """The knob value in [lo, hi] where ``ratio_at`` (non-decreasing in it) crosses TARGET."""
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if ratio_at(mid) > TARGET else (mid, hi)
    return 0.5 * (lo + hi)


def calibrate(vit: torch.nn.Module, x: torch.Tensor, steps: int) -> tuple[dict[str, str], torch.nn.Module]:
    """Budgets (``--budgets`` syntax) per method at about TARGET, and the AdaViT model whose gates
    were set (its state dict is the backbone plus the gates)."""
    ats_keep = bisect(lambda k: avit_speed.gmacs_ratio(methods.build("ats", vit, keep=k).eval(), x), 0.15, 1.0, steps)
    avit = methods.build("avit", vit, gate_scale=AVIT_GATE_SCALE, gate_center=0.0).eval()

    def avit_ratio(center: float) -> float:
        avit.bench_knobs["gate_center"] = center
        return avit_speed.gmacs_ratio(avit, x)

    center = bisect(avit_ratio, -20.0, 20.0, steps)
    adavit = methods.build("adavit", vit, mode="compact").eval()
    heads = max(1, round(2 * vit.blocks[0].attn.num_heads / 3))

    def adavit_ratio(keep_tokens: float) -> float:
        adavit_speed.set_half_gates(adavit, x, keep_tokens, heads)
        return avit_speed.gmacs_ratio(adavit, x)

    adavit_ratio(bisect(adavit_ratio, 0.05, 1.0, steps))  # leaves the gates at the chosen share
    chosen = {"ats": f"keep:{ats_keep:.4f}", "avit": f"gate_scale:{AVIT_GATE_SCALE:g}+gate_center:{center:.4f}",
              "adavit": f"patch_threshold:{adavit.bench_knobs['patch_threshold']:g}"}
    return chosen, adavit


def eval_images(cfg: config.RunConfig, vit: torch.nn.Module) -> torch.Tensor:
    """The profile's test images: those `bench run` counts each cell's GMACs on."""
    return torch.cat([x for x, _ in datasets.load(cfg, vit).batches(256)])


@torch.no_grad()
def prepare(profile: str, work: Path, check_backbones: list[str], steps: int = BISECTION_STEPS) -> dict:
    import timm
    from safetensors.torch import save_file

    unknown = [b for b in check_backbones if not timm.is_model(b)]
    if unknown:  # the dry run's guard for names only the GPU run uses
        raise SystemExit(f"unknown timm backbone(s): {', '.join(unknown)}")
    cfg, device = setup(profile)
    torch.manual_seed(cfg.seed)  # as bench run seeds before creating the backbone
    vit = runner.create_backbone(cfg).eval()
    x = eval_images(cfg, vit).to(device)
    vit = vit.to(device)
    began = time.perf_counter()
    # Without autocast's weight-cast cache: the calibration changes AdaViT's gates between forwards.
    with torch.autocast(device.type, dtype=measure.PRECISIONS[PRECISION], cache_enabled=False):
        chosen, adavit = calibrate(vit, x, steps)
        ratios = {m: avit_speed.gmacs_ratio(build(m, vit, chosen[m], adavit.state_dict()), x) for m in chosen}
    path = work / "scratch" / CHECKPOINT.format(backbone=cfg.backbone, seed=cfg.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in adavit.state_dict().items()}, str(path))
    info = {"profile": profile, "backbone": cfg.backbone, "device": runner.device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "precision": PRECISION, "target_gmacs_ratio": TARGET, "budgets": chosen,
            "gmacs_ratio": ratios, "calibration_images": int(x.shape[0]), "calibration_seconds": round(time.perf_counter() - began, 1),
            "checkpoint": str(path), "checkpoint_sha256": file_sha256(path), "seed": cfg.seed}
    (work / CALIBRATION).write_text(json.dumps(info, indent=2))
    print(json.dumps({k: info[k] for k in ("budgets", "gmacs_ratio", "calibration_seconds")}), flush=True)
    return info


def build(method: str, vit: torch.nn.Module, budget: str, state: dict | None) -> torch.nn.Module:
    """``method`` compact at ``budget``; AdaViT takes its gates from ``state``."""
    from methods.convert import load_strict

    model = methods.build(method, vit, mode="compact", **budgets.parse(method, budget)).eval()
    if method == "adavit":
        gates = {k: v for k, v in state.items() if k.startswith("adavit_gates.")}
        if not gates:
            raise SystemExit("the checkpoint holds no AdaViT gates (adavit_gates.*): run the prepare step first")
        load_strict(model, {**model.state_dict(), **gates}, "the gpu_check checkpoint")
    return model


def timing(cfg: config.RunConfig) -> dict:
    t = cfg.timing
    return {"warmup_iters": t.warmup_iters, "min_iters": t.min_iters, "max_iters": t.max_iters, "min_seconds": t.min_seconds}


def append(work: Path, row: dict) -> None:
    with open(work / EXTRAS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def ceilings(cfg: config.RunConfig, device: torch.device, work: Path) -> None:
    """tools/ceiling.py's replay of each method's kept work, timed against the dense model as
    `bench run` times a cell (interleaved, same timing inputs, batch sizes and precision)."""
    from methods.convert import load_backbone

    cal = json.loads((work / CALIBRATION).read_text())
    torch.manual_seed(cfg.seed)
    vit = runner.create_backbone(cfg).eval()
    gates = load_backbone(vit, cal["checkpoint"]).method_states.get("adavit", {})
    inputs = datasets.load(cfg, vit).timing_inputs(cfg.timing.timing_samples, cfg.seed).to(device)
    vit = vit.to(device)
    dense = methods.build("deit", vit).eval()
    for method, replay in REPLAYS.items():
        compact = build(method, vit, cal["budgets"][method], gates)
        for bs in cfg.batch_sizes:
            with torch.no_grad(), measure.autocast(device, PRECISION):
                ceil = replay(vit, compact, inputs, bs)  # the schedule from compact's own bf16 forwards
            r = measure.time_side_by_side(ceil, dense, inputs, bs, device, PRECISION, **timing(cfg))
            append(work, {"kind": "ceiling", "method": method, "budget": cal["budgets"][method], "backbone": cfg.backbone,
                          "precision": PRECISION, "batch_size": bs, "speedup": r["speedup"], "latency_ms_p50": r["latency_ms_p50"],
                          "dense_latency_ms_p50": r["dense_latency_ms_p50"], "iters": r["iters"]})


@torch.inference_mode()
def plain_loop(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, precision: str, t: config.Timing) -> dict:
    """timm's model called in a loop, timed as bench times a cell (bench.measure.time_side_by_side):
    warm-up, then each call alone between two CUDA events (perf_counter on the CPU), the autocast
    context inside the call, until ``min_iters`` and ``min_seconds``; but no bench wrapper, trace
    or bookkeeping anywhere. Its median against bench's is the harness's own overhead."""
    clock = measure.Clock(device)

    def call(i: int):
        with measure.autocast(device, precision):
            return model(batches[i % len(batches)])

    for i in range(t.warmup_iters):
        call(i)
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < t.max_iters and (len(times) < t.min_iters or time.perf_counter() - began < t.min_seconds):
        i = len(times)
        times.append(clock.time(lambda: call(i)))
    median = float(np.median(times))
    return {"img_per_s": batches[0].shape[0] / median, "latency_ms_p50": median * 1e3, "iters": len(times)}


def plain_timm(cfg: config.RunConfig, device: torch.device, work: Path) -> None:
    """The plain loop for every precision and batch size of the profile's dense cells."""
    import timm

    torch.manual_seed(cfg.seed)
    model = timm.create_model(cfg.backbone, pretrained=False, **cfg.model).eval()
    inputs = datasets.load(cfg, model).timing_inputs(cfg.timing.timing_samples, cfg.seed).to(device)
    model = model.to(device)
    for precision in cfg.precisions:
        for bs in cfg.batch_sizes:
            r = plain_loop(model, measure.timing_batches(inputs, bs), device, precision, cfg.timing)
            append(work, {"kind": "plain_timm", "backbone": cfg.backbone, "precision": precision, "batch_size": bs, **r})
    del model


def extras(profile: str, work: Path, backbones: list[str]) -> None:
    cfg, device = setup(profile)
    ceilings(cfg, device, work)
    for name in backbones or [cfg.backbone]:
        plain_timm(config.resolve(profile, backbone=name) if name != cfg.backbone else cfg, device, work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "extras"])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--work", required=True, type=Path, help="the check's results folder")
    ap.add_argument("--backbones", default="", help="extras: comma list of dense backbones (default: the profile's)")
    ap.add_argument("--check-backbones", default="", help="prepare: fail unless timm knows these names")
    ap.add_argument("--bisection-steps", type=int, default=BISECTION_STEPS, help="prepare: steps per knob")
    args = ap.parse_args()
    names = [b for b in args.backbones.split(",") if b]
    if args.step == "prepare":
        prepare(args.profile, args.work, [b for b in args.check_backbones.split(",") if b], args.bisection_steps)
    else:
        extras(args.profile, args.work, names)


if __name__ == "__main__":
    main()
