"""Weight initialisers with the Lux.jl (WeightInitializers.jl) calling convention.

Every initialiser is called as ``init(rng, *shape, dtype=torch.float32)`` and
draws from the explicit ``torch.Generator`` ``rng`` on ``rng``'s device, so a
model set up twice from the same seed gets identical parameters.

Fan-in and fan-out follow the PyTorch weight layout used throughout
:mod:`pylux.nn` (the transpose of Julia's, with the same numbers):

* ``()``:                          fan_in = fan_out = 1;
* ``(n,)``:                        fan_in = 1, fan_out = n (as Lux's ``_nfan``);
* ``(out, in)`` (Dense):           fan_in = in, fan_out = out;
* ``(out, in/groups, *kernel)``:   fan_in = in/groups · prod(kernel),
  fan_out = out · prod(kernel) (Conv, the Lux convention).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..core import check_generator

__all__ = [
    "glorot_uniform",
    "glorot_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "zeros",
    "ones",
    "fan_in_fan_out",
    "Initializer",
]

Initializer = Callable[..., torch.Tensor]
"""``init(rng, *shape, dtype=...) -> tensor``."""


def _check_shape(shape: tuple, where: str) -> tuple[int, ...]:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"{where}: dimensions must be ints, got {d!r} of type {type(d).__name__} "
                            f"in shape {shape!r}")
        if d < 0:
            raise ValueError(f"{where}: dimensions must be non-negative, got shape {shape!r}")
    return tuple(shape)


def _check_dtype(dtype: torch.dtype, where: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"{where}: dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    return dtype


def fan_in_fan_out(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of ``shape`` in PyTorch layout (see the module docstring)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def glorot_uniform(rng: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32,
                   gain: float = 1.0) -> torch.Tensor:
    r"""Glorot (Xavier) uniform: :math:`W_{ij} \sim U(-a, a)`, :math:`a = g\sqrt{6/(n_\text{in}+n_\text{out})}`.

    Keeps the variance of activations and of gradients roughly constant across
    layers (Glorot & Bengio, "Understanding the difficulty of training deep
    feedforward neural networks", AISTATS 2010). The default weight
    initialiser of :class:`~pylux.nn.Dense` and :class:`~pylux.nn.Conv`.
    """
    rng = check_generator(rng, "glorot_uniform")
    shape = _check_shape(shape, "glorot_uniform")
    dtype = _check_dtype(dtype, "glorot_uniform")
    fan_in, fan_out = fan_in_fan_out(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    u = torch.rand(shape, generator=rng, device=rng.device, dtype=dtype)
    return (u - 0.5) * (2.0 * bound)


def glorot_normal(rng: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32,
                  gain: float = 1.0) -> torch.Tensor:
    r"""Glorot (Xavier) normal: :math:`W_{ij} \sim N(0, \sigma^2)`.

    :math:`\sigma = g\sqrt{2/(n_\text{in}+n_\text{out})}`.

    Glorot & Bengio (AISTATS 2010).
    """
    rng = check_generator(rng, "glorot_normal")
    shape = _check_shape(shape, "glorot_normal")
    dtype = _check_dtype(dtype, "glorot_normal")
    fan_in, fan_out = fan_in_fan_out(shape)
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    return torch.randn(shape, generator=rng, device=rng.device, dtype=dtype) * std


def kaiming_uniform(rng: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32,
                    gain: float = math.sqrt(2.0)) -> torch.Tensor:
    r"""Kaiming (He) uniform: :math:`W_{ij} \sim U(-a, a)`, :math:`a = g\sqrt{3/n_\text{in}}`.

    The default gain :math:`\sqrt 2` keeps the forward variance of ReLU
    networks constant (He et al., "Delving deep into rectifiers", ICCV 2015).
    """
    rng = check_generator(rng, "kaiming_uniform")
    shape = _check_shape(shape, "kaiming_uniform")
    dtype = _check_dtype(dtype, "kaiming_uniform")
    fan_in, _ = fan_in_fan_out(shape)
    bound = gain * math.sqrt(3.0 / fan_in) if fan_in > 0 else 0.0
    u = torch.rand(shape, generator=rng, device=rng.device, dtype=dtype)
    return (u - 0.5) * (2.0 * bound)


def kaiming_normal(rng: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32,
                   gain: float = math.sqrt(2.0)) -> torch.Tensor:
    r"""Kaiming (He) normal: :math:`W_{ij} \sim N(0, \sigma^2)`, :math:`\sigma = g/\sqrt{n_\text{in}}`.

    He et al. (ICCV 2015).
    """
    rng = check_generator(rng, "kaiming_normal")
    shape = _check_shape(shape, "kaiming_normal")
    dtype = _check_dtype(dtype, "kaiming_normal")
    fan_in, _ = fan_in_fan_out(shape)
    std = gain / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return torch.randn(shape, generator=rng, device=rng.device, dtype=dtype) * std


def zeros(rng: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All zeros; ``rng`` is accepted for a uniform signature and left untouched."""
    rng = check_generator(rng, "zeros")
    shape = _check_shape(shape, "zeros")
    return torch.zeros(shape, device=rng.device, dtype=_check_dtype(dtype, "zeros"))


def ones(rng: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All ones; ``rng`` is accepted for a uniform signature and left untouched."""
    rng = check_generator(rng, "ones")
    shape = _check_shape(shape, "ones")
    return torch.ones(shape, device=rng.device, dtype=_check_dtype(dtype, "ones"))
