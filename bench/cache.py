"""Checkpoint cache keyed by configuration, plus checkpoints shipped with the project.

A key is the sha256 of the canonical JSON of everything that determines the weights (backbone
shape, data recipe, training recipe, method and its training knobs). ``bench/assets/`` holds
small checkpoints that ``bench train ... --ship`` produced; a run prefers the user's cache, then a
shipped file with the same key, and trains only when neither exists (or ``--retrain``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
RECIPE_VERSION = 1  # bump when training code changes in a way the config does not capture


def cache_dir() -> Path:
    return Path(os.environ.get("BENCH_CACHE") or Path.home() / ".cache" / "bench").expanduser()


def config_key(obj: dict) -> str:
    blob = json.dumps({"recipe": RECIPE_VERSION, **obj}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find(name: str, key: str) -> Path | None:
    for folder in (cache_dir(), ASSETS):
        p = folder / f"{name}-{key}.safetensors"
        if p.is_file():
            return p
    return None


def locate(name_or_path: str) -> Path | None:
    """A checkpoint a record names: its file name in the cache or the shipped assets (records
    written since schema version 2), or the absolute path older records kept."""
    p = Path(name_or_path)
    if p.is_absolute():
        return p if p.is_file() else None
    for folder in (cache_dir(), ASSETS):
        if (folder / p.name).is_file():
            return folder / p.name
    return None


def save(state: dict[str, torch.Tensor], name: str, key: str, meta: dict, folder: Path | None = None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder) if folder else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{key}.safetensors"
    tmp = path.with_suffix(".tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp), metadata={"bench": json.dumps(meta, sort_keys=True, default=str)})
    os.replace(tmp, path)
    return path


def metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("bench", "{}"))
