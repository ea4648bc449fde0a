"""pylux.interop: DLPack exchange, device loaders, and the torch bridges (StatefulLayer, a torchdiffeq-compatible odeint)."""

from .device import DeviceLoader, to_device
from .dlpack import from_torch, to_numpy, to_torch
from .stateful import StatefulLayer
from .torchdiffeq import METHODS, odeint, odeint_adjoint

__all__ = ["DeviceLoader", "from_torch", "to_device", "to_numpy", "to_torch"]
__all__ += ["StatefulLayer", "odeint", "odeint_adjoint"]
