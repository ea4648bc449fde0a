"""Deep equilibrium digit classifier: vanilla, Skip and Skip Reg. DEQs, continuous and discrete, ± Jacobian reg.

The experiment of Pal, Edelman & Rackauckas (2022), "Mixing implicit and
explicit deep learning with skip DEQs and infinite time neural ODEs
(continuous DEQs)" (thesis Table 4.1 layout), at laptop scale on the embedded
8x8 digits (1437 train / 360 test images) instead of MNIST:

    x (64) --Dense(64, hidden, tanh)--> x̃ --DEQ layer--> z* --Dense(hidden, 10)--> logits

with the equilibrium cell :math:`f(z, \\tilde x) = \\tanh(W_2 \\tanh(W_1 z + b_1) + b_2 + \\tilde x)`.

* **vanilla**: the solve starts from :math:`z = 0`;
* **skip**: from :math:`g_\\phi(\\tilde x)` with :math:`g_\\phi` = ``Dense(hidden, hidden, tanh)``,
  trained by the auxiliary loss :math:`\\mathrm{mean}((z^* - g_\\phi(\\tilde x))^2)`;
* **skipreg**: from :math:`f(0, \\tilde x)` with the loss :math:`\\mathrm{mean}((z^* - f(0, \\tilde x))^2)`.

Each is run **continuous** (Tsit5 on :math:`\\dot z = f(z, \\tilde x) - z` to its steady
state) and **discrete** (Broyden on :math:`z = f(z, \\tilde x)`), both with the
implicit backward pass (``SteadyStateAdjoint``), with and without the Jacobian
regulariser of Bai et al. (2021). The loss is cross-entropy +
``skip_weight`` · skip loss + the Jacobian loss (weight ``--jac-weight``).

Reported per variant, mean ± std over seeds: test accuracy, test NFE
(evaluations of f per test batch of ``--batch-size`` in the forward solve),
training time (wall clock of the training loop), prediction time (a
no-gradient forward pass of the whole test set in batches), and the number of
non-convergence warnings; beside them the paper's claims for Skip and Skip
Reg. DEQs against the vanilla DEQ of the same mode and regulariser (faster
training and prediction, fewer NFE) and whether their direction was
reproduced. ``training.png``: per epoch, mean ± std over seeds, the
cross-entropy without the auxiliary terms, the weighted skip and Jacobian
terms, and the training NFE.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from .. import nn
from ..core import setup
from ..data import load_digits
from ..nn.init import glorot_uniform
from ..diffeq import Tsit5
from ..layers import DEQ, SkipDEQ
from ..nonlinear import Broyden, ConvergenceWarning
from ..sensitivity import SteadyStateAdjoint
from ..training import Adam, TrainState, single_train_step
from ._report import (add_common_arguments, check_seeds, markdown_table, paper_comparison, parse_methods,
                      plot_histories, progress, report_written, summarize, torch_threads, write_results)

__all__ = ["add_arguments", "run", "VARIANTS", "build_model", "train_one", "nfe_ratios"]

KINDS = ("vanilla", "skip", "skipreg")
MODES = ("continuous", "discrete")
VARIANTS = tuple(f"{kind}-{mode}{suffix}" for mode in MODES for kind in KINDS for suffix in ("", "-jr"))
#: what --quick sets: one seed of every variant for one epoch (seconds per variant)
QUICK = {"epochs": 1, "seeds": 1}
_SOURCE = ("Pal, Edelman & Rackauckas 2022, arXiv:2201.12240v1 abstract (Skip DEQ: training 2.5x and "
           "prediction 3.4x faster; v3: training 1.11x-3.19x faster)")


def _claims() -> tuple:
    """Skip and Skip Reg. against the vanilla DEQ of the same mode and regulariser."""
    claims = []
    for variant in VARIANTS:
        kind, rest = variant.split("-", 1)
        if kind == "vanilla":
            continue
        for metric, label, paper in (("train_time_s", "training time", "0.4x (2.5x faster)"),
                                     ("predict_time_s", "prediction time", "0.29x (3.4x faster)"),
                                     ("test_nfe", "test NFE", "fewer (the cause of the time)")):
            claims.append({"method": variant, "baseline": f"vanilla-{rest}", "metric": metric, "label": label,
                           "paper": paper, "direction": "lower", "source": _SOURCE})
    return tuple(claims)


CLAIMS = _claims()


def add_arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    add_common_arguments(parser, VARIANTS, quick=f"{QUICK['seeds']} seed, {QUICK['epochs']} epoch")
    parser.add_argument("--hidden", type=int, default=32, help="state size of the DEQ (default 32)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    parser.add_argument("--tol", type=float, default=1e-2,
                        help="abstol = reltol of the fixed-point / steady-state test (default 1e-2; the "
                             "continuous solve's ODE tolerances are a tenth of it)")
    parser.add_argument("--skip-weight", type=float, default=1.0, help="weight of the skip loss (default 1)")
    parser.add_argument("--jac-weight", type=float, default=1.0,
                        help="gamma of the Jacobian regulariser in the -jr variants (default 1)")
    parser.add_argument("--init-scale", type=float, default=0.5,
                        help="factor on the Glorot-uniform weights of the DEQ cell (default 0.5)")


def _scaled_glorot(scale: float):
    def init(rng, *shape, dtype=torch.float32):
        return scale * glorot_uniform(rng, *shape, dtype=dtype)
    return init


def deq_cell(hidden: int, init_scale: float) -> nn.Chain:
    """The DEQ cell f(z, x) = tanh(W2 tanh(W1 z + b1) + b2 + x), Glorot weights scaled by ``init_scale``."""
    # Glorot weights have spectral norm near 2: scaled down, f starts as a contraction, so
    # the fixed point exists and is an attracting steady state of dz/dt = f(z) - z.
    init = _scaled_glorot(init_scale)
    inner = nn.Chain(nn.Dense(hidden, hidden, torch.tanh, init_weight=init), nn.Dense(hidden, hidden, init_weight=init))
    return nn.Chain(nn.Parallel("+", inner, nn.NoOpLayer()), nn.WrappedFunction(torch.tanh))


def build_model(variant: str, args) -> nn.Chain:
    """``Chain(Dense(64, hidden, tanh), <DEQ layer of the variant>, Dense(hidden, 10))``."""
    kind, mode = variant.split("-")[:2]
    jacobian = args.jac_weight if variant.endswith("-jr") else 0.0
    solver = Tsit5() if mode == "continuous" else Broyden()
    options = dict(sensealg=SteadyStateAdjoint(tol=1e-4, restart=20, maxiters=40), abstol=args.tol,
                   reltol=args.tol, jacobian_regularization=jacobian, maxiters=200 if mode == "continuous" else 50)
    if kind == "vanilla":
        layer = DEQ(deq_cell(args.hidden, args.init_scale), solver, **options)
    elif kind == "skip":
        layer = SkipDEQ(deq_cell(args.hidden, args.init_scale), nn.Dense(args.hidden, args.hidden, torch.tanh), solver,
                        **options)
    else:
        layer = SkipDEQ(deq_cell(args.hidden, args.init_scale), None, solver, **options)
    return nn.Chain(downsample=nn.Dense(64, args.hidden, torch.tanh), deq=layer,
                    classifier=nn.Dense(args.hidden, 10))


def _batches(n: int, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _evaluate(model, ps, st, x, y, batch_size):
    correct, nfes = 0, []
    start = time.perf_counter()
    with torch.no_grad():
        for index in _batches(x.shape[0], batch_size, None):
            logits, st_new = model(x[index], ps, st)
            correct += int((logits.argmax(dim=1) == y[index]).sum())
            nfes.append(st_new["deq"]["solution"].nfe)
    elapsed = time.perf_counter() - start
    return correct / x.shape[0], statistics.fmean(nfes), elapsed


def train_one(variant: str, seed: int, args, data) -> dict:
    """Train one variant from one seed; returns its metrics and per-epoch history."""
    (x_train, y_train), (x_test, y_test) = data
    model = build_model(variant, args)
    ps, st = setup(torch.Generator().manual_seed(seed), model)
    train_state = TrainState(model, ps, st, Adam(args.lr))
    skip_weight = args.skip_weight

    def loss_fn(model, ps, st, batch):
        x, y = batch
        logits, st_new = model(x, ps, st)
        solution = st_new["deq"]["solution"]
        data_loss = F.cross_entropy(logits, y)
        reg = torch.zeros_like(data_loss)
        if solution.skip_loss is not None:
            reg = reg + skip_weight * solution.skip_loss
        if solution.jacobian_loss is not None:
            reg = reg + solution.jacobian_loss
        return data_loss + reg, st_new, {"nfe": solution.nfe, "data_loss": data_loss.detach(), "reg": reg.detach()}

    generator = torch.Generator().manual_seed(1000 + seed)
    history = {"epoch": [], "loss": [], "data_loss": [], "reg": [], "nfe": []}
    warnings_seen = 0
    batches_per_epoch = len(_batches(x_train.shape[0], args.batch_size, None))
    bar = progress(args.epochs * batches_per_epoch, f"{variant} seed {seed}")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        curves, nfes = {"loss": [], "data_loss": [], "reg": []}, []
        for index in _batches(x_train.shape[0], args.batch_size, generator):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                _, loss, stats, train_state = single_train_step(loss_fn, (x_train[index], y_train[index]),
                                                                train_state)
            warnings_seen += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
            curves["loss"].append(loss)
            curves["data_loss"].append(stats["data_loss"])
            curves["reg"].append(stats["reg"])
            nfes.append(stats["nfe"])
            bar.update(1)
        history["epoch"].append(epoch)
        means = torch.stack([torch.stack(v).mean() for v in curves.values()]).tolist()  # one transfer per epoch
        for key, value in zip(curves, means):
            history[key].append(value)
        history["nfe"].append(statistics.fmean(nfes))
    train_time = time.perf_counter() - start
    bar.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        accuracy, test_nfe, predict_time = _evaluate(model, train_state.ps, train_state.st, x_test, y_test,
                                                     args.batch_size)
    warnings_seen += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {"variant": variant, "seed": seed, "test_accuracy": 100.0 * accuracy, "test_nfe": test_nfe,
            "train_time_s": train_time, "predict_time_s": predict_time, "convergence_warnings": warnings_seen,
            "history": history}


COLUMNS = (("test_accuracy", "test accuracy (%)", "{:.2f}"), ("test_nfe", "test NFE", "{:.2f}"),
           ("train_time_s", "training time (s)", "{:.2f}"), ("predict_time_s", "prediction time (s)", "{:.3f}"),
           ("convergence_warnings", "convergence warnings", "{:.1f}"))


def nfe_ratios(summary: dict) -> dict:
    """Test-NFE ratio of each Skip / Skip Reg. variant to the vanilla DEQ of the same mode and regulariser."""
    ratios = {}
    for variant, entry in summary.items():
        kind, rest = variant.split("-", 1)
        base = summary.get(f"vanilla-{rest}")
        if kind != "vanilla" and base is not None:
            ratios[variant] = entry["test_nfe"][0] / base["test_nfe"][0]
    return ratios


def run(args) -> dict:
    if args.quick:
        args.epochs, args.seeds = QUICK["epochs"], QUICK["seeds"]
    check_seeds(args.seeds, "deq-digits")
    variants = parse_methods(args.methods, VARIANTS, "deq-digits")
    with torch_threads(args.threads):
        return _run(args, variants)


def _run(args, variants) -> dict:
    data = (load_digits("train"), load_digits("test"))
    summary, histories, raw = {}, {}, {}
    total = len(variants) * args.seeds
    for variant in variants:
        runs = []
        for seed in range(args.seeds):
            result = train_one(variant, seed, args, data)
            runs.append(result)
            print(f"[{len(raw) * args.seeds + seed + 1}/{total}] {variant:24s} seed {seed}: accuracy "
                  f"{result['test_accuracy']:.1f}%, test NFE {result['test_nfe']:.1f}, "
                  f"train {result['train_time_s']:.1f} s", flush=True)
        summary[variant] = summarize(runs, [key for key, _, _ in COLUMNS])
        histories[variant] = [r["history"] for r in runs]
        raw[variant] = [{k: v for k, v in r.items() if k != "history"} for r in runs]
    ratios = nfe_ratios(summary)
    os.makedirs(args.out, exist_ok=True)
    command = (f"pylux experiments deq-digits --epochs {args.epochs} --seeds {args.seeds} "
               f"--methods {','.join(variants)} --hidden {args.hidden} --batch-size {args.batch_size} "
               f"--lr {args.lr:g} --tol {args.tol:g} --skip-weight {args.skip_weight:g} "
               f"--jac-weight {args.jac_weight:g} --init-scale {args.init_scale:g} --threads {args.threads}")
    comparison, checks = paper_comparison(summary, CLAIMS, title="variant")
    ratio_lines = "\n".join(f"- {variant}: {ratio:.2f}x the test NFE of vanilla-{variant.split('-', 1)[1]}"
                            for variant, ratio in ratios.items())
    markdown = (f"# deq-digits\n\nCommand: `{command}`\n\nSettings: hidden={args.hidden}, batch={args.batch_size}, "
                f"lr={args.lr}, tol={args.tol}, skip weight={args.skip_weight}, Jacobian weight={args.jac_weight}, "
                f"threads={args.threads}; mean ± std over {args.seeds} seed(s) (0..{args.seeds - 1}).\n\n"
                f"{markdown_table(summary, COLUMNS, title='variant')}\n")
    if ratio_lines:
        markdown += f"\nTest-NFE ratios:\n{ratio_lines}\n"
    if comparison:
        markdown += (f"\nAgainst the paper (MNIST, CIFAR-10 and SVHN there, 8x8 digits here; ratio of our means "
                     f"to the vanilla DEQ's of the same mode and regulariser):\n\n{comparison}\n")
    write_results(args.out, markdown, {"command": command, "settings": vars(args), "summary": summary,
                                       "nfe_ratios": ratios, "paper_comparison": checks, "runs": raw,
                                       "histories": histories})
    plot = plot_histories(histories, os.path.join(args.out, "training.png"),
                          "deq-digits: cross-entropy, skip + Jacobian terms and NFE per epoch", x_label="epoch")
    print(markdown)
    report_written(args.out, [plot])
    return {"summary": summary, "nfe_ratios": ratios, "paper_comparison": checks, "runs": raw}
