"""Backward pass of a continuous DEQ (implicit, one linear solve) vs a neural ODE trained with BacksolveAdjoint.

The claim of Pal, Edelman & Rackauckas (2022): integrating a neural ODE to its
steady state and differentiating the steady state implicitly trains faster
than a finite-time neural ODE, because the backward pass becomes one linear
solve (GMRES on vector-Jacobian products) instead of a backward ODE solve.

Both models use the same vector field

    dz/dt = f(z, x) - z,   f(z, x) = tanh(W2 tanh(W1 z + b1) + b2 + x),   z(0) = 0,

with a state of ``--hidden`` entries, a batch of ``--batch`` inputs, float32,
the same Tsit5 solver and the same ODE tolerances (``reltol = abstol =
--ode-tol``) forward and backward:

* **continuous DEQ**: ``pylux.DEQ(cell, Tsit5())``, integrated until every batch
  element has ``||f(z) - z|| <= tol + tol ||z||`` (``--tol``), backward by
  ``SteadyStateAdjoint(tol=--ode-tol)``;
* **neural ODE**: ``pylux.NeuralODE`` of the same field over ``(0, T)``, backward by
  ``BacksolveAdjoint()``, for ``T = 1`` (the usual finite-time model) and for
  ``T = t*``, the time at which the continuous DEQ reached its steady state
  (the same trajectory length).

The loss is ``0.5 ||z_out||^2``. Times are medians over ``--repeats`` runs;
the backward time is that of ``torch.autograd.grad`` alone.

Usage: python benchmarks/deq_backward.py [--repeats 10] [--threads 1] [--hidden 32] [--batch 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pylux as lx
from pylux.core import AbstractLayer, tree_leaves
from pylux.experiments.deq_digits import deq_cell


class SteadyStateField(AbstractLayer):
    """``z -> f(z, x) - z`` for a fixed input ``x`` (the continuous DEQ's vector field, as a NeuralODE model)."""

    def __init__(self, cell: AbstractLayer, x: torch.Tensor) -> None:
        self.cell, self.x = cell, x

    def init_params(self, rng):
        return self.cell.init_params(rng)

    def init_state(self, rng):
        return self.cell.init_state(rng)

    def forward(self, z, ps, st):
        out, _ = self.cell((z, self.x), ps, st)
        return out - z, st


def timed_step(layer, inputs, ps, st, leaves):
    start = time.perf_counter()
    out, st_new = layer(inputs, ps, st)
    middle = time.perf_counter()
    loss = 0.5 * out.pow(2).sum()
    torch.autograd.grad(loss, leaves)
    end = time.perf_counter()
    return middle - start, end - middle, st_new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tol", type=float, default=1e-3, help="steady-state test of the continuous DEQ")
    parser.add_argument("--ode-tol", type=float, default=1e-4, help="reltol = abstol of every ODE solve and GMRES")
    parser.add_argument("--init-scale", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.hidden, generator=gen)
    cell = deq_cell(args.hidden, args.init_scale)  # the deq-digits cell
    deq = lx.DEQ(cell, lx.Tsit5(), sensealg=lx.SteadyStateAdjoint(tol=args.ode_tol), abstol=args.tol, reltol=args.tol,
                 ode_options={"reltol": args.ode_tol, "abstol": args.ode_tol})
    ps, st = lx.setup(torch.Generator().manual_seed(1), deq)
    leaves = tree_leaves(ps)
    for leaf in leaves:
        leaf.requires_grad_(True)

    deq_fwd, deq_bwd = [], []
    for _ in range(args.repeats + 1):
        f, b, st_new = timed_step(deq, x, ps, st, leaves)
        deq_fwd.append(f)
        deq_bwd.append(b)
    solution = st_new["solution"]
    t_star = solution.t
    gmres = solution.backward_stats
    rows = [("continuous DEQ (SteadyStateAdjoint)", statistics.median(deq_fwd[1:]), statistics.median(deq_bwd[1:]),
             f"forward nfe {solution.nfe}, t* = {t_star:.2f}, GMRES iterations {gmres['iterations']}")]

    z0 = torch.zeros_like(x)
    field = SteadyStateField(cell, x)
    results = {}
    for label, horizon in (("1", 1.0), ("t*", t_star)):
        sensealg = lx.BacksolveAdjoint()
        node = lx.NeuralODE(field, (0.0, horizon), lx.Tsit5(), sensealg=sensealg, reltol=args.ode_tol,
                            abstol=args.ode_tol)
        node_st = lx.setup(torch.Generator().manual_seed(1), node)[1]
        fwd, bwd = [], []
        for _ in range(args.repeats + 1):
            f, b, node_st = timed_step(node, z0, ps["model"], node_st, leaves)
            fwd.append(f)
            bwd.append(b)
        back_nf = node_st["backward_stats"]["nf"]
        results[label] = statistics.median(bwd[1:])
        rows.append((f"neural ODE over (0, {label}) (BacksolveAdjoint)", statistics.median(fwd[1:]),
                     results[label], f"forward nfe {node_st['nfe']}, backward nfe {back_nf}"))

    print(f"hidden {args.hidden}, batch {args.batch}, float32, {args.threads} thread(s), steady-state tol {args.tol:g}, "
          f"ODE/GMRES tol {args.ode_tol:g}, median of {args.repeats} runs")
    print(f"{'model':48s} {'forward (ms)':>13s} {'backward (ms)':>14s}  details")
    for name, f, b, details in rows:
        print(f"{name:48s} {1e3 * f:13.2f} {1e3 * b:14.2f}  {details}")
    deq_backward = rows[0][2]
    for label, value in results.items():
        print(f"backward-time ratio, neural ODE over (0, {label}) / continuous DEQ: {value / deq_backward:.1f}x")


if __name__ == "__main__":
    main()
