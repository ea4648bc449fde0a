"""Step-size controllers and the initial step-size heuristic.

A controller sees the scaled error norm ``E`` of a trial step (a host float:
the loop's one synchronisation per step) and decides accept/reject and the next
step size. Controllers are immutable option objects; their per-solve memory
lives in a :class:`ControllerState` that :meth:`decide` returns anew.

``decide(state, error_norm, dt) -> (accept, dt_next, state_new)``, with ``dt``
and ``dt_next`` signed host floats (their sign is the direction of time).
``step_end(state, t, dt, t_stop, time_dtype) -> (dt_step, t_new, state)`` says where
a trial step from ``t`` ends (never past ``t_stop``, rounded to the time
dtype), and ``start(t0, t1, dt0, time_dtype)`` makes the per-solve state.
Fixed stepping is a controller too, :class:`ConstantStepSize`: it accepts
every step, needs no error estimate (so the loop does not synchronise per
step) and walks the grid ``t0 + i dt``.

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

from ._device import time_scalar

__all__ = [
    "AbstractController",
    "PIController",
    "IController",
    "ConstantStepSize",
    "ControllerState",
    "clamp_step",
    "initial_step_size",
    "hairer_initial_step",
]


def _round_time(value: float, time_dtype: torch.dtype) -> float:
    if time_dtype == torch.float32:
        import numpy as np
        return float(np.float32(value))
    return value


def clamp_step(t: float, dt: float, t1: float, time_dtype: torch.dtype) -> tuple[float, float]:
    """The step actually taken from ``t`` with proposed signed ``dt``: ``(dt_step, t_new)``.

    Never steps past ``t1`` (the step that reaches it ends exactly at ``t1``);
    otherwise ``t_new`` is ``t + dt`` rounded to the time dtype, and ``dt_step =
    t_new - t`` is the representable step (0 when ``t + dt == t``).
    A step that would end within 1 % of its size short of ``t1`` is stretched
    onto ``t1`` (Hairer's DOPRI5 rule, ``x + 1.01 h`` past the end): the
    sliver it would leave is a whole extra step of work for no accuracy.
    """
    reach = 1.01 * dt
    if (dt > 0 and t + reach >= t1) or (dt < 0 and t + reach <= t1):
        return t1 - t, t1
    t_new = _round_time(t + dt, time_dtype)
    return t_new - t, t_new


class FixedTimeGrid:
    """The times ``t0, t0 + dt, ..., t1`` of a fixed-step solve, generated on demand.

    ``t_i = t0 + i dt`` (no accumulated rounding), rounded to the time dtype; a
    ``dt`` that does not divide the span shortens the last step so the grid
    ends exactly at ``t1``. A ratio within 1e-10 of an integer counts as
    dividing (``1 / 0.1`` is 10 steps, not 11). ``len(grid)`` is the number of
    points (steps + 1); nothing is stored, so a tiny ``dt`` costs no memory
    before ``maxiters`` stops it.
    """

    def __init__(self, t0: float, t1: float, dt: float, time_dtype: torch.dtype) -> None:
        self.t0, self.t1, self.time_dtype = t0, t1, time_dtype
        self.step = dt if t1 >= t0 else -dt
        ratio = abs(t1 - t0) / dt
        nearest = round(ratio)
        steps = nearest if abs(ratio - nearest) <= 1e-10 * max(1.0, ratio) else math.ceil(ratio)
        self.steps = max(int(steps), 1)

    def __len__(self) -> int:
        return self.steps + 1

    def __getitem__(self, i: int) -> float:
        if i == self.steps:
            return self.t1
        return _round_time(self.t0 + i * self.step, self.time_dtype)


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
    #: the controller reads the scaled error of each trial step (the loop fetches it: one sync per step)
    needs_error_estimate: bool = True

    def init(self) -> ControllerState:
        return ControllerState(qold=1e-4)

    def start(self, t0: float, t1: float, dt0: float, time_dtype: torch.dtype):
        """The per-solve state; ``dt0`` is the signed first step."""
        return self.init()

    def step_end(self, state, t: float, dt: float, t_stop: float, time_dtype: torch.dtype):
        """``(dt_step, t_new, state)`` of a trial step from ``t`` with proposal ``dt`` (see :func:`clamp_step`)."""
        return (*clamp_step(t, dt, t_stop, time_dtype), state)

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


@dataclass(frozen=True)
class _GridState:
    grid: FixedTimeGrid
    index: int
    dt: float


@dataclass(frozen=True)
class ConstantStepSize(AbstractController):
    """Fixed steps: accept every step; the steps walk the grid ``t0 + i dt`` (see :class:`FixedTimeGrid`).

    The grid restarts at every stop time the loop must step onto (``tstops``,
    or ``saveat`` for a solver without an interpolant): from a stop the steps
    are ``stop + i dt`` again (``tstops=[0.35]`` with ``dt=0.1`` gives
    ``..., 0.3, 0.35, 0.45, ...``). ``solve(...,
    adaptive=False, dt=h)`` uses it; it needs no error estimate, so the loop
    takes no host synchronisation per step.
    """

    qmin: float = 1.0
    qmax: float = 1.0
    gamma: float = 1.0
    needs_error_estimate = False

    def start(self, t0, t1, dt0, time_dtype):
        return _GridState(FixedTimeGrid(t0, t1, abs(dt0), time_dtype), 0, abs(dt0))

    def step_end(self, state, t, dt, t_stop, time_dtype):
        grid, index = state.grid, state.index
        if grid.t1 != t_stop or grid[index] != t:
            grid, index = FixedTimeGrid(t, t_stop, state.dt, time_dtype), 0
        t_new = grid[index + 1]
        return t_new - t, t_new, _GridState(grid, index, state.dt)

    def decide(self, state, error_norm, dt):
        return True, dt, _GridState(state.grid, state.index + 1, state.dt)

    def __repr__(self) -> str:
        return "ConstantStepSize()"


#: :func:`hairer_initial_step` status codes
INITIAL_STEP_OK, INITIAL_F0_NONFINITE, INITIAL_SCALE_UNUSABLE = 0, 1, 2


def hairer_initial_step(vf, t0: torch.Tensor, u0: torch.Tensor, f0: torch.Tensor, span, order: int, abstol,
                        reltol, norm, dtmax: float, direction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hairer's starting step size as tensors, with no host synchronisation, for a compiled loop's graph:
    the formula of :func:`initial_step_size` (which the eager loop uses: its probe time is a host float).

    ``vf(u, t)`` evaluates the field, ``t0`` is a 0-d time tensor, ``span = |t1 - t0|`` (a float or a 0-d
    tensor) and ``direction`` the sign of ``t1 - t0``. Returns ``(h, status)``: the magnitude ``h`` as a
    float64 0-d tensor and a 0-d int64 status, :data:`INITIAL_STEP_OK`, :data:`INITIAL_F0_NONFINITE`
    (``f(u0, t0)`` has NaN/Inf) or :data:`INITIAL_SCALE_UNUSABLE` (``abstol + reltol |u0|`` is zero or
    underflows); ``h`` is NaN unless the status is OK, as the eager heuristic's. The second evaluation
    of ``vf`` always happens (at ``u0`` itself when the status is not OK, so that a failing solve never
    feeds NaN to the field). The scalar arithmetic is
    float64, as the host floats of the eager heuristic were; ``u0 + h0 f0`` is formed in ``u0``'s dtype.
    """
    f64 = torch.float64
    scale = u0.abs() * reltol + abstol
    d0 = _scaled_norm(norm, u0 / scale).detach().to(f64)
    d1 = _scaled_norm(norm, f0 / scale).detach().to(f64)
    f0_finite = torch.isfinite(f0).all()
    scale_usable = torch.isfinite(d0) & torch.isfinite(d1)
    status = torch.where(f0_finite, torch.where(scale_usable, INITIAL_STEP_OK, INITIAL_SCALE_UNUSABLE),
                         INITIAL_F0_NONFINITE)
    usable = status == INITIAL_STEP_OK
    span = torch.as_tensor(span, dtype=f64, device=u0.device)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = torch.minimum(torch.minimum(h0, span), torch.full_like(h0, dtmax))
    h0 = torch.where(usable, h0, torch.full_like(h0, 1e-6))
    signed_h0 = direction * h0
    u1 = torch.where(usable, u0 + signed_h0.to(u0.dtype) * f0, u0)
    t_probe = (t0.to(f64) + signed_h0).to(t0.dtype)
    d2 = _scaled_norm(norm, (vf(u1, t_probe) - f0) / scale).detach().to(f64) / h0
    largest = torch.maximum(d1, d2)
    h1 = torch.where(largest <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / largest) ** (1.0 / order))
    h = torch.minimum(torch.minimum(100.0 * h0, h1), torch.minimum(span, torch.full_like(h0, dtmax)))
    h = torch.where(torch.isfinite(d2), h, h0)
    return torch.where(usable, h, torch.full_like(h, math.nan)), status


def initial_step_problem(status: int, u0: torch.Tensor, abstol) -> str:
    """The message of a :func:`hairer_initial_step` status (``""`` for OK)."""
    if status == INITIAL_F0_NONFINITE:
        return "f(u0, t0) is NaN or Inf"
    if status == INITIAL_SCALE_UNUSABLE:
        return (f"the error scale abstol + reltol |u0| is zero or too small for "
                f"{str(u0.dtype).replace('torch.', '')} (abstol = {abstol!r}); raise abstol")
    return ""


def initial_step_size(field, t0: float, u0: torch.Tensor, t1: float, order: int, abstol, reltol,
                      norm, f0: torch.Tensor, dtmax: float, time_dtype: torch.dtype = torch.float64
                      ) -> tuple[float, str]:
    """Hairer's starting step size (Hairer, Nørsett & Wanner, *Solving ODEs I*, II.4, p. 169).

    With ``sc = abstol + |u0| reltol`` and ``||.||`` the solve's norm::

        d0 = ||u0 / sc||,  d1 = ||f0 / sc||
        h0 = 0.01 d0 / d1   (1e-6 if d0 or d1 < 1e-5)
        d2 = ||(f(t0 + h0, u0 + h0 f0) - f0) / sc|| / h0
        h1 = (0.01 / max(d1, d2))^(1/p)   (max(1e-6, 1e-3 h0) if max(d1, d2) <= 1e-15)
        h  = min(100 h0, h1, |t1 - t0|, dtmax)   (h0 if d2 is not finite)

    Costs one evaluation of ``field`` (``f0`` is given) and two host
    synchronisations, once per solve: the probe time ``t0 + h0`` is a host
    float, as every time the eager loop gives a field (one that reads its time
    on the host, such as an interpolating adjoint's backward field looking up the
    forward dense output, then needs no read-back of its own). A compiled whole
    loop forms the same step in its graph instead (:func:`hairer_initial_step`).
    The norms are formed as ``m ||x / m||`` with ``m = max |x|`` (a norm is
    homogeneous), so a tiny ``abstol`` over a zero state component cannot overflow them.

    Returns:
        ``(h, problem)``: the magnitude ``h > 0`` and ``""``, or ``(nan, why)``
        when ``f(u0, t0)`` is NaN/Inf or the error scale itself is unusable.
    """
    direction = 1.0 if t1 >= t0 else -1.0
    span = abs(t1 - t0)
    scale = u0.abs() * reltol + abstol
    d0, d1, f0_finite = torch.stack([_scaled_norm(norm, u0 / scale), _scaled_norm(norm, f0 / scale),
                                     torch.isfinite(f0).all().to(u0.dtype)]).detach().tolist()
    if not f0_finite:
        return math.nan, initial_step_problem(INITIAL_F0_NONFINITE, u0, abstol)
    if not (math.isfinite(d0) and math.isfinite(d1)):
        return math.nan, initial_step_problem(INITIAL_SCALE_UNUSABLE, u0, abstol)
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    h0 = min(h0, span, dtmax)
    u1 = u0 + (direction * h0) * f0
    t_probe = time_scalar(t0 + direction * h0, time_dtype, u0.device)
    f1 = field.vf(u1, t_probe) if hasattr(field, "vf") else field(u1, t_probe)
    d2 = float(_scaled_norm(norm, (f1 - f0) / scale).detach()) / h0
    if not math.isfinite(d2):
        return h0, ""
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / order)
    return min(100.0 * h0, h1, span, dtmax), ""


def _scaled_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` as ``m * norm(x / m)``, ``m = max |x|``: no overflow from squaring huge entries."""
    if x.numel() == 0:
        return norm(x)
    m = x.detach().abs().amax()
    safe = torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))
    return norm(x / safe) * safe
