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

Sampling: zuko inverts a fully autoregressive ``MaskedAutoregressiveTransform`` (MAF, NSF) by D passes of
its hyper network; the fused one inverts it computing each hidden unit once, in D small steps
(:class:`ZukoMADEView` gives :mod:`fastdensity.sampling.made_incremental` the degrees read off zuko's
masks), with zuko's answer to round-off. It applies where no autograd graph is needed - zuko's
``sample`` runs under ``no_grad`` - and to a plain ``MaskedMLP``; a residual one, ``passes`` below the
feature count, or a custom adjacency keep zuko's passes.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.distributions import Transform, constraints
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.flows.coupling import GeneralCouplingTransform
from zuko.nn import MaskedLinear
from zuko.transforms import AutoregressiveTransform, MonotonicAffineTransform, MonotonicRQSTransform
from zuko.utils import broadcast

from .. import backend, ops
from ..reference.masked_linear import masked_weight
from ..sampling.made_incremental import incremental_made_inverse, needs_graph
from ..sampling.made_incremental import incremental_unsupported as made_unsupported

__all__ = ["FusedMonotonicAffine", "FusedMonotonicRQS", "FusedMaskedAutoregressiveTransform",
           "FusedGeneralCouplingTransform", "FusedMaskedLinear", "UNIVARIATE", "ZukoMADEView",
           "incremental_unsupported"]


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


def monotonic_log_scale(scale: torch.Tensor, log_slope: float) -> torch.Tensor:
    """zuko's soft-clipped log-scale of ``MonotonicAffineTransform``: ``scale / (1 + |scale / log(slope)|)``."""
    return scale / (1 + (scale / log_slope).abs())


class FusedMonotonicAffine(_FusedUnivariate):
    """zuko's ``DependentTransform(MonotonicAffineTransform(shift, scale), 1)`` on the fused op:
    ``y = x exp(log s) + shift`` with ``log s = scale / (1 + |scale / log(slope)|)``, the log-det summed
    over the last dim. Shapes: x, shift, scale broadcast to [..., D]."""

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor, slope: float = 1e-3):
        super().__init__()
        self.shift = shift
        self.log_scale = monotonic_log_scale(scale, math.log(slope))

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
        return self.univariate_of(self.hyper(x).unflatten(-1, (-1, self.total)))

    def univariate_of(self, phi: torch.Tensor) -> _FusedUnivariate:
        """The fused univariate transform of the hyper network's output ``phi`` [..., D, total]."""
        params, start = [], 0
        for shape in self.shapes:  # zuko's unpack: consecutive slices of the last dim, reshaped
            size = math.prod(shape)
            params.append(phi[..., start:start + size].unflatten(-1, (*shape, 1)).squeeze(-1))
            start += size
        univariate, keywords = _univariate(self.univariate)
        return UNIVARIATE[univariate](*params, **keywords)

    def column_solver(self, rows: torch.Tensor):
        """``solve(d, params [total, B], out [B])`` for the incremental inverse of outputs ``rows`` [B, D]:
        feature d's input from its parameters. The affine transform's is written out - once per feature,
        the op's argument checks would cost more than its arithmetic - as :class:`FusedMonotonicAffine`
        computes it; any other goes through the fused univariate transform on one column."""
        univariate, keywords = _univariate(self.univariate)
        if univariate is MonotonicAffineTransform:
            log_slope = math.log(keywords.get("slope", 1e-3))
            columns = rows.t().contiguous()

            def solve_affine(d: int, p: torch.Tensor, out: torch.Tensor) -> None:
                shift, scale = p[0], p[1]  # zuko's order: MonotonicAffineTransform(shift, scale)
                torch.div(columns[d] - shift, torch.exp(monotonic_log_scale(scale, log_slope)), out=out)

            return solve_affine

        def solve(d: int, p: torch.Tensor, out: torch.Tensor) -> None:
            out.copy_(self.univariate_of(p.t()[:, None, :]).inv(rows[:, d:d + 1])[:, 0])

        return solve


# ---------------------------------------------------------------------------------------------------
# The incremental inverse of a fully autoregressive MaskedAutoregressiveTransform (sampling)
# ---------------------------------------------------------------------------------------------------


class _LayerView:
    """A zuko ``MaskedLinear`` restricted to some input columns, as the incremental inverse reads a layer."""

    def __init__(self, layer: MaskedLinear, columns: slice = slice(None)):
        self.weight, self.mask = layer.weight[:, columns], layer.mask[:, columns]
        self.bias, self.out_features = layer.bias, layer.out_features


class ZukoMADEView:
    """The plain ``MaskedMLP`` hyper network of a fully autoregressive zuko ``MaskedAutoregressiveTransform``
    (``passes`` = features), presented with the attributes of :class:`fastdensity.nn.MADE` that
    :func:`fastdensity.sampling.incremental_made_inverse` reads, over the same parameters.

    zuko gives its hidden units no degrees: they are read off the masks. Feature i sits at position
    ``order[i]``; a first-layer unit's degree is 1 + the last position it reads (0 if it reads only the
    context), a later unit's the largest degree among the units it reads, so a unit of degree q depends on
    positions < q only (the incremental inverse checks every mask against these degrees). The context,
    concatenated to x as extra input columns by zuko, enters the first layer only: its term is
    ``W0[:, D:] c``."""

    use_residual_blocks = False
    batch_norms = None

    def __init__(self, transform: MaskedAutoregressiveTransform):
        self._hyper = transform.hyper
        linears = [m for m in transform.hyper if isinstance(m, MaskedLinear)]
        D = int(transform.order.numel())
        self.features, self.output_multiplier = D, transform.total
        self.ordering = transform.order
        self.generation_order = torch.argsort(transform.order)
        self.activation = next(m for m in transform.hyper if not isinstance(m, MaskedLinear))
        self.input_layer = _LayerView(linears[0], slice(0, D))
        self.hidden_layers = [_LayerView(layer) for layer in linears[1:-1]]
        self.output_layer = _LayerView(linears[-1])
        self.num_blocks = len(self.hidden_layers)
        degrees = ((self.input_layer.mask.long() * (self.ordering[None, :] + 1)).amax(dim=1),)
        for layer in self.hidden_layers:
            degrees += ((layer.mask.long() * degrees[-1][None, :]).amax(dim=1),)
        self.hidden_degrees = list(degrees)
        context = _LayerView(linears[0], slice(D, None))
        self._context = None if context.weight.shape[1] == 0 else context

    def context_terms(self, c):
        """The per-layer context terms: ``W0[:, D:] c`` for the first layer, nothing for the others or the
        output (zuko's context is extra input columns)."""
        first = None if self._context is None else F.linear(c, masked_weight(self._context.weight, self._context.mask))
        return [first] + [None] * (self.num_blocks + 1)

    @property
    def training(self) -> bool:
        return self._hyper.training

    def modules(self):
        return self._hyper.modules()


def incremental_unsupported(transform: MaskedAutoregressiveTransform) -> Optional[str]:
    """Why the incremental inverse does not apply to ``transform``, or None when it does."""
    if transform.order is None:
        return "a custom adjacency (the incremental inverse needs an ordering)"
    if transform.passes != transform.order.numel():
        return f"passes={transform.passes}: a blocked scheme of few passes (zuko's own inverse is short already)"
    if not all(isinstance(m, MaskedLinear) or not list(m.parameters()) for m in transform.hyper):
        return ("a MaskedMLP with more than masked layers and parameter-free activations (residual blocks): "
                "the incremental inverse reads plain masked layers")
    activations = {type(m) for m in transform.hyper if not isinstance(m, MaskedLinear)}
    if len(activations) != 1:
        return "a MaskedMLP without hidden layers, or with several activation types"
    return None


class _IncrementalAutoregressiveTransform(AutoregressiveTransform):
    """zuko's ``AutoregressiveTransform`` whose inverse computes each hidden unit of the hyper network once
    (one network's work in D small steps) instead of D full passes, where no autograd graph is needed
    (zuko's ``sample`` runs under ``no_grad``) and the transform is one it reads
    (:func:`incremental_unsupported`); elsewhere zuko's passes, as before."""

    def __init__(self, lazy: "FusedMaskedAutoregressiveTransform", context: Optional[torch.Tensor]):
        super().__init__(functools.partial(lazy.meta, context), lazy.passes)
        self.lazy, self.context = lazy, context

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        # Checked here, not when the transform is built: building it is on every log_prob's path.
        if needs_graph(self.lazy, (y, self.context)) or y.dim() == 0 or incremental_unsupported(self.lazy):
            return super()._inverse(y)
        made = ZukoMADEView(self.lazy)
        if made_unsupported(made) is not None:
            return super()._inverse(y)
        D, shape, context = y.shape[-1], y.shape, None
        if self.context is not None:  # zuko broadcasts the context against y's batch dims
            y, c = broadcast(y, self.context, ignore=1)
            shape, context = y.shape, c.reshape(-1, c.shape[-1])
        rows = y.reshape(-1, D)
        _, params = incremental_made_inverse(made, rows, context, self.lazy.column_solver(rows))
        x = self.lazy.univariate_of(params).inv(rows)  # the last pass's call, on every parameter at once
        return x.reshape(shape)


class FusedMaskedAutoregressiveTransform(_FusedMeta, MaskedAutoregressiveTransform):
    """zuko's masked autoregressive transform with the fused univariate transform; fully autoregressive
    ones (MAF, NSF) invert incrementally (:class:`_IncrementalAutoregressiveTransform`)."""

    fused_ops = _FusedMeta.fused_ops + "; incremental inverse"

    def forward(self, c: Optional[torch.Tensor] = None) -> Transform:
        return _IncrementalAutoregressiveTransform(self, c)


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
