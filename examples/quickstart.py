"""Quickstart: an MLP on the 8x8 digits that ship with pylux, trained with Adam.

    python examples/quickstart.py

Runs in a few seconds on a laptop CPU, shows a progress bar, and prints the
test accuracy (above 90%) and the time taken. Nothing is downloaded.
"""

import time

import torch
import torch.nn.functional as F

import pylux as lx
from pylux import nn
from pylux.data import ArrayLoader, load_digits
from pylux.training import Adam, TrainState, fit


def loss_fn(model, ps, st, batch):
    """Cross-entropy of the logits; Lux's contract: return (loss, new_state, stats)."""
    x, y = batch
    logits, st = model(x, ps, st)
    return F.cross_entropy(logits, y), st, {}


@torch.no_grad()
def accuracy(model, ps, st, x, y):
    logits, _ = model(x, ps, lx.testmode(st))
    return (logits.argmax(dim=1) == y).float().mean().item()


def main():
    start = time.perf_counter()
    torch.manual_seed(0)
    x_train, y_train = load_digits("train")  # (1437, 64) pixels in [0, 1], int64 labels
    x_test, y_test = load_digits("test")     # (360, 64)

    model = nn.Chain(nn.Dense(64, 128, torch.tanh), nn.Dense(128, 10))
    ps, st = lx.setup(torch.Generator().manual_seed(0), model)
    train_state = TrainState(model, ps, st, Adam(3e-3))

    print(f"training a 64-128-10 MLP on {len(x_train)} digits ({len(x_test)} held out) with Adam", flush=True)
    loader = ArrayLoader(x_train, y_train, batch_size=32, shuffle=True, rng=torch.Generator().manual_seed(1))
    def test_accuracy(ts):
        return accuracy(ts.model, ts.ps, ts.st, x_test, y_test)

    train_state, history = fit(loss_fn, train_state, loader, epochs=20,
                               metrics={"test_accuracy": test_accuracy}, description="digits MLP")

    test_acc = accuracy(model, train_state.ps, train_state.st, x_test, y_test)
    train_acc = accuracy(model, train_state.ps, train_state.st, x_train, y_train)
    elapsed = time.perf_counter() - start
    print(f"parameters: {lx.parameter_count(train_state.ps)}, steps: {train_state.step}, "
          f"final training loss: {history.epochs[-1]['loss']:.4f}")
    print(f"train accuracy: {100 * train_acc:.1f}%")
    print(f"test accuracy:  {100 * test_acc:.1f}%")
    print(f"time taken:     {elapsed:.1f} s")


if __name__ == "__main__":
    main()
