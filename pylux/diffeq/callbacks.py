"""Callbacks: termination callbacks, and event callbacks (continuous and discrete).

Termination callbacks stop a solve early at an accepted step.

A termination callback is asked, for every trial step, whether the solve
should stop at its end point ``(u_new, t_new)``; the answer counts only if the
step is accepted. It returns a 0-d boolean tensor (preferred: it is fetched in
the same host synchronisation as the accept/reject decision, so checking costs
no extra synchronisation) or a Python bool. When it fires, the solve ends with
``ReturnCode.Terminated`` and ``sol.t[-1]`` is ``t_new``.

``du()`` gives ``f(u_new, t_new)``: for FSAL methods (Tsit5, DP5, BS3) and
VCAB3 it is the last stage the step already computed, so no extra evaluation;
for the others it costs one evaluation of ``f`` (counted in ``stats.nf``).

Event callbacks (DifferentialEquations.jl's ``ContinuousCallback`` and
``DiscreteCallback``) may change the state and go on, or end the solve:
:class:`ContinuousCallback` locates the zero of a condition on the step's
dense output, :class:`DiscreteCallback` tests a condition after each accepted
step. Their machinery in the loop lives in :mod:`pylux.diffeq.events`.
"""

from __future__ import annotations

import abc

from typing import Any, Callable

import torch

__all__ = ["AbstractTerminationCallback", "TerminateSteadyState", "TerminateWhen", "AbstractEventCallback",
           "ContinuousCallback", "DiscreteCallback", "terminate"]


class AbstractTerminationCallback(abc.ABC):
    """Base class: implement ``should_terminate(u, t, du) -> bool tensor | bool``.

    ``u`` is the state at the end of the trial step, ``t`` its time (host
    float), ``du`` a zero-argument callable returning ``f(u, t)``.
    """

    @abc.abstractmethod
    def should_terminate(self, u: torch.Tensor, t: float, du: Callable[[], torch.Tensor]):
        """Implemented by each concrete subclass."""


def _nonnegative(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"{owner}: {name} must be >= 0, got {value!r}")
    return float(value)


class TerminateSteadyState(AbstractTerminationCallback):
    """Stop when ``||f(u)|| <= abstol + reltol * ||u||`` (2-norms over the whole state).

    This is the condition under which a continuous deep equilibrium model
    (Pal, Edelman & Rackauckas, "Mixing implicit and explicit deep learning
    with skip DEQs and infinite time neural ODEs", 2022) treats the ODE as
    having reached its steady state ``u*`` with ``f(u*) = 0``. It reuses the FSAL
    stage, so it adds no evaluation of ``f`` for Tsit5/DP5/BS3/VCAB3.

    Args:
        abstol: absolute tolerance on ``||f(u)||`` (default 1e-8).
        reltol: tolerance relative to ``||u||`` (default 1e-6).
        min_t: do not stop before this time (default: no limit).
    """

    def __init__(self, abstol: float = 1e-8, reltol: float = 1e-6, *, min_t: float | None = None) -> None:
        self.abstol = _nonnegative("TerminateSteadyState", "abstol", abstol)
        self.reltol = _nonnegative("TerminateSteadyState", "reltol", reltol)
        if self.abstol == 0 and self.reltol == 0:
            raise ValueError("TerminateSteadyState: abstol and reltol are both 0, so the condition "
                             "could only hold for an exact steady state; give a positive tolerance")
        self.min_t = min_t

    def should_terminate(self, u, t, du):
        if self.min_t is not None and t < self.min_t:
            return False
        derivative = du()
        return (torch.linalg.vector_norm(derivative.detach())
                <= self.abstol + self.reltol * torch.linalg.vector_norm(u.detach()))

    def __repr__(self) -> str:
        return f"TerminateSteadyState(abstol={self.abstol}, reltol={self.reltol})"


class TerminateWhen(AbstractTerminationCallback):
    """Stop at the first accepted step where ``condition(u, t)`` holds.

    Args:
        condition: ``condition(u, t) -> 0-d bool tensor or bool``, with ``u`` the
            state at the end of the step and ``t`` its time (a float). Return a
            tensor to avoid an extra host synchronisation.
    """

    def __init__(self, condition: Callable) -> None:
        if not callable(condition):
            raise TypeError(f"TerminateWhen: condition must be callable as condition(u, t), got "
                            f"{type(condition).__name__}")
        self.condition = condition

    def should_terminate(self, u, t, du):
        return self.condition(u, t)

    def __repr__(self) -> str:
        return f"TerminateWhen({getattr(self.condition, '__name__', 'condition')})"


class _Terminate:
    """The affect that ends the solve at the event (``affect=terminate``); a singleton."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "terminate"

    def __reduce__(self):
        return (_Terminate, ())


#: Pass as ``affect`` to end the solve at the event. For a condition with one value per sample, the
#: samples whose event fired are frozen at their event state while the others go on; the solve ends
#: (``ReturnCode.Terminated``) when every sample is frozen.
terminate = _Terminate()


def _check_affect(owner: str, affect, allow_none: bool):
    if affect is None and allow_none:
        return None
    if affect is terminate or callable(affect):
        return affect
    allowed = "None, terminate or a callable" if allow_none else "terminate or a callable"
    raise TypeError(f"{owner}: affect must be {allowed} affect(u, t) -> new u, got {type(affect).__name__}")


class AbstractEventCallback(abc.ABC):
    """Base of the event callbacks: ``condition(u, t)`` and ``affect`` (``None``, :data:`terminate`
    or ``affect(u, t) -> u``).

    ``condition`` returns one value per sample: a 0-d tensor (one event for the
    whole state) or a tensor of the state's leading (batch) shape, e.g. ``(B,)``
    for a state ``(B, D)``; each sample then has its own events. ``affect(u, t)``
    is called with the whole state (``t`` a 0-d time tensor) and must return a
    new tensor of ``u``'s shape, dtype and device without modifying ``u`` in
    place; it is applied only to the samples whose event fired
    (``where(fired, affect(u, t), u)``).
    """

    condition: Callable
    affect: Any

    @property
    def terminates(self) -> bool:
        """True when the event ends the solve (``affect=terminate``)."""
        return self.affect is terminate


class ContinuousCallback(AbstractEventCallback):
    """An event at each zero crossing of ``condition(u, t)``, located by root finding on the dense output.

    After every trial step the condition is evaluated at the step's end and at
    ``interp_points`` equally spaced interior points of its dense output (so
    that two crossings inside one step are not missed), all on the device and
    fetched in the step's one host synchronisation. A crossing is a change of
    sign from the sign at the step's start: an up-crossing goes from ``g < 0``
    to ``g >= 0``, a down-crossing from ``g > 0`` to ``g <= 0``. Within the
    first sampled interval showing a wanted crossing, the zero of
    ``g(u(t), t)`` along the interpolant is located by the Illinois method
    (Dowell & Jarratt, BIT 11, 1971; regula falsi whose retained end has its
    value halved, superlinear and always bracketing), per sample, until the
    bracket is at most ``max(abstol, 4 ulp(t))`` wide in time (or ``g`` is
    exactly 0), at most 100 iterations. The event time is the bracket's end
    on the far side of the crossing; its accuracy against the true solution is
    that of the dense output.

    At the event the step is cut (the solve continues from the event time), the
    state there is taken from the dense output, and ``affect`` is applied to the
    samples whose event fired. With several samples, the step is cut at the
    earliest event; the others are found in the following steps, each at its
    own time. With ``affect=terminate`` a 0-d condition ends the solve at the
    event time; a per-sample condition freezes each sample at its own event
    time and state (its vector field is zero from then on, so it no longer
    limits the step size) and the solve ends when all samples are frozen.

    Gradients (under ``DirectAdjoint`` / ``sensealg=None``): the event time
    ``t*`` is differentiable by the implicit function theorem on
    ``g(u(t*, theta), t*, theta) = 0`` (as torchdiffeq's ``odeint_event``)::

        dt*/dtheta = -(dg/dtheta + dg/du du/dtheta) / (dg/du f(u*, t*) + dg/dt)

    and the event state is ``u(t*) + f(u*, t*) (t* - t*)`` (zero in value,
    ``f dt*/dtheta`` in gradient). After an affect the solve continues from
    ``u+ - f(u+, t*) (t* - t*)``, the jump of the sensitivities across an event
    (the saltation term), so gradients through bounces are exact to the
    solve's accuracy. The derivative ``dg/du f`` costs a forward-mode product
    and one evaluation of ``f`` per event, paid only when a gradient is
    recorded. A tangential crossing (``dg/dt = 0`` along the solution) has no
    differentiable event time (the gradient is then inf or NaN). An explicit
    dependence of ``affect`` on ``t`` is not differentiated through ``t*``.

    An event at ``t0``: a condition exactly 0 at ``t0`` does not fire there;
    its sign is taken from the first nonzero value after ``t0``, so the next
    crossing fires (a ball starting on the floor upward lands once). A
    condition already past zero at ``t0`` (``g < 0`` for ``direction=-1``) fires
    only at a later crossing. Just after an event, a sample whose condition
    is within the root finder's bracket values of zero is treated as being
    exactly at zero, so the same event does not fire twice.

    Args:
        condition: ``condition(u, t) -> tensor`` (real floating point, 0-d or
            the state's leading shape); ``t`` is a 0-d time tensor.
        affect: ``None`` (record the event only), :data:`terminate`, or
            ``affect(u, t) -> u`` (see :class:`AbstractEventCallback`).
        direction: ``+1`` up-crossings only, ``-1`` down-crossings only, ``0``
            both (DifferentialEquations.jl's ``affect!``/``affect_neg!`` split).
        rootfind: locate the zero (default); ``False`` puts the event at the
            first sampled point past the crossing (the step's end when
            ``interp_points=0``), without iterations.
        interp_points: interior points per step at which the condition is
            tested (default 10, as DifferentialEquations.jl).
        abstol: width in time to which the event is located (default 0: a few
            ulps of ``t``).

    Raises:
        TypeError / ValueError: a condition that is not callable, a bad affect,
        direction, interp_points or abstol (at construction); a condition that
        returns the wrong shape, dtype or device (at the solve's start).
    """

    def __init__(self, condition: Callable, affect=None, *, direction: int = 0, rootfind: bool = True,
                 interp_points: int = 10, abstol: float = 0.0) -> None:
        if not callable(condition):
            raise TypeError(f"ContinuousCallback: condition must be callable as condition(u, t), got "
                            f"{type(condition).__name__}")
        self.condition = condition
        self.affect = _check_affect("ContinuousCallback", affect, allow_none=True)
        if isinstance(direction, bool) or direction not in (-1, 0, 1):
            raise ValueError(f"ContinuousCallback: direction must be +1 (up-crossings), -1 (down-crossings) "
                             f"or 0 (both), got {direction!r}")
        self.direction = int(direction)
        if not isinstance(rootfind, bool):
            raise TypeError(f"ContinuousCallback: rootfind must be True or False, got {rootfind!r}")
        self.rootfind = rootfind
        if isinstance(interp_points, bool) or not isinstance(interp_points, int) or interp_points < 0:
            raise ValueError(f"ContinuousCallback: interp_points must be an int >= 0, got {interp_points!r}")
        self.interp_points = interp_points
        self.abstol = _nonnegative("ContinuousCallback", "abstol", abstol)

    def __repr__(self) -> str:
        return (f"ContinuousCallback({getattr(self.condition, '__name__', 'condition')}, affect={self.affect!r}, "
                f"direction={self.direction})")


class DiscreteCallback(AbstractEventCallback):
    """``affect`` wherever ``condition(u, t)`` holds at the end of an accepted step.

    The condition is evaluated on the device at each trial step's end and
    fetched in the step's one host synchronisation; it is not tested at
    ``t0``. It returns a boolean tensor, 0-d or of the state's leading shape
    (one verdict per sample). With ``affect=terminate`` a 0-d condition ends the
    solve at that step (as :class:`TerminateWhen`); a per-sample one freezes
    the samples where it holds. No gradient flows through the event time
    (it is a step's end).

    Args:
        condition: ``condition(u, t) -> bool tensor`` (0-d or the state's
            leading shape); ``t`` is a 0-d time tensor.
        affect: :data:`terminate` or ``affect(u, t) -> u``.
    """

    def __init__(self, condition: Callable, affect) -> None:
        if not callable(condition):
            raise TypeError(f"DiscreteCallback: condition must be callable as condition(u, t), got "
                            f"{type(condition).__name__}")
        self.condition = condition
        self.affect = _check_affect("DiscreteCallback", affect, allow_none=False)

    def __repr__(self) -> str:
        return f"DiscreteCallback({getattr(self.condition, '__name__', 'condition')}, affect={self.affect!r})"
