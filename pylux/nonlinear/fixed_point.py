"""Plain (optionally damped) fixed-point iteration."""

from __future__ import annotations

from ..core.validation import check_float

from ._base import AbstractNonlinearSolver

__all__ = ["FixedPointIteration"]


class FixedPointIteration(AbstractNonlinearSolver):
    """Damped fixed-point (Picard / Krasnoselskii-Mann) iteration.

        z_(k+1) = (1 - damping) z_k + damping g(z_k)

    Converges linearly, at the rate of the contraction factor of ``g`` (for
    ``damping = 1``) when ``g`` is a contraction near the fixed point; damping
    ``< 1`` helps maps whose Jacobian has eigenvalues near -1. One evaluation
    of ``g`` per iteration and no memory beyond the iterate: the cheapest
    iteration, the slowest convergence.

    Args:
        damping: the mixing weight in ``(0, 1]``.
        maxiters, abstol, reltol: optional defaults for :func:`nlsolve`.
    """

    _option_names = ("damping",)
    holds_no_iterates = True

    def __init__(self, *, damping: float = 1.0, maxiters=None, abstol=None, reltol=None, **unknown):
        self._set_common(maxiters, abstol, reltol, unknown)
        self._set("damping", check_float(self.name, "damping", damping, low=0.0, high=1.0, low_open=True))

    def init(self, z, gz, maxiters):
        return None

    def step(self, fn, z, gz, F, state, active):
        z_new = gz if self.damping == 1.0 else z + self.damping * F
        return z_new, fn(z_new), state, 1
