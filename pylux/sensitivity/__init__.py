"""pylux.sensitivity: how gradients flow through ``solve(..., sensealg=...)``.

* :class:`DirectAdjoint` — backpropagate through the solver (discretise-then-optimise);
* continuous adjoints (:mod:`.continuous`): :class:`BacksolveAdjoint` (Chen et al. 2018,
  optional seminorm of Kidger et al. 2021), :class:`InterpolatingAdjoint` (optionally
  checkpointed), :class:`QuadratureAdjoint`;
* :class:`ReversibleAdjoint` — exact discrete gradients at O(1) memory through an
  algebraically reversible Runge–Kutta method (McCallum & Foster 2024);
* implicit differentiation of steady states for deep equilibrium models (:mod:`.steady_state`).
"""

from ._params import HiddenParameterError
from .continuous import BackwardStats, BacksolveAdjoint, InterpolatingAdjoint, QuadratureAdjoint
from .direct import DirectAdjoint
from .per_sample import per_sample_backsolve  # noqa: F401  (registers BacksolveAdjoint for batch='per-sample')
from .reversible import ReversibleAdjoint
from .per_sample_reversible import per_sample_reversible  # noqa: F401  (registers ReversibleAdjoint for batch='per-sample')
from .steady_state import AbstractImplicitSensitivity, JacobianFreeBackprop, SteadyStateAdjoint

__all__ = ["BackwardStats", "BacksolveAdjoint", "DirectAdjoint", "InterpolatingAdjoint", "QuadratureAdjoint",
           "ReversibleAdjoint", "HiddenParameterError"]
__all__ += ["AbstractImplicitSensitivity", "JacobianFreeBackprop", "SteadyStateAdjoint"]
