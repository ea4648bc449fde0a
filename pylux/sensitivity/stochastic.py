r"""The stochastic adjoint (Li, Wong, Chen & Duvenaud, AISTATS 2020): ``BacksolveAdjoint`` for SDEs.

For :math:`dz = f\,dt + g \circ dW` (Stratonovich) and a loss on the saved
states, the adjoint :math:`a_z = \partial L / \partial z(t)` and the parameter
adjoint :math:`a_\theta` solve, backward in time on the *same* Brownian path,

.. math::
    dz = f\,dt + g \circ dW, \qquad
    da_z = -a_z^\top \partial_z f\,dt - a_z^\top \partial_z g \circ dW, \qquad
    da_\theta = -a_z^\top \partial_\theta f\,dt - a_z^\top \partial_\theta g \circ dW,

from :math:`a_z(t_N) = \partial L/\partial z(t_N)`, :math:`a_\theta(t_N) = 0`, jumping
at every earlier saved time; :math:`\partial L/\partial u_0 = a_z(t_0)`,
:math:`\partial L/\partial\theta = a_\theta(t_0)`. Stratonovich calculus is
symmetric in time, so the backward solve is the same kind of solve with
negative steps (the increments are the path's, reversed). The diffusion term's
products :math:`a_z^\top \partial g \circ dW` are vector–Jacobian products of
:math:`\langle a_z, g\,dW\rangle`, so every noise type works. An Itô problem is
first written in Stratonovich form, :math:`f - \tfrac12 (\partial_z g)\, g` (a
Jacobian–vector product, differentiated by double backward): exact for scalar
noise; for diagonal noise it equals the Itô–Stratonovich correction
:math:`\tfrac12 g_i\, \partial g_i / \partial z_i` when each diffusion entry
depends on its own state entry only (commutative noise), which is assumed.

Accuracy, stated plainly: :math:`z` is re-integrated backward with a
low-order Stratonovich method with fixed steps:
:class:`~pylux.diffeq.EulerHeun` when that was the forward solver, else
:class:`~pylux.diffeq.ReversibleHeun` (one drift and one diffusion evaluation
a step where Heun takes two, at the same strong order; on the Itô test
problem its gradient error is about 1.5× Heun's at the same ``dt``, so it is
the cheaper of the two at equal error) — the forward ``dt`` of a fixed-step solve, the *mean* accepted
step of an adaptive one (coarser than the forward where it took small steps) —
so the gradient is that of the continuous problem up to the
backward solve's strong error (order 1 in ``dt`` for commutative noise, 0.5
otherwise) — not the exact gradient of the discrete forward solve. For exact
discrete gradients at O(1) memory use ``ReversibleAdjoint()`` with
``ReversibleHeun()``; for exact gradients of any solver, ``DirectAdjoint()``.
"""

from __future__ import annotations

import math

import torch

from ..core import tree_replace_at_paths
from ..diffeq import ConstantStepSize, integrate
from ..diffeq.sde import EulerHeun, ReversibleHeun
from ..diffeq.terms import AbstractTerm, MultiTerm, ODETerm
from ._params import (BackwardStats, apply_adjoint_function, check_no_hidden_parameters, refuse_higher_order,
                      solve_detached)

__all__ = ["stochastic_backsolve"]


def stochastic_backsolve(alg, problem, solver, options):
    """Solve an SDE forward without autograd; gradients from the backward adjoint SDE (module docstring)."""
    if problem.interpretation == "ito" and problem.noise_kind == "general":
        raise NotImplementedError("BacksolveAdjoint: an Itô SDE with general noise has no cheap Stratonovich "
                                  "form; pose it as interpretation='stratonovich' or use sensealg=DirectAdjoint()")
    if options.save_stats or options.dense or options.callbacks:
        raise NotImplementedError("BacksolveAdjoint on an SDE: save_stats, dense and callbacks need "
                                  "DirectAdjoint()")
    return apply_adjoint_function(_StochasticAdjointFunction, alg, problem, solver, options.replace(save_steps=True))


class _StochasticAdjointFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, alg, problem, solver, options, paths, holder, u0, *params):
        sol, detached = solve_detached(problem, solver, options, paths, u0, params)
        holder["solution"] = sol
        ctx.problem, ctx.paths, ctx.solver, ctx.options = problem, paths, solver, options
        ctx.times = sol.t.tolist()
        steps = sol.stats.dt.abs().tolist() if sol.stats.dt is not None else []
        ctx.dt = options.dt if not options.adaptive and options.dt else (
            sum(steps) / len(steps) if steps else abs(problem.tspan[1] - problem.tspan[0]))
        ctx.backward_stats = holder["backward_stats"]
        ctx.save_for_backward(u0.detach(), sol.final_state[0].detach(), *detached)
        return sol.u.detach()

    @staticmethod
    def backward(ctx, grad_u):
        refuse_higher_order("BacksolveAdjoint")
        u0, z_final, *params = ctx.saved_tensors
        sweep = _AdjointSweep(ctx, u0, params)
        grads = sweep.run(z_final, grad_u)
        ctx.backward_stats.update(sweep.stats)
        return (None, None, None, None, None, None, *grads)


class _AdjointSweep:
    """The segments of the backward solve between saved times, and the jumps at them."""

    def __init__(self, ctx, u0, params) -> None:
        self.ctx, self.u0, self.params = ctx, u0, params
        self.shape, self.n = u0.shape, u0.numel()
        self.sizes = [x.numel() for x in params]
        self.stats = BackwardStats(nf=0, ng=0, naccept=0, nreject=0, nvjp=0)
        self.term = _augmented_term(ctx.problem, ctx.paths, params, self.shape, self.stats)
        forward = ctx.solver
        # reversible Heun: half of Heun's evaluations a step at the same strong order
        self.solver = forward if isinstance(forward, (EulerHeun, ReversibleHeun)) else ReversibleHeun()

    def run(self, z_final, grad_u):
        """From ``(z(t1), 0, 0)`` back to ``t0``, adding ``dL/du(t_k)`` to ``a_z`` at each saved time."""
        ctx = self.ctx
        t0, t1 = ctx.problem.tspan
        dtype, device = self.u0.dtype, self.u0.device
        aug = torch.cat([z_final.reshape(-1), torch.zeros(self.n + sum(self.sizes), dtype=dtype, device=device)])
        t_now = t1
        for k in range(len(ctx.times) - 1, -1, -1):
            aug = self._segment(aug, t_now, ctx.times[k])  # a segment ending before any save is z alone
            t_now = ctx.times[k]
            aug = aug.clone()
            aug[self.n:2 * self.n] += grad_u[k].reshape(-1)
        aug = self._segment(aug, t_now, t0)
        out, offset = [aug[self.n:2 * self.n].view(self.shape)], 2 * self.n
        for x, size in zip(self.params, self.sizes):
            out.append(aug[offset:offset + size].view(x.shape).to(x.dtype))
            offset += size
        return out

    def _segment(self, aug, t_from: float, t_to: float):
        if t_from == t_to:
            return aug
        options = self.ctx.options.replace(
            adaptive=False, dt=min(self.ctx.dt, abs(t_from - t_to)), saveat=None, save_everystep=False,
            save_start=False, save_end=True, dense=False, save_steps=False, tstops=(),
            controller=ConstantStepSize())
        sol = integrate(self.term, aug, t_from, t_to, self.solver, options)
        self.stats["naccept"] += sol.stats.naccept
        return sol.u[-1]


def _augmented_term(problem, paths, params, shape, stats):
    """``MultiTerm(ODETerm(F), _AdjointDiffusion)`` over the flat state ``[z, a_z, a_θ]`` (bound)."""
    n = math.prod(shape)
    checked = []

    def leaves():
        with torch.enable_grad():
            ps_ = [x.detach().requires_grad_(True) for x in params]
        p = tree_replace_at_paths(problem.p, paths, ps_) if paths else problem.p
        return ps_, p

    def drift(aug, _, t):
        ps_, p = leaves()
        with torch.enable_grad():
            z = aug[:n].view(shape).detach().requires_grad_(True)
            a_z = aug[n:2 * n].view(shape)
            f = _stratonovich_drift(problem, z, p, t)
            if not checked:
                check_no_hidden_parameters(f, [z, *ps_], where="BacksolveAdjoint: f")
                checked.append(True)
            grads = _grad(f, [z, *ps_], a_z)
        stats["nf"] += 1
        stats["nvjp"] += 1
        return torch.cat([f.detach().reshape(-1)] + [-_flat(g, x) for g, x in zip(grads, [z, *ps_])]).to(aug.dtype)

    return MultiTerm(ODETerm(drift), _AdjointDiffusion(problem, shape, leaves, stats)).bind(None)


def _stratonovich_drift(problem, z, p, t):
    """The drift of the Stratonovich form: ``f`` itself, or ``f - (1/2) c`` for an Itô problem with
    ``c = (dg/dz) g`` for scalar noise (one Brownian motion: a Jacobian–vector product) and
    ``c = diag(dg/dz) * g`` for diagonal noise, which equals ``(dg/dz) g`` when each ``g_i`` depends on
    ``z_i`` alone (the commutative case the module docstring requires). Both are formed by double
    backward, so the correction is differentiated too."""
    f = problem.f(z, p, t)
    if problem.interpretation == "stratonovich":
        return f
    g = problem.g(z, p, t)
    if not g.requires_grad:  # g independent of z and the parameters: additive noise, no correction
        return f
    # J v by the double-vjp trick: d/dw <J^T w, v> = J v
    w = torch.zeros_like(g, requires_grad=True)
    (vjp,) = torch.autograd.grad(g, z, grad_outputs=w, create_graph=True, allow_unused=True)
    if vjp is None:  # g depends on the parameters only: additive noise
        return f
    (jvp,) = torch.autograd.grad(vjp, w, grad_outputs=g, create_graph=True, allow_unused=True)
    return f if jvp is None else f - 0.5 * jvp


class _AdjointDiffusion(AbstractTerm):
    """The augmented system's diffusion: ``[g dW, -a_zᵀ ∂_z g dW, -a_zᵀ ∂_θ g dW]`` as one VJP per product."""

    def __init__(self, problem, shape, leaves, stats) -> None:
        self.problem, self.shape, self.leaves, self.stats = problem, shape, leaves, stats
        self.control = problem.term.terms[1].control
        self.kind_term = problem.term.terms[1]

    def vf(self, aug, _, t):
        n = math.prod(self.shape)
        ps_, p = self.leaves()
        with torch.enable_grad():
            z = aug[:n].view(self.shape).detach().requires_grad_(True)
            g = self.problem.g(z, p, t)
        self.stats["ng"] += 1
        return (g, z, aug[n:2 * n].view(self.shape), ps_, aug)

    def contr(self, t0, t1):
        return self.control.increment(t0, t1)

    def prod(self, vf, control):
        g, z, a_z, ps_, aug = vf
        with torch.enable_grad():
            noise = self.kind_term.prod(g, control)
            # a multistep-like solver (reversible Heun) multiplies one evaluation by two increments
            grads = _grad((a_z * noise).sum(), [z, *ps_], None, retain=True)
        self.stats["nvjp"] += 1
        return torch.cat([noise.detach().reshape(-1)] + [-_flat(gr, x) for gr, x in zip(grads, [z, *ps_])]).to(aug.dtype)


def _grad(out, inputs, cotangent, retain: bool = False):
    if not out.requires_grad:
        return [None] * len(inputs)
    return torch.autograd.grad(out, inputs, grad_outputs=cotangent, allow_unused=True, retain_graph=retain)


def _flat(g, like):
    return g.reshape(-1) if g is not None else torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
