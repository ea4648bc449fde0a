"""Reversible solver vs recursive checkpointing: time and memory of a neural-ODE training step.

After McCallum & Foster (2024)'s experiment: a neural ODE f_θ(x, v) (MLP 2 -> 32 -> 32 -> 2,
tanh) is fitted to Chandrasekhar's white-dwarf equation (x' = v, v' = -(2/t) v - (x^2 - C)^{3/2},
x(0) = 1, v(0) = 0, C = 0.001, t in [0, 5]; pylux.data.white_dwarf_data) with --steps fixed
midpoint steps (default 1000), loss = mean squared error at 50 evenly spaced times.

Rows:
* pylux ReversibleAdjoint(Midpoint(), coupling 0.999): O(1) memory in the number of steps,
  the exact gradient of the reversible discretisation;
* pylux DirectAdjoint(checkpoints=k), k = 2 ... 44: binomial (revolve) recursive checkpointing,
  the schedule the paper compares against (diffrax's RecursiveCheckpointAdjoint): stores k
  states, recomputes the minimal r n - binom(k + r, k + 1) steps, gradient = plain backprop's;
* with --uniform: backprop through k uniform segments with torch.utils.checkpoint;
* plain backprop (DirectAdjoint), everything stored;
* with --compile: ReversibleAdjoint under ``solve(..., compile=True)``: each forward step (the pending
  backward increment, the base step and the new pair) and each backward-sweep step runs as one
  compiled graph, the same gradient to round-off.

Columns: wall time of one forward+backward (median of --repeats), recomputed steps,
memory, and the loss after --train-steps Adam steps (lr 1e-2) from the same initialisation.
Binomial checkpointing gives plain backprop's gradient to round-off (the 'grad diff' column
measures it), so its loss after training is plain backprop's; --train-all trains every row
anyway. The uniform rows save the step nearest each data time where pylux interpolates, so
their gradient differs slightly. Memory on CPU: 'stored' = bytes of the distinct storages autograd
keeps after the forward pass (saved-tensor hooks); 'peak' = the most tensor memory live during forward+backward, from the profiler's
allocation events (benchmarks/node_train_step.peak_cpu_bytes), which also counts what a
backward pass holds while it recomputes. The midpoint method costs 2 evaluations per step, its
reversible version 4 forward and 4 + 2 VJPs backward. float64 by default (--dtype float32).

--steps-list n1,n2,... adds the combined runtime (forward+backward) against the number of
steps for ReversibleAdjoint, plain backprop and binomial checkpointing (--curve-checkpoints),
printed and plotted to --plot (PNG, if matplotlib is installed).

    python benchmarks/reversible.py [--repeats 3] [--train-steps 20] [--threads 1] [--steps 1000] [--compile]
                                    [--steps-list 100,250,500,1000] [--plot reversible_runtime.png]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.utils.checkpoint

import pylux as lx
from pylux import nn
from pylux.sensitivity.checkpointing import binomial_cost

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from node_train_step import peak_cpu_bytes, saved_tensor_counter  # noqa: E402

STEPS = 1000
T1 = 5.0


def make_model(dtype):
    model = nn.Chain(nn.Dense(2, 32, torch.tanh), nn.Dense(32, 32, torch.tanh), nn.Dense(32, 2))
    ps, st = lx.setup(torch.Generator().manual_seed(0), model, dtype=dtype)
    return model, ps, st


def field_of(model, st):
    def f(u, p, t):
        return model(u, p, st)[0]
    return f


def solve_loss(sensealg, steps: int = STEPS, compile: bool = False):
    """The white-dwarf loss with ``steps`` midpoint steps under ``sensealg`` (None: plain backprop)."""
    def loss_fn(model, ps, st, data):
        t_data, u_data = data
        prob = lx.ODEProblem(field_of(model, st), u_data[0], (0.0, T1), ps)
        sol = lx.solve(prob, lx.Midpoint(), dt=T1 / steps, adaptive=False, saveat=t_data.tolist(),
                       sensealg=sensealg, compile=compile)
        return (sol.u - u_data).pow(2).mean(), st, {}
    return loss_fn


def reversible_loss(model, ps, st, data, steps: int = STEPS):
    return solve_loss(lx.ReversibleAdjoint(coupling=0.999), steps)(model, ps, st, data)


def direct_loss(model, ps, st, data, steps: int = STEPS):
    return solve_loss(None, steps)(model, ps, st, data)


def checkpointed_loss(k: int, steps: int = STEPS):
    """Plain midpoint steps in k uniform segments, each recomputed during backward (torch.utils.checkpoint)."""
    dt = T1 / steps

    def loss_fn(model, ps, st, data):
        t_data, u_data = data
        f = field_of(model, st)
        save_at = {round(float(t) / dt): j for j, t in enumerate(t_data)}
        outputs = [u_data[0]] + [None] * (len(t_data) - 1)

        def segment(u, lo, hi):
            saved = []
            for n in range(lo, hi):
                t = torch.full((), n * dt, dtype=u.dtype)
                mid = u + 0.5 * dt * f(u, ps, t)
                u = u + dt * f(mid, ps, t + 0.5 * dt)
                if n + 1 in save_at:
                    saved.append(u)
            return (u, *saved)

        u = u_data[0]
        bounds = [round(i * steps / k) for i in range(k + 1)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            u, *saved = torch.utils.checkpoint.checkpoint(segment, u, lo, hi, use_reentrant=False)
            for j, value in zip((save_at[n + 1] for n in range(lo, hi) if n + 1 in save_at), saved):
                outputs[j] = value
        return (torch.stack(outputs) - u_data).pow(2).mean(), st, {}
    return loss_fn


def step_cost(loss_fn, model, ps0, st, data, repeats, peak: bool = False):
    """(median seconds of forward+backward, bytes autograd stores during the forward pass, gradient,
    peak bytes of forward+backward or None)."""
    state = lx.training.TrainState(model, ps0, st, lx.training.Adam(1e-2))
    pack, unpack, stored = saved_tensor_counter()

    def counted_loss(model, ps, st, data):
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return loss_fn(model, ps, st, data)
    grads, _, _, state = lx.training.compute_gradients(counted_loss, data, state)
    lx.training.compute_gradients(loss_fn, data, state)  # warm-up without the hooks (a compiled row compiles here)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, _, _, state = lx.training.compute_gradients(loss_fn, data, state)
        times.append(time.perf_counter() - start)
    peak_bytes = peak_cpu_bytes(lambda: lx.training.compute_gradients(loss_fn, data, state)) if peak else None
    return statistics.median(times), stored[0], lx.flatten(grads)[0].detach(), peak_bytes


def train(loss_fn, model, ps0, st, data, steps: int) -> float:
    state = lx.training.TrainState(model, ps0, st, lx.training.Adam(1e-2))
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        _, loss, _, state = lx.training.single_train_step(loss_fn, data, state)
    return float(loss)


def runtime_curve(model, ps0, st, data, steps_list, checkpoints: int, repeats: int):
    """{method: [seconds of forward+backward for each number of steps]}."""
    methods = {"ReversibleAdjoint": lambda n: solve_loss(lx.ReversibleAdjoint(coupling=0.999), n),
               "DirectAdjoint (store all)": lambda n: solve_loss(None, n),
               f"DirectAdjoint(checkpoints={checkpoints})": lambda n: solve_loss(
                   lx.DirectAdjoint(checkpoints=checkpoints), n)}
    return {name: [step_cost(make(n), model, ps0, st, data, repeats)[0] for n in steps_list]
            for name, make in methods.items()}


def plot_curve(curve, steps_list, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, seconds in curve.items():
        ax.plot(steps_list, seconds, marker="o", label=name)
    ax.set_xlabel("number of steps")
    ax.set_ylabel("forward + backward time (s)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--train-all", action="store_true",
                        help="also train the binomial-checkpointing rows (their gradient is plain backprop's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--checkpoints", default="2,4,8,16,32,44")
    parser.add_argument("--uniform", action="store_true",
                        help="also time uniform-segment checkpointing with torch.utils.checkpoint")
    parser.add_argument("--no-peak", action="store_true", help="skip the profiler's peak-memory measurement")
    parser.add_argument("--compile", action="store_true",
                        help="add ReversibleAdjoint with compile=True (its forward and backward steps compiled; ~1 min to compile)")
    parser.add_argument("--steps-list", default="",
                        help="comma list of step counts for the runtime-vs-steps curve (empty: skip)")
    parser.add_argument("--curve-checkpoints", type=int, default=8)
    parser.add_argument("--plot", default="reversible_runtime.png")
    args = parser.parse_args()
    from _timing import pin_cores
    cores = pin_cores(args.threads)  # diffrax's XLA pool would otherwise take every core of the machine
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    data = lx.data.white_dwarf_data(50, dtype=dtype)
    model, ps0, st = make_model(dtype)
    steps, peak = args.steps, not args.no_peak

    rows = [("DirectAdjoint (store all)", solve_loss(None, steps), 0, True),
            ("ReversibleAdjoint", solve_loss(lx.ReversibleAdjoint(coupling=0.999), steps), None, True)]
    if args.compile:  # forward steps and backward sweep compiled; the gradient of the row above to round-off
        rows.append(("ReversibleAdjoint compile=True", solve_loss(lx.ReversibleAdjoint(coupling=0.999), steps,
                                                                 compile=True), None, True))
    for k in (int(x) for x in args.checkpoints.split(",")):
        rows.append((f"DirectAdjoint(checkpoints={k})", solve_loss(lx.DirectAdjoint(checkpoints=k), steps),
                     binomial_cost(steps, k), args.train_all))
        if args.uniform:
            rows.append((f"uniform torch.utils.checkpoint, {k} segs", checkpointed_loss(k, steps), steps, True))
    measured = {name: step_cost(fn, model, ps0, st, data, args.repeats, peak) for name, fn, _, _ in rows}
    direct_grad = measured["DirectAdjoint (store all)"][2]
    rev_time = measured["ReversibleAdjoint"][0]
    print(f"white dwarf neural ODE, {steps} midpoint steps, {args.dtype}, {args.threads} threads on {cores}; "
          f"loss after {args.train_steps} Adam steps (lr 1e-2)")
    print("| method | time ms | vs rev. | recomputed steps | stored KB | peak KB | grad diff vs Direct | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    direct_loss_value = None
    for name, fn, recomputed, trains in rows:
        t, stored, grad, peak_bytes = measured[name]
        loss = train(fn, model, ps0, st, data, args.train_steps) if trains else None
        if name.startswith("DirectAdjoint (store all)"):
            direct_loss_value = loss
        loss_text = f"{loss:.4e}" if loss is not None else f"= Direct ({direct_loss_value:.4e})"
        diff = float((grad - direct_grad).abs().max() / direct_grad.abs().max())
        peak_text = f"{peak_bytes / 1024:.1f}" if peak_bytes is not None else "-"
        rec = "-" if recomputed is None else str(recomputed)
        print(f"| {name} | {1e3 * t:.1f} | {t / rev_time:.2f}x | {rec} | {stored / 1024:.1f} | {peak_text} | "
              f"{diff:.1e} | {loss_text} |")
    print("'vs rev.' = this time / ReversibleAdjoint's time (> 1: reversible faster); 'grad diff' = max |g - g_Direct|"
          " / max |g_Direct| at the initial parameters (ReversibleAdjoint differentiates a different discretisation).")
    if args.steps_list:
        steps_list = [int(x) for x in args.steps_list.split(",")]
        curve = runtime_curve(model, ps0, st, data, steps_list, args.curve_checkpoints, args.repeats)
        print("\ncombined runtime (forward + backward, s) against the number of steps")
        print("| method | " + " | ".join(str(n) for n in steps_list) + " |")
        print("|---|" + "---:|" * len(steps_list))
        for name, seconds in curve.items():
            print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in seconds) + " |")
        plot_curve(curve, steps_list, args.plot, f"white dwarf, midpoint, {args.dtype}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
