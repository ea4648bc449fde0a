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
"""

from __future__ import annotations

import torch

from .solvers import (AbstractAdaptiveSolver, AbstractSolver, ExplicitRungeKutta, RKState, StepResult, as_step_times,
                      time_add)
from .terms import as_bound_term

__all__ = ["Reversible", "ReversibleState"]


class ReversibleState:
    """The pair's second half: ``z`` at the current point, or the pending backward increment.

    After an accepted step from ``(t_n, Y_n, Z_n)`` the state holds ``z = Z_n``
    and ``pending = (t_{n+1}, dt)``: ``Z_{n+1} = Z_n + Y_{n+1} - step_{-dt}(t_{n+1}, Y_{n+1})``
    is formed when it is first needed.
    """

    __slots__ = ("z", "pending")

    def __init__(self, z: torch.Tensor, pending: tuple | None = None) -> None:
        self.z = z
        self.pending = pending


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
        settled = ReversibleState(z)
        return StepResult(
            y_new,
            dense_info=None,
            solver_state_new=ReversibleState(z, (time_add(t, dt), dt)),
            nfe=nfe + forward.nfe,
            solver_state_retry=settled,
            error_fn=forward.compute_error_estimate,
            error_scale=(z, forward.u_new),
        )


class _AdaptiveReversible(Reversible, AbstractAdaptiveSolver):
    pass
