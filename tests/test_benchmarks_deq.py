"""benchmarks/deq_solvers.py: the implicit backward it times (the library's SteadyStateAdjoint) gives
the gradient of the DEQ.

The reference is independent of every iterative solver: z* by 400 fixed-point steps in float64 (the map
contracts by at most 0.9, so the error is below 1e-17), and the adjoint from the dense per-sample system
(I - J_b^T) lambda_b = dL/dz_b with J_b = diag(1 - z*_b^2) W.
"""

import pathlib
import sys

import pytest
import torch

pytest.importorskip("torchdeq")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import deq_solvers as dq  # noqa: E402


def _problem():
    W, U, b, x = dq.make_problem()
    params = tuple(p.detach().double().requires_grad_() for p in (W, U, b))
    return params, x.double(), torch.zeros(dq.BATCH, dq.STATE, dtype=torch.float64)


def _reference(params, x):
    g = dq.cell(*params, x)
    with torch.no_grad():
        z = torch.zeros(dq.BATCH, dq.STATE, dtype=torch.float64)
        for _ in range(400):
            z = g(z)
    gz = g(z)
    jac = (1 - gz.detach() ** 2).unsqueeze(2) * params[0].detach()
    system = torch.eye(dq.STATE, dtype=torch.float64) - jac.transpose(1, 2)
    lam = torch.linalg.solve(system, gz.detach().unsqueeze(2)).squeeze(2)  # dL/dz = z for L = ||z||^2 / 2
    return torch.autograd.grad(gz, params, lam)


@pytest.mark.parametrize("solver,backward", [("broyden", None), ("anderson", None), ("fixed_point", None),
                                             ("fixed_point", "gmres")])
def test_implicit_gradient_matches_dense_adjoint(solver, backward):
    params, x, z0 = _problem()
    reference = _reference(params, x)
    grads, _ = dq.pylux_fwd_bwd(solver, params, x, z0, backward=backward)
    td_grads, _ = dq.torchdeq_fwd_bwd(solver, params, x, z0)
    for got, want in zip(grads, reference):
        # the forward and backward stop at ||residual|| <= 1e-4 per sample; a gradient that skipped the
        # adjoint solve (lambda = dL/dz, JacobianFreeBackprop) is off by 28-31% here
        assert ((got - want).norm() / want.norm()).item() < 1e-4
    for got, want in zip(td_grads, reference):  # the peer it is timed against meets the same bound
        assert ((got - want).norm() / want.norm()).item() < 1e-4
