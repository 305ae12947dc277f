"""Public functional API: one function per op, each validating its arguments and dispatching.

Every function checks its inputs (the same errors whichever backend runs), then asks
:func:`fastdensity.backend.use_kernels` whether the Triton kernel (registered as
``torch.ops.fastdensity.<op>``) or the reference in :mod:`fastdensity.reference` runs. Both paths
are differentiable in every input and compile under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import torch

from . import backend
from ._validation import check_choice, check_same, check_tensor
from .reference import coupling as _ref_coupling

backend.load_kernels("coupling")

__all__ = ["affine_coupling"]


def affine_coupling(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale_raw: torch.Tensor | None = None,
    *,
    scale: str = "sigmoid",
    inverse: bool = False,
    clamp: float = _ref_coupling.DEFAULT_CLAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused affine coupling: ``y = x * s + shift`` with ``s = scale_fn(scale_raw)`` and its log-det.

    Args:
        x: [B, ...] the part of the input the coupling transforms (any layout).
        shift: same shape, dtype and device as x; may be a strided view such as ``h[:, 0::2]``
            or one half of ``h.chunk(2, 1)``, read in place.
        scale_raw: like ``shift``; the unconstrained scale. Not read (may be None) for "additive".
        scale: ``"sigmoid"`` (s = sigmoid(h + 2) + 1e-3, Glow/nflows), ``"exp"`` (s = exp(h)),
            ``"softclamp"`` (s = exp(c tanh(h / c))) or ``"additive"`` (s = 1, NICE).
        inverse: compute ``x = (y - shift) / s`` from ``y`` (passed as ``x``) instead.
        clamp: ``c`` of "softclamp": |log s| stays below it.

    Returns:
        ``(y, logdet)``: y [B, ...] like x; logdet [B] = sum of log s over all non-batch dims
        (negated for the inverse), float32 for half inputs and float64 for float64 inputs.
    """
    check_choice("scale", scale, _ref_coupling.SCALES)
    check_tensor("x", x, min_dim=1)
    check_tensor("shift", shift)
    tensors = {"x": x, "shift": shift}
    if scale != "additive":
        if scale_raw is None:
            raise ValueError(f"scale_raw is required for scale={scale!r} (only 'additive' has no scale)")
        tensors["scale_raw"] = check_tensor("scale_raw", scale_raw)
    check_same(tensors)
    if backend.use_kernels(x, "coupling"):
        return torch.ops.fastdensity.affine_coupling(x, shift, scale_raw, scale, bool(inverse), float(clamp))
    return _ref_coupling.affine_coupling(x, shift, scale_raw, scale=scale, inverse=inverse, clamp=clamp)
