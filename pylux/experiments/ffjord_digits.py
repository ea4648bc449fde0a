r"""FFJORD on dequantized 8x8 digits: vanilla against TayNODE, RNODE, global and local error regularization.

Kelly et al. (NeurIPS 2020, Table 2: TayNODE on FFJORD for MNIST, 0.62x the test NFE at +0.6 %
bits/dim) and Kidger et al. (ICML 2021, Table 2: the seminorm adjoint's backward NFE on FFJORD)
at laptop scale: the embedded digits as 64-d points in :math:`[0, 1)^{64}`
(:func:`pylux.data.dequantized_digits`, 1437 train / 360 test images), :class:`pylux.FFJORD`
over :math:`t \in [0, 1]` with the time-conditioned field
:class:`~pylux.experiments.cnf_moons.TimeMLP` (two tanh layers of ``--hidden`` units), Tsit5 at
``reltol = abstol = --tol``, Hutchinson (Rademacher) trace in training, Adam.

Methods (each trained on the same batches; the loss is the NLL in nats per dimension plus
:math:`\lambda R`):

* ``vanilla`` — BacksolveAdjoint without the seminorm, no regularizer;
* ``vanilla-seminorm`` — the same with ``seminorm=True`` (Kidger et al.): the backward NFE comparison;
* ``taynode`` — :class:`~pylux.regularize.TaylorRegularization` (K = 2), weight ``--taylor-weight``;
* ``rnode`` — kinetic energy + Jacobian Frobenius (Finlay et al. 2020), weight ``--rnode-weight``
  each; the Jacobian term reads the trace estimator's own VJP;
* ``rnode-fixed`` — the same trained on RK4's fixed grid of ``--fixed-dt`` (Finlay et al. train on
  fixed grids), backprop through the solver; evaluated adaptively like the others;
* ``global-er`` — ERNODE (Pal et al. 2021), weight ``--er-weight``, backprop through the solver
  (its per-step estimates need it);
* ``local-er`` — the local error regularizer at one uniformly sampled time (Pal et al. 2023),
  weight ``--er-weight`` × ``--local-scale``.

The regularized adaptive methods use BacksolveAdjoint(seminorm=True). Reported, mean ± std over
seeds: test bits/dim (exact trace, :func:`pylux.data.bits_per_dim` with 17 grey levels), test NFE
(a test-mode forward pass of the test set, Hutchinson trace, no regularizer), training time,
the mean backward NFE over the last epoch (adjoint methods), and the targets: a regularizer at
<= 0.7x vanilla's test NFE with <= +2 % bits/dim, and the seminorm cutting the backward NFE by
>= 30 % at equal bits/dim.

Defaults. 20 epochs: after 6 the training NLL still falls by about a tenth of a nat per dimension
per epoch and vanilla's NFE is still rising, so an NFE comparison there compares training speeds.
The weights are the largest of a sweep on seed 0 (Taylor 0.003/0.01/0.03/0.1, RNODE
0.001/0.002/0.003, ER 10/30/100/1000) whose last-epoch *training* NLL stays within +2 % bits/dim
of vanilla's (the test set plays no part in the choice). The error-estimate terms are small (a sum
of scaled error estimates times step sizes, of order 1e-3 here), so a weight of 1 leaves them
without effect; the RNODE terms sum over the 64 dimensions and are of order 10, so 0.01 costs
tens of percent in bits/dim on this model.

The seminorm at this scale: in the backward solve every step's scaled error estimate stays far
below 1 (the step sizes are set by the initial-step heuristic and the PI controller's growth
limit, not by the tolerance), and the re-integrated state ``[z, Δ]`` is the largest group of the
norm, not the parameter adjoint; leaving ``a_θ`` (or the constant adjoint of ``Δ``, whose error
estimate is zero) out of the norm then changes no step. torchdiffeq's seminorm on the same flow
behaves alike (``benchmarks/cnf.py``).
"""

from __future__ import annotations

import math
import os
import time

import torch

from ..core import setup, testmode
from ..data import bits_per_dim, dequantized_digits
from ..diffeq import RK4, Tsit5
from ..layers import FFJORD, StandardNormal
from ..regularize import (ErrorEstimateRegularization, JacobianFrobeniusRegularization, KineticRegularization,
                          LocalErrorRegularization, TaylorRegularization)
from ..sensitivity import BacksolveAdjoint
from ..training import Adam, TrainState, single_train_step
from ._report import (_pyplot, add_common_arguments, check_seeds, markdown_table, parse_methods, plot_histories,
                      progress, report_written, summarize, torch_threads, write_results)
from .cnf_moons import TimeMLP

__all__ = ["add_arguments", "run", "METHODS"]

METHODS = ("vanilla", "vanilla-seminorm", "taynode", "rnode", "rnode-fixed", "global-er", "local-er")
QUICK = {"epochs": 1, "seeds": 1, "batch_size": 512, "tol": 1e-2, "hidden": 16, "max_train": 512, "max_test": 64}
DIM = 64


def add_arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--tol", type=float, default=1e-4, help="reltol = abstol of every adaptive solve")
    parser.add_argument("--taylor-weight", type=float, default=0.003)
    parser.add_argument("--rnode-weight", type=float, default=0.002, help="weight of each RNODE term")
    parser.add_argument("--er-weight", type=float, default=10.0)
    parser.add_argument("--local-scale", type=float, default=5.0,
                        help="local-ER weight = er weight * this (one step against a sum over steps)")
    parser.add_argument("--fixed-dt", type=float, default=0.25, help="RK4 step of rnode-fixed")
    parser.add_argument("--max-train", type=int, default=0, help="use only this many training images (0: all)")
    parser.add_argument("--max-test", type=int, default=0, help="use only this many test images (0: all 360)")
    add_common_arguments(parser, METHODS, quick=f"1 seed, {QUICK['epochs']} epoch of {QUICK['max_train']} images, "
                                                 f"hidden {QUICK['hidden']}, tol {QUICK['tol']}")


def _setup(method: str, args):
    """``(flow, weight)``: the method's flow and the weight of its regularization term."""
    backsolve = BacksolveAdjoint(seminorm=method != "vanilla")
    common = dict(base=StandardNormal(DIM), time_input=True)
    model = TimeMLP(DIM, args.hidden)
    tol = dict(reltol=args.tol, abstol=args.tol)
    if method in ("vanilla", "vanilla-seminorm"):
        return FFJORD(model, (0.0, 1.0), sensealg=backsolve, **common, **tol), 0.0
    if method == "taynode":
        return FFJORD(model, (0.0, 1.0), sensealg=backsolve, regularize=TaylorRegularization(order=2), **common,
                      **tol), args.taylor_weight
    rnode = [KineticRegularization(), JacobianFrobeniusRegularization()]
    if method == "rnode":
        return FFJORD(model, (0.0, 1.0), sensealg=backsolve, regularize=rnode, **common, **tol), args.rnode_weight
    if method == "rnode-fixed":
        return FFJORD(model, (0.0, 1.0), solver=RK4(), regularize=rnode, dt=args.fixed_dt, adaptive=False,
                      **common), args.rnode_weight
    if method == "global-er":
        return FFJORD(model, (0.0, 1.0), regularize=ErrorEstimateRegularization(), **common, **tol), args.er_weight
    if method == "local-er":
        return (FFJORD(model, (0.0, 1.0), sensealg=backsolve, regularize=LocalErrorRegularization("unbiased"),
                       **common, **tol), args.er_weight * args.local_scale)
    raise ValueError(f"ffjord-digits: unknown method {method!r}; choose from {METHODS}")


def _evaluator(flow: FFJORD, args, trace: str) -> FFJORD:
    """The trained field, solved adaptively as every method is tested (Tsit5 at --tol)."""
    return FFJORD(flow.model, flow.tspan, base=flow.base, trace=trace, solver=Tsit5(), time_input=True,
                  reltol=args.tol, abstol=args.tol)


def train_one(method: str, seed: int, args, data) -> dict:
    x_train, x_test = data
    flow, weight = _setup(method, args)
    ps, st = setup(torch.Generator().manual_seed(seed), flow)
    state = TrainState(flow, ps, st, Adam(args.lr))

    def loss_fn(model, ps, st, batch):
        log_p, st_new = model(batch, ps, st)
        data_loss = -log_p.mean() / DIM
        reg = weight * st_new["regularization"] if weight else torch.zeros_like(data_loss)
        return data_loss + reg, st_new, {"nfe": st_new["nfe"], "backward_stats": st_new["backward_stats"],
                                         "data_loss": data_loss.detach(), "reg": reg.detach()}

    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / args.batch_size)
    history = {"loss": [], "data_loss": [], "reg": [], "nfe": [], "backward_nfe": []}
    order = torch.Generator().manual_seed(1000 + seed)
    bar = progress(args.epochs * steps_per_epoch, f"{method} seed {seed}")
    start = time.perf_counter()
    for _ in range(args.epochs):
        perm = torch.randperm(n, generator=order)
        for k in range(steps_per_epoch):
            batch = x_train[perm[k * args.batch_size:(k + 1) * args.batch_size]]
            _, loss, stats, state = single_train_step(loss_fn, batch, state)
            for key in ("loss", "data_loss", "reg"):
                history[key].append(loss if key == "loss" else stats[key])
            history["nfe"].append(stats["nfe"])
            back = stats["backward_stats"]
            history["backward_nfe"].append(back.get("nf", 0) if back else 0)
            bar.update(1)
    train_time = time.perf_counter() - start
    bar.close()
    for key in ("loss", "data_loss", "reg"):
        history[key] = torch.stack(history[key]).tolist()
    ps, st = state.ps, testmode(state.st)
    with torch.no_grad():
        _, st_test = _evaluator(flow, args, "hutchinson")(x_test, ps, st)
        log_p, _ = _evaluator(flow, args, "exact")(x_test, ps, st)
    last = history["backward_nfe"][-steps_per_epoch:]
    return {"test_bpd": float(bits_per_dim(log_p, DIM)), "test_nfe": float(st_test["nfe"]),
            "train_time_s": train_time, "backward_nfe": sum(last) / len(last),
            "train_nfe": sum(history["nfe"][-steps_per_epoch:]) / steps_per_epoch, "history": history,
            "_trained": (flow, ps, st)}


COLUMNS = (("test_bpd", "test bits/dim", "{:.3f}"), ("test_nfe", "test NFE", "{:.1f}"),
           ("train_time_s", "train time (s)", "{:.0f}"), ("train_nfe", "train forward NFE (last epoch)", "{:.1f}"),
           ("backward_nfe", "backward NFE (last epoch)", "{:.1f}"))


def _targets(summary: dict) -> tuple[str, list[dict]]:
    lines = ["| comparison | ours | target | paper | met |", "|---|---|---|---|---|"]
    records = []
    vanilla = summary.get("vanilla")
    if vanilla is not None:
        for method in ("taynode", "rnode", "rnode-fixed", "global-er", "local-er"):
            if method not in summary:
                continue
            nfe = summary[method]["test_nfe"][0] / vanilla["test_nfe"][0]
            bpd = summary[method]["test_bpd"][0] / vanilla["test_bpd"][0] - 1.0
            met = nfe <= 0.7 and bpd <= 0.02
            records.append({"method": method, "nfe_ratio": nfe, "bpd_change": bpd, "met": met})
            lines.append(f"| {method} vs vanilla: test NFE, bits/dim | {nfe:.2f}x, {100 * bpd:+.1f} % | "
                         f"<= 0.7x at <= +2 % | 0.62x at +0.6 % (Kelly et al. 2020, TayNODE) | "
                         f"{'yes' if met else 'no'} |")
        semi = summary.get("vanilla-seminorm")
        if semi is not None:
            cut = 1.0 - semi["backward_nfe"][0] / vanilla["backward_nfe"][0]
            bpd = semi["test_bpd"][0] / vanilla["test_bpd"][0] - 1.0
            met = cut >= 0.3 and abs(bpd) <= 0.02
            records.append({"method": "vanilla-seminorm", "backward_nfe_cut": cut, "bpd_change": bpd, "met": met})
            lines.append(f"| seminorm vs vanilla: backward NFE cut, bits/dim | {100 * cut:.0f} %, {100 * bpd:+.1f} % | "
                         f">= 30 % at equal bits/dim | 40 % median (Kidger et al. 2021) | {'yes' if met else 'no'} |")
    return ("\n".join(lines) if records else ""), records


def run(args) -> dict:
    if args.quick:
        args.epochs, args.seeds, args.batch_size = QUICK["epochs"], QUICK["seeds"], QUICK["batch_size"]
        args.tol, args.hidden, args.max_train = QUICK["tol"], QUICK["hidden"], QUICK["max_train"]
        args.max_test = QUICK["max_test"]
    check_seeds(args.seeds, "ffjord-digits")
    methods = parse_methods(args.methods, METHODS, "ffjord-digits")
    with torch_threads(args.threads):
        return _run(args, methods)


def _run(args, methods) -> dict:
    x_train = dequantized_digits("train", rng=torch.Generator().manual_seed(0))
    if args.max_train:
        x_train = x_train[:args.max_train]
    x_test = dequantized_digits("test", rng=torch.Generator().manual_seed(1))
    if args.max_test:
        x_test = x_test[:args.max_test]
    os.makedirs(args.out, exist_ok=True)
    summary, histories, raw, trained = {}, {}, {}, {}
    for method in methods:
        runs = [train_one(method, seed, args, (x_train, x_test)) for seed in range(args.seeds)]
        summary[method] = summarize(runs, [k for k, _, _ in COLUMNS])
        histories[method] = [r["history"] for r in runs]
        raw[method] = [{k: v for k, v in r.items() if k != "history" and not k.startswith("_")} for r in runs]
        trained[method] = runs[0]["_trained"]
        print(f"{method}: " + ", ".join(f"{label} {fmt.format(summary[method][key][0])}"
                                        for key, label, fmt in COLUMNS))
    command = (f"pylux experiments ffjord-digits --epochs {args.epochs} --seeds {args.seeds} "
               f"--methods {','.join(methods)} --batch-size {args.batch_size} --lr {args.lr} --hidden {args.hidden} "
               f"--tol {args.tol} --taylor-weight {args.taylor_weight} --rnode-weight {args.rnode_weight} "
               f"--er-weight {args.er_weight} --local-scale {args.local_scale} --fixed-dt {args.fixed_dt} "
               f"--max-train {args.max_train} --max-test {args.max_test} --threads {args.threads}")
    targets, checks = _targets(summary)
    text = (f"# ffjord-digits\n\n`{command}`\n\nmean ± std over {args.seeds} seed(s); float32, {args.threads} "
            f"thread(s); {x_train.shape[0]} training and {x_test.shape[0]} test images\n\n{markdown_table(summary, COLUMNS)}\n")
    if targets:
        text += f"\nTargets (MNIST in the papers, 8x8 digits here):\n\n{targets}\n"
    write_results(args.out, text, {"command": command, "settings": vars(args), "summary": summary, "runs": raw,
                                   "targets": checks, "histories": histories})
    plots = [plot_histories(histories, os.path.join(args.out, "training.png"),
                            "ffjord-digits: NLL (nats/dim), regularization and forward NFE over training")]
    plots.append(_plot_samples(trained, os.path.join(args.out, "samples.png")))
    print(text)
    report_written(args.out, plots)
    return summary


def _plot_samples(trained: dict, path: str, n: int = 8) -> str | None:
    """Eight samples of each method's flow (seed 0), drawn by the reverse solve."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(len(trained), n, figsize=(n, 1.1 * len(trained)), squeeze=False)
    for row, (method, (flow, ps, st)) in zip(axes, trained.items()):
        with torch.no_grad():
            x = flow.sample(n, ps, st, torch.Generator().manual_seed(0)).clamp(0, 1)
        for ax, image in zip(row, x):
            ax.imshow(image.reshape(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(method, fontsize=6)
    fig.suptitle("ffjord-digits: samples (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
