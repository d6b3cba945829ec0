"""More than one process, on the CPU: torchrun data-parallel evaluation (gloo, 2 ranks) equals the
single-process run exactly; --devices cpu,cpu spreads the cells over two workers into one run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import config, parallel, runner
from bench.errors import UsageError
from bench.progress import Reporter
from bench.store import Run
from conftest import ROOT

TOML = (ROOT / "bench.toml").read_text() + """
[profiles.dp]
extends = "smoke"
methods = "deit,ats"
eval_batch_size = 30
batch_sizes = [2]

[profiles.dp.budgets]
ats = ["0.5"]
"""
SAME = ("n_samples", "top1", "top5", "top1_ci_low", "gmacs", "gmacs_p50", "gmacs_p90", "tokens_per_block")


def _records(run_path):
    run = Run(run_path)
    recs = {(r["method"], r["budget"], r["batch_size"]): r for r in run.records()}
    raw = {k: dict(np.load(run.path / r["raw"])) for k, r in recs.items()}
    return recs, raw


def _assert_same_results(a, b):
    recs_a, raw_a = a
    recs_b, raw_b = b
    assert recs_a.keys() == recs_b.keys() and recs_a
    for k in recs_a:
        for f in SAME:
            assert recs_a[k][f] == recs_b[k][f], (k, f)
        for f in ("correct1", "gmacs_per_sample"):
            assert np.array_equal(raw_a[k][f], raw_b[k][f]), (k, f)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    (tmp / "bench.toml").write_text(TOML)
    cfg = config.resolve("dp", tmp / "bench.toml", out=str(tmp / "results"))
    run = runner.execute(cfg, Reporter(quiet=True))
    return run.path


def test_torchrun_two_gloo_ranks_equal_the_single_process_run(single, tmp_path):
    (tmp_path / "bench.toml").write_text(TOML)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bench", "run",
         "--config", str(tmp_path / "bench.toml"), "--profile", "dp", "--out", str(tmp_path / "results"),
         "--reports", str(tmp_path / "reports"), "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=400, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [p for p in (tmp_path / "results").iterdir() if p.is_dir()]
    assert len(runs) == 1  # rank 1 writes nothing
    dp = _records(runs[0])
    assert {r["eval_world_size"] for r in dp[0].values()} == {2}
    _assert_same_results(dp, _records(single))


def test_shards_deal_whole_batches_round_robin():
    from bench.loading import shard_starts

    assert list(shard_starts(200, 30, (0, 2))) == [0, 60, 120, 180]
    assert list(shard_starts(200, 30, (1, 2))) == [30, 90, 150]
    both = sorted([*shard_starts(200, 30, (0, 2)), *shard_starts(200, 30, (1, 2))])
    assert both == list(shard_starts(200, 30, (0, 1)))


def test_devices_cpu_cpu_spreads_cells_over_two_workers_into_one_run(single, tmp_path):
    (tmp_path / "bench.toml").write_text(TOML)
    cfg = config.resolve("dp", tmp_path / "bench.toml", out=str(tmp_path / "results"), devices="cpu,cpu")
    cfg.threads = 1
    run = runner.execute(cfg, Reporter(quiet=True))
    assert not (run.path / "workers").exists()
    recs = run.records()
    assert {r["device"] for r in recs} == {"cpu"} and {r["run_id"] for r in recs} == {run.id}
    assert {r["worker_device"] for r in recs} == {"cpu"}
    assert run.manifest()["status"] == "complete"
    _assert_same_results(_records(run.path), _records(single))


def test_devices_pool_must_be_one_kind_and_cells_are_dealt_round_robin():
    assert parallel.deal(list(range(5)), 2) == [[0, 2, 4], [1, 3]]
    with pytest.raises(UsageError, match="no CUDA GPU|mixes"):
        parallel.check_pool(["cpu", "cuda:0"])


def test_merge_keeps_worker_cells_of_an_interrupted_run(tmp_path, single):
    """Cells a worker finished before a crash reach the run on the next merge (as --resume does)."""
    run = Run.create(tmp_path, "x", {"config": {}})
    part = Run(parallel.worker_folder(run.path, 1))
    part.path.mkdir(parents=True)
    part.write_manifest({"worker": 1, "dataset": {"skipped_files": ["/data/bad.JPEG"]}})
    src = Run(single)
    rec = src.records()[0]
    part.add_record({k: v for k, v in rec.items() if k != "raw"}, dict(np.load(src.path / rec["raw"])))
    assert parallel.merge_workers(run) == 1
    merged = run.records()
    assert len(merged) == 1 and merged[0]["run_id"] == run.id and (run.path / merged[0]["raw"]).is_file()
    assert run.manifest()["dataset"]["skipped_corrupt"] == 1
    assert json.loads((run.path / "manifest.json").read_text())["dataset"]["skipped_files"] == ["/data/bad.JPEG"]
