"""Continuous adjoints by solving the augmented system backwards in time.

:class:`BacksolveAdjoint` (Chen, Rubanova, Bettencourt, Duvenaud, NeurIPS 2018):
for a loss on the saved states, integrate from ``t_N`` back to ``t_0``

.. math::
    \\dot z = f(z, \\theta, t), \\qquad
    \\dot a_z = -a_z^\\top \\partial_z f, \\qquad
    \\dot a_\\theta = -a_z^\\top \\partial_\\theta f,

starting from :math:`a_z(t_N) = \\partial L/\\partial u(t_N)`, :math:`a_\\theta(t_N) = 0`
and adding :math:`\\partial L/\\partial u(t_k)` to :math:`a_z` at every earlier save
time. Then :math:`\\partial L/\\partial u_0 = a_z(t_0)` and
:math:`\\partial L/\\partial \\theta = a_\\theta(t_0)`. Memory is independent of the
number of steps; the price is a backward re-integration of ``z`` whose error
is not controlled against the forward trajectory, so gradients are accurate
only to the solver tolerance (and poorly for unstable backward dynamics —
prefer an interpolating or reversible method there).

With ``seminorm=True`` (Kidger, Chen & Lyons, ICML 2021) the :math:`a_\\theta`
channels are left out of the error norm: they never feed back into the other
channels, so their error cannot grow, and the backward pass takes fewer steps.
"""

from __future__ import annotations

import torch

from ..diffeq import AbstractSensitivityAlgorithm, ODEProblem, SemiNorm, Solution, integrate
from ..diffeq.options import SolveOptions
from ._params import check_no_hidden_parameters, grad_leaves, replace_leaves

__all__ = ["BacksolveAdjoint", "DirectAdjoint", "InterpolatingAdjoint"]


class DirectAdjoint(AbstractSensitivityAlgorithm):
    """Backpropagate through every operation of the solver (discretise-then-optimise).

    Exact gradients of the discrete solve, including through the adaptive
    step-size choices that depend on the state; memory grows with the number
    of steps. Required by the global error/stiffness regularizers, which
    differentiate the solver's own error estimates.
    """

    def solve_with(self, problem: ODEProblem, solver, options: SolveOptions) -> Solution:
        p = problem.p
        t0, t1 = problem.tspan
        return integrate(lambda u, t: problem.f(u, p, t), problem.u0, t0, t1, solver, options)

    def __repr__(self) -> str:
        return "DirectAdjoint()"


class BacksolveAdjoint(AbstractSensitivityAlgorithm):
    """Chen et al.'s adjoint: re-integrate ``[z, a_z, a_θ]`` backwards (see the module docstring).

    Args:
        seminorm: leave the parameter-adjoint channels out of the backward
            error norm (Kidger et al. 2021).
        reltol, abstol: tolerances of the backward solve (default: the forward ones).

    The gradient flows to ``u0`` and to every tensor of the parameter tree
    ``p`` that requires grad. A tensor that requires grad but reaches ``f``
    only through a closure raises :class:`~pylux.sensitivity.HiddenParameterError`
    instead of silently getting a zero gradient. ``sol.stats`` of the forward
    solve is returned; the backward statistics are in ``self.last_backward_stats``
    after ``backward()``.
    """

    def __init__(self, *, seminorm: bool = False, reltol: float | None = None,
                 abstol: float | None = None) -> None:
        self.seminorm = bool(seminorm)
        self.reltol = reltol
        self.abstol = abstol
        self.last_backward_stats = None

    _needs_dense = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seminorm={self.seminorm})"

    def solve_with(self, problem: ODEProblem, solver, options: SolveOptions) -> Solution:
        pairs = grad_leaves(problem.p)
        paths = [path for path, _ in pairs]
        params = [leaf for _, leaf in pairs]
        forward_options = options.replace(dense=self._needs_dense, save_stats=False)
        holder: dict = {}
        u = _BacksolveFunction.apply(self, problem, solver, forward_options, paths, holder, problem.u0,
                                     *params)
        sol = holder["solution"]
        return Solution(sol.t, u, sol.retcode, sol.stats, message=sol.message, solver=solver)


class InterpolatingAdjoint(BacksolveAdjoint):
    """The adjoint with the forward state read from the forward solve's dense output.

    Integrates only ``[a_z, a_θ]`` backward; ``z(t)`` comes from the
    interpolant of the forward solution (stored in full: memory grows with the
    number of forward steps). This avoids re-integrating ``z`` backwards, whose
    error is uncontrolled when the backward dynamics are unstable, so it is
    the robust choice where ``BacksolveAdjoint`` drifts. ``seminorm=True``
    leaves the ``a_θ`` channels out of the error norm, as for Backsolve.

    Checkpointing (re-solving between stored states instead of keeping the
    whole dense output) is not implemented yet.
    """

    _needs_dense = True


def _bound_field(problem: ODEProblem, paths, params):
    p = replace_leaves(problem.p, paths, params) if paths else problem.p
    return lambda u, t: problem.f(u, p, t)


class _BacksolveFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, alg, problem, solver, options, paths, holder, u0, *params):
        t0, t1 = problem.tspan
        detached = [x.detach() for x in params]
        with torch.no_grad():
            sol = integrate(_bound_field(problem, paths, detached), u0.detach(), t0, t1, solver, options)
        holder["solution"] = sol
        ctx.forward_solution = sol if alg._needs_dense else None
        ctx.alg, ctx.problem, ctx.solver, ctx.options, ctx.paths = alg, problem, solver, options, paths
        ctx.times = [float(t) for t in sol.t]
        ctx.t0 = t0
        ctx.save_for_backward(sol.u[-1].detach(), *detached)
        return sol.u.detach().clone()

    @staticmethod
    def backward(ctx, grad_u):
        z_final, *params = ctx.saved_tensors
        problem, paths, alg = ctx.problem, ctx.paths, ctx.alg
        shape, n_z = z_final.shape, z_final.numel()
        n_theta = sum(x.numel() for x in params)
        checked = []

        interpolant = ctx.forward_solution
        # Interpolating: the state is read from the forward dense output, not re-integrated.
        z_channels = 0 if interpolant is not None else n_z

        def augmented(aug, t):
            z = interpolant(t) if interpolant is not None else aug[:n_z].view(shape)
            a_z = aug[z_channels:z_channels + n_z].view(shape)
            with torch.enable_grad():
                z_ = z.detach().requires_grad_(True)
                ps_ = [x.detach().requires_grad_(True) for x in params]
                out = _bound_field(problem, paths, ps_)(z_, t)
                if not checked:
                    check_no_hidden_parameters(out, [z_, *ps_], where="BacksolveAdjoint: f")
                    checked.append(True)
                grads = torch.autograd.grad(out, [z_, *ps_], grad_outputs=a_z, allow_unused=True)
            pieces = [out.reshape(-1).detach()] if interpolant is None else []
            pieces += [-grads[0].reshape(-1) if grads[0] is not None
                      else torch.zeros(n_z, dtype=aug.dtype, device=aug.device)]
            for g, x in zip(grads[1:], params):
                pieces.append(-g.reshape(-1) if g is not None else torch.zeros(x.numel(), dtype=aug.dtype,
                                                                               device=aug.device))
            return torch.cat(pieces)

        options = ctx.options
        dtype, device = z_final.dtype, z_final.device
        norm = options.norm
        if alg.seminorm:
            mask = torch.zeros(z_channels + n_z + n_theta, dtype=torch.bool, device=device)
            mask[:z_channels + n_z] = True
            norm = SemiNorm(mask)
        back_options = options.replace(saveat=None, save_everystep=False, save_start=False, save_end=True,
                                       dense=False, save_stats=False, norm=norm, callbacks=(),
                                       reltol=alg.reltol if alg.reltol is not None else options.reltol,
                                       abstol=alg.abstol if alg.abstol is not None else options.abstol)
        if torch.is_tensor(back_options.abstol):
            raise NotImplementedError("BacksolveAdjoint: tensor abstol is not supported yet; pass a float")
        times = ctx.times
        aug = torch.cat(([z_final.reshape(-1)] if interpolant is None else [])
                        + [grad_u[-1].reshape(-1), torch.zeros(n_theta, dtype=dtype, device=device)])
        nf = naccept = nreject = 0
        for k in range(len(times) - 1, 0, -1):
            if times[k] != times[k - 1]:
                sol = integrate(augmented, aug, times[k], times[k - 1], ctx.solver, back_options)
                aug = sol.u[-1]
                nf, naccept, nreject = nf + sol.stats.nf, naccept + sol.stats.naccept, nreject + sol.stats.nreject
            aug = aug.clone()
            aug[z_channels:z_channels + n_z] += grad_u[k - 1].reshape(-1)
        if times and times[0] != ctx.t0:
            sol = integrate(augmented, aug, times[0], ctx.t0, ctx.solver, back_options)
            aug = sol.u[-1]
            nf, naccept, nreject = nf + sol.stats.nf, naccept + sol.stats.naccept, nreject + sol.stats.nreject
        alg.last_backward_stats = {"nf": nf, "naccept": naccept, "nreject": nreject}
        grad_u0 = aug[z_channels:z_channels + n_z].view(shape)
        grad_params, offset = [], z_channels + n_z
        for x in params:
            grad_params.append(aug[offset:offset + x.numel()].view(x.shape))
            offset += x.numel()
        return (None, None, None, None, None, None, grad_u0, *grad_params)
