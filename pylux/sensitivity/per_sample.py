r"""The continuous adjoints under per-sample stepping (``solve(..., batch="per-sample", sensealg=...)``).

Under ``batch="per-sample"`` the samples of a batch are independent systems
:math:`\dot z_b = f(z_b, \theta, t_b)` that share only the parameters
:math:`\theta` (:mod:`pylux.diffeq.per_sample`). Their adjoints are
independent too, so the backward pass is itself a per-sample solve, by the
same per-sample loop (own ``t``, ``dt``, accept/reject per sample), from each
sample's last saved time:

.. math::
    \dot z_b = f(z_b, \theta, t), \qquad \dot a_b = -a_b^\top \partial_z f(z_b, \theta, t),

with :math:`a_b` jumping by :math:`\partial L / \partial u_b(t_{b,k})` at each
of the sample's own saved times (Chen, Rubanova, Bettencourt & Duvenaud,
NeurIPS 2018). ``BacksolveAdjoint`` integrates :math:`[z_b, a_b]` backward;
``InterpolatingAdjoint`` (without checkpointing) integrates :math:`a_b` alone
and reads :math:`z_b(t)` from the forward solve's per-sample dense output
(every forward step's stages are kept: memory grows with the steps).

The parameter adjoint
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
ICML 2021; ``seminorm=False`` gives the same result as ``seminorm=True``
here). The step of each sample is controlled by :math:`\max(\|z_b\|, \|a_b\|)`
(backsolve) or :math:`\|a_b\|` (interpolating) at the backward tolerances,
each group by the forward norm, per sample: the grouping of the joint
adjoints' default. For the interpolating adjoint this means the accuracy of
the parameter gradient is not controlled by the step (see
:class:`~pylux.sensitivity.InterpolatingAdjoint`'s caveat on the seminorm).

A single-sample batch therefore takes exactly the backward steps of the joint
``BacksolveAdjoint(seminorm=True)`` / ``InterpolatingAdjoint(seminorm=True)``
and gives its gradient to round-off.

Costs per backward step: the stages' backward evaluations (one evaluation of
``f`` and one VJP with respect to ``z`` each), one more evaluation of ``f`` at
the step's start for the parameter VJP (the first stage's graph is not kept
across steps: with FSAL it belongs to the previous step, which not every
sample accepted), and the parameter VJP. ``sol.backward_stats``: ``nf``
(backward evaluations), ``nf_param`` (the extra evaluations, one per batched
step), ``nvjp``, ``naccept``/``nreject`` (sums over the samples) and
``nf_per_sample``.

Not per sample (refused by :func:`pylux.diffeq.per_sample.solve_batched` or
here): ``InterpolatingAdjoint(checkpointing=...)``, ``QuadratureAdjoint``,
``ReversibleAdjoint``.
"""

from __future__ import annotations

import torch

from ..diffeq.per_sample import BatchSolution, PerSampleLoop, per_sample_norm, register_per_sample_adjoint
from ._params import BackwardStats, check_no_hidden_parameters, grad_leaves, refuse_higher_order
from .continuous import BacksolveAdjoint, InterpolatingAdjoint, _bound_field

__all__ = ["per_sample_backsolve", "per_sample_interpolating"]


class _AugmentedField:
    """The backsolve field of ``y = [z, a]`` (stacked on axis 1) with each evaluation's graph kept.

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

    def split(self, y, t):
        """``(z(t), a(t))`` of a backward state."""
        return y[:, 0], y[:, 1]

    def join(self, out, minus_vjp, y):
        return torch.stack([out.detach().to(y.dtype), minus_vjp.to(y.dtype)], dim=1)

    def first_record(self, y, t):
        """``(f(z), a)`` at a step's start, with a fresh graph (see :meth:`_BackwardLoop.on_step`)."""
        z, a = self.split(y, t)
        with torch.enable_grad():
            return self.evaluate(z, t)[1], a

    def vf(self, y, t):
        z, a = self.split(y, t)
        with torch.enable_grad():
            z_, out = self.evaluate(z, t)
            grad = None
            if out.requires_grad:
                (grad,) = torch.autograd.grad(out, z_, a, retain_graph=bool(self.params), allow_unused=True)
                self.nvjp += 1
        self.count += 1
        self.records.append((out, a))
        return self.join(out, torch.zeros_like(a) if grad is None else -grad, y)


class _InterpolatedField(_AugmentedField):
    """The interpolating adjoint's field of ``y = a``, with ``z(t)`` from the forward dense output."""

    def __init__(self, term, params, where: str, dense):
        super().__init__(term, params, where)
        self.dense = dense

    def split(self, y, t):
        return self.dense(t), y

    def join(self, out, minus_vjp, y):
        return minus_vjp.to(y.dtype)


class _PerSampleDense:
    """The forward per-sample solve's dense output: ``z_b(t_b)`` for a ``(B,)`` tensor of times.

    Built from every iteration of the forward loop (``(N, B)`` step starts and
    accepted step sizes, zero for a sample that did not move; ``(N, B, ...)``
    start states; ``(N, B, s, F)`` stages): a query finds, per sample, the first
    step whose end is not before it (``searchsorted`` on each sample's
    non-decreasing ends) and evaluates that step's interpolant there.
    """

    def __init__(self, starts, sizes, states, stages, direction, constants):
        self.starts, self.sizes, self.states, self.stages = starts, sizes, states, stages
        self.direction, self.constants = direction, constants
        self.signed_ends = (direction * (starts + sizes)).transpose(0, 1).contiguous()  # (B, N)
        self.rows = torch.arange(starts.shape[1], device=starts.device)

    def __call__(self, t):
        n = self.starts.shape[0]
        j = torch.searchsorted(self.signed_ends, (self.direction * t)[:, None]).squeeze(1).clamp_(max=n - 1)
        start, size = self.starts[j, self.rows], self.sizes[j, self.rows]
        u, k = self.states[j, self.rows], self.stages[j, self.rows]  # (B, ...), (B, s, F)
        theta = ((t - start) / size).nan_to_num_(0.0).clamp_(0.0, 1.0).to(u.dtype)  # a zero step gives u
        weights = self.constants.dense_weights(theta[:, None]) * size.to(u.dtype)[:, None, None]  # (B, 1, s)
        B = u.shape[0]
        return torch.baddbmm(u.reshape(B, 1, -1), weights, k).reshape(u.shape)


class _RecordingLoop(PerSampleLoop):
    """The forward per-sample loop, keeping each step's start, accepted size, state and stages."""

    def rk_step(self, u, t, dt_step):
        self.step_start = t
        return super().rk_step(u, t, dt_step)

    def on_step(self, u, accept, dt_step, stages) -> None:
        log = self.__dict__.setdefault("log", ([], [], [], []))
        B = u.shape[0]
        log[0].append(self.step_start)
        log[1].append(torch.where(accept, dt_step, torch.zeros_like(dt_step)))
        log[2].append(u)
        log[3].append(torch.stack([k.reshape(B, -1) for k in stages], dim=1))

    def dense(self) -> _PerSampleDense:
        if "log" not in self.__dict__:  # no step at all: every query is the initial state
            self.step_start = self.t0
            self.on_step(self.u0, torch.zeros_like(self.t0, dtype=torch.bool), torch.zeros_like(self.t0),
                         [torch.zeros_like(self.u0)] * self.tableau.stages)
        starts, sizes, states, stages = (torch.stack(x) for x in self.log)
        return _PerSampleDense(starts, sizes, states, stages, self.direction, self.constants)


class _BackwardLoop(PerSampleLoop):
    """The per-sample loop on the backward state that adds each accepted step's parameter increment to
    ``grads`` (one VJP per step)."""

    def setup(self, grads, forward_norm, interpolates: bool):
        self.grads = grads
        self.nf_param = 0
        if not interpolates:
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
        outputs, cotangents = [], []
        # the first stage again, at the step's start: its earlier graph may belong to another step
        records = [field.first_record(y, self.step_start)] + self.stage_records
        self.nf_param += 1
        for (out, a), b_i in zip(records, self.b):
            if b_i != 0.0 and out.requires_grad:
                outputs.append(out)
                cotangents.append((weight * b_i).to(a.dtype).reshape((-1,) + (1,) * (a.dim() - 1)) * a)
        if outputs:
            grads = torch.autograd.grad(outputs, field.params, cotangents, allow_unused=True)
            field.nvjp += 1
            for j, g in enumerate(grads):
                if g is not None:
                    self.grads[j] += g
        self.stage_records = []


class _PerSampleAdjointFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, alg, problem, run, paths, holder, u0, *params):
        detached = [x.detach() for x in params]
        interpolates = isinstance(alg, InterpolatingAdjoint)
        with torch.no_grad():
            sol, loop = run.solve_with_loop(_bound_field(problem, paths, detached), u0.detach(),
                                            loop_class=_RecordingLoop if interpolates else None)
        holder["solution"] = sol
        ctx.alg, ctx.problem, ctx.run, ctx.paths = alg, problem, run, paths
        ctx.dense = loop.dense() if interpolates else None
        ctx.backward_stats = holder["backward_stats"]
        last = sol.u[-1:] if sol.u.shape[0] else sol.u
        ctx.save_for_backward(u0.detach(), last.detach(), *detached)
        return sol.u.detach().clone()

    @staticmethod
    def backward(ctx, grad_u):
        name = type(ctx.alg).__name__
        refuse_higher_order(name)
        u0, last, *params = ctx.saved_tensors
        run, alg, dense = ctx.run, ctx.alg, ctx.dense
        times, t0 = run.times, run.t0
        B, T = times.shape
        grads = [torch.zeros_like(x) for x in params]
        stats = BackwardStats(nf=0, nf_param=0, nvjp=0, naccept=0, nreject=0,
                              nf_per_sample=torch.zeros(B, dtype=torch.long, device=u0.device))
        if T == 0:
            ctx.backward_stats.update(stats)
            return (None,) * 5 + (torch.zeros_like(u0), *grads)
        leaves = [x.detach().requires_grad_(True) for x in params]
        term = _bound_field(ctx.problem, ctx.paths, leaves)
        field = (_AugmentedField(term, leaves, name) if dense is None
                 else _InterpolatedField(term, leaves, name, dense))
        options = run.options.replace(reltol=alg.reltol if alg.reltol is not None else run.options.reltol,
                                      abstol=alg.abstol if alg.abstol is not None else run.options.abstol)
        grad_u = grad_u.to(u0.dtype)
        y = torch.stack([last[0], grad_u[T - 1]], dim=1) if dense is None else grad_u[T - 1]
        ends = torch.cat([t0[:, None], times], dim=1)  # segment k runs from ends[:, k + 1] to ends[:, k]
        moving = (ends[:, 1:] != ends[:, :-1]).any(0).tolist()
        no_saves = times.new_zeros((B, 0))
        for k in range(T - 1, -1, -1):
            if moving[k]:
                loop = run.loop(field, y, ends[:, k + 1], ends[:, k], no_saves, options=options,
                                loop_class=_BackwardLoop)
                loop.setup(grads, options.norm, interpolates=dense is not None)
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
                y = torch.stack([y[:, 0], y[:, 1] + grad_u[k - 1]], dim=1) if dense is None else y + grad_u[k - 1]
        stats["nf"], stats["nvjp"] = field.count, field.nvjp
        ctx.backward_stats.update(stats)
        grad_u0 = y[:, 1] if dense is None else y
        return (None,) * 5 + (grad_u0.reshape(u0.shape), *[g.to(x.dtype) for g, x in zip(grads, params)])


def per_sample_backsolve(alg: BacksolveAdjoint, problem, run) -> BatchSolution:
    """``solve(problem, ..., batch="per-sample", sensealg=alg)``: the forward per-sample solve, whose
    backward pass is the per-sample adjoint of this module (see the module docstring): backsolve, or
    interpolating when ``alg`` is an :class:`InterpolatingAdjoint`.

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
    u = _PerSampleAdjointFunction.apply(alg, problem, run, paths, holder, problem.u0, *params)
    sol = holder["solution"]
    out = BatchSolution(sol.t, u, sol.retcode, sol.stats, message=sol.message, solver=sol.solver, u0=problem.u0)
    out.final_state = sol.final_state
    out.backward_stats = holder["backward_stats"]
    return out


def per_sample_interpolating(alg: InterpolatingAdjoint, problem, run) -> BatchSolution:
    """``solve(problem, ..., batch="per-sample", sensealg=alg)`` for an :class:`InterpolatingAdjoint`
    without checkpointing: ``z(t)`` from the forward per-sample dense output (see the module docstring)."""
    if alg.checkpointing is not False:
        raise NotImplementedError(f"{alg!r}: checkpointing is not supported with batch='per-sample' (each sample "
                                  "has its own steps); use InterpolatingAdjoint() (the whole dense output is kept) "
                                  "or BacksolveAdjoint()")
    return per_sample_backsolve(alg, problem, run)


register_per_sample_adjoint(BacksolveAdjoint, per_sample_backsolve)
register_per_sample_adjoint(InterpolatingAdjoint, per_sample_interpolating)
