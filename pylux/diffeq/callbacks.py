"""Termination callbacks: stop a solve early at an accepted step.

A termination callback is asked, for every trial step, whether the solve
should stop at its end point ``(u_new, t_new)``; the answer counts only if the
step is accepted. It returns a 0-d boolean tensor (preferred: it is fetched in
the same host synchronisation as the accept/reject decision, so checking costs
no extra synchronisation) or a Python bool. When it fires, the solve ends with
``ReturnCode.Terminated`` and ``sol.t[-1]`` is ``t_new``.

``du()`` gives ``f(u_new, t_new)``: for FSAL methods (Tsit5, DP5, BS3) and
VCAB3 it is the last stage the step already computed, so no extra evaluation;
for the others it costs one evaluation of ``f`` (counted in ``stats.nf``).
"""

from __future__ import annotations

import abc

from typing import Callable

import torch

__all__ = ["AbstractTerminationCallback", "TerminateSteadyState", "TerminateWhen"]


class AbstractTerminationCallback(abc.ABC):
    """Base class: implement ``should_terminate(u, t, du) -> bool tensor | bool``.

    ``u`` is the state at the end of the trial step, ``t`` its time (host
    float), ``du`` a zero-argument callable returning ``f(u, t)``.
    """

    @abc.abstractmethod
    def should_terminate(self, u: torch.Tensor, t: float, du: Callable[[], torch.Tensor]):
        """Implemented by each concrete subclass."""


def _nonnegative(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"{owner}: {name} must be >= 0, got {value!r}")
    return float(value)


class TerminateSteadyState(AbstractTerminationCallback):
    """Stop when ``||f(u)|| <= abstol + reltol * ||u||`` (2-norms over the whole state).

    This is the condition under which a continuous deep equilibrium model
    (Pal, Edelman & Rackauckas, "Mixing implicit and explicit deep learning
    with skip DEQs and infinite time neural ODEs", 2022) treats the ODE as
    having reached its steady state ``u*`` with ``f(u*) = 0``. It reuses the FSAL
    stage, so it adds no evaluation of ``f`` for Tsit5/DP5/BS3/VCAB3.

    Args:
        abstol: absolute tolerance on ``||f(u)||`` (default 1e-8).
        reltol: tolerance relative to ``||u||`` (default 1e-6).
        min_t: do not stop before this time (default: no limit).
    """

    def __init__(self, abstol: float = 1e-8, reltol: float = 1e-6, *, min_t: float | None = None) -> None:
        self.abstol = _nonnegative("TerminateSteadyState", "abstol", abstol)
        self.reltol = _nonnegative("TerminateSteadyState", "reltol", reltol)
        if self.abstol == 0 and self.reltol == 0:
            raise ValueError("TerminateSteadyState: abstol and reltol are both 0, so the condition "
                             "could only hold for an exact steady state; give a positive tolerance")
        self.min_t = min_t

    def should_terminate(self, u, t, du):
        if self.min_t is not None and t < self.min_t:
            return False
        derivative = du()
        return (torch.linalg.vector_norm(derivative.detach())
                <= self.abstol + self.reltol * torch.linalg.vector_norm(u.detach()))

    def __repr__(self) -> str:
        return f"TerminateSteadyState(abstol={self.abstol}, reltol={self.reltol})"


class TerminateWhen(AbstractTerminationCallback):
    """Stop at the first accepted step where ``condition(u, t)`` holds.

    Args:
        condition: ``condition(u, t) -> 0-d bool tensor or bool``, with ``u`` the
            state at the end of the step and ``t`` its time (a float). Return a
            tensor to avoid an extra host synchronisation.
    """

    def __init__(self, condition: Callable) -> None:
        if not callable(condition):
            raise TypeError(f"TerminateWhen: condition must be callable as condition(u, t), got "
                            f"{type(condition).__name__}")
        self.condition = condition

    def should_terminate(self, u, t, du):
        return self.condition(u, t)

    def __repr__(self) -> str:
        return f"TerminateWhen({getattr(self.condition, '__name__', 'condition')})"
