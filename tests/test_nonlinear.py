"""Tests of pylux.nonlinear: fixed-point/root solvers, nlsolve and batched GMRES (float64)."""

from __future__ import annotations

import importlib
import math
import re
import warnings

import pytest
import torch

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

DTYPE = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def deq_cell(batch=6, n=12, norm=0.9, seed=0, dtype=DTYPE):
    """g(z) = tanh(W z + U x + b) with ||W||_2 = norm, a contraction with factor <= norm."""
    gen = _gen(seed)
    W = torch.randn(n, n, generator=gen, dtype=dtype)
    W = W * (norm / torch.linalg.matrix_norm(W, 2))
    U = torch.randn(n, n, generator=gen, dtype=dtype) / math.sqrt(n)
    b = 0.1 * torch.randn(n, generator=gen, dtype=dtype)
    x = torch.randn(batch, n, generator=gen, dtype=dtype)
    injection = x @ U.T + b

    def g(z):
        return torch.tanh(z @ W.T + injection)
    return g, torch.zeros(batch, n, dtype=dtype)


def plain_iteration(g, z0, steps):
    z = z0
    for _ in range(steps):
        z = g(z)
    return z


def slow_linearish_cell(batch=4, n=16, top=0.99, seed=1):
    """Nearly linear map with a Jacobian eigenvalue near `top`: plain iteration is slow."""
    gen = _gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))
    eig = torch.linspace(-0.3, top, n, dtype=DTYPE)
    W = Q @ torch.diag(eig) @ Q.T
    x = 0.05 * torch.randn(batch, n, generator=gen, dtype=DTYPE)

    def g(z):
        return torch.tanh(z @ W.T + x)
    return g, torch.zeros(batch, n, dtype=DTYPE)


ALL_SOLVERS = [
    FixedPointIteration(),
    FixedPointIteration(damping=0.8),
    Broyden(),
    Broyden(line_search=True),
    LimitedMemoryBroyden(memory=3),
    LimitedMemoryBroyden(memory=3, when_full="recycle"),
    Anderson(),
    Anderson(memory=3, beta=0.7),
    NewtonKrylov(),
    NewtonKrylov(jvp="reverse", orthogonalization="cgs2"),
    NewtonKrylov(jvp="difference"),
]


# ---------------------------------------------------------------- solvers find the fixed point
@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=repr)
def test_solver_finds_fixed_point_of_contraction(solver):
    g, z0 = deq_cell()
    reference = plain_iteration(g, z0, 1500)  # error <= 0.9^1500 * ||z0 - z*||: exact in float64
    sol = nlsolve(g, z0, solver, abstol=1e-10, reltol=0.0, maxiters=400)
    assert sol.retcode is NonlinearReturnCode.Success and sol.success
    assert bool(sol.converged.all())
    recomputed = torch.linalg.vector_norm(g(sol.z) - sol.z, dim=1)
    torch.testing.assert_close(sol.residual, recomputed, rtol=0, atol=1e-14)
    assert float(sol.residual.max()) <= 1e-10
    # ||z - z*|| <= ||g(z) - z|| / (1 - 0.9) for a 0.9-contraction.
    assert float(torch.linalg.vector_norm(sol.z - reference, dim=1).max()) <= 1e-9
    assert sol.residual_history.shape == (sol.iterations + 1, z0.shape[0])
    torch.testing.assert_close(sol.residual_history[0], torch.linalg.vector_norm(g(z0) - z0, dim=1))
    assert not sol.z.requires_grad


def test_function_evaluation_counts_are_exact():
    g, z0 = deq_cell()
    calls = [0]

    def counted(z):
        calls[0] += 1
        return g(z)
    for solver in (FixedPointIteration(), Broyden(), LimitedMemoryBroyden(memory=2), Anderson()):
        calls[0] = 0
        sol = nlsolve(counted, z0, solver, abstol=1e-8, reltol=0.0)
        assert sol.nfe == calls[0] == sol.iterations + 1
        assert int(sol.sample_iterations.max()) == sol.iterations
    calls[0] = 0
    sol = nlsolve(counted, z0, NewtonKrylov(jvp="difference"), abstol=1e-8, reltol=0.0)
    assert sol.nfe == calls[0] > sol.iterations + 1


def test_accelerated_solvers_beat_plain_iteration_on_ill_conditioned_map():
    g, z0 = slow_linearish_cell()
    kwargs = dict(abstol=1e-8, reltol=0.0, maxiters=5000)
    plain = nlsolve(g, z0, FixedPointIteration(), **kwargs)
    assert plain.success and 590 <= plain.iterations <= 610  # Jacobian eigenvalue ~0.97 at z*
    counts = {}
    for solver in (Broyden(), LimitedMemoryBroyden(memory=5), Anderson(memory=5), NewtonKrylov()):
        sol = nlsolve(g, z0, solver, **kwargs)
        assert sol.success, solver
        counts[solver.name] = (sol.iterations, sol.nfe)
    # Measured: Broyden 38, LimitedMemoryBroyden 49, Anderson 59, NewtonKrylov 6 (nfe 94).
    assert counts["Broyden"][0] <= 45 and counts["Broyden"][1] == counts["Broyden"][0] + 1
    assert counts["LimitedMemoryBroyden"][0] <= 60
    assert counts["Anderson"][0] <= 70 and counts["Anderson"][1] == counts["Anderson"][0] + 1
    assert counts["NewtonKrylov"][0] <= 8 and counts["NewtonKrylov"][1] < plain.nfe / 4


def test_newton_krylov_converges_quadratically():
    g, z0 = deq_cell()
    sol = nlsolve(g, z0, NewtonKrylov(linear_rtol=1e-8), abstol=1e-12, reltol=0.0)
    assert sol.success and sol.iterations <= 6
    worst = sol.residual_history.max(dim=1).values
    # Past the first steps each residual is at most ~C * previous^2.
    ratios = worst[2:sol.iterations + 1] / worst[1:sol.iterations].pow(2)
    assert float(ratios.max()) < 10.0


# ---------------------------------------------------------------- per-sample behaviour
def per_sample_cell():
    """Element 0 contracts with factor 0.1 (easy), element 1 with 0.95 (hard)."""
    n = 10
    gen = _gen(3)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))
    Ws = torch.stack([0.1 * Q, 0.95 * Q @ torch.diag(torch.linspace(0.2, 1.0, n, dtype=DTYPE)) @ Q.T])
    x = 0.1 * torch.randn(2, n, generator=gen, dtype=DTYPE)

    def g(z):
        return torch.tanh(torch.bmm(Ws[: z.shape[0]], z.unsqueeze(2)).squeeze(2) + x[: z.shape[0]])
    return g, torch.zeros(2, n, dtype=DTYPE)


@pytest.mark.parametrize("solver", [FixedPointIteration(), Broyden(), Anderson(), NewtonKrylov()], ids=repr)
def test_per_sample_convergence_and_freezing(solver):
    g, z0 = per_sample_cell()
    sol = nlsolve(g, z0, solver, abstol=1e-10, reltol=0.0, maxiters=1000)
    assert sol.success and sol.converged.tolist() == [True, True]
    easy, hard = sol.sample_iterations.tolist()
    assert easy < hard == sol.iterations
    # Element 0 was frozen when it converged: solving it alone gives the same iterate.
    alone = nlsolve(g, z0[:1], solver, abstol=1e-10, reltol=0.0)
    assert alone.iterations == easy
    torch.testing.assert_close(sol.z[:1], alone.z, rtol=0, atol=1e-13)
    history = sol.residual_history[:, 0]
    assert bool((history[easy:] == history[easy]).all())


def test_returns_lowest_residual_iterate_when_last_is_worse():
    def g(z):  # expanding map: every step moves away from the fixed point 0
        return 2.0 * z
    z0 = torch.tensor([[1e-3, 0.0], [2e-3, 0.0]], dtype=DTYPE)
    sol = nlsolve(g, z0, FixedPointIteration(), maxiters=5, on_failure="ignore")
    assert sol.retcode is NonlinearReturnCode.MaxIters and sol.iterations == 5
    torch.testing.assert_close(sol.z, z0)
    torch.testing.assert_close(sol.residual, torch.tensor([1e-3, 2e-3], dtype=DTYPE))
    assert float(sol.residual_history[-1, 0]) == pytest.approx(32e-3)
    assert sol.sample_iterations.tolist() == [5, 5]


def test_check_every_gives_same_answer():
    g, z0 = deq_cell()
    every = nlsolve(g, z0, Anderson(), abstol=1e-9, reltol=0.0)
    sparse = nlsolve(g, z0, Anderson(), abstol=1e-9, reltol=0.0, check_every=4, record_history=False)
    assert sparse.success and sparse.iterations % 4 == 0
    assert every.iterations <= sparse.iterations < every.iterations + 4
    torch.testing.assert_close(sparse.z, every.z, rtol=0, atol=1e-14)
    assert torch.equal(sparse.sample_iterations, every.sample_iterations)
    assert sparse.residual_history is None


def test_relative_tolerance_uses_norm_of_z():
    g, z0 = deq_cell()
    sol = nlsolve(g, z0, FixedPointIteration(), abstol=1e-12, reltol=1e-4)
    znorm = torch.linalg.vector_norm(sol.z, dim=1)
    assert bool((sol.residual <= 1e-12 + 1e-4 * znorm).all())
    torch.testing.assert_close(sol.relative_residual, sol.residual / znorm)
    # One iteration earlier, some element was above its tolerance.
    previous = sol.residual_history[-2]
    assert bool((previous > 1e-12 + 1e-4 * znorm * 0.999).any())


def test_already_converged_start_takes_no_iteration():
    g, z0 = deq_cell()
    fixed = plain_iteration(g, z0, 1500)
    sol = nlsolve(g, fixed, Broyden(), abstol=1e-10, reltol=0.0)
    assert sol.success and sol.iterations == 0 and sol.nfe == 1


# ---------------------------------------------------------------- failure is loud
def test_maxiters_warns_with_residual_and_retcode():
    g, z0 = deq_cell()
    with pytest.warns(ConvergenceWarning, match=r"FixedPointIteration.*maxiters=3.*largest residual") as record:
        sol = nlsolve(g, z0, FixedPointIteration(), abstol=1e-12, reltol=0.0, maxiters=3)
    assert sol.retcode is NonlinearReturnCode.MaxIters and not sol.success
    assert sol.iterations == 3 and not bool(sol.converged.any())
    worst = float(sol.residual.max())
    assert f"{worst:.3e}" in str(record[0].message)


def test_maxiters_raise_and_ignore():
    g, z0 = deq_cell()
    with pytest.raises(NonlinearSolveError, match=r"Broyden.*maxiters=2") as info:
        nlsolve(g, z0, Broyden(), maxiters=2, on_failure="raise")
    assert info.value.retcode is NonlinearReturnCode.MaxIters and info.value.iteration == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = nlsolve(g, z0, Broyden(), maxiters=2, on_failure="ignore")
    assert sol.retcode is NonlinearReturnCode.MaxIters


def nan_after(calls_before_nan):
    g, z0 = deq_cell()
    calls = [0]

    def poisoned(z):
        calls[0] += 1
        out = g(z)
        if calls[0] > calls_before_nan:
            out = out.clone()
            out[1, 0] = float("nan")
        return out
    return poisoned, z0, calls


@pytest.mark.parametrize("solver", [FixedPointIteration(), Broyden(), Anderson()], ids=repr)
def test_nan_raises_naming_iteration(solver):
    g, z0, _ = nan_after(3)  # calls: g(z0) is iteration 0, the 4th call is iteration 3
    with pytest.raises(NonlinearSolveError, match=r"non-finite residual .* at iteration 3, in batch elements \[1\]") as info:
        nlsolve(g, z0, solver, abstol=1e-12)
    assert info.value.retcode is NonlinearReturnCode.Unstable and info.value.iteration == 3


def test_nan_with_sparse_checks_and_ignore():
    g, z0, _ = nan_after(3)
    with pytest.raises(NonlinearSolveError, match=r"between iterations 1 and 4"):
        nlsolve(g, z0, Anderson(), abstol=1e-12, check_every=4, record_history=False)
    g, z0, _ = nan_after(3)
    with pytest.raises(NonlinearSolveError, match=r"at iteration 3"):
        nlsolve(g, z0, Anderson(), abstol=1e-12, check_every=4)
    g, z0, _ = nan_after(3)
    sol = nlsolve(g, z0, Anderson(), abstol=1e-12, on_failure="ignore")
    # Element 1 is frozen at iteration 3; the five others are solved to the end, as they are alone.
    assert sol.retcode is NonlinearReturnCode.Unstable and sol.iterations > 3
    assert sol.unstable.tolist() == [False, True, False, False, False, False]
    assert sol.converged.tolist() == [True, False, True, True, True, True]
    assert int(sol.sample_iterations[1]) == 3
    assert bool(torch.isfinite(sol.z).all()) and bool(torch.isfinite(sol.residual).all())
    healthy, _ = deq_cell()
    others = [0, 2, 3, 4, 5]

    def five(z):  # the healthy map on the five other elements (g acts on each row alone)
        full = torch.zeros_like(z0)
        full[others] = z
        return healthy(full)[others]
    alone = nlsolve(five, z0[others], Anderson(), abstol=1e-12)
    assert alone.success and alone.iterations == sol.iterations
    torch.testing.assert_close(sol.z[others], alone.z, rtol=0, atol=1e-12)


def test_nan_in_first_evaluation_and_in_z0():
    g, z0, calls = nan_after(0)
    with pytest.raises(NonlinearSolveError, match=r"g\(z0\).*at iteration 0"):
        nlsolve(g, z0, Broyden())
    g, z0, calls = nan_after(100)
    z0 = z0.clone()
    z0[2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"z0 contains NaN or Inf in batch elements \[2\]"):
        nlsolve(g, z0, Broyden())
    assert calls[0] == 0  # rejected before any work


def test_anderson_singular_history_does_not_crash():
    # Repeating one iterate makes every row of the Gram matrix equal: singular
    # without regularisation, and all zero when the residual is zero.
    g, z0 = deq_cell(batch=3, n=5)
    z = z0.reshape(3, -1)
    gz = g(z)
    F = gz - z
    F[0] = 0.0  # element 0 sits exactly at a fixed point: zero Gram matrix
    for solver in (Anderson(memory=4, regularization=0.0), Anderson(memory=4)):
        state = solver.init(z, gz, 10)
        for _ in range(6):
            z_new, gz_new, state, nfe = solver.step(g, z, gz, F, state, None)
            assert bool(torch.isfinite(z_new).all()) and bool(torch.isfinite(gz_new).all())
        torch.testing.assert_close(z_new, gz)  # duplicates: every mix is the plain step

    def linear(z):  # residuals become exactly parallel, then exactly zero
        return 0.5 * z + 1.0
    sol = nlsolve(linear, torch.zeros(3, 4, dtype=DTYPE), Anderson(regularization=0.0), abstol=1e-12,
                  reltol=0.0)
    assert sol.success and sol.iterations <= 3  # two collinear residuals determine the answer
    torch.testing.assert_close(sol.z, torch.full((3, 4), 2.0, dtype=DTYPE), rtol=0, atol=1e-12)


def test_broyden_skips_degenerate_updates():
    def linear(z):  # converges in two steps, after which dz = 0 exactly
        return 0.5 * z + 1.0
    for solver in (Broyden(), LimitedMemoryBroyden(memory=1)):
        sol = nlsolve(linear, torch.zeros(2, 3, dtype=DTYPE), solver, abstol=1e-12, reltol=0.0)
        assert sol.success and sol.iterations <= 3
        torch.testing.assert_close(sol.z, torch.full((2, 3), 2.0, dtype=DTYPE), rtol=0, atol=1e-12)


@pytest.mark.parametrize("when_full", ["reset", "recycle"])
def test_limited_memory_broyden_keeps_at_most_memory_terms(when_full):
    g, z0 = slow_linearish_cell(batch=2, n=6)
    solver = LimitedMemoryBroyden(memory=3, when_full=when_full)
    z = z0
    gz = g(z)
    state = solver.init(z, gz, maxiters=50)
    filled = []
    for _ in range(8):
        z, gz, state, nfe = solver.step(g, z, gz, gz - z, state, None)
        filled.append(state.filled)
        assert state.us.shape == state.vs.shape == (2, 3, 6)
    # One term per step after the first, until the buffers are full.
    assert filled[:4] == [0, 1, 2, 3]
    assert filled[4:] == ([1, 2, 3, 1] if when_full == "reset" else [3, 3, 3, 3])


# ---------------------------------------------------------------- options and inputs
@pytest.mark.parametrize("make, name, hint", [
    (lambda: Anderson(memroy=3), "memroy", "memory"),
    (lambda: Broyden(line_serach=True), "line_serach", "line_search"),
    (lambda: LimitedMemoryBroyden(memory=3, when_ful="reset"), "when_ful", "when_full"),
    (lambda: FixedPointIteration(dampign=0.5), "dampign", "damping"),
    (lambda: NewtonKrylov(linear_rtl=1e-3), "linear_rtl", "linear_rtol"),
    (lambda: nlsolve(torch.tanh, torch.zeros(1, 2), Broyden(), abstl=1e-3), "abstl", "abstol"),
    (lambda: gmres(lambda v: v, torch.ones(1, 2), restrat=5), "restrat", "restart"),
    (lambda: Anderson().replace(betta=0.5), "betta", "beta"),
])
def test_misspelt_option_is_named(make, name, hint):
    with pytest.raises(TypeError, match=rf"unknown keyword argument\(s\): '{name}' \(did you mean '{hint}'\?\)"):
        make()


@pytest.mark.parametrize("make, error, pattern", [
    (lambda: Anderson(memory=0), ValueError, r"Anderson: memory must be >= 1, got 0"),
    (lambda: Anderson(beta=0.0), ValueError, r"Anderson: beta must lie in \(0, 1\], got 0.0"),
    (lambda: Anderson(regularization=-1.0), ValueError, r"regularization must lie in \[0, inf\]"),
    (lambda: FixedPointIteration(damping=1.5), ValueError, r"damping must lie in \(0, 1\]"),
    (lambda: LimitedMemoryBroyden(memory=2.5), TypeError, r"memory must be an int, got float 2.5"),
    (lambda: LimitedMemoryBroyden(when_full="drop"), ValueError, r"when_full must be one of 'reset', 'recycle'"),
    (lambda: NewtonKrylov(jvp="fwd"), ValueError, r"jvp must be one of 'forward', 'reverse', 'difference'"),
    (lambda: NewtonKrylov(linear_rtol=1.0), ValueError, r"linear_rtol must lie in \(0, 1\)"),
    (lambda: Broyden(line_search=1), TypeError, r"line_search must be True or False"),
    (lambda: Broyden(maxiters=-1), ValueError, r"Broyden: maxiters must be >= 0"),
])
def test_bad_option_values(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


def test_solvers_are_immutable_values():
    solver = Anderson(memory=3)
    with pytest.raises(AttributeError, match=r"immutable.*replace\(memory=...\)"):
        solver.memory = 4
    other = solver.replace(memory=4)
    assert other.memory == 4 and solver.memory == 3
    assert other == Anderson(memory=4) and other != solver
    assert repr(solver) == "Anderson(memory=3, beta=1.0, regularization=0.0001)"


def test_termination_defaults_in_solver_and_conflicts():
    g, z0 = deq_cell()
    sol = nlsolve(g, z0, Broyden(maxiters=2, abstol=1e-3), on_failure="ignore")
    assert sol.maxiters == 2 and sol.abstol == 1e-3 and sol.iterations == 2
    sol = nlsolve(g, z0, Broyden(maxiters=50), maxiters=50)
    assert sol.success
    with pytest.raises(ValueError, match=r"maxiters is given twice, Broyden\(maxiters=2\) and nlsolve\(maxiters=5\)"):
        nlsolve(g, z0, Broyden(maxiters=2), maxiters=5)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(abstol=-1.0), ValueError, r"nlsolve: abstol must lie in \[0, inf\)"),
    (dict(abstol=0.0, reltol=0.0), ValueError, r"abstol and reltol are both zero"),
    (dict(reltol=float("nan")), ValueError, r"reltol must lie"),
    (dict(maxiters=1.5), TypeError, r"maxiters must be an int"),
    (dict(on_failure="loud"), ValueError, r"on_failure must be one of 'warn', 'raise', 'ignore'"),
    (dict(check_every=0), ValueError, r"check_every must be >= 1"),
])
def test_bad_nlsolve_settings(kwargs, error, pattern):
    g, z0 = deq_cell()
    with pytest.raises(error, match=pattern):
        nlsolve(g, z0, Broyden(), **kwargs)


def test_bad_inputs_are_named():
    g, z0 = deq_cell(batch=2, n=3)
    with pytest.raises(ValueError, match=r"g returned shape \(2, 4\) for a state of shape \(2, 3\)"):
        nlsolve(lambda z: torch.zeros(2, 4, dtype=DTYPE), z0, Broyden())
    with pytest.raises(TypeError, match=r"g returned torch.float32 on cpu for a state that is torch.float64"):
        nlsolve(lambda z: z.float(), z0, Broyden())
    with pytest.raises(TypeError, match=r"g must return a torch.Tensor, got tuple"):
        nlsolve(lambda z: (z,), z0, Broyden())
    with pytest.raises(TypeError, match=r"z0 must have a real floating dtype, got torch.int64"):
        nlsolve(g, torch.zeros(2, 3, dtype=torch.long), Broyden())
    with pytest.raises(ValueError, match=r"leading batch dimension, got a 0-d tensor"):
        nlsolve(g, torch.tensor(1.0), Broyden())
    with pytest.raises(TypeError, match=r"solver must be a pylux nonlinear solver.*got str"):
        nlsolve(g, z0, "broyden")

    class Boom(Exception):
        pass

    def raising(z):
        raise Boom("from g")
    with pytest.raises(Boom, match="from g"):  # the user's exception reaches the user unchanged
        nlsolve(raising, z0, Broyden())


def test_zero_size_states():
    for shape in ((0, 3), (3, 0)):
        z0 = torch.zeros(shape, dtype=DTYPE)
        sol = nlsolve(torch.tanh, z0, Anderson())
        assert sol.success and sol.iterations == 0 and sol.z.shape == shape


def test_float32_and_multidimensional_states_under_no_grad():
    gen = _gen(5)
    W = (0.5 * torch.randn(4, 4, generator=gen)).requires_grad_()
    x = torch.randn(3, 2, 4, generator=gen)

    def g(z):  # states of shape (B, 2, 4)
        return torch.tanh(z @ W.T + x)
    z0 = torch.zeros(3, 2, 4, requires_grad=True)
    for solver in (Broyden(), Anderson(), LimitedMemoryBroyden(memory=2), NewtonKrylov(), FixedPointIteration()):
        with torch.no_grad():
            sol = nlsolve(g, z0, solver, abstol=1e-5, reltol=0.0)
        assert sol.success and sol.z.dtype == torch.float32 and sol.z.shape == (3, 2, 4)
        assert not sol.z.requires_grad
        with torch.no_grad():
            assert float((g(sol.z) - sol.z).flatten(1).norm(dim=1).max()) <= 1.5e-5
    sol = nlsolve(g, z0, Broyden(), abstol=1e-5, reltol=0.0)  # grad mode on: still no graph
    assert not sol.z.requires_grad


# ---------------------------------------------------------------- GMRES
def dense_systems(batch, n, seed, shift=3.0):
    gen = _gen(seed)
    A = shift * torch.eye(n, dtype=DTYPE) + torch.randn(batch, n, n, generator=gen, dtype=DTYPE) / math.sqrt(n)
    b = torch.randn(batch, n, generator=gen, dtype=DTYPE)
    return A, b


def bmv(A):
    return lambda v: torch.bmm(A, v.unsqueeze(2)).squeeze(2)


@pytest.mark.parametrize("orthogonalization", ["mgs", "cgs2"])
def test_gmres_matches_dense_solve(orthogonalization):
    A, b = dense_systems(5, 30, seed=0)
    result = gmres(bmv(A), b, restart=40, rtol=1e-12, orthogonalization=orthogonalization)
    expected = torch.linalg.solve(A, b)
    assert bool(result.converged.all())
    torch.testing.assert_close(result.x, expected, rtol=1e-9, atol=1e-10)
    true_res = torch.linalg.vector_norm(b - bmv(A)(result.x), dim=1)
    torch.testing.assert_close(result.residual_norm, true_res, rtol=1e-6, atol=1e-15)
    assert bool((true_res <= 1e-12 * torch.linalg.vector_norm(b, dim=1)).all())


def test_gmres_with_restarts():
    A, b = dense_systems(4, 40, seed=1)
    result = gmres(bmv(A), b, restart=5, maxiters=400, rtol=1e-10)
    assert bool(result.converged.all()) and result.iterations > 5
    torch.testing.assert_close(result.x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-9)
    # Each cycle ends with one residual evaluation.
    assert result.matvecs == result.iterations + math.ceil(result.iterations / 5)


@pytest.mark.parametrize("orthogonalization", ["mgs", "cgs2"])
def test_gmres_exact_in_n_steps_without_restart(orthogonalization):
    n = 8
    gen = _gen(2)
    A = torch.randn(3, n, n, generator=gen, dtype=DTYPE) + 2.0 * torch.eye(n, dtype=DTYPE)  # nonsymmetric
    b = torch.randn(3, n, generator=gen, dtype=DTYPE)
    result = gmres(bmv(A), b, restart=50, rtol=1e-10, orthogonalization=orthogonalization)
    assert bool(result.converged.all())
    assert result.iterations == n  # a generic system needs the whole space, and no more
    torch.testing.assert_close(result.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)


def test_gmres_per_element_convergence_and_shapes():
    n = 6
    A, b = dense_systems(3, n, seed=4)
    A[0] = 2.0 * torch.eye(n, dtype=DTYPE)  # element 0 converges after one step
    b[2] = 0.0                              # element 2 is solved by its x0 = 0 from the start
    b3 = b.reshape(3, 2, 3)

    def matvec(v):
        return bmv(A)(v.reshape(3, n)).reshape(3, 2, 3)
    x0 = torch.ones(3, 2, 3, dtype=DTYPE)
    x0[2] = 0.0
    result = gmres(matvec, b3, x0, rtol=1e-11)
    assert result.x.shape == (3, 2, 3) and bool(result.converged.all())
    expected = torch.linalg.solve(A, b)
    torch.testing.assert_close(result.x.reshape(3, n), expected, rtol=1e-9, atol=1e-10)
    zero = gmres(bmv(A), torch.zeros(2, n, dtype=DTYPE))
    assert zero.iterations == 0 and bool((zero.x == 0).all()) and bool(zero.converged.all())


def test_gmres_singular_system_does_not_crash():
    A, b = dense_systems(2, 5, seed=5)
    A[1] = 0.0
    result = gmres(bmv(A), b, rtol=1e-10, maxiters=30)
    assert result.converged.tolist() == [True, False]
    assert bool(torch.isfinite(result.x).all())
    torch.testing.assert_close(result.x[0], torch.linalg.solve(A[0], b[0]), rtol=1e-9, atol=1e-10)


def test_gmres_solves_adjoint_system_of_fixed_point():
    # The implicit backward pass of a DEQ: (I - J_g(z*))^T lambda = v, with matvec a VJP.
    g, z0 = deq_cell(batch=3, n=7)
    z_star = plain_iteration(g, z0, 1500).requires_grad_()
    gz = g(z_star)
    v = torch.randn(3, 7, generator=_gen(6), dtype=DTYPE)

    def matvec(lam):
        return lam - torch.autograd.grad(gz, z_star, lam, retain_graph=True)[0]
    result = gmres(matvec, v, rtol=1e-12)
    full = torch.autograd.functional.jacobian(g, z_star.detach())  # (3, 7, 3, 7), block diagonal
    J = torch.stack([full[i, :, i, :] for i in range(3)])
    expected = torch.linalg.solve((torch.eye(7, dtype=DTYPE) - J).mT, v)
    torch.testing.assert_close(result.x, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("call, error, pattern", [
    (lambda: gmres(lambda v: v, torch.ones(2, 3), tol=1e-3), TypeError, r"unknown keyword argument\(s\): 'tol'"),
    (lambda: gmres(lambda v: v[:, :2], torch.ones(2, 3)), ValueError,
     r"matvec output has shape \(2, 2\) but b has shape \(2, 3\)"),
    (lambda: gmres(lambda v: v.double(), torch.ones(2, 3)), TypeError, r"matvec output is torch.float64"),
    (lambda: gmres(lambda v: v, torch.ones(2, 3), rtol=0.0, atol=0.0), ValueError, r"rtol and atol are both zero"),
    (lambda: gmres(lambda v: v, torch.ones(2, 3, dtype=torch.long)), TypeError, r"real floating dtype"),
    (lambda: gmres(lambda v: v, torch.tensor(1.0)), ValueError, r"leading batch dimension"),
    (lambda: gmres(lambda v: v, torch.ones(2, 3), torch.ones(3, 2)), ValueError, r"x0 has shape \(3, 2\)"),
    (lambda: gmres(lambda v: v, torch.ones(2, 3), restart=0), ValueError, r"restart must be >= 1"),
    (lambda: gmres(lambda v: v, torch.ones(2, 3), orthogonalization="householder"), ValueError,
     r"orthogonalization must be one of 'mgs', 'cgs2'"),
])
def test_gmres_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_messages_do_not_leak_regex_specials():
    # The advice attached to every return code is a full sentence.
    for code in NonlinearReturnCode:
        assert re.match(r"^[a-z].*\.$", code.advice)


@pytest.mark.parametrize("damping", [1.0, 0.6])
@pytest.mark.parametrize("record_history", [False, True])
def test_residual_buffers_give_the_iterates_of_fresh_tensors(monkeypatch, damping, record_history):
    """FixedPointIteration lets nlsolve write every F = g(z) - z and its norms into one buffer each; with
    the solver's holds_no_iterates off, each is a new tensor. The solves agree bit for bit (the map sees
    the same iterates), and no tensor the map was given changes after its call."""
    rates = torch.linspace(0.1, 0.9, 7, dtype=torch.float64).unsqueeze(1)
    c = torch.randn(7, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    seen = []

    given = []

    def g(z):
        seen.append(z.clone())
        given.append((z, z.clone()))
        return rates * torch.tanh(z) + c

    solver = FixedPointIteration(damping=damping)
    kw = dict(abstol=1e-9, reltol=0.0, maxiters=400, record_history=record_history)
    buffered = nlsolve(g, torch.zeros(7, 4, dtype=torch.float64), solver, **kw)
    buffered_inputs, seen[:] = list(seen), []
    monkeypatch.setattr(FixedPointIteration, "holds_no_iterates", False)
    fresh = nlsolve(g, torch.zeros(7, 4, dtype=torch.float64), solver, **kw)
    assert buffered.success and len(set(buffered.sample_iterations.tolist())) > 3  # staggered freezing
    assert (buffered.iterations, buffered.nf) == (fresh.iterations, fresh.nf)
    assert len(buffered_inputs) == len(seen) == buffered.nf
    assert all(torch.equal(a, b) for a, b in zip(buffered_inputs, seen))
    assert all(torch.equal(z, copy) for z, copy in given)  # nothing g was given was changed afterwards
    for name in ("z", "residual", "relative_residual", "sample_iterations", "converged"):
        assert torch.equal(getattr(buffered, name), getattr(fresh, name)), name
    if record_history:
        assert torch.equal(buffered.residual_history, fresh.residual_history)
    # the residual returned is the one of the returned z, not a buffer a later solve overwrites
    again = nlsolve(g, torch.ones(7, 4, dtype=torch.float64), solver, **kw)
    expected = torch.linalg.vector_norm(g(buffered.z) - buffered.z, dim=1)
    torch.testing.assert_close(buffered.residual, expected, rtol=0, atol=1e-15)
    assert again.success


@pytest.mark.parametrize("solver", [FixedPointIteration(), Anderson(memory=3)], ids=repr)
def test_a_solution_reached_by_freezing_shares_memory_with_nothing_g_saw(solver):
    """The last steps of a staggered solve freeze rows into a tensor of the solve's own, which is returned
    without a copy; the solution must still share no memory with z0 or anything g received or returned."""
    rates = torch.linspace(0.1, 0.9, 6, dtype=torch.float64).unsqueeze(1)
    c = torch.randn(6, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    seen = []

    def g(z):
        out = rates * torch.tanh(z) + c
        seen.extend([z, out])
        return out

    z0 = torch.zeros(6, 3, dtype=torch.float64)
    sol = nlsolve(g, z0, solver, abstol=1e-10, reltol=0.0, maxiters=300)
    assert sol.success and len(set(sol.sample_iterations.tolist())) > 3
    assert sol.iterations > int(sol.sample_iterations.min())  # the solve went on with frozen rows
    storage = sol.z.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() != storage for t in [z0, *seen])
    torch.testing.assert_close(sol.residual, torch.linalg.vector_norm(g(sol.z) - sol.z, dim=1), rtol=0, atol=0)


def test_relative_residual_is_computed_on_access_with_its_zero_cases():
    """residual / ||z|| per element: inf where z = 0 and the residual is not, 0 where both are (and for a
    batch of size-0 elements); read from the solution when first asked, the same tensor after that."""
    shift = torch.tensor([[0.0, 0.0], [1.0, -2.0], [0.0, 0.0]], dtype=torch.float64)
    scale = torch.tensor([[0.0], [0.5], [1.0]], dtype=torch.float64)

    def g(z):
        return scale * z + shift

    # element 0: g = 0, so z0 = 0 is the fixed point (residual 0, ||z|| 0); element 1: a contraction;
    # element 2: g(z) = z, fixed everywhere, z0 = 0 included
    z0 = torch.zeros(3, 2, dtype=torch.float64)
    sol = nlsolve(g, z0, FixedPointIteration(), abstol=1e-12, reltol=0.0, maxiters=200)
    assert sol.success
    first = sol.relative_residual
    assert first is sol.relative_residual
    znorm = torch.linalg.vector_norm(sol.z, dim=1)
    assert first[0].item() == 0.0 and first[2].item() == 0.0  # residual 0 at z = 0
    assert first[1].item() == sol.residual[1].item() / znorm[1].item()
    # z = 0 with a non-zero residual: no iteration allowed, g(0) = shift
    stuck = nlsolve(lambda z: z + shift, z0, FixedPointIteration(), abstol=1e-12, reltol=0.0, maxiters=0,
                    on_failure="ignore")
    assert stuck.relative_residual.tolist() == [0.0, math.inf, 0.0]
    empty = nlsolve(g, torch.zeros(0, 2, dtype=torch.float64), FixedPointIteration())
    assert empty.relative_residual.shape == (0,)
    sized_zero = nlsolve(lambda z: z, torch.zeros(3, 0), FixedPointIteration())
    assert sized_zero.relative_residual.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_check_on_numpy_views_gives_the_solve_of_the_torch_check(monkeypatch, dtype):
    """On a CPU the fused convergence check compares and counts on NumPy views of its buffers; with those
    views off it uses torch operations. Staggered convergence, a non-monotone residual and NaN rows
    give the same solution bit for bit."""
    nlsolve_module = importlib.import_module("pylux.nonlinear.nlsolve")
    J = torch.tensor([[0.5, 4.0], [0.0, 0.5]], dtype=dtype)
    scale = torch.tensor([1.0, 0.3, 0.1, 1e-3, 0.2, 0.7], dtype=dtype).unsqueeze(1)
    c = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [3.0, -1.0], [0.5, 0.5], [2.0, 0.0]], dtype=dtype)

    def g(z):
        out = scale * (z @ J.t()) + c
        out[5] = out[5] + torch.sqrt(z[5, :1] - 1.0)  # NaN from the first step (z = 0 under the root)
        return out

    def solve():
        return nlsolve(g, torch.zeros(6, 2, dtype=dtype), FixedPointIteration(), abstol=1e-5, reltol=0.0,
                       maxiters=40, record_history=False, on_failure="ignore")

    views = solve()
    monkeypatch.setattr(nlsolve_module, "_HOST_DTYPES", ())
    plain = solve()
    assert views.retcode is plain.retcode is NonlinearReturnCode.Unstable
    assert views.unstable.tolist() == [False] * 5 + [True]
    assert (views.iterations, views.nf) == (plain.iterations, plain.nf)
    for name in ("z", "residual", "converged", "sample_iterations", "unstable"):
        a, b = getattr(views, name), getattr(plain, name)
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)), name
