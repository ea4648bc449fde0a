"""The result of a solve: :class:`Solution`, :class:`ReturnCode`, :class:`SolverStats`, errors.

A failed solve is loud: with ``throw=True`` (the default) it raises the
:class:`SolverError` subclass of its return code, whose message says what
happened, where (t, dt, step counts) and what to try, and which carries the
partial solution as ``err.solution``; with ``throw=False`` the partial
solution is returned with ``sol.retcode`` set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..core.failures import AbstractReturnCode, SolveFailure
from ._device import host_time
from .interpolation import DenseOutput

__all__ = [
    "ReturnCode",
    "SolverStats",
    "Solution",
    "SolverError",
    "MaxItersError",
    "DtLessThanMinError",
    "UnstableError",
    "FailureError",
]


class ReturnCode(AbstractReturnCode):
    """Why a solve stopped. ``code.message`` says what it means and how to fix it."""

    Success = "the solve reached the end of tspan"
    Terminated = ("a termination callback stopped the solve early; sol.t[-1] is the time it "
                  "stopped")
    MaxIters = ("the solver took maxiters steps (accepted + rejected) without reaching the end "
                "of tspan. Increase maxiters, loosen reltol/abstol, or check whether the problem "
                "is stiff (an explicit method then needs tiny steps) or blows up in finite time")
    DtLessThanMin = ("the step size fell below dtmin, or below the resolution of the time type "
                     "(t + dt == t). The solution may blow up in finite time, have a "
                     "discontinuity, or be very stiff. Check f near this t; try a smaller dtmin, "
                     "looser tolerances, or a float64 tspan")
    Unstable = ("f produced NaN or Inf and shrinking the step did not make it go away, or the solver "
                "found its own result unreliable (as said before this). Check f "
                "for overflow or invalid operations (log/sqrt of negatives, division by zero) "
                "near this t, rescale the problem, or use float64")
    Failure = ("the solver's own step failed in a way a smaller step cannot fix (an implicit "
               "method's linear solve, say); the message names the reason")


@dataclass
class SolverStats:
    """Counters of a solve, and per-step internals when ``save_stats=True``.

    Attributes:
        nf: number of evaluations of ``f`` (every call, including the initial
            step-size heuristic and termination checks).
        naccept, nreject: accepted and rejected steps.
        t: start time of each accepted step, shape ``(naccept,)``, time dtype
            (with ``save_stats=True``, and always from the adjoint sensealgs'
            forward solves, which record ``t`` and ``dt`` only; else ``None``).
        dt: signed size of each accepted step, same shape.
        error_estimate: the scaled local error estimate ``E_j = ||err_j /
            (abstol + reltol max(|u_j|, |u_{j+1}|))||`` of each accepted step, as
            the controller saw it, shape ``(naccept,)``, state dtype. It is an
            autograd function of the solution, so ``sum_j E_j |dt_j|`` (the
            ERNODE regularizer of Pal et al., ICML 2021) can be backpropagated.
            ``None`` for methods without an embedded error estimate.
        stiffness: Shampine's stiffness estimate of each accepted step,
            ``||k_s - k_{s-1}|| / ||Y_s - Y_{s-1}||`` (2-norms) from the last two
            stages (for Tsit5/DP5 both at ``c = 1``, so it estimates
            ``|lambda|`` of the Jacobian along the step; Shampine, "Stiffness and
            non-stiff differential equation solvers II", 1977). Differentiable,
            no extra evaluations. ``None`` for one-stage methods.
    """

    nf: int = 0
    naccept: int = 0
    nreject: int = 0
    #: evaluations of an SDE's diffusion g (DifferentialEquations.jl's nf2); 0 for ODEs
    ng: int = 0
    #: ``(t_start, t_end)`` of each accepted step as exact host floats (the time grid itself, not
    #: rounded through the time dtype's tensor), when ``t``/``dt`` are recorded; else ``None``
    steps: tuple | None = None
    t: torch.Tensor | None = None
    dt: torch.Tensor | None = None
    error_estimate: torch.Tensor | None = None
    stiffness: torch.Tensor | None = None
    #: stiff solvers' counters: Jacobians, Newton matrices formed, linear solves, GMRES products,
    #: Newton iterations and Newton convergence failures (OrdinaryDiffEq's DEStats names)
    njac: int = 0
    nw: int = 0
    nsolve: int = 0
    nkrylov: int = 0
    nnonliniter: int = 0
    nnonlinconvfail: int = 0
    #: AutoSwitch: the index of the method that took each accepted step (0 non-stiff, 1 stiff)
    alg_choice: tuple | None = None

    @property
    def nsteps(self) -> int:
        """Attempted steps (accepted + rejected): what ``maxiters`` limits."""
        return self.naccept + self.nreject

    def __repr__(self) -> str:
        extra = ", per-step internals recorded" if self.t is not None else ""
        ng = f", ng={self.ng}" if self.ng else ""
        return f"SolverStats(nf={self.nf}{ng}, naccept={self.naccept}, nreject={self.nreject}{extra})"


class Solution:
    """The output of :func:`pylux.diffeq.solve`.

    Attributes:
        t: saved times, 1-D tensor in the time dtype of ``tspan`` (float64 unless
            ``tspan`` was given as float32 tensors), on the state's device.
        u: saved states stacked along dim 0, shape ``(len(t), *u0.shape)``.
        retcode: a :class:`ReturnCode`.
        stats: a :class:`SolverStats`.
        message: for a failure, where it happened (t, dt, steps) and what to try.
        events: with event callbacks, an :class:`~pylux.diffeq.events.EventLog`
            (times, which callback, which sample, states); else ``None``.
        position, velocity: for a :class:`~pylux.diffeq.second_order.SecondOrderODEProblem`,
            ``u`` split into ``u`` and ``du/dt`` (views of ``sol.u``, each
            ``(len(t), *u0.shape)``); else ``None``.

    ``sol(t)`` evaluates the dense output (the method's own interpolant) at a
    scalar or a sequence/tensor of times inside the solved interval; it needs
    ``dense=True`` (the default when ``saveat`` is not given). It is
    differentiable with respect to the solution.
    """

    def __init__(self, t: torch.Tensor, u: torch.Tensor, retcode: ReturnCode, stats: SolverStats,
                 *, message: str = "", dense: DenseOutput | None = None, solver: Any = None,
                 u0: torch.Tensor | None = None) -> None:
        self.t = t
        self.u = u
        self.retcode = retcode
        self.stats = stats
        self.message = message or retcode.message
        self.solver = solver
        self._dense = dense
        self._u0 = u0
        #: counters of the backward pass through this solve (a dict filled when it runs), set by
        #: the sensitivity algorithms that have one; None otherwise
        self.backward_stats: dict | None = None
        #: ``(u, solver_state)`` where the solve stopped (internal: the reversible pair's Z)
        self.final_state = None
        self.events = None
        self.position: torch.Tensor | None = None
        self.velocity: torch.Tensor | None = None

    @property
    def success(self) -> bool:
        """True for ``Success`` and ``Terminated``."""
        return self.retcode.successful

    @property
    def dense(self) -> bool:
        return self._dense is not None

    def __call__(self, t) -> torch.Tensor:
        if self._dense is None:
            raise ValueError(
                "sol(t) needs the dense output, which this solve did not store; pass dense=True "
                "to solve() (the default only when saveat is not given)")
        scalar, times = _host_times(t)
        values = self._dense(times, self._u0)
        return values[0] if scalar else values

    def __len__(self) -> int:
        return self.t.shape[0]

    def __repr__(self) -> str:
        n = self.t.shape[0]
        span = f" in [{self.t[0].item():.6g}, {self.t[-1].item():.6g}]" if n else ""
        solver = f"{type(self.solver).__name__}(), " if self.solver is not None else ""
        return (f"Solution({solver}retcode={self.retcode.name}, t: {n} points{span}, "
                f"u: {tuple(self.u.shape)} {str(self.u.dtype).replace('torch.', '')}, "
                f"nf={self.stats.nf}, naccept={self.stats.naccept}, nreject={self.stats.nreject}"
                f"{', dense' if self.dense else ''})")


def _host_times(t) -> tuple[bool, list[float]]:
    if isinstance(t, torch.Tensor):
        if t.dim() == 0:  # a solver's time tensor comes from the host table: no device-to-host copy
            return True, [host_time(t)]
        if t.dim() > 1:
            raise ValueError(f"sol(t): t must be a scalar or 1-D, got shape {tuple(t.shape)}")
        return t.dim() == 0, [float(x) for x in t.detach().reshape(-1).tolist()]
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return True, [float(t)]
    if isinstance(t, Sequence):
        return False, [float(x) for x in t]
    raise TypeError(f"sol(t): t must be a number, a sequence of numbers or a tensor, got "
                    f"{type(t).__name__}")


class SolverError(SolveFailure):
    """A solve that did not reach the end of tspan. ``err.solution`` holds the partial solution.

    Attributes: ``retcode``, ``solution``, ``t`` (where it stopped), ``dt``
    (the step size then), ``naccept``, ``nreject``.
    """

    retcode: ReturnCode

    def __init__(self, message: str, *, solution: Solution, t: float, dt: float) -> None:
        super().__init__(message, type(self).retcode, solution)
        self.t = t
        self.dt = dt
        self.naccept = solution.stats.naccept
        self.nreject = solution.stats.nreject


class MaxItersError(SolverError):
    """``maxiters`` steps were taken without reaching the end of tspan."""

    retcode = ReturnCode.MaxIters


class DtLessThanMinError(SolverError):
    """The step size fell below ``dtmin`` or below the time resolution."""

    retcode = ReturnCode.DtLessThanMin


class UnstableError(SolverError):
    """NaN or Inf in the solution that step rejection could not remove."""

    retcode = ReturnCode.Unstable


class FailureError(SolverError):
    """The solver's step failed and could not be retried (``result.reason`` is in the message)."""

    retcode = ReturnCode.Failure


ERROR_FOR_RETCODE = {
    ReturnCode.Failure: FailureError,
    ReturnCode.MaxIters: MaxItersError,
    ReturnCode.DtLessThanMin: DtLessThanMinError,
    ReturnCode.Unstable: UnstableError,
}
