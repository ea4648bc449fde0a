r"""Spiral SDE fit by moments: vanilla vs ERNSDE, SRNSDE and local (unbiased/biased) error regularization.

The neural-SDE experiment of Pal, Ma, Shah & Rackauckas (ICML 2021) and Pal,
Edelman & Rackauckas (ICML 2023) (Pal's thesis, §5.3.2.1, Table 5.3): the
spiral SDE with diagonal multiplicative noise

.. math::
    du_1 &= (-\alpha u_1^3 + \beta u_2^3)\,dt + \gamma u_1\,dW_1, \\
    du_2 &= (-\beta u_1^3 - \alpha u_2^3)\,dt + \gamma u_2\,dW_2,

:math:`\alpha = 0.1, \beta = 2, \gamma = 0.2`, :math:`u(0) = (2, 0)`, Itô,
observed through the sample mean and variance of ``--data-trajectories``
(default 10000) paths at 30 uniform times in :math:`[0, 1]`
(:func:`spiral_sde_data`). The data are generated here, deterministically
from ``--data-seed``, by a fine reference solve: pylux's SOSRI (strong order
1.5) at the fixed step :math:`2^{-10}` in float64 on one Brownian tree. At
that step the moments have converged: the mean and variance at :math:`t = 1`
of 2000 paths change by less than :math:`10^{-5}` from :math:`\Delta t =
2\cdot10^{-3}` to :math:`2.5\cdot10^{-4}` on the same paths, whereas Milstein
at :math:`10^{-3}` is still :math:`0.05` off in the mean there (first order),
far above the Monte Carlo error of the data, about 0.01.

Model (DiffEqFlux's ``NeuralDSDE`` of the papers): drift
:math:`W_2 \tanh(W_1 u^{3} + b_1) + b_2` (50 hidden units, the cube
elementwise, a ``WrappedFunction``), diffusion :math:`W_3 u + b_3` (a
``Dense(2, 2)``, diagonal noise: entry :math:`i` of its output multiplies
:math:`dW_i`), solved by adaptive SOSRI with ``reltol = abstol = --tol``
(default 0.1, the tolerance of the papers' code), float32. Note that this
diffusion is not *commutative* (entry :math:`i` depends on both states), so
SOSRI, whose diffusion stages are shared by the entries, is of strong order
1 rather than 1.5 on the model; it still converges and adapts, and the
papers make the same choice.

Loss (generalized method of moments): with ``--trajectories`` :math:`K`
(default 100) model paths drawn fresh in every training step,
:math:`\sum_{t, i} (\bar u_i(t) - m_i(t))^2 + (s^2_i(t) - v_i(t))^2` over the 30
times and both states, :math:`\bar u, s^2` the model's sample mean and
(unbiased) variance and :math:`m, v` the data's, plus :math:`\lambda R` for a
regularized row. AdaBelief, learning rate 0.01, ``--iterations`` (default
250) full-batch steps; gradients backpropagate through the solver on each
step's Brownian paths (pathwise gradients; the global regularizers need it).

Rows: ``vanilla``; ``ernsde`` (:class:`~pylux.ErrorEstimateRegularization`,
:math:`R = \sum_j E_j|\Delta t_j|`); ``srnsde``
(:class:`~pylux.StiffnessRegularization`, the stiffness estimates summed the
same way); ``local-unbiased`` and ``local-biased``
(:class:`~pylux.LocalErrorRegularization`, one step's :math:`E_r|\Delta t_r|`
at a time sampled uniformly in the span or among the solver's step starts).

Weights: :math:`\lambda` annealed exponentially from ``--weight-start`` to
``--weight-end`` (both 30 by default: a constant weight, as in node-spiral),
SRNSDE's divided by ``--stiffness-scale`` (default 3) and the local rows'
multiplied by ``--local-scale`` (default 30). Why these, from single-seed runs
of 250 iterations: at ``--tol 0.1`` a scaled error estimate is at most about
1 per accepted step, so :math:`R` is of order 0.3–1 while the moment loss
falls from hundreds to about 2. A constant ERNSDE weight of 10 changed
nothing (prediction NFE 242 against 246, loss 2.7 against 2.3), 100 and
1000 collapsed the fit (loss 104 and 146 at NFE 94 and 78); 30 is the
largest tried that keeps the fit (loss 3.9, NFE 234). The local term is one
step's :math:`E_r|\Delta t_r|`, about :math:`1/N` of the global sum over the
:math:`N \approx 60` steps: a local weight of 1000 still changed little (NFE
238), 10000 collapsed the fit, hence ``--local-scale 30`` (weight 900). The
stiffness sum is of the same size as the error sum at initialization (0.35
against 0.25), but its gradient moves the NFE less: SRNSDE at weight 1
changed nothing, at 10 it gave NFE 210 at loss 13, hence ``--stiffness-scale
3`` (weight 10). On this problem the drift part of SOSRI's error estimate is
the drift increment itself (:mod:`pylux.diffeq.sde_srk`), so the step size
follows the size of the drift, which the fit pins to the data's spiral: the
true SDE itself takes about 270 NFE for 100 paths at this tolerance (66–67
accepted steps, seeds 0–2), and the fitted vanilla model already takes fewer
(about 246), so there is little a regularizer can remove without losing the fit.

Reported, mean ± std over ``--seeds`` seeds (the model's initialization; the
data are the same for every seed): the final moment loss (unregularized, of
one test-mode prediction of :math:`K` paths, which reuses the layer's fixed
path key), that prediction's NFE (drift evaluations of the adaptive solve)
and wall time, and the training time. The plot shows the training loss and
NFE over the iterations (with the ``plot`` extra, matplotlib).

Cost: each training step solves about 60 SOSRI steps forward and backward
(about 0.15–0.3 s on one CPU thread, nearly independent of the number of
paths at this size), so the default run (5 rows × 3 seeds × 250 iterations)
took about 12 minutes on a shared two-core machine; ``--quick``,
``--iterations``, ``--seeds`` and ``--methods`` shrink it.
"""

from __future__ import annotations

import os
import time

import torch

from .. import nn
from ..core import setup, testmode
from ..diffeq import SDEProblem, solve
from ..diffeq.sde_srk import SOSRI
from ..layers import NeuralSDE
from ..regularize import ErrorEstimateRegularization, LocalErrorRegularization, StiffnessRegularization
from ..training import AdaBelief, TrainState, single_train_step
from ..training.schedules import ExponentialAnneal
from ._report import (add_common_arguments, check_seeds, markdown_table, paper_comparison, parse_methods,
                      plot_fit, plot_histories, progress, report_written, summarize, torch_threads, write_results)

__all__ = ["add_arguments", "run", "METHODS", "spiral_sde_data", "ALPHA", "BETA", "GAMMA"]

METHODS = ("vanilla", "ernsde", "srnsde", "local-unbiased", "local-biased")
ALPHA, BETA, GAMMA = 0.1, 2.0, 0.2
#: the fixed step of the reference solve (2**-10)
REFERENCE_DT = 2.0 ** -10


def spiral_sde_data(trajectories: int = 10000, n_times: int = 30, *, seed: int = 0, dt: float = REFERENCE_DT,
                    tspan: tuple[float, float] = (0.0, 1.0), u0: tuple[float, float] = (2.0, 0.0),
                    chunk: int = 10000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Sample mean and variance of the spiral SDE (module docstring) at ``n_times`` uniform times.

    Solved with SOSRI at the fixed step ``dt`` in float64, ``chunk`` paths per
    solve, chunk ``c`` on the Brownian tree of seed ``seed * 1_000_003 + c``, so
    the result depends only on the arguments.

    Returns:
        ``(t, mean, var)``: ``t`` of shape ``(n_times,)``, ``mean`` and ``var``
        (unbiased) of shape ``(n_times, 2)``, float32.
    """
    if trajectories < 2:
        raise ValueError(f"spiral_sde_data: trajectories must be >= 2 (a variance), got {trajectories!r}")

    def drift(u, p, t):
        c = u ** 3
        return torch.stack((-ALPHA * c[..., 0] + BETA * c[..., 1], -BETA * c[..., 0] - ALPHA * c[..., 1]), -1)

    def diffusion(u, p, t):
        return GAMMA * u

    t = torch.linspace(tspan[0], tspan[1], n_times, dtype=torch.float64)
    saveat = [float(x) for x in t.tolist()]
    total = torch.zeros(n_times, 2, dtype=torch.float64)
    total_sq = torch.zeros(n_times, 2, dtype=torch.float64)
    done, c = 0, 0
    while done < trajectories:
        n = min(chunk, trajectories - done)
        x0 = torch.tensor(u0, dtype=torch.float64).expand(n, 2).clone()
        prob = SDEProblem(drift, diffusion, x0, tspan, seed=seed * 1_000_003 + c)
        u = solve(prob, SOSRI(), saveat=saveat, dt=dt, adaptive=False).u  # (n_times, n, 2)
        total += u.sum(1)
        total_sq += (u * u).sum(1)
        done, c = done + n, c + 1
    mean = total / trajectories
    var = (total_sq - trajectories * mean * mean) / (trajectories - 1)
    return t.float(), mean.float(), var.float()


QUICK = dict(iterations=40, seeds=1, data_trajectories=2000)

#: the direction the papers report for each regularized row (the thesis' Table 5.3 and Pal et al. 2023)
CLAIMS = tuple({"method": m, "baseline": "vanilla", "metric": "predict_nfe", "label": "prediction NFE",
                "paper": "fewer than vanilla", "direction": "lower",
                "source": "Pal's thesis, Table 5.3 (spiral SDE); Pal, Edelman & Rackauckas, ICML 2023"}
               for m in METHODS[1:])


def add_arguments(parser) -> None:
    add_common_arguments(parser, METHODS, quick=", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    parser.add_argument("--iterations", type=int, default=250, help="AdaBelief iterations (default 250)")
    parser.add_argument("--trajectories", type=int, default=100,
                        help="model paths per training step and prediction (default 100)")
    parser.add_argument("--data-trajectories", type=int, default=10000,
                        help="paths of the reference solve behind the data moments (default 10000)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--tol", type=float, default=0.1, help="reltol = abstol of the model's SOSRI solve")
    parser.add_argument("--weight-start", type=float, default=30.0)
    parser.add_argument("--weight-end", type=float, default=30.0)
    parser.add_argument("--stiffness-scale", type=float, default=3.0,
                        help="SRNSDE weight = error weight / this")
    parser.add_argument("--local-scale", type=float, default=30.0,
                        help="local-regularizer weight = error weight * this (one step vs a sum over steps)")


def _regularizer(method: str):
    return {"vanilla": None, "ernsde": ErrorEstimateRegularization(), "srnsde": StiffnessRegularization(),
            "local-unbiased": LocalErrorRegularization("unbiased"),
            "local-biased": LocalErrorRegularization("biased")}[method]


def build_model(method: str, t_obs: list[float], args) -> NeuralSDE:
    drift = nn.Chain(nn.WrappedFunction(lambda u: u ** 3), nn.Dense(2, 50, torch.tanh), nn.Dense(50, 2))
    diffusion = nn.Dense(2, 2)
    return NeuralSDE(drift, diffusion, (t_obs[0], t_obs[-1]), SOSRI(), noise="diagonal", saveat=t_obs,
                     regularize=_regularizer(method), trajectories=args.trajectories,
                     reltol=args.tol, abstol=args.tol)


def _weight_scale(method: str, args) -> float:
    if method == "srnsde":
        return 1.0 / args.stiffness_scale
    if method.startswith("local"):
        return args.local_scale
    return 1.0


def moment_loss(pred: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Sum of squared differences of the sample mean and variance over the paths (dim 1) to the data's."""
    paths = pred.reshape(pred.shape[0], pred.shape[1], -1)  # (times, K, 2)
    return (paths.mean(1) - mean).pow(2).sum() + (paths.var(1) - var).pow(2).sum()


def train_one(method: str, seed: int, args, t_obs, mean, var) -> dict:
    model = build_model(method, t_obs, args)
    ps, st = setup(torch.Generator().manual_seed(seed), model)
    state = TrainState(model, ps, st, AdaBelief(args.lr))
    schedule = ExponentialAnneal(args.weight_start, args.weight_end, max(args.iterations - 1, 1))
    scale = _weight_scale(method, args)
    u0 = torch.tensor([[2.0, 0.0]])

    def loss_fn(model, ps, st, batch):
        pred, st_new = model(u0, ps, st)
        data_loss = moment_loss(pred, mean, var)
        reg = (schedule(state.step) * scale) * st_new["regularization"] if method != "vanilla" else \
            data_loss.new_zeros(())
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
    bar.close()
    train_time = time.perf_counter() - start
    for key in ("loss", "data_loss", "reg"):  # one transfer per curve, after the loop
        history[key] = torch.stack(history[key]).tolist() if history[key] else []
    with torch.no_grad():
        start = time.perf_counter()
        pred, st_test = model(u0, state.ps, testmode(state.st))
        predict_time = time.perf_counter() - start
    paths = pred.reshape(pred.shape[0], pred.shape[1], -1)
    return {"loss": float(moment_loss(pred, mean, var)), "predict_nfe": st_test["nfe"],
            "predict_time_s": predict_time, "train_time_s": train_time, "history": history,
            "fit_mean": paths.mean(1).tolist()}


COLUMNS = (("loss", "final moment loss", "{:.4f}"), ("predict_nfe", "prediction NFE", "{:.1f}"),
           ("predict_time_s", "prediction time (s)", "{:.4f}"), ("train_time_s", "train time (s)", "{:.1f}"))


def _ratios(summary: dict) -> str:
    base = summary.get("vanilla")
    if base is None or base["predict_nfe"][0] <= 0:
        return ""
    lines = [f"- {m}: prediction NFE {s['predict_nfe'][0] / base['predict_nfe'][0]:.2f}x vanilla, "
             f"final loss {s['loss'][0] / base['loss'][0]:.2f}x vanilla"
             for m, s in summary.items() if m != "vanilla"]
    return "Relative to vanilla (means):\n\n" + "\n".join(lines) + "\n" if lines else ""


def run(args) -> dict:
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    check_seeds(args.seeds, "sde-spiral")
    methods = parse_methods(args.methods, METHODS, "sde-spiral")
    with torch_threads(args.threads):
        return _run(args, methods)


def _run(args, methods) -> dict:
    if args.trajectories < 2:
        raise ValueError(f"sde-spiral: --trajectories must be >= 2 (a sample variance), got {args.trajectories}")
    start = time.perf_counter()
    t, mean, var = spiral_sde_data(args.data_trajectories, 30, seed=args.data_seed)
    data_time = time.perf_counter() - start
    print(f"sde-spiral: data moments of {args.data_trajectories} reference paths in {data_time:.1f} s")
    t_obs = [float(x) for x in t.tolist()]
    os.makedirs(args.out, exist_ok=True)
    summary, histories, raw, fits = {}, {}, {}, {}
    for method in methods:
        runs = [train_one(method, seed, args, t_obs, mean, var) for seed in range(args.seeds)]
        summary[method] = summarize(runs, [k for k, _, _ in COLUMNS])
        histories[method] = [r["history"] for r in runs]
        fits[method] = [r["fit_mean"] for r in runs]
        raw[method] = [{k: v for k, v in r.items() if k not in ("history", "fit_mean")} for r in runs]
        print(f"{method}: " + ", ".join(f"{label} {fmt.format(summary[method][key][0])}"
                                        for key, label, fmt in COLUMNS))
    command = (f"pylux experiments sde-spiral --iterations {args.iterations} --seeds {args.seeds} "
               f"--methods {','.join(methods)} --trajectories {args.trajectories} "
               f"--data-trajectories {args.data_trajectories} --data-seed {args.data_seed} --tol {args.tol} "
               f"--lr {args.lr} --weight-start {args.weight_start} --weight-end {args.weight_end} "
               f"--stiffness-scale {args.stiffness_scale} --local-scale {args.local_scale} --threads {args.threads}")
    text = (f"# sde-spiral\n\n`{command}`\n\nmean ± std over {args.seeds} seed(s); float32 model, SOSRI "
            f"reltol = abstol = {args.tol}, {args.trajectories} paths per step; data: {args.data_trajectories} "
            f"paths (SOSRI, dt = 2^-10, float64, {data_time:.1f} s); NFE = drift evaluations of one test-mode "
            f"prediction of {args.trajectories} paths; {args.threads} thread(s)\n\n"
            f"{markdown_table(summary, COLUMNS)}\n\n{_ratios(summary)}")
    comparison, checks = paper_comparison(summary, CLAIMS)
    if comparison:
        text += f"\nAgainst the papers:\n\n{comparison}\n"
    write_results(args.out, text, {"command": command, "settings": vars(args), "summary": summary, "runs": raw,
                                   "paper_comparison": checks, "histories": histories, "fits": fits,
                                   "data": {"t": t.tolist(), "mean": mean.tolist(), "var": var.tolist()}})
    plots = [plot_histories(histories, os.path.join(args.out, "training.png"),
                            "sde-spiral: moment loss, regularization and NFE over training"),
             plot_fit(t, mean, fits, os.path.join(args.out, "fit.png"),
                      "sde-spiral: the fitted model's mean path against the data's mean (test mode)",
                      labels=("mean u1", "mean u2"))]
    print(text)
    report_written(args.out, plots)
    return summary
