"""``bench compare BASELINE CURRENT`` and ``bench baseline update``: regression gates that fit ML.

Cells are matched by their identity columns (``store.IDENTITY``). Per metric
(docs/prior_art.md#regression-gates-that-fit-ml; docs/measurement.md#regression-gates):

- accuracy, in points, aware of the confidence interval: a top-1 change counts only when it is
  larger than ``accuracy_points`` and than the confidence interval of the difference. Both runs
  score the same seeded test list, so where both have per-sample correctness (``raw/``) the
  interval is the paired one (an unchanged model has a zero-width interval); otherwise the
  unpaired one of two proportions;
- gmacs, relative and tight: counts come from traces by closed forms, so they are deterministic;
- speed, only as ``speedup`` (the ratio to the dense model timed interleaved in the same run), so
  a different or busier machine does not trip it; a drop counts when it is larger than
  ``speed_rel`` and than the measured noise (a bootstrap over the paired timed iterations).

Improvements are reported too; ``stale`` in ``fail_on`` makes them fail (the baseline is out of
date). Cells of the baseline missing from the current run fail the ``missing`` gate, and so do cells
that ran out of memory in the current run (status ``oom``: accuracy and GMACs, but no timing).
"""
from __future__ import annotations

import datetime as _dt
import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from methods import DENSE

from . import cache
from .errors import UsageError
from .store import IDENTITY, MANIFEST, RECORDS, Run, replace_folder, staging_folder

GATES = ("accuracy", "gmacs", "speed", "missing", "stale")
TOLERANCE_KEYS = {"accuracy": "accuracy_points", "gmacs": "gmacs_rel", "speed": "speed_rel"}
BASELINES = "baselines"


@dataclass(frozen=True)
class Thresholds:
    """Defaults; ``[compare]`` in bench.toml and ``--tolerance`` / ``--fail-on`` override them."""

    accuracy_points: float = 1.0  # top-1 change (points) that counts, if also outside the CI of the difference
    gmacs_rel: float = 0.005  # relative GMACs change that counts
    speed_rel: float = 0.3  # relative change of the speedup over dense that counts, if also above the noise
    confidence: float = 0.95  # of the accuracy and speedup intervals
    fail_on: tuple[str, ...] = ("accuracy", "gmacs", "speed", "missing")


def parse_fail_on(value: str | list[str]) -> tuple[str, ...]:
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if items == ["none"]:
        return ()
    if items == ["all"]:
        return GATES
    for v in items:
        if v not in GATES:
            raise UsageError(f"unknown gate '{v}' in fail-on; use a comma list of {', '.join(GATES)}, or all / none")
    return tuple(items)


def _fraction(key: str, text: str) -> float:
    t = text.strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UsageError(f"--tolerance {key}={text}: not a number (e.g. accuracy=0.5, gmacs=1%, speed=0.4)") from None


def thresholds(settings: dict, tolerance: list[str] | None = None, fail_on: str | None = None) -> Thresholds:
    """``settings`` is bench.toml's ``[compare]`` table; then the command-line overrides."""
    values = {k: v for k, v in settings.items() if k != "fail_on"}
    th = Thresholds(**values)
    if "fail_on" in settings:
        th = replace(th, fail_on=parse_fail_on(settings["fail_on"]))
    for item in tolerance or []:
        for part in (p for p in item.split(",") if p.strip()):
            key, sep, val = part.partition("=")
            key = key.strip()
            if not sep or key not in TOLERANCE_KEYS:
                raise UsageError(f"--tolerance '{part}': use {', '.join(k + '=N' for k in TOLERANCE_KEYS)} "
                                 "(points for accuracy, relative for gmacs and speed, e.g. speed=40%)")
            number = _fraction(key, val) if key != "accuracy" else _fraction(key, val.rstrip("pt "))
            if number < 0:
                raise UsageError(f"--tolerance {part}: must not be negative")
            th = replace(th, **{TOLERANCE_KEYS[key]: number})
    if fail_on is not None:
        th = replace(th, fail_on=parse_fail_on(fail_on))
    if not 0 < th.confidence < 1:
        raise UsageError(f"[compare] confidence must lie in (0, 1), got {th.confidence}")
    return th


# ----------------------------------------------------------------------------------------------
# finding and checking the two sides


def find(ref: str, results: Path) -> Run:
    """A run id or path, ``latest``, or a baseline: a folder, or a profile name under results/baselines/."""
    p = Path(ref)
    if (p / MANIFEST).is_file():
        return Run(p)
    if (Path(results) / BASELINES / ref / MANIFEST).is_file():
        return Run(Path(results) / BASELINES / ref)
    if not p.exists() and not (Path(results) / ref).exists() and ref != "latest":
        raise UsageError(f"no run or baseline '{ref}' (looked for {p}, {Path(results) / ref} and "
                         f"{Path(results) / BASELINES / ref}); pass a path, or --results for another results root")
    return Run.find(Path(results), ref)


def _frame(run: Run, role: str) -> pd.DataFrame:
    df = run.dataframe()
    if df.empty:
        raise UsageError(f"{role} {run.path} has no finished cells; finish it with `bench run --resume {run.id}` or pick another run")
    missing = [c for c in IDENTITY if c not in df.columns]
    if missing:
        raise UsageError(f"{role} {run.path}/{RECORDS} lacks the identity columns {', '.join(missing)}; it is not a bench run")
    df = df.copy()
    df["_key"] = df[list(IDENTITY)].astype(str).agg("|".join, axis=1)
    return df.drop_duplicates("_key", keep="last").set_index("_key")


def check_comparable(base: Run, cur: Run) -> list[str]:
    """Refuse what cannot be compared (another profile, data set or backbone); return notes on what
    differs but can be (checkpoint, machine)."""
    bm, cm = base.manifest(), cur.manifest()
    for what, get in (("profile", lambda m: m.get("profile")),
                      ("data set", lambda m: (m.get("config") or {}).get("dataset")),
                      ("backbone", lambda m: (m.get("config") or {}).get("backbone"))):
        b, c = get(bm), get(cm)
        if b != c:
            raise UsageError(f"baseline {base.path} was measured with {what} '{b}' but {cur.path} with '{c}'; "
                             f"compare runs of the same {what}, or refresh the baseline with `bench baseline update`")
    notes = []
    if bm.get("checkpoint_sha256") != cm.get("checkpoint_sha256"):
        notes.append(f"backbone checkpoints differ (sha256 {str(bm.get('checkpoint_sha256'))[:12]} vs "
                     f"{str(cm.get('checkpoint_sha256'))[:12]})")
    return notes


# ----------------------------------------------------------------------------------------------
# the statistics


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def accuracy_halfwidth(b: pd.Series, c: pd.Series, b_raw: dict, c_raw: dict, z: float) -> tuple[float, str]:
    """Half-width (points) of the CI of top-1(current) - top-1(baseline), and 'paired'/'unpaired'."""
    x, y = b_raw.get("correct1"), c_raw.get("correct1")
    if x is not None and y is not None and len(x) == len(y) and len(x) > 1:
        d = y.astype(np.float64) - x.astype(np.float64)
        return 100.0 * z * float(d.std(ddof=1)) / math.sqrt(len(d)), "paired"
    p1, p2 = b["top1"] / 100, c["top1"] / 100
    n1, n2 = max(int(b["n_samples"]), 1), max(int(c["n_samples"]), 1)
    return 100.0 * z * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2), "unpaired"


def speedup_log_sd(raw: dict, reps: int = 400, seed: int = 0) -> float:
    """Standard deviation of log(speedup) by bootstrap over the paired timed iterations (the model
    and the dense reference were timed interleaved, iteration by iteration); 0 without raw times."""
    m, d = raw.get("iter_seconds"), raw.get("dense_iter_seconds")
    if m is None or d is None or len(m) != len(d) or len(m) < 3:
        return 0.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(m), size=(reps, len(m)))
    ratios = np.median(d[idx], axis=1) / np.median(m[idx], axis=1)
    return float(np.log(ratios).std())


# ----------------------------------------------------------------------------------------------
# the comparison


@dataclass
class Comparison:
    base: Run
    cur: Run
    th: Thresholds
    cells: pd.DataFrame  # one row per matched cell, with per-metric verdicts
    missing: list[str]  # identity keys in the baseline only
    new: list[str]  # in the current run only
    notes: list[str] = field(default_factory=list)

    def failures(self) -> dict[str, int]:
        out = {}
        for gate, col in (("accuracy", "top1_verdict"), ("gmacs", "gmacs_verdict"), ("speed", "speedup_verdict")):
            out[gate] = int((self.cells[col] == "regressed").sum())
        out["missing"] = len(self.missing) + int((self.cells["speedup_verdict"] == OOM).sum())
        out["stale"] = int((self.cells["status"] == "improved").sum() + (self.cells["status"] == "mixed").sum())
        return {g: n for g, n in out.items() if n and g in self.th.fail_on}

    @property
    def failed(self) -> bool:
        return bool(self.failures())


OOM = "out of memory"  # the current cell has accuracy and GMACs but no timing: a speed measurement missing


def _verdict(change: float, allowed: float) -> str:
    if change < -allowed:
        return "regressed"
    if change > allowed:
        return "improved"
    return "same"


def compare(base: Run, cur: Run, th: Thresholds) -> Comparison:
    notes = check_comparable(base, cur)
    b_df, c_df = _frame(base, "baseline"), _frame(cur, "current run")
    common = [k for k in b_df.index if k in c_df.index]
    if not common:
        raise UsageError(f"{base.path} and {cur.path} have no cell in common (cells match on {', '.join(IDENTITY)}); "
                         f"baseline cells look like '{b_df.index[0]}', current ones like '{c_df.index[0]}'")
    z = _z(th.confidence)
    speed_floor = -math.log(1 - th.speed_rel) if th.speed_rel < 1 else math.inf
    rows = []
    for key in common:
        b, c = b_df.loc[key], c_df.loc[key]
        b_raw, c_raw = base.raw(b.to_dict()), cur.raw(c.to_dict())
        row = {k: c[k] for k in IDENTITY}
        # accuracy (points, CI-aware)
        half, kind = accuracy_halfwidth(b, c, b_raw, c_raw, z)
        allowed = max(th.accuracy_points, half)
        delta = float(c["top1"] - b["top1"])
        row.update(top1_base=float(b["top1"]), top1_cur=float(c["top1"]), top1_delta=delta, top1_allowed=allowed,
                   top1_ci=kind, top1_verdict=_verdict(delta, allowed))
        # gmacs (relative, tight): fewer is better
        rel = float(c["gmacs"] / b["gmacs"] - 1) if b["gmacs"] else 0.0
        row.update(gmacs_base=float(b["gmacs"]), gmacs_cur=float(c["gmacs"]), gmacs_change=rel,
                   gmacs_verdict=_verdict(-rel, th.gmacs_rel))
        # speed: only the ratio to dense measured in the same run; the dense rows are 1 by construction
        if c.get("status") == "oom" and b.get("status") != "oom":
            row.update(speedup_base=float(b.get("speedup", float("nan"))), speedup_cur=float("nan"),
                       speedup_change=float("nan"), speedup_allowed=float("nan"), speedup_verdict=OOM)
        elif c["method"] == DENSE or not (b.get("speedup", 0) > 0 and c.get("speedup", 0) > 0):
            row.update(speedup_base=float(b.get("speedup", float("nan"))), speedup_cur=float(c.get("speedup", float("nan"))),
                       speedup_change=0.0, speedup_allowed=float("nan"), speedup_verdict="n/a")
        else:
            log_change = math.log(c["speedup"] / b["speedup"])
            noise = z * math.hypot(speedup_log_sd(b_raw), speedup_log_sd(c_raw))
            allowed_log = max(speed_floor, noise)
            row.update(speedup_base=float(b["speedup"]), speedup_cur=float(c["speedup"]),
                       speedup_change=math.exp(log_change) - 1, speedup_allowed=1 - math.exp(-allowed_log),
                       speedup_verdict=_verdict(log_change, allowed_log))
        verdicts = {row["top1_verdict"], row["gmacs_verdict"], row["speedup_verdict"]}
        row["status"] = (OOM if OOM in verdicts else "mixed" if {"regressed", "improved"} <= verdicts else "regressed" if "regressed" in verdicts
                         else "improved" if "improved" in verdicts else "same")
        rows.append(row)
    missing = [k for k in b_df.index if k not in c_df.index]
    new = [k for k in c_df.index if k not in b_df.index]
    return Comparison(base, cur, th, pd.DataFrame(rows), missing, new, notes)


# ----------------------------------------------------------------------------------------------
# presentation


def _cell_name(r) -> str:
    return f"{r['method']} {r['budget']} {r['mode']} {r['device']} {r['precision']} bs{r['batch_size']}"


def table_rows(cmp: Comparison, show_all: bool = False) -> list[list[str]]:
    """Rows of the change table: cell, top-1, GMACs, speedup, status (changed cells unless ``show_all``)."""
    out = []
    for _, r in cmp.cells.iterrows():
        if not show_all and r["status"] == "same":
            continue
        top1 = (f"{r['top1_base']:.2f} -> {r['top1_cur']:.2f} ({r['top1_delta']:+.2f} pt, "
                f"allowed +-{r['top1_allowed']:.2f} {r['top1_ci']}) {_mark(r['top1_verdict'])}")
        gm = f"{r['gmacs_base']:.5g} -> {r['gmacs_cur']:.5g} ({100 * r['gmacs_change']:+.2f}%) {_mark(r['gmacs_verdict'])}"
        if r["speedup_verdict"] == OOM:
            sp = f"{r['speedup_base']:.2f}x -> {OOM} (counts as missing)"
        elif r["speedup_verdict"] == "n/a":
            sp = "-"
        else:
            sp = (f"{r['speedup_base']:.2f}x -> {r['speedup_cur']:.2f}x ({100 * r['speedup_change']:+.0f}%, "
                  f"allowed -{100 * r['speedup_allowed']:.0f}%) {_mark(r['speedup_verdict'])}")
        out.append([_cell_name(r), top1, gm, sp, r["status"]])
    for k in cmp.missing:
        out.append([k.replace("|", " "), "-", "-", "-", "missing"])
    for k in cmp.new:
        out.append([k.replace("|", " "), "-", "-", "-", "new"])
    return out


def _mark(verdict: str) -> str:
    return {"regressed": "REGRESSED", "improved": "improved"}.get(verdict, "")


HEADERS = ["cell", "top-1 % (baseline -> current)", "GMACs per sample", "speedup over dense", "status"]


def summary(cmp: Comparison) -> str:
    counts = cmp.cells["status"].value_counts().to_dict()
    parts = [f"{len(cmp.cells)} cells compared", *(f"{counts[s]} {s}" for s in ("regressed", OOM, "mixed", "improved", "same") if s in counts)]
    if cmp.missing:
        parts.append(f"{len(cmp.missing)} missing from the current run")
    if cmp.new:
        parts.append(f"{len(cmp.new)} new")
    return ", ".join(parts)


def markdown(cmp: Comparison, show_all: bool = False) -> str:
    lines = [f"## bench compare: `{cmp.base.id}` -> `{cmp.cur.id}`", "", summary(cmp) + ".", ""]
    th = cmp.th
    lines.append(f"Thresholds: accuracy {th.accuracy_points} pt (or the {th.confidence:.0%} CI of the difference), "
                 f"gmacs {th.gmacs_rel:.2%}, speedup {th.speed_rel:.0%} (or the measured noise); "
                 f"failing gates: {', '.join(th.fail_on) or 'none'}.")
    lines += [f"Note: {n}." for n in cmp.notes]
    rows = table_rows(cmp, show_all)
    if rows:
        lines += ["", "| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    failures = cmp.failures()
    lines += ["", f"**Result: {'FAIL (' + ', '.join(f'{g}: {n}' for g, n in failures.items()) + ')' if failures else 'pass'}**"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# baselines


WEIGHTS = "weights"  # fine-tuned method checkpoints a baseline was measured with


def _copy_method_weights(run: Run, dest: Path) -> list[str]:
    """Copy the fine-tuned method checkpoints of ``run``'s cells (A-ViT, AdaViT: the harness's
    cache files) into ``dest``. A CI machine seeds its cache with them (``.ci/run``), so the gate
    compares the code on the very weights the baseline used: fine-tuning on another CPU can round
    differently, and halting / gating decisions would then move GMACs for reasons that are not a
    regression. A change to a recipe changes the cache key, so it still fine-tunes afresh."""
    names = []
    for rec in run.records():
        src = rec.get("method_checkpoint")
        if not rec.get("finetuned") or not src:
            continue
        if Path(src).name == rec.get("checkpoint"):  # the user's checkpoint carried the method's weights
            continue
        path = cache.locate(src)
        if path is None or path.suffix != ".safetensors" or path.name in names:
            continue
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / path.name)
        names.append(path.name)
    return names


def update_baseline(run: Run, root: Path) -> tuple[Path, str | None]:
    """Copy ``run`` (manifest, records, raw) to ``root/<profile>/``, replacing what was there.

    Returns the folder and the run id of the baseline it replaced. Only complete runs qualify.
    """
    m = run.manifest()
    if m.get("status") != "complete":
        raise UsageError(f"run {run.id} is {m.get('status', 'unfinished')}; a baseline must be a complete run "
                         f"(finish it with `bench run --resume {run.id}`)")
    if not (run.path / RECORDS).is_file():
        raise UsageError(f"run {run.id} has no records; nothing to make a baseline of")
    profile = str(m.get("profile") or "")
    if not profile or "/" in profile or profile.startswith("."):
        raise UsageError(f"run {run.id} names no usable profile ({profile!r}) in its manifest")
    root = Path(root)
    dest = root / profile
    if dest.resolve() == run.path.resolve():
        raise UsageError(f"{run.path} already is the baseline of profile '{profile}'")
    previous = None
    if (dest / MANIFEST).is_file():
        previous = Run(dest).manifest().get("baseline_of", Run(dest).id)
    try:
        tmp = staging_folder(root, profile)
    except OSError as e:
        raise UsageError(f"baseline folder {root} cannot be written ({e.strerror or e})") from None
    try:
        shutil.copy2(run.path / RECORDS, tmp / RECORDS)
        if (run.path / "raw").is_dir():
            shutil.copytree(run.path / "raw", tmp / "raw")
        weights = _copy_method_weights(run, tmp / WEIGHTS)
        m = {**m, "baseline_of": run.id, "baseline_updated": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
             "baseline_weights": weights}
        Run(tmp).write_manifest(m)
        replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest, previous
