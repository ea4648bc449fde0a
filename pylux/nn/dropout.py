"""Dropout with its randomness carried in the state, as Lux.jl does.

The state holds an integer key. Each train-mode call derives two numbers from
it with the SplitMix64 generator (Steele, Lea & Flood, "Fast splittable
pseudorandom number generators", OOPSLA 2014): the seed of the mask and the
key of the next call. The same ``(ps, st)`` therefore always gives the same
mask, consecutive calls (threading the returned state) give different masks,
and nothing global is consumed. The key is a Python int so that deriving it
never reads a tensor back from the device.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..core import AbstractLayer, LayerError, check_generator
from ._common import check_floating, check_keys, check_tensor, check_training_flag

__all__ = ["Dropout"]

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def _splitmix64_mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def split_key(key: int) -> tuple[int, int]:
    """``(mask_seed, next_key)`` from ``key``: one SplitMix64 step."""
    next_key = (key + _GOLDEN_GAMMA) & _MASK64
    return _splitmix64_mix(next_key), next_key


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
        rng = check_generator(rng, "Dropout.init_state")
        # The only read-back of a tensor, once at setup; forward passes work on the int.
        key = int(torch.randint(0, 2**62, (1,), generator=rng, device=rng.device).cpu()[0])
        return {"rng": key, "training": True}

    def parameter_count(self) -> int:
        return 0

    def forward(self, x: Any, ps: Mapping, st: Mapping) -> tuple[torch.Tensor, Mapping]:
        x = check_floating(check_tensor(x))
        check_keys(ps, (), "parameter")
        check_keys(st, ("rng", "training"), "state")
        if not check_training_flag(st) or self.p == 0.0:
            return x, st
        key = st["rng"]
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= _MASK64:
            raise LayerError(f"state 'rng' must be an int key in [0, 2**64), got {key!r}; "
                             "re-create the state with pylux.setup")
        mask_seed, next_key = split_key(key)
        new_st = {**st, "rng": next_key}
        if self.p == 1.0:
            return x * 0, new_st
        generator = torch.Generator(device=x.device)
        generator.manual_seed(mask_seed)
        uniform = torch.rand(x.shape, generator=generator, device=x.device,
                             dtype=x.real.dtype if x.is_complex() else x.dtype)
        mask = (uniform >= self.p).to(x.dtype) * (1.0 / (1.0 - self.p))
        return x * mask, new_st

    def __repr__(self) -> str:
        return f"Dropout({self.p})"
