"""Fused drop-ins for nflows' transforms (imported by :func:`fastdensity.accelerate` only when a model
holds nflows modules). Each class subclasses the nflows class it replaces and overrides only the
methods that compute; the formulas are nflows' (checked against nflows 0.14 in tests/test_accelerate.py):

==========================================  ===================================================================
nflows class                                what runs instead
==========================================  ===================================================================
AffineCouplingTransform                     ``ops.affine_coupling(x, h[:, :n], h[:, n:], scale="sigmoid")``:
                                            s = sigmoid(u + 2) + 1e-3, y = x s + shift, log-det sum log s
AdditiveCouplingTransform                   ``ops.affine_coupling(..., scale="additive")``: y = x + shift, 0
MaskedAffineAutoregressiveTransform         s = softplus(u) + 1e-3 with u = p[..., 0], shift = p[..., 1]
                                            (:func:`fastdensity.nn.autoregressive.softplus_affine`)
made.MaskedLinear                           ``ops.masked_linear(x, weight, mask, bias)``: zero tiles skipped
ActNorm                                     ``ops.affine_coupling(x, shift, log_scale, scale="exp")``, the
                                            per-channel parameters broadcast as stride-0 views: one pass
LULinear                                    one matmul with W = L U (two in nflows); the inverse by two
                                            triangular solves on the rows, no transposes
==========================================  ===================================================================
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from nflows.transforms import autoregressive, coupling, lu, made, normalization

from .. import ops
from ..nn.autoregressive import SOFTPLUS_EPS, softplus_affine

__all__ = ["FusedAffineCouplingTransform", "FusedAdditiveCouplingTransform",
           "FusedMaskedAffineAutoregressiveTransform", "FusedMaskedLinear", "FusedActNorm", "FusedLULinear"]


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


class FusedMaskedAffineAutoregressiveTransform(autoregressive.MaskedAffineAutoregressiveTransform):
    _fastdensity_fused = True
    fused_ops = "ops.affine_coupling on log(softplus(u) + 1e-3)"

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
        y = ops.masked_linear(x, self.weight, self.mask, self.bias)
        # nflows' MADE adds the context into this output in place (first layer, residual blocks), which
        # autograd refuses on an output that a custom op returned as a view of its own buffer - as the
        # kernel path's op does today. Copy only then (a no-op once the op returns its allocation); a
        # compiled graph is functionalised, so there the in-place add is no trouble.
        if torch.compiler.is_compiling() or not y._is_view():
            return y
        return y.clone()


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
