"""MADE (Germain et al., 2015): an MLP whose masks make output d depend only on inputs before d.

Degrees, as in nflows (``nflows.transforms.made``):

    input i        deg_in(i) = ordering[i] + 1                       in 1..D
    hidden unit k  sequential: k % max(1, D-1) + min(1, D-1)          cycles through 1..D-1
                   random: uniform in [min(previous layer), D-1]     (nflows' random_mask)
    output (d, r)  deg_out = deg_in(d), r = 0..m-1                   laid out [d0 x m, d1 x m, ...]

    hidden <- input/hidden:  connected when deg(unit) >= deg(source)
    output <- hidden:        connected when deg_out   >  deg(hidden)

so output d sees exactly the inputs that come before d in the ordering, and ``out.view(B, D, m)``
gives the m parameters of feature d at ``[:, d, :]`` in the natural feature order.

One change from nflows: each hidden layer's degrees are *sorted*. Hidden units are interchangeable,
so this is the same model up to a permutation of hidden units (same multiset of degrees, same
connectivity), but it makes the hidden-to-hidden masks block-triangular: about half of their tiles
are zero and :func:`fastdensity.ops.masked_linear` skips them.

Two block structures (``a`` = ``activation``, ReLU by default; ``c`` = context):

    plain (default; nflows' use_residual_blocks=False)
        h_0 = a(W_0 x + U_0 c)                   h_i = dropout(a(W_i bn_i(h_{i-1}) + U_i c))
        out = W_out h + U_out c
    residual (use_residual_blocks=True; nflows' default, nflows' function exactly)
        h_0 = W_0 x + a(U_0 c)                   h_i = h_{i-1} + W_i'' dropout(a(bn_i'(W_i' a(bn_i(h_{i-1})) + U_i c)))
        out = W_out h

where ``bn`` (BatchNorm1d, eps 1e-3) appears only with ``use_batch_norm`` and every ``U c`` only with
``context_features``. In the plain structure the context enters every layer, the output layer
included, through an unmasked linear map (one ``nn.Linear`` whose output is split: one matmul
instead of ``num_blocks + 2``), so every output - the first feature's too - depends on it. nflows'
plain MADE feeds it to the first layer only, through the activation; the residual structure here
follows nflows exactly (first layer and each block, not the output layer: the first feature's
parameters do not depend on the context, and a conditional base such as
:class:`~fastdensity.ConditionalDiagonalNormal` or a later reversed ordering gives it one), so that
nflows' weights carry across, hidden units permuted into sorted order.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from .masked_linear import MaskedLinear

__all__ = ["MADE"]


def _check_positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def _add(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return a if b is None else a + b


def _permutation(ordering, features: int) -> torch.Tensor:
    """An ordering tensor checked to be a permutation of 0..D-1, as a CPU long tensor."""
    order = torch.as_tensor(ordering)
    integer = not (order.dtype.is_floating_point or order.dtype.is_complex or order.dtype == torch.bool)
    if not integer or order.shape != (features,) or \
            not torch.equal(order.sort().values.cpu().long(), torch.arange(features)):
        shown = order.tolist() if order.numel() <= 16 else "..."
        raise ValueError(f"ordering tensor must be a permutation of 0..{features - 1} (integer, shape [{features}]); "
                         f"got {order.dtype} of shape {tuple(order.shape)}: {shown}")
    return order.cpu().long()


def _sequential_hidden_degrees(hidden: int, features: int) -> torch.Tensor:
    """nflows' cycling degrees 1, 2, ..., D-1, 1, 2, ... (all 0 when D = 1: hidden units see nothing)."""
    return torch.arange(hidden) % max(1, features - 1) + min(1, features - 1)


def _random_hidden_degrees(hidden: int, features: int, low: int, generator: torch.Generator) -> torch.Tensor:
    """nflows' random_mask degrees: uniform integers in [min(low, D-1), D-1]."""
    low = min(low, features - 1)
    return torch.randint(low, features, (hidden,), generator=generator)


def _batch_norm(norm: nn.BatchNorm1d | None, h: torch.Tensor) -> torch.Tensor:
    """BatchNorm1d over the last dim of [..., H] (leading dims flattened into the batch)."""
    if norm is None:
        return h
    return norm(h.reshape(-1, h.shape[-1])).view(h.shape)


class _ResidualBlock(nn.Module):
    """``h + W'' dropout(a(bn'(W' a(bn(h)) + U c)))`` with both masks ``deg >= deg`` (nflows'
    MaskedResidualBlock; its last layer starts near zero, uniform in +-1e-3, as there)."""

    def __init__(self, mask: torch.Tensor, context_features: int | None, activation: Callable,
                 dropout_probability: float, use_batch_norm: bool):
        super().__init__()
        width = mask.shape[0]
        self.context_layer = nn.Linear(context_features, width) if context_features else None
        self.batch_norm_layers = (nn.ModuleList(nn.BatchNorm1d(width, eps=1e-3) for _ in range(2))
                                  if use_batch_norm else None)
        self.linear_layers = nn.ModuleList(MaskedLinear(width, width, mask) for _ in range(2))
        self.activation = activation
        self.dropout = nn.Dropout(dropout_probability) if dropout_probability > 0 else None
        nn.init.uniform_(self.linear_layers[1].weight, -1e-3, 1e-3)
        nn.init.uniform_(self.linear_layers[1].bias, -1e-3, 1e-3)

    def _norm(self, i: int):
        return None if self.batch_norm_layers is None else self.batch_norm_layers[i]

    def forward(self, h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        t = self.linear_layers[0](self.activation(_batch_norm(self._norm(0), h)))
        if self.context_layer is not None:
            t = t + self.context_layer(context)
        t = self.activation(_batch_norm(self._norm(1), t))
        if self.dropout is not None:
            t = self.dropout(t)
        return h + self.linear_layers[1](t)


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation, on tile-skipping masked linear layers.

    Args:
        features: D, the number of autoregressive inputs.
        hidden_features: H, width of every hidden layer.
        num_blocks: blocks after the first hidden layer: plain masked layers (ReLU after each) or, with
            ``use_residual_blocks``, residual blocks of two masked layers each (as nflows).
        output_multiplier: m, parameters per feature; the output has D * m columns.
        context_features: width of an optional conditioning input (see the module docstring for where
            it enters). A MADE built with it needs a context; one built without refuses one.
        ordering: ``"sequential"`` (feature i is the i-th generated), ``"random"`` (a random
            permutation of the features and random hidden degrees), or a tensor (or list): a permutation of
            0..D-1 where ``ordering[i]`` is the position of feature i in the autoregressive order.
        use_residual_blocks: nflows' residual structure (module docstring). Needs non-random degrees.
        random_mask: draw the hidden degrees at random (nflows' ``random_mask``) whatever the ordering.
        activation: the nonlinearity, a function (``torch.nn.functional.relu`` by default, as nflows).
        dropout_probability: dropout after each block's last activation (as nflows), 0 for none.
        use_batch_norm: BatchNorm1d inside each block, as nflows (it makes a sample's output depend on
            its batch in training mode).
        seed: for random degrees: seed of the private generator that draws ordering and degrees. None
            draws the seed from PyTorch's global generator, so ``torch.manual_seed`` reproduces it.
            Either way the draw is stored in buffers (``state_dict``), so a saved model reloads it.

    Shapes: ``forward(inputs [..., D], context [..., C] or None) -> [..., D * m]``; reshape with
    ``.view(B, D, m)``: ``[:, d, :]`` depends only on the inputs i with ``ordering[i] < ordering[d]``.
    The context must have the inputs' leading dims.

    Attributes (buffers, for samplers such as MAF's inverse):
        ordering: [D] long, position of each feature in the autoregressive order (0-based).
        degrees: [D] long, ``ordering + 1``, the input degrees in nflows' convention.
        hidden_degrees: [num_blocks + 1, H] long, degrees of the hidden units after the first layer and
            after each block.
        output_degrees: [D * m] long, ``degrees.repeat_interleave(m)``.
        generation_order (property): [D], the features in the order they must be sampled.
    """

    ordering: torch.Tensor
    degrees: torch.Tensor
    hidden_degrees: torch.Tensor
    output_degrees: torch.Tensor

    def __init__(
        self,
        features: int,
        hidden_features: int,
        num_blocks: int = 2,
        output_multiplier: int = 1,
        context_features: int | None = None,
        ordering: Union[str, torch.Tensor] = "sequential",
        *,
        use_residual_blocks: bool = False,
        random_mask: bool = False,
        activation: Callable[[torch.Tensor], torch.Tensor] = F.relu,
        dropout_probability: float = 0.0,
        use_batch_norm: bool = False,
        seed: int | None = None,
    ):
        super().__init__()
        D = _check_positive("features", features)
        H = _check_positive("hidden_features", hidden_features)
        _check_positive("num_blocks", num_blocks, minimum=0)
        m = _check_positive("output_multiplier", output_multiplier)
        if context_features is not None:
            _check_positive("context_features", context_features)
        if not 0.0 <= float(dropout_probability) < 1.0:
            raise ValueError(f"dropout_probability must lie in [0, 1); got {dropout_probability!r}")
        if not callable(activation):
            raise ValueError(f"activation must be a function such as torch.nn.functional.relu; got {activation!r}")
        self.features, self.hidden_features, self.num_blocks = D, H, num_blocks
        self.output_multiplier, self.context_features = m, context_features
        self.use_residual_blocks = bool(use_residual_blocks)
        self.activation = activation

        random_ordering = isinstance(ordering, str) and ordering == "random"
        random_degrees = random_ordering or bool(random_mask)
        if self.use_residual_blocks and random_degrees:
            raise ValueError("use_residual_blocks needs the same degrees in both layers of a block, so it cannot "
                             "use random degrees (random_mask=True or ordering='random'); pass an explicit "
                             "permutation as ordering for a random order")
        if seed is not None and not random_degrees:
            raise ValueError(f"seed is only used with random degrees (ordering='random' or random_mask=True); "
                             f"got ordering={ordering!r}")
        generator = None
        if random_degrees:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator().manual_seed(int(seed))
        if isinstance(ordering, str):
            if ordering == "sequential":
                order = torch.arange(D)
            elif random_ordering:
                order = torch.randperm(D, generator=generator)
            else:
                raise ValueError(f"ordering must be 'sequential', 'random' or a permutation tensor; got {ordering!r}")
        else:
            order = _permutation(ordering, D)

        in_degrees = order + 1
        hidden = []
        previous = in_degrees
        for _ in range(num_blocks + 1):
            if generator is None:
                deg = _sequential_hidden_degrees(H, D)
            else:
                deg = _random_hidden_degrees(H, D, int(previous.min()), generator)
            hidden.append(deg.sort().values)  # sorted: block-triangular hidden masks (see module doc)
            previous = hidden[-1]
        out_degrees = in_degrees.repeat_interleave(m)

        self.register_buffer("ordering", order)
        self.register_buffer("degrees", in_degrees)
        self.register_buffer("hidden_degrees", torch.stack(hidden))
        self.register_buffer("output_degrees", out_degrees)

        self.input_layer = MaskedLinear(D, H, hidden[0][:, None] >= in_degrees[None, :])
        if self.use_residual_blocks:
            self.context_layer = nn.Linear(context_features, H) if context_features else None
            self.blocks = nn.ModuleList(
                _ResidualBlock(hidden[i][:, None] >= hidden[i][None, :], context_features, activation,
                               dropout_probability, use_batch_norm) for i in range(num_blocks))
        else:
            self.batch_norms = (nn.ModuleList(nn.BatchNorm1d(H, eps=1e-3) for _ in range(num_blocks))
                                if use_batch_norm else None)
            self.hidden_layers = nn.ModuleList(
                MaskedLinear(H, H, hidden[i + 1][:, None] >= hidden[i][None, :]) for i in range(num_blocks))
            self._context_widths = [H] * (num_blocks + 1) + [D * m]
            self.context_layer = nn.Linear(context_features, sum(self._context_widths)) if context_features else None
            self.dropout = nn.Dropout(dropout_probability) if dropout_probability > 0 else None
        self.output_layer = MaskedLinear(H, D * m, out_degrees[:, None] > hidden[-1][None, :])

    @property
    def generation_order(self) -> torch.Tensor:
        """[D]: feature indices in the order a sampler must generate them (``argsort(ordering)``)."""
        return torch.argsort(self.ordering)

    def _check(self, inputs, context):
        if inputs.shape[-1:] != (self.features,):
            raise ValueError(f"inputs must have shape [..., features={self.features}]; got {tuple(inputs.shape)}")
        if self.context_features is None:
            if context is not None:
                raise ValueError("context was given but this MADE was built with context_features=None")
            return
        if context is None or context.shape[-1:] != (self.context_features,):
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"context must have shape [..., context_features={self.context_features}]; got {got}")
        if context.shape[:-1] != inputs.shape[:-1]:
            raise ValueError(f"context must have the inputs' leading dims {tuple(inputs.shape[:-1])} (one row per "
                             f"input row); got shape {tuple(context.shape)}")

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """[..., D] (and context [..., C]) -> [..., D * m] autoregressive parameters."""
        self._check(inputs, context)
        if self.use_residual_blocks:
            h = self.input_layer(inputs)
            if self.context_layer is not None:
                h = h + self.activation(self.context_layer(context))
            for block in self.blocks:
                h = block(h, context)
            return self.output_layer(h)

        terms = self.context_terms(context)
        h = self.activation(_add(self.input_layer(inputs), terms[0]))
        for i, (layer, term) in enumerate(zip(self.hidden_layers, terms[1:-1])):
            norm = None if self.batch_norms is None else self.batch_norms[i]
            h = self.activation(_add(layer(_batch_norm(norm, h)), term))
            if self.dropout is not None:
                h = self.dropout(h)
        return _add(self.output_layer(h), terms[-1])

    def context_terms(self, context: torch.Tensor | None) -> list:
        """The plain structure's context contributions U_l c: one [..., width] term per layer and one for
        the output, each None when the MADE takes no context (the incremental sampler reads them too)."""
        if self.context_layer is None:
            return [None] * len(self._context_widths)
        return list(self.context_layer(context).split(self._context_widths, dim=-1))

    def extra_repr(self) -> str:
        return (f"features={self.features}, hidden_features={self.hidden_features}, num_blocks={self.num_blocks}, "
                f"output_multiplier={self.output_multiplier}, context_features={self.context_features}, "
                f"use_residual_blocks={self.use_residual_blocks}")
