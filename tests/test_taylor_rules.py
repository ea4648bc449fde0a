"""The Taylor-mode rule table (pylux.regularize.taylor_rules): registration and lookup, float64."""

import warnings

import pytest
import torch

import pylux as lx
from pylux import nn
from pylux.core import AbstractLayer
from pylux.regularize import (TaylorFallbackWarning, TaylorLayerContext, TaylorSeries, register_taylor_rule,
                              taylor_coefficients)
from pylux.regularize import taylor as taylor_facade
from pylux.regularize import taylor_rules

DT = torch.float64


@pytest.fixture
def table(monkeypatch):
    """A private copy of the rule table, so registrations in a test do not leak into others."""
    monkeypatch.setattr(taylor_rules, "_RULES", dict(taylor_rules._RULES))
    return taylor_rules


def _series(shape, order, seed):
    g = torch.Generator().manual_seed(seed)
    return TaylorSeries([0.6 * torch.randn(shape, generator=g, dtype=DT) for _ in range(order + 1)])


def _curve_derivatives(fn, x):
    """[h(0), ..., h^(K)(0)] of h(t) = fn(x(t)), by nested jvp (independent of the rules)."""
    def h(t):
        return fn(sum(c * t ** k for k, c in enumerate(x.coefficients)))

    def nest(g, n):
        if n == 0:
            return lambda t: [g(t)]
        inner = nest(lambda t: torch.func.jvp(g, (t,), (torch.ones_like(t),))[1], n - 1)
        return lambda t: [g(t)] + inner(t)

    return nest(h, x.order)(torch.zeros((), dtype=DT))


def _assert_matches(series, derivatives):
    for k, d in enumerate(derivatives):
        torch.testing.assert_close(series.derivative(k), d, rtol=1e-10, atol=1e-10, msg=f"coefficient {k}")


class Cube(AbstractLayer):
    """y = c x^3 with a scalar c that no torch function would give away."""

    def init_params(self, rng):
        return {"c": torch.ones(())}

    def forward(self, x, ps, st):
        return torch.sin(x) * 0 + ps["c"] * x ** 3, st  # sin has no rule: unregistered, it falls back


class ShiftedCube(Cube):
    pass


def _cube_rule(layer, x, ps, st, ctx):
    assert isinstance(ctx, TaylorLayerContext)
    return x ** 3 * ps["c"]


def test_builtin_layer_and_function_rules_are_in_the_one_table():
    for op in (nn.Dense, nn.Chain, nn.Scale, nn.SkipConnection, nn.NoOpLayer, nn.WrappedFunction):
        entry = taylor_rules.taylor_rule(op)
        assert entry is not None and entry.is_layer_rule and not entry.activation
    assert taylor_rules.taylor_rule(torch.tanh).activation
    assert not taylor_rules.taylor_rule(torch.log).activation
    assert taylor_rules.torch_function_rule(nn.Dense) is None  # layer entries never serve torch dispatch
    assert taylor_rules.taylor_rule(torch.sin) is None
    # the facade keeps the public names
    assert taylor_facade.register_taylor_rule is register_taylor_rule
    assert taylor_facade.TaylorSeries is TaylorSeries


def test_a_registered_layer_rule_replaces_the_fallback_and_subclasses_inherit_it(table):
    x = _series((2, 3), 4, seed=0)
    ps = {"c": torch.tensor(0.7, dtype=DT)}
    with pytest.warns(TaylorFallbackWarning, match="Cube"):
        taylor_coefficients(Cube(), x, ps)
    assert register_taylor_rule(Cube, _cube_rule) is _cube_rule
    for layer in (Cube(), ShiftedCube(), nn.Chain(Cube(), nn.Dense(3, 2, torch.tanh))):
        layer_ps = ps if not isinstance(layer, nn.Chain) else {
            "layer_1": ps, "layer_2": {"weight": torch.full((2, 3), 0.3, dtype=DT),
                                       "bias": torch.zeros(2, dtype=DT)}}
        with warnings.catch_warnings():
            warnings.simplefilter("error", TaylorFallbackWarning)
            y = taylor_coefficients(layer, x, layer_ps, {"layer_1": {}, "layer_2": {}})
        _assert_matches(y, _curve_derivatives(lambda v: layer(v, layer_ps, {"layer_1": {}, "layer_2": {}})[0], x))


def test_a_registered_function_rule_serves_torch_dispatch_and_activations(table):
    x = _series((4, 2), 3, seed=1)
    x = TaylorSeries([x.coefficient(0).sign() * (0.3 + x.coefficient(0).abs())] + list(x.coefficients[1:]))
    ps = {"weight": torch.eye(2, dtype=DT), "bias": torch.zeros(2, dtype=DT)}
    with pytest.warns(TaylorFallbackWarning, match="activation"):
        taylor_coefficients(nn.Dense(2, 2, torch.abs), x, ps)

    def abs_rule(v):
        return v * torch.sign(v.coefficient(0))  # |x| is sign(x_0) x away from 0

    register_taylor_rule(torch.abs, abs_rule, activation=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TaylorFallbackWarning)
        through_dispatch = torch.abs(x) * 2.0
        through_layer = taylor_coefficients(nn.Dense(2, 2, torch.abs), x, ps)
    _assert_matches(through_dispatch, _curve_derivatives(lambda v: torch.abs(v) * 2.0, x))
    _assert_matches(through_layer, _curve_derivatives(torch.abs, x))


def test_without_activation_a_function_rule_is_not_a_layer_activation(table):
    x = _series((3, 2), 2, seed=2)
    register_taylor_rule(torch.abs, lambda v: v * torch.sign(v.coefficient(0)))
    ps = {"weight": torch.eye(2, dtype=DT), "bias": torch.zeros(2, dtype=DT)}
    with pytest.warns(TaylorFallbackWarning, match="activation"):
        taylor_coefficients(nn.Dense(2, 2, torch.abs), x, ps)


class _Unhashable:
    __hash__ = None

    def __call__(self, x):
        return x


def test_bad_registrations_are_refused(table):
    with pytest.raises(TypeError, match="rule must be callable"):
        register_taylor_rule(Cube, None)
    with pytest.raises(TypeError, match="activation=True is for functions"):
        register_taylor_rule(Cube, _cube_rule, activation=True)
    with pytest.raises(TypeError, match="pylux layer class or a torch function"):
        register_taylor_rule(torch.nn.Tanh, torch.tanh)
    with pytest.raises(TypeError, match="pylux layer class or a torch function"):
        register_taylor_rule("tanh", torch.tanh)
    with pytest.raises(TypeError, match="not hashable"):
        register_taylor_rule(_Unhashable(), lambda v: v)
    with pytest.raises(TypeError, match="activation must be True or False"):
        register_taylor_rule(torch.abs, lambda v: v, activation=1)
    assert taylor_rules.taylor_rule(_Unhashable()) is None


def test_layer_context_paths_name_nested_layers():
    ctx = TaylorLayerContext(strict=False, path="layer_2")
    assert ctx.name(nn.NoOpLayer()).startswith("layer_2 (")
    model = nn.Chain(nn.Dense(2, 2, torch.tanh), nn.Chain(nn.Dense(2, 2, torch.sin)))
    ps, st = lx.setup(torch.Generator().manual_seed(3), model, dtype=DT)
    with pytest.warns(TaylorFallbackWarning, match=r"layer_2\.layer_1 .*sin"):
        taylor_coefficients(model, _series((2, 2), 2, seed=3), ps, st)
