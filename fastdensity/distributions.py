"""Base distributions for flows: log-densities per sample ([B], nats), sampling, means.

nflows' conventions: ``log_prob(inputs [B, *shape], context=None) -> [B]``; ``sample(n, context=None)``
returns [n, *shape], or [len(context), n, *shape] given a context (n draws for each context row);
``sample_and_log_prob`` returns both in that layout; ``mean(context=None)`` is [*shape] or
[len(context), *shape].

=============================  =============================================================  ===========
distribution                   density                                                        conditional
=============================  =============================================================  ===========
:class:`StandardNormal`        N(0, I)                                                        no
:class:`DiagonalNormal`        N(loc, diag(exp(log_std))^2), ``loc`` and ``log_std`` learned   no
:class:`ConditionalDiagonalNormal`  N(m(c), diag(exp(l(c)))^2), ``[m, l] = context_encoder(c)``  yes
=============================  =============================================================  ===========

The unconditional ones are the base of conditional flows too (the transform carries the context), so
they accept a context - one row per input row, checked - and use only its number of rows, in
``sample`` and ``mean``; ``conditional = False`` tells :class:`~fastdensity.Flow` that the context must
be used by its transform.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from ._dtypes import acc_dtype
from .nn.base import check_context

__all__ = ["StandardNormal", "DiagonalNormal", "ConditionalDiagonalNormal"]


def _num_contexts(context) -> int | None:
    return None if context is None else context.shape[0]


def _check_num_samples(num_samples) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative integer; got {num_samples!r}")
    return num_samples


class _Normal(nn.Module):
    """Shared bookkeeping: the event shape, the normalising constant, the nflows sampling layout."""

    conditional = False

    def __init__(self, shape: Sequence[int] | int):
        super().__init__()
        self.shape = torch.Size([shape] if isinstance(shape, int) else shape)
        self._log_z = 0.5 * self.shape.numel() * math.log(2 * math.pi)
        # A buffer only to follow the module's device and dtype in sample().
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def _check(self, z, context=None):
        if tuple(z.shape[1:]) != tuple(self.shape):
            raise ValueError(f"inputs must be [B, {', '.join(map(str, self.shape))}]; got {tuple(z.shape)}")
        check_context(z, context, type(self).__name__)

    def _noise(self, rows: int) -> torch.Tensor:
        return torch.randn((rows, *self.shape), dtype=self._anchor.dtype, device=self._anchor.device)

    def _split(self, x: torch.Tensor, n_ctx: int | None, num_samples: int) -> torch.Tensor:
        """[n_ctx * n, ...] -> [n_ctx, n, ...] (unchanged without a context)."""
        return x if n_ctx is None else x.view(n_ctx, num_samples, *x.shape[1:])

    def _params(self, context) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, log_std)`` broadcastable against [rows, *shape]."""
        raise NotImplementedError

    def log_prob(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """[B] log-density of ``inputs`` [B, *shape]; ``context`` (one row per input) as the class says."""
        self._check(inputs, context)
        acc = acc_dtype(inputs.dtype)
        mean, log_std = (p.to(acc) for p in self._params(context))
        u = (inputs.to(acc) - mean) * torch.exp(-log_std)
        return -0.5 * u.pow(2).flatten(1).sum(1) - log_std.expand_as(u).flatten(1).sum(1) - self._log_z

    def sample(self, num_samples: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """[num_samples, *shape], or [len(context), num_samples, *shape]."""
        n_ctx = _num_contexts(context)
        num_samples = _check_num_samples(num_samples)
        rows = num_samples if n_ctx is None else n_ctx * num_samples
        mean, log_std = self._params(context)
        if n_ctx is not None and mean.dim() > len(self.shape):  # per-context parameters: repeat per sample
            mean, log_std = mean.repeat_interleave(num_samples, 0), log_std.repeat_interleave(num_samples, 0)
        eps = self._noise(rows).to(mean.dtype)
        return self._split(mean + torch.exp(log_std) * eps, n_ctx, num_samples)

    def sample_and_log_prob(self, num_samples: int, context: torch.Tensor | None = None):
        """``(samples, log_prob)``: [n, *shape] and [n], or [len(context), n, *shape] and [len(context), n]."""
        samples = self.sample(num_samples, context)
        if context is None:
            return samples, self.log_prob(samples)
        flat = samples.reshape(-1, *self.shape)
        log_prob = self.log_prob(flat, context.repeat_interleave(num_samples, dim=0))
        return samples, log_prob.view(context.shape[0], num_samples)

    def mean(self, context: torch.Tensor | None = None) -> torch.Tensor:
        """The mean: [*shape], or [len(context), *shape] (one per context row)."""
        mean, _ = self._params(context)
        if context is None:
            return mean.expand(self.shape)
        return mean.expand(context.shape[0], *self.shape)


class StandardNormal(_Normal):
    """N(0, I) over tensors of ``shape`` (per sample): ``log p(z) = -0.5 |z|^2 - 0.5 n log(2 pi)``.

    A context (one row per input) is checked and only its number of rows is used (``sample``, ``mean``),
    as in nflows: a conditional flow with this base carries the context in its transform.
    """

    def log_prob(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self._check(inputs, context)
        acc = acc_dtype(inputs.dtype)
        return -0.5 * inputs.to(acc).pow(2).flatten(1).sum(1) - self._log_z

    def _params(self, context):
        zero = self._anchor if context is None else self._anchor.to(context.dtype)
        return zero, zero

    def sample(self, num_samples: int, context: torch.Tensor | None = None) -> torch.Tensor:
        n_ctx = _num_contexts(context)
        num_samples = _check_num_samples(num_samples)
        return self._split(self._noise(num_samples if n_ctx is None else n_ctx * num_samples), n_ctx, num_samples)


class DiagonalNormal(_Normal):
    """N(loc, diag(exp(log_std))^2) with learned ``loc`` and ``log_std`` of ``shape`` (both start at 0).

    (nflows calls these ``mean_`` and ``log_std_``, of shape [1, D]; ``mean()`` is a method here, as there.)
    """

    def __init__(self, shape: Sequence[int] | int):
        super().__init__(shape)
        self.loc = nn.Parameter(torch.zeros(self.shape))
        self.log_std = nn.Parameter(torch.zeros(self.shape))

    def _params(self, context):
        return self.loc, self.log_std


class ConditionalDiagonalNormal(_Normal):
    """N(m(c), diag(exp(l(c)))^2): a diagonal Gaussian whose parameters are a function of the context.

    nflows' semantics: ``params = context_encoder(context)`` is [B, 2 * prod(shape)] (any trailing
    layout with an even last dim); its first half is the mean and its second half the log standard
    deviation, each reshaped to [B, *shape]. ``context_encoder=None`` takes the context itself as the
    parameters. A context is required.

    Args:
        shape: the event shape, e.g. ``[2]``.
        context_encoder: a module or function from the context to the parameters (e.g.
            ``nn.Linear(context_features, 2 * D)``); None for the identity.
    """

    conditional = True

    def __init__(self, shape: Sequence[int] | int, context_encoder: Callable | None = None):
        super().__init__(shape)
        self._context_encoder = context_encoder

    def _params(self, context):
        if context is None:
            raise ValueError("ConditionalDiagonalNormal needs a context (its parameters are a function of it)")
        params = context if self._context_encoder is None else self._context_encoder(context)
        n = self.shape.numel()
        if params.dim() < 1 or params.shape[0] != context.shape[0] or params[0].numel() != 2 * n \
                or params.shape[-1] % 2:
            raise ValueError(f"ConditionalDiagonalNormal: the context encoder must return [B, 2 * {n}] (means, "
                             f"then log standard deviations) for a context of {context.shape[0]} rows; got shape "
                             f"{tuple(params.shape)}")
        half = params.shape[-1] // 2
        mean = params[..., :half].reshape(params.shape[0], *self.shape)
        log_std = params[..., half:].reshape(params.shape[0], *self.shape)
        return mean, log_std

    def log_prob(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            raise ValueError("ConditionalDiagonalNormal needs a context (its parameters are a function of it)")
        return super().log_prob(inputs, context)
