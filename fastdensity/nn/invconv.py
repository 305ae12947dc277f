"""Invertible 1x1 convolution (Glow), LU-parameterised so the log-det is a sum over a diagonal."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Transform, per_position_logdet, reject_context

__all__ = ["InvConv1x1"]


class InvConv1x1(Transform):
    """``z = W x`` over channels at every pixel, with ``W = P L (U + diag(sign * exp(log_abs_s)))``.

    ``P`` is a fixed permutation, ``L`` unit lower-triangular and ``U`` strictly upper-triangular
    (both learned), so ``log |det W| = sum(log_abs_s)`` and the log-det of the layer is
    ``H * W * sum(log_abs_s)`` (``sum(log_abs_s)`` for [B, C] inputs). Initialised from a random
    rotation, as in Glow. The inverse uses triangular solves, not a general matrix inverse.

    Inputs: [B, C] or [B, C, H, W] with C = ``num_channels``. Takes no context (``conditional = False``).
    """

    conditional = False

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels
        q, _ = torch.linalg.qr(torch.randn(num_channels, num_channels, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("permutation", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.lower = nn.Parameter(torch.tril(lower, -1).float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_abs_s = nn.Parameter(torch.log(torch.abs(s)).float())

    def _factors(self):
        eye = torch.eye(self.num_channels, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_abs_s))
        return lower, upper

    def weight(self) -> torch.Tensor:
        """The [C, C] matrix W."""
        lower, upper = self._factors()
        return self.permutation @ lower @ upper

    def inverse_weight(self) -> torch.Tensor:
        """W^-1 = U^-1 L^-1 P^T by two triangular solves."""
        lower, upper = self._factors()
        l_inv_pt = torch.linalg.solve_triangular(lower, self.permutation.T, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, l_inv_pt, upper=True)

    def _check(self, x):
        if x.dim() not in (2, 4) or x.shape[1] != self.num_channels:
            raise ValueError(f"inputs must be [B, {self.num_channels}] or [B, {self.num_channels}, H, W]; "
                             f"got shape {tuple(x.shape)}")

    def _mix(self, x, weight):
        weight = weight.to(x.dtype)
        return x @ weight.T if x.dim() == 2 else F.conv2d(x, weight[:, :, None, None])

    def forward(self, inputs, context=None):
        reject_context(self, context)
        self._check(inputs)
        return self._mix(inputs, self.weight()), per_position_logdet(self.log_abs_s, inputs)

    def inverse(self, inputs, context=None):
        reject_context(self, context)
        self._check(inputs)
        return self._mix(inputs, self.inverse_weight()), -per_position_logdet(self.log_abs_s, inputs)
