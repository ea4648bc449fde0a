"""NeuralCDE: reduction to a NeuralODE, gradients under every sensealg, per-sample knots, bad input."""

import pytest
import torch

import pylux as lx
from pylux import nn
from pylux.core import LayerError, tree_leaves
from pylux.diffeq import RK4


pytestmark = pytest.mark.usefixtures("float64_default")

H, C = 3, 2


def _field(hidden=H, channels=C):
    return nn.Chain(nn.Dense(hidden, 8, torch.tanh), nn.Dense(8, hidden * channels, torch.tanh))


def _data(B=2, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    # irregular, but no two knots closer than a third of the mean gap (so the spline's slopes stay moderate)
    t = torch.linspace(0.0, 1.0, T)
    t[1:-1] += (torch.rand(T - 2, generator=g) - 0.5) / (1.5 * (T - 1))
    return t, torch.randn(B, T, C, generator=g)


def test_control_equal_to_time_gives_the_neural_ode():
    model = nn.Chain(nn.Dense(H, 8, torch.tanh), nn.Dense(8, H, torch.tanh))
    t = torch.tensor([0.0, 0.3, 0.35, 0.8, 1.5])
    x = t.view(1, -1, 1).expand(4, -1, 1)
    cde = lx.NeuralCDE(model, H, 1, interpolation="cubic", reltol=1e-9, abstol=1e-9)
    ps, st = lx.setup(torch.Generator().manual_seed(0), cde)
    z1, st1 = cde((t, x), ps, st)
    z0, _ = cde.initial(x[:, 0], ps["initial"], {})
    node = lx.NeuralODE(model, (0.0, 1.5), reltol=1e-9, abstol=1e-9)
    ref, st_ref = node(z0, ps["vector_field"], node.init_state(torch.Generator()))
    assert torch.allclose(z1, ref, atol=1e-12, rtol=0)
    assert st1["nfe"] == st_ref["nfe"]


FAST = [None, lx.BacksolveAdjoint(seminorm=True), lx.ReversibleAdjoint()]
THOROUGH = [lx.BacksolveAdjoint(), lx.InterpolatingAdjoint(), lx.InterpolatingAdjoint(checkpointing=True),
            lx.QuadratureAdjoint()]
SENSEALGS = [*FAST, *(pytest.param(s, marks=pytest.mark.slow) for s in THOROUGH)]


def _loss(cde, ps, st, t, x):
    z, _ = cde((t, x), ps, st)
    return (z ** 2).sum() + z.sum()


def _setup():
    t, x = _data(T=5)
    ps, st = lx.setup(torch.Generator().manual_seed(1), lx.NeuralCDE(_field(), H, C))
    return t, x, ps, st


#: (which tensor, index) of the checked entries: a weight of the field, a data value, the initial layer's bias
CHECKS = (("vector_field", (1, 2)), ("data", (1, 3, 0)), ("initial", (1,)))


def _entry(ps, data, which):
    if which == "data":
        return data
    return ps["vector_field"]["layer_1"]["weight"] if which == "vector_field" else ps["initial"]["bias"]


@pytest.fixture(scope="module")
def finite_differences():
    """Richardson-extrapolated central differences (error O(eps^4)) of a solve at tolerance 1e-10 that steps onto
    the knots; its solve error over 2 eps leaves them accurate to about 1e-6."""
    t, x, ps, st = _setup()
    reference = lx.NeuralCDE(_field(), H, C, reltol=1e-9, abstol=1e-9, stop_at_knots=True)
    eps, out = 4e-3, {}
    with torch.no_grad():
        for which, index in CHECKS:
            tensor = _entry(ps, x, which)
            original = tensor[index].item()

            def central(h):
                tensor[index] = original + h
                up = _loss(reference, ps, st, t, x)
                tensor[index] = original - h
                down = _loss(reference, ps, st, t, x)
                tensor[index] = original
                return float((up - down) / (2 * h))
            out[which] = (4 * central(eps / 2) - central(eps)) / 3
    return out


@pytest.mark.parametrize("sensealg", SENSEALGS, ids=lambda s: repr(s))
def test_gradient_under_each_sensealg_against_finite_differences(sensealg, finite_differences):
    t, x, ps, st = _setup()
    cde = lx.NeuralCDE(_field(), H, C, sensealg=sensealg, reltol=1e-9, abstol=1e-9, stop_at_knots=True)
    leaves = tree_leaves(ps)
    for leaf in leaves:
        leaf.requires_grad_(True)
    data = x.clone().requires_grad_(True)
    loss = _loss(cde, ps, st, t, data)
    grads = dict(zip(["vector_field", "data", "initial"],
                     torch.autograd.grad(loss, [_entry(ps, data, w) for w, _ in CHECKS])))
    for which, index in CHECKS:
        fd = finite_differences[which]
        assert abs(float(grads[which][index]) - fd) < 1e-5 * max(1.0, abs(fd)), (which, float(grads[which][index]), fd)


def test_per_sample_knots_equal_separate_solves():
    g = torch.Generator().manual_seed(2)
    times = torch.stack([torch.cat([torch.zeros(1), torch.sort(torch.rand(5, generator=g)).values, torch.ones(1)])
                         for _ in range(3)])
    x = torch.randn(3, 7, C, generator=g)
    cde = lx.NeuralCDE(_field(), H, C, interpolation="hermite", solver=RK4(), dt=0.01)
    ps, st = lx.setup(torch.Generator().manual_seed(3), cde)
    batched, _ = cde((times, x), ps, st)
    for b in range(3):
        alone, _ = cde((times[b], x[b:b + 1]), ps, st)
        assert torch.allclose(batched[b], alone[0], atol=1e-13)


def test_linear_interpolation_steps_onto_the_knots_and_missing_data_work():
    t, x = _data(T=8)
    x[0, 2, 1] = float("nan")
    cde = lx.NeuralCDE(_field(), H, C, interpolation="linear", reltol=1e-4, abstol=1e-4)
    ps, st = lx.setup(torch.Generator().manual_seed(4), cde)
    z, st1 = cde((t, x), ps, st)
    assert torch.isfinite(z).all()
    assert st1["naccept"] >= len(t) - 1
    control = lx.LinearInterpolation(x, t)
    z_direct, _ = cde(control, ps, st)
    assert torch.equal(z, z_direct)


def test_saveat_and_float32():
    t, x = _data()
    cde = lx.NeuralCDE(_field(), H, C, saveat=[0.0, 0.5, 1.0])
    ps, st = lx.setup(torch.Generator().manual_seed(5), cde, dtype=torch.float32)
    zs, _ = cde((t.float(), x.float()), ps, st)
    assert zs.shape == (3, 2, H) and zs.dtype == torch.float32


def test_bad_input_is_refused_clearly():
    t, x = _data()
    cde = lx.NeuralCDE(_field(), H, C)
    ps, st = lx.setup(torch.Generator().manual_seed(6), cde)
    with pytest.raises(LayerError, match="3 channels but the layer was built with channels=2"):
        cde((t, torch.randn(2, 6, 3)), ps, st)
    with pytest.raises(LayerError, match="strictly increasing"):
        cde((t.flip(0), x), ps, st)
    wrong = lx.NeuralCDE(nn.Dense(H, H), H, C)
    ps_w, st_w = lx.setup(torch.Generator().manual_seed(6), wrong)
    with pytest.raises(LayerError, match=r"\(B, hidden \* channels\)"):
        wrong((t, x), ps_w, st_w)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        lx.NeuralCDE(_field(), H, C, interpolation="spline")
    with pytest.raises(TypeError, match="reltol"):
        lx.NeuralCDE(_field(), H, C, reltoll=1e-3)
    with pytest.raises(TypeError, match="tstops"):
        lx.NeuralCDE(_field(), H, C, tstops=[0.5])
    # regression (torchcde's test_grad_paths, checked by value): with times that require grad the span was
    # cut from the graph and dL/dt came out wrong (here -8.4 where it is ~0); now refused
    for interpolation in ("cubic", "linear"):
        layer = lx.NeuralCDE(_field(), H, C, interpolation=interpolation)
        ps_i, st_i = lx.setup(torch.Generator().manual_seed(6), layer)
        with pytest.raises(LayerError, match=r"observation times are not supported.*times.detach\(\)"):
            layer((t.clone().requires_grad_(True), x), ps_i, st_i)
