"""Host-to-device transfers of a few numbers without a host synchronisation.

``torch.tensor(values, device="cuda")`` is a blocking copy: it waits for the
device's stream, which would add a synchronisation per step. Scalars are made
with ``torch.full`` (a fill kernel that takes the value as an argument); short
vectors go through pinned memory with a non-blocking copy (PyTorch's caching
host allocator keeps the pinned buffer alive until the copy has run).
"""

from __future__ import annotations

from typing import Sequence

import torch


def scalar_like(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d time tensor holding ``value`` with ``like``'s dtype and device.

    It carries the host float as ``t.host_value`` (see :func:`with_host_values`).
    """
    out = torch.full((), value, dtype=like.dtype, device=like.device)
    out.host_value = value
    return out


def with_host_values(times: Sequence[torch.Tensor], values: Sequence[float]) -> Sequence[torch.Tensor]:
    """Attach each time tensor's host float as ``t.host_value`` and return the tensors.

    A vector field that looks something up by time — an adjoint reading the
    forward dense output at the stage times of its backward solve — then needs
    no device-to-host copy (a synchronisation on CUDA) per evaluation.
    """
    for t, value in zip(times, values):
        t.host_value = value
    return times


def vector_like(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor of host floats with ``like``'s dtype and device."""
    return host_to_device(values, like.dtype, like.device)


def host_to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
