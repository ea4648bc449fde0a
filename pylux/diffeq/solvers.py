"""Solvers: one generic explicit Runge–Kutta stepper driven by validated tableaus.

The step contract (stable; the adjoints in ``pylux.sensitivity`` build on it)
------------------------------------------------------------------------------
A solver is immutable. Its two methods are pure functions of their arguments::

    state  = solver.init(term, t0, u0, dt0, f0=None)
    result = solver.step(term, t, u, dt, state)        # -> StepResult

* ``term`` is a :class:`~pylux.diffeq.terms.BoundTerm` (parameters bound):
  ``term.vf(u, t)``, ``term.contr(t0, t1)``, ``term.prod(vf, control)``. A
  plain field ``f(u, t)`` is accepted and treated as an ODE term.
* ``t`` and ``dt`` are 0-d tensors in the time dtype on the state's device
  (host floats are accepted and converted); ``dt`` is signed (negative when
  integrating backward). Their host values, when a stepper wants them for
  Python-side arithmetic, come from the host-side table
  (:func:`~pylux.diffeq._device.host_time`); under ``torch.compile`` the
  same arithmetic runs on the device instead, so a step compiles without
  graph breaks.
* ``result.u_new``: the state at ``t + dt``.
* ``result.error_estimate``: the unscaled local error estimate, a tensor like
  ``u`` (``dt * sum_i e_i k_i`` for an embedded pair), or ``None`` for methods
  without one (Euler, RK4). Computed lazily on first access in eager mode,
  so fixed-step solves that never read it do not pay for it.
* ``result.status``: a :class:`StepStatus` (or a 0-d integer tensor of one):
  ``SUCCESS``; ``REJECT`` — the step failed in a way a smaller step can fix
  (an implicit method's Newton iteration did not converge), so the loop
  rejects it and shrinks ``dt``; ``FAILURE`` — the solve cannot go on
  (``result.reason`` says why).
* ``result.dense_info``: an :class:`~pylux.diffeq.interpolation.AbstractInterpolant`
  over ``[t, t + dt]``.
* ``result.solver_state_new``: the state to pass to the next step if this one
  is accepted; ``result.solver_state_retry``: the state to retry from if it is
  rejected (it may cache ``f(u, t)`` so a retry does not recompute it).
* ``result.nfe``: evaluations of the vector field this step made.
* ``result.du_new``: ``f(u_new, t + dt)`` if the step computed it (FSAL), else ``None``.
* ``result.stiffness_stages``: ``(k_{s-1}, k_s, Y_{s-1}, Y_s)``, the last two
  stage derivatives and stage values, for Shampine's stiffness estimate.
* ``result.error_scale``: ``(u_ref, u_ref_new)``, the states whose magnitudes
  scale the error (default ``(u, u_new)``; a reversible pair scales by the
  base step's own states).

Nothing mutates ``self``; the loop in :mod:`pylux.diffeq.integrate` owns all state.

Order metadata lives on the class: ``order`` (of the propagated solution),
``error_order`` (of the embedded estimate; ``None`` without one) and
``interpolation_order`` (of the dense output). Capabilities are types:
``isinstance(solver, AbstractAdaptiveSolver)`` means it has an error estimate.
"""

from __future__ import annotations

import abc
import enum

from typing import Any, Callable

import torch

from ._device import host_time, time_scalar, time_vector
from .controllers import AbstractController, PIController
from .interpolation import StageInterpolant, linear_combination
from .terms import BoundTerm, as_bound_term
from .tableau import (BS3_TABLEAU, DP5_TABLEAU, EULER_TABLEAU, HEUN_TABLEAU, MIDPOINT_TABLEAU,
                      RK4_TABLEAU, TSIT5_TABLEAU, ButcherTableau)

__all__ = [
    "StepStatus",
    "StepResult",
    "as_step_times",
    "time_add",
    "AbstractSolver",
    "AbstractAdaptiveSolver",
    "ExplicitRungeKutta",
    "RKState",
    "Euler",
    "Midpoint",
    "Heun",
    "RK4",
    "BS3",
    "Tsit5",
    "DP5",
]

VectorField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StepStatus(enum.IntEnum):
    """How a trial step ended (see the module docstring): it may be a 0-d tensor of these values."""

    SUCCESS = 0
    REJECT = 1
    FAILURE = 2


class StepResult:
    """What one step returns (see the module docstring for the contract).

    Either give ``error_estimate`` directly, or ``error_fn(out)`` that computes it
    on demand (writing into ``out`` when that is a tensor, allocating when it
    is ``None``). ``solver_state_retry=None`` means: retry from the state the
    step was given. ``status`` defaults to success; ``reason`` explains a
    ``REJECT`` or ``FAILURE``.
    """

    __slots__ = ("u_new", "_error", "_error_fn", "dense_info", "solver_state_new", "nfe", "du_new",
                 "stiffness_stages", "solver_state_retry", "status", "reason", "error_scale")

    def __init__(self, u_new: torch.Tensor, error_estimate: torch.Tensor | None = None,
                 dense_info: Any = None, solver_state_new: Any = None, nfe: int = 0, *,
                 du_new: torch.Tensor | None = None, stiffness_stages: tuple | None = None,
                 solver_state_retry: Any = None,
                 error_fn: Callable[[torch.Tensor | None], torch.Tensor] | None = None,
                 status: Any = StepStatus.SUCCESS, reason: str = "",
                 error_scale: tuple | None = None) -> None:
        self.u_new = u_new
        self._error = error_estimate
        self._error_fn = error_fn
        self.dense_info = dense_info
        self.solver_state_new = solver_state_new
        self.nfe = nfe
        self.du_new = du_new
        self.stiffness_stages = stiffness_stages
        self.solver_state_retry = solver_state_retry
        self.status = status
        self.reason = reason
        self.error_scale = error_scale

    @property
    def error_estimate(self) -> torch.Tensor | None:
        if self._error is None and self._error_fn is not None:
            self._error = self._error_fn(None)
            self._error_fn = None
        return self._error

    def compute_error_estimate(self, out: torch.Tensor) -> torch.Tensor | None:
        """The error estimate written into ``out`` (a workspace the caller owns), or ``None``.

        Lets the loop avoid allocating a state-sized tensor per step when no
        gradient of the estimate is needed; ``error_estimate`` is unaffected.
        """
        if self._error is not None:
            return self._error
        if self._error_fn is None:
            return None
        return self._error_fn(out)


class AbstractSolver(abc.ABC):
    """Base class of all solvers. Subclasses set ``order``, ``error_order``, ``interpolation_order``."""

    order: int
    error_order: int | None = None
    interpolation_order: int
    #: True when ``step`` returns ``du_new = f(u_new)`` (no extra evaluation for termination checks).
    computes_du_new: bool = False
    #: True when ``init`` needs ``f(u0, t0)`` (it will evaluate it when ``f0`` is not given).
    needs_f0: bool = False

    #: True when the solver has no interpolant of its own, so the loop steps exactly onto every
    #: saveat time instead of interpolating (the reversible pair).
    steps_onto_saveat: bool = False

    #: True when steps run as compiled graphs (``solve(..., compile=True)``): a vector field given to
    #: it must be traceable by ``torch.compile`` (no ``torch.autograd.grad``, no host reads)
    compiled: bool = False

    @abc.abstractmethod
    def init(self, term: BoundTerm, t0, u0: torch.Tensor, dt0, f0: torch.Tensor | None = None) -> Any:
        """Implemented by each concrete subclass."""

    @abc.abstractmethod
    def step(self, term: BoundTerm, t, u: torch.Tensor, dt, state: Any) -> StepResult:
        """Implemented by each concrete subclass."""

    def default_controller(self) -> AbstractController:
        """OrdinaryDiffEq.jl's default PI controller for a method of this order."""
        return PIController.for_order(self.order)

    def for_another_field(self) -> "AbstractSolver":
        """This solver for a different vector field (an adjoint's augmented backward field): without the
        functions the user wrote for the problem's own field (a stiff solver's ``jac`` and ``tgrad``)."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(type(self))


class AbstractAdaptiveSolver(AbstractSolver):
    """A solver with an embedded error estimate: it can run with ``adaptive=True``."""


class RKState:
    """Solver state of an explicit RK method: ``f(u, t)`` at the current point if known."""

    __slots__ = ("f_at_u",)

    def __init__(self, f_at_u: torch.Tensor | None) -> None:
        self.f_at_u = f_at_u


def as_step_times(t, dt, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` and ``dt`` as 0-d time tensors (host floats are converted, float64 time, ``like``'s device)."""
    if not isinstance(t, torch.Tensor):
        t = time_scalar(float(t), torch.float64, like.device)
    if not isinstance(dt, torch.Tensor):
        dt = time_scalar(float(dt), t.dtype, like.device)
    return t, dt


def time_add(t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """``t + dt`` as a time tensor: from the host mirrors in eager mode (registered), on the device when compiling."""
    if torch.compiler.is_compiling():
        return t + dt
    return time_scalar(host_time(t) + host_time(dt), t.dtype, t.device)


def _stage_times(t: torch.Tensor, dt: torch.Tensor, c) -> list[torch.Tensor]:
    """``t + c_i dt`` for every stage: one transfer from host values in eager mode, device arithmetic
    when compiling (where host values do not exist)."""
    if torch.compiler.is_compiling():
        return list((t + torch.tensor(c, dtype=t.dtype, device=t.device) * dt).unbind(0))
    t_h, dt_h = host_time(t), host_time(dt)
    return list(time_vector([t_h + ci * dt_h for ci in c], t.dtype, t.device))


def step_scale(dt: torch.Tensor):
    """``dt`` as the Runge–Kutta methods fold it into their weights: its host float in eager mode
    (fused ``add(alpha=)`` kernels), the device tensor when compiling."""
    return dt if torch.compiler.is_compiling() else host_time(dt)


def scaled_weights(row, scale, like: torch.Tensor) -> list:
    """``scale * row`` as weights for :func:`linear_combination`: floats for a host ``scale``;
    0-d tensor views of one device product for a tensor ``scale`` (zero entries stay 0.0)."""
    if not isinstance(scale, torch.Tensor):
        return [scale * a for a in row]
    vec = torch.tensor(row, dtype=scale.dtype, device=scale.device) * scale
    vec = vec.to(like.dtype)
    return [vec[j] if row[j] != 0 else 0.0 for j in range(len(row))]


class ExplicitRungeKutta(AbstractSolver):
    """The generic explicit Runge–Kutta stepper for a :class:`ButcherTableau`.

    Stage values ``Y_i = u + dt sum_{j<i} a_ij k_j`` are formed as a short chain
    of fused ``add(alpha=)`` ops over the stored stages (no Python loop over
    elements, no copies of the stages). FSAL tableaus reuse the last stage
    ``f(u_new)`` as the next step's first; other tableaus reuse ``f(u, t)`` on
    a retry after a rejected step.

    ``ExplicitRungeKutta(tableau, order=p, error_order=q, interpolation_order=r)``
    runs a custom tableau; the named methods (:class:`Tsit5`, …) are subclasses.
    """

    tableau: ButcherTableau

    def __new__(cls, tableau: ButcherTableau | None = None, **kwargs):
        # a custom tableau with an embedded pair gives an adaptive solver (capabilities are types)
        if cls is ExplicitRungeKutta and isinstance(tableau, ButcherTableau) and tableau.has_error_estimate:
            cls = _AdaptiveExplicitRungeKutta
        return super().__new__(cls)

    def __init__(self, tableau: ButcherTableau | None = None, *, order: int | None = None,
                 error_order: int | None = None, interpolation_order: int | None = None) -> None:
        if tableau is not None:
            if not isinstance(tableau, ButcherTableau):
                raise TypeError(f"ExplicitRungeKutta: tableau must be a ButcherTableau, got "
                                f"{type(tableau).__name__}")
            if order is None:
                raise ValueError("ExplicitRungeKutta(tableau): give order=p, the order of the method")
            self.tableau = tableau
            self.order = order
            if tableau.has_error_estimate:
                self.error_order = error_order if error_order is not None else order - 1
            else:
                self.error_order = None
            self.interpolation_order = interpolation_order if interpolation_order is not None else 1
        elif not hasattr(type(self), "tableau"):
            raise TypeError("ExplicitRungeKutta needs a tableau")

    @property
    def computes_du_new(self) -> bool:  # type: ignore[override]
        return self.tableau.fsal

    @property
    def needs_f0(self) -> bool:  # type: ignore[override]
        return self.tableau.fsal

    def init(self, term, t0, u0, dt0, f0=None):
        if f0 is None and self.tableau.fsal:
            term = as_bound_term(term)
            if term.control_is_time:
                t0, _ = as_step_times(t0, 0.0, u0)
                f0 = term.vf(u0, t0)
        return RKState(f0)

    def advance(self, term, t, u, dt) -> tuple[torch.Tensor, int]:
        """``(u_new, nfe)`` of one step from scratch, without error estimate or dense output.

        An FSAL method skips its last stage ``f(u_new)``, which only serves
        those (and the next step, which a caller of ``advance`` does not take):
        Tsit5 and DP5 cost 6 evaluations instead of 7. Used where only the
        increment is wanted, e.g. the reversible pair's backward increment.
        """
        tab = self.tableau
        if not tab.fsal:
            result = self.step(term, t, u, dt, RKState(None))
            return result.u_new, result.nfe
        term = as_bound_term(term)
        t, dt = as_step_times(t, dt, u)
        _, (_, u_new), _, nfe = self._stages(term, t, u, dt, RKState(None), tab.stages - 1)
        return u_new, nfe

    def _stages(self, term, t, u, dt, state, count):
        """``(stages, (Y_prev, Y_last), scale, nfe)``: the first ``count`` stages ``k_i``, the last two stage values
        formed (with ``count < stages``, ``Y_last`` is ``Y_count``, not evaluated), the dt folded into the weights."""
        tab = self.tableau
        times = _stage_times(t, dt, tab.c[:count] if count < tab.stages else tab.c)
        # an ODE term folds dt into the weights; another term multiplies each stage by its control
        if term.control_is_time:
            scale = step_scale(dt)

            def stage(y, ti):
                return term.vf(y, ti)
        else:
            scale = 1.0
            control = term.contr(t, time_add(t, dt))

            def stage(y, ti):
                return term.vf_prod(y, ti, control)
        nfe = 0
        k1 = state.f_at_u if term.control_is_time else None
        if k1 is None:
            k1 = stage(u, times[0])
            nfe += 1
        stages = [k1]
        y_prev = y_last = u
        for i in range(1, tab.stages):
            y = linear_combination(u, stages, scaled_weights(tab.a[i], scale, u))
            y_prev, y_last = y_last, y
            if i == count:  # the stage value Y_count, whose evaluation is left out
                break
            stages.append(stage(y, times[i]))
            nfe += 1
        return stages, (y_prev, y_last), scale, nfe

    def step(self, term, t, u, dt, state):
        term = as_bound_term(term)
        t, dt = as_step_times(t, dt, u)
        tab = self.tableau
        stages, (y_prev, y_last), scale, nfe = self._stages(term, t, u, dt, state, tab.stages)
        k1 = stages[0]
        if tab.fsal:
            u_new = y_last
        else:
            u_new = linear_combination(u, stages, scaled_weights(tab.b, scale, u))
        error_fn = error = None
        if tab.b_error is not None:
            weights = scaled_weights(tab.b_error, scale, u)

            def error_fn(out):
                return linear_combination(None, stages, weights, out)
            if torch.compiler.is_compiling():
                error, error_fn = error_fn(None), None
        fsal = tab.fsal and term.control_is_time
        return StepResult(
            u_new,
            error,
            dense_info=StageInterpolant(u, scale, stages, tab),
            solver_state_new=RKState(stages[-1] if fsal else None),
            nfe=nfe,
            du_new=stages[-1] if fsal else None,
            stiffness_stages=(stages[-2], stages[-1], y_prev, y_last) if tab.stages > 1 else None,
            solver_state_retry=state if (state.f_at_u is not None or not term.control_is_time) else RKState(k1),
            error_fn=error_fn,
        )


class _AdaptiveExplicitRungeKutta(ExplicitRungeKutta, AbstractAdaptiveSolver):
    pass


class Euler(ExplicitRungeKutta):
    """Forward Euler, ``u_new = u + dt f(u, t)``: order 1, fixed step only (no error estimate).

    Dense output: linear interpolation.
    """

    tableau = EULER_TABLEAU
    order = 1
    error_order = None
    interpolation_order = 1


class Midpoint(_AdaptiveExplicitRungeKutta):
    """Explicit midpoint rule (order 2) with embedded Euler (order 1) for adaptivity.

    Dense output: the free quadratic ``b_1 = theta - theta^2``, ``b_2 = theta^2``.
    """

    tableau = MIDPOINT_TABLEAU
    order = 2
    error_order = 1
    interpolation_order = 2


class Heun(_AdaptiveExplicitRungeKutta):
    """Heun's method (explicit trapezoid, order 2) with embedded Euler for adaptivity.

    Dense output: the free quadratic ``b_1 = theta - theta^2/2``, ``b_2 = theta^2/2``.
    """

    tableau = HEUN_TABLEAU
    order = 2
    error_order = 1
    interpolation_order = 2


class RK4(ExplicitRungeKutta):
    """The classical fourth-order Runge–Kutta method; fixed step only (no embedded pair).

    Dense output: its free third-order continuous extension (Hairer, Nørsett &
    Wanner, *Solving ODEs I*, II.6).
    """

    tableau = RK4_TABLEAU
    order = 4
    error_order = None
    interpolation_order = 3


class BS3(_AdaptiveExplicitRungeKutta):
    """Bogacki–Shampine 3(2), FSAL (Bogacki & Shampine, Appl. Math. Lett. 2, 1989).

    Four stages, three evaluations per step. Dense output: cubic Hermite from
    ``f(u)`` and ``f(u_new)``, both stages of the step (third order).
    """

    tableau = BS3_TABLEAU
    order = 3
    error_order = 2
    interpolation_order = 3


class Tsit5(_AdaptiveExplicitRungeKutta):
    """Tsitouras 5(4), FSAL: the default solver (Tsitouras, Comput. Math. Appl. 62, 2011).

    Seven stages, six evaluations per step. Dense output: Tsitouras' free
    fourth-order interpolant. Default controller: PI with OrdinaryDiffEq's
    ``beta1 = 0.14``, ``beta2 = 0.08``.
    """

    tableau = TSIT5_TABLEAU
    order = 5
    error_order = 4
    interpolation_order = 4


class DP5(_AdaptiveExplicitRungeKutta):
    """Dormand–Prince 5(4), FSAL (Dormand & Prince, J. Comput. Appl. Math. 6, 1980).

    Seven stages, six evaluations per step. Dense output: Shampine's free
    fourth-order interpolant (Math. Comp. 46, 1986). Default controller: PI
    with ``beta1 = 0.17``, ``beta2 = 0.04`` (Hairer's DOPRI5 values, as in
    OrdinaryDiffEq).
    """

    tableau = DP5_TABLEAU
    order = 5
    error_order = 4
    interpolation_order = 4

    def default_controller(self) -> AbstractController:
        beta2 = 0.04
        return PIController(beta1=1.0 / self.order - 0.75 * beta2, beta2=beta2)
