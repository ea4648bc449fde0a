"""Dropout with its randomness carried in the state, as Lux.jl does.

The state holds an integer key (:mod:`pylux.core.random`). Each train-mode call
derives two numbers from it with the SplitMix64 generator (Steele, Lea &
Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014): the
seed of the mask and the key of the next call. The same ``(ps, st)``
therefore always gives the same mask, consecutive calls (threading the
returned state) give different masks, and nothing global is consumed. The key
is a Python int so that deriving it never reads a tensor back from the device.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..core import AbstractLayer, draw_key, key_generator
from ._common import check_floating, check_keys, check_tensor, check_training_flag

__all__ = ["Dropout"]


class Dropout(AbstractLayer):
    r"""Inverted dropout (Srivastava et al., JMLR 2014).

    In train mode :math:`y = x \odot m / (1-p)` with
    :math:`m_i \sim \text{Bernoulli}(1-p)` i.i.d., so :math:`E[y] = x`; in
    test mode :math:`y = x`. ``p = 1`` gives zeros.

    Args:
        p: drop probability in ``[0, 1]``.

    Parameters ``ps``: ``{}``.

    State ``st``: ``rng`` (int key, drawn from the setup generator; advanced
    in each train-mode call and returned in the new state), ``training``
    (bool, ``True`` after setup).

    Not usable inside ``torch.func.vmap`` in train mode unless vmap is told how
    to treat randomness (torch refuses random ops there by default).
    """

    def __init__(self, p: float):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)

    def init_state(self, rng: torch.Generator) -> dict:
        # The only read-back of a tensor, once at setup; forward passes work on the int.
        return {"rng": draw_key(rng, "Dropout.init_state"), "training": True}

    def parameter_count(self) -> int:
        return 0

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[torch.Tensor, Mapping]:
        x = check_floating(check_tensor(x))
        check_keys(ps, (), "parameter")
        check_keys(st, ("rng", "training"), "state")
        if not check_training_flag(st) or self.p == 0.0:
            return x, st
        generator, next_key = key_generator(st["rng"], x.device)
        new_st = {**st, "rng": next_key}
        if self.p == 1.0:
            return x * 0, new_st
        uniform = torch.rand(x.shape, generator=generator, device=x.device,
                             dtype=x.real.dtype if x.is_complex() else x.dtype)
        mask = (uniform >= self.p).to(x.dtype) * (1.0 / (1.0 - self.p))
        return x * mask, new_st

    def __repr__(self) -> str:
        return f"Dropout({self.p})"
