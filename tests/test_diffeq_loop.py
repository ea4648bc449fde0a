"""The integration loop with stub steppers and controllers, saving, NFE accounting, termination, stats."""

import math

import pytest
import torch

import pylux.diffeq as de
from pylux.diffeq.integrate import Saver, clamp_step, fixed_time_grid
from pylux.diffeq.interpolation import HermiteInterpolant

F64 = torch.float64


# --- stubs -------------------------------------------------------------------------------------

class LinearInterpolant(de.AbstractInterpolant):
    def __init__(self, u, u_new):
        self.u, self.u_new = u, u_new

    def evaluate(self, thetas):
        return torch.stack([self.u + th * (self.u_new - self.u) for th in thetas])


class StubSolver(de.AbstractAdaptiveSolver):
    """u' = 1 stepped exactly; the 'error estimate' is a constant the test controls via a stub controller."""

    order = 1
    error_order = 1
    interpolation_order = 1

    def init(self, f, t0, u0, dt0, f0=None):
        return ("state", 0)

    def step(self, f, t, u, dt, state):
        u_new = u + dt
        return de.StepResult(u_new, torch.zeros_like(u), LinearInterpolant(u, u_new), (state[0], state[1] + 1),
                             nfe=0, solver_state_retry=state)


class ScriptedController(de.AbstractController):
    """Accepts or rejects according to a script and multiplies dt by the scripted factor."""

    def __init__(self, script):
        self.script = list(script)
        self.seen = []

    def decide(self, state, error_norm, dt):
        self.seen.append(dt)
        accept, factor = self.script.pop(0) if self.script else (True, 1.0)
        return accept, dt * factor, state


def stub_solve(script, tspan=(0.0, 1.0), **kwargs):
    prob = de.ODEProblem(lambda u, p, t: torch.ones_like(u), torch.zeros(1, dtype=F64), tspan)
    controller = ScriptedController(script)
    sol = de.solve(prob, StubSolver(), controller=controller, **kwargs)
    return sol, controller


# --- accept / reject / maxiters with stubs --------------------------------------------------

def test_accept_reject_sequence_is_followed_exactly():
    script = [(False, 0.5), (True, 1.0), (False, 0.5), (True, 2.0), (True, 4.0)]
    sol, controller = stub_solve(script, dt=0.4)
    # trial dts: 0.4 rejected -> 0.2 accepted -> 0.2 rejected -> 0.1 accepted -> 0.2 accepted
    # -> 0.8 clamped to the remaining 0.5
    assert controller.seen == pytest.approx([0.4, 0.2, 0.2, 0.1, 0.2, 0.5])
    assert sol.t.tolist() == pytest.approx([0.0, 0.2, 0.3, 0.5, 1.0])
    assert sol.u[:, 0].tolist() == pytest.approx(sol.t.tolist())
    assert (sol.stats.naccept, sol.stats.nreject) == (4, 2)
    assert sol.t[-1].item() == 1.0  # the clamped last step ends exactly at t1


def test_maxiters_counts_rejected_steps_too():
    sol, controller = stub_solve([(False, 0.9)] * 100, dt=0.5, maxiters=7, throw=False)
    assert sol.retcode == de.ReturnCode.MaxIters
    assert (sol.stats.naccept, sol.stats.nreject) == (0, 7)
    assert sol.t.tolist() == [0.0]  # the start, which is also where it stopped (saved once)


def test_dtmax_caps_the_proposed_step():
    sol, controller = stub_solve([(True, 10.0)] * 10, dt=0.1, dtmax=0.25)
    assert max(controller.seen) == pytest.approx(0.25)
    assert sol.t.tolist() == pytest.approx([0.0, 0.1, 0.35, 0.6, 0.85, 1.0])


def test_backward_stub_solve_steps_down():
    sol, controller = stub_solve([(True, 1.0)] * 10, tspan=(1.0, 0.0), dt=0.3)
    assert controller.seen[0] == pytest.approx(-0.3)
    assert sol.t.tolist() == pytest.approx([1.0, 0.7, 0.4, 0.1, 0.0])
    assert sol.u[-1].item() == pytest.approx(-1.0)


def test_saveat_uses_the_step_interpolant_and_exact_step_ends():
    sol, _ = stub_solve([(True, 1.0)] * 10, dt=0.25, saveat=[0.1, 0.25, 0.3, 0.9])
    assert sol.t.tolist() == pytest.approx([0.1, 0.25, 0.3, 0.9])
    assert sol.u[:, 0].tolist() == pytest.approx([0.1, 0.25, 0.3, 0.9])


def test_saveat_start_and_end_flags():
    def times(**kw):
        return stub_solve([(True, 1.0)] * 10, dt=0.25, **kw)[0].t.tolist()
    assert times(saveat=[0.0, 0.5, 1.0]) == [0.0, 0.5, 1.0]
    assert times(saveat=[0.5]) == [0.5]
    assert times(saveat=[0.5], save_start=True, save_end=True) == [0.0, 0.5, 1.0]
    assert times(saveat=[0.0, 0.5, 1.0], save_start=False) == [0.5, 1.0]
    assert times(saveat=0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert times() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert times(save_start=False) == [0.25, 0.5, 0.75, 1.0]
    assert times(save_end=False) == [0.0, 0.25, 0.5, 0.75]


def test_clamp_step_and_time_rounding():
    assert clamp_step(0.0, 0.3, 1.0, F64) == (0.3, 0.3)
    assert clamp_step(0.9, 0.3, 1.0, F64) == pytest.approx((0.1, 1.0))
    assert clamp_step(0.9, 0.3, 1.0, F64)[1] == 1.0
    assert clamp_step(1.0, -0.3, 0.0, F64) == pytest.approx((-0.3, 0.7))
    assert clamp_step(1e7, 0.01, 2e7, torch.float32) == (0.0, 1e7)  # t + dt == t in float32


def test_a_step_ending_within_one_percent_of_the_stop_is_stretched_onto_it():
    assert clamp_step(0.0, 0.995, 1.0, F64) == (1.0, 1.0)
    assert clamp_step(1.0, -0.995, 0.0, F64) == (-1.0, 0.0)
    assert clamp_step(0.0, 0.98, 1.0, F64) == (0.98, 0.98)  # 2 % short: an ordinary step


def test_no_sliver_step_before_t1():
    """Regression: the step proposed from 0.679 reached 0.9989 and a 0.0011 step followed (6 more NFE)."""
    A = torch.tensor([[-0.3, 1.0], [-1.0, -0.3]], dtype=F64)
    for t1 in (0.8822, 1.1328, 1.4085, 2.01):  # each left a sliver under the old rule
        sol = de.solve(de.ODEProblem(lambda u, p, t: u @ A, torch.ones(4, 2, dtype=F64), (0.0, t1)), de.Tsit5(),
                       reltol=1e-5, abstol=1e-5, save_everystep=True)
        steps = torch.diff(sol.t)
        assert float(steps[-1]) > 0.01 * float(steps[:-1].max()), steps


def test_fixed_time_grid():
    assert len(fixed_time_grid(0.0, 1.0, 0.1, F64)) == 11  # 1 / 0.1 divides the span
    grid = fixed_time_grid(0.0, 1.0, 0.3, F64)
    assert grid == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0]) and grid[-1] == 1.0
    assert fixed_time_grid(1.0, 0.0, 0.4, F64) == pytest.approx([1.0, 0.6, 0.2, 0.0])


def test_saver_unit():
    opts = de.make_options(de.Tsit5(), torch.zeros(1), 0.0, 1.0, saveat=[0.2, 0.5, 1.0])
    saver = Saver(0.0, 1.0, opts)
    u0, u1 = torch.zeros(1), torch.ones(1)
    saver.start(u0)
    saver.on_step(0.0, 0.5, u1 * 0.5, LinearInterpolant(u0, u1 * 0.5))
    times, blocks = saver.finish(0.5, u1 * 0.5)  # stopped early at 0.5: the end is saved once
    assert times == [0.2, 0.5]
    assert torch.cat(blocks)[:, 0].tolist() == pytest.approx([0.2, 0.5])


# --- NFE accounting --------------------------------------------------------------------------

def lotka_volterra(u, p, t):
    x, y = u[..., 0], u[..., 1]
    return torch.stack([1.5 * x - x * y, -3.0 * y + x * y], -1)


LV = de.ODEProblem(lotka_volterra, torch.tensor([1.0, 1.0], dtype=F64), (0.0, 5.0))


LV10 = LV.remake(tspan=(0.0, 10.0))


@pytest.mark.parametrize("solver, stages", [(de.Tsit5(), 7), (de.DP5(), 7), (de.BS3(), 4)])
def test_nfe_formula_fsal_adaptive(solver, stages):
    s = de.solve(LV10, solver, reltol=1e-3, abstol=1e-6).stats
    assert s.nreject > 0  # the formula is checked with rejections present
    # FSAL: stages - 1 evaluations per trial step, + f(u0) + one probe of the initial-step heuristic
    assert s.nf == (stages - 1) * (s.naccept + s.nreject) + 2
    s = de.solve(LV10, solver, reltol=1e-3, abstol=1e-6, dt=1.0).stats  # given dt: no probe
    assert s.nreject > 0
    assert s.nf == (stages - 1) * (s.naccept + s.nreject) + 1


def test_nfe_formula_non_fsal_adaptive():
    # Each trial step evaluates its second stage; f(u) is evaluated once per point a step starts
    # from (a retry after a rejection reuses it). With the heuristic, f(u0) and its probe come first.
    s = de.solve(LV10, de.Heun(), reltol=1e-3, abstol=1e-6).stats
    assert s.nf == (s.naccept + s.nreject) + (s.naccept - 1) + 2
    s = de.solve(LV10, de.Heun(), reltol=1e-3, abstol=1e-6, dt=1.0).stats
    assert s.nreject > 0
    assert s.nf == (s.naccept + s.nreject) + s.naccept


@pytest.mark.parametrize("solver, per_step, extra", [
    (de.Euler(), 1, 0), (de.Midpoint(), 2, 0), (de.Heun(), 2, 0), (de.RK4(), 4, 0),
    (de.BS3(), 3, 1), (de.Tsit5(), 6, 1), (de.DP5(), 6, 1)])
def test_nfe_formula_fixed_step(solver, per_step, extra):
    s = de.solve(LV, solver, dt=0.1, adaptive=False).stats
    assert (s.naccept, s.nreject) == (50, 0)
    assert s.nf == per_step * 50 + extra


def test_nfe_vcab3_fixed_step():
    s = de.solve(LV, de.VCAB3(), dt=0.1, adaptive=False).stats
    # f(u0), two BS3 startup steps (3 each), then one evaluation per Adams step
    assert s.nf == 1 + 2 * 3 + (50 - 2)


# --- termination -------------------------------------------------------------------------------

def test_terminate_steady_state_reuses_the_fsal_stage():
    prob = de.ODEProblem(lambda u, p, t: -(u - 2.0), torch.tensor([1.0, 3.0], dtype=F64), (0.0, 100.0))
    cb = de.TerminateSteadyState(abstol=1e-5, reltol=0.0)
    sol = de.solve(prob, callback=cb, reltol=1e-8, abstol=1e-10)
    s = sol.stats
    assert sol.retcode == de.ReturnCode.Terminated and sol.success
    t_stop = sol.t[-1].item()
    # ||f(u)|| = sqrt(2) e^{-t} <= 1e-5  <=>  t >= log(sqrt(2) 1e5) = 11.86; stops at the first step past it
    assert math.log(math.sqrt(2) * 1e5) <= t_stop < math.log(math.sqrt(2) * 1e5) + 1.5
    assert torch.linalg.vector_norm(sol.u[-1] - 2.0).item() <= 1e-5
    assert torch.linalg.vector_norm(sol.u[-2] - 2.0).item() > 1e-5  # not one step later than needed
    assert s.nf == 6 * (s.naccept + s.nreject) + 2  # no extra evaluation for the check


def test_terminate_steady_state_non_fsal_pays_one_evaluation_per_trial_step():
    prob = de.ODEProblem(lambda u, p, t: -u, torch.ones(2, dtype=F64), (0.0, 50.0))
    sol = de.solve(prob, de.Heun(), callback=de.TerminateSteadyState(1e-3, 0.0), reltol=1e-4, dt=1.0)
    s = sol.stats
    assert sol.retcode == de.ReturnCode.Terminated and s.nreject > 0
    assert s.nf == (s.naccept + s.nreject) + s.naccept + (s.naccept + s.nreject)


def test_terminate_when_with_tensor_condition_and_fixed_step():
    prob = de.ODEProblem(lambda u, p, t: -u, torch.ones(1, dtype=F64), (0.0, 10.0))
    cb = de.TerminateWhen(lambda u, t: (u < 0.5).all())
    sol = de.solve(prob, de.RK4(), dt=0.1, adaptive=False, callback=cb)
    assert sol.retcode == de.ReturnCode.Terminated
    assert sol.t[-1].item() == pytest.approx(0.7)  # e^{-0.7} = 0.497 < 0.5 < e^{-0.6}
    sol = de.solve(prob, callback=[cb, de.TerminateWhen(lambda u, t: t > 100)])
    assert sol.retcode == de.ReturnCode.Terminated and sol.u[-1].item() < 0.5 < sol.u[-2].item()


# --- stats -------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", [de.Tsit5(), de.DP5(), de.BS3(), de.VCAB3()], ids=repr)
def test_stiffness_estimate_is_the_eigenvalue_for_a_linear_problem(solver):
    lam = 3.0
    prob = de.ODEProblem(lambda u, p, t: -lam * u, torch.ones(4, dtype=F64), (0.0, 1.0))
    sol = de.solve(prob, solver, save_stats=True)
    st = sol.stats
    assert st.stiffness.shape == (st.naccept,)
    torch.testing.assert_close(st.stiffness, torch.full_like(st.stiffness, lam), rtol=1e-9, atol=0)
    assert st.t.dtype == F64 and st.dt.shape == (st.naccept,)
    assert st.t[0].item() == 0.0 and (st.t + st.dt)[-1].item() == pytest.approx(1.0)
    assert (st.error_estimate <= 1).all()


def test_error_estimate_is_the_scaled_norm_and_differentiable():
    a = torch.tensor(0.7, dtype=F64, requires_grad=True)

    def f(u, p, t):
        return -p * u * u

    def regularizer(p):
        prob = de.ODEProblem(f, torch.tensor([1.0, 2.0], dtype=F64), (0.0, 1.0), p)
        sol = de.solve(prob, de.Tsit5(), dt=0.1, adaptive=False, save_stats=True, reltol=1e-4, abstol=1e-6)
        return (sol.stats.error_estimate * sol.stats.dt.abs()).sum(), sol

    value, sol = regularizer(a)
    # recompute E_1 by hand from one step
    u0 = torch.tensor([1.0, 2.0], dtype=F64)
    res = de.Tsit5().step(lambda u, t: f(u, a.detach(), t), 0.0, u0, 0.1,
                          de.Tsit5().init(lambda u, t: f(u, a.detach(), t), 0.0, u0, 0.1))
    by_hand = de.scaled_error_norm(res.error_estimate, u0, res.u_new, 1e-6, 1e-4, de.rms_norm)
    assert sol.stats.error_estimate[0].item() == pytest.approx(by_hand.item(), rel=1e-12)
    (grad,) = torch.autograd.grad(value, a)
    # E is a small difference of stage combinations, so a central difference needs a moderate eps
    eps = 3e-4
    fd = (regularizer(a.detach() + eps)[0] - regularizer(a.detach() - eps)[0]) / (2 * eps)
    assert grad.item() == pytest.approx(fd.item(), rel=1e-5)
    assert grad.item() != 0.0


def test_stats_without_save_stats_are_counters_only():
    s = de.solve(LV).stats
    assert s.t is None and s.error_estimate is None and s.stiffness is None
    assert s.nsteps == s.naccept + s.nreject and "nf=" in repr(s)


# --- special states and modes ------------------------------------------------------------------

def test_equal_tspan_ends_returns_u0_with_finite_gradient():
    u0 = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    sol = de.solve(de.ODEProblem(lambda u, p, t: u ** 2, u0, (0.5, 0.5)))
    assert sol.retcode == de.ReturnCode.Success
    assert (sol.stats.nf, sol.stats.naccept) == (0, 0)
    assert sol.t.tolist() == [0.5]
    torch.testing.assert_close(sol.u[0], u0.detach())
    (g,) = torch.autograd.grad(sol.u.sum(), u0)
    assert torch.equal(g, torch.ones_like(g))
    assert sol(0.5).tolist() == [1.0, -2.0]


def test_zero_size_state():
    for shape in [(0,), (4, 0)]:
        sol = de.solve(de.ODEProblem(lambda u, p, t: -u, torch.zeros(shape), (0.0, 1.0)))
        assert sol.retcode == de.ReturnCode.Success
        assert sol.u.shape[1:] == shape and sol.t[-1].item() == 1.0
        sol = de.solve(de.ODEProblem(lambda u, p, t: -u, torch.zeros(shape), (0.0, 1.0)), de.RK4(),
                       dt=0.5, adaptive=False, saveat=[0.25])
        assert sol.u.shape == (1,) + shape


def test_solve_under_no_grad_and_with_f_that_calls_autograd():
    # Hamiltonian H = (q^2 + p^2)/2; f takes the gradient of H with autograd inside
    def f(u, p, t):
        with torch.enable_grad():
            x = u.detach().requires_grad_(True)
            (dH,) = torch.autograd.grad(0.5 * (x ** 2).sum(), x)
        return torch.stack([dH[1], -dH[0]])
    u0 = torch.tensor([1.0, 0.0], dtype=F64, requires_grad=True)
    with torch.no_grad():
        sol = de.solve(de.ODEProblem(f, u0, (0.0, math.pi / 2)), reltol=1e-10, abstol=1e-10)
    assert not sol.u.requires_grad
    torch.testing.assert_close(sol.u[-1], torch.tensor([0.0, -1.0], dtype=F64), atol=1e-8, rtol=0)


def test_direct_backprop_through_the_adaptive_loop():
    a = torch.tensor(-0.8, dtype=F64, requires_grad=True)
    u0 = torch.tensor([1.5], dtype=F64, requires_grad=True)
    sol = de.solve(de.ODEProblem(lambda u, p, t: p * u, u0, (0.0, 2.0), a), reltol=1e-10, abstol=1e-12)
    da, du0 = torch.autograd.grad(sol.u[-1].sum(), (a, u0))
    assert da.item() == pytest.approx(2.0 * 1.5 * math.exp(-1.6), rel=1e-7)
    assert du0.item() == pytest.approx(math.exp(-1.6), rel=1e-8)


def test_dense_output_is_differentiable():
    u0 = torch.tensor([2.0], dtype=F64, requires_grad=True)
    sol = de.solve(de.ODEProblem(lambda u, p, t: -u, u0, (0.0, 1.0)), reltol=1e-10, abstol=1e-12)
    value = sol(torch.tensor([0.3, 0.77], dtype=F64))
    assert value.shape == (2, 1)
    (g,) = torch.autograd.grad(value.sum(), u0)
    assert g.item() == pytest.approx(math.exp(-0.3) + math.exp(-0.77), rel=1e-8)
    assert sol(0.3).shape == (1,)


def test_image_shaped_state_and_hermite_piece():
    rates = torch.tensor([0.5, 1.0, 2.0], dtype=F64).view(1, 3, 1, 1)
    u0 = torch.rand(2, 3, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    sol = de.solve(de.ODEProblem(lambda u, p, t: -rates * u, u0, (0.0, 1.0)), de.VCAB3(),
                   reltol=1e-8, abstol=1e-10, saveat=[0.5, 1.0])
    assert sol.u.shape == (2, 2, 3, 4, 5)
    torch.testing.assert_close(sol.u[-1], u0 * torch.exp(-rates), rtol=1e-6, atol=0)
    piece = HermiteInterpolant(torch.zeros(1), torch.ones(1), torch.ones(1), torch.ones(1), 1.0)
    assert piece.evaluate([0.25, 0.5])[:, 0].tolist() == pytest.approx([0.25, 0.5])  # exact on lines


def test_seminorm_ignores_masked_channels_but_not_their_nans():
    mask = torch.tensor([True, False])
    norm = de.SemiNorm(mask)
    assert norm(torch.tensor([3.0, 100.0])).item() == pytest.approx(3.0)
    assert math.isnan(norm(torch.tensor([3.0, math.inf])).item())
    assert de.SemiNorm(torch.tensor([True, False]))(torch.ones(5, 2)).item() == pytest.approx(1.0)
    # a fast channel that is not measured does not force small steps
    prob = de.ODEProblem(lambda u, p, t: torch.stack([-u[0], torch.cos(50 * t) * 50]),
                         torch.tensor([1.0, 0.0], dtype=F64), (0.0, 1.0))
    full = de.solve(prob, reltol=1e-6, abstol=1e-8)
    semi = de.solve(prob, reltol=1e-6, abstol=1e-8, norm=norm)
    assert semi.stats.naccept < full.stats.naccept / 3


def test_mixed_norm_is_the_largest_group_rms():
    x = torch.tensor([3.0, 4.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    norm = de.MixedNorm([2, 8])
    # one RMS over all ten entries would be 1.58: the eight small ones dilute the first group's 3.54
    assert norm(x).item() == pytest.approx(math.sqrt(12.5))
    assert de.MixedNorm([2, 8], [False, True])(x).item() == pytest.approx(0.1)
    assert math.isnan(de.MixedNorm([2, 8], [False, True])(torch.tensor([math.nan] + [0.0] * 9)).item())
    assert de.MixedNorm([0, 2, 8])(x).item() == pytest.approx(math.sqrt(12.5))  # empty groups are skipped
    with pytest.raises(ValueError, match="at least one measured non-empty group"):
        de.MixedNorm([2, 8], [False, False])
    with pytest.raises(ValueError, match="the state has 10 entries but the groups"):
        de.MixedNorm([2, 9])(x)


def test_solution_repr_and_len():
    sol = de.solve(LV, saveat=[1.0, 2.0])
    text = repr(sol)
    assert "Tsit5()" in text and "retcode=Success" in text and "t: 2 points" in text and "(2, 2)" in text
    assert len(sol) == 2 and "ODEProblem(f=lotka_volterra" in repr(LV)
    assert de.ReturnCode.MaxIters.message.startswith("the solver took maxiters steps")


def test_remake_and_sensealg_dispatch():
    class Recording(de.AbstractSensitivityAlgorithm):
        def solve_with(self, problem, solver, options):
            self.args = (problem, solver, options)
            return "handled"
    alg = Recording()
    prob = LV.remake(tspan=(0.0, 1.0))
    assert de.solve(prob, de.DP5(), sensealg=alg, reltol=1e-5) == "handled"
    problem, solver, options = alg.args
    assert problem is prob and solver == de.DP5() and options.reltol == 1e-5 and options.adaptive
    assert options.controller.beta2 == pytest.approx(0.04)


def test_tiny_fixed_dt_stops_at_maxiters_without_building_the_grid():
    sol = de.solve(LV, de.Euler(), dt=1e-13, adaptive=False, maxiters=10, throw=False)
    assert sol.retcode == de.ReturnCode.MaxIters and sol.stats.naccept == 10


class SyncCounter:
    """Counts the tensor-to-host conversions (the host synchronisations on an accelerator)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)


def test_one_host_synchronisation_per_step(monkeypatch):
    prob = de.ODEProblem(lotka_volterra, torch.tensor([1.0, 1.0], dtype=F64), (0.0, 10.0))
    ref = de.solve(prob, reltol=1e-3, abstol=1e-6, saveat=[5.0, 10.0], save_stats=True)
    counter = SyncCounter(monkeypatch)
    sol = de.solve(prob, reltol=1e-3, abstol=1e-6, saveat=[5.0, 10.0], save_stats=True,
                   callback=de.TerminateSteadyState(1e-12, 0.0))
    steps = sol.stats.naccept + sol.stats.nreject
    assert steps == ref.stats.naccept + ref.stats.nreject and sol.stats.nreject > 0
    # one per trial step (error norm and termination flag together) + two in the initial-step heuristic
    assert counter.count == steps + 2
    counter.count = 0
    de.solve(prob, de.RK4(), dt=0.01, adaptive=False)
    assert counter.count == 1  # fixed steps: only the final finiteness check


def test_per_component_abstol_tensor():
    # a huge abstol on the second component makes only the first control the step
    prob = de.ODEProblem(lambda u, p, t: torch.stack([-u[0], torch.cos(40 * t) * 40]),
                         torch.tensor([1.0, 0.0], dtype=F64), (0.0, 1.0))
    loose = torch.tensor([1e-8, 1e3], dtype=F64)
    fine = de.solve(prob, reltol=1e-6, abstol=1e-8)
    coarse = de.solve(prob, reltol=1e-6, abstol=loose)
    assert coarse.stats.naccept < fine.stats.naccept / 3
    assert coarse.u[-1, 0].item() == pytest.approx(math.exp(-1), rel=1e-5)


def _hairer_by_hand(f, t0, u0, t1, order, abstol, reltol, dtmax):
    """Hairer, Nørsett & Wanner, Solving ODEs I, II.4 (p. 169), in host floats with an RMS norm."""
    u = [float(x) for x in u0.reshape(-1)]
    direction = 1.0 if t1 >= t0 else -1.0

    def rms(values):
        return math.sqrt(sum(v * v for v in values) / len(values))
    f0 = [float(x) for x in f(u0, None, torch.tensor(t0, dtype=F64)).reshape(-1)]
    sc = [abstol + abs(x) * reltol for x in u]
    d0, d1 = rms([x / s for x, s in zip(u, sc)]), rms([x / s for x, s in zip(f0, sc)])
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    h0 = min(h0, abs(t1 - t0), dtmax)
    u1 = torch.tensor([x + direction * h0 * y for x, y in zip(u, f0)], dtype=u0.dtype).reshape(u0.shape)
    f1 = [float(x) for x in f(u1, None, torch.tensor(t0 + direction * h0, dtype=F64)).reshape(-1)]
    d2 = rms([(a - b) / s for a, b, s in zip(f1, f0, sc)]) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1.0 / order)
    return min(100 * h0, h1, abs(t1 - t0), dtmax)


def _still(u, p, t):
    return torch.zeros_like(u)


@pytest.mark.parametrize("case", ["forward", "backward", "dtmax", "tiny state", "constant field"])
def test_initial_step_follows_hairers_formula(case):
    u0, t0, t1, dtmax, f = torch.tensor([1.0, 1.0], dtype=F64), 0.0, 10.0, math.inf, lotka_volterra
    if case == "backward":
        t0, t1 = 10.0, 0.0
    elif case == "dtmax":
        dtmax = 1e-4
    elif case == "tiny state":
        u0 = torch.tensor([1e-9, 0.0], dtype=F64)  # d0 < 1e-5: h0 = 1e-6
    elif case == "constant field":
        f = _still  # f1 - f0 = 0: d2 = 0, and d1 = 0 as well: the max(1e-6, 1e-3 h0) branch
    h, problem = de.initial_step_size(lambda u, t: f(u, None, t), t0, u0, t1, 5, 1e-6, 1e-3,
                                      de.rms_norm, f(u0, None, torch.tensor(t0, dtype=F64)), dtmax)
    assert problem == ""
    assert h == pytest.approx(_hairer_by_hand(f, t0, u0, t1, 5, 1e-6, 1e-3, dtmax), rel=1e-12)
    # the tensor form a compiled loop runs in its graph: the same step, with no read-back
    direction = 1.0 if t1 >= t0 else -1.0
    h_graph, status = de.hairer_initial_step(lambda u, t: f(u, None, t), torch.tensor(t0, dtype=F64), u0,
                                             f(u0, None, torch.tensor(t0, dtype=F64)), abs(t1 - t0), 5, 1e-6,
                                             1e-3, de.rms_norm, dtmax, direction)
    assert int(status) == 0 and float(h_graph) == pytest.approx(h, rel=1e-14)


def test_initial_step_statuses_and_messages():
    u0 = torch.tensor([1.0, 0.0], dtype=F64)
    t0 = torch.zeros((), dtype=F64)
    calls = []

    def vf(u, t):
        calls.append(u.clone())
        return -u
    bad_f0 = torch.tensor([float("nan"), 1.0], dtype=F64)
    h, status = de.hairer_initial_step(vf, t0, u0, bad_f0, 1.0, 5, 1e-6, 1e-3, de.rms_norm, math.inf, 1.0)
    assert int(status) == 1 and math.isnan(float(h))
    assert torch.equal(calls[-1], u0)  # the second evaluation is taken at u0, never at u0 + h0 * NaN
    h, status = de.hairer_initial_step(vf, t0, u0, -u0, 1.0, 5, 0.0, 1e-3, de.rms_norm, math.inf, 1.0)
    assert int(status) == 2 and math.isnan(float(h))  # abstol 0 over a zero component: the scale is 0
    h, problem = de.initial_step_size(vf, 0.0, u0, 1.0, 5, 0.0, 1e-3, de.rms_norm, -u0, math.inf)
    assert math.isnan(h) and "abstol + reltol |u0| is zero" in problem and "raise abstol" in problem
    h, problem = de.initial_step_size(vf, 0.0, u0, 1.0, 5, 1e-6, 1e-3, de.rms_norm, bad_f0, math.inf)
    assert math.isnan(h) and problem == "f(u0, t0) is NaN or Inf"
