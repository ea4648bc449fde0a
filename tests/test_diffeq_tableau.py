"""Butcher tableaus: validation, order conditions, dense-output coefficients, solver metadata."""

from fractions import Fraction

import numpy as np
import pytest

import pylux.diffeq as de
from pylux.diffeq.tableau import (BS3_TABLEAU, DP5_TABLEAU, EULER_TABLEAU, HEUN_TABLEAU,
                                  MIDPOINT_TABLEAU, RK4_TABLEAU, TSIT5_TABLEAU, ButcherTableau,
                                  TableauError)

ALL = [EULER_TABLEAU, MIDPOINT_TABLEAU, HEUN_TABLEAU, RK4_TABLEAU, BS3_TABLEAU, TSIT5_TABLEAU,
       DP5_TABLEAU]
ORDER = {"Euler": 1, "Midpoint": 2, "Heun": 2, "RK4": 4, "BS3": 3, "Tsit5": 5, "DP5": 5}


def _order_conditions(tab, order):
    """Residuals of the Butcher order conditions up to order 5 (the trees of each order)."""
    A = np.zeros((tab.stages, tab.stages))
    for i, row in enumerate(tab.a):
        A[i, :i] = row
    b, c = np.array(tab.b), np.array(tab.c)
    conds = [b.sum() - 1]
    if order >= 2:
        conds += [b @ c - 1 / 2]
    if order >= 3:
        conds += [b @ c ** 2 - 1 / 3, b @ A @ c - 1 / 6]
    if order >= 4:
        conds += [b @ c ** 3 - 1 / 4, b @ (c * (A @ c)) - 1 / 8, b @ A @ c ** 2 - 1 / 12,
                  b @ A @ A @ c - 1 / 24]
    if order >= 5:
        Ac = A @ c
        conds += [b @ c ** 4 - 1 / 5, b @ (c ** 2 * Ac) - 1 / 10, b @ (c * (A @ c ** 2)) - 1 / 15,
                  b @ (c * (A @ Ac)) - 1 / 30, b @ Ac ** 2 - 1 / 20, b @ A @ c ** 3 - 1 / 20,
                  b @ A @ (c * Ac) - 1 / 40, b @ A @ A @ c ** 2 - 1 / 60,
                  b @ A @ A @ A @ c - 1 / 120]
    return np.abs(conds)


@pytest.mark.parametrize("tab", ALL, ids=lambda t: t.name)
def test_order_conditions_hold_to_the_stated_order(tab):
    assert _order_conditions(tab, ORDER[tab.name]).max() < 1e-12


def test_order_conditions_fail_one_order_higher_for_the_low_order_methods():
    # the check above can fail: RK4 is not fifth order, BS3 not fourth
    assert _order_conditions(RK4_TABLEAU, 5).max() > 1e-3
    assert _order_conditions(BS3_TABLEAU, 4).max() > 1e-3


def test_embedded_pairs_have_the_lower_order():
    for tab, low in ((BS3_TABLEAU, 2), (TSIT5_TABLEAU, 4), (DP5_TABLEAU, 4)):
        low_tab = ButcherTableau(name="low", c=tab.c, a=tab.a,
                                 b=tuple(b - e for b, e in zip(tab.b, tab.b_error)))
        assert _order_conditions(low_tab, low).max() < 1e-12
        assert _order_conditions(low_tab, low + 1).max() > 1e-6


def test_fsal_flags():
    assert [t.fsal for t in ALL] == [False, False, False, False, True, True, True]


def test_dp5_dense_output_matches_scipy_rk45():
    from scipy.integrate._ivp.rk import RK45
    np.testing.assert_allclose(np.array(DP5_TABLEAU.dense), RK45.P, rtol=0, atol=1e-15)


@pytest.mark.parametrize("tab", ALL, ids=lambda t: t.name)
def test_dense_output_ends_at_b_and_starts_at_zero(tab):
    np.testing.assert_allclose(tab.dense_weights(1.0), tab.b, atol=1e-13)
    assert tab.dense_weights(0.0) == [0.0] * tab.stages


def test_tsit5_dense_first_coefficients_from_tsitouras():
    # b_1(theta) = theta - 2.7637... theta^2 + ..., b_7(theta) = 1.5 theta^2 - 4 theta^3 + 2.5 theta^4
    assert TSIT5_TABLEAU.dense[0][:2] == (1.0, -2.763706197274826)
    assert TSIT5_TABLEAU.dense[6] == (0.0, 1.5, -4.0, 2.5)


def test_solver_order_metadata():
    assert (de.Euler.order, de.Euler.error_order) == (1, None)
    assert (de.Midpoint.order, de.Midpoint.error_order) == (2, 1)
    assert (de.Heun.order, de.Heun.error_order) == (2, 1)
    assert (de.RK4.order, de.RK4.error_order) == (4, None)
    assert (de.BS3.order, de.BS3.error_order) == (3, 2)
    assert (de.Tsit5.order, de.Tsit5.error_order) == (5, 4)
    assert (de.DP5.order, de.DP5.error_order) == (5, 4)
    assert (de.VCAB3.order, de.VCAB3.error_order) == (3, 2)
    assert isinstance(de.Tsit5(), de.AbstractAdaptiveSolver)
    assert not isinstance(de.RK4(), de.AbstractAdaptiveSolver)
    assert isinstance(de.VCAB3(), de.AbstractAdaptiveSolver)


def test_default_controllers_follow_ordinarydiffeq():
    tsit = de.Tsit5().default_controller()
    assert (tsit.beta1, tsit.beta2) == pytest.approx((7 / 50, 2 / 25))
    dp5 = de.DP5().default_controller()
    assert (dp5.beta1, dp5.beta2) == pytest.approx((0.17, 0.04))
    bs3 = de.BS3().default_controller()
    assert (bs3.beta1, bs3.beta2) == pytest.approx((7 / 30, 2 / 15))
    assert (tsit.qmin, tsit.qmax, tsit.gamma) == (0.2, 10.0, 0.9)


def test_custom_tableau_runs_through_the_generic_stepper():
    # Ralston's second-order method
    tab = ButcherTableau(name="Ralston", c=(0, Fraction(2, 3)), a=((), (Fraction(2, 3),)),
                         b=(Fraction(1, 4), Fraction(3, 4)), dense=((1, Fraction(-3, 4)), (0, Fraction(3, 4))))
    solver = de.ExplicitRungeKutta(tab, order=2, interpolation_order=2)
    import torch
    prob = de.ODEProblem(lambda u, p, t: -u, torch.ones(1, dtype=torch.float64), (0.0, 1.0))
    err = [abs(de.solve(prob, solver, dt=dt, adaptive=False).u[-1].item() - np.exp(-1)) for dt in (0.1, 0.05)]
    assert np.log2(err[0] / err[1]) == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(c=(0, 0.5), a=((), (0.4,)), b=(0.5, 0.5)), "row 1 of a sums to 0.4 but c\\[1\\] = 0.5"),
    (dict(c=(0, 1), a=((), (1,)), b=(0.5, 0.6)), "weights b sum to 1.1"),
    (dict(c=(0, 1), a=((), (1,)), b=(0.5, 0.5), b_low=(0.9, 0.0)), "embedded weights b_low sum to 0.9"),
    (dict(c=(0, 1), a=((), (1,)), b=(0.5, 0.5), b_error=(0.1, 0.0)), "error weights sum to 0.1"),
    (dict(c=(0.1, 1), a=((), (0.9,)), b=(0.5, 0.5)), "c\\[0\\] must be 0"),
    (dict(c=(0, 1), a=((), (1, 0)), b=(0.5, 0.5)), "row 1 of a must hold the 1 entries"),
    (dict(c=(0, 1), a=((), (1,)), b=(0.5,)), "b has 1 entries but c has 2"),
    (dict(c=(0, 1), a=((), (1,)), b=(0.5, 0.5), dense=((1.0,), (0.0,))), "must end at u_new"),
    (dict(c=(0, 1), a=((), (1,)), b=(0.5, 0.5), b_low=(1, 0), b_error=(-0.5, 0.5)), "not both"),
])
def test_invalid_tableaus_are_rejected_with_the_violated_condition(kwargs, match):
    with pytest.raises(TableauError, match=match):
        ButcherTableau(name="bad", **kwargs)


def test_custom_solver_needs_an_order():
    with pytest.raises(ValueError, match="give order=p"):
        de.ExplicitRungeKutta(HEUN_TABLEAU)
    with pytest.raises(TypeError, match="must be a ButcherTableau"):
        de.ExplicitRungeKutta({"c": (0,)}, order=1)
