"""P2 solves with glibc's malloc defaults against ``lx.retain_freed_cpu_memory()``, in fresh processes.

The setting is process-wide and cannot be undone, so each measurement is its own Python process, the two
kinds alternating (A B A B ...) so that a slow period of a shared machine hits both alike. Each process
solves the Kelly MNIST field of ``node_train_step.py`` (state 512 x 784 float32, tol 1e-5, Tsit5 with
integral control): the forward solve eagerly and with ``compile=True`` (compiled before the timing), and
one DirectAdjoint training step; it also counts the minor page faults of its timed part.

Why fresh processes: glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB), so a
process whose history already freed a large block behaves close to the retained setting; a fresh one, or
one that only ever frees blocks of the state's size, keeps faulting its pages in. The setting makes the
good case certain; this script shows the difference where the history has not done so.

    python benchmarks/cpu_memory.py [--pairs 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CHILD = r"""
import resource, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[3])
import node_train_step as nts
import pylux as lx
import pylux.diffeq as de
torch.set_num_threads(int(sys.argv[2]))
applied = lx.retain_freed_cpu_memory() if sys.argv[1] == "retained" else False
params, u0, d = nts.make_problem(1.0, torch.float32, "cpu")
f = nts.kelly_field(d)
prob = de.ODEProblem(lambda u, p, t: f(u, params, t), u0, (0.0, 1.0))
def solve(compile):
    return de.solve(prob, de.Tsit5(), reltol=1e-5, abstol=1e-5, saveat=[1.0], compile=compile,
                    controller=de.IController())
direct = nts.pylux_step(lx.DirectAdjoint(), 1e-5)
def timed(fn, n):
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3
with torch.no_grad():
    for _ in range(3):
        solve(True), solve(False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    compiled, eager = timed(lambda: solve(True), 21), timed(lambda: solve(False), 11)
nts.train_step(direct, params, u0, f)
backprop = timed(lambda: nts.train_step(direct, params, u0, f), 9)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, compiled, eager, backprop, faults)
"""

ROWS = ("P2 forward compile=True (ms)", "P2 forward eager (ms)", "P2 DirectAdjoint fwd+bwd (ms)",
        "minor page faults (timed part)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    results = {"defaults": [], "retained": []}
    for _ in range(args.pairs):
        for kind in results:
            out = subprocess.run([sys.executable, "-c", CHILD, kind, str(args.threads), here], check=True,
                                 capture_output=True, text=True).stdout.split()
            if kind == "retained" and out[0] != "True":
                sys.exit("retain_freed_cpu_memory() did not apply here (not glibc): nothing to compare")
            results[kind].append([float(x) for x in out[1:]])
            print(kind, " ".join(f"{x:.1f}" for x in results[kind][-1]), flush=True)
    print(f"\n{args.pairs} fresh processes of each kind, alternating, {args.threads} thread(s); medians (min-max)")
    print("| quantity | glibc defaults | retain_freed_cpu_memory() | ratio |")
    print("|---|---:|---:|---:|")
    for i, name in enumerate(ROWS):
        a = [r[i] for r in results["defaults"]]
        b = [r[i] for r in results["retained"]]
        ratio = statistics.median(b) / statistics.median(a)
        print(f"| {name} | {statistics.median(a):.1f} ({min(a):.1f}-{max(a):.1f}) | "
              f"{statistics.median(b):.1f} ({min(b):.1f}-{max(b):.1f}) | {ratio:.2f} |")


if __name__ == "__main__":
    main()
