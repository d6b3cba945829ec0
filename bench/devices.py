"""Devices a run measures on: checked up front with one-line errors, and named for the records."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from .errors import UsageError


def resolve_device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device '{name}' requested but no CUDA GPU is visible; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device '{name}' does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise UsageError(f"device '{name}' is not supported; use cpu, cuda or cuda:N")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
