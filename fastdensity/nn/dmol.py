"""PixelCNN++'s output head: the discretized mixture of logistics as a module, with exact sampling.

The network produces ``params`` [B, out_channels, H, W]; the head scores data with
:func:`fastdensity.ops.dmol_log_prob` (fused kernel on CUDA) and draws images from the same
distribution. Channel layout, coupling and constants: :mod:`fastdensity.reference.dmol`.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..reference import dmol as _ref

__all__ = ["DiscretizedLogisticMixture"]


class DiscretizedLogisticMixture(nn.Module):
    """Discretized mixture of ``num_mixtures`` logistics over ``channels`` colour channels (PixelCNN++).

    Args:
        num_mixtures: K, the number of mixture components.
        channels: 3 (RGB, coupled inside each pixel: G's mean depends on R, B's on R and G) or 1.
        num_bits: bit depth of the data; x lives on the grid 2 v / (2^bits - 1) - 1, v = 0 .. 2^bits - 1.

    Attributes:
        out_channels: channels the network must produce per pixel, 10 K (RGB) or 3 K (one channel).

    Example::

        head = DiscretizedLogisticMixture(num_mixtures=10)          # head.out_channels == 100
        params = net(x)                                             # [B, 100, H, W]
        loss = -head.log_prob(x, params).mean()                     # nats per image
        x_new = head.sample(params)                                 # [B, 3, H, W] on the 8-bit grid

    The module has no parameters of its own.
    """

    def __init__(self, num_mixtures: int, channels: int = 3, num_bits: int = _ref.DEFAULT_NUM_BITS):
        super().__init__()
        if isinstance(num_mixtures, bool) or not isinstance(num_mixtures, int) or num_mixtures < 1:
            raise ValueError(f"num_mixtures must be a positive integer; got {num_mixtures!r}")
        if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 1 <= num_bits <= 16:
            raise ValueError(f"num_bits must be an integer from 1 to 16; got {num_bits!r}")
        self.num_mixtures = num_mixtures
        self.channels = channels
        self.num_bits = num_bits
        self.out_channels = self.num_params(num_mixtures, channels)  # validates channels

    @staticmethod
    def num_params(num_mixtures: int, channels: int = 3) -> int:
        """Channels a network must output for this head: ``10 K`` for RGB, ``3 K`` for one channel."""
        return _ref.num_params(num_mixtures, channels)

    def extra_repr(self) -> str:
        return f"num_mixtures={self.num_mixtures}, channels={self.channels}, num_bits={self.num_bits}"

    def _check_params(self, params: torch.Tensor) -> None:
        if not isinstance(params, torch.Tensor) or params.dim() != 4 or params.shape[1] != self.out_channels:
            shape = tuple(params.shape) if isinstance(params, torch.Tensor) else type(params).__name__
            raise ValueError(f"params must be [B, {self.out_channels}, H, W] for {self.num_mixtures} mixture "
                             f"components over {self.channels} channel(s); got {shape}")

    def log_prob(self, x: torch.Tensor, params: torch.Tensor, reduction: str = "sum",
                 validate_args: bool = True) -> torch.Tensor:
        """log p(x) in nats: [B] (``reduction="sum"``) or [B, H, W] (``"none"``); see ``ops.dmol_log_prob``."""
        self._check_params(params)
        return ops.dmol_log_prob(x, params, num_bits=self.num_bits, reduction=reduction,
                                 validate_args=validate_args)

    forward = log_prob

    @torch.no_grad()
    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x [B, C, H, W] exactly from the distribution ``log_prob`` scores, one draw per pixel.

        Per pixel: a component k ~ softmax(logits) (Gumbel-max), then channel by channel a logistic
        draw y = mu + s logit(u) (inverse CDF), clamped to [-1, 1] and rounded to the bit grid. The
        rounding is what makes the draw exact: P(round(y) = v) is the logistic mass of v's bin, with
        the lowest and highest bins open-ended, which is the probability ``log_prob`` assigns. G's and
        B's means are shifted by the *rounded* R (and G) values, as ``log_prob`` shifts them by the data.
        (PixelCNN++'s own sampler couples on the unrounded values and never rounds, so its draws
        follow a slightly different, continuous distribution.)

        Only the image's pixels are independent here; an autoregressive model calls this once per
        pixel position, feeding the result back through the network.

        Returns float32 values (float64 for float64 params) on ``params``' device.
        """
        self._check_params(params)
        dtype = _ref.compute_dtype(params.dtype)
        params = params.to(dtype)
        logits, means, log_scales, coeffs = _ref.split_params(params, self.channels)
        B, K, H, W = logits.shape
        tiny = torch.finfo(dtype).tiny
        # Gumbel-max: argmax_k(logit_k + G_k), G = -log(-log U), picks k with probability softmax(logits)_k.
        u = torch.rand(logits.shape, dtype=dtype, device=params.device, generator=generator).clamp_min(tiny)
        k = torch.argmax(logits - torch.log(-torch.log(u)), dim=1, keepdim=True)  # [B, 1, H, W]

        def pick(t: torch.Tensor) -> torch.Tensor:  # [B, K, H, W] -> [B, H, W], component k of each pixel
            return t.gather(1, k).squeeze(1)

        levels = _ref.num_levels(self.num_bits)
        xs: list[torch.Tensor] = []
        for c in range(self.channels):
            mean = pick(means[:, c])
            if c == 1:
                mean = mean + torch.tanh(pick(coeffs[:, 0])) * xs[0]
            elif c == 2:
                mean = mean + torch.tanh(pick(coeffs[:, 1])) * xs[0] + torch.tanh(pick(coeffs[:, 2])) * xs[1]
            scale = torch.exp(pick(log_scales[:, c]).clamp(min=_ref.LOG_SCALE_MIN))
            u = torch.rand((B, H, W), dtype=dtype, device=params.device, generator=generator)
            y = mean + scale * (torch.log(u) - torch.log1p(-u))  # inverse logistic CDF; u = 0 gives -inf
            # Clamping puts the tails in the edge bins; rounding (y + 1) / 2h to an integer picks the bin.
            v = torch.round((y.clamp(-1.0, 1.0) + 1.0) * (levels / 2.0))
            xs.append(v * (2.0 / levels) - 1.0)
        return torch.stack(xs, dim=1)
