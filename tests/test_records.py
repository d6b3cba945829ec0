"""The declared record (bench/records.py): typed columns that round-trip through pandas, documented
from the declaration; the manifest's machine and environment; a cell's own CPU peak memory."""
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

import methods
from bench import budgets, config, measure, records, runner
from bench.store import Run
from benchrun import smoke_run
from conftest import ROOT


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return smoke_run(tmp_path_factory)


def test_undeclared_column_is_refused():
    with pytest.raises(KeyError, match="undeclared record column"):
        records.make({"method": "deit", "new_column": 1})


def test_make_types_and_rounds():
    rec = records.make({"arxiv": 2106.1027, "finetuned": 0, "knobs": {"keep": 0.1 * 7, "tokens": [0.1 * 3, 20]},
                        "method": "ats", "batch_size": 8})
    assert rec["schema_version"] == records.SCHEMA_VERSION and list(rec)[:3] == ["schema_version", "method", "batch_size"]
    assert rec["arxiv"] == "2106.1027" and rec["finetuned"] is False
    assert rec["knobs"] == {"keep": 0.7, "tokens": [0.3, 20]}


def test_docs_table_is_generated_from_the_declaration():
    text = records.DOCS.read_text()
    assert records.docs_with_table(text) == text, "docs/records.md is stale: run `python -m bench.records`"
    for c in records.COLUMNS:
        assert f"| `{c.name}` |" in text


def test_readme_names_only_declared_columns():
    import re

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| column | what |"):readme.index("Protocol (")]
    first_cells = [line.split("|")[1] for line in table.splitlines()[2:] if line.startswith("|")]
    named = {n for cell in first_cells for n in re.findall(r"`([a-z0-9_]+)`", cell) if not n.startswith("_")}
    assert len(named) > 10 and named <= set(records.BY_NAME), named - set(records.BY_NAME)


def test_records_round_trip_through_pandas(run_dir):
    df = Run(run_dir).dataframe()
    assert (df["schema_version"] == records.SCHEMA_VERSION).all()
    assert set(df.loc[df["method"] == "ats", "arxiv"]) == {"2111.15667"}
    assert all(isinstance(v, str) for v in df["arxiv"]) and all(isinstance(v, str) for v in df["budget"])
    assert str(df["finetuned"].dtype) == "boolean" and not df["finetuned"].any()
    assert (df["method_checkpoint"] == "").all()
    assert set(df["peak_mem_kind"]) == {"cpu_weights_plus_rss_peak"}
    for knobs in df["knobs"]:
        assert all(v == float(f"{v:.12g}") for v in knobs.values() if isinstance(v, float))
    csv_back = pd.read_json(run_dir / "records.jsonl", lines=True, dtype=False)
    assert list(csv_back.columns) == list(df.columns)


def test_old_records_without_a_schema_version_still_load(tmp_path):
    """A run written before the declaration (version 1: no schema_version column, finetuned left out
    of dense rows) loads with the declared dtypes."""
    import json
    import shutil

    old = tmp_path / "old-run"
    shutil.copytree(ROOT / "results" / "baselines" / "ci", old)
    lines = []
    for line in (old / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        r.pop("schema_version", None)
        if r["method"] == "deit":
            r.pop("finetuned", None)
        lines.append(json.dumps(r))
    (old / "records.jsonl").write_text("\n".join(lines) + "\n")
    base = Run(old)
    df = base.dataframe()
    assert "schema_version" not in df.columns and len(df) == len(base.records())
    assert all(isinstance(v, str) for v in df["arxiv"]) and str(df["finetuned"].dtype) == "boolean"


def test_method_checkpoint_is_a_name_and_a_hash(tmp_path):
    path = tmp_path / "home" / "user" / ".cache" / "bench" / "digits_vit-avit-0123.safetensors"
    info = runner._method_checkpoint(path, "ab" * 32)
    assert info == {"finetuned": True, "method_checkpoint": "digits_vit-avit-0123.safetensors", "method_checkpoint_sha256": "ab" * 32}


def test_manifest_tells_machines_apart_and_names_default_budgets(run_dir):
    m = Run(run_dir).manifest()
    assert m["schema_version"] == records.SCHEMA_VERSION
    machine = m["machine"]
    assert machine["cpu_model"] and machine["logical_cores"] >= machine["usable_cores"] >= 1 and machine["memory_gib"] > 0
    assert m["versions"]["scikit-learn"] and m["packages"]["scikit-learn"] == m["versions"]["scikit-learn"]
    assert m["packages"]["torch"] == m["versions"]["torch"] and len(m["packages"]) > 20
    cfg = config.resolve("smoke", ROOT / "bench.toml")
    ids = runner.resolve_methods(["all"])
    defaults = runner.default_budgets(cfg, ids)
    assert "deit" not in defaults  # the profile lists deit's budgets
    assert defaults["ats"] == [budgets.label(b) for b in methods.get("ats").default_budgets]


def _heap_left_behind() -> None:
    """What fine-tuning leaves in a process: many freed allocations glibc keeps in its heap."""
    keep = [torch.randn(16, 1024) for _ in range(8000)]  # 500 MiB in blocks glibc keeps in its heap
    del keep[::2]
    del keep


def test_cpu_peak_memory_is_the_cells_own():
    torch.manual_seed(0)
    model = methods.build("deit", timm.create_model("digits_vit").eval()).eval()
    x = torch.randn(8, 1, 64, 64)
    with torch.inference_mode():
        model(x)
    before, kind = measure.peak_memory_mb(model, x, torch.device("cpu"), "fp32", 1)
    _heap_left_behind()
    after, _ = measure.peak_memory_mb(model, x, torch.device("cpu"), "fp32", 1)
    assert kind == "cpu_weights_plus_rss_peak"
    weights = measure.weight_bytes(model) / 2**20
    assert weights <= before < weights + 100 and weights <= after < weights + 100
    assert abs(after - before) < 20, (before, after)  # the 500 MiB earlier work left in the heap do not count


def test_a_recorded_checkpoint_name_is_found_in_the_cache(tmp_path, monkeypatch):
    from bench import cache

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    cached = tmp_path / "cache" / "digits_vit-avit-0123456789abcdef.safetensors"
    cached.write_bytes(b"x")
    assert cache.locate(cached.name) == cached
    assert cache.locate(str(cached)) == cached  # records before schema version 2 kept the absolute path
    assert cache.locate("digits_vit-avit-missing.safetensors") is None and cache.locate(str(tmp_path / "gone")) is None
