"""Zero-copy exchange of arrays between torch and other array libraries via DLPack.

DLPack (https://dmlc.github.io/dlpack/) lets two libraries share one buffer:
numpy, JAX, CuPy and torch all export ``__dlpack__`` and import with
``from_dlpack``. The converted array and the original are the *same memory*:
writing through one is visible through the other.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import torch

__all__ = ["to_torch", "to_numpy", "from_torch"]


def _check_numpy_shareable(array: np.ndarray) -> None:
    if array.dtype.kind not in "biufc":
        raise TypeError(f"to_torch: numpy arrays of dtype {array.dtype} have no torch equivalent; convert them to a "
                        "numeric dtype first")
    if not array.dtype.isnative:
        raise ValueError(f"to_torch: the numpy array has non-native byte order ({array.dtype.str}); torch cannot share "
                         "it. Convert it with array.astype(array.dtype.newbyteorder('=')) (a copy)")
    if any(stride < 0 for stride in array.strides):
        # torch has no negative strides; handing such an array to torch.from_dlpack aborts the process.
        raise ValueError(f"to_torch: the numpy array has negative strides {array.strides} (a reversed view such as "
                         "a[::-1]); torch cannot share it. Pass np.ascontiguousarray(array) (a copy)")


def to_torch(x: Any) -> torch.Tensor:
    """A torch tensor sharing memory with ``x``.

    * ``torch.Tensor``: returned unchanged.
    * numpy arrays: ``torch.from_dlpack``; writes through either side are seen by
      the other. Arrays that cannot go through DLPack fall back to
      ``torch.from_numpy``, which shares the memory just the same: numpy older
      than 1.22 (no ``__dlpack__``), an export the installed numpy refuses, and
      *read-only* arrays (``a.flags.writeable`` false, e.g. read-only memory maps).
      For the latter torch warns, because it has no read-only tensors: writing to
      such a tensor is undefined behaviour — copy it (``torch.tensor(a)``) if you
      mean to modify it. Arrays torch cannot view
      (negative strides, non-native byte order, non-numeric dtypes) raise rather
      than being copied silently. numpy scalars become 0-d tensors (a copy: they
      are immutable).
    * anything with ``__dlpack__`` (JAX, CuPy, ...): ``torch.from_dlpack``, on the
      producer's device; the producer's stream is synchronised by the protocol.

    Raises:
        TypeError: ``x`` is none of the above (the message names its type), or a
            numpy dtype without a torch equivalent.
        ValueError: a numpy layout torch cannot share (see above).
    """
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.generic):
        _check_numpy_shareable(np.asarray(x))
        return torch.as_tensor(np.asarray(x))
    if isinstance(x, np.ndarray):
        _check_numpy_shareable(x)
        if x.flags.writeable and hasattr(x, "__dlpack__"):
            try:
                return torch.from_dlpack(x)
            except (BufferError, RuntimeError, TypeError):
                pass  # an export this numpy cannot make: from_numpy below shares the memory all the same
        return torch.from_numpy(x)
    if hasattr(x, "__dlpack__"):
        strides = getattr(x, "strides", None)
        if isinstance(strides, tuple) and any(isinstance(s, int) and s < 0 for s in strides):
            raise ValueError(f"to_torch: the {type(x).__name__} has negative strides {strides}; torch cannot share "
                             "it. Make it contiguous first (a copy)")
        return torch.from_dlpack(x)
    raise TypeError(
        f"to_torch: cannot share memory with a {type(x).__module__}.{type(x).__qualname__}; expected a torch tensor, "
        "a numpy array or an object implementing __dlpack__ (JAX, CuPy, ...). Python lists and numbers have no "
        "buffer to share: use torch.as_tensor for them.")


def to_numpy(t: Any) -> np.ndarray:
    """A numpy array for the tensor ``t``, sharing memory when ``t`` is on the CPU.

    The tensor is detached first (autograd history is not part of the data).
    A CUDA tensor is *copied* to the host (numpy has no device memory). A tensor
    with a pending conjugate or negative bit is resolved (a copy). numpy arrays
    are returned unchanged; other ``__dlpack__`` producers go through
    ``numpy.from_dlpack``.

    Raises:
        TypeError: an unsupported input (named), or a dtype numpy lacks (bfloat16, float8...).
    """
    if isinstance(t, np.ndarray):
        return t
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.dtype in (torch.bfloat16,) or t.dtype.itemsize == 1 and t.is_floating_point():
            raise TypeError(f"to_numpy: numpy has no {t.dtype}; convert first, e.g. t.float()")
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.resolve_conj().resolve_neg()
        return t.numpy()
    if hasattr(t, "__dlpack__"):
        return np.from_dlpack(t)
    raise TypeError(f"to_numpy: expected a torch tensor, a numpy array or a __dlpack__ producer, got "
                    f"{type(t).__module__}.{type(t).__qualname__}")


def from_torch(t: torch.Tensor, like: Any = np) -> Any:
    """Convert a torch tensor to the array library of ``like``, sharing memory where possible.

    Args:
        t: the tensor (detached first).
        like: an array of the target library (a numpy, JAX or CuPy array: its
            ``__array_namespace__().from_dlpack`` is used), or the library's module
            itself (``numpy``, ``cupy``, ``jax.numpy``: its ``from_dlpack``), or a torch
            tensor / ``torch`` (returns ``t``). Default: numpy (via :func:`to_numpy`).

    Raises:
        TypeError: ``t`` is not a tensor, or ``like`` names no library with ``from_dlpack``.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"from_torch: expected a torch.Tensor, got {type(t).__name__}")
    if like is torch or isinstance(like, torch.Tensor):
        return t
    if like is np or isinstance(like, (np.ndarray, np.generic)):
        return to_numpy(t)
    t = t.detach()
    if isinstance(like, types.ModuleType):
        namespace = like
    elif hasattr(like, "__array_namespace__"):
        namespace = like.__array_namespace__()
    else:
        namespace = None
    if namespace is None or not hasattr(namespace, "from_dlpack"):
        raise TypeError(f"from_torch: cannot find a from_dlpack for like={type(like).__module__}."
                        f"{type(like).__qualname__}; pass an array of the target library or its module")
    return namespace.from_dlpack(t)
