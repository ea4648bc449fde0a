"""Density-estimation data: the 2-D toy sets' laws, dequantized digits, the MINIBOONE loader on a file
written here, bits per dimension, bad inputs."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

import pylux as lx
from pylux.data import (DIGITS_LEVELS, bits_per_dim, checkerboard, dequantized_digits, eight_gaussians, miniboone,
                        pinwheel, two_moons)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("make", [eight_gaussians, checkerboard, pinwheel])
def test_seeded_shapes_and_dtypes(make):
    a, b = make(500, rng=gen(3)), make(500, rng=gen(3))
    assert a.shape == (500, 2) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (make(500, rng=gen(4)) - a).abs().max() > 0
    assert make(10, rng=gen(0), dtype=torch.float64).dtype == torch.float64


def test_eight_gaussians_components():
    n, r, s = 40000, 2.0 * math.sqrt(2.0), 0.5 / math.sqrt(2.0)
    x = eight_gaussians(n, rng=gen(1), dtype=torch.float64)
    angle = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = r * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    k = torch.cdist(x, centres).argmin(1)
    counts = torch.bincount(k, minlength=8).numpy()
    assert scipy.stats.chisquare(counts).pvalue > 1e-3  # equal weights
    resid = x - centres[k]
    # within-component spread is sigma on each axis (4 standard errors of a sample std: 4 s / sqrt(2n))
    assert abs(float(resid.std(0).mean()) - s) < 4 * s / math.sqrt(2 * n)


def test_checkerboard_is_uniform_on_the_dark_squares():
    x = checkerboard(40000, rng=gen(2), dtype=torch.float64)
    assert x.min() >= -4 and x.max() < 4
    i, j = torch.floor((x[:, 0] + 4) / 2).long(), torch.floor((x[:, 1] + 4) / 2).long()
    assert bool(((i + j) % 2 == 0).all())
    counts = torch.bincount(4 * i + j, minlength=16).numpy()
    dark = counts[[4 * a + b for a in range(4) for b in range(4) if (a + b) % 2 == 0]]
    assert scipy.stats.chisquare(dark).pvalue > 1e-3
    frac = ((x + 4) % 2) / 2  # position inside its square: uniform
    assert scipy.stats.kstest(frac[:, 0].numpy(), "uniform").pvalue > 1e-3


def test_pinwheel_arms():
    x = pinwheel(20000, rng=gen(5), dtype=torch.float64)
    radius = x.norm(dim=1) / 2
    # radius = sqrt(u^2 + v^2) with u ~ N(1, 0.3^2), v ~ N(0, 0.1^2): mean close to E|u| + small
    assert abs(float(radius.mean()) - 1.0) < 0.03
    assert 4 < float(radius.max()) / float(radius.min()) < 1e3
    angle = torch.atan2(x[:, 1], x[:, 0])
    hist = np.histogram(angle.numpy(), bins=60)[0]
    assert hist.max() > 2 * hist.mean()  # concentrated on arms, not uniform in angle


def test_two_moons_is_reexported():
    x, y = two_moons(100, noise=0.1, rng=gen(0))
    assert x.shape == (100, 2) and lx.data.two_moons is two_moons


def test_dequantized_digits():
    y = dequantized_digits("train", rng=gen(0), dtype=torch.float64)
    pixels, _ = lx.data.load_digits("train", normalize=False, dtype=torch.float64)
    assert y.shape == (1437, 64) and y.min() >= 0 and y.max() < 1
    torch.testing.assert_close(torch.floor(y * DIGITS_LEVELS), pixels, rtol=0, atol=0)  # the noise stays in the bin
    u = (y * DIGITS_LEVELS - pixels).reshape(-1).numpy()
    assert scipy.stats.kstest(u[:20000], "uniform").pvalue > 1e-3
    assert dequantized_digits("test", rng=gen(0)).shape == (360, 64)


def test_bits_per_dim():
    # the uniform density on [0, 1)^D has log p = 0: bpd = log2(levels), the entropy of uniform pixels
    assert abs(float(bits_per_dim(torch.zeros(7, dtype=torch.float64), 64)) - math.log2(17)) < 1e-12
    log_p = torch.tensor([-10.0, -30.0])
    expected = (20.0 + 64 * math.log(17)) / (64 * math.log(2))
    assert abs(float(bits_per_dim(log_p, 64)) - expected) < 1e-6


def test_miniboone_loader_on_a_written_file(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(200, 43))
    path = tmp_path / "data.npy"
    np.save(path, data)
    train, val, test = (miniboone(path, s, dtype=torch.float64) for s in ("train", "validation", "test"))
    assert (train.shape, val.shape, test.shape) == ((162, 43), (18, 43), (20, 43))
    mu, sd = data[:180].mean(0), data[:180].std(0)
    np.testing.assert_allclose(test.numpy(), (data[180:] - mu) / sd, rtol=1e-12)
    np.testing.assert_allclose(val.numpy(), (data[162:180] - mu) / sd, rtol=1e-12)
    both = torch.cat([train, val])
    np.testing.assert_allclose(both.mean(0).numpy(), 0, atol=1e-12)
    np.testing.assert_allclose(both.std(0, unbiased=False).numpy(), 1, atol=1e-12)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="n must be an integer"):
        eight_gaussians(0, rng=gen())
    with pytest.raises(TypeError, match="explicit random generator"):
        checkerboard(10, rng=None)
    with pytest.raises(TypeError, match="torch.Generator"):
        pinwheel(10, rng=3)
    with pytest.raises(ValueError, match="std must be a finite number > 0"):
        eight_gaussians(10, rng=gen(), std=-1.0)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        pinwheel(10, rng=gen(), dtype=torch.int64)
    with pytest.raises(FileNotFoundError, match="does not download"):
        miniboone(tmp_path / "missing.npy")
    np.save(tmp_path / "wrong.npy", np.zeros((50, 5)))
    with pytest.raises(ValueError, match="shape \\(N, 43\\)"):
        miniboone(tmp_path / "wrong.npy")
    with pytest.raises(ValueError, match="split must be one of"):
        miniboone(tmp_path / "wrong.npy", "val")
    np.save(tmp_path / "short.npy", np.zeros((5, 43)))
    with pytest.raises(ValueError, match="too few"):
        miniboone(tmp_path / "short.npy")
