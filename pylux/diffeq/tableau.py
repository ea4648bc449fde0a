"""Butcher tableaus of the explicit Runge–Kutta methods, validated at construction.

A tableau is data; one generic stepper (:mod:`pylux.diffeq.solvers`) runs all of
them. For an ``s``-stage explicit method with step ``h`` from ``(t, u)``::

    Y_i = u + h * sum_{j<i} a_ij k_j,      k_i = f(Y_i, t + c_i h)
    u_new = u + h * sum_i b_i k_i
    err   = h * sum_i e_i k_i              (e = b - b_low, the embedded pair's difference)

and the continuous extension (dense output) on ``theta in [0, 1]`` is::

    u(t + theta h) = u + h * sum_i b_i(theta) k_i,   b_i(theta) = sum_m P[i][m] theta^(m+1)

References: Butcher, *Numerical Methods for ODEs* (2016); Hairer, Nørsett &
Wanner, *Solving ODEs I*, II.1–II.6 (tableaus, embedded pairs, dense output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

__all__ = [
    "TableauError",
    "ButcherTableau",
    "EULER_TABLEAU",
    "MIDPOINT_TABLEAU",
    "HEUN_TABLEAU",
    "RK4_TABLEAU",
    "BS3_TABLEAU",
    "TSIT5_TABLEAU",
    "DP5_TABLEAU",
]

# Coefficients given as decimals (Tsit5) are exact to ~1e-16; this tolerance
# separates such rounding from a typo in a coefficient.
_CONSISTENCY_TOL = 1e-12


class TableauError(ValueError):
    """A Butcher tableau violates a consistency condition."""


def _floats(values: Sequence, what: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise TableauError(f"tableau {name!r}: {what} must be a sequence of numbers ({err})") from None


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta tableau with an optional embedded pair and dense output.

    Args:
        name: used in error messages.
        c: the ``s`` stage times (``c[0]`` must be 0: explicit methods).
        a: the strictly lower triangle, row ``i`` holding ``a_i0 .. a_i(i-1)``
            (row 0 is empty).
        b: the ``s`` solution weights.
        b_low: weights of the embedded lower-order solution, or ``None``.
        b_error: the error weights ``b - b_low`` directly (give at most one of
            ``b_low`` / ``b_error``; tables such as Tsitouras' are published in
            this form, which avoids cancellation).
        dense: ``P``, an ``s x d`` matrix: ``b_i(theta) = sum_m P[i][m] theta^(m+1)``.

    Validation (raises :class:`TableauError`): ``sum_j a_ij = c_i`` for every
    row, ``sum_i b_i = 1``, ``sum_i b_error_i = 0`` and, for the dense output,
    ``b_i(1) = b_i`` (the interpolant ends at ``u_new``) and ``sum_i b_i(theta) = theta``.

    ``fsal`` ("first same as last") is derived: the last row of ``a`` equals
    ``b`` and ``c[-1] = 1``, so the last stage is ``f(u_new)`` and serves as
    the first stage of the next step.
    """

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_low: tuple[float, ...] | None = None
    b_error: tuple[float, ...] | None = None
    dense: tuple[tuple[float, ...], ...] | None = None
    fsal: bool = field(init=False)

    def __post_init__(self) -> None:
        name = self.name
        c = _floats(self.c, "c", name)
        b = _floats(self.b, "b", name)
        s = len(c)
        if s == 0:
            raise TableauError(f"tableau {name!r}: at least one stage is required")
        if len(b) != s:
            raise TableauError(f"tableau {name!r}: b has {len(b)} entries but c has {s}")
        if len(self.a) != s:
            raise TableauError(f"tableau {name!r}: a has {len(self.a)} rows but there are {s} stages")
        a = []
        for i, row in enumerate(self.a):
            row = _floats(row, f"row {i} of a", name)
            if len(row) != i:
                raise TableauError(
                    f"tableau {name!r}: row {i} of a must hold the {i} entries left of the "
                    f"diagonal (explicit method), got {len(row)}")
            a.append(row)
        if c[0] != 0.0:
            raise TableauError(f"tableau {name!r}: c[0] must be 0 for an explicit method, got {c[0]}")
        for i, row in enumerate(a):
            if abs(sum(row) - c[i]) > _CONSISTENCY_TOL * max(1.0, abs(c[i])):
                raise TableauError(
                    f"tableau {name!r}: row {i} of a sums to {sum(row)!r} but c[{i}] = {c[i]!r}; "
                    "the row sums of a must equal c")
        if abs(sum(b) - 1.0) > _CONSISTENCY_TOL:
            raise TableauError(f"tableau {name!r}: the weights b sum to {sum(b)!r}, not 1")

        if self.b_low is not None and self.b_error is not None:
            raise TableauError(f"tableau {name!r}: give b_low or b_error, not both")
        b_error = None
        if self.b_low is not None:
            b_low = _floats(self.b_low, "b_low", name)
            if len(b_low) != s:
                raise TableauError(f"tableau {name!r}: b_low has {len(b_low)} entries, expected {s}")
            if abs(sum(b_low) - 1.0) > _CONSISTENCY_TOL:
                raise TableauError(f"tableau {name!r}: the embedded weights b_low sum to {sum(b_low)!r}, not 1")
            b_error = tuple(bi - li for bi, li in zip(b, b_low))
        elif self.b_error is not None:
            b_error = _floats(self.b_error, "b_error", name)
            if len(b_error) != s:
                raise TableauError(f"tableau {name!r}: b_error has {len(b_error)} entries, expected {s}")
            if abs(sum(b_error)) > _CONSISTENCY_TOL:
                raise TableauError(
                    f"tableau {name!r}: the error weights sum to {sum(b_error)!r}, not 0 "
                    "(b and the embedded weights must both sum to 1)")

        dense = None
        if self.dense is not None:
            dense = tuple(_floats(row, "a row of dense", name) for row in self.dense)
            if len(dense) != s or len({len(r) for r in dense}) != 1:
                raise TableauError(f"tableau {name!r}: dense must be an {s} x d matrix")
            for i, row in enumerate(dense):
                if abs(sum(row) - b[i]) > _CONSISTENCY_TOL * max(1.0, abs(b[i])) * 10:
                    raise TableauError(
                        f"tableau {name!r}: dense output b_{i}(1) = {sum(row)!r} differs from "
                        f"b[{i}] = {b[i]!r}; the interpolant must end at u_new")
            first_power = [sum(row[0] for row in dense)]
            if abs(first_power[0] - 1.0) > _CONSISTENCY_TOL * 10:
                raise TableauError(f"tableau {name!r}: dense output must satisfy sum_i b_i(theta) = theta")
            for m in range(1, len(dense[0])):
                if abs(sum(row[m] for row in dense)) > _CONSISTENCY_TOL * 100:
                    raise TableauError(
                        f"tableau {name!r}: dense output must satisfy sum_i b_i(theta) = theta "
                        f"(the theta^{m + 1} coefficients sum to {sum(row[m] for row in dense)!r})")

        fsal = s > 1 and c[-1] == 1.0 and all(
            abs(x - y) <= _CONSISTENCY_TOL for x, y in zip(a[-1] + (0.0,), b))
        object.__setattr__(self, "c", c)
        object.__setattr__(self, "a", tuple(a))
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "b_low", None)
        object.__setattr__(self, "b_error", b_error)
        object.__setattr__(self, "dense", dense)
        object.__setattr__(self, "fsal", fsal)

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def has_error_estimate(self) -> bool:
        return self.b_error is not None

    def dense_weights(self, theta: float) -> list[float]:
        """``[b_i(theta)]`` for one ``theta`` (host floats; Horner's scheme per stage)."""
        out = []
        for row in self.dense:
            acc = 0.0
            for coef in reversed(row):
                acc = (acc + coef) * theta
            out.append(acc)
        return out


def _fr(*values) -> tuple[Fraction, ...]:
    return tuple(Fraction(v) for v in values)


# --- Euler, midpoint, Heun, classical RK4 ------------------------------------------------

EULER_TABLEAU = ButcherTableau(
    name="Euler", c=(0.0,), a=((),), b=(1.0,),
    dense=((1.0,),),  # linear interpolation
)

# Midpoint (RK2) with embedded Euler; free interpolant b_1 = theta - theta^2, b_2 = theta^2.
MIDPOINT_TABLEAU = ButcherTableau(
    name="Midpoint", c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0), b_low=(1.0, 0.0),
    dense=((1.0, -1.0), (0.0, 1.0)),
)

# Heun (explicit trapezoid) with embedded Euler; b_1 = theta - theta^2/2, b_2 = theta^2/2.
HEUN_TABLEAU = ButcherTableau(
    name="Heun", c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), b_low=(1.0, 0.0),
    dense=((1.0, -0.5), (0.0, 0.5)),
)

# Classical RK4 with its free third-order continuous extension (Hairer–Nørsett–Wanner
# II.6): it needs no f(u_new), which RK4 does not compute.
RK4_TABLEAU = ButcherTableau(
    name="RK4", c=(0.0, 0.5, 0.5, 1.0),
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=_fr(Fraction(1, 6), Fraction(1, 3), Fraction(1, 3), Fraction(1, 6)),
    dense=(
        _fr(1, Fraction(-3, 2), Fraction(2, 3)),
        _fr(0, 1, Fraction(-2, 3)),
        _fr(0, 1, Fraction(-2, 3)),
        _fr(0, Fraction(-1, 2), Fraction(2, 3)),
    ),
)


# --- Bogacki–Shampine 3(2) -----------------------------------------------------------------

def _hermite_dense(b: Sequence[Fraction]) -> tuple[tuple[Fraction, ...], ...]:
    """Stage polynomials of the cubic Hermite interpolant of an FSAL method.

    With ``u_new - u = h sum b_i k_i``, ``k_1 = f(u)`` and ``k_s = f(u_new)``::

        u(theta) - u = h01(theta) (u_new - u) + h h10(theta) k_1 + h h11(theta) k_s
        h10 = theta - 2 theta^2 + theta^3,  h01 = 3 theta^2 - 2 theta^3,  h11 = theta^3 - theta^2
    """
    s = len(b)
    rows = []
    for i in range(s):
        first = Fraction(1 if i == 0 else 0)
        last = Fraction(1 if i == s - 1 else 0)
        rows.append((first, 3 * b[i] - 2 * first - last, -2 * b[i] + first + last))
    return tuple(rows)


_BS3_B = _fr(Fraction(2, 9), Fraction(1, 3), Fraction(4, 9), 0)
# Bogacki & Shampine, "A 3(2) pair of Runge–Kutta formulas", Appl. Math. Lett. 2 (1989).
BS3_TABLEAU = ButcherTableau(
    name="BS3", c=_fr(0, Fraction(1, 2), Fraction(3, 4), 1),
    a=((), _fr(Fraction(1, 2)), _fr(0, Fraction(3, 4)), _BS3_B[:3]),
    b=_BS3_B,
    b_low=_fr(Fraction(7, 24), Fraction(1, 4), Fraction(1, 3), Fraction(1, 8)),
    dense=_hermite_dense(_BS3_B),
)


# --- Tsitouras 5(4) ----------------------------------------------------------------------
# Ch. Tsitouras, "Runge–Kutta pairs of order 5(4) satisfying only the first column
# simplifying assumption", Comput. Math. Appl. 62 (2011) 770–775; coefficients and the
# free order-4 interpolant as used by OrdinaryDiffEq.jl's Tsit5.

_TSIT5_B = (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742,
            -3.290069515436081, 2.324710524099774, 0.0)
TSIT5_TABLEAU = ButcherTableau(
    name="Tsit5",
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    a=(
        (),
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.897153057105493, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
         -0.028269050394068383),
        _TSIT5_B[:6],
    ),
    b=_TSIT5_B,
    b_error=(-0.00178001105222577714, -0.0008164344596567469, 0.007880878010261995,
             -0.1447110071732629, 0.5823571654525552, -0.45808210592918697, 1.0 / 66.0),
    dense=(
        (1.0, -2.763706197274826, 2.9132554618219126, -1.0530884977290216),
        (0.0, 0.13169999999999998, -0.2234, 0.1017),
        (0.0, 3.9302962368947516, -5.941033872131505, 2.490627285651253),
        (0.0, -12.411077166933676, 30.33818863028232, -16.548102889244902),
        (0.0, 37.50931341651104, -88.1789048947664, 47.37952196281928),
        (0.0, -27.896526289197286, 65.09189467479366, -34.87065786149661),
        (0.0, 1.5, -4.0, 2.5),
    ),
)


# --- Dormand–Prince 5(4) -------------------------------------------------------------------
# Dormand & Prince, "A family of embedded Runge–Kutta formulae", J. Comput. Appl. Math.
# 6 (1980); dense output of Shampine, "Some practical Runge–Kutta formulas", Math. Comp.
# 46 (1986), in Hairer's form  u(theta) = u + theta (C1 + (1-theta)(C2 + theta (C3 +
# (1-theta) C4)))  with C1 = u_new - u, C2 = h k1 - C1, C3 = C1 - C2 - h k7, C4 = h sum d_i k_i.

_DP5_B = _fr(Fraction(35, 384), 0, Fraction(500, 1113), Fraction(125, 192),
             Fraction(-2187, 6784), Fraction(11, 84), 0)
_DP5_D = _fr(Fraction(-12715105075, 11282082432), 0, Fraction(87487479700, 32700410799),
             Fraction(-10690763975, 1880347072), Fraction(701980252875, 199316789632),
             Fraction(-1453857185, 822651844), Fraction(69997945, 29380423))


def _dp5_dense() -> tuple[tuple[Fraction, ...], ...]:
    # Expanding Hairer's nested form in powers of theta (units of h k_i):
    #   theta: C1 + C2 = e1,  theta^2: -C2 + C3 + C4,  theta^3: -C3 - 2 C4,  theta^4: C4.
    rows = []
    for i in range(7):
        e1 = Fraction(1 if i == 0 else 0)
        e7 = Fraction(1 if i == 6 else 0)
        c1 = _DP5_B[i]
        c2 = e1 - c1
        c3 = c1 - c2 - e7
        c4 = _DP5_D[i]
        rows.append((c1 + c2, -c2 + c3 + c4, -c3 - 2 * c4, c4))
    return tuple(rows)


DP5_TABLEAU = ButcherTableau(
    name="DP5",
    c=_fr(0, Fraction(1, 5), Fraction(3, 10), Fraction(4, 5), Fraction(8, 9), 1, 1),
    a=(
        (),
        _fr(Fraction(1, 5)),
        _fr(Fraction(3, 40), Fraction(9, 40)),
        _fr(Fraction(44, 45), Fraction(-56, 15), Fraction(32, 9)),
        _fr(Fraction(19372, 6561), Fraction(-25360, 2187), Fraction(64448, 6561), Fraction(-212, 729)),
        _fr(Fraction(9017, 3168), Fraction(-355, 33), Fraction(46732, 5247), Fraction(49, 176),
            Fraction(-5103, 18656)),
        _DP5_B[:6],
    ),
    b=_DP5_B,
    b_low=_fr(Fraction(5179, 57600), 0, Fraction(7571, 16695), Fraction(393, 640),
              Fraction(-92097, 339200), Fraction(187, 2100), Fraction(1, 40)),
    dense=_dp5_dense(),
)
