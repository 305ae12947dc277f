"""Launcher helpers shared by the kernel files: strides, block sizes, dtypes, interpreter detection,
the compile options every launch passes, and the double-backward refusal every op registers.

Nothing here is a Triton kernel; these are the host-side decisions every launcher makes the same way.
"""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch
import triton
import triton.language as tl

from .._dtypes import acc_dtype  # noqa: F401  (re-exported: the launchers' accumulation dtype)

#: True when ``@triton.jit`` in this process returns interpreted functions (TRITON_INTERPRET=1 was set
#: before the kernel modules were imported). Kernel modules copy it into their own ``INTERPRETED``.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

#: Passed as ``enable_fp_fusion=FP_FUSION`` to every launch, so that no environment variable and no
#: Triton release changes our numerics behind our back. Triton compiles ``a * b + c`` into one fused
#: multiply-add when fusion is on; its default has been on, is read from TRITON_DEFAULT_FP_FUSION, and
#: becomes off in Triton 3.10. We keep it on, deliberately: an FMA rounds once where the pair rounds
#: twice (as accurate or more), it is faster, PyTorch's own CUDA kernels are built with nvcc's default
#: ``--fmad=true`` (so the GPU tier's "torch in the same dtype" yardstick fuses too), and every GPU
#: tolerance and benchmark of these kernels was measured with it. (A forward and a backward kernel that
#: must round a recomputed value alike compute it with one shared ``@triton.jit`` helper: the same
#: expression, offered to the compiler for contraction the same way in both. The debugging switch
#: TRITON_FORCE_DISABLE_FP_FUSION still overrides this.)
FP_FUSION = True

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


#: Tests set this to True: every output buffer a launcher allocates through :func:`empty` starts as NaN
#: (integers as -1), so an element the kernel forgets to write fails the comparison with the reference.
POISON_OUTPUTS = False


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs, NaN-filled when :data:`POISON_OUTPUTS` is set."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like`` (same dense layout, channels-last included), poisoned like :func:`empty`."""
    out = torch.empty_like(t)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def on_device_of(t: torch.Tensor):
    """A context in which kernel launches go to ``t``'s GPU. Triton launches on the *current* CUDA device,
    which need not be the tensor's (``x.to("cuda:1")`` without ``torch.cuda.set_device(1)``); a no-op for
    CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def target_programs(device: torch.device) -> int:
    """Programs that fill the GPU a few times over (4 per SM); launchers split long reductions across
    programs until a grid reaches this. In the interpreter a handful, so small test shapes reach the
    split paths."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype matching a torch floating dtype (passed to kernels as a constexpr)."""
    return _TL_DTYPES[dtype]


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def collapse_inner_dims(shape: Sequence[int], strides: Sequence[Sequence[int]], max_dims: int = 2):
    """View the non-batch dims of several same-shaped tensors as at most ``max_dims`` strided dims.

    Adjacent dims ``i, i+1`` merge when, for every tensor, ``stride[i] == stride[i+1] * size[i+1]``
    (so one flat index walks all tensors consistently). Size-1 dims are dropped. Returns
    ``(sizes, per_tensor_strides)`` with exactly ``max_dims`` entries (leading dims padded with
    size 1), or ``None`` when the layouts do not collapse that far.

    Example: ``h[:, 0::2]`` of a contiguous [B, 2C, H, W] tensor next to a contiguous x [B, C, H, W]
    collapses to sizes (C, H*W) with strides (2HW, 1) and (HW, 1).
    """
    dims = [i for i in range(1, len(shape)) if shape[i] != 1]
    sizes: list[int] = []
    per: list[list[int]] = [[] for _ in strides]
    for i in dims:
        if sizes and all(p[-1] == st[i] * shape[i] for p, st in zip(per, strides)):
            sizes[-1] *= shape[i]
            for p, st in zip(per, strides):
                p[-1] = st[i]
        else:
            sizes.append(shape[i])
            for p, st in zip(per, strides):
                p.append(st[i])
    if len(sizes) > max_dims:
        return None
    pad = max_dims - len(sizes)
    sizes = [1] * pad + sizes
    per = [[0] * pad + p for p in per]
    return sizes, per


def row_tile(rows: int, cols: int, max_tile: int = 4096, max_cols: int = 2048) -> tuple[int, int]:
    """Block sizes ``(BLOCK_ROWS, BLOCK_COLS)`` for a row-wise op over a [rows, cols] problem.

    Columns get up to ``max_cols`` (a row longer than that is split across programs); the rest of a
    ``max_tile``-element tile goes to rows, so short rows are batched many to a program.
    """
    block_cols = min(next_pow2(cols), max_cols)
    block_rows = max(1, min(next_pow2(rows), max_tile // block_cols))
    return block_rows, block_cols


def refuse_double_backward(backward_op, op_name: str) -> None:
    """Register an autograd formula for ``backward_op`` (the custom op computing ``op_name``'s gradients)
    that raises a clear error when something differentiates through it: a gradient of a gradient
    (``create_graph=True`` followed by another backward, ``torch.autograd.gradcheck``'s second order,
    Hessians, gradient penalties).

    The kernels implement first derivatives only. Without this, PyTorch's own message names the
    internal backward op and asks for ``register_autograd``, which is no help to the caller.
    """

    def _refuse(ctx, *grads):
        raise RuntimeError(
            f"double backward (a gradient of a gradient) through fastdensity's Triton kernel for {op_name} is "
            f"not supported: the kernels implement first derivatives only. Run this computation on the "
            f"pure-PyTorch path, which is differentiable to any order: `with fastdensity.set_backend("
            f"'reference'): ...` (or set_backend('reference') for the whole run).")

    backward_op.register_autograd(_refuse, setup_context=lambda ctx, inputs, output: None)
