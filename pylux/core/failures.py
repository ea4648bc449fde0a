"""One failure vocabulary for every solve (ODE, SDE, nonlinear): return codes and the error they raise.

Every solver's return-code enum derives from :class:`AbstractReturnCode`, so
``code.successful`` and ``code.message`` (what happened and what to try) mean
the same thing everywhere, and every failure raised with ``throw=True``
derives from :class:`SolveFailure`, so one ``except`` catches a failed ODE
solve, a failed Newton iteration inside an implicit step, or a DEQ whose
fixed-point iteration did not converge.
"""

from __future__ import annotations

import enum

__all__ = ["AbstractReturnCode", "SolveFailure"]


class AbstractReturnCode(enum.Enum):
    """Base of the return-code enums. Members named ``Success`` or ``Terminated`` are successful."""

    @property
    def successful(self) -> bool:
        return self.name in ("Success", "Terminated")

    @property
    def message(self) -> str:
        """What the code means and how to fix it (the member's value unless a subclass says otherwise)."""
        return str(self.value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


class SolveFailure(RuntimeError):
    """A solve ended with an unsuccessful return code and its caller asked for an exception.

    Attributes:
        retcode: the :class:`AbstractReturnCode` member.
        solution: the partial result, when the solver has one (else ``None``).
    """

    def __init__(self, message: str, retcode: AbstractReturnCode | None = None, solution=None) -> None:
        super().__init__(message)
        self.retcode = retcode
        self.solution = solution
