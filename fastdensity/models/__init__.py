"""Density models trained by maximum likelihood: the same config -> construct -> train path for all.

=================  ======================================================================================
``realnvp``        :class:`RealNVP`: affine coupling flow; MLP couplings for vectors, multi-scale
                   (checkerboard and channel couplings, squeeze, factor-out) for images
``glow``           :class:`Glow`: ActNorm -> invertible 1x1 conv -> affine coupling steps; multi-scale with
                   learned-prior splits for images
``maf``            :class:`MAF`: stacked MADE affine autoregressive transforms with permutations
``pixelcnn``       :class:`PixelCNN`: masked convolutions, gated residual blocks, discretized logistic
                   mixture head (discrete images)
``gmm``            :class:`GaussianMixture`: a diagonal Gaussian mixture
=================  ======================================================================================

Every model takes its per-example ``shape`` first and keyword arguments after; ``build_model(name,
shape, **kwargs)`` constructs one by name and ``model.config`` holds the arguments as plain values.
"""
from __future__ import annotations

from .base import DensityModel
from .glow import Glow
from .gmm import GaussianMixture
from .maf import MAF
from .pixelcnn import PixelCNN
from .realnvp import RealNVP

MODELS = {cls.name: cls for cls in (RealNVP, Glow, MAF, PixelCNN, GaussianMixture)}

__all__ = ["DensityModel", "RealNVP", "Glow", "MAF", "PixelCNN", "GaussianMixture", "MODELS", "build_model"]


def build_model(name: str, shape, **kwargs) -> DensityModel:
    """Construct the model registered as ``name`` for examples of ``shape`` with keyword ``kwargs``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    try:
        return MODELS[name](shape, **kwargs)
    except TypeError as exc:  # an unknown keyword: say which ones exist
        import inspect

        params = [p for p in inspect.signature(MODELS[name].__init__).parameters if p not in ("self", "shape")]
        raise ValueError(f"{name}: {exc}; its options are {', '.join(params)}") from None
