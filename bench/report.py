"""``bench report``: leaderboards (Markdown, CSV and a self-contained HTML page with plots) under
``reports/`` from one or more runs."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from .errors import UsageError
from .store import Run, atomic_write, replace_folder, staging_folder

# Units live in column names (docs/design.md#contracts).
COLUMNS = [
    "method", "arxiv", "backbone", "checkpoint", "mode", "budget", "dataset", "device", "precision", "batch_size",
    "top1", "top1_ci_low", "top1_ci_high", "top5", "gmacs", "gmacs_p50", "gmacs_p90", "gmacs_ratio",
    "param_count_m", "latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "img_per_s", "img_per_s_iqr",
    "speedup", "padding_waste", "peak_mem_mb", "n_samples", "device_name", "threads", "run_id",
]


def load(runs: list[Run]) -> pd.DataFrame:
    frames = []
    for run in runs:
        df = run.dataframe()
        if df.empty:
            raise UsageError(f"run {run.path} has no finished cells yet; finish it with `bench run --resume {run.id}`")
        frames.append(df.assign(_run=str(run.path)))  # which folder a row came from (run_id may repeat in copies)
    return pd.concat(frames, ignore_index=True)


def run_names(df: pd.DataFrame) -> pd.Series:
    """Each row's run as a reader tells runs apart: the folder name, or the whole path where two
    compared runs share a name (copies in two results folders)."""
    names = df["_run"].map(lambda p: Path(p).name)
    return names if names.nunique() == df["_run"].nunique() else df["_run"]


def leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in COLUMNS if c in df.columns]
    out = df[cols].copy()
    if df["_run"].nunique() > 1:  # rows of two runs would look the same without it
        out.insert(0, "run", run_names(df))
    order = {m: i for i, m in enumerate(dict.fromkeys(out["method"]))}
    out["_m"] = out["method"].map(order)
    keys = [k for k in ("dataset", "device", "precision", "batch_size", "_m", "gmacs", "run") if k in out.columns]
    out = out.sort_values(keys, ascending=[k != "gmacs" for k in keys], kind="stable")
    return out.drop(columns="_m").reset_index(drop=True)


def run_lines(runs: list[Run]) -> list[str]:
    """One line per run: what produced the numbers (profile, weights, versions, commit)."""
    lines = []
    for run in runs:
        m = run.manifest()
        lines.append(
            f"run `{run.id}`: profile `{m.get('profile')}`, backbone `{m.get('backbone', {}).get('name')}` "
            f"(checkpoint `{Path(str(m.get('checkpoint', ''))).name}`, sha256 `{str(m.get('checkpoint_sha256', ''))[:12]}`), "
            f"torch {m.get('versions', {}).get('torch')}, timm {m.get('versions', {}).get('timm')}, "
            f"{m.get('threads')} threads, commit `{str((m.get('git') or {}).get('commit'))[:10]}`, status {m.get('status')}"
        )
    return lines


NOTES = ("gmacs: multiply-accumulates per sample (fvcore convention, mean over the test list), from each sample's "
         "trace. speedup: dense median time / method median time, measured interleaved in the same process. "
         "top1 CI: 95% Wilson interval.")


def markdown(df: pd.DataFrame, runs: list[Run]) -> str:
    from . import verdict

    lines = ["# bench leaderboard", ""]
    for run in runs:  # the answer first
        section = verdict.markdown(*verdict.of_run(run))
        lines += [section] if section else []
    lines += [f"- {line}" for line in run_lines(runs)]
    lines += ["", NOTES, ""]
    show = df.copy()
    show["top1"] = [f"{t:.2f} [{lo:.1f}, {hi:.1f}]" for t, lo, hi in zip(df["top1"], df["top1_ci_low"], df["top1_ci_high"])]
    show = show.drop(columns=[c for c in ("top1_ci_low", "top1_ci_high", "run_id", "device_name") if c in show.columns])
    for col in show.columns:  # format numbers here: tabulate would also reformat '2111.15667' as a number
        if pd.api.types.is_float_dtype(show[col]):
            show[col] = show[col].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
    lines.append(show.to_markdown(index=False, disable_numparse=True))
    return "\n".join(lines) + "\n"


def write(runs: list[Run], out_root: Path, flag: str = "--out") -> Path:
    """leaderboard.csv / .md, plots/*.png + .svg and report.html under ``out_root/<run ids>/``,
    built in a hidden folder beside it and renamed into place: a kill leaves the previous report
    whole. ``flag`` is the option that sets ``out_root`` (``bench run`` calls it --reports)."""
    raw_df = load(runs)
    name = "+".join(r.id for r in runs)
    folder = Path(out_root) / name
    try:
        staging = staging_folder(Path(out_root), name)
    except OSError as e:
        raise UsageError(f"report folder {folder} cannot be written ({e.strerror or e}); pass {flag} to a writable folder") from None
    try:
        _write_files(runs, raw_df, name, staging)
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _write_files(runs: list[Run], raw_df: pd.DataFrame, name: str, folder: Path) -> None:
    from . import html, plots

    df = leaderboard(raw_df)
    atomic_write(folder / "leaderboard.csv", df.to_csv(index=False, float_format="%.6g").encode())
    sections = counting_sections(runs)
    atomic_write(folder / "leaderboard.md", (markdown(df, runs) + "".join(f"\n{md}" for md, _ in sections)).encode())
    figures = plots.draw_all(raw_df, runs, folder / "plots")
    lines = [line.replace("`", "") for line in run_lines(runs)]
    page = html.page(f"bench report {name}", lines, NOTES, df, figures, folder, extra="".join(h for _, h in sections))
    atomic_write(folder / "report.html", page.encode())


def counting_sections(runs: list[Run]) -> list[tuple[str, str]]:
    """(Markdown, HTML) of each run's counting table, where `bench flops --run` left one
    (docs/counting.md#every-counter)."""
    import html as html_mod

    from . import flops
    from .html import table

    out = []
    for run in runs:
        sec = flops.load_section(run.path)
        if sec is None:
            continue
        md = flops.section_markdown(sec["about"], sec["rows"], sec["notes"])
        df = pd.DataFrame(sec["rows"], columns=sec["headers"])
        notes = "".join(f"<li>{html_mod.escape(f'{k}: {v}')}</li>" for k, v in sec["notes"].items())
        out.append((md, f"<h2>GMACs as every counter counts them (run {html_mod.escape(run.id)})</h2>"
                        f"<p>{html_mod.escape(flops.describe(sec['about']).replace('`', ''))}</p>{table(df, table_id=f'flops-{run.id}')}<ul>{notes}</ul>"))
    return out
