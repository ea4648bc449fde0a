"""The entry point: ``nlsolve(g, z0, solver)`` finds ``z = g(z)`` for every batch element."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

from ..core.failures import failure_policy
from ..core.keywords import check_keywords
from ..core.validation import check_bool, check_choice, check_float, check_int

from ._base import AbstractNonlinearSolver
from ._errors import ConvergenceWarning, NonlinearReturnCode, NonlinearSolveError, maxiters_advice

__all__ = ["nlsolve", "NonlinearSolution"]

DEFAULT_ABSTOL = 1e-6
DEFAULT_RELTOL = 1e-6
DEFAULT_MAXITERS = 100
_LISTED = 10
# Whether a check every iteration uses the fused test of ``_Iteration._fused_check``; the general
# test gives the same results bitwise (tests compare them).
_FUSED_CHECK = True
_KEYWORDS = ("abstol", "reltol", "maxiters", "on_failure", "throw", "check_every", "record_history")


@dataclass(frozen=True)
class NonlinearSolution:
    """Result of :func:`nlsolve`.

    Attributes:
        z: the solution, shape of ``z0``. For a converged batch element, the first
            iterate that met the tolerance (it is frozen from then on); for the
            others, the iterate of lowest residual seen (not necessarily the last),
            which is finite for an element whose iterates became NaN/Inf.
        retcode: :class:`NonlinearReturnCode`: ``Success`` when every element
            converged, ``Unstable`` when some element's iterates became NaN/Inf
            (the others were still solved), ``MaxIters`` otherwise.
        iterations: solver iterations taken (the same for the whole batch).
        nf: evaluations of ``g`` (Jacobian-vector products and line-search
            trials included; one per batched call). ``nfe`` is the same number
            under its older name.
        residual: ``(B,)`` absolute residuals ``||g(z) - z||`` of the returned ``z``.
        relative_residual: ``(B,)`` ``residual / ||z||`` (``inf`` where ``z = 0`` and the residual is not),
            computed on first access (a property: most callers never read it).
        converged: ``(B,)`` bool, whether each element met ``abstol + reltol ||z||``.
        sample_iterations: ``(B,)`` iterations each element took to converge;
            for an unstable element, the iteration at which its residual was
            found non-finite; ``iterations`` for the others.
        residual_history: ``(iterations + 1, B)`` residual norms of the current
            iterates, starting with ``z0``; ``None`` unless ``record_history``.
        solver: the solver used. abstol, reltol, maxiters: the settings used.
        unstable: ``(B,)`` bool, whether each element's residual became NaN or
            infinite (such an element is frozen at its best finite iterate and
            does not take part in the rest of the solve).
    """

    z: torch.Tensor
    retcode: NonlinearReturnCode
    iterations: int
    nf: int
    residual: torch.Tensor
    converged: torch.Tensor
    sample_iterations: torch.Tensor
    residual_history: torch.Tensor | None
    solver: AbstractNonlinearSolver
    abstol: float
    reltol: float
    maxiters: int
    unstable: torch.Tensor

    @functools.cached_property
    def relative_residual(self) -> torch.Tensor:
        """``(B,)`` ``residual / ||z||`` per batch element (see the class docstring)."""
        batch = self.residual.shape[0]
        if self.z.numel() == 0:
            return self.residual.clone()  # zeros: nothing was evaluated
        return _relative(self.residual, self.z.reshape(batch, -1))

    @property
    def success(self) -> bool:
        return self.retcode is NonlinearReturnCode.Success

    @property
    def nfe(self) -> int:
        """Evaluations of ``g`` under their older name: the same as :attr:`nf`, the ODE solves' name."""
        return self.nf


def nlsolve(g: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, solver: AbstractNonlinearSolver,
            *, abstol: float | None = None, reltol: float | None = None, maxiters: int | None = None,
            on_failure: str | None = None, throw: bool | None = None, check_every: int = 1,
            record_history: bool = True, **unknown) -> NonlinearSolution:
    """Solve the fixed-point problem ``z = g(z)`` (the root of ``F(z) = g(z) - z``), batched.

    ``z0`` has shape ``(B, ...)``: each of the ``B`` batch elements is its own
    problem, and ``g`` must act on each element independently (as a DEQ cell
    with per-sample input injection does; batch statistics would couple them).
    Each element is flattened to a vector of ``N`` entries and

        residual_b = ||g(z)_b - z_b||_2,
        converged_b  iff  residual_b <= abstol + reltol * ||z_b||_2.

    A converged element is frozen at that iterate (later steps do not move
    it), so its result does not depend on the rest of the batch. The solve
    stops when every element has converged (``Success``) or after
    ``maxiters`` iterations (``MaxIters``); elements that did not converge
    return their lowest-residual iterate.

    Failures are per sample: an element whose residual becomes NaN or
    infinite is marked ``unstable`` at the next convergence check, frozen at
    its best finite iterate and left out of the remaining iterations, while
    the other elements go on to convergence (a diverging element never aborts
    or spoils the batch). The retcode is then ``Unstable`` and the message
    names how many elements converged and which ones failed.

    The iteration runs under ``torch.no_grad()`` and the returned ``z`` does
    not require grad: differentiate the solution with the implicit function
    theorem (a steady-state adjoint, e.g. with :func:`gmres` on
    vector-Jacobian products), not through the iterations.

    Host synchronisation: one per ``check_every`` iterations (the convergence
    and NaN test), plus those a solver documents (GMRES inside
    :class:`NewtonKrylov`, line searches). With ``check_every > 1`` the solve
    may run up to ``check_every - 1`` iterations past convergence (converged
    elements stay frozen meanwhile), and an element's NaN/Inf is found at the
    next check (without ``record_history`` the message then names the window
    of iterations it appeared in).

    Args:
        g: the map, ``(B, ...) -> (B, ...)``, same shape, dtype and device as ``z0``.
        z0: initial guess, a real floating tensor with a leading batch dimension.
        solver: :class:`FixedPointIteration`, :class:`Broyden`,
            :class:`LimitedMemoryBroyden`, :class:`Anderson` or :class:`NewtonKrylov`.
        abstol, reltol: tolerances above (``>= 0``, not both zero); default
            ``1e-6`` each, or the solver's own ``abstol``/``reltol`` if it has them.
            In float32, ``reltol`` much below ``1e-6`` is usually unreachable.
        maxiters: iteration limit (default 100, or the solver's ``maxiters``).
        on_failure: what ``MaxIters`` does: ``"warn"`` (the default; a
            :class:`ConvergenceWarning` naming the solver, the iterations and
            the residual reached), ``"raise"`` (:class:`NonlinearSolveError`)
            or ``"ignore"``. NaN/Inf raises :class:`NonlinearSolveError`
            naming the iteration once the rest of the batch is solved (the
            solution reached is its ``.solution``), except with ``"ignore"``,
            which returns retcode ``Unstable`` and the best finite iterates.
        throw: the same choice in the ODE solves' spelling
            (:func:`pylux.core.failures.failure_policy`): ``True`` is
            ``on_failure="raise"``, ``False`` is ``on_failure="ignore"``.
        check_every: iterations between convergence checks (>= 1).
        record_history: keep the per-iteration residual norms.

    Returns:
        :class:`NonlinearSolution`.

    Raises:
        TypeError: unknown or misspelt keyword (named), a non-tensor or
            non-floating ``z0``, ``g`` returning another dtype/device.
        ValueError: a 0-d or non-finite ``z0``, ``g`` returning another shape,
            bad tolerances, a setting given both here and in the solver, or
            ``throw`` contradicting ``on_failure``.
        NonlinearSolveError: NaN/Inf in the iterates of some element (raised
            once the others are solved; ``.solution`` holds the result and
            ``.iteration`` the first non-finite iteration), or ``MaxIters``
            with ``on_failure="raise"``.
    """
    return _nlsolve(g, z0, solver, abstol, reltol, maxiters, on_failure, throw, check_every, record_history,
                    unknown, start_is_finite=False)


def _nlsolve(g, z0, solver, abstol, reltol, maxiters, on_failure, throw, check_every, record_history, unknown,
             start_is_finite):
    """:func:`nlsolve`; ``start_is_finite=True`` skips the finiteness test of ``z0`` (a read-back), for a
    caller that has established it or handles a non-finite start itself (such a start is then found
    unstable at iteration 0, the element frozen at ``z0``; the steady-state adjoint names its cause)."""
    where = "nlsolve"
    check_keywords(unknown, where, _KEYWORDS)
    if not isinstance(solver, AbstractNonlinearSolver):
        raise TypeError(f"{where}: solver must be a pylux nonlinear solver (e.g. Broyden(), Anderson()), "
                        f"got {type(solver).__name__}.")
    if not callable(g):
        raise TypeError(f"{where}: g must be callable, got {type(g).__name__}.")
    abstol = _resolve(where, solver, "abstol", abstol, DEFAULT_ABSTOL)
    reltol = _resolve(where, solver, "reltol", reltol, DEFAULT_RELTOL)
    maxiters = _resolve(where, solver, "maxiters", maxiters, DEFAULT_MAXITERS)
    abstol = check_float(where, "abstol", abstol, low=0.0, high=float("inf"), high_open=True)
    reltol = check_float(where, "reltol", reltol, low=0.0, high=float("inf"), high_open=True)
    if abstol == 0.0 and reltol == 0.0:
        raise ValueError(f"{where}: abstol and reltol are both zero, so no iterate can be accepted; "
                         "give a positive abstol (e.g. 1e-6).")
    maxiters = check_int(where, "maxiters", maxiters, 0)
    if on_failure is not None:
        check_choice(where, "on_failure", on_failure, ("warn", "raise", "ignore"))
    on_failure = failure_policy(where, on_failure, throw, default="warn")
    check_every = check_int(where, "check_every", check_every, 1)
    check_bool(where, "record_history", record_history)
    _check_z0(where, z0, start_is_finite)
    with torch.no_grad():
        return _iterate(g, z0.detach(), solver, abstol, reltol, maxiters, on_failure, check_every,
                        record_history)


def _resolve(where, solver, name, given, default):
    own = getattr(solver, name)
    if given is None:
        return default if own is None else own
    if own is not None and own != given:
        raise ValueError(f"{where}: {name} is given twice, {solver.name}({name}={own!r}) and "
                         f"nlsolve({name}={given!r}); give it in one place.")
    return given


def _check_z0(where, z0, known_finite=False):
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"{where}: z0 must be a torch.Tensor, got {type(z0).__name__}.")
    if not z0.is_floating_point():
        raise TypeError(f"{where}: z0 must have a real floating dtype, got {z0.dtype}; convert it with "
                        "z0.to(torch.float32) (complex states are not supported).")
    if z0.dim() == 0:
        raise ValueError(f"{where}: z0 must have a leading batch dimension, got a 0-d tensor; "
                         "use z0.reshape(1, 1) for a single scalar problem.")
    if z0.numel() == 0 or known_finite:
        return
    # A finite sum proves every entry finite in one pass (NaN and Inf propagate through it); only a
    # non-finite sum (which a large finite z0 may also overflow to) needs the per-element test.
    if math.isfinite(z0.detach().sum().item()):
        return
    bad = ~torch.isfinite(z0.detach().reshape(z0.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"{where}: z0 contains NaN or Inf in batch elements "
                         f"{_list(bad.nonzero().flatten().tolist())}; start from a finite guess.")


def _list(indices: list) -> str:
    shown = ", ".join(str(i) for i in indices[:_LISTED])
    return f"[{shown}{', ...' if len(indices) > _LISTED else ''}]"


def _flat_map(g, shape, batch, n, z0, where):
    checked = [False]
    flat = len(shape) == 2  # then the flattened state is the state: no views on the way in and out

    def fn(z_flat):
        out = g(z_flat if flat else z_flat.view(shape))
        if not checked[0]:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"{where}: g must return a torch.Tensor, got {type(out).__name__}.")
            if out.shape != z0.shape:
                raise ValueError(f"{where}: g returned shape {tuple(out.shape)} for a state of shape "
                                 f"{tuple(z0.shape)}; g must return the shape of its input.")
            if out.dtype != z0.dtype or out.device != z0.device:
                raise TypeError(f"{where}: g returned {out.dtype} on {out.device} for a state that is "
                                f"{z0.dtype} on {z0.device}; g must keep dtype and device.")
            checked[0] = True
        return out if flat else out.reshape(batch, n)
    return fn


def _iterate(g, z0, solver, abstol, reltol, maxiters, on_failure, check_every, record_history):
    where = f"nlsolve({solver.name})"
    batch = z0.shape[0]
    n = int(torch.Size(z0.shape[1:]).numel())
    if batch == 0 or n == 0:
        return _empty_solution(z0, solver, abstol, reltol, maxiters, record_history)
    fn = _flat_map(g, z0.shape, batch, n, z0, where)
    run = _Iteration(fn, z0.reshape(batch, n), solver, abstol, reltol, maxiters, check_every, record_history)
    run.run()
    solution = run.finish(z0.shape)
    if solution.retcode is NonlinearReturnCode.Success or on_failure == "ignore":
        return solution
    note = solver.diagnosis(run.state, ~solution.converged)
    if solution.retcode is NonlinearReturnCode.Unstable:
        window = run.first_window
        raise NonlinearSolveError(_unstable_message(where, solution, window, record_history, note),
                                  solution.retcode, _first_unstable(solution, window, record_history), solution)
    message = _maxiters_message(where, solution, abstol, reltol, maxiters, note)
    if on_failure == "raise":
        raise NonlinearSolveError(message, solution.retcode, solution.iterations, solution)
    warnings.warn(message, ConvergenceWarning, stacklevel=3)
    return solution


def _empty_solution(z0, solver, abstol, reltol, maxiters, record_history):
    """The solution of a problem with no batch element or elements of size 0: converged, nothing evaluated."""
    batch = z0.shape[0]
    no = torch.zeros(batch, dtype=torch.bool, device=z0.device)
    zeros = z0.new_zeros(batch)
    history = zeros.unsqueeze(0) if record_history else None
    return NonlinearSolution(z0.clone(), NonlinearReturnCode.Success, 0, 0, zeros, ~no,
                             torch.zeros(batch, dtype=torch.long, device=z0.device), history,
                             solver, abstol, reltol, maxiters, no)


class _Iteration:
    """The state of one batched iteration of :func:`nlsolve` on the flattened ``(B, N)`` problem.

    :meth:`run` alternates :meth:`check` (every ``check_every`` iterations and
    at ``maxiters``: one host transfer) or :meth:`track_best` (no transfer)
    with :meth:`step`; :meth:`finish` assembles the :class:`NonlinearSolution`.

    Per element it keeps the current iterate ``z``, ``gz = g(z)``, ``F = gz - z``
    and its norm ``res``, the lowest-residual iterate seen (``best_z``,
    ``best_res``), whether it has converged or become unstable (NaN/Inf) and
    the iteration at which it did. Converged and unstable elements are frozen:
    once some element is (or whenever ``check_every > 1``, since the solve may
    pass convergence between checks), a step only moves the ``active`` ones.
    """

    def __init__(self, fn, z, solver, abstol, reltol, maxiters, check_every, record_history):
        self.fn, self.solver = fn, solver
        self.abstol, self.reltol, self.maxiters, self.check_every = abstol, reltol, maxiters, check_every
        self.batch = batch = z.shape[0]
        device = z.device
        self.z = z
        self.gz = fn(z)
        self.nf = 1
        # With a check every iteration, ``converged`` is ``res <= tol`` at each check (a frozen element
        # keeps its residual, an unstable one keeps a non-finite one), so the check derives it, and the
        # iteration of convergence, itself; the steps do not track them.
        self.fused = check_every == 1 and _FUSED_CHECK
        # Each residual and its norm go into one buffer when nothing outlives an iteration's copy: the
        # solver reads F only during its step, and the fused check copies res into best_res (a history
        # keeps every res). A fresh (B, N) tensor per iteration costs about as much as the subtraction
        # itself on a CPU (its memory is not in cache).
        self.F_buffer = torch.empty_like(z) if self.fused and solver.holds_no_iterates else None
        self.res_buffer = z.new_empty(batch) if self.fused and not record_history else None
        self._residual()
        self.tol = _tolerance(z, abstol, reltol)
        # Rows of one allocation each (the flags and counters start at zero; each row is replaced or
        # updated in place on its own).
        no, self.unstable = torch.zeros(2, batch, dtype=torch.bool, device=device).unbind(0)
        self.converged = no if self.fused else self.res <= self.tol
        self.n_converged = self.n_unstable = 0
        if self.fused:
            # The check is one comparison of res against the rows (tol, best_res, largest finite value):
            # converged, improved, finite (res >= 0, so only NaN and +inf exceed the largest float).
            self.checks = torch.empty(3, batch, dtype=torch.bool, device=device)
            self.check_rows = self.checks.unbind(0)
            self.bounds = self.res.new_full((3, batch), torch.finfo(self.res.dtype).max)
            tol_row, self.best_res, _ = self.bounds.unbind(0)
            if not reltol:
                tol_row.fill_(abstol)
            self.best_res.copy_(self.res)
        else:
            self.best_res = self.res
        self.host_views = _HostViews.of(self) if self.fused else None
        self.active = self.frozen_rows = None
        self.copy_frozen = True
        self.converged_at, self.unstable_at = torch.zeros(2, batch, dtype=torch.long, device=device).unbind(0)
        self.first_window = None  # (last check before, check that found) the first non-finite residual
        self.best_z = z
        self.history = [self.res] if record_history else None
        self.state = solver.init(z, self.gz, maxiters)
        self.iterations = 0
        self.z_owned = False
        self.last_check = 0
        self.some_frozen = check_every > 1

    def run(self) -> None:
        """Iterate until every element has converged or is unstable (found at a check), or ``maxiters``."""
        while True:
            if self.iterations % self.check_every == 0 or self.iterations == self.maxiters:
                if self.check():
                    return
            else:
                self.track_best()
            if self.iterations == self.maxiters:
                return
            self.step()

    def check(self) -> bool:
        """The convergence and NaN test; ``True`` when every element has converged or is unstable.

        One transfer answers: how many converged? newly non-finite? did every
        element improve on its best (so the best is the current iterate)? how
        many unstable? A newly non-finite element is frozen at its best finite
        iterate; the rest of the batch goes on.
        """
        if self.fused:
            return self._fused_check()
        bad = ~torch.isfinite(self.res) & ~self.unstable
        improved = self.res <= self.best_res
        n_converged, n_bad, n_improved, n_unstable = (
            torch.stack([self.converged, bad, improved, self.unstable]).sum(dim=1).tolist())
        if n_improved == self.batch:
            self.best_z, self.best_res = self.z, self.res
        else:
            self._keep_best(improved)
        if n_bad:
            self.unstable = self.unstable | bad
            self.unstable_at.masked_fill_(bad, self.iterations)
            n_unstable += n_bad
            if self.first_window is None:
                self.first_window = (self.last_check, self.iterations)
        if n_converged + n_unstable == self.batch:
            return True
        self.some_frozen = n_converged + n_unstable > 0 or self.check_every > 1
        self.last_check = self.iterations
        return False

    def _fused_check(self) -> bool:
        """:meth:`check` for ``check_every == 1``, in three small kernels and one transfer.

        Rows of ``self.checks``: ``res <= tol`` (converged), ``res <= best_res``
        (improved) and ``res <= finfo.max`` (finite; ``res >= 0``, so only NaN
        and ``+inf`` fail it). Converged and unstable elements only ever join their
        sets (they are frozen), so an unchanged count is an unchanged set, and
        the masks and row indices of the frozen elements are rebuilt only when
        a count changes.
        """
        res = self.res
        converged, improved, finite = self.check_rows
        if self.reltol:
            self.bounds[0].copy_(self.tol)
        host = self.host_views
        if host is None:
            torch.le(res, self.bounds, out=self.checks)
            n_converged, n_improved, n_finite = self.checks.sum(dim=1).tolist()
        else:
            np.less_equal(host.res, host.bounds, out=host.checks)
            n_converged, n_improved, n_finite = (int(np.count_nonzero(row)) for row in host.rows)
        # best_res is the row bounds[1], updated in place.
        if n_improved == self.batch:
            self.best_z = self.z
            if host is None:
                self.best_res.copy_(res)
            else:
                np.copyto(host.best_res, host.res)
        else:
            self.best_z = torch.where(improved.unsqueeze(1), self.z, self.best_z)
            torch.where(improved, res, self.best_res, out=self.best_res)
        changed = n_converged != self.n_converged
        if changed:
            # The converged set only grows (see above), so the newly converged are the exclusive or.
            self.converged_at.masked_fill_(converged ^ self.converged, self.iterations)
            self.converged = converged.clone()
            self.n_converged = n_converged
        n_bad = self.batch - n_finite - self.n_unstable
        if n_bad:
            bad = ~finite & ~self.unstable
            self.unstable = self.unstable | bad
            self.unstable_at.masked_fill_(bad, self.iterations)
            self.n_unstable += n_bad
            changed = True
            if self.first_window is None:
                self.first_window = (self.last_check, self.iterations)
        n_frozen = n_converged + self.n_unstable
        if n_frozen == self.batch:
            return True
        if changed:
            frozen = self.converged | self.unstable if self.n_unstable else self.converged
            self.active = ~frozen
            # Freezing copies the smaller set of rows (an index copy is several times cheaper than a
            # where over the whole batch when few rows are copied).
            self.copy_frozen = 2 * n_frozen <= self.batch
            self.frozen_rows = (frozen if self.copy_frozen else self.active).nonzero().flatten()
        self.some_frozen = n_frozen > 0
        self.last_check = self.iterations
        return False

    def _freeze(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """``torch.where(active, new, old)`` row-wise, by copying the rows in ``frozen_rows``."""
        rows = self.frozen_rows
        if self.copy_frozen:
            return new.index_copy(0, rows, old.index_select(0, rows))
        return old.index_copy(0, rows, new.index_select(0, rows))

    def track_best(self) -> None:
        """Between checks: keep each element's lowest-residual iterate, without a transfer."""
        self._keep_best(self.res <= self.best_res)

    def _keep_best(self, improved: torch.Tensor) -> None:
        self.best_z = torch.where(improved.unsqueeze(1), self.z, self.best_z)
        self.best_res = torch.where(improved, self.res, self.best_res)

    def step(self) -> None:
        """One solver step; frozen elements keep their iterate; newly converged ones are recorded."""
        if not self.some_frozen:
            active = None
        elif self.fused:
            active = self.active
        else:
            active = ~(self.converged | self.unstable)
        z_new, gz_new, self.state, used = self.solver.step(self.fn, self.z, self.gz, self.F, self.state, active)
        self.nf += used
        self.iterations += 1
        # z_owned: z is a tensor the freezing made, which nothing outside the solve can hold
        self.z_owned = active is not None
        if active is None:
            self.z, self.gz = z_new, gz_new
        elif self.fused:
            # New tensors, never an update in place: the step may have passed the current gz to g as its
            # proposal (the fixed-point iteration does), and g may keep what it was given.
            self.z, self.gz = self._freeze(z_new, self.z), self._freeze(gz_new, self.gz)
        else:
            keep = active.unsqueeze(1)
            self.z = torch.where(keep, z_new, self.z)
            self.gz = torch.where(keep, gz_new, self.gz)
        self._residual()
        if self.reltol:
            self.tol = _tolerance(self.z, self.abstol, self.reltol)
        if self.history is not None:
            self.history.append(self.res)
        if self.fused:
            return
        newly = ~self.converged & ~self.unstable & (self.res <= self.tol)
        self.converged_at.masked_fill_(newly, self.iterations)
        self.converged = self.converged | newly

    def _residual(self) -> None:
        """``F = gz - z`` and its row norms ``res``, into their buffers where there are buffers."""
        if self.F_buffer is None:
            self.F = self.gz - self.z
        else:
            self.F = torch.sub(self.gz, self.z, out=self.F_buffer)
        if self.res_buffer is None:
            self.res = torch.linalg.vector_norm(self.F, dim=1)
        else:
            self.res = torch.linalg.vector_norm(self.F, dim=1, out=self.res_buffer)

    def finish(self, shape: torch.Size) -> NonlinearSolution:
        """The result: converged elements at their converging iterate, the others at their best."""
        history = torch.stack(self.history) if self.history is not None else None
        converged, unstable, unstable_at = self.converged, self.unstable, self.unstable_at
        if self.first_window is not None:
            retcode = NonlinearReturnCode.Unstable
            if history is not None:
                # The exact iteration of each element's first non-finite residual.
                first_bad = torch.argmin(torch.isfinite(history).to(history.dtype), dim=0)
                unstable_at = torch.where(unstable, first_bad, unstable_at)
        elif (self.n_converged == self.batch) if self.fused else bool(converged.all()):
            retcode = NonlinearReturnCode.Success
        else:
            retcode = NonlinearReturnCode.MaxIters
        if retcode is NonlinearReturnCode.Success:
            # What the selections below give when every element converged (z copied unless the freezing
            # made it: it may be a view of z0 or a tensor g returned).
            z_out = self.z if self.z_owned else self.z.clone()
            res_out, sample_iterations = self.res, self.converged_at
        else:
            z_out = torch.where(converged.unsqueeze(1), self.z, self.best_z)
            res_out = torch.where(converged, self.res, self.best_res)
            sample_iterations = torch.where(
                converged, self.converged_at,
                torch.where(unstable, unstable_at, torch.full_like(self.converged_at, self.iterations)))
        return NonlinearSolution(
            z_out.reshape(shape), retcode, self.iterations, self.nf, res_out, converged,
            sample_iterations, history, self.solver, self.abstol, self.reltol, self.maxiters, unstable)


class _HostViews(NamedTuple):
    """NumPy views of the fused check's memory on a CPU: ``res``'s buffer, the bounds, the flags, their rows.

    As torch operations, the check's comparison, counts and copy cost mostly their fixed overhead on
    a CPU (~11 us together on a 512-element batch with warm caches, ~35 us inside a DEQ's forward and
    backward passes); the same IEEE comparisons (NaN compares False), counts and copy on NumPy views
    of the same memory take a few microseconds. Only where ``res`` has its buffer (no history) on a
    CPU, in a dtype NumPy has.
    """

    res: np.ndarray
    bounds: np.ndarray
    checks: np.ndarray
    best_res: np.ndarray
    rows: tuple

    @classmethod
    def of(cls, run: "_Iteration") -> "_HostViews | None":
        res = run.res_buffer
        if res is None or res.device.type != "cpu" or res.dtype not in _HOST_DTYPES:
            return None
        checks = run.checks.numpy()
        # the rows counted one by one: count_nonzero(axis=1) costs more than three whole-row counts
        return cls(res.numpy(), run.bounds.numpy(), checks, run.best_res.numpy(), tuple(checks))


_HOST_DTYPES = (torch.float16, torch.float32, torch.float64)


def _relative(res, z):
    """``res / ||z||`` per row; ``inf`` where ``z = 0`` and the residual is not, ``0`` where both are."""
    znorm = torch.linalg.vector_norm(z, dim=1)
    # Where znorm = 0 the quotient (inf or NaN) is replaced, so it may divide by zero.
    return torch.where(znorm > 0, res / znorm, torch.where(res > 0, float("inf"), 0.0))


def _tolerance(z, abstol, reltol):
    if not reltol:
        return abstol
    return abstol + reltol * torch.linalg.vector_norm(z, dim=1)


def _first_unstable(solution, window, record_history):
    """The iteration of the first non-finite residual (exact with a history, else the check that found it)."""
    if record_history:
        return int(solution.sample_iterations[solution.unstable].min())
    return window[1]


def _unstable_message(where, solution, window, record_history, note):
    samples = solution.unstable.nonzero().flatten().tolist()
    first = _first_unstable(solution, window, record_history)
    last_check, found = window
    if record_history or last_check + 1 >= found:
        when = f"at iteration {first}"
    else:
        when = f"between iterations {last_check + 1} and {found}"
    origin = "g(z0)" if first == 0 else "the iterate or its image under g"
    batch = solution.converged.shape[0]
    n_converged = int(solution.converged.sum())
    rest = batch - n_converged - len(samples)
    outcome = f"{n_converged} of {batch} batch elements converged"
    if rest:
        others = (~solution.converged & ~solution.unstable).nonzero().flatten().tolist()
        outcome += (f", {rest} ({_list(others)}) did not within maxiters={solution.maxiters} "
                    f"(iterations={solution.iterations})")
    return (f"{where}: non-finite residual (NaN/Inf in {origin}) {when}, in batch elements {_list(samples)} "
            f"({len(samples)} of {batch}; each is returned at its best finite iterate); {outcome}. "
            + (note + " " if note else "") + NonlinearReturnCode.Unstable.message)


def _maxiters_message(where, solution, abstol, reltol, maxiters, note):
    failed = (~solution.converged).nonzero().flatten().tolist()
    res = solution.residual
    worst_value, worst = torch.where(solution.converged, torch.zeros_like(res), res).max(dim=0)
    worst = int(worst)
    tol_worst = abstol + reltol * float(torch.linalg.vector_norm(solution.z.reshape(res.shape[0], -1)[worst]))
    return (f"{where}: no convergence within maxiters={maxiters} iterations (nfe={solution.nf}); "
            f"{len(failed)} of {res.shape[0]} batch elements above tolerance ({_list(failed)}); "
            f"largest residual ||g(z) - z|| = {float(worst_value):.3e} in element {worst}, tolerance "
            f"{tol_worst:.3e} (abstol={abstol:g}, reltol={reltol:g}). "
            + (note + " " if note else "") + "Try: " + maxiters_advice(solution.solver.name))
