"""One training loop and one validation loop for every model bench trains: the embedded default's
dense backbone and the methods that fine-tune (A-ViT, AdaViT).

The recipe is DeiT's, shortened: AdamW, linear warm-up then cosine decay (per step), gradient
clipping, label smoothing in the methods' task losses. A method brings only its loss
(:data:`StepLoss`: the task loss plus its own terms, and the numbers to log) and, for validation,
the per-sample statistics of its trace it wants averaged (:data:`TraceStats`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .base import trace

# (model, images, labels) -> (loss with gradient, {name: float} to log)
StepLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
# trace -> {name: (B, ...) tensor}, averaged over the validation samples
TraceStats = Callable[[Any], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Recipe:
    steps: int  # optimizer steps in all
    warmup_steps: int
    grad_clip: float  # 0: no clipping
    seed: int
    freeze_batchnorm: bool = False  # keep BatchNorm running statistics (a pre-trained conv stem)
    note_every: int = 10  # steps between progress notes


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at step ``total``."""
    warmup = max(1, warmup)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warmup if i < warmup else 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, total - warmup)))
    )


def set_train_mode(model: nn.Module, freeze_batchnorm: bool) -> None:
    model.train()
    if freeze_batchnorm:
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.eval()


def fit(model: nn.Module, batches: Callable[[int], Iterable], make_optimizer: Callable[[], torch.optim.Optimizer],
        recipe: Recipe, step_loss: StepLoss, progress, after_epoch: Callable[[int], dict] | None = None) -> list[dict]:
    """Train ``model`` in place for ``recipe.steps`` steps over ``batches(epoch)`` (epoch after
    epoch); returns one history row per epoch: the mean of each logged number, plus what
    ``after_epoch(epoch)`` measures (e.g. validation accuracy). ``progress``: ``advance(n)`` and
    ``note(text)``. The optimizer is made after seeding, so a run is reproducible."""
    torch.manual_seed(recipe.seed)
    opt = make_optimizer()
    params = [p for p in model.parameters() if p.requires_grad]  # model order: the clipping norm's sum order
    sched = warmup_cosine(opt, recipe.warmup_steps, recipe.steps)
    history, step, epoch = [], 0, 0
    set_train_mode(model, recipe.freeze_batchnorm)
    while step < recipe.steps:
        if not model.training:  # the last epoch's validation left it in eval mode
            set_train_mode(model, recipe.freeze_batchnorm)
        sums: dict[str, float] = {}
        seen = step
        for images, labels in batches(epoch):
            loss, logged = step_loss(model, images, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip:
                nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            opt.step()
            sched.step()
            step += 1
            for k, v in logged.items():
                sums[k] = sums.get(k, 0.0) + v
            progress.advance(1)
            if step % recipe.note_every == 0:
                progress.note(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v / (step - seen):.3f}" for k, v in sums.items()))
            if step >= recipe.steps:
                break
        if step == seen:
            raise ValueError(f"training data yielded no batches in epoch {epoch}")
        row = {"epoch": epoch + 1, **{k: round(v / (step - seen), 4) for k, v in sums.items()}}
        history.append({**row, **(after_epoch(epoch) if after_epoch else {})})
        epoch += 1
    model.eval()
    return history


@torch.no_grad()
def validate(model: nn.Module, batches: Iterable, stats: TraceStats | None = None) -> dict:
    """Top-1, GMACs and GMACs ratio of ``model`` (as configured) over ``batches``, plus the mean over
    samples of each per-sample statistic ``stats(trace)`` gives (lists for per-block ones)."""
    model.eval()
    correct = n = 0
    gmacs = 0.0
    sums: dict[str, torch.Tensor] = {}
    for images, labels in batches:
        logits = model(images)
        t = trace(model)
        correct += int((logits.argmax(-1) == labels).sum())
        n += int(labels.shape[0])
        gmacs += float(t.gmacs.sum())
        for k, v in (stats(t) if stats else {}).items():
            total = v.to(torch.float64).sum(0)
            sums[k] = sums[k] + total if k in sums else total
    mean_gmacs = gmacs / max(1, n)
    out = {"val_top1": correct / max(1, n), "val_gmacs": round(mean_gmacs, 5),
           "val_gmacs_ratio": mean_gmacs / model.bench_shape.dense_gmacs()}
    for k, v in sums.items():
        mean = v / max(1, n)
        out[k] = float(mean) if mean.dim() == 0 else [round(float(x), 2) for x in mean]
    return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(), round(time.perf_counter() - start, 1)
