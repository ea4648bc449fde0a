"""2-D convolution and pooling layers (NCHW layout, as PyTorch)."""

from __future__ import annotations

import abc

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from ..core import AbstractLayer, LayerError
from ._common import (
    Activation,
    activation_name,
    apply_activation,
    as_pair,
    check_activation,
    check_init,
    check_keys,
    check_matches,
    check_param_shape,
    check_positive_int,
    check_tensor,
    format_options,
)
from .init import glorot_uniform, zeros

__all__ = ["Conv", "MaxPool", "MeanPool", "GlobalMeanPool"]


def _output_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int = 1) -> int:
    """``floor((size + pad_total - dilation·(kernel-1) - 1) / stride) + 1`` (may be <= 0)."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def _check_nchw(x: Any, channels: int | None) -> torch.Tensor:
    x = check_tensor(x)
    if x.dim() != 4:
        hint = "; add a batch dimension with x.unsqueeze(0)" if x.dim() == 3 else ""
        raise LayerError(f"expected a 4-D input (batch, channels, height, width), got shape {tuple(x.shape)}{hint}")
    if channels is not None and x.shape[1] != channels:
        raise LayerError(f"expected input with {channels} channels (dimension 1), got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)})")
    return x


class Conv(AbstractLayer):
    r"""2-D convolution :math:`y = \sigma(W \star x + b)` over NCHW input.

    :math:`\star` is cross-correlation, as ``torch.nn.functional.conv2d`` (Lux's
    ``Conv`` flips the kernel unless ``cross_correlation=true``; weights taken
    from Lux need ``torch.flip(w, (-2, -1))``).

    Args:
        kernel_size: ``k`` or ``(kh, kw)``.
        channels: ``(in_chs, out_chs)``, Lux's ``in_chs => out_chs``.
        activation: elementwise callable or ``None``.
        stride, dilation: int or pair (>= 1).
        padding: int or pair (>= 0) added on both sides, or ``"same"``: total
            padding ``dilation·(k-1)`` per spatial dimension so that stride 1
            keeps the spatial size; when it is odd the extra row/column goes
            at the end (as ``F.conv2d(padding="same")``).
        groups: number of channel groups; must divide both channel counts.
        use_bias: whether to add the per-channel bias.
        init_weight: ``init(rng, out, in/groups, kh, kw)``; Glorot uniform with
            fan_in = in/groups·kh·kw, fan_out = out·kh·kw (Lux's convention).
        init_bias: ``init(rng, out)``; zeros by default.

    Parameters ``ps``:
        ``weight``: ``(out_chs, in_chs/groups, kh, kw)``; ``bias``: ``(out_chs,)``.

    State ``st``: ``{}``.

    Raises:
        LayerError: input not 4-D, wrong channel count, spatial size smaller
            than the (dilated) kernel, or dtype/device differing from the weight.
    """

    def __init__(self, kernel_size: int | tuple[int, int], channels: tuple[int, int],
                 activation: Activation = None, *, stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] | str = 0, dilation: int | tuple[int, int] = 1,
                 groups: int = 1, use_bias: bool = True, init_weight: Callable = glorot_uniform,
                 init_bias: Callable = zeros):
        self.kernel_size = as_pair(kernel_size, "kernel_size", "Conv")
        if not isinstance(channels, (tuple, list)) or len(channels) != 2:
            raise ValueError(f"Conv: channels must be a pair (in_chs, out_chs), got {channels!r}")
        self.in_chs = check_positive_int(channels[0], "in_chs", "Conv")
        self.out_chs = check_positive_int(channels[1], "out_chs", "Conv")
        self.activation = check_activation(activation, "Conv")
        self.stride = as_pair(stride, "stride", "Conv")
        self.dilation = as_pair(dilation, "dilation", "Conv")
        self.groups = check_positive_int(groups, "groups", "Conv")
        if self.in_chs % self.groups or self.out_chs % self.groups:
            raise ValueError(f"Conv: groups={self.groups} must divide both in_chs={self.in_chs} and "
                             f"out_chs={self.out_chs}")
        if isinstance(padding, str):
            if padding != "same":
                raise ValueError(f"Conv: padding must be an int, a pair of ints or 'same', got {padding!r}")
            self.padding: tuple[int, int] | str = "same"
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            # (begin, end) per spatial dimension; the odd extra goes at the end, as torch does.
            self._pads = tuple((t // 2, t - t // 2) for t in totals)
        else:
            self.padding = as_pair(padding, "padding", "Conv", minimum=0)
            self._pads = tuple((p, p) for p in self.padding)
        self.use_bias = bool(use_bias)
        self.init_weight = check_init(init_weight, "init_weight", "Conv")
        self.init_bias = check_init(init_bias, "init_bias", "Conv")
        self._keys = ("weight", "bias") if self.use_bias else ("weight",)
        self._weight_shape = (self.out_chs, self.in_chs // self.groups, *self.kernel_size)

    def init_params(self, rng: torch.Generator) -> dict:
        ps = {"weight": self.init_weight(rng, *self._weight_shape)}
        if self.use_bias:
            ps["bias"] = self.init_bias(rng, self.out_chs)
        return ps

    def parameter_count(self) -> int:
        return math.prod(self._weight_shape) + (self.out_chs if self.use_bias else 0)

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[torch.Tensor, Mapping]:
        x = _check_nchw(x, self.in_chs)
        for size, k, s, (lo, hi), d in zip(x.shape[2:], self.kernel_size, self.stride, self._pads, self.dilation):
            if _output_size(size, k, s, lo + hi, d) < 1:
                raise LayerError(f"input spatial size {tuple(x.shape[2:])} is smaller than the dilated kernel "
                                 f"{self.kernel_size} (dilation {self.dilation}) after padding {self._pads}")
        check_keys(ps, self._keys, "parameter")
        weight = check_param_shape(ps["weight"], self._weight_shape, "weight")
        check_matches(x, weight, "weight")
        bias = check_param_shape(ps["bias"], (self.out_chs,), "bias") if self.use_bias else None
        (top, bottom), (left, right) = self._pads
        if top == bottom and left == right:
            y = F.conv2d(x, weight, bias, self.stride, (top, left), self.dilation, self.groups)
        else:
            y = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, self.stride, 0, self.dilation,
                         self.groups)
        return apply_activation(self.activation, y), st

    def __repr__(self) -> str:
        act = f", {activation_name(self.activation)}" if self.activation is not None else ""
        opts = format_options(
            {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups,
             "use_bias": self.use_bias},
            {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1, "use_bias": True})
        return f"Conv({self.kernel_size}, {self.in_chs} => {self.out_chs}{act}{opts})"


class _Pool(AbstractLayer, abc.ABC):
    _kind = "pool"

    def __init__(self, window: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0):
        owner = type(self).__name__
        self.window = as_pair(window, "window", owner)
        self.stride = self.window if stride is None else as_pair(stride, "stride", owner)
        self.padding = as_pair(padding, "padding", owner, minimum=0)
        for p, k in zip(self.padding, self.window):
            if 2 * p > k:
                raise ValueError(f"{owner}: padding {self.padding} must be at most half the window {self.window}")

    def parameter_count(self) -> int:
        return 0

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[torch.Tensor, Mapping]:
        x = _check_nchw(x, None)
        for size, k, s, p in zip(x.shape[2:], self.window, self.stride, self.padding):
            if _output_size(size, k, s, 2 * p) < 1:
                raise LayerError(f"input spatial size {tuple(x.shape[2:])} is smaller than the window "
                                 f"{self.window} after padding {self.padding}")
        return self._pool(x), st

    @abc.abstractmethod
    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Implemented by each concrete subclass."""

    def __repr__(self) -> str:
        opts = format_options({"stride": self.stride, "padding": self.padding},
                              {"stride": self.window, "padding": (0, 0)})
        return f"{type(self).__name__}({self.window}{opts})"


class MaxPool(_Pool):
    r"""Max pooling :math:`y_{c,i,j} = \max_{(u,v) \in \text{window}(i,j)} x_{c,u,v}` (NCHW).

    Args:
        window: ``k`` or ``(kh, kw)``.
        stride: defaults to ``window`` (non-overlapping), as in Lux.
        padding: int or pair, at most half the window; padded cells never win.

    Parameters and state: ``{}``.
    """

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, self.window, self.stride, self.padding)


class MeanPool(_Pool):
    r"""Mean pooling over each window (NCHW); padded zeros count in the mean (as NNlib's ``meanpool``).

    Args: as :class:`MaxPool`. Parameters and state: ``{}``.
    """

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.window, self.stride, self.padding, count_include_pad=True)


class GlobalMeanPool(AbstractLayer):
    r"""Mean over every spatial dimension, keeping them: ``(B, C, *S) -> (B, C, 1, ..., 1)`` (Lux's shape).

    Parameters and state: ``{}``.
    """

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[torch.Tensor, Mapping]:
        x = check_tensor(x)
        if x.dim() < 3:
            raise LayerError(f"expected input (batch, channels, spatial...), got shape {tuple(x.shape)}")
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True), st

    def parameter_count(self) -> int:
        return 0
