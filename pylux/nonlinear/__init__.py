"""pylux.nonlinear: fixed-point / root solvers and matrix-free linear solvers.

``nlsolve(g, z0, solver)`` finds ``z = g(z)`` for a batch of independent
problems with one of :class:`FixedPointIteration`, :class:`Broyden`,
:class:`LimitedMemoryBroyden`, :class:`Anderson` or :class:`NewtonKrylov`;
:func:`gmres` solves batched linear systems given only a matrix-vector product
(the implicit backward pass of a deep equilibrium model solves
``(I - J)^T lambda = v`` with it). Depends on torch and pylux.core only.
"""

from ._base import AbstractNonlinearSolver
from ._errors import ConvergenceWarning, NonlinearReturnCode, NonlinearSolveError
from .anderson import Anderson
from .broyden import Broyden, LimitedMemoryBroyden
from .fixed_point import FixedPointIteration
from .gmres import GMRESResult, gmres
from .newton_krylov import NewtonKrylov
from .nlsolve import NonlinearSolution, nlsolve

__all__ = [
    "AbstractNonlinearSolver", "Anderson", "Broyden", "ConvergenceWarning", "FixedPointIteration",
    "GMRESResult", "LimitedMemoryBroyden", "NewtonKrylov", "NonlinearReturnCode", "NonlinearSolution",
    "NonlinearSolveError", "gmres", "nlsolve",
]
