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


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux); empty elsewhere."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough: the others repeat it
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def machine_info() -> dict:
    """What tells two machines apart (the manifest's ``machine``): CPU model and its family/model/
    stepping (a bare "Intel Xeon Processor" names many), SIMD features that change kernel speed,
    cores (all, and the ones this process may use), memory and GPUs."""
    import os

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    out = {
        "cpu_model": device_name(torch.device("cpu")),
        "cpu_id": "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping")) if info else None,
        "cpu_features": sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma") if f in flags),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "machine": platform.machine(),
    }
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out
