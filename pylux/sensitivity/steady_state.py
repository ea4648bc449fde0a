"""Gradients of fixed points: the implicit function theorem, and Jacobian-free backprop.

A deep equilibrium model outputs :math:`z^*` with :math:`z^* = f(z^*, x; \\theta)`.
Differentiating that identity (the implicit function theorem; Bai, Kolter &
Koltun, "Deep equilibrium models", NeurIPS 2019) gives, for a loss :math:`L`
with :math:`g = \\partial L / \\partial z^*` and :math:`J = \\partial f/\\partial z` at
:math:`z^*`,

.. math::
    (I - J)^\\top \\lambda = g, \\qquad
    \\frac{\\partial L}{\\partial \\theta} = \\lambda^\\top \\frac{\\partial f}{\\partial \\theta}, \\qquad
    \\frac{\\partial L}{\\partial x} = \\lambda^\\top \\frac{\\partial f}{\\partial x}.

:class:`SteadyStateAdjoint` solves the linear system with the batched,
matrix-free :func:`pylux.nonlinear.gmres`, whose products
:math:`v \\mapsto v - J^\\top v` are vector–Jacobian products of ONE
application of ``f`` at :math:`z^*` (one batched VJP per GMRES iteration),
then spends one more VJP on :math:`\\theta` and :math:`x`
(``SteadyStateAdjoint(solver=...)`` instead iterates
:math:`\\lambda = J^\\top\\lambda + g` with a nonlinear solver on the same
VJPs, torchdeq's IFT backward). The cost of the
backward pass is independent of how the forward pass found :math:`z^*` — by a
nonlinear solver (a discrete DEQ) or by integrating
:math:`\\dot z = f(z, x) - z` to its steady state (a continuous DEQ; Pal,
Edelman & Rackauckas 2022), which is why an infinite-time neural ODE trains
faster than a finite-time one.

:class:`JacobianFreeBackprop` (Fung, Heaton, Li, McKenzie, Osher & Yin,
"JFB: Jacobian-free backpropagation for implicit networks", AAAI 2022) drops
the inverse: :math:`\\lambda = g`, i.e. backpropagation through one application
of ``f`` at :math:`z^*`. It is not the gradient of the loss, but a descent
direction when ``f`` is contractive enough, at the cost of a single VJP.

Both formulas hold only at a fixed point. The layers pass the forward
solve's verdict; a backward pass at a point the forward solve did not bring
to its tolerance warns (or raises, with ``on_failure="raise"``) instead of
silently returning a gradient of the wrong point. A NaN or Inf in the
adjoint or in the final products :math:`\\lambda^\\top \\partial f/\\partial(\\theta, x)`
raises (never passed on to the optimizer).

The algorithms are immutable option objects: the counters of a backward pass
go to the record of the forward pass it belongs to (the ``record`` dict of
:meth:`AbstractImplicitSensitivity.attach_gradient`, a DEQ layer's
``st["solution"].backward_stats``), never to an attribute of the algorithm.
"""

from __future__ import annotations

import abc
import math
import warnings
from typing import Any, Callable

import torch

from ..core import tree_replace_at_paths
from ..core.keywords import check_keywords
from ..core.validation import check_choice, check_float, check_int
from ..nonlinear import (AbstractNonlinearSolver, ConvergenceWarning, NonlinearReturnCode, NonlinearSolveError,
                         gmres)
from ..nonlinear.nlsolve import _nlsolve
from ._params import check_no_hidden_parameters, grad_leaves, refuse_higher_order

try:  # the engine call behind torch.autograd.grad, without its per-call argument checks
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - other torch versions: torch.autograd.grad
    _engine_run_backward = None

__all__ = ["AbstractImplicitSensitivity", "SteadyStateAdjoint", "JacobianFreeBackprop"]

#: ``f(z, x, ps) -> z_new``: a fixed-point map with its input injection and parameter tree.
FixedPointMap = Callable[[torch.Tensor, Any, Any], torch.Tensor]


class AbstractImplicitSensitivity(abc.ABC):
    """How gradients flow through a fixed point :math:`z^* = f(z^*, x; \\theta)`.

    The one method, :meth:`attach_gradient`, takes a fixed point found without
    gradients and returns the same values wired into the autograd graph so
    that a backward pass reaches ``x`` and every tensor of the parameter tree
    ``ps`` that requires grad.

    Args (common to the subclasses):
        on_failure: ``"warn"`` (a :class:`~pylux.nonlinear.ConvergenceWarning`)
            or ``"raise"`` (:class:`~pylux.nonlinear.NonlinearSolveError`) when
            the backward pass is asked at a point that is not a fixed point, or
            (for :class:`SteadyStateAdjoint`) when the linear solve stops short
            of its tolerance.
    """

    _option_names: tuple[str, ...] = ("on_failure",)

    def __init__(self, on_failure: str = "warn") -> None:
        self.on_failure = check_choice(type(self).__name__, "on_failure", on_failure, ("warn", "raise"))

    def options(self) -> dict:
        return {name: getattr(self, name) for name in self._option_names}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options() == other.options()

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.options().items())))

    def attach_gradient(self, f: FixedPointMap, z_star: torch.Tensor, x: torch.Tensor | None, ps: Any, *,
                        converged: bool = True, residual: torch.Tensor | None = None,
                        where: str = "fixed point", record: dict | None = None) -> torch.Tensor:
        """``z_star`` as a differentiable function of ``x`` and ``ps`` through this algorithm.

        Args:
            f: the map, ``f(z, x, ps) -> tensor of z's shape``; it must act on
                each batch element independently (GMRES solves one system per row)
                and must take every trainable tensor from ``ps`` (tensors that
                require grad reached through a closure raise
                :class:`~pylux.sensitivity.HiddenParameterError` in backward).
            z_star: the fixed point (its own graph, if any, is ignored).
            x: the input injection, or ``None``; it gets a gradient if it requires grad.
            ps: the parameter tree passed to ``f``.
            converged: the forward solve's verdict (host bool).
            residual: ``(B,)`` forward residuals ``||f(z*) - z*||``, used in the
                message when ``converged`` is False.
            where: a name for messages (e.g. ``"DEQ(Broyden)"``).
            record: a dict that this gradient's backward pass fills with its
                counters (``iterations``, ``matvecs``, ``residual``, ``converged``),
                so that each forward pass has its own record.

        Returns:
            a tensor equal to ``z_star`` (a copy) whose backward runs this
            algorithm; ``z_star`` itself, detached, when nothing requires grad
            or grad mode is off.
        """
        pairs = grad_leaves(ps)
        x_grad = isinstance(x, torch.Tensor) and x.requires_grad
        if not torch.is_grad_enabled() or (not pairs and not x_grad):
            return z_star.detach()
        paths = [path for path, _ in pairs]
        params = [leaf for _, leaf in pairs]
        x_arg = x if isinstance(x, torch.Tensor) else None
        x_other = None if x_arg is not None else x
        return _ImplicitFunction.apply(self, f, ps, paths, x_other, (converged, residual, where, record),
                                       z_star.detach(), x_arg, *params)

    def _flag_not_fixed_point(self, converged: bool, residual: torch.Tensor | None, where: str) -> None:
        if converged:
            return
        reached = "" if residual is None else (
            f" (the forward solve reached a largest residual ||f(z) - z|| = {float(residual.max()):.3e})")
        message = (f"{type(self).__name__}: backward pass of {where} at a point that is not a fixed point"
                   f"{reached}; the implicit gradient assumes z* = f(z*), so this gradient is not that of "
                   "the layer. Increase maxiters, loosen abstol/reltol, or use a faster forward solver.")
        if self.on_failure == "raise":
            raise NonlinearSolveError(message, NonlinearReturnCode.MaxIters, 0)
        warnings.warn(message, ConvergenceWarning, stacklevel=3)

    def _check_gradients(self, grads, where: str, stats: dict | None = None) -> None:
        """Raise if a final product :math:`\\lambda^\\top \\partial f/\\partial(\\theta, x)` is NaN or Inf.

        One host synchronisation per backward pass (FAULTS.md 17: NaN in the
        iterates, forward or backward, is raised, never passed on). The adjoint
        :math:`\\lambda` itself is checked in ``_cotangent``; this catches a finite
        adjoint times a parameter derivative of ``f`` that is not finite. A
        ``stats["residual"]`` that ``_cotangent`` left on the device (a 0-d
        tensor) comes back in the same transfer and is replaced by its float.
        """
        pending = stats is not None and isinstance(stats.get("residual"), torch.Tensor)
        tensors = [t for t in grads if t.numel()]
        # A sum is finite only if each summand is (see _all_finite); the sums and the residual share
        # one transfer (the modulus of a complex sum: finite exactly when the sum is).
        values = [t.sum().abs() if t.is_complex() else t.sum() for t in tensors]
        if pending:
            values.append(stats["residual"])
        if len({v.dtype for v in values}) > 1:  # stacked in one dtype (exact: float64 holds every value)
            values = [v.to(torch.float64) for v in values]
        host = torch.stack(values).tolist() if values else []
        if pending:
            stats["residual"] = host.pop()
        if all(math.isfinite(v) for v in host) or all(bool(torch.isfinite(t).all()) for t in tensors):
            return
        raise NonlinearSolveError(
            f"{type(self).__name__}: the gradient of {where} is NaN or Inf; the map's vector-Jacobian "
            "product at the fixed point overflowed. Check the forward residual and the map's scale.",
            NonlinearReturnCode.Unstable, 0)

    @abc.abstractmethod
    def _cotangent(self, fz: torch.Tensor, z: torch.Tensor, grad: torch.Tensor,
                   where: str) -> tuple[torch.Tensor, dict]:
        """The vector :math:`\\lambda` that multiplies :math:`\\partial f / \\partial(\\theta, x)`, and the
        backward counters (``iterations``, ``matvecs``, ``residual``, ``converged``)."""


class SteadyStateAdjoint(AbstractImplicitSensitivity):
    """Implicit-function-theorem gradient of a fixed point, by GMRES (or a fixed-point solver) on VJPs.

    Solves :math:`(I - J)^\\top \\lambda = g` with :func:`pylux.nonlinear.gmres`;
    each GMRES iteration is one batched vector–Jacobian product of a single
    application of ``f`` at :math:`z^*` (its graph is kept for the whole solve),
    then :math:`\\lambda^\\top \\partial f/\\partial(\\theta, x)` costs one more. Exact
    (up to ``tol``) at an exact fixed point; memory of one application of
    ``f`` plus the Krylov basis, whatever the forward solver did.

    With ``solver`` (a nonlinear solver of :mod:`pylux.nonlinear`) the same
    system is solved as the fixed point :math:`\\lambda = J^\\top \\lambda + g`
    by :func:`pylux.nonlinear.nlsolve` on the same VJPs (the recurrent
    backpropagation of Almeida 1987 and Pineda 1987, and the IFT backward of
    Bai, Kolter & Koltun 2019 and torchdeq), started at
    :math:`\\lambda_0 = g`: the first iterate of the fixed-point iteration
    from 0, which this start saves. It keeps no Krylov basis (Anderson and
    Broyden keep their own histories) and, for a contraction ``f`` as a DEQ
    trains, converges at ``f``'s own rate; GMRES also solves systems where
    :math:`J^\\top` is not a contraction. ``f`` is evaluated once in either case.

    Both solvers stop an element when
    :math:`\\lVert g - (I - J)^\\top \\lambda\\rVert \\le \\max(\\text{atol}, \\text{tol}\\lVert g\\rVert)`.
    A nonlinear solver meets ``tol`` alone or ``atol`` alone exactly; given both,
    it uses :math:`\\max(\\text{atol}\\,\\lVert g_b\\rVert / \\max_c \\lVert g_c\\rVert, \\text{tol}\\lVert g_b\\rVert)`
    (never looser than asked), as nlsolve takes one absolute tolerance for the batch.

    Args:
        tol: relative tolerance, ``||g - (I - J)^T lambda|| <= max(atol, tol ||g||)`` per batch element.
        atol: absolute tolerance (default 0).
        restart: Krylov dimension per GMRES cycle (GMRES only).
        maxiters: total iterations (default: GMRES ``10 * restart``; a nonlinear
            solver its own ``maxiters``, else 100).
        solver: ``None`` (GMRES, the default) or a pylux nonlinear solver
            (``FixedPointIteration()``, ``Anderson()``, ``Broyden()``, ...) without
            tolerances of its own (they are this algorithm's ``tol`` and ``atol``).
        on_failure: ``"warn"`` or ``"raise"`` (:class:`~pylux.nonlinear.NonlinearSolveError`)
            when the adjoint solve stops above its tolerance (the message names the residual
            reached) or the forward point is not a fixed point.

    Raises:
        TypeError: an unknown or misspelt option (named, with the closest valid one); a
            ``solver`` that is not a pylux nonlinear solver.
        ValueError: an option out of range; a ``solver`` with its own ``abstol`` or ``reltol``.
        NonlinearSolveError (in backward): NaN/Inf in the incoming gradient, the adjoint or in
            the final parameter and input gradients; non-convergence with ``"raise"``.

    Each backward pass fills the ``record`` of its forward pass (a DEQ layer's
    ``st["solution"].backward_stats``) with ``{"iterations", "matvecs"
    (vector-Jacobian products of the solve), "residual" (largest relative residual
    ``||g - (I - J)^T lambda|| / ||g||``), "converged"}``.
    """

    _option_names = ("tol", "atol", "restart", "maxiters", "solver", "on_failure")

    def __init__(self, *, tol: float = 1e-6, atol: float = 0.0, restart: int = 20, maxiters: int | None = None,
                 solver: AbstractNonlinearSolver | None = None, on_failure: str = "warn", **unknown) -> None:
        where = "SteadyStateAdjoint"
        check_keywords(unknown, where, self._option_names)
        super().__init__(on_failure)
        self.tol = check_float(where, "tol", tol, low=0.0, high=1.0)
        self.atol = check_float(where, "atol", atol, low=0.0)
        if self.tol == 0.0 and self.atol == 0.0:
            raise ValueError(f"{where}: tol and atol are both zero; give a positive tol (e.g. 1e-6).")
        self.restart = check_int(where, "restart", restart, 1)
        self.maxiters = check_int(where, "maxiters", maxiters, 1, allow_none=True)
        if solver is not None:
            if not isinstance(solver, AbstractNonlinearSolver):
                hint = (f" (a class: pass an instance, {solver.__name__}())" if isinstance(solver, type) else "")
                raise TypeError(f"{where}: solver must be None (GMRES) or a pylux nonlinear solver such as "
                                f"FixedPointIteration() or Anderson(), got {type(solver).__name__}{hint}.")
            own = [name for name in ("abstol", "reltol") if getattr(solver, name) is not None]
            if own:
                raise ValueError(f"{where}: the adjoint's tolerances are tol and atol; {solver!r} sets "
                                 f"{' and '.join(own)} of its own. Give them to SteadyStateAdjoint instead.")
            if self.maxiters is not None and solver.maxiters is not None and solver.maxiters != self.maxiters:
                raise ValueError(f"{where}: maxiters is given twice, SteadyStateAdjoint(maxiters={self.maxiters}) "
                                 f"and {solver!r}; give it in one place.")
        self.solver = solver

    def _cotangent(self, fz, z, grad, where):
        if self.solver is not None:
            return self._fixed_point_cotangent(fz, z, grad, where)

        vjp_of = _vjp(fz, z)

        def matvec(v):
            vjp = vjp_of(v)
            return v if vjp is None else v - vjp  # None: f does not depend on z, so J = 0

        result = gmres(matvec, grad, restart=self.restart, maxiters=self.maxiters, rtol=self.tol, atol=self.atol)
        scale = torch.linalg.vector_norm(grad.reshape(grad.shape[0], math.prod(grad.shape[1:])), dim=1)
        relative = result.residual_norm / torch.where(scale > 0, scale, torch.ones_like(scale))
        # one read-back: the worst relative residual, and whether the adjoint and its residual are finite
        # (GMRES stops an element whose residual is NaN/Inf, e.g. from a NaN incoming gradient)
        finite_all = torch.isfinite(result.x.sum()) & torch.isfinite(relative).all()  # see _all_finite
        worst, finite = torch.stack([relative.max(), finite_all.to(relative.dtype)]).tolist() \
            if relative.numel() else (0.0, 1.0)
        finite = finite or _all_finite([result.x, relative])
        converged = bool(result.converged.all())
        stats = {"iterations": result.iterations, "matvecs": result.matvecs, "residual": worst,
                 "converged": converged}
        if not finite:
            self._raise_not_finite(where, f"{result.iterations} GMRES iterations", result.iterations)
        if not converged:
            failed = int((~result.converged).sum())
            self._flag_inexact(where, f"GMRES for the adjoint of {where} stopped after {result.iterations} "
                                      "iterations", worst, failed, grad.shape[0], result.iterations, "restart")
        return result.x, stats

    def _fixed_point_cotangent(self, fz, z, grad, where):
        """:math:`\\lambda = J^\\top\\lambda + g` by nlsolve from :math:`\\lambda_0 = g` (see the class docstring).

        Host synchronisations besides nlsolve's one per iteration: with ``tol``,
        one that brings the largest norm of the incoming gradient (and says
        whether it is finite); the worst relative residual stays on the device
        for the backward pass's single check of the final gradients, unless
        the solve failed and a message needs it now.
        """
        batch = grad.shape[0]
        norms = torch.linalg.vector_norm(grad.reshape(batch, math.prod(grad.shape[1:])), dim=1)
        shape = (batch,) + (1,) * (grad.dim() - 1)
        scale = torch.where(norms > 0, norms, torch.ones_like(norms))
        # A non-finite incoming gradient is named here. With tol, the transfer of the largest norm that
        # abstol needs tests it (a NaN norm is finite in ``scale``: test ``norms``). Without, nothing is
        # transferred: nlsolve (not testing its start) finds a non-finite g unstable at iteration 0, and
        # only then is g tested, for the message.
        if self.tol > 0.0 and batch:
            largest, largest_used = torch.stack([norms.max(), scale.max()]).tolist()
            if not math.isfinite(largest):
                self._raise_not_finite(where, "0 iterations (the incoming gradient is not finite)", 0)
        if self.tol > 0.0:
            # nlsolve's test is abstol + reltol ||lambda||; on lambda / ||g_b|| (the system is linear) its
            # abstol is the relative tolerance; an atol as well is met by its smallest share over the batch
            unit = scale.reshape(shape)
            rhs = grad / unit
            abstol = max(self.tol, self.atol / largest_used if self.atol > 0.0 and batch else 0.0)
        else:
            unit, rhs, abstol = None, grad, self.atol

        vjp_of = _vjp(fz, z)

        def step(v):
            vjp = vjp_of(v)
            return rhs.clone() if vjp is None else vjp.add_(rhs)  # None: f does not depend on z, so J = 0

        sol = _nlsolve(step, rhs, self.solver, abstol, 0.0, self.maxiters, "ignore", None, 1, False, {},
                       start_is_finite=True)
        lam = sol.z if unit is None else sol.z * unit
        relative = sol.residual if unit is not None else sol.residual / scale
        # nlsolve tested every iterate's residual g(v) - v (finite only if both terms are): unless it
        # marked an element unstable, lambda and its residual are finite, and no reduction needs to say so
        finite = sol.retcode is not NonlinearReturnCode.Unstable
        if not finite and not _all_finite([norms]):
            self._raise_not_finite(where, "0 iterations (the incoming gradient is not finite)", 0)
        converged = sol.retcode is NonlinearReturnCode.Success
        worst = relative.max() if finite and batch else 0.0
        stats = {"iterations": sol.iterations, "matvecs": sol.nf, "residual": worst, "converged": converged}
        name = type(self.solver).__name__
        if not finite:
            self._raise_not_finite(where, f"{sol.iterations} {name} iterations", sol.iterations)
        if not converged:
            stats["residual"] = worst = float(worst)
            failed = int((~sol.converged).sum())
            self._flag_inexact(where, f"{name} for the adjoint of {where} stopped after {sol.iterations} "
                                      "iterations", worst, failed, batch, sol.iterations, "another solver")
        return lam, stats

    def _raise_not_finite(self, where, after, iterations):
        raise NonlinearSolveError(
            f"SteadyStateAdjoint: the adjoint of {where} is NaN/Inf after {after}; the incoming gradient, f "
            "or its Jacobian is not finite at z*, or I - J is singular there.", NonlinearReturnCode.Unstable,
            iterations)

    def _flag_inexact(self, where, what, worst, failed, batch, iterations, remedy):
        message = (f"SteadyStateAdjoint: {what} with relative residual {worst:.3e} > tol={self.tol:g} "
                   f"(atol={self.atol:g}) in {failed} of {batch} batch elements; the gradient is inexact. "
                   f"Increase maxiters or {remedy}, loosen tol, or regularise the Jacobian of f "
                   "(jacobian_regularization).")
        if self.on_failure == "raise":
            raise NonlinearSolveError(message, NonlinearReturnCode.MaxIters, iterations)
        warnings.warn(message, ConvergenceWarning, stacklevel=5)


class JacobianFreeBackprop(AbstractImplicitSensitivity):
    """Jacobian-free backpropagation (Fung et al., AAAI 2022): :math:`\\lambda = g`.

    The gradient of :math:`L(f(z^*, x; \\theta))` with :math:`z^*` held fixed,
    i.e. backpropagation through one application of ``f`` at the fixed point:
    :math:`\\partial L/\\partial\\theta \\approx g^\\top \\partial f/\\partial\\theta`. Costs one VJP;
    it is a descent direction (not the gradient) when ``f`` is a contraction.

    Args:
        on_failure: ``"warn"`` or ``"raise"`` when the forward point is not a fixed point.

    Raises:
        TypeError: an unknown or misspelt option.
        NonlinearSolveError (in backward): a NaN or Inf gradient.

    Each backward pass fills the ``record`` of its forward pass with
    ``{"iterations": 0, "matvecs": 0, "residual": 0.0, "converged": True}``.
    """

    def __init__(self, *, on_failure: str = "warn", **unknown) -> None:
        check_keywords(unknown, "JacobianFreeBackprop", self._option_names)
        super().__init__(on_failure)

    def _cotangent(self, fz, z, grad, where):
        return grad, {"iterations": 0, "matvecs": 0, "residual": 0.0, "converged": True}


def _vjp(fz: torch.Tensor, z: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """``v -> (d fz / d z)^T v`` on the retained graph of ``fz``, or ``None`` where ``fz`` does not depend on ``z``.

    The adjoint solves call it once per iteration with a ``v`` of ``fz``'s shape and dtype (the solvers
    iterate in the incoming gradient's, which is ``z``'s). ``torch.autograd.grad`` checks its
    arguments again on every call (about 20 us of Python per product on a CPU, a tenth of a product
    of a 512 x 128 batch); for plain tensors whose shapes and dtypes match, which is all it would
    find, the products go to the engine call it ends in, with the same arguments. Anything else (a
    tensor subclass, an ``fz`` without a graph, whose error ``torch.autograd.grad`` words) takes
    ``torch.autograd.grad`` itself.
    """
    outputs, inputs = (fz,), (z,)
    if (_engine_run_backward is not None and type(fz) is torch.Tensor and type(z) is torch.Tensor
            and fz.grad_fn is not None and fz.shape == z.shape and fz.dtype == z.dtype):
        def vjp(v):
            if type(v) is torch.Tensor and v.shape == z.shape and v.dtype == z.dtype:
                return _engine_run_backward(outputs, (v,), True, False, inputs, True, accumulate_grad=False)[0]
            return torch.autograd.grad(outputs, inputs, grad_outputs=(v,), retain_graph=True, allow_unused=True)[0]
        return vjp

    def vjp(v):
        return torch.autograd.grad(outputs, inputs, grad_outputs=(v,), retain_graph=True, allow_unused=True)[0]
    return vjp


def _all_finite(tensors) -> bool:
    """Whether every entry of every tensor is finite (one read-back when they are).

    A sum is finite only if each summand is (an Inf or NaN entry makes it Inf or NaN), so one reduction
    per tensor decides the common case; only a non-finite sum (a NaN/Inf entry, or finite entries whose
    sum overflows) pays for the entrywise test, which costs several passes over the tensor on a CPU.
    """
    tensors = [t for t in tensors if t.numel()]
    flags = [torch.isfinite(t.sum()) for t in tensors]
    if not flags or bool(flags[0] if len(flags) == 1 else torch.stack(flags).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class _ImplicitFunction(torch.autograd.Function):
    """Identity on ``z_star`` forward; ``lambda^T d f/d(x, params)`` backward."""

    @staticmethod
    def forward(ctx, alg, f, ps, paths, x_original, verdict, z_star, x, *params):
        ctx.alg, ctx.f, ctx.ps, ctx.paths, ctx.verdict = alg, f, ps, paths, verdict
        ctx.x_original = x_original
        ctx.x_is_tensor = x is not None
        ctx.save_for_backward(z_star, *(() if x is None else (x,)), *params)
        return z_star.clone()

    @staticmethod
    def backward(ctx, grad_z):
        alg = ctx.alg
        refuse_higher_order(type(alg).__name__)
        converged, residual, where, record = ctx.verdict
        alg._flag_not_fixed_point(converged, residual, where)
        saved = ctx.saved_tensors
        z_star = saved[0]
        x = saved[1] if ctx.x_is_tensor else ctx.x_original
        params = saved[2:] if ctx.x_is_tensor else saved[1:]
        x_needs = ctx.x_is_tensor and ctx.needs_input_grad[7]
        with torch.enable_grad():
            z = z_star.detach().requires_grad_(True)
            x_ = x.detach().requires_grad_(x_needs) if ctx.x_is_tensor else x
            ps_ = [p.detach().requires_grad_(True) for p in params]
            tree = tree_replace_at_paths(ctx.ps, ctx.paths, ps_) if ctx.paths else ctx.ps
            fz = ctx.f(z, x_, tree)
            if not isinstance(fz, torch.Tensor) or fz.shape != z.shape:
                got = tuple(fz.shape) if isinstance(fz, torch.Tensor) else type(fz).__name__
                raise ValueError(f"{type(alg).__name__}: f returned {got} for a state of shape "
                                 f"{tuple(z.shape)}; a fixed-point map must return its input's shape.")
            check_no_hidden_parameters(fz, [z, *([x_] if ctx.x_is_tensor else []), *ps_],
                                       where=f"{type(alg).__name__}: the map of {where}")
            lam, stats = alg._cotangent(fz, z, grad_z.contiguous(), where)
            wrt = ([x_] if x_needs else []) + ps_
            grads = torch.autograd.grad(fz, wrt, grad_outputs=lam, allow_unused=True) if wrt else ()
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
        try:
            alg._check_gradients(grads, where, stats)
        finally:
            if record is not None:
                record.update(stats)
        grad_x = grads.pop(0) if x_needs else None
        return (None, None, None, None, None, None, None, grad_x, *grads)
