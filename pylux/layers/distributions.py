"""Base distributions of normalizing flows."""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["StandardNormal"]


class StandardNormal:
    r"""The standard normal distribution :math:`\mathcal N(0, I_d)` on :math:`\mathbb R^d`.

    .. math::  \log p(z) = -\tfrac12 \lVert z \rVert_2^2 - \tfrac d2 \log(2\pi)

    The base density of a continuous normalizing flow (:class:`~pylux.layers.FFJORD`).
    Any object with ``dim``, ``log_prob(z)`` and ``sample(n, generator, dtype, device)``
    can take its place.

    Args:
        dim: :math:`d \ge 1`.

    Raises:
        ValueError: ``dim`` not a positive integer.
    """

    def __init__(self, dim: int):
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(f"StandardNormal: dim must be a positive integer (the dimension d), got {dim!r}")
        self.dim = int(dim)

    def _check(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"StandardNormal.log_prob: expected a floating-point tensor, got "
                            f"{z.dtype if isinstance(z, torch.Tensor) else type(z).__name__}")
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"StandardNormal.log_prob: expected points of shape (batch, {self.dim}), got "
                             f"{tuple(z.shape)}")

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p(z)` of each row of ``z`` (shape ``(B, d)``), shape ``(B,)``."""
        self._check(z)
        return -0.5 * z.pow(2).sum(dim=1) - 0.5 * self.dim * math.log(2 * math.pi)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
        """``n`` independent draws, shape ``(n, d)``, from ``generator`` (on ``device``'s type)."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"StandardNormal.sample: n must be an integer >= 0, got {n!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"StandardNormal.sample: generator must be a torch.Generator, got "
                            f"{type(generator).__name__}")
        device = generator.device if device is None and generator is not None else device
        return torch.randn((int(n), self.dim), generator=generator, dtype=dtype, device=device)

    def __repr__(self) -> str:
        return f"StandardNormal({self.dim})"
