"""Return codes, the warning and the exception of the nonlinear solvers.

They speak the failure vocabulary shared with the ODE solves
(:mod:`pylux.core.failures`): :class:`NonlinearReturnCode` is an
:class:`~pylux.core.failures.AbstractReturnCode` and
:class:`NonlinearSolveError` a :class:`~pylux.core.failures.SolveFailure`, so
one ``except SolveFailure`` catches a failed ODE solve and a fixed-point
iteration that did not converge.
"""

from __future__ import annotations

from ..core.failures import AbstractReturnCode, SolveFailure

__all__ = ["NonlinearReturnCode", "ConvergenceWarning", "NonlinearSolveError", "maxiters_advice"]


class NonlinearReturnCode(AbstractReturnCode):
    """How a call of :func:`~pylux.nonlinear.nlsolve` ended.

    ``Success``: every batch element met its tolerance.
    ``MaxIters``: ``maxiters`` iterations ran out before every element converged.
    ``Unstable``: the iterate or residual of at least one batch element became
    NaN or infinite (those elements are frozen at their best finite iterate;
    the others were solved to the end).

    ``code.message`` (also spelt ``code.advice``) is a sentence on what to try next.
    """

    Success = "Success"
    MaxIters = "MaxIters"
    Unstable = "Unstable"

    @property
    def message(self) -> str:
        return _ADVICE[self]

    @property
    def advice(self) -> str:
        return self.message


#: The solvers a ``MaxIters`` message may suggest instead of the one that ran out.
_FASTER = ("Broyden", "Anderson", "NewtonKrylov")

_MAXITERS_ADVICE = (
    "increase `maxiters`, loosen `abstol`/`reltol`, or try a faster solver ({others}); if the map is "
    "not a contraction near the solution, plain fixed-point iteration may never converge.")

_ADVICE = {
    NonlinearReturnCode.Success: "every batch element converged.",
    NonlinearReturnCode.MaxIters: _MAXITERS_ADVICE.format(others=", ".join(_FASTER)),
    NonlinearReturnCode.Unstable: (
        "the iterates diverged or g produced NaN/Inf: check g at the starting point, "
        "use FixedPointIteration(damping=0.5), Broyden(line_search=True), or a smaller "
        "Anderson `beta`."),
}


def maxiters_advice(solver_name: str) -> str:
    """The ``MaxIters`` advice for a solve that ran ``solver_name``: it suggests only the other solvers."""
    others = [name for name in _FASTER if name != solver_name]
    if solver_name == "LimitedMemoryBroyden":
        others = ["Broyden (full memory)" if name == "Broyden" else name for name in others]
    return _MAXITERS_ADVICE.format(others=", ".join(others))


class ConvergenceWarning(UserWarning):
    """A nonlinear or linear solve stopped before reaching its tolerance."""


class NonlinearSolveError(SolveFailure):
    """A nonlinear solve failed (no convergence with ``on_failure="raise"``, or NaN/Inf).

    Attributes:
        retcode: the :class:`NonlinearReturnCode` that describes the failure.
        iteration: the iteration at which the failure was detected.
        solution: the :class:`~pylux.nonlinear.NonlinearSolution` reached (the
            converged elements solved, the failed ones at their best finite
            iterate), or ``None`` where the raiser has none.
    """

    def __init__(self, message: str, retcode: NonlinearReturnCode, iteration: int, solution=None):
        super().__init__(message, retcode, solution)
        self.iteration = iteration
