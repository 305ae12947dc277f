"""A diagonal Gaussian mixture as a model: ``p(x) = sum_k pi_k N(x; mu_k, diag(sigma_k^2))``.

A thin wrapper of :class:`fastdensity.nn.GaussianMixture` (the fused mixture kernel on CUDA) with the
model interface: any per-example shape (images are flattened), k-means++ initialisation from the first
batch, exact sampling.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import nn as fnn
from .._validation import check_int
from .base import DensityModel, check_shape

__all__ = ["GaussianMixture"]


class GaussianMixture(DensityModel):
    """Gaussian mixture model over examples of ``shape`` ([D] or [C, H, W], flattened to D).

    Args:
        shape: per-example shape.
        components: K, the number of mixture components (default 16).

    ``initialize(x)`` seeds the means by k-means++ on ``x`` (at least K examples) and the weights and
    scales from the resulting clusters; the draws come from a generator seeded by the global torch RNG,
    so ``torch.manual_seed`` makes them reproducible.
    """

    name = "gmm"

    def __init__(self, shape: Sequence[int], *, components: int = 16):
        shape = check_shape("GaussianMixture", shape, (1, 3))
        components = int(components)
        if components < 1:
            raise ValueError(f"components must be >= 1; got {components}")
        super().__init__(shape, components=components)
        self.mixture = fnn.GaussianMixture(self.dim, components)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.mixture.log_prob(x.reshape(x.shape[0], self.dim))  # (-1 is ambiguous for an empty batch)

    def sample(self, num_samples: int) -> torch.Tensor:
        num_samples = check_int("num_samples", num_samples, minimum=0)
        return self.mixture.sample(num_samples).view(num_samples, *self.shape)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        self._check_input(x)
        seed = int(torch.randint(0, 2**62, (1,)).item())
        self.mixture.init_from_data(x.reshape(x.shape[0], self.dim), generator=torch.Generator().manual_seed(seed))
