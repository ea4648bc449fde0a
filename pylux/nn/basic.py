"""Basic layers: Dense, Scale, WrappedFunction, NoOpLayer, Flatten, Reshape.

Feature dimensions are the *trailing* ones and the batch leads (the PyTorch
convention), where Lux.jl puts features first and the batch last; the
parameters have the same names and the transposed PyTorch layout.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from ..core import AbstractLayer, LayerError
from ._common import (
    Activation,
    activation_name,
    apply_activation,
    check_activation,
    check_init,
    check_keys,
    check_matches,
    check_param_shape,
    check_positive_int,
    check_tensor,
)
from .init import glorot_uniform, ones, zeros

__all__ = ["Dense", "Scale", "WrappedFunction", "NoOpLayer", "Flatten", "Reshape"]


class Dense(AbstractLayer):
    r"""Fully connected layer :math:`y = \sigma(x W^\top + b)` over the last dimension of ``x``.

    Args:
        in_dims: size of the last dimension of the input.
        out_dims: size of the last dimension of the output.
        activation: elementwise callable :math:`\sigma` (``torch.tanh``,
            ``torch.relu``, ``F.gelu``, ...) or ``None`` for the identity.
        use_bias: whether to add :math:`b`.
        init_weight: ``init(rng, out_dims, in_dims, dtype=...)``; Glorot uniform
            by default (Glorot & Bengio 2010).
        init_bias: ``init(rng, out_dims, dtype=...)``; zeros by default.

    Parameters ``ps``:
        ``weight``: ``(out_dims, in_dims)``; ``bias``: ``(out_dims,)`` when ``use_bias``.

    State ``st``: ``{}``.

    Input ``(..., in_dims)`` with any number of leading batch dimensions;
    output ``(..., out_dims)``. Computed by one fused ``F.linear`` (``addmm``
    for 2-D input).

    Raises:
        LayerError: the input's last dimension is not ``in_dims``, or its dtype
            or device differs from the weight's (both are named).
    """

    def __init__(self, in_dims: int, out_dims: int, activation: Activation = None, *,
                 use_bias: bool = True, init_weight: Callable = glorot_uniform,
                 init_bias: Callable = zeros):
        self.in_dims = check_positive_int(in_dims, "in_dims", "Dense")
        self.out_dims = check_positive_int(out_dims, "out_dims", "Dense")
        self.activation = check_activation(activation, "Dense")
        self.use_bias = bool(use_bias)
        self.init_weight = check_init(init_weight, "init_weight", "Dense")
        self.init_bias = check_init(init_bias, "init_bias", "Dense")
        self._keys = ("weight", "bias") if self.use_bias else ("weight",)

    def init_params(self, rng: torch.Generator) -> dict:
        ps = {"weight": self.init_weight(rng, self.out_dims, self.in_dims)}
        if self.use_bias:
            ps["bias"] = self.init_bias(rng, self.out_dims)
        return ps

    def parameter_count(self) -> int:
        return self.out_dims * self.in_dims + (self.out_dims if self.use_bias else 0)

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[torch.Tensor, Mapping]:
        x = check_tensor(x)
        if x.dim() == 0 or x.shape[-1] != self.in_dims:
            raise LayerError(
                f"expected input with last dimension {self.in_dims}, got {x.shape[-1] if x.dim() else 'a scalar'} "
                f"(input shape {tuple(x.shape)}, expected (..., {self.in_dims}))")
        check_keys(ps, self._keys, "parameter")
        weight = check_param_shape(ps["weight"], (self.out_dims, self.in_dims), "weight")
        check_matches(x, weight, "weight")
        bias = check_param_shape(ps["bias"], (self.out_dims,), "bias") if self.use_bias else None
        return apply_activation(self.activation, F.linear(x, weight, bias)), st

    def __repr__(self) -> str:
        act = f", {activation_name(self.activation)}" if self.activation is not None else ""
        bias = "" if self.use_bias else ", use_bias=False"
        return f"Dense({self.in_dims} => {self.out_dims}{act}{bias})"


def _as_dims(dims: Any, owner: str) -> tuple[int, ...]:
    dims = (dims,) if isinstance(dims, int) and not isinstance(dims, bool) else dims
    if not isinstance(dims, (tuple, list, torch.Size)) or len(dims) == 0:
        raise ValueError(f"{owner}: dims must be a positive int or a non-empty tuple of them, got {dims!r}")
    return tuple(check_positive_int(d, "each entry of dims", owner) for d in dims)


class Scale(AbstractLayer):
    r"""Elementwise affine map :math:`y = \sigma(w \odot x + b)`.

    Args:
        dims: shape of the trailing dimensions of ``x`` (an int or a tuple);
            ``w`` and ``b`` have this shape and broadcast over leading batch
            dimensions.
        activation: elementwise callable or ``None``.
        use_bias: whether to add :math:`b`.
        init_weight: ones by default; init_bias: zeros by default.

    Parameters ``ps``: ``weight`` ``dims``; ``bias`` ``dims`` when ``use_bias``.
    State ``st``: ``{}``.
    """

    def __init__(self, dims: int | tuple[int, ...], activation: Activation = None, *,
                 use_bias: bool = True, init_weight: Callable = ones, init_bias: Callable = zeros):
        self.dims = _as_dims(dims, "Scale")
        self.activation = check_activation(activation, "Scale")
        self.use_bias = bool(use_bias)
        self.init_weight = check_init(init_weight, "init_weight", "Scale")
        self.init_bias = check_init(init_bias, "init_bias", "Scale")
        self._keys = ("weight", "bias") if self.use_bias else ("weight",)

    def init_params(self, rng: torch.Generator) -> dict:
        ps = {"weight": self.init_weight(rng, *self.dims)}
        if self.use_bias:
            ps["bias"] = self.init_bias(rng, *self.dims)
        return ps

    def parameter_count(self) -> int:
        return math.prod(self.dims) * (2 if self.use_bias else 1)

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[torch.Tensor, Mapping]:
        x = check_tensor(x)
        n = len(self.dims)
        if x.dim() < n or tuple(x.shape[x.dim() - n:]) != self.dims:
            raise LayerError(f"expected input whose trailing dimensions are {self.dims}, "
                             f"got input shape {tuple(x.shape)}")
        check_keys(ps, self._keys, "parameter")
        weight = check_param_shape(ps["weight"], self.dims, "weight")
        check_matches(x, weight, "weight")
        if self.use_bias:
            y = torch.addcmul(check_param_shape(ps["bias"], self.dims, "bias"), x, weight)
        else:
            y = x * weight
        return apply_activation(self.activation, y), st

    def __repr__(self) -> str:
        dims = self.dims[0] if len(self.dims) == 1 else self.dims
        act = f", {activation_name(self.activation)}" if self.activation is not None else ""
        bias = "" if self.use_bias else ", use_bias=False"
        return f"Scale({dims}{act}{bias})"


class WrappedFunction(AbstractLayer):
    r"""A parameter-free layer :math:`y = f(x)`; the state passes through unchanged.

    Args:
        fn: any callable of one argument (``torch.tanh``, ``lambda x: x**2``).

    Parameters and state: ``{}``.
    """

    def __init__(self, fn: Callable[[Any], Any]):
        if not callable(fn):
            raise TypeError(f"WrappedFunction: expected a callable, got {type(fn).__name__}")
        self.fn = fn

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[Any, Mapping]:
        return self.fn(x), st

    def parameter_count(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"WrappedFunction({activation_name(self.fn)})"


class NoOpLayer(AbstractLayer):
    """The identity layer, :math:`y = x`. Parameters and state: ``{}``."""

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[Any, Mapping]:
        return x, st

    def parameter_count(self) -> int:
        return 0


class Flatten(AbstractLayer):
    """Flatten every dimension but the first (batch): ``(B, d1, d2, ...) -> (B, d1·d2·…)``.

    Lux's ``FlattenLayer``. Parameters and state: ``{}``.
    """

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[torch.Tensor, Mapping]:
        x = check_tensor(x)
        if x.dim() < 1:
            raise LayerError("expected an input with a leading batch dimension, got a 0-d tensor")
        return torch.flatten(x, 1) if x.dim() > 1 else x.reshape(x.shape[0], 1), st

    def parameter_count(self) -> int:
        return 0


class Reshape(AbstractLayer):
    """Reshape every dimension but the first (batch): ``(B, ...) -> (B, *dims)``.

    Lux's ``ReshapeLayer``. ``dims`` may contain one ``-1``, inferred from the
    input size. Parameters and state: ``{}``.

    Raises:
        LayerError: the per-sample size of the input does not match ``dims``.
    """

    def __init__(self, dims: int | tuple[int, ...]):
        dims = (dims,) if isinstance(dims, int) and not isinstance(dims, bool) else dims
        if not isinstance(dims, (tuple, list, torch.Size)) or len(dims) == 0:
            raise ValueError(f"Reshape: dims must be an int or a non-empty tuple of ints, got {dims!r}")
        for d in dims:
            if isinstance(d, bool) or not isinstance(d, int) or (d <= 0 and d != -1):
                raise ValueError(f"Reshape: each entry of dims must be a positive int or -1, got {dims!r}")
        if sum(d == -1 for d in dims) > 1:
            raise ValueError(f"Reshape: at most one entry of dims may be -1, got {dims!r}")
        self.dims = tuple(dims)

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[torch.Tensor, Mapping]:
        x = check_tensor(x)
        if x.dim() < 1:
            raise LayerError("expected an input with a leading batch dimension, got a 0-d tensor")
        per_sample = math.prod(x.shape[1:])
        known = math.prod(d for d in self.dims if d != -1)
        fits = per_sample % known == 0 if -1 in self.dims else per_sample == known
        if not fits:
            raise LayerError(f"cannot reshape input of shape {tuple(x.shape)} ({per_sample} values per sample) "
                             f"to (batch, {', '.join(map(str, self.dims))})")
        return x.reshape(x.shape[0], *self.dims), st

    def parameter_count(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"Reshape({self.dims})"
