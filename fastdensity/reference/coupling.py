"""Reference affine coupling: the ground truth the Triton kernel is judged against.

Written for clarity, never optimised. Forward (data -> noise):

    s      = scale_fn(scale_raw)
    y      = x * s + shift
    logdet = sum over all non-batch dims of log s                       shape [B]

Inverse: x = (y - shift) / s, logdet = -sum log s.

Scale functions (``h`` is ``scale_raw``):

    "exp"        s = exp(h)                        log s = h
    "softclamp"  s = exp(c * tanh(h / c))          log s = c * tanh(h / c)   (|log s| < c)
    "sigmoid"    s = sigmoid(h + 2) + 1e-3         Glow's choice and nflows' coupling default
    "softplus"   s = softplus(h) + 1e-3            nflows' MAF; log s = log(softplus(h) + 1e-3)
    "additive"   s = 1                             NICE; scale_raw is not read, logdet = 0

softplus is PyTorch's ``F.softplus`` (log(1 + exp(h)), and h itself past h = 20), as nflows calls it.

The log-det is returned in float32 for half-precision inputs and float64 for float64 inputs: a sum of
thousands of log-scales in bf16 would keep about three significant digits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dtypes import acc_dtype

SCALES = ("exp", "softclamp", "sigmoid", "softplus", "additive")
SIGMOID_OFFSET = 2.0
SIGMOID_EPS = 1e-3
SOFTPLUS_EPS = 1e-3
DEFAULT_CLAMP = 2.0


def scale_and_log_scale(scale_raw: torch.Tensor, scale: str, clamp: float = DEFAULT_CLAMP):
    """``(s, log s)`` for a scale function name; both have ``scale_raw``'s shape and dtype."""
    if scale == "exp":
        return torch.exp(scale_raw), scale_raw
    if scale == "softclamp":
        log_s = clamp * torch.tanh(scale_raw / clamp)
        return torch.exp(log_s), log_s
    if scale == "sigmoid":
        s = torch.sigmoid(scale_raw + SIGMOID_OFFSET) + SIGMOID_EPS
        return s, torch.log(s)
    if scale == "softplus":
        s = F.softplus(scale_raw) + SOFTPLUS_EPS
        return s, torch.log(s)
    raise ValueError(f"scale must be one of {[name for name in SCALES if name != 'additive']} here; got {scale!r}")


def affine_coupling(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale_raw: torch.Tensor | None,
    *,
    scale: str = "sigmoid",
    inverse: bool = False,
    clamp: float = DEFAULT_CLAMP,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling ``y = x * s + shift`` and its log-det, in plain PyTorch.

    Args:
        x: [B, ...] the transformed half of the input (or of the output, with ``inverse=True``).
        shift, scale_raw: same shape as ``x``; ``scale_raw`` is ignored (may be None) for "additive".
        upcast: compute in float64 and cast the result back (for tolerance studies).

    Returns:
        ``(y, logdet)``: y like x; logdet [B] in :func:`fastdensity._dtypes.acc_dtype` of x.
    """
    out_dtype = x.dtype
    if upcast:
        x, shift = x.double(), shift.double()
        scale_raw = None if scale_raw is None else scale_raw.double()
    acc = acc_dtype(out_dtype)
    dims = tuple(range(1, x.dim()))
    if scale == "additive":
        y = x - shift if inverse else x + shift
        logdet = torch.zeros(x.shape[0], dtype=acc, device=x.device)
        return y.to(out_dtype), logdet
    s, log_s = scale_and_log_scale(scale_raw, scale, clamp)
    logdet = log_s.sum(dim=dims, dtype=acc) if dims else log_s.to(acc)
    if inverse:
        return ((x - shift) / s).to(out_dtype), (-logdet).to(acc)
    return (x * s + shift).to(out_dtype), logdet.to(acc)
