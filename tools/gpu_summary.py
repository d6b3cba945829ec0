"""The summary of a tools/gpu_check.py results folder: summary.md (tables) and summary.json (the
same rows), from what the steps wrote; whatever a failed step did not write is shown as missing.

    python tools/gpu_summary.py results/gpu/<stamp>

Tables: the harness's overhead (bench's dense cells against a plain timm loop timed the same way;
overhead = plain img/s / bench img/s - 1, target at most 5%); each method's compact and reference
modes with the GMACs ratio, MAC bound, speedups over dense, padding waste and the kernel ceiling;
the --compile cell against the same cell eager; the out-of-memory cell; the steps. No torch import:
it runs in a second even when a step broke the GPU.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

OVERHEAD_TARGET = 0.05
METHODS = ("ats", "avit", "adavit")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def records(work: Path) -> list[dict]:
    """Every cell of every `bench run` step, tagged with the step (runs/<step>/<run-id>/)."""
    out = []
    for path in sorted((work / "runs").glob("*/*/records.jsonl")):
        out += [{**r, "_step": path.parent.parent.name} for r in read_jsonl(path)]
    return out


def find(rows: Iterable[dict], **match: Any) -> dict:
    """The first row whose fields equal ``match`` (a ``_step`` prefix ending in '*' matches any
    step starting with it), else {}."""
    def ok(r: dict) -> bool:
        return all(r.get(k, "").startswith(v[:-1]) if isinstance(v, str) and v.endswith("*") else r.get(k) == v
                   for k, v in match.items())

    return next((r for r in rows if ok(r)), {})


def ratio(a: Any, b: Any) -> float | None:
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (a, b)) and b != 0
    return a / b if ok else None


def overhead_rows(cells: list[dict], extras: list[dict]) -> list[dict]:
    rows = []
    for plain in (e for e in extras if e.get("kind") == "plain_timm"):
        key = {k: plain[k] for k in ("backbone", "precision", "batch_size")}
        bench = find(cells, _step="dense*", method="deit", compile="off", **key)
        over = ratio(plain["img_per_s"], bench.get("img_per_s"))
        rows.append({**key, "bench_img_per_s": bench.get("img_per_s"), "plain_img_per_s": plain["img_per_s"],
                     "bench_latency_ms_p50": bench.get("latency_ms_p50"), "plain_latency_ms_p50": plain["latency_ms_p50"],
                     "overhead": None if over is None else over - 1,
                     "within_target": None if over is None else over - 1 <= OVERHEAD_TARGET})
    return rows


def method_rows(cells: list[dict], extras: list[dict]) -> list[dict]:
    rows = []
    for method in METHODS:
        for c in (r for r in cells if r["_step"] == "methods" and r["method"] == method):
            bs = c["batch_size"]
            ref = find(cells, _step="reference", method=method, batch_size=bs)
            ceil = find(extras, kind="ceiling", method=method, batch_size=bs)
            ceiling_speedup = ceil.get("speedup")
            rows.append({
                "method": method, "budget": c["budget"], "backbone": c["backbone"], "precision": c["precision"], "batch_size": bs,
                "gmacs_ratio": c["gmacs_ratio"], "mac_bound": ratio(1.0, c["gmacs_ratio"]),
                "speedup_compact": c["speedup"], "speedup_reference": ref.get("speedup"),
                "compact_over_reference": ratio(c["speedup"], ref.get("speedup")),
                "padding_waste": c["padding_waste"], "padding_waste_reference": ref.get("padding_waste"),
                "ceiling_speedup": ceiling_speedup, "compact_share_of_ceiling": ratio(c["speedup"], ceiling_speedup),
                "compact_share_of_mac_bound": c["speedup"] * c["gmacs_ratio"] if ratio(1.0, c["gmacs_ratio"]) else None,
                "img_per_s": c["img_per_s"], "dense_img_per_s": c.get("dense_img_per_s"),
                "status": f"{c['status']} / {ref.get('status', 'missing')}",
            })
    return rows


def compile_rows(cells: list[dict]) -> list[dict]:
    rows = []
    for c in (r for r in cells if r["_step"] == "compile"):
        key = {k: c[k] for k in ("backbone", "precision", "batch_size")}
        eager = find(cells, _step="dense*", method="deit", compile="off", **key)
        rows.append({**key, "compile": c["compile"], "img_per_s": c["img_per_s"], "eager_img_per_s": eager.get("img_per_s"),
                     "compile_speedup": ratio(c["img_per_s"], eager.get("img_per_s")), "status": c["status"]})
    return rows


def oom_rows(cells: list[dict]) -> list[dict]:
    keys = ("backbone", "precision", "batch_size", "status", "batch_size_run", "oom_backoff", "memory_cap_mb",
            "memory_cap_kind", "img_per_s", "peak_mem_mb")
    return [{k: c.get(k) for k in keys} for c in cells if c["_step"] == "oom"]


def header(work: Path, cells: list[dict]) -> dict:
    check, cal = read_json(work / "gpu_check.json"), read_json(work / "calibration.json")
    manifest = next((read_json(p) for p in sorted((work / "runs").glob("*/*/manifest.json"))), {})
    versions = manifest.get("versions", {})
    return {"mode": check.get("mode"), "created": check.get("created"), "wall_s": check.get("wall_s"),
            "budget_s": check.get("budget_s"), "device": cells[0]["device_name"] if cells else cal.get("device"),
            "torch": versions.get("torch", cal.get("torch")), "timm": versions.get("timm"), "cuda": versions.get("cuda"),
            "commit": (manifest.get("git") or {}).get("commit"), "dirty": (manifest.get("git") or {}).get("dirty"),
            "budgets": cal.get("budgets"), "calibrated_gmacs_ratio": cal.get("gmacs_ratio")}


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(rows: list[dict], columns: list[tuple[str, str]], empty: str) -> list[str]:
    if not rows:
        return [f"_{empty}_", ""]
    out = ["| " + " | ".join(h for _, h in columns) + " |", "|" + " --- |" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return out + [""]


def cols(spec: str) -> list[tuple[str, str]]:
    """'key=header, key' -> [(key, header), (key, key)]."""
    return [tuple(p.split("=")) if "=" in p else (p, p) for p in (s.strip() for s in spec.split(","))]  # type: ignore[misc]


SECTIONS: list[tuple[str, str, str]] = [  # title, columns, summary key
    ("Harness overhead: bench's dense cells vs a plain timm loop timed the same way (target: overhead <= 5%)",
     "backbone, precision, batch_size=batch, bench_img_per_s=bench img/s, plain_img_per_s=timm img/s, "
     "bench_latency_ms_p50=bench ms p50, plain_latency_ms_p50=timm ms p50, overhead, within_target=within 5%", "overhead"),
    ("Methods: compact and reference modes against dense (speedup = dense time / method time, interleaved)",
     "method, budget, batch_size=batch, gmacs_ratio=GMACs ratio, mac_bound=MAC bound, speedup_compact=compact speedup, "
     "speedup_reference=reference speedup, compact_over_reference=compact / reference, padding_waste=padding waste, "
     "ceiling_speedup=ceiling speedup, compact_share_of_ceiling=share of ceiling, compact_share_of_mac_bound=share of MAC bound, "
     "status=status (compact / reference)", "methods"),
    ("torch.compile", "backbone, precision, batch_size=batch, compile, img_per_s=img/s, eager_img_per_s=eager img/s, "
     "compile_speedup=speedup, status", "compile"),
    ("Out of memory on purpose (must back off and be recorded)", "backbone, precision, batch_size=batch asked, status, "
     "batch_size_run=batch run, oom_backoff=batches failed, memory_cap_mb=cap MiB, memory_cap_kind=cap, img_per_s=img/s, "
     "peak_mem_mb=peak MiB", "oom"),
    ("Steps", "step, status, seconds, rc=exit code", "steps"),
]


def markdown(summary: dict) -> str:
    h = {k: fmt(v) for k, v in summary["header"].items()}
    lines = [f"# GPU check ({h['mode']}): {h['device']}", "",
             f"torch {h['torch']} (CUDA {h['cuda']}), timm {h['timm']}, commit `{h['commit'][:10]}`"
             f"{' (uncommitted changes)' if summary['header']['dirty'] else ''}; {h['created']}, {h['wall_s']} s of a {h['budget_s']} s budget.",
             f"Knobs (about half the dense GMACs, random weights, synthetic images): {h['budgets']}.", ""]
    for title, spec, key in SECTIONS:
        lines += [f"## {title}", ""] + table(summary[key], cols(spec), f"no {key} rows: see steps and logs/")
    return "\n".join(lines)


def summarize(work: Path) -> dict:
    cells, extras = records(work), read_jsonl(work / "extras.jsonl")
    steps = [{k: s.get(k) for k in ("step", "status", "seconds", "rc")} for s in read_jsonl(work / "steps.jsonl")]
    summary = {"header": header(work, cells), "overhead": overhead_rows(cells, extras), "methods": method_rows(cells, extras),
               "compile": compile_rows(cells), "oom": oom_rows(cells), "steps": steps}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    (work / "summary.md").write_text(markdown(summary))
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python tools/gpu_summary.py RESULTS_FOLDER (a tools/gpu_check.py results folder)")
    summarize(Path(sys.argv[1]))
    print((Path(sys.argv[1]) / "summary.md").read_text())
