"""Backpropagation through the solver's operations (discretise-then-optimise)."""

from __future__ import annotations

from ..diffeq import AbstractSensitivityAlgorithm, ODEProblem, Solution, integrate
from ..diffeq.options import SolveOptions
from .checkpointing import check_checkpoints, checkpointed_solve

__all__ = ["DirectAdjoint"]


class DirectAdjoint(AbstractSensitivityAlgorithm):
    """Backpropagate through every operation of the solver (discretise-then-optimise).

    Exact gradients of the discrete solve, including through the adaptive
    step-size choices that depend on the state; memory grows with the number
    of steps (every stage of every step is kept for the backward pass).
    Required by the global error/stiffness regularizers, which differentiate
    the solver's own error estimates (``save_stats=True``). Equivalent to
    ``sensealg=None``.

    Args:
        checkpoints: ``None`` (default): keep every step on the tape. An
            integer ``c >= 1``: binomial (revolve) checkpointing
            (:mod:`pylux.sensitivity.checkpointing`, Griewank 1992): the
            forward solve runs without a tape and records its accepted steps;
            the backward pass stores at most ``c`` states, recomputes steps from
            them with their recorded ``dt`` (the minimal
            ``r n - binom(c + r, c + 1)`` extra steps for ``n`` steps, ``r`` the
            repetition number) and backpropagates one step at a time. Same
            gradients as without checkpoints (to round-off); explicit
            Runge–Kutta solvers, ODEs, no ``save_stats``/``dense``.
            ``sol.backward_stats`` then holds ``nsteps``, ``nrecompute``,
            ``ntaped``, ``ncheckpoints`` (most states stored), ``nf`` and ``nvjp``.
    """

    differentiates_solver = True
    handles_sde = True

    def __init__(self, checkpoints: int | None = None) -> None:
        self.checkpoints = check_checkpoints(checkpoints)
        # checkpointed solves keep no tape of the forward pass: per-step estimates and sol(t) are not
        # differentiable there, so the capability is declared per instance
        self.differentiates_solver = self.checkpoints is None

    def solve_with(self, problem: ODEProblem, solver, options: SolveOptions) -> Solution:
        if self.checkpoints is not None:
            return checkpointed_solve(self, problem, solver, options)
        t0, t1 = problem.tspan
        return integrate(problem.term.bind(problem.p), problem.u0, t0, t1, solver, options)

    def __repr__(self) -> str:
        return "DirectAdjoint()" if self.checkpoints is None else f"DirectAdjoint(checkpoints={self.checkpoints})"
