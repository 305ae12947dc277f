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

``MonotonicRQSTransform(widths, heights, derivatives, bound=5.0, slope=1e-3)`` (zuko's NSF and its
coupling form, ``NSF(passes=2)``): :class:`FusedMonotonicRQS` runs
``ops.rational_quadratic_spline(x, widths, heights, derivatives, parameterization="zuko")``, the three
parameter tensors being slices of the hyper network's output read in place; the log-det is summed over
the last dim (zuko's ``DependentTransform(..., 1)``).
"""
from __future__ import annotations

import functools
import math

import torch
from torch.distributions import Transform, constraints
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.flows.coupling import GeneralCouplingTransform
from zuko.nn import MaskedLinear
from zuko.transforms import MonotonicAffineTransform, MonotonicRQSTransform
from zuko.utils import broadcast

from .. import backend, ops

__all__ = ["FusedMonotonicAffine", "FusedMonotonicRQS", "FusedMaskedAutoregressiveTransform",
           "FusedGeneralCouplingTransform", "FusedMaskedLinear", "UNIVARIATE"]


class _FusedUnivariate(Transform):
    """What the fused univariate transforms share: zuko's ``DependentTransform(..., 1)`` interface over a
    ``_run(x, inverse) -> (y, log-det summed over the last dim)`` that subclasses define."""

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True
    sign = +1

    def _call(self, x):
        return self._run(x, inverse=False)[0]

    def _inverse(self, y):
        return self._run(y, inverse=True)[0]

    def call_and_ladj(self, x):
        return self._run(x, inverse=False)


class FusedMonotonicAffine(_FusedUnivariate):
    """zuko's ``DependentTransform(MonotonicAffineTransform(shift, scale), 1)`` on the fused op:
    ``y = x exp(log s) + shift`` with ``log s = scale / (1 + |scale / log(slope)|)``, the log-det summed
    over the last dim. Shapes: x, shift, scale broadcast to [..., D]."""

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

    def log_abs_det_jacobian(self, x, y):
        return torch.broadcast_tensors(x, self.log_scale)[1].sum(-1)


class FusedMonotonicRQS(_FusedUnivariate):
    """zuko's ``DependentTransform(MonotonicRQSTransform(widths, heights, derivatives, bound, slope), 1)`` on
    the fused op (parameterisation "zuko": soft-clipped logits, exp slopes, the identity outside
    [-bound, bound]). Shapes: x [..., D]; widths, heights [..., D, K]; derivatives [..., D, K - 1], their
    batch dims broadcasting with x's. The log-det is summed over D."""

    def __init__(self, widths: torch.Tensor, heights: torch.Tensor, derivatives: torch.Tensor, bound: float = 5.0,
                 slope: float = 1e-3):
        super().__init__()
        self.widths, self.heights, self.derivatives = widths, heights, derivatives
        self.bound, self.slope = float(bound), float(slope)

    def _run(self, x: torch.Tensor, inverse: bool):
        shape = torch.broadcast_shapes(x.shape, self.widths.shape[:-1])
        features = shape[-1]

        def rows(t, *last):  # [..., D, *last] -> [rows, D, *last]: a view unless broadcasting made a copy
            return t.to(x.dtype).expand(*shape, *last).reshape(-1, features, *last)

        K = self.widths.shape[-1]
        y, ladj = ops.rational_quadratic_spline(
            rows(x), rows(self.widths, K), rows(self.heights, K), rows(self.derivatives, K - 1), inverse=inverse,
            bound=self.bound, parameterization="zuko", slope=self.slope)
        return y.view(shape), ladj.view(shape[:-1])

    def log_abs_det_jacobian(self, x, y):
        return self._run(x, inverse=False)[1]


#: zuko univariate class -> ``f(*phi, **keywords) -> fused transform`` for the parameters ``phi`` that
#: zuko's ``unpack`` makes of the hyper network's output (one tensor per entry of the lazy transform's
#: shapes) and the keywords of a ``functools.partial`` of the class (zuko's NSF passes ``bound`` so)
UNIVARIATE = {MonotonicAffineTransform: FusedMonotonicAffine,
              MonotonicRQSTransform: FusedMonotonicRQS}


def _univariate(constructor) -> tuple[object, dict]:
    """``(zuko class, keyword arguments)`` of a lazy transform's univariate constructor: the class itself,
    or a ``functools.partial`` of it with keywords only."""
    if isinstance(constructor, functools.partial) and not constructor.args:
        return constructor.func, dict(constructor.keywords)
    return constructor, {}


class _FusedMeta:
    """``meta(c, x)`` as zuko's, with the univariate transform from :data:`UNIVARIATE`."""

    _fastdensity_fused = True
    fused_ops = ("meta(): the univariate transform fused (ops.affine_coupling for the affine one, "
                 "ops.rational_quadratic_spline for the spline)")

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
        if not backend.use_kernels(x, "masked_linear"):
            # as in fastdensity.peers.nflows.FusedMaskedLinear: zuko's own product on the reference path
            return super().forward(x)
        return ops.masked_linear(x, self.weight, self.mask, self.bias)
