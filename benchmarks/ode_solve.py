"""Forward ODE solve: pylux against torchdiffeq (dopri5) and torchode (Dopri5, Tsit5).

Problems (float32, 2 threads, forward solves under ``torch.no_grad()``):

  (a) spiral:  dz/dt = (z^3) A,  A = [[-0.1, 2], [-2, -0.1]],  batch 512, t in [0, 10], tol 1e-6
  (b) mnist:   du/dt = W2 tanh(W1 [u, t] + b1) + b2  (Kelly et al. 2020: state 784, hidden 100,
               time concatenated), batch 512, t in [0, 1], tol 1e-5
  (c) mnist x3: (b) with every weight scaled by 3 (a harder field)

For each solver it prints the number of evaluations of f (calls, each on the whole
batch), the wall time (median of ``--repeats`` runs after a warm-up), the max abs
error of the final state against a float64 reference (torchdiffeq dopri8 at
rtol = atol = 1e-12) and the solver overhead factor

    overhead = (wall time / NFE) / (time of one evaluation of f)

(1.0 = all time spent in f). torchode controls each batch element's step
separately; its NFE counts calls of f on the whole batch.

Solvers differ in how far below the tolerance their error lands (pylux's PI
controllers with OrdinaryDiffEq's gains are conservative), so the script also
compares at equal error: pylux at the cheapest tolerance (of tol * 10^(k/2),
k = -2..6) whose error is no larger than the peer's.

Run:  python benchmarks/ode_solve.py [--repeats 5] [--problems spiral,mnist,mnist3]
Timings on a shared machine are noisy; compare numbers from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import pylux.diffeq as de


class Counter:
    def __init__(self, fn):
        self.fn = fn
        self.n = 0

    def __call__(self, *args):
        self.n += 1
        return self.fn(*args)


def spiral_problem(dtype):
    g = torch.Generator().manual_seed(0)
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=dtype)
    z0 = (torch.tensor([2.0, 0.0]) + 0.1 * torch.randn(512, 2, generator=g)).to(dtype)

    def field(u, t):
        return (u ** 3) @ A
    return dict(name="spiral", field=field, u0=z0, t1=10.0, tol=1e-6)


def mnist_problem(dtype, scale=1.0):
    g = torch.Generator().manual_seed(0)
    d, h, batch = 784, 100, 512
    w1 = (torch.rand(h, d + 1, generator=g) * 2 - 1) / (d + 1) ** 0.5 * scale
    b1 = (torch.rand(h, generator=g) * 2 - 1) / (d + 1) ** 0.5 * scale
    w2 = (torch.rand(d, h, generator=g) * 2 - 1) / h ** 0.5 * scale
    b2 = (torch.rand(d, generator=g) * 2 - 1) / h ** 0.5 * scale
    u0 = torch.rand(batch, d, generator=g)
    w1, b1, w2, b2, u0 = (x.to(dtype) for x in (w1, b1, w2, b2, u0))
    w1u, w1t = w1[:, :d].t().contiguous(), w1[:, d]

    def field(u, t):
        # concatenating t as an input feature == adding t * (its weight column)
        if t.dim() == 0:
            pre = torch.addmm(b1 + t * w1t, u, w1u)
        else:  # torchode: one time per batch element
            pre = torch.addmm(b1, u, w1u) + t[:, None] * w1t
        return torch.addmm(b2, torch.tanh(pre), w2.t())
    name = "mnist" if scale == 1.0 else f"mnist x{scale:g}"
    return dict(name=name, field=field, u0=u0, t1=1.0, tol=1e-5)


def reference(problem):
    import torchdiffeq
    field = problem["field"]
    u0 = problem["u0"].double()
    prob64 = dict(problem)
    if problem["name"] == "spiral":
        prob64 = spiral_problem(torch.float64)
    elif problem["name"].startswith("mnist"):
        scale = 1.0 if problem["name"] == "mnist" else float(problem["name"].split("x")[1])
        prob64 = mnist_problem(torch.float64, scale)
    field = prob64["field"]
    t = torch.tensor([0.0, problem["t1"]], dtype=torch.float64)
    with torch.no_grad():
        return torchdiffeq.odeint(lambda t, y: field(y, t), u0, t, method="dopri8", rtol=1e-12,
                                  atol=1e-12)[-1]


def run_pylux(problem, solver):
    field = Counter(problem["field"])
    prob = de.ODEProblem(lambda u, p, t: field(u, t), problem["u0"], (0.0, problem["t1"]))
    sol = de.solve(prob, solver, reltol=problem["tol"], abstol=problem["tol"], saveat=[problem["t1"]])
    return sol.u[-1], field.n


def run_torchdiffeq(problem):
    import torchdiffeq
    field = Counter(problem["field"])
    t = torch.tensor([0.0, problem["t1"]])
    y = torchdiffeq.odeint(lambda t, y: field(y, t), problem["u0"], t, method="dopri5",
                           rtol=problem["tol"], atol=problem["tol"])
    return y[-1], field.n


def run_torchode(problem, method):
    import torchode as to
    field = Counter(problem["field"])
    term = to.ODETerm(lambda t, y: field(y, t))
    step = getattr(to, method)(term=term)
    controller = to.IntegralController(atol=problem["tol"], rtol=problem["tol"], term=term)
    solver = to.AutoDiffAdjoint(step, controller)
    u0 = problem["u0"]
    t_eval = torch.tensor([0.0, problem["t1"]]).repeat(u0.shape[0], 1)
    sol = solver.solve(to.InitialValueProblem(y0=u0, t_eval=t_eval))
    return sol.ys[:, -1], field.n


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def f_time(problem, repeats=50):
    field, u0 = problem["field"], problem["u0"]
    t = torch.tensor(0.5)
    for _ in range(5):
        field(u0, t)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        field(u0, t)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def tolerance_scan(problem, run):
    """``(tol, nfe, error, trial problem)`` at tol * 10^(k/2), k = -2..6 (one untimed run each)."""
    rows = []
    for k in range(-2, 7):
        trial = dict(problem, tol=problem["tol"] * 10 ** (k / 2))
        u1, nfe = run(trial)
        rows.append((trial["tol"], nfe, (u1.double() - problem["ref"]).abs().max().item(), trial))
    return rows


def matched_error(scan, target_error):
    """The cheapest scanned run at least as accurate as ``target_error`` (or None)."""
    ok = [row for row in scan if row[2] <= target_error]
    return min(ok, key=lambda row: (row[1], -row[0])) if ok else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--problems", default="spiral,mnist,mnist3")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*below what torch.float32 arithmetic can resolve")
    makers = {"spiral": lambda: spiral_problem(torch.float32),
              "mnist": lambda: mnist_problem(torch.float32),
              "mnist3": lambda: mnist_problem(torch.float32, 3.0)}
    contenders = [
        ("pylux Tsit5", lambda p: run_pylux(p, de.Tsit5())),
        ("pylux DP5", lambda p: run_pylux(p, de.DP5())),
        ("torchdiffeq dopri5", run_torchdiffeq),
        ("torchode Dopri5", lambda p: run_torchode(p, "Dopri5")),
        ("torchode Tsit5", lambda p: run_torchode(p, "Tsit5")),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, no_grad")
    with torch.no_grad():
        for key in args.problems.split(","):
            problem = makers[key]()
            problem["ref"] = reference(problem)
            tf = f_time(problem)
            print(f"\n({problem['name']}) state {tuple(problem['u0'].shape)}, t in [0, {problem['t1']}], "
                  f"tol {problem['tol']:g}; one f evaluation: {tf * 1e3:.3f} ms")
            print(f"  {'solver':<20} {'NFE':>6} {'time [ms]':>10} {'max abs err':>12} {'overhead':>9}")
            results = {}
            for name, run in contenders:
                wall, (u1, nfe) = timed(lambda: run(problem), args.repeats)
                err = (u1.double() - problem["ref"]).abs().max().item()
                results[name] = (nfe, wall, err)
                print(f"  {name:<20} {nfe:>6d} {wall * 1e3:>10.1f} {err:>12.3e} {wall / nfe / tf:>9.2f}")
            # equal-error comparison: pylux at the loosest tolerance that is as accurate as each peer
            print("  at equal error (pylux at the cheapest scanned tolerance that is as accurate):")
            scans = {name: tolerance_scan(problem, run) for name, run in contenders[:2]}
            wall_cache: dict = {}
            for peer in ("torchdiffeq dopri5", "torchode Dopri5", "torchode Tsit5"):
                nfe_p, wall_p, err_p = results[peer]
                for name, run in contenders[:2]:
                    hit = matched_error(scans[name], err_p)
                    if hit is None:
                        print(f"    vs {peer:<19} {name}: no scanned tolerance reaches {err_p:.2e}")
                        continue
                    tol, nfe, err, trial = hit
                    if (name, tol) not in wall_cache:
                        wall_cache[name, tol] = timed(lambda: run(trial), args.repeats)[0]
                    wall = wall_cache[name, tol]
                    print(f"    vs {peer:<19} ({nfe_p:>4d} NFE, {wall_p * 1e3:7.1f} ms, err {err_p:.2e}): "
                          f"{name} tol {tol:.1e}: {nfe:>4d} NFE, {wall * 1e3:7.1f} ms, err {err:.2e}")

if __name__ == "__main__":
    main()
