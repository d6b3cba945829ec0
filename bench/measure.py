"""Measurement protocol (docs/measurement.md#measurement-protocol).

Accuracy and per-sample compute come from one pass over the seeded test list, the same for every
method. Timing runs on real test images already on the device (data loading is outside the timed
region): warm-up, then every iteration timed (CUDA events on a GPU, ``perf_counter`` with the work
finished on the CPU) and kept. Speed ratios are measured side by side: each timed iteration of a
model is interleaved with one of the dense reference on the same batch, so machine noise hits both.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

import methods

from .progress import QUIET, Reporter

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (scipy's binomtest gives the same)."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass
class EvalResult:
    n: int
    correct1: np.ndarray  # (n,) bool
    correct5: np.ndarray
    gmacs: np.ndarray  # (n,) per sample
    tokens: np.ndarray  # (n, depth) tokens entering each block
    extras: dict = field(default_factory=dict)
    views: int | None = None  # video sets: views per video; gmacs is then per view (mean over the video's views)


    def summary(self) -> dict:
        k1, k5 = int(self.correct1.sum()), int(self.correct5.sum())
        lo1, hi1 = wilson(k1, self.n)
        lo5, hi5 = wilson(k5, self.n)
        return {
            "n_samples": self.n,
            "top1": 100.0 * k1 / self.n,
            "top1_ci_low": 100.0 * lo1,
            "top1_ci_high": 100.0 * hi1,
            "top5": 100.0 * k5 / self.n,
            "top5_ci_low": 100.0 * lo5,
            "top5_ci_high": 100.0 * hi5,
            "gmacs": float(self.gmacs.mean()),
            "gmacs_p50": float(np.percentile(self.gmacs, 50)),
            "gmacs_p90": float(np.percentile(self.gmacs, 90)),
            "tokens_per_block": [round(float(v), 3) for v in self.tokens.mean(axis=0)],
            **({"views": self.views, "gmacs_per_video": float(self.gmacs.mean() * self.views)} if self.views else {}),
        }


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    total: int,
    device: torch.device,
    precision: str,
    reporter: Reporter = QUIET,
    label: str = "evaluate",
    views: int | None = None,
) -> EvalResult:
    """One pass over ``batches``. With ``views`` (video sets), a batch holds B videos x ``views``
    clips: predictions are the views' softmax scores averaged per video (mmaction2's
    ``average_clips='prob'``), per-sample gmacs and tokens the mean over a video's views."""
    model.eval()
    v = views or 1
    c1, c5, gm, tok = [], [], [], []
    with reporter.bar(label, total) as bar:
        for x, y in batches:
            x = x.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(x)
            tr = methods.trace(getattr(model, "_orig_mod", model))  # torch.compile keeps the traced model there
            scores = logits.float()
            if v > 1:
                scores = scores.softmax(-1).view(-1, v, scores.shape[-1]).mean(1)
            top = scores.topk(min(5, scores.shape[-1]), dim=-1).indices.cpu()
            c1.append((top[:, 0] == y).numpy())
            c5.append((top == y[:, None]).any(dim=1).numpy())
            gm.append(tr.gmacs.cpu().view(-1, v).mean(1).numpy())
            tok.append(tr.tokens.cpu().double().view(-1, v, tr.tokens.shape[-1]).mean(1).numpy())
            bar.advance(len(y))
    return EvalResult(
        n=int(sum(len(a) for a in c1)),
        correct1=np.concatenate(c1),
        correct5=np.concatenate(c5),
        gmacs=np.concatenate(gm),
        tokens=np.concatenate(tok),
        views=views,
    )


class Clock:
    """Times one call: CUDA events on a GPU, perf_counter on the CPU (where work is synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _stats(seconds: list[float], batch: int) -> dict:
    t = np.asarray(seconds)
    ips = batch / t
    return {
        "iters": int(len(t)),
        "latency_ms_p50": float(np.percentile(t, 50) * 1e3),
        "latency_ms_p90": float(np.percentile(t, 90) * 1e3),
        "latency_ms_p99": float(np.percentile(t, 99) * 1e3),
        "latency_ms_mean": float(t.mean() * 1e3),
        "latency_ms_std": float(t.std() * 1e3),
        "img_per_s": float(batch / np.median(t)),
        "img_per_s_p10": float(np.percentile(ips, 10)),
        "img_per_s_p90": float(np.percentile(ips, 90)),
        "img_per_s_iqr": float(np.percentile(ips, 75) - np.percentile(ips, 25)),
    }


def batch_of(inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The first ``batch_size`` inputs, cycling through them when there are fewer."""
    if inputs.shape[0] >= batch_size:
        return inputs[:batch_size]
    reps = -(-batch_size // inputs.shape[0])
    return inputs.repeat(reps, *([1] * (inputs.dim() - 1)))[:batch_size]


def timing_batches(inputs: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The batches ``time_side_by_side`` times, in turn: consecutive cuts of ``inputs`` (views of
    its storage when there are at least ``batch_size`` inputs, else one cycled batch)."""
    if inputs.shape[0] < batch_size:
        return [batch_of(inputs, batch_size)]
    return [inputs[s : s + batch_size] for s in range(0, inputs.shape[0] - batch_size + 1, batch_size)]


@torch.inference_mode()
def time_side_by_side(
    model: nn.Module,
    reference: nn.Module | None,
    inputs: torch.Tensor,
    batch_size: int,
    device: torch.device,
    precision: str,
    warmup_iters: int,
    min_iters: int,
    max_iters: int,
    min_seconds: float,
    reporter: Reporter = QUIET,
    label: str = "time",
) -> dict:
    """Time ``model`` (and ``reference``, interleaved) over batches cut from ``inputs``.

    Returns the model's iteration statistics, the raw per-iteration times, and the speedup over
    the reference as the ratio of medians measured in the same window.
    """
    model.eval()
    if reference is not None:
        reference.eval()
    batches = timing_batches(inputs, batch_size)
    clock = Clock(device)
    extras: list[dict] = []

    def run(m: nn.Module, i: int, keep: bool = False) -> Callable[[], object]:
        x = batches[i % len(batches)]

        def call() -> object:
            with autocast(device, precision):
                out = m(x)
            if keep:
                extras.append(getattr(methods.trace(getattr(m, "_orig_mod", m)), "extras", {}))
            return out

        return call

    for i in range(warmup_iters):
        run(model, i)()
        if reference is not None:
            run(reference, i)()
    times, ref_times = [], []
    began = time.perf_counter()
    with reporter.bar(label, max_iters) as bar:
        i = 0
        while i < max_iters and (i < min_iters or time.perf_counter() - began < min_seconds):
            # Alternate which model goes first so neither always runs on a warmer cache.
            if reference is not None and i % 2:
                ref_times.append(clock.time(run(reference, i)))
                times.append(clock.time(run(model, i, keep=True)))
            else:
                times.append(clock.time(run(model, i, keep=True)))
                if reference is not None:
                    ref_times.append(clock.time(run(reference, i)))
            i += 1
            bar.advance()
    out = _stats(times, batch_size)
    out["raw_seconds"] = times
    if reference is not None:
        ref = _stats(ref_times, batch_size)
        out["dense_img_per_s"] = ref["img_per_s"]
        out["dense_latency_ms_p50"] = ref["latency_ms_p50"]
        out["speedup"] = float(np.median(ref_times) / np.median(times))
        out["raw_dense_seconds"] = ref_times
    waste = [float(e["padding_waste"]) for e in extras if "padding_waste" in e]
    out["padding_waste"] = float(np.mean(waste)) if waste else 0.0
    return out


def _read_status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmHWM``: peak resident set, ``VmRSS``: now); None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Hand memory freed by earlier work back to the OS (glibc ``malloc_trim``), so that the
    resident set right before a cell holds what is live, and the cell's own allocations show as
    growth over it (pages reused from the heap would otherwise not)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def _cpu_peak_mb(model: nn.Module, x: torch.Tensor, device: torch.device, precision: str, iters: int) -> tuple[float, str]:
    """CPU: the model's weights plus the peak growth of the resident set over a baseline taken right
    before the forward passes (high-water mark reset there), so memory that earlier work in the
    process left behind (fine-tuning, other cells) does not count (docs/measurement.md#memory)."""
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
        base = _read_status_kb("VmHWM")
    except OSError:
        base = None
    for _ in range(iters):
        with autocast(device, precision):
            model(x)
    peak = _read_status_kb("VmHWM")
    if base is None or peak is None:  # not Linux: only the process's peak since it started is known
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss_since_start"
    return (weight_bytes(model) + max(0, peak - base) * 1024) / 2**20, "cpu_weights_plus_rss_peak"


@torch.inference_mode()
def peak_memory_mb(model: nn.Module, x: torch.Tensor, device: torch.device, precision: str, iters: int) -> tuple[float, str]:
    """Peak memory of running ``model`` on ``x``, and how it was measured (the record's ``peak_mem_kind``).

    CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``), weights included.
    CPU: ``_cpu_peak_mb``.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(iters):
            with autocast(device, precision):
                model(x)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return _cpu_peak_mb(model, x, device, precision, iters)
