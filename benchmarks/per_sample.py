"""Per-sample-time ODE solves: pylux ``batch="per-sample"`` against torchode on the same problems.

Both solvers give every sample of the batch its own time, step size and accept/reject decision, and
save each sample at its own (irregular) times. Same method (Tsit5), same tolerances, the same
integral controller (step factor ``0.9 E^(-1/5)`` clamped to [0.2, 10]: pylux ``IController()`` with
Tsit5's error order 4, torchode ``IntegralController``), the same RMS norm per sample, Hairer's
initial step in both; eager mode (no compilation) for both.

Problems (float32, batch 256, each sample its own end time t1_b and 16 random saved times in (0, t1_b]):

  (a) vdp:  van der Pol oscillators x'' = mu_b (1 - x^2) x' - x, mu_b uniform in [0.2, 3]
            (samples of mixed difficulty), t1_b uniform in [5, 10], tol 1e-5
  (b) mlp:  du/dt = W2 tanh(W1 u + b1) + b2 (state 32, hidden 64), t1_b uniform in [2, 6],
            tol 1e-5; forward, and forward + backward (gradient of a weighted sum of the saved
            states with respect to W1, b1, W2, b2) under pylux DirectAdjoint and torchode
            AutoDiffAdjoint (both backpropagate through the solver)

Printed per solver: NFE (calls of f, each on the whole batch), mean accepted steps per sample, wall
time (median of ``--repeats`` runs after a warm-up, the two solvers run alternately), the bytes autograd saves for the backward pass
(summed over distinct saved tensors, through ``torch.autograd.graph.saved_tensors_hooks``; the
memory a backward pass through the solver needs), the largest difference between the two solvers'
saved states (both solve to the same tolerance), and the time ratio pylux / torchode.

Run:  OMP_NUM_THREADS=1 python benchmarks/per_sample.py [--repeats 9] [--threads 1]
Timings on a shared machine are noisy; compare numbers from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pylux.diffeq as de
from pylux.sensitivity import DirectAdjoint

BATCH, TIMES, TOL = 256, 16, 1e-5


class Counter:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *args):
        self.n += 1
        return self.fn(*args)


def irregular_times(t1, generator):
    """(B, T) sorted random times in (0, t1_b] with the last one at t1_b."""
    raw = torch.sort(torch.rand(t1.shape[0], TIMES - 1, generator=generator, dtype=torch.float64), dim=1).values
    return torch.cat([raw * t1[:, None], t1[:, None]], dim=1)


def vdp_problem():
    g = torch.Generator().manual_seed(0)
    mu = (0.2 + 2.8 * torch.rand(BATCH, generator=g)).float()
    u0 = (torch.rand(BATCH, 2, generator=g) * 4 - 2).float()
    t1 = 5.0 + 5.0 * torch.rand(BATCH, generator=g, dtype=torch.float64)

    def field(u, t):
        x, v = u[:, 0], u[:, 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], dim=1)
    return dict(name="vdp", field=field, u0=u0, t1=t1, times=irregular_times(t1, g), params=[])


def mlp_problem():
    g = torch.Generator().manual_seed(1)
    d, h = 32, 64
    w1 = ((torch.rand(h, d, generator=g) * 2 - 1) * 1.5 / d ** 0.5).requires_grad_(True)
    b1 = ((torch.rand(h, generator=g) * 2 - 1) / d ** 0.5).requires_grad_(True)
    w2 = ((torch.rand(d, h, generator=g) * 2 - 1) * 1.5 / h ** 0.5).requires_grad_(True)
    b2 = ((torch.rand(d, generator=g) * 2 - 1) / h ** 0.5).requires_grad_(True)
    u0 = torch.rand(BATCH, d, generator=g) * 2 - 1
    t1 = 2.0 + 4.0 * torch.rand(BATCH, generator=g, dtype=torch.float64)

    def field(u, t):
        return torch.addmm(b2, torch.tanh(torch.addmm(b1, u, w1.t())), w2.t())
    return dict(name="mlp", field=field, u0=u0, t1=t1, times=irregular_times(t1, g), params=[w1, b1, w2, b2])


def run_pylux(problem, sensealg=None):
    field = Counter(problem["field"])
    t0 = torch.zeros(BATCH, dtype=torch.float64)
    prob = de.ODEProblem(lambda u, p, t: field(u, t), problem["u0"], (t0, problem["t1"]))
    sol = de.solve(prob, de.Tsit5(), saveat=problem["times"], batch="per-sample", reltol=TOL, abstol=TOL,
                   controller=de.IController(), sensealg=sensealg)
    steps = sol.stats.naccept_per_sample.double().mean().item()
    return sol.u.transpose(0, 1), field.n, steps


def run_torchode(problem):
    import torchode as to
    field = Counter(problem["field"])
    term = to.ODETerm(lambda t, y: field(y, t.to(y.dtype)))
    step = to.Tsit5(term=term)
    controller = to.IntegralController(atol=TOL, rtol=TOL, term=term)
    solver = to.AutoDiffAdjoint(step, controller)
    ivp = to.InitialValueProblem(y0=problem["u0"], t_eval=problem["times"],
                                 t_start=torch.zeros(BATCH, dtype=torch.float64), t_end=problem["t1"])
    sol = solver.solve(ivp)
    steps = sol.stats["n_accepted"].double().mean().item()
    return sol.ys, field.n, steps


def weighted_sum(ys):
    weights = torch.linspace(-1.0, 1.0, ys[0].numel(), dtype=ys.dtype).reshape(ys.shape[1:])
    return (ys * weights).sum()


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs."""
    seen: dict[tuple, int] = {}

    def pack(x):
        key = (x.untyped_storage().data_ptr(), x.dtype)
        seen[key] = max(seen.get(key, 0), x.untyped_storage().nbytes())
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, sum(seen.values())


def timed_pair(first, second, repeats):
    """Median wall times of ``first`` and ``second``, run alternately after a warm-up of each (so that a
    change in the machine's load affects both alike)."""
    first(), second()
    times = ([], [])
    for _ in range(repeats):
        for fn, out in zip((first, second), times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def forward_rows(problem, repeats):
    with torch.no_grad():
        rows = {"pylux": run_pylux(problem), "torchode": run_torchode(problem)}
        seconds = timed_pair(lambda: run_pylux(problem), lambda: run_torchode(problem), repeats)
    return {name: (*row, s) for (name, row), s in zip(rows.items(), seconds)}


def backward_rows(problem, repeats):
    runners = {"pylux": lambda p: run_pylux(p, DirectAdjoint()), "torchode": run_torchode}

    def step(runner):
        ys, nfe, steps = runner(problem)
        return ys, nfe, steps, torch.autograd.grad(weighted_sum(ys), problem["params"])
    rows = {}
    for name, runner in runners.items():
        _, memory = saved_bytes(lambda: runner(problem))
        rows[name] = (*step(runner), memory)
    seconds = timed_pair(lambda: step(runners["pylux"]), lambda: step(runners["torchode"]), repeats)
    return {name: (ys, nfe, steps, s, memory, grads)
            for (name, (ys, nfe, steps, grads, memory)), s in zip(rows.items(), seconds)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = f"{'problem':<16}{'solver':<10}{'NFE':>6}{'steps/sample':>14}{'time [s]':>10}{'saved MB':>10}"
    print(header)
    ratios = []
    for make in (vdp_problem, mlp_problem):
        problem = make()
        rows = forward_rows(problem, args.repeats)
        for name, (ys, nfe, steps, seconds) in rows.items():
            print(f"{problem['name'] + ' fwd':<16}{name:<10}{nfe:>6}{steps:>14.1f}{seconds:>10.3f}{'':>10}")
        diff = (rows["pylux"][0] - rows["torchode"][0]).abs().max().item()
        ratio = rows["pylux"][3] / rows["torchode"][3]
        ratios.append((problem["name"] + " fwd", ratio))
        print(f"{'':<16}max |pylux - torchode| = {diff:.2e}; time ratio pylux / torchode = {ratio:.2f}")
        if not problem["params"]:
            continue
        rows = backward_rows(problem, args.repeats)
        for name, (ys, nfe, steps, seconds, memory, grads) in rows.items():
            print(f"{problem['name'] + ' fwd+bwd':<16}{name:<10}{nfe:>6}{steps:>14.1f}{seconds:>10.3f}"
                  f"{memory / 2 ** 20:>10.1f}")
        grad_diff = max(((a - b).abs().max() / b.abs().max()).item()
                        for a, b in zip(rows["pylux"][5], rows["torchode"][5]))
        ratio = rows["pylux"][3] / rows["torchode"][3]
        ratios.append((problem["name"] + " fwd+bwd", ratio))
        memory_ratio = rows["pylux"][4] / rows["torchode"][4]
        print(f"{'':<16}largest relative gradient difference = {grad_diff:.2e}; time ratio pylux / torchode = "
              f"{ratio:.2f}; saved-memory ratio = {memory_ratio:.2f}")
    print("time ratios (pylux / torchode): " + ", ".join(f"{name} {r:.2f}" for name, r in ratios))


if __name__ == "__main__":
    main()
