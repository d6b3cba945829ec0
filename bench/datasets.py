"""Evaluation data sets behind one interface: seeded test list in, normalised batches out."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .config import RunConfig
from .data import digits
from .errors import UsageError


@dataclass
class EvalSet:
    name: str
    num_classes: int
    in_chans: int
    img_size: int
    images: torch.Tensor  # (n, C, H, W), normalised, in memory
    labels: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, self.n, batch_size):
            yield self.images[i : i + batch_size], self.labels[i : i + batch_size]

    def timing_inputs(self, count: int, seed: int) -> torch.Tensor:
        """A seeded selection of real test images, the same for every method (equal issue)."""
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(self.n, generator=gen)[: min(count, self.n)]
        return self.images[idx].contiguous()


def digits_config(cfg: RunConfig) -> digits.DigitsConfig:
    d = dict(cfg.digits)
    for k in ("digit_size", "clutter", "fragment_size", "split_fractions"):
        if k in d:
            d[k] = tuple(d[k])
    try:
        return digits.DigitsConfig(**d)
    except TypeError as e:
        raise UsageError(f"{cfg.config_path}: bad [digits] table ({e})") from None


def _load_digits(cfg: RunConfig) -> EvalSet:
    dc = digits_config(cfg)
    x, y = digits.make_split(dc, "test")
    if cfg.test_samples:
        x, y = x[: cfg.test_samples], y[: cfg.test_samples]
    return EvalSet(
        name="digits",
        num_classes=10,
        in_chans=1,
        img_size=dc.canvas,
        images=digits.normalize(x),
        labels=y,
        info={"split": "test", "n": int(len(y)), "empty_patch_share": round(digits.empty_patch_fraction(x), 4), **dc.key()},
    )


DATASETS = {
    "digits": ("embedded: cluttered handwritten digits from scikit-learn on a 64x64 canvas", _load_digits),
}


def load(cfg: RunConfig) -> EvalSet:
    if cfg.dataset not in DATASETS:
        raise UsageError(f"unknown data set '{cfg.dataset}'; known: {', '.join(DATASETS)} (`bench list datasets`)")
    if cfg.data is not None:
        from pathlib import Path

        p = Path(cfg.data).expanduser()
        if not p.exists():
            raise UsageError(f"data path {p} does not exist; pass --data to a folder of images")
        if cfg.dataset == "digits":
            raise UsageError("data set 'digits' is embedded and takes no --data path; drop --data or pick another --dataset")
    return DATASETS[cfg.dataset][1](cfg)
