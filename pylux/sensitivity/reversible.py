"""Algebraically reversible Runge–Kutta solves: exact discrete gradients at O(1) memory.

McCallum & Foster, "Efficient, accurate and stable gradients for neural ODEs"
(2024): any explicit one-step method with increment
:math:`\\Psi_h(t, z) = \\mathrm{step}_h(t, z) - z` becomes algebraically reversible
by carrying a pair :math:`(Y_n, Z_n)`, :math:`Y_0 = Z_0 = u_0`, and stepping

.. math::
    Y_{n+1} = \\lambda Y_n + (1 - \\lambda) Z_n + \\Psi_{h}(t_n, Z_n), \\qquad
    Z_{n+1} = Z_n - \\Psi_{-h}(t_{n+1}, Y_{n+1}),

with coupling :math:`\\lambda \\in (0, 1]`. The output is :math:`Y_n`, which has
the order of the base method. The step inverts in closed form,

.. math::
    Z_n = Z_{n+1} + \\Psi_{-h}(t_{n+1}, Y_{n+1}), \\qquad
    Y_n = \\lambda^{-1} \\bigl(Y_{n+1} - (1 - \\lambda) Z_n - \\Psi_h(t_n, Z_n)\\bigr),

so the backward pass rebuilds every state from the final pair and needs only
the accepted step sizes from the forward pass: memory is constant in the
number of steps, and the gradient is the exact gradient of the discrete solve
(up to the floating-point error of the reconstruction, which the backward
pass reports). Each step costs two base steps forward and two base steps plus
two vector–Jacobian products backward. :math:`\\lambda < 1` damps the
reconstruction error that :math:`\\lambda = 1` (the asynchronous leapfrog
limit) can let grow.

Adaptive stepping uses the base method's embedded error estimate of the
forward increment :math:`\\Psi_h(t_n, Z_n)`; a rejected step costs one base
step. The solve steps exactly onto every ``saveat`` time, so the saved values
are states of the discrete solve (no interpolation) and their gradients are exact.
"""

from __future__ import annotations

import math

import torch

from ..diffeq import AbstractSensitivityAlgorithm, ODEProblem, Solution
from ..diffeq._device import host_to_device, scalar_like
from ..diffeq.controllers import initial_step_size
from ..diffeq.integrate import (MAX_NONFINITE_STREAK, NONFINITE_SHRINK, CountingField, FixedTimeGrid,
                                _failure_message, _Outcome, clamp_step)
from ..diffeq.norms import ScaledErrorNorm
from ..diffeq.options import SolveOptions
from ..diffeq.solution import ERROR_FOR_RETCODE, ReturnCode, SolverStats
from ..diffeq.solvers import ExplicitRungeKutta, RKState
from ._params import apply_adjoint_function, check_no_hidden_parameters, refuse_higher_order, replace_leaves

__all__ = ["ReversibleAdjoint"]


class ReversibleAdjoint(AbstractSensitivityAlgorithm):
    """Solve with the McCallum–Foster reversible version of an RK method; backprop by reconstruction.

    ``solve(prob, Tsit5(), sensealg=ReversibleAdjoint(coupling=0.999))`` integrates
    with the reversible scheme of the module docstring built around ``Tsit5``
    (or around ``solver`` when given here), adaptive or with a fixed ``dt``.

    Args:
        solver: the base method (an explicit Runge–Kutta solver such as
            ``Tsit5()``, ``DP5()``, ``RK4()``, ``Midpoint()``); default: the
            solver passed to ``solve``.
        coupling: :math:`\\lambda \\in (0, 1]`, default 0.999 (the paper's). The
            reconstruction divides by :math:`\\lambda` once per step, so its rounding
            error grows like :math:`\\lambda^{-n}` over ``n`` steps
            (:math:`0.99^{-2000} \\approx 5 \\cdot 10^{8}`, :math:`0.999^{-2000} \\approx 7`);
            smaller values damp the forward ``Y - Z`` mode harder but suit only
            short solves. ``last_backward_stats["reconstruction_error"]`` tells.
        backprop: if True, backpropagate through every operation of the same
            reversible solve instead (memory grows with the number of steps) —
            the reference the O(1)-memory backward pass is checked against.

    After ``backward()``, ``self.last_backward_stats`` holds ``nf`` (evaluations
    of ``f``), ``nvjp``, ``nsteps`` and ``reconstruction_error``: the largest
    absolute difference between the rebuilt ``(Y_0, Z_0)`` and ``u0``.

    Raises:
        TypeError: a base solver that is not an explicit Runge–Kutta method
            (multistep methods are not one-step maps).
        ValueError: a coupling outside (0, 1].
        NotImplementedError: termination callbacks or ``save_stats=True``
            (use :class:`~pylux.sensitivity.DirectAdjoint`).
    """

    def __init__(self, solver: ExplicitRungeKutta | None = None, *, coupling: float = 0.999,
                 backprop: bool = False) -> None:
        if solver is not None and not isinstance(solver, ExplicitRungeKutta):
            raise TypeError(f"ReversibleAdjoint: the base solver must be an explicit Runge–Kutta method "
                            f"such as Tsit5(), got {solver!r}")
        if isinstance(coupling, bool) or not isinstance(coupling, (int, float)) or not 0 < coupling <= 1:
            raise ValueError(f"ReversibleAdjoint: coupling (lambda) must be in (0, 1], got {coupling!r}")
        if not isinstance(backprop, bool):
            raise TypeError(f"ReversibleAdjoint: backprop must be True or False, got {backprop!r}")
        self.solver = solver
        self.coupling = float(coupling)
        self.backprop = backprop
        self.last_backward_stats: dict | None = None

    def __repr__(self) -> str:
        base = f"{self.solver!r}, " if self.solver is not None else ""
        return f"ReversibleAdjoint({base}coupling={self.coupling}{', backprop=True' if self.backprop else ''})"

    def solve_with(self, problem: ODEProblem, solver, options: SolveOptions) -> Solution:
        base = self.solver if self.solver is not None else solver
        if not isinstance(base, ExplicitRungeKutta):
            raise TypeError(f"ReversibleAdjoint: the base solver must be an explicit Runge–Kutta method "
                            f"such as Tsit5(); {base!r} is not a one-step method")
        if options.callbacks:
            raise NotImplementedError("ReversibleAdjoint: termination callbacks are not supported (the "
                                      "backward pass starts from a fixed final time); use DirectAdjoint()")
        if options.save_stats:
            raise NotImplementedError("ReversibleAdjoint: save_stats=True needs DirectAdjoint(); for "
                                      "error-estimate regularization with this sensealg use "
                                      "LocalErrorRegularization")
        if self.backprop:
            p = problem.p
            run = _reversible_solve(lambda u, t: problem.f(u, p, t), problem.u0, problem.tspan, base,
                                    self.coupling, options)
            return run.solution(base)
        return apply_adjoint_function(_ReversibleFunction, self, problem, base, options)


def _increment_step(base: ExplicitRungeKutta, field, t: float, u: torch.Tensor, dt: float):
    """One base step from ``(t, u)``; its ``u_new - u`` is ``Ψ_dt(t, u)``."""
    return base.step(field, t, u, dt, RKState(None))


def _forward_pair(base, field, coupling: float, t: float, dt: float, t_new: float, y, z, forward_step=None):
    """``(Y_{n+1}, Z_{n+1})`` from ``(Y_n, Z_n)``; ``forward_step`` reuses an already taken Ψ_h(Z_n)."""
    step = forward_step if forward_step is not None else _increment_step(base, field, t, z, dt)
    # λY + (1-λ)Z + (step(Z) - Z) = λ(Y - Z) + step(Z)
    y_new = torch.add(step.u_new, y - z, alpha=coupling) if coupling != 1.0 else step.u_new + (y - z)
    back = _increment_step(base, field, t_new, y_new, -dt)
    z_new = z + y_new - back.u_new
    return y_new, z_new


class _Run:
    """What a reversible forward solve leaves: saved states, accepted steps, the final pair."""

    __slots__ = ("times", "values", "steps", "y", "z", "stats", "retcode", "message", "u0", "time_dtype")

    def solution(self, base) -> Solution:
        like = self.u0
        t = host_to_device(self.times, self.time_dtype, like.device)
        u = torch.stack(self.values) if self.values else like.new_zeros((0,) + tuple(like.shape))
        return Solution(t, u, self.retcode, self.stats, message=self.message, solver=base, u0=like)


def _stop_times(t0: float, t1: float, options: SolveOptions) -> tuple[list[float], set]:
    """Times the solve must step exactly onto (ending with t1), and those whose state is saved."""
    direction = 1.0 if t1 >= t0 else -1.0
    saveat = options.saveat or ()
    stops = sorted({x for x in saveat if x != t0} | {t1}, key=lambda x: direction * x)
    saved = {x for x in saveat if x != t0 and x != t1}
    if options.save_end:
        saved.add(t1)
    return stops, saved


def _reversible_solve(f, u0: torch.Tensor, tspan, base: ExplicitRungeKutta, coupling: float,
                      options: SolveOptions) -> _Run:
    """The forward loop (works with or without autograd): adaptive or fixed steps, stopping on saveat."""
    t0, t1 = tspan
    field = CountingField(f, u0)
    stops, saved = _stop_times(t0, t1, options)
    run = _Run()
    run.u0, run.time_dtype = u0, options.time_dtype
    run.times, run.values, run.steps = [], [], []
    if options.save_start:
        run.times.append(t0)
        run.values.append(u0)
    y = z = u0
    out = _Outcome(t0, u0, 0.0)
    if t0 != t1:
        loop = _adaptive_pairs if options.adaptive else _fixed_pairs
        y, z = loop(field, base, coupling, y, z, t0, t1, stops, saved, options, run, out)
    run.y, run.z = y, z
    run.stats = SolverStats(nf=field.count, naccept=out.naccept, nreject=out.nreject)
    # the accepted steps' t and dt (no gradient), as the other adjoints record them
    run.stats.t = host_to_device([t for t, _, _ in run.steps], options.time_dtype, u0.device)
    run.stats.dt = host_to_device([dt for _, dt, _ in run.steps], options.time_dtype, u0.device)
    failed = out.retcode not in (ReturnCode.Success, ReturnCode.Terminated)
    run.retcode = out.retcode
    run.message = _failure_message(out, options) if failed else out.retcode.message
    if failed and options.throw:
        raise ERROR_FOR_RETCODE[out.retcode](
            run.message + " Pass throw=False to get the partial solution instead of this error.",
            solution=run.solution(base), t=out.t, dt=out.dt)
    return run


def _after_step(run: _Run, t: float, dt: float, t_new: float, y_new, saved: set, everystep: bool,
                t_end: float) -> None:
    run.steps.append((t, dt, t_new))
    if (everystep and t_new != t_end) or t_new in saved:
        run.times.append(t_new)
        run.values.append(y_new)


def _adaptive_pairs(field, base, coupling, y, z, t0, t1, stops, saved, options, run, out):
    direction = 1.0 if t1 > t0 else -1.0
    controller = options.controller
    cstate = controller.init()
    if options.dt is None:
        f0 = field(z, scalar_like(t0, z))
        dt_abs = initial_step_size(field, t0, z, t1, base.order, options.abstol, options.reltol,
                                   options.norm, f0, options.dtmax)
        if math.isnan(dt_abs):
            out.retcode, out.detail = ReturnCode.Unstable, "f(u0, t0) is NaN or Inf"
            return y, z
    else:
        dt_abs = min(options.dt, options.dtmax)
    dt = direction * dt_abs
    error_norm_of = ScaledErrorNorm(options.abstol, options.reltol, options.norm, differentiable=False)
    t, stop_index, streak = t0, 0, 0
    while t != t1:
        if out.naccept + out.nreject >= options.maxiters:
            out.retcode = ReturnCode.MaxIters
            break
        target = stops[stop_index]
        dt_step, t_new = clamp_step(t, dt, target, options.time_dtype)
        out.dt = dt_step
        if t_new == t:
            out.retcode = ReturnCode.DtLessThanMin
            out.detail = f"t + dt == t in {str(options.time_dtype).replace('torch.', '')} time"
            break
        step = _increment_step(base, field, t, z, dt_step)
        e = float(error_norm_of(step, z))  # the one host synchronisation of the step
        if not math.isfinite(e):
            out.nreject += 1
            streak += 1
            dt = dt_step * NONFINITE_SHRINK
            if streak >= MAX_NONFINITE_STREAK or abs(dt) < options.dtmin:
                out.retcode = ReturnCode.Unstable
                out.detail = (f"the step from t = {t!r} produced NaN/Inf {streak} times in a row, "
                              f"shrinking dt down to {dt_step!r}")
                break
            continue
        streak = 0
        accept, dt_next, cstate_new = controller.decide(cstate, e, dt_step)
        if accept:
            y, z = _forward_pair(base, field, coupling, t, dt_step, t_new, y, z, forward_step=step)
            out.naccept += 1
            _after_step(run, t, dt_step, t_new, y, saved, options.save_everystep, t1)
            t, cstate = t_new, cstate_new
            out.t, out.u = t, y
            if t == target and t != t1:
                stop_index += 1
        else:
            out.nreject += 1
        if abs(dt_next) > options.dtmax:
            dt_next = direction * options.dtmax
        if t != t1 and abs(dt_next) < options.dtmin:
            out.retcode, out.dt = ReturnCode.DtLessThanMin, dt_next
            out.detail = (f"the next step dt = {dt_next!r} is below dtmin = {options.dtmin!r}; the last "
                          f"scaled error estimate was {e:.3g}")
            break
        dt = dt_next
    return y, z


def _fixed_pairs(field, base, coupling, y, z, t0, t1, stops, saved, options, run, out):
    finite: list[torch.Tensor] = []
    t = t0
    for target in stops:
        grid = FixedTimeGrid(t, target, options.dt, options.time_dtype)
        for i in range(len(grid) - 1):
            if out.naccept >= options.maxiters:
                out.retcode = ReturnCode.MaxIters
                return y, z
            t_new = grid[i + 1]
            dt = t_new - t
            out.dt = dt
            if dt == 0:
                out.retcode = ReturnCode.DtLessThanMin
                out.detail = "the fixed dt is below the time resolution at this t"
                return y, z
            y, z = _forward_pair(base, field, coupling, t, dt, t_new, y, z)
            finite.append(torch.isfinite(y).all() & torch.isfinite(z).all())
            out.naccept += 1
            _after_step(run, t, dt, t_new, y, saved, options.save_everystep, t1)
            t = t_new
            out.t, out.u = t, y
    if finite and not bool(torch.stack(finite).all()):
        first_bad = int(torch.stack(finite).logical_not().nonzero()[0])
        out.retcode = ReturnCode.Unstable
        start = run.steps[first_bad][0]
        out.detail = (f"the fixed step from t = {start!r} produced NaN/Inf; use a smaller dt or "
                      "adaptive stepping")
    return y, z


class _ReversibleFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, alg, problem, base, options, paths, holder, u0, *params):
        detached = [x.detach() for x in params]
        p = replace_leaves(problem.p, paths, detached) if paths else problem.p
        with torch.no_grad():
            run = _reversible_solve(lambda u, t: problem.f(u, p, t), u0.detach(), problem.tspan, base,
                                    alg.coupling, options)
        sol = run.solution(base)
        holder["solution"] = sol
        ctx.alg, ctx.problem, ctx.base, ctx.paths = alg, problem, base, paths
        ctx.steps, ctx.times, ctx.t0 = run.steps, run.times, problem.tspan[0]
        ctx.backward_stats = holder["backward_stats"]
        ctx.save_for_backward(u0.detach(), run.y, run.z, *detached)
        return sol.u.detach()

    @staticmethod
    def backward(ctx, grad_u):
        refuse_higher_order("ReversibleAdjoint")
        u0, y, z, *params = ctx.saved_tensors
        alg, base, lam = ctx.alg, ctx.base, ctx.alg.coupling
        counter = {"nf": 0, "nvjp": 0}
        with torch.enable_grad():
            ps_ = [x.detach().requires_grad_(True) for x in params]
            p = replace_leaves(ctx.problem.p, ctx.paths, ps_) if ctx.paths else ctx.problem.p
            checked = []

            def field(u, t):
                out = ctx.problem.f(u, p, t)
                if not checked:
                    check_no_hidden_parameters(out, [u, *ps_], where="ReversibleAdjoint: f")
                    checked.append(True)
                counter["nf"] += 1
                return out

            # dL/dY at each saved time (the saved states are Y_n; t0's row is u0 itself)
            grad_at: dict[float, torch.Tensor] = {}
            for row, t in enumerate(ctx.times):
                grad_at[t] = grad_at[t] + grad_u[row] if t in grad_at else grad_u[row]
            grad_start = grad_at.pop(ctx.t0, None) if ctx.times and ctx.times[0] == ctx.t0 else None
            a_y = torch.zeros_like(u0)
            a_z = torch.zeros_like(u0)
            a_theta = [torch.zeros_like(x) for x in params]
            y, z = y.detach(), z.detach()
            for t, dt, t_new in reversed(ctx.steps):
                if t_new in grad_at:
                    a_y = a_y + grad_at.pop(t_new)
                y1 = y.requires_grad_(True)
                back = _increment_step(base, field, t_new, y1, -dt).u_new
                z0 = (z - y1.detach() + back.detach()).requires_grad_(True)  # Z_n = Z_{n+1} + Ψ_{-h}(Y_{n+1})
                fwd = _increment_step(base, field, t, z0, dt).u_new
                y0 = (y1.detach() - fwd.detach()) / lam + z0.detach()
                # adjoint of Z_{n+1} = Z_n + Y_{n+1} - back(Y_{n+1})
                g_back = torch.autograd.grad(back, [y1, *ps_], grad_outputs=a_z, allow_unused=True)
                a_y_total = a_y + a_z - _or_zero(g_back[0], y1)
                # adjoint of Y_{n+1} = λ(Y_n - Z_n) + fwd(Z_n)
                g_fwd = torch.autograd.grad(fwd, [z0, *ps_], grad_outputs=a_y_total, allow_unused=True)
                counter["nvjp"] += 2
                a_y = lam * a_y_total
                a_z = a_z - lam * a_y_total + _or_zero(g_fwd[0], z0)
                for j in range(len(a_theta)):
                    if g_back[j + 1] is not None:
                        a_theta[j] = a_theta[j] - g_back[j + 1]
                    if g_fwd[j + 1] is not None:
                        a_theta[j] = a_theta[j] + g_fwd[j + 1]
                y, z = y0.detach(), z0.detach()
        grad_u0 = a_y + a_z
        if grad_start is not None:
            grad_u0 = grad_u0 + grad_start
        error = torch.maximum((y - u0).abs().max(), (z - u0).abs().max()) if u0.numel() else u0.new_zeros(())
        ctx.backward_stats.update(nf=counter["nf"], nvjp=counter["nvjp"], nsteps=len(ctx.steps),
                                  reconstruction_error=float(error))
        alg.last_backward_stats = ctx.backward_stats
        return (None, None, None, None, None, None, grad_u0, *a_theta)


def _or_zero(g, like):
    return g if g is not None else torch.zeros_like(like)
