"""Built-in losses against torch.nn.functional, and as training loss functions."""

import pytest
import torch
import torch.nn.functional as F

import pylux as lx
from pylux import nn
from pylux.training import (Adam, BinaryCrossEntropyLoss, CrossEntropyLoss, MSELoss, TrainState,
                            single_train_step)

DT = torch.float64


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(7, 5, generator=g, dtype=DT) * 3
    labels = torch.randint(0, 5, (7,), generator=g)
    return g, logits, labels


@pytest.mark.parametrize("agg, reduction", [("mean", "mean"), ("sum", "sum"), ("none", "none")])
def test_mse_matches_torch(agg, reduction):
    g, a, _ = data()
    b = torch.randn(a.shape, generator=g, dtype=DT)
    torch.testing.assert_close(MSELoss(agg=agg)(a, b), F.mse_loss(a, b, reduction=reduction), rtol=1e-14, atol=0)


@pytest.mark.parametrize("smoothing", [None, 0.1, 0.35])
def test_cross_entropy_with_logits_matches_torch(smoothing):
    _, logits, labels = data()
    ours = CrossEntropyLoss(label_smoothing=smoothing)(logits, labels)
    ref = F.cross_entropy(logits, labels, label_smoothing=smoothing or 0.0)
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=0)
    # soft (probability) targets, and per-sample losses
    g = torch.Generator().manual_seed(3)
    soft = torch.softmax(torch.randn(logits.shape, generator=g, dtype=DT), dim=1)
    torch.testing.assert_close(CrossEntropyLoss(label_smoothing=smoothing, agg="none")(logits, soft),
                               F.cross_entropy(logits, soft, label_smoothing=smoothing or 0.0, reduction="none"),
                               rtol=1e-13, atol=0)


def test_cross_entropy_spatial_and_probabilities():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 2, 5, generator=g, dtype=DT)  # (N, C, H, W)
    labels = torch.randint(0, 4, (3, 2, 5), generator=g)
    torch.testing.assert_close(CrossEntropyLoss(label_smoothing=0.2, agg="sum")(logits, labels),
                               F.cross_entropy(logits, labels, label_smoothing=0.2, reduction="sum"),
                               rtol=1e-13, atol=0)
    probs = torch.softmax(logits, dim=1)
    # with probabilities the loss is -log(p + eps): equal to the logit form up to eps / p
    torch.testing.assert_close(CrossEntropyLoss(logits=False, epsilon=0.0)(probs, labels),
                               F.cross_entropy(logits, labels), rtol=1e-12, atol=0)
    eps = CrossEntropyLoss(logits=False, epsilon=1e-3)(probs, labels)
    assert eps < F.cross_entropy(logits, labels)  # adding eps inside the log lowers each term


def test_binary_cross_entropy_matches_torch():
    g, _, _ = data()
    z = torch.randn(6, 3, generator=g, dtype=DT) * 4
    y = (torch.rand(6, 3, generator=g, dtype=DT) > 0.5).to(DT)
    torch.testing.assert_close(BinaryCrossEntropyLoss()(z, y), F.binary_cross_entropy_with_logits(z, y),
                               rtol=1e-13, atol=0)
    p = torch.sigmoid(z)
    torch.testing.assert_close(BinaryCrossEntropyLoss(logits=False, epsilon=0.0, agg="none")(p, y),
                               F.binary_cross_entropy(p, y, reduction="none"), rtol=1e-10, atol=1e-12)
    # smoothing towards 1/2 is the unsmoothed loss against the smoothed target
    smoothed = y * 0.8 + 0.1
    torch.testing.assert_close(BinaryCrossEntropyLoss(label_smoothing=0.2)(z, y),
                               F.binary_cross_entropy_with_logits(z, smoothed), rtol=1e-13, atol=0)
    # the logit form stays finite where sigmoid rounds to 0 or 1
    extreme = torch.tensor([800.0, -800.0], dtype=DT)
    out = BinaryCrossEntropyLoss(agg="none")(extreme, torch.tensor([0.0, 1.0], dtype=DT))
    torch.testing.assert_close(out, torch.tensor([800.0, 800.0], dtype=DT))


def test_callable_aggregation_and_gradient():
    _, logits, labels = data()
    logits.requires_grad_(True)
    loss = CrossEntropyLoss(agg=lambda x: x.max())(logits, labels)
    ref = F.cross_entropy(logits, labels, reduction="none").max()
    torch.testing.assert_close(loss, ref)
    (g1,) = torch.autograd.grad(loss, logits)
    (g2,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g1, g2)


def test_loss_as_training_loss_fn():
    model = nn.Dense(3, 2)
    ps, st = lx.setup(torch.Generator().manual_seed(0), model, dtype=DT)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT)
    loss, st_new, stats = MSELoss()(model, ps, st, (x, y))
    torch.testing.assert_close(loss, F.mse_loss(model(x, ps, st)[0], y))
    assert stats == {}
    ts = TrainState(model, ps, st, Adam(1e-2))
    losses = []
    for _ in range(30):
        _, value, _, ts = single_train_step(MSELoss(), (x, y), ts)
        losses.append(float(value))
    assert losses[-1] < 0.7 * losses[0]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="agg must be one of"):
        MSELoss(agg="average")
    with pytest.raises(ValueError, match="label_smoothing must be a number in"):
        CrossEntropyLoss(label_smoothing=1.0)
    with pytest.raises(ValueError, match="epsilon applies to probabilities only"):
        BinaryCrossEntropyLoss(epsilon=1e-7)
    with pytest.raises(ValueError, match="logits must be True or False"):
        CrossEntropyLoss(logits="yes")
    with pytest.raises(ValueError, match="differs from target shape"):
        MSELoss()(torch.zeros(3, 1), torch.zeros(3))
    with pytest.raises(ValueError, match=r"class-index targets must have shape \(7,\)"):
        CrossEntropyLoss()(torch.zeros(7, 5), torch.zeros(7, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="probability targets must have the prediction's shape"):
        CrossEntropyLoss()(torch.zeros(7, 5), torch.zeros(7, 4))
    with pytest.raises(ValueError, match=r"must have shape \(N, C, \.\.\.\)"):
        CrossEntropyLoss()(torch.zeros(5), torch.tensor(1))
    with pytest.raises(RuntimeError, match="out of bounds"):
        CrossEntropyLoss()(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match=r"call as loss\(y_pred, y\)"):
        MSELoss()(torch.zeros(1))
    with pytest.raises(TypeError, match="must be a pair"):
        MSELoss()(nn.Dense(1, 1), {}, {}, torch.zeros(1))
