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
``InterpolatingAdjoint`` integrates :math:`a_b` alone
and reads :math:`z_b(t)` from the forward solve's per-sample dense output
(without checkpointing every forward step's stages are kept, so memory grows
with the steps; with checkpointing one interval's, see below).

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

``QuadratureAdjoint`` integrates :math:`a_b` alone as well (the same
backward solve as the interpolating adjoint, :math:`z_b(t)` from the forward
dense output), and forms the parameter integral by Gauss–Legendre
quadrature over each sample's own backward steps, as the joint
:class:`~pylux.sensitivity.QuadratureAdjoint` does over its steps
(SciMLSensitivity's ``QuadratureAdjoint``): an accepted step of sample
:math:`b` from :math:`s_b` by :math:`h_b` adds

.. math::
    -h_b \sum_j w_j\, a_b(\tau_{b,j})^\top \partial_\theta f(z_b(\tau_{b,j}), \theta, \tau_{b,j}),
    \qquad \tau_{b,j} = s_b + c_j h_b,

with the nodes :math:`c_j` and weights :math:`w_j` of Gauss–Legendre on
:math:`[0, 1]` (``alg.nodes``, by default :math:`\lceil (p + 1)/2 \rceil`
for a method of order :math:`p`, exact for polynomials of degree
:math:`p`), :math:`a_b(\tau_{b,j})` from that backward step's own dense
interpolant and :math:`z_b(\tau_{b,j})` from the forward dense output: per
batched step, one evaluation of ``f`` per node (every sample at its own
node times) and **one** VJP with respect to :math:`\theta`, the cotangent
zero for a sample that did not accept the step. The stage evaluations build
no graph to the parameters (their VJPs are with respect to ``z`` only). The
nodes are evaluated on every batched step, also one that no sample accepted:
skipping it would cost a host synchronisation per step.

``InterpolatingAdjoint(checkpointing=...)`` stores no dense output: the
forward solve saves each sample at its saved times merged with its
checkpoints, keeps those states and, per checkpoint interval, the size of
the accepted step that started at or last before the interval's start. The
checkpoints of sample :math:`b`: ``True``, its own saved times (without a
``saveat`` these are ``t0`` and ``t1``: one interval, unlike the joint
adjoint, whose every step is then a saved time); an int
``n``, the :math:`n - 1` points :math:`t_{0,b} + (t_{1,b} - t_{0,b})\,i/n`
of its own span; a sequence (or 1-D tensor) of times, the same times for
every sample, each of which must lie in every sample's span (``ValueError``
otherwise: use ``n`` or ``True`` for per-sample spans). A checkpoint past a
sample's last saved time carries a zero adjoint and is moved onto that
time. The backward pass re-solves each interval per sample from its
checkpoint (the forward options, starting with the forward solve's step
there, as the joint checkpointed adjoint does), keeping that interval's
dense output only until the interval's backward solve is done: memory is
the checkpoint states plus one interval's dense output (the batch's most
steps in that interval), at the cost of a second forward solve.

A sample whose forward solve stopped early (``throw=False``: maxiters, a
step below ``dtmin``) is differentiated up to where it got, as under
``DirectAdjoint``: its values at the times it did not reach are NaN
constants without gradient, and its backward solve starts at its stopping
time from its final state there (so a backsolve or a re-solve never starts
from NaN).

A single-sample batch therefore takes exactly the backward steps of the
joint ``BacksolveAdjoint(seminorm=True)`` / ``InterpolatingAdjoint(seminorm=True)``
(checkpointed alike, with the same re-solve evaluations, when no checkpoint
lies past the last saved time) / ``QuadratureAdjoint`` and gives its
gradient to round-off.

Costs per backward step: the stages' backward evaluations (one evaluation of
``f`` and one VJP with respect to ``z`` each), then for backsolve and
interpolating one more evaluation of ``f`` at the step's start for the
parameter VJP (the first stage's graph is not kept across steps: with FSAL
it belongs to the previous step, which not every sample accepted) and the
parameter VJP; for the quadrature one evaluation per node and the parameter
VJP. ``sol.backward_stats``: ``nf`` (backward evaluations of the stages),
``nvjp``, ``naccept``/``nreject`` (sums over the samples),
``nf_per_sample``, and ``nf_param`` (the extra evaluations, one per batched
step; backsolve and interpolating), ``nquadrature`` (batched node
evaluations; quadrature), ``nf_forward_resolve`` (batched evaluations of the
re-solves; checkpointed).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..diffeq.integrate import CountingField
from ..diffeq.per_sample import (BatchSolution, PerSampleLoop, _per_sample_solution, per_sample_norm,
                                 register_per_sample_adjoint)
from ._params import (BackwardStats, _refuse_closure_only_gradients, check_no_hidden_parameters, grad_leaves,
                      refuse_higher_order)
from .continuous import BacksolveAdjoint, InterpolatingAdjoint, QuadratureAdjoint, _bound_field

__all__ = ["per_sample_backsolve", "per_sample_interpolating", "per_sample_quadrature"]


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


class _StepStartLoop(PerSampleLoop):
    """The per-sample loop, remembering where the step being taken started (``self.step_start``)."""

    def rk_step(self, u, t, dt_step):
        self.step_start = t
        return super().rk_step(u, t, dt_step)


class _RecordingLoop(_StepStartLoop):
    """The forward per-sample loop, keeping each step's start, accepted size, state and stages."""

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


class _CheckpointingLoop(_StepStartLoop):
    """The forward loop of the checkpointed adjoint: it keeps no dense output, only, per sample and
    checkpoint interval, the size of the accepted step that started at or last before the interval's start
    (``first_dt``, ``(B, M)``), with which the backward pass starts that interval's re-solve."""

    def on_step(self, u, accept, dt_step, stages) -> None:
        d = self.direction[:, None]
        hit = accept[:, None] & (d * self.step_start[:, None] <= d * self.interval_starts)
        self.first_dt = torch.where(hit, dt_step.abs()[:, None], self.first_dt)


class _ResolveLoop(_RecordingLoop):
    """One checkpoint interval's forward re-solve, started with the step the forward solve took there
    (as the joint checkpointed adjoint does), recording that interval's dense output."""

    def initial_dt(self, f0):
        recorded = torch.minimum(self.first_dt, self.dtmax)
        # a sample with no accepted step up to the interval's start only occurs after a failed forward solve
        missing = (recorded == 0) & (self.t1 != self.t0)
        if bool(missing.any()):
            return torch.where(missing, super().initial_dt(f0), recorded)
        return recorded


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


class _QuadratureLoop(_StepStartLoop):
    """The per-sample loop on ``a`` alone that adds each accepted step's Gauss–Legendre quadrature of
    ``-a^T d_theta f`` to ``grads`` (one VJP per step, every node and sample at once)."""

    def setup(self, grads, term, leaves, nodes: int):
        self.grads, self.term, self.leaves = grads, term, leaves
        x, w = np.polynomial.legendre.leggauss(nodes)
        abscissae = (x + 1.0) / 2.0
        self.node_c = torch.tensor(abscissae, dtype=self.t0.dtype, device=self.t0.device)[:, None]  # (n, 1)
        self.node_w = [float(v) / 2.0 for v in w]
        # a(s + c h) = a(s) + h sum_i b_i(c) k_i: the step's own dense output at the nodes, (n, s)
        self.node_weights = self.constants.dense_weights(
            torch.tensor(abscissae, dtype=self.u0.dtype, device=self.u0.device))
        self.nquadrature = 0
        self.checked = False

    def rk_step(self, u, t, dt_step):
        self.field.records = []  # the stages' (f, a) are not needed: the nodes are evaluated afresh
        return super().rk_step(u, t, dt_step)

    def on_step(self, y, accept, dt_step, stages) -> None:
        if not self.leaves:
            return
        B = y.shape[0]
        flat = torch.stack([k.reshape(B, -1) for k in stages], dim=1)  # (B, s, F)
        a_nodes = torch.addcmul(y.reshape(B, 1, -1), dt_step.to(y.dtype)[:, None, None],
                                torch.matmul(self.node_weights, flat))  # (B, n, F)
        node_times = torch.addcmul(self.step_start, self.node_c, dt_step)  # (n, B)
        keep = accept.view(self.state_shape)
        outputs, cotangents = [], []
        with torch.enable_grad():
            for j, w_j in enumerate(self.node_w):
                out = self.term.vf(self.field.dense(node_times[j]), node_times[j])
                if not self.checked:
                    check_no_hidden_parameters(out, self.leaves, where=f"{self.field.where}: f")
                    self.checked = True
                if out.requires_grad:
                    a = a_nodes[:, j].reshape(y.shape)
                    weight = (-w_j * dt_step).to(y.dtype).view(self.state_shape)
                    # where, not a product: a rejected trial's stages may be NaN/Inf
                    cotangents.append(torch.where(keep, weight * a, torch.zeros_like(a)).to(out.dtype))
                    outputs.append(out)
        self.nquadrature += len(self.node_w)
        if outputs:
            grads = torch.autograd.grad(outputs, self.leaves, cotangents, allow_unused=True)
            self.field.nvjp += 1
            for j, g in enumerate(grads):
                if g is not None:
                    self.grads[j] += g


class _PerSampleAdjointFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, alg, problem, run, paths, holder, u0, *params):
        detached = [x.detach() for x in params]
        checkpoints = holder["checkpoints"]
        records = isinstance(alg, (InterpolatingAdjoint, QuadratureAdjoint)) and checkpoints is None \
            and run.times.shape[1] > 0
        term = _bound_field(problem, paths, detached)
        ctx.dense = ctx.grid = ctx.positions = ctx.first_dt = None
        with torch.no_grad():
            if checkpoints is None:
                sol, loop = run.solve_with_loop(term, u0.detach(), loop_class=_RecordingLoop if records else None)
                ctx.dense = loop.dense() if records else None
                states = sol.u[-1:] if sol.u.shape[0] else sol.u
            else:
                sol, states, ctx.grid, ctx.positions, ctx.first_dt = _checkpointed_forward(run, term, u0.detach(),
                                                                                           checkpoints)
        ctx.t_stop = sol.stats.t_per_sample
        if states.shape[0]:
            # a sample stopped early (throw=False) is differentiated up to where it got, as under DirectAdjoint
            # (its later values are NaN constants): the backward pass starts from its final state there
            grid = ctx.grid if ctx.grid is not None else run.times[:, -1:]
            unreached = _past(grid, ctx.t_stop, run).transpose(0, 1).reshape(
                grid.shape[::-1] + (1,) * (states.dim() - 2))
            states = torch.where(unreached, sol.final_state[0].unsqueeze(0), states)
        holder["solution"] = sol
        ctx.alg, ctx.problem, ctx.run, ctx.paths = alg, problem, run, paths
        ctx.backward_stats = holder["backward_stats"]
        ctx.save_for_backward(u0.detach(), states.detach(), *detached)
        return sol.u.detach().clone()

    @staticmethod
    def backward(ctx, grad_u):
        refuse_higher_order(type(ctx.alg).__name__)
        u0, states, *params = ctx.saved_tensors
        grad_u0, grads = _Backward(ctx, u0, states, params).gradients(grad_u.to(u0.dtype))
        return (None,) * 5 + (grad_u0, *grads)


def _past(times, t_stop, run):
    """``(B, M)``: which of each sample's ``times`` lie beyond where its forward solve stopped."""
    direction = torch.where(run.t1 >= run.t0, 1.0, -1.0).to(times.dtype)[:, None]
    return direction * times > direction * t_stop[:, None]


def _checkpointed_forward(run, term, u0, checkpoints):
    """The forward per-sample solve saving at each sample's saved times and checkpoints merged.

    Returns ``(solution at the saved times, (M, B, ...) states at the merged times, (B, M) merged times,
    (B, T) column of each saved time among them, (B, M) first step of each interval)``.
    """
    times, t0, t1 = run.times, run.t0, run.t1
    B, T = times.shape
    direction = torch.where(t1 >= t0, 1.0, -1.0).to(times.dtype)[:, None]
    # checkpoints past a sample's last saved time would only carry a zero adjoint: moved onto that time
    last = times[:, -1:]
    checkpoints = torch.where(direction * checkpoints > direction * last, last, checkpoints)
    merged = torch.cat([times, checkpoints], dim=1)
    M = merged.shape[1]
    order = torch.sort(direction * merged, dim=1, stable=True).indices
    grid = merged.gather(1, order)
    positions = torch.empty_like(order).scatter_(1, order, torch.arange(M, device=order.device).expand(B, M))
    field = CountingField(term, u0)
    loop = run.loop(field, u0, t0, t1, grid, loop_class=_CheckpointingLoop)
    loop.interval_starts = torch.cat([t0[:, None], grid[:, :-1]], dim=1)
    loop.first_dt = torch.zeros_like(loop.interval_starts)
    states = loop.run()
    saved = states[positions[:, :T].transpose(0, 1), torch.arange(B, device=u0.device)[None, :]]
    sol = _per_sample_solution(loop, field, run.solver, times, saved, run.options, run.throw)
    return sol, states, grid, positions[:, :T], loop.first_dt


class _Backward:
    """One backward pass of a per-sample adjoint: the backward per-sample solve of each segment between
    consecutive saved (or checkpoint) times, the jumps at the saved times, and the counters."""

    def __init__(self, ctx, u0, states, params):
        self.alg, self.problem, self.run, self.paths = ctx.alg, ctx.problem, ctx.run, ctx.paths
        self.u0, self.states, self.params = u0, states, params
        self.dense, self.grid, self.positions, self.first_dt = ctx.dense, ctx.grid, ctx.positions, ctx.first_dt
        self.t_stop = ctx.t_stop
        self.record = ctx.backward_stats
        self.name = type(self.alg).__name__
        self.backsolve = not isinstance(self.alg, (InterpolatingAdjoint, QuadratureAdjoint))
        self.quadrature = isinstance(self.alg, QuadratureAdjoint)
        self.checkpointed = self.grid is not None

    def fail(self, what: str, loop, failed, t_from, t_to):
        b = failed[0]
        raise RuntimeError(
            f"{self.name} (batch='per-sample'): the {what} of sample(s) {failed[:8]} failed between "
            f"t = {float(t_from[b])!r} and {float(t_to[b])!r} (sample {b} stopped at t = "
            f"{float(loop.result[1][b])!r}); loosen the backward tolerances or use DirectAdjoint()")

    def resolve(self, k, ends, stats):
        """The forward dense output over interval ``k`` (``ends[:, k]`` to ``ends[:, k + 1]``), re-solved
        per sample from its checkpoint with the forward options and the forward solve's first step."""
        run = self.run
        start = self.u0 if k == 0 else self.states[k - 1]
        field = CountingField(_bound_field(self.problem, self.paths, self.params), start)
        options = run.options.replace(dt=None) if run.options.adaptive else run.options
        loop = run.loop(field, start, ends[:, k], ends[:, k + 1], ends.new_zeros((start.shape[0], 0)),
                        options=options, loop_class=_ResolveLoop)
        loop.first_dt = self.first_dt[:, k]
        with torch.no_grad():
            loop.run()
        failed = (loop.result[3] != 0).nonzero().flatten().tolist()
        if failed:
            self.fail("forward re-solve from a checkpoint", loop, failed, ends[:, k], ends[:, k + 1])
        stats["nf_forward_resolve"] += field.count
        return loop.dense()

    def gradients(self, grad_u):
        run, alg, u0, params = self.run, self.alg, self.u0, self.params
        B, T = run.times.shape
        grads = [torch.zeros_like(x) for x in params]
        stats = BackwardStats(nf=0, nvjp=0, naccept=0, nreject=0,
                              nf_per_sample=torch.zeros(B, dtype=torch.long, device=u0.device))
        stats.update({"nquadrature": 0} if self.quadrature else {"nf_param": 0})
        if self.checkpointed:
            stats["nf_forward_resolve"] = 0
        if T == 0:
            self.record.update(stats)
            return torch.zeros_like(u0), grads
        leaves = [x.detach().requires_grad_(True) for x in params]
        term = _bound_field(self.problem, self.paths, leaves)
        if self.backsolve:
            field = _AugmentedField(term, leaves, self.name)
        elif self.quadrature:  # the stages need no graph to the parameters: the nodes have their own
            field = _InterpolatedField(_bound_field(self.problem, self.paths, params), [], self.name, self.dense)
        else:
            field = _InterpolatedField(term, leaves, self.name, self.dense)
        options = run.options.replace(reltol=alg.reltol if alg.reltol is not None else run.options.reltol,
                                      abstol=alg.abstol if alg.abstol is not None else run.options.abstol)
        if self.checkpointed:  # dL/du at the merged times (checkpoint columns get none)
            grid = self.grid
            jumps = grad_u.new_zeros((grid.shape[1],) + tuple(grad_u.shape[1:]))
            jumps[self.positions.transpose(0, 1), torch.arange(B, device=u0.device)[None, :]] = grad_u
        else:
            grid, jumps = run.times, grad_u
        grid = torch.where(_past(grid, self.t_stop, run), self.t_stop[:, None], grid)
        M = grid.shape[1]
        y = torch.stack([self.states[0], jumps[M - 1]], dim=1) if self.backsolve else jumps[M - 1]
        ends = torch.cat([run.t0[:, None], grid], dim=1)  # segment k runs from ends[:, k + 1] to ends[:, k]
        moving = (ends[:, 1:] != ends[:, :-1]).any(0).tolist()
        no_saves = grid.new_zeros((B, 0))
        nodes = (alg.nodes or max(1, math.ceil((run.solver.order + 1) / 2))) if self.quadrature else 0
        for k in range(M - 1, -1, -1):
            if moving[k]:
                if self.checkpointed:
                    field.dense = self.resolve(k, ends, stats)
                loop = run.loop(field, y, ends[:, k + 1], ends[:, k], no_saves, options=options,
                                loop_class=_QuadratureLoop if self.quadrature else _BackwardLoop)
                if self.quadrature:
                    loop.setup(grads, term, leaves, nodes)
                else:
                    loop.setup(grads, options.norm, interpolates=not self.backsolve)
                loop.run()
                y, _, _, code, naccept, nreject, nfe = loop.result
                failed = (code != 0).nonzero().flatten().tolist()
                if failed:
                    self.fail("backward solve", loop, failed, ends[:, k + 1], ends[:, k])
                stats["naccept"] += int(naccept.sum())
                stats["nreject"] += int(nreject.sum())
                stats["nf_per_sample"] += nfe
                if self.quadrature:
                    stats["nquadrature"] += loop.nquadrature
                else:
                    stats["nf_param"] += loop.nf_param
                if self.checkpointed:
                    field.dense = None  # the interval's dense output is freed before the next one is made
            if k:
                y = torch.stack([y[:, 0], y[:, 1] + jumps[k - 1]], dim=1) if self.backsolve else y + jumps[k - 1]
        stats["nf"], stats["nvjp"] = field.count, field.nvjp
        self.record.update(stats)
        grad_u0 = y[:, 1] if self.backsolve else y
        return grad_u0.reshape(u0.shape), [g.to(x.dtype) for g, x in zip(grads, params)]


def _checkpoint_times(alg: InterpolatingAdjoint, run):
    """Each sample's checkpoints, ``(B, C)`` in the time dtype, or None without checkpointing.

    ``True``: none beyond the saved times; ``n``: the ``n - 1`` interior points ``t0 + (t1 - t0) i / n``
    of each sample's own span; a sequence: the same times for every sample, each inside every span.
    """
    spec, t0, t1 = alg.checkpointing, run.t0, run.t1
    B = t0.shape[0]
    if spec is False or run.times.shape[1] == 0:  # nothing saved: the backward pass never runs
        return None
    if spec is True:
        return t0.new_zeros((B, 0))
    if isinstance(spec, int):
        steps = torch.arange(1, spec, dtype=t0.dtype, device=t0.device)
        return t0[:, None] + (t1 - t0)[:, None] * steps / spec
    times = torch.tensor(spec, dtype=t0.dtype, device=t0.device).reshape(1, -1).expand(B, -1)
    outside = (times < torch.minimum(t0, t1)[:, None]) | (times > torch.maximum(t0, t1)[:, None])
    if bool(outside.any()):
        b, j = outside.nonzero()[0].tolist()
        raise ValueError(
            f"{alg!r}: the checkpoint {spec[j]!r} lies outside sample {b}'s tspan ({float(t0[b])!r}, "
            f"{float(t1[b])!r}); with batch='per-sample' a sequence of checkpoints is shared by every sample and "
            "must lie inside every sample's span. Use checkpointing=n (n intervals of each sample's own span) or "
            "checkpointing=True (each sample's saved times)")
    return times


def _solve(alg, problem, run, checkpoints=None) -> BatchSolution:
    if torch.is_tensor(run.options.abstol):
        raise NotImplementedError(f"{type(alg).__name__}: a tensor abstol is not supported by the per-sample "
                                  "adjoint (the backward state has other channels than u); pass a float abstol, or "
                                  "use DirectAdjoint()")
    pairs = grad_leaves(problem.p)
    paths = [path for path, _ in pairs]
    params = [leaf for _, leaf in pairs]
    if torch.is_grad_enabled() and not params and not problem.u0.requires_grad:
        _refuse_closure_only_gradients(problem, type(alg).__name__, t0=run.t0)
    holder: dict = {"backward_stats": BackwardStats(), "checkpoints": checkpoints}
    u = _PerSampleAdjointFunction.apply(alg, problem, run, paths, holder, problem.u0, *params)
    sol = holder["solution"]
    out = BatchSolution(sol.t, u, sol.retcode, sol.stats, message=sol.message, solver=sol.solver, u0=problem.u0)
    out.final_state = sol.final_state
    out.backward_stats = holder["backward_stats"]
    return out


def per_sample_backsolve(alg: BacksolveAdjoint, problem, run) -> BatchSolution:
    """``solve(problem, ..., batch="per-sample", sensealg=alg)``: the forward per-sample solve, whose
    backward pass is the per-sample adjoint of this module (see the module docstring): backsolve, or
    interpolating (without checkpointing) when ``alg`` is an :class:`InterpolatingAdjoint`.

    The gradient flows to ``u0`` and to every tensor of the parameter tree that requires grad; a tensor
    that requires grad but reaches ``f`` only through a closure raises
    :class:`~pylux.sensitivity.HiddenParameterError`.
    """
    return _solve(alg, problem, run)


def per_sample_interpolating(alg: InterpolatingAdjoint, problem, run) -> BatchSolution:
    """``solve(problem, ..., batch="per-sample", sensealg=alg)`` for an :class:`InterpolatingAdjoint`:
    ``z(t)`` from the forward per-sample dense output, or, with ``checkpointing``, re-solved per sample
    one checkpoint interval at a time (see the module docstring).

    Raises:
        ValueError: a sequence of checkpoints with a time outside some sample's span.
    """
    return _solve(alg, problem, run, _checkpoint_times(alg, run))


def per_sample_quadrature(alg: QuadratureAdjoint, problem, run) -> BatchSolution:
    """``solve(problem, ..., batch="per-sample", sensealg=alg)`` for a :class:`QuadratureAdjoint`: ``a``
    alone solved backward per sample, ``dL/dtheta`` by Gauss–Legendre quadrature over each sample's
    accepted backward steps (see the module docstring)."""
    return _solve(alg, problem, run)


register_per_sample_adjoint(BacksolveAdjoint, per_sample_backsolve)
register_per_sample_adjoint(InterpolatingAdjoint, per_sample_interpolating)
register_per_sample_adjoint(QuadratureAdjoint, per_sample_quadrature)
