"""Per-sample time in a batch: (B, T) saveat under joint stepping, and batch="per-sample" stepping.

Each sample of a per-sample solve is checked against a solve of that sample alone (equal to round-off,
with equal step and evaluation counts); the joint step with a (B, T) saveat against the same joint solve
saved at one sample's times; gradients against central finite differences in float64 and across
sensitivity algorithms; bad inputs against their messages.
"""

import math

import pytest
import torch

import pylux.diffeq as de
from pylux.sensitivity import (BacksolveAdjoint, DirectAdjoint, InterpolatingAdjoint, QuadratureAdjoint,
                               ReversibleAdjoint)

F64 = torch.float64
TOL = dict(reltol=1e-8, abstol=1e-10)


def field(u, p, t):
    """A nonlinear decay with per-sample rates ``p["k"]`` of shape (B, 1)."""
    return -p["k"] * u + p["a"] * torch.sin(u)


def problem(k, u0, a=0.3, tspan=(0.0, 1.0)):
    return de.ODEProblem(field, u0, tspan, {"k": k, "a": torch.as_tensor(a, dtype=F64)})


def random_times(batch, count, seed=0, lo=0.0, hi=1.0):
    """(B, T) strictly increasing times inside (lo, hi], different per sample."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(batch, count, generator=g, dtype=F64)
    return lo + (hi - lo) * torch.sort(raw, dim=1).values


def batch_case(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.rand(batch, 1, generator=g, dtype=F64) * 4 + 0.5
    u0 = torch.rand(batch, 2, generator=g, dtype=F64) * 2 - 1
    return k, u0


def solo(k, u0, b, saveat, **kw):
    """The solve of sample ``b`` alone (a batch of one)."""
    return de.solve(problem(k[b:b + 1], u0[b:b + 1], **kw.pop("problem", {})), de.Tsit5(), saveat=saveat,
                    **{**TOL, **kw})


# --- per-sample stepping equals separate solves -----------------------------------------------

def test_per_sample_matches_each_sample_solved_alone():
    k, u0 = batch_case(4)
    times = random_times(4, 5)
    sol = de.solve(problem(k, u0), de.Tsit5(), saveat=times, batch="per-sample", **TOL)
    assert sol.t.shape == (5, 4) and sol.u.shape == (5, 4, 2)
    assert torch.equal(sol.t, times.T)
    stats = sol.stats
    assert all(code == de.ReturnCode.Success for code in stats.retcode_per_sample)
    for b in range(4):
        alone = solo(k, u0, b, times[b])
        torch.testing.assert_close(sol.u[:, b], alone.u[:, 0], rtol=0, atol=1e-13)
        assert int(stats.naccept_per_sample[b]) == alone.stats.naccept
        assert int(stats.nreject_per_sample[b]) == alone.stats.nreject
        assert int(stats.nf_per_sample[b]) == alone.stats.nf
    assert stats.naccept == int(stats.naccept_per_sample.sum())
    assert stats.nf == int(stats.nf_per_sample.max())  # the batch runs until its slowest sample is done


def test_easy_sample_takes_its_own_step_count_beside_a_stiff_one():
    """torchode's headline: under per-sample stepping the easy sample is not dragged along."""
    k = torch.tensor([[1.0], [300.0]], dtype=F64)
    u0 = torch.ones(2, 1, dtype=F64)
    tol = dict(reltol=1e-6, abstol=1e-8)
    times = torch.tensor([[0.25, 0.5, 1.0], [0.25, 0.5, 1.0]], dtype=F64)
    easy = de.solve(problem(k[:1], u0[:1], a=0.0), de.Tsit5(), saveat=times[0], **tol)
    hard = de.solve(problem(k[1:], u0[1:], a=0.0), de.Tsit5(), saveat=times[1], **tol)
    per_sample = de.solve(problem(k, u0, a=0.0), de.Tsit5(), saveat=times, batch="per-sample", **tol)
    joint = de.solve(problem(k, u0, a=0.0), de.Tsit5(), saveat=times, **tol)
    assert per_sample.stats.naccept_per_sample.tolist() == [easy.stats.naccept, hard.stats.naccept]
    assert per_sample.stats.nreject_per_sample.tolist() == [easy.stats.nreject, hard.stats.nreject]
    # one step size for both: the easy sample takes about the stiff one's steps, several times its own
    assert joint.stats.naccept > 0.9 * hard.stats.naccept > 3 * easy.stats.naccept
    assert "BatchSolution" in repr(joint) and "3 times for each of 2 samples" in repr(per_sample)
    exact = torch.exp(-k * times).T
    torch.testing.assert_close(per_sample.u[..., 0], exact, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(joint.u[..., 0], exact, rtol=1e-5, atol=1e-7)


def test_per_sample_tspans_forward_backward_and_empty():
    k, u0 = batch_case(4, seed=1)
    t0 = torch.tensor([0.0, 0.5, 1.0, 0.3], dtype=F64)
    t1 = torch.tensor([1.0, 2.0, 0.0, 0.3], dtype=F64)
    prob = problem(k, u0, tspan=(t0, t1))
    sol = de.solve(prob, de.Tsit5(), batch="per-sample", **TOL)
    assert sol.t.shape == (2, 4)
    torch.testing.assert_close(sol.t, torch.stack([t0, t1]))
    for b in range(3):
        alone = solo(k, u0, b, None, problem=dict(tspan=(float(t0[b]), float(t1[b]))))
        torch.testing.assert_close(sol.u[-1, b], alone.u[-1, 0], rtol=0, atol=1e-13)
        assert int(sol.stats.naccept_per_sample[b]) == alone.stats.naccept
    assert torch.equal(sol.u[:, 3], u0[3].expand(2, 2))
    assert int(sol.stats.naccept_per_sample[3]) == 0 and int(sol.stats.nf_per_sample[3]) == 0
    with pytest.raises(ValueError, match="batch='per-sample'"):
        de.solve(prob, de.Tsit5())


def test_field_sees_each_samples_own_time():
    # du/dt = cos(t): u(t) = u0 + sin(t) - sin(t0), with t of shape (B,) under per-sample stepping
    t0 = torch.tensor([0.0, 1.0, -2.0], dtype=F64)
    t1 = torch.tensor([2.0, 1.5, 0.5], dtype=F64)
    u0 = torch.zeros(3, 1, dtype=F64)
    seen = []

    def f(u, p, t):
        seen.append(tuple(t.shape))
        return torch.cos(t)[:, None].expand_as(u)
    times = torch.stack([t0 + (t1 - t0) * s for s in (0.3, 0.6, 1.0)], dim=1)
    sol = de.solve(de.ODEProblem(f, u0, (t0, t1)), de.DP5(), saveat=times, batch="per-sample", **TOL)
    assert set(seen) == {(3,)}
    exact = (torch.sin(times) - torch.sin(t0)[:, None]).T
    torch.testing.assert_close(sol.u[..., 0], exact, rtol=1e-7, atol=1e-9)


def test_fixed_steps_per_sample_match_solo_fixed_steps():
    k, u0 = batch_case(3, seed=2)
    t1 = torch.tensor([1.0, 0.35, 0.73], dtype=F64)  # 0.1 does not divide the last two spans
    prob = problem(k, u0, tspan=(torch.zeros(3, dtype=F64), t1))
    sol = de.solve(prob, de.RK4(), dt=0.1, batch="per-sample")
    for b in range(3):
        alone = de.solve(problem(k[b:b + 1], u0[b:b + 1], tspan=(0.0, float(t1[b]))), de.RK4(), dt=0.1)
        torch.testing.assert_close(sol.u[-1, b], alone.u[-1, 0], rtol=0, atol=1e-14)
        assert int(sol.stats.naccept_per_sample[b]) == alone.stats.naccept
        assert int(sol.stats.nf_per_sample[b]) == alone.stats.nf


@pytest.mark.parametrize("options", [dict(controller=de.IController()), dict(norm=de.max_norm),
                                     dict(solver=de.BS3()), dict(solver=de.Heun(), dt=0.05)])
def test_controllers_norms_and_tableaus_per_sample_match_solo(options):
    options = dict(options)
    solver = options.pop("solver", de.Tsit5())
    k, u0 = batch_case(3, seed=3)
    times = random_times(3, 4, seed=3)
    tol = dict(reltol=1e-5, abstol=1e-7)
    sol = de.solve(problem(k, u0), solver, saveat=times, batch="per-sample", **tol, **options)
    for b in range(3):
        alone = de.solve(problem(k[b:b + 1], u0[b:b + 1]), solver, saveat=times[b], **tol, **options)
        torch.testing.assert_close(sol.u[:, b], alone.u[:, 0], rtol=0, atol=1e-12)
        assert int(sol.stats.naccept_per_sample[b]) == alone.stats.naccept
        assert int(sol.stats.nreject_per_sample[b]) == alone.stats.nreject


def test_seminorm_per_sample_measures_each_samples_entries():
    k, u0 = batch_case(3, seed=4)
    mask = torch.tensor([True, False])
    sol = de.solve(problem(k, u0), de.Tsit5(), batch="per-sample", norm=de.SemiNorm(mask), reltol=1e-5,
                   abstol=1e-7)
    for b in range(3):
        alone = de.solve(problem(k[b:b + 1], u0[b:b + 1]), de.Tsit5(), norm=de.SemiNorm(mask[None]),
                         reltol=1e-5, abstol=1e-7)
        assert int(sol.stats.naccept_per_sample[b]) == alone.stats.naccept
        torch.testing.assert_close(sol.u[-1, b], alone.u[-1, 0], rtol=0, atol=1e-12)


def test_float32_state_per_sample():
    k, u0 = batch_case(3, seed=5)
    times = random_times(3, 4, seed=5)
    sol32 = de.solve(problem(k.float(), u0.float(), a=torch.tensor(0.3)), de.Tsit5(), saveat=times,
                     batch="per-sample", reltol=1e-5, abstol=1e-7)
    sol64 = de.solve(problem(k, u0), de.Tsit5(), saveat=times, batch="per-sample", reltol=1e-5, abstol=1e-7)
    assert sol32.u.dtype == torch.float32 and sol32.t.dtype == F64
    torch.testing.assert_close(sol32.u.double(), sol64.u, rtol=1e-4, atol=1e-5)


# --- joint stepping with per-sample saved times ----------------------------------------------

def test_joint_step_with_batch_saveat_equals_joint_solve_at_each_row():
    k, u0 = batch_case(4, seed=6)
    times = random_times(4, 6, seed=6)
    sol = de.solve(problem(k, u0), de.Tsit5(), saveat=times, **TOL)
    assert sol.t.shape == (6, 4) and sol.u.shape == (6, 4, 2)
    for b in range(4):
        same_steps = de.solve(problem(k, u0), de.Tsit5(), saveat=times[b], **TOL)
        assert same_steps.stats.naccept == sol.stats.naccept
        torch.testing.assert_close(sol.u[:, b], same_steps.u[:, b], rtol=0, atol=1e-13)
        alone = solo(k, u0, b, times[b])
        torch.testing.assert_close(sol.u[:, b], alone.u[:, 0], rtol=1e-6, atol=1e-7)


def test_joint_batch_saveat_with_other_dense_outputs():
    # VCAB3's Hermite pieces go through the generic interpolant path
    k, u0 = batch_case(3, seed=7)
    times = random_times(3, 4, seed=7)
    sol = de.solve(problem(k, u0), de.VCAB3(), saveat=times, reltol=1e-7, abstol=1e-9)
    for b in range(3):
        same_steps = de.solve(problem(k, u0), de.VCAB3(), saveat=times[b], reltol=1e-7, abstol=1e-9)
        torch.testing.assert_close(sol.u[:, b], same_steps.u[:, b], rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch", ["joint", "per-sample"])
def test_ragged_series_with_a_mask(batch):
    k, u0 = batch_case(3, seed=8)
    times = random_times(3, 5, seed=8)
    mask = torch.tensor([[True, True, True, True, True],
                         [True, False, True, True, False],
                         [False, True, True, False, False]])
    padded = torch.where(mask, times, torch.full_like(times, math.nan))  # padding may be anything
    sol = de.solve(problem(k, u0), de.Tsit5(), saveat=padded, saveat_mask=mask, batch=batch, **TOL)
    for b in range(3):
        observed = times[b][mask[b]]
        alone = solo(k, u0, b, observed)
        torch.testing.assert_close(sol.u[:, b][mask[b]], alone.u[:, 0], rtol=1e-6 if batch == "joint" else 0,
                                   atol=1e-7 if batch == "joint" else 1e-13)
    # masked entries repeat the last observed state before them, the initial state when there is none
    torch.testing.assert_close(sol.u[1, 1], sol.u[0, 1], rtol=0, atol=0)
    torch.testing.assert_close(sol.u[4, 1], sol.u[3, 1], rtol=0, atol=0)
    torch.testing.assert_close(sol.u[0, 2], u0[2], rtol=0, atol=0)
    torch.testing.assert_close(sol.u[4, 2], sol.u[2, 2], rtol=0, atol=0)
    assert sol.t[0, 2] == 0.0 and sol.t[4, 2] == times[2, 2]
    # the usual masked loss is finite and gives masked entries no gradient
    k_ = k.clone().requires_grad_(True)
    out = de.solve(problem(k_, u0), de.Tsit5(), saveat=padded, saveat_mask=mask, batch=batch, **TOL)
    (grad,) = torch.autograd.grad((out.u * mask.T[..., None]).sum(), k_)
    assert torch.isfinite(grad).all() and grad.abs().min() > 0


# --- gradients ---------------------------------------------------------------------------------

def _loss(k, a, u0, times, batch, sensealg=None):
    w = torch.linspace(-1.0, 2.0, times.numel() * 2, dtype=F64).reshape(times.shape[1], times.shape[0], 2)
    sol = de.solve(problem(k, u0, a=a), de.Tsit5(), saveat=times, batch=batch, sensealg=sensealg,
                   reltol=1e-10, abstol=1e-12)
    return (sol.u * w).sum()


@pytest.mark.parametrize("batch, which", [("joint", (0, 1)), ("per-sample", (0, 1)),
                                          pytest.param("joint", (2,), marks=pytest.mark.slow),
                                          pytest.param("per-sample", (2,), marks=pytest.mark.slow)])
def test_gradients_against_finite_differences(batch, which):
    """d loss / d(k, a) by default; d loss / d u0 in the slow variants."""
    k, u0 = batch_case(2, seed=9)
    a = torch.tensor(0.3, dtype=F64)
    times = random_times(2, 4, seed=9)
    leaves = [k.clone().requires_grad_(True), a.clone().requires_grad_(True), u0.clone().requires_grad_(True)]
    grads = torch.autograd.grad(_loss(*leaves, times, batch, DirectAdjoint()), leaves)
    eps = 1e-6
    for index, (value, grad) in enumerate(zip((k, a, u0), grads)):
        if index not in which:
            continue
        fd = torch.zeros_like(value).reshape(-1)
        for j in range(value.numel()):
            step = torch.zeros(value.numel(), dtype=F64)
            step[j] = eps
            plus = [x.clone() for x in (k, a, u0)]
            minus = [x.clone() for x in (k, a, u0)]
            plus[index] = value + step.reshape(value.shape)
            minus[index] = value - step.reshape(value.shape)
            fd[j] = (_loss(*plus, times, batch) - _loss(*minus, times, batch)) / (2 * eps)
        torch.testing.assert_close(grad.reshape(-1), fd, rtol=1e-5, atol=1e-7)


def test_per_sample_and_joint_gradients_agree():
    k, u0 = batch_case(3, seed=10)
    a = torch.tensor(0.3, dtype=F64)
    times = random_times(3, 4, seed=10)
    grads = {}
    for batch in ("joint", "per-sample"):
        leaves = [k.clone().requires_grad_(True), a.clone().requires_grad_(True)]
        grads[batch] = torch.autograd.grad(_loss(*leaves, u0, times, batch), leaves)
    for g_joint, g_sample in zip(grads["joint"], grads["per-sample"]):
        torch.testing.assert_close(g_sample, g_joint, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("sensealg", [BacksolveAdjoint(), InterpolatingAdjoint(), QuadratureAdjoint(),
                                      ReversibleAdjoint()], ids=lambda s: type(s).__name__)
def test_joint_batch_saveat_under_every_sensealg(sensealg):
    k, u0 = batch_case(3, seed=11)
    a = torch.tensor(0.3, dtype=F64)
    times = random_times(3, 3, seed=11)
    leaves = [k.clone().requires_grad_(True), a.clone().requires_grad_(True), u0.clone().requires_grad_(True)]
    reference = torch.autograd.grad(_loss(*leaves, times, "joint", DirectAdjoint()), leaves)
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    value = _loss(*leaves, times, "joint", sensealg)
    torch.testing.assert_close(value, _loss(k, a, u0, times, "joint"), rtol=1e-7, atol=1e-9)
    grads = torch.autograd.grad(value, leaves)
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_per_sample_stepping_runs_every_built_in_sensealg_and_refuses_an_unregistered_one():
    k, u0 = batch_case(2)
    times = random_times(2, 3)
    leaves = [k.clone().requires_grad_(True), torch.tensor(0.3, dtype=F64, requires_grad=True)]

    def grads(sensealg):
        sol = de.solve(problem(*leaves[:1], u0, a=leaves[1]), de.Tsit5(), saveat=times, batch="per-sample",
                       sensealg=sensealg, reltol=1e-8, abstol=1e-8)
        return torch.autograd.grad((sol.u ** 2).sum(), leaves)
    reference = grads(DirectAdjoint())
    # QuadratureAdjoint and checkpointed InterpolatingAdjoint have per-sample backward passes
    # (tests/test_per_sample_adjoints_more.py), as ReversibleAdjoint does (tests/test_per_sample_reversible.py)
    for sensealg in (QuadratureAdjoint(), InterpolatingAdjoint(checkpointing=2)):
        for got, want in zip(grads(sensealg), reference):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    sol = de.solve(problem(k, u0), de.Tsit5(), batch="per-sample", sensealg=ReversibleAdjoint())
    assert isinstance(sol.solver, de.Reversible) and sol.u.shape == (2, 2, 2)

    class Unregistered(de.AbstractSensitivityAlgorithm):
        def solve_with(self, problem, solver, options):
            raise AssertionError("never reached under batch='per-sample'")
    with pytest.raises(NotImplementedError, match="Unregistered does not support batch='per-sample'.*DirectAdjoint"
                                                  ".*BacksolveAdjoint.*InterpolatingAdjoint"):
        de.solve(problem(k, u0), de.Tsit5(), batch="per-sample", sensealg=Unregistered())


# --- the per-sample backsolve adjoint ----------------------------------------------------------

def shared_field(u, p, t):
    """Parameters shared by every sample, a per-sample time forcing (t is (B,) per sample, 0-d jointly)."""
    return torch.tanh(u @ p["W"]) + torch.sin(t).reshape(-1, 1) * p["q"]


def shared_case(batch=3, seed=20, count=4):
    g = torch.Generator().manual_seed(seed)
    p = {"W": 0.5 * torch.randn(2, 2, generator=g, dtype=F64), "q": torch.randn(2, generator=g, dtype=F64)}
    u0 = torch.randn(batch, 2, generator=g, dtype=F64)
    return p, u0, random_times(batch, count, seed=seed, hi=2.0)


def _shared_loss(p, u0, times, sensealg, batch="per-sample", solver=None, **kw):
    options = dict(reltol=1e-10, abstol=1e-10)
    options.update(kw)
    sol = de.solve(de.ODEProblem(shared_field, u0, (0.0, 2.0), p), solver or de.Tsit5(), saveat=times,
                   batch=batch, sensealg=sensealg, **options)
    # each sample's terms depend on its own values and times only (a batch's loss is the sum of its samples')
    return (sol.u[..., 0] * sol.t).sum() + (sol.u ** 2).sum(), sol


def _leaves(p, u0):
    p = {name: x.detach().clone().requires_grad_(True) for name, x in p.items()}
    return p, u0.detach().clone().requires_grad_(True)


def _grads(p, u0, times, sensealg, **kw):
    p, u0 = _leaves(p, u0)
    loss, sol = _shared_loss(p, u0, times, sensealg, **kw)
    loss.backward()
    return loss.detach(), [u0.grad, p["W"].grad, p["q"].grad], sol


ADJOINTS = {"backsolve": BacksolveAdjoint, "interpolating": InterpolatingAdjoint}


@pytest.mark.parametrize("name", sorted(ADJOINTS))
def test_per_sample_adjoints_match_backprop_through_the_per_sample_loop(name):
    p, u0, times = shared_case()
    value, reference, _ = _grads(p, u0, times, DirectAdjoint())
    got_value, grads, sol = _grads(p, u0, times, ADJOINTS[name]())
    assert torch.equal(got_value, value)  # the same forward loop
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)
    stats = sol.backward_stats
    # one VJP in z per augmented evaluation; per batched step one more evaluation of f and one parameter VJP
    assert stats["nvjp"] == stats["nf"] + stats["nf_param"]
    # Tsit5 (FSAL) per sample and segment: k1, one for the initial step, then 6 per step tried (3 x 4 segments)
    assert int(stats["nf_per_sample"].sum()) == 2 * 12 + 6 * (stats["naccept"] + stats["nreject"])


@pytest.mark.parametrize("name", sorted(ADJOINTS))
def test_per_sample_adjoints_seminorm_flag_changes_nothing(name):
    p, u0, times = shared_case(seed=21, count=2)
    _, plain, sol_plain = _grads(p, u0, times, ADJOINTS[name]())
    _, semi, sol_semi = _grads(p, u0, times, ADJOINTS[name](seminorm=True))
    assert all(torch.equal(a, b) for a, b in zip(plain, semi))
    assert sol_plain.backward_stats["nf"] == sol_semi.backward_stats["nf"]


@pytest.mark.parametrize("name", sorted(ADJOINTS))
def test_per_sample_adjoint_of_one_sample_is_the_joint_seminorm_adjoint(name):
    """Same steps (exact counts) and the same gradient to round-off: the per-sample norm is the joint
    seminorm's (max(RMS(z), RMS(a_z)) for backsolve, RMS(a_z) interpolating); each sample of a batch makes the
    evaluations of its solo backward pass."""
    alg, tol = ADJOINTS[name], dict(reltol=1e-8, abstol=1e-8)
    p, u0, times = shared_case(batch=2, seed=22)
    _, _, batch_sol = _grads(p, u0, times, alg(), **tol)
    for b in range(2):
        _, per_sample, sol = _grads(p, u0[b:b + 1], times[b:b + 1], alg(), **tol)
        _, joint, joint_sol = _grads(p, u0[b:b + 1], times[b:b + 1], alg(seminorm=True), batch="joint", **tol)
        for got, want in zip(per_sample, joint):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for key in ("nf", "naccept", "nreject"):
            assert sol.backward_stats[key] == joint_sol.backward_stats[key], key
        assert sol.backward_stats["nf_param"] == sol.backward_stats["naccept"] + sol.backward_stats["nreject"]
        assert int(batch_sol.backward_stats["nf_per_sample"][b]) == joint_sol.backward_stats["nf"]


def test_per_sample_backsolve_against_finite_differences():
    p, u0, times = shared_case(batch=2, seed=23, count=3)
    _, grads, _ = _grads(p, u0, times, BacksolveAdjoint(), reltol=1e-11, abstol=1e-11)
    eps = 1e-6

    def value(p_, u0_):
        with torch.no_grad():
            return float(_shared_loss(p_, u0_, times, None, reltol=1e-11, abstol=1e-11)[0])
    for index, name in ((1, "W"), (2, "q")):
        for j in range(p[name].numel()):
            step = torch.zeros_like(p[name]).reshape(-1)
            step[j] = eps
            plus, minus = dict(p), dict(p)
            plus[name], minus[name] = p[name] + step.view_as(p[name]), p[name] - step.view_as(p[name])
            fd = (value(plus, u0) - value(minus, u0)) / (2 * eps)
            assert abs(float(grads[index].reshape(-1)[j]) - fd) <= 1e-6 * max(1.0, abs(fd))
    step = torch.zeros_like(u0)
    step[1, 0] = eps
    fd = (value(p, u0 + step) - value(p, u0 - step)) / (2 * eps)
    assert abs(float(grads[0][1, 0]) - fd) <= 1e-6 * max(1.0, abs(fd))


@pytest.mark.parametrize("name", sorted(ADJOINTS))
def test_per_sample_adjoints_with_ragged_series_and_per_sample_spans(name):
    p, u0, times = shared_case(batch=3, seed=24, count=4)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False], [True, True, True, True]])
    padded = torch.where(mask, times, torch.full_like(times, math.nan))
    t0 = torch.tensor([0.0, -0.5, 0.1], dtype=F64)
    t1 = torch.tensor([2.0, 2.5, 2.0], dtype=F64)
    grads = {}
    for sensealg in (DirectAdjoint(), ADJOINTS[name]()):
        q, x0 = _leaves(p, u0)
        sol = de.solve(de.ODEProblem(shared_field, x0, (t0, t1), q), de.Tsit5(), saveat=padded, saveat_mask=mask,
                       batch="per-sample", sensealg=sensealg, reltol=1e-10, abstol=1e-10)
        loss = (sol.u * mask.T[..., None]).pow(2).sum()
        loss.backward()
        grads[type(sensealg).__name__] = [x0.grad, q["W"].grad, q["q"].grad]
    for got, want in zip(grads[ADJOINTS[name].__name__], grads["DirectAdjoint"]):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name", ["backsolve", pytest.param("interpolating", marks=pytest.mark.slow)])
def test_per_sample_adjoints_with_a_tableau_without_fsal_and_fixed_steps(name):
    p, u0, times = shared_case(batch=2, seed=25, count=2)
    times = torch.tensor([[0.5, 2.0], [1.0, 1.5]], dtype=F64)
    _, reference, _ = _grads(p, u0, times, DirectAdjoint(), solver=de.RK4(), dt=0.01, adaptive=False)
    _, grads, sol = _grads(p, u0, times, ADJOINTS[name](), solver=de.RK4(), dt=0.01, adaptive=False)
    for got, want in zip(grads, reference):  # the continuous adjoint of a 4th-order method: O(dt^4) apart
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)
    # segments [2.0, 0.5], [0.5, 0] and [1.5, 1.0], [1.0, 0], dt = 0.01: 150 + 50 and 50 + 100 steps
    assert sol.backward_stats["naccept"] == 350 and sol.backward_stats["nreject"] == 0


def test_per_sample_backsolve_refusals():
    p, u0, times = shared_case(batch=2, seed=26)
    q, x0 = _leaves(p, u0)
    with pytest.raises(NotImplementedError, match="tensor abstol"):
        _shared_loss(q, x0, times, BacksolveAdjoint(), abstol=torch.full((2, 2), 1e-8, dtype=F64))
    loss, _ = _shared_loss(q, x0, times, BacksolveAdjoint())
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.autograd.grad(loss, [q["W"]], create_graph=True)
    hidden = torch.ones(2, dtype=F64, requires_grad=True)
    prob = de.ODEProblem(lambda u, p_, t: -u * hidden, u0, (0.0, 1.0))
    from pylux.sensitivity import HiddenParameterError
    with pytest.raises(HiddenParameterError):
        de.solve(prob, de.Tsit5(), batch="per-sample", sensealg=BacksolveAdjoint())
    prob = de.ODEProblem(lambda u, p_, t: -u * hidden, u0.clone().requires_grad_(True), (0.0, 1.0))
    sol = de.solve(prob, de.Tsit5(), batch="per-sample", sensealg=BacksolveAdjoint())
    with pytest.raises(HiddenParameterError):
        sol.u.sum().backward()


# --- failures and bad inputs -------------------------------------------------------------------

def _bounce(u, t):
    return u[..., 0] - 0.5


@pytest.mark.parametrize("batch", ["joint", "per-sample"])
@pytest.mark.parametrize("callback", [de.ContinuousCallback(_bounce, de.terminate),
                                      [de.DiscreteCallback(lambda u, t: u[..., 0] > 0.5, lambda u, t: u)]],
                         ids=["continuous", "discrete-in-a-list"])
def test_events_with_per_sample_times_are_refused_clearly(batch, callback):
    k, u0 = batch_case(2)
    with pytest.raises(NotImplementedError, match=r"event callbacks \((ContinuousCallback|DiscreteCallback)\) are "
                                                  "not supported with per-sample times.*1-D saveat"):
        de.solve(problem(k, u0), de.Tsit5(), saveat=random_times(2, 3), batch=batch, callback=callback)
    # the suggested route: the joint step with the union of the times as a 1-D saveat
    union = torch.unique(random_times(2, 3))
    sol = de.solve(problem(k, u0), de.Tsit5(), saveat=union, callback=callback, **TOL)
    assert sol.u.shape[1:] == (2, 2)

def test_a_failing_sample_leaves_the_others_intact():
    # u' = u^2 blows up at t = 1 from u0 = 1; from u0 = -1 it decays as -1/(1 + t)
    prob = de.ODEProblem(lambda u, p, t: u * u, torch.tensor([[-1.0], [1.0]], dtype=F64), (0.0, 2.0))
    times = torch.tensor([[0.5, 1.5, 2.0], [0.5, 1.5, 2.0]], dtype=F64)
    sol = de.solve(prob, de.Tsit5(), saveat=times, batch="per-sample", throw=False, maxiters=2000, **TOL)
    codes = sol.stats.retcode_per_sample
    assert codes[0] == de.ReturnCode.Success and codes[1] != de.ReturnCode.Success
    assert sol.retcode == codes[1] and "sample(s) 1 of 2" in sol.message
    torch.testing.assert_close(sol.u[:, 0, 0], -1.0 / (1.0 + times[0]), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(sol.u[0, 1, 0], torch.tensor(2.0, dtype=F64), rtol=1e-7, atol=0)
    assert torch.isnan(sol.u[1:, 1]).all()
    assert 0.99 < float(sol.stats.t_per_sample[1]) < 1.01  # where it gave up, near the singularity
    with pytest.raises(de.SolverError, match="sample\\(s\\) 1 of 2"):
        de.solve(prob, de.Tsit5(), saveat=times, batch="per-sample", maxiters=2000, **TOL)


def test_maxiters_stops_only_the_samples_that_need_more_steps():
    k = torch.tensor([[1.0], [300.0]], dtype=F64)
    u0 = torch.ones(2, 1, dtype=F64)
    easy = de.solve(problem(k[:1], u0[:1], a=0.0), de.Tsit5(), **TOL)
    sol = de.solve(problem(k, u0, a=0.0), de.Tsit5(), batch="per-sample", maxiters=easy.stats.nsteps + 5,
                   throw=False, **TOL)
    assert sol.stats.retcode_per_sample == (de.ReturnCode.Success, de.ReturnCode.MaxIters)
    assert int(sol.stats.naccept_per_sample[1] + sol.stats.nreject_per_sample[1]) == easy.stats.nsteps + 5
    torch.testing.assert_close(sol.u[-1, 0], easy.u[-1, 0], rtol=0, atol=1e-14)
    assert torch.isnan(sol.u[-1, 1]).all() and "maxiters = " in sol.message
    with pytest.raises(de.MaxItersError):
        de.solve(problem(k, u0, a=0.0), de.Tsit5(), batch="per-sample", maxiters=easy.stats.nsteps + 5, **TOL)


def test_nothing_saved_when_asked_for_nothing():
    k, u0 = batch_case(2)
    sol = de.solve(problem(k, u0), de.Tsit5(), batch="per-sample", save_start=False, save_end=False)
    assert sol.u.shape == (0, 2, 2) and sol.t.shape == (0, 2)
    torch.testing.assert_close(sol.final_state[0], de.solve(problem(k, u0), de.Tsit5(), batch="per-sample").u[-1])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(saveat=torch.tensor([[0.2, 0.5], [0.6, 0.3]], dtype=F64)), ValueError,
     "sample 1's saved times are out of order: saveat\\[1, 0\\] = 0.6 and saveat\\[1, 1\\] = 0.3"),
    (dict(saveat=torch.tensor([[0.2, 0.2], [0.1, 0.3]], dtype=F64)), ValueError, "duplicated"),
    (dict(saveat=torch.tensor([[0.2, 0.5], [0.1, 1.3]], dtype=F64)), ValueError,
     "saveat\\[1, 1\\] = 1.3 is outside sample 1's tspan"),
    (dict(saveat=torch.tensor([[0.2, 0.5], [0.1, math.nan]], dtype=F64)), ValueError, "is not finite"),
    (dict(saveat=torch.rand(3, 2, dtype=F64)), ValueError, "must have shape \\(B, T\\) = \\(2, T\\)"),
    (dict(saveat=torch.tensor([[0.2, 0.5], [0.1, 0.3]], dtype=F64), saveat_mask=torch.ones(2, 3, dtype=torch.bool)),
     ValueError, "saveat_mask has shape \\(2, 3\\) but saveat has shape \\(2, 2\\)"),
    (dict(saveat=torch.tensor([[0.2, 0.5], [0.1, 0.3]], dtype=F64), saveat_mask=torch.ones(2, 2)), TypeError,
     "saveat_mask must be a boolean tensor"),
    (dict(batch="per_sample"), ValueError, "batch must be one of \\('joint', 'per-sample'\\)"),
    (dict(batch="per-sample", dense=True), NotImplementedError, "dense=True"),
    (dict(batch="per-sample", solver=de.VCAB3()), NotImplementedError, "explicit Runge–Kutta"),
    (dict(batch="per-sample", callback=de.TerminateSteadyState()), NotImplementedError, "termination callbacks"),
])
def test_bad_inputs_are_named(kwargs, error, match):
    kwargs = dict(kwargs)
    k, u0 = batch_case(2)
    solver = kwargs.pop("solver", de.Tsit5())
    for batch in ([kwargs.pop("batch")] if "batch" in kwargs else ["joint", "per-sample"]):
        with pytest.raises(error, match=match):
            de.solve(problem(k, u0), solver, batch=batch, **kwargs)


def test_saveat_outside_a_per_sample_span_and_bad_spans():
    k, u0 = batch_case(2)
    spans = (torch.tensor([0.0, 0.5], dtype=F64), torch.tensor([1.0, 0.8], dtype=F64))
    with pytest.raises(ValueError, match="saveat\\[1, 0\\] = 0.2 is outside sample 1's tspan \\(0.5, 0.8\\)"):
        de.solve(problem(k, u0, tspan=spans), saveat=torch.tensor([[0.2, 0.9], [0.2, 0.7]], dtype=F64),
                 batch="per-sample")
    with pytest.raises(ValueError, match="must have shape \\(2,\\)"):
        problem(k, u0, tspan=(torch.zeros(3, dtype=F64), 1.0))
    with pytest.raises(ValueError, match="finite"):
        problem(k, u0, tspan=(torch.zeros(2, dtype=F64), torch.tensor([1.0, math.inf], dtype=F64)))


# --- the loop's helpers ------------------------------------------------------------------------

@pytest.mark.parametrize("controller", [de.PIController.for_order(5), de.PIController(beta1=0.17, beta2=0.04),
                                        de.PIController(beta1=0.1, beta2=0.05, qsteady_min=0.9, qsteady_max=1.3),
                                        de.IController(error_order=4),
                                        de.IController(error_order=2, qsteady_min=0.8, qsteady_max=1.2)],
                         ids=repr)
def test_per_sample_decisions_equal_the_controllers_own(controller):
    from types import SimpleNamespace
    from pylux.diffeq.per_sample import PerSampleLoop
    errors = torch.tensor([0.0, 1e-6, 0.3, 0.95, 1.0, 1.0001, 3.0, 80.0, math.nan, math.inf], dtype=F64)
    dt = torch.linspace(0.01, -0.2, errors.numel(), dtype=F64)
    qold = torch.linspace(1e-4, 0.9, errors.numel(), dtype=F64)
    ok, finite, dt_next, qold_new = PerSampleLoop.decide(SimpleNamespace(controller=controller), errors, dt, qold)
    for j, e in enumerate(errors.tolist()):
        if not math.isfinite(e):  # the joint loop shrinks a NaN/Inf step by NONFINITE_SHRINK
            assert not ok[j] and not finite[j] and float(dt_next[j]) == pytest.approx(float(dt[j]) * 0.2, rel=1e-15)
            continue
        accept, want, state = controller.decide(de.ControllerState(qold=float(qold[j])), e, float(dt[j]))
        assert bool(ok[j]) == accept
        assert float(dt_next[j]) == pytest.approx(want, rel=1e-14)
        if accept and isinstance(controller, de.PIController):
            assert float(qold_new[j]) == pytest.approx(state.qold, rel=1e-14)


def test_float32_time_per_sample_spans():
    k, u0 = batch_case(2, seed=12)
    t1 = torch.tensor([1.0, 0.7], dtype=torch.float32)
    prob = problem(k, u0, tspan=(torch.zeros(2, dtype=torch.float32), t1))
    assert prob.time_dtype == torch.float32
    sol = de.solve(prob, de.Tsit5(), batch="per-sample", reltol=1e-6, abstol=1e-8)
    assert sol.t.dtype == torch.float32
    for b in range(2):
        alone = de.solve(problem(k[b:b + 1], u0[b:b + 1], tspan=(torch.tensor(0.0), t1[b])), de.Tsit5(),
                         reltol=1e-6, abstol=1e-8)
        assert int(sol.stats.naccept_per_sample[b]) == alone.stats.naccept
        torch.testing.assert_close(sol.u[-1, b], alone.u[-1, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch", ["joint", "per-sample"])
def test_an_empty_batch_with_per_sample_times_is_refused_clearly(batch):
    u0 = torch.zeros(0, 2, dtype=torch.float64)
    prob = de.ODEProblem(lambda u, p, t: -u, u0, (0.0, 1.0))
    with pytest.raises(ValueError, match="empty batch.*shape \\(0, 2\\)"):
        de.solve(prob, de.Tsit5(), saveat=torch.zeros(0, 3, dtype=torch.float64), batch=batch)
