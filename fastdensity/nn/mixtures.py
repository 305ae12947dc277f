"""A trainable diagonal Gaussian mixture density, scored by the fused mixture kernel.

``GaussianMixture(features, components)`` holds logits [K], means [K, D] and log_scales [K, D] and gives
``log_prob(x) -> [B]`` through :func:`fastdensity.ops.gaussian_mixture_log_prob` (the shared-parameter
kernel on CUDA: no [B, K, D] tensor is built, forward or backward), exact ``sample(n)``, and a
k-means++ seeding from data so that gradient training starts from a sensible place.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops

__all__ = ["GaussianMixture"]


class GaussianMixture(nn.Module):
    """p(x) = sum_k pi_k N(x; mu_k, diag(sigma_k^2)) over ``features`` dims with ``components`` components.

    Args:
        features: D, the dimension of x.
        components: K, the number of mixture components.
        data: optional [N, D] tensor (N >= K) to seed the parameters from with :meth:`init_from_data`.
        generator: random generator for that seeding.

    Parameters (all trainable): ``logits`` [K] (pi = softmax(logits)), ``means`` [K, D],
    ``log_scales`` [K, D] (sigma = exp(log_scales)). Without data they start at equal weights, means
    drawn from N(0, 1) and unit scales.

    Example::

        gmm = GaussianMixture(features=64, components=256, data=x_train)   # k-means++ seeding
        opt = torch.optim.Adam(gmm.parameters(), lr=1e-2)
        loss = -gmm.log_prob(x_batch).mean()                               # nats per sample
        x_new = gmm.sample(1000)                                           # [1000, 64]
    """

    def __init__(self, features: int, components: int, *, data: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        for name, value in (("features", features), ("components", components)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        self.features = features
        self.components = components
        self.logits = nn.Parameter(torch.zeros(components))
        self.means = nn.Parameter(torch.randn(components, features, generator=generator))
        self.log_scales = nn.Parameter(torch.zeros(components, features))
        if data is not None:
            self.init_from_data(data, generator=generator)

    def extra_repr(self) -> str:
        return f"features={self.features}, components={self.components}"

    def _check_x(self, x: torch.Tensor, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be [..., {self.features}] (features={self.features}); got {shape}")

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) in nats for x [..., D]: shape [...] (float32 for half inputs)."""
        self._check_x(x)
        return ops.gaussian_mixture_log_prob(x, self.logits, self.means, self.log_scales)

    forward = log_prob

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x [num_samples, D]: a component k ~ Categorical(softmax(logits)), then mu_k + sigma_k eps."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples must be a non-negative integer; got {num_samples!r}")
        probs = torch.softmax(self.logits.detach().double(), dim=0)
        if num_samples == 0:  # torch.multinomial refuses to draw nothing
            k = torch.zeros(0, dtype=torch.long, device=probs.device)
        else:
            k = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
        eps = torch.randn(num_samples, self.features, generator=generator, device=self.means.device,
                          dtype=self.means.dtype)
        return self.means[k] + self.log_scales[k].exp() * eps

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, generator: torch.Generator | None = None,
                       min_scale: float = 1e-3) -> "GaussianMixture":
        """Seed the parameters from data x [N, D] (N >= K) by k-means++ (Arthur & Vassilvitskii, 2007).

        The first mean is a uniformly drawn point; each next one is a point drawn with probability
        proportional to its squared distance to the nearest mean chosen so far. Every point is then
        assigned to its nearest seed (one Lloyd step): each component's mean becomes the centroid of its
        points, its weight their share, and its scales their per-feature standard deviation (the whole
        data's where a component has fewer than two points), floored at ``min_scale``. Returns ``self``.
        """
        self._check_x(x, "data")
        x = x.detach().reshape(-1, self.features).to(self.means.dtype)
        N, K = x.shape[0], self.components
        if N < K:
            raise ValueError(f"data must have at least components={K} rows to seed from; got {N}")
        # Only the uniform draws come from ``generator`` (on its own device, so a CPU generator makes
        # the seeding reproducible for data anywhere); the D^2 weighting runs on the data's device as
        # an inverse-CDF lookup.
        gen_device = generator.device if generator is not None else x.device

        def uniform() -> float:
            return float(torch.rand((), generator=generator, device=gen_device, dtype=torch.float64))

        first = min(int(uniform() * N), N - 1)
        chosen = [first]
        d2 = (x - x[first]).pow(2).sum(dim=1).double()
        for _ in range(1, K):
            # All points coinciding with chosen means (total 0): any point is as good as another.
            weights = d2 if bool(d2.sum() > 0) else torch.ones_like(d2)
            cdf = torch.cumsum(weights, dim=0)
            idx = min(int(torch.searchsorted(cdf, cdf[-1:] * uniform(), right=True)), N - 1)
            chosen.append(idx)
            d2 = torch.minimum(d2, (x - x[idx]).pow(2).sum(dim=1).double())
        centers = x[chosen]
        assign = torch.cdist(x, centers).argmin(dim=1)
        counts = torch.bincount(assign, minlength=K).to(x.dtype)
        global_std = x.std(dim=0, unbiased=False) if N > 1 else torch.ones_like(x[0])
        scales = global_std.expand(K, -1).clone()
        for k in range(K):
            members = x[assign == k]
            if members.shape[0] >= 1:  # a seed is its own nearest point, so only ties leave one empty
                centers[k] = members.mean(dim=0)
            if members.shape[0] >= 2:
                scales[k] = members.std(dim=0, unbiased=False)
        self.means.copy_(centers)
        self.log_scales.copy_(scales.clamp_min(min_scale).log())
        self.logits.copy_((counts / N).clamp_min(1.0 / (N * K)).log())  # empty clusters keep a small weight
        return self
