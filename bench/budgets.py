"""Budgets: one string per operating point, turned into a method's knobs.

Grammar: ``full`` (the method's defaults), a bare number (sets the method's primary knob, e.g.
ATS keep ratio or A-ViT gate centre), or ``knob:value`` pairs joined by ``+``
(``tokens:32+blocks:3``). Lists in a value use ``/`` (``blocks:2/3/4``). On the command line,
``--budgets 'ats=0.5,0.75;avit=20,30'`` sets the budgets of the methods it names.
"""
from __future__ import annotations

from typing import Any

import methods

from .errors import UsageError


def _value(text: str) -> Any:
    t = text.strip()
    if "/" in t:
        return [_value(p) for p in t.split("/") if p]
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def label(budget: Any) -> str:
    if isinstance(budget, float) and budget.is_integer():
        return str(budget)
    return str(budget).strip()


TARGET = "gmacs"  # `gmacs:0.7`: the harness finds the knob that puts the method at 0.7 of dense GMACs
ALL = "all"  # budgets.all: budgets every method (the dense reference aside) is run at


def _text(budget: Any) -> str:
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return repr(budget)
    return str(budget).strip()


def target(budget: Any) -> float | None:
    """The compute target of a ``gmacs:R`` budget (a share of the dense model's GMACs), else None."""
    for part in _text(budget).split("+"):
        name, _, raw = part.partition(":")
        if name.strip() == TARGET:
            value = _value(raw)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise UsageError(f"budget '{_text(budget)}': gmacs must be a share of the dense model's GMACs in (0, 1], e.g. gmacs:0.7")
            return float(value)
    return None


def parse(method_id: str, budget: Any) -> dict[str, Any]:
    """The knobs a budget sets (a ``gmacs:R`` target is not a knob: see ``target``)."""
    spec = methods.get(method_id)
    text = _text(budget)
    if text in ("full", ""):
        return {}
    knobs: dict[str, Any] = {}
    if target(budget) is not None and spec.matched is None:
        raise UsageError(f"budget '{text}': method '{method_id}' has no knob to match a compute target; give its knobs instead")
    for part in text.split("+"):
        if part.split(":", 1)[0].strip() == TARGET:
            continue
        if ":" in part:
            name, raw = part.split(":", 1)
            name = name.strip()
        else:
            if spec.primary_knob is None:
                raise UsageError(f"method '{method_id}' has no budget knob; its only budget is 'full' (got '{text}')")
            name, raw = spec.primary_knob, part
        try:
            knobs[name] = methods.registry.coerce_knob(spec, name, _value(raw))
        except ValueError as e:
            raise UsageError(f"budget '{text}' for method '{method_id}': {e}") from None
    return knobs


def describe(method_id: str, budget: Any) -> str:
    """What a budget sets, for `bench list budgets`: its knobs, and the knob a compute target searches."""
    knobs = parse(method_id, budget)
    goal = target(budget)
    parts = [f"{k}={v}" for k, v in knobs.items()]
    if goal is not None:
        parts.append(f"{methods.get(method_id).matched.knob} found for {goal:g} of dense GMACs")
    return ", ".join(parts) or "defaults"


def parse_cli(text: str) -> dict[str, list]:
    """``'ats=0.5,0.75;avit=20'`` -> {'ats': ['0.5', '0.75'], 'avit': ['20']}."""
    out: dict[str, list] = {}
    for group in text.split(";"):
        if not group.strip():
            continue
        if "=" not in group:
            raise UsageError(f"--budgets '{group}' must look like METHOD=B1,B2 (e.g. 'ats=0.5,0.75;avit=20')")
        method, items = group.split("=", 1)
        out[method.strip()] = _continue_targets([i.strip() for i in items.split(",") if i.strip()])
        if not out[method.strip()]:  # an empty list would fall back to the defaults unnoticed
            raise UsageError(f"--budgets '{group}' gives method '{method.strip()}' no budget; list at least one, e.g. {method.strip()}=full")
    if not out:
        raise UsageError(f"--budgets '{text}' names no method; use METHOD=B1,B2 (e.g. 'ats=0.5,0.75;avit=20')")
    return out


def _continue_targets(items: list[str]) -> list[str]:
    """``gmacs:0.5,0.7`` lists two targets: a bare number right after a ``gmacs:`` item is one more."""
    out: list[str] = []
    for item in items:
        bare = ":" not in item and "+" not in item and isinstance(_value(item), (int, float))
        if bare and out and out[-1].startswith(f"{TARGET}:") and "+" not in out[-1]:
            item = f"{TARGET}:{item}"
        out.append(item)
    return out


def for_method(method_id: str, configured: dict[str, list]) -> list:
    """The method's budgets, each once (0.5 and '0.5' are one budget: one label, one set of cells)."""
    spec = methods.get(method_id)
    shared = configured.get(ALL, []) if spec.primary_knob is not None else []
    own = configured.get(method_id) or ([] if shared else spec.default_budgets)
    by_label = {}
    for b in [*shared, *own]:
        by_label.setdefault(label(b), b)
    return list(by_label.values())
