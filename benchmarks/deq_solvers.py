"""DEQ fixed-point solvers: pylux against torchdeq on the same problem.

    z = tanh(W z + U x + b),   z in R^128, batch 512, ||W||_2 = 0.9, float32, 2 threads.

Each solver runs from z0 = 0 until every batch element has ||g(z) - z|| <= 1e-4
(the absolute criterion of both libraries: torchdeq's stop_mode="abs", pylux's
abstol=1e-4, reltol=0). "forward" times the solve alone; "fwd+bwd" adds the
implicit backward pass of the loss 0.5 ||z*||^2: one differentiable
application of g at z* and, in backward, the adjoint fixed point
lambda = J_g(z*)^T lambda + dL/dz solved with the same kind of solver on
vector-Jacobian products, as torchdeq's IFT gradient does (pylux: the library's
SteadyStateAdjoint(solver=...), see pylux_sensealg). pylux also runs the
backward as the linear system (I - J^T) lambda = dL/dz with GMRES, the
library's default SteadyStateAdjoint().

Usage: python benchmarks/deq_solvers.py [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

from _timing import interleaved as timed

import pylux as lx
import pylux.nonlinear as nl

try:
    from torchdeq.grad import backward_factory
    from torchdeq.solver import anderson_solver, broyden_solver, fixed_point_iter
except ImportError as error:  # torchdeq is an optional benchmark dependency
    raise SystemExit(f"this benchmark needs torchdeq (pip install 'pylux-torch[bench]', "
                     f"or pip install -e '.[bench]' in a checkout): {error}")

STATE, BATCH, TOL, MAXITERS = 128, 512, 1e-4, 100


def make_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(STATE, STATE, generator=gen)
    W = W * (0.9 / torch.linalg.matrix_norm(W, 2))
    U = torch.randn(STATE, STATE, generator=gen) / STATE ** 0.5
    b = 0.1 * torch.randn(STATE, generator=gen)
    x = torch.randn(BATCH, STATE, generator=gen)
    return W.requires_grad_(), U.requires_grad_(), b.requires_grad_(), x


def cell(W, U, b, x):
    injection = torch.addmm(b, x, U.t())

    def g(z):
        return torch.tanh(torch.addmm(injection, z, W.t()))
    return g


# ---------------------------------------------------------------- torchdeq
TORCHDEQ = {"broyden": broyden_solver, "anderson": anderson_solver, "fixed_point": fixed_point_iter}


def torchdeq_forward(name, g, z0):
    with torch.no_grad():
        z, _, info = TORCHDEQ[name](g, z0, max_iter=MAXITERS, tol=TOL, stop_mode="abs")
    return z, int(info["nstep"].max())


def torchdeq_fwd_bwd(name, params, x, z0):
    grad_fn = backward_factory(grad_type="ift", b_solver=TORCHDEQ[name],
                               b_solver_kwargs=dict(max_iter=MAXITERS, tol=TOL, stop_mode="abs"))
    g = cell(*params, x)
    z_star, iters = torchdeq_forward(name, g, z0)
    (z,) = grad_fn(None, g, z_star)
    loss = 0.5 * z.pow(2).sum()
    grads = torch.autograd.grad(loss, params)
    return grads, iters


# ---------------------------------------------------------------- pylux
PYLUX = {"broyden": nl.Broyden(), "anderson": nl.Anderson(memory=6), "fixed_point": nl.FixedPointIteration()}


def pylux_forward(name, g, z0):
    sol = nl.nlsolve(g, z0, PYLUX[name], abstol=TOL, reltol=0.0, maxiters=MAXITERS, record_history=False)
    return sol.z, sol.iterations


def injected_map(z, injection, ps):
    """``f(z, u, (W,)) = tanh(W z + u)`` with the input injection ``u = U x + b`` computed once, outside
    ``f``, as :func:`cell` does: the map as the library's sensitivity algorithms take it (``W`` in the
    parameter tree; ``U`` and ``b`` get their gradients through ``u``)."""
    (W,) = ps
    return torch.tanh(torch.addmm(injection, z, W.t()))


def pylux_sensealg(backward):
    """The library's implicit gradient for the backward solver ``backward`` (a PYLUX name, or "gmres").

    :class:`pylux.sensitivity.SteadyStateAdjoint` with ``solver=`` the same
    nonlinear solver as the forward pass solves lambda = J^T lambda + dL/dz
    by nlsolve on vector-Jacobian products (torchdeq's IFT backward); it starts
    at lambda = dL/dz, where torchdeq starts at 0 (one VJP fewer for the
    fixed-point iteration, the same iterates after it). Both stop an element at
    ||J^T lambda + dL/dz - lambda|| <= 1e-4 (``tol=0``, ``atol=TOL``). ``"gmres"``
    is the library's default linear solve of (I - J^T) lambda = dL/dz.
    """
    if backward == "gmres":
        return lx.SteadyStateAdjoint(tol=1e-12, atol=TOL, restart=30)
    return lx.SteadyStateAdjoint(solver=PYLUX[backward], tol=0.0, atol=TOL, maxiters=MAXITERS)


def pylux_fwd_bwd(name, params, x, z0, backward=None):
    """The forward solve of :func:`pylux_forward`, then the library's implicit gradient
    (``SteadyStateAdjoint.attach_gradient``, what a DEQ layer runs): one application of f at z*, in
    backward, whose graph serves both the adjoint's VJPs and the parameter gradient (torchdeq applies g
    at z* twice, once in forward for the parameter graph and again in backward for the VJPs)."""
    W, U, b = params
    injection = torch.addmm(b, x, U.t())  # once, as cell() computes it for torchdeq's rows
    frozen = (injection.detach(), (W.detach(),))
    z_star, iters = pylux_forward(name, lambda z: injected_map(z, *frozen), z0)
    z = pylux_sensealg(backward or name).attach_gradient(injected_map, z_star, injection, (W,))
    loss = 0.5 * z.pow(2).sum()
    grads = torch.autograd.grad(loss, params)
    return grads, iters


# ---------------------------------------------------------------- timing
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    W, U, b, x = make_problem()
    params = (W, U, b)
    g = cell(W, U, b, x)
    z0 = torch.zeros(BATCH, STATE)

    cases = {}
    for name in ("broyden", "anderson", "fixed_point"):
        cases[("torchdeq", name, "fwd")] = lambda name=name: torchdeq_forward(name, g, z0)
        cases[("pylux", name, "fwd")] = lambda name=name: pylux_forward(name, g, z0)
        cases[("torchdeq", name, "both")] = lambda name=name: torchdeq_fwd_bwd(name, params, x, z0)
        cases[("pylux", name, "both")] = lambda name=name: pylux_fwd_bwd(name, params, x, z0)
    cases[("pylux", "gmres", "both")] = lambda: pylux_fwd_bwd("fixed_point", params, x, z0, backward="gmres")
    results = timed(cases, args.repeats)

    print(f"z = tanh(Wz + Ux + b): state {STATE}, batch {BATCH}, ||W||_2 = 0.9, float32, tol {TOL:g}, "
          f"{args.threads} threads, median of {args.repeats} (interleaved)")
    header = f"{'solver':<12}{'lib':<10}{'iters':>6}{'forward ms':>12}{'fwd+bwd ms':>12}"
    print(header)
    print("-" * len(header))
    for name in ("broyden", "anderson", "fixed_point"):
        t_fwd, (z_td, it_td) = results[("torchdeq", name, "fwd")]
        t_both, (grads_td, _) = results[("torchdeq", name, "both")]
        p_fwd, (z_px, it_px) = results[("pylux", name, "fwd")]
        p_both, (grads_px, _) = results[("pylux", name, "both")]
        gap = (z_px - z_td).abs().max().item()
        grad_gap = max(((a - c).norm() / c.norm()).item() for a, c in zip(grads_px, grads_td))
        print(f"{name:<12}{'torchdeq':<10}{it_td:>6}{t_fwd:>12.2f}{t_both:>12.2f}")
        print(f"{'':<12}{'pylux':<10}{it_px:>6}{p_fwd:>12.2f}{p_both:>12.2f}"
              f"   ratio {p_fwd / t_fwd:.2f} / {p_both / t_both:.2f}"
              f"   |dz| {gap:.1e}, rel |dgrad| {grad_gap:.1e}")
    g_both = results[("pylux", "gmres", "both")][0]
    print(f"{'fp + gmres':<12}{'pylux':<10}{'':>6}{'':>12}{g_both:>12.2f}   (backward by GMRES on (I - J^T))")

    def fastest(lib, kind):
        return min(t for (l, _, k), (t, _) in results.items() if l == lib and k == kind)
    for kind, label in (("fwd", "forward"), ("both", "fwd+bwd")):
        px, td = fastest("pylux", kind), fastest("torchdeq", kind)
        print(f"fastest {label}: pylux {px:.2f} ms vs torchdeq {td:.2f} ms (ratio {px / td:.2f})")


if __name__ == "__main__":
    main()
