"""Results that are never lost: ``results/<run-id>/`` with a manifest and one record per cell.

Each finished cell is written at once, atomically (write to a temporary file, fsync, rename), so
a run killed at any moment leaves a readable ``records.jsonl`` that ``pandas.read_json(...,
lines=True)`` loads in one call, and ``--resume`` can finish it without repeating a cell.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import UsageError, warn

MANIFEST = "manifest.json"
RECORDS = "records.jsonl"
LOCK = ".lock"  # held by the process measuring into the run (Run.locked)
DAMAGED = "records.damaged.jsonl"  # lines of records.jsonl that could not be read, kept for inspection
IDENTITY = ("method", "budget", "mode", "device", "precision", "batch_size")


def umask_mode(base: int = 0o666) -> int:
    """The mode open() or mkdir() would give (``base`` less the umask). Temporary files are made
    0600 (folders 0700), which would keep other users and a web server out of results and reports."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), umask_mode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=_jsonable, allow_nan=True)


def cell_key(record: dict) -> str:
    return "|".join(str(record[k]) for k in IDENTITY)


def ensure_writable(root: Path, flag: str = "--out", what: str = "results folder") -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise UsageError(f"{what} {root} cannot be written ({e.strerror or e}); pass {flag} to a writable folder") from None


def staging_folder(root: Path, name: str) -> Path:
    """A hidden folder beside ``root/name`` to build its new version in, so that a kill leaves the
    old version whole, never a partial one. Leftovers of builds that were killed are removed first."""
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    for kind in ("new", "old"):
        for stale in root.glob(f".{glob.escape(name)}.{kind}-*"):
            shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.new-"))
    folder.chmod(umask_mode(0o777))  # mkdtemp's 0700 would become the finished folder's mode
    return folder


def replace_folder(new: Path, dest: Path) -> None:
    """Put ``new`` in place of ``dest`` by renames: a reader sees the old folder or the new one."""
    import shutil

    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        os.replace(dest, old)
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files of atomic writes cut short by a power cut or SIGKILL (``.NAME.*.tmp``);
    call only where no other process can be writing (a run: under its lock)."""
    stale = [p for p in folder.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class Run:
    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def id(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, root: Path, profile: str, manifest: dict) -> "Run":
        ensure_writable(root)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = root / f"{stamp}-{profile}"
        n = 1
        while path.exists():
            n += 1
            path = root / f"{stamp}-{profile}-{n}"
        path.mkdir(parents=True)
        run = cls(path)
        run.write_manifest(manifest)
        return run

    @classmethod
    def open(cls, path: Path) -> "Run":
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise UsageError(f"{path} is not a bench run (no {MANIFEST}); pass a folder under results/")
        return cls(path)

    @staticmethod
    def latest(root: Path) -> "Run":
        runs = sorted((p for p in Path(root).glob("*") if (p / MANIFEST).is_file()), key=lambda p: p.name)
        if not runs:
            raise UsageError(f"no runs under {root}; start one with `bench run`")
        return Run(runs[-1])

    @staticmethod
    def find(root: Path, ref: str) -> "Run":
        """A run by id (folder name under ``root``), by path, or ``latest``."""
        if ref == "latest":
            return Run.latest(root)
        p = Path(ref)
        if (p / MANIFEST).is_file():
            return Run(p)
        if (Path(root) / ref / MANIFEST).is_file():
            return Run(Path(root) / ref)
        if p.exists() or (Path(root) / ref).exists():
            return Run.open(p if p.exists() else Path(root) / ref)
        where = str(p) if p == Path(root) / ref else f"{p} and {Path(root) / ref}"
        raise UsageError(f"no run '{ref}' (looked for {where}); `ls {root}` lists runs")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held while a process measures into this run, so that a second ``bench run --resume`` of
        it refuses instead of measuring the same cells on the same cores (the kernel releases the
        lock when its holder dies, even by SIGKILL, so a killed run can still be resumed)."""
        from filelock import FileLock, Timeout

        lock = FileLock(self.path / LOCK, timeout=0, mode=umask_mode())
        try:
            lock.acquire()
        except Timeout:
            raise UsageError(f"run {self.id} is being measured by another bench process right now; "
                             "let it finish (or stop it) before resuming it") from None
        try:
            for leftover in remove_stale_temporaries(self.path) + remove_stale_temporaries(self.path / "raw"):
                warn(f"removed {leftover}, a temporary file left by a write that was cut short")
            yield
        finally:
            lock.release()

    def manifest(self) -> dict:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
            raise UsageError(f"{self.path / MANIFEST} cannot be read ({e}); the run folder is damaged") from None

    def write_manifest(self, manifest: dict) -> None:
        atomic_write(self.path / MANIFEST, (json.dumps(manifest, indent=2, default=_jsonable) + "\n").encode())

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self._record_lines()[0]]

    def _record_lines(self) -> tuple[list[str], list[str]]:
        """(good lines, damaged lines) of records.jsonl. A damaged line (half written after a power
        cut, edited by hand) is skipped with a warning naming it, never taking the good ones along."""
        path = self.path / RECORDS
        if not path.is_file():
            return [], []
        good, damaged = [], []
        for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            problem = _record_problem(line)
            if problem is None:
                good.append(line)
            else:
                damaged.append(line)
                warn(f"{path} line {number} is damaged ({problem}); skipped, the other records are used")
        return good, damaged

    def done_keys(self) -> set[str]:
        return {cell_key(r) for r in self.records()}

    def add_record(self, record: dict, raw: dict[str, np.ndarray] | None = None) -> None:
        """Append one finished cell: the whole file is rewritten atomically, never half-written."""
        key = cell_key(record)
        good, damaged = self._record_lines()
        if damaged:  # moved aside before the rewrite drops them from records.jsonl
            with open(self.path / DAMAGED, "a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in damaged))
            warn(f"{len(damaged)} damaged line(s) of {self.path / RECORDS} moved to {self.path / DAMAGED}")
        existing = [r for r in map(json.loads, good) if cell_key(r) != key]
        if raw:
            raw_name = f"raw/{_safe(key)}.npz"
            raw_path = self.path / raw_name
            raw_path.parent.mkdir(exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=raw_path.parent, prefix=f".{raw_path.name}.", suffix=".tmp", delete=False) as f:
                np.savez_compressed(f, **raw)
                os.fchmod(f.fileno(), umask_mode())
            os.replace(f.name, raw_path)
            record = {**record, "raw": raw_name}
        lines = [dumps(r) for r in existing + [record]]
        atomic_write(self.path / RECORDS, ("\n".join(lines) + "\n").encode())

    def add_file(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        """A run-level side file (``raw/...npz``), written atomically, once: a resumed run keeps it."""
        path = self.path / name
        if path.is_file():
            return
        buf = __import__("io").BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write(path, buf.getvalue())

    def raw(self, record: dict) -> dict[str, np.ndarray]:
        """The raw arrays of one cell (per-iteration times, per-sample correctness and GMACs, ...)."""
        name = record.get("raw")
        if not isinstance(name, str) or not (self.path / name).is_file():
            return {}
        with np.load(self.path / name) as f:
            return {k: f[k] for k in f.files}

    def dataframe(self):
        """The records with their declared dtypes (bench/records.py): ids and budgets stay text."""
        from .records import frame

        return frame(self._record_lines()[0])


def _record_problem(line: str) -> str | None:
    """Why one line of records.jsonl is not a record, or None."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not JSON: {e.msg}, column {e.colno}"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    missing = [k for k in IDENTITY if k not in record]
    return f"no {', '.join(missing)}" if missing else None


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)
