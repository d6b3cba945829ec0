"""The README's counter table (docs/counting.md#every-counter): a backbone with random weights, each
method's knob set to about half the dense GMACs as the GPU check's `prepare` step sets it
(tools/gpu_steps.py: ATS ``keep`` and A-ViT ``gate_center`` by bisection, AdaViT random gates),
then ``bench flops``' counters on a few seeded random images, each alone.

    python tools/flops_table.py --backbone deit_small_patch16_224 --samples 4

Prints a Markdown table: per method and budget, the closed form, fvcore, ptflops (aten) and the
papers' conventions, means over the samples, and whether every sample matches the documented rules.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import timm
import torch

import methods
from bench import budgets, flops

import gpu_steps  # tools/: calibrate (knobs at about half the GMACs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="deit_small_patch16_224")
    ap.add_argument("--samples", type=int, default=4, help="images each counter counts alone")
    ap.add_argument("--calibration-images", type=int, default=16)
    ap.add_argument("--bisection-steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vit = timm.create_model(args.backbone, pretrained=False).eval()
    g = torch.Generator().manual_seed(args.seed)
    h, w = vit.patch_embed.img_size
    images = torch.randn(args.calibration_images + args.samples, 3, h, w, generator=g)
    with torch.no_grad():
        chosen, adavit = gpu_steps.calibrate(vit, images[: args.calibration_images], args.bisection_steps)
    x = images[args.calibration_images :]
    results = [flops.count_model(methods.build("deit", vit).eval(), methods.get("deit"), "full", x, flops.COUNTERS)]
    for m, budget in chosen.items():
        model = adavit if m == "adavit" else methods.build(m, vit, **budgets.parse(m, budget)).eval()
        results.append(flops.count_model(model, methods.get(m), budget, x, flops.COUNTERS))
    about = {"backbone": args.backbone, "dataset": f"{args.samples} seeded random images", "checkpoint": f"random (seed {args.seed})",
             "samples": args.samples, "convention_samples": args.samples}
    print(flops.markdown(results, about))


if __name__ == "__main__":
    main()
