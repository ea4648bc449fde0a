"""Continuous adjoints: Backsolve, Interpolating (optionally checkpointed) and Quadrature.

For a loss :math:`L` on the saved states :math:`u(t_k)` of
:math:`\\dot z = f(z, \\theta, t)`, the adjoint :math:`a_z(t) = \\partial L/\\partial z(t)`
solves, backwards from the last saved time,

.. math::
    \\dot a_z = -a_z^\\top \\partial_z f(z(t), \\theta, t), \\qquad
    a_z(t_N) = \\partial L/\\partial u(t_N),

jumping by :math:`\\partial L/\\partial u(t_k)` at every earlier save time, and

.. math::
    \\frac{\\partial L}{\\partial u_0} = a_z(t_0), \\qquad
    \\frac{\\partial L}{\\partial \\theta} = \\int_{t_0}^{t_N} a_z^\\top \\partial_\\theta f \\, dt

(Pontryagin; Chen, Rubanova, Bettencourt & Duvenaud, NeurIPS 2018). The three
algorithms differ in where :math:`z(t)` comes from and how the parameter
integral is computed — the SciMLSensitivity.jl taxonomy:

========================  =====================================  ==========================================
algorithm                 ``z(t)`` on the backward pass          ``dL/dθ``
========================  =====================================  ==========================================
``BacksolveAdjoint``      re-integrated backwards with ``a_z``   ``ȧ_θ = -a_zᵀ ∂_θ f``, integrated alongside
``InterpolatingAdjoint``  forward dense output (or re-solved     the same
                          from checkpoints)
``QuadratureAdjoint``     forward dense output                   Gauss–Legendre quadrature over the
                                                                 backward solve's own steps
========================  =====================================  ==========================================

Vector–Jacobian products come from torch autograd, one per stage evaluation of
the backward solve, for the whole batch and every parameter tensor at once.

Under ``solve(..., compile=True)`` all three run their forward solve and every
backward solve compiled (:mod:`pylux.diffeq.compiled`; the whole adaptive loop
as one graph where :mod:`pylux.diffeq.captured` allows: Backsolve forward and
backward, Interpolating backward), the augmented field's vector–Jacobian
products traced with ``torch.func.vjp`` and ``z(t)`` read from the forward
dense output stacked into tensors (a copy of every forward step's stages:
meant for small states); the gradient is the eager one to round-off. A
compiled forward solve of ``BacksolveAdjoint`` records no step sizes, so
:class:`~pylux.regularize.LocalErrorRegularization` samples its step from the
mean accepted step.

Caveats shared by all three: the gradient is first order only (a
``create_graph=True`` backward raises), and when a termination callback stops
the solve, the stopping time is treated as a constant (as under
``DirectAdjoint``: no gradient flows through where the solve stopped).
"""

from __future__ import annotations

import bisect
import math
from typing import Sequence

import numpy as np
import torch

from ..core import tree_replace_at_paths
from ..diffeq import (AbstractSensitivityAlgorithm, MixedNorm, ODEProblem, ODETerm, SemiNorm, Solution, integrate,
                      rms_norm)
from ..diffeq._device import host_time
from ..diffeq.options import SolveOptions, _round_time
from ..diffeq.sde import SDEProblem
from .stochastic import stochastic_backsolve
from ._params import (BackwardStats, apply_adjoint_function, check_no_hidden_parameters, refuse_higher_order)

__all__ = ["BacksolveAdjoint", "InterpolatingAdjoint", "QuadratureAdjoint", "BackwardStats"]


def _bound_field(problem: ODEProblem, paths, params):
    p = tree_replace_at_paths(problem.p, paths, params) if paths else problem.p
    return problem.term.bind(p)


class _ContinuousAdjoint(AbstractSensitivityAlgorithm):
    """Shared machinery; subclasses choose where ``z(t)`` comes from and how ``dL/dθ`` is formed."""

    compiles_backward = True

    #: the backward pass reads z(t) from a forward dense output (else re-integrates z).
    _interpolates = False
    #: dL/dθ by quadrature after the a_z solve (else integrated as extra channels).
    _quadrature = False

    def __init__(self, *, seminorm: bool = False, reltol: float | None = None,
                 abstol: float | None = None) -> None:
        if not isinstance(seminorm, bool):
            raise TypeError(f"{type(self).__name__}: seminorm must be True or False, got {seminorm!r}")
        for name, value in (("reltol", reltol), ("abstol", abstol)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value > 0 or not math.isfinite(value)):
                raise ValueError(f"{type(self).__name__}: {name} must be a finite number > 0 or None "
                                 f"(= the forward solve's), got {value!r}")
        self.seminorm = seminorm
        self.reltol = reltol
        self.abstol = abstol

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seminorm={self.seminorm})"

    def _checkpoints(self, t0: float, t1: float) -> tuple[float, ...] | None:
        """Interior times whose forward states are stored for re-solving; None = no checkpointing."""
        return None

    def solve_with(self, problem: ODEProblem, solver, options: SolveOptions) -> Solution:
        if isinstance(problem, SDEProblem):
            return stochastic_backsolve(self, problem, solver, options)
        if torch.is_tensor(options.abstol):
            raise NotImplementedError(
                f"{type(self).__name__}: a tensor abstol is not supported by the continuous adjoints "
                "(the backward state has other channels than u); pass a float abstol, or use "
                "DirectAdjoint() or ReversibleAdjoint()")
        if options.save_stats:
            raise NotImplementedError(
                f"{type(self).__name__}: save_stats=True records differentiable per-step error "
                "estimates, which only DirectAdjoint() can differentiate; use DirectAdjoint() (the "
                "global error/stiffness regularizers need it) or LocalErrorRegularization, which "
                "works with every sensealg")
        return apply_adjoint_function(_AdjointFunction, self, problem, solver, options)


class BacksolveAdjoint(_ContinuousAdjoint):
    """Chen et al.'s adjoint: re-integrate ``[z, a_z, a_θ]`` backwards (see the module docstring).

    The backward error norm: with the default (RMS) norm of the forward solve,
    each channel group ``z``, ``a_z``, ``a_θ`` is measured by its own RMS and
    the largest counts (:class:`~pylux.diffeq.MixedNorm`), so the many
    parameter channels cannot dilute the state's error; a custom forward
    ``norm`` is used as given.

    Args:
        seminorm: leave the parameter-adjoint channels ``a_θ`` out of the
            backward error norm (Kidger, Chen & Lyons, ICML 2021): they never
            feed back into the other channels, so their error cannot grow, and
            the backward pass takes fewer steps (the paper: a median 40% fewer).
        reltol, abstol: tolerances of the backward solve (default: the forward ones).

    Memory is independent of the number of steps. The price: ``z`` is
    re-integrated backwards and its error is not controlled against the
    forward trajectory, so gradients are accurate only to the solver tolerance,
    and poorly where the backward dynamics are unstable (then prefer
    :class:`InterpolatingAdjoint` or :class:`~pylux.sensitivity.ReversibleAdjoint`).
    A stiff problem is the extreme case: a fast mode decaying like
    ``exp(-lambda t)`` forward grows like ``exp(lambda t)`` in the backward
    re-integration, so the forward error at ``t1`` (about the tolerance) comes
    back multiplied by ``exp(lambda (t1 - t0))``; measured on a relaxation of
    rate 1000 on ``[0, 1]``, the backward solve blows up whatever the solver
    (Kvaerno5 at 1e-10: ``DtLessThanMin``), while at rate 8 the gradient is
    accurate to 1e-7. For stiff problems use :class:`InterpolatingAdjoint` or
    :class:`QuadratureAdjoint` with an implicit solver: their backward system
    ``a_z' = -J^T a_z`` is stiff but stable backward.

    The gradient flows to ``u0`` and to every tensor of the parameter tree
    ``p`` that requires grad. A tensor that requires grad but reaches ``f``
    only through a closure raises :class:`~pylux.sensitivity.HiddenParameterError`
    instead of silently getting a zero gradient. The backward counters are in
    the solve's ``sol.backward_stats`` (a :class:`BackwardStats`) after ``backward()``.

    On an :class:`~pylux.diffeq.SDEProblem` it is the stochastic adjoint of
    Li et al. (2020), solved backward on the solve's own Brownian path (see
    :mod:`pylux.sensitivity.stochastic` for its accuracy).

    Raises:
        NotImplementedError: with a tensor ``abstol`` or ``save_stats=True``
            (both need :class:`DirectAdjoint`).
    """

    handles_sde = True


class InterpolatingAdjoint(_ContinuousAdjoint):
    """The adjoint with ``z(t)`` read from the forward solve instead of re-integrated.

    Integrates ``[a_z, a_θ]`` backward. Without checkpointing, ``z(t)`` comes
    from the forward solve's dense output (the method's own interpolant),
    stored in full: memory grows with the number of forward steps. With
    checkpointing, only the states at the checkpoints are stored, and the
    forward solve is redone from each checkpoint, one interval at a time, as
    the backward pass reaches it (SciMLSensitivity's
    ``InterpolatingAdjoint(checkpointing=true)``): memory is the checkpoints
    plus one interval's dense output, at the cost of a second forward solve.

    Avoiding the backward re-integration of ``z`` makes it the robust choice
    where :class:`BacksolveAdjoint` drifts.

    Caveat on ``seminorm=True`` here: with ``z`` not integrated, only the
    ``a_z`` channels control the step, so the backward pass takes far fewer
    steps but the accuracy of the parameter gradient (the integral carried in
    ``a_θ``) is no longer controlled. Measured on the Kelly et al. MNIST field
    (weights ×3, DP5, tolerance 1e-5, float32): 14 instead of 32 backward
    evaluations, relative gradient error 3.9e-3 instead of 3.2e-4
    (``benchmarks/node_train_step.py``). Prefer it for cheap, rough gradients.

    Args:
        checkpointing: ``False`` (keep the whole dense output); ``True`` (the
            saved times are the checkpoints); an int ``n`` (the saved times plus
            ``n - 1`` equally spaced interior times, i.e. at least ``n``
            intervals); or a sequence of interior times.
        seminorm, reltol, abstol: as for :class:`BacksolveAdjoint`.

    Raises:
        ValueError: a checkpoint outside tspan, or a non-positive count.
    """

    _interpolates = True

    def __init__(self, *, checkpointing: bool | int | Sequence[float] = False, seminorm: bool = False,
                 reltol: float | None = None, abstol: float | None = None) -> None:
        super().__init__(seminorm=seminorm, reltol=reltol, abstol=abstol)
        if isinstance(checkpointing, bool):
            pass
        elif isinstance(checkpointing, int):
            if checkpointing < 1:
                raise ValueError(f"InterpolatingAdjoint: checkpointing=n needs n >= 1 intervals, got "
                                 f"{checkpointing}")
        else:
            try:
                checkpointing = tuple(float(x) for x in checkpointing)
            except (TypeError, ValueError):
                raise TypeError("InterpolatingAdjoint: checkpointing must be True/False, an int or a "
                                f"sequence of times, got {type(checkpointing).__name__}") from None
            if any(not math.isfinite(x) for x in checkpointing):
                raise ValueError(f"InterpolatingAdjoint: checkpoint times must be finite, got "
                                 f"{checkpointing}")
        self.checkpointing = checkpointing

    def __repr__(self) -> str:
        return f"InterpolatingAdjoint(checkpointing={self.checkpointing!r}, seminorm={self.seminorm})"

    def _checkpoints(self, t0, t1):
        spec = self.checkpointing
        if spec is False:
            return None
        if spec is True:
            return ()
        if isinstance(spec, int):
            return tuple(t0 + (t1 - t0) * i / spec for i in range(1, spec))
        lo, hi = min(t0, t1), max(t0, t1)
        outside = [x for x in spec if not lo <= x <= hi]
        if outside:
            raise ValueError(f"InterpolatingAdjoint: checkpoints {outside} lie outside tspan "
                             f"({t0!r}, {t1!r})")
        return tuple(x for x in spec if x != t0 and x != t1)


class QuadratureAdjoint(_ContinuousAdjoint):
    """The adjoint with ``dL/dθ`` computed by quadrature over the stored forward solution.

    Solves only ``a_z`` backward (``z(t)`` from the forward dense output), a
    system of the state's size rather than state plus parameters, so the
    backward error control and every stage evaluation are cheaper (each VJP
    is with respect to ``z`` only). Then, on each step ``[s_j, s_j + h_j]`` of
    that backward solve,

    .. math::
        \\int a_z^\\top \\partial_\\theta f\\, dt \\approx
        h_j \\sum_i w_i\\, a_z(\\tau_i)^\\top \\partial_\\theta f(z(\\tau_i), \\theta, \\tau_i)

    with Gauss–Legendre nodes ``τ_i`` and weights ``w_i`` (``ceil((p + 1) / 2)``
    nodes for a solver of order ``p``, exact for polynomials of degree ``p``),
    ``a_z(τ_i)`` from the backward solve's dense output. The node VJPs of a
    step are formed in one autograd call. SciMLSensitivity's
    ``QuadratureAdjoint``; best when there are many parameters and the
    backward pass takes few steps.

    Args:
        nodes: Gauss–Legendre nodes per backward step (default from the solver's order).
        reltol, abstol: tolerances of the backward solve (default: the forward ones).
    """

    _interpolates = True
    _quadrature = True

    def __init__(self, *, nodes: int | None = None, reltol: float | None = None,
                 abstol: float | None = None) -> None:
        super().__init__(seminorm=False, reltol=reltol, abstol=abstol)
        if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1):
            raise ValueError(f"QuadratureAdjoint: nodes must be a positive int or None, got {nodes!r}")
        self.nodes = nodes

    def __repr__(self) -> str:
        return f"QuadratureAdjoint(nodes={self.nodes!r})"


def _merge_times(saved: Sequence[float], extra: Sequence[float], direction: float) -> list[float]:
    return sorted(set(saved) | set(extra), key=lambda x: direction * x)


class _AdjointFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, alg, problem, solver, options, paths, holder, u0, *params):
        t0, t1 = problem.tspan
        direction = 1.0 if t1 >= t0 else -1.0
        detached = [x.detach() for x in params]
        checkpoints = alg._checkpoints(t0, t1)
        if checkpoints:
            # on the time grid of the solve, so that a checkpoint equal to a saved time is that time
            checkpoints = tuple(x for x in (_round_time(c, options.time_dtype) for c in checkpoints)
                                if x != t0 and x != t1)
        # the accepted steps' t and dt are recorded (host floats, no gradient): regularizers read them; a
        # compiled solve does not record them, so that its whole loop can run as one graph
        forward_options = options.replace(dense=alg._interpolates and checkpoints is None,
                                          save_stats=False, save_steps=checkpoints is not None or not solver.compiled)
        if checkpoints and options.saveat is not None:
            forward_options = forward_options.replace(
                saveat=tuple(_merge_times(options.saveat, checkpoints, direction)))
        elif checkpoints:  # every step is saved anyway: the steps are the checkpoints
            checkpoints = ()
        field = _bound_field(problem, paths, detached)
        with torch.no_grad():
            sol = integrate(field, u0.detach(), t0, t1, solver, forward_options)
        times = sol.t.tolist()
        keep = list(range(len(times)))
        if checkpoints:
            wanted = set(options.saveat) | ({t0} if options.save_start else set())
            keep = [i for i, t in enumerate(times) if t in wanted or (options.save_end and i == len(times) - 1)]
        if len(keep) != len(times):
            index = torch.tensor(keep, device=sol.t.device)
            holder["solution"] = Solution(sol.t[index], sol.u[index], sol.retcode, sol.stats,
                                          message=sol.message, solver=solver)
        else:
            holder["solution"] = sol
        ctx.alg, ctx.problem, ctx.solver, ctx.options, ctx.paths = alg, problem, solver, options, paths
        ctx.times, ctx.keep, ctx.t0 = times, keep, t0
        ctx.dense = sol if forward_options.dense else None
        ctx.checkpointed = checkpoints is not None
        # a re-solve from a checkpoint starts with the step the forward solve took there
        ctx.forward_steps = ((sol.stats.t.tolist(), sol.stats.dt.tolist())
                             if ctx.checkpointed and forward_options.adaptive and sol.stats.naccept else None)
        ctx.backward_stats = holder["backward_stats"]
        states = sol.u.detach() if ctx.checkpointed else sol.u[-1:].detach()
        ctx.save_for_backward(u0.detach(), states, *detached)
        out = holder["solution"].u
        return out.detach().clone() if out is sol.u else out.detach()

    @staticmethod
    def backward(ctx, grad_u):
        refuse_higher_order(type(ctx.alg).__name__)
        u0, states, *params = ctx.saved_tensors
        grads = _Backward(ctx, u0, states, params).run(grad_u)
        return (None, None, None, None, None, None, *grads)


class _Backward:
    """One backward pass: the augmented field, the segment loop and the save-time jumps."""

    def __init__(self, ctx, u0, states, params):
        self.alg, self.problem, self.solver = ctx.alg, ctx.problem, ctx.solver
        self.paths, self.params, self.u0 = ctx.paths, params, u0
        self.times, self.keep, self.t0 = ctx.times, ctx.keep, ctx.t0
        self.dense, self.states, self.checkpointed = ctx.dense, states, ctx.checkpointed
        self.forward_steps = ctx.forward_steps
        self.record = ctx.backward_stats
        self.forward_options = ctx.options
        self.shape, self.n_z = u0.shape, u0.numel()
        self.n_theta = sum(x.numel() for x in params)
        alg = self.alg
        # channel layout of the backward state: [z?] [a_z] [a_θ?]
        self.z_channels = 0 if alg._interpolates else self.n_z
        self.theta_channels = 0 if alg._quadrature else self.n_theta
        self.stats = BackwardStats(nf=0, naccept=0, nreject=0, nvjp=0)
        if alg._interpolates and self.checkpointed:
            self.stats["nf_forward_resolve"] = 0
        if alg._quadrature:
            self.stats["nquadrature"] = 0
        self.segment_dense = None
        self._traced = None  # (dense output, its _TracedDense) of the last compiled segment
        self.checked = False
        self.back_options = self._backward_options()

    def _backward_options(self) -> SolveOptions:
        alg, options = self.alg, self.forward_options
        norm = options.norm
        sizes, measured = [self.z_channels, self.n_z, self.theta_channels], [True, True, not alg.seminorm]
        if norm is rms_norm and any(m and n for n, m in zip(sizes, measured)):
            # each channel group [z, a_z, a_θ] at the tolerance on its own; the seminorm drops a_θ
            norm = MixedNorm(sizes, measured)
        elif alg.seminorm and self.theta_channels:
            mask = torch.zeros(self.z_channels + self.n_z + self.theta_channels, dtype=torch.bool,
                               device=self.u0.device)
            mask[:self.z_channels + self.n_z] = True
            norm = SemiNorm(mask)
        return options.replace(saveat=None, save_everystep=False, save_start=False, save_end=True,
                               dense=alg._quadrature, save_stats=False, norm=norm, callbacks=(),
                               reltol=alg.reltol if alg.reltol is not None else options.reltol,
                               abstol=alg.abstol if alg.abstol is not None else options.abstol)

    def _vjp(self, z, t, a_z, with_params: bool):
        with torch.enable_grad():
            z_ = z.detach().requires_grad_(True)
            ps_ = [x.detach().requires_grad_(True) for x in self.params]
            out = _bound_field(self.problem, self.paths, ps_)(z_, t)
            if not self.checked:
                check_no_hidden_parameters(out, [z_, *ps_], where=f"{type(self.alg).__name__}: f")
                self.checked = True
            wrt = [z_, *ps_] if with_params else [z_]
            if out.requires_grad:
                grads = torch.autograd.grad(out, wrt, grad_outputs=a_z, allow_unused=True)
            else:  # f depends on neither z nor the parameters (e.g. a forcing term of t alone)
                grads = (None,) * len(wrt)
        self.stats["nvjp"] += 1
        return out, grads

    def forward_state(self, t) -> torch.Tensor:
        """``z(t)`` from the forward dense output of the current segment, continued past its ends.

        A stage abscissa may lie past the step's end: Kvaerno5's third stage sits at
        ``t + 1.2303 h``, so the last backward step of a segment evaluates the field
        ``0.23 |h|`` beyond the segment, where the forward solve never went. There ``z`` is
        the end step's own interpolant continued (polynomial extrapolation): a smooth (C^1
        at the end, polynomial beyond) extension of the field, so the stage keeps the
        method's order. Holding ``z`` at its end value instead would give the field a kink
        in ``t`` and that stage an O(h) error; the extension's values only feed stages, never
        the solution at the segment end, which remains a value of the forward trajectory.
        """
        dense = self.segment_dense._dense
        th = host_time(t)
        lo, hi = sorted((dense.t0, dense.t_end))
        if lo <= th <= hi or not dense.pieces:
            return self.segment_dense(t)
        before = dense.direction * (th - dense.t0) < 0
        j = 0 if before else len(dense.pieces) - 1
        start, end = dense.starts[j], dense.ends[j]
        return dense.pieces[j].evaluate([(th - start) / (end - start)])[0]

    def augmented(self, aug, t):
        n_z, zc, shape = self.n_z, self.z_channels, self.shape
        z = self.forward_state(t) if self.alg._interpolates else aug[:n_z].view(shape)
        a_z = aug[zc:zc + n_z].view(shape)
        out, grads = self._vjp(z, t, a_z, with_params=bool(self.theta_channels))
        # each piece written once into the result (negated and cast in the same pass), not negated into
        # copies that a cat then copies again: two passes over the state fewer per evaluation
        result = torch.empty_like(aug)
        if zc:
            result[:zc].copy_(out.reshape(-1).detach())
        _write_negated(result, zc, n_z, grads[0])
        offset = zc + n_z
        if self.theta_channels:
            for g, x in zip(grads[1:], self.params):
                _write_negated(result, offset, x.numel(), g)
                offset += x.numel()
        return result

    def _forward_step_at(self, t: float) -> float | None:
        """|dt| of the forward step that started at or last before ``t`` (None: use the heuristic)."""
        if self.forward_steps is None:
            return self.forward_options.dt
        starts, sizes = self.forward_steps
        direction = 1.0 if sizes[0] > 0 else -1.0
        index = bisect.bisect_right([direction * x for x in starts], direction * t) - 1
        return abs(sizes[max(index, 0)])

    def _forward_dense(self, k: int):
        """The forward solution over [times[k-1], times[k]] (k = 0: [t0, times[0]])."""
        if not self.checkpointed:
            return self.dense
        start_t = self.times[k - 1] if k > 0 else self.t0
        start_u = self.states[k - 1] if k > 0 else self.u0
        end_t = self.times[k]
        options = self.forward_options.replace(saveat=None, save_everystep=False, save_start=False,
                                               save_end=True, dense=True, save_stats=False, callbacks=(),
                                               save_steps=False, dt=self._forward_step_at(start_t))
        with torch.no_grad():
            sol = integrate(_bound_field(self.problem, self.paths, self.params), start_u, start_t, end_t,
                            self.solver, options)
        self.stats["nf_forward_resolve"] += sol.stats.nf
        return sol

    def _traced_dense(self) -> "_TracedDense":
        """The current segment's forward dense output as tensors; built once when every segment shares the
        whole forward solve's (no checkpoints), once per re-solved interval otherwise."""
        source = self.segment_dense._dense
        if self._traced is None or self._traced[0] is not source:
            self._traced = (source, _TracedDense(source, self.solver.base.tableau, self.forward_options.time_dtype))
        return self._traced[1]

    def _integrate_segment(self, aug, t_from: float, t_to: float, k: int):
        if t_from == t_to:
            return aug
        if self.alg._interpolates:
            self.segment_dense = self._forward_dense(k)
        # a forward segment without steps has no dense output to trace: its z(t) is the eager one
        functional = self.solver.compiled and not (self.alg._interpolates and not self.segment_dense._dense.pieces)
        if functional:
            dense = self._traced_dense() if self.alg._interpolates else None
            field = _AugmentedTerm(self.problem.term, self.problem.p, self.paths, self.shape,
                                   bool(self.theta_channels), self, dense).bind(tuple(self.params))
        else:
            field = self.augmented
        nvjp_before = self.stats["nvjp"]
        sol = integrate(field, aug, t_from, t_to, self.solver.for_another_field(), self.back_options)
        for key, value in (("nf", sol.stats.nf), ("naccept", sol.stats.naccept),
                           ("nreject", sol.stats.nreject)):
            self.stats[key] += value
        if functional:  # every evaluation of the augmented term is one VJP, eager or traced
            self.stats["nvjp"] = nvjp_before + sol.stats.nf
        if self.alg._quadrature:
            self._quadrature_over(sol)
        return sol.u[-1]

    def _quadrature_over(self, back_sol: Solution):
        """Add ``∫ a_zᵀ ∂_θ f dt`` over the backward segment to the parameter gradients."""
        if not self.n_theta:
            return
        dense = back_sol._dense
        n_nodes = self.alg.nodes or max(1, math.ceil((self.solver.order + 1) / 2))
        nodes, weights = np.polynomial.legendre.leggauss(n_nodes)
        thetas = [(x + 1) / 2 for x in nodes]
        halves = [w / 2 for w in weights]
        with torch.enable_grad():
            ps_ = [x.detach().requires_grad_(True) for x in self.params]
            field = _bound_field(self.problem, self.paths, ps_)
            total = None
            for start, end, piece in zip(dense.starts, dense.ends, dense.pieces):
                a_nodes = piece.evaluate(thetas).detach()
                h = end - start  # negative when the backward pass runs toward smaller t
                node_times = [start + th * h for th in thetas]
                z_nodes = self.segment_dense(node_times)
                for i, t in enumerate(node_times):
                    out = field(z_nodes[i], z_nodes.new_tensor(t))
                    # the backward step runs from s to s + h; the forward integral's sign is that of -h
                    term = (out * a_nodes[i, self.z_channels:self.z_channels + self.n_z].view(self.shape)).sum()
                    term = term * (-h * halves[i])
                    total = term if total is None else total + term
            self.stats["nquadrature"] += len(dense.pieces) * n_nodes
            if total is None or not total.requires_grad:
                return
            grads = torch.autograd.grad(total, ps_, allow_unused=True)
        self.stats["nvjp"] += 1
        for j, g in enumerate(grads):
            if g is not None:
                self.param_grads[j] += g

    def run(self, grad_u):
        times, keep = self.times, self.keep
        dtype, device = self.u0.dtype, self.u0.device
        # dL/du at every saved time (checkpoint-only rows get none)
        grad_at = [None] * len(times)
        for row, i in enumerate(keep):
            grad_at[i] = grad_u[row]
        self.param_grads = [torch.zeros_like(x) for x in self.params]
        if not times:  # the solve saved nothing: no output depends on u0 or the parameters
            self.record.update(self.stats)
            return [torch.zeros(self.shape, dtype=dtype, device=device), *self.param_grads]
        last = len(times) - 1
        pieces = [self.states[-1].reshape(-1)] if self.z_channels else []
        pieces.append(_flat_or_zero(grad_at[last], self.n_z, dtype, device))
        if self.theta_channels:
            pieces.append(torch.zeros(self.n_theta, dtype=dtype, device=device))
        aug = torch.cat(pieces)
        for k in range(last, 0, -1):
            aug = self._integrate_segment(aug, times[k], times[k - 1], k)
            if grad_at[k - 1] is not None:
                aug = aug.clone()
                aug[self.z_channels:self.z_channels + self.n_z] += grad_at[k - 1].reshape(-1)
        if times and times[0] != self.t0:
            aug = self._integrate_segment(aug, times[0], self.t0, 0)
        self.record.update(self.stats)
        zc, n_z = self.z_channels, self.n_z
        grad_u0 = aug[zc:zc + n_z].view(self.shape)
        offset = zc + n_z
        grads = []
        for j, x in enumerate(self.params):
            if self.theta_channels:
                grads.append(aug[offset:offset + x.numel()].view(x.shape).to(x.dtype))
                offset += x.numel()
            else:
                grads.append(self.param_grads[j])
        return [grad_u0, *grads]


class _AugmentedTerm(ODETerm):
    """The backward field of an adjoint in a form ``torch.compile`` traces (``compile=True``).

    Backsolve (``dense=None``): ``vf([z, a_z, a_θ], params, t) = [f(z), -a_zᵀ ∂_z f, -a_zᵀ ∂_θ f]``;
    interpolating (``dense``, a :class:`_TracedDense` of the forward solve): ``vf([a_z, a_θ], params, t)
    = [-a_zᵀ ∂_z f, -a_zᵀ ∂_θ f]`` at ``z = dense(t)`` (the ``a_θ`` part only when ``with_params``).
    The vector–Jacobian product comes from ``torch.func.vjp`` (``torch.autograd.grad`` breaks a graph).
    The parameters are the bound ``p`` (graph inputs), everything else is fixed per backward pass, so
    one compiled loop serves every backward pass of the same model. The first evaluation, which every
    loop makes eagerly, goes through the eager field (:meth:`_Backward.augmented`): it checks once
    that the parameters are not hidden in a closure.
    """

    def __init__(self, inner, tree, paths, shape, with_params: bool, eager, dense=None) -> None:
        self.inner, self.tree, self.paths = inner, tree, tuple(paths)
        self.shape, self.n_z = tuple(shape), math.prod(shape)
        self.with_params, self.eager, self.dense = with_params, eager, dense
        self.f = self._field

    def _field(self, aug, params, t):
        if not torch.compiler.is_compiling() and not self.eager.checked:
            return self.eager.augmented(aug, t)
        n_z, dense = self.n_z, self.dense
        if dense is None:
            z, a_z = aug[:n_z].view(self.shape), aug[n_z:2 * n_z].view(self.shape)
        else:
            z, a_z = dense(t).view(self.shape), aug[:n_z].view(self.shape)
        inner, tree, paths, with_params = self.inner, self.tree, self.paths, self.with_params

        def f(z, *ps):
            leaves = ps if with_params else params  # QuadratureAdjoint: the parameters enter as constants
            return inner.vf(z, tree_replace_at_paths(tree, paths, leaves) if paths else tree, t)

        wrt = params if with_params else ()
        out, pullback = torch.func.vjp(f, z, *wrt)
        grads = pullback(a_z.to(out.dtype))
        pieces = [out.reshape(-1).to(aug.dtype)] if dense is None else []
        pieces += [-g.reshape(-1).to(aug.dtype) for g in grads]
        return torch.cat(pieces)


class _TracedDense:
    """A forward solve's Runge–Kutta dense output as tensors, evaluated at a 0-d device time in a traced graph.

    ``z(t) = u_j + h_j Σ_i b_i(θ) k_{j,i}``, ``θ = (t - s_j) / h_j``, on the step ``j`` whose end is
    the first not before ``t`` (``searchsorted``); before the first step or past the last, the end
    step's polynomial continued (:meth:`_Backward.forward_state`'s rule). The step count is padded
    to a power of two with copies of the last step, so solves of similar length share a compiled
    graph (each new padded count compiles one more).
    """

    def __init__(self, dense, tableau, time_dtype) -> None:
        pieces = dense.pieces
        n, pad = len(pieces), 1 << max(len(dense.pieces) - 1, 0).bit_length()
        order = list(range(n)) + [n - 1] * (pad - n)
        u = pieces[0].u
        self.direction = dense.direction
        self.signed_ends = torch.tensor([dense.direction * dense.ends[j] for j in order], dtype=time_dtype,
                                        device=u.device)
        self.starts = torch.tensor([dense.starts[j] for j in order], dtype=time_dtype, device=u.device)
        self.sizes = torch.tensor([dense.ends[j] - dense.starts[j] for j in order], dtype=time_dtype,
                                  device=u.device)
        self.states = torch.stack([pieces[j].u.reshape(-1) for j in order])
        self.stages = torch.stack([torch.stack([k.reshape(-1) for k in pieces[j].stages]) for j in order])
        width = max(len(row) for row in tableau.dense)
        self.P = torch.tensor([[float(c) for c in row] + [0.0] * (width - len(row)) for row in tableau.dense],
                              dtype=u.dtype, device=u.device)

    def __call__(self, t):
        j = torch.searchsorted(self.signed_ends, (self.direction * t).reshape(1)).clamp_(max=self.starts.shape[0] - 1)
        h = self.sizes[j]
        theta = ((t - self.starts[j]) / h).to(self.P.dtype)
        powers = theta.unsqueeze(1) ** torch.arange(1, self.P.shape[1] + 1, dtype=theta.dtype, device=theta.device)
        weights = (powers @ self.P.t()) * h.to(self.P.dtype).unsqueeze(1)  # (1, stages)
        return (self.states[j] + weights.unsqueeze(1).bmm(self.stages[j]).squeeze(1)).squeeze(0)


def _write_negated(result: torch.Tensor, offset: int, n: int, g) -> None:
    """``result[offset:offset + n] = -g`` (zeros for an unused ``g``), in ``result``'s dtype: a float64
    parameter of a float32 model must not promote the augmented state."""
    view = result[offset:offset + n]
    if g is None:
        view.zero_()
    elif g.dtype == result.dtype:
        torch.neg(g.reshape(-1), out=view)
    else:  # neg's out= does not cast
        view.copy_(g.reshape(-1)).neg_()


def _flat_or_zero(g, n: int, dtype, device) -> torch.Tensor:
    return g.reshape(-1) if g is not None else torch.zeros(n, dtype=dtype, device=device)
