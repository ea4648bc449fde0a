"""pylux.regularize: regularizers that make learned dynamics cheap to solve.

Depends on pylux.core, pylux.nn, pylux.diffeq, pylux.nonlinear and
pylux.sensitivity; the layers in :mod:`pylux.layers` use it, never the reverse.
"""

from .base import AbstractIntegralRegularizer, AbstractRegularizer, RegularizationContext, batch_size
from .errors import ErrorEstimateRegularization, StiffnessRegularization
from .hutchinson import hutchinson_vjp_frobenius, rademacher_like
from .integral import JacobianFrobeniusRegularization, KineticRegularization
from .local import LocalErrorRegularization
from .regularized_solve import RegularizedSolution, RegularizedSolve, as_regularizers, solution_state
from .steer import STEER
from .taylor import (TaylorFallbackWarning, TaylorLayerContext, TaylorRegularization, TaylorRuleError, TaylorSeries,
                     append_time, register_taylor_rule, solution_taylor_coefficients, taylor_coefficients)

__all__ = ["hutchinson_vjp_frobenius", "rademacher_like"]
__all__ += ["RegularizedSolve", "RegularizedSolution", "as_regularizers", "solution_state"]
__all__ += ["AbstractRegularizer", "AbstractIntegralRegularizer", "RegularizationContext", "batch_size",
            "ErrorEstimateRegularization", "StiffnessRegularization", "LocalErrorRegularization", "STEER",
            "KineticRegularization", "JacobianFrobeniusRegularization"]
__all__ += ["TaylorRegularization", "TaylorSeries", "TaylorFallbackWarning", "TaylorRuleError", "append_time",
            "taylor_coefficients", "solution_taylor_coefficients", "register_taylor_rule", "TaylorLayerContext"]
