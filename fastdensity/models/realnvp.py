"""RealNVP (Dinh et al., 2017): affine coupling flows, for vectors and (multi-scale) for images.

Vectors [B, D]::

    ActNorm -> num_layers x AffineCoupling(mask_k, MLP)       mask_k = features with (d + k) even stay
    log p(x) = log N(f(x); 0, I) + log |det df/dx|

(with ``context_features=C``, a conditional density p(x | c): each MLP reads [x_kept, c]).

Images [B, C, H, W], ``num_scales`` levels; every level but the last is

    3 x (ActNorm, CheckerboardCoupling)  ->  Squeeze  ->  3 x (ActNorm, channel AffineCoupling)  ->  factor out half

and the last level is 4 x (ActNorm, CheckerboardCoupling); factored-out parts and the top are scored by
N(0, I) (see :mod:`fastdensity.models.multiscale`). ActNorm (data-dependent initialisation) stands in
for the paper's batch normalisation: it is a fixed affine map at test time either way, and it does not
make the density of one example depend on the rest of its batch.

All couplings run on the fused ``fastdensity.ops.affine_coupling``; the scale is ``softclamp``
(s = exp(2 tanh(u / 2))): it can expand as well as contract, and with s(0) = 1 it lets the checkerboard
coupling pass its staying pixels through exactly. (The sigmoid scale of nflows/Glow only contracts,
and measured clearly worse on the 2-D densities.)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import nn as fnn
from ..nn.invertible_memory import memory_option
from .base import (ConvNet, at_least, check_scales, check_shape, halvings, mlp, optional_context_features,
                   reject_other_kind_options, vector_coupling_args)
from .multiscale import CheckerboardCoupling, FactorOut, FlowModel, GaussianPrior, MultiScaleFlow

__all__ = ["RealNVP"]


def alternating_mask(features: int, k: int) -> torch.Tensor:
    """1 (transformed) on features with (d + k) odd: consecutive couplings swap roles."""
    return ((torch.arange(features) + k) % 2).to(torch.int64)


def channel_mask(channels: int, k: int) -> torch.Tensor:
    """Transform the second half of the channels for even k, the first half for odd k."""
    half = channels // 2
    mask = torch.zeros(channels, dtype=torch.int64)
    if k % 2 == 0:
        mask[half:] = 1
    else:
        mask[:half] = 1
    return mask


class RealNVP(FlowModel):
    """RealNVP on vectors ``shape=[D]`` (D >= 2) or images ``shape=[C, H, W]``.

    Args:
        shape: per-example shape.
        num_layers: vectors: the number of couplings (default 12). Images: couplings per checkerboard or
            channel stage (default 3; the last level gets one more, as in the paper).
        hidden: width of the coupling networks (default 128 for vectors, 64 for images).
        num_hidden: vectors only: hidden layers per coupling MLP (default 2).
        num_blocks: images only: residual blocks per coupling conv net (default 1).
        num_scales: images only: the number of levels (default: up to 3, each but the last halving H and W,
            keeping at least 4 x 4 pixels).
        scale: the coupling's scale function, ``"softclamp"`` (default) or ``"exp"``; vectors may also
            use ``"sigmoid"``.
        actnorm: vectors only: standardise the input with an ActNorm first (default True).
        context_features: vectors only: C, for a conditional model p(x | c) with contexts [B, C]; every
            coupling MLP reads the context beside the part of x it conditions on.
        memory: ``"store"`` (default) or ``"invert"``: backward rebuilds each level's inputs from its output
            instead of storing its activations (:mod:`fastdensity.nn.invertible_memory`); the same
            gradients, activation memory per level independent of ``num_layers``.

    Size-matched to peers: ``RealNVP([D], num_layers=L, hidden=H, num_hidden=2, scale="sigmoid")`` has
    the couplings and parameter count of zuko's ``RealNVP(D, transforms=L, hidden_features=[H, H])``;
    with ``num_hidden=2k+1`` it has the parameter count of nflows' ``SimpleRealNVP(D, H, L,
    num_blocks_per_layer=k)`` (whose nets are residual); both plus one ActNorm (2D parameters) unless
    ``actnorm=False``, which gives exactly the peers' architecture.
    """

    name = "realnvp"

    def __init__(self, shape: Sequence[int], *, num_layers: Optional[int] = None, hidden: Optional[int] = None,
                 num_hidden: Optional[int] = None, num_blocks: Optional[int] = None,
                 num_scales: Optional[int] = None, scale: str = "softclamp", actnorm: Optional[bool] = None,
                 context_features: Optional[int] = None, memory: str = "store"):
        shape = check_shape("RealNVP", shape, (1, 3))
        image = len(shape) == 3
        reject_other_kind_options("RealNVP", image, num_hidden=num_hidden, num_blocks=num_blocks, num_scales=num_scales,
                                  actnorm=actnorm, context_features=context_features)
        num_layers = (3 if image else 12) if num_layers is None else int(num_layers)
        hidden = (64 if image else 128) if hidden is None else int(hidden)
        if num_layers < 1 or hidden < 1:
            raise ValueError(f"RealNVP needs num_layers >= 1 and hidden >= 1; got {num_layers}, {hidden}")
        if image:
            num_blocks = 1 if num_blocks is None else at_least("num_blocks", num_blocks, 0)
            # Each level but the last squeezes: by default as often as leaves at least 4 x 4 pixels, <= 3 levels.
            num_scales = 1 + halvings(shape, smallest=4, most=2) if num_scales is None else int(num_scales)
            check_scales("RealNVP", shape, num_scales, squeezes=num_scales - 1)
            if scale not in ("softclamp", "exp"):
                raise ValueError(f"RealNVP on images needs scale 'softclamp' or 'exp' (the checkerboard coupling "
                                 f"needs s(0) = 1); got {scale!r}")
            super().__init__(shape, num_layers=num_layers, hidden=hidden, num_blocks=num_blocks,
                             num_scales=num_scales, scale=scale, **memory_option(memory))
            self.flow = self._image_flow(shape, num_layers, hidden, num_blocks, num_scales, scale, memory)
        else:
            d, num_hidden = vector_coupling_args("RealNVP", shape, num_hidden)
            actnorm = True if actnorm is None else bool(actnorm)
            context_features = optional_context_features(context_features)
            super().__init__(shape, num_layers=num_layers, hidden=hidden, num_hidden=num_hidden, scale=scale,
                             actnorm=actnorm, context_features=context_features,
                             **memory_option(memory))
            self.context_features = context_features
            net = lambda i, o: mlp(i, o, hidden, num_hidden, context_features=context_features)  # noqa: E731
            transforms = [fnn.ActNorm(d)] if actnorm else []
            transforms += [fnn.AffineCoupling(alternating_mask(d, k), net, scale=scale) for k in range(num_layers)]
            # One level and no split: an ordinary flow, log N(f(x); 0, I) + log|det df/dx|.
            self.flow = MultiScaleFlow([fnn.CompositeTransform(transforms, memory=memory)], [], GaussianPrior((d,)))

    @staticmethod
    def _image_flow(shape, num_layers, hidden, num_blocks, num_scales, scale, memory):
        c, h, w = shape
        levels, splits = [], []
        for s in range(num_scales):
            last = s == num_scales - 1
            steps: list[fnn.Transform] = []
            for k in range(num_layers + (1 if last else 0)):
                net = ConvNet(c + 1, 2 * c, hidden, num_blocks)
                steps += [fnn.ActNorm(c), CheckerboardCoupling(c, parity=k % 2, net=net, scale=scale)]
            if not last:
                steps.append(fnn.Squeeze())
                c, h, w = 4 * c, h // 2, w // 2
                net = lambda i, o: ConvNet(i, o, hidden, num_blocks)  # noqa: E731
                for k in range(num_layers):
                    steps += [fnn.ActNorm(c), fnn.AffineCoupling(channel_mask(c, k), net, scale=scale)]
                splits.append(FactorOut((c, h, w), learned=False))
            levels.append(fnn.CompositeTransform(steps, memory=memory))
            if not last:
                c = splits[-1].keep
        return MultiScaleFlow(levels, splits, GaussianPrior((c, h, w), learned=False))
