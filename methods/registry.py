"""Method registry: one id, one paper (docs/design.md#method-ids).

A method module registers a :class:`MethodSpec`; ``methods.build(id, vit, **knobs)`` validates the
knobs against it and returns the adapted model. The harness reaches models only through here.
"""
from __future__ import annotations

import copy as _copy
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class Knob:
    """One budget knob of a method, e.g. ATS ``tokens`` or A-ViT ``gate_center``."""

    name: str
    type: type
    default: Any
    help: str


@dataclass(frozen=True)
class MatchedCompute:
    """How the harness puts a method at a target share of the dense model's GMACs (a
    ``gmacs:0.7`` budget): it searches the inference ``knob`` in [``low``, ``high``] (compute
    grows with the knob when ``increasing``) and, for a method that trains, sets the training
    knobs ``train_from_target(target)`` first (docs/measurement.md#matched-compute)."""

    knob: str
    low: float
    high: float
    increasing: bool = True
    train_from_target: Callable[[float], dict[str, Any]] | None = None


@dataclass(frozen=True)
class CountRule:
    """One way of counting a method's per-sample compute other than our closed form, e.g. a
    paper's own convention (docs/counting.md#every-counter). ``gmacs(model, trace)`` -> (B,) G."""

    name: str
    note: str
    gmacs: Callable[..., Any]


@dataclass(frozen=True)
class Counting:
    """How a method's compute looks to other counters, per sample, as functions of the model and
    one forward's trace (methods/counting.py, docs/counting.md#every-counter). None = the trace's
    own ``gmacs`` (the dense model: every counter sees our closed form)."""

    traced: Callable[..., Any] | None = None  # fvcore's jit trace of ``compact`` at batch 1
    executed: Callable[..., Any] | None = None  # what ``compact`` runs at batch 1 (eager counters)
    conventions: tuple[CountRule, ...] = ()  # the papers' own counts where they differ from ours


@dataclass(frozen=True)
class MethodSpec:
    id: str
    paper: str
    arxiv: str  # "" for the dense reference
    summary: str
    build: Callable[..., nn.Module]  # build(vit, mode=..., **knobs) -> model; vit is already a copy
    knobs: tuple[Knob, ...] = ()
    modes: tuple[str, ...] = ("compact",)
    primary_knob: str | None = None  # what a bare number in a budget sets
    default_budgets: tuple[str, ...] = ("full",)
    # Fine-tuning for methods that need it (A-ViT, AdaViT); None for training-free ones.
    # train(model, data: TrainData, settings: dict, progress) -> dict of measured numbers; trains
    # ``model`` (already built by ``build`` with the budget's knobs) in place. The harness caches
    # the resulting state dict keyed by backbone, method, ``train_knobs`` values and settings.
    train: Callable[..., Any] | None = None
    train_knobs: tuple[str, ...] = ()  # knobs whose value changes the trained weights
    train_settings: dict[str, Any] = field(default_factory=dict)  # defaults, overridable in bench.toml
    extras: dict[str, str] = field(default_factory=dict)  # trace fields the method adds -> meaning
    matched: MatchedCompute | None = None  # how to reach a target GMACs ratio; None: no budget knob
    counting: Counting = field(default_factory=Counting)  # other counters' view (docs/counting.md#every-counter)

    def knob(self, name: str) -> Knob:
        for k in self.knobs:
            if k.name == name:
                return k
        known = ", ".join(k.name for k in self.knobs) or "none"
        raise ValueError(f"method {self.id!r} has no knob {name!r} (knobs: {known})")


@dataclass(frozen=True)
class TrainData:
    """What a method's ``train`` gets from the harness: fresh normalised (x, y) batches per epoch
    (on the training device) and validation batches; nothing else of the harness."""

    batches: Callable[[int], Any]  # epoch -> iterable of (images, labels)
    steps_per_epoch: int
    val_batches: Callable[[], Any]  # -> iterable of (images, labels)
    num_classes: int


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.id in _REGISTRY and _REGISTRY[spec.id] is not spec:
        raise ValueError(f"method id {spec.id!r} is already registered")
    _REGISTRY[spec.id] = spec
    return spec


def get(method_id: str) -> MethodSpec:
    try:
        return _REGISTRY[method_id]
    except KeyError:
        raise ValueError(f"unknown method {method_id!r}; known methods: {', '.join(_REGISTRY)}") from None


def available() -> list[MethodSpec]:
    return list(_REGISTRY.values())


def coerce_knob(spec: MethodSpec, name: str, value: Any) -> Any:
    knob = spec.knob(name)
    if knob.type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if knob.type is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, knob.type) and not isinstance(value, bool) or knob.type is bool and isinstance(value, bool):
        return value
    if knob.type in (list, tuple) and isinstance(value, (list, tuple)):
        return knob.type(value)
    raise ValueError(
        f"knob {name!r} of method {spec.id!r} must be {knob.type.__name__}, got {value!r} ({type(value).__name__})"
    )


def build(method_id: str, vit: nn.Module, mode: str | None = None, copy: bool = True, **knobs: Any) -> nn.Module:
    """Turn a timm VisionTransformer into method ``method_id``; see docs/design.md#python-api.

    The backbone is deep-copied unless ``copy=False``, so one loaded checkpoint serves the dense
    baseline and every method side by side.
    """
    spec = get(method_id)
    mode = mode or spec.modes[0]
    if mode not in spec.modes:
        raise ValueError(f"method {method_id!r} has no mode {mode!r}; modes: {', '.join(spec.modes)}")
    # a backbone a method (or one of its modes) is not adapted to: TimeSformer, the study variants
    refusal = getattr(vit, "unsupported_reason", None)
    reason = refusal(method_id, mode) if refusal is not None else None
    if reason:
        raise ValueError(reason)
    values = {k.name: k.default for k in spec.knobs}
    for name, value in knobs.items():
        values[name] = coerce_knob(spec, name, value)
    model = _copy.deepcopy(vit) if copy else vit
    return spec.build(model, mode=mode, **values)
