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
    """A 0-d tensor holding ``value`` with ``like``'s dtype and device."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


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
