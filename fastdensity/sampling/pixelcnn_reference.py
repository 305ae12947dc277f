"""The PixelCNN samplers the cached one is judged against, and the draw all of them share.

Every PixelCNN sampler generates the pixels of ``v`` [B, C, H, W] (int64 levels) in raster order; at
pixel (i, j) it needs the mixture parameters ``params`` [B, P] that the network gives that pixel from
the pixels before it, then draws the pixel's C channels from them with :func:`draw_pixel`. They
differ only in how the parameters are found:

* :func:`sample_naive` - the reference: the whole network on the whole image, once per pixel
  (H * W full passes, so time grows with (H * W)^2). Obviously right: it is ``model.network`` as
  ``log_prob`` runs it, read at (i, j).
* :func:`sample_window` - the whole network on the smallest window that fixes pixel (i, j)'s
  parameters exactly (``PixelCNN._window_params``: ``reach`` rows up and columns to each side), once
  per pixel: fastdensity's sampler before the cached one.
* :func:`fastdensity.sampling.pixelcnn_cache.sample_cached` - each activation once (the default).

The draw is one call of the same shape per pixel in every sampler, so all of them consume torch's
global random stream identically: from the same seed they return the same images wherever the
parameters, equal up to round-off, do not straddle a decision boundary of the draw.

``draw`` arguments (tests pass their own to record the parameters of each step) are called as
``draw(model, params [B, P, 1, 1]) -> levels [B, C]``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .progress import tick

__all__ = ["draw_pixel", "sample_naive", "sample_window", "Draw"]

Draw = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def draw_pixel(model, params: torch.Tensor) -> torch.Tensor:
    """Levels [B, C] (int64) of one pixel drawn from its parameters ``params`` [B, P, 1, 1].

    Power-of-two levels: the discretized logistic mixture's own exact draw on the 2^b grid (a
    Gumbel-max component, then a rounded logistic per channel). Other level counts (one channel):
    a categorical draw over the L levels, with the head's probabilities renormalised over them as
    ``log_prob`` renormalises them.
    """
    if model.renormalize:
        logits = model._level_log_probs(params)[:, :, 0, 0].t()  # [B, L]
        return torch.multinomial(torch.softmax(logits.double(), dim=1), 1)
    x = model.head.sample(params)  # on the grid 2 g / (2^b - 1) - 1, and L = 2^b: g is the level
    return torch.round((x[:, :, 0, 0] + 1) * ((model.levels - 1) / 2)).long()


def _raster(model, num_samples: int, params_at, draw: Draw) -> torch.Tensor:
    """Generate ``num_samples`` images pixel by pixel with ``params_at(v, i, j) -> [B, P, 1, 1]``."""
    c, h, w = model.shape
    v = torch.zeros((num_samples, c, h, w), dtype=torch.long, device=model.grid_values.device)
    if num_samples == 0:
        return v
    for i in range(h):
        for j in range(w):
            v[:, :, i, j] = draw(model, params_at(v, i, j))
            tick()
    return v


@torch.no_grad()
def sample_naive(model, num_samples: int, draw: Draw = draw_pixel) -> torch.Tensor:
    """H * W passes of the whole network over the whole image; the reference for the others."""
    return _raster(model, num_samples, lambda v, i, j: model.network(v)[:, :, i:i + 1, j:j + 1], draw)


@torch.no_grad()
def sample_window(model, num_samples: int, draw: Draw = draw_pixel) -> torch.Tensor:
    """H * W passes of the whole network over each pixel's exact window (``model._window_params``)."""
    return _raster(model, num_samples, model._window_params, draw)
