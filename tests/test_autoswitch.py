"""AutoSwitch: stiffness switching between Tsit5 and a stiff method on the recorded stiffness estimate."""

import pytest
import torch

import pylux as lx
from pylux.diffeq.autoswitch import stability_interval

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
