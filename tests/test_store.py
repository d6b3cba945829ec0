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


def test_damaged_record_lines_are_skipped_named_and_kept_aside(tmp_path, capsys):
    """A half-written line (a power cut), a non-object and a record without its identity are skipped
    with a warning naming the line; the good records are read, and kept when the next cell is added."""
    run = Run.create(tmp_path, "unit", {"profile": "unit"})
    run.add_record(rec(1))
    run.add_record(rec(2))
    good = (run.path / "records.jsonl").read_text()
    damaged = ['{"method": "deit", "budget": "fu', "[1, 2]", '{"top1": 3}']
    (run.path / "records.jsonl").write_text(good + "\n".join(damaged) + "\n")
    assert [r["batch_size"] for r in run.records()] == [1, 2]
    assert sorted(run.dataframe()["batch_size"]) == [1, 2]
    warned = capsys.readouterr().err
    for number in (3, 4, 5):
        assert f"records.jsonl line {number} is damaged" in warned
    run.add_record(rec(4))
    assert [r["batch_size"] for r in run.records()] == [1, 2, 4]
    assert (run.path / "records.damaged.jsonl").read_text().splitlines() == damaged
    assert "moved to" in capsys.readouterr().err


def test_manifest_config_of_another_version_is_refused(tmp_path):
    from bench.config import RunConfig, resolve

    d = resolve("smoke").to_dict()
    with pytest.raises(UsageError, match="settings this bench does not know .*future_knob"):
        RunConfig.from_dict({**d, "future_knob": 1})
    with pytest.raises(UsageError, match="timing.spin"):
        RunConfig.from_dict({**d, "timing": {**d["timing"], "spin": 3}})
    assert RunConfig.from_dict(d) == resolve("smoke")


def test_files_get_the_umask_mode(tmp_path):
    """Results are readable by whoever the umask lets read them (a web server serving report.html),
    not 0600 as the temporary files they are renamed from."""
    import os

    from bench.store import atomic_write

    old = os.umask(0o022)
    try:
        run = Run.create(tmp_path, "unit", {"profile": "unit"})
        run.add_record(rec(1), {"iter_seconds": np.array([0.1])})
        atomic_write(tmp_path / "report.html", b"<html>")
        files = [run.path / "manifest.json", run.path / "records.jsonl", run.path / run.records()[0]["raw"], tmp_path / "report.html"]
        assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o644" for f in files}
        os.umask(0o077)
        atomic_write(tmp_path / "private.txt", b"x")
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_stale_temporaries_are_removed_when_a_run_is_taken_up(tmp_path, capsys):
    """A power cut between writing a temporary file and renaming it leaves .NAME.*.tmp behind; the
    next process to take the run (under its lock) removes them and says so. Records are untouched."""
    run = Run.create(tmp_path, "unit", {"profile": "unit"})
    run.add_record(rec(1), {"iter_seconds": np.array([0.1])})
    stale = [run.path / ".records.jsonl.k2j3.tmp", run.path / ".manifest.json.x8.tmp", run.path / "raw" / ".a.npz.q1.tmp"]
    for p in stale:
        p.write_text("half")
    with run.locked():
        assert not any(p.exists() for p in stale)
    warned = capsys.readouterr().err
    assert all(str(p) in warned for p in stale)
    assert [r["batch_size"] for r in run.records()] == [1] and run.raw(run.records()[0])
