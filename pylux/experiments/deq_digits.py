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
no-gradient forward pass of the whole test set in batches). Plots: mean
training NFE and loss per epoch.
"""

from __future__ import annotations

import json
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

__all__ = ["add_arguments", "run", "VARIANTS", "build_model", "train_one"]

KINDS = ("vanilla", "skip", "skipreg")
MODES = ("continuous", "discrete")
VARIANTS = tuple(f"{kind}-{mode}{suffix}" for mode in MODES for kind in KINDS for suffix in ("", "-jr"))
QUICK = {"epochs": 3, "seeds": [0, 1, 2]}


def add_arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random seeds (default 0 1 2)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT",
                        help="which variants to run: " + ", ".join(VARIANTS))
    parser.add_argument("--quick", action="store_true",
                        help=f"quick preset: {QUICK['epochs']} epochs (seeds unchanged unless given)")
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
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


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
        layer = SkipDEQ(deq_cell(args.hidden, args.init_scale), nn.Dense(args.hidden, args.hidden, torch.tanh), solver, **options)
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
        loss = F.cross_entropy(logits, y)
        if solution.skip_loss is not None:
            loss = loss + skip_weight * solution.skip_loss
        if solution.jacobian_loss is not None:
            loss = loss + solution.jacobian_loss
        return loss, st_new, {"nfe": solution.nfe}

    generator = torch.Generator().manual_seed(1000 + seed)
    history = {"epoch": [], "loss": [], "nfe": []}
    warnings_seen = 0
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        losses, nfes = [], []
        for index in _batches(x_train.shape[0], args.batch_size, generator):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                _, loss, stats, train_state = single_train_step(loss_fn, (x_train[index], y_train[index]),
                                                                train_state)
            warnings_seen += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
            losses.append(loss)
            nfes.append(stats["nfe"])
        history["epoch"].append(epoch)
        history["loss"].append(float(torch.stack(losses).mean()))
        history["nfe"].append(statistics.fmean(nfes))
    train_time = time.perf_counter() - start
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        accuracy, test_nfe, predict_time = _evaluate(model, train_state.ps, train_state.st, x_test, y_test,
                                                     args.batch_size)
    warnings_seen += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {"variant": variant, "seed": seed, "test_accuracy": accuracy, "test_nfe": test_nfe,
            "train_time_s": train_time, "predict_time_s": predict_time, "convergence_warnings": warnings_seen,
            "history": history}


METRICS = (("test_accuracy", "test accuracy (%)", 100.0), ("test_nfe", "test NFE", 1.0),
           ("train_time_s", "training time (s)", 1.0), ("predict_time_s", "prediction time (s)", 1.0))


def summarize(runs: list[dict]) -> dict:
    summary: dict = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        entry = {}
        for key, _, scale in METRICS:
            values = [scale * r[key] for r in mine]
            entry[key] = {"mean": statistics.fmean(values),
                          "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        entry["convergence_warnings"] = sum(r["convergence_warnings"] for r in mine)
        entry["seeds"] = [r["seed"] for r in mine]
        summary[variant] = entry
    return summary


def nfe_ratios(summary: dict) -> dict:
    """Test-NFE ratio of each Skip / Skip Reg. variant to the vanilla DEQ of the same mode and regulariser."""
    ratios = {}
    for variant, entry in summary.items():
        kind, rest = variant.split("-", 1)
        base = summary.get(f"vanilla-{rest}")
        if kind != "vanilla" and base is not None:
            ratios[variant] = entry["test_nfe"]["mean"] / base["test_nfe"]["mean"]
    return ratios


def markdown_table(summary: dict) -> str:
    header = "| variant | " + " | ".join(label for _, label, _ in METRICS) + " | convergence warnings |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    for variant, entry in summary.items():
        cells = [f"{entry[key]['mean']:.2f} ± {entry[key]['std']:.2f}" for key, _, _ in METRICS]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {entry['convergence_warnings']} |")
    return "\n".join(lines)


def plot_histories(runs: list[dict], path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install pylux[plot])")
        return None
    fig, (ax_nfe, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.get_cmap("tab20").colors  # twelve variants: one distinct colour each
    for number, variant in enumerate(dict.fromkeys(r["variant"] for r in runs)):
        mine = [r["history"] for r in runs if r["variant"] == variant]
        epochs = mine[0]["epoch"]
        style = "-" if "continuous" in variant else "--"
        for ax, key in ((ax_nfe, "nfe"), (ax_loss, "loss")):
            ax.plot(epochs, [statistics.fmean(h[key][i] for h in mine) for i in range(len(epochs))], style,
                    color=colours[number % len(colours)], label=variant)
    ax_nfe.set(xlabel="epoch", ylabel="mean training NFE per batch", title="NFE over training")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss over training", yscale="log")
    ax_nfe.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args) -> dict:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args) -> dict:
    if args.quick:
        args.epochs = QUICK["epochs"]
    data = (load_digits("train"), load_digits("test"))
    runs = []
    total = len(args.variants) * len(args.seeds)
    for variant in args.variants:
        for seed in args.seeds:
            result = train_one(variant, seed, args, data)
            runs.append(result)
            print(f"[{len(runs)}/{total}] {variant:24s} seed {seed}: accuracy {100 * result['test_accuracy']:.1f}%, "
                  f"test NFE {result['test_nfe']:.1f}, train {result['train_time_s']:.1f} s", flush=True)
    summary = summarize(runs)
    ratios = nfe_ratios(summary)
    os.makedirs(args.out, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("func",)}
    command = (f"pylux experiments deq-digits --epochs {args.epochs} --seeds {' '.join(map(str, args.seeds))} "
               f"--hidden {args.hidden} --batch-size {args.batch_size} --lr {args.lr:g} --tol {args.tol:g} "
               f"--skip-weight {args.skip_weight:g} --jac-weight {args.jac_weight:g} --init-scale {args.init_scale:g} "
               f"--threads {args.threads}"
               + (f" --variants {' '.join(args.variants)}" if list(args.variants) != list(VARIANTS) else ""))
    table = markdown_table(summary)
    ratio_lines = "\n".join(f"- {variant}: {ratio:.2f}x the test NFE of vanilla-{variant.split('-', 1)[1]}"
                            for variant, ratio in ratios.items())
    targets = [v for v in ratios if v.split("-")[1] == "continuous"]
    verdict = ""
    if targets:
        met = [v for v in targets if ratios[v] <= 0.5]
        verdict = (f"\nPaper target (Skip / Skip Reg. continuous DEQs at <= 0.5x the vanilla continuous DEQ's test "
                   f"NFE): met by {', '.join(met) if met else 'none'} of {', '.join(targets)}.\n")
    markdown = (f"# deq-digits\n\nCommand: `{command}`\n\nSettings: hidden={args.hidden}, batch={args.batch_size}, "
                f"lr={args.lr}, tol={args.tol}, skip weight={args.skip_weight}, Jacobian weight={args.jac_weight}, "
                f"threads={args.threads}; mean ± std over seeds {args.seeds}.\n\n{table}\n\n"
                f"Test-NFE ratios:\n{ratio_lines}\n{verdict}")
    with open(os.path.join(args.out, "deq_digits.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(args.out, "deq_digits.json"), "w") as f:
        json.dump({"command": command, "settings": settings, "summary": summary, "nfe_ratios": ratios,
                   "runs": runs}, f, indent=2, default=str)
    plot = plot_histories(runs, os.path.join(args.out, "deq_digits.png"))
    print(markdown)
    print(f"wrote {args.out}/deq_digits.md, deq_digits.json" + (", deq_digits.png" if plot else ""))
    return {"summary": summary, "nfe_ratios": ratios, "runs": runs}
