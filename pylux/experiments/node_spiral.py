r"""Spiral ODE fit: vanilla vs ERNODE vs SRNODE, with the NFE of the trained model's prediction.

The classic neural-ODE fit (Pal's thesis, Fig. 5.2; Pal et al., ICML 2021): the
cubic spiral :math:`\\dot u = u^3 A` from :math:`u(0) = (2, 0)` over
:math:`[0, 1.5]`, observed at 30 times (:func:`pylux.data.spiral_ode_data`),
fitted by a neural ODE :math:`\\dot z = W_2 \\tanh(W_1 z^3 + b_1) + b_2` (50
hidden units, Tsit5) trained on the mean squared error of the whole trajectory
plus :math:`\\lambda R` (ERNODE: :math:`R = \\sum_j E_j |\\Delta t_j|`; SRNODE:
the stiffness estimates summed the same way), :math:`\\lambda` annealed
exponentially from ``--weight-start`` to ``--weight-end`` (SRNODE's divided by
``--stiffness-scale``). Gradients backpropagate through the solver (the
global regularizers need it).

Weights: a constant :math:`\lambda = 0.3` by default (``--weight-start`` =
``--weight-end``). Unlike the classifier, this fit has no slack: with
:math:`\lambda \ge 1` (constant, or annealed from 3 or 10) the regularizer wins
early in training and the fit collapses to a nearly trivial trajectory
(trajectory MSE above 1, far fewer steps); at 0.3 the fit survives.

Tolerances ``reltol = abstol = 1e-6`` by default: with the cubic nonlinearity
the unregularized fit then needs tens of steps, so a regularizer has work to do.

Reported, mean ± std over seeds: final trajectory MSE (unregularized), the
NFE of one test-mode prediction of the trajectory, its wall time, and the
training time.
"""

from __future__ import annotations

import os
import time

import torch

from .. import nn
from ..core import setup, testmode
from ..data import spiral_ode_data
from ..diffeq import Tsit5
from ..layers import NeuralODE
from ..regularize import ErrorEstimateRegularization, StiffnessRegularization
from ..training import Adam, TrainState, single_train_step
from ..training.schedules import ExponentialAnneal
from ._report import markdown_table, plot_histories, summarize, write_results

__all__ = ["add_arguments", "run", "METHODS"]

METHODS = ("vanilla", "ernode", "srnode")


def add_arguments(parser) -> None:
    parser.add_argument("--iterations", type=int, default=300, help="Adam iterations (default 300)")
    parser.add_argument("--epochs", type=int, default=None, help="alias of --iterations (full-batch)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--tol", type=float, default=1e-6, help="reltol = abstol")
    parser.add_argument("--weight-start", type=float, default=0.3)
    parser.add_argument("--weight-end", type=float, default=0.3)
    parser.add_argument("--stiffness-scale", type=float, default=10.0,
                        help="SRNODE weight = error weight / this")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="preset: 60 iterations, 1 seed")


def build_model(method: str, t_obs: list[float], tol: float) -> NeuralODE:
    reg = {"vanilla": None, "ernode": ErrorEstimateRegularization(),
           "srnode": StiffnessRegularization()}[method]
    field = nn.Chain(nn.WrappedFunction(lambda z: z ** 3), nn.Dense(2, 50, torch.tanh), nn.Dense(50, 2))
    return NeuralODE(field, (t_obs[0], t_obs[-1]), Tsit5(), saveat=t_obs, regularize=reg, reltol=tol, abstol=tol)


def train_one(method: str, seed: int, args, t_obs, u_obs) -> dict:
    model = build_model(method, t_obs, args.tol)
    ps, st = setup(torch.Generator().manual_seed(seed), model)
    state = TrainState(model, ps, st, Adam(args.lr))
    schedule = ExponentialAnneal(args.weight_start, args.weight_end, max(args.iterations - 1, 1))
    scale = 1.0 / args.stiffness_scale if method == "srnode" else 1.0
    u0 = u_obs[0:1]

    def loss_fn(model, ps, st, batch):
        pred, st_new = model(u0, ps, st)
        loss = (pred[:, 0] - u_obs).pow(2).mean()
        if method != "vanilla":
            loss = loss + (schedule(state.step) * scale) * st_new["regularization"]
        return loss, st_new, {"nfe": st_new["nfe"]}

    history = {"loss": [], "nfe": []}
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415
        steps = tqdm(range(args.iterations), desc=f"{method} seed {seed}", leave=False)
    except ImportError:
        steps = range(args.iterations)
    start = time.perf_counter()
    for _ in steps:
        _, loss, stats, state = single_train_step(loss_fn, None, state)
        history["loss"].append(loss)
        history["nfe"].append(stats["nfe"])
    train_time = time.perf_counter() - start
    history["loss"] = torch.stack(history["loss"]).tolist()
    with torch.no_grad():
        start = time.perf_counter()
        pred, st_test = model(u0, state.ps, testmode(state.st))
        predict_time = time.perf_counter() - start
    return {"mse": float((pred[:, 0] - u_obs).pow(2).mean()), "predict_nfe": st_test["nfe"],
            "predict_time_s": predict_time, "train_time_s": train_time, "history": history}


COLUMNS = (("mse", "trajectory MSE", "{:.4f}"), ("predict_nfe", "prediction NFE", "{:.1f}"),
           ("predict_time_s", "prediction time (s)", "{:.4f}"), ("train_time_s", "train time (s)", "{:.1f}"))


def run(args) -> dict:
    if args.epochs is not None:
        args.iterations = args.epochs
    if args.quick:
        args.iterations, args.seeds = 60, 1
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"node-spiral: unknown method {m!r}; choose from {', '.join(METHODS)}")
    t, u = spiral_ode_data(30)
    t_obs = [float(x) for x in t.tolist()]
    os.makedirs(args.out, exist_ok=True)
    summary, histories, raw = {}, {}, {}
    for method in methods:
        runs = [train_one(method, seed, args, t_obs, u) for seed in range(args.seeds)]
        summary[method] = summarize(runs, [k for k, _, _ in COLUMNS])
        histories[method] = [r["history"] for r in runs]
        raw[method] = [{k: v for k, v in r.items() if k != "history"} for r in runs]
        print(f"{method}: " + ", ".join(f"{label} {fmt.format(summary[method][key][0])}"
                                        for key, label, fmt in COLUMNS))
    command = (f"pylux experiments node-spiral --iterations {args.iterations} --seeds {args.seeds} "
               f"--methods {','.join(methods)} --tol {args.tol} --lr {args.lr} --weight-start {args.weight_start} "
               f"--weight-end {args.weight_end} --stiffness-scale {args.stiffness_scale} --threads {args.threads}")
    text = (f"# node-spiral\n\n`{command}`\n\nmean ± std over {args.seeds} seed(s); float32\n\n"
            f"{markdown_table(summary, COLUMNS)}\n")
    write_results(args.out, text, {"command": command, "settings": vars(args), "summary": summary, "runs": raw,
                                   "histories": histories})
    plot_histories(histories, os.path.join(args.out, "training.png"), "node-spiral: loss and NFE over training")
    print(text)
    return summary
