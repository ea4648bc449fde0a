"""Gradients through an ODE solve: every sensitivity algorithm on one neural ODE.

    python examples/neural_ode_gradients.py

A NeuralODE layer (an MLP vector field) maps a batch of states to their
values at t = 1; the loss is their mean square. For each sensealg the script
prints the forward NFE, the backward counters from the layer's state
(``st["backward_stats"]``) and the largest relative difference of its
gradient from backpropagation through the solver (DirectAdjoint), in float64.
Seconds on a laptop CPU; nothing is downloaded.
"""

import torch

import pylux as lx
from pylux import nn

F64 = torch.float64


def gradients(sensealg):
    field = nn.Chain(nn.Dense(4, 32, torch.tanh), nn.Dense(32, 4))
    layer = lx.NeuralODE(field, (0.0, 1.0), lx.Tsit5(), sensealg=sensealg, reltol=1e-8, abstol=1e-8)
    ps, st = lx.setup(torch.Generator().manual_seed(0), layer, dtype=F64)
    leaves = lx.core.tree_leaves(ps)
    for leaf in leaves:
        leaf.requires_grad_(True)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    y, st = layer(x, ps, st)
    grads = torch.autograd.grad(y.pow(2).mean(), leaves)
    return torch.cat([g.reshape(-1) for g in grads]), st


def main():
    reference, _ = gradients(lx.DirectAdjoint())
    algorithms = [lx.BacksolveAdjoint(), lx.BacksolveAdjoint(seminorm=True), lx.InterpolatingAdjoint(),
                  lx.InterpolatingAdjoint(checkpointing=4), lx.QuadratureAdjoint(), lx.ReversibleAdjoint()]
    print(f"{'sensealg':58s} {'fwd NFE':>8s} {'bwd NFE':>8s} {'bwd VJPs':>9s} {'rel. diff to Direct':>20s}")
    for alg in algorithms:
        grad, st = gradients(alg)
        diff = float((grad - reference).abs().max() / reference.abs().max())
        back = st["backward_stats"]
        print(f"{alg!r:58s} {st['nfe']:8d} {back['nf']:8d} {back['nvjp']:9d} {diff:20.2e}")


if __name__ == "__main__":
    main()
