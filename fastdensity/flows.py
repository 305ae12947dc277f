"""``Flow``: a density from an invertible transform and a base distribution (change of variables).

    log p(x | c) = log p_z(f(x, c) | c) + log |det df/dx|

with ``f = transform.forward`` mapping data to noise, as in nflows' ``Flow``. Given a context ``c``
([B, ...], one row per example; passed through ``embedding_net`` first), the base sees it and so does
the transform when it uses one; ``sample(n, c)`` and ``sample_and_log_prob(n, c)`` return n draws per context row,
[len(c), n, ...] (nflows' layout). A context reaching a flow none of whose parts uses one
(``conditional`` attributes, see :mod:`fastdensity.nn.base`) is a ValueError, as is one whose batch
size differs from the inputs'.
"""
from __future__ import annotations

import torch
from torch import nn

from .nn.base import Transform, check_context, uses_context

__all__ = ["Flow"]


class Flow(nn.Module):
    """A normalizing flow: ``Flow(transform, distribution, embedding_net=None)``.

    Args:
        transform: data -> noise :class:`~fastdensity.nn.Transform`.
        distribution: base density with ``log_prob(z, context)`` and ``sample(n, context)``
            (:mod:`fastdensity.distributions`, or any with nflows' interface).
        embedding_net: optional module applied to ``context`` before it reaches either.
    """

    def __init__(self, transform: Transform, distribution: nn.Module, embedding_net: nn.Module | None = None):
        super().__init__()
        self._transform = transform
        self._distribution = distribution
        self._embedding_net = embedding_net if embedding_net is not None else nn.Identity()

    @property
    def conditional(self) -> bool:
        """Whether the transform or the base distribution uses a context."""
        return uses_context(self._transform) or uses_context(self._distribution)

    def _transform_context(self, context):
        """The context for the transform: only when it uses one (the base may be the conditional part)."""
        return context if uses_context(self._transform) else None

    def _embed(self, context, inputs: torch.Tensor | None = None):
        if context is None:
            return None
        if not self.conditional:
            raise ValueError("Flow: a context was given but neither its transform nor its distribution uses one")
        if inputs is not None:
            check_context(inputs, context, "Flow")
        return self._embedding_net(context)

    def log_prob(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Log-density [B] (nats) of ``inputs`` [B, ...]."""
        context = self._embed(context, inputs)
        noise, logabsdet = self._transform(inputs, self._transform_context(context))
        return self._distribution.log_prob(noise, context) + logabsdet

    def forward(self, inputs, context=None):
        return self.log_prob(inputs, context)

    def transform_to_noise(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``f(x)``: the data pushed to the base space."""
        return self._transform(inputs, self._transform_context(self._embed(context, inputs)))[0]

    def _invert(self, noise, context, num_samples):
        """Push base samples through ``transform.inverse``; with context, samples are
        [n_ctx, num_samples, ...] and each context row is repeated for its samples."""
        if context is None:
            return self._transform.inverse(noise, None)
        n_ctx = context.shape[0]
        flat = noise.reshape(n_ctx * num_samples, *noise.shape[2:])
        rows = self._transform_context(context.repeat_interleave(num_samples, dim=0))
        x, logabsdet = self._transform.inverse(flat, rows)
        return x.view(n_ctx, num_samples, *x.shape[1:]), logabsdet.view(n_ctx, num_samples)

    def sample(self, num_samples: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """[num_samples, ...] samples, or [len(context), num_samples, ...] given a context."""
        context = self._embed(context)
        return self._invert(self._distribution.sample(num_samples, context), context, num_samples)[0]

    def sample_and_log_prob(self, num_samples: int, context: torch.Tensor | None = None):
        """Samples and their log-density in one pass: log p(x) = log p_z(z) - log|det d f^-1 / dz|."""
        context = self._embed(context)
        noise = self._distribution.sample(num_samples, context)
        if context is None:
            log_pz = self._distribution.log_prob(noise, None)
        else:
            flat = noise.reshape(-1, *noise.shape[2:])
            log_pz = self._distribution.log_prob(flat, context.repeat_interleave(num_samples, 0))
            log_pz = log_pz.view(context.shape[0], num_samples)
        samples, logabsdet = self._invert(noise, context, num_samples)
        return samples, log_pz - logabsdet
