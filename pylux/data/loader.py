"""A minibatch iterator over tensors that live in memory (or on the GPU).

``torch.utils.data.DataLoader`` over a ``TensorDataset`` fetches every sample
with a Python call and collates them again; for data that already sits in one
tensor that per-sample work dominates small models. :class:`ArrayLoader` draws
one permutation per epoch and takes each batch with a single ``index_select``.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["ArrayLoader"]


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.as_tensor(value)
    raise TypeError(f"ArrayLoader: {name} must be a torch.Tensor or numpy array, got {type(value).__name__}")


class ArrayLoader:
    """Minibatches ``(x[idx], y[idx])`` of in-memory tensors.

    Args:
        x: inputs, first dimension indexes samples.
        y: targets with the same first dimension, or ``None`` to yield ``x`` batches alone.
        batch_size: samples per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: draw a new permutation every epoch (from ``rng``); otherwise batches are
            consecutive slices (views, no copy).
        rng: CPU ``torch.Generator`` for the permutations. ``None`` means a generator
            seeded with 0, so that runs are reproducible unless asked otherwise; the
            generator advances, so successive epochs differ.
        drop_last: skip the final incomplete batch.

    Batches stay on the device of ``x``/``y`` (put them on the GPU once and every
    batch is taken there without host transfers). ``len(loader)`` is the number
    of batches per epoch.

    Raises:
        TypeError: ``x``/``y`` are not tensors or arrays, or ``rng`` is not a generator.
        ValueError: ``x`` and ``y`` differ in their first dimension; a bad ``batch_size``.
    """

    def __init__(self, x: Any, y: Any, batch_size: int, shuffle: bool = True,
                 rng: torch.Generator | None = None, drop_last: bool = False):
        self.x = _as_tensor("x", x)
        self.y = None if y is None else _as_tensor("y", y)
        if self.x.dim() == 0:
            raise ValueError("ArrayLoader: x must have a first (sample) dimension, got a 0-d tensor")
        if self.y is not None and (self.y.dim() == 0 or self.y.shape[0] != self.x.shape[0]):
            raise ValueError(f"ArrayLoader: x and y must have the same number of samples (first dimension); got "
                             f"x of shape {tuple(self.x.shape)} and y of shape {tuple(self.y.shape)}")
        if self.y is not None and self.y.device != self.x.device:
            raise ValueError(f"ArrayLoader: x is on {self.x.device} but y on {self.y.device}; put them on one device")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size <= 0:
            raise ValueError(f"ArrayLoader: batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(shuffle, bool) or not isinstance(drop_last, bool):
            raise ValueError(f"ArrayLoader: shuffle and drop_last must be bools, got {shuffle!r}, {drop_last!r}")
        if rng is None:
            rng = torch.Generator().manual_seed(0)
        elif not isinstance(rng, torch.Generator):
            raise TypeError(f"ArrayLoader: rng must be a torch.Generator, got {type(rng).__name__}")
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.rng = rng
        self.drop_last = drop_last
        self.num_samples = self.x.shape[0]

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        bs = self.batch_size
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=self.rng, device=self.rng.device)
            order = order.to(self.x.device)
        for i in range(len(self)):
            if self.shuffle:
                index = order[i * bs:(i + 1) * bs]
                xb = self.x.index_select(0, index)
                yb = None if self.y is None else self.y.index_select(0, index)
            else:
                xb = self.x[i * bs:(i + 1) * bs]
                yb = None if self.y is None else self.y[i * bs:(i + 1) * bs]
            yield xb if yb is None else (xb, yb)

    def __repr__(self) -> str:
        return (f"ArrayLoader(samples={self.num_samples}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"drop_last={self.drop_last}, batches={len(self)})")
