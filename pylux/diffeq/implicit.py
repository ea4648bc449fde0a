r"""Diagonally implicit Runge–Kutta methods with a Newton iteration: ESDIRK, TRBDF2, implicit Euler.

An (E)SDIRK method with stage increments ``z_i = h k_i`` solves, stage by stage,

.. math::
    z_i = h f\Big(t + c_i h,\ \psi_i + \gamma z_i\Big), \qquad
    \psi_i = u + \sum_{j<i} a_{ij} z_j, \qquad u_{new} = u + \sum_i b_i z_i,

(an explicit first stage ``z_1 = h f(u, t)`` for an ESDIRK). Each stage is a
nonlinear system ``G(z) = z - h f(psi + gamma z) = 0`` solved by the simplified
Newton iteration of Hairer & Wanner (*Solving ODEs II*, IV.8):

.. math::
    (I - h\gamma J)\,\Delta z = -G(z^{(k)}), \qquad z^{(k+1)} = z^{(k)} + \Delta z,

with one Newton matrix for every stage (the diagonal is constant), stopped when
``eta_k ||Delta z_k|| <= kappa`` in the solve's scaled norm (``eta_k = theta_k /
(1 - theta_k)``, ``theta_k = ||Delta z_k|| / ||Delta z_{k-1}||`` the observed
contraction, ``kappa = 0.01``), and declared failed when it diverges
(``theta >= 1``), when the contraction predicts no convergence within the
iterations left, or after ``max_newton_iters`` iterations.

Reuse (as OrdinaryDiffEq's and RADAU5's): the Jacobian is kept across steps
while Newton converges well (every ``theta`` below ``jac_refresh_theta``), and the
LU of ``I - h gamma J`` is kept while ``h gamma`` is unchanged up to
:data:`W_REUSE_RTOL` (the default controller holds ``dt`` when it would shrink
by less than 1/6, OrdinaryDiffEq's band; steps that only differ by rounding,
as on a fixed time grid, share one LU). A Newton failure (divergence, a
contraction too slow to converge, a singular matrix) with an old Jacobian
recomputes it and retries the stage at the same ``dt``; a failure with a
current Jacobian returns ``StepStatus.REJECT``, and the loop halves ``dt``. A
step that converged with an old Jacobian is checked along the direction it moved
(:meth:`DiagonallyImplicitRungeKutta._stale_contraction`: the iteration's
contraction on ``Delta u`` from the field's secant at fixed ``t``, one evaluation
of ``f``); above ``jac_refresh_theta`` the step is redone with ``J`` at ``u``, since
the ratio of successive Newton updates cannot see a slow direction the updates
never took (after Van der Pol's fast transition such stages were off by tens of
tolerances, invisible to the embedded estimate built from the same stages). A
solve where the Newton matrix is singular at every ``dt`` ends with
``DtLessThanMin`` naming ``t`` and ``dt``.

Host transfers: one per Newton iteration (the norm of the update, which
decides convergence); a singular or non-finite matrix is detected from a
non-finite update, so the matrix's status is read only on that failure path.

Gradients (``DirectAdjoint``): by default Newton runs without a graph and each
converged stage is attached by the implicit function theorem (:class:`_StageAdjoint`:
the backward pass solves ``(I - h gamma J(Y*))^T w = g`` with the exact Jacobian at
the stage point), so the saved memory does not grow with the Newton iterations and
the gradient is that of the exact stage solution; ``newton_gradient="unrolled"``
backpropagates through the iterations instead.

Tableaus are validated at construction (:class:`ImplicitTableau`): row sums
equal ``c``, a constant implicit diagonal, and every Butcher order condition
(all rooted trees) up to the method's order for the propagated weights and
the embedded order for the embedded ones.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ._device import host_time
from .controllers import AbstractController, PIController
from .interpolation import HermiteInterpolant, linear_combination
from .jacobian import AbstractStiffSolver, StiffCounters, StiffState
from .norms import rms_norm
from .solvers import StepResult, StepStatus, _stage_times, as_step_times, time_add
from ..core.validation import check_choice
from .tableau import TableauError
from .terms import as_bound_term

__all__ = ["ImplicitTableau", "rk_order_residuals", "DiagonallyImplicitRungeKutta", "ImplicitEuler", "TRBDF2",
           "Kvaerno5", "IMPLICIT_EULER_TABLEAU", "TRBDF2_TABLEAU", "KVAERNO5_TABLEAU"]

_TOL = 1e-10
#: the Newton iteration stops when eta * ||dz|| <= KAPPA (scaled norm; Hairer & Wanner IV.8, OrdinaryDiffEq)
KAPPA = 0.01
#: the LU of I - h gamma J is kept while h gamma stays within this relative distance of the one it was
#: formed with. The simplified Newton iteration with M_W = I - h_W gamma J on the system of I - h gamma J
#: contracts its error by M_W^{-1} (h - h_W) gamma J = delta (h_W gamma J)(I - h_W gamma J)^{-1}, of norm at
#: most delta = |h - h_W| / |h_W| for a normal J with spectrum in the left half-plane (|z| <= |1 - z| there):
#: the converged stages are unchanged, Newton costs no visible extra iteration, and the fixed steps of a
#: time grid (equal up to rounding) or the controller's held dt share one factorisation.
W_REUSE_RTOL = 1e-3


# --- order conditions on rooted trees --------------------------------------------------------------
def _attach_leaf(tree: tuple):
    yield tuple(sorted(tree + ((),)))
    for i, child in enumerate(tree):
        for grown in _attach_leaf(child):
            yield tuple(sorted(tree[:i] + (grown,) + tree[i + 1:]))


@lru_cache(maxsize=None)
def rooted_trees(n: int) -> tuple:
    """All rooted trees with ``n`` nodes, each a sorted tuple of its children's subtrees."""
    if n == 1:
        return ((),)
    return tuple(sorted({grown for tree in rooted_trees(n - 1) for grown in _attach_leaf(tree)}))


def _size(tree) -> int:
    return 1 + sum(_size(c) for c in tree)


def _density(tree) -> int:
    out = _size(tree)
    for c in tree:
        out *= _density(c)
    return out


def _weights(tree, A: np.ndarray) -> np.ndarray:
    phi = np.ones(A.shape[0])
    for c in tree:
        phi = phi * (A @ _weights(c, A))
    return phi


def rk_order_residuals(A: np.ndarray, b: np.ndarray, order: int) -> dict:
    """``b . Phi(t) - 1/gamma(t)`` for every rooted tree ``t`` with at most ``order`` nodes (Butcher's
    order conditions), keyed by the tree."""
    return {tree: float(b @ _weights(tree, A) - 1.0 / _density(tree))
            for n in range(1, order + 1) for tree in rooted_trees(n)}


@dataclass(frozen=True)
class ImplicitTableau:
    """A diagonally implicit Runge–Kutta tableau, validated at construction.

    Args:
        name: for messages.
        c: stage times.
        a: the lower triangle *with* the diagonal, row ``i`` holding ``a_i0 .. a_ii``.
        b: propagated weights; ``b_embedded``: embedded weights (error = ``sum (b - b_embedded)_i z_i``).
        order, embedded_order: the orders the weights must reach (all trees checked).

    Raises:
        TableauError: row sums differing from ``c``, a non-constant implicit diagonal, or a violated
            order condition (the tree is named).
    """

    name: str
    c: tuple
    a: tuple
    b: tuple
    b_embedded: tuple
    order: int
    embedded_order: int

    def __post_init__(self) -> None:
        name, s = self.name, len(self.c)
        if len(self.a) != s or len(self.b) != s or len(self.b_embedded) != s:
            raise TableauError(f"tableau {name!r}: a, b and b_embedded must match the {s} stages")
        A = np.zeros((s, s))
        for i, row in enumerate(self.a):
            if len(row) != i + 1:
                raise TableauError(f"tableau {name!r}: row {i} of a must hold {i + 1} entries (with the diagonal)")
            A[i, :i + 1] = row
        if np.abs(A.sum(1) - np.array(self.c)).max() > _TOL * 100:
            raise TableauError(f"tableau {name!r}: the row sums of a {A.sum(1).tolist()} differ from c = {list(self.c)}")
        diagonal = [A[i, i] for i in range(s) if A[i, i] != 0.0]
        if not diagonal or max(diagonal) - min(diagonal) > _TOL or (A[0, 0] == 0.0 and len(diagonal) != s - 1):
            raise TableauError(f"tableau {name!r}: the implicit stages must share one diagonal gamma > 0 "
                               f"(got diagonal {np.diag(A).tolist()})")
        for weights, p, what in ((self.b, self.order, "b"), (self.b_embedded, self.embedded_order, "b_embedded")):
            bad = {t: r for t, r in rk_order_residuals(A, np.array(weights, dtype=float), p).items()
                   if abs(r) > _TOL * 100}
            if bad:
                raise TableauError(f"tableau {name!r}: the weights {what} violate order conditions of order <= {p} "
                                   f"for the trees {list(bad)} (residuals {list(bad.values())})")

    @property
    def gamma(self) -> float:
        return max(row[-1] for row in self.a)

    @property
    def explicit_first(self) -> bool:
        return self.a[0][0] == 0.0

    @property
    def stiffly_accurate(self) -> bool:
        return self.c[-1] == 1.0 and all(abs(x - y) <= _TOL for x, y in zip(self.a[-1], self.b))


IMPLICIT_EULER_TABLEAU = ImplicitTableau("ImplicitEuler", c=(1.0,), a=((1.0,),), b=(1.0,), b_embedded=(1.0,),
                                         order=1, embedded_order=1)

# TR-BDF2 as an ESDIRK (Hosea & Shampine, "Analysis and implementation of TR-BDF2", Appl. Numer. Math.
# 20 (1996)): gamma = 2 - sqrt 2 (the trapezoidal stage ends at t + gamma h), d = gamma / 2,
# w = sqrt 2 / 4; the embedded weights are of order 3.
_G = 2.0 - math.sqrt(2.0)
_W = math.sqrt(2.0) / 4.0
_DG = _G / 2.0
TRBDF2_TABLEAU = ImplicitTableau(
    "TRBDF2", c=(0.0, _G, 1.0), a=((0.0,), (_DG, _DG), (_W, _W, _DG)), b=(_W, _W, _DG),
    b_embedded=((1.0 - _W) / 3.0, (3.0 * _W + 1.0) / 3.0, _DG / 3.0), order=2, embedded_order=3)

# Kværnø, "Singly diagonally implicit Runge-Kutta methods with an explicit first stage", BIT 44 (2004):
# the 7-stage, stiffly accurate, L-stable 5(4) ESDIRK; the embedded solution is the sixth stage.
_K = 0.26
_K61 = (0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676, _K)
_K71 = (0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046, 0.62993304899016403,
        0.06962479448202728, _K)
KVAERNO5_TABLEAU = ImplicitTableau(
    "Kvaerno5",
    c=(0.0, 0.52, 1.230333209967908, 0.8957659843500759, 0.43639360985864756, 1.0, 1.0),
    a=((0.0,), (_K, _K), (0.13, 0.84033320996790809, _K),
       (0.22371961478320505, 0.47675532319799699, -0.06470895363112615, _K),
       (0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998, _K),
       _K61, _K71),
    b=_K71, b_embedded=_K61 + (0.0,), order=5, embedded_order=4)


class _StageAdjoint(torch.autograd.Function):
    r"""The implicit-function-theorem gradient of one stage solve ``G(z, x) = z - h f(psi + gamma z, t_i) = 0``.

    Applied to the residual ``r = G(z*, x)`` evaluated *with* its graph at the converged (detached)
    ``z*``, it returns zeros (so ``z* - apply(r)`` has the value ``z*``) and its backward maps the
    cotangent ``g`` to ``(dG/dz)^{-T} g`` with the exact ``dG/dz = I - h gamma J(psi + gamma z*)``,
    formed and factorised once per backward pass. Autograd then carries on through ``r``'s graph:

    .. math::
        \bar x = -\big(\partial G/\partial x\big)^T (\partial G/\partial z)^{-T}\,\bar z
                = \big(dz^*/dx\big)^T \bar z,

    the implicit function theorem, exact at ``z*`` whatever Newton iteration (and Newton matrix)
    found it. Once differentiable (the backward forms ``J`` without a graph); a backward pass
    with ``create_graph=True`` raises.
    """

    @staticmethod
    def forward(ctx, r, term, y_star, f_star, t_i, hgamma, evaluator):
        ctx.term, ctx.evaluator, ctx.hgamma = term, evaluator, hgamma
        ctx.save_for_backward(y_star, f_star, t_i)
        return torch.zeros_like(r)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise RuntimeError("the implicit stage gradient of an ESDIRK solve is once differentiable "
                               "(backward with create_graph=True): construct the solver with "
                               "newton_gradient='unrolled' for higher derivatives")
        y_star, f_star, t_i = ctx.saved_tensors
        counters = StiffCounters()  # the forward solve's statistics are final by now
        lin = ctx.evaluator(ctx.term, y_star, t_i, f_star, counters, need_dfdt=False)
        return lin.factor(ctx.hgamma, counters).solve_transpose(g), None, None, None, None, None, None


class _NewtonFailure:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class DiagonallyImplicitRungeKutta(AbstractStiffSolver):
    """The generic (E)SDIRK stepper with a simplified Newton iteration (see the module docstring).

    Args:
        jac, jac_structure, krylov_rtol: the Jacobian (:mod:`pylux.diffeq.jacobian`).
        max_newton_iters: Newton iterations per stage before the stage fails (default 10).
        jac_refresh_theta: a Newton contraction ``theta`` above this marks the Jacobian for
            recomputation at the next step (default 0.3).
        newton_gradient: how backpropagation (``DirectAdjoint``) crosses a stage solve.
            ``"implicit"`` (default): Newton runs without a graph and each converged stage ``z*`` is
            attached by the implicit function theorem (:class:`_StageAdjoint`): one evaluation of ``f``
            with its graph per stage, and in the backward pass one Jacobian and LU at the stage point;
            the saved memory is one evaluation of ``f`` per stage, whatever the number of Newton
            iterations, and the gradient is exact for the stage equation at ``z*``. ``"unrolled"``:
            backpropagation through every Newton iteration (the Jacobian keeps its graph); its
            gradient is that of the iteration that was run, which differs from the implicit one by
            the Newton tolerance, and its memory grows with the iterations.

    Dense output: the cubic Hermite interpolant through ``(u, f(u))`` and
    ``(u_new, f(u_new))`` (third order); ``f(u_new)`` is the last stage's
    derivative for a stiffly accurate method (FSAL: no extra evaluation).
    """

    tableau: ImplicitTableau

    def __init__(self, *, jac="auto", jac_structure: str = "auto", krylov_rtol: float = 1e-7,
                 max_newton_iters: int = 10, jac_refresh_theta: float = 0.3,
                 newton_gradient: str = "implicit") -> None:
        super().__init__(jac=jac, jac_structure=jac_structure, krylov_rtol=krylov_rtol)
        owner = type(self).__name__
        if isinstance(max_newton_iters, bool) or not isinstance(max_newton_iters, int) or max_newton_iters < 1:
            raise ValueError(f"{owner}: max_newton_iters must be an int >= 1, got {max_newton_iters!r}")
        if not (isinstance(jac_refresh_theta, (int, float)) and 0 < jac_refresh_theta < 1):
            raise ValueError(f"{owner}: jac_refresh_theta must be in (0, 1), got {jac_refresh_theta!r}")
        self.max_newton_iters = max_newton_iters
        self.jac_refresh_theta = float(jac_refresh_theta)
        self.newton_gradient = check_choice(owner, "newton_gradient", newton_gradient, ("implicit", "unrolled"))
        self._tolerances = (1e-6, 1e-3, rms_norm)

    def _key(self) -> tuple:
        return super()._key() + (self.max_newton_iters, self.jac_refresh_theta, self.newton_gradient)

    def bind_options(self, options) -> "DiagonallyImplicitRungeKutta":
        bound = copy.copy(self)
        bound._tolerances = (options.abstol, options.reltol, options.norm)
        return bound

    def default_controller(self) -> AbstractController:
        # hold dt when it would shrink by less than 20%: the LU of I - h gamma J stays valid (OrdinaryDiffEq)
        return PIController.for_order(self.order, qsteady_max=1.2)

    # --- the Newton iteration of one stage ----------------------------------------------------
    def _newton(self, term, psi, z, t_i, h, W, state: StiffState):
        """``(z, theta_max)`` at convergence, or a :class:`_NewtonFailure`."""
        abstol, reltol, norm = self._tolerances
        gamma = self.tableau.gamma
        counters = state.counters
        eta = max(state.eta, 1e-16) ** 0.8
        ndz_prev = None
        theta_max = 0.0
        for k in range(self.max_newton_iters):
            Y = linear_combination(psi, (z,), (gamma,))
            G = linear_combination(z, (term.vf(Y, t_i),), (-h,))
            dz = W.solve(G)
            z = z - dz
            counters.nnonliniter += 1
            scale = abstol + reltol * Y.detach().abs()
            ndz = float(norm(dz.detach() / scale))  # the iteration's one host read
            if not math.isfinite(ndz):
                # a singular or non-finite matrix shows here (its LU solve is not finite): no read per stage
                if not bool(W.ok):
                    return _NewtonFailure("the Newton matrix I - h*gamma*J is singular or not finite")
                return _NewtonFailure(f"the Newton update was NaN/Inf at iteration {k + 1}")
            if ndz_prev is not None:
                theta = ndz / ndz_prev if ndz_prev > 0 else 0.0
                theta_max = max(theta_max, theta)
                if theta >= 1.0:
                    return _NewtonFailure(f"Newton diverged (contraction {theta:.3g} >= 1 at iteration {k + 1})")
                eta = theta / (1.0 - theta)
                left = self.max_newton_iters - k - 1
                if eta * ndz > KAPPA and theta ** left / (1.0 - theta) * ndz > KAPPA:
                    return _NewtonFailure(f"Newton converges too slowly (contraction {theta:.3g}) to reach the "
                                          f"tolerance in the {left} iterations left")
            if eta * ndz <= KAPPA or ndz == 0.0:
                state.eta = eta
                return z, theta_max
            ndz_prev = ndz
        return _NewtonFailure(f"Newton did not converge in {self.max_newton_iters} iterations")

    def _reject(self, state, f0, lin, W, t, h, why: str, nfe: int, u) -> StepResult:
        state.counters.nnonlinconvfail += 1
        retry = StiffState(f0, state.counters, state.evaluator, lin, W, 1.0, state.eigen_estimate, True)
        reason = f"{type(self).__name__} at t = {host_time(t)!r}, dt = {h!r}: {why}"
        # the loop measures every trial's error before reading its status: a zero estimate, never used
        return StepResult(u, torch.zeros_like(u), solver_state_new=retry, nfe=nfe, solver_state_retry=retry,
                          status=StepStatus.REJECT, reason=reason)

    def step(self, term, t, u, dt, state):
        term = as_bound_term(term)
        t, dt = as_step_times(t, dt, u)
        tab = self.tableau
        h = host_time(dt)
        gamma = tab.gamma
        hg = h * gamma
        nf_start = getattr(term, "count", 0)
        f0 = state.f_at_u
        if f0 is None:
            f0 = term.vf(u, t)
        lin, W, current = state.lin, state.newton, state.jac_current
        with self._newton_graph():
            if lin is None:
                lin, W, current = state.evaluator(term, u, t, f0, state.counters, need_dfdt=False), None, True
            if W is None or abs(hg - W.hgamma) > W_REUSE_RTOL * abs(hg):
                W = lin.factor(hg, state.counters)
        times = _stage_times(t, dt, tab.c)
        work = StiffState(f0, state.counters, state.evaluator, lin, W, state.eta, state.eigen_estimate, current)
        outcome = self._stages(term, times, u, f0, h, work, t)
        if not isinstance(outcome, _NewtonFailure) and not work.jac_current:
            drift = self._stale_contraction(term, t, u, f0, outcome[0], h, work)
            if drift > self.jac_refresh_theta:
                # the old Jacobian does not describe the step's direction: its stages may be wrong by more
                # than Newton measured, so the step is redone with J at u
                with self._newton_graph():
                    self._refresh(term, work, t, u, f0, h)
                work.eta = 1.0
                outcome = self._stages(term, times, u, f0, h, work, t)
        if isinstance(outcome, _NewtonFailure):
            return self._reject(state, f0, work.lin, work.newton, t, h, outcome.reason,
                                getattr(term, "count", 0) - nf_start, u)
        Z, theta_max = outcome
        u_new = linear_combination(u, Z, tab.b)
        if tab.stiffly_accurate:
            f_new = Z[-1] / h
        else:
            f_new = term.vf(u_new, time_add(t, dt))
        error = self._error(Z, f0, h)
        keep = theta_max <= self.jac_refresh_theta
        estimate = work.lin.norm_inf()
        stages = (f0, f_new, u, u_new)
        if estimate is None:
            from .integrate import stiffness_estimate
            estimate = stiffness_estimate(stages)
        new_state = StiffState(f_new, state.counters, state.evaluator, work.lin if keep else None,
                               work.newton if keep else None, work.eta, estimate, False)
        retry = StiffState(f0, state.counters, state.evaluator, work.lin, work.newton, work.eta,
                           state.eigen_estimate, work.jac_current)
        return StepResult(u_new, error, dense_info=HermiteInterpolant(u, u_new, f0, f_new, h),
                          solver_state_new=new_state, nfe=getattr(term, "count", 0) - nf_start, du_new=f_new,
                          stiffness_stages=stages, solver_state_retry=retry)

    def _stages(self, term, times, u, f0, h, work: StiffState, t):
        """``(Z, theta_max)``: the stage increments of one step and the largest Newton contraction, or
        the first stage's :class:`_NewtonFailure`."""
        tab = self.tableau
        Z: list[torch.Tensor] = []
        theta_max = 0.0
        for i in range(len(tab.c)):
            if i == 0 and tab.explicit_first:
                Z.append(f0 * h)
                continue
            psi = linear_combination(u, Z, tab.a[i][:i]) if Z else u
            guess = Z[-1] if Z else f0 * h
            with self._newton_graph():
                outcome = self._stage(term, psi, guess, times[i], h, work, t, u, f0)
            if isinstance(outcome, _NewtonFailure):
                return outcome
            z, theta = outcome
            if self.newton_gradient == "implicit" and torch.is_grad_enabled() and (
                    psi.requires_grad or f0.requires_grad):
                z = self._attach(term, psi, z, times[i], h, work)
            theta_max = max(theta_max, theta)
            Z.append(z)
        return Z, theta_max

    def _newton_graph(self):
        """The context of the Newton iteration and its linear algebra: no graph unless unrolled."""
        return torch.no_grad() if self.newton_gradient == "implicit" else contextlib.nullcontext()

    def _attach(self, term, psi, z, t_i, h, work: StiffState) -> torch.Tensor:
        """The converged stage ``z`` (value unchanged) with the implicit-function-theorem gradient:
        ``z - A(r)`` for the residual ``r = z - h f(psi + gamma z, t_i)`` evaluated with its graph at the
        detached ``z`` and ``A`` = :class:`_StageAdjoint`. A field without a graph to its inputs leaves
        ``z`` detached (nothing to differentiate)."""
        z = z.detach()
        gamma = self.tableau.gamma
        y = linear_combination(psi, (z,), (gamma,))
        fy = term.vf(y, t_i)
        if not fy.requires_grad:
            return z
        r = linear_combination(z, (fy,), (-h,))
        t_d = t_i.detach() if isinstance(t_i, torch.Tensor) else t_i
        return z - _StageAdjoint.apply(r, term, y.detach(), fy.detach(), t_d, h * gamma, work.evaluator)

    def _stale_contraction(self, term, t, u, f0, Z, h, work: StiffState) -> float:
        r"""The simplified Newton iteration's contraction along the step, for a Jacobian ``J_W`` formed
        at an earlier point:

        .. math::
            q = \big\| (I - h\gamma J_W)^{-1} h\gamma \big(f(u + \Delta u, t) - f(u, t)
                - J_W \Delta u\big) \big\| \,/\, \|\Delta u\|, \qquad \Delta u = \sum_i b_i z_i,

        the contraction factor ``(I - h gamma J_W)^{-1} h gamma (Jbar - J_W)`` of a stage iterate's
        error, applied to ``Delta u``, with the secant ``Jbar Delta u`` of the field along the step at
        the fixed time ``t`` (so a time-dependent field does not look like a stale Jacobian). The ratio
        ``theta`` of two successive Newton updates measures the contraction only in the directions the
        updates took: after a fast transition (Van der Pol, mu = 1000) a Jacobian kept from inside the
        transition contracts by ~0.998 along the slow manifold while the first updates, in the fast
        direction, show theta ~ 0.06; the stages are accepted with errors of tens of tolerances that the
        embedded estimate, built from the same stages, does not see. The step itself moves along the
        slow manifold, so ``q`` exposes it. Cost: one evaluation of ``f``, one product with ``J_W`` and
        one solve, without a graph (the value is only compared with ``jac_refresh_theta``).
        """
        abstol, reltol, norm = self._tolerances
        with torch.no_grad():
            du = linear_combination(None, Z, self.tableau.b).detach()
            x = u.detach()
            scale = abstol + reltol * x.abs()
            ndu = float(norm(du / scale))
            if not math.isfinite(ndu) or ndu == 0.0:
                return 0.0
            secant = term.vf(x + du, t) - f0.detach()
            miss = linear_combination(secant, (work.lin.matvec(du),), (-1.0,))
            q = float(norm(work.newton.solve(miss * (h * self.tableau.gamma)) / scale)) / ndu
        return q if math.isfinite(q) else math.inf

    def _stage(self, term, psi, guess, t_i, h, work: StiffState, t, u, f0):
        """One stage's Newton solve; with an old Jacobian, a failure (slow convergence, divergence, a
        singular matrix) recomputes it and tries once more."""
        outcome = self._newton(term, psi, guess, t_i, h, work.newton, work)
        if isinstance(outcome, _NewtonFailure) and not work.jac_current:
            self._refresh(term, work, t, u, f0, h)
            work.eta = 1.0
            outcome = self._newton(term, psi, guess, t_i, h, work.newton, work)
        return outcome

    def _refresh(self, term, work: StiffState, t, u, f0, h) -> None:
        work.lin = work.evaluator(term, u, t, f0, work.counters, need_dfdt=False)
        work.newton = work.lin.factor(h * self.tableau.gamma, work.counters)
        work.jac_current = True

    def _error(self, Z, f0, h):
        tab = self.tableau
        return linear_combination(None, Z, [bi - ei for bi, ei in zip(tab.b, tab.b_embedded)])


class ImplicitEuler(DiagonallyImplicitRungeKutta):
    r"""Backward Euler, ``u_new = u + h f(u_new, t + h)``: order 1, L-stable.

    Adaptive with the error estimate ``h/2 (f(u_new) - f(u))``, the difference
    with the trapezoidal rule (``~ h^2 u''/2``, the leading local error; no
    extra evaluation: ``f(u_new) = z/h`` from the converged stage).
    OrdinaryDiffEq's ``ImplicitEuler`` estimates the same ``h^2 u''/2`` from a
    second divided difference of the last three states instead.
    Args: as :class:`DiagonallyImplicitRungeKutta`.
    """

    tableau = IMPLICIT_EULER_TABLEAU
    order = 1
    error_order = 1
    interpolation_order = 3

    def _error(self, Z, f0, h):
        return linear_combination(None, (Z[0], f0), (0.5, -0.5 * h))


class TRBDF2(DiagonallyImplicitRungeKutta):
    """TR-BDF2 (Bank et al. 1985; Hosea & Shampine 1996): a trapezoidal stage to ``t + (2 - sqrt 2) h``
    then BDF2, written as a 3-stage ESDIRK; order 2, L-stable, stiffly accurate, with the embedded
    third-order weights of Hosea & Shampine for the error estimate. Args: as
    :class:`DiagonallyImplicitRungeKutta`."""

    tableau = TRBDF2_TABLEAU
    order = 2
    error_order = 2
    interpolation_order = 3


class Kvaerno5(DiagonallyImplicitRungeKutta):
    """Kværnø's 7-stage ESDIRK 5(4) (BIT 44, 2004): L-stable, stiffly accurate, ``gamma = 0.26``, the
    embedded fourth-order solution is the sixth stage. Six Newton solves per step with one LU. Args: as
    :class:`DiagonallyImplicitRungeKutta`."""

    tableau = KVAERNO5_TABLEAU
    order = 5
    error_order = 4
    interpolation_order = 3
