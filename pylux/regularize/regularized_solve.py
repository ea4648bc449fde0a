r"""Solving a differential-equation layer with its regularizers: the plumbing every such layer shares.

A layer that integrates :math:`\dot z = f_\theta(z, t)` and takes regularizers
(:class:`~pylux.layers.NeuralODE`, :class:`~pylux.layers.NeuralSDE`) builds one :class:`RegularizedSolve`
when it is built and calls it in every train-mode forward pass. It runs the
contract of :mod:`pylux.regularize.base` in order:

1. once, when built: each regularizer's ``check_span`` and ``solve_kwargs``
   (merged into the options of the solve: ``save_stats``, ``dense``,
   ``save_everystep``), the checks that at most one regularizer changes the end
   time and that every end time it can draw leaves the others a span they can
   work on, and the conflicts with ``saveat``;
2. per call: the generator of the call from the layer's state key (as in
   Dropout), the end time (STEER), each regularizer's per-solve data, the
   times it needs the state at;
3. the solve of the *augmented state*: ``z`` with one channel per sample for
   each integral regularizer appended (:math:`\dot r_b = \text{integrand}_b`),
   so an integral costs no extra solve and any sensitivity algorithm carries
   its gradient;
4. after the solve: ``z`` split off the augmented state, the regularizers'
   values from a :class:`~pylux.regularize.base.RegularizationContext`, and what
   the layer reports in its state: ``regularization`` (the sum),
   ``regularization_terms`` (one 0-d tensor per regularizer, keyed by name),
   ``regularization_nfe`` (evaluations of the vector field made after the
   solve) and the next ``rng`` key.

Nothing here depends on which sensitivity algorithm is used; a regularizer
that needs one kind declares it through its own ``solve_kwargs`` (with
:func:`~pylux.regularize.base.differentiates_solver`).

Usage, in a layer's ``forward`` (``field(u, p, t)`` the layer's vector field)::

    regularized = RegularizedSolve(regularize, tspan, solver, sensealg, saveat=saveat, owner="NeuralODE")
    st.update(regularized.init_state(rng))                    # at setup
    if regularized.is_training(st):
        result = regularized.solve(field, x, ps, st, reltol=1e-6)
        y, sol = result.y, result.solution
        new_st = {**st, **solution_state(sol), **result.state()}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..core import LayerError, draw_key, key_generator
from ..diffeq import ODEProblem, ODETerm, Solution, solve
from ..diffeq.integrate import CountingField
from ..diffeq.options import make_options
from .base import AbstractIntegralRegularizer, AbstractRegularizer, RegularizationContext, batch_size

__all__ = ["RegularizedSolve", "RegularizedSolution", "as_regularizers", "solution_state"]

#: ``field(u, p, t) -> du/dt``: a layer's vector field, parameters passed explicitly.
LayerField = Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor]

#: the solve() options a regularizer may ask for (each only as True).
_REGULARIZER_OPTIONS = ("save_stats", "dense", "save_everystep")


def as_regularizers(regularize: Any, owner: str = "NeuralODE") -> tuple[AbstractRegularizer, ...]:
    """``regularize`` (``None``, one regularizer or a list/tuple of them) as a tuple of regularizers.

    Raises:
        TypeError: an item that is not an :class:`AbstractRegularizer`.
    """
    if regularize is None:
        return ()
    items = list(regularize) if isinstance(regularize, (list, tuple)) else [regularize]
    for reg in items:
        if not isinstance(reg, AbstractRegularizer):
            raise TypeError(f"{owner}: regularize must be a pylux regularizer (an AbstractRegularizer such "
                            f"as ErrorEstimateRegularization()) or a list of them, got {type(reg).__name__}")
    return tuple(items)


def solution_state(sol: Solution) -> dict:
    """A solve's counters as a layer reports them in its state.

    ``nfe``, ``naccept``, ``nreject`` from ``sol.stats``, and ``backward_stats``:
    the solve's own handle to the counters of its backward pass
    (``sol.backward_stats``, filled when ``backward()`` runs; ``{}`` when the
    solver is differentiated directly).
    """
    return {"nfe": sol.stats.nf, "naccept": sol.stats.naccept, "nreject": sol.stats.nreject,
            "backward_stats": sol.backward_stats if sol.backward_stats is not None else {}}


@dataclass
class RegularizedSolution:
    """One regularized solve.

    Attributes:
        solution: the solution of the augmented state (its statistics are the solve's).
        y: the layer's output: ``z`` at the end time, or at ``saveat`` stacked along dim 0.
        value: the sum of the regularizers' values (0-d, differentiable in the parameters).
        terms: ``{name: value}``, one entry per regularizer.
        nfe: evaluations of the vector field the regularizers made after the solve.
        rng: the key of the layer's next call.
    """

    solution: Solution
    y: torch.Tensor
    value: torch.Tensor
    terms: dict
    nfe: int
    rng: int

    def state(self) -> dict:
        """The entries of the layer's state this solve sets (besides the solve's counters)."""
        return {"rng": self.rng, "regularization": self.value, "regularization_terms": self.terms,
                "regularization_nfe": self.nfe}


class RegularizedSolve:
    """The regularizers of one layer, checked once for its span, solver, sensealg and ``saveat``.

    Args:
        regularize: ``None``, an :class:`AbstractRegularizer` or a list of them.
        tspan: ``(t0, t1)`` floats.
        solver: the layer's solver.
        sensealg: the layer's sensitivity algorithm (``None``: backprop through the solver).
        saveat: the times the layer returns, or ``None`` for the end state only.
        owner: the layer's name, which starts every message.
        problem: ``problem(field, u0, tspan, p, generator)`` builds the problem of the
            augmented state (default: an :class:`~pylux.diffeq.ODEProblem`, which
            ignores the call's generator; an SDE layer draws its Brownian path from it).

    Raises:
        TypeError: an item of ``regularize`` that is not a regularizer.
        ValueError: a regularizer cannot work on the span, asks for an option it may
            not, changes the end time together with ``saveat`` or with another one.
        NotImplementedError: a regularizer cannot work with ``sensealg`` or needs every
            step saved together with ``saveat``.
    """

    def __init__(self, regularize: Any, tspan: Sequence[float], solver: Any, sensealg: Any, *,
                 saveat: Sequence[float] | None = None, owner: str = "NeuralODE",
                 problem: Callable[..., Any] | None = None) -> None:
        self.owner = owner
        self.regularizers = as_regularizers(regularize, owner)
        self.tspan = (float(tspan[0]), float(tspan[1]))
        self.solver = solver
        self.sensealg = sensealg
        self.saveat = None if saveat is None else [float(t) for t in saveat]
        self.problem = problem if problem is not None else _ode_problem
        self.solve_options = self._merged_solve_options()
        self._check_end_time_changers()

    # ----------------------------------------------------------------- built once
    def _merged_solve_options(self) -> dict:
        """The options the regularizers ask :func:`pylux.solve` for, after ``check_span``."""
        merged: dict = {}
        t0, t1 = self.tspan
        for reg in self.regularizers:
            reg.check_span(t0, t1)
            for key, value in reg.solve_kwargs(self.sensealg).items():
                if key not in _REGULARIZER_OPTIONS or value is not True:
                    raise ValueError(f"{self.owner}: {reg!r}.solve_kwargs may only ask for save_stats, dense "
                                     f"or save_everystep = True, got {key}={value!r}")
                merged[key] = True
            if _changes_end_time(reg) and self.saveat is not None:
                raise ValueError(f"{self.owner}: {reg!r} changes the end time, so saveat cannot be used with "
                                 "it; the layer then returns z at the drawn end time")
        if merged.get("save_everystep") and self.saveat is not None:
            raise NotImplementedError(
                f"{self.owner}: a regularizer needs every step saved (biased local sampling under an "
                "adjoint sensealg), which excludes saveat; drop saveat, use sampling='unbiased', or "
                "sensealg=None")
        return merged

    def _check_end_time_changers(self) -> None:
        changers = [r for r in self.regularizers if _changes_end_time(r)]
        if len(changers) > 1:
            raise ValueError(f"{self.owner}: at most one regularizer may change the end time, got {changers}")
        if not changers:
            return
        # every drawn end time must leave the others a span they can work on (e.g. a fixed t_reg)
        t0, t1 = self.tspan
        lo, hi = changers[0].end_time_range(t0, t1)
        shortest = min(lo, hi, key=lambda t: abs(t - t0))
        for reg in self.regularizers:
            if reg is not changers[0]:
                try:
                    reg.check_span(t0, shortest)
                except ValueError as err:
                    raise ValueError(f"{self.owner}: {changers[0]!r} may end the solve at t = {shortest!r}, "
                                     f"and then {err}") from None

    # ----------------------------------------------------------------- state
    @property
    def enabled(self) -> bool:
        """Whether there is any regularizer (without one the layer solves plainly and reports nothing)."""
        return bool(self.regularizers)

    def term_names(self) -> tuple[str, ...]:
        """The keys of ``st["regularization_terms"]``: each regularizer's name, numbered when repeated."""
        return tuple(_term_name(self.regularizers, i) for i in range(len(self.regularizers)))

    def init_state(self, rng: torch.Generator) -> dict:
        """The layer-state entries of the regularizers (``{}`` without any).

        ``training`` (True), ``rng`` (an int key drawn from ``rng`` once, here),
        ``regularization`` (0-d zero), ``regularization_terms`` (zeros by name),
        ``regularization_nfe`` (0).
        """
        if not self.regularizers:
            return {}
        # read back once at setup; forward passes advance the Python int
        return {"training": True, "rng": draw_key(rng, f"{self.owner}.init_state"),
                "regularization": torch.zeros(()),
                "regularization_terms": {name: torch.zeros(()) for name in self.term_names()},
                "regularization_nfe": 0}

    def is_training(self, st: Mapping) -> bool:
        """True when this call regularizes: there are regularizers and ``st["training"]`` is True.

        Raises:
            LayerError: ``st["training"]`` is not a Python bool.
        """
        if not self.regularizers:
            return False
        training = st.get("training")
        if not isinstance(training, bool):
            raise LayerError(f"state 'training' must be a Python bool, got {type(training).__name__}; "
                             "use pylux.trainmode(st) / pylux.testmode(st) to set it")
        return training

    def inactive_state(self, x: torch.Tensor, st: Mapping) -> dict:
        """The state entries of a call that does not regularize (test mode): zero values, no extra NFE."""
        if not self.regularizers:
            return {}
        zero = x.new_zeros(())
        return {"regularization": zero, "regularization_nfe": 0,
                "regularization_terms": {k: zero for k in st["regularization_terms"]}}

    # ----------------------------------------------------------------- per call
    def solve(self, field: LayerField, x: torch.Tensor, ps: Any, st: Mapping, *, problem: Callable | None = None,
              **solve_kwargs: Any) -> RegularizedSolution:
        """One train-mode solve of ``field`` from ``x`` with the regularizers.

        Args:
            field: the layer's vector field ``field(u, p, t)``.
            x: the initial state.
            ps: the parameters passed to ``field``.
            st: the layer's state (its ``rng`` key seeds this call's draws).
            problem: this call's problem factory (default: the one given when built),
                e.g. one that closes over the layer's current inner state.
            **solve_kwargs: the layer's options for :func:`pylux.solve`; the
                regularizers' own (``save_stats``, ``dense``) are added.

        Returns:
            a :class:`RegularizedSolution`.

        Raises:
            LayerError: a bad ``st["rng"]``.
            ValueError: a regularizer asked for the state outside the solved span,
                or returned a value that is not a 0-d tensor.
        """
        generator, next_key = key_generator(st["rng"], x.device)  # as in Dropout
        t0, t1 = self.tspan[0], self._end_time(generator)
        datas = [reg.begin(x, t0, t1, generator) for reg in self.regularizers]
        augmented = _AugmentedState(x, self.regularizers, datas)
        make_problem = problem if problem is not None else self.problem
        prob = make_problem(augmented.field(field), augmented.initial(), (t0, t1), ps, generator)
        extra = self._save_times(datas, t0, t1)
        kwargs = dict(solve_kwargs)
        kwargs.update({k: True for k in self.solve_options if k != "save_everystep"})
        sol, y, saved, trajectory = self._solve_and_collect(prob, t0, t1, extra, augmented, kwargs)
        # what the regularizers may step over: the layer's own term (with an SDE's path), parameters
        # bound; with integral channels, the layer's field alone
        counted_field = CountingField(ODETerm(field).bind(ps) if augmented.regs else prob.term.bind(ps), x)

        ctx = RegularizationContext(
            solution=sol, field=counted_field, solver=self.solver, sensealg=self.sensealg, t0=t0, t1=t1,
            z0=x, training=True, generator=generator, saved=saved, integrals=augmented.integrals(sol.u[-1]),
            options=make_options(self.solver, x, t0, t1, **kwargs), trajectory=trajectory,
            dense_state=(lambda t: augmented.state_of(sol(t))) if sol.dense else None)
        terms = self._values(ctx, datas)
        return RegularizedSolution(solution=sol, y=y, value=torch.stack(list(terms.values())).sum(),
                                   terms=terms, nfe=counted_field.count + counted_field.count_g, rng=next_key)

    def _end_time(self, generator: torch.Generator) -> float:
        t0, t1 = self.tspan
        for reg in self.regularizers:
            drawn = reg.end_time(t0, t1, True, generator)
            if drawn != t1:
                return float(drawn)
        return t1

    def _save_times(self, datas: list, t0: float, t1: float) -> list[float]:
        extra = sorted({float(t) for reg, d in zip(self.regularizers, datas) for t in reg.save_times(d)})
        for t in extra:
            if not min(t0, t1) <= t <= max(t0, t1):
                raise ValueError(f"{self.owner}: a regularizer asked for the state at t = {t!r}, outside the "
                                 f"solved span ({t0!r}, {t1!r})")
        return extra

    def _values(self, ctx: RegularizationContext, datas: list) -> dict:
        terms = {}
        for i, (reg, data) in enumerate(zip(self.regularizers, datas)):
            value = reg.value(ctx, data)
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                raise ValueError(f"{reg!r}.value must return a 0-d tensor, got "
                                 f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
            terms[_term_name(self.regularizers, i)] = value
        return terms

    def _solve_and_collect(self, prob, t0: float, t1: float, extra: list, augmented: "_AugmentedState",
                           kwargs: dict):
        """Solve; return ``(sol, y, {t: z(t) for t in extra}, z at every saved time)``."""
        if self.solve_options.get("save_everystep"):
            if extra:
                raise NotImplementedError(f"{self.owner}: these regularizers need every step saved and the "
                                          "state at chosen times at once; combine them with sensealg=None")
            sol = solve(prob, self.solver, save_everystep=True, save_start=True, sensealg=self.sensealg,
                        **kwargs)
            trajectory = augmented.state_of(sol.u)
            return sol, trajectory[-1], {}, trajectory
        outputs = self.saveat if self.saveat is not None else [t1]
        direction = 1.0 if t1 >= t0 else -1.0
        times = sorted(set(outputs) | set(extra), key=lambda t: direction * t)
        sol = solve(prob, self.solver, saveat=times, sensealg=self.sensealg, **kwargs)
        index = {t: i for i, t in enumerate(times)}
        trajectory = augmented.state_of(sol.u)
        saved = {t: trajectory[index[t]] for t in extra}
        y = trajectory[[index[t] for t in outputs]] if self.saveat is not None else trajectory[index[t1]]
        return sol, y, saved, trajectory

    def __repr__(self) -> str:
        return f"RegularizedSolve({list(self.regularizers)!r}, tspan={self.tspan})"


def _ode_problem(field, u0, tspan, p, generator):
    return ODEProblem(field, u0, tspan, p)


def _changes_end_time(reg: AbstractRegularizer) -> bool:
    return type(reg).end_time is not AbstractRegularizer.end_time


def _term_name(regs: Sequence[AbstractRegularizer], i: int) -> str:
    name = regs[i].name
    same = [j for j, r in enumerate(regs) if r.name == name]
    return name if len(same) == 1 else f"{name}_{same.index(i) + 1}"


def _bind(field: LayerField, p: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda u, t: field(u, p, t)


class _AugmentedState:
    """The layer's state ``z`` with one channel per sample for each integral regularizer appended.

    Without integral regularizers the solve runs on ``z`` itself (no copy).
    """

    def __init__(self, x: torch.Tensor, regs: Sequence[AbstractRegularizer], datas: Sequence[Any]) -> None:
        self.x = x
        self.shape, self.n, self.nb = x.shape, x.numel(), batch_size(x)
        self.regs = [(reg, data) for reg, data in zip(regs, datas) if isinstance(reg, AbstractIntegralRegularizer)]
        self.needs_grad = any(reg.needs_input_grad for reg, _ in self.regs)

    def initial(self) -> torch.Tensor:
        if not self.regs:
            return self.x
        return torch.cat([self.x.reshape(-1), self.x.new_zeros(self.nb * len(self.regs))])

    def state_of(self, w: torch.Tensor) -> torch.Tensor:
        """``z`` from one augmented state, or from a stack of them along dim 0."""
        if not self.regs:
            return w
        if w.dim() == 1:
            return w[:self.n].view(self.shape)
        return w[:, :self.n].reshape((w.shape[0],) + tuple(self.shape))

    def integrals(self, final: torch.Tensor) -> dict:
        n, nb = self.n, self.nb
        return {id(reg): final[n + k * nb:n + (k + 1) * nb] for k, (reg, _) in enumerate(self.regs)}

    def _rates(self, field, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(f(z, t), [integrand of each integral regularizer])``."""
        if not self.needs_grad:
            dz = field(z, t)
            return dz, [reg.integrand(field, z, dz, t, data) for reg, data in self.regs]
        # Jacobian terms differentiate f in z, also inside a solve that runs without gradients
        outer = torch.is_grad_enabled()
        with torch.enable_grad():
            z_in = z if z.requires_grad else z.detach().requires_grad_(True)
            dz = field(z_in, t)
            rates = [reg.integrand(field, z_in, dz, t, data) for reg, data in self.regs]
        if not outer:
            dz, rates = dz.detach(), [r.detach() for r in rates]
        return dz, rates

    def field(self, vector_field: LayerField) -> LayerField:
        """The augmented vector field ``w -> [f(z); integrands]`` (``vector_field`` itself without integrals)."""
        if not self.regs:
            return vector_field
        shape, n, nb = self.shape, self.n, self.nb

        def augmented(w, p, t):
            dz, rates = self._rates(_bind(vector_field, p), w[:n].view(shape), t)
            for (reg, _), rate in zip(self.regs, rates):
                if rate.shape != (nb,):
                    raise ValueError(f"{reg!r}.integrand returned shape {tuple(rate.shape)}; it must return "
                                     f"one value per sample, shape ({nb},)")
            return torch.cat([dz.reshape(-1)] + [r.to(dz.dtype) for r in rates])
        return augmented
