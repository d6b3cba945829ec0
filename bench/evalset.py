"""The interface every evaluation set offers the runner (images in memory, image files, videos)."""
from __future__ import annotations

from typing import Iterator

import torch


class EvalSet:
    """The test list of a run. ``batches`` streams it in order; ``timing_inputs`` returns a seeded
    selection of real images already in memory, the same for every method (equal issue)."""

    name: str = ""
    num_classes: int = 0
    info: dict
    views: int | None = None  # video sets: views per video (batches hold B * views clips); None for images

    @property
    def n(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in order; ``shard=(rank, world)``: only that rank's whole batches (bench/parallel.py)."""
        raise NotImplementedError

    def timing_inputs(self, count: int, seed: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one model input (one view of a video), known without decoding anything."""
        raise NotImplementedError
