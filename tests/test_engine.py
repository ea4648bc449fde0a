"""The engine core: terms, the one loop (constant steps, tstops, step status), device-side time in its
own dtype, the reversible solver on the shared loop, a compilable step — and regression tests of the
defects found by peers' test suites and fault probes."""

import math
import warnings

import pytest
import torch

import pylux as lx
import pylux.diffeq as de
from pylux import nn
from pylux.sensitivity import (BacksolveAdjoint, DirectAdjoint, HiddenParameterError, InterpolatingAdjoint,
                               QuadratureAdjoint, ReversibleAdjoint)

F64 = torch.float64
ADJOINTS = [BacksolveAdjoint(), InterpolatingAdjoint(), InterpolatingAdjoint(checkpointing=3),
            QuadratureAdjoint(), ReversibleAdjoint()]


class SquarePath(de.AbstractControl):
    """X(t) = t^2 (one channel): a smooth control whose increment is exact."""

    def increment(self, t0, t1):
        return (t1 * t1 - t0 * t0).reshape(1).to(F64)


# --- terms ------------------------------------------------------------------------------------

def test_control_term_solves_du_equals_a_u_dX_to_the_method_order():
    # du = a u dX with X = t^2: u(t) = u0 exp(a t^2); RK4 over the control is 4th order in the step
    a = 0.7
    term = de.ControlTerm(lambda u, p, t: (p * u).unsqueeze(-1), SquarePath())
    u0 = torch.tensor([1.0, 2.0], dtype=F64)
    errors, dts = [], (0.1, 0.05, 0.025)
    for dt in dts:
        opts = de.make_options(de.RK4(), u0, 0.0, 1.0, dt=dt, adaptive=False)
        sol = de.integrate(term.bind(torch.tensor(a, dtype=F64)), u0, 0.0, 1.0, de.RK4(), opts)
        errors.append((sol.u[-1] - u0 * math.exp(a)).abs().max().item())
    slope = math.log(errors[0] / errors[-1]) / math.log(dts[0] / dts[-1])
    assert abs(slope - 4) < 0.3, (errors, slope)


def test_multiterm_sums_an_ode_term_and_a_control_term():
    # du = -u dt + u dX, X = t^2: u = exp(-t + t^2)
    term = de.MultiTerm(de.ODETerm(lambda u, p, t: -u),
                        de.ControlTerm(lambda u, p, t: u.unsqueeze(-1), SquarePath()))
    u0 = torch.ones(3, dtype=F64)
    opts = de.make_options(de.RK4(), u0, 0.0, 1.0, dt=0.01, adaptive=False)
    sol = de.integrate(term.bind(None), u0, 0.0, 1.0, de.RK4(), opts)
    torch.testing.assert_close(sol.u[-1], torch.ones(3, dtype=F64), rtol=1e-6, atol=0)
    sol = de.integrate(term.bind(None), u0, 0.0, 0.5, de.RK4(),
                       de.make_options(de.RK4(), u0, 0.0, 0.5, dt=0.01, adaptive=False))
    assert sol.u[-1, 0].item() == pytest.approx(math.exp(-0.5 + 0.25), rel=1e-8)


def test_ode_problem_builds_an_ode_term_and_solve_matches_integrate_over_it():
    prob = lx.ODEProblem(lambda u, p, t: -p * u, torch.ones(2, dtype=F64), (0.0, 1.0), torch.tensor(2.0, dtype=F64))
    assert isinstance(prob.term, de.ODETerm)
    sol = lx.solve(prob, lx.Tsit5(), reltol=1e-8, abstol=1e-8)
    ref = de.integrate(prob.term.bind(prob.p), prob.u0, 0.0, 1.0, lx.Tsit5(),
                       de.make_options(lx.Tsit5(), prob.u0, 0.0, 1.0, reltol=1e-8, abstol=1e-8))
    torch.testing.assert_close(sol.u, ref.u, rtol=0, atol=0)
    assert sol.u[-1, 0].item() == pytest.approx(math.exp(-2.0), rel=1e-7)


@pytest.mark.parametrize("g_shape, match", [((2,), "g returned shape \\(2,\\) but a state of shape \\(2,\\) needs"),
                                            ((2, 3), "g returned shape \\(2, 3\\).*increment has shape \\(1,\\)")])
def test_control_term_shapes_are_checked_on_the_first_call_naming_both(g_shape, match):
    term = de.ControlTerm(lambda u, p, t: torch.ones(g_shape, dtype=F64), SquarePath())
    u0 = torch.ones(2, dtype=F64)
    with pytest.raises(ValueError, match=match):
        de.integrate(term.bind(None), u0, 0.0, 1.0, de.RK4(),
                     de.make_options(de.RK4(), u0, 0.0, 1.0, dt=0.1, adaptive=False))


def test_control_term_needs_a_control_with_an_increment():
    with pytest.raises(TypeError, match="must have an increment\\(t0, t1\\) method"):
        de.ControlTerm(lambda u, p, t: u, object())


# --- time on the device, in its own dtype -----------------------------------------------------------

def test_float32_state_with_float64_tspan_gets_float64_time():
    seen = []

    def f(u, p, t):
        seen.append(t.dtype)
        return (t - 1e5).to(u.dtype).expand_as(u)
    prob = lx.ODEProblem(f, torch.zeros(1), (1e5, 1e5 + 1.0))
    sol = lx.solve(prob, lx.Tsit5(), reltol=1e-6, abstol=1e-6)
    assert set(seen) == {torch.float64}
    # u(end) = 1/2; float32 time (spacing 0.0078 at 1e5) would be off by about 1%
    assert sol.u[-1, 0].item() == pytest.approx(0.5, rel=1e-5)


def test_step_receives_device_tensors_and_the_host_table_knows_them():
    from pylux.diffeq._device import _HOST_TIMES, host_time, time_scalar
    t = time_scalar(0.25, F64, torch.device("cpu"))
    assert host_time(t) == 0.25 and not hasattr(t, "host_value")
    n = len(_HOST_TIMES)
    del t
    assert len(_HOST_TIMES) == n - 1  # the entry dies with its tensor
    assert host_time(torch.tensor(0.5, dtype=F64)) == 0.5  # unknown tensors are read back


def test_one_rk_step_compiles_without_graph_breaks():
    import torch._dynamo as dynamo
    W = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    term = de.ODETerm(lambda u, p, t: torch.tanh(u @ p) * t.to(u.dtype)).bind(W)
    u = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    t, dt = torch.tensor(0.0, dtype=F64), torch.tensor(0.1, dtype=F64)
    solver = lx.Tsit5()
    state = solver.init(term, t, u, dt)

    def one_step(u, t, dt):
        result = solver.step(term, t, u, dt, state)
        return result.u_new, result.error_estimate
    dynamo.reset()
    explained = dynamo.explain(one_step)(u, t, dt)
    assert explained.graph_break_count == 0, explained.break_reasons
    eager_u, eager_err = one_step(u, t, dt)
    compiled_u, compiled_err = torch.compile(one_step, backend="eager")(u, t, dt)
    torch.testing.assert_close(compiled_u, eager_u)
    torch.testing.assert_close(compiled_err, eager_err)


# --- the one loop: constant steps, tstops, step status -----------------------------------------------

def test_fixed_steps_are_the_constant_step_controller():
    prob = lx.ODEProblem(lambda u, p, t: -u, torch.ones(1, dtype=F64), (0.0, 1.0))
    a = lx.solve(prob, lx.RK4(), dt=0.3, adaptive=False)
    b = lx.solve(prob, lx.RK4(), dt=0.3, adaptive=False, controller=de.ConstantStepSize())
    assert a.t.tolist() == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0]) and a.t.tolist() == b.t.tolist()
    torch.testing.assert_close(a.u, b.u, rtol=0, atol=0)
    assert not hasattr(de.integrate, "_fixed_loop") and "_fixed_loop" not in dir(__import__("pylux.diffeq.integrate", fromlist=["x"]))


@pytest.mark.parametrize("steps", [{}, {"solver": lx.RK4(), "dt": 0.3, "adaptive": False}], ids=["adaptive", "fixed"])
def test_tstops_are_stepped_onto_exactly(steps):
    prob = lx.ODEProblem(lambda u, p, t: -u, torch.ones(1, dtype=F64), (0.0, 1.0))
    solver = steps.pop("solver", lx.Tsit5())
    sol = lx.solve(prob, solver, tstops=[0.1234, 0.5], **steps)
    times = sol.t.tolist()
    assert 0.1234 in times and 0.5 in times
    if "dt" in steps:  # the grid restarts at each stop
        assert times == pytest.approx([0.0, 0.1234, 0.4234, 0.5, 0.8, 1.0])
    with pytest.raises(ValueError, match="tstops\\[0\\] = 2.0 is outside tspan"):
        lx.solve(prob, solver, tstops=[2.0], **steps)


class StatusSolver(de.AbstractAdaptiveSolver):
    """u' = 1 stepped exactly; rejects its own step while dt > limit, or fails outright."""

    order = error_order = interpolation_order = 1

    def __init__(self, limit=None, fail=False, tensor_status=False):
        self.limit, self.fail, self.tensor_status = limit, fail, tensor_status

    def init(self, term, t0, u0, dt0, f0=None):
        return None

    def step(self, term, t, u, dt, state):
        from pylux.diffeq._device import host_time
        status = de.StepStatus.SUCCESS
        if self.fail:
            status = de.StepStatus.FAILURE
        elif self.limit is not None and abs(host_time(dt)) > self.limit:
            status = de.StepStatus.REJECT
        if self.tensor_status:
            status = torch.tensor(int(status))
        return de.StepResult(u + dt, torch.zeros_like(u), None, None, status=status,
                             reason="Newton did not converge" if status else "")


@pytest.mark.parametrize("tensor_status", [False, True])
def test_a_step_the_solver_rejects_is_shrunk_and_retried(tensor_status):
    prob = lx.ODEProblem(lambda u, p, t: torch.ones_like(u), torch.zeros(1, dtype=F64), (0.0, 1.0))
    sol = lx.solve(prob, StatusSolver(limit=0.3, tensor_status=tensor_status), dt=1.0,
                   controller=de.IController(error_order=1, qmax=1.0))
    # 1.0 -> 0.5 -> 0.25 accepted: two rejections, then steps of at most 0.25 (qmax = 1 keeps dt)
    assert sol.stats.nreject == 2 and sol.stats.naccept == 4
    assert sol.u[-1, 0].item() == pytest.approx(1.0)


def test_a_failed_step_ends_the_solve_with_its_reason():
    prob = lx.ODEProblem(lambda u, p, t: torch.ones_like(u), torch.zeros(1, dtype=F64), (0.0, 1.0))
    with pytest.raises(de.FailureError, match="failed: Newton did not converge") as err:
        lx.solve(prob, StatusSolver(fail=True), dt=0.1)
    assert isinstance(err.value, lx.core.failures.SolveFailure) and err.value.retcode == de.ReturnCode.Failure
    sol = lx.solve(prob, StatusSolver(fail=True), dt=0.1, throw=False)
    assert sol.retcode == de.ReturnCode.Failure and not sol.success and sol.stats.naccept == 0


def test_a_solver_that_keeps_rejecting_hits_dtmin():
    prob = lx.ODEProblem(lambda u, p, t: torch.ones_like(u), torch.zeros(1, dtype=F64), (0.0, 1.0))
    sol = lx.solve(prob, StatusSolver(limit=1e-9), dt=1.0, dtmin=1e-6, throw=False)
    assert sol.retcode == de.ReturnCode.DtLessThanMin and "kept rejecting" in sol.message


# --- the reversible solver on the shared loop --------------------------------------------------------

def test_reversible_solver_runs_on_the_shared_loop_with_its_statistics_and_failures():
    prob = lx.ODEProblem(lambda u, p, t: -u, torch.ones(2, dtype=F64), (0.0, 1.0))
    sol = lx.solve(prob, de.Reversible(lx.Tsit5()), reltol=1e-8, abstol=1e-8)
    assert sol.retcode == de.ReturnCode.Success and sol.stats.naccept > 3
    assert sol.u[-1, 0].item() == pytest.approx(math.exp(-1.0), rel=1e-6)
    with pytest.raises(de.MaxItersError, match="maxiters = 3 reached"):
        lx.solve(prob, de.Reversible(lx.Tsit5()), reltol=1e-8, abstol=1e-8, maxiters=3)
    stop = lx.solve(prob, de.Reversible(lx.RK4()), dt=0.1, callback=de.TerminateWhen(lambda u, t: t >= 0.45))
    assert stop.retcode == de.ReturnCode.Terminated and stop.t[-1].item() == pytest.approx(0.5)
    with pytest.raises(TypeError, match="not a one-step method"):
        de.Reversible(lx.VCAB3())


def test_reversible_adjoint_is_the_reversible_solver_plus_a_backward_pass():
    import inspect
    import pylux.sensitivity.reversible as module
    source = inspect.getsource(module)
    assert "_adaptive_pairs" not in source and "_fixed_pairs" not in source
    assert "from ..diffeq.integrate import" not in source  # no private loop imports


# --- defects (regression tests) ------------------------------------------------------------------

@pytest.mark.parametrize("alg", ADJOINTS, ids=repr)
def test_adjoints_survive_a_field_that_depends_on_neither_state_nor_parameters(alg):
    # u' = -0.1 exp(-0.1 t): u(1) = exp(-0.1), du(1)/du0 = 1
    u0 = torch.ones(2, dtype=F64, requires_grad=True)
    prob = lx.ODEProblem(lambda u, p, t: -0.1 * torch.exp(-0.1 * t) * torch.ones_like(u), u0, (0.0, 1.0))
    sol = lx.solve(prob, lx.Tsit5(), saveat=[1.0], reltol=1e-8, abstol=1e-8, sensealg=alg)
    assert sol.u[-1, 0].item() == pytest.approx(math.exp(-0.1), rel=1e-6)
    (g,) = torch.autograd.grad(sol.u.sum(), u0)
    torch.testing.assert_close(g, torch.ones(2, dtype=F64))


@pytest.mark.parametrize("alg", ADJOINTS, ids=repr)
def test_a_closure_parameter_with_plain_u0_and_p_raises_before_the_solve(alg):
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)
    prob = lx.ODEProblem(lambda u, p, t: -w * u, torch.ones(2, dtype=F64), (0.0, 1.0))
    with pytest.raises(HiddenParameterError, match="not part of the problem's parameters p"):
        lx.solve(prob, lx.Tsit5(), saveat=[1.0], sensealg=alg)
    with torch.no_grad():  # nothing is differentiated: no check, no error
        lx.solve(prob, lx.Tsit5(), saveat=[1.0], sensealg=alg)


@pytest.mark.parametrize("alg", ADJOINTS, ids=repr)
def test_dense_under_an_adjoint_is_refused_up_front(alg):
    prob = lx.ODEProblem(lambda u, p, t: -u, torch.ones(2, dtype=F64, requires_grad=True), (0.0, 1.0))
    with pytest.raises(NotImplementedError, match="dense=True is not supported.*saveat"):
        lx.solve(prob, lx.Tsit5(), dense=True, sensealg=alg)
    sol = lx.solve(prob, lx.Tsit5(), sensealg=alg)
    with pytest.raises(ValueError, match="pass dense=True"):
        sol(0.5)
    assert lx.solve(prob, lx.Tsit5(), dense=True, sensealg=DirectAdjoint())(0.5).requires_grad


@pytest.mark.parametrize("alg", [None] + ADJOINTS, ids=repr)
def test_a_saveat_that_requires_grad_is_refused(alg):
    prob = lx.ODEProblem(lambda u, p, t: -u, torch.ones(2, dtype=F64), (0.0, 1.0))
    ts = torch.tensor([0.5, 1.0], dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="saveat requires grad"):
        lx.solve(prob, lx.Tsit5(), saveat=ts, sensealg=alg)
    with pytest.raises(ValueError, match="saveat holds tensors that require grad"):
        lx.solve(prob, lx.Tsit5(), saveat=list(ts), sensealg=alg)


def test_float32_time_axis_accepts_saveat_at_t1():
    t1 = torch.tensor(0.1, dtype=torch.float32)
    prob = lx.ODEProblem(lambda u, p, t: -u, torch.ones(1), (torch.tensor(0.0, dtype=torch.float32), t1))
    sol = lx.solve(prob, lx.Tsit5(), saveat=[0.05, 0.1])
    assert sol.t.dtype == torch.float32 and sol.t[-1].item() == t1.item()


@pytest.mark.parametrize("alg", [BacksolveAdjoint(), InterpolatingAdjoint(), QuadratureAdjoint()], ids=repr)
def test_float32_state_with_a_float64_parameter_under_the_continuous_adjoints(alg):
    p = torch.tensor(0.7, dtype=F64, requires_grad=True)
    u0 = torch.ones(3, requires_grad=True)
    prob = lx.ODEProblem(lambda u, p, t: -p * u, u0, (0.0, 1.0), p)
    sol = lx.solve(prob, lx.Tsit5(), saveat=[1.0], reltol=1e-6, abstol=1e-6, sensealg=alg)
    g_u0, g_p = torch.autograd.grad(sol.u.sum(), [u0, p])
    assert g_u0.dtype == torch.float32 and g_p.dtype == F64
    # d/dp sum(exp(-p)) = -3 exp(-p)
    assert g_p.item() == pytest.approx(-3 * math.exp(-0.7), rel=1e-4)


def test_a_tiny_abstol_with_a_zero_state_component_solves():
    prob = lx.ODEProblem(lambda u, p, t: -u, torch.tensor([1.0, 0.0], dtype=F64), (0.0, 1.0))
    sol = lx.solve(prob, lx.Tsit5(), abstol=1e-160, reltol=1e-6)
    assert sol.retcode == de.ReturnCode.Success
    assert sol.u[-1, 0].item() == pytest.approx(math.exp(-1.0), rel=1e-5) and sol.u[-1, 1].item() == 0.0
    nan = lx.ODEProblem(lambda u, p, t: u * float("nan"), torch.ones(1, dtype=F64), (0.0, 1.0))
    with pytest.raises(de.UnstableError, match="f\\(u0, t0\\) is NaN or Inf"):
        lx.solve(nan, lx.Tsit5())


def test_messages_name_the_fix():
    with pytest.raises(TypeError, match="cannot be called as f\\(u, p, t\\).*torchdiffeq-style f\\(t, u\\)"):
        lx.solve(lx.ODEProblem(lambda t, u: -u, torch.ones(2), (0.0, 1.0)))
    with pytest.raises(TypeError, match="sensealg=BacksolveAdjoint is a class; pass an instance"):
        lx.solve(lx.ODEProblem(lambda u, p, t: -u, torch.ones(2), (0.0, 1.0)), sensealg=BacksolveAdjoint)
    layer = nn.Dense(2, 3)
    ps, st = lx.setup(torch.Generator().manual_seed(0), layer)
    with pytest.raises(lx.core.LayerError) as err:
        layer(torch.ones(1, 2, dtype=torch.int64), ps, st)
    assert "x.to(torch.float32)" in str(err.value) and "dtype=torch.int64" not in str(err.value)


def test_f_raising_type_error_itself_reaches_the_user_unchanged():
    def f(u, p, t):
        raise TypeError("my own bug")
    with pytest.raises(TypeError, match="^my own bug$"):
        lx.solve(lx.ODEProblem(f, torch.ones(2), (0.0, 1.0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lx.solve(lx.ODEProblem(lambda u, p, t: -u, torch.ones(2), (0.0, 1.0)))


def test_layers_refuse_a_sensealg_class_at_construction():
    model = nn.Dense(2, 2)
    with pytest.raises(TypeError, match="sensealg=BacksolveAdjoint is a class; pass an instance"):
        lx.NeuralODE(model, (0.0, 1.0), sensealg=BacksolveAdjoint)
    with pytest.raises(TypeError, match="a class: pass an instance, SteadyStateAdjoint\\(\\)"):
        lx.DEQ(model, lx.Broyden(), sensealg=lx.SteadyStateAdjoint)


def test_flatten_round_trips_a_tree_with_a_named_tuple():
    from typing import NamedTuple

    class Pair(NamedTuple):
        a: torch.Tensor
        n: int
    tree = {"x": Pair(torch.arange(2.0), 3), "y": [torch.zeros(3), None]}
    flat, unflatten = lx.flatten(tree)
    back = unflatten(flat + 1)
    assert isinstance(back["x"], Pair) and back["x"].n == 3 and back["y"][1] is None
    torch.testing.assert_close(back["x"].a, torch.tensor([1.0, 2.0]))


def test_reversible_adjoint_with_a_float32_time_axis_keeps_every_saved_gradient():
    tspan = (torch.tensor(0.1, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32))
    a = torch.tensor(0.7, dtype=F64, requires_grad=True)

    def grad(alg):
        prob = lx.ODEProblem(lambda u, p, t: -p * u, torch.ones(2, dtype=F64), tspan, a)
        sol = lx.solve(prob, lx.RK4(), dt=0.3, adaptive=False, saveat=[0.4, 0.7, 1.0], sensealg=alg)
        return torch.autograd.grad(sol.u.sum(), a)[0]
    torch.testing.assert_close(grad(ReversibleAdjoint()), grad(ReversibleAdjoint(backprop=True)), rtol=1e-9, atol=0)
    torch.testing.assert_close(grad(ReversibleAdjoint()), grad(DirectAdjoint()), rtol=1e-3, atol=0)


def test_a_control_term_step_needs_no_time_read_back(monkeypatch):
    from pylux.diffeq import _device
    misses = []

    class CountingTable(_device._HostTimeTable):
        def get(self, tensor):
            value = super().get(tensor)
            if value is None:
                misses.append(tensor)
            return value
    monkeypatch.setattr(_device, "_HOST_TIMES", CountingTable())
    term = de.MultiTerm(de.ODETerm(lambda u, p, t: -u), de.ControlTerm(lambda u, p, t: u.unsqueeze(-1), SquarePath()))
    u0 = torch.ones(3, dtype=F64)
    de.integrate(term.bind(None), u0, 0.0, 1.0, de.RK4(), de.make_options(de.RK4(), u0, 0.0, 1.0, dt=0.1,
                                                                            adaptive=False))
    assert not misses


def test_reversible_solver_has_no_dense_output_by_default_and_refuses_it():
    prob = lx.ODEProblem(lambda u, p, t: -u, torch.ones(2, dtype=F64), (0.0, 1.0))
    sol = lx.solve(prob, de.Reversible(lx.Tsit5()))
    with pytest.raises(ValueError, match="pass dense=True"):
        sol(0.5)
    with pytest.raises(ValueError, match="has no interpolant"):
        lx.solve(prob, de.Reversible(lx.Tsit5()), dense=True)


def test_a_step_shortened_by_a_stop_does_not_shrink_the_next_one():
    prob = lx.ODEProblem(lambda u, p, t: -u, torch.ones(1, dtype=F64), (0.0, 1.0))
    plain = lx.solve(prob, lx.Tsit5(), reltol=1e-6, abstol=1e-6).stats.naccept
    stopped = lx.solve(prob, lx.Tsit5(), reltol=1e-6, abstol=1e-6, tstops=[0.3, 0.3000001]).stats.naccept
    assert stopped <= plain + 3, (plain, stopped)


def test_contradicting_controller_options_are_refused():
    prob = lx.ODEProblem(lambda u, p, t: -u, torch.ones(1, dtype=F64), (0.0, 1.0))
    with pytest.raises(ValueError, match="would not be used"):
        lx.solve(prob, lx.Tsit5(), dt=0.1, adaptive=False, controller=de.PIController(beta1=0.1, beta2=0.05))
    with pytest.raises(ValueError, match="contradict"):
        lx.solve(prob, lx.Tsit5(), adaptive=True, controller=de.ConstantStepSize())
    with pytest.raises(ValueError, match="ConstantStepSize\\(\\) needs a step size"):
        lx.solve(prob, lx.Tsit5(), controller=de.ConstantStepSize())
    assert lx.solve(prob, lx.Tsit5(), dt=0.25, controller=de.ConstantStepSize()).stats.naccept == 4


def test_a_diverging_reversible_pair_ends_as_unstable_instead_of_returning_a_wrong_solution():
    """Regression (found porting torchcde's adjoint-vs-direct checks): for u' = -20 u the pair's parasitic
    mode grows by about 0.999 exp(20 h) a step, and ReversibleAdjoint returned u(1) = 2.59 (exact 2.1e-9)
    with retcode Success. The separation is tracked on the device and checked once at the end."""
    prob = lx.ODEProblem(lambda u, p, t: -20.0 * u, torch.ones(1, dtype=F64), (0.0, 1.0))
    kw = dict(reltol=1e-6, abstol=1e-6, saveat=[1.0])
    with pytest.raises(lx.UnstableError, match=r"reversible pair \(Y, Z\) separated by .* times the tolerance"
                                               r".*smaller coupling \(now 0.999"):
        lx.solve(prob, lx.Tsit5(), sensealg=lx.ReversibleAdjoint(), **kw)
    sol = lx.solve(prob, de.Reversible(lx.Tsit5()), throw=False, **kw)
    assert sol.retcode == lx.ReturnCode.Unstable
    # a contraction the pair survives (a = 1), and the coupling that damps the parasitic mode at a = 20
    ok = lx.solve(lx.ODEProblem(lambda u, p, t: -u, torch.ones(1, dtype=F64), (0.0, 1.0)),
                  de.Reversible(lx.Tsit5()), **kw)
    assert ok.u[-1, 0].item() == pytest.approx(math.exp(-1.0), rel=1e-5)
    damped = lx.solve(prob, de.Reversible(lx.Tsit5(), coupling=0.5), **kw)
    assert damped.u[-1, 0].item() == pytest.approx(math.exp(-20.0), abs=1e-6)


@pytest.mark.slow
def test_the_compiled_reversible_pair_reports_its_divergence_too():
    prob = lx.ODEProblem(lambda u, p, t: -20.0 * u, torch.ones(1, dtype=F64), (0.0, 1.0))
    with pytest.raises(lx.UnstableError, match=r"reversible pair \(Y, Z\) separated"):
        lx.solve(prob, lx.Tsit5(), sensealg=lx.ReversibleAdjoint(), reltol=1e-6, abstol=1e-6, saveat=[1.0],
                 compile=True)
