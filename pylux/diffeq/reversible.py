r"""``Reversible(base, coupling)``: McCallum & Foster's algebraically reversible form of a one-step method.

McCallum & Foster, "Efficient, accurate and stable gradients for neural ODEs"
(2024): any explicit one-step method with increment
:math:`\Psi_h(t, z) = \mathrm{step}_h(t, z) - z` becomes algebraically reversible
by carrying a pair :math:`(Y_n, Z_n)`, :math:`Y_0 = Z_0 = u_0`, and stepping

.. math::
    Y_{n+1} = \lambda Y_n + (1 - \lambda) Z_n + \Psi_{h}(t_n, Z_n), \qquad
    Z_{n+1} = Z_n - \Psi_{-h}(t_{n+1}, Y_{n+1}),

with coupling :math:`\lambda \in (0, 1]`. The output (the loop's state) is
:math:`Y_n`, which has the order of the base method; :math:`Z_n` lives in the
solver state. The step inverts in closed form,

.. math::
    Z_n = Z_{n+1} + \Psi_{-h}(t_{n+1}, Y_{n+1}), \qquad
    Y_n = \lambda^{-1} \bigl(Y_{n+1} - (1 - \lambda) Z_n - \Psi_h(t_n, Z_n)\bigr),

so a backward pass can rebuild every state from the final pair
(``pylux.sensitivity.ReversibleAdjoint``, from :meth:`Reversible.final_pair`).

It runs on the shared loop like every solver, so callbacks, ``maxiters``,
statistics and failure messages are the same. Adaptive stepping uses the base
method's embedded error estimate of the forward increment
:math:`\Psi_h(t_n, Z_n)`, scaled by :math:`|Z_n|` and the increment's end. The
backward increment :math:`\Psi_{-h}(t_{n+1}, Y_{n+1})` that completes the pair
is taken at the start of the next step (or by :meth:`Reversible.final_pair`
after the last one), so a rejected trial step costs one base step. There is
no interpolant: the loop steps exactly onto every ``saveat`` time, so the
saved values are states of the discrete solve.

*Stability.* On the linear test equation the pair's step matrix has
determinant :math:`\lambda`, so besides the physical mode (about
:math:`R(ah)`, the base method's stability function) it has a parasitic one of
about :math:`\lambda / R(ah)`: where the solution contracts (:math:`|R| <
\lambda`) the separation :math:`Y_n - Z_n` grows, by about :math:`\lambda
e^{|a| h}` a step for ``u' = -a u``, and :math:`Y` stops being the solution.
Step-size control cannot see this (it measures the forward increment only), so
the largest separation at a step's start, :math:`\max_n \|Y_n - Z_n\|_\infty`,
is kept on the device (one reduction a step, no synchronisation), and a solve
whose separation ends above ``PAIR_SEPARATION_LIMIT`` times the tolerance
``abstol + reltol max|Y|`` ends as ``Unstable`` (:meth:`Reversible.diagnose`)
instead of returning a wrong ``Y``. A smaller coupling damps the parasitic mode
(:math:`\lambda^n`) but the inverse step divides by :math:`\lambda`, so the
backward reconstruction's round-off grows like :math:`\lambda^{-n}`
(``ReversibleAdjoint`` checks it): dissipative dynamics are better served by
another sensitivity algorithm.
"""

from __future__ import annotations

import torch

from .solvers import (AbstractAdaptiveSolver, AbstractSolver, ExplicitRungeKutta, RKState, StepResult, as_step_times,
                      time_add)
from .terms import as_bound_term

__all__ = ["Reversible", "ReversibleState", "PAIR_SEPARATION_LIMIT"]

#: a reversible solve whose pair separated by more than this many tolerances ends as Unstable
PAIR_SEPARATION_LIMIT = 1000.0


class ReversibleState:
    """The pair's second half: ``z`` at the current point, or the pending backward increment.

    After an accepted step from ``(t_n, Y_n, Z_n)`` the state holds ``z = Z_n``
    and ``pending = (t_{n+1}, dt)``: ``Z_{n+1} = Z_n + Y_{n+1} - step_{-dt}(t_{n+1}, Y_{n+1})``
    is formed when it is first needed.
    """

    __slots__ = ("z", "pending", "gap")

    def __init__(self, z: torch.Tensor, pending: tuple | None = None, gap: torch.Tensor | None = None) -> None:
        self.z = z
        self.pending = pending
        #: ``[max_n |Y_n - Z_n|, max_n |Y_n|]`` over the steps so far (a device tensor; see the module docstring)
        self.gap = gap


def pair_gap(y: torch.Tensor, z: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """``[max |Y - Z|, max |Y|]`` at a step's start, combined with the running maximum ``previous``."""
    y, z = y.detach(), z.detach()
    if y.numel() == 0:
        gap = y.new_zeros(2)
    else:
        gap = torch.stack(((y - z).abs().amax(), y.abs().amax()))
    return gap if previous is None else torch.maximum(gap, previous.to(gap.dtype))


def _base_step(base: ExplicitRungeKutta, term, t, u, dt) -> StepResult:
    return base.step(term, t, u, dt, RKState(None))


class Reversible(AbstractSolver):
    """The reversible pair around an explicit Runge–Kutta method (see the module docstring).

    Args:
        base: the base method, an explicit Runge–Kutta solver (``Tsit5()``,
            ``DP5()``, ``RK4()``, ``Midpoint()``, …). Adaptive iff the base has
            an embedded error estimate.
        coupling: :math:`\\lambda \\in (0, 1]`, default 0.999 (the paper's).

    Raises:
        TypeError: a base that is not an explicit Runge–Kutta method
            (multistep methods are not one-step maps).
        ValueError: a coupling outside (0, 1].
    """

    steps_onto_saveat = True

    def __new__(cls, base=None, coupling: float = 0.999):
        if cls is Reversible and isinstance(base, AbstractAdaptiveSolver):
            cls = _AdaptiveReversible
        return super().__new__(cls)

    def __init__(self, base: ExplicitRungeKutta, coupling: float = 0.999) -> None:
        if not isinstance(base, ExplicitRungeKutta):
            raise TypeError(f"Reversible: the base solver must be an explicit Runge–Kutta method such as "
                            f"Tsit5(); {base!r} is not a one-step method")
        if isinstance(coupling, bool) or not isinstance(coupling, (int, float)) or not 0 < coupling <= 1:
            raise ValueError(f"Reversible: coupling (lambda) must be in (0, 1], got {coupling!r}")
        self.base = base
        self.coupling = float(coupling)
        self.order = base.order
        self.error_order = base.error_order
        self.interpolation_order = 0

    def default_controller(self):
        return self.base.default_controller()

    def init(self, term, t0, u0, dt0, f0=None):
        return ReversibleState(u0)

    def current_z(self, term, y: torch.Tensor, state: ReversibleState) -> tuple[torch.Tensor, int]:
        """``Z`` at the current point (completing a pending backward increment) and the evaluations it took."""
        if state.pending is None:
            return state.z, 0
        t_new, dt = state.pending
        back, nfe = self.base.advance(term, t_new, y, -dt)  # no error estimate needed: FSAL's last stage is skipped
        return state.z + y - back, nfe

    def diagnose(self, state: ReversibleState | None, options) -> str | None:
        """Why a finished solve's ``Y`` cannot be trusted (``None`` when it can): the pair separated by more
        than :data:`PAIR_SEPARATION_LIMIT` tolerances (module docstring, *Stability*). One synchronisation."""
        if state is None or state.gap is None:
            return None
        separation, size = state.gap.tolist()
        abstol = options.abstol
        abstol = float(abstol.max()) if isinstance(abstol, torch.Tensor) else float(abstol)
        ratio = separation / (abstol + float(options.reltol) * size)
        if not ratio > PAIR_SEPARATION_LIMIT:
            return None
        return (f"the reversible pair (Y, Z) separated by {separation:.3g}, {ratio:.3g} times the tolerance "
                f"abstol + reltol * max|Y|: its second half follows the time-reversed dynamics, which grow where "
                f"the solution contracts (about coupling * exp(|a| h) a step for u' = -a u), so Y is no longer "
                f"the solution. Dissipative dynamics are better served by BacksolveAdjoint, InterpolatingAdjoint "
                f"or DirectAdjoint(checkpoints=...); a smaller coupling (now {self.coupling}) damps this mode but "
                "multiplies the backward reconstruction's round-off by 1/coupling a step, so it suits short "
                "solves only")

    def final_pair(self, term, y: torch.Tensor, state: ReversibleState) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Y_N, Z_N)`` after the last accepted step (``(u0, u0)`` when no step was taken)."""
        if state is None:
            return y, y
        return y, self.current_z(term, y, state)[0]

    def step(self, term, t, u, dt, state):
        term = as_bound_term(term)
        t, dt = as_step_times(t, dt, u)
        z, nfe = self.current_z(term, u, state)
        forward = _base_step(self.base, term, t, z, dt)
        lam = self.coupling
        # λY + (1-λ)Z + (step(Z) - Z) = λ(Y - Z) + step(Z)
        y_new = torch.add(forward.u_new, u - z, alpha=lam) if lam != 1.0 else forward.u_new + (u - z)
        gap = pair_gap(u, z, state.gap)
        settled = ReversibleState(z, None, gap)
        return StepResult(
            y_new,
            dense_info=None,
            solver_state_new=ReversibleState(z, (time_add(t, dt), dt), gap),
            nfe=nfe + forward.nfe,
            solver_state_retry=settled,
            error_fn=forward.compute_error_estimate,
            error_scale=(z, forward.u_new),
        )


class _AdaptiveReversible(Reversible, AbstractAdaptiveSolver):
    pass
