"""Reversible, checkpointed and quadrature adjoints; the memory model; bad inputs of every sensealg."""

import math

import pytest
import torch

import pylux as lx
from pylux.sensitivity import (BacksolveAdjoint, DirectAdjoint, InterpolatingAdjoint, QuadratureAdjoint,
                               ReversibleAdjoint)

F64 = torch.float64


from test_sensitivity import field, make_inputs as inputs  # noqa: E402  (the shared small problem)


def loss_and_grads(alg, tspan=(0.0, 1.0), saveat=(0.3, 0.7, 1.0), seed=0, solver=None, **kw):
    u0, W, b = inputs(seed)
    prob = lx.ODEProblem(field, u0, tspan, {"W": W, "b": b})
    kw = {"reltol": 1e-7, "abstol": 1e-7, **kw}
    sol = lx.solve(prob, solver or lx.Tsit5(), saveat=list(saveat), sensealg=alg, **kw)
    weights = torch.arange(1, len(saveat) + 1, dtype=F64).view(-1, 1, 1)
    loss = (weights * sol.u ** 2).sum()
    return loss, torch.autograd.grad(loss, [u0, W, b]), sol


@pytest.mark.parametrize("tspan,saveat", [((0.0, 1.0), (0.3, 0.7, 1.0)), ((1.0, -0.5), (0.6, 0.1, -0.5)),
                                          ((0.0, 1.0), (0.0, 0.45, 0.8))])
@pytest.mark.parametrize("steps", [{}, {"dt": 0.07, "adaptive": False}], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("base", [lx.Tsit5(), lx.Midpoint()], ids=repr)
def test_reversible_gradient_is_the_exact_discrete_gradient(tspan, saveat, steps, base):
    alg = ReversibleAdjoint(coupling=0.99)
    tol = {"reltol": 1e-5, "abstol": 1e-5}  # a few hundred Midpoint steps
    loss, grads, sol = loss_and_grads(alg, tspan, saveat, solver=base, **tol, **steps)
    ref_loss, ref_grads, ref_sol = loss_and_grads(ReversibleAdjoint(coupling=0.99, backprop=True), tspan,
                                                  saveat, solver=base, **tol, **steps)
    assert sol.stats.naccept == ref_sol.stats.naccept > 2
    torch.testing.assert_close(loss, ref_loss, rtol=1e-14, atol=0)
    for g, ref in zip(grads, ref_grads):
        assert ref.abs().max() > 1e-2
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-11)
    stats = sol.backward_stats
    assert stats["nsteps"] == sol.stats.naccept
    assert stats["reconstruction_error"] < 1e-12
    assert stats["nvjp"] == 2 * stats["nsteps"] - 1  # the last step needs no backward increment


def test_reversible_solution_and_gradient_approach_the_ode_ones():
    loss, grads, _ = loss_and_grads(ReversibleAdjoint(), reltol=1e-10, abstol=1e-10)
    ref_loss, ref_grads, _ = loss_and_grads(DirectAdjoint(), reltol=1e-10, abstol=1e-10)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=0)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-8)


def test_reconstruction_error_grows_like_inverse_coupling_power():
    # 2345 Midpoint steps: 0.99^-2345 ~ 1.7e10 amplifies rounding to ~1e-5, 0.999^-2345 ~ 10 does not
    errors = {}
    for coupling in (0.99, 0.999):
        alg = ReversibleAdjoint(coupling=coupling)
        _, _, sol = loss_and_grads(alg, solver=lx.Midpoint(), reltol=1e-7, abstol=1e-7)
        assert sol.backward_stats["nsteps"] > 2000
        errors[coupling] = sol.backward_stats["reconstruction_error"]
    assert errors[0.999] < 1e-12 < 1e-8 < errors[0.99], errors


def test_reversible_method_keeps_the_base_order():
    # u' = -u: the reversible RK4 and Midpoint reach their base orders
    u0 = torch.ones(1, dtype=F64)
    prob = lx.ODEProblem(lambda u, p, t: -u, u0, (0.0, 1.0))
    for base, order in ((lx.RK4(), 4), (lx.Midpoint(), 2)):
        errors = []
        dts = (0.1, 0.05, 0.025)
        for dt in dts:
            sol = lx.solve(prob, base, dt=dt, adaptive=False, saveat=[1.0], sensealg=ReversibleAdjoint())
            errors.append(abs(float(sol.u[-1, 0]) - math.exp(-1.0)))
        slope = math.log(errors[0] / errors[-1]) / math.log(dts[0] / dts[-1])
        assert abs(slope - order) < 0.3, (base, errors, slope)


@pytest.mark.parametrize("alg", [QuadratureAdjoint(), QuadratureAdjoint(nodes=5),
                                 InterpolatingAdjoint(checkpointing=True),
                                 InterpolatingAdjoint(checkpointing=7),
                                 InterpolatingAdjoint(checkpointing=[0.05, 0.5, 0.95])], ids=repr)
def test_quadrature_and_checkpointed_agree_with_interpolating(alg):
    _, grads, sol = loss_and_grads(alg, reltol=1e-10, abstol=1e-10)
    _, ref, _ = loss_and_grads(InterpolatingAdjoint(), reltol=1e-10, abstol=1e-10)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)
    stats = sol.backward_stats
    assert stats["nf"] > 0 and stats["nvjp"] > 0
    if isinstance(alg, QuadratureAdjoint):
        assert stats["nquadrature"] >= stats["naccept"]
    else:
        assert stats["nf_forward_resolve"] > 0


def test_checkpointing_stores_no_dense_output_and_resolves_each_interval():
    u0, W, b = inputs(3)
    prob = lx.ODEProblem(field, u0, (0.0, 1.0), {"W": W, "b": b})
    alg = InterpolatingAdjoint(checkpointing=4)
    sol = lx.solve(prob, lx.Tsit5(), saveat=[1.0], sensealg=alg, reltol=1e-8, abstol=1e-8)
    assert len(sol.t) == 1  # checkpoint rows are not returned
    assert sol.u.grad_fn.__class__.__name__ == "_AdjointFunctionBackward"
    ctx = sol.u.grad_fn
    assert ctx.dense is None and len(ctx.times) == 4  # three interior checkpoints and t1
    sol.u.sum().backward()
    assert sol.backward_stats["nf_forward_resolve"] > 0


def test_zero_length_span_gives_identity_gradient():
    u0, W, b = inputs(4)
    for alg in (BacksolveAdjoint(), InterpolatingAdjoint(), QuadratureAdjoint(), ReversibleAdjoint()):
        prob = lx.ODEProblem(field, u0, (0.5, 0.5), {"W": W, "b": b})
        sol = lx.solve(prob, lx.Tsit5(), sensealg=alg)
        g_u0, g_W = torch.autograd.grad(sol.u[-1].sum(), [u0, W], allow_unused=True)
        torch.testing.assert_close(g_u0, torch.ones_like(u0))
        assert g_W is None or torch.equal(g_W, torch.zeros_like(W))


def kelly_field(scale=3.0, batch=4, d=784, hidden=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = {"W1": (torch.rand(hidden, d + 1, generator=g, dtype=F64) * 2 - 1) / (d + 1) ** 0.5 * scale,
         "b1": (torch.rand(hidden, generator=g, dtype=F64) * 2 - 1) / (d + 1) ** 0.5 * scale,
         "W2": (torch.rand(d, hidden, generator=g, dtype=F64) * 2 - 1) / hidden ** 0.5 * scale,
         "b2": (torch.rand(d, generator=g, dtype=F64) * 2 - 1) / hidden ** 0.5 * scale}
    p = {k: v.requires_grad_(True) for k, v in p.items()}

    def f(u, p, t):
        pre = u @ p["W1"][:, :d].T + t * p["W1"][:, d] + p["b1"]
        return torch.tanh(pre) @ p["W2"].T + p["b2"]
    return f, p, torch.rand(batch, d, generator=g, dtype=F64)


def test_seminorm_cuts_backward_evaluations_on_the_mnist_shaped_field():
    f, p, u0 = kelly_field(batch=2)
    counts, grads = {}, {}
    for seminorm in (False, True):
        alg = BacksolveAdjoint(seminorm=seminorm)
        sol = lx.solve(lx.ODEProblem(f, u0, (0.0, 1.0), p), lx.Tsit5(), saveat=[1.0], reltol=1e-4,
                       abstol=1e-4, sensealg=alg)
        grads[seminorm] = torch.autograd.grad((sol.u ** 2).sum(), list(p.values()))
        counts[seminorm] = sol.backward_stats["nf"]
    assert counts[True] < counts[False], counts
    for g, r in zip(grads[True], grads[False]):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4 * float(r.abs().max()))


def saved_bytes(alg, n_steps):
    """Bytes of tensors autograd keeps for the backward pass of a fixed-step solve of n_steps."""
    u0, W, b = inputs(5)
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        prob = lx.ODEProblem(field, u0, (0.0, 1.0), {"W": W, "b": b})
        sol = lx.solve(prob, lx.RK4(), dt=1.0 / n_steps, saveat=[1.0], sensealg=alg)
    sol.u.sum().backward()
    return total[0]


def test_memory_of_backsolve_and_reversible_does_not_grow_with_steps():
    for alg in (BacksolveAdjoint(), ReversibleAdjoint(), InterpolatingAdjoint(checkpointing=4)):
        assert saved_bytes(alg, 10) == saved_bytes(alg, 200) > 0
    direct_10, direct_200 = saved_bytes(DirectAdjoint(), 10), saved_bytes(DirectAdjoint(), 200)
    assert direct_200 > 15 * direct_10


@pytest.mark.parametrize("alg", [InterpolatingAdjoint(), QuadratureAdjoint()], ids=repr)
def test_interpolating_and_quadrature_hold_the_whole_dense_output(alg):
    # outside save_for_backward, so counted here: one interpolant per forward step
    u0, W, b = inputs(5)
    for n_steps in (10, 200):
        prob = lx.ODEProblem(field, u0, (0.0, 1.0), {"W": W, "b": b})
        sol = lx.solve(prob, lx.RK4(), dt=1.0 / n_steps, saveat=[1.0], sensealg=alg)
        assert len(sol.u.grad_fn.dense._dense.pieces) == n_steps


def test_checkpoints_land_on_a_float32_time_grid():
    u0, W, b = inputs(8)
    tspan = (torch.tensor(0.1, dtype=torch.float32), torch.tensor(1.1, dtype=torch.float32))
    saveat = [0.3, 0.7, 1.1]

    def run(alg):
        prob = lx.ODEProblem(field, u0, tspan, {"W": W, "b": b})
        sol = lx.solve(prob, lx.Tsit5(), saveat=saveat, reltol=1e-10, abstol=1e-10, sensealg=alg)
        return sol, torch.autograd.grad((sol.u ** 2).sum(), [u0, W])
    ref_sol, ref = run(DirectAdjoint())
    for alg in (InterpolatingAdjoint(checkpointing=10), InterpolatingAdjoint(checkpointing=[0.3, 0.7])):
        sol, grads = run(alg)
        assert sol.t.tolist() == ref_sol.t.tolist() and sol.u.shape == ref_sol.u.shape == (3, 2, 3)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)


def test_reversible_saves_what_the_other_sensealgs_save():
    u0, W, b = inputs(9)
    prob = lx.ODEProblem(field, u0, (0.0, 1.0), {"W": W, "b": b})
    for kwargs in ({"saveat": [0.3, 1.0], "save_end": False}, {"save_end": False}, {"saveat": [0.0, 0.5]}):
        ref = lx.solve(prob, lx.Tsit5(), reltol=1e-8, abstol=1e-8, **kwargs)
        rev = lx.solve(prob, lx.Tsit5(), reltol=1e-8, abstol=1e-8, sensealg=ReversibleAdjoint(), **kwargs)
        if "saveat" in kwargs:
            assert rev.t.tolist() == ref.t.tolist(), kwargs
        else:  # every step: the reversible method takes its own steps, but not t1 without save_end
            assert rev.t[-1] < 1.0 and ref.t[-1] < 1.0
        grads = torch.autograd.grad(rev.u.sum(), [u0, W])
        ref_grads = torch.autograd.grad(ref.u.sum(), [u0, W]) if "saveat" in kwargs else grads
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alg", [BacksolveAdjoint(), InterpolatingAdjoint(), QuadratureAdjoint(),
                                 ReversibleAdjoint()], ids=repr)
def test_second_derivatives_raise_instead_of_returning_zero(alg):
    u0, W, b = inputs(10)
    prob = lx.ODEProblem(field, u0, (0.0, 1.0), {"W": W, "b": b})
    sol = lx.solve(prob, lx.Tsit5(), saveat=[1.0], sensealg=alg)
    with pytest.raises(NotImplementedError, match="second derivatives through an adjoint solve"):
        torch.autograd.grad((sol.u ** 2).sum() + (W ** 2).sum(), [W], create_graph=True)
    (g_W,) = torch.autograd.grad((sol.u ** 2).sum(), [W])  # first derivatives are unaffected
    assert g_W.abs().max() > 0


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"coupling \(lambda\) must be in \(0, 1\]"):
        ReversibleAdjoint(coupling=0.0)
    with pytest.raises(ValueError, match="coupling"):
        ReversibleAdjoint(coupling=1.5)
    with pytest.raises(TypeError, match="explicit Runge–Kutta"):
        ReversibleAdjoint(lx.VCAB3())
    with pytest.raises(ValueError, match="n >= 1"):
        InterpolatingAdjoint(checkpointing=0)
    with pytest.raises(TypeError, match="checkpointing must be"):
        InterpolatingAdjoint(checkpointing="yes")
    with pytest.raises(ValueError, match="nodes must be a positive int"):
        QuadratureAdjoint(nodes=0)
    with pytest.raises(TypeError, match="seminorm must be True or False"):
        BacksolveAdjoint(seminorm="yes")
    with pytest.raises(ValueError, match="reltol must be a finite number > 0"):
        BacksolveAdjoint(reltol=-1.0)
    u0, W, b = inputs(6)
    prob = lx.ODEProblem(field, u0, (0.0, 1.0), {"W": W, "b": b})
    with pytest.raises(ValueError, match="outside tspan"):
        lx.solve(prob, lx.Tsit5(), saveat=[1.0], sensealg=InterpolatingAdjoint(checkpointing=[0.5, 2.0]))
    with pytest.raises(TypeError, match="not a one-step method"):
        lx.solve(prob, lx.VCAB3(), sensealg=ReversibleAdjoint())
    with pytest.raises(NotImplementedError, match="termination callbacks"):
        lx.solve(prob, lx.Tsit5(), sensealg=ReversibleAdjoint(), callback=lx.TerminateSteadyState())
    for alg in (BacksolveAdjoint(), ReversibleAdjoint()):
        with pytest.raises(NotImplementedError, match="DirectAdjoint"):
            lx.solve(prob, lx.Tsit5(), sensealg=alg, save_stats=True)
    with pytest.raises(NotImplementedError, match="tensor abstol"):
        lx.solve(prob, lx.Tsit5(), sensealg=BacksolveAdjoint(), abstol=torch.full((2, 3), 1e-6, dtype=F64))


def test_reversible_failure_is_loud():
    u0 = torch.ones(1, dtype=F64)
    prob = lx.ODEProblem(lambda u, p, t: u ** 2, u0, (0.0, 10.0))  # blows up at t = 1
    with pytest.raises(lx.SolverError, match="retcode"):
        lx.solve(prob, lx.Tsit5(), sensealg=ReversibleAdjoint(), maxiters=500)
    sol = lx.solve(prob, lx.Tsit5(), sensealg=ReversibleAdjoint(), maxiters=500, throw=False)
    assert sol.retcode in (lx.ReturnCode.DtLessThanMin, lx.ReturnCode.MaxIters, lx.ReturnCode.Unstable)
    assert "retcode" in sol.message and sol.stats.naccept > 0


def test_interpolating_backward_reads_the_dense_output_without_host_copies(monkeypatch):
    from test_diffeq_loop import SyncCounter

    u0, W, b = inputs(7)
    prob = lx.ODEProblem(field, u0, (0.0, 1.0), {"W": W, "b": b})
    alg = InterpolatingAdjoint()
    sol = lx.solve(prob, lx.Tsit5(), saveat=[0.5, 1.0], sensealg=alg, reltol=1e-8, abstol=1e-8)
    loss = sol.u.sum()
    counter = SyncCounter(monkeypatch)
    loss.backward()
    stats = sol.backward_stats
    # per backward trial step one (the error norm), per segment two (the initial-step heuristic);
    # none per stage evaluation, though each reads z(t) from the forward dense output
    assert stats["nf"] > 3 * (stats["naccept"] + stats["nreject"])
    assert counter.count == stats["naccept"] + stats["nreject"] + 2 * 2
