"""`bench compare` gates and `bench baseline update`, on a real smoke run and copies of it with one
measured value changed the way a regression would change it."""
import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest

from bench import compare
from bench.errors import UsageError
from bench.store import Run
from benchrun import bench, smoke_run
from conftest import ROOT, run_main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return smoke_run(tmp_path_factory)


def main(*args, monkeypatch, capsys) -> tuple[int, str, str]:
    """`bench ARGS` in this process, from the project root (its bench.toml holds the thresholds)."""
    monkeypatch.chdir(ROOT)
    return run_main(monkeypatch, capsys, *args)


def copy_run(run_dir: Path, dest: Path, edit=None, manifest=None, quiet_timing=False) -> Path:
    """A copy of the run whose records (and manifest) ``edit`` may change, as a regression would.
    ``quiet_timing`` drops the per-iteration times, so only the configured speed threshold applies
    (the smoke run's few timed iterations on a busy machine can be as noisy as anything)."""
    shutil.copytree(run_dir, dest)
    if quiet_timing:
        for f in (dest / "raw").glob("*.npz"):
            with np.load(f) as z:
                kept = {k: z[k] for k in z.files if k not in ("iter_seconds", "dense_iter_seconds")}
            np.savez_compressed(f, **kept)
    if edit:
        records = [json.loads(line) for line in (dest / "records.jsonl").read_text().splitlines()]
        records = [r for r in (edit(r) for r in records) if r is not None]
        (dest / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if manifest:
        m = json.loads((dest / "manifest.json").read_text())
        manifest(m)
        (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def _ats(budget="0.25", bs=None):
    return lambda r: r["method"] == "ats" and r["budget"] == budget and (bs is None or r["batch_size"] == bs)


def _set(match, **changes):
    def edit(r):
        if match(r):
            r = {**r, **{k: (v(r[k]) if callable(v) else v) for k, v in changes.items()}}
        return r
    return edit


def test_same_run_passes(run_dir, monkeypatch, capsys):
    code, out, err = main("compare", str(run_dir), str(run_dir), "--all", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert "6 cells compared, 6 same" in out and "no regression" in out
    assert "paired" in out  # per-sample correctness of both runs: the paired interval


@pytest.mark.parametrize("what,edit,gate", [
    ("accuracy", _set(_ats(), top1=lambda v: v - 5.0), "accuracy"),
    ("gmacs", _set(_ats(bs=4), gmacs=lambda v: v * 1.02), "gmacs"),
    ("speed", _set(_ats(bs=4), speedup=lambda v: v * 0.4), "speed"),
    ("missing", lambda r: None if _ats("blocks:-2/-1", 1)(r) else r, "missing"),
])
def test_regressions_fail_with_exit_1(run_dir, tmp_path, monkeypatch, capsys, what, edit, gate):
    base = copy_run(run_dir, tmp_path / "base", quiet_timing=True)
    cur = copy_run(run_dir, tmp_path / "cur", edit, quiet_timing=True)
    code, out, err = main("compare", str(base), str(cur), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1, (out, err)
    assert f"{gate}:" in err and "regression" in err and "[compare] in bench.toml" in err
    assert ("missing" if what == "missing" else "REGRESSED") in out
    # the same change passes when that gate is not failing, or its tolerance allows it
    code, out, err = main("compare", str(base), str(cur), "--fail-on",
                          ",".join(g for g in compare.GATES if g not in (gate, "stale")),
                          monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, (out, err)
    if what in compare.TOLERANCE_KEYS:
        loose = {"accuracy": "accuracy=6", "gmacs": "gmacs=3%", "speed": "speed=0.7"}[what]
        code, out, err = main("compare", str(base), str(cur), "--tolerance", loose, monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, (out, err)


def test_out_of_memory_cell_fails_as_missing(run_dir, tmp_path, monkeypatch, capsys):
    """A cell that ran out of memory (NaN speed) is no measurement: it fails the missing gate."""
    nan = float("nan")
    cur = copy_run(run_dir, tmp_path / "cur", _set(_ats(bs=4), status="oom", speedup=nan, img_per_s=nan, latency_ms_p50=nan,
                                                   latency_ms_p90=nan, batch_size_run=0), quiet_timing=True)
    code, out, err = main("compare", str(run_dir), str(cur), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and "missing: 1" in err, (out, err)
    assert "out of memory" in out and "1 out of memory" in out
    code, out, err = main("compare", str(run_dir), str(cur), "--fail-on", "accuracy,gmacs,speed",
                          monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, (out, err)


def test_small_changes_within_thresholds_pass(run_dir, tmp_path, monkeypatch, capsys):
    edit = _set(_ats(bs=4), top1=lambda v: v - 0.5, gmacs=lambda v: v * 1.001, speedup=lambda v: v * 0.85)
    cur = copy_run(run_dir, tmp_path / "cur", edit)
    code, out, err = main("compare", str(run_dir), str(cur), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, (out, err)


def test_improvements_are_reported_and_fail_only_as_stale(run_dir, tmp_path, monkeypatch, capsys):
    cur = copy_run(run_dir, tmp_path / "cur", _set(_ats(bs=4), gmacs=lambda v: v * 0.9))
    code, out, err = main("compare", str(run_dir), str(cur), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "improved" in out and "1 improved" in out
    code, out, err = main("compare", str(run_dir), str(cur), "--fail-on", "all", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and "stale: 1" in err


def test_accuracy_gate_is_ci_aware():
    """A drop inside the interval of the difference does not count; paired is tighter than unpaired."""
    b = {"top1": 80.0, "n_samples": 200}
    c = {"top1": 77.0, "n_samples": 200}
    z = compare._z(0.95)
    half, kind = compare.accuracy_halfwidth(b, c, {}, {}, z)
    assert kind == "unpaired" and 7.5 < half < 8.5  # 1.96 * sqrt(2 * 0.8 * 0.2 / 200) ~ 7.9 points
    base = np.zeros(200, bool)
    base[:160] = True
    cur = base.copy()
    cur[:6] = False  # 6 of the same 200 images now wrong, none newly right: a real 3-point drop
    half, kind = compare.accuracy_halfwidth(b, c, {"correct1": base}, {"correct1": cur}, z)
    assert kind == "paired" and half < 3.0  # the 3-point drop counts here, not in the unpaired test
    same, _ = compare.accuracy_halfwidth(b, b, {"correct1": base}, {"correct1": base}, z)
    assert same == 0.0


def test_speed_noise_from_paired_iterations():
    rng = np.random.default_rng(0)
    dense = 0.010 * (1 + 0.01 * rng.standard_normal(40))
    quiet = {"iter_seconds": dense / 2, "dense_iter_seconds": dense}
    noisy = {"iter_seconds": dense / 2 * rng.choice([1.0, 3.0], 40), "dense_iter_seconds": dense}
    assert compare.speedup_log_sd(quiet) < 0.01 < compare.speedup_log_sd(noisy)
    assert compare.speedup_log_sd({}) == 0.0


def test_thresholds_from_config_and_flags():
    data = tomllib.loads((ROOT / "bench.toml").read_text())
    th = compare.thresholds(data["compare"])
    assert th.fail_on == ("accuracy", "gmacs", "speed", "missing")
    th = compare.thresholds(data["compare"], ["accuracy=0.25,speed=50%", "gmacs=0.01"], "gmacs,stale")
    assert (th.accuracy_points, th.speed_rel, th.gmacs_rel, th.fail_on) == (0.25, 0.5, 0.01, ("gmacs", "stale"))
    for bad in (["speed=fast"], ["latency=3"], ["accuracy"], ["gmacs=-1"]):
        with pytest.raises(UsageError):
            compare.thresholds({}, bad)
    with pytest.raises(UsageError):
        compare.thresholds({}, None, "accuracy,flops")


@pytest.mark.parametrize("case,needle", [
    ("not a run", "not a bench run"),
    ("no common cells", "no cell in common"),
    ("other profile", "profile 'smoke' but"),
    ("no cells", "no finished cells"),
    ("bad tolerance", "--tolerance"),
    ("bad gate", "unknown gate"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, monkeypatch, capsys, case, needle):
    base, cur, extra = str(run_dir), str(run_dir), []
    if case == "not a run":
        (tmp_path / "notarun").mkdir()
        cur = str(tmp_path / "notarun")
    elif case == "no common cells":
        cur = str(copy_run(run_dir, tmp_path / "c", _set(lambda r: True, batch_size=lambda v: v + 100)))
    elif case == "other profile":
        cur = str(copy_run(run_dir, tmp_path / "c", manifest=lambda m: m.update(profile="ci")))
    elif case == "no cells":
        cur = str(copy_run(run_dir, tmp_path / "c", lambda r: None))
    elif case == "bad tolerance":
        extra = ["--tolerance", "speed=fast"]
    else:
        extra = ["--fail-on", "flops"]
    code, out, err = main("compare", base, cur, *extra, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert "Traceback" not in out + err


def _damage_last_line(run: Path) -> None:
    lines = (run / "records.jsonl").read_text().splitlines()
    (run / "records.jsonl").write_text("\n".join(lines[:-1] + [lines[-1][:40]]) + "\n")  # a half-written line


def test_damaged_record_line_on_either_side(run_dir, tmp_path, monkeypatch, capsys):
    """The damaged cell is skipped with a warning naming the line; the other cells are compared, and a
    baseline cell lost that way fails the missing gate."""
    damaged = copy_run(run_dir, tmp_path / "damaged")
    _damage_last_line(damaged)
    code, out, err = main("compare", str(run_dir), str(damaged), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and "records.jsonl line 6 is damaged" in err and "missing: 1" in err, (out, err)
    assert "5 cells compared" in out
    code, out, err = main("compare", str(damaged), str(run_dir), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "5 cells compared" in out and "1 new" in out, (out, err)


def test_unwritable_markdown_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, out, err = main("compare", str(run_dir), str(run_dir), "--markdown", str(blocker / "cmp.md"),
                          monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().startswith("error: --markdown") and "cannot be written" in err


def test_bad_input_in_a_real_process(run_dir, tmp_path):
    other = copy_run(run_dir, tmp_path / "c", manifest=lambda m: m.update(profile="ci"))
    p = bench("compare", str(run_dir), str(other))
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("error: baseline") and "profile 'smoke' but" in p.stderr and "Traceback" not in p.stderr


def test_baseline_update_and_compare_by_profile_name(run_dir, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    shutil.copytree(run_dir, results / run_dir.name)
    code, out, err = main("baseline", "update", "--results", str(results), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    base = results / "baselines" / "smoke"
    assert "(new)" in out and (base / "records.jsonl").read_text() == (run_dir / "records.jsonl").read_text()
    assert Run(base).manifest()["baseline_of"] == run_dir.name
    assert all(Run(base).raw(r) for r in Run(base).records())  # per-sample correctness travels along
    assert base.stat().st_mode & 0o777 == (results / "baselines").stat().st_mode & 0o777  # the umask's, not mkdtemp's 0700
    code, out, err = main("compare", "smoke", run_dir.name, "--results", str(results), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "no regression" in out, err
    # a second update replaces it and says what it replaced
    code, out, err = main("baseline", "update", run_dir.name, "--results", str(results), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and f"replaced run {run_dir.name}" in out
    assert sorted(p.name for p in (results / "baselines").iterdir()) == ["smoke"]
    # an unfinished run never becomes a baseline, and the old one stays
    copy_run(run_dir, results / "zz-unfinished", manifest=lambda m: m.update(status="interrupted"))
    code, out, err = main("baseline", "update", "zz-unfinished", "--results", str(results), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.startswith("error:") and "complete run" in err
    assert Run(base).manifest()["baseline_of"] == run_dir.name


def test_committed_ci_baseline_matches_the_ci_profile():
    """The baseline .ci/run gates against was made by the `ci` profile and has all its cells."""
    import methods
    from bench import budgets, config

    base = Run(ROOT / "results" / "baselines" / "ci")
    m = base.manifest()
    assert m["profile"] == "ci" and m["status"] == "complete"
    cfg = config.resolve("ci", ROOT / "bench.toml")
    wanted = {(mid, budgets.label(b), bs) for mid in [s.id for s in methods.available()]
              for b in budgets.for_method(mid, cfg.budgets) for bs in cfg.batch_sizes}
    have = {(r["method"], r["budget"], r["batch_size"]) for r in base.records()}
    assert have == wanted
    assert all("correct1" in base.raw(r) for r in base.records())
    # every fine-tuned cell's weights travel with the baseline, under the cache name the run looks up
    tuned = {Path(r["method_checkpoint"]).name for r in base.records() if r.get("finetuned")}
    assert tuned and sorted(tuned) == sorted(m["baseline_weights"])
    assert all((base.path / "weights" / name).is_file() for name in tuned)


def test_baseline_update_copies_fine_tuned_weights(run_dir, tmp_path, monkeypatch, capsys):
    """A fine-tuned cell's method checkpoint is copied into the baseline's weights/ folder (once);
    the backbone checkpoint and missing files are not."""
    from safetensors.torch import load_file, save_file
    import torch

    ckpt = tmp_path / "cache" / "digits_vit-avit-0123456789abcdef.safetensors"
    ckpt.parent.mkdir()
    save_file({"w": torch.arange(4.0)}, str(ckpt))
    results = tmp_path / "results"
    backbone = tmp_path / "user" / "backbone.safetensors"  # a user checkpoint that carried the method's weights
    backbone.parent.mkdir()
    save_file({"w": torch.zeros(2)}, str(backbone))
    mark = _set(_ats(), finetuned=True, method_checkpoint=str(ckpt))
    given = _set(lambda r: r["method"] == "deit", finetuned=True, method_checkpoint=str(backbone), checkpoint=backbone.name)
    copy_run(run_dir, results / run_dir.name, edit=lambda r: given(mark(r)))
    code, out, err = main("baseline", "update", "--results", str(results), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    base = results / "baselines" / "smoke"
    assert Run(base).manifest()["baseline_weights"] == [ckpt.name]
    assert sorted(p.name for p in (base / "weights").iterdir()) == [ckpt.name]
    assert torch.equal(load_file(str(base / "weights" / ckpt.name))["w"], torch.arange(4.0))
