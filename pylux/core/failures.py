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

__all__ = ["AbstractReturnCode", "SolveFailure", "FAILURE_POLICIES", "failure_policy"]


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


#: What a caller wants when a solve fails: an exception, a warning and the partial result, or the
#: partial result alone (its return code says what happened).
FAILURE_POLICIES = ("raise", "warn", "ignore")


def failure_policy(where: str, on_failure: str | None = None, throw: bool | None = None,
                   default: str = "raise") -> str:
    """The one failure policy of every solve, from either spelling: ``on_failure`` or ``throw``.

    ``throw=True`` is ``on_failure="raise"`` and ``throw=False`` is
    ``on_failure="ignore"`` (DifferentialEquations.jl's and diffrax's spelling);
    ``on_failure="warn"`` also returns the partial result, with a warning.
    Giving both, with different meanings, is an error.

    Raises:
        TypeError: ``throw`` not a bool.
        ValueError: ``on_failure`` not one of ``FAILURE_POLICIES``, or contradicting ``throw``.
    """
    if throw is not None and not isinstance(throw, bool):
        raise TypeError(f"{where}: throw must be True or False, got {throw!r}")
    if on_failure is not None and on_failure not in FAILURE_POLICIES:
        raise ValueError(f"{where}: on_failure must be one of {', '.join(map(repr, FAILURE_POLICIES))}, "
                         f"got {on_failure!r}")
    from_throw = None if throw is None else ("raise" if throw else "ignore")
    if on_failure is not None and from_throw is not None and on_failure != from_throw:
        raise ValueError(f"{where}: throw={throw} and on_failure={on_failure!r} disagree; pass one of them")
    return on_failure or from_throw or default
