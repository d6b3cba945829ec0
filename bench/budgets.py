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


def parse(method_id: str, budget: Any) -> dict[str, Any]:
    spec = methods.get(method_id)
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        text = repr(budget)
    else:
        text = str(budget).strip()
    if text in ("full", ""):
        return {}
    knobs: dict[str, Any] = {}
    for part in text.split("+"):
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


def parse_cli(text: str) -> dict[str, list]:
    """``'ats=0.5,0.75;avit=20'`` -> {'ats': ['0.5', '0.75'], 'avit': ['20']}."""
    out: dict[str, list] = {}
    for group in text.split(";"):
        if not group.strip():
            continue
        if "=" not in group:
            raise UsageError(f"--budgets '{group}' must look like METHOD=B1,B2 (e.g. 'ats=0.5,0.75;avit=20')")
        method, items = group.split("=", 1)
        out[method.strip()] = [i.strip() for i in items.split(",") if i.strip()]
        if not out[method.strip()]:  # an empty list would fall back to the defaults unnoticed
            raise UsageError(f"--budgets '{group}' gives method '{method.strip()}' no budget; list at least one, e.g. {method.strip()}=full")
    if not out:
        raise UsageError(f"--budgets '{text}' names no method; use METHOD=B1,B2 (e.g. 'ats=0.5,0.75;avit=20')")
    return out


def for_method(method_id: str, configured: dict[str, list]) -> list:
    """The method's budgets, each once (0.5 and '0.5' are one budget: one label, one set of cells)."""
    spec = methods.get(method_id)
    by_label = {}
    for b in configured.get(method_id) or spec.default_budgets:
        by_label.setdefault(label(b), b)
    return list(by_label.values())
