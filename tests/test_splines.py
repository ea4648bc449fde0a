"""Spline controls: exactness, derivatives, missing values, per-sample knots, gradients, bad input."""

import pytest
import torch
from scipy.interpolate import CubicSpline as ScipyCubicSpline

from pylux.diffeq import ControlTerm, Euler
from pylux.diffeq.splines import CubicSpline, HermiteCubicSpline, LinearInterpolation



pytestmark = pytest.mark.usefixtures("float64_default")


def _irregular_times(n, generator, span=4.0):
    inner = torch.sort(torch.rand(n - 2, generator=generator)).values * span
    return torch.cat([torch.zeros(1), inner, torch.full((1,), span)])


def _queries(times, n=41):
    return torch.linspace(float(times[0]), float(times[-1]), n).tolist() + times.tolist()


def test_natural_spline_matches_scipy_natural_and_reproduces_a_natural_spline():
    g = torch.Generator().manual_seed(0)
    t = _irregular_times(11, g)
    x = torch.randn(3, 11, 2, generator=g)
    spline = CubicSpline(x, t)
    ref = ScipyCubicSpline(t.numpy(), x.numpy(), axis=1, bc_type="natural")
    for q in _queries(t):
        assert torch.allclose(spline.evaluate(q), torch.as_tensor(ref(q)), atol=1e-12, rtol=0)
        assert torch.allclose(spline.derivative(q), torch.as_tensor(ref(q, 1)), atol=1e-11, rtol=0)
    # a natural cubic spline on these knots, sampled at the knots, is reproduced exactly (its own
    # boundary condition) -- everywhere, not only at the knots
    fine = torch.linspace(0.0, 4.0, 7)
    target = ScipyCubicSpline(fine.numpy(), torch.randn(7, generator=g).numpy(), bc_type="natural")
    knots = torch.sort(torch.cat([fine, t[1:-1]])).values
    refit = CubicSpline(torch.as_tensor(target(knots.numpy()))[None, :, None], knots)
    for q in torch.linspace(0.0, 4.0, 57).tolist():
        assert abs(float(refit.evaluate(q)) - float(target(q))) < 1e-12
        assert abs(float(refit.derivative(q)) - float(target(q, 1))) < 1e-11


@pytest.mark.parametrize("cls", [HermiteCubicSpline, LinearInterpolation, CubicSpline])
def test_linear_data_is_reproduced_exactly(cls):
    g = torch.Generator().manual_seed(2)
    t = _irregular_times(8, g)
    x = torch.stack([2.0 * t + 1.0, -0.5 * t], dim=-1)[None]
    path = cls(x, t)
    for q in _queries(t):
        assert torch.allclose(path.evaluate(q)[0], torch.tensor([2.0 * q + 1.0, -0.5 * q]), atol=1e-12)
        assert torch.allclose(path.derivative(q)[0], torch.tensor([2.0, -0.5]), atol=1e-11)


@pytest.mark.parametrize("cls", [CubicSpline, HermiteCubicSpline, LinearInterpolation])
def test_derivative_against_central_differences_and_continuity(cls):
    g = torch.Generator().manual_seed(3)
    t = _irregular_times(10, g)
    x = torch.randn(2, 10, 3, generator=g)
    path = cls(x, t)
    h = 1e-6
    for q in torch.linspace(0.05, 3.95, 23).tolist():
        if torch.isclose(t, torch.tensor(q), atol=2 * h).any():
            continue
        fd = (path.evaluate(q + h) - path.evaluate(q - h)) / (2 * h)
        assert torch.allclose(path.derivative(q), fd, atol=1e-6)
    # values interpolate the data at every knot; C1 at interior knots for the cubic ones
    for i, knot in enumerate(t.tolist()):
        assert torch.allclose(path.evaluate(knot), x[:, i], atol=1e-12)
    if cls is not LinearInterpolation:
        for knot in t[1:-1].tolist():
            left = path.derivative(knot - 1e-9)
            assert torch.allclose(left, path.derivative(knot), atol=1e-6)


def test_hermite_is_causal():
    g = torch.Generator().manual_seed(4)
    t = _irregular_times(9, g)
    x = torch.randn(1, 9, 2, generator=g)
    changed = x.clone()
    changed[:, 6:] += 5.0
    a, b = HermiteCubicSpline(x, t), HermiteCubicSpline(changed, t)
    for q in torch.linspace(float(t[0]), float(t[5]), 17).tolist():
        assert torch.equal(a.evaluate(q), b.evaluate(q))
    assert not torch.allclose(a.evaluate(float(t[5] + t[6]) / 2), b.evaluate(float(t[5] + t[6]) / 2))
    natural_a, natural_b = CubicSpline(x, t), CubicSpline(changed, t)
    assert not torch.allclose(natural_a.evaluate(float(t[2])+1e-3), natural_b.evaluate(float(t[2])+1e-3))


def test_missing_values_equal_fitting_on_observed_points_only():
    g = torch.Generator().manual_seed(5)
    t = _irregular_times(12, g)
    x = torch.randn(2, 12, 2, generator=g)
    missing = x.clone()
    missing[0, [2, 5, 6, 9], 0] = float("nan")      # interior gaps in one channel of one sample
    missing[1, [0, 1], 1] = float("nan")            # a leading gap: filled with the first observed value
    spline = CubicSpline(missing, t)
    keep = torch.ones(12, dtype=torch.bool)
    keep[[2, 5, 6, 9]] = False
    ref = ScipyCubicSpline(t[keep].numpy(), x[0, keep, 0].numpy(), bc_type="natural")
    lead = x[1, :, 1].clone()
    lead[:2] = x[1, 2, 1]
    ref_lead = ScipyCubicSpline(t.numpy(), lead.numpy(), bc_type="natural")
    untouched = ScipyCubicSpline(t.numpy(), x[0, :, 1].numpy(), bc_type="natural")
    for q in _queries(t):
        value = spline.evaluate(q)
        assert abs(float(value[0, 0]) - float(ref(q))) < 1e-12
        assert abs(float(value[1, 1]) - float(ref_lead(q))) < 1e-12
        assert abs(float(value[0, 1]) - float(untouched(q))) < 1e-12
    # linear and Hermite: gaps filled by linear interpolation between observed points
    linear = LinearInterpolation(missing, t)
    linear_ref = LinearInterpolation(x[:1, keep, :1], t[keep])
    for q in _queries(t):
        assert torch.allclose(linear.evaluate(q)[0, 0], linear_ref.evaluate(q)[0, 0], atol=1e-12)
    # an all-missing channel is zero; no NaN anywhere
    empty = x.clone()
    empty[1, :, 0] = float("nan")
    for cls in (CubicSpline, HermiteCubicSpline, LinearInterpolation):
        path = cls(empty, t)
        assert all(torch.isfinite(c).all() for c in path.coefficients)
        assert float(path.evaluate(1.3)[1, 0]) == 0.0


def test_per_sample_times_equal_separate_fits():
    g = torch.Generator().manual_seed(6)
    times = torch.stack([_irregular_times(9, g) for _ in range(3)])
    x = torch.randn(3, 9, 2, generator=g)
    x[1, 4, 0] = float("nan")
    batched = CubicSpline(x, times)
    for b in range(3):
        alone = CubicSpline(x[b:b + 1], times[b])
        for q in torch.linspace(0.0, 4.0, 13).tolist():
            assert torch.allclose(batched.evaluate(q)[b], alone.evaluate(q)[0], atol=1e-12)
            assert torch.allclose(batched.derivative(q)[b], alone.derivative(q)[0], atol=1e-11)
    assert batched.knots.shape[0] == times.unique().numel()


def test_gradients_flow_to_the_data():
    g = torch.Generator().manual_seed(7)
    t = _irregular_times(7, g)
    x = torch.randn(1, 7, 1, generator=g)
    x[0, 3, 0] = float("nan")
    data = x.clone().requires_grad_(True)

    def f(d):
        return CubicSpline(d, t).evaluate(1.7).sum() + CubicSpline(d, t).derivative(2.9).sum()
    grad, = torch.autograd.grad(f(data), data)
    assert float(grad[0, 3, 0]) == 0.0 and torch.isfinite(grad).all()
    eps = 1e-6
    for i in (0, 2, 4, 6):
        e = torch.zeros_like(x)
        e[0, i, 0] = eps
        fd = (f(x + e) - f(x - e)) / (2 * eps)
        assert abs(float(grad[0, i, 0]) - float(fd)) < 1e-7


def test_spline_as_the_control_of_a_control_term():
    # dz = z dX stepped by Euler over the knots of a linear path through X = t^2: each step multiplies z by
    # (1 + the control's increment), so the result is the product of the increments' factors
    t = torch.linspace(0.0, 1.0, 6)
    path = LinearInterpolation((t ** 2)[None, :, None], t)
    term = ControlTerm(lambda u, p, s: u.unsqueeze(-1), path).bind(None)
    u = torch.ones(1, 1)
    solver = Euler()
    for a, b in zip(t[:-1].tolist(), t[1:].tolist()):
        t_a, dt = torch.tensor(a), torch.tensor(b - a)
        u = solver.step(term, t_a, u, dt, solver.init(term, t_a, u, dt)).u_new
    expected = torch.prod(1.0 + (t[1:] ** 2 - t[:-1] ** 2))
    assert torch.allclose(u.reshape(()), expected, atol=1e-14)
    assert torch.allclose(path.increment(0.1, 0.7), path.evaluate(0.7) - path.evaluate(0.1))


@pytest.mark.parametrize("bad, message", [
    (dict(times=torch.tensor([0.0, 2.0, 1.0, 3.0])), "strictly increasing"),
    (dict(times=torch.tensor([0.0, 1.0, 2.0])), "one time per observation"),
    (dict(times=torch.zeros(2, 4)), "per-sample times"),
    (dict(values=torch.randn(4)), "channel"),
    (dict(values=torch.tensor([[[1.0], [float("inf")], [0.0], [1.0]]])), "Inf"),
    (dict(times=torch.tensor([0.0, float("nan"), 2.0, 3.0])), "NaN"),
])
def test_bad_input_is_refused_clearly(bad, message):
    args = dict(values=torch.randn(3, 4, 2), times=torch.tensor([0.0, 1.0, 2.0, 3.0]))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        CubicSpline(args["values"], args["times"])


def test_float32_data_with_float64_solver_time():
    t = torch.linspace(0.0, 1.0, 5)
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(8)).float()
    path = HermiteCubicSpline(x, t.float())
    out = path.derivative(torch.tensor(0.3, dtype=torch.float64))
    assert out.dtype == torch.float32 and out.shape == (2, 3)


@pytest.mark.parametrize("cls", [CubicSpline, HermiteCubicSpline, LinearInterpolation])
def test_padded_rows_return_to_the_last_observation_at_every_padded_knot(cls):
    """The documented behaviour of ragged rows padded with NaN: linear stays constant after the last
    observation; the cubic paths pass through it at every padded knot (they need not stay constant between)."""
    t = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    x = torch.tensor([[0.0, 1.5, 0.5, 2.0, float("nan"), float("nan")]], dtype=torch.float64).unsqueeze(-1)
    spline = cls(x, t)
    for knot in (3.0, 4.0, 5.0):
        assert spline.evaluate(knot).item() == pytest.approx(2.0, abs=1e-12)
    if cls is LinearInterpolation:
        assert spline.evaluate(3.5).item() == spline.evaluate(4.5).item() == pytest.approx(2.0, abs=1e-12)
    with pytest.raises(ValueError, match="take one time \\(a scalar\\), got a tensor of shape \\(2,\\)"):
        spline.evaluate(torch.tensor([0.5, 1.5]))
