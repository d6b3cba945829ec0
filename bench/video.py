"""Kinetics evaluation set: videos decoded with PyAV in DataLoader workers, multi-view testing.

Each video gives ``clips x crops`` views (bench/data/kinetics.py); a batch of B videos is handed
to the model as B * views clips and :func:`bench.measure.evaluate` averages the views' softmax
scores per video, so ``gmacs`` is per view (what one forward costs, comparable with the dense
model's) and ``gmacs_per_video`` the sum over a video's views. Timing inputs are single views.

A video PyAV cannot decode stops the run with its path named, or, with ``--skip-corrupt``
(``skip_corrupt = true`` in a profile), is counted, named in the manifest and skipped.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .config import RunConfig
from .data import kinetics
from .evalset import EvalSet
from .errors import UsageError
from .loading import ShardBatches, decoded_batches

SAMPLING_KEYS = ("stride", "clips", "crops", "short_side")


def sampling_for(cfg: RunConfig, vit: nn.Module | None) -> kinetics.Sampling:
    """Clip shape from the backbone (frames, crop size, mean/std), the rest from the [video] table."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    pe = getattr(vit, "patch_embed", None)
    if pe is None or not hasattr(pe, "num_frames"):
        raise UsageError(f"backbone '{cfg.backbone}' is not a video ViT; use e.g. videomae_vit_base_patch16_224 (`methods/video.py`)")
    size = pe.img_size[0]
    if pe.img_size[0] != pe.img_size[1]:
        raise UsageError(f"backbone '{cfg.backbone}' takes {pe.img_size} frames; square crops need a square input size")
    opts = {k: int(v) for k, v in cfg.video.items() if k in SAMPLING_KEYS}
    bad = [f"{k}={v}" for k, v in opts.items() if v < 1]
    if bad:
        raise UsageError(f"{cfg.config_path}: [video] values must be positive integers, got {', '.join(bad)}")
    opts.setdefault("short_side", size)
    if opts["short_side"] < size:
        raise UsageError(f"{cfg.config_path}: [video] short_side {opts['short_side']} is smaller than the crop size {size}")
    pcfg = getattr(vit, "pretrained_cfg", None) or {}
    return kinetics.Sampling(frames=pe.num_frames, size=size, mean=tuple(pcfg.get("mean", IMAGENET_DEFAULT_MEAN)),
                             std=tuple(pcfg.get("std", IMAGENET_DEFAULT_STD)), **opts)


class VideoEvalSet(EvalSet):
    def __init__(self, name: str, items: list, sampling: kinetics.Sampling, num_classes: int, info: dict,
                 skip_corrupt: bool, workers: int):
        self.name, self.num_classes, self.info, self.workers = name, num_classes, info, workers
        self.dataset = kinetics.VideoFiles(items, sampling)
        self.sampling = sampling
        self.views = sampling.views
        self.skip_corrupt = skip_corrupt
        self.skipped: dict[int, str] = {}  # index -> path of every unreadable video met (--skip-corrupt)

    @property
    def n(self) -> int:
        return len(self.dataset)

    def _failed(self, failed: list[tuple[int, str]]) -> None:
        for i, reason in failed:
            path = str(self.dataset.items[i][0])
            if not self.skip_corrupt:
                raise UsageError(f"cannot decode video {path} ({reason}); remove it or pass --skip-corrupt to count and skip it")
            self.skipped[i] = path

    def batches(self, batch_size: int, shard: tuple[int, int] = (0, 1)):
        sampler = ShardBatches.of_shard(self.n, batch_size, shard)
        for x, y, failed in decoded_batches(self.dataset, sampler, self.workers, kinetics.collate):
            self._failed(failed)
            if x is not None:
                yield x.flatten(0, 1), y  # (B * views, C, T, H, W)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, self.sampling.frames, self.sampling.size, self.sampling.size)  # one view: (C, T, H, W)

    def timing_inputs(self, count: int, seed: int) -> torch.Tensor:
        """First view of a seeded selection of readable videos."""
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
        out = []
        for i in order:
            x, _, _, reason = self.dataset[i]
            if x is None:
                self._failed([(i, reason)])
                continue
            out.append(x[0])
            if len(out) == count:
                break
        if not out:
            raise UsageError("no readable video to time the models on")
        return torch.stack(out)


def load_kinetics(cfg: RunConfig, vit: nn.Module | None, num_classes: int) -> VideoEvalSet:
    name = f"kinetics{num_classes}"
    if cfg.data is None:
        raise UsageError(f"data set '{name}' needs --data PATH (a folder of <class>/*.mp4, or the official annotation CSV)")
    try:
        items, info = kinetics.discover(Path(cfg.data).expanduser(), num_classes)
    except kinetics.LayoutError as e:
        raise UsageError(str(e)) from None
    if cfg.test_samples and cfg.test_samples < len(items):
        keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.test_samples]
        items = [items[i] for i in sorted(keep.tolist())]
        info["n"] = len(items)
    sampling = sampling_for(cfg, vit)
    info.update({k: getattr(sampling, k) for k in ("frames", "stride", "clips", "crops", "size", "short_side")})
    info["views"] = sampling.views
    workers = min(4, os.cpu_count() or 1)
    return VideoEvalSet(name, items, sampling, num_classes, info, cfg.skip_corrupt, workers)
