"""The NeuralODE layer."""

import pytest
import torch

import pylux as lx
from pylux import nn

F64 = torch.float64


def linear_node(**kwargs):
    return lx.NeuralODE(nn.Dense(3, 3, use_bias=False), (0.0, 1.0), lx.Tsit5(), reltol=1e-10,
                        abstol=1e-10, **kwargs)


def test_linear_neural_ode_equals_matrix_exponential():
    layer = linear_node()
    ps, st = lx.setup(torch.Generator().manual_seed(0), layer, dtype=F64)
    x = torch.randn(4, 3, dtype=F64)
    y, st_new = layer(x, ps, st)
    expected = x @ torch.linalg.matrix_exp(ps["weight"]).T
    torch.testing.assert_close(y, expected, rtol=1e-8, atol=1e-9)
    assert st_new["nfe"] > 0 and st_new["naccept"] > 0 and st["nfe"] == 0  # old state untouched


def test_saveat_returns_trajectory():
    layer = linear_node(saveat=[0.25, 0.5, 1.0])
    ps, st = lx.setup(torch.Generator().manual_seed(1), layer, dtype=F64)
    x = torch.randn(2, 3, dtype=F64)
    y, _ = layer(x, ps, st)
    assert y.shape == (3, 2, 3)
    expected = x @ torch.linalg.matrix_exp(0.5 * ps["weight"]).T
    torch.testing.assert_close(y[1], expected, rtol=1e-8, atol=1e-9)


def test_backsolve_gradients_equal_direct_inside_a_chain():
    def build(sensealg):
        return nn.Chain(nn.Dense(2, 3, torch.tanh),
                        lx.NeuralODE(nn.Chain(nn.Dense(3, 8, torch.tanh), nn.Dense(8, 3)), (0.0, 1.0),
                                     sensealg=sensealg, reltol=1e-9, abstol=1e-9),
                        nn.Dense(3, 1))
    x = torch.randn(5, 2, dtype=F64)
    grads = []
    for sensealg in (None, lx.BacksolveAdjoint(seminorm=True)):
        model = build(sensealg)
        ps, st = lx.setup(torch.Generator().manual_seed(2), model, dtype=F64)
        leaves = lx.core.tree_leaves(ps)
        for leaf in leaves:
            leaf.requires_grad_(True)
        y, _ = model(x, ps, st)
        grads.append(torch.autograd.grad((y ** 2).sum(), leaves))
    for g_direct, g_back in zip(*grads):
        torch.testing.assert_close(g_back, g_direct, rtol=1e-6, atol=1e-8)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="did you mean 'reltol'"):
        lx.NeuralODE(nn.Dense(3, 3), (0.0, 1.0), reltl=1e-3)
    with pytest.raises(TypeError, match="model must be a pylux layer"):
        lx.NeuralODE(torch.tanh, (0.0, 1.0))
    layer = linear_node()
    ps, st = lx.setup(torch.Generator().manual_seed(0), layer)
    with pytest.raises(lx.LayerError, match="NeuralODE"):
        layer(torch.ones(2, 3, dtype=torch.int64), ps, st)


@pytest.mark.parametrize("sensealg", [lx.BacksolveAdjoint(), lx.QuadratureAdjoint(), lx.ReversibleAdjoint()],
                         ids=repr)
def test_state_holds_a_handle_to_the_backward_counters(sensealg):
    layer = linear_node(sensealg=sensealg)
    ps, st = lx.setup(torch.Generator().manual_seed(3), layer, dtype=F64)
    assert st["backward_stats"] == {}
    ps = lx.tree_map(lambda x: x.requires_grad_(True), ps)
    y, st_first = layer(torch.randn(4, 3, dtype=F64), ps, st)
    _, st_second = layer(torch.randn(4, 3, dtype=F64), ps, st)
    assert st_first["backward_stats"] == {}  # filled only when this solve's backward runs
    y.sum().backward()
    assert st_first["backward_stats"]["nf"] > 0 and st_first["backward_stats"]["nvjp"] > 0
    assert st_second["backward_stats"] == {}  # each solve has its own record
