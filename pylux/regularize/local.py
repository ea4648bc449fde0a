"""Local error regularization at one sampled time (Pal, Edelman, Rackauckas, ICML 2023).

Instead of summing the error estimates of every step (ERNODE, which needs
backpropagation through the solver), sample one time :math:`t_r`, take the
state there from the forward solve, run ONE step of the same solver from it
and penalise that step's error estimate. The main solve may use any
sensitivity algorithm; the gradient of the regularizer flows through that one
step only, so it costs a handful of evaluations and no extra adjoint work.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.keywords import check_keywords
from ..diffeq.norms import scaled_error_norm
from ..diffeq.solvers import AbstractAdaptiveSolver
from .base import AbstractRegularizer, RegularizationContext, differentiates_solver

__all__ = ["LocalErrorRegularization"]

_SAMPLINGS = ("unbiased", "biased")


class LocalErrorRegularization(AbstractRegularizer):
    r"""Local error-estimate regularization :math:`R = E_r\,|\Delta t_r|` at one sampled time.

    .. math::  R = \Bigl\lVert \frac{\mathrm{err}(z(t_r), \Delta t_r)}
               {\mathrm{abstol} + \mathrm{reltol}\,\max(|z(t_r)|, |z_{\mathrm{new}}|)}\Bigr\rVert
               \,|\Delta t_r|

    where :math:`\mathrm{err}` is the embedded error estimate of one step of
    the layer's solver of size :math:`\Delta t_r` from :math:`z(t_r)`, measured
    with the solve's norm and tolerances (Pal, Edelman & Rackauckas, ICML 2023,
    Algorithms 1 and 2).

    Sampling of :math:`t_r`:

    * ``"unbiased"``: uniform in the solved span. The state comes from the
      forward solve (the layer saves it at :math:`t_r`); :math:`\Delta t_r` is
      the size of the accepted step containing :math:`t_r` (every pylux
      sensealg records the forward solve's accepted steps, so the value does
      not depend on the gradient method); for a sensealg that records no
      steps, the mean accepted step :math:`(t_1 - t_0)/N_{\mathrm{accept}}`.
      Either way the step is shortened to end at :math:`t_1` when it would
      leave the span (an SDE's Brownian path or a CDE's control ends there).
    * ``"biased"``: uniformly among the solver's own accepted step start times
      :math:`t_j`, with :math:`\Delta t_r` that step's size. This is biased
      towards where the solver steps densely, i.e. where it is hardest. Under
      an adjoint sensealg the layer saves every step to know the :math:`t_j`
      (so the backward pass restarts at each saved time).

    What is differentiated: with ``sensealg=None`` or DirectAdjoint,
    :math:`z(t_r)` is the forward dense output, differentiable with respect to
    the parameters, so the gradient includes how the parameters move the state
    at :math:`t_r`. With an adjoint sensealg the forward value :math:`z(t_r)` is
    detached and only the step's own dependence on the parameters (the stages
    :math:`f_\theta` evaluated from the fixed :math:`z(t_r)`) is
    differentiated, as in the paper. :math:`t_r` and :math:`\Delta t_r` are
    constants either way.

    Args:
        sampling: ``"unbiased"`` or ``"biased"``.
        generator: a ``torch.Generator`` to draw :math:`t_r` from; default the
            layer's per-call generator (derived from its state key, so the same
            ``st`` gives the same draw).
        t_reg: a fixed :math:`t_r` instead of a random one (tests, ablations).
        dt: a fixed :math:`\Delta t_r` (magnitude; the sign follows the span).

    Raises:
        ValueError: an unknown ``sampling``; ``t_reg`` with biased sampling;
            ``t_reg`` outside the span; a non-positive ``dt``.
        TypeError: ``generator`` not a ``torch.Generator``; an unknown keyword (named,
            with the closest known one).
        NotImplementedError: (after the solve) a solver without an error estimate.
    """

    def __init__(self, sampling: str = "unbiased", generator: torch.Generator | None = None, *,
                 t_reg: float | None = None, dt: float | None = None, **unknown: Any) -> None:
        check_keywords(unknown, "LocalErrorRegularization", ("sampling", "generator", "t_reg", "dt"))
        if sampling not in _SAMPLINGS:
            raise ValueError(f"LocalErrorRegularization: sampling must be one of {_SAMPLINGS}, got "
                             f"{sampling!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"LocalErrorRegularization: generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        if t_reg is not None:
            if sampling == "biased":
                raise ValueError("LocalErrorRegularization: a fixed t_reg is an unbiased-sampling option; "
                                 "biased sampling picks one of the solver's own time points")
            t_reg = float(t_reg)
            if not math.isfinite(t_reg):
                raise ValueError(f"LocalErrorRegularization: t_reg must be finite, got {t_reg!r}")
        if dt is not None:
            dt = float(dt)
            if not (dt > 0 and math.isfinite(dt)):
                raise ValueError(f"LocalErrorRegularization: dt must be finite and > 0, got {dt!r}")
        self.sampling = sampling
        self.generator = generator
        self.t_reg = t_reg
        self.dt = dt

    def check_span(self, t0: float, t1: float) -> None:
        if self.t_reg is not None and not min(t0, t1) <= self.t_reg <= max(t0, t1):
            raise ValueError(f"LocalErrorRegularization: t_reg = {self.t_reg!r} is outside tspan = "
                             f"({t0!r}, {t1!r})")

    def solve_kwargs(self, sensealg) -> dict:
        if differentiates_solver(sensealg):
            # step times from the stats; a biased sample's state from the dense output (an unbiased
            # one is saved at its pre-drawn time)
            return {"save_stats": True, "dense": True} if self.sampling == "biased" else {"save_stats": True}
        if self.sampling == "biased":
            return {"save_everystep": True}
        return {}

    def _uniform(self, generator: torch.Generator) -> float:
        g = self.generator if self.generator is not None else generator
        # one host read per solve, never inside the step loop
        return float(torch.rand((), generator=g, dtype=torch.float64, device=g.device))

    def begin(self, z0: torch.Tensor, t0: float, t1: float, generator: torch.Generator) -> Any:
        if self.t_reg is not None:
            return {"t": self.t_reg}
        u = self._uniform(generator)
        if self.sampling == "unbiased":
            return {"t": t0 + u * (t1 - t0)}
        return {"u": u}

    def save_times(self, data: Any) -> tuple[float, ...]:
        return (data["t"],) if "t" in data else ()

    def sample_step(self, ctx: RegularizationContext, data: Any) -> tuple[float, float, torch.Tensor]:
        """``(t_r, dt_r, z(t_r))`` for this solve: where the regularized step starts, its signed size, the state.

        ``z(t_r)`` is detached unless the solve is differentiated directly (see the class docstring).
        """
        stats = ctx.solution.stats
        direct = differentiates_solver(ctx.sensealg)
        if "t" in data:
            t_reg = data["t"]
            z = ctx.state_at(t_reg)
            if not direct:
                z = z.detach()
            if self.dt is not None:
                dt = math.copysign(self.dt, ctx.t1 - ctx.t0)
            elif stats.t is not None and stats.naccept > 0:
                starts = stats.t.detach().cpu()
                j = int(torch.searchsorted(starts, torch.tensor([t_reg], dtype=starts.dtype), right=True)[0]) - 1
                if ctx.t1 < ctx.t0:  # backward in time the starts decrease
                    j = int((starts >= t_reg).sum()) - 1
                dt = float(stats.dt[min(max(j, 0), stats.naccept - 1)])
            else:
                # the sensealg recorded no steps: the mean accepted step of the forward solve
                dt = (ctx.t1 - ctx.t0) / stats.naccept
            # the step from t_r ends inside the solved span: past t1 an SDE's Brownian path, or a
            # control, may not exist, and the accepted steps never went there either
            room = ctx.t1 - t_reg
            if abs(dt) > abs(room):
                dt = room
            return t_reg, dt, z
        if direct and stats.t is not None:  # the dense output gives the state at any step start
            starts, sizes = stats.t, stats.dt
            n = stats.naccept
            j = min(int(data["u"] * n), n - 1)
            t_reg, dt = float(starts[j]), float(sizes[j])
            z = ctx.state_at(t_reg)
            if not direct:
                z = z.detach()
        else:
            times = ctx.solution.t
            n = times.shape[0] - 1
            j = min(int(data["u"] * n), n - 1)
            t_reg, dt = float(times[j]), float(times[j + 1] - times[j])
            z = ctx.trajectory[j].detach()
        if self.dt is not None:
            dt = math.copysign(self.dt, dt)
        return t_reg, dt, z

    def value(self, ctx: RegularizationContext, data: Any) -> torch.Tensor:
        solver = ctx.solver
        if not isinstance(solver, AbstractAdaptiveSolver):
            raise NotImplementedError(f"LocalErrorRegularization: {type(solver).__name__}() has no embedded "
                                      "error estimate; use an adaptive pair such as Tsit5(), DP5() or BS3()")
        if ctx.t0 == ctx.t1 or ctx.solution.stats.naccept == 0:
            return ctx.z0.new_zeros(())
        t_reg, dt, z = self.sample_step(ctx, data)
        if dt == 0:  # a fixed t_reg at t1 leaves no step inside the span
            return ctx.z0.new_zeros(())
        state = solver.init(ctx.field, t_reg, z, dt)
        result = solver.step(ctx.field, t_reg, z, dt, state)
        opts = ctx.options
        error = scaled_error_norm(result.error_estimate, z, result.u_new, opts.abstol, opts.reltol, opts.norm)
        return error * abs(dt)

    def __repr__(self) -> str:
        extra = "" if self.t_reg is None else f", t_reg={self.t_reg!r}"
        extra += "" if self.dt is None else f", dt={self.dt!r}"
        return f"LocalErrorRegularization(sampling={self.sampling!r}{extra})"
