"""`bench` end to end as a user runs it: real subprocesses, real files."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, bench_cmd


def bench(*args, cwd=ROOT, env_extra=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([*bench_cmd(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_clean_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in p.stderr + p.stdout
    assert lines and lines[0].startswith("error:"), p.stderr
    text = " ".join(ln.strip() for ln in lines)  # rich may wrap one long line on narrow terminals
    for n in needles:
        assert n in text, (n, p.stderr)


def test_help_on_every_command():
    for cmd in ([], ["run"], ["report"], ["list"], ["train"]):
        p = bench(*cmd, "--help")
        assert p.returncode == 0, p.stderr
        assert "Usage" in p.stdout
    p = bench("run", "--help")
    for flag in ("--methods", "--profile", "--dataset", "--data", "--backbone", "--checkpoint", "--budgets", "--device",
                 "--batch-sizes", "--precision", "--out", "--resume", "--seed"):
        assert flag in p.stdout, flag


def test_list_shows_methods_datasets_profiles_budgets():
    p = bench("list")
    assert p.returncode == 0, p.stderr
    for word in ("deit", "digits", "default", "smoke", "budgets"):
        assert word in p.stdout


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--methods", "nope"], ["unknown method 'nope'"]),
        (["--dataset", "mnist"], ["unknown data set 'mnist'"]),
        (["--profile", "nope"], ["unknown profile 'nope'"]),
        (["--device", "tpu"], ["device 'tpu'"]),
        (["--device", "cuda:7"], ["cuda:7"]),
        (["--precision", "fp8"], ["unknown precision 'fp8'"]),
        (["--batch-sizes", "1,x"], ["--batch-sizes"]),
        (["--budgets", "deit=0.5"], ["no budget knob"]),
        (["--backbone", "resnet_nope"], ["unknown backbone 'resnet_nope'"]),
        (["--checkpoint", "/nonexistent/w.pth"], ["/nonexistent/w.pth", "does not exist"]),
        (["--dataset", "digits", "--data", "/nonexistent/data"], ["/nonexistent/data", "does not exist"]),
    ],
)
def test_bad_input_one_line_error(tmp_path, args, needles):
    p = bench("run", "--profile", "smoke", "--out", str(tmp_path / "r"), "--reports", str(tmp_path / "rep"), *args)
    assert_clean_error(p, *needles)


def test_unwritable_results_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = bench("run", "--profile", "smoke", "--out", str(blocker / "results"))
    assert_clean_error(p, "cannot be written")


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bench.toml"
    bad.write_text("[profiles.default]\nbatch_sizes = 'many'\n")
    p = bench("run", "--config", str(bad))
    assert_clean_error(p, str(bad), "profiles.default.batch_sizes")


def test_report_errors(tmp_path):
    assert_clean_error(bench("report", "--results", str(tmp_path)), "no runs under")
    (tmp_path / "notarun").mkdir()
    assert_clean_error(bench("report", str(tmp_path / "notarun")), "not a bench run")


def test_smoke_run_writes_results_and_report(tmp_path):
    out, rep = tmp_path / "results", tmp_path / "reports"
    p = bench("run", "--profile", "smoke", "--methods", "deit", "--out", str(out), "--reports", str(rep), "--seed", "3")
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = list(out.iterdir())
    assert f"results: {run_dir}" in p.stdout.replace("\n", "")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["seeds"]["run"] == 3 and manifest["config"]["seed"] == 3
    for key in ("versions", "git", "threads", "checkpoint_sha256", "dataset", "command"):
        assert manifest.get(key) not in (None, ""), key
    assert len(manifest["checkpoint_sha256"]) == 64
    df = pd.read_json(run_dir / "records.jsonl", lines=True, dtype=False)
    assert len(df) == manifest["planned_cells"] == len(df.drop_duplicates(["method", "budget", "batch_size"]))
    dense = df[df.method == "deit"]
    assert sorted(dense.batch_size) == [1, 8]
    r = dense.iloc[0]
    assert r.n_samples == 200 and 0 <= r.top1_ci_low <= r.top1 <= r.top1_ci_high <= 100
    assert r.gmacs == pytest.approx(r.dense_gmacs) and r.gmacs_ratio == pytest.approx(1.0)
    assert r.latency_ms_p50 <= r.latency_ms_p90 <= r.latency_ms_p99
    assert r.img_per_s > 0 and r.peak_mem_mb > 0 and r.param_count_m > 0
    assert r.top1 > 80  # the shipped (or cached) backbone really classifies digits
    board = rep / run_dir.name / "leaderboard.md"
    assert board.is_file() and "2012.12877" in board.read_text()
    csv = pd.read_csv(rep / run_dir.name / "leaderboard.csv")
    assert {"gmacs", "top1", "img_per_s", "latency_ms_p90", "peak_mem_mb"} <= set(csv.columns)
    # `bench report` on the same run rebuilds the same leaderboard.
    rep2 = tmp_path / "again"
    p = bench("report", run_dir.name, "--results", str(out), "--out", str(rep2))
    assert p.returncode == 0, p.stderr
    assert pd.read_csv(rep2 / run_dir.name / "leaderboard.csv").equals(csv)


def _wait_for_records(run_root: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> Path:
    start = time.time()
    while time.time() - start < timeout:
        for rec in run_root.glob("*/records.jsonl"):
            if len([ln for ln in rec.read_text().splitlines() if ln.strip()]) >= n:
                return rec.parent
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {n} records: {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError("timed out waiting for records")


def _start(out: Path, *extra) -> subprocess.Popen:
    """A smoke run whose cells each time for at least a second, so a signal sent after the first record
    lands before the last one on any machine (smoke cells alone finish within the same second)."""
    config = out.parent / "bench.toml"
    slow = "\n[profiles.slow-smoke]\nextends = \"smoke\"\n\n[profiles.slow-smoke.timing]\nmin_seconds = 1.0\n"
    config.write_text((ROOT / "bench.toml").read_text() + slow)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [*bench_cmd(), "run", "--config", str(config), "--profile", "slow-smoke", "--methods", "deit", "--batch-sizes", "1,2,4,8",
         "--out", str(out), "--reports", str(out.parent / "rep"), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["killed", "ctrl-c", "terminated"])
def test_interrupted_run_resumes_without_repeating_cells(tmp_path, sig):
    out = tmp_path / "results"
    proc = _start(out)
    run_dir = _wait_for_records(out, 1, proc)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    stderr = proc.stderr.read()
    if sig != signal.SIGKILL:
        assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], stderr[-2000:]
        assert "Traceback" not in stderr and "interrupted" in stderr
        assert json.loads((run_dir / "manifest.json").read_text())["status"] == "interrupted"
    before = pd.read_json(run_dir / "records.jsonl", lines=True, dtype=False)  # still readable
    assert 1 <= len(before) < 4
    finished_before = dict(zip(before.batch_size, before.finished))
    p = bench("run", "--resume", "--out", str(out), "--reports", str(tmp_path / "rep"))
    assert p.returncode == 0, p.stderr[-3000:]
    after = pd.read_json(run_dir / "records.jsonl", lines=True, dtype=False)
    assert sorted(after.batch_size) == [1, 2, 4, 8]  # every cell once
    for bs, stamp in finished_before.items():  # finished cells were not repeated
        assert after.loc[after.batch_size == bs, "finished"].item() == stamp
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    assert len(list(out.iterdir())) == 1  # resumed in place, no second run folder


@pytest.mark.parametrize(
    "args, needles",
    [
        ([], ["bench needs a command"]),
        (["baseline"], ["bench baseline needs a command"]),
        (["frobnicate"], ["No such command 'frobnicate'", "bench --help"]),
        (["run", "--foo"], ["No such option: --foo", "bench run --help"]),
        (["run", "--seed", "abc"], ["'--seed'", "bench run --help"]),
        (["compare"], ["Missing argument", "bench compare --help"]),
        (["run", "--channels-last"], ["--channels-last has no bench equivalent"]),
        (["run", "--amp", "--precision", "bf16"], ["--amp means --precision fp16"]),
    ],
)
def test_parse_errors_are_one_line(monkeypatch, capsys, args, needles):
    from conftest import run_main

    code, _, stderr = run_main(monkeypatch, capsys, *args)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for n in needles:
        assert n in lines[0], (n, stderr)


def test_version(monkeypatch, capsys):
    import importlib.metadata

    from conftest import run_main

    code, stdout, _ = run_main(monkeypatch, capsys, "--version")
    assert code == 0 and stdout.strip() == f"bench {importlib.metadata.version('bench')}"


def test_timm_spellings_are_aliases(tmp_path, monkeypatch, capsys):
    """--model, --batch-size / -b, --amp and --torchcompile set what --backbone, --batch-sizes,
    --precision fp16 and --compile set."""
    from bench import runner
    from conftest import run_main

    seen = {}

    def fake_execute(cfg, reporter, resume=None, argv=None):
        seen["cfg"] = cfg

    monkeypatch.setattr(runner, "execute", fake_execute)
    monkeypatch.chdir(tmp_path)  # the default --reports folder is made here
    code, _, stderr = run_main(monkeypatch, capsys, "run", "--profile", "smoke", "--model", "deit_tiny_patch16_224",
                               "--batch-size", "4", "--amp", "--torchcompile")
    assert code == 0, stderr
    cfg = seen["cfg"]
    assert (cfg.backbone, cfg.batch_sizes, cfg.precisions, cfg.compile) == ("deit_tiny_patch16_224", [4], ["fp16"], True)
    run_main(monkeypatch, capsys, "run", "--profile", "smoke", "-b", "2,8")
    assert seen["cfg"].batch_sizes == [2, 8]


TINY_PROFILE = '[profiles.p]\nbatch_sizes = [1]\nmethods = "deit"\n'


@pytest.mark.parametrize(
    "args, toml, needles",
    [
        (["--methods="], "", ["no method given"]),
        (["--methods", ","], "", ["no method given"]),
        (["--budgets", "avit="], "", ["gives method 'avit' no budget"]),
        (["--budgets", ";"], "", ["names no method"]),
        ([], "[profiles.p.budgets]\nats = []\n", ["budgets.ats is empty"]),
        (["--threads", "0"], "", ["--threads", "got 0"]),
        (["--crop-pct", "0"], "", ["no resize or crop", "crop_pct"]),
        (["--interpolation", "foo"], "", ["no resize or crop", "interpolation"]),
        ([], "test_samples = -5\n", ["test_samples must be at least 1", "got -5"]),
        ([], "test_samples = 0\n", ["test_samples must be at least 1"]),
        ([], "eval_batch_size = 0\n", ["eval_batch_size must be at least 1"]),
        (["--resume", "latest", "--profile", "ci"], "", ["--resume", "drop --profile"]),
    ],
)
def test_silently_wrong_settings_are_refused(tmp_path, monkeypatch, capsys, args, toml, needles):
    """Each of these used to run something other than what was asked, without a word."""
    from conftest import run_main

    body = toml if "test_samples" in toml else "test_samples = 200\n" + toml
    (tmp_path / "bench.toml").write_text(TINY_PROFILE + body)
    code, _, stderr = run_main(monkeypatch, capsys, "run", "--config", str(tmp_path / "bench.toml"), "--profile", "p",
                               "--out", str(tmp_path / "r"), "-q", *args)
    assert code == 2, stderr
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())  # nothing measured
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for n in needles:
        assert n in lines[0], (n, stderr)


def test_a_run_stopped_by_an_error_says_failed(tmp_path, monkeypatch):
    from bench import config, runner
    from bench.progress import Reporter

    def broken(*args, **kwargs):
        raise RuntimeError("decoder exploded\nsecond line")

    monkeypatch.setattr(runner, "_run_groups", broken)
    cfg = config.resolve("smoke", methods="deit", batch_sizes=[1], out=str(tmp_path / "results"))
    with pytest.raises(RuntimeError):
        runner.execute(cfg, Reporter(quiet=True))
    (run_dir,) = (tmp_path / "results").iterdir()
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed: decoder exploded"


def test_ctrl_c_during_the_report_of_a_complete_run(tmp_path, monkeypatch, capsys):
    """The run is complete: the message names `bench report`, not a resume."""
    from bench import report, runner
    from bench.store import Run
    from conftest import run_main

    done = Run.create(tmp_path / "results", "smoke", {"status": "complete"})
    monkeypatch.setattr(runner, "execute", lambda *a, **k: done)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write", interrupted)
    code, _, stderr = run_main(monkeypatch, capsys, "run", "--profile", "smoke", "--reports", str(tmp_path / "reports"), "-q")
    assert code == 130 and "Traceback" not in stderr, stderr
    assert "is complete" in stderr and f"bench report {done.id}" in stderr and "--resume" not in stderr


def test_ctrl_c_while_torch_is_imported(monkeypatch, capsys):
    """Ctrl-C in the first seconds lands in the heavy imports: one line, exit 130, no traceback."""
    import importlib.abc
    import sys

    from conftest import run_main

    class CtrlCOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "methods.convert":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "methods.convert", raising=False)
    monkeypatch.setattr(sys, "meta_path", [CtrlCOnImport(), *sys.meta_path])
    try:
        code, _, stderr = run_main(monkeypatch, capsys, "list", "methods")
    except KeyboardInterrupt:  # what a user sees as a traceback
        pytest.fail("the KeyboardInterrupt escaped bench's main()")
    assert code == 130 and stderr.strip().startswith("interrupted:") and "Traceback" not in stderr


def test_square_brackets_survive_in_messages(tmp_path, monkeypatch, capsys):
    """Text such as [profiles.NAME] or [video] is not taken for rich markup and dropped."""
    from conftest import run_main

    (tmp_path / "empty.toml").write_text("")
    code, _, stderr = run_main(monkeypatch, capsys, "run", "--config", str(tmp_path / "empty.toml"))
    assert code == 2 and "defines no [profiles.NAME] table" in stderr, stderr


def test_reporter_keeps_brackets(capsys):
    from rich.console import Console

    from bench.progress import Reporter

    reporter = Reporter(console=Console(stderr=True, force_terminal=False, width=200))
    with reporter.bar("eval [ats] 0.5", 1) as bar:
        bar.note("epoch [1/2] done")
    assert "eval [ats] 0.5: epoch [1/2] done" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, toml, needles",
    [
        (["--threads", "100000"], "", ["--threads", "between 1 and"]),
        (["--seed", "-1"], "", ["--seed", "between 0 and 4294967295"]),
        (["--seed", str(10**20)], "", ["--seed", "got 100000000000000000000"]),
        (["--batch-sizes", "1000000000"], "", ["--batch-sizes 1000000000", "GiB, more than"]),
        ([], "[profiles.p.model]\ndepth = 0\n", ["model.depth must be at least 1, got 0"]),
        ([], "[profiles.p.timing]\ntiming_samples = 0\n", ["timing.timing_samples must be at least 1"]),
        ([], "[profiles.p.digits]\nn_test = 0\n", ["digits.n_test must be at least 1"]),
        ([], "[profiles.p.digits]\ncanvas = 7\n", ["digits.canvas must be at least 8"]),
    ],
)
def test_out_of_range_values_are_refused_up_front(tmp_path, monkeypatch, capsys, args, toml, needles):
    """Each of these crashed (segfault, MemoryError, ZeroDivisionError, allocation error) or, for
    model.depth = 0, trained and cached a backbone first."""
    test_silently_wrong_settings_are_refused(tmp_path, monkeypatch, capsys, args, toml, needles)


def test_second_resume_of_a_run_in_progress_refuses(tmp_path, monkeypatch, capsys):
    """While one process measures into a run (it holds the run's lock), `bench run --resume` of the
    same run refuses in one line instead of measuring the same cells at the same time."""
    from bench import config
    from bench.store import Run
    from conftest import run_main

    cfg = config.resolve("smoke", methods="deit", batch_sizes=[1], out=str(tmp_path / "results"))
    run = Run.create(tmp_path / "results", "smoke", {"status": "running", "config": cfg.to_dict()})
    with run.locked():
        code, _, stderr = run_main(monkeypatch, capsys, "run", "--resume", run.id, "--out", str(tmp_path / "results"), "-q")
    assert code == 2 and f"run {run.id} is being measured by another bench process" in stderr, stderr
    assert json.loads((run.path / "manifest.json").read_text())["status"] == "running"
    with run.locked():  # released again: a run whose process died (even by SIGKILL) can be resumed
        pass


def test_unwritable_reports_folder_is_found_before_the_run(tmp_path, monkeypatch, capsys):
    from conftest import run_main

    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, stderr = run_main(monkeypatch, capsys, "run", "--profile", "smoke", "--out", str(tmp_path / "results"),
                               "--reports", str(blocker / "reports"), "-q")
    assert code == 2 and "reports folder" in stderr and "pass --reports" in stderr and "--out" not in stderr, stderr
    assert not (tmp_path / "results").exists()  # nothing was measured


def test_sigterm_handler_stays_in_bench_and_out_of_its_children(monkeypatch, capsys):
    """main() in-process leaves the caller's handlers as they were; a forked child (a DataLoader
    worker) that inherited the handler still dies of SIGTERM, as its parent expects."""
    import multiprocessing
    import time

    from bench import cli
    from conftest import run_main

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    run_main(monkeypatch, capsys, "--version")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    monkeypatch.setattr(cli, "_main_pid", os.getpid())
    fork = multiprocessing.get_context("fork")
    ready = fork.Event()

    def worker():
        ready.set()  # past the fork's own signal set-up: a SIGTERM now reaches the inherited handler
        time.sleep(60)

    previous = signal.signal(signal.SIGTERM, cli._on_sigterm)
    try:
        child = fork.Process(target=worker)
        child.start()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert ready.wait(60)
    child.terminate()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGTERM
