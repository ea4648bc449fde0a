"""Schedules: callables ``step -> value`` for learning rates and regularization weights.

A schedule is evaluated at the *0-based* step ``k``, the number of optimizer
updates applied before the one being computed, so ``schedule(0)`` is the value
of the first update. Every schedule returns a plain Python ``float``: evaluating
it never touches a tensor and never synchronises with a device.

The names follow ParameterSchedulers.jl / Optimisers.jl; the exponential anneal
is the one the regularized neural-ODE papers use for their regularization
weights (e.g. from 100 down to 10 over training; Pal et al., ICML 2021 and 2023).
"""

from __future__ import annotations

import abc

import math
import numbers
from typing import Any

__all__ = [
    "AbstractSchedule",
    "Constant",
    "CosineAnneal",
    "Step",
    "InverseDecay",
    "ExponentialAnneal",
    "check_step",
]


def _real(owner: str, name: str, value: Any) -> float:
    """``value`` as a finite float, or a ValueError naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner}: {name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value!r}")
    return value


def _positive_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return int(value)


def check_step(step: Any, where: str) -> int:
    """``step`` as a non-negative Python ``int``; raise ``TypeError``/``ValueError`` otherwise."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"{where}: the step must be a Python int (0-based update count), "
                        f"got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"{where}: the step must be >= 0, got {step}")
    return int(step)


class AbstractSchedule(abc.ABC):
    """Base class of schedules: ``schedule(k) -> float`` for a 0-based step ``k >= 0``."""

    @abc.abstractmethod
    def value(self, step: int) -> float:
        """Implemented by each concrete subclass."""

    def __call__(self, step: int) -> float:
        return self.value(check_step(step, type(self).__name__))

    def _fields(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._fields().items())
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._fields() == other._fields()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self._fields().items())))


class Constant(AbstractSchedule):
    r"""The constant schedule :math:`s(k) = v`."""

    def __init__(self, value: float):
        self.constant = _real("Constant", "value", value)

    def value(self, step: int) -> float:
        return self.constant

    def _fields(self) -> dict[str, Any]:
        return {"value": self.constant}


class CosineAnneal(AbstractSchedule):
    r"""Cosine annealing from ``start`` to ``end`` over ``period`` steps (Loshchilov & Hutter, ICLR 2017, SGDR).

    .. math::  s(k) = e + \tfrac{1}{2}(a - e)\,\bigl(1 + \cos(\pi\,\tilde k / P)\bigr)

    with :math:`a` = ``start``, :math:`e` = ``end``, :math:`P` = ``period``, and
    :math:`\tilde k = \min(k, P)` (the value stays at ``end`` after the period),
    or :math:`\tilde k = k \bmod P` with ``restart=True`` (warm restarts).
    """

    def __init__(self, start: float, end: float, period: int, *, restart: bool = False):
        self.start = _real("CosineAnneal", "start", start)
        self.end = _real("CosineAnneal", "end", end)
        self.period = _positive_int("CosineAnneal", "period", period)
        if not isinstance(restart, bool):
            raise ValueError(f"CosineAnneal: restart must be a bool, got {restart!r}")
        self.restart = restart

    def value(self, step: int) -> float:
        k = step % self.period if self.restart else min(step, self.period)
        return self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(math.pi * k / self.period))

    def _fields(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "period": self.period, "restart": self.restart}


class Step(AbstractSchedule):
    r"""Step decay: multiply by ``decay`` every ``step_size`` steps.

    .. math::  s(k) = a\,\gamma^{\lfloor k / n \rfloor}

    with :math:`a` = ``start``, :math:`\gamma` = ``decay`` (> 0) and :math:`n` = ``step_size``.
    """

    def __init__(self, start: float, decay: float, step_size: int):
        self.start = _real("Step", "start", start)
        self.decay = _real("Step", "decay", decay)
        if self.decay <= 0:
            raise ValueError(f"Step: decay must be > 0, got {self.decay!r}")
        self.step_size = _positive_int("Step", "step_size", step_size)

    def value(self, step: int) -> float:
        return self.start * self.decay ** (step // self.step_size)

    def _fields(self) -> dict[str, Any]:
        return {"start": self.start, "decay": self.decay, "step_size": self.step_size}


class InverseDecay(AbstractSchedule):
    r"""Inverse-time decay (ParameterSchedulers.jl's ``Inv``).

    .. math::  s(k) = \frac{a}{(1 + \delta k)^{p}}

    with :math:`a` = ``start``, :math:`\delta` = ``decay`` (>= 0) and :math:`p` = ``power`` (> 0).
    """

    def __init__(self, start: float, decay: float, *, power: float = 1.0):
        self.start = _real("InverseDecay", "start", start)
        self.decay = _real("InverseDecay", "decay", decay)
        if self.decay < 0:
            raise ValueError(f"InverseDecay: decay must be >= 0, got {self.decay!r}")
        self.power = _real("InverseDecay", "power", power)
        if self.power <= 0:
            raise ValueError(f"InverseDecay: power must be > 0, got {self.power!r}")

    def value(self, step: int) -> float:
        return self.start / (1.0 + self.decay * step) ** self.power

    def _fields(self) -> dict[str, Any]:
        return {"start": self.start, "decay": self.decay, "power": self.power}


class ExponentialAnneal(AbstractSchedule):
    r"""Geometric interpolation from ``start`` to ``end`` over ``steps`` steps, constant after.

    .. math::  s(k) = a \left(\frac{e}{a}\right)^{\min(k, N)/N}

    with :math:`a` = ``start``, :math:`e` = ``end`` (same sign, both non-zero) and
    :math:`N` = ``steps``. The regularized neural-ODE papers (Pal et al., ICML 2021,
    "Opening the blackbox"; ICML 2023, "Locally regularized neural differential
    equations") anneal their regularization weight this way, e.g. from 100 to 10.
    """

    def __init__(self, start: float, end: float, steps: int):
        self.start = _real("ExponentialAnneal", "start", start)
        self.end = _real("ExponentialAnneal", "end", end)
        if self.start == 0 or self.end == 0 or (self.start > 0) != (self.end > 0):
            raise ValueError(
                f"ExponentialAnneal: start and end must be non-zero and of the same sign for a geometric "
                f"interpolation, got start={self.start!r}, end={self.end!r}; use CosineAnneal to reach 0")
        self.steps = _positive_int("ExponentialAnneal", "steps", steps)

    def value(self, step: int) -> float:
        return self.start * (self.end / self.start) ** (min(step, self.steps) / self.steps)

    def _fields(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "steps": self.steps}
