"""Step-size controllers and the initial step-size heuristic.

A controller sees the scaled error norm ``E`` of a trial step (a host float:
the loop's one synchronisation per step) and decides accept/reject and the next
step size. Controllers are immutable option objects; their per-solve memory
lives in a :class:`ControllerState` that :meth:`decide` returns anew.

``decide(state, error_norm, dt) -> (accept, dt_next, state_new)``, with ``dt``
and ``dt_next`` signed host floats (their sign is the direction of time).

PI control follows OrdinaryDiffEq.jl's ``PIController`` (Söderlind, "Automatic
control and adaptive time-stepping", Numer. Algorithms 31 (2002); Hairer &
Wanner, *Solving ODEs II*, IV.2)::

    q11 = E^beta1;  q = clamp(q11 / qold^beta2 / gamma, 1/qmax, 1/qmin)
    accept (E <= 1):  dt_next = dt / q        (q := 1 inside [qsteady_min, qsteady_max])
                      qold = max(E, qoldinit)
    reject:           dt_next = dt / min(1/qmin, q11 / gamma)

with OrdinaryDiffEq's per-method defaults ``beta1 = 7/(10 p)``,
``beta2 = 2/(5 p)`` for a method of order ``p`` (Tsit5: 0.14 / 0.08, BS3:
7/30 / 2/15), except DP5: ``beta2 = 0.04``, ``beta1 = 1/5 - 3 beta2 / 4 = 0.17``
(Hairer's DOPRI5 values), and ``qmin = 0.2``, ``qmax = 10``, ``gamma = 0.9``.
"""

from __future__ import annotations

import abc

import math
from dataclasses import dataclass

import torch

from ._device import scalar_like

__all__ = [
    "AbstractController",
    "PIController",
    "IController",
    "ControllerState",
    "initial_step_size",
]


@dataclass(frozen=True)
class ControllerState:
    """Memory of a controller between steps: the last accepted error norm ``qold``."""

    qold: float


def _check_positive(owner: str, name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}: {name} must be finite and {bound}, got {value!r}")
    return value


class AbstractController(abc.ABC):
    """Base class of the step-size controllers (see the module docstring)."""

    qmin: float
    qmax: float
    gamma: float

    def init(self) -> ControllerState:
        return ControllerState(qold=1e-4)

    @abc.abstractmethod
    def decide(self, state: ControllerState, error_norm: float, dt: float
               ) -> tuple[bool, float, ControllerState]:
        """Implemented by each concrete subclass."""


def _validate_common(owner: str, qmin, qmax, gamma, qsteady_min, qsteady_max):
    qmin = _check_positive(owner, "qmin", qmin)
    qmax = _check_positive(owner, "qmax", qmax)
    gamma = _check_positive(owner, "gamma", gamma)
    if qmin > 1:
        raise ValueError(f"{owner}: qmin (the largest shrink factor) must be <= 1, got {qmin}")
    if qmax < 1:
        raise ValueError(f"{owner}: qmax (the largest growth factor) must be >= 1, got {qmax}")
    if gamma > 1:
        raise ValueError(f"{owner}: gamma (the safety factor) must be <= 1, got {gamma}")
    qsteady_min = _check_positive(owner, "qsteady_min", qsteady_min)
    qsteady_max = _check_positive(owner, "qsteady_max", qsteady_max)
    if qsteady_min > qsteady_max:
        raise ValueError(f"{owner}: qsteady_min ({qsteady_min}) exceeds qsteady_max ({qsteady_max})")
    return qmin, qmax, gamma, qsteady_min, qsteady_max


@dataclass(frozen=True)
class PIController(AbstractController):
    """Proportional–integral step-size control (see the module docstring for the formula).

    Args:
        beta1: exponent of the current error (integral gain).
        beta2: exponent of the previous accepted error (proportional gain).
        qmin: smallest step-size ratio ``dt_next / dt`` (default 0.2).
        qmax: largest step-size ratio (default 10).
        gamma: safety factor (default 0.9).
        qsteady_min, qsteady_max: keep ``dt`` unchanged when ``q`` falls in this band.
        qoldinit: the initial ``qold`` (default 1e-4, as OrdinaryDiffEq).

    Raises:
        TypeError / ValueError: a field that is not a finite number in range.
    """

    beta1: float
    beta2: float
    qmin: float = 0.2
    qmax: float = 10.0
    gamma: float = 0.9
    qsteady_min: float = 1.0
    qsteady_max: float = 1.0
    qoldinit: float = 1e-4

    def __post_init__(self) -> None:
        owner = "PIController"
        object.__setattr__(self, "beta1", _check_positive(owner, "beta1", self.beta1))
        object.__setattr__(self, "beta2", _check_positive(owner, "beta2", self.beta2, allow_zero=True))
        values = _validate_common(owner, self.qmin, self.qmax, self.gamma, self.qsteady_min,
                                  self.qsteady_max)
        for name, value in zip(("qmin", "qmax", "gamma", "qsteady_min", "qsteady_max"), values):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "qoldinit", _check_positive(owner, "qoldinit", self.qoldinit))

    @classmethod
    def for_order(cls, order: int, **overrides) -> "PIController":
        """OrdinaryDiffEq's defaults for a method of order ``order``: beta1 = 7/(10 p), beta2 = 2/(5 p)."""
        return cls(beta1=overrides.pop("beta1", 0.7 / order),
                   beta2=overrides.pop("beta2", 0.4 / order), **overrides)

    def init(self) -> ControllerState:
        return ControllerState(qold=self.qoldinit)

    def decide(self, state: ControllerState, error_norm: float, dt: float
               ) -> tuple[bool, float, ControllerState]:
        q11 = error_norm ** self.beta1
        q = q11 / state.qold ** self.beta2
        q = max(1.0 / self.qmax, min(1.0 / self.qmin, q / self.gamma))
        if error_norm <= 1.0:
            if self.qsteady_min <= q <= self.qsteady_max:
                q = 1.0
            return True, dt / q, ControllerState(qold=max(error_norm, self.qoldinit))
        return False, dt / min(1.0 / self.qmin, q11 / self.gamma), state


@dataclass(frozen=True)
class IController(AbstractController):
    """Integral (standard) step-size control: ``dt_next = dt / clamp(E^(1/(k+1)) / gamma, 1/qmax, 1/qmin)``.

    ``k`` is the order of the error estimate (``solver.error_order``); the solve
    fills it in when left as ``None``. This is the textbook controller of
    Hairer, Nørsett & Wanner (*Solving ODEs I*, II.4, eq. 4.13) and of scipy's
    ``RK45``/``RK23``.

    Args:
        error_order: ``k`` above, or ``None`` to take the solver's.
        qmin, qmax, gamma, qsteady_min, qsteady_max: as for :class:`PIController`.
    """

    error_order: int | None = None
    qmin: float = 0.2
    qmax: float = 10.0
    gamma: float = 0.9
    qsteady_min: float = 1.0
    qsteady_max: float = 1.0

    def __post_init__(self) -> None:
        owner = "IController"
        if self.error_order is not None and (
                isinstance(self.error_order, bool) or not isinstance(self.error_order, int)
                or self.error_order < 1):
            raise ValueError(f"{owner}: error_order must be a positive int or None, got {self.error_order!r}")
        values = _validate_common(owner, self.qmin, self.qmax, self.gamma, self.qsteady_min,
                                  self.qsteady_max)
        for name, value in zip(("qmin", "qmax", "gamma", "qsteady_min", "qsteady_max"), values):
            object.__setattr__(self, name, value)

    def decide(self, state: ControllerState, error_norm: float, dt: float
               ) -> tuple[bool, float, ControllerState]:
        if self.error_order is None:
            raise ValueError("IController.error_order is None; solve() fills it from the solver, "
                             "or pass IController(error_order=k) when calling decide() directly")
        q = error_norm ** (1.0 / (self.error_order + 1)) / self.gamma
        q = max(1.0 / self.qmax, min(1.0 / self.qmin, q))
        accept = error_norm <= 1.0
        if accept and self.qsteady_min <= q <= self.qsteady_max:
            q = 1.0
        return accept, dt / q, state


def initial_step_size(field, t0: float, u0: torch.Tensor, t1: float, order: int, abstol, reltol,
                      norm, f0: torch.Tensor, dtmax: float) -> float:
    """Hairer's starting step size (Hairer, Nørsett & Wanner, *Solving ODEs I*, II.4, p. 169).

    With ``sc = abstol + |u0| reltol`` and ``||.||`` the solve's norm::

        d0 = ||u0 / sc||,  d1 = ||f0 / sc||
        h0 = 0.01 d0 / d1   (1e-6 if d0 or d1 < 1e-5)
        d2 = ||(f(t0 + h0, u0 + h0 f0) - f0) / sc|| / h0
        h1 = (0.01 / max(d1, d2))^(1/p)   (max(1e-6, 1e-3 h0) if max(d1, d2) <= 1e-15)
        h  = min(100 h0, h1, |t1 - t0|, dtmax)

    Costs one evaluation of ``field`` (``f0`` is given) and two host
    synchronisations, once per solve. Returns the magnitude ``h`` (> 0).
    """
    direction = 1.0 if t1 >= t0 else -1.0
    span = abs(t1 - t0)
    scale = u0.abs() * reltol + abstol
    d0, d1 = torch.stack([norm(u0 / scale), norm(f0 / scale)]).detach().tolist()
    if not (math.isfinite(d0) and math.isfinite(d1)):
        return math.nan
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    h0 = min(h0, span, dtmax)
    u1 = u0 + (direction * h0) * f0
    t_probe = scalar_like(t0 + direction * h0, u0)
    f1 = field(u1, t_probe)
    d2 = float(norm((f1 - f0) / scale).detach()) / h0
    if not math.isfinite(d2):
        return h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / order)
    return min(100.0 * h0, h1, span, dtmax)
