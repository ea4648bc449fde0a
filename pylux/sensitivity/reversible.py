"""Algebraically reversible Runge–Kutta solves: exact discrete gradients at O(1) memory.

The forward pass is the :class:`~pylux.diffeq.Reversible` solver on the shared
loop; this module is its backward pass.

McCallum & Foster, "Efficient, accurate and stable gradients for neural ODEs"
(2024): any explicit one-step method with increment
:math:`\\Psi_h(t, z) = \\mathrm{step}_h(t, z) - z` becomes algebraically reversible
by carrying a pair :math:`(Y_n, Z_n)`, :math:`Y_0 = Z_0 = u_0`, and stepping

.. math::
    Y_{n+1} = \\lambda Y_n + (1 - \\lambda) Z_n + \\Psi_{h}(t_n, Z_n), \\qquad
    Z_{n+1} = Z_n - \\Psi_{-h}(t_{n+1}, Y_{n+1}),

with coupling :math:`\\lambda \\in (0, 1]`. The output is :math:`Y_n`, which has
the order of the base method. The step inverts in closed form,

.. math::
    Z_n = Z_{n+1} + \\Psi_{-h}(t_{n+1}, Y_{n+1}), \\qquad
    Y_n = \\lambda^{-1} \\bigl(Y_{n+1} - (1 - \\lambda) Z_n - \\Psi_h(t_n, Z_n)\\bigr),

so the backward pass rebuilds every state from the final pair and needs only
the accepted step sizes from the forward pass: memory is constant in the
number of steps, and the gradient is the exact gradient of the discrete solve
(up to the floating-point error of the reconstruction, which the backward
pass reports). Each step costs two base steps forward and two base steps plus
two vector–Jacobian products backward, less one base step forward and one base step and
one product backward per solve: the last step's backward increment would only complete
:math:`Z_N`, which nothing reads (the output is :math:`Y`). :math:`\\lambda < 1` damps the
reconstruction error that :math:`\\lambda = 1` (the asynchronous leapfrog
limit) can let grow.

Adaptive stepping uses the base method's embedded error estimate of the
forward increment :math:`\\Psi_h(t_n, Z_n)`; a rejected step costs one base
step. The solve steps exactly onto every ``saveat`` time, so the saved values
are states of the discrete solve (no interpolation) and their gradients are exact.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..core import tree_replace_at_paths
from ..diffeq import AbstractSensitivityAlgorithm, ODEProblem, Reversible, Solution, integrate
from ..diffeq._device import time_vector
from ..diffeq.compiled import CompiledSolver
from ..diffeq.options import SolveOptions
from ..diffeq.sde import SDEProblem
from ..diffeq.solvers import ExplicitRungeKutta
from ._params import (apply_adjoint_function, check_all_gradients_used, check_no_hidden_parameters,
                      gradients_by_saved_time, refuse_higher_order)
from .reversible_sde import reversible_heun_solve

__all__ = ["ReversibleAdjoint"]


class ReversibleAdjoint(AbstractSensitivityAlgorithm):
    """Solve with the McCallum–Foster reversible version of an RK method; backprop by reconstruction.

    ``solve(prob, Tsit5(), sensealg=ReversibleAdjoint(coupling=0.999))`` integrates
    with :class:`~pylux.diffeq.Reversible` built around ``Tsit5`` (or around
    ``solver`` when given here), adaptive or with a fixed ``dt``, on the same
    loop as every solver.

    Args:
        solver: the base method (an explicit Runge–Kutta solver such as
            ``Tsit5()``, ``DP5()``, ``RK4()``, ``Midpoint()``); default: the
            solver passed to ``solve``.
        coupling: :math:`\\lambda \\in (0, 1]`, default 0.999 (the paper's). The
            reconstruction divides by :math:`\\lambda` once per step, so its rounding
            error grows like :math:`\\lambda^{-n}` over ``n`` steps
            (:math:`0.99^{-2000} \\approx 5 \\cdot 10^{8}`, :math:`0.999^{-2000} \\approx 7`);
            smaller values damp the forward ``Y - Z`` mode harder but suit only
            short solves. ``sol.backward_stats["reconstruction_error"]`` tells.
        backprop: if True, backpropagate through every operation of the same
            reversible solve instead (memory grows with the number of steps) —
            the reference the O(1)-memory backward pass is checked against.

    After ``backward()``, the solve's ``sol.backward_stats`` holds ``nf``
    (evaluations of ``f``: the base steps rebuilt on the tape, two per step but one in the
    last), ``nvjp`` (vector–Jacobian products, each through one whole base step:
    ``2 * nsteps - 1``), ``nsteps`` and ``reconstruction_error``: the largest absolute
    difference between the rebuilt ``(Y_0, Z_0)`` and ``u0``.

    Raises:
        TypeError: a base solver that is not an explicit Runge–Kutta method
            (multistep methods are not one-step maps).
        ValueError: a coupling outside (0, 1].
        NotImplementedError: termination callbacks or ``save_stats=True``
            (use :class:`~pylux.sensitivity.DirectAdjoint`).
    """

    def __init__(self, solver: ExplicitRungeKutta | None = None, *, coupling: float = 0.999,
                 backprop: bool = False) -> None:
        if solver is not None and not isinstance(solver, ExplicitRungeKutta):
            raise TypeError(f"ReversibleAdjoint: the base solver must be an explicit Runge–Kutta method "
                            f"such as Tsit5(), got {solver!r}")
        if isinstance(coupling, bool) or not isinstance(coupling, (int, float)) or not 0 < coupling <= 1:
            raise ValueError(f"ReversibleAdjoint: coupling (lambda) must be in (0, 1], got {coupling!r}")
        if not isinstance(backprop, bool):
            raise TypeError(f"ReversibleAdjoint: backprop must be True or False, got {backprop!r}")
        self.solver = solver
        self.coupling = float(coupling)
        self.backprop = backprop
        self._compile_mode: str | None = None  # set per solve by solve(..., compile=...)

    def __repr__(self) -> str:
        base = f"{self.solver!r}, " if self.solver is not None else ""
        return f"ReversibleAdjoint({base}coupling={self.coupling}{', backprop=True' if self.backprop else ''})"

    #: an SDE solved with ReversibleHeun: the same reconstruction (Kidger et al. 2021)
    handles_sde = True

    #: ``solve(..., compile=True)``: every forward step and every backward-sweep step runs as one compiled graph
    compiles_backward = True

    def solve_with(self, problem: ODEProblem, solver, options: SolveOptions) -> Solution:
        compile_mode = None
        if getattr(solver, "compiled", False):  # solve(..., compile=True): the forward steps and the sweep's compile
            compile_mode, solver = solver.mode, solver.base
            if isinstance(problem, SDEProblem):
                raise NotImplementedError("ReversibleAdjoint: compile=True is not supported for SDEs (the "
                                          "reversible Heun sweep runs eagerly); pass compile=False")
        base = self.solver if self.solver is not None else solver
        if isinstance(problem, SDEProblem):
            self._refuse_unsupported(options)
            return reversible_heun_solve(self, problem, solver, options)
        if not isinstance(base, ExplicitRungeKutta):
            raise TypeError(f"ReversibleAdjoint: the base solver must be an explicit Runge–Kutta method "
                            f"such as Tsit5(); {base!r} is not a one-step method")
        self._refuse_unsupported(options)
        reversible = Reversible(base, self.coupling)
        # the accepted steps' t and dt are what the backward pass needs (host floats)
        options = options.replace(save_steps=True)
        if self.backprop:
            if compile_mode is not None:
                raise NotImplementedError("ReversibleAdjoint(backprop=True) differentiates the eager solve; "
                                          "pass compile=False")
            return integrate(problem.term.bind(problem.p), problem.u0, *problem.tspan, reversible, options)
        self._compile_mode = compile_mode
        if compile_mode is not None:
            reversible = CompiledSolver(reversible, options, compile_mode)
        return apply_adjoint_function(_ReversibleFunction, self, problem, reversible, options)

    @staticmethod
    def _refuse_unsupported(options: SolveOptions) -> None:
        if options.callbacks:
            raise NotImplementedError("ReversibleAdjoint: termination callbacks are not supported (the "
                                      "backward pass starts from a fixed final time); use DirectAdjoint()")
        if options.save_stats:
            raise NotImplementedError("ReversibleAdjoint: save_stats=True needs DirectAdjoint(); for "
                                      "error-estimate regularization with this sensealg use "
                                      "LocalErrorRegularization")
        if options.dense:
            raise NotImplementedError("ReversibleAdjoint: dense=True is not supported (the reversible pair "
                                      "has no interpolant; the solve steps onto every saveat time). Pass "
                                      "saveat=... for the times you need, or use DirectAdjoint() for sol(t)")


def _accepted_steps(sol: Solution) -> list[tuple[float, float, float]]:
    # the exact host grid: t + dt rounded through a float32 time tensor need not be the saved time
    return [(t, t_new - t, t_new) for t, t_new in sol.stats.steps]


class _ReversibleFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, alg, problem, reversible, options, paths, holder, u0, *params):
        detached = [x.detach() for x in params]
        p = tree_replace_at_paths(problem.p, paths, detached) if paths else problem.p
        with torch.no_grad():
            term = problem.term.bind(p)
            sol = integrate(term, u0.detach(), *problem.tspan, reversible, options)
            y, state = sol.final_state
            # the sweep starts from (Y_N, Z_{N-1}): completing Z_N with the last step's backward
            # increment Ψ_{-h}(t_N, Y_N) would cost a base step here and another in the sweep (whose
            # cotangent, the adjoint of Z_N, is zero: the solution is Y alone)
            z = state.z if state is not None else y
        holder["solution"] = sol
        pair = reversible.base if isinstance(reversible, CompiledSolver) else reversible
        ctx.alg, ctx.problem, ctx.reversible, ctx.paths = alg, problem, pair, paths
        ctx.compile_mode = alg._compile_mode
        ctx.steps, ctx.times, ctx.t0 = _steps_of(sol), sol.t.tolist(), problem.tspan[0]
        ctx.time = (options.time_dtype, u0.device)
        abstol = options.abstol
        ctx.tolerances = (float(abstol.max()) if isinstance(abstol, torch.Tensor) else float(abstol),
                          float(options.reltol))
        # the reconstruction's round-off scales with the path's largest |Y| (the pair's record), not |u0|
        gap = getattr(state, "gap", None)
        ctx.size = gap[1] if gap is not None else (u0.detach().abs().amax() if u0.numel() else u0.new_zeros(()))
        ctx.coupling = pair.coupling
        ctx.backward_stats = holder["backward_stats"]
        ctx.save_for_backward(u0.detach(), y, z, *detached)
        return sol.u.detach()

    @staticmethod
    def backward(ctx, grad_u):
        refuse_higher_order("ReversibleAdjoint")
        u0, y, z, *params = ctx.saved_tensors
        counter = {"nf": 0, "nvjp": 0}
        with torch.enable_grad():
            ps_ = [x.detach().requires_grad_(True) for x in params]
            field = _counted_field(ctx, ps_, u0, counter)
            grad_at, grad_start = gradients_by_saved_time(ctx.times, ctx.t0, grad_u)
            a_y, a_z, a_theta, y, z = _reverse_sweep(ctx, field, y.detach(), z.detach(), grad_at, params, ps_,
                                                     counter)
        check_all_gradients_used(grad_at, "ReversibleAdjoint")
        grad_u0 = a_y + a_z
        if grad_start is not None:
            grad_u0 = grad_u0 + grad_start
        error = torch.maximum((y - u0).abs().max(), (z - u0).abs().max()) if u0.numel() else u0.new_zeros(())
        # one transfer: the reconstruction error and whether every gradient is finite (a sum is finite only
        # if each summand is)
        checks = torch.stack([error.double(), ctx.size.double()]
                             + [torch.isfinite(g).all().double() for g in (grad_u0, *a_theta)
                                if g is not None and g.numel()]).tolist()
        ctx.backward_stats.update(nf=counter["nf"], nvjp=counter["nvjp"], nsteps=len(ctx.steps),
                                  reconstruction_error=checks[0])
        abstol, reltol = ctx.tolerances
        _check_reconstruction(checks[0], abstol + reltol * checks[1], all(checks[2:]), ctx.coupling,
                              len(ctx.steps))
        return (None, None, None, None, None, None, grad_u0, *a_theta)


#: a backward pass whose rebuilt u0 misses the true one by more than this many tolerances is refused (generous:
#: a moderate growth such as 0.99 ** -2345 passes, its error in backward_stats; an overflow does not)
RECONSTRUCTION_LIMIT = 1e4


def _check_reconstruction(error: float, tolerance: float, finite: bool, coupling: float, steps: int) -> None:
    """Raise if the reverse sweep did not rebuild the forward solve (``error``, the distance of the rebuilt
    ``(Y_0, Z_0)`` from ``u0``, against ``tolerance``) or a gradient is NaN/Inf (``finite`` False): the
    inverse step divides by the coupling, so its round-off grows like ``coupling ** -steps``."""
    rebuilt = math.isfinite(error) and error <= RECONSTRUCTION_LIMIT * tolerance
    if rebuilt and finite:
        return
    if rebuilt:  # the states were rebuilt: the NaN/Inf comes from f's derivatives, not from the coupling
        raise FloatingPointError(
            f"ReversibleAdjoint: the gradient is NaN/Inf although the backward pass rebuilt the forward solve "
            f"(to {error:.3g}): a vector-Jacobian product of f overflowed or is undefined along the solution "
            "(e.g. sqrt or log at 0). Check f's derivatives there")
    advice = (f" Each inverse step divides by the coupling ({coupling}), so round-off grows like {coupling} ** "
              f"-{steps} = 1e{-steps * math.log10(coupling):.0f}. Use a coupling closer to 1 (the default 0.999),"
              " or" if coupling < 1 else " Use")
    raise FloatingPointError(
        f"ReversibleAdjoint: the backward pass could not rebuild the forward solve: the rebuilt initial state "
        f"misses u0 by {error:.3g} (limit {RECONSTRUCTION_LIMIT:g} x the tolerance {tolerance:.3g})"
        + ("" if finite else " and the gradient is NaN/Inf") + "." + advice
        + " BacksolveAdjoint / InterpolatingAdjoint / DirectAdjoint(checkpoints=...) for this problem")


def _steps_of(sol: Solution) -> list[tuple[float, float, float]]:
    return _accepted_steps(sol) if sol.stats.t is not None else []


def _counted_field(ctx, ps_, u0, counter):
    p = tree_replace_at_paths(ctx.problem.p, ctx.paths, ps_) if ctx.paths else ctx.problem.p
    checked = []

    def field(u, t):
        out = ctx.problem.f(u, p, t)
        if not checked:
            check_no_hidden_parameters(out, [u, *ps_], where="ReversibleAdjoint: f")
            checked.append(True)
        counter["nf"] += 1
        return out
    return field


def _reverse_sweep(ctx, field, y, z, grad_at, params, ps_, counter):
    """Walk the accepted steps backward: rebuild (Y_n, Z_n) and accumulate the adjoints.

    Per step: two base steps on the tape and two vector–Jacobian products (one of each in the
    last step, which starts from the saved :math:`Z_{N-1}`), which are inherently
    sequential (the second's cotangent contains the first's result). The parameter gradients
    accumulate inside autograd's engine (``backward(inputs=...)`` into the leaves' ``.grad``;
    the backward step's contribution enters with a negated cotangent), so the Python side does
    a handful of state-sized operations per step; every step's time tensors come from one
    transfer before the sweep. Under ``compile=True`` every step but the last (eager: it checks
    the field) is one call of :func:`_sweep_step` compiled, the same arithmetic with
    ``torch.func.vjp`` in place of the tape.
    """
    base, lam = ctx.reversible.base, ctx.reversible.coupling
    a_y = torch.zeros_like(y)
    a_z = torch.zeros_like(y)
    for leaf in ps_:
        leaf.grad = None
    refusal_key = (ctx.compile_mode, getattr(ctx.problem.f, "__code__", type(ctx.problem.f)))
    compiled = None
    if ctx.compile_mode is not None and refusal_key not in _SWEEP_REFUSED:
        compiled = _compiled_sweep_step(ctx.compile_mode)
    compiled_theta = None
    nf_per_advance = 0
    last = True  # the last step: z holds Z_{N-1} already and the adjoint of Z_N is zero
    for (t, dt, t_new), (t_, dt_, t_new_, minus_dt_) in zip(reversed(ctx.steps), reversed(_sweep_times(ctx))):
        g = grad_at.pop(t_new, None)
        if g is not None:
            a_y = a_y + g
        if compiled is not None and not last:
            try:
                y, z, a_y, a_z, theta = compiled(base, lam, ctx.problem.f, ctx.problem.p, ctx.paths, y, z, a_y, a_z,
                                                 t_, dt_, t_new_, minus_dt_, tuple(params))
            except Exception as err:  # noqa: BLE001 - any compile failure means: the eager sweep
                first_line = (str(err).strip().splitlines() or [""])[0][:200]
                warnings.warn(f"ReversibleAdjoint: the backward step could not be compiled ({type(err).__name__}: "
                              f"{first_line}); running it eagerly", RuntimeWarning, stacklevel=4)
                _SWEEP_REFUSED.add(refusal_key)
                compiled = None
            else:
                compiled_theta = list(theta) if compiled_theta is None else [a + b for a, b in zip(compiled_theta, theta)]
                counter["nf"] += 2 * nf_per_advance
                counter["nvjp"] += 2
                continue
        if last:
            z0 = z.detach().requires_grad_(True)
            a_y_total = a_y + a_z
            last = False
        else:
            y1 = y.detach().requires_grad_(True)
            back = base.advance(field, t_new_, y1, minus_dt_)[0]
            z0 = (z - y + back.detach()).requires_grad_(True)  # Z_n = Z_{n+1} + Ψ_{-h}(Y_{n+1})
            # adjoint of Z_{n+1} = Z_n + Y_{n+1} - back(Y_{n+1}): y1.grad = -J_back^T a_z
            torch.autograd.backward(back, -a_z, inputs=[y1, *ps_])
            counter["nvjp"] += 1
            a_y_total = a_y + a_z + y1.grad
        fwd, nf_per_advance = base.advance(field, t_, z0, dt_)  # the increment only: an FSAL method skips f(u_new)
        # adjoint of Y_{n+1} = λ(Y_n - Z_n) + fwd(Z_n)
        torch.autograd.backward(fwd, a_y_total, inputs=[z0, *ps_])
        counter["nvjp"] += 1
        a_y = lam * a_y_total
        a_z = a_z - a_y + z0.grad
        z0 = z0.detach()
        y, z = (y - fwd.detach()) / lam + z0, z0  # Y_n = (Y_{n+1} - fwd(Z_n)) / λ + Z_n
    a_theta = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in ps_]
    if compiled_theta is not None:
        a_theta = [a + b for a, b in zip(a_theta, compiled_theta)]
    return a_y, a_z, a_theta, y, z


#: ``torch.compile``d :func:`_sweep_step`, per compile mode
_COMPILED_SWEEP: dict = {}

#: the fields whose sweep step failed to compile, per mode (their later sweeps run eagerly, unwarned)
_SWEEP_REFUSED: set = set()


def _compiled_sweep_step(mode: str):
    if mode not in _COMPILED_SWEEP:
        # no CUDA graphs ("reduce-overhead"): each step's outputs are the next step's inputs and the parameter
        # shares are kept across steps, which CUDA graphs' static output buffers would overwrite
        _COMPILED_SWEEP[mode] = torch.compile(_sweep_step, fullgraph=True, dynamic=False,
                                              mode=None if mode in ("default", "reduce-overhead") else mode)
    return _COMPILED_SWEEP[mode]


def _sweep_step(base, lam, f, p_tree, paths, y, z, a_y, a_z, t, dt, t_new, minus_dt, params):
    r"""One step of the reverse sweep (any but the last) as a pure function, for ``torch.compile``.

    With the base method's step map :math:`S_h = \mathrm{id} + \Psi_h` (``base.advance``), from
    :math:`(Y_{n+1}, Z_{n+1})` and the adjoints :math:`(a_Y, a_Z)` (the saved-time cotangent already
    in :math:`a_Y`):

    .. math::
        Z_n = Z_{n+1} - Y_{n+1} + S_{-h}(t_{n+1}, Y_{n+1}), \qquad
        \bar a = a_Y + a_Z - J_{S_{-h}}^T a_Z,

        a_Y' = \lambda \bar a, \qquad a_Z' = a_Z - a_Y' + J_{S_h}(Z_n)^T \bar a, \qquad
        Y_n = (Y_{n+1} - S_h(t_n, Z_n)) / \lambda + Z_n,

    and the parameters' share :math:`-J_{\theta, S_{-h}}^T a_Z + J_{\theta, S_h}^T \bar a`: the loop body
    of :func:`_reverse_sweep`, with ``torch.func.vjp`` in place of the tape. Returns
    ``(Y_n, Z_n, a_Y', a_Z', parameter share)``.
    """
    def step_map(u, time, step, ps):
        p = tree_replace_at_paths(p_tree, paths, list(ps)) if paths else p_tree
        return base.advance(lambda v, tv: f(v, p, tv), time, u, step)[0]

    back, back_vjp = torch.func.vjp(lambda u, ps: step_map(u, t_new, minus_dt, ps), y, params)
    z0 = z - y + back
    g_y, g_back = back_vjp(-a_z)
    a_total = a_y + a_z + g_y
    fwd, fwd_vjp = torch.func.vjp(lambda u, ps: step_map(u, t, dt, ps), z0, params)
    g_z0, g_fwd = fwd_vjp(a_total)
    a_y_new = lam * a_total
    return (y - fwd) / lam + z0, z0, a_y_new, a_z - a_y_new + g_z0, [a + b for a, b in zip(g_back, g_fwd)]


def _sweep_times(ctx):
    """``(t, dt, t_new, -dt)`` time tensors of every step, from one host-to-device transfer."""
    flat = [v for t, dt, t_new in ctx.steps for v in (t, dt, t_new, -dt)]
    tensors = time_vector(flat, *ctx.time) if flat else []
    return [tuple(tensors[4 * i:4 * i + 4]) for i in range(len(ctx.steps))]
