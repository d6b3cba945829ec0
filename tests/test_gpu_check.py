"""tools/gpu_check.sh: the GPU check (issue 21) proven on the CPU. Its dry run takes every step of
the GPU run (same `bench run` commands and profiles family, same calibration, ceiling, plain timm
loop, out-of-memory and compile cells) at tiny sizes, without fvcore, ptflops or av, which the GPU
machine does not have; the step runner's deadline and process-group kill are checked on their own."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402
import gpu_summary  # noqa: E402

ABSENT_ON_THE_GPU_MACHINE = ("fvcore", "ptflops", "av")
STEPS = ["prepare", "methods", "reference", "dense", "extras", "oom", "compile", "summary"]


def blocked_imports(folder: Path) -> str:
    """A PYTHONPATH entry that shadows the packages the GPU machine lacks with ones that fail to import."""
    for name in ABSENT_ON_THE_GPU_MACHINE:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    return str(folder)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": blocked_imports(tmp / "blocked"), "COLUMNS": "200"}
    probe = subprocess.run([sys.executable, "-c", "import fvcore"], env=env, capture_output=True, text=True)
    assert "not on the GPU machine" in probe.stderr  # the block is in force for the run below
    p = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--in-process", "--out", str(tmp / "gpu")],
                       cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    (work,) = (tmp / "gpu").iterdir()
    return p, work


def test_dry_run_takes_every_step_of_the_gpu_run(dry_run):
    p, work = dry_run
    logs = {f.name: f.read_text()[-2000:] for f in (work / "logs").glob("*.log")}
    assert p.returncode == 0, (p.stdout, p.stderr, logs)
    steps = gpu_summary.read_jsonl(work / "steps.jsonl")
    assert [s["step"] for s in steps] == STEPS and {s["status"] for s in steps} == {"ok"}
    by_name = {s["step"]: s["argv"] for s in steps}
    assert by_name["methods"][1:4] == ["-m", "bench", "run"] and "gpu-check-dry" in by_name["methods"]
    assert "gpu-check-dry-reference" in by_name["reference"] and "--compile" in by_name["compile"]
    assert not (work / "scratch").exists() and not (work / "reports").exists()  # checkpoint deleted, no plots
    summary = json.loads((work / "summary.json").read_text())
    assert summary["header"]["mode"] == "dry-run"
    md = (work / "summary.md").read_text()
    for title, _, _ in gpu_summary.SECTIONS:
        assert f"## {title}" in md


def test_dry_run_harness_overhead_rows_pair_bench_with_plain_timm(dry_run):
    summary = json.loads((dry_run[1] / "summary.json").read_text())
    rows = summary["overhead"]
    assert {(r["precision"], r["batch_size"]) for r in rows} == {("fp32", 1), ("fp32", 8), ("bf16", 1), ("bf16", 8)}
    for r in rows:
        assert r["bench_img_per_s"] > 0 and r["plain_img_per_s"] > 0
        assert r["overhead"] == pytest.approx(r["plain_img_per_s"] / r["bench_img_per_s"] - 1)


def test_dry_run_methods_at_about_half_the_gmacs_with_both_modes_and_the_ceiling(dry_run):
    work = dry_run[1]
    cal = json.loads((work / "calibration.json").read_text())
    assert set(cal["budgets"]) == {"ats", "avit", "adavit"}
    rows = json.loads((work / "summary.json").read_text())["methods"]
    assert {(r["method"], r["batch_size"]) for r in rows} == {(m, b) for m in ("ats", "avit", "adavit") for b in (1, 8)}
    for r in rows:
        assert r["status"] == "ok / ok" and r["precision"] == "bf16"
        assert abs(r["gmacs_ratio"] - 0.5) < 0.15, r  # the calibrated knobs reached about half (5 bisection steps)
        assert abs(r["gmacs_ratio"] - cal["gmacs_ratio"][r["method"]]) < 0.05  # bench counts what prepare aimed at
        assert all(r[k] > 0 for k in ("speedup_compact", "speedup_reference", "ceiling_speedup"))
        assert r["mac_bound"] == pytest.approx(1 / r["gmacs_ratio"])
        if r["batch_size"] == 1:
            assert r["padding_waste"] == 0


def test_dry_run_compile_and_out_of_memory_cells(dry_run):
    summary = json.loads((dry_run[1] / "summary.json").read_text())
    (comp,) = summary["compile"]
    assert comp["compile"] == "eager" and comp["status"] == "ok" and comp["eager_img_per_s"] > 0
    (oom,) = summary["oom"]
    assert oom["status"] == "oom_backoff" and oom["batch_size"] == 4096
    assert 0 < oom["batch_size_run"] < oom["oom_backoff"][-1] and oom["oom_backoff"][0] == 4096
    assert (oom["memory_cap_mb"], oom["memory_cap_kind"]) == (1, "cpu_largest_tensor_emulated") and oom["img_per_s"] > 0


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has ended
    except FileNotFoundError:
        return False


def test_steps_are_logged_and_cut_at_the_deadline_with_their_children(tmp_path):
    runner = gpu_check.Runner(tmp_path, budget_s=600, min_step_s=0)
    py = sys.executable
    ok = runner.run(gpu_check.Step("ok", [py, "-c", "print('measured')"]))
    failed = runner.run(gpu_check.Step("failed", [py, "-c", "import sys; sys.exit(3)"]))
    sleeper = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
              "print(c.pid, flush=True); time.sleep(60)"
    t0 = time.monotonic()
    cut = runner.run(gpu_check.Step("hangs", [py, "-c", sleeper]), timeout=3)
    assert time.monotonic() - t0 < 30
    assert (ok["status"], failed["status"], failed["rc"], cut["status"]) == ("ok", "failed", 3, "timeout")
    assert "measured" in (tmp_path / "logs" / "ok.log").read_text()
    child = int((tmp_path / "logs" / "hangs.log").read_text().split()[0])
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)  # the step's own child went with it
    late = gpu_check.Runner(tmp_path, budget_s=0).run(gpu_check.Step("late", [py, "-c", "print(1)"]))
    assert late["status"] == "skipped" and not (tmp_path / "logs" / "late.log").exists()
    assert [s["step"] for s in gpu_summary.read_jsonl(tmp_path / "steps.jsonl")] == ["ok", "failed", "hangs", "late"]


def test_summary_of_a_run_whose_steps_failed_says_what_is_missing(tmp_path):
    (tmp_path / "gpu_check.json").write_text(json.dumps({"mode": "gpu", "budget_s": 480}))
    (tmp_path / "steps.jsonl").write_text(json.dumps({"step": "prepare", "status": "failed", "seconds": 2.0, "rc": 1}) + "\n")
    summary = gpu_summary.summarize(tmp_path)
    assert summary["methods"] == [] and summary["steps"][0]["status"] == "failed"
    md = (tmp_path / "summary.md").read_text()
    assert "_no methods rows: see steps and logs/_" in md and "| prepare | failed | 2 | 1 |" in md
    assert md.startswith("# GPU check (gpu): -\n")  # what no step recorded shows as -, not None


def test_gpu_plan_resolves_to_the_cells_the_issue_asks_for(tmp_path, monkeypatch):
    """The GPU run's own `bench run` commands (which the dry run replaces by gpu-check-dry ones),
    through bench's command line and validation up to the device: no typo waits for the GPU."""
    import torch

    from bench import cli, runner

    seen = {}
    monkeypatch.setattr(runner, "execute", lambda cfg, *a, **k: seen.setdefault(cfg.out, cfg) and None)
    monkeypatch.setattr(runner, "resolve_device", lambda name: torch.device(name))  # no CUDA here
    calibration = {"budgets": {"ats": "keep:0.4321", "avit": "gate_scale:3+gate_center:1.2345", "adavit": "patch_threshold:0.6"},
                   "checkpoint": str(tmp_path / "w.safetensors")}
    steps = gpu_check.measuring_steps(gpu_check.GPU, tmp_path, calibration)
    for step in steps:
        if step.argv[1:3] == ["-m", "bench"]:
            assert cli.app(args=step.argv[3:], standalone_mode=False) is None, step.name
    cfgs = {Path(out).name: cfg for out, cfg in seen.items()}
    assert set(cfgs) == {"methods", "reference", "oom", "compile"} | {f"dense-{b}" for b in gpu_check.DENSE}
    for name, cfg in cfgs.items():
        method_ids, devices = runner.validate(cfg)  # methods, precisions, batch sizes, every budget parsed
        assert devices == [torch.device("cuda")] and cfg.dataset == "synthetic", name
    for name in ("methods", "reference"):
        cfg = cfgs[name]
        assert (cfg.backbone, cfg.precisions, cfg.batch_sizes) == ("deit_small_patch16_224", ["bf16"], [1, 256])
        assert cfg.checkpoint == calibration["checkpoint"] and runner.resolve_methods(cfg.methods) == ["deit", "ats", "avit", "adavit"]
    assert cfgs["methods"].modes == {} and set(cfgs["reference"].modes.values()) == {"reference"}
    for b in gpu_check.DENSE:
        cfg = cfgs[f"dense-{b}"]
        assert (cfg.backbone, cfg.precisions, cfg.batch_sizes, cfg.methods, cfg.checkpoint) == (b, ["fp32", "bf16"], [1, 256], ["deit"], "random")
    oom, comp = cfgs["oom"], cfgs["compile"]
    assert (oom.memory_cap_mb, oom.batch_sizes, oom.precisions) == (2048, [4096], ["bf16"])
    assert 4096 * 3 * 224 * 224 * 4 > oom.memory_cap_mb * 2**20  # the asked batch's inputs alone exceed the cap
    assert (comp.compile, comp.compile_backend, comp.batch_sizes, comp.precisions) == (True, "inductor", [256], ["bf16"])
    assert comp.eval_batch_size == comp.test_samples == 256  # one input shape: one compilation
    extras = next(s for s in steps if s.name == "extras")
    assert extras.argv[extras.argv.index("--backbones") + 1].split(",") == list(gpu_check.DENSE)
