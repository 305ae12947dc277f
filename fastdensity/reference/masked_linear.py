"""Reference masked linear layer: the ground truth the tile-skipping Triton kernel is judged against.

Written for clarity, never optimised: the masked weight is materialised and handed to ``F.linear``::

    Wm = where(mask != 0, weight, 0)             [out, in]
    y  = x @ Wm^T + bias                         [..., out]

so every gradient comes from autograd: grad_weight = (g^T x) * [mask != 0], exactly zero under the
mask, and no gradient for the mask itself. The mask is a connectivity pattern, not a scale: any
non-zero entry keeps its weight. ``where`` rather than ``weight * mask`` keeps a NaN stored under a
zero of the mask out of the result, as the kernel (which never reads those weights) does; for finite
weights and a 0/1 mask the two are the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` with the entries where ``mask`` is zero replaced by exact zeros."""
    return torch.where(mask != 0, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    upcast: bool = False,
) -> torch.Tensor:
    """``x @ (weight * mask)^T + bias`` in plain PyTorch.

    Args:
        x: [..., in].
        weight: [out, in], x's dtype.
        mask: [out, in], bool or numeric; non-zero entries keep their weight.
        bias: [out] or None.
        upcast: compute in float64 and cast the result back (for tolerance studies).

    Returns:
        [..., out] in x's dtype.
    """
    out_dtype = x.dtype
    if upcast:
        x, weight = x.double(), weight.double()
        bias = None if bias is None else bias.double()
    return F.linear(x, masked_weight(weight, mask), bias).to(out_dtype)
