"""``SecondOrderODEProblem``: ``d²u/dt² = f(du, u, p, t)``, solved as a first-order system.

As DifferentialEquations.jl's ``SecondOrderODEProblem``, whose state is an
``ArrayPartition(du, u)``: here the state is one tensor ``z`` of shape
``(*u0.shape, 2)`` with the velocity ``z[..., 0] = du/dt`` and the position
``z[..., 1] = u`` stacked along a new trailing axis, so a batch keeps its
leading axes (a per-sample event condition sees them unchanged) and every
solver, sensitivity algorithm and callback works on it unchanged::

    dz/dt = (f(du, u, p, t), du)

``sol.u`` is that state; ``sol.position`` and ``sol.velocity`` are its two
halves (views, differentiable); :meth:`SecondOrderODEProblem.position` and
:meth:`~SecondOrderODEProblem.velocity` split any state, e.g. ``sol(t)`` or
the ``u`` a callback's condition receives.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .problem import ODEProblem, check_state

__all__ = ["SecondOrderODEProblem"]


class _FirstOrderField:
    """``z' = (f(du, u, p, t), du)`` on ``z = stack([du, u], -1)``; checks the acceleration's shape."""

    __slots__ = ("f", "__name__")

    def __init__(self, f: Callable) -> None:
        self.f = f
        self.__name__ = getattr(f, "__name__", type(f).__name__)

    def __call__(self, z: torch.Tensor, p: Any, t: torch.Tensor) -> torch.Tensor:
        du, u = z[..., 0], z[..., 1]
        acceleration = self.f(du, u, p, t)
        if not isinstance(acceleration, torch.Tensor) or acceleration.shape != u.shape:
            got = tuple(acceleration.shape) if isinstance(acceleration, torch.Tensor) else type(acceleration).__name__
            raise ValueError(f"SecondOrderODEProblem: f(du, u, p, t) must return d²u/dt² with u's shape "
                             f"{tuple(u.shape)}, got {got}")
        return torch.stack([acceleration, du], dim=-1)


class SecondOrderODEProblem(ODEProblem):
    """The second-order problem ``u'' = f(u', u, p, t)``, ``u'(t0) = du0``, ``u(t0) = u0``.

    Solved as the first-order system of the module docstring, so every
    first-order solver applies (the Lux documentation's example learns
    ``d²u/dt² = NN(u)`` this way).

    Args:
        f: ``f(du, u, p, t) -> d²u/dt²`` (velocity first, as in
            DifferentialEquations.jl), a tensor of ``u0``'s shape.
        du0: the initial velocity; u0: the initial position. Tensors of the
            same shape, dtype and device (any shape; a batch is part of it).
        tspan, p: as for :class:`~pylux.diffeq.problem.ODEProblem`.

    Attributes:
        u0: the packed initial state ``stack([du0, u0], -1)``.
        second_order_f: ``f`` as given.

    Raises:
        TypeError: ``f`` not callable; ``du0``/``u0`` not floating-point tensors.
        ValueError: shapes, dtypes or devices of ``du0`` and ``u0`` differ; the
            checks of :class:`ODEProblem`; ``f`` returning the wrong shape (at
            its first call).
    """

    __slots__ = ("second_order_f",)

    def __init__(self, f: Callable, du0: torch.Tensor, u0: torch.Tensor, tspan, p: Any = None) -> None:
        if not callable(f):
            raise TypeError(f"SecondOrderODEProblem: f must be callable as f(du, u, p, t), got {type(f).__name__}")
        du0 = check_state(du0, "SecondOrderODEProblem (du0)")
        u0 = check_state(u0, "SecondOrderODEProblem")
        for what, a, b in (("shape", tuple(du0.shape), tuple(u0.shape)), ("dtype", du0.dtype, u0.dtype),
                           ("device", du0.device, u0.device)):
            if a != b:
                raise ValueError(f"SecondOrderODEProblem: du0 and u0 must have the same {what}, got {a} and {b}")
        super().__init__(_FirstOrderField(f), torch.stack([du0, u0], dim=-1), tspan, p)
        self.second_order_f = f

    @staticmethod
    def velocity(z: torch.Tensor) -> torch.Tensor:
        """``du/dt`` from a packed state (or a stack of them): ``z[..., 0]``."""
        return z[..., 0]

    @staticmethod
    def position(z: torch.Tensor) -> torch.Tensor:
        """``u`` from a packed state (or a stack of them): ``z[..., 1]``."""
        return z[..., 1]

    def split(self, sol):
        """Set ``sol.position`` and ``sol.velocity`` (views of ``sol.u``); returns ``sol``."""
        sol.velocity, sol.position = self.velocity(sol.u), self.position(sol.u)
        return sol

    def remake(self, *, f: Callable | None = None, du0: torch.Tensor | None = None, u0: torch.Tensor | None = None,
               tspan=None, p: Any = ...) -> "SecondOrderODEProblem":
        """A copy with some fields replaced (validated again); ``du0``/``u0`` are the two halves."""
        if tspan is None:
            tspan = self.tspan if self.time_dtype == torch.float64 else tuple(
                torch.tensor(t, dtype=torch.float32) for t in self.tspan)
        return SecondOrderODEProblem(self.second_order_f if f is None else f,
                                     self.velocity(self.u0) if du0 is None else du0,
                                     self.position(self.u0) if u0 is None else u0, tspan,
                                     self.p if p is ... else p)

    def __repr__(self) -> str:
        shape = tuple(self.u0.shape[:-1])
        return (f"SecondOrderODEProblem(f={getattr(self.second_order_f, '__name__', 'f')}, u0: {shape} "
                f"{str(self.u0.dtype).replace('torch.', '')}, tspan={self.tspan})")
