"""FFJORD: log-densities against closed forms, the trace estimator's statistics, sampling and its
inverse, gradients under every sensealg, the regularizers that share the trace probe, bad inputs."""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

import pylux as lx
from pylux import nn
from pylux.core.random import split_key
from pylux.regularize import (ErrorEstimateRegularization, JacobianFrobeniusRegularization, KineticRegularization,
                              LocalErrorRegularization, STEER, TaylorRegularization, rademacher_like)

F64 = torch.float64
TIGHT = dict(reltol=1e-10, abstol=1e-10)


def linear_flow(A, T=1.0, **kw):
    d = A.shape[0]
    flow = lx.FFJORD(nn.Dense(d, d, use_bias=False), (0.0, T), **kw)
    ps, st = lx.setup(torch.Generator().manual_seed(0), flow)
    ps = {"weight": torch.as_tensor(A, dtype=F64)}
    return flow, ps, st


def mlp_flow(d=2, hidden=8, seed=0, **kw):
    model = nn.Chain(nn.Dense(d, hidden, torch.tanh), nn.Dense(hidden, d))
    flow = lx.FFJORD(model, (0.0, 1.0), base=lx.StandardNormal(d), **kw)
    ps, st = lx.setup(torch.Generator().manual_seed(seed), flow)
    ps = lx.tree_map(lambda p: p.to(F64), ps)
    return flow, ps, st


def call_probe(st, x):
    """The Rademacher probe a call with state ``st`` draws (the first draw of its generator)."""
    seed, _ = split_key(st["rng"])
    return rademacher_like(x, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------- closed forms

A3 = np.array([[-0.5, 0.8, 0.1], [-0.3, 0.2, 0.6], [0.4, -0.7, -0.1]])


def test_linear_field_exact_trace_and_pushed_forward_gaussian():
    T = 0.7
    flow, ps, st = linear_flow(A3, T, trace="exact", **TIGHT)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    log_p, st2 = flow(x, ps, st)
    z1, delta, _ = flow.transform(x, ps, st)
    torch.testing.assert_close(lx.StandardNormal(3).log_prob(z1) - delta, log_p, rtol=0, atol=0)
    torch.testing.assert_close(delta, torch.full((6,), -np.trace(A3) * T, dtype=F64), rtol=0, atol=1e-12)
    # x = exp(-AT) z with z ~ N(0, I): x ~ N(0, exp(-AT) exp(-AT)^T)
    M = scipy.linalg.expm(-A3 * T)
    expected = scipy.stats.multivariate_normal(np.zeros(3), M @ M.T).logpdf(x.numpy())
    np.testing.assert_allclose(log_p.detach().numpy(), expected, rtol=0, atol=1e-9)
    assert st2["nvjp"] == 3 * st2["nfe"]  # exact: one VJP per dimension per evaluation


def test_linear_field_hutchinson_is_exact_for_a_diagonal_field_and_holds_its_probe():
    # Rademacher: eps^T A eps = tr A + sum_{i != j} eps_i eps_j A_ij, exact when A is diagonal
    T = 1.3
    diag = np.diag([-0.4, 0.9, 0.25])
    flow, ps, st = linear_flow(diag, T, **TIGHT)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    _, delta, st2 = flow.transform(x, ps, st)
    torch.testing.assert_close(delta, torch.full((5,), -np.trace(diag) * T, dtype=F64), rtol=0, atol=1e-12)
    assert st2["nvjp"] == st2["nfe"]
    # a general A: the estimate is -T eps^T A eps for the probe drawn from st's generator, fixed in time
    flow, ps, st = linear_flow(A3, T, **TIGHT)
    _, delta, _ = flow.transform(x, ps, st)
    eps = call_probe(st, x)
    A = torch.as_tensor(A3)
    torch.testing.assert_close(delta, -T * ((eps @ A.T) * eps).sum(1), rtol=0, atol=1e-12)


def test_time_dependent_linear_field():
    # f(z, t) = t * diag(a) z: delta = -tr(diag a) T^2 / 2 and z(T) = exp(a T^2 / 2) z0
    a = torch.tensor([-0.6, 0.4], dtype=F64)
    model = nn.WrappedFunction(lambda zt: zt[1] * zt[0] * a)
    flow = lx.FFJORD(model, (0.0, 1.5), time_input=True, **TIGHT)
    ps, st = lx.setup(torch.Generator().manual_seed(0), flow)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    log_p, _ = flow(x, ps, st)
    z1 = x * torch.exp(a * 1.5 ** 2 / 2)
    expected = lx.StandardNormal(2).log_prob(z1) + a.sum() * 1.5 ** 2 / 2
    torch.testing.assert_close(log_p, expected, rtol=0, atol=1e-9)


# --------------------------------------------------------------------- the estimator's statistics

def test_exact_trace_is_the_mean_of_many_hutchinson_probes():
    # one point repeated: each row draws its own probe; on a fixed grid the trajectory is shared and the
    # discrete estimate is linear in eps eps^T, so its mean is the discrete exact value
    n = 4000
    for probe in ("rademacher", "gaussian"):
        flow, ps, st = mlp_flow(probe=probe, solver=lx.RK4(), dt=0.1)
        exact_flow, _, _ = mlp_flow(trace="exact", solver=lx.RK4(), dt=0.1)
        x = torch.tensor([[0.3, -0.8]], dtype=F64).repeat(n, 1)
        estimates, _ = flow(x, ps, st)
        exact, _ = exact_flow(x[:1], ps, st)
        se = estimates.std() / math.sqrt(n)
        assert estimates.std() > 1e-3  # the probes differ row by row
        assert abs(estimates.mean() - exact[0]) < 4 * se, (probe, float(estimates.mean()), float(exact[0]),
                                                            float(se))


def test_rademacher_variance_is_the_closed_form():
    # linear field: delta = -T eps^T A eps, Var = T^2 sum_{i != j} (A_ij^2 + A_ij A_ji) for Rademacher
    # and T^2 sum_{i, j} (A_ij^2 + A_ij A_ji) for a Gaussian probe
    T, n = 1.0, 40000
    off = ~np.eye(3, dtype=bool)
    closed = {"rademacher": T ** 2 * (A3 ** 2 + A3 * A3.T)[off].sum(),
              "gaussian": T ** 2 * (A3 ** 2 + A3 * A3.T).sum()}
    x = torch.zeros(n, 3, dtype=F64)
    for probe, variance in closed.items():
        flow, ps, st = linear_flow(A3, T, probe=probe)
        _, delta, _ = flow.transform(x, ps, st)
        sample_var = float(delta.var())
        # standard error of a sample variance: sqrt((m4 - var^2) / n), m4 the fourth central moment
        centred = delta - delta.mean()
        se = math.sqrt(float((centred.pow(4).mean() - centred.pow(2).mean() ** 2)) / n)
        assert abs(sample_var - variance) < 4 * se, (probe, sample_var, variance, se)
        assert se < 0.03 * variance


# --------------------------------------------------------------------- a trained flow

def _train(flow, ps, st, data, steps, lr=2e-2, batch=256, seed=0):
    leaves = lx.tree_map(lambda p: p.detach().clone().requires_grad_(True), ps)
    params = [p for p in _leaves(leaves)]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        log_p, st = flow(data[idx], leaves, st)
        loss = -log_p.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lx.tree_map(lambda p: p.detach(), leaves), st


def _leaves(tree):
    from pylux.core import tree_leaves
    return tree_leaves(tree)


@pytest.fixture(scope="module")
def trained_moons():
    x, _ = lx.data.two_moons(2000, noise=0.1, rng=torch.Generator().manual_seed(0), dtype=F64)
    x = (x - x.mean(0)) / x.std(0)
    flow, ps, st = mlp_flow(hidden=16, reltol=1e-4, abstol=1e-4)
    ps, st = _train(flow, ps, st, x, steps=40)
    return flow, ps, st, x


def test_trained_density_integrates_to_one(trained_moons):
    flow, ps, st, data = trained_moons
    exact = lx.FFJORD(flow.model, flow.tspan, trace="exact", reltol=1e-7, abstol=1e-7)
    h, lim = 0.1, 6.0
    axis = torch.arange(-lim + h / 2, lim, h, dtype=F64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        log_p, _ = exact(grid, ps, st)
        nll_start = -mlp_flow(hidden=16, trace="exact")[0](data[:500], mlp_flow(hidden=16)[1], st)[0].mean()
        nll_trained = -exact(data[:500], ps, st)[0].mean()
    mass = float(log_p.exp().sum() * h * h)
    assert abs(mass - 1.0) < 1e-2, mass
    assert nll_trained < nll_start - 0.05  # training moved the density towards the data


def test_sample_then_inverse_returns_the_base_points(trained_moons):
    flow, ps, st, _ = trained_moons
    tight = lx.FFJORD(flow.model, flow.tspan, base=lx.StandardNormal(2), **TIGHT)
    g = torch.Generator().manual_seed(5)
    x = tight.sample(300, ps, st, g)
    z0 = lx.StandardNormal(2).sample(300, torch.Generator().manual_seed(5), dtype=F64)
    assert x.shape == (300, 2) and x.dtype == F64
    assert (x - z0).abs().max() > 0.1  # the flow moved the points
    torch.testing.assert_close(tight.encode(x, ps, st), z0, rtol=0, atol=1e-5)
    torch.testing.assert_close(tight.inverse(tight.encode(x, ps, st), ps, st), x, rtol=0, atol=1e-5)


# --------------------------------------------------------------------- gradients

SENSEALGS = {
    "direct": lx.DirectAdjoint(),
    "backsolve": lx.BacksolveAdjoint(),
    "backsolve_seminorm": lx.BacksolveAdjoint(seminorm=True),
    "interpolating": lx.InterpolatingAdjoint(),
    "interpolating_checkpointed": lx.InterpolatingAdjoint(checkpointing=2),
    "quadrature": lx.QuadratureAdjoint(),
    "reversible": lx.ReversibleAdjoint(),
}


def _nll_and_grad(flow, ps, st, x):
    leaves = lx.tree_map(lambda p: p.detach().clone().requires_grad_(True), ps)
    log_p, st2 = flow(x, leaves, st)
    loss = -log_p.mean()
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in _leaves(leaves)]), st2


def _directional_fd(flow, ps, st, x, v, h=1e-5):
    from pylux.core import flatten
    flat, unflatten = flatten(ps)
    with torch.no_grad():
        up = -flow(x, unflatten(flat + h * v), st)[0].mean()
        down = -flow(x, unflatten(flat - h * v), st)[0].mean()
    return float((up - down) / (2 * h))


@pytest.mark.parametrize("name", list(SENSEALGS))
def test_nll_gradient_under_each_sensealg_matches_finite_differences(name):
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    flow, ps, st = mlp_flow(sensealg=SENSEALGS[name], reltol=1e-9, abstol=1e-9)
    reference, _, _ = mlp_flow(reltol=1e-9, abstol=1e-9)
    _, g, st2 = _nll_and_grad(flow, ps, st, x)
    _, g_direct, _ = _nll_and_grad(reference, ps, st, x)
    v = torch.randn(g.shape, generator=torch.Generator().manual_seed(8), dtype=F64)
    fd = _directional_fd(reference, ps, st, x, v)
    assert abs(float(g @ v) - fd) < 1e-5 * max(1.0, abs(fd)), (name, float(g @ v), fd)
    torch.testing.assert_close(g, g_direct, rtol=1e-5, atol=1e-7)
    if name not in ("direct",):
        assert st2["backward_stats"]["nf"] > 0  # the backward pass's counters reach the state


@pytest.mark.parametrize("solver", [lx.Midpoint(), lx.RK4(), lx.Euler()])
def test_fixed_step_flows_reversible_equals_backprop(solver):
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    results = {}
    for name, sensealg in (("backprop", None), ("reversible", lx.ReversibleAdjoint(backprop=True)),
                           ("reversible_o1", lx.ReversibleAdjoint()), ("backsolve", lx.BacksolveAdjoint())):
        flow, ps, st = mlp_flow(solver=solver, sensealg=sensealg, dt=0.05, adaptive=False)
        results[name] = _nll_and_grad(flow, ps, st, x)
    # the reversible solve's gradient is the exact gradient of its own discrete solve
    torch.testing.assert_close(results["reversible_o1"][1], results["reversible"][1], rtol=1e-9, atol=1e-11)
    flow, ps, st = mlp_flow(solver=solver, dt=0.05, adaptive=False)
    v = torch.randn(results["backprop"][1].shape, generator=torch.Generator().manual_seed(10), dtype=F64)
    fd = _directional_fd(flow, ps, st, x, v)
    assert abs(float(results["backprop"][1] @ v) - fd) < 1e-6 * max(1.0, abs(fd))
    # the continuous adjoint and the reversible method approximate the same gradient at the solver's order
    assert abs(results["backsolve"][0] - results["backprop"][0]) < 1e-12
    torch.testing.assert_close(results["reversible"][1], results["backprop"][1], rtol=0.05, atol=2e-3)


def test_reversible_counts_every_evaluation_of_the_flow():
    # RK4, 4 steps. Forward: each step takes Psi_h(Z_n) (4 evaluations) and every step but the last
    # completes Z_{n+1} with Psi_{-h}(Y_{n+1}) (4 more): 28, one trace VJP each. (The last step's
    # increment, once computed after the loop, only completed Z_N, which nothing reads; it was not
    # counted either: nfe 28 against 32 trace VJPs.) Backward: the same 7 base steps rebuilt on the
    # tape (28 evaluations), each differentiated once (7 VJPs through a whole base step).
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    flow, ps, st = mlp_flow(solver=lx.RK4(), dt=0.25, adaptive=False, sensealg=lx.ReversibleAdjoint())
    _, g, st2 = _nll_and_grad(flow, ps, st, x)
    assert (st2["nfe"], st2["nvjp"], st2["naccept"]) == (28, 28, 4)
    back = st2["backward_stats"]
    assert (back["nf"], back["nvjp"], back["nsteps"]) == (28, 7, 4)
    reference, _, _ = mlp_flow(solver=lx.RK4(), dt=0.25, adaptive=False, sensealg=lx.ReversibleAdjoint(backprop=True))
    _, g_reference, _ = _nll_and_grad(reference, ps, st, x)
    torch.testing.assert_close(g, g_reference, rtol=1e-12, atol=1e-14)
    # adaptive Tsit5: two evaluations of the initial step-size heuristic; per accepted step 7 for the
    # forward increment (its 7th stage gives the error estimate) and 6 for the backward one (FSAL's last
    # stage skipped), which the last step does not need; 7 per rejected step. The sweep rebuilds both
    # increments without error estimates: 6 + 6 per step, 6 in the last
    flow, ps, st = mlp_flow(sensealg=lx.ReversibleAdjoint(), reltol=1e-6, abstol=1e-6)
    _, _, st2 = _nll_and_grad(flow, ps, st, x)
    assert st2["nfe"] == st2["nvjp"] == 2 + 13 * st2["naccept"] - 6 + 7 * st2["nreject"]
    assert st2["backward_stats"]["nf"] == 12 * st2["naccept"] - 6


def test_fixed_step_options_reach_the_flow_solve():
    # f(z) = A z on RK4's grid of h = 0.25: z(1) = P(hA)^4 x with P the degree-4 Taylor polynomial
    # of exp (not expm(A)), and the trace channel (constant rate) is integrated exactly
    A = np.array([[-0.5, 1.4], [-0.9, 0.3]])
    flow, ps, st = linear_flow(A, 1.0, trace="exact", solver=lx.RK4(), dt=0.25, adaptive=False)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    z1, delta, st2 = flow.transform(x, ps, st)
    hA = 0.25 * A
    step = np.eye(2) + hA + hA @ hA / 2 + hA @ hA @ hA / 6 + hA @ hA @ hA @ hA / 24
    expected = x.numpy() @ np.linalg.matrix_power(step, 4).T
    np.testing.assert_allclose(z1.numpy(), expected, rtol=0, atol=1e-13)
    assert np.abs(expected - x.numpy() @ scipy.linalg.expm(A).T).max() > 1e-5  # the grid is visible
    torch.testing.assert_close(delta, torch.full((4,), -np.trace(A), dtype=F64), rtol=0, atol=1e-13)
    assert st2["nfe"] == 16


# --------------------------------------------------------------------- regularizers

def _count_autograd_grads(monkeypatch):
    calls = [0]
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


def test_rnode_terms_reuse_the_trace_probe_at_no_extra_vjp(monkeypatch):
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(11), dtype=F64)
    flow, ps, st = mlp_flow(regularize=[KineticRegularization(), JacobianFrobeniusRegularization()], **TIGHT)
    seed, _ = split_key(st["rng"])
    # the same probe, drawn by the regularizer itself: its integrand then takes its own VJP
    own = JacobianFrobeniusRegularization(generator=torch.Generator().manual_seed(seed))
    separate, _, _ = mlp_flow(regularize=[KineticRegularization(), own], **TIGHT)
    calls = _count_autograd_grads(monkeypatch)
    log_p, st_shared = flow(x, ps, st)
    shared_calls = calls[0]
    calls[0] = 0
    log_p_sep, st_sep = separate(x, ps, st)
    separate_calls = calls[0]
    assert shared_calls == st_shared["nfe"] == st_shared["nvjp"]  # one VJP per evaluation: the trace's
    assert separate_calls == 2 * st_sep["nfe"]                      # the regularizer's own VJP on top
    torch.testing.assert_close(log_p, log_p_sep, rtol=0, atol=1e-12)
    for name in ("KineticRegularization", "JacobianFrobeniusRegularization"):
        a, b = st_shared["regularization_terms"][name], st_sep["regularization_terms"][name]
        assert float(a) > 1e-3
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    # and they equal the same terms computed on a NeuralODE of the same field (the same probe)
    node = lx.NeuralODE(flow.model, (0.0, 1.0), regularize=[KineticRegularization(), JacobianFrobeniusRegularization(
        generator=torch.Generator().manual_seed(seed))], **TIGHT)
    _, node_st = node(x, ps, lx.setup(torch.Generator().manual_seed(0), node)[1])
    for name in ("KineticRegularization", "JacobianFrobeniusRegularization"):
        torch.testing.assert_close(st_shared["regularization_terms"][name], node_st["regularization_terms"][name],
                                   rtol=1e-7, atol=0)


def test_exact_trace_gives_the_exact_frobenius_term():
    A = np.array([[0.3, -0.9], [0.5, 0.1]])
    flow, ps, st = linear_flow(A, 2.0, trace="exact", regularize=JacobianFrobeniusRegularization(), **TIGHT)
    _, st2 = flow(torch.randn(3, 2, dtype=F64), ps, st)
    torch.testing.assert_close(st2["regularization"], torch.tensor((A ** 2).sum() * 2.0, dtype=F64),
                               rtol=1e-12, atol=0)


def test_taylor_and_local_error_regularizers_work_on_the_flow_unchanged():
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(12), dtype=F64)
    regs = [TaylorRegularization(order=2), LocalErrorRegularization(t_reg=0.4, dt=0.1)]
    flow, ps, st = mlp_flow(regularize=regs, sensealg=lx.BacksolveAdjoint(), **TIGHT)
    node = lx.NeuralODE(flow.model, (0.0, 1.0), regularize=regs, **TIGHT)
    _, st_flow = flow(x, ps, st)
    _, st_node = node(x, ps, lx.setup(torch.Generator().manual_seed(0), node)[1])
    for name in ("TaylorRegularization", "LocalErrorRegularization"):
        assert float(st_flow["regularization_terms"][name]) > 0
        torch.testing.assert_close(st_flow["regularization_terms"][name], st_node["regularization_terms"][name],
                                   rtol=1e-6, atol=0)
    # the values are differentiable in the parameters through the adjoint
    leaves = lx.tree_map(lambda p: p.clone().requires_grad_(True), ps)
    log_p, st2 = flow(x, leaves, st)
    (st2["regularization"] - log_p.mean()).backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in _leaves(leaves))


def test_global_error_regularizer_with_direct_and_refused_under_an_adjoint():
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(13), dtype=F64)
    flow, ps, st = mlp_flow(regularize=ErrorEstimateRegularization(), sensealg=lx.DirectAdjoint(),
                            reltol=1e-5, abstol=1e-5)
    leaves = lx.tree_map(lambda p: p.clone().requires_grad_(True), ps)
    _, st2 = flow(x, leaves, st)
    value = st2["regularization"]
    assert value > 0
    value.backward()
    assert leaves["layer_1"]["weight"].grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="LocalErrorRegularization"):
        mlp_flow(regularize=ErrorEstimateRegularization(), sensealg=lx.BacksolveAdjoint())


def test_train_and_test_mode():
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(14), dtype=F64)
    flow, ps, st = mlp_flow(regularize=KineticRegularization())
    a, st1 = flow(x, ps, st)
    b, _ = flow(x, ps, st)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same state, the same probe
    c, _ = flow(x, ps, st1)
    assert (a - c).abs().max() > 0  # the key advanced: a new probe
    _, st_test = flow(x, ps, lx.testmode(st))
    assert float(st_test["regularization"]) == 0.0 and st_test["regularization_nfe"] == 0
    assert float(st1["regularization"]) > 0


def test_float32():
    flow, ps, st = mlp_flow()
    ps = lx.tree_map(lambda p: p.float(), ps)
    log_p, _ = flow(torch.randn(5, 2), ps, st)
    assert log_p.dtype == torch.float32 and torch.isfinite(log_p).all()


# --------------------------------------------------------------------- bad inputs

def test_bad_inputs_are_refused_clearly():
    model = nn.Dense(2, 2)
    with pytest.raises(ValueError, match="trace must be one of"):
        lx.FFJORD(model, (0, 1), trace="hutch")
    with pytest.raises(ValueError, match="probe must be one of"):
        lx.FFJORD(model, (0, 1), probe="normal")
    with pytest.raises(TypeError, match="model must be a pylux layer"):
        lx.FFJORD(torch.nn.Linear(2, 2), (0, 1))
    with pytest.raises(TypeError, match="base must be a distribution"):
        lx.FFJORD(model, (0, 1), base=2)
    with pytest.raises(ValueError, match="empty"):
        lx.FFJORD(model, (1, 1))
    with pytest.raises(TypeError, match="reltol"):
        lx.FFJORD(model, (0, 1), reltoll=1e-3)
    with pytest.raises(TypeError, match="chosen by the layer"):
        lx.FFJORD(model, (0, 1), saveat=[0.5])
    with pytest.raises(ValueError, match="changes the end time"):
        lx.FFJORD(model, (0, 1), regularize=STEER(0.1))
    with pytest.raises(TypeError, match="instance"):
        lx.FFJORD(model, (0, 1), sensealg=lx.BacksolveAdjoint)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        lx.StandardNormal(0)
    flow, ps, st = mlp_flow()
    with pytest.raises(lx.LayerError, match="shape \\(batch, d\\)"):
        flow(torch.zeros(2, dtype=F64), ps, st)
    with pytest.raises(lx.LayerError, match="floating-point"):
        flow(torch.zeros(2, 2, dtype=torch.int64), ps, st)
    with pytest.raises(lx.LayerError, match="dimension 3 but base has dim 2"):
        flow(torch.zeros(2, 3, dtype=F64), ps, st)
    with pytest.raises(TypeError, match="torch.Generator"):
        flow.sample(3, ps, st, generator=0)
    bad = lx.FFJORD(nn.Dense(2, 3), (0, 1))
    bps, bst = lx.setup(torch.Generator().manual_seed(0), bad)
    with pytest.raises(Exception, match="shape"):
        bad(torch.zeros(2, 2), bps, bst)
    nobase = lx.FFJORD(model, (0, 1))
    with pytest.raises(ValueError, match="StandardNormal\\(d\\)"):
        nobase.sample(3, ps, st, torch.Generator())
