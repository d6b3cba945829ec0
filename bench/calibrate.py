"""Matched compute: the knob value that puts a method at a target share of the dense model's GMACs.

A ``gmacs:0.7`` budget asks for the method at 0.7 of dense GMACs, averaged over samples. The method's
spec names the inference knob to search (``methods.MatchedCompute``); the search runs on the
validation split of the embedded data sets, never on the test list the accuracy comes from (data
sets without a validation split use seeded samples of the evaluation data and say so), and the
record keeps the knob found and how far from the target it landed (docs/measurement.md#matched-compute).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

import methods

TOLERANCE = 0.02  # |ratio / target - 1| counted as matched
STOP = 0.004  # the search stops once this close
STEPS = 18  # bisection steps at most (the knob range shrinks 2^18-fold)


@dataclass(frozen=True)
class Calibration:
    knob: str
    value: float
    ratio: float  # mean GMACs ratio reached on the calibration samples
    target: float
    split: str  # which samples the search ran on

    @property
    def residual(self) -> float:
        return self.ratio / self.target - 1.0

    @property
    def matched(self) -> bool:
        return abs(self.residual) <= TOLERANCE

    def fields(self) -> dict:
        """The record columns (docs/records.md)."""
        return {"gmacs_target": self.target, "calibrated_knob": self.knob, "calibrated_value": self.value,
                "calibration_ratio": round(self.ratio, 6), "gmacs_residual": round(self.residual, 6),
                "gmacs_matched": self.matched, "calibration_split": self.split}


@torch.inference_mode()
def mean_ratio(model: nn.Module, batches: Iterable[torch.Tensor], dense_gmacs: float) -> float:
    """Mean per-sample GMACs of ``model`` over ``batches``, as a share of ``dense_gmacs``."""
    total, count = 0.0, 0
    for x in batches:
        model(x)
        g = methods.trace(model).gmacs
        total, count = total + float(g.sum()), count + len(g)
    return total / count / dense_gmacs


def search(ratio_at: Callable[[float], float], spec: methods.MatchedCompute, target: float) -> tuple[float, float]:
    """Bisection on the knob for ``ratio_at(value) == target``; ``ratio_at`` grows with the knob when
    ``spec.increasing``. Returns (value, ratio) of the closest value tried; a target outside what the
    knob's range reaches gives that end of the range."""
    lo, hi = spec.low, spec.high
    tried = {lo: ratio_at(lo), hi: ratio_at(hi)}
    for _ in range(STEPS):
        best = min(tried, key=lambda v: abs(tried[v] - target))
        if abs(tried[best] / target - 1.0) <= STOP:
            break
        mid = float(f"{(lo + hi) / 2:.6g}")  # a knob value that prints as it is stored
        if mid in tried:
            break
        tried[mid] = ratio_at(mid)
        if (tried[mid] < target) == spec.increasing:
            lo = mid
        else:
            hi = mid
    best = min(tried, key=lambda v: (abs(tried[v] - target), v))
    return best, tried[best]


def calibrate(build: Callable[[dict], nn.Module], spec: methods.MethodSpec, knobs: dict, target: float,
              batches: list[torch.Tensor], dense_gmacs: float, split: str) -> Calibration:
    """The knob of ``spec.matched`` that puts ``build({**knobs, knob: value})`` at ``target``."""
    m = spec.matched
    value, ratio = search(lambda v: mean_ratio(build({**knobs, m.knob: v}), batches, dense_gmacs), m, target)
    return Calibration(m.knob, value, ratio, target, split)
