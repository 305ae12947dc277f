"""Fused drop-in for normflows' affine coupling (imported by :func:`fastdensity.accelerate` only when a
model holds normflows modules).

normflows' ``AffineCoupling(param_map, scale=True, scale_map="exp")`` runs in the generative direction:
``forward([z1, z2])`` maps z2 with ``shift = param[:, 0::2]`` and ``u = param[:, 1::2]`` of
``param = param_map(z1)``. Each scale map is an affine step with a known log-scale, which the fused op
runs as ``scale="exp"`` (shift and u read in place as strided views):

=================  ===================================  ===========================
scale_map          forward                              log s fed to the op
=================  ===================================  ===========================
``"exp"``          z2 exp(u) + shift                    u
``"sigmoid"``      z2 / sigmoid(u + 2) + shift          -log sigmoid(u + 2)
``"sigmoid_inv"``  z2 sigmoid(u + 2) + shift            log sigmoid(u + 2)
``scale=False``    z2 + param                           (``scale="additive"``)
=================  ===================================  ===========================

Log-dets equal normflows' sums of the same terms; the outputs differ from normflows' by the rounding
of ``exp(log s)`` against its direct ``s`` or ``1 / s``.
"""
from __future__ import annotations

import torch
from normflows.flows.affine.coupling import AffineCoupling

from .. import ops

__all__ = ["FusedAffineCoupling"]

_SCALE_MAPS = ("exp", "sigmoid", "sigmoid_inv")


class FusedAffineCoupling(AffineCoupling):
    _fastdensity_fused = True
    fused_ops = "ops.affine_coupling"

    @classmethod
    def unsupported(cls, module):
        if module.scale and module.scale_map not in _SCALE_MAPS:
            return f"scale_map {module.scale_map!r} (normflows itself raises on it)"
        return None

    def _step(self, z, inverse: bool):
        z1, z2 = z
        param = self.param_map(z1).to(z2.dtype)
        if not self.scale:
            z2, log_det = ops.affine_coupling(z2, param, None, scale="additive", inverse=inverse)
            return [z1, z2], log_det
        shift, u = param[:, 0::2, ...], param[:, 1::2, ...]
        if self.scale_map == "exp":
            log_s = u
        else:
            log_s = torch.log(torch.sigmoid(u + 2))
            if self.scale_map == "sigmoid":  # normflows divides by the sigmoid in this direction
                log_s = -log_s
        z2, log_det = ops.affine_coupling(z2, shift, log_s, scale="exp", inverse=inverse)
        return [z1, z2], log_det

    def forward(self, z):
        return self._step(z, inverse=False)

    def inverse(self, z):
        return self._step(z, inverse=True)
