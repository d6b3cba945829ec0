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


RUN_STYLES = (("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", (0, (5, 1))), ("P", (0, (1, 1))))
DENSE_MARKER, DENSE_SIZE = "*", 15  # the dense model looks the same in every plot


def _run_name(df: pd.DataFrame) -> pd.Series:
    return df["_run"].map(lambda p: Path(p).name)


def _series(df: pd.DataFrame) -> pd.Series:
    """A legend entry: the method, or method and run when several runs are compared."""
    if df["_run"].nunique() > 1:
        return df["method"] + " (" + _run_name(df) + ")"
    return df["method"]


def palette(df: pd.DataFrame) -> dict[str, tuple]:
    """One colour per method for every plot (and every run), in the order the runs list the methods."""
    _, sns = _pyplot()
    names = list(dict.fromkeys(df["method"]))
    colours = sns.color_palette("tab10", 10)
    return {n: colours[i % len(colours)] for i, n in enumerate(names)}


def run_styles(df: pd.DataFrame) -> dict[str, tuple]:
    """(marker, line style) per run: what tells compared runs apart while colours stay methods."""
    return {run: RUN_STYLES[i % len(RUN_STYLES)] for i, run in enumerate(dict.fromkeys(df["_run"]))}


def _marker(method: str, run: str, styles: dict) -> tuple[str, float]:
    return (DENSE_MARKER, DENSE_SIZE) if method == DENSE else (styles[run][0], 7)


def _context(df: pd.DataFrame) -> str:
    """Data set and backbone, for a figure read on its own (a PNG outside the report)."""
    parts = []
    for col in ("dataset", "backbone"):
        if col in df.columns:
            parts.append(", ".join(map(str, dict.fromkeys(df[col].dropna()))))
    return " on ".join(p for p in parts if p)


def _title(fig, title: str, df: pd.DataFrame) -> None:
    fig.suptitle(f"{title} ({_context(df)})" if _context(df) else title, fontsize=11)


def _label_budgets(ax, g: pd.DataFrame, x: str, y: str) -> None:
    """The budget beside each adaptive point (the dense model has one setting)."""
    for _, r in g.iterrows():
        if r["method"] != DENSE and np.isfinite(r[x]) and np.isfinite(r[y]):
            ax.annotate(str(r["budget"]), (r[x], r[y]), xytext=(4, 3), textcoords="offset points", fontsize=6.5, color="0.25")


def _legend_outside(ax, **kw) -> None:
    """The legend to the right of the axes, never over the data."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kw)


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


def _draw_series(ax, g: pd.DataFrame, x: str, y: str, colour, styles: dict, label: str, line: bool = True) -> None:
    """One method of one run: its points (budget-labelled), joined over budgets when ``line``."""
    method, run = g["method"].iloc[0], g["_run"].iloc[0]
    marker, size = _marker(method, run, styles)
    style = styles[run][1] if line and method != DENSE else "none"
    ax.plot(g[x], g[y], color=colour, marker=marker, markersize=size, linestyle=style, label=label, alpha=0.9)
    _label_budgets(ax, g, x, y)


def accuracy_vs_gmacs(df: pd.DataFrame, folder: Path, pal: dict) -> Plot:
    plt, sns = _pyplot()
    m = _models(df).drop_duplicates(["_run", "method", "budget", "mode", "precision"]).copy()
    m["series"] = _series(m)
    styles = run_styles(df)
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, g in m.groupby("series", sort=False):
        g = g.sort_values("gmacs")
        err = np.vstack([g["top1"] - g["top1_ci_low"], g["top1_ci_high"] - g["top1"]])
        ax.errorbar(g["gmacs"], g["top1"], yerr=err, color=pal[g["method"].iloc[0]], linestyle="none", capsize=3, alpha=0.6)
        _draw_series(ax, g, "gmacs", "top1", pal[g["method"].iloc[0]], styles, name)
    for _, d in m[m["method"] == DENSE].iterrows():
        ax.axhline(d["top1"], color="0.4", linestyle=":", linewidth=1)
    front = pareto(m)
    ax.step(front["gmacs"], front["top1"], where="post", color="black", linestyle="--", linewidth=1.2,
            label="Pareto front", zorder=0)
    ax.set_xlabel("GMACs per sample (mean over the test list)")
    ax.set_ylabel("top-1 (%) with 95% CI")
    _legend_outside(ax)
    _title(fig, "Accuracy against compute", m)
    return _save(fig, folder, "accuracy_vs_gmacs", "Accuracy against compute",
                 "Top-1 against mean GMACs per sample, one line per method over its budgets (labelled beside each "
                 "point; error bars: 95% Wilson interval). The star and the dotted line are the dense model; the "
                 "dashed step is the Pareto front over every configuration. Colour: method; with several runs, "
                 "marker and line style: run.")


def _speed_panel(ax, q: pd.DataFrame, x: str, pal: dict, styles: dict) -> None:
    """Accuracy against one speed column, with the dense model's value as a dotted reference line."""
    for name, g in q.groupby("series", sort=False):
        _draw_series(ax, g, x, "top1", pal[g["method"].iloc[0]], styles, name, line=False)
    for _, d in q[q["method"] == DENSE].iterrows():
        if np.isfinite(d[x]):
            ax.axvline(d[x], color="0.4", linestyle=":", linewidth=1, label="dense model")


def accuracy_vs_speed(df: pd.DataFrame, folder: Path, pal: dict) -> Plot:
    plt, sns = _pyplot()
    d = df.copy()
    d["series"] = _series(d)
    d["where"] = d["device"].astype(str) + " " + d["precision"].astype(str) + " (" + d["device_name"].astype(str) + ")"
    places = list(dict.fromkeys(d["where"]))
    styles = run_styles(df)
    fig, axes = plt.subplots(len(places), 2, figsize=(13, 4.4 * len(places)), squeeze=False)
    for row, place in zip(axes, places):
        p = d[d["where"] == place]
        big, small = p["batch_size"].max(), p["batch_size"].min()
        for ax, bs, x, label in ((row[0], big, "img_per_s", f"throughput at batch {big} (img/s)"),
                                 (row[1], small, "latency_ms_p90", f"p90 latency at batch {small} (ms)")):
            _speed_panel(ax, p[p["batch_size"] == bs], x, pal, styles)
            ax.set_xlabel(label)
            ax.set_ylabel("top-1 (%)")
            ax.set_title(place, fontsize=9)
        _legend_outside(row[1])
    _title(fig, "Accuracy against measured speed", d)
    return _save(fig, folder, "accuracy_vs_speed", "Accuracy against measured speed",
                 "Top-1 against throughput at the largest batch size (left; right is better) and against p90 "
                 "latency at the smallest batch size (right; left is better), per device and precision. The star "
                 "and the dotted line are the dense model; budgets are labelled beside the points.")


def speedup_vs_gmacs(df: pd.DataFrame, folder: Path, pal: dict) -> Plot:
    plt, sns = _pyplot()
    d = df[df["method"] != DENSE].copy()
    d["batch"] = "batch " + d["batch_size"].astype(str)
    d["place"] = d["device"].astype(str) + " " + d["precision"].astype(str)
    if df["_run"].nunique() > 1:  # one panel per run: the runs do not draw over each other
        d["place"] = _run_name(d) + ": " + d["place"]
    d["mac_reduction"] = 1.0 / d["gmacs_ratio"]
    places = list(dict.fromkeys(d["place"])) or ["-"]
    fig, axes = plt.subplots(1, len(places), figsize=(6.5 * len(places) + 2, 5), squeeze=False)
    for ax, place in zip(axes[0], places):
        q = d[d["place"] == place]
        if len(q):
            sns.scatterplot(data=q, x="mac_reduction", y="speedup", hue="method", style="batch", palette=pal, s=70, ax=ax,
                            legend=place == places[-1])  # one legend, beside the last panel
            _label_budgets(ax, q, "mac_reduction", "speedup")
        hi = float(np.nanmax([q["mac_reduction"].max(), q["speedup"].max(), 1.0]) * 1.1)  # NaN: a cell that ran out of memory
        ax.plot([0, hi], [0, hi], color="black", linestyle="--", linewidth=1, label="speedup = GMACs reduction")
        ax.axhline(1.0, color="0.5", linewidth=0.8, label="1.0: as fast as dense")
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_xlabel("GMACs reduction (dense GMACs / method GMACs)")
        ax.set_ylabel("realised speedup over dense (x)")
        ax.set_title(place, fontsize=9)
    _legend_outside(axes[0][-1], title="method, batch size")
    _title(fig, "Realised speedup against the compute saved", d)
    return _save(fig, folder, "speedup_vs_gmacs", "Realised speedup against the compute saved",
                 "Measured speedup over the dense model (timed interleaved in the same process) against the "
                 "GMACs reduction, budgets labelled. The dashed diagonal is the physical limit: points below it "
                 "lose time to overheads (policy, gathers, padding, small-batch fixed costs); below the grey 1.0 "
                 "line the method is slower than dense.")


def _profile_rows(m: pd.DataFrame) -> pd.DataFrame:
    """Configurations in reading order: methods as the runs list them (dense first), then by
    compute, most first, then by run."""
    order = {name: i for i, name in enumerate(dict.fromkeys(m["method"]))}
    runs = {name: i for i, name in enumerate(dict.fromkeys(m["_run"]))}
    return m.assign(_m=m["method"].map(order), _r=m["_run"].map(runs)).sort_values(
        ["_m", "gmacs", "_r"], ascending=[True, False, True], kind="stable").drop(columns=["_m", "_r"])


def _token_lines(ax, m: pd.DataFrame, pal: dict, styles: dict) -> None:
    for method, g in m.groupby("method", sort=False):
        shades = _shades(pal[method], len(g))  # one shade of the method's colour per budget
        for k, (_, r) in enumerate(g.iterrows()):
            tokens = list(r.get("tokens_per_block") or [])
            marker, size = _marker(method, r["_run"], styles)
            if tokens:
                ax.plot(range(1, len(tokens) + 1), tokens, color=shades[k], linestyle=styles[r["_run"]][1],
                        marker=marker, markersize=size / 2, label=r["config"])


def _shades(colour, n: int) -> list:
    _, sns = _pyplot()
    return sns.dark_palette(colour, n + 2, reverse=True)[:n]


def compute_profile(df: pd.DataFrame, runs: dict[str, Run], folder: Path, pal: dict) -> Plot:
    plt, sns = _pyplot()
    m = _profile_rows(_models(df).drop_duplicates(["_run", "method", "budget", "mode", "precision"]).copy())
    m["config"] = _series(m) + " " + m["budget"].astype(str)
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.8 + max(4.5, 0.32 * len(m))), gridspec_kw={"width_ratios": [1, 1.2]})
    _token_lines(left, m, pal, run_styles(df))
    left.set_xlabel("block")
    left.set_ylabel("tokens entering the block (mean, CLS included)")
    handles, labels = left.get_legend_handles_labels()
    legend_rows = -(-len(labels) // 4)
    rows = []
    for _, r in m.iterrows():
        raw = runs[r["_run"]].raw(r.to_dict())
        if "gmacs_per_sample" in raw:
            rows.append(pd.DataFrame({"config": r["config"], "method": r["method"], "gmacs": raw["gmacs_per_sample"]}))
    if rows:
        per = pd.concat(rows, ignore_index=True)
        with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib 3.11's deprecated `vert` itself
            warnings.filterwarnings("ignore", message=".*vert: bool.*")
            sns.boxplot(data=per, y="config", x="gmacs", hue="method", palette=pal, ax=right, fliersize=2, legend=False,
                        orient="h", order=list(dict.fromkeys(per["config"])))
    right.set_xlabel("GMACs per sample")
    right.set_ylabel("")
    _title(fig, "Where the compute goes", m)
    fig.set_figheight(fig.get_figheight() + 0.17 * legend_rows)
    below = (0.25 + 0.17 * legend_rows) / fig.get_figheight()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)  # under both axes, over no line
    fig.tight_layout(rect=(0, below, 1, 1))
    return _save(fig, folder, "compute_profile", "Where the compute goes",
                 "Left: mean tokens entering each block per configuration. Right: distribution of per-sample "
                 "GMACs over the test list (box: quartiles, whiskers: 1.5 IQR), from each sample's own trace; rows "
                 "by method, then by compute, most first.", layout=False)


def _overlay_choice(m: pd.DataFrame, target: float = 0.5) -> pd.DataFrame:
    """Per adaptive method, the budget whose GMACs ratio is nearest ``target``."""
    rows = []
    for _, g in m[m["method"] != DENSE].groupby(["_run", "method"], sort=False):
        distance = (g["gmacs_ratio"] - target).abs()
        if distance.notna().any():  # a method whose GMACs are all unknown has no budget to show
            rows.append(g.loc[distance.idxmin()])
    return pd.DataFrame(rows)


def _overlay_maps(chosen: pd.DataFrame, runs: dict[str, Run]) -> tuple[list, dict | None]:
    """(row, token_blocks) per chosen configuration that stored a token map, and the images' record."""
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
    return maps, meta


OVERLAY_ALPHA = 0.6


def _blended_colour_bar(fig, cax, depth: int) -> None:
    """The colour scale as it appears on the images: each colour blended over a black and a white
    pixel (the overlay is drawn at ``OVERLAY_ALPHA`` over the grey image), not the bare colour map."""
    import matplotlib

    levels = np.arange(depth + 1)
    colours = matplotlib.colormaps["magma"](levels / depth)[:, :3]
    strip = np.stack([OVERLAY_ALPHA * colours + (1 - OVERLAY_ALPHA) * grey for grey in (0.0, 1.0)])
    cax.imshow(strip, aspect="auto", extent=(-0.5, depth + 0.5, 1.5, -0.5), interpolation="nearest")
    cax.set_yticks([0, 1], ["over black", "over white"], fontsize=7)
    cax.set_xticks(levels)
    cax.tick_params(axis="x", labelsize=7)
    cax.set_xlabel(f"blocks that computed the token (of {depth})", fontsize=8)
    cax.grid(False)


def token_overlays(df: pd.DataFrame, runs: dict[str, Run], folder: Path) -> Plot | None:
    """Test images with the number of blocks that computed each patch token drawn over them."""
    maps, meta = _overlay_maps(_overlay_choice(_models(df)), runs)
    if not maps or meta is None:
        return None
    plt, _ = _pyplot()
    images, (gh, gw) = meta["images"], (int(meta["grid"][0]), int(meta["grid"][1]))
    prefix, depth = int(meta["prefix_tokens"]), int(meta["depth"])
    k = min(len(images), min(len(t) for _, t in maps))
    fig, axes = plt.subplots(k, len(maps) + 1, figsize=(2.3 * (len(maps) + 1), 2.5 * k + 1.4), squeeze=False)
    h, w = images.shape[1:3]
    several = df["_run"].nunique() > 1
    for i in range(k):
        img = images[i]
        kw = {"cmap": "gray"} if img.shape[-1] == 1 else {}
        shown = img[..., 0] if img.shape[-1] == 1 else img
        axes[i, 0].imshow(shown, **kw)
        axes[i, 0].set_title(f"test image {i + 1}", fontsize=8)  # every row labelled: a tall figure is read row by row
        for j, (r, tb) in enumerate(maps, start=1):
            axes[i, j].imshow(shown, **kw)
            axes[i, j].imshow(tb[i, prefix:].reshape(gh, gw), cmap="magma", vmin=0, vmax=depth, alpha=OVERLAY_ALPHA,
                              interpolation="nearest", extent=(0, w, h, 0))
            run = f" [{Path(r['_run']).name}]" if several else ""
            axes[i, j].set_title(f"{r['method']} {r['budget']}{run}\n(GMACs ratio {r['gmacs_ratio']:.2f})", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    height = fig.get_figheight()
    _title(fig, "Kept tokens and halting depth", df)
    fig.tight_layout(rect=(0, 1.3 / height, 1, 1 - 0.3 / height))  # room for the colour bar below, the title above
    _blended_colour_bar(fig, fig.add_axes((0.2, 0.55 / height, 0.6, 0.3 / height)), depth)
    return _save(fig, folder, "token_overlays", "Kept tokens and halting depth on test images",
                 "The first test images of the seeded list (the same for every method), each patch coloured by "
                 "the number of blocks that computed its token: ATS tokens dropped at a sampling stage, A-ViT "
                 "halting depth, AdaViT kept patches. One budget per method, the one nearest half the dense GMACs. "
                 "The colour bar shows each colour as blended over a black and a white pixel.",
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
