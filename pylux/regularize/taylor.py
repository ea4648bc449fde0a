r"""Taylor-mode propagation and the TayNODE regularizer (Kelly, Bettencourt, Johnson, Duvenaud, NeurIPS 2020).

The series algebra, its convention (normalised coefficients, Cauchy products) and the
propagation rules are documented in :mod:`pylux.regularize.taylor_series`; the rule table in
:mod:`pylux.regularize.taylor_rules`; the nested-jvp fallback in
:mod:`pylux.regularize.taylor_fallback`.

TayNODE
-------
:class:`TaylorRegularization` penalises
:math:`\mathcal{R}_K = \int_{t_0}^{t_1} \lVert d^K z / dt^K \rVert_2^2 \, dt`
along the solution of :math:`\dot z = f_\theta(z, t)`, with :math:`d^K z/dt^K`
from :func:`solution_taylor_coefficients`.

Modules
-------
* :mod:`pylux.regularize.taylor_series` — the algebra: :class:`TaylorSeries`,
  its arithmetic and the nonlinearities' rules;
* :mod:`pylux.regularize.taylor_rules` — the rule table (torch functions and
  layer classes to their rules), :func:`register_taylor_rule`, and the rules of
  :mod:`pylux.nn`'s layers;
* :mod:`pylux.regularize.taylor_fallback` — the nested-jvp fallback;
* this module — :func:`taylor_coefficients`, :func:`solution_taylor_coefficients`
  and the TayNODE regularizer; it re-exports the names above.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from ..core import AbstractLayer
from ..core.keywords import check_keywords
from .base import AbstractIntegralRegularizer, batch_size
from .taylor_fallback import TaylorFallbackWarning, call_with_fallback
from .taylor_rules import TaylorLayerContext, layer_series, register_taylor_rule
from .taylor_series import TaylorRuleError, TaylorSeries, _check_order, _is_series, append_time

__all__ = [
    "TaylorRegularization",
    "TaylorSeries",
    "TaylorFallbackWarning",
    "TaylorRuleError",
    "taylor_coefficients",
    "solution_taylor_coefficients",
    "append_time",
    "register_taylor_rule",
    "TaylorLayerContext",
]


def _as_series(x: Any, owner: str) -> TaylorSeries:
    if _is_series(x):
        return x
    if isinstance(x, (list, tuple)) and x and all(isinstance(c, torch.Tensor) for c in x):
        return TaylorSeries(x)
    raise TypeError(f"{owner}: expected a TaylorSeries (or a list of its coefficient tensors), "
                    f"got {type(x).__name__}")



def taylor_coefficients(f: AbstractLayer | Callable, x: TaylorSeries | Sequence[torch.Tensor],
                        ps: Mapping | None = None, st: Mapping | None = None, *,
                        strict: bool = False) -> TaylorSeries:
    r"""Taylor coefficients of :math:`y(t) = f(x(t))` from those of :math:`x(t)` (Taylor mode).

    Args:
        f: a pylux layer — ``Chain``/``Dense``/``Scale``/``WrappedFunction``/
            ``NoOpLayer``/``SkipConnection('+')`` with activations tanh, sigmoid,
            softplus, relu, exp or none get exact :math:`O(K^2)` rules, as does
            any layer class given a rule with :func:`register_taylor_rule`; any
            other layer or activation falls back to nested jvp — or a callable
            of one series written with the series' operations (plain torch
            functions dispatch to the rules).
        x: the input series (normalised coefficients, see the module docstring).
        ps, st: the layer's parameters and state (ignored for a callable;
            ``st`` defaults to ``{}``).
        strict: raise :class:`TaylorRuleError` instead of falling back.

    Returns:
        The series of :math:`f(x(t))`, of the same order as ``x``.

    Raises:
        TaylorRuleError: a part of ``f`` has no rule and ``strict`` is set.
        TypeError: ``x`` is not a series, ``f`` is not a layer or callable, or
            ``ps`` is missing for a layer.
        TaylorFallbackWarning (warning): a part of ``f`` was differentiated by nested jvp.
    """
    x = _as_series(x, "taylor_coefficients")
    if isinstance(f, AbstractLayer):
        if ps is None:
            raise TypeError("taylor_coefficients: a pylux layer needs its parameters ps")
        return layer_series(f, x, ps, {} if st is None else st, strict=strict)
    if not callable(f):
        raise TypeError(f"taylor_coefficients: f must be a pylux layer or a callable, got {type(f).__name__}")
    return call_with_fallback(f, [x], strict, "taylor_coefficients")


def solution_taylor_coefficients(f: AbstractLayer | Callable, z0: torch.Tensor, order: int, t0: Any = 0.0,
                                 ps: Mapping | None = None, st: Mapping | None = None, *,
                                 strict: bool = False) -> TaylorSeries:
    r"""Taylor coefficients of the solution of :math:`\dot z = f(z, t)`, :math:`z(t_0) = z_0`, to order :math:`K`.

    The Taylor-mode ODE recursion (Griewank & Walther ch. 13; Kelly et al. 2020, sec. 3):
    with :math:`z(t_0 + s) = \sum_k z_k s^k`,

    .. math::
        z_{k+1} = \frac{1}{k+1} \big[f(z_{\le k}, t_{\le k})\big]_k,

    since :math:`f`'s :math:`k`-th coefficient depends only on :math:`z_0..z_k`.
    ``f`` is traced once on growing series, so the :math:`K` steps cost
    :math:`O(K^2)` in all. :math:`d^K z/dt^K = K!\,z_K` is ``result.derivative(K)``.

    Args:
        f: a pylux layer, autonomous as in :class:`pylux.NeuralODE`
            (:math:`\dot z = f(z; \mathrm{ps}, \mathrm{st})`), or a callable
            ``f(z, t)`` of two series (``t`` is the 0-d time series
            :math:`[t_0, 1, 0, \dots]`; see :func:`append_time`).
        z0: the state at :math:`t_0` (any shape; a batch is part of the state).
        order: :math:`K \ge 1`.
        t0: the expansion time (float or 0-d tensor).
        ps, st: parameters and state when ``f`` is a layer.
        strict: raise instead of falling back to nested jvp.

    Returns:
        A :class:`TaylorSeries` of order ``K`` whose value is ``z0``.

    Raises:
        ValueError: ``order < 1``; ``f`` returns a shape other than ``z0``'s.
        TypeError: ``z0`` is not a floating tensor; ``order`` is not an int;
            ``ps`` missing for a layer.
        TaylorRuleError: as in :func:`taylor_coefficients` with ``strict``.
    """
    return _solution_series(f, z0, order, t0, ps, st, strict, None)


def _solution_series(f, z0, order, t0, ps, st, strict: bool, name: str | None) -> TaylorSeries:
    _check_order(order, "solution_taylor_coefficients")
    if not isinstance(z0, torch.Tensor) or not z0.is_floating_point():
        raise TypeError(f"solution_taylor_coefficients: z0 must be a floating tensor, got "
                        f"{z0.dtype if isinstance(z0, torch.Tensor) else type(z0).__name__}")
    z = TaylorSeries([z0])
    if isinstance(f, AbstractLayer):
        if ps is None:
            raise TypeError("solution_taylor_coefficients: a pylux layer needs its parameters ps")
        out = layer_series(f, z, ps, {} if st is None else st, strict=strict)
    elif callable(f):
        t = TaylorSeries.time(t0, 0, dtype=z0.dtype, device=z0.device)
        out = call_with_fallback(f, [z, t], strict, "solution_taylor_coefficients", name)
    else:
        raise TypeError(f"solution_taylor_coefficients: f must be a pylux layer or a callable, "
                        f"got {type(f).__name__}")
    if out.shape != z0.shape:
        raise ValueError(f"solution_taylor_coefficients: f returned shape {tuple(out.shape)} for a state of "
                         f"shape {tuple(z0.shape)}; a vector field must return the state's shape")
    for k in range(order):
        z._coeffs.append(out.coefficient(k) / (k + 1))
    return z


# --------------------------------------------------------------------- TayNODE

class TaylorRegularization(AbstractIntegralRegularizer):
    r"""TayNODE: penalise the :math:`K`-th time derivative of the solution (Kelly et al., NeurIPS 2020).

    .. math::
        \mathcal{R}_K(\theta) = \frac{1}{B}\sum_{b=1}^{B} \int_{t_0}^{t_1}
            \Big\lVert \frac{d^K z_b(t)}{dt^K} \Big\rVert_2^2 \, dt,

    the squared norm summed over each sample's state entries and averaged over
    the batch. The integrand is evaluated wherever the solver evaluates the
    vector field: :func:`solution_taylor_coefficients` gives
    :math:`d^K z/dt^K = K!\,z_K` in Taylor mode (:math:`O(K^2)` per evaluation;
    layers without a rule fall back to nested jvp with a
    :class:`TaylorFallbackWarning`), and :class:`pylux.NeuralODE` integrates it
    as an extra state channel per sample, so no extra solve is needed and any
    sensitivity algorithm carries its gradient. The heuristic (Kelly et al.):
    the local error of an order-:math:`p` Runge–Kutta step is governed by the
    solution's derivatives of order :math:`p + 1`, so making high derivatives
    small lets an adaptive solver take fewer, longer steps. :math:`K = 1` is the
    kinetic-energy term :math:`\lVert f \rVert^2` of RNODE (Finlay et al. 2020).

    Usage: ``NeuralODE(model, tspan, regularize=TaylorRegularization(order=2))``,
    then add :math:`\lambda` · ``st["regularization"]`` to the loss. With
    ``NeuralODE(..., time_input=True)`` the model receives ``(z, t)`` where ``t``
    is the time series :math:`[t, 1, 0, \dots]`, so time-conditioned fields such
    as Kelly et al.'s :math:`\tanh(W_2[\tanh(W_1[z;t]+b_1);t]+b_2)` get their
    exact total time derivatives.

    Args:
        order: :math:`K \ge 1`.
        strict: raise :class:`TaylorRuleError` instead of falling back to nested jvp.

    Raises:
        ValueError: ``order < 1``.
        TypeError: a non-int order or non-bool strict; an unknown keyword (named, with the closest known one).
    """

    needs_input_grad = False

    def __init__(self, order: int = 2, *, strict: bool = False, **unknown: Any):
        check_keywords(unknown, "TaylorRegularization", ("order", "strict"))
        self.order = _check_order(order, "TaylorRegularization")
        if not isinstance(strict, bool):
            raise TypeError(f"TaylorRegularization: strict must be a bool, got {type(strict).__name__}")
        self.strict = strict

    def integrand(self, field: Callable, z: torch.Tensor, dz: torch.Tensor, t: torch.Tensor,
                  data: Any) -> torch.Tensor:
        r""":math:`\lVert d^K z/dt^K \rVert_2^2` per sample, shape ``(batch_size(z),)``."""
        series = _solution_series(field, z, self.order, t, None, None, self.strict,
                                  "the vector field of the NeuralODE")
        top = series.derivative(self.order)
        return top.reshape(batch_size(z), -1).pow(2).sum(dim=1)

    def __repr__(self) -> str:
        strict = ", strict=True" if self.strict else ""
        return f"TaylorRegularization(order={self.order}{strict})"
