"""``MaskedLinear``: an ``nn.Linear`` whose weight is multiplied by a fixed 0/1 connectivity mask."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops

__all__ = ["MaskedLinear"]


class MaskedLinear(nn.Linear):
    """``y = x @ (weight * mask)^T + bias`` through :func:`fastdensity.ops.masked_linear`.

    A drop-in ``nn.Linear`` (same parameters, same initialisation, as nflows' ``MaskedLinear``) whose
    mask is a persistent bool buffer: it moves with ``.to()``, is saved in the ``state_dict`` and stays
    bool under ``.half()``/``.double()``. The weight itself is never written: entries under a zero of
    the mask keep whatever value they have, are never read, and get exactly zero gradient.

    Args:
        in_features, out_features: as ``nn.Linear``.
        mask: [out_features, in_features], bool or 0/1 numbers (stored as bool).
        bias: learn an additive bias.

    Shapes: input [..., in_features] -> output [..., out_features].
    """

    mask: torch.Tensor

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        mask = torch.as_tensor(mask)
        if mask.shape != (out_features, in_features):
            raise ValueError(f"mask must have shape [out_features, in_features] = ({out_features}, {in_features}); "
                             f"got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask must be bool or hold only 0 and 1 (it is a connectivity pattern, not a scale)")
            mask = mask != 0
        self.register_buffer("mask", mask.to(self.weight.device), persistent=True)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.masked_linear(input, self.weight, self.mask, self.bias)

    def extra_repr(self) -> str:
        density = self.mask.float().mean().item() if self.mask.numel() else 0.0
        return f"{super().extra_repr()}, mask_density={density:.3f}"
