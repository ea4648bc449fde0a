r"""The NeuralSDE layer (DiffEqFlux's ``NeuralDSDE``; Tzen & Raginsky 2019, Li et al. 2020, Kidger et al. 2021)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..core import AbstractLayer, LayerError, check_key, key_generator
from ..core.keywords import check_keywords
from ..diffeq import SDEProblem, check_sensealg, solve
from ..diffeq.options import SOLVE_KEYWORDS
from ..diffeq.sde import NOISE_TYPES, AbstractSDESolver, EulerHeun
from ..regularize.base import AbstractIntegralRegularizer
from ..regularize.regularized_solve import RegularizedSolve, solution_state

__all__ = ["NeuralSDE"]

_LAYER_CHOSEN = ("save_everystep", "save_start", "save_end", "dense")
_LAYER_KEYWORDS = ("solver", "sensealg", "saveat", "regularize", "noise", "noise_dim", "interpretation",
                   "trajectories", "time_input")


class NeuralSDE(AbstractLayer):
    r"""Integrate :math:`dz = f_\theta(z)\,dt + g_\phi(z)\,dW` with pylux layers as drift and diffusion.

    ``NeuralSDE(drift, diffusion, tspan, solver=EulerHeun(), noise="diagonal", sensealg=None,
    saveat=None, regularize=None, trajectories=1, **solve_kwargs)`` maps ``x`` to :math:`z(t_1)`
    with :math:`z(t_0) = x` along one Brownian path per sample (and per trajectory).

    Args:
        drift: a pylux layer, ``z -> f(z)`` of ``z``'s shape.
        diffusion: a pylux layer, ``z -> g(z)`` of the noise type's shape
            (``z``'s shape for diagonal, scalar and additive noise).
        tspan: ``(t0, t1)``.
        solver: an SDE solver (default ``EulerHeun()``, fixed step: pass ``dt=``;
            an adaptive one such as ``SOSRI()`` takes ``reltol``/``abstol``).
        noise: ``"diagonal"`` (default), ``"scalar"``, ``"additive"`` or ``"general"``.
        noise_dim: ``m`` for general noise (the diffusion layer then returns
            ``(*z.shape, m)``), or for additive noise with a matrix diffusion.
        interpretation: ``"ito"`` or ``"stratonovich"``; default: the solver's
            (Stratonovich for EulerHeun and ReversibleHeun, Itô otherwise).
        sensealg: how gradients flow; ``None`` or ``DirectAdjoint()`` backpropagate
            through the solve on its fixed Brownian path (pathwise gradients).
        saveat: times to return (stacked along a new first dimension).
        regularize: error-estimate (``ErrorEstimateRegularization``,
            ``StiffnessRegularization``; they need an adaptive solver with an
            error estimate) or local (``LocalErrorRegularization``) regularizers,
            applied in train mode only. Integral regularizers (kinetic,
            Jacobian) are refused: their channels would need zero diffusion.
        trajectories: ``K > 1`` solves ``K`` independent paths from each ``x``
            at once and returns them along a new leading dimension.
        time_input: as for :class:`~pylux.layers.NeuralODE` (both layers get ``(z, t)``).
        **solve_kwargs: passed to :func:`pylux.solve` (``dt``, ``reltol``, ``abstol``, ...).

    Parameters ``ps``: ``{"drift": ..., "diffusion": ...}``. State ``st``:
    ``{"drift": ..., "diffusion": ..., "rng": int key, "training": bool, "nfe", "ng",
    "naccept", "nreject", "backward_stats"}``, plus the regularization entries
    of :class:`~pylux.layers.NeuralODE` when regularizing. In train mode every
    call draws a fresh Brownian path from ``st["rng"]`` and advances the key;
    in test mode the path comes from ``st["rng"]`` without advancing it, so a
    prediction is reproducible.
    """

    def __init__(self, drift: AbstractLayer, diffusion: AbstractLayer, tspan, solver: AbstractSDESolver | None = None,
                 *, noise: str = "diagonal", noise_dim: int | None = None, interpretation: str | None = None,
                 sensealg=None, saveat=None,
                 regularize=None, trajectories: int = 1, time_input: bool = False, **solve_kwargs: Any):
        for name, layer in (("drift", drift), ("diffusion", diffusion)):
            if not isinstance(layer, AbstractLayer):
                raise TypeError(f"NeuralSDE: {name} must be a pylux layer, got {type(layer).__name__}")
        if len(tuple(tspan)) != 2:
            raise ValueError(f"NeuralSDE: tspan must be a pair (t0, t1), got {tspan!r}")
        solver = EulerHeun() if solver is None else solver
        if not isinstance(solver, AbstractSDESolver):
            raise TypeError(f"NeuralSDE: solver must be an SDE solver such as EulerHeun() or SOSRI(), got {solver!r}")
        if noise not in NOISE_TYPES:
            raise ValueError(f"NeuralSDE: noise must be one of {', '.join(map(repr, NOISE_TYPES))}, got {noise!r}")
        if (noise == "general") != (noise_dim is not None) and noise != "additive":
            raise ValueError("NeuralSDE: general noise needs noise_dim=m (the diffusion returns (*z.shape, m)); "
                             "noise_dim is for general or additive noise only")
        forbidden = set(_LAYER_CHOSEN) & solve_kwargs.keys()
        if forbidden:
            raise TypeError(f"NeuralSDE: {sorted(forbidden)} are chosen by the layer; use saveat")
        known = _LAYER_KEYWORDS + tuple(k for k in SOLVE_KEYWORDS if k not in _LAYER_CHOSEN + _LAYER_KEYWORDS)
        check_keywords({k: v for k, v in solve_kwargs.items() if k not in SOLVE_KEYWORDS}, "NeuralSDE", known)
        if isinstance(trajectories, bool) or not isinstance(trajectories, int) or trajectories < 1:
            raise ValueError(f"NeuralSDE: trajectories must be a positive int, got {trajectories!r}")
        if not isinstance(time_input, bool):
            raise TypeError(f"NeuralSDE: time_input must be True or False, got {time_input!r}")
        self.drift, self.diffusion = drift, diffusion
        self.tspan = tuple(float(t) for t in tspan)
        self.solver, self.noise, self.noise_dim = solver, noise, noise_dim
        self.interpretation = interpretation if interpretation is not None else solver.interpretations[0]
        self.sensealg = check_sensealg(sensealg, "NeuralSDE")
        self.saveat = None if saveat is None else [float(t) for t in saveat]
        self.trajectories, self.time_input = trajectories, time_input
        self.solve_kwargs = dict(solve_kwargs)
        self.regularized = RegularizedSolve(regularize, self.tspan, solver, self.sensealg, saveat=self.saveat,
                                            owner="NeuralSDE", problem=self._problem_factory(None))
        self.regularizers = self.regularized.regularizers
        integral = [r for r in self.regularizers if isinstance(r, AbstractIntegralRegularizer)]
        if integral:
            raise NotImplementedError(f"NeuralSDE: {integral!r} integrate along the solve as extra state "
                                      "channels, which an SDE would diffuse; use ErrorEstimateRegularization, "
                                      "StiffnessRegularization or LocalErrorRegularization")
        # checked here, before any solve: the solver fits the noise type and interpretation
        from ..diffeq.sde import check_sde_solver
        check_sde_solver(solver, noise, self.interpretation)

    def init_params(self, rng: torch.Generator) -> dict:
        return {"drift": self.drift.init_params(rng), "diffusion": self.diffusion.init_params(rng)}

    def init_state(self, rng: torch.Generator) -> dict:
        st = {"drift": self.drift.init_state(rng), "diffusion": self.diffusion.init_state(rng), "nfe": 0, "ng": 0,
              "naccept": 0, "nreject": 0, "backward_stats": {}}
        regularized = self.regularized.init_state(rng)
        st.update(regularized)
        if "rng" not in st:
            from ..core import draw_key
            st.update(training=True, rng=draw_key(rng, "NeuralSDE.init_state"))
        return st

    def forward(self, x: torch.Tensor, ps: Mapping, st: Mapping):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise LayerError(f"expected a floating-point tensor as the initial state, got "
                             f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        training = st.get("training")
        if not isinstance(training, bool):
            raise LayerError("state 'training' must be a Python bool; use pylux.trainmode(st) / pylux.testmode(st)")
        x0 = x.unsqueeze(0).expand(self.trajectories, *x.shape).clone() if self.trajectories > 1 else x
        new_st = dict(st)
        if self.regularized.is_training(st):
            result = self.regularized.solve(self._drift_field(st["drift"]), x0, ps, st,
                                            problem=self._problem_factory(st), **self.solve_kwargs)
            new_st.update(self._counters(result.solution), **result.state())
            return result.y, new_st
        generator, next_key = key_generator(check_key(st["rng"]), x.device)
        prob = self._problem_factory(st)(self._drift_field(st["drift"]), x0, self.tspan, ps, generator)
        saveat = self.saveat if self.saveat is not None else [self.tspan[1]]
        sol = solve(prob, self.solver, saveat=saveat, sensealg=self.sensealg, **self.solve_kwargs)
        new_st.update(self._counters(sol), **self.regularized.inactive_state(x, st))
        if training:
            new_st["rng"] = next_key
        return (sol.u if self.saveat is not None else sol.u[-1]), new_st

    @staticmethod
    def _counters(sol) -> dict:
        return {**solution_state(sol), "ng": sol.stats.ng}

    def _problem_factory(self, st: Mapping | None):
        """``(drift field, u0, tspan, p, generator) -> SDEProblem`` with a path drawn from ``generator``."""
        layer = self

        def problem(drift_field, u0, tspan, p, generator):
            seed = int(torch.randint(0, 2 ** 62, (), generator=generator, device=generator.device))
            diffusion = layer._diffusion_field(st["diffusion"] if st is not None else {})
            prob = SDEProblem(drift_field, diffusion, u0, tspan, p, noise=layer.noise,
                              noise_dim=layer.noise_dim, interpretation=layer.interpretation, seed=seed)
            return prob.with_brownian(prob.draw_brownian(levy_area=layer.solver.needs_levy_area))
        return problem

    def _drift_field(self, inner_st: Mapping):
        drift, time_input = self.drift, self.time_input

        def f(u, p, t):
            du, _ = drift((u, t) if time_input else u, p["drift"], inner_st)
            return du
        return f

    def _diffusion_field(self, inner_st: Mapping):
        diffusion, time_input = self.diffusion, self.time_input

        def g(u, p, t):
            out, _ = diffusion((u, t) if time_input else u, p["diffusion"], inner_st)
            return out
        return g

    def __repr__(self) -> str:
        drift = repr(self.drift).replace("\n", "\n  ")
        diffusion = repr(self.diffusion).replace("\n", "\n  ")
        regs = f", regularize={list(self.regularizers)!r}" if self.regularizers else ""
        return (f"NeuralSDE(\n  drift={drift},\n  diffusion={diffusion},\n  tspan={self.tspan}, "
                f"solver={self.solver!r}, noise={self.noise!r}, interpretation={self.interpretation!r}{regs}\n)")
