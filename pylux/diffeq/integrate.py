"""The integration loop: ``integrate(f, u0, t0, t1, solver, options) -> Solution``.

This is the internal entry the sensitivity algorithms call directly: it works
on plain tensors (any shape, e.g. an adjoint's flat augmented state) with an
already-bound vector field ``f(u, t) -> du`` (``t`` a 0-d tensor of ``u``'s
dtype and device) and canonical :class:`~pylux.diffeq.options.SolveOptions`.
It works under ``torch.no_grad()``, with ``f`` that itself calls autograd, and
backward in time (``t1 < t0``).

The loop is a composition of small helpers, each testable on its own:

* ``solver.step`` — one trial step (the pure contract of :mod:`pylux.diffeq.solvers`);
* :class:`~pylux.diffeq.norms.ScaledErrorNorm` — the scaled error ``E`` (workspace buffers
  when no gradient of ``E`` is needed);
* ``controller.decide`` — accept/reject and the next ``dt``;
* :func:`clamp_step` — do not step past ``t1``, round to the time dtype;
* :class:`Saver` — what to store (every step, ``saveat`` by interpolation, ends);
* :func:`check_termination` — the termination callbacks;
* :class:`StatsRecorder` — per-step internals when ``save_stats=True``.

Host synchronisation: the accept/reject decision needs ``E`` on the host; the
loop fetches it, together with every termination flag, in ONE transfer per
step. Nothing else synchronises inside the loop: stage times reach the device
without blocking copies, fixed-step solves check for NaN/Inf once at the end
(and synchronise per step only to read termination flags), and the
initial-step heuristic synchronises twice per solve. Time is kept on the host
as Python floats, in the time dtype (rounded to float32 when ``tspan`` is
float32); ``f`` receives ``t`` as a 0-d tensor in the state's dtype.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ._device import host_to_device, scalar_like
from .controllers import initial_step_size
from .interpolation import AbstractInterpolant, DenseOutput
from .norms import ScaledErrorNorm, scaled_error_norm
from .options import SolveOptions, _round_time
from .solution import ERROR_FOR_RETCODE, ReturnCode, Solution, SolverStats
from .solvers import AbstractSolver, StepResult

__all__ = ["integrate", "Saver", "StatsRecorder", "clamp_step", "check_termination",
           "FixedTimeGrid", "fixed_time_grid", "stiffness_estimate", "CountingField"]

#: After a step whose error is NaN/Inf, the step size is multiplied by this.
NONFINITE_SHRINK = 0.2
#: This many consecutive non-finite trial steps make the solve Unstable.
MAX_NONFINITE_STREAK = 10


class CountingField:
    """Wraps ``f(u, t)``: counts evaluations and checks the first output against ``u0``.

    The first call's result must be a tensor with ``u0``'s shape, dtype and
    device; a mismatch raises before any step is taken, naming both. Exceptions
    raised by ``f`` propagate unchanged.
    """

    __slots__ = ("f", "count", "_u0")

    def __init__(self, f: Callable, u0: torch.Tensor) -> None:
        self.f = f
        self.count = 0
        self._u0 = u0

    def __call__(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.f(u, t)
        if self.count == 0:
            _check_field_output(out, self._u0)
        self.count += 1
        return out


def _check_field_output(out, u0: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"f must return a tensor du/dt, but returned {type(out).__name__}")
    if out.shape != u0.shape:
        raise ValueError(f"f returned a tensor of shape {tuple(out.shape)} but u0 has shape "
                         f"{tuple(u0.shape)}; f(u, p, t) must return du/dt with u's shape")
    if out.dtype != u0.dtype:
        raise TypeError(f"f returned dtype {out.dtype} but u0 has dtype {u0.dtype}; f must return "
                        "du/dt in u's dtype (cast inside f, or build u0 with the dtype f computes in)")
    if out.device != u0.device:
        raise ValueError(f"f returned a tensor on device {out.device} but u0 is on {u0.device}; "
                         "move the parameters or u0 so that both live on the same device")


def clamp_step(t: float, dt: float, t1: float, time_dtype: torch.dtype) -> tuple[float, float]:
    """The step actually taken from ``t`` with proposed signed ``dt``: ``(dt_step, t_new)``.

    Never steps past ``t1`` (the step that reaches it ends exactly at ``t1``);
    otherwise ``t_new`` is ``t + dt`` rounded to the time dtype, and ``dt_step =
    t_new - t`` is the representable step (0 when ``t + dt == t``).
    """
    if (dt > 0 and t + dt >= t1) or (dt < 0 and t + dt <= t1):
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


def fixed_time_grid(t0: float, t1: float, dt: float, time_dtype: torch.dtype) -> list[float]:
    """All points of :class:`FixedTimeGrid` as a list."""
    grid = FixedTimeGrid(t0, t1, dt, time_dtype)
    return [grid[i] for i in range(len(grid))]


def stiffness_estimate(stages) -> torch.Tensor:
    """Shampine's ``||k_s - k_{s-1}|| / ||Y_s - Y_{s-1}||`` from ``(k_{s-1}, k_s, Y_{s-1}, Y_s)``.

    0 when the two stage values coincide (then so do the derivatives).
    """
    k_prev, k_last, y_prev, y_last = stages
    num = torch.linalg.vector_norm(k_last - k_prev)
    den = torch.linalg.vector_norm(y_last - y_prev)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


class StatsRecorder:
    """Per-accepted-step ``t``, ``dt``, scaled error ``E`` and stiffness, when enabled.

    ``steps_only``: record just the host ``t`` and ``dt`` (no tensors, no extra work).
    """

    def __init__(self, enabled: bool, steps_only: bool = False) -> None:
        self.enabled = enabled or steps_only
        self.steps_only = steps_only and not enabled
        self.t: list[float] = []
        self.dt: list[float] = []
        self.error: list[torch.Tensor] = []
        self.stiffness: list[torch.Tensor] = []

    def record(self, t: float, dt: float, error_norm: torch.Tensor | None, result: StepResult) -> None:
        if not self.enabled:
            return
        self.t.append(t)
        self.dt.append(dt)
        if self.steps_only:
            return
        if error_norm is not None:
            self.error.append(error_norm)
        if result.stiffness_stages is not None:
            self.stiffness.append(stiffness_estimate(result.stiffness_stages))

    def finish(self, stats: SolverStats, time_dtype: torch.dtype, like: torch.Tensor) -> None:
        if not self.enabled:
            return
        stats.t = host_to_device(self.t, time_dtype, like.device)
        stats.dt = host_to_device(self.dt, time_dtype, like.device)
        if self.steps_only:
            return
        n = len(self.t)
        if self.error and len(self.error) == n:
            stats.error_estimate = torch.stack(self.error)
        elif n == 0:
            stats.error_estimate = like.new_zeros((0,))
        if self.stiffness and len(self.stiffness) == n:
            stats.stiffness = torch.stack(self.stiffness)
        elif n == 0:
            stats.stiffness = like.new_zeros((0,))


class Saver:
    """Decides what a solve stores: every step, or ``saveat`` times, plus the ends.

    * ``save_everystep``: the start (if ``save_start``) and every accepted step.
    * ``saveat``: each requested time strictly between the ends is evaluated
      with the step's interpolant when a step passes it (a time that equals a
      step end takes that state exactly); ``t0`` is stored iff ``save_start``,
      the final time iff ``save_end`` (the defaults: iff they are in ``saveat``).
    * When the solve stops early (termination or failure) the state where it
      stopped is stored last if ``save_end``.
    """

    def __init__(self, t0: float, t1: float, options: SolveOptions) -> None:
        self.t0 = t0
        self.t1 = t1
        self.direction = 1.0 if t1 >= t0 else -1.0
        self.everystep = options.save_everystep
        self.save_start = options.save_start
        self.save_end = options.save_end
        targets = options.saveat or ()
        self.targets = [x for x in targets if x != t0 and x != t1]
        self.next_target = 0
        self.times: list[float] = []
        self.blocks: list[torch.Tensor] = []

    def start(self, u0: torch.Tensor) -> None:
        if self.save_start:
            self._add(self.t0, u0.unsqueeze(0))

    def _add(self, t: float, block: torch.Tensor) -> None:
        self.times.append(t)
        self.blocks.append(block)

    def on_step(self, t: float, t_new: float, u_new: torch.Tensor, piece: AbstractInterpolant) -> None:
        if self.everystep:
            if t_new != self.t1:
                self._add(t_new, u_new.unsqueeze(0))
            return
        d = self.direction
        first = self.next_target
        end = first
        while end < len(self.targets) and d * self.targets[end] <= d * t_new:
            end += 1
        if end == first:
            return
        self.next_target = end
        inside = [x for x in self.targets[first:end] if x != t_new]
        if inside:
            dt = t_new - t
            values = piece.evaluate([(x - t) / dt for x in inside])
            self.times.extend(inside)
            self.blocks.append(values)
        if self.targets[end - 1] == t_new:
            self._add(t_new, u_new.unsqueeze(0))

    def finish(self, t_final: float, u_final: torch.Tensor) -> tuple[list[float], list[torch.Tensor]]:
        if self.save_end and (not self.times or self.times[-1] != t_final):
            self._add(t_final, u_final.unsqueeze(0))
        return self.times, self.blocks


def check_termination(callbacks, u_new: torch.Tensor, t_new: float, du: Callable[[], torch.Tensor]
                      ) -> list:
    """Each callback's verdict for a trial step ending at ``(u_new, t_new)``: tensors or bools."""
    return [cb.should_terminate(u_new, t_new, du) for cb in callbacks]


def _fetch(error_norm: torch.Tensor | None, flags: list) -> tuple[float, bool]:
    """The host synchronisation of a step: ``E`` and whether any callback fired, in one transfer."""
    tensor_flags = [f for f in flags if isinstance(f, torch.Tensor)]
    fired = any(bool(f) for f in flags if not isinstance(f, torch.Tensor))
    if error_norm is None and not tensor_flags:
        return 0.0, fired
    values = ([error_norm.detach().reshape(())] if error_norm is not None else []) + [
        f.detach().reshape(()).to(error_norm.dtype if error_norm is not None else torch.float32)
        for f in tensor_flags]
    host = torch.stack(values).tolist() if len(values) > 1 else [values[0].item()]
    if error_norm is not None:
        e, host = host[0], host[1:]
    else:
        e = 0.0
    return e, fired or any(v != 0 for v in host)


def _du_provider(field, result: StepResult, u_new: torch.Tensor, t_new: float):
    cache: list[torch.Tensor] = []

    def du() -> torch.Tensor:
        if result.du_new is not None:
            return result.du_new
        if not cache:
            cache.append(field(u_new, scalar_like(t_new, u_new)))
        return cache[0]
    return du


def _retry_state(result: StepResult, state):
    return result.solver_state_retry if result.solver_state_retry is not None else state


class _Outcome:
    __slots__ = ("retcode", "t", "u", "dt", "naccept", "nreject", "detail")

    def __init__(self, t0, u0, dt):
        self.retcode = ReturnCode.Success
        self.t, self.u, self.dt = t0, u0, dt
        self.naccept = self.nreject = 0
        self.detail = ""


def _adaptive_loop(field: CountingField, solver: AbstractSolver, u0, t0, t1, options: SolveOptions,
                   saver: Saver, dense: DenseOutput | None, stats: StatsRecorder) -> _Outcome:
    direction = 1.0 if t1 > t0 else -1.0
    controller = options.controller
    cstate = controller.init()
    f0 = None
    if options.dt is None or solver.needs_f0:
        f0 = field(u0, scalar_like(t0, u0))
    if options.dt is None:
        dt_abs = initial_step_size(field, t0, u0, t1, solver.order, options.abstol, options.reltol,
                                   options.norm, f0, options.dtmax)
        if math.isnan(dt_abs):
            out = _Outcome(t0, u0, 0.0)
            out.retcode = ReturnCode.Unstable
            out.detail = "f(u0, t0) is NaN or Inf"
            return out
    else:
        dt_abs = min(options.dt, options.dtmax)
    dt = direction * dt_abs
    state = solver.init(field, t0, u0, dt, f0)
    out = _Outcome(t0, u0, dt)
    t, u = t0, u0
    nonfinite_streak = 0
    last_error = math.nan
    callbacks = options.callbacks
    error_norm_of = ScaledErrorNorm(options.abstol, options.reltol, options.norm,
                                    differentiable=options.save_stats)
    while t != t1:
        if out.naccept + out.nreject >= options.maxiters:
            out.retcode = ReturnCode.MaxIters
            break
        dt_step, t_new = clamp_step(t, dt, t1, options.time_dtype)
        if t_new == t:
            out.retcode = ReturnCode.DtLessThanMin
            out.detail = f"t + dt == t in {str(options.time_dtype).replace('torch.', '')} time"
            if not math.isnan(last_error):
                out.detail += f"; the last scaled error estimate was {last_error:.3g}"
            break
        result = solver.step(field, t, u, dt_step, state)
        u_new = result.u_new
        error_norm = error_norm_of(result, u)
        flags = check_termination(callbacks, u_new, t_new, _du_provider(field, result, u_new, t_new)) \
            if callbacks else []
        e, fired = _fetch(error_norm, flags)
        out.dt = dt_step
        if not math.isfinite(e):
            out.nreject += 1
            nonfinite_streak += 1
            state = _retry_state(result, state)
            dt = dt_step * NONFINITE_SHRINK
            if nonfinite_streak >= MAX_NONFINITE_STREAK or abs(dt) < options.dtmin:
                out.retcode = ReturnCode.Unstable
                out.detail = (f"the step from t = {t!r} produced NaN/Inf {nonfinite_streak} times in "
                              f"a row, shrinking dt down to {dt_step!r}")
                break
            continue
        nonfinite_streak = 0
        last_error = e
        accept, dt_next, cstate_new = controller.decide(cstate, e, dt_step)
        if accept:
            out.naccept += 1
            stats.record(t, dt_step, error_norm, result)
            saver.on_step(t, t_new, u_new, result.dense_info)
            if dense is not None:
                dense.append(t, t_new, result.dense_info)
            t, u, state, cstate = t_new, u_new, result.solver_state_new, cstate_new
            out.t, out.u = t, u
            if fired:
                out.retcode = ReturnCode.Terminated
                break
        else:
            out.nreject += 1
            state = _retry_state(result, state)
        if abs(dt_next) > options.dtmax:
            dt_next = direction * options.dtmax
        if t != t1 and abs(dt_next) < options.dtmin:
            out.retcode = ReturnCode.DtLessThanMin
            out.dt = dt_next
            out.detail = (f"the next step dt = {dt_next!r} is below dtmin = {options.dtmin!r}; "
                          f"the last scaled error estimate was {e:.3g}")
            break
        dt = dt_next
    return out


def _fixed_loop(field: CountingField, solver: AbstractSolver, u0, t0, t1, options: SolveOptions,
                saver: Saver, dense: DenseOutput | None, stats: StatsRecorder) -> _Outcome:
    grid = FixedTimeGrid(t0, t1, options.dt, options.time_dtype)
    state = solver.init(field, t0, u0, grid[1] - grid[0], None)
    out = _Outcome(t0, u0, grid[1] - grid[0])
    t, u = t0, u0
    finite_flags: list[torch.Tensor] = []
    callbacks = options.callbacks
    for i in range(len(grid) - 1):
        if i >= options.maxiters:
            out.retcode = ReturnCode.MaxIters
            break
        t_new = grid[i + 1]
        dt = t_new - t
        out.dt = dt
        if dt == 0:
            out.retcode = ReturnCode.DtLessThanMin
            out.detail = (f"t + dt == t in {str(options.time_dtype).replace('torch.', '')} time; "
                          "the fixed dt is below the time resolution at this t")
            break
        result = solver.step(field, t, u, dt, state)
        u_new = result.u_new
        fired = False
        if callbacks:
            flags = check_termination(callbacks, u_new, t_new, _du_provider(field, result, u_new, t_new))
            _, fired = _fetch(None, flags)
        finite_flags.append(torch.isfinite(u_new).all() if u_new.numel() else
                            torch.ones((), dtype=torch.bool, device=u_new.device))
        error_norm = None
        if stats.enabled and not stats.steps_only and result.error_estimate is not None:
            error_norm = scaled_error_norm(result.error_estimate, u, u_new, options.abstol,
                                           options.reltol, options.norm)
        out.naccept += 1
        stats.record(t, dt, error_norm, result)
        saver.on_step(t, t_new, u_new, result.dense_info)
        if dense is not None:
            dense.append(t, t_new, result.dense_info)
        t, u, state = t_new, u_new, result.solver_state_new
        out.t, out.u = t, u
        if fired:
            out.retcode = ReturnCode.Terminated
            break
    if finite_flags:
        flags = torch.stack(finite_flags).tolist()
        if not all(flags):
            first_bad = flags.index(False)
            out.retcode = ReturnCode.Unstable
            out.detail = (f"the fixed step from t = {grid[first_bad]!r} to {grid[first_bad + 1]!r} "
                          "produced NaN/Inf; fixed steps cannot be shrunk, so use a smaller dt or "
                          "adaptive stepping")
            out.t = grid[first_bad + 1]
    return out


def _failure_message(out: _Outcome, options: SolveOptions) -> str:
    where = (f"at t = {out.t!r}, dt = {out.dt!r}, after {out.naccept + out.nreject} steps "
             f"({out.naccept} accepted, {out.nreject} rejected)")
    detail = out.detail
    if out.retcode == ReturnCode.MaxIters:
        detail = f"maxiters = {options.maxiters} reached"
    detail = f": {detail}" if detail else ""
    return f"solve stopped with retcode {out.retcode.name} {where}{detail}. Meaning: {out.retcode.message}."


def integrate(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], u0: torch.Tensor, t0: float,
              t1: float, solver: AbstractSolver, options: SolveOptions) -> Solution:
    """Solve ``du/dt = f(u, t)`` from ``u(t0) = u0`` to ``t1`` (internal entry; see the module docstring).

    Args:
        f: the vector field with parameters bound, ``f(u, t) -> du``.
        u0: the initial state (validated by the caller; any shape, may be empty).
        t0, t1: host floats; ``t1 < t0`` integrates backward.
        solver: an :class:`~pylux.diffeq.solvers.AbstractSolver`.
        options: canonical :class:`~pylux.diffeq.options.SolveOptions`.

    Returns:
        a :class:`~pylux.diffeq.solution.Solution`.

    Raises:
        the :class:`~pylux.diffeq.solution.SolverError` subclass of the return
        code when the solve fails and ``options.throw``; errors from ``f``
        unchanged; ``TypeError``/``ValueError`` when ``f``'s first output does
        not match ``u0``.
    """
    field = CountingField(f, u0)
    direction = 1.0 if t1 >= t0 else -1.0
    saver = Saver(t0, t1, options)
    stats_recorder = StatsRecorder(options.save_stats, options.save_steps)
    dense = DenseOutput(t0, direction) if options.dense else None
    saver.start(u0)
    if t0 == t1:
        out = _Outcome(t0, u0, 0.0)
    elif options.adaptive:
        out = _adaptive_loop(field, solver, u0, t0, t1, options, saver, dense, stats_recorder)
    else:
        out = _fixed_loop(field, solver, u0, t0, t1, options, saver, dense, stats_recorder)
    times, blocks = saver.finish(out.t, out.u)
    stats = SolverStats(nf=field.count, naccept=out.naccept, nreject=out.nreject)
    stats_recorder.finish(stats, options.time_dtype, u0)
    t_tensor = host_to_device(times, options.time_dtype, u0.device)
    u_tensor = torch.cat(blocks) if blocks else u0.new_zeros((0,) + tuple(u0.shape))
    failed = out.retcode not in (ReturnCode.Success, ReturnCode.Terminated)
    message = _failure_message(out, options) if failed else out.retcode.message
    sol = Solution(t_tensor, u_tensor, out.retcode, stats, message=message, dense=dense,
                   solver=solver, u0=u0)
    if failed and options.throw:
        raise ERROR_FOR_RETCODE[out.retcode](
            message + " Pass throw=False to get the partial solution instead of this error "
            "(it is also attached to this exception as .solution).",
            solution=sol, t=out.t, dt=out.dt)
    return sol
