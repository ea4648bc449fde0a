"""The regularized-solve plumbing (pylux.regularize.RegularizedSolve) that layers share, float64."""

import math

import pytest
import torch

import pylux as lx
from pylux import nn
from pylux.regularize import RegularizedSolution, RegularizedSolve, as_regularizers, solution_state

F64 = torch.float64


def _scalar_field(a):
    return lambda u, p, t: p["a"] * u


def test_kinetic_energy_of_exponential_growth_matches_closed_form():
    # z' = a z, z = x e^{at}: R = mean_b ∫_0^1 (a x_b e^{at})^2 dt = a x_b^2 (e^{2a} - 1) / 2
    a = 0.8
    regularized = RegularizedSolve(lx.KineticRegularization(), (0.0, 1.0), lx.Tsit5(), None)
    st = regularized.init_state(torch.Generator().manual_seed(0))
    x = torch.tensor([[0.5], [-1.5], [2.0]], dtype=F64)
    result = regularized.solve(_scalar_field(a), x, {"a": torch.tensor(a, dtype=F64)}, st,
                               reltol=1e-10, abstol=1e-10)
    assert isinstance(result, RegularizedSolution)
    torch.testing.assert_close(result.y, x * math.exp(a), rtol=1e-8, atol=1e-10)
    expected = (a * x.pow(2) * (math.exp(2 * a) - 1) / 2).mean()
    torch.testing.assert_close(result.value, expected, rtol=1e-8, atol=1e-10)
    assert result.terms == {"KineticRegularization": result.value}
    assert result.nfe == 0 and result.rng != st["rng"]
    state = result.state()
    assert set(state) == {"rng", "regularization", "regularization_terms", "regularization_nfe"}


def test_the_layer_reports_what_the_plumbing_computes():
    model = nn.Dense(2, 2, torch.tanh)
    layer = lx.NeuralODE(model, (0.0, 1.0), regularize=[lx.KineticRegularization(), lx.LocalErrorRegularization()],
                         reltol=1e-7, abstol=1e-7)
    ps, st = lx.setup(torch.Generator().manual_seed(1), layer, dtype=F64)
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    y, st_new = layer(x, ps, st)
    field = lambda u, p, t: model(u, p, st["model"])[0]  # noqa: E731
    result = layer.regularized.solve(field, x, ps, st, reltol=1e-7, abstol=1e-7)
    torch.testing.assert_close(y, result.y, rtol=0, atol=0)
    for key, value in {**solution_state(result.solution), **result.state()}.items():
        if key == "backward_stats":
            continue
        if key == "regularization_terms":
            assert value.keys() == st_new[key].keys()
            for name in value:
                torch.testing.assert_close(value[name], st_new[key][name], rtol=0, atol=0)
        elif isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, st_new[key], rtol=0, atol=0)
        else:
            assert value == st_new[key], key


def test_without_regularizers_the_plumbing_does_nothing():
    regularized = RegularizedSolve(None, (0.0, 1.0), lx.Tsit5(), None)
    assert not regularized.enabled
    assert regularized.init_state(torch.Generator()) == {}
    assert regularized.is_training({"training": "yes"}) is False
    assert regularized.inactive_state(torch.ones(2), {}) == {}


def test_repeated_regularizers_get_numbered_terms_and_test_mode_zeros():
    regularized = RegularizedSolve([lx.KineticRegularization(), lx.KineticRegularization()], (0.0, 1.0),
                                   lx.Tsit5(), None)
    assert regularized.term_names() == ("KineticRegularization_1", "KineticRegularization_2")
    st = regularized.init_state(torch.Generator().manual_seed(0))
    assert st["training"] is True and isinstance(st["rng"], int)
    zeros = regularized.inactive_state(torch.ones(2, dtype=F64), st)
    assert zeros["regularization_nfe"] == 0 and set(zeros["regularization_terms"]) == set(st["regularization_terms"])
    with pytest.raises(lx.LayerError, match="Python bool"):
        regularized.is_training({**st, "training": 1})
    with pytest.raises(lx.LayerError, match="int key"):
        regularized.solve(_scalar_field(1.0), torch.ones(2, 1, dtype=F64), {"a": torch.tensor(1.0, dtype=F64)},
                          {**st, "rng": -1})


def test_messages_name_the_owning_layer():
    with pytest.raises(ValueError, match="^MyLayer: .*saveat"):
        RegularizedSolve(lx.STEER(0.5), (0.0, 1.0), lx.Tsit5(), None, saveat=[0.5], owner="MyLayer")
    with pytest.raises(TypeError, match="^MyLayer: regularize must be"):
        as_regularizers([lx.STEER(0.5), "kinetic"], "MyLayer")
    assert as_regularizers(None) == () and len(as_regularizers(lx.STEER(0.5))) == 1


def test_solution_state_reads_the_solves_own_backward_record():
    prob = lx.ODEProblem(lambda u, p, t: -p * u, torch.ones(3, dtype=F64), (0.0, 1.0),
                         torch.tensor(0.5, dtype=F64, requires_grad=True))
    direct = solution_state(lx.solve(prob, lx.Tsit5(), saveat=[1.0]))
    assert direct["backward_stats"] == {} and direct["nfe"] > 0
    sol = lx.solve(prob, lx.Tsit5(), saveat=[1.0], sensealg=lx.BacksolveAdjoint())
    state = solution_state(sol)
    sol.u[-1].sum().backward()
    assert state["backward_stats"]["nf"] > 0
