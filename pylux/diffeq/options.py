"""``SolveOptions``: the validated, canonical form of ``solve()``'s keyword arguments.

Every keyword is checked once, here, and converted to one canonical form
(host floats for times, a tuple for ``saveat`` in the direction of
integration, a controller object, a norm callable, a tuple of callbacks), so
the loop never re-validates. The sensitivity algorithms receive a
``SolveOptions`` from :func:`~pylux.diffeq.solve` and may derive new ones with
:func:`dataclasses.replace` (e.g. a seminorm for the adjoint's augmented state)
or build them with :func:`make_options` for a different span.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..core.keywords import check_keywords
from .callbacks import AbstractTerminationCallback
from .controllers import AbstractController, ConstantStepSize, IController, _round_time
from .norms import rms_norm
from .solvers import AbstractAdaptiveSolver, AbstractSolver

__all__ = ["SolveOptions", "make_options", "SOLVE_KEYWORDS", "check_keywords", "step_floor", "default_dtmin"]

#: an adaptive step from ``t`` is never shorter than this many ulps of ``|t|`` (see :func:`step_floor`)
RESOLUTION_ULPS = 4

SOLVE_KEYWORDS = (
    "dt", "adaptive", "saveat", "tstops", "save_everystep", "save_start", "save_end", "dense", "reltol",
    "abstol", "controller", "norm", "dtmin", "force_dtmin", "dtmax", "maxiters", "callback", "save_stats", "throw",
    "sensealg", "batch", "saveat_mask",
)


@dataclass(frozen=True)
class SolveOptions:
    """Canonical solve options (see :func:`pylux.diffeq.solve` for the meaning of each field).

    ``dt`` is a magnitude (the initial step when ``adaptive``, the fixed step
    otherwise, ``None`` to choose it automatically); ``saveat`` is ``None`` or a
    tuple of host floats strictly monotone in the direction of integration,
    inside ``tspan``; ``abstol`` is a float or a tensor broadcastable to the
    state; ``callbacks`` a tuple of termination callbacks.
    """

    adaptive: bool
    dt: float | None
    saveat: tuple[float, ...] | None
    save_everystep: bool
    save_start: bool
    save_end: bool
    dense: bool
    reltol: float
    abstol: Any
    controller: AbstractController | None
    norm: Callable[[torch.Tensor], torch.Tensor]
    dtmin: float
    dtmax: float
    maxiters: int
    callbacks: tuple[AbstractTerminationCallback, ...]
    save_stats: bool
    throw: bool
    time_dtype: torch.dtype = torch.float64
    #: record each accepted step's host ``t`` and ``dt`` (``sol.stats.t``/``.dt``) without the tensor
    #: internals of ``save_stats``; the adjoint sensealgs set it on their forward solves
    save_steps: bool = False
    #: times the solve steps exactly onto (host floats inside tspan, in the direction of integration)
    tstops: tuple[float, ...] = ()
    #: accept a step at the floor whatever its error estimate, instead of ending the solve
    force_dtmin: bool = False

    def replace(self, **changes) -> "SolveOptions":
        """``dataclasses.replace`` with unknown field names rejected by name."""
        fields = {f.name for f in dataclasses.fields(self)}
        check_keywords({k: v for k, v in changes.items() if k not in fields}, "SolveOptions.replace",
                       tuple(sorted(fields)))
        return dataclasses.replace(self, **changes)


def _positive_float(name: str, value, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value.detach().cpu())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"solve: {name} must be a positive number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0) or not math.isfinite(value):
        raise ValueError(f"solve: {name} must be finite and > 0, got {value!r}")
    return value


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def step_floor(dtmin: float, t: float, time_dtype: torch.dtype) -> float:
    """The shortest adaptive step from ``t``: ``max(dtmin, 4 ulps of |t|)``.

    The second term is the resolution of the time type where the solve is (OrdinaryDiffEq.jl's
    time-dependent ``max(eps(t), dtmin)``): near ``t = 0`` a stiff transient may take steps far below
    the resolution at the end of a long span (Robertson to ``t = 1e11``). Proposals are raised to the
    floor, and a rejected step no longer than it ends the solve as ``DtLessThanMin``.
    """
    return max(dtmin, RESOLUTION_ULPS * _eps(time_dtype) * abs(t))


def default_dtmin(scale: float, time_dtype: torch.dtype) -> float:
    """``dtmin`` when the user sets none: eps times the resolution floor at ``|t| = scale`` (the span), an
    absolute floor far below any useful step, so repeated rejections at ``t = 0`` still end."""
    return RESOLUTION_ULPS * _eps(time_dtype) ** 2 * scale


def _check_tolerances(reltol, abstol, u0: torch.Tensor):
    if isinstance(reltol, torch.Tensor):
        if reltol.numel() != 1:
            raise ValueError("solve: reltol must be a scalar (use a tensor abstol for per-component "
                             "absolute tolerances)")
        reltol = float(reltol.detach().cpu())
    if isinstance(reltol, bool) or not isinstance(reltol, (int, float)):
        raise TypeError(f"solve: reltol must be a positive number, got {type(reltol).__name__}")
    reltol = float(reltol)
    if not (reltol > 0 and math.isfinite(reltol)):
        raise ValueError(f"solve: reltol must be finite and > 0, got {reltol!r}; "
                         "a relative tolerance of 0 asks for exact arithmetic")
    floor = 4 * _eps(u0.dtype)
    if reltol < floor:
        warnings.warn(f"solve: reltol={reltol:g} is below what {u0.dtype} arithmetic can resolve; "
                      f"using reltol={floor:g} (4 machine epsilons). Use float64 for tighter "
                      "tolerances.", RuntimeWarning, stacklevel=4)
        reltol = floor
    if isinstance(abstol, torch.Tensor):
        if not abstol.dtype.is_floating_point:
            raise TypeError(f"solve: abstol tensor must be floating point, got {abstol.dtype}")
        if abstol.device != u0.device:
            raise ValueError(f"solve: abstol is on {abstol.device} but u0 is on {u0.device}")
        try:
            fits = torch.broadcast_shapes(abstol.shape, u0.shape) == u0.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"solve: abstol of shape {tuple(abstol.shape)} does not broadcast to u0 "
                             f"of shape {tuple(u0.shape)}; give one tolerance per entry of u0, or a "
                             "shape that broadcasts to it")
        if abstol.numel() and not bool((abstol > 0).all() & torch.isfinite(abstol).all()):
            raise ValueError("solve: every entry of abstol must be finite and > 0")
        abstol = abstol.detach().to(u0.dtype)
    else:
        if isinstance(abstol, bool) or not isinstance(abstol, (int, float)):
            raise TypeError(f"solve: abstol must be a positive number or tensor, got {type(abstol).__name__}")
        abstol = float(abstol)
        if not (abstol > 0 and math.isfinite(abstol)):
            raise ValueError(f"solve: abstol must be finite and > 0, got {abstol!r}")
    return reltol, abstol


def _normalize_saveat(saveat, t0: float, t1: float, time_dtype: torch.dtype,
                      name: str = "saveat") -> tuple[float, ...]:
    direction = 1.0 if t1 >= t0 else -1.0
    if isinstance(saveat, torch.Tensor):
        if saveat.requires_grad:
            raise ValueError(
                f"solve: {name} requires grad, but gradients with respect to the saved times are not "
                f"supported; pass {name} detached (e.g. {name}.detach()). To differentiate a loss with "
                "respect to a time, evaluate sol(t) of a dense solve under DirectAdjoint()")
        if saveat.dim() == 0:
            saveat = float(saveat)
        elif saveat.dim() == 1:
            saveat = [float(x) for x in saveat.detach().cpu().tolist()]
        else:
            raise ValueError(f"solve: saveat must be 1-D, got shape {tuple(saveat.shape)}")
    if isinstance(saveat, (int, float)) and not isinstance(saveat, bool):
        spacing = float(saveat)
        if not (spacing > 0 and math.isfinite(spacing)):
            raise ValueError(f"solve: a scalar saveat is the spacing between saved times and must be "
                             f"finite and > 0, got {spacing!r}")
        span = abs(t1 - t0)
        n = int(math.floor(span / spacing * (1 + 1e-12)))
        times = [t0 + direction * i * spacing for i in range(n + 1)]
        if abs(times[-1] - t1) > 1e-12 * max(1.0, abs(t1)):
            times.append(t1)
        else:
            times[-1] = t1
        return tuple(_round_time(x, time_dtype) for x in times)
    if isinstance(saveat, (list, tuple)) and any(isinstance(x, torch.Tensor) and x.requires_grad for x in saveat):
        raise ValueError(f"solve: {name} holds tensors that require grad; gradients with respect to "
                         f"the saved times are not supported, so pass them detached")
    try:
        times = [float(x) for x in saveat]
    except (TypeError, ValueError):
        raise TypeError(f"solve: {name} must be a sequence or 1-D tensor of times (or a spacing), got "
                        f"{type(saveat).__name__}") from None
    lo, hi = min(t0, t1), max(t0, t1)
    for i, x in enumerate(times):
        if not math.isfinite(x):
            raise ValueError(f"solve: {name}[{i}] = {x!r} is not finite")
        # compared in the time dtype: a float32 tspan's t1 is t1 rounded to float32
        if not (lo <= _round_time(x, time_dtype) <= hi):
            raise ValueError(f"solve: {name}[{i}] = {x!r} is outside tspan = ({t0!r}, {t1!r}); "
                             f"every {'saved' if name == 'saveat' else 'stop'} time must lie in tspan")
    times = [_round_time(x, time_dtype) for x in times]
    for i in range(1, len(times)):
        step = direction * (times[i] - times[i - 1])
        if step == 0:
            raise ValueError(f"solve: {name} has a duplicated time {times[i]!r} at positions {i - 1} "
                             f"and {i}; give each time once")
        if step < 0:
            order = "increasing" if direction > 0 else "decreasing (tspan runs backward)"
            raise ValueError(f"solve: {name} must be strictly {order}, but {name}[{i - 1}] = "
                             f"{times[i - 1]!r} and {name}[{i}] = {times[i]!r}; pass the times in the "
                             "direction of integration (they are never sorted silently)")
    return tuple(times)


def _fitting_adaptive(solver) -> str:
    """Adaptive solvers of the solver's kind, for messages."""
    from .sde import AbstractSDESolver
    return "SOSRI() or SRA1()" if isinstance(solver, AbstractSDESolver) else "Tsit5(), DP5() or BS3()"


def _stepping(solver, adaptive, dt, controller):
    """``(adaptive, dt, controller)``: adaptive iff the solver has an error estimate (unless told), a fixed
    ``dt`` otherwise, and the controller that goes with it."""
    is_adaptive_solver = isinstance(solver, AbstractAdaptiveSolver)
    name = type(solver).__name__
    if controller is not None and not isinstance(controller, AbstractController):
        raise TypeError(f"solve: controller must be a PIController or IController, got "
                        f"{type(controller).__name__} (fixed steps: adaptive=False, or ConstantStepSize())")
    if adaptive is not None and not isinstance(adaptive, bool):
        raise TypeError(f"solve: adaptive must be True, False or None, got {adaptive!r}")
    if isinstance(controller, ConstantStepSize):
        if adaptive:
            raise ValueError("solve: adaptive=True and controller=ConstantStepSize() contradict each other; "
                             "a constant step size is fixed stepping (adaptive=False, dt=...)")
        adaptive = False
    elif controller is not None and adaptive is False:
        raise ValueError(f"solve: adaptive=False steps with a fixed dt, so controller={controller!r} would not "
                         "be used; drop the controller, or pass adaptive=True")
    if adaptive is None and not is_adaptive_solver and dt is None:
        raise ValueError(f"solve: {name}() has no embedded error estimate, so it steps with a fixed "
                         f"dt; pass dt=... (e.g. solve(prob, {name}(), dt=0.01)) or use an adaptive "
                         f"solver such as {_fitting_adaptive(solver)}")
    if adaptive is None:
        adaptive = is_adaptive_solver
    if adaptive and not is_adaptive_solver:
        raise ValueError(f"solve: {name}() has no embedded error estimate, so it cannot step adaptively; pass "
                         f"adaptive=False with a dt, or use an adaptive solver such as {_fitting_adaptive(solver)}")
    dt = _positive_float("dt", dt, allow_none=True)
    if not adaptive and dt is None:
        raise ValueError(f"solve: {'ConstantStepSize()' if isinstance(controller, ConstantStepSize) else 'adaptive=False'}"
                         f" needs a step size; pass dt=... (e.g. solve(prob, {name}(), dt=0.01, adaptive=False))")
    if controller is None:
        controller = solver.default_controller() if adaptive else ConstantStepSize()
    if isinstance(controller, IController) and controller.error_order is None:
        controller = dataclasses.replace(controller, error_order=solver.error_order or solver.order)
    return adaptive, dt, controller


def _saving(solver, saveat, t0, t1, save_everystep, save_start, save_end, dense):
    """The saving flags with DifferentialEquations.jl's defaults (see ``solve``)."""
    for name, value in (("save_everystep", save_everystep), ("save_start", save_start),
                        ("save_end", save_end), ("dense", dense)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"solve: {name} must be True or False, got {value!r}")
    if save_everystep is None:
        save_everystep = saveat is None
    if save_everystep and saveat is not None:
        raise ValueError("solve: save_everystep=True and saveat are exclusive; pass one of them")
    if save_start is None:
        save_start = saveat is None or t0 in saveat
    if save_end is None:
        save_end = saveat is None or t1 in saveat
    if solver.steps_onto_saveat:
        # no interpolant: the solve steps onto the saved times instead
        if dense:
            raise ValueError(f"solve: {type(solver).__name__}() has no interpolant, so dense=True (sol(t)) is not "
                             "available; pass saveat=... for the times you need (the solve steps onto them)")
        return save_everystep, save_start, save_end, False
    if dense is None:
        dense = saveat is None and save_everystep
    return save_everystep, save_start, save_end, dense


def _step_bounds(dtmin, dtmax, t0, t1, time_dtype):
    span = abs(t1 - t0)
    dtmax = _positive_float("dtmax", dtmax, allow_none=True)
    if dtmax is None:
        dtmax = span if span > 0 else math.inf
    dtmin = _positive_float("dtmin", dtmin, allow_none=True)
    if dtmin is None:  # the resolution of the time type is a floor of its own (step_floor)
        dtmin = default_dtmin(span, time_dtype) if span > 0 else 0.0
    elif dtmin > dtmax:
        raise ValueError(f"solve: dtmin = {dtmin!r} exceeds dtmax = {dtmax!r}")
    return dtmin, dtmax


def _callbacks(callback) -> tuple:
    if callback is None:
        return ()
    if isinstance(callback, AbstractTerminationCallback):
        return (callback,)
    if isinstance(callback, (list, tuple)) and all(isinstance(cb, AbstractTerminationCallback) for cb in callback):
        return tuple(callback)
    raise TypeError("solve: callback must be a termination callback (TerminateSteadyState, "
                    f"TerminateWhen, ...) or a list of them, got {type(callback).__name__}")


def make_options(solver: AbstractSolver, u0: torch.Tensor, t0: float, t1: float, *,
                 time_dtype: torch.dtype = torch.float64, dt=None, adaptive=None, saveat=None,
                 save_everystep=None, save_start=None, save_end=None, dense=None, reltol=1e-3,
                 abstol=1e-6, controller=None, norm=None, dtmin=None, dtmax=None,
                 maxiters=100_000, callback=None, save_stats=False, throw=True, tstops=None,
                 force_dtmin=False) -> SolveOptions:
    """Validate ``solve()``'s keywords and return the canonical :class:`SolveOptions`.

    Raises ``TypeError`` / ``ValueError`` with a message naming the keyword,
    the value and what to pass instead.
    """
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"solve: solver must be a pylux solver such as Tsit5(), got "
                        f"{type(solver).__name__}" + (" (a class; instantiate it: Tsit5())"
                                                      if isinstance(solver, type) else ""))
    adaptive, dt, controller = _stepping(solver, adaptive, dt, controller)
    reltol, abstol = _check_tolerances(reltol, abstol, u0)
    if saveat is not None:
        saveat = _normalize_saveat(saveat, t0, t1, time_dtype)
    tstops = () if tstops is None else tuple(x for x in _normalize_saveat(tstops, t0, t1, time_dtype, "tstops")
                                             if x != t0 and x != t1)
    for name, value in (("save_stats", save_stats), ("throw", throw), ("force_dtmin", force_dtmin)):
        if not isinstance(value, bool):
            raise TypeError(f"solve: {name} must be True or False, got {value!r}")
    save_everystep, save_start, save_end, dense = _saving(solver, saveat, t0, t1, save_everystep, save_start,
                                                          save_end, dense)
    if norm is None:
        norm = rms_norm
    elif not callable(norm):
        raise TypeError(f"solve: norm must be callable as norm(x) -> 0-d tensor (e.g. SemiNorm(mask)), "
                        f"got {type(norm).__name__}")
    dtmin, dtmax = _step_bounds(dtmin, dtmax, t0, t1, time_dtype)
    if isinstance(maxiters, bool) or not isinstance(maxiters, int) or maxiters < 1:
        raise ValueError(f"solve: maxiters must be a positive int, got {maxiters!r}")
    callbacks = _callbacks(callback)
    return SolveOptions(
        adaptive=adaptive, dt=dt, saveat=saveat, save_everystep=save_everystep,
        save_start=save_start, save_end=save_end, dense=dense, reltol=reltol, abstol=abstol,
        controller=controller, norm=norm, dtmin=dtmin, dtmax=dtmax, maxiters=maxiters,
        callbacks=callbacks, save_stats=save_stats, throw=throw, time_dtype=time_dtype, tstops=tstops,
        force_dtmin=force_dtmin)
