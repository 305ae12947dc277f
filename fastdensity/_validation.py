"""Argument checks shared by the public ops: errors that name the argument and what was expected.

Every public op validates here, before dispatch, so the reference and the kernels reject exactly the
same inputs with exactly the same message.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value, *, min_dim: int = 0, dims: int | None = None) -> torch.Tensor:
    """``value`` must be a floating-point tensor (of ``dims`` dims, or at least ``min_dim``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64; got {value.dtype}")
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims; got shape {tuple(value.shape)}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims; got shape {tuple(value.shape)}")
    return value


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_bias(bias, out_features: int, out_name: str, tensors: dict) -> None:
    """An optional [out_features] bias (``out_name`` names that size in the message); when given it
    joins ``tensors`` for :func:`check_same`'s dtype and device check."""
    if bias is None:
        return
    check_tensor("bias", bias, dims=1)
    if bias.shape[0] != out_features:
        raise ValueError(f"bias must have shape [{out_name}] = ({out_features},); got {tuple(bias.shape)}")
    tensors["bias"] = bias


def check_same(tensors: Mapping[str, torch.Tensor], *, shape: bool = True) -> None:
    """All ``tensors`` share dtype and device (and shape, unless ``shape=False``); names the culprits."""
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if shape and t.shape != first.shape:
            raise ValueError(
                f"{name} must have the same shape as {first_name}, {tuple(first.shape)}; got {tuple(t.shape)}")
        if t.dtype != first.dtype:
            raise ValueError(f"{name} must have the same dtype as {first_name}, {first.dtype}; got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} must be on the same device as {first_name}, {first.device}; got {t.device}")
