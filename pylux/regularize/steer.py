"""STEER: a random end time during training (Behl, Ghosh, Ghosh, Spiess, ICML 2020 workshop / arXiv 2006.10711)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.keywords import check_keywords
from .base import AbstractRegularizer, RegularizationContext

__all__ = ["STEER"]


class STEER(AbstractRegularizer):
    r"""Stochastic end time: in train mode solve to :math:`T \sim \mathcal U(t_1 - b, t_1 + b)`.

    Behl et al. (2020) show that training a neural ODE with its end time
    drawn at random around :math:`t_1` regularizes the learned dynamics
    towards ones that are cheaper to solve (fewer steps at prediction), at no
    extra cost per step. In test mode the layer solves to :math:`t_1` exactly.
    It adds nothing to the loss: its ``value`` is 0.

    Args:
        b: half-width of the interval, ``0 < b < |t1 - t0|`` (so that the drawn
            end stays on the same side of ``t0``).

    Raises:
        ValueError: ``b`` not a finite positive number; (when the layer is built)
            ``b >= |t1 - t0|``.
        TypeError: an unknown keyword (named, with the closest known one).
    """

    def __init__(self, b: float, **unknown: Any) -> None:
        check_keywords(unknown, "STEER", ("b",))
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (math.isfinite(b) and b > 0):
            raise ValueError(f"STEER: b must be a finite number > 0, got {b!r}")
        self.b = float(b)

    def check_span(self, t0: float, t1: float) -> None:
        if not self.b < abs(t1 - t0):
            raise ValueError(f"STEER: b = {self.b!r} must be smaller than |t1 - t0| = {abs(t1 - t0)!r}, so "
                             "that the drawn end time t1 + U(-b, b) stays past t0")

    def end_time(self, t0: float, t1: float, training: bool, generator: torch.Generator) -> float:
        self.check_span(t0, t1)
        if not training:
            return t1
        u = float(torch.rand((), generator=generator, dtype=torch.float64, device=generator.device))
        return t1 + (2.0 * u - 1.0) * self.b

    def end_time_range(self, t0: float, t1: float) -> tuple[float, float]:
        return t1 - self.b, t1 + self.b

    def value(self, ctx: RegularizationContext, data: Any) -> torch.Tensor:
        return ctx.z0.new_zeros(())

    def __repr__(self) -> str:
        return f"STEER(b={self.b!r})"
