"""Jacobian-free Newton-Krylov: Newton steps solved by matrix-free GMRES."""

from __future__ import annotations

import math

import torch
from torch.autograd import forward_ad

from ..core.validation import check_bool, check_choice, check_float, check_int

from ._base import AbstractNonlinearSolver, backtracking_line_search
from .gmres import gmres

__all__ = ["NewtonKrylov"]

#: GMRES must reduce the Newton-system residual below this fraction of ||F|| to count as progress.
_ETA_MAX = 0.9


class _NewtonKrylovState:
    """Per-element count of iterations whose Newton step failed (singular system or rejected step)."""

    __slots__ = ("singular",)

    def __init__(self, singular):
        self.singular = singular


class NewtonKrylov(AbstractNonlinearSolver):
    """Inexact Newton's method on ``F(z) = g(z) - z`` with GMRES and a line search.

    Jacobian-free Newton-Krylov (Knoll & Keyes 2004, "Jacobian-free
    Newton-Krylov methods: a survey of approaches and applications", J. Comput.
    Phys. 193): each iteration solves the Newton system

        (J_g(z_k) - I) d_k = -F(z_k)

    with restarted GMRES (Saad & Schultz 1986; :func:`~pylux.nonlinear.gmres`)
    to the relative accuracy ``||(J_g - I) d_k + F(z_k)|| <= linear_rtol ||F(z_k)||``
    (a constant forcing term, Dembo, Eisenstat & Steihaug 1982), using only
    Jacobian-vector products of ``g``:

    * ``jvp="forward"``: forward-mode AD (dual numbers), exact; ``g`` must
      support forward-mode AD;
    * ``jvp="reverse"``: the double-backward trick, exact: with
      ``w(u) = J_g^T u`` from one reverse pass built with ``create_graph=True``,
      ``J_g v = d(w(u) . v)/du``; for ``g`` without forward-mode support;
    * ``jvp="difference"``: the finite difference of Knoll & Keyes (eq. 11),
      ``J_g v ~ (g(z + eps v) - g(z)) / eps`` with
      ``eps = sqrt(machine eps) (1 + ||z||) / ||v||`` per batch element.

    Then ``z_(k+1) = z_k + alpha_k d_k`` with ``alpha_k`` from per-element
    backtracking on ``||F||`` (sufficient decrease ``1 - 1e-4 alpha``).

    Where ``J_g - I`` is singular or nearly so (e.g. ``F(z) = 1/4 - z^2`` at
    ``z = 0``), the Newton step does not exist or is useless. An element falls
    back to the fixed-point step ``d_k = F(z_k)`` (searched the same way) when
    GMRES does not reduce the linear residual below ``0.9 ||F(z_k)||`` (then
    ``d_k`` need not be a descent direction of ``||F||^2``; Brown & Saad 1990,
    "Hybrid Krylov methods for nonlinear systems of equations", SIAM J. Sci.
    Stat. Comput. 11(3)), or when the line search rejects every step length of
    the Newton direction. The failure message of :func:`nlsolve` names the
    elements whose Newton systems were singular.
    Converges quadratically near a regular root (linearly with rate about
    ``linear_rtol`` for the inexact solves), in few iterations but several
    ``g`` evaluations (one per Jacobian-vector product, counted in ``nfe``)
    each. The linear solves run without an autograd graph.

    Args:
        linear_rtol: GMRES relative tolerance (forcing term) in ``(0, 1)``.
        restart: GMRES Krylov dimension per cycle.
        linear_maxiters: GMRES steps per Newton iteration.
        jvp: ``"forward"``, ``"reverse"`` or ``"difference"``.
        line_search: backtracking on (default) or full Newton steps.
        max_backtracks: halvings tried by the line search.
        orthogonalization: GMRES's ``"mgs"`` or ``"cgs2"``.
        maxiters, abstol, reltol: optional defaults for :func:`nlsolve`.
    """

    _option_names = ("linear_rtol", "restart", "linear_maxiters", "jvp", "line_search",
                     "max_backtracks", "orthogonalization")

    def __init__(self, *, linear_rtol: float = 1e-3, restart: int = 20, linear_maxiters: int = 40,
                 jvp: str = "forward", line_search: bool = True, max_backtracks: int = 10,
                 orthogonalization: str = "mgs", maxiters=None, abstol=None, reltol=None, **unknown):
        where = type(self).__name__
        self._set_common(maxiters, abstol, reltol, unknown)
        self._set("linear_rtol", check_float(where, "linear_rtol", linear_rtol, low=0.0, high=1.0,
                                             low_open=True, high_open=True))
        self._set("restart", check_int(where, "restart", restart, 1))
        self._set("linear_maxiters", check_int(where, "linear_maxiters", linear_maxiters, 1))
        self._set("jvp", check_choice(where, "jvp", jvp, ("forward", "reverse", "difference")))
        self._set("line_search", check_bool(where, "line_search", line_search))
        self._set("max_backtracks", check_int(where, "max_backtracks", max_backtracks, 1))
        self._set("orthogonalization", check_choice(where, "orthogonalization", orthogonalization,
                                                    ("mgs", "cgs2")))

    def init(self, z, gz, maxiters):
        batch = z.shape[0]
        return _NewtonKrylovState(torch.zeros(batch, dtype=torch.long, device=z.device))

    def step(self, fn, z, gz, F, state, active):
        jacobian_g, setup_nfe = self._jvp(fn, z, gz)
        residual_norm = torch.linalg.vector_norm(F, dim=1)
        if active is None:
            rhs = -F

            def newton_matrix(v):
                return jacobian_g(v) - v
        else:
            rows = active.unsqueeze(1)
            rhs = torch.where(rows, -F, torch.zeros_like(F))

            def newton_matrix(v):  # the identity on frozen rows, whatever g does there
                return torch.where(rows, jacobian_g(v) - v, v)
        with torch.no_grad():
            linear = gmres(newton_matrix, rhs, restart=self.restart, maxiters=self.linear_maxiters,
                           rtol=self.linear_rtol, orthogonalization=self.orthogonalization)
        nfe = setup_nfe + linear.matvecs
        # GMRES made progress iff ||(J_g - I) d + F|| <= eta_max ||F||, eta_max < 1: then d is a
        # descent direction of ||F||^2 (Brown & Saad 1990). Otherwise (J_g - I) is singular or
        # too ill-conditioned along F: fall back to the fixed-point step d = F.
        progress = torch.isfinite(linear.x).all(dim=1) & (linear.residual_norm <= _ETA_MAX * residual_norm)
        stalled = ~progress if active is None else ~progress & active
        direction = torch.where(stalled.unsqueeze(1), F, linear.x)
        if not self.line_search:
            state.singular += stalled
            z_new = z + direction
            return z_new, fn(z_new), state, nfe + 1
        search = backtracking_line_search(fn, z, gz, direction, residual_norm, active, self.max_backtracks)
        nfe += search.nfe
        z_new, gz_new = search.z, search.gz
        # A Newton direction that no step length of the line search accepts means the
        # linear model is useless here (a near-singular J_g - I gives a huge d): try the
        # fixed-point step on those elements instead.
        retry = search.rejected & ~stalled
        if bool(retry.any()):
            fallback = backtracking_line_search(fn, z, gz, F, residual_norm, retry, self.max_backtracks)
            nfe += fallback.nfe
            rows = retry.unsqueeze(1)
            z_new = torch.where(rows, fallback.z, z_new)
            gz_new = torch.where(rows, fallback.gz, gz_new)
            stalled = stalled | retry
        state.singular += stalled
        return z_new, gz_new, state, nfe

    def diagnosis(self, state, unconverged):
        if state is None:
            return ""
        singular = (state.singular > 0) & unconverged
        count = int(singular.sum())
        if not count:
            return ""
        elements = singular.nonzero().flatten().tolist()
        shown = ", ".join(str(i) for i in elements[:10]) + (", ..." if len(elements) > 10 else "")
        return (f"The Newton system (J_g - I) d = -F was singular or too ill-conditioned for GMRES to make "
                f"progress (or its step was rejected by the line search) in {count} unconverged batch "
                f"element(s) [{shown}] (in up to {int(state.singular.max())} iteration(s) each), where "
                f"a fixed-point step was taken instead. Near a point where J_g - I is singular, try "
                f"Broyden() or Anderson(), or start from another z0.")

    def _jvp(self, fn, z, gz):
        """``(v -> J_g(z) v, evaluations of g spent on setting it up)``."""
        if self.jvp == "forward":
            def forward(v):
                with forward_ad.dual_level():
                    tangent = forward_ad.unpack_dual(fn(forward_ad.make_dual(z, v))).tangent
                return torch.zeros_like(v) if tangent is None else tangent
            return forward, 0
        if self.jvp == "difference":
            root_eps = math.sqrt(torch.finfo(z.dtype).eps)
            shift = root_eps * (1.0 + torch.linalg.vector_norm(z, dim=1))
            tiny = torch.finfo(z.dtype).tiny

            def difference(v):
                eps = shift / torch.linalg.vector_norm(v, dim=1).clamp_min(tiny)
                eps = eps.unsqueeze(1)
                return (fn(z + eps * v) - gz) / eps
            return difference, 0
        with torch.enable_grad():
            z_leaf = z.detach().requires_grad_(True)
            out = fn(z_leaf)
            probe = torch.zeros_like(out, requires_grad=True)
            (vjp,) = torch.autograd.grad(out, z_leaf, probe, create_graph=True, allow_unused=True)
        if vjp is None or not vjp.requires_grad:
            return (lambda v: torch.zeros_like(v)), 1

        def reverse(v):
            with torch.enable_grad():
                (jv,) = torch.autograd.grad(vjp, probe, v, retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if jv is None else jv
        return reverse, 1
