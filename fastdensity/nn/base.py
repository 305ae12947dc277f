"""The transform interface shared by every invertible layer, the context rules, and composition.

Conventions (nflows'): ``forward`` maps data to noise, ``inverse`` noise to data, and both return
``(outputs, logabsdet)`` with ``logabsdet`` of shape [B]: log |det d outputs / d inputs| per sample.

Context. Every transform takes ``context`` ([B, ...], one row per input row, or None) and either uses
it or refuses it - a context is never silently ignored:

* ``conditional`` (a bool attribute) says whether a transform uses a context. Layers that cannot
  (ActNorm, permutations, squeezes, 1x1 convolutions) set it to False and raise ValueError when
  given one; conditional layers raise when its batch size differs from the inputs'.
* :class:`CompositeTransform` hands the context to the members that use it (nflows hands it to all,
  and the rest drop it) and raises when none does.
* A transform that does not say (``conditional`` missing, as in a user's or a peer library's class)
  is taken to use the context it is given: it is passed on, never dropped.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from .._dtypes import acc_dtype

#: Steps between saved outputs in an inverted run (CompositeTransform's default ``anchor_every``, used by
#: :mod:`.invertible_memory`): each input is rebuilt through at most this many inverses. Measured in
#: float32 (that module's docstring's table): unanchored, the median gradient error of 96- and
#: 192-transform stacks is 5 to 240x "store"'s; anchored every 12, the median equals store's. The cost is
#: one saved tensor per 12 steps, against store's tens per step.
DEFAULT_ANCHOR_EVERY = 12

__all__ = ["Transform", "CompositeTransform", "InverseTransform", "uses_context", "check_context",
           "reject_context"]


def uses_context(module) -> bool:
    """Whether ``module`` takes a context: its ``conditional`` attribute, True where it has none."""
    return bool(getattr(module, "conditional", True))


def check_context(inputs: torch.Tensor, context: torch.Tensor | None, who: str = "transform") -> None:
    """ValueError unless ``context`` is None or a tensor with one row per row of ``inputs``."""
    if context is None:
        return
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"{who}: context must be a torch.Tensor or None; got {type(context).__name__}")
    if context.dim() == 0 or context.shape[0] != inputs.shape[0]:
        raise ValueError(f"{who}: context must have one row per input row: inputs have batch size "
                         f"{inputs.shape[0]}, context has shape {tuple(context.shape)}")


def reject_context(layer: nn.Module, context) -> None:
    """ValueError when a context reaches a layer that cannot use one (``conditional = False``)."""
    if context is not None:
        raise ValueError(f"{type(layer).__name__} does not use a context (it is the same map for every "
                         f"context); pass context=None, or put it in a CompositeTransform, which hands the "
                         f"context only to the layers that use it")


class Transform(nn.Module):
    """Base class: an invertible map with a tractable log-determinant.

    Subclasses implement ``forward(x, context=None) -> (z, logabsdet)`` (data -> noise) and
    ``inverse(z, context=None) -> (x, logabsdet)``, where ``logabsdet`` is [B], and set
    ``conditional`` (see the module docstring): True here, so a subclass that says nothing receives
    the context and is trusted to use it.
    """

    conditional: bool = True

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None):
        raise NotImplementedError(f"{type(self).__name__} must implement forward(inputs, context=None)")

    def inverse(self, inputs: torch.Tensor, context: torch.Tensor | None = None):
        raise NotImplementedError(f"{type(self).__name__} is not invertible in closed form")


def zero_logdet(x: torch.Tensor) -> torch.Tensor:
    """A [B] log-det of zeros in the accumulation dtype (fp32, or fp64 for fp64 inputs)."""
    return torch.zeros(x.shape[0], dtype=acc_dtype(x.dtype), device=x.device)


def per_position_logdet(log_scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] log-det of a channel map applied alike at every position of x ([B, C] or [B, C, H, W]):
    ``H * W * sum(log_scales)`` for each sample, in the accumulation dtype.

    A real [B] tensor (not a stride-0 expand), so callers may update it in place.
    """
    positions = x.shape[2:].numel()  # H * W; 1 for [B, C]
    return (positions * log_scales.to(acc_dtype(x.dtype)).sum()).repeat(x.shape[0])


class CompositeTransform(Transform):
    """Apply transforms in sequence; the log-dets add (starting from zeros, as in nflows).

    ``inverse`` runs the inverses in reverse order. A context goes to the members that use it
    (:func:`uses_context`); a context given to a composite none of whose members uses one is a
    ValueError, as is one whose batch size differs from the inputs'.

    ``memory`` sets what the forward pass keeps for backward: ``"store"`` (default) every member's
    activations, as autograd does; ``"invert"`` only the output of each run of invertible members, whose
    inputs backward rebuilds with their inverses, one member at a time (see
    :mod:`fastdensity.nn.invertible_memory`). A member that cannot be rebuilt cheaply is stored, with a
    warning that names it. Gradients are the same either way (to round-off); only ``forward`` under
    autograd changes, ``inverse`` and gradient-free calls are the same code for both.
    ``anchor_every`` (``"invert"`` only): also keep the output of every that many members (12 by
    default), so that each input is rebuilt through at most that many inverses (None: through the whole
    run); a rebuilt input that drifts anyway is caught and its segment recomputed the storing way.
    """

    def __init__(self, transforms: Iterable[Transform], memory: str = "store",
                 anchor_every: int | None = DEFAULT_ANCHOR_EVERY):
        super().__init__()
        self._transforms = nn.ModuleList(transforms)
        self.memory = memory
        if anchor_every is not None and (isinstance(anchor_every, bool) or not isinstance(anchor_every, int)
                                         or anchor_every < 1):
            raise ValueError(f"anchor_every must be None or an integer >= 1; got {anchor_every!r}")
        self.anchor_every = anchor_every

    @property
    def memory(self) -> str:
        """``"store"`` or ``"invert"``; setting ``"invert"`` warns about members that will be stored."""
        return self._memory

    @memory.setter
    def memory(self, value: str) -> None:
        from .invertible_memory import check_memory, describe_stored, rebuild_problem

        self._memory = check_memory(value)
        if value == "invert":
            problems = [rebuild_problem(t) for t in self._transforms]
            if any(problems):
                warnings.warn(f"CompositeTransform(memory='invert'): {describe_stored(self._transforms, problems)} "
                              f"cannot be rebuilt from its output, so it stores its activations as with "
                              f"memory='store'; the other members are inverted", RuntimeWarning, stacklevel=3)

    @property
    def conditional(self) -> bool:
        return any(uses_context(t) for t in self._transforms)

    def __len__(self) -> int:
        return len(self._transforms)

    def __getitem__(self, index: int) -> Transform:
        return self._transforms[index]

    def _check(self, x, context):
        check_context(x, context, "CompositeTransform")
        if context is not None and not self.conditional:
            raise ValueError("CompositeTransform: a context was given but none of its transforms uses one "
                             f"({', '.join(type(t).__name__ for t in self._transforms)})")

    def _cascade(self, x, transforms, context, direction: str):
        self._check(x, context)
        total = zero_logdet(x)
        for transform in transforms:
            x, logabsdet = getattr(transform, direction)(x, context if uses_context(transform) else None)
            total = total + logabsdet
        return x, total

    def forward(self, inputs, context=None):
        if self._memory == "invert" and torch.is_grad_enabled():
            from .invertible_memory import forward_by_inversion

            self._check(inputs, context)
            return forward_by_inversion(list(self._transforms), inputs, context, self, self.anchor_every)
        return self._cascade(inputs, self._transforms, context, "forward")

    def inverse(self, inputs, context=None):
        return self._cascade(inputs, reversed(self._transforms), context, "inverse")


class InverseTransform(Transform):
    """Swap a transform's directions (e.g. to use a noise -> data layer as data -> noise)."""

    def __init__(self, transform: Transform):
        super().__init__()
        self._transform = transform

    @property
    def conditional(self) -> bool:
        return uses_context(self._transform)

    def forward(self, inputs, context=None):
        return self._transform.inverse(inputs, context)

    def inverse(self, inputs, context=None):
        return self._transform(inputs, context)
