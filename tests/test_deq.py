"""Deep equilibrium models: implicit gradients, DEQ / SkipDEQ / MultiScaleDEQ layers (float64)."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

import pylux as lx
from pylux.nonlinear import Broyden, ConvergenceWarning, NonlinearSolveError, nlsolve
from pylux.sensitivity import HiddenParameterError, JacobianFreeBackprop, SteadyStateAdjoint

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ the sensitivity algorithms alone

def cell_problem(batch=3, n=5, norm=0.8, seed=0):
    """f(z, x) = tanh(W z + U x + b) with ||W||_2 = norm (a contraction), parameters requiring grad."""
    gen = _gen(seed)
    W = torch.randn(n, n, generator=gen, dtype=F64)
    W = W * (norm / torch.linalg.matrix_norm(W, 2))
    ps = {"W": W, "U": torch.randn(n, n, generator=gen, dtype=F64) / math.sqrt(n),
          "b": 0.3 * torch.randn(n, generator=gen, dtype=F64)}
    x = torch.randn(batch, n, generator=gen, dtype=F64)
    for t in (*ps.values(), x):
        t.requires_grad_(True)
    return ps, x


def cell(z, x, ps):
    return torch.tanh(z @ ps["W"].T + x @ ps["U"].T + ps["b"])


def tight_fixed_point(ps, x):
    detached = {k: v.detach() for k, v in ps.items()}
    sol = nlsolve(lambda z: cell(z, x.detach(), detached), torch.zeros_like(x.detach()), Broyden(),
                  abstol=1e-14, reltol=0.0, maxiters=200)
    assert sol.success
    return sol.z


def cubic_loss(z):
    weights = torch.linspace(0.5, 1.5, z.shape[-1], dtype=z.dtype)
    return (weights * z ** 3).sum() + z.sum()


def implicit_loss(alg, ps, x):
    return cubic_loss(alg.attach_gradient(cell, tight_fixed_point(ps, x), x, ps))


def test_steady_state_adjoint_matches_central_finite_differences():
    ps, x = cell_problem()
    leaves = [x, *ps.values()]
    grads = torch.autograd.grad(implicit_loss(SteadyStateAdjoint(tol=1e-12), ps, x), leaves)
    h = 1e-6
    for leaf, grad in zip(leaves, grads):
        numeric = torch.zeros_like(leaf)
        flat = numeric.view(-1)
        for i in range(leaf.numel()):
            with torch.no_grad():
                leaf.view(-1)[i] += h
                up = cubic_loss(tight_fixed_point(ps, x))
                leaf.view(-1)[i] -= 2 * h
                down = cubic_loss(tight_fixed_point(ps, x))
                leaf.view(-1)[i] += h
            flat[i] = (up - down) / (2 * h)
        torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)


def test_steady_state_adjoint_matches_backprop_through_200_iterations():
    ps, x = cell_problem(seed=1)
    leaves = [x, *ps.values()]
    alg = SteadyStateAdjoint(tol=1e-12)
    implicit = torch.autograd.grad(implicit_loss(alg, ps, x), leaves)
    z = torch.zeros_like(x)
    for _ in range(200):
        z = cell(z, x, ps)
    unrolled = torch.autograd.grad(cubic_loss(z), leaves)
    for a, b in zip(implicit, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    stats = alg.last_backward_stats
    assert stats["converged"] and 0 < stats["iterations"] <= 5 * 5 and stats["residual"] <= 1e-12


def test_jacobian_free_backprop_is_one_step_of_backprop_at_the_fixed_point():
    ps, x = cell_problem(seed=2)
    leaves = [x, *ps.values()]
    z_star = tight_fixed_point(ps, x)
    jfb = torch.autograd.grad(cubic_loss(JacobianFreeBackprop().attach_gradient(cell, z_star, x, ps)), leaves)
    z_leaf = z_star.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(cubic_loss(z_leaf), [z_leaf])
    one_step = torch.autograd.grad(cell(z_star.detach(), x, ps), leaves, grad_outputs=g)
    for a, b in zip(jfb, one_step):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    exact = torch.autograd.grad(implicit_loss(SteadyStateAdjoint(tol=1e-12), ps, x), leaves)
    assert not torch.allclose(jfb[1], exact[1], rtol=1e-3)  # JFB is a different direction, not the gradient


def test_unused_parameter_gets_exact_zero_gradient_and_forward_is_identity():
    ps, x = cell_problem(seed=3)
    ps["unused"] = torch.ones(2, dtype=F64, requires_grad=True)
    z_star = tight_fixed_point(ps, x)
    z = SteadyStateAdjoint(tol=1e-10).attach_gradient(cell, z_star, x, ps)
    torch.testing.assert_close(z, z_star, rtol=0, atol=0)
    (g,) = torch.autograd.grad(cubic_loss(z), [ps["unused"]])
    assert torch.equal(g, torch.zeros(2, dtype=F64))


def test_gmres_non_convergence_warns_or_raises_with_the_residual():
    ps, x = cell_problem(norm=0.95, seed=4, n=8)
    z_star = tight_fixed_point(ps, x)
    with pytest.warns(ConvergenceWarning, match=r"GMRES .* stopped after 1 iterations with relative residual"):
        torch.autograd.grad(cubic_loss(SteadyStateAdjoint(maxiters=1, restart=1, tol=1e-12)
                                       .attach_gradient(cell, z_star, x, ps)), [ps["W"]])
    with pytest.raises(NonlinearSolveError, match="relative residual"):
        torch.autograd.grad(cubic_loss(SteadyStateAdjoint(maxiters=1, restart=1, tol=1e-12, on_failure="raise")
                                       .attach_gradient(cell, z_star, x, ps)), [ps["W"]])


@pytest.mark.parametrize("alg_type", [SteadyStateAdjoint, JacobianFreeBackprop])
def test_backward_at_a_point_that_is_not_a_fixed_point_is_flagged(alg_type):
    ps, x = cell_problem(seed=5)
    z_bad = torch.zeros_like(x.detach())
    residual = torch.linalg.vector_norm(cell(z_bad, x, ps).detach(), dim=1)
    z = alg_type().attach_gradient(cell, z_bad, x, ps, converged=False, residual=residual, where="test")
    with pytest.warns(ConvergenceWarning, match="not a fixed point.*" + re.escape(f"{float(residual.max()):.3e}")):
        torch.autograd.grad(cubic_loss(z), [ps["b"]])
    z = alg_type(on_failure="raise").attach_gradient(cell, z_bad, x, ps, converged=False, residual=residual)
    with pytest.raises(NonlinearSolveError, match="not a fixed point"):
        torch.autograd.grad(cubic_loss(z), [ps["b"]])


def test_nan_in_the_adjoint_raises():
    ps, x = cell_problem(seed=6)
    z = SteadyStateAdjoint().attach_gradient(cell, tight_fixed_point(ps, x), x, ps)
    with pytest.raises(NonlinearSolveError, match="NaN/Inf"):
        torch.autograd.grad((z * float("nan")).sum(), [ps["W"]])


def test_parameter_hidden_in_a_closure_is_an_error():
    ps, x = cell_problem(seed=7)
    hidden = torch.zeros(5, dtype=F64, requires_grad=True)

    def leaky(z, x, ps):
        return cell(z, x, ps) + 0.0 * hidden

    z = SteadyStateAdjoint().attach_gradient(leaky, tight_fixed_point(ps, x), x, ps)
    with pytest.raises(HiddenParameterError):
        torch.autograd.grad(z.sum(), [ps["W"]])


def test_misspelt_sensitivity_options_are_rejected_by_name():
    with pytest.raises(TypeError, match="did you mean 'restart'"):
        SteadyStateAdjoint(restrat=10)
    with pytest.raises(TypeError, match="did you mean 'on_failure'"):
        JacobianFreeBackprop(on_falure="raise")
    with pytest.raises(ValueError, match="on_failure"):
        SteadyStateAdjoint(on_failure="explode")
    with pytest.raises(ValueError, match="tol"):
        SteadyStateAdjoint(tol=-1.0)
