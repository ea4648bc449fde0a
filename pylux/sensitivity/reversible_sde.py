r"""The backward pass of the reversible Heun method: exact discrete gradients of an SDE solve at O(1) memory.

Kidger, Foster, Li & Lyons, "Efficient and accurate gradients for neural SDEs"
(NeurIPS 2021). The forward solve (:class:`~pylux.diffeq.ReversibleHeun` on
the shared loop) keeps only the accepted steps' ``t`` and ``dt`` and the final
``(y_N, \hat z_N)``. Going backward, each step is inverted in closed form,

.. math::
    \hat z_n = 2 y_{n+1} - \hat z_{n+1} - \mu_{n+1} h - \sigma_{n+1} \Delta W_n, \qquad
    y_n = y_{n+1} - \tfrac12 (\mu_n + \mu_{n+1}) h - \tfrac12 (\sigma_n + \sigma_{n+1}) \Delta W_n,

with :math:`\mu_n = f(\hat z_n)`, :math:`\sigma_n = g(\hat z_n)` evaluated once,
under autograd, and then reused in the step map
:math:`\Phi: (y_n, \hat z_n) \mapsto (y_{n+1}, \hat z_{n+1})`, whose vector–Jacobian
product with the adjoints :math:`(a_y, a_z)` of :math:`(y_{n+1}, \hat z_{n+1})`
gives those of :math:`(y_n, \hat z_n)` and the parameter gradient. The Brownian
increments are re-queried from the solve's own path. The gradient is that of
the discrete solve (up to the round-off of the reconstruction, reported as
``backward_stats["reconstruction_error"]``), at two drift and two diffusion
evaluations and one VJP per step.
"""

from __future__ import annotations

import torch

from ..core import tree_replace_at_paths
from ..diffeq import integrate
from ..diffeq._device import time_scalar
from ..diffeq.sde import ReversibleHeun
from ._params import (apply_adjoint_function, check_all_gradients_used, check_no_hidden_parameters,
                      gradients_by_saved_time, refuse_higher_order)

__all__ = ["reversible_heun_solve"]


def reversible_heun_solve(alg, problem, solver, options):
    """Solve an SDE with ReversibleHeun, gradients by reconstruction (see the module docstring)."""
    if not isinstance(solver, ReversibleHeun):
        raise NotImplementedError(f"ReversibleAdjoint: for an SDEProblem the solver must be ReversibleHeun() "
                                  f"(algebraically reversible), got {solver!r}; or use sensealg=DirectAdjoint()")
    # saved values must be states of the discrete solve: step onto every saveat time
    options = options.replace(save_steps=True, tstops=tuple(sorted(set(options.tstops) | set(options.saveat or ()),
                                                                   key=lambda x: x * _sign(problem))))
    if alg.backprop:
        return integrate(problem.term.bind(problem.p), problem.u0, *problem.tspan, solver, options)
    return apply_adjoint_function(_ReversibleHeunFunction, alg, problem, solver, options)


def _sign(problem) -> float:
    t0, t1 = problem.tspan
    return 1.0 if t1 >= t0 else -1.0


class _ReversibleHeunFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, alg, problem, solver, options, paths, holder, u0, *params):
        detached = [x.detach() for x in params]
        p = tree_replace_at_paths(problem.p, paths, detached) if paths else problem.p
        with torch.no_grad():
            sol = integrate(problem.term.bind(p), u0.detach(), *problem.tspan, solver, options)
        y, state = sol.final_state
        z, drift, diffusion = (state.z, state.drift, state.diffusion) if state is not None else (y, None, None)
        holder["solution"] = sol
        ctx.problem, ctx.paths, ctx.t0 = problem, paths, problem.tspan[0]
        # the exact host grid (a float32 time tensor's t + dt need not be the saved time)
        ctx.steps = [(t, t_new - t) for t, t_new in sol.stats.steps] if sol.stats.steps is not None else []
        ctx.step_ends = [t_new for _, t_new in sol.stats.steps] if sol.stats.steps is not None else []
        ctx.times = sol.t.tolist()
        ctx.time = (options.time_dtype, u0.device)
        ctx.backward_stats = holder["backward_stats"]
        ctx.save_for_backward(u0.detach(), y, z, *detached)
        return sol.u.detach()

    @staticmethod
    def backward(ctx, grad_u):
        refuse_higher_order("ReversibleAdjoint")
        u0, y, z, *params = ctx.saved_tensors
        grad_at, grad_start = gradients_by_saved_time(ctx.times, ctx.t0, grad_u)
        with torch.enable_grad():
            sweep = _Sweep(ctx, params)
            a_y, a_z, a_theta, y0, z0 = sweep.run(y.detach(), z.detach(), grad_at)
        check_all_gradients_used(grad_at, "ReversibleAdjoint")
        grad_u0 = a_y + a_z + (grad_start if grad_start is not None else 0)
        error = torch.maximum((y0 - u0).abs().max(), (z0 - u0).abs().max()) if u0.numel() else u0.new_zeros(())
        ctx.backward_stats.update(nf=sweep.nf, ng=sweep.nf, nvjp=len(ctx.steps), nsteps=len(ctx.steps),
                                  reconstruction_error=float(error))
        return (None, None, None, None, None, None, grad_u0, *a_theta)


class _Sweep:
    """The backward walk over the accepted steps."""

    def __init__(self, ctx, params) -> None:
        self.ctx = ctx
        self.ps_ = [x.detach().requires_grad_(True) for x in params]
        p = tree_replace_at_paths(ctx.problem.p, ctx.paths, self.ps_) if ctx.paths else ctx.problem.p
        self.term = ctx.problem.term.bind(p)
        self.nf = 0
        self.checked = False

    def fields(self, z):
        drift, diffusion = self.term.part_vf(0, z, self._t), self.term.part_vf(1, z, self._t)
        if not self.checked:
            for out in (drift, diffusion):
                check_no_hidden_parameters(out, [z, *self.ps_], where="ReversibleAdjoint: f or g")
            self.checked = True
        self.nf += 1
        return drift, diffusion

    def run(self, y, z, grad_at):
        ctx = self.ctx
        a_y, a_z = torch.zeros_like(y), torch.zeros_like(y)
        a_theta = [torch.zeros_like(x) for x in self.ps_]
        if not ctx.steps:
            return a_y, a_z, a_theta, y, z
        self._t = time_scalar(ctx.step_ends[-1], *ctx.time)
        with torch.no_grad():
            mu1, sig1 = self.fields(z)
        for (t, dt), t_new in zip(reversed(ctx.steps), reversed(ctx.step_ends)):
            if t_new in grad_at:
                a_y = a_y + grad_at.pop(t_new)
            dW = self.term.part_term(1).control.increment(t, t_new)
            with torch.no_grad():
                z0 = 2 * y - z - mu1 * dt - self.term.part_prod(1, sig1, dW)
            z0 = z0.requires_grad_(True)
            self._t = time_scalar(t, *ctx.time)
            mu0, sig0 = self.fields(z0)
            with torch.no_grad():
                y0 = y - 0.5 * (mu0 + mu1) * dt - self.term.part_prod(1, 0.5 * (sig0 + sig1), dW)
            y0 = y0.requires_grad_(True)
            # the step map from (y_n, z_n), with mu_n, sigma_n = f, g(z_n) already on the graph
            self._t = time_scalar(t_new, *ctx.time)
            z1 = 2 * y0 - z0 + mu0 * dt + self.term.part_prod(1, sig0, dW)
            mu1_, sig1_ = self.fields(z1)
            y1 = y0 + 0.5 * (mu0 + mu1_) * dt + self.term.part_prod(1, 0.5 * (sig0 + sig1_), dW)
            grads = torch.autograd.grad((y1, z1), [y0, z0, *self.ps_], grad_outputs=(a_y, a_z), allow_unused=True)
            a_y = grads[0] if grads[0] is not None else torch.zeros_like(y)
            a_z = grads[1] if grads[1] is not None else torch.zeros_like(y)
            for j, g in enumerate(grads[2:]):
                if g is not None:
                    a_theta[j] = a_theta[j] + g
            y, z, mu1, sig1 = y0.detach(), z0.detach(), mu0.detach(), sig0.detach()
        return a_y, a_z, a_theta, y, z
