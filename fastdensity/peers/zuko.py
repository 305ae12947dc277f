"""Fused drop-ins for zuko (imported by :func:`fastdensity.accelerate` only when a model holds zuko modules).

zuko builds its transforms lazily: ``MaskedAutoregressiveTransform(c)`` (and ``GeneralCouplingTransform``,
zuko's RealNVP/NICE coupling) returns a ``torch.distributions`` transform whose ``meta(c, x)`` turns the
hyper network's output into a univariate transform. The fused classes keep everything and replace
``meta``: its univariate transform becomes a fused one, chosen from :data:`UNIVARIATE` by zuko's
univariate class. zuko's ``MaskedLinear`` (the layers of ``MaskedMLP``) runs ``ops.masked_linear``.

``MonotonicAffineTransform(shift, scale, slope=1e-3)``: zuko soft-clips the scale,
``log s = u / (1 + |u / log(slope)|)``, and maps ``y = x exp(log s) + shift``, log-det sum log s over
the last dim; :class:`FusedMonotonicAffine` forms the same ``log s`` and runs the rest as one
``ops.affine_coupling(..., scale="exp")``.
"""
from __future__ import annotations

import functools
import math

import torch
from torch.distributions import Transform, constraints
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.flows.coupling import GeneralCouplingTransform
from zuko.nn import MaskedLinear
from zuko.transforms import MonotonicAffineTransform
from zuko.utils import broadcast

from .. import ops

__all__ = ["FusedMonotonicAffine", "FusedMaskedAutoregressiveTransform", "FusedGeneralCouplingTransform",
           "FusedMaskedLinear", "UNIVARIATE"]


class FusedMonotonicAffine(Transform):
    """zuko's ``DependentTransform(MonotonicAffineTransform(shift, scale), 1)`` on the fused op:
    ``y = x exp(log s) + shift`` with ``log s = scale / (1 + |scale / log(slope)|)``, the log-det summed
    over the last dim. Shapes: x, shift, scale broadcast to [..., D]."""

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True
    sign = +1

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor, slope: float = 1e-3):
        super().__init__()
        self.shift = shift
        self.log_scale = scale / (1 + abs(scale / math.log(slope)))

    def _run(self, x: torch.Tensor, inverse: bool):
        x, shift, log_scale = torch.broadcast_tensors(x, self.shift.to(x.dtype), self.log_scale.to(x.dtype))
        features = x.shape[-1]
        y, ladj = ops.affine_coupling(x.reshape(-1, features), shift.reshape(-1, features),
                                      log_scale.reshape(-1, features), scale="exp", inverse=inverse)
        return y.view(x.shape), ladj.view(x.shape[:-1])

    def _call(self, x):
        return self._run(x, inverse=False)[0]

    def _inverse(self, y):
        return self._run(y, inverse=True)[0]

    def log_abs_det_jacobian(self, x, y):
        return torch.broadcast_tensors(x, self.log_scale)[1].sum(-1)

    def call_and_ladj(self, x):
        return self._run(x, inverse=False)


#: zuko univariate class -> ``f(*phi, **keywords) -> fused transform`` for the parameters ``phi`` that
#: zuko's ``unpack`` makes of the hyper network's output (one tensor per entry of the lazy transform's
#: shapes) and the keywords of a ``functools.partial`` of the class (zuko's NSF passes ``bound`` so)
UNIVARIATE = {MonotonicAffineTransform: FusedMonotonicAffine}


def _univariate(constructor) -> tuple[object, dict]:
    """``(zuko class, keyword arguments)`` of a lazy transform's univariate constructor: the class itself,
    or a ``functools.partial`` of it with keywords only."""
    if isinstance(constructor, functools.partial) and not constructor.args:
        return constructor.func, dict(constructor.keywords)
    return constructor, {}


class _FusedMeta:
    """``meta(c, x)`` as zuko's, with the univariate transform from :data:`UNIVARIATE`."""

    _fastdensity_fused = True
    fused_ops = "meta(): the univariate transform fused (ops.affine_coupling for the affine one)"

    @classmethod
    def unsupported(cls, module):
        univariate, _ = _univariate(module.univariate)
        if univariate not in UNIVARIATE:
            name = getattr(univariate, "__name__", type(univariate).__name__)
            return (f"univariate transform {name}: no fused version registered (registered: "
                    f"{', '.join(c.__name__ for c in UNIVARIATE)}); its hyper network is still handled")
        return None

    def meta(self, c, x):
        if c is not None:
            x = torch.cat(broadcast(x, c, ignore=1), dim=-1)
        phi = self.hyper(x).unflatten(-1, (-1, self.total))
        params, start = [], 0
        for shape in self.shapes:  # zuko's unpack: consecutive slices of the last dim, reshaped
            size = math.prod(shape)
            params.append(phi[..., start:start + size].unflatten(-1, (*shape, 1)).squeeze(-1))
            start += size
        univariate, keywords = _univariate(self.univariate)
        return UNIVARIATE[univariate](*params, **keywords)


class FusedMaskedAutoregressiveTransform(_FusedMeta, MaskedAutoregressiveTransform):
    pass


class FusedGeneralCouplingTransform(_FusedMeta, GeneralCouplingTransform):
    pass


class FusedMaskedLinear(MaskedLinear):
    _fastdensity_fused = True
    fused_ops = "ops.masked_linear"

    def forward(self, x):
        return ops.masked_linear(x, self.weight, self.mask, self.bias)
