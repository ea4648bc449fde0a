"""One neural-ODE training step (forward + backward) for every sensealg, beside the torch peers.

The Kelly et al. (2020) MNIST neural ODE: state 784, f(z, t) = W2 tanh(W1 [z; t] + b1) + b2
(hidden 100, time concatenated), batch 512, t in [0, 1], rtol = atol = 1e-5, float32,
loss = mean(z(1)^2), gradients with respect to the four parameter tensors.

Rows: pylux DirectAdjoint, BacksolveAdjoint (± seminorm), InterpolatingAdjoint (± seminorm,
checkpointed), QuadratureAdjoint, ReversibleAdjoint (Tsit5 base, coupling 0.999), DirectAdjoint with
binomial checkpointing at 8 stored states; torchdiffeq
odeint (backprop), odeint_adjoint (± seminorm); torchode AutoDiffAdjoint and
BacksolveAdjoint. All with (Tsit5 | dopri5) at the same tolerances.

Columns: forward NFE, backward NFE (evaluations of f or of its VJP on the backward pass; for
backprop methods 0, their backward replays the stored graph), wall time of forward+backward
(median of --repeats after one warm-up), autograd memory (bytes of the distinct storages saved
for the backward pass during the forward solve, counted with torch.autograd.graph.saved_tensors_hooks:
what grows with the number of steps), peak memory of forward+backward (CPU: the profiler's
allocation events, :func:`peak_cpu_bytes`, which also sees what a backward pass holds while it
recomputes; CUDA: ``torch.cuda.max_memory_allocated``; both beyond what was live before), the ratio of wall time to
torchdiffeq's equivalent, and the gradient's relative error against DirectAdjoint at 1e-8.

Run twice: as is, and with --scale 3 (weights x3: at random initialisation the unscaled
solve takes only a few steps).

    python benchmarks/node_train_step.py [--scale 3] [--solver Tsit5|DP5] [--repeats 3] [--threads 2]
                                         [--device cpu] [--torchode-backsolve] [--diffrax] [--retain-memory]

(--diffrax needs `pip install diffrax`, which brings JAX; it is not part of the bench extra.)

Timings on a shared machine are noisy; compare numbers from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pylux as lx


def make_problem(scale: float, dtype, device, batch: int = 512, d: int = 784, hidden: int = 100):
    g = torch.Generator().manual_seed(0)
    w1 = (torch.rand(hidden, d + 1, generator=g) * 2 - 1) / (d + 1) ** 0.5 * scale
    b1 = (torch.rand(hidden, generator=g) * 2 - 1) / (d + 1) ** 0.5 * scale
    w2 = (torch.rand(d, hidden, generator=g) * 2 - 1) / hidden ** 0.5 * scale
    b2 = (torch.rand(d, generator=g) * 2 - 1) / hidden ** 0.5 * scale
    u0 = torch.rand(batch, d, generator=g)
    params = {k: v.to(dtype=dtype, device=device) for k, v in
              dict(W1=w1, b1=b1, W2=w2, b2=b2).items()}
    return params, u0.to(dtype=dtype, device=device), d


def kelly_field(d):
    def f(u, p, t):
        # [z; t] W1^T == z W1[:, :d]^T + t W1[:, d]; torchode passes one time per batch element
        t_column = t[:, None] if t.dim() == 1 else t
        pre = u @ p["W1"][:, :d].t() + t_column * p["W1"][:, d] + p["b1"]
        return torch.tanh(pre) @ p["W2"].t() + p["b2"]
    return f


class Counted:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *args):
        self.n += 1
        return self.fn(*args)


def leaf_params(params):
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


SOLVERS = {"Tsit5": lx.Tsit5, "DP5": lx.DP5}


class SolveCounted:
    """The NFE of a solve read from its own counters (forward ``sol.stats.nf``, then the backward pass's
    ``sol.backward_stats``): a compiled field cannot carry a Python counter."""

    def __init__(self):
        self.sol = None

    @property
    def n(self):
        return self.sol.stats.nf + (self.sol.backward_stats or {}).get("nf", 0)


def pylux_step(alg, tol, solver="Tsit5", controller=None, compile=False):
    """A pylux train step. ``controller`` defaults to ``IController()``, the controller every peer here
    uses (torchdiffeq's and torchode's integral control, diffrax's ``PIDController`` with its default
    pure-integral gains): pylux's default PI controller (OrdinaryDiffEq's gains) grows the step more
    slowly from the initial guess and takes 38 NFE on this 1-unit solve where integral control takes 20.
    ``compile=True`` solves with ``solve(..., compile=True)`` (the first call compiles)."""
    controller = lx.IController() if controller is None else controller

    def run(params, u0, field):
        p = leaf_params(params)
        counted = SolveCounted() if compile else Counted(field)
        f = field if compile else (lambda u, p_, t: counted(u, p_, t))
        prob = lx.ODEProblem(f, u0, (0.0, 1.0), p)
        sol = lx.solve(prob, SOLVERS[solver](), saveat=[1.0], reltol=tol, abstol=tol, sensealg=alg,
                       controller=controller, compile=compile)
        if compile:
            counted.sol = sol
        return sol.u[-1].pow(2).mean(), list(p.values()), counted
    return run


class TorchField(torch.nn.Module):
    def __init__(self, params, field, counter):
        super().__init__()
        self.p = torch.nn.ParameterDict({k: torch.nn.Parameter(v.detach().clone()) for k, v in params.items()})
        self.field, self.counter = field, counter

    def forward(self, t, y):
        self.counter.n += 1
        return self.field(y, dict(self.p), t.to(y.dtype))


def torchdiffeq_step(adjoint: bool, seminorm: bool, tol):
    import torchdiffeq

    def run(params, u0, field):
        counter = Counted(None)
        module = TorchField(params, field, counter)
        t = torch.tensor([0.0, 1.0], dtype=u0.dtype, device=u0.device)
        if adjoint:
            options = dict(norm="seminorm") if seminorm else None
            y = torchdiffeq.odeint_adjoint(module, u0, t, rtol=tol, atol=tol, method="dopri5",
                                           adjoint_options=options)
        else:
            y = torchdiffeq.odeint(module, u0, t, rtol=tol, atol=tol, method="dopri5")
        return y[-1].pow(2).mean(), [module.p[k] for k in params], counter
    return run


def torchode_step(backsolve: bool, tol):
    import torchode as to

    def run(params, u0, field):
        counter = Counted(None)
        module = TorchField(params, field, counter)
        term = to.ODETerm(module)
        step = to.Tsit5(term=term)
        controller = to.IntegralController(atol=tol, rtol=tol, term=term)
        solver = to.BacksolveAdjoint(term, step, controller) if backsolve else to.AutoDiffAdjoint(step, controller)
        t_eval = torch.tensor([0.0, 1.0], dtype=u0.dtype, device=u0.device).repeat(u0.shape[0], 1)
        sol = solver.solve(to.InitialValueProblem(y0=u0, t_eval=t_eval))
        return sol.ys[:, -1].pow(2).mean(), [module.p[k] for k in params], counter
    return run


def diffrax_rows(params, u0, d, tol, solver_name, repeats):
    """diffrax BacksolveAdjoint (± its adjoint seminorm) and RecursiveCheckpointAdjoint, jitted, in JAX."""
    import diffrax
    import jax
    import jax.numpy as jnp

    p = {k: jnp.asarray(v.detach().cpu().numpy()) for k, v in params.items()}
    y0 = jnp.asarray(u0.detach().cpu().numpy())

    def f(t, y, p):
        pre = y @ p["W1"][:, :d].T + t * p["W1"][:, d] + p["b1"]
        return jnp.tanh(pre) @ p["W2"].T + p["b2"]
    term = diffrax.ODETerm(f)
    solver = diffrax.Dopri5() if solver_name == "DP5" else diffrax.Tsit5()
    controller = diffrax.PIDController(rtol=tol, atol=tol)
    adjoints = {
        "diffrax BacksolveAdjoint": diffrax.BacksolveAdjoint(solver=solver, stepsize_controller=controller),
        "diffrax BacksolveAdjoint(seminorm)": diffrax.BacksolveAdjoint(
            solver=solver, stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol,
                                                                     norm=diffrax.adjoint_rms_seminorm)),
        "diffrax RecursiveCheckpointAdjoint": diffrax.RecursiveCheckpointAdjoint(),
    }
    out = {}
    for name, adjoint in adjoints.items():
        def loss(p, adjoint=adjoint):
            sol = diffrax.diffeqsolve(term, solver, 0.0, 1.0, None, y0, p, stepsize_controller=controller,
                                      adjoint=adjoint, saveat=diffrax.SaveAt(t1=True), max_steps=4096)
            return jnp.mean(sol.ys[-1] ** 2), sol.stats["num_steps"]
        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (_, steps), grads = step(p)
        jax.block_until_ready(grads)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(step(p))
            times.append(time.perf_counter() - start)
        # copies (np.array): JAX's buffers are read-only, which torch.from_numpy warns about
        torch_grads = [torch.from_numpy(__import__("numpy").array(grads[k])).to(u0.device) for k in params]
        out[name] = dict(grads=torch_grads, nfe_f=int(steps), nfe_b=-1, time=statistics.median(times),
                         saved=float("nan"), peak=None)
    return out


def saved_tensor_counter():
    """``(pack, unpack, total)`` for ``torch.autograd.graph.saved_tensors_hooks``: ``total[0]`` becomes the bytes
    of the distinct storages autograd saves for backward (a parameter saved by every step counts once; the
    storages are kept referenced so a freed address cannot be counted twice)."""
    seen: dict = {}
    total = [0]

    def pack(x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = storage
            total[0] += storage.nbytes()
        return x
    return pack, (lambda x: x), total


def peak_cpu_bytes(fn) -> int:
    """Peak bytes of CPU tensor memory that ``fn()`` allocates beyond what was live when it started.

    From the PyTorch profiler's memory events (``profile_memory=True``): every operator's own
    allocations minus its frees (``self_cpu_memory_usage``, so nested operators are not counted
    twice) plus the allocator events outside operators, accumulated in time order. This counts
    what autograd keeps for backward *and* what a backward pass holds while it recomputes
    (checkpoints, a step's graph, adjoint states) — the quantity the saved-tensor count misses
    for checkpointed and adjoint methods. tracemalloc cannot see it (tensor storage bypasses
    Python's allocator). The profiler slows ``fn`` down, so time it separately.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def train_step(run, params, u0, field, hooks=None):
    """Forward (under ``hooks``, if given) then backward: (grads, forward NFE, backward NFE)."""
    if hooks is not None:
        with torch.autograd.graph.saved_tensors_hooks(*hooks):
            loss, leaves, counter = run(params, u0, field)
    else:
        loss, leaves, counter = run(params, u0, field)
    forward = counter.n
    grads = torch.autograd.grad(loss, leaves)
    return grads, forward, counter.n - forward


def measure(run, params, u0, field, repeats):
    pack, unpack, total = saved_tensor_counter()
    if u0.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    live_before = torch.cuda.memory_allocated() if u0.is_cuda else 0
    grads, nfe_f, nfe_b = train_step(run, params, u0, field, hooks=(pack, unpack))
    if u0.is_cuda:
        peak = torch.cuda.max_memory_allocated() - live_before
    else:
        peak = peak_cpu_bytes(lambda: train_step(run, params, u0, field))
    times = []
    for _ in range(repeats):
        if u0.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(run, params, u0, field)
        if u0.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return dict(grads=grads, nfe_f=nfe_f, nfe_b=nfe_b, time=statistics.median(times), saved=total[0], peak=peak)


def _megabytes(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--torchode-backsolve", action="store_true",
                        help="also time torchode's BacksolveAdjoint (per-sample vmap: about a minute a step here)")
    parser.add_argument("--diffrax", action="store_true",
                        help="also time diffrax (JAX, jitted) backsolve ± seminorm and recursive checkpointing")
    parser.add_argument("--solver", default="Tsit5", choices=sorted(SOLVERS),
                        help="pylux's method (the peers use dopri5 / Tsit5 as named)")
    parser.add_argument("--retain-memory", action="store_true",
                        help="lx.retain_freed_cpu_memory() first (every row alike)")
    args = parser.parse_args()
    retained = lx.retain_freed_cpu_memory() if args.retain_memory else False
    from _timing import pin_cores
    cores = pin_cores(args.threads)  # diffrax's XLA pool would otherwise take every core of the machine
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    params, u0, d = make_problem(args.scale, torch.float32, device)
    field = kelly_field(d)
    tol = args.tol

    # reference gradient: pylux Direct at a tight tolerance, in float64
    p64 = {k: v.double() for k, v in params.items()}
    ref, _, _ = train_step(pylux_step(lx.DirectAdjoint(), 1e-8), p64, u0.double(), field)

    def pl(alg):
        return pylux_step(alg, tol, args.solver)

    rows = [
        ("pylux DirectAdjoint", pl(lx.DirectAdjoint()), "torchdiffeq odeint"),
        ("pylux BacksolveAdjoint", pl(lx.BacksolveAdjoint()), "torchdiffeq odeint_adjoint"),
        ("pylux BacksolveAdjoint(seminorm)", pl(lx.BacksolveAdjoint(seminorm=True)),
         "torchdiffeq odeint_adjoint(seminorm)"),
        ("pylux InterpolatingAdjoint", pl(lx.InterpolatingAdjoint()), "torchdiffeq odeint_adjoint"),
        ("pylux InterpolatingAdjoint(seminorm)", pl(lx.InterpolatingAdjoint(seminorm=True)),
         "torchdiffeq odeint_adjoint(seminorm)"),
        ("pylux InterpolatingAdjoint(ckpt=4)", pl(lx.InterpolatingAdjoint(checkpointing=4)),
         "torchdiffeq odeint_adjoint"),
        ("pylux QuadratureAdjoint", pl(lx.QuadratureAdjoint()), "torchdiffeq odeint_adjoint"),
        ("pylux ReversibleAdjoint", pl(lx.ReversibleAdjoint()), "torchdiffeq odeint"),
        ("pylux DirectAdjoint(checkpoints=8)", pl(lx.DirectAdjoint(checkpoints=8)), "torchdiffeq odeint"),
    ]
    if not args.skip_peers:
        rows += [
            ("torchdiffeq odeint", torchdiffeq_step(False, False, tol), None),
            ("torchdiffeq odeint_adjoint", torchdiffeq_step(True, False, tol), None),
            ("torchdiffeq odeint_adjoint(seminorm)", torchdiffeq_step(True, True, tol), None),
            ("torchode AutoDiffAdjoint", torchode_step(False, tol), None),
        ]
        if args.torchode_backsolve:
            rows.append(("torchode BacksolveAdjoint", torchode_step(True, tol), None))
    results = {}
    for name, run, _ in rows:
        results[name] = measure(run, params, u0, field, args.repeats)
    if args.diffrax:
        extra = diffrax_rows(params, u0, d, tol, args.solver, args.repeats)
        results.update(extra)
        rows += [(name, None, None) for name in extra]
    print(f"Kelly MNIST neural ODE, batch {u0.shape[0]}, float32, weights x{args.scale:g}, tol {tol:g}, "
          f"{args.threads} threads on {cores}, {args.device}; pylux rows use {args.solver}; freed CPU memory "
          f"{'retained (lx.retain_freed_cpu_memory)' if retained else 'per glibc defaults'}")
    header = (f"{'method':40s} {'fwd NFE':>8s} {'bwd NFE':>8s} {'time ms':>9s} {'vs peer':>8s} "
              f"{'saved MB':>9s} {'peak MB':>9s} {'grad rel err':>12s}")
    print(header)
    for name, _, peer in rows:
        r = results[name]
        ratio = results[peer]["time"] / r["time"] if peer in results else float("nan")
        err = max(float((g.double() - g_ref).norm() / g_ref.norm()) for g, g_ref in zip(r["grads"], ref))
        line = (f"{name:40s} {r['nfe_f']:8d} {r['nfe_b'] if r['nfe_b'] >= 0 else '-':>8} {1e3 * r['time']:9.1f} "
                f"{ratio:7.2f}x {r['saved'] / 2**20:9.1f} {_megabytes(r['peak']):>9s} {err:12.2e}")
        print(line)
    print("'vs peer' = the torchdiffeq equivalent's time / this time (> 1: pylux faster).")
    if args.diffrax:
        print("diffrax rows: 'fwd NFE' is its number of forward steps (its backward counters are not exposed).")
        for ours, theirs in (("pylux BacksolveAdjoint", "diffrax BacksolveAdjoint"),
                             ("pylux BacksolveAdjoint(seminorm)", "diffrax BacksolveAdjoint(seminorm)"),
                             ("pylux DirectAdjoint", "diffrax RecursiveCheckpointAdjoint")):
            print(f"{ours} / {theirs}: {results[ours]['time'] / results[theirs]['time']:.2f}x the time")


if __name__ == "__main__":
    main()
