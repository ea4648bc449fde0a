r"""Latent ODE on the irregularly sampled periodic toy: vanilla vs STEER, TayNODE, global/local ER and SR.

The layout of the thesis' Latent-ODE tables (Pal, Tables 5.2/6.3 on PhysioNet;
Pal et al. ICML 2021 and 2023) on Rubanova et al.'s periodic toy
(:func:`pylux.data.periodic_series`: one sinusoid per series, random
frequency and phase, one shared grid of random times in ``[0, 5]``, half of
each series' points observed). Interpolation task: the ODE-RNN encoder (run
backward, one Euler step per observation interval, as in Rubanova et al.'s
encoder) reads the observed points, the Latent ODE decodes every grid point,
and the test MSE is over the held-out (unobserved) points of the test series.

Model: encoder GRU + ODE-RNN with 20 hidden units, a 6-d latent state, decoder
dynamics ``Dense(6, U, tanh) -> Dense(U, 6)`` (``--units`` U, default 100, as
Rubanova et al.'s generator) solved with Tsit5 at ``--tol`` (default 1e-5) by
backpropagation through the solver (the global ER/SR regularizers need it),
``Dense(6, 1)`` readout; ELBO with Rubanova et al.'s observation noise 0.01
and KL annealing (:func:`~pylux.layers.odernn.kl_annealing`). The
regularizers act on the decoder (STEER: one unit-interval solve per grid
interval in training, each ending at a drawn time; test mode solves plainly).

Training: Adam, batches of 20 of the 200 fitted series, 100 epochs (1000
steps), the learning rate cosine-annealed from ``--lr`` 1e-2 to ``--lr-end``
1e-4 (at a constant 1e-2 the fit stalls on a noisy plateau), and the
regularization weight annealed geometrically from ``--weight-*`` to
``--weight-end`` (0.1) times it, as Pal et al. anneal theirs (100 -> 10).

Data splits: the first ``--train`` series are the training pool; its last
``--val`` (40) are never fitted and are scored exactly like the test set
(validation MSE/NFE). The default weights ``--weight-er`` and
``--weight-local`` were chosen on that validation split (the largest weight of
a log-spaced sweep whose validation MSE stayed within +10 % of vanilla's),
never on the test series. The others (SR, TayNODE, STEER's ``b``) keep the
values set once from the magnitudes of the terms relative to the ELBO.

The sweep (seed 1, validation MSE / NFE; vanilla 0.097 / 368, its seeds 0 and
2 0.055 / 266 and 0.037 / 284): ER 100 -> 0.032 / 284, 300 -> 0.033 / 278,
1000 -> 0.56 / 98 (the fit collapses to the mean; with ``--weight-delay 300``
0.28 / 188); local unbiased 1e4 -> 0.022 / 284, 3e4 -> 0.44 / 158, 1e5 ->
0.61 / 104; local biased 1e4 -> 0.027 / 278, 3e4 -> 0.56 / 74, 1e5 -> 0.57 /
86. The weighted terms are 5-20 % of the ELBO at the kept weights. Every fit
that reproduces the sinusoids needs about 270-290 decoder evaluations at
1e-5; the regularizers remove vanilla's excess above that (and improve the
held-out MSE) but no weight found gives a cheaper good fit: between the kept
weights and 3x them the model drops to predicting the mean. At the defaults,
seeds 0-2 (test MSE / NFE, mean ± std): vanilla 0.066 ± 0.031 / 308 ± 52,
ER 0.076 ± 0.050 / 260 ± 26 (0.84x), local unbiased 0.048 ± 0.020 / 280 ± 12
(0.91x), local biased 0.135 ± 0.130 / 250 ± 49 (0.81x; seed 2 half collapsed):
the issue's target (<= 0.7x NFE at <= +10 % MSE) is not met on this toy.

Reported per method (mean ± std over seeds): test MSE, test NFE (decoder
evaluations of one test-mode pass over the test set), training time and
prediction time.
"""

from __future__ import annotations

import os
import time

import torch

from .. import nn
from ..core import setup, testmode
from ..data import periodic_series
from ..diffeq import Euler, Tsit5
from ..layers import LatentODE, ODERNN
from ..layers.odernn import kl_annealing
from ..regularize import STEER, ErrorEstimateRegularization, LocalErrorRegularization, StiffnessRegularization
from ..training import Adam, CosineAnneal, ExponentialAnneal, TrainState, single_train_step
from ._report import (add_common_arguments, check_seeds, markdown_table, paper_comparison, parse_methods,
                      plot_histories, progress, report_written, summarize, torch_threads, write_results)

__all__ = ["add_arguments", "run", "METHODS"]

METHODS = ("vanilla", "steer", "taynode", "ernode", "srnode", "local-unbiased", "local-biased")

#: the thesis' claim for ER and local ER on the Latent ODE (NFE ratio at a small loss increase)
CLAIMS = tuple({"method": m, "baseline": "vanilla", "metric": "test_nfe", "label": "test NFE", "paper": "0.38x-0.61x",
                "source": "Pal, thesis Tables 5.2/6.3 (PhysioNet Latent ODE; issue target <= 0.7x)",
                "direction": "lower"} for m in ("ernode", "local-unbiased", "local-biased")) + tuple(
    {"method": m, "baseline": "vanilla", "metric": "test_mse", "label": "test MSE", "paper": "about +5%",
     "source": "Pal, thesis Tables 5.2/6.3 (issue target <= +10%)", "direction": "higher"}
    for m in ("ernode", "local-unbiased", "local-biased"))


def add_arguments(parser) -> None:
    add_common_arguments(parser, METHODS, quick="1 seed, 16 train / 8 test series of 16 points, 2 epochs")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--train", type=int, default=240, help="training series (the validation split included)")
    parser.add_argument("--val", type=int, default=40,
                        help="of the training series, the last VAL are not fitted but scored like the test set "
                             "(validation MSE/NFE, for choosing the regularization weights)")
    parser.add_argument("--test", type=int, default=100, help="test series")
    parser.add_argument("--times", type=int, default=50, help="grid points per series")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--lr-end", type=float, default=1e-4,
                        help="cosine-anneal the learning rate from --lr to this over the training steps "
                             "(a negative value: constant --lr)")
    parser.add_argument("--weight-end", type=float, default=0.1,
                        help="the regularization weight is annealed geometrically from --weight-* to "
                             "WEIGHT_END x that over the training steps (Pal et al.: 100 -> 10, i.e. 0.1)")
    parser.add_argument("--weight-delay", type=int, default=0,
                        help="training steps before the regularization term is switched on (weight 0 before)")
    parser.add_argument("--units", type=int, default=100, help="hidden units of the decoder dynamics")
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds FIRST_SEED .. FIRST_SEED + SEEDS - 1")
    parser.add_argument("--tol", type=float, default=1e-5, help="reltol = abstol of the decoder solve")
    parser.add_argument("--weight-er", type=float, default=300.0, help="ERNODE weight (global error estimates)")
    parser.add_argument("--weight-sr", type=float, default=1.0, help="SRNODE weight")
    parser.add_argument("--weight-local", type=float, default=1e4, help="local ER weight (one step)")
    parser.add_argument("--weight-taylor", type=float, default=1.0, help="TayNODE weight")
    parser.add_argument("--steer-b", type=float, default=0.5, help="STEER half-width, in units of each interval")


def _regularizer(method: str, args):
    return {"vanilla": None, "steer": STEER(args.steer_b), "ernode": ErrorEstimateRegularization(),
            "srnode": StiffnessRegularization(), "local-unbiased": LocalErrorRegularization("unbiased"),
            "local-biased": LocalErrorRegularization("biased")}.get(method) if method != "taynode" else _taylor()


def _taylor():
    from ..regularize import TaylorRegularization  # noqa: PLC0415
    return TaylorRegularization(order=3)


def _weight(method: str, args) -> float:
    return {"ernode": args.weight_er, "srnode": args.weight_sr, "local-unbiased": args.weight_local,
            "local-biased": args.weight_local, "taynode": args.weight_taylor}.get(method, 0.0)


def build_model(method: str, args) -> LatentODE:
    latent, hidden = 6, 20
    encoder = ODERNN(nn.Chain(nn.Dense(hidden, hidden, torch.tanh)), 1, hidden, reverse=True, solver=Euler(), dt=1.0)
    dynamics = nn.Chain(nn.Dense(latent, args.units, torch.tanh), nn.Dense(args.units, latent))
    return LatentODE(encoder, dynamics, nn.Dense(latent, 1), latent=latent, solver=Tsit5(),
                     regularize=_regularizer(method, args), reltol=args.tol, abstol=args.tol)


def _evaluate(model, ps, st, split) -> tuple[float, int, float, torch.Tensor]:
    """``(MSE over the unobserved points, decoder NFE, seconds, prediction)`` of one test-mode pass."""
    values, mask = split["values"], split["mask"]
    observed = torch.where(mask, values, torch.full_like(values, float("nan")))
    with torch.no_grad():
        start = time.perf_counter()
        pred, st_out = model((split["times"], observed, mask), ps, st)
        seconds = time.perf_counter() - start
    return float(((pred - values)[~mask] ** 2).mean()), st_out["nfe"], seconds, pred


def _schedules(method: str, args, total: int):
    lr = args.lr if args.lr_end is None or args.lr_end < 0 else CosineAnneal(args.lr, args.lr_end, total)
    weight, delay = _weight(method, args), args.weight_delay
    anneal = ExponentialAnneal(weight, weight * args.weight_end, max(1, total - delay)) \
        if weight and args.weight_end != 1.0 else (lambda step: weight)
    return lr, (lambda step: 0.0 if step < delay else anneal(step - delay))


def train_one(method: str, seed: int, args, data) -> dict:
    train, val, test = data
    model = build_model(method, args)
    ps, st = setup(torch.Generator().manual_seed(seed), model)
    n = train["values"].shape[0]
    steps_per_epoch = max(1, n // args.batch_size)
    lr, weight = _schedules(method, args, args.epochs * steps_per_epoch)
    state = TrainState(model, ps, st, Adam(lr))
    times = train["times"]

    def loss_fn(model, ps, st, batch):
        values, mask = batch
        observed = torch.where(mask, values, torch.full_like(values, float("nan")))
        pred, st_new = model((times, observed, mask), ps, st)
        loss, info = model.loss(pred, values, mask, st_new, kl_weight=kl_annealing(state.step))
        data_loss, reg = loss, torch.zeros(())
        w = weight(state.step)
        if w:
            reg = w * st_new["regularization"]
            loss = loss + reg
        return loss, st_new, {"nfe": st_new["nfe"], "data_loss": data_loss.detach(), "reg": reg.detach()}

    history = {"loss": [], "nfe": [], "data_loss": [], "reg": []}
    order_gen = torch.Generator().manual_seed(1000 + seed)
    bar = progress(args.epochs * steps_per_epoch, f"{method} seed {seed}")
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(n, generator=order_gen)
        for k in range(steps_per_epoch):
            idx = order[k * args.batch_size:(k + 1) * args.batch_size]
            _, loss, stats, state = single_train_step(loss_fn, (train["values"][idx], train["mask"][idx]), state)
            history["loss"].append(float(loss))
            history["nfe"].append(stats["nfe"])
            history["data_loss"].append(float(stats["data_loss"]))
            history["reg"].append(float(stats["reg"]))
            bar.update(1)
    train_time = time.perf_counter() - start
    bar.close()
    ps, st = state.ps, testmode(state.st)
    out = {}
    if val is not None:
        out["val_mse"], out["val_nfe"], _, _ = _evaluate(model, ps, st, val)
    mse, nfe, predict_time, pred = _evaluate(model, ps, st, test)
    values, mask = test["values"], test["mask"]
    return {"test_mse": mse, "test_nfe": nfe, **out, "train_time_s": train_time, "predict_time_s": predict_time,
            "history": history, "fit": (pred[0, :, 0].tolist(), values[0, :, 0].tolist(), mask[0, :, 0].tolist())}


COLUMNS = (("test_mse", "test MSE (held-out points)", "{:.4f}"), ("test_nfe", "test NFE", "{:.1f}"),
           ("train_time_s", "train time (s)", "{:.1f}"), ("predict_time_s", "predict time (s)", "{:.3f}"))
VAL_COLUMNS = (("val_mse", "validation MSE", "{:.4f}"), ("val_nfe", "validation NFE", "{:.1f}"))


def _plot_fits(fits: dict, times, path: str):
    from ._report import _pyplot  # noqa: PLC0415
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    t = times.tolist()
    pred, values, mask = next(iter(fits.values()))
    ax.plot([x for x, m in zip(t, mask) if m], [v for v, m in zip(values, mask) if m], "ko", ms=3, label="observed")
    ax.plot([x for x, m in zip(t, mask) if not m], [v for v, m in zip(values, mask) if not m], "kx", ms=4,
            label="held out")
    for method, (p, _, _) in fits.items():
        ax.plot(t, p, lw=1, label=method)
    ax.set(xlabel="t", ylabel="x", title="latent-ode-periodic: first test series (seed 0)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args) -> dict:
    if args.quick:
        args.epochs, args.seeds, args.train, args.val, args.test, args.times, args.batch_size = 2, 1, 20, 4, 8, 16, 8
    check_seeds(args.seeds, "latent-ode-periodic")
    methods = parse_methods(args.methods, METHODS, "latent-ode-periodic")
    if args.first_seed < 0:
        raise ValueError(f"latent-ode-periodic: --first-seed must be >= 0, got {args.first_seed}")
    if args.weight_delay < 0:
        raise ValueError(f"latent-ode-periodic: --weight-delay must be >= 0, got {args.weight_delay}")
    if args.units < 1:
        raise ValueError(f"latent-ode-periodic: --units must be >= 1, got {args.units}")
    if not 0 <= args.val < args.train:
        raise ValueError(f"latent-ode-periodic: --val must be in [0, --train) = [0, {args.train}), got {args.val}")
    fitted = args.train - args.val
    if not 1 <= args.batch_size <= fitted:
        raise ValueError(f"latent-ode-periodic: --batch-size must be in [1, --train - --val] = [1, {fitted}], "
                         f"got {args.batch_size}")
    # Rubanova et al.: one grid of times for the whole data set; the first series train, the rest test
    full = periodic_series(args.train + args.test, n_times=args.times, seed=12345)

    def split(lo, hi):
        return {k: (v if k == "times" else v[lo:hi]) for k, v in full.items()}

    train, test = split(0, fitted), split(args.train, args.train + args.test)
    val = split(fitted, args.train) if args.val else None
    columns = COLUMNS[:2] + (VAL_COLUMNS if args.val else ()) + COLUMNS[2:]
    os.makedirs(args.out, exist_ok=True)
    summary, histories, raw, fits = {}, {}, {}, {}
    with torch_threads(args.threads):
        for method in methods:
            seeds = range(args.first_seed, args.first_seed + args.seeds)
            runs = [train_one(method, seed, args, (train, val, test)) for seed in seeds]
            summary[method] = summarize(runs, [k for k, _, _ in columns])
            histories[method] = [r["history"] for r in runs]
            raw[method] = [{k: v for k, v in r.items() if k not in ("history", "fit")} for r in runs]
            fits[method] = runs[0]["fit"]
            print(f"{method}: " + ", ".join(f"{label} {fmt.format(summary[method][key][0])}"
                                            for key, label, fmt in columns))
    table = markdown_table(summary, columns)
    comparison, records = paper_comparison(summary, CLAIMS)
    command = (f"pylux experiments latent-ode-periodic --epochs {args.epochs} --seeds {args.seeds} "
               + (f"--first-seed {args.first_seed} " if args.first_seed else "") +
               f"--methods {','.join(methods)} --train {args.train} --val {args.val} --test {args.test} "
               f"--times {args.times} --batch-size {args.batch_size} --lr {args.lr} --lr-end {args.lr_end} "
               f"--weight-end {args.weight_end} --weight-delay {args.weight_delay} --units {args.units} "
               f"--tol {args.tol} --weight-er {args.weight_er} "
               f"--weight-sr {args.weight_sr} --weight-local {args.weight_local} --weight-taylor {args.weight_taylor} "
               f"--steer-b {args.steer_b} --threads {args.threads}")
    text = (f"# latent-ode-periodic\n\n`{command}`\n\nmean ± std over {args.seeds} seed(s); float32, "
            f"{args.threads} thread(s)\n\n{table}\n\n{comparison}\n")
    write_results(args.out, text, {"command": command, "settings": vars(args), "summary": summary, "runs": raw,
                                   "histories": histories, "paper": records})
    plots = [plot_histories(histories, os.path.join(args.out, "training.png"),
                            "latent-ode-periodic: loss and decoder NFE over training"),
             _plot_fits(fits, train["times"], os.path.join(args.out, "fits.png"))]
    print(text)
    report_written(args.out, plots)
    return summary

