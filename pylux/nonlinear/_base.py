"""The solver protocol shared by every fixed-point / root solver, and batched helpers.

A solver is an immutable description of an algorithm (its options, validated at
construction). The iteration itself lives in :func:`~pylux.nonlinear.nlsolve`,
which calls two methods of the solver:

* ``init(z, gz, maxiters) -> state``: allocate the solver's working memory for
  the flattened batch ``z`` of shape ``(B, N)`` and ``gz = g(z)``;
* ``step(fn, z, gz, F, state, active) -> (z_new, gz_new, state, nfe)``: propose
  the next iterate from the current one (``F = gz - z``) and evaluate
  ``gz_new = fn(z_new)``; ``nfe`` counts the evaluations of ``fn`` it made.

``active`` is ``None`` (every batch element still iterates) or a ``(B,)`` bool
tensor; ``nlsolve`` keeps the inactive (converged, or unstable: NaN/Inf)
elements at their current value whatever the step proposes for them, so a
step must only never mix batch elements (an inactive row may hold NaN; it
must not reach the other rows, e.g. through a batch-wide stopping test).
A solver may also implement ``diagnosis(state, unconverged) -> str``, a
sentence that ``nlsolve`` adds to its failure message.

Every solver works on the flattened problem: batch element ``b`` is
row ``b`` of ``z``, and all its algebra (dot products, small least-squares
systems, rank-one updates) is per row, vectorised over the batch.

``state`` may hold preallocated buffers that ``step`` updates in place; the
tensors ``step`` returns are never views of them.

A solver whose ``step`` keeps no reference to ``z``, ``gz`` or ``F`` beyond
the call and returns none of them (nor a view of one), except that ``z_new``
may be ``gz`` itself, sets ``holds_no_iterates = True``; ``nlsolve`` then
writes every residual into one buffer instead of a new tensor per iteration
(the residual is never passed to ``g``, so no tensor ``g`` was given changes
later).
"""

from __future__ import annotations

import abc

from typing import Any, Callable, NamedTuple

import torch

from ..core.keywords import check_keywords
from ..core.validation import check_float, check_int

__all__ = ["AbstractNonlinearSolver", "rowdot", "axpy_rows", "combine_rows", "backtracking_line_search",
           "LineSearchResult", "MAX_INCREASE"]

FlatMap = Callable[[torch.Tensor], torch.Tensor]


class AbstractNonlinearSolver(abc.ABC):
    """Base class of the fixed-point / root solvers used by :func:`~pylux.nonlinear.nlsolve`.

    Every solver accepts the termination settings ``maxiters``, ``abstol`` and
    ``reltol`` as optional defaults for ``nlsolve`` (``None``: use nlsolve's
    own). Giving a setting both here and to ``nlsolve`` with different values
    is an error, so that one setting has one home per call.

    Solvers are immutable: ``solver.replace(**changes)`` returns a modified copy.
    Subclasses list their algorithm options in ``_option_names`` and implement
    ``init`` and ``step`` (see the module docstring).
    """

    _option_names: tuple[str, ...] = ()
    _common_names = ("maxiters", "abstol", "reltol")
    #: ``step`` holds none of its inputs beyond the call (see the module docstring); ``False`` is always safe.
    holds_no_iterates = False

    def _set_common(self, maxiters, abstol, reltol, unknown: dict) -> None:
        where = type(self).__name__
        check_keywords(unknown, where, self._option_names + self._common_names)
        self._set("maxiters", check_int(where, "maxiters", maxiters, 0, allow_none=True))
        self._set("abstol", check_float(where, "abstol", abstol, low=0.0, allow_none=True))
        self._set("reltol", check_float(where, "reltol", reltol, low=0.0, allow_none=True))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"{type(self).__name__} is immutable; use solver.replace({name}=...) for a modified copy.")

    @property
    def name(self) -> str:
        return type(self).__name__

    def options(self) -> dict:
        """Every option, including the termination defaults, as a dict."""
        names = self._option_names + self._common_names
        return {n: getattr(self, n) for n in names}

    def replace(self, **changes) -> "AbstractNonlinearSolver":
        """A copy with some options changed (validated like the constructor)."""
        opts = self.options()
        check_keywords({k: v for k, v in changes.items() if k not in opts}, f"{self.name}.replace", opts)
        opts.update(changes)
        return type(self)(**opts)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.options().items()
                          if not (k in self._common_names and v is None))
        return f"{self.name}({shown})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options() == other.options()

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.options().items())))

    @abc.abstractmethod
    def init(self, z: torch.Tensor, gz: torch.Tensor, maxiters: int) -> Any:
        """Implemented by each concrete subclass."""

    def diagnosis(self, state: Any, unconverged: torch.Tensor) -> str:
        """A sentence on what went wrong inside the solver for the ``(B,)`` mask ``unconverged``, or ``""``.

        :func:`~pylux.nonlinear.nlsolve` appends it to its failure message (for
        example, Newton-Krylov names a singular Jacobian here).
        """
        return ""

    @abc.abstractmethod
    def step(self, fn: FlatMap, z: torch.Tensor, gz: torch.Tensor, F: torch.Tensor, state: Any,
             active: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, Any, int]:
        """Implemented by each concrete subclass."""


# Below this many rows, batched products take a slow path on CPU (several times
# slower than a few fused multiply-adds); at or above it they win.
_SMALL_ROWS = 4


def rowdot(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out[b, i] = <rows[b, i, :], x[b, :]>`` for rows ``(B, k, N)`` and x ``(B, N)``."""
    if rows.shape[1] < _SMALL_ROWS:
        return torch.linalg.vecdot(rows, x.unsqueeze(1))
    # As a row vector times a matrix, (B,1,N)@(B,N,k): several times faster on CPU
    # than the matrix-vector form (B,k,N)@(B,N,1), and as fast elsewhere.
    return torch.bmm(x.unsqueeze(1), rows.transpose(1, 2)).squeeze(1)


def axpy_rows(base: torch.Tensor | None, coeffs: torch.Tensor, rows: torch.Tensor,
              alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """``beta * base[b] + alpha * sum_i coeffs[b, i] rows[b, i, :]`` as a new ``(B, N)`` tensor.

    ``base=None`` means zero. Rows ``(B, k, N)`` with ``k >= 1``, coeffs ``(B, k)``.
    """
    k = rows.shape[1]
    if k >= _SMALL_ROWS:
        if base is None:
            out = torch.bmm(coeffs.unsqueeze(1), rows)
            return (out if alpha == 1.0 else out.mul_(alpha)).squeeze(1)
        return torch.baddbmm(base.unsqueeze(1), coeffs.unsqueeze(1), rows, beta=beta, alpha=alpha).squeeze(1)
    scaled = coeffs if alpha == 1.0 else coeffs * alpha
    if base is None or beta == 0.0:
        out = rows[:, 0] * scaled[:, :1]
    elif beta == 1.0:
        out = torch.addcmul(base, rows[:, 0], scaled[:, :1])
    else:
        out = torch.addcmul(base * beta, rows[:, 0], scaled[:, :1])
    for i in range(1, k):
        out.addcmul_(rows[:, i], scaled[:, i:i + 1])
    return out


def combine_rows(coeffs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[b, :] = sum_i coeffs[b, i] * rows[b, i, :]`` for coeffs ``(B, k)``, rows ``(B, k, N)``."""
    return axpy_rows(None, coeffs, rows)


class LineSearchResult(NamedTuple):
    """What :func:`backtracking_line_search` decided, per batch element.

    ``z`` and ``gz``: the new iterate and its image (the current ones where the
    search was rejected). ``rejected``: ``(B,)`` bool, no acceptable trial was
    found, so the element did not move. ``z_trial`` and ``gz_trial``: for the
    rejected elements, their trial of smallest residual (a secant point a
    quasi-Newton method can learn from); ``trial_finite``: whether that trial
    and its image are finite. ``nfe``: evaluations of ``fn``.
    """

    z: torch.Tensor
    gz: torch.Tensor
    nfe: int
    rejected: torch.Tensor
    z_trial: torch.Tensor
    gz_trial: torch.Tensor
    trial_finite: torch.Tensor


#: A line search never keeps a trial whose residual exceeds the current one by more than this factor.
MAX_INCREASE = 10.0


def backtracking_line_search(fn: FlatMap, z: torch.Tensor, gz: torch.Tensor, direction: torch.Tensor,
                             residual_norm: torch.Tensor, active: torch.Tensor | None,
                             max_backtracks: int, armijo: float = 1e-4,
                             max_increase: float = MAX_INCREASE) -> LineSearchResult:
    """Per-sample backtracking on the merit ``||F(z)|| = ||g(z) - z||``.

    Tries the step lengths ``alpha = 1, 1/2, 1/4, ...`` (each batch element its
    own) and accepts the first with the sufficient decrease
    ``||F(z + alpha d)|| <= (1 - armijo * alpha) ||F(z)||`` (Dennis & Schnabel
    1996, Alg. A6.3.1 with halving). An element that accepts no trial within
    ``max_backtracks`` halvings takes its trial of smallest residual if that
    residual is at most ``max_increase * ||F(z)||`` (a bounded non-monotone
    step, in the spirit of the derivative-free search of Li & Fukushima 2000,
    "A derivative-free line search and global convergence of Broyden-like
    method for nonlinear equations", Optim. Methods Softw. 13); otherwise the
    search is *rejected* for that element and it stays at ``z``. A trial whose
    residual is NaN or infinite counts as infinitely large. Inactive elements
    (``active`` False) count as accepted and are never moved here.

    Returns a :class:`LineSearchResult`. One host synchronisation per halving.
    """
    alpha = torch.ones_like(residual_norm)
    z_best = z + direction
    gz_best = fn(z_best)
    nfe = 1
    res_best = _merit(gz_best, z_best)
    accepted = res_best <= (1.0 - armijo) * residual_norm
    if active is not None:
        accepted = accepted | ~active
    for _ in range(max_backtracks):
        if bool(accepted.all()):
            break
        alpha = torch.where(accepted, alpha, 0.5 * alpha)
        z_try = torch.addcmul(z, alpha.unsqueeze(1), direction)
        gz_try = fn(z_try)
        nfe += 1
        res_try = _merit(gz_try, z_try)
        ok_try = res_try <= (1.0 - armijo * alpha) * residual_norm
        take = ~accepted & (ok_try | (res_try < res_best))
        z_best = torch.where(take.unsqueeze(1), z_try, z_best)
        gz_best = torch.where(take.unsqueeze(1), gz_try, gz_best)
        res_best = torch.where(take, res_try, res_best)
        accepted = accepted | ok_try
    rejected = ~accepted & ~(res_best <= max_increase * residual_norm)
    keep = rejected.unsqueeze(1)
    return LineSearchResult(torch.where(keep, z, z_best), torch.where(keep, gz, gz_best), nfe, rejected,
                            z_best, gz_best, torch.isfinite(res_best))


def _merit(gz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``||g(z) - z||`` per row, with NaN read as +inf (so that any finite trial beats it)."""
    res = torch.linalg.vector_norm(gz - z, dim=1)
    return torch.nan_to_num(res, nan=float("inf"))
