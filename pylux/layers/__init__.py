"""pylux.layers: layers built from the solvers.

* :class:`NeuralODE`: :math:`x \\mapsto z(t_1)` with :math:`\\dot z = f_\\theta(z)`, :math:`z(t_0) = x`
  (or the trajectory at ``saveat``; optionally time-dependent and regularized);
* :class:`FFJORD`: a continuous normalizing flow, :math:`x \\mapsto \\log p(x)` (Grathwohl et al. 2019),
  with its base distribution :class:`StandardNormal`;
* :class:`NeuralSDE`: the same with a diffusion layer, :math:`dz = f_\\theta(z)\\,dt + g_\\phi(z)\\,dW`;
* deep equilibrium layers: :class:`DEQ` (Bai, Kolter & Koltun 2019), :class:`SkipDEQ`
  (Skip and Skip Reg. DEQs; Pal, Edelman & Rackauckas 2022) and :class:`MultiScaleDEQ`
  (Bai, Koltun & Kolter 2020), with their DeepEquilibriumNetworks.jl names
  (:class:`DeepEquilibriumNetwork`, :class:`SkipDeepEquilibriumNetwork`,
  :class:`MultiScaleDeepEquilibriumNetwork`), each solved discretely (:class:`DiscreteSolve`)
  or continuously (:class:`ContinuousSolve`; Pal et al. 2022); their state holds a
  :class:`DEQSolution`, and a solve strategy returns an :class:`EquilibriumResult`.
"""

from .neural_ode import NeuralODE
from .neural_sde import NeuralSDE
from .cde import NeuralCDE
from .odernn import ODERNN, GRUCell, LatentODE
from .distributions import StandardNormal
from .ffjord import FFJORD
from .deq import (DEQ, AbstractEquilibriumSolve, ContinuousSolve, DEQSolution, DeepEquilibriumNetwork, DiscreteSolve,
                  EquilibriumResult, MultiScaleDEQ, MultiScaleDeepEquilibriumNetwork, SkipDEQ,
                  SkipDeepEquilibriumNetwork)

__all__ = ["NeuralODE", "NeuralSDE"]
__all__ += ["FFJORD", "StandardNormal"]
__all__ += ["DEQ", "DEQSolution", "DeepEquilibriumNetwork", "MultiScaleDEQ",
            "MultiScaleDeepEquilibriumNetwork", "SkipDEQ", "SkipDeepEquilibriumNetwork",
            "AbstractEquilibriumSolve", "DiscreteSolve", "ContinuousSolve", "EquilibriumResult"]
__all__ += ["NeuralCDE", "ODERNN", "GRUCell", "LatentODE"]
