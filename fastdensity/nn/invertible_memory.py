"""Backprop by inversion: training a run of invertible steps without storing its activations.

``CompositeTransform(steps, memory="invert")`` (and ``memory="invert"`` on the flow models) computes
the forward pass of each run of invertible steps under ``no_grad`` and keeps only the run's output.
Backward walks the steps in reverse and, for step k with output ``y_k`` and upstream gradients
``(g_y, g_ld)`` of (output, log-det)::

    x_k          = step_k.inverse(y_k)                      (no graph: the input, rebuilt)
    y_k', ld_k   = step_k.forward(x_k)                      (under autograd, this step only)
    g_x, g_theta = d(<g_y, y_k'> + <g_ld, ld_k>) / d(x_k, theta_k, context)
    y_{k-1}, g_y = x_k, g_x                                  (the step's graph is freed here)

so backward holds one step's activations at a time, whatever the depth. ``g_ld`` is the same for every
step: the run's log-det is the sum of theirs. The run's parameters and context are inputs of one
:class:`torch.autograd.Function`, so their gradients flow as with ``memory="store"``.

Couplings (``AffineCoupling``, ``AdditiveCoupling``) rebuild with one conditioner pass instead of
two: the kept half is the same in x and y, so ``h = net(x_kept)`` is computed once under autograd and
serves both the inverse (detached) and the recomputed forward. Backward then costs one extra
conditioner forward per step over ``"store"`` (exactly what activation checkpointing pays); every other
step (ActNorm, InvConv1x1, permutations, Squeeze, a user's Transform) takes the generic path above.

What is saved, per run: its output (and the context). ``"store"`` saves every step's input and every
activation of every conditioner; for a deep stack the ratio is about 1 / (steps x activations per step).

Which runs. A ``CompositeTransform`` with ``memory="invert"`` splits its members into maximal runs of
steps that can be rebuilt; a member that cannot is applied as with ``"store"`` between the runs, and
a warning names it:

* a step whose ``inverse`` is not cheap: the autoregressive layers (inverse = D passes), a class that
  sets ``cheap_inverse = False``, or a Transform without an ``inverse``;
* per call, a step with dropout in training mode (a recomputation would draw another mask) or batch
  norm in training mode (it would update its running statistics again).

A call that must initialise an ActNorm (training mode, not yet initialised) runs as ``"store"``: the
data-dependent initialisation sees the first batch in a plain forward, and later calls invert.
Without gradients (``no_grad``, evaluation, sampling) nothing changes: it is the plain forward.
Double backward (``create_graph=True``) through an inverted run is refused by autograd.

Numerics. In float64 the gradients equal ``"store"``'s to round-off (tests: 1e-10 relative). In
float32 each rebuilt input carries the rounding of one inverse, and the error compounds down the run.
Measured (``benchmarks/NOTES.md``, "Backprop by inversion"): the parameter gradients' relative error
against float64 grows with depth but stays at float32 round-off for the stacks measured; a multi-scale
flow (Glow, RealNVP images) re-anchors at every split, because each level is its own run whose
backward starts from its exact stored output.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .base import Transform, uses_context, zero_logdet

__all__ = ["MEMORY_MODES", "check_memory", "rebuild_problem", "call_problem", "forward_by_inversion",
           "invertible_run"]

MEMORY_MODES = ("store", "invert")


def check_memory(memory) -> str:
    """``memory`` when it is one of :data:`MEMORY_MODES`, else a ValueError naming them."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {', '.join(map(repr, MEMORY_MODES))}; got {memory!r}")
    return memory


# --------------------------------------------------------------------------------------------------
# Which steps can be rebuilt from their outputs
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sequential_inverse_classes() -> tuple[type, ...]:
    """Layers whose inverse takes one pass per feature: rebuilding their input would cost D forwards."""
    from .autoregressive import _AffineAutoregressive
    from .spline import MaskedPiecewiseRationalQuadraticAutoregressive

    return (_AffineAutoregressive, MaskedPiecewiseRationalQuadraticAutoregressive)


def rebuild_problem(step: nn.Module) -> Optional[str]:
    """Why ``step`` cannot be rebuilt cheaply from its output, or None when it can.

    A class (or instance) attribute ``cheap_inverse`` decides when present; otherwise the autoregressive
    layers cannot (their inverse takes D passes), nor can a Transform that does not implement
    ``inverse``, and every other step with an ``inverse`` can. A nested CompositeTransform or an
    InverseTransform can when everything inside it can.
    """
    declared = getattr(step, "cheap_inverse", None)
    if declared is not None:
        return None if declared else f"{type(step).__name__} sets cheap_inverse = False"
    from .base import CompositeTransform, InverseTransform

    if isinstance(step, CompositeTransform):
        inner = [rebuild_problem(t) for t in step]
        return next((p for p in inner if p), None)
    if isinstance(step, InverseTransform):
        return rebuild_problem(step._transform)
    if isinstance(step, _sequential_inverse_classes()):
        return f"{type(step).__name__}'s inverse takes one pass per feature"
    inverse = getattr(type(step), "inverse", None)
    if inverse is None or inverse is Transform.inverse:
        return f"{type(step).__name__} has no inverse"
    return None


def call_problem(step: nn.Module) -> Optional[str]:
    """Why recomputing ``step`` in backward would not give this call's forward again (checked per call),
    or None: dropout in training mode draws a new mask, batch norm in training mode updates its
    running statistics once more."""
    for module in step.modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{type(step).__name__} has dropout in training mode"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            return f"{type(step).__name__} has batch norm in training mode"
    return None


def _needs_plain_pass(steps: Sequence[nn.Module]) -> bool:
    """Whether some ActNorm would initialise itself from this call's batch (training mode, first call):
    the data-dependent initialisation gets a plain forward."""
    from .normalization import ActNorm

    return any(isinstance(m, ActNorm) and m.training and not m._initialized for s in steps for m in s.modules())


# --------------------------------------------------------------------------------------------------
# Rebuilding one step and back-propagating through it
# --------------------------------------------------------------------------------------------------


def _grad(outputs, upstream, inputs):
    """``torch.autograd.grad`` over the outputs that require grad (a log-det of zeros does not);
    None for every input when none does."""
    pairs = [(o, g) for o, g in zip(outputs, upstream) if o.requires_grad]
    if not pairs or not inputs:
        return [None] * len(inputs)
    outs, ups = zip(*pairs)
    return list(torch.autograd.grad(outs, inputs, ups, allow_unused=True))


def _step_generic(step, y, grad_y, grad_ld, context, params, need_x):
    """Rebuild x = step.inverse(y), recompute step.forward(x) under autograd, back-propagate."""
    with torch.no_grad():
        x, _ = step.inverse(y, context)
    x = x.detach().requires_grad_(need_x)
    with torch.enable_grad():
        y_again, ld = step.forward(x, context)
    leaves = ([x] if need_x else []) + params + ([context] if _wants_grad(context) else [])
    grads = _grad((y_again, ld), (grad_y, grad_ld.to(ld.dtype)), leaves)
    grad_x = grads.pop(0) if need_x else None
    return x.detach(), grad_x, grads


def _is_coupling(step) -> bool:
    """A coupling of :mod:`fastdensity.nn.coupling` whose forward is merge(x_kept, couple(x_tr, net(x_kept)))."""
    from .coupling import _Coupling

    return isinstance(step, _Coupling) and type(step)._run is _Coupling._run and hasattr(step, "_couple")


def _step_coupling(step, y, grad_y, grad_ld, context, params, need_x):
    """The coupling's rebuild with one conditioner pass: the kept part of y *is* the kept part of x."""
    y_kept, y_tr = step._split(y)
    kept = y_kept.detach().requires_grad_(need_x)
    with torch.enable_grad():
        h = step._params(kept, context)
    with torch.no_grad():
        x_tr, _ = step._couple(y_tr, h.detach(), inverse=True)
    x_tr = x_tr.requires_grad_(need_x)
    with torch.enable_grad():
        y_tr_again, ld = step._couple(x_tr, h, inverse=False)
    grad_kept_direct, grad_tr = step._split(grad_y)  # y_kept = x_kept: its gradient passes straight through
    leaves = ([kept, x_tr] if need_x else []) + params + ([context] if _wants_grad(context) else [])
    grads = _grad((y_tr_again, ld), (grad_tr, grad_ld.to(ld.dtype)), leaves)
    grad_x = None
    if need_x:
        grad_kept, grad_x_tr = grads.pop(0), grads.pop(0)
        grad_kept = grad_kept_direct if grad_kept is None else grad_kept + grad_kept_direct
        grad_x = step._merge(grad_kept, grad_x_tr if grad_x_tr is not None else torch.zeros_like(x_tr))
    return step._merge(kept.detach(), x_tr.detach()), grad_x, grads


def _wants_grad(context) -> bool:
    return isinstance(context, torch.Tensor) and context.requires_grad


# --------------------------------------------------------------------------------------------------
# The run as one autograd.Function
# --------------------------------------------------------------------------------------------------


def _cascade(steps, x, context):
    total = zero_logdet(x)
    for step in steps:
        x, logabsdet = step.forward(x, context if uses_context(step) else None)
        total = total + logabsdet
    return x, total


def _autocast_state(device_type: str):
    """(enabled, dtype) of autocast on ``device_type`` now, so the recomputation runs as the forward did."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (AttributeError, RuntimeError, TypeError):  # a device type autocast does not know
        return False, None


class _Run:
    """The steps of one run and, for each, the positions of its parameters among the run's."""

    def __init__(self, steps: Sequence[nn.Module]):
        self.steps = list(steps)
        self.params: list[torch.Tensor] = []
        index: dict[int, int] = {}
        self.slots: list[list[int]] = []
        for step in self.steps:
            slots = []
            for p in step.parameters():
                if p.requires_grad:
                    if id(p) not in index:
                        index[id(p)] = len(self.params)
                        self.params.append(p)
                    slots.append(index[id(p)])
            self.slots.append(slots)


class _InvertibleRun(torch.autograd.Function):
    """``(y, logdet) = run(x, context)``, saving only y (and the context) for backward."""

    @staticmethod
    def forward(ctx, run: _Run, x, context, *params):
        y, logdet = _cascade(run.steps, x, context)  # autograd.Function runs forward without a graph
        if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            y = y.clone()  # an output that views the input would be rebuilt in place of it
        ctx.run = run
        ctx.autocast = (x.device.type, *_autocast_state(x.device.type))
        ctx.save_for_backward(y, context)
        return y, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_logdet):
        y, context = ctx.saved_tensors
        y = y.detach()
        run: _Run = ctx.run
        param_grads: list[Optional[torch.Tensor]] = [None] * len(run.params)
        grad_context = None
        device_type, enabled, dtype = ctx.autocast
        autocast = torch.autocast(device_type, dtype=dtype, enabled=True) if enabled else _nullcontext()
        with autocast:
            for k in range(len(run.steps) - 1, -1, -1):
                step = run.steps[k]
                step_context = context if uses_context(step) else None
                params = [run.params[i] for i in run.slots[k]]
                # The first step's input gradient is needed only when the run's input wants one.
                need_x = k > 0 or ctx.needs_input_grad[1]
                rebuild = _step_coupling if _is_coupling(step) else _step_generic
                y, grad_y, grads = rebuild(step, y, grad_y, grad_logdet, step_context, params, need_x)
                if _wants_grad(step_context):
                    g = grads.pop()
                    if g is not None:
                        grad_context = g if grad_context is None else grad_context + g
                for slot, g in zip(run.slots[k], grads):
                    if g is not None:
                        param_grads[slot] = g if param_grads[slot] is None else param_grads[slot] + g
                if grad_y is None and k > 0:  # nothing upstream of here wants a gradient
                    grad_y = torch.zeros_like(y)
        return (None, grad_y, grad_context, *param_grads)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def invertible_run(steps: Sequence[nn.Module], x: torch.Tensor, context: Optional[torch.Tensor] = None):
    """``(y, logdet)`` of the steps applied in order, saving only y for backward (see the module docstring).

    Every step must be rebuildable (:func:`rebuild_problem`, :func:`call_problem`); the caller checks.
    Without gradients to record it is the plain forward.
    """
    run = _Run(steps)
    wants = x.requires_grad or _wants_grad(context) or bool(run.params)
    if not torch.is_grad_enabled() or not wants:
        return _cascade(run.steps, x, context)
    return _InvertibleRun.apply(run, x, context, *run.params)


def forward_by_inversion(steps: Sequence[nn.Module], x: torch.Tensor, context, owner, static_problems):
    """A CompositeTransform's forward with ``memory="invert"``: maximal runs of rebuildable steps go
    through :func:`invertible_run`; a step that is not (``static_problems[k]``, or a per-call problem) is
    applied as with ``"store"`` between them, and a warning names it."""
    if not torch.is_grad_enabled() or _needs_plain_pass(steps):
        return _cascade(steps, x, context)
    problems = [static or call_problem(step) for step, static in zip(steps, static_problems)]
    if any(problems):
        _warn_stored(owner, steps, problems)
    total = zero_logdet(x)
    run: list[nn.Module] = []

    def flush(h):
        nonlocal total
        if run:
            h, logdet = invertible_run(run, h, context)
            total = total + logdet
            run.clear()
        return h

    for step, problem in zip(steps, problems):
        if problem:
            x = flush(x)
            x, logdet = step.forward(x, context if uses_context(step) else None)
            total = total + logdet
        else:
            run.append(step)
    return flush(x), total


def describe_stored(steps, problems) -> str:
    """``"step 3 (MaskedAffineAutoregressive's inverse takes one pass per feature), ..."``"""
    return ", ".join(f"step {k} ({p})" for k, p in enumerate(problems) if p)


def _warn_stored(owner, steps, problems) -> None:
    warnings.warn(f"{type(owner).__name__}(memory='invert'): {describe_stored(steps, problems)} cannot be "
                  f"rebuilt from its output, so it stores its activations as with memory='store'; the other "
                  f"steps are inverted", RuntimeWarning, stacklevel=4)
