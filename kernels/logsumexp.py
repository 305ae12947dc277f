"""Batched log-sum-exp over any dim: an online max/sum in one read of the input.

The math (reference: ``fastdensity/reference/logsumexp.py``), over the N entries of one row::

    lse = m + log sum_i exp(x_i - m),        m = max_i x_i
    d lse / d x_i = exp(x_i - lse)           (the softmax; backward = upstream g times it)

A row is read in chunks of BLOCK_N. The state after each chunk is the running max ``m`` and the running
sum ``s = sum exp(x_i - shift(m))`` over the entries seen so far, with ``shift(m) = m`` where m is finite
and 0 where it is +-inf. A chunk with max ``m_c`` merges as::

    m' = max(m, m_c)
    s' = s * exp(shift(m) - shift(m')) + sum_chunk exp(x_i - shift(m'))

so no exponent is ever taken of an unshifted value, and each entry is read exactly once. Exponentials
and logarithms are ``exp2``/``log2`` with the log2(e) factor folded in (one multiply, the fast hardware
path). The shift-by-0 rule for non-finite maxima gives torch's answers without branches: an all -inf
row sums zeros (-inf), a +inf entry makes the sum +inf, and NaN propagates through the sum. The
rescale factor is forced to 0 while the running max is still -inf, so ``0 * inf`` never appears.

Backward recomputes the softmax from the input and the saved per-row result, ``g * exp(x - lse)``; no
exponentials are stored. The saved result is kept in float32 even for half inputs (the public op casts
a copy to the input dtype), so half-precision gradients do not inherit a rounded log-sum-exp.

Shapes: x of any shape is viewed as [O, N, I] around the reduced dim (O = product of the dims before
it, I = product of the dims after it, each collapsed to one strided dim; a layout that does not
collapse is copied first). I = 1 (the last dim, the usual case) runs a [BLOCK_R rows x BLOCK_N] tile
over O rows with many short rows per program; I > 1 runs the same tile with "rows" along the I axis,
which is the contiguous one there, so loads stay coalesced without a transpose. When there are few
rows and long ones ([4, 10**6]) each row is split over several programs that write partial results,
and a second launch of the same kernel log-sum-exps the partials (a log-sum-exp of log-sum-exps is the
log-sum-exp of the whole row).

Minimum traffic, M = number of rows (outputs), e = bytes per element of x:

    forward             read x (M N e), write M results                       ~ M N e
    backward            read x, write dx (2 M N e), read g and lse (M each)   ~ 2 M N e
    flops: forward ~4 per element + 1 exp2, backward ~3 per element + 1 exp2: memory-bound.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (FP_FUSION, INTERPRETED, acc_dtype, collapse_inner_dims, empty, next_pow2, on_device_of,
                    refuse_double_backward, target_programs, tl_dtype)

__all__ = ["INTERPRETED", "lse_forward", "lse_backward", "logsumexp_op",
           "lse_shift", "lse_update", "lse_update_tile", "lse_value"]

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

#: Block-size limits of the launcher heuristics. Tests lower
#: MAX_BLOCK_N to send tiny rows through the chunked and split paths.
MAX_BLOCK_N = 4096
TILE_ELEMS = 4096
MAX_BLOCK_R_STRIDED = 128


# ---------------------------------------------------------------------------------------------------
# Online log-sum-exp building blocks (also used by the mixture kernels)
# ---------------------------------------------------------------------------------------------------


@triton.jit
def lse_shift(m):
    """What is subtracted before exponentiating: the running max where finite, else 0.

    All -inf so far: every term is exp(-inf) = 0 whatever the shift. A +inf seen: the sum is +inf
    whatever the shift. NaN (m != m) fails both comparisons and also gets 0.
    """
    return tl.where((m > float("-inf")) & (m < float("inf")), m, 0.0)


@triton.jit
def lse_update(m, s, v):
    """Merge one value per row ``v`` into the running state ``(m, s)`` (all of the same shape)."""
    m_new = tl.maximum(m, v)
    sh_new = lse_shift(m_new)
    # While m is -inf, s is 0 (or NaN): force the factor to 0 so that exp(0 - (-1000)) = inf never
    # multiplies it; 0 * NaN is still NaN, so a NaN already seen survives.
    alpha = tl.where(m == float("-inf"), 0.0, tl.exp2((lse_shift(m) - sh_new) * LOG2E))
    s_new = s * alpha + tl.exp2((v - sh_new) * LOG2E)
    return m_new, s_new


@triton.jit
def lse_update_tile(m, s, x):
    """Merge a [R, C] tile ``x`` into the per-row state ``(m, s)`` of shape [R] (reducing axis 1)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    sh_new = lse_shift(m_new)
    alpha = tl.where(m == float("-inf"), 0.0, tl.exp2((lse_shift(m) - sh_new) * LOG2E))
    s_new = s * alpha + tl.sum(tl.exp2((x - sh_new[:, None]) * LOG2E), axis=1)
    return m_new, s_new


@triton.jit
def lse_value(m, s):
    """The log-sum-exp of a finished state: shift + log(s). -inf for (m=-inf, s=0), +inf for m=+inf."""
    return lse_shift(m) + tl.log2(s) * LN2


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _tile_rows(pid, R, BLOCK_R: tl.constexpr):
    """(outer index, int64 row indices, row mask) of program ``pid`` over [outer, R] rows."""
    n_rblocks = tl.cdiv(R, BLOCK_R)
    o = (pid // n_rblocks).to(tl.int64)
    rows = (pid % n_rblocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    return o, rows, rows < R


@triton.jit
def _lse_fwd_kernel(
    x_ptr, out_ptr,
    R, N, s_o, s_r, s_n,
    n_split, chunks_per_split,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[(o R + r) n_split + split] = lse of x[o, r, chunks of this split] (a partial when n_split > 1)."""
    split = tl.program_id(1)
    o, rows, rmask = _tile_rows(tl.program_id(0), R, BLOCK_R)
    row_off = o * s_o + rows * s_r
    first = split.to(tl.int64) * chunks_per_split * BLOCK_N
    m = tl.full([BLOCK_R], float("-inf"), ACC)
    s = tl.zeros([BLOCK_R], ACC)
    for c in range(0, chunks_per_split):
        cols = first + c * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = rmask[:, None] & (cols < N)[None, :]
        # Out-of-range lanes read -inf: they add exp(-inf) = 0 and never raise the max.
        x = tl.load(x_ptr + row_off[:, None] + cols[None, :] * s_n, mask=mask, other=float("-inf"))
        m, s = lse_update_tile(m, s, x.to(ACC))
    out = lse_value(m, s)
    tl.store(out_ptr + (o * R + rows) * n_split + split, out.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _lse_bwd_kernel(
    x_ptr, lse_ptr, g_ptr, gx_ptr,
    R, N, s_o, s_r, s_n, sg_o, sg_r, sg_n,
    chunks_per_split,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """gx = g * exp(x - lse) for the chunks of this program (lse and g: contiguous [outer * R])."""
    split = tl.program_id(1)
    o, rows, rmask = _tile_rows(tl.program_id(0), R, BLOCK_R)
    lse = tl.load(lse_ptr + o * R + rows, mask=rmask, other=0.0).to(ACC)
    g = tl.load(g_ptr + o * R + rows, mask=rmask, other=0.0).to(ACC)
    row_off = o * s_o + rows * s_r
    grow_off = o * sg_o + rows * sg_r
    first = split.to(tl.int64) * chunks_per_split * BLOCK_N
    for c in range(0, chunks_per_split):
        cols = first + c * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = rmask[:, None] & (cols < N)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + cols[None, :] * s_n, mask=mask, other=0.0).to(ACC)
        gx = g[:, None] * tl.exp2((x - lse[:, None]) * LOG2E)
        tl.store(gx_ptr + grow_off[:, None] + cols[None, :] * sg_n, gx.to(gx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _as_oni(t: torch.Tensor, dim: int):
    """Sizes (O, N, I) and strides (s_o, s_n, s_i) of ``t`` seen as [O, N, I] around ``dim``, or None.

    The dims before ``dim`` must collapse into one strided dim, and so must the dims after it.
    """
    shape, stride = tuple(t.shape), t.stride()
    before = collapse_inner_dims((1, *shape[:dim]), [(0, *stride[:dim])], max_dims=1)
    after = collapse_inner_dims((1, *shape[dim + 1:]), [(0, *stride[dim + 1:])], max_dims=1)
    if before is None or after is None:
        return None
    (O,), ((s_o,),) = before
    (I,), ((s_i,),) = after
    return (O, shape[dim], I), (s_o, stride[dim], s_i)


def _plan(O: int, N: int, I: int, device: torch.device):
    """Tile sizes and the row view: returns (outer, R, BLOCK_R, BLOCK_N, n_chunks, grid0)."""
    if I == 1:  # rows are the O index; each row is contiguous along N when s_n == 1
        outer, R = 1, O
        block_n = min(next_pow2(N), MAX_BLOCK_N)
        block_r = max(1, min(next_pow2(R), TILE_ELEMS // block_n))
    else:  # rows run along I (the contiguous axis of a reduction over a middle dim)
        outer, R = O, I
        block_r = min(next_pow2(R), MAX_BLOCK_R_STRIDED)
        block_n = max(1, min(next_pow2(N), TILE_ELEMS // block_r, MAX_BLOCK_N))
    n_chunks = triton.cdiv(N, block_n)
    grid0 = outer * triton.cdiv(R, block_r)
    return outer, R, block_r, block_n, n_chunks, grid0


def _splits(n_chunks: int, programs: int, target: int):
    """(n_split, chunks_per_split): split long rows only when the rows alone leave the GPU idle."""
    n_split = 1
    if n_chunks > 1 and programs < target:
        n_split = min(n_chunks, triton.cdiv(target, programs), 65535)
    per = triton.cdiv(n_chunks, n_split) if n_chunks else 0
    return (triton.cdiv(n_chunks, per) if per else 1), per


def _warps(block_r: int, block_n: int) -> int:
    return 8 if block_r * block_n >= 4096 else (4 if block_r * block_n >= 1024 else 2)


def _reduced_shape(shape, dim: int, keepdim: bool):
    shape = list(shape)
    if keepdim:
        shape[dim] = 1
    else:
        del shape[dim]
    return shape


def lse_forward(x: torch.Tensor, dim: int, keepdim: bool) -> torch.Tensor:
    """Log-sum-exp of ``x`` over ``dim`` (already normalised to 0 <= dim < x.dim()).

    Returns the result in the accumulation dtype (float32 for half inputs, float64 for float64) with
    the reduced shape; the public op casts it to ``x.dtype``.
    """
    acc = acc_dtype(x.dtype)
    out = empty(_reduced_shape(x.shape, dim, keepdim), dtype=acc, device=x.device)
    view = _as_oni(x, dim)
    if view is None:  # a layout the [O, N, I] view cannot express: one contiguous copy
        x = x.contiguous()
        view = _as_oni(x, dim)
    (O, N, I), (s_o, s_n, s_i) = view
    if out.numel() == 0:
        return out
    outer, R, block_r, block_n, n_chunks, grid0 = _plan(O, N, I, x.device)
    s_r = s_o if I == 1 else s_i
    s_outer = 0 if I == 1 else s_o
    n_split, per = _splits(n_chunks, grid0, target_programs(x.device))
    target = out if n_split == 1 else empty((outer * R, n_split), dtype=acc, device=x.device)
    _lse_fwd_kernel[(grid0, n_split)](
        x, target, R, N, s_outer, s_r, s_n, n_split, per,
        ACC=tl_dtype(acc), BLOCK_R=block_r, BLOCK_N=block_n, num_warps=_warps(block_r, block_n),
        enable_fp_fusion=FP_FUSION,
    )
    if n_split > 1:  # combine the partial results of each row: the same kernel over [rows, n_split]
        rows = outer * R
        _, _, br, bn, nc, g0 = _plan(rows, n_split, 1, x.device)
        _lse_fwd_kernel[(g0, 1)](
            target, out, rows, n_split, 0, n_split, 1, 1, nc,
            ACC=tl_dtype(acc), BLOCK_R=br, BLOCK_N=bn, num_warps=_warps(br, bn), enable_fp_fusion=FP_FUSION,
        )
    return out


def lse_backward(grad: torch.Tensor, x: torch.Tensor, lse: torch.Tensor, dim: int) -> torch.Tensor:
    """``grad * exp(x - lse)`` broadcast along ``dim``: the gradient of the log-sum-exp, in x's dtype."""
    acc = acc_dtype(x.dtype)
    gx = empty(x.shape, dtype=x.dtype, device=x.device)
    if gx.numel() == 0:
        return gx
    view = _as_oni(x, dim)
    if view is None:
        x = x.contiguous()
        view = _as_oni(x, dim)
    (O, N, I), (s_o, s_n, s_i) = view
    _, (sg_o, sg_n, sg_i) = _as_oni(gx, dim)
    outer, R, block_r, block_n, n_chunks, grid0 = _plan(O, N, I, x.device)
    n_split = min(n_chunks, 65535)  # no reduction here: every chunk can have its own program
    per = triton.cdiv(n_chunks, n_split)
    n_split = triton.cdiv(n_chunks, per)
    g = grad.to(acc).contiguous()
    lse = lse.to(acc).contiguous()
    _lse_bwd_kernel[(grid0, n_split)](
        x, lse, g, gx, R, N,
        0 if I == 1 else s_o, s_o if I == 1 else s_i, s_n,
        0 if I == 1 else sg_o, sg_o if I == 1 else sg_i, sg_n,
        per,
        ACC=tl_dtype(acc), BLOCK_R=block_r, BLOCK_N=block_n, num_warps=_warps(block_r, block_n),
        enable_fp_fusion=FP_FUSION,
    )
    return gx


# ---------------------------------------------------------------------------------------------------
# torch.library registration: custom_op + register_fake + register_autograd, as for the coupling, so
# torch.compile(fullgraph=True) runs through the op on torch 2.11 and 2.13 alike.
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdensity::logsumexp", mutates_args=())
def logsumexp_op(x: torch.Tensor, dim: int, keepdim: bool) -> torch.Tensor:
    with on_device_of(x):
        return lse_forward(x, dim, keepdim)


@logsumexp_op.register_fake
def _(x, dim, keepdim):
    return x.new_empty(_reduced_shape(x.shape, dim, keepdim), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("fastdensity::logsumexp_backward", mutates_args=())
def logsumexp_backward_op(grad: torch.Tensor, x: torch.Tensor, lse: torch.Tensor, dim: int,
                          keepdim: bool) -> torch.Tensor:
    if not keepdim:  # put the reduced dim back so grad and lse line up with x's [O, 1, I] view
        grad, lse = grad.unsqueeze(dim), lse.unsqueeze(dim)
    with on_device_of(x):
        return lse_backward(grad, x, lse, dim)


@logsumexp_backward_op.register_fake
def _(grad, x, lse, dim, keepdim):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, dim, keepdim = inputs
    # The input and the per-row result are all backward needs: the softmax is recomputed from them.
    ctx.save_for_backward(x, output)
    ctx.dim, ctx.keepdim = dim, keepdim


def _backward(ctx, grad):
    x, lse = ctx.saved_tensors
    return logsumexp_backward_op(grad, x, lse, ctx.dim, ctx.keepdim), None, None


logsumexp_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(logsumexp_backward_op, "logsumexp")

#: Least occupancy (resident warps / 64) each kernel needs on a Hopper SM (sm_90) and why; the static sm_90 tier
#: (fastdensity.sm90, tests/test_sm90_compile.py) checks every launch against it.
SM90_OCCUPANCY_FLOOR = {name: (0.25, "memory-bound (one read of x, a few flops per element): 16 warps keep the "
                                     "~30 KB per SM in flight that 4.8 TB/s at ~0.8 us needs")
                        for name in ("_lse_fwd_kernel", "_lse_bwd_kernel")}
