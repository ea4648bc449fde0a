"""Neural SDE solves, forward and forward+backward: pylux against torchsde on the same Brownian path.

The problem (float32 by default, t in [0, 1], one fixed step size dt = 1/64 unless --dt):

    dz = f(z) dt + g(z) dW      (Itô rows)  or  dz = f(z) dt + g(z) o dW   (Stratonovich rows)
    f(z)   = W2 tanh(W1 z + b1) + b2                                 (hidden 64, --hidden)
    g(z)_i = sigma * sigmoid(sum_k G2_ik tanh(G1_ik z_i + c1_ik) + c2_i)   (per entry, hidden 8, sigma 1)

state 32 (--dim), batch 512 (--batch), diagonal noise: one Brownian motion per entry,
z0 ~ N(0, 1). The diffusion is an MLP applied to each entry on its own (the weights differ per
entry), so g_i depends on z_i only. That is what both libraries' "diagonal noise" assumes for
Milstein, SRK (SRI) and their Itô adjoints (the noise is then commutative): with an MLP of the
whole state the g g' terms they use would be the wrong ones and every higher-order method would
drop to strong order 0.5.

One Brownian path for everything: a pylux BrownianTree of shape (batch, dim) with space-time
Lévy area (the SRK methods need it; the area changes how the tree splits, so every row uses this
one tree), tol = 2^-14 (--tree-depth). pylux gets it as SDEProblem(brownian=...); torchsde gets
it through a torchsde.BaseBrownian subclass whose __call__(ta, tb, return_U) returns
W.increment(ta, tb) and, for return_U, U = h (dH + dW/2) = int_ta^tb (W_r - W_ta) dr
(torchsde's convention, from its BrownianInterval), with levy_area_approximation "space-time".
Both see the same increments, so strong errors and gradients are comparable entry by entry. By
default a shared memo sits in front of the tree: each increment is computed once (in the
warm-up) and then handed to both libraries, so the timings are of the solvers and the
networks, not of the tree; the header prints what the tree costs per fixed-step solve.
--no-path-cache queries the live tree every time.

Reference: pylux SRIW1 (strong order 1.5) with a fixed step of 2^-10 (--ref-log2), in float64,
on a float64 twin of the tree (same seed; BrownianTree draws the same normals for either dtype,
so it is the same path to float32 rounding). The Stratonovich reference integrates the
equivalent Itô SDE, drift f + g g'/2 with g' = dg_i/dz_i in closed form. The header prints the
distance between the reference at 2^-(ref-log2) and at half as many steps, an upper estimate of
the reference's own error (it should sit well below the smallest strong error in the table).

Rows (same scheme in both libraries unless noted):
  Euler-Maruyama     Itô            pylux EulerMaruyama()            torchsde "euler"
  Milstein           Itô            pylux Milstein() (derivative-free: g(z + f h + g sqrt h))
                                    torchsde "milstein", options grad_free=True (the same formula)
  Heun               Stratonovich   pylux EulerHeun() (predictor z + f h + g dW, trapezoidal
                                    corrector)                       torchsde "heun" (the same)
  reversible Heun    Stratonovich   pylux ReversibleHeun()           torchsde "reversible_heun"
  SRK (fixed)        Itô            pylux SRIW1(), SOSRI() with adaptive=False
                                    torchsde "srk": Rößler's SRI2 tableau, a different 4-stage
                                    SRI method of the same order, and its step re-evaluates
                                    every earlier stage's f and g (10 + 10 evaluations a step)
  SRK adaptive       Itô            pylux SOSRI(), SRIW1() at reltol = abstol = --tol (1e-3),
                                    embedded error estimate (Rackauckas & Nie 2017), PI control
                                    torchsde "srk", adaptive=True, rtol = atol = --tol: step
                                    doubling (one full step + two half steps per attempt), its
                                    own step-size rule; both start from dt0 = --dt

Columns: steps (accepted, /rejected for pylux's adaptive solves; torchsde's adaptive solver
exposes only attempts, each three SRK steps), evaluations of f and g in the forward solve (every
call on the whole batch, counted by wrappers; torchsde's include the one f and one g call of
its shape checks), forward wall time (under torch.no_grad(), leaf
parameters), forward+backward wall time (loss = mean(z(1)^2), torch.autograd.grad w.r.t. all
eight parameter tensors), the ratio pylux time / torchsde time of the pair (< 1: pylux faster),
evaluations of f and g during the backward pass, strong error mean |z(1) - z_ref(1)| over all
batch x dim entries, max |z(1)_torchsde - z(1)_pylux| for the pair (rounding level when the
scheme is the same: evidence that both ran on the same path), and the gradient's relative
difference (max over tensors of ||g - g0|| / ||g0||) to pylux's pathwise backprop through the
row's scheme (SRK rows: through SRIW1 / SOSRI).

Gradient rows (forward+backward only):
  pylux BacksolveAdjoint()  the stochastic adjoint of Li et al. (2020): z and the adjoints are
      integrated backward in Stratonovich form (Itô problems converted, f - g g'/2, the
      correction differentiated by double backward) with EulerHeun (ReversibleHeun when that was
      the forward solver) at the forward step size;
  torchsde sdeint_adjoint   the same stochastic adjoint, integrated backward in the problem's own
      interpretation (an Itô problem's adjoint is an Itô SDE with torchsde's correction terms),
      with the adjoint_method named in the row: the forward method where torchsde allows it
      ("euler", "milstein" with grad_free=False, which adjoints require, "heun",
      "adjoint_reversible_heun"); "srk" cannot integrate adjoint SDEs, so the SRK row uses
      torchsde's default for Itô diagonal noise, "milstein";
  pylux ReversibleAdjoint() with ReversibleHeun()  exact gradients of the discrete reversible
      Heun solve by closed-form reconstruction (Kidger et al. 2021), torchsde's
      "adjoint_reversible_heun" being the same algorithm.
  A pylux sensealg that refuses SDEs prints "not available".
The continuous adjoints give the gradient of the SDE up to their backward solve's error, not
the gradient of the discrete forward solve; their "grad vs bp" is that gap.

    python benchmarks/sde_solve.py [--repeats 3] [--threads 2] [--dt 0.015625] [--tol 1e-3]
                                   [--dim 32] [--batch 512] [--dtype float32] [--device cpu]
                                   [--ref-log2 10] [--tree-depth 14] [--no-path-cache]
                                   [--groups em,milstein,heun,revheun,srk,adaptive] [--no-adjoint]

Needs torchsde (in the bench extra). A full run takes about 2 minutes on 2 otherwise idle CPU
cores (about 35 s of it the float64 references). When other jobs compete for the cores, two
threads oversubscribe them and a run can take many times longer: use --threads 1 there.
Timings on a shared machine are noisy; compare numbers from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import OrderedDict

import torch

import pylux as lx

# --- the model ------------------------------------------------------------------------------------


def make_params(dim: int, hidden: int, g_hidden: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, fan_in):
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) / fan_in ** 0.5

    return dict(W1=uniform((hidden, dim), dim), b1=uniform((hidden,), dim),
                W2=uniform((dim, hidden), hidden), b2=uniform((dim,), hidden),
                G1=uniform((dim, g_hidden), 1), c1=uniform((dim, g_hidden), 1),
                G2=uniform((dim, g_hidden), g_hidden), c2=uniform((dim,), g_hidden))


def drift(z, p):
    return torch.addmm(p["b2"], torch.tanh(torch.addmm(p["b1"], z, p["W1"].t())), p["W2"].t())


def diffusion_pre(z, p):
    h = torch.tanh(torch.addcmul(p["c1"], z.unsqueeze(-1), p["G1"]))   # (batch, dim, g_hidden): entry i sees z_i
    return h, torch.einsum("bik,ik->bi", h, p["G2"]) + p["c2"]


def make_diffusion(sigma: float):
    def diffusion(z, p):
        return sigma * torch.sigmoid(diffusion_pre(z, p)[1])
    return diffusion


def make_strat_as_ito_drift(sigma: float):
    """``f + g g'/2``: the drift of the Itô SDE whose solution is the Stratonovich one (g_i of z_i only)."""
    def f_ito(z, p):
        h, pre = diffusion_pre(z, p)
        s = torch.sigmoid(pre)
        g = sigma * s
        dg = sigma * s * (1 - s) * torch.einsum("bik,ik->bi", 1 - h * h, p["G1"] * p["G2"])
        return drift(z, p) + 0.5 * g * dg
    return f_ito


class Counter:
    def __init__(self):
        self.nf = self.ng = 0

    def reset(self):
        self.nf = self.ng = 0


# --- the shared Brownian path ---------------------------------------------------------------------


class MemoPath:
    """``increment(s, t[, levy_area])`` of a BrownianTree, each (s, t) computed once (LRU, bounded)."""

    def __init__(self, tree, enabled: bool, size: int = 4096):
        self.tree, self.enabled, self.size = tree, enabled, size
        self.memo: OrderedDict = OrderedDict()
        self.levy_area = tree.levy_area
        self.shape, self.dtype, self.device = tree.shape, tree.dtype, tree.device

    def increment(self, s, t, levy_area: bool = False):
        if not self.enabled:
            return self.tree.increment(s, t, levy_area=levy_area) if levy_area else self.tree.increment(s, t)
        key = (float(s), float(t), bool(levy_area))
        hit = self.memo.get(key)
        if hit is None:
            hit = self.tree.increment(s, t, levy_area=True) if levy_area else self.tree.increment(s, t)
            self.memo[key] = hit
            if len(self.memo) > self.size:
                self.memo.popitem(last=False)
        else:
            self.memo.move_to_end(key)
        return hit


def torchsde_brownian(path):
    """``path`` as a torchsde Brownian motion (the protocol of torchsde.BaseBrownian / BrownianInterval)."""
    import torchsde

    class PyluxBrownian(torchsde.BaseBrownian):
        def __init__(self, path):
            super().__init__()
            self.path = path

        def __call__(self, ta, tb=None, return_U=False, return_A=False):
            if return_A:
                raise ValueError("this path carries space-time Lévy area only (no Lévy area A)")
            if tb is None:
                ta, tb = self.path.tree.t0, ta
            ta, tb = float(ta), float(tb)
            if not return_U:
                return self.path.increment(ta, tb)
            dW, dH = self.path.increment(ta, tb, levy_area=True)
            return dW, (tb - ta) * (dH + 0.5 * dW)

        def __repr__(self):
            return f"PyluxBrownian({self.path.tree!r})"

        @property
        def dtype(self):
            return self.path.dtype

        @property
        def device(self):
            return self.path.device

        @property
        def shape(self):
            return self.path.shape

        @property
        def levy_area_approximation(self):
            return "space-time" if self.path.levy_area == "space-time" else "none"

    return PyluxBrownian(path)


# --- runners: (params, grad) -> (z1, leaves, counter, steps) ---------------------------------------


def leaf_params(params, grad: bool):
    return {k: v.detach().clone().requires_grad_(grad) for k, v in params.items()}


def pylux_runner(make_solver, interpretation, env, sensealg=None, adaptive=False):
    def run(params, grad):
        counter = Counter()
        f, g = env["f"], env["g"]

        def f_counted(u, p, t):
            counter.nf += 1
            return f(u, p)

        def g_counted(u, p, t):
            counter.ng += 1
            return g(u, p)

        p = leaf_params(params, grad)
        prob = lx.SDEProblem(f_counted, g_counted, env["u0"], (0.0, 1.0), p, noise="diagonal",
                             interpretation=interpretation, brownian=env["path"])
        if adaptive:
            kw = dict(dt=env["dt"], reltol=env["tol"], abstol=env["tol"])
        else:
            kw = dict(dt=env["dt"], adaptive=False)
        sol = lx.solve(prob, make_solver(), saveat=[1.0], sensealg=sensealg, **kw)
        steps = f"{sol.stats.naccept}/{sol.stats.nreject}" if adaptive else f"{sol.stats.naccept}"
        return sol.u[-1], list(p.values()), counter, steps
    return run


def torchsde_runner(method, sde_type, env, adjoint_method=None, adaptive=False, options=None,
                    adjoint_options=None, f_per_step=1):
    import torchsde

    class SDE(torch.nn.Module):
        noise_type = "diagonal"

        def __init__(self, params, counter):
            super().__init__()
            self.sde_type = sde_type
            self.p = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in params.items()})
            self.counter = counter

        def f(self, t, y):
            self.counter.nf += 1
            return env["f"](y, self.p)

        def g(self, t, y):
            self.counter.ng += 1
            return env["g"](y, self.p)

    def run(params, grad):
        counter = Counter()
        sde = SDE(leaf_params(params, grad), counter)
        u0 = env["u0"]
        ts = torch.tensor([0.0, 1.0], dtype=u0.dtype, device=u0.device)
        kw = dict(method=method, dt=env["dt"], adaptive=adaptive, options=dict(options or {}))
        if adaptive:
            kw.update(rtol=env["tol"], atol=env["tol"])
        if adjoint_method is None:
            ys = torchsde.sdeint(sde, u0, ts, bm=env["bm"], **kw)
        else:
            ys = torchsde.sdeint_adjoint(sde, u0, ts, bm=env["bm"], adjoint_method=adjoint_method,
                                         adjoint_options=dict(adjoint_options or {}), **kw)
        if adaptive:
            steps = f"{counter.nf // (3 * f_per_step)} att"
        else:
            steps = f"{round(1.0 / env['dt'])}"
        return ys[-1], [sde.p[k] for k in params], counter, steps
    return run


# --- measurement ----------------------------------------------------------------------------------


def timed(fn, repeats):
    out = fn()  # warm-up (fills the path memo)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def measure(run, params, repeats, forward: bool, sync):
    result = {}
    if forward:
        def fwd():
            with torch.no_grad():
                z1, _, counter, steps = run(params, False)
            sync()
            return z1, counter, steps
        result["fwd"], (z1, counter, steps) = timed(fwd, repeats)
        result.update(z1=z1.detach(), nf=counter.nf, ng=counter.ng, steps=steps)

    def step():
        z1, leaves, counter, steps = run(params, True)
        nf, ng = counter.nf, counter.ng
        grads = torch.autograd.grad(z1.pow(2).mean(), leaves)
        sync()
        return z1.detach(), grads, (nf, ng, counter.nf - nf, counter.ng - ng), steps
    result["fb"], (z1, grads, counts, steps) = timed(step, repeats)
    result.setdefault("z1", z1)
    result.setdefault("steps", steps)
    result.setdefault("nf", counts[0])
    result.setdefault("ng", counts[1])
    result.update(grads=grads, bnf=counts[2], bng=counts[3])
    return result


def grad_diff(grads, base):
    return max(float((a.double() - b.double()).norm() / b.double().norm()) for a, b in zip(grads, base))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dt", type=float, default=1 / 64)
    parser.add_argument("--tol", type=float, default=1e-3, help="reltol = abstol of the adaptive rows")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--g-hidden", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=1.0, help="the diffusion's scale (g = sigma * sigmoid(...))")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Brownian tree")
    parser.add_argument("--ref-log2", type=int, default=10, help="reference step 2^-k")
    parser.add_argument("--tree-depth", type=int, default=14, help="BrownianTree tol = 2^-depth")
    parser.add_argument("--no-path-cache", action="store_true",
                        help="query the live tree in every timed solve instead of a shared memo of its increments")
    parser.add_argument("--groups", default="em,milstein,heun,revheun,srk,adaptive",
                        help="comma-separated subset of em,milstein,heun,revheun,srk,adaptive")
    parser.add_argument("--no-adjoint", action="store_true", help="skip the adjoint (gradient-only) rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    if args.ref_log2 < 1 or 2.0 ** -args.ref_log2 > args.dt:
        parser.error("--ref-log2 must give a reference step finer than --dt")
    if args.tree_depth < args.ref_log2:
        parser.error("--tree-depth must be at least --ref-log2 (the reference's steps should end on tree nodes)")

    params64 = {k: v.to(device) for k, v in make_params(args.dim, args.hidden, args.g_hidden).items()}
    params = {k: v.to(dtype) for k, v in params64.items()}
    u0_64 = torch.randn(args.batch, args.dim, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64).to(device)
    shape = (args.batch, args.dim)
    tol = 2.0 ** -args.tree_depth

    def tree(dt_):
        return lx.BrownianTree(0.0, 1.0, shape, seed=args.seed, dtype=dt_, device=device, tol=tol,
                               levy_area="space-time")

    g = make_diffusion(args.sigma)
    path = MemoPath(tree(dtype), enabled=not args.no_path_cache)
    env = dict(f=drift, g=g, u0=u0_64.to(dtype), path=path, bm=torchsde_brownian(path), dt=args.dt, tol=args.tol)

    # what the tree costs per fixed-step solve (cold tree, increments with Lévy area)
    n_steps = round(1.0 / args.dt)
    cold = tree(dtype)
    start = time.perf_counter()
    for k in range(n_steps):
        cold.increment(k * args.dt, min((k + 1) * args.dt, 1.0), levy_area=True)
    sync()
    tree_cost = time.perf_counter() - start

    # the references, float64, SRIW1 at 2^-ref and (for its error estimate) 2^-(ref-1)
    start = time.perf_counter()
    ref, ref_check = {}, {}
    tree64 = tree(torch.float64)
    with torch.no_grad():
        for kind, f_ref in (("ito", drift), ("strat", make_strat_as_ito_drift(args.sigma))):
            prob = lx.SDEProblem(lambda u, p, t, f_ref=f_ref: f_ref(u, p), lambda u, p, t: g(u, p), u0_64,
                                 (0.0, 1.0), params64, brownian=tree64)
            for k in (args.ref_log2, args.ref_log2 - 1):
                z = lx.solve(prob, lx.SRIW1(), dt=2.0 ** -k, adaptive=False, saveat=[1.0]).u[-1]
                (ref if k == args.ref_log2 else ref_check)[kind] = z
    ref_time = time.perf_counter() - start

    def strong_error(z1, kind):
        return float((z1.double() - ref[kind]).abs().mean())

    ito, strat = "ito", "stratonovich"
    P, T = pylux_runner, torchsde_runner
    mil_opts = dict(grad_free=True)
    backsolve, reversible = lx.BacksolveAdjoint(), lx.ReversibleAdjoint()
    # group key -> (title, rows); a row: (label, runner, forward timed?, reference, peer label, backprop base label)
    # (gradient rows, whose label names an adjoint, are skipped under --no-adjoint)
    groups = {
        "em": ("Euler-Maruyama, Itô", [
            ("pylux EulerMaruyama", P(lx.EulerMaruyama, ito, env), True, "ito", "torchsde euler", None),
            ("torchsde euler", T("euler", ito, env), True, "ito", None, "pylux EulerMaruyama"),
            ("pylux EM + BacksolveAdjoint", P(lx.EulerMaruyama, ito, env, sensealg=backsolve), False, "ito",
             "torchsde euler adjoint(euler)", "pylux EulerMaruyama"),
            ("torchsde euler adjoint(euler)", T("euler", ito, env, adjoint_method="euler"), False, "ito", None,
             "pylux EulerMaruyama"),
        ]),
        "milstein": ("Milstein, Itô", [
            ("pylux Milstein", P(lx.Milstein, ito, env), True, "ito", "torchsde milstein(grad_free)", None),
            ("torchsde milstein(grad_free)", T("milstein", ito, env, options=mil_opts), True, "ito", None,
             "pylux Milstein"),
            ("pylux Milstein + BacksolveAdjoint", P(lx.Milstein, ito, env, sensealg=backsolve), False, "ito",
             "torchsde milstein adjoint(milstein)", "pylux Milstein"),
            ("torchsde milstein adjoint(milstein)", T("milstein", ito, env, adjoint_method="milstein", options=mil_opts,
                                                      adjoint_options=dict(grad_free=False)),
             False, "ito", None, "pylux Milstein"),
        ]),
        "heun": ("Heun, Stratonovich", [
            ("pylux EulerHeun", P(lx.EulerHeun, strat, env), True, "strat", "torchsde heun", None),
            ("torchsde heun", T("heun", strat, env), True, "strat", None, "pylux EulerHeun"),
            ("pylux EulerHeun + BacksolveAdjoint", P(lx.EulerHeun, strat, env, sensealg=backsolve), False, "strat",
             "torchsde heun adjoint(heun)", "pylux EulerHeun"),
            ("torchsde heun adjoint(heun)", T("heun", strat, env, adjoint_method="heun"), False, "strat", None,
             "pylux EulerHeun"),
        ]),
        "revheun": ("reversible Heun, Stratonovich", [
            ("pylux ReversibleHeun", P(lx.ReversibleHeun, strat, env), True, "strat", "torchsde reversible_heun", None),
            ("torchsde reversible_heun", T("reversible_heun", strat, env), True, "strat", None, "pylux ReversibleHeun"),
            ("pylux RevHeun + ReversibleAdjoint", P(lx.ReversibleHeun, strat, env, sensealg=reversible), False,
             "strat", "torchsde rev_heun adjoint(adj_rev_heun)", "pylux ReversibleHeun"),
            ("pylux RevHeun + BacksolveAdjoint", P(lx.ReversibleHeun, strat, env, sensealg=backsolve), False,
             "strat", "torchsde rev_heun adjoint(adj_rev_heun)", "pylux ReversibleHeun"),
            ("torchsde rev_heun adjoint(adj_rev_heun)", T("reversible_heun", strat, env,
                                                           adjoint_method="adjoint_reversible_heun"),
             False, "strat", None, "pylux ReversibleHeun"),
        ]),
        "srk": ("SRK fixed step, Itô", [
            ("pylux SRIW1", P(lx.SRIW1, ito, env), True, "ito", "torchsde srk", None),
            ("pylux SOSRI", P(lx.SOSRI, ito, env), True, "ito", "torchsde srk", "pylux SRIW1"),
            ("torchsde srk", T("srk", ito, env, f_per_step=10), True, "ito", None, "pylux SRIW1"),
            ("pylux SRIW1 + BacksolveAdjoint", P(lx.SRIW1, ito, env, sensealg=backsolve), False, "ito",
             "torchsde srk adjoint(milstein)", "pylux SRIW1"),
            ("torchsde srk adjoint(milstein)", T("srk", ito, env, adjoint_method="milstein",
                                                 adjoint_options=dict(grad_free=False)),
             False, "ito", None, "pylux SRIW1"),
        ]),
        "adaptive": (f"SRK adaptive, Itô, reltol = abstol = {args.tol:g}, dt0 = {args.dt:g}", [
            ("pylux SOSRI adaptive", P(lx.SOSRI, ito, env, adaptive=True), True, "ito", "torchsde srk adaptive", None),
            ("pylux SRIW1 adaptive", P(lx.SRIW1, ito, env, adaptive=True), True, "ito", "torchsde srk adaptive",
             "pylux SOSRI adaptive"),
            ("torchsde srk adaptive", T("srk", ito, env, adaptive=True, f_per_step=10), True, "ito", None,
             "pylux SOSRI adaptive"),
        ]),
    }
    unknown = [key for key in args.groups.split(",") if key not in groups]
    if unknown:
        parser.error(f"--groups: unknown {', '.join(unknown)}; choose from {', '.join(groups)}")

    print(f"neural SDE: state {args.dim}, batch {args.batch}, drift MLP hidden {args.hidden}, per-entry diffusion "
          f"MLP hidden {args.g_hidden}, sigma {args.sigma:g}, {args.dtype}, t in [0, 1], dt {args.dt:g}, "
          f"{args.threads} threads, {args.device}, torch {torch.__version__}, torchsde "
          f"{__import__('torchsde').__version__}")
    print(f"path: BrownianTree seed {args.seed}, tol 2^-{args.tree_depth}, space-time Lévy area; "
          f"{'shared memo of increments (timings exclude the tree)' if path.enabled else 'live tree in every solve'}; "
          f"a cold tree costs {1e3 * tree_cost:.0f} ms per {n_steps}-step solve")
    for kind, name in (("ito", "Itô"), ("strat", "Stratonovich")):
        check = float((ref[kind] - ref_check[kind]).abs().mean())
        print(f"reference ({name}): float64 SRIW1, dt 2^-{args.ref_log2} ({ref_time:.0f} s for both); "
              f"mean |ref - ref at dt 2^-{args.ref_log2 - 1}| = {check:.2e}")
    print(f"times: median of {args.repeats} after a warm-up")
    print()
    print(f"{'method':<42} {'steps':>8} {'fwd nf/ng':>10} {'fwd ms':>8} {'ratio':>6} {'f+b ms':>8} {'ratio':>6} "
          f"{'bwd nf/ng':>10} {'strong err':>10} {'|dz1| peer':>10} {'grad vs bp':>10}", flush=True)
    start = time.perf_counter()
    for key in args.groups.split(","):
        title, rows = groups[key]
        if args.no_adjoint:
            rows = [row for row in rows if "adjoint" not in row[0].lower()]
        results, unavailable = {}, {}
        for label, run, forward, kind, peer, base in rows:
            try:
                results[label] = measure(run, params, args.repeats, forward, sync)
            except NotImplementedError as err:
                unavailable[label] = str(err).split(";")[0]
        print(f"-- {title}")
        for label, run, forward, kind, peer, base in rows:
            if label in unavailable:
                print(f"  {label:<40} not available: {unavailable[label]}")
                continue
            r, q = results[label], results.get(peer)

            def ratio(what):
                return f"{r[what] / q[what]:6.2f}" if q is not None and what in r and what in q else f"{'':6}"
            fwd = f"{1e3 * r['fwd']:8.1f}" if "fwd" in r else f"{'-':>8}"
            counts, bwd = f"{r['nf']}/{r['ng']}", f"{r['bnf']}/{r['bng']}"
            dz = "" if q is None else f"{float((q['z1'].double() - r['z1'].double()).abs().max()):10.1e}"
            if base is not None and base in results:
                gd = f"{grad_diff(r['grads'], results[base]['grads']):10.1e}"
            else:
                gd = f"{'(base)':>10}" if label.startswith("pylux") and "Adjoint" not in label else ""
            print(f"  {label:<40} {r['steps']:>8} {counts:>10} {fwd} {ratio('fwd')} {1e3 * r['fb']:8.1f} "
                  f"{ratio('fb')} {bwd:>10} {strong_error(r['z1'], kind):10.2e} {dz:>10} {gd:>10}", flush=True)
    print()
    print(f"timed rows: {time.perf_counter() - start:.0f} s")
    print("ratio = pylux time / the torchsde time of the row's peer (< 1: pylux faster); |dz1| peer = "
          "max |z(1) - z(1) of that torchsde row|;")
    print("grad vs bp = relative gradient difference to pylux backprop of the named scheme.")
    print("strong err = mean |z(1) - z_ref(1)| against the Itô or Stratonovich reference of the row.")
    print("steps: 'a/r' = accepted/rejected; 'att' = torchsde adaptive attempts (each: one full and two half SRK "
          "steps), from its f count.")

if __name__ == "__main__":
    main()
