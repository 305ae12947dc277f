"""Neural spline flow layers (Durkan et al., 2019) on the fused ``fastdensity.ops.rational_quadratic_spline``.

Each transformed scalar x gets its own monotonic rational-quadratic spline on [-B, B] (B =
``tail_bound``) with K = ``num_bins`` bins and the identity outside ("linear" tails), from P = 3K - 1
unconstrained numbers: K widths, K heights, K - 1 interior derivatives (the math is in
:mod:`fastdensity.reference.spline`, parameterisation "nflows"). The layers differ in where those
numbers come from:

* :class:`PiecewiseRationalQuadraticCoupling` - from a network of the features the mask keeps, as
  nflows' ``PiecewiseRationalQuadraticCouplingTransform``. The net's output is laid out feature-major::

      vectors  h [B, n * P]        -> h.reshape(B, n, P)                          (feature i: h[:, i*P:(i+1)*P])
      images   h [B, n * P, H, W]  -> h.reshape(B, n, P, H, W).permute(0, 1, 3, 4, 2)   [B, n, H, W, P]

  with n the number of transformed features (channels), and each group of P split as widths
  ``[..., :K]``, heights ``[..., K:2K]``, derivatives ``[..., 2K:]``. When the net has an attribute
  ``hidden_features`` (or ``hidden_channels``) H, widths and heights are divided by sqrt(H) first, so
  the softmaxes start near uniform bins whatever the net's width.
* :class:`MaskedPiecewiseRationalQuadraticAutoregressive` - from a :class:`~fastdensity.nn.MADE` of x
  itself, ``made(x).view(B, D, P)``, as nflows' ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform``.
  nflows' transform scales by sqrt(hidden_features) only if its MADE has that attribute, which
  nflows' MADE does not: the logits are used unscaled, here too.
* :class:`PiecewiseRationalQuadraticCDF` - learned parameters shared by the whole batch (nflows'
  class of that name); the coupling applies one to the kept features with
  ``apply_unconditional_transform=True``.

Log-dets are per sample, [B]: the sum of log dy/dx over every transformed element. Unlike nflows,
nothing here indexes with boolean masks or synchronises with the host; on CUDA tensors the spline runs
as one Triton kernel that reads the parameter slices in place.

Difference from nflows: only ``tails="linear"`` (the identity outside [-B, B]) exists. nflows' default,
``tails=None``, is a spline on [0, 1] that rejects inputs outside it; it is refused here with a
ValueError rather than silently changed.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..reference.spline import DEFAULT_MIN_BIN_HEIGHT, DEFAULT_MIN_BIN_WIDTH, DEFAULT_MIN_DERIVATIVE
from .base import Transform, check_context, reject_context
from .coupling import _Coupling
from .made import MADE

__all__ = ["PiecewiseRationalQuadraticCDF", "PiecewiseRationalQuadraticCoupling",
           "MaskedPiecewiseRationalQuadraticAutoregressive"]


def _check_tails(tails) -> None:
    if tails != "linear":
        raise ValueError(f"tails must be 'linear' (the identity outside [-tail_bound, tail_bound]); got {tails!r}. "
                         "nflows' tails=None (a spline on [0, 1] only) is not supported")


def _check_num_bins(num_bins) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an integer >= 1; got {num_bins!r}")
    return num_bins


class _SplineSettings:
    """The constructor arguments every spline layer shares, and the call into the op with them."""

    def _init_spline(self, num_bins, tails, tail_bound, min_bin_width, min_bin_height, min_derivative):
        _check_tails(tails)
        self.num_bins = _check_num_bins(num_bins)
        if not 0.0 < float(tail_bound) < math.inf:
            raise ValueError(f"tail_bound must be a positive finite number; got {tail_bound!r}")
        self.tails, self.tail_bound = tails, float(tail_bound)
        self.min_bin_width, self.min_bin_height = float(min_bin_width), float(min_bin_height)
        self.min_derivative = float(min_derivative)

    @property
    def params_per_element(self) -> int:
        """P = 3K - 1: K widths, K heights, K - 1 interior derivatives."""
        return 3 * self.num_bins - 1

    def _spline(self, x, widths, heights, derivatives, inverse: bool):
        return ops.rational_quadratic_spline(
            x, widths, heights, derivatives, inverse=inverse, bound=self.tail_bound, parameterization="nflows",
            min_bin_width=self.min_bin_width, min_bin_height=self.min_bin_height, min_derivative=self.min_derivative)

    def _spline_from(self, x, params, inverse: bool, logit_scale: Optional[float] = None):
        """The spline of x with parameters ``params`` [*x.shape, P]; widths and heights divided by
        ``logit_scale`` when given (one division of the 2K leading columns, derivatives stay a view)."""
        K = self.num_bins
        sizes = params[..., :2 * K]
        if logit_scale is not None:
            sizes = sizes / logit_scale
        return self._spline(x, sizes[..., :K], sizes[..., K:], params[..., 2 * K:], inverse)

    def _spline_repr(self) -> str:
        return f"num_bins={self.num_bins}, tails={self.tails!r}, tail_bound={self.tail_bound}"


class PiecewiseRationalQuadraticCDF(_SplineSettings, Transform):
    """One spline per element of an example of ``shape``, with learned parameters shared by the batch.

    Args:
        shape: the per-example shape (an int for vectors).
        num_bins, tails, tail_bound, min_*: as :class:`PiecewiseRationalQuadraticCoupling`.
        identity_init: start as the identity (uniform bins, unit derivatives) instead of nflows' default
            uniform-random parameters.

    Parameters ``unnormalized_widths``, ``unnormalized_heights`` [*shape, K] and
    ``unnormalized_derivatives`` [*shape, K - 1], nflows' names and shapes for ``tails="linear"``.
    The same map for every context: a context given to it is a ValueError (``conditional = False``).
    """

    conditional = False

    def __init__(self, shape, num_bins: int = 10, tails: str = "linear", tail_bound: float = 1.0,
                 identity_init: bool = False, min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
                 min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT, min_derivative: float = DEFAULT_MIN_DERIVATIVE):
        super().__init__()
        self._init_spline(num_bins, tails, tail_bound, min_bin_width, min_bin_height, min_derivative)
        self.shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
        K = self.num_bins
        if identity_init:
            # softplus(c) + min_derivative = 1: unit slopes at every knot, so the spline is y = x.
            unit_slope = math.log(math.expm1(1 - self.min_derivative))
            widths, heights = torch.zeros(*self.shape, K), torch.zeros(*self.shape, K)
            derivatives = torch.full((*self.shape, K - 1), unit_slope)
        else:
            widths, heights, derivatives = (torch.rand(*self.shape, K), torch.rand(*self.shape, K),
                                            torch.rand(*self.shape, K - 1))
        self.unnormalized_widths = nn.Parameter(widths)
        self.unnormalized_heights = nn.Parameter(heights)
        self.unnormalized_derivatives = nn.Parameter(derivatives)

    def _run(self, x, context, inverse):
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"inputs must have shape [B, {', '.join(map(str, self.shape))}]; got {tuple(x.shape)}")
        reject_context(self, context)

        def batch(p):  # a stride-0 view over the batch, read in place by the op
            return p.to(x.dtype).expand(x.shape[0], *p.shape)

        return self._spline(x, batch(self.unnormalized_widths), batch(self.unnormalized_heights),
                            batch(self.unnormalized_derivatives), inverse)

    def forward(self, inputs, context=None):
        return self._run(inputs, context, inverse=False)

    def inverse(self, inputs, context=None):
        return self._run(inputs, context, inverse=True)

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, {self._spline_repr()}"


def _logit_scale(net: nn.Module, scale_logits: bool) -> Optional[float]:
    """sqrt(H) for a net with ``hidden_features`` (or ``hidden_channels``) H, else None (with nflows'
    warning, once here rather than on every call); None when ``scale_logits`` is False."""
    if not scale_logits:
        return None
    for name in ("hidden_features", "hidden_channels"):
        if hasattr(net, name):
            return math.sqrt(getattr(net, name))
    warnings.warn("the transform net has no hidden_features or hidden_channels attribute, so the width and height "
                  "logits are not scaled down by its square root (as in nflows): the bins may start far from uniform")
    return None


class PiecewiseRationalQuadraticCoupling(_SplineSettings, _Coupling):
    """Rational-quadratic spline coupling, as nflows' ``PiecewiseRationalQuadraticCouplingTransform``.

    Args:
        mask: [features] (or [channels] for images); > 0 marks the features to transform, <= 0 those that
            pass through and condition the net.
        transform_net_create_fn: ``f(in_features, out_features) -> nn.Module`` mapping the kept part
            [B, n_id, ...] (and ``context`` as a second argument, when given) to [B, n_tr * (3K - 1), ...].
        num_bins: K (default 10).
        tails: "linear" only (the default here; see the module docstring).
        tail_bound: B; the spline lives on [-B, B], the identity outside (default 1.0).
        apply_unconditional_transform: also pass the kept features through a
            :class:`PiecewiseRationalQuadraticCDF` (after they condition the net, in the forward direction).
        img_shape: [H, W] for images, needed with ``apply_unconditional_transform``.
        min_bin_width, min_bin_height, min_derivative: nflows' floors (1e-3 each).
        scale_logits: keyword only. True (default) follows nflows: divide the width and height logits
            by sqrt(hidden_features) when the net has that attribute, warn when it has none. False never
            divides, for a net whose last layer is initialised deliberately (fastdensity's NSF starts
            every spline as the identity, and measured better on 2-D densities unscaled).

    Shapes: ``forward(x [B, D] or [B, C, H, W], context=None) -> (z like x, logabsdet [B])``;
    ``inverse`` likewise. The net's output layout is in the module docstring.
    """

    def __init__(self, mask, transform_net_create_fn: Callable[[int, int], nn.Module], num_bins: int = 10,
                 tails: str = "linear", tail_bound: float = 1.0, apply_unconditional_transform: bool = False,
                 img_shape: Optional[Sequence[int]] = None, min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
                 min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT, min_derivative: float = DEFAULT_MIN_DERIVATIVE,
                 *, scale_logits: bool = True):
        self._init_spline(num_bins, tails, tail_bound, min_bin_width, min_bin_height, min_derivative)
        self.params_per_feature = self.params_per_element  # read by _Coupling.__init__ to size the net
        super().__init__(mask, transform_net_create_fn)
        self._logit_scale = _logit_scale(self.transform_net, scale_logits)
        if apply_unconditional_transform:
            self.unconditional_transform = PiecewiseRationalQuadraticCDF(
                [self.num_identity_features, *(img_shape or [])], num_bins=num_bins, tails=tails,
                tail_bound=tail_bound, min_bin_width=min_bin_width, min_bin_height=min_bin_height,
                min_derivative=min_derivative)
        else:
            self.unconditional_transform = None

    def _params(self, x_id, context):
        """The net's output as [*x_tr.shape, P] (a view: a reshape, and a permute for images)."""
        if context is None:
            h = self.transform_net(x_id)
        elif self.conditional:  # set by _Coupling: does the net's forward take a context?
            check_context(x_id, context, type(self).__name__)
            h = self.transform_net(x_id, context)
        else:
            raise ValueError(f"{type(self).__name__}: a context was given but its transform net "
                             f"({type(self.transform_net).__name__}) takes none: build the net with a "
                             f"forward(x, context) to condition this layer")
        n, P = self.num_transform_features, self.params_per_element
        if h.shape[0] != x_id.shape[0] or h.shape[1] != n * P or h.shape[2:] != x_id.shape[2:]:
            raise ValueError(f"transform net must return [B, {n * P}, ...] ({P} = 3 * num_bins - 1 parameters for "
                             f"each of {n} features, spatial size as its input); got shape {tuple(h.shape)}")
        h = h.to(x_id.dtype)  # as AffineCoupling: the op takes one dtype (autocast may give the net's in half)
        if h.dim() == 4:
            b, _, height, width = h.shape
            return h.reshape(b, n, P, height, width).permute(0, 1, 3, 4, 2)
        return h.reshape(h.shape[0], n, P)

    def _run(self, x, context, inverse: bool):
        x_id, x_tr = self._split(x)
        ld_id = None
        if inverse and self.unconditional_transform is not None:  # undo it first: the net saw its input
            x_id, ld_id = self.unconditional_transform.inverse(x_id)
        params = self._params(x_id, context)
        y_tr, logabsdet = self._spline_from(x_tr, params, inverse, self._logit_scale)
        if not inverse and self.unconditional_transform is not None:
            x_id, ld_id = self.unconditional_transform(x_id)
        if ld_id is not None:
            logabsdet = logabsdet + ld_id
        return self._merge(x_id, y_tr), logabsdet

    def extra_repr(self) -> str:
        return (f"features={self.features}, transform_features={self.num_transform_features}, "
                f"{self._spline_repr()}")


class MaskedPiecewiseRationalQuadraticAutoregressive(_SplineSettings, Transform):
    """Autoregressive rational-quadratic spline, as nflows'
    ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform``.

    The spline of feature d takes its P = 3K - 1 parameters from ``made(x, context).view(B, D, P)[:, d]``,
    which depends only on the features before d (in the MADE's ``ordering``), so the Jacobian is
    triangular: one MADE pass gives z and the log-det. The inverse is sequential: D MADE passes
    (nflows' scheme, :meth:`inverse_by_passes`), or by default each MADE unit computed once in D small
    steps (:mod:`fastdensity.sampling.made_incremental`).

    Args:
        features: D.
        hidden_features: the MADE's width.
        context_features: width of an optional context, fed to the MADE.
        num_bins, tails, tail_bound, min_*: as :class:`PiecewiseRationalQuadraticCoupling`.
        num_blocks, use_residual_blocks, random_mask, activation, dropout_probability, use_batch_norm:
            the MADE's, with nflows' meanings and defaults.
        ordering: keyword only, the MADE's ordering (default natural order; a permutation tensor folds a
            permutation of the features into the masks without moving data).

    Shapes: ``forward(x [B, D], context [B, C] or None) -> (z [B, D], logabsdet [B])``.
    """

    def __init__(self, features: int, hidden_features: int, context_features: Optional[int] = None,
                 num_bins: int = 10, tails: str = "linear", tail_bound: float = 1.0, num_blocks: int = 2,
                 use_residual_blocks: bool = True, random_mask: bool = False, activation=F.relu,
                 dropout_probability: float = 0.0, use_batch_norm: bool = False,
                 min_bin_width: float = DEFAULT_MIN_BIN_WIDTH, min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
                 min_derivative: float = DEFAULT_MIN_DERIVATIVE, *, ordering="sequential"):
        super().__init__()
        self._init_spline(num_bins, tails, tail_bound, min_bin_width, min_bin_height, min_derivative)
        self.features = features
        self.conditional = context_features is not None  # a context reaches the MADE, or is refused
        self.autoregressive_net = MADE(
            features, hidden_features, num_blocks=num_blocks, output_multiplier=self.params_per_element,
            context_features=context_features, ordering=ordering, use_residual_blocks=use_residual_blocks,
            random_mask=random_mask, activation=activation, dropout_probability=dropout_probability,
            use_batch_norm=use_batch_norm)

    def _check(self, x, context):
        """The argument checks of every call, made before either inverse runs (the incremental one reads
        the MADE's weights directly, past the MADE's own checks)."""
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(f"inputs must be [B, {self.features}]; got shape {tuple(x.shape)}")
        check_context(x, context, type(self).__name__)
        width = self.autoregressive_net.context_features
        if context is not None and width is None:
            raise ValueError(f"{type(self).__name__} was built without context_features: it takes no context")
        if width is not None and (context is None or context.dim() != 2 or context.shape[1] != width):
            got = None if context is None else list(context.shape)
            raise ValueError(f"{type(self).__name__} was built with context_features={width}: it needs a context "
                             f"[B, {width}]; got {got}")

    def _params(self, x, context):
        return self.autoregressive_net(x, context).view(x.shape[0], self.features, self.params_per_element)

    def forward(self, inputs, context=None):
        self._check(inputs, context)
        return self._spline_from(inputs, self._params(inputs, context), inverse=False)

    def inverse(self, inputs, context=None):
        """``(x, logabsdet)`` with ``forward(x) = inputs``: the incremental MADE inversion (each hidden
        unit computed once, :mod:`fastdensity.sampling.made_incremental`) when no graph is needed and the
        MADE is in a mode it supports, else :meth:`inverse_by_passes`; the same result to round-off."""
        from ..sampling import autoregressive_inverse

        self._check(inputs, context)
        return autoregressive_inverse(self, inputs, context, self.inverse_by_passes)

    def inverse_by_passes(self, inputs, context=None):
        """D MADE passes from x = 0: after pass k the first k features in the MADE's order are exact,
        so the last pass's parameters, and with them x and the log-det, are exact for every feature.
        Differentiable (autograd sees every pass)."""
        self._check(inputs, context)
        x = torch.zeros_like(inputs)
        logabsdet = None
        for _ in range(self.features):
            x, logabsdet = self._spline_from(inputs, self._params(x, context), inverse=True)
        return x, logabsdet

    def extra_repr(self) -> str:
        return f"features={self.features}, {self._spline_repr()}"
