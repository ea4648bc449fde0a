"""Time on the device, its host mirror, and transfers of a few numbers without a host synchronisation.

Time reaches a step as 0-d tensors on the state's device, in the *time
dtype* (float64 unless ``tspan`` is float32), so that a step can be compiled
and ``f`` sees ``t`` at full precision even for a float32 state. The loop
also keeps each time as a host float (for clamping to ``t1``, saving and
messages). Code that needs the host value of a time tensor it was handed —
an adjoint reading a forward dense output at a backward stage time, a
multistep method computing its weights — asks :func:`host_time`, which
looks the tensor up in a host-side table (weak references: an entry dies
with its tensor) and only falls back to a device-to-host copy for a tensor
the table does not know. Nothing is written onto the tensors themselves.

``torch.tensor(values, device="cuda")`` is a blocking copy: it waits for the
device's stream, which would add a synchronisation per step. Scalars are made
with ``torch.full`` (a fill kernel that takes the value as an argument); short
vectors go through pinned memory with a non-blocking copy (PyTorch's caching
host allocator keeps the pinned buffer alive until the copy has run).
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch

__all__ = ["time_scalar", "time_vector", "host_time", "register_host_times", "host_to_device"]


class _HostTimeTable:
    """``id(tensor) -> (weakref, host float)`` for the time tensors the loop and steppers create."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, float]] = {}

    def add(self, tensor: torch.Tensor, value: float) -> None:
        key = id(tensor)
        entries = self._entries
        entries[key] = (weakref.ref(tensor, lambda _, key=key: entries.pop(key, None)), value)

    def get(self, tensor: torch.Tensor) -> float | None:
        entry = self._entries.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1]

    def __len__(self) -> int:
        return len(self._entries)


_HOST_TIMES = _HostTimeTable()


def host_time(t) -> float:
    """The host float of a time: a number, or a 0-d time tensor (from the table, else copied)."""
    if not isinstance(t, torch.Tensor):
        return float(t)
    value = _HOST_TIMES.get(t)
    if value is not None:
        return value
    return float(t.detach())


def register_host_times(tensors: Sequence[torch.Tensor], values: Sequence[float]) -> Sequence[torch.Tensor]:
    """Record each 0-d time tensor's host float in the host-side table; returns the tensors."""
    if not torch.compiler.is_compiling():
        for tensor, value in zip(tensors, values):
            _HOST_TIMES.add(tensor, value)
    return tensors


def time_scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-d time tensor holding ``value`` (no synchronisation), registered in the host table."""
    out = torch.full((), value, dtype=dtype, device=device)
    if not torch.compiler.is_compiling():
        _HOST_TIMES.add(out, value)
    return out


def time_vector(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Sequence[torch.Tensor]:
    """The 0-d time tensors of ``values`` from one transfer, each registered in the host table."""
    return register_host_times(host_to_device(list(values), dtype, device).unbind(0), values)


def host_to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
