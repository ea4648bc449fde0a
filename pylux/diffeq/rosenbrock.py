r"""Rosenbrock (linearly implicit) methods: one LU per step, no Newton iteration.

An ``s``-stage Rosenbrock method (Hairer & Wanner, *Solving ODEs II*, IV.7)
with ``K_i`` the stage increments is

.. math::
    (I - h\gamma J) K_i = h f\Big(t + \alpha_i h,\ u + \sum_{j<i} \alpha_{ij} K_j\Big)
        + h J \sum_{j<i} \gamma_{ij} K_j + \gamma_i h^2 f_t, \qquad
    u_{new} = u + \sum_i b_i K_i,

with ``J = df/du(u, t)``, ``f_t = df/dt(u, t)``, ``alpha_i = sum_j alpha_ij`` and
``gamma_i = gamma + sum_j gamma_ij``. The steppers run the transformed form
(HW IV.7, eq. (7.25)) with ``U = Gamma K``, which needs no product with ``J``:

.. math::
    (I - h\gamma J) U_i = h\gamma \Big[f(t + c_i h, u + \sum_{j<i} a_{ij} U_j)
        + \sum_{j<i} \frac{C_{ij}}{h} U_j + d_i h f_t\Big], \qquad
    u_{new} = u + \sum_i m_i U_i,

``a = alpha Gamma^{-1}``, ``C = diag(1/gamma) - Gamma^{-1}``, ``m = b Gamma^{-1}``.
The Newton matrix ``I - h gamma J`` is formed and factorised once per step
(:mod:`pylux.diffeq.jacobian`); a rejected step retried from the same point
reuses its Jacobian and only refactorises.

A tableau is validated at construction (:class:`RosenbrockTableau`): the
stage times and time weights must be the row sums of ``alpha`` and ``Gamma``,
the propagated and embedded weights must satisfy the order conditions of HW
Table IV.7.1 (all trees up to order 4) and the conditions of the linear test
equation ``b^T B^k 1 = 1/(k+1)!`` (``B = alpha + Gamma``) up to the method's
order, and an L-stable method must have ``R(inf) = 1 - b^T B^{-1} 1 = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ._device import host_time
from .integrate import stiffness_estimate
from .interpolation import AbstractInterpolant, HermiteInterpolant, linear_combination
from .jacobian import AbstractStiffSolver, JacobianConfig, StiffState
from .solvers import StepResult, StepStatus, _stage_times, as_step_times, step_scale
from .tableau import TableauError
from .terms import as_bound_term

__all__ = ["RosenbrockTableau", "rosenbrock_order_residuals", "Rosenbrock23", "Rodas5P",
           "ROSENBROCK23_TABLEAU", "RODAS5P_TABLEAU"]

_TOL = 1e-10


def rosenbrock_order_residuals(alpha: np.ndarray, Gamma: np.ndarray, b: np.ndarray, order: int) -> dict:
    """Residuals of the Rosenbrock order conditions (HW Table IV.7.1) up to ``min(order, 4)``, and of the
    linear conditions ``b^T B^k 1 - 1/(k+1)!`` for ``k < order``; keys name the condition."""
    gamma = Gamma[0, 0]
    L = np.tril(alpha + Gamma, -1)
    a_row = alpha.sum(1)
    bp = L.sum(1)
    g = gamma
    conditions = {
        1: {"sum b = 1": b.sum() - 1},
        2: {"sum b beta' = 1/2 - g": b @ bp - (0.5 - g)},
        3: {"sum b alpha^2 = 1/3": b @ a_row ** 2 - 1 / 3,
            "sum b beta beta' = 1/6 - g + g^2": b @ L @ bp - (1 / 6 - g + g * g)},
        4: {"sum b alpha^3 = 1/4": b @ a_row ** 3 - 0.25,
            "sum b alpha alpha beta' = 1/8 - g/3": b @ (a_row * (alpha @ bp)) - (1 / 8 - g / 3),
            "sum b beta alpha^2 = 1/12 - g/3": b @ L @ a_row ** 2 - (1 / 12 - g / 3),
            "sum b beta beta beta' = 1/24 - g/2 + 3g^2/2 - g^3": b @ L @ L @ bp - (1 / 24 - g / 2 + 1.5 * g * g - g ** 3)},
    }
    out = {}
    for p in range(1, min(order, 4) + 1):
        out.update(conditions[p])
    B = L + g * np.eye(len(b))
    ones = np.ones(len(b))
    power = ones
    for k in range(order):
        out[f"b^T B^{k} 1 = 1/{k + 1}!"] = b @ power - 1 / math.factorial(k + 1)
        power = B @ power
    return out


def _lower(rows: Sequence[Sequence[float]], s: int, name: str, what: str) -> np.ndarray:
    if len(rows) != s:
        raise TableauError(f"tableau {name!r}: {what} needs {s} rows (row i holds the i entries left of the "
                           f"diagonal), got {len(rows)}")
    out = np.zeros((s, s))
    for i, row in enumerate(rows):
        if len(row) != i:
            raise TableauError(f"tableau {name!r}: row {i} of {what} must hold {i} entries, got {len(row)}")
        out[i, :i] = [float(x) for x in row]
    return out


@dataclass(frozen=True)
class RosenbrockTableau:
    """A Rosenbrock method in transformed form (see the module docstring), validated at construction.

    Args:
        name: for messages.
        gamma: the diagonal ``gamma``.
        a: rows of the strictly lower ``a_ij`` (row ``i`` holds ``i`` entries).
        C: rows of the strictly lower ``C_ij``.
        c: stage times ``c_i = alpha_i``.
        d: time-derivative weights ``d_i = gamma_i``.
        m: weights of the propagated solution.
        m_embedded: weights of the embedded solution (the error estimate is ``sum (m - m_embedded)_i U_i``).
        order, embedded_order: the orders the weights must reach (checked).
        l_stable: check ``R(inf) = 0`` for the propagated solution.

    Raises:
        TableauError: a shape mismatch, or a violated consistency or order condition (named).
    """

    name: str
    gamma: float
    a: tuple
    C: tuple
    c: tuple
    d: tuple
    m: tuple
    m_embedded: tuple
    order: int
    embedded_order: int
    l_stable: bool = True
    alpha: np.ndarray = field(init=False, repr=False, compare=False)
    Gamma: np.ndarray = field(init=False, repr=False, compare=False)
    rhs_weights: tuple = field(init=False, repr=False, compare=False)
    time_weights: tuple = field(init=False, repr=False, compare=False)
    error_weights: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        name, s = self.name, len(self.c)
        if len(self.d) != s or len(self.m) != s or len(self.m_embedded) != s:
            raise TableauError(f"tableau {name!r}: c, d, m and m_embedded must all have {s} entries")
        A = _lower(self.a, s, name, "a")
        C = _lower(self.C, s, name, "C")
        gamma = float(self.gamma)
        if not gamma > 0:
            raise TableauError(f"tableau {name!r}: gamma must be > 0, got {gamma}")
        Gamma = np.linalg.inv(np.eye(s) / gamma - C)
        alpha = A @ Gamma
        c, d = np.array(self.c, dtype=float), np.array(self.d, dtype=float)
        if np.abs(alpha.sum(1) - c).max() > _TOL * 100:
            raise TableauError(f"tableau {name!r}: the stage times c = {c.tolist()} are not the row sums of alpha "
                               f"= a Gamma ({alpha.sum(1).tolist()})")
        if np.abs(Gamma.sum(1) - d).max() > _TOL * 100:
            raise TableauError(f"tableau {name!r}: the time weights d = {d.tolist()} are not the row sums of Gamma "
                               f"({Gamma.sum(1).tolist()})")
        for weights, p, what in ((self.m, self.order, "m"), (self.m_embedded, self.embedded_order, "m_embedded")):
            b = np.array(weights, dtype=float) @ Gamma
            bad = {k: v for k, v in rosenbrock_order_residuals(alpha, Gamma, b, p).items() if abs(v) > _TOL * 100}
            if bad:
                raise TableauError(f"tableau {name!r}: the weights {what} do not reach order {p}: violated "
                                   f"conditions {bad}")
        if self.l_stable:
            b = np.array(self.m, dtype=float) @ Gamma
            B = np.tril(alpha + Gamma, -1) + gamma * np.eye(s)
            r_inf = 1 - b @ np.linalg.solve(B, np.ones(s))
            if abs(r_inf) > _TOL * 100:
                raise TableauError(f"tableau {name!r}: declared L-stable but R(inf) = {r_inf!r}")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "Gamma", Gamma)
        # the steppers' per-stage weights as host floats, computed once: gamma C_ij, gamma d_i, m - m_embedded
        object.__setattr__(self, "rhs_weights", tuple(tuple(gamma * float(x) for x in row) for row in self.C))
        object.__setattr__(self, "time_weights", tuple(gamma * float(x) for x in self.d))
        object.__setattr__(self, "error_weights", tuple(float(x) - float(y) for x, y in zip(self.m, self.m_embedded)))

    @classmethod
    def from_standard(cls, name: str, alpha, Gamma, b, b_embedded, order: int, embedded_order: int,
                      l_stable: bool = True) -> "RosenbrockTableau":
        """The transformed form of a method given by ``alpha`` (strictly lower), ``Gamma`` (lower, constant
        diagonal) and the weights ``b``, ``b_embedded``."""
        alpha, Gamma = np.array(alpha, dtype=float), np.array(Gamma, dtype=float)
        s = len(b)
        Gi = np.linalg.inv(Gamma)
        gamma = Gamma[0, 0]
        A = alpha @ Gi
        C = np.eye(s) / gamma - Gi
        return cls(name=name, gamma=gamma, a=tuple(tuple(A[i, :i]) for i in range(s)),
                   C=tuple(tuple(C[i, :i]) for i in range(s)), c=tuple(alpha.sum(1)), d=tuple(Gamma.sum(1)),
                   m=tuple(np.array(b, dtype=float) @ Gi), m_embedded=tuple(np.array(b_embedded, dtype=float) @ Gi),
                   order=order, embedded_order=embedded_order, l_stable=l_stable)


# --- Rosenbrock23 ---------------------------------------------------------------------------------
# Shampine & Reichelt, "The MATLAB ODE suite", SIAM J. Sci. Comput. 18 (1997): d = 1/(2 + sqrt 2),
# e32 = 6 + sqrt 2. As a Rosenbrock method (K = h k): alpha_21 = 1/2, gamma_21 = -d, b = (0, 1).
_D23 = 1.0 / (2.0 + math.sqrt(2.0))
_E32 = 6.0 + math.sqrt(2.0)
ROSENBROCK23_TABLEAU = RosenbrockTableau.from_standard(
    "Rosenbrock23", alpha=[[0, 0], [0.5, 0]], Gamma=[[_D23, 0], [-_D23, _D23]], b=[0, 1], b_embedded=[1, 0],
    order=2, embedded_order=1)

# --- Rodas5P ----------------------------------------------------------------------------------------
# Steinebach, "Construction of Rosenbrock-Wanner method Rodas5P and numerical benchmarks within the
# Julia Differential Equations package", BIT 63 (2023), in the transformed form of OrdinaryDiffEq.jl.
# The last stage's increment U_8 is the error estimate: the propagated solution includes it (order 5),
# the embedded one (u + sum_{j<8} m_j U_j, the eighth stage's argument) does not (order 4).
_RODAS5P_A = (
    (),
    (3.0,),
    (2.849394379747939, 0.45842242204463923),
    (-6.954028509809101, 2.489845061869568, -10.358996098473584),
    (2.8029986275628964, 0.5072464736228206, -0.3988312541770524, -0.04721187230404641),
    (-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256, 0.030198172008377946),
    (-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256, 0.030198172008377946,
     1.0),
    (-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256, 0.030198172008377946,
     1.0, 1.0),
)
_RODAS5P_C = (
    (),
    (-14.155112264123755,),
    (-17.97296035885952, -2.859693295451294),
    (147.12150275711716, -1.41221402718213, 71.68940251302358),
    (165.43517024871676, -0.4592823456491126, 42.90938336958603, -5.961986721573306),
    (24.854864614690072, -3.0009227002832186, 47.4931110020768, 5.5814197821558125, -0.6610691825249471),
    (30.91273214028599, -3.1208243349937974, 77.79954646070892, 34.28646028294783, -19.097331116725623,
     -28.087943162872662),
    (37.80277123390563, -3.2571969029072276, 112.26918849496327, 66.9347231244047, -40.06618937091002,
     -54.66780262877968, -9.48861652309627),
)
RODAS5P_TABLEAU = RosenbrockTableau(
    name="Rodas5P", gamma=0.21193756319429014, a=_RODAS5P_A, C=_RODAS5P_C,
    c=(0.0, 0.6358126895828704, 0.4095798393397535, 0.9769306725060716, 0.4288403609558664, 1.0, 1.0, 1.0),
    d=(0.21193756319429014, -0.42387512638858027, -0.3384627126235924, 1.8046452872882734, 2.325825639765069,
       0.0, 0.0, 0.0),
    m=_RODAS5P_A[7] + (1.0,),
    m_embedded=_RODAS5P_A[7] + (0.0,),
    order=5, embedded_order=4)


class _Rosenbrock23Interpolant(AbstractInterpolant):
    """Shampine–Reichelt's free interpolant: ``u + h [theta(1-theta)/(1-2d) k1 + theta(theta-2d)/(1-2d) k2]``
    (second order, ends at ``u_new = u + h k2``)."""

    __slots__ = ("u", "h", "k1", "k2")

    def __init__(self, u, h, k1, k2) -> None:
        self.u, self.h, self.k1, self.k2 = u, h, k1, k2

    def evaluate(self, thetas):
        scale = self.h / (1.0 - 2.0 * _D23)
        rows = [linear_combination(self.u, (self.k1, self.k2),
                                   (scale * th * (1.0 - th), scale * th * (th - 2.0 * _D23))) for th in thetas]
        return torch.stack(rows)


def _status(W):
    """The step status as a 0-d tensor (fetched with the error norm: no extra synchronisation)."""
    return (~W.ok).to(torch.int64) * int(StepStatus.REJECT)


def _distinct_stage_times(t: torch.Tensor, dt: torch.Tensor, c) -> list[torch.Tensor]:
    """``t + c_i dt`` for every stage and, last, ``t + dt``: one time tensor per distinct ``c_i`` (Rodas5P's
    last three stages share ``t + dt``), from one transfer; ``c_i = 0`` is ``t`` itself."""
    distinct = sorted({ci for ci in c if ci != 0.0} | {1.0})
    made = dict(zip(distinct, _stage_times(t, dt, distinct)))
    made[0.0] = t
    return [made[ci] for ci in c] + [made[1.0]]


class _RosenbrockBase(AbstractStiffSolver):
    """Shared by the Rosenbrock steppers: the linearisation at ``(u, t)`` (reused on a retry from the same point).

    A Rosenbrock step has no iteration and no host decision inside it, so it traces: under
    ``solve(..., compile=True)`` the whole adaptive loop (Jacobian, factorisation, stages, error norm,
    controller) runs as one compiled graph (:mod:`pylux.diffeq.captured`); ``step_counts`` gives the
    evaluations of ``f`` and the linear solves of one trial step, which the compiled loop cannot count.
    """

    #: the compiled whole-loop path runs this method (a capability, :func:`pylux.diffeq.captured.capture_refusal`)
    captures_whole_loop = True
    #: (evaluations of f, linear solves) of one step with f(u, t) known, besides its linearisation
    step_counts = (0, 0)

    def __init__(self, *, jac: Any = "auto", jac_structure: str = "auto", krylov_rtol: float = 1e-7,
                 tgrad: Callable | None = None) -> None:
        super().__init__(jac=jac, jac_structure=jac_structure, krylov_rtol=krylov_rtol)
        self.jacobian = JacobianConfig(type(self).__name__, jac, jac_structure, krylov_rtol, tgrad=tgrad)

    def _start(self, term, t, u, dt, state: StiffState):
        """The common start of a step: times, ``f(u, t)`` (FSAL when known) and the linearisation at
        ``(u, t)``, reused when retrying from the same point."""
        term = as_bound_term(term)
        t, dt = as_step_times(t, dt, u)
        nfe = 0
        f0 = state.f_at_u
        if f0 is None:
            f0, nfe = term.vf(u, t), 1
        lin = state.lin
        if lin is None or lin.u is not u:
            lin = state.evaluator(term, u, t, f0, state.counters, need_dfdt=True)
        return term, t, dt, step_scale(dt), f0, nfe, lin

    def _result(self, u, u_new, h, W, lin, state, f0, f_new, dense, error, nfe, t, dt) -> StepResult:
        stages = (f0, f_new, u, u_new)
        estimate = lin.norm_inf()
        new_state = state.advanced(f_new, estimate if estimate is not None else stiffness_estimate(stages))
        reason = None if torch.compiler.is_compiling() else (
            f"the Newton matrix I - h*gamma*J of {type(self).__name__} is singular or not finite at "
            f"t = {host_time(t)!r}, dt = {h!r} (check the Jacobian; a user jac must return df/du)")
        return StepResult(u_new, error, dense_info=dense, solver_state_new=new_state, nfe=nfe, du_new=f_new,
                          stiffness_stages=stages, solver_state_retry=state.retry(f0, lin),
                          status=_status(W), reason=reason)


class Rosenbrock23(_RosenbrockBase):
    r"""Shampine & Reichelt's Rosenbrock 2(3) method (MATLAB's ``ode23s``; OrdinaryDiffEq's ``Rosenbrock23``).

    With ``d = 1/(2 + sqrt 2)``, ``e32 = 6 + sqrt 2`` and ``W = I - h d J``::

        F0 = f(u, t)                       k1 = W^{-1} (F0 + h d f_t)
        F1 = f(u + h k1 / 2, t + h / 2)    k2 = W^{-1} (F1 - k1) + k1
        u_new = u + h k2                   F2 = f(u_new, t + h)
        k3 = W^{-1} (F2 - e32 (k2 - F1) - 2 (k1 - F0) + h d f_t)
        err = h / 6 (k1 - 2 k2 + k3)

    L-stable, second order (a W-method: the order holds for any ``J``), with a
    third-order error estimate and the free second-order interpolant
    ``u + h [theta(1-theta) k1 + theta(theta-2d) k2] / (1-2d)``. ``F2`` is the next
    step's ``F0`` (FSAL): two evaluations of ``f``, one Jacobian, one LU and three
    triangular solves per step. Shampine & Reichelt, "The MATLAB ODE suite", SIAM
    J. Sci. Comput. 18 (1997). Robust at loose tolerances (1e-2 … 1e-5).

    Args:
        jac, jac_structure, krylov_rtol: how ``J`` is formed and solved with
            (:mod:`pylux.diffeq.jacobian`): ``jac="auto"`` (``torch.func``),
            ``"autodiff"``, ``"finite_difference"`` or ``jac(u, p, t)``;
            ``jac_structure="auto"``, ``"dense"``, ``"batched"`` (a ``(B, d)`` state of
            independent samples) or ``"matrix_free"`` (GMRES on JVPs).
        tgrad: ``tgrad(u, p, t)`` returning ``df/dt`` in ``u``'s shape (zeros for an autonomous
            field), as DifferentialEquations.jl's ``ODEFunction(tgrad=...)``: saves the one evaluation of
            ``f`` per Jacobian that the difference in ``t`` costs. Default: autodiff or that difference.

    ``sol.stats`` gains ``njac``, ``nw``, ``nsolve`` (see :class:`~pylux.diffeq.jacobian.StiffCounters`).
    """

    tableau = ROSENBROCK23_TABLEAU
    order = 2
    error_order = 2
    interpolation_order = 2
    step_counts = (2, 3)

    def step(self, term, t, u, dt, state):
        term, t, dt, h, f0, nfe, lin = self._start(term, t, u, dt, state)
        hd = h * _D23
        W = lin.factor(hd, state.counters)
        T = lin.dfdt
        t_half, t_new = _stage_times(t, dt, (0.5, 1.0))
        k1 = W.solve(linear_combination(f0, (T,), (hd,)))
        F1 = term.vf(linear_combination(u, (k1,), (0.5 * h,)), t_half)
        k2 = W.solve(F1 - k1) + k1
        u_new = linear_combination(u, (k2,), (h,))
        F2 = term.vf(u_new, t_new)
        nfe += 2
        k3 = W.solve(linear_combination(F2, (k2, F1, k1, f0, T), (-_E32, _E32, -2.0, 2.0, hd)))
        error = linear_combination(None, (k1, k2, k3), (h / 6.0, -h / 3.0, h / 6.0))
        dense = _Rosenbrock23Interpolant(u, h, k1, k2)
        return self._result(u, u_new, h, W, lin, state, f0, F2, dense, error, nfe, t, dt)


class Rodas5P(_RosenbrockBase):
    r"""Steinebach's Rodas5P: an 8-stage, L-stable, stiffly accurate Rosenbrock method of order 5(4).

    Runs the transformed form of the module docstring with the coefficients of
    Steinebach, "Construction of Rosenbrock–Wanner method Rodas5P and numerical
    benchmarks within the Julia Differential Equations package", BIT Numer.
    Math. 63 (2023). The last stage's increment is the error estimate. Seven
    new evaluations of ``f``, one Jacobian (plus ``f_t``), one LU and eight
    triangular solves per step; ``f(u_new)`` is evaluated for the dense output
    (the cubic Hermite interpolant, third order, as in diffrax) and reused as
    the next step's first stage. Accurate at tight tolerances (1e-6 … 1e-12);
    not a W-method: it needs the exact Jacobian for order 5.

    Args: as :class:`Rosenbrock23`.
    """

    tableau = RODAS5P_TABLEAU
    order = 5
    error_order = 4
    interpolation_order = 3
    step_counts = (8, 8)

    def step(self, term, t, u, dt, state):
        term, t, dt, h, f0, nfe, lin = self._start(term, t, u, dt, state)
        tab = self.tableau
        hg = h * tab.gamma
        W = lin.factor(hg, state.counters)
        T = lin.dfdt
        times = _distinct_stage_times(t, dt, tab.c)
        C, tdw = tab.rhs_weights, tab.time_weights
        U: list[torch.Tensor] = []
        for i in range(len(tab.c)):
            if i == 0:
                F = f0
            else:
                F = term.vf(linear_combination(u, U, tab.a[i]), times[i])
                nfe += 1
            if tdw[i] != 0.0:
                rhs = linear_combination(None, (F, *U, T), (hg, *C[i], tdw[i] * h * h))
            else:
                rhs = linear_combination(None, (F, *U), (hg, *C[i]))
            U.append(W.solve(rhs))
        u_new = linear_combination(u, U, tab.m)
        f_new = term.vf(u_new, times[-1])
        nfe += 1
        error = linear_combination(None, U, tab.error_weights)
        dense = HermiteInterpolant(u, u_new, f0, f_new, h)
        return self._result(u, u_new, h, W, lin, state, f0, f_new, dense, error, nfe, t, dt)
