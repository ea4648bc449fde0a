"""Container layers: Chain, SkipConnection, Parallel.

Their ``ps`` and ``st`` are dicts keyed by child name. Errors raised inside a
child carry the path to it, e.g. ``"Chain.layer_2 (Dense): expected input with
last dimension 64, got 32 ..."``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..core import AbstractContainerLayer, AbstractLayer, LayerError
from ._common import activation_name
from .basic import WrappedFunction
from .torch_module import TorchModule

__all__ = ["Chain", "SkipConnection", "Parallel"]


def _as_layer(obj: Any, owner: str, key: str) -> AbstractLayer:
    """Lux wraps plain functions in a Chain; torch modules are wrapped as TorchModule."""
    if isinstance(obj, AbstractLayer):
        return obj
    if isinstance(obj, torch.nn.Module):
        return TorchModule(obj)
    if callable(obj):
        return WrappedFunction(obj)
    raise TypeError(f"{owner}: {key} is a {type(obj).__name__}, not a pylux layer, a torch.nn.Module "
                    "or a callable")


def _collect_children(owner: str, layers: tuple, named_layers: dict) -> dict[str, AbstractLayer]:
    if layers and named_layers:
        raise TypeError(f"{owner}: pass the layers either positionally or as keywords, not both "
                        f"(got {len(layers)} positional and keywords {sorted(named_layers)})")
    if len(layers) == 1 and isinstance(layers[0], Mapping):
        children = dict(layers[0])
    elif named_layers:
        children = dict(named_layers)
    else:
        children = {f"layer_{i}": layer for i, layer in enumerate(layers, 1)}
    for key in children:
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"{owner}: layer names must be non-empty strings without '.', got {key!r}")
    return {key: _as_layer(layer, owner, f"layer {key!r}") for key, layer in children.items()}


class _NamedContainer(AbstractContainerLayer):
    """A container whose error path and repr may use a user-chosen name instead of its type."""

    name: str | None = None

    @property
    def display_name(self) -> str:
        return self.name if self.name is not None else type(self).__name__

    def __call__(self, x: Any, ps: Mapping, st: Mapping) -> tuple[Any, dict]:
        try:
            return super().__call__(x, ps, st)
        except LayerError as e:
            if self.name is None:
                raise
            raise type(e)(e.raw_message, (self.name,) + e.path[1:]) from None

    def parameter_count(self) -> int:
        return sum(layer.parameter_count() for layer in self.layers.values())


class Chain(_NamedContainer):
    r"""Sequential composition :math:`y = f_n(\dots f_2(f_1(x)))`, threading each child's state.

    Spellings (as in Lux.jl)::

        Chain(Dense(2, 8, torch.tanh), Dense(8, 1))           # keys layer_1, layer_2
        Chain(encoder=Dense(2, 8), decoder=Dense(8, 2))       # keys encoder, decoder
        Chain({"encoder": Dense(2, 8), "decoder": Dense(8, 2)})

    Plain callables become :class:`WrappedFunction` and ``torch.nn.Module``\ s
    become :class:`TorchModule` (whose parameters are copied at setup).

    Args:
        name: optional name used in error paths and the repr instead of ``Chain``.

    Parameters and state: ``{child_name: child_ps}``, ``{child_name: child_st}``.
    """

    def __init__(self, *layers: Any, name: str | None = None, **named_layers: Any):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"Chain: name must be a str, got {type(name).__name__}")
        super().__init__(_collect_children("Chain", layers, named_layers))
        self.name = name

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[Any, dict]:
        new_st = {}
        for key in self.layers:
            x, new_st[key] = self.call_child(key, x, ps, st)
        return x, new_st

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, key: int | str) -> AbstractLayer:
        if isinstance(key, int):
            return list(self.layers.values())[key]
        return self.layers[key]

    def __repr__(self) -> str:
        text = super().__repr__()
        return text if self.name is None else text.replace("Chain(", f"Chain(name={self.name!r},", 1)


def _connection_name(connection: Any) -> str:
    return connection if isinstance(connection, str) else activation_name(connection)


class SkipConnection(AbstractContainerLayer):
    r"""Residual block :math:`z = c(f(x), x)`; with ``connection="+"``, :math:`z = f(x) + x`.

    Args:
        layer: the layer :math:`f` (a pylux layer, torch module or callable).
        connection: ``"+"``, a callable ``(y, x) -> z``, or a pylux layer that
            takes the tuple ``(y, x)`` (then it has parameters of its own).

    Parameters and state: ``{"layers": ps_f}`` plus ``"connection"`` when the
    connection is a layer.
    """

    def __init__(self, layer: Any, connection: Any):
        children = {"layers": _as_layer(layer, "SkipConnection", "layer")}
        if isinstance(connection, AbstractLayer):
            children["connection"] = connection
        elif isinstance(connection, str):
            if connection != "+":
                raise ValueError(f"SkipConnection: the only string connection is '+', got {connection!r}; "
                                 "pass a callable (y, x) -> z for anything else")
        elif not callable(connection):
            raise TypeError(f"SkipConnection: connection must be '+', a callable (y, x) -> z or a pylux layer, "
                            f"got {type(connection).__name__}")
        super().__init__(children)
        self.connection = connection

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[Any, dict]:
        y, st_layers = self.call_child("layers", x, ps, st)
        if isinstance(self.connection, AbstractLayer):
            z, st_connection = self.call_child("connection", (y, x), ps, st)
            return z, {"layers": st_layers, "connection": st_connection}
        if isinstance(self.connection, str):
            if isinstance(y, torch.Tensor) and isinstance(x, torch.Tensor) and y.shape != x.shape:
                raise LayerError(f"'+' connection needs the layer output shape {tuple(y.shape)} to equal "
                                 f"the input shape {tuple(x.shape)}")
            z = y + x
        else:
            z = self.connection(y, x)
        return z, {"layers": st_layers}

    def parameter_count(self) -> int:
        return sum(layer.parameter_count() for layer in self.layers.values())

    def __repr__(self) -> str:
        inner = repr(self.layers["layers"]).replace("\n", "\n  ")
        conn = (repr(self.connection).replace("\n", "\n  ") if isinstance(self.connection, AbstractLayer)
                else _connection_name(self.connection))
        return f"SkipConnection(\n  {inner},\n  {conn}\n)"


class Parallel(_NamedContainer):
    r"""Apply children side by side and combine: :math:`z = c(f_1(x_1), \dots, f_n(x_n))`.

    Lux semantics: if ``x`` is a tuple of length ``n``, child ``i`` receives
    ``x[i]``; otherwise every child receives the same ``x``.

    Args:
        connection: ``None`` (return the tuple of outputs), ``"+"`` (their sum)
            or a callable taking the ``n`` outputs as positional arguments
            (e.g. ``lambda *ys: torch.cat(ys, -1)``).
        *layers / **named_layers: the children, as for :class:`Chain`.
        name: optional name used in error paths and the repr.

    Parameters and state: ``{child_name: ...}``.
    """

    def __init__(self, connection: Callable | str | None, *layers: Any, name: str | None = None,
                 **named_layers: Any):
        if isinstance(connection, str) and connection != "+":
            raise ValueError(f"Parallel: the only string connection is '+', got {connection!r}")
        if connection is not None and not isinstance(connection, str) and not callable(connection):
            raise TypeError(f"Parallel: connection must be None, '+' or a callable, got {type(connection).__name__}")
        if isinstance(connection, AbstractLayer):
            raise TypeError("Parallel: connection must be a function of the outputs, not a layer; "
                            "follow the Parallel with the layer in a Chain instead")
        children = _collect_children("Parallel", layers, named_layers)
        if not children:
            raise ValueError("Parallel: needs at least one layer")
        super().__init__(children)
        self.connection = connection
        self.name = name

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[Any, dict]:
        keys = list(self.layers)
        if isinstance(x, tuple):
            if len(x) != len(keys):
                raise LayerError(f"got a tuple of {len(x)} inputs for {len(keys)} layers; pass one input per "
                                 "layer, or a single (non-tuple) input shared by all")
            inputs = x
        else:
            inputs = (x,) * len(keys)
        outputs, new_st = [], {}
        for key, xi in zip(keys, inputs):
            yi, new_st[key] = self.call_child(key, xi, ps, st)
            outputs.append(yi)
        if self.connection is None:
            return tuple(outputs), new_st
        if isinstance(self.connection, str):
            z = outputs[0]
            for yi in outputs[1:]:
                z = z + yi
            return z, new_st
        return self.connection(*outputs), new_st

    def __repr__(self) -> str:
        inner = ",\n".join(f"  {k} = " + repr(v).replace("\n", "\n  ") for k, v in self.layers.items())
        name = f"name={self.name!r}," if self.name is not None else ""
        return f"Parallel({name}\n  connection = {_connection_name(self.connection)},\n{inner}\n)"
