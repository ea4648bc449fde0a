"""Failure is loud and precise: every bad input and every solver failure, with its message."""

import math

import pytest
import torch

import pylux.diffeq as de

F64 = torch.float64


def decay(u, p, t):
    return -u


def prob64(tspan=(0.0, 1.0), u0=None, f=decay):
    return de.ODEProblem(f, torch.ones(2, dtype=F64) if u0 is None else u0, tspan)


# --- problem construction --------------------------------------------------------------------

@pytest.mark.parametrize("tspan, match", [
    ((0.0, math.nan), "tspan end is nan; both ends must be finite"),
    ((-math.inf, 1.0), "tspan start is -inf; both ends must be finite"),
    ((0.0, 1.0, 2.0), "must be a pair \\(t0, t1\\), got 3 values"),
    (torch.zeros(3), "must be a pair \\(t0, t1\\), got a tensor of shape \\(3,\\)"),
])
def test_bad_tspan_values(tspan, match):
    with pytest.raises(ValueError, match=match):
        prob64(tspan)


def test_tspan_not_a_pair_or_requiring_grad():
    with pytest.raises(TypeError, match="tspan must be a pair"):
        prob64(1.0)
    with pytest.raises(TypeError, match="tspan start end must be a real number, got str"):
        prob64(("a", 1.0))
    t1 = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(ValueError, match="gradients with respect to the integration interval"):
        prob64((0.0, t1))


def test_u0_checks():
    with pytest.raises(ValueError, match="u0 contains NaN or Inf \\(first at index \\(1,\\)\\)"):
        prob64(u0=torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="u0 contains NaN or Inf"):
        prob64(u0=torch.tensor([math.inf]))
    with pytest.raises(TypeError, match="u0 has dtype torch.int64; pass a floating-point tensor"):
        prob64(u0=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="u0 is complex .* complex states are not supported"):
        prob64(u0=torch.tensor([1 + 1j]))
    with pytest.raises(TypeError, match="u0 must be a torch.Tensor, got list"):
        prob64(u0=[1.0, 2.0])
    with pytest.raises(TypeError, match="f must be callable"):
        de.ODEProblem(3, torch.ones(1), (0, 1))


# --- solve keywords -----------------------------------------------------------------------------

def test_misspelt_keyword_is_named_with_a_suggestion():
    with pytest.raises(TypeError, match="unknown keyword argument\\(s\\): 'reltoll' \\(did you mean 'reltol'\\?\\)"):
        de.solve(prob64(), reltoll=1e-3)
    with pytest.raises(TypeError, match="'bogus'"):
        de.solve(prob64(), bogus=1, abstol=1e-3)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(reltol=0.0), ValueError, "reltol must be finite and > 0, got 0.0"),
    (dict(reltol=-1e-3), ValueError, "reltol must be finite and > 0"),
    (dict(abstol=0.0), ValueError, "abstol must be finite and > 0, got 0.0"),
    (dict(abstol=torch.tensor([1e-6, -1.0], dtype=F64)), ValueError, "every entry of abstol must be finite and > 0"),
    (dict(abstol=torch.ones(3, dtype=F64)), ValueError, "abstol of shape \\(3,\\) does not broadcast"),
    (dict(abstol=torch.ones(4, 2, dtype=F64)), ValueError, "abstol of shape \\(4, 2\\) does not broadcast to u0 of shape \\(2,\\)"),
    (dict(abstol="1e-6"), TypeError, "abstol must be a positive number or tensor, got str"),
    (dict(dt=0.0), ValueError, "dt must be finite and > 0, got 0.0"),
    (dict(dt=-0.1), ValueError, "dt must be finite and > 0, got -0.1"),
    (dict(adaptive=False), ValueError, "adaptive=False needs a step size; pass dt="),
    (dict(dtmin=1.0, dtmax=0.5), ValueError, "dtmin = 1.0 exceeds dtmax = 0.5"),
    (dict(maxiters=0), ValueError, "maxiters must be a positive int, got 0"),
    (dict(maxiters=2.5), ValueError, "maxiters must be a positive int"),
    (dict(saveat=[0.5], save_everystep=True), ValueError, "save_everystep=True and saveat are exclusive"),
    (dict(controller="PI"), TypeError, "controller must be a PIController or IController, got str"),
    (dict(norm=3), TypeError, "norm must be callable"),
    (dict(callback=print), TypeError, "callback must be a termination callback"),
    (dict(sensealg="adjoint"), TypeError, "sensealg must be a sensitivity algorithm"),
    (dict(dense="yes"), TypeError, "dense must be True or False"),
])
def test_bad_solve_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        de.solve(prob64(), **kwargs)


def test_fixed_step_solver_cannot_be_adaptive():
    with pytest.raises(ValueError, match="RK4\\(\\) has no embedded error estimate, so it steps with a fixed dt; pass dt="):
        de.solve(prob64(), de.RK4())
    with pytest.raises(ValueError, match="cannot step adaptively"):
        de.solve(prob64(), de.Euler(), adaptive=True, dt=0.1)


def test_solver_class_instead_of_instance():
    with pytest.raises(TypeError, match="a class; instantiate it: Tsit5\\(\\)"):
        de.solve(prob64(), de.Tsit5)


def test_tiny_reltol_is_clamped_with_a_warning():
    prob = de.ODEProblem(decay, torch.ones(2), (0.0, 1.0))
    with pytest.warns(RuntimeWarning, match="reltol=1e-10 is below what torch.float32 arithmetic can resolve"):
        sol = de.solve(prob, reltol=1e-10)
    assert sol.retcode == de.ReturnCode.Success


@pytest.mark.parametrize("saveat, match", [
    ([0.5, 1.5], "saveat\\[1\\] = 1.5 is outside tspan = \\(0.0, 1.0\\)"),
    ([-0.1], "saveat\\[0\\] = -0.1 is outside tspan"),
    ([0.5, 0.2], "saveat must be strictly increasing, but saveat\\[0\\] = 0.5 and saveat\\[1\\] = 0.2"),
    ([0.2, 0.2], "saveat has a duplicated time 0.2 at positions 0 and 1"),
    ([0.2, math.nan], "saveat\\[1\\] = nan is not finite"),
    (torch.zeros(2, 2, 2), "saveat must be 1-D"),
    (-0.1, "scalar saveat is the spacing between saved times and must be finite and > 0"),
])
def test_bad_saveat(saveat, match):
    with pytest.raises(ValueError, match=match):
        de.solve(prob64(), saveat=saveat)


def test_saveat_must_follow_a_backward_tspan():
    with pytest.raises(ValueError, match="strictly decreasing \\(tspan runs backward\\)"):
        de.solve(prob64((1.0, 0.0)), saveat=[0.2, 0.5])
    sol = de.solve(prob64((1.0, 0.0)), saveat=[0.5, 0.2])
    assert sol.t.tolist() == [0.5, 0.2]


# --- f's output ------------------------------------------------------------------------------

class CallCounter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, u, p, t):
        self.calls += 1
        return self.fn(u, p, t)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda u, p, t: torch.zeros(3, dtype=F64), ValueError,
     "f returned a tensor of shape \\(3,\\) but u0 has shape \\(2,\\)"),
    (lambda u, p, t: -u.float(), TypeError, "f returned dtype torch.float32 but u0 has dtype torch.float64"),
    (lambda u, p, t: torch.empty(2, dtype=F64, device="meta"), ValueError,
     "f returned a tensor on device meta but u0 is on cpu"),
    (lambda u, p, t: [1.0, 2.0], TypeError, "f must return a tensor du/dt, but returned list"),
])
@pytest.mark.parametrize("solver_kwargs", [dict(), dict(solver=de.RK4(), dt=0.1, adaptive=False)],
                         ids=["adaptive", "fixed"])
def test_f_output_mismatch_is_caught_on_the_first_call(bad, exc, match, solver_kwargs):
    f = CallCounter(bad)
    with pytest.raises(exc, match=match):
        de.solve(prob64(f=f), **solver_kwargs)
    assert f.calls == 1


def test_user_exception_in_f_reaches_the_user_unchanged():
    class Boom(Exception):
        pass
    error = Boom("from f")

    def f(u, p, t):
        if t > 0.3:
            raise error
        return -u
    with pytest.raises(Boom) as info:
        de.solve(prob64(f=f))
    assert info.value is error


# --- failures during the solve ---------------------------------------------------------------

def test_nan_from_f_rejects_and_shrinks_then_succeeds():
    lam = 50.0

    def f(u, p, t):  # NaN outside the domain u >= 0, which a too-large step leaves
        return torch.where(u >= 0, -lam * u, torch.full_like(u, math.nan))
    prob = de.ODEProblem(f, torch.ones(1, dtype=F64), (0.0, 1.0))
    sol = de.solve(prob, dt=1.0, reltol=1e-8, abstol=1e-10)
    assert sol.retcode == de.ReturnCode.Success
    assert sol.stats.nreject >= 1
    assert sol.u[-1].item() == pytest.approx(math.exp(-lam), rel=1e-5)


def test_persistent_nan_gives_unstable_with_the_time():
    def f(u, p, t):
        return -u if t < 0.5 else torch.full_like(u, math.nan)
    with pytest.raises(de.UnstableError, match="retcode Unstable at t = 0.4") as info:
        de.solve(prob64(f=f), dtmax=0.1, dt=0.1, save_everystep=True)
    err = info.value
    assert err.retcode == de.ReturnCode.Unstable
    assert 0.45 < err.t < 0.5 and err.solution.t[-1].item() == pytest.approx(err.t)
    assert torch.isfinite(err.solution.u).all()
    sol = de.solve(prob64(f=f), dtmax=0.1, dt=0.1, throw=False)
    assert sol.retcode == de.ReturnCode.Unstable and not sol.success


def test_nan_in_fixed_step_solve_is_unstable_with_the_step():
    def f(u, p, t):
        return -u if t < 0.5 else torch.full_like(u, math.nan)
    with pytest.raises(de.UnstableError, match="fixed step from t = 0.25 to 0.5 produced NaN/Inf"):
        de.solve(prob64(f=f), de.RK4(), dt=0.25, adaptive=False)


def test_finite_time_blowup_is_a_clear_error_not_a_hang():
    prob = de.ODEProblem(lambda u, p, t: u ** 2, torch.ones(1, dtype=F64), (0.0, 2.0))
    with pytest.raises(de.SolverError) as info:
        de.solve(prob)
    err = info.value
    assert err.retcode in (de.ReturnCode.DtLessThanMin, de.ReturnCode.Unstable)
    assert err.t == pytest.approx(1.0, abs=1e-3)
    assert err.naccept + err.nreject < 1000
    assert "blow up in finite time" in str(err) and f"t = {err.t!r}" in str(err)


def test_exp_blowup_float32():
    prob = de.ODEProblem(lambda u, p, t: torch.exp(u), torch.zeros(1), (0.0, 10.0))
    with pytest.raises(de.SolverError) as info:
        de.solve(prob)
    assert info.value.t == pytest.approx(1.0, abs=1e-2)


def test_dt_below_dtmin():
    prob = de.ODEProblem(lambda u, p, t: -100 * u, torch.ones(1, dtype=F64), (0.0, 1.0))
    with pytest.raises(de.DtLessThanMinError,
                       match="retcode DtLessThanMin at t = 0.0, dt = .*below dtmin = 0.1; the last scaled error estimate was"):
        de.solve(prob, dt=0.5, dtmin=0.1, reltol=1e-8)


def test_dtmin_is_a_floor_that_a_growing_step_never_hits():
    """Regression: a first step below dtmin (Hairer's guess here is 0.029) failed a benign solve after one
    accepted step with a tiny error. dtmin is a floor (OrdinaryDiffEq.jl): the first step and every proposal
    are raised to it, and only a rejected step at the floor ends the solve."""
    prob = de.ODEProblem(decay, torch.ones(1, dtype=F64), (0.0, 10.0))
    assert de.solve(prob, reltol=1e-6, abstol=1e-6, save_stats=True).stats.dt[0] < 0.05
    for batch in ("joint", "per-sample"):
        sol = de.solve(prob, reltol=1e-6, abstol=1e-6, dtmin=0.1, save_stats=batch == "joint", batch=batch)
        assert sol.retcode == de.ReturnCode.Success
        assert sol.u[-1, 0].item() == pytest.approx(math.exp(-10.0), abs=1e-6)
        if batch == "joint":
            assert sol.stats.dt[0] == 0.1 and min(sol.stats.dt[:-1].tolist()) >= 0.1
    # an explicit adaptive dt below the floor is raised to it too
    sol = de.solve(prob, dt=1e-3, reltol=1e-6, abstol=1e-6, dtmin=0.1, save_stats=True)
    assert sol.stats.dt[0] == 0.1
    # a step rejected at the floor ends the solve: u' = -100 u needs dt ~ 1e-3 at this tolerance
    stiff = de.ODEProblem(lambda u, p, t: -100 * u, torch.ones(1, dtype=F64), (0.0, 1.0))
    for batch in ("joint", "per-sample"):
        sol = de.solve(stiff, reltol=1e-8, dtmin=0.1, throw=False, batch=batch)
        assert sol.retcode == de.ReturnCode.DtLessThanMin and sol.stats.naccept == 0


def test_force_dtmin_accepts_steps_at_the_floor():
    """force_dtmin=True (OrdinaryDiffEq.jl's, torchdiffeq's min_step): steps at the floor are accepted even
    with an error above 1, so a tolerance no step of 0.5 meets gives the fixed-step solve with dt = 0.5."""
    prob = de.ODEProblem(decay, torch.ones(3, dtype=F64), (0.0, 5.0))
    forced = de.solve(prob, de.Tsit5(), reltol=1e-12, abstol=1e-12, dtmin=0.5, force_dtmin=True, save_stats=True)
    fixed = de.solve(prob, de.Tsit5(), dt=0.5, adaptive=False)
    assert forced.retcode == de.ReturnCode.Success and forced.stats.nreject == 0
    assert forced.stats.dt.tolist() == [0.5] * 10
    torch.testing.assert_close(forced.u[-1], fixed.u[-1], rtol=1e-14, atol=0)
    with pytest.raises(de.DtLessThanMinError):  # without it, the first step at the floor ends the solve
        de.solve(prob, de.Tsit5(), reltol=1e-12, abstol=1e-12, dtmin=0.5)
    with pytest.raises(TypeError, match="force_dtmin must be True or False, got 'yes'"):
        de.solve(prob, de.Tsit5(), dtmin=0.5, force_dtmin="yes")
    with pytest.raises(NotImplementedError, match="force_dtmin=True is not supported with per-sample steps"):
        de.solve(prob, de.Tsit5(), dtmin=0.5, force_dtmin=True, batch="per-sample")


def test_the_time_resolution_floor_follows_t():
    """Regression: the default dtmin was 4 ulps of max(|t0|, |t1|), so over (0, 1e12) a fast transient at
    t = 0 (steps ~1e-12, far above float64's resolution there) failed. The floor is 4 ulps of the current |t|."""
    lam = 1e12
    prob = de.ODEProblem(lambda u, p, t: -lam * (u - 1.0), torch.zeros(1, dtype=F64), (0.0, 1e12))
    for batch in ("joint", "per-sample"):
        sol = de.solve(prob, de.Rodas5P() if batch == "joint" else de.Tsit5(), reltol=1e-6, abstol=1e-8,
                       save_stats=batch == "joint", batch=batch, **({} if batch == "joint" else {"maxiters": 200}),
                       throw=False)
        if batch == "joint":
            assert sol.retcode == de.ReturnCode.Success and sol.stats.dt[0] < 1e-11
            assert sol.u[-1, 0].item() == pytest.approx(1.0, abs=1e-8)
        else:  # an explicit method is stability-limited to dt ~ 3.5 / lam: it runs out of maxiters, not dtmin
            assert sol.retcode == de.ReturnCode.MaxIters


def test_float32_time_resolution_is_an_error_not_a_hang():
    t0 = torch.tensor(1e7, dtype=torch.float32)
    prob = de.ODEProblem(decay, torch.ones(2), (t0, t0 + 100))
    assert prob.time_dtype == torch.float32
    # an adaptive dt is raised to the floor, 4 ulps of |t|, where the first step is rejected
    with pytest.raises(de.DtLessThanMinError, match="cannot shrink below 4.76.*, 4 ulps of t = 10000000.0 in "
                                                    "float32 time .*a float64 tspan resolves smaller steps"):
        de.solve(prob, dt=0.01)
    with pytest.raises(de.DtLessThanMinError, match="t \\+ dt == t in float32 time"):
        de.solve(prob, de.RK4(), dt=0.01, adaptive=False)
    # the same span in float64 time is fine
    sol = de.solve(de.ODEProblem(decay, torch.ones(2), (1e7, 1e7 + 1)), dt=0.01)
    assert sol.retcode == de.ReturnCode.Success


def test_maxiters_raises_with_the_setting_and_returns_the_partial_solution():
    with pytest.raises(de.MaxItersError, match="after 5 steps .*maxiters = 5 reached.*Increase maxiters") as info:
        de.solve(prob64((0.0, 10.0)), maxiters=5, reltol=1e-8)
    partial = info.value.solution
    assert partial.retcode == de.ReturnCode.MaxIters
    assert partial.stats.naccept + partial.stats.nreject == 5
    sol = de.solve(prob64((0.0, 10.0)), maxiters=5, reltol=1e-8, throw=False)
    assert sol.retcode == de.ReturnCode.MaxIters and sol.t[-1].item() < 10.0
    assert torch.allclose(sol.u[-1], torch.exp(-sol.t[-1]).expand(2), rtol=1e-6)
    with pytest.raises(de.MaxItersError):
        de.solve(prob64(), de.RK4(), dt=0.01, adaptive=False, maxiters=10)


# --- options objects ----------------------------------------------------------------------

@pytest.mark.parametrize("make, exc, match", [
    (lambda: de.PIController(beta1=-0.1, beta2=0.0), ValueError, "beta1 must be finite and > 0"),
    (lambda: de.PIController(beta1=0.1, beta2=0.0, qmin=2.0), ValueError, "qmin .* must be <= 1"),
    (lambda: de.PIController(beta1=0.1, beta2=0.0, qmax=0.5), ValueError, "qmax .* must be >= 1"),
    (lambda: de.PIController(beta1=0.1, beta2=0.0, gamma=1.5), ValueError, "gamma .* must be <= 1"),
    (lambda: de.PIController(beta1="a", beta2=0.0), TypeError, "beta1 must be a real number"),
    (lambda: de.IController(error_order=0), ValueError, "error_order must be a positive int"),
    (lambda: de.IController(qsteady_min=2.0, qsteady_max=1.5), ValueError, "qsteady_min .* exceeds"),
    (lambda: de.SemiNorm(torch.ones(3)), TypeError, "mask must be a boolean tensor, got torch.float32"),
    (lambda: de.TerminateWhen(3), TypeError, "condition must be callable"),
    (lambda: de.TerminateSteadyState(abstol=-1.0), ValueError, "abstol must be >= 0"),
    (lambda: de.TerminateSteadyState(abstol=0.0, reltol=0.0), ValueError, "both 0"),
])
def test_bad_option_objects(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_options_replace_rejects_unknown_fields():
    sol_opts = de.make_options(de.Tsit5(), torch.ones(2), 0.0, 1.0)
    assert sol_opts.replace(reltol=1e-6).reltol == 1e-6
    with pytest.raises(TypeError, match="'reltoll' \\(did you mean 'reltol'\\?\\)"):
        sol_opts.replace(reltoll=1e-6)


def test_dense_output_errors():
    sol = de.solve(prob64())
    with pytest.raises(ValueError, match="t = 1.5 is outside the solved interval \\[0.0, 1.0\\]"):
        sol(1.5)
    sol = de.solve(prob64(), saveat=[0.5])
    with pytest.raises(ValueError, match="pass dense=True"):
        sol(0.3)
