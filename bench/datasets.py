"""Evaluation data sets behind one interface: a seeded test list in, normalised batches out."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .config import RunConfig
from .data import digits, moving_digits
from .errors import UsageError, warn
from .evalset import EvalSet
from .loading import ShardBatches, decoded_batches, shard_starts


class TensorEvalSet(EvalSet):
    def __init__(self, name: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int, info: dict):
        self.name, self.images, self.labels, self.num_classes, self.info = name, images, labels, num_classes, info

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, shard: tuple[int, int] = (0, 1)):
        for i in shard_starts(self.n, batch_size, shard):
            yield self.images[i : i + batch_size], self.labels[i : i + batch_size]

    def timing_inputs(self, count: int, seed: int) -> torch.Tensor:
        idx = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))[: min(count, self.n)]
        return self.images[idx].contiguous()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])


class FolderEvalSet(EvalSet):
    """Images on disk, decoded with PIL in DataLoader workers."""

    def __init__(self, name: str, items: list, transform, input_size, num_classes: int, info: dict, workers: int,
                 skip_corrupt: bool = False):
        from .data.imagenet import ImageFiles

        self.name, self.num_classes, self.info, self.workers = name, num_classes, info, workers
        self.dataset = ImageFiles(items, transform)
        self.dataset.input_size = tuple(input_size)
        self.skip_corrupt = skip_corrupt
        self.skipped: dict[int, str] = {}  # index -> path of every unreadable image met (--skip-corrupt)

    @property
    def n(self) -> int:
        return len(self.dataset)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.input_size)

    def _check(self, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Rows to keep; an unreadable image stops the run by path unless ``skip_corrupt``."""
        bad = (labels < 0).nonzero().flatten()
        if len(bad) and not self.skip_corrupt:
            path = self.dataset.items[int(index[bad[0]])][0]
            raise UsageError(f"cannot read image {path} (corrupt, not an image, or over PIL's decompression-bomb pixel limit); "
                             "remove it from the data folder or pass --skip-corrupt")
        for i in index[bad].tolist():
            self.skipped[int(i)] = str(self.dataset.items[int(i)][0])
        return labels >= 0

    def batches(self, batch_size: int, shard: tuple[int, int] = (0, 1)):
        sampler = ShardBatches.of_shard(self.n, batch_size, shard)
        for x, y, idx in decoded_batches(self.dataset, sampler, self.workers):
            keep = self._check(y, idx)
            if not bool(keep.all()):
                x, y = x[keep], y[keep]
            if len(y):
                yield x, y

    def timing_inputs(self, count: int, seed: int) -> torch.Tensor:
        samples = []
        for i in torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist():
            s = self.dataset[i]
            if bool(self._check(torch.tensor([s[1]]), torch.tensor([s[2]]))[0]):
                samples.append(s[0])
            if len(samples) == count:
                break
        if not samples:
            raise UsageError(f"no readable image in {self.info.get('root')}")
        return torch.stack(samples)


def _digits_table(cfg: RunConfig, make, tuple_keys: tuple[str, ...], what: str):
    """The profile's [digits] table as ``make(**table)``, TOML lists turned into the tuples given."""
    d = dict(cfg.digits)
    for k in tuple_keys:
        if k in d:
            d[k] = tuple(d[k])
    try:
        return make(**d)
    except TypeError as e:
        raise UsageError(f"{cfg.config_path}: bad [digits] table{what} ({e})") from None


def digits_config(cfg: RunConfig) -> digits.DigitsConfig:
    return _digits_table(cfg, digits.DigitsConfig, ("digit_size", "clutter", "fragment_size", "split_fractions"), "")


def moving_digits_config(cfg: RunConfig) -> moving_digits.MovingDigitsConfig:
    keys = ("digit_size", "clutter", "fragment_size", "speed", "split_fractions")
    return _digits_table(cfg, moving_digits.MovingDigitsConfig, keys, " for the video data set")


# Embedded data sets (trained and cached by the harness): id -> (their backbone, data module with
# make_split / normalize, config from the profile's [digits] table).
EMBEDDED = {
    "digits": ("digits_vit", digits, digits_config),
    "digits_video": ("digits_video_vit", moving_digits, moving_digits_config),
}


def is_embedded(cfg: RunConfig) -> bool:
    """The data set and backbone of an embedded default, which the harness can train."""
    if cfg.dataset not in EMBEDDED:
        return False
    from methods.variants import NAMED  # the A-ViT study's variants of the digits ViT (docs/avit_study.md)

    return cfg.backbone == EMBEDDED[cfg.dataset][0] or (cfg.dataset == "digits" and cfg.backbone in NAMED)


def embedded_config(cfg: RunConfig):
    """The data recipe of the run's embedded data set (the image default's for other data sets)."""
    return EMBEDDED.get(cfg.dataset, EMBEDDED["digits"])[2](cfg)


def embedded_data(cfg: RunConfig):
    return EMBEDDED.get(cfg.dataset, EMBEDDED["digits"])[1]


def _digits_model_kwargs(cfg: RunConfig) -> dict:
    return {"num_classes": 10, "in_chans": 1, "img_size": digits_config(cfg).canvas}


def _embedded_test_set(cfg: RunConfig, name: str, data, dc, empty_share: tuple, views: int | None = None) -> EvalSet:
    """The seeded test list of an embedded data set (``data``: bench.data.digits or moving_digits,
    ``dc`` its config); ``empty_share`` names and measures the share of empty patches / tubelets."""
    if cfg.data is not None:
        raise UsageError(f"data set '{name}' is embedded and takes no --data path; drop --data or pick another --dataset")
    x, y = data.make_split(dc, "test")
    if cfg.test_samples:
        x, y = x[: cfg.test_samples], y[: cfg.test_samples]
    key, share = empty_share
    info = {"split": "test", "n": int(len(y)), key: round(share(x), 4), **({"views": views} if views else {}), **dc.key()}
    evalset = TensorEvalSet(name, data.normalize(x), y, 10, info)
    evalset.views = views
    return evalset


def _load_digits(cfg: RunConfig, vit: nn.Module | None) -> EvalSet:
    return _embedded_test_set(cfg, "digits", digits, digits_config(cfg), ("empty_patch_share", digits.empty_patch_fraction))


def _load_imagenet(cfg: RunConfig, vit: nn.Module | None) -> EvalSet:
    from timm.data import create_transform, resolve_data_config

    from .data.imagenet import LayoutError, discover

    if cfg.data is None:
        raise UsageError("data set 'imagenet' needs --data PATH (a val/<wnid>/ folder tree or a flat folder with a label file)")
    try:
        items, found = discover(Path(cfg.data).expanduser())
    except LayoutError as e:
        raise UsageError(str(e)) from None
    if found.get("labels_without_file"):
        warn(f"{found['label_file']} labels {found['labels_without_file']} file(s) that are not in {cfg.data}; "
             f"scoring the {len(items)} image(s) present (counted in the manifest as labels_without_file)")
    if cfg.test_samples and cfg.test_samples < len(items):
        keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.test_samples]
        items = [items[i] for i in sorted(keep.tolist())]
    data_cfg = resolve_data_config(transform_overrides(cfg), model=vit)
    transform = create_transform(**data_cfg, is_training=False)
    info = {**found, "root": str(cfg.data), "n": len(items),
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in data_cfg.items()}}
    workers = min(4, os.cpu_count() or 1)
    return FolderEvalSet("imagenet", items, transform, data_cfg["input_size"], 1000, info, workers, cfg.skip_corrupt)


INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")


def transform_overrides(cfg: RunConfig) -> dict:
    """``[transform]`` / ``--crop-pct`` / ``--interpolation`` on top of the backbone's timm
    pretrained config (docs/measurement.md#evaluation-preprocessing: the repos differ, e.g. crop 0.875 vs 0.9)."""
    t = dict(cfg.transform)
    if "crop_pct" in t and not 0.0 < float(t["crop_pct"]) <= 1.0:
        raise UsageError(f"crop_pct must lie in (0, 1], got {t['crop_pct']}")
    if "interpolation" in t and t["interpolation"] not in INTERPOLATIONS:
        raise UsageError(f"interpolation '{t['interpolation']}' is not one of {', '.join(INTERPOLATIONS)}")
    for k in ("mean", "std"):
        if k in t and len(t[k]) != 3:
            raise UsageError(f"transform {k} needs 3 values (one per channel), got {t[k]}")
    if "input_size" in t:
        if len(t["input_size"]) != 3:
            raise UsageError(f"transform input_size is [channels, height, width], got {t['input_size']}")
        t["input_size"] = tuple(t["input_size"])
    return t


def _load_synthetic(cfg: RunConfig, vit: nn.Module | None) -> EvalSet:
    """Seeded random images of the backbone's input size with random labels: speed and compute only,
    for machines without the data (a GPU measured with ``--checkpoint random``)."""
    from timm.data import resolve_data_config

    if cfg.data is not None:
        raise UsageError("data set 'synthetic' is generated and takes no --data path")
    size = tuple(resolve_data_config(transform_overrides(cfg), model=vit)["input_size"])
    n = cfg.test_samples or 512
    gen = torch.Generator().manual_seed(cfg.seed)
    classes = int(getattr(vit, "num_classes", 1000) or 1000)
    images, labels = torch.randn(n, *size, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    return TensorEvalSet("synthetic", images, labels, classes, {"n": n, "input_size": list(size), "seed": cfg.seed})


def _load_digits_video(cfg: RunConfig, vit: nn.Module | None) -> EvalSet:
    return _embedded_test_set(cfg, "digits_video", moving_digits, moving_digits_config(cfg),
                              ("empty_tubelet_share", moving_digits.empty_tubelet_fraction), views=1)


def _moving_digits_model_kwargs(cfg: RunConfig) -> dict:
    dc = moving_digits_config(cfg)
    return {"num_classes": 10, "in_chans": 1, "img_size": dc.canvas, "num_frames": dc.frames}


def _kinetics(num_classes: int):
    def load(cfg: RunConfig, vit: nn.Module | None) -> EvalSet:
        from .video import load_kinetics

        return load_kinetics(cfg, vit, num_classes)

    return load


# id -> (description, loader(cfg, backbone) -> EvalSet, backbone kwargs(cfg))
DATASETS = {
    "digits": ("embedded: cluttered handwritten digits from scikit-learn on a 64x64 canvas", _load_digits, _digits_model_kwargs),
    "digits_video": ("embedded: handwritten digits moving over a cluttered 32x32 canvas, 8 frames", _load_digits_video,
                     _moving_digits_model_kwargs),
    "kinetics400": ("Kinetics-400 videos (--data: <class>/*.mp4 folders, or the official CSV + <youtube_id>_<start>_<end>.mp4)",
                    _kinetics(400), lambda cfg: {"num_classes": 400}),
    "kinetics600": ("Kinetics-600 videos (same layouts; class list from the CSV or a classes.txt)", _kinetics(600),
                    lambda cfg: {"num_classes": 600}),
    "synthetic": ("seeded random images at the backbone's input size, random labels: speed only (no --data)", _load_synthetic, lambda cfg: {}),
    "imagenet": ("ImageNet-1k validation images (--data: val/<wnid>/*.JPEG, or flat files + label file)", _load_imagenet, lambda cfg: {}),
}


def check(cfg: RunConfig) -> None:
    if cfg.dataset not in DATASETS:
        raise UsageError(f"unknown data set '{cfg.dataset}'; known: {', '.join(DATASETS)} (`bench list datasets`)")
    if cfg.data is not None and not Path(cfg.data).expanduser().exists():
        raise UsageError(f"data path {cfg.data} does not exist; pass --data to a folder of images or videos")
    if cfg.transform and cfg.dataset in EMBEDDED:  # they would be recorded in the manifest as if applied
        raise UsageError(f"data set '{cfg.dataset}' is rendered at the model's size, with no resize or crop: "
                         f"--crop-pct, --interpolation and [transform] ({', '.join(cfg.transform)}) do not apply; drop them")
    transform_overrides(cfg)  # a bad crop_pct or interpolation fails before any work


def model_kwargs(cfg: RunConfig) -> dict:
    check(cfg)
    return DATASETS[cfg.dataset][2](cfg)


def load(cfg: RunConfig, vit: nn.Module | None = None) -> EvalSet:
    check(cfg)
    return DATASETS[cfg.dataset][1](cfg, vit)
