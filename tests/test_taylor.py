"""Taylor-mode propagation and TayNODE (pylux.regularize.taylor), float64.

References are independent of the Taylor rules: closed-form derivatives,
torch.func.jvp nested along the same polynomial curve, scipy's solve_ivp with
Simpson quadrature, and central finite differences.
"""

import functools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.integrate import simpson, solve_ivp

import pylux as lx
from pylux import nn
from pylux.regularize import (
    TaylorFallbackWarning,
    TaylorRegularization,
    TaylorRuleError,
    TaylorSeries,
    append_time,
    solution_taylor_coefficients,
    taylor_coefficients,
)

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_series(shape, order, seed, scale=0.7):
    g = _gen(seed)
    return TaylorSeries([scale * torch.randn(shape, generator=g, dtype=DT) for _ in range(order + 1)])


def _jvp_derivatives(fn, coeffs, order):
    """[h(0), h'(0), ..., h^(order)(0)] of h(t) = fn(sum_k coeffs[k] t^k) by nested torch.func.jvp."""
    def h(t):
        return fn(sum(c * t ** k for k, c in enumerate(coeffs)))

    def nest(g, n):
        if n == 0:
            return lambda t: [g(t)]
        inner = nest(lambda t: torch.func.jvp(g, (t,), (torch.ones_like(t),))[1], n - 1)
        return lambda t: [g(t)] + inner(t)

    return nest(h, order)(torch.zeros((), dtype=DT))


def _solution_derivatives(field, z, t, order):
    """d^k z/dt^k, k = 1..order, of z' = field(z, t) by D_{k+1} = (d/dz D_k) field + d/dt D_k (nested jvp)."""
    fns = [field]
    for _ in range(order - 1):
        prev = fns[-1]
        fns.append(lambda z, t, prev=prev: torch.func.jvp(prev, (z, t), (field(z, t), torch.ones_like(t)))[1])
    return [fn(z, t) for fn in fns]


def _assert_series_matches(series, derivatives, rtol=1e-10, atol=1e-10):
    assert series.order == len(derivatives) - 1
    for k, d in enumerate(derivatives):
        torch.testing.assert_close(series.derivative(k), d, rtol=rtol, atol=atol, msg=f"coefficient {k}")


# --------------------------------------------------------------------- closed forms

@pytest.mark.parametrize("as_layer", [False, True])
def test_solution_of_linear_decay_has_alternating_derivatives(as_layer):
    z0 = torch.tensor([[0.5, -1.25, 2.0]], dtype=DT)
    if as_layer:
        layer = nn.Dense(3, 3, use_bias=False)
        ps = {"weight": -torch.eye(3, dtype=DT)}
        series = solution_taylor_coefficients(layer, z0, 4, ps=ps, st={})
    else:
        series = solution_taylor_coefficients(lambda z, t: -z, z0, 4)
    _assert_series_matches(series, [(-1) ** k * z0 for k in range(5)], rtol=1e-14, atol=0)


def test_solution_of_quadratic_blowup_has_factorial_derivatives():
    # z = z0 / (1 - z0 t): d^k z/dt^k = k! z0^(k+1)
    z0 = torch.tensor([0.3, -0.7, 1.1], dtype=DT)
    series = solution_taylor_coefficients(lambda z, t: z * z, z0, 4)
    _assert_series_matches(series, [math.factorial(k) * z0 ** (k + 1) for k in range(5)], rtol=1e-13, atol=0)
    # and its coefficients z_k = z0^(k+1), the geometric series
    torch.testing.assert_close(series.coefficient(3), z0 ** 4, rtol=1e-13, atol=0)


def test_time_dependent_solution_matches_polynomial():
    # z' = t exp(-z) has z = log(t^2/2 + e^{z0}); around t0 = 0.5
    z0, t0 = torch.tensor([0.2, -0.4], dtype=DT), 0.5
    series = solution_taylor_coefficients(lambda z, t: t * torch.exp(-z), z0, 4, t0=t0)
    c = torch.exp(z0) - t0 ** 2 / 2

    def exact(s):
        return torch.log((t0 + s) ** 2 / 2 + c)

    _assert_series_matches(series, _jvp_derivatives(lambda s: exact(s), [torch.zeros((), dtype=DT),
                                                                        torch.ones((), dtype=DT)], 4))


# --------------------------------------------------------------------- elementwise rules

_RULES = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "softplus_beta2": lambda x: F.softplus(x, beta=2.0),
    "relu": torch.relu,
    "exp": torch.exp,
    "log": lambda x: torch.log(2.5 + x),
    "mul_series": lambda x: x * torch.tanh(x),
    "div_series": lambda x: (1.0 + x) / (2.0 + x * x),
    "rdiv_scalar": lambda x: 3.0 / (2.0 + x * x),
    "add_sub_scale": lambda x: 2.5 * x - torch.exp(x) + 0.5 - x / 4.0,
    "pow3": lambda x: x ** 3,
    "tensor_ops": lambda x: torch.sub(torch.mul(x, x), torch.div(x, 3.0)),
    "add_alpha_tensor": lambda x: torch.add(x, torch.full((4, 3), 0.3, dtype=DT), alpha=2.0),
    "addcmul_tensors": lambda x: torch.addcmul(x, torch.full((4, 3), 0.5, dtype=DT),
                                               torch.full((4, 3), 2.0, dtype=DT), value=0.5),
}


@pytest.mark.parametrize("name", sorted(_RULES))
def test_rule_matches_nested_jvp(name):
    fn, order = _RULES[name], 4
    x = _random_series((4, 3), order, seed=1)
    if name == "relu":  # keep x0 away from the kink
        x = TaylorSeries([x.coefficient(0).sign() * (0.3 + x.coefficient(0).abs())] + list(x.coefficients[1:]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TaylorFallbackWarning)
        y = fn(x)
    assert isinstance(y, TaylorSeries) and y.order == order
    _assert_series_matches(y, _jvp_derivatives(fn, x.coefficients, order))


def test_linear_cat_and_indexing_rules_match_nested_jvp():
    g = _gen(3)
    W, b = torch.randn(5, 4, generator=g, dtype=DT), torch.randn(5, generator=g, dtype=DT)
    other = torch.randn(2, 2, generator=g, dtype=DT)

    def fn(x):
        y = F.linear(x, W, b) @ W
        return torch.cat([y[:, 1:3] * 2.0, other, x.sum(dim=1, keepdim=True) * 1.5], dim=-1)

    x = _random_series((2, 4), 4, seed=4)
    _assert_series_matches(fn(x), _jvp_derivatives(fn, x.coefficients, 4))


def test_derivative_and_coefficient_conventions():
    derivs = [torch.tensor([1.0, 2.0], dtype=DT) * (k + 1) for k in range(4)]
    series = TaylorSeries.from_derivatives(derivs)
    torch.testing.assert_close(series.coefficient(3), derivs[3] / 6, rtol=0, atol=0)
    for got, want in zip(series.derivatives(), derivs):
        torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    t = TaylorSeries.time(0.25, 3, dtype=DT)
    assert [float(c) for c in t.coefficients] == [0.25, 1.0, 0.0, 0.0]


# --------------------------------------------------------------------- networks

def test_chain_of_dense_matches_nested_jvp():
    model = nn.Chain(nn.Dense(3, 16, torch.tanh), nn.Dense(16, 16, F.softplus), nn.Dense(16, 8, torch.sigmoid),
                     nn.Scale(8, torch.exp),
                     nn.SkipConnection(nn.Dense(8, 8, functools.partial(F.softplus, beta=2.0)), "+"),
                     nn.WrappedFunction(lambda v: v * torch.tanh(v)),
                     nn.Parallel("+", nn.Dense(8, 3), nn.Dense(8, 3, torch.relu)))
    ps, st = lx.setup(_gen(5), model, dtype=DT)
    x = _random_series((6, 3), 4, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TaylorFallbackWarning)
        y = taylor_coefficients(model, x, ps, st)
        y_direct, _ = model(x, ps, st)  # the series passes through the layers themselves too
    ref = _jvp_derivatives(lambda v: model(v, ps, st)[0], x.coefficients, 4)
    _assert_series_matches(y, ref)
    _assert_series_matches(y_direct, ref)


def _kelly_field(seed, dim=3, hidden=12):
    g = _gen(seed)
    W1 = 0.5 * torch.randn(hidden, dim + 1, generator=g, dtype=DT)
    b1 = 0.5 * torch.randn(hidden, generator=g, dtype=DT)
    W2 = 0.5 * torch.randn(dim, hidden + 1, generator=g, dtype=DT)
    b2 = 0.5 * torch.randn(dim, generator=g, dtype=DT)

    def field(z, t):
        h = torch.tanh(F.linear(append_time(z, t), W1, b1))
        return torch.tanh(F.linear(append_time(h, t), W2, b2))

    return field, (W1, b1, W2, b2)


def test_kelly_time_concatenation_field_solution_matches_nested_jvp():
    field, _ = _kelly_field(7)
    z0 = 0.8 * torch.randn(5, 3, generator=_gen(8), dtype=DT)
    t0 = torch.tensor(0.3, dtype=DT)
    series = solution_taylor_coefficients(field, z0, 4, t0=t0)
    _assert_series_matches(series, [z0] + _solution_derivatives(field, z0, t0, 4))


def test_kelly_field_on_a_curve_matches_nested_jvp():
    field, _ = _kelly_field(9)
    z = _random_series((4, 3), 3, seed=10)
    t = TaylorSeries.time(0.7, 3, dtype=DT)
    y = field(z, t)
    ref = _jvp_derivatives(lambda s: field(s[:, :3], s[0, 3]),
                           [torch.cat([c, torch.full((4, 1), tc, dtype=DT)], dim=1)
                            for c, tc in zip(z.coefficients, [0.7, 1.0, 0.0, 0.0])], 3)
    _assert_series_matches(y, ref)


# --------------------------------------------------------------------- fallback

def test_activation_without_rule_falls_back_with_warning_and_right_numbers():
    model = nn.Chain(nn.Dense(3, 6, torch.sin), nn.Dense(6, 2, torch.tanh))
    ps, st = lx.setup(_gen(11), model, dtype=DT)
    x = _random_series((4, 3), 3, seed=12)
    with pytest.warns(TaylorFallbackWarning, match=r"layer_1.*sin.*2\^K"):
        y = taylor_coefficients(model, x, ps, st)
    _assert_series_matches(y, _jvp_derivatives(lambda v: model(v, ps, st)[0], x.coefficients, 3))


def test_layer_without_rule_falls_back_in_the_solution_recursion():
    model = nn.Chain(nn.Dense(2, 5, torch.tanh), nn.LayerNorm((5,)), nn.Dense(5, 2))
    ps, st = lx.setup(_gen(13), model, dtype=DT)
    z0 = torch.randn(3, 2, generator=_gen(14), dtype=DT)
    with pytest.warns(TaylorFallbackWarning, match="LayerNorm"):
        series = solution_taylor_coefficients(model, z0, 3, ps=ps, st=st)
    field = lambda z, t: model(z, ps, st)[0]  # noqa: E731
    _assert_series_matches(series, [z0] + _solution_derivatives(field, z0, torch.zeros((), dtype=DT), 3))
    with pytest.raises(TaylorRuleError, match="LayerNorm"):
        solution_taylor_coefficients(model, z0, 3, ps=ps, st=st, strict=True)


def test_function_without_rule_falls_back_as_a_whole():
    fn = lambda x: torch.sin(x) * x  # noqa: E731
    x = _random_series((3,), 4, seed=15)
    with pytest.warns(TaylorFallbackWarning, match="2\\^K"):
        y = taylor_coefficients(fn, x)
    # closed form: (x sin x)'s Taylor series along the curve, checked against nested jvp
    _assert_series_matches(y, _jvp_derivatives(fn, x.coefficients, 4))
    with pytest.raises(TaylorRuleError, match="sin"):
        taylor_coefficients(fn, x, strict=True)


# --------------------------------------------------------------------- TayNODE

def test_taylor_integrand_is_squared_norm_of_kth_derivative_per_sample():
    field, _ = _kelly_field(20)
    z = torch.randn(4, 3, generator=_gen(21), dtype=DT)
    t = torch.tensor(0.4, dtype=DT)
    for order in (1, 2, 3):
        rate = TaylorRegularization(order).integrand(field, z, field(z, t), t, None)
        top = _solution_derivatives(field, z, t, order)[-1]
        torch.testing.assert_close(rate, top.pow(2).sum(dim=1), rtol=1e-12, atol=0)


def test_taylor_integrand_of_a_layer_field_without_rule_warns_and_is_right():
    model = nn.Chain(nn.Dense(2, 5, torch.tanh), nn.LayerNorm((5,)), nn.Dense(5, 2))
    ps, st = lx.setup(_gen(23), model, dtype=DT)
    field = lambda z, t: model(z, ps, st)[0]  # noqa: E731  (what NeuralODE hands to the integrand)
    z, t = torch.randn(3, 2, generator=_gen(24), dtype=DT), torch.tensor(0.1, dtype=DT)
    with pytest.warns(TaylorFallbackWarning, match="vector field of the NeuralODE.*layer_norm"):
        rate = TaylorRegularization(3).integrand(field, z, field(z, t), t, None)
    top = _solution_derivatives(field, z, t, 3)[-1]
    torch.testing.assert_close(rate, top.pow(2).sum(dim=1), rtol=1e-10, atol=0)
    with pytest.raises(TaylorRuleError, match="layer_norm"):
        TaylorRegularization(3, strict=True).integrand(field, z, field(z, t), t, None)


def test_taylor_integral_of_a_time_dependent_field_matches_quadrature():
    # Kelly et al.'s [z; t] field, integrated as an extra state with pylux.solve
    field, _ = _kelly_field(25, dim=2, hidden=6)
    reg, order, batch = TaylorRegularization(2), 2, 2
    z0 = torch.randn(batch, 2, generator=_gen(26), dtype=DT)

    def augmented(w, p, t):
        z = w[:2 * batch].reshape(batch, 2)
        dz = field(z, t)
        return torch.cat([dz.reshape(-1), reg.integrand(field, z, dz, t, None)])

    prob = lx.ODEProblem(augmented, torch.cat([z0.reshape(-1), torch.zeros(batch, dtype=DT)]), (0.0, 1.5), None)
    value = lx.solve(prob, lx.Tsit5(), reltol=1e-10, abstol=1e-10).u[-1][2 * batch:].mean()

    def rhs(t, y):
        return field(torch.from_numpy(y).reshape(batch, 2), torch.tensor(t, dtype=DT)).reshape(-1).numpy()

    ref_sol = solve_ivp(rhs, (0.0, 1.5), z0.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12,
                        dense_output=True)
    grid = np.linspace(0.0, 1.5, 201)
    per_time = []
    for t, y in zip(grid, ref_sol.sol(grid).T):
        top = _solution_derivatives(field, torch.from_numpy(y.copy()).reshape(batch, 2),
                                    torch.tensor(t, dtype=DT), order)[-1]
        per_time.append(top.pow(2).sum(dim=1).mean().item())
    reference = simpson(np.array(per_time), x=grid)
    assert reference > 1e-3
    np.testing.assert_allclose(value.item(), reference, rtol=1e-7)

    class KellyLayer(lx.AbstractLayer):  # the same field as a layer of (z, t), for NeuralODE(time_input=True)
        def forward(self, x, ps, st):
            return field(*x), st

    layer = lx.NeuralODE(KellyLayer(), (0.0, 1.5), time_input=True, regularize=reg, reltol=1e-10, abstol=1e-10)
    _, st = layer(z0, *lx.setup(_gen(0), layer, dtype=DT))
    np.testing.assert_allclose(st["regularization"].item(), reference, rtol=1e-7)


def _small_node(order, seed=16, **kwargs):
    model = nn.Chain(nn.Dense(2, 6, torch.tanh), nn.Dense(6, 2))
    node = lx.NeuralODE(model, (0.0, 1.0), regularize=TaylorRegularization(order=order), **kwargs)
    ps, st = lx.setup(_gen(seed), node, dtype=DT)
    # larger weights so that the higher derivatives are not negligible
    ps = lx.tree_map(lambda p: 1.5 * p, ps)
    return model, node, ps, st


@pytest.mark.parametrize("order", [2, 3])
def test_taylor_regularization_matches_quadrature_of_nested_jvp(order):
    model, node, ps, st = _small_node(order, reltol=1e-10, abstol=1e-10)
    x = torch.randn(3, 2, generator=_gen(17), dtype=DT)
    _, st_out = node(x, ps, st)
    value = st_out["regularization"]

    def rhs(t, y):
        return model(torch.from_numpy(y).reshape(3, 2), ps, st["model"])[0].reshape(-1).numpy()

    ref_sol = solve_ivp(rhs, (0.0, 1.0), x.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12,
                        dense_output=True)
    grid = np.linspace(0.0, 1.0, 801)
    states = torch.from_numpy(ref_sol.sol(grid).T.copy()).reshape(-1, 2)  # (grid * batch, 2)
    field = lambda z, t: model(z, ps, st["model"])[0]  # noqa: E731
    top = _solution_derivatives(field, states, torch.zeros((), dtype=DT), order)[-1]
    per_time = top.reshape(len(grid), 3, 2).pow(2).sum(dim=2).mean(dim=1).numpy()
    reference = simpson(per_time, x=grid)
    assert reference > 1e-3
    np.testing.assert_allclose(value.item(), reference, rtol=1e-7)
    assert st_out["regularization_terms"]["TaylorRegularization"] is value or torch.equal(
        st_out["regularization_terms"]["TaylorRegularization"], value)


def test_taylor_regularization_gradient_matches_finite_differences():
    model, node, ps, st = _small_node(2, solver=lx.RK4(), dt=0.125, adaptive=False)
    x = torch.randn(2, 2, generator=_gen(18), dtype=DT)
    flat, unflatten = lx.flatten(ps)

    def reg(theta):
        return node(x, unflatten(theta), st)[1]["regularization"]

    theta = flat.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reg(theta), theta)
    assert torch.isfinite(grad).all() and grad.abs().max() > 1e-3
    eps = 1e-6
    idx = torch.arange(0, flat.numel(), 3)
    fd = torch.stack([(reg(flat + eps * e) - reg(flat - eps * e)) / (2 * eps)
                      for e in torch.eye(flat.numel(), dtype=DT)[idx]])
    torch.testing.assert_close(grad[idx], fd.detach(), rtol=1e-6, atol=1e-8)


def test_taylor_regularization_gradient_under_an_adjoint_matches_direct():
    x = torch.randn(2, 2, generator=_gen(22), dtype=DT)
    grads = []
    for sensealg in (None, lx.InterpolatingAdjoint()):
        _, node, ps, st = _small_node(3, sensealg=sensealg, reltol=1e-9, abstol=1e-9)
        flat, unflatten = lx.flatten(ps)
        theta = flat.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(node(x, unflatten(theta), st)[1]["regularization"], theta)
        grads.append(grad)
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_taylor_regularization_in_test_mode_is_zero_and_repr():
    _, node, ps, st = _small_node(2)
    x = torch.randn(2, 2, generator=_gen(19), dtype=DT)
    _, st_train = node(x, ps, st)
    _, st_test = node(x, ps, lx.testmode(st))
    assert st_train["regularization"].item() > 0
    assert st_test["regularization"].item() == 0
    assert repr(TaylorRegularization(3, strict=True)) == "TaylorRegularization(order=3, strict=True)"


# --------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="order must be >= 1"):
        TaylorRegularization(order=0)
    with pytest.raises(TypeError, match="order must be an int"):
        TaylorRegularization(order=2.0)
    with pytest.raises(TypeError, match="strict must be a bool"):
        TaylorRegularization(order=2, strict="yes")
    z0 = torch.ones(2, dtype=DT)
    with pytest.raises(ValueError, match="order must be >= 1"):
        solution_taylor_coefficients(lambda z, t: -z, z0, 0)
    with pytest.raises(TypeError, match="floating tensor"):
        solution_taylor_coefficients(lambda z, t: -z, torch.ones(2, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="returned shape"):
        solution_taylor_coefficients(lambda z, t: z.sum(), z0, 2)
    with pytest.raises(TypeError, match="needs its parameters"):
        solution_taylor_coefficients(nn.Dense(2, 2), z0, 2)
    with pytest.raises(ValueError, match="at least one coefficient"):
        TaylorSeries([])
    with pytest.raises(ValueError, match="coefficient 1 has shape"):
        TaylorSeries([torch.ones(2, dtype=DT), torch.ones(3, dtype=DT)])
    with pytest.raises(TypeError, match="floating dtype"):
        TaylorSeries([torch.ones(2, dtype=torch.int64)])
    with pytest.raises(TypeError, match="coefficient 1 is torch.float32"):
        TaylorSeries([torch.ones(2, dtype=DT), torch.ones(2, dtype=torch.float32)])
    x = TaylorSeries([torch.ones(2, dtype=DT), torch.ones(2, dtype=DT)])
    with pytest.raises(ValueError, match="coefficient 2 was asked of a series of order 1"):
        x.coefficient(2)
    with pytest.raises(TypeError, match="non-negative integer powers"):
        x ** 0.5
    with pytest.raises(TaylorRuleError, match="sin"):
        torch.sin(x)
    with pytest.raises(TypeError, match="expected a TaylorSeries"):
        taylor_coefficients(torch.tanh, torch.ones(2, dtype=DT))
    with pytest.raises(ValueError, match="last dimension 3"):
        taylor_coefficients(nn.Dense(3, 2), x, {"weight": torch.ones(2, 3, dtype=DT),
                                                 "bias": torch.ones(2, dtype=DT)})
    with pytest.raises(ValueError, match="expected parameters with keys"):
        taylor_coefficients(nn.Dense(2, 2), x, {"weight": torch.ones(2, 2, dtype=DT)})
    with pytest.raises(TaylorRuleError, match="strict=True"):
        taylor_coefficients(nn.Dense(2, 2, torch.sin), x, {"weight": torch.ones(2, 2, dtype=DT),
                                                            "bias": torch.ones(2, dtype=DT)}, strict=True)
