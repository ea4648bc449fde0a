"""Backpropagation through the solver at a memory budget: binomial (revolve) checkpointing.

``DirectAdjoint(checkpoints=c)`` gives the gradient of the discrete solve — the
same numbers as plain :class:`~pylux.sensitivity.DirectAdjoint` up to the order in
which floating-point sums are taken — while holding at most ``c`` states of the
solve (plus one step's stages) instead of every stage of every step.

The schedule is Griewank's binomial checkpointing (A. Griewank, "Achieving
logarithmic growth of temporal and spatial complexity in reverse automatic
differentiation", Optim. Methods Softw. 1, 1992; A. Griewank & A. Walther,
"Algorithm 799: revolve", ACM TOMS 26, 2000). With
:math:`\\beta(s, r) = \\binom{s + r}{s}` and the *repetition number* :math:`r`,
the least integer with :math:`\\beta(c, r) \\ge n`, reversing ``n`` steps with
``c`` stored states (the initial one included) needs

.. math::
    t(n, c) = r\\,n - \\beta(c + 1, r - 1)

forward steps that are not taped ("advances"), and no schedule needs fewer.
The recursion behind it reverses ``[a, a + n)`` from a stored state at ``a``:
advance ``m`` steps, store the state at ``a + m``, reverse ``[a + m, a + n)`` with
one slot fewer, free that slot, reverse ``[a, a + m)``. A split ``m`` is optimal
exactly when both halves stay within their repetition budget:

.. math::
    \\max(\\beta(c, r-2),\\; n - \\beta(c-1, r)) \\le m \\le
    \\min(\\beta(c, r-1),\\; n - \\beta(c-1, r-1)),

which :func:`binomial_split` uses (the tests check it against a dynamic
programme over every split).

Adaptive solves are checkpointed the same way: the forward solve (the one loop,
without autograd) records each accepted step's host ``t`` and ``t + dt``; once it
has ended the step count is known, and the backward pass runs the binomial
schedule over the recorded steps. Recomputing a step from a stored state with
its recorded ``dt`` repeats the forward computation operation for operation, so
the replayed states are bitwise those of the forward solve (step sizes are host
numbers in the loop, so no gradient flows through them under plain Direct
either). Each step is taped once, as the schedule reaches it, and reversed by one
vector–Jacobian product of the step map ``(u_n, k_n) -> (u_{n+1}, k_{n+1},
saved values)``, where ``k`` is the first-same-as-last stage the solver carries.

Costs: the forward solve's ``n`` steps, then ``t(n, c)`` advances and ``n`` taped
steps with their VJPs; memory: ``c`` states (``u`` and, for FSAL methods, ``k``),
one step's stages, and the host list of step times. ``c >= n`` stores every
state after one forward sweep (``n - 1`` advances).
"""

from __future__ import annotations

from math import comb

import torch

from ..core import tree_replace_at_paths
from ..diffeq import ODEProblem, Solution
from ..diffeq._device import time_scalar
from ..diffeq.integrate import CountingField, Saver
from ..diffeq.options import SolveOptions
from ..diffeq.sde import SDEProblem
from ..diffeq.solvers import ExplicitRungeKutta, RKState
from ._params import apply_adjoint_function, check_no_hidden_parameters, refuse_higher_order, solve_detached

__all__ = ["binomial", "repetition_number", "binomial_cost", "binomial_split", "binomial_schedule",
           "check_checkpoints", "checkpointed_solve"]


def binomial(s: int, r: int) -> int:
    """:math:`\\beta(s, r) = \\binom{s + r}{s}`: the most steps ``s`` stored states reverse with ``r`` repetitions
    (0 for ``r < 0``)."""
    return comb(s + r, s) if r >= 0 else 0


def repetition_number(steps: int, checkpoints: int) -> int:
    """The least ``r`` with :math:`\\beta(c, r) \\ge n` (Griewank's repetition number)."""
    r = 0
    while binomial(checkpoints, r) < steps:
        r += 1
    return r


def binomial_cost(steps: int, checkpoints: int) -> int:
    """The minimal number of untaped forward steps to reverse ``steps`` steps with ``checkpoints`` stored states,
    :math:`t(n, c) = r n - \\beta(c + 1, r - 1)` (Griewank & Walther 2000, Prop. 1)."""
    if steps <= 1:
        return 0
    r = repetition_number(steps, checkpoints)
    return r * steps - binomial(checkpoints + 1, r - 1)


def binomial_split(steps: int, checkpoints: int) -> int:
    """An optimal first advance ``m`` when reversing ``steps >= 2`` steps with ``checkpoints >= 2`` states: the
    largest ``m`` of the optimal interval in the module docstring."""
    r = repetition_number(steps, checkpoints)
    s = checkpoints
    high = min(steps - 1, binomial(s, r - 1), steps - binomial(s - 1, r - 1))
    low = max(1, binomial(s, r - 2), steps - binomial(s - 1, r))
    if low > high:  # cannot happen for steps >= 2, checkpoints >= 2 (the tests check every small case)
        raise RuntimeError(f"binomial_split: empty optimal interval for {steps} steps, {checkpoints} checkpoints")
    return high


def binomial_schedule(steps: int, checkpoints: int) -> list[tuple[str, int]]:
    """The actions that reverse ``steps`` steps from the stored state 0 with at most ``checkpoints`` stored states.

    Actions, executed in order on a *current state* (an index into the steps):

    * ``("restore", a)`` — the current state becomes the stored state ``a``;
    * ``("advance", a)`` — step the current state from ``a`` to ``a + 1`` without taping;
    * ``("store", a)`` — store the current state (at ``a``);
    * ``("reverse", a)`` — tape the step from the current state ``a`` and backpropagate through it;
    * ``("free", a)`` — drop the stored state ``a``.

    State 0 is stored before the schedule starts (it counts as one of the ``checkpoints``).
    The number of ``advance`` actions is :func:`binomial_cost`.
    """
    if checkpoints < 1:
        raise ValueError(f"binomial_schedule: checkpoints must be >= 1, got {checkpoints}")
    actions: list[tuple[str, int]] = []
    # explicit stack: the recursion is as deep as the number of stored states
    tasks: list[tuple] = [("reverse", 0, steps, min(checkpoints, max(steps, 1)))] if steps else []
    while tasks:
        task = tasks.pop()
        if task[0] == "free":
            actions.append(("free", task[1]))
            continue
        _, start, n, slots = task
        if n == 1:
            actions += [("restore", start), ("reverse", start)]
        elif slots == 1:
            for j in range(n - 1, -1, -1):
                actions.append(("restore", start))
                actions += [("advance", start + i) for i in range(j)]
                actions.append(("reverse", start + j))
        else:
            m = binomial_split(n, slots)
            actions.append(("restore", start))
            actions += [("advance", start + i) for i in range(m)]
            actions.append(("store", start + m))
            tasks += [("reverse", start, m, slots), ("free", start + m), ("reverse", start + m, n - m, slots - 1)]
    return actions


def check_checkpoints(checkpoints) -> int | None:
    """``checkpoints`` if it is ``None`` or an integer >= 1; else a clear error."""
    if checkpoints is None:
        return None
    if isinstance(checkpoints, bool) or not isinstance(checkpoints, int):
        raise TypeError(f"DirectAdjoint: checkpoints must be an integer >= 1 (the number of stored states) or "
                        f"None (store every step), got {checkpoints!r}")
    if checkpoints < 1:
        raise ValueError(f"DirectAdjoint: checkpoints must be >= 1 (the initial state is one of them), got "
                         f"{checkpoints}")
    return checkpoints


def checkpointed_solve(alg, problem: ODEProblem, solver, options: SolveOptions) -> Solution:
    """The solve of ``DirectAdjoint(checkpoints=c)``: see the module docstring."""
    where = f"{alg!r}"
    if isinstance(problem, SDEProblem):
        raise NotImplementedError(f"{where}: checkpointed backpropagation of SDE solves is not implemented; use "
                                  "DirectAdjoint() (every step stored) or ReversibleAdjoint() with ReversibleHeun()")
    if not isinstance(solver, ExplicitRungeKutta):
        raise TypeError(f"{where}: checkpointing replays one-step explicit Runge–Kutta methods (Tsit5(), DP5(), "
                        f"BS3(), RK4(), ...), got {solver!r}; use DirectAdjoint() without checkpoints for it")
    if options.save_stats:
        raise NotImplementedError(f"{where}: save_stats=True (differentiable per-step error estimates) needs "
                                  "every step on the tape; use DirectAdjoint() without checkpoints")
    if options.dense:
        raise NotImplementedError(f"{where}: dense=True keeps every step's stages, which checkpointing avoids; "
                                  "pass saveat=... or use DirectAdjoint() without checkpoints")
    options = options.replace(save_steps=True)
    return apply_adjoint_function(_CheckpointedFunction, alg, problem, solver, options)


class _RowCounter:
    """A stand-in interpolant: ``evaluate`` returns one empty row per requested time (for the row layout)."""

    @staticmethod
    def evaluate(thetas):
        return torch.empty((len(thetas), 0))


def _row_layout(t0: float, t1: float, options: SolveOptions, steps, t_final: float):
    """Which rows of ``sol.u`` each accepted step saves, by running the :class:`Saver` on empty tensors.

    Returns ``(start_rows, per_step, final_rows, positions, total)``: the row range of ``u0``, each step's row
    range, the range of the final state's row, and the saver's position before each step.
    """
    saver = Saver(t0, t1, options)
    marker = torch.empty(0)
    saver.start(marker)
    start_rows = (0, len(saver.times))
    per_step, positions = [], []
    for t, _, t_new in steps:
        positions.append(saver.next_target)
        before = len(saver.times)
        saver.on_step(t, t_new, marker, _RowCounter())
        per_step.append((before, len(saver.times)))
    before = len(saver.times)
    saver.finish(t_final, marker)
    return start_rows, per_step, (before, len(saver.times)), positions, len(saver.times)


class _CheckpointedFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, alg, problem, solver, options, paths, holder, u0, *params):
        sol, detached = solve_detached(problem, solver, options, paths, u0, params)
        holder["solution"] = sol
        ctx.alg, ctx.problem, ctx.solver, ctx.options, ctx.paths = alg, problem, solver, options, paths
        t0 = problem.tspan[0]
        ctx.steps = [(t, t_new - t, t_new) for t, t_new in sol.stats.steps] if sol.stats.steps else []
        ctx.t_final = ctx.steps[-1][2] if ctx.steps else t0
        ctx.backward_stats = holder["backward_stats"]
        ctx.save_for_backward(u0.detach(), *detached)
        return sol.u.detach()

    @staticmethod
    def backward(ctx, grad_u):
        refuse_higher_order(repr(ctx.alg))
        u0, *params = ctx.saved_tensors
        with torch.enable_grad():
            ps_ = [x.detach().requires_grad_(True) for x in params]
            sweep = _ReverseSweep(ctx, u0, ps_, grad_u)
            grad_u0, grad_params = sweep.run()
        ctx.backward_stats.update(sweep.counters)
        return (None, None, None, None, None, None, grad_u0, *grad_params)


class _ReverseSweep:
    """Runs :func:`binomial_schedule` over the recorded steps and accumulates the adjoints."""

    def __init__(self, ctx, u0, ps_, grad_u) -> None:
        problem, options = ctx.problem, ctx.options
        self.solver, self.steps, self.ps_, self.grad_u = ctx.solver, ctx.steps, ps_, grad_u
        self.time = (options.time_dtype, u0.device)
        p = tree_replace_at_paths(problem.p, ctx.paths, ps_) if ctx.paths else problem.p
        self.field = CountingField(problem.term.bind(p), u0)
        self.u0 = u0
        t0, t1 = problem.tspan
        self.t0 = t0
        layout = _row_layout(t0, t1, options, self.steps, ctx.t_final)
        self.start_rows, self.step_rows, self.final_rows, self.positions, total = layout
        if total != grad_u.shape[0]:
            raise RuntimeError(f"{ctx.alg!r}: the saved rows ({grad_u.shape[0]}) do not match the replayed layout "
                               f"({total}); please report this with the solve's tspan, saveat and dt")
        self.saver = Saver(t0, t1, options)
        self.checkpoints = ctx.alg.checkpoints
        self.counters = {"nf": 0, "nvjp": 0, "nsteps": len(self.steps), "nrecompute": 0, "ntaped": 0,
                         "ncheckpoints": 0, "checkpoints": self.checkpoints}
        self.checked = False

    def _t(self, value: float) -> torch.Tensor:
        return time_scalar(value, *self.time)

    def _initial_k(self, u0):
        t0 = self._t(self.t0)
        return self.solver.init(self.field, t0, u0, self._t(0.0)).f_at_u

    def _advance(self, state, index: int):
        t, dt, _ = self.steps[index]
        u, k = state
        with torch.no_grad():
            res = self.solver.step(self.field, self._t(t), u, self._t(dt), RKState(k))
        return res.u_new, res.solver_state_new.f_at_u

    def _saved_block(self, index: int, result):
        """The values step ``index`` saves (``saveat`` by its interpolant, or ``u_new``), as the loop saves them."""
        saver = self.saver
        saver.next_target, saver.times, saver.blocks = self.positions[index], [], []
        t, _, t_new = self.steps[index]
        saver.on_step(t, t_new, result.u_new, result.dense_info)
        return torch.cat(saver.blocks) if len(saver.blocks) > 1 else saver.blocks[0]

    def _reverse(self, state, index: int, a_u, a_k, grad_params):
        """Tape step ``index`` from ``state`` and pull the adjoints of its outputs back to its inputs."""
        t, dt, _ = self.steps[index]
        u = state[0].detach().requires_grad_(True)
        k = state[1].detach().requires_grad_(True) if state[1] is not None else None
        res = self.solver.step(self.field, self._t(t), u, self._t(dt), RKState(k))
        inputs = [u] + ([k] if k is not None else []) + self.ps_
        if not self.checked:
            check_no_hidden_parameters(res.u_new, inputs, where=f"DirectAdjoint(checkpoints={self.checkpoints}): f")
            self.checked = True
        outputs, cotangents = [res.u_new], [a_u]
        k_new = res.solver_state_new.f_at_u
        if k_new is not None and a_k is not None:
            outputs.append(k_new)
            cotangents.append(a_k)
        r0, r1 = self.step_rows[index]
        if r1 > r0:
            outputs.append(self._saved_block(index, res))
            cotangents.append(self.grad_u[r0:r1])
        grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
        self.counters["nvjp"] += 1
        self.counters["ntaped"] += 1
        a_u = grads[0] if grads[0] is not None else torch.zeros_like(u)
        a_k = None
        if k is not None:
            a_k = grads[1] if grads[1] is not None else torch.zeros_like(k)
        _accumulate(grad_params, grads[len(inputs) - len(self.ps_):])
        return a_u, a_k

    def run(self):
        u0 = self.u0
        grad_params = [None] * len(self.ps_)
        n = len(self.steps)
        a_u = _rows_sum(self.grad_u, self.final_rows, u0)
        a_k = None
        if n:
            with torch.no_grad():
                stored = {0: (u0, self._initial_k(u0))}
            current, peak = None, 1
            for action, index in binomial_schedule(n, self.checkpoints):
                if action == "restore":
                    current = stored[index]
                elif action == "advance":
                    current = self._advance(current, index)
                    self.counters["nrecompute"] += 1
                elif action == "store":
                    stored[index] = current
                    peak = max(peak, len(stored))
                elif action == "free":
                    del stored[index]
                else:
                    a_u, a_k = self._reverse(current, index, a_u, a_k, grad_params)
                    current = None
            self.counters["ncheckpoints"] = peak
        if a_k is not None:
            # the first stage of an FSAL method is f(u0, t0), computed once before the first step
            u = u0.detach().requires_grad_(True)
            with torch.enable_grad():
                k0 = self._initial_k(u)
            grads = torch.autograd.grad(k0, [u, *self.ps_], a_k, allow_unused=True)
            self.counters["nvjp"] += 1
            if grads[0] is not None:
                a_u = a_u + grads[0]
            _accumulate(grad_params, grads[1:])
        a_u = a_u + _rows_sum(self.grad_u, self.start_rows, u0)
        self.counters["nf"] = self.field.count
        grad_params = [g if g is not None else torch.zeros_like(p) for g, p in zip(grad_params, self.ps_)]
        return a_u, grad_params


def _rows_sum(grad_u, rows, like):
    r0, r1 = rows
    if r1 == r0:
        return torch.zeros_like(like)
    return grad_u[r0:r1].sum(0)


def _accumulate(total: list, grads) -> None:
    for j, g in enumerate(grads):
        if g is not None:
            total[j] = g if total[j] is None else total[j] + g
