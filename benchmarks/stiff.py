"""Stiff solvers: pylux Rosenbrock23, Rodas5P, Kvaerno5 and AutoSwitch against scipy's BDF, Radau and LSODA.

Problems (float64, single-threaded, forward solves under ``torch.no_grad()``):

  robertson  Robertson's chemical kinetics (Hairer & Wanner II, IV.1), t in [0, 40], u0 = (1, 0, 0),
             rtol = tol, atol = 1e-4 tol (y2 stays below 4e-5).
  vdp        Van der Pol, x'' - mu (1 - x^2) x' + x = 0, mu = 1000, u0 = (2, 0), t in [0, 1000]
             (one relaxation jump, at t ~ 807), rtol = atol = tol.
  neural     a stiff neural ODE: du/dt = -A u + W2 tanh(W1 u + b1) + b2 for a batch of 256 independent
             samples of dimension 8 (hidden width 32, random weights), A = Q diag(lambda) Q^T with
             lambda log-spaced in [1, 1000] (a fixed stiff linear part), t in [0, 1], rtol = atol = tol.

Every solver gets the exact Jacobian: pylux by autodiff (``jac_structure="batched"`` on the neural ODE: the 256
8 x 8 blocks, 256 small LUs), scipy analytically (BDF and Radau the block-diagonal neural Jacobian as a sparse
BSR matrix, LSODA the same matrix in its banded packed format: a block-diagonal matrix with 8 x 8 blocks is
banded with lband = uband = 7). The rows "pylux Rosenbrock23 + jac" and "pylux Rodas5P + jac" give pylux the same
analytic Jacobian as a torch function ``jac(u, p, t)`` (the autodiff Jacobian is half of a Rosenbrock step's
time on the textbook problems) and, the three fields being autonomous, ``tgrad = 0`` (scipy's methods never form
``f_t``; without ``tgrad`` a Rosenbrock method takes it by one more evaluation of ``f`` per Jacobian); "pylux AutoSwitch" switches between Tsit5 and Rosenbrock23,
"pylux AutoSwitch(Rodas5P)" between Tsit5 and Rodas5P. torchdiffeq has no stiff solver: its methods are
explicit Runge-Kutta and Adams-Bashforth-Moulton ('implicit_adams' corrects with a fixed-point iteration; the
fixed grid stays stable only for small h |lambda|: here it returns NaN at h = 0.5 / max(lambda) and
0.25 / max(lambda)); it gets one row on the neural ODE at h = 0.1 / max(lambda), where it converges (10^4 steps).
torchode has no implicit method at all.

Columns: accepted steps (pylux also its rejected ones), f evaluations (pylux's count includes those inside its
Jacobians: the autodiff forward pass, the difference in t for f_t; and Kvaerno5's one evaluation per step that
checks a Jacobian kept from an earlier step; scipy's nfev does not count its jac calls),
Jacobians, LU factorisations (pylux: Newton matrices formed), the median wall time over ``--repeats``
interleaved rounds (every case of a problem runs once per round, so a slow period of a shared machine hits all
alike), the error at t1 against a scipy Radau solve at rtol = 1e-12 (atol scaled as the problem's),

    error = max_i |u_i - ref_i| / (|ref_i| + atol / rtol)

(tol times the solver's own scaled error measure, so error <= tol is the target), and the ratios of time and steps to
scipy BDF at the same tolerance. The work-precision summary compares at equal error: for each error level
reached by scipy's fastest method, pylux's fastest run (any method, any tolerance) with an error no larger,
over scipy's fastest run with an error no larger; and the same levels on the work-precision curves, each method's
time at the level interpolated log-log between its two runs that bracket it (``time_at_error``).

    python benchmarks/stiff.py [--tols 1e-3,1e-5,1e-7] [--repeats 5] [--problems robertson,vdp,neural]
                               [--batch 256] [--quick] [--compile] [--methods NAME,NAME]

``--compile`` adds the four Rosenbrock rows with ``compile=True`` ("... compiled"): the whole adaptive loop —
Jacobian, factorisation, stages, error norm, controller — as one compiled graph with one synchronisation per
solve (pylux.diffeq.captured). Each loop is compiled once before the timed rounds (30-220 s per method and
problem; the tolerances are inputs of the graph, so every tolerance runs the same compiled loop); its Jacobian count
includes a fresh Jacobian for every retried step (the eager loop reuses it).

``--methods``: only the named rows (the names of the table's method column), e.g. one pylux row and the scipy rows on a
finer tolerance grid.

``--quick``: one tolerance (1e-4), one timed round, a batch of 32, VdP on [0, 300] (no jump), no torchdiffeq
row: seconds, for the tests. Timings on a shared machine are noisy; compare numbers from one run, and read
the load printed in the header.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pylux as lx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved  # noqa: E402

#: the cores the process is pinned to (set when run as a script)
CORES = "unpinned"

DT = torch.float64
REFERENCE_RTOL = 1e-12


# --- problems -------------------------------------------------------------------------------------

def robertson_problem(quick: bool = False) -> dict:
    def f(u, p, t):
        y1, y2, y3 = u[0], u[1], u[2]
        return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 * y2,
                            3e7 * y2 * y2])

    def f_np(t, u):
        y1, y2, y3 = u
        return np.array([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 * y2, 3e7 * y2 * y2])

    def jac_np(t, u):
        y1, y2, y3 = u
        return np.array([[-0.04, 1e4 * y3, 1e4 * y2], [0.04, -1e4 * y3 - 6e7 * y2, -1e4 * y2],
                         [0.0, 6e7 * y2, 0.0]])

    def jac(u, p, t):
        y2, y3 = u[1], u[2]
        zero = torch.zeros_like(y2)
        return torch.stack([torch.stack([zero - 0.04, 1e4 * y3, 1e4 * y2]),
                            torch.stack([zero + 0.04, -1e4 * y3 - 6e7 * y2, -1e4 * y2]),
                            torch.stack([zero, 6e7 * y2, zero])])
    return dict(name="robertson", f=f, p=None, u0=np.array([1.0, 0.0, 0.0]), span=(0.0, 40.0), floor=1e-4,
                f_np=f_np, jac_np=jac_np, jac=jac, batched=False)


def vdp_problem(quick: bool = False) -> dict:
    mu = 1000.0

    def f(u, p, t):
        x, y = u[0], u[1]
        return torch.stack([y, mu * (1 - x * x) * y - x])

    def f_np(t, u):
        return np.array([u[1], mu * (1 - u[0] ** 2) * u[1] - u[0]])

    def jac_np(t, u):
        return np.array([[0.0, 1.0], [-2 * mu * u[0] * u[1] - 1.0, mu * (1 - u[0] ** 2)]])

    def jac(u, p, t):
        x, y = u[0], u[1]
        return torch.stack([torch.stack([torch.zeros_like(x), torch.ones_like(x)]),
                            torch.stack([-2 * mu * x * y - 1.0, mu * (1 - x * x)])])
    return dict(name="vdp mu=1000", f=f, p=None, u0=np.array([2.0, 0.0]), span=(0.0, 300.0 if quick else 1000.0),
                floor=1.0, f_np=f_np, jac_np=jac_np, jac=jac, batched=False)


def neural_problem(quick: bool = False, batch: int = 256, d: int = 8, hidden: int = 32,
                   lam_max: float = 1e3) -> dict:
    """``du/dt = -A u + W2 tanh(W1 u + b1) + b2`` on a ``(batch, d)`` state; the float64 weights and ``A``
    come from a fixed seed (numpy arrays for scipy, torch views of the same memory for pylux)."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    A = Q @ np.diag(np.logspace(0.0, np.log10(lam_max), d)) @ Q.T
    W1 = rng.standard_normal((hidden, d)) / np.sqrt(d)
    b1 = 0.1 * rng.standard_normal(hidden)
    W2 = 2.0 * rng.standard_normal((d, hidden)) / np.sqrt(hidden)
    b2 = 0.5 * rng.standard_normal(d)
    u0 = rng.standard_normal((batch, d))
    M = -A
    Mt, W1t, W2t = (torch.from_numpy(x) for x in (M.T.copy(), W1.T.copy(), W2.T.copy()))
    b1t, b2t = torch.from_numpy(b1), torch.from_numpy(b2)

    def f(u, p, t):
        return torch.addmm(b2t, torch.tanh(torch.addmm(b1t, u, W1t)), W2t).addmm_(u, Mt)

    W1_, W2_, M_ = torch.from_numpy(W1), torch.from_numpy(W2), torch.from_numpy(M)

    def jac(u, p, t):
        """The (B, d, d) blocks M + W2 diag(1 - tanh^2) W1, as scipy's."""
        s = 1.0 - torch.tanh(torch.addmm(b1t, u, W1t)).square()
        return torch.baddbmm(M_.expand(u.shape[0], d, d), W2_ * s[:, None, :], W1_.expand(u.shape[0], hidden, d))

    n = batch * d

    def f_np(t, y):
        u = y.reshape(batch, d)
        return (u @ M.T + np.tanh(u @ W1.T + b1) @ W2.T + b2).reshape(n)

    def blocks(y):
        u = y.reshape(batch, d)
        s = 1.0 - np.tanh(u @ W1.T + b1) ** 2           # (batch, hidden)
        return M[None] + np.einsum("oh,bh,hi->boi", W2, s, W1)  # (batch, d, d)

    from scipy.sparse import bsr_matrix
    indices, indptr = np.arange(batch), np.arange(batch + 1)

    def jac_sparse(t, y):
        return bsr_matrix((blocks(y), indices, indptr), shape=(n, n))

    # LSODA's banded packed format: packed[uband + i - j, j] = J[i, j] for |i - j| <= d - 1
    rows_in_block, cols_in_block = np.meshgrid(np.arange(d), np.arange(d), indexing="ij")
    gi = (np.arange(batch)[:, None, None] * d + rows_in_block[None]).ravel()
    gj = (np.arange(batch)[:, None, None] * d + cols_in_block[None]).ravel()
    band = d - 1

    def jac_banded(t, y):
        packed = np.zeros((2 * band + 1, n))
        packed[band + gi - gj, gj] = blocks(y).ravel()
        return packed
    return dict(name=f"neural B={batch} d={d}", f=f, p=None, u0=u0, span=(0.0, 1.0), floor=1.0, f_np=f_np,
                jac=jac, jac_np=jac_sparse, jac_banded=jac_banded, band=band, batched=True, lam_max=lam_max)


# --- runners: each returns (u(t1) as a flat numpy array, counters) ---------------------------------

def run_pylux(problem, make_solver, tol, compile=False):
    u0 = torch.from_numpy(problem["u0"]).to(DT)
    prob = lx.ODEProblem(problem["f"], u0, problem["span"], problem["p"])
    with torch.no_grad():
        sol = lx.solve(prob, make_solver(), reltol=tol, abstol=tol * problem["floor"], save_everystep=False,
                       compile=compile)
    s = sol.stats
    return sol.u[-1].numpy().reshape(-1), dict(steps=s.naccept, rejected=s.nreject, nfe=s.nf,
                                               njac=getattr(s, "njac", 0), nlu=getattr(s, "nw", 0))


def run_scipy(problem, method, tol):
    from scipy.integrate import solve_ivp
    kwargs = {"jac": problem["jac_np"]}
    if method == "LSODA" and problem["batched"]:
        kwargs = {"jac": problem["jac_banded"], "lband": problem["band"], "uband": problem["band"]}
    r = solve_ivp(problem["f_np"], problem["span"], problem["u0"].reshape(-1), method=method, rtol=tol,
                  atol=tol * problem["floor"], **kwargs)
    if r.status != 0:
        raise RuntimeError(f"scipy {method} failed: {r.message}")
    return r.y[:, -1], dict(steps=r.t.size - 1, rejected=None, nfe=r.nfev, njac=r.njev, nlu=r.nlu)


def run_torchdiffeq_implicit_adams(problem, tol):
    """torchdiffeq's fixed-grid Adams-Bashforth-Moulton with its fixed-point corrector, at the step where that
    grid is stable (h = 0.1 / max(lambda)); ``tol`` is the corrector's convergence test."""
    import torchdiffeq
    count = [0]
    f, p = problem["f"], problem["p"]

    def field(t, y):
        count[0] += 1
        return f(y, p, t)
    t0, t1 = problem["span"]
    h = 0.1 / problem["lam_max"]
    u0 = torch.from_numpy(problem["u0"]).to(DT)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = torchdiffeq.odeint(field, u0, torch.tensor([t0, t1], dtype=DT), method="implicit_adams",
                               rtol=tol, atol=tol * problem["floor"], options={"step_size": h})
    steps = int(round((t1 - t0) / h))
    return y[-1].numpy().reshape(-1), dict(steps=steps, rejected=None, nfe=count[0], njac=0, nlu=0)


def reference(problem):
    from scipy.integrate import solve_ivp
    kwargs = {"jac": problem["jac_np"]}
    r = solve_ivp(problem["f_np"], problem["span"], problem["u0"].reshape(-1), method="Radau",
                  rtol=REFERENCE_RTOL, atol=REFERENCE_RTOL * problem["floor"], **kwargs)
    if r.status != 0:
        raise RuntimeError(f"reference solve failed: {r.message}")
    return r.y[:, -1]


def error(u, problem) -> float:
    ref = problem["ref"]
    return float(np.max(np.abs(u - ref) / (np.abs(ref) + problem["floor"])))


# --- the cases of one problem --------------------------------------------------------------------

def autonomous(u, p, t):
    """``tgrad`` of the three (autonomous) fields: ``df/dt = 0``."""
    return torch.zeros_like(u)


def pylux_methods(problem) -> dict:
    """pylux's rows: Jacobians by autodiff, and (``+ jac``) the Rosenbrock methods given the problem's
    Jacobian ``jac(u, p, t)``, as scipy is (the solver's own cost without the autodiff Jacobian), and
    ``tgrad = 0``."""
    structure = "batched" if problem["batched"] else "dense"
    jac = problem["jac"]
    return {
        "pylux Rosenbrock23": lambda: lx.Rosenbrock23(jac_structure=structure),
        "pylux Rodas5P": lambda: lx.Rodas5P(jac_structure=structure),
        "pylux Kvaerno5": lambda: lx.Kvaerno5(jac_structure=structure),
        "pylux AutoSwitch": lambda: lx.AutoSwitch(stiff=lx.Rosenbrock23(jac_structure=structure)),
        "pylux AutoSwitch(Rodas5P)": lambda: lx.AutoSwitch(stiff=lx.Rodas5P(jac_structure=structure)),
        "pylux Rosenbrock23 + jac": lambda: lx.Rosenbrock23(jac=jac, jac_structure=structure, tgrad=autonomous),
        "pylux Rodas5P + jac": lambda: lx.Rodas5P(jac=jac, jac_structure=structure, tgrad=autonomous),
    }


#: the rows that also run with ``compile=True`` (``--compile``)
COMPILED_ROWS = ("pylux Rosenbrock23", "pylux Rodas5P", "pylux Rosenbrock23 + jac", "pylux Rodas5P + jac")


def cases_of(problem, tols, include_peers=True, torchdiffeq=True, compiled=False) -> dict:
    cases = {}
    for tol in tols:
        for name, make in pylux_methods(problem).items():
            cases[name, tol] = lambda make=make, tol=tol: run_pylux(problem, make, tol)
            if compiled and name in COMPILED_ROWS:
                cases[f"{name} compiled", tol] = lambda make=make, tol=tol: run_pylux(problem, make, tol, True)
        if include_peers:
            for method in ("BDF", "Radau", "LSODA"):
                cases[f"scipy {method}", tol] = lambda method=method, tol=tol: run_scipy(problem, method, tol)
    if include_peers and torchdiffeq and problem["batched"]:
        tol = tols[len(tols) // 2]
        cases["torchdiffeq implicit_adams", tol] = lambda tol=tol: run_torchdiffeq_implicit_adams(problem, tol)
    return cases


def row_names(compiled: bool) -> list[str]:
    """Every row name ``--methods`` accepts (the neural problem's names: the textbook problems have the same
    rows but the torchdiffeq one)."""
    names = list(pylux_methods({"batched": True, "jac": None}))
    if compiled:
        names += [f"{name} compiled" for name in COMPILED_ROWS]
    return names + [f"scipy {m}" for m in ("BDF", "Radau", "LSODA")] + ["torchdiffeq implicit_adams"]


def problem_rows(problem, tols, repeats, include_peers=True, torchdiffeq=True, compiled=False,
                 methods=None) -> list[dict]:
    """Every case of ``problem`` at every tolerance, timed interleaved; ``methods`` (row names) keeps only those."""
    problem["ref"] = reference(problem)
    cases = cases_of(problem, tols, include_peers, torchdiffeq, compiled)
    if methods is not None:
        cases = {key: run for key, run in cases.items() if key[0] in methods}
    if compiled:  # compile each loop once before the timed rounds (the warm-up round would time it)
        for tol in tols[:1]:
            for name in COMPILED_ROWS:
                if (f"{name} compiled", tol) not in cases:
                    continue
                start = time.perf_counter()
                cases[f"{name} compiled", tol]()
                print(f"{problem['name']}: {name} compile=True, first solve (compilation) "
                      f"{time.perf_counter() - start:.1f} s", flush=True)
    results = interleaved(cases, repeats, warmup=1)
    rows = []
    for (method, tol), (ms, (u, counts)) in results.items():
        rows.append(dict(problem=problem["name"], method=method, tol=tol, ms=ms, error=error(u, problem),
                         **counts))
    for row in rows:
        bdf = [r for r in rows if r["method"] == "scipy BDF" and r["tol"] == row["tol"]]
        row["time_vs_bdf"] = row["ms"] / bdf[0]["ms"] if bdf else None
        row["steps_vs_bdf"] = ((row["steps"] + (row["rejected"] or 0)) / bdf[0]["steps"]
                               if bdf and row["method"].startswith("pylux") else None)
    return rows


def equal_error(rows) -> list[dict]:
    """For each error level of scipy's fastest method at each tolerance: the fastest pylux and scipy runs
    with an error no larger (any method, any tolerance) and their time ratio."""
    out = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        mine = [r for r in rows if r["problem"] == problem and r["method"].startswith("pylux")]
        scipy = [r for r in rows if r["problem"] == problem and r["method"].startswith("scipy")]
        for tol in dict.fromkeys(r["tol"] for r in scipy):
            best = min((r for r in scipy if r["tol"] == tol), key=lambda r: r["ms"])
            level = best["error"]
            peer = min((r for r in scipy if r["error"] <= level), key=lambda r: r["ms"])
            hits = [r for r in mine if r["error"] <= level]
            pylux = min(hits, key=lambda r: r["ms"]) if hits else None
            out.append(dict(problem=problem, level=level, scipy=peer, pylux=pylux,
                            ratio=pylux["ms"] / peer["ms"] if pylux else None))
    return out


def time_at_error(runs, level: float) -> float | None:
    """The time one method needs for an error of at most ``level``, from its runs at several tolerances
    (rows with ``error`` and ``ms``): the fastest run with an error no larger, or, between the two runs whose
    errors bracket ``level``, the log-log interpolation of time against error, whichever is less. ``None``
    when no run is that accurate. No extrapolation: at a level looser than every run, the loosest run's time
    (a bound from above)."""
    runs = sorted(runs, key=lambda r: r["error"])
    reached = [r["ms"] for r in runs if r["error"] <= level]
    if not reached:
        return None
    best = min(reached)
    for accurate, loose in zip(runs, runs[1:]):
        if accurate["error"] <= level <= loose["error"] and 0 < accurate["error"] < loose["error"]:
            w = (np.log(level) - np.log(accurate["error"])) / (np.log(loose["error"]) - np.log(accurate["error"]))
            best = min(best, float(np.exp((1 - w) * np.log(accurate["ms"]) + w * np.log(loose["ms"]))))
    return best


def interpolated_equal_error(rows) -> list[dict]:
    """:func:`equal_error` on the work-precision curves: at each level, each library's least
    :func:`time_at_error` over its methods, so that neither side gains or loses by where its tolerance
    grid happens to land."""
    out = []
    for s in equal_error(rows):
        times = {}
        for library in ("pylux", "scipy"):
            mine = [r for r in rows if r["problem"] == s["problem"] and r["method"].startswith(library)]
            by_method = {}
            for r in mine:
                by_method.setdefault(r["method"], []).append(r)
            options = [(t, m) for m, runs in by_method.items() if (t := time_at_error(runs, s["level"])) is not None]
            times[library] = min(options) if options else None
        ratio = times["pylux"][0] / times["scipy"][0] if times["pylux"] and times["scipy"] else None
        out.append(dict(problem=s["problem"], level=s["level"], pylux=times["pylux"], scipy=times["scipy"],
                        ratio=ratio))
    return out


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(rows):
    print("| problem | method | tol | steps | rejected | NFE | Jacobians | LUs | median ms | ms/step | error "
          "| time / BDF | steps / BDF |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        per_step = r["ms"] / max(r["steps"] + (r["rejected"] or 0), 1)
        print(f"| {r['problem']} | {r['method']} | {r['tol']:.0e} | {r['steps']} | {_fmt(r['rejected'], 'd')} | "
              f"{r['nfe']} | {r['njac']} | {r['nlu']} | {r['ms']:.1f} | {per_step:.3f} | {r['error']:.2e} | "
              f"{_fmt(r['time_vs_bdf'], '.2f')} | {_fmt(r['steps_vs_bdf'], '.2f')} |")


def _print_summary(title, lines):
    """One equal-error table: ``lines`` yields ``(problem, level, scipy cell, scipy ms, pylux cell, pylux ms,
    ratio)``."""
    print(f"\n{title}\n")
    print("| problem | error level | scipy fastest | ms | pylux fastest | ms | pylux / scipy |")
    print("|---|---:|---|---:|---|---:|---:|")
    for problem, level, peer, peer_ms, mine, mine_ms, ratio in lines:
        print(f"| {problem} | {level:.1e} | {peer} | {_fmt(peer_ms, '.1f')} | {mine} | {_fmt(mine_ms, '.1f')} | "
              f"{_fmt(ratio, '.2f')} |")


def print_equal_error(summary):
    def run(r):
        return f"{r['method']} @ {r['tol']:.0e} ({r['error']:.1e})"
    _print_summary("At equal error (fastest run of each library with error <= the level; level = the error of "
                   "scipy's fastest method at each tolerance):",
                   ((s["problem"], s["level"], run(s["scipy"]), s["scipy"]["ms"],
                     run(s["pylux"]) if s["pylux"] else "none reaches it", s["pylux"] and s["pylux"]["ms"], s["ratio"])
                    for s in summary))


def print_interpolated(summary):
    _print_summary("On the work-precision curves (each method's time at the level, interpolated log-log between its "
                   "two runs that bracket it; see time_at_error):",
                   ((s["problem"], s["level"], s["scipy"][1] if s["scipy"] else "-", s["scipy"] and s["scipy"][0],
                     s["pylux"][1] if s["pylux"] else "none reaches it", s["pylux"] and s["pylux"][0], s["ratio"])
                    for s in summary))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tols", default="1e-3,1e-5,1e-7")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--problems", default="robertson,vdp,neural")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one tolerance, one round, small problems")
    parser.add_argument("--compile", action="store_true",
                        help="add the Rosenbrock rows with compile=True (the whole loop as one graph; "
                             "compiling takes 30-220 s per method and problem, not timed)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated row names to run (e.g. 'pylux Rodas5P + jac compiled,scipy LSODA'); "
                             "default: every row")
    args = parser.parse_args(argv)
    methods = None
    if args.methods is not None:
        methods = set(name.strip() for name in args.methods.split(","))
        known = set(row_names(args.compile))
        if methods - known:
            parser.error(f"unknown methods {sorted(methods - known)}; choose from {sorted(known)}")
    torch.set_num_threads(args.threads)
    tols = [1e-4] if args.quick else [float(x) for x in args.tols.split(",")]
    repeats = 1 if args.quick else args.repeats
    batch = 32 if args.quick else args.batch
    makers = {"robertson": lambda: robertson_problem(args.quick), "vdp": lambda: vdp_problem(args.quick),
              "neural": lambda: neural_problem(args.quick, batch)}
    unknown = set(args.problems.split(",")) - set(makers)
    if unknown:
        parser.error(f"unknown problems {sorted(unknown)}; choose from {sorted(makers)}")
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    rows = []
    for key in args.problems.split(","):
        rows += problem_rows(makers[key](), tols, repeats, torchdiffeq=not args.quick, compiled=args.compile,
                             methods=methods)
    load_after = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) on {CORES}, float64, median of {repeats} "
          f"interleaved round(s); load average before {' '.join(load)}, after {' '.join(load_after)}\n")
    print_table(rows)
    summary = equal_error(rows)
    print_equal_error(summary)
    print_interpolated(interpolated_equal_error(rows))
    return rows, summary


if __name__ == "__main__":
    from _timing import pin_cores
    # every solver on the same cores, one row at a time; not in main(), which the tests call in-process
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument("--threads", type=int, default=1)
    CORES = pin_cores(threads.parse_known_args()[0].threads)
    main()
