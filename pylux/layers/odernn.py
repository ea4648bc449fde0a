r"""ODE-RNN and Latent ODE (Rubanova, Chen & Duvenaud, "Latent ODEs for irregularly-sampled time series",
NeurIPS 2019).

Per-sample observation times in one batched solve
-------------------------------------------------
Samples of a batch have their own observation times :math:`t_{b,0} \le t_{b,1} \le \dots`.
Between observations :math:`i` and :math:`i + 1` the hidden state follows
:math:`\dot h = f(h)`; with :math:`\Delta_b = t_{b,i+1} - t_{b,i}` and
:math:`h_b(t_{b,i} + s\,\Delta_b) = \tilde h_b(s)` this is exactly

.. math::
    \frac{d\tilde h_b}{ds} = \Delta_b\, f(\tilde h_b), \qquad s \in [0, 1],

so every sample's interval becomes the same unit interval and the whole batch
runs in one solve per observation index (the joint step: the adaptive
controller sees all samples; a sample with :math:`\Delta_b = 0` — a padded
step of a shorter series — does not move). A negative :math:`\Delta_b`
integrates backward in time (the Latent ODE's recognition network). The
reparametrisation is exact for autonomous :math:`f`; fixed-step solvers then
take the same steps in :math:`t` as a solve in :math:`t` with step
:math:`\Delta_b\,ds` (up to round-off), adaptive ones choose their steps in
:math:`s` from the joint error norm.

Every interval solve is a :class:`~pylux.layers.NeuralODE` on ``(0, 1)``, so
the solver, ``sensealg``, tolerances and regularizers (``regularize=``; STEER
then draws the end of each unit interval, Behl et al.'s time-series variant)
behave as in that layer.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..core import AbstractLayer, LayerError, check_key, draw_key, key_generator
from ..diffeq.solvers import AbstractSolver
from ..nn import Dense
from ..regularize.base import AbstractRegularizer
from .neural_ode import NeuralODE

__all__ = ["GRUCell", "ODERNN", "LatentODE", "gaussian_kl", "masked_gaussian_log_likelihood", "kl_annealing"]


class GRUCell(AbstractLayer):
    r"""A gated recurrent unit (Cho et al. 2014), in ``torch.nn.GRUCell``'s parametrisation.

    .. math::
        r = \sigma(W_{ir} x + b_{ir} + W_{hr} h + b_{hr}), \quad
        u = \sigma(W_{iu} x + b_{iu} + W_{hu} h + b_{hu}), \\
        n = \tanh(W_{in} x + b_{in} + r \odot (W_{hn} h + b_{hn})), \quad
        h' = (1 - u) \odot n + u \odot h.

    Input: the pair ``(x, h)`` with ``x`` of shape ``(B, input_size)`` and ``h`` of
    shape ``(B, hidden)``; output ``h'`` of shape ``(B, hidden)``.

    Parameters ``ps``: ``weight_ih`` ``(3 hidden, input_size)``, ``weight_hh``
    ``(3 hidden, hidden)``, ``bias_ih``, ``bias_hh`` ``(3 hidden,)`` (gate order
    r, u, n), initialised uniformly in :math:`\pm 1/\sqrt{\text{hidden}}`. State ``{}``.
    """

    def __init__(self, input_size: int, hidden: int) -> None:
        for name, value in (("input_size", input_size), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GRUCell: {name} must be a positive int, got {value!r}")
        self.input_size, self.hidden = input_size, hidden

    def init_params(self, rng: torch.Generator) -> dict:
        bound = 1.0 / math.sqrt(self.hidden)
        H, I = self.hidden, self.input_size

        def uniform(*shape):
            return (torch.rand(*shape, generator=rng) * 2.0 - 1.0) * bound
        return {"weight_ih": uniform(3 * H, I), "weight_hh": uniform(3 * H, H), "bias_ih": uniform(3 * H),
                "bias_hh": uniform(3 * H)}

    def forward(self, x, ps: Mapping, st: Mapping):
        inputs, h = x
        if inputs.shape[-1] != self.input_size or h.shape[-1] != self.hidden:
            raise LayerError(f"GRUCell({self.input_size}, {self.hidden}): got input of shape {tuple(inputs.shape)} "
                             f"and hidden state of shape {tuple(h.shape)}")
        gi = torch.nn.functional.linear(inputs, ps["weight_ih"], ps["bias_ih"])
        gh = torch.nn.functional.linear(h, ps["weight_hh"], ps["bias_hh"])
        i_r, i_u, i_n = gi.chunk(3, dim=-1)
        h_r, h_u, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        u = torch.sigmoid(i_u + h_u)
        n = torch.tanh(i_n + r * h_n)
        return n + u * (h - n), st

    def __repr__(self) -> str:
        return f"GRUCell({self.input_size} => {self.hidden})"


class _IntervalField(AbstractLayer):
    r"""``h -> Δ_b f(h)``: the vector field of one unit interval; ``Δ`` (shape ``(B,)``) rides in the state."""

    def __init__(self, dynamics: AbstractLayer) -> None:
        self.dynamics = dynamics

    def init_params(self, rng):
        return self.dynamics.init_params(rng)

    def init_state(self, rng):
        return {"dynamics": self.dynamics.init_state(rng), "dt": torch.zeros(())}

    def forward(self, h, ps, st):
        out, _ = self.dynamics(h, ps, st["dynamics"])
        dt = st["dt"].to(out.dtype)
        return dt.view(dt.shape + (1,) * (out.dim() - dt.dim())) * out, st


class _IntervalSolve:
    """Solves of :math:`d\\tilde h/ds = Δ_b f(\\tilde h)` over ``s ∈ [0, 1]``, one per observation index."""

    def __init__(self, dynamics: AbstractLayer, solver, sensealg, regularize, solve_kwargs: dict) -> None:
        self.node = NeuralODE(_IntervalField(dynamics), (0.0, 1.0), solver, sensealg=sensealg,
                              regularize=regularize, **solve_kwargs)

    def init_state(self, rng):
        return self.node.init_state(rng)

    def __call__(self, h, dt, ps, st, tally: dict):
        inner = dict(st["model"])
        inner["dt"] = dt
        st = dict(st)
        st["model"] = inner
        h_new, st_new = self.node(h, ps, st)
        tally["nfe"] += st_new["nfe"]
        tally["naccept"] += st_new["naccept"]
        tally["nreject"] += st_new["nreject"]
        tally["nsolves"] += 1
        tally["backward_stats"].append(st_new["backward_stats"])
        if "regularization" in st_new:
            tally["regularization"] = tally["regularization"] + st_new["regularization"]
            tally["regularization_nfe"] += st_new["regularization_nfe"]
        return h_new, st_new


def _new_tally(like: torch.Tensor) -> dict:
    return {"nfe": 0, "naccept": 0, "nreject": 0, "nsolves": 0, "backward_stats": [],
            "regularization": like.new_zeros(()), "regularization_nfe": 0}


def _check_sequence(times, values, mask, channels: int, where: str):
    """``(times (B, T), values with NaN → 0, mask (B, T, C) bool)`` after checking shapes and order."""
    if not isinstance(values, torch.Tensor) or not values.is_floating_point() or values.dim() != 3:
        raise LayerError(f"{where}: values must be a float tensor of shape (B, T, channels), got "
                         f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
    B, T, C = values.shape
    if C != channels:
        raise LayerError(f"{where}: values have {C} channels but the layer was built with input_size={channels}")
    times = torch.as_tensor(times, device=values.device)
    if not times.is_floating_point():
        times = times.to(torch.float64)
    if times.dim() == 1:
        if times.shape[0] != T:
            raise LayerError(f"{where}: times has {times.shape[0]} entries for {T} observations per sample")
        times = times.unsqueeze(0).expand(B, T)
    elif tuple(times.shape) != (B, T):
        raise LayerError(f"{where}: times must have shape (T,) = ({T},) or (B, T) = ({B}, {T}), got "
                         f"{tuple(times.shape)}")
    if not bool(torch.isfinite(times).all()):
        raise LayerError(f"{where}: times contain NaN or Inf")
    steps = times.diff(dim=1)
    if T > 1 and not bool((steps >= 0).all()):
        b, i = (steps < 0).nonzero()[0].tolist()
        raise LayerError(f"{where}: the observation times of sample {b} are not sorted: t[{i + 1}] = "
                         f"{float(times[b, i + 1]):.6g} < t[{i}] = {float(times[b, i]):.6g}; sort each sample's "
                         "observations by time (padding may repeat the last time)")
    if mask is None:
        mask = ~torch.isnan(values)
    else:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T, C):
            raise LayerError(f"{where}: mask must have the values' shape {(B, T, C)}, got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        mask = mask.bool() & ~torch.isnan(values)
    values = torch.where(mask, values, torch.zeros_like(values))
    return times, values, mask


class ODERNN(AbstractLayer):
    r"""ODE-RNN (Rubanova et al. 2019): a GRU updated at each observation, a neural ODE between them.

    .. math::
        h'_i = \mathrm{ODESolve}(f_\theta, h_{i-1}, (t_{i-1}, t_i)), \qquad
        h_i = \mathrm{GRU}([x_i \odot m_i;\, m_i],\, h'_i) \text{ if any } m_i \text{ else } h'_i,

    from :math:`h_0 = 0`, with :math:`m_i` the observation mask (the mask is
    part of the GRU input, as in Rubanova et al.'s code). Per-sample times run in
    one batched solve per observation index (see the module docstring).

    Args:
        dynamics: a pylux layer ``h -> dh/dt`` of shape ``(B, hidden)`` (autonomous).
        input_size: channels ``C`` of the observations.
        hidden: the size of ``h``.
        cell: the update layer, called with ``([x ⊙ m; m], h)`` (default
            :class:`GRUCell` ``(2 C, hidden)``).
        reverse: run from the last observation to the first (backward in time).
        solver, sensealg, regularize, **solve_kwargs: for every interval solve, as
            for :class:`~pylux.layers.NeuralODE` on ``(0, 1)`` (default solver
            ``Tsit5()``; Rubanova et al. use Euler steps in the encoder:
            ``solver=Euler(), dt=1.0`` is one step per interval).

    Input: ``(times, values)`` or ``(times, values, mask)``: ``times`` of shape
    ``(T,)`` or ``(B, T)``, non-decreasing per sample (a padded step repeats
    the last time), ``values`` ``(B, T, C)`` (NaN = missing), ``mask`` of the
    values' shape (True/1 = observed). Output: the hidden states after each
    observation, ``(B, T, hidden)``, in time order (also for ``reverse``).

    Parameters ``ps``: ``{"cell": ..., "dynamics": ...}``. State ``st``:
    ``{"cell": ..., "ode": the interval NeuralODE's state, "nfe", "naccept",
    "nreject", "nsolves", "backward_stats": list (one handle per solve),
    "regularization", "regularization_nfe"}`` (the sums over the interval solves
    of the latest call).

    Raises (when called):
        LayerError: unsorted times, a mask of the wrong shape, a wrong channel count.
    """

    def __init__(self, dynamics: AbstractLayer, input_size: int, hidden: int, *, cell: AbstractLayer | None = None,
                 reverse: bool = False, solver: AbstractSolver | None = None, sensealg=None, regularize=None,
                 **solve_kwargs: Any) -> None:
        if not isinstance(dynamics, AbstractLayer):
            raise TypeError(f"ODERNN: dynamics must be a pylux layer, got {type(dynamics).__name__}")
        for name, value in (("input_size", input_size), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ODERNN: {name} must be a positive int, got {value!r}")
        self.cell = GRUCell(2 * input_size, hidden) if cell is None else cell
        if not isinstance(self.cell, AbstractLayer):
            raise TypeError(f"ODERNN: cell must be a pylux layer, got {type(self.cell).__name__}")
        self.dynamics, self.input_size, self.hidden, self.reverse = dynamics, input_size, hidden, bool(reverse)
        self.intervals = _IntervalSolve(dynamics, solver, sensealg, regularize, solve_kwargs)

    def init_params(self, rng: torch.Generator) -> dict:
        return {"cell": self.cell.init_params(rng), "dynamics": self.dynamics.init_params(rng)}

    def init_state(self, rng: torch.Generator) -> dict:
        st = {"cell": self.cell.init_state(rng), "ode": self.intervals.init_state(rng)}
        st.update(_new_tally(torch.zeros(())))
        return st

    def forward(self, x, ps: Mapping, st: Mapping):
        if not isinstance(x, (tuple, list)) or len(x) not in (2, 3):
            raise LayerError("ODERNN: expected (times, values) or (times, values, mask)")
        times, values, mask = (tuple(x) + (None,))[:3]
        hs, _, new_st = self.run(times, values, mask, ps, st)
        return hs, new_st

    def run(self, times, values, mask, ps: Mapping, st: Mapping, *, until=None):
        """``(hidden states (B, T, hidden) in time order, final state (B, hidden), new state)``.

        ``until``: a time (float) to which every sample's state is finally evolved
        after its last processed observation (the Latent ODE's common start time).
        """
        times, values, mask = _check_sequence(times, values, mask, self.input_size, "ODERNN")
        B, T, _ = values.shape
        order = list(range(T - 1, -1, -1)) if self.reverse else list(range(T))
        observed = mask.any(dim=-1)                                            # (B, T)
        inputs = torch.cat([values, mask.to(values.dtype)], dim=-1)
        dts = times.diff(dim=1).to(values.dtype)                              # (B, T - 1)
        if self.reverse:
            dts = -dts
        # one host transfer: which observation indices need no solve at all (every Δ = 0)
        moving = (dts != 0).any(dim=0).tolist() if T > 1 else []
        h = values.new_zeros(B, self.hidden)
        tally = _new_tally(values)
        ode_st = st["ode"]
        outs: list = [None] * T
        for k, i in enumerate(order):
            if k > 0:
                step = i if self.reverse else i - 1                             # index into dts
                if moving[step]:
                    h, ode_st = self.intervals(h, dts[:, step], ps["dynamics"], ode_st, tally)
            h_new, _ = self.cell((inputs[:, i], h), ps["cell"], st["cell"])
            h = torch.where(observed[:, i:i + 1], h_new, h)
            outs[i] = h
        if until is not None:
            last = order[-1]
            dt = (float(until) - times[:, last]).to(values.dtype)
            h, ode_st = self.intervals(h, dt, ps["dynamics"], ode_st, tally)
        new_st = dict(st)
        new_st["ode"] = ode_st
        new_st.update(tally)
        return torch.stack(outs, dim=1), h, new_st

    def __repr__(self) -> str:
        return (f"ODERNN(input_size={self.input_size}, hidden={self.hidden}, reverse={self.reverse}, "
                f"cell={self.cell!r}, dynamics={self.dynamics!r})")


def gaussian_kl(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathrm{KL}(\mathcal N(\mu, \mathrm{diag}\,\sigma^2) \,\|\, \mathcal N(0, I))
    = \sum_j \bigl(\tfrac12(\sigma_j^2 + \mu_j^2 - 1) - \log \sigma_j\bigr)`, per sample (summed over the last axis)."""
    return (0.5 * (std * std + mean * mean - 1.0) - torch.log(std)).sum(dim=-1)


def masked_gaussian_log_likelihood(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                                   obs_std: float) -> torch.Tensor:
    r"""Per-sample mean of :math:`\log \mathcal N(x; \hat x, \sigma_{obs}^2)` over the observed entries.

    Rubanova et al.'s ``masked_gaussian_log_density`` normalisation: the sum over
    observed entries divided by their count (a sample with none gets 0).
    """
    mask = mask.to(pred.dtype)
    target = torch.where(mask.bool(), target, torch.zeros_like(target))
    log_density = -0.5 * ((target - pred) / obs_std) ** 2 - math.log(obs_std) - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(1, pred.dim()))
    count = mask.sum(dim=dims)
    return (log_density * mask).sum(dim=dims) / count.clamp(min=1.0)


def kl_annealing(step: int, wait: int = 10, rate: float = 0.99) -> float:
    r"""The KL weight of Rubanova et al.'s training: 0 for ``step < wait``, then :math:`1 - \text{rate}^{\,\text{step} - \text{wait}}`."""
    return 0.0 if step < wait else 1.0 - rate ** (step - wait)


class LatentODE(AbstractLayer):
    r"""Latent ODE (Rubanova et al. 2019): an ODE-RNN encoder run backward, :math:`q(z_0)`, a neural-ODE decoder.

    .. math::
        (\mu, \sigma) = g_\phi(\mathrm{ODERNN}^{\leftarrow}(\{t_i, x_i\})), \quad
        z_0 \sim \mathcal N(\mu, \sigma^2), \quad
        z(t) = \mathrm{ODESolve}(f_\theta, z_0, (t_0, t)), \quad
        \hat x(t) = d_\psi(z(t)),

    trained on the ELBO
    :math:`\mathbb E_q[\log p(x \mid z_0)] - \beta\,\mathrm{KL}(q(z_0) \,\|\, \mathcal N(0, I))`
    (:meth:`loss`; :func:`kl_annealing` gives Rubanova et al.'s :math:`\beta` schedule).

    Args:
        encoder: an :class:`ODERNN` with ``reverse=True`` (the recognition network).
        dynamics: a pylux layer ``z -> dz/dt`` on the latent state ``(B, latent)``.
        decoder: a pylux layer ``z -> x̂`` mapping ``(B, latent)`` to ``(B, C)``.
        latent: the latent size.
        t0: the time of :math:`z_0` (the encoder's state is evolved backward to it).
        mode: ``"interpolation"`` (encode every observation) or ``"extrapolation"``
            (encode only the observations before ``split``; predict the query times).
        split: the extrapolation boundary (default: the midpoint of the shared times).
        obs_std: the observation noise of :math:`p(x \mid z)` (Rubanova et al.: 0.01).
        solver, sensealg, regularize, **solve_kwargs: the decoder solve, as for
            :class:`~pylux.layers.NeuralODE` (the regularizers act on the decoder).
            A regularizer that draws the end time (STEER) cannot end one solve that
            saves at the query times; in train mode the decoder then runs one
            unit-interval solve per query interval (module docstring), each with its
            own drawn end, and in test mode the single solve.

    Input: ``(times, values, mask, query_times)`` (or without ``query_times``: the
    observation times): observations as for :class:`ODERNN`; ``query_times``
    shared, shape ``(Q,)``, increasing, ``>= t0``. Output: :math:`\hat x` at the query
    times, ``(B, Q, C)``. In train mode :math:`z_0` is sampled (reparametrised, from
    ``st["rng"]``, advanced per call); in test mode :math:`z_0 = \mu`.

    Parameters ``ps``: ``{"encoder", "to_latent" (Dense(hidden, 2 latent)), "dynamics",
    "decoder"}``. State ``st``: ``{"encoder", "dynamics", "decoder", "decoder_ode",
    "training", "rng", "mean", "std", "kl" (per sample), "nfe" (decoder), "nfe_encoder",
    "regularization"}``.
    """

    MODES = ("interpolation", "extrapolation")

    def __init__(self, encoder: ODERNN, dynamics: AbstractLayer, decoder: AbstractLayer, *, latent: int,
                 t0: float = 0.0, mode: str = "interpolation", split: float | None = None, obs_std: float = 0.01,
                 solver: AbstractSolver | None = None, sensealg=None, regularize=None, **solve_kwargs: Any) -> None:
        if not isinstance(encoder, ODERNN):
            raise TypeError(f"LatentODE: encoder must be an ODERNN, got {type(encoder).__name__}")
        if not encoder.reverse:
            raise ValueError("LatentODE: the encoder must run backward in time: build ODERNN(..., reverse=True)")
        for name, layer in (("dynamics", dynamics), ("decoder", decoder)):
            if not isinstance(layer, AbstractLayer):
                raise TypeError(f"LatentODE: {name} must be a pylux layer, got {type(layer).__name__}")
        if mode not in self.MODES:
            raise ValueError(f"LatentODE: mode must be 'interpolation' or 'extrapolation', got {mode!r}")
        if not (isinstance(obs_std, (int, float)) and obs_std > 0):
            raise ValueError(f"LatentODE: obs_std must be > 0, got {obs_std!r}")
        self.encoder, self.dynamics, self.decoder = encoder, dynamics, decoder
        self.latent, self.t0, self.mode, self.split, self.obs_std = latent, float(t0), mode, split, float(obs_std)
        self.to_latent = Dense(encoder.hidden, 2 * latent)
        self.solver, self.sensealg, self.regularize = solver, sensealg, regularize
        self.solve_kwargs = dict(solve_kwargs)
        # built once: validates the options and regularizers, and gives the decoder state's layout
        self._template = NeuralODE(dynamics, (self.t0, self.t0 + 1.0), solver, sensealg=sensealg,
                                   regularize=regularize, **solve_kwargs)
        self._changes_end_time = any(type(r).end_time is not AbstractRegularizer.end_time
                                     for r in self._template.regularizers)
        self._intervals = _IntervalSolve(dynamics, solver, sensealg, regularize, solve_kwargs) \
            if self._changes_end_time else None
        self._decoders: dict = {}

    def init_params(self, rng: torch.Generator) -> dict:
        return {"encoder": self.encoder.init_params(rng), "to_latent": self.to_latent.init_params(rng),
                "dynamics": self.dynamics.init_params(rng), "decoder": self.decoder.init_params(rng)}

    def init_state(self, rng: torch.Generator) -> dict:
        decoder_ode = (self._intervals.init_state(rng) if self._intervals is not None
                       else self._template.init_state(rng))
        return {"encoder": self.encoder.init_state(rng), "decoder": self.decoder.init_state(rng),
                "decoder_ode": decoder_ode, "training": True, "rng": draw_key(rng, "LatentODE.init_state"),
                "mean": torch.zeros(()), "std": torch.zeros(()), "kl": torch.zeros(()), "nfe": 0,
                "nfe_encoder": 0, "regularization": torch.zeros(())}

    def _decoder_solve(self, query: tuple) -> NeuralODE:
        node = self._decoders.get(query)
        if node is None:
            t_end = query[-1] if query[-1] != self.t0 else self.t0 + 1.0
            node = NeuralODE(self.dynamics, (self.t0, t_end), self.solver, sensealg=self.sensealg,
                             regularize=None if self._changes_end_time else self.regularize,
                             saveat=list(query), **self.solve_kwargs)
            if len(self._decoders) > 64:  # many distinct query grids: keep the cache bounded
                self._decoders.clear()
            self._decoders[query] = node
        return node

    def encode(self, times, values, mask, ps: Mapping, st: Mapping):
        """``(mean, std, encoder state)`` of :math:`q(z_0)` from the observations (after the mode's selection)."""
        if self.mode == "extrapolation":
            times, values, mask = self._before_split(times, values, mask)
        _, h, enc_st = self.encoder.run(times, values, mask, ps["encoder"], st["encoder"], until=self.t0)
        out, _ = self.to_latent(h, ps["to_latent"], {})
        mean, raw = out.chunk(2, dim=-1)
        return mean, torch.nn.functional.softplus(raw) + 1e-6, enc_st

    def _before_split(self, times, values, mask):
        times = torch.as_tensor(times)
        if times.dim() != 1:
            raise LayerError("LatentODE(mode='extrapolation') needs shared observation times of shape (T,); pass "
                             "the union grid with a mask")
        split = self.split if self.split is not None else 0.5 * (float(times[0]) + float(times[-1]))
        keep = (times < split).nonzero().flatten()
        if keep.numel() == 0:
            raise LayerError(f"LatentODE: no observation time lies before split = {split!r}")
        return times[keep], values[:, keep], (mask[:, keep] if mask is not None else None)

    def forward(self, x, ps: Mapping, st: Mapping):
        if not isinstance(x, (tuple, list)) or len(x) not in (3, 4):
            raise LayerError("LatentODE: expected (times, values, mask) or (times, values, mask, query_times)")
        times, values, mask = x[:3]
        query = x[3] if len(x) == 4 else times
        query = torch.as_tensor(query)
        if query.dim() != 1:
            raise LayerError(f"LatentODE: query times must be shared, shape (Q,), got {tuple(query.shape)}; "
                             "decode at the union of the samples' times and mask the loss")
        qlist = [float(t) for t in query.tolist()]
        if any(b <= a for a, b in zip(qlist, qlist[1:])) or (qlist and qlist[0] < self.t0):
            raise LayerError(f"LatentODE: query times must be strictly increasing and >= t0 = {self.t0}")
        training = st.get("training")
        if not isinstance(training, bool):
            raise LayerError("LatentODE: state 'training' must be a Python bool; use pylux.trainmode / testmode")
        mean, std, enc_st = self.encode(times, values, mask, ps, st)
        new_st = dict(st)
        if training:
            generator, next_key = key_generator(check_key(st["rng"]), mean.device)
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z0 = mean + std * eps
            new_st["rng"] = next_key
        else:
            z0 = mean
        zs, dec_ode_st, nfe, reg = self._decode(z0, qlist, ps, st, training)
        pred, _ = self.decoder(zs, ps["decoder"], st["decoder"])
        new_st.update(encoder=enc_st, decoder_ode=dec_ode_st, mean=mean, std=std, kl=gaussian_kl(mean, std),
                      nfe=nfe, nfe_encoder=enc_st["nfe"], regularization=reg + enc_st["regularization"])
        return pred, new_st

    def _decode(self, z0, qlist: list, ps, st, training: bool):
        """``(z at the query times (B, Q, latent), decoder solve state, NFE, regularization)``."""
        ode_st = st["decoder_ode"]
        if self._intervals is not None and training:
            tally = _new_tally(z0)
            z, outs, t_prev = z0, [], self.t0
            for t in qlist:
                if t != t_prev:
                    dt = z0.new_full((z0.shape[0],), t - t_prev)
                    z, ode_st = self._intervals(z, dt, ps["dynamics"], ode_st, tally)
                outs.append(z)
                t_prev = t
            return torch.stack(outs, dim=1), ode_st, tally["nfe"], tally["regularization"]
        node = self._decoder_solve(tuple(qlist))
        if self._intervals is not None:  # test mode of an end-time regularizer: the plain single solve
            plain = {k: v for k, v in ode_st.items() if k in ("nfe", "naccept", "nreject", "backward_stats")}
            plain["model"] = ode_st["model"]["dynamics"]
            zs, out_st = node(z0, ps["dynamics"], plain)
            return zs.transpose(0, 1), ode_st, out_st["nfe"], z0.new_zeros(())
        zs, out_st = node(z0, ps["dynamics"], ode_st)
        reg = out_st.get("regularization", z0.new_zeros(()))
        return zs.transpose(0, 1), out_st, out_st["nfe"], reg

    def loss(self, pred: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, st: Mapping,
             kl_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        r"""``(-ELBO averaged over the batch, {"log_likelihood", "kl"})`` for a prediction of :meth:`forward`.

        :math:`-\frac1B \sum_b \bigl(\overline{\log p}(x_b \mid z_{0,b}) - \beta\, \mathrm{KL}_b\bigr)`,
        :math:`\overline{\log p}` the mean Gaussian log-density over the observed
        entries (:func:`masked_gaussian_log_likelihood`), one sample of :math:`z_0`.
        """
        if tuple(pred.shape) != tuple(values.shape):
            raise ValueError(f"LatentODE.loss: prediction of shape {tuple(pred.shape)} but targets of shape "
                             f"{tuple(values.shape)}; decode at the targets' times")
        if mask is None:
            mask = ~torch.isnan(values)
        elif tuple(mask.shape) != tuple(values.shape):
            raise ValueError(f"LatentODE.loss: mask of shape {tuple(mask.shape)} but targets of shape "
                             f"{tuple(values.shape)}")
        mask = mask.bool() & ~torch.isnan(values)
        loglik = masked_gaussian_log_likelihood(pred, values, mask, self.obs_std)
        kl = st["kl"]
        return -(loglik - kl_weight * kl).mean(), {"log_likelihood": loglik.mean().detach(), "kl": kl.mean().detach()}

    def __repr__(self) -> str:
        return (f"LatentODE(latent={self.latent}, mode={self.mode!r}, t0={self.t0},\n  encoder={self.encoder!r},\n"
                f"  dynamics={self.dynamics!r}, decoder={self.decoder!r})")
