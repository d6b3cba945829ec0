"""A study: one run per backbone variant of a profile's ``variants`` list, then one report across
them (docs/avit_study.md): per variant and model, top-1, GMACs, GMACs ratio, mean halting depth and
speedup, as ``study.md`` / ``study.csv`` and a plot of accuracy against GMACs.

Each variant is an ordinary run (its own results folder, cached backbone and fine-tunes), so a
study interrupted halfway reuses the trained weights on its next start. A method whose configured
mode a variant refuses (methods/variants.py) runs in that variant's other mode where it has one,
and the table says which mode ran.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path

import pandas as pd

import methods

from .config import RunConfig
from .errors import UsageError
from .progress import Reporter
from .store import Run, atomic_write

COLUMNS = ["variant", "options", "method", "budget", "mode", "top1", "top1_ci_low", "top1_ci_high", "gmacs", "gmacs_ratio",
           "mean_depth", "speedup", "batch_size"]


def variant_config(cfg: RunConfig, backbone: str) -> RunConfig:
    """``cfg`` for one variant: its backbone, and each method's mode where the configured one is refused."""
    from . import runner

    sub = dataclasses.replace(cfg, backbone=backbone, variants=[], modes=dict(cfg.modes))
    vit = runner.create_backbone(sub)
    refusal = getattr(vit, "unsupported_reason", None)
    for m in runner.validate(sub)[0] if refusal else []:
        spec = methods.get(m)
        wanted = sub.modes.get(m, spec.modes[0])
        if refusal(m, wanted):
            other = next((mode for mode in spec.modes if not refusal(m, mode)), None)
            if other is None:
                raise UsageError(f"variant '{backbone}' refuses method '{m}' in every mode ({refusal(m, wanted)}); "
                                 "drop it from the study's methods")
            sub.modes[m] = other
    return sub


def run_study(cfg: RunConfig, reporter: Reporter, reports: Path) -> tuple[Path, list[Run]]:
    """Every variant's run, then the study report under ``reports``; returns its folder and the runs."""
    subs = [variant_config(cfg, b) for b in cfg.variants]  # every refusal before any training
    runs = []
    for i, sub in enumerate(subs, 1):
        reporter.print(f"study: variant {i} of {len(subs)}, {sub.backbone}", markup=False)
        runs.append(runner_execute(sub, reporter))
    return write_report(runs, reports, cfg.profile), runs


def runner_execute(cfg: RunConfig, reporter: Reporter) -> Run:
    from . import runner

    return runner.execute(cfg, reporter)


def options_label(backbone: str, model: dict) -> str:
    """The study options a variant changes from the baseline, e.g. ``pos=rope``; ``baseline`` if none."""
    from methods.variants import DEFAULTS, NAMED

    chosen = {**NAMED.get(backbone, {}), **{k: v for k, v in model.items() if k in DEFAULTS}}
    changed = [f"{k}={v}" for k, v in chosen.items() if v != DEFAULTS[k]]
    return ", ".join(changed) or "baseline"


def mean_depth(record: dict) -> float | None:
    """Mean blocks per token: the tokens entering each block, summed, over the tokens of block 1."""
    tokens = record.get("tokens_per_block") or []
    return sum(tokens) / tokens[0] if tokens and tokens[0] else None


def study_rows(runs: list[Run]) -> pd.DataFrame:
    """One row per variant and model configuration, at the largest batch size timed (its speedup)."""
    rows = []
    for run in runs:
        config = run.manifest().get("config", {})
        options = options_label(config.get("backbone", ""), config.get("model", {}))
        for r in run.records():
            rows.append({"variant": r["backbone"], "options": options, "method": r["method"], "budget": r["budget"],
                         "mode": r["mode"], "mean_depth": mean_depth(r), **{k: r.get(k) for k in COLUMNS[5:] if k != "mean_depth"}})
    df = pd.DataFrame(rows, columns=COLUMNS)
    if df.empty:
        return df
    df = df.sort_values("batch_size").drop_duplicates(["variant", "method", "budget", "mode"], keep="last")
    order = {v: i for i, v in enumerate(dict.fromkeys(r["backbone"] for run in runs for r in run.records()))}
    return df.sort_values(["variant", "method", "budget"], key=lambda c: c.map(order) if c.name == "variant" else c).reset_index(drop=True)


def write_report(runs: list[Run], reports: Path, profile: str) -> Path:
    """``study.md``, ``study.csv`` and ``accuracy_vs_gmacs.png`` in a new folder under ``reports``."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(reports) / f"{stamp}-{profile}"
    folder.mkdir(parents=True, exist_ok=True)
    df = study_rows(runs)
    atomic_write(folder / "study.csv", df.to_csv(index=False).encode())
    plot = plot_study(df, folder)
    lines = [f"# Study `{profile}`", "", "Runs: " + ", ".join(f"`{r.path}`" for r in runs), "",
             "One row per variant and model, at the largest batch size timed (`speedup` against the dense model of "
             "the same variant, timed interleaved; `mean_depth`: blocks per token). docs/avit_study.md explains the "
             "variants and why some methods run in reference mode on some of them.", "",
             df.to_markdown(index=False, floatfmt=".4g"), "", f"![accuracy against GMACs]({plot.name})", ""]
    atomic_write(folder / "study.md", "\n".join(lines).encode())
    return folder


def plot_study(df: pd.DataFrame, folder: Path) -> Path:
    """Top-1 against GMACs, one colour per variant, one marker per model (dense: a star)."""
    from .plots import _pyplot

    plt, sns = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = dict(zip(dict.fromkeys(df["variant"]), sns.color_palette("tab10", 10)))
    models = dict.fromkeys(df["method"] + " " + df["budget"].astype(str))
    adaptive = [k for k in models if not k.startswith(f"{methods.DENSE} ")]
    markers = {f"{methods.DENSE} full": "*", **dict(zip(adaptive, "osD^v<>p"))}
    for variant, g in df.groupby("variant", sort=False):
        g = g.sort_values("gmacs")
        ax.plot(g["gmacs"], g["top1"], color=colours[variant], linewidth=1, alpha=0.6)
        for _, r in g.iterrows():
            key = f"{r['method']} {r['budget']}"
            ax.plot(r["gmacs"], r["top1"], linestyle="none", marker=markers[key], color=colours[variant],
                    markersize=12 if r["method"] == methods.DENSE else 7)
    handles = [plt.Line2D([], [], color=c, label=v) for v, c in colours.items()]
    handles += [plt.Line2D([], [], color="0.3", marker=m, linestyle="none", label=k) for k, m in markers.items()]
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    ax.set_xlabel("GMACs per sample (mean over the test list)")
    ax.set_ylabel("top-1 (%)")
    path = folder / "accuracy_vs_gmacs.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
