"""Reversible solver vs backprop with checkpointing: time and memory of a neural-ODE training step.

After McCallum & Foster (2024)'s experiment: a neural ODE f_θ(x, v) (MLP 2 -> 32 -> 32 -> 2,
tanh) is fitted to Chandrasekhar's white-dwarf equation (x' = v, v' = -(2/t) v - (x^2 - C)^{3/2},
x(0) = 1, v(0) = 0, C = 0.001, t in [0, 5]; pylux.data.white_dwarf_data) with 1000 fixed
midpoint steps, loss = mean squared error at 50 evenly spaced times.

Rows:
* pylux ReversibleAdjoint(Midpoint(), coupling 0.999): O(1) memory in the number of steps,
  the exact gradient of the reversible discretisation;
* backprop through the (plain) midpoint solve, checkpointed at k = 2 ... 44 segments with
  torch.utils.checkpoint: stores k states, recomputes one segment at a time;
* plain backprop (DirectAdjoint), everything stored.

Columns: wall time of one forward+backward (median of --repeats), memory, and the loss after
--train-steps Adam steps (lr 1e-2) from the same initialisation (same loss = both train alike).
Memory on CPU: 'stored' = bytes autograd keeps after the forward pass (saved-tensor hooks),
'peak est.' = stored + the largest recomputed segment's graph (per-step bytes of plain
backprop x steps per segment); the reversible backward holds two steps' graphs at a time.
The midpoint method costs 2 evaluations per step, its reversible version 4 forward and
4 + 2 VJPs backward. float64 by default (--dtype float32 to compare).

    python benchmarks/reversible.py [--repeats 3] [--train-steps 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.utils.checkpoint

import pylux as lx
from pylux import nn

STEPS = 1000


def make_model(dtype):
    model = nn.Chain(nn.Dense(2, 32, torch.tanh), nn.Dense(32, 32, torch.tanh), nn.Dense(32, 2))
    ps, st = lx.setup(torch.Generator().manual_seed(0), model, dtype=dtype)
    return model, ps, st


def field_of(model, st):
    def f(u, p, t):
        return model(u, p, st)[0]
    return f


def reversible_loss(model, ps, st, data):
    t_data, u_data = data
    prob = lx.ODEProblem(field_of(model, st), u_data[0], (0.0, 5.0), ps)
    sol = lx.solve(prob, lx.Midpoint(), dt=5.0 / STEPS, adaptive=False, saveat=t_data.tolist(),
                   sensealg=lx.ReversibleAdjoint(coupling=0.999))
    return (sol.u - u_data).pow(2).mean(), st, {}


def direct_loss(model, ps, st, data):
    t_data, u_data = data
    prob = lx.ODEProblem(field_of(model, st), u_data[0], (0.0, 5.0), ps)
    sol = lx.solve(prob, lx.Midpoint(), dt=5.0 / STEPS, adaptive=False, saveat=t_data.tolist())
    return (sol.u - u_data).pow(2).mean(), st, {}


def checkpointed_loss(k: int):
    """Plain midpoint steps in k segments, each recomputed during backward (torch.utils.checkpoint)."""
    dt = 5.0 / STEPS

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
        bounds = [round(i * STEPS / k) for i in range(k + 1)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            u, *saved = torch.utils.checkpoint.checkpoint(segment, u, lo, hi, use_reentrant=False)
            for j, value in zip((save_at[n + 1] for n in range(lo, hi) if n + 1 in save_at), saved):
                outputs[j] = value
        return (torch.stack(outputs) - u_data).pow(2).mean(), st, {}
    return loss_fn


def step_cost(loss_fn, model, ps0, st, data, repeats):
    """(median seconds of forward+backward, bytes autograd stores during the forward pass)."""
    state = lx.training.TrainState(model, ps0, st, lx.training.Adam(1e-2))
    stored = [0]

    def pack(x):
        stored[0] += x.numel() * x.element_size()
        return x

    def counted_loss(model, ps, st, data):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            return loss_fn(model, ps, st, data)
    _, _, _, state = lx.training.compute_gradients(counted_loss, data, state)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, _, _, state = lx.training.compute_gradients(loss_fn, data, state)
        times.append(time.perf_counter() - start)
    return statistics.median(times), stored[0]


def train(loss_fn, model, ps0, st, data, steps: int) -> float:
    state = lx.training.TrainState(model, ps0, st, lx.training.Adam(1e-2))
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        _, loss, _, state = lx.training.single_train_step(loss_fn, data, state)
    return float(loss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--checkpoints", default="2,4,8,16,32,44")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    data = lx.data.white_dwarf_data(50, dtype=dtype)
    model, ps0, st = make_model(dtype)

    direct_time, direct_stored = step_cost(direct_loss, model, ps0, st, data, args.repeats)
    per_step = direct_stored / STEPS
    rev_time, rev_stored = step_cost(reversible_loss, model, ps0, st, data, args.repeats)
    rows = [("DirectAdjoint (store all)", direct_loss, direct_time, direct_stored, direct_stored),
            ("ReversibleAdjoint", reversible_loss, rev_time, rev_stored, rev_stored + 2 * per_step)]
    for k in (int(x) for x in args.checkpoints.split(",")):
        fn = checkpointed_loss(k)
        t_k, stored_k = step_cost(fn, model, ps0, st, data, args.repeats)
        rows.append((f"checkpointed backprop, {k} ckpts", fn, t_k, stored_k,
                     stored_k + per_step * -(-STEPS // k)))
    print(f"white dwarf neural ODE, {STEPS} midpoint steps, {args.dtype}, {args.threads} threads; "
          f"loss after {args.train_steps} Adam steps (lr 1e-2)")
    print(f"{'method':34s} {'time ms':>9s} {'vs rev.':>8s} {'stored KB':>10s} {'peak est. KB':>13s} "
          f"{'loss':>10s}")
    for name, fn, t, stored, peak in rows:
        loss = train(fn, model, ps0, st, data, args.train_steps)
        print(f"{name:34s} {1e3 * t:9.1f} {t / rev_time:7.2f}x {stored / 1024:10.1f} {peak / 1024:13.1f} "
              f"{loss:10.3e}")
    print("'vs rev.' = this time / ReversibleAdjoint's time (> 1: reversible faster).")


if __name__ == "__main__":
    main()
