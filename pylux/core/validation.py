"""Validation of option values: typed errors that name the option, the caller and what is allowed.

Every pylux entry point that takes numeric or enumerated options checks them
here, once, at construction or at the call, so that a bad value fails before
any work with a message of the form ``"<where>: <name> must ..., got ..."``.
Unknown keyword *names* are refused by :func:`pylux.core.keywords.check_keywords`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_int", "check_float", "check_bool", "check_choice"]


def check_int(where: str, name: str, value: Any, minimum: int, allow_none: bool = False) -> Any:
    """``value`` as an ``int``, checked to be an integer ``>= minimum``.

    Args:
        where: the caller's name for the message, e.g. ``"gmres"`` or ``"Broyden"``.
        name: the option's name, e.g. ``"maxiters"``.
        value: the value given; any :class:`numbers.Integral` but ``bool``.
        minimum: the smallest value allowed.
        allow_none: accept ``None`` (returned unchanged, meaning "the default").

    Returns:
        ``int(value)``, or ``None`` when allowed and given.

    Raises:
        TypeError: ``value`` is not an integer (a ``bool`` or a float such as ``3.0`` included).
        ValueError: ``value < minimum``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {value}.")
    return int(value)


def check_float(where: str, name: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
                low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> Any:
    """``value`` as a ``float``, checked to lie in the interval from ``low`` to ``high``.

    Args:
        where, name: the caller and the option, for the message (as :func:`check_int`).
        value: the value given; any :class:`numbers.Real` but ``bool`` (ints are accepted).
        low, high: the interval's ends (unbounded by default).
        low_open, high_open: exclude that end (``(low, ...`` rather than ``[low, ...``).
        allow_none: accept ``None`` (returned unchanged).

    Returns:
        ``float(value)``, or ``None`` when allowed and given.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN or outside the interval (the message writes the interval).
    """
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
    """``value``, checked to be ``True`` or ``False`` (not merely truthy: ``1`` and ``"yes"`` are refused).

    Raises:
        TypeError: ``value`` is not a ``bool``.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be True or False, got {type(value).__name__} {value!r}.")
    return value


def check_choice(where: str, name: str, value: Any, choices: tuple) -> Any:
    """``value``, checked to be one of ``choices`` (compared with ``==``).

    Raises:
        ValueError: ``value`` is not among ``choices`` (all of them are listed).
    """
    if value not in choices:
        raise ValueError(
            f"{where}: {name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}.")
    return value
