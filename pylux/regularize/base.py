"""How a :class:`~pylux.layers.NeuralODE` uses a regularizer: the :class:`AbstractRegularizer` contract.

A regularizer is an immutable object. The layer calls its hooks in this order
(hooks 0 and 1 when it is built, 2 to 6 in every train-mode forward call; a
test-mode call solves the plain ODE and calls none of them). Every hook but
:meth:`~AbstractRegularizer.value` has a no-op default:

0. ``reg.check_span(t0, t1)`` — once, when the layer is built: raise
   ``ValueError`` if the regularizer cannot work on this span.
1. ``reg.solve_kwargs(sensealg) -> dict`` — once, when the layer is built:
   the :func:`pylux.solve` options it needs (``save_stats=True``,
   ``dense=True``, ``save_everystep=True``). It raises ``NotImplementedError``
   naming an alternative when it cannot work with ``sensealg``.
2. ``reg.end_time(t0, t1, training, generator) -> float`` — the end of the
   span to solve (STEER draws it at random in train mode). At most one
   regularizer of a layer may change it.
3. ``data = reg.begin(z0, t0, t1, generator)`` — per-solve data that is drawn
   before the solve and held fixed during it (a Hutchinson probe, a sampled
   time). The layer passes ``data`` back to the next hooks.
4. ``reg.save_times(data) -> tuple[float, ...]`` — times at which
   :meth:`~RegularizationContext.state_at` must be able to return the state
   (the layer adds them to the saved times).
5. ``reg.integrand(field, z, dz, t, data)`` — only for subclasses of
   :class:`AbstractIntegralRegularizer`: the layer integrates it alongside
   ``z`` (an augmented state), so its integral costs no extra solve.
6. ``reg.value(ctx, data) -> 0-d tensor`` — after the solve, from the
   :class:`RegularizationContext` (the solution, its statistics, the bound
   vector field, the solver and its options).

The layer reports the values in its state (``st["regularization"]``, the sum,
and ``st["regularization_terms"]``, one entry per regularizer) so a loss can
add :math:`\\lambda R`.

A minimal integral regularizer (the kinetic energy of RNODE)::

    class Kinetic(AbstractIntegralRegularizer):
        def integrand(self, field, z, dz, t, data):
            return dz.reshape(batch_size(z), -1).pow(2).sum(dim=1)   # one value per sample
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field as dataclass_field
from typing import Any, Callable

import torch

from ..diffeq import Solution
from ..diffeq.options import SolveOptions
from ..diffeq.solvers import AbstractSolver

__all__ = ["AbstractRegularizer", "AbstractIntegralRegularizer", "RegularizationContext",
           "batch_size", "differentiates_solver", "VectorField"]

#: ``field(z, t) -> dz/dt`` with the layer's parameters bound; ``t`` a 0-d tensor of ``z``'s dtype.
VectorField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def batch_size(z: torch.Tensor) -> int:
    """The number of independent samples in a state: ``z.shape[0]`` for a batched (>= 2-D) state, else 1.

    Integrands return one value per sample, shape ``(batch_size(z),)``.
    """
    return z.shape[0] if z.dim() >= 2 else 1


def differentiates_solver(sensealg) -> bool:
    """True when gradients backpropagate through the solver's own operations (``None``, or a
    sensealg that declares the ``differentiates_solver`` capability, such as DirectAdjoint).

    Only then are per-step quantities of the solve (error and stiffness
    estimates, the dense output) differentiable with respect to the parameters.
    """
    return sensealg is None or bool(getattr(sensealg, "differentiates_solver", False))


@dataclass
class RegularizationContext:
    """What a regularizer's :meth:`~AbstractRegularizer.value` may read after the solve.

    Attributes:
        solution: the solution of the solve (of the augmented state when
            integral regularizers are present: read states with :meth:`state_at`,
            integrals with :meth:`integral`).
        field: the term the layer's solve stepped over, parameters bound and
            differentiable with respect to them (a
            :class:`~pylux.diffeq.integrate.CountingField`): callable as
            ``field(z, t)`` for an ODE layer; for an SDE layer it carries drift,
            diffusion and the solve's own Brownian path, so one solver step from
            it (the local regularizer's) reuses the path's increments. Its
            evaluations are the ``regularization_nfe`` the layer reports.
        solver: the solver of the solve.
        options: its canonical :class:`~pylux.diffeq.options.SolveOptions`
            (``reltol``, ``abstol``, ``norm``, ...).
        sensealg: the sensitivity algorithm (``None``: backprop through the solver).
        t0, t1: the span that was solved (``t1`` after any STEER draw).
        z0: the initial state.
        training: the layer's mode.
        generator: the per-call random generator (derived from the layer's state key).
        saved: ``{t: z(t)}`` for the times asked for in ``save_times`` (use :meth:`state_at`).
        integrals: per-regularizer integrals (use :meth:`integral`).
        dense_state: ``t -> z(t)`` from the dense output, when the solve kept one.
        trajectory: ``z`` at every time of ``solution.t`` (the layer's state, not
            the augmented one), stacked along dim 0.
    """

    solution: Solution
    field: VectorField
    solver: AbstractSolver
    options: SolveOptions
    sensealg: Any
    t0: float
    t1: float
    z0: torch.Tensor
    training: bool
    generator: torch.Generator
    saved: dict = dataclass_field(default_factory=dict)
    integrals: dict = dataclass_field(default_factory=dict)
    dense_state: Callable[[float], torch.Tensor] | None = None
    trajectory: torch.Tensor | None = None

    def state_at(self, t: float) -> torch.Tensor:
        """``z(t)``: a time a regularizer asked for in ``save_times``, or else from the dense output.

        Raises:
            ValueError: ``t`` was not requested and the solve kept no dense output.
        """
        if t in self.saved:
            return self.saved[t]
        if self.dense_state is None:
            raise ValueError(f"RegularizationContext.state_at({t!r}): this time was not requested in "
                             "save_times and the solve has no dense output (ask for dense=True in "
                             "solve_kwargs)")
        return self.dense_state(t)

    def integral(self, reg: "AbstractIntegralRegularizer") -> torch.Tensor:
        """The integral of ``reg``'s integrand over the span, one value per sample, shape ``(B,)``."""
        return self.integrals[id(reg)]


class AbstractRegularizer(abc.ABC):
    """Base class of the NeuralODE regularizers (the contract is in the module docstring).

    Subclasses implement :meth:`value` and override the hooks they need.
    ``name`` is the key of the regularizer's entry in ``st["regularization_terms"]``.
    """

    @property
    def name(self) -> str:
        return type(self).__name__

    def check_span(self, t0: float, t1: float) -> None:
        """Raise ``ValueError`` if this regularizer cannot work on ``(t0, t1)`` (default: any span)."""

    def solve_kwargs(self, sensealg) -> dict:
        """Options for :func:`pylux.solve` this regularizer needs; raise if ``sensealg`` cannot work."""
        return {}

    def end_time(self, t0: float, t1: float, training: bool, generator: torch.Generator) -> float:
        """The end time to solve to (default ``t1``)."""
        return t1

    def end_time_range(self, t0: float, t1: float) -> tuple[float, float]:
        """The smallest and largest end time :meth:`end_time` can return (default ``(t1, t1)``)."""
        return t1, t1

    def begin(self, z0: torch.Tensor, t0: float, t1: float, generator: torch.Generator) -> Any:
        """Per-solve data, drawn before the solve and fixed during it (default ``None``)."""
        return None

    def save_times(self, data: Any) -> tuple[float, ...]:
        """Times whose state :meth:`value` reads with ``ctx.state_at`` (default none)."""
        return ()

    @abc.abstractmethod
    def value(self, ctx: RegularizationContext, data: Any) -> torch.Tensor:
        """The regularization value, a 0-d tensor differentiable with respect to the parameters."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AbstractIntegralRegularizer(AbstractRegularizer):
    """A regularizer :math:`R = \\frac{1}{B}\\sum_b \\int_{t_0}^{t_1} r_b(z, f(z), t)\\, dt` integrated with ``z``.

    The layer appends one channel per sample to the state and integrates
    ``integrand`` alongside ``z`` with the same solver and step-size control
    (the integral channels enter the error norm, as in Finlay et al. 2020).
    Gradients flow through whatever sensitivity algorithm the layer uses: the
    integrand is part of the augmented vector field.

    Set ``needs_input_grad = True`` when the integrand differentiates ``dz``
    with respect to ``z`` (Jacobian terms): the layer then calls it with a ``z``
    that requires grad and under ``torch.enable_grad()``, also when the
    surrounding solve runs without gradients.
    """

    needs_input_grad: bool = False

    @abc.abstractmethod
    def integrand(self, field: VectorField, z: torch.Tensor, dz: torch.Tensor, t: torch.Tensor,
                  data: Any) -> torch.Tensor:
        """:math:`r(z, f(z), t)`, one value per sample, shape ``(batch_size(z),)``.

        Args:
            field: the bound vector field (for further derivatives, e.g. Taylor terms).
            z: the state at ``t`` (shape of the layer's input).
            dz: ``field(z, t)``, already computed.
            t: 0-d tensor.
            data: what :meth:`begin` returned for this solve.
        """

    def value(self, ctx: RegularizationContext, data: Any) -> torch.Tensor:
        # the extra channel integrates r along the solve, which is -∫|dt| r when time runs backward
        sign = 1.0 if ctx.t1 >= ctx.t0 else -1.0
        return ctx.integral(self).mean() * sign
