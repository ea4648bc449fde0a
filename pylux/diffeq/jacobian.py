r"""Jacobians of the vector field and the linear systems of implicit and Rosenbrock steps.

A stiff step linearises the field at ``(u, t)``,

.. math::
    J = \partial f / \partial u (u, t), \qquad f_t = \partial f / \partial t (u, t),

and solves systems with the *Newton matrix* (Hairer & Wanner, *Solving ODEs II*, IV.7–IV.8)

.. math::
    M = I - h\gamma J,

where ``h`` is the step and ``gamma`` the method's diagonal coefficient. How
``J`` is held is the *structure*:

* ``"dense"`` — ``J`` as an ``n x n`` matrix (``n = u.numel()``) by reverse
  mode, all ``n`` rows in one batched backward pass (``is_grads_batched``), with ``f_t``
  from the same graph; ``M`` is factorised once
  per ``h gamma`` with ``torch.linalg.lu_factor_ex`` and every stage solve is a
  triangular solve.
* ``"batched"`` — a state ``(B, d)`` of ``B`` independent samples: the ``B``
  blocks ``d x d`` of the block-diagonal ``J``, from ``d`` vector–Jacobian
  products of ``sum_b f(u)_b`` (independence makes ``d/du_b sum_b' f_b' =
  d f_b / d u_b``), factorised as a batch of small LUs. Cost ``O(B d^3)``, not
  ``O((B d)^3)``; the user asserts the independence (a field that mixes samples,
  such as batch norm, gets a wrong Jacobian, which slows Newton and lowers a
  Rosenbrock method's accuracy).
* ``"matrix_free"`` — no matrix: products ``J v`` by forward-mode
  ``torch.func.jvp`` (or a finite difference) and ``M x = b`` by GMRES
  (:func:`pylux.nonlinear.gmres`): Newton–Krylov for large states.
* ``"auto"`` (default) — ``"dense"`` up to :data:`DENSE_LIMIT` state entries, ``"matrix_free"`` above.

Where ``J`` comes from is the *source* (``jac=``): ``"auto"`` (automatic
differentiation; a field whose output carries no autograd graph to ``u`` —
one that detaches and differentiates internally, as the adjoints' augmented
fields do — falls back to finite differences for the rest of the solve),
``"autodiff"`` (no fallback), ``"finite_difference"`` (forward
differences with steps ``sqrt(eps) (1 + |u_j|)``: ``n`` evaluations of ``f``
for a dense ``J``, ``d`` for a batched one), or a callable ``jac(u, p, t)``
returning ``J`` — shape ``(n, n)`` (or ``(*u.shape, *u.shape)``) for
``"dense"``, ``(B, d, d)`` for ``"batched"`` — checked on its first call.

``f_t`` (the Rosenbrock methods' time derivative) comes from a user
``tgrad(u, p, t)`` when given (DifferentialEquations.jl's ``tgrad``: no
evaluation of ``f``; return zeros for an autonomous field), else from the dense
Jacobian's graph, else from one one-sided difference in ``t`` taken in the
direction of integration (exactly zero for an autonomous field): the field is never evaluated past the end of the span,
where it may not exist (the interpolating adjoints' backward field reads the
forward dense output, which ends there). Under
``torch.no_grad`` the Jacobian is still formed (autograd is enabled locally);
when ``f(u, t)`` carries a graph to parameters, ``J`` keeps it, so
backpropagation through a solve sees ``dJ/dp``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch

from ..core.validation import check_choice, check_float
from ._device import host_time, time_scalar
from .solvers import AbstractAdaptiveSolver

__all__ = ["JacobianConfig", "JacobianEvaluator", "Linearization", "NewtonMatrix", "JacobianShapeError", "StiffCounters",
           "StiffState", "AbstractStiffSolver",
           "DENSE_LIMIT", "STRUCTURES", "SOURCES"]

#: ``jac_structure="auto"`` uses a dense Jacobian up to this many state entries, matrix-free above.
DENSE_LIMIT = 1024

#: in a compiled step, systems of up to this many unknowns (per block) are solved by unrolled substitution
#: on the LU factors, which the compiler fuses into the step's kernels; larger ones call ``lu_solve``
TRACED_SUBSTITUTION_LIMIT = 16
#: blocks up to this size are factorised entry by entry (:func:`_small_lu_by_entries`), larger ones row-block-wise
ENTRYWISE_LU_LIMIT = 8
STRUCTURES = ("auto", "dense", "batched", "matrix_free")
SOURCES = ("auto", "autodiff", "finite_difference")


class JacobianShapeError(ValueError):
    """A user Jacobian ``jac(u, p, t)`` returned a tensor of the wrong shape, dtype or device."""


class JacobianConfig:
    """The Jacobian options of an implicit or Rosenbrock solver (validated at construction).

    Args:
        jac: ``"auto"``, ``"autodiff"``, ``"finite_difference"`` or a callable
            ``jac(u, p, t)`` (see the module docstring).
        jac_structure: ``"auto"``, ``"dense"``, ``"batched"`` or ``"matrix_free"``.
        krylov_rtol: relative residual of the GMRES solves (matrix-free only).
        krylov_restart: GMRES restart length (matrix-free only).
        tgrad: ``None`` (``f_t`` by autodiff or a difference in ``t``) or a callable ``tgrad(u, p, t)``
            returning ``df/dt`` in ``u``'s shape.
    """

    __slots__ = ("jac", "structure", "krylov_rtol", "krylov_restart", "tgrad")

    def __init__(self, owner: str, jac: Any = "auto", jac_structure: str = "auto", krylov_rtol: float = 1e-7,
                 krylov_restart: int = 30, tgrad: Callable | None = None) -> None:
        if tgrad is not None and not callable(tgrad):
            raise TypeError(f"{owner}: tgrad must be None or a callable tgrad(u, p, t) returning df/dt, got "
                            f"{type(tgrad).__name__}")
        self.tgrad = tgrad
        if not callable(jac):
            if not isinstance(jac, str):
                raise TypeError(f"{owner}: jac must be one of {SOURCES} or a callable jac(u, p, t), got "
                                f"{type(jac).__name__}")
            check_choice(owner, "jac", jac, SOURCES)
        check_choice(owner, "jac_structure", jac_structure, STRUCTURES)
        if callable(jac) and jac_structure == "matrix_free":
            raise ValueError(f"{owner}: a user jac(u, p, t) returns a matrix, which jac_structure='matrix_free' "
                             "would not use; pass jac_structure='dense' or 'batched'")
        self.jac = jac
        self.structure = jac_structure
        self.krylov_rtol = check_float(owner, "krylov_rtol", krylov_rtol, low=0.0, high=1.0, low_open=True,
                                       high_open=True)
        self.krylov_restart = int(krylov_restart)

    def key(self) -> tuple:
        return (self.jac, self.structure, self.krylov_rtol, self.krylov_restart, self.tgrad)

    def __repr__(self) -> str:
        jac = self.jac if isinstance(self.jac, str) else getattr(self.jac, "__name__", "callable")
        tgrad = "" if self.tgrad is None else f", tgrad={getattr(self.tgrad, '__name__', 'callable')!r}"
        return f"jac={jac!r}, jac_structure={self.structure!r}{tgrad}"


class NewtonMatrix:
    """``M = I - h gamma J`` ready to solve with: an LU factorisation, or GMRES on products.

    ``ok`` is a 0-d bool tensor (no host synchronisation): the factorisation
    has no zero pivot and is finite. ``solve(rhs)`` returns ``M^{-1} rhs`` in
    ``rhs``'s shape.
    """

    __slots__ = ("lin", "hgamma", "lu", "pivots", "ok", "counters", "row_order")

    def __init__(self, lin: "Linearization", hgamma, counters) -> None:
        self.lin, self.hgamma, self.counters = lin, hgamma, counters
        self.row_order = None
        if counters is not None:
            counters.nw += 1
        if lin.structure == "matrix_free":
            self.lu = self.pivots = None
            self.ok = torch.ones((), dtype=torch.bool, device=lin.u.device)
            return
        J = lin.J
        eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
        M = eye - hgamma * J
        if torch.compiler.is_compiling() and J.shape[-1] <= TRACED_SUBSTITUTION_LIMIT:
            self.lu, self.row_order = _small_lu(M)
            self.pivots = None
            diagonal = self.lu.diagonal(dim1=-2, dim2=-1)
            self.ok = (diagonal != 0).all() & torch.isfinite(self.lu).all()
            return
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(M)
        self.ok = (info == 0).all() & torch.isfinite(self.lu).all()

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        if self.row_order is not None:
            if self.lin.structure == "dense":
                return _substitute(self.lu, self.row_order, rhs.reshape(-1)).reshape(rhs.shape)
            return _substitute(self.lu, self.row_order, rhs)
        return self._solve(rhs, False)

    def solve_transpose(self, rhs: torch.Tensor) -> torch.Tensor:
        """``M^{-T} rhs`` in ``rhs``'s shape (the adjoint of :meth:`solve`): the same LU, or GMRES on
        ``v - h gamma J^T v`` with vector–Jacobian products."""
        return self._solve(rhs, True)

    def _solve(self, rhs: torch.Tensor, adjoint: bool) -> torch.Tensor:
        lin = self.lin
        if self.counters is not None:
            self.counters.nsolve += 1
        if lin.structure == "dense":
            x = torch.linalg.lu_solve(self.lu, self.pivots, rhs.reshape(-1, 1), adjoint=adjoint)
            return x.reshape(rhs.shape)
        if lin.structure == "batched":
            return torch.linalg.lu_solve(self.lu, self.pivots, rhs.unsqueeze(-1), adjoint=adjoint).squeeze(-1)
        from ..nonlinear import gmres
        hgamma = self.hgamma
        product = lin.rmatvec if adjoint else lin.matvec

        def matvec(v):
            return v - hgamma * product(v.reshape(rhs.shape)).reshape(v.shape)
        result = gmres(matvec, rhs.reshape(1, -1), rtol=lin.config.krylov_rtol, restart=lin.config.krylov_restart)
        self.counters.nkrylov += result.matvecs
        return result.x.reshape(rhs.shape)


def _small_lu(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lu, order)`` with ``M[order] = L U`` per block (``lu`` packs the unit lower ``L`` and ``U``):
    Gaussian elimination with partial pivoting (the largest ``|entry|`` of the column below the diagonal,
    as LAPACK's ``getrf``; the first of equals), unrolled over the (small, static) block size for a compiled
    step to fuse; ``lu_factor_ex`` would leave the graph for an external call each step. A zero pivot
    leaves Inf/NaN in ``lu`` (the caller's ``ok`` flag). Blocks up to ``ENTRYWISE_LU_LIMIT`` are eliminated
    entry by entry (:func:`_small_lu_by_entries`), larger ones by gathers and outer-product updates
    (:func:`_small_lu_by_rows`), whose graph grows with ``n`` rather than ``n^3``."""
    if M.shape[-1] <= ENTRYWISE_LU_LIMIT:
        return _small_lu_by_entries(M)
    return _small_lu_by_rows(M)


def _small_lu_by_entries(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_small_lu` with every entry of the block its own ``(*batch)`` tensor and the row swaps as
    selects: the compiler fuses the whole elimination into one loop over the blocks, with the block in
    registers (on 256 blocks of 8 x 8 in the compiled Rodas5P loop, 10-25 % less time per step than
    :func:`_small_lu_by_rows`, whose gathers each re-read the block from memory)."""
    n = M.shape[-1]
    A = [[M[..., i, j] for j in range(n)] for i in range(n)]
    order = [torch.full_like(M[..., 0, 0], i, dtype=torch.int64) for i in range(n)]
    for k in range(n - 1):
        best, p = A[k][k].abs(), torch.full_like(order[0], k)
        for r in range(k + 1, n):
            candidate = A[r][k].abs()
            larger = candidate > best  # strictly: the first of equal entries, as LAPACK's idamax
            best, p = torch.where(larger, candidate, best), torch.where(larger, r, p)
        pivot_row, pivot_order = list(A[k]), order[k]
        for r in range(k + 1, n):
            take = p == r
            pivot_row = [torch.where(take, A[r][j], pivot_row[j]) for j in range(n)]
            pivot_order = torch.where(take, order[r], pivot_order)
            A[r] = [torch.where(take, A[k][j], A[r][j]) for j in range(n)]
            order[r] = torch.where(take, order[k], order[r])
        A[k], order[k] = pivot_row, pivot_order
        for r in range(k + 1, n):
            multiplier = A[r][k] / A[k][k]
            A[r] = A[r][:k] + [multiplier] + [A[r][j] - multiplier * A[k][j] for j in range(k + 1, n)]
    return torch.stack([torch.stack(row, -1) for row in A], -2), torch.stack(order, -1)


def _small_lu_by_rows(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_small_lu` by gathers of whole rows and outer-product updates of the trailing block."""
    n = M.shape[-1]
    A = M
    positions = torch.arange(n, device=M.device)
    order = positions.expand(M.shape[:-1])
    for k in range(n - 1):
        p = A[..., k:, k].abs().argmax(-1, keepdim=True) + k                       # (..., 1)
        swap = torch.where(positions == k, p, torch.where(positions == p, k, positions))  # (..., n)
        A = A.gather(-2, swap.unsqueeze(-1).expand(A.shape))
        order = order.gather(-1, swap)
        multipliers = A[..., k + 1:, k] / A[..., k:k + 1, k]                      # (..., n-k-1)
        below = A[..., k + 1:, k + 1:] - multipliers.unsqueeze(-1) * A[..., k:k + 1, k + 1:]
        lower = torch.cat([multipliers.unsqueeze(-1), below], -1)                 # rows k+1.., columns k..
        A = torch.cat([A[..., :k + 1, :], torch.cat([A[..., k + 1:, :k], lower], -1)], -2)
    return A, order


def _substitute(lu: torch.Tensor, order: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``M^{-1} rhs`` from ``M = P L U`` (``lu`` packed, unit lower ``L``): forward then back substitution,
    unrolled over the (small, static) block size so that a compiled step fuses it into a few loops over the
    blocks instead of one ``lu_solve`` call per stage. ``rhs`` is ``(..., n)`` against ``lu`` ``(..., n, n)``."""
    n = lu.shape[-1]
    b = rhs.gather(-1, order)
    y: list[torch.Tensor] = []
    for i in range(n):
        v = b[..., i]
        for j in range(i):
            v = v - lu[..., i, j] * y[j]
        y.append(v)
    x: list = [None] * n
    for i in reversed(range(n)):
        v = y[i]
        for j in range(i + 1, n):
            v = v - lu[..., i, j] * x[j]
        x[i] = v / lu[..., i, i]
    return torch.stack(x, -1)


class Linearization:
    """``J`` (in its structure) and ``f_t`` at one point ``(u, t)``; ``factor(h gamma)`` gives a :class:`NewtonMatrix`."""

    __slots__ = ("structure", "J", "dfdt", "u", "t", "f_u", "field", "config", "use_autodiff", "vjp_graph")

    def __init__(self, structure, J, dfdt, u, t, f_u, field, config, use_autodiff) -> None:
        self.structure, self.J, self.dfdt = structure, J, dfdt
        self.u, self.t, self.f_u, self.field, self.config = u, t, f_u, field, config
        self.use_autodiff = use_autodiff
        self.vjp_graph = None

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``J v`` for ``v`` of the state's shape."""
        if self.structure == "dense":
            return (self.J @ v.reshape(-1)).reshape(v.shape)
        if self.structure == "batched":
            return (self.J @ v.unsqueeze(-1)).squeeze(-1)
        u, t, field = self.u, self.t, self.field
        if self.use_autodiff:
            try:
                return torch.func.jvp(lambda x: field.vf(x, t), (u,), (v,))[1]
            except RuntimeError:  # a field torch.func cannot transform: finite differences from now on
                self.use_autodiff = False
        vnorm = torch.linalg.vector_norm(v)
        scale = math.sqrt(torch.finfo(u.dtype).eps) * (1.0 + torch.linalg.vector_norm(u))
        eps = scale / vnorm.clamp_min(torch.finfo(u.dtype).tiny)
        return (field.vf(u + eps * v, t) - self.f_u) / eps

    def rmatvec(self, v: torch.Tensor) -> torch.Tensor:
        """``J^T v`` for ``v`` of the state's shape (matrix-free: a vector–Jacobian product by reverse
        mode, which needs ``f``'s autograd graph to ``u``)."""
        if self.structure == "dense":
            return (self.J.T @ v.reshape(-1)).reshape(v.shape)
        if self.structure == "batched":
            return (self.J.transpose(-1, -2) @ v.unsqueeze(-1)).squeeze(-1)
        if self.vjp_graph is None:
            with torch.enable_grad():
                u_ = self.u.detach().requires_grad_(True)
                out = self.field.vf(u_, self.t)
            if not out.requires_grad:
                raise RuntimeError("J^T v needs f's autograd graph to u, but f's output carries none (f detaches "
                                   "or differentiates internally); use jac_structure='dense' or 'batched'")
            self.vjp_graph = (u_, out)  # one evaluation of f for every product
        u_, out = self.vjp_graph
        (g,) = torch.autograd.grad(out, u_, v, retain_graph=True, allow_unused=True)
        return g if g is not None else torch.zeros_like(v)

    def factor(self, hgamma: float, counters) -> NewtonMatrix:
        return NewtonMatrix(self, hgamma, counters)

    def norm_inf(self) -> torch.Tensor | None:
        """``||J||_inf`` (largest absolute row sum; the largest over the blocks), an upper bound of the
        spectral radius; ``None`` without a matrix."""
        if self.structure == "matrix_free":
            return None
        if self.J.numel() == 0:  # a zero-size state
            return self.J.new_zeros(())
        return self.J.abs().sum(-1).amax()


class _JacobianAt(torch.autograd.Function):
    """``value`` (``J`` or ``f_t``, differentiated at the leaf copy ``u_local`` of ``u``) reattached to ``u``.

    The gradient reaching ``value`` flows on through its own graph (to the parameters) and, by the
    chain rule through ``u_local = u``, to ``u``: ``grad_u = (d value / d u_local)^T grad``. Differentiable
    again under ``create_graph=True``.
    """

    @staticmethod
    def forward(ctx, u, value, u_local):
        ctx.value, ctx.u_local = value, u_local
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        (grad_u,) = torch.autograd.grad(ctx.value, ctx.u_local, grad, retain_graph=True,
                                        create_graph=torch.is_grad_enabled(), allow_unused=True)
        return grad_u, grad, None


class JacobianEvaluator:
    """Per-solve evaluator of :class:`Linearization` objects (remembers a fallback to finite differences).

    Args:
        config: the solver's :class:`JacobianConfig`.
        u0: the initial state (fixes the structure for the solve).
        owner: the solver's name for messages.
        direction: the sign of the solve's steps (the side of ``t`` the time difference of ``f_t`` is taken on).
    """

    __slots__ = ("config", "structure", "shape", "use_autodiff", "owner", "checked", "tgrad_checked", "direction")

    def __init__(self, config: JacobianConfig, u0: torch.Tensor, owner: str, direction: float = 1.0) -> None:
        self.config, self.owner, self.shape = config, owner, tuple(u0.shape)
        self.direction = -1.0 if direction < 0 else 1.0
        structure = config.structure
        if structure == "auto":
            structure = "dense" if u0.numel() <= DENSE_LIMIT else "matrix_free"
        if structure == "batched" and u0.dim() != 2:
            raise ValueError(f"{owner}: jac_structure='batched' needs a state of shape (B, d) of independent "
                             f"samples, got shape {tuple(u0.shape)}; use jac_structure='dense' or 'matrix_free'")
        self.structure = structure
        self.use_autodiff = config.jac in ("auto", "autodiff")
        self.checked = self.tgrad_checked = False

    def __call__(self, field, u: torch.Tensor, t: torch.Tensor, f_u: torch.Tensor, counters,
                 need_dfdt: bool) -> Linearization:
        if torch.compiler.is_compiling():
            J, dfdt = self._traced(field, u, t, f_u, need_dfdt)
            return Linearization(self.structure, J, dfdt, u, t, f_u, field, self.config, self.use_autodiff)
        counters.njac += 1
        J = dfdt = None
        jac, tgrad = self.config.jac, self.config.tgrad
        if self.structure != "matrix_free":
            if callable(jac):
                J = self._user(jac, field, u, t)
            elif self.use_autodiff:
                J, dfdt = self._autodiff(field, u, t, f_u, need_dfdt and tgrad is None)
            if J is None:
                J = self._finite_difference(field, u, t, f_u, counters)
        if need_dfdt and tgrad is not None:
            dfdt = self._user_tgrad(tgrad, field, u, t)
        elif need_dfdt and dfdt is None:
            dfdt = self._time_difference(field, u, t, f_u)
        return Linearization(self.structure, J, dfdt, u, t, f_u, field, self.config, self.use_autodiff)

    # --- J in a compiled step -----------------------------------------------------------------
    def _traced(self, field, u, t, f_u, need_dfdt):
        """``(J, f_t)`` as graph operations (:mod:`pylux.diffeq.captured`): the user's ``jac`` (checked by the
        eager linearisation that precedes a compiled solve), else finite differences (``jac="finite_difference"``
        or an earlier fallback), else forward mode (``torch.func.jvp``; a dense ``f_t`` from the same
        transform, a batched one from the time difference of the eager path)."""
        jac, tgrad = self.config.jac, self.config.tgrad
        dfdt = None
        if callable(jac):
            n = u.numel()
            expected = (u.shape[0], u.shape[1], u.shape[1]) if self.structure == "batched" else (n, n)
            J = jac(u, field.p, t).reshape(expected)
        elif not self.use_autodiff:
            J = self._finite_difference(field, u, t, f_u, None)
        elif self.structure == "dense":
            def vf(x, s):
                return field.vf(x, s)
            if tgrad is None:
                J, dfdt = torch.func.jacfwd(vf, argnums=(0, 1))(u, t)
                dfdt = dfdt.reshape(u.shape).to(u.dtype)
            else:
                J = torch.func.jacfwd(vf, argnums=0)(u, t)
            J = J.reshape(u.numel(), u.numel())
        else:
            d = u.shape[-1]
            basis = torch.eye(d, dtype=u.dtype, device=u.device).unsqueeze(1).expand((d,) + tuple(u.shape))

            def column(v):
                return torch.func.jvp(lambda x: field.vf(x, t), (u,), (v,))[1]
            J = torch.func.vmap(column)(basis).permute(1, 2, 0)  # (d_in, B, d_out) -> blocks (B, d_out, d_in)
        if need_dfdt and tgrad is not None:
            dfdt = tgrad(u, field.p, t).reshape(u.shape)
        elif need_dfdt and dfdt is None:
            step = torch.clamp(t.abs(), min=1.0) * (self.direction * math.sqrt(torch.finfo(u.dtype).eps))
            dfdt = (field.vf(u, t + step) - f_u) / step.to(u.dtype)
        return J, dfdt

    def check_traceable(self, field, u: torch.Tensor, t: torch.Tensor) -> None:
        """Before a compiled solve, what the first eager linearisation would find out, at less cost: a user
        ``jac``'s shape, dtype and device (one call), and whether ``f``'s output carries an autograd graph
        to ``u`` (one evaluation; forward mode through a field that detaches would give a zero Jacobian
        silently): if not, finite differences, or the error of ``jac="autodiff"``."""
        if self.config.tgrad is not None:
            self._user_tgrad(self.config.tgrad, field, u, t)
        if callable(self.config.jac):
            self._user(self.config.jac, field, u, t)
            return
        if self.structure == "matrix_free" or not self.use_autodiff:
            return
        with torch.enable_grad():
            out = field.vf(u.detach().requires_grad_(True), t)
        self._lacks_graph(out)

    def _lacks_graph(self, out: torch.Tensor) -> bool:
        """Whether ``f``'s output has no autograd graph to ``u`` (then finite differences from now on, or
        the error of ``jac="autodiff"``)."""
        if out.requires_grad:
            return False
        if self.config.jac == "autodiff":
            raise RuntimeError(f"{self.owner}: jac='autodiff' but f's output carries no autograd graph "
                               "(f detaches or differentiates internally); use jac='auto' or 'finite_difference'")
        self.use_autodiff = False
        return True

    def traced_nfe(self, u: torch.Tensor) -> int:
        """Evaluations of ``f`` in one linearisation of :meth:`_traced`, counted as the eager path counts
        them (the forward pass of an autodiff Jacobian is one; the difference in ``t`` is one, none with a
        user ``tgrad``)."""
        difference = 0 if self.config.tgrad is not None else 1
        if callable(self.config.jac):
            return difference
        if not self.use_autodiff:
            columns = u.shape[-1] if self.structure == "batched" else u.numel()
            return columns + difference
        return 1 if self.structure == "dense" else 1 + difference

    # --- J ------------------------------------------------------------------------------------
    def _autodiff(self, field, u, t, f_u, need_dfdt):
        """``(J, f_t)`` by reverse mode (one batched backward pass over all output rows: the dense
        rows, or the rows of all blocks at once; :meth:`_rows`), or ``(None, None)`` when ``f``'s
        output has no autograd graph to ``u`` (a field that differentiates internally): then finite
        differences, for the rest of the solve.

        The Jacobian keeps its graph (``create_graph``) when ``f(u, t)`` itself carries one, so that
        backpropagation through the solve sees ``dJ/dp``. It is always formed at a fresh leaf copy of
        ``u`` and reattached to ``u``'s history afterwards (:class:`_JacobianAt`): differentiating at
        ``u`` itself makes every ``autograd.grad`` call walk the solve's whole graph so far, a cost
        that grows with the step index (quadratic in the number of steps under ``DirectAdjoint``).
        """
        create_graph = torch.is_grad_enabled() and f_u.requires_grad
        dense = self.structure == "dense"
        with torch.enable_grad():
            u_ = u.detach().requires_grad_(True)
            t_ = t.detach().requires_grad_(True) if (need_dfdt and dense) else t
            out = field.vf(u_, t_)
            if self._lacks_graph(out):
                return None, None
            wrt = (u_, t_) if t_ is not t else (u_,)
            J, dts, n = self._rows(out, wrt, dense, create_graph)
        if dense:
            J = J.reshape(n, n)
            dfdt = None
            if t_ is not t:
                dfdt = (dts if dts is not None else t.new_zeros(n)).reshape(u.shape).to(u.dtype)
        else:
            J, dfdt = J.permute(1, 0, 2), None  # rows (d, B, d) -> blocks (B, d, d)
        if create_graph and u.requires_grad:
            J, dfdt = (_JacobianAt.apply(u, x, u_) if x is not None and x.requires_grad else x for x in (J, dfdt))
        return J, dfdt

    @staticmethod
    def _rows(out, wrt, dense: bool, create_graph: bool):
        """``(J_rows, dt_rows, n)``: the ``n`` output rows' gradients with respect to ``wrt`` in one
        batched backward pass (``is_grads_batched``: the cotangents ``e_1 .. e_n`` through a vmapped
        backward), rows ``(n, *u.shape)``. Dense: the rows of ``f(u).reshape(-1)``; batched: for each
        output component ``i`` the cotangent ``e_i`` in every sample at once (the rows of all ``B``
        blocks). A field whose backward has no batching rule falls back to one pass per row."""
        u_ = wrt[0]
        if out.numel() == 0:  # a zero-size state: no rows to differentiate (autograd rejects empty batches)
            n = 0 if dense else out.shape[-1]
            return (u_.new_zeros((n,) + tuple(u_.shape)),
                    wrt[1].new_zeros((n,) + tuple(wrt[1].shape)) if len(wrt) > 1 else None, n)
        if dense:
            n = out.numel()
            cotangents = torch.eye(n, dtype=out.dtype, device=out.device).reshape((n,) + tuple(out.shape))
        else:
            n = out.shape[-1]
            eye = torch.eye(n, dtype=out.dtype, device=out.device)
            cotangents = eye.unsqueeze(1).expand((n,) + tuple(out.shape))
        try:
            g = torch.autograd.grad(out, wrt, cotangents, is_grads_batched=True, retain_graph=True,
                                    create_graph=create_graph, allow_unused=True)
        except RuntimeError:
            rows = [torch.autograd.grad(out, wrt, c, retain_graph=True, create_graph=create_graph,
                                        allow_unused=True) for c in cotangents]
            g = tuple(None if all(r[k] is None for r in rows) else
                      torch.stack([r[k] if r[k] is not None else torch.zeros_like(x) for r in rows])
                      for k, x in enumerate(wrt))
        J = g[0] if g[0] is not None else u_.new_zeros((n,) + tuple(u_.shape))
        return J, (g[1] if len(g) > 1 else None), n

    def _finite_difference(self, field, u, t, f_u, counters) -> torch.Tensor:
        eps = math.sqrt(torch.finfo(u.dtype).eps)
        if self.structure == "batched":
            B, d = u.shape
            cols = []
            for j in range(d):
                step = eps * (1.0 + u[:, j].abs())
                shifted = u.clone()
                shifted[:, j] = u[:, j] + step
                cols.append((field.vf(shifted, t) - f_u) / step.unsqueeze(-1))
            return torch.stack(cols, dim=-1)  # (B, d_out, d_in)
        flat = u.reshape(-1)
        f_flat = f_u.reshape(-1)
        cols = []
        for j in range(flat.numel()):
            step = eps * (1.0 + flat[j].abs())
            shifted = flat.clone()
            shifted[j] = flat[j] + step
            cols.append((field.vf(shifted.view(u.shape), t).reshape(-1) - f_flat) / step)
        if not cols:
            return u.new_zeros((0, 0))
        return torch.stack(cols, dim=-1)

    def _user(self, jac: Callable, field, u, t) -> torch.Tensor:
        J = jac(u, field.p, t)
        n = u.numel()
        if self.structure == "batched":
            expected = (u.shape[0], u.shape[1], u.shape[1])
        else:
            expected = (n, n)
        if not self.checked:
            if not isinstance(J, torch.Tensor):
                raise JacobianShapeError(f"{self.owner}: jac(u, p, t) must return a tensor, got {type(J).__name__}")
            if self.structure == "dense" and tuple(J.shape) == self.shape + self.shape:
                pass
            elif tuple(J.shape) != expected:
                layout = ("(B, d, d): one d x d block per sample" if self.structure == "batched" else
                          f"(n, n) with n = u.numel() = {n} (or {self.shape + self.shape})")
                raise JacobianShapeError(
                    f"{self.owner}: jac(u, p, t) returned shape {tuple(J.shape)} for a state of shape "
                    f"{self.shape}; with jac_structure={self.structure!r} it must return {expected}, {layout}")
            if J.dtype != u.dtype or J.device != u.device:
                raise JacobianShapeError(f"{self.owner}: jac(u, p, t) returned {J.dtype} on {J.device}, but the "
                                         f"state is {u.dtype} on {u.device}; return the Jacobian in u's dtype and "
                                         "device")
            self.checked = True
        return J.reshape(expected)

    # --- f_t ----------------------------------------------------------------------------------
    def _user_tgrad(self, tgrad: Callable, field, u, t) -> torch.Tensor:
        """The user's ``tgrad(u, p, t)``, its shape, dtype and device checked on the first call."""
        out = tgrad(u, field.p, t)
        if not self.tgrad_checked:
            if not isinstance(out, torch.Tensor):
                raise JacobianShapeError(f"{self.owner}: tgrad(u, p, t) must return a tensor, got "
                                         f"{type(out).__name__}")
            if out.shape != u.shape or out.dtype != u.dtype or out.device != u.device:
                raise JacobianShapeError(
                    f"{self.owner}: tgrad(u, p, t) returned {tuple(out.shape)} {out.dtype} on {out.device}; it must "
                    f"return df/dt like u: {tuple(u.shape)} {u.dtype} on {u.device}")
            self.tgrad_checked = True
        return out

    def _time_difference(self, field, u, t, f_u) -> torch.Tensor:
        """``f_t`` by a one-sided difference toward the step (exactly zero for an autonomous field): one
        evaluation. At the start of a backward solve a forward difference would reach past the span."""
        t_host = host_time(t)
        step = self.direction * math.sqrt(torch.finfo(u.dtype).eps) * max(1.0, abs(t_host))
        return (field.vf(u, time_scalar(t_host + step, t.dtype, t.device)) - f_u) / step


class StiffCounters:
    """Per-solve counters of the linear algebra (OrdinaryDiffEq's ``DEStats`` names), shared by every
    state of one solve and copied into ``sol.stats`` at the end.

    ``njac``: Jacobians formed; ``nw``: Newton matrices ``I - h gamma J`` formed (factorised unless
    matrix-free); ``nsolve``: linear solves; ``nkrylov``: GMRES products; ``nnonliniter``: Newton
    iterations; ``nnonlinconvfail``: Newton iterations that failed to converge.
    """

    __slots__ = ("njac", "nw", "nsolve", "nkrylov", "nnonliniter", "nnonlinconvfail")

    def __init__(self) -> None:
        self.njac = self.nw = self.nsolve = self.nkrylov = self.nnonliniter = self.nnonlinconvfail = 0

    def write(self, stats) -> None:
        for name in self.__slots__:
            setattr(stats, name, getattr(stats, name, 0) + getattr(self, name))


class StiffState:
    """Solver state of the stiff methods: ``f(u, t)`` when known, the per-solve counters and Jacobian
    evaluator, the cached linearisation and Newton matrix (reused across steps by the Newton-based
    methods), the Newton contraction memory ``eta`` and the last stiffness estimate."""

    __slots__ = ("f_at_u", "counters", "evaluator", "lin", "newton", "eta", "eigen_estimate", "jac_current")

    def __init__(self, f_at_u, counters, evaluator, lin=None, newton=None, eta=1.0, eigen_estimate=None,
                 jac_current=False) -> None:
        self.f_at_u, self.counters, self.evaluator = f_at_u, counters, evaluator
        self.lin, self.newton, self.eta = lin, newton, eta
        self.eigen_estimate = eigen_estimate
        #: the cached Jacobian was formed at the current point (a Newton failure with it is not its fault)
        self.jac_current = jac_current

    def advanced(self, f_new, eigen_estimate, lin=None, newton=None, eta=1.0) -> "StiffState":
        """The state at the end of an accepted step."""
        return StiffState(f_new, self.counters, self.evaluator, lin, newton, eta, eigen_estimate, False)

    def retry(self, f0, lin=None, newton=None, eta=None) -> "StiffState":
        """The state to retry from the same point (``f0`` and, where given, the linearisation kept)."""
        return StiffState(f0, self.counters, self.evaluator, lin if lin is not None else self.lin,
                          newton if newton is not None else self.newton, self.eta if eta is None else eta,
                          self.eigen_estimate, self.jac_current or (lin is not None and lin.u is not None))

    def restarted(self, f_at_u) -> "StiffState":
        """The state to resume from another point (after another method stepped): caches dropped."""
        return StiffState(f_at_u, self.counters, self.evaluator)


class AbstractStiffSolver(AbstractAdaptiveSolver):
    """Base of the Rosenbrock and implicit (Newton) methods: Jacobian options, counters in ``sol.stats``.

    Capabilities the loop uses: ``bind_options(options)`` (the solver for one solve, knowing its
    tolerances) and ``record_stats(stats, state)`` (the counters of :class:`StiffCounters`).
    """

    needs_f0 = True
    computes_du_new = True

    def __init__(self, *, jac: Any = "auto", jac_structure: str = "auto", krylov_rtol: float = 1e-7) -> None:
        self.jacobian = JacobianConfig(type(self).__name__, jac, jac_structure, krylov_rtol)

    def init(self, term, t0, u0, dt0, f0=None):
        direction = -1.0 if dt0 is not None and host_time(dt0) < 0 else 1.0
        return StiffState(f0, StiffCounters(), JacobianEvaluator(self.jacobian, u0, type(self).__name__, direction))

    def for_another_field(self) -> "AbstractStiffSolver":
        """A copy whose Jacobian is formed from the field it is given (``jac="auto"`` for a user ``jac``,
        no user ``tgrad``): the user's functions describe the problem's own field only."""
        config = self.jacobian
        if not callable(config.jac) and config.tgrad is None:
            return self
        other = copy.copy(self)
        other.jacobian = JacobianConfig(type(self).__name__, "auto" if callable(config.jac) else config.jac,
                                        config.structure, config.krylov_rtol, config.krylov_restart)
        return other

    def bind_options(self, options) -> "AbstractStiffSolver":
        return self

    def record_stats(self, stats, state) -> None:
        if isinstance(state, StiffState):
            state.counters.write(stats)

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(type(self))

    def _key(self) -> tuple:
        return self.jacobian.key()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.jacobian!r})"
