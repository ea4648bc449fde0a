"""pylux.interop: DLPack exchange with numpy (shared memory), to_device, DeviceLoader."""

import collections

import numpy as np
import pytest
import torch

import pylux as lx
from pylux.interop import DeviceLoader, from_torch, to_device, to_numpy, to_torch


class DLPackOnly:
    """A foreign array that offers nothing but the DLPack protocol (as JAX or CuPy arrays do)."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_to_torch_shares_memory_with_numpy_both_ways():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = to_torch(a)
    assert t.dtype == torch.float32 and t.shape == (2, 3) and t.data_ptr() == a.ctypes.data
    t[0, 1] = 42.0  # write through torch, read through numpy
    assert a[0, 1] == 42.0
    a[1, 2] = -7.0  # and the other way
    assert float(t[1, 2]) == -7.0
    strided = a[:, ::2]
    ts = to_torch(strided)
    assert ts.stride() == (3, 2) and ts.tolist() == strided.tolist()
    ts[1, 1] = 5.0
    assert a[1, 2] == 5.0
    assert to_torch(t) is t
    scalar = to_torch(np.float64(2.5))
    assert scalar.dim() == 0 and scalar.dtype == torch.float64 and float(scalar) == 2.5


def test_to_torch_from_a_dlpack_producer_shares_memory():
    a = np.arange(4, dtype=np.int64)
    t = to_torch(DLPackOnly(a))
    t[2] = 100
    assert a[2] == 100 and t.dtype == torch.int64


def test_to_torch_read_only_array_falls_back_to_from_numpy():
    a = np.arange(3.0)
    a.flags.writeable = False
    with pytest.warns(UserWarning, match="not writable"):
        t = to_torch(a)
    assert t.data_ptr() == a.ctypes.data and t.tolist() == [0.0, 1.0, 2.0]


def test_to_torch_falls_back_to_from_numpy_when_dlpack_export_fails(monkeypatch):
    def refuse(_):
        raise BufferError("export refused")

    monkeypatch.setattr(torch, "from_dlpack", refuse)
    a = np.arange(3.0)
    t = to_torch(a)
    t[0] = 5.0
    assert a[0] == 5.0


def test_to_torch_refuses_what_it_cannot_share():
    with pytest.raises(ValueError, match=r"negative strides \(-8,\) .* np.ascontiguousarray"):
        to_torch(np.arange(4.0)[::-1])  # torch.from_dlpack would abort the process here
    with pytest.raises(ValueError, match="non-native byte order"):
        to_torch(np.arange(3.0).astype(">f8"))
    with pytest.raises(TypeError, match="numpy arrays of dtype <U1 have no torch equivalent"):
        to_torch(np.array(["a"]))
    with pytest.raises(TypeError, match="cannot share memory with a builtins.list.*torch.as_tensor"):
        to_torch([1.0, 2.0])
    with pytest.raises(TypeError, match="builtins.dict"):
        to_torch({"x": 1})


def test_to_numpy_and_from_torch():
    t = torch.arange(4.0)
    n = to_numpy(t)
    n[0] = 9.0
    assert float(t[0]) == 9.0
    w = torch.ones(2, requires_grad=True)
    assert to_numpy(w).tolist() == [1.0, 1.0]
    z = torch.tensor([1 + 2j]).conj()
    assert to_numpy(z).tolist() == [1 - 2j]
    assert to_numpy(n) is n
    with pytest.raises(TypeError, match="numpy has no torch.bfloat16; convert first"):
        to_numpy(torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="got builtins.str"):
        to_numpy("abc")
    back = from_torch(t)
    back[1] = -1.0
    assert isinstance(back, np.ndarray) and float(t[1]) == -1.0
    assert from_torch(t, like=np.zeros(1)).tolist() == t.tolist()
    via_module = from_torch(t, like=np)
    assert via_module.ctypes.data == t.data_ptr()
    assert from_torch(t, like=torch) is t
    from_dlpack_module = DLPackModule()
    out = from_torch(t, like=from_dlpack_module)
    assert isinstance(out, np.ndarray) and out.ctypes.data == t.data_ptr()
    with pytest.raises(TypeError, match="cannot find a from_dlpack for like=builtins.object"):
        from_torch(t, like=object())
    with pytest.raises(TypeError, match="expected a torch.Tensor, got ndarray"):
        from_torch(n)


class DLPackModule:
    """An object with an array namespace, as JAX and CuPy arrays have."""

    def __array_namespace__(self):
        return np


Pair = collections.namedtuple("Pair", ["inputs", "targets"])


def test_to_device_on_cpu_keeps_structure_and_casts_floats_only():
    x = torch.randn(3, 2)
    batch = {"pair": Pair(x, torch.arange(3)), "extra": [np.ones(2, dtype=np.float32), 7, "id", None]}
    moved = to_device(batch, "cpu")
    assert moved["pair"].inputs is x  # already there: no copy
    assert isinstance(moved["pair"], Pair) and moved["extra"][1:] == [7, "id", None]
    assert torch.is_tensor(moved["extra"][0])
    cast = to_device(batch, torch.device("cpu"), dtype=torch.float64)
    assert cast["pair"].inputs.dtype == torch.float64 and cast["pair"].targets.dtype == torch.int64
    assert torch.equal(cast["pair"].inputs, x.double())
    ordered = to_device(collections.OrderedDict(a=x), "cpu")
    assert isinstance(ordered, collections.OrderedDict)


def test_to_device_bad_inputs():
    with pytest.raises(TypeError, match=r"cannot move batch\['x'\]\[1\] of type builtins.set"):
        to_device({"x": [torch.zeros(1), {1, 2}]}, "cpu")
    with pytest.raises(ValueError, match="'gpu0' is not a device"):
        to_device(torch.zeros(1), "gpu0")
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype or None"):
        to_device(torch.zeros(1), "cpu", dtype=torch.int32)
    with pytest.raises(TypeError, match="loader must be an iterable of batches, got int"):
        DeviceLoader(3, "cpu")


def test_device_loader_on_cpu_feeds_fit():
    from pylux.data import ArrayLoader
    from pylux.training import SGD, TrainState, fit

    x = torch.linspace(-1, 1, 16)[:, None]
    y = 3.0 * x
    loader = DeviceLoader(ArrayLoader(x, y, 4, shuffle=False), "cpu", dtype=torch.float64)
    assert len(loader) == 4
    batches = list(loader)
    assert batches[0][0].dtype == torch.float64 and torch.equal(batches[0][0], x[:4].double())

    class Scale(lx.AbstractLayer):
        def init_params(self, rng):
            return {"w": torch.zeros(1)}

        def forward(self, x, ps, st):
            return x * ps["w"], st

    model = Scale()
    ps, st = lx.setup(torch.Generator().manual_seed(0), model, dtype=torch.float64)

    def mse(model, ps, st, batch):
        pred, st = model(batch[0], ps, st)
        return ((pred - batch[1]) ** 2).mean(), st, {}

    ts, history = fit(mse, TrainState(model, ps, st, SGD(0.5)), loader, epochs=20, progress=False)
    assert len(history) == 80 and float(ts.ps["w"]) == pytest.approx(3.0, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_loader_prefetches_to_cuda():
    x = torch.arange(64.0).reshape(16, 4).pin_memory()
    loader = DeviceLoader([(x[i:i + 4], torch.arange(i, i + 4)) for i in range(0, 16, 4)], "cuda")
    out = [(xb.cpu(), yb.cpu()) for xb, yb in loader]
    assert all(xb.device.type == "cpu" for xb, _ in out)
    assert torch.equal(torch.cat([xb for xb, _ in out]), x)
    assert torch.equal(torch.cat([yb for _, yb in out]), torch.arange(16))
