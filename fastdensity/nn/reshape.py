"""Squeeze (space-to-depth), the reshaping step of multi-scale flows (log-det 0)."""
from __future__ import annotations

from .._validation import check_int
from .base import Transform, reject_context, zero_logdet

__all__ = ["Squeeze"]


class Squeeze(Transform):
    """[B, C, H, W] -> [B, C * f^2, H / f, W / f]: each f x f patch becomes f^2 channels.

    Channel ``c * f^2 + i * f + j`` of the output holds pixel ``(f * y + i, f * x + j)`` of input
    channel ``c`` (Glow's ordering). ``inverse`` is depth-to-space.
    """

    conditional = False  # the same map for every context: a context given to it is an error

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = check_int("factor", factor, minimum=1)

    def forward(self, inputs, context=None):
        reject_context(self, context)
        f = self.factor
        if inputs.dim() != 4 or inputs.shape[2] % f or inputs.shape[3] % f:
            raise ValueError(f"inputs must be [B, C, H, W] with H and W divisible by {f}; got {tuple(inputs.shape)}")
        b, c, h, w = inputs.shape
        z = inputs.reshape(b, c, h // f, f, w // f, f).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(b, c * f * f, h // f, w // f), zero_logdet(inputs)

    def inverse(self, inputs, context=None):
        reject_context(self, context)
        f = self.factor
        if inputs.dim() != 4 or inputs.shape[1] % (f * f):
            raise ValueError(f"inputs must be [B, C * {f * f}, H, W]; got {tuple(inputs.shape)}")
        b, c, h, w = inputs.shape
        x = inputs.reshape(b, c // (f * f), f, f, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c // (f * f), h * f, w * f), zero_logdet(inputs)
