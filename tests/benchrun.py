"""One real smoke run shared by the report and compare tests (made once per test session)."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

_RUNS: dict[str, Path] = {}


def bench(*args, cwd=ROOT, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    # `python -m bench` from the project root: this checkout's code whatever the venv's script points at
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def smoke_run(tmp_path_factory) -> Path:
    """deit + two training-free ATS budgets at batch 1 and 4: 6 cells, about 10-20 s on 2 cores."""
    if "run" not in _RUNS:
        root = tmp_path_factory.mktemp("shared-run")
        p = bench("run", "--profile", "smoke", "--methods", "ats", "--budgets", "ats=0.25,blocks:-2/-1",
                  "--batch-sizes", "1,4", "--out", str(root / "results"), "--reports", str(root / "reports"), "--quiet")
        assert p.returncode == 0, p.stderr
        (run,) = [d for d in (root / "results").iterdir() if (d / "manifest.json").is_file()]
        _RUNS["run"] = run
    return _RUNS["run"]
