"""pylux.sensitivity: how gradients flow through ``solve(..., sensealg=...)``.

So far: :class:`DirectAdjoint` (backprop through the solver) and
:class:`BacksolveAdjoint` (Chen et al. 2018, optional seminorm of Kidger et al. 2021).
"""

from ._params import HiddenParameterError
from .backsolve import BacksolveAdjoint, DirectAdjoint, InterpolatingAdjoint
from .steady_state import AbstractImplicitSensitivity, JacobianFreeBackprop, SteadyStateAdjoint

__all__ = ["BacksolveAdjoint", "DirectAdjoint", "InterpolatingAdjoint", "HiddenParameterError"]
__all__ += ["AbstractImplicitSensitivity", "JacobianFreeBackprop", "SteadyStateAdjoint"]
