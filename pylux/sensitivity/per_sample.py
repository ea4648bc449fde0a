r"""The backsolve adjoint under per-sample stepping (``solve(..., batch="per-sample", sensealg=BacksolveAdjoint())``).

Under ``batch="per-sample"`` the samples of a batch are independent systems
:math:`\dot z_b = f(z_b, \theta, t_b)` that share only the parameters
:math:`\theta` (:mod:`pylux.diffeq.per_sample`). Their adjoints are
independent too, so the backward pass is itself a per-sample solve: each
sample's augmented state :math:`[z_b, a_b]` is integrated backward by the same
per-sample loop (own ``t``, ``dt``, accept/reject) from its last saved time,

.. math::
    \dot z_b = f(z_b, \theta, t), \qquad \dot a_b = -a_b^\top \partial_z f(z_b, \theta, t),

with :math:`a_b` jumping by :math:`\partial L / \partial u_b(t_{b,k})` at each
of the sample's own saved times (Chen, Rubanova, Bettencourt & Duvenaud,
NeurIPS 2018). The parameter adjoint
:math:`\partial L/\partial\theta = \sum_b \int a_b^\top \partial_\theta f\,dt`
is shared by all samples and is not part of the error-controlled state: a
step of sample :math:`b` from :math:`s_b` by :math:`h_b` with stages
:math:`(z_{b,i}, a_{b,i})` and weights :math:`b_i` adds
:math:`-h_b \sum_i b_i\, a_{b,i}^\top \partial_\theta f(z_{b,i})` if the step is
accepted, which for the whole batch is **one** vector–Jacobian product of
:math:`f` with respect to :math:`\theta` per step, with the cotangent
:math:`-\mathrm{accept}_b\, h_b\, b_i\, a_{b,i}` on stage :math:`i` (summed over
the batch by autograd). This is exactly the Runge–Kutta update of the
:math:`a_\theta` channels, left out of the error norm: per-sample adjoints
**always use the seminorm** on the parameter channels (Kidger, Chen & Lyons,
ICML 2021; ``BacksolveAdjoint(seminorm=False)`` gives the same result as
``seminorm=True`` here). The step of each sample is controlled by
:math:`\max(\|z_b\|, \|a_b\|)` at the backward tolerances (each group by the
forward norm, per sample: the grouping of the joint backsolve's default).

A single-sample batch therefore takes exactly the backward steps of the joint
``BacksolveAdjoint(seminorm=True)`` and gives its gradient to round-off.

Costs per backward step: the stages' augmented evaluations (one evaluation
of ``f`` and one VJP with respect to ``z`` each), one more evaluation of ``f``
at the step's start for the parameter VJP (the first stage's graph is not
kept across steps: with FSAL it belongs to the previous step, which not every
sample accepted), and the parameter VJP. ``sol.backward_stats``: ``nf``
(augmented evaluations), ``nf_param`` (the extra evaluations), ``nvjp``,
``naccept``/``nreject`` (sums over the samples) and ``nf_per_sample``.

Not per sample (refused by :func:`pylux.diffeq.per_sample.solve_batched`):
``InterpolatingAdjoint``, ``QuadratureAdjoint``, ``ReversibleAdjoint``.
"""

from __future__ import annotations

import torch

from ..diffeq.per_sample import BatchSolution, PerSampleLoop, per_sample_norm, register_per_sample_adjoint
from ._params import BackwardStats, check_no_hidden_parameters, grad_leaves, refuse_higher_order
from .continuous import BacksolveAdjoint, _bound_field

__all__ = ["per_sample_backsolve"]


class _AugmentedField:
    """The backward field of ``y = [z, a]`` (stacked on axis 1) with each evaluation's graph kept.

    ``records`` collects ``(f(z), a)`` of every evaluation since it was last
    cleared; the graphs reach the parameter leaves ``params``, for the
    step's parameter VJP.
    """

    def __init__(self, term, params, where: str):
        self.term, self.params, self.where = term, params, where
        self.count = 0
        self.nvjp = 0
        self.checked = False
        self.records: list = []

    def evaluate(self, z, t):
        """``f(z, t)`` with a graph to ``z`` (a fresh leaf) and the parameters."""
        z_ = z.detach().requires_grad_(True)
        out = self.term.vf(z_, t)
        if not self.checked:
            check_no_hidden_parameters(out, [z_, *self.params], where=f"{self.where}: f")
            self.checked = True
        return z_, out

    def vf(self, y, t):
        z, a = y[:, 0], y[:, 1]
        with torch.enable_grad():
            z_, out = self.evaluate(z, t)
            grad = None
            if out.requires_grad:
                (grad,) = torch.autograd.grad(out, z_, a, retain_graph=bool(self.params), allow_unused=True)
                self.nvjp += 1
        self.count += 1
        self.records.append((out, a))
        minus = torch.zeros_like(a) if grad is None else -grad
        return torch.stack([out.detach().to(y.dtype), minus.to(y.dtype)], dim=1)


class _BackwardLoop(PerSampleLoop):
    """The per-sample loop on ``[z, a]`` that adds each accepted step's parameter increment to ``grads``."""

    def setup(self, grads, forward_norm):
        self.grads = grads
        self.nf_param = 0
        base = per_sample_norm(forward_norm)
        # z and a each at the tolerance on their own (the joint backsolve's grouping), per sample
        self.norm = lambda x: torch.maximum(base(x[:, 0]), base(x[:, 1]))
        self.b = [float(w) for w in self.tableau.b]

    def rk_step(self, u, t, dt_step):
        self.step_start = t
        self.field.records = []
        out = super().rk_step(u, t, dt_step)
        self.stage_records = list(self.field.records)
        return out

    def on_step(self, y, accept, dt_step, stages) -> None:
        field = self.field
        if not field.params:
            return
        weight = torch.where(accept, -dt_step, torch.zeros_like(dt_step))
        shape = (weight.shape[0],) + (1,) * (y.dim() - 2)
        outputs, cotangents = [], []
        with torch.enable_grad():
            # the first stage again, at the step's start: its earlier graph may belong to another step
            records = [(field.evaluate(y[:, 0], self.step_start)[1], y[:, 1])] + self.stage_records
        self.nf_param += 1
        for (out, a), b_i in zip(records, self.b):
            if b_i != 0.0 and out.requires_grad:
                outputs.append(out)
                cotangents.append((weight * b_i).to(a.dtype).reshape(shape) * a)
        if outputs:
            grads = torch.autograd.grad(outputs, field.params, cotangents, allow_unused=True)
            field.nvjp += 1
            for j, g in enumerate(grads):
                if g is not None:
                    self.grads[j] += g
        self.stage_records = []


class _PerSampleBacksolveFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, alg, problem, run, paths, holder, u0, *params):
        detached = [x.detach() for x in params]
        with torch.no_grad():
            sol = run.solve(_bound_field(problem, paths, detached), u0.detach())
        holder["solution"] = sol
        ctx.alg, ctx.problem, ctx.run, ctx.paths = alg, problem, run, paths
        ctx.backward_stats = holder["backward_stats"]
        last = sol.u[-1:] if sol.u.shape[0] else sol.u
        ctx.save_for_backward(u0.detach(), last.detach(), *detached)
        return sol.u.detach().clone()

    @staticmethod
    def backward(ctx, grad_u):
        name = type(ctx.alg).__name__
        refuse_higher_order(name)
        u0, last, *params = ctx.saved_tensors
        run, alg = ctx.run, ctx.alg
        times, t0 = run.times, run.t0
        B, T = times.shape
        grads = [torch.zeros_like(x) for x in params]
        stats = BackwardStats(nf=0, nf_param=0, nvjp=0, naccept=0, nreject=0,
                              nf_per_sample=torch.zeros(B, dtype=torch.long, device=u0.device))
        if T == 0:
            ctx.backward_stats.update(stats)
            return (None,) * 5 + (torch.zeros_like(u0), *grads)
        leaves = [x.detach().requires_grad_(True) for x in params]
        field = _AugmentedField(_bound_field(ctx.problem, ctx.paths, leaves), leaves, name)
        options = run.options.replace(reltol=alg.reltol if alg.reltol is not None else run.options.reltol,
                                      abstol=alg.abstol if alg.abstol is not None else run.options.abstol)
        grad_u = grad_u.to(u0.dtype)
        y = torch.stack([last[0], grad_u[T - 1]], dim=1)
        ends = torch.cat([t0[:, None], times], dim=1)  # segment k runs from ends[:, k + 1] to ends[:, k]
        moving = (ends[:, 1:] != ends[:, :-1]).any(0).tolist()
        no_saves = times.new_zeros((B, 0))
        for k in range(T - 1, -1, -1):
            if moving[k]:
                loop = run.loop(field, y, ends[:, k + 1], ends[:, k], no_saves, options=options,
                                loop_class=_BackwardLoop)
                loop.setup(grads, options.norm)
                loop.run()
                y, _, _, code, naccept, nreject, nfe = loop.result
                failed = (code != 0).nonzero().flatten().tolist()
                if failed:
                    b = failed[0]
                    raise RuntimeError(
                        f"{name} (batch='per-sample'): the backward solve of sample(s) {failed[:8]} failed between "
                        f"t = {float(ends[b, k + 1])!r} and {float(ends[b, k])!r} (sample {b} stopped at t = "
                        f"{float(loop.result[1][b])!r}); loosen the backward tolerances or use DirectAdjoint()")
                stats["naccept"] += int(naccept.sum())
                stats["nreject"] += int(nreject.sum())
                stats["nf_per_sample"] += nfe
                stats["nf_param"] += loop.nf_param
            if k:
                y = torch.stack([y[:, 0], y[:, 1] + grad_u[k - 1]], dim=1)
        stats["nf"], stats["nvjp"] = field.count, field.nvjp
        ctx.backward_stats.update(stats)
        return (None,) * 5 + (y[:, 1].reshape(u0.shape), *[g.to(x.dtype) for g, x in zip(grads, params)])


def per_sample_backsolve(alg: BacksolveAdjoint, problem, run) -> BatchSolution:
    """``solve(problem, ..., batch="per-sample", sensealg=alg)``: the forward per-sample solve, whose
    backward pass is the per-sample backsolve of this module (see the module docstring).

    The gradient flows to ``u0`` and to every tensor of the parameter tree that requires grad; a tensor
    that requires grad but reaches ``f`` only through a closure raises
    :class:`~pylux.sensitivity.HiddenParameterError`.
    """
    if torch.is_tensor(run.options.abstol):
        raise NotImplementedError(f"{type(alg).__name__}: a tensor abstol is not supported by the per-sample "
                                  "adjoint (the backward state has other channels than u); pass a float abstol, or "
                                  "use DirectAdjoint()")
    pairs = grad_leaves(problem.p)
    paths = [path for path, _ in pairs]
    params = [leaf for _, leaf in pairs]
    if torch.is_grad_enabled() and not params and not problem.u0.requires_grad:
        # the backward pass would never run: a tensor reaching f through a closure would get no gradient
        with torch.enable_grad():
            out = problem.term.bind(problem.p).vf(problem.u0.detach(), run.t0)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            check_no_hidden_parameters(out, [], where=f"{type(alg).__name__}: f")
    holder: dict = {"backward_stats": BackwardStats()}
    u = _PerSampleBacksolveFunction.apply(alg, problem, run, paths, holder, problem.u0, *params)
    sol = holder["solution"]
    out = BatchSolution(sol.t, u, sol.retcode, sol.stats, message=sol.message, solver=sol.solver, u0=problem.u0)
    out.final_state = sol.final_state
    out.backward_stats = holder["backward_stats"]
    return out


register_per_sample_adjoint(BacksolveAdjoint, per_sample_backsolve)
