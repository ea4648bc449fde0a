"""The strong order 1.5 stochastic Runge–Kutta methods (SRIW1, SOSRI, SRA1, SOSRA): validated tableaus,
strong convergence on a fixed Brownian path, adaptive stepping on the shared loop, the error estimate
in the recorded statistics, and the noise/interpretation checks."""

import math

import pytest
import torch

import pylux as lx
from pylux.diffeq.brownian import BrownianTree
from pylux.diffeq.sde import SDEProblem
from pylux.diffeq.sde_srk import (SOSRA, SOSRA_TABLEAU, SOSRI, SOSRI_TABLEAU, SRA, SRA1, SRA1_TABLEAU, SRI,
                                  SRIW1, SRIW1_TABLEAU, SRATableau, SRITableau)
from pylux.diffeq.tableau import TableauError

F64 = torch.float64
PATHS = 200
MU, SIGMA = 1.0, 0.5


def brownian(shape, seed):
    # depth 14 (leaves of width 2**-14 on [0, 1]): below every step these tests take
    return BrownianTree(0.0, 1.0, shape, seed=seed, dtype=F64, levy_area="space-time", tol=2.0 ** -14,
                        cache_size=4096)


def gbm(seed, paths=PATHS, noise="diagonal", p=None):
    """du = mu u dt + sigma u dW (Itô) on a fixed path, and its exact solution at T = 1 on that path."""
    u0 = torch.ones(paths, 1, dtype=F64)
    W = brownian((paths, 1), seed)
    prob = SDEProblem(lambda u, p, t: MU * u if p is None else p["mu"] * u, lambda u, p, t: SIGMA * u,
                      u0, (0.0, 1.0), p, noise=noise, brownian=W)
    return prob, u0 * torch.exp(torch.tensor(MU - SIGMA ** 2 / 2, dtype=F64) + SIGMA * W(1.0))


def mean_error(prob, solver, exact, **kw):
    sol = lx.solve(prob, solver, save_everystep=False, **kw)
    return (sol.u[-1] - exact).abs().mean().item(), sol


def fitted_slope(dts, errors):
    x = torch.tensor(dts, dtype=F64).log()
    y = torch.tensor(errors, dtype=F64).log()
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


# --- tableaus -----------------------------------------------------------------------------------

def test_published_tableaus_pass_every_checked_condition():
    for tab in (SRIW1_TABLEAU, SOSRI_TABLEAU):
        assert isinstance(tab, SRITableau) and tab.stages == 4
    assert SRA1_TABLEAU.stages == 2 and SOSRA_TABLEAU.stages == 3
    assert SRIW1_TABLEAU.error_stages == 2 and SOSRI_TABLEAU.error_stages == 4


def _sriw1_fields(**changes):
    fields = {k: getattr(SRIW1_TABLEAU, k) for k in ("c0", "c1", "A0", "A1", "B0", "B1", "alpha", "beta1",
                                                      "beta2", "beta3", "beta4")}
    fields.update(changes)
    return fields


def test_an_sri_tableau_that_violates_an_order_condition_raises_naming_it():
    # the sign of beta2 flipped (a transcription slip that changes I_(1,1)'s weight): condition 7
    flipped = tuple(-b for b in SRIW1_TABLEAU.beta2)
    with pytest.raises(TableauError, match=r"SRI order condition 7, beta2 \. \(B1 e\) = 1"):
        SRITableau(name="bad", **_sriw1_fields(beta2=flipped))
    with pytest.raises(TableauError, match=r"row 1 of A0 sums to 0.75 but c0\[1\] = 0.5"):
        SRITableau(name="bad", **_sriw1_fields(c0=(0.0, 0.5, 0.0, 0.0)))
    with pytest.raises(TableauError, match="sum\\(alpha\\) = 1"):
        SRITableau(name="bad", **_sriw1_fields(alpha=(0.5, 0.6, 0.0, 0.0)))
    with pytest.raises(TableauError, match="row 2 of B1 must hold the 2 entries"):
        SRITableau(name="bad", **_sriw1_fields(B1=((), (0.5,), (-1.0,), (-5.0, 3.0, 0.5))))


def test_an_sra_tableau_that_violates_an_order_condition_raises():
    fields = {k: getattr(SRA1_TABLEAU, k) for k in ("c0", "c1", "A0", "B0", "alpha", "beta1", "beta2")}
    with pytest.raises(TableauError, match=r"SRA order condition 8, beta2 \. c1 = -1"):
        SRATableau(name="bad", **{**fields, "c1": (0.0, 1.0), "beta1": (0.0, 1.0)})
    with pytest.raises(TableauError, match="alpha"):
        SRATableau(name="bad", **{**fields, "alpha": (0.5, 0.5)})
    with pytest.raises(TableauError, match="error_stages"):
        SRATableau(name="bad", **fields, error_stages=3)


def test_solver_metadata_and_options():
    for cls in (SRIW1, SOSRI, SRA1, SOSRA):
        s = cls()
        assert (s.order, s.error_order, s.strong_order, s.interpolation_order) == (1.5, 1, 1.5, 1)
        assert s.needs_levy_area and isinstance(s, lx.diffeq.AbstractAdaptiveSolver)
    assert SRIW1.interpretations == ("ito",) and "additive" in SRIW1.noise_types
    assert set(SRA1.interpretations) == {"ito", "stratonovich"} and SRA1.noise_types == ("additive",)
    assert SRIW1() == SRIW1() and SRIW1() != SRIW1(delta=0.5) and SRI() == SRI(SRIW1_TABLEAU)
    assert repr(SOSRI(delta=0.25)) == "SOSRI(delta=0.25)" and repr(SRA(SOSRA_TABLEAU)) == "SRA(tableau=SOSRA)"
    with pytest.raises(ValueError, match="delta must be a finite number >= 0"):
        SRIW1(delta=-1.0)
    with pytest.raises(TypeError, match="tableau must be an SRITableau"):
        SRI(SRA1_TABLEAU)


# --- strong order on a fixed path ---------------------------------------------------------------

@pytest.mark.parametrize("solver", [SRIW1(), SOSRI()], ids=repr)
def test_sri_strong_order_on_geometric_brownian_motion(solver):
    prob, exact = gbm(seed=1)
    dts = [2.0 ** -k for k in range(3, 9)]
    errors = [mean_error(prob, solver, exact, dt=dt, adaptive=False)[0] for dt in dts]
    slope = fitted_slope(dts, errors)
    assert abs(slope - 1.5) <= 0.25, (slope, errors)
    assert errors[-1] < 2e-4


def test_sri_on_scalar_noise_matches_the_exact_solution():
    # two entries driven by one Brownian motion: u_i = u0_i exp((mu - sigma^2/2) t + sigma W)
    u0 = torch.tensor([[1.0, 2.0]] * 50, dtype=F64)
    W = brownian((50, 1), seed=3)
    prob = SDEProblem(lambda u, p, t: MU * u, lambda u, p, t: SIGMA * u, u0, (0.0, 1.0), noise="scalar",
                      brownian=W)
    exact = u0 * torch.exp(MU - SIGMA ** 2 / 2 + SIGMA * W(1.0))
    coarse, _ = mean_error(prob, SOSRI(), exact, dt=2.0 ** -4, adaptive=False)
    fine, _ = mean_error(prob, SOSRI(), exact, dt=2.0 ** -7, adaptive=False)
    assert fine < 1e-3 and coarse / fine > 2 ** (3 * 1.5 - 1)


def _nonlinear_additive(seed):
    # du = (sin(3u) + 1) dt + dW: additive noise with a nonlinear drift (strong order 1.5, not 2)
    u0 = torch.full((PATHS, 1), 0.5, dtype=F64)
    return SDEProblem(lambda u, p, t: torch.sin(3.0 * u) + 1.0, lambda u, p, t: torch.ones_like(u), u0, (0.0, 1.0),
                      noise="additive", brownian=brownian((PATHS, 1), seed))


def test_sra_strong_order_on_a_nonlinear_additive_noise_problem():
    # No closed form: the reference is SOSRA with dt = 2^-11 on the same path (its own error is about
    # 1e-6, under 2 % of the smallest error fitted); SRA1 and SOSRA converge to the same path solution.
    prob = _nonlinear_additive(seed=2)
    reference = lx.solve(prob, SOSRA(), dt=2.0 ** -11, adaptive=False, save_everystep=False).u[-1]
    dts = [2.0 ** -k for k in range(3, 8)]
    for solver in (SRA1(), SOSRA()):
        errors = [mean_error(prob, solver, reference, dt=dt, adaptive=False)[0] for dt in dts]
        slope = fitted_slope(dts, errors)
        assert abs(slope - 1.5) <= 0.25, (solver, slope, errors)


def test_sra_converges_at_order_two_on_ornstein_uhlenbeck_against_its_exact_solution():
    # du = -theta u dt + sigma dW: u(1) = e^-theta u0 + sigma e^-theta int_0^1 e^(theta s) dW_s, the
    # integral summed over 2^10 subintervals from the same path's increments and Lévy areas
    # (int_a^b e^(theta s) dW = e^(theta a) (dW + theta (b - a) (dW/2 - dH)) + O((b - a)^2.5)).
    # With a linear drift and constant noise the SRA schemes are of strong order 2.
    theta, sigma = 2.0, 1.0
    u0 = torch.ones(PATHS, 1, dtype=F64)
    W = brownian((PATHS, 1), seed=4)
    n = 2 ** 10
    integral = torch.zeros_like(u0)
    for i in range(n):
        a = i / n
        dW, dH = W.increment(a, a + 1.0 / n, levy_area=True)
        integral += math.exp(theta * a) * (dW + theta / n * (0.5 * dW - dH))
    exact = math.exp(-theta) * (u0 + sigma * integral)
    prob = SDEProblem(lambda u, p, t: -theta * u, lambda u, p, t: sigma * torch.ones_like(u), u0, (0.0, 1.0),
                      noise="additive", brownian=W)
    dts = [2.0 ** -k for k in range(2, 6)]
    for solver in (SRA1(), SOSRA()):
        errors = [mean_error(prob, solver, exact, dt=dt, adaptive=False)[0] for dt in dts]
        slope = fitted_slope(dts, errors)
        assert abs(slope - 2.0) <= 0.25, (solver, slope, errors)


def test_sra_solves_a_matrix_additive_diffusion():
    # g of shape (*u.shape, m) with noise_dim=m: u1 and u2 driven by W1 + W2 and W1 - W2
    u0 = torch.zeros(PATHS, 2, dtype=F64)
    W = brownian((PATHS, 2), seed=6)
    G = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=F64)
    prob = SDEProblem(lambda u, p, t: torch.ones_like(u), lambda u, p, t: G.expand(*u.shape, 2), u0, (0.0, 1.0),
                      noise="additive", noise_dim=2, brownian=W)
    sol = lx.solve(prob, SOSRA(), dt=0.125, adaptive=False, save_everystep=False)
    assert torch.allclose(sol.u[-1], 1.0 + W(1.0) @ G.T, atol=1e-12)


# --- adaptive stepping --------------------------------------------------------------------------

def test_sriw1_adaptive_error_shrinks_with_the_tolerance():
    prob, exact = gbm(seed=5)
    errors, steps = [], []
    for tol in (1e-2, 1e-3, 3e-4):
        error, sol = mean_error(prob, SRIW1(), exact, reltol=tol, abstol=tol)
        errors.append(error)
        steps.append(sol.stats.naccept)
    assert errors[0] > errors[1] > errors[2], errors
    assert steps[0] < steps[1] < steps[2], steps
    assert errors[-1] < 2e-5 and errors[0] / errors[-1] > 30, errors


def test_adaptive_solves_from_other_first_steps_reach_the_same_path_solution():
    # A rejected step re-queries the same Brownian path, so the first step does not change which
    # solution is approximated; a far too large first step must be rejected.
    prob, exact = gbm(seed=6)
    results = [mean_error(prob, SOSRI(), exact, reltol=1e-3, abstol=1e-3, dt=dt) for dt in (0.5, 1e-3)]
    (err_a, sol_a), (err_b, sol_b) = results
    assert sol_a.stats.nreject > 0 and sol_b.stats.nreject == 0
    assert err_a < 5e-5 and err_b < 5e-5
    assert (sol_a.u[-1] - sol_b.u[-1]).abs().mean().item() < 5e-5


def test_sosra_adaptive_on_additive_noise():
    prob = _nonlinear_additive(seed=7)
    reference = lx.solve(prob, SOSRA(), dt=2.0 ** -10, adaptive=False, save_everystep=False).u[-1]
    errors = [mean_error(prob, SOSRA(), reference, reltol=tol, abstol=tol)[0] for tol in (1e-2, 1e-3)]
    assert errors[0] > errors[1] and errors[1] < 1e-3, errors


def test_delta_weights_the_drift_estimate():
    # with delta = 0 only the noise estimate controls the step: fewer steps on this drift-dominated problem
    prob, _ = gbm(seed=8, paths=20)
    default = lx.solve(prob, SRIW1(), reltol=1e-2, abstol=1e-2, save_everystep=False).stats.naccept
    noise_only = lx.solve(prob, SRIW1(delta=0.0), reltol=1e-2, abstol=1e-2, save_everystep=False).stats.naccept
    assert noise_only < default


def test_save_stats_records_the_error_estimate_and_it_is_differentiable_in_the_drift_parameters():
    mu = torch.tensor(MU, dtype=F64, requires_grad=True)
    prob, _ = gbm(seed=9, paths=20, p={"mu": mu})
    sol = lx.solve(prob, SRIW1(), reltol=1e-2, abstol=1e-2, save_stats=True, save_everystep=False)
    stats = sol.stats
    assert stats.error_estimate.shape == (stats.naccept,) == stats.dt.shape == stats.t.shape
    assert bool((stats.error_estimate <= 1.0).all()) and bool((stats.error_estimate > 0).all())
    regularizer = (stats.error_estimate * stats.dt.abs().to(F64)).sum()
    (grad,) = torch.autograd.grad(regularizer, mu)
    assert torch.isfinite(grad) and grad.item() > 0  # a larger drift has a larger drift error estimate


def test_dense_output_is_linear_between_steps():
    prob, _ = gbm(seed=10, paths=5)
    sol = lx.solve(prob, SOSRI(), dt=0.25, adaptive=False, dense=True)
    mid = sol(0.125)
    assert torch.allclose(mid, 0.5 * (sol.u[0] + sol.u[1]))


# --- noise types and interpretations ------------------------------------------------------------

def test_sriw1_refuses_a_stratonovich_problem_naming_the_solvers_that_fit():
    prob, _ = gbm(seed=11, paths=4)
    strat = SDEProblem(prob.f, prob.g, prob.u0, (0.0, 1.0), interpretation="stratonovich",
                       brownian=prob.brownian)
    with pytest.raises(ValueError, match="SRIW1.*solves ito SDEs, not stratonovich") as err:
        lx.solve(strat, SRIW1(), dt=0.1)
    assert "EulerHeun()" in str(err.value) and "SRIW1()" not in str(err.value).split("use one of:")[1]


def test_sra_refuses_multiplicative_noise():
    prob, _ = gbm(seed=12, paths=4)
    with pytest.raises(ValueError, match="SRA1.*handles additive noise, not diagonal") as err:
        lx.solve(prob, SRA1(), dt=0.1)
    assert "SOSRI()" in str(err.value) and "SRIW1()" in str(err.value)


def test_sri_refuses_a_matrix_diffusion_with_a_pointer_to_sra():
    u0 = torch.zeros(4, 2, dtype=F64)
    prob = SDEProblem(lambda u, p, t: u, lambda u, p, t: torch.ones(*u.shape, 3, dtype=F64), u0, (0.0, 1.0),
                      noise="additive", noise_dim=3, brownian=brownian((4, 3), seed=13))
    with pytest.raises(ValueError, match="use SRA1\\(\\) or SOSRA\\(\\)"):
        lx.solve(prob, SOSRI(), dt=0.1)
