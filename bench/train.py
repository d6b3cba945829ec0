"""Training recipe of the embedded-default backbone (docs/design.md#the-embedded-default).

AdamW, cosine schedule with linear warm-up, label smoothing 0.1, gradient clipping at 1.0 (the
prototype saw one seed in four stall at 86% without it), fresh canvases every epoch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.training import Recipe, fit, timed

from .data import digits
from .progress import QUIET, Reporter


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 7
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int = 128
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    warmup_epochs: float = 0.5
    seed: int = 0

    def key(self) -> dict:
        return asdict(self)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256, data=digits) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = model(data.normalize(images[i : i + batch_size]))
        correct += int((logits.argmax(-1) == labels[i : i + batch_size]).sum())
    return correct / max(1, len(labels))


def train_digits_backbone(
    model: nn.Module,
    data_cfg: digits.DigitsConfig,
    cfg: TrainConfig,
    reporter: Reporter = QUIET,
    n_train: int | None = None,
    data=digits,
) -> dict:
    """Train ``model`` in place on digits canvases (``data``: the module of an embedded data set,
    :mod:`bench.data.digits` or :mod:`bench.data.moving_digits`); returns what was measured.
    The loop is the one every method fine-tunes with (:func:`methods.training.fit`)."""
    n_train = n_train or data_cfg.n_train
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    recipe = Recipe(steps=steps_per_epoch * cfg.epochs, warmup_steps=max(1, int(cfg.warmup_epochs * steps_per_epoch)),
                    grad_clip=cfg.grad_clip, seed=cfg.seed, note_every=steps_per_epoch)
    val_x, val_y = data.make_split(data_cfg, "val")

    def batches(epoch: int):
        x, y = data.make_split(data_cfg, "train", n=n_train, epoch=epoch + 1000 * cfg.seed)
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            yield data.normalize(x[idx]), y[idx]

    def step_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        loss = F.cross_entropy(model(images), labels, label_smoothing=cfg.label_smoothing)
        return loss, {"loss": loss.item()}

    def optimizer():
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    with reporter.bar("train backbone", recipe.steps) as bar:
        def validation(epoch: int) -> dict:
            val = accuracy(model, val_x, val_y, data=data)
            bar.note(f"epoch {epoch + 1}: val {val:.1%}")
            return {"val_top1": val}

        history, seconds = timed(lambda: fit(model, batches, optimizer, recipe, step_loss, bar, validation))
    return {"train_seconds": seconds, "history": history, "val_top1": history[-1]["val_top1"]}
