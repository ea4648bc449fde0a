"""``solve(..., compile=True)`` with the whole adaptive loop in one compiled graph.

For the common case — an adaptive FSAL Runge–Kutta method (``Tsit5()``,
``DP5()``, ``BS3()``) with an integral or PI controller, an ODE problem, no
callbacks, ``tstops`` or per-step records, values wanted at ``saveat`` times
and the ends — the loop itself moves to the device: a
``torch._higher_order_ops.while_loop`` whose body is one trial step of the
solver (:meth:`ExplicitRungeKutta.step`, traced), the scaled error norm, the
controller's proposal, accept/reject by ``torch.where``, the dense-output
values at the ``saveat`` times the step passes, and the stopping conditions.
The host starts it (the first evaluation of ``f``, checked as in every solve;
Hairer's initial step is formed in the graph, one more evaluation there) and
reads it back once at the end: the solve costs one graph launch and one
synchronisation instead of one of each per step,
which is where a small problem spends its time (``benchmarks/suite.py`` P1).

The body reproduces the eager loop's rules (:mod:`pylux.diffeq.integrate`)
exactly: the step that reaches within 1 % of ``t1`` ends on it; the
controller formulas of :mod:`pylux.diffeq.controllers` on device scalars; a
NaN/Inf error estimate rejects and shrinks ``dt`` by ``NONFINITE_SHRINK``, and
``MAX_NONFINITE_STREAK`` of them in a row end the solve as ``Unstable``; a
proposal below the floor (``dtmin``, or 4 ulps of ``|t|`` if larger) is raised
to it and a rejected step no longer than the floor ends the solve as
``DtLessThanMin``, as does ``t + dt == t``;
``maxiters`` counts accepted and rejected steps. The step sequence equals the
eager solve's up to the rounding of device against host time arithmetic.
``saveat`` values come from the method's own interpolant, so they equal the
eager ones to round-off.

Gradients: autograd differentiates through the loop (``DirectAdjoint`` /
``sensealg=None``); ``torch.where`` routes them through the accepted steps only.
Autograd keeps every trial step's tensors, as backpropagation through an eager
solve does.

The Rosenbrock methods (``Rosenbrock23()``, ``Rodas5P()``) run the same loop:
their step has no iteration and no host decision, so the body is the eager
:meth:`step` traced, with ``J`` and ``f_t`` formed in the graph
(:meth:`pylux.diffeq.jacobian.JacobianEvaluator._traced`: the user's ``jac``, or
forward mode), ``I - h gamma J`` factorised and each stage solved by
substitution on the factors, both unrolled over the block size
(``TRACED_SUBSTITUTION_LIMIT``; ``lu_factor_ex`` would be an external call per
step), which the compiler fuses with the stages. A
step the method rejects (a singular or non-finite Newton matrix) is retried at
half the step, as in the eager loop. Before the loop a user ``jac`` is called
once (its shape is checked) or ``f`` is evaluated once with autograd (a field
whose output has no graph gets finite differences, as eagerly); a rejected
step's retry forms ``J`` again where the eager loop reuses it, so ``njac``
counts trial steps. Forward solves only: autograd does not
differentiate the factorisation inside a ``while_loop``, so a solve whose
inputs need a gradient runs eagerly (one warning). On the Robertson problem
the compiled Rosenbrock23 loop takes ~5 ms against ~85 ms eagerly
(``benchmarks/stiff.py --compile``).

Anything else (fixed steps, other controllers, callbacks, ``save_everystep``,
``dense=True``, ``save_stats``) runs the per-step compiled path of
:mod:`pylux.diffeq.compiled` instead, as does a problem whose loop fails to
compile (one warning).
"""

from __future__ import annotations

import types
import warnings

import torch
from torch.utils._pytree import tree_leaves

from .controllers import (INITIAL_F0_NONFINITE, INITIAL_SCALE_UNUSABLE, INITIAL_STEP_OK, IController, PIController,
                          hairer_initial_step, initial_step_problem)
from .norms import scaled_error_norm
from ._device import time_scalar
from .jacobian import StiffState
from .options import RESOLUTION_ULPS, step_floor
from .solvers import RKState
from .solution import ReturnCode
from .terms import BoundTerm

__all__ = ["captured_run", "capture_refusal"]

# loop status codes (device int64)
_RUNNING, _DONE, _MAXITERS, _DTMIN, _UNSTABLE, _RESOLUTION, _SOLVER_REJECTS, _F0_NONFINITE, _SCALE_UNUSABLE = range(9)

#: compiled whole-solve functions, per configuration of constants (tensors are arguments)
_CACHE: dict = {}

#: the configurations whose C++-wrapped loop failed to compile (they compile with the Python wrapper)
_PYTHON_WRAPPED: set = set()

#: why a configuration failed to compile (its later solves go step by step without retrying)
_REFUSED: dict = {}

#: the saveat targets a step evaluates, at most (each costs a dense-output evaluation per trial step)
MAX_CAPTURED_SAVEAT = 64


def capture_refusal(solver, options, field) -> str | None:
    """Why the whole-loop path cannot run this solve (``None`` when it can)."""
    base = solver.base
    tableau = getattr(base, "tableau", None)
    controller = options.controller
    if getattr(base, "captures_whole_loop", False):
        if getattr(base.jacobian, "structure", None) == "matrix_free":
            return "a matrix-free Jacobian (GMRES) iterates; pass jac_structure='dense' or 'batched'"
    elif tableau is None or not getattr(tableau, "fsal", False) or tableau.b_error is None or tableau.dense is None:
        return "the method is not an adaptive FSAL Runge–Kutta method with dense output"
    if type(controller) not in (IController, PIController):
        return "the controller is neither IController nor PIController"
    if not field.control_is_time or hasattr(field.term, "terms"):
        return "the problem is not an ODE"
    if options.callbacks or options.tstops or options.save_everystep or options.dense:
        return "callbacks, tstops, save_everystep or dense output need the step-by-step loop"
    if options.save_stats or options.save_steps:
        return "per-step records need the step-by-step loop"
    if options.force_dtmin:
        return "force_dtmin needs the step-by-step loop"
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


def _build(base, controller, norm, direction, dtmin, dtmax, maxiters, n_targets, shrink, streak_max,
           make_state, reject_shrink, initial_order):
    dense_rows = getattr(base.tableau, "dense", None)  # a Runge–Kutta interpolant's weight polynomials
    P_host = None
    if dense_rows is not None:
        P_rows = [list(map(float, row)) for row in dense_rows]
        width = max(len(row) for row in P_rows)
        P_host = [row + [0.0] * (width - len(row)) for row in P_rows]

    def whole_solve(term, u0, k0, t0, dt0, t1, abstol, reltol, targets):
        t1, targets = t1.clone(), targets.clone()  # the loop's inputs may not alias (views of one transfer)
        P = torch.tensor(P_host, dtype=u0.dtype, device=u0.device) if P_host is not None else None
        zero = torch.zeros((), dtype=torch.int64, device=u0.device)
        qold0 = torch.full((), getattr(controller, "qoldinit", 1.0), dtype=u0.dtype, device=u0.device)
        # autograd through while_loop follows only carried tensors that require grad from the first iteration:
        # u, k and the saved values are tied to (u0, k0) by a select that takes nothing from the other branch
        never = torch.zeros((), dtype=torch.bool, device=u0.device)
        u_init, k_init = torch.where(never, k0, u0), torch.where(never, u0, k0)
        saved0 = torch.where(never, k_init.reshape(1, -1), u0.new_zeros((n_targets, u0.numel())))
        written0 = torch.zeros(n_targets, dtype=torch.bool, device=u0.device)
        status0 = zero.clone()
        resolution = RESOLUTION_ULPS * torch.finfo(t0.dtype).eps

        def floor(t):  # options.step_floor on a device scalar
            return torch.clamp(t.abs() * resolution, min=dtmin)

        if initial_order is not None:  # Hairer's first step in the graph: no eager evaluation or read-back
            h, problem = hairer_initial_step(term.vf, t0, u0, k0, (t1 - t0).abs(), initial_order, abstol, reltol,
                                             norm, dtmax, direction)
            dt0 = (direction * torch.maximum(h.to(t0.dtype), floor(t0))).to(t0.dtype)
            status0 = torch.where(problem == INITIAL_STEP_OK, _RUNNING,
                                  torch.where(problem == INITIAL_F0_NONFINITE, _F0_NONFINITE, _SCALE_UNUSABLE))

        def cond(t, dt, u, k, qold, nacc, nrej, streak, status, saved, written):
            return status == _RUNNING

        def body(t, dt, u, k, qold, nacc, nrej, streak, status, saved, written):
            reach = direction * (t + 1.01 * dt - t1) >= 0
            dt_step = torch.where(reach, t1 - t, dt)
            t_new = torch.where(reach, t1, t + dt_step)
            moves = t_new != t
            result = base.step(term, t, u, dt_step, make_state(k))
            u_new = result.u_new
            # the controller is not differentiated (as in the eager loop, whose dt are host floats)
            E = scaled_error_norm(result.error_estimate, u, u_new, abstol, reltol, norm).detach()
            finite = torch.isfinite(E)
            # a step the method itself rejects (a singular Newton matrix) is retried at half the step, with
            # neither the controller's memory nor the NaN streak changed (the eager loop's reject_status)
            method_ok = result.status == 0 if isinstance(result.status, torch.Tensor) else torch.ones_like(finite)
            finite = finite | ~method_ok
            accept = finite & (E <= 1.0) & moves & method_ok
            dt_next, qold_new = _controller_update(controller, E, dt_step, qold, accept)
            dt_next = torch.where(finite, dt_next, dt_step * shrink)
            dt_next = torch.where(method_ok, dt_next, dt_step * reject_shrink)
            at_floor = torch.minimum(dt_step.abs(), dt.abs()) <= floor(t)  # a rejection here cannot shrink it
            streak_new = torch.where(~method_ok, streak, torch.where(finite, torch.zeros_like(streak), streak + 1))
            t_out = torch.where(accept, t_new, t)
            dt_next = torch.maximum(torch.clamp(dt_next.abs(), max=dtmax), floor(t_out).to(dt_next.dtype)) * direction
            u_out = torch.where(accept, u_new, u)
            k_out = torch.where(accept, result.solver_state_new.f_at_u, k)
            nacc_new = nacc + accept.to(torch.int64)
            nrej_new = nrej + (~accept & moves).to(torch.int64)
            if n_targets:
                theta = ((targets - t) / dt_step).to(u.dtype)
                passed = accept & (direction * targets > direction * t) & (direction * targets <= direction * t_new)
                if P is not None:
                    stages = torch.stack([s.reshape(-1) for s in result.dense_info.stages])
                    values = u.reshape(1, -1) + (_dense_weights(P, theta) * dt_step.to(u.dtype)) @ stages
                else:
                    values = result.dense_info.evaluate(list(theta.unbind(0))).reshape(n_targets, -1)
                saved = torch.where(passed.unsqueeze(1), values, saved)
                written = written | passed
            else:
                saved, written = saved.clone(), written.clone()
            running = t_out != t1
            new_status = torch.where(~moves, _RESOLUTION, _RUNNING)
            new_status = torch.where((new_status == _RUNNING) & ~finite & ((streak_new >= streak_max) | at_floor),
                                     _UNSTABLE, new_status)
            new_status = torch.where((new_status == _RUNNING) & running & ~method_ok & at_floor,
                                     _SOLVER_REJECTS, new_status)
            new_status = torch.where((new_status == _RUNNING) & running & ~accept & at_floor, _DTMIN, new_status)
            new_status = torch.where((new_status == _RUNNING) & running & (nacc_new + nrej_new >= maxiters),
                                     _MAXITERS, new_status)
            new_status = torch.where((new_status == _RUNNING) & ~running, _DONE, new_status)
            return (t_out, dt_next, u_out, k_out, qold_new, nacc_new, nrej_new, streak_new, new_status,
                    saved, written)

        from torch._higher_order_ops.while_loop import while_loop
        # loop inputs must not alias one another (t0 and dt0 are views of one transfer)
        return while_loop(cond, body, (t0.clone(), dt0.clone(), u_init, k_init, qold0, zero, zero.clone(),
                                       zero.clone(), status0, saved0, written0))
    return whole_solve


def _norm_key(norm):
    """The norm itself where it hashes (by value for :class:`~pylux.diffeq.MixedNorm`, which every backward
    pass builds anew), else its identity; the key holds the object, so an id is never reused."""
    try:
        hash(norm)
    except TypeError:
        return ("unhashable", id(norm))
    return norm


def _inductor_options(mode, device_type: str, cpp_wrapper: bool) -> dict:
    """``torch.compile`` options for the whole-loop graph: ``mode``'s own, and on the CPU (``cpp_wrapper``)
    the C++ wrapper: the while loop, its condition read and its kernel calls in C++ rather than Python. On
    ``benchmarks/suite.py`` P1 (a 2-d state, where the Python wrapper cost more than the kernels) the solve
    takes ~5-7 ms instead of ~12 ms.

    Writing the field's small matmuls as multiply-adds (inductor's ``decompose_mm_pass``, or a pass of our
    own) is left out: with the C++ wrapper it did not speed P1 up measurably, and it made ``tanh(u @ W)``
    with a 2 x 2 to 16 x 16 ``W`` 1.15-3.3x slower (the fused stages recompute their inputs)."""
    from torch._inductor import list_mode_options
    options = dict(list_mode_options(mode)) if mode not in ("default", "reduce-overhead") else {}
    if device_type == "cpu":
        options.update(cpp_wrapper=cpp_wrapper)
    return options


def _compiled(key, build_args, mode, device_type: str = "cpu", cpp_wrapper: bool = True):
    cache_key = key if cpp_wrapper else (key, "python wrapper")
    if cache_key not in _CACHE:
        fn = _build(*build_args)
        # a code object of its own: dynamo counts its recompile limit (8) per code object, and every
        # configuration's loop would otherwise share the one of ``whole_solve``
        fn = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        _CACHE[cache_key] = torch.compile(fn, fullgraph=True, dynamic=False,
                                          options=_inductor_options(mode, device_type, cpp_wrapper))
    return _CACHE[cache_key]


def captured_run(loop, out, dt: float | None) -> bool:
    """Run ``loop``'s solve (a :class:`pylux.diffeq.integrate._Loop` after its first step) as one compiled
    while-loop; fill ``out`` and the loop's saver. ``dt`` is the first step, or ``None`` for Hairer's, which
    the graph then forms (:func:`~pylux.diffeq.controllers.hairer_initial_step`: one more evaluation of
    ``f``, counted, also on an unusable start, where it is taken at ``u0`` and the eager heuristic would
    have stopped before it). ``False`` (nothing done) when the solve is not eligible or the loop does not compile
    (then with one warning, and the step-by-step path runs)."""
    from .integrate import MAX_NONFINITE_STREAK, NONFINITE_SHRINK, STATUS_REJECT_SHRINK

    solver, options, field = loop.solver, loop.options, loop.field
    if solver.whole_loop_refusal is not None:
        return False
    refusal = capture_refusal(solver, options, field)
    if refusal is not None:
        # this solve's reason only: the solver may serve later solves that qualify (an adjoint's backward)
        solver.capture_refusal = refusal
        return False
    u0, t0, t1 = loop.u0, loop.t0, loop.t1
    base, controller = solver.base, options.controller
    targets_host = list(loop.saver.targets)
    time_dtype, device = options.time_dtype, u0.device
    make_state, method_key = RKState, None
    evaluator = getattr(loop.state, "evaluator", None)
    if getattr(base, "captures_whole_loop", False):
        if evaluator.structure == "matrix_free":
            solver.whole_loop_refusal = ("a matrix-free Jacobian (GMRES) iterates; pass jac_structure='dense' or "
                                         "'batched' to compile the loop")
            return False
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                           for x in [u0, *tree_leaves(field.p)]):
            # autograd cannot yet differentiate a while_loop through the LU factorisation
            solver.whole_loop_refusal = ("the compiled Rosenbrock loop runs forward only (under torch.no_grad or "
                                         "for inputs that need no gradient); differentiate with compile=False")
            return False
        evaluator.check_traceable(field, u0, time_scalar(t0, time_dtype, device))

        def stiff_state(k):  # fresh per trace: the counters of a compiled loop are added up after it
            return StiffState(k, None, evaluator)
        make_state = stiff_state
        method_key = (base, evaluator.structure, evaluator.use_autodiff, evaluator.direction)
    # the tolerances are inputs, not constants: a sweep over tolerances compiles once
    key = (type(base), id(base.tableau), method_key, controller, _norm_key(options.norm),
           loop.direction, options.dtmin, options.dtmax, options.maxiters, len(targets_host), solver.mode,
           device.type, dt is None)
    initial_order = base.order if dt is None else None
    build_args = (base, controller, options.norm, loop.direction, options.dtmin,
                  options.dtmax, options.maxiters, len(targets_host), NONFINITE_SHRINK, MAX_NONFINITE_STREAK,
                  make_state, STATUS_REJECT_SHRINK, initial_order)
    abstol = options.abstol
    abstol = abstol if isinstance(abstol, torch.Tensor) else torch.full((), float(abstol), dtype=u0.dtype,
                                                                         device=device)
    # deferred, the graph ignores its dt input: the span stands in (a NaN would be a guard of its own)
    times = torch.tensor([t0, t1 - t0 if dt is None else dt, t1] + targets_host, dtype=time_dtype).to(device)
    plain = BoundTerm(field.term, field.p)  # a counter's changing integer would be a guard
    refused = _REFUSED.get(key)
    if refused is not None:
        solver.whole_loop_refusal = refused
        return False
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError
    try:
        reltol = torch.full((), float(options.reltol), dtype=u0.dtype, device=device)
        args = (plain, u0, loop.state.f_at_u, times[0], times[1], times[2], abstol, reltol, times[3:])
        # the C++ wrapper cannot yet lower the loop's backward (its stacked per-iteration outputs)
        differentiated = torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in tree_leaves((field.p, args[1:])))
        cpp_wrapper = device.type == "cpu" and not differentiated and key not in _PYTHON_WRAPPED
        try:
            result = _compiled(key, build_args, solver.mode, device.type, cpp_wrapper)(*args)
        except (BackendCompilerFailed, InductorError):
            # the C++ wrapper lowers fewer programs than the Python one (and a field that closes over
            # parameters is differentiated unseen): this configuration takes the Python wrapper from now on
            if not cpp_wrapper:
                raise
            _PYTHON_WRAPPED.add(key)
            result = _compiled(key, build_args, solver.mode, device.type, cpp_wrapper=False)(*args)
    except Exception as err:  # noqa: BLE001 - any compile failure means: run the step-by-step path
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        solver.whole_loop_refusal = _REFUSED[key] = f"{type(err).__name__}: {first_line}"
        if getattr(base, "captures_whole_loop", False):
            solver.fallback_reason = solver.whole_loop_refusal  # warned here, not again by the eager steps
            instead = "running eagerly instead"
        else:
            instead = "compiling step by step instead"
        warnings.warn(f"solve(compile=True): the whole loop could not be compiled ({solver.whole_loop_refusal}); "
                      f"{instead}", RuntimeWarning, stacklevel=3)
        return False
    t, dt_last, u, k, _, nacc, nrej, _, status, saved, written = result
    host = torch.stack([t.double(), dt_last.double(), nacc.double(), nrej.double(), status.double()]).tolist()
    t_end, dt_end, n_acc, n_rej, code = host[0], host[1], int(host[2]), int(host[3]), int(host[4])
    trials = n_acc + n_rej
    if dt is None:
        field.count += 1  # the initial-step heuristic's evaluation at u0 + h0 f0
    step_counts = getattr(base, "step_counts", None)
    if step_counts is not None:  # a Rosenbrock step: its f evaluations, its linearisation's, its solves
        nfe, nsolve = step_counts
        field.count += (nfe + evaluator.traced_nfe(u0)) * trials
        counters = loop.state.counters
        counters.njac += trials
        counters.nw += trials
        counters.nsolve += nsolve * trials
    else:
        field.count += (base.tableau.stages - 1) * trials
    if targets_host:
        keep = written.tolist()
        inside = [x for x, w in zip(targets_host, keep) if w]
        if inside:
            index = torch.tensor([i for i, w in enumerate(keep) if w], device=device)
            loop.saver.times.extend(inside)
            loop.saver.blocks.append(saved.index_select(0, index).reshape((len(inside),) + tuple(u0.shape)))
    out.t, out.u, out.dt, out.naccept, out.nreject = t_end, u, dt_end, n_acc, n_rej
    out.solver_state = RKState(k) if step_counts is None else loop.state.advanced(k, None)
    _set_return_code(out, code, options, t_end, dt_end, u0)
    solver.compiled_steps += n_acc + n_rej
    return True


def _set_return_code(out, code: int, options, t: float, dt: float, u0: torch.Tensor) -> None:
    if code in (_F0_NONFINITE, _SCALE_UNUSABLE):
        status = INITIAL_F0_NONFINITE if code == _F0_NONFINITE else INITIAL_SCALE_UNUSABLE
        out.dt = 0.0  # no step was proposed (the eager first step's failure reads the same)
        out.stop(ReturnCode.Unstable, initial_step_problem(status, u0, options.abstol))
    elif code == _MAXITERS:
        out.stop(ReturnCode.MaxIters)
    elif code == _DTMIN:
        floor = step_floor(options.dtmin, t, options.time_dtype)
        out.stop(ReturnCode.DtLessThanMin, f"a step no longer than {floor!r} was rejected at t = {t!r} and the "
                 f"step size cannot shrink below max(dtmin = {options.dtmin!r}, 4 ulps of |t|)")
    elif code == _RESOLUTION:
        out.stop(ReturnCode.DtLessThanMin, f"t + dt == t in {str(options.time_dtype).replace('torch.', '')} time")
    elif code == _SOLVER_REJECTS:
        out.stop(ReturnCode.DtLessThanMin, f"the method kept rejecting its step (the Newton matrix I - h*gamma*J "
                 f"is singular or not finite; check the Jacobian) down to dt = {dt!r}, last at t = {t!r}")
    elif code == _UNSTABLE:
        out.stop(ReturnCode.Unstable, f"the step from t = {t!r} produced NaN/Inf repeatedly, shrinking dt "
                 f"down to {dt!r}")
