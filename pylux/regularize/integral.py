"""RNODE's integral regularizers (Finlay, Jacobsen, Nurbekyan, Oberman, ICML 2020).

Both are integrated alongside the state (see
:class:`~pylux.regularize.base.AbstractIntegralRegularizer`): one extra channel
per sample, no extra solve, gradients through the layer's sensitivity algorithm.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.keywords import check_keywords
from .base import AbstractIntegralRegularizer, batch_size
from .hutchinson import hutchinson_vjp_frobenius, rademacher_like

__all__ = ["KineticRegularization", "JacobianFrobeniusRegularization"]


class KineticRegularization(AbstractIntegralRegularizer):
    r"""Kinetic energy :math:`R_K = \frac{1}{B}\sum_b \int_{t_0}^{t_1} \lVert f(z_b(t), t) \rVert_2^2\, dt`.

    Penalising it favours straight, constant-speed trajectories (optimal
    transport), which an adaptive solver integrates in few steps (Finlay et
    al., ICML 2020, eq. 5). ``B`` is the batch size (dim 0 of a >= 2-D state).
    """

    def integrand(self, field, z: torch.Tensor, dz: torch.Tensor, t: torch.Tensor, data: Any) -> torch.Tensor:
        return dz.reshape(batch_size(z), -1).pow(2).sum(dim=1)


class JacobianFrobeniusRegularization(AbstractIntegralRegularizer):
    r"""Jacobian Frobenius norm, Hutchinson-estimated along the trajectory (RNODE).

    .. math::  R_J = \frac{1}{B}\sum_b \int_{t_0}^{t_1}
               \lVert \varepsilon_b^\top \partial f/\partial z_b \rVert_2^2\, dt

    A Hutchinson estimate of :math:`\int \lVert \partial f / \partial z \rVert_F^2 dt`
    (Finlay et al., ICML 2020, eq. 6): :math:`\varepsilon` is a Rademacher
    probe shaped like the state, drawn once per solve and held fixed during
    it (so the integrand is a smooth function of time the solver can
    integrate), one vector–Jacobian product per evaluation
    (:func:`~pylux.regularize.hutchinson_vjp_frobenius`). Each sample's
    Jacobian block is estimated with its own probe; a model that mixes samples
    would add cross terms.

    Args:
        generator: draw the probe from this generator instead of the layer's
            per-call one.

    Raises:
        TypeError: ``generator`` not a ``torch.Generator``; an unknown keyword (named, with
            the closest known one).
    """

    needs_input_grad = True

    def __init__(self, generator: torch.Generator | None = None, **unknown: Any) -> None:
        check_keywords(unknown, "JacobianFrobeniusRegularization", ("generator",))
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"JacobianFrobeniusRegularization: generator must be a torch.Generator or None, "
                            f"got {type(generator).__name__}")
        self.generator = generator
        # a probe of its own was asked for: a layer's probe cannot stand in for it
        self.shares_jacobian_probe = generator is None

    #: Capability: a layer that already forms :math:`\varepsilon^\top \partial f/\partial z` in every
    #: evaluation with a probe drawn once per solve (FFJORD's trace estimator) may pass its squared
    #: norm to :meth:`integrand_from_probe` instead of calling :meth:`integrand`, saving this
    #: regularizer's own vector–Jacobian product. False when ``generator`` is given.
    shares_jacobian_probe: bool = True

    def integrand_from_probe(self, z: torch.Tensor, dz: torch.Tensor, probe_vjp_sq: torch.Tensor) -> torch.Tensor:
        r"""The integrand from the layer's :math:`\lVert \varepsilon^\top \partial f/\partial z \rVert_2^2`
        per sample (or the exact :math:`\lVert \partial f/\partial z \rVert_F^2`, which the estimate
        has as its mean), shape ``(batch_size(z),)``."""
        return probe_vjp_sq

    def begin(self, z0: torch.Tensor, t0: float, t1: float, generator: torch.Generator) -> Any:
        return rademacher_like(z0, self.generator if self.generator is not None else generator)

    def integrand(self, field, z: torch.Tensor, dz: torch.Tensor, t: torch.Tensor, data: Any) -> torch.Tensor:
        # the graph is always kept: the layer calls this under enable_grad and detaches what it must
        if z.dim() < 2:
            return hutchinson_vjp_frobenius(dz, z, data, batched=False, create_graph=True).reshape(1)
        return hutchinson_vjp_frobenius(dz, z, data, batched=True, create_graph=True)
