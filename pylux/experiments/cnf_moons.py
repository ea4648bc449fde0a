r"""Continuous normalizing flow on two moons: reversible solvers against backprop through the solver.

McCallum & Foster (2024, "Efficient, accurate and stable gradients for neural ODEs") train an
FFJORD flow on two moons with the Midpoint, RK4 and Dopri5 methods and compare their algebraically
reversible versions (:class:`~pylux.sensitivity.ReversibleAdjoint`: exact discrete gradients, memory
constant in the number of steps) with backpropagation through the solver: the same test NLL at a
fraction of the memory (the paper: 0.56 GB against 3.9 GB for recursive checkpointing; here the
baseline is plain backprop through every step).

Setup: :func:`pylux.data.two_moons` (noise 0.05, standardized), 4000 training and 2000 test
points; :class:`pylux.FFJORD` over :math:`t \in [0, 1]` with the time-conditioned field
:class:`TimeMLP` (2 hidden tanh layers of ``--hidden`` units, :math:`t` concatenated to every
layer's input), fixed steps of ``--dt``, Hutchinson (Rademacher) training, Adam.

Reported, mean ± std over seeds: the test NLL (nats, exact trace) with the method's own training
discretization and with Tsit5 at tolerance 1e-6 on the learned field (the density the field
defines), the memory one training step holds between forward and backward (the bytes of the
distinct tensor storages autograd saved for backward and that are still alive after the forward
pass, measured with ``torch.autograd.graph.saved_tensors_hooks``; parameters included, the
backward pass's own transient memory not), the time per training step, forward and backward NFE.
Against the targets: reversible NLL within 0.01 of backprop's, reversible memory <= 0.25x.
"""

from __future__ import annotations

import os
import time
import weakref
from typing import Any, Mapping

import torch

from .. import nn
from ..core import AbstractLayer, setup, tree_leaves
from ..data import two_moons
from ..diffeq import DP5, RK4, Midpoint, Tsit5
from ..layers import FFJORD, StandardNormal
from ..sensitivity import ReversibleAdjoint
from ..training import Adam, TrainState, single_train_step
from ._report import (_pyplot, add_common_arguments, check_seeds, markdown_table, parse_methods, plot_histories,
                      progress, report_written, summarize, torch_threads, write_results)

__all__ = ["add_arguments", "run", "TimeMLP", "saved_tensor_bytes", "METHODS"]

SOLVERS = {"midpoint": Midpoint, "rk4": RK4, "dp5": DP5}
METHODS = tuple(f"{s}-{g}" for s in SOLVERS for g in ("backprop", "reversible"))
QUICK = {"iterations": 3, "seeds": 1, "batch_size": 64, "test_points": 200, "dt": 0.25}


class TimeMLP(AbstractLayer):
    r"""A time-conditioned MLP vector field: :math:`t` concatenated to the input of every layer.

    .. math::  h_1 = \tanh(W_1[z; t] + b_1),\ \dots,\ f(z, t) = W_{L}[h_{L-1}; t] + b_L

    (FFJORD's "concat" layers; Grathwohl et al. 2019). Input the pair ``(z, t)`` (use
    ``time_input=True``), ``z`` of shape ``(B, dim)``. Parameters ``ps``: ``{"layer_k":
    {"weight", "bias"}}`` for ``k = 1..depth + 1``. State: ``{}``.
    """

    def __init__(self, dim: int, hidden: int, depth: int = 2) -> None:
        sizes = [dim] + [hidden] * depth
        self.layers = [nn.Dense(a + 1, b, torch.tanh) for a, b in zip(sizes[:-1], sizes[1:])]
        self.layers.append(nn.Dense(hidden + 1, dim))

    def init_params(self, rng: torch.Generator) -> dict:
        return {f"layer_{k + 1}": layer.init_params(rng) for k, layer in enumerate(self.layers)}

    def forward(self, x: Any, ps: Mapping, st: Mapping):
        h, t = x
        # a time tensor may be float64 beside a float32 state; a Taylor series of t already has z's dtype
        # (and casting is not one of its operations, so TayNODE keeps its O(K^2) rules)
        column = (t if t.dtype == h.dtype else t.to(h.dtype)).expand(h.shape[0], 1)
        for k, layer in enumerate(self.layers):
            h, _ = layer(torch.cat([h, column], dim=1), ps[f"layer_{k + 1}"], {})
        return h, st


def saved_tensor_bytes(closure):
    """``(closure(), bytes)``: the bytes of the distinct storages autograd saved during ``closure`` and still alive.

    Saved tensors are what a backward pass keeps from its forward pass: the memory that grows
    with the number of solver steps under backprop through the solver.
    """
    packed: list = []

    def pack(tensor):
        # a detached alias: returning the tensor itself would tie a saved output to its own grad_fn in a
        # cycle Python's collector cannot see, keeping transient graphs (and their bytes) alive
        alias = tensor.detach()
        packed.append(weakref.ref(alias))
        return alias
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda alias: alias):
        out = closure()
    storages = {}
    for ref in packed:
        tensor = ref()
        if tensor is not None:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return out, sum(storages.values())


def add_arguments(parser) -> None:
    parser.add_argument("--iterations", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--dt", type=float, default=0.05, help="fixed step of every solver (default 0.05)")
    parser.add_argument("--test-points", type=int, default=2000)
    add_common_arguments(parser, METHODS, quick=f"1 seed, {QUICK['iterations']} steps, dt {QUICK['dt']}")


def _data(n: int, seed: int) -> torch.Tensor:
    x, _ = two_moons(n, noise=0.05, rng=torch.Generator().manual_seed(seed))
    return x


def build_flow(method: str, args) -> FFJORD:
    solver_name, gradient = method.split("-")
    solver = SOLVERS[solver_name]()
    sensealg = ReversibleAdjoint() if gradient == "reversible" else None
    return FFJORD(TimeMLP(2, args.hidden), (0.0, 1.0), base=StandardNormal(2), solver=solver, sensealg=sensealg,
                  time_input=True, dt=args.dt, adaptive=False)


def _test_nll(flow: FFJORD, ps, st, x) -> float:
    with torch.no_grad():
        log_p, _ = flow(x, ps, st)
    return float(-log_p.mean())


def train_one(method: str, seed: int, args, data) -> dict:
    x_train, x_test = data
    flow = build_flow(method, args)
    ps, st = setup(torch.Generator().manual_seed(seed), flow)
    state = TrainState(flow, ps, st, Adam(args.lr))

    def loss_fn(model, ps, st, batch):
        log_p, st_new = model(batch, ps, st)
        loss = -log_p.mean()
        return loss, st_new, {"nfe": st_new["nfe"], "backward_stats": st_new["backward_stats"]}

    history = {"loss": [], "nfe": [], "backward_nfe": []}
    order = torch.Generator().manual_seed(1000 + seed)
    bar = progress(args.iterations, f"{method} seed {seed}")
    start = time.perf_counter()
    for _ in range(args.iterations):
        idx = torch.randint(0, x_train.shape[0], (args.batch_size,), generator=order)
        _, loss, stats, state = single_train_step(loss_fn, x_train[idx], state)
        history["loss"].append(loss)
        history["nfe"].append(stats["nfe"])
        history["backward_nfe"].append(stats["backward_stats"].get("nf", 0) if stats["backward_stats"] else 0)
        bar.update(1)
    step_time = (time.perf_counter() - start) / max(args.iterations, 1)
    bar.close()
    history["loss"] = torch.stack(history["loss"]).tolist()
    ps, st = state.ps, state.st
    memory = _step_memory(flow, ps, st, x_train[:args.batch_size])
    own = FFJORD(flow.model, flow.tspan, base=flow.base, trace="exact", solver=flow.solver,
                 sensealg=flow.sensealg, time_input=True, dt=args.dt, adaptive=False)
    adaptive = FFJORD(flow.model, flow.tspan, base=flow.base, trace="exact", solver=Tsit5(), time_input=True,
                      reltol=1e-6, abstol=1e-6)
    return {"test_nll": _test_nll(own, ps, st, x_test), "test_nll_tsit5": _test_nll(adaptive, ps, st, x_test),
            "memory_mb": memory / 2 ** 20, "step_time_ms": 1e3 * step_time,
            "forward_nfe": float(history["nfe"][-1]), "backward_nfe": float(history["backward_nfe"][-1]),
            "history": history, "_trained": (FFJORD(flow.model, flow.tspan, trace="exact", solver=Tsit5(),
                                                    time_input=True, reltol=1e-4, abstol=1e-4), ps, st)}


def _step_memory(flow, ps, st, batch) -> int:
    """Saved-tensor bytes of one training step's forward pass (parameters that require grad)."""
    leaves = [p.detach().requires_grad_(True) for p in tree_leaves(ps)]
    it = iter(leaves)
    from ..core import tree_map  # noqa: PLC0415
    params = tree_map(lambda _: next(it), ps)
    (log_p, _), nbytes = saved_tensor_bytes(lambda: flow(batch, params, st))
    (-log_p.mean()).backward()
    return nbytes


COLUMNS = (("test_nll", "test NLL (own solver)", "{:.3f}"), ("test_nll_tsit5", "test NLL (Tsit5 1e-6)", "{:.3f}"),
           ("memory_mb", "saved memory (MB)", "{:.2f}"), ("step_time_ms", "time/step (ms)", "{:.0f}"),
           ("forward_nfe", "forward NFE", "{:.0f}"), ("backward_nfe", "backward NFE", "{:.0f}"))


def _targets(summary: dict) -> tuple[str, list[dict]]:
    lines = ["| solver | NLL reversible - backprop (target within 0.01) | met | memory ratio (target <= 0.25x; "
             "paper 0.56 GB / 3.9 GB = 0.14x vs recursive checkpointing) | met |", "|---|---|---|---|---|"]
    records = []
    for solver in SOLVERS:
        rev, back = summary.get(f"{solver}-reversible"), summary.get(f"{solver}-backprop")
        if rev is None or back is None:
            continue
        gap = rev["test_nll_tsit5"][0] - back["test_nll_tsit5"][0]
        ratio = rev["memory_mb"][0] / back["memory_mb"][0]
        rec = {"solver": solver, "nll_gap": gap, "nll_met": abs(gap) <= 0.01, "memory_ratio": ratio,
               "memory_met": ratio <= 0.25}
        records.append(rec)
        lines.append(f"| {solver} | {gap:+.3f} | {'yes' if rec['nll_met'] else 'no'} | {ratio:.3f}x | "
                     f"{'yes' if rec['memory_met'] else 'no'} |")
    return ("\n".join(lines) if records else ""), records


def run(args) -> dict:
    if args.quick:
        args.iterations, args.seeds = QUICK["iterations"], QUICK["seeds"]
        args.batch_size, args.test_points, args.dt = QUICK["batch_size"], QUICK["test_points"], QUICK["dt"]
    check_seeds(args.seeds, "cnf-moons")
    methods = parse_methods(args.methods, METHODS, "cnf-moons")
    with torch_threads(args.threads):
        return _run(args, methods)


def _standardize(train: torch.Tensor, test: torch.Tensor):
    mean, std = train.mean(0), train.std(0)
    return (train - mean) / std, (test - mean) / std


def _run(args, methods) -> dict:
    data = _standardize(_data(4000, 0), _data(args.test_points, 1))
    os.makedirs(args.out, exist_ok=True)
    summary, histories, raw, trained = {}, {}, {}, {}
    for method in methods:
        runs = [train_one(method, seed, args, data) for seed in range(args.seeds)]
        summary[method] = summarize(runs, [k for k, _, _ in COLUMNS])
        histories[method] = [r["history"] for r in runs]
        raw[method] = [{k: v for k, v in r.items() if k != "history" and not k.startswith("_")} for r in runs]
        trained[method] = runs[0]["_trained"]
        print(f"{method}: " + ", ".join(f"{label} {fmt.format(summary[method][key][0])}"
                                        for key, label, fmt in COLUMNS))
    command = (f"pylux experiments cnf-moons --iterations {args.iterations} --seeds {args.seeds} "
               f"--methods {','.join(methods)} --batch-size {args.batch_size} --lr {args.lr} --hidden {args.hidden} "
               f"--dt {args.dt} --test-points {args.test_points} --threads {args.threads}")
    targets, checks = _targets(summary)
    text = (f"# cnf-moons\n\n`{command}`\n\nmean ± std over {args.seeds} seed(s); float32, {args.threads} "
            f"thread(s); fixed steps of {args.dt}\n\n{markdown_table(summary, COLUMNS)}\n")
    if targets:
        text += f"\nTargets (McCallum & Foster 2024, two moons; test NLL by Tsit5 on the learned field):\n\n{targets}\n"
    write_results(args.out, text, {"command": command, "settings": vars(args), "summary": summary, "runs": raw,
                                   "targets": checks, "histories": histories})
    plots = [plot_histories(histories, os.path.join(args.out, "training.png"),
                            "cnf-moons: NLL and forward NFE over training")]
    plots.append(plot_densities(trained, data[0], os.path.join(args.out, "density.png"), "cnf-moons",
                                points=30 if args.quick else 120))
    print(text)
    report_written(args.out, plots)
    return summary


def plot_densities(trained: dict, data: torch.Tensor, path: str, title: str, lim: float = 3.0,
                   points: int = 120) -> str | None:
    """The training data and each method's learned 2-D density (seed 0, exact trace) on a grid.

    Args:
        trained: ``{method: (flow, ps, st)}``.
        data: ``(n, 2)`` points, drawn in the first panel.
    """
    plt = _pyplot()
    if plt is None:
        return None
    axis = torch.linspace(-lim, lim, points)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    fig, axes = plt.subplots(1, len(trained) + 1, figsize=(3 * (len(trained) + 1), 3.2), squeeze=False)
    axes[0][0].scatter(data[:, 0], data[:, 1], s=0.5, alpha=0.3)
    axes[0][0].set(title="data", xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    for ax, (method, (flow, ps, st)) in zip(axes[0][1:], trained.items()):
        with torch.no_grad():
            log_p, _ = flow(grid, ps, st)
        ax.imshow(log_p.exp().reshape(points, points).numpy(), origin="lower", extent=(-lim, lim, -lim, lim))
        ax.set(title=method)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}: learned densities (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
