r"""The nested-jvp fallback of Taylor mode, for layers and functions without a rule.

For :math:`h(t) = f(x^1(t), x^2(t), \dots)` along the inputs' polynomial curves
:math:`x^i(t) = \sum_j x^i_j t^j`, ``torch.func.jvp`` nested :math:`K` times in
:math:`t` gives :math:`[h(0), h'(0), \dots, h^{(K)}(0)]`, and so the normalised
coefficients :math:`h_k = h^{(k)}(0)/k!`. It is exact but each level doubles
the work: :math:`2^K` evaluations of :math:`f` instead of the rules'
:math:`O(K^2)`, so a :class:`TaylorFallbackWarning` says when it is used and
``strict=True`` refuses it (:class:`~pylux.regularize.taylor_series.TaylorRuleError`).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch

from .taylor_series import TaylorRuleError, TaylorSeries, _is_series

__all__ = ["TaylorFallbackWarning", "nested_jvp_series", "call_with_fallback", "rule_error_reason"]


class TaylorFallbackWarning(UserWarning):
    """A layer or function had no Taylor-mode rule and was differentiated by nested jvp (cost 2^K)."""


def _curve_derivatives(fn: Callable[..., torch.Tensor], curves: Sequence[Sequence[torch.Tensor]],
                       depth: int) -> list[torch.Tensor]:
    r""":math:`[h(0), h'(0), \dots, h^{(\mathrm{depth})}(0)]` for :math:`h(t) = fn(x^1(t), x^2(t), \dots)`.

    Each :math:`x^i(t) = \sum_j x^i_j t^j` is a polynomial given by its
    coefficients. ``torch.func.jvp`` nested ``depth`` times, each level
    doubling the work: :math:`2^{\mathrm{depth}}` evaluations of ``fn``.
    """
    reference = curves[0][0]
    t0 = torch.zeros((), dtype=reference.dtype, device=reference.device)

    def at(t):
        values = []
        for coeffs in curves:
            acc = coeffs[-1]
            for c in reversed(coeffs[:-1]):
                acc = acc * t + c
            values.append(acc)
        return (fn(*values),)

    nested = at
    for _ in range(depth):
        nested = _extend_by_jvp(nested)
    return list(nested(t0))


def _extend_by_jvp(fn):
    def extended(t):
        primals, tangents = torch.func.jvp(fn, (t,), (torch.ones_like(t),))
        return (*primals, tangents[-1])
    return extended


def nested_jvp_series(fn: Callable[..., torch.Tensor], inputs: Sequence[TaylorSeries], name: str,
                      strict: bool) -> TaylorSeries:
    """Series of ``fn(*inputs)`` by nested jvp along the inputs' polynomial curves (cost 2^K).

    Args:
        fn: a function of tensors, one per input series.
        inputs: the input series; the output has the lowest of their orders and
            grows on demand like any series (each growth re-runs the nested jvp).
        name: what ``fn`` is, for the warning and the error.
        strict: raise instead of falling back.

    Raises:
        TaylorRuleError: ``strict`` is set.
        TaylorFallbackWarning (warning): otherwise, once per call.
    """
    if strict:
        raise TaylorRuleError(f"no Taylor-mode rule for {name} (strict=True); use layers and functions with "
                              "rules (Dense with tanh/sigmoid/softplus/relu/exp or none, Chain, Scale, "
                              "WrappedFunction of those) or strict=False for the nested-jvp fallback")
    order = min(x.order for x in inputs)
    warnings.warn(f"no Taylor-mode rule for {name}: its Taylor coefficients come from torch.func.jvp nested "
                  "K times, which costs 2^K evaluations of it (exponential in the order K) instead of O(K^2)",
                  TaylorFallbackWarning, stacklevel=3)
    cache: dict[int, torch.Tensor] = {}

    def compute(upto):
        derivs = _curve_derivatives(fn, [x._coeffs[:upto + 1] for x in inputs], upto)
        for k, d in enumerate(derivs):
            cache.setdefault(k, d / math.factorial(k))

    compute(order)
    node = TaylorSeries._node(inputs, cache[0])

    def rule(k):
        if k not in cache:
            compute(k)
        return cache[k]

    return node._bind(rule)


def call_with_fallback(fn: Callable, inputs: Sequence[TaylorSeries], strict: bool, owner: str,
                       name: str | None = None) -> TaylorSeries:
    """``fn(*inputs)`` run on the series (so its torch operations use their rules); nested jvp if one has none.

    A plain tensor result is a constant curve (``fn`` ignores its inputs).

    Raises:
        TypeError: ``fn`` returned neither a series nor a tensor (the message starts with ``owner``).
        TaylorRuleError: an operation of ``fn`` has no rule and ``strict`` is set.
    """
    name = name or f"the function {getattr(fn, '__qualname__', repr(fn))}"
    try:
        out = fn(*inputs)
    except TaylorRuleError as error:
        return nested_jvp_series(fn, inputs, f"{name} ({rule_error_reason(error)})", strict)
    if _is_series(out):
        return out
    if isinstance(out, torch.Tensor):
        # Constant in the inputs: a curve that does not move.
        return TaylorSeries._node(inputs, out)._bind(lambda k: torch.zeros_like(out))
    raise TypeError(f"{owner}: the function returned a {type(out).__name__}, expected a TaylorSeries "
                    "or a tensor")


def rule_error_reason(error: TaylorRuleError) -> str:
    """The first sentence of a rule error, for a fallback's name ("no Taylor-mode rule for ...")."""
    return str(error).split(".")[0].removeprefix("TaylorSeries: ")
