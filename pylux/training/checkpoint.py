"""Checkpoints of a :class:`TrainState`: parameters, state, optimizer state and step.

The file is written with ``torch.save`` and read with
``torch.load(..., weights_only=True)``, so it may hold only tensors, numbers,
strings, booleans, ``None`` and dicts/lists/tuples of them: loading a checkpoint
never runs code from the file.

The records pylux itself puts in a model state are stored in that plain form
and rebuilt on load: a named tuple defined in pylux (a DEQ layer's
``DEQSolution``), a pylux return-code enum (``NonlinearReturnCode.Success``) and
a pylux dict subclass (a solve's ``BackwardStats``) become tagged dicts
``{"__pylux_type__": kind, "class": "module:QualName", ...}``; loading resolves
the class only inside the ``pylux`` package and checks that it is of the tagged
kind. Other objects (a user's class kept in the state, say) are rejected when
*saving*, with their path in the tree.
"""

from __future__ import annotations

import collections
import enum
import importlib
import os
import pickle
from typing import Any

import torch

from ..core import tree_check_structure, tree_map, tree_map_with_path
from .optimizers import AbstractOptimizer
from .train_state import TrainState, _Buffers

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]

_FORMAT = "pylux.checkpoint"
#: version 2 stores pylux's named tuples, enums and dict subclasses as tagged dicts.
_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_PLAIN_LEAVES = (torch.Tensor, bool, int, float, complex, str, bytes, type(None))
_PLAIN_MAPPINGS = (dict, collections.OrderedDict)
_TAG = "__pylux_type__"
_KINDS = ("namedtuple", "enum", "mapping")


class CheckpointError(ValueError):
    """A checkpoint file cannot be written or does not fit the model/optimizer it is loaded into."""


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _pylux_kind(x: Any) -> str | None:
    """The tag kind of a pylux record that the checkpoint stores in plain form, or ``None``."""
    module = type(x).__module__
    if module != "pylux" and not module.startswith("pylux."):
        return None
    if isinstance(x, tuple) and hasattr(type(x), "_fields"):
        return "namedtuple"
    if isinstance(x, enum.Enum):
        return "enum"
    if isinstance(x, dict) and type(x) not in _PLAIN_MAPPINGS:
        return "mapping"
    return None


def _encode(tree: Any) -> Any:
    """``tree`` with pylux's named tuples, enums and dict subclasses replaced by tagged plain dicts."""
    def is_record(path, node):
        return _pylux_kind(node) is not None

    def encode(path, node):
        kind = _pylux_kind(node)
        if kind == "namedtuple":
            fields = {name: _encode(value) for name, value in zip(node._fields, node)}
            return {_TAG: kind, "class": _class_name(type(node)), "fields": fields}
        if kind == "enum":
            return {_TAG: kind, "class": _class_name(type(node)), "name": node.name}
        if kind == "mapping":
            return {_TAG: kind, "class": _class_name(type(node)), "items": _encode(dict(node))}
        return node

    return tree_map_with_path(encode, tree, is_leaf=is_record, where="save_checkpoint")


def _resolve(name: Any, kind: str, where: str) -> type:
    """The pylux class ``"module:QualName"`` of a tagged record, checked to be of ``kind``."""
    module_name, _, qualname = str(name).partition(":")
    if not (module_name == "pylux" or module_name.startswith("pylux.")) or not qualname:
        raise CheckpointError(f"load_checkpoint: {where} names class {name!r}; only pylux's own records are "
                              "rebuilt from a checkpoint")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise CheckpointError(f"load_checkpoint: {where} names class {name!r}, which this pylux does not "
                              "have") from None
    expected = {"namedtuple": lambda c: issubclass(c, tuple) and hasattr(c, "_fields"),
                "enum": lambda c: issubclass(c, enum.Enum),
                "mapping": lambda c: issubclass(c, dict)}[kind]
    if not isinstance(obj, type) or not expected(obj):
        raise CheckpointError(f"load_checkpoint: {where} names {name!r}, which is not a {kind}")
    return obj


def _is_tagged(node: Any) -> bool:
    return type(node) is dict and node.get(_TAG) in _KINDS


def _decode(tree: Any) -> Any:
    """Inverse of :func:`_encode`: tagged dicts rebuilt into their pylux classes."""
    def decode(path, node):
        if not _is_tagged(node):
            return node
        where = "st." + ".".join(str(p) for p in path) if path else "st"
        kind = node[_TAG]
        cls = _resolve(node.get("class"), kind, where)
        try:
            if kind == "namedtuple":
                fields = _decode(node["fields"])
                return cls(**fields)
            if kind == "enum":
                return cls[node["name"]]
            return cls(_decode(node["items"]))
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"load_checkpoint: the {kind} {node.get('class')!r} at {where} does not fit this "
                                  f"pylux's class ({type(e).__name__}: {e})") from None

    return tree_map_with_path(decode, tree, is_leaf=lambda path, node: _is_tagged(node), where="load_checkpoint")


def _check_plain(tree: Any, path: str) -> None:
    if type(tree) in _PLAIN_MAPPINGS:
        for key, value in tree.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"save_checkpoint: key {key!r} at {path} is a {type(key).__name__}; "
                                      "checkpoint trees may only have str or int keys")
            _check_plain(value, f"{path}.{key}")
    elif type(tree) in (list, tuple):
        for i, value in enumerate(tree):
            _check_plain(value, f"{path}[{i}]")
    elif not isinstance(tree, _PLAIN_LEAVES):
        raise CheckpointError(
            f"save_checkpoint: {path} is a {type(tree).__name__}; a checkpoint (loaded with weights_only=True) "
            "may hold only tensors, numbers, strings, None, dicts/lists/tuples of them and pylux's own records "
            "(named tuples, return codes). Keep such objects out of the model state or convert them before "
            "saving.")


def save_checkpoint(path: str | os.PathLike, train_state: TrainState) -> None:
    """Write ``train_state`` (ps, st, optimizer state, step) to ``path`` with ``torch.save``.

    The parameters are stored as a tree (views of the flat vector share one
    storage in the file). The write goes to a temporary file first and is then
    renamed, so an interrupted save never leaves a truncated checkpoint behind.

    The state may hold pylux's own records (a DEQ layer's ``DEQSolution`` with
    its return codes, a solve's ``BackwardStats``): they are stored as tagged
    plain dicts and rebuilt by :func:`load_checkpoint`. Tensors are stored
    detached (the training step already detaches the state).

    Raises:
        CheckpointError: the state holds an object that ``weights_only`` loading cannot read.
        StaleTrainStateError: ``train_state`` was superseded by an in-place step.
    """
    if not isinstance(train_state, TrainState):
        raise TypeError(f"save_checkpoint: expected a TrainState, got {type(train_state).__name__}")
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "ps": train_state.ps,
        "st": tree_map(lambda t: t.detach(), _encode(train_state.st)),
        "optimizer": type(train_state.optimizer).__name__,
        "opt_state": train_state.opt_state,
        "step": int(train_state.step),
    }
    _check_plain(payload["st"], "st")
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | os.PathLike, model: Any, optimizer: AbstractOptimizer, *,
                    map_location: Any = None, ps_reference: Any = None) -> TrainState:
    """Rebuild a :class:`TrainState` from a file written by :func:`save_checkpoint`.

    Reads with ``torch.load(path, weights_only=True)``. The parameter tree is
    checked against ``ps_reference`` or, by default, against
    ``model.init_params`` (keys and shapes), and the optimizer state against
    ``optimizer.init`` — a checkpoint of another model or optimizer is refused
    with the first mismatching key.

    Args:
        path: the checkpoint file.
        model: the model the parameters belong to.
        optimizer: the optimizer to continue with (its hyperparameters may differ
            from the saved one's, e.g. a smaller learning rate for fine-tuning;
            its type and state layout may not).
        map_location: passed to ``torch.load`` (e.g. ``"cpu"``).
        ps_reference: a parameter tree to check against instead of a fresh ``model.init_params``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: not a pylux checkpoint, an unreadable (non weights-only) file,
            or a mismatch with the model or optimizer.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {path!r}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"load_checkpoint: {path!r} holds objects that weights_only loading refuses to unpickle (only "
            f"tensors and plain containers are allowed); it was not written by save_checkpoint. Detail: {e}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"load_checkpoint: {path!r} is not a pylux checkpoint (no format tag {_FORMAT!r})")
    if payload.get("version") not in _READABLE_VERSIONS:
        raise CheckpointError(f"load_checkpoint: {path!r} has checkpoint version {payload.get('version')!r}; "
                              f"this pylux reads versions {', '.join(map(str, _READABLE_VERSIONS))}")
    if not isinstance(optimizer, AbstractOptimizer):
        raise TypeError(f"load_checkpoint: optimizer must be a pylux optimizer, got {type(optimizer).__name__}")
    if payload["optimizer"] != type(optimizer).__name__:
        raise CheckpointError(f"load_checkpoint: {path!r} was saved with a {payload['optimizer']} optimizer, "
                              f"got a {type(optimizer).__name__}; their states do not match")
    ps = payload["ps"]
    if ps_reference is None:
        if not hasattr(model, "init_params"):
            raise CheckpointError("load_checkpoint: the model has no init_params to check the parameters "
                                  "against; pass ps_reference")
        ps_reference = model.init_params(torch.Generator().manual_seed(0))
    try:
        tree_check_structure(ps_reference, ps, "checkpoint ps")
    except ValueError as e:
        raise CheckpointError(f"load_checkpoint: {path!r} does not fit the model: {e}") from None
    st = _decode(payload["st"]) if payload["version"] >= 2 else payload["st"]
    train_state = TrainState(model, ps, st, optimizer)
    expected = optimizer.init(train_state.params)
    opt_state = payload["opt_state"]
    try:
        tree_check_structure(expected, opt_state, "checkpoint opt_state")
    except ValueError as e:
        raise CheckpointError(f"load_checkpoint: {path!r} does not fit {optimizer!r}: {e}") from None
    params = train_state.params
    opt_state = tree_map(lambda saved: saved.to(device=params.device, dtype=params.dtype), opt_state)
    buffers = _Buffers(params, dict(opt_state), train_state.unflatten)
    return TrainState._from_parts(model, st, optimizer, int(payload["step"]), train_state.unflatten, buffers)
