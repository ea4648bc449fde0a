"""Binomial (revolve) checkpointing of DirectAdjoint: the schedule's counts and the gradients it gives."""

from functools import lru_cache

import pytest
import torch

import pylux as lx
from pylux.sensitivity import DirectAdjoint, HiddenParameterError
from pylux.sensitivity.checkpointing import binomial_cost, binomial_schedule, binomial_split, repetition_number

F64 = torch.float64


@lru_cache(maxsize=None)
def optimal_advances(n, c):
    """The least number of untaped steps over every split (a dynamic programme, independent of the closed form)."""
    if n <= 1:
        return 0
    if c == 1:
        return n * (n - 1) // 2
    return min(m + optimal_advances(n - m, c - 1) + optimal_advances(m, c) for m in range(1, n))


def replay(n, c):
    """Execute a schedule on indices only: returns (advances, peak stored, order of reversed steps)."""
    stored, current, advances, peak, reversed_steps = {0}, None, 0, 1, []
    for action, index in binomial_schedule(n, c):
        if action == "restore":
            assert index in stored
            current = index
        elif action == "advance":
            assert current == index
            current, advances = index + 1, advances + 1
        elif action == "store":
            assert current == index
            stored.add(index)
            peak = max(peak, len(stored))
        elif action == "free":
            stored.remove(index)
        else:
            assert current == index
            reversed_steps.append(index)
            current = None
    return advances, peak, reversed_steps


@pytest.mark.parametrize("c", [1, 2, 3, 4, 6])
def test_schedule_is_optimal_and_matches_closed_form(c):
    for n in range(1, 41):
        advances, peak, order = replay(n, c)
        assert order == list(range(n - 1, -1, -1))  # every step reversed once, last first
        assert peak <= c
        assert advances == binomial_cost(n, c) == optimal_advances(n, c), (n, c)


def test_closed_form_known_values():
    # one stored state: recompute from the start for every step; enough states: one sweep
    assert binomial_cost(10, 1) == 45
    assert binomial_cost(10, 10) == binomial_cost(10, 50) == 9
    # r = 2 for n = 10, c = 3 (binom(5, 3) = 10): t = 2 * 10 - binom(5, 4) = 15
    assert repetition_number(10, 3) == 2 and binomial_cost(10, 3) == 15
    # the McCallum-Foster table's sizes: 100 steps at 2 and 44 checkpoints
    assert binomial_cost(100, 2) == 13 * 100 - 455 and repetition_number(100, 2) == 13
    assert binomial_cost(100, 44) == 2 * 100 - 46  # r = 2, beta(45, 1) = 46
    for n, c in [(100, 8), (1000, 16), (37, 5)]:
        m = binomial_split(n, c)
        assert 1 <= m < n
        assert m + binomial_cost(n - m, c - 1) + binomial_cost(m, c) == binomial_cost(n, c)


def test_schedule_large_is_within_budget():
    advances, peak, order = replay(500, 7)
    assert advances == binomial_cost(500, 7) and peak == 7 and len(order) == 500


def field(u, p, t):
    return torch.tanh(u @ p["W"].T + p["b"]) * (1 + t)


def make_inputs(seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    W = (0.5 * torch.randn(3, 3, generator=g, dtype=F64)).to(dtype).requires_grad_(True)
    b = torch.randn(3, generator=g, dtype=F64).to(dtype).requires_grad_(True)
    u0 = torch.randn(2, 3, generator=g, dtype=F64).to(dtype).requires_grad_(True)
    return u0, W, b


def gradients(alg, solver, dtype=F64, **kwargs):
    u0, W, b = make_inputs(dtype=dtype)
    sol = lx.solve(lx.ODEProblem(field, u0, (0.0, 1.5), {"W": W, "b": b}), solver, sensealg=alg, **kwargs)
    weights = torch.arange(1, sol.u.shape[0] + 1, dtype=dtype).view(-1, 1, 1)
    loss = (weights * sol.u ** 2).sum()
    return torch.autograd.grad(loss, [u0, W, b]), sol


CASES = [
    ("tsit5-adaptive-saveat", lx.Tsit5(), dict(reltol=1e-7, abstol=1e-7, saveat=[0.2, 0.7, 1.1, 1.5])),
    ("tsit5-everystep", lx.Tsit5(), dict(reltol=1e-5, abstol=1e-5)),
    ("rk4-fixed", lx.RK4(), dict(dt=0.07)),  # 0.07 does not divide 1.5: a shortened last step
    ("bs3-saveat-start", lx.BS3(), dict(reltol=1e-5, abstol=1e-5, saveat=[0.0, 0.5, 1.0])),
]


@pytest.mark.parametrize("name,solver,kwargs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("c", [1, 3, 1000])
def test_gradients_equal_plain_direct_and_counts_follow_schedule(name, solver, kwargs, c):
    reference, ref_sol = gradients(DirectAdjoint(), solver, **kwargs)
    grads, sol = gradients(DirectAdjoint(checkpoints=c), solver, **kwargs)
    torch.testing.assert_close(sol.u, ref_sol.u, rtol=0, atol=0)  # the forward solve is the same solve
    for g, ref in zip(grads, reference):
        assert ref.abs().max() > 1e-2
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)
    stats = sol.backward_stats
    n = ref_sol.stats.naccept
    assert stats["nsteps"] == n > 5
    assert stats["nrecompute"] == binomial_cost(n, c)
    assert stats["ntaped"] == n
    assert stats["ncheckpoints"] == min(c, n)


def test_gradient_matches_finite_differences():
    u0, W, b = make_inputs()

    def loss(Wx):
        sol = lx.solve(lx.ODEProblem(field, u0.detach(), (0.0, 1.5), {"W": Wx, "b": b.detach()}), lx.Tsit5(),
                       dt=0.05, adaptive=False, saveat=[0.5, 1.5], sensealg=DirectAdjoint(checkpoints=2))
        return (sol.u ** 2).sum()
    (g,) = torch.autograd.grad(loss(W), [W])
    fd = torch.zeros_like(W)
    eps = 1e-6
    with torch.no_grad():
        for i in range(3):
            for j in range(3):
                e = torch.zeros_like(W)
                e[i, j] = eps
                fd[i, j] = (loss(W + e) - loss(W - e)) / (2 * eps)
    assert fd.abs().max() > 1e-2
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)


def test_float32_and_termination_callback():
    reference, _ = gradients(DirectAdjoint(), lx.Tsit5(), dtype=torch.float32, reltol=1e-4, abstol=1e-5)
    grads, _ = gradients(DirectAdjoint(checkpoints=2), lx.Tsit5(), dtype=torch.float32, reltol=1e-4, abstol=1e-5)
    for g, ref in zip(grads, reference):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)
    stop = lx.TerminateWhen(lambda u, t: t > 0.8)
    reference, ref_sol = gradients(DirectAdjoint(), lx.Tsit5(), callback=stop)
    grads, sol = gradients(DirectAdjoint(checkpoints=2), lx.Tsit5(), callback=stop)
    assert float(sol.t[-1]) < 1.5 and sol.retcode == ref_sol.retcode
    for g, ref in zip(grads, reference):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)


def test_forward_keeps_no_tape():
    """Memory: the forward pass saves O(state) tensors for backward, independent of the number of steps."""
    def saved_bytes(alg, dt):
        total = [0]

        def pack(x):
            total[0] += x.numel() * x.element_size()
            return x
        u0, W, b = make_inputs()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            lx.solve(lx.ODEProblem(field, u0, (0.0, 1.5), {"W": W, "b": b}), lx.Tsit5(), dt=dt, adaptive=False,
                     sensealg=alg, saveat=[1.5])
        return total[0]
    coarse, fine = saved_bytes(DirectAdjoint(checkpoints=4), 0.1), saved_bytes(DirectAdjoint(checkpoints=4), 0.01)
    assert coarse == fine <= 8 * 24
    assert saved_bytes(DirectAdjoint(), 0.01) > 50 * fine


def test_unused_parameter_gets_zero_gradient():
    u0, W, b = make_inputs()
    unused = torch.ones(2, dtype=F64, requires_grad=True)
    sol = lx.solve(lx.ODEProblem(field, u0, (0.0, 1.0), {"W": W, "b": b, "unused": unused}), lx.Tsit5(),
                   sensealg=DirectAdjoint(checkpoints=2))
    g = torch.autograd.grad(sol.u.sum(), [unused, W])
    assert torch.equal(g[0], torch.zeros(2, dtype=F64)) and g[1].abs().max() > 0


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError),
                                       ("4", TypeError)])
def test_bad_checkpoints_are_refused(bad, error):
    with pytest.raises(error, match="checkpoints"):
        DirectAdjoint(checkpoints=bad)


def test_unsupported_combinations_are_refused():
    u0, W, b = make_inputs()
    prob = lx.ODEProblem(field, u0, (0.0, 1.0), {"W": W, "b": b})
    alg = DirectAdjoint(checkpoints=3)
    assert repr(alg) == "DirectAdjoint(checkpoints=3)" and not alg.differentiates_solver
    assert DirectAdjoint().differentiates_solver
    with pytest.raises(NotImplementedError, match="save_stats"):
        lx.solve(prob, lx.Tsit5(), sensealg=alg, save_stats=True)
    with pytest.raises(NotImplementedError, match="dense"):
        lx.solve(prob, lx.Tsit5(), sensealg=alg, dense=True)
    with pytest.raises(TypeError, match="Runge"):
        lx.solve(prob, lx.VCAB3(), sensealg=alg)
    hidden = torch.ones(3, dtype=F64, requires_grad=True)
    sol = lx.solve(lx.ODEProblem(lambda u, p, t: field(u, p, t) * hidden, u0, (0.0, 1.0), {"W": W, "b": b}),
                   lx.Tsit5(), sensealg=alg)
    with pytest.raises(HiddenParameterError):
        sol.u.sum().backward()
