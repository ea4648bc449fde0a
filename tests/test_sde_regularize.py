"""The solver-heuristic regularizers on SDE solves: the same regularizers, no SDE special case."""

import pytest
import torch

import pylux as lx
from pylux import nn

F64 = torch.float64


def neural_sde(regularize, sensealg=None, solver=None):
    layer = lx.NeuralSDE(nn.Dense(2, 2, torch.tanh), nn.Chain(nn.Scale(2), nn.WrappedFunction(
        lambda x: 0.2 * torch.sigmoid(x))), (0.0, 1.0), solver=solver or lx.SOSRI(), regularize=regularize,
        sensealg=sensealg, reltol=1e-2, abstol=1e-2)
    ps, st = lx.setup(torch.Generator().manual_seed(0), layer, dtype=F64)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    return layer, ps, st, x


def test_error_estimate_regularization_is_differentiable_on_the_sde_steps():
    f = lambda u, p, t: -p * u ** 3  # noqa: E731
    g = lambda u, p, t: 0.3 * u  # noqa: E731
    p = torch.tensor(1.5, dtype=F64, requires_grad=True)
    W = lx.BrownianTree(0.0, 1.0, (8, 2), seed=0, dtype=F64, levy_area="space-time")
    prob = lx.SDEProblem(f, g, torch.ones(8, 2, dtype=F64), (0.0, 1.0), p, brownian=W)
    sol = lx.solve(prob, lx.SOSRI(), reltol=1e-2, abstol=1e-2, save_stats=True)
    n = sol.stats.naccept
    assert sol.stats.error_estimate.shape == (n,) and sol.stats.t.shape == (n,)
    value = (sol.stats.error_estimate * sol.stats.dt.abs()).sum()
    (grad,) = torch.autograd.grad(value, p)
    assert torch.isfinite(grad) and grad.abs() > 0
    # the layer reports the same number as the hand sum of its own solve
    layer, ps, st, x = neural_sde(lx.ErrorEstimateRegularization())
    _, st1 = layer(x, ps, st)
    assert st1["regularization"].item() > 0 and st1["naccept"] > 0


@pytest.mark.parametrize("sensealg", [None, lx.BacksolveAdjoint()], ids=repr)
def test_local_regularization_flows_to_drift_and_diffusion_under_each_sensealg(sensealg):
    layer, ps, st, x = neural_sde(lx.LocalErrorRegularization(sampling="unbiased"), sensealg=sensealg)
    leaves = lx.core.tree_leaves(ps)
    for leaf in leaves:
        leaf.requires_grad_(True)
    y, st1 = layer(x, ps, st)
    value = st1["regularization"]
    assert value.item() > 0 and st1["regularization_nfe"] > 0
    grads = torch.autograd.grad(value, leaves, allow_unused=True, retain_graph=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    (y.sum() + value).backward()  # the output's gradient flows through the sensealg at the same time


@pytest.mark.parametrize("sensealg", [None, lx.BacksolveAdjoint()], ids=repr)
def test_unbiased_local_step_near_t1_stays_inside_the_brownian_span(sensealg):
    # regression: the step from t_r took the size of the accepted step containing t_r, so for t_r near t1
    # it ended past t1, where the solve's Brownian tree refuses to be queried
    t_reg = 1.0 - 1e-3
    layer, ps, st, x = neural_sde(lx.LocalErrorRegularization(sampling="unbiased", t_reg=t_reg),
                                  sensealg=sensealg)
    _, st1 = layer(x, ps, st)
    value = st1["regularization"]
    assert torch.isfinite(value) and value.item() > 0
    # the shortened step has size 1e-3: the value is E_r * 1e-3 with E_r of a 1e-3 step, tiny but nonzero
    layer_mid, *_ = neural_sde(lx.LocalErrorRegularization(sampling="unbiased", t_reg=0.5), sensealg=sensealg)
    _, st_mid = layer_mid(x, ps, st)
    assert value.item() < 0.1 * st_mid["regularization"].item()
    # a fixed t_r at t1 leaves no step inside the span: zero
    layer_end, *_ = neural_sde(lx.LocalErrorRegularization(sampling="unbiased", t_reg=1.0), sensealg=sensealg)
    _, st_end = layer_end(x, ps, st)
    assert st_end["regularization"].item() == 0.0


def test_global_regularizers_need_a_differentiated_solver_on_sdes_too():
    with pytest.raises(NotImplementedError, match="LocalErrorRegularization"):
        neural_sde(lx.ErrorEstimateRegularization(), sensealg=lx.BacksolveAdjoint())


def test_integral_regularizers_are_refused_by_the_sde_layer():
    with pytest.raises(NotImplementedError, match="would diffuse"):
        neural_sde(lx.KineticRegularization())


def test_stiffness_regularization_on_an_sde_reads_the_drift_stages():
    # du = -lam u dt + 0.1 u dW: the drift stages' Lipschitz estimate is lam
    lam = 7.0
    W = lx.BrownianTree(0.0, 1.0, (4, 1), seed=2, dtype=F64, levy_area="space-time")
    prob = lx.SDEProblem(lambda u, p, t: -lam * u, lambda u, p, t: 0.1 * u, torch.ones(4, 1, dtype=F64), (0.0, 1.0),
                         brownian=W)
    for solver in (lx.SOSRI(), lx.SRIW1()):
        stiffness = lx.solve(prob, solver, reltol=1e-3, abstol=1e-3, save_stats=True).stats.stiffness
        torch.testing.assert_close(stiffness, torch.full_like(stiffness, lam), rtol=1e-6, atol=0)
    layer, ps, st, x = neural_sde(lx.StiffnessRegularization())
    _, st1 = layer(x, ps, st)
    assert st1["regularization"].item() > 0
