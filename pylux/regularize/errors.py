"""Global solver-heuristic regularizers: ERNODE and SRNODE (Pal, Ma, Shah, Rackauckas, ICML 2021).

Both read what the adaptive solver already computed at every accepted step
(``save_stats=True``): no extra evaluation of the vector field. They are
differentiable only when gradients backpropagate through the solver
(``sensealg=None`` or :class:`~pylux.sensitivity.DirectAdjoint`); a continuous
adjoint (Backsolve, Interpolating, ...) does not differentiate the per-step
estimates, so these regularizers raise there and point to
:class:`~pylux.regularize.LocalErrorRegularization`, which works with any.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.keywords import check_keywords
from .base import AbstractRegularizer, RegularizationContext, differentiates_solver

__all__ = ["ErrorEstimateRegularization", "StiffnessRegularization"]


def _require_direct(owner: str, sensealg) -> None:
    if not differentiates_solver(sensealg):
        raise NotImplementedError(
            f"{owner} differentiates the solver's per-step estimates, which only backpropagation "
            f"through the solver provides (sensealg=None or DirectAdjoint()), not {sensealg!r}. "
            "With an adjoint sensealg use LocalErrorRegularization(), which regularizes one step at a "
            "sampled time and works with every sensealg.")


def _step_sizes(ctx: RegularizationContext, like: torch.Tensor) -> torch.Tensor:
    return ctx.solution.stats.dt.to(dtype=like.dtype, device=like.device).abs()


class ErrorEstimateRegularization(AbstractRegularizer):
    r"""ERNODE: the solver's local error estimates summed over the accepted steps.

    .. math::  R_E = \sum_j E_j\,|\Delta t_j| \qquad\text{or, with } ``squared=True``,\qquad
               R_E = \sum_j E_j^2

    where :math:`E_j` is the scaled error estimate of accepted step :math:`j`
    (``sol.stats.error_estimate``: the error-control norm of
    ``err_j / (abstol + reltol max(|u_j|, |u_{j+1}|))``, exactly what the
    controller compared with 1) and :math:`\Delta t_j` its size (Pal et al.,
    ICML 2021, eq. 3). Penalising it drives the dynamics towards those the
    solver can take large steps on, cutting the number of function evaluations.
    The step sizes themselves are treated as constants (they are host floats
    chosen by the controller).

    Args:
        squared: use :math:`\sum_j E_j^2` instead of :math:`\sum_j E_j |\Delta t_j|`.

    Raises:
        TypeError: ``squared`` not a bool; an unknown keyword (named, with the closest known one).
        NotImplementedError: (when the layer is built) with an adjoint sensealg.
        ValueError: (after the solve) a solver without an embedded error estimate.
    """

    def __init__(self, squared: bool = False, **unknown: Any) -> None:
        check_keywords(unknown, "ErrorEstimateRegularization", ("squared",))
        if not isinstance(squared, bool):
            raise TypeError(f"ErrorEstimateRegularization: squared must be a bool, got {squared!r}")
        self.squared = squared

    def solve_kwargs(self, sensealg) -> dict:
        _require_direct("ErrorEstimateRegularization", sensealg)
        return {"save_stats": True}

    def value(self, ctx: RegularizationContext, data: Any) -> torch.Tensor:
        errors = ctx.solution.stats.error_estimate
        if errors is None:
            raise ValueError(f"ErrorEstimateRegularization: {type(ctx.solver).__name__}() has no embedded "
                             "error estimate; use an adaptive pair such as Tsit5(), DP5() or BS3()")
        if self.squared:
            return errors.pow(2).sum()
        return (errors * _step_sizes(ctx, errors)).sum()

    def __repr__(self) -> str:
        return f"ErrorEstimateRegularization(squared={self.squared})"


class StiffnessRegularization(AbstractRegularizer):
    r"""SRNODE: Shampine's stiffness estimates summed over the accepted steps.

    .. math::  R_S = \sum_j S_j\,|\Delta t_j|, \qquad
               S_j = \frac{\lVert k_s - k_{s-1} \rVert_2}{\lVert Y_s - Y_{s-1} \rVert_2}

    from the last two stages of each step (``sol.stats.stiffness``; an
    estimate of the largest eigenvalue magnitude of the Jacobian along the
    step; Shampine 1977, Pal et al., ICML 2021, eq. 4). No extra evaluations.

    Raises:
        NotImplementedError: (when the layer is built) with an adjoint sensealg.
        ValueError: (after the solve) a one-stage solver, which has no estimate.
    """

    def solve_kwargs(self, sensealg) -> dict:
        _require_direct("StiffnessRegularization", sensealg)
        return {"save_stats": True}

    def value(self, ctx: RegularizationContext, data: Any) -> torch.Tensor:
        stiffness = ctx.solution.stats.stiffness
        if stiffness is None:
            raise ValueError(f"StiffnessRegularization: {type(ctx.solver).__name__}() has no stiffness "
                             "estimate (it needs two stages per step); use Tsit5(), DP5() or BS3()")
        return (stiffness * _step_sizes(ctx, stiffness)).sum()
