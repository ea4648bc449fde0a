"""Neural CDE training step: pylux against torchcde on torchdiffeq (its standard pairing).

The problem of Kidger et al.'s examples at the issue's size: batch 256, 32
channels (time among them), 64 hidden units, T = 50 shared observation times;
the control is the natural cubic spline of the data (``pylux.CubicSpline`` /
``torchcde.natural_cubic_coeffs`` + ``torchcde.CubicSpline``), the vector field
``Linear(64, 128) -> softplus -> Linear(128, 64 * 32) -> tanh``, the same
initial weights in both, Dormand–Prince 5(4) (``DP5()`` / ``"dopri5"``) at
rtol = atol = 1e-3, a linear readout and a squared-error loss. A training step
is the forward solve plus the backward pass, by backpropagation through the
solver (pylux ``sensealg=None``, torchcde ``adjoint=False``) and by the
backsolve adjoint (pylux ``BacksolveAdjoint()``, torchcde ``adjoint=True``,
which runs torchdiffeq's ``odeint_adjoint``).

Reported: median wall time of a training step over ``--repeats`` runs (after
one warm-up), forward NFE (vector-field evaluations, counted by a wrapper in
both), the two losses (they agree to the solvers' tolerance), and the bytes
autograd saves during the forward pass (distinct storages). pylux runs twice:
with its default PI controller and with the I controller torchdiffeq's
``dopri5`` uses (equal controllers give nearly equal steps). The last row is
the floor of backpropagation: the peer's number of evaluations of
``f_theta(z) dX`` at the same sizes, forward and backward, with no solver
around them; a library's time above it is its own overhead, and its ratio to
the peer bounds what any solver can reach.

Run: ``python benchmarks/timeseries.py --threads 1`` (about a minute or two on
one idle core; timings on a loaded machine are noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pylux as lx
from pylux import nn
from pylux.experiments.cnf_moons import saved_tensor_bytes as saved_bytes

B, C, H, T, WIDTH = 256, 32, 64, 50, 128


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0.0, 1.0, T)
    freq = 1.0 + 2.0 * torch.rand(B, 1, C - 1, generator=g)
    x = torch.sin(2 * torch.pi * freq * t[None, :, None] + torch.rand(B, 1, C - 1, generator=g) * 6.28)
    values = torch.cat([t[None, :, None].expand(B, T, 1), x], dim=-1)
    target = torch.randn(B, 1, generator=g)
    return t, values, target


def pylux_step(sensealg, t, values, target, ps, counter, **solve_kwargs):
    field = nn.Chain(nn.Dense(H, WIDTH, torch.nn.functional.softplus), nn.Dense(WIDTH, H * C, torch.tanh))
    cde = lx.NeuralCDE(_Counted(field, counter), H, C, solver=lx.DP5(), sensealg=sensealg, reltol=1e-3, abstol=1e-3,
                       **solve_kwargs)
    readout = nn.Dense(H, 1)

    def step():
        leaves = [p for p in lx.core.tree_leaves(ps)]
        for leaf in leaves:
            leaf.grad = None
        z, _ = cde((t, values), ps["cde"], st)
        pred, _ = readout(z, ps["readout"], {})
        loss = ((pred - target) ** 2).mean()
        return loss, leaves
    st = cde.init_state(torch.Generator())
    return step


class _Counted(lx.core.AbstractLayer):
    def __init__(self, inner, counter):
        self.inner, self.counter = inner, counter

    def init_params(self, rng):
        return self.inner.init_params(rng)

    def init_state(self, rng):
        return self.inner.init_state(rng)

    def forward(self, x, ps, st):
        self.counter[0] += 1
        return self.inner(x, ps, st)


def torch_modules(ps):
    """torchcde modules holding the same weights as the pylux parameters."""
    import torchcde  # noqa: PLC0415

    class Func(torch.nn.Module):
        def __init__(self, counter):
            super().__init__()
            self.l1, self.l2, self.counter = torch.nn.Linear(H, WIDTH), torch.nn.Linear(WIDTH, H * C), counter

        def forward(self, t, z):
            self.counter[0] += 1
            return torch.tanh(self.l2(torch.nn.functional.softplus(self.l1(z)))).view(z.shape[0], H, C)

    counter = [0]
    func = Func(counter)
    initial, readout = torch.nn.Linear(C, H), torch.nn.Linear(H, 1)
    with torch.no_grad():
        vf = ps["cde"]["vector_field"]
        func.l1.weight.copy_(vf["layer_1"]["weight"]), func.l1.bias.copy_(vf["layer_1"]["bias"])
        func.l2.weight.copy_(vf["layer_2"]["weight"]), func.l2.bias.copy_(vf["layer_2"]["bias"])
        initial.weight.copy_(ps["cde"]["initial"]["weight"]), initial.bias.copy_(ps["cde"]["initial"]["bias"])
        readout.weight.copy_(ps["readout"]["weight"]), readout.bias.copy_(ps["readout"]["bias"])
    return torchcde, func, initial, readout, counter


def torchcde_step(adjoint, t, values, target, modules):
    torchcde, func, initial, readout, counter = modules
    params = list(func.parameters()) + list(initial.parameters()) + list(readout.parameters())

    def step():
        for p in params:
            p.grad = None
        coeffs = torchcde.natural_cubic_coeffs(values, t)
        X = torchcde.CubicSpline(coeffs, t)
        z0 = initial(X.evaluate(X.interval[0]))
        kwargs = {"adjoint_params": tuple(func.parameters()) + (coeffs,)} if adjoint else {}
        z = torchcde.cdeint(X=X, func=func, z0=z0, t=X.interval, adjoint=adjoint, method="dopri5", rtol=1e-3,
                            atol=1e-3, **kwargs)
        loss = ((readout(z[:, 1]) - target) ** 2).mean()
        return loss, params
    return step


def floor_step(nfe, ps, counter):
    """The evaluations alone: ``nfe`` products ``f_theta(z) dX`` at the benchmark's sizes, forward and backward.

    What any solver must spend for that many evaluations when it backpropagates through them; the time a
    library adds above it is its own overhead."""
    field = nn.Chain(nn.Dense(H, WIDTH, torch.nn.functional.softplus), nn.Dense(WIDTH, H * C, torch.tanh))
    g = torch.Generator().manual_seed(2)
    z0, dx = torch.randn(B, H, generator=g), torch.randn(B, C, 1, generator=g)
    vf = ps["cde"]["vector_field"]
    st = field.init_state(torch.Generator())

    def step():
        leaves = lx.core.tree_leaves(vf)
        for leaf in leaves:
            leaf.grad = None
        z = z0
        for _ in range(nfe):
            counter[0] += 1
            out = (field(z, vf, st)[0].view(B, H, C) @ dx).squeeze(-1)
            z = z + 1e-3 * out
        return (z ** 2).mean(), leaves
    return step


def measure(step, counter, repeats):
    loss, leaves = step()
    loss.backward()
    times = []
    for _ in range(repeats):
        counter[0] = 0
        start = time.perf_counter()
        loss, leaves = step()
        nfe = counter[0]
        loss.backward()
        times.append(time.perf_counter() - start)
    (loss_again, _), memory = saved_bytes(step)
    return statistics.median(times), nfe, float(loss.detach()), memory


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t, values, target = make_data()
    field = nn.Chain(nn.Dense(H, WIDTH, torch.nn.functional.softplus), nn.Dense(WIDTH, H * C, torch.tanh))
    gen = torch.Generator().manual_seed(1)
    ps = {"cde": {"initial": nn.Dense(C, H).init_params(gen), "vector_field": field.init_params(gen)},
          "readout": nn.Dense(H, 1).init_params(gen)}
    ps = lx.core.tree_map(lambda x: x.requires_grad_(True), ps)
    rows = []
    try:
        modules = torch_modules(ps)
    except ImportError:
        modules = None
        print("torchcde is not installed (pip install torchcde): only the pylux rows")
    for label, sensealg, adjoint in (("backprop through the solver", None, False),
                                     ("backsolve adjoint", lx.BacksolveAdjoint(), True)):
        counter = [0]
        ours = measure(pylux_step(sensealg, t, values, target, ps, counter), counter, args.repeats)
        # torchdiffeq's dopri5 uses the I controller: the same controller in pylux, for equal steps
        counter_i = [0]
        ours_i = measure(pylux_step(sensealg, t, values, target, ps, counter_i, controller=lx.IController()),
                         counter_i, args.repeats)
        peer = measure(torchcde_step(adjoint, t, values, target, modules), modules[4], args.repeats) \
            if modules is not None else None
        rows.append((label, [("pylux (PI controller, default)", ours), ("pylux (I controller)", ours_i)], peer))
    counter = [0]
    floor_nfe = rows[0][2][1] if rows[0][2] else rows[0][1][1][1][1]
    floor = measure(floor_step(floor_nfe, ps, counter), counter, args.repeats)
    print(f"# neural CDE training step: batch {B}, {C} channels, {H} hidden, T = {T}, DP5 at 1e-3, "
          f"{args.threads} thread(s), median of {args.repeats}\n")
    print("| gradient | library | step time (s) | forward NFE | loss | saved bytes | time ratio pylux/peer |")
    print("|---|---|---|---|---|---|---|")
    for label, ours_rows, peer in rows:
        for name, ours in ours_rows:
            ratio = f"{ours[0] / peer[0]:.2f}x" if peer else "-"
            print(f"| {label} | {name} | {ours[0]:.3f} | {ours[1]} | {ours[2]:.6f} | {ours[3]:.3g} | {ratio} |")
        if peer:
            print(f"| {label} | torchcde + torchdiffeq | {peer[0]:.3f} | {peer[1]} | {peer[2]:.6f} | {peer[3]:.3g} | |")
    ratio = f"{floor[0] / rows[0][2][0]:.2f}x" if rows[0][2] else "-"
    print(f"| backprop, floor: {floor_nfe} evaluations f(z) dX alone | - | {floor[0]:.3f} | {floor[1]} | - | "
          f"{floor[3]:.3g} | {ratio} |")


if __name__ == "__main__":
    main()
