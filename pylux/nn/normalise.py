"""Normalisation layers: BatchNorm, GroupNorm, LayerNorm.

Channels are dimension 1 (``(B, C)`` or ``(B, C, H, W)``, PyTorch layout).
No layer writes into its input or its state: running statistics come back in
the new state.
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
    check_training_flag,
    format_options,
)
from .init import ones, zeros

__all__ = ["BatchNorm", "GroupNorm", "LayerNorm"]


def _check_eps(eps: Any, owner: str) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{owner}: eps must be a positive number, got {eps!r}")
    return float(eps)


def _check_channels_input(x: Any, chs: int) -> torch.Tensor:
    x = check_tensor(x)
    if x.dim() < 2 or x.shape[1] != chs:
        raise LayerError(f"expected input of shape (batch, {chs}, ...) with the channels in dimension 1, "
                         f"got shape {tuple(x.shape)}")
    return x


class BatchNorm(AbstractLayer):
    r"""Batch normalisation (Ioffe & Szegedy, ICML 2015).

    .. math::
        y = \sigma\Big(\gamma \odot \frac{x - \mu}{\sqrt{v + \epsilon}} + \beta\Big)

    per channel (dimension 1). In train mode :math:`\mu, v` are the mean and
    the biased variance over the batch and spatial dimensions, and the running
    statistics are updated as

    .. math::
        \bar\mu \leftarrow (1-m)\,\bar\mu + m\,\mu,\qquad
        \bar v \leftarrow (1-m)\,\bar v + m\,\tfrac{n}{n-1}\,v

    (unbiased variance, :math:`n` values per channel, gradients not tracked)
    and returned in the new state. In test mode :math:`\bar\mu, \bar v` are
    used and the state is returned unchanged. Without ``track_stats`` the
    batch statistics are used in both modes.

    Args:
        chs: number of channels ``C``.
        activation: elementwise callable or ``None``.
        eps: :math:`\epsilon`; momentum: :math:`m` (Lux and torch: 0.1).
        affine: learn :math:`\gamma` (``scale``) and :math:`\beta` (``bias``).
        track_stats: keep running statistics.

    Parameters ``ps``: ``scale`` ``(C,)``, ``bias`` ``(C,)`` when ``affine``.

    State ``st``: ``running_mean`` ``(C,)``, ``running_var`` ``(C,)`` when
    ``track_stats``; ``training`` (bool, ``True`` after setup; see
    :func:`pylux.testmode`).

    Input ``(B, C)`` or ``(B, C, *spatial)``.
    """

    def __init__(self, chs: int, activation: Activation = None, *, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_stats: bool = True, init_scale: Callable = ones,
                 init_bias: Callable = zeros):
        self.chs = check_positive_int(chs, "chs", "BatchNorm")
        self.activation = check_activation(activation, "BatchNorm")
        self.eps = _check_eps(eps, "BatchNorm")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm: momentum must be a number in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.affine = bool(affine)
        self.track_stats = bool(track_stats)
        self.init_scale = check_init(init_scale, "init_scale", "BatchNorm")
        self.init_bias = check_init(init_bias, "init_bias", "BatchNorm")
        self._ps_keys = ("scale", "bias") if self.affine else ()
        self._st_keys = ("running_mean", "running_var", "training") if self.track_stats else ("training",)

    def init_params(self, rng: torch.Generator) -> dict:
        if not self.affine:
            return {}
        return {"scale": self.init_scale(rng, self.chs), "bias": self.init_bias(rng, self.chs)}

    def init_state(self, rng: torch.Generator) -> dict:
        st: dict[str, Any] = {}
        if self.track_stats:
            st["running_mean"] = zeros(rng, self.chs)
            st["running_var"] = ones(rng, self.chs)
        st["training"] = True
        return st

    def parameter_count(self) -> int:
        return 2 * self.chs if self.affine else 0

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[torch.Tensor, dict]:
        x = _check_channels_input(x, self.chs)
        check_keys(ps, self._ps_keys, "parameter")
        check_keys(st, self._st_keys, "state")
        training = check_training_flag(st)
        if self.affine:
            scale = check_param_shape(ps["scale"], (self.chs,), "scale")
            bias = check_param_shape(ps["bias"], (self.chs,), "bias")
            check_matches(x, scale, "scale")
        if self.track_stats:
            check_matches(x, st["running_mean"], "running_mean")
        reduce_dims = (0, *range(2, x.dim()))
        per_channel = x.numel() // self.chs if x.numel() else 0
        new_st = dict(st)
        if training or not self.track_stats:
            if per_channel < 2:
                raise LayerError(f"batch statistics need more than one value per channel, got input shape "
                                 f"{tuple(x.shape)}; use a larger batch or testmode(st)")
            var, mean = torch.var_mean(x, dim=reduce_dims, correction=0)
            if training and self.track_stats:
                m = self.momentum
                unbiased = var.detach() * (per_channel / (per_channel - 1))
                new_st["running_mean"] = torch.lerp(st["running_mean"], mean.detach(), m)
                new_st["running_var"] = torch.lerp(st["running_var"], unbiased, m)
        else:
            mean, var = st["running_mean"], st["running_var"]
        # y = x·a + c with a = γ/√(v+ε), c = β − μ·a: one fused pass over the input.
        a = torch.rsqrt(var + self.eps)
        if self.affine:
            a = a * scale
            c = bias - mean * a
        else:
            c = -mean * a
        shape = (1, self.chs) + (1,) * (x.dim() - 2)
        y = torch.addcmul(c.view(shape), x, a.view(shape))
        return apply_activation(self.activation, y), new_st

    def __repr__(self) -> str:
        act = f", {activation_name(self.activation)}" if self.activation is not None else ""
        opts = format_options(
            {"eps": self.eps, "momentum": self.momentum, "affine": self.affine, "track_stats": self.track_stats},
            {"eps": 1e-5, "momentum": 0.1, "affine": True, "track_stats": True})
        return f"BatchNorm({self.chs}{act}{opts})"


class GroupNorm(AbstractLayer):
    r"""Group normalisation (Wu & He, ECCV 2018).

    The ``C`` channels are split into ``groups`` groups; each sample is
    normalised by the mean and biased variance over its group's channels and
    spatial positions, then scaled per channel:
    :math:`y = \sigma(\gamma \odot (x-\mu_g)/\sqrt{v_g+\epsilon} + \beta)`.
    Independent of the batch, so train and test mode agree.

    Args:
        chs: ``C``; groups: must divide ``C``; activation; eps; affine.

    Parameters ``ps``: ``scale`` ``(C,)``, ``bias`` ``(C,)`` when ``affine``.
    State ``st``: ``{}``.
    """

    def __init__(self, chs: int, groups: int, activation: Activation = None, *, eps: float = 1e-5,
                 affine: bool = True, init_scale: Callable = ones, init_bias: Callable = zeros):
        self.chs = check_positive_int(chs, "chs", "GroupNorm")
        self.groups = check_positive_int(groups, "groups", "GroupNorm")
        if self.chs % self.groups:
            raise ValueError(f"GroupNorm: groups={self.groups} must divide chs={self.chs}")
        self.activation = check_activation(activation, "GroupNorm")
        self.eps = _check_eps(eps, "GroupNorm")
        self.affine = bool(affine)
        self.init_scale = check_init(init_scale, "init_scale", "GroupNorm")
        self.init_bias = check_init(init_bias, "init_bias", "GroupNorm")
        self._ps_keys = ("scale", "bias") if self.affine else ()

    def init_params(self, rng: torch.Generator) -> dict:
        if not self.affine:
            return {}
        return {"scale": self.init_scale(rng, self.chs), "bias": self.init_bias(rng, self.chs)}

    def parameter_count(self) -> int:
        return 2 * self.chs if self.affine else 0

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[torch.Tensor, Mapping]:
        x = _check_channels_input(x, self.chs)
        check_keys(ps, self._ps_keys, "parameter")
        scale = bias = None
        if self.affine:
            scale = check_param_shape(ps["scale"], (self.chs,), "scale")
            bias = check_param_shape(ps["bias"], (self.chs,), "bias")
            check_matches(x, scale, "scale")
        y = F.group_norm(x, self.groups, scale, bias, self.eps)
        return apply_activation(self.activation, y), st

    def __repr__(self) -> str:
        act = f", {activation_name(self.activation)}" if self.activation is not None else ""
        opts = format_options({"eps": self.eps, "affine": self.affine}, {"eps": 1e-5, "affine": True})
        return f"GroupNorm({self.chs}, {self.groups}{act}{opts})"


class LayerNorm(AbstractLayer):
    r"""Layer normalisation (Ba, Kiros & Hinton, 2016) over the trailing ``shape`` dimensions.

    :math:`y = \sigma(\gamma \odot (x-\mu)/\sqrt{v+\epsilon} + \beta)` with
    :math:`\mu, v` the mean and biased variance over the last
    ``len(shape)`` dimensions of each sample.

    Args:
        shape: int or tuple, the trailing dimensions of the input.
        activation; eps; affine (learn elementwise ``scale`` and ``bias`` of ``shape``).

    Parameters ``ps``: ``scale`` ``shape``, ``bias`` ``shape`` when ``affine``.
    State ``st``: ``{}``.
    """

    def __init__(self, shape: int | tuple[int, ...], activation: Activation = None, *, eps: float = 1e-5,
                 affine: bool = True, init_scale: Callable = ones, init_bias: Callable = zeros):
        shape = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else shape
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) == 0:
            raise ValueError(f"LayerNorm: shape must be a positive int or a non-empty tuple of them, got {shape!r}")
        self.shape = tuple(check_positive_int(d, "each entry of shape", "LayerNorm") for d in shape)
        self.activation = check_activation(activation, "LayerNorm")
        self.eps = _check_eps(eps, "LayerNorm")
        self.affine = bool(affine)
        self.init_scale = check_init(init_scale, "init_scale", "LayerNorm")
        self.init_bias = check_init(init_bias, "init_bias", "LayerNorm")
        self._ps_keys = ("scale", "bias") if self.affine else ()

    def init_params(self, rng: torch.Generator) -> dict:
        if not self.affine:
            return {}
        return {"scale": self.init_scale(rng, *self.shape), "bias": self.init_bias(rng, *self.shape)}

    def parameter_count(self) -> int:
        return 2 * math.prod(self.shape) if self.affine else 0

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[torch.Tensor, Mapping]:
        x = check_tensor(x)
        n = len(self.shape)
        if x.dim() < n or tuple(x.shape[x.dim() - n:]) != self.shape:
            raise LayerError(f"expected input whose trailing dimensions are {self.shape}, "
                             f"got input shape {tuple(x.shape)}")
        check_keys(ps, self._ps_keys, "parameter")
        scale = bias = None
        if self.affine:
            scale = check_param_shape(ps["scale"], self.shape, "scale")
            bias = check_param_shape(ps["bias"], self.shape, "bias")
            check_matches(x, scale, "scale")
        y = F.layer_norm(x, self.shape, scale, bias, self.eps)
        return apply_activation(self.activation, y), st

    def __repr__(self) -> str:
        shape = self.shape[0] if len(self.shape) == 1 else self.shape
        act = f", {activation_name(self.activation)}" if self.activation is not None else ""
        opts = format_options({"eps": self.eps, "affine": self.affine}, {"eps": 1e-5, "affine": True})
        return f"LayerNorm({shape}{act}{opts})"
