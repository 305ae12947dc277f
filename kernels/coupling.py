"""Fused affine coupling: ``y = x * s + shift`` and the per-sample log-det in one pass.

The math (``h`` = scale_raw, ``c`` = clamp; reference: ``fastdensity/reference/coupling.py``)::

    forward   y = x * s(h) + t              logdet[b] =  sum_n log s(h[b, n])
    inverse   x = (y - t) / s(h)            logdet[b] = -sum_n log s(h[b, n])

    scale       s(h)                   log s(h)            g(h) = d log s / dh
    exp         exp(h)                 h                   1
    softclamp   exp(c tanh(h/c))       c tanh(h/c)         1 - tanh(h/c)^2
    sigmoid     sigmoid(h+2) + 1e-3    log s               sigmoid(h+2) (1 - sigmoid(h+2)) / s
    softplus    softplus(h) + 1e-3     log s               sigmoid(h) / s
    additive    1                      0                   -

    softplus(h) = max(h, 0) + log1p(exp(-|h|)): exp of a non-positive number never overflows, and one
    e = exp(-|h|) serves both softplus and sigmoid(h) = (1 or e) / (1 + e).

Gradients, with upstream ``gy`` (for y) and ``gl`` (for logdet, one per row)::

    forward   gx = gy * s     gt = gy          gh = (gy * (y - t) + gl) * g     with y - t = x * s
    inverse   gy = gx / s     gt = -gx / s     gh = -(gx * x + gl) * g          with x = (y - t) / s

so backward needs only the inputs it already had (x, h and, for the inverse, t): nothing is saved that
the caller does not hold anyway, and s, g are recomputed in registers.

Shapes: every tensor is [B, ...] with the same shape; ``t``/``h`` may be strided views such as
``h[:, 0::2]`` or ``h.chunk(2, 1)`` and are read in place. The launcher collapses the non-batch dims
of all tensors together into a strided [B, R, S] view; layouts that do not collapse that far are
copied (and said so in ``_as_3d``).

Minimum traffic, N = elements of x, e = bytes per element (the floor the benchmark reports against):

    forward             read x, t, h; write y                       4 N e   (+ B log-dets)
    backward (forward)  read gy, x, h; write gx, gh  (gt is gy)     5 N e
    forward + backward                                              9 N e
    (inverse backward also writes gt = -gx/s and reads t: 7 N e)
    flops: ~10 per element forward, ~15 backward, plus 1-3 transcendentals: memory-bound everywhere.

Precision: loads in the storage dtype, math in fp32 (fp64 for fp64 data), log-det accumulated in the
same; s = exp(.) is libdevice's exp on a GPU (see ``_exp``). ``clamp`` reaches the kernel as an fp32
scalar (Triton's type for a Python float), so under fp64 a clamp that fp32 cannot represent exactly
(2.0, the default, can) is rounded to fp32.

Parallelism: a 2-D grid of [BLOCK_B rows x BLOCK_N columns] tiles. Long rows ([256, 6144]) split over
several column blocks; short rows ([65536, 64]) pack many to a program. Each program writes the row
sums of its tile to a [B, n_col_blocks] buffer in fp32 (fp64 for fp64 data); the launcher sums that
buffer's columns (a no-op when there is one column block). No atomics, so results are deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
try:  # the dtype-dispatching libdevice module (Triton 3.x); older layouts kept it under extra.cuda
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the installed Triton
    from triton.language.extra.cuda import libdevice

from .utils import (FP_FUSION, INTERPRETED, acc_dtype, collapse_inner_dims, empty, empty_like, on_device_of,
                    refuse_double_backward, row_tile, tl_dtype)

__all__ = ["INTERPRETED", "SCALE_CODES", "coupling_forward", "coupling_backward", "affine_coupling_op"]

# Scale functions as compile-time codes: each variant compiles its own kernel, no runtime branch.
SCALE_CODES = {"exp": 0, "softclamp": 1, "sigmoid": 2, "additive": 3, "softplus": 4}
_EXP = tl.constexpr(0)
_SOFTCLAMP = tl.constexpr(1)
_SIGMOID = tl.constexpr(2)
_ADDITIVE = tl.constexpr(3)
_SOFTPLUS = tl.constexpr(4)

# Triton lowers an fp32 tl.exp to ex2.approx(x * log2(e)), whose error grows with |x| (about 2 + 1.2|x|
# ulps): s = exp(h) at h ~ 5 is several times less accurate than eager PyTorch's, enough to fail the GPU
# tier's rule (|kernel - fp64| <= 2 |eager - fp64| + atol) for scale="exp". Where an exp *is* the scale,
# compiled kernels therefore call libdevice's exp (CUDA's expf, the function eager PyTorch uses). The
# interpreter has no libdevice; there NumPy's exp runs, which is accurate anyway.
_LIBDEVICE_EXP = tl.constexpr(not INTERPRETED)


@triton.jit
def _exp(x):
    if _LIBDEVICE_EXP:
        e = libdevice.exp(x)
    else:
        e = tl.exp(x)
    return e


@triton.jit
def _sigmoid(z):
    # 1 / (1 + exp(-z)) saturates cleanly: exp(-z) -> inf gives 0, -> 0 gives 1. The fast tl.exp is
    # enough here: a relative error e in exp(-z) moves sigmoid(z) by only e * (1 - sigmoid(z)).
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _log1p(e):
    """log(1 + e) for e >= 0, accurate where e is tiny (softplus(h) for h << 0, right next to its +1e-3
    floor, where log(1 + e) with 1 + e rounded would lose ~1e-7 absolute in fp32). Compiled: libdevice's
    log1p. Interpreted (no libdevice there): Kahan's correction log(w) * e / (w - 1) with w = fl(1 + e),
    which undoes the rounding of w; e itself where w rounds to 1."""
    if _LIBDEVICE_EXP:
        r = libdevice.log1p(e)
    else:
        w = 1.0 + e
        rounds_to_one = w == 1.0
        r = tl.where(rounds_to_one, e, tl.log(w) * (e / tl.where(rounds_to_one, 1.0, w - 1.0)))
    return r


@triton.jit
def _softplus_and_sigmoid(h):
    """``(softplus(h), sigmoid(h))`` from one exponential e = exp(-|h|) in (0, 1]."""
    e = _exp(-tl.abs(h))
    softplus = tl.maximum(h, 0.0) + _log1p(e)
    sigmoid = tl.where(h >= 0, 1.0, e) / (1.0 + e)
    return softplus, sigmoid


@triton.jit
def _scale_terms(h, clamp, SCALE: tl.constexpr):
    """``(s, log s, d log s / dh)`` for one tile of scale_raw, in the compute dtype of ``h``."""
    if SCALE == _EXP:
        log_s = h
        s = _exp(h)
        dlog = tl.full(h.shape, 1.0, h.dtype)
    elif SCALE == _SOFTCLAMP:
        # tanh(u) = 2 sigmoid(2u) - 1: libdevice's tanh is not available to the interpreter.
        th = 2.0 * _sigmoid(2.0 * h / clamp) - 1.0
        log_s = clamp * th
        s = _exp(log_s)
        dlog = 1.0 - th * th
    elif SCALE == _SOFTPLUS:
        softplus, sig = _softplus_and_sigmoid(h)
        s = softplus + tl.full(h.shape, 1e-3, h.dtype)  # in h's dtype: see the sigmoid branch
        log_s = tl.log(s)
        dlog = sig / s
    else:  # _SIGMOID
        sig = _sigmoid(h + 2.0)
        # Compiled Triton rounds a float literal to fp32 before it meets an fp64 tensor (1e-3 would be
        # off by 5e-11); building the constant in h's dtype keeps fp64 exact.
        s = sig + tl.full(h.shape, 1e-3, h.dtype)
        log_s = tl.log(s)
        dlog = sig * (1.0 - sig) / s
    return s, log_s, dlog


@triton.jit
def _tile(pid_b, pid_n, B, N, S, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_RS: tl.constexpr,
          WIDE: tl.constexpr):
    """This tile's first row ``row0`` (int64), its rows relative to row0, its columns (flat index within a
    row) with their (r, s) coordinates, and its mask.

    Offsets within a tile are int32 (one register per element, 32-bit division for r and s) unless WIDE:
    the launcher sets it when some offset relative to row0 could pass 2^31 - 1 (``_needs_wide``). Only
    row0 times a batch stride, once per tile, is 64-bit. N = R * S comes from the host: the product of
    two int32 arguments could wrap.
    """
    row0 = pid_b.to(tl.int64) * BLOCK_B
    if WIDE:
        rows = tl.arange(0, BLOCK_B).to(tl.int64)
        cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    else:
        rows = tl.arange(0, BLOCK_B)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SPLIT_RS:
        # With S a multiple of 16 (e.g. H * W), the compiler still sees runs of 16 contiguous s.
        r = cols // S
        s = cols % S
    else:
        # The inner dims collapsed to one: skip the integer division.
        r = cols * 0
        s = cols
    mask = (rows < B - row0)[:, None] & (cols < N)[None, :]
    return row0, rows, cols, r, s, mask


@triton.jit
def _offsets(rows, r, s, s_b, s_r, s_s):
    """Element offsets of a [rows, (r, s)] tile of one strided tensor, relative to its row0."""
    return rows[:, None] * s_b + (r * s_r + s * s_s)[None, :]


@triton.jit
def _coupling_fwd_kernel(
    in_ptr, t_ptr, h_ptr, out_ptr, ld_ptr,
    B, N, S,
    s_in_b, s_in_r, s_in_s,
    s_t_b, s_t_r, s_t_s,
    s_h_b, s_h_r, s_h_s,
    s_out_b, s_out_r, s_out_s,
    n_col_blocks, clamp,
    SCALE: tl.constexpr, INVERSE: tl.constexpr, ACC: tl.constexpr, SPLIT_RS: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    row0, rows, _, r, s, mask = _tile(pid_b, pid_n, B, N, S, BLOCK_B, BLOCK_N, SPLIT_RS, WIDE)

    x = tl.load(in_ptr + row0 * s_in_b + _offsets(rows, r, s, s_in_b, s_in_r, s_in_s), mask=mask)
    t = tl.load(t_ptr + row0 * s_t_b + _offsets(rows, r, s, s_t_b, s_t_r, s_t_s), mask=mask)
    x = x.to(ACC)
    t = t.to(ACC)
    if SCALE == _ADDITIVE:
        if INVERSE:
            y = x - t
        else:
            y = x + t
    else:
        h = tl.load(h_ptr + row0 * s_h_b + _offsets(rows, r, s, s_h_b, s_h_r, s_h_s), mask=mask).to(ACC)
        sc, log_s, _ = _scale_terms(h, clamp, SCALE)
        if INVERSE:
            y = (x - t) / sc
        else:
            y = x * sc + t
        # Masked lanes loaded 0 -> log s(0) != 0, so zero them before the row sum.
        part = tl.sum(tl.where(mask, log_s, 0.0), axis=1)
        if INVERSE:
            part = -part
        tl.store(ld_ptr + row0 * n_col_blocks + rows * n_col_blocks + pid_n, part, mask=rows < B - row0)
    out = out_ptr + row0 * s_out_b + _offsets(rows, r, s, s_out_b, s_out_r, s_out_s)
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _coupling_bwd_kernel(
    gout_ptr, gld_ptr, in_ptr, t_ptr, h_ptr, gin_ptr, gh_ptr, gt_ptr,
    B, N, S,
    s_go_b, s_go_r, s_go_s, s_gld_b,
    s_in_b, s_in_r, s_in_s,
    s_t_b, s_t_r, s_t_s,
    s_h_b, s_h_r, s_h_s,
    clamp,
    SCALE: tl.constexpr, INVERSE: tl.constexpr, ACC: tl.constexpr, SPLIT_RS: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients for the input, scale_raw and (inverse only) shift. Outputs are contiguous [B, N]."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    row0, rows, cols, r, s, mask = _tile(pid_b, pid_n, B, N, S, BLOCK_B, BLOCK_N, SPLIT_RS, WIDE)
    flat = rows[:, None] * N + cols[None, :]  # in the contiguous outputs, relative to row0
    out0 = row0 * N

    gout = tl.load(gout_ptr + row0 * s_go_b + _offsets(rows, r, s, s_go_b, s_go_r, s_go_s), mask=mask).to(ACC)
    gld = tl.load(gld_ptr + row0 * s_gld_b + rows * s_gld_b, mask=rows < B - row0).to(ACC)[:, None]
    xin = tl.load(in_ptr + row0 * s_in_b + _offsets(rows, r, s, s_in_b, s_in_r, s_in_s), mask=mask).to(ACC)
    h = tl.load(h_ptr + row0 * s_h_b + _offsets(rows, r, s, s_h_b, s_h_r, s_h_s), mask=mask).to(ACC)
    sc, _, dlog = _scale_terms(h, clamp, SCALE)
    if INVERSE:
        t = tl.load(t_ptr + row0 * s_t_b + _offsets(rows, r, s, s_t_b, s_t_r, s_t_s), mask=mask).to(ACC)
        x = (xin - t) / sc  # the inverse's output, recomputed rather than saved
        gin = gout / sc
        gh = -(gout * x + gld) * dlog
        tl.store(gt_ptr + out0 + flat, (-gin).to(gt_ptr.dtype.element_ty), mask=mask)
    else:
        gin = gout * sc
        gh = (gout * xin * sc + gld) * dlog
    tl.store(gin_ptr + out0 + flat, gin.to(gin_ptr.dtype.element_ty), mask=mask)
    tl.store(gh_ptr + out0 + flat, gh.to(gh_ptr.dtype.element_ty), mask=mask)


def _as_3d(shape, tensors):
    """Collapse ``tensors`` (all of ``shape``) to a shared strided [B, R, S] view.

    Returns ``(tensors, (R, S), strides)``; a tensor whose layout prevents the collapse is replaced
    by a contiguous copy (a permuted 4-D view, say) - correct, but one extra read and write of it.
    """
    tensors = list(tensors)
    while True:
        found = collapse_inner_dims(shape, [t.stride() for t in tensors])
        if found is not None:
            (R, S), inner = found
            strides = [(t.stride(0), *st) for t, st in zip(tensors, inner)]
            return tensors, (R, S), strides
        # Copy the first non-contiguous tensor and retry: contiguous tensors always collapse together.
        idx = next(i for i, t in enumerate(tensors) if not t.is_contiguous())
        tensors[idx] = tensors[idx].contiguous()


#: Elements of a tile per thread (fp64: half, since an fp64 value takes two registers). Eight fp32 values are
#: two 16-byte loads per input per thread, and with the registers that leaves (measured with ptxas for
#: sm_90, Triton 3.6 and 3.9: 17-72 per thread for every scale and dtype, against 130-255 and spills at
#: 32 per thread) 28 or more warps fit an SM, which keeps the loads in flight that bandwidth needs.
ELEMS_PER_THREAD = 8
MAX_WARPS = 4
_INT32_MAX = 2 ** 31 - 1


def _launch_config(B: int, N: int, dtype: torch.dtype):
    """``(BLOCK_B, BLOCK_N, grid, warps)``: tiles of up to MAX_WARPS warps of ELEMS_PER_THREAD elements."""
    per_thread = ELEMS_PER_THREAD // 2 if dtype == torch.float64 else ELEMS_PER_THREAD
    max_tile = MAX_WARPS * 32 * per_thread
    block_b, block_n = row_tile(B, N, max_tile=max_tile, max_cols=max_tile)
    grid = (triton.cdiv(B, block_b), triton.cdiv(N, block_n))
    return block_b, block_n, grid, max(1, min(MAX_WARPS, block_b * block_n // (32 * per_thread)))


def _needs_wide(block_b: int, N: int, block_n: int, R: int, S: int, strides, row_strides=()) -> bool:
    """Whether an offset within a tile, relative to its first row, could pass 2^31 - 1: the kernels then
    index in int64 (WIDE). ``strides``: (batch, r, s) per strided tensor; ``row_strides``: tensors read
    once per row; the contiguous [B, N] outputs and the columns of a tile's masked lanes count too."""
    spans = [(block_b - 1) * abs(sb) + (R - 1) * abs(sr) + (S - 1) * abs(ss) for sb, sr, ss in strides]
    spans += [(block_b - 1) * abs(sb) for sb in row_strides]
    spans.append(block_b * N + block_n)
    return max(spans) > _INT32_MAX


def _gpu_tiles(dtype_name: str):
    """The tiles the launcher picks for the benchmark shapes [256, 6*32*32] and [65536, 64], which the CPU
    tiers never launch, and at the first of them the (r, s) split of a strided view and int64 offsets,
    which no benchmark case reaches; ``tests/test_sm90_compile.py`` compiles them for sm_90 too."""
    dtype = getattr(torch, dtype_name)
    configs = (_launch_config(256, 6 * 32 * 32, dtype), _launch_config(65536, 64, dtype))
    variants = [({"BLOCK_B": bb, "BLOCK_N": bn}, {"num_warps": warps, "enable_fp_fusion": FP_FUSION})
                for bb, bn, _, warps in configs]
    tile, options = variants[0]
    return variants + [({**tile, "SPLIT_RS": True, "WIDE": wide}, options) for wide in (False, True)]


SM90_VARIANTS = {"_coupling_fwd_kernel": _gpu_tiles, "_coupling_bwd_kernel": _gpu_tiles}


def coupling_forward(x, shift, scale_raw, scale: str, inverse: bool, clamp: float):
    """Launch the forward (or inverse) kernel. Inputs are validated by ``fastdensity.ops``.

    Returns ``(y, logdet)``: y with x's shape, dtype and (dense) memory format; logdet [B] in fp32
    (fp64 for fp64 inputs).
    """
    B = x.shape[0]
    out = empty_like(x)
    acc = acc_dtype(x.dtype)
    additive = scale == "additive"
    if x.numel() == 0:  # nothing to launch (and a zero-element view may have any strides at all)
        return out, torch.zeros(B, dtype=acc, device=x.device)
    N = x.numel() // B
    h = x if additive else scale_raw  # additive never reads h; any valid pointer will do
    (xin, t, h, out_v), (R, S), (sx, st, sh, so) = _as_3d(x.shape, (x, shift, h, out))
    block_b, block_n, grid, warps = _launch_config(B, N, x.dtype)
    wide = _needs_wide(block_b, N, block_n, R, S, (sx, st, sh, so))
    # flat, so that with one column block the log-det is this allocation itself, not a view of it: callers
    # (nflows' couplings) add into the log-det in place, which autograd refuses on a custom op's view output
    partial = empty((B * grid[1],), dtype=acc, device=x.device)
    with on_device_of(x):
        _coupling_fwd_kernel[grid](
            xin, t, h, out_v, partial,
            B, N, S, *sx, *st, *sh, *so,
            grid[1], float(clamp),
            SCALE=SCALE_CODES[scale], INVERSE=inverse, ACC=tl_dtype(acc), SPLIT_RS=R > 1, WIDE=wide,
            BLOCK_B=block_b, BLOCK_N=block_n, num_warps=warps, enable_fp_fusion=FP_FUSION,
        )
    if out_v is not out:  # the output itself needed a contiguous stand-in
        out.copy_(out_v)
    if additive:
        return out, torch.zeros(B, dtype=acc, device=x.device)
    logdet = partial if grid[1] == 1 else partial.view(B, grid[1]).sum(dim=1)
    return out, logdet


def coupling_backward(grad_out, grad_logdet, inp, shift, scale_raw, scale: str, inverse: bool, clamp: float):
    """Launch the backward kernel for a non-additive scale.

    Returns ``(grad_in, grad_scale_raw, grad_shift)``; ``grad_shift`` is None in the forward
    direction, where it equals ``grad_out`` and the caller passes that through without a copy.
    """
    B = inp.shape[0]
    acc = acc_dtype(inp.dtype)
    grad_in = empty(inp.shape, dtype=inp.dtype, device=inp.device)
    grad_h = empty(scale_raw.shape, dtype=scale_raw.dtype, device=inp.device)
    grad_t = empty(shift.shape, dtype=shift.dtype, device=inp.device) if inverse else None
    if inp.numel() == 0:
        return grad_in, grad_h, grad_t
    N = inp.numel() // B
    (go, xin, t, h), (R, S), (sgo, sx, st, sh) = _as_3d(inp.shape, (grad_out, inp, shift, scale_raw))
    block_b, block_n, grid, warps = _launch_config(B, N, inp.dtype)
    wide = _needs_wide(block_b, N, block_n, R, S, (sgo, sx, st, sh), (grad_logdet.stride(0),))
    with on_device_of(inp):
        _coupling_bwd_kernel[grid](
            go, grad_logdet, xin, t, h, grad_in, grad_h, grad_t if inverse else grad_in,
            B, N, S, *sgo, grad_logdet.stride(0), *sx, *st, *sh,
            float(clamp),
            SCALE=SCALE_CODES[scale], INVERSE=inverse, ACC=tl_dtype(acc), SPLIT_RS=R > 1, WIDE=wide,
            BLOCK_B=block_b, BLOCK_N=block_n, num_warps=warps, enable_fp_fusion=FP_FUSION,
        )
    return grad_in, grad_h, grad_t


# ---------------------------------------------------------------------------------------------------
# torch.library registration. custom_op + register_fake + register_autograd is the autograd.Function of
# this op: torch.compile(fullgraph=True) sees two opaque ops (forward, backward) with known output
# shapes, so a flow using the coupling compiles without a graph break, on torch 2.11 and 2.13 alike.
# (triton_op + wrap_triton would let Inductor look inside the kernel, but its fake-tensor tracing
# reaches the kernel's data pointers under the CPU interpreter, so the CPU tiers could not test it.)
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdensity::affine_coupling", mutates_args=())
def affine_coupling_op(
    x: torch.Tensor, shift: torch.Tensor, scale_raw: Optional[torch.Tensor], scale: str, inverse: bool, clamp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return coupling_forward(x, shift, scale_raw, scale, inverse, clamp)


@affine_coupling_op.register_fake
def _(x, shift, scale_raw, scale, inverse, clamp):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=acc_dtype(x.dtype))


@torch.library.custom_op("fastdensity::affine_coupling_backward", mutates_args=())
def affine_coupling_backward_op(
    grad_out: torch.Tensor, grad_logdet: torch.Tensor, inp: torch.Tensor, shift: torch.Tensor,
    scale_raw: torch.Tensor, scale: str, inverse: bool, clamp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_in, grad_h, grad_t = coupling_backward(grad_out, grad_logdet, inp, shift, scale_raw, scale, inverse, clamp)
    # A custom op cannot return None: an empty tensor stands for "grad_shift is grad_out".
    return grad_in, grad_h, grad_t if grad_t is not None else inp.new_empty(0)


@affine_coupling_backward_op.register_fake
def _(grad_out, grad_logdet, inp, shift, scale_raw, scale, inverse, clamp):
    grad_t = torch.empty(shift.shape, dtype=shift.dtype, device=inp.device) if inverse else inp.new_empty(0)
    return (torch.empty(inp.shape, dtype=inp.dtype, device=inp.device),
            torch.empty(scale_raw.shape, dtype=scale_raw.dtype, device=inp.device), grad_t)


def _setup_context(ctx, inputs, output):
    x, shift, scale_raw, scale, inverse, clamp = inputs
    # The inputs are all backward needs (s and its derivative are recomputed): no new memory is held.
    ctx.save_for_backward(x, shift if inverse else None, scale_raw)
    ctx.scale, ctx.inverse, ctx.clamp = scale, inverse, clamp


def _backward(ctx, grad_y, grad_logdet):
    # Autograd passes zeros, never None, for an output the loss did not use (custom ops materialise them).
    x, shift, scale_raw = ctx.saved_tensors
    if ctx.scale == "additive":
        # y = x +/- t: the gradients are grad_y itself, no kernel needed.
        return grad_y, (-grad_y if ctx.inverse else grad_y), None, None, None, None
    grad_in, grad_h, grad_t = affine_coupling_backward_op(
        grad_y, grad_logdet, x, shift if ctx.inverse else x, scale_raw, ctx.scale, ctx.inverse, ctx.clamp)
    return grad_in, (grad_t if ctx.inverse else grad_y), grad_h, None, None, None


affine_coupling_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(affine_coupling_backward_op, "affine_coupling")

#: Least occupancy (resident warps / 64) each kernel needs on a Hopper SM (sm_90) and why; the static sm_90 tier
#: (fastdensity.sm90, tests/test_sm90_compile.py) checks every launch against it.
SM90_OCCUPANCY_FLOOR = {name: (0.25, "memory-bound (~1 flop per byte): 16 warps of 8-32 elements per thread keep "
                                     "the ~30 KB per SM in flight that 4.8 TB/s at ~0.8 us needs")
                        for name in ("_coupling_fwd_kernel", "_coupling_bwd_kernel")}
