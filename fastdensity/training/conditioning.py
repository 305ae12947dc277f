"""Class-conditional training (``fastdensity train --conditional``): which option a model conditions on the
data's labels through, and the context tensor it takes.

A model is conditioned on K classes through its own conditioning option:

* ``num_classes=K`` (TarFlow): the context is the int64 labels [B] (a learned embedding per class);
* ``context_features=K`` (MAF, NSF, and RealNVP / Glow on vectors): the context is the labels one-hot,
  [B, K] in the model's dtype.

A model with neither option cannot be conditioned (a ValueError that names the models that can).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["conditioning_option", "label_context", "sample_labels", "model_classes"]


def conditioning_option(cls) -> Optional[str]:
    """``"num_classes"`` or ``"context_features"``: the option through which ``cls`` takes class labels (None
    when it takes neither)."""
    params = inspect.signature(cls.__init__).parameters
    for name in ("num_classes", "context_features"):
        if name in params:
            return name
    return None


def label_context(model, labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The context ``model`` takes for class ``labels`` [B] (None for None), on the model's device: the
    labels themselves for a ``num_classes`` model, else their one-hot rows [B, K] in the model's dtype."""
    if labels is None:
        return None
    like = next(model.parameters())
    if getattr(model, "num_classes", None) is not None:
        return labels.to(device=like.device, dtype=torch.long)
    return F.one_hot(labels.long(), model.context_features).to(device=like.device, dtype=like.dtype)


def sample_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Labels for ``num_samples`` samples spread over all classes in order, class by class (an image grid
    of them reads row by row: 0s, then 1s, ...): ``floor(i K / n)`` for i = 0..n-1."""
    return torch.arange(num_samples) * num_classes // max(num_samples, 1)


def model_classes(model) -> int:
    """K of a class-conditional model: its ``num_classes``, else its ``context_features`` (one-hot rows)."""
    k = getattr(model, "num_classes", None)
    return int(k if k is not None else model.context_features)
