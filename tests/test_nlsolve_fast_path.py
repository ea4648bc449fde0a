"""The fused convergence check of ``nlsolve`` (``check_every=1``) against the general one, bitwise.

With a check every iteration, ``nlsolve`` derives ``converged`` and the iteration
of convergence at the check and freezes elements by copying rows; the general
check (``check_every > 1``, or ``_FUSED_CHECK`` off) tracks them in every step
and freezes with ``torch.where``. Both must return the same solution, bit for
bit: per-sample ``z``, residuals, flags, iteration counts, history and messages.
"""

import importlib

import pytest
import torch

from pylux.nonlinear import (Anderson, Broyden, FixedPointIteration, LimitedMemoryBroyden, NewtonKrylov,
                             NonlinearReturnCode, NonlinearSolveError, nlsolve)

nlsolve_module = importlib.import_module("pylux.nonlinear.nlsolve")

SOLVERS = [FixedPointIteration(), FixedPointIteration(damping=0.7), Anderson(memory=4), Broyden(),
           LimitedMemoryBroyden(), NewtonKrylov()]


def _solve(fused, monkeypatch, g, z0, solver, **kwargs):
    monkeypatch.setattr(nlsolve_module, "_FUSED_CHECK", fused)
    return nlsolve(g, z0, solver, **kwargs)


def _same(a, b):
    assert a.retcode is b.retcode
    assert (a.iterations, a.nf) == (b.iterations, b.nf)
    for name in ("z", "residual", "relative_residual", "converged", "sample_iterations", "unstable"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(torch.nan_to_num(x), torch.nan_to_num(y)), name
        assert torch.equal(torch.isnan(x), torch.isnan(y)), name
    if a.residual_history is None:
        assert b.residual_history is None
    else:
        assert torch.equal(torch.isnan(a.residual_history), torch.isnan(b.residual_history))
        assert torch.equal(torch.nan_to_num(a.residual_history), torch.nan_to_num(b.residual_history))


def _spread(dtype, batch=9):
    """Per-sample contractions z = a_b z + c_b with rates 0.05 .. 0.9: each element converges at its own iteration."""
    gen = torch.Generator().manual_seed(3)
    rates = torch.linspace(0.05, 0.9, batch, dtype=torch.float64).to(dtype).unsqueeze(1)
    c = torch.randn(batch, 5, generator=gen, dtype=torch.float64).to(dtype)
    return (lambda z: rates * torch.tanh(z) + c), torch.zeros(batch, 5, dtype=dtype)


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("record_history", [False, True])
def test_staggered_convergence_is_bitwise_the_general_path(monkeypatch, solver, dtype, record_history):
    g, z0 = _spread(dtype)
    kw = dict(abstol=1e-5, reltol=0.0, maxiters=200, record_history=record_history)
    fused = _solve(True, monkeypatch, g, z0, solver, **kw)
    general = _solve(False, monkeypatch, g, z0, solver, **kw)
    assert fused.success
    # The elements converged at different iterations, so freezing took part.
    assert len(set(fused.sample_iterations.tolist())) > 2
    _same(fused, general)


@pytest.mark.parametrize("solver", SOLVERS[:4], ids=repr)
def test_relative_tolerance_is_bitwise_the_general_path(monkeypatch, solver):
    g, z0 = _spread(torch.float64)
    kw = dict(abstol=1e-9, reltol=1e-6, maxiters=200)
    _same(_solve(True, monkeypatch, g, z0, solver, **kw), _solve(False, monkeypatch, g, z0, solver, **kw))


def _with_nan_rows(dtype):
    """Rows 0..5 contract at various rates; row 6 drifts by 0.4 per step into sqrt of a negative
    number (NaN at iteration 4); row 7 drifts by 0.7 (NaN at iteration 3); row 8 is NaN at z0."""
    g_ok, z0 = _spread(dtype)
    drift = torch.tensor([0.0] * 6 + [0.4, 0.7, 0.0], dtype=dtype).unsqueeze(1)
    bad = drift > 0

    def g(z):
        out = torch.where(bad, z + drift + 0.0 * torch.sqrt(1.5 - z), g_ok(z))
        out = out.clone()
        out[8] = out[8] + torch.sqrt(torch.tensor(-1.0, dtype=dtype))
        return out
    return g, z0


@pytest.mark.parametrize("solver", SOLVERS[:4], ids=repr)
@pytest.mark.parametrize("record_history", [False, True])
def test_nan_elements_are_bitwise_the_general_path(monkeypatch, solver, record_history):
    g, z0 = _with_nan_rows(torch.float32)
    kw = dict(abstol=1e-5, reltol=0.0, maxiters=200, record_history=record_history, on_failure="ignore")
    fused = _solve(True, monkeypatch, g, z0, solver, **kw)
    general = _solve(False, monkeypatch, g, z0, solver, **kw)
    assert fused.retcode is NonlinearReturnCode.Unstable
    assert fused.unstable.tolist() == [False] * 6 + [True] * 3
    assert fused.converged[:6].all()
    assert torch.isfinite(fused.z).all()
    if isinstance(solver, FixedPointIteration) and solver.damping == 1.0:
        # Row 6 is 1.6 after 4 steps, so g of it (iteration 4's residual) is NaN; row 7 at 2.1 after 3.
        assert fused.sample_iterations[6:].tolist() == [4, 3, 0]
    _same(fused, general)

    kw["on_failure"] = "raise"
    with pytest.raises(NonlinearSolveError) as fused_error:
        _solve(True, monkeypatch, g, z0, solver, **kw)
    with pytest.raises(NonlinearSolveError) as general_error:
        _solve(False, monkeypatch, g, z0, solver, **kw)
    assert str(fused_error.value) == str(general_error.value)
    assert fused_error.value.iteration == general_error.value.iteration == 0


@pytest.mark.parametrize("record_history", [False, True])
def test_non_monotone_residual_keeps_the_best_iterate_bitwise(monkeypatch, record_history):
    # A non-normal linear contraction: ||F|| first grows (by up to ~4x), so the best iterate of the
    # unconverged elements lags behind the current one when maxiters stops the solve.
    J = torch.tensor([[0.5, 4.0], [0.0, 0.5]], dtype=torch.float64)
    c = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [3.0, -1.0]], dtype=torch.float64)
    scale = torch.tensor([1.0, 0.3, 0.1, 1e-3], dtype=torch.float64).unsqueeze(1)

    def g(z):
        return scale * (z @ J.t()) + c

    z0 = torch.zeros(4, 2, dtype=torch.float64)
    kw = dict(abstol=1e-5, reltol=0.0, maxiters=3, record_history=record_history, on_failure="ignore")
    fused = _solve(True, monkeypatch, g, z0, FixedPointIteration(), **kw)
    general = _solve(False, monkeypatch, g, z0, FixedPointIteration(), **kw)
    assert fused.retcode is NonlinearReturnCode.MaxIters
    assert fused.converged.tolist() == [False, False, False, True]
    assert fused.sample_iterations.tolist() == [3, 3, 3, 2]
    # Element 0's residual grew from z0 (||c|| = sqrt 2, then 4.53, 4.26, 3.13): the best is z0 itself.
    assert torch.equal(fused.z[0], z0[0])
    assert fused.residual[0].item() == pytest.approx(2 ** 0.5, rel=1e-15)
    _same(fused, general)


def test_check_every_one_matches_a_check_every_step_of_the_general_path(monkeypatch):
    # The general path with check_every=1 is the reference; check_every=2 freezes from the start and
    # may step past convergence, so only the converged values (not the counts) need agree with it.
    g, z0 = _spread(torch.float64)
    one = _solve(True, monkeypatch, g, z0, FixedPointIteration(), abstol=1e-6, reltol=0.0)
    two = _solve(True, monkeypatch, g, z0, FixedPointIteration(), abstol=1e-6, reltol=0.0, check_every=2)
    assert torch.equal(one.z, two.z)
    assert torch.equal(one.sample_iterations, two.sample_iterations)
    assert two.iterations >= one.iterations


def test_converged_solution_does_not_alias_z0_or_g_output():
    z0 = torch.ones(3, 2)
    out = torch.ones(3, 2)
    sol = nlsolve(lambda z: out, z0, FixedPointIteration(), abstol=1e-6, maxiters=5)
    assert sol.success and sol.iterations == 0
    sol.z.add_(1.0)
    assert torch.equal(z0, torch.ones(3, 2)) and torch.equal(out, torch.ones(3, 2))
    sol = nlsolve(lambda z: out, torch.zeros(3, 2), FixedPointIteration(), abstol=1e-6, maxiters=5)
    assert sol.success and sol.iterations == 1
    sol.z.add_(1.0)
    assert torch.equal(out, torch.ones(3, 2))


def test_large_finite_z0_whose_sum_overflows_is_accepted():
    # The one-pass finiteness test of z0 overflows to inf here; the per-element test must decide.
    big = torch.finfo(torch.float32).max
    z0 = torch.full((2, 4), big)
    sol = nlsolve(lambda z: 0.5 * z, z0, FixedPointIteration(), abstol=1e-6, reltol=1e-6, maxiters=3,
                  on_failure="ignore")
    assert sol.iterations == 3
    bad = z0.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf in batch elements \[1\]"):
        nlsolve(lambda z: 0.5 * z, bad, FixedPointIteration())
