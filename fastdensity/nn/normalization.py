"""ActNorm (Glow): a per-channel affine map initialised from the first batch's statistics."""
from __future__ import annotations

import torch
from torch import nn

from .base import Transform, per_position_logdet

__all__ = ["ActNorm"]


class ActNorm(Transform):
    """``z = (x - loc) * exp(log_scale)`` per feature/channel, log-det = (H*W) * sum(log_scale).

    On the first forward pass in training mode, ``loc`` and ``log_scale`` are set so that the batch
    comes out with zero mean and unit variance per channel (Glow's data-dependent initialisation).
    Whether that has happened is a Python flag (so ``torch.compile`` guards on it instead of
    branching on a tensor) mirrored in the ``initialized`` buffer, which travels with the state_dict:
    a loaded model is not re-initialised.

    Inputs: [B, C] or [B, C, H, W] with C = ``num_features``.
    """

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.loc = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "initialized"
        if key in state_dict:
            self._initialized = bool(state_dict[key])

    def _broadcast(self, x: torch.Tensor):
        if x.dim() not in (2, 4) or x.shape[1] != self.num_features:
            raise ValueError(f"inputs must be [B, {self.num_features}] or [B, {self.num_features}, H, W]; "
                             f"got shape {tuple(x.shape)}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.loc.view(shape), self.log_scale.view(shape)

    def _initialize(self, x: torch.Tensor) -> None:
        dims = [0] + list(range(2, x.dim()))
        with torch.no_grad():
            self.loc.copy_(x.mean(dim=dims))
            self.log_scale.copy_(-torch.log(x.std(dim=dims) + self.eps))
            self.initialized.fill_(True)
        self._initialized = True

    def forward(self, inputs, context=None):
        if self.training and not self._initialized:
            self._initialize(inputs)
        loc, log_scale = self._broadcast(inputs)
        return (inputs - loc) * torch.exp(log_scale), per_position_logdet(self.log_scale, inputs)

    def inverse(self, inputs, context=None):
        loc, log_scale = self._broadcast(inputs)
        return inputs * torch.exp(-log_scale) + loc, -per_position_logdet(self.log_scale, inputs)
