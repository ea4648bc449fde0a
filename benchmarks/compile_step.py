"""One Runge–Kutta step, eager against ``torch.compile``, on the Kelly et al. MNIST neural-ODE field.

The step is ``Tsit5().step(term, t, u, dt, state)`` with ``t`` and ``dt`` 0-d device tensors
(the engine's step contract), on f(z, t) = W2 tanh(W1 [z; t] + b1) + b2 (state 784, hidden 100,
batch 512, float32, time float64). Prints the number of graph breaks ``torch._dynamo.explain``
finds in one step, then the median wall time per step over ``--repeats`` runs of ``--steps``
steps, eager and compiled (after a warm-up that includes the compilation), and their ratio.

    python benchmarks/compile_step.py [--device cpu|cuda] [--steps 50] [--repeats 5] [--threads 2]
                                      [--mode default|reduce-overhead|max-autotune] [--scale 1]

Timings on a shared machine are noisy; compare numbers from the same run.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch
import torch._dynamo as dynamo

import pylux as lx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from node_train_step import kelly_field, make_problem  # noqa: E402  (the same field and data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", default="default")
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    params, u0, d = make_problem(args.scale, torch.float32, device)
    term = lx.ODETerm(kelly_field(d)).bind(params)
    solver = lx.Tsit5()
    t = torch.zeros((), dtype=torch.float64, device=device)
    dt = torch.full((), 0.05, dtype=torch.float64, device=device)
    state = solver.init(term, t, u0, dt)

    def one_step(u, t, dt):
        result = solver.step(term, t, u, dt, state)
        return result.u_new, result.error_estimate

    dynamo.reset()
    explained = dynamo.explain(one_step)(u0, t, dt)
    print(f"graph breaks: {explained.graph_break_count}")
    for reason in explained.break_reasons:
        print(f"  break: {reason.reason}")
    compiled = torch.compile(one_step, mode=None if args.mode == "default" else args.mode)

    def timed(fn) -> float:
        u = u0
        for _ in range(3):  # warm-up (and compilation)
            fn(u, t, dt)
        per_step = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                u_new, err = fn(u, t, dt)
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step.append((time.perf_counter() - start) / args.steps * 1e3)
        return statistics.median(per_step)

    with torch.no_grad():
        start = time.perf_counter()
        compiled(u0, t, dt)
        compile_s = time.perf_counter() - start
        eager_ms = timed(one_step)
        compiled_ms = timed(compiled)
        eager_u, eager_err = one_step(u0, t, dt)
        compiled_u, compiled_err = compiled(u0, t, dt)
    difference = float((eager_u - compiled_u).abs().max())
    print(f"device {device}, batch {u0.shape[0]}, state {d}, float32 state, float64 time, mode {args.mode}")
    print(f"first compiled call (compilation): {compile_s:.1f} s")
    print(f"eager step:    {eager_ms:.3f} ms")
    print(f"compiled step: {compiled_ms:.3f} ms")
    print(f"compiled / eager: {compiled_ms / eager_ms:.2f}")
    print(f"largest difference of u_new, compiled vs eager: {difference:.2e}")


if __name__ == "__main__":
    main()
