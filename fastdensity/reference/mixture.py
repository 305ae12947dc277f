"""Reference mixture log-likelihoods: the ground truth the Triton kernels are judged against.

Written for clarity, never optimised (it builds the [..., K, D] tensor that the kernels avoid).
A mixture of K components with diagonal, location-scale components over D features::

    log p(x) = logsumexp_k ( log pi_k + sum_d c(x_d; mu_kd, l_kd) )
    log pi   = logits - logsumexp(logits)                  (pi = softmax(logits), as torch.distributions)

with ``s = exp(l)`` (``l`` = log_scales) and ``u = (x - mu) / s``, per dimension::

    gaussian   c = -u^2 / 2 - l - log(2 pi) / 2
    logistic   c = log sigmoid(u) + log sigmoid(-u) - l    (density exp(-u) / (s (1 + exp(-u))^2))

The standardised residual is computed as ``u = ((x - mu) * a) * b`` with ``a * b = exp(-l)`` (see
:func:`inverse_scale_factors`): ``b`` is exactly 1 unless ``exp(-l)`` would overflow, so the result is
the plain ``(x - mu) * exp(-l)`` wherever that is finite, and stays finite (and right) for log-scales
so negative (below about -88 in float32) that ``exp(-l)`` is infinite and ``x = mu`` would give
``0 * inf = NaN``.

Shapes: x [..., D]; logits [..., K]; means, log_scales [..., K, D]. The batch dims ``...`` of the
four arguments broadcast against each other (so parameters may be shared, [K] and [K, D], or given
per sample, [B, K] and [B, K, D], or anything in between); the result has the broadcast batch shape.

Dtypes: half-precision inputs are computed in float32 and the result is float32 (a sum over D and a
log-sum-exp over K in bf16 would keep two or three significant digits); float64 stays float64.
"""
from __future__ import annotations

import math

import torch

from .._dtypes import acc_dtype
import torch.nn.functional as F

KINDS = ("gaussian", "logistic")
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def log_scale_cap(dtype: torch.dtype) -> float:
    """The largest whole exponent whose ``exp`` is finite in ``dtype``: 88 (float32), 709 (float64)."""
    return float(math.floor(math.log(torch.finfo(dtype).max)))


def inverse_scale_factors(log_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``a * b = exp(-log_scales)`` in exact arithmetic and each factor finite.

    With ``t = -l`` and ``c`` = :func:`log_scale_cap`: ``a = exp(min(t, c))``, ``b = exp(min(t - min(t, c), c))``.
    For ``t <= c`` (every log-scale above -88 in float32) ``b = exp(0) = 1`` exactly, so ``(r * a) * b``
    rounds exactly as ``r * exp(-l)``. Past it, the two factors carry exponents up to ``2c`` (176 in
    float32), so ``u = (r * a) * b`` is finite and right wherever ``|r| exp(t)`` is representable - in
    particular ``u = 0`` at ``r = 0``, where ``r * exp(-l)`` gives ``0 * inf = NaN``. Beyond ``2c``, ``b``
    saturates at ``exp(c)``: u stays finite but too small, and only for residuals too small to matter
    (any float32 ``r != 0`` gives ``|u| > 1e31``, where a Gaussian's ``-u^2 / 2`` is ``-inf`` anyway;
    a logistic's ``-|u|`` is underestimated there, for scales below 1e-76).
    """
    cap = log_scale_cap(log_scales.dtype)
    t = -log_scales
    t_hi = t.clamp(max=cap)
    return torch.exp(t_hi), torch.exp((t - t_hi).clamp(max=cap))


def component_log_prob(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, kind: str) -> torch.Tensor:
    """Log-density of every component at x, summed over the D features: [..., K].

    x [..., D]; means, log_scales [..., K, D] (batch dims broadcast).
    """
    inv_hi, inv_lo = inverse_scale_factors(log_scales)
    u = ((x.unsqueeze(-2) - means) * inv_hi) * inv_lo
    # |u| past the dtype's range: the density there underflows to 0 (log -inf). It is computed from a
    # stand-in u = 0 and then replaced, so that autograd's 0 * inf cannot turn that component's (zero)
    # gradient into NaN. A NaN u stays NaN.
    overflow = u.isinf()
    u = torch.where(overflow, torch.zeros_like(u), u)
    if kind == "gaussian":
        per_dim = -0.5 * u * u - log_scales - HALF_LOG_2PI
    elif kind == "logistic":
        # sigmoid(u) sigmoid(-u) / s, in logs. (The textbook -u - 2 softplus(-u) is the same function,
        # but F.softplus turns linear above 20 and drops the e^-20 terms, ~1e-9, that float64 resolves.)
        per_dim = F.logsigmoid(u) + F.logsigmoid(-u) - log_scales
    else:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
    return torch.where(overflow, -math.inf, per_dim).sum(dim=-1)


def mixture_log_prob(x: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
                     kind: str, *, upcast: bool = False) -> torch.Tensor:
    """``log p(x)`` of a diagonal mixture of ``kind`` components; see the module docstring.

    Args:
        x: [..., D] data.
        logits: [..., K] unnormalised mixture weights (normalised here with a log-softmax).
        means, log_scales: [..., K, D] component locations and log-scales.
        kind: ``"gaussian"`` or ``"logistic"``.
        upcast: compute in float64 (for tolerance studies); the result keeps :func:`fastdensity._dtypes.acc_dtype`.

    Returns:
        [broadcast batch shape] log-likelihood per sample, in :func:`fastdensity._dtypes.acc_dtype` of x.
    """
    out_dtype = acc_dtype(x.dtype)
    compute = torch.float64 if upcast else out_dtype
    x, logits, means, log_scales = (t.to(compute) for t in (x, logits, means, log_scales))
    log_pi = torch.log_softmax(logits, dim=-1)
    return torch.logsumexp(log_pi + component_log_prob(x, means, log_scales, kind), dim=-1).to(out_dtype)


def gaussian_mixture_log_prob(x, logits, means, log_scales, *, upcast: bool = False) -> torch.Tensor:
    """Diagonal Gaussian mixture: components N(mu_kd, exp(l_kd)^2) per feature."""
    return mixture_log_prob(x, logits, means, log_scales, "gaussian", upcast=upcast)


def logistic_mixture_log_prob(x, logits, means, log_scales, *, upcast: bool = False) -> torch.Tensor:
    """Mixture of continuous logistic components with location mu_kd and scale exp(l_kd) per feature."""
    return mixture_log_prob(x, logits, means, log_scales, "logistic", upcast=upcast)
