r"""Continuous normalizing flows: the FFJORD layer (Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud, ICLR 2019).

A flow :math:`\dot z = f_\theta(z, t)` carries a data point :math:`x = z(t_0)` to a latent
point :math:`z(t_1)`. The instantaneous change of variables (Chen et al., NeurIPS 2018, Thm. 1)

.. math::
    \frac{d}{dt}\log p(z(t)) = -\operatorname{tr}\Big(\frac{\partial f}{\partial z(t)}\Big)

gives the data density from the base density :math:`p_{\mathrm{base}}` of the latent point:

.. math::
    \log p(x) = \log p_{\mathrm{base}}(z(t_1)) - \Delta(t_1), \qquad
    \dot\Delta = -\operatorname{tr}\Big(\frac{\partial f}{\partial z}\Big),\ \Delta(t_0) = 0,

so one solve of the augmented state :math:`[z, \Delta]` evaluates :math:`\log p(x)`.
FFJORD's trace estimator (Hutchinson 1989) replaces the trace by
:math:`\varepsilon^\top (\partial f/\partial z)\,\varepsilon` with a probe
:math:`\varepsilon` (Rademacher or standard normal, :math:`\mathbb E[\varepsilon\varepsilon^\top] = I`)
drawn once per solve and held fixed over time, so the integrand stays a smooth function of
time and the estimate of :math:`\Delta(t_1)` is unbiased; each evaluation costs one
vector–Jacobian product :math:`\varepsilon^\top \partial f/\partial z`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..core import AbstractLayer, LayerError, draw_key, key_generator
from ..core.keywords import check_keywords
from ..core.tree import tree_leaves
from ..diffeq import AbstractSensitivityAlgorithm, ODEProblem, ODETerm, Tsit5, check_sensealg, solve
from ..diffeq.integrate import CountingField
from ..diffeq.options import SOLVE_KEYWORDS, make_options
from ..diffeq.solvers import AbstractSolver
from ..regularize.base import AbstractIntegralRegularizer, RegularizationContext
from ..regularize.hutchinson import rademacher_like
from ..regularize.regularized_solve import RegularizedSolve, solution_state
from .distributions import StandardNormal

__all__ = ["FFJORD"]

_TRACES = ("hutchinson", "exact")
_PROBES = ("rademacher", "gaussian")
#: solve() keywords the layer chooses itself (it saves z at t1 and at the regularizers' times).
_LAYER_CHOSEN = ("saveat", "save_everystep", "save_start", "save_end", "dense")
_LAYER_KEYWORDS = ("base", "trace", "probe", "solver", "sensealg", "regularize", "time_input")


class FFJORD(AbstractLayer):
    r"""A continuous normalizing flow: ``layer(x, ps, st) -> (log p(x), st)``.

    ``FFJORD(model, tspan, base=StandardNormal(d), trace="hutchinson", probe="rademacher",
    solver=Tsit5(), sensealg=None, regularize=None, time_input=False, **solve_kwargs)``
    integrates :math:`[z, \Delta]` over ``tspan`` from :math:`z(t_0) = x` (the math is in the
    module docstring) and returns :math:`\log p(x) = \log p_{\mathrm{base}}(z(t_1)) - \Delta(t_1)`,
    one value per row of ``x``.

    Args:
        model: a pylux layer :math:`f_\theta`, mapping states of shape ``(B, d)`` to their time
            derivatives (same shape), each row depending on its own row only (a batch of
            independent samples; the per-sample trace needs it).
        tspan: ``(t0, t1)``: data at ``t0``, latent at ``t1``.
        base: the latent distribution: anything with ``dim``, ``log_prob(z) -> (B,)`` and
            ``sample(n, generator, dtype, device)``; default :class:`StandardNormal` of the
            data's dimension.
        trace: ``"hutchinson"`` (one VJP :math:`\varepsilon^\top\partial f/\partial z` per
            evaluation, unbiased) or ``"exact"`` (one batched VJP per dimension, :math:`d` per
            evaluation, for small :math:`d`).
        probe: the Hutchinson probe, ``"rademacher"`` (±1) or ``"gaussian"``; drawn once per call from
            the generator of ``st["rng"]`` and held fixed during the solve. For a Jacobian :math:`J` the
            estimate :math:`\varepsilon^\top J\varepsilon` has variance
            :math:`\sum_{i\ne j}(J_{ij}^2 + J_{ij}J_{ji})` with Rademacher and
            :math:`\sum_{i,j}(J_{ij}^2 + J_{ij}J_{ji})` with Gaussian probes (Hutchinson 1989), so
            Rademacher is never worse.
        solver: a pylux ODE solver (default Tsit5; fixed-step ones with ``dt=``).
        sensealg: how gradients flow (``None``: backprop through the solver; any pylux
            sensitivity algorithm, e.g. ``BacksolveAdjoint(seminorm=True)``, ``ReversibleAdjoint()``).
        regularize: a regularizer or a list (as in :class:`~pylux.layers.NeuralODE`, train mode
            only). Integral ones (``KineticRegularization``, ``JacobianFrobeniusRegularization``,
            ``TaylorRegularization``) are integrated as extra channels of the same solve and act
            on :math:`z` (its field :math:`f`, not the trace channel). A regularizer with the
            ``shares_jacobian_probe`` capability (RNODE's Jacobian term) reads
            :math:`\lVert\varepsilon^\top\partial f/\partial z\rVert^2` from the trace estimator's
            own VJP, so it costs no VJP of its own; with ``trace="exact"`` it gets the exact
            :math:`\lVert\partial f/\partial z\rVert_F^2` from the Jacobian rows. The error-estimate
            regularizers read the joint solve (global) or step :math:`f` from :math:`z(t_r)` (local).
            A regularizer that changes the end time (STEER) is refused: the density is that of
            the flow to ``t1``.
        time_input: call the model with ``(z, t)`` (``t`` a 0-d tensor), as in NeuralODE.
        **solve_kwargs: passed to :func:`pylux.solve` (``reltol``, ``abstol``, ``dt``, ...).

    Raises:
        TypeError: a wrong type of model, solver, base, sensealg or regularizer; an unknown keyword.
        ValueError: a bad ``tspan``, ``trace`` or ``probe``; a regularizer that changes the end time.
        NotImplementedError: a regularizer that cannot work with ``sensealg`` (e.g. the global
            error estimate under an adjoint).

    Parameters ``ps``: the model's. State ``st``: ``{"model", "rng" (int key, advanced every
    call), "training" (bool), "nfe", "naccept", "nreject" (the forward solve's), "nvjp" (the
    VJPs of ``f`` the trace made in the forward solve: one per evaluation of the field for Hutchinson,
    ``d`` exact),
    "backward_stats" (the backward pass's counters, filled by ``backward()``, ``{}`` for
    ``sensealg=None``)}``; with ``regularize`` also ``regularization`` (0-d sum),
    ``regularization_terms`` and ``regularization_nfe`` as in NeuralODE.
    """

    def __init__(self, model: AbstractLayer, tspan, base: Any = None, *, trace: str = "hutchinson",
                 probe: str = "rademacher", solver: AbstractSolver | None = None,
                 sensealg: AbstractSensitivityAlgorithm | None = None, regularize: Any = None,
                 time_input: bool = False, **solve_kwargs: Any):
        if not isinstance(model, AbstractLayer):
            raise TypeError(f"FFJORD: model must be a pylux layer, got {type(model).__name__}")
        if len(tuple(tspan)) != 2:
            raise ValueError(f"FFJORD: tspan must be a pair (t0, t1), got {tspan!r}")
        self.tspan = tuple(float(t) for t in tspan)
        if self.tspan[0] == self.tspan[1]:
            raise ValueError(f"FFJORD: tspan = {self.tspan} is empty; the flow is the identity (use t1 != t0)")
        if base is not None and not all(hasattr(base, a) for a in ("dim", "log_prob", "sample")):
            raise TypeError(f"FFJORD: base must be a distribution with dim, log_prob and sample (such as "
                            f"StandardNormal(d)), got {type(base).__name__}")
        if trace not in _TRACES:
            raise ValueError(f"FFJORD: trace must be one of {_TRACES}, got {trace!r}")
        if probe not in _PROBES:
            raise ValueError(f"FFJORD: probe must be one of {_PROBES}, got {probe!r}")
        solver = Tsit5() if solver is None else solver
        if not isinstance(solver, AbstractSolver):
            raise TypeError(f"FFJORD: solver must be a pylux solver such as Tsit5(), got {solver!r}")
        forbidden = set(_LAYER_CHOSEN) & solve_kwargs.keys()
        if forbidden:
            raise TypeError(f"FFJORD: {sorted(forbidden)} are chosen by the layer (it returns log p(x) at t1)")
        known = _LAYER_KEYWORDS + tuple(k for k in SOLVE_KEYWORDS if k not in _LAYER_CHOSEN + _LAYER_KEYWORDS)
        check_keywords({k: v for k, v in solve_kwargs.items() if k not in SOLVE_KEYWORDS}, "FFJORD", known)
        if not isinstance(time_input, bool):
            raise TypeError(f"FFJORD: time_input must be True or False, got {time_input!r}")
        self.model, self.base, self.trace, self.probe = model, base, trace, probe
        self.solver, self.time_input = solver, time_input
        self.sensealg = check_sensealg(sensealg, "FFJORD")
        self.solve_kwargs = dict(solve_kwargs)
        self.regularized = RegularizedSolve(regularize, self.tspan, solver, self.sensealg, owner="FFJORD")
        self.regularizers = self.regularized.regularizers
        t0, t1 = self.tspan
        for reg in self.regularizers:
            if tuple(reg.end_time_range(t0, t1)) != (t1, t1):
                raise ValueError(f"FFJORD: {reg!r} changes the end time, which changes the density the flow "
                                 "defines; a flow's regularizers must keep t1")

    # ----------------------------------------------------------------- setup
    def init_params(self, rng: torch.Generator) -> dict:
        return self.model.init_params(rng)

    def init_state(self, rng: torch.Generator) -> dict:
        st = {"model": self.model.init_state(rng), "training": True, "rng": draw_key(rng, "FFJORD.init_state"),
              "nfe": 0, "naccept": 0, "nreject": 0, "nvjp": 0, "backward_stats": {}}
        st.update(self.regularized.init_state(rng))
        return st

    # ----------------------------------------------------------------- fields
    def _call_model(self, z: torch.Tensor, p: Any, t: torch.Tensor, inner_st: Mapping) -> torch.Tensor:
        dz, _ = self.model((z, t) if self.time_input else z, p, inner_st)
        return dz

    def _state_field(self, inner_st: Mapping):
        """``f(z, p, t)``: the flow's vector field alone (sampling, encoding, the regularizers' steps)."""
        return lambda z, p, t: self._call_model(z, p, t, inner_st)

    def _draw_probe(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        if self.trace == "exact":
            return None
        if self.probe == "rademacher":
            return rademacher_like(x, generator)
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    def _joint_field(self, inner_st: Mapping, d: int, probe: torch.Tensor | None, integrals: list, counter: list):
        r"""``w -> [f(z); -tr(∂f/∂z); integrands]`` on the joint state ``w = [z, Δ, r_1, ...]`` of shape ``(B, D)``.

        The trace (and every Jacobian quantity a sharing regularizer needs) comes from VJPs taken
        here, under ``enable_grad`` also when the solve itself runs without gradients (an adjoint's
        forward pass); their graph is kept only when the caller differentiates.
        """
        state_field = self._state_field(inner_st)
        exact = self.trace == "exact"

        def joint(w: torch.Tensor, p: Any, t: torch.Tensor) -> torch.Tensor:
            # a graph only when something upstream asks for it (the caller's parameters or state)
            outer = torch.is_grad_enabled() and (w.requires_grad or any(
                leaf.requires_grad for leaf in tree_leaves(p) if isinstance(leaf, torch.Tensor)))
            with torch.enable_grad():
                z = w[:, :d]
                z_in = z if z.requires_grad else z.detach().requires_grad_(True)
                dz = self._call_model(z_in, p, t, inner_st)
                if dz.shape != z_in.shape:
                    raise LayerError(f"FFJORD: the model returned shape {tuple(dz.shape)} for states of shape "
                                     f"{tuple(z_in.shape)}; a vector field must return its input's shape")
                trace, frobenius = self._trace(dz, z_in, probe, exact, outer, counter)
                rates = []
                for reg, data, shared in integrals:
                    if shared:
                        rates.append(reg.integrand_from_probe(z_in, dz, frobenius))
                    else:
                        rates.append(reg.integrand(lambda u, s: state_field(u, p, s), z_in, dz, t, data))
                out = torch.cat([dz, -trace[:, None]] + [r.to(dz.dtype)[:, None] for r in rates], dim=1)
            return out if outer else out.detach()
        return joint

    @staticmethod
    def _trace(dz, z, probe, exact: bool, create_graph: bool, counter: list):
        """``(tr ∂f/∂z, ‖∂f/∂z‖² term)`` per sample: Hutchinson from one VJP, or exact from ``d`` VJPs."""
        if not exact:
            (vjp,) = torch.autograd.grad(dz, z, grad_outputs=probe, create_graph=create_graph, retain_graph=True,
                                         allow_unused=True)
            counter[0] += 1
            if vjp is None:  # f does not depend on z
                vjp = torch.zeros_like(z)
            return (vjp * probe).sum(dim=1), vjp.pow(2).sum(dim=1)
        d = z.shape[1]
        trace = dz.new_zeros(dz.shape[0])
        frobenius = dz.new_zeros(dz.shape[0])
        for i in range(d):
            (row,) = torch.autograd.grad(dz[:, i].sum(), z, create_graph=create_graph, retain_graph=True,
                                         allow_unused=True)
            counter[0] += 1
            if row is None:
                continue
            trace = trace + row[:, i]
            frobenius = frobenius + row.pow(2).sum(dim=1)
        return trace, frobenius

    # ----------------------------------------------------------------- forward
    def _base_for(self, d: int):
        if self.base is None:
            return StandardNormal(d)
        if self.base.dim != d:
            raise LayerError(f"FFJORD: the data have dimension {d} but base has dim {self.base.dim}")
        return self.base

    @staticmethod
    def _check_points(x: Any, what: str) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise LayerError(f"FFJORD: expected {what} as a floating-point tensor of shape (batch, d), got "
                             f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() != 2:
            raise LayerError(f"FFJORD: expected {what} of shape (batch, d), got shape {tuple(x.shape)}; "
                             "flatten images first (x.reshape(len(x), -1))")

    def forward(self, x: torch.Tensor, ps: Mapping, st: Mapping):
        z1, delta, new_st = self.transform(x, ps, st)
        return self._base_for(x.shape[1]).log_prob(z1) - delta, new_st

    def transform(self, x: torch.Tensor, ps: Mapping, st: Mapping):
        r"""``(z(t1), Δ(t1), st)``: the latent points and the change of log-density, from one joint solve.

        :math:`\log p(x) = \log p_{\mathrm{base}}(z(t_1)) - \Delta(t_1)`, what ``layer(x, ps, st)`` returns.
        """
        self._check_points(x, "data points")
        self._base_for(x.shape[1])
        generator, next_key = key_generator(st["rng"], x.device)
        probe = self._draw_probe(x, generator)
        training = self.regularized.is_training(st)
        regs = self.regularizers if training else ()
        t0, t1 = self.tspan
        datas = [reg.begin(x, t0, t1, generator) for reg in regs]
        integrals = [(reg, data, bool(getattr(reg, "shares_jacobian_probe", False)))
                     for reg, data in zip(regs, datas) if isinstance(reg, AbstractIntegralRegularizer)]
        counter = [0]
        joint = self._joint_field(st["model"], x.shape[1], probe, integrals, counter)
        w0 = torch.cat([x, x.new_zeros(x.shape[0], 1 + len(integrals))], dim=1)
        kwargs = dict(self.solve_kwargs)
        if training:
            kwargs.update({k: True for k in self.regularized.solve_options if k != "save_everystep"})
        extra = sorted({float(t) for reg, data in zip(regs, datas) for t in reg.save_times(data)})
        d = x.shape[1]
        sol, trajectory, saved = self._solve(ODEProblem(joint, w0, self.tspan, ps), extra, d, kwargs, training)
        final = sol.u[-1]
        z1, delta = final[:, :d], final[:, d]
        new_st = dict(st)
        new_st.update(solution_state(sol), rng=next_key, nvjp=counter[0])
        if not self.regularizers:
            return z1, delta, new_st
        if not training:
            new_st.update(self.regularized.inactive_state(x, st))
            return z1, delta, new_st
        counted = CountingField(ODETerm(self._state_field(st["model"])).bind(ps), x)
        ctx = RegularizationContext(
            solution=sol, field=counted, solver=self.solver, sensealg=self.sensealg, t0=t0, t1=t1, z0=x,
            training=True, generator=generator, saved=saved, trajectory=trajectory,
            integrals={id(reg): final[:, d + 1 + k] for k, (reg, _, _) in enumerate(integrals)},
            options=make_options(self.solver, x, t0, t1, **kwargs),
            dense_state=(lambda t: sol(t)[:, :d]) if sol.dense else None)
        terms = {}
        for name, reg, data in zip(self.regularized.term_names(), regs, datas):
            value = reg.value(ctx, data)
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                raise ValueError(f"{reg!r}.value must return a 0-d tensor, got {type(value).__name__}")
            terms[name] = value
        new_st.update(regularization=torch.stack(list(terms.values())).sum(), regularization_terms=terms,
                      regularization_nfe=counted.count)
        return z1, delta, new_st

    def _solve(self, prob: ODEProblem, extra: list, d: int, kwargs: dict, training: bool):
        """Solve the joint state; return ``(sol, z at every saved time, {t: z(t) for t in extra})``."""
        t0, t1 = self.tspan
        if training and self.regularized.solve_options.get("save_everystep"):
            if extra:
                raise NotImplementedError("FFJORD: these regularizers need every step saved and the state at "
                                          "chosen times at once; combine them with sensealg=None")
            sol = solve(prob, self.solver, save_everystep=True, save_start=True, sensealg=self.sensealg, **kwargs)
            return sol, sol.u[:, :, :d], {}
        direction = 1.0 if t1 >= t0 else -1.0
        for t in extra:
            if not min(t0, t1) <= t <= max(t0, t1):
                raise ValueError(f"FFJORD: a regularizer asked for the state at t = {t!r}, outside tspan")
        times = sorted(set(extra) | {t1}, key=lambda s: direction * s)
        sol = solve(prob, self.solver, saveat=times, sensealg=self.sensealg, **kwargs)
        trajectory = sol.u[:, :, :d]
        return sol, trajectory, {t: trajectory[times.index(t)] for t in extra}

    # ----------------------------------------------------------------- the map and its inverse
    def _transport(self, points: torch.Tensor, ps: Mapping, st: Mapping, span) -> torch.Tensor:
        prob = ODEProblem(self._state_field(st["model"]), points, span, ps)
        return solve(prob, self.solver, saveat=[span[1]], sensealg=self.sensealg, **self.solve_kwargs).u[-1]

    def encode(self, x: torch.Tensor, ps: Mapping, st: Mapping) -> torch.Tensor:
        """The flow map :math:`x \\mapsto z(t_1)` (data to latent), without the density channel."""
        self._check_points(x, "data points")
        return self._transport(x, ps, st, self.tspan)

    def inverse(self, z: torch.Tensor, ps: Mapping, st: Mapping) -> torch.Tensor:
        """The inverse map :math:`z(t_1) \\mapsto x = z(t_0)` (latent to data), by the reverse-time solve."""
        self._check_points(z, "latent points")
        return self._transport(z, ps, st, (self.tspan[1], self.tspan[0]))

    def sample(self, n: int, ps: Mapping, st: Mapping, generator: torch.Generator, *,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """``n`` samples of the flow's density: base draws carried back by :meth:`inverse`, shape ``(n, d)``.

        ``dtype`` and ``device`` default to those of the parameters. The state is not advanced
        (the draw comes from ``generator``).

        Raises:
            TypeError: ``generator`` is not a ``torch.Generator``.
            ValueError: the layer was built without ``base`` (its dimension is then unknown).
        """
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"FFJORD.sample: generator must be a torch.Generator, got {type(generator).__name__}")
        if self.base is None:
            raise ValueError("FFJORD.sample: the data dimension is unknown; build the layer with "
                             "base=StandardNormal(d)")
        leaves = [leaf for leaf in tree_leaves(ps) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]
        dtype = dtype if dtype is not None else (leaves[0].dtype if leaves else torch.float32)
        device = device if device is not None else (leaves[0].device if leaves else generator.device)
        z = self.base.sample(n, generator, dtype=dtype, device=generator.device).to(device)
        return self.inverse(z, ps, st)

    def __repr__(self) -> str:
        inner = repr(self.model).replace("\n", "\n  ")
        regs = f", regularize={list(self.regularizers)!r}" if self.regularizers else ""
        return (f"FFJORD(\n  {inner},\n  tspan={self.tspan}, trace={self.trace!r}, probe={self.probe!r}, "
                f"solver={self.solver!r}, sensealg={self.sensealg!r}{regs}\n)")
