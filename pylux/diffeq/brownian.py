r"""Brownian paths that can be queried at any time, in any order, reproducibly.

:class:`BrownianTree` is a *virtual Brownian tree* (Li, Wong, Chen & Duvenaud,
"Scalable gradients for stochastic differential equations", AISTATS 2020):
the path is never stored. Its values at the dyadic points of ``[t0, t1]`` are
defined by recursive bisection, each midpoint drawn from the Brownian bridge
between its node's endpoints with random numbers seeded by the node's
position in the tree, so that every query (forward, backward, repeated, out of
order) sees the same path. Optionally each node also carries the space-time
Lévy area, as in the Brownian interval of Kidger, Foster, Li, Oberhauser &
Lyons ("Efficient and accurate gradients for neural SDEs", NeurIPS 2021) and
the single-seed Brownian simulation of Jelinčič, Foster & Kidger
("Single-seed generation of Brownian paths and integrals for adaptive and high
order SDE solvers", 2024), so that higher-order additive-noise solvers
(SRA/SOSRA, ShARK) can be given ``(ΔW, ΔH)`` over any step.

The mathematics
---------------
Write ``W`` for a standard Brownian motion with ``W(t0) = 0`` (each entry of
``shape`` independent), and for an interval ``[s, t]`` with ``h = t - s``

.. math::
    ΔW_{s,t} = W_t - W_s, \qquad
    H_{s,t} = \frac{1}{h}\int_s^t (W_r - W_s)\,dr - \frac{1}{2} ΔW_{s,t}.

``H`` is the space-time Lévy area (Foster, "Numerical approximations for
stochastic differential equations", DPhil thesis, Oxford 2020): it is the
mean of the Brownian bridge ``W_r - W_s - (r - s)/h · ΔW`` over the interval,
so ``H ~ N(0, h/12)`` independently of ``ΔW ~ N(0, h)``.

*Splitting a node.* A node ``[a, b]`` of width ``h`` knows ``W_a``, ``W_b``
(hence ``ΔW``) and, with Lévy area, ``H = H_{a,b}``. Its halves
``[a, m]``, ``[m, b]`` carry independent ``(ΔW_i, H_i) ~ N(0, h/2) × N(0, h/24)``
before conditioning. Writing the integral over ``[a, b]`` as the sum of the
integrals over the halves gives the two linear constraints

.. math::
    ΔW = ΔW_1 + ΔW_2, \qquad H = \tfrac{1}{2}(H_1 + H_2) + \tfrac{1}{4}(ΔW_1 - ΔW_2),

and Gaussian conditioning on them (derived for this module; the same
splitting formulas are Foster's, and are used by the Brownian interval and by
diffrax's ``VirtualBrownianTree``) gives, with ``Z₁, Z₂ ~ N(0, 1)`` drawn for
the node,

.. math::
    W_m &= \tfrac{1}{2}(W_a + W_b) + \tfrac{3}{2} H + \tfrac{\sqrt h}{4} Z_1, \\
    H_{1,2} &= \tfrac{1}{4} H - \tfrac{\sqrt h}{8} Z_1 \pm \tfrac{1}{2}\sqrt{h/12}\, Z_2 .

Without Lévy area this is the Brownian bridge midpoint
``W_m = (W_a + W_b)/2 + (√h/2) Z₁``. Each node also carries
``J_a = ∫_{t0}^a W_r dr``; the right half's ``J_m = J_a + (h/2)(W_a/2 + W_m/2 + H_1)``.
A visited node costs one random draw for the whole ``shape`` and a few
elementwise operations; a half shares the rows it inherits (``W_a`` and
``J_a`` on the left, ``W_b`` on the right) with its parent.

*Below the tolerance.* The tree has ``depth = ⌈log₂((t1 - t0)/tol)⌉`` levels;
a query at ``t`` descends to the leaf ``[a, b]`` (width ``ℓ ≤ tol``) that
holds it and, with ``u = (t - a)/ℓ`` and ``p = u(1 - u)``, evaluates a
deterministic function of ``u`` and the leaf's own normals ``Z₁, Z₂`` (the
ones a further split of the leaf would use):

* without Lévy area, the Brownian bridge at ``t``,
  ``W_t = W_a + u ΔW + √(ℓp) Z₁``. A single point then has exactly the law of
  Brownian motion given the tree, and since the bridges of different leaves
  are conditionally independent, *any set of query points in distinct leaves
  has exactly the joint law of Brownian motion*; at a leaf's midpoint this is
  the value a deeper tree with the same seed would sample.
* with Lévy area, ``(W_t, J_t)`` from its exact conditional law given the
  leaf's ``(W_a, W_b, H)``. Both are linear functionals of the path, so the
  law is Gaussian, with the mean and covariance of Gaussian conditioning
  (derived for this module from ``Cov(B_s, B_r) = min(s, r)`` on the leaf):

  .. math::
      W_t &= W_a + u ΔW + 6pH + \sqrt{ℓ}\, L_{11} Z_1, \\
      J_t &= J_a + ℓ[u W_a + u²ΔW/2 + (3u² - 2u³)H] + ℓ^{3/2}(L_{21} Z_1 + L_{22} Z_2),

  with ``L`` the Cholesky factor of the conditional covariance
  ``[[p(1 - 3p), p²(1 - 2u)/2], [p²(1 - 2u)/2, p³/3]]`` (in units of the
  leaf): ``L₁₁ = √(p(1 - 3p))``, ``L₂₁ = p²(1 - 2u)/(2L₁₁)``,
  ``L₂₂ = √(p³/(12(1 - 3p)))``. At a leaf's midpoint these are the split's
  ``(W_m, J_m)``: the values a deeper tree with the same seed samples.
  A single point, and any set of points in distinct leaves, then has exactly
  the joint law of ``(W, J)``, so the increments and Lévy areas of intervals
  whose ends lie in distinct leaves are exact in law at any ``tol`` (as
  diffrax's virtual Brownian tree).

Only points strictly inside the *same* leaf are approximate: they share the
leaf's normals, so an increment of length ``δ`` between them has a variance
of order ``δ²/ℓ`` rather than ``δ``. Choose ``tol`` below the steps a solver
takes (the default, ``2**-20`` of the span, is far below them).

Properties: the same seed gives the same path on a device type, queries in
any order give bitwise-identical values (the cache stores the results of the
same deterministic computation and never changes them), increments are
exactly additive up to rounding since every increment is a difference of
values ``W(t)``, and a query at a new time costs the node splits below the
deepest cached node on its way from the root (``depth`` of them cold, about
``log₂(Δt/tol)`` for a step ``Δt`` after the previous query) plus one draw
for its leaf, and ``O(1)`` at a recently queried time. A time on a node
boundary (``t0 + k·span·2**-d``, as every time of a fixed-step solve with
``dt = span·2**-d``) is read off the shallowest node starting there, whose
values the leaf inherits bitwise: a fixed-step solve then builds about one
node a step.
"""

from __future__ import annotations

import math
from collections import OrderedDict
import torch

from ._device import host_time
from .terms import AbstractControl

__all__ = ["BrownianTree"]

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MAX_DEPTH = 52
_LEVY_AREAS = (None, "space-time")
_F32_EPS = float(torch.finfo(torch.float32).eps)


def _mix64(z: int) -> int:
    """The SplitMix64 finaliser (Steele, Lea & Flood, OOPSLA 2014): a bijective 64-bit hash."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class BrownianTree(AbstractControl):
    r"""A Brownian motion on ``[t0, t1]`` queried at any time, reproducibly, from one seed.

    ``tree(t)`` is ``W(t) - W(t0)`` (so ``W(t0) = 0``) and
    ``tree.increment(s, t)`` is ``W(t) - W(s)`` for any ``s, t`` in
    ``[t0, t1]`` (``s > t`` gives the negative). With
    ``levy_area="space-time"``, ``tree.increment(s, t, levy_area=True)``
    returns ``(ΔW, ΔH)`` with ``ΔH`` the space-time Lévy area
    ``(1/h)∫_s^t (W_r - W_s) dr - ΔW/2``, ``h = t - s``; reversing the interval
    negates ``ΔW`` and leaves ``ΔH`` unchanged (the formula with ``h < 0``).
    The algorithm, its formulas and its sources are in the module docstring.

    Args:
        t0, t1: the span (host floats or 0-d tensors), ``t0 < t1``.
        shape: the shape of ``W(t)``, e.g. ``(batch, m)``; every entry is an
            independent Brownian motion.
        seed: an int seeding the path. ``None`` (with no ``generator``) draws
            one from torch's global generator, so ``torch.manual_seed`` makes
            it reproducible.
        generator: a ``torch.Generator`` from which one integer seed is drawn
            at construction (advancing it), instead of ``seed``.
        dtype: the floating dtype of the returned tensors. The tree computes
            in float64 and rounds its results once; its normal draws are
            float32 for every dtype (three to five times cheaper on a CPU than
            float64 draws), so a float32 and a float64 tree with the same seed
            are the same path, to the precision of the dtype.
        device: where the random numbers are drawn and the results live. Each
            node's numbers come from a generator of that device, seeded from
            the node's position, so no host-to-device copy is made per query;
            CPU and CUDA therefore give different (each reproducible) paths
            for the same seed.
        tol: the width below which the tree stops bisecting (default
            ``(t1 - t0) · 2**-20``, a depth of 20); it must be at least
            ``(t1 - t0) · 2**-52``. Below it the path is interpolated from
            each leaf's own normals (exact in law at points in distinct
            leaves without Lévy area; see the module docstring for what is
            approximate).
        levy_area: ``None`` (increments only) or ``"space-time"`` (also the
            space-time Lévy area, for SRA/ShARK-type solvers).
        cache_size: how many tree nodes to keep (least recently used first
            out). A node shares the rows it inherits with its parent, so each
            adds at most 3 (with Lévy area, else 1) float64 tensors of
            ``shape``: at most 384 KiB for ``shape=(512, 32)``. The last 8
            queried times are kept as well. The caches only save work; they
            never change a value.

    Times may be host floats or 0-d tensors of any float dtype and device
    (read on the host, through the loop's host-time table when it knows the
    tensor); times within float32 rounding of an end of the span
    (``2·eps_float32·max(|t0|, |t1|)``) are clamped onto it. The results do
    not depend on the times through autograd. One tree is not safe to query
    from several threads at once.

    Raises:
        ValueError: ``t0 >= t1``, a non-finite time, a bad ``shape``,
            ``tol`` or ``levy_area``, both ``seed`` and ``generator``.
        TypeError: a non-floating ``dtype``, a non-int ``seed``, a
            ``generator`` that is not a ``torch.Generator``.
    """

    def __init__(self, t0, t1, shape, *, seed: int | None = None, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu", tol: float | None = None,
                 levy_area: str | None = None, cache_size: int = 64) -> None:
        t0, t1 = float(host_time(t0)), float(host_time(t1))
        if not (math.isfinite(t0) and math.isfinite(t1)):
            raise ValueError(f"BrownianTree: t0 and t1 must be finite, got t0={t0!r}, t1={t1!r}")
        if not t0 < t1:
            raise ValueError(f"BrownianTree: need t0 < t1, got t0={t0!r}, t1={t1!r}; build the tree over the "
                             "forward span (increment(s, t) with s > t gives a reverse-time increment)")
        self.t0, self.t1 = t0, t1
        self.span = t1 - t0
        self.shape = self._check_shape(shape)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"BrownianTree: dtype must be a floating torch.dtype, got {dtype!r}")
        self.dtype = dtype
        self.device = self._check_device(device)
        if levy_area not in _LEVY_AREAS:
            raise ValueError(f"BrownianTree: levy_area must be None or 'space-time', got {levy_area!r}")
        self.levy_area = levy_area
        self.tol, self.depth = self._check_tol(tol)
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"BrownianTree: cache_size must be an int >= 0, got {cache_size!r}")
        self.cache_size = cache_size
        self.seed = self._draw_seed(seed, generator)

        self._work = torch.float32 if self.device.type == "mps" else torch.float64
        # normals are drawn in float32 for every dtype: three times cheaper than float64 on the CPU, they
        # resolve the Gaussian to 2**-24 relative (far below any solver's strong error), and the same seed
        # then gives the same path in either dtype
        self._draw = torch.float32
        self._numel = math.prod(self.shape)
        self._slack = 2.0 * _F32_EPS * max(abs(t0), abs(t1)) / self.span + 1e-12
        self._base = _mix64(self.seed ^ 0x6A09E667F3BCC908)
        try:
            self._generator = torch.Generator(device=self.device)
            self._draw_device = self.device
        except RuntimeError:  # a device without its own generator: draw on the CPU and move
            self._generator = torch.Generator()
            self._draw_device = torch.device("cpu")
        self._root = self._make_root()
        self._nodes: OrderedDict[int, tuple[torch.Tensor, ...]] = OrderedDict()
        self._points: OrderedDict[float, tuple[torch.Tensor, ...]] = OrderedDict()
        #: how many nodes have been split since construction (a cost counter; cache misses)
        self.nodes_built = 0

    # --- construction helpers -------------------------------------------------------------------

    @staticmethod
    def _check_shape(shape) -> tuple[int, ...]:
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        try:
            out = tuple(shape)
        except TypeError:
            raise ValueError(f"BrownianTree: shape must be a tuple of ints, got {shape!r}") from None
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in out):
            raise ValueError(f"BrownianTree: shape must be a tuple of ints >= 0, got {shape!r}")
        return out

    @staticmethod
    def _check_device(device) -> torch.device:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def _check_tol(self, tol) -> tuple[float, int]:
        if tol is None:
            return self.span * 2.0 ** -20, 20
        tol = float(host_time(tol))
        if not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"BrownianTree: tol must be a positive finite width, got {tol!r}")
        depth = 0
        while self.span * 2.0 ** -depth > tol:
            depth += 1
            if depth > _MAX_DEPTH:
                raise ValueError(f"BrownianTree: tol={tol!r} is below the resolution of float64 times over a "
                                 f"span of {self.span!r}; use tol >= (t1 - t0) * 2**-{_MAX_DEPTH} = "
                                 f"{self.span * 2.0 ** -_MAX_DEPTH!r}")
        return tol, depth

    @staticmethod
    def _draw_seed(seed, generator) -> int:
        if seed is not None and generator is not None:
            raise ValueError("BrownianTree: pass either seed or generator, not both")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"BrownianTree: generator must be a torch.Generator, got {type(generator).__name__}")
            draw = torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device)
            return int(draw.cpu()[0])
        if seed is None:
            return int(torch.randint(0, 2 ** 62, (1,))[0])
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"BrownianTree: seed must be an int, got {type(seed).__name__}")
        return seed & _MASK64

    def _normals(self, index: int, rows: int) -> torch.Tensor:
        """The standard normals of node ``index`` (``0`` for the root's endpoint values): ``(rows, numel)``."""
        self._generator.manual_seed(_mix64((self._base + index * _GOLDEN_GAMMA) & _MASK64))
        z = torch.randn((rows, self._numel), generator=self._generator, dtype=self._draw, device=self._draw_device)
        return z if self._draw_device == self.device else z.to(self.device)

    def _make_root(self) -> tuple[torch.Tensor, ...]:
        z = self._normals(0, 2).to(self._work)
        zero = torch.zeros(self._numel, dtype=self._work, device=self.device)
        w_b = z[0].mul_(math.sqrt(self.span))
        if self.levy_area is None:
            return zero, w_b
        return zero, w_b, zero, z[1].mul_(math.sqrt(self.span / 12.0))

    def _split(self, state: tuple[torch.Tensor, ...], depth: int, index: int, side: int):
        """The ``side`` (0 left, 1 right) half of the node ``index`` at ``depth`` with ``state``.

        A state is ``(W_a, W_b)``, or ``(W_a, W_b, J_a, H)`` with Lévy area, each of ``numel`` entries; the
        rows a half shares with its parent are the parent's tensors (the formulas are the module docstring's).
        """
        h = self.span * 2.0 ** -depth
        r = math.sqrt(h)
        self.nodes_built += 1
        if self.levy_area is None:
            z = self._normals(index, 1)[0]
            w_m = torch.lerp(state[0], state[1], 0.5).add_(z, alpha=r / 2)
            return (state[0], w_m) if side == 0 else (w_m, state[1])
        w_a, w_b, j_a, area = state
        z = self._normals(index, 2)
        c = r / (2.0 * math.sqrt(12.0))
        w_m = torch.lerp(w_a, w_b, 0.5).add_(area, alpha=1.5).add_(z[0], alpha=r / 4)
        common = torch.mul(area, 0.25).add_(z[0], alpha=-r / 8)
        area_left = torch.add(common, z[1], alpha=c)
        if side == 0:
            return w_a, w_m, j_a, area_left
        j_m = torch.lerp(w_a, w_m, 0.5).add_(area_left).mul_(h / 2).add_(j_a)
        return w_m, w_b, j_m, common.add_(z[1], alpha=-c)

    # --- the tree -------------------------------------------------------------------------------

    def _node(self, depth: int, offset: int) -> tuple[torch.Tensor, ...]:
        """The state of the node ``offset`` at ``depth`` (heap index ``2**depth + offset``)."""
        nodes = self._nodes
        state = nodes.get((1 << depth) + offset)
        if state is not None:
            nodes.move_to_end((1 << depth) + offset)
            return state
        # walk up to the deepest known ancestor, then split down to the node
        d, j, state = depth, offset, None
        while d > 0:
            d, j = d - 1, j >> 1
            if d == 0:
                state = self._root
                break
            state = nodes.get((1 << d) + j)
            if state is not None:
                break
        if d > 0:  # keep the ancestors of a hit node fresh so the upper tree survives the eviction order
            a, k = d, j
            while a > 0:
                if ((1 << a) + k) in nodes:
                    nodes.move_to_end((1 << a) + k)
                a, k = a - 1, k >> 1
        while d < depth:
            side = (offset >> (depth - d - 1)) & 1
            state = self._split(state, d, (1 << d) + j, side)
            d, j = d + 1, 2 * j + side
            if self.cache_size:
                nodes[(1 << d) + j] = state
                if len(nodes) > self.cache_size:
                    nodes.popitem(last=False)
        return state

    def _time(self, t) -> float:
        """The query time as a fraction ``x = (t - t0)/(t1 - t0)`` in ``[0, 1]``."""
        if isinstance(t, torch.Tensor) and t.numel() != 1:
            raise TypeError(f"BrownianTree: a time must be a number or a 0-d tensor, got a tensor of shape "
                            f"{tuple(t.shape)}; query one time at a time")
        value = float(host_time(t.reshape(()) if isinstance(t, torch.Tensor) and t.dim() else t))
        x = (value - self.t0) / self.span
        if not (-self._slack <= x <= 1.0 + self._slack):  # also rejects NaN
            raise ValueError(f"BrownianTree: time {value!r} is outside the span [{self.t0!r}, {self.t1!r}] of "
                             f"the tree; build the tree over a span that covers every query time")
        return min(max(x, 0.0), 1.0)

    def _point(self, x: float) -> tuple[torch.Tensor, ...]:
        """``(W,)`` or ``(W, J)`` (``J = ∫_{t0} W``) at the fraction ``x``, flat, in the working dtype."""
        points = self._points
        cached = points.get(x)
        if cached is not None:
            points.move_to_end(x)
            return cached
        leaves = 1 << self.depth
        y = x * leaves
        offset = min(int(y), leaves - 1)
        u = y - offset
        if u == 0.0:
            return self._remember(x, self._boundary_point(offset))
        return self._remember(x, self._leaf_point(offset, u))

    def _boundary_point(self, offset: int) -> tuple[torch.Tensor, ...]:
        """The point at the left end of leaf ``offset``, read off the shallowest node starting there.

        A left half inherits its parent's ``W_a`` and ``J_a`` tensors, so that node's values are the
        leaf's, bitwise; a fixed step of ``span · 2**-k`` then costs about one split a step instead of
        the ``depth - k`` splits of the walk down to the leaf.
        """
        if offset == 0:
            state = self._root
        else:
            zeros = (offset & -offset).bit_length() - 1
            state = self._node(self.depth - zeros, offset >> zeros)
        return (state[0],) if self.levy_area is None else (state[0], state[2])

    def _leaf_point(self, offset: int, u: float) -> tuple[torch.Tensor, ...]:
        """The point at the fraction ``u`` of leaf ``offset``: the leaf's interpolant (module docstring)."""
        state = self._node(self.depth, offset) if self.depth else self._root
        w = torch.lerp(state[0], state[1], u)
        p = u * (1.0 - u)
        width = self.span * 2.0 ** -self.depth
        if self.levy_area is None:
            # the Brownian bridge at t, from the leaf's own normals (those a further split would use)
            if p > 0.0:
                w.add_(self._normals((1 << self.depth) + offset, 1)[0], alpha=math.sqrt(width * p))
            return (w,)
        # the bridge's conditional mean given the leaf's (W_a, W_b, H), and its exact time integral
        w_a, w_b, j_a, area = state
        w.add_(area, alpha=6.0 * p)
        j = torch.lerp(w_a, w_b, 0.5 * u).mul_(width * u).add_(area, alpha=width * u * u * (3.0 - 2.0 * u))
        if p > 0.0:  # the exact conditional law of (W_t, J_t), from the leaf's own normals
            z = self._normals((1 << self.depth) + offset, 2)
            l11 = math.sqrt(p * (1.0 - 3.0 * p))
            l21, l22 = p * p * (1.0 - 2.0 * u) / (2.0 * l11), math.sqrt(p ** 3 / (12.0 * (1.0 - 3.0 * p)))
            w.add_(z[0], alpha=math.sqrt(width) * l11)
            j.add_(z[0], alpha=width ** 1.5 * l21).add_(z[1], alpha=width ** 1.5 * l22)
        return w, j.add_(j_a)

    def _remember(self, x: float, out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        points = self._points
        if self.cache_size:
            points[x] = out
            if len(points) > 8:
                points.popitem(last=False)
        return out

    # --- queries --------------------------------------------------------------------------------

    @torch.compiler.disable
    def __call__(self, t) -> torch.Tensor:
        """``W(t) - W(t0)``: a tensor of ``shape`` and ``dtype`` on ``device``."""
        w = self._point(self._time(t))[0].reshape(self.shape)
        return w.to(self.dtype) if self.dtype != w.dtype else w.clone()

    @torch.compiler.disable
    def increment(self, s, t, levy_area: bool = False):
        """``W(t) - W(s)``, or ``(ΔW, ΔH)`` with the space-time Lévy area when ``levy_area=True``.

        Args:
            s, t: times in ``[t0, t1]`` (host floats or 0-d tensors); ``s > t``
                gives the reverse-time increment ``-(W(s) - W(t))`` and the
                same Lévy area as over ``[t, s]``.
            levy_area: also return ``ΔH = (1/h)∫_s^t (W_r - W_s) dr - ΔW/2``.

        Returns:
            a tensor of ``shape``, ``dtype`` on ``device``; with ``levy_area``,
            a pair of them.

        Raises:
            ValueError: a time outside ``[t0, t1]``; ``levy_area=True`` on a
                tree built without ``levy_area="space-time"``.
        """
        if levy_area and self.levy_area is None:
            raise ValueError("BrownianTree: this tree does not carry Lévy area; construct it with "
                             "BrownianTree(..., levy_area='space-time') to ask for increment(s, t, levy_area=True)")
        xs, xt = self._time(s), self._time(t)
        if xs == xt:
            zero = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            return (zero, zero.clone()) if levy_area else zero
        p_s, p_t = self._point(xs), self._point(xt)
        dw = p_t[0] - p_s[0]
        out = dw.reshape(self.shape).to(self.dtype)
        if not levy_area:
            return out
        h = (xt - xs) * self.span
        area = (p_t[1] - p_s[1]).sub_(p_s[0], alpha=h).div_(h).sub_(dw, alpha=0.5)
        return out, area.reshape(self.shape).to(self.dtype)

    def __repr__(self) -> str:
        levy = f", levy_area={self.levy_area!r}" if self.levy_area is not None else ""
        return (f"BrownianTree(t0={self.t0!r}, t1={self.t1!r}, shape={self.shape}{levy}, depth={self.depth}, "
                f"dtype={self.dtype}, device={self.device})")
