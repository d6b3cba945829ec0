"""One prepared GPU check (issue 21): the first GPU numbers in one short command. Run it through
tools/gpu_check.sh, which sets the environment:

    bash tools/gpu_check.sh                 # one GPU, at most --budget-s (480 s): results/gpu/<stamp>/
    bash tools/gpu_check.sh --dry-run       # the same steps on the CPU at tiny sizes (the tests run it,
                                            # with --in-process: one process, imports paid once)

Every step is its own process (a crash or a hung compile costs that step, not the run) and,
apart from `prepare` and `extras` (tools/gpu_steps.py), a plain `bench run` with a gpu-check
profile of bench.toml, so the GPU run takes the harness's own path. In order of importance, so
that a run cut short by the budget loses the least:

  prepare    random weights saved with AdaViT gates; each method's knob at about half the dense GMACs
  methods    ats, avit, adavit compact (and dense) on deit_small_patch16_224, bf16, batch 1 and 256
  reference  the same in each method's reference mode
  dense-*    deit_tiny/small/base_patch16_224, fp32 and bf16, batch 1 and 256
  extras     the kernel ceiling (tools/ceiling.py) per method and batch; a plain timm loop per dense cell
  oom        dense deit_small, bf16, batch 4096 under a 2 GiB allocator cap: must back off, recorded
  compile    dense deit_small, bf16, batch 256, --compile (inductor)
  summary    summary.md and summary.json (tools/gpu_summary.py): always, even after a failed step

Results: OUT/<stamp>/ with gpu_check.json (this run), steps.jsonl (one line per step: command,
exit code, seconds), logs/<step>.log, calibration.json, extras.jsonl, runs/<step>/<run-id>/ (bench's
results: manifest.json, records.jsonl, raw/), reports/ (bench's per-run reports) and the summary.
The checkpoint the methods ran with is rebuilt by `prepare` (its sha256 is in calibration.json)
and deleted at the end: random weights are not worth 88 MB of results.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
SUMMARY_RESERVE_S = 15  # kept back from the budget for the summary, which always runs
MIN_STEP_S = 20  # a step that would get less is skipped (recorded), not started


@dataclass(frozen=True)
class Plan:
    """What a check measures: the profile family, dense backbones, sizes that differ."""

    profile: str  # gpu-check or gpu-check-dry; -reference and -oom variants exist for both
    backbones: tuple[str, ...]  # dense runs; "" = the profile's own backbone
    check_backbones: tuple[str, ...]  # names prepare must find in timm (the dry run checks the GPU's)
    compile_batch: int  # = the profile's eval_batch_size: one input shape to compile
    bisection_steps: int
    out: str


DENSE = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")
GPU = Plan("gpu-check", DENSE, (), 256, 12, "results/gpu")
DRY = Plan("gpu-check-dry", ("",), DENSE, 8, 5, "results/gpu-dry")


@dataclass
class Step:
    name: str
    argv: list[str]


def bench_run(work: Path, name: str, *flags: str) -> Step:
    """`bench run` into runs/<name>/ (so the summary knows which step made which run); no report
    (its plots cost seconds a step; `bench report` draws them from the run folders any time)."""
    return Step(name, [sys.executable, "-m", "bench", "run", "--quiet", "--no-report", "--out", str(work / "runs" / name), *flags])


def tool(name: str, step: str, *flags: str) -> Step:
    return Step(name, [sys.executable, str(TOOLS / "gpu_steps.py"), step, *flags])


def prepare_step(plan: Plan, work: Path) -> Step:
    return tool("prepare", "prepare", "--profile", plan.profile, "--work", str(work), "--bisection-steps",
                str(plan.bisection_steps), "--check-backbones", ",".join(plan.check_backbones))


def measuring_steps(plan: Plan, work: Path, calibration: dict) -> list[Step]:
    """Everything after `prepare`; the methods' steps need its budgets and checkpoint."""
    p = plan.profile
    budgets = ";".join(f"{m}={b}" for m, b in calibration["budgets"].items())
    adaptive = ["--methods", ",".join(calibration["budgets"]), "--precision", "bf16", "--budgets", budgets,
                "--checkpoint", calibration["checkpoint"]]
    steps = [bench_run(work, "methods", "--profile", p, *adaptive),
             bench_run(work, "reference", "--profile", f"{p}-reference", *adaptive)]
    for b in plan.backbones:
        steps.append(bench_run(work, f"dense-{b}" if b else "dense", "--profile", p, *(["--backbone", b] if b else [])))
    steps.append(tool("extras", "extras", "--profile", p, "--work", str(work), "--backbones", ",".join(filter(None, plan.backbones))))
    steps.append(bench_run(work, "oom", "--profile", f"{p}-oom"))
    steps.append(bench_run(work, "compile", "--profile", p, "--compile", "--precision", "bf16", "--batch-sizes", str(plan.compile_batch)))
    return steps


class Runner:
    """Runs steps one at a time within the budget, logging each: by default each in its own
    process group (so a step cut at the deadline takes its children, e.g. inductor's compile
    workers, with it); ``in_process``: each in this process, through runpy with the same argv
    (imports paid once; no isolation and no deadline inside a step: for the tests' dry run)."""

    def __init__(self, work: Path, budget_s: float, in_process: bool = False, min_step_s: float = MIN_STEP_S):
        self.work, self.began, self.budget_s, self.in_process = work, time.monotonic(), budget_s, in_process
        self.min_step_s = min_step_s
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - SUMMARY_RESERVE_S - (time.monotonic() - self.began)

    def run(self, step: Step, timeout: float | None = None) -> dict:
        timeout = self.left() if timeout is None else timeout
        entry = {"step": step.name, "argv": step.argv, "log": f"logs/{step.name}.log"}
        if timeout < self.min_step_s:
            entry.update(status="skipped", reason=f"{timeout:.0f} s of the budget left", rc=None, seconds=0.0)
        else:
            entry.update(self._here(step) if self.in_process else self._execute(step, timeout))
        with open(self.work / "steps.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(f"[{time.monotonic() - self.began:6.1f} s] {step.name:<34} {entry['status']:<8} {entry['seconds']:6.1f} s", flush=True)
        return entry

    def _execute(self, step: Step, timeout: float) -> dict:
        t0 = time.monotonic()
        with open(self.work / "logs" / f"{step.name}.log", "w") as log:
            # its own process group, in this session: whatever ends this driver's session ends it too
            proc = subprocess.Popen(step.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, process_group=0)
            try:
                rc = proc.wait(timeout=timeout)
                status = "ok" if rc == 0 else "failed"
            except (subprocess.TimeoutExpired, KeyboardInterrupt) as stop:
                os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group: it and its children
                rc, status = proc.wait(), "timeout" if isinstance(stop, subprocess.TimeoutExpired) else "interrupted"
                if status == "interrupted":
                    raise
        return {"status": status, "rc": rc, "seconds": round(time.monotonic() - t0, 1)}

    def _here(self, step: Step) -> dict:
        """``python -m MODULE ARGS`` or ``python SCRIPT ARGS`` run by runpy in this process."""
        t0, argv = time.monotonic(), sys.argv
        module = step.argv[1] == "-m"
        with open(self.work / "logs" / f"{step.name}.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
            sys.argv = step.argv[2:] if module else step.argv[1:]
            try:
                if module:
                    runpy.run_module(step.argv[2], run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(step.argv[1], run_name="__main__")
                rc = 0
            except SystemExit as end:  # what the process would have exited with
                rc = end.code if isinstance(end.code, int) else int(end.code is not None)
                if isinstance(end.code, str):
                    print(end.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                rc = 1
            finally:
                sys.argv = argv
        return {"status": "ok" if rc == 0 else "failed", "rc": rc, "seconds": round(time.monotonic() - t0, 1)}


def new_work(out: Path) -> Path:
    work = out / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    n = 1
    while work.exists():
        n += 1
        work = out / f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{n}"
    work.mkdir(parents=True)
    return work


def check(plan: Plan, work: Path, budget_s: float, mode: str, in_process: bool = False) -> int:
    """All steps, then the summary; exit code 0 when every step finished ok."""
    manifest = {"mode": mode, "profile": plan.profile, "budget_s": budget_s, "python": sys.executable, "in_process": in_process,
                "created": dt.datetime.now().astimezone().isoformat(timespec="seconds")}  # versions, commit: each run's manifest
    (work / "gpu_check.json").write_text(json.dumps(manifest, indent=2))
    runner = Runner(work, budget_s, in_process)
    entries = [runner.run(prepare_step(plan, work))]
    if entries[0]["status"] == "ok":
        calibration = json.loads((work / "calibration.json").read_text())
        entries += [runner.run(s) for s in measuring_steps(plan, work, calibration)]
    shutil.rmtree(work / "scratch", ignore_errors=True)  # the random-weights checkpoint
    manifest.update(finished=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                    wall_s=round(time.monotonic() - runner.began, 1), steps={e["step"]: e["status"] for e in entries})
    (work / "gpu_check.json").write_text(json.dumps(manifest, indent=2))
    summary = runner.run(Step("summary", [sys.executable, str(TOOLS / "gpu_summary.py"), str(work)]),
                         timeout=max(runner.left() + SUMMARY_RESERVE_S, MIN_STEP_S))
    entries.append(summary)
    print(f"results: {work}\nsummary: {work / 'summary.md'}", flush=True)
    return 0 if all(e["status"] == "ok" for e in entries) else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes (gpu-check-dry profiles)")
    ap.add_argument("--out", type=Path, default=None, help="results root (default results/gpu, results/gpu-dry for --dry-run)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all steps (default 480 = 8 minutes)")
    ap.add_argument("--in-process", action="store_true", help="run the steps in this process (imports once; no isolation, "
                    "no deadline inside a step): for the dry run in the tests")
    args = ap.parse_args()
    plan = DRY if args.dry_run else GPU
    work = new_work(args.out or ROOT / plan.out)
    if args.in_process:
        sys.path.insert(0, str(TOOLS))  # what `python tools/X.py` puts first: the tools import each other
    print(f"gpu check ({'dry run, CPU' if args.dry_run else 'GPU'}): {work}, budget {args.budget_s:.0f} s", flush=True)
    sys.exit(check(plan, work, args.budget_s, "dry-run" if args.dry_run else "gpu", args.in_process))


if __name__ == "__main__":
    main()
