"""Norms for the adaptive step-size control.

The adaptive loop measures a step by the norm of the *scaled* error::

    E = || err / (abstol + reltol * max(|u|, |u_new|)) ||

(Hairer, Nørsett & Wanner, *Solving ODEs I*, II.4, eq. 4.11) and accepts the step
when ``E <= 1``. A norm here is any callable ``norm(x) -> 0-d tensor``.

* :func:`rms_norm` (default): ``sqrt(mean(x^2))``, Hairer's norm. It does not
  change when independent equations are added, so a batch of ``B`` copies of a
  problem steps like one copy.
* :func:`max_norm`: ``max |x_i|``.
* :class:`SemiNorm`: the RMS norm over the entries selected by a boolean mask;
  the others are ignored by the step-size control (Kidger, Chen & Lyons,
  "Hey, that's not an ODE: faster ODE adjoints via seminorms", ICML 2021).
"""

from __future__ import annotations

import math

import torch

__all__ = ["rms_norm", "max_norm", "SemiNorm", "scaled_error_norm", "ScaledErrorNorm"]


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Root-mean-square norm ``sqrt(sum(x_i^2) / n)``; 0 for an empty tensor.

    A non-finite entry makes the result non-finite, which the adaptive loop
    reads as a failed step.
    """
    n = x.numel()
    if n == 0:
        return x.new_zeros(())
    return torch.linalg.vector_norm(x) * (1.0 / math.sqrt(n))


def max_norm(x: torch.Tensor) -> torch.Tensor:
    """Infinity norm ``max_i |x_i|``; 0 for an empty tensor."""
    if x.numel() == 0:
        return x.new_zeros(())
    return torch.linalg.vector_norm(x, ord=float("inf"))


class SemiNorm:
    """RMS norm over ``x[mask]``: entries where ``mask`` is False do not control the step.

    Kidger, Chen & Lyons (ICML 2021) show that the adjoint of a neural ODE may
    ignore the parameter-gradient channels of its augmented state in the error
    control, which cuts the number of backward steps substantially.

    Args:
        mask: a boolean tensor broadcastable to the state (for a flat augmented
            state: a 1-D mask of the same length). ``True`` = measured.

    The masked-out entries still cannot hide a NaN or Inf: if any entry of ``x``
    is not finite the result is NaN, so a blow-up in an ignored channel is
    rejected like any other (cost: one extra reduction over ``x``).
    """

    def __init__(self, mask: torch.Tensor) -> None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"SemiNorm(mask): mask must be a boolean tensor, got "
                f"{type(mask).__name__ if not isinstance(mask, torch.Tensor) else mask.dtype}")
        self.mask = mask
        self._count = int(mask.sum())
        # by value: a backward pass with the seminorm builds its own, and a compiled loop is cached per norm
        self._key = (tuple(mask.shape), mask.detach().cpu().numpy().tobytes())

    def __eq__(self, other) -> bool:
        return isinstance(other, SemiNorm) and self._key == other._key

    def __hash__(self) -> int:
        return hash((SemiNorm, self._key))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.new_zeros(())
        try:
            selected = torch.where(self.mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        except RuntimeError as err:
            raise ValueError(
                f"SemiNorm: mask of shape {tuple(self.mask.shape)} does not broadcast to the state "
                f"of shape {tuple(x.shape)}; build the mask with the state's shape") from err
        count = self._count * (selected.numel() // max(self.mask.numel(), 1))
        value = torch.linalg.vector_norm(selected) * (1.0 / math.sqrt(max(count, 1)))
        # 0 * (sum of all entries) is 0 when every entry is finite and NaN otherwise.
        return value + 0.0 * x.sum()

    def __repr__(self) -> str:
        return f"SemiNorm(measured={self._count} of {self.mask.numel()})"


class MixedNorm:
    """The largest RMS norm over contiguous groups of a flat state: ``max_g RMS(x_g)``.

    For an augmented state ``[z, a_z, a_θ]`` (an adjoint's backward solve) each
    group is held to the requested tolerance on its own, so thousands of
    easy parameter-adjoint entries cannot dilute the error of the few state
    entries (which one RMS over the whole vector would allow); this is the norm
    torchdiffeq applies to a tuple state, against which Kidger, Chen & Lyons
    (ICML 2021) measured their seminorm. Groups whose ``measured`` flag is
    False do not control the step (the seminorm); a NaN or Inf in any entry
    still makes the result NaN.

    Args:
        sizes: lengths of the consecutive groups (their sum is the state's size).
        measured: one bool per group (default: all True).
    """

    def __init__(self, sizes, measured=None) -> None:
        sizes = [int(n) for n in sizes]
        measured = [True] * len(sizes) if measured is None else [bool(m) for m in measured]
        if len(measured) != len(sizes) or any(n < 0 for n in sizes) or not any(
                m and n > 0 for m, n in zip(measured, sizes)):
            raise ValueError(f"MixedNorm: need non-negative group sizes, one flag per group and at least "
                             f"one measured non-empty group, got sizes={sizes}, measured={measured}")
        self.sizes = sizes
        self.measured = measured
        self._all_measured = all(measured)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)
        if flat.numel() != sum(self.sizes):
            raise ValueError(f"MixedNorm: the state has {flat.numel()} entries but the groups {self.sizes} "
                             f"add up to {sum(self.sizes)}")
        norms = [rms_norm(group) for group, n, m in zip(flat.split(self.sizes), self.sizes, self.measured)
                 if m and n > 0]
        value = torch.stack(norms).max() if len(norms) > 1 else norms[0]
        # unmeasured groups still turn a NaN/Inf into NaN (0 * sum is 0 only when all entries are finite)
        return value if self._all_measured else value + 0.0 * flat.sum()

    def __eq__(self, other) -> bool:
        return isinstance(other, MixedNorm) and (self.sizes, self.measured) == (other.sizes, other.measured)

    def __hash__(self) -> int:
        # by value: each backward pass builds its own, and a compiled loop is cached per norm
        return hash((MixedNorm, tuple(self.sizes), tuple(self.measured)))

    def __repr__(self) -> str:
        groups = ", ".join(f"{n}{'' if m else ' (unmeasured)'}" for n, m in zip(self.sizes, self.measured))
        return f"MixedNorm([{groups}])"


def scaled_error_norm(error: torch.Tensor, u: torch.Tensor, u_new: torch.Tensor,
                      abstol, reltol, norm) -> torch.Tensor:
    """``norm(error / (abstol + reltol * max(|u|, |u_new|)))`` as a 0-d tensor.

    Stays on the device and in the autograd graph (the error-estimate
    regularizer differentiates through it). ``abstol`` may be a float or a
    tensor broadcastable to ``u``; ``reltol`` a float or a 0-d tensor (a compiled graph's input).
    """
    scale = torch.maximum(u.abs(), u_new.abs())
    scale = scale.mul_(reltol).add_(abstol) if not scale.requires_grad else scale * reltol + abstol
    return norm(error / scale)


class ScaledErrorNorm:
    """:func:`scaled_error_norm` of a trial step for the adaptive loop, without temporaries when it can.

    ``ScaledErrorNorm(...)(result, u)`` takes a step's ``StepResult``. When no
    gradient of ``E`` is needed (``differentiable=False``, or autograd is off,
    or the state does not require grad) it computes

        E = norm(err / (abstol/reltol + max(|u|, |u_new|))) / reltol

    (the same value, one pass fewer) in reusable workspace buffers under
    ``torch.no_grad()``, writes the error estimate itself into a workspace, and
    reuses ``|u|`` from the previous step (``|u_new|`` of an accepted step is
    ``|u|`` of the next). Fresh state-sized allocations cost page faults on
    CPU, so this avoids five per step (at the price of four state-sized
    buffers held for the solve). Otherwise it falls back to the
    differentiable :func:`scaled_error_norm`.
    """

    def __init__(self, abstol, reltol: float, norm, differentiable: bool) -> None:
        self.abstol = abstol
        self.reltol = reltol
        self.norm = norm
        self.differentiable = differentiable
        self.offset = abstol / reltol
        self._abs_u = self._abs_new = self._work = self._error = None
        self._abs_u_of = self._abs_new_of = None

    def of_states(self, result, u: torch.Tensor, u_new: torch.Tensor) -> torch.Tensor:
        """``E`` of ``result``'s error estimate scaled by the states ``u`` and ``u_new`` given here
        (a step whose error belongs to other states than the loop's, as the reversible pair's)."""
        return self(result, u, u_new)

    def __call__(self, result, u: torch.Tensor, u_new: torch.Tensor | None = None) -> torch.Tensor:
        if u_new is None:
            u_new = result.u_new
        if self.differentiable and torch.is_grad_enabled() and (u.requires_grad or u_new.requires_grad):
            return scaled_error_norm(result.error_estimate, u, u_new, self.abstol, self.reltol, self.norm)
        with torch.no_grad():
            work = self._work
            if work is None or work.shape != u.shape or work.dtype != u.dtype or work.device != u.device:
                self._abs_u, self._abs_new, self._error, work = (torch.empty_like(u) for _ in range(4))
                self._work = work
                self._abs_u_of = self._abs_new_of = None
            if u is self._abs_new_of:  # the last trial step was accepted
                self._abs_u, self._abs_new = self._abs_new, self._abs_u
                self._abs_u_of, self._abs_new_of = self._abs_new_of, None
            if u is not self._abs_u_of:
                torch.abs(u, out=self._abs_u)
                self._abs_u_of = u
            torch.abs(u_new, out=self._abs_new)
            self._abs_new_of = u_new
            scale = torch.maximum(self._abs_u, self._abs_new, out=work)
            scale.add_(self.offset)
            error = result.compute_error_estimate(self._error)
            ratio = torch.div(error, scale, out=work)
            return self.norm(ratio) * (1.0 / self.reltol)
