r"""Terms: what a solver steps over.

A differential equation is a sum of terms, each a vector field times the
increment of a control,

.. math::
    du = \sum_k g_k(u, p, t)\, dX_k(t),

and a solver forms a step from the terms' contributions
``term.prod(term.vf(u, p, t), term.contr(t0, t1))`` over ``[t0, t1]``
(the decomposition of diffrax's ``AbstractTerm``):

* :class:`ODETerm` — ``f(u, p, t) · dt``: the control is time itself;
* :class:`ControlTerm` — ``g(u, p, t) · dX(t0, t1)`` for a control ``X`` with
  an increment (a Brownian path for an SDE, an interpolated data path for a
  neural CDE): ``g`` returns ``(*u.shape, m)`` and the increment has shape
  ``(m,)`` or ``(*batch, m)``; the product contracts the last axis;
* :class:`MultiTerm` — the sum of several terms (drift plus diffusion).

A solver never sees ``p``: the loop binds the parameters once
(:meth:`AbstractTerm.bind`) and hands the solver a :class:`BoundTerm`
with ``vf(u, t)``, ``contr(t0, t1)``, ``prod(vf, control)`` and
``vf_prod(u, t, control)``. A term whose control is time declares
``control_is_time``, so explicit Runge–Kutta methods may fold ``dt`` into
their coefficients instead of multiplying every stage by it.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

import torch

__all__ = ["AbstractTerm", "ODETerm", "ControlTerm", "MultiTerm", "BoundTerm", "AbstractControl",
           "as_bound_term"]


class AbstractControl(abc.ABC):
    """A path ``X(t)`` with increments: ``control.increment(t0, t1) = X(t1) - X(t0)``.

    ``t0`` and ``t1`` are 0-d time tensors (or host floats). Brownian paths
    and interpolated data paths implement this.
    """

    @abc.abstractmethod
    def increment(self, t0, t1) -> torch.Tensor:
        """``X(t1) - X(t0)``."""


class AbstractTerm(abc.ABC):
    """One term ``vf(u, p, t) · dX`` of a differential equation (see the module docstring)."""

    #: the control is time (``contr(t0, t1) = t1 - t0``, ``prod`` a scalar multiple)
    control_is_time: bool = False

    @abc.abstractmethod
    def vf(self, u: torch.Tensor, p: Any, t: torch.Tensor):
        """The vector field at ``(u, t)``."""

    @abc.abstractmethod
    def contr(self, t0, t1):
        """The control's increment over ``[t0, t1]``."""

    @abc.abstractmethod
    def prod(self, vf, control) -> torch.Tensor:
        """The contribution of the vector field ``vf`` over a step with control increment ``control``."""

    def check(self, vf, control, u: torch.Tensor) -> None:
        """Check the first evaluation's shapes against ``u``; raise an error naming both when they differ."""

    def bind(self, p: Any) -> "BoundTerm":
        """This term with the parameters ``p`` fixed: what a solver steps over."""
        return BoundTerm(self, p)


def _check_tensor(out, u0: torch.Tensor, who: str, what: str) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{who} must return a tensor {what}, but returned {type(out).__name__}")
    if out.dtype != u0.dtype:
        raise TypeError(f"{who} returned dtype {out.dtype} but u0 has dtype {u0.dtype}; it must return "
                        "values in u's dtype (cast inside it, or build u0 with the dtype it computes in)")
    if out.device != u0.device:
        raise ValueError(f"{who} returned a tensor on device {out.device} but u0 is on {u0.device}; "
                         "move the parameters or u0 so that both live on the same device")


class ODETerm(AbstractTerm):
    """``f(u, p, t) · dt``: the term of an ODE ``du/dt = f(u, p, t)``.

    ``f`` is called in Julia's argument order, ``f(u, p, t)``, with ``t`` a 0-d
    tensor in the time dtype (float64 unless ``tspan`` is float32) on ``u``'s
    device; it returns ``du/dt`` with ``u``'s shape, dtype and device.
    """

    control_is_time = True

    def __init__(self, f: Callable) -> None:
        if not callable(f):
            raise TypeError(f"ODETerm: f must be callable as f(u, p, t), got {type(f).__name__}")
        self.f = f

    def vf(self, u, p, t):
        return self.f(u, p, t)

    def contr(self, t0, t1):
        return t1 - t0

    def prod(self, vf, control):
        return vf * control.to(vf.dtype) if isinstance(control, torch.Tensor) else vf * control

    def check(self, vf, control, u):
        _check_tensor(vf, u, "f", "du/dt")
        if vf.shape != u.shape:
            raise ValueError(f"f returned a tensor of shape {tuple(vf.shape)} but u0 has shape "
                             f"{tuple(u.shape)}; f(u, p, t) must return du/dt with u's shape")

    def __repr__(self) -> str:
        return f"ODETerm({getattr(self.f, '__name__', type(self.f).__name__)})"


class ControlTerm(AbstractTerm):
    """``g(u, p, t) · dX(t0, t1)`` for a control path ``X`` (a Brownian motion, a data spline).

    Args:
        g: ``g(u, p, t)`` returning a tensor of shape ``(*u.shape, m)`` — a
            matrix field for each state entry row, contracted with the
            increment over its last axis (the general-noise SDE and the
            neural CDE case).
        control: an :class:`AbstractControl` (anything with ``increment(t0, t1)``),
            whose increment has shape ``(m,)`` (shared over a batch) or
            ``(*u.shape[:-1], m)`` (one path per sample).

        kind: how ``g`` meets the increment. ``"general"`` (default): the
            matrix–vector product ``(g @ dX[..., None])[..., 0]``. ``"diagonal"``:
            ``g`` has ``u``'s shape and one control channel drives each state
            entry, ``g * dX`` with ``dX`` of ``u``'s shape (diagonal-noise SDEs).
            ``"scalar"``: ``g`` has ``u``'s shape and one channel drives all
            entries, ``g * dX`` with ``dX`` of shape ``(*u.shape[:-1], 1)``.

    The shapes of ``g``'s output and of the increment are checked on the first
    call; a mismatch raises naming both.
    """

    KINDS = ("general", "diagonal", "scalar")

    def __init__(self, g: Callable, control, kind: str = "general") -> None:
        if not callable(g):
            raise TypeError(f"ControlTerm: g must be callable as g(u, p, t), got {type(g).__name__}")
        if not callable(getattr(control, "increment", None)):
            raise TypeError(f"ControlTerm: the control must have an increment(t0, t1) method (a Brownian "
                            f"path, an interpolated data path), got {type(control).__name__}")
        if kind not in self.KINDS:
            raise ValueError(f"ControlTerm: kind must be one of {', '.join(map(repr, self.KINDS))}, got {kind!r}")
        self.g = g
        self.control = control
        self.kind = kind

    def vf(self, u, p, t):
        return self.g(u, p, t)

    def contr(self, t0, t1):
        return self.control.increment(t0, t1)

    def prod(self, vf, control):
        control = control.to(vf.dtype)
        if self.kind == "general":
            return (vf @ control.unsqueeze(-1)).squeeze(-1)
        return vf * control

    def check(self, vf, control, u):
        _check_tensor(vf, u, "g", "g(u, p, t)")
        if not isinstance(control, torch.Tensor):
            raise TypeError(f"the control's increment must be a tensor, got {type(control).__name__}")
        if self.kind != "general":
            self._check_elementwise(vf, control, u)
            return
        expected = tuple(u.shape) + ("m",)
        if vf.dim() != u.dim() + 1 or tuple(vf.shape[:-1]) != tuple(u.shape):
            raise ValueError(f"ControlTerm: g returned shape {tuple(vf.shape)} but a state of shape "
                             f"{tuple(u.shape)} needs g of shape {expected} (m = the control's "
                             f"channels); the control's increment has shape {tuple(control.shape)}")
        m = vf.shape[-1]
        ok = control.dim() >= 1 and control.shape[-1] == m
        if ok:
            try:
                ok = torch.broadcast_shapes(vf.shape, control.unsqueeze(-2).shape) == vf.shape
            except RuntimeError:
                ok = False
        if not ok:
            raise ValueError(f"ControlTerm: g returned shape {tuple(vf.shape)} (m = {m} control channels) "
                             f"but the control's increment has shape {tuple(control.shape)}; it must be "
                             f"({m},) or (*batch, {m}) matching u's leading dimensions {tuple(u.shape[:-1])}")

    def _check_elementwise(self, vf, control, u) -> None:
        if tuple(vf.shape) != tuple(u.shape):
            raise ValueError(f"ControlTerm({self.kind}): g returned shape {tuple(vf.shape)} but {self.kind} noise "
                             f"needs g of u's shape {tuple(u.shape)}")
        expected = tuple(u.shape) if self.kind == "diagonal" else tuple(u.shape[:-1]) + (1,)
        if tuple(control.shape) != expected:
            raise ValueError(f"ControlTerm({self.kind}): the increment has shape {tuple(control.shape)} but {self.kind} "
                             f"noise on a state of shape {tuple(u.shape)} needs {expected}")

    def __repr__(self) -> str:
        kind = "" if self.kind == "general" else f", kind={self.kind!r}"
        return f"ControlTerm({getattr(self.g, '__name__', type(self.g).__name__)}, {type(self.control).__name__}{kind})"


class MultiTerm(AbstractTerm):
    """The sum of terms, e.g. ``MultiTerm(ODETerm(f), ControlTerm(g, brownian))`` for an SDE.

    ``vf`` and ``contr`` are tuples (one entry per term); ``prod`` sums the contributions.
    """

    def __init__(self, *terms: AbstractTerm) -> None:
        if len(terms) == 1 and isinstance(terms[0], (list, tuple)):
            terms = tuple(terms[0])
        if not terms or not all(isinstance(x, AbstractTerm) for x in terms):
            raise TypeError("MultiTerm: give one or more terms (ODETerm, ControlTerm, ...)")
        self.terms = tuple(terms)

    def vf(self, u, p, t):
        return tuple(term.vf(u, p, t) for term in self.terms)

    def contr(self, t0, t1):
        return tuple(term.contr(t0, t1) for term in self.terms)

    def prod(self, vf, control):
        total = None
        for term, v, c in zip(self.terms, vf, control):
            piece = term.prod(v, c)
            total = piece if total is None else total + piece
        return total

    def check(self, vf, control, u):
        for term, v, c in zip(self.terms, vf, control):
            term.check(v, c, u)

    def __repr__(self) -> str:
        return f"MultiTerm({', '.join(map(repr, self.terms))})"


class _FunctionTerm(ODETerm):
    """An ODE term from an already-bound field ``f(u, t)`` (the adjoints' augmented fields)."""

    def __init__(self, f: Callable) -> None:
        if not callable(f):
            raise TypeError(f"the vector field must be callable as f(u, t), got {type(f).__name__}")
        self.f = f

    def vf(self, u, p, t):
        return self.f(u, t)


class BoundTerm:
    """A term with its parameters bound: what solvers step over.

    ``vf(u, t)``, ``contr(t0, t1)``, ``prod(vf, control)``, ``vf_prod(u, t, control)``;
    ``control_is_time`` as the term's. A bound term is also callable as
    ``f(u, t)`` for ODE terms (the vector field).
    """

    __slots__ = ("term", "p", "control_is_time")

    def __init__(self, term: AbstractTerm, p: Any) -> None:
        self.term = term
        self.p = p
        self.control_is_time = term.control_is_time

    def vf(self, u, t):
        return self.term.vf(u, self.p, t)

    def __call__(self, u, t):
        return self.vf(u, t)

    def contr(self, t0, t1):
        return self.term.contr(t0, t1)

    def prod(self, vf, control):
        return self.term.prod(vf, control)

    def vf_prod(self, u, t, control):
        return self.term.prod(self.vf(u, t), control)

    # the parts of a MultiTerm, for solvers that treat drift and diffusion separately (SDE methods)
    def part_vf(self, i: int, u, t):
        """``vf`` of the ``i``-th term of a :class:`MultiTerm` (0: the drift of an SDE, 1: its diffusion)."""
        return self.term.terms[i].vf(u, self.p, t)

    def part_prod(self, i: int, vf, control):
        return self.term.terms[i].prod(vf, control)

    def part_term(self, i: int) -> "AbstractTerm":
        return self.term.terms[i]


def as_bound_term(f_or_term) -> BoundTerm:
    """A :class:`BoundTerm` from a bound term, a term without parameters, or a field ``f(u, t)``."""
    if isinstance(f_or_term, BoundTerm):
        return f_or_term
    if isinstance(f_or_term, AbstractTerm):
        return f_or_term.bind(None)
    return _FunctionTerm(f_or_term).bind(None)
