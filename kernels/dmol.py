"""Fused discretized mixture of logistics (PixelCNN++): log p(x) in one pass, its gradients in another.

The math (reference and the constants' provenance: ``fastdensity/reference/dmol.py``). Per pixel, with
K components, C in {1, 3} colour channels, ``h = 1 / (2^bits - 1)`` and, for channel c of component k,
``s = exp(max(ls_raw, -7))``, ``t = 1 / s``, ``mu`` the coupled mean (``mu_G = m_G + c_0 x_R``,
``mu_B = m_B + c_1 x_R + c_2 x_G`` with ``c_i = tanh(alpha_i)``, alpha_i the raw coefficients)::

    a = t (x - mu + h)     b = t (x - mu - h)     m = t (x - mu)     delta = a - b = 2 h t

    lp = log sigmoid(a)                                   x < -edge  (lowest value, open below)
         log sigmoid(-b)                                  x >  edge  (highest value, open above)
         L = log sigmoid(a) + log sigmoid(-b) + log(1 - e^-delta)     if L > log 1e-5
         m - log s - 2 softplus(m) - log((2^bits - 1) / 2)            otherwise (density at the centre)

    log p(x) = logsumexp_k (logit_k + sum_c lp_ck) - logsumexp_k logit_k

Both log-sum-exps run online over k (a running max and a rescaled sum, one exp per step), so nothing of
size K is ever held: the forward writes, per pixel, ``lse_joint`` and ``lse_logits`` (and the log-prob,
or per-program partial sums of it for ``reduction="sum"``).

Gradients, with ``g`` the upstream gradient of the pixel, ``r_k = exp(logit_k + sum_c lp_ck - lse_joint)``
(the posterior of component k) and ``pi_k = exp(logit_k - lse_logits)`` (its prior)::

    d/d logit_k    = g (r_k - pi_k)
    d/d m_ck       = -g r_k lp'_ck                       lp' = d lp / d(x - mu), per branch:
    d/d ls_raw_ck  =  g r_k dlp_ck  [ls_raw >= -7]        lower  t sigma(-a)           upper  -t sigma(b)
    d/d alpha_0k   = -g r_k lp'_Gk x_R (1 - c_0^2)        mass   t (sigma(-a) - sigma(b))
    d/d alpha_1k   = -g r_k lp'_Bk x_R (1 - c_1^2)        centre t (1 - 2 sigma(m))
    d/d alpha_2k   = -g r_k lp'_Bk x_G (1 - c_2^2)      dlp = d lp / d log s, per branch:
    d/d x_R = g sum_k r_k (lp'_R - c_0 lp'_G - c_1 lp'_B)    lower -a sigma(-a)         upper  b sigma(b)
    d/d x_G = g sum_k r_k (lp'_G - c_2 lp'_B)                mass  -a sigma(-a) + b sigma(b) - delta / (e^delta - 1)
    d/d x_B = g sum_k r_k lp'_B                              centre -m (1 - 2 sigma(m)) - 1

The backward kernel recomputes every per-component term from x, params and the two saved [B, H, W]
log-normalisers: no [B, K, H, W] tensor exists in either direction. The gradient for x (the derivative
of the smooth piece x lies in; the edge and fallback switches are piecewise constant in x) costs a few
FMAs and one [B, C, H, W] store, and is computed only when x requires grad.

Shapes: x [B, C, H, W]; params [B, 10K, H, W] (C = 3) or [B, 3K, H, W] (C = 1), any strides (channels-
last included; nothing is copied). Outputs: [B] (sum) or [B, H, W] (none) in float32, float64 for
float64 params; grad_params has params' dtype and dense layout.

Minimum traffic per pixel, P = 10K (or 3K) parameter channels of e bytes, x of e_x bytes:

    forward             read P e + C e_x; write 8 bytes (the two fp32 log-normalisers; 16 in fp64)
    backward            read P e + C e_x + 12; write P e (+ C e_x for grad x)
    forward + backward  ~3 P e          e.g. [64, 100, 32, 32]: 78.6 MB in fp32, 39.3 MB in bf16

Work per (pixel, channel, component), counted from the code below:

    special functions   forward 10: exp(-log s); exp + log in each of the three softplus (a, b, m);
                        exp(-delta); log(1 - e^-delta); the exp in tanh of a coefficient (3 per
                        component, RGB). Plus 2 exps per (pixel, component) for the two online
                        log-sum-exps. Backward: the same, plus 2 exps per (pixel, component) for r_k, pi_k.
    divisions           3 (one per softplus/sigmoid pair) + 1 per coefficient; backward 2 more.
    other flops         ~60 forward (the 9-term float32 series for small delta and inside tanh
                        included; 15 terms in float64), ~90 backward.

Per pixel that is ~32 K special-function ops forward against 10 K e bytes of params read: ~0.8 per byte
in fp32, ~1.6 per byte in bf16; the backward moves twice the bytes for about the same count. With
the fact that exp/log run at a small fraction of the FMA rate (docs/design.md, Machines), the bf16 forward in particular may
be bound by the special-function units rather than by memory; the GPU benchmarks will tell.

Parallelism: one program per (image, block of BLOCK pixels of it); each loops over the K components,
reading each parameter channel once as a coalesced row of the block's pixels (NCHW). Per-image sums
come from [B, n_blocks] partial sums added by one small torch reduction: no atomics, deterministic.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import (FP_FUSION, INTERPRETED, acc_dtype, empty, empty_like, next_pow2, on_device_of,
                    refuse_double_backward, tl_dtype)

__all__ = ["INTERPRETED", "dmol_forward", "dmol_backward", "dmol_log_prob_op"]

# The constants of PixelCNN++ (the same values as fastdensity/reference/dmol.py; a test checks this).
LOG_SCALE_MIN = -7.0
MIN_BIN_MASS = 1e-5
EDGE_MARGIN_BINS = 0.255
_LOG_SCALE_MIN = tl.constexpr(LOG_SCALE_MIN)
_LOG_MIN_MASS = tl.constexpr(math.log(MIN_BIN_MASS))


@triton.jit
def _softplus_sigmoid(z):
    """``(softplus(z), sigmoid(z))`` from one exp, one log and one division; no libdevice."""
    e = tl.exp(-tl.abs(z))
    u = 1.0 + e
    inv_u = 1.0 / u
    # log(1 + e) = log(u) + (e - (u - 1)) / u to first order in the rounding error of u = 1 + e: the
    # log1p the interpreter lacks, accurate to a few ulps (and equal to e when u rounds to 1).
    log1p_e = tl.log(u) + (e - (u - 1.0)) * inv_u
    return tl.maximum(z, 0.0) + log1p_e, tl.where(z >= 0, inv_u, e * inv_u)


@triton.jit
def _one_minus_exp_neg(delta, SERIES_TERMS: tl.constexpr):
    """``(1 - e^-delta, e^-delta)`` for delta >= 0, without the cancellation of 1 - e^-delta at small delta.

    Below 1/2 the series delta (1 - delta/2 (1 - delta/3 (...))) to SERIES_TERMS terms (the first dropped
    term is below an ulp at delta = 1/2); above, the plain difference, which no longer cancels.
    """
    em = tl.exp(-delta)
    p = 1.0 - delta * (1.0 / SERIES_TERMS)
    for i in tl.static_range(SERIES_TERMS - 1, 1, -1):
        p = 1.0 - delta * (1.0 / i) * p
    return tl.where(delta < 0.5, delta * p, 1.0 - em), em


@triton.jit
def _tanh(z, SERIES_TERMS: tl.constexpr):
    """``(tanh z, 1 - tanh^2 z)`` within 3 and 5 ulps (interpreted; a test checks it); no libdevice.

    With e = e^-2|z| and om = 1 - e (the series near 0): tanh |z| = om / (2 - om) and 1 - tanh^2 =
    4 e / (1 + e)^2. The usual 2 sigmoid(2z) - 1 cancels as z -> 0 (relative error ~ ulp(1) / |z|), and a
    coefficient's error moves the mean it scales, which the log-prob amplifies by up to 1/s ~ 1e3.
    """
    om, e = _one_minus_exp_neg(2.0 * tl.abs(z), SERIES_TERMS)
    th = om / (2.0 - om)
    one_plus = 1.0 + e
    return tl.where(z < 0, -th, th), 4.0 * e / (one_plus * one_plus)


@triton.jit
def _channel_terms(x, mu, ls_raw, lower, upper, H: tl.constexpr, LOG_HALF_LEVELS: tl.constexpr,
                   SERIES_TERMS: tl.constexpr):
    """One colour channel of one component for a block of pixels.

    Returns ``(lp, lp', dlp)``: log P(x | mu, s), its derivative in (x - mu) and in ls_raw (zero where
    the -7 clamp is active). The forward uses only ``lp``; the compiler drops the rest there.
    """
    # A select, not tl.maximum: that one may return the bound for a NaN log-scale, hiding the NaN.
    ls = tl.where(ls_raw < _LOG_SCALE_MIN, _LOG_SCALE_MIN, ls_raw)
    t = tl.exp(-ls)
    d = x - mu
    a = t * (d + H)
    b = t * (d - H)
    m = t * d
    delta = (2.0 * H) * t
    sp_na, sig_na = _softplus_sigmoid(-a)  # log sigmoid(a) = -sp_na;  sigma(-a) = sig_na
    sp_b, sig_b = _softplus_sigmoid(b)  # log sigmoid(-b) = -sp_b;  sigma(b) = sig_b
    sp_m, sig_m = _softplus_sigmoid(m)
    one_minus, em = _one_minus_exp_neg(delta, SERIES_TERMS)
    # sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^-delta): no cancellation in either tail.
    log_mass = -sp_na - sp_b + tl.log(one_minus)
    centre = 1.0 - 2.0 * sig_m
    log_fallback = m - ls - 2.0 * sp_m - LOG_HALF_LEVELS
    use_mass = log_mass > _LOG_MIN_MASS
    lp = tl.where(lower, -sp_na, tl.where(upper, -sp_b, tl.where(use_mass, log_mass, log_fallback)))

    # Derivatives, branch by branch (module docstring). delta / (e^delta - 1) = delta e^-delta / (1 - e^-delta)
    # -> 1 as delta -> 0; an underflowed delta = 0 gives 0/0 there, but that bin always takes the fallback
    # and tl.where selects, so the NaN is never read.
    d_mass = t * (sig_na - sig_b)
    d_centre = t * centre
    dlp_dd = tl.where(lower, t * sig_na, tl.where(upper, -t * sig_b, tl.where(use_mass, d_mass, d_centre)))
    s_lower = -a * sig_na
    s_upper = b * sig_b
    s_mass = s_lower + s_upper - delta * em / one_minus
    s_centre = -m * centre - 1.0
    dlp_dls = tl.where(lower, s_lower, tl.where(upper, s_upper, tl.where(use_mass, s_mass, s_centre)))
    # clamp(min=-7) passes the gradient where ls_raw >= -7 (boundary included, as torch.clamp does).
    dlp_dls = tl.where(ls_raw >= _LOG_SCALE_MIN, dlp_dls, 0.0)
    return lp, dlp_dd, dlp_dls


@triton.jit
def _lse_step(run_max, run_sum, v):
    """One step of an online log-sum-exp: fold v into (max, sum of exp(. - max)) with a single exp."""
    # The smaller of (v, run_max) is exponentiated relative to the larger. v == run_max == -inf (a -inf
    # logit first) would give -inf - -inf = NaN: count it as exp(0) instead; the result stays -inf.
    diff = tl.where(v == run_max, 0.0, v - run_max)
    e = tl.exp(-tl.abs(diff))
    new_sum = tl.where(v > run_max, run_sum * e + 1.0, run_sum + e)
    return tl.maximum(run_max, v), new_sum


@triton.jit
def _pixel_block(pid, n_blocks, HW, W, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """Image index (int64 scalar), pixel index in the image, (h, w) and the lane mask.

    Offsets within one image are int32 (one register per pixel, 32-bit division for h and w) unless WIDE:
    the launcher sets it when one could pass 2^31 - 1 (``_needs_wide``). Each image's base (b times its
    batch stride) is a 64-bit scalar, and the parameter groups are walked by 64-bit pointer increments.
    """
    b = (pid // n_blocks).to(tl.int64)
    hw = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = hw < HW
    if WIDE:
        hw = hw.to(tl.int64)
    return b, hw, hw // W, hw % W, mask


@triton.jit
def _pixel_values(xp, s_xc, mask, RGB: tl.constexpr, ACC: tl.constexpr):
    """x_R, x_G, x_B of a block of pixels (``xp`` points at channel 0); one channel: x_0 three times."""
    x0 = tl.load(xp, mask=mask, other=0.0).to(ACC)
    x1 = x0
    x2 = x0
    if RGB:  # s_xc + s_xc rather than 2 * s_xc: an int32 stride times 2 could wrap
        x1 = tl.load(xp + s_xc, mask=mask, other=0.0).to(ACC)
        x2 = tl.load(xp + s_xc + s_xc, mask=mask, other=0.0).to(ACC)
    return x0, x1, x2


@triton.jit
def _load_next(q, s_group, mask, ACC: tl.constexpr):
    """The parameter group after the one ``q`` points at, and a pointer to it. Groups are walked by
    pointer increments, which never overflow, whatever the size of one image's parameters."""
    q += s_group
    return tl.load(q, mask=mask, other=0.0).to(ACC), q


@triton.jit
def _component(q, s_group, x0, x1, x2, mask, RGB: tl.constexpr, H: tl.constexpr, EDGE: tl.constexpr,
               LOG_HALF_LEVELS: tl.constexpr, SERIES_TERMS: tl.constexpr, ACC: tl.constexpr):
    """One mixture component at a block of pixels; ``q`` points at its logit, its other parameter groups
    (R means, log-scales, coefficients, then G's, then B's) follow ``s_group`` = K channels apart.

    Returns ``(logit, lp, dd0, dls0, dd1, dls1, dd2, dls2, c0, dc0, c1, dc1, c2, dc2)``: lp = sum_c
    log P(x_c | component), per channel lp' and dlp (``_channel_terms``), and the coupling coefficients
    c_i = tanh(alpha_i) with 1 - c_i^2. One channel: the G and B terms are zeros. The forward uses only
    ``logit`` and ``lp``; the compiler drops the rest there.
    """
    logit = tl.load(q, mask=mask, other=0.0).to(ACC)
    mu0, q = _load_next(q, s_group, mask, ACC)
    ls0, q = _load_next(q, s_group, mask, ACC)
    lp, dd0, dls0 = _channel_terms(x0, mu0, ls0, x0 < -EDGE, x0 > EDGE, H, LOG_HALF_LEVELS, SERIES_TERMS)
    if RGB:
        alpha0, q = _load_next(q, s_group, mask, ACC)
        m1, q = _load_next(q, s_group, mask, ACC)
        ls1, q = _load_next(q, s_group, mask, ACC)
        alpha1, q = _load_next(q, s_group, mask, ACC)
        m2, q = _load_next(q, s_group, mask, ACC)
        ls2, q = _load_next(q, s_group, mask, ACC)
        alpha2, q = _load_next(q, s_group, mask, ACC)
        c0, dc0 = _tanh(alpha0, SERIES_TERMS)
        c1, dc1 = _tanh(alpha1, SERIES_TERMS)
        c2, dc2 = _tanh(alpha2, SERIES_TERMS)
        lp1, dd1, dls1 = _channel_terms(x1, m1 + c0 * x0, ls1, x1 < -EDGE, x1 > EDGE, H, LOG_HALF_LEVELS,
                                        SERIES_TERMS)
        lp2, dd2, dls2 = _channel_terms(x2, m2 + c1 * x0 + c2 * x1, ls2, x2 < -EDGE, x2 > EDGE, H,
                                        LOG_HALF_LEVELS, SERIES_TERMS)
        lp += lp1 + lp2
    else:
        zero = tl.zeros_like(lp)
        dd1, dls1, dd2, dls2, c0, dc0, c1, dc1, c2, dc2 = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
    return logit, lp, dd0, dls0, dd1, dls1, dd2, dls2, c0, dc0, c1, dc1, c2, dc2


@triton.jit
def _store_next(o, s_group, value, mask):
    """Store ``value`` into the parameter group after the one ``o`` points at; returns a pointer to it."""
    o += s_group
    tl.store(o, value.to(o.dtype.element_ty), mask=mask)
    return o


@triton.jit
def _dmol_fwd_kernel(
    x_ptr, p_ptr, out_ptr, lse_ptr, lsel_ptr,
    K, HW, W, n_blocks,
    s_xb, s_xc, s_xh, s_xw,
    s_pb, s_pc, s_ph, s_pw, s_group,
    RGB: tl.constexpr, REDUCE: tl.constexpr, H: tl.constexpr, EDGE: tl.constexpr,
    LOG_HALF_LEVELS: tl.constexpr, SERIES_TERMS: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b, hw, hh, ww, mask = _pixel_block(pid, n_blocks, HW, W, BLOCK, WIDE)
    x0, x1, x2 = _pixel_values(x_ptr + b * s_xb + (hh * s_xh + ww * s_xw), s_xc, mask, RGB, ACC)
    # Component k's logit is at q + q_pix: the image's base q (a scalar, advanced one channel per k) and
    # the pixel's offset, so that no 64-bit pointer per pixel is carried through the loop.
    q = p_ptr + b * s_pb
    q_pix = hh * s_ph + ww * s_pw

    joint_max = tl.full([BLOCK], float("-inf"), ACC)
    joint_sum = tl.zeros([BLOCK], ACC)
    prior_max = tl.full([BLOCK], float("-inf"), ACC)
    prior_sum = tl.zeros([BLOCK], ACC)
    for _k in range(0, K):
        logit, lp, _, _, _, _, _, _, _, _, _, _, _, _ = _component(
            q + q_pix, s_group, x0, x1, x2, mask, RGB, H, EDGE, LOG_HALF_LEVELS, SERIES_TERMS, ACC)
        joint_max, joint_sum = _lse_step(joint_max, joint_sum, logit + lp)
        prior_max, prior_sum = _lse_step(prior_max, prior_sum, logit)
        q += s_pc

    lse_joint = joint_max + tl.log(joint_sum)
    lse_logits = prior_max + tl.log(prior_sum)
    log_prob = lse_joint - lse_logits
    image = b * HW  # the [B, H, W] outputs' offset of this image
    tl.store(lse_ptr + image + hw, lse_joint, mask=mask)
    tl.store(lsel_ptr + image + hw, lse_logits, mask=mask)
    if REDUCE:
        tl.store(out_ptr + pid, tl.sum(tl.where(mask, log_prob, 0.0), axis=0))
    else:
        tl.store(out_ptr + image + hw, log_prob, mask=mask)


@triton.jit
def _dmol_bwd_kernel(
    x_ptr, p_ptr, g_ptr, lse_ptr, lsel_ptr, gp_ptr, gx_ptr,
    K, HW, W, n_blocks,
    s_xb, s_xc, s_xh, s_xw,
    s_pb, s_pc, s_ph, s_pw, s_group,
    s_gb, s_gh, s_gw,
    s_qb, s_qc, s_qh, s_qw, s_qgroup,
    RGB: tl.constexpr, GRAD_X: tl.constexpr, H: tl.constexpr, EDGE: tl.constexpr,
    LOG_HALF_LEVELS: tl.constexpr, SERIES_TERMS: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Gradients for params (every channel) and, with GRAD_X, for x (contiguous [B, C, H, W])."""
    pid = tl.program_id(0)
    b, hw, hh, ww, mask = _pixel_block(pid, n_blocks, HW, W, BLOCK, WIDE)
    x0, x1, x2 = _pixel_values(x_ptr + b * s_xb + (hh * s_xh + ww * s_xw), s_xc, mask, RGB, ACC)
    image = b * HW  # the [B, H, W] inputs' offset of this image
    # g has strides (s_gb, 0, 0) when the output was summed to [B]: one value per image.
    g = tl.load(g_ptr + b * s_gb + (hh * s_gh + ww * s_gw), mask=mask, other=0.0).to(ACC)
    lse_joint = tl.load(lse_ptr + image + hw, mask=mask, other=0.0)
    lse_logits = tl.load(lsel_ptr + image + hw, mask=mask, other=0.0)
    # Component k's logit (its gradient) is at q + q_pix (o + o_pix): as in the forward.
    q = p_ptr + b * s_pb
    q_pix = hh * s_ph + ww * s_pw
    o = gp_ptr + b * s_qb
    o_pix = hh * s_qh + ww * s_qw
    gx0 = tl.zeros([BLOCK], ACC)
    gx1 = tl.zeros([BLOCK], ACC)
    gx2 = tl.zeros([BLOCK], ACC)
    for _k in range(0, K):
        logit, lp, dd0, dls0, dd1, dls1, dd2, dls2, c0, dc0, c1, dc1, c2, dc2 = _component(
            q + q_pix, s_group, x0, x1, x2, mask, RGB, H, EDGE, LOG_HALF_LEVELS, SERIES_TERMS, ACC)
        # Posterior and prior weight of this component; g folded into the posterior once.
        post = tl.exp(logit + lp - lse_joint)
        prior = tl.exp(logit - lse_logits)
        gr = g * post
        # The groups in the order of the parameters (see _component).
        og = o + o_pix
        tl.store(og, (g * post - g * prior).to(og.dtype.element_ty), mask=mask)
        og = _store_next(og, s_qgroup, -gr * dd0, mask)
        og = _store_next(og, s_qgroup, gr * dls0, mask)
        if RGB:
            # d tanh(raw) / d raw = 1 - c^2; c_0 scales x_R in mu_G, c_1 x_R and c_2 x_G in mu_B.
            og = _store_next(og, s_qgroup, -gr * dd1 * x0 * dc0, mask)
            og = _store_next(og, s_qgroup, -gr * dd1, mask)
            og = _store_next(og, s_qgroup, gr * dls1, mask)
            og = _store_next(og, s_qgroup, -gr * dd2 * x0 * dc1, mask)
            og = _store_next(og, s_qgroup, -gr * dd2, mask)
            og = _store_next(og, s_qgroup, gr * dls2, mask)
            og = _store_next(og, s_qgroup, -gr * dd2 * x1 * dc2, mask)
        if GRAD_X:  # for one channel dd1 = dd2 = 0: only gx0 is stored
            gx0 += gr * (dd0 - c0 * dd1 - c1 * dd2)
            gx1 += gr * (dd1 - c2 * dd2)
            gx2 += gr * dd2
        q += s_pc
        o += s_qc

    if GRAD_X:
        gx_ty = gx_ptr.dtype.element_ty
        if RGB:
            gxp = gx_ptr + b * (3 * HW) + hw
            tl.store(gxp, gx0.to(gx_ty), mask=mask)
            tl.store(gxp + HW, gx1.to(gx_ty), mask=mask)
            tl.store(gxp + HW + HW, gx2.to(gx_ty), mask=mask)
        else:
            tl.store(gx_ptr + image + hw, gx0.to(gx_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _constants(num_bits: int, acc: torch.dtype) -> dict:
    """The bit depth's constants, as compile-time values (one compile per bit depth; a model uses one).

    As constexprs they are materialised in the compute dtype itself, so float64 runs see float64
    constants (a float argument would reach the kernel rounded to float32).
    """
    levels = 2 ** int(num_bits) - 1
    return dict(
        H=1.0 / levels,
        EDGE=1.0 - EDGE_MARGIN_BINS / levels,
        LOG_HALF_LEVELS=math.log(levels / 2.0),
        # Terms of the 1 - e^-delta series: the first dropped one, 0.5^(n-1) / n! relative, is below
        # the unit roundoff (2^-53 needs n = 15, 2^-24 needs n = 9).
        SERIES_TERMS=15 if acc == torch.float64 else 9,
        ACC=tl_dtype(acc),
    )


_INT32_MAX = 2 ** 31 - 1


def _needs_wide(HW: int, block: int, H: int, W: int, *strides) -> bool:
    """Whether an offset within one image could pass 2^31 - 1: the pixel index of a program's masked lanes
    (below HW + BLOCK), or (H - 1) s_h + (W - 1) s_w for any ``(s_h, s_w)`` in ``strides``."""
    spans = [HW + block] + [(H - 1) * abs(sh) + (W - 1) * abs(sw) for sh, sw in strides]
    return max(spans) > _INT32_MAX


def _block(hw: int) -> tuple[int, int]:
    """Pixels per program and warps: one pixel per thread, at most 128."""
    block = min(128, max(16, next_pow2(hw)))
    return block, max(1, block // 32)


#: Registers the float64 RGB backward may use. Its body (one pixel per thread) needs ~174; left to itself,
#: ptxas holds a 4-warp block to 168 so that 3 fit an SM, and spills (measured for sm_90, Triton 3.6 and
#: 3.9). With this limit it does not spill, and in one-warp blocks 11 fit an SM (occupancy 0.17).
FP64_RGB_BWD_MAXNREG = 184


def _bwd_launch(hw: int, acc: torch.dtype, rgb: bool) -> tuple[int, dict]:
    """The backward's pixels per program and launch options (warps, and the register limit of float64 RGB)."""
    block, warps = _block(hw)
    if acc == torch.float64 and rgb:
        return min(block, 32), {"num_warps": 1, "maxnreg": FP64_RGB_BWD_MAXNREG, "enable_fp_fusion": FP_FUSION}
    return block, {"num_warps": warps, "enable_fp_fusion": FP_FUSION}


#: Launches ``fastdensity verify``'s CPU cases never make, compiled for sm_90 by tests/test_sm90_compile.py:
#: the backward with the x gradient (verify asks for params' only), RGB and one channel, at the largest
#: pixel block, and with int64 offsets (images of 2^31 elements and more).
def _bwd_variants(dtype_name: str) -> list[tuple[dict, dict]]:
    acc = acc_dtype(getattr(torch, dtype_name))
    out = []
    for rgb, wide in ((True, False), (False, False), (True, True)):
        block, options = _bwd_launch(1024, acc, rgb)
        out.append(({"GRAD_X": True, "RGB": rgb, "WIDE": wide, "BLOCK": block}, options))
    return out


SM90_VARIANTS = {"_dmol_bwd_kernel": _bwd_variants}


def dmol_forward(x: torch.Tensor, params: torch.Tensor, num_bits: int, reduce_sum: bool):
    """Run the forward kernel. Inputs are validated by ``fastdensity.ops``.

    Returns ``(out, lse_joint, lse_logits)``: out [B] (``reduce_sum``) or [B, H, W]; the two
    log-normalisers [B, H, W] are what the backward needs. All in float32 (float64 for float64 params).
    """
    B, C, Hh, W = x.shape
    HW = Hh * W
    K = params.shape[1] // (10 if C == 3 else 3)
    acc = acc_dtype(params.dtype)
    lse_joint = empty((B, Hh, W), dtype=acc, device=x.device)
    lse_logits = empty((B, Hh, W), dtype=acc, device=x.device)
    block, warps = _block(HW)
    n_blocks = triton.cdiv(HW, block)
    if reduce_sum:
        out = empty((B, n_blocks), dtype=acc, device=x.device)  # per-program partial sums
    else:
        out = empty((B, Hh, W), dtype=acc, device=x.device)
    if B * HW > 0:
        _dmol_fwd_kernel[(B * n_blocks,)](
            x, params, out, lse_joint, lse_logits,
            K, HW, W, n_blocks,
            *x.stride(), *params.stride(), K * params.stride(1),
            RGB=C == 3, REDUCE=reduce_sum, WIDE=_needs_wide(HW, block, Hh, W, x.stride()[2:], params.stride()[2:]),
            BLOCK=block, num_warps=warps, enable_fp_fusion=FP_FUSION,
            **_constants(num_bits, acc),
        )
    if reduce_sum:
        if HW == 0:
            out = torch.zeros(B, dtype=acc, device=x.device)
        else:
            out = out[:, 0].clone() if n_blocks == 1 else out.sum(dim=1)
    return out, lse_joint, lse_logits


def dmol_backward(grad_out, x, params, lse_joint, lse_logits, num_bits: int, need_grad_x: bool):
    """Run the backward kernel: ``(grad_params, grad_x)``, grad_x None unless ``need_grad_x``.

    ``grad_out`` is [B] (the output was summed) or [B, H, W]; any strides, broadcast ones included.
    """
    B, C, Hh, W = x.shape
    HW = Hh * W
    K = params.shape[1] // (10 if C == 3 else 3)
    acc = acc_dtype(params.dtype)
    grad_params = empty_like(params)
    grad_x = empty(x.shape, dtype=x.dtype, device=x.device) if need_grad_x else None
    if grad_out.dim() == 1:
        g_strides = (grad_out.stride(0), 0, 0)
    else:
        g_strides = grad_out.stride()
    block, options = _bwd_launch(HW, acc, C == 3)
    n_blocks = triton.cdiv(HW, block)
    if B * HW > 0:
        _dmol_bwd_kernel[(B * n_blocks,)](
            x, params, grad_out, lse_joint, lse_logits, grad_params, grad_x if need_grad_x else grad_params,
            K, HW, W, n_blocks,
            *x.stride(), *params.stride(), K * params.stride(1),
            *g_strides,
            *grad_params.stride(), K * grad_params.stride(1),
            RGB=C == 3, GRAD_X=need_grad_x,
            WIDE=_needs_wide(HW, block, Hh, W, x.stride()[2:], params.stride()[2:], g_strides[1:],
                             grad_params.stride()[2:]),
            BLOCK=block, **options, **_constants(num_bits, acc),
        )
    return grad_params, grad_x


# ---------------------------------------------------------------------------------------------------
# torch.library registration: custom_op + register_fake + register_autograd, as for the coupling, so
# torch.compile(fullgraph=True) sees two opaque ops with known shapes and never breaks the graph.
# The two log-normalisers are extra outputs of the forward op (marked non-differentiable) because
# autograd can only save what the op returns.
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdensity::dmol_log_prob", mutates_args=())
def dmol_log_prob_op(
    x: torch.Tensor, params: torch.Tensor, num_bits: int, reduce_sum: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with on_device_of(params):
        return dmol_forward(x, params, num_bits, reduce_sum)


@dmol_log_prob_op.register_fake
def _(x, params, num_bits, reduce_sum):
    B, _, Hh, W = x.shape
    acc = acc_dtype(params.dtype)
    out = x.new_empty((B,) if reduce_sum else (B, Hh, W), dtype=acc)
    return out, x.new_empty((B, Hh, W), dtype=acc), x.new_empty((B, Hh, W), dtype=acc)


@torch.library.custom_op("fastdensity::dmol_log_prob_backward", mutates_args=())
def dmol_log_prob_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, params: torch.Tensor, lse_joint: torch.Tensor,
    lse_logits: torch.Tensor, num_bits: int, need_grad_x: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device_of(params):
        grad_params, grad_x = dmol_backward(grad_out, x, params, lse_joint, lse_logits, num_bits, need_grad_x)
    # A custom op cannot return None: an empty tensor stands for "x needs no gradient".
    return grad_params, grad_x if grad_x is not None else x.new_empty(0)


@dmol_log_prob_backward_op.register_fake
def _(grad_out, x, params, lse_joint, lse_logits, num_bits, need_grad_x):
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_grad_x else x.new_empty(0)
    return torch.empty_like(params), grad_x


def _setup_context(ctx, inputs, output):
    x, params, num_bits, _ = inputs
    _, lse_joint, lse_logits = output
    # Saved: the inputs (held by the caller anyway) and two [B, H, W] statistics; every per-component
    # term is recomputed in the backward kernel.
    ctx.save_for_backward(x, params, lse_joint, lse_logits)
    ctx.mark_non_differentiable(lse_joint, lse_logits)
    ctx.num_bits = num_bits


def _backward(ctx, grad_out, _grad_lse_joint, _grad_lse_logits):
    x, params, lse_joint, lse_logits = ctx.saved_tensors
    need_x = bool(ctx.needs_input_grad[0])
    grad_params, grad_x = dmol_log_prob_backward_op(grad_out, x, params, lse_joint, lse_logits, ctx.num_bits, need_x)
    return (grad_x if need_x else None), grad_params, None, None


dmol_log_prob_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(dmol_log_prob_backward_op, "dmol_log_prob")

#: Least occupancy (resident warps / 64) each kernel needs on a Hopper SM (sm_90) and why; the static sm_90 tier
#: (fastdensity.sm90, tests/test_sm90_compile.py) checks every launch against it.
SM90_OCCUPANCY_FLOOR = {name: (0.25, "memory-bound: each pixel reads its 10K (RGB) parameters once for ~3 "
                                     "transcendentals each; 16 warps keep ~30 KB per SM in flight, as 4.8 TB/s needs")
                        for name in ("_dmol_fwd_kernel", "_dmol_bwd_kernel")}
SM90_OCCUPANCY_FLOOR["_dmol_bwd_kernel[float64]"] = (
    0.17, "float64 is bound by the FP64 pipe, not by memory: its sm_90 code runs ~1230 fp64 instructions "
            "(DFMA, DMUL, DADD; exp, log and division are DFMA sequences in fp64) per pixel and RGB component "
            "against 160 bytes moved, 73 ps at 132 SMs x 64 fp64 lanes x 1.98 GHz against 37 ps at 4.3 TB/s. "
            "One pixel per thread is the smallest tile, and its body takes 158-174 registers (FP64_RGB_BWD_MAXNREG): "
            "11-12 warps per SM, ~3 per scheduler, each with three channels' independent chains, keep that pipe busy")
