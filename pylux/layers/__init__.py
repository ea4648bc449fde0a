"""pylux.layers: implicit layers built from the solvers (so far :class:`NeuralODE`)."""

from .neural_ode import NeuralODE
from .deq import (DEQ, DEQSolution, DeepEquilibriumNetwork, MultiScaleDEQ, MultiScaleDeepEquilibriumNetwork,
                  SkipDEQ, SkipDeepEquilibriumNetwork)

__all__ = ["NeuralODE"]
__all__ += ["DEQ", "DEQSolution", "DeepEquilibriumNetwork", "MultiScaleDEQ",
            "MultiScaleDeepEquilibriumNetwork", "SkipDEQ", "SkipDeepEquilibriumNetwork"]
