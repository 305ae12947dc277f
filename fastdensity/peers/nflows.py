"""Fused drop-ins for nflows' transforms (imported by :func:`fastdensity.accelerate` only when a model
holds nflows modules). Each class subclasses the nflows class it replaces and overrides only the
methods that compute; the formulas are nflows' (checked against nflows 0.14 in tests/test_accelerate.py):

==========================================  ===================================================================
nflows class                                what runs instead
==========================================  ===================================================================
AffineCouplingTransform                     ``ops.affine_coupling(x, h[:, :n], h[:, n:], scale="sigmoid")``:
                                            s = sigmoid(u + 2) + 1e-3, y = x s + shift, log-det sum log s
AdditiveCouplingTransform                   ``ops.affine_coupling(..., scale="additive")``: y = x + shift, 0
MaskedAffineAutoregressiveTransform         ``ops.affine_coupling(x, p[..., 1], p[..., 0], scale="softplus")``:
                                            s = softplus(u) + 1e-3 with u = p[..., 0], shift = p[..., 1];
                                            the inverse incremental (each MADE unit once, not D passes) where
                                            no graph is needed, as the autoregressive spline's below
made.MaskedLinear                           ``ops.masked_linear(x, weight, mask, bias)``: zero tiles skipped
ActNorm                                     ``ops.affine_coupling(x, shift, log_scale, scale="exp")``, the
                                            per-channel parameters broadcast as stride-0 views: one pass
LULinear                                    one matmul with W = L U (two in nflows); the inverse by two
                                            triangular solves on the rows, no transposes
PiecewiseRationalQuadraticCouplingTransform ``ops.rational_quadratic_spline(x, w, h, d, parameterization="nflows")``
MaskedPiecewiseRationalQuadratic-           with w, h, d slices of the net's output p viewed [B, D, 3K - 1] (images:
AutoregressiveTransform                     [B, C, H, W, 3K - 1], a permuted view): w = p[..., :K] / sqrt(H),
PiecewiseRationalQuadraticCDF               h = p[..., K:2K] / sqrt(H) (H the net's hidden_features or
                                            hidden_channels, when it has one, as nflows), d = p[..., 2K:]; the
                                            CDF's parameters as stride-0 views over the batch. tails="linear" only
                                            (nflows' tails=None, a spline on [0, 1] that rejects other inputs, is
                                            left as it is). Unlike nflows: no host sync, no boolean-mask
                                            indexing, and no InputOutsideDomain or AssertionError in the inverse
==========================================  ===================================================================
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from nflows.transforms import autoregressive, coupling, lu, made, nonlinearities, normalization

from .. import backend, ops
from ..nn.autoregressive import SOFTPLUS_EPS, softplus_affine
from ..sampling.made_incremental import autoregressive_inverse

__all__ = ["FusedAffineCouplingTransform", "FusedAdditiveCouplingTransform",
           "FusedMaskedAffineAutoregressiveTransform", "FusedMaskedLinear", "FusedActNorm", "FusedLULinear",
           "FusedPiecewiseRationalQuadraticCouplingTransform",
           "FusedMaskedPiecewiseRationalQuadraticAutoregressiveTransform", "FusedPiecewiseRationalQuadraticCDF"]


class FusedAffineCouplingTransform(coupling.AffineCouplingTransform):
    _fastdensity_fused = True
    fused_ops = "ops.affine_coupling, scale 'sigmoid'"

    @classmethod
    def unsupported(cls, module):
        # Newer nflows take a scale_activation; the fused op reproduces only the default one.
        default = getattr(coupling.AffineCouplingTransform, "DEFAULT_SCALE_ACTIVATION", None)
        if getattr(module, "scale_activation", default) is not default:
            return "a custom scale_activation: the fused op computes only sigmoid(u + 2) + 1e-3"
        return None

    def _fused(self, inputs, transform_params, inverse):
        n = self.num_transform_features
        h = transform_params.to(inputs.dtype)  # as type promotion in nflows' x * scale + shift would
        return ops.affine_coupling(inputs, h[:, :n, ...], h[:, n:, ...], scale="sigmoid", inverse=inverse)

    def _coupling_transform_forward(self, inputs, transform_params):
        return self._fused(inputs, transform_params, inverse=False)

    def _coupling_transform_inverse(self, inputs, transform_params):
        return self._fused(inputs, transform_params, inverse=True)


class FusedAdditiveCouplingTransform(coupling.AdditiveCouplingTransform):
    _fastdensity_fused = True
    fused_ops = "ops.affine_coupling, scale 'additive'"

    def _coupling_transform_forward(self, inputs, transform_params):
        return ops.affine_coupling(inputs, transform_params.to(inputs.dtype), None, scale="additive")

    def _coupling_transform_inverse(self, inputs, transform_params):
        return ops.affine_coupling(inputs, transform_params.to(inputs.dtype), None, scale="additive", inverse=True)


# ---------------------------------------------------------------------------------------------------
# nflows' MADE, read by fastdensity's incremental inverse
# ---------------------------------------------------------------------------------------------------


class _MaskedLayerView:
    """An nflows ``MaskedLinear`` as the incremental inverse reads a layer: its weight and bias, and its
    0/1 float mask as a bool connectivity pattern."""

    def __init__(self, layer: made.MaskedLinear):
        self.weight, self.bias, self.out_features = layer.weight, layer.bias, layer.out_features
        self.mask = layer.mask != 0


class _ResidualBlockView:
    def __init__(self, block: made.MaskedResidualBlock):
        self.linear_layers = [_MaskedLayerView(layer) for layer in block.linear_layers]
        self.context_layer = getattr(block, "context_layer", None)
        self.batch_norm_layers = getattr(block, "batch_norm_layers", None) if block.use_batch_norm else None


class NflowsMADEView:
    """nflows' ``MADE`` presented with the attributes of :class:`fastdensity.nn.MADE` that the incremental
    inverse reads (:func:`fastdensity.sampling.incremental_made_inverse`), over the same parameters (no
    copy): natural order (nflows' MADE has no ordering of its own; MAF permutes between transforms), the
    degrees nflows stored, bool masks, and the two block structures with nflows' context wiring. Built
    per call, so it always reads the current weights."""

    def __init__(self, net: made.MADE):
        self._net = net
        first = net.initial_layer
        self.features = first.in_features
        self.hidden_features = first.out_features
        self.output_multiplier = net.final_layer.out_features // self.features
        self.activation = net.activation
        self.use_residual_blocks = net.use_residual_blocks
        self.ordering = self.generation_order = torch.arange(self.features, device=first.weight.device)
        self.input_layer = _MaskedLayerView(first)
        self.output_layer = _MaskedLayerView(net.final_layer)
        blocks = list(net.blocks)
        self.hidden_degrees = torch.stack([first.degrees, *(block.degrees for block in blocks)])
        self.num_blocks = len(blocks)
        self.context_layer = getattr(net, "context_layer", None)
        if self.use_residual_blocks:
            self.blocks = [_ResidualBlockView(block) for block in blocks]
        else:
            self.hidden_layers = [_MaskedLayerView(block.linear) for block in blocks]
            norms = [block.batch_norm for block in blocks]
            self.batch_norms = norms if any(n is not None for n in norms) else None

    def context_terms(self, context):
        """The plain structure's per-layer context terms: nflows adds ``activation(U c)`` to the first layer
        only (before its activation), nothing to the others or the output."""
        first = None if self.context_layer is None else self.activation(self.context_layer(context))
        return [first] + [None] * (self.num_blocks + 1)

    @property
    def training(self) -> bool:
        return self._net.training

    def modules(self):
        return self._net.modules()


class _IncrementalInverse:
    """The inverse of an nflows MADE transform with each MADE unit computed once (one MADE's work in D
    small steps, :mod:`fastdensity.sampling.made_incremental`) instead of nflows' D full passes, wherever
    no autograd graph is needed (under ``torch.no_grad()``, or with frozen parameters and inputs) and the
    MADE is in eval mode or has neither dropout nor batch norm; elsewhere nflows' D passes, as before.
    Both give the same result (float64: to round-off)."""

    @property
    def incremental_made(self) -> NflowsMADEView:
        return NflowsMADEView(self.autoregressive_net)

    def inverse(self, inputs, context=None):
        return autoregressive_inverse(self, inputs, context, super().inverse)


class FusedMaskedAffineAutoregressiveTransform(_IncrementalInverse, autoregressive.MaskedAffineAutoregressiveTransform):
    """nflows' MAF step with the fused affine op and the incremental inverse."""

    _fastdensity_fused = True
    fused_ops = "ops.affine_coupling, scale 'softplus'; incremental inverse"
    # nflows' parameter layout, as the incremental inverse reads it: [..., 0] the scale's input, [..., 1] shift
    scale, scale_index, shift_index = "softplus", 0, 1

    @classmethod
    def unsupported(cls, module):
        if getattr(module, "_epsilon", SOFTPLUS_EPS) != SOFTPLUS_EPS:
            return f"_epsilon = {module._epsilon}: the fused path computes softplus(u) + {SOFTPLUS_EPS}"
        return None

    def _fused(self, inputs, autoregressive_params, inverse):
        p = autoregressive_params.to(inputs.dtype).view(-1, self.features, 2)
        return softplus_affine(inputs, p[..., 1], p[..., 0], inverse=inverse)  # nflows: [..., 0] is the scale

    def _elementwise_forward(self, inputs, autoregressive_params):
        return self._fused(inputs, autoregressive_params, inverse=False)

    def _elementwise_inverse(self, inputs, autoregressive_params):
        return self._fused(inputs, autoregressive_params, inverse=True)


class FusedMaskedLinear(made.MaskedLinear):
    _fastdensity_fused = True
    fused_ops = "ops.masked_linear"

    @classmethod
    def unsupported(cls, module):
        mask = module.mask
        if not bool(((mask == 0) | (mask == 1)).all()):
            return "its mask holds values other than 0 and 1 (the fused op reads it as a connectivity pattern)"
        return None

    def forward(self, x):
        if not backend.use_kernels(x, "masked_linear"):
            # Where the op would run its reference (CPU under "auto"), nflows' own w * mask product: the same
            # numbers for the peer's finite weights, computed as nflows computes them. Not for speed: in an
            # A/B of a whole MAF step the masking's cost was in the noise (torch.where against a 5x cheaper
            # bitwise form: 11.37 vs 11.38 ms).
            return super().forward(x)
        # nflows' MADE adds the context into this output in place (first layer, residual blocks): the op
        # returns its own allocation, never a view, so autograd allows that.
        return ops.masked_linear(x, self.weight, self.mask, self.bias)


class FusedActNorm(normalization.ActNorm):
    _fastdensity_fused = True
    fused_ops = "ops.affine_coupling, scale 'exp'"

    def _fused(self, inputs, inverse):
        shape = (1, -1) + (1,) * (inputs.dim() - 2)
        shift = self.shift.to(inputs.dtype).view(shape).expand_as(inputs)
        log_scale = self.log_scale.to(inputs.dtype).view(shape).expand_as(inputs)
        return ops.affine_coupling(inputs, shift, log_scale, scale="exp", inverse=inverse)

    @staticmethod
    def _check(inputs):
        if inputs.dim() not in [2, 4]:
            raise ValueError("Expecting inputs to be a 2D or a 4D tensor.")  # nflows' check and message

    def forward(self, inputs, context=None):
        self._check(inputs)
        if self.training and not self.initialized:
            self._initialize(inputs)  # nflows' data-dependent initialisation, unchanged
        return self._fused(inputs, inverse=False)

    def inverse(self, inputs, context=None):
        self._check(inputs)
        return self._fused(inputs, inverse=True)


class FusedLULinear(lu.LULinear):
    _fastdensity_fused = True
    fused_ops = "one matmul with W = L U; row-wise triangular solves for the inverse"

    def forward_no_cache(self, inputs):
        lower, upper = self._create_lower_upper()
        outputs = F.linear(inputs, lower @ upper, self.bias)
        return outputs, self.logabsdet() * inputs.new_ones(outputs.shape[0])

    def inverse_no_cache(self, inputs):
        lower, upper = self._create_lower_upper()
        # x W^T = y - b with W = L U: solve z L^T = y - b, then x U^T = z (right-hand solves on the rows).
        z = torch.linalg.solve_triangular(lower.T, inputs - self.bias, upper=True, left=False, unitriangular=True)
        outputs = torch.linalg.solve_triangular(upper.T, z, upper=False, left=False)
        return outputs, -self.logabsdet() * inputs.new_ones(outputs.shape[0])


# ---------------------------------------------------------------------------------------------------
# Rational-quadratic splines (tails="linear")
# ---------------------------------------------------------------------------------------------------


class _FusedSpline:
    """What nflows' three spline transforms share: the tails check and the call into the fused op with
    the module's own settings (``num_bins``, ``tail_bound``, ``min_bin_width``, ``min_bin_height``,
    ``min_derivative``, read at every call like nflows does)."""

    _fastdensity_fused = True
    fused_ops = "ops.rational_quadratic_spline, parameterization 'nflows'"

    @classmethod
    def unsupported(cls, module):
        if module.tails != "linear":
            return (f"tails={module.tails!r}: the fused op computes only tails='linear' (the identity outside "
                    f"[-tail_bound, tail_bound])")
        return None

    def _fused_spline(self, inputs, params, inverse, logit_scale=None):
        """The spline of ``inputs`` with parameters ``params`` [*inputs.shape, 3K - 1] (any strides), widths
        and heights divided by ``logit_scale`` when given; returns (outputs, log-det [B])."""
        K = self.num_bins
        params = params.to(inputs.dtype)
        sizes = params[..., :2 * K]
        if logit_scale is not None:
            sizes = sizes / logit_scale  # a Python float, as nflows' in-place division by np.sqrt(H)
        return ops.rational_quadratic_spline(
            inputs, sizes[..., :K], sizes[..., K:], params[..., 2 * K:], inverse=inverse,
            bound=float(self.tail_bound), parameterization="nflows", min_bin_width=self.min_bin_width,
            min_bin_height=self.min_bin_height, min_derivative=self.min_derivative)


def _logit_scale(net, channels_too: bool):
    """sqrt(H) for a net with ``hidden_features`` H (or, for the coupling, ``hidden_channels``), else None."""
    names = ("hidden_features", "hidden_channels") if channels_too else ("hidden_features",)
    for name in names:
        if hasattr(net, name):
            return math.sqrt(getattr(net, name))
    return None


class FusedPiecewiseRationalQuadraticCouplingTransform(_FusedSpline,
                                                       coupling.PiecewiseRationalQuadraticCouplingTransform):
    def _coupling_transform(self, inputs, transform_params, inverse=False):
        if inputs.dim() == 4:  # the net's [B, C P, H, W] grouped per channel: [B, C, H, W, P], a permuted view
            b, c, h, w = inputs.shape
            params = transform_params.reshape(b, c, -1, h, w).permute(0, 1, 3, 4, 2)
        else:  # [B, D P] -> [B, D, P] (nflows' coupling admits only 2-D and 4-D inputs)
            params = transform_params.reshape(inputs.shape[0], inputs.shape[1], -1)
        scale = _logit_scale(self.transform_net, channels_too=True)
        if scale is None:  # nflows warns here too, at every call
            warnings.warn("the coupling's transform net has no hidden_features or hidden_channels attribute: the "
                          "width and height logits are not scaled down (as in nflows)", UserWarning, stacklevel=2)
        return self._fused_spline(inputs, params, inverse, scale)


class FusedMaskedPiecewiseRationalQuadraticAutoregressiveTransform(
        _FusedSpline, _IncrementalInverse, autoregressive.MaskedPiecewiseRationalQuadraticAutoregressiveTransform):
    """nflows' autoregressive spline with the fused spline op and the incremental inverse."""

    fused_ops = _FusedSpline.fused_ops + "; incremental inverse"

    def _spline_from(self, inputs, params, inverse):
        """The spline of ``inputs`` [B, D] with parameters ``params`` [B, D, 3K - 1] (what the incremental
        inverse calls, per feature and at the end)."""
        return self._fused_spline(inputs, params, inverse, _logit_scale(self.autoregressive_net, channels_too=False))

    def _elementwise(self, inputs, autoregressive_params, inverse=False):
        params = autoregressive_params.view(inputs.shape[0], inputs.shape[1], self._output_dim_multiplier())
        return self._spline_from(inputs, params, inverse)

    def _elementwise_forward(self, inputs, autoregressive_params):
        return self._elementwise(inputs, autoregressive_params)

    def _elementwise_inverse(self, inputs, autoregressive_params):
        return self._elementwise(inputs, autoregressive_params, inverse=True)


class FusedPiecewiseRationalQuadraticCDF(_FusedSpline, nonlinearities.PiecewiseRationalQuadraticCDF):
    @property
    def num_bins(self):
        return self.unnormalized_widths.shape[-1]

    def _spline(self, inputs, inverse=False):
        def batch(p):  # [*shape, n] -> [B, *shape, n], a stride-0 view read in place
            return p.to(inputs.dtype).expand(inputs.shape[0], *p.shape)

        return ops.rational_quadratic_spline(
            inputs, batch(self.unnormalized_widths), batch(self.unnormalized_heights),
            batch(self.unnormalized_derivatives), inverse=inverse, bound=float(self.tail_bound),
            parameterization="nflows", min_bin_width=self.min_bin_width, min_bin_height=self.min_bin_height,
            min_derivative=self.min_derivative)
