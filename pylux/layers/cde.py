r"""The NeuralCDE layer (Kidger, Morrill, Foster & Lyons, "Neural controlled differential equations
for irregular time series", NeurIPS 2020)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..core import AbstractLayer, LayerError
from ..core.keywords import check_keywords
from ..diffeq import ControlTerm, ODEProblem, Tsit5, check_sensealg, solve
from ..diffeq.options import SOLVE_KEYWORDS
from ..diffeq.solvers import AbstractSolver
from ..diffeq.splines import AbstractSplineControl, CubicSpline, HermiteCubicSpline, LinearInterpolation
from ..nn import Dense
from ..regularize.regularized_solve import solution_state

__all__ = ["NeuralCDE", "INTERPOLATIONS"]

#: the ``interpolation=`` choices of :class:`NeuralCDE`
INTERPOLATIONS = {"cubic": CubicSpline, "hermite": HermiteCubicSpline, "linear": LinearInterpolation}

_LAYER_CHOSEN = ("save_everystep", "save_start", "save_end", "dense")


class NeuralCDE(AbstractLayer):
    r"""Solve :math:`dz = f_\theta(z)\, dX(t)` along a path :math:`X` interpolated from observations.

    .. math::
        z(t_0) = \zeta_\phi(X(t_0)), \qquad
        z(t) = z(t_0) + \int_{t_0}^{t} f_\theta(z(s))\, \frac{dX}{ds}(s)\, ds,

    with :math:`f_\theta(z) \in \mathbb{R}^{\text{hidden} \times \text{channels}}`
    (Kidger et al. 2020). The layer solves the CDE as the ODE
    :math:`\dot z = f_\theta(z)\, X'(t)`: the ``ControlTerm(f, X)`` product with
    the control's derivative in place of its increment, which keeps the
    solver's order for a smooth (spline) control and lets every sensitivity
    algorithm differentiate it (torchcde does the same). The spline's
    coefficients are passed through the problem's parameters, so gradients
    reach the data (and whatever produced them) under adjoints too.

    Args:
        vector_field: a pylux layer mapping ``z`` of shape ``(B, hidden)`` to
            ``(B, hidden * channels)`` or ``(B, hidden, channels)`` (Kidger et al.
            end it with a tanh).
        hidden: the size of ``z``.
        channels: the number of channels of the control (include time as a
            channel if the model should see it, as Kidger et al. do).
        interpolation: ``"cubic"`` (natural cubic spline, default), ``"hermite"``
            (cubic Hermite with backward differences: causal) or ``"linear"``; used
            when the input is ``(times, values)``.
        initial: a pylux layer :math:`\zeta_\phi` mapping ``X(t_0)`` of shape
            ``(B, channels)`` to ``z(t_0)`` (default ``Dense(channels, hidden)``).
        solver: an ODE solver (default ``Tsit5()``).
        sensealg: how gradients flow (``None``: backprop through the solver).
        saveat: times at which to return ``z`` (stacked along a new first
            dimension); default: ``z`` at the last knot only.
        stop_at_knots: step exactly onto every knot (``solve(tstops=...)``),
            where the control's derivative may jump; default: True for linear
            interpolation, False for the C¹/C² splines. Known limitation: the
            evaluation *at* a knot takes the slope of the piece after it (the
            right derivative), which is wrong for the last stage of the step
            that ends there, so with linear interpolation a fixed-step method
            is only first-order accurate (RK4 error ~ dt) and an adaptive one
            rejects more steps near the knots (it still meets its tolerance).
            Prefer ``"hermite"`` or ``"cubic"`` where the order matters.
        **solve_kwargs: passed to :func:`pylux.solve` (``reltol``, ``abstol``, ``dt``, ...).

    Input: a spline control (:class:`~pylux.CubicSpline`, ...) with ``channels``
    channels and batch ``(B,)``, or a pair ``(times, values)`` with ``times`` of
    shape ``(T,)`` or ``(B, T)`` and ``values`` of shape ``(B, T, channels)``
    (NaN = missing). The solve runs over the control's knot span
    ``(min_b t_{b,0}, max_b t_{b,T-1})``; with per-sample times the samples should
    share their first and last times (pad otherwise), since a path is
    extrapolated outside its own knots.

    Output: ``z(t_{T-1})`` of shape ``(B, hidden)``, or ``(len(saveat), B, hidden)``.

    Parameters ``ps``: ``{"initial": ..., "vector_field": ...}``. State ``st``:
    ``{"initial": ..., "vector_field": ..., "nfe", "naccept", "nreject",
    "backward_stats"}`` as for :class:`~pylux.layers.NeuralODE`.

    Raises:
        TypeError: a model or solver of the wrong type, an unknown keyword.
        ValueError: an unknown interpolation; non-positive sizes.
        LayerError (when called): a control with another channel count than
            ``channels``; data of the wrong shape; times not increasing.
    """

    def __init__(self, vector_field: AbstractLayer, hidden: int, channels: int, *, interpolation: str = "cubic",
                 initial: AbstractLayer | None = None, solver: AbstractSolver | None = None, sensealg=None,
                 saveat=None, stop_at_knots: bool | None = None, **solve_kwargs: Any):
        if not isinstance(vector_field, AbstractLayer):
            raise TypeError(f"NeuralCDE: vector_field must be a pylux layer, got {type(vector_field).__name__}")
        for name, value in (("hidden", hidden), ("channels", channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NeuralCDE: {name} must be a positive int, got {value!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"NeuralCDE: interpolation must be one of {', '.join(map(repr, INTERPOLATIONS))}, "
                             f"got {interpolation!r}")
        initial = Dense(channels, hidden) if initial is None else initial
        if not isinstance(initial, AbstractLayer):
            raise TypeError(f"NeuralCDE: initial must be a pylux layer, got {type(initial).__name__}")
        solver = Tsit5() if solver is None else solver
        if not isinstance(solver, AbstractSolver):
            raise TypeError(f"NeuralCDE: solver must be a pylux solver such as Tsit5(), got {solver!r}")
        forbidden = set(_LAYER_CHOSEN) & solve_kwargs.keys()
        if forbidden or "tstops" in solve_kwargs:
            raise TypeError(f"NeuralCDE: {sorted(forbidden | ({'tstops'} & solve_kwargs.keys()))} are chosen by the "
                            "layer; use saveat and stop_at_knots")
        check_keywords({k: v for k, v in solve_kwargs.items() if k not in SOLVE_KEYWORDS}, "NeuralCDE",
                       SOLVE_KEYWORDS + ("interpolation", "initial", "saveat", "stop_at_knots"))
        self.vector_field, self.initial = vector_field, initial
        self.hidden, self.channels = hidden, channels
        self.interpolation = interpolation
        self.solver = solver
        self.sensealg = check_sensealg(sensealg, "NeuralCDE")
        self.saveat = None if saveat is None else [float(t) for t in saveat]
        self.stop_at_knots = (interpolation == "linear") if stop_at_knots is None else bool(stop_at_knots)
        self.solve_kwargs = dict(solve_kwargs)

    def init_params(self, rng: torch.Generator) -> dict:
        return {"initial": self.initial.init_params(rng), "vector_field": self.vector_field.init_params(rng)}

    def init_state(self, rng: torch.Generator) -> dict:
        return {"initial": self.initial.init_state(rng), "vector_field": self.vector_field.init_state(rng),
                "nfe": 0, "naccept": 0, "nreject": 0, "backward_stats": {}}

    def control_of(self, x) -> AbstractSplineControl:
        """The control path of an input: ``x`` itself, or the chosen interpolation of ``(times, values)``."""
        if isinstance(x, AbstractSplineControl):
            control = x
        elif isinstance(x, (tuple, list)) and len(x) == 2:
            times, values = x
            try:
                control = INTERPOLATIONS[self.interpolation](values, times)
            except (TypeError, ValueError) as err:
                raise LayerError(str(err)) from None
        else:
            raise LayerError(f"expected a spline control (CubicSpline, HermiteCubicSpline, LinearInterpolation) or "
                             f"a pair (times, values), got {type(x).__name__}")
        if control.channels != self.channels:
            raise LayerError(f"the control has {control.channels} channels but the layer was built with "
                             f"channels={self.channels}; build NeuralCDE(..., channels={control.channels}) or "
                             "pass data with that many channels")
        if len(control.batch_shape) != 1:
            raise LayerError(f"the control must have one batch dimension, (B, T, channels) data; got batch shape "
                             f"{control.batch_shape}")
        return control

    def forward(self, x, ps: Mapping, st: Mapping):
        control = self.control_of(x)
        if control.times.requires_grad:
            # the span and the knots the steps land on are host floats: only the coefficients' part of
            # dL/dt would flow, and that partial gradient is wrong
            raise LayerError("gradients with respect to the observation times are not supported: the solve's "
                             "span and steps are taken at fixed times; pass times.detach() (gradients with "
                             "respect to the observed values flow)")
        t0, t1 = control.interval
        z0, _ = self.initial(control.evaluate(control.times[..., 0].min()), ps["initial"], st["initial"])
        if tuple(z0.shape) != (control.batch_shape[0], self.hidden):
            raise LayerError(f"initial returned shape {tuple(z0.shape)}; it must map X(t0) of shape "
                             f"{(control.batch_shape[0], self.channels)} to z0 of shape "
                             f"{(control.batch_shape[0], self.hidden)}")
        field = self._field(control, st["vector_field"])
        p = {"vector_field": ps["vector_field"], "control": control.coefficients}
        kwargs = dict(self.solve_kwargs)
        if self.stop_at_knots:
            kwargs["tstops"] = control.knots
        saveat = self.saveat if self.saveat is not None else [t1]
        sol = solve(ODEProblem(field, z0, (t0, t1), p), self.solver, saveat=saveat, sensealg=self.sensealg,
                    **kwargs)
        new_st = dict(st)
        new_st.update(solution_state(sol))
        return (sol.u if self.saveat is not None else sol.u[-1]), new_st

    def _field(self, control: AbstractSplineControl, inner_st: Mapping):
        r"""``f(z, p, t) = f_\theta(z) X'(t)``: the ControlTerm product with the control's derivative."""
        model, hidden, channels = self.vector_field, self.hidden, self.channels
        term = ControlTerm(lambda z, p, t: _matrix(model(z, p["vector_field"], inner_st)[0], z, hidden, channels),
                           control)
        checked = []

        def field(z, p, t):
            path = control.with_coefficients(p["control"])
            vf = term.vf(z, p, t)
            derivative = path.derivative(t).to(z.dtype)
            if not checked:
                term.check(vf, derivative, z)
                checked.append(True)
            return term.prod(vf, derivative)
        return field

    def __repr__(self) -> str:
        inner = repr(self.vector_field).replace("\n", "\n  ")
        return (f"NeuralCDE(\n  {inner},\n  hidden={self.hidden}, channels={self.channels}, "
                f"interpolation={self.interpolation!r}, solver={self.solver!r}, sensealg={self.sensealg!r}\n)")


def _matrix(out: torch.Tensor, z: torch.Tensor, hidden: int, channels: int) -> torch.Tensor:
    """The vector field's output as ``(B, hidden, channels)``."""
    if out.dim() == z.dim() and out.shape[-1] == hidden * channels:
        return out.view(*z.shape, channels)
    if out.dim() == z.dim() + 1 and tuple(out.shape[-2:]) == (hidden, channels):
        return out
    raise LayerError(f"the vector field returned shape {tuple(out.shape)}; for z of shape {tuple(z.shape)} it must "
                     f"return (B, hidden * channels) = (B, {hidden * channels}) or (B, {hidden}, {channels})")
