"""solve(..., compile=True): the compiled step against the eager one, the eager fallback, and bad inputs."""

import warnings

import pytest
import torch

import pylux as lx
from pylux.diffeq import MixedNorm, SemiNorm
from pylux.diffeq.compiled import CompiledSolver

F64 = torch.float64
SPIRAL = torch.tensor(lx.data.SPIRAL_ODE_MATRIX, dtype=F64)


def spiral(u, p, t):
    return (u ** 3) @ p["A"]


def spiral_problem(batch=8, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    u0 = (torch.tensor([2.0, 0.0], dtype=F64) + 0.1 * torch.randn(batch, 2, generator=g, dtype=F64))
    A = SPIRAL.clone().requires_grad_(requires_grad)
    return lx.ODEProblem(spiral, u0.requires_grad_(requires_grad), (0.0, 1.5), {"A": A})


def branching(u, p, t):
    # data-dependent Python control flow: a graph break, which fullgraph compilation refuses
    if float(u.abs().max()) > 1e6:
        return -u
    return (u ** 3) @ p["A"]


@pytest.mark.parametrize("bad", ["fast", 1, "cuda-graphs"])
def test_bad_compile_values_are_refused(bad):
    with pytest.raises(ValueError, match="compile must be"):
        lx.solve(spiral_problem(), lx.Tsit5(), compile=bad)


def test_unsupported_combinations_are_refused():
    prob = spiral_problem()
    with pytest.raises(TypeError, match="Runge"):
        lx.solve(prob, lx.VCAB3(), compile=True)
    with pytest.raises(NotImplementedError, match="ReversibleAdjoint\\(\\), not DirectAdjoint.*compile=False"):
        lx.solve(prob, lx.Tsit5(), compile=True, sensealg=lx.DirectAdjoint(checkpoints=4))
    with pytest.raises(NotImplementedError, match="backprop=True\\) differentiates the eager solve.*compile=False"):
        lx.solve(prob, lx.Tsit5(), compile=True, sensealg=lx.ReversibleAdjoint(backprop=True))


def test_field_that_cannot_compile_falls_back_with_one_warning():
    prob = lx.ODEProblem(branching, spiral_problem().u0, (0.0, 1.5), {"A": SPIRAL})
    eager = lx.solve(prob, lx.Tsit5(), reltol=1e-6, abstol=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = lx.solve(prob, lx.Tsit5(), reltol=1e-6, abstol=1e-6, compile=True)
    ours = [w for w in caught if "could not be compiled" in str(w.message)]
    assert len(ours) == 1 and "\n" not in str(ours[0].message)
    assert isinstance(sol.solver, CompiledSolver) and sol.solver.fallback_reason is not None
    assert sol.solver.compiled_steps == 0
    torch.testing.assert_close(sol.u, eager.u, rtol=0, atol=0)
    assert sol.stats.nf == eager.stats.nf


@pytest.mark.slow
def test_compiled_spiral_equals_eager_forward_and_gradient():
    """Compilation takes several seconds: slow-marked."""
    results = {}
    for compile in (False, True):
        prob = spiral_problem(requires_grad=True)
        sol = lx.solve(prob, lx.Tsit5(), reltol=1e-6, abstol=1e-6, saveat=[0.5, 1.0, 1.5], compile=compile)
        grads = torch.autograd.grad((sol.u ** 2).sum(), [prob.u0, prob.p["A"]])
        results[compile] = (sol, grads)
    (eager, g_eager), (comp, g_comp) = results[False], results[True]
    assert comp.solver.fallback_reason is None
    steps = comp.stats.naccept + comp.stats.nreject
    # Tsit5 is FSAL: f's first (checked) evaluation happens before the first step, so every step compiles
    assert comp.solver.compiled_steps == steps
    assert (comp.stats.naccept, comp.stats.nreject, comp.stats.nf) == (
        eager.stats.naccept, eager.stats.nreject, eager.stats.nf)
    torch.testing.assert_close(comp.u, eager.u, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_comp, g_eager):
        assert b.abs().max() > 1e-2
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # a second solve of the same shapes reuses the compiled graph
    again = lx.solve(spiral_problem(), lx.Tsit5(), reltol=1e-6, abstol=1e-6, saveat=[1.5], compile=True)
    assert again.solver.fallback_reason is None and again.solver.compiled_steps > 10


# --- the whole loop as one compiled graph (pylux.diffeq.captured) ----------------------------------------

def _captured_and_eager(prob, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would hide what is under test
        comp = lx.solve(prob, compile=True, **kw)
    return comp, lx.solve(prob, **{k: v for k, v in kw.items()})


def test_which_solves_run_as_one_compiled_loop():
    from pylux.diffeq.captured import capture_refusal
    from pylux.diffeq.integrate import CountingField
    from pylux.diffeq.options import make_options
    prob = spiral_problem()

    def refusal(solver=lx.Tsit5(), **kw):
        kw.setdefault("saveat", [1.5])
        options = make_options(solver, prob.u0, 0.0, 1.5, time_dtype=F64, dt=kw.pop("dt", None),
                               adaptive=kw.pop("adaptive", True), saveat=kw.pop("saveat"),
                               save_everystep=kw.pop("save_everystep", False), save_start=None, save_end=None,
                               dense=False, reltol=1e-6, abstol=1e-6, controller=kw.pop("controller", None),
                               norm=None, dtmin=None, dtmax=None, maxiters=1000, callback=(), save_stats=False,
                               throw=True, tstops=kw.pop("tstops", ()))
        return capture_refusal(CompiledSolver(solver, options), options, CountingField(prob.term.bind(prob.p),
                                                                                        prob.u0))
    assert refusal() is None and refusal(lx.DP5()) is None and refusal(lx.BS3()) is None
    assert refusal(controller=lx.IController()) is None
    assert "FSAL" in refusal(lx.RK4(), dt=0.1, adaptive=False)
    assert "controller" in refusal(adaptive=False, dt=0.1)
    assert "step-by-step" in refusal(saveat=None, save_everystep=True)
    assert "step-by-step" in refusal(tstops=(0.7,))
    assert "saveat" in refusal(saveat=[i / 100 for i in range(1, 100)])


@pytest.mark.slow
@pytest.mark.parametrize("controller", [None, lx.IController()])
def test_captured_loop_equals_the_eager_loop_step_for_step(controller):
    """Forward in float32 with a float64 time axis, backward in time, PI and I control."""
    A = SPIRAL.float()
    prob = lx.ODEProblem(lambda u, p, t: -((u ** 3) @ A) - 0.1 * t, spiral_problem().u0.float(), (1.5, 0.0))
    comp, eager = _captured_and_eager(prob, solver=lx.Tsit5(), reltol=1e-5, abstol=1e-5, saveat=[1.2, 0.4, 0.0],
                                      controller=controller)
    assert comp.solver.whole_loop_refusal is None
    assert comp.solver.compiled_steps == comp.stats.naccept + comp.stats.nreject > 10
    assert (comp.stats.naccept, comp.stats.nreject, comp.stats.nf) == (
        eager.stats.naccept, eager.stats.nreject, eager.stats.nf)
    assert comp.t.tolist() == pytest.approx(eager.t.tolist(), rel=1e-12)
    torch.testing.assert_close(comp.u, eager.u, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_captured_loop_failures_match_the_eager_loop():
    prob = spiral_problem()
    comp, eager = _captured_and_eager(prob, solver=lx.Tsit5(), reltol=1e-8, abstol=1e-8, saveat=[0.5, 1.5],
                                      maxiters=7, throw=False)
    assert comp.retcode == eager.retcode == lx.ReturnCode.MaxIters
    assert comp.stats.naccept + comp.stats.nreject == 7
    # the compiled error estimate (a cancelling sum) rounds differently: the same steps, times equal to ~1e-9
    assert comp.t.tolist() == pytest.approx(eager.t.tolist(), rel=1e-7)
    torch.testing.assert_close(comp.u, eager.u, rtol=1e-6, atol=1e-8)

    def blows_up(u, p, t):  # u' = u^2 from u = 1: the solution blows up at t = 1
        return u ** 2
    prob = lx.ODEProblem(blows_up, torch.ones(4, 1, dtype=F64), (0.0, 2.0))
    comp, eager = _captured_and_eager(prob, solver=lx.Tsit5(), reltol=1e-6, abstol=1e-6, saveat=[0.5, 2.0],
                                      dtmin=1e-6, throw=False)
    assert comp.retcode == eager.retcode == lx.ReturnCode.DtLessThanMin
    assert comp.t.tolist() == pytest.approx(eager.t.tolist(), rel=1e-6)  # 0.5 passed, 2.0 not: the stop is saved
    assert abs(comp.t[-1].item() - 1.0) < 1e-3
    with pytest.raises(lx.DtLessThanMinError, match="dtmin"):
        lx.solve(prob, lx.Tsit5(), reltol=1e-6, abstol=1e-6, saveat=[2.0], dtmin=1e-6, compile=True)


def test_backsolve_under_compile_builds_its_compiled_forward_and_a_traceable_backward_field():
    """No compilation here (fast): the capabilities that route BacksolveAdjoint through compiled solves."""
    from pylux.diffeq.compiled import compiled_solver
    from pylux.diffeq.options import make_options
    prob = spiral_problem()
    assert lx.BacksolveAdjoint.compiles_backward and lx.InterpolatingAdjoint.compiles_backward
    assert lx.ReversibleAdjoint.compiles_backward and not getattr(lx.DirectAdjoint(checkpoints=2),
                                                                  "compiles_backward", False)
    options = make_options(lx.Tsit5(), prob.u0, 0.0, 1.5, time_dtype=F64, dt=None, adaptive=True, saveat=[1.5],
                           save_everystep=False, save_start=None, save_end=None, dense=False, reltol=1e-6,
                           abstol=1e-6, controller=None, norm=None, dtmin=None, dtmax=None, maxiters=1000,
                           callback=(), save_stats=False, throw=True, tstops=())
    solver = compiled_solver(lx.Tsit5(), options, lx.BacksolveAdjoint(), True, prob.u0.device)
    assert solver.compiled and not lx.Tsit5().compiled
    # every backward pass builds its own norm: the compiled-loop cache must see them as one
    assert MixedNorm([4, 4, 3]) == MixedNorm([4, 4, 3]) != MixedNorm([4, 4, 3], [True, True, False])
    assert hash(MixedNorm([4, 4, 3])) == hash(MixedNorm([4, 4, 3]))
    mask = torch.tensor([True, True, False])
    assert SemiNorm(mask) == SemiNorm(mask.clone()) != SemiNorm(~mask)
    assert hash(SemiNorm(mask)) == hash(SemiNorm(mask.clone()))


@pytest.mark.slow
@pytest.mark.parametrize("make_sensealg", [lambda: lx.BacksolveAdjoint(seminorm=True),
                                           lambda: lx.InterpolatingAdjoint(checkpointing=2),
                                           lambda: lx.QuadratureAdjoint()],
                         ids=["backsolve-seminorm", "interpolating-checkpointed", "quadrature"])
def test_compiled_continuous_adjoints_equal_eager_and_compile_once(make_sensealg):
    """The forward and every backward solve compiled (torch.func.vjp in the field, z(t) of the interpolating
    adjoints from the forward dense output as tensors):
    the eager gradient to round-off, the same backward counts, and a second training step with new
    parameter tensors and a new problem reuses the compiled graphs."""
    from torch._dynamo.utils import counters

    def run(compile, shift=0.0):
        g = torch.Generator().manual_seed(1)
        u0 = (0.5 * torch.randn(16, 2, generator=g, dtype=F64)).requires_grad_(True)
        W = (0.5 * torch.randn(2, 2, generator=g, dtype=F64) + shift).requires_grad_(True)
        b = torch.zeros(2, dtype=F64, requires_grad=True)

        def f(u, p, t):
            return torch.tanh(u @ p["W"]) + p["b"] - 0.1 * u ** 3
        prob = lx.ODEProblem(f, u0, (0.0, 2.0), {"W": W, "b": b})
        sol = lx.solve(prob, lx.Tsit5(), saveat=[0.5, 1.0, 2.0], reltol=1e-8, abstol=1e-8, compile=compile,
                       sensealg=make_sensealg())
        grads = torch.autograd.grad((sol.u ** 2).sum() + sol.u[0].sum(), [u0, W, b])
        return sol, grads

    eager, g_eager = run(False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="solve.compile=True")
        comp, g_comp = run(True)
    assert comp.solver.fallback_reason is None and comp.solver.compiled_steps > 0
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert dict(comp.backward_stats) == dict(eager.backward_stats)
    quadrature = "nquadrature" in comp.backward_stats  # its parameter integral takes one more VJP per segment
    assert comp.backward_stats["nvjp"] - (3 if quadrature else 0) == comp.backward_stats["nf"]
    graphs = counters["stats"]["unique_graphs"]
    again, g_again = run(True, shift=0.01)
    assert counters["stats"]["unique_graphs"] == graphs
    eager_again, g_eager_again = run(False, shift=0.01)
    for a, b in zip(g_again, g_eager_again):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_captured_loop_compiles_with_the_python_wrapper_where_the_cpp_wrapper_fails(monkeypatch):
    """A whole loop that the C++ wrapper cannot lower still runs as one loop, with no warning."""
    from torch._inductor.custom_graph_pass import CustomGraphPass
    from pylux.diffeq import captured

    class Refuses(CustomGraphPass):
        def __call__(self, graph):
            raise RuntimeError("not for the C++ wrapper")

        def uuid(self):
            return "refuses"
    inductor_options = captured._inductor_options

    def options(mode, device_type, cpp_wrapper):
        out = inductor_options(mode, device_type, cpp_wrapper)
        return dict(out, post_grad_custom_post_pass=Refuses()) if cpp_wrapper else out
    monkeypatch.setattr(captured, "_inductor_options", options)
    prob = spiral_problem()
    before = len(captured._PYTHON_WRAPPED)
    kw = dict(solver=lx.Tsit5(), reltol=1e-7, abstol=1e-7, saveat=[0.5, 1.5], maxiters=12345)  # a fresh key
    comp, eager = _captured_and_eager(prob, **kw)
    assert comp.solver.whole_loop_refusal is None and len(captured._PYTHON_WRAPPED) == before + 1
    assert comp.solver.compiled_steps == comp.stats.naccept + comp.stats.nreject > 10
    assert (comp.stats.naccept, comp.stats.nreject, comp.stats.nf) == (
        eager.stats.naccept, eager.stats.nreject, eager.stats.nf)
    torch.testing.assert_close(comp.u, eager.u, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_whole_loop_forms_hairers_step_in_its_graph(monkeypatch):
    """The compiled loop computes the first step itself (no eager heuristic, no read-back for it), with the
    eager solve's steps and evaluations; a solve that falls back computes it eagerly. Compiles: slow."""
    import importlib
    integrate = importlib.import_module("pylux.diffeq.integrate")
    prob = spiral_problem()
    eager = lx.solve(prob, lx.Tsit5(), reltol=1e-6, abstol=1e-6, saveat=[0.5, 1.5])

    def refuse(*args, **kwargs):
        raise AssertionError("the eager initial-step heuristic ran")
    with monkeypatch.context() as patched:
        patched.setattr(integrate, "initial_step_size", refuse)
        sol = lx.solve(prob, lx.Tsit5(), reltol=1e-6, abstol=1e-6, saveat=[0.5, 1.5], compile=True)
    assert sol.solver.compiled_steps == sol.stats.naccept + sol.stats.nreject > 5
    assert (sol.stats.naccept, sol.stats.nreject, sol.stats.nf) == (
        eager.stats.naccept, eager.stats.nreject, eager.stats.nf)
    torch.testing.assert_close(sol.u, eager.u, rtol=1e-12, atol=1e-12)
    # a solve the whole loop refuses (every step recorded) runs step by step from the eager heuristic
    stepwise = lx.solve(prob, lx.Tsit5(), reltol=1e-6, abstol=1e-6, save_everystep=True, compile=True)
    reference = lx.solve(prob, lx.Tsit5(), reltol=1e-6, abstol=1e-6, save_everystep=True)
    assert stepwise.t[1] == reference.t[1]  # the first step: both from the eager heuristic, to the last bit
    # later steps carry the compiled stages' rounding (fused kernels), ~1e-11 here
    torch.testing.assert_close(stepwise.t, reference.t, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["nan f0", "zero error scale"])
def test_whole_loop_initial_step_failures_read_as_eagerly(failure):
    """Hairer's step in the graph reports an unusable start with the eager messages. Compiles: slow."""
    if failure == "nan f0":
        prob = lx.ODEProblem(lambda u, p, t: u * float("nan"), torch.ones(2, dtype=F64), (0.0, 1.0))
        kwargs, match = {}, "f\\(u0, t0\\) is NaN or Inf"
    else:
        # an abstol below float32's range is 0 in the state's dtype: a zero component has a zero scale
        prob = lx.ODEProblem(lambda u, p, t: -u, torch.tensor([1.0, 0.0]), (0.0, 1.0))
        kwargs, match = dict(abstol=1e-300, reltol=1e-6), "abstol \\+ reltol \\|u0\\| is zero.*raise abstol"
    for compile in (False, True):
        with pytest.raises(lx.diffeq.UnstableError, match=match):
            lx.solve(prob, lx.Tsit5(), saveat=[1.0], compile=compile, **kwargs)


def test_reversible_pair_whose_field_cannot_compile_falls_back_with_one_warning():
    prob = lx.ODEProblem(branching, spiral_problem().u0, (0.0, 1.5), {"A": SPIRAL})
    pair = lx.diffeq.Reversible(lx.Tsit5())
    eager = lx.solve(prob, pair, reltol=1e-6, abstol=1e-6, saveat=[1.5])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = lx.solve(prob, pair, reltol=1e-6, abstol=1e-6, saveat=[1.5], compile=True)
    ours = [w for w in caught if "could not be compiled" in str(w.message)]
    assert len(ours) == 1 and sol.solver.compiled_steps == 0
    torch.testing.assert_close(sol.u, eager.u, rtol=0, atol=0)
    assert (sol.stats.nf, sol.stats.naccept) == (eager.stats.nf, eager.stats.naccept)


@pytest.mark.slow
@pytest.mark.parametrize("base", [lx.Tsit5(), lx.RK4()])
def test_compiled_reversible_pair_equals_eager(base):
    """Reversible(Tsit5()) adaptive and Reversible(RK4()) at a fixed dt with compile=True: every trial step
    compiled, the eager solve's steps and counts, its solution to round-off. Compiles: slow."""
    prob = spiral_problem(batch=4)
    kwargs = dict(reltol=1e-6, abstol=1e-6) if base.error_order else dict(dt=0.05)
    pair = lx.diffeq.Reversible(base, 0.999)
    eager = lx.solve(prob, pair, saveat=[0.5, 1.5], **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        comp = lx.solve(prob, pair, saveat=[0.5, 1.5], compile=True, **kwargs)
    assert comp.solver.fallback_reason is None
    # f's first evaluation runs eagerly (checked as in an eager solve): the initial-step heuristic's, or a
    # fixed-dt solve's first step
    first_eager = 0 if base.error_order else 1
    assert comp.solver.compiled_steps == comp.stats.naccept + comp.stats.nreject - first_eager
    assert (comp.stats.naccept, comp.stats.nreject, comp.stats.nf) == \
        (eager.stats.naccept, eager.stats.nreject, eager.stats.nf)
    torch.testing.assert_close(comp.u, eager.u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(comp.t, eager.t, rtol=0, atol=0)


@pytest.mark.slow
def test_reversible_adjoint_compiled_sweep_equals_eager():
    """compile=True under ReversibleAdjoint: the forward steps and every backward step but the last one
    compiled, the gradient of the eager sweep to round-off and the same counts; a cotangent at every saved
    time. Compiles: slow."""
    g = torch.Generator().manual_seed(0)
    W = (0.5 * torch.randn(3, 3, generator=g, dtype=F64)).requires_grad_(True)
    b = (0.1 * torch.randn(3, generator=g, dtype=F64)).requires_grad_(True)
    u0 = torch.randn(4, 3, generator=g, dtype=F64).requires_grad_(True)

    def f(u, p, t):
        return torch.tanh(u @ p["W"].t() + p["b"]) * torch.cos(t)
    results = {}
    for compile in (False, True):
        prob = lx.ODEProblem(f, u0, (0.0, 2.0), {"W": W, "b": b})
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a compile failure would warn and run eagerly
            sol = lx.solve(prob, lx.Tsit5(), sensealg=lx.ReversibleAdjoint(), saveat=[0.5, 1.0, 2.0],
                           reltol=1e-6, abstol=1e-6, compile=compile)
            grads = torch.autograd.grad((sol.u ** 2).sum(), [u0, W, b])
        results[compile] = grads, dict(sol.backward_stats), sol
    (eager, eager_stats, eager_sol), (comp, comp_stats, comp_sol) = results[False], results[True]
    assert isinstance(comp_sol.solver, CompiledSolver) and comp_sol.solver.compiled_steps >= eager_stats["nsteps"] - 1
    torch.testing.assert_close(comp_sol.u, eager_sol.u, rtol=1e-12, atol=1e-12)
    for stats in (comp_stats, eager_stats):  # the pair rebuilds u0 to round-off either way
        assert stats.pop("reconstruction_error") < 1e-12
    assert comp_stats == eager_stats and eager_stats["nsteps"] > 5
    for a, c in zip(eager, comp):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-12)


def test_a_refused_whole_loop_with_an_unusable_start_fails_as_eagerly():
    """The whole loop refuses (every step recorded), so the deferred heuristic runs eagerly and fails: the
    error reads as the eager one, dt = 0.0 included (no compilation: fast)."""
    prob = lx.ODEProblem(lambda u, p, t: u * float("nan"), torch.ones(2, dtype=F64), (0.0, 1.0))
    errors = []
    for compile in (False, True):
        with pytest.raises(lx.diffeq.UnstableError, match="f\\(u0, t0\\) is NaN or Inf") as caught:
            lx.solve(prob, lx.Tsit5(), save_everystep=True, compile=compile)
        errors.append(caught.value)
    assert str(errors[0]) == str(errors[1]) and "dt = None" not in str(errors[1])
    assert getattr(errors[1], "dt", 0.0) == getattr(errors[0], "dt", 0.0) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("whole_loop", [True, False])
def test_a_tolerance_sweep_compiles_once(whole_loop):
    """The tolerances are graph inputs, not constants: three tolerances, one graph (whole loop and per step),
    and each solve takes the eager solve's steps. Compiles: slow."""
    from torch._dynamo.utils import counters
    prob = spiral_problem(batch=4)
    save = dict(saveat=[1.5]) if whole_loop else dict(save_everystep=True)
    graphs = None
    for tol in (1e-5, 1e-6, 1e-7):
        with torch.no_grad():
            comp = lx.solve(prob, lx.Tsit5(), reltol=tol, abstol=tol, compile=True, **save)
            eager = lx.solve(prob, lx.Tsit5(), reltol=tol, abstol=tol, **save)
        assert comp.solver.fallback_reason is None and comp.solver.whole_loop_refusal is None
        assert comp.solver.compiled_steps > 0 and (comp.solver.capture_refusal is None) == whole_loop
        assert (comp.stats.naccept, comp.stats.nreject) == (eager.stats.naccept, eager.stats.nreject)
        torch.testing.assert_close(comp.u[-1], eager.u[-1], rtol=1e-10, atol=1e-12)
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == graphs, tol


# --- CUDA (skipped where there is no GPU): compile=True means mode="reduce-overhead" there, CUDA graphs for the
# per-step path; the whole loop's graph runs without them (its while loop reads its predicate on the host) ----

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_spiral_problem(batch=8, requires_grad=False):
    prob = spiral_problem(batch)
    u0 = prob.u0.cuda().requires_grad_(requires_grad)
    return lx.ODEProblem(spiral, u0, (0.0, 1.5), {"A": SPIRAL.cuda().requires_grad_(requires_grad)})


@needs_cuda
def test_cuda_whole_loop_equals_eager_on_the_device():
    prob = cuda_spiral_problem()
    comp, eager = _captured_and_eager(prob, reltol=1e-8, abstol=1e-8, saveat=[0.5, 1.0, 1.5])
    assert comp.u.is_cuda and comp.solver.mode == "reduce-overhead"
    # the whole loop ran as one graph (neither refusal recorded), counting every trial step it took
    assert comp.solver.capture_refusal is None and comp.solver.whole_loop_refusal is None
    assert comp.solver.compiled_steps == comp.stats.naccept + comp.stats.nreject > 10
    assert (comp.stats.naccept, comp.stats.nreject, comp.stats.nf) == (
        eager.stats.naccept, eager.stats.nreject, eager.stats.nf)
    torch.testing.assert_close(comp.u, eager.u, rtol=1e-11, atol=1e-11)


@needs_cuda
def test_cuda_graph_steps_equal_eager_and_saved_values_survive_the_replays():
    """A tstop keeps the per-step loop (capture_refusal): every trial step is one CUDA-graph replay, whose
    outputs live in static buffers the next replay overwrites; the saveat values, interpolated from the
    stages of the steps that pass them, must be read from copies; so must the state saved where a step ends on
    a saveat time (the tstop at 0.75). (The step sequence equals the eager one up to the cancellation in the
    error estimate, ~1e-11 relative in dt: values at fixed times agree to ~1e-12.)"""
    from torch._dynamo.utils import counters
    prob = cuda_spiral_problem()
    kw = dict(reltol=1e-8, abstol=1e-8, saveat=[0.25 * i for i in range(1, 7)], tstops=(0.75,))
    eager = lx.solve(prob, lx.Tsit5(), **kw)
    skips_before = counters["inductor"]["cudagraph_skips"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        comp = lx.solve(prob, lx.Tsit5(), compile=True, **kw)
    assert counters["inductor"]["cudagraph_skips"] == skips_before, "the step ran without CUDA graphs"
    assert comp.solver.fallback_reason is None and comp.solver.mode == "reduce-overhead"
    assert "step-by-step" in comp.solver.capture_refusal
    assert comp.solver.compiled_steps == comp.stats.naccept + comp.stats.nreject > 10
    assert (comp.stats.naccept, comp.stats.nreject) == (eager.stats.naccept, eager.stats.nreject)
    torch.testing.assert_close(comp.u, eager.u, rtol=1e-10, atol=1e-10)
    assert all(not torch.equal(comp.u[i], comp.u[i + 1]) for i in range(5))  # not one buffer read six times


@needs_cuda
@pytest.mark.parametrize("make_sensealg", [lambda: None, lambda: lx.BacksolveAdjoint(seminorm=True),
                                           lambda: lx.ReversibleAdjoint()],
                         ids=["direct", "backsolve-seminorm", "reversible"])
def test_cuda_compiled_gradients_equal_eager(make_sensealg):
    results = {}
    for compile in (False, True):
        prob = cuda_spiral_problem(requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            sol = lx.solve(prob, lx.Tsit5(), reltol=1e-8, abstol=1e-8, saveat=[0.5, 1.5],
                           sensealg=make_sensealg(), compile=compile)
            grads = torch.autograd.grad((sol.u ** 2).sum(), [prob.u0, prob.p["A"]])
        results[compile] = sol, grads
    (eager, g_eager), (comp, g_comp) = results[False], results[True]
    assert isinstance(comp.solver, CompiledSolver) and comp.solver.compiled_steps > 10
    torch.testing.assert_close(comp.u, eager.u, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_comp, g_eager):
        assert a.is_cuda and b.abs().max() > 1e-2
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
