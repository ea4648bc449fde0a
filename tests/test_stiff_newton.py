"""ESDIRK Newton iteration: a Jacobian kept across steps is checked along the step (regression for the
under-controlled Van der Pol transition of Kvaerno5), and the implicit-function-theorem gradient of the
stage solves."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import pylux as lx

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
