"""Multi-scale machinery for image flows (RealNVP, Glow): checkerboard coupling, factor-out, priors.

A multi-scale flow maps an image ``x`` [B, C, H, W] through levels; after each level but the last,
half the channels are *factored out* (they leave the flow and are scored by a prior) and the rest go
on, squeezed to half the resolution::

    h_0 = x
    h_i', logdet_i      = level_i(h_{i-1})                  (squeezes, couplings, ActNorm, 1x1 convs)
    h_i, z_i            = split(h_i')                        (first half of the channels go on)
    log p(x) = sum_i [logdet_i + log p_i(z_i | h_i)] + log p_top(h_L)

The prior of a factored-out part is a standard normal (RealNVP) or a diagonal Gaussian whose mean and
log-std come from a zero-initialised 3x3 convolution of the channels that go on (Glow's learned prior),
and the top prior is a standard normal or a learned diagonal Gaussian. Each Gaussian prior is itself an
affine map to N(0, I), so :meth:`MultiScaleFlow.to_noise` can return one standard-normal vector per
example together with the log-det of the whole map (the tests check it against autograd Jacobians).

:class:`CheckerboardCoupling` is RealNVP's spatial coupling: pixels with ``(i + j) % 2 == parity`` stay,
the others get ``y = x * s + t`` from a network that sees only the staying pixels (and the mask).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .. import ops
from .._validation import check_int
from ..nn import Transform
from ..nn.base import reject_context, zero_logdet
from ..sampling import MADE_METHODS, sample_autoregressive
from .base import DensityModel

__all__ = ["checkerboard_mask", "CheckerboardCoupling", "GaussianPrior", "FactorOut", "MultiScaleFlow", "FlowModel"]

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def checkerboard_mask(height: int, width: int, parity: int, like: torch.Tensor) -> torch.Tensor:
    """[1, 1, H, W] mask, 1 where ``(i + j) % 2 == parity`` (the pixels that stay), in ``like``'s dtype."""
    i = torch.arange(height, device=like.device)[:, None]
    j = torch.arange(width, device=like.device)[None, :]
    return (((i + j) % 2) == parity).to(like.dtype)[None, None]


class CheckerboardCoupling(Transform):
    """RealNVP's checkerboard affine coupling on [B, C, H, W].

    ``m`` = :func:`checkerboard_mask` (1 = stays). The network sees ``[x * m, m]`` ([B, C + 1, H, W]) and
    returns [B, 2C, H, W]: shift and unconstrained scale (nflows' order). Both are multiplied by
    ``1 - m``, so on the staying pixels the scale function gives s(0) = 1 and the shift 0: the fused op
    leaves them bit-for-bit unchanged and their log s = 0 adds nothing to the log-det. That needs a
    scale with s(0) = 1: ``"softclamp"`` (default) or ``"exp"``.
    """

    conditional = False  # its net sees the image and the mask only: a context given to it is an error

    def __init__(self, channels: int, parity: int, net: nn.Module, scale: str = "softclamp", clamp: float = 2.0):
        super().__init__()
        if scale not in ("softclamp", "exp"):
            raise ValueError(f"CheckerboardCoupling needs a scale with s(0) = 1, 'softclamp' or 'exp'; got {scale!r}")
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1; got {parity!r}")
        self.channels, self.parity, self.scale, self.clamp = channels, parity, scale, clamp
        self.net = net

    def _run(self, x, inverse):
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"inputs must be [B, {self.channels}, H, W]; got {tuple(x.shape)}")
        b, c, h, w = x.shape
        m = checkerboard_mask(h, w, self.parity, x)
        out = self.net(torch.cat([x * m, m.expand(b, 1, h, w)], dim=1))
        free = 1 - m
        shift, scale_raw = out[:, :c] * free, out[:, c:] * free
        return ops.affine_coupling(x, shift, scale_raw, scale=self.scale, inverse=inverse, clamp=self.clamp)

    def forward(self, inputs, context=None):
        reject_context(self, context)
        return self._run(inputs, inverse=False)

    def inverse(self, inputs, context=None):
        reject_context(self, context)
        return self._run(inputs, inverse=True)


class GaussianPrior(nn.Module):
    """N(mean, diag(exp(log_std))^2) over tensors of ``shape``; standard normal unless ``learned``.

    ``learned=True`` makes ``mean`` and ``log_std`` parameters starting at zero (Glow's learned top).
    """

    def __init__(self, shape: Sequence[int], learned: bool = False):
        super().__init__()
        self.shape = tuple(shape)
        if learned:
            self.mean = nn.Parameter(torch.zeros(self.shape))
            self.log_std = nn.Parameter(torch.zeros(self.shape))
        else:
            self.register_buffer("mean", torch.zeros(self.shape), persistent=False)
            self.register_buffer("log_std", torch.zeros(self.shape), persistent=False)

    def standardize(self, z: torch.Tensor, cond: Optional[torch.Tensor] = None):
        """``(u, logdet)`` with u = (z - mean) / std ~ N(0, I) and logdet = -sum log std, [B]."""
        u = (z - self.mean) * torch.exp(-self.log_std)
        return u, (-self.log_std.sum()).expand(z.shape[0])

    def unstandardize(self, u: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The inverse of :meth:`standardize`: ``mean + std * u``."""
        return self.mean + torch.exp(self.log_std) * u

    def log_prob(self, z: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        u, logdet = self.standardize(z)
        # math.prod(shape[1:]), not u[0].numel(): an empty batch has no u[0] and gets an empty result.
        return -0.5 * u.pow(2).flatten(1).sum(1) + logdet - HALF_LOG_2PI * math.prod(u.shape[1:])


class FactorOut(nn.Module):
    """Split [B, C, H, W] into the first ``C // 2`` channels (go on) and the rest (factored out).

    The factored-out part ``z`` is scored by N(0, I) (``learned=False``, RealNVP) or by
    N(mean(h), exp(log_std(h))^2) with ``mean, log_std`` from a zero-initialised 3x3 convolution of the
    kept part ``h`` (``learned=True``, Glow's split prior). ``shape`` is the [C, H, W] being split.
    """

    def __init__(self, shape: Sequence[int], learned: bool = False):
        super().__init__()
        channels, height, width = shape
        if channels < 2:
            raise ValueError(f"cannot factor out half of {channels} channel(s); need at least 2")
        self.keep = channels // 2
        self.out = channels - self.keep
        self.out_shape = (self.out, height, width)
        self.kept_shape = (self.keep, height, width)
        self.learned = learned
        if learned:
            self.net = nn.Conv2d(self.keep, 2 * self.out, 3, padding=1)
            nn.init.zeros_(self.net.weight)
            nn.init.zeros_(self.net.bias)

    def split(self, h: torch.Tensor):
        return h[:, :self.keep], h[:, self.keep:]

    def _params(self, kept: torch.Tensor):
        if not self.learned:
            zeros = kept.new_zeros((kept.shape[0], *self.out_shape))
            return zeros, zeros
        mean, log_std = self.net(kept).chunk(2, dim=1)
        return mean, log_std

    def standardize(self, z: torch.Tensor, kept: torch.Tensor):
        """``(u, logdet)``: u = (z - mean(kept)) / std(kept) and logdet = -sum log std, [B]."""
        mean, log_std = self._params(kept)
        return (z - mean) * torch.exp(-log_std), -log_std.flatten(1).sum(1)

    def unstandardize(self, u: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        mean, log_std = self._params(kept)
        return mean + torch.exp(log_std) * u

    def log_prob(self, z: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        u, logdet = self.standardize(z, kept)
        # math.prod(shape[1:]), not u[0].numel(): an empty batch has no u[0] and gets an empty result.
        return -0.5 * u.pow(2).flatten(1).sum(1) + logdet - HALF_LOG_2PI * math.prod(u.shape[1:])


class MultiScaleFlow(nn.Module):
    """The multi-scale density of the module docstring (one level and no split: an ordinary flow).

    Args:
        levels: one transform per level (data -> noise); level i maps the kept part of level i - 1.
        splits: one :class:`FactorOut` per level but the last (applied after that level).
        prior: the top prior, a :class:`GaussianPrior` over the last level's output shape.
    """

    def __init__(self, levels: Sequence[Transform], splits: Sequence[FactorOut], prior: GaussianPrior):
        super().__init__()
        if len(splits) != len(levels) - 1:
            raise ValueError(f"need one split per level but the last: {len(levels)} levels, {len(splits)} splits")
        self.levels = nn.ModuleList(levels)
        self.splits = nn.ModuleList(splits)
        self.prior = prior

    def _walk(self, x, standardize: bool, context=None):
        """Run the levels; returns the per-example log-density (or the noise parts and the log-det)."""
        h = x
        total = zero_logdet(x)
        parts = []
        for i, level in enumerate(self.levels):
            h, logdet = level(h, context)
            total = total + logdet
            if i < len(self.splits):
                h, z = self.splits[i].split(h)
                if standardize:
                    u, ld = self.splits[i].standardize(z, h)
                    parts.append(u.flatten(1))
                    total = total + ld
                else:
                    total = total + self.splits[i].log_prob(z, h)
        if standardize:
            u, ld = self.prior.standardize(h)
            parts.append(u.flatten(1))
            return torch.cat(parts, dim=1), total + ld
        return total + self.prior.log_prob(h)

    def log_prob(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._walk(x, standardize=False, context=context)

    def to_noise(self, x: torch.Tensor, context: Optional[torch.Tensor] = None):
        """``(eps [B, D], logdet [B])``: every factored-out part (in level order) and then the top, each
        standardised by its prior, so that ``log_prob(x) = log N(eps; 0, I) + logdet``."""
        return self._walk(x, standardize=True, context=context)

    def from_noise(self, eps: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The inverse of :meth:`to_noise`: eps [B, D] -> x."""
        sizes = [math.prod(s.out_shape) for s in self.splits] + [math.prod(self.prior.shape)]
        if eps.dim() != 2 or eps.shape[1] != sum(sizes):
            raise ValueError(f"eps must be [B, {sum(sizes)}]; got {tuple(eps.shape)}")
        parts = eps.split(sizes, dim=1)
        b = eps.shape[0]
        h = self.prior.unstandardize(parts[-1].reshape(b, *self.prior.shape))
        for i in range(len(self.levels) - 1, -1, -1):
            if i < len(self.splits):
                split = self.splits[i]
                z = split.unstandardize(parts[i].reshape(b, *split.out_shape), h)
                h = torch.cat([h, z], dim=1)
            h, _ = self.levels[i].inverse(h, context)
        return h

    @property
    def noise_features(self) -> int:
        return sum(math.prod(s.out_shape) for s in self.splits) + math.prod(self.prior.shape)

    def sample(self, num_samples: int, temperature: float = 1.0,
               context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``from_noise(temperature * N(0, I))``: each prior's standard deviation scaled by ``temperature``;
        ``context`` [num_samples, C] holds each sample's context (conditional levels)."""
        ref = self.prior.mean
        eps = torch.randn(num_samples, self.noise_features, dtype=ref.dtype, device=ref.device)
        return self.from_noise(temperature * eps, context)


class FlowModel(DensityModel):
    """A :class:`DensityModel` whose density is ``self.flow``, a :class:`MultiScaleFlow`.

    Subclasses build ``self.flow``; examples reach it as they are ([D] or [C, H, W]) unless
    ``flatten`` is set (MAF flattens images to vectors).
    """

    flatten = False

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return x.reshape(x.shape[0], self.dim) if self.flatten else x  # (-1 is ambiguous for an empty batch)

    def log_prob(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self._in(x)
        self._check_context(context, rows=x.shape[0])
        return self.flow.log_prob(x, context)

    def to_noise(self, x: torch.Tensor, context: Optional[torch.Tensor] = None):
        """``(eps [B, D], logdet [B])`` with ``log_prob(x) = log N(eps; 0, I) + logdet``."""
        x = self._in(x)
        self._check_context(context, rows=x.shape[0])
        return self.flow.to_noise(x, context)

    def from_noise(self, eps: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The inverse of :meth:`to_noise`: eps [B, D] -> x [B, *shape]."""
        self._check_context(context, rows=eps.shape[0])
        return self.flow.from_noise(eps, context).reshape(eps.shape[0], *self.shape)

    def sample(self, num_samples: int, context: Optional[torch.Tensor] = None,
               temperature: float = 1.0) -> torch.Tensor:
        """Samples [n, *shape] ([len(context), n, *shape] given a context); ``temperature`` scales the
        standard deviation of every prior."""
        num_samples = check_int("num_samples", num_samples, minimum=0)
        draw = lambda n, rows: self.flow.sample(n, temperature, rows).reshape(n, *self.shape)  # noqa: E731
        return self.per_context(num_samples, context, draw)


class MADEFlowModel(FlowModel):
    """A :class:`FlowModel` whose transforms may be MADE-based (MAF, autoregressive NSF): sampling inverts
    them incrementally by default (:mod:`fastdensity.sampling.made_incremental`)."""

    def sample(self, num_samples: int, context: Optional[torch.Tensor] = None, temperature: float = 1.0, *,
               method: str = MADE_METHODS[0]) -> torch.Tensor:
        """Samples [n, *shape] ([len(context), n, *shape] given a context, nflows' layout).

        ``method`` (a coupling layer inverts in one pass either way): ``"incremental"`` (default; each MADE
        unit computed once per transform, no autograd graph) or ``"naive"`` (D MADE passes per transform,
        the reference, differentiable under the caller's grad mode). From the same seed both return the
        same samples (float64 to ~1e-14; float32 to round-off)."""
        return sample_autoregressive(self, method, lambda: FlowModel.sample(self, num_samples, context, temperature))
