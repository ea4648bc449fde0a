"""Write the example notebooks of examples/ (stored without outputs) from the cell sources below.

    python examples/make_notebooks.py

Edit the sources here and rerun, so that the notebooks stay reviewable as code;
tests/test_notebooks.py executes every notebook listed in NOTEBOOKS.
"""

from __future__ import annotations

import pathlib

HERE = pathlib.Path(__file__).resolve().parent

NEURAL_ODE_CLASSIFIER = [
    ("md", """# A neural-ODE classifier on the 8x8 digits

`x (64 pixels) -> Dense(64, 32, tanh) -> NeuralODE dz/dt = f(z) on [0, 1] -> Dense(32, 10) -> logits`
(Chen et al., NeurIPS 2018), trained with Adam and `pylux.training.fit` (a progress bar; a widget
when `ipywidgets` is installed: `pip install "pylux-torch[notebook]"`). The digits ship with pylux;
nothing is downloaded. A few seconds on one CPU core."""),
    ("code", """import torch
import torch.nn.functional as F
import pylux as lx
from pylux import nn
from pylux.data import ArrayLoader, load_digits
from pylux.training import Adam, TrainState, fit

torch.set_num_threads(1)
x_train, y_train = load_digits("train")   # (1437, 64) in [0, 1]
x_test, y_test = load_digits("test")      # (360, 64)"""),
    ("code", """field = nn.Chain(nn.Dense(32, 32, torch.tanh), nn.Dense(32, 32))
model = nn.Chain(encoder=nn.Dense(64, 32, torch.tanh),
                 node=lx.NeuralODE(field, (0.0, 1.0), lx.Tsit5(), sensealg=lx.BacksolveAdjoint(seminorm=True),
                                   reltol=1e-4, abstol=1e-4),
                 classifier=nn.Dense(32, 10))
ps, st = lx.setup(torch.Generator().manual_seed(0), model)

def loss_fn(model, ps, st, batch):
    x, y = batch
    logits, st = model(x, ps, st)
    return F.cross_entropy(logits, y), st, {"nfe": st["node"]["nfe"]}   # recorded by fit at every step

loader = ArrayLoader(x_train, y_train, batch_size=64, rng=torch.Generator().manual_seed(1))
train_state, history = fit(loss_fn, TrainState(model, ps, st, Adam(1e-2)), loader, epochs=3)
history   # a one-line summary; list(history) has every step's record"""),
    ("md", """The solver's counters live in the state: `st["node"]` holds the latest solve's `nfe`,
`naccept`, `nreject`, and `backward_stats` (the adjoint's own counters, filled in by the backward pass)."""),
    ("code", """with torch.no_grad():
    logits, st_test = model(x_test, train_state.ps, lx.testmode(train_state.st))
accuracy = (logits.argmax(1) == y_test).double().mean().item()
print(f"test accuracy {100 * accuracy:.1f}%, test NFE {st_test['node']['nfe']}, "
      f"accepted steps {st_test['node']['naccept']}, rejected {st_test['node']['nreject']}")
print("last training step's adjoint:", dict(train_state.st["node"]["backward_stats"]))
assert accuracy > 0.85"""),
    ("code", """history.plot(keys=("loss", "nfe"), title="training loss and forward NFE per step");"""),
]

DEQ_CLASSIFIER = [
    ("md", """# A Skip DEQ on the digits

A deep equilibrium model (Bai et al. 2019) whose layer is the fixed point
$z^* = f(z^*, \\tilde x)$ of the cell $f(z, \\tilde x) = \\tanh(W_2 \\tanh(W_1 z + b_1) + b_2 + \\tilde x)$,
found by Broyden's method and differentiated implicitly (`SteadyStateAdjoint`; the cell of
`pylux experiments deq-digits`). The Skip DEQ
(Pal, Edelman & Rackauckas 2022) starts the solve from an explicit guess $g_\\phi(\\tilde x)$, trained
by the extra loss $\\mathrm{mean}((z^* - g_\\phi(\\tilde x))^2)$, which cuts the solver's iterations."""),
    ("code", """import torch
import torch.nn.functional as F
import pylux as lx
from pylux import nn
from pylux.data import ArrayLoader, load_digits
from pylux.training import Adam, TrainState, fit

from pylux.experiments.deq_digits import deq_cell   # f(z, x~) with Glorot weights scaled by 0.5

torch.set_num_threads(1)
x_train, y_train = load_digits("train")
x_test, y_test = load_digits("test")
hidden = 32

def classifier(deq):
    return nn.Chain(encoder=nn.Dense(64, hidden, torch.tanh), deq=deq, classifier=nn.Dense(hidden, 10))

# scaled-down weights make f a contraction at the start, so the fixed point exists (and Broyden finds it)
options = dict(sensealg=lx.SteadyStateAdjoint(tol=1e-4, restart=20, maxiters=40), abstol=1e-2, reltol=1e-2,
               maxiters=50)
models = {"DEQ": classifier(lx.DEQ(deq_cell(hidden, 0.5), lx.Broyden(), **options)),
          "Skip DEQ": classifier(lx.SkipDEQ(deq_cell(hidden, 0.5), nn.Dense(hidden, hidden, torch.tanh), lx.Broyden(),
                                            **options))}"""),
    ("code", """def loss_fn(model, ps, st, batch):
    x, y = batch
    logits, st = model(x, ps, st)
    solution = st["deq"]["solution"]          # a DEQSolution: z_star, residual, nfe, iterations, skip_loss, ...
    loss = F.cross_entropy(logits, y)
    if solution.skip_loss is not None:
        loss = loss + solution.skip_loss
    return loss, st, {"nfe": solution.nfe}

results = {}
for name, model in models.items():
    ps, st = lx.setup(torch.Generator().manual_seed(0), model)
    loader = ArrayLoader(x_train, y_train, batch_size=128, rng=torch.Generator().manual_seed(1))
    ts, history = fit(loss_fn, TrainState(model, ps, st, Adam(3e-3)), loader, epochs=2, description=name)
    with torch.no_grad():
        logits, st_test = model(x_test, ts.ps, lx.testmode(ts.st))
    solution = st_test["deq"]["solution"]
    results[name] = {"accuracy": (logits.argmax(1) == y_test).double().mean().item(), "nfe": solution.nfe,
                     "converged": solution.converged, "max residual": solution.residual.max().item()}
for name, r in results.items():
    print(f"{name:9s} test accuracy {100 * r['accuracy']:.1f}%, test NFE {r['nfe']}, "
          f"converged {r['converged']}, max residual {r['max residual']:.1e}")
assert all(r["accuracy"] > 0.6 for r in results.values())"""),
]

SPIRAL_FIT = [
    ("md", """# Fitting the spiral ODE

The classic neural-ODE fit: data from $\\dot u = u^3 A$ (30 points on $[0, 1.5]$,
`pylux.data.spiral_ode_data`), a model $\\dot z = W_2 \\tanh(W_1 z^3 + b_1) + b_2$, the loss the mean
squared error of the whole trajectory (`saveat=` the observation times). A plot compares the fitted
trajectory with the data."""),
    ("code", """import torch
import matplotlib.pyplot as plt
import pylux as lx
from pylux import nn
from pylux.data import spiral_ode_data
from pylux.training import Adam, TrainState, progress_bar, single_train_step

torch.set_num_threads(1)
t, u = spiral_ode_data(30)            # t (30,), u (30, 2)
t_obs = t.tolist()
field = nn.Chain(nn.WrappedFunction(lambda z: z ** 3), nn.Dense(2, 50, torch.tanh), nn.Dense(50, 2))
model = lx.NeuralODE(field, (t_obs[0], t_obs[-1]), lx.Tsit5(), saveat=t_obs, reltol=1e-3, abstol=1e-3)
ps, st = lx.setup(torch.Generator().manual_seed(0), model)
u0 = u[0:1]                           # a batch of one initial state

def loss_fn(model, ps, st, batch):
    pred, st = model(u0, ps, st)      # (30, 1, 2): the trajectory at t_obs
    return (pred[:, 0] - u).pow(2).mean(), st, {"nfe": st["nfe"]}

state, losses = TrainState(model, ps, st, Adam(0.05)), []
for _ in progress_bar(iterable=range(80), desc="spiral fit"):
    _, loss, stats, state = single_train_step(loss_fn, None, state)
    losses.append(loss)
losses = torch.stack(losses).tolist()
print(f"trajectory MSE {losses[0]:.3f} -> {losses[-1]:.4f}; NFE of the last solve {stats['nfe']}")
assert losses[-1] < 0.05 * losses[0]"""),
    ("code", """with torch.no_grad():
    fitted, _ = model(u0, state.ps, lx.testmode(state.st))
fitted = fitted[:, 0]
fig, (ax_phase, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
ax_phase.plot(u[:, 0], u[:, 1], "ko", ms=3, label="data")
ax_phase.plot(fitted[:, 0], fitted[:, 1], "C0", label="fitted neural ODE")
ax_phase.set(xlabel="u1", ylabel="u2", title="phase plane"); ax_phase.legend()
for k, style in enumerate(("-", "--")):
    ax_time.plot(t, u[:, k], "ko", ms=3)
    ax_time.plot(t, fitted[:, k], style, color="C0", label=f"fitted u{k + 1}")
ax_time.set(xlabel="t", title="against time (dots: data)"); ax_time.legend();"""),
]

TORCH_CNN_NODE = [
    ("md", """# A torch CNN, a pylux neural ODE and a torch DataLoader

Any `torch.nn.Module` becomes a pylux layer with `nn.TorchModule`: its parameters move into `ps`
(the module's own initialisation is kept), so it trains with the rest of the model. Here a small
torch CNN encodes the 8x8 images, a pylux `NeuralODE` transforms the features, and a
`torch.utils.data.DataLoader` feeds `fit`."""),
    ("code", """import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import pylux as lx
from pylux import nn
from pylux.data import load_digits
from pylux.training import Adam, TrainState, fit

torch.set_num_threads(1)
torch.manual_seed(0)                           # the torch module's own initialisation
x_train, y_train = load_digits("train", flatten=False)   # (1437, 1, 8, 8), NCHW
x_test, y_test = load_digits("test", flatten=False)
cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                          torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 16), torch.nn.Tanh())
model = nn.Chain(cnn=nn.TorchModule(cnn),
                 node=lx.NeuralODE(nn.Chain(nn.Dense(16, 16, torch.tanh), nn.Dense(16, 16)), (0.0, 1.0),
                                   lx.Tsit5(), reltol=1e-4, abstol=1e-4),
                 classifier=nn.Dense(16, 10))
ps, st = lx.setup(torch.Generator().manual_seed(0), model)
print({name: lx.parameter_count(p) for name, p in ps.items()})"""),
    ("code", """loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                    generator=torch.Generator().manual_seed(1))

def loss_fn(model, ps, st, batch):
    x, y = batch
    logits, st = model(x, ps, st)
    return F.cross_entropy(logits, y), st, {"nfe": st["node"]["nfe"]}

train_state, history = fit(loss_fn, TrainState(model, ps, st, Adam(1e-2)), loader, epochs=2)
with torch.no_grad():
    logits, st_test = model(x_test, train_state.ps, lx.testmode(train_state.st))
accuracy = (logits.argmax(1) == y_test).double().mean().item()
print(history)
print(f"test accuracy {100 * accuracy:.1f}%, test NFE {st_test['node']['nfe']}")
assert accuracy > 0.8"""),
    ("md", """Training updated `ps`, not the torch module: `cnn`'s own tensors still hold their initial values."""),
    ("code", """trained = train_state.ps["cnn"]["0.weight"]
print("module unchanged:", torch.equal(cnn[0].weight, ps["cnn"]["0.weight"]),
      "| trained weights moved:", not torch.allclose(trained, ps["cnn"]["0.weight"]))"""),
]

SENSEALG_COMPARISON = [
    ("md", """# Every sensitivity algorithm on one neural ODE

One `NeuralODE` (an MLP field on a batch of 16 states in $\\mathbb{R}^4$), the loss $\\mathrm{mean}(z(1)^2)$,
its gradient by each `sensealg`, in float64, against backpropagation through the solver
(`DirectAdjoint`): the largest relative difference, the forward NFE, the backward pass's counters
(`st["backward_stats"]`: evaluations of $f$ and vector-Jacobian products) and the time."""),
    ("code", """import time
import torch
import pylux as lx
from pylux import nn

torch.set_num_threads(1)
F64 = torch.float64
field = nn.Chain(nn.Dense(4, 32, torch.tanh), nn.Dense(32, 4))
x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=F64)

def gradient(sensealg):
    layer = lx.NeuralODE(field, (0.0, 1.0), lx.Tsit5(), sensealg=sensealg, reltol=1e-8, abstol=1e-8)
    ps, st = lx.setup(torch.Generator().manual_seed(0), layer, dtype=F64)
    flat, unflatten = lx.flatten(ps)
    flat.requires_grad_(True)
    start = time.perf_counter()
    z, st = layer(x, unflatten(flat), st)
    (grad,) = torch.autograd.grad(z.pow(2).mean(), flat)
    return grad, st, time.perf_counter() - start"""),
    ("code", """reference, st_direct, t_direct = gradient(lx.DirectAdjoint())
algorithms = [lx.BacksolveAdjoint(), lx.BacksolveAdjoint(seminorm=True), lx.InterpolatingAdjoint(),
              lx.InterpolatingAdjoint(checkpointing=4), lx.QuadratureAdjoint(), lx.ReversibleAdjoint()]
print(f"{'sensealg':52s} {'rel. diff':>9s} {'fwd NFE':>7s} {'bwd NFE':>7s} {'bwd VJPs':>8s} {'time (s)':>8s}")
print(f"{'DirectAdjoint()':52s} {0.0:9.1e} {st_direct['nfe']:7d} {'-':>7s} {'-':>8s} {t_direct:8.3f}")
differences = {}
for alg in algorithms:
    grad, st, seconds = gradient(alg)
    differences[repr(alg)] = float((grad - reference).abs().max() / reference.abs().max())
    back = st["backward_stats"]
    print(f"{alg!r:52s} {differences[repr(alg)]:9.1e} {st['nfe']:7d} {back['nf']:7d} {back['nvjp']:8d} {seconds:8.3f}")
assert all(d < 1e-5 for d in differences.values()), differences"""),
    ("md", """The continuous adjoints (backsolve, interpolating, quadrature) solve a second ODE backward and
agree with the discrete gradient to the solver tolerance; `ReversibleAdjoint` reconstructs the forward
steps exactly and gives the discrete gradient itself at O(1) memory in the number of steps."""),
]

#: file name -> cells; every notebook here is executed by tests/test_notebooks.py
NOTEBOOKS = {
    "neural_ode_classifier.ipynb": NEURAL_ODE_CLASSIFIER,
    "deq_classifier.ipynb": DEQ_CLASSIFIER,
    "spiral_fit.ipynb": SPIRAL_FIT,
    "torch_cnn_neural_ode.ipynb": TORCH_CNN_NODE,
    "sensealg_comparison.ipynb": SENSEALG_COMPARISON,
}


def build(cells):
    """An nbformat v4 notebook of ``cells`` (``("md" | "code", source)`` pairs), without outputs."""
    import nbformat  # noqa: PLC0415 (a test/notebook dependency, not the library's)
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    notebook.cells = [nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source)
                      for kind, source in cells]
    for number, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{number}"  # stable ids: regenerating leaves unchanged notebooks unchanged
    return notebook


def main() -> None:
    import nbformat  # noqa: PLC0415
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(cells), HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
