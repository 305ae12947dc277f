"""MAF (Papamakarios et al., 2017): stacked MADE affine autoregressive transforms.

One transform (:class:`~fastdensity.nn.MaskedAffineAutoregressive`), with ``(t, u) = MADE(x, c)``
(output d depends only on x_<d in the MADE's order, and on the context c of a conditional model)::

    z_d = x_d * s(u_d) + t_d          log |det dz/dx| = sum_d log s(u_d)

The Jacobian is triangular, so the density costs one MADE pass per transform; sampling inverts
``x_d = (z_d - t_d(x_<d)) / s(u_d(x_<d))`` one feature at a time: D passes per transform naively
(``sample(method="naive")``), about one pass of arithmetic in D small steps by default
(``method="incremental"``, :mod:`fastdensity.sampling.made_incremental`). The MADE's
output ``[B, D * 2]`` is viewed as ``[B, D, 2]`` with the shift at ``[:, :, 0]`` and the unconstrained
scale at ``[:, :, 1]`` (fastdensity's layout; nflows' MAF has them the other way round, scale first,
and uses s = softplus(u) + 1e-3 - that layer is :class:`~fastdensity.nn.MaskedAffineAutoregressiveTransform`).
Both reach the fused ``fastdensity.ops.affine_coupling`` as strided views, no copies. The model::

    ActNorm -> num_layers x MaskedAffineAutoregressive  ->  N(0, I)

with the MADEs' orderings alternating between natural and reversed (nflows' ReversePermutation between
transforms, folded into the masks so no data is permuted) or drawn at random. ActNorm standardises
the data once, with a data-dependent initialisation. Images are flattened to vectors of D = C * H * W.
With ``context_features=C`` the model is a conditional density p(x | c): every MADE reads the context.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import nn as fnn
from ..nn.autoregressive import AFFINE_SCALES, MaskedAffineAutoregressive
from .base import check_shape, optional_context_features
from .multiscale import GaussianPrior, MADEFlowModel, MultiScaleFlow

__all__ = ["MaskedAffineAutoregressive", "MAF"]


class MAF(MADEFlowModel):
    """Masked autoregressive flow on vectors ``shape=[D]`` (or images, flattened).

    Args:
        shape: per-example shape.
        num_layers: MADE transforms (default 5).
        hidden: MADE width (default 128).
        num_hidden: hidden layers per MADE (default 2; with ``residual``, the first layer and two per
            residual block, so odd).
        scale: the transforms' scale function: ``"softclamp"`` (default), ``"sigmoid"``, ``"exp"`` or
            ``"softplus"`` (nflows' MAF scale); see :class:`~fastdensity.nn.MaskedAffineAutoregressive`.
        permutation: how the variable order changes between transforms: ``"reverse"`` (default, as
            nflows' ReversePermutation and zuko's alternating orders) or ``"random"``.
        actnorm: standardise the input with an ActNorm first (default True).
        context_features: C, for a conditional model p(x | c) with contexts [B, C].
        residual: nflows' residual MADE blocks (its default) instead of plain layers.
        dropout: dropout probability inside the MADEs (nflows' ``dropout_probability``).

    Size-matched to peers: ``MAF([D], num_layers=L, hidden=H, num_hidden=2)`` has the layer sizes and
    parameter count of nflows' ``MaskedAutoregressiveFlow(D, H, L, num_blocks_per_layer=1,
    use_residual_blocks=False)`` (its MADE: first layer + 1 block = 2 hidden layers) and of zuko's
    ``MAF(D, transforms=L, hidden_features=[H, H])``, plus one ActNorm unless ``actnorm=False``; with
    ``num_hidden=3, residual=True, scale="softplus"``, those of nflows' default (``num_blocks_per_layer=1``,
    residual blocks) and its scale function. The transforms keep fastdensity's layout (shift first) and
    zero-initialised output; :class:`~fastdensity.nn.MaskedAffineAutoregressiveTransform` is nflows' own.
    """

    name = "maf"
    flatten = True

    def __init__(self, shape: Sequence[int], *, num_layers: int = 5, hidden: int = 128, num_hidden: int = 2,
                 scale: str = "softclamp", permutation: str = "reverse", actnorm: bool = True,
                 context_features: int | None = None, residual: bool = False, dropout: float = 0.0):
        shape = check_shape("MAF", shape, (1, 3))
        num_layers, hidden, num_hidden = int(num_layers), int(hidden), int(num_hidden)
        if num_layers < 1 or hidden < 1 or num_hidden < 1:
            raise ValueError(f"MAF needs num_layers, hidden and num_hidden >= 1; got {num_layers}, {hidden}, "
                             f"{num_hidden}")
        if permutation not in ("reverse", "random"):
            raise ValueError(f"permutation must be 'reverse' or 'random'; got {permutation!r}")
        if scale not in AFFINE_SCALES:
            raise ValueError(f"scale must be one of {', '.join(map(repr, AFFINE_SCALES))}; got {scale!r}")
        context_features = optional_context_features(context_features)
        super().__init__(shape, num_layers=num_layers, hidden=hidden, num_hidden=num_hidden, scale=scale,
                         permutation=permutation, actnorm=bool(actnorm), context_features=context_features,
                         residual=bool(residual), dropout=float(dropout))
        self.context_features = context_features
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
            transforms.append(MaskedAffineAutoregressive(
                d, hidden, num_hidden, scale, ordering=order, context_features=context_features,
                use_residual_blocks=bool(residual), dropout_probability=float(dropout)))
        self.flow = MultiScaleFlow([fnn.CompositeTransform(transforms)], [], GaussianPrior((d,)))
