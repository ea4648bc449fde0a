r"""Stochastic differential equations: ``SDEProblem`` and the SDE solvers' common ground.

.. math::
    du = f(u, p, t)\, dt + g(u, p, t)\, dW_t, \qquad u(t_0) = u_0,

in Itô or Stratonovich form, solved on the same loop, controllers, norms,
statistics and sensitivity hook as an ODE. The problem is a sum of terms
(:mod:`pylux.diffeq.terms`): ``MultiTerm(ODETerm(f), ControlTerm(g, W, kind))``
with the Brownian increment as the control. The noise type fixes the shapes
(``u`` of shape ``(*batch, d)``):

============  ==============================  ================================
noise         ``g(u, p, t)`` returns          ``W`` has shape
============  ==============================  ================================
diagonal      ``u.shape`` (one W per entry)   ``u.shape``
scalar        ``u.shape`` (one W for all)     ``(*batch, 1)``
additive      ``u.shape``, independent of u   ``u.shape`` (or general, below)
general       ``(*u.shape, m)``               ``(*batch, m)``, ``m = noise_dim``
============  ==============================  ================================

Each solve draws its Brownian path as a :class:`~pylux.diffeq.brownian.BrownianTree`
over ``tspan`` (from ``seed`` when given, else from torch's default generator),
unless the problem carries one (``brownian=``): then every solve, and every
rejected step of an adaptive solve, queries that same path.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ._device import host_time
from .interpolation import AbstractInterpolant, linear_combination
from .problem import check_state, parse_tspan
from .solvers import AbstractSolver, StepResult, as_step_times, step_scale, time_add
from .terms import ControlTerm, MultiTerm, ODETerm, as_bound_term

__all__ = ["SDEProblem", "AbstractSDESolver", "EulerMaruyama", "EulerHeun", "Milstein", "ReversibleHeun",
           "NOISE_TYPES", "INTERPRETATIONS", "LinearInterpolant", "check_sde_solver", "fitting_sde_solvers"]

NOISE_TYPES = ("diagonal", "scalar", "additive", "general")
INTERPRETATIONS = ("ito", "stratonovich")


class SDEProblem:
    """The SDE ``du = f(u, p, t) dt + g(u, p, t) dW`` on ``tspan`` (see the module docstring).

    Args:
        f: the drift, ``f(u, p, t) -> du/dt`` with ``u``'s shape.
        g: the diffusion, ``g(u, p, t)``, shaped by ``noise`` (module docstring).
        u0: the initial state, a real floating-point tensor; a leading batch
            dimension holds independent trajectories (each gets its own path).
        tspan: ``(t0, t1)`` as for :class:`~pylux.diffeq.ODEProblem`.
        p: parameters, any tree, passed to ``f`` and ``g`` untouched.
        noise: ``"diagonal"`` (default), ``"scalar"``, ``"additive"``, ``"general"``.
        noise_dim: ``m``, the number of Brownian motions of general noise (and
            of additive noise with a matrix ``g``).
        interpretation: ``"ito"`` (default) or ``"stratonovich"``.
        trajectories: ``K`` copies of ``u0`` along a new leading dimension,
            each with its own Brownian path (no Python loop over paths).
        brownian: a fixed path (anything with ``increment(s, t)``, e.g. a
            :class:`~pylux.diffeq.brownian.BrownianTree` of the noise shape).
        seed: seed of the path each solve draws when ``brownian`` is not given.

    Raises:
        TypeError / ValueError: an unknown noise type or interpretation,
            ``noise_dim`` missing for general noise or given for diagonal or
            scalar noise, and every check of ``ODEProblem``.
    """

    __slots__ = ("f", "g", "u0", "tspan", "p", "time_dtype", "noise", "noise_dim", "interpretation",
                 "brownian", "seed")

    def __init__(self, f: Callable, g: Callable, u0: torch.Tensor, tspan, p: Any = None, *,
                 noise: str = "diagonal", noise_dim: int | None = None, interpretation: str = "ito",
                 trajectories: int | None = None, brownian=None, seed: int | None = None) -> None:
        for name, fn in (("f", f), ("g", g)):
            if not callable(fn):
                raise TypeError(f"SDEProblem: {name} must be callable as {name}(u, p, t), got {type(fn).__name__}")
        if noise not in NOISE_TYPES:
            raise ValueError(f"SDEProblem: noise must be one of {', '.join(map(repr, NOISE_TYPES))}, got {noise!r}")
        if interpretation not in INTERPRETATIONS:
            raise ValueError(f"SDEProblem: interpretation must be 'ito' or 'stratonovich', got {interpretation!r}")
        if noise == "general" and noise_dim is None:
            raise ValueError("SDEProblem: general noise needs noise_dim=m, the number of Brownian motions "
                             "(g returns shape (*u.shape, m))")
        if noise in ("diagonal", "scalar") and noise_dim is not None:
            raise ValueError(f"SDEProblem: noise_dim is fixed by {noise} noise; pass noise='general' with "
                             "noise_dim=m for a matrix diffusion")
        if noise_dim is not None and (isinstance(noise_dim, bool) or not isinstance(noise_dim, int) or noise_dim < 1):
            raise ValueError(f"SDEProblem: noise_dim must be a positive int, got {noise_dim!r}")
        u0 = check_state(u0, "SDEProblem")
        if trajectories is not None:
            if isinstance(trajectories, bool) or not isinstance(trajectories, int) or trajectories < 1:
                raise ValueError(f"SDEProblem: trajectories must be a positive int, got {trajectories!r}")
            u0 = u0.unsqueeze(0).expand(trajectories, *u0.shape).clone()
        if u0.dim() == 0:
            raise ValueError("SDEProblem: u0 must have at least one dimension (the state entries)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"SDEProblem: seed must be an int, got {type(seed).__name__}")
        if brownian is not None and not callable(getattr(brownian, "increment", None)):
            raise TypeError(f"SDEProblem: brownian must have an increment(s, t) method (a BrownianTree), "
                            f"got {type(brownian).__name__}")
        self.f, self.g, self.u0, self.p = f, g, u0, p
        t0, t1, self.time_dtype = parse_tspan(tspan, "SDEProblem")
        self.tspan = (t0, t1)
        self.noise, self.noise_dim, self.interpretation = noise, noise_dim, interpretation
        self.brownian, self.seed = brownian, seed

    @property
    def noise_kind(self) -> str:
        """How ``g`` meets ``dW``: ``"diagonal"``, ``"scalar"`` or ``"general"`` (additive is one of them)."""
        if self.noise == "additive":
            return "general" if self.noise_dim is not None else "diagonal"
        return self.noise

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """The shape of ``W`` (module docstring)."""
        kind, shape = self.noise_kind, tuple(self.u0.shape)
        if kind == "diagonal":
            return shape
        if kind == "scalar":
            return shape[:-1] + (1,)
        return shape[:-1] + (self.noise_dim,)

    def with_brownian(self, brownian) -> "SDEProblem":
        """This problem with the path fixed (what one solve integrates)."""
        return SDEProblem(self.f, self.g, self.u0, self._tspan_spelling(), self.p, noise=self.noise,
                          noise_dim=self.noise_dim, interpretation=self.interpretation, brownian=brownian,
                          seed=self.seed)

    def draw_brownian(self, levy_area: bool = False):
        """A :class:`~pylux.diffeq.brownian.BrownianTree` of the noise shape over ``tspan``, from ``seed``."""
        from .brownian import BrownianTree
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
        lo, hi = sorted(self.tspan)
        if lo == hi:
            hi = lo + 1.0
        return BrownianTree(lo, hi, self.noise_shape, seed=seed, dtype=self.u0.dtype, device=self.u0.device,
                            levy_area="space-time" if levy_area else None)

    @property
    def term(self) -> MultiTerm:
        """``MultiTerm(ODETerm(f), ControlTerm(g, W, kind))`` over this problem's fixed path."""
        if self.brownian is None:
            raise ValueError("SDEProblem.term needs a fixed Brownian path: solve() draws one per solve, or pass "
                             "brownian=BrownianTree(...) (see SDEProblem.with_brownian)")
        return MultiTerm(ODETerm(self.f), ControlTerm(self.g, _HostTimeControl(self.brownian), self.noise_kind))

    def _tspan_spelling(self):
        if self.time_dtype == torch.float32:
            return tuple(torch.tensor(t, dtype=torch.float32) for t in self.tspan)
        return self.tspan

    def __repr__(self) -> str:
        return (f"SDEProblem(f={getattr(self.f, '__name__', type(self.f).__name__)}, "
                f"g={getattr(self.g, '__name__', type(self.g).__name__)}, u0: {tuple(self.u0.shape)} "
                f"{str(self.u0.dtype).replace('torch.', '')}, tspan={self.tspan}, noise={self.noise!r}, "
                f"interpretation={self.interpretation!r})")


class _HostTimeControl:
    """A Brownian path queried at host times (from the host table: no device-to-host copy per step)."""

    __slots__ = ("path",)

    def __init__(self, path) -> None:
        self.path = path

    def increment(self, t0, t1, levy_area: bool = False):
        s, t = host_time(t0), host_time(t1)
        if levy_area:
            return self.path.increment(s, t, levy_area=True)
        return self.path.increment(s, t)


class LinearInterpolant(AbstractInterpolant):
    """``u + theta (u_new - u)``: the dense output of a stochastic step (the path between steps is
    not determined by the step's values)."""

    __slots__ = ("u", "u_new")

    def __init__(self, u: torch.Tensor, u_new: torch.Tensor) -> None:
        self.u, self.u_new = u, u_new

    def evaluate(self, thetas) -> torch.Tensor:
        delta = self.u_new - self.u
        return torch.stack([linear_combination(self.u, (delta,), (float(th),)) for th in thetas])


class AbstractSDESolver(AbstractSolver):
    """Base of the SDE solvers: they step over ``MultiTerm(ODETerm(f), ControlTerm(g, W))``.

    Class attributes declare what a method can do, and :func:`check_sde_solver`
    reads them before any work: ``interpretations`` (``"ito"``,
    ``"stratonovich"``), ``noise_types`` (of :data:`NOISE_TYPES`),
    ``strong_order`` (the order of ``E|u_N - u(T)|`` in ``dt`` for its noise
    types), ``needs_levy_area`` (the steps need the space-time Lévy area of
    each increment).
    """

    interpretations: tuple[str, ...] = ("ito",)
    noise_types: tuple[str, ...] = NOISE_TYPES
    strong_order: float = 0.5
    needs_levy_area: bool = False
    interpolation_order = 1

    def init(self, term, t0, u0, dt0, f0=None):
        return None

    @staticmethod
    def increment(term, t, dt, levy_area: bool = False):
        """``dW`` (and the space-time Lévy area ``dH`` when asked) over ``[t, t + dt]``."""
        control = term.part_term(1).control
        if levy_area:
            return control.increment(t, time_add(t, dt), levy_area=True)
        return control.increment(t, time_add(t, dt))


def check_sde_solver(solver, noise: str, interpretation: str) -> None:
    """Raise before any work when ``solver`` cannot solve an SDE of this noise type and interpretation,
    naming the solvers that can."""
    if not isinstance(solver, AbstractSDESolver):
        fits = fitting_sde_solvers(noise, interpretation)
        raise TypeError(f"solve: {type(solver).__name__}() is an ODE solver; an SDEProblem needs an SDE solver. "
                        f"For {noise} noise in the {interpretation} sense use one of: {', '.join(fits)}")
    problems = []
    if interpretation not in solver.interpretations:
        problems.append(f"it solves {' or '.join(solver.interpretations)} SDEs, not {interpretation}")
    if noise not in solver.noise_types:
        problems.append(f"it handles {', '.join(solver.noise_types)} noise, not {noise}")
    if problems:
        fits = fitting_sde_solvers(noise, interpretation)
        raise ValueError(f"solve: {type(solver).__name__}() cannot solve this SDEProblem: {'; '.join(problems)}. "
                         f"For {noise} noise in the {interpretation} sense use one of: {', '.join(fits)}")


def fitting_sde_solvers(noise: str, interpretation: str) -> list[str]:
    """Names of the SDE solvers (every subclass of :class:`AbstractSDESolver`) that fit."""
    found, stack = [], list(AbstractSDESolver.__subclasses__())
    while stack:
        cls = stack.pop(0)
        stack.extend(cls.__subclasses__())
        if cls.__name__.startswith("_"):
            continue
        if interpretation in cls.interpretations and noise in cls.noise_types:
            configured = cls is Milstein and interpretation != "ito"
            found.append(f"{cls.__name__}(interpretation={interpretation!r})" if configured else f"{cls.__name__}()")
    return found or ["(none)"]


def _drift_diffusion(term, u, t):
    return term.part_vf(0, u, t), term.part_vf(1, u, t)


def _euler_increment(term, u, f, g, dt, dW):
    """``u + f dt + g·dW``."""
    return linear_combination(u, (f,), (step_scale(dt),)) + term.part_prod(1, g, dW)


class EulerMaruyama(AbstractSDESolver):
    r"""Euler–Maruyama, ``u_{n+1} = u_n + f(u_n) h + g(u_n) \Delta W_n``: Itô, any noise, fixed step.

    Strong order 0.5 (1.0 for additive noise), weak order 1 (Kloeden & Platen,
    *Numerical Solution of SDEs*, 1992, §10.2). One drift and one diffusion
    evaluation per step.
    """

    order = 1
    strong_order = 0.5

    def step(self, term, t, u, dt, state):
        term = as_bound_term(term)
        t, dt = as_step_times(t, dt, u)
        f, g = _drift_diffusion(term, u, t)
        u_new = _euler_increment(term, u, f, g, dt, self.increment(term, t, dt))
        return StepResult(u_new, dense_info=LinearInterpolant(u, u_new), nfe=1)


class EulerHeun(AbstractSDESolver):
    r"""The stochastic Heun method (Stratonovich, any noise, fixed step).

    .. math::
        \tilde u = u_n + f(u_n) h + g(u_n) \Delta W, \quad
        u_{n+1} = u_n + \tfrac12 (f(u_n) + f(\tilde u)) h + \tfrac12 (g(u_n) + g(\tilde u)) \Delta W.

    Converges to the Stratonovich solution with strong order 0.5 in general
    and 1.0 for commutative noise (diagonal, scalar, additive) (Rümelin,
    SIAM J. Numer. Anal. 19, 1982). Two drift and two diffusion evaluations per step.
    """

    order = 1
    strong_order = 0.5
    interpretations = ("stratonovich",)

    def step(self, term, t, u, dt, state):
        term = as_bound_term(term)
        t, dt = as_step_times(t, dt, u)
        dW = self.increment(term, t, dt)
        f0, g0 = _drift_diffusion(term, u, t)
        h = step_scale(dt)
        noise0 = term.part_prod(1, g0, dW)
        predictor = linear_combination(u, (f0, noise0), (h, 1.0))
        f1, g1 = _drift_diffusion(term, predictor, time_add(t, dt))
        # products of single evaluations only: a term's diffusion need not be a tensor one can add
        u_new = linear_combination(u, (f0, f1, noise0, term.part_prod(1, g1, dW)), (0.5 * h, 0.5 * h, 0.5, 0.5))
        return StepResult(u_new, dense_info=LinearInterpolant(u, u_new), nfe=2)


class Milstein(AbstractSDESolver):
    r"""Milstein's method in derivative-free (Runge–Kutta) form: diagonal or scalar noise, fixed step.

    With :math:`\bar u = u_n + f h + g \sqrt{|h|}` (Kloeden & Platen 1992, §11.1, eq. 11.1.5),

    .. math::
        u_{n+1} = u_n + f h + g \Delta W + \frac{g(\bar u) - g(u_n)}{2\sqrt{|h|}}
                  \bigl(\Delta W^2 - h\bigr)

    (Itô). For ``interpretation="stratonovich"`` the last term is
    :math:`g g' \Delta W^2 / 2` with :math:`g g'` from the central difference
    :math:`(g(u_n + g\sqrt{|h|}) - g(u_n - g\sqrt{|h|})) / (2\sqrt{|h|})`: against
    :math:`\Delta W^2`, whose mean is :math:`h`, the one-sided quotient's
    :math:`O(\sqrt h)` error would leave strong order 0.5. The quotients
    approximate :math:`g g'`, so each entry's diffusion should depend on its own
    entry (diagonal noise in the commutative sense). Strong order 1.0. One drift
    and two (Itô) or three (Stratonovich) diffusion evaluations per step.

    Args:
        interpretation: ``"ito"`` (default) or ``"stratonovich"``.
    """

    order = 1
    strong_order = 1.0
    noise_types = ("diagonal", "scalar", "additive")
    interpretations = ("ito", "stratonovich")  # the instance solves the one it is built for

    def __init__(self, interpretation: str = "ito") -> None:
        if interpretation not in INTERPRETATIONS:
            raise ValueError(f"Milstein: interpretation must be 'ito' or 'stratonovich', got {interpretation!r}")
        self.interpretation = interpretation
        self.interpretations = (interpretation,)

    def step(self, term, t, u, dt, state):
        term = as_bound_term(term)
        t, dt = as_step_times(t, dt, u)
        if term.part_term(1).kind == "general":
            raise ValueError("Milstein handles diagonal, scalar and additive noise only; for general noise use "
                             "EulerMaruyama() (Itô) or EulerHeun() (Stratonovich)")
        dW = self.increment(term, t, dt)
        f, g = _drift_diffusion(term, u, t)
        h = step_scale(dt)
        root = math.sqrt(abs(h)) if not isinstance(h, torch.Tensor) else h.abs().sqrt()
        if self.interpretation == "ito":
            # (g(u + f h + g sqrt h) - g(u)) / sqrt h = g g' + O(sqrt h), against dW^2 - h of mean zero
            g_bar = term.part_vf(1, linear_combination(u, (f, g), (h, root)), t)
            correction = (g_bar - g) * (dW * dW - h).to(g.dtype) / (2 * root)
        else:
            # against dW^2 of mean h the quotient must be O(h) accurate: a central difference
            g_plus = term.part_vf(1, linear_combination(u, (g,), (root,)), t)
            g_minus = term.part_vf(1, linear_combination(u, (g,), (-root,)), t)
            correction = (g_plus - g_minus) * (dW * dW).to(g.dtype) / (4 * root)
        u_new = linear_combination(u, (f,), (h,)) + term.part_prod(1, g, dW) + correction
        return StepResult(u_new, dense_info=LinearInterpolant(u, u_new), nfe=1)

    def __repr__(self) -> str:
        return f"Milstein(interpretation={self.interpretation!r})"


class ReversibleHeunState:
    """``(z, f(z), g(z))``: the reversible Heun method's second state and its fields there."""

    __slots__ = ("z", "drift", "diffusion")

    def __init__(self, z, drift, diffusion) -> None:
        self.z, self.drift, self.diffusion = z, drift, diffusion


class ReversibleHeun(AbstractSDESolver):
    r"""The reversible Heun method (Kidger, Foster, Li & Lyons, ICML 2021): Stratonovich, any noise.

    Carries :math:`(y_n, \hat z_n)` with :math:`\hat z_0 = y_0` and the fields at
    :math:`\hat z_n` (:math:`\mu_n = f(\hat z_n)`, :math:`\sigma_n = g(\hat z_n)`):

    .. math::
        \hat z_{n+1} = 2 y_n - \hat z_n + \mu_n h + \sigma_n \Delta W_n, \qquad
        y_{n+1} = y_n + \tfrac12 (\mu_n + \mu_{n+1}) h + \tfrac12 (\sigma_n + \sigma_{n+1}) \Delta W_n,

    one drift and one diffusion evaluation per step. It inverts in closed form,
    :math:`\hat z_n = 2 y_{n+1} - \hat z_{n+1} - \mu_{n+1} h - \sigma_{n+1} \Delta W_n`,
    then :math:`y_n` from :math:`\mu_n, \sigma_n` at :math:`\hat z_n` — so a backward
    pass can rebuild the states instead of storing them. Strong order 0.5 in
    general, 1.0 for additive noise; converges to the Stratonovich solution.
    """

    order = 1
    strong_order = 0.5
    interpretations = ("stratonovich",)

    def init(self, term, t0, u0, dt0, f0=None):
        term = as_bound_term(term)
        t0, _ = as_step_times(t0, 0.0, u0)
        drift, diffusion = _drift_diffusion(term, u0, t0)
        return ReversibleHeunState(u0, drift, diffusion)

    def step(self, term, t, u, dt, state):
        term = as_bound_term(term)
        t, dt = as_step_times(t, dt, u)
        dW = self.increment(term, t, dt)
        h = step_scale(dt)
        noise = term.part_prod(1, state.diffusion, dW)
        z_new = linear_combination(2 * u - state.z, (state.drift, noise), (h, 1.0))
        drift, diffusion = _drift_diffusion(term, z_new, time_add(t, dt))
        u_new = linear_combination(u, (state.drift, drift, noise, term.part_prod(1, diffusion, dW)),
                                   (0.5 * h, 0.5 * h, 0.5, 0.5))
        return StepResult(u_new, dense_info=LinearInterpolant(u, u_new), nfe=1,
                          solver_state_new=ReversibleHeunState(z_new, drift, diffusion), solver_state_retry=state)
