"""Fused monotonic rational-quadratic spline: normalise, search, evaluate and log-det in one pass.

The math is that of ``fastdensity/reference/spline.py`` (nflows' or zuko's parameterisation, identity
outside [-B, B]). Per element, from its K widths, K heights and K-1 derivatives (unconstrained)::

    p^w = softmax(clip(widths))           right knots X_k = -B + 2B cumsum_k(m_w + (1 - K m_w) p^w)   nflows
    p^h = softmax(clip(heights))                          = B (2 cumsum_k(p^w) - 1)                    zuko
    D_k = m_d + softplus(derivatives_k)   (nflows)   or   exp(clip(derivatives_k))   (zuko)

(nflows: clip is the identity and X_{K-1} = B exactly; zuko: clip(u) = u / (1 + |u| c) with
c = 2 / |log slope| for widths and heights and 1 / |log slope| for the derivatives.) Bin j = the number
of interior knots at or below x (nflows) or below x (zuko), inside -B <= x <= B (nflows) or
-B < x <= X_{K-1} (zuko: its last knot, B up to a rounding); the bin's ends x0 = X_{j-1} (-B for j = 0),
x1 = X_j, likewise y0, y1 from the heights; slopes d0 = D_{j-1} (1 for j = 0), d1 = D_j (1 for j = K-1).
With w = x1 - x0, h = y1 - y0, s = h / w, z = (x - x0) / w, q = z (1 - z), den = s + (d0 + d1 - 2s) q::

    y  = y0 + h (s z^2 + d0 q) / den
    J  = dy/dx = s^2 N / den^2,   N = d1 z^2 + 2 s q + d0 (1 - z)^2,   log-det = log J

The inverse finds z as the stable root 2c / (-b - sqrt(b^2 - 4ac)) (discriminant clamped at 0) of
the quadratic in the reference's docstring, clamped into [0, 1] (1 - z likewise from the mirrored
quadratic, which is accurate near the right end), and returns x = x0 + z w with log-det -log J.

Backward recomputes all of it from the op's inputs (nothing is saved but what the caller holds) and
differentiates in closed form: at the point (x, z) of the bin, the partials of y and log J in
z, s, d0, d1 (the ``_local_partials`` helper), then z = (x - x0)/w and s = h/w give the gradients of
x0, x1, y0, y1; knot k collects those of the two bin ends it is; a suffix sum over the bins turns knot
gradients into bin-size gradients (X_k = -B + 2B sum_{i<=k} size_i), and the softmax and clip (or
softplus / exp) Jacobians take them to the raw parameters. For the inverse, with upstream (g_x, g_l)
for (x(y), -log J(x(y))): dL/dy = (g_x - g_l dlogJ/dx) / J, and the parameter gradients are those of
the forward at x with upstream (-(g_x - g_l dlogJ/dx) / J, -g_l) (implicit differentiation).

Shapes: x [B, ...]; widths, heights [B, ..., K]; derivatives [B, ..., K-1], any strides (e.g. three
slices of one conditioner output [B, D, 3K-1] or a permuted [B, C, H, W, 3K-1] view), read in place.
The launcher collapses the non-batch dims into a strided [B, R, S] view (copying a tensor whose layout
does not collapse) and passes each parameter tensor's strides plus its K stride.

Minimum traffic, N = elements of x, P = 3K - 1 parameters per element, e = bytes per element:

    forward             read x and P params; write y                            (P + 2) N e   (+ B log-dets)
    backward            read gy, x, P params; write gx, P param grads           (2P + 3) N e
    forward + backward                                                          (3P + 5) N e
    (K = 8: 25 N e forward, 49 N e backward. reduction="none" adds 4 N (8 N for fp64) bytes per pass.)
    Work per element and pass: 2K fast exps (softmaxes), K - 1 libdevice exp + log1p (nflows' softplus;
    zuko: one exp), 2 logs, ~10K fp64 operations (cumulative sums, knots, search, picks) and ~30K fp32
    ones. An estimate, not a measurement: memory-bound in fp32 on an H200; with bf16 storage (half the
    bytes) the arithmetic may come within reach of the memory time - the benchmark will tell.

Precision: loads in the storage dtype, math in fp32 (fp64 for fp64), log-dets accumulated in the same.
Two places get more, because the spline amplifies their rounding by up to 1 / (bin width) or the
bin's steepness, and eager PyTorch, computing the same formulas in fp32, would otherwise be the more
accurate of the two: the knots (cumulative sums, positions and the differences x - x0, x1 - x0 taken
from them) are fp64 (``_right_knots``), as are the inverse's quadratic roots, and the position in the
bin is carried from both ends, z and 1 - z, each accurate relative to itself (``_spline_setup``,
``_local_partials``). Exps and logs that are
values (softplus, zuko's slopes, the log-det) are libdevice's on a GPU (see ``_LIBDEVICE``). Scalars
(B, minimum sizes, clip factors) reach the kernel as fp32 pairs hi + lo whose sum in fp64 is the Python
float to ~2^-48 (a plain fp32 argument would be off by ~5e-8 for 1e-3).

Parallelism and the log-det: a 2-D grid of [BLOCK_B rows x BLOCK_N elements] tiles, each element with
its padded [KP] lane of parameters (KP = next power of two >= K, lanes >= K masked), so a tile is a
[BLOCK_B, BLOCK_N, KP] block of registers, sized so that each thread holds a few values of each
block (``_VALUES_PER_THREAD``): K = 8 gives 64 (forward) / 32 (inverse, backward) elements per 4-warp
program. Compiled for sm_90 by Triton 3.9 at the verify and benchmark shapes (K = 3 to 32, fp32, bf16,
fp64): 50-94 registers, no spills, occupancy 0.31-0.56 (not yet measured under Triton 3.6).

The per-sample sum is a per-row reduction: each program writes its tile's row sums to a
[B, n_col_blocks] buffer that the launcher sums (a no-op for one column block). No atomics: the
log-det is deterministic. With reduction="none" the per-element log-dets are stored instead.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
try:  # the dtype-dispatching libdevice module (Triton 3.x); older layouts kept it under extra.cuda
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the installed Triton
    from triton.language.extra.cuda import libdevice

from .utils import (FP_FUSION, INTERPRETED, acc_dtype, collapse_inner_dims, empty, empty_like, next_pow2,
                    on_device_of, refuse_double_backward, row_tile, tl_dtype)

__all__ = ["INTERPRETED", "PARAMETERIZATION_CODES", "spline_forward", "spline_backward",
           "rational_quadratic_spline_op"]

PARAMETERIZATION_CODES = {"nflows": 0, "zuko": 1}
_NFLOWS = tl.constexpr(0)
_ZUKO = tl.constexpr(1)
#: torch's softplus returns its input above this threshold (nflows uses torch's softplus)
_SOFTPLUS_THRESHOLD = tl.constexpr(20.0)

# Where an exp or a log *is* a value the spline uses - zuko's slopes exp(.), nflows' softplus, the
# log-det - compiled kernels call libdevice (CUDA's expf/logf/log1pf, what eager PyTorch uses): fp32
# tl.exp is ex2.approx (about 2 + 1.2|x| ulps) and tl.log lg2.approx (~2^-22 absolute, so a softplus of
# -10, 4.5e-5, would come out 0.5% off and a slope near min_derivative 1e-4 off). Softmax exps stay on
# tl.exp: their arguments are <= 0 and a relative error in a tiny probability moves a knot by far less
# than an ulp of B. The interpreter has no libdevice; there NumPy's functions run, accurate anyway.
_LIBDEVICE = tl.constexpr(not INTERPRETED)


@triton.jit
def _exp(x):
    if _LIBDEVICE:
        e = libdevice.exp(x)
    else:
        e = tl.exp(x)
    return e


@triton.jit
def _log(x):
    if _LIBDEVICE:
        out = libdevice.log(x)
    else:
        out = tl.log(x)
    return out


@triton.jit
def _log1p(e):
    """log(1 + e) for e >= 0."""
    if _LIBDEVICE:
        out = libdevice.log1p(e)
    else:
        # log(1 + e) corrected to first order for the rounding of 1 + e (e itself when that rounds to 1).
        one_plus = 1.0 + e
        out = tl.log(one_plus) + (e - (one_plus - 1.0)) / one_plus
    return out


@triton.jit
def _scalar(hi, lo, ACC: tl.constexpr):
    """A Python float passed as two fp32 halves, rebuilt in the compute dtype."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _softplus_sigmoid(u):
    """torch's softplus (the input itself above 20) and its derivative."""
    e = _exp(-tl.abs(u))
    one_plus = 1.0 + e
    sig = tl.where(u >= 0, 1.0 / one_plus, e / one_plus)
    big = u > _SOFTPLUS_THRESHOLD
    return tl.where(big, u, tl.maximum(u, 0.0) + _log1p(e)), tl.where(big, 1.0, sig)


@triton.jit
def _element_offsets(pid_b, pid_n, B, N, S, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_RS: tl.constexpr):
    """This tile's rows, element columns with their (r, s) coordinates, and its mask, all int64."""
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    if SPLIT_RS:
        r = cols // S
        s = cols % S
    else:  # the inner dims collapsed to one: skip the division
        r = cols * 0
        s = cols
    mask = (rows < B)[:, None] & (cols < N)[None, :]
    return rows, cols, r, s, mask


@triton.jit
def _load_elements(ptr, rows, r, s, sb, sr, ss, mask, ACC: tl.constexpr):
    return tl.load(ptr + rows[:, None] * sb + (r * sr + s * ss)[None, :], mask=mask).to(ACC)


@triton.jit
def _load_params(ptr, rows, r, s, lane, sb, sr, ss, sk, mask, count, ACC: tl.constexpr):
    """[BLOCK_B, BLOCK_N, KP] parameters; lanes >= count (and masked elements) read as 0."""
    offs = rows[:, None, None] * sb + (r * sr + s * ss)[None, :, None] + lane[None, None, :] * sk
    lane_ok = (lane < count)[None, None, :]
    return tl.load(ptr + offs, mask=mask[:, :, None] & lane_ok, other=0.0).to(ACC)


@triton.jit
def _clip_and_slope(u, c, PARAM: tl.constexpr):
    """zuko's soft clip u / (1 + |u| c) and its derivative 1 / (1 + |u| c)^2 (identity for nflows)."""
    if PARAM == _ZUKO:
        inv = 1.0 / (1.0 + tl.abs(u) * c)
        out = u * inv
        slope = inv * inv
    else:
        out = u
        slope = u * 0.0 + 1.0
    return out, slope


@triton.jit
def _softmax(raw, lane, c, K: tl.constexpr, PARAM: tl.constexpr):
    """Softmax over the K valid lanes of the (clipped) raw sizes: ``(e, p = e / sum e)`` with
    e = exp(u - max u), and the clip's derivative."""
    u, clip_slope = _clip_and_slope(raw, c, PARAM)
    u = tl.where((lane < K)[None, None, :], u, float("-inf"))
    e = tl.exp(u - tl.max(u, axis=2)[:, :, None])  # padded lanes: exp(-inf) = 0
    return e, e * (1.0 / tl.sum(e, axis=2))[:, :, None], clip_slope


@triton.jit
def _right_knots(e, lane, bound, minimum, K: tl.constexpr, PARAM: tl.constexpr):
    """X_k, the right end of bin k, for every lane, in fp64 (``bound``, ``minimum`` fp64 scalars).

    A knot lies at the difference of two nearby numbers (x - X_k, X_k - X_{k-1}): in fp32 its own
    rounding and the cumulative sum's (~K/2 ulps of B) would come back as a relative error of ulp(B)
    divided by the bin's width. So the cumulative fractions C_k = sum_{i<=k} e_i / sum_i e_i are summed in
    fp64 from the fp32 exps (whose ~1 ulp errors only perturb the logits by ~1e-7), and the knots and the
    differences taken from them stay in fp64 until they are small.
    """
    e64 = e.to(tl.float64)
    cum = tl.cumsum(e64, axis=2) * (1.0 / tl.sum(e64, axis=2))[:, :, None]
    if PARAM == _NFLOWS:
        count = (lane + 1).to(tl.float64)[None, None, :]
        knots = 2.0 * bound * (count * minimum + (1.0 - minimum * K) * cum) - bound
        knots = tl.where((lane == K - 1)[None, None, :], bound, knots)  # the last knot exactly at B
    else:
        knots = bound * (2.0 * cum - 1.0)
    return knots


@triton.jit
def _knot_slopes(raw, c, minimum, PARAM: tl.constexpr):
    """D_k, the slope at interior knot k + 1, and dD_k / d raw_k."""
    if PARAM == _NFLOWS:
        sp, sig = _softplus_sigmoid(raw)
        slopes = minimum + sp
        dslopes = sig
    else:
        u, clip_slope = _clip_and_slope(raw, c, PARAM)
        slopes = _exp(u)
        dslopes = slopes * clip_slope
    return slopes, dslopes


@triton.jit
def _pick(values, lane, index):
    """values[..., index] per element (a one-hot sum: the index differs per element)."""
    return tl.sum(tl.where(lane[None, None, :] == index[:, :, None], values, 0.0), axis=2)


@triton.jit
def _find_bin(knots, lane, v, K: tl.constexpr, PARAM: tl.constexpr):
    """The bin of v: interior knots (lanes 0..K-2) at or below v (nflows), strictly below (zuko)."""
    interior = (lane < K - 1)[None, None, :]
    if PARAM == _NFLOWS:
        below = knots <= v[:, :, None]
    else:
        below = knots < v[:, :, None]
    return tl.sum((below & interior).to(tl.int32), axis=2)


@triton.jit
def _bin_ends(knots, lane, j, bound):
    """(left, right) knot of bin j: X_{j-1} (-B for j = 0) and X_j."""
    left = tl.where(j == 0, -bound, _pick(knots, lane, j - 1))
    return left, _pick(knots, lane, j)


@triton.jit
def _bin_slopes(slopes, lane, j, K: tl.constexpr):
    """(d0, d1) of bin j: 1 at the interval's ends, else the interior knot slopes."""
    d0 = tl.where(j == 0, 1.0, _pick(slopes, lane, j - 1))
    d1 = tl.where(j == K - 1, 1.0, _pick(slopes, lane, j))
    return d0, d1


@triton.jit
def _inverse_position(t, h, s, d0, d1):
    """z in [0, 1] with y0 + h R(z) = y0 + t: the stable root of the quadratic, discriminant >= 0.
    Accurate relative to z itself, so for the end of the bin near z = 0."""
    e = d0 + d1 - 2.0 * s
    a = h * (s - d0) + t * e
    b = h * d0 - t * e
    c = -s * t
    disc = tl.maximum(b * b - 4.0 * a * c, 0.0)
    # In [0, 1] exactly; rounding in a steep bin can push it out, where log J would take a negative log.
    return tl.minimum(tl.maximum(2.0 * c / (-b - tl.sqrt(disc)), 0.0), 1.0)


@triton.jit
def _spline_setup(x_ptr, w_ptr, h_ptr, d_ptr, rows, r, s, mask,
                  s_x_b, s_x_r, s_x_s, s_w_b, s_w_r, s_w_s, s_w_k, s_h_b, s_h_r, s_h_s, s_h_k,
                  s_d_b, s_d_r, s_d_s, s_d_k, bound64, min_w64, min_h64, min_d, clip_w, clip_d,
                  K: tl.constexpr, KP: tl.constexpr, PARAM: tl.constexpr, INVERSE: tl.constexpr,
                  ACC: tl.constexpr):
    """Everything forward and backward share: the input, the knots and slopes of every element, the
    element's bin and position in it, and (inverse) the output. Returns a tuple (see the unpacking in
    the kernels); the bin's lower end y0 is fp64, everything else in the compute dtype."""
    lane = tl.arange(0, KP).to(tl.int64)
    xin = _load_elements(x_ptr, rows, r, s, s_x_b, s_x_r, s_x_s, mask, ACC)
    raw_w = _load_params(w_ptr, rows, r, s, lane, s_w_b, s_w_r, s_w_s, s_w_k, mask, K, ACC)
    raw_h = _load_params(h_ptr, rows, r, s, lane, s_h_b, s_h_r, s_h_s, s_h_k, mask, K, ACC)
    raw_d = _load_params(d_ptr, rows, r, s, lane, s_d_b, s_d_r, s_d_s, s_d_k, mask, K - 1, ACC)
    e_w, p_w, clip_slope_w = _softmax(raw_w, lane, clip_w, K, PARAM)
    e_h, p_h, clip_slope_h = _softmax(raw_h, lane, clip_w, K, PARAM)
    knots_x = _right_knots(e_w, lane, bound64, min_w64, K, PARAM)
    knots_y = _right_knots(e_h, lane, bound64, min_h64, K, PARAM)
    slopes, dslopes = _knot_slopes(raw_d, clip_d, min_d, PARAM)
    bound = tl.cast(bound64, ACC)

    if INVERSE:
        search = knots_y
    else:
        search = knots_x
    if PARAM == _NFLOWS:
        inside = (xin >= -bound) & (xin <= bound)
    else:  # zuko's interval ends at its last knot, B up to a rounding
        inside = (xin > -bound) & (xin <= _pick(search, lane, tl.full(xin.shape, K - 1, tl.int32)))
    # Clip first, select later: the unused spline branch of an outside element stays finite.
    v = tl.where(inside, xin, tl.minimum(tl.maximum(xin, -bound), bound)).to(tl.float64)
    j = _find_bin(search, lane, v, K, PARAM)
    x0, x1 = _bin_ends(knots_x, lane, j, bound64)
    y0, y1 = _bin_ends(knots_y, lane, j, bound64)
    d0, d1 = _bin_slopes(slopes, lane, j, K)
    w = (x1 - x0).to(ACC)
    h = (y1 - y0).to(ACC)
    sl = h / w
    # The position from both ends, z and om = 1 - z, each accurate relative to itself: near the right
    # end 1 - z computed from z would carry an error ulp(1) / (1 - z), and the slope's denominator
    # is that sensitive to it in a steep bin.
    if INVERSE:
        # The mirrored spline (z -> 1 - z, d0 <-> d1) gives om as its root from the other end. The roots
        # are taken in fp64 (a few operations per element): in a steep bin their coefficients cancel,
        # and the log-det's slope in z amplifies what is left.
        h64 = y1 - y0
        s64 = h64 / (x1 - x0)
        d0_64 = d0.to(tl.float64)
        d1_64 = d1.to(tl.float64)
        z_left = _inverse_position(v - y0, h64, s64, d0_64, d1_64).to(ACC)
        om_right = _inverse_position(y1 - v, h64, s64, d1_64, d0_64).to(ACC)
        near_left = z_left <= 0.5
        z = tl.where(near_left, z_left, 1.0 - om_right)
        om = tl.where(near_left, 1.0 - z_left, om_right)
        # The output from the nearer end, in fp64 until it is rounded once.
        x_out = tl.where(near_left, x0 + (z * w).to(tl.float64), x1 - (om * w).to(tl.float64)).to(ACC)
    else:
        z = (v - x0).to(ACC) / w
        om = (x1 - v).to(ACC) / w
        x_out = xin
    return (lane, xin, inside, p_w, p_h, clip_slope_w, clip_slope_h, dslopes, j,
            x_out, w, y0, h, d0, d1, sl, z, om)


@triton.jit
def _denominator(z, om, s, d0, d1):
    """s + (d0 + d1 - 2s) z (1 - z) as a sum of positive terms (no cancellation when d0 + d1 < 2s)."""
    return s * (z * z + om * om) + (d0 + d1) * (z * om)


@triton.jit
def _log_slope(z, om, s, d0, d1):
    """(log dy/dx, den) at position z = 1 - om of a bin."""
    den = _denominator(z, om, s, d0, d1)
    num = d1 * z * z + 2.0 * s * (z * om) + d0 * om * om
    return _log(s * s * num) - 2.0 * _log(den), den


@triton.jit
def _spline_fwd_kernel(
    x_ptr, w_ptr, h_ptr, d_ptr, out_ptr, ld_ptr,
    B, N, S,
    s_x_b, s_x_r, s_x_s,
    s_w_b, s_w_r, s_w_s, s_w_k,
    s_h_b, s_h_r, s_h_s, s_h_k,
    s_d_b, s_d_r, s_d_s, s_d_k,
    s_o_b, s_o_r, s_o_s,
    s_l_b, s_l_r, s_l_s,
    n_col_blocks,
    bound_hi, bound_lo, min_w_hi, min_w_lo, min_h_hi, min_h_lo, min_d_hi, min_d_lo,
    clip_w_hi, clip_w_lo, clip_d_hi, clip_d_lo,
    K: tl.constexpr, KP: tl.constexpr, PARAM: tl.constexpr, INVERSE: tl.constexpr, PER_ELEMENT: tl.constexpr,
    ACC: tl.constexpr, SPLIT_RS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y (or x, inverse) and the log-det: per-row partial sums at ld[row, pid_n], or per element."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows, _, r, s, mask = _element_offsets(pid_b, pid_n, B, N, S, BLOCK_B, BLOCK_N, SPLIT_RS)
    (lane, xin, inside, p_w, p_h, csw, csh, dsl, j, x_out, w, y0, h, d0, d1, sl, z, om) = _spline_setup(
        x_ptr, w_ptr, h_ptr, d_ptr, rows, r, s, mask,
        s_x_b, s_x_r, s_x_s, s_w_b, s_w_r, s_w_s, s_w_k, s_h_b, s_h_r, s_h_s, s_h_k, s_d_b, s_d_r, s_d_s, s_d_k,
        _scalar(bound_hi, bound_lo, tl.float64), _scalar(min_w_hi, min_w_lo, tl.float64),
        _scalar(min_h_hi, min_h_lo, tl.float64), _scalar(min_d_hi, min_d_lo, ACC), _scalar(clip_w_hi, clip_w_lo, ACC),
        _scalar(clip_d_hi, clip_d_lo, ACC), K, KP, PARAM, INVERSE, ACC)
    log_j, den = _log_slope(z, om, sl, d0, d1)
    if INVERSE:
        val = x_out
        log_j = -log_j
    else:  # the left end (fp64) plus the in-bin rise, rounded once
        val = (y0 + (h * z * (sl * z + d0 * om) / den).to(tl.float64)).to(ACC)
    out = tl.where(inside, val, xin)
    log_det = tl.where(inside & mask, log_j, 0.0)
    tl.store(out_ptr + rows[:, None] * s_o_b + (r * s_o_r + s * s_o_s)[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)
    if PER_ELEMENT:
        tl.store(ld_ptr + rows[:, None] * s_l_b + (r * s_l_r + s * s_l_s)[None, :], log_det, mask=mask)
    else:
        tl.store(ld_ptr + rows * n_col_blocks + pid_n, tl.sum(log_det, axis=1), mask=rows < B)


@triton.jit
def _local_partials(z, om, sl, d0, d1):
    """At position z = 1 - om of a bin: R = (y - y0) / h and 1 - R, J = dy/dx (dy/dz = w J), the
    partials of R and log J in s, d0, d1, and of log J in z (see the module docstring). Written in z
    and om = 1 - z so that neither end of the bin loses digits: R = z (s z + d0 om) / den and
    1 - R = om (s om + d1 z) / den."""
    q = z * om
    ends = z * z + om * om  # 1 - 2q
    den = _denominator(z, om, sl, d0, d1)
    n = d1 * z * z + 2.0 * sl * q + d0 * om * om
    inv_den = 1.0 / den
    inv_n = 1.0 / n
    r_val = z * (sl * z + d0 * om) * inv_den
    r_comp = om * (sl * om + d1 * z) * inv_den
    jac = sl * sl * n * inv_den * inv_den
    r_s = (z * z - r_val * ends) * inv_den
    r_d0 = q * r_comp * inv_den
    r_d1 = -r_val * q * inv_den
    tilt = om - z  # 1 - 2z
    lj_z = 2.0 * (d1 * z + sl * tilt - d0 * om) * inv_n - 2.0 * (d0 + d1 - 2.0 * sl) * tilt * inv_den
    lj_s = 2.0 / sl + 2.0 * q * inv_n - 2.0 * ends * inv_den
    lj_d0 = om * om * inv_n - 2.0 * q * inv_den
    lj_d1 = z * z * inv_n - 2.0 * q * inv_den
    return r_val, r_comp, jac, r_s, r_d0, r_d1, lj_z, lj_s, lj_d0, lj_d1


@triton.jit
def _size_grads(p, clip_slope, g_right, g_left, lane, j, bound, minimum, K: tl.constexpr, PARAM: tl.constexpr):
    """Gradient of the raw widths (or heights) from those of the bin's two ends.

    X_k = -B + 2B sum_{i<=k} size_i, and the bin's right end is X_j (a constant for nflows' last bin),
    its left end X_{j-1} (the constant -B for j = 0); so size i receives 2B (g_right [i <= j] +
    g_left [i <= j - 1]). Then sizes -> probabilities -> softmax -> (zuko) clip.
    """
    if PARAM == _NFLOWS:
        g_right = tl.where(j == K - 1, 0.0, g_right)
    jj = j[:, :, None]
    ll = lane[None, None, :]
    g_size = 2.0 * bound * (tl.where(ll <= jj, g_right[:, :, None], 0.0) + tl.where(ll < jj, g_left[:, :, None], 0.0))
    if PARAM == _NFLOWS:
        g_p = (1.0 - minimum * K) * g_size
    else:
        g_p = g_size
    # Padded lanes have p = 0, so they contribute nothing to the sum and receive nothing.
    g_u = p * (g_p - tl.sum(p * g_p, axis=2)[:, :, None])
    return g_u * clip_slope


@triton.jit
def _spline_bwd_kernel(
    gout_ptr, gld_ptr, x_ptr, w_ptr, h_ptr, d_ptr, gx_ptr, gw_ptr, gh_ptr, gd_ptr,
    B, N, S,
    s_go_b, s_go_r, s_go_s,
    s_gl_b, s_gl_r, s_gl_s,
    s_x_b, s_x_r, s_x_s,
    s_w_b, s_w_r, s_w_s, s_w_k,
    s_h_b, s_h_r, s_h_s, s_h_k,
    s_d_b, s_d_r, s_d_s, s_d_k,
    bound_hi, bound_lo, min_w_hi, min_w_lo, min_h_hi, min_h_lo, min_d_hi, min_d_lo,
    clip_w_hi, clip_w_lo, clip_d_hi, clip_d_lo,
    K: tl.constexpr, KP: tl.constexpr, PARAM: tl.constexpr, INVERSE: tl.constexpr,
    ACC: tl.constexpr, SPLIT_RS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of the input and the raw widths, heights and derivatives. The upstream log-det
    gradient arrives strided like x (a per-sample one with zero inner strides). Outputs are contiguous:
    gx [B, N], gw and gh [B, N, K], gd [B, N, K-1]."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows, cols, r, s, mask = _element_offsets(pid_b, pid_n, B, N, S, BLOCK_B, BLOCK_N, SPLIT_RS)
    bound64 = _scalar(bound_hi, bound_lo, tl.float64)
    min_w64 = _scalar(min_w_hi, min_w_lo, tl.float64)
    min_h64 = _scalar(min_h_hi, min_h_lo, tl.float64)
    (lane, xin, inside, p_w, p_h, csw, csh, dsl, j, _, w, _, h, d0, d1, sl, z, om) = _spline_setup(
        x_ptr, w_ptr, h_ptr, d_ptr, rows, r, s, mask,
        s_x_b, s_x_r, s_x_s, s_w_b, s_w_r, s_w_s, s_w_k, s_h_b, s_h_r, s_h_s, s_h_k, s_d_b, s_d_r, s_d_s, s_d_k,
        bound64, min_w64, min_h64, _scalar(min_d_hi, min_d_lo, ACC), _scalar(clip_w_hi, clip_w_lo, ACC),
        _scalar(clip_d_hi, clip_d_lo, ACC), K, KP, PARAM, INVERSE, ACC)
    bound = tl.cast(bound64, ACC)
    min_w = tl.cast(min_w64, ACC)
    min_h = tl.cast(min_h64, ACC)
    gout = _load_elements(gout_ptr, rows, r, s, s_go_b, s_go_r, s_go_s, mask, ACC)
    gl = _load_elements(gld_ptr, rows, r, s, s_gl_b, s_gl_r, s_gl_s, mask, ACC)

    r_val, r_comp, jac, r_s, r_d0, r_d1, lj_z, lj_s, lj_d0, lj_d1 = _local_partials(z, om, sl, d0, d1)
    lj_x = lj_z / w
    if INVERSE:
        # Implicit differentiation: the forward's parameter gradients at x(y) with these upstreams.
        gy = -(gout - gl * lj_x) / jac
        gl = -gl
        g_in = -gy
    else:
        gy = gout
        g_in = gy * jac + gl * lj_x
    # Outside the interval the op is the identity: input gradient = upstream, parameters get none.
    g_in = tl.where(inside, g_in, gout)
    gy = tl.where(inside, gy, 0.0)
    gl = tl.where(inside, gl, 0.0)

    g_z = gy * w * jac + gl * lj_z
    g_s = gy * h * r_s + gl * lj_s
    g_d0 = gy * h * r_d0 + gl * lj_d0
    g_d1 = gy * h * r_d1 + gl * lj_d1
    # z = (x - x0) / w, s = h / w, y = y0 + h R: gradients of the bin's right ends x1, y1 (at fixed left
    # ends) and of its left ends x0, y0 (at fixed right ends), with 1 - z = om and 1 - R kept exact.
    g_h = gy * r_val + g_s / w
    g_w = -(g_z * z + g_s * sl) / w
    g_x0 = (g_s * sl - g_z * om) / w
    g_y0 = gy * r_comp - g_s / w

    flat = rows[:, None] * N + cols[None, :]
    tl.store(gx_ptr + flat, g_in.to(gx_ptr.dtype.element_ty), mask=mask)
    g_raw_w = _size_grads(p_w, csw, g_w, g_x0, lane, j, bound, min_w, K, PARAM)
    g_raw_h = _size_grads(p_h, csh, g_h, g_y0, lane, j, bound, min_h, K, PARAM)
    ll = lane[None, None, :]
    jj = j[:, :, None]
    g_slopes = tl.where(ll == jj, g_d1[:, :, None], 0.0) + tl.where(ll == jj - 1, g_d0[:, :, None], 0.0)
    g_raw_d = g_slopes * dsl  # lane K-1 (d1 = 1 of the last bin) is masked out of the store
    elem = flat[:, :, None]
    m3 = mask[:, :, None]
    tl.store(gw_ptr + elem * K + ll, g_raw_w.to(gw_ptr.dtype.element_ty), mask=m3 & (ll < K))
    tl.store(gh_ptr + elem * K + ll, g_raw_h.to(gh_ptr.dtype.element_ty), mask=m3 & (ll < K))
    tl.store(gd_ptr + elem * (K - 1) + ll, g_raw_d.to(gd_ptr.dtype.element_ty), mask=m3 & (ll < K - 1))


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------

#: Parameter values per thread per [BLOCK_B, BLOCK_N, KP] block, by pass: the forward holds about fifteen
#: such blocks live (raw, exps, probabilities, fp64 knots, slopes), the backward about twice that, and the
#: inverse's forward adds its fp64 roots. Chosen from the sm_90 compile figures (registers, spills; see
#: the module docstring); fp64 blocks take two registers a value, so they get half.
_VALUES_PER_THREAD = {"forward": 4, "inverse": 2, "backward": 2}
_MAX_WARPS = 4


def _fp32_pair(value: float) -> tuple[float, float]:
    """``(hi, lo)``: fp32 numbers whose fp64 sum is ``value`` to ~2^-48 relative."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    lo = struct.unpack("f", struct.pack("f", value - hi))[0]
    return hi, lo


def _scalars(parameterization: str, bound, min_bin_width, min_bin_height, min_derivative, slope) -> list[float]:
    """The kernels' scalar arguments: bound, minimum width/height/slope, clip factors, as fp32 pairs."""
    if parameterization == "zuko":
        import math

        limit = abs(math.log(slope))
        clip_w, clip_d = 2.0 / limit, 1.0 / limit
    else:
        clip_w = clip_d = 0.0
    out: list[float] = []
    for v in (bound, min_bin_width, min_bin_height, min_derivative, clip_w, clip_d):
        out.extend(_fp32_pair(float(v)))
    return out


def _collapse(shape, element_tensors, param_tensors):
    """A shared strided [B, R, S] view of ``element_tensors`` (x's shape) and ``param_tensors`` (x's
    shape plus a last K dim). Returns ``(elements, params, (R, S), element_strides, param_strides)``
    where a parameter's strides end with its K stride; a tensor whose layout prevents the collapse is
    replaced by a contiguous copy (correct, one extra read and write of it)."""
    elements, params = list(element_tensors), list(param_tensors)
    while True:
        strides = [t.stride() for t in elements] + [t.stride()[:-1] for t in params]
        found = collapse_inner_dims(shape, strides)
        if found is not None:
            (R, S), inner = found
            batch = [t.stride(0) for t in elements + params]
            el = [(b, *st) for b, st in zip(batch, inner)]
            pa = [(b, *st, t.stride(-1)) for b, st, t in zip(batch[len(elements):], inner[len(elements):], params)]
            return elements, params, (R, S), el[:len(elements)], pa
        everything = elements + params
        idx = next(i for i, t in enumerate(everything) if not t.is_contiguous())
        if idx < len(elements):
            elements[idx] = elements[idx].contiguous()
        else:
            params[idx - len(elements)] = params[idx - len(elements)].contiguous()


def _launch_config(B: int, N: int, K: int, pass_name: str, dtype: torch.dtype):
    """``(KP, BLOCK_B, BLOCK_N, grid, num_warps)``: a tile of up to _MAX_WARPS warps holding
    _VALUES_PER_THREAD values of each parameter block per thread."""
    kp = next_pow2(K)
    per_thread = _VALUES_PER_THREAD[pass_name] // (2 if dtype == torch.float64 else 1)
    per_program = max(1, _MAX_WARPS * 32 * per_thread // kp)
    block_b, block_n = row_tile(B, N, max_tile=per_program, max_cols=per_program)
    warps = max(1, min(_MAX_WARPS, block_b * block_n * kp // (32 * per_thread)))
    grid = (triton.cdiv(B, block_b), triton.cdiv(N, block_n))
    return kp, block_b, block_n, grid, warps


def spline_forward(x, widths, heights, derivatives, inverse: bool, parameterization: str, bound: float,
                   min_bin_width: float, min_bin_height: float, min_derivative: float, slope: float,
                   per_element: bool):
    """Launch the forward (or inverse) kernel. Inputs are validated by ``fastdensity.ops``.

    Returns ``(y, logdet)``: y with x's shape, dtype and dense layout; logdet [B] (or x's shape with
    ``per_element``) in fp32 (fp64 for fp64 inputs).
    """
    B, K = x.shape[0], widths.shape[-1]
    acc = acc_dtype(x.dtype)
    out = empty_like(x)
    ld_shape = tuple(x.shape) if per_element else (B,)
    if x.numel() == 0:
        return out, torch.zeros(ld_shape, dtype=acc, device=x.device)
    N = x.numel() // B
    kp, block_b, block_n, grid, warps = _launch_config(B, N, K, "inverse" if inverse else "forward", x.dtype)
    if per_element:
        log_det = empty(ld_shape, dtype=acc, device=x.device)
        partial = None
    else:
        log_det = None
        # Flat [B * n_col_blocks] (row-major [B, n_col_blocks]): with one column block it is the log-det
        # itself, returned as the op's own allocation, not a view - callers (nflows' coupling) add into it
        # in place, which autograd refuses on a view output of a custom op.
        partial = empty((B * grid[1],), dtype=acc, device=x.device)
    el = [x, out] + ([log_det] if per_element else [])
    el, (w, h, d), (R, S), el_strides, (sw, sh, sd) = _collapse(x.shape, el, [widths, heights, derivatives])
    sx, so = el_strides[0], el_strides[1]
    sl = el_strides[2] if per_element else (0, 0, 0)
    out_v = el[1]
    ld_v = el[2] if per_element else partial
    with on_device_of(x):
        _spline_fwd_kernel[grid](
            el[0], w, h, d, out_v, ld_v,
            B, N, S, *sx, *sw, *sh, *sd, *so, *sl, grid[1],
            *_scalars(parameterization, bound, min_bin_width, min_bin_height, min_derivative, slope),
            K=K, KP=kp, PARAM=PARAMETERIZATION_CODES[parameterization], INVERSE=inverse, PER_ELEMENT=per_element,
            ACC=tl_dtype(acc), SPLIT_RS=R > 1, BLOCK_B=block_b, BLOCK_N=block_n, num_warps=warps,
            enable_fp_fusion=FP_FUSION,
        )
    if out_v is not out:  # the output needed a contiguous stand-in
        out.copy_(out_v)
    if per_element:
        if ld_v is not log_det:
            log_det.copy_(ld_v)
        return out, log_det
    return out, (partial if grid[1] == 1 else partial.view(B, grid[1]).sum(dim=1))


def spline_backward(grad_out, grad_logdet, x, widths, heights, derivatives, inverse: bool, parameterization: str,
                    bound: float, min_bin_width: float, min_bin_height: float, min_derivative: float, slope: float):
    """Launch the backward kernel. ``grad_logdet`` is [B] (per-sample log-det) or x's shape (per element).

    Returns ``(grad_x, grad_widths, grad_heights, grad_derivatives)``, contiguous, in the inputs' dtypes.
    """
    B, K = x.shape[0], widths.shape[-1]
    dev = x.device
    grad_x = empty(x.shape, dtype=x.dtype, device=dev)
    grad_w = empty(widths.shape, dtype=widths.dtype, device=dev)
    grad_h = empty(heights.shape, dtype=heights.dtype, device=dev)
    grad_d = empty(derivatives.shape, dtype=derivatives.dtype, device=dev)
    if x.numel() == 0:
        return grad_x, grad_w, grad_h, grad_d
    N = x.numel() // B
    if grad_logdet.shape != x.shape:  # one per sample: the same value for every element of the row
        grad_logdet = grad_logdet.reshape((B,) + (1,) * (x.dim() - 1)).expand(x.shape)
    kp, block_b, block_n, grid, warps = _launch_config(B, N, K, "backward", x.dtype)
    el, (w, h, d), (R, S), (sgo, sgl, sx), (sw, sh, sd) = _collapse(
        x.shape, [grad_out, grad_logdet, x], [widths, heights, derivatives])
    with on_device_of(x):
        _spline_bwd_kernel[grid](
            el[0], el[1], el[2], w, h, d, grad_x, grad_w, grad_h, grad_d,
            B, N, S, *sgo, *sgl, *sx, *sw, *sh, *sd,
            *_scalars(parameterization, bound, min_bin_width, min_bin_height, min_derivative, slope),
            K=K, KP=kp, PARAM=PARAMETERIZATION_CODES[parameterization], INVERSE=inverse,
            ACC=tl_dtype(acc_dtype(x.dtype)), SPLIT_RS=R > 1, BLOCK_B=block_b, BLOCK_N=block_n, num_warps=warps,
            enable_fp_fusion=FP_FUSION,
        )
    return grad_x, grad_w, grad_h, grad_d


# ---------------------------------------------------------------------------------------------------
# torch.library registration: custom_op + register_fake + register_autograd, as kernels/coupling.py
# explains - torch.compile(fullgraph=True) sees two opaque ops with known output shapes.
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdensity::rational_quadratic_spline", mutates_args=())
def rational_quadratic_spline_op(
    x: torch.Tensor, widths: torch.Tensor, heights: torch.Tensor, derivatives: torch.Tensor, inverse: bool,
    parameterization: str, bound: float, min_bin_width: float, min_bin_height: float, min_derivative: float,
    slope: float, per_element: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return spline_forward(x, widths, heights, derivatives, inverse, parameterization, bound, min_bin_width,
                          min_bin_height, min_derivative, slope, per_element)


@rational_quadratic_spline_op.register_fake
def _(x, widths, heights, derivatives, inverse, parameterization, bound, min_bin_width, min_bin_height,
      min_derivative, slope, per_element):
    ld_shape = tuple(x.shape) if per_element else (x.shape[0],)
    return torch.empty_like(x), x.new_empty(ld_shape, dtype=acc_dtype(x.dtype))


@torch.library.custom_op("fastdensity::rational_quadratic_spline_backward", mutates_args=())
def rational_quadratic_spline_backward_op(
    grad_out: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor, widths: torch.Tensor, heights: torch.Tensor,
    derivatives: torch.Tensor, inverse: bool, parameterization: str, bound: float, min_bin_width: float,
    min_bin_height: float, min_derivative: float, slope: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return spline_backward(grad_out, grad_logdet, x, widths, heights, derivatives, inverse, parameterization,
                           bound, min_bin_width, min_bin_height, min_derivative, slope)


@rational_quadratic_spline_backward_op.register_fake
def _(grad_out, grad_logdet, x, widths, heights, derivatives, inverse, parameterization, bound, min_bin_width,
      min_bin_height, min_derivative, slope):
    def like(t):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)

    return like(x), like(widths), like(heights), like(derivatives)


def _setup_context(ctx, inputs, output):
    x, widths, heights, derivatives, *options = inputs
    # The inputs are all backward needs (knots, bins and slopes are recomputed): no new memory is held.
    ctx.save_for_backward(x, widths, heights, derivatives)
    ctx.options = options[:-1]  # inverse .. slope; per_element is implied by grad_logdet's shape


def _backward(ctx, grad_y, grad_logdet):
    # Autograd passes zeros, never None, for an output the loss did not use (custom ops materialise them).
    x, widths, heights, derivatives = ctx.saved_tensors
    grads = rational_quadratic_spline_backward_op(grad_y, grad_logdet, x, widths, heights, derivatives, *ctx.options)
    return (*grads, None, None, None, None, None, None, None, None)


rational_quadratic_spline_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(rational_quadratic_spline_backward_op, "rational_quadratic_spline")
