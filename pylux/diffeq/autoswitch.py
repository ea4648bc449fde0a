r"""Automatic stiffness switching: a non-stiff and a stiff method in one solve (OrdinaryDiffEq's AutoSwitch).

After every accepted step the problem's stiffness is judged from the step's
own estimate of the dominant eigenvalue ``lambda`` of ``df/du`` against the
explicit method's stability interval ``r`` on the negative real axis. While the
explicit method runs, the estimate comes from its last two stages (Tsit5's and
DP5's are both at ``t + dt``; Hairer & Wanner II, IV.2, p. 22), taken
componentwise, as OrdinaryDiffEq does:

.. math::
    |\lambda| \approx \max_i |k_{s,i} - k_{s-1,i}| \,/\, |Y_{s,i} - Y_{s-1,i}|

(components with ``Y_{s,i} = Y_{s-1,i}`` left out). The quotient of norms
``||k_s - k_{s-1}|| / ||Y_s - Y_{s-1}||`` (what ``sol.stats.stiffness`` records)
averages the stiff components with the others: on Robertson's problem on
``[0, 40]`` at ``rtol = 1e-7, atol = 1e-11`` its ``|lambda dt| / r`` crept from
0.47 to 0.9 over the 2032 steps Tsit5 took at a stability-limited ``dt``; the
componentwise estimate switches after 46.
While the stiff method runs, the estimate is ``||J||_inf`` of its Jacobian
(an upper bound of the spectral radius). The test is

.. math::
    \text{stiff} \iff |\lambda\, \Delta t| / r > \text{tol}.

Successive positive tests are counted up, negative ones down (a positive
count restarts at 1 after a negative test and vice versa); the solve switches
to the stiff method when the count exceeds ``maxstiffstep`` (10) and back when
it falls below ``-maxnonstiffstep`` (-3) — the count-based hysteresis of
OrdinaryDiffEq's ``AutoSwitch`` (Rackauckas & Nie, "Confederated modular
differential equation APIs for accelerated algorithm development and
benchmarking", 2019), with its tolerances ``9/10``. Unlike OrdinaryDiffEq the
step size is not rescaled at a switch (the loop's controller owns ``dt``).

One controller serves both methods, with the non-stiff method's gains (a PI
controller for Tsit5 raises ``E`` to ``beta1 = 0.7/5``). Applied to a stiff
method of another order those gains under-react (Rosenbrock23's error is
``O(dt^3)``: its own controller uses ``beta1 = 0.7/2``), which cost Robertson
at ``rtol = 1e-5`` 253 steps against Rosenbrock23's 187 alone. So a stiff step
hands the loop the scaled error ``E^rho`` instead of ``E``, with ``rho`` the
ratio of the stiff method's exponent to the controller's (PI:
``beta1_stiff / beta1``; I: ``(k + 1) / (k_stiff + 1)`` for error orders ``k``):
``E^rho <= 1`` iff ``E <= 1``, so acceptance is unchanged, and the controller
then proposes the stiff method's own next step (now 156 steps). A stiff step's
entry of ``sol.stats.error_estimate`` (``save_stats=True``) is that ``E^rho``.

``r`` is computed from the explicit method's tableau at construction (the
largest ``r`` with ``|R(-x)| <= 1`` on ``[0, r]`` for the stability polynomial
``R(z) = 1 + sum_k b^T A^k 1 z^(k+1)``: 3.51 for Tsit5), or given.

``sol.stats.alg_choice`` holds the method of every accepted step (0 the
non-stiff, 1 the stiff one); the stiff method's counters (``njac``, ...) are
in ``sol.stats`` too. Reading the previous step's estimate is one small
host transfer per step (it was computed a step earlier, so nothing waits for it).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from .controllers import IController, PIController
from .norms import scaled_error_norm
from .solvers import AbstractAdaptiveSolver, AbstractSolver, ExplicitRungeKutta, StepResult, Tsit5

__all__ = ["AutoSwitch", "stability_interval", "componentwise_stiffness"]


def stability_interval(solver: AbstractSolver) -> float:
    """The explicit method's stability interval on the negative real axis, from its Butcher tableau."""
    tab = getattr(solver, "tableau", None)
    if not isinstance(solver, ExplicitRungeKutta) or tab is None:
        raise ValueError(f"AutoSwitch: cannot compute the stability interval of {type(solver).__name__}(); pass "
                         "stability_size=r (the length of its stability interval on the negative real axis)")
    s = tab.stages
    A = np.zeros((s, s))
    for i, row in enumerate(tab.a):
        A[i, :len(row)] = row
    b = np.array(tab.b)
    coeffs = [1.0]
    power = np.ones(s)
    for _ in range(s):
        coeffs.append(float(b @ power))
        power = A @ power
    xs = np.linspace(0.0, 20.0, 200_001)
    values = np.polyval(coeffs[::-1], -xs)
    outside = np.nonzero(np.abs(values) > 1.0 + 1e-12)[0]
    return float(xs[outside[0] - 1]) if outside.size else float(xs[-1])


def componentwise_stiffness(stages) -> torch.Tensor:
    """``max_i |k_i - k'_i| / |Y_i - Y'_i|`` over the components where ``Y_i != Y'_i``, from
    ``stages = (k', k, Y', Y)`` (two stage derivatives at the same time and their stage values): for
    ``f(u) = A u`` with diagonal ``A`` it is the largest ``|A_ii|`` among the components that differ.
    A 0-d tensor on the state's device (0 when no component differs); no synchronisation."""
    k_prev, k_last, y_prev, y_last = stages
    dy = (y_last - y_prev).abs()
    dk = (k_last - k_prev).abs()
    if dy.numel() == 0:
        return dy.new_zeros(())
    ratio = dk / dy.clamp_min(torch.finfo(dy.dtype).tiny)
    return torch.where(dy > 0, ratio, torch.zeros_like(ratio)).amax()


def _exponent_ratio(controller, stiff: AbstractSolver) -> float:
    """``rho`` of the module docstring: the stiff method's controller exponent over ``controller``'s (1 when
    either is neither a PI nor an I controller)."""
    if isinstance(controller, PIController):
        own = stiff.default_controller()
        return own.beta1 / controller.beta1 if isinstance(own, PIController) else 1.0
    if isinstance(controller, IController) and controller.error_order is not None:
        k_stiff = stiff.error_order or stiff.order
        return (controller.error_order + 1) / (k_stiff + 1)
    return 1.0


class _StiffStepResult(StepResult):
    """A stiff step's result with the scaled error the loop should use (``E^rho``; the loop reads
    ``scaled_error`` before computing ``E`` itself)."""

    __slots__ = ("scaled_error",)

    def __init__(self, result: StepResult, scaled_error: torch.Tensor) -> None:
        super().__init__(result.u_new, result.error_estimate, result.dense_info, result.solver_state_new,
                         result.nfe, du_new=result.du_new, stiffness_stages=result.stiffness_stages,
                         solver_state_retry=result.solver_state_retry, status=result.status,
                         reason=result.reason, error_scale=result.error_scale)
        self.scaled_error = scaled_error


class _SwitchState:
    __slots__ = ("current", "count", "states", "pending", "choices", "f_at_u")

    def __init__(self, current, count, states, pending, choices, f_at_u) -> None:
        self.current, self.count, self.states = current, count, states
        self.pending, self.choices, self.f_at_u = pending, choices, f_at_u


class AutoSwitch(AbstractAdaptiveSolver):
    """Switch between a non-stiff and a stiff method on the stiffness estimate (see the module docstring).

    Args:
        nonstiff: an explicit Runge–Kutta solver (default ``Tsit5()``).
        stiff: a stiff solver (default ``Rosenbrock23()``).
        maxstiffstep: consecutive stiff verdicts before switching to ``stiff`` (default 10).
        maxnonstiffstep: consecutive non-stiff verdicts before switching back (default 3).
        nonstifftol, stifftol: thresholds of ``|lambda dt| / r`` while running the non-stiff / stiff
            method (default 0.9 each).
        stiffalgfirst: start with the stiff method.
        stability_size: ``r``; default computed from the non-stiff method's tableau.

    The order, error order and default controller are the non-stiff method's, so on a non-stiff
    problem the solve takes exactly the non-stiff method's steps.
    """

    def __init__(self, nonstiff: AbstractSolver | None = None, stiff: AbstractSolver | None = None, *,
                 maxstiffstep: int = 10, maxnonstiffstep: int = 3, nonstifftol: float = 0.9,
                 stifftol: float = 0.9, stiffalgfirst: bool = False, stability_size: float | None = None) -> None:
        if nonstiff is None:
            nonstiff = Tsit5()
        if stiff is None:
            from .rosenbrock import Rosenbrock23
            stiff = Rosenbrock23()
        for name, solver in (("nonstiff", nonstiff), ("stiff", stiff)):
            if not isinstance(solver, AbstractAdaptiveSolver):
                raise TypeError(f"AutoSwitch: {name} must be an adaptive pylux solver instance (e.g. Tsit5(), "
                                f"Rosenbrock23()), got {solver!r}")
        for name, value in (("maxstiffstep", maxstiffstep), ("maxnonstiffstep", maxnonstiffstep)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"AutoSwitch: {name} must be an int >= 0, got {value!r}")
        for name, value in (("nonstifftol", nonstifftol), ("stifftol", stifftol)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"AutoSwitch: {name} must be a number > 0, got {value!r}")
        self.nonstiff, self.stiff = nonstiff, stiff
        self.maxstiffstep, self.maxnonstiffstep = maxstiffstep, maxnonstiffstep
        self.nonstifftol, self.stifftol = float(nonstifftol), float(stifftol)
        self.stiffalgfirst = bool(stiffalgfirst)
        self.stability_size = float(stability_size) if stability_size is not None else stability_interval(nonstiff)
        if not self.stability_size > 0:
            raise ValueError(f"AutoSwitch: stability_size must be > 0, got {self.stability_size!r}")
        self.order = nonstiff.order
        self.error_order = nonstiff.error_order
        self.interpolation_order = min(nonstiff.interpolation_order, stiff.interpolation_order)

    needs_f0 = True
    #: ``(abstol, reltol, norm, rho)`` of a bound solve whose stiff steps report ``E^rho``; None: ``E`` itself
    _stiff_error = None

    def for_another_field(self) -> "AutoSwitch":
        """This switch with both methods for a different field (:meth:`AbstractSolver.for_another_field`)."""
        nonstiff, stiff = self.nonstiff.for_another_field(), self.stiff.for_another_field()
        if nonstiff is self.nonstiff and stiff is self.stiff:
            return self
        other = copy.copy(self)
        other.nonstiff, other.stiff = nonstiff, stiff
        return other

    def __repr__(self) -> str:
        return f"AutoSwitch({self.nonstiff!r}, {self.stiff!r})"

    def default_controller(self):
        return self.nonstiff.default_controller()

    def bind_options(self, options) -> "AutoSwitch":
        bound = copy.copy(self)
        for name in ("nonstiff", "stiff"):
            solver = getattr(self, name)
            bind = getattr(solver, "bind_options", None)
            if bind is not None:
                setattr(bound, name, bind(options))
        rho = _exponent_ratio(options.controller, self.stiff)
        bound._stiff_error = None if rho == 1.0 else (options.abstol, options.reltol, options.norm, rho)
        return bound

    def _solvers(self):
        return (self.nonstiff, self.stiff)

    def init(self, term, t0, u0, dt0, f0=None):
        current = 1 if self.stiffalgfirst else 0
        states = [None, None]
        states[current] = self._solvers()[current].init(term, t0, u0, dt0, f0)
        return _SwitchState(current, 0, states, None, [], f0)

    def _judge(self, state: _SwitchState, term, t, u, dt) -> _SwitchState:
        """Apply the previous accepted step's verdict: count, maybe switch (the one host read)."""
        if state.pending is None:
            return state
        estimate, dt_taken, method = state.pending
        state.choices.append(method)
        stiffness = abs(float(estimate) * dt_taken) / self.stability_size
        is_stiff_method = state.current == 1
        stiff_now = stiffness > (self.stifftol if is_stiff_method else self.nonstifftol)
        count = state.count
        count = (1 if count < 0 else count + 1) if stiff_now else (-1 if count > 0 else count - 1)
        current = state.current
        if current == 0 and count > self.maxstiffstep:
            current, count = 1, 0
        elif current == 1 and count < -self.maxnonstiffstep:
            current, count = 0, 0
        states = list(state.states)
        if current != state.current:
            solver, sub = self._solvers()[current], states[current]
            restart = getattr(sub, "restarted", None)
            states[current] = restart(state.f_at_u) if restart is not None else solver.init(term, t, u, dt, state.f_at_u)
        return _SwitchState(current, count, states, None, state.choices, state.f_at_u)

    def step(self, term, t, u, dt, state):
        from ._device import host_time
        state = self._judge(state, term, t, u, dt)
        current = state.current
        solver = self._solvers()[current]
        result = solver.step(term, t, u, dt, state.states[current])
        estimate = getattr(result.solver_state_new, "eigen_estimate", None)
        if estimate is None:
            estimate = (componentwise_stiffness(result.stiffness_stages) if result.stiffness_stages is not None
                        else torch.zeros(()))
        new_states = list(state.states)
        new_states[current] = result.solver_state_new
        retry_states = list(state.states)
        retry_states[current] = (result.solver_state_retry if result.solver_state_retry is not None
                                 else state.states[current])
        result.solver_state_new = _SwitchState(current, state.count, new_states,
                                               (estimate.detach(), host_time(dt), current), state.choices,
                                               result.du_new)
        result.solver_state_retry = _SwitchState(current, state.count, retry_states, None, state.choices,
                                                 state.f_at_u)
        if current == 1 and self._stiff_error is not None:
            abstol, reltol, norm, rho = self._stiff_error
            u_old, u_new = result.error_scale if result.error_scale is not None else (u, result.u_new)
            E = scaled_error_norm(result.error_estimate, u_old, u_new, abstol, reltol, norm)
            result = _StiffStepResult(result, E ** rho)
        return result

    def record_stats(self, stats, state) -> None:
        if not isinstance(state, _SwitchState):
            return
        if state.pending is not None:
            state.choices.append(state.pending[2])
            state.pending = None
        stats.alg_choice = tuple(state.choices)
        for solver, sub in zip(self._solvers(), state.states):
            record = getattr(solver, "record_stats", None)
            if record is not None and sub is not None:
                record(stats, sub)
