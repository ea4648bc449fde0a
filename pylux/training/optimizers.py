"""First-order optimizers over one flat parameter vector.

Every optimizer works on the flat vector of :func:`pylux.core.flatten` rather
than on a tree: an update is a handful of fused vector kernels whatever the
number of leaves in the model, and no Python loop runs over parameters.

The API is functional, in the style of Optimisers.jl and optax::

    opt_state = optimizer.init(params)                       # dict of tensors
    opt_state, params = optimizer.update(opt_state, grad, params, step)

``step`` is the number of updates applied before this one (0 for the first);
the bias corrections of the Adam family use :math:`t = \\text{step} + 1`, and a
learning-rate schedule is evaluated at ``step``. ``update`` leaves its inputs
untouched and returns new tensors; ``update(..., inplace=True)`` instead
overwrites ``opt_state`` and ``params`` (what :class:`~pylux.training.TrainState`
uses, so that a training step allocates nothing beyond temporaries).

Hyperparameters are validated when the optimizer is built; a bad value raises
``ValueError`` naming the field. Unknown keyword arguments raise ``TypeError``.
"""

from __future__ import annotations

import abc

import math
import numbers
from typing import Any, Callable, Mapping, Union

import torch

from .schedules import AbstractSchedule, check_step

__all__ = ["AbstractOptimizer", "SGD", "Adam", "AdamW", "Adamax", "AdaBelief"]

LearningRate = Union[float, AbstractSchedule, Callable[[int], float]]


def _nonneg(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner}: {name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
    return value


def _positive(owner: str, name: str, value: Any) -> float:
    value = _nonneg(owner, name, value)
    if value == 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {value!r}")
    return value


def _unit_interval(owner: str, name: str, value: Any) -> float:
    value = _nonneg(owner, name, value)
    if value >= 1:
        raise ValueError(f"{owner}: {name} must lie in [0, 1), got {value!r}")
    return value


def _betas(owner: str, betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{owner}: betas must be a pair (beta1, beta2) of numbers in [0, 1), got {betas!r}")
    return (_unit_interval(owner, "betas[0]", betas[0]), _unit_interval(owner, "betas[1]", betas[1]))


def _learning_rate(owner: str, lr: Any) -> LearningRate:
    if callable(lr):
        return lr
    return _nonneg(owner, "lr", lr)


class AbstractOptimizer(abc.ABC):
    """Base class: an immutable description of an update rule over a flat vector.

    Subclasses list the names of their state vectors in ``state_names`` and
    implement :meth:`_update_`, which updates ``params`` and the state in place.
    """

    state_names: tuple[str, ...] = ()
    lr: LearningRate

    def init(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero-initialised optimizer state: one vector like ``params`` per name in ``state_names``."""
        self._check_vector(params, "params")
        return {name: torch.zeros_like(params) for name in self.state_names}

    def learning_rate(self, step: int) -> float:
        """The learning rate of the update that follows ``step`` earlier updates."""
        if not callable(self.lr):
            return self.lr
        value = self.lr(step)
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: the lr schedule returned a tensor at step {step}; a schedule "
                            "must return a Python float (a tensor would force a device synchronisation)")
        return _nonneg(f"{type(self).__name__} (lr schedule at step {step})", "lr", value)

    def update(self, opt_state: Mapping[str, torch.Tensor], grad: torch.Tensor, params: torch.Tensor,
               step: int, *, inplace: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One update.

        Args:
            opt_state: the state returned by :meth:`init` or by an earlier update.
            grad: the flat gradient, same shape, dtype and device as ``params``.
            params: the flat parameter vector.
            step: number of updates already applied (0 for the first).
            inplace: overwrite ``opt_state`` and ``params`` instead of returning new tensors.

        Returns:
            ``(new_opt_state, new_params)``; with ``inplace=True`` these are the
            objects passed in, updated.

        Raises:
            TypeError / ValueError: mismatched vectors, a missing state entry, a bad step.
        """
        name = type(self).__name__
        step = check_step(step, f"{name}.update")
        self._check_vector(params, "params")
        self._check_vector(grad, "grad")
        if grad.shape != params.shape or grad.dtype != params.dtype or grad.device != params.device:
            raise ValueError(
                f"{name}.update: grad must match params; got grad {tuple(grad.shape)} {grad.dtype} on "
                f"{grad.device} and params {tuple(params.shape)} {params.dtype} on {params.device}")
        missing = [k for k in self.state_names if k not in opt_state]
        extra = [k for k in opt_state if k not in self.state_names]
        if missing or extra:
            raise ValueError(
                f"{name}.update: opt_state has keys {sorted(opt_state)}, expected {list(self.state_names)}; "
                "build it with this optimizer's init(params)")
        for key in self.state_names:
            if opt_state[key].shape != params.shape:
                raise ValueError(f"{name}.update: opt_state[{key!r}] has shape {tuple(opt_state[key].shape)}, "
                                 f"params {tuple(params.shape)}")
        if inplace:
            state = dict(opt_state)
        else:
            state = {k: v.clone() for k, v in opt_state.items()}
            params = params.clone()
        with torch.no_grad():
            self._update_(state, grad, params, step + 1, self.learning_rate(step))
        return state, params

    @abc.abstractmethod
    def _update_(self, state: dict[str, torch.Tensor], grad: torch.Tensor, params: torch.Tensor,
                 t: int, lr: float) -> None:
        """Implemented by each concrete subclass."""

    def _check_vector(self, x: Any, what: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: {what} must be a flat torch.Tensor, got {type(x).__name__}")
        if x.dim() != 1 or not x.is_floating_point():
            raise ValueError(f"{type(self).__name__}: {what} must be a 1-D floating tensor (see "
                             f"pylux.flatten), got shape {tuple(x.shape)} and dtype {x.dtype}")

    def hyperparameters(self) -> dict[str, Any]:
        """The fields that define the update rule."""
        return {}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.hyperparameters() == other.hyperparameters()  # type: ignore

    def __hash__(self) -> int:
        return hash(type(self).__name__)


class SGD(AbstractOptimizer):
    r"""Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    With :math:`\eta` = ``lr``, :math:`\mu` = ``momentum`` and :math:`\lambda` = ``weight_decay``,
    following the convention of ``torch.optim.SGD`` (Sutskever et al., ICML 2013):

    .. math::
        d_t = g_t + \lambda p_{t-1}, \qquad b_t = \mu b_{t-1} + d_t \;(b_0 = 0),

        p_t = p_{t-1} - \eta\,(d_t + \mu b_t) \text{ (Nesterov)}, \quad
        p_t = p_{t-1} - \eta\, b_t \text{ (otherwise)}.

    With ``momentum=0`` this is plain :math:`p_t = p_{t-1} - \eta d_t` and the state is empty.
    ``lr`` may be a float or a schedule.
    """

    def __init__(self, lr: LearningRate, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        self.lr = _learning_rate("SGD", lr)
        self.momentum = _unit_interval("SGD", "momentum", momentum)
        if not isinstance(nesterov, bool):
            raise ValueError(f"SGD: nesterov must be a bool, got {nesterov!r}")
        if nesterov and self.momentum == 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        self.nesterov = nesterov
        self.weight_decay = _nonneg("SGD", "weight_decay", weight_decay)
        self.state_names = ("momentum_buffer",) if self.momentum > 0 else ()

    def _update_(self, state, grad, params, t, lr):
        direction = grad.add(params, alpha=self.weight_decay) if self.weight_decay else grad
        if self.momentum:
            buffer = state["momentum_buffer"]
            buffer.mul_(self.momentum).add_(direction)
            direction = direction.add(buffer, alpha=self.momentum) if self.nesterov else buffer
        params.add_(direction, alpha=-lr)

    def hyperparameters(self):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}


class Adam(AbstractOptimizer):
    r"""Adam (Kingma & Ba, ICLR 2015, Algorithm 1).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,

        p_t = p_{t-1} - \eta\, \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon},

    with :math:`m_0 = v_0 = 0` (state ``"m"``, ``"v"``). ``lr`` may be a float or a schedule.
    """

    state_names = ("m", "v")

    def __init__(self, lr: LearningRate = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        name = type(self).__name__
        self.lr = _learning_rate(name, lr)
        self.betas = _betas(name, betas)
        self.eps = _positive(name, "eps", eps)

    def _adam_(self, state, grad, params, t, lr):
        beta1, beta2 = self.betas
        m, v = state["m"], state["v"]
        m.lerp_(grad, 1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = v.sqrt().div_(math.sqrt(1.0 - beta2 ** t)).add_(self.eps)
        params.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** t))

    def _update_(self, state, grad, params, t, lr):
        self._adam_(state, grad, params, t, lr)

    def hyperparameters(self):
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps}


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter, ICLR 2019).

    The decay acts on the parameters directly, scaled by the learning rate as in
    ``torch.optim.AdamW``, before the Adam step of :class:`Adam`:

    .. math::
        p_t = (1 - \eta\lambda)\, p_{t-1}
              - \eta\, \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}.
    """

    def __init__(self, lr: LearningRate = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(lr, betas, eps)
        self.weight_decay = _nonneg("AdamW", "weight_decay", weight_decay)

    def _update_(self, state, grad, params, t, lr):
        if self.weight_decay:
            params.mul_(1.0 - lr * self.weight_decay)
        self._adam_(state, grad, params, t, lr)

    def hyperparameters(self):
        return {**super().hyperparameters(), "weight_decay": self.weight_decay}


class Adamax(AbstractOptimizer):
    r"""Adamax, the infinity-norm variant of Adam (Kingma & Ba, ICLR 2015, Algorithm 2).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad u_t = \max(\beta_2 u_{t-1}, |g_t|),

        p_t = p_{t-1} - \frac{\eta}{1-\beta_1^t}\, \frac{m_t}{u_t + \epsilon},

    with :math:`\epsilon` added to the denominator as in Optimisers.jl so that a
    zero gradient history does not divide by zero. State ``"m"``, ``"u"``.
    """

    state_names = ("m", "u")

    def __init__(self, lr: LearningRate = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr = _learning_rate("Adamax", lr)
        self.betas = _betas("Adamax", betas)
        self.eps = _positive("Adamax", "eps", eps)

    def _update_(self, state, grad, params, t, lr):
        beta1, beta2 = self.betas
        m, u = state["m"], state["u"]
        m.lerp_(grad, 1.0 - beta1)
        torch.maximum(u.mul_(beta2), grad.abs(), out=u)
        params.addcdiv_(m, u.add(self.eps), value=-lr / (1.0 - beta1 ** t))

    def hyperparameters(self):
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps}


class AdaBelief(AbstractOptimizer):
    r"""AdaBelief (Zhuang et al., NeurIPS 2020, Algorithm 2): Adam with the variance of the
    gradient around its running mean in place of its second moment.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        s_t = \beta_2 s_{t-1} + (1-\beta_2)(g_t - m_t)^2 + \epsilon,

        p_t = p_{t-1} - \eta\, \frac{m_t / (1-\beta_1^t)}{\sqrt{s_t / (1-\beta_2^t)} + \epsilon}.

    The default :math:`\epsilon = 10^{-16}` is the paper's. State ``"m"``, ``"s"``.
    """

    state_names = ("m", "s")

    def __init__(self, lr: LearningRate = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-16):
        self.lr = _learning_rate("AdaBelief", lr)
        self.betas = _betas("AdaBelief", betas)
        self.eps = _positive("AdaBelief", "eps", eps)

    def _update_(self, state, grad, params, t, lr):
        beta1, beta2 = self.betas
        m, s = state["m"], state["s"]
        m.lerp_(grad, 1.0 - beta1)
        deviation = grad - m
        s.mul_(beta2).addcmul_(deviation, deviation, value=1.0 - beta2).add_(self.eps)
        denom = s.sqrt().div_(math.sqrt(1.0 - beta2 ** t)).add_(self.eps)
        params.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** t))

    def hyperparameters(self):
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps}
