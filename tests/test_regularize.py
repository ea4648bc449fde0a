"""Regularizers of neural ODEs (ERNODE, SRNODE, local, STEER, RNODE) through the NeuralODE hook."""

import math

import numpy as np
import pytest
import scipy.integrate
import torch

import pylux as lx
from pylux import nn
from pylux.diffeq import make_options
from pylux.regularize import RegularizationContext

F64 = torch.float64
TSPAN = (0.0, 1.0)


def mlp():
    return nn.Chain(nn.Dense(2, 6, torch.tanh), nn.Dense(6, 2))


def build(regularize, sensealg=None, **kwargs):
    kwargs.setdefault("reltol", 1e-4)
    kwargs.setdefault("abstol", 1e-6)
    layer = lx.NeuralODE(mlp(), TSPAN, lx.Tsit5(), sensealg=sensealg, regularize=regularize, **kwargs)
    ps, st = lx.setup(torch.Generator().manual_seed(3), layer, dtype=F64)
    for leaf in lx.core.tree_leaves(ps):
        leaf.requires_grad_(True)
    return layer, ps, st


def data(n=5):
    return torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(11))


def plain_solve(layer, ps, x, **kwargs):
    inner = layer.model
    st_inner = inner.init_state(torch.Generator().manual_seed(0))
    prob = lx.ODEProblem(lambda u, p, t: inner(u, p, st_inner)[0], x, kwargs.pop("tspan", TSPAN), ps)
    options = dict(reltol=layer.solve_kwargs["reltol"], abstol=layer.solve_kwargs["abstol"])
    options.update(kwargs)
    return lx.solve(prob, lx.Tsit5(), **options)


def bound_field(layer, ps):
    st_inner = layer.model.init_state(torch.Generator().manual_seed(0))
    return lambda u, t: layer.model(u, ps, st_inner)[0]


def leaves(ps):
    return lx.core.tree_leaves(ps)


# --- ERNODE / SRNODE ---------------------------------------------------------------------------


@pytest.mark.parametrize("squared", [False, True])
def test_error_estimate_value_is_the_sum_over_recorded_steps(squared):
    layer, ps, st = build(lx.ErrorEstimateRegularization(squared=squared))
    x = data()
    y, st_new = layer(x, ps, st)
    sol = plain_solve(layer, ps, x, save_stats=True)
    errors, dts = sol.stats.error_estimate.detach().numpy(), sol.stats.dt.numpy()
    expected = float((errors ** 2).sum()) if squared else float((errors * np.abs(dts)).sum())
    assert sol.stats.naccept > 3  # several steps, so the sum is not trivial
    assert float(st_new["regularization"].detach()) == pytest.approx(expected, rel=1e-12)
    assert st_new["regularization_terms"] == {"ErrorEstimateRegularization": st_new["regularization"]}
    torch.testing.assert_close(y, sol.u[-1])
    assert st_new["nfe"] == sol.stats.nf and st_new["rng"] != st["rng"]


def test_stiffness_value_is_the_sum_over_recorded_steps():
    layer, ps, st = build(lx.StiffnessRegularization())
    x = data()
    _, st_new = layer(x, ps, st)
    sol = plain_solve(layer, ps, x, save_stats=True)
    expected = float((sol.stats.stiffness.detach() * sol.stats.dt.abs()).sum())
    assert float(st_new["regularization"].detach()) == pytest.approx(expected, rel=1e-12)


def richardson(value, h=1e-3):
    """Directional derivative of ``value`` at 0 by central differences with Richardson extrapolation.

    The error estimate is a difference of stages and carries about 1e-9 relative rounding, so the
    step cannot be small; extrapolating two central differences cancels their O(h^2) truncation.
    """
    coarse = (value(h) - value(-h)) / (2 * h)
    fine = (value(h / 2) - value(-h / 2)) / h
    return (4 * fine - coarse) / 3


@pytest.mark.parametrize("reg", [lx.ErrorEstimateRegularization(), lx.StiffnessRegularization()])
def test_global_regularizer_gradient_matches_finite_differences(reg):
    # Fixed steps (Tsit5 with adaptive=False, dt=0.125): the step sequence cannot change under the
    # perturbation, so R(theta) is a smooth function of theta and central differences apply. With
    # adaptive steps the accepted step sizes are piecewise constant in theta, and a difference
    # quotient straddling a switch would measure a jump, not the gradient.
    layer, ps, st = build(reg, adaptive=False, dt=0.125)
    x = data()
    params = leaves(ps)
    _, st_new = layer(x, ps, st)
    grads = torch.autograd.grad(st_new["regularization"], params)
    direction = [torch.randn(p.shape, dtype=F64, generator=torch.Generator().manual_seed(i))
                 for i, p in enumerate(params)]
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction))

    def value(h):
        shifted = lx.core.tree_map(lambda p: p.detach().clone(), ps)
        flat = leaves(shifted)
        with torch.no_grad():
            for p, d in zip(flat, direction):
                p.add_(h * d)
        return float(layer(x, shifted, st)[1]["regularization"].detach())

    numeric = richardson(value)
    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx(numeric, rel=1e-6)


@pytest.mark.parametrize("reg", [lx.ErrorEstimateRegularization(), lx.StiffnessRegularization()])
def test_global_regularizers_refuse_adjoints_and_name_the_local_one(reg):
    with pytest.raises(NotImplementedError, match="LocalErrorRegularization"):
        lx.NeuralODE(mlp(), TSPAN, sensealg=lx.BacksolveAdjoint(), regularize=reg)
    with pytest.raises(NotImplementedError, match="LocalErrorRegularization"):
        lx.NeuralODE(mlp(), TSPAN, sensealg=lx.InterpolatingAdjoint(), regularize=[reg])
    lx.NeuralODE(mlp(), TSPAN, sensealg=lx.DirectAdjoint(), regularize=reg)  # allowed


# --- local regularization ----------------------------------------------------------------------


def one_step_estimate(layer, ps, z, t_reg, dt):
    """E·|dt| of one Tsit5 step from (t_reg, z), computed here from the step contract."""
    f = bound_field(layer, ps)
    solver = lx.Tsit5()
    state = solver.init(f, t_reg, z, dt)
    result = solver.step(f, t_reg, z, dt, state)
    scale = 1e-6 + 1e-4 * torch.maximum(z.abs(), result.u_new.abs())
    rms = (result.error_estimate / scale).pow(2).mean().sqrt()
    return rms * abs(dt)


def test_local_fixed_time_equals_the_one_step_estimate_with_the_containing_step():
    t_reg = 0.37
    layer, ps, st = build(lx.LocalErrorRegularization(t_reg=t_reg))
    x = data()
    _, st_new = layer(x, ps, st)
    sol = plain_solve(layer, ps, x, save_stats=True, dense=True)
    starts = sol.stats.t.tolist()
    j = max(i for i, s in enumerate(starts) if s <= t_reg)
    dt = float(sol.stats.dt[j])
    expected = one_step_estimate(layer, ps, sol(t_reg), t_reg, dt)
    assert 0 < j < len(starts) - 1
    torch.testing.assert_close(st_new["regularization"], expected, rtol=1e-10, atol=0)
    assert st_new["regularization_nfe"] == 7  # f(z) for the FSAL start + 6 stages


@pytest.mark.parametrize("sensealg", [lx.BacksolveAdjoint(), lx.InterpolatingAdjoint(checkpointing=3),
                                      lx.QuadratureAdjoint()], ids=repr)
def test_local_value_does_not_depend_on_the_sensealg(sensealg):
    # every sensealg records the forward steps, so the step containing t_reg sets dt for all of them
    t_reg = 0.37
    values = []
    for alg in (None, sensealg):
        layer, ps, st = build(lx.LocalErrorRegularization(t_reg=t_reg), sensealg=alg)
        _, st_new = layer(data(), ps, st)
        values.append(st_new["regularization"].detach())
    torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("sensealg, rtol", [(lx.BacksolveAdjoint(seminorm=True), 1e-7),
                                             (lx.InterpolatingAdjoint(), 1e-7),
                                             (lx.QuadratureAdjoint(), 1e-7),
                                             # its forward pass is the coupled reversible method, not Tsit5 itself
                                             (lx.ReversibleAdjoint(), 1e-5)])
def test_local_gradient_flows_under_adjoints_and_equals_the_detached_one_step_gradient(sensealg, rtol):
    t_reg, dt = 0.55, 0.2
    layer, ps, st = build(lx.LocalErrorRegularization(t_reg=t_reg, dt=dt), sensealg=sensealg)
    x = data()
    y, st_new = layer(x, ps, st)
    params = leaves(ps)
    grads = torch.autograd.grad(st_new["regularization"], params)
    # reference: DirectAdjoint forward value at t_reg, detached, and the gradient of one step from it
    z_ref = plain_solve(layer, ps, x, saveat=[t_reg], sensealg=lx.DirectAdjoint()).u[0].detach()
    expected = one_step_estimate(layer, ps, z_ref, t_reg, dt)
    expected_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(st_new["regularization"], expected, rtol=rtol, atol=0)
    assert sum(float(g.abs().sum()) for g in grads) > 1e-8
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=rtol, atol=1e-12)
    # the layer output is unaffected by the extra saved time
    torch.testing.assert_close(y, plain_solve(layer, ps, x).u[-1], rtol=rtol, atol=1e-12)


def test_local_under_direct_differentiates_the_state_at_t_reg():
    # With sensealg=None the gradient also carries d z(t_reg)/d theta, so it differs from the
    # detached one-step gradient; it matches finite differences of the same (fixed-step) quantity.
    t_reg, dt = 0.5, 0.25
    layer, ps, st = build(lx.LocalErrorRegularization(t_reg=t_reg, dt=dt), adaptive=False, dt=0.125)
    x = data()
    params = leaves(ps)
    grads = torch.autograd.grad(layer(x, ps, st)[1]["regularization"], params)
    direction = [torch.randn(p.shape, dtype=F64, generator=torch.Generator().manual_seed(7 + i))
                 for i, p in enumerate(params)]
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction))

    def value(h):
        shifted = [p.detach() + h * d for p, d in zip(params, direction)]
        tree = {"layer_1": {"weight": shifted[0], "bias": shifted[1]},
                "layer_2": {"weight": shifted[2], "bias": shifted[3]}}
        return float(layer(x, tree, st)[1]["regularization"].detach())

    assert analytic == pytest.approx(richardson(value), rel=1e-6)


def direct_context(layer, ps, x, generator):
    sol = plain_solve(layer, ps, x, save_stats=True, dense=True)
    options = make_options(lx.Tsit5(), x, *TSPAN, reltol=1e-4, abstol=1e-6, dense=True, save_stats=True)
    return sol, RegularizationContext(solution=sol, field=bound_field(layer, ps), solver=lx.Tsit5(),
                                      options=options, sensealg=None, t0=TSPAN[0], t1=TSPAN[1], z0=x,
                                      training=True, generator=generator, dense_state=sol)


def test_biased_sampling_picks_only_the_solvers_own_step_times():
    reg = lx.LocalErrorRegularization(sampling="biased")
    layer, ps, _ = build(reg)
    x = data()
    generator = torch.Generator().manual_seed(0)
    sol, ctx = direct_context(layer, ps, x, generator)
    starts, sizes = sol.stats.t.tolist(), sol.stats.dt.tolist()
    picked = set()
    for _ in range(60):
        t_r, dt, z = reg.sample_step(ctx, reg.begin(x, *TSPAN, generator))
        j = starts.index(t_r)  # raises if t_r is not one of the step starts
        assert dt == sizes[j]
        torch.testing.assert_close(z, sol(t_r))
        picked.add(j)
    assert len(picked) > len(starts) // 2  # it does sample, not always the same point


def test_unbiased_sampling_is_uniform_in_the_span():
    reg = lx.LocalErrorRegularization()
    generator = torch.Generator().manual_seed(1)
    draws = np.array([reg.begin(None, 0.5, 2.5, generator)["t"] for _ in range(4000)])
    assert draws.min() >= 0.5 and draws.max() <= 2.5
    # mean and variance of U(0.5, 2.5): 1.5 and 1/3 (4000 draws: standard errors ~0.009 and ~0.005)
    assert abs(draws.mean() - 1.5) < 0.04 and abs(draws.var() - 1 / 3) < 0.025


def test_biased_sampling_under_backsolve_regularizes_one_of_the_forward_steps():
    reg = lx.LocalErrorRegularization(sampling="biased")
    layer, ps, st = build(reg, sensealg=lx.BacksolveAdjoint())
    x = data()
    y, st_new = layer(x, ps, st)
    sol = plain_solve(layer, ps, x)  # every step saved: the forward step times and states
    times = sol.t.tolist()
    candidates = [float(one_step_estimate(layer, ps, sol.u[j].detach(), times[j], times[j + 1] - times[j]).detach())
                  for j in range(len(times) - 1)]
    value = float(st_new["regularization"].detach())
    assert min(abs(value - c) / c for c in candidates) < 1e-10
    assert st_new["regularization"].requires_grad
    torch.testing.assert_close(y, sol.u[-1], rtol=1e-12, atol=1e-12)


def test_local_regularizer_bad_arguments():
    with pytest.raises(ValueError, match="sampling must be one of"):
        lx.LocalErrorRegularization(sampling="uniform")
    with pytest.raises(ValueError, match="biased sampling picks"):
        lx.LocalErrorRegularization(sampling="biased", t_reg=0.3)
    with pytest.raises(TypeError, match="torch.Generator"):
        lx.LocalErrorRegularization(generator=0)
    with pytest.raises(ValueError, match="dt must be finite and > 0"):
        lx.LocalErrorRegularization(dt=-0.1)
    with pytest.raises(ValueError, match="outside tspan"):
        lx.NeuralODE(mlp(), TSPAN, regularize=lx.LocalErrorRegularization(t_reg=1.5))
    with pytest.raises(NotImplementedError, match="saveat"):
        lx.NeuralODE(mlp(), TSPAN, sensealg=lx.BacksolveAdjoint(), saveat=[0.5, 1.0],
                     regularize=lx.LocalErrorRegularization(sampling="biased"))


# --- RNODE integrals ---------------------------------------------------------------------------


def reference_integral(layer, ps, x, integrand):
    """scipy quad over a tight dense solve of the same trajectory."""
    sol = plain_solve(layer, ps, x, reltol=1e-11, abstol=1e-12, dense=True)
    f = bound_field(layer, ps)

    def at(t):
        with torch.no_grad():
            return integrand(f, sol(float(t)), t)
    value, _ = scipy.integrate.quad(at, *TSPAN, epsabs=1e-12, epsrel=1e-11, limit=200)
    return value


def test_kinetic_regularization_matches_scipy_quadrature():
    layer, ps, st = build(lx.KineticRegularization(), reltol=1e-10, abstol=1e-12)
    x = data()
    y, st_new = layer(x, ps, st)
    expected = reference_integral(
        layer, ps, x, lambda f, z, t: float(f(z, torch.tensor(t, dtype=F64)).pow(2).sum(1).mean()))
    assert float(st_new["regularization"].detach()) == pytest.approx(expected, rel=1e-7)
    torch.testing.assert_close(y, plain_solve(layer, ps, x, reltol=1e-10, abstol=1e-12).u[-1],
                               rtol=1e-8, atol=1e-10)
    grads = torch.autograd.grad(st_new["regularization"], leaves(ps))
    assert all(torch.isfinite(g).all() for g in grads) and float(grads[0].abs().sum()) > 0


def test_jacobian_frobenius_matches_quadrature_of_the_explicit_jacobian():
    probe_seed = 5
    reg = lx.JacobianFrobeniusRegularization(generator=torch.Generator().manual_seed(probe_seed))
    layer, ps, st = build(reg, reltol=1e-10, abstol=1e-12)
    x = data(3)
    _, st_new = layer(x, ps, st)
    probe = lx.regularize.rademacher_like(x, torch.Generator().manual_seed(probe_seed))

    def integrand(f, z, t):
        total = 0.0
        for b in range(z.shape[0]):
            jac = torch.autograd.functional.jacobian(lambda v: f(v.unsqueeze(0), None)[0], z[b])
            total += float((probe[b] @ jac).pow(2).sum())
        return total / z.shape[0]
    expected = reference_integral(layer, ps, x, integrand)
    assert float(st_new["regularization"].detach()) == pytest.approx(expected, rel=1e-7)


def test_integral_regularizers_agree_across_sensitivity_algorithms():
    x = data()
    results = []
    for sensealg in (None, lx.BacksolveAdjoint()):
        layer, ps, st = build([lx.KineticRegularization(), lx.JacobianFrobeniusRegularization()],
                              sensealg=sensealg, reltol=1e-9, abstol=1e-10)
        y, st_new = layer(x, ps, st)
        loss = y.pow(2).sum() + st_new["regularization"]
        results.append((st_new, torch.autograd.grad(loss, leaves(ps))))
    (st_a, g_a), (st_b, g_b) = results
    assert set(st_a["regularization_terms"]) == {"KineticRegularization", "JacobianFrobeniusRegularization"}
    torch.testing.assert_close(st_a["regularization"],
                               sum(st_a["regularization_terms"].values()), rtol=1e-14, atol=0)
    torch.testing.assert_close(st_b["regularization"], st_a["regularization"].detach(), rtol=1e-12, atol=0)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


# --- STEER -------------------------------------------------------------------------------------


def scalar_growth_layer(regularize):
    layer = lx.NeuralODE(nn.Dense(1, 1, use_bias=False), (0.0, 2.0), reltol=1e-11, abstol=1e-12,
                         regularize=regularize)
    ps, st = lx.setup(torch.Generator().manual_seed(0), layer, dtype=F64)
    ps = {"weight": torch.full((1, 1), 0.7, dtype=F64)}
    return layer, ps, st


def test_steer_end_time_is_within_bounds_in_train_mode_and_exact_in_test_mode():
    b = 0.5
    layer, ps, st = scalar_growth_layer(lx.STEER(b))
    x = torch.ones(1, 1, dtype=F64)
    ends = []
    for _ in range(20):
        y, st = layer(x, ps, st)
        ends.append(math.log(float(y)) / 0.7)  # z(T) = exp(0.7 T) recovers the drawn T
        assert float(st["regularization"].detach()) == 0.0
    assert all(2.0 - b - 1e-9 <= T <= 2.0 + b + 1e-9 for T in ends)
    assert max(ends) - min(ends) > 0.3  # drawn, not fixed
    y_test, st_test = layer(x, ps, lx.testmode(st))
    assert float(y_test) == pytest.approx(math.exp(1.4), rel=1e-9)
    assert st_test["rng"] == st["rng"]  # test mode draws nothing


def test_steer_bad_arguments():
    with pytest.raises(ValueError, match="b must be a finite number > 0"):
        lx.STEER(-0.1)
    with pytest.raises(ValueError, match="smaller than"):
        lx.NeuralODE(mlp(), (0.0, 1.0), regularize=lx.STEER(1.0))
    with pytest.raises(ValueError, match="saveat"):
        lx.NeuralODE(mlp(), (0.0, 1.0), saveat=[0.5, 1.0], regularize=lx.STEER(0.2))
    with pytest.raises(ValueError, match="at most one"):
        lx.NeuralODE(mlp(), (0.0, 1.0), regularize=[lx.STEER(0.2), lx.STEER(0.1)])
    # a fixed t_reg must lie inside every span a STEER draw can solve
    with pytest.raises(ValueError, match=r"may end the solve at t = 0\.7.*t_reg = 0\.95 is outside"):
        lx.NeuralODE(mlp(), (0.0, 1.0), regularize=[lx.STEER(0.3), lx.LocalErrorRegularization(t_reg=0.95)])
    lx.NeuralODE(mlp(), (0.0, 1.0), regularize=[lx.STEER(0.3), lx.LocalErrorRegularization(t_reg=0.5)])


@pytest.mark.parametrize("reg", [lx.KineticRegularization(), lx.TaylorRegularization(order=1)], ids=repr)
def test_integral_regularizers_are_positive_when_time_runs_backward(reg):
    # z' = a z from z(t0) = 1: ||z'||^2 = a^2 e^{2a(t - t0)}, integrated over the span in either direction
    a = 0.7
    expected = {(0.0, 1.0): a * (math.exp(2 * a) - 1) / 2, (1.0, 0.0): a * (1 - math.exp(-2 * a)) / 2}
    for tspan, value in expected.items():
        layer = lx.NeuralODE(nn.Dense(1, 1, use_bias=False), tspan, reltol=1e-10, abstol=1e-12, regularize=reg)
        ps, st = lx.setup(torch.Generator().manual_seed(0), layer, dtype=F64)
        ps = {"weight": torch.full((1, 1), a, dtype=F64, requires_grad=True)}
        _, st_new = layer(torch.ones(1, 1, dtype=F64), ps, st)
        assert float(st_new["regularization"].detach()) == pytest.approx(value, rel=1e-7), tspan
        (grad,) = torch.autograd.grad(st_new["regularization"], [ps["weight"]])
        assert float(grad) > 0  # a larger |a| makes the dynamics faster in either direction


# --- the hook ----------------------------------------------------------------------------------


def test_test_mode_solves_the_plain_ode_and_reports_zero():
    layer, ps, st = build([lx.ErrorEstimateRegularization(), lx.KineticRegularization()])
    x = data()
    y, st_new = layer(x, ps, lx.testmode(st))
    sol = plain_solve(layer, ps, x)
    torch.testing.assert_close(y, sol.u[-1])
    assert st_new["nfe"] == sol.stats.nf and float(st_new["regularization"].detach()) == 0.0


def test_hook_rejects_what_is_not_a_regularizer():
    with pytest.raises(TypeError, match="AbstractRegularizer"):
        lx.NeuralODE(mlp(), TSPAN, regularize="error")
    with pytest.raises(TypeError, match="AbstractRegularizer"):
        lx.NeuralODE(mlp(), TSPAN, regularize=[lx.STEER(0.1), 3.0])


def test_saveat_outputs_are_unchanged_by_augmented_states_and_extra_saved_times():
    saveat = [0.25, 0.5, 1.0]
    x = data()
    for regularize, sensealg in ((lx.KineticRegularization(), None),
                                 (lx.LocalErrorRegularization(t_reg=0.4), lx.BacksolveAdjoint())):
        layer, ps, st = build(regularize, sensealg=sensealg, saveat=saveat, reltol=1e-10, abstol=1e-12)
        y, st_new = layer(x, ps, st)
        expected = plain_solve(layer, ps, x, saveat=saveat, reltol=1e-10, abstol=1e-12).u
        assert y.shape == (3, 5, 2)
        torch.testing.assert_close(y, expected, rtol=1e-8, atol=1e-10)
        assert float(st_new["regularization"].detach()) > 0


def test_time_input_passes_t_to_the_vector_field():
    class TimeScaled(lx.AbstractLayer):
        def forward(self, x, ps, st):
            z, t = x
            return ps["rate"] * t * z, st

    layer = lx.NeuralODE(TimeScaled(), (0.0, 1.5), time_input=True, reltol=1e-10, abstol=1e-12,
                         regularize=lx.KineticRegularization())
    _, st = lx.setup(torch.Generator().manual_seed(0), layer)
    ps = {"rate": torch.tensor(0.8, dtype=F64)}
    x = torch.tensor([[1.0, -2.0]], dtype=F64)
    y, st_new = layer(x, ps, st)
    # z' = a t z: z(t) = z0 exp(a t^2 / 2); kinetic energy = |z0|^2 int_0^T a^2 t^2 exp(a t^2) dt
    a, T = 0.8, 1.5
    torch.testing.assert_close(y, x * math.exp(a * T ** 2 / 2), rtol=1e-9, atol=0)
    energy, _ = scipy.integrate.quad(lambda t: a ** 2 * t ** 2 * math.exp(a * t ** 2), 0.0, T, epsabs=1e-13)
    assert float(st_new["regularization"]) == pytest.approx(5.0 * energy, rel=1e-8)
    with pytest.raises(TypeError, match="time_input"):
        lx.NeuralODE(TimeScaled(), (0.0, 1.0), time_input=1)


def test_solver_without_estimates_and_bad_integrands_are_reported():
    layer = lx.NeuralODE(mlp(), TSPAN, lx.Euler(), dt=0.1, regularize=lx.ErrorEstimateRegularization())
    ps, st = lx.setup(torch.Generator().manual_seed(0), layer, dtype=F64)
    with pytest.raises(ValueError, match="no embedded error estimate"):
        layer(data(), ps, st)

    class WrongShape(lx.regularize.AbstractIntegralRegularizer):
        def integrand(self, field, z, dz, t, data):
            return dz.pow(2).sum()

    layer, ps, st = build(WrongShape())
    with pytest.raises(ValueError, match=r"one value per sample, shape \(5,\)"):
        layer(data(), ps, st)
