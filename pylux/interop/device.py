"""Moving batches from torch data loaders to a device.

On CUDA, a host-to-device copy can overlap with computation only when the
source is in pinned (page-locked) host memory and the copy is issued with
``non_blocking=True``: create the ``DataLoader`` with ``pin_memory=True``.
:class:`DeviceLoader` goes one step further and issues the copy of the *next*
batch on a side stream while the current batch is being used.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .dlpack import to_torch

__all__ = ["to_device", "DeviceLoader"]

_PASS_THROUGH = (bool, int, float, complex, str, bytes, type(None))


def _device(device: Any, where: str) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{where}: {device!r} is not a device ({e}); use e.g. 'cpu', 'cuda' or 'cuda:0'") from None


def _move(batch: Any, device: torch.device, non_blocking: bool, dtype: torch.dtype | None, path: str) -> Any:
    if isinstance(batch, torch.Tensor):
        target_dtype = dtype if dtype is not None and batch.is_floating_point() else batch.dtype
        # A device-to-host copy issued non_blocking may still be in flight when the host reads it.
        blocking_ok = non_blocking and device.type != "cpu"
        return batch.to(device=device, dtype=target_dtype, non_blocking=blocking_ok)
    if isinstance(batch, np.ndarray):
        return _move(to_torch(batch), device, non_blocking, dtype, path)
    if isinstance(batch, dict):
        moved = {k: _move(v, device, non_blocking, dtype, f"{path}[{k!r}]") for k, v in batch.items()}
        if type(batch) is dict:
            return moved
        try:
            return type(batch)(moved)
        except TypeError:  # dict subclasses whose constructor takes other arguments (defaultdict)
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_move(v, device, non_blocking, dtype, f"{path}.{name}")
                             for name, v in zip(batch._fields, batch)))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device, non_blocking, dtype, f"{path}[{i}]") for i, v in enumerate(batch))
    if isinstance(batch, _PASS_THROUGH):
        return batch
    raise TypeError(f"to_device: cannot move {path} of type {type(batch).__module__}.{type(batch).__qualname__}; "
                    "a batch may hold tensors, numpy arrays, numbers, strings, None, and dicts, lists, tuples "
                    "and namedtuples of them")


def to_device(batch: Any, device: torch.device | str, non_blocking: bool = True,
              dtype: torch.dtype | None = None) -> Any:
    """Move every tensor of a (nested) batch to ``device``.

    Args:
        batch: a tensor, numpy array, or dicts / lists / tuples / namedtuples of them
            (what ``torch.utils.data.DataLoader`` yields). Numbers, strings and ``None``
            pass through; numpy arrays are shared with :func:`to_torch` and then moved.
        device: the target device.
        non_blocking: issue host-to-device copies asynchronously; effective when the
            source is pinned memory (``DataLoader(..., pin_memory=True)``). Copies *to*
            the CPU are always blocking, so that the host never reads an unfinished copy.
        dtype: cast floating tensors to this dtype (integer labels are kept).

    Returns:
        A batch of the same structure. Tensors already on ``device`` (and of the
        right dtype) are returned as they are, without a copy.

    Raises:
        TypeError: a leaf of an unsupported type, named with its position in the batch.
        ValueError: ``device`` is not a device.
    """
    target = _device(device, "to_device")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"to_device: dtype must be a floating torch.dtype or None, got {dtype!r}")
    return _move(batch, target, bool(non_blocking), dtype, "batch")


def _record_stream(batch: Any, stream: Any) -> None:
    if isinstance(batch, torch.Tensor):
        batch.record_stream(stream)
    elif isinstance(batch, dict):
        for value in batch.values():
            _record_stream(value, stream)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            _record_stream(value, stream)


class DeviceLoader:
    """Wrap a data loader so that its batches arrive on ``device``.

    On CUDA the copy of batch ``k+1`` is issued on a side stream while batch ``k``
    is in use: the consumer's stream waits for the copy (``wait_stream``) before
    the batch is handed out, and each tensor is marked as used by the consumer's
    stream (``record_stream``) so that the caching allocator does not recycle it
    early. For the copy to overlap with computation the source batches must be in
    pinned memory (``DataLoader(..., pin_memory=True)``). On the CPU (or any other
    device) the batches are simply moved with :func:`to_device`.

    Args:
        loader: any re-iterable of batches (``DataLoader``, :class:`pylux.data.ArrayLoader`, a list).
        device: the target device.
        non_blocking, dtype: as in :func:`to_device`.

    ``len(device_loader)`` is ``len(loader)`` when the loader has a length.
    """

    def __init__(self, loader: Iterable, device: torch.device | str, *, non_blocking: bool = True,
                 dtype: torch.dtype | None = None):
        if not hasattr(loader, "__iter__"):
            raise TypeError(f"DeviceLoader: loader must be an iterable of batches, got {type(loader).__name__}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"DeviceLoader: dtype must be a floating torch.dtype or None, got {dtype!r}")
        self.loader = loader
        self.device = _device(device, "DeviceLoader")
        self.non_blocking = bool(non_blocking)
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        if self.device.type == "cuda" and torch.cuda.is_available():
            yield from self._prefetching_iter()
        else:
            for batch in self.loader:
                yield to_device(batch, self.device, self.non_blocking, self.dtype)

    def _prefetching_iter(self) -> Iterator[Any]:
        side = torch.cuda.Stream(device=self.device)
        batches = iter(self.loader)

        def prefetch() -> Any:
            try:
                host_batch = next(batches)
            except StopIteration:
                return _END
            # Batches that already live on the GPU may have been produced on the consumer's stream.
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                return to_device(host_batch, self.device, True, self.dtype)

        upcoming = prefetch()
        while upcoming is not _END:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_stream(side)
            _record_stream(upcoming, consumer)
            current, upcoming = upcoming, prefetch()
            yield current

    def __repr__(self) -> str:
        return f"DeviceLoader({self.loader!r}, device={str(self.device)!r})"


_END = object()
