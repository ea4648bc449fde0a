"""Random keys carried in the state, as Lux.jl does.

A layer that draws random numbers (Dropout's masks, a DEQ's Hutchinson
probes, a neural ODE's sampled regularization time) keeps an integer key in
its state. Each call derives two numbers from it with one step of the
SplitMix64 generator (Steele, Lea & Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014): the seed of this call's
``torch.Generator`` and the key of the next call. The same ``(ps, st)``
therefore always gives the same numbers, consecutive calls (threading the
returned state) give different ones, and nothing global is consumed. The key
is a Python int so that deriving it never reads a tensor back from the device;
the only read-back is :func:`draw_key`, once, at setup.
"""

from __future__ import annotations

from typing import Any

import torch

from .layer import LayerError, check_generator

__all__ = ["KEY_BOUND", "draw_key", "split_key", "check_key", "key_generator"]

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
#: keys are ints in ``[0, KEY_BOUND)``.
KEY_BOUND = 1 << 64


def _splitmix64_mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def split_key(key: int) -> tuple[int, int]:
    """``(seed, next_key)`` from ``key``: one SplitMix64 step (pure integer arithmetic)."""
    next_key = (key + _GOLDEN_GAMMA) & _MASK64
    return _splitmix64_mix(next_key), next_key


def draw_key(rng: torch.Generator, where: str = "init_state") -> int:
    """A fresh key in ``[0, 2**62)`` drawn from the setup generator ``rng`` (one read-back of a tensor).

    Raises:
        TypeError: ``rng`` is not a ``torch.Generator``.
    """
    rng = check_generator(rng, where)
    return int(torch.randint(0, 2 ** 62, (1,), generator=rng, device=rng.device).cpu()[0])


def check_key(key: Any) -> int:
    """``key`` if it is an int key in ``[0, 2**64)``.

    Raises:
        LayerError: anything else (``bool`` included), with what to do.
    """
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < KEY_BOUND:
        raise LayerError(f"state 'rng' must be an int key in [0, 2**64), got {key!r}; "
                         "re-create the state with pylux.setup")
    return key


def key_generator(key: int, device: torch.device | str | None = None) -> tuple[torch.Generator, int]:
    """This call's ``torch.Generator`` on ``device``, seeded from ``key``, and the key of the next call."""
    seed, next_key = split_key(check_key(key))
    generator = torch.Generator(device=device if device is not None else "cpu")
    generator.manual_seed(seed)
    return generator, next_key
