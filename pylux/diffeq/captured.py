"""``solve(..., compile=True)`` with the whole adaptive loop in one compiled graph.

For the common case — an adaptive FSAL Runge–Kutta method (``Tsit5()``,
``DP5()``, ``BS3()``) with an integral or PI controller, an ODE problem, no
callbacks, ``tstops`` or per-step records, values wanted at ``saveat`` times
and the ends — the loop itself moves to the device: a
``torch._higher_order_ops.while_loop`` whose body is one trial step of the
solver (:meth:`ExplicitRungeKutta.step`, traced), the scaled error norm, the
controller's proposal, accept/reject by ``torch.where``, the dense-output
values at the ``saveat`` times the step passes, and the stopping conditions.
The host starts it (Hairer's initial step, the first evaluation of ``f``
checked as in every solve) and reads it back once at the end: the solve costs
one graph launch and one synchronisation instead of one of each per step,
which is where a small problem spends its time (``benchmarks/suite.py`` P1).

The body reproduces the eager loop's rules (:mod:`pylux.diffeq.integrate`)
exactly: the step that reaches within 1 % of ``t1`` ends on it; the
controller formulas of :mod:`pylux.diffeq.controllers` on device scalars; a
NaN/Inf error estimate rejects and shrinks ``dt`` by ``NONFINITE_SHRINK``, and
``MAX_NONFINITE_STREAK`` of them in a row end the solve as ``Unstable``; a
proposal below ``dtmin`` ends it as ``DtLessThanMin``, as does ``t + dt == t``;
``maxiters`` counts accepted and rejected steps. The step sequence equals the
eager solve's up to the rounding of device against host time arithmetic.
``saveat`` values come from the method's own interpolant, so they equal the
eager ones to round-off.

Gradients: autograd differentiates through the loop (``DirectAdjoint`` /
``sensealg=None``); ``torch.where`` routes them through the accepted steps only.
Autograd keeps every trial step's tensors, as backpropagation through an eager
solve does.

Anything else (fixed steps, other controllers, callbacks, ``save_everystep``,
``dense=True``, ``save_stats``) runs the per-step compiled path of
:mod:`pylux.diffeq.compiled` instead, as does a problem whose loop fails to
compile (one warning).
"""

from __future__ import annotations

import warnings

import torch

from .controllers import IController, PIController
from .norms import scaled_error_norm
from .solvers import RKState
from .solution import ReturnCode
from .terms import BoundTerm

__all__ = ["captured_run", "capture_refusal"]

# loop status codes (device int64)
_RUNNING, _DONE, _MAXITERS, _DTMIN, _UNSTABLE, _RESOLUTION = range(6)

#: compiled whole-solve functions, per configuration of constants (tensors are arguments)
_CACHE: dict = {}

#: why a configuration failed to compile (its later solves go step by step without retrying)
_REFUSED: dict = {}

#: the saveat targets a step evaluates, at most (each costs a dense-output evaluation per trial step)
MAX_CAPTURED_SAVEAT = 64


def capture_refusal(solver, options, field) -> str | None:
    """Why the whole-loop path cannot run this solve (``None`` when it can)."""
    base = solver.base
    tableau = getattr(base, "tableau", None)
    controller = options.controller
    if tableau is None or not tableau.fsal or tableau.b_error is None or tableau.dense is None:
        return "the method is not an adaptive FSAL Runge–Kutta method with dense output"
    if type(controller) not in (IController, PIController):
        return "the controller is neither IController nor PIController"
    if not field.control_is_time or hasattr(field.term, "terms"):
        return "the problem is not an ODE"
    if options.callbacks or options.tstops or options.save_everystep or options.dense:
        return "callbacks, tstops, save_everystep or dense output need the step-by-step loop"
    if options.save_stats or options.save_steps:
        return "per-step records need the step-by-step loop"
    if len(options.saveat or ()) > MAX_CAPTURED_SAVEAT:
        return f"more than {MAX_CAPTURED_SAVEAT} saveat times"
    return None


def _dense_weights(P: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``b_i(theta) = sum_m P[i, m] theta^(m+1)`` for a vector ``theta``: ``(len(theta), stages)``."""
    powers = theta.unsqueeze(1) ** torch.arange(1, P.shape[1] + 1, dtype=theta.dtype, device=theta.device)
    return powers @ P.t()


def _controller_update(controller, E, dt_step, qold, accept):
    """The proposal ``dt_next`` and the new ``qold`` (:mod:`pylux.diffeq.controllers`, on device scalars)."""
    lo, hi = 1.0 / controller.qmax, 1.0 / controller.qmin
    safe_E = torch.where(torch.isfinite(E), E, torch.ones_like(E))
    if isinstance(controller, PIController):
        q11 = safe_E ** controller.beta1
        q = torch.clamp(q11 / qold ** controller.beta2 / controller.gamma, lo, hi)
        steady = (q >= controller.qsteady_min) & (q <= controller.qsteady_max)
        q_accept = torch.where(steady, torch.ones_like(q), q)
        q_reject = torch.clamp(q11 / controller.gamma, max=hi)
        q = torch.where(accept, q_accept, q_reject)
        qold = torch.where(accept, torch.clamp(safe_E, min=controller.qoldinit), qold)
    else:
        q = torch.clamp(safe_E ** (1.0 / (controller.error_order + 1)) / controller.gamma, lo, hi)
        steady = accept & (q >= controller.qsteady_min) & (q <= controller.qsteady_max)
        q = torch.where(steady, torch.ones_like(q), q)
        qold = qold.clone()  # a loop output may not alias its input
    return dt_step / q.to(dt_step.dtype), qold


def _build(base, controller, reltol, norm, direction, dtmin, dtmax, maxiters, n_targets, shrink, streak_max):
    tableau = base.tableau
    P_rows = [list(map(float, row)) for row in tableau.dense]
    width = max(len(row) for row in P_rows)
    P_host = [row + [0.0] * (width - len(row)) for row in P_rows]

    def whole_solve(term, u0, k0, t0, dt0, t1, abstol, targets):
        t1, targets = t1.clone(), targets.clone()  # the loop's inputs may not alias (views of one transfer)
        P = torch.tensor(P_host, dtype=u0.dtype, device=u0.device)
        zero = torch.zeros((), dtype=torch.int64, device=u0.device)
        qold0 = torch.full((), getattr(controller, "qoldinit", 1.0), dtype=u0.dtype, device=u0.device)
        # autograd through while_loop follows only carried tensors that require grad from the first iteration:
        # u, k and the saved values are tied to (u0, k0) by a select that takes nothing from the other branch
        never = torch.zeros((), dtype=torch.bool, device=u0.device)
        u_init, k_init = torch.where(never, k0, u0), torch.where(never, u0, k0)
        saved0 = torch.where(never, k_init.reshape(1, -1), u0.new_zeros((n_targets, u0.numel())))
        written0 = torch.zeros(n_targets, dtype=torch.bool, device=u0.device)

        def cond(t, dt, u, k, qold, nacc, nrej, streak, status, saved, written):
            return status == _RUNNING

        def body(t, dt, u, k, qold, nacc, nrej, streak, status, saved, written):
            reach = direction * (t + 1.01 * dt - t1) >= 0
            dt_step = torch.where(reach, t1 - t, dt)
            t_new = torch.where(reach, t1, t + dt_step)
            moves = t_new != t
            result = base.step(term, t, u, dt_step, RKState(k))
            u_new = result.u_new
            # the controller is not differentiated (as in the eager loop, whose dt are host floats)
            E = scaled_error_norm(result.error_estimate, u, u_new, abstol, reltol, norm).detach()
            finite = torch.isfinite(E)
            accept = finite & (E <= 1.0) & moves
            dt_next, qold_new = _controller_update(controller, E, dt_step, qold, accept)
            dt_next = torch.where(finite, dt_next, dt_step * shrink)
            dt_next = torch.clamp(dt_next.abs(), max=dtmax) * direction
            streak_new = torch.where(finite, torch.zeros_like(streak), streak + 1)
            t_out = torch.where(accept, t_new, t)
            u_out = torch.where(accept, u_new, u)
            k_out = torch.where(accept, result.solver_state_new.f_at_u, k)
            nacc_new = nacc + accept.to(torch.int64)
            nrej_new = nrej + (~accept & moves).to(torch.int64)
            if n_targets:
                theta = ((targets - t) / dt_step).to(u.dtype)
                passed = accept & (direction * targets > direction * t) & (direction * targets <= direction * t_new)
                stages = torch.stack([s.reshape(-1) for s in result.dense_info.stages])
                values = u.reshape(1, -1) + (_dense_weights(P, theta) * dt_step.to(u.dtype)) @ stages
                saved = torch.where(passed.unsqueeze(1), values, saved)
                written = written | passed
            else:
                saved, written = saved.clone(), written.clone()
            running = t_out != t1
            new_status = torch.where(~moves, _RESOLUTION, _RUNNING)
            new_status = torch.where((new_status == _RUNNING) & ~finite & ((streak_new >= streak_max)
                                                                           | (dt_next.abs() < dtmin)),
                                     _UNSTABLE, new_status)
            new_status = torch.where((new_status == _RUNNING) & running & (dt_next.abs() < dtmin), _DTMIN,
                                     new_status)
            new_status = torch.where((new_status == _RUNNING) & running & (nacc_new + nrej_new >= maxiters),
                                     _MAXITERS, new_status)
            new_status = torch.where((new_status == _RUNNING) & ~running, _DONE, new_status)
            return (t_out, dt_next, u_out, k_out, qold_new, nacc_new, nrej_new, streak_new, new_status,
                    saved, written)

        from torch._higher_order_ops.while_loop import while_loop
        # loop inputs must not alias one another (t0 and dt0 are views of one transfer)
        return while_loop(cond, body, (t0.clone(), dt0.clone(), u_init, k_init, qold0, zero, zero.clone(),
                                       zero.clone(), zero.clone(), saved0, written0))
    return whole_solve


def _norm_key(norm):
    """The norm itself where it hashes (by value for :class:`~pylux.diffeq.MixedNorm`, which every backward
    pass builds anew), else its identity; the key holds the object, so an id is never reused."""
    try:
        hash(norm)
    except TypeError:
        return ("unhashable", id(norm))
    return norm


def _compiled(key, build_args, mode):
    if key not in _CACHE:
        fn = _build(*build_args)
        _CACHE[key] = torch.compile(fn, fullgraph=True, dynamic=False,
                                    mode=None if mode in ("default", "reduce-overhead") else mode)
    return _CACHE[key]


def captured_run(loop, out, dt: float) -> bool:
    """Run ``loop``'s solve (a :class:`pylux.diffeq.integrate._Loop` after its first step) as one compiled
    while-loop; fill ``out`` and the loop's saver. ``False`` (nothing done) when the solve is not eligible
    or the loop does not compile (then with one warning, and the step-by-step path runs)."""
    from .integrate import MAX_NONFINITE_STREAK, NONFINITE_SHRINK

    solver, options, field = loop.solver, loop.options, loop.field
    if solver.whole_loop_refusal is not None or capture_refusal(solver, options, field) is not None:
        return False
    u0, t0, t1 = loop.u0, loop.t0, loop.t1
    controller = options.controller
    targets_host = list(loop.saver.targets)
    time_dtype, device = options.time_dtype, u0.device
    key = (type(solver.base), id(solver.base.tableau), controller, options.reltol, _norm_key(options.norm), loop.direction,
           options.dtmin, options.dtmax, options.maxiters, len(targets_host), solver.mode)
    build_args = (solver.base, controller, options.reltol, options.norm, loop.direction, options.dtmin,
                  options.dtmax, options.maxiters, len(targets_host), NONFINITE_SHRINK, MAX_NONFINITE_STREAK)
    abstol = options.abstol
    abstol = abstol if isinstance(abstol, torch.Tensor) else torch.full((), float(abstol), dtype=u0.dtype,
                                                                         device=device)
    times = torch.tensor([t0, dt, t1] + targets_host, dtype=time_dtype).to(device)
    plain = BoundTerm(field.term, field.p)  # a counter's changing integer would be a guard
    refused = _REFUSED.get(key)
    if refused is not None:
        solver.whole_loop_refusal = refused
        return False
    try:
        fn = _compiled(key, build_args, solver.mode)
        result = fn(plain, u0, loop.state.f_at_u, times[0], times[1], times[2], abstol, times[3:])
    except Exception as err:  # noqa: BLE001 - any compile failure means: run the step-by-step path
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        solver.whole_loop_refusal = _REFUSED[key] = f"{type(err).__name__}: {first_line}"
        warnings.warn(f"solve(compile=True): the whole loop could not be compiled ({solver.whole_loop_refusal}); "
                      "compiling step by step instead", RuntimeWarning, stacklevel=3)
        return False
    t, dt_last, u, k, _, nacc, nrej, _, status, saved, written = result
    host = torch.stack([t.double(), dt_last.double(), nacc.double(), nrej.double(), status.double()]).tolist()
    t_end, dt_end, n_acc, n_rej, code = host[0], host[1], int(host[2]), int(host[3]), int(host[4])
    field.count += (solver.base.tableau.stages - 1) * (n_acc + n_rej)
    if targets_host:
        keep = written.tolist()
        inside = [x for x, w in zip(targets_host, keep) if w]
        if inside:
            index = torch.tensor([i for i, w in enumerate(keep) if w], device=device)
            loop.saver.times.extend(inside)
            loop.saver.blocks.append(saved.index_select(0, index).reshape((len(inside),) + tuple(u0.shape)))
    out.t, out.u, out.dt, out.naccept, out.nreject = t_end, u, dt_end, n_acc, n_rej
    out.solver_state = RKState(k)
    _set_return_code(out, code, options, t_end, dt_end)
    solver.compiled_steps += n_acc + n_rej
    return True


def _set_return_code(out, code: int, options, t: float, dt: float) -> None:
    if code == _MAXITERS:
        out.stop(ReturnCode.MaxIters)
    elif code == _DTMIN:
        out.stop(ReturnCode.DtLessThanMin, f"the next step dt = {dt!r} is below dtmin = {options.dtmin!r}")
    elif code == _RESOLUTION:
        out.stop(ReturnCode.DtLessThanMin, f"t + dt == t in {str(options.time_dtype).replace('torch.', '')} time")
    elif code == _UNSTABLE:
        out.stop(ReturnCode.Unstable, f"the step from t = {t!r} produced NaN/Inf repeatedly, shrinking dt "
                 f"down to {dt!r}")
