"""The verdict: at each matched compute point, which method is most accurate, and is it really faster.

One row per method and ``gmacs:R`` budget of a run (docs/measurement.md#verdict): top-1 and its
difference to the dense model with a paired 95% interval (the same test images, per-sample
correctness from the raw arrays), the GMACs ratio reached, the speedup at batch 1 and at the
largest batch, whether the row is on the accuracy/GMACs Pareto front, and a plain marker where the
method is slower than dense. Rows are ordered by compute point, then by top-1.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd

import methods

Z95 = 1.959964


def paired_difference(method: np.ndarray, dense: np.ndarray) -> tuple[float, float, float]:
    """Top-1 difference in points and its 95% interval from per-sample correctness on the same
    images (normal approximation of the mean of the paired differences)."""
    d = method.astype(np.float64) - dense.astype(np.float64)
    mean = float(d.mean()) * 100
    half = Z95 * float(d.std(ddof=1)) / math.sqrt(len(d)) * 100 if len(d) > 1 else float("nan")
    return mean, mean - half, mean + half


def knob_label(record: dict) -> str:
    """``gmacs=0.7 (keep=0.41)``: the target and the knob value found for it."""
    value = record.get("calibrated_value")
    shown = f"{value:.3g}" if isinstance(value, float) else str(value)
    mark = "" if record.get("gmacs_matched", True) else ", not reached"
    return f"gmacs={record['gmacs_target']:g} ({record.get('calibrated_knob')}={shown}{mark})"


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """(top-1, GMACs ratio) pairs: True where no other pair is at least as accurate with at most
    the compute and strictly better in one."""
    return [not any(t2 >= t and g2 <= g and (t2 > t or g2 < g) for t2, g2 in points) for t, g in points]


def rows(records: list[dict], correct_of: Callable[[dict], np.ndarray | None]) -> pd.DataFrame:
    """The verdict rows of one run's records (one device and precision: the first of each)."""
    df = pd.DataFrame(records)
    if df.empty or "gmacs_target" not in df.columns:
        return pd.DataFrame()
    df = df[(df["device"] == df["device"].iloc[0]) & (df["precision"] == df["precision"].iloc[0])]
    dense = df[df["method"] == methods.DENSE]
    matched = df[df["gmacs_target"].notna()]
    if dense.empty or matched.empty:
        return pd.DataFrame()
    dense_correct = correct_of(dense.iloc[0].to_dict())
    largest = int(df["batch_size"].max())
    out = []
    for (method, budget), g in matched.groupby(["method", "budget"], sort=False):
        r = g.iloc[0].to_dict()
        correct = correct_of(r)
        diff = paired_difference(correct, dense_correct) if correct is not None and dense_correct is not None else (float("nan"),) * 3
        out.append({
            "target": r["gmacs_target"], "method": method, "budget": knob_label(r), "top1": r["top1"],
            "delta_top1": diff[0], "delta_ci_low": diff[1], "delta_ci_high": diff[2], "gmacs_ratio": r["gmacs_ratio"],
            "speedup_bs1": _speedup(g, 1), f"speedup_bs{largest}": _speedup(g, largest),
        })
    table = pd.DataFrame(out).sort_values(["target", "top1"], ascending=[True, False]).reset_index(drop=True)
    table["pareto"] = pareto(list(zip(table["top1"], table["gmacs_ratio"])))
    speed = [c for c in table.columns if c.startswith("speedup_bs")]
    table["slower_than_dense"] = (table[speed] < 1.0).any(axis=1)
    return table


def _speedup(group: pd.DataFrame, batch_size: int) -> float:
    hit = group[group["batch_size"] == batch_size]
    return float(hit["speedup"].iloc[0]) if len(hit) else float("nan")


def header(records: list[dict]) -> str:
    """The constants of a run, on one line."""
    r = records[0]
    keys = ("dataset", "backbone", "checkpoint", "device", "precision", "threads", "n_samples")
    return ", ".join(f"{k} {r.get(k)}" for k in keys if r.get(k) not in (None, ""))


def cells(table: pd.DataFrame) -> list[list[str]]:
    """The verdict rows as display strings (Markdown, terminal and HTML share them)."""
    speed = [c for c in table.columns if c.startswith("speedup_bs")]
    out = []
    for _, r in table.iterrows():
        delta = "-" if math.isnan(r["delta_top1"]) else f"{r['delta_top1']:+.1f} [{r['delta_ci_low']:+.1f}, {r['delta_ci_high']:+.1f}]"
        marks = ("Pareto" if r["pareto"] else "") + (" SLOWER than dense" if r["slower_than_dense"] else "")
        out.append([f"{r['target']:g}", r["method"], r["budget"], f"{r['top1']:.1f}", delta, f"{r['gmacs_ratio']:.3f}",
                    *[f"{r[c]:.2f}x" for c in speed], marks.strip()])
    return out


def columns(table: pd.DataFrame) -> list[str]:
    speed = [c.replace("speedup_", "speedup ") for c in table.columns if c.startswith("speedup_bs")]
    return ["GMACs target", "method", "budget", "top-1 %", "vs dense (pts, 95% CI)", "GMACs ratio", *speed, ""]


def of_run(run) -> tuple[pd.DataFrame, list[dict]]:
    """The verdict table of a stored run, and its records."""
    records = run.records()

    def correct(record: dict) -> np.ndarray | None:
        return run.raw(record).get("correct1")

    return rows(records, correct), records


def markdown(table: pd.DataFrame, records: list[dict]) -> str:
    """The verdict section of leaderboard.md ('' when the run has no matched compute points)."""
    if table.empty:
        return ""
    lines = ["## Verdict at matched compute", "", header(records), ""]
    lines.append("| " + " | ".join(columns(table)) + " |")
    lines.append("|" + " --- |" * len(columns(table)))
    lines += ["| " + " | ".join(row) + " |" for row in cells(table)]
    return "\n".join(lines) + "\n"
