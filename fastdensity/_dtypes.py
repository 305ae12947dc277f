"""The dtype rule shared by every op, layer and kernel launcher.

Compute, accumulate and return log-densities and log-determinants in float64 for float64 inputs and
in float32 for every other floating dtype: a sum of thousands of bf16 terms keeps about three
significant digits, so half-precision inputs give float32 results.
"""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for float32, float16 and bfloat16."""
    return torch.float64 if dtype == torch.float64 else torch.float32
