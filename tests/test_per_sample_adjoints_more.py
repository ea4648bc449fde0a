"""QuadratureAdjoint and checkpointed InterpolatingAdjoint under batch="per-sample".

Gradients against backpropagation through the same per-sample loop (DirectAdjoint) on ragged series
with per-sample spans (one of them backward in time) and against central finite differences in float64;
the quadrature against a closed form it integrates exactly (and one it does not); a one-sample batch
against the joint QuadratureAdjoint / checkpointed InterpolatingAdjoint (equal backward steps,
evaluations and re-solve evaluations, gradient to round-off); exact counts of the backward pass;
memory of the checkpointed adjoint bounded by one interval; bad inputs by their messages.
"""

import math

import pytest
import torch

import pylux.diffeq as de
from pylux.sensitivity import (BacksolveAdjoint, DirectAdjoint, HiddenParameterError, InterpolatingAdjoint,
                               QuadratureAdjoint)
from pylux.sensitivity import per_sample as per_sample_adjoints

F64 = torch.float64

from test_per_sample import _grads, _leaves, _shared_loss, shared_case, shared_field  # noqa: E402  (shared problem)

ALGS = {"quadrature": QuadratureAdjoint, "quadrature-5-nodes": lambda: QuadratureAdjoint(nodes=5),
        "checkpointed-saved-times": lambda: InterpolatingAdjoint(checkpointing=True),
        "checkpointed-3": lambda: InterpolatingAdjoint(checkpointing=3),
        "checkpointed-times": lambda: InterpolatingAdjoint(checkpointing=[0.5, 1.1])}


def ragged_case():
    """Three samples with their own spans (sample 1 runs backward, 1.5 -> -0.5), ragged saved times."""
    g = torch.Generator().manual_seed(31)
    p = {"W": 0.5 * torch.randn(2, 2, generator=g, dtype=F64), "q": torch.randn(2, generator=g, dtype=F64)}
    u0 = torch.randn(3, 2, generator=g, dtype=F64)
    t0 = torch.tensor([0.0, 1.5, 0.1], dtype=F64)
    t1 = torch.tensor([2.0, -0.5, 1.6], dtype=F64)
    times = torch.tensor([[0.3, 0.9, 1.4, 2.0], [1.2, 0.4, -0.1, -0.5], [0.2, 0.6, 1.3, 1.6]], dtype=F64)
    mask = torch.tensor([[True, False, True, True], [True, True, False, True], [False, True, True, False]])
    return p, u0, (t0, t1), torch.where(mask, times, torch.full_like(times, math.nan)), mask


def ragged_grads(sensealg, tol=1e-10):
    p, u0, tspan, padded, mask = ragged_case()
    q, x0 = _leaves(p, u0)
    sol = de.solve(de.ODEProblem(shared_field, x0, tspan, q), de.Tsit5(), saveat=padded, saveat_mask=mask,
                   batch="per-sample", sensealg=sensealg, reltol=tol, abstol=tol)
    weights = torch.arange(1.0, 5.0, dtype=F64)[:, None, None]
    loss = (weights * torch.sin(sol.u) * mask.T[..., None]).sum()
    return torch.autograd.grad(loss, [x0, q["W"], q["q"]]), sol


def _thorough(*fast):
    """Every algorithm of ALGS, those not in ``fast`` marked slow."""
    return [name if name in fast else pytest.param(name, marks=pytest.mark.slow) for name in sorted(ALGS)]


@pytest.mark.parametrize("name", _thorough("quadrature", "checkpointed-times"))
def test_per_sample_gradients_match_backprop_on_ragged_series_with_own_spans(name):
    reference, _ = ragged_grads(DirectAdjoint())
    grads, sol = ragged_grads(ALGS[name]())
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    stats = sol.backward_stats
    assert stats["naccept"] > 0 and int(stats["nf_per_sample"].min()) > 0
    if name.startswith("checkpointed"):
        assert stats["nf_forward_resolve"] > 0 and sol.u.grad_fn.dense is None
        assert stats["nvjp"] == stats["nf"] + stats["nf_param"]


def test_per_sample_quadrature_and_checkpointed_against_finite_differences():
    p, u0, times = shared_case(batch=2, seed=32, count=3)
    tol = dict(reltol=1e-11, abstol=1e-11)
    computed = {alg: _grads(p, u0, times, alg, **tol)[1]
                for alg in (QuadratureAdjoint(), InterpolatingAdjoint(checkpointing=2))}
    # the inputs as one flat vector [u0[1, 0], W, q]: central differences along each coordinate
    flat = torch.cat([u0[1, :1], p["W"].reshape(-1), p["q"]])

    def value(x):
        x0 = torch.cat([u0[:1], torch.stack([x[0], u0[1, 1]])[None]])
        with torch.no_grad():
            return float(_shared_loss({"W": x[1:5].view(2, 2), "q": x[5:]}, x0, times, None, **tol)[0])
    eps = 1e-6
    fd = torch.tensor([(value(flat + eps * e) - value(flat - eps * e)) / (2 * eps)
                       for e in torch.eye(flat.numel(), dtype=F64)])
    for alg, (g_u0, g_W, g_q) in computed.items():
        got = torch.cat([g_u0[1, :1], g_W.reshape(-1), g_q])
        assert ((got - fd).abs() <= 1e-6 * fd.abs().clamp_min(1.0)).all(), (alg, got - fd)


def test_per_sample_quadrature_is_exact_for_polynomials_up_to_its_degree():
    """z' = q t^5 per sample: dL/dq = sum_b (t1_b^6 - t0_b^6) / 6 for L = sum z(t1). Three Gauss–Legendre
    nodes (Tsit5's default) integrate degree 5 exactly on every backward step; two nodes do not."""
    t0 = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    t1 = torch.tensor([1.0, 2.0, -1.0], dtype=F64)
    exact = float(((t1 ** 6 - t0 ** 6) / 6).sum())

    def grad(nodes):
        q = torch.tensor(1.3, dtype=F64, requires_grad=True)
        prob = de.ODEProblem(lambda u, p, t: p["q"] * (t ** 5)[:, None].expand_as(u), torch.zeros(3, 1, dtype=F64),
                             (t0, t1), {"q": q})
        sol = de.solve(prob, de.Tsit5(), batch="per-sample", sensealg=QuadratureAdjoint(nodes=nodes),
                       reltol=1e-6, abstol=1e-6)
        (g,) = torch.autograd.grad(sol.u[-1].sum(), q)
        return float(g), sol.backward_stats
    g3, stats = grad(None)
    assert abs(g3 - exact) <= 1e-12 * abs(exact) and stats["nquadrature"] > 0
    g2, _ = grad(2)
    assert abs(g2 - exact) > 1e-6 * abs(exact)


@pytest.mark.parametrize("name", _thorough("quadrature", "checkpointed-3"))
def test_one_sample_batch_takes_the_joint_adjoints_steps_and_gives_its_gradient(name):
    """A batch of one: the per-sample backward norm is the joint one's on a alone (QuadratureAdjoint's,
    and InterpolatingAdjoint(seminorm=True)'s), the re-solves start with the forward step, so steps,
    evaluations and re-solve evaluations are equal and the gradient agrees to round-off."""
    p, u0, times = shared_case(batch=2, seed=22)
    times = torch.cat([times, torch.full((2, 1), 2.0, dtype=F64)], dim=1)  # the last save at t1
    tol = dict(reltol=1e-8, abstol=1e-8)
    alg = ALGS[name]()
    joint_alg = alg if isinstance(alg, QuadratureAdjoint) else InterpolatingAdjoint(
        checkpointing=alg.checkpointing, seminorm=True)
    for b in range(2):
        _, grads, sol = _grads(p, u0[b:b + 1], times[b:b + 1], alg, **tol)
        _, joint, joint_sol = _grads(p, u0[b:b + 1], times[b:b + 1], joint_alg, batch="joint", **tol)
        for got, want in zip(grads, joint):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        stats, joint_stats = sol.backward_stats, joint_sol.backward_stats
        keys = ("nf", "naccept", "nreject") + (("nf_forward_resolve",) if "checkpointed" in name else ())
        for key in keys:
            assert stats[key] == joint_stats[key], key
        if isinstance(alg, QuadratureAdjoint):
            nodes = alg.nodes or 3  # Tsit5, order 5: ceil(6 / 2) nodes
            # per batched step, accepted or not (skipping a step no sample accepted would cost a host sync)
            assert stats["nquadrature"] == nodes * (stats["naccept"] + stats["nreject"])
            assert joint_stats["nquadrature"] == nodes * joint_stats["naccept"]


def test_backward_counts_of_the_per_sample_quadrature():
    p, u0, times = shared_case(batch=3, seed=20, count=4)
    _, _, sol = _grads(p, u0, times, QuadratureAdjoint(), reltol=1e-7, abstol=1e-7)
    _, _, interpolating = _grads(p, u0, times, InterpolatingAdjoint(), reltol=1e-7, abstol=1e-7)
    stats = sol.backward_stats
    # the same backward solve of a as the interpolating adjoint (both control a alone)
    for key in ("nf", "naccept", "nreject"):
        assert stats[key] == interpolating.backward_stats[key], key
    assert torch.equal(stats["nf_per_sample"], interpolating.backward_stats["nf_per_sample"])
    # Tsit5 per sample and segment: k1, one for the initial step, then 6 per step tried (3 x 4 segments)
    assert int(stats["nf_per_sample"].sum()) == 2 * 12 + 6 * (stats["naccept"] + stats["nreject"])
    # 3 nodes per batched step, one parameter VJP per batched step besides one VJP per stage evaluation
    assert stats["nquadrature"] % 3 == 0
    assert stats["nvjp"] == stats["nf"] + stats["nquadrature"] // 3
    assert stats["nquadrature"] // 3 == interpolating.backward_stats["nf_param"]  # batched steps


def test_checkpointed_fixed_steps_count_every_re_solve_exactly():
    p, u0, times = shared_case(batch=2, seed=25, count=2)
    times = torch.tensor([[0.5, 2.0], [1.0, 1.5]], dtype=F64)
    options = dict(solver=de.RK4(), dt=0.02, adaptive=False)
    _, reference, _ = _grads(p, u0, times, DirectAdjoint(), **options)
    _, grads, sol = _grads(p, u0, times, InterpolatingAdjoint(checkpointing=True), **options)
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # O(dt^4) apart
    stats = sol.backward_stats
    # merged intervals [0, (0.5 | 1.0)] and [(0.5 | 1.0), (2.0 | 1.5)]: 25 | 50 and 75 | 25 steps of 0.02;
    # each batched RK4 step evaluates 4 stages, so the re-solves make 4 (50 + 75) batched evaluations
    assert stats["nf_forward_resolve"] == 4 * (50 + 75)
    assert stats["naccept"] == 175 and stats["nreject"] == 0


def _saved_bytes(alg, dt):
    """Bytes autograd keeps from the forward solve for the backward pass (saved-tensor hooks)."""
    p, u0, _ = shared_case(batch=2, seed=33)
    times = torch.tensor([[0.4, 1.0], [0.7, 1.0]], dtype=F64)
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x
    q, x0 = _leaves(p, u0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        sol = de.solve(de.ODEProblem(shared_field, x0, (0.0, 1.0), q), de.RK4(), dt=dt, adaptive=False,
                       saveat=times, batch="per-sample", sensealg=alg)
    return total[0], sol, (sol.u ** 2).sum()


def test_checkpointed_memory_is_the_checkpoints_and_one_interval(monkeypatch):
    kept = []
    dense = per_sample_adjoints._ResolveLoop.dense

    def record(loop):
        kept.append(len(loop.log[0]))  # batched steps of the interval's dense output
        return dense(loop)
    monkeypatch.setattr(per_sample_adjoints._ResolveLoop, "dense", record)
    alg = InterpolatingAdjoint(checkpointing=4)
    coarse, sol_coarse, loss = _saved_bytes(alg, 0.1)
    fine, sol, loss = _saved_bytes(alg, 0.005)
    assert coarse == fine > 0  # u0, the parameters and the states at the merged times: no step count
    assert sol.u.grad_fn.dense is None
    loss.backward()
    # checkpoints 0.25, 0.5, 0.75 merged with (0.4 | 0.7) and 1.0: the longest interval is 0.25 = 50 steps
    assert len(kept) == 5 and max(kept) == 50
    # without checkpointing the whole dense output is kept: every one of the 200 steps
    _, plain, _ = _saved_bytes(InterpolatingAdjoint(), 0.005)
    assert plain.u.grad_fn.dense.starts.shape[0] == 200


def test_checkpoints_outside_a_samples_span_are_refused():
    p, u0, _ = shared_case(batch=2, seed=34)
    spans = (torch.tensor([0.0, 0.5], dtype=F64), torch.tensor([2.0, 1.5], dtype=F64))
    q, x0 = _leaves(p, u0)
    prob = de.ODEProblem(shared_field, x0, spans, q)
    with pytest.raises(ValueError, match=r"the checkpoint 0.3 lies outside sample 1's tspan \(0.5, 1.5\).*shared "
                                         r"by every sample.*checkpointing=n"):
        de.solve(prob, de.Tsit5(), batch="per-sample", sensealg=InterpolatingAdjoint(checkpointing=[0.3, 1.0]))
    with pytest.raises(ValueError, match="the checkpoint 1.8 lies outside sample 1's tspan"):
        de.solve(prob, de.Tsit5(), batch="per-sample", sensealg=InterpolatingAdjoint(checkpointing=[1.0, 1.8]))
    # inside every span it works, as do n intervals of each sample's own span
    for alg in (InterpolatingAdjoint(checkpointing=[0.6, 1.4]), InterpolatingAdjoint(checkpointing=3)):
        sol = de.solve(prob, de.Tsit5(), batch="per-sample", sensealg=alg, reltol=1e-8, abstol=1e-8)
        (g,) = torch.autograd.grad(sol.u[-1].sum(), [x0])
        ref = de.solve(de.ODEProblem(shared_field, x0, spans, q), de.Tsit5(), batch="per-sample",
                       sensealg=DirectAdjoint(), reltol=1e-8, abstol=1e-8)
        torch.testing.assert_close(g, torch.autograd.grad(ref.u[-1].sum(), [x0])[0], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["quadrature", "checkpointed-3"])
def test_refusals_hidden_parameters_and_unused_parameters(name):
    p, u0, times = shared_case(batch=2, seed=35)
    q, x0 = _leaves(p, u0)
    with pytest.raises(NotImplementedError, match="tensor abstol"):
        _shared_loss(q, x0, times, ALGS[name](), abstol=torch.full((2, 2), 1e-8, dtype=F64))
    loss, _ = _shared_loss(q, x0, times, ALGS[name]())
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.autograd.grad(loss, [q["W"]], create_graph=True)
    hidden = torch.ones(2, dtype=F64, requires_grad=True)
    prob = de.ODEProblem(lambda u, p_, t: -u * hidden, u0.clone().requires_grad_(True), (0.0, 1.0))
    sol = de.solve(prob, de.Tsit5(), batch="per-sample", sensealg=ALGS[name]())
    with pytest.raises(HiddenParameterError):
        sol.u.sum().backward()
    # a parameter f never uses gets an exactly zero gradient, beside a non-zero one
    unused = torch.ones(3, dtype=F64, requires_grad=True)
    q = dict(q, unused=unused)
    loss, _ = _shared_loss(q, x0, times, ALGS[name]())
    g_unused, g_q = torch.autograd.grad(loss, [unused, q["q"]])
    assert torch.equal(g_unused, torch.zeros(3, dtype=F64)) and g_q.abs().min() > 0


@pytest.mark.parametrize("name", ["quadrature", "checkpointed-saved-times", "checkpointed-3"])
def test_a_zero_span_and_a_fully_masked_sample_beside_a_normal_one(name):
    """Sample 1 has t0 == t1, sample 2 observes nothing: their checkpoints collapse onto t0 and their
    backward solves never move, while sample 0 gets the gradient of its own solve."""
    p, u0, _ = shared_case(batch=3, seed=40)
    spans = (torch.tensor([0.0, 0.7, 0.2], dtype=F64), torch.tensor([2.0, 0.7, 1.5], dtype=F64))
    times = torch.tensor([[0.5, 1.0, 2.0], [0.7, 0.7, 0.7], [0.3, 0.9, 1.2]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    grads = {}
    for key, sensealg in (("direct", DirectAdjoint()), (name, ALGS[name]())):
        q, x0 = _leaves(p, u0)
        sol = de.solve(de.ODEProblem(shared_field, x0, spans, q), de.Tsit5(), saveat=times, saveat_mask=mask,
                       batch="per-sample", sensealg=sensealg, reltol=1e-8, abstol=1e-8)
        grads[key] = torch.autograd.grad((sol.u ** 2 * mask.T[..., None]).sum(), [x0, q["W"], q["q"]])
    for got, want in zip(grads[name], grads["direct"]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grads[name][0][1], 2 * u0[1], rtol=0, atol=0)  # d(u0^2)/du0, nothing else
    assert torch.equal(grads[name][0][2], torch.zeros(2, dtype=F64))


@pytest.mark.parametrize("sensealg", [BacksolveAdjoint(), InterpolatingAdjoint(), QuadratureAdjoint(),
                                      InterpolatingAdjoint(checkpointing=True), InterpolatingAdjoint(checkpointing=3)],
                         ids=repr)
def test_samples_stopped_by_maxiters_are_differentiated_up_to_where_they_got(sensealg):
    """throw=False: the unreached saved times are NaN constants (no gradient, as under DirectAdjoint); the
    backward pass of each sample starts where its forward solve stopped, from its final state there."""
    p, u0, times = shared_case(batch=3, seed=12)
    grads = {}
    for key, alg in (("direct", DirectAdjoint()), ("adjoint", sensealg)):
        q, x0 = _leaves(p, u0)
        sol = de.solve(de.ODEProblem(shared_field, x0, (0.0, 2.0), q), de.Tsit5(), saveat=times, batch="per-sample",
                       sensealg=alg, reltol=1e-8, abstol=1e-8, maxiters=12, throw=False)
        assert sol.stats.retcode_per_sample == (de.ReturnCode.MaxIters,) * 3
        reached = torch.isfinite(sol.u[..., 0])
        assert 0 < int(reached.sum()) < reached.numel()
        grads[key] = torch.autograd.grad(torch.nan_to_num(sol.u).pow(2).sum(), [x0, q["W"], q["q"]])
    for got, want in zip(grads["adjoint"], grads["direct"]):  # continuous and discrete gradients at 1e-8
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert float(grads["adjoint"][1].abs().max()) > 1e-2
