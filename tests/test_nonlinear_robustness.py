"""pylux.nonlinear under hard problems: per-sample failures, bad line-search trials, singular
Newton systems, slowly contracting modes, the failure messages and the shared failure vocabulary."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from pylux.core.failures import AbstractReturnCode, SolveFailure
from pylux.nonlinear import (
    Anderson,
    Broyden,
    ConvergenceWarning,
    FixedPointIteration,
    LimitedMemoryBroyden,
    NewtonKrylov,
    NonlinearReturnCode,
    NonlinearSolveError,
    gmres,
    nlsolve,
)
from pylux.nonlinear._base import MAX_INCREASE, backtracking_line_search

F64 = torch.float64


def quadratic_map(z):
    """g(z) = 2z - (z - 1)^2: the root of F(z) = g(z) - z = z - (z - 1)^2 is z = (3 +- sqrt 5) / 2."""
    return 2.0 * z - (z - 1.0) ** 2


THOUSAND_STARTS = torch.linspace(-3.0, 3.0, 1000).reshape(1000, 1)  # float32
ROOTS = torch.tensor([(3.0 - 5.0 ** 0.5) / 2.0, (3.0 + 5.0 ** 0.5) / 2.0])


def _solve_alone(solver, rows):
    return [nlsolve(quadratic_map, THOUSAND_STARTS[i:i + 1], solver, throw=False) for i in rows]


# ---------------------------------------------------------------- one element never aborts the batch
def test_broyden_batch_of_1000_scalar_problems_converges_where_each_converges_alone():
    solver = Broyden()
    sol = nlsolve(quadratic_map, THOUSAND_STARTS, solver, throw=False)
    # Element 666 starts at z0 = 1 - 6e-8, where the first secant has dF ~ 1e-7: its next step
    # overflows float32. Before, that aborted the whole batch at iteration 4 with 62 of 1000 converged.
    assert sol.retcode is NonlinearReturnCode.Unstable
    assert sol.unstable.nonzero().flatten().tolist() == [666]
    assert int(sol.converged.sum()) == 999 and not bool(sol.converged[666])
    assert int(sol.sample_iterations[666]) == 4 and sol.iterations <= 20
    assert bool(torch.isfinite(sol.z).all()) and bool(torch.isfinite(sol.residual).all())
    roots = sol.z[sol.converged].flatten()
    distance = (roots.unsqueeze(1) - ROOTS).abs().min(dim=1).values
    assert float(distance.max()) <= 1e-5
    # Each element gets the answer it gets alone (rows are independent problems).
    rows = list(range(0, 1000, 7)) + [666]
    for i, alone in zip(rows, _solve_alone(solver, rows)):
        assert bool(alone.converged[0]) == bool(sol.converged[i]), i
        if alone.converged[0]:
            torch.testing.assert_close(sol.z[i], alone.z[0], rtol=1e-6, atol=1e-6)


def test_nan_in_one_element_raises_after_the_rest_is_solved():
    with pytest.raises(NonlinearSolveError) as info:
        nlsolve(quadratic_map, THOUSAND_STARTS, Broyden())
    error = info.value
    message = str(error)
    assert error.retcode is NonlinearReturnCode.Unstable and error.iteration == 4
    assert "at iteration 4, in batch elements [666] (1 of 1000;" in message
    assert "999 of 1000 batch elements converged" in message
    assert int(error.solution.converged.sum()) == 999


def test_broyden_line_search_never_takes_a_trial_that_multiplies_the_residual():
    sol = nlsolve(quadratic_map, THOUSAND_STARTS, Broyden(line_search=True), throw=False)
    # Before: element 666 took a trial whose residual was 4.8e8 times its current one, diverged
    # to NaN and aborted the batch. Now it learns from the rejected trial and converges too.
    assert sol.success and bool(sol.converged.all())
    assert sol.iterations <= 20  # measured 16
    history = sol.residual_history.double()
    assert float((history[1:] / history[:-1]).nan_to_num(nan=0.0).max()) <= MAX_INCREASE
    roots = sol.z.flatten()
    assert float((roots.unsqueeze(1) - ROOTS).abs().min(dim=1).values.max()) <= 1e-5


def test_line_search_rejects_trials_that_raise_the_residual_tenfold():
    def g(z):  # F(z) = -z: the root is 0
        return torch.zeros_like(z)
    z = torch.tensor([[1.0], [1.0]], dtype=F64)
    gz = g(z)
    direction = torch.tensor([[-0.5], [1e6]], dtype=F64)  # a good step and a disastrous one
    residual = torch.linalg.vector_norm(gz - z, dim=1)
    search = backtracking_line_search(g, z, gz, direction, residual, None, max_backtracks=4)
    assert search.rejected.tolist() == [False, True]
    torch.testing.assert_close(search.z, torch.tensor([[0.5], [1.0]], dtype=F64))  # the second stays
    assert search.nfe == 5  # the full step and four halvings
    torch.testing.assert_close(search.z_trial[1], torch.tensor([1.0 + 1e6 / 16], dtype=F64))
    assert bool(search.trial_finite.all())
    # A trial within the bound is kept when nothing satisfies the sufficient decrease.
    search = backtracking_line_search(g, z, gz, torch.tensor([[1.0], [3.0]], dtype=F64), residual, None, 1)
    assert search.rejected.tolist() == [False, False]
    torch.testing.assert_close(search.z, torch.tensor([[1.5], [2.5]], dtype=F64))


def poisoned_cell(calls_before_nan, element=1, batch=5, n=6):
    gen = torch.Generator().manual_seed(7)
    W = torch.randn(n, n, generator=gen, dtype=F64)
    W = 0.8 * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(batch, n, generator=gen, dtype=F64)
    calls = [0]

    def healthy(z):
        return torch.tanh(z @ W.T + x[: z.shape[0]])

    def poisoned(z):
        calls[0] += 1
        out = healthy(z)
        if calls[0] > calls_before_nan:
            out = out.clone()
            out[element] = float("inf")
        return out
    return healthy, poisoned, torch.zeros(batch, n, dtype=F64)


@pytest.mark.parametrize("solver", [FixedPointIteration(), Broyden(), Broyden(line_search=True),
                                    LimitedMemoryBroyden(memory=3), Anderson(), Anderson(beta=0.7),
                                    NewtonKrylov(), NewtonKrylov(jvp="difference")], ids=repr)
def test_a_non_finite_element_does_not_spoil_the_others(solver):
    healthy, poisoned, z0 = poisoned_cell(calls_before_nan=2, element=3)
    sol = nlsolve(poisoned, z0, solver, abstol=1e-10, reltol=0.0, throw=False)
    reference = nlsolve(healthy, z0, solver, abstol=1e-10, reltol=0.0)
    if solver.line_search if hasattr(solver, "line_search") else False:
        # The line search never takes a trial whose residual is infinite: element 3 stays at
        # its last finite iterate and runs out of iterations instead.
        assert sol.retcode is NonlinearReturnCode.MaxIters and not bool(sol.unstable.any())
    else:
        assert sol.retcode is NonlinearReturnCode.Unstable
        assert sol.unstable.tolist() == [False, False, False, True, False]
    assert sol.converged.tolist() == [True, True, True, False, True]
    others = [0, 1, 2, 4]
    assert float(sol.residual[others].max()) <= 1e-10
    torch.testing.assert_close(sol.z[others], reference.z[others], rtol=0, atol=1e-9)
    assert bool(torch.isfinite(sol.z).all())


# ---------------------------------------------------------------- singular Newton systems
def singular_at_zero(z):
    """g(z) = z + 1/4 - z^2: F(z) = 1/4 - z^2, so J_g - I = -2z is singular at z0 = 0."""
    return z + 0.25 - z * z


@pytest.mark.parametrize("solver", [NewtonKrylov(), NewtonKrylov(line_search=False),
                                    NewtonKrylov(jvp="reverse"), NewtonKrylov(jvp="difference")], ids=repr)
def test_newton_krylov_falls_back_where_the_jacobian_is_singular(solver):
    # Before: 100 iterations (nfe 9101) stuck at z = 0 with MaxIters; Broyden needs 7.
    sol = nlsolve(singular_at_zero, torch.zeros(1, 1, dtype=F64), solver)
    assert sol.success and sol.iterations <= 8  # measured 5
    assert sol.nf <= 40  # measured 16 (forward), 21 (reverse), 27 (difference)
    torch.testing.assert_close(sol.z, torch.full((1, 1), 0.5, dtype=F64), rtol=0, atol=1e-6)


def test_newton_krylov_near_singular_starts_converge():
    z0 = torch.tensor([[0.0], [1e-8], [-1e-6], [1e-4], [0.3], [-2.0]], dtype=F64)
    sol = nlsolve(singular_at_zero, z0, NewtonKrylov(), abstol=1e-10, reltol=0.0)
    assert sol.success and sol.iterations <= 10  # measured 6
    torch.testing.assert_close(sol.z.abs(), torch.full((6, 1), 0.5, dtype=F64), rtol=0, atol=1e-9)


def test_newton_krylov_names_the_singular_jacobian_when_it_cannot_be_overcome():
    def no_root(z):  # F(z) = 1/4 + z^2 > 0 has no real root, and J_g - I = 2z is singular at 0
        return z + 0.25 + z * z
    with pytest.raises(NonlinearSolveError, match=r"\(J_g - I\) d = -F was singular or too ill-conditioned"
                                                  r".*element\(s\) \[0, 1\]") as info:
        nlsolve(no_root, torch.zeros(2, 1, dtype=F64), NewtonKrylov(), maxiters=20, throw=True)
    assert info.value.retcode is NonlinearReturnCode.MaxIters
    assert "faster solver (Broyden, Anderson)" in str(info.value)


@pytest.mark.parametrize("restart", [1, 2, 5])
def test_gmres_on_a_singular_system_stops_at_the_least_squares_point(restart):
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=F64)).expand(2, 2, 2).clone()
    A[0] = torch.eye(2, dtype=F64)
    b = torch.ones(2, 2, dtype=F64)
    result = gmres(lambda v: torch.bmm(A, v.unsqueeze(2)).squeeze(2), b, restart=restart, maxiters=50,
                   rtol=1e-10)
    # Element 1: b is outside the range of A. Before, every restart ran all 50 iterations (95-100
    # products) and a rounding-level pivot put x = (1, 1.6e16) (restart 2 or 5); now the first cycle
    # reaches the least-squares point x = (1, 1), residual 1, and the next, which gains nothing, stops it.
    assert result.converged.tolist() == [True, False]
    assert result.iterations <= 4 and result.matvecs <= 8
    torch.testing.assert_close(result.x[1], torch.tensor([1.0, 1.0], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(result.residual_norm[1], torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(result.x[0], torch.ones(2, dtype=F64), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- Anderson on a slowly contracting mode
def slow_mode(z):
    """z -> diag(0.999999, 0.5, 1e-8) z + 1, with fixed point (1e6, 2, 1 + 1e-8)."""
    return z * torch.tensor([0.999999, 0.5, 1e-8], dtype=z.dtype) + 1.0


def test_anderson_default_regularization_extrapolates_a_slow_mode():
    # Before, the default regularization gave z = 70.9 after 200 iterations; regularization=0 took 5.
    sol = nlsolve(slow_mode, torch.zeros(1, 3, dtype=F64), Anderson(), abstol=1e-9, reltol=0.0, maxiters=200)
    assert sol.success and sol.iterations <= 10  # measured 7
    assert abs(float(sol.z[0, 0]) - 1e6) / 1e6 <= 1e-9
    torch.testing.assert_close(sol.z[0, 1:], torch.tensor([2.0, 1.0 + 1e-8], dtype=F64), rtol=0, atol=1e-8)


def test_anderson_regularization_is_scale_invariant():
    counts = []
    for scale in (1e-6, 1.0, 1e6):
        def scaled(z, scale=scale):
            return scale * slow_mode(z / scale)
        sol = nlsolve(scaled, torch.zeros(1, 3, dtype=F64), Anderson(), abstol=1e-9 * scale, reltol=0.0,
                      maxiters=200)
        assert sol.success and abs(float(sol.z[0, 0]) / scale - 1e6) / 1e6 <= 1e-9
        counts.append(sol.iterations)
    assert counts[0] == counts[1] == counts[2]


# ---------------------------------------------------------------- failure messages
@pytest.mark.parametrize("solver, suggested", [
    (FixedPointIteration(), "Broyden, Anderson, NewtonKrylov"),
    (Broyden(), "Anderson, NewtonKrylov"),
    (LimitedMemoryBroyden(), "Broyden (full memory), Anderson, NewtonKrylov"),
    (Anderson(), "Broyden, NewtonKrylov"),
    (NewtonKrylov(), "Broyden, Anderson"),
], ids=repr)
def test_maxiters_advice_suggests_only_other_solvers(solver, suggested):
    with pytest.warns(ConvergenceWarning) as record:
        nlsolve(torch.tanh, torch.ones(2, 3, dtype=F64), solver, abstol=1e-14, reltol=0.0, maxiters=1)
    message = str(record[0].message)
    assert f"try a faster solver ({suggested});" in message


def nan_at_call(call):
    _, poisoned, z0 = poisoned_cell(calls_before_nan=call, element=2)
    return poisoned, z0


def test_nan_message_says_at_iteration_when_the_window_is_one_iteration():
    g, z0 = nan_at_call(6)  # the 7th evaluation is iteration 6
    with pytest.raises(NonlinearSolveError) as info:
        nlsolve(g, z0, FixedPointIteration(), abstol=1e-14, record_history=False)
    assert "at iteration 6, in batch elements [2]" in str(info.value) and "between" not in str(info.value)
    assert info.value.iteration == 6
    g, z0 = nan_at_call(6)  # checks at iterations 0, 5 and 6 (maxiters)
    with pytest.raises(NonlinearSolveError) as info:
        nlsolve(g, z0, FixedPointIteration(), abstol=1e-14, record_history=False, check_every=5, maxiters=6)
    assert "at iteration 6, in batch elements [2]" in str(info.value) and "between" not in str(info.value)
    g, z0 = nan_at_call(6)  # a real window: checks at 5 and 10, the NaN appears at iteration 6
    with pytest.raises(NonlinearSolveError, match=r"between iterations 6 and 10, in batch elements \[2\]"):
        nlsolve(g, z0, FixedPointIteration(), abstol=1e-14, record_history=False, check_every=5)


# ---------------------------------------------------------------- the shared failure vocabulary
def test_return_codes_and_errors_are_the_shared_failure_types():
    assert issubclass(NonlinearReturnCode, AbstractReturnCode)
    assert NonlinearReturnCode.Success.successful
    assert not NonlinearReturnCode.MaxIters.successful and not NonlinearReturnCode.Unstable.successful
    for code in NonlinearReturnCode:
        assert code.message == code.advice and code.message.endswith(".")
    assert repr(NonlinearReturnCode.MaxIters) == "NonlinearReturnCode.MaxIters"
    assert issubclass(NonlinearSolveError, SolveFailure)
    error = NonlinearSolveError("text", NonlinearReturnCode.MaxIters, 7)
    assert error.iteration == 7 and error.retcode is NonlinearReturnCode.MaxIters and error.solution is None


def test_throw_and_on_failure_are_one_policy():
    z0 = torch.ones(2, 3, dtype=F64)
    kwargs = dict(abstol=1e-14, reltol=0.0, maxiters=2)
    with pytest.raises(SolveFailure, match=r"no convergence within maxiters=2") as info:
        nlsolve(torch.tanh, z0, Broyden(), throw=True, **kwargs)
    assert info.value.retcode is NonlinearReturnCode.MaxIters and info.value.iteration == 2
    assert info.value.solution.iterations == 2 and not bool(info.value.solution.converged.any())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = nlsolve(torch.tanh, z0, Broyden(), throw=False, **kwargs)
    assert sol.retcode is NonlinearReturnCode.MaxIters
    with pytest.warns(ConvergenceWarning):  # the default stays "warn"
        nlsolve(torch.tanh, z0, Broyden(), **kwargs)
    with pytest.raises(ValueError, match=r"nlsolve: throw=True and on_failure='ignore' disagree"):
        nlsolve(torch.tanh, z0, Broyden(), throw=True, on_failure="ignore", **kwargs)
    with pytest.raises(TypeError, match=r"nlsolve: throw must be True or False"):
        nlsolve(torch.tanh, z0, Broyden(), throw="yes", **kwargs)
    nlsolve(torch.tanh, z0, Broyden(), throw=True, on_failure="raise", abstol=1e-3)  # agreeing: fine


def test_nf_is_the_count_and_nfe_its_read_only_alias():
    sol = nlsolve(torch.tanh, torch.ones(2, 3, dtype=F64), Anderson(), abstol=1e-8)
    assert sol.nf == sol.nfe == sol.iterations + 1
    assert "nf" in {field.name for field in dataclasses.fields(sol)}
    assert "nfe" not in {field.name for field in dataclasses.fields(sol)}
    with pytest.raises(AttributeError):
        sol.nfe = 3


def test_unknown_keywords_go_through_the_one_checker():
    with pytest.raises(TypeError, match=r"^nlsolve\(\) got unknown keyword argument\(s\): 'thrown' "
                                        r"\(did you mean 'throw'\?\)\. Known keywords: .*throw"):
        nlsolve(torch.tanh, torch.ones(1, 2), Broyden(), thrown=True)
    with pytest.raises(TypeError, match=r"^Broyden\(\) got unknown keyword argument\(s\): 'memory'"):
        Broyden(memory=3)
    with pytest.raises(TypeError, match=r"^gmres\(\) got unknown keyword argument\(s\): 'rtl' "
                                        r"\(did you mean 'rtol'\?\)"):
        gmres(lambda v: v, torch.ones(1, 2), rtl=1e-3)
    with pytest.raises(TypeError, match=r"^Anderson\.replace\(\) got unknown keyword argument\(s\): 'betta'"):
        Anderson().replace(betta=0.5)
    import pylux.core.validation as validation
    assert not hasattr(validation, "reject_unknown")  # one checker: core.keywords
