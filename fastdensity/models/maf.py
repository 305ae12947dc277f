"""MAF (Papamakarios et al., 2017): stacked MADE affine autoregressive transforms.

One transform, with ``(t, u) = MADE(x)`` (output d depends only on x_<d in the MADE's order)::

    z_d = x_d * s(u_d) + t_d          log |det dz/dx| = sum_d log s(u_d)

The Jacobian is triangular, so the density costs one MADE pass per transform; sampling inverts
``x_d = (z_d - t_d(x_<d)) / s(u_d(x_<d))`` one feature at a time: D passes per transform. The MADE's
output is ``[B, D * 2]`` viewed as ``[B, D, 2]``: shift ``[:, :, 0]`` and unconstrained scale
``[:, :, 1]`` (nflows' layout) reach the fused ``fastdensity.ops.affine_coupling`` as strided views, no
copies. The model::

    ActNorm -> num_layers x MaskedAffineAutoregressive  ->  N(0, I)

with the MADEs' orderings alternating between natural and reversed (nflows' ReversePermutation between
transforms, folded into the masks so no data is permuted) or drawn at random. ActNorm standardises
the data once, with a data-dependent initialisation. Images are flattened to vectors of D = C * H * W.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import nn as fnn
from .. import ops
from .base import check_shape
from .multiscale import FlowModel, GaussianPrior, MultiScaleFlow

__all__ = ["MaskedAffineAutoregressive", "MAF"]


class MaskedAffineAutoregressive(fnn.Transform):
    """``z = x * s(u(x)) + t(x)`` with ``(t, u)`` from a MADE: one MAF transform on [B, D].

    Args:
        features: D.
        hidden_features: MADE width.
        num_hidden: hidden layers of the MADE (>= 1).
        scale: ``"softclamp"`` (default; s = exp(2 tanh(u / 2)), s(0) = 1), ``"sigmoid"`` (nflows':
            sigmoid(u + 2) + 1e-3) or ``"exp"``.
        ordering: the MADE's ordering: ``"sequential"``, ``"random"`` or a permutation tensor
            (``ordering[i]`` = position of feature i in the autoregressive order).

    The MADE's output layer starts at zero, so the transform starts as ``z = x * s(0)``.
    """

    def __init__(self, features: int, hidden_features: int, num_hidden: int = 2, scale: str = "softclamp",
                 ordering="sequential"):
        super().__init__()
        if scale not in ("softclamp", "sigmoid", "exp"):
            raise ValueError(f"scale must be 'softclamp', 'sigmoid' or 'exp'; got {scale!r}")
        if num_hidden < 1:
            raise ValueError(f"num_hidden must be >= 1; got {num_hidden}")
        self.features, self.scale = features, scale
        self.made = fnn.MADE(features, hidden_features, num_blocks=num_hidden - 1, output_multiplier=2,
                             ordering=ordering)
        nn.init.zeros_(self.made.output_layer.weight)
        nn.init.zeros_(self.made.output_layer.bias)

    def _params(self, x):
        p = self.made(x).view(x.shape[0], self.features, 2)
        return p[:, :, 0], p[:, :, 1]

    def forward(self, inputs, context=None):
        shift, scale_raw = self._params(inputs)
        return ops.affine_coupling(inputs, shift, scale_raw, scale=self.scale)

    def inverse(self, inputs, context=None):
        """D MADE passes (nflows' scheme): after pass k, the first k features in the MADE's order are
        exact, since each depends only on features before it; the last pass's parameters are exact for
        every feature, so its log-det is too."""
        x = torch.zeros_like(inputs)
        logdet = None
        for _ in range(self.features):
            shift, scale_raw = self._params(x)
            x, logdet = ops.affine_coupling(inputs, shift, scale_raw, scale=self.scale, inverse=True)
        return x, logdet


class MAF(FlowModel):
    """Masked autoregressive flow on vectors ``shape=[D]`` (or images, flattened).

    Args:
        shape: per-example shape.
        num_layers: MADE transforms (default 5).
        hidden: MADE width (default 128).
        num_hidden: hidden layers per MADE (default 2).
        scale: the transforms' scale function (see :class:`MaskedAffineAutoregressive`).
        permutation: how the variable order changes between transforms: ``"reverse"`` (default, as
            nflows' ReversePermutation and zuko's alternating orders) or ``"random"``.
        actnorm: standardise the input with an ActNorm first (default True).

    Size-matched to peers: ``MAF([D], num_layers=L, hidden=H, num_hidden=2, scale="sigmoid")`` has the
    transforms of nflows' ``MaskedAutoregressiveFlow(D, H, L, num_blocks_per_layer=1,
    use_residual_blocks=False)`` (its MADE: first layer + 1 block = 2 hidden layers) and of zuko's
    ``MAF(D, transforms=L, hidden_features=[H, H])``, plus one ActNorm unless ``actnorm=False``.
    """

    name = "maf"
    flatten = True

    def __init__(self, shape: Sequence[int], *, num_layers: int = 5, hidden: int = 128, num_hidden: int = 2,
                 scale: str = "softclamp", permutation: str = "reverse", actnorm: bool = True):
        shape = check_shape("MAF", shape, (1, 3))
        num_layers, hidden, num_hidden = int(num_layers), int(hidden), int(num_hidden)
        if num_layers < 1 or hidden < 1 or num_hidden < 1:
            raise ValueError(f"MAF needs num_layers, hidden and num_hidden >= 1; got {num_layers}, {hidden}, "
                             f"{num_hidden}")
        if permutation not in ("reverse", "random"):
            raise ValueError(f"permutation must be 'reverse' or 'random'; got {permutation!r}")
        super().__init__(shape, num_layers=num_layers, hidden=hidden, num_hidden=num_hidden, scale=scale,
                         permutation=permutation, actnorm=bool(actnorm))
        d = self.dim
        if d < 2:
            raise ValueError(f"MAF needs at least 2 features; got shape {list(shape)}")
        transforms: list[fnn.Transform] = [fnn.ActNorm(d)] if actnorm else []
        for k in range(num_layers):
            # The permutation between transforms lives in each MADE's ordering: the same model as a
            # permutation layer followed by a MADE in natural order, without moving any data.
            if permutation == "reverse":
                order = torch.arange(d) if k % 2 == 0 else torch.arange(d - 1, -1, -1)
            else:
                order = torch.randperm(d)
            transforms.append(MaskedAffineAutoregressive(d, hidden, num_hidden, scale, ordering=order))
        self.flow = MultiScaleFlow([fnn.CompositeTransform(transforms)], [], GaussianPrior((d,)))
