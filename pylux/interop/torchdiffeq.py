"""``odeint`` with torchdiffeq's conventions, solved by pylux (a one-import migration).

``from torchdiffeq import odeint`` becomes ``from pylux import odeint``; ``odeint_adjoint(...)``
becomes ``odeint(..., adjoint=True)`` (``pylux.odeint_adjoint`` is the same with the flag set).
The field keeps torchdiffeq's order ``func(t, y)`` (an ``nn.Module`` or any callable), ``t``
holds both the span and the output times, and the result has torchdiffeq's layout
``(len(t), *y0.shape)`` (a tuple of such tensors for a tuple ``y0``).

Method names map to pylux solvers (:data:`METHODS`); adaptive methods use the I controller with
torchdiffeq's ``safety``/``ifactor``/``dfactor`` defaults, and time is float64 unless
``options["dtype"]`` says otherwise, as in torchdiffeq. Differences, stated plainly:

* between step points the output comes from the solver's dense output (cubic Hermite or the
  method's own interpolant), not torchdiffeq's linear interpolation of fixed-grid methods;
* ``rk4`` is the classical RK4 (torchdiffeq's ``rk4`` uses the 3/8 rule; both are fourth order);
* ``explicit_adams`` is pylux's variable-step Adams–Bashforth 3 (:class:`~pylux.VCAB3`), run on
  torchdiffeq's grid; torchdiffeq's runs up to order 4;
* gradients with respect to ``t`` are refused (detach ``t``), events (``event_fn``) are not
  supported (use :func:`pylux.solve` with ``callback=TerminateWhen(...)``);
* the field receives ``t`` in the state's dtype (torchdiffeq passes its float64 time), so a
  float32 field need not cast it.
"""

from __future__ import annotations

import math
import numbers
import warnings

from typing import Any, Callable, Mapping, Sequence

import torch
from torch.func import functional_call

from ..core.keywords import check_keywords
from ..diffeq import (BS3, DP5, RK4, VCAB3, AbstractAdaptiveSolver, AbstractSolver, Euler, Heun, IController, Midpoint, MixedNorm,
                      ODEProblem, Tsit5, solve)
from ..sensitivity import BacksolveAdjoint

__all__ = ["odeint", "odeint_adjoint", "METHODS"]

#: torchdiffeq method name -> (pylux solver class, adaptive).
METHODS: dict[str, tuple[type, bool]] = {
    "dopri5": (DP5, True),
    "bosh3": (BS3, True),
    "adaptive_heun": (Heun, True),
    "tsit5": (Tsit5, True),
    "euler": (Euler, False),
    "midpoint": (Midpoint, False),
    "heun2": (Heun, False),
    "rk4": (RK4, False),
    "explicit_adams": (VCAB3, False),
}
#: torchdiffeq's methods pylux has no counterpart for, with the nearest pylux choice.
_MISSING = {
    "dopri8": "pylux has no 8th-order method yet; use method='dopri5' or 'tsit5' with tighter rtol/atol",
    "fehlberg2": "use method='bosh3' (3rd order) or 'adaptive_heun' (2nd order)",
    "heun3": "use method='rk4' or 'bosh3'",
    "implicit_adams": "pylux has no implicit Adams method; use method='explicit_adams' or 'dopri5'",
    "fixed_adams": "pylux has no implicit Adams method; use method='explicit_adams' or 'dopri5'",
    "scipy_solver": "call scipy.integrate.solve_ivp directly, or use a pylux method such as 'dopri5'",
}
_ADAPTIVE_OPTIONS = ("norm", "first_step", "max_num_steps", "step_t", "jump_t", "safety", "ifactor", "dfactor",
                     "min_step", "max_step", "dtype")
_FIXED_OPTIONS = ("step_size", "interp", "perturb", "grid_constructor", "norm", "dtype")
_ADJOINT_OPTIONS = ("norm",)


def _method(method: Any) -> tuple[AbstractSolver, bool]:
    if isinstance(method, AbstractSolver):
        return method, isinstance(method, AbstractAdaptiveSolver)
    if method is None:
        method = "dopri5"
    if not isinstance(method, str):
        raise TypeError(f"odeint: method must be a name such as 'dopri5' or a pylux solver, got "
                        f"{type(method).__name__}")
    if method in _MISSING:
        raise ValueError(f"odeint: method {method!r} is not available in pylux: {_MISSING[method]}. Available: "
                         f"{sorted(METHODS)}")
    if method not in METHODS:
        raise ValueError(f"odeint: unknown method {method!r}; available: {sorted(METHODS)}")
    cls, adaptive = METHODS[method]
    return cls(), adaptive


def _times(t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"odeint: t must be a 1-D tensor of times, got {type(t).__name__}") from None
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"odeint: t must be a non-empty 1-D tensor of times, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("odeint: gradients with respect to t are not supported; pass t.detach() "
                                  "(the solution is still differentiable in y0 and the parameters)")
    values = t.detach().cpu().to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"odeint: t must be finite, got {values.tolist()}")
    if values.numel() > 1:
        steps = values[1:] - values[:-1]
        if not (bool((steps > 0).all()) or bool((steps < 0).all())):
            raise ValueError(f"odeint: t must be strictly increasing or strictly decreasing (t[0] is the initial "
                             f"time, as in torchdiffeq), got {values.tolist()}")
    return t


class _Packing:
    """A tuple state as one flat vector (torchdiffeq normalises tuples the same way) and back."""

    def __init__(self, y0: Any):
        self.is_tuple = isinstance(y0, tuple)
        parts = y0 if self.is_tuple else (y0,)
        for i, part in enumerate(parts):
            if not isinstance(part, torch.Tensor):
                where = f"y0[{i}]" if self.is_tuple else "y0"
                raise TypeError(f"odeint: {where} must be a tensor (or y0 a tuple of tensors), got "
                                f"{type(part).__name__}")
        self.shapes = [p.shape for p in parts]
        self.sizes = [p.numel() for p in parts]
        if self.is_tuple and len({(p.dtype, p.device) for p in parts}) > 1:
            raise TypeError("odeint: the tensors of a tuple y0 must share dtype and device, got "
                            f"{[(str(p.dtype), str(p.device)) for p in parts]}")
        self.y0 = torch.cat([p.reshape(-1) for p in parts]) if self.is_tuple else y0

    def split(self, flat: torch.Tensor, lead: tuple = ()) -> Any:
        if not self.is_tuple:
            return flat
        pieces = flat.split(self.sizes, dim=-1)
        return tuple(p.reshape((*lead, *shape)) for p, shape in zip(pieces, self.shapes))

    def join(self, parts: Any, where: str) -> torch.Tensor:
        if not self.is_tuple:
            return parts
        if not isinstance(parts, (tuple, list)) or len(parts) != len(self.shapes):
            raise TypeError(f"odeint: {where} must return a tuple of {len(self.shapes)} tensors for a tuple y0, "
                            f"got {type(parts).__name__}")
        return torch.cat([p.reshape(-1) for p in parts])


def _adjoint_parameters(func: Any, adjoint_params: Any) -> tuple[dict | None, Callable]:
    """The parameter tree the adjoint differentiates, and ``call(t, y, p)`` evaluating ``func`` with it.

    Parameters are found in the module (``func.named_parameters()``, as torchdiffeq's
    ``find_parameters``) and passed explicitly through ``torch.func.functional_call``, so
    the backward pass differentiates with respect to exactly them.
    """
    if not isinstance(func, torch.nn.Module):
        if adjoint_params is None:
            raise ValueError("odeint(adjoint=True): func must be an nn.Module so that its parameters can be found; "
                             "for a plain function without trainable tensors pass adjoint_params=()")
        if len(tuple(adjoint_params)):
            raise ValueError("odeint(adjoint=True): the adjoint differentiates parameters it can pass to func "
                             "explicitly, which needs an nn.Module: register these tensors as parameters of an "
                             "nn.Module field (or pass adjoint=False to backpropagate through the solver)")
        return None, lambda t, y, p: func(t, y)
    named = dict(func.named_parameters())
    if adjoint_params is None:
        chosen = {name for name, p in named.items() if p.requires_grad}
    else:
        wanted = {id(p) for p in adjoint_params}
        chosen = {name for name, p in named.items() if id(p) in wanted and p.requires_grad}
        found = {id(named[name]) for name in chosen} | {id(p) for p in named.values() if not p.requires_grad}
        missing = [p for p in adjoint_params if id(p) not in found]
        if missing:
            raise ValueError(f"odeint(adjoint=True): {len(missing)} tensor(s) of adjoint_params (the first of shape "
                             f"{tuple(missing[0].shape)}) are not parameters of func; register them as "
                             "nn.Parameter of the module so they can be passed to it explicitly")
    # parameters left out of adjoint_params are constants of the solve, as in torchdiffeq
    constants = {name: p.detach() for name, p in named.items() if name not in chosen}

    def call(t, y, p):
        return functional_call(func, {**constants, **(p or {})}, (t, y))

    return {name: named[name] for name in named if name in chosen}, call


def _float_tolerance(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise ValueError(f"odeint: {name} cannot require grad")
        if value.numel() != 1:
            raise ValueError(f"odeint: {name} must be a number; per-element tolerances (shape "
                             f"{tuple(value.shape)}) are not supported here. Call pylux.solve with a tensor "
                             "abstol, or scale the state so one tolerance fits")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"odeint: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def odeint(func: Callable, y0: Any, t: Any, *, rtol: float = 1e-7, atol: float = 1e-9, method: Any = "dopri5",
           options: Mapping | None = None, adjoint: bool = False, adjoint_rtol: float | None = None,
           adjoint_atol: float | None = None, adjoint_method: Any = None, adjoint_options: Mapping | None = None,
           adjoint_params: Sequence[torch.Tensor] | None = None, event_fn: Any = None, sensealg: Any = None,
           **unknown: Any) -> Any:
    r"""Solve :math:`dy/dt = \text{func}(t, y)`, :math:`y(t_0) = y_0`, at the times ``t`` (torchdiffeq's API).

    Args:
        func: ``func(t, y) -> dy/dt``; an ``nn.Module`` (required for ``adjoint=True``
            with parameters) or any callable. ``t`` is a 0-d tensor in ``y``'s dtype.
        y0: the initial state at ``t[0]``, a tensor of any shape or a tuple of tensors.
        t: 1-D tensor, strictly increasing or decreasing: the initial time and the output times.
        rtol, atol: tolerances of the scaled error (torchdiffeq's defaults, 1e-7 and 1e-9).
        method: a name of :data:`METHODS` (``"dopri5"`` default, ``"bosh3"``, ``"adaptive_heun"``,
            ``"tsit5"``, ``"euler"``, ``"midpoint"``, ``"heun2"``, ``"rk4"``, ``"explicit_adams"``)
            or a pylux solver instance.
        options: adaptive methods: ``first_step``, ``max_num_steps``, ``step_t``/``jump_t``
            (times to step onto), ``safety``, ``ifactor``, ``dfactor``, ``min_step``,
            ``max_step``, ``norm`` (of the scaled error; for a tuple state it receives a
            tuple), ``dtype`` (of time). Fixed-grid methods: ``step_size`` (default: step
            from one time of ``t`` to the next, torchdiffeq's grid), ``dtype``. Unknown
            names are errors.
        adjoint: gradients by the continuous adjoint (:class:`~pylux.BacksolveAdjoint`, as
            torchdiffeq's ``odeint_adjoint``) instead of backpropagation through the solver.
        adjoint_rtol, adjoint_atol: tolerances of the backward solve (default: the forward ones).
        adjoint_method: must be ``None`` or ``method`` (the backward solve uses the forward solver).
        adjoint_options: ``{"norm": "seminorm"}`` for Kidger et al.'s seminorm.
        adjoint_params: the tensors to differentiate (default: every parameter of ``func``
            that requires grad); they must be parameters of the module ``func``.
        event_fn: must be ``None`` (events: :func:`pylux.solve` with ``callback=TerminateWhen``).
        sensealg: a pylux sensitivity algorithm, overriding ``adjoint``.

    Returns:
        ``y`` of shape ``(len(t), *y0.shape)`` with ``y[0] = y0`` (a tuple for a tuple ``y0``).

    Raises:
        ValueError: an unknown or unavailable method (the available ones named), ``t`` not
            strictly monotone, a bad tolerance, unknown options, adjoint parameters that
            are not the module's.
        NotImplementedError: ``event_fn``, a differentiable ``t``, a different ``adjoint_method``.
        SolverError: the solve failed (MaxIters, DtLessThanMin, Unstable), with what to try.
    """
    check_keywords(unknown, "odeint", ("rtol", "atol", "method", "options", "adjoint", "adjoint_rtol",
                                       "adjoint_atol", "adjoint_method", "adjoint_options", "adjoint_params",
                                       "event_fn", "sensealg"))
    if not callable(func):
        raise TypeError(f"odeint: func must be callable as func(t, y), got {type(func).__name__}")
    if event_fn is not None:
        raise NotImplementedError("odeint: event_fn is not supported; use pylux.solve(ODEProblem(...), "
                                  "callback=TerminateWhen(condition)) to stop at an event")
    if not isinstance(adjoint, bool):
        raise TypeError(f"odeint: adjoint must be True or False, got {adjoint!r}")
    hooks = [name for name in _STEP_CALLBACKS if callable(getattr(func, name, None))]
    if hooks:
        # torchdiffeq calls these around each step; silently skipping them would hide a user's logic
        warnings.warn(f"odeint: func.{', func.'.join(hooks)} {'is' if len(hooks) == 1 else 'are'} not called: "
                      "pylux's odeint does not run torchdiffeq's step callbacks. Use pylux.solve with "
                      "callback=DiscreteCallback(condition, affect) for per-step logic, or save_stats=True "
                      "for each step's t and dt", UserWarning, stacklevel=2)
    solver, adaptive = _method(method)
    times = _times(t)
    packing = _Packing(y0)
    options = dict(options or {})
    known = _ADAPTIVE_OPTIONS if adaptive else _FIXED_OPTIONS
    check_keywords({k: v for k, v in options.items() if k not in known}, "odeint options", known)
    rtol, atol = _float_tolerance("rtol", rtol), _float_tolerance("atol", atol)
    if times.numel() == 1:
        return tuple(p.unsqueeze(0) for p in y0) if packing.is_tuple else y0.unsqueeze(0)

    if sensealg is None and adjoint:
        sensealg = _backsolve(method, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options)
        p, call = _adjoint_parameters(func, adjoint_params)
    else:
        if not adjoint and (adjoint_params is not None or adjoint_options is not None or adjoint_method
                            is not None or adjoint_rtol is not None or adjoint_atol is not None):
            raise ValueError("odeint: adjoint_* arguments were given without adjoint=True")
        p, call = None, (lambda t_, y, p_: func(t_, y))
        if sensealg is not None and isinstance(func, torch.nn.Module):
            p, call = _adjoint_parameters(func, adjoint_params)

    state_dtype = packing.y0.dtype
    time_dtype = options.pop("dtype", torch.float64)
    if time_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"odeint: options['dtype'] must be torch.float32 or torch.float64, got {time_dtype!r}")
    grid = times.detach().to(time_dtype)
    kwargs = _solve_keywords(options, adaptive, grid, packing, rtol, atol,
                             sensealg is not None and not sensealg.differentiates_solver)
    jumps = _inside(options.get("jump_t") if adaptive else None, grid)
    bounds = [float(grid[0]), *jumps, float(grid[-1])]
    forward = bounds[-1] > bounds[0]
    field_time_dtype = state_dtype if state_dtype.is_floating_point else time_dtype
    outputs, u = [], packing.y0
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        # one solve per interval between jumps of f, so no step straddles a jump
        inside = [s for s in grid.tolist() if (a < s <= b if forward else b <= s < a)]
        saveat = ([a] if k == 0 else []) + inside + ([] if inside and inside[-1] == b else [b])
        # at a jump f sees times one ulp inside the interval, on the side being integrated (torchdiffeq's
        # jump_t), in the dtype f receives: a float32 state would round a float64 nudge back onto the jump
        lo, hi = torch.tensor(sorted((a, b)), dtype=field_time_dtype)
        if k > 0:  # the interval starts at a jump
            lo, hi = (torch.nextafter(lo, hi), hi) if forward else (lo, torch.nextafter(hi, lo))
        if k < len(jumps):  # the interval ends at a jump
            lo, hi = (lo, torch.nextafter(hi, lo)) if forward else (torch.nextafter(lo, hi), hi)

        def field(u_, params, t_, lo=lo, hi=hi):
            t_ = t_.to(field_time_dtype)
            if len(bounds) > 2:
                t_ = torch.clamp(t_, lo.to(t_.device), hi.to(t_.device))
            out = call(t_, packing.split(u_), params)
            return packing.join(out, "func")

        span = (torch.tensor(a, dtype=time_dtype), torch.tensor(b, dtype=time_dtype))
        segment = dict(kwargs)
        if adaptive and "tstops" in kwargs:
            segment["tstops"] = [s for s in kwargs["tstops"] if min(a, b) < s < max(a, b)] or None
        sol = solve(ODEProblem(field, u, span, p), solver, saveat=torch.tensor(saveat, dtype=time_dtype),
                    sensealg=sensealg, **segment)
        u = sol.u[-1]
        outputs.append(sol.u if inside and inside[-1] == b else sol.u[:-1])  # b was saved only to start the next
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return packing.split(out, (out.shape[0],)) if packing.is_tuple else out


#: torchdiffeq's per-step hooks, looked up on ``func`` (and their adjoint-pass variants)
_STEP_CALLBACKS = tuple(name + suffix for name in ("callback_step", "callback_accept_step", "callback_reject_step")
                        for suffix in ("", "_adjoint"))


def _inside(values: Any, grid: torch.Tensor) -> list[float]:
    """The times of ``values`` strictly inside the span of ``grid``, in the direction of integration."""
    if values is None:
        return []
    lo, hi = sorted((float(grid[0]), float(grid[-1])))
    found = sorted({float(v) for v in torch.as_tensor(values).reshape(-1).tolist() if lo < float(v) < hi})
    return found if float(grid[-1]) > float(grid[0]) else found[::-1]


def _backsolve(method, rtol, atol, adjoint_method, adjoint_options) -> BacksolveAdjoint:
    if adjoint_method is not None and adjoint_method != method:
        raise NotImplementedError(f"odeint: adjoint_method={adjoint_method!r} differs from method={method!r}; "
                                  "pylux's backsolve adjoint integrates backward with the forward method. Drop "
                                  "adjoint_method")
    adjoint_options = dict(adjoint_options or {})
    check_keywords({k: v for k, v in adjoint_options.items() if k not in _ADJOINT_OPTIONS}, "odeint adjoint_options",
                   _ADJOINT_OPTIONS)
    norm = adjoint_options.get("norm")
    if norm not in (None, "seminorm"):
        raise ValueError(f"odeint: adjoint_options['norm'] may only be 'seminorm' (Kidger et al. 2021), got {norm!r}")
    return BacksolveAdjoint(seminorm=norm == "seminorm",
                            reltol=None if rtol is None else _float_tolerance("adjoint_rtol", rtol),
                            abstol=None if atol is None else _float_tolerance("adjoint_atol", atol))


def _solve_keywords(options: dict, adaptive: bool, grid: torch.Tensor, packing: _Packing, rtol, atol,
                    adjoint: bool) -> dict:
    """torchdiffeq's options as :func:`pylux.solve` keywords."""
    # pylux's finite maxiters default, not torchdiffeq's 2**31 - 1: a blow-up fails instead of hanging
    kwargs: dict[str, Any] = {"reltol": rtol, "abstol": atol}
    norm = options.get("norm")
    if norm is not None:
        if not callable(norm):
            raise TypeError(f"odeint: options['norm'] must be callable, got {type(norm).__name__}")
        if adjoint:
            raise NotImplementedError("odeint: options['norm'] with an adjoint: the backward solve would apply it "
                                      "to the augmented adjoint state; drop the norm (the adjoint then measures "
                                      "state, adjoint and parameter channels separately) or pass adjoint=False")
        kwargs["norm"] = (lambda x: norm(packing.split(x))) if packing.is_tuple else norm
    elif packing.is_tuple and len(packing.sizes) > 1 and sum(packing.sizes) > 0 and not adjoint:
        # torchdiffeq's default norm for tuple states; under an adjoint the default RMS norm is kept,
        # which the backward solve extends to its own channel groups
        kwargs["norm"] = MixedNorm(packing.sizes)
    if adaptive:
        kwargs["controller"] = IController(gamma=options.get("safety", 0.9), qmax=options.get("ifactor", 10.0),
                                           qmin=options.get("dfactor", 0.2))
        if options.get("first_step") is not None:
            kwargs["dt"] = abs(float(options["first_step"]))
        if options.get("max_num_steps") is not None:
            kwargs["maxiters"] = int(options["max_num_steps"])
        if options.get("min_step"):  # torchdiffeq accepts a step at min_step whatever its error
            kwargs["dtmin"], kwargs["force_dtmin"] = float(options["min_step"]), True
        if options.get("max_step") is not None and math.isfinite(float(options["max_step"])):
            kwargs["dtmax"] = float(options["max_step"])
        stops = [s for s in _inside(options.get("step_t"), grid) if s not in _inside(options.get("jump_t"), grid)]
        if stops:
            kwargs["tstops"] = stops  # jump_t splits the solve instead (see odeint)
        return kwargs
    if options.get("perturb"):
        raise NotImplementedError("odeint: options['perturb'] is not supported (pylux steps onto tstops instead)")
    if options.get("grid_constructor") is not None:
        raise NotImplementedError("odeint: options['grid_constructor'] is not supported; pass step_size, or call "
                                  "pylux.solve with dt and tstops for a custom grid")
    if options.get("interp", "cubic") != "cubic":
        raise ValueError(f"odeint: options['interp']={options['interp']!r}: pylux reads values between steps from "
                         "the solver's dense output (cubic Hermite or better); drop the option or pass 'cubic'")
    kwargs["adaptive"] = False
    if options.get("step_size") is not None:
        step = float(options["step_size"])
        if not math.isfinite(step) or step <= 0:
            raise ValueError(f"odeint: options['step_size'] must be a finite number > 0, got {step!r}")
        kwargs["dt"] = step
    else:
        # torchdiffeq's default grid: one step from each output time to the next
        kwargs["dt"] = float((grid[1:] - grid[:-1]).abs().max())
        kwargs["tstops"] = grid[1:-1]
    return kwargs


def odeint_adjoint(func: Callable, y0: Any, t: Any, **kwargs: Any) -> Any:
    """torchdiffeq's ``odeint_adjoint``: :func:`odeint` with ``adjoint=True``."""
    if "adjoint" in kwargs:
        raise TypeError("odeint_adjoint: do not pass adjoint=; call odeint(..., adjoint=False) for backpropagation")
    return odeint(func, y0, t, adjoint=True, **kwargs)
