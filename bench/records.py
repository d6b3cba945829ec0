"""The record of one cell, declared once: every column of ``records.jsonl`` with its type, unit and
meaning (docs/records.md#record-columns is generated from this table: ``python -m bench.records``).

``make`` turns the values a run measured into a record: it refuses an undeclared column (a new
column must be declared, so that it is documented), writes ids as text and flags as bools, and
rounds knob values to what was meant (0.7, not 0.7000000000000001). ``frame`` loads records into
pandas with the declared dtypes, so an arXiv id stays ``"2106.10270"`` and ``finetuned`` a bool;
records of runs written before the schema version existed (version 1) load the same way.
"""
from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2  # 1: records before this declaration (no schema_version column)


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # str, int, float, bool, list of int, list of float, object
    unit: str  # "" where the column has none
    meaning: str
    group: str


def _group(group: str, *rows: tuple[str, str, str, str]) -> list[Column]:
    return [Column(name, type_, unit, meaning, group) for name, type_, unit, meaning in rows]


COLUMNS: tuple[Column, ...] = tuple(
    _group("Identity",
           ("method", "str", "", "method id: `deit`, `ats`, `avit`, `adavit`, `tome`, `evit`"),
           ("budget", "str", "", "the budget string as given (`full`, `0.5`, `gate_scale:10+gate_center:75`)"),
           ("mode", "str", "", "`compact` or `reference`"),
           ("device", "str", "", "the device asked for (`cpu`, `cuda`, `cuda:1`)"),
           ("precision", "str", "", "`fp32`, `bf16` or `fp16` (autocast)"),
           ("batch_size", "int", "", "the batch size asked for"))
    + _group("Provenance",
             ("schema_version", "int", "", f"version of this column list ({SCHEMA_VERSION}); absent in records of older runs (version 1)"),
             ("run_id", "str", "", "the run folder's name"),
             ("paper", "str", "", "the method's paper (empty for none)"),
             ("arxiv", "str", "", "the paper's arXiv id, text (`2106.10270`; empty for none)"),
             ("knobs", "object", "", "the knob values the budget set, rounded to 12 significant digits (method defaults fill the rest)"),
             ("backbone", "str", "", "timm model name"),
             ("checkpoint", "str", "", "file name of the backbone checkpoint (`random` for random weights)"),
             ("checkpoint_sha256", "str", "", "its sha256 (empty for random weights)"),
             ("finetuned", "bool", "", "whether fine-tuned method weights were used (false for training-free methods and the dense model)"),
             ("method_checkpoint", "str", "", "file name of the fine-tuned weights (in the checkpoint cache), or of the user's checkpoint that carried the method's parameters; empty for none"),
             ("method_checkpoint_sha256", "str", "", "sha256 of that file; empty for none"),
             ("dataset", "str", "", "data set id: `digits`, `digits_video`, `imagenet`, `synthetic`, `kinetics400`, `kinetics600`"),
             ("device_name", "str", "", "GPU name, or the CPU model"),
             ("threads", "int", "", "torch threads"),
             ("param_count_m", "float", "millions", "parameters of the measured model (AdaViT's gates included)"),
             ("finished", "str", "ISO time", "when the cell finished"),
             ("worker_device", "str", "", "`--devices` runs only: the device that measured the cell"),
             ("raw", "str", "", "path of the cell's raw arrays, relative to the run folder"))
    + _group("Accuracy",
             ("n_samples", "int", "count", "test samples evaluated (videos for video data sets)"),
             ("top1", "float", "%", "top-1 accuracy on the seeded test list (the same for every batch size of a model)"),
             ("top1_ci_low", "float", "%", "95 % Wilson interval of `top1`, low end"),
             ("top1_ci_high", "float", "%", "95 % Wilson interval of `top1`, high end"),
             ("top5", "float", "%", "top-5 accuracy"),
             ("top5_ci_low", "float", "%", "95 % Wilson interval of `top5`, low end"),
             ("top5_ci_high", "float", "%", "95 % Wilson interval of `top5`, high end"))
    + _group("Compute",
             ("gmacs", "float", "GMACs / sample", "mean over the test list of each sample's multiply-accumulates, from its trace by closed form ([counting](counting.md)); per view for video"),
             ("gmacs_p50", "float", "GMACs / sample", "median of the per-sample values"),
             ("gmacs_p90", "float", "GMACs / sample", "90th percentile of the per-sample values"),
             ("dense_gmacs", "float", "GMACs / sample", "the dense backbone's count"),
             ("gmacs_ratio", "float", "ratio", "`gmacs / dense_gmacs`"),
             ("tokens_per_block", "list of float", "tokens", "mean tokens entering each block (CLS included)"),
             ("views", "int", "count", "video data sets: views per video (clips x crops)"),
             ("gmacs_per_video", "float", "GMACs / video", "video data sets: `gmacs x views`"),
             ("gmacs_target", "float", "ratio", "`gmacs:R` budgets only: the share of dense GMACs asked for ([matched compute](measurement.md#matched-compute))"),
             ("calibrated_knob", "str", "", "the knob the compute target searched"),
             ("calibrated_value", "float", "", "the value found for it (also in `knobs`)"),
             ("calibration_ratio", "float", "ratio", "the mean GMACs ratio that value gives on the calibration samples"),
             ("gmacs_residual", "float", "ratio", "`calibration_ratio / gmacs_target - 1`"),
             ("gmacs_matched", "bool", "", "`abs(gmacs_residual) <= 0.02`; false when the knob's range cannot reach the target"),
             ("calibration_split", "str", "", "the samples searched on: the validation split, or evaluation samples where a data set has none"))
    + _group("Timing",
             ("iters", "int", "count", "timed iterations"),
             ("latency_ms_p50", "float", "ms / iteration", "median iteration time at this batch size (at batch 1: per-image latency)"),
             ("latency_ms_p90", "float", "ms / iteration", "90th percentile of the iteration time"),
             ("latency_ms_p99", "float", "ms / iteration", "99th percentile of the iteration time"),
             ("latency_ms_mean", "float", "ms / iteration", "mean iteration time"),
             ("latency_ms_std", "float", "ms / iteration", "standard deviation of the iteration time"),
             ("img_per_s", "float", "images / s", "batch size / median iteration time"),
             ("img_per_s_p10", "float", "images / s", "10th percentile of the per-iteration throughput"),
             ("img_per_s_p90", "float", "images / s", "90th percentile of the per-iteration throughput"),
             ("img_per_s_iqr", "float", "images / s", "interquartile range of the per-iteration throughput"),
             ("speedup", "float", "ratio", "dense median time / this model's median time, timed interleaved on the same batches; 1 for `deit`"),
             ("dense_img_per_s", "float", "images / s", "the dense reference's throughput in the same window"),
             ("dense_latency_ms_p50", "float", "ms / iteration", "the dense reference's median iteration time in the same window"),
             ("padding_waste", "float", "share (0-1)", "mean over the timed iterations of the trace's padding waste ([measurement](measurement.md#padding-waste))"))
    + _group("Memory",
             ("peak_mem_mb", "float", "MiB", "peak memory of this cell's batch, measured as `peak_mem_kind` says"),
             ("peak_mem_kind", "str", "", "`cuda_max_allocated` (allocator peak, weights included); `cpu_weights_plus_rss_peak` (the model's weights plus the peak growth of resident memory over a baseline taken right before the cell's forward passes, so earlier work in the process does not count); older runs: `cpu_peak_rss`, `cpu_peak_rss_since_start` (the process's peak)"),
             ("memory_cap_mb", "float", "MiB", "profiles that set one: the memory cap the cell ran under"),
             ("memory_cap_kind", "str", "", "how the cap was enforced"))
    + _group("Setup and status",
             ("attention", "str", "", "attention kernel: `default`, `unfused`, `fused`, `flash`, `efficient`, `cudnn`, `math`"),
             ("compile", "str", "", "`torch.compile` backend, or `off`"),
             ("status", "str", "", "`ok`; `oom_backoff` (ran at a smaller batch); `oom` (even batch 1 failed: timing columns are NaN)"),
             ("batch_size_run", "int", "", "the batch size that really ran (0 if none did)"),
             ("oom_backoff", "list of int", "", "batch sizes that ran out of memory in timing"),
             ("eval_batch_size", "int", "", "batch size of the accuracy pass (after any back-off)"),
             ("eval_oom_backoff", "list of int", "", "batch sizes that ran out of memory in the accuracy pass"),
             ("eval_world_size", "int", "", "processes that shared the accuracy pass (`torchrun`), 1 otherwise"))
)
BY_NAME = {c.name: c for c in COLUMNS}
TEXT = tuple(c.name for c in COLUMNS if c.type == "str")


def round_value(v: Any) -> Any:
    """A knob value as it was meant: floats to 12 significant digits (0.7000000000000001 -> 0.7)."""
    if isinstance(v, float):
        return float(f"{v:.12g}")
    if isinstance(v, (list, tuple)):
        return [round_value(x) for x in v]
    return v


def make(values: dict) -> dict:
    """The record of one cell from the values a run measured, in declaration order."""
    unknown = [k for k in values if k not in BY_NAME]
    if unknown:  # a developer added a column without declaring (and so documenting) it
        raise KeyError(f"undeclared record column(s) {unknown}; declare them in bench/records.py")
    out = {"schema_version": SCHEMA_VERSION}
    for c in COLUMNS:
        if c.name in values and c.name != "schema_version":
            out[c.name] = _typed(c, values[c.name])
    return out


def _typed(c: Column, v: Any) -> Any:
    if v is None:
        return None
    if c.type == "str":
        return str(v)
    if c.type == "bool":
        return bool(v)
    if c.name == "knobs":
        return {k: round_value(x) for k, x in v.items()}
    return v


def frame(lines: list[str]):
    """Records (JSON lines) as a pandas DataFrame with the declared dtypes: text stays text, flags
    are bools (pandas' nullable boolean where an old record lacks one)."""
    import pandas as pd

    if not lines:
        return pd.DataFrame()
    df = pd.read_json(io.StringIO("\n".join(lines)), lines=True, dtype=False)  # dtype=False: '2111.15667' stays text
    for name in df.columns:
        c = BY_NAME.get(name)
        if c is None:
            continue
        if c.type == "str":
            df[name] = df[name].map(lambda v: v if v is None or isinstance(v, str) or v != v else str(v)).astype(object)
        elif c.type == "bool":
            df[name] = df[name].astype("boolean")
    return df


def docs_table() -> str:
    """docs/records.md's column tables, generated from ``COLUMNS``."""
    out = []
    for group in dict.fromkeys(c.group for c in COLUMNS):
        out += [f"### {group}", "", "| column | type | unit | meaning |", "| --- | --- | --- | --- |"]
        out += [f"| `{c.name}` | {c.type} | {c.unit} | {c.meaning} |" for c in COLUMNS if c.group == group]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


DOCS = Path(__file__).resolve().parent.parent / "docs" / "records.md"
START, END = "<!-- columns: generated by `python -m bench.records` from bench/records.py -->", "<!-- columns end -->"


def docs_with_table(text: str) -> str:
    """``text`` (docs/records.md) with the generated block between the markers replaced."""
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n\n{docs_table()}\n{END}{tail}"


if __name__ == "__main__":  # rewrite docs/records.md's column tables from the declaration
    DOCS.write_text(docs_with_table(DOCS.read_text()))
    sys.exit(0)
