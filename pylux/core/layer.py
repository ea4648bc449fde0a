"""The layer protocol (the LuxCore analogue).

A layer is an immutable description of a computation. It owns no tensors:

* ``layer.init_params(rng) -> ps``   a tree of parameters, drawn from ``rng``;
* ``layer.init_state(rng) -> st``    a tree of non-trainable state (running
  statistics, RNG keys, a ``"training"`` flag, solver statistics);
* ``layer(x, ps, st) -> (y, st_new)`` pure in ``ps``; the new state is
  returned, the old one is never mutated.

Container layers hold named children; their ``ps`` and ``st`` are dicts keyed
by child name (``layer_1``, ``layer_2``, … or names the user chose).

Errors raised by a child while it runs are re-raised by each enclosing
container with its own name prefixed, so a wrong input shape deep inside a
model is reported as, e.g., ``"Chain.layer_2 (Dense): expected input with
last dimension 64, got 32"``.
"""

from __future__ import annotations

import abc

from typing import Any, Mapping

import torch

from .tree import Tree, tree_leaves, tree_map_with_path

__all__ = [
    "AbstractLayer",
    "AbstractContainerLayer",
    "LayerError",
    "setup",
    "apply",
    "trainmode",
    "testmode",
    "parameter_count",
    "state_count",
    "check_generator",
]


class LayerError(ValueError):
    """A layer received input it cannot process; ``path`` names where in the model."""

    def __init__(self, message: str, path: tuple[str, ...] = ()):
        self.raw_message = message
        self.path = path
        super().__init__(self._render())

    def _render(self) -> str:
        where = ".".join(self.path)
        return f"{where}: {self.raw_message}" if where else self.raw_message

    def with_parent(self, name: str) -> "LayerError":
        return type(self)(self.raw_message, (name,) + self.path)


def check_generator(rng: Any, where: str = "setup") -> torch.Generator:
    """Return ``rng`` if it is a ``torch.Generator``; otherwise raise ``TypeError``."""
    if not isinstance(rng, torch.Generator):
        raise TypeError(
            f"{where}: expected a torch.Generator for the random state, got {type(rng).__name__}. "
            "Use e.g. torch.Generator().manual_seed(0).")
    return rng


class AbstractLayer(abc.ABC):
    """Base class of every pylux layer.

    Subclasses override :meth:`init_params`, :meth:`init_state` (both default
    to empty dicts) and :meth:`forward`. ``__call__`` wraps ``forward`` so that
    errors carry the layer's name.
    """

    def init_params(self, rng: torch.Generator) -> dict:
        return {}

    def init_state(self, rng: torch.Generator) -> dict:
        return {}

    @abc.abstractmethod
    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[Any, dict]:
        """``(y, st_new)``: the layer's computation, pure in ``ps``; ``st`` is never mutated."""

    def __call__(self, x: Any, ps: Mapping, st: Mapping) -> tuple[Any, dict]:
        try:
            return self.forward(x, ps, st)
        except LayerError as e:
            raise e.with_parent(type(self).__name__) from None

    def parameter_count(self) -> int:
        """Number of scalar parameters.

        Initialises a throw-away parameter tree with :meth:`init_params` (from a
        fresh generator seeded 0) and counts the entries of its tensor leaves, so
        it allocates the parameters once; a layer that knows its count without
        building its tree may override this.
        """
        return sum(x.numel() for x in tree_leaves(self.init_params(torch.Generator().manual_seed(0))))

    def state_count(self) -> int:
        """Number of scalar state entries (tensor leaves only), counted on a throw-away :meth:`init_state`."""
        return sum(x.numel() for x in tree_leaves(self.init_state(torch.Generator().manual_seed(0))))

    @property
    def display_name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AbstractContainerLayer(AbstractLayer):
    """A layer built from named child layers.

    ``self.layers`` is an ordered ``dict`` name → child. Parameters and state
    are dicts with the same keys. Subclasses implement :meth:`forward` and use
    :meth:`call_child` to run a child so that its errors are reported with the
    child's name.
    """

    layers: dict[str, AbstractLayer]

    def __init__(self, layers: Mapping[str, AbstractLayer]):
        for name, layer in layers.items():
            if not isinstance(layer, AbstractLayer):
                raise TypeError(
                    f"{type(self).__name__}: child {name!r} is a {type(layer).__name__}, not a pylux layer. "
                    "Wrap torch modules with pylux.nn.TorchModule and functions with pylux.nn.WrappedFunction.")
        self.layers = dict(layers)

    def init_params(self, rng: torch.Generator) -> dict:
        return {name: layer.init_params(rng) for name, layer in self.layers.items()}

    def init_state(self, rng: torch.Generator) -> dict:
        return {name: layer.init_state(rng) for name, layer in self.layers.items()}

    def __call__(self, x: Any, ps: Mapping, st: Mapping) -> tuple[Any, dict]:
        try:
            if isinstance(ps, Mapping) and ps.keys() != self.layers.keys():
                _raise_key_mismatch("parameter", ps, self.layers)
            return self.forward(x, ps, st)
        except LayerError as e:
            raise e.with_parent(type(self).__name__) from None

    def call_child(self, name: str, x: Any, ps: Mapping, st: Mapping) -> tuple[Any, dict]:
        layer = self.layers[name]
        try:
            child_ps = ps[name]
        except (KeyError, TypeError):
            raise LayerError(f"parameter tree has no entry {name!r} for child {type(layer).__name__}") from None
        try:
            child_st = st[name]
        except (KeyError, TypeError):
            raise LayerError(f"state tree has no entry {name!r} for child {type(layer).__name__}") from None
        try:
            return layer(x, child_ps, child_st)
        except LayerError as e:
            # The child prefixed its type name; replace it with "name (Type)".
            raise type(e)(e.raw_message, (f"{name} ({type(layer).__name__})",) + e.path[1:]) from None

    def __repr__(self) -> str:
        inner = ",\n".join(f"  {k} = " + repr(v).replace("\n", "\n  ") for k, v in self.layers.items())
        return f"{type(self).__name__}(\n{inner}\n)"


def _raise_key_mismatch(kind: str, tree: Mapping, layers: Mapping) -> None:
    extra = [k for k in tree if k not in layers]
    missing = [k for k in layers if k not in tree]
    if missing:
        raise LayerError(f"{kind} tree is missing key {missing[0]!r} (expected keys {list(layers)})")
    raise LayerError(f"{kind} tree has unexpected extra key {extra[0]!r} (expected keys {list(layers)})")


def setup(rng: torch.Generator, model: AbstractLayer, *, dtype: torch.dtype | None = None,
          device: torch.device | str | None = None) -> tuple[dict, dict]:
    """Initialise ``(ps, st)`` for ``model`` from the generator ``rng``.

    The same seed always gives the same parameters. ``dtype`` casts floating
    parameters and state (e.g. ``torch.float64`` for gradient checks);
    ``device`` moves them. Without ``dtype``, a default dtype other than
    float32 (``torch.set_default_dtype(torch.float64)``) is followed: floating
    leaves are cast to ``torch.get_default_dtype()``; under the float32 default
    the leaves keep the dtype the layers created them in.
    """
    check_generator(rng)
    if not isinstance(model, AbstractLayer):
        raise TypeError(f"setup: expected a pylux layer, got {type(model).__name__}")
    if dtype is None and torch.get_default_dtype() != torch.float32:
        dtype = torch.get_default_dtype()
    ps = model.init_params(rng)
    st = model.init_state(rng)
    if dtype is not None or device is not None:
        from .tree import tree_to
        ps = tree_to(ps, device=device, dtype=dtype)
        st = tree_to(st, device=device, dtype=dtype)
    return ps, st


def apply(model: AbstractLayer, x: Any, ps: Mapping, st: Mapping) -> tuple[Any, dict]:
    """``model(x, ps, st)``: the Lux ``apply`` spelling."""
    return model(x, ps, st)


def _set_training(st: Tree, value: bool) -> Tree:
    def is_flag(path: tuple, node: Any) -> bool:
        return bool(path) and path[-1] == "training"

    return tree_map_with_path(lambda path, leaf: value if is_flag(path, leaf) else leaf, st, is_leaf=is_flag,
                              where="trainmode/testmode")


def trainmode(st: Tree) -> Tree:
    """A copy of ``st`` with every ``"training"`` flag set to ``True``."""
    return _set_training(st, True)


def testmode(st: Tree) -> Tree:
    """A copy of ``st`` with every ``"training"`` flag set to ``False`` (dropout off, running stats used)."""
    return _set_training(st, False)


def parameter_count(ps_or_layer: Any) -> int:
    """Scalar count of a parameter tree or of a layer's parameters."""
    if isinstance(ps_or_layer, AbstractLayer):
        return ps_or_layer.parameter_count()
    return sum(x.numel() for x in tree_leaves(ps_or_layer))


def state_count(st_or_layer: Any) -> int:
    if isinstance(st_or_layer, AbstractLayer):
        return st_or_layer.state_count()
    return sum(x.numel() for x in tree_leaves(st_or_layer))
