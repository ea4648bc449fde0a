"""pylux.diffeq: ODE problems, Runge–Kutta and Adams solvers, adaptive stepping, dense output.

User API (DifferentialEquations.jl names)::

    sol = solve(ODEProblem(f, u0, (t0, t1), p), Tsit5(), reltol=1e-6, abstol=1e-6, saveat=ts)
    sol.t, sol.u, sol(t), sol.retcode, sol.stats

Internal contracts used by ``pylux.sensitivity`` and ``pylux.regularize`` (kept stable):

* terms — ``ODETerm(f)``, ``ControlTerm(g, control)``, ``MultiTerm(...)``
  (:mod:`.terms`): what a solver steps over, bound to parameters with ``term.bind(p)``;
* the pure step — ``solver.init(term, t0, u0, dt0, f0=None)`` and
  ``solver.step(term, t, u, dt, state) -> StepResult`` with ``t``, ``dt``
  0-d device tensors and a step status (:mod:`.solvers`);
* the one loop on plain tensors — ``integrate(term, u0, t0, t1, solver, options)``
  with a bound term or ``f(u, t)`` and canonical :class:`SolveOptions`
  (:mod:`.integrate`, :mod:`.options`); fixed steps are the
  :class:`ConstantStepSize` controller;
* per-step internals in ``sol.stats`` with ``save_stats=True`` (:class:`SolverStats`);
* ``AbstractSensitivityAlgorithm.solve_with(problem, solver, options)``, which
  ``solve(..., sensealg=...)`` dispatches to.

This package depends on torch and numpy, and on ``pylux.core`` (failure vocabulary,
keyword checker); it imports no higher pylux package.
"""

from .callbacks import AbstractTerminationCallback, TerminateSteadyState, TerminateWhen
from .controllers import (AbstractController, ConstantStepSize, ControllerState, IController, PIController,
                          hairer_initial_step, initial_step_size)
from .integrate import integrate
from .interpolation import AbstractInterpolant, DenseOutput, HermiteInterpolant, StageInterpolant
from .multistep import VCAB3
from .norms import MixedNorm, SemiNorm, max_norm, rms_norm, scaled_error_norm
from .options import SolveOptions, make_options
from .problem import ODEProblem
from .brownian import BrownianTree
from .reversible import Reversible
from .sde import EulerHeun, EulerMaruyama, Milstein, ReversibleHeun, SDEProblem
from .sde_srk import SOSRA, SOSRI, SRA1, SRIW1
from .solution import (DtLessThanMinError, FailureError, MaxItersError, ReturnCode, Solution, SolverError,
                       SolverStats, UnstableError)
from .solve import AbstractSensitivityAlgorithm, check_sensealg, solve
from .solvers import (BS3, DP5, RK4, AbstractAdaptiveSolver, AbstractSolver, Euler,
                      ExplicitRungeKutta, Heun, Midpoint, StepResult, StepStatus, Tsit5)
from .terms import AbstractControl, AbstractTerm, BoundTerm, ControlTerm, MultiTerm, ODETerm
from .splines import AbstractSplineControl, CubicSpline, HermiteCubicSpline, LinearInterpolation
from .tableau import ButcherTableau, TableauError
from .rosenbrock import Rodas5P, Rosenbrock23
from .implicit import ImplicitEuler, Kvaerno5, TRBDF2
from .autoswitch import AutoSwitch
from .callbacks import AbstractEventCallback, ContinuousCallback, DiscreteCallback, terminate
from .events import EventLog
from .second_order import SecondOrderODEProblem

__all__ = [
    # problems and solving
    "ODEProblem", "solve", "integrate", "SolveOptions", "make_options",
    # stochastic differential equations
    "SDEProblem", "BrownianTree", "EulerMaruyama", "EulerHeun", "Milstein", "ReversibleHeun",
    "SRIW1", "SOSRI", "SRA1", "SOSRA",
    # terms
    "AbstractTerm", "ODETerm", "ControlTerm", "MultiTerm", "BoundTerm", "AbstractControl",
    # solvers
    "AbstractSolver", "AbstractAdaptiveSolver", "ExplicitRungeKutta", "ButcherTableau", "TableauError",
    "StepResult", "StepStatus", "Euler", "Midpoint", "Heun", "RK4", "BS3", "Tsit5", "DP5", "VCAB3",
    "Reversible",
    # step-size control and norms
    "AbstractController", "PIController", "IController", "ConstantStepSize", "ControllerState",
    "initial_step_size",
    "hairer_initial_step",
    "rms_norm", "max_norm", "SemiNorm", "MixedNorm", "scaled_error_norm",
    # output
    "Solution", "SolverStats", "ReturnCode", "SolverError", "MaxItersError", "DtLessThanMinError",
    "UnstableError", "FailureError", "AbstractInterpolant", "StageInterpolant", "HermiteInterpolant", "DenseOutput",
    # callbacks and sensitivity hook
    "AbstractTerminationCallback", "TerminateSteadyState", "TerminateWhen",
    "AbstractSensitivityAlgorithm", "check_sensealg",
]
__all__ += ["AbstractSplineControl", "CubicSpline", "HermiteCubicSpline", "LinearInterpolation"]
__all__ += ["AbstractEventCallback", "ContinuousCallback", "DiscreteCallback", "terminate", "EventLog",
            "SecondOrderODEProblem"]
# stiff solvers and automatic stiffness switching
__all__ += ["Rosenbrock23", "Rodas5P", "ImplicitEuler", "TRBDF2", "Kvaerno5", "AutoSwitch"]
