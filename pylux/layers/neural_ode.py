"""The NeuralODE layer (DiffEqFlux's ``NeuralODE``, Chen et al., NeurIPS 2018)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..core import AbstractLayer, LayerError
from ..core.keywords import check_keywords
from ..diffeq import AbstractSensitivityAlgorithm, ODEProblem, Tsit5, check_sensealg, solve
from ..diffeq.options import SOLVE_KEYWORDS
from ..diffeq.solvers import AbstractSolver
from ..regularize.regularized_solve import RegularizedSolve, solution_state

__all__ = ["NeuralODE"]

#: solve() keywords the layer chooses itself (it returns z at ``saveat`` or at t1).
_LAYER_CHOSEN = ("save_everystep", "save_start", "save_end", "dense")
#: the layer's own keywords, for the "did you mean" of a misspelt one.
_LAYER_KEYWORDS = ("solver", "sensealg", "saveat", "regularize", "time_input")


class NeuralODE(AbstractLayer):
    r"""Integrate :math:`\dot z = f_\theta(z)` with a pylux layer as the vector field.

    ``NeuralODE(model, tspan, solver=Tsit5(), sensealg=None, saveat=None, regularize=None, **solve_kwargs)``
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
        time_input: if True the model is called with the pair ``(z, t)`` (``t`` a
            0-d tensor of ``z``'s dtype), for vector fields that depend on time.
        regularize: a :class:`~pylux.regularize.AbstractRegularizer` or a list of
            them (ERNODE/SRNODE, local, STEER, RNODE, TayNODE terms). They act in
            train mode only: a test-mode call solves the plain ODE to ``t1`` and
            reports a zero regularization, so prediction cost is that of the
            unregularized layer.
        **solve_kwargs: passed to :func:`pylux.solve` (``reltol``, ``abstol``,
            ``maxiters``, …); misspelt names are rejected when the layer is built,
            with the closest known keyword.

    Raises:
        TypeError: a model, solver or regularizer of the wrong type, an unknown keyword.
        ValueError: a bad ``tspan``; ``saveat`` together with a regularizer that
            changes the end time (STEER).
        NotImplementedError: a regularizer that cannot work with ``sensealg``
            (raised here, before any solve).

    Parameters ``ps``: the inner model's parameters, unchanged (a wrapper layer).
    State ``st``: ``{"model": inner state, "nfe": int, "naccept": int, "nreject": int,
    "backward_stats": dict}`` where the counters are those of the latest forward
    solve and ``backward_stats`` is that solve's handle to the counters of its
    backward pass (``nf``, ``nvjp``, …; see
    :class:`~pylux.sensitivity.BackwardStats`), filled in when ``backward()``
    runs, and empty for ``sensealg=None`` (backprop through the solver).
    With ``regularize`` the state also has ``"training"`` (bool), ``"rng"``
    (int key, advanced in each train-mode call, as in Dropout),
    ``"regularization"`` (0-d tensor: the sum of the regularizers' values,
    differentiable with respect to ``ps``), ``"regularization_terms"`` (dict
    name -> 0-d tensor, one per regularizer) and ``"regularization_nfe"`` (int:
    evaluations of ``f`` the regularizers made after the solve, e.g. the local
    regularizer's extra step).

    The regularizers run through :class:`pylux.regularize.RegularizedSolve`
    (``layer.regularized``), which augments the state with the integral
    regularizers' channels, solves, splits them off and fills these entries.
    """

    def __init__(self, model: AbstractLayer, tspan, solver: AbstractSolver | None = None, *,
                 sensealg: AbstractSensitivityAlgorithm | None = None, saveat=None, regularize=None,
                 time_input: bool = False, **solve_kwargs: Any):
        if not isinstance(model, AbstractLayer):
            raise TypeError(f"NeuralODE: model must be a pylux layer, got {type(model).__name__}")
        if len(tuple(tspan)) != 2:
            raise ValueError(f"NeuralODE: tspan must be a pair (t0, t1), got {tspan!r}")
        solver = Tsit5() if solver is None else solver
        if not isinstance(solver, AbstractSolver):
            raise TypeError(f"NeuralODE: solver must be a pylux solver such as Tsit5(), got {solver!r}")
        forbidden = set(_LAYER_CHOSEN) & solve_kwargs.keys()
        if forbidden:
            raise TypeError(f"NeuralODE: {sorted(forbidden)} are chosen by the layer; use saveat")
        known = _LAYER_KEYWORDS + tuple(k for k in SOLVE_KEYWORDS if k not in _LAYER_CHOSEN + _LAYER_KEYWORDS)
        check_keywords({k: v for k, v in solve_kwargs.items() if k not in SOLVE_KEYWORDS}, "NeuralODE", known)
        if not isinstance(time_input, bool):
            raise TypeError(f"NeuralODE: time_input must be True or False, got {time_input!r}")
        self.time_input = time_input
        self.model = model
        self.tspan = tuple(float(t) for t in tspan)
        self.solver = solver
        self.sensealg = check_sensealg(sensealg, "NeuralODE")
        self.saveat = None if saveat is None else [float(t) for t in saveat]
        self.solve_kwargs = dict(solve_kwargs)
        self.regularized = RegularizedSolve(regularize, self.tspan, solver, sensealg, saveat=self.saveat,
                                            owner="NeuralODE")
        self.regularizers = self.regularized.regularizers

    def init_params(self, rng: torch.Generator) -> dict:
        return self.model.init_params(rng)

    def init_state(self, rng: torch.Generator) -> dict:
        st = {"model": self.model.init_state(rng), "nfe": 0, "naccept": 0, "nreject": 0, "backward_stats": {}}
        st.update(self.regularized.init_state(rng))
        return st

    def forward(self, x: torch.Tensor, ps: Mapping, st: Mapping):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise LayerError(f"expected a floating-point tensor as the initial state, got "
                             f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        vector_field = self._vector_field(st["model"])
        new_st = dict(st)
        if self.regularized.is_training(st):
            result = self.regularized.solve(vector_field, x, ps, st, **self.solve_kwargs)
            new_st.update(solution_state(result.solution), **result.state())
            return result.y, new_st
        prob = ODEProblem(vector_field, x, self.tspan, ps)
        saveat = self.saveat if self.saveat is not None else [self.tspan[1]]
        sol = solve(prob, self.solver, saveat=saveat, sensealg=self.sensealg, **self.solve_kwargs)
        new_st.update(solution_state(sol), **self.regularized.inactive_state(x, st))
        return (sol.u if self.saveat is not None else sol.u[-1]), new_st

    def _vector_field(self, inner_st: Mapping):
        """``f(u, p, t)``: the model with its state held fixed during the solve."""
        model, time_input = self.model, self.time_input

        def vector_field(u, p, t):
            du, _ = model((u, t) if time_input else u, p, inner_st)
            return du
        return vector_field

    def __repr__(self) -> str:
        inner = repr(self.model).replace("\n", "\n  ")
        regs = f", regularize={list(self.regularizers)!r}" if self.regularizers else ""
        return (f"NeuralODE(\n  {inner},\n  tspan={self.tspan}, solver={self.solver!r}, "
                f"sensealg={self.sensealg!r}{regs}\n)")
