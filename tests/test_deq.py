"""Deep equilibrium models: implicit gradients, DEQ / SkipDEQ / MultiScaleDEQ layers (float64)."""

from __future__ import annotations

import math
import re

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


def implicit_loss(alg, ps, x, record=None):
    return cubic_loss(alg.attach_gradient(cell, tight_fixed_point(ps, x), x, ps, record=record))


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
    record: dict = {}
    implicit = torch.autograd.grad(implicit_loss(alg, ps, x, record), leaves)
    z = torch.zeros_like(x)
    for _ in range(200):
        z = cell(z, x, ps)
    unrolled = torch.autograd.grad(cubic_loss(z), leaves)
    for a, b in zip(implicit, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    stats = record
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


def test_nan_in_the_jacobian_free_gradient_raises():
    ps, x = cell_problem(seed=6)
    z = JacobianFreeBackprop().attach_gradient(cell, tight_fixed_point(ps, x), x, ps)
    with pytest.raises(NonlinearSolveError, match="JacobianFreeBackprop: the gradient .* is NaN or Inf"):
        torch.autograd.grad((z * float("nan")).sum(), [ps["W"]])


def test_map_that_ignores_the_state_has_the_plain_gradient():
    # f(z, x) = tanh(U x + b): J = 0, so the implicit gradient is the gradient of one application
    ps, x = cell_problem(seed=8)

    def constant_map(z, x, ps):
        return torch.tanh(x @ ps["U"].T + ps["b"])
    z_star = constant_map(None, x, ps).detach()
    for alg in (SteadyStateAdjoint(tol=1e-12), JacobianFreeBackprop()):
        implicit = torch.autograd.grad(cubic_loss(alg.attach_gradient(constant_map, z_star, x, ps)),
                                       [ps["U"], ps["b"]])
        direct = torch.autograd.grad(cubic_loss(constant_map(None, x, ps)), [ps["U"], ps["b"]])
        for a, b in zip(implicit, direct):
            assert b.abs().max() > 1e-2
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    probe = torch.ones_like(z_star)
    z = x.detach().requires_grad_(True)
    estimate = lx.regularize.hutchinson_vjp_frobenius(constant_map(z, x.detach(), ps), z, probe)
    assert torch.equal(estimate, torch.zeros(x.shape[0], dtype=F64))


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


# ------------------------------------------------------------------ the adjoint by a nonlinear solver

class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts: placed on z inside f, it counts the VJPs with respect to z."""

    @staticmethod
    def forward(ctx, z, counter):
        ctx.counter = counter
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad):
        ctx.counter["vjp"] += 1
        return grad, None


def counting_cell(counter):
    def f(z, x, ps):
        counter["f"] += 1
        return cell(_CountBackward.apply(z, counter), x, ps)
    return f


@pytest.mark.parametrize("solver", [lx.FixedPointIteration(), lx.Anderson(memory=4), lx.Broyden()], ids=repr)
def test_adjoint_by_a_nonlinear_solver_matches_finite_differences_and_gmres(solver):
    ps, x = cell_problem(seed=9)
    leaves = [x, *ps.values()]
    alg = SteadyStateAdjoint(solver=solver, tol=1e-13, maxiters=200)
    record: dict = {}
    grads = torch.autograd.grad(implicit_loss(alg, ps, x, record), leaves)
    assert record["converged"] and 0 < record["iterations"] <= 200 and record["residual"] <= 1e-13
    gmres_grads = torch.autograd.grad(implicit_loss(SteadyStateAdjoint(tol=1e-13), ps, x), leaves)
    for a, b in zip(grads, gmres_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the directional derivative along a random direction of every leaf, by central differences
    gen = _gen(10)
    directions = [torch.randn(leaf.shape, generator=gen, dtype=F64) for leaf in leaves]
    h = 1e-6
    with torch.no_grad():
        for leaf, d in zip(leaves, directions):
            leaf.add_(h * d)
        up = cubic_loss(tight_fixed_point(ps, x))
        for leaf, d in zip(leaves, directions):
            leaf.sub_(2 * h * d)
        down = cubic_loss(tight_fixed_point(ps, x))
        for leaf, d in zip(leaves, directions):
            leaf.add_(h * d)
    numeric = (up - down) / (2 * h)
    analytic = sum((g * d).sum() for g, d in zip(grads, directions))
    torch.testing.assert_close(analytic, numeric, rtol=1e-7, atol=1e-9)


def test_fixed_point_adjoint_evaluates_f_once_and_saves_the_first_product():
    """From lambda_0 = g the iteration is the one from 0 shifted by one step: one VJP fewer, the same gradient."""
    ps, x = cell_problem(seed=11)
    z_star = tight_fixed_point(ps, x)
    counter = {"f": 0, "vjp": 0}
    alg = SteadyStateAdjoint(solver=lx.FixedPointIteration(), tol=0.0, atol=1e-12, maxiters=500)
    record: dict = {}
    z = alg.attach_gradient(counting_cell(counter), z_star, x, ps, record=record)
    assert counter == {"f": 0, "vjp": 0}  # attaching evaluates nothing
    grads = torch.autograd.grad(cubic_loss(z), [x, *ps.values()])
    assert counter["f"] == 1  # one application of f at z*, for the VJPs and for the final product
    assert counter["vjp"] == record["matvecs"] > 0
    # the same iteration from 0 on the same VJPs
    z_leaf = z_star.detach().requires_grad_(True)
    fz = cell(z_leaf, x, ps)
    (g,) = torch.autograd.grad(cubic_loss(z_leaf), [z_leaf])
    products = [0]

    def step(v):
        products[0] += 1
        return torch.autograd.grad(fz, z_leaf, v, retain_graph=True)[0] + g

    from_zero = nlsolve(step, torch.zeros_like(g), lx.FixedPointIteration(), abstol=1e-12, reltol=0.0,
                        maxiters=500, record_history=False)
    assert from_zero.success
    assert record["matvecs"] == products[0] - 1 and record["iterations"] == from_zero.iterations - 1
    expected = torch.autograd.grad(fz, [x, *ps.values()], from_zero.z)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_adjoint_by_a_nonlinear_solver_meets_relative_and_absolute_tolerances():
    """||g - (I - J)^T lambda|| <= max(atol, tol ||g||) per element, as GMRES; record["residual"] is relative."""
    ps, x = cell_problem(seed=12, norm=0.9)
    z_star = tight_fixed_point(ps, x)
    z_leaf = z_star.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(cubic_loss(z_leaf), [z_leaf])
    g_norm = torch.linalg.vector_norm(g, dim=1)
    for tol, atol in ((1e-4, 0.0), (1e-4, 1e-3), (0.0, 1e-5)):
        record: dict = {}
        alg = SteadyStateAdjoint(solver=lx.FixedPointIteration(), tol=tol, atol=atol, maxiters=500)
        torch.autograd.grad(cubic_loss(alg.attach_gradient(cell, z_star, x, ps, record=record)), [ps["W"]])
        assert record["converged"] and record["iterations"] > 2
        assert record["residual"] <= max(tol, atol / float(g_norm.min()))
        if tol == 0.0:  # the absolute test alone is met exactly, not by a stricter one
            assert record["residual"] > 0.1 * atol / float(g_norm.max())


def test_adjoint_solver_failures_are_reported():
    ps, x = cell_problem(norm=0.95, seed=4, n=8)
    z_star = tight_fixed_point(ps, x)
    alg = SteadyStateAdjoint(solver=lx.FixedPointIteration(), tol=1e-12, maxiters=1)
    with pytest.warns(ConvergenceWarning, match=r"FixedPointIteration for the adjoint .* stopped after 1 "
                                                r"iterations with relative residual"):
        torch.autograd.grad(cubic_loss(alg.attach_gradient(cell, z_star, x, ps)), [ps["W"]])
    alg = SteadyStateAdjoint(solver=lx.FixedPointIteration(), tol=1e-12, maxiters=1, on_failure="raise")
    with pytest.raises(NonlinearSolveError, match="relative residual"):
        torch.autograd.grad(cubic_loss(alg.attach_gradient(cell, z_star, x, ps)), [ps["W"]])
    z = SteadyStateAdjoint(solver=lx.Anderson()).attach_gradient(cell, z_star, x, ps)
    with pytest.raises(NonlinearSolveError, match="NaN/Inf after 0 iterations"):  # the incoming gradient
        torch.autograd.grad((z * float("nan")).sum(), [ps["W"]])

    class _NaNBackward(torch.autograd.Function):
        forward = staticmethod(lambda ctx, z: z.view_as(z))
        backward = staticmethod(lambda ctx, grad: grad * float("nan"))

    def nan_jacobian(z, x, ps):  # finite values, a NaN Jacobian
        return cell(_NaNBackward.apply(z), x, ps)
    z = SteadyStateAdjoint(solver=lx.FixedPointIteration()).attach_gradient(nan_jacobian, z_star, x, ps)
    with pytest.raises(NonlinearSolveError, match="NaN/Inf after 0 FixedPointIteration iterations"):
        torch.autograd.grad(cubic_loss(z), [ps["W"]])


def test_adjoint_solver_option_is_checked():
    with pytest.raises(TypeError, match=r"pass an instance, Anderson\(\)"):
        SteadyStateAdjoint(solver=lx.Anderson)
    with pytest.raises(TypeError, match="solver must be None"):
        SteadyStateAdjoint(solver="anderson")
    with pytest.raises(ValueError, match="abstol of its own"):
        SteadyStateAdjoint(solver=lx.Anderson(abstol=1e-6))
    with pytest.raises(ValueError, match="maxiters is given twice"):
        SteadyStateAdjoint(solver=lx.Anderson(maxiters=5), maxiters=6)
    assert SteadyStateAdjoint(solver=lx.Anderson()) == SteadyStateAdjoint(solver=lx.Anderson())
    assert SteadyStateAdjoint(solver=lx.Anderson()) != SteadyStateAdjoint()
    assert "solver=Anderson" in repr(SteadyStateAdjoint(solver=lx.Anderson()))


def test_finite_check_survives_a_sum_that_overflows():
    from pylux.sensitivity.steady_state import _all_finite
    big = torch.full((4,), 3e38, dtype=torch.float32)  # finite entries, an infinite sum
    assert _all_finite([big, torch.ones(2)]) and _all_finite([])
    assert not _all_finite([big, torch.tensor([1.0, float("inf")])])
    assert not _all_finite([torch.tensor([float("nan")])])


# ------------------------------------------------------------------ the layers

from pylux import nn  # noqa: E402


def injected_cell(d):
    """f(z, x) = tanh(W z + b + x), the input-injection idiom with pylux containers."""
    return nn.Chain(nn.Parallel("+", nn.Dense(d, d), nn.NoOpLayer()), nn.WrappedFunction(torch.tanh))


def scaled_setup(layer, seed=0, scale=0.6):
    """float64 parameters requiring grad; the cell's weight scaled so that f is a contraction."""
    ps, st = lx.setup(_gen(seed), layer, dtype=F64)
    with torch.no_grad():
        weight = ps["model"]["layer_1"]["layer_1"]["weight"]
        weight.mul_(scale / torch.linalg.matrix_norm(weight, 2))
        ps["model"]["layer_1"]["layer_1"]["bias"].normal_(0, 0.3, generator=_gen(seed + 100))
    for leaf in lx.core.tree_leaves(ps):
        leaf.requires_grad_(True)
    return ps, st


def apply_cell(model, z, x, ps_model, st_model):
    return model((z, x), ps_model, st_model)[0]


TIGHT = dict(abstol=1e-11, reltol=0.0)


def test_each_forward_pass_has_its_own_backward_record():
    d = 5
    layer = lx.DEQ(injected_cell(d), lx.Broyden(), sensealg=SteadyStateAdjoint(tol=1e-10), **TIGHT)
    ps, st = scaled_setup(layer)
    z_a, st_a = layer(torch.randn(3, d, generator=_gen(2), dtype=F64), ps, st)
    z_b, st_b = layer(torch.randn(3, d, generator=_gen(3), dtype=F64), ps, st)
    assert st_a["solution"].backward_stats == {}
    z_a.pow(2).sum().backward()
    record = st_a["solution"].backward_stats
    assert record["converged"] and record["iterations"] > 0 and record["residual"] <= 1e-10
    assert st_b["solution"].backward_stats == {}


def test_discrete_and_continuous_deq_reach_the_same_fixed_point_and_gradients():
    d = 5
    x = torch.randn(4, d, generator=_gen(1), dtype=F64, requires_grad=True)
    outputs = []
    for solver in (lx.Broyden(), lx.Tsit5()):
        layer = lx.DEQ(injected_cell(d), solver, sensealg=SteadyStateAdjoint(tol=1e-12), **TIGHT)
        ps, st = scaled_setup(layer)
        z, st_new = layer(x, ps, st)
        solution = st_new["solution"]
        assert solution.converged and solution.retcode is lx.NonlinearReturnCode.Success
        assert float(solution.residual.max()) <= 1e-11 and solution.nfe > 0 and st["solution"] is None
        fz = apply_cell(layer.model, z.detach(), x.detach(), ps["model"], st["model"])
        torch.testing.assert_close(fz, z.detach(), rtol=0, atol=1e-10)
        leaves = [x, *lx.core.tree_leaves(ps)]
        outputs.append((z.detach(), torch.autograd.grad(cubic_loss(z), leaves)))
    (z_discrete, g_discrete), (z_continuous, g_continuous) = outputs
    assert solution.t is not None and solution.t > 0  # the continuous one stopped at its steady state
    torch.testing.assert_close(z_continuous, z_discrete, rtol=0, atol=1e-10)
    for a, b in zip(g_continuous, g_discrete):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_deq_layer_gradient_equals_backprop_through_a_long_unrolled_iteration():
    d = 4
    layer = lx.DEQ(injected_cell(d), lx.Anderson(), sensealg=SteadyStateAdjoint(tol=1e-12), **TIGHT)
    ps, st = scaled_setup(layer, seed=3)
    x = torch.randn(3, d, generator=_gen(2), dtype=F64, requires_grad=True)
    leaves = [x, *lx.core.tree_leaves(ps)]
    z, _ = layer(x, ps, st)
    implicit = torch.autograd.grad(cubic_loss(z), leaves)
    u = torch.zeros_like(x)
    for _ in range(200):
        u = apply_cell(layer.model, u, x, ps["model"], st["model"])
    unrolled = torch.autograd.grad(cubic_loss(u), leaves)
    for a, b in zip(implicit, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("solver", [lx.Broyden(), lx.Tsit5()], ids=["discrete", "continuous"])
def test_skip_deq_loss_is_its_definition_and_trains_only_the_init_model(solver):
    d = 4
    layer = lx.SkipDEQ(injected_cell(d), nn.Dense(d, d, torch.tanh), solver, **TIGHT)
    ps, st = scaled_setup(layer, seed=4)
    x = torch.randn(5, d, generator=_gen(5), dtype=F64)
    z, st_new = layer(x, ps, st)
    solution = st_new["solution"]
    prediction = layer.init_model(x, ps["init_model"], st["init_model"])[0]
    fz = apply_cell(layer.model, z.detach(), x, ps["model"], st["model"])
    by_hand = (fz - prediction).pow(2).mean()
    torch.testing.assert_close(solution.skip_loss, by_hand, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(solution.u0, prediction, rtol=0, atol=0)
    # The fixed point does not depend on the initial guess: the task loss gives the init model no gradient.
    init_leaves = lx.core.tree_leaves(ps["init_model"])
    task = torch.autograd.grad(cubic_loss(z), init_leaves, retain_graph=True, allow_unused=True)
    assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in task)
    skip = torch.autograd.grad(solution.skip_loss, init_leaves)
    expected = torch.autograd.grad(((z.detach() - prediction) ** 2).mean(), init_leaves)
    for a, b in zip(skip, expected):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    assert st_new["init_model"] == {}  # Dense has an empty state, threaded through


@pytest.mark.parametrize("solver", [lx.Broyden(), lx.Tsit5()], ids=["discrete", "continuous"])
def test_skip_reg_deq_starts_at_f_of_zero_and_its_loss_is_its_definition(solver):
    d = 4
    layer = lx.SkipDEQ(injected_cell(d), None, solver, **TIGHT)
    ps, st = scaled_setup(layer, seed=6)
    assert ps["init_model"] == {}
    x = torch.randn(5, d, generator=_gen(7), dtype=F64)
    z, st_new = layer(x, ps, st)
    solution = st_new["solution"]
    f_zero = apply_cell(layer.model, torch.zeros_like(x), x, ps["model"], st["model"])
    fz = apply_cell(layer.model, z.detach(), x, ps["model"], st["model"])
    torch.testing.assert_close(solution.u0, f_zero, rtol=0, atol=0)
    torch.testing.assert_close(solution.skip_loss, (fz - f_zero).pow(2).mean(), rtol=1e-9, atol=1e-12)
    # Its gradient reaches the parameters of f both through z* (implicitly) and through f(0, x).
    leaves = lx.core.tree_leaves(ps["model"])
    grads = torch.autograd.grad(solution.skip_loss, leaves)
    u = torch.zeros_like(x)
    for _ in range(200):
        u = apply_cell(layer.model, u, x, ps["model"], st["model"])
    unrolled = torch.autograd.grad((u - f_zero).pow(2).mean(), leaves)
    for a, b in zip(grads, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    plain = lx.DEQ(injected_cell(d), solver, **TIGHT)
    z_plain, _ = plain(x, {"model": ps["model"]}, {k: v for k, v in st.items() if k != "init_model"})
    torch.testing.assert_close(z, z_plain, rtol=0, atol=1e-10)


def test_jacobian_regularization_is_an_unbiased_estimate_of_the_frobenius_norm():
    d, batch, gamma = 4, 4000, 2.5
    layer = lx.DEQ(injected_cell(d), lx.Broyden(), jacobian_regularization=gamma, **TIGHT)
    ps, st = scaled_setup(layer, seed=8, scale=0.9)
    x = torch.randn(1, d, generator=_gen(9), dtype=F64).expand(batch, d).contiguous()
    z, st_new = layer(x, ps, st)
    estimate = st_new["solution"].jacobian_loss
    z_star = z[:1].detach()
    J = torch.autograd.functional.jacobian(
        lambda u: apply_cell(layer.model, u, x[:1], ps["model"], st["model"]), z_star).reshape(d, d).detach()
    exact = gamma * J.pow(2).sum() / d
    # Var of eps^T M eps for Rademacher eps and M = J J^T is 2 sum_{i != j} M_ij^2.
    M = J @ J.T
    variance = 2 * (M.pow(2).sum() - M.diagonal().pow(2).sum())
    standard_error = gamma * torch.sqrt(variance / batch) / d
    assert abs(float(estimate.detach() - exact)) <= 4 * float(standard_error)
    assert float(standard_error) < 0.05 * float(exact)  # the check is sharp
    assert float(standard_error) > 0
    # Differentiable, deterministic given the state, and the probe key advances.
    (g,) = torch.autograd.grad(estimate, [ps["model"]["layer_1"]["layer_1"]["weight"]])
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    again = layer(x, ps, st)[1]["solution"].jacobian_loss
    assert torch.equal(again.detach(), estimate.detach())
    assert st_new["rng"] != st["rng"]
    with torch.no_grad():
        assert layer(x, ps, st)[1]["solution"].jacobian_loss is None


def test_non_convergence_warns_by_default_and_raises_on_request():
    d = 4
    x = torch.randn(3, d, generator=_gen(10), dtype=F64)
    for solver, limit in ((lx.FixedPointIteration(), 2), (lx.Tsit5(), 3)):
        layer = lx.DEQ(injected_cell(d), solver, maxiters=limit, **TIGHT)
        ps, st = scaled_setup(layer, seed=11)
        with pytest.warns(ConvergenceWarning, match=r"(FixedPointIteration|Tsit5).*residual"):
            z, st_new = layer(x, ps, st)
        solution = st_new["solution"]
        assert solution.retcode is lx.NonlinearReturnCode.MaxIters and not solution.converged
        assert float(solution.residual.max()) > 1e-11
        with pytest.warns(ConvergenceWarning, match="not a fixed point"):
            torch.autograd.grad(z.sum(), lx.core.tree_leaves(ps["model"]))
        raising = lx.DEQ(injected_cell(d), solver, maxiters=limit, on_failure="raise", **TIGHT)
        with pytest.raises(NonlinearSolveError, match="residual"):
            raising(x, ps, st)


def test_nan_in_the_fixed_point_map_raises():
    d = 3
    model = nn.Chain(injected_cell(d), nn.WrappedFunction(lambda z: z / (z - z)))
    # a continuous solve carries the whole batch in one ODE solve: NaN/Inf raises whatever the policy
    layer = lx.DEQ(model, lx.Tsit5(), on_failure="ignore")
    ps, st = lx.setup(_gen(0), layer, dtype=F64)
    with pytest.raises(NonlinearSolveError, match="NaN/Inf"):
        layer(torch.randn(2, d, dtype=F64), ps, st)
    # a discrete solve reports NaN/Inf per batch element through the layer's policy
    discrete = lx.DEQ(model, lx.Broyden(), on_failure="raise")
    with pytest.raises(NonlinearSolveError, match="NaN/Inf") as info:
        discrete(torch.randn(2, d, dtype=F64), ps, st)
    assert info.value.solution.unstable.tolist() == [True, True]
    z, st_new = lx.DEQ(model, lx.Broyden(), on_failure="ignore")(torch.randn(2, d, dtype=F64), ps, st)
    solution = st_new["solution"]
    assert solution.retcode is lx.NonlinearReturnCode.Unstable and not solution.converged
    assert solution.sample_unstable.tolist() == [True, True] and not solution.sample_converged.any()
    assert torch.equal(z, torch.zeros_like(z))  # every element at its best finite iterate: the start


def test_init_model_output_shape_must_match_the_state():
    layer = lx.SkipDEQ(injected_cell(4), nn.Dense(4, 3), lx.Broyden())
    ps, st = lx.setup(_gen(0), layer, dtype=F64)
    with pytest.raises(lx.LayerError, match=r"init_model returned shape \(2, 3\) but the DEQ state has shape "
                                            r"\(2, 4\)"):
        layer(torch.randn(2, 4, dtype=F64), ps, st)


def test_misspelt_or_wrong_options_are_rejected_by_name():
    with pytest.raises(TypeError, match="did you mean 'abstol'"):
        lx.DEQ(injected_cell(2), lx.Broyden(), abstl=1e-3)
    with pytest.raises(TypeError, match="did you mean 'jacobian_regularization'"):
        lx.SkipDEQ(injected_cell(2), None, lx.Broyden(), jacobian_regularisation=1.0)
    with pytest.raises(TypeError, match="did you mean 'reltol'"):
        lx.DEQ(injected_cell(2), lx.Tsit5(), ode_options={"reltl": 1e-3})
    with pytest.raises(TypeError, match="chosen by the layer"):
        lx.DEQ(injected_cell(2), lx.Tsit5(), ode_options={"callback": None})
    with pytest.raises(TypeError, match="ode_options apply to continuous"):
        lx.DEQ(injected_cell(2), lx.Broyden(), ode_options={"reltol": 1e-3})
    with pytest.raises(TypeError, match="did you mean 'memory'"):
        lx.DEQ(injected_cell(2), lx.LimitedMemoryBroyden(memry=5))
    with pytest.raises(TypeError, match="solver must be"):
        lx.DEQ(injected_cell(2), "broyden")
    with pytest.raises(TypeError, match="sensealg must be"):
        lx.DEQ(injected_cell(2), lx.Broyden(), sensealg=lx.BacksolveAdjoint())
    with pytest.raises(ValueError, match="on_failure"):
        lx.DEQ(injected_cell(2), lx.Broyden(), on_failure="explode")
    with pytest.raises(ValueError, match="jacobian_regularization"):
        lx.DEQ(injected_cell(2), lx.Broyden(), jacobian_regularization=-1.0)
    with pytest.raises(TypeError, match="model must be a pylux layer"):
        lx.DEQ(torch.tanh, lx.Broyden())
    layer = lx.DEQ(injected_cell(2), lx.Broyden())
    ps, st = lx.setup(_gen(0), layer)
    with pytest.raises(lx.LayerError, match="floating-point tensor"):
        layer(torch.ones(3, 2, dtype=torch.int64), ps, st)


def test_jacobian_free_backprop_in_the_layer_equals_one_step_backprop():
    d = 4
    layer = lx.DEQ(injected_cell(d), lx.Broyden(), sensealg=JacobianFreeBackprop(), **TIGHT)
    ps, st = scaled_setup(layer, seed=12)
    x = torch.randn(3, d, generator=_gen(13), dtype=F64)
    z, _ = layer(x, ps, st)
    leaves = lx.core.tree_leaves(ps["model"])
    got = torch.autograd.grad(cubic_loss(z), leaves)
    expected = torch.autograd.grad(cubic_loss(apply_cell(layer.model, z.detach(), x, ps["model"], st["model"])),
                                   leaves)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------ MultiScaleDEQ

def upsample2(y):
    return torch.nn.functional.interpolate(y, scale_factor=2, mode="nearest")


def tiny_multiscale(solver, **options):
    """Two resolutions, (1, 4, 4) and (1, 2, 2): 3x3 convolutions, mean-pool down, nearest up."""
    main_1 = nn.Chain(nn.Parallel("+", nn.Conv(3, (1, 1), padding=1), nn.NoOpLayer()),
                      nn.WrappedFunction(torch.tanh))
    main_2 = nn.Conv(3, (1, 1), torch.tanh, padding=1)
    mapping = [[None, nn.WrappedFunction(upsample2)], [nn.MeanPool(2), None]]
    post = [nn.WrappedFunction(lambda y: 0.5 * y), nn.WrappedFunction(lambda y: 0.5 * torch.tanh(y))]
    return lx.MultiScaleDEQ([main_1, main_2], mapping, post, solver, scales=[(1, 4, 4), (1, 2, 2)], **options)


def multiscale_by_hand(layer, ps, st, z1, z2, x):
    y1 = torch.tanh(torch.nn.functional.conv2d(z1, ps["main_1"]["layer_1"]["layer_1"]["weight"],
                                               ps["main_1"]["layer_1"]["layer_1"]["bias"], padding=1) + x)
    y2 = torch.tanh(torch.nn.functional.conv2d(z2, ps["main_2"]["weight"], ps["main_2"]["bias"], padding=1))
    return 0.5 * (y1 + upsample2(y2)), 0.5 * torch.tanh(y2 + torch.nn.functional.avg_pool2d(y1, 2))


def test_multiscale_deq_fixed_point_and_gradients_match_finite_differences():
    layer = tiny_multiscale(lx.Broyden(), sensealg=SteadyStateAdjoint(tol=1e-12), abstol=1e-13, reltol=0.0)
    ps, st = lx.setup(_gen(0), layer, dtype=F64)
    assert set(ps) == {"main_1", "main_2", "map_1_2", "map_2_1", "post_1", "post_2"}
    leaves = lx.core.tree_leaves(ps)
    for leaf in leaves:
        leaf.requires_grad_(True)
    x = torch.randn(2, 1, 4, 4, generator=_gen(1), dtype=F64, requires_grad=True)
    (z1, z2), st_new = layer(x, ps, st)
    assert z1.shape == (2, 1, 4, 4) and z2.shape == (2, 1, 2, 2)
    assert st_new["solution"].z_star.shape == (2, 20) and st_new["solution"].converged
    f1, f2 = multiscale_by_hand(layer, ps, st, z1.detach(), z2.detach(), x)
    torch.testing.assert_close(f1, z1.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(f2, z2.detach(), rtol=0, atol=1e-12)

    def loss(outputs):
        a, b = outputs
        return cubic_loss(a.reshape(2, -1)) + (b ** 2).sum()

    wrt = [x, *leaves]
    grads = torch.autograd.grad(loss((z1, z2)), wrt)
    h = 1e-6
    with torch.no_grad():
        for leaf, grad in zip(wrt, grads):
            # Every parameter entry; the first row of the input (the rest is the same code path).
            entries = range(leaf.numel()) if leaf is not x else range(4)
            numeric = torch.zeros(len(entries), dtype=F64)
            for i in entries:
                leaf.view(-1)[i] += h
                up = loss(layer(x, ps, st)[0])
                leaf.view(-1)[i] -= 2 * h
                down = loss(layer(x, ps, st)[0])
                leaf.view(-1)[i] += h
                numeric[i] = (up - down) / (2 * h)
            torch.testing.assert_close(grad.reshape(-1)[:len(entries)], numeric, rtol=1e-6, atol=1e-8)


def test_multiscale_deq_continuous_agrees_and_rejects_malformed_layers():
    x = torch.randn(2, 1, 4, 4, generator=_gen(2), dtype=F64)
    results = []
    for solver in (lx.Broyden(), lx.Tsit5()):
        layer = tiny_multiscale(solver, abstol=1e-9, reltol=0.0)
        ps, st = lx.setup(_gen(0), layer, dtype=F64)
        results.append(layer(x, ps, st)[0])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)
    conv = nn.Conv(3, (1, 1), padding=1)
    with pytest.raises(ValueError, match="2 x 2 nested list"):
        lx.MultiScaleDEQ([conv, conv], [[None]], None, lx.Broyden(), scales=[(1, 4, 4), (1, 2, 2)])
    with pytest.raises(ValueError, match="must be None"):
        lx.MultiScaleDEQ([conv, conv], [[conv, None], [None, None]], None, lx.Broyden(),
                         scales=[(1, 4, 4), (1, 2, 2)])
    with pytest.raises(ValueError, match="1 main layers for 2 scales"):
        lx.MultiScaleDEQ([conv], [[None, None], [None, None]], None, lx.Broyden(), scales=[(1, 4, 4), (1, 2, 2)])
    bad = lx.MultiScaleDEQ([nn.Chain(nn.Parallel("+", conv, nn.NoOpLayer())), conv],
                           [[None, None], [nn.WrappedFunction(lambda y: y), None]], None, lx.Broyden(),
                           scales=[(1, 4, 4), (1, 2, 2)])
    ps, st = lx.setup(_gen(0), bad, dtype=F64)
    with pytest.raises(lx.LayerError, match=r"map_2_1 returned per-sample shape \(1, 4, 4\) but the scale it feeds "
                                            r"has shape \(1, 2, 2\)"):
        bad(x, ps, st)


# the deq-digits experiment is tested with the others in tests/test_experiments.py


@pytest.mark.parametrize("alg", [SteadyStateAdjoint(), JacobianFreeBackprop()], ids=repr)
def test_second_derivatives_through_the_implicit_gradient_raise(alg):
    ps, x = cell_problem(seed=9)
    z = alg.attach_gradient(cell, tight_fixed_point(ps, x), x, ps)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.autograd.grad((z ** 2).sum() + (ps["W"] ** 2).sum(), [ps["W"]], create_graph=True)


def _sqrt_of_c_cell(z, x, ps):
    # d/dc sqrt(c) is infinite at c = 0: the value and the z-products are finite, d/dc is 0 * inf = NaN.
    return cell(z, x, ps) + 0.0 * torch.sqrt(ps["c"])


@pytest.mark.parametrize("tol, atol", [(0.0, 1e-12), (1e-10, 0.0), (1e-10, 1e-12)])
def test_fixed_point_adjoint_delivers_its_residual_with_the_gradient_check(tol, atol):
    """The worst relative residual comes back with the final gradients' finiteness test, as a float equal to
    max_b ||g_b - (I - J)^T lambda_b|| / ||g_b||, also when that test raises."""
    ps, x = cell_problem(seed=13)
    z_star = tight_fixed_point(ps, x)
    alg = SteadyStateAdjoint(solver=lx.FixedPointIteration(), tol=tol, atol=atol, maxiters=500)
    record: dict = {}
    z = alg.attach_gradient(cell, z_star, x, ps, record=record)
    grads = torch.autograd.grad(cubic_loss(z), [x, *ps.values()])
    assert type(record["residual"]) is float and record["converged"]
    # the same gradient from lambda solved to 1e-14 (the adjoint stopped at its tolerance, ~1e-10)
    z_leaf = z_star.detach().requires_grad_(True)
    fz = cell(z_leaf, x, ps)
    (g,) = torch.autograd.grad(cubic_loss(z_leaf), [z_leaf])
    lam = nlsolve(lambda v: torch.autograd.grad(fz, z_leaf, v, retain_graph=True)[0] + g, g,
                  lx.FixedPointIteration(), abstol=1e-14, reltol=0.0, maxiters=2000).z
    expected = torch.autograd.grad(fz, [x, *ps.values()], lam)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    assert 0.0 < record["residual"] <= max(tol, atol / float(torch.linalg.vector_norm(g, dim=1).min()))

    bad = {**{k: v.detach().clone().requires_grad_(True) for k, v in ps.items()},
           "c": torch.zeros(1, dtype=F64, requires_grad=True)}
    record = {}
    z = alg.attach_gradient(_sqrt_of_c_cell, z_star, x, bad, record=record)
    with pytest.raises(NonlinearSolveError, match="SteadyStateAdjoint: the gradient of fixed point is NaN or Inf"):
        torch.autograd.grad(cubic_loss(z), [bad["W"], bad["c"]])
    assert type(record["residual"]) is float and math.isfinite(record["residual"]) and record["converged"]


@pytest.mark.parametrize("tol", [0.0, 1e-10])
def test_fixed_point_adjoint_names_a_non_finite_incoming_gradient(tol):
    ps, x = cell_problem(seed=6)
    alg = SteadyStateAdjoint(solver=lx.FixedPointIteration(), tol=tol, atol=1e-12)
    z = alg.attach_gradient(cell, tight_fixed_point(ps, x), x, ps)
    weight = torch.ones_like(z)
    weight[1, 2] = float("nan")
    with pytest.raises(NonlinearSolveError, match=r"0 iterations \(the incoming gradient is not finite\)"):
        torch.autograd.grad((z * weight).sum(), [ps["W"]])


@pytest.mark.parametrize("alg", [SteadyStateAdjoint(tol=1e-10),
                                 SteadyStateAdjoint(solver=lx.FixedPointIteration(), tol=0.0, atol=1e-12),
                                 SteadyStateAdjoint(solver=lx.Anderson(memory=3), tol=1e-10)], ids=repr)
def test_adjoint_products_by_the_engine_equal_those_of_autograd_grad(monkeypatch, alg):
    """The adjoint's vector-Jacobian products skip torch.autograd.grad's argument checks for plain tensors;
    torch.autograd.grad itself gives the same gradients and counters, bit for bit."""
    from pylux.sensitivity import steady_state
    ps, x = cell_problem(seed=14)
    z_star = tight_fixed_point(ps, x)
    real, calls = steady_state._engine_run_backward, [0]
    assert real is not None  # this torch has the engine call

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    results = []
    for engine in (counting, None):
        monkeypatch.setattr(steady_state, "_engine_run_backward", engine)
        record: dict = {}
        grads = torch.autograd.grad(cubic_loss(alg.attach_gradient(cell, z_star, x, ps, record=record)),
                                    [x, *ps.values()])
        results.append((grads, record))
    (fast, fast_record), (plain, plain_record) = results
    assert fast_record == plain_record and fast_record["converged"]
    assert calls[0] == fast_record["matvecs"] > 0  # every product went to the engine directly
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
