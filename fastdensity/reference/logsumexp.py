"""Reference log-sum-exp: the ground truth the Triton kernel is judged against.

Written for clarity, never optimised. Over one dim of length N::

    lse(x) = m + log sum_i exp(x_i - m),        m = max_i x_i

Subtracting the max keeps every exponent <= 0, so nothing overflows and the largest term is exactly 1.
Where the max is not finite the shift is 0 instead, which gives what ``torch.logsumexp`` gives:

    a row of -inf (or an empty row)   -> -inf     (log of a sum of zeros)
    a row containing +inf             -> +inf
    a row containing NaN              -> NaN

The gradient is the softmax of the row times the upstream gradient, ``g * exp(x_i - lse)``; like
torch, an all -inf row gets NaN gradients (0/0) and a +inf entry a NaN gradient (inf/inf).

Half-precision inputs are computed in float32 and the result is cast back to the input dtype, like
``torch.logsumexp``.
"""
from __future__ import annotations

import torch

from .._dtypes import acc_dtype


def logsumexp(x: torch.Tensor, dim: int = -1, keepdim: bool = False, *, upcast: bool = False) -> torch.Tensor:
    """``log(sum(exp(x), dim))`` computed stably, in plain PyTorch.

    Args:
        x: any shape; reduced over ``dim``.
        keepdim: keep the reduced dim with size 1.
        upcast: compute in float64 (for tolerance studies); the result is still cast to ``x.dtype``.

    Returns:
        ``x``'s shape without ``dim`` (or with size 1 there when ``keepdim``), dtype of ``x``.
    """
    out_dtype = x.dtype
    xa = x.to(torch.float64 if upcast else acc_dtype(x.dtype))
    if xa.dim() == 0:
        return x.clone()
    if xa.shape[dim] == 0:  # an empty sum: log 0
        shape = list(xa.shape)
        shape[dim] = 1
        out = xa.new_full(shape, float("-inf"))
        return (out if keepdim else out.squeeze(dim)).to(out_dtype)
    # The max is only a shift: the result does not depend on it, so no gradient flows through it.
    m = xa.detach().amax(dim=dim, keepdim=True)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    out = shift + torch.log(torch.exp(xa - shift).sum(dim=dim, keepdim=True))
    if not keepdim:
        out = out.squeeze(dim)
    return out.to(out_dtype)
