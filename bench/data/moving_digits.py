"""The embedded video default: real handwritten digits moving across a cluttered canvas.

Each clip shows one scikit-learn digit (upscaled to a random size) moving at constant speed and
bouncing off the canvas edges, over ``frames`` frames, plus a few clutter fragments cut from other
digits of the same split, each drifting on its own path. The class is the digit. Most tubelets are
empty, so an adaptive model has something to adapt to, as on the image default
(docs/design.md#the-embedded-default). Train, validation and test clips come from the disjoint source-digit splits of
:mod:`bench.data.digits`; everything is deterministic from the seed.

Clips are ``(n, 1, frames, canvas, canvas)`` in [0, 1], the ``(B, C, T, H, W)`` layout of
:mod:`methods.video`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import digits

normalize = digits.normalize  # same ink range and normalisation as the image default


@dataclass(frozen=True)
class MovingDigitsConfig:
    canvas: int = 32
    frames: int = 8
    digit_size: tuple[int, int] = (12, 16)  # side of the upscaled digit, pixels (inclusive)
    clutter: tuple[int, int] = (1, 3)  # fragments per clip (inclusive)
    fragment_size: tuple[int, int] = (2, 4)  # side of a fragment cut from a source digit, source pixels
    speed: tuple[float, float] = (1.0, 3.0)  # pixels per frame, digit and fragments alike
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    n_train: int = 6000  # clips per training epoch (fresh each epoch)
    n_val: int = 600
    n_test: int = 1000
    seed: int = 0

    def key(self) -> dict:
        return {
            "canvas": self.canvas,
            "frames": self.frames,
            "digit_size": list(self.digit_size),
            "clutter": list(self.clutter),
            "fragment_size": list(self.fragment_size),
            "speed": list(self.speed),
            "split_fractions": list(self.split_fractions),
            "seed": self.seed,
        }

    @property
    def image(self) -> digits.DigitsConfig:
        """The per-frame settings in the image default's terms (for the shared source split)."""
        return digits.DigitsConfig(canvas=self.canvas, digit_size=self.digit_size, clutter=self.clutter,
                                   fragment_size=self.fragment_size, split_fractions=self.split_fractions, seed=self.seed)


def _paths(rng: np.random.Generator, n: int, span: np.ndarray, frames: int, speed: tuple[float, float]) -> np.ndarray:
    """(n, frames, 2) integer top-left corners: a random start, direction and speed, reflected at
    the edges of [0, span] (span per item, the room left by the object's size)."""
    start = rng.uniform(0, 1, size=(n, 2)) * span[:, None]
    angle = rng.uniform(0, 2 * np.pi, size=n)
    v = rng.uniform(*speed, size=n)[:, None] * np.stack([np.sin(angle), np.cos(angle)], axis=1)
    t = np.arange(frames, dtype=np.float64)[None, :, None]
    raw = start[:, None, :] + v[:, None, :] * t
    period = 2 * np.maximum(span, 1e-9)[:, None, None]
    folded = np.mod(raw, period)
    return np.rint(np.where(folded > period / 2, period - folded, folded)).astype(np.int64)


def render(images: np.ndarray, labels: np.ndarray, n: int, cfg: MovingDigitsConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    size, frames = cfg.canvas, cfg.frames
    lo, hi = cfg.digit_size
    if not (0 < lo <= hi <= size):
        raise ValueError(f"digit_size {cfg.digit_size} must lie within 1..canvas ({size})")
    if frames < 1:
        raise ValueError(f"frames must be positive, got {frames}")
    clips = np.zeros((n, frames, size, size), dtype=np.float32)
    pick = rng.integers(0, len(labels), size=n)
    sides = rng.integers(lo, hi + 1, size=n)
    scaled = {int(s): digits._upscale_all(images, int(s)) for s in np.unique(sides)}
    clo, chi = cfg.clutter
    digit_paths = _paths(rng, n, (size - sides).astype(np.float64), frames, cfg.speed)
    for i in range(n):
        s = int(sides[i])
        frags = [digits.cut_fragment(rng, scaled[s], int(pick[i]), cfg.fragment_size)
                 for _ in range(int(rng.integers(clo, chi + 1)))]
        if frags:
            room = np.array([size - max(f.shape) for f in frags], dtype=np.float64)
            frag_paths = _paths(rng, len(frags), room, frames, cfg.speed)
        for t in range(frames):
            canvas = clips[i, t]
            for f, frag in enumerate(frags):  # clutter first, the digit on top
                py, px = frag_paths[f, t]
                region = canvas[py : py + frag.shape[0], px : px + frag.shape[1]]
                np.maximum(region, frag, out=region)
            py, px = digit_paths[i, t]
            region = canvas[py : py + s, px : px + s]
            np.maximum(region, scaled[s][pick[i]], out=region)
    return torch.from_numpy(clips)[:, None], torch.from_numpy(labels[pick])


def make_split(cfg: MovingDigitsConfig, split: str, n: int | None = None, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` clips (n, 1, frames, canvas, canvas) and labels of ``split``; a new draw per ``epoch``."""
    images, labels = digits.source_split(cfg.image)[split]
    if n is None:
        n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
    # The image default's per-split seeds, offset so a video split never replays an image split.
    return render(images, labels, n, cfg, digits.split_seed(cfg.image, split, epoch) ^ 0x5EED_71DE0)


def empty_tubelet_fraction(clips: torch.Tensor, tubelet: int = 2, patch: int = 8, threshold: float = 0.05) -> float:
    """Share of ``tubelet x patch x patch`` cells whose ink never exceeds ``threshold``."""
    p = torch.nn.functional.max_pool3d(clips, (tubelet, patch, patch))
    return float((p <= threshold).float().mean())
