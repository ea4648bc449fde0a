"""Deep equilibrium layers: DEQ, SkipDEQ (Skip and Skip Reg.), MultiScaleDEQ.

A deep equilibrium model (Bai, Kolter & Koltun, NeurIPS 2019) maps ``x`` to the
fixed point :math:`z^* = f_\\theta(z^*, x)` of a layer ``f``. It is found either

* **discretely** (:class:`DiscreteSolve`), by a root solver from
  :mod:`pylux.nonlinear` (Broyden, Anderson, ...) applied to :math:`z = f(z, x)`, or
* **continuously** (:class:`ContinuousSolve`; Pal, Edelman & Rackauckas 2022,
  "Mixing implicit and explicit deep learning with skip DEQs and infinite time
  neural ODEs (continuous DEQs)"), by integrating :math:`\\mathrm{d}z/\\mathrm{d}t = f(z, x) - z`
  with an ODE solver from :mod:`pylux.diffeq` (Tsit5, ...) until its steady
  state, where :math:`f(z^*, x) = z^*`.

Both strategies return one :class:`EquilibriumResult` (the fixed point, the
residual, the evaluation and iteration counts, the verdict); a layer given a
bare nonlinear or ODE solver wraps it in the matching strategy.

Either way the forward pass runs without building a graph, and the backward
pass is the implicit one of :class:`~pylux.sensitivity.SteadyStateAdjoint`
(one linear solve) or :class:`~pylux.sensitivity.JacobianFreeBackprop`.

Skip DEQs (same paper) start the solver from an explicit prediction
:math:`u_0 = g_\\phi(x)` trained to match :math:`z^*`; Skip Reg. DEQs use
:math:`u_0 = f(0, x)` with no extra parameters. The Jacobian regulariser of
Bai, Koltun & Kolter (ICML 2021) penalises :math:`\\lVert J_f(z^*)\\rVert_F^2/d`,
estimated with Hutchinson's estimator, which keeps the fixed point cheap to find.

These layers mirror DeepEquilibriumNetworks.jl: the model receives the pair
``(z, x)`` (so a :class:`pylux.nn.Parallel` with ``"+"`` is an input-injected
cell), and the state holds a :class:`DEQSolution` with the fixed point, the
initial guess, the residual, the auxiliary losses and the evaluation count.
"""

from __future__ import annotations

import abc
import math
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from ..core import AbstractLayer, LayerError, check_key, draw_key, key_generator, tree_map
from ..core.failures import failure_policy
from ..core.keywords import check_keywords
from ..core.validation import check_float, check_int
from ..diffeq import ODEProblem, ReturnCode, solve
from ..diffeq.callbacks import AbstractTerminationCallback
from ..diffeq.options import SOLVE_KEYWORDS
from ..diffeq.solvers import AbstractSolver
from ..nonlinear import (AbstractNonlinearSolver, ConvergenceWarning, NonlinearReturnCode, NonlinearSolveError,
                         nlsolve)
from ..regularize import hutchinson_vjp_frobenius, rademacher_like
from ..sensitivity import AbstractImplicitSensitivity, SteadyStateAdjoint

__all__ = ["DEQSolution", "EquilibriumResult", "AbstractEquilibriumSolve", "DiscreteSolve", "ContinuousSolve",
           "DEQ", "DeepEquilibriumNetwork", "SkipDEQ", "SkipDeepEquilibriumNetwork", "MultiScaleDEQ",
           "MultiScaleDeepEquilibriumNetwork"]

#: default iteration limits: nonlinear-solver iterations (discrete), ODE trial steps (continuous).
DEFAULT_MAXITERS_DISCRETE = 100
DEFAULT_MAXITERS_CONTINUOUS = 1000
#: default end time of a continuous solve.
DEFAULT_HORIZON = 1e3
#: default ODE tolerances of a continuous DEQ, relative to the layer's abstol/reltol.
ODE_TOLERANCE_FACTOR = 0.1
#: the layer chooses these solve() keywords itself.
_LAYER_SOLVE_KEYWORDS = ("saveat", "save_everystep", "save_start", "save_end", "dense", "callback",
                         "maxiters", "throw", "sensealg", "save_stats")

#: ``fmap(z) -> z``: the fixed-point map with the input and the parameters bound (no grad).
FixedPointMap = Callable[[torch.Tensor], torch.Tensor]


class DEQSolution(NamedTuple):
    """What one forward pass of a DEQ layer found (``st["solution"]``, DEQ.jl's ``DeepEquilibriumSolution``).

    A named tuple, so the tree utilities (``tree_map``, detaching in the
    training loop, ``testmode``) treat its tensors as leaves and rebuild it
    field by field; :func:`pylux.training.save_checkpoint` stores it.

    Attributes:
        z_star: the fixed point, as returned by the layer (differentiable
            through the layer's ``sensealg``); flat ``(B, D)`` for MultiScaleDEQ.
        u0: the initial guess, differentiable with respect to the init model
            (Skip) or to ``f`` (Skip Reg.); zeros for a plain DEQ.
        residual: ``(B,)`` residual norms :math:`\\lVert f(z^*, x) - z^*\\rVert_2` (detached).
        jacobian_loss: :math:`\\gamma\\,\\mathrm{mean}_b \\lVert \\varepsilon_b^\\top J_f(z^*_b)\\rVert^2 / d`
            (0-d, differentiable), or ``None`` when ``jacobian_regularization == 0``
            or grad mode is off; 0 for an empty batch.
        skip_loss: :math:`\\mathrm{mean}((z^* - u_0)^2)` over all entries (0-d,
            differentiable) for SkipDEQ, ``None`` for a plain DEQ, 0 for an empty batch.
            At the fixed point :math:`z^* = f(z^*, x)`, so this is the paper's
            :math:`\\lVert f(z^*, x) - g_\\phi(x)\\rVert^2` (Skip) or
            :math:`\\lVert f(z^*, x) - f(0, x)\\rVert^2` (Skip Reg.), divided by ``B·d``.
        nfe: evaluations of ``f`` by the forward solve (plus the one giving
            :math:`u_0 = f(0, x)` for Skip Reg.; not those of the backward pass or
            of the Jacobian regulariser).
        iterations: nonlinear-solver iterations (discrete) or accepted ODE steps (continuous).
        retcode: a :class:`~pylux.nonlinear.NonlinearReturnCode` (``Success`` iff converged).
        solver_retcode: the solver's own code (``NonlinearReturnCode`` or ODE ``ReturnCode``).
        converged: host bool, every batch element met ``abstol + reltol ||z*||``.
        t: time at which the continuous solve stopped (``None`` for a discrete one).
        backward_stats: this forward pass's handle to the counters of its
            backward pass (GMRES ``iterations``, ``matvecs``, ``residual``,
            ``converged``), filled in when ``backward()`` runs; empty before.
        sample_converged: ``(B,)`` bool, which batch elements met the test
            (``converged`` is its ``all()``).
        sample_unstable: ``(B,)`` bool, which batch elements' iterates became
            NaN/Inf (``retcode`` is then ``Unstable``). Only a discrete solve with
            ``on_failure="warn"`` or ``"ignore"`` returns such elements: each at its
            best finite iterate, with the best residual reached (NaN when already
            :math:`f(u_0, x)` was not finite); the rest of the batch is solved as usual.
            ``None`` only in a record saved before these fields existed.
    """

    z_star: torch.Tensor
    u0: torch.Tensor
    residual: torch.Tensor
    jacobian_loss: torch.Tensor | None
    skip_loss: torch.Tensor | None
    nfe: int
    iterations: int
    retcode: NonlinearReturnCode
    solver_retcode: Any
    converged: bool
    t: float | None
    backward_stats: dict
    sample_converged: torch.Tensor | None = None
    sample_unstable: torch.Tensor | None = None


class EquilibriumResult(NamedTuple):
    """What a solve strategy (:class:`DiscreteSolve`, :class:`ContinuousSolve`) found, without gradients.

    Attributes:
        z_star: the fixed point, ``(B, ...)``, detached.
        residual: ``(B,)`` norms :math:`\\lVert f(z^*) - z^*\\rVert_2`.
        nfe: evaluations of ``f``.
        iterations: nonlinear-solver iterations, or accepted ODE steps.
        retcode: ``NonlinearReturnCode.Success`` iff every element met the layer's test;
            ``Unstable`` when some element's iterates became NaN/Inf (a discrete solve
            with ``on_failure="warn"`` or ``"ignore"``), else ``MaxIters``.
        solver_retcode: the solver's own code (``NonlinearReturnCode`` or ODE ``ReturnCode``).
        converged: host bool, ``retcode is Success``.
        t: the time the continuous solve stopped at; ``None`` for a discrete solve.
        sample_converged: ``(B,)`` bool, which elements met the test; ``None`` (a
            strategy that does not say) means every element shares ``converged``.
        sample_unstable: ``(B,)`` bool, which elements became NaN/Inf; ``None`` means none.
    """

    z_star: torch.Tensor
    residual: torch.Tensor
    nfe: int
    iterations: int
    retcode: NonlinearReturnCode
    solver_retcode: Any
    converged: bool
    t: float | None
    sample_converged: torch.Tensor | None = None
    sample_unstable: torch.Tensor | None = None


class _ConvergenceTest(NamedTuple):
    """The layer's test :math:`\\lVert f(z) - z\\rVert \\le` ``abstol + reltol ||z||``, its limit and policy."""

    abstol: float
    reltol: float
    maxiters: int
    on_failure: str
    where: str


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """``(B,)`` 2-norms of the batch elements (an empty batch gives an empty vector)."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], math.prod(t.shape[1:])), dim=1)


class _PerSampleSteadyState(AbstractTerminationCallback):
    """Stop when every batch element has ``||du_b|| <= abstol + reltol ||u_b||`` (nlsolve's test).

    Reads the FSAL stage (no extra evaluation for Tsit5/DP5/BS3); keeps the
    last residual norms so the layer can report them without another call.
    """

    def __init__(self, abstol: float, reltol: float) -> None:
        self.abstol, self.reltol = abstol, reltol
        self.last_residual: torch.Tensor | None = None
        self.last_t: float | None = None

    def should_terminate(self, u, t, du):
        residual = _per_sample_norm(du().detach())
        self.last_residual, self.last_t = residual, t
        tolerance = self.abstol + self.reltol * _per_sample_norm(u.detach())
        return (residual <= tolerance).all()


def _describe(solver) -> str:
    return type(solver).__name__


# ---------------------------------------------------------------------------- solve strategies
class AbstractEquilibriumSolve(abc.ABC):
    """How a DEQ layer finds :math:`z^* = f(z^*, x)`: the base of :class:`DiscreteSolve` and :class:`ContinuousSolve`.

    :meth:`solve` returns one :class:`EquilibriumResult` whichever way the
    fixed point was found; an empty batch returns at once (no evaluation of
    ``f``, converged, an empty residual).
    """

    #: the layer's ``maxiters`` when none is given.
    default_maxiters: int

    def __init__(self, solver) -> None:
        self.solver = solver

    def solve(self, fmap: FixedPointMap, z0: torch.Tensor, test: _ConvergenceTest) -> EquilibriumResult:
        """The fixed point of ``fmap`` from ``z0`` (no grad), judged by the layer's ``test``."""
        if z0.shape[0] == 0:
            none = torch.zeros(0, dtype=torch.bool, device=z0.device)
            return EquilibriumResult(z0, z0.new_zeros(0), 0, 0, NonlinearReturnCode.Success,
                                     self._empty_retcode, True, self._empty_t, none, none)
        return self._solve(fmap, z0, test)

    _empty_retcode: Any = NonlinearReturnCode.Success
    _empty_t: float | None = None

    @abc.abstractmethod
    def _solve(self, fmap: FixedPointMap, z0: torch.Tensor, test: _ConvergenceTest) -> EquilibriumResult:
        """:meth:`solve` for a non-empty batch."""

    def _options(self) -> dict:
        return {}

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({self.solver!r}{extra})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.solver == other.solver and self._options() == other._options()

    def __hash__(self) -> int:
        return hash(type(self))


class DiscreteSolve(AbstractEquilibriumSolve):
    """A discrete DEQ (Bai, Kolter & Koltun 2019): a root solver applied to :math:`z = f(z, x)`.

    Runs :func:`pylux.nonlinear.nlsolve` with the layer's tolerances,
    ``maxiters`` (default 100 iterations) and failure policy, which covers both
    failures nlsolve reports per batch element: ``MaxIters`` and NaN/Inf in an
    element's iterates (``Unstable``; nlsolve freezes that element at its best
    finite iterate and solves the rest of the batch). ``"raise"`` raises
    :class:`~pylux.nonlinear.NonlinearSolveError` (its ``.solution`` is nlsolve's
    partial result); ``"warn"`` warns (naming how many elements failed) and
    returns the result; ``"ignore"`` returns it silently. The result's
    ``sample_converged`` and ``sample_unstable`` say which elements failed.

    Args:
        nonlinear_solver: ``Broyden()``, ``Anderson()``, ``LimitedMemoryBroyden()``,
            ``NewtonKrylov()`` or ``FixedPointIteration()``.

    Raises:
        TypeError: ``nonlinear_solver`` is not a pylux nonlinear solver.
    """

    default_maxiters = DEFAULT_MAXITERS_DISCRETE

    def __init__(self, nonlinear_solver: AbstractNonlinearSolver) -> None:
        if not isinstance(nonlinear_solver, AbstractNonlinearSolver):
            raise TypeError(f"DiscreteSolve: expected a pylux.nonlinear solver (Broyden(), Anderson(), ...), got "
                            f"{type(nonlinear_solver).__name__}.")
        super().__init__(nonlinear_solver)

    def _solve(self, fmap, z0, test):
        try:
            sol = nlsolve(fmap, z0, self.solver, abstol=test.abstol, reltol=test.reltol, maxiters=test.maxiters,
                          on_failure=test.on_failure, record_history=False)
        except NonlinearSolveError as error:
            # nlsolve raises under "warn" only for NaN/Inf, once the rest of the batch is solved.
            if test.on_failure != "warn" or error.solution is None:
                raise NonlinearSolveError(f"{test.where}: {error}", error.retcode, error.iteration,
                                          error.solution) from None
            sol = error.solution
            warnings.warn(f"{test.where}: {error} The layer returns the whole batch; "
                          "st['solution'].sample_unstable marks the failed elements.", ConvergenceWarning,
                          stacklevel=5)
        return EquilibriumResult(sol.z, sol.residual, sol.nfe, sol.iterations, sol.retcode, sol.retcode,
                                 sol.retcode is NonlinearReturnCode.Success, None, sol.converged, sol.unstable)


class ContinuousSolve(AbstractEquilibriumSolve):
    """A continuous DEQ (Pal, Edelman & Rackauckas 2022): :math:`\\dot z = f(z, x) - z` to its steady state.

    Integrates from ``t = 0`` with an ODE solver of :mod:`pylux.diffeq` and stops
    at the first accepted step where every batch element passes the layer's test
    :math:`\\lVert f(z, x) - z\\rVert_2 \\le \\text{abstol} + \\text{reltol}\\lVert z\\rVert_2`
    (read from the FSAL stage, no extra evaluation), at most at ``horizon``;
    reaching ``horizon`` or ``maxiters`` ODE trial steps (default 1000) without
    the steady state is non-convergence.

    The ODE tolerances default to a tenth of the layer's (local step errors at
    the level of the steady-state test would keep the residual from falling
    below it), but never below :math:`4\\varepsilon` of the state's dtype, the
    smallest ``reltol`` :func:`pylux.solve` accepts without clamping: a float32
    layer with default tolerances integrates with ``reltol`` :math:`4\\varepsilon
    \\approx 4.8\\cdot 10^{-7}`, a float64 one with ``1e-7``.

    Args:
        ode_solver: ``Tsit5()``, ``DP5()``, ... (any pylux ODE solver).
        horizon: the end time (default 1e3, > 0).
        ode_options: further keywords of :func:`pylux.solve` (``reltol``, ``abstol``,
            ``dt``, ``controller``, ...); those the layer chooses itself (``callback``,
            ``maxiters``, ``saveat``, ...) are refused.

    Raises:
        TypeError: not an ODE solver, a misspelt ODE option (named), or one the layer chooses.
        ValueError: ``horizon`` not positive and finite.
    """

    default_maxiters = DEFAULT_MAXITERS_CONTINUOUS
    _empty_retcode = ReturnCode.Terminated
    _empty_t = 0.0

    def __init__(self, ode_solver: AbstractSolver, *, horizon: float = DEFAULT_HORIZON,
                 ode_options: Mapping | None = None) -> None:
        where = "ContinuousSolve"
        if not isinstance(ode_solver, AbstractSolver):
            raise TypeError(f"{where}: expected a pylux ODE solver (Tsit5(), ...), got {type(ode_solver).__name__}.")
        super().__init__(ode_solver)
        self.horizon = check_float(where, "horizon", horizon, low=0.0, low_open=True, high=math.inf,
                                   high_open=True)
        options = dict(ode_options or {})
        taken = sorted(set(options) & set(_LAYER_SOLVE_KEYWORDS))
        if taken:
            raise TypeError(f"{where}: ode_options {taken} are chosen by the layer (maxiters is the layer's own "
                            "option).")
        check_keywords({k: v for k, v in options.items() if k not in SOLVE_KEYWORDS}, "ode_options for solve",
                       [k for k in SOLVE_KEYWORDS if k not in _LAYER_SOLVE_KEYWORDS])
        self.ode_options = options

    def _options(self) -> dict:
        return {"horizon": self.horizon, "ode_options": self.ode_options}

    def tolerances(self, abstol: float, reltol: float, dtype: torch.dtype) -> dict:
        """The ODE's ``reltol``/``abstol`` for a layer test ``(abstol, reltol)`` and a state of ``dtype``."""
        # solve() clamps (with a warning) any reltol below 4 machine epsilons of the state's dtype.
        floor = 4 * torch.finfo(dtype).eps
        return {"reltol": self.ode_options.get("reltol", max(ODE_TOLERANCE_FACTOR * reltol, floor, 1e-12)),
                "abstol": self.ode_options.get("abstol", max(ODE_TOLERANCE_FACTOR * abstol, 1e-12))}

    def _solve(self, fmap, z0, test):
        sol, callback = self._integrate(fmap, z0, test)
        t_end = float(sol.t[-1]) if sol.t.numel() else 0.0
        steps, nfe = sol.stats.naccept, sol.stats.nf
        if sol.retcode is ReturnCode.Unstable:
            raise NonlinearSolveError(
                f"{test.where}: integrating dz/dt = f(z, x) - z produced NaN/Inf at t = {t_end!r} after "
                f"{steps} accepted steps (nfe={nfe}); check f at the initial state, lower the "
                "learning rate, or regularise the Jacobian (jacobian_regularization).",
                NonlinearReturnCode.Unstable, steps)
        z_star = sol.u[-1]
        unstable = torch.zeros(z0.shape[0], dtype=torch.bool, device=z0.device)  # one ODE solve: none
        if sol.retcode is ReturnCode.Terminated:
            return EquilibriumResult(z_star, callback.last_residual, nfe, steps, NonlinearReturnCode.Success,
                                     sol.retcode, True, t_end, ~unstable, unstable)
        residual, tolerance = self._final_residual(fmap, z_star, test, t_end, steps)
        nfe += 1
        met = residual <= tolerance
        if bool(met.all()):
            return EquilibriumResult(z_star, residual, nfe, steps, NonlinearReturnCode.Success, sol.retcode, True,
                                     t_end, met, unstable)
        self._report_no_steady_state(test, sol.retcode, residual, tolerance, t_end, steps, nfe)
        return EquilibriumResult(z_star, residual, nfe, steps, NonlinearReturnCode.MaxIters, sol.retcode, False,
                                 t_end, met, unstable)

    def _integrate(self, fmap, z0, test):
        callback = _PerSampleSteadyState(test.abstol, test.reltol)
        problem = ODEProblem(lambda u, p, t: fmap(u) - u, z0, (0.0, self.horizon))
        options = {**self.ode_options, **self.tolerances(test.abstol, test.reltol, z0.dtype)}
        with torch.no_grad():
            sol = solve(problem, self.solver, save_everystep=False, save_start=False, save_end=True,
                        callback=callback, maxiters=test.maxiters, throw=False, **options)
        return sol, callback

    @staticmethod
    def _final_residual(fmap, z_star, test, t_end, steps):
        """Residual norms at the end of a solve the steady-state callback did not stop, and their tolerances."""
        with torch.no_grad():
            residual = _per_sample_norm(fmap(z_star) - z_star)
        if not torch.isfinite(residual).all():
            raise NonlinearSolveError(f"{test.where}: f(z*, x) is NaN/Inf at the end of the continuous solve "
                                      f"(t = {t_end!r}).", NonlinearReturnCode.Unstable, steps)
        return residual, test.abstol + test.reltol * _per_sample_norm(z_star)

    def _report_no_steady_state(self, test, retcode, residual, tolerance, t_end, steps, nfe):
        if test.on_failure == "ignore":
            return
        worst = int(torch.argmax(residual - tolerance))
        message = (f"{test.where}: no steady state of dz/dt = f(z, x) - z (ODE retcode {retcode.name} at "
                   f"t = {t_end!r}, {steps} accepted steps, nfe={nfe}, maxiters={test.maxiters}, "
                   f"horizon={self.horizon:g}); largest residual ||f(z) - z|| = {float(residual[worst]):.3e} in "
                   f"element {worst}, tolerance {float(tolerance[worst]):.3e} (abstol={test.abstol:g}, "
                   f"reltol={test.reltol:g}). Increase maxiters or horizon, loosen the tolerances, or "
                   "regularise the Jacobian.")
        if test.on_failure == "raise":
            raise NonlinearSolveError(message, NonlinearReturnCode.MaxIters, steps)
        warnings.warn(message, ConvergenceWarning, stacklevel=6)


def _solve_strategy(where: str, solver, horizon, ode_options) -> AbstractEquilibriumSolve:
    """The layer's strategy from its ``solver`` argument (a strategy, a nonlinear solver or an ODE solver)."""
    if isinstance(solver, AbstractEquilibriumSolve):
        given = [name for name, value in (("horizon", horizon), ("ode_options", ode_options)) if value is not None]
        if given:
            raise TypeError(f"{where}: {' and '.join(given)} belong to ContinuousSolve(ode_solver, horizon=..., "
                            f"ode_options=...); the solver {solver!r} already says how to solve.")
        return solver
    if isinstance(solver, AbstractNonlinearSolver):
        for name, value in (("ode_options", ode_options), ("horizon", horizon)):
            if value is not None and (name == "horizon" or dict(value)):
                raise TypeError(f"{where}: {name} apply to continuous DEQs (an ODE solver such as Tsit5()); "
                                f"the solver {_describe(solver)} is a nonlinear solver.")
        return DiscreteSolve(solver)
    if isinstance(solver, AbstractSolver):
        try:
            return ContinuousSolve(solver, horizon=DEFAULT_HORIZON if horizon is None else horizon,
                                   ode_options=ode_options)
        except (TypeError, ValueError) as error:
            raise type(error)(str(error).replace("ContinuousSolve", where, 1)) from None
    raise TypeError(f"{where}: solver must be a pylux nonlinear solver (Broyden(), Anderson(), ...) for a "
                    f"discrete DEQ, a pylux ODE solver (Tsit5(), ...) for a continuous DEQ, or "
                    f"DiscreteSolve(...)/ContinuousSolve(...), got {type(solver).__name__}.")


# ---------------------------------------------------------------------------- the layers' shared machinery
class _EquilibriumLayer(AbstractLayer):
    """Shared machinery: option validation, the forward solve, gradients and regularisers."""

    _options = ("sensealg", "jacobian_regularization", "abstol", "reltol", "maxiters", "on_failure", "throw",
                "horizon", "ode_options")
    _extra_options: tuple[str, ...] = ()

    def _init_solver_options(self, where: str, solver, sensealg, jacobian_regularization, abstol, reltol,
                             maxiters, on_failure, throw, horizon, ode_options, unknown) -> None:
        check_keywords(unknown, where, self._options + self._extra_options)
        self.solve_strategy = _solve_strategy(where, solver, horizon, ode_options)
        sensealg = SteadyStateAdjoint() if sensealg is None else sensealg
        if not isinstance(sensealg, AbstractImplicitSensitivity):
            hint = (f" (a class: pass an instance, {sensealg.__name__}())" if isinstance(sensealg, type) else "")
            raise TypeError(f"{where}: sensealg must be SteadyStateAdjoint(...) or JacobianFreeBackprop(), got "
                            f"{type(sensealg).__name__}{hint}.")
        self.sensealg = sensealg
        self.jacobian_regularization = check_float(where, "jacobian_regularization", jacobian_regularization,
                                                   low=0.0, high=math.inf, high_open=True)
        self.abstol = check_float(where, "abstol", abstol, low=0.0, high=math.inf, high_open=True)
        self.reltol = check_float(where, "reltol", reltol, low=0.0, high=math.inf, high_open=True)
        if self.abstol == 0.0 and self.reltol == 0.0:
            raise ValueError(f"{where}: abstol and reltol are both zero; give a positive abstol (e.g. 1e-6).")
        default = self.solve_strategy.default_maxiters
        self.maxiters = default if maxiters is None else check_int(where, "maxiters", maxiters, 1)
        self.on_failure = failure_policy(where, on_failure, throw, default="warn")

    @property
    def solver(self):
        """The nonlinear or ODE solver of the layer's :attr:`solve_strategy`."""
        return self.solve_strategy.solver

    def _base_state(self, rng: torch.Generator) -> dict:
        return {"solution": None, "rng": draw_key(rng, f"{type(self).__name__}.init_state")}

    @property
    def _where(self) -> str:
        return f"{type(self).__name__}({_describe(self.solver)})"

    # ------------------------------------------------------------------ the whole pass
    def _equilibrium(self, f, x, ps_model, z0, u0_loss, extra_nfe, key):
        """Solve, attach the implicit gradient, compute the regularisers.

        ``f(z, x, ps_model) -> z``; ``z0`` is the detached starting point;
        ``u0_loss`` the (differentiable) initial guess for the skip loss, or None.
        Returns ``(z_out, DEQSolution, next_key)``.
        """
        test = _ConvergenceTest(self.abstol, self.reltol, self.maxiters, self.on_failure, self._where)
        result = self.solve_strategy.solve(_frozen_map(f, x, ps_model), z0, test)
        backward_stats: dict = {}
        z_out = self.sensealg.attach_gradient(f, result.z_star, x, ps_model, converged=result.converged,
                                              residual=result.residual, where=self._where, record=backward_stats)
        jacobian_loss, next_key = self._jacobian_loss(f, result.z_star, x, ps_model, key)
        skip_loss = None if u0_loss is None else _mean_square(z_out - u0_loss)
        sample_converged, sample_unstable = _per_sample_verdict(result)
        solution = DEQSolution(z_out, u0_loss if u0_loss is not None else z0, result.residual.detach(),
                               jacobian_loss, skip_loss, result.nfe + extra_nfe, result.iterations, result.retcode,
                               result.solver_retcode, result.converged, result.t, backward_stats,
                               sample_converged, sample_unstable)
        return z_out, solution, next_key

    def _jacobian_loss(self, f, z_star, x, ps_model, key):
        """The Jacobian loss :math:`\\gamma\\,\\mathrm{mean}_b\\lVert J_f(z^*_b)\\rVert_F^2/d` and the next key.

        Hutchinson's estimate of the Frobenius norm.
        One Rademacher probe per sample from the state's key (Bai, Koltun & Kolter 2021), :math:`z^*` held
        fixed; an empty batch gives a zero that is still connected to the parameters.

        ``None`` (and the key unchanged) when the regulariser is off or grad mode is off.
        """
        if self.jacobian_regularization == 0 or not torch.is_grad_enabled():
            return None, key
        generator, next_key = key_generator(key, z_star.device)
        z_leaf = z_star.detach().requires_grad_(True)
        fz = f(z_leaf, x, ps_model)
        if z_star.shape[0] == 0:
            return fz.sum() * 0.0, next_key  # an empty batch: zero, still connected to the parameters
        probe = rademacher_like(fz, generator)
        per_sample = hutchinson_vjp_frobenius(fz, z_leaf, probe, batched=True, create_graph=True)
        return self.jacobian_regularization * per_sample.mean() / z_star[0].numel(), next_key

    def _check_input(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise LayerError(f"expected a floating-point tensor x with a leading batch dimension, got {got}")
        if x.dim() == 0:
            raise LayerError("expected x with a leading batch dimension, got a 0-d tensor")
        return x

    def _check_key(self, st: Mapping) -> int:
        return check_key(st.get("rng") if isinstance(st, Mapping) else None)


def _frozen_map(f, x, ps_model) -> FixedPointMap:
    """``z -> f(z, x, ps)`` with ``x`` and every tensor of ``ps`` detached (the forward solve builds no graph)."""
    detached_ps = tree_map(lambda t: t.detach(), ps_model)
    x_detached = x.detach() if isinstance(x, torch.Tensor) else x

    def fmap(z):
        return f(z, x_detached, detached_ps)
    return fmap


def _per_sample_verdict(result: EquilibriumResult) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sample_converged, sample_unstable)`` of a strategy's result, filled in where it gave ``None``."""
    batch, device = result.z_star.shape[0], result.z_star.device
    converged = result.sample_converged
    if converged is None:
        converged = torch.full((batch,), bool(result.converged), dtype=torch.bool, device=device)
    unstable = result.sample_unstable
    if unstable is None:
        unstable = torch.zeros(batch, dtype=torch.bool, device=device)
    return converged, unstable


def _mean_square(t: torch.Tensor) -> torch.Tensor:
    """``mean(t**2)``, and a (differentiable) 0 for an empty ``t`` instead of NaN."""
    return t.pow(2).mean() if t.numel() else t.pow(2).sum()


def _state_shape(where: str, state_shape):
    if state_shape is None:
        return None
    try:
        shape = tuple(int(s) for s in state_shape)
    except TypeError:
        raise TypeError(f"{where}: state_shape must be a tuple of ints (the per-sample shape), got "
                        f"{state_shape!r}") from None
    if any(s < 1 for s in shape):
        raise ValueError(f"{where}: state_shape entries must be >= 1, got {shape}")
    return shape


_COMMON_DOC = """
    Args:
        model: a pylux layer computing :math:`f_\\theta(z, x)` from the pair ``(z, x)``:
            ``model((z, x), ps, st) -> (z_new, st)`` with ``z_new`` of ``z``'s shape. An
            input-injected cell :math:`\\tanh(W z + b + x)` is
            ``Chain(Parallel("+", Dense(d, d), NoOpLayer()), WrappedFunction(torch.tanh))``.
            It must act on each batch element independently (no batch statistics).
        solver: how to find the fixed point: a :class:`DiscreteSolve` or a
            :class:`ContinuousSolve`, or, as a shorthand for them, a nonlinear solver
            (``Broyden()``, ``Anderson()``, ... : ``DiscreteSolve(solver)``, a discrete DEQ,
            nlsolve of :math:`z = f(z, x)`) or an ODE solver (``Tsit5()``, ... :
            ``ContinuousSolve(solver, horizon=horizon, ode_options=ode_options)``, a
            continuous DEQ, :math:`\\dot z = f(z, x) - z` from ``t = 0`` until the steady
            state, at most until ``horizon``).
        sensealg: :class:`~pylux.sensitivity.SteadyStateAdjoint` (default) or
            :class:`~pylux.sensitivity.JacobianFreeBackprop`.
        jacobian_regularization: :math:`\\gamma \\ge 0`; when positive (and grad mode
            is on), ``st["solution"].jacobian_loss`` is the differentiable Hutchinson
            estimate :math:`\\gamma\\,\\mathrm{mean}_b \\lVert\\varepsilon_b^\\top J_f(z^*_b)\\rVert^2/d`
            (Bai, Koltun & Kolter 2021; one Rademacher probe per sample, drawn from the
            state's ``rng`` key, :math:`z^*` held fixed), to be added to the loss.
        abstol, reltol: convergence test of every batch element,
            :math:`\\lVert f(z^*, x) - z^*\\rVert_2 \\le \\text{abstol} + \\text{reltol}\\lVert z^*\\rVert_2`,
            for both kinds of solver (the continuous solve stops at the first accepted
            step where it holds).
        maxiters: solver iterations (discrete; default 100) or ODE trial steps
            (continuous; default 1000).
        on_failure: when the solve does not converge: ``"warn"`` (default; a
            :class:`~pylux.nonlinear.ConvergenceWarning` naming the solver and the residual
            reached, ``retcode`` MaxIters), ``"raise"``
            (:class:`~pylux.nonlinear.NonlinearSolveError`, whose ``.solution`` is the
            partial result) or ``"ignore"``. In a discrete solve, a batch element whose
            iterates become NaN/Inf is a failure of the same kind: the rest of the batch
            is still solved, and with ``"warn"`` (a warning naming how many elements
            failed) or ``"ignore"`` the layer returns the batch, that element at its best
            finite iterate, ``retcode`` Unstable and ``st["solution"].sample_unstable``
            marking it. NaN/Inf in a continuous solve always raises (one ODE solve
            carries the whole batch). The backward pass of a non-converged forward pass
            is flagged again by the sensealg (and raises where ``f`` is not finite).
        throw: the other spelling of the same policy (:func:`pylux.core.failures.failure_policy`):
            ``True`` is ``on_failure="raise"``, ``False`` is ``"ignore"``; giving both,
            with different meanings, is an error.
        horizon: the continuous solve's end time (default 1e3); reaching it without a
            steady state counts as non-convergence. Continuous DEQs only.
        ode_options: keywords for :func:`pylux.solve` of the continuous solve
            (``reltol``, ``abstol``, ``dt``, ``controller``, ...; default ``reltol`` and
            ``abstol`` a tenth of the layer's: local step errors at the level of the
            steady-state test would keep the residual from falling below it; ``reltol``
            never below 4 machine epsilons of the state's dtype, where :func:`pylux.solve`
            would clamp it). Continuous DEQs only.
"""


class DEQ(_EquilibriumLayer):
    __doc__ = """Deep equilibrium layer: :math:`x \\mapsto z^*` with :math:`z^* = f_\\theta(z^*, x)`.

    Discrete (Bai et al. 2019) or continuous (Pal et al. 2022) depending on the
    solver; the solve starts from :math:`z = 0`. DeepEquilibriumNetworks.jl's
    ``DeepEquilibriumNetwork`` (also available under that name).
    """ + _COMMON_DOC + """        state_shape: per-sample shape of :math:`z` (default: that of ``x``).

    Parameters ``ps``: ``{"model": ps of model}``.

    State ``st``: ``{"model": model state, "solution": DEQSolution of the latest
    call (None after setup), "rng": int key of the Jacobian probes}``.

    Returns ``(z*, st)`` with ``z*`` of shape ``(B, *state_shape)``.

    Raises:
        TypeError: a misspelt option (named), a wrong solver or sensealg type.
        ValueError: an option out of range.
        LayerError: ``x`` is not a floating tensor with a batch dimension.
        NonlinearSolveError: non-convergence or NaN/Inf with ``on_failure="raise"``;
            NaN/Inf in a continuous solve whatever the policy.
    """

    def __init__(self, model: AbstractLayer, solver, *, sensealg: AbstractImplicitSensitivity | None = None,
                 jacobian_regularization: float = 0.0, abstol: float = 1e-6, reltol: float = 1e-6,
                 maxiters: int | None = None, on_failure: str | None = None, throw: bool | None = None,
                 horizon: float | None = None, ode_options: Mapping | None = None,
                 state_shape: Sequence[int] | None = None, **unknown):
        where = type(self).__name__
        if not isinstance(model, AbstractLayer):
            raise TypeError(f"{where}: model must be a pylux layer taking (z, x), got {type(model).__name__}")
        self._init_solver_options(where, solver, sensealg, jacobian_regularization, abstol, reltol, maxiters,
                                  on_failure, throw, horizon, ode_options, unknown)
        self.model = model
        self.state_shape = _state_shape(where, state_shape)

    _extra_options = ("state_shape",)

    def init_params(self, rng: torch.Generator) -> dict:
        return {"model": self.model.init_params(rng)}

    def init_state(self, rng: torch.Generator) -> dict:
        return {"model": self.model.init_state(rng), **self._base_state(rng)}

    def _cell(self, st_model, captured):
        model = self.model

        def f(z, x, ps_model):
            out, new_st = model((z, x), ps_model, st_model)
            captured[0] = new_st
            return out
        return f

    def _initial(self, x, ps, st, f, z_zero):
        """``(z0 detached, u0 for the skip loss or None, extra nfe, new init state or None)``."""
        return z_zero, None, 0, None

    def forward(self, x, ps, st):
        x = self._check_input(x)
        key = self._check_key(st)
        captured = [st["model"]]
        f = self._cell(st["model"], captured)
        shape = (x.shape[0],) + (self.state_shape if self.state_shape is not None else tuple(x.shape[1:]))
        z_zero = x.new_zeros(shape)
        z0, u0, extra_nfe, init_st = self._initial(x, ps, st, f, z_zero)
        z0 = z0.detach()
        z_out, solution, next_key = self._equilibrium(f, x, ps["model"], z0, u0, extra_nfe, key)
        new_st = {**st, "model": captured[0], "solution": solution, "rng": next_key}
        if init_st is not None:
            new_st["init_model"] = init_st
        return z_out, new_st

    def __repr__(self) -> str:
        inner = repr(self.model).replace("\n", "\n  ")
        return (f"{type(self).__name__}(\n  {inner},\n  solver={self.solve_strategy!r}, "
                f"sensealg={self.sensealg!r}, jacobian_regularization={self.jacobian_regularization:g}\n)")


class SkipDEQ(DEQ):
    __doc__ = """Skip DEQ and Skip Reg. DEQ (Pal, Edelman & Rackauckas 2022).

    Skip: an explicit network predicts the initial state, :math:`u_0 = g_\\phi(x)`,
    and ``st["solution"].skip_loss`` :math:`= \\mathrm{mean}((z^* - g_\\phi(x))^2)`
    (the paper's :math:`\\lVert f(z^*, x) - g_\\phi(x)\\rVert^2`, as :math:`z^* = f(z^*, x)`)
    trains it to predict the fixed point; gradients reach :math:`\\phi` only through
    this loss (the fixed point does not depend on where the solve starts).

    Skip Reg. (``init_model=None``): :math:`u_0 = f(0, x)` and the loss
    :math:`\\mathrm{mean}((z^* - f(0, x))^2)` regularises ``f`` itself to reach its
    fixed point in one step; no extra parameters. DeepEquilibriumNetworks.jl's
    ``SkipDeepEquilibriumNetwork`` (also available under that name).

    Add ``skip_loss`` (times a weight of your choice) to the training loss.
    """ + _COMMON_DOC + """        init_model: the pylux layer :math:`g_\\phi`, ``x -> u0`` of the state's shape,
            or ``None`` for Skip Reg.
        state_shape: per-sample shape of :math:`z` (default: that of ``x``).

    Parameters ``ps``: ``{"model": ..., "init_model": ...}`` (``init_model`` is ``{}``
    for Skip Reg.).

    State ``st``: as :class:`DEQ`, plus ``"init_model"``.

    Raises:
        LayerError: the init model's output shape differs from the state's (both named).
        (and as :class:`DEQ`)
    """

    def __init__(self, model: AbstractLayer, init_model: AbstractLayer | None, solver, **options):
        if init_model is not None and not isinstance(init_model, AbstractLayer):
            raise TypeError(f"SkipDEQ: init_model must be a pylux layer mapping x to the initial state, or None "
                            f"for Skip Reg., got {type(init_model).__name__}")
        super().__init__(model, solver, **options)
        self.init_model = init_model

    def init_params(self, rng: torch.Generator) -> dict:
        init = {} if self.init_model is None else self.init_model.init_params(rng)
        return {"model": self.model.init_params(rng), "init_model": init}

    def init_state(self, rng: torch.Generator) -> dict:
        init = {} if self.init_model is None else self.init_model.init_state(rng)
        return {**super().init_state(rng), "init_model": init}

    def _initial(self, x, ps, st, f, z_zero):
        if self.init_model is None:
            u0 = f(z_zero, x, ps["model"])
            return u0.detach(), u0, 1, {}
        try:
            u0, init_st = self.init_model(x, ps["init_model"], st["init_model"])
        except LayerError as e:
            raise type(e)(e.raw_message, ("init_model",) + e.path) from None
        if not isinstance(u0, torch.Tensor) or u0.shape != z_zero.shape:
            got = tuple(u0.shape) if isinstance(u0, torch.Tensor) else type(u0).__name__
            raise LayerError(f"init_model returned shape {got} but the DEQ state has shape {tuple(z_zero.shape)}; "
                             "the init model must predict the state z (set state_shape if it differs from x)")
        return u0.detach(), u0, 0, init_st

    def __repr__(self) -> str:
        text = super().__repr__()
        init = "None (Skip Reg.)" if self.init_model is None else repr(self.init_model).replace("\n", "\n  ")
        return text[:-2] + f",\n  init_model={init}\n)"


DeepEquilibriumNetwork = DEQ
SkipDeepEquilibriumNetwork = SkipDEQ


class MultiScaleDEQ(_EquilibriumLayer):
    """Multiscale deep equilibrium layer (Bai, Koltun & Kolter, NeurIPS 2020).

    ``n`` states :math:`z_1, \\dots, z_n` at different resolutions (per-sample
    shapes ``scales``) are solved jointly as ONE fixed point of the flattened
    state :math:`[z_1; \\dots; z_n]` of size :math:`D = \\sum_i d_i`. One
    application of :math:`f` is

    .. math::
        y_1 = \\mathrm{main}_1((z_1, x)), \\quad y_i = \\mathrm{main}_i(z_i)\\ (i > 1), \\qquad
        z_i^{\\text{new}} = \\mathrm{post}_i\\Big(y_i + \\sum_{j \\ne i} \\mathrm{map}_{ij}(y_j)\\Big),

    where :math:`\\mathrm{map}_{ij}` resamples scale ``j`` to scale ``i`` (a strided
    convolution or pooling to go down, an upsampling to go up): each scale's
    update sees all the others (the multi-resolution fusion of MDEQ). Same
    solvers, tolerances, regulariser and backward pass as :class:`DEQ`; the
    Jacobian regulariser uses :math:`d = D`. DeepEquilibriumNetworks.jl's
    ``MultiScaleDeepEquilibriumNetwork`` (also available under that name).
    Skip initialisation is not implemented for this layer; it starts from zeros.

    Args:
        main_layers: ``n`` layers; the first takes ``(z_1, x)``, the others ``z_i``;
            each returns a tensor of its scale's shape.
        mapping_layers: an ``n x n`` nested list; entry ``[i][j]`` (``i != j``) is the
            layer taking scale ``j``'s ``y_j`` to scale ``i``'s shape, or ``None`` for
            no connection; diagonal entries must be ``None``.
        post_fuse_layers: ``n`` layers applied after the fusion, or ``None`` (identity).
        solver, and the keyword options: as :class:`DEQ`.
        scales: the ``n`` per-sample shapes, e.g. ``[(4, 8, 8), (8, 4, 4)]``.

    Parameters ``ps``: ``{"main_i": ..., "map_i_j": ..., "post_i": ...}`` (1-based indices).

    State ``st``: the same keys for the inner states, plus ``"solution"`` (a
    :class:`DEQSolution` whose ``z_star`` is the flat ``(B, D)`` state) and ``"rng"``.

    Returns ``((z*_1, ..., z*_n), st)`` with ``z*_i`` of shape ``(B, *scales[i])``.

    Raises:
        TypeError / ValueError: malformed layer lists or scales, misspelt options.
        LayerError: a layer returning a shape other than its scale's (both named).
        NonlinearSolveError: as :class:`DEQ`.
    """

    def __init__(self, main_layers: Sequence[AbstractLayer], mapping_layers: Sequence[Sequence],
                 post_fuse_layers: Sequence[AbstractLayer] | None, solver, *, scales: Sequence[Sequence[int]],
                 sensealg: AbstractImplicitSensitivity | None = None, jacobian_regularization: float = 0.0,
                 abstol: float = 1e-6, reltol: float = 1e-6, maxiters: int | None = None,
                 on_failure: str | None = None, throw: bool | None = None, horizon: float | None = None,
                 ode_options: Mapping | None = None, **unknown):
        where = "MultiScaleDEQ"
        self._init_solver_options(where, solver, sensealg, jacobian_regularization, abstol, reltol, maxiters,
                                  on_failure, throw, horizon, ode_options, unknown)
        scales = [_state_shape(where, s) for s in scales]
        n = len(scales)
        if n < 1:
            raise ValueError(f"{where}: needs at least one scale")
        main_layers = list(main_layers)
        if len(main_layers) != n:
            raise ValueError(f"{where}: got {len(main_layers)} main layers for {n} scales; give one per scale")
        rows = [list(r) for r in mapping_layers]
        if len(rows) != n or any(len(r) != n for r in rows):
            raise ValueError(f"{where}: mapping_layers must be an {n} x {n} nested list (None for no connection)")
        post = [None] * n if post_fuse_layers is None else list(post_fuse_layers)
        if len(post) != n:
            raise ValueError(f"{where}: got {len(post)} post-fuse layers for {n} scales")
        children: dict[str, AbstractLayer] = {}
        for i, layer in enumerate(main_layers, 1):
            children[f"main_{i}"] = _layer(where, f"main_layers[{i - 1}]", layer)
        for i, row in enumerate(rows, 1):
            for j, layer in enumerate(row, 1):
                if layer is None:
                    continue
                if i == j:
                    raise ValueError(f"{where}: mapping_layers[{i - 1}][{i - 1}] must be None (a scale maps to "
                                     "itself through its main layer)")
                children[f"map_{i}_{j}"] = _layer(where, f"mapping_layers[{i - 1}][{j - 1}]", layer)
        for i, layer in enumerate(post, 1):
            if layer is not None:
                children[f"post_{i}"] = _layer(where, f"post_fuse_layers[{i - 1}]", layer)
        self.layers = children
        self.scales = scales
        self.sizes = [int(torch.Size(s).numel()) for s in scales]

    _extra_options = ("scales",)

    def init_params(self, rng: torch.Generator) -> dict:
        return {name: layer.init_params(rng) for name, layer in self.layers.items()}

    def init_state(self, rng: torch.Generator) -> dict:
        return {**{name: layer.init_state(rng) for name, layer in self.layers.items()}, **self._base_state(rng)}

    def _run(self, name, inp, ps, st, new_st, expected):
        try:
            out, new_st[name] = self.layers[name](inp, ps[name], st[name])
        except LayerError as e:
            raise type(e)(e.raw_message, (f"{name} ({type(self.layers[name]).__name__})",) + e.path[1:]) from None
        if out.shape[1:] != expected:
            raise LayerError(f"{name} returned per-sample shape {tuple(out.shape[1:])} but the scale it feeds has "
                             f"shape {expected}")
        return out

    def _cell(self, st, captured):
        n = len(self.scales)

        def f(z_flat, x, ps):
            batch = z_flat.shape[0]
            pieces = torch.split(z_flat, self.sizes, dim=1)
            zs = [p.reshape((batch,) + s) for p, s in zip(pieces, self.scales)]
            new_st: dict = {}
            ys = [self._run("main_1", (zs[0], x), ps, st, new_st, self.scales[0])]
            ys += [self._run(f"main_{i}", zs[i - 1], ps, st, new_st, self.scales[i - 1]) for i in range(2, n + 1)]
            outs = []
            for i in range(1, n + 1):
                fused = ys[i - 1]
                for j in range(1, n + 1):
                    if f"map_{i}_{j}" in self.layers:
                        fused = fused + self._run(f"map_{i}_{j}", ys[j - 1], ps, st, new_st, self.scales[i - 1])
                if f"post_{i}" in self.layers:
                    fused = self._run(f"post_{i}", fused, ps, st, new_st, self.scales[i - 1])
                outs.append(fused.reshape(batch, -1))
            captured[0] = new_st
            return torch.cat(outs, dim=1)
        return f

    def forward(self, x, ps, st):
        x = self._check_input(x)
        key = self._check_key(st)
        layer_st = {name: st[name] for name in self.layers}
        captured = [layer_st]
        f = self._cell(layer_st, captured)
        layer_ps = {name: ps[name] for name in self.layers}
        z0 = x.new_zeros((x.shape[0], sum(self.sizes)))
        z_out, solution, next_key = self._equilibrium(f, x, layer_ps, z0, None, 0, key)
        pieces = torch.split(z_out, self.sizes, dim=1)
        outputs = tuple(p.reshape((x.shape[0],) + s) for p, s in zip(pieces, self.scales))
        return outputs, {**st, **captured[0], "solution": solution, "rng": next_key}

    def __repr__(self) -> str:
        inner = ",\n".join(f"  {k} = " + repr(v).replace("\n", "\n  ") for k, v in self.layers.items())
        return f"MultiScaleDEQ(\n{inner},\n  scales={self.scales}, solver={self.solve_strategy!r}\n)"


MultiScaleDeepEquilibriumNetwork = MultiScaleDEQ


def _layer(where: str, name: str, layer) -> AbstractLayer:
    if not isinstance(layer, AbstractLayer):
        raise TypeError(f"{where}: {name} must be a pylux layer, got {type(layer).__name__}")
    return layer
