"""The embedded default data set: real handwritten digits on a cluttered canvas.

scikit-learn ships 1797 real 8x8 handwritten digits (UCI optdigits). Each canvas places one digit,
upscaled to a random size, at a random position on a larger empty canvas, plus a few clutter
fragments cut from *other* digits of the same split, so that most patches carry nothing and an
adaptive model has something to adapt to (docs/design.md#the-embedded-default). Everything is
deterministic from the seed; train, validation and test canvases are drawn from disjoint sets of
source digits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DigitsConfig:
    canvas: int = 64
    digit_size: tuple[int, int] = (16, 28)  # side of the upscaled digit, pixels (inclusive)
    clutter: tuple[int, int] = (2, 6)  # fragments per canvas (inclusive)
    fragment_size: tuple[int, int] = (2, 4)  # side of a fragment cut from a source digit, source pixels
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    n_train: int = 10000  # canvases per training epoch (fresh each epoch)
    n_val: int = 1000
    n_test: int = 2000
    seed: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    def key(self) -> dict:
        return {
            "canvas": self.canvas,
            "digit_size": list(self.digit_size),
            "clutter": list(self.clutter),
            "fragment_size": list(self.fragment_size),
            "split_fractions": list(self.split_fractions),
            "seed": self.seed,
        }


MEAN, STD = 0.5, 0.5  # canvases hold ink in [0, 1]; the model sees (x - 0.5) / 0.5


def _load_sources() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def source_indices(cfg: DigitsConfig) -> dict[str, np.ndarray]:
    """Partition the indices of the 1797 source digits into disjoint train / val / test sets."""
    n = 1797
    order = np.random.default_rng(cfg.seed).permutation(n)
    fr = np.asarray(cfg.split_fractions, dtype=float)
    cuts = np.floor(np.cumsum(fr / fr.sum())[:-1] * n).astype(int)
    return dict(zip(SPLITS, np.split(order, cuts)))


def source_split(cfg: DigitsConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    images, labels = _load_sources()
    return {name: (images[idx], labels[idx]) for name, idx in source_indices(cfg).items()}


def _upscale_all(images: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(images)[:, None]
    return F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)[:, 0].clamp_(0, 1).numpy()


def cut_fragment(rng: np.random.Generator, scaled: np.ndarray, avoid: int, fragment_size: tuple[int, int]) -> np.ndarray:
    """A clutter fragment: a random fh x fw window (in source-digit pixels of 8x8, sizes drawn from
    ``fragment_size``) of a random source digit other than ``avoid``, cut from ``scaled`` (every
    source digit at the size in use, so the fragment looks like part of a digit of that scale)."""
    flo, fhi = fragment_size
    scale = scaled.shape[-1] / 8.0
    j = int(rng.integers(0, len(scaled)))
    if j == avoid:
        j = (j + 1) % len(scaled)
    fh, fw = (int(v) for v in rng.integers(flo, fhi + 1, size=2))
    y0, x0 = (int(v) for v in rng.integers(0, 8 - np.array([fh, fw]) + 1))
    r0, r1 = round(y0 * scale), max(round((y0 + fh) * scale), round(y0 * scale) + 1)
    c0, c1 = round(x0 * scale), max(round((x0 + fw) * scale), round(x0 * scale) + 1)
    return scaled[j, r0:r1, c0:c1]


def render(images: np.ndarray, labels: np.ndarray, n: int, cfg: DigitsConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` canvases (n, 1, canvas, canvas) in [0, 1] and their labels, from the given sources."""
    rng = np.random.default_rng(seed)
    size = cfg.canvas
    lo, hi = cfg.digit_size
    if not (0 < lo <= hi <= size):
        raise ValueError(f"digit_size {cfg.digit_size} must lie within 1..canvas ({size})")
    canvases = np.zeros((n, size, size), dtype=np.float32)
    pick = rng.integers(0, len(labels), size=n)
    sides = rng.integers(lo, hi + 1, size=n)
    # Every source digit upscaled to every size in use, one interpolate call per size; clutter
    # fragments are cut from these, so a fragment looks like part of a digit of the same scale.
    scaled = {int(s): _upscale_all(images, int(s)) for s in np.unique(sides)}
    clo, chi = cfg.clutter
    for i in range(n):
        s = int(sides[i])
        # Clutter first, so the digit is drawn on top where they overlap.
        for _ in range(int(rng.integers(clo, chi + 1))):
            frag = cut_fragment(rng, scaled[s], int(pick[i]), cfg.fragment_size)
            ph, pw = frag.shape
            py, px = int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1))
            region = canvases[i, py : py + ph, px : px + pw]
            np.maximum(region, frag, out=region)
        py, px = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
        region = canvases[i, py : py + s, px : px + s]
        np.maximum(region, scaled[s][pick[i]], out=region)
    return torch.from_numpy(canvases)[:, None], torch.from_numpy(labels[pick])


def split_seed(cfg: DigitsConfig, split: str, epoch: int = 0) -> int:
    return int(np.random.SeedSequence([cfg.seed, SPLITS.index(split), epoch]).generate_state(1)[0])


def make_split(cfg: DigitsConfig, split: str, n: int | None = None, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = source_split(cfg)[split]
    if n is None:
        n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
    return render(images, labels, n, cfg, split_seed(cfg, split, epoch))


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def empty_patch_fraction(canvases: torch.Tensor, patch: int = 8, threshold: float = 0.05) -> float:
    """Share of patch x patch cells whose ink never exceeds ``threshold``."""
    p = F.max_pool2d(canvases, patch)
    return float((p <= threshold).float().mean())
