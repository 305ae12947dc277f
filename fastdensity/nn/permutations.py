"""Feature/channel permutations between coupling layers (log-det 0)."""
from __future__ import annotations

import torch

from .._validation import check_int
from .base import Transform, reject_context, zero_logdet

__all__ = ["Permutation", "ReversePermutation", "RandomPermutation"]


class Permutation(Transform):
    """``z = x[:, permutation]`` along dim 1 (features of [B, D], channels of [B, C, H, W]).

    ``permutation``: a 1-D integer tensor (or sequence of ints) holding each of 0..n-1 once.
    """

    conditional = False  # the same map for every context: a context given to it is an error

    def __init__(self, permutation: torch.Tensor):
        super().__init__()
        permutation = torch.as_tensor(permutation)
        # Floats (or bools) would be truncated into indices without a word: [0.5, 1.5] -> [0, 1].
        if permutation.numel() and (permutation.is_floating_point() or permutation.is_complex()
                                    or permutation.dtype == torch.bool):
            raise TypeError(f"permutation must hold integers (each of 0..n-1 once); got dtype {permutation.dtype}: "
                            f"{permutation.tolist() if permutation.numel() <= 16 else '...'}")
        permutation = permutation.to(torch.long)
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
        reject_context(self, context)
        return self._permute(inputs, self.permutation)

    def inverse(self, inputs, context=None):
        reject_context(self, context)
        return self._permute(inputs, self.inverse_permutation)


class ReversePermutation(Permutation):
    """Reverse the order of ``features``."""

    def __init__(self, features: int):
        features = check_int("features", features, minimum=1)
        super().__init__(torch.arange(features - 1, -1, -1))


class RandomPermutation(Permutation):
    """A fixed random permutation of ``features`` (drawn from ``generator`` or the global RNG; saved
    in the state_dict so a reloaded model uses the same one)."""

    def __init__(self, features: int, generator: torch.Generator | None = None):
        features = check_int("features", features, minimum=1)
        super().__init__(torch.randperm(features, generator=generator))
