"""ESDIRK Newton iteration: a Jacobian kept across steps is checked along the step (regression for the
under-controlled Van der Pol transition of Kvaerno5), and the implicit-function-theorem gradient of the
stage solves."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import pylux as lx
from test_stiff import _fd, _grad_problem, _loss  # noqa: E402  (the shared gradient problem)

DT = torch.float64
MU = 1000.0
#: Van der Pol (mu = 1000) at t = 800 from u(0) = (2, 0) (scipy Radau, rtol = atol = 1e-12): seven time units
#: before the fast transition at t ~ 807
VDP_AT_800 = (1.0839233646676154, -0.0061952338632637275)


def vdp(u, p, t):
    return torch.stack([u[1], p * (1 - u[0] ** 2) * u[1] - u[0]])


def vdp_np(t, u):
    return [u[1], MU * (1 - u[0] ** 2) * u[1] - u[0]]


def test_kvaerno5_controls_the_error_across_the_van_der_pol_transition():
    """Across the transition (t in [800, 850]) at 1e-5: error 4.2e-6 (tol times the scaled error) with the
    step-direction check, 1.1e-4 without it, where the Jacobian formed inside the transition was kept for
    the slow manifold after it and its stages passed Newton's test with errors of tens of tolerances."""
    tol, span = 1e-5, (0.0, 50.0)
    ref = solve_ivp(vdp_np, span, VDP_AT_800, method="Radau", rtol=1e-12, atol=1e-12).y[:, -1]
    sol = lx.solve(lx.ODEProblem(vdp, torch.tensor(VDP_AT_800, dtype=DT), span, MU), lx.Kvaerno5(),
                   reltol=tol, abstol=tol, save_everystep=False)
    err = np.max(np.abs(sol.u[-1].numpy() - ref) / (np.abs(ref) + 1.0))
    assert err < 2 * tol
    rel = np.max(np.abs(sol.u[-1].numpy() - ref) / np.abs(ref))
    assert rel < 1e-4   # 2.3e-2 before (the slow velocity u[1] ~ 6e-4 is off by its own size)


@pytest.mark.parametrize("solver", [lx.Kvaerno5, lx.TRBDF2])
def test_exact_jacobian_of_a_forced_linear_field_is_kept(solver):
    """u' = A u + (sin 3t, cos t): J = A is exact everywhere, and the step-direction check takes the
    field's secant at a fixed time, so the time dependence never looks like a stale Jacobian: one
    Jacobian for the whole adaptive solve."""
    A = torch.tensor([[-1.0, 0.0], [50.0, -500.0]], dtype=DT)

    def f(u, p, t):
        return A @ u + torch.stack([torch.sin(3 * t), torch.cos(t)]).to(u.dtype)

    sol = lx.solve(lx.ODEProblem(f, torch.tensor([1.0, 0.0], dtype=DT), (0.0, 5.0)), solver(), reltol=1e-6,
                   abstol=1e-8, save_everystep=False)
    ref = solve_ivp(lambda t, u: A.numpy() @ u + np.array([np.sin(3 * t), np.cos(t)]), (0.0, 5.0), [1.0, 0.0],
                    method="Radau", rtol=1e-11, atol=1e-13).y[:, -1]
    assert sol.stats.njac == 1 and sol.stats.naccept > 20
    assert np.abs(sol.u[-1].numpy() - ref).max() < 1e-5


# --- the implicit-function-theorem gradient of the stage solves ------------------------------------

P0, U0 = (20.0, 30.0), (1.0, 0.5)


def _direct_grads(solver, **kw):
    p = torch.tensor(P0, dtype=DT, requires_grad=True)
    u0 = torch.tensor(U0, dtype=DT, requires_grad=True)
    return torch.autograd.grad(_loss(solver, p, u0, sensealg=lx.DirectAdjoint(), **kw), (p, u0))


#: Newton converged to rounding: the solve's map is then the exact stage solution, which the implicit
#: gradient differentiates (at looser tolerances finite differences see the truncated iteration instead)
TIGHT = dict(dt=0.05, adaptive=False, reltol=1e-12, abstol=1e-12)


@pytest.mark.parametrize("solver", [lx.TRBDF2, lx.ImplicitEuler, lx.Kvaerno5])
def test_implicit_stage_gradient_matches_finite_differences(solver):
    gp, gu = _direct_grads(solver(max_newton_iters=50), **TIGHT)
    p, u0 = torch.tensor(P0, dtype=DT), torch.tensor(U0, dtype=DT)
    with torch.no_grad():
        fp = _fd(lambda x: _loss(solver(max_newton_iters=50), x, u0, **TIGHT), p)
        fu = _fd(lambda x: _loss(solver(max_newton_iters=50), p, x, **TIGHT), u0)
    assert torch.allclose(gp, fp, rtol=1e-5, atol=1e-12)
    assert torch.allclose(gu, fu, rtol=1e-5, atol=1e-12)


def _relative_gap(solver, tol):
    kw = dict(dt=0.05, adaptive=False, reltol=tol, abstol=tol)
    implicit = torch.cat(_direct_grads(solver(max_newton_iters=50), **kw))
    unrolled = torch.cat(_direct_grads(solver(max_newton_iters=50, newton_gradient="unrolled"), **kw))
    return float(((implicit - unrolled).abs() / unrolled.abs()).max())


@pytest.mark.parametrize("solver", [lx.Kvaerno5, lx.TRBDF2])
def test_implicit_and_unrolled_gradients_agree_to_the_newton_tolerance(solver):
    """The unrolled gradient is that of the Newton iteration actually run, the implicit one that of the
    exact stage solution: their gap shrinks with the Newton tolerance (measured: 1.3e-5 / 4.9e-5 at
    1e-10, 1.3e-7 / 4.8e-7 at 1e-12 for Kvaerno5 / TRBDF2)."""
    loose, tight = _relative_gap(solver, 1e-10), _relative_gap(solver, 1e-12)
    assert loose < 1e-4 and tight < 2e-6
    assert loose > 20 * tight


def _saved_bytes(solver, kappa, monkeypatch):
    import pylux.diffeq.implicit as implicit
    monkeypatch.setattr(implicit, "KAPPA", kappa)
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x

    p = torch.tensor(P0, dtype=DT, requires_grad=True)
    u0 = torch.tensor(U0, dtype=DT, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        sol = lx.solve(_grad_problem(p, u0), solver, dt=0.05, adaptive=False, sensealg=lx.DirectAdjoint(),
                       save_everystep=False)
    torch.autograd.grad(sol.u[-1].sum(), (p, u0))
    return total[0], sol.stats.nnonliniter


def test_saved_memory_does_not_grow_with_the_newton_iterations(monkeypatch):
    """DirectAdjoint through Kvaerno5: a tighter Newton tolerance (KAPPA 1e-2 -> 1e-8) takes more
    iterations; the implicit gradient saves the same bytes, the unrolled one more."""
    small, iters_small = _saved_bytes(lx.Kvaerno5(), 1e-2, monkeypatch)
    large, iters_large = _saved_bytes(lx.Kvaerno5(), 1e-8, monkeypatch)
    assert iters_large > 1.3 * iters_small
    assert small == large
    unrolled_small, _ = _saved_bytes(lx.Kvaerno5(newton_gradient="unrolled"), 1e-2, monkeypatch)
    unrolled_large, _ = _saved_bytes(lx.Kvaerno5(newton_gradient="unrolled"), 1e-8, monkeypatch)
    assert unrolled_large > unrolled_small > small


def test_newton_gradient_option_is_validated_and_second_derivatives_need_unrolled():
    with pytest.raises(ValueError, match="newton_gradient"):
        lx.Kvaerno5(newton_gradient="adjoint")
    p = torch.tensor(P0, dtype=DT, requires_grad=True)
    u0 = torch.tensor(U0, dtype=DT)
    loss = _loss(lx.Kvaerno5(), p, u0, dt=0.05, adaptive=False, sensealg=lx.DirectAdjoint())
    with pytest.raises(RuntimeError, match="newton_gradient='unrolled'"):
        torch.autograd.grad(loss, p, create_graph=True)
    loss = _loss(lx.Kvaerno5(newton_gradient="unrolled"), p, u0, dt=0.05, adaptive=False,
                 sensealg=lx.DirectAdjoint())
    (g,) = torch.autograd.grad(loss, p, create_graph=True)
    (h,) = torch.autograd.grad(g[0], p)
    assert torch.isfinite(h).all()


def test_implicit_stage_gradient_with_a_matrix_free_newton_matrix():
    """matrix_free: the backward's transposed system by GMRES on vector-Jacobian products; the gradient
    agrees with the dense one."""
    kw = dict(TIGHT, sensealg=lx.DirectAdjoint())
    grads = []
    for structure in ("dense", "matrix_free"):
        p = torch.tensor(P0, dtype=DT, requires_grad=True)
        u0 = torch.tensor(U0, dtype=DT, requires_grad=True)
        loss = _loss(lx.TRBDF2(jac_structure=structure, krylov_rtol=1e-12, max_newton_iters=50), p, u0, **kw)
        grads.append(torch.cat(torch.autograd.grad(loss, (p, u0))))
    assert torch.allclose(grads[0], grads[1], rtol=1e-8, atol=0.0)


# --- the batched autodiff Jacobian -----------------------------------------------------------------

class _HostReadCube(torch.autograd.Function):
    """x^3 whose backward reads its cotangent on the host: vmap has no batching rule for that."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if float(g.abs().max()) == 0.0:
            return torch.zeros_like(x)
        return 3.0 * g * x ** 2


@pytest.mark.parametrize("structure", ["dense", "batched"])
def test_autodiff_jacobian_without_a_batching_rule_falls_back_to_row_passes(structure):
    """The Jacobian of f(u) = -A u - u^3 (the cube through a backward vmap cannot batch) equals the
    closed form -A - 3 diag(u^2), with f_t = 0 from the same passes (dense)."""
    from pylux.diffeq.jacobian import JacobianConfig, JacobianEvaluator, StiffCounters
    A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=DT)

    def f(u, p, t):
        return -u @ A.T - _HostReadCube.apply(u)

    u = torch.tensor([[0.5, -1.5], [2.0, 0.25], [1.0, 1.0]], dtype=DT)
    if structure == "dense":
        u = u[0]
    term = lx.ODEProblem(f, u, (0.0, 1.0)).term.bind(None)
    t = torch.tensor(0.0, dtype=DT)
    lin = JacobianEvaluator(JacobianConfig("test", "autodiff", structure), u, "test")(
        term, u, t, term.vf(u, t), StiffCounters(), need_dfdt=structure == "dense")
    expected = -A - 3.0 * torch.diag_embed(u ** 2)
    assert torch.allclose(lin.J, expected, rtol=1e-14, atol=1e-14)
    if structure == "dense":
        assert torch.equal(lin.dfdt, torch.zeros_like(u))
