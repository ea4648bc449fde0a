"""Built-in losses, after Lux.jl's ``MSELoss``, ``CrossEntropyLoss`` and ``BinaryCrossEntropyLoss``.

Each loss is an immutable object that can be called two ways, as in Lux:

* ``loss(y_pred, y)`` returns the aggregated loss (a tensor);
* ``loss(model, ps, st, (x, y))`` runs ``model(x, ps, st)`` and returns
  ``(loss, st_new, {})``, the ``loss_fn`` contract of
  :func:`~pylux.training.single_train_step`, so ``single_train_step(MSELoss(), (x, y), ts)``
  trains without a hand-written loss function.

Layout follows torch, not Julia: the class dimension of a classifier's output is
dimension 1 (``(N, C)`` or ``(N, C, d1, ...)``) and the batch is dimension 0.

``agg`` says how the per-element (or, for cross entropy, per-sample) losses are
reduced: ``"mean"`` (default), ``"sum"``, ``"none"`` (no reduction) or any
callable taking the tensor of losses.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Union

import torch
import torch.nn.functional as F

__all__ = ["AbstractLoss", "MSELoss", "CrossEntropyLoss", "BinaryCrossEntropyLoss"]

Aggregation = Union[str, Callable[[torch.Tensor], torch.Tensor]]
_AGGREGATIONS = ("mean", "sum", "none")


def _check_agg(owner: str, agg: Any) -> Aggregation:
    if callable(agg) or agg in _AGGREGATIONS:
        return agg
    raise ValueError(f"{owner}: agg must be one of {_AGGREGATIONS} or a callable reducing a tensor of losses, "
                     f"got {agg!r}")


def _check_fraction(owner: str, name: str, value: Any, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not 0 <= value < 1:
        raise ValueError(f"{owner}: {name} must be a number in [0, 1) or None, got {value!r}")
    return float(value)


class AbstractLoss:
    """Base class: ``loss(y_pred, y)`` or ``loss(model, ps, st, (x, y)) -> (loss, st, {})``."""

    agg: Aggregation

    def __call__(self, *args: Any) -> Any:
        if len(args) == 2:
            return self.aggregate(self.unreduced(*args))
        if len(args) == 4:
            model, ps, st, data = args
            if not isinstance(data, (tuple, list)) or len(data) != 2:
                raise TypeError(f"{type(self).__name__}: as a training loss_fn, the data must be a pair (x, y), "
                                f"got {type(data).__name__}")
            x, y = data
            y_pred, st_new = model(x, ps, st)
            return self.aggregate(self.unreduced(y_pred, y)), st_new, {}
        raise TypeError(f"{type(self).__name__}: call as loss(y_pred, y) or loss(model, ps, st, (x, y)); got "
                        f"{len(args)} arguments")

    def unreduced(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The losses before aggregation."""
        raise NotImplementedError

    def aggregate(self, losses: torch.Tensor) -> torch.Tensor:
        if self.agg == "mean":
            return losses.mean()
        if self.agg == "sum":
            return losses.sum()
        if self.agg == "none":
            return losses
        return self.agg(losses)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _check_pair(owner: str, y_pred: Any, y: Any) -> None:
    if not isinstance(y_pred, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{owner}: expected tensors (y_pred, y), got {type(y_pred).__name__} and "
                        f"{type(y).__name__}")
    if not y_pred.is_floating_point():
        raise TypeError(f"{owner}: predictions must be a floating tensor, got {y_pred.dtype}")


class MSELoss(AbstractLoss):
    r"""Mean squared error :math:`\operatorname{agg}\big((\hat y - y)^2\big)` (Lux's ``MSELoss``).

    Args:
        agg: ``"mean"`` (default), ``"sum"``, ``"none"`` or a callable.

    Raises:
        ValueError: ``y_pred`` and ``y`` of different shapes (no silent broadcasting).
    """

    def __init__(self, *, agg: Aggregation = "mean"):
        self.agg = _check_agg("MSELoss", agg)

    def unreduced(self, y_pred, y):
        _check_pair("MSELoss", y_pred, y)
        if y_pred.shape != y.shape:
            raise ValueError(f"MSELoss: prediction shape {tuple(y_pred.shape)} differs from target shape "
                             f"{tuple(y.shape)}; reshape one of them (broadcasting them is usually a bug)")
        return (y_pred - y).square()


class _LikelihoodLoss(AbstractLoss):
    """The options shared by the cross entropies: logits or probabilities, label smoothing, epsilon."""

    def __init__(self, *, logits: bool = True, label_smoothing: float | None = None,
                 epsilon: float | None = None, agg: Aggregation = "mean"):
        name = type(self).__name__
        if not isinstance(logits, bool):
            raise ValueError(f"{name}: logits must be True or False, got {logits!r}")
        if logits and epsilon is not None:
            raise ValueError(f"{name}: epsilon applies to probabilities only; drop it or pass logits=False")
        self.logits = logits
        self.label_smoothing = _check_fraction(name, "label_smoothing", label_smoothing)
        self.epsilon = _check_fraction(name, "epsilon", epsilon)
        self.agg = _check_agg(name, agg)

    def log_probabilities(self, y_pred: torch.Tensor, dim: int | None) -> torch.Tensor:
        """``log_softmax`` over ``dim`` for logits, ``log(y_pred + epsilon)`` for probabilities."""
        if not self.logits:
            eps = self.epsilon if self.epsilon is not None else torch.finfo(y_pred.dtype).eps
            return torch.log(y_pred + eps)
        return F.log_softmax(y_pred, dim=dim)


class CrossEntropyLoss(_LikelihoodLoss):
    r"""Categorical cross entropy over the class dimension 1 (Lux's ``CrossEntropyLoss``).

    Per sample, with :math:`C` classes, target distribution :math:`y` and
    label smoothing :math:`\alpha` (Szegedy et al., CVPR 2016, §7):

    .. math::
        \tilde y = (1-\alpha)\, y + \alpha / C, \qquad
        \ell = -\sum_{c} \tilde y_c \log \hat p_c,

    where :math:`\log \hat p = \operatorname{log\_softmax}(\hat y)` for
    ``logits=True`` (default, torch's convention; Lux's default is
    ``logits=false``) and :math:`\log(\hat y + \epsilon)` for probabilities.

    Args:
        logits: whether ``y_pred`` holds unnormalised log-probabilities (default) or probabilities.
        label_smoothing: :math:`\alpha` in [0, 1), or ``None`` for none.
        epsilon: added to probabilities before the log (``logits=False`` only); default
            the machine epsilon of the prediction's dtype, as in Lux.
        agg: reduction over samples (and spatial positions): ``"mean"`` (default), ``"sum"``,
            ``"none"`` or a callable.

    Targets ``y`` are class indices (an integer tensor of shape ``(N, ...)``) or a
    distribution over classes of ``y_pred``'s shape (one-hot or soft labels).

    Raises:
        ValueError: a bad option; targets whose shape fits neither form.
        RuntimeError: a class index outside ``[0, C)`` (raised by ``torch.gather``).
    """

    def unreduced(self, y_pred, y):
        _check_pair("CrossEntropyLoss", y_pred, y)
        if y_pred.dim() < 2:
            raise ValueError(f"CrossEntropyLoss: predictions must have shape (N, C, ...), got "
                             f"{tuple(y_pred.shape)}; add a batch dimension with y_pred.unsqueeze(0)")
        classes = y_pred.shape[1]
        log_p = self.log_probabilities(y_pred, dim=1)
        alpha = self.label_smoothing or 0.0
        if not y.is_floating_point():
            expected = y_pred.shape[:1] + y_pred.shape[2:]
            if y.shape != expected:
                raise ValueError(f"CrossEntropyLoss: class-index targets must have shape {tuple(expected)} for "
                                 f"predictions of shape {tuple(y_pred.shape)}, got {tuple(y.shape)}")
            # gather rather than one_hot: no one-hot tensor, and no host read-back of the largest index
            picked = -log_p.gather(1, y.long().unsqueeze(1)).squeeze(1)
            return picked if not alpha else (1.0 - alpha) * picked - alpha / classes * log_p.sum(dim=1)
        if y.shape != y_pred.shape:
            raise ValueError(f"CrossEntropyLoss: probability targets must have the prediction's shape "
                             f"{tuple(y_pred.shape)}, got {tuple(y.shape)}; pass integer class indices of shape "
                             f"{tuple(y_pred.shape[:1] + y_pred.shape[2:])} otherwise")
        target = y.to(y_pred.dtype)
        if alpha:
            target = target * (1.0 - alpha) + alpha / classes
        return -(target * log_p).sum(dim=1)


class BinaryCrossEntropyLoss(_LikelihoodLoss):
    r"""Binary cross entropy, elementwise (Lux's ``BinaryCrossEntropyLoss``).

    With target :math:`y \in [0, 1]` smoothed towards 1/2 by :math:`\alpha`,
    :math:`\tilde y = (1-\alpha) y + \alpha/2`:

    .. math::
        \ell = -\big(\tilde y \log \sigma(\hat y) + (1-\tilde y)\log(1 - \sigma(\hat y))\big)
             = (1-\tilde y)\,\hat y + \operatorname{softplus}(-\hat y)

    for ``logits=True`` (default; evaluated in the stable second form), and
    :math:`-\big(\tilde y \log(\hat y+\epsilon) + (1-\tilde y)\log(1-\hat y+\epsilon)\big)`
    for probabilities (``logits=False``, Lux's default).

    Args:
        logits, label_smoothing, epsilon, agg: as for :class:`CrossEntropyLoss`.

    Raises:
        ValueError: a bad option; ``y_pred`` and ``y`` of different shapes.
    """

    def unreduced(self, y_pred, y):
        _check_pair("BinaryCrossEntropyLoss", y_pred, y)
        if y_pred.shape != y.shape:
            raise ValueError(f"BinaryCrossEntropyLoss: prediction shape {tuple(y_pred.shape)} differs from target "
                             f"shape {tuple(y.shape)}")
        target = y.to(y_pred.dtype)
        if self.label_smoothing:
            target = target * (1.0 - self.label_smoothing) + self.label_smoothing / 2
        if self.logits:
            return (1.0 - target) * y_pred + F.softplus(-y_pred)
        eps = self.epsilon if self.epsilon is not None else torch.finfo(y_pred.dtype).eps
        return -(target * torch.log(y_pred + eps) + (1.0 - target) * torch.log(1.0 - y_pred + eps))
