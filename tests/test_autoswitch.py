"""AutoSwitch: stiffness switching between Tsit5 and a stiff method on the recorded stiffness estimate."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import pylux as lx
from pylux.diffeq.autoswitch import _exponent_ratio, componentwise_stiffness, stability_interval
from pylux.diffeq.integrate import stiffness_estimate
from test_stiff import robertson, robertson_np, vdp_np  # noqa: E402  (the shared stiff problems)

DT = torch.float64


def vdp(u, p, t):
    x, y = u[0], u[1]
    return torch.stack([y, p * (1 - x ** 2) * y - x])  # y'' - mu (1 - y^2) y' + y = 0


def test_stability_interval_of_tsit5_and_dp5():
    # OrdinaryDiffEq's alg_stability_size: Tsit5 3.5068, DP5 3.3066
    assert abs(stability_interval(lx.Tsit5()) - 3.5068) < 2e-4
    assert abs(stability_interval(lx.DP5()) - 3.3066) < 2e-4


def test_never_leaves_tsit5_on_a_nonstiff_problem_and_takes_its_exact_steps():
    prob = lx.ODEProblem(lambda u, p, t: torch.stack([u[1], -u[0]]), torch.tensor([1.0, 0.0], dtype=DT), (0.0, 10.0))
    auto = lx.solve(prob, lx.AutoSwitch(), reltol=1e-6, abstol=1e-8)
    tsit5 = lx.solve(prob, lx.Tsit5(), reltol=1e-6, abstol=1e-8)
    assert set(auto.stats.alg_choice) == {0} and len(auto.stats.alg_choice) == auto.stats.naccept
    assert (auto.stats.naccept, auto.stats.nreject, auto.stats.nf) == (tsit5.stats.naccept, tsit5.stats.nreject,
                                                                        tsit5.stats.nf)
    assert torch.equal(auto.u, tsit5.u)
    assert auto.stats.njac == 0


def test_van_der_pol_mu_1000_ten_times_fewer_steps_than_tsit5():
    prob = lx.ODEProblem(vdp, torch.tensor([2.0, 0.0], dtype=DT), (0.0, 300.0), 1000.0)
    auto = lx.solve(prob, lx.AutoSwitch(), reltol=1e-4, abstol=1e-6, save_everystep=False)
    limit = 1000
    tsit5 = lx.solve(prob, lx.Tsit5(), reltol=1e-4, abstol=1e-6, save_everystep=False, maxiters=limit,
                     throw=False)
    assert tsit5.retcode == lx.ReturnCode.MaxIters  # Tsit5 needs more than `limit` steps
    assert 10 * (auto.stats.naccept + auto.stats.nreject) <= limit
    choices = auto.stats.alg_choice
    assert choices[0] == 0 and 1 in choices  # starts explicit, switches to Rosenbrock23
    assert auto.stats.njac >= choices.count(1)
    ref = lx.solve(prob, lx.Rodas5P(), reltol=1e-8, abstol=1e-8, save_everystep=False)
    assert torch.allclose(auto.u[-1], ref.u[-1], rtol=1e-2, atol=1e-3)


def test_switches_back_to_the_explicit_method_when_stiffness_ends():
    # stiff decay of the second component for t < 1, then a non-stiff rotation only
    def f(u, p, t):
        rate = torch.where(t < 1.0, torch.tensor(-2000.0, dtype=DT), torch.tensor(0.0, dtype=DT))
        return torch.stack([u[1] * 0 + torch.cos(t), rate * (u[1] - torch.sin(t))])
    prob = lx.ODEProblem(f, torch.tensor([0.0, 1.0], dtype=DT), (0.0, 3.0))
    sol = lx.solve(prob, lx.AutoSwitch(), reltol=1e-5, abstol=1e-7, tstops=[1.0])
    choices = sol.stats.alg_choice
    first_stiff = choices.index(1)
    assert 0 in choices[first_stiff:], "never switched back to Tsit5"
    assert choices[-1] == 0


def test_bad_arguments():
    with pytest.raises(TypeError, match="nonstiff"):
        lx.AutoSwitch(nonstiff=lx.Tsit5)
    with pytest.raises(ValueError, match="maxstiffstep"):
        lx.AutoSwitch(maxstiffstep=-1)
    with pytest.raises(ValueError, match="stability_size"):
        lx.AutoSwitch(nonstiff=lx.VCAB3())


def test_componentwise_stiffness_is_the_largest_rate_among_the_components_that_moved():
    A = torch.tensor([-3.0, 250.0, -1e6], dtype=DT)
    y_prev = torch.tensor([1.0, 2.0, 5.0], dtype=DT)
    y_last = torch.tensor([1.5, 1.9, 5.0], dtype=DT)   # the third (stiffest) component did not move
    assert componentwise_stiffness((A * y_prev, A * y_last, y_prev, y_last)).item() == pytest.approx(250.0)
    assert componentwise_stiffness((A * y_prev, A * y_prev, y_prev, y_prev)).item() == 0.0
    empty = torch.zeros(0, dtype=DT)
    assert componentwise_stiffness((empty, empty, empty, empty)).item() == 0.0
    # the quotient of norms averages the moving components: 250 * 0.1 / |(0.5, 0.1)| ~ 49
    assert stiffness_estimate((A * y_prev, A * y_last, y_prev, y_last)).item() < 60.0


def test_robertson_at_a_tight_tolerance_switches_early():
    """With the quotient of norms Tsit5 took 2032 stability-limited steps before the switch (t = 3.18) and
    the solve 2078 steps; the componentwise estimate switches after 46, and the solve stays within 2x scipy
    BDF's steps."""
    span, y0, tol = (0.0, 40.0), [1.0, 0.0, 0.0], 1e-7
    bdf_steps = solve_ivp(robertson_np, span, y0, method="BDF", rtol=tol, atol=tol * 1e-4).t.size - 1
    ref = solve_ivp(robertson_np, span, y0, method="Radau", rtol=1e-12, atol=1e-16).y[:, -1]
    sol = lx.solve(lx.ODEProblem(robertson, torch.tensor(y0, dtype=DT), span), lx.AutoSwitch(stiff=lx.Rodas5P()),
                   reltol=tol, abstol=tol * 1e-4, save_everystep=False)
    assert sol.stats.alg_choice.index(1) <= 60
    assert sol.stats.naccept + sol.stats.nreject <= 2 * bdf_steps
    assert np.max(np.abs(sol.u[-1].numpy() - ref) / (np.abs(ref) + 1e-4)) < 10 * tol


@pytest.mark.parametrize("problem, tol", [("robertson", 1e-3), ("robertson", 1e-5), ("vdp", 1e-5)])
def test_at_most_twice_bdfs_steps_where_rosenbrock23_is_fair(problem, tol):
    """Rosenbrock23 is second order: at 1e-7 it needs 6x BDF's steps on Robertson by itself, so the
    comparison is at tolerances where a second-order method is the right tool (1e-3 / 1e-5). Robertson at
    1e-5 took 253 steps (BDF: 118) before the stiff steps were controlled with Rosenbrock23's exponent."""
    if problem == "robertson":
        f, f_np, y0, span, atol = robertson, robertson_np, [1.0, 0.0, 0.0], (0.0, 40.0), tol * 1e-4
        p = None
    else:
        f, f_np, y0, span, atol, p = vdp, vdp_np(1000.0), [2.0, 0.0], (0.0, 1000.0), tol, 1000.0
    bdf_steps = solve_ivp(f_np, span, y0, method="BDF", rtol=tol, atol=atol).t.size - 1
    sol = lx.solve(lx.ODEProblem(f, torch.tensor(y0, dtype=DT), span, p), lx.AutoSwitch(), reltol=tol,
                   abstol=atol, save_everystep=False)
    assert 1 in sol.stats.alg_choice
    assert sol.stats.naccept + sol.stats.nreject <= 2 * bdf_steps


def test_stiff_steps_are_controlled_with_the_stiff_methods_exponent():
    """Tsit5's PI gains (beta1 = 0.7/5) applied to Rosenbrock23's O(dt^3) error under-react; the stiff
    steps report E^rho so that the shared controller proposes Rosenbrock23's own steps."""
    assert _exponent_ratio(lx.PIController.for_order(5), lx.Rosenbrock23()) == pytest.approx(2.5)
    assert _exponent_ratio(lx.IController(error_order=4), lx.Rosenbrock23()) == pytest.approx(5 / 3)
    assert _exponent_ratio(lx.PIController.for_order(5), lx.Rodas5P()) == pytest.approx(1.0)
    prob = lx.ODEProblem(robertson, torch.tensor([1.0, 0.0, 0.0], dtype=DT), (0.0, 40.0))
    kw = dict(reltol=1e-5, abstol=1e-9, save_everystep=False, dt=1e-6)
    alone = lx.solve(prob, lx.Rosenbrock23(), **kw)
    pinned = lx.solve(prob, lx.AutoSwitch(stiffalgfirst=True, maxnonstiffstep=10 ** 6), **kw)
    assert set(pinned.stats.alg_choice) == {1}
    n_alone = alone.stats.naccept + alone.stats.nreject
    n_pinned = pinned.stats.naccept + pinned.stats.nreject
    assert abs(n_pinned - n_alone) <= 0.1 * n_alone, (n_pinned, n_alone)   # with Tsit5's exponent: 302
    assert torch.allclose(pinned.u[-1], alone.u[-1], rtol=1e-5, atol=1e-9)
