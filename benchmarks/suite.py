"""The reference problems, pylux against every installed peer, in one interleaved run and one table.

Problems (float32 unless noted; the problem code is imported from the single-topic benchmarks):

* P1 spiral forward — dz/dt = (z^3) A, batch 512, t in [0, 10], tol 1e-6 (ode_solve.py):
  pylux Tsit5 eager and with ``compile=True`` (``--compile``; compiling takes seconds, not timed),
  torchdiffeq dopri5, torchode Tsit5.
* P2 Kelly MNIST field (state 784, hidden 100, batch 512, tol 1e-5; node_train_step.py, weights
  x ``--scale``): the forward solve, and forward + backward of mean(z(1)^2) for pylux DirectAdjoint,
  BacksolveAdjoint ± seminorm, InterpolatingAdjoint, ReversibleAdjoint, DirectAdjoint(checkpoints=8)
  beside torchdiffeq odeint / odeint_adjoint ± seminorm and torchode AutoDiffAdjoint; with ``--compile``
  also DirectAdjoint, BacksolveAdjoint and ReversibleAdjoint under ``compile=True``.
* P3 the floor of P2: one evaluation of f and one vector–Jacobian product of f (u and parameters).
* P4 the DEQ z = tanh(Wz + Ux + b) at tol 1e-4 (deq_solvers.py): Broyden, Anderson and
  fixed-point iteration, forward and forward + implicit backward, pylux and torchdeq.

Controllers: every adaptive row uses integral step control (torchdiffeq's and torchode's, diffrax's
default ``PIDController``; pylux ``IController()``), so NFE differences come from the methods and not
from the controllers; the "pylux Tsit5 (default PI)" row adds pylux's own default (OrdinaryDiffEq's PI
gains, slower to grow the step from the initial guess: 38 NFE against 20 on P2).

Columns: median wall time (ms) over ``--repeats`` interleaved rounds (every case of a problem runs
once per round, so a slow period of a shared machine hits all alike; P4, whose cases take milliseconds,
at least 15 rounds: with 5 its ratio moved by +-0.05 between runs), NFE (P1/P2: evaluations of f,
forward + backward; P4: iterations), the error (P1/P2 forward: max abs error of z(t1) against a
float64 torchdiffeq dopri8 solve at 1e-12; P2 gradients: relative error against pylux Direct in
float64 at 1e-8; P4: max |z - z*| against a fixed point at 1e-8), the overhead per NFE
(P1/P2 forward: time / NFE / f's time, f timed in the same rounds) and the ratio of the time to the
best peer of the same problem and mode (< 1: pylux faster). The process runs pinned to ``--threads`` cores (every library,
JAX's thread pool included, gets the same cores: XLA ignores OMP_NUM_THREADS). torchsde has no row among P1–P4 (benchmarks/sde_solve.py
compares SDE solvers). diffrax rows (jitted, float32) appear when JAX and diffrax are installed: P1/P2
forward in the round-robin, P2 forward + backward (BacksolveAdjoint ± its seminorm,
RecursiveCheckpointAdjoint) timed right after the torch rows; their NFE column gives steps.

    python benchmarks/suite.py [--repeats 3] [--threads 1] [--compile] [--scale 1] [--device cpu]
                               [--problems P1,P2,P3,P4] [--retain-memory]

``--retain-memory`` calls :func:`pylux.retain_freed_cpu_memory` first (glibc keeps freed blocks in the
process instead of faulting fresh pages in for every step's tensors); it applies to every library of the
run alike.

Timings on a shared machine are noisy; compare numbers from the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import node_train_step as nts  # noqa: E402
import ode_solve  # noqa: E402

import pylux as lx  # noqa: E402
import pylux.diffeq as de  # noqa: E402


def interleaved(cases: dict, repeats: int) -> dict:
    """``{name: (median ms, last output)}`` with the cases run round-robin (deq_solvers.timed); on CUDA each
    case ends with a synchronisation so that its time includes its kernels."""
    from deq_solvers import timed
    if torch.cuda.is_available() and torch.get_default_device().type == "cuda":
        cases = {name: (lambda fn=fn: _synchronized(fn)) for name, fn in cases.items()}
    return timed(cases, repeats)


def _synchronized(fn):
    out = fn()
    torch.cuda.synchronize()
    return out


def spiral(device):
    """P1: ode_solve's spiral (same u0, same matrix) on ``device``."""
    problem = ode_solve.spiral_problem(torch.float32)
    A = torch.tensor(lx.data.SPIRAL_ODE_MATRIX, dtype=torch.float32, device=device)
    problem.update(u0=problem["u0"].to(device), field=lambda u, t: (u ** 3) @ A.to(u.dtype),
                   field64=lambda u, t: (u ** 3) @ A.double())
    if have_diffrax():
        import jax.numpy as jnp
        A_jax = jnp.asarray(lx.data.SPIRAL_ODE_MATRIX, dtype=jnp.float32)
        problem["jax_field"] = lambda t, y, args: (y ** 3) @ A_jax
    return problem


def kelly(scale, device):
    """P2 forward: node_train_step's Kelly field and batch on ``device``."""
    params, u0, d = nts.make_problem(scale, torch.float32, device)
    f = nts.kelly_field(d)
    p64 = {k: v.double() for k, v in params.items()}
    problem = dict(name="kelly", u0=u0, t1=1.0, tol=1e-5, field=lambda u, t: f(u, params, t),
                   field64=lambda u, t: f(u, p64, t))
    if have_diffrax():
        import jax.numpy as jnp
        pj = {k: jnp.asarray(v.detach().cpu().numpy()) for k, v in params.items()}

        def jax_field(t, y, args):
            pre = y @ pj["W1"][:, :d].T + t * pj["W1"][:, d] + pj["b1"]
            return jnp.tanh(pre) @ pj["W2"].T + pj["b2"]
        problem["jax_field"] = jax_field
    return problem


def reference(problem):
    """z(t1) of the float64 field by torchdiffeq's dopri8 at rtol = atol = 1e-12."""
    import torchdiffeq
    t = torch.tensor([0.0, problem["t1"]], dtype=torch.float64, device=problem["u0"].device)
    with torch.no_grad():
        return torchdiffeq.odeint(lambda t, y: problem["field64"](y, t), problem["u0"].double(), t,
                                  method="dopri8", rtol=1e-12, atol=1e-12)[-1]


def pylux_forward(problem, solver, compile=False, controller=None, tstops=None):
    """(z(t1), NFE) of a pylux forward solve; the NFE from pylux's own counter (a Python counter inside a
    compiled field would be a guard that recompiles every step). ``controller`` defaults to
    ``IController()``, the integral control every peer row uses; the "default PI" row shows pylux's own
    default (OrdinaryDiffEq's PI gains)."""
    controller = de.IController() if controller is None else controller
    if "pylux_f" not in problem:
        field = problem["field"]
        problem["pylux_f"] = lambda u, p, t: field(u, t)
    prob = de.ODEProblem(problem["pylux_f"], problem["u0"], (0.0, problem["t1"]))
    sol = de.solve(prob, solver, reltol=problem["tol"], abstol=problem["tol"], saveat=[problem["t1"]],
                   compile=compile, controller=controller, tstops=tstops)
    return sol.u[-1], sol.stats.nf


def have_diffrax() -> bool:
    try:
        import diffrax  # noqa: F401 (availability check)
        import jax  # noqa: F401
    except ImportError:
        return False
    return True


def diffrax_forward(problem):
    """A jitted diffrax Tsit5 solve of ``problem["jax_field"]`` (the same field in JAX) with diffrax's default
    ``PIDController`` (integral control); its output reads as torch through :func:`diffrax_output`."""
    import diffrax
    import jax
    import jax.numpy as jnp

    y0 = jnp.asarray(problem["u0"].detach().cpu().numpy())
    term = diffrax.ODETerm(problem["jax_field"])
    controller = diffrax.PIDController(rtol=problem["tol"], atol=problem["tol"])

    @jax.jit
    def run(y0):
        sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, problem["t1"], None, y0, None,
                                  stepsize_controller=controller, saveat=diffrax.SaveAt(t1=True), max_steps=100000)
        return sol.ys[-1], sol.stats["num_steps"]

    def call():  # the JAX results as they are: their conversion to torch is not diffrax's time
        return jax.block_until_ready(run(y0))
    call()  # compile outside the timing
    return call


def diffrax_output(out, device):
    """``(z(t1), NFE)`` of :func:`diffrax_forward`'s call as torch on ``device``: FSAL Tsit5 takes 6 new
    evaluations per step, plus f(t0) and the one evaluation of the initial-step heuristic."""
    import numpy as np
    y1, steps = out
    return torch.from_numpy(np.array(y1)).to(device), 6 * int(steps) + 2  # a copy: JAX's buffer is read-only


#: the case of the f floor among the forward solves, and its evaluations per round
F_FLOOR, F_FLOOR_CALLS = "f floor", 10


def forward_rows(key, problem, repeats, compile: bool):
    """P1/P2 forward: every library's solve, timed interleaved, with error and overhead per NFE. The f floor
    (the time of one f) is timed in the same rounds as the solves: timed apart, a slow period of a shared
    machine moved the overhead column by +-40 % (P2 compile=True 0.96 in one run, 1.4 against P3's f)."""
    problem["ref"] = reference(problem)
    t0 = torch.zeros(())

    def f_floor():  # F_FLOOR_CALLS evaluations of f per round, in the same rounds as the solves
        for _ in range(F_FLOOR_CALLS):
            out = problem["field"](problem["u0"], t0)
        return out
    cases = {F_FLOOR: f_floor,
             "pylux Tsit5": lambda: pylux_forward(problem, de.Tsit5()),
             "pylux Tsit5 (default PI)": lambda: pylux_forward(problem, de.Tsit5(),
                                                               controller=de.Tsit5().default_controller()),
             "torchdiffeq dopri5": lambda: ode_solve.run_torchdiffeq(problem),
             "torchode Tsit5": lambda: ode_solve.run_torchode(problem, "Tsit5")}
    if compile:
        start = time.perf_counter()
        with torch.no_grad():
            pylux_forward(problem, de.Tsit5(), compile=True)
        print(f"{key}: compile=True first solve (compilation) {time.perf_counter() - start:.1f} s")
        cases["pylux Tsit5 compile=True"] = lambda: pylux_forward(problem, de.Tsit5(), compile=True)
        # a tstop keeps the step-by-step loop (one compiled step per launch; CUDA graphs on CUDA) instead
        # of the whole loop in one graph: which of the two compiled paths is faster on this device
        midway = (problem["t1"] / 2,)
        start = time.perf_counter()
        with torch.no_grad():
            pylux_forward(problem, de.Tsit5(), compile=True, tstops=midway)
        print(f"{key}: compile=True per step, first solve (compilation) {time.perf_counter() - start:.1f} s")
        cases["pylux Tsit5 compile=True per step (tstop t1/2)"] = lambda: pylux_forward(
            problem, de.Tsit5(), compile=True, tstops=midway)
    if have_diffrax():
        cases["diffrax Tsit5 (jit)"] = diffrax_forward(problem)
    with torch.no_grad():
        results = interleaved(cases, repeats)
    f_ms = results.pop(F_FLOOR)[0] / F_FLOOR_CALLS
    rows = []
    for name, (ms, out) in results.items():
        u1, nfe = diffrax_output(out, problem["u0"].device) if name.startswith("diffrax") else out
        err = (u1.double() - problem["ref"]).abs().max().item()
        rows.append(dict(problem=key, mode="forward", method=name, ms=ms, nfe=nfe, error=err,
                         overhead=ms / nfe / f_ms))
    return rows


def training_rows(inputs, tol, repeats, compile=False):
    """P2 forward + backward of every sensealg and peer (node_train_step's runners) on
    ``inputs = nts.make_problem(...)``; with ``compile``, also pylux Direct, Backsolve and Reversible with
    ``compile=True`` (compiled before the timing)."""
    params, u0, d = inputs
    field = nts.kelly_field(d)
    p64 = {k: v.double() for k, v in params.items()}
    ref, _, _ = nts.train_step(nts.pylux_step(lx.DirectAdjoint(), 1e-8), p64, u0.double(), field)
    compiled = {}
    if compile:
        for name, alg in (("pylux DirectAdjoint compile=True", lx.DirectAdjoint()),
                          ("pylux BacksolveAdjoint compile=True", lx.BacksolveAdjoint()),
                          ("pylux ReversibleAdjoint compile=True", lx.ReversibleAdjoint())):
            compiled[name] = nts.pylux_step(alg, tol, compile=True)
            start = time.perf_counter()
            nts.train_step(compiled[name], params, u0, field)
            print(f"P2 {name}: first step (compilation) {time.perf_counter() - start:.1f} s")
    runs = {
        "pylux DirectAdjoint": nts.pylux_step(lx.DirectAdjoint(), tol),
        "pylux DirectAdjoint(checkpoints=8)": nts.pylux_step(lx.DirectAdjoint(checkpoints=8), tol),
        "pylux BacksolveAdjoint": nts.pylux_step(lx.BacksolveAdjoint(), tol),
        "pylux BacksolveAdjoint(seminorm)": nts.pylux_step(lx.BacksolveAdjoint(seminorm=True), tol),
        "pylux InterpolatingAdjoint": nts.pylux_step(lx.InterpolatingAdjoint(), tol),
        "pylux ReversibleAdjoint": nts.pylux_step(lx.ReversibleAdjoint(), tol),
        "torchdiffeq odeint": nts.torchdiffeq_step(False, False, tol),
        "torchdiffeq odeint_adjoint": nts.torchdiffeq_step(True, False, tol),
        "torchdiffeq odeint_adjoint(seminorm)": nts.torchdiffeq_step(True, True, tol),
        "torchode AutoDiffAdjoint": nts.torchode_step(False, tol),
        **compiled,
    }
    modes = {"pylux DirectAdjoint": "backprop", "pylux DirectAdjoint(checkpoints=8)": "backprop",
             "torchdiffeq odeint": "backprop", "torchode AutoDiffAdjoint": "backprop",
             "pylux ReversibleAdjoint": "backprop",
             "pylux BacksolveAdjoint": "backsolve", "torchdiffeq odeint_adjoint": "backsolve",
             "pylux InterpolatingAdjoint": "backsolve",
             "pylux BacksolveAdjoint(seminorm)": "backsolve seminorm",
             "pylux DirectAdjoint compile=True": "backprop", "pylux BacksolveAdjoint compile=True": "backsolve",
             "pylux ReversibleAdjoint compile=True": "backprop",
             "torchdiffeq odeint_adjoint(seminorm)": "backsolve seminorm"}
    cases = {name: (lambda run=run: nts.train_step(run, params, u0, field)) for name, run in runs.items()}
    results = interleaved(cases, repeats)
    rows = []
    for name, (ms, (grads, nfe_f, nfe_b)) in results.items():
        err = max(float((g.double() - g_ref).norm() / g_ref.norm()) for g, g_ref in zip(grads, ref))
        rows.append(dict(problem="P2", mode=f"fwd+bwd {modes[name]}", method=name, ms=ms,
                         nfe=f"{nfe_f}+{nfe_b}", error=err, overhead=None))
    if have_diffrax():  # jitted JAX steps cannot join the torch round-robin: timed on their own, right after
        diffrax_modes = {"diffrax BacksolveAdjoint": "backsolve", "diffrax BacksolveAdjoint(seminorm)":
                         "backsolve seminorm", "diffrax RecursiveCheckpointAdjoint": "backprop"}
        for name, out in nts.diffrax_rows(params, u0, d, tol, "Tsit5", max(repeats, 3)).items():
            err = max(float((g.double() - g_ref).norm() / g_ref.norm()) for g, g_ref in zip(out["grads"], ref))
            rows.append(dict(problem="P2", mode=f"fwd+bwd {diffrax_modes[name]}", method=name, ms=out["time"] * 1e3,
                             nfe=f"{out['nfe_f']} steps", error=err, overhead=None))
    return rows


def floor_rows(params, u0, field, repeats):
    """P3: one f and one VJP of f (with respect to the state and the four parameter tensors)."""
    t = torch.zeros((), dtype=u0.dtype)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    u = u0.detach().requires_grad_(True)
    cotangent = torch.ones_like(u0)

    def vjp():
        out = field(u, leaves, t)
        return torch.autograd.grad(out, [u, *leaves.values()], cotangent)
    cases = {"f": lambda: field(u0, params, t), "VJP of f": vjp}
    results = interleaved(cases, max(repeats, 10))
    return [dict(problem="P3", mode="floor", method=f"{name} (Kelly field)", ms=ms, nfe=1, error=None,
                 overhead=None) for name, (ms, _) in results.items()]


def deq_rows(repeats):
    """P4: the DEQ solvers of deq_solvers.py, forward and forward + backward, pylux and torchdeq."""
    import deq_solvers as dq
    import pylux.nonlinear as nl

    W, U, b, x = dq.make_problem()
    params = (W, U, b)
    g = dq.cell(W, U, b, x)
    z0 = torch.zeros(dq.BATCH, dq.STATE)
    with torch.no_grad():  # the fixed point in float64 (float32 cannot resolve a residual of 1e-8)
        g64 = dq.cell(W.double(), U.double(), b.double(), x.double())
        z_ref = nl.nlsolve(g64, z0.double(), nl.Anderson(memory=6), abstol=1e-10, reltol=0.0, maxiters=500,
                           record_history=False).z
    cases = {}
    for name in ("broyden", "anderson", "fixed_point"):
        cases[("pylux", name, "forward")] = lambda name=name: dq.pylux_forward(name, g, z0)
        cases[("torchdeq", name, "forward")] = lambda name=name: dq.torchdeq_forward(name, g, z0)
        cases[("pylux", name, "fwd+bwd")] = lambda name=name: dq.pylux_fwd_bwd(name, params, x, z0)
        cases[("torchdeq", name, "fwd+bwd")] = lambda name=name: dq.torchdeq_fwd_bwd(name, params, x, z0)
    results = interleaved(cases, repeats)
    rows = []
    for (lib, name, mode), (ms, out) in results.items():
        error = (out[0].double() - z_ref).abs().max().item() if mode == "forward" else None
        rows.append(dict(problem="P4", mode=mode, method=f"{lib} {name}", ms=ms, nfe=out[1], error=error,
                         overhead=None, group=(mode, name)))
    return rows


def add_ratios(rows):
    """Each row's time over the best peer (non-pylux) time of the same problem and mode (P4: and solver)."""
    for row in rows:
        group = row.get("group", row["mode"])
        peers = [r["ms"] for r in rows if r["problem"] == row["problem"] and r.get("group", r["mode"]) == group
                 and not r["method"].startswith("pylux")]
        row["ratio"] = row["ms"] / min(peers) if peers and row["method"].startswith("pylux") else None
    for row in rows:  # P4: pylux's fastest against torchdeq's fastest
        if row["problem"] == "P4" and row["method"].startswith("pylux"):
            same = [r for r in rows if r["problem"] == "P4" and r["mode"] == row["mode"]]
            row["fastest_vs_fastest"] = (min(r["ms"] for r in same if r["method"].startswith("pylux"))
                                         / min(r["ms"] for r in same if r["method"].startswith("torchdeq")))


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(rows):
    print("| problem | mode | method | median ms | NFE | error | overhead/NFE | vs best peer |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['problem']} | {r['mode']} | {r['method']} | {r['ms']:.1f} | {r['nfe']} | "
              f"{_fmt(r['error'], '.2e')} | {_fmt(r['overhead'], '.2f')} | {_fmt(r.get('ratio'), '.2f')} |")
    fastest = {r["mode"]: r["fastest_vs_fastest"] for r in rows if "fastest_vs_fastest" in r}
    for mode, ratio in fastest.items():
        print(f"P4 {mode}: pylux's fastest solver / torchdeq's fastest = {ratio:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="P2 weights x scale (3: a harder field)")
    parser.add_argument("--compile", action="store_true", help="add the P1/P2 forward and P2 Direct/Backsolve/Reversible rows with compile=True")
    parser.add_argument("--problems", default="P1,P2,P3,P4")
    parser.add_argument("--retain-memory", action="store_true",
                        help="lx.retain_freed_cpu_memory() first: freed CPU tensors stay in the process (every library "
                             "of the run alike); without it glibc's defaults fault fresh pages in every step")
    args = parser.parse_args()
    retained = lx.retain_freed_cpu_memory() if args.retain_memory else False
    from _timing import pin_cores
    cores = pin_cores(args.threads)  # diffrax's XLA pool would otherwise take every core of the machine
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*below what torch.float32 arithmetic can resolve")
    device = torch.device(args.device)
    wanted = set(args.problems.split(","))
    rows = []
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) on {cores}, {args.device}, float32, "
              f"median of {args.repeats} interleaved rounds; P2 weights x{args.scale:g}; "
              f"freed CPU memory {'retained (lx.retain_freed_cpu_memory)' if retained else 'per glibc defaults'}")
    print(header, flush=True)  # also first: a run stopped at a time limit keeps it with the tables it printed
    failed = []

    def part(name, make_rows):
        """One problem's rows, printed as soon as they are measured (a run stopped at a time limit keeps
        what it finished); a problem that raises is reported with its traceback and the others still run."""
        try:
            new_rows = make_rows()
        except Exception:  # noqa: BLE001 - a benchmark run reports every problem it can
            import traceback
            print(f"{name} failed:\n{traceback.format_exc()}", flush=True)
            failed.append(name)
            return
        rows.extend(new_rows)
        add_ratios(rows)
        print(f"{name} done", flush=True)
        print_table(new_rows)

    # the peers' runners make their time tensors with torch.tensor(...) on the default device; the problems
    # are built with the CPU as the default (their generators live there) and moved to ``device``
    torch.set_default_device(device)
    if "P1" in wanted:
        part("P1", lambda: forward_rows("P1", built_on_cpu(spiral, device), args.repeats, args.compile))
    if "P2" in wanted:
        part("P2 forward", lambda: forward_rows("P2", built_on_cpu(kelly, args.scale, device), args.repeats,
                                                args.compile))
        part("P2 training", lambda: training_rows(built_on_cpu(nts.make_problem, args.scale, torch.float32, device),
                                                  1e-5, args.repeats, args.compile))
    if "P3" in wanted:
        part("P3", lambda: floor_rows(*training_inputs(args, device), args.repeats))
    if "P4" in wanted:
        torch.set_default_device("cpu")  # deq_solvers builds its problem on the CPU
        part("P4 (on the CPU)" if device.type != "cpu" else "P4",
             lambda: deq_rows(max(args.repeats, 15)))  # P4 cases take milliseconds: enough rounds for a stable median
    add_ratios(rows)
    print(header)
    print_table(rows)
    if failed:
        print(f"failed: {', '.join(failed)}")
        sys.exit(1)


def built_on_cpu(make, *args):
    """``make(*args)`` with the CPU as torch's default device (the problems draw from CPU generators)."""
    with torch.device("cpu"):
        return make(*args)


def training_inputs(args, device):
    """P3's inputs: the Kelly parameters, batch and field of the P2 training rows."""
    params, u0, d = built_on_cpu(nts.make_problem, args.scale, torch.float32, device)
    return params, u0, nts.kelly_field(d)


if __name__ == "__main__":
    main()
