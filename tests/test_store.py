"""Results are written atomically, read by pandas in one call, and found again for resume."""
import json

import numpy as np
import pandas as pd
import pytest

from bench.errors import UsageError
from bench.store import Run, cell_key


def rec(bs, top1=90.0):
    return {"method": "deit", "budget": "full", "mode": "compact", "device": "cpu", "precision": "fp32",
            "batch_size": bs, "top1": top1, "arxiv": "2111.15667"}


def test_records_roundtrip_and_replace(tmp_path):
    run = Run.create(tmp_path, "unit", {"profile": "unit"})
    run.add_record(rec(1), {"iter_seconds": np.array([0.1, 0.2])})
    run.add_record(rec(8))
    run.add_record(rec(8, top1=91.0))  # same cell again replaces, never duplicates
    df = pd.read_json(run.path / "records.jsonl", lines=True, dtype=False)
    assert len(df) == 2 and sorted(df["batch_size"]) == [1, 8]
    assert df.loc[df.batch_size == 8, "top1"].item() == 91.0
    assert run.dataframe()["arxiv"].iloc[0] == "2111.15667"  # ids stay text
    raw = np.load(run.path / run.records()[0]["raw"])
    assert raw["iter_seconds"].tolist() == [0.1, 0.2]
    assert run.done_keys() == {cell_key(rec(1)), cell_key(rec(8))}
    assert not list(run.path.glob(".*.tmp"))


def test_find_latest_and_errors(tmp_path):
    a = Run.create(tmp_path, "p", {})
    b = Run.create(tmp_path, "p", {})
    assert Run.find(tmp_path, "latest").path == max(a.path, b.path)
    assert Run.find(tmp_path, a.id).path == a.path
    with pytest.raises(UsageError, match="no run 'nope'"):
        Run.find(tmp_path, "nope")
    (tmp_path / "junk").mkdir()
    with pytest.raises(UsageError, match="not a bench run"):
        Run.find(tmp_path, "junk")
    assert json.loads((a.path / "manifest.json").read_text()) == {}


def test_unwritable_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="cannot be written"):
        Run.create(blocker / "results", "p", {})
