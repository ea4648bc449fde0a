"""``solve(..., compile=True)``: one explicit Runge–Kutta step compiled with ``torch.compile``.

The compiled region is the whole trial step of the adaptive loop that runs on
the device: every stage evaluation of the vector field, the new state, the
embedded error estimate, the dense-output stages and the scaled error norm
``E = norm(err / (abstol + reltol * max(|u|, |u_new|)))``. The loop reads ``E``
back in its one host transfer per step and proposes the next ``dt`` on the host
(the controllers work on host floats), so a compiled solve synchronises exactly
as often as an eager one: once per step. Time enters the step as 0-d device
tensors, so the stage times ``t + c_i dt`` are device arithmetic inside the graph
and the step compiles without graph breaks (``benchmarks/compile_step.py``).

Compilation is cached by ``torch.compile`` itself, per shape, dtype and device of
the state and parameters (``dynamic=False``: a new shape compiles a new graph).
The step is compiled with ``fullgraph=True``: a vector field that would break the
graph (data-dependent Python control flow, unsupported calls) makes the step
fall back to eager execution for the rest of the solve, with one warning line.
The first step of a solve runs eagerly, so the first evaluation of ``f`` is checked
for shape, dtype and device as in an eager solve.

On CUDA, ``compile=True`` uses ``mode="reduce-overhead"`` (CUDA graphs: the step's
kernels are replayed from one graph launch); its outputs are copied out of the
graph's static buffers so that saved states survive the next replay.
``compile="default"`` / ``"max-autotune"`` choose another ``torch.compile`` mode.

Solves that need no per-step host work (an adaptive FSAL method, PI or I
control, values at ``saveat`` times only) go further: the whole loop runs as
one compiled graph (:mod:`pylux.diffeq.captured`); this step-by-step path
serves the rest. The Rosenbrock methods compile their whole loop or nothing:
outside the whole-loop conditions (or under a sensitivity algorithm, or with
inputs that need a gradient) their steps run eagerly, with one warning.

Scope: explicit Runge–Kutta solvers (``Tsit5()``, ``DP5()``, ``BS3()``, …) and their
reversible pairs (``Reversible(Tsit5())``: a trial step completes the pending backward
increment ``Z_n = Z_{n-1} + Y_n - S_{-h}(Y_n)``, takes the forward base step and forms
``Y_{n+1}`` in one graph), ODE problems, and ``sensealg=None`` or ``DirectAdjoint()``
(autograd differentiates the compiled graph) or an algorithm that declares
``compiles_backward`` (the continuous adjoints ``BacksolveAdjoint``,
``InterpolatingAdjoint``, ``QuadratureAdjoint``: their forward solve and every backward
solve of the augmented state run compiled, the vector–Jacobian products traced with
``torch.func.vjp``; ``ReversibleAdjoint``: its forward steps and every step of its
reconstructing sweep but the last).
"""

from __future__ import annotations

import warnings

import torch

from .captured import captured_run
from .norms import scaled_error_norm
from .solvers import AbstractSolver, ExplicitRungeKutta, RKState, StepResult, as_step_times, time_add
from .interpolation import StageInterpolant
from .reversible import Reversible, ReversibleState
from .terms import BoundTerm, as_bound_term

__all__ = ["CompiledSolver", "CompiledStepResult", "compiled_solver", "COMPILE_MODES"]

#: the accepted values of ``solve(..., compile=...)`` besides True/False
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")

_COMPILED: dict = {}


class CompiledStepResult(StepResult):
    """A :class:`StepResult` that carries the scaled error norm computed inside the compiled step."""

    __slots__ = ("scaled_error",)

    def __init__(self, *args, scaled_error=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scaled_error = scaled_error


def _fused_step(base, term, t, u, dt, state, abstol, reltol, norm, adaptive):
    """The eager function that ``torch.compile`` traces: a step and its scaled error norm."""
    result = base.step(term, t, u, dt, state)
    error = result.error_estimate
    scaled = scaled_error_norm(error, u, result.u_new, abstol, reltol, norm) if adaptive else None
    stiffness = result.stiffness_stages if result.stiffness_stages is not None else ()
    return (result.u_new, error, scaled, tuple(result.dense_info.stages), result.solver_state_new.f_at_u,
            tuple(stiffness), result.nfe)


def _fused_reversible_step(solver, term, t, y, dt, z, pending, abstol, reltol, norm, adaptive):
    """The reversible pair's trial step (:class:`~pylux.diffeq.Reversible`) and its scaled error norm: the
    pending backward increment that completes ``Z_n``, the forward base step and ``Y_{n+1}``, one graph."""
    result = solver.step(term, t, y, dt, ReversibleState(z, pending))
    error = result.error_estimate
    scaled = scaled_error_norm(error, *result.error_scale, abstol, reltol, norm) if adaptive else None
    retry = result.solver_state_retry
    return result.u_new, error, scaled, retry.z, retry.gap, result.nfe


def _compiled_function(mode: str, fused=_fused_step):
    key = (mode, fused)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fused, fullgraph=True, dynamic=False,
                                       mode=None if mode == "default" else mode)
    return _COMPILED[key]


class CompiledSolver(AbstractSolver):
    """An explicit Runge–Kutta solver whose step runs as one compiled graph (see the module docstring).

    Args:
        base: the explicit Runge–Kutta method, or its reversible pair (:class:`~pylux.diffeq.Reversible`:
            the pending backward increment, the forward base step and the new ``Y`` form one graph).
        options: the solve's :class:`~pylux.diffeq.options.SolveOptions` (tolerances and norm
            enter the compiled error norm).
        mode: a ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``).

    ``fallback_reason`` is ``None`` while the step runs compiled, else why it fell back to eager.
    """

    compiled = True

    def __init__(self, base: ExplicitRungeKutta | Reversible, options, mode: str = "default") -> None:
        self.base = base
        self.order, self.error_order = base.order, base.error_order
        self.interpolation_order = base.interpolation_order
        self.mode = mode
        self.adaptive = options.controller.needs_error_estimate
        self.tolerances = (options.abstol, options.reltol, options.norm)
        self._tolerance_inputs = None
        self.fallback_reason: str | None = None
        #: why this solve cannot run as one compiled loop (:mod:`pylux.diffeq.captured`), once it failed to compile
        self.whole_loop_refusal: str | None = None
        #: why the last solve did not qualify for the whole-loop path (:func:`pylux.diffeq.captured.capture_refusal`)
        self.capture_refusal: str | None = None
        self.compiled_steps = 0

    def _tolerances_as_inputs(self, u: torch.Tensor):
        """``(abstol, reltol, norm)`` with float tolerances as 0-d tensors in ``u``'s dtype: a float would be a
        constant of the graph, and every tolerance of a sweep one more compilation."""
        where = (u.dtype, u.device)
        if self._tolerance_inputs is None or self._tolerance_inputs[0] != where:
            abstol, reltol, norm = self.tolerances
            if not isinstance(abstol, torch.Tensor):
                abstol = torch.full((), float(abstol), dtype=u.dtype, device=u.device)
            reltol = torch.full((), float(reltol), dtype=u.dtype, device=u.device)
            self._tolerance_inputs = (where, (abstol, reltol, norm))
        return self._tolerance_inputs[1]

    def run_whole_loop(self, loop, out, dt) -> bool:
        """Run the solve as one compiled while-loop when eligible (:func:`pylux.diffeq.captured.captured_run`)."""
        return captured_run(loop, out, dt)

    @property
    def needs_f0(self) -> bool:  # type: ignore[override]
        return self.base.needs_f0

    @property
    def computes_du_new(self) -> bool:  # type: ignore[override]
        return self.base.computes_du_new

    @property
    def steps_onto_saveat(self) -> bool:  # type: ignore[override]
        return self.base.steps_onto_saveat

    def default_controller(self):
        return self.base.default_controller()

    def init(self, term, t0, u0, dt0, f0=None):
        return self.base.init(term, t0, u0, dt0, f0)

    def bind_options(self, options) -> "CompiledSolver":
        bind = getattr(self.base, "bind_options", None)
        if bind is not None:
            self.base = bind(options)
        return self

    def diagnose(self, state, options) -> str | None:
        """The base solver's check of a finished solve (the reversible pair's separation), if it has one."""
        check = getattr(self.base, "diagnose", None)
        return check(state, options) if check is not None else None

    def record_stats(self, stats, state) -> None:
        record = getattr(self.base, "record_stats", None)
        if record is not None:
            record(stats, state)

    def step(self, term, t, u, dt, state):
        term = as_bound_term(term)
        if not isinstance(self.base, (ExplicitRungeKutta, Reversible)):
            # a stiff method compiles its whole loop or nothing: this solve needs the step-by-step loop
            if self.fallback_reason is None:
                self.fallback_reason = (self.whole_loop_refusal or self.capture_refusal
                                        or "the solve needs the step-by-step loop")
                warnings.warn(f"solve(compile=True): {type(self.base).__name__} runs its loop compiled only as a "
                              f"whole ({self.fallback_reason}); this solve runs eagerly", RuntimeWarning,
                              stacklevel=2)
            return self.base.step(term, t, u, dt, state)
        if self.fallback_reason is not None or getattr(term, "count", 1) == 0 or not term.control_is_time:
            return self.base.step(term, t, u, dt, state)
        abstol, reltol, norm = self._tolerances_as_inputs(u)
        cuda_graphs = self.mode == "reduce-overhead" and u.is_cuda
        # the graph sees the plain bound term: a counter's changing integer would be a guard that recompiles
        # every step, so the loop's evaluation count is advanced here instead
        plain = BoundTerm(term.term, term.p)
        reversible = isinstance(self.base, Reversible)
        try:
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            if reversible:
                t, dt = as_step_times(t, dt, u)
                out = _compiled_function(self.mode, _fused_reversible_step)(
                    self.base, plain, t, u, dt, state.z, state.pending, abstol, reltol, norm, self.adaptive)
            else:
                out = _compiled_function(self.mode)(self.base, plain, t, u, dt, state, abstol, reltol, norm,
                                                    self.adaptive)
        except Exception as err:  # noqa: BLE001 - any compile failure means: run eagerly
            result = self.base.step(term, t, u, dt, state)  # a genuine error of f is raised here, unchanged
            first_line = (str(err).strip().splitlines() or [""])[0][:200]
            self.fallback_reason = f"{type(err).__name__}: {first_line}"
            warnings.warn(f"solve(compile=True): the step could not be compiled ({self.fallback_reason}); "
                          "running it eagerly for the rest of this solve", RuntimeWarning, stacklevel=2)
            return result
        if cuda_graphs:
            out = tuple(_copy_out(x) for x in out)
        self.compiled_steps += 1
        nfe = out[-1]
        if hasattr(term, "count"):
            term.count += nfe
        if reversible:
            u_new, error, scaled, z, gap, _ = out
            gap = gap if state.gap is None else torch.maximum(gap, state.gap)  # the running maximum, outside
            return CompiledStepResult(u_new, error, solver_state_new=ReversibleState(z, (time_add(t, dt), dt), gap),
                                      nfe=nfe, solver_state_retry=ReversibleState(z, None, gap), scaled_error=scaled)
        u_new, error, scaled, stages, k_new, stiffness, _ = out
        return CompiledStepResult(
            u_new, error, dense_info=StageInterpolant(u, dt, list(stages), self.base.tableau),
            solver_state_new=RKState(k_new), nfe=nfe, du_new=k_new,
            stiffness_stages=stiffness or None,
            solver_state_retry=state if state.f_at_u is not None else RKState(stages[0]),
            scaled_error=scaled)

    def __repr__(self) -> str:
        return f"CompiledSolver({self.base!r}, mode={self.mode!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, CompiledSolver) and other.base == self.base and other.mode == self.mode

    def __hash__(self) -> int:
        return hash((CompiledSolver, self.base, self.mode))


def _copy_out(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, tuple):
        return tuple(_copy_out(v) for v in x)
    return x


def compiled_solver(solver, options, sensealg, compile, device: torch.device) -> AbstractSolver:
    """The solver ``solve`` runs for its ``compile=`` argument: ``solver`` itself for ``False``, else a
    :class:`CompiledSolver`; unsupported combinations raise, naming what works."""
    if compile is False or compile is None:
        return solver
    if compile is True:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    elif isinstance(compile, str) and compile in COMPILE_MODES:
        mode = compile
    else:
        raise ValueError(f"solve: compile must be True, False or one of {COMPILE_MODES}, got {compile!r}")
    if not (isinstance(solver, (ExplicitRungeKutta, Reversible)) or getattr(solver, "captures_whole_loop", False)):
        raise TypeError(f"solve: compile=True compiles explicit Runge–Kutta steps (Tsit5(), DP5(), BS3(), RK4(), "
                        f"..., and their Reversible(...) pairs) and Rosenbrock loops (Rosenbrock23(), Rodas5P()), "
                        f"got {solver!r}; solve it with compile=False")
    if getattr(solver, "captures_whole_loop", False) and sensealg is not None:
        raise NotImplementedError(f"solve: compile=True with {type(solver).__name__} runs forward solves only "
                                  f"(sensealg=None, under torch.no_grad or for inputs that need no gradient), not "
                                  f"under {sensealg!r}; pass compile=False to differentiate a stiff solve")
    if sensealg is not None and not (getattr(sensealg, "differentiates_solver", False)
                                     or getattr(sensealg, "compiles_backward", False)):
        raise NotImplementedError(f"solve: compile=True runs under sensealg=None, DirectAdjoint(), "
                                  f"BacksolveAdjoint(), InterpolatingAdjoint(), QuadratureAdjoint() or "
                                  f"ReversibleAdjoint(), not {sensealg!r}; pass compile=False for this sensealg")
    return CompiledSolver(solver, options, mode)
