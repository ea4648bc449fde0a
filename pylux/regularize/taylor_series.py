r"""The Taylor-series algebra: :class:`TaylorSeries` and its arithmetic (Taylor-mode AD).

Convention
----------
A :class:`TaylorSeries` holds the *normalised* Taylor coefficients
:math:`[x_0, x_1, \dots, x_K]` of a curve

.. math::
    x(t) = \sum_{k=0}^{K} x_k \, t^k, \qquad x_k = \frac{1}{k!} \frac{d^k x}{dt^k}\Big|_{t=0},

so that products are plain Cauchy products, :math:`(xy)_k = \sum_{j=0}^k x_j y_{k-j}`.
Derivatives are recovered as :math:`d^k x/dt^k = k!\,x_k`
(:meth:`TaylorSeries.derivative`, :meth:`TaylorSeries.from_derivatives`).

Rules (Griewank & Walther, *Evaluating Derivatives*, ch. 13)
--------------------------------------------------------------
Every rule computes coefficient :math:`k` from the inputs' coefficients up to
:math:`k` and its own up to :math:`k-1`, in :math:`O(k)` tensor operations,
so a series of order :math:`K` costs :math:`O(K^2)`:

* linear maps (``F.linear``, ``@``, reshapes, indexing): :math:`y_0 = W x_0 + b`, :math:`y_k = W x_k`;
* :math:`y = \exp x`: :math:`y' = y x'`, i.e. :math:`k y_k = \sum_{j=1}^k j x_j y_{k-j}`;
* :math:`y = \tanh x`: :math:`y' = (1 - y^2) x'`, same recurrence with :math:`w = 1 - y^2` for :math:`y`;
* :math:`y = \sigma(x)`: :math:`y' = y(1-y) x'`;
* :math:`y = \operatorname{softplus}_\beta(x)`: :math:`y' = \sigma(\beta x) x'`;
* :math:`y = \log x`: :math:`x y' = x'`;
* ReLU: :math:`y_k = \mathbb{1}[x_0 > 0]\, x_k` (the series is that of the active
  piece; at :math:`x_0 = 0` exactly the inactive piece is taken);
* division :math:`z = x / y`: :math:`z_k = (x_k - \sum_{j<k} z_j y_{k-j}) / y_0`.

:class:`TaylorSeries` is a ``torch.Tensor`` subclass (its tensor data is
:math:`x_0`), so pylux layers and plain torch code run on it unchanged and
dispatch, through ``__torch_function__``, to the rules of the rule table
(:mod:`pylux.regularize.taylor_rules`); an operation without a rule raises
:class:`TaylorRuleError` rather than computing with :math:`x_0` alone.

Series are lazy in one direction: an operation computes as many coefficients
as its inputs have, and grows when asked for more. That is what makes the
solution recursion :math:`O(K^2)` rather than :math:`O(K^3)`: the vector field
is traced once, and each new coefficient :math:`z_{k+1} = f(z)_k / (k+1)` of
the solution extends every intermediate series by one coefficient.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "TaylorSeries",
    "TaylorRuleError",
    "add", "sub", "mul", "div", "matmul", "linear", "cat", "append_time",
    "exp", "log", "tanh", "sigmoid", "softplus", "relu",
]


class TaylorRuleError(NotImplementedError):
    """An operation on a :class:`TaylorSeries` has no Taylor-mode rule (and fallback was not allowed)."""


class TaylorSeries(torch.Tensor):
    r"""Truncated Taylor series :math:`x(t) = \sum_{k=0}^K x_k t^k` of a tensor-valued curve.

    Args:
        coefficients: the normalised coefficients :math:`[x_0, \dots, x_K]`
            (:math:`x_k = x^{(k)}(0)/k!`), floating tensors of one shape, dtype
            and device (or one tensor stacked along dim 0). Use
            :meth:`from_derivatives` to start from derivatives.

    A series is a ``torch.Tensor`` subclass whose shape, dtype and device are
    those of :math:`x_0`, so pylux layers accept it as input (``Dense`` checks
    pass, its ``F.linear`` and activation dispatch to the rules of the rule
    table, :mod:`pylux.regularize.taylor_rules`). It
    supports ``+ - * /`` with series, tensors and scalars, ``-x``, ``x ** n``
    (integer ``n >= 0``), ``x @ W``, ``W @ x``, indexing, ``reshape``/``view``,
    ``expand``, ``unsqueeze``/``squeeze``, ``flatten``, ``sum``/``mean`` and,
    through ``__torch_function__``, ``torch.tanh``, ``torch.sigmoid``,
    ``F.softplus``, ``torch.relu``, ``torch.exp``, ``torch.log``,
    ``F.linear``, ``torch.matmul``, ``torch.cat`` and the arithmetic functions,
    so one function can be written for tensors and series alike. Any other
    torch function raises :class:`TaylorRuleError` (never a silently wrong
    result: the tensor data of the series object itself is :math:`x_0`
    detached, and no rule-less operation is allowed to read it).

    Raises:
        ValueError: no coefficients, or coefficients of different shapes.
        TypeError: a coefficient that is not a floating tensor, or of another
            dtype/device than the first.
    """

    @staticmethod
    def __new__(cls, coefficients: Sequence[torch.Tensor]):
        if isinstance(coefficients, TaylorSeries):
            coeffs = list(coefficients._coeffs)
        elif isinstance(coefficients, torch.Tensor):
            coeffs = list(coefficients.unbind(0))
        else:
            coeffs = list(coefficients)
        if not coeffs:
            raise ValueError("TaylorSeries: needs at least one coefficient (the value x_0)")
        first = coeffs[0]
        for k, c in enumerate(coeffs):
            if not isinstance(c, torch.Tensor) or isinstance(c, TaylorSeries):
                raise TypeError(f"TaylorSeries: coefficient {k} is a {type(c).__name__}, not a plain torch.Tensor")
            if not c.is_floating_point():
                raise TypeError(f"TaylorSeries: coefficient {k} has dtype {c.dtype}; use a floating dtype")
            if c.shape != first.shape:
                raise ValueError(f"TaylorSeries: coefficient {k} has shape {tuple(c.shape)} but coefficient 0 "
                                 f"has {tuple(first.shape)}")
            if c.dtype != first.dtype or c.device != first.device:
                raise TypeError(f"TaylorSeries: coefficient {k} is {c.dtype} on {c.device} but coefficient 0 "
                                f"is {first.dtype} on {first.device}")
        series = torch.Tensor._make_subclass(cls, first.detach())
        series._coeffs = coeffs
        series._rule = None
        series._parents = ()
        return series

    def __init__(self, *args, **kwargs):
        pass

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_derivatives(cls, derivatives: Sequence[torch.Tensor]) -> "TaylorSeries":
        r"""The series whose :math:`k`-th derivative at 0 is ``derivatives[k]`` (divided by :math:`k!`)."""
        return cls([d / math.factorial(k) for k, d in enumerate(derivatives)])

    @classmethod
    def constant(cls, value: torch.Tensor, order: int) -> "TaylorSeries":
        """The constant curve ``value`` as a series of ``order`` (higher coefficients zero)."""
        _check_order(order, "TaylorSeries.constant", minimum=0)
        return cls([value] + [torch.zeros_like(value)] * order)

    @classmethod
    def time(cls, t0: float | torch.Tensor, order: int, *, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> "TaylorSeries":
        r"""The time variable around :math:`t_0`: coefficients :math:`[t_0, 1, 0, \dots]`, a 0-d series.

        It grows on demand (coefficients beyond ``order`` are 0), so it can be
        combined with series of any order.
        """
        _check_order(order, "TaylorSeries.time", minimum=0)
        t0 = torch.as_tensor(t0, dtype=dtype if dtype is not None else torch.get_default_dtype(), device=device)
        if t0.dim() != 0:
            raise ValueError(f"TaylorSeries.time: t0 must be a scalar, got shape {tuple(t0.shape)}")
        series = cls([t0])
        one, zero = torch.ones_like(t0), torch.zeros_like(t0)
        series._rule = lambda k: one if k == 1 else zero
        series._ensure(order)
        return series

    @classmethod
    def _node(cls, parents: Sequence["TaylorSeries"], first: torch.Tensor,
              rule: Callable[[int], torch.Tensor] | None = None) -> "TaylorSeries":
        """An operation's output: coefficient 0 given, the rest by ``rule`` up to the parents' order."""
        if isinstance(first, TaylorSeries):
            raise TypeError("TaylorSeries: an operation produced a series as a coefficient")
        node = torch.Tensor._make_subclass(cls, first.detach())
        node._coeffs = [first]
        node._rule = rule
        node._parents = tuple(parents)
        return node

    def _bind(self, rule: Callable[[int], torch.Tensor]) -> "TaylorSeries":
        self._rule = rule
        self._ensure(min(p.order for p in self._parents) if self._parents else 0)
        return self

    def _ensure(self, order: int) -> None:
        """Compute the coefficients up to ``order`` (asking the parents for theirs first)."""
        while len(self._coeffs) <= order:
            k = len(self._coeffs)
            if self._rule is None:
                raise ValueError(f"TaylorSeries: coefficient {k} was asked of a series of order {self.order} "
                                 "given by its coefficients; pass more coefficients")
            for parent in self._parents:
                parent._ensure(k)
            self._coeffs.append(self._rule(k))

    # ----------------------------------------------------------------- accessors
    @property
    def order(self) -> int:
        """:math:`K`, the highest coefficient held."""
        return len(self._coeffs) - 1

    @property
    def coefficients(self) -> tuple[torch.Tensor, ...]:
        """The normalised coefficients :math:`(x_0, \\dots, x_K)`."""
        return tuple(self._coeffs)

    def coefficient(self, k: int) -> torch.Tensor:
        """:math:`x_k` (computed on demand for series that can grow)."""
        _check_order(k, "TaylorSeries.coefficient", minimum=0)
        self._ensure(k)
        return self._coeffs[k]

    def derivative(self, k: int) -> torch.Tensor:
        """:math:`d^k x/dt^k` at :math:`t = 0`, i.e. :math:`k!\\,x_k`."""
        return self.coefficient(k) * math.factorial(k)

    def derivatives(self) -> tuple[torch.Tensor, ...]:
        """:math:`(x, x', \\dots, x^{(K)})` at :math:`t = 0`."""
        return tuple(c * math.factorial(k) for k, c in enumerate(self._coeffs))

    @property
    def value(self) -> torch.Tensor:
        return self._coeffs[0]

    def truncate(self, order: int) -> "TaylorSeries":
        """The series of the first ``order + 1`` coefficients (a fixed series)."""
        _check_order(order, "TaylorSeries.truncate", minimum=0)
        self._ensure(order)
        return TaylorSeries(self._coeffs[:order + 1])

    def __repr__(self) -> str:
        return f"TaylorSeries(order={self.order}, shape={tuple(self.shape)}, dtype={self.dtype})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    # ----------------------------------------------------------------- operators
    def __add__(self, other): return add(self, other)
    def __radd__(self, other): return add(other, self)
    def __sub__(self, other): return sub(self, other)
    def __rsub__(self, other): return sub(other, self)
    def __mul__(self, other): return mul(self, other)
    def __rmul__(self, other): return mul(other, self)
    def __truediv__(self, other): return div(self, other)
    def __rtruediv__(self, other): return div(other, self)
    def __neg__(self): return _linear_map(self, torch.neg)
    def __pos__(self): return self
    def __matmul__(self, other): return matmul(self, other)
    def __rmatmul__(self, other): return matmul(other, self)

    def __pow__(self, exponent):
        if isinstance(exponent, bool) or not isinstance(exponent, int) or exponent < 0:
            raise TypeError(f"TaylorSeries: only non-negative integer powers have a rule, got {exponent!r}; "
                            "write exp(a * log(x)) for a general power of a positive series")
        if exponent == 0:
            return TaylorSeries._node((self,), torch.ones_like(self.value))._bind(
                lambda k: torch.zeros_like(self._coeffs[0]))
        result, base, n = None, self, exponent
        while n:
            if n & 1:
                result = base if result is None else mul(result, base)
            n >>= 1
            if n:
                base = mul(base, base)
        return result

    def __getitem__(self, index): return _linear_map(self, lambda c: c[index])
    def reshape(self, *shape): return _linear_map(self, lambda c: c.reshape(*shape))
    def view(self, *shape): return _linear_map(self, lambda c: c.view(*shape))
    def expand(self, *shape): return _linear_map(self, lambda c: c.expand(*shape))
    def unsqueeze(self, dim: int): return _linear_map(self, lambda c: c.unsqueeze(dim))
    def squeeze(self, *dim): return _linear_map(self, lambda c: c.squeeze(*dim))
    def flatten(self, start_dim: int = 0, end_dim: int = -1):
        return _linear_map(self, lambda c: c.flatten(start_dim, end_dim))
    def sum(self, dim=None, keepdim: bool = False):
        return _linear_map(self, lambda c: c.sum() if dim is None else c.sum(dim, keepdim=keepdim))
    def mean(self, dim=None, keepdim: bool = False):
        return _linear_map(self, lambda c: c.mean() if dim is None else c.mean(dim, keepdim=keepdim))
    def square(self): return mul(self, self)
    def pow(self, exponent): return self.__pow__(exponent)

    def tanh(self): return tanh(self)
    def sigmoid(self): return sigmoid(self)
    def exp(self): return exp(self)
    def log(self): return log(self)
    def relu(self): return relu(self)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            # shape, dtype, device, ...: those of x_0, which the series object carries
            return super().__torch_function__(func, types, args, kwargs)
        handler = _torch_rule(func)
        if handler is None:
            name = getattr(func, "__name__", None) or repr(func)
            raise TaylorRuleError(
                f"TaylorSeries: no Taylor-mode rule for torch function {name!r}. Supported: tanh, sigmoid, "
                "softplus, relu, exp, log, linear, matmul, cat, add, sub, mul, div, neg, addcmul, pow, square and "
                "shape operations. Write the function "
                "with these, or pass it to taylor_coefficients / solution_taylor_coefficients, which fall "
                "back to nested jvp (cost 2^K)")
        return handler(*args, **kwargs)


# --------------------------------------------------------------------- helpers

def _check_order(order: Any, owner: str, *, minimum: int = 1) -> int:
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"{owner}: order must be an int, got {type(order).__name__}")
    if order < minimum:
        raise ValueError(f"{owner}: order must be >= {minimum}, got {order}")
    return order


def _is_series(x: Any) -> bool:
    return isinstance(x, TaylorSeries)


def _cauchy(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    r""":math:`(ab)_k = \sum_{j=0}^{k} a_j b_{k-j}`."""
    total = a[0] * b[k]
    for j in range(1, k + 1):
        total = total + a[j] * b[k - j]
    return total


def _square_coefficient(y: Sequence[torch.Tensor], m: int) -> torch.Tensor:
    r""":math:`(y^2)_m = \sum_{i=0}^m y_i y_{m-i}`, using its symmetry to halve the products."""
    half = (m + 1) // 2
    total = None
    for i in range(half):
        term = y[i] * y[m - i]
        total = term if total is None else total + term
    total = 2 * total if total is not None else None
    if m % 2 == 0:
        middle = y[m // 2] * y[m // 2]
        total = middle if total is None else total + middle
    return total


def _derivative_rule(x: TaylorSeries, g: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    r"""From :math:`y' = g\,x'`: :math:`y_k = \frac{1}{k}\sum_{j=1}^k j\,x_j\,g_{k-j}`."""
    xs = x._coeffs
    total = xs[1] * g[k - 1]
    for j in range(2, k + 1):
        total = total + j * xs[j] * g[k - j]
    return total / k


def _linear_map(x: TaylorSeries, fn: Callable[[torch.Tensor], torch.Tensor]) -> TaylorSeries:
    """``y_k = fn(x_k)`` for a linear ``fn`` (reshape, indexing, negation, matmul without bias)."""
    return TaylorSeries._node((x,), fn(x._coeffs[0]))._bind(lambda k: fn(x._coeffs[k]))


def _broadcast(c: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return c if c.shape == shape else c.expand(shape)


# --------------------------------------------------------------------- arithmetic

def add(a: Any, b: Any, *, alpha: Any = 1) -> TaylorSeries:
    """``a + alpha * b`` where either may be a series, a tensor or a scalar."""
    if alpha != 1:
        b = mul(b, alpha) if _is_series(b) else b * alpha
    if _is_series(a) and _is_series(b):
        first = a._coeffs[0] + b._coeffs[0]
        return TaylorSeries._node((a, b), first)._bind(lambda k: a._coeffs[k] + b._coeffs[k])
    series, const = (a, b) if _is_series(a) else (b, a)
    first = a._coeffs[0] + b if series is a else a + b._coeffs[0]
    shape = first.shape
    return TaylorSeries._node((series,), first)._bind(lambda k: _broadcast(series._coeffs[k], shape))


def sub(a: Any, b: Any, *, alpha: Any = 1) -> TaylorSeries:
    """``a - alpha * b``."""
    return add(a, -b if alpha == 1 else mul(b, -alpha))


def mul(a: Any, b: Any) -> TaylorSeries:
    """Cauchy product of two series; a tensor or scalar factor scales every coefficient."""
    if _is_series(a) and _is_series(b):
        if a is b:
            return TaylorSeries._node((a,), a._coeffs[0] * a._coeffs[0])._bind(
                lambda k: _square_coefficient(a._coeffs, k))
        return TaylorSeries._node((a, b), a._coeffs[0] * b._coeffs[0])._bind(
            lambda k: _cauchy(a._coeffs, b._coeffs, k))
    series, const = (a, b) if _is_series(a) else (b, a)
    return _linear_map(series, lambda c: c * const)


def div(a: Any, b: Any, *, rounding_mode: str | None = None) -> TaylorSeries:
    r"""``a / b``; by a series through :math:`z_k = (a_k - \sum_{j<k} z_j b_{k-j}) / b_0`."""
    if rounding_mode is not None:
        raise TaylorRuleError(f"TaylorSeries: division with rounding_mode={rounding_mode!r} has no Taylor rule")
    if not _is_series(b):
        return _linear_map(a, lambda c: c / b)
    ys = b._coeffs
    if _is_series(a):
        node = TaylorSeries._node((a, b), a._coeffs[0] / ys[0])
        numerator = lambda k: a._coeffs[k]  # noqa: E731
    else:
        node = TaylorSeries._node((b,), a / ys[0])
        numerator = None
    zs = node._coeffs

    def rule(k):
        correction = zs[0] * ys[k]
        for j in range(1, k):
            correction = correction + zs[j] * ys[k - j]
        top = -correction if numerator is None else numerator(k) - correction
        return top / ys[0]

    return node._bind(rule)


def matmul(a: Any, b: Any) -> TaylorSeries:
    """``a @ b`` with one side a series and the other a constant tensor."""
    if _is_series(a) and _is_series(b):
        raise TaylorRuleError("TaylorSeries: matmul of two series has no rule here; one side must be a tensor")
    if _is_series(a):
        return _linear_map(a, lambda c: c @ b)
    return _linear_map(b, lambda c: a @ c)


def linear(x: TaylorSeries, weight: torch.Tensor, bias: torch.Tensor | None = None) -> TaylorSeries:
    r"""``F.linear`` on a series: :math:`y_0 = x_0 W^\top + b`, :math:`y_k = x_k W^\top`."""
    if _is_series(weight) or _is_series(bias):
        raise TaylorRuleError("TaylorSeries: F.linear needs the weight and bias to be tensors, not series")
    return TaylorSeries._node((x,), F.linear(x._coeffs[0], weight, bias))._bind(
        lambda k: F.linear(x._coeffs[k], weight))


def cat(tensors: Sequence[Any], dim: int = 0) -> TaylorSeries:
    """``torch.cat`` of series and tensors (tensors are constant curves)."""
    parts = list(tensors)
    parents = [p for p in parts if _is_series(p)]
    first = torch.cat([p._coeffs[0] if _is_series(p) else p for p in parts], dim)
    zeros = {i: torch.zeros_like(p) for i, p in enumerate(parts) if not _is_series(p)}
    return TaylorSeries._node(parents, first)._bind(
        lambda k: torch.cat([p._coeffs[k] if _is_series(p) else zeros[i] for i, p in enumerate(parts)], dim))


def append_time(z: Any, t: Any) -> Any:
    r"""``[z; t]``: the time appended as one more feature, broadcast over ``z``'s leading dimensions.

    Works on tensors (``t`` a float or 0-d tensor) and on series (``t`` from
    :meth:`TaylorSeries.time`), which is how Kelly et al.'s field
    :math:`f(z, t) = \tanh(W_2[\tanh(W_1[z; t] + b_1); t] + b_2)` is written.
    """
    shape = tuple(z.shape[:-1]) + (1,)
    if _is_series(t):
        t_col = t.reshape(*([1] * len(shape))).expand(*shape)
    else:
        t_col = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape([1] * len(shape)).expand(*shape)
    return torch.cat([z, t_col], dim=-1)


# --------------------------------------------------------------------- nonlinearities

def exp(x: TaylorSeries) -> TaylorSeries:
    r""":math:`y = e^x`: :math:`y' = y x'`."""
    node = TaylorSeries._node((x,), torch.exp(x._coeffs[0]))
    return node._bind(lambda k: _derivative_rule(x, node._coeffs, k))


def log(x: TaylorSeries) -> TaylorSeries:
    r""":math:`y = \log x`: :math:`x y' = x'`.

    So :math:`y_k = (x_k - \frac1k\sum_{j=1}^{k-1} j y_j x_{k-j}) / x_0`.
    """
    node = TaylorSeries._node((x,), torch.log(x._coeffs[0]))
    ys, xs = node._coeffs, x._coeffs

    def rule(k):
        top = xs[k]
        for j in range(1, k):
            top = top - (j / k) * ys[j] * xs[k - j]
        return top / xs[0]

    return node._bind(rule)


def _bounded_derivative_series(x: TaylorSeries, first: torch.Tensor,
                               g_of_y: Callable[[list, int], torch.Tensor]) -> TaylorSeries:
    """``y' = g(y) x'`` where ``g(y)``'s coefficient ``m`` needs ``y`` up to ``m`` (tanh, sigmoid)."""
    node = TaylorSeries._node((x,), first)
    ys, gs = node._coeffs, []

    def rule(k):
        while len(gs) < k:
            gs.append(g_of_y(ys, len(gs)))
        return _derivative_rule(x, gs, k)

    return node._bind(rule)


def tanh(x: TaylorSeries) -> TaylorSeries:
    r""":math:`y = \tanh x`: :math:`y' = (1 - y^2)\,x'`."""
    def one_minus_square(ys, m):
        sq = _square_coefficient(ys, m)
        return 1 - sq if m == 0 else -sq
    return _bounded_derivative_series(x, torch.tanh(x._coeffs[0]), one_minus_square)


def sigmoid(x: TaylorSeries) -> TaylorSeries:
    r""":math:`y = \sigma(x)`: :math:`y' = y(1 - y)\,x'`."""
    return _bounded_derivative_series(x, torch.sigmoid(x._coeffs[0]),
                                      lambda ys, m: ys[m] - _square_coefficient(ys, m))


def softplus(x: TaylorSeries, beta: float = 1.0, threshold: float = 20.0) -> TaylorSeries:
    r""":math:`y = \frac1\beta\log(1 + e^{\beta x})`: :math:`y' = \sigma(\beta x)\,x'`.

    ``threshold`` is accepted for ``F.softplus`` compatibility; the series is that
    of the smooth function (torch returns :math:`x` itself above the threshold,
    which differs from it by less than :math:`e^{-20}`).
    """
    gate = sigmoid(x * beta) if beta != 1 else sigmoid(x)
    node = TaylorSeries._node((x, gate), F.softplus(x._coeffs[0], beta=beta, threshold=threshold))
    return node._bind(lambda k: _derivative_rule(x, gate._coeffs, k))


def relu(x: TaylorSeries, inplace: bool = False) -> TaylorSeries:
    r"""ReLU: :math:`y_k = \mathbb 1[x_0 > 0]\,x_k` (exact away from :math:`x_0 = 0`)."""
    mask = (x._coeffs[0] > 0).to(x.dtype)
    return TaylorSeries._node((x,), torch.relu(x._coeffs[0]))._bind(lambda k: x._coeffs[k] * mask)


# --------------------------------------------------------------------- dispatch

#: Tensor metadata (shape, dtype, device, ...) read from the series object itself, which carries x_0's.
_METADATA = {
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
    torch.Tensor.ndim.__get__, torch.Tensor.is_cuda.__get__, torch.Tensor.layout.__get__,
    torch.Tensor.requires_grad.__get__, torch.Tensor.is_sparse.__get__, torch.Tensor.dim,
    torch.Tensor.size, torch.Tensor.numel, torch.Tensor.nelement, torch.Tensor.ndimension,
    torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.__len__, torch.Tensor.element_size,
    torch.Tensor.get_device,
}


_table_lookup: Callable[[Any], Callable | None] | None = None


def _torch_rule(func: Any) -> Callable | None:
    """The rule the table holds for the torch function ``func`` (``None`` if it has none)."""
    global _table_lookup
    if _table_lookup is None:  # the table is built from this module, so it is found on first use
        from .taylor_rules import torch_function_rule  # noqa: PLC0415
        _table_lookup = torch_function_rule
    return _table_lookup(func)
