"""Validation of solver option values: typed errors that name the option and say what is allowed.

Unknown keyword names are refused by :func:`pylux.core.keywords.check_keywords`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_int", "check_float", "check_bool", "check_choice"]


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
