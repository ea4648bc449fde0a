"""VCAB3: the variable-step third-order Adams–Bashforth method.

From the last three points ``t_n, t_{n-1}, t_{n-2}`` with derivatives
``F_n, F_{n-1}, F_{n-2}``, Adams–Bashforth integrates the interpolating
polynomial of ``f`` over the new step (Hairer, Nørsett & Wanner, *Solving
ODEs I*, III.5, variable step sizes). With ``s = t_n + x dt`` and the nodes at
``x_j = (t_{n-j} - t_n) / dt`` (``x_0 = 0``)::

    u_{n+1} = u_n + dt * sum_j w_j F_{n-j},     w_j = int_0^1 L_j(x) dx

where ``L_j`` are the Lagrange basis polynomials on ``{x_0, x_1, x_2}``. The
local error estimate is the difference between this and the second-order
formula on ``{x_0, x_1}`` (it estimates the error of the lower-order formula,
so ``error_order = 2``, and the step propagates the third-order value: local
extrapolation, as in an embedded RK pair)::

    err = dt * sum_j (w_j - v_j) F_{n-j}

The weights are host floats computed from the step history each step (the
coefficients vary with the step sizes; no tensor work). The first two steps
are taken with BS3 (order 3, the same order; OrdinaryDiffEq.jl's VCAB3 starts
the same way). Each Adams step costs one evaluation, ``f(u_{n+1})``, which
becomes the newest history entry; the dense output is the cubic Hermite
interpolant through both ends.
"""

from __future__ import annotations

import torch

from ._device import host_time, time_scalar
from .interpolation import HermiteInterpolant, linear_combination
from .solvers import BS3, AbstractAdaptiveSolver, RKState, StepResult, as_step_times
from .terms import as_bound_term

__all__ = ["VCAB3", "VCAB3State", "adams_bashforth_weights"]


class VCAB3State:
    """History of a VCAB3 solve: up to three ``(t, f(u(t)))`` pairs, newest first."""

    __slots__ = ("times", "derivatives")

    def __init__(self, times: tuple[float, ...], derivatives: tuple[torch.Tensor, ...]) -> None:
        self.times = times
        self.derivatives = derivatives


def adams_bashforth_weights(t: float, dt: float, history_times: tuple[float, float, float]
                            ) -> tuple[tuple[float, float, float], tuple[float, float]]:
    """Variable-step AB3 and AB2 weights ``(w0, w1, w2), (v0, v1)`` (see the module docstring).

    ``history_times = (t_n, t_{n-1}, t_{n-2})`` with ``t_n = t``; ``dt`` signed.
    The returned weights multiply ``dt * F_{n-j}``.
    """
    x1 = (history_times[1] - t) / dt
    x2 = (history_times[2] - t) / dt
    # int_0^1 (x - a)(x - b) dx = 1/3 - (a + b)/2 + a b
    w0 = (1.0 / 3.0 - (x1 + x2) / 2.0 + x1 * x2) / (x1 * x2)
    w1 = (1.0 / 3.0 - x2 / 2.0) / (x1 * (x1 - x2))
    w2 = (1.0 / 3.0 - x1 / 2.0) / (x2 * (x2 - x1))
    v0 = (0.5 - x1) / (-x1)
    v1 = 0.5 / x1
    return (w0, w1, w2), (v0, v1)


class VCAB3(AbstractAdaptiveSolver):
    """Variable-coefficient Adams–Bashforth of order 3 (adaptive; BS3 startup).

    Order 3, error estimate of order 2 (AB3 − AB2), cubic Hermite dense output.
    One evaluation of ``f`` per Adams step, so it is cheap per step but has a
    small stability region: prefer Tsit5 unless evaluations of ``f`` dominate
    and the problem is smooth. Stiffness estimate: ``||F_{n+1} - F_n|| /
    ||u_{n+1} - u_n||`` (a Lipschitz estimate along the step).
    """

    order = 3
    error_order = 2
    interpolation_order = 3
    computes_du_new = True
    needs_f0 = True
    _startup = BS3()

    def init(self, term, t0, u0, dt0, f0=None):
        term = _ode_term(term)
        t0, _ = as_step_times(t0, 0.0, u0)
        if f0 is None:
            f0 = term.vf(u0, t0)
        return VCAB3State((host_time(t0),), (f0,))

    def step(self, term, t, u, dt, state):
        term = _ode_term(term)
        t, dt = as_step_times(t, dt, u)
        # the weights depend on the step history: host arithmetic on the host mirrors of t and dt
        t_h, dt_h = host_time(t), host_time(dt)
        if len(state.times) < 3:
            result = self._startup.step(term, t, u, dt, RKState(state.derivatives[0]))
            new_state = VCAB3State((t_h + dt_h,) + state.times, (result.du_new,) + state.derivatives)
            return StepResult(
                result.u_new, dense_info=result.dense_info, solver_state_new=new_state,
                nfe=result.nfe, du_new=result.du_new, stiffness_stages=result.stiffness_stages,
                solver_state_retry=state, error_fn=lambda out: result.compute_error_estimate(out))
        (w0, w1, w2), (v0, v1) = adams_bashforth_weights(t_h, dt_h, state.times)
        f0, f1, f2 = state.derivatives
        u_new = linear_combination(u, (f0, f1, f2), (dt_h * w0, dt_h * w1, dt_h * w2))
        f_new = term.vf(u_new, time_scalar(t_h + dt_h, t.dtype, t.device))
        error_weights = (dt_h * (w0 - v0), dt_h * (w1 - v1), dt_h * w2)
        return StepResult(
            u_new,
            dense_info=HermiteInterpolant(u, u_new, f0, f_new, dt_h),
            solver_state_new=VCAB3State((t_h + dt_h, t_h, state.times[1]), (f_new, f0, f1)),
            nfe=1,
            du_new=f_new,
            stiffness_stages=(f0, f_new, u, u_new),
            solver_state_retry=state,
            error_fn=lambda out: linear_combination(None, (f0, f1, f2), error_weights, out),
        )


def _ode_term(term):
    term = as_bound_term(term)
    if not term.control_is_time:
        raise TypeError("VCAB3 steps over an ODE term only (its Adams weights integrate f over time); "
                        "use an explicit Runge–Kutta method for a term with another control")
    return term
