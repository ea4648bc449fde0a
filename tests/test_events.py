"""Events (ContinuousCallback, DiscreteCallback, terminate), tstops with events, infinite t1, event-time
gradients, and SecondOrderODEProblem: against closed forms, separate solves and finite differences."""

import math

import numpy as np
import pytest
import torch

import pylux as lx
import pylux.diffeq as de
from pylux.diffeq.events import illinois

F64 = torch.float64
G = 9.81
TOL = dict(reltol=1e-10, abstol=1e-10)


def ball_field(u, p, t):
    """Free fall, state (..., [height, velocity]); p is the gravity."""
    gravity = G if p is None else p
    return torch.stack([u[..., 1], -gravity * torch.ones_like(u[..., 0])], dim=-1)


def bounce(e):
    return lambda u, t: torch.stack([u[..., 0], -e * u[..., 1]], dim=-1)


def impact_times(h, e, n, g=G):
    """Closed form: first impact sqrt(2h/g), then flights 2 e^k v1 / g with v1 = sqrt(2 g h)."""
    v1 = math.sqrt(2 * g * h)
    times = [math.sqrt(2 * h / g)]
    for k in range(1, n):
        times.append(times[-1] + 2 * e ** k * v1 / g)
    return times


def floor_event(affect, **kwargs):
    return de.ContinuousCallback(lambda u, t: u[..., 0], affect, direction=-1, **kwargs)


# --- bouncing ball ----------------------------------------------------------------------------------

def test_bouncing_ball_ten_bounces_match_the_closed_form():
    h, e = 1.0, 0.8
    expected = impact_times(h, e, 10)
    prob = de.ODEProblem(ball_field, torch.tensor([h, 0.0], dtype=F64), (0.0, expected[-1] + 0.05))
    sol = de.solve(prob, de.Tsit5(), callback=floor_event(bounce(e)), **TOL)
    assert sol.retcode == de.ReturnCode.Success and len(sol.events) == 10
    assert np.max(np.abs(sol.events.t.numpy() - expected)) < 1e-10
    # the state at each event is the one before the affect: on the floor, falling at e^(k-1) v1
    v1 = math.sqrt(2 * G * h)
    states = torch.stack(sol.events.u)
    assert states[:, 0].abs().max() < 1e-10
    assert torch.allclose(states[:, 1], torch.tensor([-v1 * e ** k for k in range(10)], dtype=F64), atol=1e-9)
    assert sol.events.callback.tolist() == [0] * 10 and not sol.events.terminal.any()
    # after the last bounce the ball flies up freely: height at the end from the closed form
    v_last = v1 * e ** 10
    assert abs(sol.u[-1, 0].item() - (v_last * 0.05 - G * 0.05 ** 2 / 2)) < 1e-9


def test_bouncing_ball_float32():
    h, e = 1.0, 0.7
    expected = impact_times(h, e, 4)
    prob = de.ODEProblem(ball_field, torch.tensor([h, 0.0]), (0.0, expected[-1] + 0.01))
    sol = de.solve(prob, de.Tsit5(), callback=floor_event(bounce(e)), reltol=1e-6, abstol=1e-6)
    assert len(sol.events) == 4 and sol.u.dtype == torch.float32
    assert np.max(np.abs(sol.events.t.numpy() - expected)) < 1e-5


def test_dense_output_jumps_at_the_event():
    e = 0.5
    t1 = impact_times(1.0, e, 1)[0]
    prob = de.ODEProblem(ball_field, torch.tensor([1.0, 0.0], dtype=F64), (0.0, 1.0))
    sol = de.solve(prob, de.Tsit5(), callback=floor_event(bounce(e)), **TOL)
    v1 = G * t1
    before, after = sol(t1 - 1e-3), sol(t1 + 1e-3)
    assert abs(before[1].item() - (-v1 + G * 1e-3)) < 1e-9
    assert abs(after[1].item() - (e * v1 - G * 1e-3)) < 1e-9


# --- direction, several events, which fired ---------------------------------------------------------

def oscillator(u, p, t):
    return torch.stack([u[..., 1], -u[..., 0]], dim=-1)


@pytest.mark.parametrize("direction, expected", [
    (-1, [0.5, 2.5]), (1, [1.5, 3.5]), (0, [0.5, 1.5, 2.5, 3.5])])
def test_direction_filters_the_crossings(direction, expected):
    # x = cos t: down-crossings at pi/2 + 2 k pi, up-crossings at 3 pi/2 + 2 k pi
    prob = de.ODEProblem(oscillator, torch.tensor([1.0, 0.0], dtype=F64), (0.0, 4 * math.pi))
    cb = de.ContinuousCallback(lambda u, t: u[0], direction=direction)
    sol = de.solve(prob, de.Tsit5(), callback=cb, **TOL)
    assert np.max(np.abs(sol.events.t.numpy() - np.array(expected) * math.pi)) < 1e-8
    # no affect: the solution is untouched
    assert abs(sol.u[-1, 0].item() - 1.0) < 1e-8


def test_several_events_report_which_fired_in_time_order():
    prob = de.ODEProblem(oscillator, torch.tensor([1.0, 0.0], dtype=F64), (0.0, 2 * math.pi))
    zero = de.ContinuousCallback(lambda u, t: u[0])                        # pi/2, 3 pi/2
    half_up = de.ContinuousCallback(lambda u, t: u[0] - 0.5, direction=1)  # cos t = 0.5 rising: 5 pi/3
    clock = de.ContinuousCallback(lambda u, t: t - 1.0)                    # t = 1
    sol = de.solve(prob, de.Tsit5(), callback=[de.TerminateWhen(lambda u, t: False), zero, half_up, clock], **TOL)
    expected = [(1.0, 2), (math.pi / 2, 0), (3 * math.pi / 2, 0), (5 * math.pi / 3, 1)]
    assert sol.events.callback.tolist() == [c for _, c in expected]
    assert np.max(np.abs(sol.events.t.numpy() - [t for t, _ in expected])) < 1e-8
    assert sol.events.sample.tolist() == [0] * 4


# --- several events in one step: a sample ends at its earliest terminating event ------------------

def drift(u, p, t):
    """u' = p (1 for p None): u is linear in t, so a step of any size is exact and accepted."""
    return torch.ones_like(u) if p is None else p * torch.ones_like(u)


def solve_drift(u0, t1, callbacks, p=None, **kwargs):
    """One step (dt = 20 covers every crossing below, both time directions) unless an event cuts it; an event
    that fires again and again runs into maxiters quickly."""
    prob = de.ODEProblem(drift, torch.as_tensor(u0, dtype=F64), (0.0, t1), p)
    return de.solve(prob, de.Tsit5(), dt=20.0, callback=callbacks, maxiters=100, **kwargs)


@pytest.mark.parametrize("t1", [20.0, math.inf], ids=["finite_t1", "infinite_t1"])
@pytest.mark.parametrize("d", [1, -1], ids=["forward", "backward"])
@pytest.mark.parametrize("kind", ["t", "u"])
def test_two_terminating_events_in_one_step_end_at_the_earliest(kind, d, t1):
    # u(t) = t - 10 d: the crossings are at t = 10 d (listed first) and t = 5 d, inside the first step
    if kind == "t":
        late, early = (lambda u, t: t - 10.0 * d), (lambda u, t: t - 5.0 * d)
    else:
        late, early = (lambda u, t: u[0]), (lambda u, t: u[0] + 5.0 * d)
    sol = solve_drift([-10.0 * d], d * t1, [de.ContinuousCallback(late, de.terminate),
                                            de.ContinuousCallback(early, de.terminate)])
    assert sol.retcode == de.ReturnCode.Terminated and sol.stats.naccept == 1
    assert abs(sol.t[-1].item() - 5.0 * d) < 1e-12
    assert abs(sol.u[-1, 0].item() + 5.0 * d) < 1e-12          # the state at the end time, not at t = 10 d
    assert len(sol.events) == 1 and sol.events.callback.tolist() == [1] and sol.events.terminal.tolist() == [True]
    assert abs(sol.events.t[0].item() - 5.0 * d) < 1e-12 and abs(sol.events.u[0].item() + 5.0 * d) < 1e-12


def test_two_terminating_events_in_one_step_event_time_gradient():
    # u' = p from -10: u crosses -5 at t* = 5 / p (the earlier) and 0 at 10 / p; dt*/dp = -5 / p^2
    p = torch.tensor(1.25, dtype=F64, requires_grad=True)
    sol = solve_drift([-10.0], 20.0, [de.ContinuousCallback(lambda u, t: u[0], de.terminate),
                                      de.ContinuousCallback(lambda u, t: u[0] + 5.0, de.terminate)], p=p)
    assert len(sol.events) == 1 and abs(sol.events.t[0].item() - 4.0) < 1e-12
    grad, = torch.autograd.grad(sol.events.t[0], p, retain_graph=True)
    assert abs(grad.item() + 5.0 / 1.25 ** 2) < 1e-9
    # the event state u(t*) = -5 does not depend on p
    grad_u, = torch.autograd.grad(sol.events.u[0][0], p)
    assert abs(grad_u.item()) < 1e-9


@pytest.mark.parametrize("d", [1, -1], ids=["forward", "backward"])
def test_events_before_the_earliest_termination_fire_and_later_ones_do_not(d):
    # u(t) = t - 10 d; at t = 3 d a non-terminating event adds 1; terminating events at 6 d and 5 d; a
    # non-terminating one at 7 d (after the end, so neither applied nor logged)
    bump = de.ContinuousCallback(lambda u, t: t - 3.0 * d, lambda u, t: u + 1.0)
    late_stop = de.ContinuousCallback(lambda u, t: t - 6.0 * d, de.terminate)
    after = de.ContinuousCallback(lambda u, t: t - 7.0 * d, lambda u, t: u + 100.0)
    stop = de.ContinuousCallback(lambda u, t: t - 5.0 * d, de.terminate)
    for t1 in (20.0, math.inf):
        sol = solve_drift([-10.0 * d], d * t1, [bump, late_stop, after, stop])
        assert sol.retcode == de.ReturnCode.Terminated
        assert np.max(np.abs(sol.events.t.numpy() - [3.0 * d, 5.0 * d])) < 1e-12
        assert sol.events.callback.tolist() == [0, 3] and sol.events.terminal.tolist() == [False, True]
        assert abs(sol.t[-1].item() - 5.0 * d) < 1e-12
        assert abs(sol.u[-1, 0].item() - (-5.0 * d + 1.0)) < 1e-12
        assert abs(sol.events.u[0].item() + 7.0 * d) < 1e-12 and abs(sol.events.u[1].item() - sol.u[-1, 0].item()) < 1e-12


@pytest.mark.parametrize("d", [1, -1], ids=["forward", "backward"])
def test_per_sample_terminations_in_one_step_each_at_its_earliest(d):
    # two samples, u(t) = t - 10 d each; per-sample crossings (in |t|): A at u = -s: 5 and 8, B at 7 and 6
    A = de.ContinuousCallback(lambda u, t: u[..., 0] + d * torch.tensor([5.0, 2.0], dtype=F64), de.terminate)
    B = de.ContinuousCallback(lambda u, t: t - d * torch.tensor([7.0, 6.0], dtype=F64), de.terminate)
    sol = solve_drift([[-10.0 * d], [-10.0 * d]], d * 20.0, [A, B])
    assert sol.retcode == de.ReturnCode.Terminated and sol.stats.naccept == 1
    assert abs(sol.t[-1].item() - 6.0 * d) < 1e-12
    assert torch.allclose(sol.u[-1], torch.tensor([[-5.0 * d], [-4.0 * d]], dtype=F64), atol=1e-12, rtol=0)
    assert np.max(np.abs(sol.events.t.numpy() - [5.0 * d, 6.0 * d])) < 1e-12
    assert sol.events.callback.tolist() == [0, 1] and sol.events.sample.tolist() == [0, 1]
    # a whole-state termination at 7 after sample 0 froze at 5 (sample 1's A at 8 comes after the end)
    C = de.ContinuousCallback(lambda u, t: t - 7.0 * d, de.terminate)
    sol = solve_drift([[-10.0 * d], [-10.0 * d]], d * math.inf, [A, C])
    assert abs(sol.t[-1].item() - 7.0 * d) < 1e-12
    assert torch.allclose(sol.u[-1], torch.tensor([[-5.0 * d], [-3.0 * d]], dtype=F64), atol=1e-12, rtol=0)
    assert np.max(np.abs(sol.events.t.numpy() - [5.0 * d, 7.0 * d])) < 1e-12
    assert sol.events.callback.tolist() == [0, 1] and sol.events.terminal.all()
    assert torch.allclose(sol.events.u[1], sol.u[-1], atol=1e-12, rtol=0)


def test_an_affect_in_backward_time_fires_once():
    # u(t) = 10 + t backward from 0: +1 at t = -3 (t-based), then +20 where u falls through 2 (t = -9); each
    # fires once (the restarted condition is signed as it moves on backward in time), so u(-20) = 11
    at_time = de.ContinuousCallback(lambda u, t: t + 3.0, lambda u, t: u + 1.0)
    at_state = de.ContinuousCallback(lambda u, t: u[0] - 2.0, lambda u, t: u + 20.0)
    sol = solve_drift([10.0], -20.0, [at_time, at_state])
    assert sol.retcode == de.ReturnCode.Success
    assert np.max(np.abs(sol.events.t.numpy() - [-3.0, -9.0])) < 1e-12 and sol.events.callback.tolist() == [0, 1]
    assert abs(sol.u[-1, 0].item() - 11.0) < 1e-12


def test_a_frozen_sample_has_no_later_events_in_the_same_step():
    # sample 0 terminates at t = 3; its non-terminating event at t = 4 (same step) must not fire; sample 1's
    # at t = 6 does (+100), and sample 1 runs on to t1 = 10
    stop0 = de.ContinuousCallback(lambda u, t: t - torch.tensor([3.0, 50.0], dtype=F64), de.terminate)
    kick = de.ContinuousCallback(lambda u, t: t - torch.tensor([4.0, 6.0], dtype=F64), lambda u, t: u + 100.0)
    sol = solve_drift([[-10.0], [-10.0]], 10.0, [stop0, kick])
    assert sol.retcode == de.ReturnCode.Success
    assert np.max(np.abs(sol.events.t.numpy() - [3.0, 6.0])) < 1e-12
    assert sol.events.callback.tolist() == [0, 1] and sol.events.sample.tolist() == [0, 1]
    assert torch.allclose(sol.u[-1], torch.tensor([[-7.0], [100.0]], dtype=F64), atol=1e-10, rtol=0)


# --- batches: every sample its own event times -----------------------------------------------------

def pendulum(u, p, t):
    return torch.stack([u[..., 1], -torch.sin(u[..., 0])], dim=-1)


def quarter_period(theta0):
    from scipy.special import ellipk
    return ellipk(math.sin(theta0 / 2) ** 2)


def test_per_sample_terminating_events_equal_separate_solves_and_the_closed_form():
    amplitudes = [0.3, 1.0, 2.0, 2.8]
    u0 = torch.tensor([[a, 0.0] for a in amplitudes], dtype=F64)
    cb = de.ContinuousCallback(lambda u, t: u[..., 0], de.terminate, direction=-1)
    sol = de.solve(de.ODEProblem(pendulum, u0, (0.0, 10.0)), de.Tsit5(), callback=cb, **TOL)
    assert sol.retcode == de.ReturnCode.Terminated and len(sol.events) == 4
    times = sol.events.first_times(0)
    assert times.shape == (4,)
    assert np.max(np.abs(times.numpy() - [quarter_period(a) for a in amplitudes])) < 1e-8
    assert sol.t[-1].item() == times.max().item()
    for i, a in enumerate(amplitudes):
        alone = de.solve(de.ODEProblem(pendulum, u0[i], (0.0, 10.0)), de.Tsit5(), callback=cb, **TOL)
        assert alone.retcode == de.ReturnCode.Terminated
        assert abs(alone.events.t.item() - times[i].item()) < 1e-9
        # each sample is frozen at its own event state
        assert torch.allclose(sol.u[-1, i], alone.u[-1], atol=1e-9)
        assert torch.allclose(sol.events.u[sol.events.sample.tolist().index(i)], alone.events.u[0], atol=1e-9)


def test_frozen_samples_hold_their_event_state_in_saved_values():
    u0 = torch.tensor([[0.5, 0.0], [2.5, 0.0]], dtype=F64)
    cb = de.ContinuousCallback(lambda u, t: u[..., 0], de.terminate, direction=-1)
    ts = torch.linspace(0.0, 2.5, 26, dtype=F64)
    sol = de.solve(de.ODEProblem(pendulum, u0, (0.0, 2.5)), de.Tsit5(), callback=cb, saveat=ts, **TOL)
    t_first = quarter_period(0.5)
    assert t_first < 2.5 < quarter_period(2.5)
    frozen = sol.u[ts > t_first, 0]
    assert torch.allclose(frozen, sol.events.u[0].expand_as(frozen), atol=1e-12)
    # the other sample goes on as if alone
    alone = de.solve(de.ODEProblem(pendulum, u0[1], (0.0, 2.5)), de.Tsit5(), saveat=ts, **TOL)
    assert torch.allclose(sol.u[:, 1], alone.u, atol=1e-9)
    assert sol.retcode == de.ReturnCode.Success


def test_per_sample_bounces_match_each_sample_closed_form():
    # ends before the first ball's accumulation point of bounces (1.049 for h = 0.6)
    heights, e, end = [1.0, 0.6, 2.0], 0.5, 1.0
    u0 = torch.tensor([[h, 0.0] for h in heights], dtype=F64)
    sol = de.solve(de.ODEProblem(ball_field, u0, (0.0, end)), de.Tsit5(), callback=floor_event(bounce(e)), **TOL)
    for i, h in enumerate(heights):
        got = sol.events.t[sol.events.sample == i].numpy()
        expected = [x for x in impact_times(h, e, 40) if x < end]
        assert len(got) == len(expected) >= 1
        assert np.max(np.abs(got - expected)) < 1e-10


def test_per_sample_terminations_among_bounces():
    # each ball bounces (e = 0.8) and is stopped when it rises through 0.5 after its first bounce
    heights, e = [1.0, 2.0], 0.8
    u0 = torch.tensor([[h, 0.0] for h in heights], dtype=F64)
    rising = de.ContinuousCallback(lambda u, t: u[..., 0] - 0.5, de.terminate, direction=1)
    sol = de.solve(de.ODEProblem(ball_field, u0, (0.0, 5.0)), de.Tsit5(), callback=[floor_event(bounce(e)), rising],
                   **TOL)
    assert sol.retcode == de.ReturnCode.Terminated
    for i, h in enumerate(heights):
        v_up = e * math.sqrt(2 * G * h)
        expected = math.sqrt(2 * h / G) + (v_up - math.sqrt(v_up ** 2 - G)) / G
        assert abs(sol.events.first_times(1)[i].item() - expected) < 1e-10
        assert abs(sol.events.first_times(0)[i].item() - math.sqrt(2 * h / G)) < 1e-10
        assert abs(sol.u[-1, i, 0].item() - 0.5) < 1e-10
    assert sol.t[-1].item() == sol.events.first_times(1).max().item()


def test_events_with_fixed_steps():
    # RK4 and its third-order dense output are exact on the parabola, so the impacts are too
    e = 0.5
    prob = de.ODEProblem(ball_field, torch.tensor([1.0, 0.0], dtype=F64), (0.0, 1.2))
    sol = de.solve(prob, de.RK4(), dt=0.05, adaptive=False, callback=floor_event(bounce(e)))
    expected = [x for x in impact_times(1.0, e, 5) if x < 1.2]
    assert len(sol.events) == len(expected) and np.max(np.abs(sol.events.t.numpy() - expected)) < 1e-10


def test_event_callbacks_refused_where_they_cannot_work():
    falling = de.ODEProblem(ball_field, torch.tensor([1.0, 0.0], dtype=F64), (0.0, 1.0))
    with pytest.raises(ValueError, match="no dense output to locate events on"):
        de.solve(falling, de.Reversible(de.Heun()), dt=0.1, callback=floor_event(de.terminate))
    sde = de.SDEProblem(lambda u, p, t: -u, lambda u, p, t: 0.1 * torch.ones_like(u), torch.ones(1, dtype=F64),
                        (0.0, 1.0))
    with pytest.raises(NotImplementedError, match="not supported for SDE problems"):
        de.solve(sde, de.EulerMaruyama(), dt=0.1, callback=de.ContinuousCallback(lambda u, t: u[0] - 0.5))


# --- gradients of event times ---------------------------------------------------------------------

def falling_ball_impact(h, g, sensealg=None, t1=10.0):
    u0 = torch.stack([h, torch.zeros_like(h)])
    cb = floor_event(de.terminate)
    sol = de.solve(de.ODEProblem(ball_field, u0, (0.0, t1), g), de.Tsit5(), callback=cb, sensealg=sensealg, **TOL)
    assert sol.retcode == de.ReturnCode.Terminated
    return sol.events.t[0], sol.events.u[0]


def test_terminating_event_time_gradient_closed_form_and_finite_differences():
    h = torch.tensor(1.3, dtype=F64, requires_grad=True)
    g = torch.tensor(G, dtype=F64, requires_grad=True)
    t_star, u_star = falling_ball_impact(h, g, lx.DirectAdjoint())
    assert abs(t_star.item() - math.sqrt(2 * 1.3 / G)) < 1e-12
    dh, dg = torch.autograd.grad(t_star, (h, g))
    assert abs(dh.item() - 1 / math.sqrt(2 * 1.3 * G)) < 1e-9            # d/dh sqrt(2h/g)
    assert abs(dg.item() + math.sqrt(2 * 1.3 / G) / (2 * G)) < 1e-9      # d/dg sqrt(2h/g)
    eps = 1e-6
    with torch.no_grad():
        fd = (falling_ball_impact(h + eps, g)[0] - falling_ball_impact(h - eps, g)[0]) / (2 * eps)
    assert abs(dh.item() - fd.item()) < 1e-7
    # the impact velocity -sqrt(2 g h) carries the event time's dependence too
    t_star, u_star = falling_ball_impact(h, g)
    dv_dh, dv_dg = torch.autograd.grad(u_star[1], (h, g))
    assert abs(dv_dh.item() + math.sqrt(G / (2 * 1.3))) < 1e-9
    assert abs(dv_dg.item() + math.sqrt(1.3 / (2 * G))) < 1e-9


def test_gradient_through_bounces_matches_the_closed_form():
    e = 0.8
    h = torch.tensor(1.0, dtype=F64, requires_grad=True)
    g = torch.tensor(G, dtype=F64, requires_grad=True)
    u0 = torch.stack([h, torch.zeros_like(h)])
    sol = de.solve(de.ODEProblem(ball_field, u0, (0.0, 1.9), g), de.Tsit5(), callback=floor_event(bounce(e)), **TOL)
    third = sol.events.t[2]
    dh, dg = torch.autograd.grad(third, (h, g))

    def closed(hh, gg):
        return impact_times(hh, e, 3, gg)[2]
    eps = 1e-6
    assert abs(third.item() - closed(1.0, G)) < 1e-10
    assert abs(dh.item() - (closed(1 + eps, G) - closed(1 - eps, G)) / (2 * eps)) < 1e-7
    assert abs(dg.item() - (closed(1.0, G + eps) - closed(1.0, G - eps)) / (2 * eps)) < 1e-7


def test_per_sample_event_time_gradients_are_per_sample():
    amplitudes = torch.tensor([0.5, 1.5], dtype=F64, requires_grad=True)
    u0 = torch.stack([amplitudes, torch.zeros_like(amplitudes)], dim=-1)
    cb = de.ContinuousCallback(lambda u, t: u[..., 0], de.terminate, direction=-1)
    sol = de.solve(de.ODEProblem(pendulum, u0, (0.0, 5.0)), de.Tsit5(), callback=cb, **TOL)
    times = sol.events.first_times(0)
    grad, = torch.autograd.grad(times[1], amplitudes)
    eps = 1e-6
    fd = (quarter_period(1.5 + eps) - quarter_period(1.5 - eps)) / (2 * eps)
    assert grad[0].item() == 0.0
    assert abs(grad[1].item() - fd) < 1e-7


def test_adjoints_that_do_not_see_events_refuse_them():
    h = torch.tensor(1.0, dtype=F64)
    with pytest.raises(NotImplementedError, match="DirectAdjoint"):
        falling_ball_impact(h, None, lx.InterpolatingAdjoint())


def test_checkpointed_direct_adjoint_refusal_names_the_checkpoints():
    h = torch.tensor(1.0, dtype=F64)
    with pytest.raises(NotImplementedError, match=r"DirectAdjoint\(checkpoints=3\).*DirectAdjoint\(\) without "
                                                  r"checkpoints"):
        falling_ball_impact(h, None, lx.DirectAdjoint(checkpoints=3))


# --- t0, infinite t1, tstops, discrete callbacks -----------------------------------------------------

def test_event_zero_at_t0_does_not_fire_there():
    # on the floor, thrown upward at v0: the only impact is the landing at 2 v0 / g
    v0 = 3.0
    prob = de.ODEProblem(ball_field, torch.tensor([0.0, v0], dtype=F64), (0.0, 1.0))
    sol = de.solve(prob, de.Tsit5(), callback=de.ContinuousCallback(lambda u, t: u[0]), **TOL)
    assert len(sol.events) == 1 and abs(sol.events.t.item() - 2 * v0 / G) < 1e-10
    # a condition already past zero at t0 (below the floor, falling) never fires for direction=-1
    prob = de.ODEProblem(ball_field, torch.tensor([-0.1, 0.0], dtype=F64), (0.0, 1.0))
    sol = de.solve(prob, de.Tsit5(), callback=floor_event(de.terminate), **TOL)
    assert len(sol.events) == 0 and sol.retcode == de.ReturnCode.Success
    # a discrete condition true at t0 is first tested after the first step
    sol = de.solve(prob, de.Tsit5(), callback=de.DiscreteCallback(lambda u, t: u[0] < 0, de.terminate), **TOL)
    assert sol.retcode == de.ReturnCode.Terminated and sol.t[-1].item() > 0 and sol.stats.naccept == 1


def test_infinite_end_with_a_terminating_event():
    prob = de.ODEProblem(ball_field, torch.tensor([2.0, 0.0], dtype=F64), (0.0, math.inf))
    sol = de.solve(prob, de.Tsit5(), callback=floor_event(de.terminate), **TOL)
    assert sol.retcode == de.ReturnCode.Terminated
    assert abs(sol.t[-1].item() - math.sqrt(4 / G)) < 1e-12
    with pytest.raises(ValueError, match="infinite end needs a callback that ends the solve"):
        de.solve(prob, de.Tsit5(), callback=floor_event(bounce(0.5)))
    with pytest.raises(ValueError, match="fixed steps"):
        de.solve(prob, de.RK4(), dt=0.1, callback=floor_event(de.terminate))
    with pytest.raises(ValueError, match="both ends must be finite"):
        de.ODEProblem(ball_field, torch.tensor([2.0, 0.0], dtype=F64), (-math.inf, 0.0))


def test_tstops_with_events():
    e, stops = 0.8, [0.2, 0.45, 1.0]
    expected = impact_times(1.0, e, 3)
    prob = de.ODEProblem(ball_field, torch.tensor([1.0, 0.0], dtype=F64), (0.0, 1.5))
    sol = de.solve(prob, de.Tsit5(), callback=floor_event(bounce(e)), tstops=stops, save_stats=True, **TOL)
    ends = {b for _, b in sol.stats.steps}
    assert set(stops) <= ends and set(sol.events.t.tolist()) <= ends
    assert np.max(np.abs(sol.events.t.numpy() - [x for x in expected if x < 1.5])) < 1e-10


def test_discrete_callback_affect_and_terminate():
    # u' = 1 with fixed steps of 0.1: subtract 1 whenever u > 0.55 (a sawtooth)
    prob = de.ODEProblem(lambda u, p, t: torch.ones_like(u), torch.zeros(1, dtype=F64), (0.0, 1.0))
    reset = de.DiscreteCallback(lambda u, t: u[0] > 0.55, lambda u, t: u - 1.0)
    sol = de.solve(prob, de.RK4(), dt=0.1, adaptive=False, callback=reset)
    assert sol.events.t.tolist() == pytest.approx([0.6])
    assert sol.u[-1].item() == pytest.approx(0.0, abs=1e-12)
    stop = de.DiscreteCallback(lambda u, t: u[0] > 0.55, de.terminate)
    sol_stop = de.solve(prob, de.RK4(), dt=0.1, adaptive=False, callback=stop)
    sol_when = de.solve(prob, de.RK4(), dt=0.1, adaptive=False, callback=de.TerminateWhen(lambda u, t: u[0] > 0.55))
    assert sol_stop.retcode == sol_when.retcode == de.ReturnCode.Terminated
    assert torch.equal(sol_stop.t, sol_when.t) and torch.equal(sol_stop.u, sol_when.u)


def test_rootfind_false_puts_the_event_at_the_first_sampled_point_past_the_crossing():
    prob = de.ODEProblem(ball_field, torch.tensor([1.0, 0.0], dtype=F64), (0.0, 1.0))
    cb = de.ContinuousCallback(lambda u, t: u[0], de.terminate, direction=-1, rootfind=False, interp_points=0)
    sol = de.solve(prob, de.Tsit5(), callback=cb, save_stats=True, **TOL)
    t_true = math.sqrt(2 / G)
    assert sol.events.t.item() >= t_true and sol.events.t.item() == sol.stats.steps[-1][1]


def test_a_callback_that_never_fires_costs_no_evaluations_or_steps():
    prob = de.ODEProblem(oscillator, torch.tensor([1.0, 0.0], dtype=F64), (0.0, 3.0))
    plain = de.solve(prob, de.Tsit5(), **TOL)
    watched = de.solve(prob, de.Tsit5(), callback=de.ContinuousCallback(lambda u, t: u[0] - 5.0), **TOL)
    assert (watched.stats.nf, watched.stats.naccept) == (plain.stats.nf, plain.stats.naccept)
    assert torch.equal(watched.u, plain.u) and len(watched.events) == 0 and plain.events is None


# --- bad input --------------------------------------------------------------------------------------

def test_bad_event_inputs_raise_clearly():
    prob = de.ODEProblem(ball_field, torch.zeros(2, 2, dtype=F64), (0.0, 1.0))
    with pytest.raises(ValueError, match=r"returned shape \(3,\) for a state of shape \(2, 2\).*e.g. \(2,\)"):
        de.solve(prob, callback=de.ContinuousCallback(lambda u, t: torch.zeros(3, dtype=F64)))
    with pytest.raises(TypeError, match="real floating-point tensor.*DiscreteCallback"):
        de.solve(prob, callback=de.ContinuousCallback(lambda u, t: u[:, 0] > 0))
    with pytest.raises(TypeError, match="boolean tensor"):
        de.solve(prob, callback=de.DiscreteCallback(lambda u, t: u[:, 0], de.terminate))
    with pytest.raises(ValueError, match="direction must be"):
        de.ContinuousCallback(lambda u, t: u[0], direction=2)
    with pytest.raises(TypeError, match="affect must be None, terminate or a callable"):
        de.ContinuousCallback(lambda u, t: u[0], affect=3)
    with pytest.raises(TypeError, match="affect must be terminate or a callable"):
        de.DiscreteCallback(lambda u, t: u[0] > 0, None)
    falling = de.ODEProblem(ball_field, torch.tensor([1.0, 0.0], dtype=F64), (0.0, 1.0))
    with pytest.raises(ValueError, match=r"affect\(u, t\) must return a new state like u"):
        de.solve(falling, callback=floor_event(lambda u, t: u[0]))
    with pytest.raises(TypeError, match="an event callback"):
        de.solve(falling, callback=[floor_event(None), "stop"])


def test_illinois_converges_on_a_batch():
    roots = np.array([0.1, 0.5, 0.93, 1 / 3])
    calls = []

    def g_of(x, idx):
        calls.append(len(idx))
        return np.tanh(5 * (roots[idx] - x)) + 1e-3 * (roots[idx] - x) ** 3   # decreasing through each root
    a, b, ga, gb = illinois(g_of, np.zeros(4), np.ones(4), g_of(np.zeros(4), np.arange(4)),
                            g_of(np.ones(4), np.arange(4)), 1e-14)
    assert np.all((b - a <= 1e-14) | (gb == 0)) and np.max(np.abs(b - roots)) < 1e-14 and np.all(gb <= 0)
    assert len(calls) < 20   # superlinear: far fewer than bisection's 47 halvings


# --- second-order problems -------------------------------------------------------------------------

def test_second_order_harmonic_oscillator_against_the_closed_form():
    omega = 1.7
    u0, du0 = torch.tensor([1.0, -0.5], dtype=F64), torch.tensor([0.3, 2.0], dtype=F64)
    prob = lx.SecondOrderODEProblem(lambda du, u, p, t: -p ** 2 * u, du0, u0, (0.0, 3.0), omega)
    ts = torch.linspace(0.0, 3.0, 7, dtype=F64)
    sol = de.solve(prob, de.Tsit5(), saveat=ts, **TOL)
    c, s = torch.cos(omega * ts)[:, None], torch.sin(omega * ts)[:, None]
    assert sol.u.shape == (7, 2, 2) and sol.position.shape == sol.velocity.shape == (7, 2)
    assert torch.allclose(sol.position, u0 * c + du0 / omega * s, atol=1e-8)
    assert torch.allclose(sol.velocity, -u0 * omega * s + du0 * c, atol=1e-8)
    assert torch.equal(prob.position(sol.u), sol.position)


@pytest.mark.parametrize("sensealg", [None, lx.InterpolatingAdjoint()])
def test_second_order_gradient_against_closed_form_and_finite_differences(sensealg):
    omega = torch.tensor(1.3, dtype=F64, requires_grad=True)
    u0 = torch.tensor([0.8], dtype=F64, requires_grad=True)
    du0 = torch.tensor([0.0], dtype=F64)

    def position_at_2(w, x0):
        prob = lx.SecondOrderODEProblem(lambda du, u, p, t: -p ** 2 * u, du0, x0, (0.0, 2.0), w)
        return de.solve(prob, de.Tsit5(), saveat=[2.0], sensealg=sensealg, **TOL).position[-1, 0]
    dw, dx0 = torch.autograd.grad(position_at_2(omega, u0), (omega, u0))
    # u(2) = u0 cos(2 w): du/dw = -2 u0 sin(2 w), du/du0 = cos(2 w)
    assert abs(dw.item() + 2 * 0.8 * math.sin(2.6)) < 1e-7
    assert abs(dx0.item() - math.cos(2.6)) < 1e-7
    eps = 1e-6
    with torch.no_grad():
        fd = (position_at_2(omega + eps, u0) - position_at_2(omega - eps, u0)) / (2 * eps)
    assert abs(dw.item() - fd.item()) < 1e-6


def test_second_order_learned_acceleration_gradient_matches_finite_differences():
    # the Lux example's shape: d2u/dt2 = NN(u), here a small Dense layer
    model = lx.nn.Dense(2, 2, torch.tanh)
    ps, _ = lx.setup(torch.Generator().manual_seed(0), model)
    ps = {k: v.to(F64) for k, v in ps.items()}
    flat, unflatten = lx.flatten(ps)
    flat = flat.detach().requires_grad_(True)

    def loss(vector):
        params = unflatten(vector)
        prob = lx.SecondOrderODEProblem(lambda du, u, p, t: model(u, p, {})[0], torch.zeros(2, dtype=F64),
                                        torch.tensor([0.5, -0.2], dtype=F64), (0.0, 1.0), params)
        sol = de.solve(prob, de.Tsit5(), saveat=[0.5, 1.0], **TOL)
        return (sol.position ** 2).sum() + sol.velocity[-1].sum()
    grad, = torch.autograd.grad(loss(flat), flat)
    eps = 1e-6
    with torch.no_grad():
        fd = torch.stack([(loss(flat + eps * d) - loss(flat - eps * d)) / (2 * eps) for d in torch.eye(len(flat), dtype=F64)])
    assert torch.allclose(grad, fd, atol=1e-7) and grad.abs().max() > 1e-3


def test_second_order_bad_inputs():
    with pytest.raises(ValueError, match="du0 and u0 must have the same shape"):
        lx.SecondOrderODEProblem(lambda du, u, p, t: -u, torch.zeros(2), torch.zeros(3), (0.0, 1.0))
    with pytest.raises(ValueError, match="du0 and u0 must have the same dtype"):
        lx.SecondOrderODEProblem(lambda du, u, p, t: -u, torch.zeros(2), torch.zeros(2, dtype=F64), (0.0, 1.0))
    prob = lx.SecondOrderODEProblem(lambda du, u, p, t: u[:1], torch.zeros(2), torch.ones(2), (0.0, 1.0))
    with pytest.raises(ValueError, match=r"must return d²u/dt² with u's shape \(2,\), got \(1,\)"):
        de.solve(prob)


def test_second_order_with_an_event():
    # a ball as a second-order problem: the condition reads the position from the packed state
    prob = lx.SecondOrderODEProblem(lambda du, u, p, t: -G * torch.ones_like(u), torch.zeros(1, dtype=F64),
                                    torch.ones(1, dtype=F64), (0.0, math.inf))
    cb = de.ContinuousCallback(lambda z, t: prob.position(z)[0], de.terminate, direction=-1)
    sol = de.solve(prob, de.Tsit5(), callback=cb, **TOL)
    assert abs(sol.t[-1].item() - math.sqrt(2 / G)) < 1e-12
    assert abs(sol.velocity[-1, 0].item() + math.sqrt(2 * G)) < 1e-9
