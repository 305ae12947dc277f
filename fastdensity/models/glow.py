"""Glow (Kingma & Dhariwal, 2018): steps of ActNorm -> invertible 1x1 conv -> affine coupling.

Images [B, C, H, W], ``num_scales`` levels, each::

    Squeeze -> num_steps x (ActNorm, InvConv1x1, AffineCoupling(second half | first half))
            -> split: half the channels factored out under a learned prior N(mu(h), sigma(h)^2)

with mu, log sigma from a zero-initialised 3x3 convolution of the kept half, and a learned diagonal
Gaussian at the top (see :mod:`fastdensity.models.multiscale`). The coupling networks are
3x3 conv -> residual block(s) -> zero-initialised 3x3 conv, and the scale is Glow's
``sigmoid(u + 2) + 1e-3`` (the fused op's "sigmoid").

Vectors [B, D]: the same steps with MLP couplings (the 1x1 convolution becomes a learned invertible
D x D matrix) and a learned diagonal Gaussian base; no multi-scale. With ``context_features=C`` the
coupling MLPs also read the context: a conditional density p(x | c).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import nn as fnn
from ..nn.invertible_memory import memory_option
from .base import (ConvNet, at_least, check_scales, check_shape, halvings, mlp, optional_context_features,
                   reject_other_kind_options, vector_coupling_args)
from .multiscale import FactorOut, FlowModel, GaussianPrior, MultiScaleFlow

__all__ = ["Glow"]


def _half_mask(channels: int) -> torch.Tensor:
    """Transform the second half of the channels, condition on the first (Glow's split)."""
    mask = torch.zeros(channels, dtype=torch.int64)
    mask[channels // 2:] = 1
    return mask


class Glow(FlowModel):
    """Glow on images ``shape=[C, H, W]`` (multi-scale) or vectors ``shape=[D]``.

    Args:
        shape: per-example shape.
        num_steps: flow steps per level (images, default 4) or in total (vectors, default 8).
        hidden: width of the coupling networks (default 64 for images, 128 for vectors).
        num_hidden: vectors only: hidden layers per coupling MLP (default 2).
        num_blocks: images only: residual blocks per coupling conv net (default 1).
        num_scales: images only: levels, each starting with a squeeze, so H and W must be divisible by
            2^num_scales (default: as many as leave at least 2 x 2 pixels, at most 3).
        scale: coupling scale function, ``"sigmoid"`` (Glow's, default), ``"softclamp"`` or ``"exp"``.
        context_features: vectors only: C, for a conditional model p(x | c) with contexts [B, C]; every
            coupling MLP reads the context (ActNorm and the 1x1 convolutions do not depend on it).
        memory: ``"store"`` (default) or ``"invert"``: backward rebuilds each level's inputs from its output
            instead of storing its activations (:mod:`fastdensity.nn.invertible_memory`); the same
            gradients, activation memory per level independent of ``num_steps``.
    """

    name = "glow"

    def __init__(self, shape: Sequence[int], *, num_steps: Optional[int] = None, hidden: Optional[int] = None,
                 num_hidden: Optional[int] = None, num_blocks: Optional[int] = None,
                 num_scales: Optional[int] = None, scale: str = "sigmoid", context_features: Optional[int] = None,
                 memory: str = "store"):
        shape = check_shape("Glow", shape, (1, 3))
        image = len(shape) == 3
        reject_other_kind_options("Glow", image, num_hidden=num_hidden, num_blocks=num_blocks, num_scales=num_scales,
                                  context_features=context_features)
        num_steps = (4 if image else 8) if num_steps is None else int(num_steps)
        hidden = (64 if image else 128) if hidden is None else int(hidden)
        if num_steps < 1 or hidden < 1:
            raise ValueError(f"Glow needs num_steps >= 1 and hidden >= 1; got {num_steps}, {hidden}")
        if image:
            num_blocks = 1 if num_blocks is None else at_least("num_blocks", num_blocks, 0)
            # Every level squeezes: by default as often as leaves at least 2 x 2 pixels, 1 to 3 levels.
            num_scales = max(1, halvings(shape, smallest=2, most=3)) if num_scales is None else int(num_scales)
            check_scales("Glow", shape, num_scales, squeezes=num_scales)
            super().__init__(shape, num_steps=num_steps, hidden=hidden, num_blocks=num_blocks,
                             num_scales=num_scales, scale=scale, **memory_option(memory))
            self.flow = self._image_flow(shape, num_steps, hidden, num_blocks, num_scales, scale, memory)
        else:
            d, num_hidden = vector_coupling_args("Glow", shape, num_hidden)
            context_features = optional_context_features(context_features)
            super().__init__(shape, num_steps=num_steps, hidden=hidden, num_hidden=num_hidden, scale=scale,
                             context_features=context_features,
                             **memory_option(memory))
            self.context_features = context_features
            net = lambda i, o: mlp(i, o, hidden, num_hidden, context_features=context_features)  # noqa: E731
            steps: list[fnn.Transform] = []
            for _ in range(num_steps):
                steps += [fnn.ActNorm(d), fnn.InvConv1x1(d), fnn.AffineCoupling(_half_mask(d), net, scale=scale)]
            self.flow = MultiScaleFlow([fnn.CompositeTransform(steps, memory=memory)], [],
                                       GaussianPrior((d,), learned=True))

    @staticmethod
    def _image_flow(shape, num_steps, hidden, num_blocks, num_scales, scale, memory):
        c, h, w = shape
        levels, splits = [], []
        net = lambda i, o: ConvNet(i, o, hidden, num_blocks)  # noqa: E731
        for s in range(num_scales):
            c, h, w = 4 * c, h // 2, w // 2
            steps: list[fnn.Transform] = [fnn.Squeeze()]
            for _ in range(num_steps):
                steps += [fnn.ActNorm(c), fnn.InvConv1x1(c), fnn.AffineCoupling(_half_mask(c), net, scale=scale)]
            levels.append(fnn.CompositeTransform(steps, memory=memory))
            if s < num_scales - 1:
                splits.append(FactorOut((c, h, w), learned=True))
                c = splits[-1].keep
        return MultiScaleFlow(levels, splits, GaussianPrior((c, h, w), learned=True))
