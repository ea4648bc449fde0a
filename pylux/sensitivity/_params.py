"""Explicit parameters for the adjoints.

An adjoint differentiates with respect to the parameter tree it was given,
never with respect to tensors it discovers somewhere else. Tensors that
require grad but reach ``f`` through a closure would silently get a zero
gradient under a continuous adjoint (the most common confusion of
torchdiffeq's users); :func:`check_no_hidden_parameters` finds them on the
first evaluation of ``f`` and raises instead.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..core import tree_leaves_with_path, tree_replace_at_paths
from ..diffeq import Solution, integrate

__all__ = ["HiddenParameterError", "grad_leaves", "check_no_hidden_parameters",
           "apply_adjoint_function", "BackwardStats", "refuse_higher_order", "solve_detached"]


class HiddenParameterError(ValueError):
    """``f`` uses tensors that require grad but are not in the problem's parameters ``p``."""


def grad_leaves(p: Any) -> list[tuple[tuple, torch.Tensor]]:
    """``(path, leaf)`` for every tensor of the parameter tree that requires grad."""
    return [(path, leaf) for path, leaf in tree_leaves_with_path(p) if leaf.requires_grad]


def check_no_hidden_parameters(output: torch.Tensor, inputs: Sequence[torch.Tensor],
                               where: str = "f") -> None:
    """Raise :class:`HiddenParameterError` if ``output``'s graph reaches an autograd leaf
    that requires grad and is not one of ``inputs``.

    Walks the autograd graph once (on the first evaluation of ``f``); the cost
    is one pass over the graph's nodes, no tensor work.
    """
    if output.grad_fn is None:
        return
    allowed = {id(t) for t in inputs}
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in allowed:
            raise HiddenParameterError(
                f"{where} uses a tensor of shape {tuple(variable.shape)} that requires grad but is not part of "
                "the problem's parameters p, so an adjoint method would give it no gradient. Pass every "
                "trainable tensor through p (f(u, p, t)), detach it, or use sensealg=DirectAdjoint().")
        for next_node, _ in node.next_functions:
            if next_node is not None:
                stack.append(next_node)


class BackwardStats(dict):
    """Counters of one solve's backward pass, filled in when that backward pass runs.

    Keys: ``nf`` (evaluations of ``f`` or of the augmented field), ``nvjp``
    (vector–Jacobian products), and per algorithm ``naccept``/``nreject`` (the
    backward solve's steps), ``nf_forward_resolve`` (checkpointed re-solves),
    ``nquadrature`` (quadrature nodes), ``nsteps`` and ``reconstruction_error``
    (reversible). Empty until ``backward()`` has run through the solve.
    """


def apply_adjoint_function(function, alg, problem, solver, options) -> Solution:
    """Run an adjoint's ``torch.autograd.Function`` with ``p``'s grad leaves as explicit inputs.

    ``function.forward(ctx, alg, problem, solver, options, paths, holder, u0, *params)``
    returns the saved states and puts the forward :class:`Solution` in
    ``holder["solution"]``, and its backward fills ``holder["backward_stats"]``
    (returned as ``sol.backward_stats``, a :class:`BackwardStats`); autograd routes
    the gradient to ``u0`` and to every tensor of the parameter tree that requires grad.
    """
    pairs = grad_leaves(problem.p)
    paths = [path for path, _ in pairs]
    params = [leaf for _, leaf in pairs]
    if torch.is_grad_enabled() and not params and not problem.u0.requires_grad:
        _refuse_closure_only_gradients(problem, type(alg).__name__)
    holder: dict = {"backward_stats": BackwardStats()}
    u = function.apply(alg, problem, solver, options, paths, holder, problem.u0, *params)
    sol = holder["solution"]
    out = Solution(sol.t, u, sol.retcode, sol.stats, message=sol.message, solver=solver)
    out.backward_stats = holder["backward_stats"]
    return out


def _refuse_closure_only_gradients(problem, where: str, t0=None) -> None:
    """Raise before the solve when ``f`` depends on a tensor that requires grad while neither ``u0`` nor
    ``p`` does: the adjoint's backward would never run, so that tensor would silently get no gradient.

    Costs one evaluation of ``f`` at ``(u0, t0)``, only in that case (with grad enabled and
    nothing to differentiate with respect to). ``t0``: the start time as a tensor (a per-sample
    solve's ``(B,)`` starts); default the problem's.
    """
    if t0 is None:
        t0 = torch.full((), problem.tspan[0], dtype=problem.time_dtype, device=problem.u0.device)
    with torch.enable_grad():
        out = problem.f(problem.u0.detach(), problem.p, t0)
    if isinstance(out, torch.Tensor) and out.requires_grad:
        check_no_hidden_parameters(out, [], where=f"{where}: f")


def gradients_by_saved_time(times, t0: float, grad_u) -> tuple[dict, "torch.Tensor | None"]:
    """``({t: dL/du(t)}, dL/du(t0) or None)`` from the rows of a solve's output gradient.

    Rows saved at the same time are summed; the row at ``t0`` (the initial state itself) is split off.
    """
    grad_at: dict = {}
    for row, t in enumerate(times):
        grad_at[t] = grad_at[t] + grad_u[row] if t in grad_at else grad_u[row]
    grad_start = grad_at.pop(t0, None) if times and times[0] == t0 else None
    return grad_at, grad_start


def check_all_gradients_used(grad_at: dict, where: str) -> None:
    """Raise when a saved time's gradient was never met on the backward walk (it would be dropped silently)."""
    if grad_at:
        raise RuntimeError(f"{where}: the backward pass did not reach the saved times {sorted(grad_at)}; their "
                           "gradients would be lost. Please report this with the solve's tspan, saveat and dt")


def refuse_higher_order(name: str) -> None:
    """Raise in an adjoint's backward when autograd asks for a differentiable gradient.

    Inside ``Function.backward`` grad mode is on exactly when the caller passed
    ``create_graph=True``; the adjoints' gradients are not themselves
    differentiable, and returning them as constants would make every second
    derivative through the solve silently zero.
    """
    if torch.is_grad_enabled():
        raise NotImplementedError(
            f"{name}: second derivatives through an adjoint solve are not supported (the gradient it "
            "returns is not differentiable); for gradient penalties or Hessian-vector products use "
            "sensealg=DirectAdjoint(), which backpropagates through the solver's operations")


def solve_detached(problem, solver, options, paths, u0, params):
    """``(solution, detached parameters)``: the forward solve of an adjoint's ``Function.forward``.

    The parameters at ``paths`` are replaced by detached copies and the solve runs without autograd; the
    backward pass differentiates it its own way.
    """
    detached = [x.detach() for x in params]
    p = tree_replace_at_paths(problem.p, paths, detached) if paths else problem.p
    with torch.no_grad():
        sol = integrate(problem.term.bind(p), u0.detach(), *problem.tspan, solver, options)
    return sol, detached
