r"""Controls from data: piecewise-cubic paths through irregular, partly missing observations.

A neural CDE (Kidger, Morrill, Foster & Lyons, NeurIPS 2020) is driven by a
continuous path :math:`X(t)` built from discrete observations
:math:`(t_i, x_i)`, :math:`x_i \in \mathbb{R}^C`. Every control here is a
piecewise cubic on the knots :math:`t_0 < \dots < t_{T-1}`,

.. math::
    X(t) = a_i + b_i s + c_i s^2 + d_i s^3, \qquad s = t - t_i, \quad t \in [t_i, t_{i+1}],

with coefficients ``(a, b, c, d)`` of shape ``(*batch, T - 1, C)``, so
evaluation, derivative and increment cost one index look-up (``searchsorted``
on the device, no host synchronisation) and a Horner step:

* :class:`CubicSpline` — the natural cubic spline (C²; :math:`X'' = 0` at both
  ends): the smoothest interpolant, but each piece depends on all data, so it
  is not causal;
* :class:`HermiteCubicSpline` — cubic Hermite with backward differences
  (Morrill, Kidger, Yang & Lyons 2021, "Neural CDEs for online prediction
  tasks"): on :math:`[t_i, t_{i+1}]` the slopes are the backward differences
  :math:`(x_i - x_{i-1})/(t_i - t_{i-1})` at :math:`t_i` and
  :math:`(x_{i+1} - x_i)/(t_{i+1} - t_i)` at :math:`t_{i+1}`, so the piece uses
  data up to :math:`t_{i+1}` only (causal) and the path is C¹;
* :class:`LinearInterpolation` — piecewise linear (C⁰; causal).

Times are shared, shape ``(T,)``, or per sample, shape ``(B, T)`` (then the
data are ``(B, T, C)`` and each sample has its own knots). Missing values are
NaN, per channel, handled as torchcde does: the natural spline of a channel is
fitted on its observed points only (missing knots are filled with that
spline's values, through which the spline on all knots is the same spline);
the linear and Hermite paths fill missing values by linear interpolation
between observed ones. A leading (trailing) run of NaN takes the first (last)
observed value, and a channel with no observation is zero. Ragged series in a
batch: pad the values with NaN and continue each row's times increasingly;
the linear path is then constant after the last observation, and the cubic
ones return to that value at every padded knot (between them they overshoot
it, the Hermite path by the slope it arrives with, the natural spline by its
second-derivative continuity), so read a padded row's state at its last
observation.

Every control is differentiable in the data (the coefficients are tensors
built from them) and is an :class:`~pylux.diffeq.AbstractControl`: usable in
``ControlTerm(g, spline)``. A layer that differentiates through an adjoint
passes ``spline.coefficients`` through the problem's parameters and evaluates
``spline.with_coefficients(p[...])`` inside the vector field (see
:class:`pylux.layers.NeuralCDE`). ``spline.knots`` are the times to give
``solve(..., tstops=...)`` so that steps do not straddle a kink.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .terms import AbstractControl

__all__ = ["CubicSpline", "HermiteCubicSpline", "LinearInterpolation", "AbstractSplineControl"]


def _as_times(times, values: torch.Tensor, owner: str) -> torch.Tensor:
    if not isinstance(times, torch.Tensor):
        try:
            times = torch.as_tensor(times, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{owner}: times must be a 1-D or 2-D tensor of floats, got {type(times).__name__}") \
                from None
    if not times.is_floating_point():
        times = times.to(torch.float64)
    times = times.to(values.device)
    length = values.shape[-2]
    if times.dim() == 1:
        if times.shape[0] != length:
            raise ValueError(f"{owner}: times has {times.shape[0]} entries but the data have {length} observations "
                             f"(data shape {tuple(values.shape)} = (*batch, T, channels)); give one time per "
                             "observation")
    elif times.dim() == 2:
        if values.dim() != 3 or tuple(times.shape) != tuple(values.shape[:2]):
            raise ValueError(f"{owner}: per-sample times of shape {tuple(times.shape)} need data of shape "
                             f"(B, T, channels) = ({times.shape[0]}, {times.shape[1]}, C), got "
                             f"{tuple(values.shape)}")
    else:
        raise ValueError(f"{owner}: times must have shape (T,) (shared) or (B, T) (per sample), got "
                         f"{tuple(times.shape)}")
    if length < 2:
        raise ValueError(f"{owner}: a path needs at least 2 observation times, got {length}")
    if not bool(torch.isfinite(times).all()):
        raise ValueError(f"{owner}: times contain NaN or Inf; mark missing values with NaN in the data, "
                         "never in the times")
    steps = times.diff(dim=-1)
    if not bool((steps > 0).all()):
        bad = (steps <= 0).nonzero()[0].tolist()
        raise ValueError(f"{owner}: times must be strictly increasing along the last axis, but step "
                         f"{tuple(bad)} is {float(steps[tuple(bad)]):.6g}; sort the observations by time "
                         "(and merge duplicate times) first")
    return times.contiguous()


def _as_values(values, owner: str) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError(f"{owner}: the data must be a floating-point tensor of shape (*batch, T, channels), got "
                        f"{type(values).__name__ if not isinstance(values, torch.Tensor) else values.dtype}")
    if values.dim() < 2:
        raise ValueError(f"{owner}: the data must have shape (*batch, T, channels), got {tuple(values.shape)}; "
                         "add a channel axis with x.unsqueeze(-1)")
    if bool(torch.isinf(values).any()):
        raise ValueError(f"{owner}: the data contain Inf; only NaN (missing) is allowed besides finite values")
    return values


def _broadcast_times(times: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Times as ``(*batch, T, C)`` alongside the values (views where possible)."""
    if times.dim() == 1:
        return times.to(values.dtype).view(*([1] * (values.dim() - 2)), -1, 1).expand(values.shape)
    return times.to(values.dtype).unsqueeze(-1).expand(values.shape)


def _fill_ends(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading NaN take the first observed value, trailing NaN the last; all-NaN channels become 0.

    Returns the filled values and the mask of observed entries after filling (the ends count as observed).
    """
    observed = ~torch.isnan(values)
    length = values.shape[-2]
    index = torch.arange(length, device=values.device).view(-1, 1)
    big = torch.full_like(observed, length, dtype=torch.long)
    first = torch.where(observed, index, big).amin(dim=-2, keepdim=True).clamp(max=length - 1)
    last = torch.where(observed, index, -torch.ones_like(big)).amax(dim=-2, keepdim=True).clamp(min=0)
    first_value = values.gather(-2, first)
    last_value = values.gather(-2, last)
    filled = torch.where(index < first, first_value, values)
    filled = torch.where(index > last, last_value, filled)
    none = ~observed.any(dim=-2, keepdim=True)
    filled = torch.where(none, torch.zeros_like(filled), filled)
    return filled, (~torch.isnan(filled)) | none.expand_as(observed)


def _compress(times: torch.Tensor, values: torch.Tensor, observed: torch.Tensor):
    """The observed points of each series moved to the front, in order; the rest padded.

    ``times``, ``values``, ``observed`` are ``(*batch, T, C)``. Returns ``(t, x, count)``
    with ``t``, ``x`` of the same shape (padding: times continue past the last observed
    one by unit steps, values repeat the last one) and ``count`` of shape ``(*batch, 1, C)``.
    """
    length = values.shape[-2]
    order = torch.argsort((~observed).to(torch.int8), dim=-2, stable=True)
    t = times.gather(-2, order)
    x = values.gather(-2, order)
    count = observed.sum(dim=-2, keepdim=True)
    index = torch.arange(length, device=values.device).view(-1, 1)
    pad = index >= count
    last = (count - 1).clamp(min=0)
    t_last, x_last = t.gather(-2, last), x.gather(-2, last)
    t = torch.where(pad, t_last + (index - last).to(t.dtype), t)
    x = torch.where(pad, x_last, x)
    return t, x, count


def _natural_second_derivatives(t: torch.Tensor, x: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    r"""Second derivatives :math:`M_i` of the natural cubic spline through ``(t, x)`` along dim ``-2``.

    Solves, for :math:`1 \le i \le n - 2`,
    :math:`h_{i-1} M_{i-1} + 2(h_{i-1} + h_i) M_i + h_i M_{i+1} = 6(\delta_i - \delta_{i-1})`
    with :math:`h_i = t_{i+1} - t_i`, :math:`\delta_i = (x_{i+1} - x_i)/h_i` and
    :math:`M_0 = M_{n-1} = 0`, by the Thomas algorithm (diagonally dominant:
    no pivoting needed), batched over every other axis. With ``count`` the
    series ``k`` uses only its first ``count[k]`` points (the rest get ``M = 0``).
    """
    length = x.shape[-2]
    h = t.diff(dim=-2)
    slope = x.diff(dim=-2) / h
    index = torch.arange(length, device=x.device).view(-1, 1)
    interior = (index >= 1) & (index <= length - 2)
    if count is not None:
        interior = interior & (index <= count - 2)
    zeros = x.new_zeros(x.shape[:-2] + (1,) + x.shape[-1:])
    h_prev = torch.cat([zeros + 1.0, h], dim=-2)      # h_{i-1}, padded at i = 0
    h_next = torch.cat([h, zeros + 1.0], dim=-2)      # h_i, padded at i = n - 1
    rhs = 6.0 * (torch.cat([slope, zeros], dim=-2) - torch.cat([zeros, slope], dim=-2))
    rhs = torch.where(interior, rhs, torch.zeros_like(rhs))
    lower = torch.where(interior, h_prev, torch.zeros_like(h_prev))
    upper = torch.where(interior, h_next, torch.zeros_like(h_next))
    diag = torch.where(interior, 2.0 * (h_prev + h_next), torch.ones_like(h_prev))
    # forward sweep, then back substitution (one Python iteration per knot, batched over series)
    c_prime, d_prime = [], []
    c_prev = d_prev = None
    for i in range(length):
        a_i, b_i, c_i, r_i = lower[..., i, :], diag[..., i, :], upper[..., i, :], rhs[..., i, :]
        if c_prev is None:
            denom = b_i
            c_cur, d_cur = c_i / denom, r_i / denom
        else:
            denom = b_i - a_i * c_prev
            c_cur, d_cur = c_i / denom, (r_i - a_i * d_prev) / denom
        c_prime.append(c_cur)
        d_prime.append(d_cur)
        c_prev, d_prev = c_cur, d_cur
    second = [None] * length
    second[-1] = d_prime[-1]
    for i in range(length - 2, -1, -1):
        second[i] = d_prime[i] - c_prime[i] * second[i + 1]
    return torch.stack(second, dim=-2)


def _natural_coefficients(t: torch.Tensor, x: torch.Tensor, second: torch.Tensor):
    h = t.diff(dim=-2)
    m0, m1 = second[..., :-1, :], second[..., 1:, :]
    a = x[..., :-1, :]
    b = x.diff(dim=-2) / h - h * (2.0 * m0 + m1) / 6.0
    c = m0 / 2.0
    d = (m1 - m0) / (6.0 * h)
    return a, b, c, d


def _piece_values(t_query: torch.Tensor, t: torch.Tensor, coeffs) -> torch.Tensor:
    """Evaluate piecewise cubics (knots ``t``: ``(*batch, T, C)``) at query times of shape ``(*batch, Q, C)``."""
    length = t.shape[-2]
    knots = t.movedim(-2, -1).contiguous()                       # (*batch, C, T)
    queries = t_query.movedim(-2, -1).contiguous()               # (*batch, C, Q)
    idx = (torch.searchsorted(knots, queries, right=True) - 1).clamp(0, length - 2).movedim(-1, -2)
    s = t_query - t.gather(-2, idx)
    a, b, c, d = (k.gather(-2, idx) for k in coeffs)
    return a + s * (b + s * (c + s * d))


def _fill_missing(times: torch.Tensor, values: torch.Tensor, fit) -> torch.Tensor:
    """Missing values (NaN) replaced by the values of ``fit(t, x, count) -> coefficients`` on the observed points.

    The observed points of each series are moved to the front (:func:`_compress`), fitted, and the fit is
    evaluated at the missing knots; observed values are kept as they are.
    """
    if not bool(torch.isnan(values).any()):
        return values
    filled, observed = _fill_ends(values)
    t_all = _broadcast_times(times, values)
    t, x, count = _compress(t_all, filled, observed)
    return torch.where(observed, filled, _piece_values(t_all, t, fit(t, x, count)))


def _linear_fit(t, x, count):
    slope = x.diff(dim=-2) / t.diff(dim=-2)
    zeros = torch.zeros_like(slope)
    return x[..., :-1, :], slope, zeros, zeros


def _natural_fit(t, x, count):
    return _natural_coefficients(t, x, _natural_second_derivatives(t, x, count))


def _linear_fill(times: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Missing values replaced by linear interpolation between the observed ones (torchcde's fill)."""
    return _fill_missing(times, values, _linear_fit)


def _natural_fill(times: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Missing values replaced by the values of the natural spline through the observed points only."""
    return _fill_missing(times, values, _natural_fit)


class AbstractSplineControl(AbstractControl):
    r"""A piecewise cubic :math:`X(t) = a_i + b_i s + c_i s^2 + d_i s^3` (see the module docstring).

    Attributes:
        times: the knots, ``(T,)`` or ``(B, T)``.
        coefficients: ``(a, b, c, d)``, each ``(*batch, T - 1, C)``.
        channels: ``C``.

    Outside ``[t_0, t_{T-1}]`` the first (last) piece is extrapolated.
    """

    #: the path is causal: the piece on [t_i, t_{i+1}] uses data up to t_{i+1} only
    causal: bool = False

    def __init__(self, values: torch.Tensor, times) -> None:
        owner = type(self).__name__
        values = _as_values(values, owner)
        self.times = _as_times(times, values, owner)
        self.coefficients = tuple(self._coefficients(self.times, values))
        self.channels = values.shape[-1]
        self.batch_shape = tuple(values.shape[:-2])

    def _coefficients(self, times: torch.Tensor, values: torch.Tensor):
        raise NotImplementedError

    @classmethod
    def _from_parts(cls, times: torch.Tensor, coefficients, channels: int, batch_shape) -> "AbstractSplineControl":
        new = cls.__new__(cls)
        new.times, new.coefficients, new.channels, new.batch_shape = times, tuple(coefficients), channels, batch_shape
        return new

    def with_coefficients(self, coefficients: Sequence[torch.Tensor]) -> "AbstractSplineControl":
        """The same knots with other coefficients (e.g. the copies an adjoint passes through ``p``)."""
        coefficients = tuple(coefficients)
        if len(coefficients) != 4 or any(tuple(c.shape) != tuple(k.shape)
                                         for c, k in zip(coefficients, self.coefficients)):
            raise ValueError(f"{type(self).__name__}.with_coefficients: expected four tensors of shape "
                             f"{tuple(self.coefficients[0].shape)}")
        return self._from_parts(self.times, coefficients, self.channels, self.batch_shape)

    @property
    def knots(self) -> torch.Tensor:
        """The sorted distinct knot times (of every sample), 1-D: pass as ``solve(..., tstops=spline.knots)``."""
        return self.times.reshape(-1).unique(sorted=True)

    @property
    def interval(self) -> tuple[float, float]:
        """``(first, last)`` knot over the batch: the span on which every sample's path is data."""
        first = self.times[..., 0].min() if self.times.dim() == 2 else self.times[0]
        last = self.times[..., -1].max() if self.times.dim() == 2 else self.times[-1]
        return float(first), float(last)

    def _locate(self, t):
        """``(s, index)`` for a scalar time: the offset into its piece and that piece's index."""
        times = self.times
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(float(t), dtype=times.dtype, device=times.device)
        if t.numel() != 1:
            raise ValueError(f"{type(self).__name__}: evaluate/derivative take one time (a scalar), got a tensor "
                             f"of shape {tuple(t.shape)}; evaluate the times one by one")
        t = t.to(device=times.device, dtype=times.dtype).reshape(())
        last = times.shape[-1] - 2
        if times.dim() == 1:
            idx = (torch.searchsorted(times, t.reshape(1), right=True) - 1).clamp(0, last)
            return t - times[idx], idx
        query = t.expand(times.shape[0], 1).contiguous()
        idx = (torch.searchsorted(times, query, right=True) - 1).clamp(0, last)
        return query - times.gather(1, idx), idx

    def _pieces(self, t):
        s, idx = self._locate(t)
        a = self.coefficients[0]
        if self.times.dim() == 1:
            pieces = [k.index_select(-2, idx).squeeze(-2) for k in self.coefficients]
            s = s.to(a.dtype).reshape(())
        else:
            gather = idx.unsqueeze(-1).expand(-1, 1, self.channels)
            pieces = [k.gather(1, gather).squeeze(1) for k in self.coefficients]
            s = s.to(a.dtype)                                       # (B, 1)
        return s, pieces

    def evaluate(self, t) -> torch.Tensor:
        """:math:`X(t)`, shape ``(*batch, C)``."""
        s, (a, b, c, d) = self._pieces(t)
        return a + s * (b + s * (c + s * d))

    def derivative(self, t) -> torch.Tensor:
        """:math:`X'(t)`, shape ``(*batch, C)`` (the right derivative at a knot)."""
        s, (_, b, c, d) = self._pieces(t)
        return b + s * (2.0 * c + s * (3.0 * d))

    def increment(self, t0, t1) -> torch.Tensor:
        """:math:`X(t_1) - X(t_0)`, shape ``(*batch, C)``."""
        return self.evaluate(t1) - self.evaluate(t0)

    def __repr__(self) -> str:
        kind = "per-sample" if self.times.dim() == 2 else "shared"
        return (f"{type(self).__name__}(batch={self.batch_shape}, T={self.times.shape[-1]} ({kind} times), "
                f"channels={self.channels})")


class CubicSpline(AbstractSplineControl):
    r"""The natural cubic spline through the observations (:math:`X'' = 0` at the first and last knot).

    ``CubicSpline(values, times)``: ``values`` of shape ``(*batch, T, C)`` (NaN =
    missing), ``times`` of shape ``(T,)`` or ``(B, T)``. The second derivatives
    :math:`M_i` at the knots solve the tridiagonal system
    :math:`h_{i-1} M_{i-1} + 2(h_{i-1}+h_i) M_i + h_i M_{i+1} = 6(\delta_i - \delta_{i-1})`,
    :math:`M_0 = M_{T-1} = 0` (de Boor, *A Practical Guide to Splines*, ch. IV), and
    on :math:`[t_i, t_{i+1}]`: :math:`a = x_i`,
    :math:`b = \delta_i - h_i(2M_i + M_{i+1})/6`, :math:`c = M_i/2`,
    :math:`d = (M_{i+1} - M_i)/(6h_i)`. Missing values: the spline of each
    channel through its observed points only (torchcde's ``natural_cubic_coeffs``).
    The control of Kidger et al. (2020). Not causal.

    Raises:
        TypeError: non-float data or times.
        ValueError: times not strictly increasing, of the wrong shape, with NaN;
            fewer than two observation times; Inf in the data.
    """

    def _coefficients(self, times, values):
        values = _natural_fill(times, values)
        return _natural_fit(_broadcast_times(times, values), values, None)


class HermiteCubicSpline(AbstractSplineControl):
    r"""Cubic Hermite interpolation with backward differences: a causal, C¹ path.

    On :math:`[t_i, t_{i+1}]` with :math:`h = t_{i+1} - t_i`, :math:`\delta = (x_{i+1} - x_i)/h`
    and slopes :math:`m_0 = (x_i - x_{i-1})/(t_i - t_{i-1})` (for the first piece
    :math:`m_0 = \delta`) and :math:`m_1 = \delta`:
    :math:`a = x_i`, :math:`b = m_0`, :math:`c = 2(\delta - m_0)/h`, :math:`d = (m_0 - \delta)/h^2`
    (Morrill et al. 2021; torchcde's ``hermite_cubic_coefficients_with_backward_differences``).
    The piece on :math:`[t_i, t_{i+1}]` depends on :math:`x_{i-1}, x_i, x_{i+1}` only, so a
    model driven by it at time :math:`t` uses no later data than the next observation.
    Reproduces linear data exactly (not quadratics). Missing values: filled by
    linear interpolation between observed points, as in torchcde.
    """

    causal = True

    def _coefficients(self, times, values):
        values = _linear_fill(times, values)
        t_all = _broadcast_times(times, values)
        h = t_all.diff(dim=-2)
        slope = values.diff(dim=-2) / h
        m0 = torch.cat([slope[..., :1, :], slope[..., :-1, :]], dim=-2)
        a = values[..., :-1, :]
        return a, m0, 2.0 * (slope - m0) / h, (m0 - slope) / (h * h)


class LinearInterpolation(AbstractSplineControl):
    r"""Piecewise-linear interpolation of the observations: :math:`X(t) = x_i + \delta_i (t - t_i)` (C⁰, causal).

    Missing values are filled by linear interpolation between observed points.
    Its derivative jumps at the knots: give ``tstops=path.knots`` to an adaptive
    solver so that no step straddles a kink.
    """

    causal = True

    def _coefficients(self, times, values):
        values = _linear_fill(times, values)
        return _linear_fit(_broadcast_times(times, values), values, None)
