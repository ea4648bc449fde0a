"""Stiff solvers: Rosenbrock23, Rodas5P, ImplicitEuler, TRBDF2, Kvaerno5 (orders, references, Jacobians,
gradients, bad inputs)."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import pylux as lx
from pylux.diffeq.implicit import KVAERNO5_TABLEAU, ImplicitTableau, rk_order_residuals, rooted_trees
from pylux.diffeq.jacobian import JacobianShapeError
from pylux.diffeq.rosenbrock import RODAS5P_TABLEAU, RosenbrockTableau
from pylux.diffeq.tableau import TableauError

DT = torch.float64
STIFF = [lx.ImplicitEuler, lx.TRBDF2, lx.Kvaerno5, lx.Rosenbrock23, lx.Rodas5P]
ORDERS = {lx.ImplicitEuler: 1, lx.TRBDF2: 2, lx.Kvaerno5: 5, lx.Rosenbrock23: 2, lx.Rodas5P: 5}

A_LIN = torch.tensor([[-1.0, 0.0], [5.0, -10.0]], dtype=DT)


def linear(u, p, t):
    return A_LIN @ u


def vdp(u, p, t):
    x, y = u[0], u[1]
    return torch.stack([y, p * (1 - x ** 2) * y - x])  # y'' - mu (1 - y^2) y' + y = 0


def vdp_np(mu):
    return lambda t, u: [u[1], mu * (1 - u[0] ** 2) * u[1] - u[0]]


def robertson(u, p, t):
    y1, y2, y3 = u[0], u[1], u[2]
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 * y2, 3e7 * y2 * y2])


def robertson_np(t, u):
    y1, y2, y3 = u
    return [-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 * y2, 3e7 * y2 * y2]


def slope(errors, steps):
    return np.polyfit(np.log(1.0 / np.array(steps, dtype=float)), np.log(np.array(errors)), 1)[0]


# --- tableaus ---------------------------------------------------------------------------------------

def test_rooted_tree_counts():
    assert [len(rooted_trees(n)) for n in range(1, 7)] == [1, 1, 2, 4, 9, 20]


def test_kvaerno5_satisfies_all_17_order_five_conditions_and_a_typo_is_caught():
    A = np.zeros((7, 7))
    for i, row in enumerate(KVAERNO5_TABLEAU.a):
        A[i, :i + 1] = row
    residuals = rk_order_residuals(A, np.array(KVAERNO5_TABLEAU.b), 5)
    assert len(residuals) == 17 and max(abs(r) for r in residuals.values()) < 1e-12
    a = list(KVAERNO5_TABLEAU.a)
    a[3] = (a[3][0] + 1e-6, a[3][1] - 1e-6) + a[3][2:]   # keeps the row sum, breaks order 3+
    with pytest.raises(TableauError, match="order conditions"):
        ImplicitTableau("broken", KVAERNO5_TABLEAU.c, tuple(a), KVAERNO5_TABLEAU.b, KVAERNO5_TABLEAU.b_embedded, 5, 4)


def test_rodas5p_tableau_validation_catches_a_changed_coefficient():
    tab = RODAS5P_TABLEAU
    C = list(tab.C)
    C[3] = (C[3][0] * (1 + 1e-6),) + C[3][1:]
    with pytest.raises(TableauError):
        RosenbrockTableau(tab.name, tab.gamma, tab.a, tuple(C), tab.c, tab.d, tab.m, tab.m_embedded, 5, 4)


# --- orders from slopes ---------------------------------------------------------------------------

@pytest.mark.parametrize("solver", STIFF)
def test_order_on_stiff_linear_problem(solver):
    """u' = A u with eigenvalues -1 and -10 on [0, 2], fixed steps (h |lambda| from 0.6 to 2.5). Rodas5P's
    propagated weights satisfy the linear conditions to order 6, so its slope may exceed 5 here."""
    u0 = torch.tensor([1.0, 0.0], dtype=DT)
    exact = torch.linalg.matrix_exp(2.0 * A_LIN) @ u0
    steps = (10, 20, 40) if ORDERS[solver] < 5 else (8, 16, 32)
    errors = []
    for n in steps:
        sol = lx.solve(lx.ODEProblem(linear, u0, (0.0, 2.0)), solver(), dt=2.0 / n, adaptive=False)
        errors.append((sol.u[-1] - exact).abs().max().item())
    order = slope(errors, steps)
    assert ORDERS[solver] - 0.3 < order < ORDERS[solver] + 1.3, errors


@pytest.mark.parametrize("solver", STIFF)
def test_order_on_van_der_pol_mu_10(solver):
    """Fixed steps; the Newton iteration stops at the solve's tolerances, set tight so it does not limit."""
    mu = 10.0
    ref = solve_ivp(vdp_np(mu), (0, 0.5), [2.0, 0.0], method="Radau", rtol=1e-13, atol=1e-13).y[:, -1]
    steps = (40, 80, 160)
    errors = []
    for n in steps:
        sol = lx.solve(lx.ODEProblem(vdp, torch.tensor([2.0, 0.0], dtype=DT), (0.0, 0.5), mu), solver(),
                       dt=0.5 / n, adaptive=False, save_everystep=False, reltol=1e-12, abstol=1e-12)
        errors.append(np.abs(sol.u[-1].numpy() - ref).max())
    assert abs(slope(errors, steps) - ORDERS[solver]) < 0.4, errors


# --- reference problems against scipy --------------------------------------------------------------

def _scipy_steps(fun, span, y0, method, rtol, atol):
    r = solve_ivp(fun, span, y0, method=method, rtol=rtol, atol=atol)
    return r.t.size - 1, r.y[:, -1]


@pytest.mark.parametrize("solver", [lx.Rodas5P, lx.Kvaerno5])
def test_robertson_against_radau_and_bdf_steps(solver):
    span, y0, tol = (0.0, 40.0), [1.0, 0.0, 0.0], 1e-6
    ref = solve_ivp(robertson_np, span, y0, method="Radau", rtol=1e-10, atol=1e-14).y[:, -1]
    bdf_steps, _ = _scipy_steps(robertson_np, span, y0, "BDF", tol, tol * 1e-4)
    sol = lx.solve(lx.ODEProblem(robertson, torch.tensor(y0, dtype=DT), span), solver(), reltol=tol,
                   abstol=tol * 1e-4, save_everystep=False)
    rel = np.abs(sol.u[-1].numpy() - ref) / np.maximum(np.abs(ref), 1e-8)
    assert rel.max() < 10 * tol
    assert sol.stats.naccept + sol.stats.nreject <= 2 * bdf_steps
    assert sol.stats.njac >= 1 and sol.stats.nw >= 1


@pytest.mark.slow
@pytest.mark.parametrize("solver", [lx.Rodas5P, lx.Kvaerno5, lx.Rosenbrock23, lx.TRBDF2])
def test_robertson_to_1e5(solver):
    span, y0, tol = (0.0, 1e5), [1.0, 0.0, 0.0], 1e-6
    ref = solve_ivp(robertson_np, span, y0, method="Radau", rtol=1e-10, atol=1e-14).y[:, -1]
    sol = lx.solve(lx.ODEProblem(robertson, torch.tensor(y0, dtype=DT), span), solver(), reltol=tol,
                   abstol=tol * 1e-4, save_everystep=False)
    rel = np.abs(sol.u[-1].numpy() - ref) / np.maximum(np.abs(ref), 1e-8)
    assert rel.max() < 100 * tol


@pytest.mark.parametrize("solver", [lx.Rodas5P, lx.Kvaerno5, lx.TRBDF2])
def test_robertson_to_1e11(solver):
    """Regression: the step floor was 4 ulps of t1 = 1e11 (8.9e-5) from t = 0 on, above the steps the
    initial transient needs, so Rodas5P and TRBDF2 failed with DtLessThanMin. Reference: Hairer & Wanner's
    test set values at t = 1e11 (scipy's Radau at rtol 1e-10 agrees to 9 digits)."""
    ref = np.array([0.2083340149701255e-07, 0.8333360770334713e-13, 0.9999999791665050])
    sol = lx.solve(lx.ODEProblem(robertson, torch.tensor([1.0, 0.0, 0.0], dtype=DT), (0.0, 1e11)), solver(),
                   reltol=1e-6, abstol=1e-10, save_everystep=False)
    assert sol.retcode == lx.ReturnCode.Success
    rel = np.abs(sol.u[-1].numpy() - ref) / ref
    assert rel[2] < 1e-9 and rel[:2].max() < 1e-2, rel


@pytest.mark.parametrize("solver", [lx.Rodas5P, lx.Kvaerno5])
def test_van_der_pol_mu_1000_against_radau(solver):
    mu, span, tol = 1000.0, (0.0, 300.0), 1e-6
    ref = solve_ivp(vdp_np(mu), span, [2.0, 0.0], method="Radau", rtol=1e-10, atol=1e-10).y[:, -1]
    bdf_steps, _ = _scipy_steps(vdp_np(mu), span, [2.0, 0.0], "BDF", tol, tol)
    sol = lx.solve(lx.ODEProblem(vdp, torch.tensor([2.0, 0.0], dtype=DT), span, mu), solver(), reltol=tol,
                   abstol=tol, save_everystep=False)
    rel = np.abs(sol.u[-1].numpy() - ref) / np.maximum(np.abs(ref), 1e-2)
    assert rel.max() < 10 * tol
    assert sol.stats.naccept + sol.stats.nreject <= 2 * bdf_steps


# --- Jacobians ------------------------------------------------------------------------------------

def test_counters_are_exact_for_fixed_rosenbrock_steps():
    sol = lx.solve(lx.ODEProblem(linear, torch.tensor([1.0, 0.0], dtype=DT), (0.0, 1.0)), lx.Rosenbrock23(),
                   dt=0.1, adaptive=False)
    assert (sol.stats.naccept, sol.stats.njac, sol.stats.nw, sol.stats.nsolve) == (10, 10, 10, 30)


def test_newton_reuses_the_jacobian_across_steps():
    """The grid's steps differ by rounding only (0.1 accumulated): one Jacobian, one LU, and on a linear
    problem every stage converges in at most two iterations with the exact Jacobian."""
    sol = lx.solve(lx.ODEProblem(linear, torch.tensor([1.0, 0.0], dtype=DT), (0.0, 1.0)), lx.Kvaerno5(),
                   dt=0.1, adaptive=False)
    assert sol.stats.naccept == 10 and sol.stats.njac == 1 and sol.stats.nw == 1
    assert sol.stats.nnonliniter <= 2 * 6 * 10 and sol.stats.nnonlinconvfail == 0


@pytest.mark.parametrize("solver", [lx.Kvaerno5, lx.TRBDF2])
def test_adaptive_newton_keeps_the_jacobian_on_robertson(solver):
    """Robertson to t = 40 at 1e-6: 55 (Kvaerno5) / 233 (TRBDF2) steps with 4 / 3 Jacobians; an LU per
    change of dt, never more than one per step try."""
    sol = lx.solve(lx.ODEProblem(robertson, torch.tensor([1.0, 0.0, 0.0], dtype=DT), (0.0, 40.0)), solver(),
                   reltol=1e-6, abstol=1e-10, save_everystep=False)
    tries = sol.stats.naccept + sol.stats.nreject
    assert 1 <= sol.stats.njac <= 5 and sol.stats.njac * 10 < tries
    assert sol.stats.nw <= tries


def test_time_derivative_difference_stays_inside_a_backward_span():
    """f_t by a one-sided difference (jac="finite_difference") is taken toward the step: a backward solve
    never evaluates f past its start, here where f is undefined."""
    def f(u, p, t):
        if float(t) > 1.0:
            raise AssertionError(f"f evaluated at t = {float(t)!r} past the span [0, 1]")
        return -A_LIN @ u + torch.stack([torch.sin(t), torch.zeros_like(t)]).to(u.dtype)  # stable backward

    sol = lx.solve(lx.ODEProblem(f, torch.tensor([1.0, 0.0], dtype=DT), (1.0, 0.0)),
                   lx.Rosenbrock23(jac="finite_difference"), reltol=1e-6, abstol=1e-8)
    ref = solve_ivp(lambda t, u: -A_LIN.numpy() @ u + np.array([np.sin(t), 0.0]), (1.0, 0.0), [1.0, 0.0],
                    rtol=1e-11, atol=1e-12).y[:, -1]
    assert np.abs(sol.u[-1].numpy() - ref).max() < 1e-4


def test_direct_gradient_cost_per_step_does_not_grow_with_the_solve():
    """Under DirectAdjoint the Jacobian is formed at a leaf copy of u (then reattached): forming it does
    not walk the graph of earlier steps. Counted: the autograd nodes visited by one Jacobian at the first
    and at the 200th step are the same."""
    from pylux.diffeq import jacobian as jm
    visited = []
    original = torch.autograd.grad

    def counting(outputs, inputs, *a, **k):
        seen, stack = set(), [o.grad_fn for o in ([outputs] if torch.is_tensor(outputs) else outputs)]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
        visited.append(len(seen))
        return original(outputs, inputs, *a, **k)

    p = torch.tensor([20.0, 30.0], dtype=DT, requires_grad=True)
    u0 = torch.tensor([1.0, 0.5], dtype=DT, requires_grad=True)
    jm.torch.autograd.grad = counting
    try:
        sol = lx.solve(_grad_problem(p, u0), lx.Rosenbrock23(), dt=0.005, adaptive=False,
                       sensealg=lx.DirectAdjoint(), save_everystep=False)
    finally:
        jm.torch.autograd.grad = original
    assert sol.stats.njac == 200 and len(visited) == 200   # one batched backward pass per Jacobian
    assert visited[0] == visited[-1]
    gp, gu = torch.autograd.grad(sol.u[-1].sum(), (p, u0))
    assert torch.isfinite(gp).all() and torch.isfinite(gu).all()


def test_batched_user_and_matrix_free_jacobians_agree_with_dense():
    torch.manual_seed(0)
    W = torch.randn(3, 3, dtype=DT)

    def f(u, p, t):  # independent samples: (B, 3)
        return -20.0 * u + torch.tanh(u @ W.T)

    def jac(u, p, t):  # per-sample blocks
        s = 1 - torch.tanh(u @ W.T) ** 2
        return -20.0 * torch.eye(3, dtype=DT) + s.unsqueeze(-1) * W

    u0 = torch.randn(4, 3, dtype=DT)
    prob = lx.ODEProblem(f, u0, (0.0, 1.0))
    dense = lx.solve(prob, lx.Rodas5P(jac_structure="dense"), reltol=1e-8, abstol=1e-8)
    for solver in (lx.Rodas5P(jac_structure="batched"), lx.Rodas5P(jac=jac, jac_structure="batched"),
                   lx.Rodas5P(jac_structure="matrix_free", krylov_rtol=1e-12), lx.Rodas5P(jac="finite_difference")):
        other = lx.solve(prob, solver, reltol=1e-8, abstol=1e-8)
        assert torch.allclose(other.u[-1], dense.u[-1], rtol=1e-6, atol=1e-8), solver
    assert other.stats.njac == other.stats.naccept + other.stats.nreject - 0 or other.stats.njac > 0


def test_user_jacobian_of_wrong_shape_is_refused():
    prob = lx.ODEProblem(linear, torch.tensor([1.0, 0.0], dtype=DT), (0.0, 1.0))
    with pytest.raises(JacobianShapeError, match=r"returned shape \(3, 3\).*must return \(2, 2\)"):
        lx.solve(prob, lx.Rosenbrock23(jac=lambda u, p, t: torch.zeros(3, 3, dtype=DT)))


def test_batched_structure_needs_a_2d_state():
    prob = lx.ODEProblem(linear, torch.tensor([1.0, 0.0], dtype=DT), (0.0, 1.0))
    with pytest.raises(ValueError, match=r"\(B, d\)"):
        lx.solve(prob, lx.Kvaerno5(jac_structure="batched"))


@pytest.mark.parametrize("solver", [lx.Rosenbrock23, lx.Kvaerno5])
def test_singular_newton_matrix_at_every_dt_fails_naming_t_and_dt(solver):
    prob = lx.ODEProblem(linear, torch.tensor([1.0, 0.0], dtype=DT), (0.0, 1.0))
    bad = solver(jac=lambda u, p, t: torch.full((2, 2), float("inf"), dtype=DT))
    with pytest.raises(lx.DtLessThanMinError, match=r"t = 0\.0.*singular or not finite.*dt = ") as info:
        lx.solve(prob, bad, dt=0.01)
    assert "Newton matrix" in str(info.value)


def test_unknown_jacobian_options_are_refused():
    with pytest.raises(ValueError, match="jac_structure"):
        lx.Rosenbrock23(jac_structure="sparse")
    with pytest.raises(ValueError, match="jac"):
        lx.Kvaerno5(jac="symbolic")


def test_float32_state_works():
    prob = lx.ODEProblem(lambda u, p, t: A_LIN.float() @ u, torch.tensor([1.0, 0.0]), (0.0, 1.0))
    exact = torch.linalg.matrix_exp(A_LIN) @ torch.tensor([1.0, 0.0], dtype=DT)
    for solver in (lx.Rosenbrock23(), lx.Kvaerno5()):
        sol = lx.solve(prob, solver, reltol=1e-4, abstol=1e-6)
        assert sol.u.dtype == torch.float32
        assert torch.allclose(sol.u[-1].double(), exact, atol=1e-3)


def test_dense_output_of_rosenbrock23_is_second_order_and_ends_at_the_step():
    u0 = torch.tensor([1.0, 0.0], dtype=DT)
    sol = lx.solve(lx.ODEProblem(linear, u0, (0.0, 1.0)), lx.Rosenbrock23(), reltol=1e-7, abstol=1e-9)
    ts = torch.linspace(0.0, 1.0, 23, dtype=DT)
    exact = torch.stack([torch.linalg.matrix_exp(A_LIN * t) @ u0 for t in ts])
    assert (sol(ts) - exact).abs().max() < 1e-4
    assert torch.equal(sol(sol.t[3]), sol.u[3])


# --- gradients --------------------------------------------------------------------------------------

def _grad_problem(p, u0):
    def f(u, p, t):
        return torch.stack([-p[0] * u[0] + u[1], p[1] * (u[0] - u[1]) - 5.0 * u[1] ** 3])
    return lx.ODEProblem(f, u0, (0.0, 1.0), p)


def _loss(solver, p, u0, **kw):
    sol = lx.solve(_grad_problem(p, u0), solver, saveat=[0.5, 1.0], **kw)
    return (sol.u ** 2).sum() + sol.u[-1, 0]


def _fd(fun, x, h=1e-5):
    g = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e.view(-1)[i] = h
        g.view(-1)[i] = (fun(x + e) - fun(x - e)) / (2 * h)
    return g


@pytest.mark.parametrize("solver", [lx.Rosenbrock23, lx.Kvaerno5])
def test_direct_gradient_through_fixed_steps_matches_finite_differences(solver):
    p, u0 = torch.tensor([20.0, 30.0], dtype=DT), torch.tensor([1.0, 0.5], dtype=DT)
    kw = dict(dt=0.05, adaptive=False)
    pr = p.clone().requires_grad_(True)
    ur = u0.clone().requires_grad_(True)
    gp, gu = torch.autograd.grad(_loss(solver(), pr, ur, sensealg=lx.DirectAdjoint(), **kw), (pr, ur))
    with torch.no_grad():
        fp = _fd(lambda x: _loss(solver(), x, u0, **kw), p)
        fu = _fd(lambda x: _loss(solver(), p, x, **kw), u0)
    assert torch.allclose(gp, fp, rtol=1e-5, atol=1e-9)
    assert torch.allclose(gu, fu, rtol=1e-5, atol=1e-9)


SENSEALGS = [lx.BacksolveAdjoint, lx.InterpolatingAdjoint, lx.QuadratureAdjoint, lx.DirectAdjoint]


def _manifold_problem(p, u0):
    """A fast relaxation (rate p[0]) onto the curve u0 = u1^2 and a slow O(1) motion along it: with
    p[0] = 1000 an explicit solver needs dt < ~3e-3 on [0, 1]; the gradients are O(1)."""
    def f(u, p, t):
        return torch.stack([-p[0] * (u[0] - u[1] ** 2), -p[1] * u[0] * u[1] + 0.5 * torch.cos(u[1])])
    return lx.ODEProblem(f, u0, (0.0, 1.0), p)


def _manifold_loss(solver, p, u0, **kw):
    sol = lx.solve(_manifold_problem(p, u0), solver, saveat=[0.5, 1.0], **kw)
    return (sol.u ** 2).sum() + sol.u[-1, 0]


def _fd_relative(fun, x, h=1e-4):
    """Central differences with steps h max(1, |x_i|) (p[0] = 1000 needs a step on its own scale)."""
    g = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e.view(-1)[i] = h * max(1.0, abs(float(x.view(-1)[i])))
        g.view(-1)[i] = (fun(x + e) - fun(x - e)) / (2 * e.view(-1)[i])
    return g


def _manifold_gradients_match(solver, sensealg, stiffness, tol, rtol, ref_tol=1e-12):
    p, u0 = torch.tensor([stiffness, 2.0], dtype=DT), torch.tensor([1.0, 0.5], dtype=DT)
    pr = p.clone().requires_grad_(True)
    ur = u0.clone().requires_grad_(True)
    loss = _manifold_loss(solver(), pr, ur, sensealg=sensealg, reltol=tol, abstol=tol)
    gp, gu = torch.autograd.grad(loss, (pr, ur))
    with torch.no_grad():
        ref_kw = dict(reltol=ref_tol, abstol=ref_tol)
        fp = _fd_relative(lambda x: _manifold_loss(lx.Rodas5P(), x, u0, **ref_kw), p)
        fu = _fd_relative(lambda x: _manifold_loss(lx.Rodas5P(), p, x, **ref_kw), u0)
    assert fu.abs().max() > 0.1 and fp.abs().max() > 0.1   # gradients far above atol: rtol decides
    assert torch.allclose(gp, fp, rtol=rtol, atol=1e-8), (gp, fp)
    assert torch.allclose(gu, fu, rtol=rtol, atol=1e-8), (gu, fu)


@pytest.mark.slow
@pytest.mark.parametrize("solver", [lx.Rosenbrock23, lx.Kvaerno5])
@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_adaptive_gradients_under_each_sensealg_match_finite_differences(solver, sensealg):
    """The backward adjoint solve uses the same implicit solver (its Jacobian by finite differences:
    the augmented field differentiates internally); Kvaerno5's stage at c = 1.23 reaches past the span
    in the last backward step, where the interpolating adjoints continue the forward interpolant.

    BacksolveAdjoint runs on a mildly stiff instance (relaxation rate 8, not 1000): it re-integrates z
    backward, where the fast relaxation is a mode growing like exp(rate * t), so the forward solve's
    error at t1 (~tol) returns amplified by exp(1000) at rate 1000 (the solve blows up) — a property of
    the method, not of the solver."""
    stiffness = 8.0 if sensealg is lx.BacksolveAdjoint else 1000.0
    tol = 1e-10 if solver is lx.Kvaerno5 else 1e-9
    rtol = 1e-5 if solver is lx.Kvaerno5 else 1e-4
    _manifold_gradients_match(solver, sensealg(), stiffness, tol, rtol)


def test_interpolating_adjoint_through_kvaerno5_on_a_stiff_problem():
    """The fast default-run variant: Kvaerno5 forward and backward at rate 1000, tolerance 1e-7."""
    _manifold_gradients_match(lx.Kvaerno5, lx.InterpolatingAdjoint(), 1000.0, 1e-7, 1e-3, ref_tol=1e-10)


def _forced(u, p, t):
    return A_LIN @ u + torch.stack([torch.sin(3.0 * t), torch.cos(t)]).to(u.dtype)


def _forced_tgrad(u, p, t):
    return torch.stack([3.0 * torch.cos(3.0 * t), -torch.sin(t)]).to(u.dtype)


@pytest.mark.parametrize("solver", [lx.Rosenbrock23, lx.Rodas5P])
def test_user_tgrad_replaces_the_time_difference(solver):
    """With tgrad(u, p, t) the solve matches scipy and the time-difference solve, and each Jacobian costs
    one evaluation of f fewer (fixed steps: the counts are exact)."""
    prob = lx.ODEProblem(_forced, torch.tensor([1.0, 0.0], dtype=DT), (0.0, 2.0))
    jac = lambda u, p, t: A_LIN  # noqa: E731
    with_tgrad = lx.solve(prob, solver(jac=jac, tgrad=_forced_tgrad), reltol=1e-9, abstol=1e-11)
    ref = solve_ivp(lambda t, u: A_LIN.numpy() @ u + np.array([np.sin(3 * t), np.cos(t)]), (0.0, 2.0), [1.0, 0.0],
                    method="Radau", rtol=1e-12, atol=1e-13).y[:, -1]
    assert np.abs(with_tgrad.u[-1].numpy() - ref).max() < 1e-7
    fixed = dict(dt=0.01, adaptive=False)
    exact = lx.solve(prob, solver(jac=jac, tgrad=_forced_tgrad), **fixed)
    differenced = lx.solve(prob, solver(jac=jac), **fixed)
    assert exact.stats.njac == differenced.stats.njac == 200
    assert differenced.stats.nf - exact.stats.nf == exact.stats.njac
    torch.testing.assert_close(exact.u[-1], differenced.u[-1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("jac,structure", [("auto", "dense"), ("auto", "batched"), ("finite_difference", "batched")])
def test_zero_tgrad_of_an_autonomous_field_changes_nothing_but_the_count(jac, structure):
    """For an autonomous field the time difference is exactly zero: tgrad = 0 gives the same solve, bit for
    bit, with one evaluation of f fewer per Jacobian where the difference was taken."""
    u0 = torch.linspace(-1.0, 1.0, 6, dtype=DT).reshape(3, 2)
    prob = lx.ODEProblem(lambda u, p, t: u @ A_LIN.T - 0.5 * u ** 3, u0, (0.0, 1.0))
    zero = lambda u, p, t: torch.zeros_like(u)  # noqa: E731
    a = lx.solve(prob, lx.Rodas5P(jac=jac, jac_structure=structure, tgrad=zero), reltol=1e-7, abstol=1e-9)
    b = lx.solve(prob, lx.Rodas5P(jac=jac, jac_structure=structure), reltol=1e-7, abstol=1e-9)
    assert torch.equal(a.u, b.u) and a.stats.naccept == b.stats.naccept
    saved = 0 if (jac, structure) == ("auto", "dense") else 1  # dense autodiff takes f_t from its own graph
    assert b.stats.nf - a.stats.nf == saved * a.stats.njac


def test_tgrad_of_the_wrong_shape_or_kind_is_refused():
    prob = lx.ODEProblem(_forced, torch.tensor([1.0, 0.0], dtype=DT), (0.0, 1.0))
    with pytest.raises(JacobianShapeError, match=r"tgrad\(u, p, t\) returned \(3,\).*must return df/dt like u: \(2,\)"):
        lx.solve(prob, lx.Rodas5P(tgrad=lambda u, p, t: torch.zeros(3, dtype=DT)))
    with pytest.raises(TypeError, match="tgrad must be None or a callable"):
        lx.Rosenbrock23(tgrad=0.0)
    assert "tgrad='_forced_tgrad'" in repr(lx.Rodas5P(tgrad=_forced_tgrad))


@pytest.mark.parametrize("sensealg", [lx.InterpolatingAdjoint, lx.QuadratureAdjoint, lx.BacksolveAdjoint])
def test_continuous_adjoints_do_not_apply_the_users_jac_and_tgrad_to_the_backward_field(sensealg):
    """The user's jac and tgrad describe the forward field; the backward solve forms its own (regression:
    they were applied to the augmented field, a shape error or a skewed gradient)."""
    def loss(alg, solver):
        p = torch.tensor(-2.0, dtype=DT, requires_grad=True)
        f = lambda u, p, t: p * u + torch.stack([torch.sin(3.0 * t), torch.cos(t)]).to(u.dtype)  # noqa: E731
        prob = lx.ODEProblem(f, torch.tensor([1.0, 0.5], dtype=DT), (0.0, 1.0), p)
        sol = lx.solve(prob, solver, reltol=1e-9, abstol=1e-11, sensealg=alg)
        return torch.autograd.grad((sol.u[-1] ** 2).sum(), p)[0]
    user = lx.Rodas5P(jac=lambda u, p, t: p * torch.eye(2, dtype=DT), tgrad=_forced_tgrad)
    direct = loss(lx.DirectAdjoint(), lx.Rodas5P())
    assert abs(float(loss(sensealg(), user)) - float(direct)) < 1e-6 * abs(float(direct))
    assert user.for_another_field().jacobian.key()[::4] == ("auto", None) and user.jacobian.tgrad is _forced_tgrad


def test_autoswitch_for_another_field_drops_its_stiff_methods_user_functions():
    switch = lx.AutoSwitch(stiff=lx.Rodas5P(jac=lambda u, p, t: p * torch.eye(2, dtype=DT), tgrad=_forced_tgrad))
    other = switch.for_another_field()
    assert other.stiff.jacobian.jac == "auto" and other.stiff.jacobian.tgrad is None
    assert callable(switch.stiff.jacobian.jac) and lx.AutoSwitch().for_another_field() == lx.AutoSwitch()


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0)])
@pytest.mark.parametrize("solver", [lambda: lx.Rodas5P(), lambda: lx.Rosenbrock23(), lambda: lx.Kvaerno5(),
                                    lambda: lx.TRBDF2(), lambda: lx.ImplicitEuler(),
                                    lambda: lx.Kvaerno5(jac_structure="matrix_free"), lambda: lx.AutoSwitch()],
                         ids=["Rodas5P", "Rosenbrock23", "Kvaerno5", "TRBDF2", "ImplicitEuler", "matrix-free",
                              "AutoSwitch"])
def test_a_zero_size_state_solves_with_every_stiff_method(shape, solver):
    """Regression (FAULTS 10, diffrax's empty-state case): the implicit methods raised from the Jacobian's
    batched backward on zero rows and from the max of an empty Jacobian, where the explicit ones succeed."""
    u0 = torch.zeros(shape, dtype=DT, requires_grad=True)
    sol = lx.solve(lx.ODEProblem(lambda u, p, t: -u, u0, (0.0, 1.0)), solver(), saveat=[0.5, 1.0])
    assert sol.retcode == lx.ReturnCode.Success and sol.u.shape == (2,) + shape
    assert torch.autograd.grad(sol.u.sum(), u0)[0].shape == shape
