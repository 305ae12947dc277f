"""Layers built on ``fastdensity.ops``: invertible transforms for flows, masked autoregressive layers
and mixture densities. Every transform maps data -> noise in ``forward(x, context=None) -> (z, logabsdet)``
and back in ``inverse(z, context=None) -> (x, logabsdet)``, as in nflows; a transform that cannot use a
context refuses one (``conditional = False``) rather than ignoring it (see :mod:`fastdensity.nn.base`).
"""

from .autoregressive import MaskedAffineAutoregressive, MaskedAffineAutoregressiveTransform
from .base import CompositeTransform, InverseTransform, Transform
from .coupling import AdditiveCoupling, AffineCoupling
from .dmol import DiscretizedLogisticMixture
from .invconv import InvConv1x1
from .made import MADE
from .masked_conv import MaskedConv2d
from .masked_linear import MaskedLinear
from .mixtures import GaussianMixture
from .normalization import ActNorm
from .permutations import Permutation, RandomPermutation, ReversePermutation
from .reshape import Squeeze
from .spline import (MaskedPiecewiseRationalQuadraticAutoregressive, PiecewiseRationalQuadraticCDF,
                     PiecewiseRationalQuadraticCoupling)
