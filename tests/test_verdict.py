"""Matched compute (gmacs:R budgets, bench/calibrate.py) and the verdict table (bench/verdict.py):
docs/measurement.md#matched-compute, docs/measurement.md#verdict."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch

import methods
from bench import budgets, calibrate, verdict
from bench.errors import UsageError

from conftest import ROOT, bench_cmd, sharpened_digits


def test_a_gmacs_budget_is_a_target_not_a_knob():
    assert budgets.target("gmacs:0.7") == 0.7 and budgets.target("0.7") is None
    assert budgets.parse("evit", "gmacs:0.7") == {} and budgets.parse("evit", "gmacs:0.5+fuse:false") == {"fuse": False}
    assert budgets.target("blocks:1-5+gmacs:0.5") == 0.5
    with pytest.raises(UsageError, match="in \\(0, 1\\]"):
        budgets.target("gmacs:1.5")
    with pytest.raises(UsageError, match="no knob to match"):
        budgets.parse("deit", "gmacs:0.5")


def test_shared_budgets_run_every_method_but_the_dense_one():
    configured = {"all": ["gmacs:0.5", "gmacs:0.7"], "ats": ["1.0"]}
    assert budgets.for_method("ats", configured) == ["gmacs:0.5", "gmacs:0.7", "1.0"]
    assert budgets.for_method("tome", configured) == ["gmacs:0.5", "gmacs:0.7"]
    assert budgets.for_method(methods.DENSE, configured) == ["full"]
    assert budgets.for_method("tome", {"all": []}) == list(methods.get("tome").default_budgets)
    assert budgets.parse_cli("all=gmacs:0.5,0.7;ats=0.5") == {"all": ["gmacs:0.5", "gmacs:0.7"], "ats": ["0.5"]}


@pytest.mark.parametrize("increasing", [True, False])
def test_search_finds_the_target_or_the_end_of_the_range(increasing):
    spec = methods.MatchedCompute("k", 0.0, 10.0, increasing=increasing)
    f = (lambda v: 0.1 + 0.08 * v) if increasing else (lambda v: 0.9 - 0.08 * v)
    value, ratio = calibrate.search(f, spec, 0.5)
    assert abs(ratio / 0.5 - 1) <= calibrate.STOP and f(value) == ratio
    value, ratio = calibrate.search(f, spec, 0.05)  # below what the range reaches
    assert value == (0.0 if increasing else 10.0) and ratio == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["evit", "tome"])
def test_calibration_puts_a_real_model_on_the_target(method):
    vit = sharpened_digits()
    x = torch.randn(24, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    spec = methods.get(method)
    dense = methods.vit_shape(vit).dense_gmacs()
    cal = calibrate.calibrate(lambda k: methods.build(method, vit, **k).eval(), spec, {}, 0.75, list(x.split(12)), dense, "test")
    assert cal.matched and cal.knob == spec.matched.knob
    model = methods.build(method, vit, **{cal.knob: cal.value}).eval()
    assert calibrate.mean_ratio(model, list(x.split(12)), dense) == pytest.approx(cal.ratio)
    assert cal.fields()["gmacs_target"] == 0.75 and abs(cal.fields()["gmacs_residual"]) <= 0.02


def test_paired_difference_and_pareto():
    dense = np.array([1, 1, 0, 1, 0, 1, 1, 0] * 25, dtype=bool)
    method = dense.copy()
    method[:10] = ~method[:10]  # 10 images flip: 7 correct -> wrong, 3 wrong -> right
    mean, lo, hi = verdict.paired_difference(method, dense)
    assert mean == pytest.approx((3 - 7) / 200 * 100) and lo < mean < hi
    same = verdict.paired_difference(dense, dense)
    assert same == (0.0, 0.0, 0.0)
    assert verdict.pareto([(80, 0.5), (79, 0.5), (81, 0.7), (80, 0.7)]) == [True, False, True, False]


def _record(method, budget, bs, top1, ratio, speedup, target=None, knob=None):
    r = {"method": method, "budget": budget, "batch_size": bs, "top1": top1, "gmacs_ratio": ratio, "speedup": speedup,
         "device": "cpu", "precision": "fp32", "dataset": "digits", "backbone": "digits_vit", "n_samples": 4}
    if target is not None:
        r.update(gmacs_target=target, calibrated_knob=knob, calibrated_value=0.4, gmacs_matched=True)
    return r


def test_verdict_rows_order_by_compute_then_accuracy_and_mark_slow_methods():
    recs = [_record("deit", "full", bs, 75.0, 1.0, 1.0) for bs in (1, 32)]
    recs += [_record("a", "gmacs:0.5", bs, 50.0, 0.5, s, 0.5, "keep") for bs, s in ((1, 1.2), (32, 0.9))]
    recs += [_record("b", "gmacs:0.5", bs, 75.0, 0.51, 1.5, 0.5, "r") for bs in (1, 32)]
    recs += [_record("a", "gmacs:0.7", bs, 75.0, 0.7, 1.1, 0.7, "keep") for bs in (1, 32)]
    correct = {"deit": np.array([1, 1, 1, 0]), "a": np.array([1, 0, 1, 0]), "b": np.array([1, 1, 1, 0])}
    table = verdict.rows(recs, lambda r: correct[r["method"]])
    assert list(zip(table["target"], table["method"])) == [(0.5, "b"), (0.5, "a"), (0.7, "a")]
    assert table["delta_top1"].tolist() == pytest.approx([0.0, -25.0, -25.0])
    assert table["slower_than_dense"].tolist() == [False, True, False]
    assert table["pareto"].tolist() == [True, True, False]  # a at 0.5 spends the least
    assert "speedup_bs32" in table and table["budget"][0] == "gmacs=0.5 (r=0.4)"
    md = verdict.markdown(table, recs)
    assert md.startswith("## Verdict at matched compute") and "SLOWER than dense" in md and "dataset digits" in md


def test_a_run_at_a_compute_point_opens_with_the_verdict(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out, rep = tmp_path / "results", tmp_path / "rep"
    p = subprocess.run([*bench_cmd(), "run", "--profile", "smoke", "--methods", "evit", "--budgets", "all=gmacs:0.6",
                        "--batch-sizes", "1", "--out", str(out), "--reports", str(rep), "--quiet"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "verdict at matched compute" in p.stdout
    run_dir = next(out.iterdir())
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    matched = [r for r in records if r.get("gmacs_target") is not None]
    assert {r["method"] for r in matched} == {"evit"}
    for r in matched:
        assert r["gmacs_matched"] and r["calibration_split"] == "validation split"
        assert abs(r["gmacs_ratio"] - 0.6) < 0.03  # found on validation, measured on the test list
        assert r["knobs"][r["calibrated_knob"]] == r["calibrated_value"]
    board = (rep / run_dir.name / "leaderboard.md").read_text()
    assert board.index("## Verdict at matched compute") < board.index("| method ")
