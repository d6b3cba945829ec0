"""The report's plots (seaborn on matplotlib's Agg backend), each saved as PNG and SVG.

1. accuracy against GMACs per method over budgets, with the Pareto front and the dense model;
2. accuracy against measured throughput and against p90 latency, per device;
3. realised speedup against the GMACs reduction (the diagonal is the physical limit);
4. tokens entering each block, and the distribution of per-sample GMACs per method;
5. a few test images with the blocks each token went through drawn over them.

Everything is drawn from the results folder (records + ``raw/``), never by re-running a model
(see ``bench.tokenmap``). docs/design.md#contracts; docs/prior_art.md#budget-sweeps-and-pareto-plots.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from methods import DENSE

from .store import Run, atomic_write
from .tokenmap import IMAGES_FILE

DPI = 100


@dataclass
class Plot:
    name: str  # file stem under plots/
    title: str
    caption: str
    png: Path
    svg: Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    plt.rcParams["svg.hashsalt"] = "bench"  # reproducible SVG ids
    return plt, sns


def _series(df: pd.DataFrame) -> pd.Series:
    """What one colour stands for: the method, or method and run when several runs are compared."""
    if df["_run"].nunique() > 1:
        return df["method"] + " (" + df["_run"].map(lambda p: Path(p).name) + ")"
    return df["method"]


def palette(df: pd.DataFrame) -> dict[str, tuple]:
    """One colour per series for every plot, in the order the runs list the methods."""
    _, sns = _pyplot()
    names = list(dict.fromkeys(_series(df)))
    colours = sns.color_palette("tab10", 10)
    return {n: colours[i % len(colours)] for i, n in enumerate(names)}


def _save(fig, folder: Path, name: str, title: str, caption: str, layout: bool = True) -> Plot:
    import io

    import matplotlib.pyplot as plt

    if layout:
        fig.tight_layout()
    files = {}
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=DPI, metadata={"Date": None} if ext == "svg" else None)
        files[ext] = folder / f"{name}.{ext}"
        atomic_write(files[ext], buf.getvalue())
    plt.close(fig)
    return Plot(name, title, caption, files["png"], files["svg"])


def pareto(points: pd.DataFrame, x: str = "gmacs", y: str = "top1") -> pd.DataFrame:
    """Points no other point beats: fewer or equal ``x`` and higher ``y`` (sorted by ``x``)."""
    pts = points.sort_values([x, y], ascending=[True, False])
    best = -np.inf
    keep = []
    for idx, v in pts[y].items():
        if v > best:
            keep.append(idx)
            best = v
    return pts.loc[keep]


def _models(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model configuration: accuracy and GMACs do not depend on the batch size."""
    keys = ["_run", "method", "budget", "mode", "device", "precision"]
    return df.sort_values("batch_size").drop_duplicates(keys).reset_index(drop=True)


def accuracy_vs_gmacs(df: pd.DataFrame, folder: Path, pal: dict) -> Plot:
    plt, sns = _pyplot()
    m = _models(df).drop_duplicates(["_run", "method", "budget", "mode", "precision"]).copy()
    m["series"] = _series(m)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, g in m.groupby("series", sort=False):
        g = g.sort_values("gmacs")
        dense = g["method"].eq(DENSE)
        err = np.vstack([g["top1"] - g["top1_ci_low"], g["top1_ci_high"] - g["top1"]])
        ax.errorbar(g["gmacs"], g["top1"], yerr=err, color=pal[name], marker="*" if dense.all() else "o",
                    markersize=14 if dense.all() else 6, linestyle="none" if dense.all() else "-", capsize=3,
                    label=name, alpha=0.9)
    for _, d in m[m["method"] == DENSE].iterrows():
        ax.axhline(d["top1"], color="0.4", linestyle=":", linewidth=1)
    front = pareto(m)
    ax.step(front["gmacs"], front["top1"], where="post", color="black", linestyle="--", linewidth=1.2,
            label="Pareto front", zorder=0)
    ax.set_xlabel("GMACs per sample (mean over the test list)")
    ax.set_ylabel("top-1 (%) with 95% CI")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, folder, "accuracy_vs_gmacs", "Accuracy against compute",
                 "Top-1 against mean GMACs per sample, one line per method over its budgets (error bars: 95% "
                 "Wilson interval). The star and the dotted line are the dense model; the dashed step is the "
                 "Pareto front over every configuration.")


def accuracy_vs_speed(df: pd.DataFrame, folder: Path, pal: dict) -> Plot:
    plt, sns = _pyplot()
    d = df.copy()
    d["series"] = _series(d)
    d["where"] = d["device"].astype(str) + " " + d["precision"].astype(str) + " (" + d["device_name"].astype(str) + ")"
    places = list(dict.fromkeys(d["where"]))
    fig, axes = plt.subplots(len(places), 2, figsize=(11, 4.2 * len(places)), squeeze=False)
    for row, place in zip(axes, places):
        p = d[d["where"] == place]
        big, small = p["batch_size"].max(), p["batch_size"].min()
        for ax, bs, x, label in ((row[0], big, "img_per_s", f"throughput at batch {big} (img/s)"),
                                 (row[1], small, "latency_ms_p90", f"p90 latency at batch {small} (ms)")):
            q = p[p["batch_size"] == bs]
            sns.scatterplot(data=q, x=x, y="top1", hue="series", style="series", palette=pal, s=70, ax=ax, legend=ax is row[0])
            ax.set_xlabel(label)
            ax.set_ylabel("top-1 (%)")
            ax.set_title(place, fontsize=9)
        if row[0].get_legend() is not None:
            row[0].legend(fontsize=8, loc="lower right")
    return _save(fig, folder, "accuracy_vs_speed", "Accuracy against measured speed",
                 "Top-1 against throughput at the largest batch size (left; right is better) and against p90 "
                 "latency at the smallest batch size (right; left is better), per device and precision.")


def speedup_vs_gmacs(df: pd.DataFrame, folder: Path, pal: dict) -> Plot:
    plt, sns = _pyplot()
    d = df[df["method"] != DENSE].copy()
    d["series"] = _series(d)
    d["mac_reduction"] = 1.0 / d["gmacs_ratio"]
    d["batch"] = "batch " + d["batch_size"].astype(str)
    places = list(dict.fromkeys(d["device"].astype(str) + " " + d["precision"].astype(str))) or ["-"]
    fig, axes = plt.subplots(1, len(places), figsize=(6.5 * len(places), 5), squeeze=False)
    for ax, place in zip(axes[0], places):
        q = d[(d["device"].astype(str) + " " + d["precision"].astype(str)) == place]
        if len(q):
            sns.scatterplot(data=q, x="mac_reduction", y="speedup", hue="series", style="batch", palette=pal, s=70, ax=ax)
        hi = float(np.nanmax([q["mac_reduction"].max(), q["speedup"].max(), 1.0]) * 1.1)  # NaN: a cell that ran out of memory
        ax.plot([0, hi], [0, hi], color="black", linestyle="--", linewidth=1, label="speedup = GMACs reduction")
        ax.axhline(1.0, color="0.5", linewidth=0.8)
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_xlabel("GMACs reduction (dense GMACs / method GMACs)")
        ax.set_ylabel("realised speedup over dense (x)")
        ax.set_title(place, fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
    return _save(fig, folder, "speedup_vs_gmacs", "Realised speedup against the compute saved",
                 "Measured speedup over the dense model (timed interleaved in the same process) against the "
                 "GMACs reduction. The dashed diagonal is the physical limit: points below it lose time to "
                 "overheads (policy, gathers, padding, small-batch fixed costs).")


def compute_profile(df: pd.DataFrame, runs: dict[str, Run], folder: Path, pal: dict) -> Plot:
    plt, sns = _pyplot()
    m = _models(df).drop_duplicates(["_run", "method", "budget", "mode", "precision"]).copy()
    m["config"] = _series(m) + " " + m["budget"].astype(str)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.4]})
    styles = ["-", "--", ":", "-."]
    m["series"] = _series(m)
    for series, g in m.groupby("series", sort=False):
        shades = sns.dark_palette(pal[series], len(g) + 2, reverse=True)  # one shade of the method's colour per budget
        for k, (_, r) in enumerate(g.iterrows()):
            tokens = list(r.get("tokens_per_block") or [])
            if tokens:
                left.plot(range(1, len(tokens) + 1), tokens, color=shades[k], linestyle=styles[k % len(styles)],
                          marker="o", markersize=3, label=r["config"])
    left.set_xlabel("block")
    left.set_ylabel("tokens entering the block (mean, CLS included)")
    left.legend(fontsize=7, ncol=2)
    rows = []
    for _, r in m.iterrows():
        raw = runs[r["_run"]].raw(r.to_dict())
        if "gmacs_per_sample" in raw:
            rows.append(pd.DataFrame({"config": r["config"], "series": r["series"], "gmacs": raw["gmacs_per_sample"]}))
    if rows:
        per = pd.concat(rows, ignore_index=True)
        with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib 3.11's deprecated `vert` itself
            warnings.filterwarnings("ignore", message=".*vert: bool.*")
            sns.boxplot(data=per, y="config", x="gmacs", hue="series", palette=pal, ax=right, fliersize=2, legend=False,
                        orient="h")
    right.set_xlabel("GMACs per sample")
    right.set_ylabel("")
    return _save(fig, folder, "compute_profile", "Where the compute goes",
                 "Left: mean tokens entering each block per configuration. Right: distribution of per-sample "
                 "GMACs over the test list (box: quartiles, whiskers: 1.5 IQR), from each sample's own trace.")


def _overlay_choice(m: pd.DataFrame, target: float = 0.5) -> pd.DataFrame:
    """Per adaptive method, the budget whose GMACs ratio is nearest ``target``."""
    rows = []
    for _, g in m[m["method"] != DENSE].groupby(["_run", "method"], sort=False):
        distance = (g["gmacs_ratio"] - target).abs()
        if distance.notna().any():  # a method whose GMACs are all unknown has no budget to show
            rows.append(g.loc[distance.idxmin()])
    return pd.DataFrame(rows)


def token_overlays(df: pd.DataFrame, runs: dict[str, Run], folder: Path) -> Plot | None:
    """Test images with the number of blocks that computed each patch token drawn over them."""
    m = _models(df)
    chosen = _overlay_choice(m)
    maps, meta = [], None
    for _, r in chosen.iterrows():
        run = runs[r["_run"]]
        raw = run.raw(r.to_dict())
        if "token_blocks" not in raw or not (run.path / IMAGES_FILE).is_file():
            continue
        if meta is None:
            with np.load(run.path / IMAGES_FILE) as f:
                meta = {k: f[k] for k in f.files}
        maps.append((r, raw["token_blocks"]))
    if not maps or meta is None:
        return None
    plt, _ = _pyplot()
    images, (gh, gw) = meta["images"], (int(meta["grid"][0]), int(meta["grid"][1]))
    prefix, depth = int(meta["prefix_tokens"]), int(meta["depth"])
    k = min(len(images), min(len(t) for _, t in maps))
    fig, axes = plt.subplots(k, len(maps) + 1, figsize=(2.3 * (len(maps) + 1), 2.3 * k + 1.0), squeeze=False)
    h, w = images.shape[1:3]
    last = None
    for i in range(k):
        img = images[i]
        kw = {"cmap": "gray"} if img.shape[-1] == 1 else {}
        shown = img[..., 0] if img.shape[-1] == 1 else img
        axes[i, 0].imshow(shown, **kw)
        axes[i, 0].set_title(f"test image {i + 1}" if i == 0 else "", fontsize=8)
        for j, (r, tb) in enumerate(maps, start=1):
            grid = tb[i, prefix:].reshape(gh, gw)
            axes[i, j].imshow(shown, **kw)
            last = axes[i, j].imshow(grid, cmap="magma", vmin=0, vmax=depth, alpha=0.6, interpolation="nearest",
                                     extent=(0, w, h, 0))
            if i == 0:
                axes[i, j].set_title(f"{r['method']} {r['budget']}\n(GMACs ratio {r['gmacs_ratio']:.2f})", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, 1.0 / height, 1, 1))  # an inch at the bottom for the colour bar
    cax = fig.add_axes((0.2, 0.55 / height, 0.6, 0.15 / height))
    fig.colorbar(last, cax=cax, orientation="horizontal", label="blocks that computed the token (of %d)" % depth)
    return _save(fig, folder, "token_overlays", "Kept tokens and halting depth on test images",
                 "The first test images of the seeded list (the same for every method), each patch coloured by "
                 "the number of blocks that computed its token: ATS tokens dropped at a sampling stage, A-ViT "
                 "halting depth, AdaViT kept patches. One budget per method, the one nearest half the dense GMACs.",
                 layout=False)


def draw_all(df: pd.DataFrame, runs: list[Run], folder: Path) -> list[Plot]:
    """Every plot the data allows, in the order of the issue; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    df = df.replace([np.inf, -np.inf], np.nan)  # an axis cannot reach infinity: such a value is left out, as NaN is
    by_id = {str(r.path): r for r in runs}
    pal = palette(df)
    plots = [accuracy_vs_gmacs(df, folder, pal), accuracy_vs_speed(df, folder, pal)]
    if (df["method"] != DENSE).any():
        plots.append(speedup_vs_gmacs(df, folder, pal))
    plots.append(compute_profile(df, by_id, folder, pal))
    overlay = token_overlays(df, by_id, folder)
    if overlay is not None:
        plots.append(overlay)
    return plots
