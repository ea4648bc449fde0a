"""Synthetic data sets generated on the fly: spirals, two moons, the cubic spiral ODE, the white dwarf.

Every random draw comes from an explicit ``torch.Generator``; the same
generator state gives the same data.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch

__all__ = ["spirals", "two_moons", "spiral_ode_data", "SPIRAL_ODE_MATRIX", "white_dwarf_data"]

SPIRAL_ODE_MATRIX = ((-0.1, 2.0), (-2.0, -0.1))
"""The matrix :math:`A` of the cubic spiral ODE of :func:`spiral_ode_data`."""


def _count(where: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _noise(where: str, noise: Any) -> float:
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"{where}: noise must be a finite number >= 0, got {noise!r}")
    return float(noise)


def _generator(where: str, rng: Any, needed: bool) -> torch.Generator | None:
    if rng is None:
        if needed:
            raise TypeError(f"{where}: shuffling and noise need an explicit random generator; pass "
                            "rng=torch.Generator().manual_seed(0) (or shuffle=False, noise=0)")
        return None
    if not isinstance(rng, torch.Generator):
        raise TypeError(f"{where}: rng must be a torch.Generator, got {type(rng).__name__}")
    if rng.device.type != "cpu":
        raise ValueError(f"{where}: rng must be a CPU generator (data are drawn on the CPU, then moved to "
                         f"`device`), got one on {rng.device}")
    return rng


def _finish(where, x, y, noise, rng, shuffle, dtype, device):
    if noise:
        x = x + noise * torch.randn(x.shape, generator=rng, dtype=torch.float64)
    if shuffle:
        perm = torch.randperm(x.shape[0], generator=rng)
        x, y = x[perm], y[perm]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{where}: dtype must be a floating torch.dtype, got {dtype!r}")
    return x.to(device=device, dtype=dtype), y.to(device)


def spirals(n: int, *, noise: float = 0.0, rng: torch.Generator | None = None, turns: float = 1.5,
            shuffle: bool = True, dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Two interleaved spirals in the plane, for binary classification.

    Arm :math:`c \in \{0, 1\}` holds points at evenly spaced :math:`s \in [0.05, 1]`:

    .. math::  x = s\,\bigl(\cos(2\pi\tau s + c\pi),\; \sin(2\pi\tau s + c\pi)\bigr) + \sigma\,\varepsilon,

    with :math:`\tau` = ``turns``, :math:`\sigma` = ``noise`` and :math:`\varepsilon \sim N(0, I)`.
    Arm 1 is arm 0 rotated by :math:`\pi`. Arm 0 gets :math:`\lceil n/2 \rceil` points.

    Args:
        n: number of points (>= 2).
        noise: standard deviation of the Gaussian noise.
        rng: CPU ``torch.Generator``; required when ``noise > 0`` or ``shuffle``.
        turns: number of turns of each arm.
        shuffle: shuffle the points (otherwise arm 0 first, ordered by ``s``).

    Returns:
        ``x`` of shape ``(n, 2)`` and ``y`` int64 labels of shape ``(n,)``.
    """
    n = _count("spirals", "n", n, 2)
    noise = _noise("spirals", noise)
    if isinstance(turns, bool) or not isinstance(turns, numbers.Real) or not math.isfinite(turns) or turns <= 0:
        raise ValueError(f"spirals: turns must be a finite number > 0, got {turns!r}")
    rng = _generator("spirals", rng, noise > 0 or shuffle)
    sizes = (n - n // 2, n // 2)
    s = torch.cat([torch.linspace(0.05, 1.0, size, dtype=torch.float64) for size in sizes])
    y = torch.cat([torch.full((size,), c, dtype=torch.int64) for c, size in enumerate(sizes)])
    angle = 2 * math.pi * float(turns) * s + math.pi * y.to(torch.float64)
    x = s[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return _finish("spirals", x, y, noise, rng, shuffle, dtype, device)


def two_moons(n: int, *, noise: float = 0.0, rng: torch.Generator | None = None, shuffle: bool = True,
              dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Two interleaving half circles (the layout of scikit-learn's ``make_moons``).

    The outer moon (label 0, :math:`\lfloor n/2 \rfloor` points) is
    :math:`(\cos\theta, \sin\theta)` and the inner moon (label 1, the rest) is
    :math:`(1 - \cos\theta,\; 1/2 - \sin\theta)`, with :math:`\theta` evenly spaced
    in :math:`[0, \pi]`, plus Gaussian noise of standard deviation ``noise``.
    With ``shuffle=False`` and no noise the points equal
    ``sklearn.datasets.make_moons(n, shuffle=False)``.

    Returns:
        ``x`` of shape ``(n, 2)`` and ``y`` int64 labels of shape ``(n,)``.
    """
    n = _count("two_moons", "n", n, 2)
    noise = _noise("two_moons", noise)
    rng = _generator("two_moons", rng, noise > 0 or shuffle)
    n_outer = n // 2
    n_inner = n - n_outer
    outer = torch.linspace(0.0, math.pi, n_outer, dtype=torch.float64)
    inner = torch.linspace(0.0, math.pi, n_inner, dtype=torch.float64)
    x = torch.cat([torch.stack([torch.cos(outer), torch.sin(outer)], dim=1),
                   torch.stack([1.0 - torch.cos(inner), 0.5 - torch.sin(inner)], dim=1)])
    y = torch.cat([torch.zeros(n_outer, dtype=torch.int64), torch.ones(n_inner, dtype=torch.int64)])
    return _finish("two_moons", x, y, noise, rng, shuffle, dtype, device)


def _cubic_spiral_rhs(u: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return (u ** 3) @ matrix


def spiral_ode_data(n: int = 30, *, tspan: Sequence[float] = (0.0, 1.5), u0: Any = (2.0, 0.0),
                    substeps: int = 20, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The trajectory of the cubic spiral ODE, the data of the classic neural-ODE fit.

    .. math::  \frac{du}{dt} = u^{3} A, \qquad A = \begin{pmatrix} -0.1 & 2.0 \\ -2.0 & -0.1 \end{pmatrix},

    with :math:`u` a row vector and the cube taken elementwise — i.e. :math:`A^\top u^3` for a
    column vector, exactly the convention of the DiffEqFlux.jl / Lux.jl neural-ODE tutorial
    (``du .= ((u.^3)'true_A)'``) and of torchdiffeq's ``ode_demo.py`` — from
    :math:`u(0) = (2, 0)` over :math:`t \in [0, 1.5]`, saved at ``n`` evenly spaced times.

    Integrated with the classical fourth-order Runge–Kutta method in float64,
    ``substeps`` steps between consecutive save points (no scipy needed); the
    default is accurate to about :math:`3 \cdot 10^{-8}` (float64).

    Args:
        n: number of save points (>= 2), including both ends of ``tspan``.
        tspan: ``(t0, t1)``, ``t0 < t1``.
        u0: initial state of shape ``(2,)`` or a batch ``(b, 2)``.
        substeps: RK4 steps per save interval.
        dtype, device: of the returned tensors.

    Returns:
        ``t`` of shape ``(n,)`` and ``u`` of shape ``(n, 2)`` (or ``(n, b, 2)``).
    """
    n = _count("spiral_ode_data", "n", n, 2)
    substeps = _count("spiral_ode_data", "substeps", substeps, 1)
    if (not isinstance(tspan, (tuple, list)) or len(tspan) != 2
            or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in tspan) or tspan[0] >= tspan[1]):
        raise ValueError(f"spiral_ode_data: tspan must be a pair (t0, t1) of finite numbers with t0 < t1, "
                         f"got {tspan!r}")
    state = torch.as_tensor(u0, dtype=torch.float64).clone()
    if state.shape[-1:] != (2,) or state.dim() > 2 or not bool(torch.isfinite(state).all()):
        raise ValueError(f"spiral_ode_data: u0 must be finite with shape (2,) or (b, 2), got {tuple(state.shape)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"spiral_ode_data: dtype must be a floating torch.dtype, got {dtype!r}")
    matrix = torch.tensor(SPIRAL_ODE_MATRIX, dtype=torch.float64)
    t = torch.linspace(float(tspan[0]), float(tspan[1]), n, dtype=torch.float64)
    h = (float(tspan[1]) - float(tspan[0])) / ((n - 1) * substeps)
    saved = [state]
    for _ in range(n - 1):
        for _ in range(substeps):
            k1 = _cubic_spiral_rhs(state, matrix)
            k2 = _cubic_spiral_rhs(state + 0.5 * h * k1, matrix)
            k3 = _cubic_spiral_rhs(state + 0.5 * h * k2, matrix)
            k4 = _cubic_spiral_rhs(state + h * k3, matrix)
            state = state + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        saved.append(state)
    u = torch.stack(saved)
    return t.to(device=device, dtype=dtype), u.to(device=device, dtype=dtype)


def _white_dwarf_rhs(t: float, state: torch.Tensor, c: float) -> torch.Tensor:
    x, v = state[..., 0], state[..., 1]
    source = (x * x - c).clamp_min(0.0) ** 1.5
    # at t = 0, v = 0 and v' = a with a + 2a = -(x^2 - C)^(3/2): the regular solution's limit
    dv = -source / 3.0 if t == 0.0 else -2.0 / t * v - source
    return torch.stack([v, dv], dim=-1)


def white_dwarf_data(n: int = 50, *, c: float = 0.001, tspan: Sequence[float] = (0.0, 5.0),
                     substeps: int = 40, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Chandrasekhar's white-dwarf equation, the data of the reversible-solver experiment.

    .. math::  x'' + \frac{2}{t} x' + (x^2 - C)^{3/2} = 0, \qquad x(0) = 1,\; x'(0) = 0,

    written as the system :math:`x' = v`, :math:`v' = -(2/t) v - (x^2 - C)^{3/2}`
    (Chandrasekhar, *An introduction to the study of stellar structure*, 1939),
    with the regular limit :math:`v'(0) = -(1 - C)^{3/2} / 3` at the singular
    point. :math:`(x^2 - C)` is clamped at 0 (the star's surface, where
    :math:`x = \sqrt{C}`, lies beyond :math:`t = 5` for :math:`C = 0.001`).

    Integrated with classical RK4 in float64, ``substeps`` steps per save
    interval; the default agrees with scipy's DOP853 at rtol 1e-10 to about 1e-9.

    Args:
        n: number of save points (>= 2), including both ends of ``tspan``.
        c: the constant :math:`C` (0 < C < 1).
        tspan: ``(t0, t1)`` with ``0 <= t0 < t1``; the state at ``t0 > 0`` is
            obtained by integrating from 0.
        substeps: RK4 steps per save interval.
        dtype, device: of the returned tensors.

    Returns:
        ``t`` of shape ``(n,)`` and ``u`` of shape ``(n, 2)``, columns ``(x, v)``.
    """
    n = _count("white_dwarf_data", "n", n, 2)
    substeps = _count("white_dwarf_data", "substeps", substeps, 1)
    if (not isinstance(tspan, (tuple, list)) or len(tspan) != 2
            or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in tspan)
            or not 0 <= tspan[0] < tspan[1]):
        raise ValueError(f"white_dwarf_data: tspan must be a pair (t0, t1) with 0 <= t0 < t1, got {tspan!r}")
    if not isinstance(c, numbers.Real) or not 0 < c < 1:
        raise ValueError(f"white_dwarf_data: c must be in (0, 1), got {c!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"white_dwarf_data: dtype must be a floating torch.dtype, got {dtype!r}")
    t0, t1 = float(tspan[0]), float(tspan[1])
    times = [t0 + (t1 - t0) * i / (n - 1) for i in range(n)]
    state = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t, saved = 0.0, []

    def advance(state, t, target, steps):
        h = (target - t) / steps
        for i in range(steps):
            s = t + i * h
            k1 = _white_dwarf_rhs(s, state, c)
            k2 = _white_dwarf_rhs(s + h / 2, state + h / 2 * k1, c)
            k3 = _white_dwarf_rhs(s + h / 2, state + h / 2 * k2, c)
            k4 = _white_dwarf_rhs(s + h, state + h * k3, c)
            state = state + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return state
    if t0 > 0:
        state = advance(state, 0.0, t0, max(substeps, math.ceil(substeps * t0 / ((t1 - t0) / (n - 1)))))
        t = t0
    saved.append(state)
    for target in times[1:]:
        state = advance(state, t, target, substeps)
        t = target
        saved.append(state)
    return (torch.tensor(times, dtype=torch.float64).to(device=device, dtype=dtype),
            torch.stack(saved).to(device=device, dtype=dtype))
