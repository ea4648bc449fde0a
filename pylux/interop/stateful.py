"""A pylux model as a ``torch.nn.Module``: :class:`StatefulLayer` (Lux's ``StatefulLuxLayer``).

pylux layers keep parameters and state outside themselves (``y, st = model(x, ps, st)``);
plain torch code expects a module that owns its parameters and is called as ``module(x)``.
:class:`StatefulLayer` is that module: each leaf of ``ps`` becomes a registered
``nn.Parameter`` and the state is kept and advanced inside it, so the model works with
``torch.optim``, learning-rate schedulers, ``state_dict``/``torch.save``,
``DistributedDataParallel``, ``torch.compile`` and trainers built on them.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..core import testmode, trainmode, tree_leaves_with_path, tree_map, tree_map_with_path

__all__ = ["StatefulLayer"]


def _module_key(key: Any) -> str:
    """A tree key as a submodule/parameter name: torch forbids dots (a TorchModule's ``"0.weight"``)."""
    return str(key).replace(".", "_")


class StatefulLayer(torch.nn.Module):
    r"""Wrap ``model``, ``ps`` and ``st`` into a ``torch.nn.Module`` with ``forward(x) -> y``.

    ``forward(x)`` evaluates :math:`(y, st') = \text{model}(x, ps, st)` with the
    module's parameters as ``ps``, stores :math:`st'` as ``self.st`` and returns
    :math:`y`. Gradients reach the parameters' ``.grad`` as for any torch module,
    and equal pylux's gradients with respect to ``ps``.

    Parameters: one ``nn.Parameter`` per tensor leaf of ``ps``, registered under
    the leaf's path (``state_dict`` keys ``"params.layer_1.weight"``; dots inside a
    key, as in a :class:`~pylux.nn.TorchModule`'s ``"0.weight"``, become ``_``).
    Floating leaves require grad, others do not. ``ps`` is copied unless
    ``copy=False``, so training the module never writes into the tree it was
    built from (a :class:`~pylux.training.TrainState`'s vector, say).

    State: ``self.st``. Each call starts from a detached copy of it, so no
    autograd graph links one call to the next, and leaves the new state there
    *undetached*, so a differentiable entry such as a NeuralODE's
    ``st["regularization"]`` can be added to the loss after the call.
    ``train()``/``eval()`` set every ``"training"`` flag of the state
    (:func:`pylux.trainmode`/:func:`pylux.testmode`); ``.to()``, ``.double()``
    and ``.cuda()`` move the state's tensors with the parameters; ``state_dict``
    carries the state as its extra state, so ``load_state_dict`` restores both.

    Args:
        model: a pylux layer (anything called as ``model(x, ps, st) -> (y, st)``).
        ps: its parameter tree.
        st: its state tree.
        copy: copy the leaves of ``ps`` (default) or let the parameters share their memory.

    Attributes:
        model: the wrapped layer. ``st``: the latest state. ``ps`` (property): the
        parameter tree, as detached views of the module's parameters.

    Raises:
        TypeError: ``model`` is not callable.
        ValueError: two keys of ``ps`` that only differ by ``.`` vs ``_`` (their names would collide).
    """

    def __init__(self, model: Any, ps: Any, st: Any, *, copy: bool = True):
        super().__init__()
        if not callable(model):
            raise TypeError(f"StatefulLayer: model must be a pylux layer, got {type(model).__name__}")
        self.model = model
        pairs = tree_leaves_with_path(ps)
        self._paths = [path for path, _ in pairs]
        self._names = [".".join(_module_key(k) for k in path) or "value" for path in self._paths]
        if len(set(self._names)) != len(self._names):
            seen: dict[str, tuple] = {}
            for name, path in zip(self._names, self._paths):
                if name in seen:
                    raise ValueError(f"StatefulLayer: parameter paths {seen[name]} and {path} both become the "
                                     f"module name {name!r}; rename one of the keys")
                seen[name] = path
        self._skeleton = tree_map_with_path(lambda path, x: None if isinstance(x, torch.Tensor) else x, ps,
                                            where="StatefulLayer")
        self.params = torch.nn.Module()
        for path, leaf in pairs:
            self._register(path, leaf.detach().clone() if copy else leaf.detach())
        self.st = st

    def _register(self, path: tuple, leaf: torch.Tensor) -> None:
        owner = self.params
        for key in path[:-1]:
            name = _module_key(key)
            if name not in owner._modules:
                owner.add_module(name, torch.nn.Module())
            owner = owner._modules[name]
        leaf_name = _module_key(path[-1]) if path else "value"
        owner.register_parameter(leaf_name, torch.nn.Parameter(leaf, requires_grad=leaf.is_floating_point()))

    def _parameter_tree(self, leaf_fn=lambda p: p) -> Any:
        named = dict(self.params.named_parameters(remove_duplicate=False))
        by_path = {path: leaf_fn(named[name]) for path, name in zip(self._paths, self._names)}
        return tree_map_with_path(lambda path, x: by_path.get(path, x), self._skeleton, where="StatefulLayer")

    @property
    def ps(self) -> Any:
        """The parameter tree: detached views of the module's parameters (they follow later updates)."""
        return self._parameter_tree(lambda p: p.detach())

    def forward(self, x: Any) -> Any:
        st = tree_map(lambda t: t.detach(), self.st)
        y, self.st = self.model(x, self._parameter_tree(), st)
        return y

    def train(self, mode: bool = True) -> "StatefulLayer":
        super().train(mode)
        self.st = trainmode(self.st) if mode else testmode(self.st)
        return self

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self.st = tree_map(fn, self.st)
        return out

    def get_extra_state(self) -> Any:
        return {"st": tree_map(lambda t: t.detach(), self.st)}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Mapping) or "st" not in state:
            raise ValueError("StatefulLayer.load_state_dict: the extra state must be the {'st': ...} that "
                             "StatefulLayer.state_dict() wrote")
        self.st = state["st"]

    def extra_repr(self) -> str:
        count = sum(p.numel() for p in self.parameters())
        return f"model={type(self.model).__name__}, parameters={count}"
