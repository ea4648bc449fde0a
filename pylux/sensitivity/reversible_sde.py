r"""The backward pass of the reversible Heun method: exact discrete gradients of an SDE solve at O(1) memory.

Kidger, Foster, Li & Lyons, "Efficient and accurate gradients for neural SDEs"
(NeurIPS 2021). The forward solve (:class:`~pylux.diffeq.ReversibleHeun` on
the shared loop) keeps only the accepted steps' ``t`` and ``dt`` and the final
``(y_N, \hat z_N)``. Going backward, each step is inverted in closed form,

.. math::
    \hat z_n = 2 y_{n+1} - \hat z_{n+1} - \mu_{n+1} h - \sigma_{n+1} \Delta W_n, \qquad
    y_n = y_{n+1} - \tfrac12 (\mu_n + \mu_{n+1}) h - \tfrac12 (\sigma_n + \sigma_{n+1}) \Delta W_n,

with :math:`\mu_n = f(\hat z_n)`, :math:`\sigma_n = g(\hat z_n)` evaluated once,
under autograd. Reverse mode then runs over the solve's nodes rather than its
steps (:meth:`_Sweep.run`): that one evaluation both rebuilds :math:`y_n` and
carries the cotangents of :math:`\mu_n, \sigma_n` from the two steps they enter,
so a backward step costs one drift and one diffusion evaluation and one VJP,
as a forward step does (a VJP of each step map would evaluate the fields
twice). The Brownian increments are re-queried from the solve's own path. The
gradient is that of the discrete solve (up to the round-off of the
reconstruction, reported as ``backward_stats["reconstruction_error"]``).
"""

from __future__ import annotations

import torch

from ..core import tree_replace_at_paths
from ..diffeq import integrate
from ..diffeq._device import time_scalar
from ..diffeq.sde import ReversibleHeun
from ._params import (apply_adjoint_function, check_all_gradients_used, check_no_hidden_parameters,
                      gradients_by_saved_time, refuse_higher_order, solve_detached)

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
        sol, detached = solve_detached(problem, solver, options, paths, u0, params)
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
        ctx.backward_stats.update(nf=sweep.nf, ng=sweep.nf, nvjp=sweep.nf, nsteps=len(ctx.steps),
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
        """Reverse mode over the nodes ``k = N, ..., 0`` of the solve, one field evaluation and one VJP each.

        Node ``k`` holds ``(y_k, z_k)`` and ``mu_k, sigma_k = f, g(z_k)``. With ``(h', dW')`` the step
        after it and ``(h, dW)`` the step before, ``y_k`` enters ``y_{k+1}`` and ``2 y_k`` enters
        ``z_{k+1}``, ``z_k`` enters ``z_{k+1}`` as ``-z_k``, and ``mu_k, sigma_k`` enter both steps, so

            a_y^k = a_y^{k+1} + 2 a_z^{k+1} (+ dL/du(t_k)),
            S_k   = <a_y^{k+1}/2 + a_z^{k+1}, h' mu_k + sigma_k dW'> + <a_y^k/2, h mu_k + sigma_k dW>,
            a_z^k = -a_z^{k+1} + dS_k/dz_k,     a_theta += dS_k/dtheta,

        where the VJP of ``S_k`` is taken through the one evaluation ``f, g(z_k)`` that also rebuilds
        ``y_k``. Backprop through the step map would evaluate the fields twice a step.
        """
        ctx = self.ctx
        a_theta = [torch.zeros_like(x) for x in self.ps_]
        if not ctx.steps:
            return torch.zeros_like(y), torch.zeros_like(y), a_theta, y, z
        steps = list(zip(ctx.steps, ctx.step_ends))
        k = len(steps)
        control = self.term.part_term(1).control
        after = None  # (h', dW', a_y^{k+1}, a_z^{k+1}) of the step after node k
        z_k = z.requires_grad_(True)
        self._t = time_scalar(ctx.step_ends[-1], *ctx.time)
        mu, sig = self.fields(z_k)
        y_k = y
        a_y = grad_at.pop(ctx.step_ends[-1], torch.zeros_like(y))
        while True:
            before = None
            if k > 0:
                (t, dt), t_new = steps[k - 1]
                before = (dt, control.increment(t, t_new))
            a_z = self._node_vjp(z_k, mu, sig, after, before, a_y, a_theta)
            if before is None:
                return a_y, a_z, a_theta, y_k, z_k.detach()
            dt, dW = before
            mu1, sig1 = mu.detach(), sig.detach()
            with torch.no_grad():
                z_prev = 2 * y_k - z_k - mu1 * dt - self.term.part_prod(1, sig1, dW)
            k -= 1
            self._t = time_scalar(steps[k][0][0], *ctx.time)
            z_k = z_prev.requires_grad_(True)
            mu, sig = self.fields(z_k)
            with torch.no_grad():
                y_k = y_k - 0.5 * (mu.detach() + mu1) * dt - self.term.part_prod(1, 0.5 * (sig.detach() + sig1), dW)
            after = (dt, dW, a_y, a_z)
            a_y = a_y + 2 * a_z
            if k > 0 and steps[k - 1][1] in grad_at:  # t0's row is added by the caller
                a_y = a_y + grad_at.pop(steps[k - 1][1])

    def _node_vjp(self, z_k, mu, sig, after, before, a_y, a_theta):
        """``a_z^k``: the VJP of ``S_k`` (see :meth:`run`) through ``f, g(z_k)``, adding to ``a_theta``."""
        prod = self.term.part_prod
        surrogate = None
        if after is not None:
            h, dW, a_y_next, a_z_next = after
            c = 0.5 * a_y_next + a_z_next
            surrogate = (c * (mu * h + prod(1, sig, dW))).sum()
        if before is not None:
            h, dW = before
            part = (0.5 * a_y * (mu * h + prod(1, sig, dW))).sum()
            surrogate = part if surrogate is None else surrogate + part
        grads = torch.autograd.grad(surrogate, [z_k, *self.ps_], allow_unused=True)
        a_z = grads[0] if grads[0] is not None else torch.zeros_like(z_k)
        if after is not None:
            a_z = a_z - after[3]
        for j, g in enumerate(grads[1:]):
            if g is not None:
                a_theta[j] = a_theta[j] + g
        return a_z
