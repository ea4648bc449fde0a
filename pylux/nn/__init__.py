"""pylux.nn: Lux.jl-style layers with explicit parameters and state.

Every layer is an immutable description; ``ps`` and ``st`` are nested dicts of
tensors made by :func:`pylux.setup`, and ``layer(x, ps, st)`` returns
``(y, st_new)`` without mutating ``st``. Feature/channel dimensions follow the
PyTorch layout (batch first, channels in dimension 1 for images).
"""

from . import init
from .basic import Dense, Flatten, NoOpLayer, Reshape, Scale, WrappedFunction
from .containers import Chain, Parallel, SkipConnection
from .conv import Conv, GlobalMeanPool, MaxPool, MeanPool
from .dropout import Dropout
from .init import glorot_normal, glorot_uniform, kaiming_normal, kaiming_uniform, ones, zeros
from .normalise import BatchNorm, GroupNorm, LayerNorm
from .torch_module import TorchModule

__all__ = [
    "Dense", "Chain", "Conv", "MaxPool", "MeanPool", "GlobalMeanPool", "Flatten", "Reshape",
    "BatchNorm", "GroupNorm", "LayerNorm", "Dropout", "SkipConnection", "Parallel", "WrappedFunction",
    "NoOpLayer", "Scale", "TorchModule",
    "glorot_uniform", "glorot_normal", "kaiming_uniform", "kaiming_normal", "zeros", "ones", "init",
]
