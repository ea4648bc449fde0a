"""``ODEProblem``: the initial value problem ``du/dt = f(u, p, t)``, ``u(t0) = u0``.

The problem validates its inputs when it is built, so a bad ``u0`` or
``tspan`` fails before any work with a message that says what to pass instead.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .terms import ODETerm

__all__ = ["ODEProblem", "parse_tspan", "per_sample_tspan", "check_state"]


def _time_value(x, which: str, where: str = "ODEProblem") -> tuple[float, torch.dtype | None]:
    """A tspan end as a host float, and its dtype when it was a tensor."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{where}: tspan {which} end must be a scalar, got a tensor of shape "
                             f"{tuple(x.shape)}")
        if not x.dtype.is_floating_point and x.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{where}: tspan {which} end has dtype {x.dtype}; pass a real number")
        if x.requires_grad:
            raise ValueError(
                f"{where}: tspan requires grad, but gradients with respect to the integration "
                "interval are not supported; pass tspan detached (e.g. (float(t0), float(t1)))")
        dtype = x.dtype if x.dtype.is_floating_point else None
        return float(x.detach().cpu()), dtype
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        try:
            import numpy as np
            if isinstance(x, np.generic) and np.issubdtype(type(x), np.number):
                dtype = torch.float32 if isinstance(x, np.float32) else None
                return float(x), dtype
        except ImportError:  # numpy is a dependency; guard only against odd installs
            pass
        raise TypeError(f"{where}: tspan {which} end must be a real number, got {type(x).__name__}")
    return float(x), None


def check_state(u0: Any, where: str = "ODEProblem") -> torch.Tensor:
    """Validate an initial state: a finite, real floating-point tensor."""
    if not isinstance(u0, torch.Tensor):
        raise TypeError(f"{where}: u0 must be a torch.Tensor, got {type(u0).__name__}; "
                        "wrap it with torch.as_tensor(u0, dtype=torch.float32)")
    if u0.is_complex():
        raise TypeError(f"{where}: u0 is complex ({u0.dtype}); complex states are not supported. "
                        "Split it into real and imaginary parts, e.g. torch.view_as_real(u0)")
    if not u0.dtype.is_floating_point:
        raise TypeError(f"{where}: u0 has dtype {u0.dtype}; pass a floating-point tensor, "
                        f"e.g. u0.to(torch.float32) or u0.to(torch.float64)")
    if u0.numel() and not bool(torch.isfinite(u0).all()):
        bad = (~torch.isfinite(u0)).nonzero()[0].tolist()
        raise ValueError(f"{where}: u0 contains NaN or Inf (first at index {tuple(bad)}); "
                         "the initial state must be finite")
    return u0


def per_sample_tspan(tspan, u0: torch.Tensor, where: str):
    """``(t0, t1, time_dtype)`` with ``(B,)`` tensors when ``tspan`` gives each sample its own span, else None.

    Per-sample spans are a pair whose ends are 1-D tensors (a number or 0-d
    end is broadcast); ``B = u0.shape[0]``. Both ends must be finite and
    detached; time is float32 when every tensor end is float32, else float64.
    """
    try:
        ends = tuple(tspan) if not isinstance(tspan, torch.Tensor) else None
    except TypeError:
        return None
    # one-element ends keep their meaning of one span for the whole state
    if ends is None or len(ends) != 2 or not any(isinstance(x, torch.Tensor) and x.dim() == 1 and x.numel() > 1
                                                 for x in ends):
        return None
    if u0.dim() == 0:
        raise ValueError(f"{where}: per-sample tspan ends of shape (B,) need a batched u0 of shape (B, ...), "
                         "got a 0-d u0")
    batch = u0.shape[0]
    tensors = [x for x in ends if isinstance(x, torch.Tensor)]
    if any(x.requires_grad for x in tensors):
        raise ValueError(f"{where}: tspan requires grad, but gradients with respect to the integration "
                         "interval are not supported; pass the per-sample ends detached")
    if any(x.dim() > 1 or (x.dim() == 1 and x.shape[0] != batch) for x in tensors):
        shapes = [tuple(x.shape) for x in tensors]
        raise ValueError(f"{where}: per-sample tspan ends must have shape ({batch},) (one time per sample of "
                         f"u0, whose shape is {tuple(u0.shape)}), got {shapes}")
    if any(not x.dtype.is_floating_point for x in tensors):
        raise TypeError(f"{where}: per-sample tspan ends must be floating-point tensors")
    time_dtype = torch.float32 if all(x.dtype == torch.float32 for x in tensors) else torch.float64
    t0, t1 = (torch.as_tensor(x, dtype=time_dtype).detach().to(u0.device).expand(batch).clone()
              for x in ends)
    if not bool(torch.isfinite(t0).all() & torch.isfinite(t1).all()):
        raise ValueError(f"{where}: every per-sample tspan end must be finite")
    return t0, t1, time_dtype


def parse_tspan(tspan, where: str) -> tuple[float, float, torch.dtype]:
    """``(t0, t1, time_dtype)`` from a pair of numbers or scalar tensors (see :class:`ODEProblem`)."""
    if isinstance(tspan, torch.Tensor):
        if tspan.shape != (2,):
            raise ValueError(f"{where}: tspan must be a pair (t0, t1), got a tensor of shape "
                             f"{tuple(tspan.shape)}")
        tspan = (tspan[0], tspan[1])
    try:
        ends = tuple(tspan)
    except TypeError:
        raise TypeError(f"{where}: tspan must be a pair (t0, t1), got {type(tspan).__name__}") from None
    if len(ends) != 2:
        raise ValueError(f"{where}: tspan must be a pair (t0, t1), got {len(ends)} values")
    (t0, dtype0), (t1, dtype1) = _time_value(ends[0], "start", where), _time_value(ends[1], "end", where)
    for value, which in ((t0, "start"), (t1, "end")):
        # an ODE's end may be infinite: solve() then requires a callback that ends the solve
        if not math.isfinite(value) and not (which == "end" and where == "ODEProblem" and not math.isnan(value)):
            raise ValueError(f"{where}: tspan {which} is {value!r}; both ends must be finite")
    time_dtype = torch.float32 if (dtype0 == torch.float32 and dtype1 in (torch.float32, None)) or (
        dtype1 == torch.float32 and dtype0 is None) else torch.float64
    if time_dtype == torch.float32:
        import numpy as np
        t0, t1 = float(np.float32(t0)), float(np.float32(t1))
    return t0, t1, time_dtype


class ODEProblem:
    """The ODE initial value problem ``du/dt = f(u, p, t)`` on ``tspan = (t0, t1)``.

    Args:
        f: the vector field, out of place, Julia's argument order:
            ``f(u, p, t) -> du`` with ``du`` of ``u``'s shape, dtype and device.
            ``t`` is passed as a 0-d tensor in the time dtype (below) on the
            state's device: a float32 state with a float64 ``tspan`` still
            sees float64 time. The problem steps over ``ODETerm(f)``
            (``prob.term``).
        u0: the initial state, a real floating-point tensor of any shape; a batch
            is part of the state (``(B, D)``, ``(B, C, H, W)``, …).
        tspan: ``(t0, t1)``, numbers or scalar tensors; ``t1 < t0`` integrates
            backward in time; ``t1 = ±inf`` when the solve has a callback that
            ends it (a terminating event). Time is kept in its own dtype: float64, or float32
            when both ends are float32 tensors (then each time point is rounded
            to float32, and a step too small to change t is an error).
            A pair of 1-D tensors of ``u0.shape[0]`` entries gives every sample
            of the batch its own span (then ``prob.tspan`` holds those
            tensors, and the problem is solved with ``solve(...,
            batch="per-sample")``; see :mod:`pylux.diffeq.per_sample`).
        p: parameters, any tree; passed to ``f`` untouched.

    Raises:
        TypeError: ``f`` not callable; ``u0`` not a tensor, integer or complex.
        ValueError: ``u0`` with NaN/Inf; ``tspan`` not a pair or with a
            non-finite end, or requiring grad.
    """

    __slots__ = ("f", "u0", "tspan", "p", "time_dtype", "term")

    def __init__(self, f: Callable, u0: torch.Tensor, tspan, p: Any = None) -> None:
        if not callable(f):
            raise TypeError(f"ODEProblem: f must be callable as f(u, p, t), got {type(f).__name__}")
        u0 = check_state(u0)
        spans = per_sample_tspan(tspan, u0, "ODEProblem")
        t0, t1, time_dtype = parse_tspan(tspan, "ODEProblem") if spans is None else spans
        self.f = f
        self.term = ODETerm(f)
        self.u0 = u0
        self.tspan = (t0, t1)
        self.p = p
        self.time_dtype = time_dtype

    def remake(self, *, f: Callable | None = None, u0: torch.Tensor | None = None, tspan=None,
               p: Any = ...) -> "ODEProblem":
        """A copy with some fields replaced (validated again), as ``remake`` in SciMLBase."""
        if tspan is None:
            tspan = self.tspan if self.time_dtype == torch.float64 else tuple(
                torch.tensor(t, dtype=torch.float32) for t in self.tspan)
        return ODEProblem(self.f if f is None else f, self.u0 if u0 is None else u0, tspan,
                          self.p if p is ... else p)

    def __repr__(self) -> str:
        return (f"ODEProblem(f={getattr(self.f, '__name__', type(self.f).__name__)}, "
                f"u0: {tuple(self.u0.shape)} {str(self.u0.dtype).replace('torch.', '')}, "
                f"tspan={self.tspan})")
