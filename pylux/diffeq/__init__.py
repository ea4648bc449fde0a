"""pylux.diffeq: ODE problems, Runge–Kutta and Adams solvers, adaptive stepping, dense output.

User API (DifferentialEquations.jl names)::

    sol = solve(ODEProblem(f, u0, (t0, t1), p), Tsit5(), reltol=1e-6, abstol=1e-6, saveat=ts)
    sol.t, sol.u, sol(t), sol.retcode, sol.stats

Internal contracts used by ``pylux.sensitivity`` and ``pylux.regularize`` (kept stable):

* the pure step — ``solver.init(f, t0, u0, dt0, f0=None)`` and
  ``solver.step(f, t, u, dt, state) -> StepResult`` (:mod:`.solvers`);
* the loop on plain tensors — ``integrate(f, u0, t0, t1, solver, options)``
  with ``f(u, t)`` and canonical :class:`SolveOptions` (:mod:`.integrate`,
  :mod:`.options`);
* per-step internals in ``sol.stats`` with ``save_stats=True`` (:class:`SolverStats`);
* ``AbstractSensitivityAlgorithm.solve_with(problem, solver, options)``, which
  ``solve(..., sensealg=...)`` dispatches to.

This package depends on torch and numpy only; it imports no other pylux package.
"""

from .callbacks import AbstractTerminationCallback, TerminateSteadyState, TerminateWhen
from .controllers import AbstractController, ControllerState, IController, PIController, initial_step_size
from .integrate import integrate
from .interpolation import AbstractInterpolant, DenseOutput, HermiteInterpolant, StageInterpolant
from .multistep import VCAB3
from .norms import MixedNorm, SemiNorm, max_norm, rms_norm, scaled_error_norm
from .options import SolveOptions, make_options
from .problem import ODEProblem
from .solution import (DtLessThanMinError, MaxItersError, ReturnCode, Solution, SolverError,
                       SolverStats, UnstableError)
from .solve import AbstractSensitivityAlgorithm, solve
from .solvers import (BS3, DP5, RK4, AbstractAdaptiveSolver, AbstractSolver, Euler,
                      ExplicitRungeKutta, Heun, Midpoint, StepResult, Tsit5)
from .tableau import ButcherTableau, TableauError

__all__ = [
    # problems and solving
    "ODEProblem", "solve", "integrate", "SolveOptions", "make_options",
    # solvers
    "AbstractSolver", "AbstractAdaptiveSolver", "ExplicitRungeKutta", "ButcherTableau", "TableauError",
    "StepResult", "Euler", "Midpoint", "Heun", "RK4", "BS3", "Tsit5", "DP5", "VCAB3",
    # step-size control and norms
    "AbstractController", "PIController", "IController", "ControllerState", "initial_step_size",
    "rms_norm", "max_norm", "SemiNorm", "MixedNorm", "scaled_error_norm",
    # output
    "Solution", "SolverStats", "ReturnCode", "SolverError", "MaxItersError", "DtLessThanMinError",
    "UnstableError", "AbstractInterpolant", "StageInterpolant", "HermiteInterpolant", "DenseOutput",
    # callbacks and sensitivity hook
    "AbstractTerminationCallback", "TerminateSteadyState", "TerminateWhen",
    "AbstractSensitivityAlgorithm",
]
