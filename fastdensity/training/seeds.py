"""Every random stream of a training run, as a pure function of the run's seed.

A stream is a ``torch.Generator`` seeded by :func:`mix_seed` of the run's seed, a tag naming what the
stream is for, and the position it serves (a step, an epoch). Nothing in a step reads the global RNG,
so step ``s`` draws the same numbers whether the run got there directly or was resumed from a
checkpoint, and in whatever order steps are replayed.

    examples of epoch e        randperm seeded by mix_seed(seed, e)             (batches.py)
    dequantization of step s   mix_seed(seed, TRAIN_NOISE, s)                    (batches.py)
    data-dependent init        mix_seed(seed, INIT_BATCH), mix_seed(seed, INIT_NOISE)  (model_setup.py)
    scoring a split            mix_seed(split seed, EVAL_NOISE)                  (evaluation.py)
    the samples PNG            mix_seed(seed, SAMPLES)                           (plots.py)
"""
from __future__ import annotations

import torch

__all__ = ["mix_seed", "generator", "TRAIN_NOISE", "INIT_BATCH", "INIT_NOISE", "EVAL_NOISE", "SAMPLES"]

# Tags keep the streams apart; their values are part of the reproducibility contract (changing one
# changes every run's numbers), not meaningful in themselves.
TRAIN_NOISE = 1
INIT_BATCH = 0x1517
INIT_NOISE = 0x1518
EVAL_NOISE = 0xE7A1
SAMPLES = 0x5A3B

_MASK64 = 0xFFFFFFFFFFFFFFFF


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64-style mixing): nearby inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def generator(*values: int) -> torch.Generator:
    """A CPU generator seeded by ``mix_seed(*values)``."""
    return torch.Generator().manual_seed(mix_seed(*values))
