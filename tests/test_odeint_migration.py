"""pylux.odeint with torchdiffeq's conventions, on torchdiffeq's own test problems (tests/problems.py:
constant, sine, linear, harmonic on t = linspace(1, 8, 10), its error thresholds), against the exact
solutions and against torchdiffeq itself when it is installed; argument checks always."""

import math

import numpy as np
import pytest
import torch

import pylux as lx
from pylux.interop import METHODS, odeint, odeint_adjoint

DT = torch.float64


class ConstantODE(torch.nn.Module):
    """y' = a + (y - (a t + b))^5, exact y = a t + b."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.2))
        self.b = torch.nn.Parameter(torch.tensor(3.0))

    def forward(self, t, y):
        return self.a + (y - (self.a * t + self.b)) ** 5

    def y_exact(self, t):
        return self.a * t + self.b


class SineODE(torch.nn.Module):
    """y' = 2y/t + t^4 sin 2t - t^2 + 4t^3 with its closed-form solution through y(1)."""

    def forward(self, t, y):
        return 2 * y / t + t ** 4 * torch.sin(2 * t) - t ** 2 + 4 * t ** 3

    def y_exact(self, t):
        return (-0.5 * t ** 4 * torch.cos(2 * t) + 0.5 * t ** 3 * torch.sin(2 * t) + 0.25 * t ** 2 * torch.cos(2 * t)
                - t ** 3 + 2 * t ** 4 + (math.pi - 0.25) * t ** 2)


class LinearODE(torch.nn.Module):
    """y' = A y with A = U - U^T (skew), exact exp(A t) 1."""

    def __init__(self, dim=10):
        super().__init__()
        u = torch.randn(dim, dim, generator=torch.Generator().manual_seed(0)) * 0.1
        self.A = torch.nn.Parameter(u - u.T)

    def forward(self, t, y):
        return self.A @ y

    def y_exact(self, t):
        from scipy.linalg import expm
        a = self.A.detach().cpu().numpy()
        return torch.tensor(np.stack([expm(a * ti) @ np.ones(a.shape[0]) for ti in t.tolist()])).to(t)


class HarmonicOscillator(torch.nn.Module):
    """y' = y D with D = [[0, -diag(kappa)], [I, 0]], exact 1 exp(D t)."""

    def __init__(self, dim=4):
        super().__init__()
        n = dim // 2
        kappa = 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(1)).abs()
        top = torch.cat((torch.zeros(n, n), torch.diag(-kappa)), 1)
        bottom = torch.cat((torch.eye(n), torch.zeros(n, n)), 1)
        self.D = torch.nn.Parameter(torch.cat((top, bottom), 0))

    def forward(self, t, y):
        return y @ self.D

    def y_exact(self, t):
        from scipy.linalg import expm
        d = self.D.detach().cpu().numpy()
        return torch.tensor(np.stack([np.ones(d.shape[0]) @ expm(d * ti) for ti in t.tolist()])).to(t)


PROBLEMS = {"constant": ConstantODE, "sine": SineODE, "linear": LinearODE, "harmonic": HarmonicOscillator}


def construct(name, dtype=DT, reverse=False, npts=10):
    f = PROBLEMS[name]().to(dtype)
    t = torch.linspace(1, 8, npts, dtype=dtype)
    with torch.no_grad():
        sol = f.y_exact(t)
    if reverse:
        t, sol = t.flip(0), sol.flip(0)
    return f, sol[0].clone(), t, sol


def rel_error(true, estimate):
    return float(((true - estimate) / true).abs().max().detach())


def threshold(method, name):
    """torchdiffeq's thresholds in odeint_tests.py."""
    if method == "adaptive_heun":
        return 4e-3
    if method == "bosh3":
        return 3e-3
    return 2e-3 if name == "linear" else 1e-4


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize("method", ["dopri5", "tsit5", pytest.param("bosh3", marks=pytest.mark.slow),
                                    pytest.param("adaptive_heun", marks=pytest.mark.slow)])
def test_adaptive_methods_on_torchdiffeq_problems(method, name, reverse):
    f, y0, t, sol = construct(name, reverse=reverse)
    y = odeint(f, y0, t, method=method)
    assert y.shape == sol.shape
    assert rel_error(sol, y) < threshold(method, name)


def test_fixed_methods_and_float32():
    for method in ("euler", "midpoint", "heun2", "rk4", "explicit_adams", "bosh3", "adaptive_heun"):
        f, y0, t, sol = construct("constant")
        assert rel_error(sol, odeint(f, y0, t, method=method)) < 1e-4, method
    for name in PROBLEMS:
        f, y0, t, sol = construct(name, dtype=torch.float32)
        y = odeint(f, y0, t)
        assert y.dtype == torch.float32 and rel_error(sol, y) < threshold("dopri5", name), name
    # a fixed step that divides the output spacing 7/9: RK4's error falls by 2**4 when the step halves
    f, y0, t, sol = construct("sine")
    errors = [rel_error(sol, odeint(f, y0, t, method="rk4", options={"step_size": 7 / 9 / n})) for n in (8, 16)]
    assert 3.8 < math.log2(errors[0] / errors[1]) < 4.2


def test_single_time_returns_y0():
    f, y0, t, _ = construct("linear")
    out = odeint(f, y0, t[:1])
    assert out.shape == (1, *y0.shape) and torch.equal(out[0], y0)


def test_agrees_with_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    for name in PROBLEMS:
        for reverse in (False, True):
            f, y0, t, sol = construct(name, reverse=reverse)
            ours = odeint(f, y0, t, method="dopri5")
            theirs = torchdiffeq.odeint(f, y0, t, method="dopri5")
            assert rel_error(theirs, ours) < 1e-5, (name, reverse)
    f, y0, t, _ = construct("sine")
    for method in ("bosh3", "rk4", "euler", "midpoint"):
        ours = odeint(f, y0, t, method=method)
        theirs = torchdiffeq.odeint(f, y0, t, method=method)
        # same grid; bosh3 is adaptive (same tolerance), the fixed methods step from one t to the next
        # (torchdiffeq's rk4 is the 3/8 rule, ours the classical one: both fourth order)
        tol = {"bosh3": 5e-3, "rk4": 1e-2, "euler": 0.3, "midpoint": 5e-2}[method]
        assert ours.shape == theirs.shape and rel_error(theirs, ours) < tol, method
    torch.testing.assert_close(odeint(f, y0, t, method="euler"), torchdiffeq.odeint(f, y0, t, method="euler"),
                               rtol=1e-12, atol=1e-9)  # Euler on the same grid is the same arithmetic


class Coupled(torch.nn.Module):
    """A tuple state (x, v): x' = v, v' = -w^2 x - c v."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.3, dtype=DT))
        self.c = torch.nn.Parameter(torch.tensor(0.2, dtype=DT))

    def forward(self, t, state):
        x, v = state
        return v, -self.w ** 2 * x - self.c * v


def test_tuple_states_against_torchdiffeq_and_closed_form():
    f = Coupled()
    x0, v0 = torch.tensor([1.0, -0.5], dtype=DT), torch.tensor([0.0, 0.3], dtype=DT)
    t = torch.linspace(0, 3, 7, dtype=DT)
    xs, vs = odeint(f, (x0, v0), t, rtol=1e-10, atol=1e-12)
    assert xs.shape == (7, 2) and vs.shape == (7, 2)
    # closed form of the damped oscillator
    w, c = 1.3, 0.2
    mu, nu = -c / 2, math.sqrt(w ** 2 - c ** 2 / 4)
    tt = t[:, None]
    exact = torch.exp(mu * tt) * (x0 * torch.cos(nu * tt) + (v0 - mu * x0) / nu * torch.sin(nu * tt))
    torch.testing.assert_close(xs, exact, rtol=1e-8, atol=1e-9)
    with pytest.raises(NotImplementedError, match="options\\['norm'\\] with an adjoint"):
        odeint(f, (x0, v0), t, adjoint=True, options={"norm": lambda parts: parts[0].abs().max()})
    torchdiffeq = pytest.importorskip("torchdiffeq")
    theirs = torchdiffeq.odeint(f, (x0, v0), t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(vs, theirs[1], rtol=1e-8, atol=1e-9)
    # gradients of a tuple state under the adjoint, against torchdiffeq's odeint_adjoint
    grads = []
    for solve in (lambda y0: odeint(f, y0, t, adjoint=True, rtol=1e-10, atol=1e-12),
                  lambda y0: torchdiffeq.odeint_adjoint(f, y0, t, rtol=1e-10, atol=1e-12)):
        x = x0.clone().requires_grad_(True)
        xs, vs = solve((x, v0))
        grads.append(torch.autograd.grad(xs.square().sum() + vs.sum(), [x, f.w, f.c]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def gradients(fn, f, y0, t):
    y0 = y0.clone().requires_grad_(True)
    out = fn(f, y0, t)
    loss = (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)).sum()
    return torch.autograd.grad(loss, [y0, *f.parameters()])


@pytest.mark.parametrize("name", ["constant", "linear"])
def test_adjoint_gradients_match_torchdiffeq_and_backprop(name):
    f, y0, t, _ = construct(name)
    tol = dict(rtol=1e-9, atol=1e-11)
    ours = gradients(lambda *a: odeint(*a, adjoint=True, **tol), f, y0, t)
    direct = gradients(lambda *a: odeint(*a, **tol), f, y0, t)
    for a, b in zip(ours, direct):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert float(ours[1].abs().sum()) > 0
    semi = gradients(lambda *a: odeint_adjoint(*a, adjoint_options={"norm": "seminorm"}, **tol), f, y0, t)
    for a, b in zip(semi, direct):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torchdiffeq = pytest.importorskip("torchdiffeq")
    theirs = gradients(lambda *a: torchdiffeq.odeint_adjoint(*a, **tol), f, y0, t)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_adjoint_params_subset_gets_gradients_others_do_not():
    f, y0, t, _ = construct("constant")
    y = odeint(f, y0, t, adjoint=True, adjoint_params=(f.a,))
    y.sum().backward()
    assert f.a.grad is not None and float(f.a.grad.abs()) > 0 and f.b.grad is None


def test_jump_times_save_evaluations():
    """torchdiffeq's TestStepLocations: telling the solver where f jumps costs fewer evaluations."""
    counts = []
    for options in ({"jump_t": torch.tensor([0.5])}, {}):
        nfe = [0]

        def f(t, x):
            nfe[0] += 1
            return -0.5 * x if t < 0.5 else x ** 2

        odeint(f, torch.tensor([1.0, 2.0], dtype=DT), torch.tensor([0.0, 1.0], dtype=DT), options=options)
        counts.append(nfe[0])
    assert counts[0] < counts[1]


@pytest.mark.parametrize("reverse", [False, True])
def test_jump_times_use_the_branch_being_integrated(reverse):
    """x' = -x/2 before t = 1/2, x^2 after: closed form on both sides, forward and backward in time."""
    def f(t, x):
        return -0.5 * x if t < 0.5 else x ** 2

    def exact(t):
        x_half = 0.8 * math.exp(-0.25)
        return 0.8 * math.exp(-0.5 * t) if t <= 0.5 else 1.0 / (1.0 / x_half - (t - 0.5))

    times = [0.0, 0.3, 0.5, 0.7, 1.0][::-1 if reverse else 1]
    x0 = torch.tensor([exact(times[0])], dtype=DT)
    y = odeint(f, x0, torch.tensor(times, dtype=DT), options={"jump_t": [0.5]})
    torch.testing.assert_close(y[:, 0], torch.tensor([exact(t) for t in times], dtype=DT), rtol=2e-7, atol=0)


@pytest.mark.parametrize("times, jumps", [([0.0, 1.0], [0.5]), ([0.0, 0.2, 1.0], [0.3, 0.5]),
                                           ([1.0, 0.0], [0.5]), ([1.0, 0.2, 0.0], [0.5, 0.3])])
def test_jump_times_return_one_row_per_output_time(times, jumps):
    """Regression: a jump with no output time before the next one added the state at the jump as a row."""
    def f(t, x):
        return -0.5 * x if t < 0.5 else x ** 2

    def exact(t):  # from x(0) = 0.8
        x_half = 0.8 * math.exp(-0.25)
        return 0.8 * math.exp(-0.5 * t) if t <= 0.5 else 1.0 / (1.0 / x_half - (t - 0.5))

    x0 = torch.tensor([exact(times[0])], dtype=DT)
    y = odeint(f, x0, torch.tensor(times, dtype=DT), options={"jump_t": jumps}, rtol=1e-9, atol=1e-9)
    assert y.shape == (len(times), 1)
    torch.testing.assert_close(y[:, 0], torch.tensor([exact(t) for t in times], dtype=DT), rtol=1e-7, atol=0)


@pytest.mark.parametrize("reverse", [False, True])
def test_jump_times_keep_a_float32_field_off_the_jump(reverse):
    """Regression: the one-ulp nudge was taken in float64 time and lost when f received float32 ``t``, so f
    was evaluated at the jump itself, on the wrong branch, and jump_t cost more evaluations than it saved."""
    seen = []

    def f(t, x):
        seen.append((float(t), t.dtype))
        return -0.5 * x if t < 0.5 else x ** 2

    times = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0])
    x0 = torch.tensor([1.0, 2.0]) if not reverse else torch.tensor([0.4, 0.5])
    odeint(f, x0, times, rtol=1e-6, atol=1e-6, options={"jump_t": torch.tensor([0.5])})
    with_jump = len(seen)
    assert {dtype for _, dtype in seen} == {torch.float32} and 0.5 not in {t for t, _ in seen}
    seen.clear()
    odeint(f, x0, times, rtol=1e-6, atol=1e-6)
    assert with_jump < len(seen)


def test_torchdiffeq_step_callbacks_warn_that_they_are_not_called():
    """Regression: func.callback_step (torchdiffeq's per-step hooks) was silently ignored."""
    class Decay(torch.nn.Module):
        def forward(self, t, y):
            return -y

    f, calls = Decay(), []
    f.callback_step = lambda t0, y0, dt: calls.append(t0)
    f.callback_accept_step_adjoint = lambda t0, y0, dt: calls.append(t0)
    with pytest.warns(UserWarning, match=r"func.callback_step, func.callback_accept_step_adjoint are not called.*"
                                         r"DiscreteCallback"):
        y = odeint(f, torch.ones(2, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT))
    torch.testing.assert_close(y[-1], torch.full((2,), math.exp(-1.0), dtype=DT), rtol=1e-5, atol=0)
    assert not calls


def test_min_step_is_a_floor_that_accepts_its_steps():
    """torchdiffeq's TestMinMaxStep: with min_step = 2 on its linear problem over (1, 8) dopri5 finishes in
    under 50 evaluations, accepting steps at min_step whatever their error (it raised DtLessThanMin)."""
    f, y0, t, _ = construct("linear")
    nfe = [0]

    def counted(t_, y):
        nfe[0] += 1
        return f(t_, y)

    y = odeint(counted, y0, t, method="dopri5", options={"min_step": 2.0})
    assert y.shape == (len(t),) + y0.shape and bool(torch.isfinite(y).all()) and nfe[0] < 50


def test_argument_checks():
    f, y0, t, _ = construct("constant")
    with pytest.raises(ValueError, match=r"unknown method 'dopri6'; available: \['adaptive_heun', 'bosh3'"):
        odeint(f, y0, t, method="dopri6")
    with pytest.raises(ValueError, match="'dopri8' is not available in pylux.*Available"):
        odeint(f, y0, t, method="dopri8")
    with pytest.raises(ValueError, match="'implicit_adams' is not available.*explicit_adams"):
        odeint(f, y0, t, method="implicit_adams")
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        odeint(f, y0, torch.tensor([1.0, 2.0, 1.5], dtype=DT))
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        odeint(f, y0, torch.tensor([1.0, 1.0, 2.0], dtype=DT))
    with pytest.raises(ValueError, match="non-empty 1-D tensor"):
        odeint(f, y0, torch.zeros(2, 2))
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\): 'first_stp' \(did you mean 'first_step'"):
        odeint(f, y0, t, options={"first_stp": 0.1})
    with pytest.raises(TypeError, match="'step_size'"):
        odeint(f, y0, t, method="dopri5", options={"step_size": 0.1})  # a fixed-grid option on an adaptive method
    with pytest.raises(ValueError, match="interp"):
        odeint(f, y0, t, method="rk4", options={"interp": "linear"})
    with pytest.raises(TypeError, match="'rtoll'"):
        odeint(f, y0, t, rtoll=1e-3)
    with pytest.raises(ValueError, match="rtol must be a finite number > 0"):
        odeint(f, y0, t, rtol=-1.0)
    with pytest.raises(ValueError, match="per-element tolerances"):
        odeint(f, y0, t, atol=torch.full((3,), 1e-6))
    torch.testing.assert_close(odeint(f, y0, t, atol=torch.tensor(1e-9)), odeint(f, y0, t))
    with pytest.raises(NotImplementedError, match=r"pass t.detach\(\)"):
        odeint(f, y0, t.clone().requires_grad_(True))
    with pytest.raises(NotImplementedError, match="event_fn is not supported"):
        odeint(f, y0, t, event_fn=lambda t, y: y)
    with pytest.raises(NotImplementedError, match="adjoint_method='rk4' differs"):
        odeint(f, y0, t, adjoint=True, adjoint_method="rk4")
    with pytest.raises(ValueError, match="adjoint_options\\['norm'\\] may only be 'seminorm'"):
        odeint(f, y0, t, adjoint=True, adjoint_options={"norm": "max"})
    with pytest.raises(ValueError, match="adjoint_\\* arguments were given without adjoint=True"):
        odeint(f, y0, t, adjoint_rtol=1e-3)
    with pytest.raises(ValueError, match="func must be an nn.Module"):
        odeint(lambda t, y: -y, y0, t, adjoint=True)
    outside = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(ValueError, match="not parameters of func"):
        odeint(f, y0, t, adjoint=True, adjoint_params=(outside,))
    with pytest.raises(lx.HiddenParameterError):
        odeint(lambda t, y: -outside * y, y0, t, adjoint=True, adjoint_params=())
    with pytest.raises(TypeError, match="must return a tuple of 2 tensors"):
        odeint(lambda t, y: y[0], (y0, y0), t)
    with pytest.raises(TypeError, match="func must be callable"):
        odeint(3, y0, t)
    assert set(METHODS) >= {"dopri5", "bosh3", "rk4", "euler", "midpoint", "tsit5", "explicit_adams"}
