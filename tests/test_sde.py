"""SDEs: strong and weak orders on the same Brownian path, pathwise gradients, NeuralSDE, bad inputs."""

import math

import pytest
import torch

import pylux as lx
from pylux import nn
from pylux.diffeq.brownian import BrownianTree

F64 = torch.float64
PATHS = 300


def gbm(interpretation, mu=0.5, sigma=0.8, paths=PATHS, seed=0, noise="diagonal"):
    """Geometric Brownian motion du = mu u dt + sigma u dW and its exact solution on the same path."""
    shape = (paths, 1)
    W = BrownianTree(0.0, 1.0, shape, seed=seed, dtype=F64)
    u0 = torch.ones(shape, dtype=F64)
    prob = lx.SDEProblem(lambda u, p, t: mu * u, lambda u, p, t: sigma * u, u0, (0.0, 1.0),
                         noise=noise, interpretation=interpretation, brownian=W)
    drift = mu - 0.5 * sigma ** 2 if interpretation == "ito" else mu
    exact = u0 * torch.exp(torch.tensor(drift, dtype=F64) + sigma * W(1.0))
    return prob, exact


def strong_slope(solver, interpretation, dts=(2 ** -3, 2 ** -4, 2 ** -5, 2 ** -6), **kw):
    prob, exact = gbm(interpretation, **kw)
    errors = [(lx.solve(prob, solver, dt=dt).u[-1] - exact).abs().mean().item() for dt in dts]
    return math.log(errors[0] / errors[-1]) / math.log(dts[0] / dts[-1]), errors


@pytest.mark.parametrize("solver, interpretation, order, kw", [
    (lx.EulerMaruyama(), "ito", 0.5, {"mu": 0.1, "sigma": 1.0}),
    (lx.Milstein(), "ito", 1.0, {}),
    (lx.Milstein(interpretation="stratonovich"), "stratonovich", 1.0, {}),
    (lx.EulerHeun(), "stratonovich", 1.0, {}),
    (lx.ReversibleHeun(), "stratonovich", 1.0, {}),
], ids=repr)
def test_strong_order_on_geometric_brownian_motion(solver, interpretation, order, kw):
    slope, errors = strong_slope(solver, interpretation, **kw)
    assert abs(slope - order) < 0.25, (errors, slope)


def test_euler_maruyama_weak_order_one():
    # E[u(1)] = exp(mu): the bias of the mean over many paths shrinks like dt (same paths for every dt)
    mu = 1.0
    errors, dts = [], (0.25, 0.125, 0.0625)
    W = BrownianTree(0.0, 1.0, (20000, 1), seed=3, dtype=F64)
    for dt in dts:
        prob = lx.SDEProblem(lambda u, p, t: mu * u, lambda u, p, t: 0.3 * u, torch.ones(20000, 1, dtype=F64),
                             (0.0, 1.0), brownian=W)
        errors.append(abs(lx.solve(prob, lx.EulerMaruyama(), dt=dt).u[-1].mean().item() - math.exp(mu)))
    slope = math.log(errors[0] / errors[-1]) / math.log(dts[0] / dts[-1])
    assert abs(slope - 1.0) < 0.3, (errors, slope)


def test_scalar_and_general_noise_shapes():
    u0 = torch.ones(64, 3, dtype=F64)
    scalar = lx.SDEProblem(lambda u, p, t: -u, lambda u, p, t: 0.1 * u, u0, (0.0, 1.0), noise="scalar", seed=1)
    assert scalar.noise_shape == (64, 1)
    assert lx.solve(scalar, lx.EulerMaruyama(), dt=0.1).u.shape == (11, 64, 3)
    # general noise, two Brownian motions: du = B dW with B all ones gives u(1) - u(0) = W1(1) + W2(1) per entry
    W = BrownianTree(0.0, 1.0, (64, 2), seed=5, dtype=F64)
    for interpretation, solver in (("ito", lx.EulerMaruyama()), ("stratonovich", lx.EulerHeun())):
        general = lx.SDEProblem(lambda u, p, t: 0 * u, lambda u, p, t: torch.ones(*u.shape, 2, dtype=F64), u0,
                                (0.0, 1.0), noise="general", noise_dim=2, interpretation=interpretation, brownian=W)
        assert general.noise_shape == (64, 2)
        final = lx.solve(general, solver, dt=0.1).u[-1]
        torch.testing.assert_close(final - 1, W(1.0).sum(-1, keepdim=True).expand(64, 3))


def test_each_solve_draws_a_path_unless_one_is_fixed():
    prob = lx.SDEProblem(lambda u, p, t: 0 * u, lambda u, p, t: torch.ones_like(u), torch.zeros(1000, 1, dtype=F64),
                         (0.0, 1.0))
    a, b = (lx.solve(prob, lx.EulerMaruyama(), dt=0.5).u[-1] for _ in range(2))
    assert not torch.equal(a, b)
    # u(1) = W(1): standard normal (4 standard errors on the variance)
    assert abs(a.var().item() - 1.0) < 4 * math.sqrt(2 / 1000)
    seeded = lx.SDEProblem(prob.f, prob.g, prob.u0, (0.0, 1.0), seed=7)
    c, d = (lx.solve(seeded, lx.EulerMaruyama(), dt=0.5).u[-1] for _ in range(2))
    assert torch.equal(c, d)


def test_trajectories_solve_independent_paths_at_once():
    prob = lx.SDEProblem(lambda u, p, t: 0 * u, lambda u, p, t: torch.ones_like(u), torch.zeros(3, dtype=F64),
                         (0.0, 1.0), trajectories=500, seed=2)
    sol = lx.solve(prob, lx.EulerMaruyama(), dt=0.25)
    assert sol.u.shape == (5, 500, 3)
    final = sol.u[-1].reshape(-1)
    assert abs(final.mean().item()) < 4 / math.sqrt(1500) and abs(final.var().item() - 1) < 4 * math.sqrt(2 / 1500)


def test_pathwise_gradient_matches_finite_differences():
    W = BrownianTree(0.0, 1.0, (5, 2), seed=4, dtype=F64)
    u0 = torch.rand(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) + 0.5

    def loss(theta):
        prob = lx.SDEProblem(lambda u, p, t: -p[0] * u + torch.sin(u), lambda u, p, t: p[1] * torch.cos(u),
                             u0, (0.0, 1.0), theta, brownian=W, interpretation="stratonovich")
        return (lx.solve(prob, lx.EulerHeun(), dt=0.05).u[-1] ** 2).sum()

    theta = torch.tensor([0.7, 0.4], dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(theta), theta)
    eps = 1e-6
    fd = torch.stack([(loss(theta.detach() + eps * e) - loss(theta.detach() - eps * e)) / (2 * eps)
                      for e in torch.eye(2, dtype=F64)])
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)
    assert grad.abs().min() > 1e-3


def test_neural_sde_layer_modes_and_counters():
    layer = lx.NeuralSDE(nn.Dense(2, 2, torch.tanh), nn.Dense(2, 2, torch.sigmoid), (0.0, 1.0), dt=0.1)
    ps, st = lx.setup(torch.Generator().manual_seed(0), layer)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    y1, st1 = layer(x, ps, st)
    y2, _ = layer(x, ps, st1)
    assert not torch.equal(y1, y2) and st1["rng"] != st["rng"]  # train mode: a fresh path per call
    assert (st1["nfe"], st1["ng"], st1["naccept"]) == (20, 20, 10)  # EulerHeun: two f and two g per step
    test_st = lx.testmode(st1)
    a, t1 = layer(x, ps, test_st)
    b, _ = layer(x, ps, t1)
    assert torch.equal(a, b) and t1["rng"] == test_st["rng"]  # test mode: reproducible
    many = lx.NeuralSDE(nn.Dense(2, 2), nn.Dense(2, 2), (0.0, 1.0), trajectories=4, dt=0.5)
    ps4, st4 = lx.setup(torch.Generator().manual_seed(0), many)
    assert many(x, ps4, st4)[0].shape == (4, 8, 2)


def test_bad_inputs_are_refused_with_the_fix():
    u0 = torch.ones(4, 2, dtype=F64)
    f, g = (lambda u, p, t: -u), (lambda u, p, t: 0.1 * u)
    with pytest.raises(ValueError, match="EulerHeun\\(\\) cannot solve.*solves stratonovich SDEs, not ito.*"
                                         "EulerMaruyama\\(\\)"):
        lx.solve(lx.SDEProblem(f, g, u0, (0.0, 1.0)), lx.EulerHeun(), dt=0.1)
    with pytest.raises(TypeError, match="Tsit5\\(\\) is an ODE solver.*EulerMaruyama\\(\\)"):
        lx.solve(lx.SDEProblem(f, g, u0, (0.0, 1.0)), lx.Tsit5())
    with pytest.raises(ValueError, match="Milstein\\(\\) cannot solve.*not general"):
        lx.solve(lx.SDEProblem(f, lambda u, p, t: torch.ones(4, 2, 3, dtype=F64), u0, (0.0, 1.0), noise="general",
                               noise_dim=3), lx.Milstein(), dt=0.1)
    with pytest.raises(ValueError, match="g returned shape \\(4, 3\\) but diagonal noise needs g of u's shape"):
        lx.solve(lx.SDEProblem(f, lambda u, p, t: torch.ones(4, 3, dtype=F64), u0, (0.0, 1.0)),
                 lx.EulerMaruyama(), dt=0.1)
    with pytest.raises(ValueError, match="u0 contains NaN"):
        lx.SDEProblem(f, g, torch.tensor([[float("nan"), 0.0]]), (0.0, 1.0))
    with pytest.raises(ValueError, match="general noise needs noise_dim"):
        lx.SDEProblem(f, g, u0, (0.0, 1.0), noise="general")
    with pytest.raises(ValueError, match="noise must be one of"):
        lx.SDEProblem(f, g, u0, (0.0, 1.0), noise="multiplicative")
    with pytest.raises(NotImplementedError, match="does not differentiate SDE solves; use sensealg=DirectAdjoint"):
        lx.solve(lx.SDEProblem(f, g, u0, (0.0, 1.0)), lx.EulerMaruyama(), dt=0.1, sensealg=lx.InterpolatingAdjoint())
    with pytest.raises(ValueError, match="steps with a fixed dt; pass dt="):
        lx.solve(lx.SDEProblem(f, g, u0, (0.0, 1.0)), lx.EulerMaruyama())
    with pytest.raises(TypeError, match="needs a solver"):
        lx.solve(lx.SDEProblem(f, g, u0, (0.0, 1.0)))


def _rev_loss(theta, u0, alg, saveat=(0.37, 1.0), dt=0.01):
    W = BrownianTree(0.0, 1.0, (5, 2), seed=4, dtype=F64)
    prob = lx.SDEProblem(lambda u, p, t: -p[0] * u + torch.sin(u), lambda u, p, t: p[1] * torch.cos(u),
                         u0, (0.0, 1.0), theta, brownian=W, interpretation="stratonovich")
    sol = lx.solve(prob, lx.ReversibleHeun(), dt=dt, saveat=list(saveat), sensealg=alg)
    weights = torch.arange(1, len(saveat) + 1, dtype=F64).view(-1, 1, 1)
    return (weights * sol.u ** 2).sum(), sol


def test_reversible_heun_adjoint_is_the_exact_discrete_gradient_at_constant_memory():
    u0 = (torch.rand(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) + 0.5).requires_grad_(True)
    theta = torch.tensor([0.7, 0.4], dtype=F64, requires_grad=True)
    loss, sol = _rev_loss(theta, u0, lx.ReversibleAdjoint())
    grads = torch.autograd.grad(loss, [theta, u0])
    ref_loss, _ = _rev_loss(theta, u0, lx.ReversibleAdjoint(backprop=True))
    ref = torch.autograd.grad(ref_loss, [theta, u0])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-14, atol=0)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert sol.t.tolist() == pytest.approx([0.37, 1.0])  # saved values are states: the solve stepped onto them
    stats = sol.backward_stats
    assert stats["nsteps"] == 100 and stats["reconstruction_error"] < 1e-12
    # one drift and one diffusion evaluation and one VJP per node of the solve, as many as the forward takes
    assert (stats["nf"], stats["ng"], stats["nvjp"]) == (101, 101, 101)
    # a saved time at t0 and one that is not a step end of the default grid: still the backprop gradient
    loss, _ = _rev_loss(theta, u0, lx.ReversibleAdjoint(), saveat=(0.0, 0.37, 0.5, 1.0), dt=0.03)
    ref_loss, _ = _rev_loss(theta, u0, lx.ReversibleAdjoint(backprop=True), saveat=(0.0, 0.37, 0.5, 1.0), dt=0.03)
    for g, r in zip(torch.autograd.grad(loss, [theta, u0]), torch.autograd.grad(ref_loss, [theta, u0])):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # against central finite differences of the same discrete solve
    eps = 1e-6
    fd = torch.stack([(_rev_loss(theta.detach() + eps * e, u0.detach(), None)[0]
                       - _rev_loss(theta.detach() - eps * e, u0.detach(), None)[0]) / (2 * eps)
                      for e in torch.eye(2, dtype=F64)])
    torch.testing.assert_close(grads[0], fd, rtol=1e-5, atol=1e-8)


def test_reversible_heun_adjoint_saves_the_same_memory_for_10_and_200_steps():
    def saved(dt):
        total = [0]

        def pack(x):
            total[0] += x.numel() * x.element_size()
            return x
        u0 = torch.ones(5, 2, dtype=F64, requires_grad=True)
        theta = torch.tensor([0.7, 0.4], dtype=F64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            _rev_loss(theta, u0, lx.ReversibleAdjoint(), saveat=(1.0,), dt=dt)
        return total[0]
    assert saved(0.1) == saved(0.005)


def test_reversible_adjoint_on_an_sde_needs_reversible_heun():
    prob = lx.SDEProblem(lambda u, p, t: -u, lambda u, p, t: 0.1 * u, torch.ones(3, 1, dtype=F64), (0.0, 1.0),
                         interpretation="stratonovich")
    with pytest.raises(NotImplementedError, match="the solver must be ReversibleHeun"):
        lx.solve(prob, lx.EulerHeun(), dt=0.1, sensealg=lx.ReversibleAdjoint())


def _sde_grad(alg, solver, dt, interpretation, seed=4):
    W = BrownianTree(0.0, 1.0, (5, 2), seed=seed, dtype=F64)
    u0 = torch.rand(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) + 0.5
    theta = torch.tensor([0.7, 0.4], dtype=F64, requires_grad=True)
    prob = lx.SDEProblem(lambda u, p, t: -p[0] * u + torch.sin(u), lambda u, p, t: p[1] * torch.cos(u),
                         u0, (0.0, 1.0), theta, brownian=W, interpretation=interpretation)
    sol = lx.solve(prob, solver, dt=dt, saveat=[0.5, 1.0], sensealg=alg)
    return torch.autograd.grad((sol.u ** 2).sum(), theta)[0], sol


@pytest.mark.parametrize("solver", [lx.EulerHeun(), lx.ReversibleHeun()], ids=repr)
def test_stochastic_adjoint_converges_to_the_pathwise_gradient_stratonovich(solver):
    errors = []
    for dt in (0.01, 0.001):
        ref, _ = _sde_grad(None, solver, dt, "stratonovich")
        grad, sol = _sde_grad(lx.BacksolveAdjoint(), solver, dt, "stratonovich")
        errors.append(((grad - ref).abs().max() / ref.abs().max()).item())
    # measured: 2.6e-4 -> 2.7e-5 (EulerHeun), 2.1e-4 -> 1.1e-5 (ReversibleHeun): first order in dt
    assert errors[0] < 1e-3 and errors[1] < errors[0] / 5, errors
    assert sol.backward_stats["naccept"] == 1000 and sol.backward_stats["nvjp"] > 0


def test_stochastic_adjoint_of_an_ito_sde_converges_to_the_gradient():
    ref, _ = _sde_grad(None, lx.Milstein(), 1e-3, "ito")  # a fine pathwise reference
    errors = [((_sde_grad(lx.BacksolveAdjoint(), lx.Milstein(), dt, "ito")[0] - ref).abs().max()
               / ref.abs().max()).item() for dt in (0.04, 0.01)]
    _, sol = _sde_grad(lx.BacksolveAdjoint(), lx.Milstein(), 0.01, "ito")
    stats = sol.backward_stats
    # the backward solve is reversible Heun: one drift and one diffusion evaluation a step, plus one of each
    # at the start of each of the two segments (saveat = [0.5, 1.0])
    assert (stats["naccept"], stats["nf"], stats["ng"]) == (100, 102, 102), dict(stats)
    # measured 3.6e-3 -> 9.2e-4 (the Itô drift written in Stratonovich form, double backward, reversible Heun
    # backward); against a reference at dt = 1e-4 (the slow variant): 8.4e-4 -> 9.7e-5 from dt = 0.01 to 0.001
    assert errors[0] < 5e-3 and errors[1] < errors[0] / 2.5, errors


@pytest.mark.slow
def test_stochastic_adjoint_of_an_ito_sde_converges_to_a_fine_reference():
    ref, _ = _sde_grad(None, lx.Milstein(), 1e-4, "ito")
    errors = [((_sde_grad(lx.BacksolveAdjoint(), lx.Milstein(), dt, "ito")[0] - ref).abs().max()
               / ref.abs().max()).item() for dt in (0.01, 0.001)]
    assert errors[0] < 2e-3 and errors[1] < errors[0] / 4, errors


def test_only_the_sde_capable_adjoints_accept_an_sde():
    prob = lx.SDEProblem(lambda u, p, t: -u, lambda u, p, t: 0.1 * u, torch.ones(3, 1, dtype=F64), (0.0, 1.0))
    for alg in (lx.InterpolatingAdjoint(), lx.QuadratureAdjoint()):
        with pytest.raises(NotImplementedError, match="does not differentiate SDE solves"):
            lx.solve(prob, lx.EulerMaruyama(), dt=0.1, sensealg=alg)
    general = lx.SDEProblem(lambda u, p, t: -u, lambda u, p, t: torch.ones(3, 1, 2, dtype=F64),
                            torch.ones(3, 1, dtype=F64), (0.0, 1.0), noise="general", noise_dim=2)
    with pytest.raises(NotImplementedError, match="Itô SDE with general noise"):
        lx.solve(general, lx.EulerMaruyama(), dt=0.1, sensealg=lx.BacksolveAdjoint())


# --- regressions ------------------------------------------------------------------------------

def _linear_sde(saveat, sensealg, tspan=(0.0, 1.0), noise="diagonal", interpretation="stratonovich",
                g=None, solver=None, dt=1e-3):
    W = BrownianTree(min(tspan), max(tspan) + (tspan[0] == tspan[1]), (2,) if noise == "diagonal" else (1,), seed=1,
                     dtype=F64)
    p = {"a": torch.tensor(0.8, dtype=F64, requires_grad=True), "b": torch.tensor(0.3, dtype=F64, requires_grad=True)}
    u0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    g = g or (lambda u, p, t: p["b"] * u)
    prob = lx.SDEProblem(lambda u, p, t: -p["a"] * u + 0.2 * torch.sin(u), g, u0, tspan, p, brownian=W, noise=noise,
                         interpretation=interpretation)
    kw = {} if saveat is None else {"saveat": saveat}
    sol = lx.solve(prob, solver or lx.EulerHeun(), dt=dt, sensealg=sensealg, **kw)
    return torch.autograd.grad(sol.u.sum(), [u0, p["a"], p["b"]])


@pytest.mark.parametrize("saveat", [[0.0, 0.5, 1.0], None, [0.25, 0.5]], ids=["t0-saved", "default", "t1-unsaved"])
def test_stochastic_adjoint_counts_each_saved_time_once_and_starts_from_t1(saveat):
    grads = _linear_sde(saveat, lx.BacksolveAdjoint(), dt=2e-3) if saveat is not None else \
        _linear_sde(saveat, lx.BacksolveAdjoint(), dt=0.02)
    ref = _linear_sde(saveat, None, dt=2e-3) if saveat is not None else _linear_sde(saveat, None, dt=0.02)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=2e-2 if saveat is None else 2e-3, atol=1e-3)


def test_stochastic_adjoint_of_a_zero_length_span_is_the_identity():
    grads = _linear_sde(None, lx.BacksolveAdjoint(), tspan=(0.5, 0.5))
    torch.testing.assert_close(grads[0], torch.ones(2, dtype=F64))


def test_stochastic_adjoint_ito_scalar_noise_uses_the_jacobian_vector_product():
    # g couples the entries (scalar noise: one Brownian motion), so (dg/dz) g is not J^T g
    g = lambda u, p, t: p["b"] * torch.stack([u[1], torch.ones_like(u[0])])  # noqa: E731
    grads = _linear_sde([1.0], lx.BacksolveAdjoint(), noise="scalar", interpretation="ito", g=g,
                        solver=lx.EulerMaruyama(), dt=1e-3)
    ref = _linear_sde([1.0], None, noise="scalar", interpretation="ito", g=g, solver=lx.EulerMaruyama(), dt=1e-4)
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-3)


def test_stochastic_adjoint_ito_with_additive_noise():
    g = lambda u, p, t: p["b"] * torch.ones_like(u)  # noqa: E731
    grads = _linear_sde([1.0], lx.BacksolveAdjoint(), interpretation="ito", g=g, solver=lx.EulerMaruyama())
    ref = _linear_sde([1.0], None, interpretation="ito", g=g, solver=lx.EulerMaruyama())
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r, rtol=1e-2, atol=1e-3)


def test_reversible_heun_adjoint_with_a_float32_time_axis_keeps_every_saved_gradient():
    tspan = (torch.tensor(0.02687285, dtype=torch.float32), torch.tensor(1.1474338, dtype=torch.float32))
    W = BrownianTree(0.0, 1.2, (3, 1), seed=3, dtype=F64)
    theta = torch.tensor(0.5, dtype=F64, requires_grad=True)

    def grad(alg):
        prob = lx.SDEProblem(lambda u, p, t: -p * u, lambda u, p, t: 0.2 * u, torch.ones(3, 1, dtype=F64), tspan,
                             theta, brownian=W, interpretation="stratonovich")
        sol = lx.solve(prob, lx.ReversibleHeun(), dt=0.3, saveat=[0.4, 1.1474338], sensealg=alg)
        return torch.autograd.grad(sol.u.sum(), theta)[0]
    g, ref = grad(lx.ReversibleAdjoint()), grad(lx.ReversibleAdjoint(backprop=True))  # the same discrete solve
    assert ref.abs() > 0.1
    torch.testing.assert_close(g, ref, rtol=1e-9, atol=0)


def test_neural_sde_with_general_noise():
    layer = lx.NeuralSDE(nn.Dense(2, 2), nn.Chain(nn.Dense(2, 6), nn.WrappedFunction(lambda x: x.view(-1, 2, 3))),
                         (0.0, 1.0), noise="general", noise_dim=3, dt=0.25)
    ps, st = lx.setup(torch.Generator().manual_seed(0), layer)
    y, _ = layer(torch.randn(4, 2), ps, st)
    assert y.shape == (4, 2) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="general noise needs noise_dim"):
        lx.NeuralSDE(nn.Dense(2, 2), nn.Dense(2, 2), (0.0, 1.0), noise="general", dt=0.25)


def test_messages_name_solvers_that_fit():
    prob = lx.SDEProblem(lambda u, p, t: -u, lambda u, p, t: 0.1 * u, torch.ones(3, 1, dtype=F64), (0.0, 1.0),
                         interpretation="stratonovich")
    with pytest.raises(ValueError, match="Milstein\\(interpretation='stratonovich'\\)"):
        lx.solve(prob, lx.Milstein(), dt=0.1)
    with pytest.raises(ValueError, match="adaptive solver such as SOSRI\\(\\)"):
        lx.solve(prob, lx.EulerHeun())
