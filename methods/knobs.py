"""Parsing of knob values that several methods accept in the same forms (lists of block indices
or token counts given as an int, a list, or a string such as '3-11', '3,4,5' or '3/4/5')."""
from __future__ import annotations

import re
from typing import Any


def knob_error(method: str, name: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"{method} knob {name!r} must be {allowed}; got {value!r}")


def _items(method: str, name: str, value: Any, allowed: str) -> list[Any] | range:
    """The items of ``value``: a range for 'a-b', the parts of 'a,b' / 'a/b', a list as is, else [value]."""
    if isinstance(value, str):
        text = value.strip()
        m = re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", text)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise knob_error(method, name, allowed, value)
            return range(lo, hi + 1)
        items = [p for p in re.split(r"[,/\s]+", text) if p]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if not items:
        raise knob_error(method, name, allowed, value)
    return items


def _as_int(item: Any) -> int | None:
    """An int from an int, an integer-valued float or its text; None if it is not one."""
    if isinstance(item, bool):
        return None
    if isinstance(item, str):
        try:
            item = float(item) if not re.fullmatch(r"-?\d+", item.strip()) else int(item)
        except ValueError:
            return None
    if isinstance(item, float):
        return int(item) if item.is_integer() else None
    return item if isinstance(item, int) else None


def int_list(method: str, name: str, value: Any, allowed: str) -> list[int]:
    """An int, an integer-valued float, a list of those, or a string '3-11' / '3,4,5' / '3/4/5'."""
    items = _items(method, name, value, allowed)
    if isinstance(items, range):
        return list(items)
    out = [_as_int(item) for item in items]
    if any(v is None for v in out):
        raise knob_error(method, name, allowed, value)
    return out
