"""Broyden's "good" method with low-rank inverse-Jacobian updates (full and limited memory)."""

from __future__ import annotations

import abc

import torch

from ..core.validation import check_bool, check_choice, check_int

from ._base import AbstractNonlinearSolver, axpy_rows, backtracking_line_search, rowdot

__all__ = ["Broyden", "LimitedMemoryBroyden"]

_INITIAL_CAPACITY = 16


class _BroydenState:
    """Low-rank inverse Jacobian ``H = -I + sum_i u_i v_i^T`` (rows of ``us``/``vs``) and the last step."""

    __slots__ = ("us", "vs", "filled", "oldest", "z_prev", "F_prev", "d_prev", "memory")

    def __init__(self, us, vs, memory):
        self.us, self.vs, self.memory = us, vs, memory
        self.filled = 0
        self.oldest = 0
        self.z_prev = self.F_prev = self.d_prev = None


class _LowRankBroyden(AbstractNonlinearSolver):
    """Shared implementation of :class:`Broyden` and :class:`LimitedMemoryBroyden`."""

    _when_full = "reset"

    def _set_search(self, line_search, max_backtracks):
        self._set("line_search", check_bool(self.name, "line_search", line_search))
        self._set("max_backtracks", check_int(self.name, "max_backtracks", max_backtracks, 1))

    @abc.abstractmethod
    def _memory(self, maxiters: int) -> int:
        """Implemented by each concrete subclass."""

    def init(self, z, gz, maxiters):
        memory = self._memory(maxiters)
        capacity = min(memory, _INITIAL_CAPACITY)
        batch, n = z.shape
        # Slots beyond `filled` are never read, so the buffers need no zeroing.
        return _BroydenState(z.new_empty(batch, capacity, n), z.new_empty(batch, capacity, n), memory)

    def step(self, fn, z, gz, F, state, active):
        if state.z_prev is None:
            direction = F  # H_0 = -I: the first step is a plain fixed-point step
        else:
            direction = self._update(z, F, state)
        state.z_prev, state.F_prev, state.d_prev = z, F, direction
        if self.line_search:
            residual_norm = torch.linalg.vector_norm(F, dim=1)
            search = backtracking_line_search(fn, z, gz, direction, residual_norm, active, self.max_backtracks)
            if bool(search.rejected.any()):
                self._learn_from_rejected(state, z, F, search)
            return search.z, search.gz, state, search.nfe
        z_new = z + direction
        return z_new, fn(z_new), state, 1

    def _learn_from_rejected(self, state, z, F, search):
        """Elements whose line search was rejected stay at ``z``; their next update uses the best trial.

        Their previous point becomes the trial ``z_t`` (with ``F_t = g(z_t) - z_t``
        and ``d_prev = -H F_t``), so the next Broyden update uses the secant
        pair ``(z - z_t, F(z) - F(z_t))``: the direction was bad because ``H``
        was, and the rejected trial says how. Where even that trial is NaN/Inf,
        the element's ``H`` restarts from ``-I`` (its next step is a
        fixed-point step).
        """
        rejected = search.rejected
        learn = rejected & search.trial_finite
        reset = rejected & ~search.trial_finite
        z_t = search.z_trial
        F_t = search.gz_trial - z_t
        k = state.filled
        if k:
            minus_HF_t = axpy_rows(F_t, rowdot(state.vs[:, :k], F_t), state.us[:, :k], alpha=-1.0)
            wipe = reset.view(-1, 1, 1)
            state.us[:, :k].masked_fill_(wipe, 0.0)
            state.vs[:, :k].masked_fill_(wipe, 0.0)
        else:
            minus_HF_t = F_t
        rows = learn.unsqueeze(1)
        state.z_prev = torch.where(rows, z_t, z)
        state.F_prev = torch.where(rows, F_t, F)
        state.d_prev = torch.where(rows, minus_HF_t, torch.where(reset.unsqueeze(1), F, state.d_prev))

    def _update(self, z, F, state):
        """Broyden-update ``H`` with the last step and return the new direction ``-H F``."""
        dz = z - state.z_prev
        dF = F - state.F_prev
        restart = state.filled == state.memory and self._when_full == "reset"
        if restart:
            # Back to H_0 = -I, keeping the newest secant pair as its first update.
            state.filled = 0
        k = state.filled
        if k:
            us, vs = state.us[:, :k], state.vs[:, :k]
            minus_HF = axpy_rows(F, rowdot(vs, F), us, alpha=-1.0)
            v = axpy_rows(dz, rowdot(us, dz), vs, beta=-1.0)  # H^T dz
        else:
            minus_HF, v = F, -dz
        # dz - H dF: the previous direction was d = -H F_prev with this same H, so
        # H dF = d - (-H F); after a restart H = -I and H dF = -dF.
        residual_step = dz + dF if restart else (dz - state.d_prev).add_(minus_HF)
        denom = torch.linalg.vecdot(v, dF)
        scale_ref = torch.linalg.vector_norm(v, dim=1) * torch.linalg.vector_norm(dF, dim=1)
        # A denominator at rounding level (a repeated or frozen iterate) carries no
        # curvature information: skip that element's update instead of dividing by ~0.
        usable = denom.abs() > torch.finfo(z.dtype).eps * scale_ref
        inv = torch.where(usable, 1.0 / torch.where(usable, denom, torch.ones_like(denom)),
                          torch.zeros_like(denom))
        u = residual_step.mul_(inv.unsqueeze(1))
        if self._store(state, u, v):
            # Sherman-Morrison: H' = H + u v^T, so -H' F = -H F - u (v . F).
            return torch.addcmul(minus_HF, u, torch.linalg.vecdot(v, F).unsqueeze(1), value=-1.0)
        k = state.filled
        return axpy_rows(F, rowdot(state.vs[:, :k], F), state.us[:, :k], alpha=-1.0)

    def _store(self, state, u, v) -> bool:
        """Store the rank-one term; True if it was appended without removing an older one."""
        if state.filled < state.memory:
            if state.filled == state.us.shape[1]:
                _grow(state)
            state.us[:, state.filled] = u
            state.vs[:, state.filled] = v
            state.filled += 1
            return True
        slot = state.oldest
        state.us[:, slot] = u
        state.vs[:, slot] = v
        state.oldest = (slot + 1) % state.memory
        return False


def _grow(state: _BroydenState) -> None:
    batch, capacity, n = state.us.shape
    new_capacity = min(state.memory, 2 * capacity)
    for name in ("us", "vs"):
        old = getattr(state, name)
        new = old.new_empty(batch, new_capacity, n)
        new[:, :capacity] = old
        setattr(state, name, new)


class Broyden(_LowRankBroyden):
    """Broyden's "good" method on ``F(z) = g(z) - z`` with inverse-Jacobian updates.

    Broyden (1965), "A class of methods for solving nonlinear simultaneous
    equations", Math. Comp. 19; used as the DEQ forward solver by Bai, Kolter &
    Koltun (2019), "Deep Equilibrium Models", NeurIPS. With ``H_k`` an
    approximation of the inverse Jacobian of ``F``:

        d_k = -H_k F(z_k),        z_(k+1) = z_k + alpha_k d_k,
        dz = z_(k+1) - z_k,       dF = F(z_(k+1)) - F(z_k),
        H_(k+1) = H_k + (dz - H_k dF) (dz^T H_k) / (dz^T H_k dF)

    (the Sherman-Morrison form of the good Broyden update of the Jacobian).
    ``H_0 = -I``, i.e. the Jacobian of ``g`` is taken as zero, so the first step
    is a plain fixed-point step. ``H_k = -I + sum_i u_i v_i^T`` is stored as
    its rank-one terms (``u = (dz - H dF) / (v^T dF)``, ``v = H^T dz``), each a
    row of a ``(B, k, N)`` buffer per batch element; no ``N x N`` matrix is formed.
    An update whose denominator ``v^T dF`` is at rounding level relative to
    ``||v|| ||dF||`` is skipped for that batch element.

    Memory: one pair of rank-one terms per iteration (``2 N`` numbers per batch
    element per iteration), grown on demand up to ``maxiters``; for long
    solves on large states use :class:`LimitedMemoryBroyden`.

    With ``line_search=True``, each element backtracks on ``||F||``
    (:func:`~pylux.nonlinear._base.backtracking_line_search`); a trial that
    would raise the residual more than tenfold is never taken. An element
    whose search finds no acceptable step stays where it is and learns from
    the rejected trial: its next update uses the secant pair between the
    current point and that trial (a poor ``H``, e.g. after a near-zero
    ``dF``, gives a huge direction; the trial corrects ``H`` along it), and
    restarts from ``H = -I`` if even that trial was NaN/Inf.

    Args:
        line_search: per-element backtracking on ``||F||`` (off by default:
            DEQ maps are usually close enough to contractions for full steps).
        max_backtracks: halvings tried by the line search.
        maxiters, abstol, reltol: optional defaults for :func:`nlsolve`.
    """

    _option_names = ("line_search", "max_backtracks")

    def __init__(self, *, line_search: bool = False, max_backtracks: int = 8,
                 maxiters=None, abstol=None, reltol=None, **unknown):
        self._set_common(maxiters, abstol, reltol, unknown)
        self._set_search(line_search, max_backtracks)

    def _memory(self, maxiters):
        return max(maxiters, 1)


class LimitedMemoryBroyden(_LowRankBroyden):
    """Broyden's method keeping only the last ``memory`` rank-one updates.

    The limited-memory variant used by Bai, Koltun & Kolter (2020),
    "Multiscale Deep Equilibrium Models", NeurIPS: the update formulas are those
    of :class:`Broyden`, but ``U`` and ``V`` (``(B, memory, N)`` each) hold
    at most ``memory`` terms of ``H = -I + U^T V``. When they are full:

    * ``when_full="reset"`` (default): the terms are dropped and ``H`` restarts
      from ``-I`` updated with the newest secant pair only
      (``v = -dz``, ``u = (dz + dF) / (v . dF)``), so ``H`` stays an exact
      Broyden matrix of the pairs since the restart;
    * ``when_full="recycle"`` (MDEQ's scheme): the oldest term is overwritten by
      the newest. Each term was computed relative to all older ones, so after
      the first overwrite ``H`` is no longer a Broyden matrix of any pair
      sequence; it is cheap and works on well-contracting maps, but was seen to
      diverge (NaN, reported as ``Unstable``) on slowly contracting ones where
      ``"reset"`` converges.

    Args:
        memory: number of rank-one terms kept (>= 1).
        when_full: ``"reset"`` or ``"recycle"``.
        line_search, max_backtracks: as for :class:`Broyden`.
        maxiters, abstol, reltol: optional defaults for :func:`nlsolve`.
    """

    _option_names = ("memory", "when_full", "line_search", "max_backtracks")

    def __init__(self, *, memory: int = 10, when_full: str = "reset", line_search: bool = False,
                 max_backtracks: int = 8, maxiters=None, abstol=None, reltol=None, **unknown):
        self._set_common(maxiters, abstol, reltol, unknown)
        self._set("memory", check_int(self.name, "memory", memory, 1))
        self._set("when_full", check_choice(self.name, "when_full", when_full, ("reset", "recycle")))
        self._set("_when_full", when_full)
        self._set_search(line_search, max_backtracks)

    def _memory(self, maxiters):
        return self.memory
