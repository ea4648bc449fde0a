"""pylux: fast neural differential equations and deep equilibrium models in PyTorch.

The API mirrors Lux.jl (explicit parameters and state), the solver and adjoint
vocabulary of DifferentialEquations.jl / SciMLSensitivity.jl, and the implicit
layers of DeepEquilibriumNetworks.jl.
"""

from . import core, data, diffeq, interop, layers, nn, nonlinear, sensitivity, training
from .core import (
    AbstractContainerLayer,
    AbstractLayer,
    LayerError,
    TreeStructureError,
    apply,
    flatten,
    parameter_count,
    retain_freed_cpu_memory,
    setup,
    state_count,
    testmode,
    trainmode,
    tree_map,
)
from .diffeq import (
    BS3,
    DP5,
    BrownianTree,
    RK4,
    VCAB3,
    AbstractSensitivityAlgorithm,
    ButcherTableau,
    ConstantStepSize,
    ControlTerm,
    DtLessThanMinError,
    Euler,
    EulerHeun,
    EulerMaruyama,
    ExplicitRungeKutta,
    Heun,
    IController,
    FailureError,
    MaxItersError,
    Midpoint,
    Milstein,
    MultiTerm,
    ODEProblem,
    ODETerm,
    PIController,
    ReturnCode,
    Reversible,
    ReversibleHeun,
    SDEProblem,
    SOSRA,
    SOSRI,
    SRA1,
    SRIW1,
    SemiNorm,
    Solution,
    SolverError,
    SolverStats,
    StepStatus,
    TerminateSteadyState,
    TerminateWhen,
    Tsit5,
    UnstableError,
    rms_norm,
    solve,
)
from .nonlinear import (
    Anderson,
    Broyden,
    ConvergenceWarning,
    FixedPointIteration,
    LimitedMemoryBroyden,
    NewtonKrylov,
    NonlinearReturnCode,
    NonlinearSolution,
    NonlinearSolveError,
    gmres,
    nlsolve,
)
from .layers import NeuralODE, NeuralSDE
from .layers import ODERNN, LatentODE, NeuralCDE
from .diffeq import CubicSpline, HermiteCubicSpline, LinearInterpolation
from .layers import FFJORD, StandardNormal
from .layers import (DEQ, ContinuousSolve, DEQSolution, DeepEquilibriumNetwork, DiscreteSolve, EquilibriumResult,
                     MultiScaleDEQ, MultiScaleDeepEquilibriumNetwork, SkipDEQ, SkipDeepEquilibriumNetwork)
from .sensitivity import JacobianFreeBackprop, SteadyStateAdjoint
from .regularize import (
    STEER,
    AbstractRegularizer,
    ErrorEstimateRegularization,
    JacobianFrobeniusRegularization,
    KineticRegularization,
    LocalErrorRegularization,
    StiffnessRegularization,
)
from .sensitivity import (BacksolveAdjoint, DirectAdjoint, HiddenParameterError, InterpolatingAdjoint,
                          QuadratureAdjoint, ReversibleAdjoint)

from .regularize import TaylorRegularization
from . import distributed
from .interop import StatefulLayer, odeint, odeint_adjoint
from .training import BinaryCrossEntropyLoss, CrossEntropyLoss, MSELoss

from .diffeq import ContinuousCallback, DiscreteCallback, SecondOrderODEProblem, terminate

from .diffeq import AutoSwitch, ImplicitEuler, Kvaerno5, Rodas5P, Rosenbrock23, TRBDF2

__version__ = "0.1.0"
