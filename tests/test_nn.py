"""pylux.nn layers against closed forms, hand computations and torch references."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import pylux.core as core
from pylux import nn
from pylux.core import LayerError

f64 = torch.float64


def _rng(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=1, dtype=f64):
    return torch.randn(*shape, generator=_rng(seed), dtype=dtype)


# --- init ------------------------------------------------------------------------------------

def test_glorot_uniform_bounds_and_variance():
    w = nn.glorot_uniform(_rng(), 200, 300, dtype=f64)
    bound = math.sqrt(6.0 / (200 + 300))
    assert w.shape == (200, 300) and w.dtype == f64
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.999 * bound
    assert abs(w.var().item() - bound**2 / 3) < 0.02 * bound**2 / 3
    assert abs(w.mean().item()) < 0.01 * bound


def test_glorot_uniform_conv_fan_convention():
    # (out, in, kh, kw): fan_in = in*kh*kw = 36, fan_out = out*kh*kw = 72.
    w = nn.glorot_uniform(_rng(), 8, 4, 3, 3, dtype=f64)
    bound = math.sqrt(6.0 / (36 + 72))
    assert bound * 0.95 < w.abs().max() <= bound
    assert nn.init.fan_in_fan_out((8, 4, 3, 3)) == (36, 72)
    assert nn.init.fan_in_fan_out((5,)) == (1, 5)
    assert nn.init.fan_in_fan_out(()) == (1, 1)


def test_normal_and_kaiming_initialisers_have_the_right_spread():
    w = nn.glorot_normal(_rng(), 300, 500, dtype=f64)
    assert abs(w.std().item() - math.sqrt(2 / 800)) < 0.01 * math.sqrt(2 / 800)
    w = nn.kaiming_normal(_rng(), 300, 500, dtype=f64)
    assert abs(w.std().item() - math.sqrt(2 / 500)) < 0.01 * math.sqrt(2 / 500)
    w = nn.kaiming_uniform(_rng(), 300, 500, dtype=f64)
    bound = math.sqrt(2.0) * math.sqrt(3 / 500)
    assert 0.999 * bound < w.abs().max() <= bound
    assert torch.equal(nn.zeros(_rng(), 2, 3), torch.zeros(2, 3))
    assert torch.equal(nn.ones(_rng(), 4, dtype=f64), torch.ones(4, dtype=f64))


def test_initialisers_reject_bad_arguments():
    with pytest.raises(TypeError, match="glorot_uniform: expected a torch.Generator"):
        nn.glorot_uniform(3, 2, 2)
    with pytest.raises(TypeError, match=r"dimensions must be ints, got 2.0"):
        nn.kaiming_normal(_rng(), 2.0, 3)
    with pytest.raises(ValueError, match=r"dimensions must be non-negative, got shape \(-1, 3\)"):
        nn.zeros(_rng(), -1, 3)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype.*torch.int64"):
        nn.glorot_normal(_rng(), 2, 3, dtype=torch.int64)


# --- Dense -----------------------------------------------------------------------------------

def test_dense_equals_hand_written_matmul_over_leading_batch_dims():
    layer = nn.Dense(3, 4, torch.tanh)
    ps, st = core.setup(_rng(), layer, dtype=f64)
    x = _randn(2, 5, 3)
    y, st_new = layer(x, ps, st)
    W, b = ps["weight"], ps["bias"]
    expected = torch.empty(2, 5, 4, dtype=f64)
    for i in range(2):
        for j in range(5):
            for o in range(4):
                expected[i, j, o] = math.tanh(sum(x[i, j, k].item() * W[o, k].item() for k in range(3)) + b[o].item())
    assert torch.allclose(y, expected, atol=1e-14, rtol=0)
    assert st_new == {}
    assert ps["weight"].shape == (4, 3) and ps["bias"].shape == (4,)
    assert torch.equal(ps["bias"], torch.zeros(4, dtype=f64))


def test_dense_without_bias():
    layer = nn.Dense(3, 2, use_bias=False)
    ps, st = core.setup(_rng(), layer, dtype=f64)
    assert list(ps) == ["weight"] and layer.parameter_count() == 6
    x = _randn(4, 3)
    assert torch.allclose(layer(x, ps, st)[0], x @ ps["weight"].T, atol=1e-15)


def test_dense_bad_input_and_arguments():
    layer = nn.Dense(64, 100, torch.tanh)
    ps, st = core.setup(_rng(), layer)
    with pytest.raises(LayerError, match=r"^Dense: expected input with last dimension 64, got 32 "
                                         r"\(input shape \(8, 32\), expected \(\.\.\., 64\)\)"):
        layer(torch.randn(8, 32), ps, st)
    with pytest.raises(LayerError, match="Dense: expected a torch.Tensor input, got list"):
        layer([1.0] * 64, ps, st)
    with pytest.raises(ValueError, match="Dense: in_dims must be a positive int, got 0"):
        nn.Dense(0, 3)
    with pytest.raises(TypeError, match="Dense: activation must be a callable.*got str"):
        nn.Dense(2, 3, "tanh")
    with pytest.raises(TypeError, match="unexpected keyword argument 'activaton'"):
        nn.Dense(2, 3, activaton=torch.tanh)


# --- Chain -----------------------------------------------------------------------------------

def test_chain_composition_and_default_names():
    d1, d2 = nn.Dense(3, 5, torch.relu), nn.Dense(5, 2)
    chain = nn.Chain(d1, d2)
    ps, st = core.setup(_rng(), chain, dtype=f64)
    assert list(ps) == ["layer_1", "layer_2"] and list(st) == ["layer_1", "layer_2"]
    x = _randn(7, 3)
    y, _ = chain(x, ps, st)
    h, _ = d1(x, ps["layer_1"], st["layer_1"])
    expected, _ = d2(h, ps["layer_2"], st["layer_2"])
    assert torch.equal(y, expected)
    assert len(chain) == 2 and chain[1] is d2 and chain["layer_1"] is d1


def test_chain_custom_names_by_keyword_and_dict():
    chain = nn.Chain(encoder=nn.Dense(3, 2), decoder=nn.Dense(2, 3))
    ps, _ = core.setup(_rng(), chain)
    assert list(ps) == ["encoder", "decoder"]
    chain2 = nn.Chain({"enc": nn.Dense(3, 2), "dec": nn.Dense(2, 3)})
    assert list(core.setup(_rng(), chain2)[0]) == ["enc", "dec"]
    mismatched = nn.Chain({"enc": nn.Dense(3, 5), "dec": nn.Dense(2, 3)})
    ps3, st3 = core.setup(_rng(), mismatched)
    with pytest.raises(LayerError, match=r"^Chain.dec \(Dense\): expected input with last dimension 2, got 5"):
        mismatched(torch.randn(1, 3), ps3, st3)


def test_chain_name_appears_in_error_path_and_repr():
    chain = nn.Chain(nn.Dense(3, 4), nn.Dense(5, 1), name="encoder")
    ps, st = core.setup(_rng(), chain)
    with pytest.raises(LayerError, match=r"^encoder.layer_2 \(Dense\): expected input with last dimension 5, got 4"):
        chain(torch.randn(2, 3), ps, st)
    assert repr(chain).startswith("Chain(name='encoder',")


def test_chain_wraps_functions_and_torch_modules_and_rejects_the_rest():
    chain = nn.Chain(nn.Dense(2, 3), torch.tanh, torch.nn.Linear(3, 1))
    assert isinstance(chain[1], nn.WrappedFunction) and isinstance(chain[2], nn.TorchModule)
    with pytest.raises(TypeError, match="Chain: layer 'layer_2' is a int, not a pylux layer"):
        nn.Chain(nn.Dense(2, 3), 5)
    with pytest.raises(TypeError, match="either positionally or as keywords, not both"):
        nn.Chain(nn.Dense(2, 3), out=nn.Dense(3, 1))
    with pytest.raises(ValueError, match="layer names must be non-empty strings without '.'"):
        nn.Chain({"a.b": nn.Dense(2, 2)})


def test_chain_gradient_matches_finite_differences_in_float64():
    chain = nn.Chain(nn.Dense(3, 4, torch.tanh), nn.LayerNorm(4), nn.Dense(4, 2, F.softplus))
    ps, st = core.setup(_rng(), chain, dtype=f64)
    vector, unflatten = core.flatten(ps)
    x = _randn(5, 3)

    def loss(v):
        return (chain(x, unflatten(v), st)[0] ** 2).sum()

    v = vector.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(v), v)
    h = 1e-6
    with torch.no_grad():
        eye = torch.eye(v.numel(), dtype=f64)
        fd = torch.stack([(loss(vector + h * e) - loss(vector - h * e)) / (2 * h) for e in eye])
    assert torch.allclose(grad, fd, atol=1e-7, rtol=1e-6)
    assert grad.abs().max() > 1e-2


# --- Conv and pooling ------------------------------------------------------------------------

def test_conv_hand_computation_tiny_case():
    layer = nn.Conv(2, (1, 1))
    ps = {"weight": torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=f64), "bias": torch.tensor([0.5], dtype=f64)}
    x = torch.arange(9, dtype=f64).reshape(1, 1, 3, 3)
    y, _ = layer(x, ps, {})
    # [0 1 2; 3 4 5; 6 7 8] cross-correlated with [1 2; 3 4]:
    # 0+2+9+16 = 27, 1+4+12+20 = 37, 3+8+18+28 = 57, 4+10+21+32 = 67
    assert torch.equal(y, torch.tensor([[[[27.5, 37.5], [57.5, 67.5]]]], dtype=f64))


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(stride=2, padding=1),
    dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1)),
    dict(groups=2, padding="same"),
])
def test_conv_equals_torch_conv2d_with_the_same_weights(kwargs):
    layer = nn.Conv(3, (4, 6), torch.relu, **kwargs)
    ps, st = core.setup(_rng(), layer, dtype=f64)
    ps["bias"] = _randn(6, seed=3)
    x = _randn(2, 4, 9, 8)
    y, _ = layer(x, ps, st)
    padding = kwargs.get("padding", 0)
    expected = torch.relu(F.conv2d(x, ps["weight"], ps["bias"], kwargs.get("stride", 1), padding,
                                   kwargs.get("dilation", 1), kwargs.get("groups", 1)))
    assert torch.allclose(y, expected, atol=1e-13)
    assert ps["weight"].shape == (6, 4 // kwargs.get("groups", 1), 3, 3)
    assert layer.parameter_count() == core.parameter_count(ps)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_conv_same_padding_with_even_kernel_and_with_stride():
    layer = nn.Conv((2, 4), (1, 2), padding="same", dilation=(1, 2))
    ps, st = core.setup(_rng(), layer, dtype=f64)
    x = _randn(1, 1, 7, 6)
    y, _ = layer(x, ps, st)
    expected = F.conv2d(x, ps["weight"], ps["bias"], padding="same", dilation=(1, 2))
    assert y.shape == (1, 2, 7, 6) and torch.allclose(y, expected, atol=1e-14)
    strided = nn.Conv(3, (1, 1), padding="same", stride=2)
    y, _ = strided(x, *core.setup(_rng(), strided, dtype=f64))
    assert y.shape == (1, 1, 4, 3)  # ceil(7/2), ceil(6/2)


def test_conv_bad_input_and_arguments():
    layer = nn.Conv(3, (2, 4))
    ps, st = core.setup(_rng(), layer)
    with pytest.raises(LayerError, match=r"^Conv: expected a 4-D input .*got shape \(2, 5, 5\); add a batch"):
        layer(torch.randn(2, 5, 5), ps, st)
    with pytest.raises(LayerError, match=r"expected input with 2 channels \(dimension 1\), got 3"):
        layer(torch.randn(1, 3, 5, 5), ps, st)
    with pytest.raises(LayerError, match=r"input spatial size \(2, 5\) is smaller than the dilated kernel"):
        layer(torch.randn(1, 2, 2, 5), ps, st)
    with pytest.raises(LayerError, match="input dtype torch.float64 does not match parameter 'weight'"):
        layer(torch.randn(1, 2, 5, 5, dtype=f64), ps, st)
    with pytest.raises(ValueError, match="groups=2 must divide both in_chs=3 and out_chs=4"):
        nn.Conv(3, (3, 4), groups=2)
    with pytest.raises(ValueError, match="padding must be an int, a pair of ints or 'same', got 'valid'"):
        nn.Conv(3, (3, 4), padding="valid")
    with pytest.raises(ValueError, match="channels must be a pair"):
        nn.Conv(3, 4)


def test_pooling_layers():
    x = torch.arange(16, dtype=f64).reshape(1, 1, 4, 4)
    y, _ = nn.MaxPool(2)(x, {}, {})
    assert torch.equal(y, torch.tensor([[[[5.0, 7.0], [13.0, 15.0]]]], dtype=f64))
    y, _ = nn.MeanPool(2)(x, {}, {})
    assert torch.equal(y, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]], dtype=f64))
    x = _randn(2, 3, 7, 6)
    y, _ = nn.MaxPool(3, stride=2, padding=1)(x, {}, {})
    assert torch.equal(y, F.max_pool2d(x, 3, 2, 1))
    y, _ = nn.MeanPool((3, 2), stride=1, padding=(1, 0))(x, {}, {})
    assert torch.allclose(y, F.avg_pool2d(x, (3, 2), 1, (1, 0)))
    y, _ = nn.GlobalMeanPool()(x, {}, {})
    assert y.shape == (2, 3, 1, 1) and torch.allclose(y[:, :, 0, 0], x.mean(dim=(2, 3)))
    with pytest.raises(LayerError, match=r"^MaxPool: input spatial size \(1, 1\) is smaller than the window"):
        nn.MaxPool(2)(torch.zeros(1, 1, 1, 1), {}, {})
    with pytest.raises(ValueError, match="MaxPool: padding \\(2, 2\\) must be at most half the window"):
        nn.MaxPool(2, padding=2)


def test_flatten_and_reshape():
    x = _randn(2, 3, 4, 5)
    y, _ = nn.Flatten()(x, {}, {})
    assert y.shape == (2, 60) and torch.equal(y[1], x[1].reshape(-1))
    y, _ = nn.Reshape((12, 5))(x, {}, {})
    assert y.shape == (2, 12, 5)
    y, _ = nn.Reshape((-1, 3))(x, {}, {})
    assert y.shape == (2, 20, 3)
    with pytest.raises(LayerError, match=r"^Reshape: cannot reshape input of shape \(2, 3, 4, 5\) \(60 values"):
        nn.Reshape((7, 8))(x, {}, {})
    with pytest.raises(ValueError, match="at most one entry of dims may be -1"):
        nn.Reshape((-1, -1))


# --- normalisation ---------------------------------------------------------------------------

def test_batchnorm_train_mode_statistics_and_running_updates():
    layer = nn.BatchNorm(3, momentum=0.1, eps=1e-5)
    ps, st = core.setup(_rng(), layer, dtype=f64)
    ps = {"scale": torch.tensor([1.0, 2.0, 0.5], dtype=f64), "bias": torch.tensor([0.0, -1.0, 3.0], dtype=f64)}
    x1 = _randn(6, 3, seed=1) * 2 + 1
    x2 = _randn(6, 3, seed=2) - 4
    y, st1 = layer(x1, ps, st)
    mean, var = x1.mean(0), x1.var(0, unbiased=False)
    assert torch.allclose(y, (x1 - mean) / torch.sqrt(var + 1e-5) * ps["scale"] + ps["bias"], atol=1e-13)
    assert torch.allclose(st1["running_mean"], 0.1 * mean, atol=1e-15)
    assert torch.allclose(st1["running_var"], 0.9 + 0.1 * x1.var(0, unbiased=True), atol=1e-15)
    # The old state is untouched; a second step composes the momentum updates.
    assert torch.equal(st["running_mean"], torch.zeros(3, dtype=f64))
    _, st2 = layer(x2, ps, st1)
    assert torch.allclose(st2["running_mean"], 0.9 * 0.1 * mean + 0.1 * x2.mean(0), atol=1e-15)
    expected_var = 0.9 * (0.9 + 0.1 * x1.var(0, unbiased=True)) + 0.1 * x2.var(0, unbiased=True)
    assert torch.allclose(st2["running_var"], expected_var, atol=1e-15)
    assert st2["training"] is True


def test_batchnorm_test_mode_uses_running_stats_and_leaves_state_unchanged():
    layer = nn.BatchNorm(3, torch.relu)
    ps, st = core.setup(_rng(), layer, dtype=f64)
    _, st = layer(_randn(8, 3, seed=4) * 3, ps, st)
    st_test = core.testmode(st)
    x = _randn(5, 3)
    y, st_after = layer(x, ps, st_test)
    expected = torch.relu((x - st["running_mean"]) / torch.sqrt(st["running_var"] + 1e-5))
    assert torch.allclose(y, expected, atol=1e-14)
    assert torch.equal(st_after["running_mean"], st_test["running_mean"])
    assert torch.equal(st_after["running_var"], st_test["running_var"])
    assert st_after["training"] is False


def test_batchnorm_4d_matches_torch_batchnorm2d_in_both_modes():
    layer = nn.BatchNorm(4, momentum=0.2)
    ps, st = core.setup(_rng(), layer, dtype=f64)
    ps = {"scale": _randn(4, seed=5), "bias": _randn(4, seed=6)}
    ref = torch.nn.BatchNorm2d(4, momentum=0.2).double()
    with torch.no_grad():
        ref.weight.copy_(ps["scale"])
        ref.bias.copy_(ps["bias"])
    x = _randn(3, 4, 5, 2)
    y, st = layer(x, ps, st)
    assert torch.allclose(y, ref(x), atol=1e-13)
    assert torch.allclose(st["running_mean"], ref.running_mean, atol=1e-15)
    assert torch.allclose(st["running_var"], ref.running_var, atol=1e-15)
    ref.eval()
    y, _ = layer(x, ps, core.testmode(st))
    assert torch.allclose(y, ref(x), atol=1e-13)


def test_batchnorm_without_tracking_and_bad_inputs():
    layer = nn.BatchNorm(2, affine=False, track_stats=False)
    ps, st = core.setup(_rng(), layer, dtype=f64)
    assert ps == {} and st == {"training": True}
    x = _randn(4, 2)
    y, _ = layer(x, ps, core.testmode(st))
    assert torch.allclose(y, (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5), atol=1e-14)
    full = nn.BatchNorm(2)
    ps, st = core.setup(_rng(), full)
    with pytest.raises(LayerError, match=r"^BatchNorm: expected input of shape \(batch, 2, \.\.\.\) .*"
                                         r"got shape \(4, 3\)"):
        full(torch.randn(4, 3), ps, st)
    with pytest.raises(LayerError, match=r"more than one value per channel, got input shape \(1, 2\)"):
        full(torch.randn(1, 2), ps, st)
    with pytest.raises(LayerError, match="state 'training' must be a Python bool, got Tensor"):
        full(torch.randn(3, 2), ps, {**st, "training": torch.tensor(True)})
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\], got 1.5"):
        nn.BatchNorm(2, momentum=1.5)


def test_groupnorm_and_layernorm_against_hand_computation():
    x = _randn(2, 6, 3, 2)
    gn = nn.GroupNorm(6, 3)
    ps, st = core.setup(_rng(), gn, dtype=f64)
    ps = {"scale": _randn(6, seed=7), "bias": _randn(6, seed=8)}
    y, _ = gn(x, ps, st)
    g = x.reshape(2, 3, 2 * 3 * 2)
    normalised = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5))
    expected = normalised.reshape_as(x) * ps["scale"].view(1, 6, 1, 1) + ps["bias"].view(1, 6, 1, 1)
    assert torch.allclose(y, expected, atol=1e-13)
    with pytest.raises(ValueError, match="GroupNorm: groups=4 must divide chs=6"):
        nn.GroupNorm(6, 4)

    ln = nn.LayerNorm((3, 2), torch.tanh)
    ps, st = core.setup(_rng(), ln, dtype=f64)
    assert ps["scale"].shape == (3, 2) and ln.parameter_count() == 12
    y, _ = ln(x, ps, st)
    flat = x.reshape(2, 6, 6)
    expected = torch.tanh((flat - flat.mean(-1, keepdim=True))
                          / torch.sqrt(flat.var(-1, unbiased=False, keepdim=True) + 1e-5)).reshape_as(x)
    assert torch.allclose(y, expected, atol=1e-13)
    with pytest.raises(LayerError, match=r"^LayerNorm: expected input whose trailing dimensions are \(3, 2\)"):
        ln(_randn(2, 6, 2, 3), ps, st)


def test_scale_layer():
    layer = nn.Scale((2, 3), torch.relu)
    ps, st = core.setup(_rng(), layer, dtype=f64)
    assert torch.equal(ps["weight"], torch.ones(2, 3, dtype=f64)) and layer.parameter_count() == 12
    ps = {"weight": _randn(2, 3, seed=2), "bias": _randn(2, 3, seed=3)}
    x = _randn(4, 2, 3)
    y, _ = layer(x, ps, st)
    assert torch.allclose(y, torch.relu(x * ps["weight"] + ps["bias"]), atol=1e-15)
    with pytest.raises(LayerError, match=r"^Scale: expected input whose trailing dimensions are \(2, 3\)"):
        layer(_randn(4, 3), ps, st)


# --- Dropout ---------------------------------------------------------------------------------

def test_dropout_reproducible_from_the_same_state_and_generator():
    layer = nn.Dropout(0.5)
    _, st = core.setup(_rng(3), layer)
    _, st_again = core.setup(_rng(3), layer)
    x = torch.ones(1000, dtype=f64)
    y1, st1 = layer(x, {}, st)
    y2, _ = layer(x, {}, st)
    y3, _ = layer(x, {}, st_again)
    assert torch.equal(y1, y2) and torch.equal(y1, y3)
    y4, st2 = layer(x, {}, st1)
    assert not torch.equal(y1, y4)
    assert st1["rng"] != st["rng"] and st2["rng"] != st1["rng"]
    assert isinstance(st1["rng"], int)


def test_dropout_identity_in_test_mode_and_mean_preserved():
    p = 0.3
    layer = nn.Dropout(p)
    _, st = core.setup(_rng(), layer)
    x = torch.ones(200_000, dtype=f64)
    y, st_same = layer(x, {}, core.testmode(st))
    assert y is x and st_same["rng"] == st["rng"]
    y, _ = layer(x, {}, st)
    kept = y != 0
    assert torch.all(y[kept] == 1.0 / (1.0 - p))
    assert abs(kept.double().mean().item() - (1 - p)) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01
    y, _ = nn.Dropout(1.0)(x, {}, core.setup(_rng(), nn.Dropout(1.0))[1])
    assert torch.equal(y, torch.zeros_like(x))


def test_dropout_bad_arguments():
    with pytest.raises(ValueError, match=r"Dropout: p must be a probability in \[0, 1\], got 1.2"):
        nn.Dropout(1.2)
    layer = nn.Dropout(0.5)
    with pytest.raises(LayerError, match="state 'rng' must be an int key"):
        layer(torch.ones(3), {}, {"rng": 0.5, "training": True})
    with pytest.raises(LayerError, match="expected a floating-point input, got dtype torch.int64"):
        layer(torch.ones(3, dtype=torch.int64), {}, {"rng": 1, "training": True})


# --- SkipConnection / Parallel / WrappedFunction / NoOpLayer ----------------------------------

def test_skip_connection():
    inner = nn.Dense(3, 3, torch.tanh)
    skip = nn.SkipConnection(inner, "+")
    ps, st = core.setup(_rng(), skip, dtype=f64)
    x = _randn(4, 3)
    y, new_st = skip(x, ps, st)
    assert torch.allclose(y, inner(x, ps["layers"], {})[0] + x, atol=0)
    assert new_st == {"layers": {}}
    times = nn.SkipConnection(inner, lambda y, x: y * x)
    assert torch.equal(times(x, ps, st)[0], inner(x, ps["layers"], {})[0] * x)
    with_layer = nn.SkipConnection(inner, nn.WrappedFunction(lambda yx: yx[0] - yx[1]))
    ps2, st2 = core.setup(_rng(), with_layer, dtype=f64)
    assert list(ps2) == ["layers", "connection"]
    assert torch.equal(with_layer(x, ps2, st2)[0], inner(x, ps2["layers"], {})[0] - x)
    bad = nn.SkipConnection(nn.Dense(3, 2), "+")
    with pytest.raises(LayerError, match=r"^SkipConnection: '\+' connection needs the layer output shape \(4, 2\)"):
        bad(x, *core.setup(_rng(), bad, dtype=f64))
    with pytest.raises(ValueError, match="the only string connection is '\\+', got '\\*'"):
        nn.SkipConnection(inner, "*")


def test_parallel_shared_and_tuple_inputs():
    a, b = nn.Dense(3, 2), nn.Dense(3, 2, torch.tanh)
    par = nn.Parallel("+", a, b)
    ps, st = core.setup(_rng(), par, dtype=f64)
    x = _randn(5, 3)
    ya, yb = a(x, ps["layer_1"], {})[0], b(x, ps["layer_2"], {})[0]
    assert torch.allclose(par(x, ps, st)[0], ya + yb, atol=0)
    tup = nn.Parallel(None, a, b)
    out, _ = tup(x, ps, st)
    assert isinstance(out, tuple) and torch.equal(out[0], ya) and torch.equal(out[1], yb)
    x2 = _randn(5, 3, seed=9)
    cat = nn.Parallel(lambda *ys: torch.cat(ys, -1), a, b)
    out, _ = cat((x, x2), ps, st)
    assert torch.equal(out, torch.cat([ya, b(x2, ps["layer_2"], {})[0]], -1))
    with pytest.raises(LayerError, match="^Parallel: got a tuple of 3 inputs for 2 layers"):
        cat((x, x, x), ps, st)
    named = nn.Parallel(None, left=a, right=b)
    assert list(core.setup(_rng(), named)[0]) == ["left", "right"]


def test_wrapped_function_and_noop():
    fn = nn.WrappedFunction(torch.sin)
    x = _randn(3)
    assert torch.equal(fn(x, {}, {})[0], torch.sin(x)) and repr(fn) == "WrappedFunction(sin)"
    assert nn.NoOpLayer()(x, {}, {"a": 1}) == (x, {"a": 1})
    with pytest.raises(TypeError, match="WrappedFunction: expected a callable, got int"):
        nn.WrappedFunction(3)


# --- TorchModule -----------------------------------------------------------------------------

def _grads_of_module(module, x):
    module.zero_grad()
    (module(x) ** 2).sum().backward()
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def _grads_of_layer(layer, ps, st, x):
    ps = {k: v.clone().requires_grad_(True) for k, v in ps.items()}
    y, st_new = layer(x, ps, st)
    grads = torch.autograd.grad((y ** 2).sum(), list(ps.values()))
    return y, dict(zip(ps, grads)), st_new


def test_torch_module_mlp_output_and_gradients_equal_the_module():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    layer = nn.TorchModule(module)
    ps, st = core.setup(_rng(), layer)
    assert list(ps) == ["0.weight", "0.bias", "2.weight", "2.bias"] and st == {"buffers": {}, "training": True}
    assert layer.parameter_count() == core.parameter_count(ps) == 3 * 8 + 8 + 8 * 2 + 2
    x = _randn(6, 3)
    y, grads, _ = _grads_of_layer(layer, ps, st, x)
    assert torch.equal(y, module(x))
    reference = _grads_of_module(module, x)
    for name in reference:
        assert torch.allclose(grads[name], reference[name], atol=1e-14)
    # Parameters are copies: changing ps does not change the module.
    ps["0.bias"] = ps["0.bias"] + 1
    assert not torch.equal(layer(x, ps, st)[0], module(x))


def test_torch_module_with_batchnorm_buffers_go_through_state():
    torch.manual_seed(1)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
                                 torch.nn.Linear(4, 1)).double()
    module.eval()
    layer = nn.TorchModule(module)
    ps, st = core.setup(_rng(), layer)
    assert sorted(st["buffers"]) == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    x = _randn(8, 3)
    reference = copy.deepcopy(module).train()
    y, grads, st_new = _grads_of_layer(layer, ps, st, x)
    ref_grads = _grads_of_module(reference, x)
    assert torch.allclose(y, reference(x), atol=1e-14)
    for name in ref_grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-13)
    # reference ran twice (once for the output check, once for the grads); replay one step for the stats.
    one_step = copy.deepcopy(module).train()
    one_step(x)
    assert torch.allclose(st_new["buffers"]["1.running_mean"], one_step[1].running_mean, atol=1e-15)
    assert torch.allclose(st_new["buffers"]["1.running_var"], one_step[1].running_var, atol=1e-15)
    assert st_new["buffers"]["1.num_batches_tracked"] == 1
    # Neither the old state nor the module were written into, and the module's mode is restored.
    assert torch.equal(st["buffers"]["1.running_mean"], torch.zeros(4, dtype=f64))
    assert torch.equal(module[1].running_mean, torch.zeros(4, dtype=f64))
    assert module.training is False and module[1].training is False
    # Test mode runs the module in eval mode with the state's statistics.
    one_step.eval()
    y_test, st_test = layer(x, ps, core.testmode(st_new))
    assert torch.allclose(y_test, one_step(x), atol=1e-14)
    assert st_test["training"] is False


def test_torch_module_errors():
    layer = nn.TorchModule(torch.nn.Linear(3, 2))
    ps, st = core.setup(_rng(), layer)
    with pytest.raises(LayerError, match="^TorchModule: input dtype torch.float64 does not match parameter 'weight'"):
        layer(_randn(2, 3), ps, st)
    with pytest.raises(LayerError, match="parameter tree is missing key 'bias'"):
        layer(torch.randn(2, 3), {"weight": ps["weight"]}, st)
    with pytest.raises(TypeError, match="TorchModule: expected a torch.nn.Module, got builtin_function_or_method"):
        nn.TorchModule(torch.tanh)


def test_mixed_torch_and_pylux_chain():
    torch.manual_seed(2)
    linear = torch.nn.Linear(3, 5).double()
    chain = nn.Chain(nn.TorchModule(linear), nn.Dense(5, 2, torch.tanh), torch.nn.Softplus())
    ps, st = core.setup(_rng(), chain, dtype=f64)
    x = _randn(4, 3)
    y, _ = chain(x, ps, st)
    dense = ps["layer_2"]
    expected = F.softplus(torch.tanh(linear(x) @ dense["weight"].T + dense["bias"]))
    assert torch.allclose(y, expected, atol=1e-14)
    assert chain.parameter_count() == core.parameter_count(ps) == 20 + 12


# --- torch.func transforms -------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")
def test_layers_work_under_torch_func_grad_vmap_and_jvp():
    model = nn.Chain(nn.Dense(3, 4, torch.tanh), nn.Scale(4), nn.LayerNorm(4), nn.Dense(4, 2))
    ps, st = core.setup(_rng(), model, dtype=f64)
    x = _randn(5, 3)

    grads = torch.func.grad(lambda p: model(x, p, st)[0].pow(2).sum())(ps)
    ps_leaf = core.tree_map(lambda t: t.clone().requires_grad_(True), ps)
    model(x, ps_leaf, st)[0].pow(2).sum().backward()
    for (_, g), (_, p) in zip(core.tree_leaves_with_path(grads), core.tree_leaves_with_path(ps_leaf)):
        assert torch.allclose(g, p.grad, atol=1e-14)

    per_sample = torch.func.vmap(lambda xi: model(xi, ps, st)[0])(x)
    assert torch.allclose(per_sample, model(x, ps, st)[0], atol=1e-14)

    v = _randn(5, 3, seed=11)
    _, tangent = torch.func.jvp(lambda xx: model(xx, ps, st)[0], (x,), (v,))
    h = 1e-6
    fd = (model(x + h * v, ps, st)[0] - model(x - h * v, ps, st)[0]) / (2 * h)
    assert torch.allclose(tangent, fd, atol=1e-8)


# --- repr and parameter counts ---------------------------------------------------------------

def test_reprs_are_lux_like():
    assert repr(nn.Dense(64, 100, torch.tanh)) == "Dense(64 => 100, tanh)"
    assert repr(nn.Dense(2, 3, F.gelu, use_bias=False)) == "Dense(2 => 3, gelu, use_bias=False)"
    assert repr(nn.Conv(3, (1, 16), torch.relu, stride=2)) == "Conv((3, 3), 1 => 16, relu, stride=(2, 2))"
    assert repr(nn.BatchNorm(16, momentum=0.2)) == "BatchNorm(16, momentum=0.2)"
    assert repr(nn.GroupNorm(8, 2)) == "GroupNorm(8, 2)"
    assert repr(nn.LayerNorm(4)) == "LayerNorm(4)"
    assert repr(nn.Dropout(0.5)) == "Dropout(0.5)"
    assert repr(nn.MaxPool(2)) == "MaxPool((2, 2))"
    assert repr(nn.Scale(3)) == "Scale(3)"
    assert repr(nn.Reshape((2, 3))) == "Reshape((2, 3))"
    assert repr(nn.Flatten()) == "Flatten()"
    assert repr(nn.Chain(nn.Dense(2, 3), nn.Dense(3, 1))) == (
        "Chain(\n  layer_1 = Dense(2 => 3),\n  layer_2 = Dense(3 => 1)\n)")
    assert repr(nn.SkipConnection(nn.Dense(2, 2), "+")) == "SkipConnection(\n  Dense(2 => 2),\n  +\n)"
    assert repr(nn.TorchModule(torch.nn.Tanh())) == "TorchModule(Tanh())"
    assert repr(nn.Parallel("+", nn.Dense(2, 1), name="heads")) == (
        "Parallel(name='heads',\n  connection = +,\n  layer_1 = Dense(2 => 1)\n)")


@pytest.mark.parametrize("layer", [
    nn.Dense(3, 4), nn.Dense(3, 4, use_bias=False), nn.Conv(3, (4, 6), groups=2), nn.Conv(1, (2, 3), use_bias=False),
    nn.BatchNorm(5), nn.BatchNorm(5, affine=False), nn.GroupNorm(6, 3), nn.LayerNorm((2, 3)), nn.Scale((2, 2)),
    nn.Scale(3, use_bias=False), nn.Dropout(0.1), nn.MaxPool(2), nn.Flatten(),
    nn.Chain(nn.Dense(2, 3), nn.SkipConnection(nn.Dense(3, 3), "+"), nn.Parallel("+", nn.Dense(3, 1), nn.Dense(3, 1))),
])
def test_parameter_count_is_right(layer):
    ps, _ = core.setup(_rng(), layer)
    assert layer.parameter_count() == core.parameter_count(ps)


# --- CUDA (skipped where there is no GPU) ------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_cuda_matches_cpu_and_dropout_draws_on_the_device():
    model = nn.Chain(nn.Conv(3, (2, 4), torch.relu, padding=1), nn.BatchNorm(4), nn.MaxPool(2), nn.Flatten(),
                     nn.TorchModule(torch.nn.Linear(16, 8)), nn.Dense(8, 3), nn.Dropout(0.5))
    ps, st = core.setup(_rng(), model, dtype=f64)
    ps_gpu, st_gpu = core.tree_to(ps, "cuda"), core.tree_to(st, "cuda")
    x = _randn(2, 2, 4, 4)
    y_cpu, st_cpu = model(x, ps, core.testmode(st))
    y_gpu, _ = model(x.cuda(), ps_gpu, core.testmode(st_gpu))
    assert torch.allclose(y_gpu.cpu(), y_cpu, atol=1e-12)
    y1, _ = model(x.cuda(), ps_gpu, st_gpu)
    y2, _ = model(x.cuda(), ps_gpu, st_gpu)
    assert y1.device.type == "cuda" and torch.equal(y1, y2)
    with pytest.raises(LayerError, match="input is on device cpu but parameter 'weight' is on cuda"):
        model(x, ps_gpu, st_gpu)
