"""Any ``torch.nn.Module`` as a pylux layer, through ``torch.func.functional_call``."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.func import functional_call

from ..core import AbstractLayer, LayerError
from ._common import check_keys, check_training_flag

__all__ = ["TorchModule"]


class TorchModule(AbstractLayer):
    r"""Wrap a ``torch.nn.Module`` so that its parameters and buffers live in ``ps`` / ``st``.

    :math:`y = \text{module}(x; \theta=\text{ps}, \text{buffers}=\text{st["buffers"]})`,
    evaluated with ``torch.func.functional_call``: output and gradients are
    those of the module itself, but with the tensors given in the trees.

    Parameters ``ps``: a flat dict ``{name: tensor}`` keyed by
    ``module.named_parameters()`` (dotted names such as ``"0.weight"``),
    initialised as copies of the module's current values at setup (the
    generator is not used, so the module's own initialisation is kept).

    State ``st``: ``{"buffers": {name: tensor}, "training": bool}``; buffers
    are copies of ``module.named_buffers()``, ``training`` is ``True`` after
    setup. The module runs in train or eval mode as ``st["training"]`` says
    (its modes are restored afterwards). In train mode the buffers are copied
    before the call, so in-place updates the module makes (e.g. BatchNorm
    running statistics) land in the new state and never in the old one or in
    the module.

    Training updates ``ps``, not the module: the wrapped module keeps the
    values it had at setup (its parameters are only read for shapes and
    initial values). :meth:`to_module` copies trained values back into it, for
    saving or for plain torch code that uses the module afterwards.

    A torchdiffeq-style vector field ``forward(t, y)`` is wrapped with
    ``time_arg=True``: the layer then takes the pair ``(y, t)`` that
    ``NeuralODE(..., time_input=True)`` passes to its model, and calls
    ``module(t, y)``.

    Args:
        module: the ``torch.nn.Module``; it is called as ``module(x)``, or as
            ``module(t, y)`` for the input ``(y, t)`` when ``time_arg=True``.
        time_arg: whether the module takes time first, ``forward(t, y)``.

    Raises:
        LayerError: missing or extra parameter/buffer names (named), an
            input whose dtype/device differs from the parameters', or (with
            ``time_arg=True``) an input that is not a pair ``(y, t)``.
    """

    def __init__(self, module: torch.nn.Module, *, time_arg: bool = False):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"TorchModule: expected a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(time_arg, bool):
            raise TypeError(f"TorchModule: time_arg must be True or False, got {time_arg!r}")
        self.module = module
        self.time_arg = time_arg
        self._param_names = tuple(name for name, _ in module.named_parameters())
        self._buffer_names = tuple(name for name, _ in module.named_buffers())

    def init_params(self, rng: torch.Generator) -> dict:
        return {name: p.detach().clone() for name, p in self.module.named_parameters()}

    def init_state(self, rng: torch.Generator) -> dict:
        return {"buffers": {name: b.detach().clone() for name, b in self.module.named_buffers()},
                "training": True}

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[Any, dict]:
        check_keys(ps, self._param_names, "parameter")
        check_keys(st, ("buffers", "training"), "state")
        check_keys(st["buffers"], self._buffer_names, "buffer")
        training = check_training_flag(st)
        if self.time_arg:
            if not isinstance(x, (tuple, list)) or len(x) != 2:
                raise LayerError(f"with time_arg=True the input must be the pair (y, t) that NeuralODE(..., "
                                 f"time_input=True) passes, got {type(x).__name__}")
            x, t = x
            args = (t, x)
        else:
            args = (x,)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and self._param_names:
            reference = ps[self._param_names[0]]
            if isinstance(reference, torch.Tensor) and reference.is_floating_point():
                if x.dtype != reference.dtype:
                    raise LayerError(
                        f"input dtype {x.dtype} does not match parameter {self._param_names[0]!r} dtype "
                        f"{reference.dtype}; cast the input with x.to({reference.dtype}) or set up the "
                        f"parameters with setup(rng, model, dtype={x.dtype})")
                if x.device != reference.device:
                    raise LayerError(f"input is on device {x.device} but parameter {self._param_names[0]!r} "
                                     f"is on {reference.device}")
        buffers = dict(st["buffers"])
        if training:
            buffers = {name: b.clone() for name, b in buffers.items()}
        modules = list(self.module.modules())
        previous_modes = [m.training for m in modules]
        switch = any(mode != training for mode in previous_modes)
        if switch:
            self.module.train(training)
        try:
            y = functional_call(self.module, (dict(ps), buffers), args)
        finally:
            if switch:
                for m, mode in zip(modules, previous_modes):
                    m.training = mode
        return y, {"buffers": buffers, "training": training}

    def to_module(self, ps: Mapping, st: Mapping | None = None) -> torch.nn.Module:
        """Copy ``ps`` (and the buffers of ``st``, if given) into the wrapped module, in place.

        The module's parameters keep their identity, dtype and device (values
        are cast on copy), so an optimizer or a ``state_dict`` that refers to
        them sees the trained values. Returns the module.

        Raises:
            LayerError: ``ps`` (or ``st["buffers"]``) lacks a name of the module or has an extra one,
                or a shape differs (named).
        """
        check_keys(ps, self._param_names, "parameter")
        targets = [(dict(self.module.named_parameters()), ps, "parameter")]
        if st is not None:
            check_keys(st, ("buffers", "training"), "state")
            check_keys(st["buffers"], self._buffer_names, "buffer")
            targets.append((dict(self.module.named_buffers()), st["buffers"], "buffer"))
        for own, given, kind in targets:
            for name, tensor in own.items():
                if tuple(given[name].shape) != tuple(tensor.shape):
                    raise LayerError(f"to_module: {kind} {name!r} has shape {tuple(given[name].shape)}, the "
                                     f"module's has {tuple(tensor.shape)}")
        with torch.no_grad():
            for own, given, _ in targets:
                for name, tensor in own.items():
                    tensor.copy_(given[name])
        return self.module

    def __repr__(self) -> str:
        inner = repr(self.module)
        if "\n" not in inner:
            return f"TorchModule({inner})"
        return "TorchModule(\n  " + inner.replace("\n", "\n  ") + "\n)"
