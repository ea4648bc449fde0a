"""The 8x8 handwritten digits of scikit-learn, embedded in the package.

``digits.npz`` next to this module holds the 1797 images of
``sklearn.datasets.load_digits()`` (UCI "Optical Recognition of Handwritten
Digits", 8x8 pixels of 0..16, ten classes) as ``uint8``, their labels, and a
fixed stratified train/test split (36 test images per class: 1437 train, 360
test, drawn once with ``numpy.random.RandomState(0)``). Nothing is downloaded
and scikit-learn is not needed at run time.
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np
import torch

__all__ = ["load_digits", "DIGITS_SHAPE", "DIGITS_CLASSES"]

DIGITS_SHAPE = (8, 8)
DIGITS_CLASSES = 10
_SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with resources.files(__package__).joinpath("digits.npz").open("rb") as f:
        with np.load(f, allow_pickle=False) as data:
            images, labels, test_mask = data["images"], data["labels"], data["test_mask"]
    for array in (images, labels, test_mask):
        array.flags.writeable = False  # cached: callers get copies, never this memory
    return images, labels, test_mask


def load_digits(split: str = "train", *, normalize: bool = True, standardize: bool = False,
                flatten: bool = True, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded digits data set as tensors ``(x, y)``.

    Args:
        split: ``"train"`` (1437 images), ``"test"`` (360) or ``"all"`` (1797, in
            scikit-learn's order). The split is fixed and stratified (36 test images per class).
        normalize: scale the pixels from 0..16 to [0, 1] (:math:`x/16`).
        standardize: afterwards, subtract the per-pixel mean and divide by the
            per-pixel standard deviation *of the training split* (pixels that are
            constant on the training split are only centred), so train and test get
            the same transform and no test statistics leak into it.
        flatten: ``x`` of shape ``(n, 64)``; otherwise ``(n, 1, 8, 8)`` (NCHW).
        dtype: dtype of ``x``; must be floating when ``normalize`` or ``standardize``.
            With both off, any dtype (e.g. ``torch.uint8`` for the raw pixels).
        device: where to put the tensors.

    Returns:
        ``x`` of ``dtype`` and ``y`` int64 labels in 0..9, both new tensors.

    Raises:
        ValueError: unknown split; TypeError: a non-floating dtype with scaling on.
    """
    if split not in _SPLITS:
        raise ValueError(f"load_digits: split must be one of {_SPLITS}, got {split!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"load_digits: dtype must be a torch.dtype, got {type(dtype).__name__}")
    if (normalize or standardize) and not dtype.is_floating_point:
        raise TypeError(f"load_digits: dtype {dtype} cannot hold normalized or standardized pixels; pass a "
                        "floating dtype or normalize=False, standardize=False")
    images, labels, test_mask = _raw()
    if split == "train":
        rows = ~test_mask
    elif split == "test":
        rows = test_mask
    else:
        rows = np.ones_like(test_mask)
    pixels = images[rows].reshape(-1, 64)
    if normalize or standardize:
        x = torch.tensor(pixels, dtype=torch.float64)
        if normalize:
            x = x / 16.0
        if standardize:
            train = torch.tensor(images[~test_mask].reshape(-1, 64), dtype=torch.float64)
            if normalize:
                train = train / 16.0
            mean = train.mean(dim=0)
            std = train.std(dim=0)
            x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
        x = x.to(dtype)
    else:
        x = torch.tensor(pixels).to(dtype)
    if not flatten:
        x = x.reshape(-1, 1, *DIGITS_SHAPE)
    y = torch.tensor(labels[rows], dtype=torch.int64)
    return x.to(device), y.to(device)
