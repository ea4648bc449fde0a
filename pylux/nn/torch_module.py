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

    Args:
        module: the ``torch.nn.Module``; it is called as ``module(x)``.

    Raises:
        LayerError: missing or extra parameter/buffer names (named), or an
            input whose dtype/device differs from the parameters'.
    """

    def __init__(self, module: torch.nn.Module):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"TorchModule: expected a torch.nn.Module, got {type(module).__name__}")
        self.module = module
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
            y = functional_call(self.module, (dict(ps), buffers), (x,))
        finally:
            if switch:
                for m, mode in zip(modules, previous_modes):
                    m.training = mode
        return y, {"buffers": buffers, "training": training}

    def __repr__(self) -> str:
        inner = repr(self.module)
        if "\n" not in inner:
            return f"TorchModule({inner})"
        return "TorchModule(\n  " + inner.replace("\n", "\n  ") + "\n)"
