"""Hutchinson's trace estimator for squared Frobenius norms of Jacobians.

For a map ``y = f(z)`` with Jacobian :math:`J = \\partial y / \\partial z` and a probe
:math:`\\varepsilon` with :math:`\\mathbb{E}[\\varepsilon\\varepsilon^\\top] = I`
(Rademacher or standard normal),

.. math::
    \\mathbb{E}_\\varepsilon \\, \\lVert \\varepsilon^\\top J \\rVert_2^2
    = \\operatorname{tr}(J J^\\top) = \\lVert J \\rVert_F^2

(Hutchinson 1989). One vector–Jacobian product per probe gives an unbiased
estimate. Used by RNODE's Jacobian-Frobenius regularizer (Finlay et al. 2020)
and by the DEQ Jacobian regularizer (Bai, Koltun, Kolter 2021).
"""

from __future__ import annotations

import torch

__all__ = ["hutchinson_vjp_frobenius", "rademacher_like"]


def rademacher_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A tensor like ``x`` of independent ±1 entries (each with probability 1/2)."""
    bits = torch.randint(0, 2, x.shape, generator=generator, device=x.device, dtype=torch.int8)
    return (2 * bits - 1).to(x.dtype)


def hutchinson_vjp_frobenius(y: torch.Tensor, z: torch.Tensor, probe: torch.Tensor | None = None, *,
                             batched: bool = True, create_graph: bool = True,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """Unbiased estimate of :math:`\\lVert \\partial y/\\partial z \\rVert_F^2` from one VJP.

    Args:
        y: output of a map of ``z`` (computed with ``z`` in the autograd graph).
        z: the input, a tensor that requires grad (or is a function of one).
        probe: :math:`\\varepsilon`, shaped like ``y``; default Rademacher.
        batched: if True, dim 0 indexes independent samples (as in a batch whose
            elements do not interact) and the result is one estimate per sample,
            shape ``(B,)``; else a 0-d tensor for the whole Jacobian.
        create_graph: keep the graph so the estimate can be differentiated
            (needed when it is a training loss).
        generator: for the default probe.

    Returns:
        :math:`\\lVert \\varepsilon^\\top J \\rVert_2^2` per sample (``batched``) or in total.
    """
    if probe is None:
        probe = rademacher_like(y, generator)
    if probe.shape != y.shape:
        raise ValueError(f"hutchinson_vjp_frobenius: probe has shape {tuple(probe.shape)} but y has "
                         f"{tuple(y.shape)}")
    (vjp,) = torch.autograd.grad(y, z, grad_outputs=probe, create_graph=create_graph, retain_graph=True,
                                 allow_unused=True)
    if vjp is None:  # y does not depend on z: the Jacobian is zero
        vjp = torch.zeros_like(z)
    if batched:
        return vjp.reshape(vjp.shape[0], -1).pow(2).sum(dim=1)
    return vjp.pow(2).sum()
