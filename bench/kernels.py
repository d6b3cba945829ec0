"""How a model runs on the device: attention kernel, ``torch.compile``, out-of-memory back-off.

Recorded with every cell (DESIGN.md "Measurement protocol": compile mode and attention kernel).

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
even batch 1 fails the row says ``status = "oom"``: the run goes on.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

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


def is_oom(error: BaseException) -> bool:
    from timm.utils import check_batch_size_retry

    text = str(error).lower()
    # CPU: "DefaultCPUAllocator: can't allocate memory", which backs off the way a GPU's OOM does
    oom = isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text
    return oom and check_batch_size_retry(str(error))


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
