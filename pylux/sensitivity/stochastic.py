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
first written in Stratonovich form, :math:`f - \tfrac12 c` (Li et al. 2020, eq. 2
and their Section 3: the adjoint SDE is derived for the Stratonovich form):

* scalar noise (one Brownian motion): :math:`c = (\partial_z g)\, g`, a
  Jacobian–vector product, exact;
* diagonal noise: the Itô–Stratonovich correction is
  :math:`c_i = g_i\, \partial g_i / \partial z_i`, the *diagonal* of
  :math:`\partial_z g` times :math:`g`. An exact diagonal costs one VJP per state
  entry, so the cheap :math:`(\partial_z g)\, g` is used, which equals it exactly
  when each :math:`g_i` depends on its own entry :math:`z_i` only
  (:math:`\partial g_i/\partial z_k = 0` for :math:`k \ne i`: ``sigma * z``, a
  per-entry network). That assumption is *checked*, not trusted: at the initial
  state (before the forward solve) and at the final state (before the backward
  solve), two VJPs with fixed random vectors :math:`v_1, v_2` (entries of modulus
  in [0.5, 1.5]) must give :math:`(J^\top v_1)/v_1 = (J^\top v_2)/v_2`
  elementwise, to a relative 1e-6 in float64 (1e-3 in float32), as they do
  exactly when :math:`J = \partial_z g` is diagonal; otherwise
  ``NotImplementedError`` (pose the problem in Stratonovich form, or use
  ``DirectAdjoint()``). A ``g`` that is diagonal at those two states but not
  elsewhere is not detected;
* additive noise (``noise="additive"``, ``g`` independent of ``z``, a matrix ``g``
  with ``noise_dim`` included): the two calculi coincide, so no correction is
  needed (a matrix ``g`` that does depend on ``z`` at the initial state is
  refused as not additive; one of ``u``'s shape is treated as diagonal noise);
* general noise: no cheap Stratonovich form, refused.

The correction is formed by double backward, so it is differentiated too.
The diffusion is checked for parameters hidden in a closure like the drift
(:class:`~pylux.sensitivity.HiddenParameterError` at the initial state, before
any work, and at the final state before the backward solve).

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
from ..diffeq._device import time_scalar
from ..diffeq.sde import EulerHeun, ReversibleHeun
from ..diffeq.terms import AbstractTerm, MultiTerm, ODETerm
from ._params import (BackwardStats, apply_adjoint_function, check_no_hidden_parameters, grad_leaves,
                      refuse_higher_order, solve_detached)

__all__ = ["stochastic_backsolve"]


def stochastic_backsolve(alg, problem, solver, options):
    """Solve an SDE forward without autograd; gradients from the backward adjoint SDE (module docstring)."""
    if problem.interpretation == "ito" and problem.noise == "general":
        raise NotImplementedError("BacksolveAdjoint: an Itô SDE with general noise has no cheap Stratonovich "
                                  "form; pose it as interpretation='stratonovich' or use sensealg=DirectAdjoint()")
    if options.save_stats or options.dense or options.callbacks:
        raise NotImplementedError("BacksolveAdjoint on an SDE: save_stats, dense and callbacks need "
                                  "DirectAdjoint()")
    if torch.is_grad_enabled():  # a gradient may be asked for: check g before any work
        pairs = grad_leaves(problem.p)
        paths = [path for path, _ in pairs]
        p = tree_replace_at_paths(problem.p, paths, [x.detach() for _, x in pairs]) if paths else problem.p
        t0 = time_scalar(problem.tspan[0], options.time_dtype, problem.u0.device)
        _probe_diffusion(problem, problem.u0, p, t0, [], "at the initial state")
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
        sweep.probe(z_final)  # before the backward solve: the diffusion at the final state
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

    def probe(self, z_final) -> None:
        """The checks of :func:`_probe_diffusion` at ``z(t1)``, on the backward solve's parameter leaves.

        Its one ``g`` evaluation and at most two VJPs are not in the counters (``ng``, ``nvjp`` count the
        backward solve itself), as the probe at the initial state is not in the forward's."""
        ctx = self.ctx
        ps_ = [x.detach().requires_grad_(True) for x in self.params]
        p = tree_replace_at_paths(ctx.problem.p, ctx.paths, ps_) if ctx.paths else ctx.problem.p
        t1 = time_scalar(ctx.problem.tspan[1], ctx.options.time_dtype, z_final.device)
        _probe_diffusion(ctx.problem, z_final.view(self.shape), p, t1, ps_, "at the final state")

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


_PROBE_SEED = 20200820  # fixed: the probe never touches torch's global generator


def _probe_diffusion(problem, z, p, t, leaves, where: str) -> None:
    """Check ``g`` at one state before the expensive work: no parameter hidden in a closure, and, for an Itô
    problem, that the Stratonovich conversion of :func:`_stratonovich_drift` is exact (module docstring).

    One evaluation of ``g`` and, for Itô diagonal or additive noise that depends on ``z``, two VJPs and one
    host synchronisation; nothing per step. ``leaves``: the parameter tensors ``g`` may use (those of ``p``
    that require grad). Raises :class:`HiddenParameterError`, or ``NotImplementedError`` when ``g_i``
    depends on entries ``z_k`` (``k != i``) under diagonal noise, or on ``z`` at all under additive noise
    with a matrix ``g``.
    """
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        g = problem.g(z, p, t)
        if not isinstance(g, torch.Tensor):
            return  # the solve itself reports a g that does not return a tensor
        check_no_hidden_parameters(g, [z, *leaves], where="BacksolveAdjoint: g")
        if problem.interpretation != "ito" or problem.noise == "scalar" or g.numel() == 0 or not g.requires_grad:
            return
        gen = torch.Generator().manual_seed(_PROBE_SEED)
        vs = []
        for _ in range(2):  # entries of modulus in [0.5, 1.5], random signs: never near zero
            mag = 0.5 + torch.rand(g.shape, generator=gen, dtype=torch.float64)
            sign = torch.where(torch.rand(g.shape, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
            vs.append((mag * sign).to(dtype=g.dtype, device=g.device))
        (j1,) = torch.autograd.grad(g, z, grad_outputs=vs[0], retain_graph=True, allow_unused=True)
        if j1 is None:
            return  # g does not depend on z
        if problem.noise_kind == "general":  # additive noise with a matrix g (general noise is refused earlier)
            if bool((j1 != 0).any()):
                raise NotImplementedError(
                    f"BacksolveAdjoint: the SDE is declared noise='additive' but its diffusion g depends on the "
                    f"state ({where}), and an Itô SDE with a state-dependent matrix g has no cheap Stratonovich "
                    "form; make g independent of u, pose the SDE as interpretation='stratonovich' with noise="
                    "'general', or use sensealg=DirectAdjoint()")
            return
        (j2,) = torch.autograd.grad(g, z, grad_outputs=vs[1], allow_unused=True)
    # J^T v / v is diag(J) for both v exactly when J = dg/dz is diagonal (off-diagonal terms weigh v_k / v_i)
    r1, r2 = j1 / vs[0], j2 / vs[1]
    rtol = {torch.float64: 1e-6, torch.float32: 1e-3}.get(g.dtype, 1e-2)
    scale = torch.maximum(r1.abs(), r2.abs())
    if bool(((r1 - r2).abs() > rtol * (scale + scale.max())).any()):
        raise NotImplementedError(
            f"BacksolveAdjoint: an Itô SDE with diagonal noise whose diffusion g_i depends on other entries z_k "
            f"(k != i) of the state (found {where}: dg/dz is not diagonal). The backsolve adjoint converts the Itô "
            "SDE to Stratonovich form with the cheap correction (dg/dz) g, which equals the diagonal-noise "
            "correction g_i dg_i/dz_i only when each g_i depends on z_i alone; the gradient would be silently "
            "wrong. Instead pose the SDE in Stratonovich form (interpretation='stratonovich', with the drift "
            "f_i - 1/2 g_i dg_i/dz_i written by hand; BacksolveAdjoint, or ReversibleAdjoint with ReversibleHeun(), "
            "then differentiate it), or use sensealg=DirectAdjoint() on the Itô problem")


def _stratonovich_drift(problem, z, p, t):
    """The drift of the Stratonovich form: ``f`` itself, or ``f - (1/2) c`` for an Itô problem with
    ``c = (dg/dz) g`` for scalar noise (one Brownian motion: a Jacobian–vector product) and
    ``c = diag(dg/dz) * g`` for diagonal noise, which equals ``(dg/dz) g`` when each ``g_i`` depends on
    ``z_i`` alone (the case the module docstring requires, checked by :func:`_probe_diffusion`); no
    correction for additive noise. Both are formed by double backward, so the correction is
    differentiated too."""
    f = problem.f(z, p, t)
    if problem.interpretation == "stratonovich" or (problem.noise == "additive" and problem.noise_kind == "general"):
        return f  # (additive noise with a matrix g: Itô = Stratonovich, checked by _probe_diffusion)
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
