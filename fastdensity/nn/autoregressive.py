"""Masked affine autoregressive transforms (MAF, Papamakarios et al., 2017) on a MADE and the fused op.

One transform, with the MADE's output ``p = MADE(x, context)`` viewed as [B, D, 2]::

    t_d, u_d = shift and unconstrained scale of feature d          (functions of x_<d and the context)
    z_d      = x_d * s(u_d) + t_d                                  log |det dz/dx| = sum_d log s(u_d)

The Jacobian is triangular, so the density costs one MADE pass; the inverse solves
``x_d = (z_d - t_d) / s(u_d)`` one feature at a time: D MADE passes naively
(:meth:`~_AffineAutoregressive.inverse_by_passes`, what autograd differentiates), or by default about
one pass of arithmetic in D small steps, each hidden unit computed once
(:mod:`fastdensity.sampling.made_incremental`). Shift and scale reach the fused
:func:`fastdensity.ops.affine_coupling` as strided views of ``p``, no copies. Two flavours:

* :class:`MaskedAffineAutoregressive`, fastdensity's: ``t = p[..., 0]``, ``u = p[..., 1]``; s =
  exp(2 tanh(u / 2)) ("softclamp", s(0) = 1) by default; plain MADE with a zero-initialised output
  layer, so the transform starts as the identity; any ordering.
* :class:`MaskedAffineAutoregressiveTransform`, nflows' signature, defaults and layout: ``u = p[..., 0]``,
  ``t = p[..., 1]``, s = softplus(u) + 1e-3, residual MADE blocks, nflows' initialisation; equal to
  nflows' layer to float64 round-off once weights are copied across.

Context: a transform built with ``context_features`` feeds the context to its MADE (see
:mod:`fastdensity.nn.made` for where it enters) and needs one; a transform built without refuses one.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .. import ops
from ..reference.coupling import SOFTPLUS_EPS
from .base import Transform, check_context
from .made import MADE

__all__ = ["MaskedAffineAutoregressive", "MaskedAffineAutoregressiveTransform", "softplus_affine", "AFFINE_SCALES"]

#: the scale functions of the autoregressive transforms: the fused op's, and nflows' MAF scale
AFFINE_SCALES = ("softclamp", "sigmoid", "exp", "softplus")


def softplus_affine(x: torch.Tensor, shift: torch.Tensor, scale_raw: torch.Tensor, inverse: bool = False):
    """nflows' MAF step ``y = x * s + shift`` with ``s = softplus(u) + 1e-3`` (:data:`SOFTPLUS_EPS`) and
    log-det sum log s: the fused op's "softplus" scale, one pass over x, shift and u."""
    return ops.affine_coupling(x, shift, scale_raw, scale="softplus", inverse=inverse)


def affine_step(x, shift, scale_raw, scale: str, inverse: bool):
    """``(y, logdet)`` of ``y = x * s(u) + shift`` (or its inverse) for a name in :data:`AFFINE_SCALES`,
    every one of them a scale of the fused op."""
    return ops.affine_coupling(x, shift, scale_raw, scale=scale, inverse=inverse)


class _AffineAutoregressive(Transform):
    """The transform around a MADE with output multiplier 2; subclasses build the MADE and choose the
    layout (which of the two parameters per feature is the shift)."""

    shift_index, scale_index = 0, 1

    def __init__(self, made: MADE, scale: str):
        super().__init__()
        if scale not in AFFINE_SCALES:
            raise ValueError(f"scale must be one of {', '.join(map(repr, AFFINE_SCALES))}; got {scale!r}")
        self.features, self.scale = made.features, scale
        self.made = made

    @property
    def conditional(self) -> bool:
        return self.made.context_features is not None

    def _params(self, x, context):
        p = self.made(x, context).view(x.shape[0], self.features, 2)
        return p[:, :, self.shift_index], p[:, :, self.scale_index]

    def _check(self, inputs, context):
        if inputs.dim() != 2 or inputs.shape[1] != self.features:
            raise ValueError(f"{type(self).__name__}: inputs must be [B, {self.features}]; got {tuple(inputs.shape)}")
        check_context(inputs, context, type(self).__name__)
        if context is not None and not self.conditional:
            raise ValueError(f"{type(self).__name__} was built without context_features: it takes no context")
        if context is None and self.conditional:
            raise ValueError(f"{type(self).__name__} was built with context_features="
                             f"{self.made.context_features}: it needs a context [B, {self.made.context_features}]")

    def forward(self, inputs, context=None):
        self._check(inputs, context)
        shift, scale_raw = self._params(inputs, context)
        return affine_step(inputs, shift, scale_raw, self.scale, inverse=False)

    def inverse(self, inputs, context=None):
        """``(x, logabsdet)`` with ``forward(x) = inputs``: the incremental MADE inversion (each hidden
        unit computed once, :mod:`fastdensity.sampling.made_incremental`) when no graph is needed and the
        MADE is in a mode it supports, else :meth:`inverse_by_passes`; both give the same result to
        round-off. ``fastdensity.sampling.autoregressive_method(module, "naive")`` forces the passes."""
        from ..sampling import autoregressive_inverse

        self._check(inputs, context)
        return autoregressive_inverse(self, inputs, context, self.inverse_by_passes)

    def inverse_by_passes(self, inputs, context=None):
        """D MADE passes (nflows' scheme): after pass k, the first k features in the MADE's order are
        exact, since each depends only on features before it; the last pass's parameters are exact for
        every feature, so its log-det is too. Differentiable (autograd sees every pass)."""
        self._check(inputs, context)
        x = torch.zeros_like(inputs)
        logdet = None
        for _ in range(self.features):
            shift, scale_raw = self._params(x, context)
            x, logdet = affine_step(inputs, shift, scale_raw, self.scale, inverse=True)
        return x, logdet


class MaskedAffineAutoregressive(_AffineAutoregressive):
    """``z = x * s(u(x, c)) + t(x, c)`` with ``(t, u)`` from a MADE: one MAF transform on [B, D].

    Args:
        features: D.
        hidden_features: MADE width.
        num_hidden: hidden layers of the MADE (>= 1; odd with ``use_residual_blocks``: the first layer
            and two per residual block).
        scale: ``"softclamp"`` (default; s = exp(2 tanh(u / 2)), s(0) = 1), ``"sigmoid"``
            (sigmoid(u + 2) + 1e-3, nflows' coupling scale), ``"exp"`` or ``"softplus"`` (nflows' MAF
            scale, softplus(u) + 1e-3).
        ordering: the MADE's ordering: ``"sequential"``, ``"random"`` or a permutation tensor
            (``ordering[i]`` = position of feature i in the autoregressive order).
        context_features: width of the context [B, C] fed to the MADE; None for an unconditional layer.
        use_residual_blocks, random_mask, activation, dropout_probability, use_batch_norm: the MADE's
            (:class:`~fastdensity.nn.MADE`), as nflows'.

    Layout: shift ``p[..., 0]``, unconstrained scale ``p[..., 1]`` of the MADE output viewed [B, D, 2].
    The MADE's output layer (and its context input) starts at zero, so the transform starts as
    ``z = x * s(0)`` for every context.
    """

    def __init__(self, features: int, hidden_features: int, num_hidden: int = 2, scale: str = "softclamp",
                 ordering="sequential", *, context_features: int | None = None, use_residual_blocks: bool = False,
                 random_mask: bool = False, activation: Callable = F.relu, dropout_probability: float = 0.0,
                 use_batch_norm: bool = False):
        if isinstance(num_hidden, bool) or not isinstance(num_hidden, int) or num_hidden < 1:
            raise ValueError(f"num_hidden must be an integer >= 1; got {num_hidden!r}")
        if use_residual_blocks and num_hidden % 2 == 0:
            raise ValueError(f"with use_residual_blocks, num_hidden counts the first layer and two per residual "
                             f"block, so it must be odd (3 = one block); got {num_hidden}")
        blocks = (num_hidden - 1) // 2 if use_residual_blocks else num_hidden - 1
        made = MADE(features, hidden_features, num_blocks=blocks, output_multiplier=2,
                    context_features=context_features, ordering=ordering, use_residual_blocks=use_residual_blocks,
                    random_mask=random_mask, activation=activation, dropout_probability=dropout_probability,
                    use_batch_norm=use_batch_norm)
        super().__init__(made, scale)
        # Zero output: the transform starts as z = x * s(0), whatever the context. (The plain MADE also
        # feeds the context to the output layer: those rows of its context map start at zero too.)
        with torch.no_grad():
            for tensor in (self.made.output_layer.weight, self.made.output_layer.bias):
                tensor.zero_()
            if made.context_layer is not None and not made.use_residual_blocks:
                out = made.output_layer.out_features
                made.context_layer.weight[-out:].zero_()
                made.context_layer.bias[-out:].zero_()


class MaskedAffineAutoregressiveTransform(_AffineAutoregressive):
    """nflows' ``MaskedAffineAutoregressiveTransform``: the same signature, defaults and parameter layout.

    ``z = x * (softplus(u) + 1e-3) + t`` with ``u = p[..., 0]`` and ``t = p[..., 1]`` from a MADE in
    natural order; nflows' residual blocks by default, nflows' initialisation (no zero output layer).
    Arguments as nflows'; ``num_blocks`` counts the blocks after the MADE's first layer.
    """

    shift_index, scale_index = 1, 0

    def __init__(self, features: int, hidden_features: int, context_features: int | None = None,
                 num_blocks: int = 2, use_residual_blocks: bool = True, random_mask: bool = False,
                 activation: Callable = F.relu, dropout_probability: float = 0.0, use_batch_norm: bool = False):
        made = MADE(features, hidden_features, num_blocks=num_blocks, output_multiplier=2,
                    context_features=context_features, use_residual_blocks=use_residual_blocks,
                    random_mask=random_mask, activation=activation, dropout_probability=dropout_probability,
                    use_batch_norm=use_batch_norm)
        super().__init__(made, "softplus")
