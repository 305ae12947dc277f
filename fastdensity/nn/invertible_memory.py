"""Backprop by inversion: training a run of invertible steps without storing its activations.

``CompositeTransform(steps, memory="invert")`` (and ``memory="invert"`` on the flow models) computes
the forward pass of each run of invertible steps under ``no_grad`` and keeps only the run's output (and
one anchor every ``anchor_every`` steps, below). Backward walks the steps in reverse and, for step k
with output ``y_k`` and upstream gradients ``(g_y, g_ld)`` of (output, log-det)::

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
step (ActNorm, InvConv1x1, permutations, Squeeze, a user's Transform) takes the generic path above,
up to :data:`GROUP` consecutive light ones (all but a user's) under one autograd call.

What is saved, per run: its input (which is kept anyway: the data, or the previous run's output), the
output of every ``anchor_every`` steps (default :data:`DEFAULT_ANCHOR_EVERY`) and the context.
``"store"`` saves every step's input and every activation of every conditioner: for a deep stack the
ratio is about 1 / (anchor_every x activations per step); measured in the benchmarks (``bench_memory``).

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
Double backward (``create_graph=True``) through an inverted run is refused by autograd. Under
``torch.compile`` the inverted runs stay eager (graph breaks around them); the rest compiles.

Numerics. In float64 the gradients equal ``"store"``'s to round-off (tests: 1e-10 relative). In
float32 each rebuilt input carries the round-off of the inverses above it, amplified wherever a step
contracts (its inverse expands), and the conditioners' ReLU kinks turn small input errors into
occasional larger gradient errors. Two guards:

* anchors: a segment of at most ``anchor_every`` steps is rebuilt from its own saved output. A
  multi-scale flow (Glow, RealNVP images) also re-anchors at every split, each level being its own run.
* a drift check: where a segment's rebuilt input meets the saved one (the previous anchor, or the run's
  input), backward compares them; past :func:`drift_tolerance` (1e-4 relative in float32) the segment's
  gradients are recomputed from the saved input under autograd, the checkpointing way (exact, holding
  that segment's activations for its backward), with a warning. Gradients are never silently wrong.

Float32 parameter-gradient error against float64 (relative L2 over all parameters; steps of
ActNorm, InvConv1x1 and a sigmoid affine coupling whose conditioner is a ReLU MLP of two 64-unit hidden
layers, D = 16, batch 256, weights perturbed by N(0, 0.05^2); 3 transforms per step; median and
largest over 10 seeds)::

    steps   store              invert, unanchored    anchor_every=24       anchor_every=12 (default)
      8     6.4e-7 / 8.2e-7    1.1e-6 / 1.2e-6       1.1e-6 / 1.2e-6       7.8e-7 / 9.7e-7
     16     8.5e-7 / 4.6e-4    1.7e-6 / 4.6e-4       1.1e-6 / 4.6e-4       9.5e-7 / 4.6e-4
     32     1.4e-6 / 7.5e-5    7.6e-6 / 1.8e-3       1.6e-6 / 7.7e-4       1.5e-6 / 7.5e-5
     64     2.7e-6 / 2.3e-4    6.5e-4 / 4.0e-3       2.7e-6 / 5.7e-4       2.5e-6 / 5.7e-4

The largest errors, store's included, come from ReLU kinks: an input off by one rounding flips a few
units, and with them a few samples' terms of a weight gradient. Unanchored, the rebuilt inputs are off
by more, so the flips are more frequent; anchored every 12, the median is store's. Images ([16, 12, 8, 8],
ConvNet couplings, one seed) show the same: unanchored 7.5e-5 at 16 steps against store's 7.3e-7,
anchored every 24 9.5e-7. With N(0, 0.2^2) perturbations the sigmoid couplings contract by up to
1000x per step and an unguarded rebuild is off by 1e12 after 8 steps; the drift check catches it and
the recomputed gradients equal store's.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .base import DEFAULT_ANCHOR_EVERY, Transform, uses_context, zero_logdet

__all__ = ["MEMORY_MODES", "DEFAULT_ANCHOR_EVERY", "check_memory", "rebuild_problem", "call_problem",
           "drift", "drift_tolerance", "forward_by_inversion", "invertible_run", "memory_option", "set_memory"]

MEMORY_MODES = ("store", "invert")



def check_memory(memory) -> str:
    """``memory`` when it is one of :data:`MEMORY_MODES`, else a ValueError naming them."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {', '.join(map(repr, MEMORY_MODES))}; got {memory!r}")
    return memory


def memory_option(memory) -> dict:
    """A model's config entry for ``memory``: none for ``"store"`` (so configs and checkpoints from before
    the option are unchanged, and a model is the same model either way), ``{"memory": "invert"}`` else."""
    return {} if check_memory(memory) == "store" else {"memory": memory}


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
    running statistics once more. ``"initialise"`` when an ActNorm in it will initialise itself from
    this call's batch (training mode, not yet initialised)."""
    from .normalization import ActNorm

    for module in step.modules():
        if not module.training:
            continue
        if isinstance(module, ActNorm) and not module._initialized:
            return "initialise"
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{type(step).__name__} has dropout in training mode"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            return f"{type(step).__name__} has batch norm in training mode"
    return None


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


def _steps_generic(steps, y, grad_y, grad_ld, context, params, need_x):
    """Rebuild the input of consecutive steps with their inverses (no graph), recompute their forward
    under autograd, back-propagate once. Returns (rebuilt input, its gradient, gradients of ``params``
    and then of the context when it wants one)."""
    with torch.no_grad():
        for step in reversed(steps):
            y, _ = step.inverse(y, context if uses_context(step) else None)
    x = y.detach().requires_grad_(need_x)
    with torch.enable_grad():
        y_again, ld = _cascade(steps, x, context)
    leaves = ([x] if need_x else []) + params + ([context] if _wants_context(steps, context) else [])
    grads = _grad((y_again, ld), (grad_y, grad_ld.to(ld.dtype)), leaves)
    grad_x = grads.pop(0) if need_x else None
    return x.detach(), grad_x, grads


def _wants_context(steps, context) -> bool:
    return _wants_grad(context) and any(uses_context(s) for s in steps)


@functools.lru_cache(maxsize=None)
def _light_classes() -> tuple[type, ...]:
    """Steps whose recomputation holds next to nothing (elementwise maps, 1x1 convolutions, index
    shuffles): up to :data:`GROUP` consecutive ones are recomputed under one autograd call."""
    from .invconv import InvConv1x1
    from .normalization import ActNorm
    from .permutations import Permutation
    from .reshape import Squeeze

    return (ActNorm, InvConv1x1, Permutation, Squeeze)


#: How many consecutive light steps (:func:`_light_classes`) share one recomputation: fewer autograd
#: calls (each has a fixed cost, which matters on a GPU), at a cost of holding a few of their small
#: activations at once.
GROUP = 4


def _is_coupling(step) -> bool:
    """A coupling of :mod:`fastdensity.nn.coupling` whose forward is
    ``merge(x_kept, _couple(x_tr, _params(x_kept, context)))``: ``_Coupling``'s own ``_run``, or a
    subclass that says so with ``rebuild_from_kept_part = True`` (a spline coupling without its
    unconditional transform, say)."""
    from .coupling import _Coupling

    return (isinstance(step, _Coupling) and hasattr(step, "_couple")
            and (type(step)._run is _Coupling._run or getattr(step, "rebuild_from_kept_part", False) is True))


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


def _cascade(steps, x, context, total=None):
    """The steps applied in order: ``(y, total + sum of their log-dets)`` (``total`` from zeros)."""
    total = zero_logdet(x) if total is None else total
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


def drift_tolerance(dtype: torch.dtype, autocast_dtype: Optional[torch.dtype] = None) -> float:
    """The largest drift (:func:`drift`) of a rebuilt input that backward accepts: 1e-8 in float64,
    1e-4 in float32, 0.1 when the forward ran under autocast to a half type (a 1x1 convolution in
    bfloat16 is exact to ~1e-2 only, forward and inverse alike).

    Healthy float32 stacks drift by 1e-7 to 1e-5 over tens to hundreds of transforms (the module
    docstring); an ill-conditioned one (a coupling that contracts by ~1000x, whose inverse multiplies
    the round-off by as much) by orders of magnitude more, to inf.
    """
    if autocast_dtype in (torch.float16, torch.bfloat16):
        return 0.1
    return 1e-8 if dtype == torch.float64 else 1e-4


def drift(rebuilt: torch.Tensor, exact: torch.Tensor) -> float:
    """``max |rebuilt - exact| / max |exact|`` (inf when rebuilt is not finite; 0 for empty tensors)."""
    if exact.numel() == 0:
        return 0.0
    exact = exact.double()
    err = (rebuilt.double() - exact).abs().max()
    value = (err / exact.abs().max().clamp(min=torch.finfo(torch.float64).tiny)).item()
    return value if value == value else float("inf")  # NaN (an inf - inf) counts as unbounded


class _Run:
    """The steps of one run, the positions of each step's parameters among the run's, and the run's
    segments: ``[start, end)`` ranges of at most ``anchor_every`` steps, each of whose outputs is saved."""

    def __init__(self, steps: Sequence[nn.Module], anchor_every: Optional[int] = None, owner=None):
        self.steps = list(steps)
        self.owner = owner
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
        # As few segments as anchor_every allows, of sizes as equal as possible (49 steps, 24: 17, 16, 16).
        n = len(self.steps)
        count = -(-n // anchor_every) if anchor_every and n else 1
        bounds = [n * i // count for i in range(count + 1)]
        self.segments = list(zip(bounds[:-1], bounds[1:]))


class _Gradients:
    """Gradients of one segment's parameters (by slot) and of the context, summed over its steps."""

    def __init__(self):
        self.params: dict[int, torch.Tensor] = {}
        self.context: Optional[torch.Tensor] = None

    def add(self, slots, grads, context_grad):
        for slot, g in zip(slots, grads):
            if g is not None:
                self.params[slot] = g if slot not in self.params else self.params[slot] + g
        if context_grad is not None:
            self.context = context_grad if self.context is None else self.context + context_grad


def _walk_back(run: _Run, start: int, end: int, y, grad_y, grad_ld, context, need_x):
    """Steps ``end - 1`` down to ``start``: rebuild each input, back-propagate through that step alone
    (or a few light ones together). Returns (rebuilt input of ``start``, its gradient, the segment's
    gradients)."""
    grads = _Gradients()
    k = end
    while k > start:
        first = k - 1
        coupling = _is_coupling(run.steps[first])
        if coupling:
            group = [first]
        else:
            while (first > start and k - first < GROUP and isinstance(run.steps[first], _light_classes())
                   and isinstance(run.steps[first - 1], _light_classes())):
                first -= 1
            group = list(range(first, k))
        steps = [run.steps[i] for i in group]
        # A parameter shared by several steps of the group is one leaf: its gradient comes out summed.
        slots = list(dict.fromkeys(i for j in group for i in run.slots[j]))
        params = [run.params[i] for i in slots]
        need = need_x or first > start
        if coupling:
            step_context = context if uses_context(steps[0]) else None
            y, grad_y, found = _step_coupling(steps[0], y, grad_y, grad_ld, step_context, params, need)
        else:
            y, grad_y, found = _steps_generic(steps, y, grad_y, grad_ld, context, params, need)
        context_grad = found.pop() if _wants_context(steps, context) else None
        grads.add(slots, found, context_grad)
        if grad_y is None and first > start:  # nothing upstream of here wants a gradient
            grad_y = torch.zeros_like(y)
        k = first
    return y, grad_y, grads


def _replay(run: _Run, start: int, end: int, x, grad_y, grad_ld, context, need_x):
    """The segment's gradients the checkpointing way: its forward again from its exact stored input,
    under autograd (holding the segment's activations), then one backward through all of it."""
    x = x.detach().requires_grad_(need_x)
    with torch.enable_grad():
        y, logdet = _cascade(run.steps[start:end], x, context)
    # A parameter shared by several steps is one leaf: its gradient comes out summed.
    slots = list(dict.fromkeys(i for k in range(start, end) for i in run.slots[k]))
    wants_context = _wants_context(run.steps[start:end], context)
    leaves = ([x] if need_x else []) + [run.params[i] for i in slots] + ([context] if wants_context else [])
    found = _grad((y, logdet), (grad_y, grad_ld.to(logdet.dtype)), leaves)
    grad_x = found.pop(0) if need_x else None
    context_grad = found.pop() if wants_context else None
    grads = _Gradients()
    grads.add(slots, found, context_grad)
    return grad_x, grads


class _InvertibleRun(torch.autograd.Function):
    """``(y, logdet) = run(x, context)``, saving only each segment's output (and x and the context)."""

    @staticmethod
    def forward(ctx, run: _Run, x, context, *params):
        # autograd.Function runs forward without a graph. The log-dets are summed in one chain, in
        # step order, so that the result is bit-for-bit "store"'s.
        h, total, anchors = x, zero_logdet(x), []
        for start, end in run.segments:
            h, total = _cascade(run.steps[start:end], h, context, total)
            anchors.append(h)
        if h.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            anchors[-1] = h = h.clone()  # an output that views the input would alias it in autograd
        ctx.run = run
        ctx.autocast = (x.device.type, *_autocast_state(x.device.type))
        # x costs nothing to keep: it is the data, or the previous run's output, saved there.
        ctx.save_for_backward(x, context, *anchors)
        return h, total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_logdet):
        x, context, *anchors = ctx.saved_tensors
        run: _Run = ctx.run
        if context is not None:
            context = context.detach().requires_grad_(ctx.needs_input_grad[2])
        starts = [x.detach()] + [a.detach() for a in anchors[:-1]]
        param_grads: list[Optional[torch.Tensor]] = [None] * len(run.params)
        grad_context = None
        device_type, enabled, dtype = ctx.autocast
        autocast = torch.autocast(device_type, dtype=dtype, enabled=True) if enabled else _nullcontext()
        with autocast:
            for j in range(len(run.segments) - 1, -1, -1):
                start, end = run.segments[j]
                # The run's own input gradient is needed only when its input wants one.
                need_x = j > 0 or ctx.needs_input_grad[1]
                rebuilt, grad_in, grads = _walk_back(run, start, end, anchors[j].detach(), grad_y, grad_logdet,
                                                     context, need_x)
                off = drift(rebuilt, starts[j])
                tolerance = drift_tolerance(starts[j].dtype, dtype if enabled else None)
                if not off <= tolerance:
                    _warn_drift(run, start, end, off, tolerance)
                    grad_in, grads = _replay(run, start, end, starts[j], grad_y, grad_logdet, context, need_x)
                for slot, g in grads.params.items():
                    param_grads[slot] = g if param_grads[slot] is None else param_grads[slot] + g
                if grads.context is not None:
                    grad_context = grads.context if grad_context is None else grad_context + grads.context
                grad_y = grad_in
        return (None, grad_y, grad_context, *param_grads)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _warn_drift(run: _Run, start: int, end: int, off: float, tolerance: float) -> None:
    if run.owner is not None:
        if getattr(run.owner, "_drift_warned", False):
            return
        run.owner._drift_warned = True  # once per composite: an ill-conditioned flow stays so for a while
    warnings.warn(f"memory='invert': the input of steps {start}..{end - 1} rebuilt from their output is off by "
                  f"{off:.3g} (relative; more than {tolerance:g}): the flow is ill-conditioned there, so their "
                  f"gradients were recomputed from the stored input instead, holding their activations "
                  f"(exact, as with memory='store'). A smaller anchor_every bounds that cost; memory='store' "
                  f"avoids it", RuntimeWarning, stacklevel=2)


@torch.compiler.disable
def invertible_run(steps: Sequence[nn.Module], x: torch.Tensor, context: Optional[torch.Tensor] = None,
                   anchor_every: Optional[int] = None, owner=None):
    """``(y, logdet)`` of the steps applied in order, saving for backward only the output of every
    ``anchor_every`` steps (None: the run's output), see the module docstring.

    Every step must be rebuildable (:func:`rebuild_problem`, :func:`call_problem`); the caller checks.
    Without gradients to record it is the plain forward.
    """
    run = _Run(steps, anchor_every, owner)
    wants = x.requires_grad or _wants_grad(context) or bool(run.params)
    if not torch.is_grad_enabled() or not wants or not run.steps:
        return _cascade(run.steps, x, context)
    return _InvertibleRun.apply(run, x, context, *run.params)


def set_memory(module: nn.Module, memory: str) -> int:
    """Set ``memory`` on every CompositeTransform inside ``module`` (a model, say); returns how many."""
    from .base import CompositeTransform

    check_memory(memory)
    found = [m for m in module.modules() if isinstance(m, CompositeTransform)]
    for m in found:
        m.memory = memory
    return len(found)


# torch.compile does not trace a backward that calls torch.autograd.grad step by step: inverted runs stay
# eager, by choice rather than by whatever dynamo falls back to, a graph break on each side.
@torch.compiler.disable
def forward_by_inversion(steps: Sequence[nn.Module], x: torch.Tensor, context, owner,
                         anchor_every: Optional[int] = None):
    """A CompositeTransform's forward with ``memory="invert"``: maximal runs of rebuildable steps go
    through :func:`invertible_run`; a step that is not (:func:`rebuild_problem`, :func:`call_problem`)
    is applied as with ``"store"`` between them, and a warning names it."""
    if not torch.is_grad_enabled():
        return _cascade(steps, x, context)
    problems = [rebuild_problem(step) or call_problem(step) for step in steps]
    if "initialise" in problems:  # the data-dependent initialisation gets a plain forward
        return _cascade(steps, x, context)
    if any(problems):
        _warn_stored(owner, steps, problems)
    total = zero_logdet(x)
    run: list[nn.Module] = []

    def flush(h):
        nonlocal total
        if run:
            h, logdet = invertible_run(run, h, context, anchor_every, owner)
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
