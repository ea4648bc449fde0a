"""compile=True for the Rosenbrock methods: the whole adaptive loop as one compiled graph.

Fast tests check the traced pieces eagerly (the substitution on LU factors, the forward-mode Jacobians) and
the refusals; the slow ones compile (30-120 s each on 2 cores) and compare with the eager solve: the same
accepted and rejected steps, the same values, and the counts of the traced loop.
"""

import importlib.util
import pathlib
import sys
import warnings

import pytest
import torch

import pylux as lx
from pylux.diffeq.solution import DtLessThanMinError
from pylux.diffeq.jacobian import (ENTRYWISE_LU_LIMIT, JacobianConfig, JacobianEvaluator, NewtonMatrix, StiffCounters,
                                   _small_lu, _small_lu_by_entries, _small_lu_by_rows, _substitute)

LU_FORMS = [_small_lu_by_entries, _small_lu_by_rows]

DT = torch.float64


def _stiff_benchmark():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "stiff.py"
    spec = importlib.util.spec_from_file_location("bench_stiff_compiled", path)
    module = importlib.util.module_from_spec(spec)
    # registered by name: dynamo resolves a traced function's globals by importing its module
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ROBERTSON = _stiff_benchmark().robertson_problem()  # f and the analytic jac(u, p, t), scipy's as well
robertson, robertson_jac = ROBERTSON["f"], ROBERTSON["jac"]


def robertson_problem():
    return lx.ODEProblem(robertson, torch.tensor([1.0, 0.0, 0.0], dtype=DT), (0.0, 40.0))


def forced(u, p, t):
    """A non-autonomous stiff field (f_t matters): u' = -50 (u - cos t) + 0.1 u^2, per sample."""
    return -50.0 * (u - torch.cos(t)) + 0.1 * u * u


@pytest.mark.parametrize("factor", LU_FORMS)
@pytest.mark.parametrize("shape", [(5, 5), (7, 4, 4), (1, 1)])
def test_substitution_on_small_lu_factors_solves_the_system(shape, factor):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(shape, generator=g, dtype=DT)  # pivoting matters: no diagonal dominance
    rhs = torch.randn(shape[:-1], generator=g, dtype=DT)
    x = _substitute(*factor(M), rhs)
    expected = torch.linalg.solve(M, rhs.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(x, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("factor", LU_FORMS)
@pytest.mark.parametrize("shape", [(5, 5), (7, 4, 4), (1, 1), (3, 2, 16, 16), (6, 8, 8)])
def test_small_lu_pivots_as_lapack_and_factorises(shape, factor):
    g = torch.Generator().manual_seed(1)
    M = torch.randn(shape, generator=g, dtype=DT)
    lu, order = factor(M)
    n = shape[-1]
    L = torch.tril(lu, -1) + torch.eye(n, dtype=DT)
    U = torch.triu(lu)
    assert torch.allclose(M.gather(-2, order.unsqueeze(-1).expand(M.shape)), L @ U, atol=1e-12)
    lapack, pivots = torch.linalg.lu_factor(M)
    assert torch.allclose(lu, lapack, atol=1e-12) and torch.equal(order, torch.lu_unpack(lapack, pivots)[0].argmax(-2))
    rhs = torch.randn(shape[:-1], generator=g, dtype=DT)
    x = _substitute(lu, order, rhs)
    assert torch.allclose((M @ x.unsqueeze(-1)).squeeze(-1), rhs, atol=1e-10)


@pytest.mark.parametrize("factor", LU_FORMS)
def test_small_lu_takes_the_first_of_equal_pivots_as_lapack(factor):
    M = torch.tensor([[[1.0, 2.0, 0.0], [-1.0, 3.0, 1.0], [1.0, 0.0, 4.0]],
                      [[0.0, 1.0, 1.0], [2.0, 1.0, 0.0], [-2.0, 5.0, 1.0]]], dtype=DT)
    lu, order = factor(M)
    lapack, pivots = torch.linalg.lu_factor(M)
    assert torch.equal(order, torch.lu_unpack(lapack, pivots)[0].argmax(-2)) and torch.allclose(lu, lapack)


def test_small_lu_factorises_small_blocks_entry_by_entry():
    g = torch.Generator().manual_seed(2)
    for n in (ENTRYWISE_LU_LIMIT, ENTRYWISE_LU_LIMIT + 1):
        M = torch.randn(4, n, n, generator=g, dtype=DT)
        expected = (_small_lu_by_entries if n <= ENTRYWISE_LU_LIMIT else _small_lu_by_rows)(M)
        assert all(torch.equal(a, b) for a, b in zip(_small_lu(M), expected))


@pytest.mark.parametrize("factor", LU_FORMS)
def test_small_lu_of_a_singular_block_is_not_finite(factor):
    M = torch.stack([torch.eye(3, dtype=DT), torch.ones(3, 3, dtype=DT)])
    lu, _ = factor(M)
    assert torch.isfinite(lu[0]).all() and not torch.isfinite(lu[1]).all()


@pytest.mark.parametrize("structure,u", [("dense", torch.tensor([0.3, -0.7, 1.1], dtype=DT)),
                                         ("batched", torch.linspace(-1, 1, 12, dtype=DT).reshape(4, 3))])
def test_traced_jacobian_equals_the_eager_one(structure, u):
    def field_fn(x, t):
        return torch.sin(x) * torch.cos(t) + 0.5 * x.roll(1, -1) * x

    class Field:
        p = None

        def vf(self, x, t):
            return field_fn(x, t)
    field, t = Field(), torch.tensor(0.4, dtype=DT)
    evaluator = JacobianEvaluator(JacobianConfig("Rodas5P", "auto", structure, 1e-7), u, "Rodas5P")
    f_u = field.vf(u, t)
    eager = evaluator(field, u, t, f_u, StiffCounters(), need_dfdt=True)
    J, dfdt = evaluator._traced(field, u, t, f_u, need_dfdt=True)
    assert torch.allclose(J, eager.J, rtol=1e-12, atol=1e-14)
    exact_dfdt = -torch.sin(u) * torch.sin(t)
    assert torch.allclose(dfdt, exact_dfdt, rtol=1e-6, atol=1e-7)  # the batched one is a time difference
    if structure == "dense":
        assert torch.allclose(dfdt, exact_dfdt, rtol=1e-12)
    M = NewtonMatrix(eager, 0.1, StiffCounters())
    rhs = torch.ones_like(u)
    solved = M.solve(rhs)
    Mmat = torch.eye(J.shape[-1], dtype=DT) - 0.1 * J
    residual = (Mmat @ solved.unsqueeze(-1)).squeeze(-1) if structure == "batched" else Mmat @ solved
    assert torch.allclose(residual.reshape(rhs.shape), rhs, atol=1e-12)


def test_refusals_name_what_works():
    prob = robertson_problem()
    with pytest.raises(NotImplementedError, match="forward solves only.*compile=False"):
        lx.solve(prob, lx.Rosenbrock23(), compile=True, sensealg=lx.DirectAdjoint())
    with pytest.raises(TypeError, match="Rosenbrock23"):
        lx.solve(prob, lx.Kvaerno5(), compile=True)
    with pytest.raises(TypeError, match="Rosenbrock23"):
        lx.solve(prob, lx.AutoSwitch(), compile=True)


def test_matrix_free_and_gradient_solves_run_eagerly_with_one_warning():
    prob = robertson_problem()
    for solver, kwargs, reason in [
            (lx.Rosenbrock23(jac_structure="matrix_free"), {}, "matrix-free"),
            (lx.Rosenbrock23(), {"save_everystep": True}, "step-by-step"),
    ]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sol = lx.solve(prob, solver, reltol=1e-3, abstol=1e-7, compile=True, **kwargs)
        mine = [w for w in caught if "compile=True" in str(w.message)]
        assert len(mine) == 1 and reason in str(mine[0].message), [str(w.message) for w in mine]
        eager = lx.solve(prob, solver, reltol=1e-3, abstol=1e-7, **kwargs)
        assert sol.stats.naccept == eager.stats.naccept and torch.equal(sol.u[-1], eager.u[-1])
    p = torch.tensor(50.0, dtype=DT, requires_grad=True)
    prob = lx.ODEProblem(lambda u, p, t: -p * (u - torch.cos(t)), torch.ones(2, dtype=DT), (0.0, 1.0), p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = lx.solve(prob, lx.Rodas5P(), reltol=1e-6, abstol=1e-8, compile=True, save_everystep=False)
    assert any("forward only" in str(w.message) for w in caught)
    (g,) = torch.autograd.grad(sol.u[-1].sum(), p)
    assert torch.isfinite(g)


def _pair(prob, solver_factory, **kwargs):
    with torch.no_grad():
        eager = lx.solve(prob, solver_factory(), **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback allowed
            compiled = lx.solve(prob, solver_factory(), compile=True, **kwargs)
    return eager, compiled


@pytest.mark.slow
@pytest.mark.parametrize("method,jac,tgrad", [(lx.Rosenbrock23, "auto", None), (lx.Rodas5P, robertson_jac, None),
                                              (lx.Rodas5P, robertson_jac, lambda u, p, t: torch.zeros_like(u))])
def test_compiled_robertson_takes_the_eager_steps(method, jac, tgrad):
    eager, compiled = _pair(robertson_problem(), lambda: method(jac=jac, tgrad=tgrad), reltol=1e-5, abstol=1e-9,
                            saveat=[1e-3, 0.4, 4.0, 40.0])
    s, e = compiled.stats, eager.stats
    assert (s.naccept, s.nreject) == (e.naccept, e.nreject)
    # the stage solves round differently (substitution against lu_solve) and Robertson's I - h gamma J has a
    # condition number near 1e7 at large h: the eager loop with the substitution swapped in differs from the
    # eager loop by 6e-7 relative in y2 as well. Both stay far inside the tolerance:
    scaled = (compiled.u - eager.u).abs() / (1e-9 + 1e-5 * eager.u.abs())
    assert scaled.max() < 0.25
    assert torch.equal(compiled.t, eager.t)
    trials = s.naccept + s.nreject
    nfe_step, nsolve_step = method.step_counts
    # the autodiff forward pass (f_t from the same transform) or the difference in t; a user jac and tgrad: none
    per_linearisation = 0 if tgrad is not None else 1
    # the loop starts with f(u0) and Hairer's initial-step evaluation; an autodiff Jacobian is first checked
    # by one evaluation (a user jac by one call); every trial step forms J, a retried one as well
    checks = 0 if callable(jac) else 1
    assert s.njac == trials
    assert s.nf == 2 + checks + (nfe_step + per_linearisation) * trials
    assert s.nsolve == nsolve_step * trials


@pytest.mark.slow
def test_compiled_batched_rosenbrock_matches_eager_on_a_forced_batch():
    u0 = torch.linspace(-1.0, 1.0, 6, dtype=DT).reshape(3, 2)
    prob = lx.ODEProblem(forced, u0, (0.0, 3.0))
    eager, compiled = _pair(prob, lambda: lx.Rodas5P(jac_structure="batched"), reltol=1e-7, abstol=1e-9,
                            saveat=[0.5, 3.0])
    assert (compiled.stats.naccept, compiled.stats.nreject) == (eager.stats.naccept, eager.stats.nreject)
    # f_t is a difference in t (cancellation: ~1e-7 relative), so the compiled field's other rounding of f
    # reaches u at ~2e-10: under 1 % of the tolerance
    scaled = (compiled.u - eager.u).abs() / (1e-9 + 1e-7 * eager.u.abs())
    assert scaled.max() < 1e-2


@pytest.mark.slow
def test_singular_newton_matrix_stops_the_compiled_loop_with_a_clear_error():
    # a Jacobian of NaN leaves I - h gamma J unfactorisable at every h: each trial is rejected and halved
    prob = lx.ODEProblem(lambda u, p, t: -u, torch.ones(2, dtype=DT), (0.0, 1.0))

    def nan_jac(u, p, t):
        return torch.full((2, 2), float("nan"), dtype=u.dtype)
    with torch.no_grad():
        eager = lx.solve(prob, lx.Rosenbrock23(jac=nan_jac), dtmin=1e-8, throw=False)
        with pytest.raises(DtLessThanMinError, match="kept rejecting.*singular"):
            lx.solve(prob, lx.Rosenbrock23(jac=nan_jac), dtmin=1e-8, compile=True)
        sol = lx.solve(prob, lx.Rosenbrock23(jac=nan_jac), dtmin=1e-8, compile=True, throw=False)
    assert sol.retcode == eager.retcode and sol.stats.nreject == eager.stats.nreject > 10
