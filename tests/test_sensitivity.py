"""Gradients through solve(): every sensitivity algorithm against finite differences and each other."""

import pytest
import torch

import pylux as lx
from pylux.sensitivity import (BacksolveAdjoint, DirectAdjoint, HiddenParameterError, InterpolatingAdjoint,
                               QuadratureAdjoint, ReversibleAdjoint)

F64 = torch.float64


def field(u, p, t):
    return torch.tanh(u @ p["W"].T + p["b"]) * (1 + t)


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (0.5 * torch.randn(3, 3, generator=g, dtype=F64)).requires_grad_(True)
    b = torch.randn(3, generator=g, dtype=F64).requires_grad_(True)
    u0 = torch.randn(2, 3, generator=g, dtype=F64).requires_grad_(True)
    return u0, W, b


def loss_fn(u0, W, b, alg, tspan=(0.0, 1.0), saveat=(0.3, 0.7, 1.0), with_solution=False):
    prob = lx.ODEProblem(field, u0, tspan, {"W": W, "b": b})
    sol = lx.solve(prob, lx.Tsit5(), reltol=1e-10, abstol=1e-10, saveat=list(saveat), sensealg=alg)
    weights = torch.arange(1, len(saveat) + 1, dtype=F64).view(-1, 1, 1)
    loss = (weights * sol.u ** 2).sum()
    return (loss, sol) if with_solution else loss


def finite_difference(fun, x, eps=1e-6):
    grad = torch.zeros_like(x)
    flat = x.detach().clone().reshape(-1)
    for i in range(flat.numel()):
        for sign in (1, -1):
            shifted = flat.clone()
            shifted[i] += sign * eps
            grad.view(-1)[i] += sign * fun(shifted.view(x.shape)).item() / (2 * eps)
    return grad


@pytest.mark.parametrize("alg", [DirectAdjoint(), BacksolveAdjoint(), BacksolveAdjoint(seminorm=True),
                                 InterpolatingAdjoint(), InterpolatingAdjoint(seminorm=True),
                                 InterpolatingAdjoint(checkpointing=True), InterpolatingAdjoint(checkpointing=5),
                                 QuadratureAdjoint(), ReversibleAdjoint()],
                         ids=repr)
@pytest.mark.parametrize("tspan,saveat", [((0.0, 1.0), (0.3, 0.7, 1.0)), ((1.0, -0.5), (0.6, 0.1, -0.5))])
def test_gradients_match_finite_differences(alg, tspan, saveat):
    u0, W, b = make_inputs()
    grads = torch.autograd.grad(loss_fn(u0, W, b, alg, tspan, saveat), [u0, W, b])
    with torch.no_grad():
        fd_u0 = finite_difference(lambda x: loss_fn(x, W, b, None, tspan, saveat), u0)
        fd_W = finite_difference(lambda x: loss_fn(u0, x, b, None, tspan, saveat), W)
        fd_b = finite_difference(lambda x: loss_fn(u0, W, x, None, tspan, saveat), b)
    for g, ref in zip(grads, (fd_u0, fd_W, fd_b)):
        assert ref.abs().max() > 1e-2  # a zero reference would prove nothing
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)


def test_backsolve_agrees_with_direct():
    u0, W, b = make_inputs(1)
    direct = torch.autograd.grad(loss_fn(u0, W, b, DirectAdjoint()), [u0, W, b])
    for alg in (BacksolveAdjoint(), BacksolveAdjoint(seminorm=True), InterpolatingAdjoint(),
                InterpolatingAdjoint(checkpointing=[0.1, 0.5, 0.9]), QuadratureAdjoint()):
        back = torch.autograd.grad(loss_fn(u0, W, b, alg), [u0, W, b])
        for g, ref in zip(back, direct):
            torch.testing.assert_close(g, ref, rtol=1e-7, atol=1e-8)


def test_seminorm_needs_fewer_backward_evaluations():
    u0, W, b = make_inputs(2)
    counts = {}
    for seminorm in (False, True):
        alg = BacksolveAdjoint(seminorm=seminorm)
        loss, sol = loss_fn(u0, W, b, alg, with_solution=True)
        torch.autograd.grad(loss, [u0, W, b])
        counts[seminorm] = sol.backward_stats["nf"]
    assert counts[True] < counts[False], counts


def test_forward_values_unchanged_by_sensealg():
    u0, W, b = make_inputs(3)
    prob = lx.ODEProblem(field, u0, (0.0, 1.0), {"W": W, "b": b})
    ref = lx.solve(prob, lx.Tsit5(), saveat=[0.5, 1.0])
    back = lx.solve(prob, lx.Tsit5(), saveat=[0.5, 1.0], sensealg=BacksolveAdjoint())
    torch.testing.assert_close(back.u, ref.u.detach())
    assert back.stats.naccept == ref.stats.naccept


def test_unused_parameter_gets_exact_zero_gradient():
    u0, W, b = make_inputs(4)
    unused = torch.ones(2, dtype=F64, requires_grad=True)
    prob = lx.ODEProblem(field, u0, (0.0, 1.0), {"W": W, "b": b, "unused": unused})
    sol = lx.solve(prob, lx.Tsit5(), saveat=[1.0], sensealg=BacksolveAdjoint())
    g_unused, g_b = torch.autograd.grad(sol.u.sum(), [unused, b])
    assert torch.equal(g_unused, torch.zeros(2, dtype=F64))
    assert g_b.abs().max() > 0


def test_parameter_hidden_in_closure_is_an_error():
    u0, W, b = make_inputs(5)
    hidden = torch.tensor(0.5, dtype=F64, requires_grad=True)
    prob = lx.ODEProblem(lambda u, p, t: field(u, p, t) * hidden, u0, (0.0, 1.0), {"W": W, "b": b})
    sol = lx.solve(prob, lx.Tsit5(), saveat=[1.0], sensealg=BacksolveAdjoint())
    with pytest.raises(HiddenParameterError, match="not part of the problem's parameters p"):
        sol.u.sum().backward()


def test_sensealg_must_be_an_algorithm():
    u0, W, b = make_inputs(6)
    prob = lx.ODEProblem(field, u0, (0.0, 1.0), {"W": W, "b": b})
    with pytest.raises(TypeError, match="sensealg must be a sensitivity algorithm"):
        lx.solve(prob, lx.Tsit5(), sensealg="backsolve")


@pytest.mark.parametrize("sensealg", [None, lx.BacksolveAdjoint(), lx.InterpolatingAdjoint(), lx.QuadratureAdjoint(),
                                      lx.ReversibleAdjoint(), lx.DirectAdjoint(checkpoints=2)],
                         ids=["none", "backsolve", "interpolating", "quadrature", "reversible", "checkpointed"])
def test_a_solve_that_saves_nothing_backpropagates_zero_gradients(sensealg):
    """Regression (diffrax's SaveAt(t0=False, t1=False, ts=...) cases): saveat=[t1] with save_end=False
    saves no row; backpropagating through the empty output raised IndexError under the continuous adjoints
    and 'does not require grad' without one. Every gradient is exactly zero."""
    u0 = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
    p = torch.tensor([0.7], dtype=F64, requires_grad=True)
    sol = lx.solve(lx.ODEProblem(lambda u, p, t: -p * u, u0, (0.0, 1.0), p), lx.Tsit5(), saveat=[1.0],
                   save_end=False, sensealg=sensealg)
    assert sol.u.shape == (0, 2) and sol.t.numel() == 0
    g_u0, g_p = torch.autograd.grad(sol.u.sum(), (u0, p), allow_unused=True)
    assert torch.equal(g_u0, torch.zeros(2, dtype=F64))
    assert g_p is None or torch.equal(g_p, torch.zeros(1, dtype=F64))


def test_reversible_adjoint_refuses_a_backward_pass_that_cannot_rebuild_the_forward_solve():
    """Regression (SciMLSensitivity's Lotka–Volterra adjoint case with coupling 0.5): the inverse step divides
    by the coupling, so over many steps the reconstruction's round-off grows like coupling ** -n and the
    gradients came back NaN (or garbage) without an error."""
    p = torch.tensor([0.3], dtype=F64, requires_grad=True)
    prob = lx.ODEProblem(lambda u, p, t: p * torch.sin(u), torch.ones(2, dtype=F64), (0.0, 1.0), p)
    kw = dict(dt=1.0 / 200, adaptive=False, saveat=[1.0])
    sol = lx.solve(prob, lx.RK4(), sensealg=lx.ReversibleAdjoint(), **kw)
    g_rev, = torch.autograd.grad(sol.u.sum(), p)
    g_direct, = torch.autograd.grad(lx.solve(prob, lx.RK4(), **kw).u.sum(), p)
    torch.testing.assert_close(g_rev, g_direct, rtol=1e-3, atol=0)
    for steps, nan in ((200, ""), (1200, " and the gradient is NaN/Inf")):
        sol = lx.solve(prob, lx.RK4(), dt=1.0 / steps, adaptive=False, saveat=[1.0],
                       sensealg=lx.ReversibleAdjoint(coupling=0.5))
        with pytest.raises(FloatingPointError, match=r"could not rebuild the forward solve: .* misses u0 by .*"
                                                     + nan.replace("/", ".") + r".*0.5 \*\* -" + str(steps)) as err:
            torch.autograd.grad(sol.u.sum(), p)
        assert ("NaN" in str(err.value)) == bool(nan)
    # a NaN from f's own derivative, with the states rebuilt, is named as such (sqrt's derivative at 0)
    q = torch.tensor([0.0], dtype=F64, requires_grad=True)
    root = lx.ODEProblem(lambda u, q, t: -u + torch.sqrt(q), torch.ones(2, dtype=F64), (0.0, 1.0), q)
    sol = lx.solve(root, lx.RK4(), sensealg=lx.ReversibleAdjoint(), **kw)
    with pytest.raises(FloatingPointError, match="gradient is NaN/Inf although the backward pass rebuilt"):
        torch.autograd.grad(sol.u.sum(), q)
