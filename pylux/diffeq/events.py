"""Events in the integration loop: detection, root finding, the cut step, affects, frozen samples.

The loop (:mod:`pylux.diffeq.integrate`) hands every trial step to an
:class:`EventHandler` when the solve has event callbacks
(:class:`~pylux.diffeq.callbacks.ContinuousCallback`,
:class:`~pylux.diffeq.callbacks.DiscreteCallback`):

* :meth:`EventHandler.check` evaluates the conditions on the trial step (its
  end and the interior points of its dense output) on the device and returns
  one 0-d flag, fetched in the step's single host synchronisation; without
  event callbacks nothing here runs.
* :meth:`EventHandler.resolve` runs only for an accepted step whose flag is
  set: it locates each sample's event by the Illinois method on the dense
  output (:func:`illinois`), cuts the step at the earliest non-terminating
  event (or where every sample has terminated, if earlier), freezes each
  terminated sample at its own earliest terminating event (later events of a
  frozen sample neither fire nor are logged), applies the affects,
  re-initialises the solver at the new state, and records the events
  (:class:`EventLog`) with event times differentiable by the implicit
  function theorem.

The math and the user-facing behaviour are documented on the callbacks.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ._device import time_scalar, time_vector
from .callbacks import AbstractEventCallback, AbstractTerminationCallback, ContinuousCallback, DiscreteCallback
from .controllers import _round_time
from .interpolation import AbstractInterpolant
from .options import default_dtmin
from .solvers import AbstractAdaptiveSolver, StepResult
from .terms import BoundTerm

__all__ = ["EventLog", "EventHandler", "FrozenSamplesField", "illinois", "split_callbacks", "check_event_solve",
           "with_events"]

#: Most Illinois iterations per event; bisection takes over after ``_BISECT_AFTER``.
_MAX_ITERATIONS = 100
_BISECT_AFTER = 60
#: A bracket end whose value is at most this in magnitude carries only a sign (a condition just after its
#: event, at zero, with the sign it is moving into): the bracket is bisected until that end moves.
_SIGN_ONLY = float(np.finfo(np.float32).tiny)


# --- solve()-level validation ----------------------------------------------------------------------

def split_callbacks(callback) -> tuple[tuple, tuple]:
    """``(termination callbacks, event callbacks)`` from ``solve(callback=...)``; a ``TypeError`` otherwise."""
    if callback is None:
        return (), ()
    items = list(callback) if isinstance(callback, (list, tuple)) else [callback]
    for cb in items:
        if not isinstance(cb, (AbstractTerminationCallback, AbstractEventCallback)):
            raise TypeError("solve: callback must be a termination callback (TerminateSteadyState, TerminateWhen), "
                            "an event callback (ContinuousCallback, DiscreteCallback) or a list of them, got "
                            f"{type(cb).__name__}")
    return (tuple(cb for cb in items if isinstance(cb, AbstractTerminationCallback)),
            tuple(cb for cb in items if isinstance(cb, AbstractEventCallback)))


def check_event_solve(t1, termination, events, *, is_sde: bool, sensealg, solver, adaptive, saveat) -> None:
    """Refuse what events cannot do, and an infinite ``t1`` without a callback that can end the solve."""
    if events and is_sde:
        raise NotImplementedError("solve: event callbacks (ContinuousCallback, DiscreteCallback) are not supported "
                                  "for SDE problems; use a termination callback (TerminateWhen) instead")
    if events and sensealg is not None and not sensealg.differentiates_solver:
        # the capability is declared per instance (DirectAdjoint(checkpoints=c) does not differentiate the
        # solver's own operations, DirectAdjoint() does), so the instance is named, with its settings
        raise NotImplementedError(
            f"solve: event callbacks are not supported under sensealg={_describe(sensealg)}: its backward pass "
            "does not see the events (cut steps, affects, event times), since it recomputes or re-solves the "
            "steps without a tape of the forward solve, as the adjoint methods and the checkpointed "
            "DirectAdjoint(checkpoints=c) do. Use sensealg=DirectAdjoint() without checkpoints (or "
            "sensealg=None), which backpropagates through the events (event times by the implicit function "
            "theorem)")
    if not isinstance(t1, float) or math.isfinite(t1):
        return
    if not termination and not any(cb.terminates for cb in events):
        raise ValueError(f"solve: tspan ends at {t1!r}; an infinite end needs a callback that ends the solve "
                         "(a ContinuousCallback or DiscreteCallback with affect=terminate, TerminateSteadyState "
                         "or TerminateWhen)")
    if adaptive is False or not isinstance(solver, AbstractAdaptiveSolver):
        raise ValueError(f"solve: tspan ends at {t1!r}, but fixed steps walk a grid to t1; use an adaptive "
                         "solver such as Tsit5() for an infinite end")
    if isinstance(saveat, (int, float)) and not isinstance(saveat, bool):
        raise ValueError(f"solve: a saveat spacing needs a finite tspan end, and tspan ends at {t1!r}; pass the "
                         "saved times as a sequence")


def _describe(sensealg) -> str:
    """The algorithm with its settings where it says them (its own ``repr``), else its class name."""
    if type(sensealg).__repr__ is object.__repr__:
        return f"{type(sensealg).__name__}()"
    return repr(sensealg)


def with_events(options, events: tuple, t0: float, t1: float, dtmin):
    """``options`` carrying the event callbacks too, with a finite default ``dtmin`` for an infinite ``t1``."""
    if not events and (not isinstance(t1, float) or math.isfinite(t1)):
        return options
    changes = {"callbacks": options.callbacks + tuple(events)}
    if dtmin is None and isinstance(t1, float) and not math.isfinite(t1):
        changes["dtmin"] = default_dtmin(max(abs(t0), 1.0), options.time_dtype)
    return options.replace(**changes)


# --- the record of a solve's events ----------------------------------------------------------------

class EventLog:
    """The events of a solve, in the order they happened (``sol.events``).

    Attributes:
        t: event times, shape ``(n,)``, time dtype. Under ``DirectAdjoint`` the
            times of continuous events are differentiable (implicit function
            theorem, see :class:`~pylux.diffeq.callbacks.ContinuousCallback`).
        callback: which event callback fired: its index among the event
            callbacks (ContinuousCallback, DiscreteCallback) of
            ``solve(callback=[...])``, in their order there (termination
            callbacks are not counted).
        sample: flat index of the sample within the condition's shape (0 for
            a 0-d condition).
        u: the state at each event before its affect: the whole state for a
            0-d condition, the sample's slice ``u[idx]`` otherwise.
        terminal: whether each event froze its sample / ended the solve.
    """

    def __init__(self, shapes: Sequence[tuple]) -> None:
        self.shapes = list(shapes)
        self._t: list[torch.Tensor] = []
        self._callback: list[int] = []
        self._sample: list[int] = []
        self.u: list[torch.Tensor] = []
        self._terminal: list[bool] = []

    def record(self, t: torch.Tensor, callback: int, samples, states: torch.Tensor, terminal: bool) -> None:
        """Events of one callback: times ``(m,)``, flat sample indices, their states ``(m, ...)``."""
        self._t.append(t.reshape(-1))
        self._callback.extend([callback] * len(samples))
        self._sample.extend(int(s) for s in samples)
        self.u.extend(states.unbind(0))
        self._terminal.extend([terminal] * len(samples))

    @property
    def t(self) -> torch.Tensor:
        return torch.cat(self._t) if self._t else torch.zeros(0, dtype=torch.float64)

    @property
    def callback(self) -> torch.Tensor:
        return torch.tensor(self._callback, dtype=torch.long)

    @property
    def sample(self) -> torch.Tensor:
        return torch.tensor(self._sample, dtype=torch.long)

    @property
    def terminal(self) -> torch.Tensor:
        return torch.tensor(self._terminal, dtype=torch.bool)

    def first_times(self, callback: int = 0) -> torch.Tensor:
        """Each sample's first event time of ``callback`` (the condition's shape; NaN where none fired)."""
        shape = self.shapes[callback]
        t = self.t
        out = torch.full((math.prod(shape),), math.nan, dtype=t.dtype, device=t.device)
        seen: set = set()
        for j, (c, s) in enumerate(zip(self._callback, self._sample)):
            if c == callback and s not in seen:
                seen.add(s)
                out = out.index_put((torch.tensor([s], device=t.device),), t[j:j + 1])
        return out.reshape(shape)

    def __len__(self) -> int:
        return len(self._callback)

    def __repr__(self) -> str:
        return f"EventLog({len(self)} events, callbacks {sorted(set(self._callback))})"


# --- pieces of the dense output of a step with events -------------------------------------------------

class _TruncatedPiece(AbstractInterpolant):
    """The step's interpolant restricted to ``[0, fraction]`` of it, reparametrised over ``[0, 1]``."""

    __slots__ = ("piece", "fraction")

    def __init__(self, piece: AbstractInterpolant, fraction: float) -> None:
        self.piece, self.fraction = piece, fraction

    def evaluate(self, thetas):
        return self.piece.evaluate([th * self.fraction for th in thetas])


class _FrozenPiece(AbstractInterpolant):
    """The step's interpolant with samples held at their event state after their own event ``theta``."""

    __slots__ = ("piece", "groups")

    def __init__(self, piece: AbstractInterpolant, groups: list) -> None:
        # groups: (theta per sample (n,) with +inf where not frozen, mask shape, state with event rows)
        self.piece, self.groups = piece, groups

    def evaluate(self, thetas):
        out = self.piece.evaluate(thetas)
        for theta_star, shape, frozen_state in self.groups:
            at = torch.tensor(thetas, dtype=theta_star.dtype, device=theta_star.device)
            after = (at[:, None] > theta_star[None, :]).reshape((len(thetas),) + shape)
            out = torch.where(after, frozen_state.unsqueeze(0), out)
        return out


class FrozenSamplesField(BoundTerm):
    """An ODE field whose derivative is zero on the frozen samples (``keep`` is False there)."""

    __slots__ = ("inner", "keep")

    def __init__(self, inner: BoundTerm, keep: torch.Tensor) -> None:
        super().__init__(inner.term, inner.p)
        self.inner, self.keep = inner, keep

    def vf(self, u, t):
        return torch.where(self.keep, self.inner.vf(u, t), 0.0)


# --- root finding ------------------------------------------------------------------------------------

def illinois(g_of, a, b, ga, gb, tol: float, iterations: int = _MAX_ITERATIONS):
    """Vectorised Illinois method on brackets ``[a, b]`` with ``sign(ga) != sign(gb)`` or ``gb == 0``.

    ``g_of(x, idx)`` evaluates the functions ``idx`` (an index array) at ``x``.
    Each iteration takes the regula-falsi point of the (scaled) end values;
    when the same end is kept twice running, its value is halved (Dowell &
    Jarratt 1971), which makes both ends converge, superlinearly. The
    midpoint is taken instead for a point outside the open bracket, when two
    iterations have not halved the bracket, while the near end only carries a
    sign (``|g(a)| <= _SIGN_ONLY``), and after ``_BISECT_AFTER`` iterations;
    a point is kept at least ``tol / 2`` inside the bracket (as Brent's
    method steps by at least the tolerance), so an end already on the root
    ends the search in one more evaluation. Stops per function when ``b - a <=
    tol`` or ``g(b) == 0``. Returns the final ``(a, b, g(a), g(b))``; ``b`` is on
    the far side of the sign change (or the exact zero).
    """
    a, b, ga, gb = (np.array(x, dtype=np.float64) for x in (a, b, ga, gb))
    fa, fb = ga.copy(), gb.copy()
    near_sign = np.sign(ga)
    last = np.zeros(a.shape, dtype=np.int8)  # -1: a moved last, +1: b moved last
    widths = [b - a, b - a]
    for it in range(iterations):
        idx = np.nonzero((b - a > tol) & (gb != 0))[0]
        if not idx.size:
            break
        with np.errstate(invalid="ignore", divide="ignore"):
            x = (a[idx] * fb[idx] - b[idx] * fa[idx]) / (fb[idx] - fa[idx])
        slow = (b - a)[idx] > 0.5 * widths[-2][idx]
        midpoint = ~((x > a[idx]) & (x < b[idx])) | slow | (np.abs(fa[idx]) <= _SIGN_ONLY) | (it >= _BISECT_AFTER)
        x[midpoint] = 0.5 * (a[idx] + b[idx])[midpoint]
        # at least half a tolerance from either end: once one end sits on the root, the next point settles it
        x = np.clip(x, a[idx] + 0.5 * tol, b[idx] - 0.5 * tol)
        widths = [widths[-1], b - a]
        gx = np.asarray(g_of(x, idx), dtype=np.float64)
        near = np.sign(gx) == near_sign[idx]
        _move(idx[near], x[near], gx[near], a, ga, fa, fb, last, -1)
        _move(idx[~near], x[~near], gx[~near], b, gb, fb, fa, last, +1)
    return a, b, ga, gb


def _move(idx, x, gx, end, g_end, f_end, f_other, last, tag: int) -> None:
    """Move one end of the brackets ``idx`` to ``x``; halve the other end's value if this end moved last time."""
    end[idx], g_end[idx], f_end[idx] = x, gx, gx
    again = idx[last[idx] == tag]
    f_other[again] *= 0.5
    last[idx] = tag


# --- conditions ----------------------------------------------------------------------------------------

def _condition_value(cb: AbstractEventCallback, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``cb.condition(u, t)`` as a tensor, checked: the right kind, 0-d or ``u``'s leading shape, ``u``'s device."""
    out = cb.condition(u, t)
    owner = type(cb).__name__
    boolean = isinstance(cb, DiscreteCallback)
    if not isinstance(out, torch.Tensor):
        if isinstance(out, (bool, int, float)) and (boolean or not isinstance(out, bool)):
            return torch.tensor(out, dtype=torch.bool if boolean else u.dtype, device=u.device)
        raise TypeError(f"{owner}: condition(u, t) must return a tensor, got {type(out).__name__}")
    if boolean and out.dtype != torch.bool:
        raise TypeError(f"{owner}: condition(u, t) must return a boolean tensor, got {out.dtype}; "
                        "compare, e.g. u[..., 0] < 0")
    if not boolean and not out.dtype.is_floating_point:
        raise TypeError(f"{owner}: condition(u, t) must return a real floating-point tensor whose zero is the "
                        f"event, got {out.dtype} (a boolean condition belongs in DiscreteCallback)")
    if out.dim() > u.dim() or tuple(out.shape) != tuple(u.shape[:out.dim()]):
        raise ValueError(f"{owner}: condition(u, t) returned shape {tuple(out.shape)} for a state of shape "
                         f"{tuple(u.shape)}; it must return one value per sample: a 0-d tensor (one event for "
                         f"the whole state) or the state's leading (batch) shape, e.g. {tuple(u.shape[:1])}")
    if out.device != u.device:
        raise ValueError(f"{owner}: condition(u, t) returned a tensor on {out.device} for a state on {u.device}")
    return out


def _condition_rate(callback, u: torch.Tensor, t: torch.Tensor, f_u: torch.Tensor) -> torch.Tensor:
    """``dg/du f + dg/dt`` at ``(u, t)``: the condition's rate along the solution (a Jacobian-vector product)."""
    _, rate = torch.autograd.functional.jvp(callback.condition, (u, t.detach()), (f_u, torch.ones_like(t)))
    return rate.detach()


def _wanted_crossings(G: torch.Tensor, direction: int) -> torch.Tensor:
    """``(m+1, n)``: where consecutive samples ``G[j], G[j+1]`` cross zero in the wanted direction."""
    prev, nxt = G[:-1], G[1:]
    up = (prev < 0) & (nxt >= 0)
    down = (prev > 0) & (nxt <= 0)
    return up if direction > 0 else down if direction < 0 else up | down


class _Tracked:
    """One event callback along a solve: its index, the condition's shape, and (continuous) its value at
    the current step's start per sample, with the last trial step's samples."""

    def __init__(self, index: int, callback: AbstractEventCallback, u0: torch.Tensor, t0: torch.Tensor) -> None:
        self.index, self.callback = index, callback
        g = _condition_value(callback, u0, t0).detach()
        self.shape = tuple(g.shape)
        self.n = g.numel()
        self.trailing = (1,) * (u0.dim() - g.dim())
        self.g_start = g.reshape(-1)
        self.pending = None

    def sample_along(self, states, times, active) -> torch.Tensor:
        values = [self.g_start] + [_condition_value(self.callback, s, t).reshape(-1).to(self.g_start.dtype)
                                   for s, t in zip(states, times)]
        G = torch.stack(values)
        hit = _wanted_crossings(G, self.callback.direction)
        if active is not None:
            hit = hit & active
        self.pending = (G, hit)
        return hit.any()

    def test(self, u, t, active) -> torch.Tensor:
        mask = _condition_value(self.callback, u, t).reshape(-1)
        if active is not None:
            mask = mask & active
        self.pending = mask
        return mask.any()

    def mask(self, samples, like: torch.Tensor) -> torch.Tensor:
        """A boolean mask broadcastable to the state, True on ``samples``."""
        flat = torch.zeros(self.n, dtype=torch.bool, device=like.device)
        flat[torch.as_tensor(samples, dtype=torch.long, device=like.device)] = True
        return flat.reshape(self.shape + self.trailing)


def _put_rows(state: torch.Tensor, n: int, samples, rows: torch.Tensor) -> torch.Tensor:
    """``state`` with the given samples' rows replaced (out of place, differentiable)."""
    flat = state.reshape(n, -1).clone()
    flat[torch.as_tensor(samples, dtype=torch.long, device=state.device)] = rows.to(state.dtype)
    return flat.reshape(state.shape)


def _at(moving: list, t_cut) -> list:
    """The non-terminating located events exactly at ``t_cut`` (the others are found again after the cut)."""
    kept = [f.subset([x == t_cut for x in f.times]) for f in moving]
    return [f for f in kept if f.samples.size]


class _Found:
    """Located events of one continuous callback in a step: samples, their thetas and host times, the
    condition's magnitude at the final bracket (the band treated as zero right after the event)."""

    __slots__ = ("tracked", "samples", "thetas", "times", "band")

    def __init__(self, tracked, samples, thetas, times, band) -> None:
        self.tracked, self.samples, self.thetas, self.times, self.band = tracked, samples, thetas, times, band

    def subset(self, keep) -> "_Found":
        keep = np.asarray(keep, dtype=bool)
        return _Found(self.tracked, self.samples[keep], self.thetas[keep],
                      [x for x, k in zip(self.times, keep) if k], self.band[keep])


# --- the handler ----------------------------------------------------------------------------------------

class EventHandler:
    """Event callbacks of one solve (see the module docstring). ``callbacks`` is ``options.callbacks``."""

    def __init__(self, callbacks, solver, u0: torch.Tensor, t0: float, t1: float, time) -> None:
        self.time = time
        self.solver = solver
        self.direction = 1.0 if t1 >= t0 else -1.0
        events = [cb for cb in callbacks if isinstance(cb, AbstractEventCallback)]
        t0_tensor = time_scalar(t0, *time)
        self.tracked = [_Tracked(i, cb, u0, t0_tensor) for i, cb in enumerate(events)]
        self.continuous = [tr for tr in self.tracked if isinstance(tr.callback, ContinuousCallback)]
        self.discrete = [tr for tr in self.tracked if isinstance(tr.callback, DiscreteCallback)]
        interior = max([tr.callback.interp_points for tr in self.continuous], default=0)
        if self.continuous and solver.steps_onto_saveat and (
                interior or any(tr.callback.rootfind for tr in self.continuous)):
            raise ValueError(f"ContinuousCallback: {type(solver).__name__}() has no dense output to locate events "
                             "on; pass rootfind=False, interp_points=0 (events at step ends) or use another solver")
        self.grid = np.linspace(0.0, 1.0, interior + 2)
        self.log = EventLog([tr.shape for tr in self.tracked])
        self.frozen: torch.Tensor | None = None
        self.active: dict[int, torch.Tensor] = {}

    # per trial step: device-side detection ------------------------------------------------------------
    def check(self, result: StepResult, t: float, t_new: float) -> torch.Tensor:
        """A 0-d flag: some event fires within this trial step (no host synchronisation)."""
        with torch.no_grad():
            states, times = self._samples(result, t, t_new)
            flags = [tr.sample_along(states, times, self.active.get(tr.index)) for tr in self.continuous]
            flags += [tr.test(result.u_new, times[-1], self.active.get(tr.index)) for tr in self.discrete]
        return torch.stack(flags).any()

    def _samples(self, result: StepResult, t: float, t_new: float):
        thetas = list(self.grid[1:-1])
        dt = t_new - t
        times = list(time_vector([_round_time(t + th * dt, self.time[0]) for th in thetas], *self.time)) \
            if thetas else []
        states = list(result.dense_info.evaluate(thetas).unbind(0)) if thetas else []
        return states + [result.u_new], times + [time_scalar(t_new, *self.time)]

    def advance(self) -> None:
        """An accepted step without events: each condition's start value becomes its end value."""
        for tr in self.continuous:
            tr.g_start = tr.pending[0][-1]

    # an accepted step with events ---------------------------------------------------------------------
    def resolve(self, field: BoundTerm, result: StepResult, t: float, t_new: float):
        """``(result, t_end, stop, field)`` of the accepted step after its events (see the module docstring)."""
        piece, dt = result.dense_info, t_new - t
        with torch.no_grad():
            crossings = [(tr, *self._first_crossings(tr)) for tr in self.continuous]
            # no event can precede the earliest sub-interval with a non-terminating crossing: nothing past it is
            # located in this step (it is found again after the cut)
            limit = min((j.min() for tr, samples, j, _ in crossings if samples.size and not tr.callback.terminates),
                        default=None)
            found = [f for f in (self._locate(*c, piece, t, dt, limit) for c in crossings) if f is not None]
        moving, freezing, t_end, stop = self._plan(found, t, t_new, result.u_new)
        theta_end = (t_end - t) / dt
        step = _StepEvents(self, field, piece, t, dt, theta_end, freezing)
        step.freeze(freezing)
        step.move(moving)
        stop = step.discrete(changed=t_end != t_new) or stop
        self.frozen = step.frozen
        new_field = self._field(field, step)
        u_new = step.u
        state = result.solver_state_new
        if step.changed or t_end != t_new:
            state = self.solver.init(new_field, time_scalar(t_end, *self.time), u_new,
                                     time_scalar(dt, *self.time), None)
        self._restart_conditions(moving, new_field, u_new, t_end, recompute=step.changed or t_end != t_new)
        step.write_log(self.log, self.direction)
        out_piece = _FrozenPiece(piece, step.frozen_groups) if step.frozen_groups else piece
        if t_end != t_new:
            out_piece = _TruncatedPiece(out_piece, theta_end)
        new = StepResult(u_new, None, dense_info=out_piece, solver_state_new=state, nfe=result.nfe,
                         stiffness_stages=result.stiffness_stages)
        return new, t_end, stop, new_field

    def _field(self, field: BoundTerm, step: "_StepEvents") -> BoundTerm:
        if not step.newly_frozen:
            return field
        base = field.inner if isinstance(field, FrozenSamplesField) else field
        keep = ~self.frozen
        self.active = {tr.index: ~self.frozen.reshape(tr.n, -1).all(1) for tr in self.tracked}
        return FrozenSamplesField(base, keep)

    @staticmethod
    def _first_crossings(tr: _Tracked):
        """On the host: the samples with a wanted crossing, the index of the first sampled interval holding
        it, and the sampled condition values."""
        G, hit = (x.cpu().numpy() for x in tr.pending)
        samples = np.nonzero(hit.any(0))[0]
        return samples, hit[:, samples].argmax(0), G

    def _locate(self, tr: _Tracked, samples, j, G, piece, t: float, dt: float, limit) -> _Found | None:
        """Each crossing's event time by root finding, for crossings in sampled intervals up to ``limit``."""
        if limit is not None:
            keep = j <= limit if tr.callback.terminates else j == limit
            samples, j = samples[keep], j[keep]
        if not samples.size:
            return None
        a, b = self.grid[j], self.grid[j + 1]
        ga, gb = G[j, samples], G[j + 1, samples]
        if tr.callback.rootfind:
            span = max(abs(t), abs(t + dt), torch.finfo(torch.float64).tiny)
            tol = max(tr.callback.abstol, 4 * torch.finfo(self.time[0]).eps * span) / abs(dt)
            a, b, ga, gb = illinois(lambda x, idx: self._g_at(tr, piece, t, dt, x, samples[idx]), a, b, ga, gb, tol)
        times = [_round_time(t + float(th) * dt, self.time[0]) for th in b]
        thetas = np.array([(x - t) / dt for x in times])
        return _Found(tr, samples, thetas, times, np.maximum(np.abs(ga), np.abs(gb)))

    def _g_at(self, tr: _Tracked, piece, t: float, dt: float, thetas, samples) -> np.ndarray:
        """The condition of each sample at its own ``theta`` along the step's interpolant."""
        unique, inverse = np.unique(thetas, return_inverse=True)
        values = piece.evaluate(list(unique))
        times = time_vector([_round_time(t + th * dt, self.time[0]) for th in unique], *self.time)
        g = torch.stack([_condition_value(tr.callback, values[k], times[k]).reshape(-1) for k in range(len(unique))])
        rows = torch.as_tensor(inverse.reshape(-1), device=g.device)
        return g[rows, torch.as_tensor(samples, device=g.device)].double().cpu().numpy()

    def _plan(self, found: list[_Found], t: float, t_new: float, u_new: torch.Tensor):
        """Which located events fire in this step, where it ends, and whether the solve stops.

        The step ends at the earliest located non-terminating event (the others are found again after the
        cut; it ends there even if that event's samples froze before it, and then nothing fires there), or
        earlier where every sample is frozen by then. Terminating events up to there fire in time
        order, each only while its samples are not yet all frozen: a sample terminates at its earliest event
        and no later event of it fires or is logged (events at the same time all fire)."""
        d = self.direction
        moving = [f for f in found if not f.tracked.callback.terminates]
        t_cut = min((x for f in moving for x in f.times), key=lambda x: d * x, default=None)
        terminating = [f if t_cut is None else f.subset([d * x <= d * t_cut for x in f.times])
                       for f in found if f.tracked.callback.terminates]
        terminating = [f for f in terminating if f.samples.size]
        at_cut = _at(moving, t_cut)
        fires, t_all = self._fire_in_order(terminating + at_cut, u_new)
        freezing = [s for s in (f.subset(k) for f, k in zip(terminating, fires)) if s.samples.size]
        if t_all is not None:
            # every sample is frozen at t_all: the solve ends there; later events do not happen
            fired = [f.subset(k) for f, k in zip(at_cut, fires[len(terminating):])] if t_all == t_cut else []
            return [f for f in fired if f.samples.size], freezing, t_all, True
        fired = [f.subset(k) for f, k in zip(at_cut, fires[len(terminating):])]
        return [f for f in fired if f.samples.size], freezing, (t_new if t_cut is None else t_cut), False

    def _fire_in_order(self, events: list[_Found], like: torch.Tensor):
        """``(fires, t_all)``: per located event whether it fires, and the time at which every sample is frozen
        (``None`` if not within ``events``). Walked in time order with a host record of the frozen state's
        elements: an event fires unless its samples were all frozen strictly before it; a terminating one that
        fires freezes them. A zero-size state is all frozen once any terminating event fires."""
        d = self.direction
        # a copy: the numpy view of a CPU tensor shares its memory, and this record is written to
        frozen = (self.frozen.cpu().numpy().copy() if self.frozen is not None
                  else np.zeros(tuple(like.shape), dtype=bool)).reshape(-1)
        remaining = int(frozen.size - np.count_nonzero(frozen))
        fires = [np.zeros(f.samples.size, dtype=bool) for f in events]
        order = sorted(((d * x, k, i) for k, f in enumerate(events) for i, x in enumerate(f.times)),
                       key=lambda e: e[0])
        any_frozen = False
        start = 0
        while start < len(order):
            stop = start
            while stop < len(order) and order[stop][0] == order[start][0]:
                stop += 1
            group = order[start:stop]
            for _, k, i in group:  # against the frozen state before this time
                rows = frozen.reshape(events[k].tracked.n, -1)[events[k].samples[i]]
                fires[k][i] = not rows.all() if frozen.size else not any_frozen
            for _, k, i in group:
                f = events[k]
                if fires[k][i] and f.tracked.callback.terminates:
                    rows = frozen.reshape(f.tracked.n, -1)
                    remaining -= int(rows.shape[1] - np.count_nonzero(rows[f.samples[i]]))
                    rows[f.samples[i]] = True
                    any_frozen = True
            if any_frozen and remaining == 0:
                return fires, events[group[0][1]].times[group[0][2]]
            start = stop
        return fires, None

    def _restart_conditions(self, fired: list[_Found], field, u: torch.Tensor, t_end: float, recompute: bool) -> None:
        """Each condition's value where the next step starts. A fired sample within its band of zero is at
        zero, signed as the condition moves on (``dg/dt`` along the solution, negated backward in time), so
        the same event does not fire again and the next crossing is found even past the step's first sampled
        point."""
        t_tensor = time_scalar(t_end, *self.time)
        with torch.no_grad():
            for tr in self.continuous:
                if recompute:
                    tr.g_start = _condition_value(tr.callback, u, t_tensor).reshape(-1).to(tr.g_start.dtype)
                else:
                    tr.g_start = tr.pending[0][-1]
            f_u = field.vf(u, t_tensor) if fired else None
        for f in fired:
            g = f.tracked.g_start
            idx = torch.as_tensor(f.samples, device=g.device)
            band = torch.as_tensor(2.0 * f.band, dtype=g.dtype, device=g.device)
            g_dot = _condition_rate(f.tracked.callback, u.detach(), t_tensor, f_u).reshape(-1)[idx].to(g.dtype)
            # the sign the condition moves into along the solve: dg/dt's, negated when integrating backward
            signed_zero = torch.sign(self.direction * g_dot) * torch.finfo(g.dtype).tiny
            f.tracked.g_start = g.index_put((idx,), torch.where(g[idx].abs() <= band, signed_zero, g[idx]))


class _StepEvents:
    """The state of one accepted step while its events are applied (terminations, affects, discrete)."""

    def __init__(self, handler: EventHandler, field, piece, t: float, dt: float, theta_end: float,
                 freezing: list[_Found]) -> None:
        self.handler, self.field, self.piece = handler, field, piece
        self.t, self.dt, self.theta_end = t, dt, theta_end
        thetas = sorted({theta_end} | {float(x) for f in freezing for x in f.thetas})
        self.thetas = thetas
        self.values = piece.evaluate(thetas)
        self.u = self.values[thetas.index(theta_end)]
        self.frozen = handler.frozen
        self.newly_frozen = False
        self.changed = False
        self.frozen_groups: list = []
        self.entries: list = []

    def _time(self, theta: float) -> float:
        return _round_time(self.t + theta * self.dt, self.handler.time[0])

    def event_states(self, tr: _Tracked, theta: float, samples):
        """``(t*, rows)`` of ``samples`` at ``theta``: differentiable by the implicit function theorem."""
        u_k = self.values[self.thetas.index(theta)]
        t_k = time_scalar(self._time(theta), *self.handler.time)
        idx = torch.as_tensor(samples, dtype=torch.long, device=u_k.device)
        rows = u_k.reshape(tr.n, -1)[idx]
        t_star = t_k.expand(len(samples))
        if not torch.is_grad_enabled():
            return t_star, rows
        g = tr.callback.condition(u_k, t_k)
        if not (isinstance(g, torch.Tensor) and g.requires_grad):
            return t_star, rows
        with torch.no_grad():
            f_k = self.field.vf(u_k.detach(), t_k)
        g_dot = _condition_rate(tr.callback, u_k.detach(), t_k, f_k).reshape(-1)[idx]
        g_dot = torch.where(g_dot == 0, torch.full_like(g_dot, torch.finfo(g_dot.dtype).tiny), g_dot)
        g_sel = g.reshape(-1)[idx]
        shift = -(g_sel - g_sel.detach()) / g_dot
        return t_star + shift.to(t_k.dtype), rows + f_k.reshape(tr.n, -1)[idx] * shift.to(rows.dtype)[:, None]

    def freeze(self, freezing: list[_Found]) -> None:
        """Terminating events, in time order: each sample is held at its own event state from its event time
        on; elements already frozen (by another callback's earlier event) keep their held values."""
        groups = sorted(((theta, f.tracked.index, f) for f in freezing for theta in set(f.thetas.tolist())),
                        key=lambda g: g[:2])
        for theta, _, f in groups:
            tr = f.tracked
            pick = f.thetas == theta
            samples = f.samples[pick]
            t_star, rows = self.event_states(tr, theta, samples)
            if self.frozen is not None:
                idx = torch.as_tensor(samples, dtype=torch.long, device=self.u.device)
                prior = self.frozen.expand_as(self.u).reshape(tr.n, -1)[idx]
                rows = torch.where(prior, self.u.reshape(tr.n, -1)[idx], rows.to(self.u.dtype))
            self.entries.append((self._time(theta), t_star, tr, samples, rows, True))
            held = _put_rows(self.u, tr.n, samples, rows)
            theta_star = torch.full((tr.n,), math.inf, dtype=torch.float64, device=self.u.device)
            theta_star[torch.as_tensor(samples, device=self.u.device)] = theta
            self.frozen_groups.append((theta_star, tr.shape + tr.trailing, held))
            self.u = held
            self._mark_frozen(tr.mask(samples, self.u))

    def _mark_frozen(self, mask: torch.Tensor) -> None:
        base = self.frozen if self.frozen is not None else torch.zeros_like(self.u, dtype=torch.bool)
        self.frozen = base | mask
        self.newly_frozen = self.changed = True

    def move(self, moving: list[_Found]) -> None:
        """Non-terminating events at the step's end: affects, then the jump of the sensitivities."""
        shifts = torch.zeros_like(self.u)
        for f in moving:
            t_star, rows = self.event_states(f.tracked, self.theta_end, f.samples)
            self.entries.append((self._time(self.theta_end), t_star, f.tracked, f.samples, rows, False))
            self.u = _put_rows(self.u, f.tracked.n, f.samples, rows)
            shift_rows = (t_star - t_star.detach()).to(self.u.dtype)[:, None].expand(rows.shape)
            shifts = _put_rows(shifts, f.tracked.n, f.samples, shift_rows)
        t_end = time_scalar(self._time(self.theta_end), *self.handler.time)
        for f in moving:
            self._widen_band(f, t_end)
        for f in moving:
            if f.tracked.callback.affect is not None:
                self._affect(f.tracked, f.samples, t_end)
        if moving and shifts.requires_grad:
            with torch.no_grad():
                f_plus = self.field.vf(self.u.detach(), t_end)
            self.u = self.u - f_plus * shifts

    def _widen_band(self, f: _Found, t_end: torch.Tensor) -> None:
        """The band of zero also holds the condition at the event state itself (rounded differently from the
        root finder's points), so an affect that leaves the condition alone does not fire it again."""
        with torch.no_grad():
            g = _condition_value(f.tracked.callback, self.u, t_end).reshape(-1)
            at_event = g[torch.as_tensor(f.samples, device=g.device)].abs().double().cpu().numpy()
        f.band = np.maximum(f.band, at_event)

    def _affect(self, tr: _Tracked, samples, t_end: torch.Tensor) -> None:
        new = tr.callback.affect(self.u, t_end)
        if not isinstance(new, torch.Tensor) or new.shape != self.u.shape or new.dtype != self.u.dtype \
                or new.device != self.u.device:
            got = (f"{tuple(new.shape)} {new.dtype} on {new.device}" if isinstance(new, torch.Tensor)
                   else type(new).__name__)
            raise ValueError(f"{type(tr.callback).__name__}: affect(u, t) must return a new state like u "
                             f"({tuple(self.u.shape)} {self.u.dtype} on {self.u.device}), got {got}")
        self.u = torch.where(tr.mask(samples, self.u), new, self.u)
        self.changed = True

    def discrete(self, changed: bool) -> bool:
        """Discrete callbacks at the step's end; True when every sample is then frozen."""
        t_end = time_scalar(self._time(self.theta_end), *self.handler.time)
        stop = False
        for tr in self.handler.discrete:
            mask = tr.pending
            if changed or self.changed:
                mask = _condition_value(tr.callback, self.u, t_end).reshape(-1)
            if self.frozen is not None:
                mask = mask & ~self.frozen.reshape(tr.n, -1).all(1)
            samples = np.nonzero(mask.cpu().numpy())[0]
            if not samples.size:
                continue
            rows = self.u.reshape(tr.n, -1)[torch.as_tensor(samples, device=self.u.device)]
            self.entries.append((self._time(self.theta_end), t_end.expand(len(samples)), tr, samples, rows,
                                 tr.callback.terminates))
            if tr.callback.terminates:
                self._mark_frozen(tr.mask(samples, self.u))
                stop = bool(self.frozen.all())
            else:
                self._affect(tr, samples, t_end)
        return stop

    def write_log(self, log: EventLog, direction: float) -> None:
        """Append this step's events in time order."""
        for _, t_star, tr, samples, rows, terminal in sorted(self.entries, key=lambda e: direction * e[0]):
            states = rows.reshape((len(samples),) + tuple(self.u.shape[len(tr.shape):]))
            log.record(t_star, tr.index, samples, states, terminal)
