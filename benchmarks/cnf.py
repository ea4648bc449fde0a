"""One FFJORD training step (64-d, batch 512, Hutchinson trace): pylux beside torchdiffeq and torchdyn.

The flow: f(z) = W3 tanh(W2 tanh(W1 z + b1) + b2) + b3 (64 -> --hidden -> --hidden -> 64, the same
weights in every row, scaled by --scale), t in [0, 1], base N(0, I), loss = -mean log p(x) over
the first 512 dequantized digits (64-d), one Rademacher probe per sample drawn once per step and
held fixed over time, rtol = atol = --tol, float32.

Rows:
* pylux ``FFJORD`` with DP5 (the dopri5 tableau) and Tsit5 under BacksolveAdjoint (± seminorm)
  and DirectAdjoint (backprop through the solver);
* torchdiffeq written the way FFJORD's reference code writes it: an ``nn.Module`` whose forward
  takes the augmented state ``(z, logp)``, computes ``dz`` and the Hutchinson divergence with one
  ``torch.autograd.grad(dz, z, e, create_graph=True)``, solved by ``odeint_adjoint`` (dopri5,
  ± ``adjoint_options=dict(norm="seminorm")``) and by ``odeint`` (backprop);
* torchdyn's ``CNF`` with ``hutch_trace`` inside its ``NeuralODE`` (dopri5, adjoint), when it can be
  imported (``--torchdyn-path DIR``: a directory holding torchdyn and its imports; torchdyn imports
  pytorch_lightning only for its LightningModule base class, so a directory with a stub
  ``pytorch_lightning`` whose ``LightningModule`` is ``torch.nn.Module`` suffices for this use).

Columns: the loss (all rows solve the same flow; they agree to the tolerance), forward NFE,
backward NFE (evaluations of the augmented field on the backward pass; 0 for backprop), wall
time of forward + backward (median of --repeats after one warm-up), saved-tensor memory (the bytes
of the distinct storages autograd saved in the forward pass and still holds when it ends,
:func:`pylux.experiments.cnf_moons.saved_tensor_bytes`), peak memory of forward + backward (the
profiler's allocation events, :func:`node_train_step.peak_cpu_bytes`), and the time relative to
the fastest peer row.

    python benchmarks/cnf.py [--hidden 128] [--scale 1.0] [--tol 1e-5] [--repeats 3] [--threads 1]
                             [--torchdyn-path DIR]

Timings on a shared machine are noisy; compare numbers from the same run.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from node_train_step import peak_cpu_bytes  # noqa: E402 (the benchmarks' shared meter)

import pylux as lx  # noqa: E402
from pylux import nn  # noqa: E402
from pylux.experiments.cnf_moons import saved_tensor_bytes  # noqa: E402

D = 64
LOG_2PI = math.log(2 * math.pi)


def make_weights(hidden: int, scale: float):
    g = torch.Generator().manual_seed(0)
    shapes = [(hidden, D), (hidden, hidden), (D, hidden)]
    weights = []
    for out_dim, in_dim in shapes:
        bound = scale / math.sqrt(in_dim)
        weights.append(((torch.rand(out_dim, in_dim, generator=g) * 2 - 1) * bound,
                        (torch.rand(out_dim, generator=g) * 2 - 1) * bound))
    return weights


def torch_net(weights) -> torch.nn.Sequential:
    layers = []
    for k, (w, b) in enumerate(weights):
        linear = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(b)
        layers.append(linear)
        if k < len(weights) - 1:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def base_log_prob(z):
    return -0.5 * z.pow(2).sum(1) - 0.5 * D * LOG_2PI


# --------------------------------------------------------------------- pylux

def pylux_model(weights):
    return nn.Chain(nn.Dense(D, weights[0][0].shape[0], torch.tanh),
                    nn.Dense(weights[1][0].shape[1], weights[1][0].shape[0], torch.tanh),
                    nn.Dense(weights[2][0].shape[1], D))


def pylux_state(weights):
    """The layer state of every pylux row (its key fixes the probe, which the peers are given too)."""
    flow = lx.FFJORD(pylux_model(weights), (0.0, 1.0))
    return lx.setup(torch.Generator().manual_seed(1), flow)[1]


def pylux_row(weights, x, st, solver, sensealg, tol):
    flow = lx.FFJORD(pylux_model(weights), (0.0, 1.0), base=lx.StandardNormal(D), solver=solver,
                     sensealg=sensealg, reltol=tol, abstol=tol)

    def forward():
        ps = {f"layer_{k + 1}": {"weight": w.clone().requires_grad_(True), "bias": b.clone().requires_grad_(True)}
              for k, (w, b) in enumerate(weights)}
        log_p, st2 = flow(x, ps, st)
        backward = st2["backward_stats"]
        return -log_p.mean(), st2["nfe"], lambda: backward.get("nf", 0) if backward else 0
    return forward


# --------------------------------------------------------------------- torchdiffeq (FFJORD's reference style)

class AugmentedODEfunc(torch.nn.Module):
    """``(z, logp) -> (dz, -e^T dz/dz e)``: the augmented dynamics as FFJORD's reference ODEfunc writes them."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.e = None
        self.nfe = 0

    def forward(self, t, states):
        z = states[0]
        self.nfe += 1
        with torch.set_grad_enabled(True):
            if not z.requires_grad:
                z = z.requires_grad_(True)
            dz = self.net(z)
            (e_dzdx,) = torch.autograd.grad(dz, z, self.e, create_graph=True)
            divergence = (e_dzdx * self.e).sum(1, keepdim=True)
        return dz, -divergence


def torchdiffeq_row(weights, x, probe, adjoint: bool, seminorm: bool, tol):
    import torchdiffeq
    func = AugmentedODEfunc(torch_net(weights))
    t = torch.tensor([0.0, 1.0])
    options = dict(rtol=tol, atol=tol, method="dopri5")

    def forward():
        func.zero_grad(set_to_none=True)
        func.e = probe
        func.nfe = 0
        state = (x.clone(), torch.zeros(x.shape[0], 1))
        if adjoint:
            extra = dict(adjoint_options=dict(norm="seminorm")) if seminorm else {}
            z_t, logp_t = torchdiffeq.odeint_adjoint(func, state, t, adjoint_params=tuple(func.parameters()),
                                                     **options, **extra)
        else:
            z_t, logp_t = torchdiffeq.odeint(func, state, t, **options)
        loss = -(base_log_prob(z_t[-1]) - logp_t[-1][:, 0]).mean()
        forward_nfe = func.nfe
        return loss, forward_nfe, lambda: func.nfe - forward_nfe if adjoint else 0
    return forward


# --------------------------------------------------------------------- torchdyn

def torchdyn_row(weights, x, probe, tol):
    from torchdyn.core import NeuralODE
    from torchdyn.models import CNF, hutch_trace
    class FixedProbe:
        """torchdyn draws the probe from ``noise_dist.sample(x.shape[:1])`` before each solve: hand it ours."""

        def sample(self, shape):
            return probe

    cnf = CNF(torch_net(weights), trace_estimator=hutch_trace, noise_dist=FixedProbe())
    counter = [0]
    cnf.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    node = NeuralODE(cnf, solver="dopri5", sensitivity="adjoint", atol=tol, rtol=tol, atol_adjoint=tol,
                     rtol_adjoint=tol)
    t_span = torch.tensor([0.0, 1.0])

    def forward():
        node.zero_grad(set_to_none=True)
        counter[0] = 0
        _, sol = node(torch.cat([torch.zeros(x.shape[0], 1), x], 1), t_span)
        final = sol[-1]
        loss = -(base_log_prob(final[:, 1:]) - final[:, 0]).mean()
        forward_nfe = counter[0]
        return loss, forward_nfe, lambda: counter[0] - forward_nfe
    return forward


# --------------------------------------------------------------------- measuring

def measure(forward, repeats: int) -> dict:
    """Time, NFE and memory of ``forward()`` (-> ``(loss, forward NFE, backward NFE after backward)``) + backward."""
    def step():
        loss, forward_nfe, backward_nfe = forward()
        loss.backward()
        return float(loss), forward_nfe, backward_nfe()
    loss, forward_nfe, backward_nfe = step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    (loss_tensor, _, _), saved = saved_tensor_bytes(forward)  # what the forward pass leaves for backward
    loss_tensor.backward()
    peak = peak_cpu_bytes(step)
    return {"loss": loss, "forward_nfe": forward_nfe, "backward_nfe": backward_nfe,
            "time_s": statistics.median(times), "saved_mb": saved / 2 ** 20, "peak_mb": peak / 2 ** 20}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--torchdyn-path", default=None,
                        help="directories (os.pathsep-separated) to put on sys.path for torchdyn")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.torchdyn_path:
        sys.path[:0] = args.torchdyn_path.split(os.pathsep)
    weights = make_weights(args.hidden, args.scale)
    x = lx.data.dequantized_digits("train", rng=torch.Generator().manual_seed(0))[:512]
    # the probe pylux draws from the layer state's key: every row uses the same one
    st = pylux_state(weights)
    seed, _ = lx.core.split_key(st["rng"])
    probe = lx.regularize.rademacher_like(x, torch.Generator().manual_seed(seed))
    rows = {
        "pylux DP5 BacksolveAdjoint": pylux_row(weights, x, st, lx.DP5(), lx.BacksolveAdjoint(), args.tol),
        "pylux DP5 BacksolveAdjoint(seminorm)": pylux_row(weights, x, st, lx.DP5(),
                                                          lx.BacksolveAdjoint(seminorm=True), args.tol),
        "pylux Tsit5 BacksolveAdjoint(seminorm)": pylux_row(weights, x, st, lx.Tsit5(),
                                                            lx.BacksolveAdjoint(seminorm=True), args.tol),
        "pylux DP5 DirectAdjoint (backprop)": pylux_row(weights, x, st, lx.DP5(), lx.DirectAdjoint(), args.tol),
        "torchdiffeq odeint_adjoint dopri5": torchdiffeq_row(weights, x, probe, True, False, args.tol),
        "torchdiffeq odeint_adjoint dopri5 seminorm": torchdiffeq_row(weights, x, probe, True, True, args.tol),
        "torchdiffeq odeint dopri5 (backprop)": torchdiffeq_row(weights, x, probe, False, False, args.tol),
    }
    try:
        import torchdyn  # noqa: F401
        rows["torchdyn CNF dopri5 adjoint"] = torchdyn_row(weights, x, probe, args.tol)
    except ImportError as err:
        print(f"torchdyn not importable ({err}); its row is left out")
    results = {}
    for name, step in rows.items():
        results[name] = measure(step, args.repeats)
        r = results[name]
        print(f"{name}: loss {r['loss']:.5f}, NFE {r['forward_nfe']}/{r['backward_nfe']}, "
              f"{1e3 * r['time_s']:.0f} ms", flush=True)
    peers = [r["time_s"] for name, r in results.items() if not name.startswith("pylux")]
    fastest = min(peers) if peers else float("nan")
    print(f"\nFFJORD step, d={D}, batch 512, hidden {args.hidden}, scale {args.scale}, tol {args.tol}, "
          f"{args.threads} thread(s), median of {args.repeats}\n")
    print("| row | loss | forward NFE | backward NFE | time (ms) | saved (MB) | peak (MB) | time / fastest peer |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['loss']:.5f} | {r['forward_nfe']} | {r['backward_nfe']} | {1e3 * r['time_s']:.0f} | "
              f"{r['saved_mb']:.1f} | {r['peak_mb']:.1f} | {r['time_s'] / fastest:.2f}x |")


if __name__ == "__main__":
    main()
