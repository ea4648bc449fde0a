"""Batches whose samples live on their own time grids: per-sample ``saveat`` and per-sample stepping.

A batched state ``u0`` of shape ``(B, ...)`` (the leading axis indexes the
samples) can be solved in two ways:

* **joint stepping** (``batch="joint"``, the default): one adaptive loop for the
  whole batch, one ``t`` and ``dt`` shared by every sample, the error measured
  over the whole state (:mod:`pylux.diffeq.integrate`). With ``saveat`` a
  ``(B, T)`` tensor, each sample is saved at its own times: under
  ``sensealg=None`` / ``DirectAdjoint()`` (and any sensealg that
  backpropagates through the solver) from the solve's dense output, every
  query evaluated with its own step's interpolant in one vectorised pass per
  step of the solve (no loop over samples); under the adjoint sensealgs the
  joint solve saves at the union of all samples' times (so that its backward
  pass sees ordinary 1-D saved times) and each sample's rows are gathered from
  it, which costs ``O(len(union) * B)`` memory.
* **per-sample stepping** (``batch="per-sample"``): the adaptive loop of this
  module, in which every sample has its own ``t``, ``dt``, accept/reject
  decision, controller memory and status, held as ``(B,)`` tensors with a
  running mask (the design of torchode: Lienen & Günnemann, "torchode: A
  Parallel ODE Solver for PyTorch", 2022). A sample whose dynamics are easy is
  not dragged along by a hard one: it takes the steps its own solve would take.
  It reuses the explicit Runge–Kutta tableaus and their dense output, the
  step-size controllers' parameters (PI/I, per-sample proposals), the norms
  (per sample) and Hairer's initial step (per sample). Each sample may have its
  own span: ``ODEProblem(f, u0, (t0, t1))`` with ``t0``, ``t1`` of shape ``(B,)``.

Under per-sample stepping the vector field receives ``t`` as a ``(B,)`` tensor
(each sample's own time; broadcast it yourself, e.g. ``t[:, None]``), and every
batched evaluation computes every sample: a finished sample is evaluated at its
end time with a zero step (as in torchode) until the whole batch is done.

Saved values (both modes): ``sol.u`` has shape ``(T, B, ...)`` and ``sol.t``
shape ``(T, B)``, so ``sol.u[k, b]`` is sample ``b`` at time ``sol.t[k, b]``
(``sol.t`` is ``saveat`` transposed: the layout of a 1-D ``saveat``, with one
time per sample in each row). ``saveat_mask`` (``(B, T)`` bool, True =
observed) makes series ragged: a masked entry's time is ignored (it may be
padding or NaN), and its value is the sample's state at its last unmasked time
before it (its initial state when there is none), so ``loss * mask`` stays
finite and gives masked entries an exactly zero gradient; ``sol.t`` holds
the time that value belongs to.

Gradients: per-sample stepping runs under ``sensealg=None`` and every
sensitivity algorithm that backpropagates through the solver
(``differentiates_solver``, i.e. ``DirectAdjoint()``; the step sizes are
constants of the backward pass, as in the joint loop), and under the
sensitivity algorithms registered with :func:`register_per_sample_adjoint`:
``BacksolveAdjoint``, ``InterpolatingAdjoint`` (with or without
checkpointing: ``True`` checkpoints at each sample's saved times, ``n`` at
``n - 1`` points of each sample's own span, a sequence at times shared by
every sample and inside every span) and ``QuadratureAdjoint``
(:mod:`pylux.sensitivity.per_sample`: a per-sample backward solve, always
with the seminorm on the parameter channels; the quadrature's nodes lie in
each sample's own backward steps), and ``ReversibleAdjoint``
(:mod:`pylux.sensitivity.per_sample_reversible`). A sensitivity algorithm
that registers no per-sample pass is refused (``NotImplementedError``); it
works with the joint step and a ``(B, T)`` saveat.

Event callbacks (``ContinuousCallback``, ``DiscreteCallback``) are refused
with per-sample times in both modes (``NotImplementedError``; they work with
the joint step and a 1-D ``saveat``).

Not (yet) available under per-sample stepping, each refused by name:
``tstops``, termination callbacks, ``save_stats``, ``dense``/``save_everystep``, SDEs,
and solvers other than the explicit Runge–Kutta tableaus (``VCAB3``,
``Reversible``, the implicit methods).

Host synchronisation of the per-sample loop: one transfer per step (the
number of running samples, the most saved times any sample passed in that
step, whether any sample was accepted, whether any is failing), one more on
a step where a sample fails, and a few per solve for validation, the
initial step and the return codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .integrate import NONFINITE_SHRINK, MAX_NONFINITE_STREAK, CountingField
from .callbacks import AbstractEventCallback
from .controllers import PIController
from .interpolation import StageInterpolant, linear_combination
from .norms import SemiNorm, max_norm, rms_norm
from .options import RESOLUTION_ULPS, default_dtmin, make_options
from .solution import ERROR_FOR_RETCODE, ReturnCode, Solution, SolverStats
from .solvers import ExplicitRungeKutta

__all__ = ["BATCH_MODES", "BatchSolution", "PerSampleStats", "wants_batched_times", "solve_batched", "per_sample_norm",
           "PerSampleLoop", "PerSampleRun", "register_per_sample_adjoint", "per_sample_adjoint"]

#: the values of ``solve(..., batch=...)``
BATCH_MODES = ("joint", "per-sample")

# per-sample status codes (int tensor); a running sample is _RUNNING
_RUNNING, _SUCCESS, _MAXITERS, _DTMIN, _UNSTABLE = -1, 0, 1, 2, 3
_RETCODE_OF = {_SUCCESS: ReturnCode.Success, _MAXITERS: ReturnCode.MaxIters, _DTMIN: ReturnCode.DtLessThanMin,
               _UNSTABLE: ReturnCode.Unstable}


def wants_batched_times(prob, batch, saveat, saveat_mask) -> bool:
    """True when ``solve`` must hand the problem to this module (see ``solve``'s ``batch``/``saveat``)."""
    if not isinstance(batch, str) or batch not in BATCH_MODES:
        raise ValueError(f"solve: batch must be one of {BATCH_MODES}, got {batch!r}: 'joint' steps the whole "
                         "batch together, 'per-sample' gives every sample (leading axis of u0) its own steps")
    per_sample_span = isinstance(prob.tspan[0], torch.Tensor)
    per_sample_saveat = isinstance(saveat, torch.Tensor) and saveat.dim() == 2
    return batch == "per-sample" or saveat_mask is not None or per_sample_saveat or per_sample_span


@dataclass(repr=False)
class PerSampleStats(SolverStats):
    """:class:`SolverStats` of a ``batch="per-sample"`` solve, with every sample's own counters.

    ``nf`` counts the batched calls of ``f`` (each evaluates every sample);
    ``naccept`` and ``nreject`` are sums over the samples.

    Attributes:
        nf_per_sample: ``(B,)`` int64, the evaluations of ``f`` sample ``b``
            was running in: what a solve of that sample alone would make.
        naccept_per_sample, nreject_per_sample: ``(B,)`` int64 accepted and
            rejected steps of each sample.
        retcode_per_sample: one :class:`ReturnCode` per sample.
        t_per_sample: ``(B,)`` where each sample stopped (its ``t1`` on success).
    """

    nf_per_sample: torch.Tensor | None = None
    naccept_per_sample: torch.Tensor | None = None
    nreject_per_sample: torch.Tensor | None = None
    retcode_per_sample: tuple | None = None
    t_per_sample: torch.Tensor | None = None


# --- validation of per-sample times -------------------------------------------------------------

def _spans(prob, batch: int):
    """``(t0, t1)`` as ``(B,)`` time tensors on the state's device."""
    t0, t1 = prob.tspan
    device = prob.u0.device
    if isinstance(t0, torch.Tensor):
        return t0.to(device), t1.to(device)
    return (torch.full((batch,), t0, dtype=prob.time_dtype, device=device),
            torch.full((batch,), t1, dtype=prob.time_dtype, device=device))


def _batch_times(saveat, saveat_mask, t0: torch.Tensor, t1: torch.Tensor, time_dtype, save_start: bool,
                 save_end: bool):
    """The ``(B, T)`` saved times (masked entries forward-filled) and the ``(B, T)`` mask, validated.

    A 1-D ``saveat`` is every sample's; ``save_start``/``save_end`` add the
    columns ``t0``/``t1``. Returns ``(times, mask)``; ``mask`` is None when no
    entry is masked.
    """
    batch = t0.shape[0]
    if saveat is None:
        columns = []
        mask = None
    else:
        if not isinstance(saveat, torch.Tensor):
            try:
                saveat = torch.as_tensor([float(x) for x in saveat], dtype=torch.float64)
            except (TypeError, ValueError):
                raise TypeError("solve: with per-sample times, saveat must be a (B, T) tensor or a sequence of "
                                f"times shared by every sample, got {type(saveat).__name__}") from None
        if saveat.requires_grad:
            raise ValueError("solve: saveat requires grad, but gradients with respect to the saved times are not "
                             "supported; pass saveat.detach()")
        if saveat.dim() == 0:
            raise ValueError("solve: a scalar saveat (a spacing) is not supported with per-sample times; pass the "
                             "times as a (B, T) tensor, or a 1-D tensor shared by every sample")
        if saveat.dim() == 1:
            saveat = saveat.reshape(1, -1).expand(batch, -1)
        if saveat.dim() != 2 or saveat.shape[0] != batch:
            raise ValueError(f"solve: a per-sample saveat must have shape (B, T) = ({batch}, T), one row per "
                             f"sample of u0, got shape {tuple(saveat.shape)}")
        if saveat_mask is not None:
            if not isinstance(saveat_mask, torch.Tensor) or saveat_mask.dtype != torch.bool:
                raise TypeError("solve: saveat_mask must be a boolean tensor of saveat's shape (True = a time to "
                                f"save), got {getattr(saveat_mask, 'dtype', type(saveat_mask).__name__)}")
            if saveat_mask.shape != saveat.shape:
                raise ValueError(f"solve: saveat_mask has shape {tuple(saveat_mask.shape)} but saveat has shape "
                                 f"{tuple(saveat.shape)}; give one flag per saved time")
        # compared in the time dtype: a float32 span's ends are float32 numbers
        columns = [saveat.detach().to(device=t0.device, dtype=time_dtype)]
        mask = saveat_mask.to(t0.device) if saveat_mask is not None else None
        _check_batch_times(columns[0], mask, t0, t1)
    times = torch.cat(([t0[:, None]] if save_start else []) + columns
                      + ([t1[:, None]] if save_end else []), dim=1) if (columns or save_start or save_end) \
        else t0.new_zeros((batch, 0))
    if mask is not None:
        ones = torch.ones((batch, 1), dtype=torch.bool, device=t0.device)
        mask = torch.cat(([ones] if save_start else []) + [mask] + ([ones] if save_end else []), dim=1)
    if mask is not None:
        times = _forward_fill(times, mask, t0)
    return times, mask


def _check_batch_times(times, mask, t0, t1) -> None:
    """Every unmasked time finite, inside its sample's span and strictly monotone in its direction.

    The checks run on the device with one transfer of three flags; the message is built on the host
    only when one fails.
    """
    if times.numel() == 0:
        return
    valid = torch.ones_like(times, dtype=torch.bool) if mask is None else mask
    direction = torch.where(t1 >= t0, 1.0, -1.0).to(times.dtype)[:, None]
    lo, hi = torch.minimum(t0, t1)[:, None], torch.maximum(t0, t1)[:, None]
    finite = torch.isfinite(times)
    outside = valid & finite & ((times < lo) | (times > hi))
    # each unmasked time against the last unmasked one before it
    columns = torch.arange(times.shape[1], device=times.device).expand_as(times)
    last = torch.where(valid, columns, torch.full_like(columns, -1)).cummax(dim=1).values
    previous = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)
    step = direction * (times - times.gather(1, previous.clamp_min(0)))
    wrong = valid & finite & (previous >= 0) & ~(step > 0)
    flags = torch.stack([(valid & ~finite).any(), outside.any(), wrong.any()]).tolist()
    if not any(flags):
        return
    host = times.detach().cpu().double()
    if flags[0]:
        b, k = (valid & ~finite).nonzero()[0].tolist()
        raise ValueError(f"solve: saveat[{b}, {k}] = {float(host[b, k])!r} is not finite; mask padding entries with "
                         "saveat_mask instead")
    if flags[1]:
        b, k = outside.nonzero()[0].tolist()
        raise ValueError(f"solve: saveat[{b}, {k}] = {float(host[b, k])!r} is outside sample {b}'s tspan "
                         f"({float(t0[b])!r}, {float(t1[b])!r}); every saved time must lie in its sample's span")
    b, k = wrong.nonzero()[0].tolist()
    j = int(previous[b, k])
    kind = "duplicated" if host[b, k] == host[b, j] else "out of order"
    order = "increasing" if float(direction[b, 0]) > 0 else "decreasing (its tspan runs backward)"
    raise ValueError(f"solve: sample {b}'s saved times are {kind}: saveat[{b}, {j}] = {float(host[b, j])!r} and "
                     f"saveat[{b}, {k}] = {float(host[b, k])!r}; each row must be strictly {order} over its unmasked "
                     "entries (times are never sorted silently)")


def _forward_fill(times, mask, t0):
    """Each masked time replaced by the last unmasked time before it (the sample's t0 when none)."""
    columns = torch.arange(times.shape[1], device=times.device).expand_as(times)
    last = torch.where(mask, columns, torch.full_like(columns, -1)).cummax(dim=1).values
    filled = times.gather(1, last.clamp_min(0))
    return torch.where(mask, times, torch.where(last >= 0, filled, t0[:, None].expand_as(times)))


# --- per-sample norms ---------------------------------------------------------------------------

def per_sample_norm(norm):
    """``norm`` applied to each sample of a batch: a function ``(B, ...) -> (B,)``.

    :func:`rms_norm` and :func:`max_norm` become reductions over all axes but
    the first; a :class:`SemiNorm` measures each sample's entries of its mask
    (a mask of the whole batch's shape, or of one sample's); any other norm is
    vectorised with ``torch.vmap``.
    """
    if norm is rms_norm:
        def rms(x):
            flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))
            if flat.shape[1] == 0:
                return flat.new_zeros(flat.shape[0])
            return torch.linalg.vector_norm(flat, dim=1) * (1.0 / math.sqrt(flat.shape[1]))
        return rms
    if norm is max_norm:
        def maximum(x):
            flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))
            if flat.shape[1] == 0:
                return flat.new_zeros(flat.shape[0])
            return flat.abs().amax(dim=1)
        return maximum
    if isinstance(norm, SemiNorm):
        def semi(x):
            mask = norm.mask.to(x.device)
            mask = mask.expand(x.shape) if mask.dim() == x.dim() else mask.expand(x.shape[1:]).expand(x.shape)
            selected = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).reshape(x.shape[0], -1)
            count = mask.reshape(x.shape[0], -1).sum(1).clamp_min(1).to(x.dtype)
            value = torch.linalg.vector_norm(selected, dim=1) / count.sqrt()
            return value + 0.0 * x.reshape(x.shape[0], math.prod(x.shape[1:])).sum(1)  # NaN/Inf anywhere in a sample stays visible
        return semi
    return torch.vmap(norm)


def _broadcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(B,)`` tensor viewed as ``(B, 1, ..., 1)`` against a batched state, in the state's dtype."""
    return v.to(like.dtype).reshape((v.shape[0],) + (1,) * (like.dim() - 1))


# --- the per-sample loop ------------------------------------------------------------------------

class _TableauConstants:
    """A tableau's ``c`` and dense-output coefficients as device tensors (made once per solve)."""

    def __init__(self, tableau, time_dtype, dtype, device):
        self.c = torch.tensor(tableau.c, dtype=time_dtype, device=device)[:, None]
        dense = torch.tensor(tableau.dense, dtype=dtype, device=device)  # (s, d): b_i(theta) = sum_m P_im theta^(m+1)
        self.dense_t = dense.t().contiguous()
        self.powers = torch.arange(1, dense.shape[1] + 1, dtype=dtype, device=device)

    def dense_weights(self, theta):
        """``(..., s)`` weights ``b_i(theta)`` for a tensor ``theta`` (as :meth:`ButcherTableau.dense_weights`)."""
        return (theta.unsqueeze(-1) ** self.powers) @ self.dense_t


class PerSampleLoop:
    """Adaptive (or fixed-step) explicit Runge–Kutta steps with per-sample ``t``, ``dt`` and status.

    Per iteration, for the running samples: clamp each proposal to the
    sample's end, take one step of the tableau with a per-sample ``dt``,
    measure the per-sample scaled error, decide accept/reject and the next
    ``dt`` per sample (the controller's formula on ``(B,)`` tensors), save
    the sample's requested times the step passed (its own interpolant at its
    own ``theta``), update counters and statuses. A finished or failed sample
    stays in the batch with a zero step. Bookkeeping tensors (times, counters,
    statuses) are updated in place; the state and the stages out of place, so
    autograd sees every step.
    """

    def __init__(self, field: CountingField, solver: ExplicitRungeKutta, u0, t0, t1, options, times, limits,
                 check_resolution: bool):
        self.field, self.solver, self.options = field, solver, options
        self.tableau = solver.tableau
        self.u0, self.t0, self.t1 = u0, t0, t1
        self.times = times
        self.dtmin, self.dtmax = limits
        self.norm = per_sample_norm(options.norm)
        self.batch = u0.shape[0]
        self.direction = torch.where(t1 >= t0, 1.0, -1.0).to(t0.dtype)
        self.controller = options.controller
        self.adaptive = options.adaptive
        self.check_resolution = check_resolution
        self.constants = _TableauConstants(self.tableau, t0.dtype, u0.dtype, u0.device)
        self.state_shape = (self.batch,) + (1,) * (u0.dim() - 1)
        self._row_starts = torch.arange(self.batch, device=u0.device)[:, None] * times.shape[1]

    def first_stage(self, u, t):
        """``f(u, t)`` as the first stage of the next step (a hook: the adjoints record it)."""
        return self.field.vf(u, t)

    def on_step(self, u, accept, dt_step, stages) -> None:
        """Called once per step with its final ``(B,)`` accept mask, before the state moves (a hook)."""

    def rk_step(self, u, t, dt_step):
        """One step of the tableau from ``(u, t)`` with the per-sample step ``dt_step``; ``k1`` is ``self.k1``."""
        tab, vf = self.tableau, self.field.vf
        h = dt_step.to(u.dtype).view(self.state_shape)
        stage_times = torch.addcmul(t, self.constants.c, dt_step)  # (s, B)
        stages = [self.k1]
        y = u
        for i in range(1, tab.stages):
            y = torch.addcmul(u, h, linear_combination(None, stages, tab.a[i]))
            stages.append(vf(y, stage_times[i]))
        u_new = y if tab.fsal else torch.addcmul(u, h, linear_combination(None, stages, tab.b))
        return u_new, stages, h

    def scaled_error(self, u, u_new, stages, h):
        """Per-sample ``||h sum_i e_i k_i / (abstol + reltol max(|u|, |u_new|))||`` (no gradient)."""
        with torch.no_grad():
            options = self.options
            error = linear_combination(None, stages, self.tableau.b_error)
            scale = torch.maximum(u.abs(), u_new.abs()).mul_(options.reltol).add_(options.abstol)
            return self.norm(error.mul_(h).div_(scale))

    def initial_dt(self, f0):
        """Hairer's starting step (see :func:`~pylux.diffeq.controllers.initial_step_size`) per sample."""
        options, u0, t0, d = self.options, self.u0, self.t0, self.direction
        with torch.no_grad():
            span = (self.t1 - t0).abs()
            scale = u0.abs() * options.reltol + options.abstol
            d0, d1 = self.norm(u0 / scale), self.norm(f0 / scale)
            h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
            h0 = torch.minimum(h0.to(t0.dtype), torch.minimum(span, self.dtmax))
            u1 = u0 + (d * h0).to(u0.dtype).view(self.state_shape) * f0
            f1 = self.field.vf(u1, t0 + d * h0)
            d2 = self.norm((f1 - f0) / scale).to(t0.dtype) / h0
            dmax = torch.maximum(d1.to(t0.dtype), d2)
            h1 = torch.where(dmax <= 1e-15, torch.clamp_min(h0 * 1e-3, 1e-6),
                             (0.01 / dmax) ** (1.0 / self.solver.order))
            h = torch.minimum(torch.minimum(100 * h0, h1), torch.minimum(span, self.dtmax))
            return torch.maximum(torch.where(torch.isfinite(d2), h, h0), self.floor(t0))

    def decide(self, error, dt_step, qold):
        """``(ok, finite, dt_next, qold_new)`` per sample: the controller's formula on ``(B,)`` tensors.

        PI (:class:`~pylux.diffeq.PIController`): ``q11 = E^beta1``, ``q = clamp(q11 / qold^beta2 /
        gamma, 1/qmax, 1/qmin)``; accepted: ``dt / q`` (``q := 1`` inside the steady band) and
        ``qold = max(E, qoldinit)``; rejected: ``dt / min(1/qmin, q11/gamma)``. I
        (:class:`~pylux.diffeq.IController`): ``dt / clamp(E^(1/(k+1)) / gamma, 1/qmax, 1/qmin)``. A
        NaN/Inf error shrinks the step by ``NONFINITE_SHRINK``, as in the joint loop.
        """
        c = self.controller
        finite = torch.isfinite(error)
        ok = error <= 1.0  # False for NaN/Inf
        e = error.nan_to_num(nan=1.0, posinf=1.0)  # a NaN/Inf error only shrinks the step (below)
        steady_band = not (c.qsteady_min == c.qsteady_max == 1.0)  # the default band [1, 1] changes nothing
        if isinstance(c, PIController):
            q11 = e ** c.beta1
            q = (q11 / (qold ** c.beta2 * c.gamma)).clamp_(1.0 / c.qmax, 1.0 / c.qmin)
            if steady_band:
                q = torch.where((q >= c.qsteady_min) & (q <= c.qsteady_max), torch.ones_like(q), q)
            factor = torch.where(ok, q, (q11 / c.gamma).clamp_(max=1.0 / c.qmin))
            qold_new = e.clamp_min(c.qoldinit)
        else:
            factor = (e ** (1.0 / (c.error_order + 1)) / c.gamma).clamp_(1.0 / c.qmax, 1.0 / c.qmin)
            if steady_band:
                factor = torch.where(ok & (factor >= c.qsteady_min) & (factor <= c.qsteady_max),
                                     torch.ones_like(factor), factor)
            qold_new = qold
        factor = factor.masked_fill_(~finite, 1.0 / NONFINITE_SHRINK)
        return ok, finite, dt_step / factor.to(dt_step.dtype), qold_new

    def run(self):
        B, u, t, t_end, d = self.batch, self.u0, self.t0.clone(), self.t1, self.direction
        tab, options, device = self.tableau, self.options, self.u0.device
        signed_end = d * t_end
        running = t != t_end
        # failures are recorded as they happen; a sample still _RUNNING at the end reached its t1
        code = torch.full((B,), _RUNNING, dtype=torch.long, device=device)
        naccept = torch.zeros(B, dtype=torch.long, device=device)
        trials, streak = torch.zeros_like(naccept), torch.zeros_like(naccept)
        self.k1 = self.first_stage(u, t)
        nfe = running.long()
        if self.adaptive and options.dt is None:
            dt = self.initial_dt(self.k1)
            nfe.add_(running)
        else:
            dt = torch.minimum(torch.full_like(t, options.dt), self.dtmax)
            if self.adaptive:
                dt = torch.maximum(dt, self.floor(t))
        dt = d * dt
        if not self.adaptive:  # the grid t0 + i dt, the last step shortened (as FixedTimeGrid)
            ratio = ((t_end - t).abs() / dt.abs()).double()
            nearest = ratio.round()
            steps = torch.where((ratio - nearest).abs() <= 1e-10 * ratio.clamp_min(1.0), nearest, ratio.ceil())
            grid_steps = steps.clamp_min(1).long()
            grid_dt = d * dt.abs()
        qold = torch.full_like(t, getattr(self.controller, "qoldinit", 1e-4)).to(u.dtype)
        bad_start = running & ~torch.isfinite(self.k1.reshape(B, -1)).all(1)
        code.masked_fill_(bad_start, _UNSTABLE)
        running &= ~bad_start
        dt_report = dt.clone()
        dt.masked_fill_(~running, 0.0)  # a stopped sample takes zero steps
        signed_times = d[:, None] * self.times
        pointer = (signed_times <= (d * t)[:, None]).sum(1)  # entries at t0 hold u0 already
        blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        per_step = tab.stages - 1  # k1 is reused (FSAL) or evaluated when stale, counted there
        k1_stale = torch.zeros_like(running)
        n_running, any_accepted, iteration = int(running.sum()), False, 0
        while n_running:
            if not tab.fsal and any_accepted:
                self.k1 = self.first_stage(u, t)
                nfe.add_(running & k1_stale)
            if self.adaptive:
                t_try = t + dt
                # a step ending within 1 % of its size short of the end is stretched onto it (Hairer's
                # DOPRI5 rule, as clamp_step does for the joint loop)
                reach = d * (t + 1.01 * dt) >= signed_end
            else:
                t_try = torch.addcmul(self.t0, grid_dt, (naccept + 1).to(t.dtype))
                reach = naccept + 1 >= grid_steps
            t_new = torch.where(reach, t_end, t_try)
            dt_step = t_new - t
            u_new, stages, h = self.rk_step(u, t, dt_step)
            nfe.add_(running, alpha=per_step)
            if self.adaptive:
                error = self.scaled_error(u, u_new, stages, h)
                ok, finite, dt_next, qold_new = self.decide(error, dt_step, qold)
                accept = running & ok
                dt_next = self.bounded(dt_next, torch.where(accept, t_new, t))
            else:
                accept = running.clone()
                dt_next = dt
            if self.check_resolution:
                stuck = running & (t_new == t)
                accept &= ~stuck
            trials.add_(running)
            naccept.add_(accept)
            self.on_step(u, accept, dt_step, stages)
            t_start, u_start = t, u
            t = torch.where(accept, t_new, t)
            accepted = accept.view(self.state_shape)
            u = torch.where(accepted, u_new, u)
            if tab.fsal:
                self.k1 = torch.where(accepted, stages[-1], self.k1)
            else:
                k1_stale = accept
            running &= ~(accept & reach)
            floor_rejected = self.floor_rejected(running, accept, dt, dt_step, t_start)
            qold, streak, dt, new_pointer, passed, (n_running, most, any_accepted, failing) = self.close_step(
                running, accept, dt_next, t, signed_times, pointer, qold, streak,
                qold_new if self.adaptive else None, finite if self.adaptive else None,
                stuck if self.check_resolution else None, floor_rejected)
            if most:
                blocks.append(self.saved_values(u_start, u_new, t_start, t_new, h, stages, pointer, passed,
                                                int(most)))
            pointer = new_pointer
            iteration += 1
            if failing:  # rare: a NaN/Inf step, or a step size below dtmin or the time resolution
                dt_report = torch.where(running, dt_next, dt_report)
                running, n_running = self.fail(code, running, finite if self.adaptive else None, streak,
                                               floor_rejected, stuck if self.check_resolution else None)
                dt.masked_fill_(~running, 0.0)
            if n_running and iteration >= options.maxiters:  # every running sample has tried maxiters steps
                dt_report = torch.where(running, dt, dt_report)
                code.masked_fill_(running, _MAXITERS)
                n_running = 0
        code.masked_fill_(code == _RUNNING, _SUCCESS)
        if not self.adaptive:  # fixed steps cannot be shrunk: a NaN/Inf is found once, at the end
            bad = (code == _SUCCESS) & ~torch.isfinite(u.reshape(B, -1)).all(1)
            code.masked_fill_(bad, _UNSTABLE)
        self.result = (u, t, dt_report, code, naccept, trials - naccept, nfe)
        return self.assemble(blocks, pointer, code)

    def floor(self, t):
        """``(B,)`` shortest steps from ``t``: ``max(dtmin, 4 ulps of |t|)`` per sample, as the joint loop's
        (:func:`~pylux.diffeq.options.step_floor`)."""
        return torch.maximum(self.dtmin, RESOLUTION_ULPS * torch.finfo(t.dtype).eps * t.abs())

    def bounded(self, dt_next, t):
        """The next proposals from ``t`` with their sizes within ``[floor, dtmax]`` (a proposal below the floor
        is raised to it), as in the joint loop (``_Loop.bound_next`` in :mod:`pylux.diffeq.integrate`)."""
        return self.direction * torch.maximum(dt_next.abs().clamp(max=self.dtmax), self.floor(t))

    def floor_rejected(self, running, accept, dt, dt_step, t):
        """``(B,)``: the running samples whose rejected step from ``t`` was no longer than the floor there
        (it cannot shrink)."""
        if not self.adaptive:
            return torch.zeros_like(running)
        return running & ~accept & (torch.minimum(dt.abs(), dt_step.abs()) <= self.floor(t))

    def close_step(self, running, accept, dt_next, t, signed_times, pointer, qold, streak, qold_new, finite, stuck,
                   floor_rejected):
        """The bookkeeping after a step has moved its accepted samples (shared by every per-sample loop):
        the controller's memory, the non-finite streak, the alarms (NaN/Inf, a rejected step at the dtmin
        floor, the time resolution), the next ``dt`` (zero for a stopped sample), the saved times each sample
        passed, and the step's one host transfer ``[n running, most times passed, n accepted, n alarms]``.

        Returns ``(qold, streak, dt, new_pointer, passed, counts)``.
        """
        if self.adaptive:
            qold = torch.where(accept, qold_new, qold)
            streak = (streak + 1).masked_fill_(finite, 0)
            alarm = running & (~finite | floor_rejected)
        else:
            alarm = torch.zeros_like(running)
        if self.check_resolution:
            alarm |= stuck
        dt = dt_next.masked_fill(~running, 0.0)
        new_pointer = (signed_times <= (self.direction * t)[:, None]).sum(1)
        passed = new_pointer - pointer
        counts = torch.stack([running.sum(), passed.max(), accept.sum(), alarm.sum()]).tolist()
        return qold, streak, dt, new_pointer, passed, counts

    def fail(self, code, running, finite, streak, floor_rejected, stuck):
        """Mark the running samples that cannot go on: NaN/Inf too often or at the dtmin floor (Unstable), or
        a finite step rejected at the floor or below the time resolution (DtLessThanMin)."""
        small = floor_rejected
        if finite is not None:
            unstable = running & ~finite & ((streak >= MAX_NONFINITE_STREAK) | small)
            too_small = running & finite & small
        else:
            unstable = too_small = torch.zeros_like(running)
        if stuck is not None:
            too_small |= stuck & ~unstable
        code.masked_fill_(unstable, _UNSTABLE)
        code.masked_fill_(too_small, _DTMIN)
        running = running & ~(unstable | too_small)
        return running, int(running.sum())

    def saved_values(self, u, u_new, t, t_new, h, stages, pointer, passed, most: int):
        """The values at each sample's saved times inside this step: ``(flat targets, values)``.

        Sample ``b`` passed ``passed[b]`` of its times, those from column
        ``pointer[b]`` on; the ``(B, most)`` window holds them and padding,
        whose target is the trash row ``B * T``.
        """
        B, T = self.times.shape
        offsets = self._offsets(most, u.device)
        inside = offsets < passed[:, None]
        columns = (pointer[:, None] + offsets).clamp_(max=T - 1)
        when = self.times.gather(1, columns)
        # a stopped sample's zero step gives 0/0: its window is padding, whose theta must stay finite
        # (a NaN weight would turn the padding's zero gradient into NaN)
        theta = ((when - t[:, None]) / (t_new - t)[:, None]).nan_to_num_(0.0).clamp_(0.0, 1.0).to(u.dtype)
        weights = self.constants.dense_weights(theta).mul_(h.reshape(B, 1, 1))  # (B, most, s)
        stacked = torch.stack([k.reshape(B, -1) for k in stages], dim=1)  # (B, s, F)
        values = torch.baddbmm(u.reshape(B, 1, -1), weights, stacked)
        # a time that is the step's end takes the step's state exactly, as in the joint loop
        values = torch.where((when == t_new[:, None]).unsqueeze(-1), u_new.reshape(B, 1, -1), values)
        targets = (columns + self._row_starts).masked_fill_(~inside, B * T)
        return targets.reshape(-1), values.reshape(B * most, -1)

    def _offsets(self, most: int, device):
        cache = self.__dict__.setdefault("_offset_cache", {})
        if most not in cache:
            cache[most] = torch.arange(most, device=device)
        return cache[most]
    def assemble(self, blocks, pointer, code):
        """``(T, B, ...)`` saved values; times a failed sample never reached are NaN."""
        B, T = self.times.shape
        u0 = self.u0
        width = u0[0].numel() if B else 0
        base = torch.cat([u0.reshape(B, 1, width).expand(B, T, width).reshape(B * T, width),
                          u0.new_zeros((1, width))])
        if blocks:
            targets = torch.cat([b[0] for b in blocks])
            values = torch.cat([b[1] for b in blocks])
            # every saved entry is written once; only the trash row (discarded) receives several
            base = base.index_copy(0, targets, values)
        out = base[:-1].reshape(B, T, width)
        unreached = (code != _SUCCESS)[:, None] & (torch.arange(T, device=u0.device)[None, :] >= pointer[:, None])
        out = torch.where(unreached[..., None], torch.full_like(out, math.nan), out)
        return out.reshape((B, T) + tuple(u0.shape[1:])).transpose(0, 1)


class BatchSolution(Solution):
    """A :class:`Solution` whose samples have their own saved times: ``t`` is ``(T, B)``, ``u`` is ``(T, B, ...)``."""

    def __repr__(self) -> str:
        solver = f"{type(self.solver).__name__}(), " if self.solver is not None else ""
        rows, batch = self.t.shape
        return (f"BatchSolution({solver}retcode={self.retcode.name}, t: {rows} times for each of {batch} "
                f"samples, u: {tuple(self.u.shape)} {str(self.u.dtype).replace('torch.', '')}, "
                f"nf={self.stats.nf}, naccept={self.stats.naccept}, nreject={self.stats.nreject})")


# --- joint stepping with per-sample saved times ------------------------------------------------

def _dense_at_batch_times(dense, u0: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """``(B, T, F)`` values of a joint solve's dense output, sample ``b`` at ``times[b]``.

    The queries are grouped by the step that holds them (one pass per step
    with queries; each step's interpolant evaluated for its queries' samples
    at their own ``theta``, vectorised); a time past the end of a solve that
    stopped early is NaN.
    """
    B, T = times.shape
    width = u0[0].numel() if B else 0
    host = times.detach().cpu().numpy().astype(np.float64).reshape(-1)
    sample = np.repeat(np.arange(B), T)
    out_rows: list[torch.Tensor] = []
    order_parts: list[np.ndarray] = []
    n = len(dense.pieces)
    direction = dense.direction
    beyond = direction * host > direction * dense.t_end
    if n == 0:
        values = u0.reshape(B, 1, width).expand(B, T, width).reshape(B * T, width)
        return torch.where(torch.as_tensor(beyond, device=u0.device)[:, None],
                           torch.full_like(values, math.nan), values).reshape(B, T, width)
    starts, ends = np.asarray(dense.starts), np.asarray(dense.ends)
    step = np.clip(np.searchsorted(direction * ends, direction * host, side="left"), 0, n - 1)
    lengths = ends[step] - starts[step]
    theta = np.clip(np.where(lengths != 0, (host - starts[step]) / np.where(lengths != 0, lengths, 1.0), 1.0),
                    0.0, 1.0)
    order = np.argsort(step, kind="stable")
    constants: dict = {}
    bounds = np.flatnonzero(np.diff(step[order])) + 1
    for rows in np.split(order, bounds):
        piece = dense.pieces[step[rows[0]]]
        index = torch.as_tensor(sample[rows], device=u0.device)
        thetas = torch.as_tensor(theta[rows], dtype=u0.dtype, device=u0.device)
        if isinstance(piece, StageInterpolant) and not isinstance(piece.dt, torch.Tensor):
            if piece.tableau not in constants:
                constants[piece.tableau] = _TableauConstants(piece.tableau, torch.float64, u0.dtype, u0.device)
            weights = constants[piece.tableau].dense_weights(thetas) * piece.dt  # (M, s)
            stacked = torch.stack([k.reshape(B, -1).index_select(0, index) for k in piece.stages], dim=1)
            values = torch.baddbmm(piece.u.reshape(B, 1, -1).index_select(0, index), weights[:, None, :],
                                   stacked).squeeze(1)
        else:  # another interpolant: evaluate it for the whole batch at each theta, keep each query's sample
            full = piece.evaluate(theta[rows].tolist()).reshape(len(rows), B, -1)
            values = full[torch.arange(len(rows), device=u0.device), index]
        out_rows.append(values)
        order_parts.append(rows)
    values = torch.cat(out_rows)
    inverse = np.empty(B * T, dtype=np.int64)
    inverse[np.concatenate(order_parts)] = np.arange(B * T)
    values = values.index_select(0, torch.as_tensor(inverse, device=u0.device))
    if beyond.any():
        values = torch.where(torch.as_tensor(beyond, device=u0.device)[:, None], torch.full_like(values, math.nan),
                             values)
    return values.reshape(B, T, width)


def _joint(prob, solver, sensealg, times, keywords):
    """Joint stepping, each sample saved at its own ``times``: dense output or the union of the times."""
    from .integrate import integrate
    t0, t1 = prob.tspan
    B, T = times.shape
    u0 = prob.u0
    width = u0[0].numel() if B else 0
    differentiable = sensealg is None or sensealg.differentiates_solver
    from .sde import SDEProblem
    if differentiable and not solver.steps_onto_saveat and not isinstance(prob, SDEProblem):
        options = make_options(solver, u0, t0, t1, time_dtype=prob.time_dtype, saveat=None, save_everystep=False,
                               save_start=False, save_end=True, dense=True, **keywords)
        sol = (integrate(prob.term.bind(prob.p), u0, t0, t1, solver, options) if sensealg is None
               else sensealg.solve_with(prob, solver, options))
        values = _dense_at_batch_times(sol._dense, u0, times)
    else:
        direction = 1.0 if t1 >= t0 else -1.0
        host = times.detach().cpu().numpy().astype(np.float64)
        union = sorted(set(host.reshape(-1).tolist()), key=lambda x: direction * x)
        options = make_options(solver, u0, t0, t1, time_dtype=prob.time_dtype, saveat=union, dense=False,
                               **keywords)
        sol = (integrate(prob.term.bind(prob.p), u0, t0, t1, solver, options) if sensealg is None
               else sensealg.solve_with(prob, solver, options))
        saved = sol.t.detach().cpu().numpy().astype(np.float64)
        position = np.searchsorted(direction * saved, direction * host.reshape(-1))
        found = (position < len(saved)) & (saved[np.minimum(position, len(saved) - 1)] == host.reshape(-1))
        rows = torch.as_tensor(np.minimum(position, max(len(saved) - 1, 0)), device=u0.device)
        flat = sol.u.reshape(sol.u.shape[0], B, width)
        values = flat[rows, torch.arange(B, device=u0.device).repeat_interleave(T)]
        values = torch.where(torch.as_tensor(~found, device=u0.device)[:, None], torch.full_like(values, math.nan),
                             values).reshape(B, T, width)
    u = values.reshape((B, T) + tuple(u0.shape[1:])).transpose(0, 1)
    out = BatchSolution(times.transpose(0, 1), u, sol.retcode, sol.stats, message=sol.message, solver=solver, u0=u0)
    out.backward_stats = sol.backward_stats
    out.final_state = sol.final_state
    return out


# --- the entry from solve() ---------------------------------------------------------------------

_REFUSED_PER_SAMPLE = {
    "tstops": "stop times", "callback": "termination callbacks", "save_stats": "per-step internals (save_stats)",
}


def _check_per_sample_inputs(prob, solver, sensealg, dense, save_everystep, refused) -> None:
    from .sde import SDEProblem
    if isinstance(prob, SDEProblem):
        raise NotImplementedError("solve: batch='per-sample' solves ODEs only; solve an SDEProblem with the joint "
                                  "step (batch='joint', the default)")
    if not isinstance(solver, ExplicitRungeKutta) or solver.tableau.dense is None:
        raise NotImplementedError(f"solve: batch='per-sample' steps explicit Runge–Kutta methods with a dense "
                                  f"output (Tsit5(), DP5(), BS3(), Heun(), Midpoint(), Euler(), RK4()), got "
                                  f"{type(solver).__name__}(); use it with batch='joint'")
    if sensealg is not None and not sensealg.differentiates_solver and per_sample_adjoint(sensealg) is None:
        raise NotImplementedError(
            f"solve: {type(sensealg).__name__} does not support batch='per-sample' (its backward pass re-solves "
            "the whole batch jointly, with one time per solve). Use sensealg=DirectAdjoint() (backpropagation "
            "through the per-sample loop), BacksolveAdjoint(), InterpolatingAdjoint(), QuadratureAdjoint() or "
            "ReversibleAdjoint() (per-sample backward passes), or keep the joint "
            "step (batch='joint') with a (B, T) saveat, which works under every sensealg, "
            f"{type(sensealg).__name__}() included")
    if dense:
        raise NotImplementedError("solve: dense=True (sol(t)) is not available with batch='per-sample' (every "
                                  "sample has its own steps); pass the times you need as a (B, T) saveat")
    if save_everystep:
        raise NotImplementedError("solve: save_everystep=True is not available with batch='per-sample' (every "
                                  "sample takes its own number of steps); pass the times as a (B, T) saveat")
    for name, value in refused.items():
        if value not in (None, False, ()):
            raise NotImplementedError(f"solve: {_REFUSED_PER_SAMPLE[name]} ({name}=...) are not supported with "
                                      "batch='per-sample' yet; use batch='joint'")


def solve_batched(prob, solver, sensealg, *, batch: str, saveat, saveat_mask, save_start, save_end,
                  save_everystep, dense, tstops, callback, save_stats, throw, dtmin, dtmax, **keywords) -> Solution:
    """``solve`` for batches with per-sample times (called by :func:`~pylux.diffeq.solve`; see this module).

    Args:
        prob, solver, sensealg: as for ``solve`` (``prob.u0`` of shape ``(B, ...)``).
        batch: ``"joint"`` or ``"per-sample"``.
        saveat: ``None``, a ``(B, T)`` tensor (each sample's own times), or 1-D
            times shared by every sample.
        saveat_mask: ``None`` or a ``(B, T)`` bool tensor, True where a time is to be saved.
        save_start, save_end: add a first column ``t0`` / last column ``t1``
            (default: only without ``saveat``).
        the rest: ``solve``'s keywords.

    Returns:
        a :class:`Solution` with ``t`` of shape ``(T, B)`` and ``u`` of shape
        ``(T, B, ...)``; under per-sample stepping ``sol.stats`` is a
        :class:`PerSampleStats` (every sample's counters and return code).
    """
    u0 = prob.u0
    if u0.dim() == 0:
        raise ValueError("solve: per-sample times need a batched u0 of shape (B, ...) (the leading axis indexes "
                         "the samples), got a 0-d u0")
    B = u0.shape[0]
    _refuse_events(callback)
    for name, value in (("save_start", save_start), ("save_end", save_end)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"solve: {name} must be True or False, got {value!r}")
    if save_start is None:
        save_start = saveat is None
    if save_end is None:
        save_end = saveat is None
    if B == 0:
        raise ValueError("solve: per-sample times (a (B, T) saveat, a saveat_mask, per-sample tspans or "
                         f"batch='per-sample') got an empty batch (u0 of shape {tuple(prob.u0.shape)}): there is "
                         "no sample to step or save; skip the solve for an empty batch")
    t0, t1 = _spans(prob, B)
    times, _ = _batch_times(saveat, saveat_mask, t0, t1, prob.time_dtype, save_start, save_end)
    common = dict(keywords, throw=throw)
    if batch == "joint":
        if isinstance(prob.tspan[0], torch.Tensor):
            raise ValueError("solve: the problem gives every sample its own tspan, which joint stepping (one time "
                             "for the whole batch) cannot follow; pass batch='per-sample'")
        if dense or save_everystep:
            raise ValueError("solve: dense and save_everystep do not combine with a per-sample (B, T) saveat; "
                             "the solve returns each sample at its own times")
        return _joint(prob, solver, sensealg, times, dict(common, tstops=tstops, callback=callback,
                                                           save_stats=save_stats, dtmin=dtmin, dtmax=dtmax))
    _check_per_sample_inputs(prob, solver, sensealg, dense, save_everystep,
                             {"tstops": tstops, "callback": callback, "save_stats": save_stats})
    options = make_options(solver, u0, 0.0, 1.0, time_dtype=prob.time_dtype, saveat=None, save_everystep=False,
                           save_start=False, save_end=False, dense=False, dtmin=None, dtmax=None, **common)
    _limits(dtmin, dtmax, t0, t1, prob.time_dtype)  # bad limits raise before any work
    run = PerSampleRun(solver, options, times, t0, t1, dtmin, dtmax, prob.time_dtype, throw)
    adjoint = per_sample_adjoint(sensealg) if sensealg is not None and not sensealg.differentiates_solver else None
    if adjoint is not None:
        return adjoint(sensealg, prob, run)
    return run.solve(prob.term.bind(prob.p), u0)


@dataclass
class PerSampleRun:
    """One per-sample solve's settings apart from the field and ``u0``: what a per-sample adjoint re-uses.

    Attributes:
        solver, options: the explicit Runge–Kutta method and the solve's options.
        times: ``(B, T)`` saved times (masked entries forward-filled).
        t0, t1: ``(B,)`` spans.
        dtmin, dtmax: the user's limits (None: per-sample defaults from each span, see :func:`_limits`).
        time_dtype: dtype of the times; throw: raise on a failed sample.
    """

    solver: ExplicitRungeKutta
    options: object
    times: torch.Tensor
    t0: torch.Tensor
    t1: torch.Tensor
    dtmin: float | None
    dtmax: float | None
    time_dtype: torch.dtype
    throw: bool

    @property
    def check_resolution(self) -> bool:
        # t + dt == t can only happen when dtmin was lowered below the time resolution, or with a fixed dt
        return self.dtmin is not None or not self.options.adaptive

    def loop(self, field, u0, t0, t1, times, options=None, loop_class=None):
        """A :class:`PerSampleLoop` (or ``loop_class``) over the spans ``(t0, t1)`` saving at ``times``."""
        limits = _limits(self.dtmin, self.dtmax, t0, t1, self.time_dtype)
        return (loop_class or PerSampleLoop)(field, self.solver, u0, t0, t1, options or self.options, times, limits,
                                             check_resolution=self.check_resolution)

    def solve(self, term, u0) -> Solution:
        """The per-sample solve of the bound ``term`` from ``u0`` (differentiable by backpropagation)."""
        return self.solve_with_loop(term, u0)[0]

    def solve_with_loop(self, term, u0, loop_class=None):
        """``(solution, loop)``: :meth:`solve` by a :class:`PerSampleLoop` subclass, returned for its records."""
        field = CountingField(term, u0)
        loop = self.loop(field, u0, self.t0, self.t1, self.times, loop_class=loop_class)
        u_saved = loop.run()
        return _per_sample_solution(loop, field, self.solver, self.times, u_saved, self.options, self.throw), loop


# sensitivity algorithms with their own per-sample backward pass: {class: solve(sensealg, prob, run)}
_PER_SAMPLE_ADJOINTS: dict = {}


def register_per_sample_adjoint(kind: type, solve) -> None:
    """Let ``batch="per-sample"`` run under the sensealg class ``kind`` (and its subclasses, unless they
    register their own): ``solve(sensealg, prob, run)`` gets a :class:`PerSampleRun` and returns the
    solution. The registry keeps the dependency one way: the adjoints live above this package."""
    _PER_SAMPLE_ADJOINTS[kind] = solve


def per_sample_adjoint(sensealg):
    """The registered per-sample solve for ``sensealg``'s class (nearest in its MRO), or None."""
    for kind in type(sensealg).__mro__:
        if kind in _PER_SAMPLE_ADJOINTS:
            return _PER_SAMPLE_ADJOINTS[kind]
    return None


def _refuse_events(callback) -> None:
    """Event callbacks cut the joint steps and change states at their own times; neither the dense-output
    gather of a (B, T) saveat nor the per-sample loop follows that (yet)."""
    items = callback if isinstance(callback, (list, tuple)) else ([] if callback is None else [callback])
    found = [type(cb).__name__ for cb in items if isinstance(cb, AbstractEventCallback)]
    if found:
        raise NotImplementedError(
            f"solve: event callbacks ({', '.join(found)}) are not supported with per-sample times (a (B, T) "
            "saveat, a saveat_mask, a per-sample tspan or batch='per-sample'). Events work with the joint step "
            "and a 1-D saveat, each sample's events at its own times: save at the union of the samples' times "
            "and pick each sample's rows, or solve the samples one by one")


def _limits(dtmin, dtmax, t0, t1, time_dtype):
    """Per-sample ``dtmin`` and ``dtmax`` (defaults as the joint loop's, from each sample's own span)."""
    span = (t1 - t0).abs()
    if dtmax is None:
        dtmax_v = torch.where(span > 0, span, torch.full_like(span, math.inf))
    else:
        dtmax_v = torch.full_like(span, float(dtmax))
    if dtmin is None:
        # the time resolution at each t is a floor of its own (PerSampleLoop.floor)
        dtmin_v = torch.where(span > 0, default_dtmin(span, time_dtype), torch.zeros_like(span))
    else:
        dtmin_v = torch.full_like(span, float(dtmin))
        if bool((dtmin_v > dtmax_v).any()):
            raise ValueError(f"solve: dtmin = {dtmin!r} exceeds dtmax of some sample ({dtmax!r} or its span)")
    return dtmin_v, dtmax_v


def _per_sample_solution(loop, field, solver, times, u_saved, options, throw) -> Solution:
    u_final, t_final, dt_final, code, naccept, nreject, nfe = loop.result
    codes = code.tolist()
    retcodes = tuple(_RETCODE_OF[c] for c in codes)
    stats = PerSampleStats(nf=field.count, naccept=int(naccept.sum()), nreject=int(nreject.sum()),
                           nf_per_sample=nfe, naccept_per_sample=naccept, nreject_per_sample=nreject,
                           retcode_per_sample=retcodes, t_per_sample=t_final)
    failed = [b for b, c in enumerate(codes) if c != _SUCCESS]
    retcode = retcodes[failed[0]] if failed else ReturnCode.Success
    if failed:
        b = failed[0]
        listed = ", ".join(str(x) for x in failed[:8]) + (", ..." if len(failed) > 8 else "")
        detail = f"maxiters = {options.maxiters} reached; " if retcode == ReturnCode.MaxIters else ""
        message = (f"solve (batch='per-sample') stopped with retcode {retcode.name} for sample(s) {listed} "
                   f"of {len(codes)}; sample {b} at t = {float(t_final[b])!r}, dt = {float(dt_final[b])!r}, after "
                   f"{int(naccept[b]) + int(nreject[b])} steps ({int(naccept[b])} accepted, {int(nreject[b])} "
                   f"rejected): {detail}Meaning: {retcode.message}. The values at times a failed sample did not "
                   "reach are NaN; sol.stats.retcode_per_sample has every sample's code.")
    else:
        message = retcode.message
    t_out = times.transpose(0, 1) if times is not None else None
    sol = BatchSolution(t_out, u_saved, retcode, stats, message=message, solver=solver, u0=loop.u0)
    sol.final_state = (u_final, None)
    if failed and throw:
        raise ERROR_FOR_RETCODE[retcode](message + " Pass throw=False to get the partial solution instead of this "
                                         "error (it is also attached to this exception as .solution).",
                                         solution=sol, t=float(t_final[failed[0]]), dt=float(dt_final[failed[0]]))
    return sol

