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

No residual blocks: ``num_blocks`` plain masked layers follow the first, with ReLU after each (nflows'
``use_residual_blocks=False``). Context, when given, enters every layer, the output layer included,
through an unmasked linear map added to the pre-activation: it may influence every output without
touching the autoregressive structure. (All layers' context terms come from one ``nn.Linear`` whose
output is split, one matmul instead of ``num_blocks + 2``.)
"""
from __future__ import annotations

from typing import Union

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


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation, on tile-skipping masked linear layers.

    Args:
        features: D, the number of autoregressive inputs.
        hidden_features: H, width of every hidden layer.
        num_blocks: masked hidden-to-hidden layers after the first hidden layer (ReLU after each).
        output_multiplier: m, parameters per feature; the output has D * m columns.
        context_features: width of an optional conditioning input, fed unmasked to every layer.
        ordering: ``"sequential"`` (feature i is the i-th generated), ``"random"`` (a random
            permutation of the features and random hidden degrees), or a tensor (or list): a permutation of
            0..D-1 where ``ordering[i]`` is the position of feature i in the autoregressive order.
        seed: for ``"random"``: seed of the private generator that draws ordering and degrees. None
            draws the seed from PyTorch's global generator, so ``torch.manual_seed`` reproduces it.
            Either way the draw is stored in buffers (``state_dict``), so a saved model reloads it.

    Shapes: ``forward(inputs [..., D], context [..., C] or None) -> [..., D * m]``; reshape with
    ``.view(B, D, m)``: ``[:, d, :]`` depends only on the inputs i with ``ordering[i] < ordering[d]``.

    Attributes (buffers, for samplers such as MAF's inverse):
        ordering: [D] long, position of each feature in the autoregressive order (0-based).
        degrees: [D] long, ``ordering + 1``, the input degrees in nflows' convention.
        hidden_degrees: [num_blocks + 1, H] long, degrees of the hidden units of each layer.
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
        seed: int | None = None,
    ):
        super().__init__()
        D = _check_positive("features", features)
        H = _check_positive("hidden_features", hidden_features)
        _check_positive("num_blocks", num_blocks, minimum=0)
        m = _check_positive("output_multiplier", output_multiplier)
        if context_features is not None:
            _check_positive("context_features", context_features)
        self.features, self.hidden_features, self.num_blocks = D, H, num_blocks
        self.output_multiplier, self.context_features = m, context_features

        if seed is not None and not (isinstance(ordering, str) and ordering == "random"):
            raise ValueError(f"seed is only used with ordering='random'; got ordering={ordering!r}")
        generator = None
        if isinstance(ordering, str):
            if ordering == "sequential":
                order = torch.arange(D)
            elif ordering == "random":
                if seed is None:
                    seed = int(torch.randint(0, 2**62, (1,)).item())
                generator = torch.Generator().manual_seed(int(seed))
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
        self.hidden_layers = nn.ModuleList(
            MaskedLinear(H, H, hidden[i + 1][:, None] >= hidden[i][None, :]) for i in range(num_blocks))
        self.output_layer = MaskedLinear(H, D * m, out_degrees[:, None] > hidden[-1][None, :])
        self._context_widths = [H] * (num_blocks + 1) + [D * m]
        self.context_layer = nn.Linear(context_features, sum(self._context_widths)) if context_features else None

    @property
    def generation_order(self) -> torch.Tensor:
        """[D]: feature indices in the order a sampler must generate them (``argsort(ordering)``)."""
        return torch.argsort(self.ordering)

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """[..., D] (and context [..., C]) -> [..., D * m] autoregressive parameters."""
        if inputs.shape[-1:] != (self.features,):
            raise ValueError(f"inputs must have shape [..., features={self.features}]; got {tuple(inputs.shape)}")
        if self.context_layer is None:
            if context is not None:
                raise ValueError("context was given but this MADE was built with context_features=None")
            terms = [None] * len(self._context_widths)
        else:
            if context is None or context.shape[-1:] != (self.context_features,):
                got = None if context is None else tuple(context.shape)
                raise ValueError(f"context must have shape [..., context_features={self.context_features}]; got {got}")
            terms = list(self.context_layer(context).split(self._context_widths, dim=-1))

        h = F.relu(_add(self.input_layer(inputs), terms[0]))
        for layer, term in zip(self.hidden_layers, terms[1:-1]):
            h = F.relu(_add(layer(h), term))
        return _add(self.output_layer(h), terms[-1])

    def extra_repr(self) -> str:
        return (f"features={self.features}, hidden_features={self.hidden_features}, num_blocks={self.num_blocks}, "
                f"output_multiplier={self.output_multiplier}, context_features={self.context_features}")
