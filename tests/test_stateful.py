"""Bridges to torch: StatefulLayer, TrainState with torch.optim, TorchModule(time_arg=True).to_module,
and setup following torch's default dtype."""

import io

import pytest
import torch
import torch.nn.functional as F

import pylux as lx
from pylux import nn
from pylux.training import Adam, TorchOptimizer, TrainState, compute_gradients, single_train_step

DT = torch.float64


def mlp_and_data(seed=0, dtype=DT):
    model = nn.Chain(nn.Dense(3, 8, torch.tanh), nn.BatchNorm(8), nn.Dense(8, 2))
    ps, st = lx.setup(torch.Generator().manual_seed(seed), model, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(16, 3, generator=g, dtype=dtype), torch.randn(16, 2, generator=g, dtype=dtype)
    return model, ps, st, x, y


def mse_loss_fn(model, ps, st, data):
    x, y = data
    pred, st = model(x, ps, st)
    return F.mse_loss(pred, y), st, {}


def test_gradients_and_state_equal_pylux():
    model, ps, st, x, y = mlp_and_data()
    layer = lx.StatefulLayer(model, ps, st)
    F.mse_loss(layer(x), y).backward()
    grads, _, _, ts = compute_gradients(mse_loss_fn, (x, y), TrainState(model, ps, st, Adam()))
    names = dict(layer.params.named_parameters())
    for path, g in lx.core.tree_leaves_with_path(grads):
        torch.testing.assert_close(names[".".join(map(str, path))].grad, g, rtol=1e-13, atol=1e-15)
    # the state advanced as pylux's did (BatchNorm running statistics), and the input tree is untouched
    _, st_ref = model(x, ps, st)
    running = st_ref["layer_2"]["running_mean"]
    torch.testing.assert_close(layer.st["layer_2"]["running_mean"], running)
    assert not torch.equal(running, st["layer_2"]["running_mean"])
    layer.params.layer_1.weight.data.add_(1.0)
    assert not torch.equal(layer.ps["layer_1"]["weight"], ps["layer_1"]["weight"])  # copy=True by default


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.Adam(params, lr=0.05, betas=(0.8, 0.95)),
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
])
def test_torch_optimizer_on_stateful_layer_equals_train_state(make):
    model, ps, st, x, y = mlp_and_data()
    layer = lx.StatefulLayer(model, ps, st)
    opt = make(layer.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ts = TrainState(model, ps, st, make([torch.zeros(1, requires_grad=True)]))
    assert isinstance(ts.optimizer, TorchOptimizer)
    ts_sched = torch.optim.lr_scheduler.StepLR(ts.optimizer.torch_optimizer, step_size=2, gamma=0.5)
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(layer(x), y).backward()
        opt.step()
        sched.step()
        _, _, _, ts = single_train_step(mse_loss_fn, (x, y), ts)
        ts_sched.step()
    assert ts.optimizer.lr == pytest.approx(opt.param_groups[0]["lr"]) and ts.optimizer.lr < 0.05
    for path, leaf in lx.core.tree_leaves_with_path(ts.ps):
        ours = layer.ps
        for k in path:
            ours = ours[k]
        torch.testing.assert_close(ours, leaf, rtol=1e-12, atol=1e-13)
    start, _ = lx.flatten(ps)
    assert float((ts.params - start).abs().max()) > 1e-2  # the steps moved the parameters
    torch.testing.assert_close(ts.st["layer_2"]["running_var"], layer.st["layer_2"]["running_var"])


def test_torch_optimizer_functional_contract():
    model, ps, st, x, y = mlp_and_data()
    ts = TrainState(model, ps, st, TorchOptimizer(torch.optim.Adam, lr=0.01))
    _, _, _, ts1 = single_train_step(mse_loss_fn, (x, y), ts, inplace=False)
    assert not ts.is_stale and ts.opt_state == {}
    assert set(ts1.opt_state) == {"step", "exp_avg", "exp_avg_sq"}
    snapshot = ts1.copy()
    _, _, _, ts2 = single_train_step(mse_loss_fn, (x, y), ts1)
    assert ts1.is_stale and int(ts2.opt_state["step"]) == 2 and int(snapshot.opt_state["step"]) == 1
    _, _, _, again = single_train_step(mse_loss_fn, (x, y), snapshot)  # the copy steps like the original did
    torch.testing.assert_close(again.params, ts2.params, rtol=0, atol=0)


def test_torch_optimizer_refusals():
    p = torch.zeros(2, requires_grad=True)
    q = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="2 parameter groups"):
        TorchOptimizer(torch.optim.SGD([{"params": [p]}, {"params": [q], "lr": 0.1}], lr=0.2))
    stepped = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(2)
    stepped.step()
    with pytest.raises(ValueError, match="already stepped"):
        TorchOptimizer(stepped)
    with pytest.raises(TypeError, match="LBFGS re-evaluates the loss"):
        TorchOptimizer(torch.optim.LBFGS([q]))
    with pytest.raises(TypeError, match=r"hyperparameters \['lr'\] given with an optimizer instance"):
        TorchOptimizer(torch.optim.Adam([q]), lr=0.1)
    with pytest.raises(TypeError, match="expected a torch.optim.Optimizer or its class, got Adam"):
        TorchOptimizer(Adam())


def test_train_eval_state_dict_and_dtype_moves():
    model = nn.Chain(nn.Dense(3, 4, torch.tanh), nn.Dropout(0.5), nn.Dense(4, 1))
    ps, st = lx.setup(torch.Generator().manual_seed(0), model)
    layer = lx.StatefulLayer(model, ps, st)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    layer.eval()
    assert layer.st["layer_2"]["training"] is False
    y_eval = layer(x)
    torch.testing.assert_close(y_eval, model(x, ps, lx.testmode(st))[0])
    layer.train()
    assert layer.st["layer_2"]["training"] is True
    layer(x)  # advances the dropout key in the state
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    assert "params.layer_1.weight" in layer.state_dict()
    other_ps, other_st = lx.setup(torch.Generator().manual_seed(5), model)
    restored = lx.StatefulLayer(model, other_ps, other_st)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    torch.testing.assert_close(restored(x), layer(x))  # same parameters and the same dropout key
    double = restored.double()
    assert double.params.layer_1.weight.dtype == DT
    assert all(t.dtype == DT for t in lx.core.tree_leaves(double.st) if t.is_floating_point())
    with pytest.raises(ValueError, match="extra state must be"):
        restored.set_extra_state(None)


def test_regularization_in_state_is_differentiable_and_graphs_do_not_chain():
    inner = nn.Chain(nn.Dense(2, 8, torch.tanh), nn.Dense(8, 2))
    node = lx.NeuralODE(inner, (0.0, 1.0), reltol=1e-6, abstol=1e-6,
                        regularize=lx.KineticRegularization())
    ps, st = lx.setup(torch.Generator().manual_seed(0), node, dtype=DT)
    layer = lx.StatefulLayer(node, ps, st)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    y = layer(x)
    reg = layer.st["regularization"]
    assert reg.requires_grad and float(reg.detach()) > 0
    (y.square().mean() + reg).backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in layer.parameters())
    for p in layer.parameters():
        p.grad = None
    y2 = layer(x)  # the stored state was detached on entry: one backward through this call only
    y2.sum().backward()


def test_neural_ode_adjoint_gradients_through_stateful_layer():
    inner = nn.Chain(nn.Dense(2, 8, torch.tanh), nn.Dense(8, 2))
    node = lx.NeuralODE(inner, (0.0, 1.0), sensealg=lx.BacksolveAdjoint(), reltol=1e-8, abstol=1e-8)
    ps, st = lx.setup(torch.Generator().manual_seed(0), node, dtype=DT)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    layer = lx.StatefulLayer(node, ps, st)
    layer(x).square().sum().backward()
    direct = lx.NeuralODE(inner, (0.0, 1.0), reltol=1e-8, abstol=1e-8)

    def loss_fn(model, ps, st, data):
        y, st = direct(data, ps, st)
        return y.square().sum(), st, {}

    grads, _, _, _ = compute_gradients(loss_fn, x, TrainState(node, ps, st, Adam()))
    torch.testing.assert_close(layer.params.layer_1.weight.grad, grads["layer_1"]["weight"],
                               rtol=1e-5, atol=1e-7)
    assert layer.st["nfe"] > 0


def test_torch_compile_gives_the_same_output_and_gradient():
    model, ps, st, x, y = mlp_and_data(dtype=torch.float32)
    layer = lx.StatefulLayer(model, ps, st)
    reference = lx.StatefulLayer(model, ps, st)
    compiled = torch.compile(layer, backend="aot_eager")
    F.mse_loss(compiled(x), y).backward()
    F.mse_loss(reference(x), y).backward()
    for a, b in zip(layer.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(layer.st["layer_2"]["running_mean"], reference.st["layer_2"]["running_mean"])


def test_functional_call_replaces_the_parameters():
    model, ps, st, x, y = mlp_and_data()
    layer = lx.StatefulLayer(model, ps, st)
    params = {name: p.detach() * 2 for name, p in layer.named_parameters()}
    doubled = lx.tree_map(lambda t: t * 2, ps)
    torch.testing.assert_close(torch.func.functional_call(layer, params, (x,)), model(x, doubled, st)[0])


def test_stateful_layer_refusals():
    with pytest.raises(TypeError, match="must be a pylux layer"):
        lx.StatefulLayer(3, {}, {})
    with pytest.raises(ValueError, match="both become the module name 'a_b'"):
        lx.StatefulLayer(nn.NoOpLayer(), {"a.b": torch.zeros(1), "a_b": torch.zeros(1)}, {})


class Field(torch.nn.Module):
    """A torchdiffeq-style time-dependent field dy/dt = A tanh(y) + b sin(t)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.b = torch.nn.Parameter(torch.tensor([0.3, -0.2]))

    def forward(self, t, y):
        return self.lin(torch.tanh(y)) + self.b * torch.sin(t)


def test_torch_module_time_arg_matches_torchdiffeq_and_to_module():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(0)
    field = Field().double()
    layer = nn.TorchModule(field, time_arg=True)
    node = lx.NeuralODE(layer, (0.0, 2.0), time_input=True, reltol=1e-10, abstol=1e-10)
    ps, st = lx.setup(torch.Generator().manual_seed(0), node)
    y0 = torch.tensor([[0.5, -1.0]], dtype=DT)
    ours, _ = node(y0, ps, st)
    theirs = torchdiffeq.odeint(field, y0, torch.tensor([0.0, 2.0], dtype=DT), rtol=1e-10, atol=1e-10)[-1]
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-9)
    before = field.lin.weight.detach().clone()
    ts = TrainState(node, ps, st, Adam(0.05))

    def loss_fn(model, ps, st, data):
        y, st = model(data, ps, st)
        return y.square().sum(), st, {}

    for _ in range(3):
        _, _, _, ts = single_train_step(loss_fn, y0, ts)
    assert torch.equal(field.lin.weight, before)  # training updates ps, not the module
    weight_id = id(field.lin.weight)
    assert layer.to_module(ts.ps, ts.st["model"]) is field
    assert id(field.lin.weight) == weight_id
    torch.testing.assert_close(field.lin.weight, ts.ps["lin.weight"], rtol=0, atol=0)
    assert not torch.equal(field.lin.weight, before)
    with pytest.raises(lx.LayerError, match="missing key 'b'"):
        layer.to_module({"lin.weight": before, "lin.bias": before[0]})
    with pytest.raises(lx.LayerError, match=r"'lin.bias' has shape \(3,\)"):
        layer.to_module({"lin.weight": before, "lin.bias": torch.zeros(3, dtype=DT), "b": before[0]})
    with pytest.raises(lx.LayerError, match=r"the input must be the pair \(y, t\)"):
        layer(y0, ps, st["model"])
    with pytest.raises(TypeError, match="time_arg must be True or False"):
        nn.TorchModule(field, time_arg=1)


def test_setup_follows_the_default_dtype():
    model = nn.Chain(nn.Dense(3, 4), nn.BatchNorm(4))
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        ps, st = lx.setup(torch.Generator().manual_seed(0), model)
        assert ps["layer_1"]["weight"].dtype == DT and st["layer_2"]["running_mean"].dtype == DT
        ps32, _ = lx.setup(torch.Generator().manual_seed(0), model, dtype=torch.float32)
        assert ps32["layer_1"]["weight"].dtype == torch.float32  # an explicit dtype wins
        torch.set_default_dtype(torch.float32)
        ps, _ = lx.setup(torch.Generator().manual_seed(0), model)
        assert ps["layer_1"]["weight"].dtype == torch.float32
        torch.testing.assert_close(ps["layer_1"]["weight"].double(), lx.setup(
            torch.Generator().manual_seed(0), model, dtype=DT)[0]["layer_1"]["weight"])
    finally:
        torch.set_default_dtype(previous)
