"""One contiguous vector for a whole parameter tree (the ComponentArray idea).

``flatten(ps)`` returns ``(vector, unflatten)``. ``unflatten(v)`` rebuilds the
tree from any vector of the same length as *views* into ``v`` — no copy, and
autograd flows from the views back into ``v``. Optimizers update the vector
with a handful of fused kernels; scipy and gradient-free optimizers see a
single 1-D array; the adjoint's augmented state carries parameters as one
channel.

If the leaves of ``ps`` already are consecutive views of one buffer (as the
trees returned by ``unflatten`` are), ``flatten`` returns that buffer itself,
so the round trip is zero-copy in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .tree import Tree, tree_leaves_with_path, tree_map_with_path

__all__ = ["flatten", "Unflatten"]


@dataclass(frozen=True)
class _LeafSpec:
    path: tuple
    shape: torch.Size
    offset: int
    numel: int


class Unflatten:
    """Callable rebuilding a tree from a flat vector; ``len(self)`` is the vector length."""

    def __init__(self, tree: Tree, specs: list[_LeafSpec], numel: int):
        self._skeleton = _skeleton(tree)
        self._specs = specs
        self.numel = numel

    def __len__(self) -> int:
        return self.numel

    def __call__(self, vector: torch.Tensor) -> Tree:
        if vector.dim() != 1 or vector.numel() != self.numel:
            raise ValueError(
                f"unflatten: expected a 1-D vector of length {self.numel}, got shape {tuple(vector.shape)}")
        leaves = {s.path: vector[s.offset:s.offset + s.numel].view(s.shape) for s in self._specs}
        return _fill(self._skeleton, leaves, ())

    def __repr__(self) -> str:
        return f"Unflatten(numel={self.numel}, leaves={len(self._specs)})"


def flatten(ps: Tree) -> tuple[torch.Tensor, Unflatten]:
    """Flatten a parameter tree into one contiguous 1-D tensor.

    Args:
        ps: nested dicts/lists of tensors, all of one floating dtype and device.

    Returns:
        ``(vector, unflatten)``: ``vector`` holds every leaf in depth-first order;
        ``unflatten(v)`` returns a tree of views into ``v``.

    Raises:
        TypeError: leaves of different dtypes or devices (name both).
    """
    pairs = tree_leaves_with_path(ps)
    specs: list[_LeafSpec] = []
    offset = 0
    for path, leaf in pairs:
        specs.append(_LeafSpec(path, leaf.shape, offset, leaf.numel()))
        offset += leaf.numel()
    unflatten = Unflatten(ps, specs, offset)
    if not pairs:
        return torch.zeros(0), unflatten
    dtype, device = pairs[0][1].dtype, pairs[0][1].device
    for path, leaf in pairs[1:]:
        if leaf.dtype != dtype or leaf.device != device:
            raise TypeError(
                f"flatten: all leaves must share dtype and device; {'.'.join(map(str, pairs[0][0]))!r} is "
                f"{dtype} on {device} but {'.'.join(map(str, path))!r} is {leaf.dtype} on {leaf.device}")
    shared = _shared_buffer(pairs, offset)
    if shared is not None:
        return shared, unflatten
    vector = torch.cat([leaf.reshape(-1) for _, leaf in pairs])
    return vector, unflatten


def _shared_buffer(pairs, total):
    """The buffer the leaves are consecutive views of, or None."""
    first = pairs[0][1]
    if first.requires_grad and first.grad_fn is None:
        # Leaves that are themselves autograd leaves are not views of a vector.
        return None
    try:
        storage_ptr = first.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    expected = first.data_ptr()
    itemsize = first.element_size()
    for _, leaf in pairs:
        if not leaf.is_contiguous() or leaf.data_ptr() != expected:
            return None
        if leaf.untyped_storage().data_ptr() != storage_ptr:
            return None
        expected += leaf.numel() * itemsize
    base = first._base if first._base is not None else None
    if base is None or base.dim() != 1 or base.numel() != total or base.data_ptr() != first.data_ptr():
        return None
    return base


def _skeleton(tree):
    """``tree`` with every tensor leaf replaced by ``None`` (containers, named tuples included, rebuilt)."""
    return tree_map_with_path(lambda path, x: None if isinstance(x, torch.Tensor) else x, tree,
                              where="flatten")


def _fill(skel, leaves, path=()):
    """The skeleton with the leaf at each path of ``leaves`` put back."""
    return tree_map_with_path(lambda p, x: leaves.get(p, x), skel, where="unflatten")


FlatFn = Callable[[torch.Tensor], Any]
