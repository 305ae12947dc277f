"""fastdensity: fused Triton kernels for explicit-density generative models in PyTorch.

Layers (``fastdensity.nn``), flows (:class:`Flow`), functional ops (``fastdensity.ops``) and the
backend switch (:func:`set_backend`). See README.md for the tour.
"""
from . import backend, data, models, nn, ops
from .backend import get_backend, set_backend
from .distributions import DiagonalNormal, StandardNormal
from .flows import Flow
from .nn import CompositeTransform

__version__ = "0.1.0"

__all__ = [
    "backend", "data", "models", "nn", "ops", "get_backend", "set_backend", "Flow", "CompositeTransform", "StandardNormal",
    "DiagonalNormal", "__version__",
]
