r"""Neural CDE classifier of synthetic pen trajectories: backsolve with and without the seminorm, reversible, backprop.

Kidger, Chen & Lyons (ICML 2021, Table 1: neural CDEs on the UEA CharacterTrajectories
set, backward NFE 40 % lower with the seminorm at equal accuracy) and McCallum &
Foster (2024, the neural-CDE table: a reversible solver at the accuracy of
backpropagation with 0.43 vs 1.09 GB) at laptop scale, on
:func:`pylux.data.character_trajectories` (four stroke classes, per-sample
irregular times, 30 % of the points dropped) instead of the UEA set.

Model (Kidger et al. 2020): the control is the natural cubic spline of
``(t, x, y)`` through each sample's own observation times (missing points
fitted from the observed ones), :math:`z(0) = \mathrm{Dense}(X(0))`,
:math:`dz = f_\theta(z)\,dX` with :math:`f_\theta = \mathrm{Dense}(16, 32, \mathrm{softplus})
\to \mathrm{Dense}(32, 16 \cdot 3, \tanh)`, a linear readout of :math:`z(1)` to
the four classes, Tsit5 at ``--tol`` (default 1e-4), Adam, cross-entropy.

Methods: ``backsolve`` (BacksolveAdjoint), ``seminorm`` (BacksolveAdjoint with
the seminorm), ``direct`` (backpropagation through the solver), ``reversible``
(ReversibleAdjoint around Tsit5). Reported: test accuracy, forward and
backward NFE per training step (mean over training), training time, and the
bytes autograd saves during one training forward pass of a batch (distinct
storages, measured with ``saved_tensors_hooks`` on the CPU; what backprop
keeps grows with the steps, the adjoints keep O(1) in the steps).
"""

from __future__ import annotations

import os
import time

import torch

from .. import nn
from ..core import setup, testmode, tree_map
from ..data import character_trajectories
from ..diffeq import Tsit5
from ..layers import NeuralCDE
from ..sensitivity import BacksolveAdjoint, ReversibleAdjoint
from ..training import Adam, TrainState, single_train_step
from ._report import (add_common_arguments, check_seeds, markdown_table, paper_comparison, parse_methods,
                      plot_histories, progress, report_written, summarize, torch_threads, write_results)
from .cnf_moons import saved_tensor_bytes

__all__ = ["add_arguments", "run", "METHODS"]

METHODS = ("backsolve", "seminorm", "direct", "reversible")

CLAIMS = (
    {"method": "seminorm", "baseline": "backsolve", "metric": "backward_nfe", "label": "backward NFE",
     "paper": "0.60x (-40%)", "source": "Kidger, Chen & Lyons (ICML 2021), Table 1 (issue target <= 0.7x)",
     "direction": "lower"},
    {"method": "reversible", "baseline": "direct", "metric": "saved_bytes", "label": "memory",
     "paper": "0.39x (0.43 vs 1.09 GB)", "source": "McCallum & Foster (2024), neural CDE table (issue target <= 0.5x)",
     "direction": "lower"},
)

HIDDEN, CHANNELS, CLASSES = 16, 3, 4


def add_arguments(parser) -> None:
    add_common_arguments(parser, METHODS, quick="1 seed, 16 train / 16 test samples of 12 points, 1 epoch, tol 1e-3")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train", type=int, default=256, help="training samples")
    parser.add_argument("--test", type=int, default=256, help="test samples")
    parser.add_argument("--length", type=int, default=40, help="observations per sample before dropping")
    parser.add_argument("--drop", type=float, default=0.3, help="fraction of points dropped")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--tol", type=float, default=1e-4, help="reltol = abstol (forward and backward)")


def _sensealg(method: str):
    return {"backsolve": BacksolveAdjoint(), "seminorm": BacksolveAdjoint(seminorm=True), "direct": None,
            "reversible": ReversibleAdjoint()}[method]


def build_model(method: str, args) -> nn.Chain:
    field = nn.Chain(nn.Dense(HIDDEN, 32, torch.nn.functional.softplus), nn.Dense(32, HIDDEN * CHANNELS, torch.tanh))
    cde = NeuralCDE(field, HIDDEN, CHANNELS, interpolation="cubic", solver=Tsit5(), sensealg=_sensealg(method),
                    reltol=args.tol, abstol=args.tol)
    return nn.Chain(cde, nn.Dense(HIDDEN, CLASSES))


def _inputs(data: dict, idx) -> tuple:
    times = data["times"][idx]
    return times, torch.cat([times.unsqueeze(-1), data["values"][idx]], dim=-1)


def train_one(method: str, seed: int, args, data) -> dict:
    train, test = data
    model = build_model(method, args)
    ps, st = setup(torch.Generator().manual_seed(seed), model)
    state = TrainState(model, ps, st, Adam(args.lr))
    n = train["labels"].shape[0]
    steps_per_epoch = max(1, n // args.batch_size)

    def loss_fn(model, ps, st, batch):
        x, y = batch
        logits, st_new = model(x, ps, st)
        return torch.nn.functional.cross_entropy(logits, y), st_new, {"nfe": st_new["layer_1"]["nfe"]}

    history = {"loss": [], "nfe": [], "backward_nfe": []}
    order_gen = torch.Generator().manual_seed(1000 + seed)
    bar = progress(args.epochs * steps_per_epoch, f"{method} seed {seed}")
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(n, generator=order_gen)
        for k in range(steps_per_epoch):
            idx = order[k * args.batch_size:(k + 1) * args.batch_size]
            _, loss, stats, state = single_train_step(loss_fn, (_inputs(train, idx), train["labels"][idx]), state)
            backward = state.st["layer_1"]["backward_stats"]
            history["loss"].append(float(loss))
            history["nfe"].append(stats["nfe"])
            # backprop through the solver: the backward pass replays each forward evaluation once
            history["backward_nfe"].append(backward.get("nf", stats["nfe"]) if backward else stats["nfe"])
            bar.update(1)
    train_time = time.perf_counter() - start
    bar.close()
    ps, st = state.ps, testmode(state.st)
    all_test = torch.arange(test["labels"].shape[0])
    with torch.no_grad():
        logits, st_test = model(_inputs(test, all_test), ps, st)
    accuracy = float((logits.argmax(1) == test["labels"]).double().mean()) * 100
    batch = torch.arange(min(args.batch_size, n))
    trainable = tree_map(lambda x: x.detach().requires_grad_(True), ps)

    def one_forward():
        logits, _ = model(_inputs(train, batch), trainable, state.st)
        return torch.nn.functional.cross_entropy(logits, train["labels"][batch])
    _, saved = saved_tensor_bytes(one_forward)
    return {"test_accuracy": accuracy, "forward_nfe": sum(history["nfe"]) / len(history["nfe"]),
            "backward_nfe": sum(history["backward_nfe"]) / len(history["backward_nfe"]),
            "train_time_s": train_time, "saved_bytes": float(saved), "test_nfe": st_test["layer_1"]["nfe"],
            "history": history}


COLUMNS = (("test_accuracy", "test acc (%)", "{:.1f}"), ("forward_nfe", "forward NFE / step", "{:.1f}"),
           ("backward_nfe", "backward NFE / step", "{:.1f}"), ("train_time_s", "train time (s)", "{:.1f}"),
           ("saved_bytes", "saved bytes / forward", "{:.3g}"))


def run(args) -> dict:
    if args.quick:
        args.epochs, args.seeds, args.train, args.test, args.length, args.batch_size = 1, 1, 16, 16, 12, 8
        args.tol = 1e-3
    check_seeds(args.seeds, "ncde-characters")
    methods = parse_methods(args.methods, METHODS, "ncde-characters")
    full = character_trajectories(args.train + args.test, length=args.length, drop=args.drop, seed=2024)
    train = {k: (v[:args.train] if torch.is_tensor(v) else v) for k, v in full.items()}
    test = {k: (v[args.train:] if torch.is_tensor(v) else v) for k, v in full.items()}
    os.makedirs(args.out, exist_ok=True)
    summary, histories, raw = {}, {}, {}
    with torch_threads(args.threads):
        for method in methods:
            runs = [train_one(method, seed, args, (train, test)) for seed in range(args.seeds)]
            summary[method] = summarize(runs, [k for k, _, _ in COLUMNS])
            histories[method] = [r["history"] for r in runs]
            raw[method] = [{k: v for k, v in r.items() if k != "history"} for r in runs]
            print(f"{method}: " + ", ".join(f"{label} {fmt.format(summary[method][key][0])}"
                                            for key, label, fmt in COLUMNS))
    table = markdown_table(summary, COLUMNS)
    comparison, records = paper_comparison(summary, CLAIMS)
    command = (f"pylux experiments ncde-characters --epochs {args.epochs} --seeds {args.seeds} "
               f"--methods {','.join(methods)} --train {args.train} --test {args.test} --length {args.length} "
               f"--drop {args.drop} --batch-size {args.batch_size} --lr {args.lr} --tol {args.tol} "
               f"--threads {args.threads}")
    text = (f"# ncde-characters\n\n`{command}`\n\nmean ± std over {args.seeds} seed(s); float32, "
            f"{args.threads} thread(s)\n\n{table}\n\n{comparison}\n")
    write_results(args.out, text, {"command": command, "settings": vars(args), "summary": summary, "runs": raw,
                                   "histories": histories, "paper": records})
    plots = [plot_histories(histories, os.path.join(args.out, "training.png"),
                            "ncde-characters: loss and NFE over training")]
    print(text)
    report_written(args.out, plots)
    return summary
