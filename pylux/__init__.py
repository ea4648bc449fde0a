"""pylux: fast neural differential equations and deep equilibrium models in PyTorch.

The API mirrors Lux.jl (explicit parameters and state), the solver and adjoint
vocabulary of DifferentialEquations.jl / SciMLSensitivity.jl, and the implicit
layers of DeepEquilibriumNetworks.jl.
"""

from .core import (
    AbstractContainerLayer,
    AbstractLayer,
    LayerError,
    TreeStructureError,
    apply,
    flatten,
    parameter_count,
    setup,
    state_count,
    testmode,
    trainmode,
    tree_map,
)

__version__ = "0.1.0"
