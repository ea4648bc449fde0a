"""Accuracy: convergence orders, interpolant orders, adaptive accuracy against scipy, step counts."""

import math

import numpy as np
import pytest
import scipy.integrate as si
import torch

import pylux.diffeq as de

F64 = torch.float64


# A nonlinear problem with a closed form: the rotation z' = (z2, -z1) seen through the change of
# variables y = (z1, z2 + z1^2), so y(t) = (cos t, cos^2 t - sin t) for z(0) = (1, 0).
def deformed_rotation(y, p, t):
    y1, y2 = y[..., 0], y[..., 1]
    return torch.stack([y2 - y1 ** 2, -y1 + 2 * y1 * (y2 - y1 ** 2)], -1)


def deformed_rotation_exact(t):
    c, s = torch.cos(t), torch.sin(t)
    return torch.stack([c, c ** 2 - s], -1)


T = 10.0
Y0 = deformed_rotation_exact(torch.tensor(0.0, dtype=F64))
CHECK_TIMES = torch.arange(1, 41, dtype=F64) * (T / 40)  # step ends for every dt below
BASE_DT = T / 40


def slope(dts, errors):
    return np.polyfit(np.log(dts), np.log(errors), 1)[0]


# dt = BASE_DT * 2^-k: each method in its asymptotic range, errors well above rounding
CONVERGENCE_CASES = [
    (de.Euler(), [4, 5, 6, 7]), (de.Midpoint(), [3, 4, 5, 6]), (de.Heun(), [3, 4, 5, 6]),
    (de.BS3(), [2, 3, 4, 5]), (de.VCAB3(), [2, 3, 4, 5]), (de.RK4(), [1, 2, 3, 4]),
    (de.Tsit5(), [2, 3, 4, 5]), (de.DP5(), [2, 3, 4, 5]),
]


@pytest.mark.parametrize("solver, ks", CONVERGENCE_CASES, ids=lambda x: repr(x) if not isinstance(x, list) else "")
def test_fixed_step_convergence_order(solver, ks):
    prob = de.ODEProblem(deformed_rotation, Y0, (0.0, T))
    dts = [BASE_DT * 2.0 ** -k for k in ks]
    errors = []
    for dt in dts:
        sol = de.solve(prob, solver, dt=dt, adaptive=False, saveat=CHECK_TIMES)
        errors.append((sol.u - deformed_rotation_exact(CHECK_TIMES)).abs().max().item())
    assert slope(dts, errors) == pytest.approx(solver.order, abs=0.25)


def test_backward_fixed_step_convergence_with_a_non_dividing_dt():
    y1 = deformed_rotation_exact(torch.tensor(3.0, dtype=F64))
    prob = de.ODEProblem(deformed_rotation, y1, (3.0, 0.0))
    dts = [0.3 * 2.0 ** -k for k in range(1, 5)]  # 3 / dt is not an integer: the last step is short
    errors = []
    for dt in dts:
        sol = de.solve(prob, de.RK4(), dt=dt, adaptive=False)
        assert sol.t[-1].item() == 0.0
        errors.append((sol.u[-1] - Y0).abs().max().item())
    assert slope(dts, errors) == pytest.approx(4, abs=0.25)


# one step from the exact state: the error of sol(t0 + h/2) is the interpolant's local error,
# O(h^(q+1)) for an interpolant of order q (<= the step's own local error order p+1)
INTERP_CASES = [
    (de.Euler(), [4, 5, 6, 7]), (de.Midpoint(), [3, 4, 5, 6]), (de.Heun(), [3, 4, 5, 6]),
    (de.BS3(), [2, 3, 4, 5]), (de.RK4(), [2, 3, 4, 5]), (de.Tsit5(), [1, 2, 3, 4]),
    (de.DP5(), [1, 2, 3, 4]),
]


@pytest.mark.parametrize("solver, ks", INTERP_CASES, ids=lambda x: repr(x) if not isinstance(x, list) else "")
def test_interpolant_local_order(solver, ks):
    t0 = 0.5
    u0 = deformed_rotation_exact(torch.tensor(t0, dtype=F64))
    hs = [BASE_DT * 2.0 ** -k for k in ks]
    errors = []
    for h in hs:
        sol = de.solve(de.ODEProblem(deformed_rotation, u0, (t0, t0 + h)), solver, dt=h, adaptive=False)
        mid = torch.tensor(t0 + h / 2, dtype=F64)
        errors.append((sol(mid) - deformed_rotation_exact(mid)).abs().max().item())
    expected = min(solver.order, solver.interpolation_order) + 1
    assert slope(hs, errors) == pytest.approx(expected, abs=0.3)


def test_vcab3_hermite_dense_output_global_order():
    prob = de.ODEProblem(deformed_rotation, Y0, (0.0, T))
    dts = [BASE_DT * 2.0 ** -k for k in (3, 4, 5, 6)]
    errors = []
    for dt in dts:
        sol = de.solve(prob, de.VCAB3(), dt=dt, adaptive=False)
        mids = torch.arange(0, T - dt / 2, dt, dtype=F64) + dt / 2
        errors.append((sol(mids) - deformed_rotation_exact(mids)).abs().max().item())
    assert slope(dts, errors) == pytest.approx(3, abs=0.25)


def test_vcab3_weights_reduce_to_constant_step_adams_bashforth():
    (w0, w1, w2), (v0, v1) = de.multistep.adams_bashforth_weights(2.0, 0.5, (2.0, 1.5, 1.0))
    assert (w0, w1, w2) == pytest.approx((23 / 12, -16 / 12, 5 / 12))
    assert (v0, v1) == pytest.approx((3 / 2, -1 / 2))
    # backward in time, same ratios
    assert de.multistep.adams_bashforth_weights(-2.0, -0.5, (-2.0, -1.5, -1.0))[0] == pytest.approx((23 / 12, -16 / 12, 5 / 12))


def test_adaptive_backward_in_time_and_dense_output():
    y1 = deformed_rotation_exact(torch.tensor(4.0, dtype=F64))
    sol = de.solve(de.ODEProblem(deformed_rotation, y1, (4.0, 0.0)), reltol=1e-9, abstol=1e-9)
    assert sol.retcode == de.ReturnCode.Success and (sol.t[1:] < sol.t[:-1]).all()
    assert (sol.u[-1] - Y0).abs().max().item() < 1e-7
    ts = torch.tensor([3.3, 1.7, 0.2], dtype=F64)
    assert (sol(ts) - deformed_rotation_exact(ts)).abs().max().item() < 1e-7


@pytest.mark.parametrize("dtype, tol, bound", [(torch.float32, 1e-5, 1e-3), (F64, 1e-8, 1e-6)])
def test_batched_states_in_float32_and_float64(dtype, tol, bound):
    phases = torch.tensor([0.0, 0.7, 2.0], dtype=F64)
    u0 = deformed_rotation_exact(phases).to(dtype)  # (B, D) = (3, 2): each row a shifted solution
    sol = de.solve(de.ODEProblem(deformed_rotation, u0, (0.0, 3.0)), reltol=tol, abstol=tol, saveat=[1.0, 3.0])
    assert sol.u.dtype == dtype and sol.u.shape == (2, 3, 2) and sol.t.dtype == F64
    exact = deformed_rotation_exact(torch.tensor([1.0, 3.0], dtype=F64)[:, None] + phases)
    assert (sol.u.double() - exact).abs().max().item() < bound


def test_float64_time_with_float32_state():
    # t near 1e6: float32 time cannot resolve steps of ~0.01 (see test_diffeq_errors), float64 time
    # can. Inside f, t arrives in the state's dtype (float32), so f should not need t to 1e-6.
    t0 = 1e6
    prob = de.ODEProblem(lambda u, p, t: -u, torch.ones(2), (t0, t0 + 1.0))
    sol = de.solve(prob, reltol=1e-6, abstol=1e-7)
    assert sol.t.dtype == F64 and sol.u.dtype == torch.float32
    assert sol.stats.naccept > 10 and sol.t[-1].item() == t0 + 1.0
    assert sol.u[-1, 0].item() == pytest.approx(math.exp(-1.0), rel=1e-5)


# --- adaptive accuracy against scipy DOP853 at rtol = atol = 1e-12 ------------------------------

def lotka_volterra(u, p, t):
    x, y = u[..., 0], u[..., 1]
    return torch.stack([1.5 * x - x * y, -3.0 * y + x * y], -1)


SPIRAL_A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)


def cubic_spiral(u, p, t):
    return (u ** 3) @ SPIRAL_A


def mnist_field_problem():
    """Kelly et al. (2020)'s MNIST dynamics: state 784, hidden 100, tanh, time concatenated (batch 2).

    Weights scaled x3 so that the field is not trivially easy."""
    g = torch.Generator().manual_seed(0)
    d, h = 784, 100
    w1 = (torch.rand(h, d + 1, generator=g, dtype=F64) * 2 - 1) / (d + 1) ** 0.5 * 3
    b1 = (torch.rand(h, generator=g, dtype=F64) * 2 - 1) / (d + 1) ** 0.5 * 3
    w2 = (torch.rand(d, h, generator=g, dtype=F64) * 2 - 1) / h ** 0.5 * 3
    b2 = (torch.rand(d, generator=g, dtype=F64) * 2 - 1) / h ** 0.5 * 3

    def field(u, p, t):
        x = torch.cat([u, torch.as_tensor(t, dtype=u.dtype).expand(u.shape[0], 1)], 1)
        return torch.tanh(x @ w1.T + b1) @ w2.T + b2

    def numpy_field(t, y):
        y = y.reshape(2, d)
        x = np.concatenate([y, np.full((2, 1), t)], 1)
        return (np.tanh(x @ w1.numpy().T + b1.numpy()) @ w2.numpy().T + b2.numpy()).reshape(-1)
    u0 = torch.rand(2, d, generator=g, dtype=F64)
    return field, numpy_field, u0, 1.0


def _reference(numpy_field, u0, t1):
    ref = si.solve_ivp(numpy_field, (0.0, t1), u0.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    return torch.from_numpy(ref.y[:, -1]).reshape(u0.shape)


def _torch_to_numpy(f, shape):
    return lambda t, y: f(torch.from_numpy(y).reshape(shape), None, torch.tensor(t, dtype=F64)).reshape(-1).numpy()


@pytest.fixture(scope="module")
def reference_problems():
    lv_u0 = torch.tensor([1.0, 1.0], dtype=F64)
    spiral_u0 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.5, -1.5]], dtype=F64)
    field, numpy_field, mnist_u0, t1 = mnist_field_problem()
    return {
        "lotka_volterra": (lotka_volterra, lv_u0, 10.0,
                           _reference(_torch_to_numpy(lotka_volterra, lv_u0.shape), lv_u0, 10.0)),
        "cubic_spiral": (cubic_spiral, spiral_u0, 10.0,
                         _reference(_torch_to_numpy(cubic_spiral, spiral_u0.shape), spiral_u0, 10.0)),
        "mnist_field": (field, mnist_u0, t1, _reference(numpy_field, mnist_u0, t1)),
    }


# third-order methods accumulate ~300x their tolerance on the long spiral: checked on the others
ACCURACY_CASES = [(solver, name) for solver in (de.Tsit5(), de.DP5(), de.BS3(), de.VCAB3())
                  for name in ("lotka_volterra", "cubic_spiral", "mnist_field")
                  if solver.order >= 5 or name != "cubic_spiral"]


@pytest.mark.parametrize("solver, name", ACCURACY_CASES, ids=lambda x: repr(x) if not isinstance(x, str) else x)
def test_adaptive_error_tracks_the_tolerance(reference_problems, name, solver):
    f, u0, t1, ref = reference_problems[name]
    tols = [1e-5, 1e-7, 1e-9] if solver.order >= 5 else [1e-5, 1e-6, 1e-7]
    errors = []
    for tol in tols:
        sol = de.solve(de.ODEProblem(f, u0, (0.0, t1)), solver, reltol=tol, abstol=tol, saveat=[t1])
        errors.append((sol.u[-1] - ref).abs().max().item())
    # the global error shrinks with the tolerance ...
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] / errors[2] > (tols[0] / tols[2]) ** 0.7
    # ... and stays within a small factor of it (global error accumulates local errors)
    for tol, err in zip(tols, errors):
        assert err < 50 * tol


# --- step counts against scipy's RK45 -----------------------------------------------------------

@pytest.mark.parametrize("rtol, atol", [(1e-6, 1e-9), (1e-8, 1e-10)])
def test_step_counts_match_scipy_rk45(rtol, atol):
    u0 = torch.tensor([1.0, 1.0], dtype=F64)
    ref = si.solve_ivp(_torch_to_numpy(lotka_volterra, u0.shape), (0.0, 10.0), u0.numpy(), method="RK45",
                       rtol=rtol, atol=atol)
    ref_accept = len(ref.t) - 1
    ref_reject = (ref.nfev - 2) // 6 - ref_accept
    prob = de.ODEProblem(lotka_volterra, u0, (0.0, 10.0))
    # DP5 with an I controller is scipy's RK45: the same tableau, RMS norm of
    # err / (atol + rtol max(|u|, |u_new|)), Hairer's initial step, safety 0.9, factors in [0.2, 10].
    # (scipy also caps growth at 1 right after a rejection, which may shift a step or two.)
    same = de.solve(prob, de.DP5(), reltol=rtol, abstol=atol, controller=de.IController()).stats
    assert abs(same.naccept - ref_accept) <= 2 and abs(same.nreject - ref_reject) <= 2
    assert same.nf == ref.nfev + 6 * ((same.naccept + same.nreject) - (ref_accept + ref_reject))
    # The default PI controllers (OrdinaryDiffEq's gains) trade a few more accepted steps for
    # fewer rejections; DP5's stays close, Tsit5's (beta1 = 0.14, beta2 = 0.08) grows dt more
    # cautiously.
    dp5 = de.solve(prob, de.DP5(), reltol=rtol, abstol=atol).stats
    tsit5 = de.solve(prob, de.Tsit5(), reltol=rtol, abstol=atol).stats
    assert abs(dp5.naccept - ref_accept) <= 0.1 * ref_accept and dp5.nreject <= ref_reject
    assert ref_accept <= tsit5.naccept <= 1.4 * ref_accept and tsit5.nreject <= ref_reject
