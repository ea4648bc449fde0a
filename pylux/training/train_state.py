"""Training state and single training steps, after Lux.jl's ``Training`` module.

A :class:`TrainState` keeps the parameters as ONE contiguous vector
(:func:`pylux.core.flatten`); ``train_state.ps`` is a tree of views into it.
Gradients come back as one flat vector too (viewed as a tree), so an optimizer
step is a few fused vector kernels however many leaves the model has.

In-place updates, stated plainly
--------------------------------
:func:`single_train_step` and :func:`apply_gradients` update the parameter
vector and the optimizer state *in place* by default (Lux's
``single_train_step!``), because copying every parameter on every step costs
memory bandwidth for nothing. The returned :class:`TrainState` shares those
buffers with the one passed in, and the one passed in is marked *superseded*:
reading its ``ps``, ``params`` or ``opt_state`` afterwards raises
:class:`StaleTrainStateError` instead of silently showing updated values.
Trees of views obtained *before* the step (``ps = ts.ps``) do see the new
values. Pass ``inplace=False`` to get fresh buffers and keep the old state
valid (checkpoint-style snapshots, comparisons).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..core import Unflatten, flatten, tree_check_structure, tree_leaves, tree_map
from .optimizers import AbstractOptimizer
from .torch_optimizer import TorchOptimizer

__all__ = ["TrainState", "StaleTrainStateError", "compute_gradients", "apply_gradients", "single_train_step"]

LossFn = Callable[[Any, Any, Any, Any], tuple]


class StaleTrainStateError(RuntimeError):
    """A TrainState whose buffers were advanced in place by a later step was used."""


class _Buffers:
    """The mutable storage several TrainStates may share: flat params, optimizer state, a version."""

    __slots__ = ("params", "opt_state", "ps", "version")

    def __init__(self, params: torch.Tensor, opt_state: dict, unflatten: Unflatten):
        self.params = params
        self.opt_state = opt_state
        self.ps = unflatten(params)
        self.version = 0


class TrainState:
    """Model, parameters, state, optimizer, optimizer state and step count.

    Args:
        model: the model passed to ``loss_fn`` (a pylux layer, or anything ``loss_fn`` understands).
        ps: parameter tree (nested dicts of floating tensors of one dtype and device).
            The TrainState copies it into its own flat vector; ``ps`` itself is not modified.
        st: state tree of the model.
        optimizer: a :class:`~pylux.training.AbstractOptimizer` (``Adam(1e-3)``, ...), or a
            ``torch.optim.Optimizer`` with one parameter group, which is wrapped in a
            :class:`~pylux.training.TorchOptimizer` (its parameters are replaced by this
            state's flat vector; schedulers built on it keep working).

    Attributes:
        model, st, optimizer: as given (``st`` is replaced by each step).
        step: number of optimizer updates applied (Python ``int``).
        params: the flat parameter vector; ``ps``: a tree of views into it.
        opt_state: the optimizer's state (dict of flat vectors).

    Raises:
        TypeError: ``optimizer`` is neither a pylux nor a torch optimizer; leaves of ``ps`` of different
            dtypes/devices, or not floating.
    """

    __slots__ = ("model", "st", "optimizer", "step", "unflatten", "_buffers", "_version")

    def __init__(self, model: Any, ps: Any, st: Any, optimizer: AbstractOptimizer):
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer = TorchOptimizer(optimizer)
        if not isinstance(optimizer, AbstractOptimizer):
            raise TypeError(f"TrainState: optimizer must be a pylux optimizer such as pylux.training.Adam(1e-3) "
                            f"or a torch.optim.Optimizer, got {type(optimizer).__name__}")
        try:
            vector, unflatten = flatten(ps)
        except TypeError as e:
            raise TypeError(f"TrainState: {e}") from None
        leaves = tree_leaves(ps)
        if leaves and not vector.is_floating_point():
            raise TypeError(f"TrainState: parameters must be floating tensors, got {vector.dtype}")
        if leaves and vector.untyped_storage().data_ptr() == leaves[0].untyped_storage().data_ptr():
            vector = vector.clone()  # ps already were views of one buffer: do not train someone else's memory
        vector = vector.detach()
        self._init(model, st, optimizer, 0, unflatten, _Buffers(vector, optimizer.init(vector), unflatten))

    def _init(self, model, st, optimizer, step, unflatten, buffers, version=None):
        self.model = model
        self.st = st
        self.optimizer = optimizer
        self.step = step
        self.unflatten = unflatten
        self._buffers = buffers
        self._version = buffers.version if version is None else version

    @classmethod
    def _from_parts(cls, model, st, optimizer, step, unflatten, buffers) -> "TrainState":
        obj = cls.__new__(cls)
        obj._init(model, st, optimizer, step, unflatten, buffers)
        return obj

    def _fresh_buffers(self, where: str) -> _Buffers:
        if self._version != self._buffers.version:
            raise StaleTrainStateError(
                f"{where}: this TrainState (step {self.step}) was superseded by an in-place update; its "
                "parameters now hold the values of a later step. Use the TrainState returned by "
                "single_train_step/apply_gradients, or pass inplace=False to keep earlier states valid.")
        return self._buffers

    @property
    def params(self) -> torch.Tensor:
        """The flat parameter vector (shared with later states when they update in place)."""
        return self._fresh_buffers("TrainState.params").params

    @property
    def ps(self) -> Any:
        """The parameter tree: views into :attr:`params`."""
        return self._fresh_buffers("TrainState.ps").ps

    @property
    def opt_state(self) -> dict:
        """The optimizer state: a dict of flat vectors."""
        return self._fresh_buffers("TrainState.opt_state").opt_state

    @property
    def is_stale(self) -> bool:
        """True once a later in-place step has advanced the buffers this state refers to."""
        return self._version != self._buffers.version

    def with_state(self, st: Any) -> "TrainState":
        """A TrainState sharing this one's parameters and optimizer state, with state ``st``."""
        buffers = self._fresh_buffers("TrainState.with_state")
        return TrainState._from_parts(self.model, st, self.optimizer, self.step, self.unflatten, buffers)

    def copy(self) -> "TrainState":
        """A TrainState with its own copies of the parameter vector and optimizer state."""
        buffers = self._fresh_buffers("TrainState.copy")
        new = _Buffers(buffers.params.clone(), {k: v.clone() for k, v in buffers.opt_state.items()},
                       self.unflatten)
        return TrainState._from_parts(self.model, self.st, self.optimizer, self.step, self.unflatten, new)

    def __repr__(self) -> str:
        stale = ", stale" if self.is_stale else ""
        return (f"TrainState(model={type(self.model).__name__}, parameters={self.unflatten.numel}, "
                f"optimizer={self.optimizer!r}, step={self.step}{stale})")


def _check_loss_output(out: Any, old_st: Any) -> tuple[torch.Tensor, Any, Any]:
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        got = f"a {type(out).__name__}" if not isinstance(out, (tuple, list)) else f"{len(out)} values"
        hint = " (return (loss, st, {}) for a loss without state or statistics)" \
            if isinstance(out, torch.Tensor) else ""
        raise TypeError(f"loss_fn must return (loss, st, stats) as in Lux's Training API, got {got}{hint}")
    loss, st, stats = out
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn: the loss must be a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn: the loss must be a scalar, got shape {tuple(loss.shape)}; "
                         "reduce it (e.g. .mean()) before returning it")
    if not loss.is_floating_point():
        raise TypeError(f"loss_fn: the loss must be a floating tensor, got {loss.dtype}")
    if isinstance(old_st, Mapping) and not isinstance(st, Mapping):
        raise TypeError(f"loss_fn: the returned state must be a dict like the one passed in, got "
                        f"{type(st).__name__}; return the state the model gave back")
    return loss.reshape(()), st, stats


def _detach(tree: Any) -> Any:
    return tree_map(lambda t: t.detach(), tree)


def compute_gradients(loss_fn: LossFn, data: Any, train_state: TrainState
                      ) -> tuple[Any, torch.Tensor, Any, TrainState]:
    r"""Gradient of ``loss_fn`` with respect to the parameters (Lux's ``Training.compute_gradients``).

    Calls ``loss, st, stats = loss_fn(model, ps, st, data)`` with a parameter tree
    whose leaves require grad, and computes :math:`\nabla_{ps}\,\text{loss}` in one
    reverse pass. Parameters the loss does not use get an exactly zero gradient.

    Args:
        loss_fn: ``(model, ps, st, data) -> (loss, st, stats)``; ``loss`` a scalar tensor.
            It must use the ``ps`` it is given (not ``train_state.ps``).
        data: passed through to ``loss_fn`` (e.g. an ``(x, y)`` batch).
        train_state: the current :class:`TrainState`; it is not modified.

    Returns:
        ``(grads, loss, stats, train_state)``: ``grads`` is a tree of views into one
        flat gradient vector (``pylux.flatten(grads)`` returns that vector without a
        copy); ``loss`` is the detached 0-d loss tensor (no host synchronisation);
        the new TrainState shares parameters with the old one and carries the new
        state. Tensors in ``st`` and ``stats`` are detached so that no autograd
        graph outlives the step.

    Raises:
        TypeError / ValueError: ``loss_fn`` returned something other than
            ``(scalar loss, st, stats)``, or a loss that does not depend on ``ps``.
    """
    buffers = train_state._fresh_buffers("compute_gradients")
    ps = train_state.unflatten(buffers.params.detach())
    leaves = tree_leaves(ps)
    for leaf in leaves:
        # Separate leaves (views of the flat vector) rather than one leaf vector viewed as a tree:
        # the backward of many slices of one vector would cost (number of leaves) x (vector length).
        leaf.requires_grad_(True)
    with torch.enable_grad():
        out = loss_fn(train_state.model, ps, train_state.st, data)
    loss, st, stats = _check_loss_output(out, train_state.st)
    if leaves:
        if not loss.requires_grad:
            raise ValueError(
                "loss_fn: the loss does not depend on the parameters (it carries no autograd graph). Compute it "
                "from the ps argument passed to loss_fn, not from train_state.ps, and not under torch.no_grad().")
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        flat_grad = torch.cat([g.reshape(-1) for g in grads])
    else:
        flat_grad = buffers.params.new_zeros(0)
    new_state = TrainState._from_parts(train_state.model, _detach(st), train_state.optimizer,
                                       train_state.step, train_state.unflatten, buffers)
    return train_state.unflatten(flat_grad), loss.detach(), _detach(stats), new_state


def _flat_gradient(grads: Any, train_state: TrainState) -> torch.Tensor:
    numel = train_state.unflatten.numel
    if isinstance(grads, torch.Tensor):
        if grads.dim() != 1 or grads.numel() != numel:
            raise ValueError(f"apply_gradients: a flat gradient must be a 1-D tensor of length {numel}, "
                             f"got shape {tuple(grads.shape)}")
        return grads
    tree_check_structure(train_state.ps, grads, "apply_gradients: grads")
    flat, _ = flatten(grads)
    return flat


def apply_gradients(train_state: TrainState, grads: Any, *, inplace: bool = True) -> TrainState:
    """One optimizer update with the given gradients (Lux's ``Training.apply_gradients``).

    Args:
        train_state: the current state.
        grads: a gradient tree of the structure of ``train_state.ps`` (as returned by
            :func:`compute_gradients`) or a flat gradient vector.
        inplace: update the parameter vector and optimizer state in place (default;
            ``train_state`` becomes stale, see the module docstring) or into new buffers.

    Returns:
        The TrainState after the update, ``step`` increased by one.

    Raises:
        TreeStructureError: ``grads`` lacks a key of ``ps``, has an extra one or a wrong shape.
        StaleTrainStateError: ``train_state`` was already superseded by an in-place step.
    """
    buffers = train_state._fresh_buffers("apply_gradients")
    flat_grad = _flat_gradient(grads, train_state)
    opt_state, params = train_state.optimizer.update(buffers.opt_state, flat_grad, buffers.params,
                                                     train_state.step, inplace=inplace)
    if inplace:
        buffers.opt_state = opt_state
        buffers.version += 1
        new_buffers = buffers
    else:
        new_buffers = _Buffers(params, opt_state, train_state.unflatten)
    return TrainState._from_parts(train_state.model, train_state.st, train_state.optimizer,
                                  train_state.step + 1, train_state.unflatten, new_buffers)


def single_train_step(loss_fn: LossFn, data: Any, train_state: TrainState, *, inplace: bool = True
                      ) -> tuple[Any, torch.Tensor, Any, TrainState]:
    """Gradients and one optimizer update (Lux's ``Training.single_train_step!``).

    Equivalent to :func:`compute_gradients` followed by :func:`apply_gradients`.

    Args:
        loss_fn: ``(model, ps, st, data) -> (loss, st, stats)``.
        data: the batch passed to ``loss_fn``.
        train_state: the current state.
        inplace: see :func:`apply_gradients`. With the default ``True`` the returned
            state shares the parameter buffer with ``train_state``, which becomes stale.

    Returns:
        ``(grads, loss, stats, train_state)``: gradients at the parameters *before*
        the update, the detached loss (0-d tensor, no host synchronisation), the
        statistics returned by ``loss_fn`` and the updated TrainState.
    """
    grads, loss, stats, train_state = compute_gradients(loss_fn, data, train_state)
    return grads, loss, stats, apply_gradients(train_state, grads, inplace=inplace)
