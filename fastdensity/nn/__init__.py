"""Layers built on ``fastdensity.ops``: invertible transforms for flows, masked autoregressive layers
and mixture densities. Every transform maps data -> noise in ``forward(x, context=None) -> (z, logabsdet)``
and back in ``inverse(z, context=None) -> (x, logabsdet)``, as in nflows.
"""

from .base import CompositeTransform, InverseTransform, Transform
from .coupling import AdditiveCoupling, AffineCoupling
from .invconv import InvConv1x1
from .normalization import ActNorm
from .permutations import Permutation, RandomPermutation, ReversePermutation
from .reshape import Squeeze
