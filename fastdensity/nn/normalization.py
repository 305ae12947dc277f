"""ActNorm (Glow): a per-channel affine map initialised from the first batch's statistics."""
from __future__ import annotations

import torch
from torch import nn

from .base import Transform, per_position_logdet, reject_context

__all__ = ["ActNorm"]


class ActNorm(Transform):
    """``z = (x - loc) * exp(log_scale)`` per feature/channel, log-det = (H*W) * sum(log_scale).

    On the first forward pass in training mode, ``loc`` and ``log_scale`` are set so that the batch
    comes out with zero mean and unit variance per channel (Glow's data-dependent initialisation).
    A channel whose batch has no spread to measure - a single value (a batch of one vector), or values
    all equal up to rounding - keeps ``log_scale = 0`` (scale 1) and is only centred: its standard
    deviation is unknown, and dividing by ~0 would blow later inputs up by ``1 / eps``. An empty batch
    initialises nothing (the next non-empty one does).
    Whether that has happened is a Python flag (so ``torch.compile`` guards on it instead of
    branching on a tensor) mirrored in the ``initialized`` buffer, which travels with the state_dict:
    a loaded model is not re-initialised.

    Inputs: [B, C] or [B, C, H, W] with C = ``num_features``.
    """

    conditional = False  # the same map for every context: a context given to it is an error

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
        count = x.numel() // self.num_features  # values per channel
        if count == 0:
            return
        with torch.no_grad():
            mean = x.mean(dim=dims)
            # The unbiased std needs two values; with one there is nothing to scale by.
            std = x.std(dim=dims) if count > 1 else torch.zeros_like(mean)
            # Equal values give a std of rounding size, ~ulp(mean): below eps * max(|mean|, 1).
            spread = std > self.eps * mean.abs().clamp(min=1.0)
            self.loc.copy_(mean)
            self.log_scale.copy_(torch.where(spread, -torch.log(std + self.eps), torch.zeros_like(std)))
            self.initialized.fill_(True)
        self._initialized = True

    def forward(self, inputs, context=None):
        reject_context(self, context)
        self._broadcast(inputs)  # the shape check, before anything is initialised from the inputs
        if self.training and not self._initialized:
            self._initialize(inputs)
        loc, log_scale = self._broadcast(inputs)
        return (inputs - loc) * torch.exp(log_scale), per_position_logdet(self.log_scale, inputs)

    def inverse(self, inputs, context=None):
        reject_context(self, context)
        loc, log_scale = self._broadcast(inputs)
        return inputs * torch.exp(-log_scale) + loc, -per_position_logdet(self.log_scale, inputs)
