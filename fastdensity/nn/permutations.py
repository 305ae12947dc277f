"""Feature/channel permutations between coupling layers (log-det 0)."""
from __future__ import annotations

import torch

from .base import Transform, zero_logdet

__all__ = ["Permutation", "ReversePermutation", "RandomPermutation"]


class Permutation(Transform):
    """``z = x[:, permutation]`` along dim 1 (features of [B, D], channels of [B, C, H, W])."""

    def __init__(self, permutation: torch.Tensor):
        super().__init__()
        permutation = torch.as_tensor(permutation, dtype=torch.long)
        n = permutation.numel()
        if permutation.dim() != 1 or not torch.equal(torch.sort(permutation).values, torch.arange(n)):
            raise ValueError(f"permutation must be a 1-D permutation of 0..{n - 1}; got {permutation.tolist()}")
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def _permute(self, x, index):
        if x.dim() < 2 or x.shape[1] != index.numel():
            raise ValueError(f"inputs must have {index.numel()} features in dim 1; got shape {tuple(x.shape)}")
        return x.index_select(1, index), zero_logdet(x)

    def forward(self, inputs, context=None):
        return self._permute(inputs, self.permutation)

    def inverse(self, inputs, context=None):
        return self._permute(inputs, self.inverse_permutation)


class ReversePermutation(Permutation):
    """Reverse the order of ``features``."""

    def __init__(self, features: int):
        super().__init__(torch.arange(features - 1, -1, -1))


class RandomPermutation(Permutation):
    """A fixed random permutation of ``features`` (drawn from ``generator`` or the global RNG; saved
    in the state_dict so a reloaded model uses the same one)."""

    def __init__(self, features: int, generator: torch.Generator | None = None):
        super().__init__(torch.randperm(features, generator=generator))
