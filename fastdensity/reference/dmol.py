"""Reference discretized mixture of logistics (DMoL), PixelCNN++'s output distribution.

Written for clarity, never optimised: the ground truth the fused kernel (``kernels/dmol.py``) is
judged against, and the path every CPU call takes under the ``auto`` backend.

Data: ``x`` [B, C, H, W] with C = 3 (RGB) or 1, the integer pixel values 0 .. 2^bits - 1 mapped
linearly onto [-1, 1], so neighbouring values are ``2 h`` apart with the bin half-width
``h = 1 / (2^bits - 1)`` (1/255 for 8 bits).

Parameters: ``params`` [B, P, H, W] straight from the network, channels in PixelCNN++'s order::

    RGB, P = 10 K   [ logits (K) | R: means, log-scales, coeffs (3K) | G: ... (3K) | B: ... (3K) ]
    one channel,    [ logits (K) | means (K) | log-scales (K) ]
      P = 3 K

Per pixel, for component k (coefficients ``c_i = tanh(coeffs_i)``, log-scales clamped at -7)::

    mu_R = m_R                 mu_G = m_G + c_0 x_R              mu_B = m_B + c_1 x_R + c_2 x_G
    log p(x) = logsumexp_k [ log_softmax(logits)_k + sum_c log P(x_c | mu_ck, s_ck) ]

The coefficient block stored with colour i (``coeffs_i``) is c_i in this formula, whatever colour it
multiplies: c_0 and c_1 scale red, c_2 scales green, exactly as in PixelCNN++. The mean shift uses the
*data* values of the earlier channels, which makes the three channels an autoregressive chain inside
one pixel. With ``a = (x - mu + h) / s``, ``b = (x - mu - h) / s`` (the bin's edges, standardised)::

    x < -edge   (value 0)      log P = log sigmoid(a)                        open-ended lower bin
    x >  edge   (top value)    log P = log sigmoid(-b)                       open-ended upper bin
    otherwise                  log P = log(sigmoid(a) - sigmoid(b))          if that mass > 1e-5
                               log P = log pdf((x - mu) / s) - log s - log((2^bits - 1) / 2)   else

The last line is PixelCNN++'s fallback: the log-density at the bin centre times the bin width 2h,
used when the exact mass is too small to trust in floating point.

Two points where a constant had to be chosen:

* ``edge``: PixelCNN++ (8 bits) tests ``x < -0.999`` and ``x > 0.999``, 0.001 inside the extreme
  values, which is 0.255 of a bin half-width. Other bit depths keep that relative position:
  ``edge = 1 - 0.255 h`` (exactly 0.999 for 8 bits). Any threshold strictly between the last two
  grid values classifies grid data the same way; this one also matches PixelCNN++ off the grid.
  The fallback's log(127.5) becomes log((2^bits - 1) / 2) = -log(2h), the log bin width at any
  depth, and its 1e-5 threshold is kept as it is.
* the interior mass is evaluated as ``log sigmoid(a) + log sigmoid(-b) + log(1 - exp(-(a - b)))``,
  an identity of ``sigmoid(a) - sigmoid(b)`` that does not cancel when both sigmoids are close to 1
  (a bin in the upper tail): PixelCNN++'s literal difference loses every digit there in float32.
  In exact arithmetic the two are the same function; the 1e-5 test is applied to this value.

Output: the log-probability in nats (the training loss is its negative), [B, H, W] per pixel or
[B] summed over H and W; float32 for float16/bfloat16/float32 ``params`` and float64 for float64.
"""
from __future__ import annotations

import math

import torch

from .._dtypes import acc_dtype
import torch.nn.functional as F

REDUCTIONS = ("sum", "none")
DEFAULT_NUM_BITS = 8
#: PixelCNN++ floors the log-scales here: s >= exp(-7) ~ 9e-4, a quarter of an 8-bit bin.
LOG_SCALE_MIN = -7.0
#: Bin masses below this use the density at the bin centre instead (PixelCNN++'s constant).
MIN_BIN_MASS = 1e-5
#: PixelCNN++'s edge threshold 0.999 is 0.255 bin half-widths (0.255 / 255) inside the extreme values.
EDGE_MARGIN_BINS = 0.255


def num_levels(num_bits: int) -> int:
    """Number of grid steps, ``2^bits - 1`` (255 for 8 bits)."""
    return 2 ** int(num_bits) - 1


def bin_half_width(num_bits: int) -> float:
    """``h = 1 / (2^bits - 1)``: half the distance between neighbouring values on [-1, 1]."""
    return 1.0 / num_levels(num_bits)


def edge_threshold(num_bits: int) -> float:
    """|x| beyond this uses an open-ended edge bin: 0.999 for 8 bits, ``1 - 0.255 h`` in general."""
    return 1.0 - EDGE_MARGIN_BINS / num_levels(num_bits)


def log_half_levels(num_bits: int) -> float:
    """``log((2^bits - 1) / 2) = -log(2 h)``, the fallback's log bin width with its sign flipped."""
    return math.log(num_levels(num_bits) / 2.0)


def num_params(num_mixtures: int, channels: int = 3) -> int:
    """Channels the network must produce: ``10 K`` for RGB, ``3 K`` for one channel."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels!r}")
    return (10 if channels == 3 else 3) * int(num_mixtures)


def mixture_count(param_channels: int, channels: int) -> int:
    """K from the params' channel count, or a ``ValueError`` that states the expected count."""
    per, other = (10, 3) if channels == 3 else (3, 10)
    if param_channels > 0 and param_channels % per == 0:
        return param_channels // per
    if channels == 3:
        layout = "three colour channels (K logits, then for each colour K means, K log-scales, K coefficients)"
    else:
        layout = "one channel (K logits, K means, K log-scales)"
    hint = ""
    if param_channels > 0 and param_channels % other == 0:
        hint = f"; {param_channels} = {other}K would suit x with {'one channel' if channels == 3 else 'three channels'}"
    raise ValueError(f"params must have {per}K channels for x with {layout}, K the number of mixture "
                     f"components, e.g. {per * 10} for K=10; got {param_channels}{hint}")


def split_params(params: torch.Tensor, channels: int):
    """Unpack ``params`` [B, P, H, W] into PixelCNN++'s pieces (views wherever the layout allows).

    Returns ``(logits, means, log_scales, coeffs)``: logits [B, K, H, W]; means and raw log-scales
    [B, C, K, H, W]; raw coefficients [B, 3, K, H, W] for RGB (stored with colour i, used as c_i)
    or None for one channel. Nothing is clamped or squashed here.
    """
    B, P, H, W = params.shape
    K = mixture_count(P, channels)
    logits = params[:, :K]
    rest = params[:, K:].reshape(B, channels, 3 if channels == 3 else 2, K, H, W)
    coeffs = rest[:, :, 2] if channels == 3 else None
    return logits, rest[:, :, 0], rest[:, :, 1], coeffs


def coupled_means(means: torch.Tensor, coeffs: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Per-component means after PixelCNN++'s channel coupling, [B, C, K, H, W].

    ``means`` [B, C, K, H, W]; ``coeffs`` the raw coefficients [B, 3, K, H, W] (tanh applied here) or
    None for one channel; ``x`` [B, C, H, W] the data (earlier channels shift the later means).
    """
    if coeffs is None:
        return means
    c = torch.tanh(coeffs)
    x_r, x_g = x[:, 0:1], x[:, 1:2]  # [B, 1, H, W], broadcast over K
    mu_r = means[:, 0]
    mu_g = means[:, 1] + c[:, 0] * x_r
    mu_b = means[:, 2] + c[:, 1] * x_r + c[:, 2] * x_g
    return torch.stack([mu_r, mu_g, mu_b], dim=1)


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                  num_bits: int = DEFAULT_NUM_BITS) -> torch.Tensor:
    """log P(x) of one discretized logistic per element, PixelCNN++'s four cases (module docstring).

    ``x``, ``mean`` and ``log_scale`` (already clamped at -7) broadcast against each other.
    """
    h = bin_half_width(num_bits)
    edge = edge_threshold(num_bits)
    inv_s = torch.exp(-log_scale)
    centred = x - mean
    a = inv_s * (centred + h)  # upper edge of the bin, standardised
    b = inv_s * (centred - h)  # lower edge
    mid = inv_s * centred
    log_cdf_upper = F.logsigmoid(a)  # log P(X < x + h): the lowest value's bin
    log_sf_lower = F.logsigmoid(-b)  # log P(X > x - h): the highest value's bin
    # sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(-(a - b))), with a - b = 2h / s.
    # The clamp only keeps log(0) (and its infinite derivative) out of the unselected branch when
    # exp(-log_scale) underflows; such a bin always takes the fallback.
    one_minus = (-torch.expm1(-2.0 * h * inv_s)).clamp_min(torch.finfo(inv_s.dtype).tiny)
    log_mass = log_cdf_upper + log_sf_lower + torch.log(one_minus)
    # The logistic density at the centre, sigmoid(mid) sigmoid(-mid) / s, in logs. (PixelCNN++ writes
    # mid - log s - 2 softplus(mid), the same function; F.softplus turns linear above 20 and would drop
    # the e^-20 terms.)
    log_pdf_mid = F.logsigmoid(mid) + F.logsigmoid(-mid) - log_scale
    log_fallback = log_pdf_mid - log_half_levels(num_bits)
    interior = torch.where(log_mass > math.log(MIN_BIN_MASS), log_mass, log_fallback)
    return torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_sf_lower, interior))


#: Compute and output dtype of a params dtype (the library-wide rule: float64 stays, the rest float32).
compute_dtype = acc_dtype


def dmol_log_prob(x: torch.Tensor, params: torch.Tensor, *, num_bits: int = DEFAULT_NUM_BITS,
                  reduction: str = "sum", upcast: bool = False) -> torch.Tensor:
    """log p(x) under PixelCNN++'s discretized mixture of logistics, in plain PyTorch.

    Args:
        x: [B, C, H, W], C in {1, 3}, values on [-1, 1] (pixel values v mapped to 2 v / (2^bits - 1) - 1).
        params: [B, 10K, H, W] for C = 3 or [B, 3K, H, W] for C = 1, channel order in the module docstring.
        num_bits: bit depth of the data (8 for ordinary images).
        reduction: ``"sum"`` -> [B], summed over H and W; ``"none"`` -> [B, H, W].
        upcast: compute in float64 and cast the result back (for tolerance studies).

    Returns:
        The log-likelihood in nats, float32 (float64 for float64 ``params``).
    """
    out_dtype = compute_dtype(params.dtype)
    work = torch.float64 if upcast else out_dtype
    x, params = x.to(work), params.to(work)
    C = x.shape[1]
    logits, means, log_scales, coeffs = split_params(params, C)
    mu = coupled_means(means, coeffs, x)  # [B, C, K, H, W]
    log_scales = log_scales.clamp(min=LOG_SCALE_MIN)
    per_channel = discretized_logistic_log_prob(x.unsqueeze(2), mu, log_scales, num_bits)
    # The colours' log-probs add inside each component, before the mixture's log-sum-exp over K.
    per_component = per_channel.sum(dim=1) + torch.log_softmax(logits, dim=1)  # [B, K, H, W]
    per_pixel = torch.logsumexp(per_component, dim=1)  # [B, H, W]
    out = per_pixel.sum(dim=(1, 2)) if reduction == "sum" else per_pixel
    return out.to(out_dtype)
