"""``bench.toml``: named profiles, validated, with command-line flags layered on top.

A profile may ``extends`` another. Unknown keys and wrong types are errors that name the key and
the file, because a typo in a benchmark config silently measures the wrong thing.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

PACKAGE_ROOT = Path(__file__).resolve().parent.parent

NUMBER = (int, float)

# key -> type spec. A spec is a Python type, a tuple of types, ("list", item_spec),
# ("table", {key: spec}) or ("map", value_spec) for free-form keys (method ids).
_BUDGET_ITEM = (str, int, float)
PROFILE_SCHEMA: dict[str, Any] = {
    "description": str,
    "extends": str,
    "methods": (str, ("list", str)),
    "dataset": str,
    "data": str,
    "backbone": str,
    "variants": ("list", str),  # a study: one run per backbone, one report (bench/study.py)
    "checkpoint": str,
    "budgets": ("map", ("list", _BUDGET_ITEM)),
    "modes": ("map", str),
    "device": (str, ("list", str)),
    "batch_sizes": ("list", int),
    "precision": (str, ("list", str)),
    "seed": int,
    "threads": int,
    "eval_batch_size": int,
    "test_samples": int,
    "out": str,
    "skip_corrupt": bool,
    "compile": bool,
    "compile_backend": str,
    "attention": str,
    "devices": (str, ("list", str)),
    "memory_cap_mb": int,  # bench/kernels.py memory_cap: the device memory a run may hold
    "transform": (
        "table",
        {"input_size": ("list", int), "crop_pct": NUMBER, "interpolation": str, "mean": ("list", NUMBER),
         "std": ("list", NUMBER), "crop_mode": str},
    ),
    "timing": (
        "table",
        {
            "warmup_iters": int,
            "min_iters": int,
            "max_iters": int,
            "min_seconds": NUMBER,
            "timing_samples": int,
            "memory_iters": int,
        },
    ),
    "digits": (
        "table",
        {
            "canvas": int,
            "digit_size": ("list", int),
            "clutter": ("list", int),
            "fragment_size": ("list", int),
            "split_fractions": ("list", NUMBER),
            "n_train": int,
            "n_val": int,
            "n_test": int,
            "seed": int,
            "frames": int,  # video default (digits_video) only
            "speed": ("list", NUMBER),  # video default: pixels per frame
        },
    ),
    # Test-time sampling of real videos (bench/data/kinetics.py); frames and crop size come from the backbone.
    "video": ("table", {"stride": int, "clips": int, "crops": int, "short_side": int}),
    "model": ("table", {"embed_dim": int, "depth": int, "num_heads": int, "mlp_ratio": NUMBER, "img_size": int,
                        # the digits ViT's study options (methods/variants.py, docs/avit_study.md)
                        "pos": str, "norm": str, "attn": str, "block": str}),
    "train": (
        "table",
        {
            "epochs": int,
            "lr": NUMBER,
            "weight_decay": NUMBER,
            "batch_size": int,
            "label_smoothing": NUMBER,
            "grad_clip": NUMBER,
            "warmup_epochs": NUMBER,
            "seed": int,
        },
    ),
}
# `bench compare` gates (bench/compare.py): thresholds and which gates fail the command.
COMPARE_SCHEMA: dict[str, Any] = {
    "fail_on": ("list", str),
    "accuracy_points": NUMBER,
    "gmacs_rel": NUMBER,
    "speed_rel": NUMBER,
    "confidence": NUMBER,
}
FILE_SCHEMA: dict[str, Any] = {
    "cache_dir": str,
    "compare": ("table", COMPARE_SCHEMA),
    "profiles": ("map", ("table", PROFILE_SCHEMA)),
}


def _type_name(spec: Any) -> str:
    if isinstance(spec, type):
        return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(spec, spec.__name__)
    if spec == NUMBER:
        return "a number"
    if isinstance(spec, tuple) and spec and spec[0] == "list":
        return f"a list of {_type_name(spec[1]).removeprefix('a ').removeprefix('an ')}s"
    if isinstance(spec, tuple) and spec and spec[0] in ("table", "map"):
        return "a table"
    if isinstance(spec, tuple):
        return " or ".join(_type_name(s) for s in spec)
    return str(spec)


def _matches(value: Any, spec: Any) -> bool:
    if isinstance(spec, type):
        if spec in (int, float) and isinstance(value, bool):
            return False
        return isinstance(value, spec)
    if spec == NUMBER:
        return isinstance(value, NUMBER) and not isinstance(value, bool)
    if isinstance(spec, tuple) and spec and spec[0] == "list":
        return isinstance(value, list) and all(_matches(v, spec[1]) for v in value)
    if isinstance(spec, tuple) and spec and spec[0] in ("table", "map"):
        return isinstance(value, dict)
    if isinstance(spec, tuple):
        return any(_matches(value, s) for s in spec)
    return False


def validate(data: dict, schema: dict, where: str, path: str = "") -> None:
    for key, value in data.items():
        dotted = f"{path}{key}"
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise UsageError(f"{where}: unknown key '{dotted}' (known keys here: {known})")
        _check(value, schema[key], where, dotted)


def _check(value: Any, spec: Any, where: str, dotted: str) -> None:
    if isinstance(spec, tuple) and spec and spec[0] == "table":
        if not isinstance(value, dict):
            raise UsageError(f"{where}: '{dotted}' must be a table, got {type(value).__name__}")
        validate(value, spec[1], where, dotted + ".")
        return
    if isinstance(spec, tuple) and spec and spec[0] == "map":
        if not isinstance(value, dict):
            raise UsageError(f"{where}: '{dotted}' must be a table, got {type(value).__name__}")
        for k, v in value.items():
            _check(v, spec[1], where, f"{dotted}.{k}")
        return
    if not _matches(value, spec):
        raise UsageError(f"{where}: '{dotted}' must be {_type_name(spec)}, got {value!r}")


def default_config_path() -> Path:
    here = Path.cwd() / "bench.toml"
    return here if here.is_file() else PACKAGE_ROOT / "bench.toml"


def load_file(path: Path | None = None) -> tuple[dict, Path]:
    path = Path(path) if path else default_config_path()
    if path.is_dir():
        raise UsageError(f"config {path} is a folder; pass --config the bench.toml file itself")
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist; pass --config PATH or run from the project folder")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8, as TOML requires") from None
    validate(data, FILE_SCHEMA, str(path))
    if not data.get("profiles"):
        raise UsageError(f"{path}: defines no [profiles.NAME] table")
    return data, path


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "budgets":
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and k == "budgets" and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def profile(data: dict, path: Path, name: str) -> dict:
    profiles = data["profiles"]
    chain: list[str] = []
    current = name
    merged: dict = {}
    while current:
        if current not in profiles:
            known = ", ".join(profiles)
            what = "profile" if current == name else f"profile '{chain[-1]}' extends unknown profile"
            raise UsageError(f"{path}: unknown {what} '{current}' (profiles: {known})")
        if current in chain:
            raise UsageError(f"{path}: profiles extend each other in a loop: {' -> '.join(chain + [current])}")
        chain.append(current)
        merged = _merge(profiles[current], merged)
        current = profiles[current].get("extends", "")
    merged.pop("extends", None)
    return merged


def as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


@dataclass
class Timing:
    warmup_iters: int = 5
    min_iters: int = 20
    max_iters: int = 200
    min_seconds: float = 1.0
    timing_samples: int = 256
    memory_iters: int = 2


@dataclass
class RunConfig:
    """A profile with flags applied: everything a run needs, and what its manifest records."""

    profile: str
    config_path: str
    methods: list[str]
    dataset: str
    data: str | None
    backbone: str
    checkpoint: str | None
    budgets: dict[str, list]
    modes: dict[str, str]
    devices: list[str]
    batch_sizes: list[int]
    precisions: list[str]
    seed: int
    threads: int | None
    eval_batch_size: int
    test_samples: int | None
    out: str
    timing: Timing
    digits: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    retrain: bool = False
    skip_corrupt: bool = False  # count and report unreadable images instead of stopping
    transform: dict = field(default_factory=dict)  # overrides of the backbone's timm eval transform
    compile: bool = False
    compile_backend: str = "inductor"
    attention: str = "default"  # bench/kernels.py ATTENTION
    workers: list[str] = field(default_factory=list)  # --devices: one process per entry
    video: dict = field(default_factory=dict)  # [video]: test-time clip sampling of real videos
    memory_cap_mb: int | None = None  # bench/kernels.py memory_cap (None: the whole device)
    variants: list[str] = field(default_factory=list)  # a study's backbones, one run each (bench/study.py)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """The configuration a manifest recorded. A key this version does not know (written by a newer
        bench) is refused: resuming without the setting it stands for would measure something else."""
        from dataclasses import fields

        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        unknown += sorted(f"timing.{k}" for k in set(d.get("timing", {})) - {f.name for f in fields(Timing)})
        if unknown:
            raise UsageError(f"the run's configuration has settings this bench does not know ({', '.join(unknown)}); "
                             "it was written by another bench version: finish it with that version or start a new run")
        d["timing"] = Timing(**d.get("timing", {}))
        return cls(**d)


def resolve(profile_name: str, config_path: Path | None = None, **flags: Any) -> RunConfig:
    """Profile from the file, then every flag that was given (not None) on top."""
    data, path = load_file(config_path)
    p = profile(data, path, profile_name)
    over = {k: v for k, v in flags.items() if v is not None}
    timing = Timing(**p.get("timing", {}))
    cfg = RunConfig(
        profile=profile_name,
        config_path=str(path),
        methods=as_list(over.get("methods", p.get("methods", "all"))),
        dataset=over.get("dataset", p.get("dataset", "digits")),
        data=over.get("data", p.get("data")) or None,
        backbone=over.get("backbone", p.get("backbone", "digits_vit")),
        checkpoint=over.get("checkpoint", p.get("checkpoint")) or None,
        budgets={k: list(v) for k, v in p.get("budgets", {}).items()},
        modes=dict(p.get("modes", {})),
        devices=as_list(over.get("device", p.get("device", "cpu"))),
        batch_sizes=[int(b) for b in as_list(over.get("batch_sizes", p.get("batch_sizes", [1, 32])))],
        precisions=as_list(over.get("precision", p.get("precision", "fp32"))),
        seed=int(over.get("seed", p.get("seed", 0))),
        threads=over.get("threads", p.get("threads")),
        eval_batch_size=int(p.get("eval_batch_size", 64)),
        test_samples=over.get("test_samples", p.get("test_samples")),
        out=over.get("out", p.get("out", "results")),
        timing=timing,
        digits=dict(p.get("digits", {})),
        # [model] describes the profile's own backbone; a different --backbone starts from timm's defaults.
        model=dict(p.get("model", {})) if over.get("backbone", p.get("backbone")) == p.get("backbone") else {},
        train=dict(p.get("train", {})),
        retrain=bool(over.get("retrain", False)),
        skip_corrupt=bool(over.get("skip_corrupt", p.get("skip_corrupt", False))),
        transform={**p.get("transform", {}), **over.get("transform", {})},
        compile=bool(over.get("compile", p.get("compile", False))),
        compile_backend=str(p.get("compile_backend", "inductor")),
        attention=str(over.get("attention", p.get("attention", "default"))),
        workers=as_list(over.get("devices", p.get("devices"))),
        video=dict(p.get("video", {})),
        memory_cap_mb=p.get("memory_cap_mb"),
        # --backbone names one model: a study's list of variants gives way to it
        variants=[] if "backbone" in over else list(dict.fromkeys(p.get("variants", []))),
    )
    if "budgets" in over:
        cfg.budgets.update(over["budgets"])
    # a value given twice (--batch-sizes 1,1) would measure its cells twice, the second overwriting the first
    for name in ("methods", "devices", "batch_sizes", "precisions", "workers"):
        setattr(cfg, name, list(dict.fromkeys(getattr(cfg, name))))
    return cfg


# ----------------------------------------------------------------------------------------------
# values: ranges that the types alone do not guarantee, checked before any work


def _at_least(low):
    return (lambda v: v >= low), f"at least {low}"


_POSITIVE = (lambda v: v > 0), "a positive number"


def _pair(low, high=None):
    """A TOML [low, high] range such as digit_size = [16, 28]."""
    ok = (lambda v: len(v) == 2 and low <= v[0] <= v[1] and (high is None or v[1] <= high))
    return ok, f"two values A <= B with A >= {low}" + (f" and B <= {high}" if high is not None else "")


# bench.toml table.key -> (test, what it must be). Only keys a profile sets are checked; the defaults are valid.
VALUE_RULES: dict[str, tuple] = {
    **{f"timing.{k}": _at_least(1) for k in ("min_iters", "max_iters", "timing_samples", "memory_iters")},
    "timing.warmup_iters": _at_least(0),
    "timing.min_seconds": _at_least(0),
    **{f"digits.{k}": _at_least(1) for k in ("n_train", "n_val", "n_test", "frames")},
    "digits.canvas": _at_least(8),  # one 8x8 patch of the embedded backbones
    "digits.digit_size": _pair(1),
    "digits.clutter": _pair(0),
    "digits.fragment_size": _pair(1, 8),  # cut from the 8x8 source digits
    "digits.speed": _pair(0),
    "digits.split_fractions": ((lambda v: len(v) == 3 and min(v) > 0 and sum(v) <= 1 + 1e-9),
                               "three positive shares (train, val, test) that sum to at most 1"),
    **{f"model.{k}": _at_least(1) for k in ("embed_dim", "depth", "num_heads", "img_size")},
    "model.mlp_ratio": _POSITIVE,
    **{f"train.{k}": _at_least(1) for k in ("epochs", "batch_size")},
    **{f"train.{k}": _POSITIVE for k in ("lr", "grad_clip")},
    **{f"train.{k}": _at_least(0) for k in ("weight_decay", "label_smoothing", "warmup_epochs")},
}
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit


def check_values(cfg: RunConfig) -> None:
    """Every setting in its range, or one line naming it (the flag where there is one)."""
    where = f"{cfg.config_path} (profile '{cfg.profile}')"
    tables = {"timing": cfg.timing.__dict__, "digits": cfg.digits, "model": cfg.model, "train": cfg.train}
    for dotted, (ok, what) in VALUE_RULES.items():
        table, key = dotted.split(".")
        if key in tables[table] and not ok(tables[table][key]):
            raise UsageError(f"{where}: {dotted} must be {what}, got {tables[table][key]!r}")
    _check_cross(cfg, where)
    _check_flag_values(cfg)


def _check_cross(cfg: RunConfig, where: str) -> None:
    """Rules between two settings."""
    if cfg.timing.max_iters < cfg.timing.min_iters:
        raise UsageError(f"{where}: timing.max_iters ({cfg.timing.max_iters}) is below timing.min_iters ({cfg.timing.min_iters})")
    canvas, size = cfg.digits.get("canvas"), cfg.digits.get("digit_size")
    if canvas is not None and size is not None and size[1] > canvas:
        raise UsageError(f"{where}: digits.digit_size {size} does not fit digits.canvas {canvas}")
    dim, heads = cfg.model.get("embed_dim"), cfg.model.get("num_heads")
    if dim is not None and heads is not None and dim % heads:
        raise UsageError(f"{where}: model.embed_dim {dim} is not a multiple of model.num_heads {heads}")


def _check_flag_values(cfg: RunConfig) -> None:
    """Settings that have a command-line flag: the message names both."""
    import os

    cpus = os.cpu_count() or 1
    if cfg.threads is not None and not 1 <= cfg.threads <= cpus:
        raise UsageError(f"--threads / threads must be between 1 and {cpus} (this machine's logical CPUs), got {cfg.threads}")
    if not 0 <= cfg.seed <= SEED_MAX:
        raise UsageError(f"--seed / seed must be between 0 and {SEED_MAX}, got {cfg.seed}")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise UsageError(f"--batch-sizes / batch_sizes must be positive integers, got {cfg.batch_sizes}")
    if cfg.test_samples is not None and cfg.test_samples < 1:
        raise UsageError(f"{cfg.config_path}: test_samples must be at least 1 (or left out for the whole test list), got {cfg.test_samples}")
    if cfg.eval_batch_size < 1:
        raise UsageError(f"{cfg.config_path}: eval_batch_size must be at least 1, got {cfg.eval_batch_size}")
