"""The NeuralODE layer (DiffEqFlux's ``NeuralODE``, Chen et al., NeurIPS 2018)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..core import AbstractLayer, LayerError, check_generator
from ..diffeq import AbstractSensitivityAlgorithm, ODEProblem, Tsit5, solve
from ..diffeq.options import SOLVE_KEYWORDS, check_keywords, make_options
from ..diffeq.solvers import AbstractSolver
from ..nn.dropout import split_key
from ..regularize.base import AbstractIntegralRegularizer, AbstractRegularizer, RegularizationContext, batch_size

__all__ = ["NeuralODE"]


_MASK64 = (1 << 64) - 1


class NeuralODE(AbstractLayer):
    r"""Integrate :math:`\dot z = f_\theta(z)` with a pylux layer as the vector field.

    ``NeuralODE(model, tspan, solver=Tsit5(), sensealg=None, saveat=None, regularize=None, **solve_kwargs)``
    maps ``x`` to :math:`z(t_1)` where :math:`z(t_0) = x` and
    :math:`\dot z = \mathrm{model}(z, \theta, st)`. With ``saveat`` it returns the
    trajectory at those times, stacked along a new first dimension.

    Args:
        model: any pylux layer mapping a state to its time derivative (same shape).
            Time enters only if the layer itself uses it (the inner layer's state
            is held fixed during the solve, as in DiffEqFlux).
        tspan: ``(t0, t1)``.
        solver: a pylux ODE solver (default Tsit5).
        sensealg: how gradients flow (``None``: backprop through the solver;
            e.g. ``BacksolveAdjoint(seminorm=True)``).
        saveat: times to return; ``None`` returns only the final state.
        time_input: if True the model is called with the pair ``(z, t)`` (``t`` a
            0-d tensor of ``z``'s dtype), for vector fields that depend on time.
        regularize: a :class:`~pylux.regularize.AbstractRegularizer` or a list of
            them (ERNODE/SRNODE, local, STEER, RNODE, TayNODE terms). They act in
            train mode only: a test-mode call solves the plain ODE to ``t1`` and
            reports a zero regularization, so prediction cost is that of the
            unregularized layer.
        **solve_kwargs: passed to :func:`pylux.solve` (``reltol``, ``abstol``,
            ``maxiters``, …); misspelt names are rejected when the layer is built.

    Raises:
        TypeError: a model, solver or regularizer of the wrong type, an unknown keyword.
        ValueError: a bad ``tspan``; ``saveat`` together with a regularizer that
            changes the end time (STEER).
        NotImplementedError: a regularizer that cannot work with ``sensealg``
            (raised here, before any solve).

    Parameters ``ps``: the inner model's parameters, unchanged (a wrapper layer).
    State ``st``: ``{"model": inner state, "nfe": int, "naccept": int, "nreject": int,
    "backward_stats": dict}`` where the counters are those of the latest forward
    solve and ``backward_stats`` is that solve's handle to the counters of its
    backward pass (``nf``, ``nvjp``, …; see
    :class:`~pylux.sensitivity.BackwardStats`), filled in when ``backward()``
    runs, and empty for ``sensealg=None`` (backprop through the solver).
    With ``regularize`` the state also has ``"training"`` (bool), ``"rng"``
    (int key, advanced in each train-mode call, as in Dropout),
    ``"regularization"`` (0-d tensor: the sum of the regularizers' values,
    differentiable with respect to ``ps``), ``"regularization_terms"`` (dict
    name -> 0-d tensor, one per regularizer) and ``"regularization_nfe"`` (int:
    evaluations of ``f`` the regularizers made after the solve, e.g. the local
    regularizer's extra step).
    """

    def __init__(self, model: AbstractLayer, tspan, solver: AbstractSolver | None = None, *,
                 sensealg: AbstractSensitivityAlgorithm | None = None, saveat=None, regularize=None,
                 time_input: bool = False, **solve_kwargs: Any):
        if not isinstance(model, AbstractLayer):
            raise TypeError(f"NeuralODE: model must be a pylux layer, got {type(model).__name__}")
        if len(tuple(tspan)) != 2:
            raise ValueError(f"NeuralODE: tspan must be a pair (t0, t1), got {tspan!r}")
        solver = Tsit5() if solver is None else solver
        if not isinstance(solver, AbstractSolver):
            raise TypeError(f"NeuralODE: solver must be a pylux solver such as Tsit5(), got {solver!r}")
        forbidden = {"save_everystep", "save_start", "save_end", "dense"} & solve_kwargs.keys()
        if forbidden:
            raise TypeError(f"NeuralODE: {sorted(forbidden)} are chosen by the layer; use saveat")
        check_keywords({k: v for k, v in solve_kwargs.items() if k not in SOLVE_KEYWORDS}, "NeuralODE", SOLVE_KEYWORDS)
        if not isinstance(time_input, bool):
            raise TypeError(f"NeuralODE: time_input must be True or False, got {time_input!r}")
        self.time_input = time_input
        self.model = model
        self.tspan = tuple(float(t) for t in tspan)
        self.solver = solver
        self.sensealg = sensealg
        self.saveat = None if saveat is None else [float(t) for t in saveat]
        self.solve_kwargs = dict(solve_kwargs)
        self.regularizers = _as_regularizers(regularize)
        self._reg_kwargs = self._regularizer_solve_kwargs()

    def _regularizer_solve_kwargs(self) -> dict:
        merged: dict = {}
        t0, t1 = self.tspan
        for reg in self.regularizers:
            reg.check_span(t0, t1)
            for key, value in reg.solve_kwargs(self.sensealg).items():
                if key not in ("save_stats", "dense", "save_everystep") or value is not True:
                    raise ValueError(f"NeuralODE: {reg!r}.solve_kwargs may only ask for save_stats, dense "
                                     f"or save_everystep = True, got {key}={value!r}")
                merged[key] = True
            if type(reg).end_time is not AbstractRegularizer.end_time and self.saveat is not None:
                raise ValueError(f"NeuralODE: {reg!r} changes the end time, so saveat cannot be used with "
                                 "it; the layer then returns z at the drawn end time")
        if merged.get("save_everystep") and self.saveat is not None:
            raise NotImplementedError(
                "NeuralODE: a regularizer needs every step saved (biased local sampling under an "
                "adjoint sensealg), which excludes saveat; drop saveat, use sampling='unbiased', or "
                "sensealg=None")
        changers = [r for r in self.regularizers if type(r).end_time is not AbstractRegularizer.end_time]
        if len(changers) > 1:
            raise ValueError(f"NeuralODE: at most one regularizer may change the end time, got {changers}")
        if changers:
            # every drawn end time must leave the others a span they can work on (e.g. a fixed t_reg)
            lo, hi = changers[0].end_time_range(t0, t1)
            shortest = min(lo, hi, key=lambda t: abs(t - t0))
            for reg in self.regularizers:
                if reg is not changers[0]:
                    try:
                        reg.check_span(t0, shortest)
                    except ValueError as err:
                        raise ValueError(f"NeuralODE: {changers[0]!r} may end the solve at t = {shortest!r}, "
                                         f"and then {err}") from None
        return merged

    def init_params(self, rng: torch.Generator) -> dict:
        return self.model.init_params(rng)

    def init_state(self, rng: torch.Generator) -> dict:
        st = {"model": self.model.init_state(rng), "nfe": 0, "naccept": 0, "nreject": 0, "backward_stats": {}}
        if self.regularizers:
            rng = check_generator(rng, "NeuralODE.init_state")
            # read back once at setup; forward passes advance the Python int
            key = int(torch.randint(0, 2**62, (1,), generator=rng, device=rng.device).cpu()[0])
            st.update(training=True, rng=key, regularization=torch.zeros(()),
                      regularization_terms={_term_name(self.regularizers, i): torch.zeros(())
                                            for i in range(len(self.regularizers))},
                      regularization_nfe=0)
        return st

    def forward(self, x: torch.Tensor, ps: Mapping, st: Mapping):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise LayerError(f"expected a floating-point tensor as the initial state, got "
                             f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        inner_st = st["model"]
        model = self.model
        time_input = self.time_input

        def vector_field(u, p, t):
            du, _ = model((u, t) if time_input else u, p, inner_st)
            return du

        if self.regularizers:
            training = st.get("training")
            if not isinstance(training, bool):
                raise LayerError(f"state 'training' must be a Python bool, got {type(training).__name__}; "
                                 "use pylux.trainmode(st) / pylux.testmode(st) to set it")
            if training:
                return self._regularized_forward(x, ps, st, vector_field)
        prob = ODEProblem(vector_field, x, self.tspan, ps)
        saveat = self.saveat if self.saveat is not None else [self.tspan[1]]
        sol = solve(prob, self.solver, saveat=saveat, sensealg=self.sensealg, **self.solve_kwargs)
        y = sol.u if self.saveat is not None else sol.u[-1]
        new_st = dict(st)
        new_st.update(nfe=sol.stats.nf, naccept=sol.stats.naccept, nreject=sol.stats.nreject,
                      backward_stats=_backward_stats(sol))
        if self.regularizers:
            zero = x.new_zeros(())
            new_st.update(regularization=zero, regularization_nfe=0,
                          regularization_terms={k: zero for k in st["regularization_terms"]})
        return y, new_st

    def _regularized_forward(self, x: torch.Tensor, ps: Mapping, st: Mapping, vector_field):
        regs = self.regularizers
        generator, next_key = _call_generator(st, x)
        t0, t1 = self.tspan
        for reg in regs:
            drawn = reg.end_time(t0, t1, True, generator)
            if drawn != t1:
                t1 = float(drawn)
                break
        datas = [reg.begin(x, t0, t1, generator) for reg in regs]
        augmented = _AugmentedState(x, regs, datas)
        prob = ODEProblem(augmented.field(vector_field), augmented.initial(), (t0, t1), ps)
        extra = sorted({float(t) for reg, d in zip(regs, datas) for t in reg.save_times(d)})
        for t in extra:
            if not min(t0, t1) <= t <= max(t0, t1):
                raise ValueError(f"NeuralODE: a regularizer asked for the state at t = {t!r}, outside the "
                                 f"solved span ({t0!r}, {t1!r})")
        kwargs = dict(self.solve_kwargs)
        kwargs.update({k: True for k in self._reg_kwargs if k != "save_everystep"})
        sol, y, saved, trajectory = self._solve_and_collect(prob, t0, t1, extra, augmented, kwargs)

        calls = [0]
        field_of_ps = _bind(vector_field, ps)

        def counted_field(u, t):
            calls[0] += 1
            return field_of_ps(u, t)

        ctx = RegularizationContext(
            solution=sol, field=counted_field, solver=self.solver, sensealg=self.sensealg, t0=t0, t1=t1,
            z0=x, training=True, generator=generator, saved=saved, integrals=augmented.integrals(sol.u[-1]),
            options=make_options(self.solver, x, t0, t1, **kwargs), trajectory=trajectory,
            dense_state=(lambda t: augmented.state_of(sol(t))) if sol.dense else None)
        terms = {}
        for i, (reg, data) in enumerate(zip(regs, datas)):
            value = reg.value(ctx, data)
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                raise ValueError(f"{reg!r}.value must return a 0-d tensor, got "
                                 f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
            terms[_term_name(regs, i)] = value
        new_st = dict(st)
        new_st.update(nfe=sol.stats.nf, naccept=sol.stats.naccept, nreject=sol.stats.nreject, rng=next_key,
                      backward_stats=_backward_stats(sol),
                      regularization=torch.stack(list(terms.values())).sum(), regularization_terms=terms,
                      regularization_nfe=calls[0])
        return y, new_st

    def _solve_and_collect(self, prob, t0, t1, extra, augmented, kwargs):
        """Solve; return ``(sol, y, {t: z(t) for t in extra}, z at every saved time)``."""
        if self._reg_kwargs.get("save_everystep"):
            if extra:
                raise NotImplementedError("NeuralODE: these regularizers need every step saved and the state "
                                          "at chosen times at once; combine them with sensealg=None")
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
        inner = repr(self.model).replace("\n", "\n  ")
        regs = f", regularize={list(self.regularizers)!r}" if self.regularizers else ""
        return (f"NeuralODE(\n  {inner},\n  tspan={self.tspan}, solver={self.solver!r}, "
                f"sensealg={self.sensealg!r}{regs}\n)")


def _backward_stats(sol) -> dict:
    return sol.backward_stats if sol.backward_stats is not None else {}


def _as_regularizers(regularize) -> tuple:
    if regularize is None:
        return ()
    items = list(regularize) if isinstance(regularize, (list, tuple)) else [regularize]
    for reg in items:
        if not isinstance(reg, AbstractRegularizer):
            raise TypeError(f"NeuralODE: regularize must be a pylux regularizer (an AbstractRegularizer such "
                            f"as ErrorEstimateRegularization()) or a list of them, got {type(reg).__name__}")
    return tuple(items)


def _term_name(regs, i: int) -> str:
    name = regs[i].name
    same = [j for j, r in enumerate(regs) if r.name == name]
    return name if len(same) == 1 else f"{name}_{same.index(i) + 1}"


def _bind(vector_field, p):
    return lambda u, t: vector_field(u, p, t)


def _call_generator(st: Mapping, x: torch.Tensor) -> tuple[torch.Generator, int]:
    """The generator of this call, seeded from ``st["rng"]``, and the key of the next call (as in Dropout)."""
    key = st["rng"]
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= _MASK64:
        raise LayerError(f"state 'rng' must be an int key in [0, 2**64), got {key!r}; "
                         "re-create the state with pylux.setup")
    seed, next_key = split_key(key)
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    return generator, next_key


class _AugmentedState:
    """The layer's state ``z`` with one channel per sample for each integral regularizer appended.

    Without integral regularizers the solve runs on ``z`` itself (no copy).
    """

    def __init__(self, x: torch.Tensor, regs, datas) -> None:
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

    def field(self, vector_field):
        if not self.regs:
            return vector_field
        regs, shape, n, nb, needs_grad = self.regs, self.shape, self.n, self.nb, self.needs_grad

        def augmented(w, p, t):
            field = _bind(vector_field, p)
            z = w[:n].view(shape)
            if needs_grad:
                # Jacobian terms differentiate f in z, also inside a solve that runs without gradients
                outer = torch.is_grad_enabled()
                with torch.enable_grad():
                    z_in = z if z.requires_grad else z.detach().requires_grad_(True)
                    dz = field(z_in, t)
                    rates = [reg.integrand(field, z_in, dz, t, data) for reg, data in regs]
                if not outer:
                    dz, rates = dz.detach(), [r.detach() for r in rates]
            else:
                dz = field(z, t)
                rates = [reg.integrand(field, z, dz, t, data) for reg, data in regs]
            for (reg, _), rate in zip(regs, rates):
                if rate.shape != (nb,):
                    raise ValueError(f"{reg!r}.integrand returned shape {tuple(rate.shape)}; it must return "
                                     f"one value per sample, shape ({nb},)")
            return torch.cat([dz.reshape(-1)] + [r.to(dz.dtype) for r in rates])
        return augmented
