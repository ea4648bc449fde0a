r"""Data for density estimation: the 2-D toy densities, dequantized digits, and MINIBOONE from a local file.

The 2-D sets are those of the continuous-flow literature (Grathwohl et al., FFJORD, ICLR 2019;
Finlay et al., RNODE, ICML 2020): eight Gaussians, a checkerboard, a pinwheel (and
:func:`~pylux.data.two_moons` from :mod:`pylux.data.synthetic`). Every draw comes from an explicit
CPU ``torch.Generator``: the same generator state gives the same points.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from .digits import load_digits
from .synthetic import _count, _generator

__all__ = ["eight_gaussians", "checkerboard", "pinwheel", "dequantized_digits", "bits_per_dim", "miniboone",
           "DIGITS_LEVELS", "MINIBOONE_DIMS"]

#: grey levels of the 8x8 digits (pixel values 0..16).
DIGITS_LEVELS = 17
#: features of Papamakarios et al.'s preprocessed MINIBOONE.
MINIBOONE_DIMS = 43


def _positive(where: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _out(where: str, x: torch.Tensor, dtype, device) -> torch.Tensor:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{where}: dtype must be a floating torch.dtype, got {dtype!r}")
    return x.to(device=device, dtype=dtype)


def eight_gaussians(n: int, *, rng: torch.Generator, radius: float = 2.0 * math.sqrt(2.0), std: float = 0.5 / math.sqrt(2.0),
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    r"""A mixture of eight isotropic Gaussians with equal weights, centred on a circle.

    .. math::  p(x) = \frac18 \sum_{k=0}^{7} \mathcal N\big(x;\ r(\cos\tfrac{k\pi}{4}, \sin\tfrac{k\pi}{4}),\ \sigma^2 I\big)

    The defaults (:math:`r = 2\sqrt2`, :math:`\sigma = 0.5/\sqrt2`) are the scale of FFJORD's toy set.

    Returns:
        ``(n, 2)`` points.
    """
    n = _count("eight_gaussians", "n", n, 1)
    radius, std = _positive("eight_gaussians", "radius", radius), _positive("eight_gaussians", "std", std)
    rng = _generator("eight_gaussians", rng, True)
    k = torch.randint(0, 8, (n,), generator=rng).to(torch.float64)
    centres = radius * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], dim=1)
    x = centres + std * torch.randn((n, 2), generator=rng, dtype=torch.float64)
    return _out("eight_gaussians", x, dtype, device)


def checkerboard(n: int, *, rng: torch.Generator, cell: float = 2.0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    r"""The uniform density on the dark squares of a 4x4 checkerboard of side ``4 * cell``, centred at 0.

    Square :math:`(i, j)`, :math:`i, j \in \{0..3\}`, covers
    :math:`[-2c + ic, -2c + (i+1)c) \times [-2c + jc, -2c + (j+1)c)` and is dark when
    :math:`i + j` is even; each of the 8 dark squares has density :math:`1/(8c^2)`.

    Returns:
        ``(n, 2)`` points.
    """
    n = _count("checkerboard", "n", n, 1)
    cell = _positive("checkerboard", "cell", cell)
    rng = _generator("checkerboard", rng, True)
    square = torch.randint(0, 8, (n,), generator=rng)
    i = square // 2
    j = 2 * (square % 2) + (i % 2)  # the dark column in row i: i + j even
    corner = torch.stack([i, j], dim=1).to(torch.float64) * cell - 2 * cell
    x = corner + cell * torch.rand((n, 2), generator=rng, dtype=torch.float64)
    return _out("checkerboard", x, dtype, device)


def pinwheel(n: int, *, rng: torch.Generator, arms: int = 5, radial_std: float = 0.3, tangential_std: float = 0.1,
             rate: float = 0.25, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> torch.Tensor:
    r"""A pinwheel: ``arms`` curved arms made by twisting Gaussian blobs.

    Arm :math:`k` draws :math:`(u, v) = (1 + \sigma_r a, \sigma_t b)`, :math:`a, b \sim \mathcal N(0, 1)`,
    and rotates it by :math:`2\pi k/\text{arms} + \rho\, e^{u}` (the twist grows with the radius).
    The defaults (5 arms, :math:`\sigma_r = 0.3`, :math:`\sigma_t = 0.1`, :math:`\rho = 0.25`)
    are those of the FFJORD toy set; the points are scaled by 2.

    Returns:
        ``(n, 2)`` points.
    """
    n = _count("pinwheel", "n", n, 1)
    arms = _count("pinwheel", "arms", arms, 1)
    radial_std = _positive("pinwheel", "radial_std", radial_std)
    tangential_std = _positive("pinwheel", "tangential_std", tangential_std)
    rate = _positive("pinwheel", "rate", rate)
    rng = _generator("pinwheel", rng, True)
    k = torch.randint(0, arms, (n,), generator=rng).to(torch.float64)
    ab = torch.randn((n, 2), generator=rng, dtype=torch.float64)
    u = 1.0 + radial_std * ab[:, 0]
    v = tangential_std * ab[:, 1]
    angle = 2 * math.pi * k / arms + rate * torch.exp(u)
    c, s = torch.cos(angle), torch.sin(angle)
    x = 2.0 * torch.stack([c * u - s * v, s * u + c * v], dim=1)
    return _out("pinwheel", x, dtype, device)


def dequantized_digits(split: str = "train", *, rng: torch.Generator, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> torch.Tensor:
    r"""The embedded 8x8 digits as 64-d points in :math:`[0, 1)^{64}`, uniformly dequantized.

    .. math::  y = (x + u)/17, \qquad x \in \{0, \dots, 16\}^{64},\ u \sim \mathcal U[0, 1)^{64}

    A continuous density :math:`p(y)` then bounds the discrete model's log-likelihood from below
    (Theis, van den Oord & Bethge 2016); :func:`bits_per_dim` converts it.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (as :func:`~pylux.data.load_digits`).
        rng: CPU generator of the dequantization noise.

    Returns:
        ``(n, 64)`` points.
    """
    rng = _generator("dequantized_digits", rng, True)
    pixels, _ = load_digits(split, normalize=False, dtype=torch.float64)
    y = (pixels + torch.rand(pixels.shape, generator=rng, dtype=torch.float64)) / DIGITS_LEVELS
    return _out("dequantized_digits", y, dtype, device)


def bits_per_dim(log_p: torch.Tensor, dim: int, levels: int = DIGITS_LEVELS) -> torch.Tensor:
    r"""Bits per dimension of data quantized to ``levels`` levels per dimension and scaled to :math:`[0, 1)`.

    .. math::  \mathrm{bpd} = \frac{-\log p(y) + D \log(\text{levels})}{D \log 2}

    (a bin of the quantized data has volume :math:`\text{levels}^{-D}` in :math:`y`), averaged
    over the rows of ``log_p``.
    """
    dim = _count("bits_per_dim", "dim", dim, 1)
    levels = _count("bits_per_dim", "levels", levels, 2)
    return (-log_p.mean() + dim * math.log(levels)) / (dim * math.log(2.0))


def miniboone(path: str | os.PathLike, split: str = "train", *, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> torch.Tensor:
    r"""MINIBOONE from Papamakarios, Pavlakou & Murray's (MAF, NeurIPS 2017) preprocessed ``data.npy``.

    The file holds an ``(N, 43)`` array (outliers and the discrete features already removed).
    The split is theirs: the last 10 % of the rows are the test set, the last 10 % of the rest
    the validation set, the remainder the training set; every split is standardized with the
    mean and standard deviation of the training and validation rows together. Nothing is
    downloaded: pass the path of the file you have.

    Args:
        path: the ``.npy`` file (e.g. ``maf_data/miniboone/data.npy``).
        split: ``"train"``, ``"validation"`` or ``"test"``.

    Returns:
        ``(n, 43)`` points.

    Raises:
        FileNotFoundError: no file at ``path`` (with where to get it).
        ValueError: an unknown split; an array that is not 2-D with 43 columns, or too short to split.
    """
    splits = ("train", "validation", "test")
    if split not in splits:
        raise ValueError(f"miniboone: split must be one of {splits}, got {split!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"miniboone: no file at {path!r}; it is data/miniboone/data.npy of the data "
                                "release of Papamakarios et al. (MAF, 2017), which pylux does not download")
    data = np.load(path, allow_pickle=False)
    if data.ndim != 2 or data.shape[1] != MINIBOONE_DIMS:
        raise ValueError(f"miniboone: expected an array of shape (N, {MINIBOONE_DIMS}), got {data.shape} in {path!r}")
    n_test = int(0.1 * data.shape[0])
    rest = data[:data.shape[0] - n_test]
    n_validate = int(0.1 * rest.shape[0])
    if n_test < 1 or n_validate < 1:
        raise ValueError(f"miniboone: {data.shape[0]} rows are too few to split (need at least 20)")
    parts = {"train": rest[:rest.shape[0] - n_validate], "validation": rest[rest.shape[0] - n_validate:],
             "test": data[data.shape[0] - n_test:]}
    mean, std = rest.mean(axis=0), rest.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant column is only centred
    x = torch.from_numpy((parts[split].astype(np.float64) - mean) / std)
    return _out("miniboone", x, dtype, device)
