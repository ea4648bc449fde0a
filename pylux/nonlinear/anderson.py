"""Anderson acceleration with a scale-invariant regularised, batched least-squares solve."""

from __future__ import annotations

import torch

from ..core.validation import check_float, check_int

from ._base import AbstractNonlinearSolver, axpy_rows, combine_rows

__all__ = ["Anderson"]


class _AndersonState:
    """Ring buffers of the last differences ``Δz_i``, ``Δg_i``, ``Δf_i``, their Gram matrix and the last point."""

    __slots__ = ("dzs", "dgs", "dfs", "gram", "z_prev", "gz_prev", "F_prev", "count")

    def __init__(self, dzs, dgs, dfs, gram):
        self.dzs, self.dgs, self.dfs, self.gram = dzs, dgs, dfs, gram
        self.z_prev = self.gz_prev = self.F_prev = None
        self.count = 0


class Anderson(AbstractNonlinearSolver):
    """Anderson acceleration of the fixed-point iteration ``z = g(z)``.

    Anderson (1965), J. ACM 12; in the difference form analysed by Walker & Ni
    (2011), "Anderson acceleration for fixed-point iterations", SIAM J. Numer.
    Anal. 49(4). With the last ``m_k = min(memory, k + 1)`` iterates ``z_i``,
    their images ``g(z_i)`` and residuals ``f_i = g(z_i) - z_i``, and the
    ``m_k - 1`` consecutive differences ``Δf_i = f_(i+1) - f_i`` (likewise
    ``Δz_i``, ``Δg_i``) as the columns of ``ΔF``, ``ΔZ``, ``ΔG``:

        gamma   = argmin ||f_k - ΔF gamma||^2 + lam ||S gamma||^2,   S = diag(||Δf_i||)
        z_(k+1) = z_k + beta f_k - (ΔZ + beta ΔF) gamma     (= g(z_k) - ΔG gamma for beta = 1)

    Without the Tikhonov term this is the classical method (the mixing weights
    ``alpha`` of ``min ||sum_i alpha_i f_i||, sum_i alpha_i = 1`` are
    ``alpha = e_k + gamma`` differenced). The normal equations
    ``(ΔF^T ΔF + lam diag(ΔF^T ΔF)) gamma = ΔF^T f_k`` are one small system per
    batch element; the Gram matrix of the differences is kept up to date one
    row per iteration.

    The regularisation is relative in Marquardt's (1963) sense: each
    difference is penalised relative to its own squared norm, so the term is
    invariant to the scale of the problem, of the residuals and of each
    difference, and ``lam -> inf`` gives ``gamma -> 0``, the plain fixed-point
    step. A slowly contracting mode (a Jacobian eigenvalue ``1 - 1e-6``) needs
    an extrapolation by ``1e6``: a penalty on the weights ``alpha`` (or one
    relative to ``||f||^2``) forbids it, while this one only shrinks it, by
    ``1 / (1 + lam)`` along a single difference. The weight is
    ``lam = max(regularization, 100 eps)``; the floor keeps exactly collinear
    differences (a linear map on a low-dimensional subspace) solvable, close to
    the minimum-norm solution they need. A zero difference (a frozen or
    repeated iterate) gets ``gamma_i = 0``; where the system is still singular
    or its solution is not finite, that batch element falls back to the plain
    step ``gamma = 0``: never a crash.

    One evaluation of ``g`` per iteration; memory ``(2 or 3) * (memory - 1) * N``
    numbers per batch element (``Δz_i`` is stored only when ``beta != 1``),
    plus the last point.

    Args:
        memory: history length ``m`` (>= 1; ``memory=1`` is damped fixed-point iteration).
        beta: mixing (damping) parameter in ``(0, 1]``.
        regularization: relative Tikhonov weight ``lam >= 0`` (as above).
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
        p = self.memory - 1
        dzs = z.new_zeros(batch, p, n) if self.beta != 1.0 else None
        return _AndersonState(dzs, z.new_zeros(batch, p, n), z.new_zeros(batch, p, n), z.new_zeros(batch, p, p))

    def _plain(self, z, gz, F):
        return gz if self.beta == 1.0 else z + self.beta * F

    def step(self, fn, z, gz, F, state, active):
        p = self.memory - 1
        count = state.count
        state.count += 1
        if count == 0 or p == 0:
            state.z_prev, state.gz_prev, state.F_prev = z, gz, F
            z_new = self._plain(z, gz, F)
            return z_new, fn(z_new), state, 1
        slot = (count - 1) % p
        k = min(count, p)
        df = F - state.F_prev
        state.dfs[:, slot] = df
        state.dgs[:, slot] = gz - state.gz_prev
        if state.dzs is not None:
            state.dzs[:, slot] = z - state.z_prev
        state.z_prev, state.gz_prev, state.F_prev = z, gz, F
        dfs = state.dfs[:, :k]
        # One batched product gives the new Gram row (Δf_new . Δf_i) and the right-hand side (f_k . Δf_i).
        both = torch.bmm(torch.stack([df, F], dim=1), dfs.transpose(1, 2))
        state.gram[:, slot, :k] = both[:, 0]
        state.gram[:, :k, slot] = both[:, 0]
        gamma = self._coefficients(state.gram[:, :k, :k], both[:, 1])
        if state.dzs is None:
            z_new = axpy_rows(gz, gamma, state.dgs[:, :k], alpha=-1.0)
        else:
            step = combine_rows(gamma, state.dzs[:, :k]).add_(combine_rows(gamma, dfs), alpha=self.beta)
            z_new = (z + self.beta * F).sub_(step)
        return z_new, fn(z_new), state, 1

    def _coefficients(self, gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """Solve ``(G + lam diag(G)) gamma = rhs`` per batch element; ``gamma = 0`` where that fails."""
        k = gram.shape[1]
        diag = gram.diagonal(dim1=1, dim2=2)
        lam = max(self.regularization, 100.0 * torch.finfo(gram.dtype).eps)
        # A zero difference has a zero row, column and right-hand side: give it gamma_i = 0.
        empty = diag <= 0
        boost = torch.where(empty, torch.ones_like(diag), lam * diag)
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        system = gram + boost.unsqueeze(2) * eye
        gamma, info = torch.linalg.solve_ex(system, rhs.unsqueeze(2))
        gamma = gamma.squeeze(2)
        fine = (info == 0) & torch.isfinite(gamma).all(dim=1)
        return torch.where(fine.unsqueeze(1), gamma, torch.zeros_like(gamma))
