"""Outputs of every method and mode on fixed inputs, saved to a file, and two such files compared:
the proof that a refactor of ``methods/`` changed nothing (logits, decisions, per-sample GMACs).

    .venv/bin/python tools/snapshot.py save before.pt      # on the old code
    .venv/bin/python tools/snapshot.py save after.pt       # on the new code
    .venv/bin/python tools/snapshot.py compare before.pt after.pt

Models: the shipped digits backbone with the fine-tuned A-ViT and AdaViT weights of the `ci`
baseline (real per-sample decisions), at batch 1 and 32 on digits test canvases; and
deit_small_patch16_224 with seeded random weights at 224 px (A-ViT with a gate centre that halts
about half the tokens, AdaViT with seeded random gates so that samples disagree).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import methods  # noqa: E402

CI_WEIGHTS = ROOT / "results" / "baselines" / "ci" / "weights"

DIGITS_CONFIGS = [
    ("deit", {}),
    ("ats", {"keep": 1.0}),
    ("ats", {"keep": 0.5}),
    ("ats", {"keep": 0.25, "blocks": "1-5"}),
    ("ats", {"keep": 0.5, "official_padding": True}),
    ("avit", {"gate_center": 15.0}),
    ("avit", {"gate_center": 30.0}),
    ("avit", {"gate_center": 20.0, "official_prior_quirk": True}),
    ("adavit", {"target": 0.7}),
    ("adavit", {"target": 0.7, "head_variant": "identity_attn"}),
]
DEIT_CONFIGS = [
    ("deit", {}),
    ("ats", {"keep": 0.5}),
    ("avit", {"gate_scale": 10.0, "gate_center": 6.0}),
    ("adavit", {}),
]


def digits_inputs(n: int = 32) -> torch.Tensor:
    from bench.data import digits

    cfg = digits.DigitsConfig()
    x, _ = digits.make_split(cfg, "test", n=n)
    return digits.normalize(x)


def digits_backbone():
    import timm
    from safetensors.torch import load_file

    from bench.cache import ASSETS

    vit = timm.create_model("digits_vit")
    vit.load_state_dict(load_file(str(next(ASSETS.glob("digits_vit-*.safetensors")))))
    return vit.eval()


def method_weights(method: str) -> dict | None:
    from safetensors.torch import load_file

    found = sorted(CI_WEIGHTS.glob(f"digits_vit-{method}-*.safetensors"))
    return load_file(str(found[0])) if found else None


def randomize_gates(model, seed: int = 0) -> None:
    """AdaViT gates with seeded random weights, biased to keep about half (samples disagree)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.startswith("adavit_gates."):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.endswith("weight") else 0.5))


def trace_fields(model) -> dict:
    t = methods.trace(model).detach_cpu()
    out = {"tokens": t.tokens, "gmacs": t.gmacs}
    for k, v in t.extras.items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


@torch.no_grad()
def outputs(model, x: torch.Tensor, batch_sizes: tuple[int, ...]) -> dict:
    res = {}
    for b in batch_sizes:
        runs = []
        for i in range(0, min(len(x), 4 * b if b == 1 else len(x)), b):
            logits = model(x[i : i + b])
            runs.append({"logits": logits, **trace_fields(model)})
        res[b] = runs
    return res


def build(method: str, vit, mode: str, knobs: dict, weights: dict | None, random_gates: bool):
    model = methods.build(method, vit, mode=mode, **knobs)
    if weights is not None:
        model.load_state_dict(weights)
    if random_gates and method == "adavit":
        randomize_gates(model)
    return model.eval()


def snapshot() -> dict:
    torch.manual_seed(0)
    import timm

    out = {}
    digits_vit, dx = digits_backbone(), digits_inputs()
    for method, knobs in DIGITS_CONFIGS:
        for mode in methods.get(method).modes:
            model = build(method, digits_vit, mode, knobs, method_weights(method), False)
            out[("digits", method, str(sorted(knobs.items())), mode)] = outputs(model, dx, (1, 32))
    deit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    torch.manual_seed(0)
    ix = torch.randn(4, 3, 224, 224)
    for method, knobs in DEIT_CONFIGS:
        for mode in methods.get(method).modes:
            model = build(method, deit, mode, knobs, None, True)
            out[("deit_small", method, str(sorted(knobs.items())), mode)] = outputs(model, ix, (1, 4))
    return out


def differences(a, b, path: str = "") -> list[str]:
    """Where ``b`` differs from ``a``: logits beyond 1e-6, anything else not identical."""
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, set(a) ^ set(b)))} differ"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{path}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"]
        if path.endswith("logits"):
            diff = float((a - b).abs().max()) if a.numel() else 0.0
            return [f"{path}: max |diff| {diff:.2e}"] if diff > 1e-6 else []
        return [] if torch.equal(a, b) else [f"{path}: not identical"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def max_logit_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for key, runs in a.items():
        for bs, items in runs.items():
            for x, y in zip(items, b[key][bs]):
                worst = max(worst, float((x["logits"] - y["logits"]).abs().max()))
    return worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("save").add_argument("path")
    cmp = sub.add_parser("compare")
    cmp.add_argument("before")
    cmp.add_argument("after")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.cmd == "save":
        snap = snapshot()
        torch.save(snap, args.path)
        print(f"{len(snap)} model configurations saved to {args.path}")
        return 0
    a, b = torch.load(args.before, weights_only=False), torch.load(args.after, weights_only=False)
    diffs = differences(a, b)
    print(f"{len(a)} model configurations, max |logit diff| {max_logit_diff(a, b):.2e}; "
          f"{len(diffs)} differences beyond tolerance (logits 1e-6, everything else identical)")
    for d in diffs[:40]:
        print("  " + d)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
