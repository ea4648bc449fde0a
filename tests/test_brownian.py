"""BrownianTree: the law of its increments and Lévy areas, reproducibility in any query order, exact
additivity, consistency of the Lévy area with the path, the control protocol, and its errors."""

import math

import pytest
import torch

from pylux.diffeq.brownian import BrownianTree
from pylux.diffeq.terms import ControlTerm

F64 = torch.float64
N = 20000                  # independent paths (entries of the shape) for the statistical tests
SIGMAS = 4.0               # statistical tests pass within this many standard errors


def _check_gaussian(x: torch.Tensor, var: float, what: str) -> None:
    """mean 0, variance ``var`` and kurtosis 3 within SIGMAS standard errors; a Kolmogorov–Smirnov test."""
    n = x.numel()
    mean, sample_var = x.mean().item(), x.var().item()
    assert abs(mean) < SIGMAS * math.sqrt(var / n), f"{what}: mean {mean}"
    assert abs(sample_var - var) < SIGMAS * var * math.sqrt(2.0 / n), f"{what}: variance {sample_var} vs {var}"
    kurtosis = ((x - mean) ** 4).mean().item() / sample_var ** 2
    # the sample kurtosis is skewed to the right: one more standard error than the other checks
    assert abs(kurtosis - 3.0) < (SIGMAS + 1) * math.sqrt(24.0 / n), f"{what}: kurtosis {kurtosis}"
    stats = pytest.importorskip("scipy.stats")
    assert stats.kstest((x / math.sqrt(var)).numpy(), "norm").pvalue > 1e-4, what


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack((a.flatten(), b.flatten())))[0, 1].item()


# intervals of very different lengths, none aligned with the tree's dyadic points; all above tol
# (the default tol is 2**-20 ~ 9.5e-7: the last interval spans about 7 leaves)
INTERVALS = [(0.0, 1.0), (0.1, 0.35), (0.5, 0.501), (0.7, 0.70003), (0.93, 0.93 + 7e-6)]
# with Lévy area the points inside leaves are exact in law too: the same intervals, down to ~7 leaves
LEVY_INTERVALS = INTERVALS


# --- the law -----------------------------------------------------------------------------------

@pytest.mark.parametrize("levy", [None, "space-time"])
def test_increments_are_gaussian_with_variance_h(levy):
    tree = BrownianTree(0.0, 1.0, (N,), seed=11, levy_area=levy)
    for s, t in INTERVALS:
        _check_gaussian(tree.increment(s, t), t - s, f"dW over [{s}, {t}]")


def test_brownian_covariance_min_s_t_on_a_shifted_span():
    # W(t) - W(t0) on [2, 5]: Cov(W_s, W_t) = min(s, t) - t0
    tree = BrownianTree(2.0, 5.0, (N,), seed=3)
    a, b = tree(2.9), tree(4.2)
    cov = (a * b).mean().item()
    assert abs(cov - 0.9) < SIGMAS * math.sqrt((0.9 * 2.2 + 0.9 ** 2) / N)
    _check_gaussian(b, 2.2, "W(4.2)")


def test_non_overlapping_increments_and_entries_and_seeds_are_uncorrelated():
    bound = SIGMAS / math.sqrt(N // 2)
    tree = BrownianTree(0.0, 1.0, (2, N // 2), seed=5)
    first, second, third = tree.increment(0.1, 0.3), tree.increment(0.3, 0.6), tree.increment(0.6, 0.600001)
    assert abs(_corr(first, second)) < bound
    assert abs(_corr(second, third)) < bound
    assert abs(_corr(first[0], first[1])) < bound          # entries of the shape are independent
    other = BrownianTree(0.0, 1.0, (2, N // 2), seed=6)
    assert abs(_corr(tree(1.0), other(1.0))) < bound         # different seeds: independent paths
    assert abs(_corr(tree(0.37), other(0.37))) < bound


def test_levy_area_is_gaussian_with_variance_h_over_12_and_independent_of_dw():
    bound = SIGMAS / math.sqrt(N)
    tree = BrownianTree(0.0, 1.0, (N,), seed=17, levy_area="space-time")
    for s, t in LEVY_INTERVALS:
        dw, dh = tree.increment(s, t, levy_area=True)
        _check_gaussian(dh, (t - s) / 12.0, f"H over [{s}, {t}]")
        assert abs(_corr(dw, dh)) < bound, (s, t)
    # Lévy areas of adjacent intervals are independent too
    _, h1 = tree.increment(0.2, 0.45, levy_area=True)
    _, h2 = tree.increment(0.45, 0.6, levy_area=True)
    assert abs(_corr(h1, h2)) < bound


def test_below_tol_points_in_distinct_leaves_have_the_exact_law():
    # without Lévy area each point is the Brownian bridge on its leaf, from the leaf's own normal: an
    # interval of half a leaf across a leaf boundary is exact in law; one strictly inside a leaf is not
    # (the documented approximation), while one starting on a leaf boundary is exact again
    leaf = 2.0 ** -10
    tree = BrownianTree(0.0, 1.0, (N,), seed=2, tol=leaf)
    _check_gaussian(tree.increment(300.75 * leaf, 301.25 * leaf), 0.5 * leaf, "across a leaf boundary")
    _check_gaussian(tree.increment(300 * leaf, 300.3 * leaf), 0.3 * leaf, "from a leaf boundary")
    _check_gaussian(tree.increment(300.37 * leaf, 302.61 * leaf), 2.24 * leaf, "2.24 leaves")
    inside = tree.increment(300.45 * leaf, 300.55 * leaf)
    assert inside.var().item() < 0.5 * (0.1 * leaf)
    # with Lévy area each point is (W_t, J_t) drawn from its exact conditional law given the leaf's
    # (W_a, W_b, H): exact across leaves (regression: a truncated Legendre expansion left the variances of
    # dW and H low by 6% and 20% over one leaf), too small strictly inside one leaf
    levy = BrownianTree(0.0, 1.0, (N,), seed=2, tol=leaf, levy_area="space-time")
    bound = SIGMAS / math.sqrt(N)
    for s, t in [(300.37, 301.37), (300.75, 301.25), (300.0, 300.3), (300.37, 302.61), (300.0, 308.0)]:
        dw, dh = levy.increment(s * leaf, t * leaf, levy_area=True)
        _check_gaussian(dw, (t - s) * leaf, f"dW over [{s}, {t}] leaves")
        _check_gaussian(dh, (t - s) * leaf / 12, f"H over [{s}, {t}] leaves")
        assert abs(_corr(dw, dh)) < bound, (s, t)
    inside = levy.increment(300.45 * leaf, 300.55 * leaf)
    assert inside.var().item() < 0.5 * (0.1 * leaf)


def test_a_coarse_levy_area_tree_is_exact_between_leaves():
    """Regression (diffrax's test_brownian spline case at tol = spacing): with leaves of width 1/4 the
    increment over [0.1, 0.4], whose ends lie in two leaves, had Var(dW)/h = 0.935 and Var(H)/(h/12) =
    0.783. Now 1 within 5 standard errors (sqrt(2/n) = 0.0032 here)."""
    n = 200_000
    tree = BrownianTree(0.0, 1.0, (n,), seed=0, tol=0.25, levy_area="space-time")
    for s, t in [(0.1, 0.4), (0.05, 0.9), (0.3, 0.55)]:
        dw, dh = tree.increment(s, t, levy_area=True)
        h = t - s
        assert abs(dw.var().item() / h - 1) < 5 * math.sqrt(2 / n), (s, t)
        assert abs(dh.var().item() / (h / 12) - 1) < 5 * math.sqrt(2 / n), (s, t)
        assert abs(_corr(dw, dh)) < 5 / math.sqrt(n) and abs(dw.mean().item()) < 5 * math.sqrt(h / n)


@pytest.mark.parametrize("levy", [None, "space-time"])
def test_a_deeper_tree_with_the_same_seed_refines_the_path(levy):
    # the upper levels of a tree depend only on the seed and the span: a tree with a smaller tol has the
    # same values at the coarse tree's dyadic points and at its leaves' midpoints
    coarse = BrownianTree(0.0, 2.0, (16,), seed=41, tol=2.0 ** -7, levy_area=levy)
    fine = BrownianTree(0.0, 2.0, (16,), seed=41, tol=2.0 ** -12, levy_area=levy)
    step = 2.0 ** -8  # the coarse leaves' midpoints too: a leaf's point there is the split's (W_m, J_m)
    for k in range(0, int(2.0 / step) + 1, 7):
        assert torch.allclose(coarse(k * step), fine(k * step), rtol=0.0, atol=1e-13), k
    if levy:
        for s, t in [(0.0, 1.0), (3 * step, 40 * step), (100 * step, 101 * step)]:
            for a, b in zip(coarse.increment(s, t, levy_area=True), fine.increment(s, t, levy_area=True)):
                assert torch.allclose(a, b, rtol=0.0, atol=1e-12), (s, t)
# --- reproducibility, additivity, symmetry ----------------------------------------------------

@pytest.mark.parametrize("levy", [None, "space-time"])
def test_values_do_not_depend_on_query_order_or_on_the_cache(levy):
    shape = (3, 5)
    forward = BrownianTree(0.0, 1.0, shape, seed=4, levy_area=levy)
    backward = BrownianTree(0.0, 1.0, shape, seed=4, levy_area=levy)
    uncached = BrownianTree(0.0, 1.0, shape, seed=4, levy_area=levy, cache_size=0)
    times = [0.7, 0.3, 0.31, 0.9999, 0.0, 1.0, 0.5, 0.123456789]
    a = [forward(t) for t in times]
    b = [backward(t) for t in reversed(times)][::-1]
    c = [uncached(t) for t in times]
    for t, x, y, z in zip(times, a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z), t
        assert torch.equal(forward(t), x), t                  # re-query gives the same values
    if levy:
        k = (0.3, 0.7)
        first = forward.increment(*k, levy_area=True)
        forward.increment(0.05, 0.95, levy_area=True)
        again = forward.increment(*k, levy_area=True)
        fresh = BrownianTree(0.0, 1.0, shape, seed=4, levy_area=levy, cache_size=0).increment(*k, levy_area=True)
        for x, y, z in zip(first, again, fresh):
            assert torch.equal(x, y) and torch.equal(x, z)


def test_small_cache_stays_bounded_and_does_not_change_values():
    tree = BrownianTree(0.0, 1.0, (4,), seed=9, cache_size=5)
    reference = BrownianTree(0.0, 1.0, (4,), seed=9)
    for k in range(40):
        t = (k * 0.618034) % 1.0
        assert torch.equal(tree(t), reference(t))
        assert len(tree._nodes) <= 5


def test_query_cost_is_logarithmic_and_warm_queries_build_nothing():
    tree = BrownianTree(0.0, 1.0, (4,), seed=1)              # depth 20
    tree(0.3)
    assert tree.nodes_built == 20                             # one split per level, root to leaf
    tree(0.3)
    tree.increment(0.3, 0.3)
    assert tree.nodes_built == 20                             # warm: nothing new
    tree(0.301)                                               # a nearby point shares the upper tree:
    diverge = (int(0.3 * 2 ** 20) ^ int(0.301 * 2 ** 20)).bit_length()   # only the levels below the
    assert 0 < diverge < 20 and tree.nodes_built == 20 + diverge       # paths' last common node are new
    deep = BrownianTree(0.0, 1.0, (4,), seed=1, tol=2.0 ** -40)
    deep(0.3)
    assert deep.depth == 40 and deep.nodes_built == 40


@pytest.mark.parametrize("levy", [None, "space-time"])
def test_dyadic_times_are_read_off_shallow_nodes_bitwise_as_the_leaf_would_give(levy):
    shallow = BrownianTree(0.0, 2.0, (3, 4), seed=6, levy_area=levy)   # depth 20
    leafwise = BrownianTree(0.0, 2.0, (3, 4), seed=6, levy_area=levy)
    for k in range(65):  # t = 2k/64: boundaries of nodes at depth <= 6, and t0 and t1 themselves
        x = k / 64
        offset, u = min(int(x * 2 ** 20), 2 ** 20 - 1), x * 2 ** 20 - min(int(x * 2 ** 20), 2 ** 20 - 1)
        expect = leafwise._leaf_point(offset, u)
        got = shallow._point(x)
        assert all(torch.equal(a, b) for a, b in zip(got, expect)), k
    # regression (cost): a fixed step of span/64 used to walk 20 levels down per query, ~16 splits a
    # step; now each time is a node of the depth-6 tree, at most the 2**7 - 2 nodes below the root
    tree = BrownianTree(0.0, 2.0, (3, 4), seed=6, levy_area=levy)
    increments = [tree.increment(2 * k / 64, 2 * (k + 1) / 64) for k in range(64)]
    assert tree.nodes_built <= 2 ** 7 - 2, tree.nodes_built
    torch.testing.assert_close(sum(increments), tree(2.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("levy", [None, "space-time"])
def test_exact_additivity_start_at_zero_and_reversal(levy):
    tree = BrownianTree(-1.0, 2.0, (64,), seed=8, levy_area=levy)
    assert torch.equal(tree(-1.0), torch.zeros(64, dtype=F64))
    for s, t, u in [(-1.0, 0.3, 2.0), (0.1, 0.1000004, 0.2), (1.5, 1.2, 1.9), (0.3, 0.3, 0.9)]:
        whole = tree.increment(s, u)
        parts = tree.increment(s, t) + tree.increment(t, u)
        assert torch.allclose(whole, parts, rtol=0.0, atol=1e-12), (s, t, u)
        assert torch.equal(tree.increment(t, s), -tree.increment(s, t))
        assert torch.equal(tree.increment(s, t), tree(t) - tree(s))
    assert torch.equal(tree.increment(0.4, 0.4), torch.zeros(64, dtype=F64))
    if levy:
        dw, dh = tree.increment(0.2, 1.1, levy_area=True)
        rw, rh = tree.increment(1.1, 0.2, levy_area=True)
        assert torch.equal(rw, -dw)
        assert torch.allclose(rh, dh, rtol=0.0, atol=1e-12)    # H is even under reversal of the interval
        zw, zh = tree.increment(0.4, 0.4, levy_area=True)
        assert torch.equal(zh, torch.zeros(64, dtype=F64))


def _integral(tree, s, t):
    """∫_s^t (W_r - W_s) dr = h (H + dW/2) from the tree's (dW, H)."""
    dw, dh = tree.increment(s, t, levy_area=True)
    return (t - s) * (dh + dw / 2), dw


def test_levy_area_is_additive_through_the_time_integral():
    # ∫_s^u (W - W_s) = ∫_s^t (W - W_s) + ∫_t^u (W - W_t) + (u - t)(W_t - W_s), to 1e-10
    tree = BrownianTree(0.0, 3.0, (500,), seed=21, levy_area="space-time")
    splits = [(0.2, 0.45, 0.6), (0.0, 1.5, 3.0), (1.0, 1.0000001, 1.0000003), (2.2, 2.9999, 3.0),
              (0.7, 0.4, 2.5)]
    for s, t, u in splits:
        whole, _ = _integral(tree, s, u)
        left, dw_left = _integral(tree, s, t)
        right, _ = _integral(tree, t, u)
        err = (whole - (left + right + (u - t) * dw_left)).abs().max().item()
        assert err < 1e-10, (s, t, u, err)


def test_levy_area_is_the_area_of_a_much_finer_path():
    # the coarse tree's H over [s, t] is the space-time area of the path of a tree with the same seed
    # and 2**8 times finer leaves: the trapezoid rule on the fine leaves' ends misses their Lévy areas,
    # an error in H of standard deviation delta / sqrt(12 h) ~ 1.2e-5 for h = 1/8 (5 sigma allowed),
    # against a spread of sqrt(h/12) ~ 0.1 for H itself
    coarse = BrownianTree(0.0, 1.0, (50,), seed=19, tol=2.0 ** -8, levy_area="space-time")
    fine = BrownianTree(0.0, 1.0, (50,), seed=19, tol=2.0 ** -16, levy_area="space-time")
    delta = 2.0 ** -16
    s, t = 2.0 ** -3, 2.0 ** -2
    n = int((t - s) / delta)
    values = torch.stack([fine(s + k * delta) for k in range(n + 1)])
    trapezoid = delta * (values[1:-1].sum(0) + (values[0] + values[-1]) / 2) - (t - s) * values[0]
    dw, dh = coarse.increment(s, t, levy_area=True)
    assert torch.allclose(dw, values[-1] - values[0], rtol=0.0, atol=1e-12)
    err = (trapezoid / (t - s) - dw / 2 - dh).abs().max().item()
    assert err < 6e-5 and dh.abs().max().item() > 0.1


def test_seed_and_generator_give_reproducible_paths():
    a = BrownianTree(0.0, 1.0, (8,), seed=123, levy_area="space-time")
    b = BrownianTree(0.0, 1.0, (8,), seed=123, levy_area="space-time")
    c = BrownianTree(0.0, 1.0, (8,), seed=124, levy_area="space-time")
    for x, y in zip(a.increment(0.2, 0.9, levy_area=True), b.increment(0.2, 0.9, levy_area=True)):
        assert torch.equal(x, y)
    assert not torch.equal(a(0.5), c(0.5))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    p, q = BrownianTree(0.0, 1.0, (8,), generator=g1), BrownianTree(0.0, 1.0, (8,), generator=g2)
    assert p.seed == q.seed and torch.equal(p(0.4), q(0.4))
    r = BrownianTree(0.0, 1.0, (8,), generator=g1)          # the generator advanced: a new path
    assert not torch.equal(p(0.4), r(0.4))
    torch.manual_seed(0)
    u = BrownianTree(0.0, 1.0, (8,))
    torch.manual_seed(0)
    v = BrownianTree(0.0, 1.0, (8,))
    assert torch.equal(u(0.4), v(0.4))


# --- times, dtypes, the control protocol --------------------------------------------------------

def test_time_tensors_float32_times_and_output_dtype():
    tree = BrownianTree(0.0, 0.1, (6,), seed=0, levy_area="space-time")
    for dtype in (torch.float32, F64):
        s, t = torch.tensor(0.025, dtype=dtype), torch.tensor(0.1, dtype=dtype)   # float32 0.1 > 0.1
        expected = tree.increment(float(s), min(float(t), 0.1))
        assert torch.equal(tree.increment(s, t), expected)
    table = torch.tensor([0.0, 0.025, 0.05, 0.075, 0.1], dtype=F64)        # times that are entries of a table
    assert torch.equal(tree.increment(table[1], table[3]), tree.increment(0.025, 0.075))
    low = BrownianTree(0.0, 0.1, (6,), seed=0, dtype=torch.float32, levy_area="space-time")
    dw, dh = low.increment(0.01, 0.02, levy_area=True)
    assert dw.dtype == dh.dtype == torch.float32 and dw.shape == dh.shape == (6,)
    assert low(0.05).dtype == torch.float32
    scalar = BrownianTree(0.0, 1.0, (), seed=0)
    assert scalar(0.5).shape == () and scalar.increment(0.1, 0.2).shape == ()


def test_returned_tensors_are_fresh():
    tree = BrownianTree(0.0, 1.0, (4,), seed=0)
    first = tree(0.5).clone()
    tree(0.5).add_(100.0)
    tree.increment(0.0, 0.5).add_(100.0)
    assert torch.equal(tree(0.5), first)


def test_control_protocol_euler_reproduces_the_path():
    # du = I dW integrated by the engine's control term: Euler over any grid gives u(t) = W(t) exactly
    # up to rounding, with the engine's 0-d time tensors
    tree = BrownianTree(0.0, 1.0, (3,), seed=31)
    term = ControlTerm(lambda u, p, t: torch.eye(3, dtype=F64).expand(3, 3), tree)
    ts = torch.linspace(0.0, 1.0, 17, dtype=F64)
    u = torch.zeros(3, dtype=F64)
    for a, b in zip(ts[:-1], ts[1:]):
        u = u + term.prod(term.vf(u, None, a), term.contr(a, b))
    assert torch.allclose(u, tree(1.0), rtol=0.0, atol=1e-13)


def test_repr_is_short():
    text = repr(BrownianTree(0.0, 1.0, (512, 32), seed=0, levy_area="space-time"))
    assert text.startswith("BrownianTree(") and "space-time" in text and len(text) < 160


# --- errors -----------------------------------------------------------------------------------

def test_bad_inputs_raise_errors_naming_the_fix():
    with pytest.raises(ValueError, match="t0 < t1"):
        BrownianTree(1.0, 1.0, (2,), seed=0)
    with pytest.raises(ValueError, match="t0 < t1"):
        BrownianTree(1.0, 0.0, (2,), seed=0)
    with pytest.raises(ValueError, match="finite"):
        BrownianTree(0.0, math.inf, (2,), seed=0)
    tree = BrownianTree(0.0, 1.0, (2,), seed=0)
    with pytest.raises(ValueError, match=r"outside the span \[0.0, 1.0\].*covers every query time"):
        tree(1.5)
    with pytest.raises(ValueError, match="outside the span"):
        tree.increment(-0.1, 0.5)
    with pytest.raises(ValueError, match="outside the span"):
        tree(math.nan)
    with pytest.raises(ValueError, match="levy_area='space-time'"):
        tree.increment(0.1, 0.2, levy_area=True)
    with pytest.raises(ValueError, match="None or 'space-time'"):
        BrownianTree(0.0, 1.0, (2,), seed=0, levy_area="davie")
    with pytest.raises(ValueError, match="either seed or generator"):
        BrownianTree(0.0, 1.0, (2,), seed=0, generator=torch.Generator())
    with pytest.raises(TypeError, match="torch.Generator"):
        BrownianTree(0.0, 1.0, (2,), generator=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        BrownianTree(0.0, 1.0, (2,), seed=1.5)
    with pytest.raises(ValueError, match="tol must be a positive"):
        BrownianTree(0.0, 1.0, (2,), seed=0, tol=0.0)
    with pytest.raises(ValueError, match=r"tol >= \(t1 - t0\) \* 2\*\*-52"):
        BrownianTree(0.0, 1.0, (2,), seed=0, tol=1e-20)
    with pytest.raises(ValueError, match="shape must be a tuple of ints"):
        BrownianTree(0.0, 1.0, (2, -1), seed=0)
    with pytest.raises(TypeError, match="floating"):
        BrownianTree(0.0, 1.0, (2,), seed=0, dtype=torch.int64)
    with pytest.raises(TypeError, match="one time at a time"):
        tree(torch.tensor([0.1, 0.2]))
