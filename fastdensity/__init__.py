"""fastdensity: fused Triton kernels for explicit-density generative models in PyTorch.

Layers (``fastdensity.nn``), flows (:class:`Flow`), functional ops (``fastdensity.ops``), the
backend switch (:func:`set_backend`) and :func:`accelerate`, which swaps the pieces of an nflows, zuko
or normflows model for fused ones in place. See README.md for the tour.
"""
from . import backend, data, models, nn, ops
from .backend import get_backend, set_backend
from .distributions import ConditionalDiagonalNormal, DiagonalNormal, StandardNormal
from .flows import Flow
from .nn import CompositeTransform
from .peers import accelerate

__version__ = "0.1.0"

__all__ = [
    "backend", "data", "models", "nn", "ops", "get_backend", "set_backend", "Flow", "CompositeTransform", "StandardNormal",
    "DiagonalNormal", "ConditionalDiagonalNormal", "accelerate", "__version__",
]
