"""ODE-RNN and Latent ODE: the GRU, the hand-rolled loop, per-sample times, the ELBO, gradients, bad input."""

import pytest
import torch

import pylux as lx
from pylux import nn
from pylux.core import LayerError, tree_leaves
from pylux.diffeq import RK4, ODEProblem, solve
from pylux.layers.odernn import GRUCell, gaussian_kl, kl_annealing, masked_gaussian_log_likelihood



pytestmark = pytest.mark.usefixtures("float64_default")

C, H = 2, 4


def _dynamics():
    return nn.Chain(nn.Dense(H, 8, torch.tanh), nn.Dense(8, H))


def test_gru_cell_equals_torch():
    cell = GRUCell(3, 5)
    ps = cell.init_params(torch.Generator().manual_seed(0))
    ref = torch.nn.GRUCell(3, 5).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ref, name).copy_(ps[name])
    x, h = torch.randn(7, 3), torch.randn(7, 5)
    assert torch.allclose(cell((x, h), ps, {})[0], ref(x, h), atol=1e-14)


def _hand_rolled(rnn, ps, st, times, values, mask, steps):
    """GRU updates and solves of dh/dt = f(h) over [t_i, t_{i+1}] in the original time, one sample at a time."""
    out = []
    for b in range(values.shape[0]):
        h = torch.zeros(1, H)
        tb = times if times.dim() == 1 else times[b]
        order = range(len(tb) - 1, -1, -1) if rnn.reverse else range(len(tb))
        prev = None
        for i in order:
            if prev is not None and float(tb[i]) != float(tb[prev]):
                def f(u, p, t):
                    return rnn.dynamics(u, p, st["ode"]["model"]["dynamics"])[0]
                sol = solve(ODEProblem(f, h, (float(tb[prev]), float(tb[i])), ps["dynamics"]), RK4(),
                            dt=abs(float(tb[i]) - float(tb[prev])) / steps)
                h = sol.u[-1]
            m = mask[b:b + 1, i]
            if bool(m.any()):
                x_in = torch.cat([torch.where(m, values[b:b + 1, i], 0.0), m.double()], dim=-1)
                h = rnn.cell((x_in, h), ps["cell"], {})[0]
            prev = i
        out.append(h[0])
    return torch.stack(out)


@pytest.mark.parametrize("reverse", [False, True])
def test_fixed_grid_equals_a_hand_rolled_loop(reverse):
    g = torch.Generator().manual_seed(1)
    times = torch.tensor([0.0, 0.2, 0.25, 0.7, 1.3, 1.4])
    values = torch.randn(3, 6, C, generator=g)
    mask = torch.rand(3, 6, C, generator=g) < 0.6
    mask[:, 0] = True
    rnn = lx.ODERNN(_dynamics(), C, H, solver=RK4(), dt=0.25, reverse=reverse)
    ps, st = lx.setup(torch.Generator().manual_seed(2), rnn)
    _, h, st1 = rnn.run(times, values, mask, ps, st)
    ref = _hand_rolled(rnn, ps, st, times, values, mask, steps=4)
    assert torch.allclose(h, ref, atol=1e-13)
    assert st1["nsolves"] == 5 and st1["nfe"] == 5 * 4 * 4


def test_per_sample_ragged_times_in_one_batch_equal_separate_runs():
    g = torch.Generator().manual_seed(3)
    rows = [torch.sort(torch.rand(k, generator=g)).values * 2 for k in (6, 4, 5)]
    T = 6
    times = torch.stack([torch.cat([r, r[-1].repeat(T - len(r))]) for r in rows])       # padding repeats
    values = torch.randn(3, T, C, generator=g)
    for b, r in enumerate(rows):
        values[b, len(r):] = float("nan")
    values[0, 2, 1] = float("nan")                                                       # a missing channel
    rnn = lx.ODERNN(_dynamics(), C, H, solver=RK4(), dt=0.125)
    ps, st = lx.setup(torch.Generator().manual_seed(4), rnn)
    hs, h, st1 = rnn.run(times, values, None, ps, st)
    assert st1["nsolves"] == 5                                                            # one per index
    for b, r in enumerate(rows):
        _, alone, _ = rnn.run(r, values[b:b + 1, :len(r)], None, ps, st)
        assert torch.allclose(h[b], alone[0], atol=1e-13)
    assert torch.allclose(hs[1, 3], hs[1, 5], atol=0)                                     # padded: unchanged
    # the reparametrised solve steps in s, so a batch equals the per-sample solves in t to round-off
    ref = _hand_rolled(rnn, ps, st, times, values, ~torch.isnan(values), steps=8)
    assert torch.allclose(h, ref, atol=1e-13)


def test_kl_and_log_likelihood_against_closed_forms():
    g = torch.Generator().manual_seed(5)
    mean, std = torch.randn(6, 3, generator=g), torch.rand(6, 3, generator=g) + 0.1
    q = torch.distributions.Normal(mean, std)
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    assert torch.allclose(gaussian_kl(mean, std), torch.distributions.kl_divergence(q, p).sum(-1), atol=1e-13)
    pred, target = torch.randn(6, 5, 2, generator=g), torch.randn(6, 5, 2, generator=g)
    mask = torch.rand(6, 5, 2, generator=g) < 0.5
    mask[:, 0, 0] = True
    target[~mask] = float("nan")
    ref = torch.stack([torch.distributions.Normal(pred[b][mask[b]], 0.3).log_prob(target[b][mask[b]]).mean()
                       for b in range(6)])
    assert torch.allclose(masked_gaussian_log_likelihood(pred, target, mask, 0.3), ref, atol=1e-12)
    assert float(masked_gaussian_log_likelihood(pred, target, torch.zeros_like(mask), 0.3).abs().max()) == 0.0
    assert kl_annealing(5) == 0.0 and abs(kl_annealing(110) - (1 - 0.99 ** 100)) < 1e-15


def _latent_ode(**kwargs):
    enc = lx.ODERNN(nn.Dense(H, H, torch.tanh), C, H, reverse=True, solver=RK4(), dt=0.5)
    return lx.LatentODE(enc, nn.Chain(nn.Dense(3, 8, torch.tanh), nn.Dense(8, 3)), nn.Dense(3, C), latent=3,
                        reltol=1e-6, abstol=1e-6, **kwargs)


def test_latent_ode_elbo_gradients_reach_every_parameter_and_modes():
    data = lx.data.periodic_series(5, n_times=12, seed=0, dtype=torch.float64)
    values = data["values"].expand(-1, -1, C).clone()
    model = _latent_ode()
    ps, st = lx.setup(torch.Generator().manual_seed(6), model)
    leaves = tree_leaves(ps)
    for leaf in leaves:
        leaf.requires_grad_(True)
    pred, st1 = model((data["times"], values, data["mask"].expand(-1, -1, C)), ps, st)
    assert pred.shape == values.shape and st1["rng"] != st["rng"] and st1["nfe"] > 0
    loss, info = model.loss(pred, values, None, st1, kl_weight=0.5)
    expected = -(masked_gaussian_log_likelihood(pred, values, ~torch.isnan(values), 0.01)
                 - 0.5 * gaussian_kl(st1["mean"], st1["std"])).mean()
    assert torch.allclose(loss, expected)
    grads = torch.autograd.grad(loss, leaves)
    assert all(bool((g != 0).any()) for g in grads), [tuple(x.shape) for x, g in zip(leaves, grads) if not g.any()]
    # test mode decodes the mean: deterministic
    a, _ = model((data["times"], values, None), ps, lx.testmode(st1))
    b, _ = model((data["times"], values, None), ps, lx.testmode(st1))
    assert torch.equal(a, b)
    # extrapolation encodes only the first half: changing the second half leaves the prediction unchanged
    extra = _latent_ode(mode="extrapolation")
    ps_e, st_e = lx.setup(torch.Generator().manual_seed(6), extra)
    later = values.clone()
    later[:, data["times"] >= 2.5] += 1.0
    query = data["times"][data["times"] >= 2.5]
    p1, _ = extra((data["times"], values, None, query), ps_e, lx.testmode(st_e))
    p2, _ = extra((data["times"], later, None, query), ps_e, lx.testmode(st_e))
    assert torch.equal(p1, p2) and p1.shape == (5, len(query), C)


def test_latent_ode_with_steer_decodes_by_intervals_in_training():
    data = lx.data.periodic_series(3, n_times=8, seed=1, dtype=torch.float64)
    model = _latent_ode(regularize=lx.STEER(0.5))
    ps, st = lx.setup(torch.Generator().manual_seed(7), model)
    values = data["values"].expand(-1, -1, C)
    pred, st1 = model((data["times"], values, None), ps, st)
    assert pred.shape == values.shape and st1["decoder_ode"]["rng"] != st["decoder_ode"]["rng"]
    test_pred, st2 = model((data["times"], values, None), ps, lx.testmode(st1))
    assert test_pred.shape == values.shape and st2["nfe"] > 0


def test_bad_input_is_refused_clearly():
    rnn = lx.ODERNN(_dynamics(), C, H)
    ps, st = lx.setup(torch.Generator().manual_seed(8), rnn)
    values = torch.randn(2, 4, C)
    times = torch.tensor([[0.0, 0.5, 0.4, 1.0], [0.0, 0.1, 0.2, 0.3]])
    with pytest.raises(LayerError, match="sample 0 are not sorted"):
        rnn((times, values), ps, st)
    with pytest.raises(LayerError, match="mask must have the values' shape"):
        rnn((times.sort(dim=1).values, values, torch.ones(2, 4)), ps, st)
    with pytest.raises(LayerError, match="3 channels but the layer was built with input_size=2"):
        rnn((times.sort(dim=1).values, torch.randn(2, 4, 3)), ps, st)
    with pytest.raises(ValueError, match="reverse=True"):
        lx.LatentODE(rnn, nn.Dense(3, 3), nn.Dense(3, C), latent=3)
    model = _latent_ode()
    ps_l, st_l = lx.setup(torch.Generator().manual_seed(8), model)
    with pytest.raises(LayerError, match="strictly increasing"):
        model((torch.tensor([0.0, 0.5, 1.0, 1.5]), values, None, torch.tensor([1.0, 0.5])), ps_l, st_l)
    with pytest.raises(LayerError, match="shared, shape"):
        model((torch.tensor([0.0, 0.5, 1.0, 1.5]), values, None, torch.ones(2, 2)), ps_l, st_l)
