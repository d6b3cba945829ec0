"""How a model runs on the device: attention kernel, ``torch.compile``, out-of-memory back-off.

Recorded with every cell (docs/measurement.md#precision-compile-and-attention-kernel: compile mode and attention kernel).

Attention (``--attention``):
  ``default``  timm's own choice (fused ``F.scaled_dot_product_attention`` unless ``TIMM_FUSED_ATTN=0``);
  ``unfused``  timm's explicit q @ k^T, softmax, @ v in every timm ``Attention`` (``fused_attn=False``);
  ``fused``    timm's fused path, SDPA picks its backend;
  ``flash`` / ``efficient`` / ``cudnn`` / ``math``: the fused path restricted to that SDPA backend
  (``torch.nn.attention.sdpa_kernel``). The methods' own attention code (ATS, A-ViT and AdaViT
  compact paths, ``methods.attention``) calls SDPA, except for short padded key sequences on CPU,
  where it computes the math backend's explicit product (faster there) while that backend is
  allowed: the backend restriction reaches them too; ``unfused`` changes timm's blocks only.

Out of memory: a cell that does not fit is retried at smaller batches along timm's ladder
(``timm.utils.decay_batch_step``, retry decided by ``check_batch_size_retry``) and recorded as a row
with the batch it really ran (``batch_size_run``) and the sizes that failed (``oom_backoff``); when
even batch 1 fails the row says ``status = "oom"``: the run goes on. A profile's ``memory_cap_mb``
(:func:`memory_cap`) makes the allocator fail beyond that size, to exercise this on purpose.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import UsageError

SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
ATTENTION = ("default", "unfused", "fused", *SDPA_BACKENDS)


def check_attention(name: str, device: torch.device) -> None:
    if name not in ATTENTION:
        raise UsageError(f"unknown attention kernel '{name}'; use one of {', '.join(ATTENTION)}")
    if name in ("efficient", "cudnn") and device.type != "cuda":
        raise UsageError(f"attention kernel '{name}' needs a CUDA device; on {device.type} use default, unfused, fused, flash or math")


def set_attention(model: nn.Module, name: str) -> nn.Module:
    """Switch timm's Attention modules between the fused and the explicit path (in place)."""
    from timm.models.vision_transformer import Attention

    if name == "default":
        return model
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = name != "unfused"
    return model


def attention_context(name: str):
    """The SDPA backend restriction for ``name`` (a no-op for the timm-level choices)."""
    if name not in SDPA_BACKENDS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


def compile_model(model: nn.Module, backend: str) -> nn.Module:
    """``torch.compile``; the wrapper keeps the original as ``_orig_mod`` (traces are read there)."""
    return torch.compile(model, backend=backend, dynamic=False)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


# c10's CPU allocator reports a failed allocation as a plain RuntimeError with this text.
CPU_ALLOC_FAILED = "can't allocate memory"


def is_oom(error: BaseException) -> bool:
    from timm.utils import check_batch_size_retry

    text = str(error).lower()
    oom = isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or CPU_ALLOC_FAILED in text
    return oom and check_batch_size_retry(str(error))


MEMORY_CAP_KINDS = {"cuda": "cuda_allocator_limit", "cpu": "cpu_largest_tensor_emulated"}


class _LargestTensorCap(TorchDispatchMode):
    """The CPU stand-in for an allocator limit (the CPU has none to set): an op whose output tensor
    is larger than the cap fails with ``torch.OutOfMemoryError``, as a full device would fail it.
    It bounds each tensor, not their sum, and costs a Python call per op: for exercising the
    back-off (``tools/gpu_check.sh --dry-run``), not for timing."""

    def __init__(self, cap_bytes: int):
        super().__init__()
        self.cap_bytes = cap_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            size = t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
            if size > self.cap_bytes:
                raise torch.OutOfMemoryError(f"CPU out of memory (memory_cap_mb, emulated): {func} made a tensor of "
                                             f"{size / 2**20:.1f} MiB, over the cap of {self.cap_bytes / 2**20:.1f} MiB")
        return out


@contextlib.contextmanager
def memory_cap(cap_mb: int | None, device: torch.device) -> Iterator[None]:
    """Let the run hold at most ``cap_mb`` MiB on ``device`` (a profile's ``memory_cap_mb``): a
    smaller device emulated, or the out-of-memory back-off forced on purpose. CUDA: the caching
    allocator's own per-process limit (``torch.cuda.set_per_process_memory_fraction``) on
    everything the run puts on the device, so the errors are the allocator's real ones. CPU, which
    has no such limit: :class:`_LargestTensorCap`. Records name which (``memory_cap_kind``)."""
    if cap_mb is None:
        yield
        return
    if cap_mb <= 0:
        raise UsageError(f"memory_cap_mb must be a positive number of MiB, got {cap_mb}")
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index  # the call needs an index
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_mb * 2**20 / total), index)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
        return
    with _LargestTensorCap(cap_mb * 2**20):
        yield


def with_backoff(fn: Callable[[int], Any], batch_size: int, device: torch.device) -> tuple[Any, int, list[int]]:
    """``fn(batch)`` at ``batch_size``, or at the next size down timm's ladder after an OOM.

    Returns (result or None when even batch 1 failed, batch that ran or 0, sizes that failed).
    """
    from timm.utils import decay_batch_step

    failed: list[int] = []
    bs = batch_size
    while bs > 0:
        try:
            return fn(bs), bs, failed
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            failed.append(bs)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            bs = decay_batch_step(bs)
    return None, 0, failed
