"""The main job: a neural-ODE classifier on the 8x8 digits that ship with pylux.

    python examples/quickstart.py                 # about 10 s on one laptop CPU core
    python examples/quickstart.py --epochs 2      # shorter (the test suite runs this)

The model (Chen et al., NeurIPS 2018, at digits scale)::

    x (64 pixels) --Dense(64, 32, tanh)--> z(0) --NeuralODE dz/dt = f(z) on [0, 1]--> z(1) --Dense(32, 10)--> logits

with ``f = Dense(32, 32, tanh) ∘ Dense(32, 32)`` solved by adaptive Tsit5
(``reltol = abstol = 1e-4``) and gradients by the seminorm backsolve adjoint
(Chen et al.; Kidger, Chen & Lyons, ICML 2021). Trained with Adam and a progress
bar (:func:`pylux.training.fit`); it prints the test accuracy (about 95%) and the
test NFE (evaluations of f in one test-mode forward pass of the 360 test
images), and writes ``quickstart_training.png``: the training loss and the
forward NFE of every step. Nothing is downloaded.

Where the numbers live: the NeuralODE's state ``st["node"]`` holds the latest
solve's counters ``nfe``, ``naccept``, ``nreject`` and ``backward_stats`` (the
adjoint's counters, filled in by the backward pass); ``loss_fn`` returns
``nfe`` as a statistic, so ``fit`` records it at every step in the history.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import pylux as lx
from pylux import nn
from pylux.data import ArrayLoader, load_digits
from pylux.training import Adam, TrainState, fit


def build_model() -> nn.Chain:
    field = nn.Chain(nn.Dense(32, 32, torch.tanh), nn.Dense(32, 32))
    node = lx.NeuralODE(field, (0.0, 1.0), lx.Tsit5(), sensealg=lx.BacksolveAdjoint(seminorm=True),
                        reltol=1e-4, abstol=1e-4)
    return nn.Chain(encoder=nn.Dense(64, 32, torch.tanh), node=node, classifier=nn.Dense(32, 10))


def loss_fn(model, ps, st, batch):
    """Cross-entropy of the logits; Lux's contract: return (loss, new_state, stats)."""
    x, y = batch
    logits, st = model(x, ps, st)
    return F.cross_entropy(logits, y), st, {"nfe": st["node"]["nfe"]}


@torch.no_grad()
def evaluate(model, ps, st, x, y) -> tuple[float, int]:
    """Accuracy and forward NFE of one test-mode pass over ``(x, y)``."""
    logits, st = model(x, ps, lx.testmode(st))
    return (logits.argmax(dim=1) == y).double().mean().item(), st["node"]["nfe"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="passes over the 1437 training images (default 15)")
    parser.add_argument("--out", default=".", help="folder for quickstart_training.png (default: here)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    x_train, y_train = load_digits("train")  # (1437, 64) pixels in [0, 1], int64 labels
    x_test, y_test = load_digits("test")     # (360, 64)

    model = build_model()
    ps, st = lx.setup(torch.Generator().manual_seed(0), model)
    train_state = TrainState(model, ps, st, Adam(1e-2))
    loader = ArrayLoader(x_train, y_train, batch_size=64, shuffle=True, rng=torch.Generator().manual_seed(1))
    print(f"training a neural-ODE classifier ({lx.parameter_count(ps)} parameters) on {len(x_train)} digits, "
          f"{len(x_test)} held out", flush=True)

    def test_accuracy(ts):
        return evaluate(ts.model, ts.ps, ts.st, x_test, y_test)[0]

    train_state, history = fit(loss_fn, train_state, loader, epochs=args.epochs,
                               metrics={"test_accuracy": test_accuracy}, description="neural ODE on digits")
    accuracy, test_nfe = evaluate(model, train_state.ps, train_state.st, x_test, y_test)
    elapsed = time.perf_counter() - start
    print(history)
    print(f"test accuracy: {100 * accuracy:.1f}%")
    print(f"test NFE:      {test_nfe} (evaluations of f for the 360 test images; training NFE went "
          f"{history[0]['nfe']} -> {history[-1]['nfe']})")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "quickstart_training.png")
    try:
        history.plot(path, ("loss", "nfe"), title="neural ODE on digits: training loss and forward NFE per step")
        print(f"wrote {path}")
    except ImportError:
        path = None
        print("matplotlib is not installed: skipped the plot (pip install matplotlib)")
    print(f"time taken:    {elapsed:.1f} s")
    return {"test_accuracy": accuracy, "test_nfe": test_nfe, "history": history, "plot": path, "time_s": elapsed}


if __name__ == "__main__":
    main()
