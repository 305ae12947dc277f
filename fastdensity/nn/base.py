"""The transform interface shared by every invertible layer, and composition.

Conventions (nflows'): ``forward`` maps data to noise, ``inverse`` noise to data, and both return
``(outputs, logabsdet)`` with ``logabsdet`` of shape [B]: log |det d outputs / d inputs| per sample.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .._dtypes import acc_dtype

__all__ = ["Transform", "CompositeTransform", "InverseTransform"]


class Transform(nn.Module):
    """Base class: an invertible map with a tractable log-determinant.

    Subclasses implement ``forward(x, context=None) -> (z, logabsdet)`` (data -> noise) and
    ``inverse(z, context=None) -> (x, logabsdet)``, where ``logabsdet`` is [B].
    """

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None):
        raise NotImplementedError(f"{type(self).__name__} must implement forward(inputs, context=None)")

    def inverse(self, inputs: torch.Tensor, context: torch.Tensor | None = None):
        raise NotImplementedError(f"{type(self).__name__} is not invertible in closed form")


def zero_logdet(x: torch.Tensor) -> torch.Tensor:
    """A [B] log-det of zeros in the accumulation dtype (fp32, or fp64 for fp64 inputs)."""
    return torch.zeros(x.shape[0], dtype=acc_dtype(x.dtype), device=x.device)


def per_position_logdet(log_scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] log-det of a channel map applied alike at every position of x ([B, C] or [B, C, H, W]):
    ``H * W * sum(log_scales)`` for each sample, in the accumulation dtype.

    A real [B] tensor (not a stride-0 expand), so callers may update it in place.
    """
    positions = x.shape[2:].numel()  # H * W; 1 for [B, C]
    return (positions * log_scales.to(acc_dtype(x.dtype)).sum()).repeat(x.shape[0])


class CompositeTransform(Transform):
    """Apply transforms in sequence; the log-dets add (starting from zeros, as in nflows).

    ``inverse`` runs the inverses in reverse order.
    """

    def __init__(self, transforms: Iterable[Transform]):
        super().__init__()
        self._transforms = nn.ModuleList(transforms)

    def __len__(self) -> int:
        return len(self._transforms)

    def __getitem__(self, index: int) -> Transform:
        return self._transforms[index]

    @staticmethod
    def _cascade(x, transforms, context, direction: str):
        total = zero_logdet(x)
        for transform in transforms:
            x, logabsdet = getattr(transform, direction)(x, context)
            total = total + logabsdet
        return x, total

    def forward(self, inputs, context=None):
        return self._cascade(inputs, self._transforms, context, "forward")

    def inverse(self, inputs, context=None):
        return self._cascade(inputs, reversed(self._transforms), context, "inverse")


class InverseTransform(Transform):
    """Swap a transform's directions (e.g. to use a noise -> data layer as data -> noise)."""

    def __init__(self, transform: Transform):
        super().__init__()
        self._transform = transform

    def forward(self, inputs, context=None):
        return self._transform.inverse(inputs, context)

    def inverse(self, inputs, context=None):
        return self._transform(inputs, context)
