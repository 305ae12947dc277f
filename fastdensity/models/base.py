"""What every model in :mod:`fastdensity.models` shares: the interface training relies on.

A model is an ``nn.Module`` built from plain keyword arguments (its *config*, stored in checkpoints)
with

* ``log_prob(x, context=None) -> [B]``: the log-density (continuous models) or log-probability
  (discrete models) of a batch ``x`` of shape ``[B, *shape]``, in nats;
* ``sample(n, context=None) -> [n, *shape]``: draws from the global torch RNG (seed it with
  ``torch.manual_seed``);
* ``initialize(x, context=None)``: data-dependent initialisation from a batch (ActNorm statistics,
  k-means++ for mixtures), run once before training;
* ``config``: the constructor's keyword arguments as plain numbers, strings and lists, so that
  ``type(model)(**model.config)`` rebuilds an untrained copy and checkpoints load with
  ``torch.load(..., weights_only=True)``.

Conditional models. A model built with ``context_features=C`` is a density p(x | c): every call takes a
context [B, C] with one row per example, and ``sample(n, context)`` returns [len(context), n, *shape]
(nflows' layout: n samples for each context row). A model built without it refuses a context
(ValueError), as does a model given a context whose batch size differs from the inputs'.

``discrete`` models (PixelCNN) take integer levels ``0..levels-1`` and return exact log-probabilities;
continuous models take real-valued inputs (see :mod:`fastdensity.data` for dequantization).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["DensityModel", "check_shape", "mlp", "ContextMLP", "ConvNet"]

# Options of the flows that apply to one kind of data only (RealNVP and Glow share them).
_IMAGE_OPTIONS, _VECTOR_OPTIONS = ("num_blocks", "num_scales"), ("num_hidden", "actnorm", "context_features")


def check_shape(name: str, shape: Sequence[int], dims: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints with one of ``dims`` entries, or a ValueError naming it."""
    try:
        shape = tuple(int(s) for s in ([shape] if isinstance(shape, int) else shape))
    except (TypeError, ValueError):
        raise ValueError(f"{name}: shape must be a sequence of positive ints; got {shape!r}") from None
    if len(shape) not in dims or any(s < 1 for s in shape):
        expected = " or ".join({1: "[D]", 3: "[C, H, W]"}[d] for d in dims)
        raise ValueError(f"{name} models data of shape {expected} per example; got shape {list(shape)}")
    return shape


def reject_other_kind_options(model: str, image: bool, **options) -> None:
    """ValueError for options given (not None) that belong to the other kind of data: vector-only
    options on images and image-only options on vectors."""
    wrong = [k for k, v in options.items() if v is not None and k in (_VECTOR_OPTIONS if image else _IMAGE_OPTIONS)]
    if wrong:
        kind = "vectors ([D])" if image else "images ([C, H, W])"
        raise ValueError(f"{model}: {', '.join(wrong)} applies to {kind} only")


def vector_coupling_args(model: str, shape, num_hidden) -> tuple[int, int]:
    """``(D, num_hidden)`` for a coupling flow on vectors ``shape=[D]``: at least 2 features to split,
    and MLPs of ``num_hidden`` hidden layers (default 2, at least 1)."""
    num_hidden = 2 if num_hidden is None else at_least("num_hidden", num_hidden, 1)
    if shape[0] < 2:
        raise ValueError(f"{model} needs at least 2 features to couple; got shape {list(shape)}")
    return shape[0], num_hidden


def at_least(name: str, value, minimum: int) -> int:
    """``int(value)``, or a ValueError naming ``name`` when it is below ``minimum``."""
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def halvings(shape: Sequence[int], smallest: int, most: int) -> int:
    """How many times (at most ``most``) H and W of ``shape`` = [C, H, W] halve evenly and stay at least
    ``smallest``: the number of squeezes a multi-scale flow's default makes."""
    _, h, w = shape
    count = 0
    while count < most and h % 2 == 0 and w % 2 == 0 and h // 2 >= smallest and w // 2 >= smallest:
        count, h, w = count + 1, h // 2, w // 2
    return count


def check_scales(model: str, shape: Sequence[int], num_scales: int, squeezes: int) -> None:
    """ValueError unless ``num_scales >= 1`` and H, W of ``shape`` survive ``squeezes`` halvings."""
    _, h, w = shape
    if num_scales < 1:
        raise ValueError(f"{model}: num_scales must be >= 1; got {num_scales}")
    f = 2 ** squeezes
    if h % f or w % f:
        raise ValueError(f"{model} with num_scales={num_scales} squeezes {squeezes} time(s), so H and W must be "
                         f"divisible by {f}; got shape {list(shape)}")


def optional_context_features(value) -> int | None:
    """``context_features`` as a positive int, or None (an unconditional model)."""
    return None if value is None else at_least("context_features", value, 1)


class DensityModel(nn.Module):
    """Base class of the models: the common interface described in the module docstring."""

    #: registry name (``fastdensity train --model NAME``)
    name = ""
    #: True when the model takes integer levels and gives exact probabilities
    discrete = False
    #: C for a conditional model p(x | c) with contexts [B, C]; None for an unconditional one
    context_features: int | None = None
    #: Options added after checkpoints of this model were first written, each with the value that builds
    #: the model such a checkpoint holds (its config lacks the option): see :func:`stored_model_args`
    added_options: dict = {}

    def __init__(self, shape: Sequence[int], **config):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.config = {"shape": list(self.shape), **config}

    @property
    def dim(self) -> int:
        """D, the number of scalar variables per example."""
        return math.prod(self.shape)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.log_prob expects a torch.Tensor; got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.shape or x.dim() != len(self.shape) + 1:
            raise ValueError(f"{type(self).__name__} expects inputs of shape [B, {', '.join(map(str, self.shape))}]; "
                             f"got {list(x.shape)}")

    def _check_context(self, context: torch.Tensor | None, rows: int | None = None) -> None:
        """ValueError unless ``context`` suits this model: None for an unconditional model, a
        [rows, context_features] tensor for a conditional one (any number of rows when ``rows`` is None)."""
        name, c = type(self).__name__, self.context_features
        if c is None:
            if context is not None:
                raise ValueError(f"{name} was built without context_features: it takes no context")
            return
        if not isinstance(context, torch.Tensor):
            raise ValueError(f"{name} was built with context_features={c}: it needs a context tensor [B, {c}]; "
                             f"got {None if context is None else type(context).__name__}")
        if context.dim() != 2 or context.shape[1] != c or (rows is not None and context.shape[0] != rows):
            expected = f"[{'B' if rows is None else rows}, {c}]"
            raise ValueError(f"{name}: context must have shape {expected} (one row per example); "
                             f"got {list(context.shape)}")

    def per_context(self, num_samples: int, context: torch.Tensor | None, draw) -> torch.Tensor:
        """``draw(n, rows)`` -> [n, *shape] samples for n context rows (or n unconditional samples when
        ``rows`` is None), arranged as nflows does: [num_samples, *shape] without a context,
        [len(context), num_samples, *shape] with one (each context row repeated for its samples)."""
        self._check_context(context)
        if context is None:
            return draw(num_samples, None)
        rows = context.repeat_interleave(num_samples, dim=0)
        return draw(rows.shape[0], rows).reshape(context.shape[0], num_samples, *self.shape)

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, num_samples: int, context: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Same as :meth:`log_prob` (so ``DistributedDataParallel`` hooks the model's main computation)."""
        return self.log_prob(x) if context is None else self.log_prob(x, context)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, context: torch.Tensor | None = None) -> None:
        """Data-dependent initialisation: one forward pass in training mode (sets ActNorm statistics)."""
        was_training = self.training
        self.train()
        self.log_prob(x) if context is None else self.log_prob(x, context)
        self.train(was_training)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


def mlp(in_features: int, out_features: int, hidden_features: int, num_hidden: int = 2,
        zero_last: bool = True, context_features: int | None = None) -> nn.Module:
    """``num_hidden`` ReLU layers of ``hidden_features``; the last layer starts at zero when ``zero_last``
    so that a coupling built on it starts as the identity (a stable first step).

    With ``context_features`` the network is a :class:`ContextMLP`: ``forward(x, context)`` reads the
    context [B, C] beside x."""
    layers: list[nn.Module] = []
    width = in_features + (context_features or 0)
    for _ in range(num_hidden):
        layers += [nn.Linear(width, hidden_features), nn.ReLU()]
        width = hidden_features
    last = nn.Linear(width, out_features)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last) if context_features is None else ContextMLP(*layers, last)


class ContextMLP(nn.Sequential):
    """An MLP on ``[x, context]`` concatenated: ``forward(x [B, n], context [B, C]) -> [B, out]``."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(torch.cat([x, context.to(x.dtype)], dim=-1))


class ConvNet(nn.Module):
    """Conditioner for image couplings: 3x3 conv -> ``num_blocks`` residual 3x3 blocks -> 3x3 conv.

    ``[B, in_channels, H, W] -> [B, out_channels, H, W]``, spatial size kept by zero padding; the last
    convolution starts at zero (the coupling starts as the identity, as in Glow).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, num_blocks: int = 1):
        super().__init__()
        self.first = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(hidden_channels, hidden_channels, 1))
            for _ in range(num_blocks))
        self.last = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        for block in self.blocks:
            h = h + block(h)
        return self.last(torch.relu(h))
