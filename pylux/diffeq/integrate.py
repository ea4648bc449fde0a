"""The integration loop: ``integrate(term, u0, t0, t1, solver, options) -> Solution``.

This is the internal entry the sensitivity algorithms call directly: it works
on plain tensors (any shape, e.g. an adjoint's flat augmented state) with a
bound term (:mod:`pylux.diffeq.terms`) or an already-bound vector field
``f(u, t) -> du``, and canonical :class:`~pylux.diffeq.options.SolveOptions`.
It works under ``torch.no_grad()``, with ``f`` that itself calls autograd, and
backward in time (``t1 < t0``). There is one loop for every solver and every
controller: fixed stepping is the :class:`~pylux.diffeq.controllers.ConstantStepSize`
controller, and the reversible pair is a solver like the others.

The loop is a composition of small helpers, each testable on its own:

* ``solver.step`` — one trial step (the pure contract of :mod:`pylux.diffeq.solvers`),
  which returns a status: a solver may reject its own step (an implicit
  method whose Newton iteration failed) or fail the solve;
* :class:`~pylux.diffeq.norms.ScaledErrorNorm` — the scaled error ``E`` (workspace buffers
  when no gradient of ``E`` is needed);
* ``controller.step_end`` / ``controller.decide`` — where the step ends (never
  past the next stop time: ``tstops``, ``t1``, and ``saveat`` for solvers
  without an interpolant) and accept/reject with the next ``dt``;
* :class:`Saver` — what to store (every step, ``saveat`` by interpolation, ends);
* :func:`check_termination` — the termination callbacks;
* :class:`~pylux.diffeq.events.EventHandler` — event callbacks (only when given):
  conditions tested on the trial step (their flag rides in the step's one
  transfer), events located, the step cut, affects applied;
* :class:`StatsRecorder` — per-step internals when ``save_stats=True``.

Host synchronisation: the accept/reject decision needs ``E`` on the host; the
loop fetches it, together with every termination flag and a tensor step
status, in ONE transfer per step. Nothing else synchronises inside the loop:
time reaches the step as 0-d device tensors made by fill kernels, stage times
reach the device without blocking copies, constant-step solves check for
NaN/Inf once at the end (and synchronise per step only to read termination
flags), and the initial-step heuristic synchronises twice per solve. The loop
keeps each time as a host float too, in the time dtype (rounded to float32
when ``tspan`` is float32), for clamping, saving and messages; ``f`` receives
``t`` as a 0-d tensor in the time dtype, so a float32 state with a float64
``tspan`` still sees full-precision time.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

from ._device import host_to_device, time_scalar
from .callbacks import AbstractEventCallback
from .controllers import FixedTimeGrid, clamp_step, initial_step_size
from .events import EventHandler, EventLog
from .interpolation import AbstractInterpolant, DenseOutput
from .norms import ScaledErrorNorm, scaled_error_norm
from .options import SolveOptions, step_floor
from .solution import ERROR_FOR_RETCODE, ReturnCode, Solution, SolverStats
from .solvers import AbstractSolver, StepResult, StepStatus
from .terms import BoundTerm, _FunctionTerm, as_bound_term

__all__ = ["integrate", "Saver", "StatsRecorder", "clamp_step", "check_termination",
           "FixedTimeGrid", "fixed_time_grid", "stiffness_estimate", "CountingField",
           "STATUS_REJECT_SHRINK", "NONFINITE_SHRINK", "MAX_NONFINITE_STREAK"]

#: After a step whose error is NaN/Inf, the step size is multiplied by this.
NONFINITE_SHRINK = 0.2
#: This many consecutive non-finite trial steps make the solve Unstable.
MAX_NONFINITE_STREAK = 10
#: After a step the solver itself rejected (StepStatus.REJECT), the step size is multiplied by this
#: (OrdinaryDiffEq's failfactor of 2 after a Newton failure).
STATUS_REJECT_SHRINK = 0.5


class CountingField(BoundTerm):
    """A bound term that counts vector-field evaluations and checks the first output against ``u0``.

    The first evaluation's result must have ``u0``'s shape, dtype and device
    (for an ODE term; a control term is checked on its first product, where
    the control's increment is known); a mismatch raises before any step is
    taken, naming both. Exceptions raised by ``f`` propagate unchanged, except
    a ``TypeError`` on the first call of a field that cannot take
    ``(u, p, t)``, which is re-raised saying what pylux expects.
    """

    __slots__ = ("count", "count_g", "_u0", "_products_checked", "_parts_checked")

    def __init__(self, term, u0: torch.Tensor) -> None:
        term = as_bound_term(term)
        super().__init__(term.term, term.p)
        self.count = 0
        self.count_g = 0
        self._u0 = u0
        self._products_checked = False
        self._parts_checked: set = set()

    def vf(self, u: torch.Tensor, t: torch.Tensor):
        if self.count == 0:
            out = _first_call(self.term, u, self.p, t)
            if self.control_is_time:
                self.term.check(out, None, self._u0)
        else:
            out = self.term.vf(u, self.p, t)
        self.count += 1
        return out

    def prod(self, vf, control):
        if not self._products_checked:
            self.term.check(vf, control, self._u0)
            self._products_checked = True
        return self.term.prod(vf, control)

    def vf_prod(self, u, t, control):
        return self.prod(self.vf(u, t), control)

    def part_vf(self, i: int, u, t):
        """The ``i``-th term's field; the drift (0) counts in ``count``, the others in ``count_g``."""
        part = self.term.terms[i]
        if i == 0:
            out = _first_call(part, u, self.p, t) if self.count == 0 else part.vf(u, self.p, t)
            if self.count == 0 and part.control_is_time:
                part.check(out, None, self._u0)
            self.count += 1
        else:
            out = _first_call(part, u, self.p, t) if self.count_g == 0 else part.vf(u, self.p, t)
            self.count_g += 1
        return out

    def part_prod(self, i: int, vf, control):
        part = self.term.terms[i]
        if i not in self._parts_checked:
            part.check(vf, control, self._u0)
            self._parts_checked.add(i)
        return part.prod(vf, control)


def _first_call(term, u, p, t):
    try:
        return term.vf(u, p, t)
    except TypeError as err:
        f = getattr(term, "f", None) or getattr(term, "g", None)
        if f is None or isinstance(term, _FunctionTerm) or _accepts(f, 3):
            raise
        raise TypeError(f"{getattr(f, '__name__', type(f).__name__)} cannot be called as f(u, p, t): pylux "
                        "calls the vector field with the state first, then the parameters, then time "
                        "(Julia's order). A torchdiffeq-style f(t, u) must become f(u, p, t), e.g. "
                        "lambda u, p, t: f(t, u)") from err


def _accepts(f, n: int) -> bool:
    try:
        inspect.signature(f).bind(*range(n))
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): let the call itself decide
        return True
    return True


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
        self.t_new: list[float] = []
        self.error: list[torch.Tensor] = []
        self.stiffness: list[torch.Tensor] = []

    def record(self, t: float, dt: float, error_norm: torch.Tensor | None, result: StepResult,
               t_new: float | None = None) -> None:
        if not self.enabled:
            return
        self.t.append(t)
        self.dt.append(dt)
        self.t_new.append(t + dt if t_new is None else t_new)
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
        stats.steps = tuple(zip(self.t, self.t_new))
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


def _fetch(error_norm: torch.Tensor | None, flags: list, status) -> tuple[float, bool, int]:
    """The host synchronisation of a step: ``E``, whether a callback fired and the step status, in
    one transfer (none at all when nothing is a tensor)."""
    return _fetch_step(error_norm, flags, status, None)[:3]


def _fetch_step(error_norm: torch.Tensor | None, flags: list, status, event_flag
                ) -> tuple[float, bool, int, bool]:
    """:func:`_fetch`, and whether the events' 0-d flag (or ``None``) is set, in the same transfer."""
    tensor_flags = [f for f in flags if isinstance(f, torch.Tensor)]
    fired = any(bool(f) for f in flags if not isinstance(f, torch.Tensor))
    status_tensor = isinstance(status, torch.Tensor)
    code = 0 if status_tensor else int(status)
    extra = [] if event_flag is None else [event_flag]
    if error_norm is None and not tensor_flags and not status_tensor and not extra:
        return 0.0, fired, code, False
    dtype = error_norm.dtype if error_norm is not None else torch.float32
    values = ([error_norm.detach().reshape(())] if error_norm is not None else []) + [
        f.detach().reshape(()).to(dtype) for f in tensor_flags + extra + ([status] if status_tensor else [])]
    host = torch.stack(values).tolist() if len(values) > 1 else [values[0].item()]
    e = host.pop(0) if error_norm is not None else 0.0
    if status_tensor:
        code = int(host.pop())
    event = bool(host.pop()) if extra else False
    return e, fired or any(v != 0 for v in host), code, event


def _du_provider(field, result: StepResult, u_new: torch.Tensor, t_new: torch.Tensor):
    cache: list[torch.Tensor] = []

    def du() -> torch.Tensor:
        if result.du_new is not None:
            return result.du_new
        if not cache:
            cache.append(field.vf(u_new, t_new))
        return cache[0]
    return du


def _retry_state(result: StepResult, state):
    return result.solver_state_retry if result.solver_state_retry is not None else state


class _Outcome:
    __slots__ = ("retcode", "t", "u", "dt", "naccept", "nreject", "detail", "solver_state", "events")

    def __init__(self, t0, u0, dt):
        self.retcode = ReturnCode.Success
        self.t, self.u, self.dt = t0, u0, dt
        self.naccept = self.nreject = 0
        self.detail = ""
        self.solver_state = None
        self.events = None

    def stop(self, retcode: ReturnCode, detail: str = "") -> None:
        self.retcode, self.detail = retcode, detail


def _stop_times(t0: float, t1: float, options: SolveOptions, solver: AbstractSolver) -> list[float]:
    """The times the loop must step exactly onto, in the direction of integration, ending with t1."""
    direction = 1.0 if t1 >= t0 else -1.0
    stops = set(options.tstops)
    if solver.steps_onto_saveat and options.saveat:
        stops |= set(options.saveat)
    inside = [x for x in stops if direction * t0 < direction * x < direction * t1]
    return sorted(inside, key=lambda x: direction * x) + [t1]


class _DriftView:
    """The drift of a drift-plus-control MultiTerm, as an ODE field for the initial-step heuristic."""

    __slots__ = ("field",)

    def __init__(self, field) -> None:
        self.field = field

    def vf(self, u, t):
        return self.field.part_vf(0, u, t)


def _drift_of(field) -> _DriftView:
    terms = getattr(field.term, "terms", ())
    if not terms or not terms[0].control_is_time:
        raise ValueError("solve: the initial step size heuristic needs an ODE term first (the drift); pass "
                         "dt=... for the first step of this solve")
    return _DriftView(field)


class _Loop:
    """The one integration loop: any solver, any controller (adaptive or constant steps).

    Per trial step: clamp to the next stop time, step, measure (the scaled
    error when the controller needs it, termination flags, the step status:
    one host transfer), then reject (status REJECT, NaN/Inf, error too large)
    or accept (record, save, advance). Constant stepping needs no error, so
    it does not synchronise per step: NaN/Inf are checked once at the end.
    """

    def __init__(self, field: CountingField, solver: AbstractSolver, u0, t0: float, t1: float,
                 options: SolveOptions, saver: Saver, dense: DenseOutput | None, stats: StatsRecorder):
        self.field, self.solver, self.options = field, solver, options
        bind = getattr(solver, "bind_options", None)
        if bind is not None:  # a solver whose steps need the solve's tolerances (an implicit method's Newton test)
            self.solver = bind(options)
        self.saver, self.dense, self.stats = saver, dense, stats
        self.t0, self.t1, self.u0 = t0, t1, u0
        self.direction = 1.0 if t1 > t0 else -1.0
        self.controller = options.controller
        self.adaptive = self.controller.needs_error_estimate
        self.time = (options.time_dtype, u0.device)
        self.stops = _stop_times(t0, t1, options, solver)
        self.error_norm_of = ScaledErrorNorm(options.abstol, options.reltol, options.norm,
                                             differentiable=options.save_stats)
        self.finite_flags: list[torch.Tensor] = []
        self.fixed_steps: list[tuple[float, float]] = []
        self.termination = tuple(cb for cb in options.callbacks if not isinstance(cb, AbstractEventCallback))
        self.events: EventHandler | None = None

    def first_step(self, out: _Outcome, defer: bool = False) -> float | None:
        """The signed first ``dt`` (Hairer's heuristic unless given), and the solver's initial state.

        With ``defer`` (a compiled whole loop that forms Hairer's step in its own graph) the heuristic is
        left out: ``dt`` comes back as NaN, the solver starts from the span as its provisional step (the
        solvers read only its sign) and :meth:`deferred_step` computes it if the loop does not run."""
        options, field, u0, t0 = self.options, self.field, self.u0, self.t0
        f0 = None
        needs_f0 = (options.dt is None and field.control_is_time) or (self.solver.needs_f0 and field.control_is_time)
        if needs_f0:
            f0 = field.vf(u0, time_scalar(t0, *self.time))
        if defer:
            self.f0 = f0
            dt = self.direction * abs(self.t1 - t0)
            self.state = self.solver.init(field, time_scalar(t0, *self.time), u0, time_scalar(dt, *self.time), f0)
            return math.nan
        if options.dt is None:
            ode_field = field
            if not field.control_is_time:
                ode_field = _drift_of(field)
                f0 = ode_field.vf(u0, time_scalar(t0, *self.time))
            dt_abs, problem = initial_step_size(ode_field, t0, u0, self.t1, self.solver.order, options.abstol,
                                                options.reltol, options.norm, f0, options.dtmax,
                                                options.time_dtype)
            if problem:
                out.stop(ReturnCode.Unstable, problem)
                return None
        else:
            dt_abs = min(options.dt, options.dtmax)
        if self.adaptive:
            dt_abs = max(dt_abs, self.floor(t0))  # a floor for every proposal, the first too
        dt = self.direction * dt_abs
        self.state = self.solver.init(field, time_scalar(t0, *self.time), u0,
                                      time_scalar(dt, *self.time), f0)
        self.cstate = self.controller.start(t0, self.t1, dt, options.time_dtype)
        return dt

    def deferred_step(self, out: _Outcome) -> float | None:
        """Hairer's first ``dt`` after :meth:`first_step` deferred it (the whole loop did not run); the
        controller starts from it. ``None`` (``out`` stopped) when the heuristic finds no usable step."""
        options = self.options
        dt_abs, problem = initial_step_size(self.field, self.t0, self.u0, self.t1, self.solver.order,
                                            options.abstol, options.reltol, options.norm, self.f0, options.dtmax,
                                            options.time_dtype)
        if problem:
            out.stop(ReturnCode.Unstable, problem)
            return None
        dt = self.direction * max(dt_abs, self.floor(self.t0))
        self.cstate = self.controller.start(self.t0, self.t1, dt, options.time_dtype)
        return dt

    def run(self) -> _Outcome:
        out = _Outcome(self.t0, self.u0, 0.0)
        whole_loop = getattr(self.solver, "run_whole_loop", None)  # compile=True: the loop as one graph
        # the compiled loop forms Hairer's step in its graph: no eager evaluation or read-back for it
        defer = whole_loop is not None and self.options.dt is None and self.field.control_is_time
        dt = self.first_step(out, defer)
        if dt is None:
            return out
        out.dt = dt
        if whole_loop is not None and whole_loop(self, out, None if defer else dt):
            return out
        if defer:
            dt = self.deferred_step(out)
            if dt is None:  # out.dt stays 0.0, as when the eager first step fails
                out.dt = 0.0
                return out
            out.dt = dt
        if len(self.termination) != len(self.options.callbacks):
            self.events = EventHandler(self.options.callbacks, self.solver, self.u0, self.t0, self.t1, self.time)
            out.events = self.events.log
        self.t, self.u, self.stop_index = self.t0, self.u0, 0
        self.nonfinite_streak, self.last_error = 0, math.nan
        while self.t != self.t1 and out.retcode == ReturnCode.Success:
            if out.naccept + out.nreject >= self.options.maxiters:
                out.stop(ReturnCode.MaxIters)
                break
            dt = self.trial(out, dt)
        if not self.adaptive:
            self.check_fixed_steps(out)
        diagnose = getattr(self.solver, "diagnose", None)  # a check only the finished solve can make
        if diagnose is not None and out.retcode in (ReturnCode.Success, ReturnCode.Terminated):
            problem = diagnose(self.state, self.options)
            if problem:
                out.stop(ReturnCode.Unstable, problem)
        out.solver_state = self.state
        return out

    def trial(self, out: _Outcome, dt: float) -> float:
        """One trial step from ``self.t`` with proposed ``dt``; returns the next proposal."""
        t, u = self.t, self.u
        stop = self.stops[self.stop_index]
        dt_step, t_new, self.cstate = self.controller.step_end(self.cstate, t, dt, stop,
                                                               self.options.time_dtype)
        out.dt = dt_step
        if t_new == t:
            out.stop(ReturnCode.DtLessThanMin, self._time_resolution_detail())
            return dt
        result = self.solver.step(self.field, time_scalar(t, *self.time), u, time_scalar(dt_step, *self.time),
                                  self.state)
        error_norm = self.error_norm(result, u)
        callbacks = self.termination
        flags = check_termination(callbacks, result.u_new, t_new, _du_provider(
            self.field, result, result.u_new, time_scalar(t_new, *self.time))) if callbacks else []
        event_flag = self.events.check(result, t, t_new) if self.events is not None else None
        e, fired, code, event_fired = _fetch_step(error_norm if self.adaptive else None, flags, result.status,
                                                  event_flag)
        if code == StepStatus.FAILURE:
            out.stop(ReturnCode.Failure, f"the step from t = {t!r} failed: {result.reason or 'no reason given'}")
            return dt
        at_floor = min(abs(dt_step), abs(dt)) <= self.floor(t)  # a rejection here cannot shrink the step
        if code == StepStatus.REJECT:
            return self.reject_status(out, result, dt_step, at_floor)
        if self.adaptive and not math.isfinite(e):
            return self.reject_nonfinite(out, result, dt_step, at_floor)
        self.nonfinite_streak = 0
        if self.adaptive:
            self.last_error = e
        accept, dt_next, cstate_new = self.controller.decide(self.cstate, e if self.adaptive else None, dt_step)
        if not accept and at_floor and self.options.force_dtmin:
            accept = True  # the user's choice: a step at the floor goes on, its error uncontrolled
        if accept:
            if event_fired:
                result, t_new, fired = self.resolve_events(result, t, t_new, fired)
            elif self.events is not None:
                self.events.advance()
            self.accept(out, result, t_new, t_new - t if event_fired else dt_step, error_norm, cstate_new, stop)
            if fired:
                out.stop(ReturnCode.Terminated)
            if self.adaptive and t_new == stop and abs(dt_step) < abs(dt):
                # a step shortened to land on a stop time says nothing against the step proposed before
                dt_next = self.direction * max(abs(dt_next), abs(dt))
        else:
            out.nreject += 1
            self.state = _retry_state(result, self.state)
            if self.adaptive and at_floor:
                out.stop(ReturnCode.DtLessThanMin, f"the step of dt = {dt_step!r} was rejected and the step "
                         f"size cannot shrink below {self._floor_detail(t)}; the last scaled error estimate was "
                         f"{e:.3g}")
        return self.bound_next(dt_next)

    def resolve_events(self, result: StepResult, t: float, t_new: float, fired: bool):
        """An accepted step whose events fired: ``(result, t_end, stop)`` after the events, the step cut at the
        earliest one (termination flags were tested at the uncut end, so they count only without a cut)."""
        result, t_end, stop, self.field = self.events.resolve(self.field, result, t, t_new)
        return result, t_end, stop or (fired and t_end == t_new)

    def error_norm(self, result: StepResult, u) -> torch.Tensor | None:
        if self.adaptive:
            scaled = getattr(result, "scaled_error", None)  # a compiled step computed E in its graph
            if scaled is not None:
                return scaled
            if result.error_scale is not None:
                return self.error_norm_of.of_states(result, *result.error_scale)
            return self.error_norm_of(result, u)
        stats = self.stats
        if stats.enabled and not stats.steps_only and result.error_estimate is not None:
            options = self.options
            return scaled_error_norm(result.error_estimate, u, result.u_new, options.abstol, options.reltol,
                                     options.norm)
        return None

    def accept(self, out, result, t_new, dt_step, error_norm, cstate_new, stop) -> None:
        t, u_new = self.t, result.u_new
        out.naccept += 1
        self.stats.record(t, dt_step, error_norm, result, t_new)
        self.saver.on_step(t, t_new, u_new, result.dense_info)
        if self.dense is not None:
            self.dense.append(t, t_new, result.dense_info)
        if not self.adaptive:
            # the largest |u| is finite iff every entry is (max propagates NaN): a quarter of isfinite().all()'s cost
            self.finite_flags.append(torch.isfinite(u_new.detach().abs().amax()) if u_new.numel() else
                                     torch.ones((), dtype=torch.bool, device=u_new.device))
            self.fixed_steps.append((t, t_new))
        self.t, self.u, self.state, self.cstate = t_new, u_new, result.solver_state_new, cstate_new
        out.t, out.u = t_new, u_new
        if t_new == stop and stop != self.t1:
            self.stop_index += 1

    def reject_status(self, out, result, dt_step: float, at_floor: bool) -> float:
        """A step the solver itself rejected (e.g. Newton did not converge): shrink and retry."""
        out.nreject += 1
        self.state = _retry_state(result, self.state)
        if not self.adaptive:
            out.stop(ReturnCode.Failure, f"the fixed step from t = {self.t!r} was rejected by the solver "
                     f"({result.reason or 'no reason given'}) and fixed steps cannot be shrunk; use a "
                     "smaller dt or adaptive stepping")
            return dt_step
        if at_floor:
            out.stop(ReturnCode.DtLessThanMin, f"the solver kept rejecting the step from t = {self.t!r} "
                     f"({result.reason or 'no reason given'}) down to dt = {dt_step!r}")
        return self.bound_next(dt_step * STATUS_REJECT_SHRINK)

    def reject_nonfinite(self, out, result, dt_step: float, at_floor: bool) -> float:
        out.nreject += 1
        self.nonfinite_streak += 1
        self.state = _retry_state(result, self.state)
        if self.nonfinite_streak >= MAX_NONFINITE_STREAK or at_floor:
            out.stop(ReturnCode.Unstable, f"the step from t = {self.t!r} produced NaN/Inf "
                     f"{self.nonfinite_streak} times in a row, shrinking dt down to {dt_step!r}")
        return self.bound_next(dt_step * NONFINITE_SHRINK)

    def floor(self, t: float) -> float:
        """The shortest adaptive step from ``t`` (:func:`~pylux.diffeq.options.step_floor`)."""
        return step_floor(self.options.dtmin, t, self.options.time_dtype)

    def bound_next(self, dt_next: float) -> float:
        """The next proposal from ``self.t`` with its size within ``[floor, dtmax]`` (adaptive steps only).

        The floor (``dtmin``, or the time resolution at ``t`` if larger) works as in OrdinaryDiffEq.jl: a
        proposal below it is raised to it, and the solve ends as ``DtLessThanMin`` only when a step no longer
        than the floor is rejected (see :meth:`trial`)."""
        if not self.adaptive:
            return dt_next
        return self.direction * min(max(abs(dt_next), self.floor(self.t)), self.options.dtmax)

    def _floor_detail(self, t: float) -> str:
        """What the floor at ``t`` is: the user's ``dtmin`` or the resolution of the time type there."""
        dtmin, dtype = self.options.dtmin, self.options.time_dtype
        floor = self.floor(t)
        if floor > dtmin:
            name = str(dtype).replace("torch.", "")
            hint = "" if dtype == torch.float64 else "; a float64 tspan resolves smaller steps"
            return f"{floor!r}, 4 ulps of t = {t!r} in {name} time (the resolution of the time type{hint})"
        return f"dtmin = {dtmin!r}"

    def _time_resolution_detail(self) -> str:
        detail = f"t + dt == t in {str(self.options.time_dtype).replace('torch.', '')} time"
        if not self.adaptive:
            return detail + "; the fixed dt is below the time resolution at this t"
        if not math.isnan(self.last_error):
            detail += f"; the last scaled error estimate was {self.last_error:.3g}"
        return detail

    def check_fixed_steps(self, out: _Outcome) -> None:
        """Constant steps: one synchronisation at the end tells whether any step produced NaN/Inf."""
        if not self.finite_flags:
            return
        flags = torch.stack(self.finite_flags).tolist()
        if all(flags):
            return
        first_bad = flags.index(False)
        start, end = self.fixed_steps[first_bad]
        out.stop(ReturnCode.Unstable, f"the fixed step from t = {start!r} to {end!r} produced NaN/Inf; fixed "
                 "steps cannot be shrunk, so use a smaller dt or adaptive stepping")
        out.t = end


def _failure_message(out: _Outcome, options: SolveOptions) -> str:
    where = (f"at t = {out.t!r}, dt = {out.dt!r}, after {out.naccept + out.nreject} steps "
             f"({out.naccept} accepted, {out.nreject} rejected)")
    detail = out.detail
    if out.retcode == ReturnCode.MaxIters:
        detail = f"maxiters = {options.maxiters} reached"
    detail = f": {detail}" if detail else ""
    return f"solve stopped with retcode {out.retcode.name} {where}{detail}. Meaning: {out.retcode.message}."


def integrate(f, u0: torch.Tensor, t0: float, t1: float, solver: AbstractSolver,
              options: SolveOptions) -> Solution:
    """Solve ``du = term(u, t)`` from ``u(t0) = u0`` to ``t1`` (internal entry; see the module docstring).

    Args:
        f: what to integrate: a :class:`~pylux.diffeq.terms.BoundTerm` (a term
            with its parameters bound, e.g. ``ODETerm(f).bind(p)``), or a bound
            vector field ``f(u, t) -> du`` (an ODE term).
        u0: the initial state (validated by the caller; any shape, may be empty).
        t0, t1: host floats; ``t1 < t0`` integrates backward.
        solver: an :class:`~pylux.diffeq.solvers.AbstractSolver`.
        options: canonical :class:`~pylux.diffeq.options.SolveOptions`.

    Returns:
        a :class:`~pylux.diffeq.solution.Solution`; its ``final_state`` is
        ``(u, solver_state)`` where the solve stopped (the reversible pair's
        ``Z`` lives in the solver state).

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
        if any(isinstance(cb, AbstractEventCallback) for cb in options.callbacks):
            out.events = EventLog([])
    else:
        out = _Loop(field, solver, u0, t0, t1, options, saver, dense, stats_recorder).run()
    return _finish(out, field, u0, solver, options, saver, dense, stats_recorder)


def _finish(out: _Outcome, field: CountingField, u0, solver, options: SolveOptions, saver: Saver,
            dense, stats_recorder: StatsRecorder) -> Solution:
    times, blocks = saver.finish(out.t, out.u)
    stats = SolverStats(nf=field.count, naccept=out.naccept, nreject=out.nreject, ng=field.count_g)
    stats_recorder.finish(stats, options.time_dtype, u0)
    record = getattr(solver, "record_stats", None)
    if record is not None and out.solver_state is not None:  # the solver's own counters (Jacobians, LUs, ...)
        record(stats, out.solver_state)
    t_tensor = host_to_device(times, options.time_dtype, u0.device)
    # nothing saved: an empty slice of u0, so backpropagating through it gives u0 a zero gradient
    u_tensor = torch.cat(blocks) if blocks else u0.unsqueeze(0)[:0]
    failed = not out.retcode.successful
    message = _failure_message(out, options) if failed else out.retcode.message
    sol = Solution(t_tensor, u_tensor, out.retcode, stats, message=message, dense=dense,
                   solver=solver, u0=u0)
    sol.final_state = (out.u, out.solver_state)
    sol.events = out.events
    if failed and options.throw:
        raise ERROR_FOR_RETCODE[out.retcode](
            message + " Pass throw=False to get the partial solution instead of this error "
            "(it is also attached to this exception as .solution).",
            solution=sol, t=out.t, dt=out.dt)
    return sol
