"""pylux.data: embedded digits, synthetic sets, the spiral ODE, local MNIST, ArrayLoader."""

import gzip
import math
import os
import struct

import numpy as np
import pytest
import torch

from pylux.data import (
    ArrayLoader,
    load_digits,
    load_mnist,
    read_idx,
    spiral_ode_data,
    spirals,
    two_moons,
    white_dwarf_data,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- digits

def test_digits_shapes_dtypes_and_split():
    x, y = load_digits("train")
    assert x.shape == (1437, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    xt, yt = load_digits("test")
    assert xt.shape == (360, 64) and torch.equal(torch.bincount(yt), torch.full((10,), 36))
    xa, ya = load_digits("all", flatten=False, dtype=torch.float64)
    assert xa.shape == (1797, 1, 8, 8) and xa.dtype == torch.float64
    # train and test partition the full set
    assert sorted(torch.cat([y, yt]).tolist()) == sorted(ya.tolist())
    x2, y2 = load_digits("train")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x2[0, 0] = 99.0  # callers get fresh tensors; the embedded data cannot be corrupted
    assert float(load_digits("train")[0][0, 0]) == float(x[0, 0])


def test_digits_equal_scikit_learn():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    reference = sklearn_datasets.load_digits()
    x, y = load_digits("all", normalize=False, dtype=torch.float64)
    assert np.array_equal(x.numpy(), reference.data) and np.array_equal(y.numpy(), reference.target)
    raw, _ = load_digits("all", normalize=False, dtype=torch.uint8)
    assert raw.dtype == torch.uint8 and int(raw.max()) == 16
    scaled, _ = load_digits("all")
    assert np.allclose(scaled.numpy(), reference.data / 16.0)


def test_digits_standardize_uses_training_statistics():
    x_train, _ = load_digits("train", dtype=torch.float64)
    x_test, _ = load_digits("test", dtype=torch.float64)
    mean, std = x_train.mean(0), x_train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    z_train, _ = load_digits("train", standardize=True, dtype=torch.float64)
    z_test, _ = load_digits("test", standardize=True, dtype=torch.float64)
    assert torch.allclose(z_test, (x_test - mean) / std)
    assert torch.allclose(z_train.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-12)
    varying = x_train.std(0) > 0
    assert torch.allclose(z_train.std(0)[varying], torch.ones(int(varying.sum()), dtype=torch.float64), atol=1e-12)
    assert int((~varying).sum()) >= 1  # constant pixels exist and are only centred, never divided by zero
    assert bool(torch.isfinite(z_test).all())


def test_digits_bad_inputs():
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test', 'all'\), got 'validation'"):
        load_digits("validation")
    with pytest.raises(TypeError, match="dtype torch.int64 cannot hold normalized"):
        load_digits("train", dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        load_digits("train", dtype="float32")


# ---------------------------------------------------------------- synthetic

def test_spirals_geometry_and_determinism():
    x, y = spirals(101, shuffle=False, dtype=torch.float64)
    assert x.shape == (101, 2) and y.shape == (101,) and y.dtype == torch.int64
    assert int((y == 0).sum()) == 51 and int((y == 1).sum()) == 50
    arm0 = x[y == 0]
    assert torch.allclose(arm0.norm(dim=1), torch.linspace(0.05, 1.0, 51, dtype=torch.float64))
    even, _ = spirals(100, shuffle=False, dtype=torch.float64)
    assert torch.allclose(even[50:], -even[:50])  # arm 1 is arm 0 rotated by pi
    a = spirals(64, noise=0.1, rng=gen(3))
    b = spirals(64, noise=0.1, rng=gen(3))
    c = spirals(64, noise=0.1, rng=gen(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert sorted(a[1].tolist()) == [0] * 32 + [1] * 32


def test_two_moons_equal_scikit_learn_and_noise_level():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    x, y = two_moons(51, shuffle=False, dtype=torch.float64)
    xr, yr = sklearn_datasets.make_moons(51, shuffle=False)
    assert np.allclose(x.numpy(), xr, atol=1e-15) and np.array_equal(y.numpy(), yr)
    clean, _ = two_moons(4000, shuffle=False, dtype=torch.float64)
    noisy, _ = two_moons(4000, noise=0.2, shuffle=False, rng=gen(), dtype=torch.float64)
    assert float((noisy - clean).std()) == pytest.approx(0.2, rel=0.05)


def test_synthetic_bad_inputs():
    with pytest.raises(TypeError, match=r"need an explicit random generator; pass rng=torch.Generator"):
        spirals(10)
    with pytest.raises(TypeError, match="rng must be a torch.Generator, got int"):
        two_moons(10, rng=0)
    with pytest.raises(ValueError, match="noise must be a finite number >= 0, got -0.1"):
        two_moons(10, noise=-0.1, rng=gen())
    with pytest.raises(ValueError, match="n must be an integer >= 2, got 1"):
        spirals(1, rng=gen())
    with pytest.raises(ValueError, match="turns must be a finite number > 0"):
        spirals(10, rng=gen(), turns=0)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        two_moons(10, shuffle=False, dtype=torch.int32)


def test_white_dwarf_data_matches_scipy():
    scipy_integrate = pytest.importorskip("scipy.integrate")
    c = 0.001
    t, u = white_dwarf_data(26, c=c, dtype=torch.float64)
    assert t.shape == (26,) and u.shape == (26, 2) and u[0].tolist() == [1.0, 0.0]

    def rhs(s, y):  # started just off the singular point from the regular series x = 1 - a s^2 / 6
        x, v = y
        return [v, -2.0 / s * v - max(x * x - c, 0.0) ** 1.5]
    s0, a = 1e-4, (1 - c) ** 1.5
    start = [1 - a * s0 ** 2 / 6, -a * s0 / 3]
    ref = scipy_integrate.solve_ivp(rhs, (s0, 5.0), start, t_eval=t.numpy()[1:], method="DOP853",
                                    rtol=1e-12, atol=1e-13)
    assert np.max(np.abs(u.numpy()[1:] - ref.y.T)) < 1e-8
    assert 0.1 < float(u[-1, 0]) < 0.12  # x(5) = 0.1123 for C = 0.001
    with pytest.raises(ValueError, match="c must be in"):
        white_dwarf_data(c=1.5)
    with pytest.raises(ValueError, match="0 <= t0 < t1"):
        white_dwarf_data(tspan=(-1.0, 2.0))


def test_spiral_ode_data_matches_scipy():
    scipy_integrate = pytest.importorskip("scipy.integrate")
    t, u = spiral_ode_data(30, dtype=torch.float64)
    assert t.shape == (30,) and u.shape == (30, 2)
    assert float(t[0]) == 0.0 and float(t[-1]) == 1.5 and u[0].tolist() == [2.0, 0.0]
    A = np.array([[-0.1, 2.0], [-2.0, -0.1]])

    def lux_tutorial_rhs(_, v):  # du .= ((u.^3)'true_A)'  (DiffEqFlux / Lux neural-ODE tutorial)
        return ((v ** 3)[None, :] @ A)[0]

    ref = scipy_integrate.solve_ivp(lux_tutorial_rhs, (0.0, 1.5), [2.0, 0.0], t_eval=t.numpy(), method="DOP853",
                                    rtol=1e-13, atol=1e-13)
    error = np.max(np.abs(u.numpy() - ref.y.T))
    assert error < 1e-7
    coarse = np.max(np.abs(spiral_ode_data(30, substeps=10, dtype=torch.float64)[1].numpy() - ref.y.T))
    assert 12 < coarse / error < 20  # RK4: halving the step divides the error by 2**4
    # the first derivative by hand: u0^3 A = (8, 0) A = (-0.8, 16)
    assert lux_tutorial_rhs(0, np.array([2.0, 0.0])).tolist() == pytest.approx([-0.8, 16.0])
    t32, u32 = spiral_ode_data()
    assert u32.dtype == torch.float32 and torch.allclose(u32.double(), u, atol=1e-6)
    _, batch = spiral_ode_data(5, u0=[[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t5, single = spiral_ode_data(5, u0=[0.0, 1.0], dtype=torch.float64)
    assert batch.shape == (5, 2, 2) and torch.allclose(batch[:, 1], single, rtol=1e-12)
    assert torch.equal(t5, torch.linspace(0, 1.5, 5, dtype=torch.float64))


def test_spiral_ode_data_bad_inputs():
    with pytest.raises(ValueError, match=r"tspan must be a pair \(t0, t1\) of finite numbers with t0 < t1"):
        spiral_ode_data(tspan=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"u0 must be finite with shape \(2,\) or \(b, 2\), got \(3,\)"):
        spiral_ode_data(u0=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="u0 must be finite"):
        spiral_ode_data(u0=[float("nan"), 0.0])
    with pytest.raises(ValueError, match="substeps must be an integer >= 1"):
        spiral_ode_data(substeps=0)


# ---------------------------------------------------------------- MNIST (IDX files)

def idx_bytes(array, type_code):
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_mnist(folder, split="train", n=5, gz=False, rows=4, cols=3):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = idx_bytes(array, 0x08)
        if gz:
            name, data = name + ".gz", gzip.compress(data)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_reads_idx_files(tmp_path, gz):
    images, labels = write_mnist(tmp_path, "test", gz=gz)
    x, y = load_mnist(tmp_path, "test")
    assert x.shape == (5, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert np.allclose(x.numpy(), images.reshape(5, -1) / 255.0) and np.array_equal(y.numpy(), labels)
    raw, _ = load_mnist(tmp_path, "test", normalize=False, flatten=False, dtype=torch.uint8)
    assert raw.shape == (5, 1, 4, 3) and np.array_equal(raw[:, 0].numpy(), images)


def test_load_mnist_torchvision_layout_and_read_idx_types(tmp_path):
    images, _ = write_mnist(tmp_path / "MNIST" / "raw", "train", gz=True)
    x, _ = load_mnist(tmp_path, "train", normalize=False, dtype=torch.float64)
    assert np.array_equal(x.numpy(), images.reshape(5, -1).astype(np.float64))
    for code, dtype in ((0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64), (0x0B, np.int16)):
        array = (np.arange(6).reshape(2, 3) - 2).astype(dtype)
        path = tmp_path / f"a{code}.idx"
        path.write_bytes(idx_bytes(array, code))
        got = read_idx(path)
        assert got.dtype == dtype and got.dtype.isnative and np.array_equal(got, array)


def test_load_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte .* not found in"):
        load_mnist(tmp_path, "test")
    write_mnist(tmp_path, "train")
    os.remove(tmp_path / "train-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match=r"^load_mnist: train-labels-idx1-ubyte \(or the same name"):
        load_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        load_mnist(tmp_path, "val")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8), 0x08))
    with pytest.raises(ValueError, match="5 images in .* but 4 labels"):
        load_mnist(tmp_path, "train")
    bad = tmp_path / "bad"
    bad.write_bytes(idx_bytes(np.zeros((2, 2), np.uint8), 0x08)[:-1])
    with pytest.raises(ValueError, match=r"announces shape \(2, 2\) \(4 bytes of data\) but holds 3 bytes"):
        read_idx(bad)
    bad.write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="is not an IDX file"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="unknown IDX type code 0x07"):
        read_idx(bad)


# ---------------------------------------------------------------- ArrayLoader

def test_array_loader_batches_cover_every_sample_once():
    x = torch.arange(10.0)[:, None].repeat(1, 3)
    y = torch.arange(10)
    loader = ArrayLoader(x, y, 4, rng=gen(0))
    assert len(loader) == 3 and len(ArrayLoader(x, y, 4, drop_last=True)) == 2
    epoch1 = list(loader)
    assert [b[0].shape[0] for b in epoch1] == [4, 4, 2]
    labels1 = torch.cat([b[1] for b in epoch1])
    assert sorted(labels1.tolist()) == list(range(10))
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in epoch1)  # rows stay paired
    labels2 = torch.cat([b[1] for b in loader])
    assert not torch.equal(labels1, labels2)  # a new permutation each epoch
    again = torch.cat([b[1] for b in ArrayLoader(x, y, 4, rng=gen(0))])
    assert torch.equal(labels1, again)  # reproducible from the seed
    plain = list(ArrayLoader(x, y, 4, shuffle=False))
    assert plain[1][1].tolist() == [4, 5, 6, 7] and plain[1][0].data_ptr() == x[4].data_ptr()  # views
    only_x = list(ArrayLoader(x, None, 5, shuffle=False))
    assert len(only_x) == 2 and torch.equal(only_x[0], x[:5])
    assert len(list(ArrayLoader(x, y, 4, drop_last=True))) == 2


def test_array_loader_bad_inputs():
    with pytest.raises(ValueError, match=r"same number of samples .* x of shape \(10, 2\) and y of shape \(9,\)"):
        ArrayLoader(torch.zeros(10, 2), torch.zeros(9), 4)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        ArrayLoader(torch.zeros(10, 2), torch.zeros(10), 0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor or numpy array, got list"):
        ArrayLoader([1, 2], None, 1)
    with pytest.raises(TypeError, match="rng must be a torch.Generator, got int"):
        ArrayLoader(torch.zeros(3), None, 1, rng=0)
    loader = ArrayLoader(np.arange(6.0), np.arange(6), 4, shuffle=False)  # numpy is accepted
    assert torch.is_tensor(next(iter(loader))[0]) and math.isclose(float(next(iter(loader))[0][3]), 3.0)
