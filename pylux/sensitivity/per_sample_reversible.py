r"""``ReversibleAdjoint`` under per-sample stepping (``solve(..., batch="per-sample", sensealg=ReversibleAdjoint())``).

Every sample :math:`b` of the batch carries its own reversible pair
:math:`(Y_{b,n}, Z_{b,n})`, :math:`Y_{b,0} = Z_{b,0} = u_{b,0}`, on its own time
grid :math:`t_{b,0} < t_{b,1} < \dots` (McCallum & Foster, "Efficient, accurate
and stable gradients for neural ODEs", 2024; see
:mod:`pylux.sensitivity.reversible`):

.. math::
    Y_{b,n+1} = \lambda Y_{b,n} + (1 - \lambda) Z_{b,n} + \Psi_{h_{b,n}}(t_{b,n}, Z_{b,n}), \qquad
    Z_{b,n+1} = Z_{b,n} - \Psi_{-h_{b,n}}(t_{b,n+1}, Y_{b,n+1}),

with :math:`\Psi_h(t, z) = \mathrm{step}_h(t, z) - z` the increment of the base
explicit Runge–Kutta method. The samples share only the parameters
:math:`\theta`.

**Forward.** One batched loop with per-sample ``t``, ``dt``, accept/reject,
controller memory and status (the per-sample loop of
:mod:`pylux.diffeq.per_sample`, after torchode: Lienen & Günnemann 2022).
Sample :math:`b`'s trial step is accepted by the base method's embedded error
estimate of its forward increment :math:`\Psi_{h}(t_{b,n}, Z_{b,n})`, scaled
by :math:`|Z_{b,n}|` and :math:`|\mathrm{step}_h(Z_{b,n})|` (the joint
:class:`~pylux.diffeq.Reversible`'s rule), and every sample steps exactly onto
each of its own saved times (its next unreached ``saveat[b, k]`` is a stop
time: the 1 % stretch onto it and the "a step shortened onto a stop does not
shrink the next proposal" rule are the joint loop's). The saved values are
states :math:`Y_{b,n}` of the discrete solve, with no interpolation. A sample
that accepted a step completes its :math:`Z` with the backward increment at the
start of the next iteration; so each sample takes exactly the steps (and the
evaluations, ``sol.stats.nf_per_sample``) of the joint reversible solve of that
sample alone. Only the accepted steps' :math:`(t_{b,n}, t_{b,n+1})` are kept
(``(max_b N_b, B)`` time tensors), not the states.

**Backward.** The exact gradient of that discrete solve. From each sample's
end :math:`(Y_{b,N_b}, Z_{b,N_b-1})` the sweep walks back one step of every
sample per iteration (aligned at the ends: iteration :math:`j` takes step
:math:`N_b - 1 - j` of sample :math:`b`), rebuilding the states algebraically,

.. math::
    Z_{b,n} = Z_{b,n+1} + \Psi_{-h}(t_{b,n+1}, Y_{b,n+1}), \qquad
    Y_{b,n} = \lambda^{-1} \bigl(Y_{b,n+1} - (1 - \lambda) Z_{b,n} - \Psi_h(t_{b,n}, Z_{b,n})\bigr),

and pulling the adjoints :math:`(a_{Y}, a_{Z})` through the two base steps by
vector–Jacobian products batched over the samples that still have steps left
(the others take a zero step with a zero cotangent, masked out of every
update). The cotangent :math:`\partial L / \partial u_b(t_{b,k})` enters
:math:`a_Y` of the step that ended on :math:`t_{b,k}`. The parameter gradient
:math:`\sum_b \partial L / \partial \theta` is summed over the batch by autograd
inside each product. Per sample this is the joint sweep's arithmetic, so a
one-sample batch gives the joint ``ReversibleAdjoint``'s gradient to round-off.

Costs: forward, per iteration, one batched base step (``s`` evaluations of a
``s``-stage method) and, after an iteration in which some sample accepted, one
batched backward increment (``s - 1`` for FSAL methods); backward,
``2 max_b N_b - 1`` batched products (the last step of every sample needs no
backward increment: :math:`Z_{b,N_b}` is not an output) and as many batched
increments. Memory: the pair and the ``(B, T)`` cotangent bookkeeping, constant
in the number of steps, plus two time scalars per accepted step.

After ``backward()``, ``sol.backward_stats`` holds ``nf`` (batched evaluations
of ``f``), ``nvjp`` (batched products, ``2 max_b N_b - 1``), ``nsteps`` (the
sum of the samples' accepted steps), ``nsteps_per_sample``, ``nvjp_per_sample``
(``2 N_b - 1``: the products sample ``b`` took part in), ``nf_per_sample`` and
``reconstruction_error``: the largest absolute difference between a rebuilt
:math:`(Y_{b,0}, Z_{b,0})` and :math:`u_{b,0}`.

``ReversibleAdjoint(backprop=True)`` backpropagates through every operation of
the same per-sample solve instead (memory grows with the steps): the reference
the reconstruction is checked against. A saved time that a failed sample
(``throw=False``) never reached is NaN and gets no gradient.

Refused, each by name (by :func:`pylux.diffeq.per_sample.solve_batched` or
here): termination and event callbacks, ``tstops``, ``save_stats``, ``dense``,
SDEs, and an adaptive solve around a base without an error estimate.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..diffeq import Reversible
from ..diffeq.interpolation import linear_combination
from ..diffeq.per_sample import (_MAXITERS, _RUNNING, _SUCCESS, _UNSTABLE, BatchSolution, PerSampleLoop, PerSampleRun,
                                 register_per_sample_adjoint)
from ..diffeq.reversible import PAIR_SEPARATION_LIMIT
from ..diffeq.solvers import ExplicitRungeKutta
from ._params import (BackwardStats, _refuse_closure_only_gradients, check_no_hidden_parameters, grad_leaves,
                      refuse_higher_order)
from .continuous import _bound_field
from .reversible import ReversibleAdjoint

__all__ = ["per_sample_reversible"]


def _advance(tableau, nodes, vf, u, t, dt):
    """``(step_dt(u), evaluations)`` of every sample from its own ``t`` by its own ``dt`` (``(B,)`` tensors).

    An FSAL method's last stage ``f(step(u))`` is left out (it serves only the error estimate and the next
    step); the arithmetic is :meth:`PerSampleLoop.rk_step`'s, so the backward sweep rebuilds exactly the
    forward pass's increments.
    """
    h = dt.to(u.dtype).view((u.shape[0],) + (1,) * (u.dim() - 1))
    times = torch.addcmul(t, nodes, dt)  # (s, B)
    count = tableau.stages - 1 if tableau.fsal else tableau.stages
    stages = [vf(u, t)]
    y = u
    for i in range(1, tableau.stages):
        y = torch.addcmul(u, h, linear_combination(None, stages, tableau.a[i]))
        if i == count:
            break
        stages.append(vf(y, times[i]))
    if tableau.fsal:
        return y, count
    return torch.addcmul(u, h, linear_combination(None, stages, tableau.b)), count


class _ReversibleLoop(PerSampleLoop):
    """The per-sample loop on the reversible pair (see the module docstring).

    Reuses :class:`PerSampleLoop`'s tableau step (on ``Z``), per-sample error norm, controller formula,
    initial step, failure marking and assembly of the saved values; the iteration itself differs (the
    pair, stop times at every saved time, no interpolation). ``records`` holds each iteration's
    ``(t, t_new, accept)``; ``column_step`` (``(B, T)``) the accepted step that produced each saved value
    (-1: the initial state).
    """

    def __init__(self, *args, coupling: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.coupling = coupling

    def back_increment(self, y, t, dt):
        return _advance(self.tableau, self.constants.c, self.field.vf, y, t, -dt)

    def run(self):
        B, d = self.batch, self.direction
        t, t_end = self.t0.clone(), self.t1
        tab, options, device, lam = self.tableau, self.options, self.u0.device, self.coupling
        y = z = self.u0
        T = self.times.shape[1]
        signed_end = d * t_end
        running = t != t_end
        code = torch.full((B,), _RUNNING, dtype=torch.long, device=device)
        naccept = torch.zeros(B, dtype=torch.long, device=device)
        trials, streak = torch.zeros_like(naccept), torch.zeros_like(naccept)
        nfe = torch.zeros_like(naccept)
        if self.adaptive and options.dt is None:
            f0 = self.field.vf(y, t)
            dt = self.initial_dt(f0)
            nfe.add_(running, alpha=2)
            bad_start = running & ~torch.isfinite(f0.reshape(B, -1)).all(1)
            code.masked_fill_(bad_start, _UNSTABLE)
            running &= ~bad_start
        else:
            dt = torch.minimum(torch.full_like(t, options.dt), self.dtmax)
            if self.adaptive:
                dt = torch.maximum(dt, self.floor(t))
        dt = d * dt
        grid_dt = dt.clone()
        qold = torch.full_like(t, getattr(self.controller, "qoldinit", 1e-4)).to(y.dtype)
        dt_report = dt.clone()
        dt.masked_fill_(~running, 0.0)
        signed_times = d[:, None] * self.times
        pointer = (signed_times <= (d * t)[:, None]).sum(1)
        # the accepted step behind each saved value; a value never written (a failed sample) keeps a step
        # index no sample has, so the rows stay sorted for the backward pass's search
        trash = B * T
        column_step = torch.full((trash + 1,), torch.iinfo(torch.long).max, dtype=torch.long, device=device)
        column_step[:trash].view(B, T).masked_fill_(torch.arange(T, device=device)[None, :] < pointer[:, None], -1)
        blocks: list = []
        self.records: list = []
        # the fixed-step grid restarts at every stop time, as the joint ConstantStepSize's
        segment_stop = torch.full_like(t, float("nan"))
        segment_start, segment_count, segment_steps = t.clone(), torch.zeros_like(naccept), torch.ones_like(naccept)
        pending = torch.zeros_like(running)  # accepted last iteration: Z waits for its backward increment
        last_dt = torch.zeros_like(t)
        n_running, any_pending, iteration = int(running.sum()), False, 0
        # per sample [max_n |Y_n - Z_n|, max_n |Y_n|] at the steps' starts (the joint pair's record, see
        # pylux.diffeq.reversible's Stability): a diverging pair ends its sample as Unstable
        gap_sep = torch.zeros(B, dtype=y.dtype, device=device)
        gap_size = torch.zeros_like(gap_sep)
        while n_running:
            if any_pending:
                need = pending & running
                back, count = self.back_increment(y, t, torch.where(need, last_dt, torch.zeros_like(last_dt)))
                z = torch.where(need.view(self.state_shape), z + y - back, z)
                nfe.add_(need, alpha=count)
            if y[0].numel():
                gap_sep = torch.where(running, torch.maximum(gap_sep, (y - z).detach().abs().reshape(B, -1).amax(1)),
                                      gap_sep)
                gap_size = torch.where(running, torch.maximum(gap_size, y.detach().abs().reshape(B, -1).amax(1)),
                                       gap_size)
            stop = self.times.gather(1, pointer.clamp(max=T - 1)[:, None]).squeeze(1) if T else t_end
            stop = torch.where(pointer < T, stop, t_end)
            if self.adaptive:
                t_try = t + dt
                reach = d * (t + 1.01 * dt) >= d * stop
            else:
                fresh = stop != segment_stop
                ratio = ((stop - t).abs() / grid_dt.abs()).double()
                nearest = ratio.round()
                steps = torch.where((ratio - nearest).abs() <= 1e-10 * ratio.clamp_min(1.0), nearest,
                                    ratio.ceil()).clamp_min(1).long()
                segment_stop = torch.where(fresh, stop, segment_stop)
                segment_start = torch.where(fresh, t, segment_start)
                segment_count = segment_count.masked_fill(fresh, 0)
                segment_steps = torch.where(fresh, steps, segment_steps)
                t_try = torch.addcmul(segment_start, grid_dt, (segment_count + 1).to(t.dtype))
                reach = segment_count + 1 >= segment_steps
            # a stopped sample takes a zero step (its state may be anything, e.g. NaN after a failure)
            t_new = torch.where(running, torch.where(reach, stop, t_try), t)
            dt_step = t_new - t
            self.k1 = self.field.vf(z, t)
            z_step, stages, h = self.rk_step(z, t, dt_step)
            nfe.add_(running, alpha=tab.stages)
            # λY + (1-λ)Z + (step(Z) - Z) = λ(Y - Z) + step(Z)
            y_new = torch.add(z_step, y - z, alpha=lam) if lam != 1.0 else z_step + (y - z)
            if self.adaptive:
                error = self.scaled_error(z, z_step, stages, h)
                ok, finite, dt_next, qold_new = self.decide(error, dt_step, qold)
                accept = running & ok
                # a step shortened to land on a stop time says nothing against the step proposed before
                landed = accept & (t_new == stop) & (dt_step.abs() < dt.abs())
                dt_next = torch.where(landed, d * torch.maximum(dt_next.abs(), dt.abs()), dt_next)
                dt_next = self.bounded(dt_next, torch.where(accept, t_new, t))
            else:
                accept = running.clone()
                dt_next = dt
            if self.check_resolution:
                stuck = running & (t_new == t)
                accept &= ~stuck
            trials.add_(running)
            naccept.add_(accept)
            self.records.append((t, t_new, accept))
            t = torch.where(accept, t_new, t)
            y = torch.where(accept.view(self.state_shape), y_new, y)
            pending, last_dt = accept, dt_step
            segment_count = segment_count + accept
            running &= ~(accept & (d * t >= signed_end))
            floor_rejected = self.floor_rejected(running, accept, dt, dt_step, t)
            qold, streak, dt, new_pointer, passed, (n_running, most, any_pending, failing) = self.close_step(
                running, accept, dt_next, t, signed_times, pointer, qold, streak,
                qold_new if self.adaptive else None, finite if self.adaptive else None,
                stuck if self.check_resolution else None, floor_rejected)
            if most:
                targets = self.saved_targets(pointer, passed, int(most))
                blocks.append((targets, y_new.reshape(B, 1, -1).expand(B, int(most), -1).reshape(B * int(most), -1)))
                column_step.index_copy_(0, targets, (naccept - 1).repeat_interleave(int(most)))
            pointer = new_pointer
            iteration += 1
            if failing:
                dt_report = torch.where(running, dt_next, dt_report)
                running, n_running = self.fail(code, running, finite if self.adaptive else None, streak,
                                               floor_rejected, stuck if self.check_resolution else None)
                dt.masked_fill_(~running, 0.0)
            if n_running and iteration >= options.maxiters:
                dt_report = torch.where(running, dt, dt_report)
                code.masked_fill_(running, _MAXITERS)
                n_running = 0
        code.masked_fill_(code == _RUNNING, _SUCCESS)
        if not self.adaptive:
            bad = (code == _SUCCESS) & ~torch.isfinite(y.reshape(B, -1)).all(1)
            code.masked_fill_(bad, _UNSTABLE)
        abstol = options.abstol.max() if isinstance(options.abstol, torch.Tensor) else options.abstol
        diverged = gap_sep > PAIR_SEPARATION_LIMIT * (abstol + options.reltol * gap_size)
        code.masked_fill_((code == _SUCCESS) & diverged, _UNSTABLE)
        self.pair = (y, z)
        self.column_step = column_step[:trash].view(B, T)
        self.result = (y, t, dt_report, code, naccept, trials - naccept, nfe)
        return self.assemble(blocks, pointer, code)

    def saved_targets(self, pointer, passed, most: int):
        """Flat ``(B * most,)`` indices of the saved entries a step passed (padding: the trash row ``B * T``)."""
        B, T = self.times.shape
        offsets = self._offsets(most, pointer.device)
        columns = (pointer[:, None] + offsets).clamp_(max=T - 1)
        return (columns + self._row_starts).masked_fill_(~(offsets < passed[:, None]), B * T).reshape(-1)

    def accepted_steps(self):
        """``(starts, ends, counts)``: each sample's accepted steps as ``(max N_b, B)`` time tensors (padded
        with the sample's end time) and the ``(B,)`` counts ``N_b``."""
        t0 = self.t0
        B = self.batch
        counts = self.result[4]
        width = int(counts.max()) if B else 0
        if not self.records or not width:
            empty = t0.new_zeros((0, B))
            return empty, empty, counts
        starts, ends, accepted = (torch.stack(x) for x in zip(*self.records))  # (I, B)
        index = (accepted.long().cumsum(0) - 1) * B + torch.arange(B, device=t0.device)
        index = index[accepted]
        final = self.result[1]
        out_starts = final.repeat(width).index_put_((index,), starts[accepted])
        out_ends = final.repeat(width).index_put_((index,), ends[accepted])
        return out_starts.view(width, B), out_ends.view(width, B), counts



def _reverse_sweep(tableau, nodes, lam, field, y, z, starts, ends, counts, column_step, grad_u, leaves, counter):
    """The batched backward walk (see the module docstring): ``(a_y, a_z, y_0, z_0)`` per sample; the
    parameter gradients accumulate in ``leaves``' ``.grad``."""
    B = y.shape[0]
    width = starts.shape[0]
    shape = (B,) + (1,) * (y.dim() - 1)
    T = column_step.shape[1]
    grads = grad_u.transpose(0, 1).reshape(B, T, -1) if T else y.new_zeros((B, 0, y[0].numel()))
    # entries saved from the same step are summed once, at the first of them
    first = torch.searchsorted(column_step, column_step)
    rows = torch.arange(B, device=y.device)[:, None] * T
    folded = grads.new_zeros((B * T, grads.shape[-1])).index_add_(0, (first + rows).reshape(-1),
                                                                   grads.reshape(B * T, -1))
    a_y = torch.zeros_like(y)
    a_z = torch.zeros_like(y)
    for j in range(width):
        index = (counts - 1 - j).clamp_min(0)
        active = j < counts
        mask = active.view(shape)
        # a sample without steps left takes a zero step at a time of its own, with a zero cotangent
        t = starts.gather(0, index[None]).squeeze(0)
        t_new = ends.gather(0, index[None]).squeeze(0)
        dt = torch.where(active, t_new - t, torch.zeros_like(t))
        step = torch.where(active, counts - 1 - j, -2)
        if T:
            at = torch.searchsorted(column_step, step[:, None]).clamp_(max=T - 1)
            hit = (column_step.gather(1, at) == step[:, None]).squeeze(1) & active
            g = folded.index_select(0, (at + rows).squeeze(1)).view_as(y)
            a_y = a_y + torch.where(hit.view(shape), g, torch.zeros_like(g))
        if j == 0:  # every sample's last step: z holds Z_{N-1} already and the adjoint of Z_N is zero
            z0 = z.detach().requires_grad_(True)
            a_total = a_y + a_z
        else:
            y1 = y.detach().requires_grad_(True)
            back = _advance(tableau, nodes, field, y1, t_new, -dt)[0]
            z_prev = torch.where(mask, z - y + back.detach(), z)  # Z_n = Z_{n+1} + Ψ_{-h}(Y_{n+1})
            z0 = z_prev.requires_grad_(True)
            cotangent = torch.where(mask, -a_z, torch.zeros_like(a_z))
            torch.autograd.backward(back, cotangent, inputs=[y1, *leaves])
            counter["nvjp"] += 1
            a_total = a_y + a_z + y1.grad
        fwd = _advance(tableau, nodes, field, z0, t, dt)[0]
        torch.autograd.backward(fwd, torch.where(mask, a_total, torch.zeros_like(a_total)), inputs=[z0, *leaves])
        counter["nvjp"] += 1
        a_y_new = lam * a_total
        a_y = torch.where(mask, a_y_new, a_y)
        a_z = torch.where(mask, a_z - a_y_new + z0.grad, a_z)
        z0 = z0.detach()
        y = torch.where(mask, (y - fwd.detach()) / lam + z0, y)  # Y_n = (Y_{n+1} - step(Z_n)) / λ + Z_n
        z = torch.where(mask, z0, z)
    grad_start = grads.masked_fill((column_step != -1)[..., None], 0.0).sum(1).view_as(y)
    return a_y, a_z, grad_start, y, z


class _PerSampleReversibleFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, alg, problem, run, paths, holder, u0, *params):
        detached = [x.detach() for x in params]
        with torch.no_grad():
            sol, loop = run.solve_with_loop(_bound_field(problem, paths, detached), u0.detach(),
                                            loop_class=functools.partial(_ReversibleLoop, coupling=alg.coupling))
            starts, ends, counts = loop.accepted_steps()
        holder["solution"] = sol
        ctx.alg, ctx.problem, ctx.run, ctx.paths = alg, problem, run, paths
        ctx.tableau, ctx.nodes = run.solver.tableau, loop.constants.c
        ctx.backward_stats = holder["backward_stats"]
        # the step times and the (B, T) bookkeeping: scalars per step, no states
        ctx.steps = (starts, ends, counts, loop.column_step)
        y, z = loop.pair
        ctx.save_for_backward(u0.detach(), y, z, *detached)
        return sol.u.detach().clone()

    @staticmethod
    def backward(ctx, grad_u):
        refuse_higher_order("ReversibleAdjoint")
        u0, y, z, *params = ctx.saved_tensors
        starts, ends, counts, column_step = ctx.steps
        counter = {"nf": 0, "nvjp": 0}
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(True) for x in params]
            term = _bound_field(ctx.problem, ctx.paths, leaves)
            checked = []

            def field(u, t):
                out = term.vf(u, t)
                if not checked:
                    check_no_hidden_parameters(out, [u, *leaves], where="ReversibleAdjoint (batch='per-sample'): f")
                    checked.append(True)
                counter["nf"] += 1
                return out
            a_y, a_z, grad_start, y, z = _reverse_sweep(ctx.tableau, ctx.nodes, ctx.alg.coupling, field, y, z,
                                                        starts, ends, counts, column_step, grad_u.to(u0.dtype),
                                                        leaves, counter)
        per_increment = ctx.tableau.stages - 1 if ctx.tableau.fsal else ctx.tableau.stages
        nvjp_per_sample = (2 * counts - 1).clamp_min(0)
        nf_per_sample = nvjp_per_sample * per_increment
        error = (torch.maximum((y - u0).abs().max(), (z - u0).abs().max()) if u0.numel() else u0.new_zeros(()))
        ctx.backward_stats.update(BackwardStats(nf=counter["nf"], nvjp=counter["nvjp"], nsteps=int(counts.sum()),
                                                nsteps_per_sample=counts, nvjp_per_sample=nvjp_per_sample,
                                                nf_per_sample=nf_per_sample, reconstruction_error=float(error)))
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
        return (None,) * 5 + ((a_y + a_z + grad_start).reshape(u0.shape), *grads)


def per_sample_reversible(alg: ReversibleAdjoint, problem, run: PerSampleRun) -> BatchSolution:
    """``solve(problem, ..., batch="per-sample", sensealg=alg)`` for a :class:`ReversibleAdjoint`: the
    per-sample reversible solve and its exact discrete backward pass (see the module docstring).

    The base method is ``alg.solver`` when given, else the solver passed to ``solve``. The gradient flows
    to ``u0`` and to every tensor of the parameter tree that requires grad; a tensor that requires grad
    but reaches ``f`` only through a closure raises :class:`~pylux.sensitivity.HiddenParameterError`.

    Raises:
        TypeError: a base that is not an explicit Runge–Kutta method.
        ValueError: an adaptive solve (no ``dt`` with ``adaptive=False``) around a base without an
            embedded error estimate.
        HiddenParameterError: a tensor that requires grad reaches ``f`` only through a closure.
    """
    base = alg.solver if alg.solver is not None else run.solver
    if not isinstance(base, ExplicitRungeKutta):
        raise TypeError(f"ReversibleAdjoint: the base solver must be an explicit Runge–Kutta method such as "
                        f"Tsit5(); {base!r} is not a one-step method")
    if run.options.adaptive and base.tableau.b_error is None:
        raise ValueError(f"ReversibleAdjoint: the base method {base!r} has no embedded error estimate, so it "
                         "cannot step adaptively; pass dt=... and adaptive=False, or use a base such as Tsit5()")
    run = dataclasses.replace(run, solver=base)
    reversible = Reversible(base, alg.coupling)
    loop_class = functools.partial(_ReversibleLoop, coupling=alg.coupling)
    if alg.backprop:
        sol = run.solve_with_loop(problem.term.bind(problem.p), problem.u0, loop_class=loop_class)[0]
        sol.solver = reversible
        return sol
    pairs = grad_leaves(problem.p)
    paths = [path for path, _ in pairs]
    params = [leaf for _, leaf in pairs]
    if torch.is_grad_enabled() and not params and not problem.u0.requires_grad:
        _refuse_closure_only_gradients(problem, "ReversibleAdjoint", t0=run.t0)
    holder: dict = {"backward_stats": BackwardStats()}
    u = _PerSampleReversibleFunction.apply(alg, problem, run, paths, holder, problem.u0, *params)
    sol = holder["solution"]
    out = BatchSolution(sol.t, u, sol.retcode, sol.stats, message=sol.message, solver=reversible, u0=problem.u0)
    out.final_state = sol.final_state
    out.backward_stats = holder["backward_stats"]
    return out


register_per_sample_adjoint(ReversibleAdjoint, per_sample_reversible)
