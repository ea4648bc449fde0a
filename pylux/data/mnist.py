"""MNIST from local IDX files (nothing is downloaded).

The IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero
bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64), the number of dimensions, one big-endian uint32
per dimension, then the data, big-endian, row-major. Files may be gzipped.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch

__all__ = ["read_idx", "load_mnist", "MNIST_FILES"]

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""The standard MNIST file names per split (each may also end in ``.gz``)."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array of native byte order.

    Raises:
        ValueError: a malformed header, an unknown type code, or a data length that
            does not match the header (the message names the file).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"read_idx: {path!r} is not an IDX file (it must start with two zero bytes)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_TYPES:
        raise ValueError(f"read_idx: {path!r} has unknown IDX type code 0x{type_code:02X}; known codes are "
                         + ", ".join(f"0x{c:02X}" for c in _IDX_TYPES))
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"read_idx: {path!r} is truncated inside its header ({ndim} dimensions announced)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"read_idx: {path!r} announces shape {shape} ({expected} bytes of data) but holds "
                         f"{len(raw) - header} bytes; the file is truncated or corrupt")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find(directory: str, name: str) -> str | None:
    """The path of ``name`` (or its ``.gz``, or the ``name.idx`` spelling) in ``directory`` or MNIST/raw."""
    variants = [name, name + ".gz"]
    dotted = name.replace("-idx", ".idx")
    variants += [dotted, dotted + ".gz"]
    for folder in (directory, os.path.join(directory, "MNIST", "raw")):
        for variant in variants:
            candidate = os.path.join(folder, variant)
            if os.path.isfile(candidate):
                return candidate
    return None


def load_mnist(directory: str | os.PathLike, split: str = "train", *, normalize: bool = True,
               flatten: bool = True, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST (or any data set in MNIST's IDX layout, e.g. Fashion-MNIST) from a local directory.

    Looks for the files of :data:`MNIST_FILES` (optionally ``.gz``, or spelt
    ``train-images.idx3-ubyte``) in ``directory`` and in ``directory/MNIST/raw``
    (torchvision's layout).

    Args:
        directory: the folder holding the files.
        split: ``"train"`` or ``"test"``.
        normalize: scale pixels from 0..255 to [0, 1].
        flatten: ``x`` of shape ``(n, 784)``; otherwise ``(n, 1, 28, 28)``.
        dtype: dtype of ``x`` (floating when ``normalize``).
        device: where to put the tensors.

    Returns:
        ``x`` and int64 labels ``y``.

    Raises:
        FileNotFoundError: a file is missing (names the expected files and where it looked).
        ValueError: unknown split, malformed files, or image and label counts that differ.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"load_mnist: split must be 'train' or 'test', got {split!r}")
    if (normalize and not isinstance(dtype, torch.dtype)) or (normalize and not dtype.is_floating_point):
        raise TypeError(f"load_mnist: normalize=True needs a floating dtype, got {dtype!r}")
    directory = os.fspath(directory)
    image_name, label_name = MNIST_FILES[split]
    paths = [_find(directory, name) for name in (image_name, label_name)]
    missing = [name for name, path in zip((image_name, label_name), paths) if path is None]
    if missing:
        raise FileNotFoundError(
            f"load_mnist: {', '.join(missing)} (or the same name with .gz) not found in {directory!r} or in "
            f"{os.path.join(directory, 'MNIST', 'raw')!r}. The {split} split needs {image_name} and {label_name}; "
            "pylux never downloads data: put the files from the MNIST distribution there.")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"load_mnist: expected images of shape (n, rows, cols) and labels of shape (n,), got "
                         f"{images.shape} in {paths[0]!r} and {labels.shape} in {paths[1]!r}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"load_mnist: {images.shape[0]} images in {paths[0]!r} but {labels.shape[0]} labels in "
                         f"{paths[1]!r}")
    x = torch.from_numpy(images)
    x = x.to(dtype) / 255.0 if normalize else x.to(dtype)
    x = x.reshape(x.shape[0], -1) if flatten else x.reshape(x.shape[0], 1, *x.shape[1:])
    y = torch.from_numpy(labels.astype(np.int64))
    return x.to(device), y.to(device)
