"""PixelCNN (van den Oord et al., 2016) with PixelCNN++'s discretized logistic mixture head.

Images of integer levels ``v in {0, .., L-1}`` [B, C, H, W], C = 1 or 3::

    x      = 2 v / (L - 1) - 1                                      network input on [-1, 1]
    h      = MaskedConv2d(C, F, k, "A")(x)                          sees only pixels before (i, j)
    h      = h + W_1x1 (tanh(a) * sigmoid(b)),  [a, b] = MaskedConv2d(F, 2F, 3, "B")(h)   x num_blocks
    params = 1x1 conv(ReLU(1x1 conv(ReLU(h))))                      [B, 3K or 10K, H, W]
    log P(v) = sum_(i, j) log P(v_ij | params_ij)                   the chain rule, one pass

The first layer's type-A mask excludes the whole current pixel (``color_groups=1``): all C channels of
pixel (i, j) are modelled by the mixture head from pixels before it, and PixelCNN++'s coefficients
couple G to R and B to R, G inside the pixel. (The plain masked stack has the known blind spot above
and right of the pixel; the gated residual blocks are van den Oord et al.'s gating without the
vertical/horizontal split.)

Levels and the head's grid: :class:`fastdensity.nn.DiscretizedLogisticMixture` scores values on the
grid of ``2^b`` values, ``b = ceil(log2 L)``; level v sits at grid point ``round(v (2^b - 1) / (L - 1))``.
When L = 2^b that is the identity. Otherwise (one channel only; e.g. the 17-level digits on a 5-bit
grid) the head's probabilities are renormalised over the L grid points each pixel can take::

    log P(v_ij | params_ij) = log p_dmol(g(v_ij)) - log sum_u p_dmol(g(u))

so the model is an exact distribution over the L levels (the unused grid points get no mass).

Sampling generates pixel by pixel in raster order. By default every activation is computed once
(:mod:`fastdensity.sampling.pixelcnn_cache`: each layer at the new pixel's position only, from
caches of the layers below), about one forward pass of work per image. ``method="window"`` computes
each pixel's parameters on the smallest window that determines them exactly: the receptive field reaches
``R = k // 2 + num_blocks`` rows up and R columns to either side, and a window's border errors
(zero padding where real pixels are) travel inwards by the same R, so the window rows
``[i - R, i]`` x columns ``[j - R, j + R]`` gives pixel (i, j) its exact parameters. On images larger
than the window this cuts each step from H x W positions to at most (R + 1)(2R + 1).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .. import nn as fnn
from .._dtypes import acc_dtype
from .._validation import check_int
from .base import DensityModel, check_shape

__all__ = ["GatedResidualBlock", "PixelCNN"]


class GatedResidualBlock(nn.Module):
    """``h + conv1x1(tanh(a) * sigmoid(b))`` with ``[a, b]`` from a type-B masked ``kernel_size`` conv."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = fnn.MaskedConv2d(channels, 2 * channels, kernel_size, mask_type="B")
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(h).chunk(2, dim=1)
        return h + self.out(torch.tanh(a) * torch.sigmoid(b))


class PixelCNN(DensityModel):
    """PixelCNN over images of integer levels, ``shape=[C, H, W]`` with C = 1 or 3.

    Args:
        shape: per-example shape.
        levels: L, the number of intensity levels (17 for digits, 256 for 8-bit images). With C = 3, L
            must be a power of two.
        hidden: F, feature channels (default 32: small enough to train on a CPU in minutes).
        num_blocks: gated residual blocks (default 4).
        num_mixtures: K, logistic components per pixel (default 5).
        kernel_size: the first (type-A) layer's kernel (odd; default 7 for images of 16 or more rows and
            columns, else 5).

    ``log_prob(v)`` takes levels (any integer or float dtype holding integers) and returns exact
    log-probabilities [B] in nats; ``sample(n)`` returns int64 levels.
    """

    name = "pixelcnn"
    discrete = True
    image_only = True

    def __init__(self, shape: Sequence[int], *, levels: int, hidden: int = 32, num_blocks: int = 4,
                 num_mixtures: int = 5, kernel_size: Optional[int] = None):
        shape = check_shape("PixelCNN", shape, (3,))
        c, h, w = shape
        if c not in (1, 3):
            raise ValueError(f"PixelCNN's mixture head models 1 or 3 channels; got shape {list(shape)}")
        levels, hidden, num_blocks, num_mixtures = int(levels), int(hidden), int(num_blocks), int(num_mixtures)
        if levels < 2:
            raise ValueError(f"levels must be >= 2; got {levels}")
        bits = max(1, math.ceil(math.log2(levels)))
        if bits > 16:
            raise ValueError(f"levels must be at most 2^16; got {levels}")
        if c == 3 and levels != 2 ** bits:
            raise ValueError(f"PixelCNN on 3 channels needs a power-of-two number of levels (the RGB mixture's "
                             f"channel coupling is not renormalised); got levels={levels}")
        if hidden < 1 or num_blocks < 0 or num_mixtures < 1:
            raise ValueError(f"PixelCNN needs hidden >= 1, num_blocks >= 0, num_mixtures >= 1; got {hidden}, "
                             f"{num_blocks}, {num_mixtures}")
        kernel_size = (7 if min(h, w) >= 16 else 5) if kernel_size is None else int(kernel_size)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer; got {kernel_size}")
        super().__init__(shape, levels=levels, hidden=hidden, num_blocks=num_blocks, num_mixtures=num_mixtures,
                         kernel_size=kernel_size)
        self.levels, self.bits = levels, bits
        self.renormalize = levels != 2 ** bits
        self.first = fnn.MaskedConv2d(c, hidden, kernel_size, mask_type="A")
        self.blocks = nn.ModuleList(GatedResidualBlock(hidden) for _ in range(num_blocks))
        self.head = fnn.DiscretizedLogisticMixture(num_mixtures, channels=c, num_bits=bits)
        self.out = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                                 nn.Conv2d(hidden, self.head.out_channels, 1))
        #: rows above (and columns to either side) that the parameters of a pixel depend on
        self.reach = kernel_size // 2 + num_blocks
        grid = torch.round(torch.arange(levels, dtype=torch.float64) * (2 ** bits - 1) / (levels - 1))
        # x-value of each level on the head's grid: 2 g / (2^b - 1) - 1
        self.register_buffer("grid_values", (2 * grid / (2 ** bits - 1) - 1).float(), persistent=False)

    # -- the network ----------------------------------------------------------------------------------

    def _input(self, v: torch.Tensor) -> torch.Tensor:
        return v.to(self.grid_values.dtype) * (2.0 / (self.levels - 1)) - 1.0

    def network(self, v: torch.Tensor) -> torch.Tensor:
        """Mixture parameters [B, P, H, W] for levels ``v`` [B, C, H, W]; pixel (i, j)'s parameters depend
        only on pixels before (i, j) in raster order."""
        h = self.first(self._input(v))
        for block in self.blocks:
            h = block(h)
        return self.out(h)

    def _check_levels(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` as int64 levels (an index into the grid), after checking they are levels 0..L-1."""
        self._check_input(v)
        if v.is_floating_point() and v.numel() and not bool(torch.all(v == torch.round(v))):
            raise ValueError("PixelCNN takes integer levels; got non-integer values (dequantized data?)")
        if v.numel():
            low, high = (int(t) for t in torch.aminmax(v))
            if low < 0 or high >= self.levels:
                raise ValueError(f"PixelCNN levels must lie in 0..{self.levels - 1}; got values from {low} to {high}")
        # int64 whatever came in: a uint8 (or bool) tensor used as an index would be read as a mask.
        return v.long()

    def _pixel_log_probs(self, v: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log P(v_ij | params_ij), [B, H, W] (renormalised over the L levels when needed)."""
        x = self.grid_values.to(params.dtype if params.dtype == torch.float64 else torch.float32)[v]
        lp = self.head.log_prob(x, params, reduction="none", validate_args=False)
        if self.renormalize:
            lp = lp - self._log_normalizer(params)
        return lp

    def _log_normalizer(self, params: torch.Tensor) -> torch.Tensor:
        """log sum_u p_dmol(g(u)) per pixel, [B, H, W] (one channel)."""
        return torch.logsumexp(self._level_log_probs(params), dim=0)

    def _level_log_probs(self, params: torch.Tensor) -> torch.Tensor:
        """[L, B, H, W]: the head's log-probability of every level's grid value at every pixel."""
        b, _, h, w = params.shape
        values = self.grid_values.to(acc_dtype(params.dtype))
        # All L candidate values in one call: the batch repeats the parameters once per level.
        x = values.view(-1, 1, 1, 1, 1).expand(self.levels, b, 1, h, w).reshape(self.levels * b, 1, h, w)
        rep = params.unsqueeze(0).expand(self.levels, *params.shape).reshape(self.levels * b, *params.shape[1:])
        return self.head.log_prob(x, rep, reduction="none", validate_args=False).view(self.levels, b, h, w)

    def initialize(self, x: torch.Tensor) -> None:
        """Nothing to initialise from data (no ActNorm); only checks that ``x`` holds valid levels."""
        self._check_levels(x)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        v = self._check_levels(x)
        return self._pixel_log_probs(v, self.network(v)).flatten(1).sum(1)

    # -- sampling -------------------------------------------------------------------------------------

    def _window_params(self, v: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """Parameters of pixel (i, j), [B, P, 1, 1], from the exact window (module docstring)."""
        _, _, h, w = v.shape
        r0, c0, c1 = max(0, i - self.reach), max(0, j - self.reach), min(w, j + self.reach + 1)
        params = self.network(v[:, :, r0:i + 1, c0:c1])
        return params[:, :, i - r0:i - r0 + 1, j - c0:j - c0 + 1]

    @torch.no_grad()
    def sample(self, num_samples: int, *, method: str = "cached") -> torch.Tensor:
        """``num_samples`` images [n, C, H, W] of int64 levels, pixel by pixel in raster order.

        ``method``: ``"cached"`` (default; every activation computed once, about one forward pass of
        work in all: :mod:`fastdensity.sampling.pixelcnn_cache`), ``"naive"`` (the whole network per
        pixel, H * W passes: the reference) or ``"window"`` (the network on each pixel's exact window).
        All three consume the random stream identically: the same seed gives the same images, up to
        draws that round-off in the parameters flips (float32)."""
        num_samples = check_int("num_samples", num_samples, minimum=0)
        from ..sampling import sample_pixelcnn

        return sample_pixelcnn(self, num_samples, method)
