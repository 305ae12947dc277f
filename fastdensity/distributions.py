"""Base distributions for flows: log-densities per sample ([B], nats) and sampling."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ._dtypes import acc_dtype

__all__ = ["StandardNormal", "DiagonalNormal"]


def _num_contexts(context) -> int | None:
    return None if context is None else context.shape[0]


class StandardNormal(nn.Module):
    """N(0, I) over tensors of ``shape`` (per sample): ``log p(z) = -0.5 |z|^2 - 0.5 n log(2 pi)``.

    ``context`` is accepted for interface compatibility and ignored except by ``sample``, which
    then returns [len(context), num_samples, *shape] (nflows' convention).
    """

    def __init__(self, shape: Sequence[int] | int):
        super().__init__()
        self.shape = torch.Size([shape] if isinstance(shape, int) else shape)
        self._log_z = 0.5 * self.shape.numel() * math.log(2 * math.pi)
        # A buffer only to follow the module's device and dtype in sample().
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def _check(self, z):
        if tuple(z.shape[1:]) != tuple(self.shape):
            raise ValueError(f"inputs must be [B, {', '.join(map(str, self.shape))}]; got {tuple(z.shape)}")

    def log_prob(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self._check(inputs)
        acc = acc_dtype(inputs.dtype)
        return -0.5 * inputs.to(acc).pow(2).flatten(1).sum(1) - self._log_z

    def _noise(self, num_samples: int, context) -> tuple[torch.Tensor, int | None]:
        n_ctx = _num_contexts(context)
        lead = (num_samples,) if n_ctx is None else (n_ctx * num_samples,)
        return torch.randn(lead + tuple(self.shape), dtype=self._anchor.dtype, device=self._anchor.device), n_ctx

    def sample(self, num_samples: int, context: torch.Tensor | None = None) -> torch.Tensor:
        z, n_ctx = self._noise(num_samples, context)
        return z if n_ctx is None else z.view(n_ctx, num_samples, *self.shape)


class DiagonalNormal(StandardNormal):
    """N(mean, diag(exp(log_std))^2) with learned ``mean`` and ``log_std`` of ``shape``."""

    def __init__(self, shape: Sequence[int] | int):
        super().__init__(shape)
        self.mean = nn.Parameter(torch.zeros(self.shape))
        self.log_std = nn.Parameter(torch.zeros(self.shape))

    def log_prob(self, inputs, context=None):
        self._check(inputs)
        acc = acc_dtype(inputs.dtype)
        u = (inputs.to(acc) - self.mean.to(acc)) * torch.exp(-self.log_std.to(acc))
        return -0.5 * u.pow(2).flatten(1).sum(1) - self.log_std.to(acc).sum() - self._log_z

    def sample(self, num_samples, context=None):
        eps, n_ctx = self._noise(num_samples, context)
        z = self.mean + torch.exp(self.log_std) * eps
        return z if n_ctx is None else z.view(n_ctx, num_samples, *self.shape)
