"""Argument checks shared by the public ops: errors that name the argument and what was expected.

Every public op validates here, before dispatch, so the reference and the kernels reject exactly the
same inputs with exactly the same message.
"""
from __future__ import annotations

import numbers
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


def check_real(name: str, value) -> float:
    """``value`` as a float: it must be a real number (int, float or a NumPy scalar; not bool, str or None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")
    return float(value)


def check_int(name: str, value, *, minimum: int | None = 0) -> int:
    """``value`` as an int: it must be an integer (a Python or NumPy int, or a float holding a whole
    number such as ``64.0`` or ``1e9``; not bool or str) of at least ``minimum`` (None: any)."""
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}; got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {expected}; got {value}")
    return int(value)


def check_interpretable_dtype(name: str, tensor: torch.Tensor, op: str) -> None:
    """Refuse a bfloat16 CPU operand of a kernel that multiplies with ``tl.dot``.

    Call it on the kernel path (after ``backend.use_kernels`` chose the kernel), where a CPU tensor means
    Triton's interpreter: its ``tl.dot`` hands bfloat16 tiles to NumPy as their raw 16-bit patterns and
    multiplies those as integers (a Triton limitation), so the result would be garbage (~1e10), not an
    error. A kernel that widens its operands to fp32 under the interpreter first (as
    ``kernels/masked_linear.py`` does) needs no such check.
    """
    if tensor.device.type == "cpu" and tensor.dtype == torch.bfloat16:
        raise ValueError(
            f"{op}: {name} is bfloat16 on the CPU, where the Triton kernel runs in Triton's interpreter, whose "
            f"tl.dot cannot multiply bfloat16 (it would return garbage); use float16 or float32 there, the "
            f"reference backend (set_backend('reference')), or CUDA tensors")
