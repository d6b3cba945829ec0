"""The papers' ImageNet-1k numbers (docs/methods/README.md#papers-numbers), printed beside ours by ``bench run``.

Top-1 at 224x224 on the full validation set; GMACs as the papers count them ("GFLOPs" = MACs,
docs/counting.md#convention). Each entry names where the number comes from: compare with a run on the
full 50,000 images and the weights named there (a few test images give a wide interval).
"""
from __future__ import annotations

from methods import DENSE


# (method id, timm backbone) -> (top-1 %, GMACs, setting and source)
PAPER = {
    (DENSE, "deit_tiny_patch16_224"): (72.2, 1.3, "DeiT-T, DeiT paper Tab. 1"),
    (DENSE, "deit_small_patch16_224"): (79.8, 4.6, "DeiT-S, DeiT paper Tab. 1"),
    (DENSE, "deit_base_patch16_224"): (81.8, 17.6, "DeiT-B, DeiT paper"),
    ("avit", "deit_tiny_patch16_224"): (71.4, 0.8, "A-ViT-T released tiny-10-30 (README)"),
    ("avit", "deit_small_patch16_224"): (78.8, 3.6, "A-ViT-S released small-10-75 (README)"),
    ("ats", "deit_small_patch16_224"): (79.13, 3.4, "DeiT-S + ATS off-the-shelf, released code (issue #2); fine-tuned paper: 79.7 / 2.9"),
    ("adavit", "deit_small_patch16_224"): (77.3, 2.3, "Ada-DeiT-S released (README)"),
    ("tome", "deit_small_patch16_224"): (79.4, 2.7, "ToMe DeiT-S r=13 off the shelf (README)"),
    ("evit", "deit_small_patch16_224"): (79.5, 3.0, "EViT-DeiT-S keep 0.7, fine-tuned (paper)"),
}


def lookup(method: str, backbone: str) -> tuple[float, float, str] | None:
    return PAPER.get((method, backbone.split(".")[0]))


def beside(records: list[dict]) -> list[dict]:
    """One row per ImageNet (method, budget) that has a paper number: ours and the paper's."""
    rows, seen = [], set()
    for r in records:
        if r.get("dataset") != "imagenet":
            continue
        hit = lookup(r["method"], r.get("backbone", ""))
        key = (r["method"], str(r["budget"]), r.get("precision"), r.get("mode"))
        if hit is None or key in seen:
            continue
        seen.add(key)
        rows.append({"method": r["method"], "budget": str(r["budget"]), "top1": r["top1"], "gmacs": r["gmacs"],
                     "paper_top1": hit[0], "paper_gmacs": hit[1], "paper_setting": hit[2]})
    return rows
