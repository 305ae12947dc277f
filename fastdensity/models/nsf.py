"""Neural spline flows (Durkan et al., 2019): rational-quadratic spline couplings or autoregressive splines.

Each layer passes every transformed scalar through its own monotonic rational-quadratic spline on
[-B, B] (B = ``tail_bound``; the identity outside), K = ``num_bins`` bins, with its 3K - 1 parameters
from a conditioner (see :mod:`fastdensity.nn.spline`)::

    ActNorm -> num_layers x spline layer  ->  N(0, I)          log p(x) = log N(f(x); 0, I) + log|det df/dx|

``kind="coupling"``: :class:`~fastdensity.nn.PiecewiseRationalQuadraticCoupling` with alternating masks
(half the features condition an MLP that sets the other half's splines; consecutive layers swap the
halves). Density and sampling each cost one pass per layer.

``kind="autoregressive"``: :class:`~fastdensity.nn.MaskedPiecewiseRationalQuadraticAutoregressive`
(a MADE gives feature d's spline from the features before it), orderings alternating between natural
and reversed (folded into the MADE masks, as in MAF). Density in one pass; sampling is sequential, D
steps per layer: by default each MADE unit computed once (``sample(method="incremental")``,
:mod:`fastdensity.sampling.made_incremental`), or D full MADE passes (``method="naive"``, the reference).

Conditional (``context_features=C``, p(x | c) with contexts [B, C]): the coupling MLPs read
``[x_kept, c]`` concatenated (as the first layer of nflows' ``ResidualNet`` reads it), the MADEs read c as
:class:`~fastdensity.nn.MADE` does (through the activation of the first layer and of every residual
block). The zero last layers keep the identity start for every context.

Every conditioner's last layer starts at zero weights with the biases of an identity spline (equal
bins, unit slopes at every knot), so the flow starts as ActNorm alone and the first steps are stable.
The logits are not divided by sqrt(hidden) (nflows' habit for a randomly initialised last layer):
with this start, that only slowed learning - measured on the checkerboard, KL gap 0.041 unscaled
against 0.077 scaled, same budget.
ActNorm standardises the data (data-dependent initialisation), so the bound is in standard
deviations. Images are flattened to vectors of D = C * H * W, as MAF does.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .. import nn as fnn
from ..nn.invertible_memory import check_memory, memory_option
from ..reference.spline import DEFAULT_MIN_DERIVATIVE
from .base import ContextMLP, at_least, check_shape, optional_context_features
from .multiscale import GaussianPrior, MADEFlowModel, MultiScaleFlow
from .realnvp import alternating_mask

__all__ = ["NSF"]

KINDS = ("coupling", "autoregressive")


def _start_as_identity(last: nn.Linear, num_bins: int) -> None:
    """Zero weights; biases giving every spline equal bins and slope 1 at each knot: y = x.

    ``last`` outputs [features * (3K - 1)] laid out feature-major (widths, heights, derivatives per
    feature). Softplus(c) + min_derivative = 1 gives the unit slopes."""
    unit_slope = math.log(math.expm1(1 - DEFAULT_MIN_DERIVATIVE))
    with torch.no_grad():
        last.weight.zero_()
        bias = last.bias.view(-1, 3 * num_bins - 1)
        bias.zero_()
        bias[:, 2 * num_bins:] = unit_slope


def _conditioner(in_features: int, out_features: int, hidden: int, num_hidden: int, num_bins: int,
                 dropout: float, context_features: Optional[int] = None) -> nn.Module:
    """``num_hidden`` x (Linear, ReLU[, Dropout]) then a Linear whose output starts every spline as y = x.

    With ``context_features`` C it is a :class:`~fastdensity.models.base.ContextMLP`:
    ``forward(x [B, in], context [B, C])`` reads ``[x, context]`` concatenated."""
    layers: list[nn.Module] = []
    width = in_features + (context_features or 0)
    for _ in range(num_hidden):
        layers += [nn.Linear(width, hidden), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        width = hidden
    last = nn.Linear(width, out_features)
    _start_as_identity(last, num_bins)
    return nn.Sequential(*layers, last) if context_features is None else ContextMLP(*layers, last)


class NSF(MADEFlowModel):
    """Neural spline flow on vectors ``shape=[D]`` (or images, flattened), coupling or autoregressive.

    Args:
        shape: per-example shape.
        kind: ``"coupling"`` (default) or ``"autoregressive"``.
        num_layers: spline layers (default 4 for coupling, 5 for autoregressive).
        hidden: conditioner width (default 128).
        num_hidden: coupling only: hidden layers of each coupling MLP (default 2).
        num_blocks: autoregressive only: residual blocks of each MADE (default 2, nflows').
        num_bins: K, bins per spline (default 8).
        tail_bound: B, the splines' half-interval after ActNorm (default 3 for coupling, 8 for
            autoregressive).
        actnorm: standardise the input with an ActNorm first (default True).
        dropout: dropout probability after the conditioners' hidden activations (the MADE's
            ``dropout_probability`` for autoregressive layers); default 0 for coupling, 0.1 for
            autoregressive.
        context_features: C, for a conditional model p(x | c) with contexts [B, C] (module docstring).
        memory: ``"store"`` (default) or, for ``kind="coupling"``, ``"invert"``: backward rebuilds each
            layer's input from its output instead of storing the conditioners' activations
            (:mod:`fastdensity.nn.invertible_memory`); the same gradients. The autoregressive kind refuses
            ``"invert"`` (ValueError): its inverse is sequential (D dependent steps per layer, even
            incrementally), so rebuilding in backward would cost many times the stored forward, and the
            inverting stack would store those layers anyway.

    The defaults are the settings measured best on this project's CPU budgets (``fastdensity train``'s
    3000 steps on the 2-D densities, 2000 on digits): coupling for the 2-D densities; autoregressive
    for digits, where dequantized logit pixels reach far past 3 standard deviations (bound 8 measured
    better than 5 and 3) and 1,437 training images call for dropout.

    Size-matched to peers (benchmarks/bench_models.py): ``NSF([D], kind="coupling", num_layers=L,
    hidden=H, num_hidden=2, num_bins=K, actnorm=False)`` has the architecture of L nflows
    ``PiecewiseRationalQuadraticCouplingTransform`` layers with an MLP D/2 -> H -> H -> D/2 (3K - 1)
    (the same parameter count) and the layers, widths and bins of zuko's ``NSF(D, transforms=L,
    hidden_features=(H, H), bins=K, passes=2)``, whose masked conditioner reads all D inputs.
    """

    name = "nsf"
    flatten = True

    def __init__(self, shape: Sequence[int], *, kind: str = "coupling", num_layers: Optional[int] = None,
                 hidden: Optional[int] = None, num_hidden: Optional[int] = None, num_blocks: Optional[int] = None,
                 num_bins: int = 8, tail_bound: Optional[float] = None, actnorm: bool = True,
                 dropout: Optional[float] = None, context_features: Optional[int] = None, memory: str = "store"):
        shape = check_shape("NSF", shape, (1, 3))
        if kind not in KINDS:
            raise ValueError(f"NSF kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
        coupling = kind == "coupling"
        wrong = "num_blocks" if coupling and num_blocks is not None else \
            "num_hidden" if not coupling and num_hidden is not None else None
        if wrong:
            raise ValueError(f"NSF: {wrong} applies to kind={'autoregressive' if coupling else 'coupling'!r} only")
        num_layers = at_least("num_layers", (4 if coupling else 5) if num_layers is None else num_layers, 1)
        hidden = at_least("hidden", 128 if hidden is None else hidden, 1)
        num_bins = at_least("num_bins", num_bins, 1)
        tail_bound = float((3.0 if coupling else 8.0) if tail_bound is None else tail_bound)
        if not 0 < tail_bound < math.inf:
            raise ValueError(f"tail_bound must be a positive finite number; got {tail_bound}")
        dropout = float((0.0 if coupling else 0.1) if dropout is None else dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1); got {dropout}")
        depth = {"num_hidden": at_least("num_hidden", 2 if num_hidden is None else num_hidden, 1)} if coupling else \
            {"num_blocks": at_least("num_blocks", 2 if num_blocks is None else num_blocks, 0)}
        context_features = optional_context_features(context_features)
        if check_memory(memory) == "invert" and not coupling:
            raise ValueError("NSF: memory='invert' applies to kind='coupling' only: the autoregressive layers invert "
                             "sequentially (D dependent steps per layer), so rebuilding their inputs in backward "
                             "would cost far more than storing them")
        super().__init__(shape, kind=kind, num_layers=num_layers, hidden=hidden, **depth, num_bins=num_bins,
                         tail_bound=tail_bound, actnorm=bool(actnorm), dropout=dropout,
                         context_features=context_features, **memory_option(memory))
        self.context_features = context_features
        d = self.dim
        if d < 2:
            raise ValueError(f"NSF needs at least 2 features; got shape {list(shape)}")
        transforms: list[fnn.Transform] = [fnn.ActNorm(d)] if actnorm else []
        spline = {"num_bins": num_bins, "tail_bound": tail_bound}
        for k in range(num_layers):
            if coupling:
                net = lambda i, o: _conditioner(i, o, hidden, depth["num_hidden"], num_bins, dropout,  # noqa: E731
                                                context_features)
                transforms.append(fnn.PiecewiseRationalQuadraticCoupling(alternating_mask(d, k), net, **spline,
                                                                         scale_logits=False))
            else:
                order = torch.arange(d) if k % 2 == 0 else torch.arange(d - 1, -1, -1)
                layer = fnn.MaskedPiecewiseRationalQuadraticAutoregressive(
                    d, hidden, context_features, num_blocks=depth["num_blocks"], dropout_probability=dropout,
                    ordering=order, **spline)
                _start_as_identity(layer.autoregressive_net.output_layer, num_bins)
                transforms.append(layer)
        self.flow = MultiScaleFlow([fnn.CompositeTransform(transforms, memory=memory)], [], GaussianPrior((d,)))
