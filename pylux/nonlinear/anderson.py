"""Anderson acceleration with a regularised, batched least-squares solve."""

from __future__ import annotations

import torch

from ._base import AbstractNonlinearSolver, combine_rows, rowdot
from ._options import check_float, check_int

__all__ = ["Anderson"]


class _AndersonState:
    __slots__ = ("zs", "gzs", "Fs", "gram", "count")

    def __init__(self, zs, gzs, Fs, gram):
        self.zs, self.gzs, self.Fs, self.gram = zs, gzs, Fs, gram
        self.count = 0


class Anderson(AbstractNonlinearSolver):
    """Anderson acceleration of the fixed-point iteration ``z = g(z)``.

    Anderson (1965), J. ACM 12; in the form analysed by Walker & Ni (2011),
    "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal.
    49(4). With the last ``m_k = min(memory, k + 1)`` iterates ``z_i``, their
    images ``g(z_i)`` and residuals ``f_i = g(z_i) - z_i``:

        alpha = argmin ||sum_i alpha_i f_i||^2 + lam ||alpha||^2  s.t. sum_i alpha_i = 1
        z_(k+1) = (1 - beta) sum_i alpha_i z_i + beta sum_i alpha_i g(z_i)

    The constrained problem has the closed form ``alpha = a / (1^T a)`` with
    ``(G + lam I) a = 1`` and ``G_ij = f_i . f_j`` the ``m_k x m_k`` Gram matrix
    of the residuals (kept up to date one row per iteration). The Tikhonov
    term ``lam = max(regularization, 100 eps) * trace(G) / m_k`` is relative to
    the mean squared residual, so it is scale-invariant (it does not swamp ``G``
    as the residuals shrink, as an absolute ``lam`` would); the floor of 100
    machine epsilons keeps exactly collinear residuals solvable. Where the system is still
    singular or its solution is not finite (duplicate history, a zero
    residual), that batch element falls back to the plain step
    ``alpha = e_newest``: never a crash.

    Each batch element solves its own small system (one batched ``solve_ex``
    per iteration). One evaluation of ``g`` per iteration; memory
    ``(2 or 3) * memory * N`` numbers per batch element (``z_i`` is stored
    only when ``beta != 1``).

    Args:
        memory: history length ``m`` (>= 1; ``memory=1`` is damped fixed-point iteration).
        beta: mixing (damping) parameter in ``(0, 1]``.
        regularization: relative Tikhonov weight ``>= 0``.
        maxiters, abstol, reltol: optional defaults for :func:`nlsolve`.
    """

    _option_names = ("memory", "beta", "regularization")

    def __init__(self, *, memory: int = 5, beta: float = 1.0, regularization: float = 1e-4,
                 maxiters=None, abstol=None, reltol=None, **unknown):
        self._set_common(maxiters, abstol, reltol, unknown)
        self._set("memory", check_int(self.name, "memory", memory, 1))
        self._set("beta", check_float(self.name, "beta", beta, low=0.0, high=1.0, low_open=True))
        self._set("regularization", check_float(self.name, "regularization", regularization, low=0.0))

    def init(self, z, gz, maxiters):
        batch, n = z.shape
        m = self.memory
        zs = z.new_zeros(batch, m, n) if self.beta != 1.0 else None
        return _AndersonState(zs, z.new_zeros(batch, m, n), z.new_zeros(batch, m, n),
                              z.new_zeros(batch, m, m))

    def step(self, fn, z, gz, F, state, active):
        m = self.memory
        slot = state.count % m
        state.count += 1
        k = min(state.count, m)
        if state.zs is not None:
            state.zs[:, slot] = z
        state.gzs[:, slot] = gz
        state.Fs[:, slot] = F
        row = rowdot(state.Fs[:, :k], F)
        state.gram[:, slot, :k] = row
        state.gram[:, :k, slot] = row
        if k == 1:
            z_new = gz if self.beta == 1.0 else z + self.beta * F
            return z_new, fn(z_new), state, 1
        alpha = self._coefficients(state.gram[:, :k, :k], slot)
        z_new = combine_rows(alpha, state.gzs[:, :k])
        if state.zs is not None:
            z_new = self.beta * z_new + (1.0 - self.beta) * combine_rows(alpha, state.zs[:, :k])
        return z_new, fn(z_new), state, 1

    def _coefficients(self, gram: torch.Tensor, newest: int) -> torch.Tensor:
        batch, k, _ = gram.shape
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        mean_sq = gram.diagonal(dim1=1, dim2=2).mean(dim=1)
        # The floor keeps exactly collinear residuals (a rank-deficient G, e.g. a linear
        # map on a low-dimensional subspace) solvable; the limit lam -> 0 is the
        # minimum-norm constrained solution, which such problems need.
        lam = max(self.regularization, 100.0 * torch.finfo(gram.dtype).eps)
        system = gram + (lam * mean_sq).view(batch, 1, 1) * eye
        ones = torch.ones(batch, k, 1, dtype=gram.dtype, device=gram.device)
        a, info = torch.linalg.solve_ex(system, ones)
        a = a.squeeze(2)
        total = a.sum(dim=1, keepdim=True)
        alpha = a / total
        fine = (info == 0) & torch.isfinite(alpha).all(dim=1)
        plain = torch.zeros_like(alpha)
        plain[:, newest] = 1.0
        return torch.where(fine.unsqueeze(1), alpha, plain)
