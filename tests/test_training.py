"""pylux.training: optimizers against textbook updates, schedules, train steps, fit, checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

import pylux as lx
from pylux.core import AbstractLayer, LayerError
from pylux.training import (
    SGD,
    AdaBelief,
    Adam,
    Adamax,
    AdamW,
    CheckpointError,
    Constant,
    CosineAnneal,
    ExponentialAnneal,
    History,
    InverseDecay,
    StaleTrainStateError,
    Step,
    TrainState,
    apply_gradients,
    compute_gradients,
    fit,
    load_checkpoint,
    save_checkpoint,
    single_train_step,
)

DT = torch.float64


class Quadratic(AbstractLayer):
    """Parameters ``a`` (2,) and ``b.c`` (1, 1): a tiny nested tree; forward returns them."""

    def init_params(self, rng):
        return {"a": torch.tensor([1.0, -2.0]), "b": {"c": torch.tensor([[0.5]])}}

    def init_state(self, rng):
        return {"calls": torch.zeros((), dtype=torch.int64), "training": True}

    def forward(self, x, ps, st):
        return (ps["a"], ps["b"]["c"]), {"calls": st["calls"] + 1, "training": st["training"]}


class Linear(AbstractLayer):
    def __init__(self, n_in, n_out):
        self.n_in, self.n_out = n_in, n_out

    def init_params(self, rng):
        return {"weight": torch.randn(self.n_out, self.n_in, generator=rng) / math.sqrt(self.n_in),
                "bias": torch.zeros(self.n_out)}

    def forward(self, x, ps, st):
        if x.shape[-1] != self.n_in:
            raise LayerError(f"expected input with last dimension {self.n_in}, got {x.shape[-1]}")
        return x @ ps["weight"].T + ps["bias"], st


def setup_quadratic():
    model = Quadratic()
    ps, st = lx.setup(torch.Generator().manual_seed(0), model, dtype=DT)
    return model, ps, st


GRADS = [  # a fixed gradient sequence, as flat vectors over (a0, a1, c)
    [0.3, -1.2, 2.0],
    [-0.5, 0.4, 1.0],
    [0.25, 0.0, -3.0],
]
START = [1.0, -2.0, 0.5]


def run_optimizer(optimizer, steps=3):
    model, ps, st = setup_quadratic()
    ts = TrainState(model, ps, st, optimizer)
    for k in range(steps):
        g = {"a": torch.tensor(GRADS[k][:2], dtype=DT), "b": {"c": torch.tensor([[GRADS[k][2]]], dtype=DT)}}
        ts = apply_gradients(ts, g)
    return ts.params.tolist(), ts


def textbook(rule, steps=3, **h):
    """Per-element, pure-Python versions of the update rules, straight from the papers."""
    out = []
    for i, p in enumerate(START):
        m = v = u = s = buf = 0.0
        for k in range(steps):
            g, t = GRADS[k][i], k + 1
            lr = h["lr"](k) if callable(h.get("lr")) else h.get("lr")
            if rule == "sgd":
                d = g + h.get("wd", 0.0) * p
                buf = h.get("mu", 0.0) * buf + d
                p -= lr * ((d + h["mu"] * buf) if h.get("nesterov") else buf)
            elif rule in ("adam", "adamw"):
                b1, b2, eps = h["b1"], h["b2"], h["eps"]
                if rule == "adamw":
                    p -= lr * h["wd"] * p
                m = b1 * m + (1 - b1) * g
                v = b2 * v + (1 - b2) * g * g
                p -= lr * (m / (1 - b1 ** t)) / (math.sqrt(v / (1 - b2 ** t)) + eps)
            elif rule == "adamax":
                b1, b2, eps = h["b1"], h["b2"], h["eps"]
                m = b1 * m + (1 - b1) * g
                u = max(b2 * u, abs(g))
                p -= lr / (1 - b1 ** t) * m / (u + eps)
            elif rule == "adabelief":
                b1, b2, eps = h["b1"], h["b2"], h["eps"]
                m = b1 * m + (1 - b1) * g
                s = b2 * s + (1 - b2) * (g - m) ** 2 + eps
                p -= lr * (m / (1 - b1 ** t)) / (math.sqrt(s / (1 - b2 ** t)) + eps)
        out.append(p)
    return out


@pytest.mark.parametrize("optimizer, rule, hyper", [
    (SGD(0.1), "sgd", dict(lr=0.1)),
    (SGD(0.1, momentum=0.9), "sgd", dict(lr=0.1, mu=0.9)),
    (SGD(0.05, momentum=0.8, nesterov=True, weight_decay=0.1), "sgd",
     dict(lr=0.05, mu=0.8, nesterov=True, wd=0.1)),
    (Adam(0.1, betas=(0.8, 0.9), eps=1e-3), "adam", dict(lr=0.1, b1=0.8, b2=0.9, eps=1e-3)),
    (AdamW(0.1, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.5), "adamw",
     dict(lr=0.1, b1=0.8, b2=0.9, eps=1e-3, wd=0.5)),
    (Adamax(0.2, betas=(0.7, 0.95), eps=1e-3), "adamax", dict(lr=0.2, b1=0.7, b2=0.95, eps=1e-3)),
    (AdaBelief(0.1, betas=(0.8, 0.9), eps=1e-3), "adabelief", dict(lr=0.1, b1=0.8, b2=0.9, eps=1e-3)),
    (SGD(Step(0.1, 0.5, 1)), "sgd", dict(lr=Step(0.1, 0.5, 1))),
    (Adam(InverseDecay(0.1, 1.0), betas=(0.9, 0.99), eps=1e-8), "adam",
     dict(lr=lambda k: 0.1 / (1 + k), b1=0.9, b2=0.99, eps=1e-8)),
])
def test_optimizer_matches_textbook_update(optimizer, rule, hyper):
    got, ts = run_optimizer(optimizer)
    assert ts.step == 3
    assert got == pytest.approx(textbook(rule, **hyper), rel=1e-12, abs=1e-14)


def test_adam_first_step_by_hand():
    # Bias correction makes the first Adam step lr * g / (|g| + eps): 1 - 0.1 * 0.3 / 0.3 = 0.9, etc.
    got, _ = run_optimizer(Adam(0.1), steps=1)
    assert got == pytest.approx([0.9, -1.9, 0.4], abs=1e-8)
    # Second step by hand for a0: m = 0.9*0.03 + 0.1*(-0.5) = -0.023, v = 0.999*9e-5 + 0.001*0.25
    m, v = -0.023, 0.999 * 9e-5 + 0.001 * 0.25
    first = 1.0 - 0.1 * 0.3 / (0.3 + 1e-8)
    expected = first - 0.1 * (m / (1 - 0.81)) / (math.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
    got2, _ = run_optimizer(Adam(0.1), steps=2)
    assert got2[0] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("ours, theirs", [
    (lambda: Adam(0.05, betas=(0.85, 0.95), eps=1e-6),
     lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.85, 0.95), eps=1e-6)),
    (lambda: AdamW(0.05, betas=(0.85, 0.95), eps=1e-6, weight_decay=0.3),
     lambda p: torch.optim.AdamW(p, lr=0.05, betas=(0.85, 0.95), eps=1e-6, weight_decay=0.3)),
    (lambda: SGD(0.05, momentum=0.7, nesterov=True, weight_decay=0.2),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.2)),
])
def test_optimizer_matches_torch_optim(ours, theirs):
    ref = torch.tensor(START, dtype=DT, requires_grad=True)
    torch_opt = theirs([ref])
    for g in GRADS:
        ref.grad = torch.tensor(g, dtype=DT)
        torch_opt.step()
    got, _ = run_optimizer(ours())
    assert got == pytest.approx(ref.detach().tolist(), rel=1e-12)


def test_functional_update_leaves_inputs_untouched():
    opt = Adam(0.1)
    params = torch.tensor(START, dtype=DT)
    state = opt.init(params)
    new_state, new_params = opt.update(state, torch.tensor(GRADS[0], dtype=DT), params, 0)
    assert params.tolist() == START and float(state["m"].abs().sum()) == 0.0
    assert new_params.tolist() == pytest.approx([0.9, -1.9, 0.4], abs=1e-8)
    assert new_state["m"].tolist() == pytest.approx([0.03, -0.12, 0.2])
    same_state, same_params = opt.update(state, torch.tensor(GRADS[0], dtype=DT), params, 0, inplace=True)
    assert same_params is params and same_state["m"] is state["m"]
    assert params.tolist() == pytest.approx([0.9, -1.9, 0.4], abs=1e-8)


def test_schedules_match_formulas():
    cos = CosineAnneal(1.0, 0.1, 10)
    for k in (0, 3, 5, 10, 25):
        assert cos(k) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * min(k, 10) / 10)))
    assert cos(5) == pytest.approx(0.55) and cos(25) == pytest.approx(0.1)
    assert CosineAnneal(1.0, 0.0, 10, restart=True)(15) == pytest.approx(0.5)
    step = Step(1.0, 0.5, 3)
    assert [step(k) for k in (0, 2, 3, 5, 6, 9)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]
    inv = InverseDecay(2.0, 0.5)
    assert [inv(k) for k in (0, 2, 6)] == pytest.approx([2.0, 1.0, 0.5])
    assert InverseDecay(1.0, 1.0, power=2.0)(3) == pytest.approx(1 / 16)
    exp = ExponentialAnneal(100.0, 10.0, 4)
    assert [exp(k) for k in (0, 2, 4, 100)] == pytest.approx([100.0, 100 * 0.1 ** 0.5, 10.0, 10.0])
    assert exp(1) == pytest.approx(100 * 10 ** -0.25)
    assert Constant(0.3)(1000) == 0.3
    assert isinstance(exp(3), float)
    assert CosineAnneal(1.0, 0.1, 10) == cos and repr(step) == "Step(start=1.0, decay=0.5, step_size=3)"


@pytest.mark.parametrize("build, message", [
    (lambda: Adam(-1e-3), "lr must be a finite number >= 0"),
    (lambda: Adam(float("nan")), "lr must be a finite number >= 0"),
    (lambda: Adam(1e-3, betas=(0.9, 1.0)), r"betas\[1\] must lie in \[0, 1\)"),
    (lambda: Adam(1e-3, betas=(1.2, 0.9)), r"betas\[0\] must lie in \[0, 1\)"),
    (lambda: Adam(1e-3, betas=0.9), "betas must be a pair"),
    (lambda: Adam(1e-3, eps=0.0), "eps must be > 0"),
    (lambda: AdamW(1e-3, weight_decay=-0.1), "AdamW: weight_decay must be a finite number >= 0"),
    (lambda: SGD(0.1, momentum=1.0), r"SGD: momentum must lie in \[0, 1\)"),
    (lambda: SGD(0.1, nesterov=True), "nesterov=True needs momentum > 0"),
    (lambda: SGD("0.1"), "SGD: lr must be a real number"),
    (lambda: Adamax(True), "Adamax: lr must be a real number"),
    (lambda: AdaBelief(1e-3, betas=(0.9, -0.1)), r"betas\[1\] must be a finite number >= 0"),
    (lambda: CosineAnneal(1.0, 0.0, 0), "CosineAnneal: period must be a positive integer"),
    (lambda: Step(1.0, 0.0, 10), "Step: decay must be > 0"),
    (lambda: InverseDecay(1.0, -1.0), "InverseDecay: decay must be >= 0"),
    (lambda: ExponentialAnneal(100.0, 0.0, 10), "non-zero and of the same sign"),
    (lambda: ExponentialAnneal(100.0, 10.0, 2.5), "steps must be a positive integer"),
])
def test_bad_hyperparameters_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_unknown_keyword_and_bad_step_and_bad_schedule():
    with pytest.raises(TypeError, match="learning_rate"):
        Adam(learning_rate=1e-3)
    with pytest.raises(ValueError, match="step must be >= 0"):
        Step(1.0, 0.5, 2)(-1)
    with pytest.raises(TypeError, match="Python int"):
        Constant(1.0)(torch.tensor(3))
    opt = SGD(lambda k: torch.tensor(0.1))
    params = torch.zeros(2)
    with pytest.raises(TypeError, match="returned a tensor at step 0"):
        opt.update(opt.init(params), torch.ones(2), params, 0)
    opt = SGD(lambda k: -0.1)
    with pytest.raises(ValueError, match=r"lr schedule at step 0\): lr must be a finite number >= 0"):
        opt.update(opt.init(params), torch.ones(2), params, 0)
    with pytest.raises(ValueError, match="grad must match params"):
        Adam().update(Adam().init(params), torch.ones(3), params, 0)
    with pytest.raises(ValueError, match=r"opt_state has keys \[\], expected \['m', 'v'\]"):
        Adam().update({}, torch.ones(2), params, 0)


def quadratic_loss(target):
    def loss_fn(model, ps, st, data):
        (a, c), st = model(None, ps, st)
        loss = ((a - target[:2]) ** 2).sum() * data + 3.0 * ((c - target[2]) ** 2).sum()
        return loss, st, {"calls": st["calls"]}
    return loss_fn


def test_single_train_step_gradient_equals_autograd_and_loss_decreases():
    model, ps, st = setup_quadratic()
    target = torch.tensor([0.5, 1.0, -1.0], dtype=DT)
    loss_fn = quadratic_loss(target)
    ts = TrainState(model, ps, st, SGD(0.05))
    # Reference gradient with plain autograd on independent leaf tensors.
    a = ps["a"].clone().requires_grad_(True)
    c = ps["b"]["c"].clone().requires_grad_(True)
    ref_loss, _, _ = loss_fn(model, {"a": a, "b": {"c": c}}, st, 2.0)
    ga, gc = torch.autograd.grad(ref_loss, [a, c])
    assert ga.tolist() == pytest.approx([2 * 2 * (1.0 - 0.5), 2 * 2 * (-2.0 - 1.0)])  # closed form
    losses = []
    for k in range(20):
        grads, loss, stats, ts = single_train_step(loss_fn, 2.0, ts)
        if k == 0:
            assert torch.equal(grads["a"], ga) and torch.equal(grads["b"]["c"], gc)
            assert loss.dim() == 0 and not loss.requires_grad
            assert float(loss) == pytest.approx(ref_loss.item())
            flat, _ = lx.flatten(grads)  # grads are views of one vector: flatten returns it
            assert grads["a"].data_ptr() == flat.data_ptr() and flat.numel() == 3
        losses.append(float(loss))
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] < 1e-3 * losses[0]
    assert int(ts.st["calls"]) == 20 and ts.step == 20 and int(stats["calls"]) == 20
    # gradient descent on a quadratic contracts the error by (1 - lr * curvature) per step
    assert ts.ps["a"].tolist() == pytest.approx([0.5 + 0.8 ** 20 * 0.5, 1.0 - 0.8 ** 20 * 3.0], rel=1e-12)
    assert ts.ps["b"]["c"].item() == pytest.approx(-1.0 + 0.7 ** 20 * 1.5, rel=1e-12)


def test_unused_parameter_gets_exactly_zero_gradient():
    model, ps, st = setup_quadratic()
    ts = TrainState(model, ps, st, Adam(0.1))

    def loss_fn(model, ps, st, data):
        return (ps["a"] ** 2).sum(), st, {}

    grads, _, _, ts = compute_gradients(loss_fn, None, ts)
    assert grads["b"]["c"].tolist() == [[0.0]]
    assert grads["a"].tolist() == [2.0, -4.0]


def test_loss_that_flattens_ps_itself_gets_the_right_gradient():
    # Adjoints flatten ps into one vector inside the loss; the gradient must still reach every leaf.
    model, ps, st = setup_quadratic()
    ts = TrainState(model, ps, st, SGD(0.1))

    def loss_fn(model, ps, st, data):
        vector, _ = lx.flatten(ps)
        return (vector ** 3).sum(), st, {}

    grads, loss, _, _ = compute_gradients(loss_fn, None, ts)
    assert lx.flatten(grads)[0].tolist() == pytest.approx([3 * p ** 2 for p in START])
    assert float(loss) == pytest.approx(sum(p ** 3 for p in START))


def test_train_state_owns_a_flat_vector_and_in_place_steps_mark_old_states_stale():
    model, ps, st = setup_quadratic()
    ts0 = TrainState(model, ps, st, Adam(0.1))
    assert ts0.params.shape == (3,) and ts0.ps["b"]["c"].data_ptr() == ts0.params.data_ptr() + 2 * 8
    assert ps["a"].tolist() == [1.0, -2.0]
    loss_fn = quadratic_loss(torch.zeros(3, dtype=DT))
    view = ts0.ps
    _, _, _, ts1 = single_train_step(loss_fn, 1.0, ts0)
    assert ps["a"].tolist() == [1.0, -2.0]  # the user's tree is copied, never trained in place
    assert view["a"].tolist() == ts1.ps["a"].tolist() != [1.0, -2.0]  # views see the update
    assert ts0.is_stale and not ts1.is_stale
    with pytest.raises(StaleTrainStateError, match="superseded by an in-place update"):
        ts0.ps
    with pytest.raises(StaleTrainStateError, match="single_train_step"):
        single_train_step(loss_fn, 1.0, ts0)
    before = ts1.params.clone()
    _, _, _, ts2 = single_train_step(loss_fn, 1.0, ts1, inplace=False)
    assert not ts1.is_stale and torch.equal(ts1.params, before)
    assert ts2.params.data_ptr() != ts1.params.data_ptr() and ts2.step == 2
    # a TrainState built from another one's (view) ps gets its own buffer
    ts3 = TrainState(model, ts2.ps, ts2.st, Adam(0.1))
    assert ts3.params.data_ptr() != ts2.params.data_ptr()
    assert "parameters=3" in repr(ts3)


def test_loss_fn_contract_errors():
    model, ps, st = setup_quadratic()
    ts = TrainState(model, ps, st, Adam())
    with pytest.raises(TypeError, match=r"must return \(loss, st, stats\).*return \(loss, st, \{\}\)"):
        single_train_step(lambda m, p, s, d: (p["a"] ** 2).sum(), None, ts)
    with pytest.raises(TypeError, match="got 2 values"):
        single_train_step(lambda m, p, s, d: ((p["a"] ** 2).sum(), s), None, ts)
    with pytest.raises(ValueError, match=r"must be a scalar, got shape \(2,\)"):
        single_train_step(lambda m, p, s, d: (p["a"] ** 2, s, {}), None, ts)
    with pytest.raises(TypeError, match="the loss must be a torch.Tensor, got float"):
        single_train_step(lambda m, p, s, d: (1.0, s, {}), None, ts)
    with pytest.raises(ValueError, match="does not depend on the parameters.*not from train_state.ps"):
        single_train_step(lambda m, p, s, d: ((ts.ps["a"] ** 2).sum(), s, {}), None, ts)
    with pytest.raises(TypeError, match="returned state must be a dict"):
        single_train_step(lambda m, p, s, d: ((p["a"] ** 2).sum(), None, {}), None, ts)
    assert ts.step == 0 and not ts.is_stale


def test_apply_gradients_checks_the_gradient_tree():
    model, ps, st = setup_quadratic()
    ts = TrainState(model, ps, st, Adam())
    with pytest.raises(lx.TreeStructureError, match="grads: missing key 'b'"):
        apply_gradients(ts, {"a": torch.ones(2, dtype=DT)})
    with pytest.raises(lx.TreeStructureError, match=r"shape mismatch at 'a': expected \(2,\), got \(3,\)"):
        apply_gradients(ts, {"a": torch.ones(3, dtype=DT), "b": {"c": torch.ones(1, 1, dtype=DT)}})
    with pytest.raises(ValueError, match="1-D tensor of length 3"):
        apply_gradients(ts, torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match="grad must match params.*torch.float32"):
        apply_gradients(ts, torch.ones(3, dtype=torch.float32))
    ts = apply_gradients(ts, torch.ones(3, dtype=DT))  # a flat gradient is accepted
    assert ts.step == 1 and ts.params.tolist() == pytest.approx([0.999, -2.001, 0.499])


def test_train_state_rejects_bad_inputs():
    model, ps, st = setup_quadratic()
    with pytest.raises(TypeError, match="pylux optimizer such as .* or a torch.optim.Optimizer, got str"):
        TrainState(model, ps, st, "adam")  # a torch.optim.Optimizer is accepted: tests/test_stateful.py
    with pytest.raises(TypeError, match="TrainState: flatten: all leaves must share dtype"):
        TrainState(model, {"a": torch.zeros(2), "b": torch.zeros(2, dtype=DT)}, st, Adam())
    with pytest.raises(TypeError, match="parameters must be floating tensors"):
        TrainState(model, {"a": torch.zeros(2, dtype=torch.int64)}, st, Adam())


def mlp():
    from pylux.nn import Chain, Dense
    return Chain(Dense(64, 32, torch.tanh), Dense(32, 10))


def classification_loss(model, ps, st, batch):
    x, y = batch
    logits, st = model(x, ps, st)
    return F.cross_entropy(logits, y), st, {"nfe": torch.tensor(7), "solver": {"accepted": torch.tensor(3)}}


def accuracy(ts, x, y):
    with torch.no_grad():
        logits, _ = ts.model(x, ts.ps, lx.testmode(ts.st))
    return (logits.argmax(1) == y).double().mean().item()


def test_fit_on_digits_reaches_ninety_percent_test_accuracy():
    from pylux.data import ArrayLoader, load_digits

    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")
    model = mlp()
    ps, st = lx.setup(torch.Generator().manual_seed(0), model)
    loader = ArrayLoader(x_train, y_train, 64, rng=torch.Generator().manual_seed(0))
    ts, history = fit(classification_loss, TrainState(model, ps, st, Adam(1e-2)), loader, epochs=8,
                      metrics={"test_accuracy": lambda ts: accuracy(ts, x_test, y_test)}, progress=False,
                      log_every=10)
    assert isinstance(history, History) and len(history) == 8 * 23 == ts.step
    assert history[0] == {**history[0], "step": 1, "epoch": 1, "nfe": 7, "solver.accepted": 3}
    assert isinstance(history[0]["loss"], float) and isinstance(history[0]["nfe"], int)
    assert history.column("step") == list(range(1, 8 * 23 + 1))
    assert len(history.epochs) == 8 and history.epochs[-1]["step"] == 8 * 23
    assert history.epochs[0]["loss"] == pytest.approx(sum(history.column("loss")[:23]) / 23)
    assert history.epochs[-1]["loss"] < 0.3 * history.epochs[0]["loss"]
    assert history.epochs[-1]["test_accuracy"] > 0.9
    assert accuracy(ts, x_test, y_test) > 0.9


def test_fit_with_torch_data_loader_callbacks_and_generator_rejection():
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen, dtype=DT)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=DT)
    model = Linear(3, 1)
    ps, st = lx.setup(torch.Generator().manual_seed(0), model, dtype=DT)

    def mse(model, ps, st, batch):
        xb, yb = batch
        pred, st = model(xb, ps, st)
        return ((pred - yb) ** 2).mean(), st, {}

    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = []
    ts, history = fit(mse, TrainState(model, ps, st, Adam(0.05)), loader, epochs=50, progress=False,
                      callbacks=[lambda ts, rec, hist: seen.append(rec["epoch"]) or rec["epoch"] == 3])
    assert seen == [1, 2, 3] and ts.step == 15 and len(history) == 15 and len(history.epochs) == 3
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit(mse, ts, (b for b in loader), epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        fit(mse, ts, loader, epochs=0)
    with pytest.raises(TypeError, match="data_loader must be an iterable of batches, got int"):
        fit(mse, ts, 3, epochs=1)
    with pytest.raises(ValueError, match="yielded no batches in epoch 1"):
        fit(mse, ts, [], epochs=1, progress=False)
    # a batch that does not fit the model: the layer's own error reaches the user
    with pytest.raises(LayerError, match="Linear: expected input with last dimension 3, got 2"):
        fit(mse, ts, [(torch.zeros(4, 2, dtype=DT), torch.zeros(4, 1, dtype=DT))], epochs=1, progress=False)


def test_fit_stops_on_nonfinite_loss():
    model = Linear(1, 1)
    ps, st = lx.setup(torch.Generator().manual_seed(0), model, dtype=DT)
    batches = [(torch.ones(2, 1, dtype=DT), torch.ones(2, 1, dtype=DT))] * 3 \
        + [(torch.full((2, 1), float("nan"), dtype=DT), torch.ones(2, 1, dtype=DT))]

    def mse(model, ps, st, batch):
        pred, st = model(batch[0], ps, st)
        return ((pred - batch[1]) ** 2).mean(), st, {}

    with pytest.raises(FloatingPointError, match="loss became nan at step 4 \\(epoch 1\\)"):
        fit(mse, TrainState(model, ps, st, SGD(0.1)), batches, epochs=2, progress=False)
    _, history = fit(mse, TrainState(model, ps, st, SGD(0.1)), batches, epochs=1, progress=False,
                     stop_on_nonfinite=False)
    assert math.isnan(history[-1]["loss"]) and len(history) == 4


def test_checkpoint_round_trip(tmp_path, monkeypatch):
    model = mlp()
    ps, st = lx.setup(torch.Generator().manual_seed(0), model)
    ts = TrainState(model, ps, st, AdamW(1e-2))
    gen = torch.Generator().manual_seed(1)
    batch = (torch.rand(16, 64, generator=gen), torch.randint(0, 10, (16,), generator=gen))
    for _ in range(3):
        _, _, _, ts = single_train_step(classification_loss, batch, ts)
    ts = ts.with_state({**ts.st, "extra": {"count": 3, "name": "x", "flag": None, "t": torch.arange(3)}})
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, ts)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    loaded = load_checkpoint(path, model, AdamW(1e-2))
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert loaded.step == 3 and torch.equal(loaded.params, ts.params)
    for key in ("m", "v"):
        assert torch.equal(loaded.opt_state[key], ts.opt_state[key])
    assert loaded.st["extra"]["count"] == 3 and torch.equal(loaded.st["extra"]["t"], torch.arange(3))
    assert loaded.ps["layer_1"]["weight"].data_ptr() == loaded.params.data_ptr()
    # continuing from the checkpoint gives exactly the same next step
    _, loss_a, _, ts_a = single_train_step(classification_loss, batch, ts)
    _, loss_b, _, ts_b = single_train_step(classification_loss, batch, loaded)
    assert torch.equal(loss_a, loss_b) and torch.equal(ts_a.params, ts_b.params)


def test_checkpoint_errors(tmp_path):
    model = mlp()
    ps, st = lx.setup(torch.Generator().manual_seed(0), model)
    ts = TrainState(model, ps, st, Adam())
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, ts)
    with pytest.raises(CheckpointError, match="saved with a Adam optimizer, got a SGD"):
        load_checkpoint(path, model, SGD(0.1))
    from pylux.nn import Chain, Dense
    with pytest.raises(CheckpointError, match=r"does not fit the model: .*shape mismatch at 'layer_1.weight'"):
        load_checkpoint(path, Chain(Dense(64, 16, torch.tanh), Dense(16, 10)), Adam())
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt", model, Adam())
    with pytest.raises(CheckpointError, match=r"st.layer_1.obj is a History"):
        save_checkpoint(tmp_path / "bad.pt", ts.with_state({"layer_1": {"obj": History()}, "layer_2": {}}))
    assert not (tmp_path / "bad.pt").exists()
    # a file with arbitrary pickled objects is refused by weights_only loading
    torch.save({"format": "pylux.checkpoint", "payload": History([{"a": 1}])}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only loading refuses"):
        load_checkpoint(tmp_path / "evil.pt", model, Adam())
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a pylux checkpoint"):
        load_checkpoint(tmp_path / "other.pt", model, Adam())


def _assert_trees_identical(a, b, path="st"):
    """Same structure, same container and leaf types, tensors equal bit for bit, other leaves equal."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            _assert_trees_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_trees_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _deq_classifier(solver):
    from pylux.nn import Chain, Dense, NoOpLayer, Parallel, WrappedFunction
    cell = Chain(Parallel("+", Dense(8, 8), NoOpLayer()), WrappedFunction(torch.tanh))
    return Chain(Dense(5, 8, torch.tanh), lx.SkipDEQ(cell, None, solver, jacobian_regularization=0.5,
                                                     abstol=1e-8, reltol=0.0), Dense(8, 3))


def _deq_loss(model, ps, st, batch):
    x, y = batch
    logits, st = model(x, ps, st)
    solution = st["layer_2"]["solution"]
    loss = F.cross_entropy(logits, y) + solution.jacobian_loss + 0.1 * solution.skip_loss
    return loss, st, {"nfe": solution.nfe}


@pytest.mark.parametrize("solver", [lx.Broyden(), lx.Tsit5()], ids=["discrete", "continuous"])
def test_checkpoint_round_trip_of_a_trained_deq(tmp_path, solver):
    model = _deq_classifier(solver)
    ps, st = lx.setup(torch.Generator().manual_seed(0), model, dtype=DT)
    ts = TrainState(model, ps, st, Adam(1e-2))
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(6, 5, generator=gen, dtype=DT), torch.randint(0, 3, (6,), generator=gen))
    for _ in range(3):
        _, _, _, ts = single_train_step(_deq_loss, batch, ts)
    solution = ts.st["layer_2"]["solution"]
    assert isinstance(solution, lx.DEQSolution) and solution.converged
    assert solution.backward_stats["converged"] and solution.backward_stats["iterations"] > 0
    path = tmp_path / "deq.pt"
    save_checkpoint(path, ts)  # used to refuse the DEQSolution ("Keep such objects out of the model state")
    loaded = load_checkpoint(path, model, Adam(1e-2))
    assert loaded.step == 3 and torch.equal(loaded.params, ts.params)
    _assert_trees_identical(loaded.ps, ts.ps, "ps")
    _assert_trees_identical(loaded.st, ts.st)
    restored = loaded.st["layer_2"]["solution"]
    assert restored.retcode is lx.NonlinearReturnCode.Success and restored.solver_retcode is solution.solver_retcode
    assert (restored.t is None) == isinstance(solver, lx.Broyden)
    # the next forward pass and the next step are the same from the checkpoint
    y_a, st_a = model(batch[0], ts.ps, ts.st)
    y_b, st_b = model(batch[0], loaded.ps, loaded.st)
    assert torch.equal(y_a, y_b) and st_a["layer_2"]["rng"] == st_b["layer_2"]["rng"]
    _, loss_a, _, ts_a = single_train_step(_deq_loss, batch, ts)
    _, loss_b, _, ts_b = single_train_step(_deq_loss, batch, loaded)
    assert torch.equal(loss_a, loss_b) and torch.equal(ts_a.params, ts_b.params)


def test_checkpoint_rebuilds_only_pylux_records(tmp_path):
    from collections import namedtuple

    from pylux.sensitivity import BackwardStats
    model = mlp()
    ps, st = lx.setup(torch.Generator().manual_seed(0), model)
    ts = TrainState(model, ps, st, Adam())
    record = BackwardStats(nf=12, nvjp=4)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, ts.with_state({**st, "stats": record, "code": lx.ReturnCode.Terminated}))
    loaded = load_checkpoint(path, model, Adam())
    assert type(loaded.st["stats"]) is BackwardStats and loaded.st["stats"] == {"nf": 12, "nvjp": 4}
    assert loaded.st["code"] is lx.ReturnCode.Terminated
    Point = namedtuple("Point", "x y")
    with pytest.raises(CheckpointError, match=r"st.point is a Point"):
        save_checkpoint(tmp_path / "bad.pt", ts.with_state({**st, "point": Point(1, 2)}))
    # a file naming a class outside pylux is refused, not imported
    payload = torch.load(path, weights_only=True)
    payload["st"]["code"]["class"] = "os:system"
    torch.save(payload, tmp_path / "forged.pt")
    with pytest.raises(CheckpointError, match="only pylux's own records"):
        load_checkpoint(tmp_path / "forged.pt", model, Adam())
    payload["st"]["code"]["class"] = "pylux.core.tree:TreeStructureError"
    torch.save(payload, tmp_path / "forged.pt")
    with pytest.raises(CheckpointError, match="not a enum"):
        load_checkpoint(tmp_path / "forged.pt", model, Adam())
