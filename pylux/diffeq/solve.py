"""``solve(prob, solver, ...)``: the user entry point, and the sensitivity-algorithm hook.

``solve`` validates every input once (:func:`~pylux.diffeq.options.make_options`),
then either runs the loop directly — gradients flow by backpropagation through
every step ("discretise-then-optimise", the ``sensealg=None`` default) — or
hands the problem to a sensitivity algorithm's ``solve_with``.
"""

from __future__ import annotations

import abc
from typing import Any

from .options import SOLVE_KEYWORDS, SolveOptions, check_keywords, make_options
from .per_sample import solve_batched, wants_batched_times
from .events import check_event_solve, split_callbacks, with_events
from .integrate import integrate
from .compiled import compiled_solver
from .problem import ODEProblem
from .sde import SDEProblem, check_sde_solver
from .second_order import SecondOrderODEProblem
from .solution import Solution
from .solvers import AbstractSolver, Tsit5

__all__ = ["solve", "AbstractSensitivityAlgorithm", "check_sensealg"]


class AbstractSensitivityAlgorithm(abc.ABC):
    """How gradients flow through :func:`solve`; subclasses live in ``pylux.sensitivity``.

    ``solve(prob, solver, sensealg=alg, ...)`` validates its inputs and then
    returns ``alg.solve_with(prob, solver, options)``, where ``options`` is the
    canonical :class:`~pylux.diffeq.options.SolveOptions`. An implementation
    typically runs :func:`~pylux.diffeq.integrate.integrate` forward (often
    under ``torch.no_grad()``) inside a ``torch.autograd.Function`` whose
    backward solves an adjoint problem with ``integrate`` again.

    Capabilities are declared on the class, so callers never test for a
    concrete algorithm:

    * ``differentiates_solver``: gradients backpropagate through the solver's
      own operations, so per-step quantities of the solve (error and stiffness
      estimates, the dense output) are differentiable in the parameters.
    * ``handles_sde``: it can differentiate a solve of an :class:`SDEProblem`.
    * ``compiles_backward``: under ``solve(..., compile=True)`` its forward and
      backward solves run compiled (:mod:`pylux.diffeq.compiled`).
    """

    #: see the class docstring
    differentiates_solver: bool = False
    #: the algorithm can differentiate an SDE solve (pathwise, on the solve's fixed Brownian path)
    handles_sde: bool = False
    #: ``compile=True`` compiles the algorithm's own backward solves (see the class docstring)
    compiles_backward: bool = False

    @abc.abstractmethod
    def solve_with(self, problem: ODEProblem, solver: AbstractSolver, options: SolveOptions) -> Solution:
        """Solve ``problem`` with ``solver`` and ``options``, arranging gradients this algorithm's way."""


def check_sensealg(sensealg, where: str):
    """``sensealg`` if it is ``None`` or a sensitivity-algorithm instance; else a ``TypeError`` saying what to pass.

    A class passed where an instance belongs (``sensealg=BacksolveAdjoint``) is
    refused here, at construction, not at the first backward pass.
    """
    if sensealg is None or isinstance(sensealg, AbstractSensitivityAlgorithm):
        return sensealg
    if isinstance(sensealg, type) and issubclass(sensealg, AbstractSensitivityAlgorithm):
        raise TypeError(f"{where}: sensealg={sensealg.__name__} is a class; pass an instance, "
                        f"sensealg={sensealg.__name__}()")
    raise TypeError(f"{where}: sensealg must be a sensitivity algorithm (an AbstractSensitivityAlgorithm "
                    f"such as BacksolveAdjoint()) or None, got {type(sensealg).__name__}")


def _sde_for_one_solve(prob: SDEProblem, solver, sensealg) -> SDEProblem:
    """Check the solver and sensealg against the SDE, and fix the Brownian path of this solve."""
    check_sde_solver(solver, prob.noise, prob.interpretation)
    if sensealg is not None and not getattr(sensealg, "handles_sde", False):
        raise NotImplementedError(f"solve: {type(sensealg).__name__} does not differentiate SDE solves; use "
                                  "sensealg=DirectAdjoint() (pathwise gradients on the solve's Brownian path)")
    if prob.brownian is not None:
        return prob
    return prob.with_brownian(prob.draw_brownian(levy_area=solver.needs_levy_area))


def solve(prob: ODEProblem, solver: AbstractSolver | None = None, *, dt=None, adaptive=None,
          saveat=None, tstops=None, save_everystep=None, save_start=None, save_end=None, dense=None,
          reltol=1e-3, abstol=1e-6, controller=None, norm=None, dtmin=None, force_dtmin=False, dtmax=None,
          maxiters=100_000, callback=None, save_stats=False, throw=True, sensealg=None,
          batch="joint", saveat_mask=None, compile=False, **unknown: Any) -> Solution:
    """Solve an :class:`ODEProblem` or :class:`SDEProblem`; names and defaults follow DifferentialEquations.jl.

    Args:
        prob: the problem ``du/dt = f(u, p, t)``, ``u(t0) = u0``, or the SDE
            ``du = f dt + g dW`` (then ``solver`` is an SDE solver, and each
            solve draws its Brownian path unless the problem fixes one).
        solver: ``Tsit5()`` (default), ``DP5()``, ``BS3()``, ``VCAB3()``,
            ``Heun()``, ``Midpoint()`` (adaptive) or ``Euler()``, ``RK4()``
            (fixed step only).
        dt: step size (a positive magnitude; the direction comes from tspan).
            Initial step when adaptive (default: Hairer's heuristic), the fixed
            step otherwise; a ``dt`` that does not divide the span shortens the
            last step so the solve ends exactly at ``t1``.
        adaptive: ``None`` = adaptive iff the solver has an error estimate.
        saveat: times to save (sequence or 1-D tensor, strictly monotone in the
            direction of integration, inside tspan; never sorted silently), or a
            number = spacing. Values between steps come from the dense output.
            A ``(B, T)`` tensor saves each sample (leading axis of ``u0``) at its
            own times: then ``sol.t`` is ``(T, B)`` and ``sol.u`` is ``(T, B, ...)``
            (see :mod:`pylux.diffeq.per_sample`).
        saveat_mask: ``(B, T)`` bool tensor for a per-sample ``saveat`` with ragged
            rows, True = a time to save; a masked entry's time is ignored and its
            value repeats the sample's state at its last unmasked time before it
            (its initial state when there is none).
        batch: ``"joint"`` (default: one step size for the whole batch) or
            ``"per-sample"``: every sample of the batch has its own ``t``, ``dt``,
            accept/reject and status, and ``f`` receives ``t`` of shape ``(B,)``;
            the problem may give per-sample spans (``(B,)`` tensors ``t0``, ``t1``).
            Per-sample counters are in ``sol.stats`` (``nf_per_sample``, ...).
            Works under ``sensealg=None``/``DirectAdjoint()``; the adjoint
            sensealgs raise ``NotImplementedError`` (they work with the joint
            step and a ``(B, T)`` saveat).
        tstops: times the solver must step exactly onto (same rules as
            ``saveat``): discontinuities of ``f``, jump times of a control.
        save_everystep: save every accepted step (default: iff ``saveat`` is None).
        save_start, save_end: store ``t0`` / the final time. Default, as in
            DifferentialEquations.jl: True without ``saveat``; with ``saveat``,
            True iff ``t0`` / ``t1`` is one of the saveat times.
        dense: keep every step's interpolant so ``sol(t)`` works (default: iff
            saving every step without ``saveat``, and never under a sensealg
            that does not backpropagate through the solver, where
            ``dense=True`` is refused). Costs the stages' memory.
        reltol, abstol: tolerances of the scaled error
            ``err / (abstol + reltol * max(|u|, |u_new|))`` (abstol may be a tensor
            broadcastable to ``u0``). Both must be > 0; a reltol below 4 machine
            epsilons of the state dtype is raised to that with a warning.
        controller: ``PIController(...)`` / ``IController(...)``; default: the
            solver's (OrdinaryDiffEq.jl's PI defaults for its order).
        norm: ``norm(x) -> 0-d tensor`` of the scaled error; default RMS;
            ``SemiNorm(mask)`` to control only some entries.
        dtmin: the floor of adaptive steps, as in OrdinaryDiffEq.jl: the first
            step and every proposal are raised to ``max(dtmin, 4 ulps of |t|)``
            (the second term is the time type's resolution where the solve is),
            and a rejected step no longer than that floor ends the solve
            (DtLessThanMin); default: only the resolution (and an absolute floor
            of 4 eps^2 |t1 - t0|).
        force_dtmin: ``True`` accepts a step at the floor whatever its error
            estimate (a NaN/Inf step is still rejected) instead of ending the
            solve: OrdinaryDiffEq.jl's ``force_dtmin``, torchdiffeq's ``min_step``.
            The accuracy of such steps is not controlled. Joint batches only.
        dtmax: largest step (default ``|t1 - t0|``).
        maxiters: most trial steps (accepted + rejected) before MaxIters.
        callback: a termination callback (``TerminateSteadyState``,
            ``TerminateWhen``), an event callback (``ContinuousCallback``,
            ``DiscreteCallback``; their events are in ``sol.events``) or a list
            of them. A callback that can end the solve allows ``t1 = inf``.
        save_stats: record per-step ``t``, ``dt``, error estimate and stiffness
            estimate in ``sol.stats`` (see :class:`SolverStats`).
        throw: on failure raise the return code's :class:`SolverError` (default)
            or, with ``False``, return the partial solution with ``sol.retcode``.
        sensealg: an :class:`AbstractSensitivityAlgorithm`; ``None`` =
            backpropagate through the solver's operations.
        compile: ``True`` runs each step (stages, error estimate, scaled error
            norm) as one ``torch.compile`` graph (CUDA graphs on CUDA), cached
            per shape/dtype/device, falling back to eager with a warning when
            ``f`` cannot be compiled (:mod:`pylux.diffeq.compiled`); or a
            ``torch.compile`` mode name. Explicit RK solvers, ``sensealg=None``,
            ``DirectAdjoint()`` or a continuous adjoint (Backsolve, Interpolating,
            Quadrature: their backward solves are compiled too). The first call compiles (seconds). An
            adaptive FSAL method (Tsit5, DP5, BS3) with PI or I control that
            saves at ``saveat`` times only (no callbacks, ``tstops``, dense or
            per-step output) runs its whole loop as one compiled graph, with one
            synchronisation per solve (:mod:`pylux.diffeq.captured`). So do the
            Rosenbrock methods (``Rosenbrock23``, ``Rodas5P``) with a dense or
            batched Jacobian, for forward solves (``sensealg=None``, no gradient
            needed): the Jacobian, the factorisation and the stage solves join
            the graph; anything else runs them eagerly, with one warning.

    Returns:
        a :class:`Solution` with ``t``, ``u`` (shape ``(len(t), *u0.shape)``),
        ``retcode``, ``stats`` and ``sol(t)``.

    Raises:
        TypeError: an unknown keyword (named, with the closest known one), or
            an argument of the wrong type.
        ValueError: an invalid argument (message names it and says what to pass).
        SolverError: ``MaxItersError``, ``DtLessThanMinError``, ``UnstableError``
            when ``throw=True`` (the partial solution is ``err.solution``).
    """
    check_keywords(unknown, "solve", SOLVE_KEYWORDS)
    if not isinstance(prob, (ODEProblem, SDEProblem)):
        raise TypeError(f"solve: the first argument must be an ODEProblem or SDEProblem, got {type(prob).__name__}")
    if solver is None:
        if isinstance(prob, SDEProblem):
            raise TypeError("solve: an SDEProblem needs a solver, e.g. solve(prob, EulerMaruyama(), dt=0.01) "
                            "or an adaptive SOSRI()")
        solver = Tsit5()
    if isinstance(prob, SDEProblem):
        prob = _sde_for_one_solve(prob, solver, sensealg)
    check_sensealg(sensealg, "solve")
    if not isinstance(force_dtmin, bool):
        raise TypeError(f"solve: force_dtmin must be True or False, got {force_dtmin!r}")
    if wants_batched_times(prob, batch, saveat, saveat_mask):
        if force_dtmin:
            raise NotImplementedError("solve: force_dtmin=True is not supported with per-sample steps; pass "
                                      "batch='joint', or a smaller dtmin")
        if compile is not False:
            raise NotImplementedError("solve: compile=True is not supported with per-sample times; pass compile=False")
        return solve_batched(
            prob, solver, sensealg, batch=batch, saveat=saveat, saveat_mask=saveat_mask, save_start=save_start,
            save_end=save_end, save_everystep=save_everystep, dense=dense, tstops=tstops, callback=callback,
            save_stats=save_stats, throw=throw, dtmin=dtmin, dtmax=dtmax, dt=dt, adaptive=adaptive,
            reltol=reltol, abstol=abstol, controller=controller, norm=norm, maxiters=maxiters)
    t0, t1 = prob.tspan
    termination, events = split_callbacks(callback)
    check_event_solve(t1, termination, events, is_sde=isinstance(prob, SDEProblem), sensealg=sensealg,
                      solver=solver, adaptive=adaptive, saveat=saveat)
    if sensealg is not None and not sensealg.differentiates_solver:
        if dense:
            raise NotImplementedError(
                f"solve: dense=True is not supported under {type(sensealg).__name__}: its forward solve "
                "runs without autograd, so sol(t) would carry no gradient. Pass saveat=... for the times "
                "you need (their gradients are exact), or use sensealg=DirectAdjoint() for a "
                "differentiable sol(t)")
        dense = False
    options = make_options(
        solver, prob.u0, t0, t1, time_dtype=prob.time_dtype, dt=dt, adaptive=adaptive,
        saveat=saveat, save_everystep=save_everystep, save_start=save_start, save_end=save_end,
        dense=dense, reltol=reltol, abstol=abstol, controller=controller, norm=norm, dtmin=dtmin,
        dtmax=dtmax, maxiters=maxiters, callback=termination, save_stats=save_stats, throw=throw,
        tstops=tstops, force_dtmin=force_dtmin)
    options = with_events(options, events, t0, t1, dtmin)
    solver = compiled_solver(solver, options, sensealg, compile, prob.u0.device)
    if sensealg is not None:
        sol = sensealg.solve_with(prob, solver, options)
    else:
        sol = integrate(prob.term.bind(prob.p), prob.u0, t0, t1, solver, options)
    if isinstance(prob, SecondOrderODEProblem):
        prob.split(sol)
    return sol
