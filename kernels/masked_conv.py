"""Masked autoregressive convolution (PixelCNN) as an implicit GEMM over the live taps only.

The op (reference and mask definition: ``fastdensity/reference/masked_conv.py``)::

    out[n, co, oy, ox] = bias[co] + sum over live taps (ky, kx) and allowed ci of
                         w[co, ci, ky, kx] * x[n, ci, oy*sh - ph + ky*dh, ox*sw - pw + kx*dw]

    x [N, C_in, H, W]   weight [C_out, C_in, KH, KW]   bias [C_out]   out [N, C_out, H_out, W_out]

In raster order t = ky * KW + kx the live taps are exactly ``t < T = cy * KW + cx`` (every row above the
centre, then the centre row's left part), followed by the centre tap t = T whose channel pairs are
restricted: with ``G = color_groups`` contiguous groups of ``C_in / G`` and ``C_out / G`` channels,

    (ci, co) is live at the centre  <=>  ci < limit(co) = (co // (C_out/G) + shift) * (C_in/G)

with shift 0 for mask type "A" and 1 for "B" (type A with G = 1 has no live centre at all). So the kernel
needs no tap table: tap t is (t // KW, t % KW), and the live weights are a prefix of the flattened
kernel. A dense convolution multiplies the other KH*KW - T - 1 taps by zero; this one never loads them:
for 7x7 type A that is 24 of 49 taps, for 5x5 type B 13 of 25, for 3x3 type B 5 of 9.

Three GEMMs, each over the same live taps (``P = N * H_out * W_out`` output pixels)::

    forward       out[P, C_out]      = sum_t  X_t[P, C_in]   @ W_t[C_in, C_out]     (X_t: x shifted by tap t)
    grad input    gx[N*H*W, C_in]    = sum_t  G_t[., C_out]  @ W_t[C_out, C_in]     (G_t: grad_out shifted back)
    grad weight   gw_t[C_in, C_out]  = X_t[P, C_in]^T @ grad_out[P, C_out]           (one GEMM per live tap)
    grad bias     = grad_out summed over (N, H_out, W_out)                           (torch)

The centre tap runs the same loops with the reduction bounded per tile (forward: ci < limit(last co of
the tile); grad input: co from the first co that may see the tile's first ci) and reads a packed weight
whose forbidden (ci, co) entries were zeroed on the host, so no per-element mask is needed in the inner
loop. Dead taps' gradients are written as zeros by the launcher and never computed; at the centre,
grad-weight tiles that are wholly forbidden skip their reduction and the forbidden entries of the
others are stored as exact zeros.

Non-finite values: a NaN/inf stored in a dead weight is never read. A non-finite *input* reaches the
outputs through the live taps only - forward in raster order, unlike a dense convolution, whose
0 * inf spreads it over the whole window - except at the centre tap, where a tile's reduction covers
whole channel blocks: there it can reach the same pixel's outputs of a forbidden group of that tile.

Layouts: x, grad_out and the outputs are addressed through their four strides (NCHW, channels_last or
any strided view); the output and grad input are allocated in x's memory format. On a GPU, NCHW
activations with 8+ channels are first copied to channels_last (:data:`STAGE_CHANNELS_LAST`), because
only with the channels contiguous do the tile loads vectorise and pipeline. The live weights are packed
once per call into a contiguous [T + centre, C_out, C_in] tensor (a gather of at most half of a
weight-sized tensor). Offsets: the batch term is int64, offsets within one sample int32, so one sample
of x, grad_out or the output must span fewer than 2**31 elements (checked by the launchers).

Precision: operands are loaded in the storage dtype and multiplied by ``tl.dot`` with fp32 accumulation;
fp64 sums exact fp64 products without ``tl.dot`` (which Triton 3.6 rejects with an fp64 accumulator).
For fp32 operands the choice of TF32 or IEEE follows ``torch.backends.cudnn.allow_tf32``,
the switch that allows the same for PyTorch's own convolutions (True by default): the kernel takes the
precision the user granted ``F.conv2d``, so that ``fastdensity.masked_conv_impls`` compares it with
cuDNN under the same rule. Set it to False for IEEE fp32 products. (The interpreter multiplies in
fp32/fp64 regardless, and widens bf16/fp16 tiles to fp32 before ``tl.dot``: it would otherwise multiply
bf16 bit patterns as integers.)

Minimum work (e bytes per element; c is the fraction of the centre's channel pairs that are live,
(G+1)/(2G) for B and (G-1)/(2G) for A)::

    forward   flops 2 P C_in C_out (T + c)   bytes (N C_in H W + C_out C_in (T + 1) + P C_out) e
    backward  flops 4 P C_in C_out (T + c)   bytes (P C_out + 2 N C_in H W + C_out C_in (T + 1 + KH KW)) e
              (read grad_out, x and the live weights; write grad_x and the whole grad_weight)

so with C_in = C_out = C the arithmetic intensity is about C (T + c) / e flops per byte: compute-bound at
every channel count a PixelCNN uses, and the saving over a dense convolution is the skipped taps.

This module is the kernel alone, registered as ``torch.ops.fastdensity.masked_conv2d_triton``. For small
channel counts or small kernels, cuDNN on the masked dense weight or a split into two dense convolutions
can beat a kernel that does less arithmetic less efficiently; those alternatives, and the measured
choice among the three that the ``auto`` backend makes on CUDA, live in the package layer
(``fastdensity.masked_conv_impls``, op ``torch.ops.fastdensity.masked_conv2d``). Block sizes on CUDA
come from a small ``triton.autotune`` config list per kernel and dtype class, pruned per launch to the
shapes that compile without spilling for its channel counts and precision (``_gemm_shapes``); in the
interpreter from fixed small tiles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import utils
from .utils import FP_FUSION, INTERPRETED, acc_dtype, empty, on_device_of, refuse_double_backward, tl_dtype

__all__ = ["INTERPRETED", "Geometry", "geometry", "centre_mask", "live_mask", "is_channels_last", "alloc_nchw",
           "dot_precision", "triton_forward", "triton_backward", "fake_gradients", "bias_gradient",
           "masked_conv2d_triton_op", "masked_conv2d_triton_backward_op"]

_INT32_MAX = 2**31 - 1
# The interpreter's tl.dot multiplies bf16 tiles as their raw uint16 bit patterns (results ~1e10, a
# Triton limitation): there the operands are widened to the accumulator's dtype first (exact for 16-bit
# floats, a no-op for fp32 and fp64). Compiled kernels feed the tensor cores the storage dtype.
_WIDEN_DOT_OPERANDS = tl.constexpr(INTERPRETED)


# ---------------------------------------------------------------------------------------------------
# Geometry: everything an implementation needs to know about one call, computed on the host.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Sizes of one masked convolution and the description of its live taps."""

    N: int
    C_in: int
    H: int
    W: int
    C_out: int
    KH: int
    KW: int
    H_out: int
    W_out: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    n_full: int  # taps before the centre in raster order: all channel pairs live
    centre: bool  # is any channel pair of the centre tap live?
    grouped_centre: bool  # does the centre forbid some channel pairs (so its packed weight needs masking)?
    cin_g: int  # input channels per colour group
    cout_g: int  # output channels per colour group
    shift: int  # 0 for mask type A, 1 for B: output group g sees input groups < g + shift

    @property
    def n_live(self) -> int:
        return self.n_full + int(self.centre)

    @property
    def cy(self) -> int:
        return self.KH // 2

    @property
    def cx(self) -> int:
        return self.KW // 2


def geometry(x: torch.Tensor, weight: torch.Tensor, mask_type: str, color_groups: int, stride, padding,
             dilation) -> Geometry:
    """The :class:`Geometry` of a call whose arguments ``fastdensity.ops`` has already validated."""
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    H_out = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    W_out = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    shift = 1 if mask_type == "B" else 0
    return Geometry(
        N=N, C_in=C_in, H=H, W=W, C_out=C_out, KH=KH, KW=KW, H_out=H_out, W_out=W_out,
        stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw),
        n_full=(KH // 2) * KW + KW // 2, centre=mask_type == "B" or color_groups > 1,
        grouped_centre=color_groups > 1, cin_g=C_in // color_groups, cout_g=C_out // color_groups, shift=shift,
    )


def centre_mask(g: Geometry, device) -> torch.Tensor:
    """[C_out, C_in] bool: which channel pairs the centre tap connects."""
    limit = (torch.arange(g.C_out, device=device) // g.cout_g + g.shift) * g.cin_g
    return torch.arange(g.C_in, device=device)[None, :] < limit[:, None]


def live_mask(g: Geometry, device) -> torch.Tensor:
    """[C_out, C_in, KH, KW] bool: the PixelCNN mask as this module derives it (raster prefix + centre)."""
    keep = torch.zeros(g.C_out, g.C_in, g.KH * g.KW, dtype=torch.bool, device=device)
    keep[:, :, :g.n_full] = True
    if g.centre:
        keep[:, :, g.n_full] = centre_mask(g, device)
    return keep.view(g.C_out, g.C_in, g.KH, g.KW)


def is_channels_last(t: torch.Tensor) -> bool:
    """Is ``t`` channels_last and not also contiguous? Where both layouts describe the same strides
    (C == 1, or H == W == 1) it counts as contiguous, so outputs come back NCHW."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def alloc_nchw(shape, like: torch.Tensor, *, poison: bool = False) -> torch.Tensor:
    """A dense [N, C, H, W] tensor in ``like``'s memory format (channels_last or contiguous), allocated in
    that format rather than as a permuted view of an NHWC buffer: a custom op's output that is a view
    cannot be edited in place under autograd (a residual ``h += conv(h)``). ``poison``: NaN-filled when
    tests ask for it, as :func:`fastdensity.kernels.utils.empty` fills kernel outputs."""
    fmt = torch.channels_last if is_channels_last(like) else torch.contiguous_format
    out = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
    if poison and utils.POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def _pack_weight(weight: torch.Tensor, g: Geometry) -> torch.Tensor:
    """The live taps of ``weight`` as a contiguous [n_live, C_out, C_in] tensor, forbidden centre pairs zeroed.

    Live taps are a prefix of the raster-flattened kernel, so this is one slice and one copy. Zeroing
    with ``where`` (not a multiply) keeps a NaN/inf sitting in a dead weight out of the result: dead
    weights are never part of the op.

    ``clone``, not ``contiguous``: a weight stored tap-major (a permuted view of a [KH, KW, C_out, C_in]
    tensor) already has this layout, and ``contiguous`` would return a view of it - the centre zeroing
    below would then write into the caller's weight, which autograd has saved.
    """
    pack = weight.reshape(g.C_out, g.C_in, g.KH * g.KW)[:, :, :g.n_live].permute(2, 0, 1).clone(
        memory_format=torch.contiguous_format)
    if g.centre and g.grouped_centre:
        pack[g.n_full] = torch.where(centre_mask(g, weight.device), pack[g.n_full], 0)
    return pack


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` for a [BM, BK] and b [BK, BN], accumulated in acc's dtype.

    fp64 takes no ``tl.dot``: Triton 3.6 asserts on an fp64 accumulator (3.9 compiles it), and fp64 is
    the verification dtype, which needs exact products summed in fp64, not speed. It sums the products
    of a [BM, BK, BN] block instead (``_gemm_configs`` keeps that block at 4096 elements, 32 per thread).
    Other dtypes: tensor cores, or CUDA-core FMAs for fp32 IEEE (see ``_WIDEN_DOT_OPERANDS`` for the
    interpreter)."""
    if acc.dtype == tl.float64:  # one return, after the branches: Triton 3.6 rejects a return inside one
        acc += tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    else:
        if _WIDEN_DOT_OPERANDS:
            a = a.to(acc.dtype)
            b = b.to(acc.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _split_pixels(pix, HH, WW):
    """(sample, row, column) of flat int64 pixel indices over [N, HH, WW]. The sample stays int64 (it
    multiplies the batch stride); row and column are int32, as all offsets within one sample are."""
    nb = pix // (HH * WW)
    rem = (pix % (HH * WW)).to(tl.int32)
    return nb, rem // WW, rem % WW


@triton.jit
def _pixel_tile(n_chan, n_pix, HH, WW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's [BLOCK_M pixels x BLOCK_N channels] tile of a [n_pix = N*HH*WW, n_chan] output:
    ``(pix_ok, sample, row, column, first channel, channels, channel_ok)``.

    Channel tiles vary fastest: programs that run together share a pixel tile, so the rows they gather
    are read from DRAM once and then served from L2 to the other channel tiles."""
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(n_chan, BLOCK_N)
    pid_m = pid // n_tiles_n
    c0 = (pid % n_tiles_n) * BLOCK_N
    pix = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    nb, py, px = _split_pixels(pix, HH, WW)
    chan = c0 + tl.arange(0, BLOCK_N)
    return pix < n_pix, nb, py, px, c0, chan, chan < n_chan


@triton.jit
def _fwd_step(acc, x_rows, iy0, ix0, pix_ok, w_ptr, co, co_ok, kk, t, k0,
              C_in, H, W, C_out, s_xc, s_xh, s_xw, KW, dil_h, dil_w, PRECISION: tl.constexpr):
    """``acc += x[pixels shifted by tap t, channels k0 + kk] @ w[t, channels k0 + kk, co]``."""
    iy = iy0 + (t // KW) * dil_h
    ix = ix0 + (t % KW) * dil_w
    ok = pix_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)  # zero padding: out-of-image taps load 0
    ci = k0 + kk
    ci_ok = ci < C_in
    a = tl.load((x_rows + (iy * s_xh + ix * s_xw))[:, None] + (ci * s_xc)[None, :],
                mask=ok[:, None] & ci_ok[None, :], other=0.0)
    b = tl.load(w_ptr + t * C_out * C_in + co[None, :] * C_in + ci[:, None],
                mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
    return _dot(a, b, acc, PRECISION)


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    C_in, H, W, C_out, H_out, W_out, P,
    s_xn, s_xc, s_xh, s_xw,
    s_on, s_oc, s_oh, s_ow,
    str_h, str_w, pad_h, pad_w, dil_h, dil_w,
    KW, n_live, centre_idx, cin_g, cout_g, shift,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M output pixels x BLOCK_N output channels] tile, reduced over live taps x C_in."""
    pix_ok, nb, oy, ox, co0, co, co_ok = _pixel_tile(C_out, P, H_out, W_out, BLOCK_M, BLOCK_N)
    iy0 = oy * str_h - pad_h
    ix0 = ox * str_w - pad_w
    x_rows = x_ptr + nb * s_xn  # int64 batch offset; offsets within a sample stay int32
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)

    # The taps before the centre, every channel pair live: one flat loop over (tap, channel block)
    # rather than two nested ones, so the compiler can pipeline the loads across tap boundaries.
    n_k = tl.cdiv(C_in, BLOCK_K)
    n_full = tl.where(centre_idx >= 0, n_live - 1, n_live)
    for it in range(0, n_full * n_k):
        acc = _fwd_step(acc, x_rows, iy0, ix0, pix_ok, w_ptr, co, co_ok, kk, it // n_k, (it % n_k) * BLOCK_K,
                        C_in, H, W, C_out, s_xc, s_xh, s_xw, KW, dil_h, dil_w, PRECISION)
    if centre_idx >= 0:
        # Centre tap: the tile's last channel sees the most input channels; the packed weight holds
        # zeros for the pairs its other channels may not see, so bounding the loop is all it takes.
        co_last = tl.minimum(co0 + BLOCK_N, C_out) - 1
        k_end = tl.minimum((co_last // cout_g + shift) * cin_g, C_in)
        for k0 in range(0, k_end, BLOCK_K):
            acc = _fwd_step(acc, x_rows, iy0, ix0, pix_ok, w_ptr, co, co_ok, kk, centre_idx, k0,
                            C_in, H, W, C_out, s_xc, s_xh, s_xw, KW, dil_h, dil_w, PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co_ok, other=0.0).to(ACC)[None, :]
    out_offs = (nb * s_on)[:, None] + (oy * s_oh + ox * s_ow)[:, None] + (co * s_oc)[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=pix_ok[:, None] & co_ok[None, :])


@triton.jit
def _bwd_input_step(acc, g_rows, iy, ix, pix_ok, w_ptr, ci, ci_ok, kk, t, k0,
                    C_in, C_out, H_out, W_out, s_gc, s_gh, s_gw, KW, str_h, str_w, pad_h, pad_w, dil_h, dil_w,
                    PRECISION: tl.constexpr):
    """``acc += grad_out[the output pixel that tap t maps onto this input pixel, channels k0 + kk]
    @ w[t, k0 + kk, ci]``; pixels that no output reaches through tap t load 0."""
    ny = iy + pad_h - (t // KW) * dil_h
    nx = ix + pad_w - (t % KW) * dil_w
    oy = ny // str_h
    ox = nx // str_w
    ok = pix_ok & (ny >= 0) & (nx >= 0) & (oy * str_h == ny) & (ox * str_w == nx) & (oy < H_out) & (ox < W_out)
    co = k0 + kk
    co_ok = co < C_out
    a = tl.load((g_rows + (oy * s_gh + ox * s_gw))[:, None] + (co * s_gc)[None, :],
                mask=ok[:, None] & co_ok[None, :], other=0.0)
    b = tl.load(w_ptr + t * C_out * C_in + co[:, None] * C_in + ci[None, :],
                mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
    return _dot(a, b, acc, PRECISION)


@triton.jit
def _bwd_input_kernel(
    go_ptr, w_ptr, gx_ptr,
    C_in, H, W, C_out, H_out, W_out, P_in,
    s_gn, s_gc, s_gh, s_gw,
    s_xn, s_xc, s_xh, s_xw,
    str_h, str_w, pad_h, pad_w, dil_h, dil_w,
    KW, n_live, centre_idx, cin_g, cout_g, shift,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M input pixels x BLOCK_N input channels] tile of grad_x, reduced over live taps x C_out.

    Input pixel (iy, ix) received tap t from output pixel ((iy + ph - ky dh) / sh, (ix + pw - kx dw) / sw)
    when both divisions are exact and land inside the output. With stride > 1 most (pixel, tap) pairs
    fail that test and are masked: correct, though not work-efficient (masked convs are nearly always
    stride 1, and under the ``auto`` backend cuDNN is measured against this).
    """
    pix_ok, nb, iy, ix, ci0, ci, ci_ok = _pixel_tile(C_in, P_in, H, W, BLOCK_M, BLOCK_N)
    g_rows = go_ptr + nb * s_gn
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)

    n_k = tl.cdiv(C_out, BLOCK_K)
    n_full = tl.where(centre_idx >= 0, n_live - 1, n_live)
    for it in range(0, n_full * n_k):  # flat over (tap, channel block), as in the forward
        acc = _bwd_input_step(acc, g_rows, iy, ix, pix_ok, w_ptr, ci, ci_ok, kk, it // n_k, (it % n_k) * BLOCK_K,
                              C_in, C_out, H_out, W_out, s_gc, s_gh, s_gw, KW, str_h, str_w, pad_h, pad_w,
                              dil_h, dil_w, PRECISION)
    if centre_idx >= 0:
        # Centre tap: input channel ci feeds output groups >= ci // cin_g + 1 - shift; the tile's first
        # channel feeds the most, and the packed weight is zero for the other channels' forbidden pairs.
        k_start = (ci0 // cin_g + 1 - shift) * cout_g
        for k0 in range(k_start, C_out, BLOCK_K):
            acc = _bwd_input_step(acc, g_rows, iy, ix, pix_ok, w_ptr, ci, ci_ok, kk, centre_idx, k0,
                                  C_in, C_out, H_out, W_out, s_gc, s_gh, s_gw, KW, str_h, str_w, pad_h, pad_w,
                                  dil_h, dil_w, PRECISION)

    offs = (nb * s_xn)[:, None] + (iy * s_xh + ix * s_xw)[:, None] + (ci * s_xc)[None, :]
    tl.store(gx_ptr + offs, acc.to(gx_ptr.dtype.element_ty), mask=pix_ok[:, None] & ci_ok[None, :])


@triton.jit
def _bwd_weight_kernel(
    x_ptr, go_ptr, gw_ptr,
    C_in, H, W, C_out, H_out, W_out, P,
    s_xn, s_xc, s_xh, s_xw,
    s_gn, s_gc, s_gh, s_gw,
    s_ws, s_wt, s_wco, s_wci,
    str_h, str_w, pad_h, pad_w, dil_h, dil_w,
    KW, n_live, centre_idx, cin_g, cout_g, shift, n_split,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """gw[split, t, co, ci] for one live tap t and one [BLOCK_CI x BLOCK_CO] tile, summed over one share
    of the output pixels. With ``n_split`` > 1 the shares are partial sums the launcher adds up: a few
    hundred (tap, tile) pairs would not fill the GPU, and splitting the pixel sum keeps it busy without
    atomics (deterministic results)."""
    pid = tl.program_id(0)
    n_co = tl.cdiv(C_out, BLOCK_CO)
    n_ci = tl.cdiv(C_in, BLOCK_CI)
    pid_co = pid % n_co
    rest = pid // n_co
    pid_ci = rest % n_ci
    rest = rest // n_ci
    t = rest % n_live
    split = rest // n_live

    ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci_ok = ci < C_in
    co_ok = co < C_out
    ky = t // KW
    kx = t % KW

    # This split's contiguous share of the pixel blocks.
    per_split = tl.cdiv(tl.cdiv(P, BLOCK_P), n_split) * BLOCK_P
    p_begin = split.to(tl.int64) * per_split
    p_end = tl.minimum(p_begin + per_split, P)
    is_centre = t == centre_idx
    limit = (co // cout_g + shift) * cin_g  # centre: ci < limit[co] is live
    if is_centre:
        # A tile whose first ci no co of the tile may see is all zeros: skip its reduction.
        co_last = tl.minimum(pid_co * BLOCK_CO + BLOCK_CO, C_out) - 1
        if pid_ci * BLOCK_CI >= (co_last // cout_g + shift) * cin_g:
            p_end = p_begin

    pp = tl.arange(0, BLOCK_P)
    # Pixel p0 + pp is pixel q0 + pp counted from the start of sample nb0: one 64-bit division per
    # program here, then only 32-bit index math in the loop (q0 + pp < H_out * W_out + BLOCK_P, which
    # the launcher's one-sample int32 check keeps in range) and a 64-bit base per sample.
    hw = H_out * W_out
    nb0 = p_begin // hw
    q0 = (p_begin - nb0 * hw).to(tl.int32)
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=ACC)
    for p0 in range(p_begin, p_end, BLOCK_P):
        p_ok = pp < tl.minimum(p_end - p0, BLOCK_P).to(tl.int32)
        q = q0 + pp
        later = q // hw  # samples past nb0 (0 unless the block crosses a sample's end)
        rem = q - later * hw
        oy = rem // W_out
        ox = rem - oy * W_out
        nb = nb0 + later
        q0 += BLOCK_P
        nb0 += q0 // hw
        q0 = q0 % hw
        iy = oy * str_h - pad_h + ky * dil_h
        ix = ox * str_w - pad_w + kx * dil_w
        x_ok = p_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        x_cols = x_ptr + nb * s_xn + (iy * s_xh + ix * s_xw)
        g_rows = go_ptr + nb * s_gn + (oy * s_gh + ox * s_gw)
        a = tl.load(x_cols[None, :] + (ci * s_xc)[:, None], mask=ci_ok[:, None] & x_ok[None, :], other=0.0)
        b = tl.load(g_rows[:, None] + (co * s_gc)[None, :], mask=p_ok[:, None] & co_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, PRECISION)

    if is_centre:
        acc = tl.where(ci[:, None] < limit[None, :], acc, 0.0)  # forbidden pairs: exact zeros
    offs = split.to(tl.int64) * s_ws + t * s_wt + (co * s_wco)[None, :] + (ci * s_wci)[:, None]
    tl.store(gw_ptr + offs, acc.to(gw_ptr.dtype.element_ty), mask=ci_ok[:, None] & co_ok[None, :])


# ---------------------------------------------------------------------------------------------------
# Launch configuration: triton.autotune over a short list on CUDA, fixed small tiles in the interpreter
# (which cannot benchmark configs).
# ---------------------------------------------------------------------------------------------------

# PRECISION: fp32 IEEE products take other tiles than TF32 ones (see _gemm_shapes).
_GEMM_KEYS = ["C_in", "C_out", "n_live", "KW", "PRECISION"]


def _gemm_shapes(dtype: torch.dtype, narrow: bool) -> list[tuple[int, int, int, int, int]]:
    """(M tile, N tile, reduction step, warps, stages) of the implicit GEMMs for one dtype family.

    Each stays out of local memory under Triton 3.6 and 3.9 (ptxas for sm_90; the static tier,
    ``fastdensity.sm90``, compiles every launch that verify and the benchmarks make):

    * wide (tensor cores, channel counts that are multiples of 16, staged channels_last): the tile
      loads vectorise and pipeline. 128-wide tiles run on 8 warps: on 4, each thread holds the 64-bit
      addresses of twice the operand elements and ptxas spilled 0.1-3.5 KB at 255 registers. 128 x 128
      is gone: even on 8 warps it spilled ~1 KB for 7x7 kernels with grouped centres (PixelCNN's).
    * narrow, for every other launch: channel counts off a multiple of 16 (verify's 30 -> 45, or fewer
      than 8 channels, left NCHW), where every element is its own predicated scalar load and Triton
      does not pipeline (every former config spilled there, at 255 registers); and fp32 with IEEE
      products, which tl.dot lowers to CUDA-core FMAs holding all of a thread's A and B elements of the
      step in registers (as in ``kernels/masked_linear.py``): a 64 x 64 tile over 16-wide steps on 8
      warps, unpipelined.
    * fp64 (no tl.dot, see ``_dot``): a [32, 4, 32] product block, 32 per thread.
    """
    if dtype == torch.float64:
        return [(32, 32, 4, 4, 1)]
    if narrow:
        return [(64, 64, 16, 8, 1)]
    if dtype == torch.float32:  # TF32: 32-wide steps, the bytes of a 16-bit type's 64
        return [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3)]
    return [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 64, 4, 4)]


def _gemm_configs(dtype: torch.dtype, m: str, n: str, k: str, narrow: Optional[bool] = None) -> list:
    """The autotune list of one kernel (tile names ``m, n, k``): the wide and the narrow shapes (None),
    or one of the two."""
    kinds = (True, False) if narrow is None else (narrow,)
    shapes = list(dict.fromkeys(s for kind in kinds for s in _gemm_shapes(dtype, kind)))
    return [triton.Config({m: bm, n: bn, k: bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in shapes]


def _is_narrow(family: torch.dtype, C_in: int, C_out: int, precision: str) -> bool:
    """Does a launch take the narrow shapes (see :func:`_gemm_shapes`)?"""
    return C_in % 16 != 0 or C_out % 16 != 0 or (family == torch.float32 and precision == "ieee")


def _pruner(family: torch.dtype, names: tuple[str, str, str]):
    """``early_config_prune`` for ``triton.autotune``: the configs of the shapes a launch may take."""
    def shape(c) -> tuple:
        return (*(c.kwargs[name] for name in names), c.num_warps, c.num_stages)

    def prune(configs, named_args, **kwargs):
        narrow = _is_narrow(family, named_args["C_in"], named_args["C_out"], kwargs.get("PRECISION", "ieee"))
        keep = set(_gemm_shapes(family, narrow))
        return [c for c in configs if shape(c) in keep]
    return prune


#: Tiles used in the interpreter: small, so the tests' odd channel counts span several tiles and the
#: per-tile centre bounds are exercised. Tests may override entries.
INTERPRETER_BLOCKS = {
    "fwd": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16},
    "bwd_input": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16},
    "bwd_weight": {"BLOCK_CI": 16, "BLOCK_CO": 16, "BLOCK_P": 32},
}

#: Force the grad-weight pixel split (None: chosen from the GPU's SM count; 1 in the interpreter).
GRAD_WEIGHT_SPLIT: Optional[int] = None

#: Copy NCHW activations (x, grad_out) to channels_last before the kernels read them. With the
#: channels contiguous the tile loads vectorise and Triton pipelines them: compiled for sm_90, all three
#: kernels get 3-stage cp.async pipelines on channels_last bf16 operands and at most one operand
#: pipelined on NCHW ones. The copy costs one read and write of the tensor, small beside the GEMM at
#: PixelCNN channel counts, and the ``auto`` backend's measurement includes it. Outputs keep the caller's
#: layout (written through their strides). None: on when compiled for a GPU, off in the interpreter.
STAGE_CHANNELS_LAST: Optional[bool] = None

_KERNELS = {"fwd": (_fwd_kernel, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
            "bwd_input": (_bwd_input_kernel, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
            "bwd_weight": (_bwd_weight_kernel, ("BLOCK_CI", "BLOCK_CO", "BLOCK_P"))}
_tuned: dict = {}


def _launcher(kind: str, dtype: torch.dtype):
    """``(kernel, extra kwargs)``: the autotuned kernel on a GPU, the plain one plus fixed tiles interpreted."""
    fn, names = _KERNELS[kind]
    if INTERPRETED:
        return fn, dict(INTERPRETER_BLOCKS[kind], num_warps=4)
    family = dtype if dtype in (torch.float32, torch.float64) else torch.float16
    if (kind, family) not in _tuned:
        _tuned[kind, family] = triton.autotune(configs=_gemm_configs(family, *names), key=_GEMM_KEYS,
                                               prune_configs_by={"early_config_prune": _pruner(family, names)})(fn)
    return _tuned[kind, family], {}


def _staged(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the kernels should read it (see :data:`STAGE_CHANNELS_LAST`); 8+ channels make a vector."""
    stage = (not INTERPRETED) if STAGE_CHANNELS_LAST is None else STAGE_CHANNELS_LAST
    if stage and t.shape[1] >= 8 and not t.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products in TF32 exactly when PyTorch's convolutions would use it (see the docstring)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def _check_int32(*tensors: torch.Tensor) -> None:
    """Offsets within one sample (and within the weight) are int32 in the kernels: check they fit."""
    for t in tensors:
        span = sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:]))
        if t.shape[0] and span > _INT32_MAX:
            raise ValueError(f"the masked-conv kernel addresses one sample of a [N, C, H, W] tensor with int32 "
                             f"offsets; this one spans {span + 1} elements (shape {tuple(t.shape)}, strides "
                             f"{t.stride()})")


def _common_args(g: Geometry):
    return (*g.stride, *g.padding, *g.dilation, g.KW, g.n_live, g.n_full if g.centre else -1,
            g.cin_g, g.cout_g, g.shift)


def triton_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], g: Geometry) -> torch.Tensor:
    """The forward kernel: [N, C_out, H_out, W_out] in x's dtype and memory format."""
    out = alloc_nchw((g.N, g.C_out, g.H_out, g.W_out), x, poison=True)
    if out.numel() == 0:
        return out
    if g.n_live == 0:  # 1x1 type A with one colour group: nothing is live, the output is the bias
        if bias is None:
            return out.zero_()
        return out.copy_(bias[:, None, None].expand_as(out))
    _check_int32(x, out, weight[None])
    xs = _staged(x)
    pack = _pack_weight(weight, g)
    b = bias.contiguous() if bias is not None else pack  # any valid pointer when HAS_BIAS is False
    P = g.N * g.H_out * g.W_out
    kernel, extra = _launcher("fwd", x.dtype)
    grid = lambda META: (triton.cdiv(P, META["BLOCK_M"]) * triton.cdiv(g.C_out, META["BLOCK_N"]),)  # noqa: E731
    kernel[grid](
        xs, pack, b, out,
        g.C_in, g.H, g.W, g.C_out, g.H_out, g.W_out, P,
        *xs.stride(), *out.stride(), *_common_args(g),
        HAS_BIAS=bias is not None, ACC=tl_dtype(acc_dtype(x.dtype)), PRECISION=dot_precision(x.dtype),
        enable_fp_fusion=FP_FUSION, **extra,
    )
    return out


def _grad_weight_split(g: Geometry, device: torch.device) -> int:
    """How many pixel shares the grad-weight sum is split into, so that the grid fills the GPU twice."""
    if GRAD_WEIGHT_SPLIT is not None:
        return GRAD_WEIGHT_SPLIT
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = g.n_live * triton.cdiv(g.C_in, 128) * triton.cdiv(g.C_out, 128)  # nominal 128x128 tiles
    P = g.N * g.H_out * g.W_out
    return max(1, min(triton.cdiv(2 * sms, tiles), P // 4096))


def triton_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, g: Geometry,
                    need_x: bool, need_w: bool):
    """The two backward kernels: ``(grad_x or None, grad_weight or None)``; dead taps' gradients are 0."""
    grad_x = grad_w = None
    grad_out = _staged(grad_out)
    acc = acc_dtype(x.dtype)
    precision = dot_precision(x.dtype)
    P = g.N * g.H_out * g.W_out
    if need_x:
        grad_x = alloc_nchw(x.shape, x, poison=True)
        if g.n_live == 0:
            grad_x.zero_()
        elif grad_x.numel():
            _check_int32(grad_out, grad_x, weight[None])
            pack = _pack_weight(weight, g)
            P_in = g.N * g.H * g.W
            kernel, extra = _launcher("bwd_input", x.dtype)
            grid = lambda META: (triton.cdiv(P_in, META["BLOCK_M"])  # noqa: E731
                                 * triton.cdiv(g.C_in, META["BLOCK_N"]),)
            kernel[grid](
                grad_out, pack, grad_x,
                g.C_in, g.H, g.W, g.C_out, g.H_out, g.W_out, P_in,
                *grad_out.stride(), *grad_x.stride(), *_common_args(g),
                ACC=tl_dtype(acc), PRECISION=precision, enable_fp_fusion=FP_FUSION, **extra,
            )
    if need_w:
        grad_w = empty(weight.shape, dtype=weight.dtype, device=weight.device)
        taps = grad_w.view(g.C_out, g.C_in, g.KH * g.KW)
        taps[:, :, g.n_live:].zero_()  # dead taps: written as zeros, never computed
        live = taps[:, :, :g.n_live]
        if live.numel() and P == 0:
            live.zero_()
        elif live.numel():
            _check_int32(x, grad_out)
            x = _staged(x)
            n_split = _grad_weight_split(g, x.device)
            if n_split == 1:
                target, strides = live, (0, live.stride(2), live.stride(0), live.stride(1))
            else:  # partial sums in the accumulation dtype, added up below
                target = empty((n_split, g.n_live, g.C_out, g.C_in), dtype=acc, device=x.device)
                strides = target.stride()
            kernel, extra = _launcher("bwd_weight", x.dtype)
            grid = lambda META: (n_split * g.n_live * triton.cdiv(g.C_in, META["BLOCK_CI"])  # noqa: E731
                                 * triton.cdiv(g.C_out, META["BLOCK_CO"]),)
            kernel[grid](
                x, grad_out, target,
                g.C_in, g.H, g.W, g.C_out, g.H_out, g.W_out, P,
                *x.stride(), *grad_out.stride(), *strides, *_common_args(g), n_split,
                ACC=tl_dtype(acc), PRECISION=precision, enable_fp_fusion=FP_FUSION, **extra,
            )
            if n_split > 1:
                live.copy_(target.sum(0).permute(1, 2, 0))
    return grad_x, grad_w


# ---------------------------------------------------------------------------------------------------
# torch.library registration: custom_op + register_fake + register_autograd (as in kernels/coupling.py),
# so torch.compile(fullgraph=True) sees two opaque ops with known output shapes and layouts. The first
# two helpers serve the package layer's choosing op (fastdensity.masked_conv_impls) as well.
# ---------------------------------------------------------------------------------------------------


def fake_gradients(x: torch.Tensor, weight: torch.Tensor, need_x: bool, need_w: bool):
    """What a backward op returns, as empty tensors: grad_x in x's memory format and grad_weight, each
    replaced by a 0-element tensor when not requested."""
    grad_x = alloc_nchw(x.shape, x) if need_x else x.new_empty(0)
    grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else weight.new_empty(0)
    return grad_x, grad_w


def bias_gradient(grad_out: torch.Tensor, bias_dtype: torch.dtype) -> torch.Tensor:
    """grad_out summed over (N, H_out, W_out), accumulated in fp32 (fp64 for fp64), in the bias' dtype."""
    return grad_out.sum(dim=(0, 2, 3), dtype=acc_dtype(grad_out.dtype)).to(bias_dtype)


@torch.library.custom_op("fastdensity::masked_conv2d_triton", mutates_args=())
def masked_conv2d_triton_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask_type: str, color_groups: int,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
) -> torch.Tensor:
    g = geometry(x, weight, mask_type, color_groups, stride, padding, dilation)
    with on_device_of(x):
        return triton_forward(x, weight, bias, g)


@masked_conv2d_triton_op.register_fake
def _(x, weight, bias, mask_type, color_groups, stride, padding, dilation):
    g = geometry(x, weight, mask_type, color_groups, stride, padding, dilation)
    return alloc_nchw((g.N, g.C_out, g.H_out, g.W_out), x)


@torch.library.custom_op("fastdensity::masked_conv2d_triton_backward", mutates_args=())
def masked_conv2d_triton_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask_type: str, color_groups: int,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], need_x: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    g = geometry(x, weight, mask_type, color_groups, stride, padding, dilation)
    with on_device_of(x):
        grad_x, grad_w = triton_backward(grad_out, x, weight, g, need_x, need_w)
    # A custom op cannot return None: an empty tensor stands for "not requested".
    return (grad_x if grad_x is not None else x.new_empty(0),
            grad_w if grad_w is not None else weight.new_empty(0))


@masked_conv2d_triton_backward_op.register_fake
def _(grad_out, x, weight, mask_type, color_groups, stride, padding, dilation, need_x, need_w):
    return fake_gradients(x, weight, need_x, need_w)


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask_type, color_groups, stride, padding, dilation = inputs
    # The inputs are all the backward needs (the packed weight is rebuilt): nothing new is held.
    ctx.save_for_backward(x, weight)
    ctx.args = (mask_type, color_groups, stride, padding, dilation)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = grad_w = grad_b = None
    if need_x or need_w:
        grad_x, grad_w = masked_conv2d_triton_backward_op(grad_out, x, weight, *ctx.args, need_x, need_w)
        grad_x = grad_x if need_x else None
        grad_w = grad_w if need_w else None
    if need_b:
        grad_b = bias_gradient(grad_out, ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None, None, None, None, None


masked_conv2d_triton_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(masked_conv2d_triton_backward_op, "masked_conv2d")


def _sm90_variants(kind: str):
    """Configurations for the compile tier (tests/test_sm90_compile.py) beside the recorded launches: the
    narrow shapes, which any launch may take, under each precision. (The wide ones are compiled where the
    benchmarks launch them: a dry run records every configuration an autotuned launch would try.)"""
    def variants(dtype_name: str):
        dtype = getattr(torch, dtype_name)
        family = dtype if dtype in (torch.float32, torch.float64) else torch.float16
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        return [({**cfg.kwargs, "PRECISION": p},
                 {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": FP_FUSION})
                for cfg in _gemm_configs(family, *_KERNELS[kind][1], narrow=True) for p in precisions]
    return variants


#: kernel name -> (data dtype name -> [(constexpr overrides, launch options)]): GPU-only tile configs.
SM90_VARIANTS = {_KERNELS[kind][0].__name__: _sm90_variants(kind) for kind in _KERNELS}

#: Least occupancy (resident warps / 64) each kernel needs on a Hopper SM (sm_90) and why; the static sm_90 tier
#: (fastdensity.sm90, tests/test_sm90_compile.py) checks every launch against it.
SM90_OCCUPANCY_FLOOR = {name: (0.125, "tensor-core GEMM tiles: the num_stages-deep load pipeline and the MMAs' "
                                      "own parallelism hide latency, so one 8-warp or two 4-warp blocks per SM suffice"
                                      "; the CUDA-core paths (fp32 IEEE, fp64) stay above it: "
                                      "narrow tiles (64 x 64 on 8 warps) and fp64 measure 0.19-0.5")
                        for name in ("_fwd_kernel", "_bwd_input_kernel", "_bwd_weight_kernel")}
