r"""Neural-ODE digit classifier: vanilla vs STEER, global/local error-estimate and stiffness regularization.

The experiment of Pal, Ma, Shah & Rackauckas (ICML 2021, Table 1) and Pal,
Edelman & Rackauckas (ICML 2023, Table 2) at laptop scale, on the embedded
8x8 digits (1437 train / 360 test images) instead of MNIST. The architecture
is Kelly et al.'s (NeurIPS 2020) scaled to a 64-d input: the state is the
image itself, :math:`z(0) = x \\in \\mathbb{R}^{64}`,

.. math::  f(z, t) = \\tanh\\bigl(W_2\\,[\\tanh(W_1 [z; t] + b_1);\\, t] + b_2\\bigr)

with 100 hidden units, solved with Tsit5 over :math:`t \\in [0, 1]`, followed by a
linear classifier :math:`64 \\to 10`. All methods are trained the same way
(Adam, the same batches, backpropagation through the solver so that the
global regularizers are differentiable); the regularization weight is
annealed exponentially from ``--weight-start`` to ``--weight-end`` over
training as in the papers (for SRNODE divided by ``--stiffness-scale``,
because a stiffness estimate is a rate, orders of magnitude larger than a
scaled error estimate; for the local regularizers multiplied by
``--local-scale``, because one step's :math:`E\,|\Delta t|` is in expectation
about :math:`1/N` of the global sum over the :math:`N` steps).

Tolerances: ``reltol = abstol = 1e-6`` by default. Looser tolerances (1e-3)
let even the unregularized model pass with the minimum of two or three steps
on this small problem, leaving nothing for a regularizer to remove; at 1e-6
the vanilla model needs a meaningful number of steps (about 90 evaluations
after training), as at the papers' MNIST tolerances (Kelly et al. use 1.4e-8).

Weights: annealed from 140 to 14 (the papers anneal 100 to 10; at this scale
100 to 10 left the test NFE at 0.78x vanilla, 200 to 20 cost two points of
test accuracy). Test NFE moves in steps of 6 (one Tsit5 step), so the
trade-off is coarse.

Reported per method, mean ± std over seeds: train and test accuracy, training
time (wall clock of the training loop), prediction time (one test-mode forward
pass of the whole test set, no gradients), and test NFE (evaluations of f in
that pass; test mode solves the plain ODE, without any regularizer work);
beside them the papers' claims (fewer test NFE and a shorter prediction time
than vanilla) with their numbers and whether the direction was reproduced.
``training.png`` shows, mean ± std over seeds, the cross-entropy without the
regularization term, the weighted regularization term and the forward NFE of
every training step.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Mapping

import torch

from .. import nn
from ..core import AbstractLayer, setup, testmode
from ..data import load_digits
from ..diffeq import Tsit5
from ..layers import NeuralODE
from ..regularize import (STEER, ErrorEstimateRegularization, LocalErrorRegularization,
                          StiffnessRegularization)
from ..sensitivity import BacksolveAdjoint, InterpolatingAdjoint, QuadratureAdjoint, ReversibleAdjoint
from ..training import Adam, TrainState, single_train_step
from ..training.schedules import ExponentialAnneal
from ._report import (add_common_arguments, check_seeds, markdown_table, paper_comparison, parse_methods,
                      plot_histories, progress, report_written, summarize, torch_threads, write_results)

__all__ = ["add_arguments", "run", "KellyField", "METHODS"]

METHODS = ("vanilla", "steer", "ernode", "srnode", "local-unbiased", "local-biased", "taynode")


class KellyField(AbstractLayer):
    r"""Kelly et al.'s time-conditioned vector field :math:`\tanh(W_2[\tanh(W_1[z;t]+b_1);t]+b_2)`.

    Input: the pair ``(z, t)``, ``z`` of shape ``(B, dim)`` and ``t`` a 0-d tensor
    (use ``NeuralODE(..., time_input=True)``). Output: shape ``(B, dim)``.

    Parameters ``ps``: ``{"layer_1": {"weight": (hidden, dim + 1), "bias": (hidden,)},
    "layer_2": {"weight": (dim, hidden + 1), "bias": (dim,)}}``. State: ``{}``.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        self.first = nn.Dense(dim + 1, hidden, torch.tanh)
        self.second = nn.Dense(hidden + 1, dim, torch.tanh)

    def init_params(self, rng: torch.Generator) -> dict:
        return {"layer_1": self.first.init_params(rng), "layer_2": self.second.init_params(rng)}

    def forward(self, x: Any, ps: Mapping, st: Mapping):
        z, t = x
        # t is a 0-d tensor in the time axis' own dtype (float64 for a float tspan), not z's
        column = t.to(z.dtype).expand(z.shape[0], 1)
        hidden, _ = self.first(torch.cat([z, column], dim=1), ps["layer_1"], {})
        out, _ = self.second(torch.cat([hidden, column], dim=1), ps["layer_2"], {})
        return out, st


def add_arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--tol", type=float, default=1e-6, help="reltol = abstol of the solves")
    parser.add_argument("--weight-start", type=float, default=140.0)
    parser.add_argument("--weight-end", type=float, default=14.0)
    parser.add_argument("--stiffness-scale", type=float, default=1000.0,
                        help="SRNODE weight = error weight / this")
    parser.add_argument("--local-scale", type=float, default=7.0,
                        help="local-regularizer weight = error weight * this (one step vs a sum over steps)")
    parser.add_argument("--taylor-scale", type=float, default=1000.0,
                        help="TayNODE weight = error weight / this")
    parser.add_argument("--steer-b", type=float, default=0.5)
    parser.add_argument("--sensealg", default="direct", choices=sorted(SENSEALGS),
                        help="how gradients flow for every method but the global ER/SR ones, which need "
                             "backprop through the solver (default: direct)")
    add_common_arguments(parser, METHODS, quick=f"1 seed, {QUICK['epochs']} epoch, batches of "
                                                 f"{QUICK['batch_size']}, reltol = abstol = {QUICK['tol']}")


#: what --quick sets (a smoke run of every method in seconds, not a measurement)
QUICK = {"epochs": 1, "seeds": 1, "batch_size": 512, "tol": 1e-4}
_ERNODE_SOURCE = "Pal et al. 2021, abstract (\"halve the prediction time\")"
_LOCAL_SOURCE = "Pal et al. 2023, abstract (NFE 0.556x-0.733x, predictions 1.3x-2x faster)"
_TAYLOR_SOURCE = "Kelly et al. 2020 (fewer NFE at a small accuracy cost; no number checked here)"
#: the papers' claims, each against the vanilla row
CLAIMS = (
    *({"method": m, "baseline": "vanilla", "metric": "test_nfe", "label": "test NFE", "paper": "fewer",
       "direction": "lower", "source": _ERNODE_SOURCE} for m in ("ernode", "srnode")),
    *({"method": m, "baseline": "vanilla", "metric": "predict_time_s", "label": "prediction time",
       "paper": "about 0.5x", "direction": "lower", "source": _ERNODE_SOURCE} for m in ("ernode", "srnode")),
    *({"method": m, "baseline": "vanilla", "metric": "test_nfe", "label": "test NFE", "paper": "0.556x-0.733x",
       "direction": "lower", "source": _LOCAL_SOURCE} for m in ("local-unbiased", "local-biased")),
    *({"method": m, "baseline": "vanilla", "metric": "predict_time_s", "label": "prediction time",
       "paper": "0.5x-0.77x (1.3x-2x faster)", "direction": "lower", "source": _LOCAL_SOURCE}
      for m in ("local-unbiased", "local-biased")),
    *({"method": m, "baseline": "vanilla", "metric": "test_nfe", "label": "test NFE", "paper": "fewer",
       "direction": "lower", "source": source}
      for m, source in (("taynode", _TAYLOR_SOURCE),
                        ("steer", "Ghosh et al. 2020 (fewer NFE; no number checked here)"))),
)


#: --sensealg choices; the global error/stiffness regularizers always use DirectAdjoint
SENSEALGS = {"direct": lambda: None, "backsolve": lambda: BacksolveAdjoint(seminorm=True),
             "interpolating": InterpolatingAdjoint, "quadrature": QuadratureAdjoint,
             "reversible": ReversibleAdjoint}


def _regularizer(method: str):
    if method == "vanilla":
        return None
    if method == "steer":
        return "steer"
    if method == "ernode":
        return ErrorEstimateRegularization()
    if method == "srnode":
        return StiffnessRegularization()
    if method == "local-unbiased":
        return LocalErrorRegularization("unbiased")
    if method == "local-biased":
        return LocalErrorRegularization("biased")
    if method == "taynode":
        from ..regularize import TaylorRegularization  # noqa: PLC0415 (optional, built separately)
        return TaylorRegularization(order=3)
    raise ValueError(f"node-digits: unknown method {method!r}; choose from {METHODS}")


def taylor_available() -> bool:
    try:
        from ..regularize import TaylorRegularization  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def build_model(method: str, args) -> nn.Chain:
    reg = _regularizer(method)
    if reg == "steer":
        reg = STEER(args.steer_b)
    global_estimate = isinstance(reg, (ErrorEstimateRegularization, StiffnessRegularization))
    sensealg = None if global_estimate else SENSEALGS[getattr(args, "sensealg", "direct")]()
    node = NeuralODE(KellyField(64, 100), (0.0, 1.0), Tsit5(), sensealg=sensealg, regularize=reg,
                     time_input=True, reltol=args.tol, abstol=args.tol)
    return nn.Chain(node, nn.Dense(64, 10))


def _weight_scale(method: str, args) -> float:
    if method == "srnode":
        return 1.0 / args.stiffness_scale
    if method == "taynode":
        return 1.0 / args.taylor_scale
    if method.startswith("local"):
        return args.local_scale
    return 1.0


def train_one(method: str, seed: int, args, data) -> dict:
    x_train, y_train, x_test, y_test = data
    model = build_model(method, args)
    ps, st = setup(torch.Generator().manual_seed(seed), model)
    state = TrainState(model, ps, st, Adam(args.lr))
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = args.epochs * steps_per_epoch
    schedule = ExponentialAnneal(args.weight_start, args.weight_end, max(total - 1, 1))
    scale = _weight_scale(method, args)
    regularized = method not in ("vanilla", "steer")

    def loss_fn(model, ps, st, batch):
        xb, yb = batch
        logits, st_new = model(xb, ps, st)
        data_loss = torch.nn.functional.cross_entropy(logits, yb)
        node_st = st_new["layer_1"]
        reg = (schedule(state.step) * scale) * node_st["regularization"] if regularized \
            else torch.zeros_like(data_loss)
        return data_loss + reg, st_new, {"nfe": node_st["nfe"], "data_loss": data_loss.detach(), "reg": reg.detach()}

    history = {"loss": [], "data_loss": [], "reg": [], "nfe": []}
    order_gen = torch.Generator().manual_seed(1000 + seed)
    bar = progress(total, f"{method} seed {seed}")
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(n, generator=order_gen)
        for k in range(steps_per_epoch):
            idx = order[k * args.batch_size:(k + 1) * args.batch_size]
            _, loss, stats, state = single_train_step(loss_fn, (x_train[idx], y_train[idx]), state)
            history["loss"].append(loss)
            history["data_loss"].append(stats["data_loss"])
            history["reg"].append(stats["reg"])
            history["nfe"].append(stats["nfe"])
            bar.update(1)
    train_time = time.perf_counter() - start
    bar.close()
    for key in ("loss", "data_loss", "reg"):  # one transfer per curve, after the loop
        history[key] = torch.stack(history[key]).tolist()
    ps, st = state.ps, testmode(state.st)
    with torch.no_grad():
        logits_train, _ = model(x_train, ps, st)
        start = time.perf_counter()
        logits_test, st_test = model(x_test, ps, st)
        predict_time = time.perf_counter() - start
    return {
        "train_accuracy": float((logits_train.argmax(1) == y_train).double().mean()) * 100,
        "test_accuracy": float((logits_test.argmax(1) == y_test).double().mean()) * 100,
        "train_time_s": train_time,
        "predict_time_s": predict_time,
        "test_nfe": st_test["layer_1"]["nfe"],
        "history": history,
    }


COLUMNS = (("train_accuracy", "train acc (%)", "{:.2f}"), ("test_accuracy", "test acc (%)", "{:.2f}"),
           ("train_time_s", "train time (s)", "{:.1f}"), ("predict_time_s", "predict time (s)", "{:.4f}"),
           ("test_nfe", "test NFE", "{:.1f}"))


def run(args) -> dict:
    if args.quick:
        args.epochs, args.seeds = QUICK["epochs"], QUICK["seeds"]
        args.batch_size, args.tol = QUICK["batch_size"], QUICK["tol"]
    check_seeds(args.seeds, "node-digits")
    methods = parse_methods(args.methods, METHODS, "node-digits")
    if "taynode" in methods and not taylor_available():
        print("pylux.regularize.TaylorRegularization is not available: skipping taynode")
        methods.remove("taynode")
    with torch_threads(args.threads):
        return _run(args, methods)


def _run(args, methods) -> dict:
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")
    data = (x_train, y_train, x_test, y_test)
    os.makedirs(args.out, exist_ok=True)
    summary, histories, raw = {}, {}, {}
    for method in methods:
        runs = [train_one(method, seed, args, data) for seed in range(args.seeds)]
        summary[method] = summarize(runs, [k for k, _, _ in COLUMNS])
        histories[method] = [r["history"] for r in runs]
        raw[method] = [{k: v for k, v in r.items() if k != "history"} for r in runs]
        line = ", ".join(f"{label} {fmt.format(summary[method][key][0])}" for key, label, fmt in COLUMNS)
        print(f"{method}: {line}")
    table = markdown_table(summary, COLUMNS)
    command = ("pylux experiments node-digits " + f"--epochs {args.epochs} --seeds {args.seeds} "
               f"--methods {','.join(methods)} --tol {args.tol} --lr {args.lr} --batch-size {args.batch_size} "
               f"--weight-start {args.weight_start} --weight-end {args.weight_end} "
               f"--stiffness-scale {args.stiffness_scale} --local-scale {args.local_scale} "
               f"--taylor-scale {args.taylor_scale} "
               f"--steer-b {args.steer_b} --sensealg {args.sensealg} --threads {args.threads}")
    text = (f"# node-digits\n\n`{command}`\n\nmean ± std over {args.seeds} seed(s); float32, "
            f"{args.threads} thread(s)\n\n{table}\n")
    comparison, checks = paper_comparison(summary, CLAIMS)
    if comparison:
        text += (f"\nAgainst the papers (MNIST there, 8x8 digits here; ratio of our means to vanilla's):\n\n"
                 f"{comparison}\n")
    write_results(args.out, text, {"command": command, "settings": vars(args), "summary": summary, "runs": raw,
                                   "paper_comparison": checks, "histories": histories})
    plot = plot_histories(histories, os.path.join(args.out, "training.png"),
                          "node-digits: cross-entropy, regularization and NFE over training")
    print(text)
    report_written(args.out, [plot])
    return summary
