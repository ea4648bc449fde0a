"""The NeuralODE layer (DiffEqFlux's ``NeuralODE``, Chen et al., NeurIPS 2018)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..core import AbstractLayer, LayerError
from ..diffeq import AbstractSensitivityAlgorithm, ODEProblem, Tsit5, solve
from ..diffeq.options import SOLVE_KEYWORDS, check_keywords
from ..diffeq.solvers import AbstractSolver

__all__ = ["NeuralODE"]


class NeuralODE(AbstractLayer):
    r"""Integrate :math:`\dot z = f_\theta(z)` with a pylux layer as the vector field.

    ``NeuralODE(model, tspan, solver=Tsit5(), sensealg=None, saveat=None, **solve_kwargs)``
    maps ``x`` to :math:`z(t_1)` where :math:`z(t_0) = x` and
    :math:`\dot z = \mathrm{model}(z, \theta, st)`. With ``saveat`` it returns the
    trajectory at those times, stacked along a new first dimension.

    Args:
        model: any pylux layer mapping a state to its time derivative (same shape).
            Time enters only if the layer itself uses it (the inner layer's state
            is held fixed during the solve, as in DiffEqFlux).
        tspan: ``(t0, t1)``.
        solver: a pylux ODE solver (default Tsit5).
        sensealg: how gradients flow (``None``: backprop through the solver;
            e.g. ``BacksolveAdjoint(seminorm=True)``).
        saveat: times to return; ``None`` returns only the final state.
        **solve_kwargs: passed to :func:`pylux.solve` (``reltol``, ``abstol``,
            ``maxiters``, …); misspelt names are rejected when the layer is built.

    Parameters ``ps``: the inner model's parameters, unchanged (a wrapper layer).
    State ``st``: ``{"model": inner state, "nfe": int, "naccept": int, "nreject": int}``
    where the counters are those of the latest forward solve. The backward
    solve's counters are on the sensitivity algorithm (``last_backward_stats``).
    """

    def __init__(self, model: AbstractLayer, tspan, solver: AbstractSolver | None = None, *,
                 sensealg: AbstractSensitivityAlgorithm | None = None, saveat=None, **solve_kwargs: Any):
        if not isinstance(model, AbstractLayer):
            raise TypeError(f"NeuralODE: model must be a pylux layer, got {type(model).__name__}")
        if len(tuple(tspan)) != 2:
            raise ValueError(f"NeuralODE: tspan must be a pair (t0, t1), got {tspan!r}")
        solver = Tsit5() if solver is None else solver
        if not isinstance(solver, AbstractSolver):
            raise TypeError(f"NeuralODE: solver must be a pylux solver such as Tsit5(), got {solver!r}")
        forbidden = {"save_everystep", "save_start", "save_end", "dense"} & solve_kwargs.keys()
        if forbidden:
            raise TypeError(f"NeuralODE: {sorted(forbidden)} are chosen by the layer; use saveat")
        check_keywords({k: v for k, v in solve_kwargs.items() if k not in SOLVE_KEYWORDS}, "NeuralODE")
        self.model = model
        self.tspan = tuple(float(t) for t in tspan)
        self.solver = solver
        self.sensealg = sensealg
        self.saveat = None if saveat is None else [float(t) for t in saveat]
        self.solve_kwargs = dict(solve_kwargs)

    def init_params(self, rng: torch.Generator) -> dict:
        return self.model.init_params(rng)

    def init_state(self, rng: torch.Generator) -> dict:
        return {"model": self.model.init_state(rng), "nfe": 0, "naccept": 0, "nreject": 0}

    def forward(self, x: torch.Tensor, ps: Mapping, st: Mapping):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise LayerError(f"expected a floating-point tensor as the initial state, got "
                             f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        inner_st = st["model"]
        model = self.model

        def vector_field(u, p, t):
            du, _ = model(u, p, inner_st)
            return du

        prob = ODEProblem(vector_field, x, self.tspan, ps)
        saveat = self.saveat if self.saveat is not None else [self.tspan[1]]
        sol = solve(prob, self.solver, saveat=saveat, sensealg=self.sensealg, **self.solve_kwargs)
        y = sol.u if self.saveat is not None else sol.u[-1]
        new_st = dict(st)
        new_st.update(nfe=sol.stats.nf, naccept=sol.stats.naccept, nreject=sol.stats.nreject)
        return y, new_st

    def __repr__(self) -> str:
        inner = repr(self.model).replace("\n", "\n  ")
        return (f"NeuralODE(\n  {inner},\n  tspan={self.tspan}, solver={self.solver!r}, "
                f"sensealg={self.sensealg!r}\n)")
