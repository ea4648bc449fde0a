"""Dense output: per-step interpolants and the piecewise solution ``sol(t)``.

Each step returns an interpolant over its own interval, ``theta = (t - t_n) / dt``
in ``[0, 1]``:

* :class:`StageInterpolant` — a Runge–Kutta method's continuous extension,
  ``u(t_n + theta dt) = u_n + dt * sum_i b_i(theta) k_i`` (Tsit5's and DP5's
  free order-4 interpolants, BS3's cubic Hermite written in stage form, …;
  coefficients in :mod:`pylux.diffeq.tableau`).
* :class:`HermiteInterpolant` — cubic Hermite through ``(u_n, f_n)`` and
  ``(u_{n+1}, f_{n+1})``, third order (used by the multistep VCAB3).

Both are differentiable functions of the stored tensors: gradients flow from
``sol(t)`` back to the stages, hence to ``u0`` and the parameters. The
weights ``b_i(theta)`` are host floats (``theta`` is computed from host times),
so evaluation costs one fused combination and no synchronisation.
"""

from __future__ import annotations

import abc

import bisect
import math
from typing import Sequence

import torch

from ._device import host_to_device
from .tableau import ButcherTableau

__all__ = ["AbstractInterpolant", "StageInterpolant", "HermiteInterpolant", "DenseOutput",
           "linear_combination"]


def linear_combination(base: torch.Tensor | None, terms: Sequence[torch.Tensor],
                       weights: Sequence, out: torch.Tensor | None = None) -> torch.Tensor:
    """``base + sum_j weights[j] * terms[j]`` as a short chain of fused kernels.

    A weight is a host float (``add(alpha=)``; zero weights are skipped) or a
    0-d tensor (``addcmul``, the compiled path, where weights are device
    values). The first term allocates the result (or writes into ``out``);
    the rest accumulate in place into that fresh tensor, which autograd
    allows because nothing has saved it yet. ``base`` is never modified (it is
    returned as is when every weight is zero and no ``out``).
    """
    acc = None
    for term, weight in zip(terms, weights):
        if isinstance(weight, torch.Tensor):
            if acc is None:
                if base is not None:
                    acc = torch.addcmul(base, term, weight, out=out) if out is not None else \
                        torch.addcmul(base, term, weight)
                else:
                    acc = torch.mul(term, weight, out=out) if out is not None else term * weight
            else:
                acc.addcmul_(term, weight)
            continue
        if weight == 0.0:
            continue
        if acc is None:
            if base is not None:
                acc = torch.add(base, term, alpha=weight, out=out) if out is not None else \
                    torch.add(base, term, alpha=weight)
            else:
                acc = torch.mul(term, weight, out=out) if out is not None else term * weight
        else:
            acc.add_(term, alpha=weight)
    if acc is None:
        if out is not None:
            return out.copy_(base) if base is not None else out.zero_()
        acc = base if base is not None else torch.zeros_like(terms[0])
    return acc


class AbstractInterpolant(abc.ABC):
    """Interpolant of one step. ``evaluate(thetas)`` returns a tensor ``(len(thetas), *u.shape)``."""

    @abc.abstractmethod
    def evaluate(self, thetas: Sequence[float]) -> torch.Tensor:
        """Implemented by each concrete subclass."""


class StageInterpolant(AbstractInterpolant):
    """``u + dt * sum_i b_i(theta) k_i`` with the stage polynomials of ``tableau.dense``.

    ``dt`` is the step as a host float (or a 0-d tensor from a compiled step),
    or 1.0 when the stages already carry their control increment (a term
    other than an ODE term).
    """

    __slots__ = ("u", "dt", "stages", "tableau")

    def __init__(self, u: torch.Tensor, dt, stages: Sequence[torch.Tensor],
                 tableau: ButcherTableau) -> None:
        self.u = u
        self.dt = dt
        self.stages = stages
        self.tableau = tableau

    def evaluate(self, thetas: Sequence[float]) -> torch.Tensor:
        if isinstance(self.dt, torch.Tensor):  # a compiled step's device dt
            weights = host_to_device([self.tableau.dense_weights(th) for th in thetas], self.u.dtype,
                                     self.u.device) * self.dt.to(self.u.dtype)
            stacked = torch.stack([k.reshape(-1) for k in self.stages])
            out = torch.addmm(self.u.reshape(1, -1), weights, stacked)
            return out.reshape((len(thetas),) + tuple(self.u.shape))
        weights = [[w * self.dt for w in self.tableau.dense_weights(th)] for th in thetas]
        if len(weights) == 1:
            return linear_combination(self.u, self.stages, weights[0]).unsqueeze(0)
        u = self.u
        stacked = torch.stack([k.reshape(-1) for k in self.stages])
        w = host_to_device(weights, u.dtype, u.device)
        out = torch.addmm(u.reshape(1, -1), w, stacked)
        return out.reshape((len(weights),) + tuple(u.shape))


class HermiteInterpolant(AbstractInterpolant):
    """Cubic Hermite interpolant through ``(u0, f0)`` and ``(u1, f1)`` over a step ``dt``.

    ``u(theta) = h00 u0 + h10 dt f0 + h01 u1 + h11 dt f1`` with
    ``h00 = 2 theta^3 - 3 theta^2 + 1``, ``h10 = theta^3 - 2 theta^2 + theta``,
    ``h01 = 3 theta^2 - 2 theta^3``, ``h11 = theta^3 - theta^2``. Local error
    O(dt^4) (third order).
    """

    __slots__ = ("u0", "u1", "f0", "f1", "dt")

    def __init__(self, u0, u1, f0, f1, dt: float) -> None:
        self.u0, self.u1, self.f0, self.f1, self.dt = u0, u1, f0, f1, dt

    def evaluate(self, thetas: Sequence[float]) -> torch.Tensor:
        out = []
        for th in thetas:
            h00 = 2 * th ** 3 - 3 * th ** 2 + 1
            h10 = th ** 3 - 2 * th ** 2 + th
            h01 = 3 * th ** 2 - 2 * th ** 3
            h11 = th ** 3 - th ** 2
            value = linear_combination(None, (self.u0, self.f0, self.u1, self.f1),
                                       (h00, h10 * self.dt, h01, h11 * self.dt))
            out.append(value)
        return torch.stack(out)


class DenseOutput:
    """The piecewise interpolant of a whole solve: one :class:`AbstractInterpolant` per accepted step.

    ``starts[j]`` and ``ends[j]`` are the host times of step ``j``, in the
    direction of integration.
    """

    def __init__(self, t0: float, direction: float) -> None:
        self.t0 = t0
        self.direction = direction
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.pieces: list[AbstractInterpolant] = []

    def append(self, t_start: float, t_end: float, piece: AbstractInterpolant) -> None:
        self.starts.append(t_start)
        self.ends.append(t_end)
        self.pieces.append(piece)

    @property
    def t_end(self) -> float:
        return self.ends[-1] if self.ends else self.t0

    def __call__(self, times: Sequence[float], u0: torch.Tensor) -> torch.Tensor:
        """Values at ``times`` (host floats inside the solved interval), stacked along dim 0."""
        d = self.direction
        keys = [d * s for s in self.starts]
        lo, hi = sorted((self.t0, self.t_end))
        groups: dict[int, list[tuple[int, float]]] = {}
        results: list[torch.Tensor | None] = [None] * len(times)
        for idx, t in enumerate(times):
            if not (lo <= t <= hi) or math.isnan(t):
                raise ValueError(
                    f"sol(t): t = {t!r} is outside the solved interval [{lo!r}, {hi!r}]; "
                    "the dense output cannot extrapolate")
            if not self.pieces:
                results[idx] = u0
                continue
            j = max(0, bisect.bisect_right(keys, d * t) - 1)
            dt = self.ends[j] - self.starts[j]
            theta = (t - self.starts[j]) / dt if dt != 0 else 1.0
            groups.setdefault(j, []).append((idx, min(max(theta, 0.0), 1.0)))
        for j, items in groups.items():
            values = self.pieces[j].evaluate([th for _, th in items])
            for row, (idx, _) in enumerate(items):
                results[idx] = values[row]
        return torch.stack(results)
