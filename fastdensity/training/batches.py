"""The training batch of step ``s``: which examples, and their encoding, both pure functions of
``(seed, s)``.

Examples are visited epoch by epoch, each epoch in its own permutation seeded by ``(seed, epoch)``;
the B examples of step s are positions ``[s * B, (s + 1) * B)`` of that endless sequence, so a batch may
straddle two epochs. The preprocessing (dequantization noise, for continuous models of discrete data)
draws from a generator seeded by ``(seed, TRAIN_NOISE, s)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import data as fdata
from .seeds import TRAIN_NOISE, generator

__all__ = ["Batches", "training_batch"]


class Batches:
    """Indices of the examples in global step ``s`` of a run over ``num_examples`` examples."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 2:  # a batch needs at most two epochs; replays are rare
                self._cache.clear()
            self._cache[epoch] = torch.randperm(self.n, generator=generator(self.seed, epoch))
        return self._cache[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """[batch_size] int64 indices into the training split."""
        out, pos, end = [], step * self.batch_size, (step + 1) * self.batch_size
        while pos < end:
            epoch, offset = divmod(pos, self.n)
            take = min(end - pos, self.n - offset)
            out.append(self._perm(epoch)[offset:offset + take])
            pos += take
        return torch.cat(out)


def training_batch(data: fdata.Data, preprocess: fdata.Preprocess, batches: Batches, step: int,
                   labels: bool = False) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The global batch of ``step`` in model space (CPU): ``y`` [B, *shape], the preprocessing's
    log-Jacobian ``logdet`` [B], with the step's own noise, and (with ``labels``) the examples' class
    labels [B], else None."""
    index = batches.indices(step)
    y, logdet = preprocess.encode(data.train[index], generator(batches.seed, TRAIN_NOISE, step))
    return y, logdet, (data.split_labels("train")[index] if labels else None)
