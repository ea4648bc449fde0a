r"""Adaptive stochastic Runge–Kutta methods of strong order 1.5: Rößler's SRI and SRA families.

Two classes of explicit methods, each a validated tableau driving one generic
stepper (as :class:`~pylux.diffeq.tableau.ButcherTableau` drives the ODE
methods), with the embedded error estimate of Rackauckas & Nie (2017), so that
they run on the shared adaptive loop:

* **SRI** — Itô SDEs with diagonal or scalar noise: :class:`SRIW1` (Rößler
  2010, the SRI method DifferentialEquations.jl calls SRIW1) and :class:`SOSRI`
  (stability-optimized, Rackauckas & Nie 2020).
* **SRA** — additive noise, ``g(t)`` independent of ``u`` (Itô and
  Stratonovich coincide): :class:`SRA1` (Rößler 2010) and :class:`SOSRA`
  (Rackauckas & Nie 2020).

The step (Rößler 2010, in the notation of Rackauckas & Nie 2017)
-----------------------------------------------------------------
Over ``[t, t + h]`` with ``ΔW`` and the space-time Lévy area ``ΔH`` of the step
(``ΔH = (1/h)∫_t^{t+h}(W_r - W_t) dr - ΔW/2``, see
:mod:`pylux.diffeq.brownian`), each entry driven by its own Brownian motion
(one for all with scalar noise), the iterated Itô integrals are

.. math::
    \frac{I_{(1,0)}}{h} = ΔH + \frac{ΔW}{2}, \qquad
    \frac{I_{(1,1)}}{\sqrt{|h|}} = \frac{ΔW^2 - |h|}{2\sqrt{|h|}}, \qquad
    \frac{I_{(1,1,1)}}{h} = \frac{ΔW^3 - 3|h|\,ΔW}{6h},

(:math:`I_{(1,0)} = \int_t^{t+h}(W_r - W_t)\,dr`). With stage drifts
:math:`f_j = f(H^{(0)}_j, t + c^{(0)}_j h)` and diffusions
:math:`g_j = g(H^{(1)}_j, t + c^{(1)}_j h)`, an ``s``-stage **SRI** method is

.. math::
    H^{(0)}_i &= u + h \sum_{j<i} A^{(0)}_{ij} f_j + \frac{I_{(1,0)}}{h} \sum_{j<i} B^{(0)}_{ij} g_j, \\
    H^{(1)}_i &= u + h \sum_{j<i} A^{(1)}_{ij} f_j + \sqrt{|h|} \sum_{j<i} B^{(1)}_{ij} g_j, \\
    u_{n+1} &= u + h \sum_i α_i f_i + \sum_i \Bigl(β^{(1)}_i ΔW + β^{(2)}_i \frac{I_{(1,1)}}{\sqrt{|h|}}
              + β^{(3)}_i \frac{I_{(1,0)}}{h} + β^{(4)}_i \frac{I_{(1,1,1)}}{h}\Bigr) g_i,

all products elementwise. An **SRA** method has one set of stages and the
diffusion at the stage times only,

.. math::
    H_i = u + h \sum_{j<i} A^{(0)}_{ij} f_j + \sum_{j<i} B^{(0)}_{ij}\, g_j \frac{I_{(1,0)}}{h}, \qquad
    u_{n+1} = u + h \sum_i α_i f_i + \sum_i g_i \Bigl(β^{(1)}_i ΔW + β^{(2)}_i \frac{I_{(1,0)}}{h}\Bigr),

with :math:`f_i = f(H_i, t + c^{(0)}_i h)`, :math:`g_i = g(u, t + c^{(1)}_i h)`;
every noise product goes through the term's own product, so an additive
``g`` of shape ``(*u.shape, m)`` (``noise_dim=m``) works too.

The error estimate (Rackauckas & Nie 2017, "natural embedding")
----------------------------------------------------------------
Dropping the :math:`β^{(3)}, β^{(4)}` terms of an SRI method (the
:math:`β^{(2)}` terms of an SRA method) leaves a method of strong order 1.0, so
the dropped terms estimate the noise part of the local error at no extra cost,
and a drift part is added, weighted by ``delta``:

.. math::
    E_N = \Bigl|\sum_i \bigl(β^{(3)}_i \tfrac{I_{(1,0)}}{h} + β^{(4)}_i \tfrac{I_{(1,1,1)}}{h}\bigr) g_i\Bigr|
    \quad\Bigl(\text{SRA: } \Bigl|\sum_i β^{(2)}_i g_i \tfrac{I_{(1,0)}}{h}\Bigr|\Bigr), \qquad
    E_D = \Bigl|h \sum_{i \le e} f_i\Bigr|, \qquad
    E = δ\, E_D + E_N,

elementwise, where ``e`` is the tableau's ``error_stages`` (the stages with
distinct drift evaluations, the choice of StochasticDiffEq.jl, where
Rackauckas & Nie implemented the estimator) and ``δ = 1/6`` by default (its
default). The loop scales ``E`` by ``abstol + reltol·max(|u|, |u_new|)``
and accepts a step whose RMS norm is at most 1; a rejected step re-queries
the same Brownian path (a :class:`~pylux.diffeq.brownian.BrownianTree`), which
is what the rejection sampling with memory of that paper achieves for a path
that cannot be re-queried.

Both parts are of first order in ``h``: ``E_N`` is the difference to the
order-1.0 embedding, and ``E_D`` is the size of the drift increment itself
(not an asymptotic estimate of the drift's local error), so that it limits the
step to about ``tol / (δ |f|)`` where the drift dominates. These methods
therefore declare ``error_order = 1`` (the strong order of the embedded
method, what an :class:`~pylux.diffeq.controllers.IController` uses) and
``order = 1.5``, which sets the PI controller's gains and the initial step.

References
----------
* A. Rößler, "Runge–Kutta methods for the strong approximation of solutions of
  stochastic differential equations", SIAM J. Numer. Anal. 48(3), 922–952 (2010).
* C. Rackauckas & Q. Nie, "Adaptive methods for stochastic differential
  equations via natural embeddings and rejection sampling with memory",
  Discrete Contin. Dyn. Syst. Ser. B 22(7), 2731–2761 (2017).
* C. Rackauckas & Q. Nie, "Stability-optimized high order methods and stiffness
  detection for pathwise stiff stochastic differential equations", IEEE HPEC
  (2020), arXiv:1804.04344.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

import torch

from ._device import host_time, time_scalar
from .interpolation import linear_combination
from .sde import INTERPRETATIONS, AbstractSDESolver, LinearInterpolant
from .solvers import AbstractAdaptiveSolver, StepResult, as_step_times, step_scale
from .tableau import TableauError
from .terms import as_bound_term

__all__ = ["SRITableau", "SRATableau", "SRI", "SRA", "SRIW1", "SOSRI", "SRA1", "SOSRA",
           "SRIW1_TABLEAU", "SOSRI_TABLEAU", "SRA1_TABLEAU", "SOSRA_TABLEAU"]

# Row sums (c = A e) hold to rounding; the order conditions of the decimal
# (optimized) tableaus hold to ~1e-15 and involve coefficients up to ~20.
_ROW_SUM_TOL = 1e-12
_ORDER_TOL = 1e-10


# --- tableaus -------------------------------------------------------------------------------

def _vector(values, what: str, name: str, s: int | None = None) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise TableauError(f"tableau {name!r}: {what} must be a sequence of numbers ({err})") from None
    if s is not None and len(out) != s:
        raise TableauError(f"tableau {name!r}: {what} has {len(out)} entries but there are {s} stages")
    return out


def _lower(rows, what: str, name: str, s: int) -> tuple[tuple[float, ...], ...]:
    """A strictly lower triangular matrix given by its rows (row ``i`` holds ``i`` entries)."""
    try:
        rows = list(rows)
    except TypeError:
        raise TableauError(f"tableau {name!r}: {what} must be a sequence of rows") from None
    if len(rows) != s:
        raise TableauError(f"tableau {name!r}: {what} has {len(rows)} rows but there are {s} stages")
    out = []
    for i, row in enumerate(rows):
        row = _vector(row, f"row {i} of {what}", name)
        if len(row) != i:
            raise TableauError(f"tableau {name!r}: row {i} of {what} must hold the {i} entries left of the "
                               f"diagonal (explicit method), got {len(row)}")
        out.append(row)
    return tuple(out)


def _mat_vec(rows, v) -> list[float]:
    return [sum(a * x for a, x in zip(r, v)) for r in rows]


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def _check_row_sums(name: str, what: str, rows, c, cname: str) -> None:
    for i, (row, ci) in enumerate(zip(rows, c)):
        if abs(sum(row) - ci) > _ROW_SUM_TOL * max(1.0, abs(ci)):
            raise TableauError(f"tableau {name!r}: row {i} of {what} sums to {sum(row)!r} but {cname}[{i}] = "
                               f"{ci!r}; the row sums of {what} must equal {cname}")


def _check_conditions(name: str, family: str, conditions) -> None:
    for number, (text, value, target) in enumerate(conditions, start=1):
        if not abs(value - target) <= _ORDER_TOL:
            raise TableauError(f"tableau {name!r}: {family} order condition {number}, {text} = {target:g}, is "
                               f"violated (it is {value!r}); the method would not have strong order 1.5 — "
                               "check the coefficients")


@dataclass(frozen=True)
class SRITableau:
    r"""An explicit SRI tableau of Rößler (2010) for Itô SDEs with diagonal or scalar noise.

    Args:
        name: used in error messages.
        c0, c1: the stage times of the drift and diffusion stages.
        A0, A1, B0, B1: strictly lower triangular ``s x s`` matrices given by
            their rows (row ``i`` holds the ``i`` entries left of the diagonal).
        alpha: the drift weights; beta1 .. beta4: the weights of
            :math:`ΔW`, :math:`I_{(1,1)}/\sqrt h`, :math:`I_{(1,0)}/h`,
            :math:`I_{(1,1,1)}/h` (module docstring).
        error_stages: how many leading stages' drifts the drift error
            estimate :math:`E_D = |h \sum_{i \le e} f_i|` sums.

    Validation (raises :class:`~pylux.diffeq.tableau.TableauError`): the
    shapes, ``c0 = A0 e`` and ``c1 = A1 e`` (row sums), and all 25 strong
    order 1.5 conditions of Rößler (2010) for scalar noise (which give order
    1.5 for diagonal noise as well), with ``e = (1, …, 1)`` and squares taken
    elementwise:

    1–5. :math:`α^T e = 1`, :math:`β^{(1)T} e = 1`, :math:`β^{(2)T} e = β^{(3)T} e = β^{(4)T} e = 0`;
    6–9. :math:`β^{(k)T} B^{(1)} e = 0, 1, 0, 0` for ``k = 1..4``;
    10–12. :math:`α^T A^{(0)} e = 1/2`, :math:`α^T B^{(0)} e = 1`, :math:`α^T (B^{(0)} e)^2 = 3/2`;
    13–16. :math:`β^{(k)T} A^{(1)} e = 1, 0, -1, 0`;
    17–20. :math:`β^{(k)T} (B^{(1)} e)^2 = 1, 0, -1, 2`;
    21–24. :math:`β^{(k)T} B^{(1)} B^{(1)} e = 0, 0, 0, 1`;
    25. :math:`\tfrac12 β^{(1)T} A^{(1)} B^{(0)} e + \tfrac13 β^{(3)T} A^{(1)} B^{(0)} e = 0`.
    """

    name: str
    c0: tuple
    c1: tuple
    A0: tuple
    A1: tuple
    B0: tuple
    B1: tuple
    alpha: tuple
    beta1: tuple
    beta2: tuple
    beta3: tuple
    beta4: tuple
    error_stages: int = field(default=-1)

    def __post_init__(self) -> None:
        name = self.name
        alpha = _vector(self.alpha, "alpha", name)
        s = len(alpha)
        if s == 0:
            raise TableauError(f"tableau {name!r}: at least one stage is required")
        vec = {k: _vector(getattr(self, k), k, name, s) for k in ("c0", "c1", "beta1", "beta2", "beta3", "beta4")}
        mat = {k: _lower(getattr(self, k), k, name, s) for k in ("A0", "A1", "B0", "B1")}
        _check_row_sums(name, "A0", mat["A0"], vec["c0"], "c0")
        _check_row_sums(name, "A1", mat["A1"], vec["c1"], "c1")
        error_stages = s if self.error_stages == -1 else self.error_stages
        if isinstance(error_stages, bool) or not isinstance(error_stages, int) or not 1 <= error_stages <= s:
            raise TableauError(f"tableau {name!r}: error_stages must be an int in 1..{s}, got {self.error_stages!r}")
        A0, A1, B0, B1 = (_square(mat[k]) for k in ("A0", "A1", "B0", "B1"))
        b1, b2, b3, b4 = (vec[k] for k in ("beta1", "beta2", "beta3", "beta4"))
        e = [1.0] * s
        A0e, A1e, B0e, B1e = (_mat_vec(m, e) for m in (A0, A1, B0, B1))
        B0e2, B1e2 = [x * x for x in B0e], [x * x for x in B1e]
        B1B1e, A1B0e = _mat_vec(B1, B1e), _mat_vec(A1, B0e)
        betas = (("beta1", b1), ("beta2", b2), ("beta3", b3), ("beta4", b4))
        conditions = [("sum(alpha)", sum(alpha), 1.0)]
        conditions += [(f"sum({k})", sum(b), t) for (k, b), t in zip(betas, (1.0, 0.0, 0.0, 0.0))]
        conditions += [(f"{k} . (B1 e)", _dot(b, B1e), t) for (k, b), t in zip(betas, (0.0, 1.0, 0.0, 0.0))]
        conditions += [("alpha . (A0 e)", _dot(alpha, A0e), 0.5), ("alpha . (B0 e)", _dot(alpha, B0e), 1.0),
                       ("alpha . (B0 e)^2", _dot(alpha, B0e2), 1.5)]
        conditions += [(f"{k} . (A1 e)", _dot(b, A1e), t) for (k, b), t in zip(betas, (1.0, 0.0, -1.0, 0.0))]
        conditions += [(f"{k} . (B1 e)^2", _dot(b, B1e2), t) for (k, b), t in zip(betas, (1.0, 0.0, -1.0, 2.0))]
        conditions += [(f"{k} . (B1 B1 e)", _dot(b, B1B1e), t) for (k, b), t in zip(betas, (0.0, 0.0, 0.0, 1.0))]
        conditions += [("beta1 . (A1 B0 e) / 2 + beta3 . (A1 B0 e) / 3",
                        0.5 * _dot(b1, A1B0e) + _dot(b3, A1B0e) / 3.0, 0.0)]
        _check_conditions(name, "SRI", conditions)
        for k, v in vec.items():
            object.__setattr__(self, k, v)
        for k, m in mat.items():
            object.__setattr__(self, k, m)
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "error_stages", error_stages)

    @property
    def stages(self) -> int:
        return len(self.alpha)


@dataclass(frozen=True)
class SRATableau:
    r"""An explicit SRA tableau of Rößler (2010) for SDEs with additive noise.

    Args:
        name: used in error messages.
        c0, c1: the stage times of the drift and of the diffusion.
        A0, B0: strictly lower triangular ``s x s`` matrices given by their rows.
        alpha: the drift weights; beta1, beta2: the weights of ``ΔW`` and
            :math:`I_{(1,0)}/h` (module docstring).
        error_stages: how many leading stages' drifts :math:`E_D` sums.

    Validation (raises :class:`~pylux.diffeq.tableau.TableauError`): the
    shapes, ``c0 = A0 e`` and the 8 strong order 1.5 conditions of Rößler
    (2010) for additive noise: :math:`α^T e = 1`, :math:`β^{(1)T} e = 1`,
    :math:`β^{(2)T} e = 0`, :math:`α^T B^{(0)} e = 1`,
    :math:`α^T A^{(0)} e = 1/2`, :math:`α^T (B^{(0)} e)^2 = 3/2`,
    :math:`β^{(1)T} c^{(1)} = 1`, :math:`β^{(2)T} c^{(1)} = -1`.
    """

    name: str
    c0: tuple
    c1: tuple
    A0: tuple
    B0: tuple
    alpha: tuple
    beta1: tuple
    beta2: tuple
    error_stages: int = field(default=-1)

    def __post_init__(self) -> None:
        name = self.name
        alpha = _vector(self.alpha, "alpha", name)
        s = len(alpha)
        if s == 0:
            raise TableauError(f"tableau {name!r}: at least one stage is required")
        vec = {k: _vector(getattr(self, k), k, name, s) for k in ("c0", "c1", "beta1", "beta2")}
        mat = {k: _lower(getattr(self, k), k, name, s) for k in ("A0", "B0")}
        _check_row_sums(name, "A0", mat["A0"], vec["c0"], "c0")
        error_stages = s if self.error_stages == -1 else self.error_stages
        if isinstance(error_stages, bool) or not isinstance(error_stages, int) or not 1 <= error_stages <= s:
            raise TableauError(f"tableau {name!r}: error_stages must be an int in 1..{s}, got {self.error_stages!r}")
        e = [1.0] * s
        A0e, B0e = _mat_vec(_square(mat["A0"]), e), _mat_vec(_square(mat["B0"]), e)
        b1, b2, c1 = vec["beta1"], vec["beta2"], vec["c1"]
        _check_conditions(name, "SRA", [
            ("sum(alpha)", sum(alpha), 1.0), ("sum(beta1)", sum(b1), 1.0), ("sum(beta2)", sum(b2), 0.0),
            ("alpha . (B0 e)", _dot(alpha, B0e), 1.0), ("alpha . (A0 e)", _dot(alpha, A0e), 0.5),
            ("alpha . (B0 e)^2", _dot(alpha, [x * x for x in B0e]), 1.5),
            ("beta1 . c1", _dot(b1, c1), 1.0), ("beta2 . c1", _dot(b2, c1), -1.0)])
        for k, v in vec.items():
            object.__setattr__(self, k, v)
        for k, m in mat.items():
            object.__setattr__(self, k, m)
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "error_stages", error_stages)

    @property
    def stages(self) -> int:
        return len(self.alpha)


def _square(rows) -> list[list[float]]:
    s = len(rows)
    return [list(r) + [0.0] * (s - len(r)) for r in rows]


def _fr(*values) -> tuple[Fraction, ...]:
    return tuple(Fraction(v) for v in values)


# SRIW1: Rößler (2010), the SRI scheme of weak order 2 named SRIW1 in DifferentialEquations.jl.
# Stages 3 and 4 have empty drift rows at c0 = 0, so their drift is f(u, t) (two distinct drift
# evaluations); the drift error estimate sums those two (Rackauckas & Nie 2017).
SRIW1_TABLEAU = SRITableau(
    name="SRIW1",
    c0=_fr(0, Fraction(3, 4), 0, 0),
    c1=_fr(0, Fraction(1, 4), 1, Fraction(1, 4)),
    A0=((), _fr(Fraction(3, 4)), _fr(0, 0), _fr(0, 0, 0)),
    A1=((), _fr(Fraction(1, 4)), _fr(1, 0), _fr(0, 0, Fraction(1, 4))),
    B0=((), _fr(Fraction(3, 2)), _fr(0, 0), _fr(0, 0, 0)),
    B1=((), _fr(Fraction(1, 2)), _fr(-1, 0), _fr(-5, 3, Fraction(1, 2))),
    alpha=_fr(Fraction(1, 3), Fraction(2, 3), 0, 0),
    beta1=_fr(-1, Fraction(4, 3), Fraction(2, 3), 0),
    beta2=_fr(-1, Fraction(4, 3), Fraction(-1, 3), 0),
    beta3=_fr(2, Fraction(-4, 3), Fraction(-2, 3), 0),
    beta4=_fr(-2, Fraction(5, 3), Fraction(-2, 3), 1),
    error_stages=2,
)

# SOSRI: Rackauckas & Nie (2020), the stability-optimized SRI method (decimals as published with
# StochasticDiffEq.jl, where the same table is also called SRIOpt1).
SOSRI_TABLEAU = SRITableau(
    name="SOSRI",
    c0=(0.0, -0.04199224421316468, 0.7898405466170333, 3.7504010171562823),
    c1=(0.0, 0.26204282091330466, 0.05879875232001766, 0.758661169101175),
    A0=((), (-0.04199224421316468,), (2.842612915017106, -2.0527723684000727),
        (4.338237071435815, -2.8895936137439793, 2.3017575594644466)),
    A1=((), (0.26204282091330466,), (0.20903646383505375, -0.1502377115150361),
        (0.05836595312746999, 0.6149440396332373, 0.08535117634046772)),
    B0=((), (-0.21641093549612528,), (1.5336352863679572, 0.26066223492647056),
        (-1.0536037558179159, 1.7015284721089472, -0.20725685784180017)),
    B1=((), (-0.5119011827621657,), (2.67767339866713, -4.9395031322250995),
        (0.15580956238299215, 3.2361551006624674, -1.4223118283355949)),
    alpha=(1.140099274172029, -0.6401334255743456, 0.4736296532772559, 0.026404498125060714),
    beta1=(-1.8453464565104432, 2.688764531100726, -0.2523866501071323, 0.40896857551684956),
    beta2=(0.4969658141589478, -0.5771202869753592, -0.12919702470322217, 0.2093514975196336),
    beta3=(2.8453464565104425, -2.688764531100725, 0.2523866501071322, -0.40896857551684945),
    beta4=(0.11522663875443433, -0.57877086147738, 0.2857851028163886, 0.17775911990655704),
    error_stages=4,
)

# SRA1: Rößler (2010), the two-stage SRA scheme.
SRA1_TABLEAU = SRATableau(
    name="SRA1",
    c0=_fr(0, Fraction(3, 4)),
    c1=_fr(1, 0),
    A0=((), _fr(Fraction(3, 4))),
    B0=((), _fr(Fraction(3, 2))),
    alpha=_fr(Fraction(1, 3), Fraction(2, 3)),
    beta1=_fr(1, 0),
    beta2=_fr(-1, 1),
    error_stages=2,
)

# SOSRA: Rackauckas & Nie (2020), the stability-optimized three-stage SRA method.
SOSRA_TABLEAU = SRATableau(
    name="SOSRA",
    c0=(0.0, 0.6923962376159507, 1.0),
    c1=(0.0, 0.041248171110700504, 1.0),
    A0=((), (0.6923962376159507,), (-3.1609142252828395, 4.1609142252828395)),
    B0=((), (1.3371632704399763,), (1.442371048468624, 1.8632741501139225)),
    alpha=(0.2889874966892885, 0.6859880440839937, 0.025024459226717772),
    beta1=(-16.792534242221663, 17.514995785380226, 0.27753845684143835),
    beta2=(0.4237535769069274, 0.6010381474428539, -1.0247917243497813),
    error_stages=3,
)


# --- the steppers ---------------------------------------------------------------------------

class _Plan:
    """Which stage fields a step evaluates, derived once from a tableau.

    ``f_eval[i]``: evaluate the drift of stage ``i`` (its value is used by a
    weight, a later stage or the error estimate); ``f_from[i]``: the earlier
    stage whose drift it equals (same stage value and time), or ``None``.
    Likewise ``g_eval``/``g_from`` for the diffusion.
    """

    __slots__ = ("f_eval", "f_from", "g_eval", "g_from")

    def __init__(self, f_eval, f_from, g_eval, g_from) -> None:
        self.f_eval, self.f_from, self.g_eval, self.g_from = f_eval, f_from, g_eval, g_from


def _used(i: int, weights: Sequence[Sequence[float]], later: Sequence[Sequence[Sequence[float]]]) -> bool:
    return any(w[i] != 0.0 for w in weights) or any(
        len(row) > i and row[i] != 0.0 for rows in later for row in rows)


def _same_stage(i: int, rows: Sequence[Sequence[Sequence[float]]], c: Sequence[float]) -> int | None:
    """``0`` when stage ``i``'s value is ``u`` at the first stage's time (its rows are empty), else ``None``."""
    if i > 0 and c[i] == c[0] and all(all(x == 0.0 for x in r[i]) for r in rows):
        return 0
    return None


@functools.lru_cache(maxsize=None)
def _sri_plan(tab: SRITableau) -> _Plan:
    s = tab.stages
    err = [[1.0 if i < tab.error_stages else 0.0 for i in range(s)]]
    f_eval = [_used(i, [tab.alpha] + err, [tab.A0, tab.A1]) for i in range(s)]
    g_eval = [_used(i, [tab.beta1, tab.beta2, tab.beta3, tab.beta4], [tab.B0, tab.B1]) for i in range(s)]
    f_from = [_same_stage(i, (tab.A0, tab.B0), tab.c0) for i in range(s)]
    g_from = [_same_stage(i, (tab.A1, tab.B1), tab.c1) for i in range(s)]
    return _Plan(f_eval, f_from, g_eval, g_from)


@functools.lru_cache(maxsize=None)
def _sra_plan(tab: SRATableau) -> _Plan:
    s = tab.stages
    err = [[1.0 if i < tab.error_stages else 0.0 for i in range(s)]]
    f_eval = [_used(i, [tab.alpha] + err, [tab.A0]) for i in range(s)]
    g_eval = [_used(i, [tab.beta1, tab.beta2], [tab.B0]) for i in range(s)]
    f_from = [_same_stage(i, (tab.A0, tab.B0), tab.c0) for i in range(s)]
    # the diffusion of additive noise depends on time only: stages at one time share it
    g_from = [next((j for j in range(i) if tab.c1[j] == tab.c1[i] and g_eval[j]), None) for i in range(s)]
    return _Plan(f_eval, f_from, g_eval, g_from)


class _StageTimes:
    """``t + c h`` as time tensors, one per distinct ``c`` (host arithmetic in eager mode)."""

    __slots__ = ("t", "dt", "h", "_cache")

    def __init__(self, t: torch.Tensor, dt: torch.Tensor) -> None:
        self.t, self.dt = t, dt
        self.h = None if torch.compiler.is_compiling() else (host_time(t), host_time(dt))
        self._cache: dict[float, torch.Tensor] = {}

    def __call__(self, c: float) -> torch.Tensor:
        if c == 0.0:
            return self.t
        out = self._cache.get(c)
        if out is None:
            if self.h is None:
                out = self.t + c * self.dt
            else:
                out = time_scalar(self.h[0] + c * self.h[1], self.t.dtype, self.t.device)
            self._cache[c] = out
        return out


def _combo(base, tensors: Sequence, coeffs: Sequence[float], scale=1.0):
    """``base + scale * sum_j coeffs[j] tensors[j]`` over the nonzero coefficients (``base`` may be ``None``;
    the result is ``None`` when there is neither a base nor a nonzero coefficient)."""
    pairs = [(x, c) for x, c in zip(tensors, coeffs) if c != 0.0]
    if not pairs:
        return base
    return linear_combination(base, [x for x, _ in pairs], [c * scale for _, c in pairs])


def _noise(term, gs: Sequence, coeffs: Sequence[float], increment):
    """``term.part_prod(1, sum_j coeffs[j] g_j, increment)``, or ``None`` when every coefficient is zero."""
    combo = _combo(None, gs, coeffs)
    return None if combo is None else term.part_prod(1, combo, increment)


def _add(base, *pieces):
    """``base`` plus the pieces that are not ``None``."""
    for piece in pieces:
        if piece is not None:
            base = piece if base is None else base + piece
    return base


def _check_delta(owner: str, delta) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"{owner}: delta must be a finite number >= 0 (the weight of the drift error "
                         f"estimate), got {delta!r}")
    return float(delta)


def _scales(dt: torch.Tensor, like: torch.Tensor):
    """``(h, |h|, sqrt|h|)``: host floats in eager mode, device values when compiling."""
    h = step_scale(dt)
    if isinstance(h, torch.Tensor):
        h = h.to(like.dtype)
        return h, h.abs(), h.abs().sqrt()
    return h, abs(h), math.sqrt(abs(h))


def _error_fn(delta: float, drift_error, noise_error, like: torch.Tensor):
    """``E = delta |E_D| + |E_N|`` on demand (written into ``out`` when the loop gives a workspace)."""
    def error_fn(out):
        if drift_error is None and noise_error is None:
            return torch.zeros_like(like) if out is None else out.zero_()
        if drift_error is None:
            return torch.abs(noise_error, out=out) if out is not None else noise_error.abs()
        scaled = torch.mul(drift_error.abs(), delta, out=out) if out is not None else drift_error.abs() * delta
        if noise_error is None:
            return scaled
        return scaled.add_(noise_error.abs()) if out is not None else scaled + noise_error.abs()
    return error_fn


class _StochasticRungeKutta(AbstractSDESolver, AbstractAdaptiveSolver):
    """What the SRI and SRA steppers share: order metadata, ``delta``, the result."""

    order = 1.5
    error_order = 1
    strong_order = 1.5
    needs_levy_area = True
    interpolation_order = 1
    _default_tableau = None
    #: the subclass is one named method (its tableau is not an argument)
    _fixed = False

    def _setup(self, tableau, delta, kind) -> None:
        owner = type(self).__name__
        if tableau is None:
            tableau = type(self)._default_tableau
        if not isinstance(tableau, kind):
            raise TypeError(f"{owner}: tableau must be an {kind.__name__}, got {type(tableau).__name__}")
        self.tableau = tableau
        self.delta = _check_delta(owner, delta)

    def _result(self, u, u_new, drift_error, noise_error, nfe, drift_stages) -> StepResult:
        error_fn = _error_fn(self.delta, drift_error, noise_error, u)
        error = None
        if torch.compiler.is_compiling():
            error, error_fn = error_fn(None), None
        # Shampine's stiffness estimate from the last two drift stages (the drift's Lipschitz constant along
        # the step), as the ODE methods record it, so StiffnessRegularization works on SDE solves too
        stiffness = None
        if len(drift_stages) >= 2:
            (k_prev, y_prev), (k_last, y_last) = drift_stages[-2], drift_stages[-1]
            stiffness = (k_prev, k_last, y_prev, y_last)
        return StepResult(u_new, error, dense_info=LinearInterpolant(u, u_new), nfe=nfe, error_fn=error_fn,
                          stiffness_stages=stiffness)

    def __repr__(self) -> str:
        args = [] if type(self)._fixed else [f"tableau={self.tableau.name}"]
        if self.delta != 1.0 / 6.0:
            args.append(f"delta={self.delta!r}")
        return f"{type(self).__name__}({', '.join(args)})"


class SRI(_StochasticRungeKutta):
    r"""An explicit SRI method of Rößler (2010): Itô SDEs with diagonal or scalar noise, strong order 1.5.

    The step and its embedded error estimate are in the module docstring;
    :class:`SRIW1` and :class:`SOSRI` are this stepper with their tableaus.

    Args:
        tableau: an :class:`SRITableau` (default: SRIW1's).
        delta: the weight ``δ`` of the drift error estimate in
            ``E = δ E_D + E_N`` (default 1/6, as in StochasticDiffEq.jl).

    For diagonal noise each entry's diffusion should depend on its own entry
    (commutative noise): the diffusion stages are shared by all entries, and
    a diagonal ``g`` whose entries depend on other entries would need the
    mixed iterated integrals that no SRI method uses. Additive noise is
    diagonal noise here; for an additive ``g`` of shape ``(*u.shape, m)``
    use :class:`SRA1` or :class:`SOSRA`.

    Raises:
        TypeError: a tableau that is not an :class:`SRITableau`.
        ValueError: a negative or non-finite ``delta``; at the first step, a
            general (matrix) diffusion.
    """

    interpretations = ("ito",)
    noise_types = ("diagonal", "scalar", "additive")
    _default_tableau = SRIW1_TABLEAU

    def __init__(self, tableau: SRITableau | None = None, *, delta: float = 1.0 / 6.0) -> None:
        self._setup(tableau, delta, SRITableau)


    def step(self, term, t, u, dt, state):
        term = as_bound_term(term)
        t, dt = as_step_times(t, dt, u)
        if term.part_term(1).kind == "general":
            raise ValueError(f"{type(self).__name__} handles diagonal and scalar noise (and additive noise of u's "
                             "shape); for a matrix diffusion g of shape (*u.shape, m) use SRA1() or SOSRA() when the "
                             "noise is additive, else EulerMaruyama()")
        tab, plan = self.tableau, _sri_plan(self.tableau)
        h, abs_h, root = _scales(dt, u)
        times = _StageTimes(t, dt)
        dW, dH = self.increment(term, t, dt, levy_area=True)
        chi_10 = dH + 0.5 * dW                                  # I_(1,0) / h
        chi_11 = (dW * dW - abs_h) / (2.0 * root)              # I_(1,1) / sqrt|h|
        chi_111 = (dW * dW - 3.0 * abs_h) * dW / (6.0 * h)     # I_(1,1,1) / h
        s = tab.stages
        fs: list = [None] * s
        gs: list = [None] * s
        drift_stages: list = []
        nfe = 0
        for i in range(s):
            if plan.f_eval[i]:
                if plan.f_from[i] is not None:
                    fs[i] = fs[plan.f_from[i]]
                else:
                    y0 = _add(_combo(u, fs[:i], tab.A0[i], h), _noise(term, gs[:i], tab.B0[i], chi_10))
                    fs[i] = term.part_vf(0, y0, times(tab.c0[i]))
                    drift_stages.append((fs[i], y0))
                    nfe += 1
            if plan.g_eval[i]:
                if plan.g_from[i] is not None:
                    gs[i] = gs[plan.g_from[i]]
                else:
                    y1 = _combo(_combo(u, fs[:i], tab.A1[i], h), gs[:i], tab.B1[i], root)
                    gs[i] = term.part_vf(1, y1, times(tab.c1[i]))
        noise_error = _add(_noise(term, gs, tab.beta3, chi_10), _noise(term, gs, tab.beta4, chi_111))
        u_new = _add(_combo(u, fs, tab.alpha, h), _noise(term, gs, tab.beta1, dW),
                     _noise(term, gs, tab.beta2, chi_11), noise_error)
        drift_error = _combo(None, fs[:tab.error_stages], [1.0] * tab.error_stages, h)
        return self._result(u, u_new, drift_error, noise_error, nfe, drift_stages)


class SRIW1(SRI):
    r"""SRIW1: Rößler's (2010) four-stage SRI method, strong order 1.5 (weak order 2), adaptive.

    Itô SDEs with diagonal or scalar noise (see :class:`SRI` for the
    caveat on diagonal noise). Per step: two drift and four diffusion
    evaluations and one Brownian query with Lévy area. Error estimate
    ``E = δ |h (f_1 + f_2)| + |E_N|`` (module docstring).

    Args:
        delta: the weight of the drift error estimate (default 1/6).
    """

    _default_tableau = SRIW1_TABLEAU
    _fixed = True

    def __init__(self, *, delta: float = 1.0 / 6.0) -> None:
        self._setup(None, delta, SRITableau)


class SOSRI(SRI):
    r"""SOSRI: the stability-optimized SRI method of Rackauckas & Nie (2020), strong order 1.5, adaptive.

    Itô SDEs with diagonal or scalar noise (see :class:`SRI`). Its
    coefficients were optimized for a large stability region, so it takes
    larger steps than :class:`SRIW1` on (pathwise) stiff problems. Per step:
    four drift and four diffusion evaluations. Error estimate
    ``E = δ |h (f_1 + … + f_4)| + |E_N|`` (module docstring).

    Args:
        delta: the weight of the drift error estimate (default 1/6).
    """

    _default_tableau = SOSRI_TABLEAU
    _fixed = True

    def __init__(self, *, delta: float = 1.0 / 6.0) -> None:
        self._setup(None, delta, SRITableau)


class SRA(_StochasticRungeKutta):
    r"""An explicit SRA method of Rößler (2010): additive noise, strong order 1.5, adaptive.

    The diffusion ``g(u, p, t)`` must not depend on ``u`` (it is evaluated at
    the step's start ``u`` and the stage times ``t + c1_i h``); then the Itô
    and Stratonovich solutions agree and both are solved. Every noise
    product goes through the term's product, so ``g`` may have ``u``'s shape
    (one Brownian motion per entry) or ``(*u.shape, m)`` with
    ``noise_dim=m``. The step and its error estimate are in the module
    docstring; :class:`SRA1` and :class:`SOSRA` are this stepper with their
    tableaus.

    Args:
        tableau: an :class:`SRATableau` (default: SRA1's).
        delta: the weight ``δ`` of the drift error estimate (default 1/6).

    Raises:
        TypeError: a tableau that is not an :class:`SRATableau`.
        ValueError: a negative or non-finite ``delta``.
    """

    interpretations = INTERPRETATIONS
    noise_types = ("additive",)
    _default_tableau = SRA1_TABLEAU

    def __init__(self, tableau: SRATableau | None = None, *, delta: float = 1.0 / 6.0) -> None:
        self._setup(tableau, delta, SRATableau)

    def step(self, term, t, u, dt, state):
        term = as_bound_term(term)
        t, dt = as_step_times(t, dt, u)
        tab, plan = self.tableau, _sra_plan(self.tableau)
        h, _, _ = _scales(dt, u)
        times = _StageTimes(t, dt)
        dW, dH = self.increment(term, t, dt, levy_area=True)
        chi_10 = dH + 0.5 * dW                                  # I_(1,0) / h
        s = tab.stages
        fs: list = [None] * s
        gs: list = [None] * s
        drift_stages: list = []
        nfe = 0
        for i in range(s):
            if plan.g_eval[i]:
                j = plan.g_from[i]
                gs[i] = gs[j] if j is not None else term.part_vf(1, u, times(tab.c1[i]))
        for i in range(s):
            if not plan.f_eval[i]:
                continue
            if plan.f_from[i] is not None:
                fs[i] = fs[plan.f_from[i]]
                continue
            y = _add(_combo(u, fs[:i], tab.A0[i], h), _noise(term, gs[:i], tab.B0[i], chi_10))
            fs[i] = term.part_vf(0, y, times(tab.c0[i]))
            drift_stages.append((fs[i], y))
            nfe += 1
        noise_error = _noise(term, gs, tab.beta2, chi_10)
        u_new = _add(_combo(u, fs, tab.alpha, h), _noise(term, gs, tab.beta1, dW), noise_error)
        drift_error = _combo(None, fs[:tab.error_stages], [1.0] * tab.error_stages, h)
        return self._result(u, u_new, drift_error, noise_error, nfe, drift_stages)


class SRA1(SRA):
    r"""SRA1: Rößler's (2010) two-stage SRA method for additive noise, strong order 1.5, adaptive.

    Itô or Stratonovich (they agree for additive noise). Per step: two drift
    and two diffusion evaluations (at ``t + h`` and ``t``). Error estimate
    ``E = δ |h (f_1 + f_2)| + |g(t) - g(t + h)| |I_(1,0)/h|`` (module docstring).

    Args:
        delta: the weight of the drift error estimate (default 1/6).
    """

    _default_tableau = SRA1_TABLEAU
    _fixed = True

    def __init__(self, *, delta: float = 1.0 / 6.0) -> None:
        self._setup(None, delta, SRATableau)


class SOSRA(SRA):
    r"""SOSRA: the stability-optimized three-stage SRA method of Rackauckas & Nie (2020), strong order 1.5.

    Additive noise, Itô or Stratonovich, adaptive; optimized for a large
    stability region (stiff drifts with additive noise). Per step: three drift
    and three diffusion evaluations.

    Args:
        delta: the weight of the drift error estimate (default 1/6).
    """

    _default_tableau = SOSRA_TABLEAU
    _fixed = True

    def __init__(self, *, delta: float = 1.0 / 6.0) -> None:
        self._setup(None, delta, SRATableau)
