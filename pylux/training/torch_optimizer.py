"""A ``torch.optim`` optimizer driving a :class:`~pylux.training.TrainState`'s flat parameter vector.

``TrainState(model, ps, st, torch.optim.Adam(params, lr=1e-3))`` wraps the torch
optimizer in :class:`TorchOptimizer`. The optimizer's one parameter group is
re-pointed at the TrainState's flat vector for each update and its per-parameter
state (``exp_avg``, ``step``, ...) is handed back as the TrainState's
``opt_state``, so the functional contract of
:class:`~pylux.training.AbstractOptimizer` holds (``inplace=False`` keeps the old
state valid) while the update itself is torch's own code. The optimizer object is
kept: a learning-rate scheduler built on it (before or after) changes the
learning rate of the TrainState's updates.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .optimizers import AbstractOptimizer

__all__ = ["TorchOptimizer"]


class TorchOptimizer(AbstractOptimizer):
    r"""Any single-group ``torch.optim.Optimizer`` as a pylux optimizer over one flat vector.

    ``TorchOptimizer(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)`` builds the torch
    optimizer itself; ``TorchOptimizer(existing_optimizer)`` (what ``TrainState`` does
    with a ``torch.optim.Optimizer``) takes over an optimizer built elsewhere, e.g. on
    a :class:`~pylux.interop.StatefulLayer`'s parameters: its hyperparameters and
    learning-rate schedulers stay, its parameters are replaced by the TrainState's.

    Elementwise rules (SGD, Adam, AdamW, RMSprop, ...) give the same update on the
    flat vector as on the separate leaves, so training through a TrainState equals
    training a :class:`~pylux.interop.StatefulLayer` with the same optimizer.
    Rules that look at whole parameter tensors (LARS-style trust ratios, Adafactor's
    factored moments) would see one vector instead: use StatefulLayer for those.

    Attributes:
        torch_optimizer: the wrapped optimizer (build schedulers on it).

    Raises:
        TypeError: not a torch optimizer (class or instance); ``LBFGS`` (it needs a closure);
            hyperparameters passed together with an instance.
        ValueError: an optimizer with several parameter groups, or one that has already
            stepped (its state belongs to other parameters).
    """

    def __init__(self, optimizer: Any, **hyperparameters: Any):
        if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
            optimizer = optimizer([torch.zeros(1, requires_grad=True)], **hyperparameters)
        elif isinstance(optimizer, torch.optim.Optimizer):
            if hyperparameters:
                raise TypeError(f"TorchOptimizer: hyperparameters {sorted(hyperparameters)} given with an optimizer "
                                "instance; set them when building it, or pass its class")
        else:
            raise TypeError(f"TorchOptimizer: expected a torch.optim.Optimizer or its class, got "
                            f"{type(optimizer).__name__}")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError("TorchOptimizer: LBFGS re-evaluates the loss through a closure, which a train step "
                            "does not offer; use StatefulLayer with LBFGS, or scipy on pylux.flatten(ps)")
        if len(optimizer.param_groups) != 1:
            raise ValueError(f"TorchOptimizer: the optimizer has {len(optimizer.param_groups)} parameter groups; "
                             "a TrainState trains one flat vector with one set of hyperparameters. Use "
                             "StatefulLayer with the torch optimizer directly for per-group settings")
        if any(len(s) for s in optimizer.state.values()):
            raise ValueError("TorchOptimizer: the optimizer has already stepped; its state belongs to its own "
                             "parameters. Pass a freshly built optimizer")
        self.torch_optimizer = optimizer
        self._placeholder = optimizer.param_groups[0]["params"]

    @property
    def lr(self) -> float:  # type: ignore[override]
        """The current learning rate of the parameter group (schedulers change it)."""
        return self.torch_optimizer.param_groups[0]["lr"]

    def learning_rate(self, step: int) -> float:
        return self.lr

    def init(self, params: torch.Tensor) -> dict:
        """The empty state: torch optimizers create theirs on the first step."""
        self._check_vector(params, "params")
        return {}

    def update(self, opt_state: Mapping[str, Any], grad: torch.Tensor, params: torch.Tensor, step: int, *,
               inplace: bool = False) -> tuple[dict, torch.Tensor]:
        """One ``torch_optimizer.step()`` on ``params`` with gradient ``grad`` and state ``opt_state``."""
        self._check_vector(params, "params")
        self._check_vector(grad, "grad")
        if grad.shape != params.shape or grad.dtype != params.dtype or grad.device != params.device:
            raise ValueError(f"TorchOptimizer.update: grad must match params; got grad {tuple(grad.shape)} "
                             f"{grad.dtype} on {grad.device} and params {tuple(params.shape)} {params.dtype} on "
                             f"{params.device}")
        state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt_state.items()} \
            if not inplace else dict(opt_state)
        if not inplace:
            params = params.clone()
        optimizer, group = self.torch_optimizer, self.torch_optimizer.param_groups[0]
        group["params"] = [params]
        optimizer.state.clear()
        if state:
            optimizer.state[params] = state
        params.grad = grad
        try:
            with torch.no_grad():
                optimizer.step()
            new_state = dict(optimizer.state.get(params, {}))
        finally:
            # the optimizer keeps no reference to the vector between updates
            params.grad = None
            optimizer.state.clear()
            group["params"] = self._placeholder
        return new_state, params

    def _update_(self, state, grad, params, t, lr):  # pragma: no cover - update() is overridden
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        group = self.torch_optimizer.param_groups[0]
        return {"type": type(self.torch_optimizer).__name__,
                **{k: v for k, v in group.items() if k != "params"}}

    def __repr__(self) -> str:
        group = self.torch_optimizer.param_groups[0]
        return f"TorchOptimizer({type(self.torch_optimizer).__name__}, lr={group['lr']!r})"
