"""pylux.regularize: regularizers that make learned dynamics cheap to solve.

Depends on pylux.core, pylux.nn, pylux.diffeq, pylux.nonlinear and
pylux.sensitivity; the layers in :mod:`pylux.layers` use it, never the reverse.
"""

from .base import AbstractIntegralRegularizer, AbstractRegularizer, RegularizationContext, batch_size
from .hutchinson import hutchinson_vjp_frobenius, rademacher_like

__all__ = ["hutchinson_vjp_frobenius", "rademacher_like"]
__all__ += ["AbstractRegularizer", "AbstractIntegralRegularizer", "RegularizationContext", "batch_size"]
