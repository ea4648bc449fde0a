"""Checks and formatting shared by the layers of :mod:`pylux.nn`.

All checks compare Python-side metadata (shapes, dtypes, devices, dict keys);
none of them reads tensor values, so none synchronises with the device.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import torch

from ..core import LayerError

Activation = Callable[[torch.Tensor], torch.Tensor] | None


def check_activation(activation: Any, owner: str) -> Activation:
    if activation is not None and not callable(activation):
        raise TypeError(f"{owner}: activation must be a callable such as torch.tanh (or None), "
                        f"got {type(activation).__name__}")
    return activation


def activation_name(activation: Activation) -> str:
    """Short readable name: ``tanh`` for ``torch.tanh``, ``gelu`` for ``F.gelu``."""
    if isinstance(activation, functools.partial):
        args = ", ".join([*(repr(a) for a in activation.args),
                          *(f"{k}={v!r}" for k, v in activation.keywords.items())])
        return f"{activation_name(activation.func)}({args})"
    name = getattr(activation, "__name__", None)
    if name is None:
        return repr(activation)
    return name


def apply_activation(activation: Activation, y: torch.Tensor) -> torch.Tensor:
    return y if activation is None else activation(y)


def check_positive_int(value: Any, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def check_init(init: Any, name: str, owner: str) -> Callable:
    if not callable(init):
        raise TypeError(f"{owner}: {name} must be a callable init(rng, *shape, dtype=...), "
                        f"got {type(init).__name__}")
    return init


def check_tensor(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise LayerError(f"expected a torch.Tensor input, got {type(x).__name__}")
    return x


def check_floating(x: torch.Tensor) -> torch.Tensor:
    if not (x.is_floating_point() or x.is_complex()):
        raise LayerError(f"expected a floating-point input, got dtype {x.dtype}; "
                         "cast it with x.float() or x.double()")
    return x


def check_matches(x: torch.Tensor, param: torch.Tensor, param_name: str) -> None:
    """Raise a LayerError if ``x`` and ``param`` disagree on dtype or device."""
    if x.dtype != param.dtype:
        # parameters are floating point: only a floating input dtype is a sensible setup() dtype
        alternative = (f" or set up the parameters with setup(rng, model, dtype={x.dtype})"
                       if x.is_floating_point() else "")
        raise LayerError(
            f"input dtype {x.dtype} does not match parameter {param_name!r} dtype {param.dtype}; "
            f"cast the input with x.to({param.dtype}){alternative}")
    if x.device != param.device:
        raise LayerError(
            f"input is on device {x.device} but parameter {param_name!r} is on {param.device}; "
            f"move one of them, e.g. x.to({str(param.device)!r})")


def check_keys(tree: Any, expected: Iterable[str], kind: str) -> None:
    """Raise a LayerError naming the first missing or extra key of a layer's ps/st dict."""
    if not isinstance(tree, Mapping):
        raise LayerError(f"{kind} tree must be a dict, got {type(tree).__name__}")
    expected = list(expected)
    if tree.keys() == set(expected):
        return
    for key in expected:
        if key not in tree:
            raise LayerError(f"{kind} tree is missing key {key!r} (expected keys {expected})")
    for key in tree:
        if key not in expected:
            raise LayerError(f"{kind} tree has unexpected extra key {key!r} (expected keys {expected})")


def check_param_shape(param: Any, expected: tuple[int, ...], name: str) -> torch.Tensor:
    if not isinstance(param, torch.Tensor):
        raise LayerError(f"parameter {name!r} must be a tensor, got {type(param).__name__}")
    if tuple(param.shape) != tuple(expected):
        raise LayerError(f"parameter {name!r} has shape {tuple(param.shape)}, expected {tuple(expected)}")
    return param


def check_training_flag(st: Mapping) -> bool:
    training = st["training"]
    if not isinstance(training, bool):
        raise LayerError(f"state 'training' must be a Python bool, got {type(training).__name__}; "
                         "use pylux.trainmode(st) / pylux.testmode(st) to set it")
    return training


def as_pair(value: Any, name: str, owner: str, *, minimum: int = 1) -> tuple[int, int]:
    """``k`` → ``(k, k)``; ``(a, b)`` kept; each must be an int ``>= minimum``."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair)):
        raise ValueError(f"{owner}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def format_options(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """``", stride=(2, 2)"`` for options that differ from their default."""
    parts = [f"{k}={v!r}" for k, v in options.items() if v != defaults[k]]
    return "".join(", " + p for p in parts)
