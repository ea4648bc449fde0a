"""Return codes, the warning and the exception of the nonlinear solvers."""

from __future__ import annotations

import enum

__all__ = ["NonlinearReturnCode", "ConvergenceWarning", "NonlinearSolveError"]


class NonlinearReturnCode(enum.Enum):
    """How a call of :func:`~pylux.nonlinear.nlsolve` ended.

    ``Success``: every batch element met its tolerance.
    ``MaxIters``: ``maxiters`` iterations ran out before every element converged.
    ``Unstable``: an iterate or residual became NaN or infinite.

    ``code.advice`` is a sentence on what to try next.
    """

    Success = "Success"
    MaxIters = "MaxIters"
    Unstable = "Unstable"

    @property
    def advice(self) -> str:
        return _ADVICE[self]


_ADVICE = {
    NonlinearReturnCode.Success: "every batch element converged.",
    NonlinearReturnCode.MaxIters: (
        "increase `maxiters`, loosen `abstol`/`reltol`, or try a faster solver "
        "(Broyden, Anderson, NewtonKrylov); if the map is not a contraction near the "
        "solution, plain fixed-point iteration may never converge."),
    NonlinearReturnCode.Unstable: (
        "the iterates diverged or g produced NaN/Inf: check g at the starting point, "
        "use FixedPointIteration(damping=0.5), Broyden(line_search=True), or a smaller "
        "Anderson `beta`."),
}


class ConvergenceWarning(UserWarning):
    """A nonlinear or linear solve stopped before reaching its tolerance."""


class NonlinearSolveError(RuntimeError):
    """A nonlinear solve failed (no convergence with ``on_failure="raise"``, or NaN/Inf).

    Attributes:
        retcode: the :class:`NonlinearReturnCode` that describes the failure.
        iteration: the iteration at which the failure was detected.
    """

    def __init__(self, message: str, retcode: NonlinearReturnCode, iteration: int):
        super().__init__(message)
        self.retcode = retcode
        self.iteration = iteration
