r"""The Taylor-mode rule table: one table from operations to their propagation rules.

Every operation Taylor mode knows is one entry of one table, keyed by the
operation itself:

* a **torch function** (``torch.tanh``, ``F.linear``, ``torch.Tensor.__add__``,
  ...): its rule takes the function's arguments with :class:`TaylorSeries` in
  place of tensors and returns the output series. A series passed to the
  function dispatches to it through ``TaylorSeries.__torch_function__``. Entries
  registered with ``activation=True`` (the elementwise maps tanh, sigmoid,
  softplus, relu, exp) also serve as the activation of a ``Dense``/``Scale`` layer;
* a **pylux layer class** (``Dense``, ``Chain``, ...): its rule
  ``rule(layer, x, ps, st, ctx)`` maps the input series ``x`` to the output
  series, with a :class:`TaylorLayerContext` to propagate through sublayers and
  to fall back to nested jvp. A layer uses the entry of the nearest class of
  its MRO that has one, so subclasses inherit their base class' rule.

Layers (and functions) join the table through :func:`register_taylor_rule`; the
rules of torch's functions and of pylux's :mod:`pylux.nn` layers are registered
at the end of this module, in one place. A layer with no entry is run on the
series as it is (a series is a tensor to it, so its torch operations use their
rules) and falls back to nested jvp (:mod:`pylux.regularize.taylor_fallback`)
when one of them has no rule.

The rules of :mod:`pylux.nn` (Griewank & Walther, ch. 13):

* ``Dense``: :math:`y_0 = \sigma(W x_0 + b)` and the series of
  :math:`\sigma(W x(t) + b)` by the activation's rule (the affine map is linear:
  :math:`(Wx + b)_k = W x_k` for :math:`k \ge 1`); ``Scale`` likewise with
  :math:`w \odot x + b`;
* ``Chain``: the composition of its layers' rules; ``NoOpLayer``: the identity;
  ``SkipConnection(f, "+")``: :math:`f(x) + x`;
* ``WrappedFunction(fn)``: ``fn``'s activation rule, or ``fn`` run on the series.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from ..core import AbstractLayer
from ..nn import Chain, Dense, NoOpLayer, Scale, SkipConnection, WrappedFunction
from .taylor_fallback import nested_jvp_series, rule_error_reason
from .taylor_series import (TaylorRuleError, TaylorSeries, _is_series, add, cat, div, exp, linear, log, matmul,
                            mul, relu, sigmoid, softplus, sub, tanh)

__all__ = ["register_taylor_rule", "TaylorRule", "TaylorLayerContext", "taylor_rule", "torch_function_rule",
           "activation_rule", "layer_series"]

#: ``rule(layer, x, ps, st, ctx) -> TaylorSeries``, the rule of a layer class.
LayerRule = Callable[[AbstractLayer, TaylorSeries, Mapping, Mapping, "TaylorLayerContext"], TaylorSeries]


@dataclass(frozen=True)
class TaylorRule:
    """One entry of the rule table.

    Attributes:
        op: the operation (a torch function or a pylux layer class).
        rule: its rule (see the module docstring for the two signatures).
        activation: a function rule that may also serve as a layer's activation.
    """

    op: Any
    rule: Callable
    activation: bool = False

    @property
    def is_layer_rule(self) -> bool:
        return _is_layer_class(self.op)


_RULES: dict[Any, TaylorRule] = {}


def _is_layer_class(op: Any) -> bool:
    return isinstance(op, type) and issubclass(op, AbstractLayer)


def register_taylor_rule(op: Any, rule: Callable, *, activation: bool = False) -> Callable:
    """Add (or replace) the Taylor-mode rule of an operation in the rule table.

    Args:
        op: a pylux layer class (a subclass of :class:`~pylux.core.AbstractLayer`;
            its subclasses use the rule too unless they have their own), or a
            torch function (any hashable callable that is not a class).
        rule: for a layer class, ``rule(layer, x, ps, st, ctx) -> TaylorSeries``
            with ``ctx`` a :class:`TaylorLayerContext`; for a function, a callable
            with the function's signature that takes and returns series.
        activation: (functions only) the rule also serves as the elementwise
            activation of a ``Dense``/``Scale`` layer.

    Returns:
        ``rule``.

    Raises:
        TypeError: ``rule`` is not callable; ``op`` is neither a pylux layer class
            nor a hashable callable; ``activation`` is not a bool or is set for a
            layer class.

    Example::

        def double_rule(layer, x, ps, st, ctx):      # a layer computing y = 2 x
            return x * 2
        register_taylor_rule(Double, double_rule)
    """
    if not callable(rule):
        raise TypeError(f"register_taylor_rule: rule must be callable, got {type(rule).__name__}")
    if not isinstance(activation, bool):
        raise TypeError(f"register_taylor_rule: activation must be True or False, got {activation!r}")
    if _is_layer_class(op):
        if activation:
            raise TypeError(f"register_taylor_rule: activation=True is for functions, not the layer class "
                            f"{op.__name__}")
    elif isinstance(op, type) or not callable(op):
        raise TypeError(f"register_taylor_rule: op must be a pylux layer class or a torch function, got "
                        f"{op!r}")
    else:
        try:
            hash(op)
        except TypeError:
            raise TypeError(f"register_taylor_rule: the function {op!r} is not hashable, so it cannot be a "
                            "key of the rule table") from None
    _RULES[op] = TaylorRule(op, rule, activation)
    return rule


def taylor_rule(op: Any) -> TaylorRule | None:
    """The table's entry for ``op`` itself (no MRO walk), or ``None``."""
    try:
        return _RULES.get(op)
    except TypeError:  # an unhashable callable
        return None


def torch_function_rule(func: Any) -> Callable | None:
    """The rule of the torch function ``func`` (what ``TaylorSeries.__torch_function__`` dispatches to)."""
    entry = taylor_rule(func)
    return None if entry is None or entry.is_layer_rule else entry.rule


def activation_rule(activation: Any) -> Callable[[TaylorSeries], TaylorSeries] | None:
    """The rule of a layer's activation: the identity for ``None``, ``softplus`` with keywords, or an
    entry registered with ``activation=True``; ``None`` when there is none (the caller falls back)."""
    if activation is None:
        return lambda x: x
    if isinstance(activation, functools.partial) and activation.func is F.softplus and not activation.args:
        extra = set(activation.keywords) - {"beta", "threshold"}
        if not extra:
            return lambda x: softplus(x, **activation.keywords)
        return None
    entry = taylor_rule(activation)
    return entry.rule if entry is not None and entry.activation else None


def _layer_rule(layer: AbstractLayer) -> LayerRule | None:
    for cls in type(layer).__mro__:
        entry = _RULES.get(cls)
        if entry is not None:
            return entry.rule
    return None


# --------------------------------------------------------------------- propagation through layers

@dataclass(frozen=True)
class TaylorLayerContext:
    """What a layer rule gets besides its layer, input and parameters.

    Attributes:
        strict: raise :class:`TaylorRuleError` instead of falling back to nested jvp.
        path: where the layer sits in the model (``"layer_1.layers"``; ``""`` at the top).
    """

    strict: bool = False
    path: str = ""

    def name(self, layer: AbstractLayer) -> str:
        """The layer as messages name it: its path and repr."""
        return f"{self.path} ({layer!r})" if self.path else repr(layer)

    def sublayer(self, layer: AbstractLayer, x: TaylorSeries, ps: Mapping, st: Mapping,
                 key: str) -> TaylorSeries:
        """The series of ``layer(x)`` for the child ``key`` of the current layer (by the table)."""
        path = f"{self.path}.{key}" if self.path else key
        return layer_series(layer, x, ps, st, strict=self.strict, path=path)

    def fallback(self, fn: Callable[..., torch.Tensor], inputs: list[TaylorSeries], name: str) -> TaylorSeries:
        """The series of ``fn(*inputs)`` by nested jvp (cost 2^K; see :func:`nested_jvp_series`)."""
        return nested_jvp_series(fn, inputs, name, self.strict)

    def activation(self, fn: Any, pre: TaylorSeries, layer: AbstractLayer) -> TaylorSeries:
        """The series of ``fn(pre)`` for the activation ``fn`` of ``layer`` (its rule, else nested jvp)."""
        rule = activation_rule(fn)
        if rule is not None:
            return rule(pre)
        return self.fallback(fn, [pre], f"the activation of {self.name(layer)}")

    def run(self, layer: AbstractLayer, x: TaylorSeries, ps: Mapping, st: Mapping) -> TaylorSeries:
        """A layer without a rule of its own: run it on the series, or nested jvp if that fails.

        The layer's torch operations dispatch to their rules; if one has none, or
        the result is not a series of ``x``'s order, the whole layer is
        differentiated by nested jvp.
        """
        name = self.name(layer)
        try:
            out = layer(x, ps, st)[0]
        except TaylorRuleError as error:
            name = f"{name} ({rule_error_reason(error)})"
            out = None
        if _is_series(out) and out.order == x.order:
            return out
        return self.fallback(lambda v: layer(v, ps, st)[0], [x], name)


def layer_series(layer: AbstractLayer, x: TaylorSeries, ps: Mapping, st: Mapping, *, strict: bool = False,
                 path: str = "") -> TaylorSeries:
    """The series of ``layer(x, ps, st)[0]``: the layer's rule from the table, or :meth:`TaylorLayerContext.run`."""
    ctx = TaylorLayerContext(strict, path)
    rule = _layer_rule(layer)
    if rule is None:
        return ctx.run(layer, x, ps, st)
    return rule(layer, x, ps, st, ctx)


# --------------------------------------------------------------------- the rules of pylux.nn

def _chain_rule(layer: Chain, x, ps, st, ctx: TaylorLayerContext) -> TaylorSeries:
    for key, child in layer.layers.items():
        x = ctx.sublayer(child, x, ps[key], st[key], key)
    return x


def _noop_rule(layer: NoOpLayer, x, ps, st, ctx: TaylorLayerContext) -> TaylorSeries:
    return x


def _skip_rule(layer: SkipConnection, x, ps, st, ctx: TaylorLayerContext) -> TaylorSeries:
    if isinstance(layer.connection, str) and layer.connection == "+":
        return ctx.sublayer(layer.layers["layers"], x, ps["layers"], st["layers"], "layers") + x
    return ctx.run(layer, x, ps, st)  # a callable or layer connection: its own operations' rules


def _check_affine_input(layer: Dense | Scale, x: TaylorSeries, ps: Mapping) -> None:
    expected = ("weight", "bias") if layer.use_bias else ("weight",)
    if not isinstance(ps, Mapping) or set(ps) != set(expected):
        raise ValueError(f"{layer!r}: expected parameters with keys {list(expected)}, got "
                         f"{sorted(ps) if isinstance(ps, Mapping) else type(ps).__name__}")
    if isinstance(layer, Dense) and (x.dim() == 0 or x.shape[-1] != layer.in_dims):
        raise ValueError(f"{layer!r}: expected a series with last dimension {layer.in_dims}, "
                         f"got shape {tuple(x.shape)}")


def _dense_rule(layer: Dense, x, ps, st, ctx: TaylorLayerContext) -> TaylorSeries:
    _check_affine_input(layer, x, ps)
    return ctx.activation(layer.activation, linear(x, ps["weight"], ps.get("bias")), layer)


def _scale_rule(layer: Scale, x, ps, st, ctx: TaylorLayerContext) -> TaylorSeries:
    _check_affine_input(layer, x, ps)
    pre = x * ps["weight"] + ps["bias"] if layer.use_bias else x * ps["weight"]
    return ctx.activation(layer.activation, pre, layer)


def _wrapped_function_rule(layer: WrappedFunction, x, ps, st, ctx: TaylorLayerContext) -> TaylorSeries:
    rule = activation_rule(layer.fn)
    if rule is not None:
        return rule(x)
    name = ctx.name(layer)
    try:
        out = layer.fn(x)
    except TaylorRuleError as error:
        name = f"{name} ({rule_error_reason(error)})"
        out = None
    if _is_series(out):
        return out
    return ctx.fallback(layer.fn, [x], name)


# --------------------------------------------------------------------- torch-function adapters

def _reflected(op: Callable) -> Callable:
    def handler(a, b, *args, **kwargs):
        return op(b, a, *args, **kwargs)
    return handler


def _linear_handler(input, weight, bias=None):
    return linear(input, weight, bias)


def _cat_handler(tensors, dim=0, *, out=None):
    if out is not None:
        raise TaylorRuleError("TaylorSeries: torch.cat(out=...) is not supported")
    return cat(tensors, dim)


def _addcmul(input, tensor1, tensor2, *, value=1):
    product = mul(tensor1, tensor2) if (_is_series(tensor1) or _is_series(tensor2)) else tensor1 * tensor2
    return add(input, product, alpha=value)


def _negate(x):
    return -x


def _method(name: str) -> Callable:
    def handler(x, *args, **kwargs):
        return getattr(TaylorSeries, name)(x, *args, **kwargs)
    return handler


# --------------------------------------------------------------------- the table's built-in entries

def _register_builtin_rules() -> None:
    """The rules of torch's functions and of pylux.nn's layers: the one place they are registered."""
    activations = {
        torch.tanh: tanh, F.tanh: tanh, torch.Tensor.tanh: tanh,
        torch.sigmoid: sigmoid, F.sigmoid: sigmoid, torch.special.expit: sigmoid, torch.Tensor.sigmoid: sigmoid,
        F.softplus: softplus,
        torch.relu: relu, F.relu: relu, torch.Tensor.relu: relu,
        torch.exp: exp, torch.Tensor.exp: exp,
    }
    functions = {
        torch.log: log, torch.Tensor.log: log,
        F.linear: _linear_handler,
        torch.matmul: matmul, torch.Tensor.matmul: matmul, torch.Tensor.__matmul__: matmul,
        torch.Tensor.__rmatmul__: _reflected(matmul),
        torch.cat: _cat_handler, torch.concat: _cat_handler, torch.concatenate: _cat_handler,
        torch.add: add, torch.Tensor.add: add, torch.Tensor.__add__: add, torch.Tensor.__radd__: _reflected(add),
        torch.sub: sub, torch.subtract: sub, torch.Tensor.sub: sub, torch.Tensor.__sub__: sub,
        torch.Tensor.__rsub__: _reflected(sub), torch.rsub: _reflected(sub),
        torch.mul: mul, torch.multiply: mul, torch.Tensor.mul: mul, torch.Tensor.__mul__: mul,
        torch.Tensor.__rmul__: _reflected(mul),
        torch.div: div, torch.divide: div, torch.true_divide: div, torch.Tensor.div: div,
        torch.Tensor.__truediv__: div, torch.Tensor.__rtruediv__: _reflected(div),
        torch.neg: _negate, torch.negative: _negate, torch.Tensor.neg: _negate, torch.Tensor.__neg__: _negate,
        torch.addcmul: _addcmul, torch.Tensor.addcmul: _addcmul,
        torch.reshape: _method("reshape"), torch.Tensor.reshape: _method("reshape"),
        torch.Tensor.view: _method("view"),
        torch.flatten: _method("flatten"), torch.Tensor.flatten: _method("flatten"),
        torch.unsqueeze: _method("unsqueeze"), torch.Tensor.unsqueeze: _method("unsqueeze"),
        torch.squeeze: _method("squeeze"), torch.Tensor.squeeze: _method("squeeze"),
        torch.Tensor.expand: _method("expand"), torch.Tensor.__getitem__: _method("__getitem__"),
        torch.sum: _method("sum"), torch.Tensor.sum: _method("sum"),
        torch.mean: _method("mean"), torch.Tensor.mean: _method("mean"),
        torch.square: _method("square"), torch.Tensor.square: _method("square"),
        torch.pow: _method("__pow__"), torch.Tensor.pow: _method("__pow__"),
        torch.Tensor.__pow__: _method("__pow__"),
    }
    layers = {
        Chain: _chain_rule, NoOpLayer: _noop_rule, SkipConnection: _skip_rule, Dense: _dense_rule,
        Scale: _scale_rule, WrappedFunction: _wrapped_function_rule,
    }
    for op, rule in activations.items():
        register_taylor_rule(op, rule, activation=True)
    for table in (functions, layers):
        for op, rule in table.items():
            register_taylor_rule(op, rule)


_register_builtin_rules()
