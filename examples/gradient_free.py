r"""Gradient-free training on the flat parameter vector: scipy's Powell and COBYLA, and CMA-ES.

    python examples/gradient_free.py              # a few seconds on one CPU core
    python examples/gradient_free.py --evaluations 600

The regression of a closed curve in polar form, as in the Lux chapter of Pal's
thesis (gradient-free optimizers through Optimization.jl on a
``ComponentArray``): a small network :math:`r_\theta(\phi)` of the angle,
fed :math:`(\cos\phi, \sin\phi)` so that it is periodic, is fitted to samples of
the rose-like curve :math:`r(\phi) = 1 + 0.3\cos 3\phi` (our choice of curve)
by minimising the mean squared error

.. math::  L(\theta) = \frac{1}{N}\sum_{i=1}^{N} \bigl(r_\theta(\phi_i) - r(\phi_i)\bigr)^2 .

Every optimizer sees only :math:`L` as a function of one float64 vector
:math:`\theta \in \mathbb{R}^{n}`: :func:`pylux.flatten` turns the parameter tree
into that vector and back (the ComponentArray idea), so any black-box optimizer
that takes a numpy vector can train a pylux model. Compared: Powell's conjugate
direction method and COBYLA (Powell's derivative-free trust-region method by
linear approximations, a relative of NEWUOA) from ``scipy.optimize``, CMA-ES
(Hansen's covariance matrix adaptation, the ``cma`` package, optional: skipped
with a message when it is not installed), and Adam on the gradient as the
reference. Printed: the final loss, the number of loss evaluations and the time.
COBYLA's time is mostly its own bookkeeping (scipy's implementation is in
Python), not the loss, which takes about 50 µs per evaluation here.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import pylux as lx
from pylux import nn

F64 = torch.float64


def curve_data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles ``phi`` of shape ``(n,)`` evenly spaced in [0, 2π) and radii ``r = 1 + 0.3 cos 3φ``."""
    phi = torch.arange(n, dtype=F64) * (2 * torch.pi / n)
    return phi, 1.0 + 0.3 * torch.cos(3 * phi)


class Objective:
    """:math:`L(\\theta)` of the flat parameter vector, as a numpy-in, float-out function; counts its calls."""

    def __init__(self, hidden: int = 8, seed: int = 0, n: int = 64):
        self.model = nn.Chain(nn.Dense(2, hidden, torch.tanh), nn.Dense(hidden, 1))
        ps, self.st = lx.setup(torch.Generator().manual_seed(seed), self.model, dtype=F64)
        self.theta0, self.unflatten = lx.flatten(ps)
        self.phi, self.r = curve_data(n)
        self.features = torch.stack((torch.cos(self.phi), torch.sin(self.phi)), dim=1)
        self.evaluations = 0

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        prediction, _ = self.model(self.features, self.unflatten(theta), self.st)
        return (prediction[:, 0] - self.r).pow(2).mean()

    def __call__(self, theta: np.ndarray) -> float:
        self.evaluations += 1
        with torch.no_grad():
            return float(self.loss(torch.as_tensor(np.asarray(theta, dtype=np.float64))))

    def predict(self, theta) -> torch.Tensor:
        with torch.no_grad():
            return self.model(self.features, self.unflatten(torch.as_tensor(np.asarray(theta))), self.st)[0][:, 0]


def powell(objective: Objective, evaluations: int) -> np.ndarray:
    from scipy.optimize import minimize  # noqa: PLC0415 (scipy is in the test extra, not a dependency)
    return minimize(objective, objective.theta0.numpy(), method="Powell",
                    options={"maxfev": evaluations, "xtol": 1e-8, "ftol": 1e-12}).x


def cobyla(objective: Objective, evaluations: int) -> np.ndarray:
    from scipy.optimize import minimize  # noqa: PLC0415
    return minimize(objective, objective.theta0.numpy(), method="COBYLA",
                    options={"maxiter": evaluations, "rhobeg": 0.2}).x


def cmaes(objective: Objective, evaluations: int) -> np.ndarray:
    import cma  # noqa: PLC0415 (optional: pip install cma)
    strategy = cma.CMAEvolutionStrategy(objective.theta0.numpy(), 0.3,
                                        {"maxfevals": evaluations, "seed": 1, "verbose": -9})
    strategy.optimize(objective)
    return strategy.result.xbest


def adam(objective: Objective, evaluations: int) -> np.ndarray:
    """The gradient-based reference: one evaluation = one loss and gradient."""
    theta = objective.theta0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=0.02)
    for _ in range(evaluations):
        optimizer.zero_grad()
        objective.evaluations += 1
        objective.loss(theta).backward()
        optimizer.step()
    return theta.detach().numpy()


METHODS = {"Powell (scipy)": powell, "COBYLA (scipy)": cobyla, "CMA-ES (cma)": cmaes, "Adam (gradients)": adam}


def run(evaluations: int = 2000, methods=tuple(METHODS), seed: int = 0) -> dict:
    """Fit the curve with each method from the same initial vector; returns per-method results."""
    results = {}
    for name in methods:
        objective = Objective(seed=seed)
        initial = objective(objective.theta0.numpy())
        objective.evaluations = 0
        start = time.perf_counter()
        try:
            theta = METHODS[name](objective, evaluations)
        except ImportError as error:
            print(f"{name}: skipped, {error.name} is not installed (pip install {error.name})")
            continue
        seconds, used = time.perf_counter() - start, objective.evaluations
        results[name] = {"initial_loss": initial, "loss": objective(theta), "evaluations": used, "time_s": seconds,
                         "parameters": int(theta.size), "theta": theta}
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=2000, help="loss evaluations per method (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial parameters")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = run(args.evaluations, seed=args.seed)
    any_result = next(iter(results.values()))
    print(f"fitting r(phi) = 1 + 0.3 cos(3 phi) with a {any_result['parameters']}-parameter network; "
          f"initial loss {any_result['initial_loss']:.4f}")
    print(f"{'method':18s} {'final loss':>11s} {'evaluations':>11s} {'time (s)':>9s}")
    for name, r in results.items():
        print(f"{name:18s} {r['loss']:11.2e} {r['evaluations']:11d} {r['time_s']:9.2f}")
    return results


if __name__ == "__main__":
    main()
