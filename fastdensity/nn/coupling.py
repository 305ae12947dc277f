"""Coupling layers (RealNVP, Glow, NICE) on the fused ``fastdensity.ops.affine_coupling`` op.

A binary ``mask`` over features ([B, D] inputs) or channels ([B, C, H, W] inputs) splits x: entries
with mask <= 0 pass through unchanged (the identity part) and condition a network whose output sets
the shift and scale of the entries with mask > 0 (the transformed part)::

    h                 = net(x[identity], context)    # [B, 2 * n_transform, ...]; net(x[identity]) without one
    shift, scale_raw  = h[:, :n], h[:, n:]            # nflows' order: shift first
    y[transform]      = x[transform] * scale(scale_raw) + shift
    logabsdet         = sum log scale(scale_raw)

The shift/scale halves are passed to the op as views of ``h``: no copies.

Context: the layer is conditional when its network's ``forward`` takes a second positional argument
(``forward(x, context)`` or ``forward(x, context=None)``, as nflows' nets); a context given to a layer
whose network takes none is a ValueError, never dropped.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from .. import ops
from ..reference.coupling import DEFAULT_CLAMP, SCALES
from .base import Transform, check_context

__all__ = ["AffineCoupling", "AdditiveCoupling"]


def _as_index_or_slice(index: torch.Tensor):
    """A slice when ``index`` is an evenly spaced ascending run - a range, or every other feature as in
    RealNVP's alternating masks - so the split is a view instead of a gather; None otherwise."""
    n = index.numel()
    start = int(index[0]) if n else 0
    step = int(index[1]) - start if n > 1 else 1
    if n and step > 0 and torch.equal(index, torch.arange(start, start + step * n, step)):
        return slice(start, start + step * (n - 1) + 1, step)
    return None


def takes_context(net) -> bool:
    """Whether ``net(x, context)`` is a valid call: its ``forward`` (or the callable itself) accepts a
    second positional argument. Checked once, when the layer is built."""
    target = net.forward if isinstance(net, nn.Module) else net
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: assume it takes what it is given
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


class _Coupling(Transform):
    """Shared mask bookkeeping: splitting the input and merging the two parts back."""

    params_per_feature = 2

    def __init__(self, mask, transform_net_create_fn: Callable[[int, int], nn.Module]):
        super().__init__()
        mask = torch.as_tensor(mask)
        if mask.dim() != 1:
            raise ValueError(f"mask must be 1-D over features or channels; got shape {tuple(mask.shape)}")
        self.features = mask.numel()
        identity = torch.nonzero(mask <= 0).flatten()
        transform = torch.nonzero(mask > 0).flatten()
        if transform.numel() == 0 or identity.numel() == 0:
            raise ValueError("mask must mark at least one feature to transform (> 0) and one to keep (<= 0)")
        self.register_buffer("identity_features", identity, persistent=False)
        self.register_buffer("transform_features", transform, persistent=False)
        self._id_slice = _as_index_or_slice(identity)
        self._tr_slice = _as_index_or_slice(transform)
        self.num_identity_features = identity.numel()
        self.num_transform_features = transform.numel()
        self.transform_net = transform_net_create_fn(
            self.num_identity_features, self.num_transform_features * self.params_per_feature)
        self.conditional = takes_context(self.transform_net)

    def _split(self, x: torch.Tensor):
        if x.dim() not in (2, 4) or x.shape[1] != self.features:
            raise ValueError(f"inputs must be [B, {self.features}] or [B, {self.features}, H, W]; "
                             f"got shape {tuple(x.shape)}")
        ids, trs = self._id_slice, self._tr_slice
        x_id = x[:, ids] if ids is not None else x.index_select(1, self.identity_features)
        x_tr = x[:, trs] if trs is not None else x.index_select(1, self.transform_features)
        return x_id, x_tr

    def _merge(self, x_id: torch.Tensor, y_tr: torch.Tensor) -> torch.Tensor:
        ids, trs = self._id_slice, self._tr_slice
        if ids is not None and trs is not None and ids.step == trs.step == 1:  # two halves: concatenate
            first, second = (x_id, y_tr) if ids.start == 0 else (y_tr, x_id)
            return torch.cat([first, second], dim=1)
        out = torch.empty((x_id.shape[0], self.features, *x_id.shape[2:]), dtype=y_tr.dtype, device=y_tr.device)
        if ids is not None and trs is not None:  # interleaved: strided writes into a fresh tensor
            out[:, ids] = x_id
            out[:, trs] = y_tr
            return out
        out = out.index_copy(1, self.identity_features, x_id)
        return out.index_copy(1, self.transform_features, y_tr)

    def _params(self, x_id, context):
        if context is not None:
            check_context(x_id, context, type(self).__name__)
            if not self.conditional:
                raise ValueError(f"{type(self).__name__}: a context was given but its transform net "
                                 f"({type(self.transform_net).__name__}) takes none: build the net with a "
                                 f"forward(x, context) to condition this layer")
        h = self.transform_net(x_id) if context is None else self.transform_net(x_id, context)
        n = self.num_transform_features * self.params_per_feature
        if h.shape[1] != n or h.shape[0] != x_id.shape[0]:
            raise ValueError(f"transform net must return [B, {n}, ...] (shift and scale for each of "
                             f"{self.num_transform_features} features); got shape {tuple(h.shape)}")
        # Under autocast the net returns half precision while x stays float32. The op takes one dtype, so
        # h follows x, as type promotion in nflows' x * scale + shift would (a no-op when they agree).
        return h.to(x_id.dtype)

    def _run(self, x, context, inverse: bool):
        x_id, x_tr = self._split(x)
        h = self._params(x_id, context)
        y_tr, logabsdet = self._couple(x_tr, h, inverse)
        return self._merge(x_id, y_tr), logabsdet

    def forward(self, inputs, context=None):
        return self._run(inputs, context, inverse=False)

    def inverse(self, inputs, context=None):
        return self._run(inputs, context, inverse=True)


class AffineCoupling(_Coupling):
    """Affine coupling ``y = x * s + shift`` on the masked features, as nflows' AffineCouplingTransform.

    Args:
        mask: [features] (or [channels] for images); > 0 marks the features to transform.
        transform_net_create_fn: ``f(in_features, out_features) -> nn.Module`` mapping the identity part
            [B, n_id, ...] (and ``context`` [B, ...] as a second argument, when its forward takes one) to
            [B, 2 * n_tr, ...]: shift first, then the unconstrained scale (nflows' order).
        scale: "sigmoid" (default; s = sigmoid(u + 2) + 1e-3), "exp" or "softclamp".
        clamp: bound on |log s| for "softclamp".
    """

    def __init__(self, mask, transform_net_create_fn, scale: str = "sigmoid", clamp: float = DEFAULT_CLAMP):
        if scale not in SCALES[:3]:
            raise ValueError(f"scale must be one of {', '.join(map(repr, SCALES[:3]))} "
                             f"(use AdditiveCoupling for 'additive'); got {scale!r}")
        super().__init__(mask, transform_net_create_fn)
        self.scale = scale
        self.clamp = clamp

    def _couple(self, x_tr, h, inverse):
        n = self.num_transform_features
        return ops.affine_coupling(x_tr, h[:, :n], h[:, n:], scale=self.scale, inverse=inverse, clamp=self.clamp)


class AdditiveCoupling(_Coupling):
    """Additive (NICE) coupling ``y = x + shift``: volume preserving, log-det 0.

    ``transform_net_create_fn(in_features, out_features)`` returns a net producing [B, n_tr, ...].
    """

    params_per_feature = 1

    def _couple(self, x_tr, h, inverse):
        return ops.affine_coupling(x_tr, h, None, scale="additive", inverse=inverse)
