"""DEQ solve strategies, empty batches, float32 defaults, the failure vocabulary and NaN gradients."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import pylux as lx
from pylux import nn
from pylux.layers import ContinuousSolve, DiscreteSolve, EquilibriumResult
from pylux.nonlinear import ConvergenceWarning, NonlinearSolution, NonlinearSolveError, nlsolve
from pylux.sensitivity import JacobianFreeBackprop, SteadyStateAdjoint

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def injected_cell(d):
    return nn.Chain(nn.Parallel("+", nn.Dense(d, d), nn.NoOpLayer()), nn.WrappedFunction(torch.tanh))


def contractive_setup(layer, seed=0, dtype=F64, scale=0.6):
    ps, st = lx.setup(_gen(seed), layer, dtype=dtype)
    with torch.no_grad():
        weight = ps["model"]["layer_1"]["layer_1"]["weight"]
        weight.mul_(scale / torch.linalg.matrix_norm(weight, 2))
    for leaf in lx.core.tree_leaves(ps):
        leaf.requires_grad_(True)
    return ps, st


TIGHT = dict(abstol=1e-11, reltol=0.0)


# ------------------------------------------------------------------ strategies

def test_strategies_return_one_result_type_and_agree_with_the_bare_solver_shorthand():
    d = 4
    x = torch.randn(3, d, generator=_gen(1), dtype=F64)
    results = {}
    for strategy, shorthand in ((DiscreteSolve(lx.Broyden()), dict(solver=lx.Broyden())),
                                (ContinuousSolve(lx.Tsit5(), horizon=50.0), dict(solver=lx.Tsit5(), horizon=50.0))):
        explicit = lx.DEQ(injected_cell(d), strategy, **TIGHT)
        solver = shorthand.pop("solver")
        bare = lx.DEQ(injected_cell(d), solver, **shorthand, **TIGHT)
        assert bare.solve_strategy == strategy and bare.solver is solver
        ps, st = contractive_setup(explicit)
        z_a, st_a = explicit(x, ps, st)
        z_b, st_b = bare(x, ps, st)
        assert torch.equal(z_a, z_b)
        assert st_a["solution"].nfe == st_b["solution"].nfe and st_a["solution"].t == st_b["solution"].t
        # the strategy alone: the same fixed point, as one EquilibriumResult
        f = lambda z: explicit.model((z, x), ps["model"], st["model"])[0].detach()  # noqa: E731
        from pylux.layers.deq import _ConvergenceTest
        with torch.no_grad():
            result = strategy.solve(f, torch.zeros_like(x), _ConvergenceTest(1e-11, 0.0, explicit.maxiters, "raise",
                                                                              "test"))
        assert type(result) is EquilibriumResult and result.converged
        assert torch.equal(result.z_star, z_a.detach()) and float(result.residual.max()) <= 1e-11
        results[type(strategy).__name__] = result
    assert results["DiscreteSolve"].t is None and results["ContinuousSolve"].t > 0
    assert results["DiscreteSolve"].solver_retcode is lx.NonlinearReturnCode.Success
    assert results["ContinuousSolve"].solver_retcode is lx.ReturnCode.Terminated
    torch.testing.assert_close(results["DiscreteSolve"].z_star, results["ContinuousSolve"].z_star, rtol=0,
                               atol=1e-10)
    assert explicit.maxiters == 1000 and lx.DEQ(injected_cell(d), DiscreteSolve(lx.Broyden())).maxiters == 100


def test_strategy_options_are_checked_and_not_given_twice():
    with pytest.raises(TypeError, match="horizon belong to ContinuousSolve"):
        lx.DEQ(injected_cell(2), ContinuousSolve(lx.Tsit5()), horizon=10.0)
    with pytest.raises(TypeError, match="horizon apply to continuous DEQs"):
        lx.DEQ(injected_cell(2), lx.Broyden(), horizon=10.0)
    with pytest.raises(TypeError, match="did you mean 'reltol'"):
        ContinuousSolve(lx.Tsit5(), ode_options={"reltl": 1e-3})
    with pytest.raises(TypeError, match="chosen by the layer"):
        ContinuousSolve(lx.Tsit5(), ode_options={"maxiters": 3})
    with pytest.raises(ValueError, match="DEQ: horizon must lie in"):
        lx.DEQ(injected_cell(2), lx.Tsit5(), horizon=-1.0)
    with pytest.raises(TypeError, match="expected a pylux ODE solver"):
        ContinuousSolve(lx.Broyden())
    with pytest.raises(TypeError, match="expected a pylux.nonlinear solver"):
        DiscreteSolve(lx.Tsit5())
    with pytest.raises(TypeError, match=r"MultiScaleDEQ\(\) got unknown keyword argument\(s\): 'scale' "
                                        r"\(did you mean 'scales'\?\)"):
        lx.MultiScaleDEQ([injected_cell(2)], [[None]], None, lx.Broyden(), scales=[(2,)], scale=1)


# ------------------------------------------------------------------ the failure vocabulary

def test_throw_is_the_other_spelling_of_on_failure():
    d = 4
    x = torch.randn(3, d, generator=_gen(10), dtype=F64)
    for solver, limit in ((lx.FixedPointIteration(), 2), (lx.Tsit5(), 3)):
        ps, st = contractive_setup(lx.DEQ(injected_cell(d), solver, **TIGHT), seed=11)
        with pytest.raises(NonlinearSolveError, match="residual"):
            lx.DEQ(injected_cell(d), solver, maxiters=limit, throw=True, **TIGHT)(x, ps, st)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            z, st_new = lx.DEQ(injected_cell(d), solver, maxiters=limit, throw=False, **TIGHT)(x, ps, st)
        solution = st_new["solution"]
        assert not solution.converged and solution.retcode is lx.NonlinearReturnCode.MaxIters
        assert float(solution.residual.max()) > 1e-6
        assert lx.DEQ(injected_cell(d), solver, throw=True, on_failure="raise").on_failure == "raise"
    with pytest.raises(ValueError, match="disagree"):
        lx.DEQ(injected_cell(d), lx.Broyden(), throw=True, on_failure="warn")
    with pytest.raises(TypeError, match="throw must be True or False"):
        lx.DEQ(injected_cell(d), lx.Broyden(), throw="yes")
    assert lx.DEQ(injected_cell(d), lx.Broyden()).on_failure == "warn"
    assert lx.MultiScaleDEQ([injected_cell(2)], [[None]], None, lx.Broyden(), scales=[(2,)],
                            throw=False).on_failure == "ignore"


def nan_row_cell(d):
    """tanh(W z + b + x), except a row whose ``x[:, 0]`` is below -50: there every evaluation is NaN."""
    return nn.Chain(nn.Parallel("+", nn.Dense(d, d), nn.NoOpLayer()),
                    nn.WrappedFunction(lambda u: torch.tanh(u) + 0.0 * torch.log(u[:, :1] + 50.0)))


def _one_failing_row(layer, d, batch=4, bad=1):
    x = torch.randn(batch, d, generator=_gen(5), dtype=F64)
    x[bad, 0] = -100.0
    ps, st = contractive_setup(layer, seed=3)
    return x, ps, st


def _check_the_batch_reached_the_state(z, st_new, x, ps, st, solver, d):
    solution = st_new["solution"]
    assert solution.retcode is lx.NonlinearReturnCode.Unstable
    assert solution.solver_retcode is lx.NonlinearReturnCode.Unstable and not solution.converged
    assert solution.sample_unstable.tolist() == [False, True, False, False]
    assert solution.sample_converged.tolist() == [True, False, True, True]
    assert torch.isfinite(z).all() and solution.residual.shape == (4,)
    good = [0, 2, 3]
    assert bool((solution.residual[good] <= TIGHT["abstol"]).all())
    # the other elements are solved as without the failing one
    reference, _ = lx.DEQ(injected_cell(d), solver, **TIGHT)(x[good], ps, st)
    torch.testing.assert_close(z[good], reference, atol=1e-9, rtol=0.0)


@pytest.mark.parametrize("solver", [lx.Broyden(), lx.Anderson(), lx.FixedPointIteration()], ids=repr)
def test_a_diverging_sample_with_ignore_reaches_the_state(solver):
    # used to raise NonlinearSolveError whatever the policy, losing the rest of the batch
    d = 4
    for options in ({"on_failure": "ignore"}, {"throw": False}):
        layer = lx.DEQ(nan_row_cell(d), solver, **options, **TIGHT)
        x, ps, st = _one_failing_row(layer, d)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            z, st_new = layer(x, ps, st)
        _check_the_batch_reached_the_state(z, st_new, x, ps, st, solver, d)


def test_a_diverging_sample_with_warn_warns_with_the_count_and_returns_the_batch():
    d = 4
    for layer in (lx.DEQ(nan_row_cell(d), lx.Broyden(), on_failure="warn", **TIGHT),
                  lx.DEQ(nan_row_cell(d), lx.Broyden(), **TIGHT)):  # "warn" is the default
        x, ps, st = _one_failing_row(layer, d)
        with pytest.warns(ConvergenceWarning, match=r"^DEQ\(Broyden\): nlsolve\(Broyden\): non-finite residual .* "
                                                    r"in batch elements \[1\] \(1 of 4; .*3 of 4 batch elements "
                                                    r"converged.*sample_unstable marks the failed elements"):
            z, st_new = layer(x, ps, st)
        _check_the_batch_reached_the_state(z, st_new, x, ps, st, lx.Broyden(), d)


def test_a_diverging_sample_with_raise_raises_with_the_partial_solution():
    d = 4
    for options in ({"on_failure": "raise"}, {"throw": True}):
        layer = lx.DEQ(nan_row_cell(d), lx.Broyden(), **options, **TIGHT)
        x, ps, st = _one_failing_row(layer, d)
        with pytest.raises(NonlinearSolveError, match=r"^DEQ\(Broyden\): .*NaN/Inf.*\[1\] \(1 of 4") as info:
            layer(x, ps, st)
        error = info.value
        assert error.retcode is lx.NonlinearReturnCode.Unstable and error.iteration == 0
        # the partial result used to be dropped when the layer re-raised
        assert isinstance(error.solution, NonlinearSolution)
        assert error.solution.unstable.tolist() == [False, True, False, False]
        assert error.solution.converged.tolist() == [True, False, True, True]


def test_a_maxiters_error_keeps_the_partial_solution():
    d = 4
    layer = lx.DEQ(injected_cell(d), lx.FixedPointIteration(), maxiters=2, on_failure="raise", **TIGHT)
    ps, st = contractive_setup(layer, seed=11)
    with pytest.raises(NonlinearSolveError, match="residual") as info:
        layer(torch.randn(3, d, generator=_gen(10), dtype=F64), ps, st)
    assert info.value.retcode is lx.NonlinearReturnCode.MaxIters
    assert isinstance(info.value.solution, NonlinearSolution) and info.value.solution.iterations == 2


def test_the_state_says_which_samples_converged_for_every_strategy():
    d = 4
    x = torch.randn(3, d, generator=_gen(10), dtype=F64)
    for solver in (lx.Broyden(), lx.Tsit5()):
        layer = lx.DEQ(injected_cell(d), solver, **TIGHT)
        ps, st = contractive_setup(layer, seed=11)
        _, st_new = layer(x, ps, st)
        solution = st_new["solution"]
        assert solution.converged and solution.sample_converged.tolist() == [True] * 3
        assert solution.sample_unstable.tolist() == [False] * 3
        _, st_empty = layer(x[:0], ps, st)
        assert st_empty["solution"].sample_converged.shape == (0,)
        assert st_empty["solution"].sample_unstable.shape == (0,)


# ------------------------------------------------------------------ empty batches

@pytest.mark.parametrize("solver", [lx.Broyden(), lx.Tsit5()], ids=["discrete", "continuous"])
def test_an_empty_batch_returns_an_empty_output_and_a_converged_state(solver):
    d = 4
    for layer in (lx.DEQ(injected_cell(d), solver), lx.DEQ(injected_cell(d), solver, jacobian_regularization=2.0),
                  lx.SkipDEQ(injected_cell(d), nn.Dense(d, d), solver, jacobian_regularization=2.0)):
        ps, st = contractive_setup(layer)
        x = torch.zeros(0, d, dtype=F64)
        z, st_new = layer(x, ps, st)  # reshape(0, -1) used to raise in the continuous and regularised paths
        solution = st_new["solution"]
        assert z.shape == (0, d) and solution.residual.shape == (0,)
        assert solution.converged and solution.retcode is lx.NonlinearReturnCode.Success
        assert solution.nfe == 0 and solution.iterations == 0
        assert solution.t == (0.0 if isinstance(solver, lx.Tsit5) else None)
        loss = z.sum()
        if layer.jacobian_regularization:
            assert solution.jacobian_loss.item() == 0.0
            assert st_new["rng"] != st["rng"]
            loss = loss + solution.jacobian_loss
        if solution.skip_loss is not None:
            assert solution.skip_loss.item() == 0.0  # not NaN (the mean of nothing)
            loss = loss + solution.skip_loss
        grads = torch.autograd.grad(loss, lx.core.tree_leaves(ps["model"]), allow_unused=True)
        assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in grads)


# ------------------------------------------------------------------ float32 defaults

def test_a_float32_continuous_deq_with_default_tolerances_does_not_warn():
    d = 6
    layer = lx.DEQ(injected_cell(d), lx.Tsit5())
    ps, st = contractive_setup(layer, dtype=torch.float32)
    x = torch.randn(5, d, generator=_gen(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the ODE solve used to clamp its default reltol 1e-7 with a warning
        z, st_new = layer(x, ps, st)
        torch.autograd.grad(z.pow(2).sum(), lx.core.tree_leaves(ps["model"]))
    solution = st_new["solution"]
    assert solution.converged and z.dtype == torch.float32
    eps32 = torch.finfo(torch.float32).eps
    assert layer.solve_strategy.tolerances(1e-6, 1e-6, torch.float32) == {"reltol": 4 * eps32, "abstol": 1e-7}
    assert layer.solve_strategy.tolerances(1e-6, 1e-6, F64) == {"reltol": pytest.approx(1e-7), "abstol": 1e-7}
    tight = (solution.residual <= 1e-6 + 1e-6 * torch.linalg.vector_norm(z.detach(), dim=1)).all()
    assert bool(tight)


# ------------------------------------------------------------------ NaN gradients and backward records

def _cell_problem(batch=3, n=5, seed=0):
    gen = _gen(seed)
    W = torch.randn(n, n, generator=gen, dtype=F64)
    W = W * (0.8 / torch.linalg.matrix_norm(W, 2))
    ps = {"W": W, "b": 0.3 * torch.randn(n, generator=gen, dtype=F64), "c": torch.zeros(1, dtype=F64)}
    x = torch.randn(batch, n, generator=gen, dtype=F64)
    for t in ps.values():
        t.requires_grad_(True)
    return ps, x


def _sqrt_cell(z, x, ps):
    # d/dc sqrt(c) is infinite at c = 0: the value is finite, dz-products are finite, d/dc is 0 * inf = NaN.
    return torch.tanh(z @ ps["W"].T + x + ps["b"]) + 0.0 * torch.sqrt(ps["c"])


@pytest.mark.parametrize("alg", [SteadyStateAdjoint(tol=1e-10), JacobianFreeBackprop()], ids=repr)
def test_nan_parameter_gradient_with_a_finite_adjoint_raises(alg):
    ps, x = _cell_problem()
    detached = {k: v.detach() for k, v in ps.items()}
    z_star = nlsolve(lambda z: _sqrt_cell(z, x, detached), torch.zeros_like(x), lx.Broyden(), abstol=1e-13,
                     reltol=0.0).z
    record: dict = {}
    z = alg.attach_gradient(_sqrt_cell, z_star, x, ps, record=record)
    # the adjoint itself is finite: the gradient with respect to W alone would be fine without c
    name = type(alg).__name__
    with pytest.raises(NonlinearSolveError, match=f"{name}: the gradient of fixed point is NaN or Inf"):
        torch.autograd.grad(z.pow(2).sum(), [ps["W"], ps["c"]])
    assert record["converged"] and math.isfinite(record["residual"])  # the adjoint's counters were kept
    assert not hasattr(alg, "last_backward_stats")  # options objects stay immutable


def test_the_backward_counters_go_to_each_solve_record_only():
    d = 5
    alg = SteadyStateAdjoint(tol=1e-10)
    options_before = alg.options()
    layer = lx.DEQ(injected_cell(d), lx.Broyden(), sensealg=alg, **TIGHT)
    ps, st = contractive_setup(layer)
    z, st_new = layer(torch.randn(4, d, generator=_gen(2), dtype=F64), ps, st)
    z.pow(2).sum().backward()
    record = st_new["solution"].backward_stats
    assert record["converged"] and 0 < record["iterations"] <= 25 and record["matvecs"] >= record["iterations"]
    assert record["residual"] <= 1e-10
    assert vars(alg) == {k: v for k, v in vars(SteadyStateAdjoint(tol=1e-10)).items()}
    assert alg.options() == options_before
