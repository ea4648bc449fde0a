"""Backpropagation through the solver's operations (discretise-then-optimise)."""

from __future__ import annotations

from ..diffeq import AbstractSensitivityAlgorithm, ODEProblem, Solution, integrate
from ..diffeq.options import SolveOptions

__all__ = ["DirectAdjoint"]


class DirectAdjoint(AbstractSensitivityAlgorithm):
    """Backpropagate through every operation of the solver (discretise-then-optimise).

    Exact gradients of the discrete solve, including through the adaptive
    step-size choices that depend on the state; memory grows with the number
    of steps (every stage of every step is kept for the backward pass).
    Required by the global error/stiffness regularizers, which differentiate
    the solver's own error estimates (``save_stats=True``). Equivalent to
    ``sensealg=None``.
    """

    differentiates_solver = True
    handles_sde = True

    def solve_with(self, problem: ODEProblem, solver, options: SolveOptions) -> Solution:
        t0, t1 = problem.tspan
        return integrate(problem.term.bind(problem.p), problem.u0, t0, t1, solver, options)

    def __repr__(self) -> str:
        return "DirectAdjoint()"
