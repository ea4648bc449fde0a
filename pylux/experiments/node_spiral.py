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
training time; beside them the paper's claim (ERNODE and SRNODE predict with
fewer evaluations than the unregularized model; Pal et al. 2021 report about
half the prediction time) and whether its direction was reproduced here.
Plots: ``training.png`` (the trajectory MSE without the regularization term,
the weighted regularization term and the forward NFE over training, mean ± std
over seeds) and ``fit.png`` (each method's fitted trajectory against the data).
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
from ._report import (add_common_arguments, check_seeds, markdown_table, paper_comparison, parse_methods,
                      plot_fit, plot_histories, progress, report_written, summarize, torch_threads, write_results)

__all__ = ["add_arguments", "run", "METHODS"]

METHODS = ("vanilla", "ernode", "srnode")


def add_arguments(parser) -> None:
    parser.add_argument("--iterations", type=int, default=300, help="Adam iterations (default 300)")
    parser.add_argument("--epochs", type=int, default=None, help="alias of --iterations (full-batch)")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--tol", type=float, default=1e-6, help="reltol = abstol")
    parser.add_argument("--weight-start", type=float, default=0.3)
    parser.add_argument("--weight-end", type=float, default=0.3)
    parser.add_argument("--stiffness-scale", type=float, default=10.0,
                        help="SRNODE weight = error weight / this")
    add_common_arguments(parser, METHODS, quick=f"{QUICK_ITERATIONS} iterations, 1 seed")


#: iterations of the --quick preset
QUICK_ITERATIONS = 20
#: the paper's claim for each regularized row (Pal, Ma, Shah & Rackauckas, ICML 2021)
CLAIMS = tuple({"method": m, "baseline": "vanilla", "metric": metric, "label": label, "paper": paper,
                "direction": "lower", "source": "Pal et al. 2021, abstract (\"halve the prediction time\")"}
               for m in ("ernode", "srnode")
               for metric, label, paper in (("predict_nfe", "prediction NFE", "fewer (the cause of the time)"),
                                            ("predict_time_s", "prediction time", "about 0.5x")))


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
        data_loss = (pred[:, 0] - u_obs).pow(2).mean()
        reg = (schedule(state.step) * scale) * st_new["regularization"] if method != "vanilla" \
            else torch.zeros_like(data_loss)
        return data_loss + reg, st_new, {"nfe": st_new["nfe"], "data_loss": data_loss.detach(), "reg": reg.detach()}

    history = {"loss": [], "data_loss": [], "reg": [], "nfe": []}
    bar = progress(args.iterations, f"{method} seed {seed}")
    start = time.perf_counter()
    for _ in range(args.iterations):
        _, loss, stats, state = single_train_step(loss_fn, None, state)
        history["loss"].append(loss)
        history["data_loss"].append(stats["data_loss"])
        history["reg"].append(stats["reg"])
        history["nfe"].append(stats["nfe"])
        bar.update(1)
    train_time = time.perf_counter() - start
    bar.close()
    for key in ("loss", "data_loss", "reg"):  # one transfer per curve, after the loop
        history[key] = torch.stack(history[key]).tolist() if history[key] else []
    with torch.no_grad():
        start = time.perf_counter()
        pred, st_test = model(u0, state.ps, testmode(state.st))
        predict_time = time.perf_counter() - start
    return {"mse": float((pred[:, 0] - u_obs).pow(2).mean()), "predict_nfe": st_test["nfe"],
            "predict_time_s": predict_time, "train_time_s": train_time, "history": history,
            "prediction": pred[:, 0].tolist()}


COLUMNS = (("mse", "trajectory MSE", "{:.4f}"), ("predict_nfe", "prediction NFE", "{:.1f}"),
           ("predict_time_s", "prediction time (s)", "{:.4f}"), ("train_time_s", "train time (s)", "{:.1f}"))


def run(args) -> dict:
    if args.epochs is not None:
        args.iterations = args.epochs
    if args.quick:
        args.iterations, args.seeds = QUICK_ITERATIONS, 1
    check_seeds(args.seeds, "node-spiral")
    methods = parse_methods(args.methods, METHODS, "node-spiral")
    with torch_threads(args.threads):
        return _run(args, methods)


def _run(args, methods) -> dict:
    t, u = spiral_ode_data(30)
    t_obs = [float(x) for x in t.tolist()]
    os.makedirs(args.out, exist_ok=True)
    summary, histories, raw, fits = {}, {}, {}, {}
    for method in methods:
        runs = [train_one(method, seed, args, t_obs, u) for seed in range(args.seeds)]
        summary[method] = summarize(runs, [k for k, _, _ in COLUMNS])
        histories[method] = [r["history"] for r in runs]
        fits[method] = [r["prediction"] for r in runs]
        raw[method] = [{k: v for k, v in r.items() if k not in ("history", "prediction")} for r in runs]
        print(f"{method}: " + ", ".join(f"{label} {fmt.format(summary[method][key][0])}"
                                        for key, label, fmt in COLUMNS))
    command = (f"pylux experiments node-spiral --iterations {args.iterations} --seeds {args.seeds} "
               f"--methods {','.join(methods)} --tol {args.tol} --lr {args.lr} --weight-start {args.weight_start} "
               f"--weight-end {args.weight_end} --stiffness-scale {args.stiffness_scale} --threads {args.threads}")
    comparison, checks = paper_comparison(summary, CLAIMS)
    text = (f"# node-spiral\n\n`{command}`\n\nmean ± std over {args.seeds} seed(s); float32\n\n"
            f"{markdown_table(summary, COLUMNS)}\n")
    if comparison:
        text += f"\nAgainst the paper (ratio of our means to vanilla's):\n\n{comparison}\n"
    write_results(args.out, text, {"command": command, "settings": vars(args), "summary": summary, "runs": raw,
                                   "paper_comparison": checks, "histories": histories, "fits": fits,
                                   "data": {"t": t_obs, "u": u.tolist()}})
    plots = [plot_histories(histories, os.path.join(args.out, "training.png"),
                            "node-spiral: trajectory MSE, regularization and NFE over training"),
             plot_fit(t, u, fits, os.path.join(args.out, "fit.png"),
                      "node-spiral: fitted trajectories (lines) against the data (dots)")]
    print(text)
    report_written(args.out, plots)
    return summary
