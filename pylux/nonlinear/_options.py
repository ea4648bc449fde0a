"""Validation of solver options: typed errors that name the option and say what is allowed."""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Iterable

__all__ = ["reject_unknown", "check_int", "check_float", "check_bool", "check_choice"]


def reject_unknown(where: str, unknown: dict, allowed: Iterable[str]) -> None:
    """Raise ``TypeError`` naming every unknown keyword, with the closest valid spelling."""
    if not unknown:
        return
    allowed = sorted(allowed)
    parts = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, allowed, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(
        f"{where}: unknown option{'s' if len(parts) > 1 else ''} {', '.join(parts)}; "
        f"valid options are {', '.join(allowed)}.")


def check_int(where: str, name: str, value: Any, minimum: int, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {value}.")
    return int(value)


def check_float(where: str, name: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
                low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__} {value!r}.")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if math.isnan(value) or below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{where}: {name} must lie in {interval}, got {value!r}.")
    return value


def check_bool(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be True or False, got {type(value).__name__} {value!r}.")
    return value


def check_choice(where: str, name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(
            f"{where}: {name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}.")
    return value
