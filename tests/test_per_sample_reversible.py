"""ReversibleAdjoint under batch="per-sample": the per-sample reversible solve and its exact backward pass.

The gradient is checked against backpropagation through the same per-sample reversible solve
(``ReversibleAdjoint(backprop=True)``, to round-off), against central finite differences of the
discrete solve in float64, and against DirectAdjoint's per-sample Tsit5 solve (to the solve's
accuracy); a one-sample batch against the joint ReversibleAdjoint (equal steps, evaluations and
products, gradient to round-off); each sample of a batch against its own solve; exact counts of the
backward pass; memory constant in the number of steps; refusals by their messages.
"""

import math

import pytest
import torch

import pylux.diffeq as de
from pylux.sensitivity import DirectAdjoint, HiddenParameterError, ReversibleAdjoint

F64 = torch.float64


def shared_field(u, p, t):
    """Parameters shared by every sample, a per-sample time forcing (t is (B,) per sample, 0-d jointly)."""
    return torch.tanh(u @ p["W"]) + torch.sin(t).reshape(-1, 1) * p["q"]


def case(batch=3, seed=0, count=4, hi=2.0):
    g = torch.Generator().manual_seed(seed)
    p = {"W": 0.8 * torch.randn(2, 2, generator=g, dtype=F64), "q": torch.randn(2, generator=g, dtype=F64)}
    u0 = torch.randn(batch, 2, generator=g, dtype=F64)
    times = hi * torch.sort(torch.rand(batch, count, generator=g, dtype=F64), dim=1).values
    return p, u0, times


def leaves(p, u0):
    return {k: v.clone().requires_grad_(True) for k, v in p.items()}, u0.clone().requires_grad_(True)


def solve(p, u0, saveat, sensealg, batch="per-sample", tspan=(0.0, 2.0), solver=None, **kw):
    options = dict(reltol=1e-6, abstol=1e-6)
    options.update(kw)
    return de.solve(de.ODEProblem(shared_field, u0, tspan, p), solver or de.Tsit5(), saveat=saveat, batch=batch,
                    sensealg=sensealg, **options)


def weighted(sol, mask=None):
    """A loss whose terms weigh every saved row differently (a wrong row mapping cannot cancel)."""
    rows = sol.u.shape[0]
    u = sol.u if mask is None else sol.u * mask.T[..., None]
    weights = torch.arange(1, rows + 1, dtype=F64).reshape((rows,) + (1,) * (u.dim() - 1))
    return (weights * torch.sin(u) * u).sum()


def grads_of(p, u0, saveat, sensealg, mask=None, **kw):
    q, x0 = leaves(p, u0)
    sol = solve(q, x0, saveat, sensealg, **kw)
    loss = weighted(sol, mask)
    return loss, torch.autograd.grad(loss, [x0, q["W"], q["q"]]), sol


def assert_all_close(got, want, rtol, atol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


# --- exact discrete gradient ------------------------------------------------------------------

@pytest.mark.parametrize("steps", [{}, {"dt": 0.05, "adaptive": False}], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("base", [de.Tsit5(), de.Midpoint()], ids=repr)
def test_gradient_equals_backprop_through_the_same_per_sample_solve(steps, base):
    p, u0, times = case(batch=3, seed=1)
    tol = {"reltol": 1e-4, "abstol": 1e-4}
    loss, grads, sol = grads_of(p, u0, times, ReversibleAdjoint(base, coupling=0.99), **tol, **steps)
    ref_loss, ref_grads, ref_sol = grads_of(p, u0, times, ReversibleAdjoint(base, coupling=0.99, backprop=True),
                                            **tol, **steps)
    assert torch.equal(sol.stats.naccept_per_sample, ref_sol.stats.naccept_per_sample)
    assert int(sol.stats.naccept_per_sample.min()) > 5
    torch.testing.assert_close(loss, ref_loss, rtol=1e-14, atol=0)
    for g, ref in zip(grads, ref_grads):
        assert ref.abs().max() > 1e-2
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-11)
    stats = sol.backward_stats
    assert stats["reconstruction_error"] < 1e-12
    assert torch.equal(stats["nsteps_per_sample"], sol.stats.naccept_per_sample)


def test_gradient_matches_finite_differences_of_the_discrete_solve():
    # fixed steps: the discrete solve is a smooth map of (u0, W, q), so central differences converge to
    # exactly the gradient of the reversible solve
    p, u0, times = case(batch=3, seed=2)
    steps = dict(dt=0.1, adaptive=False)
    _, grads, _ = grads_of(p, u0, times, ReversibleAdjoint(coupling=0.9), **steps)

    def value(p_, u0_):
        with torch.no_grad():
            return float(weighted(solve(p_, u0_, times, ReversibleAdjoint(coupling=0.9), **steps)))
    eps = 1e-6
    for which, (index, got) in (("u0", ((1, 0), grads[0])), ("W", ((0, 1), grads[1])), ("q", ((1,), grads[2]))):
        plus = {k: v.clone() for k, v in p.items()}
        minus = {k: v.clone() for k, v in p.items()}
        x_plus, x_minus = u0.clone(), u0.clone()
        target_plus, target_minus = (x_plus, x_minus) if which == "u0" else (plus[which], minus[which])
        target_plus[index] += eps
        target_minus[index] -= eps
        fd = (value(plus, x_plus) - value(minus, x_minus)) / (2 * eps)
        assert abs(fd) > 1e-2
        assert abs(float(got[index]) - fd) <= 1e-7 * max(1.0, abs(fd)), (which, float(got[index]), fd)


def test_gradient_approaches_direct_adjoint_of_the_ode():
    p, u0, times = case(batch=3, seed=3)
    tol = dict(reltol=1e-10, abstol=1e-10)
    loss, grads, _ = grads_of(p, u0, times, ReversibleAdjoint(), **tol)
    ref_loss, ref_grads, _ = grads_of(p, u0, times, DirectAdjoint(), **tol)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=0)
    assert_all_close(grads, ref_grads, rtol=1e-6, atol=1e-8)


# --- steps: a sample's own solve ---------------------------------------------------------------

# (scale, reltol, rejects, rtol): the second solve rejects steps; its step ends move by ~1e-10 under a
# 1e-16 change of u0 (the joint solve's own sensitivity: its error estimates cancel heavily), so the two
# implementations' round-off differences (controller on host floats or tensors, dt folded into the weights
# or not) reach the gradient at that level
@pytest.mark.parametrize("scale,reltol,rejects,rtol", [(1.0, 1e-6, False, 1e-12), (6.0, 1e-5, True, 1e-8)],
                         ids=["smooth", "rejecting"])
def test_one_sample_batch_equals_the_joint_reversible_solve(scale, reltol, rejects, rtol):
    p, u0, times = case(batch=1, seed=4, count=5)
    p = dict(p, W=scale * p["W"], q=scale * p["q"])
    tol = dict(reltol=reltol, abstol=reltol)
    alg = ReversibleAdjoint(coupling=0.99)
    loss, grads, sol = grads_of(p, u0, times, alg, **tol)
    joint_loss, joint_grads, joint = grads_of(p, u0, times[0].tolist(), alg, batch="joint", **tol)
    assert (joint.stats.nreject > 0) == rejects
    assert int(sol.stats.naccept_per_sample[0]) == joint.stats.naccept
    assert int(sol.stats.nreject_per_sample[0]) == joint.stats.nreject
    assert int(sol.stats.nf_per_sample[0]) == joint.stats.nf
    torch.testing.assert_close(sol.u[:, 0], joint.u[:, 0], rtol=rtol, atol=rtol * 1e-2)
    torch.testing.assert_close(loss, joint_loss, rtol=rtol, atol=0)
    assert_all_close(grads, joint_grads, rtol=rtol, atol=rtol * 1e-2)
    for key in ("nf", "nvjp", "nsteps"):
        assert sol.backward_stats[key] == joint.backward_stats[key], key


def test_each_sample_takes_exactly_the_steps_of_its_own_solve():
    p, u0, times = case(batch=4, seed=5)
    p = dict(p, W=3 * p["W"])  # samples of different difficulty
    tol = dict(reltol=1e-5, abstol=1e-5)
    _, grads, sol = grads_of(p, u0, times, ReversibleAdjoint(), **tol)
    stats = sol.stats
    assert len(set(stats.naccept_per_sample.tolist())) > 1  # the samples do take different steps
    assert int(stats.nreject_per_sample.sum()) > 0
    grad_u0 = []
    for b in range(4):
        _, solo_grads, solo = grads_of(p, u0[b:b + 1], times[b:b + 1], ReversibleAdjoint(), **tol)
        for key in ("naccept_per_sample", "nreject_per_sample", "nf_per_sample"):
            assert int(getattr(stats, key)[b]) == int(getattr(solo.stats, key)[0]), (b, key)
        assert int(sol.backward_stats["nsteps_per_sample"][b]) == solo.backward_stats["nsteps"]
        torch.testing.assert_close(sol.u[:, b], solo.u[:, 0], rtol=1e-13, atol=1e-14)
        grad_u0.append(solo_grads[0])
    torch.testing.assert_close(grads[0], torch.cat(grad_u0), rtol=1e-11, atol=1e-13)


def test_ragged_series_with_per_sample_spans():
    p, u0, times = case(batch=4, seed=6, count=4)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False], [True, True, True, True],
                         [False, False, False, False]])
    padded = torch.where(mask, times, torch.full_like(times, math.nan))
    # the second sample starts before zero, the third runs backward from 2.5, the last saves nothing
    t0 = torch.tensor([0.0, -0.5, 2.5, 0.3], dtype=F64)
    t1 = torch.tensor([2.0, 2.5, 0.0, 1.0], dtype=F64)
    padded[2] = torch.where(mask[2], 2.5 - times[2], padded[2])
    kw = dict(tspan=(t0, t1), saveat_mask=mask, reltol=1e-5, abstol=1e-5)
    loss, grads, sol = grads_of(p, u0, padded, ReversibleAdjoint(coupling=0.99), mask=mask, **kw)
    _, ref, ref_sol = grads_of(p, u0, padded, ReversibleAdjoint(coupling=0.99, backprop=True), mask=mask, **kw)
    assert torch.equal(sol.u, ref_sol.u)
    assert_all_close(grads, ref, rtol=1e-9, atol=1e-11)
    # a masked entry holds the state of the sample's last unmasked time before it, u0 when there is none
    torch.testing.assert_close(sol.u[1, 0], sol.u[0, 0], rtol=0, atol=0)
    torch.testing.assert_close(sol.u[0, 1], u0[1], rtol=0, atol=0)
    torch.testing.assert_close(sol.u[:, 3], u0[3].expand(4, 2), rtol=0, atol=0)
    # the observed values are the sample's own solve at its own times
    for b in range(3):
        rows = mask[b].nonzero().flatten()
        solo = solve(p, u0[b:b + 1], padded[b:b + 1, rows], ReversibleAdjoint(coupling=0.99),
                     tspan=(t0[b:b + 1], t1[b:b + 1]), reltol=1e-5, abstol=1e-5)
        torch.testing.assert_close(sol.u[rows, b], solo.u[:, 0], rtol=1e-13, atol=1e-14)
    _, direct, _ = grads_of(p, u0, padded, DirectAdjoint(), mask=mask, **dict(kw, reltol=1e-10, abstol=1e-10))
    _, tight, _ = grads_of(p, u0, padded, ReversibleAdjoint(), mask=mask, **dict(kw, reltol=1e-10, abstol=1e-10))
    assert_all_close(tight, direct, rtol=1e-6, atol=1e-8)
    assert float(grads[0][3].abs().max()) == 0.0  # nothing of the last sample is observed


def test_saved_times_at_the_start_and_duplicated_by_the_mask():
    p, u0, _ = case(batch=2, seed=7)
    times = torch.tensor([[0.0, 0.5, 0.5, 2.0], [0.0, 1.0, 1.5, 1.5]], dtype=F64)
    mask = torch.tensor([[True, True, False, True], [True, True, True, False]])
    kw = dict(saveat_mask=mask, reltol=1e-5, abstol=1e-5)
    _, grads, sol = grads_of(p, u0, times, ReversibleAdjoint(), **kw)
    _, ref, _ = grads_of(p, u0, times, ReversibleAdjoint(backprop=True), **kw)
    torch.testing.assert_close(sol.u[0], u0, rtol=0, atol=0)
    assert_all_close(grads, ref, rtol=1e-9, atol=1e-11)



def test_a_partial_solve_differentiates_what_it_reached():
    # maxiters stops every sample early (throw=False): the unreached times are NaN and get no gradient
    p, u0, times = case(batch=3, seed=12)
    grads = []
    for alg in (ReversibleAdjoint(), ReversibleAdjoint(backprop=True)):
        q, x0 = leaves(p, u0)
        sol = solve(q, x0, times, alg, maxiters=5, throw=False)
        assert sol.stats.retcode_per_sample == (de.ReturnCode.MaxIters,) * 3
        reached = torch.isfinite(sol.u[..., 0])
        assert 0 < int(reached.sum()) < reached.numel()
        loss = torch.nan_to_num(sol.u).pow(2).sum()
        grads.append(torch.autograd.grad(loss, [x0, q["W"], q["q"]]))
    assert_all_close(*grads, rtol=1e-9, atol=1e-11)
    assert float(grads[0][1].abs().max()) > 1e-2


@pytest.mark.slow
def test_many_steps_of_many_samples_equal_backprop():
    p, u0, times = case(batch=16, seed=13, count=6)
    p = dict(p, W=3 * p["W"])
    tol = dict(reltol=1e-6, abstol=1e-6, solver=de.Midpoint())  # 1000-2000 steps per sample
    _, grads, sol = grads_of(p, u0, times, ReversibleAdjoint(), **tol)
    _, ref, _ = grads_of(p, u0, times, ReversibleAdjoint(backprop=True), **tol)
    assert int(sol.stats.naccept_per_sample.min()) > 300
    assert sol.backward_stats["reconstruction_error"] < 1e-10
    assert_all_close(grads, ref, rtol=1e-8, atol=1e-10)

# --- costs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("base,per_increment", [(de.Tsit5(), 6), (de.Midpoint(), 2)], ids=["Tsit5", "Midpoint"])
def test_exact_evaluation_and_product_counts(base, per_increment):
    p, u0, times = case(batch=3, seed=8)
    p = dict(p, W=2 * p["W"])
    _, _, sol = grads_of(p, u0, times, ReversibleAdjoint(base), reltol=1e-4, abstol=1e-4)
    stats, back = sol.stats, sol.backward_stats
    steps = stats.naccept_per_sample
    most = int(steps.max())
    assert len(set(steps.tolist())) > 1
    # backward: the last step of every sample needs only its forward increment
    assert back["nvjp"] == 2 * most - 1
    assert back["nf"] == (2 * most - 1) * per_increment
    assert torch.equal(back["nvjp_per_sample"], 2 * steps - 1)
    assert torch.equal(back["nf_per_sample"], (2 * steps - 1) * per_increment)
    assert back["nsteps"] == int(steps.sum())
    # forward, per sample: Hairer's initial step (2), a whole base step per trial, a backward increment
    # after every accepted step but the last
    trials = steps + stats.nreject_per_sample
    stages = base.tableau.stages
    assert torch.equal(stats.nf_per_sample, 2 + stages * trials + per_increment * (steps - 1))


def saved_bytes(alg, n_steps):
    """Bytes of tensors autograd keeps for the backward pass of a fixed-step per-sample solve."""
    p, u0, _ = case(batch=3, seed=9)
    q, x0 = leaves(p, u0)
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x
    times = torch.tensor([[1.0], [0.5], [0.8]], dtype=F64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        sol = solve(q, x0, times, alg, tspan=(0.0, 1.0), dt=1.0 / n_steps, adaptive=False, solver=de.RK4())
    assert int(sol.stats.naccept_per_sample[0]) == n_steps
    sol.u.sum().backward()
    return total[0]


def test_memory_does_not_grow_with_steps():
    assert saved_bytes(ReversibleAdjoint(), 10) == saved_bytes(ReversibleAdjoint(), 200) > 0
    direct_10, direct_200 = saved_bytes(DirectAdjoint(), 10), saved_bytes(DirectAdjoint(), 200)
    assert direct_200 > 15 * direct_10


def test_coupling_one_and_a_sample_without_steps():
    p, u0, times = case(batch=2, seed=10)
    t0 = torch.tensor([0.0, 1.0], dtype=F64)
    t1 = torch.tensor([2.0, 1.0], dtype=F64)
    saveat = torch.tensor([[1.0, 2.0], [1.0, 1.0]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False]])
    kw = dict(tspan=(t0, t1), saveat_mask=mask, reltol=1e-5, abstol=1e-5)
    _, grads, sol = grads_of(p, u0, saveat, ReversibleAdjoint(coupling=1.0), **kw)
    _, ref, _ = grads_of(p, u0, saveat, ReversibleAdjoint(coupling=1.0, backprop=True), **kw)
    assert sol.stats.naccept_per_sample.tolist()[1] == 0
    assert sol.backward_stats["nvjp_per_sample"].tolist()[1] == 0
    assert_all_close(grads, ref, rtol=1e-9, atol=1e-11)
    # both rows of the second sample are u0 (the masked one holds it too): weights 1 + 2
    torch.testing.assert_close(grads[0][1], 3 * (torch.cos(u0[1]) * u0[1] + torch.sin(u0[1])), rtol=1e-14, atol=0)


# --- refusals -----------------------------------------------------------------------------------

def test_refusals():
    p, u0, times = case(batch=2, seed=11)
    q, x0 = leaves(p, u0)
    with pytest.raises(NotImplementedError, match="termination callbacks"):
        solve(q, x0, times, ReversibleAdjoint(), callback=de.TerminateWhen(lambda u, t: False))
    with pytest.raises(NotImplementedError, match="dense=True"):
        solve(q, x0, None, ReversibleAdjoint(), dense=True)
    with pytest.raises(NotImplementedError, match="save_stats"):
        solve(q, x0, times, ReversibleAdjoint(), save_stats=True)
    with pytest.raises(NotImplementedError, match="tstops"):
        solve(q, x0, times, ReversibleAdjoint(), tstops=[0.5])
    with pytest.raises(ValueError, match="no embedded error estimate.*dt="):
        solve(q, x0, times, ReversibleAdjoint(de.RK4()))
    sol = solve(q, x0, times, ReversibleAdjoint())
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.autograd.grad(weighted(sol), [q["W"]], create_graph=True)
    hidden = torch.ones(2, dtype=F64, requires_grad=True)
    prob = de.ODEProblem(lambda u, p_, t: -u * hidden, u0, (0.0, 1.0))
    with pytest.raises(HiddenParameterError):
        de.solve(prob, de.Tsit5(), batch="per-sample", sensealg=ReversibleAdjoint())
    prob = de.ODEProblem(lambda u, p_, t: -u * hidden, u0.clone().requires_grad_(True), (0.0, 1.0))
    sol = de.solve(prob, de.Tsit5(), batch="per-sample", sensealg=ReversibleAdjoint())
    with pytest.raises(HiddenParameterError):
        sol.u.sum().backward()


def test_a_diverging_pair_ends_its_sample_as_unstable():
    """Regression (found reviewing the joint fix): per sample, u' = -20 u returned u(1) = 2.59 (exact 2.1e-9)
    with Success; the per-sample pair keeps the same separation record and check as the joint one."""
    u0 = torch.ones(2, 1, dtype=torch.float64, requires_grad=True)
    rate = torch.tensor([[20.0], [1.0]], dtype=torch.float64)
    sol = de.solve(de.ODEProblem(lambda u, p, t: -rate * u, u0, (0.0, 1.0)), de.Tsit5(), batch="per-sample",
                   sensealg=ReversibleAdjoint(), reltol=1e-6, abstol=1e-6, saveat=[1.0], throw=False)
    assert sol.stats.retcode_per_sample == (de.ReturnCode.Unstable, de.ReturnCode.Success)
    assert sol.u[-1, 1, 0].item() == pytest.approx(math.exp(-1.0), rel=1e-5)
