"""Matrix-free restarted GMRES, batched over a leading dimension.

GMRES (Saad & Schultz 1986, "GMRES: a generalized minimal residual algorithm
for solving nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 7(3))
solves ``A x = b`` using only products ``v -> A v``. From ``r0 = b - A x0``,
``beta = ||r0||`` and ``v1 = r0 / beta``, the Arnoldi process builds an
orthonormal basis ``V_k = [v1 .. vk]`` of the Krylov space
``K_k = span{r0, A r0, ..., A^(k-1) r0}`` and the ``(k+1) x k`` upper
Hessenberg matrix ``H_k`` with ``A V_k = V_(k+1) H_k``. The iterate
``x_k = x0 + V_k y_k`` minimises ``||b - A x||`` over ``x0 + K_k``, i.e.

    y_k = argmin_y || beta e1 - H_k y ||.

Givens rotations ``G_j`` that zero the subdiagonal of ``H_k`` one column at a
time turn this into a triangular solve ``R_k y = g_k`` with ``g = Q (beta e1)``,
``Q = G_(k-1) ... G_0``; ``|g_(k+1)|`` is the residual norm of ``x_k`` without
forming it. After ``restart`` steps, ``x`` is updated, the true residual
recomputed and the process restarted (GMRES(m)).

Batching: ``b`` has shape ``(B, ...)`` and each batch element is its own
system (``matvec`` must act on each element independently, as a DEQ Jacobian
does). Every element has its own Krylov basis, Hessenberg matrix, rotations
and stopping step; elements that have converged stop growing their basis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..core.keywords import check_keywords
from ..core.validation import check_choice, check_float, check_int

from ._base import combine_rows, rowdot

__all__ = ["gmres", "GMRESResult"]


@dataclass(frozen=True)
class GMRESResult:
    """Result of :func:`gmres`.

    Attributes:
        x: the solution, same shape as ``b``.
        residual_norm: ``(B,)`` true residual norms ``||b - A x||`` (recomputed, not estimated).
        iterations: Arnoldi steps taken (products with ``A`` inside the Krylov cycles).
        converged: ``(B,)`` bool, ``residual_norm <= max(atol, rtol * ||b||)`` per element.
        matvecs: every call of ``matvec``, including the residual recomputations.
    """

    x: torch.Tensor
    residual_norm: torch.Tensor
    iterations: int
    converged: torch.Tensor
    matvecs: int


def gmres(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x0: torch.Tensor | None = None,
          *, restart: int = 20, maxiters: int | None = None, rtol: float = 1e-5, atol: float = 0.0,
          orthogonalization: str = "mgs", **unknown) -> GMRESResult:
    """Solve ``A x = b`` for every batch element with restarted GMRES (Saad & Schultz 1986).

    Arnoldi with modified Gram-Schmidt (``orthogonalization="mgs"``, the
    textbook choice) or classical Gram-Schmidt applied twice (``"cgs2"``, as
    stable as MGS and a few batched products per step instead of a loop over
    the basis). The Givens rotations are accumulated in a small orthogonal
    matrix ``Q`` per element so that each new Hessenberg column is rotated by
    one batched product.

    Element ``b`` stops when ``||b_b - A x_b|| <= max(atol, rtol * ||b_b||)``
    (the residual estimate ``|g_(k+1)|`` decides within a cycle; the true
    residual is recomputed at the end of every cycle and decides overall).
    Without restart (``restart >= n``) an ``n``-dimensional system converges
    in at most ``n`` steps in exact arithmetic. An element stops early, not
    converged, when its residual is NaN/Inf or a whole cycle did not decrease
    it (restarting from the same point would repeat that cycle: a singular
    ``A`` with ``b`` outside its range).

    Args:
        matvec: ``v -> A v``, taking and returning tensors of ``b``'s shape;
            it must act on each batch element independently (e.g. a
            Jacobian-vector or vector-Jacobian product of a per-sample map).
        b: right-hand side of shape ``(B, ...)``; a single system is ``(1, n)``.
        x0: initial guess (``b``'s shape); zeros by default.
        restart: Krylov dimension per cycle (capped at the per-element size ``n``).
        maxiters: total Arnoldi steps over all cycles; default ``10 * min(restart, n)``.
        rtol, atol: tolerances as above; not both zero.
        orthogonalization: ``"mgs"`` or ``"cgs2"``.

    Returns:
        :class:`GMRESResult`. Elements that did not converge keep their best
        iterate and ``converged=False``; no warning is raised here, the caller decides.

    Raises:
        TypeError: unknown keyword, non-floating ``b``, or ``matvec`` returning a
            different dtype/device. ValueError: bad shapes or option values.

    Host synchronisation: one per Arnoldi step (has every element converged?)
    and one per restart.
    """
    where = "gmres"
    check_keywords(unknown, where, ("restart", "maxiters", "rtol", "atol", "orthogonalization"))
    restart, maxiters, rtol, atol = _check_arguments(where, matvec, b, restart, maxiters, rtol, atol,
                                                     orthogonalization)
    shape = b.shape
    batch = shape[0]
    n = b[0].numel() if batch > 0 else int(torch.Size(shape[1:]).numel())
    b_flat = b.reshape(batch, n)
    if x0 is not None:
        _check_like(where, "x0", x0, b)
    if batch == 0 or n == 0:
        x = torch.zeros_like(b) if x0 is None else x0.clone()
        return GMRESResult(x, b.new_zeros(batch), 0, torch.ones(batch, dtype=torch.bool, device=b.device), 0)
    m = min(restart, n)
    if maxiters is None:
        maxiters = 10 * m
    apply_a = _flat_operator(where, matvec, b)
    x0_flat = None if x0 is None else x0.reshape(batch, n)
    x, rnorm, iterations, converged, matvecs = _restarted(apply_a, b_flat, x0_flat, rtol, atol, m, maxiters,
                                                          orthogonalization)
    return GMRESResult(x.view(shape), rnorm, iterations, converged, matvecs)


def _check_arguments(where, matvec, b, restart, maxiters, rtol, atol, orthogonalization):
    """Refuse a bad ``b``, ``matvec`` or option value; returns ``(restart, maxiters, rtol, atol)`` checked."""
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"{where}: b must be a torch.Tensor, got {type(b).__name__}.")
    if not callable(matvec):
        raise TypeError(f"{where}: matvec must be callable, got {type(matvec).__name__}.")
    if not b.is_floating_point():
        raise TypeError(f"{where}: b must have a real floating dtype, got {b.dtype}; complex and "
                        "integer systems are not supported.")
    if b.dim() < 1:
        raise ValueError(f"{where}: b must have a leading batch dimension, got a 0-d tensor; "
                         "use b.reshape(1, -1) for a single system.")
    restart = check_int(where, "restart", restart, 1)
    maxiters = check_int(where, "maxiters", maxiters, 0, allow_none=True)
    rtol = check_float(where, "rtol", rtol, low=0.0)
    atol = check_float(where, "atol", atol, low=0.0)
    if rtol == 0.0 and atol == 0.0:
        raise ValueError(f"{where}: rtol and atol are both zero, so GMRES could stop only on an exact "
                         "zero residual; give a positive rtol (e.g. 1e-8) or atol.")
    check_choice(where, "orthogonalization", orthogonalization, ("mgs", "cgs2"))
    return restart, maxiters, rtol, atol


def _flat_operator(where, matvec, b):
    """``v -> A v`` on the flattened ``(B, N)`` batch; the first output is checked against ``b``."""
    shape = b.shape
    batch, n = shape[0], b[0].numel()
    checked = [False]

    def apply_a(v: torch.Tensor) -> torch.Tensor:
        out = matvec(v.view(shape))
        if not checked[0]:
            _check_like(where, "matvec output", out, b)
            checked[0] = True
        return out.reshape(batch, n)
    return apply_a


def _restarted(apply_a, b_flat, x0, rtol, atol, m, maxiters, orthogonalization):
    """GMRES(m) cycles from ``x0`` (zeros when ``None``) until every element has stopped or ``maxiters``.

    Returns ``(x, rnorm, iterations, converged, matvecs)`` on the flattened batch.
    Elements that cannot improve stop too (``converged=False``): a NaN/Inf
    residual, or a whole cycle without any decrease. GMRES(m) restarted from
    the same x repeats the same cycle, so a cycle that gained nothing (a
    singular A with b outside its range) would repeat forever. A cycle that
    made the true residual worse (rounding in a numerically singular system)
    is undone, so every element returns its best iterate.
    """
    batch = b_flat.shape[0]
    target = torch.clamp_min(rtol * torch.linalg.vector_norm(b_flat, dim=1), atol)
    matvecs = 0
    if x0 is None:
        x = torch.zeros_like(b_flat)
        r = b_flat
    else:
        x = x0.clone()
        r = b_flat - apply_a(x)
        matvecs += 1
    rnorm = torch.linalg.vector_norm(r, dim=1)
    converged = rnorm <= target
    iterations = 0
    stuck = ~torch.isfinite(rnorm)
    anorm = torch.zeros_like(rnorm)  # per element, the largest ||A v|| seen: a lower bound of ||A||
    while iterations < maxiters:
        stopped = converged | stuck
        n_stopped = int(stopped.sum())
        if n_stopped == batch:
            break
        steps = min(m, maxiters - iterations)
        x_new, taken = _cycle(apply_a, x, r, rnorm, target, stopped, n_stopped > 0, steps,
                              orthogonalization, anorm)
        iterations += taken
        matvecs += taken + 1
        r_new = b_flat - apply_a(x_new)
        rnorm_new = torch.linalg.vector_norm(r_new, dim=1)
        gained = rnorm_new < rnorm
        worse = ~stopped & ~gained & torch.isfinite(rnorm)
        keep = worse.unsqueeze(1)
        x = torch.where(keep, x, x_new)
        r = torch.where(keep, r, r_new)
        rnorm = torch.where(worse, rnorm, rnorm_new)
        converged = rnorm <= target
        stuck = stuck | ~torch.isfinite(rnorm) | (~stopped & ~gained)
    return x, rnorm, iterations, converged, matvecs


def _check_like(where: str, what: str, t: object, ref: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {what} must be a torch.Tensor, got {type(t).__name__}.")
    if t.shape != ref.shape:
        raise ValueError(f"{where}: {what} has shape {tuple(t.shape)} but b has shape {tuple(ref.shape)}.")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise TypeError(f"{where}: {what} is {t.dtype} on {t.device} but b is {ref.dtype} on {ref.device}.")


def _cycle(apply_a, x, r, rnorm, target, done_before, some_done, steps, orthogonalization, anorm):
    """One GMRES(steps) cycle from ``x`` with residual ``r``; returns the new x and the steps taken.

    ``anorm`` (updated in place) is each element's largest ``||A v||`` so far; a pivot of the
    rotated Hessenberg matrix below ``16 eps anorm`` counts as zero (a numerically singular
    system), so its column is dropped instead of dividing by rounding noise.

    Host synchronisation: one per Arnoldi step (has every element stopped?).
    """
    batch = x.shape[0]
    cycle = _Cycle(x, r, rnorm, done_before, steps, orthogonalization, anorm)
    taken = 0
    for j in range(steps):
        n_done = cycle.arnoldi_step(apply_a, j, target, some_done)
        taken += 1
        if n_done == batch:
            break
        some_done = n_done > 0
    return cycle.update(x, taken), taken


class _Cycle:
    """The working memory of one GMRES cycle, per batch element.

    The Krylov basis (``store``; ``basis`` is its ``(B, j, N)`` view), the
    rotated Hessenberg matrix ``R`` (``tri``), the accumulated rotations
    ``Q = G_(j)...G_0`` (``rot``), ``beta = ||r||``, which elements are done and
    how many basis columns each keeps (``used``).
    """

    def __init__(self, x, r, rnorm, done_before, steps, orthogonalization, anorm):
        batch, n = x.shape
        dtype, device = x.dtype, x.device
        self.orthogonalization = orthogonalization
        self.anorm = anorm
        self.pivot_floor = 16.0 * torch.finfo(dtype).eps
        active = ~done_before
        self.beta = beta = torch.where(active, rnorm, torch.zeros_like(rnorm))
        inv_beta = torch.where(beta > 0, 1.0 / beta, torch.zeros_like(beta))
        # Basis vector j is written before it is read. MGS touches one vector at a time,
        # so it keeps each contiguous (j, B, N); CGS2 multiplies with the whole basis
        # per batch element, so it keeps (B, j, N).
        self.mgs = mgs = orthogonalization == "mgs"
        self.store = x.new_empty(steps + 1, batch, n) if mgs else x.new_empty(batch, steps + 1, n)
        self.basis = self.store.transpose(0, 1) if mgs else self.store  # (B, j, N) view either way
        self.basis[:, 0] = torch.where(active.unsqueeze(1), r * inv_beta.unsqueeze(1), torch.zeros_like(r))
        self.tri = x.new_zeros(batch, steps, steps)  # the rotated Hessenberg matrix R
        self.rot = torch.eye(steps + 1, dtype=dtype, device=device).repeat(batch, 1, 1)  # Q = G_(j)...G_0
        self.done = done_before.clone()
        self.used = torch.zeros(batch, dtype=torch.long, device=device)  # columns each element keeps

    def arnoldi_step(self, apply_a, j, target, some_done) -> int:
        """Arnoldi step ``j``: basis vector ``j + 1``, column ``j`` of R; returns how many elements are done."""
        w = apply_a(self.basis[:, j])
        if some_done:
            # Finished elements stop growing their basis: their new vectors are zero.
            w = torch.where(self.done.unsqueeze(1), torch.zeros_like(w), w)
        torch.maximum(self.anorm, torch.linalg.vector_norm(w, dim=1), out=self.anorm)
        h, w = _orthogonalize(self.basis[:, :j + 1], w, self.orthogonalization)
        h_next = torch.linalg.vector_norm(w, dim=1)
        inv_next = torch.where(h_next > 0, 1.0 / h_next, torch.zeros_like(h_next))
        torch.mul(w, inv_next.unsqueeze(1), out=self.basis[:, j + 1])
        nonzero = self._rotate(j, h, h_next)
        estimate = self.beta * self.rot[:, j + 1, 0].abs()
        # A zero pivot (A v in the span with no new direction and a zero diagonal)
        # means the system is singular here: drop that column and stop the element.
        singular = ~self.done & ~nonzero
        finished = ~self.done & nonzero & (estimate <= target)
        self.used.masked_fill_(finished, j + 1).masked_fill_(singular, j)
        self.done = self.done | finished | singular
        return int(self.done.sum())

    def _rotate(self, j, h, h_next):
        """Rotate the new Hessenberg column ``(h, h_next)`` into R and append its Givens rotation to Q.

        Returns where the pivot is nonzero (above ``pivot_floor * anorm``).
        """
        rot = self.rot
        col = torch.bmm(rot[:, :j + 1, :j + 1], h.unsqueeze(2)).squeeze(2)
        diag = col[:, j]
        radius = torch.hypot(diag, h_next)
        nonzero = radius > self.pivot_floor * self.anorm
        safe = torch.where(nonzero, radius, torch.ones_like(radius))
        c = torch.where(nonzero, diag / safe, torch.ones_like(radius))
        s = torch.where(nonzero, h_next / safe, torch.zeros_like(radius))
        col = torch.cat([col[:, :j], radius.unsqueeze(1)], dim=1)
        self.tri[:, :j + 1, j] = col
        row_j = rot[:, j, :j + 1].clone()
        rot[:, j, :j + 1] = row_j * c.unsqueeze(1)
        rot[:, j, j + 1] = s
        rot[:, j + 1, :j + 1] = row_j * (-s).unsqueeze(1)
        rot[:, j + 1, j + 1] = c
        return nonzero

    def update(self, x, taken):
        """``x + V y`` with ``R y = Q (beta e1)`` over the columns each element keeps (identity elsewhere)."""
        self.used.masked_fill_(~self.done, taken)
        k = taken
        dtype, device = x.dtype, x.device
        idx = torch.arange(k, device=device)
        keep = idx.unsqueeze(0) < self.used.unsqueeze(1)  # (B, k)
        keep2 = keep.unsqueeze(2) & keep.unsqueeze(1)
        eye = torch.eye(k, dtype=dtype, device=device)
        system = torch.where(keep2, self.tri[:, :k, :k], eye)
        rhs = (self.beta.unsqueeze(1) * self.rot[:, :k, 0]) * keep.to(dtype)
        y = torch.linalg.solve_triangular(system, rhs.unsqueeze(2), upper=True).squeeze(2)
        if self.mgs:
            update = x.clone()
            for i in range(k):
                update.addcmul_(self.store[i], y[:, i:i + 1])
            return update
        return x + combine_rows(y, self.basis[:, :k])


def _orthogonalize(vs: torch.Tensor, w: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonalise ``w`` (B, N) against the orthonormal rows ``vs`` (B, j, N); returns (h, w)."""
    if method == "mgs":
        hs = []
        for i in range(vs.shape[1]):
            v = vs[:, i]
            hi = torch.linalg.vecdot(w, v)
            w = torch.addcmul(w, hi.unsqueeze(1), v, value=-1.0)
            hs.append(hi)
        return torch.stack(hs, dim=1), w
    h = rowdot(vs, w)
    w = w - combine_rows(h, vs)
    h2 = rowdot(vs, w)
    w = w - combine_rows(h2, vs)
    return h + h2, w
