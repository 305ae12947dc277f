"""Mixture log-likelihood with parameters shared by every sample: [N rows x K components] score tiles
with an online log-sum-exp over K, flash-attention style, in the direct (cancellation-free) form or - the
float32 Gaussian forward - as tensor-core products, with the direct form wherever those cancel too much.

The op and its math are those of ``kernels/mixture.py`` (which registers the op and dispatches here);
this file is the path for one set of parameters shared by all N samples — logits [K], means and
log_scales [K, D] — which is what fitting a GMM to a data set looks like, and where K and D are large
enough for the [N, K] score matrix to be the whole cost.

Per tile of BLOCK_N rows, the program walks the K components in tiles of BLOCK_K. In the direct form (every
path but the tensor-core forward below, and its fallback) the [BLOCK_N, BLOCK_K] score tile is built by a
loop over the D features, one rank-1 update per feature::

    score[n, k] = c_k + sum_d f(u_nkd),     u_nkd = (x_nd - mu_kd) * inv_s_kd

with the per-component constants precomputed once on the host: ``inv_s = exp(-log_scales)``, as two
factors ``a b`` (see :func:`inverse_scale`: ``b`` is exactly 1 unless exp(-l) overflows, and then keeps u
finite). The second factor costs one multiply per (row, component, feature), 4 operations instead of 3
for Gaussians; a uniform branch that skipped it when no log-scale needs it was tried and compiled to
more registers and small spills on sm_90 (ptxas figures; the runtime cost of either is unmeasured),
``c_k = log pi_k - sum_d l_kd`` (Gaussian: also ``- D log(2 pi)/2``, with f(u) = -u^2/2 accumulated as
u^2 and scaled once per tile). Each score tile then merges into the running per-row (max, sum) state as
in ``kernels/logsumexp.py``; only the per-row result leaves the program. Like the matrix product it
replaces, the update reuses every loaded x value across BLOCK_K components and every parameter across
BLOCK_N rows, and accumulates in registers with no cross-thread reduction over D.

Backward, with g the upstream gradient and lp the saved per-row log-likelihood, recomputes each score
tile and its weights ``w[n, k] = g_n exp(score[n, k] - lp_n)`` (g_n times the responsibility), then:

    dx[n, d]     = sum_k w[n, k] f'(u_nkd) inv_s_kd                      rows kernel, grid over row tiles
    dmu[k, d]    = -sum_n w[n, k] f'(u_nkd) inv_s_kd                     params kernel, grid over
    dl[k, d]     = sum_n w[n, k] (-u_nkd f'(u_nkd) - 1)                  (component tiles x row splits)
    dlogits[k]   = sum_n w[n, k] - pi_k sum_n g_n

The params kernel writes one partial sum per row split ([splits, K, D], reduced on the host): no
atomics, so results are deterministic. Both kernels accumulate a column per feature into their own
slice of an fp32 (fp64 for fp64) buffer, read-modify-write by the program that owns it, with a
barrier per tile so that every thread of the program sees the previous tile's writes.

The tensor-core forward (float32 Gaussians)
-------------------------------------------
The Gaussian quadratic form expands into matrix products,

    Q_nk = sum_d a_kd (x_nd - mu_kd)^2 = P_nk - 2 XB_nk + C_k,    P = x^2 . a,  XB = x . b,  C_k = sum_d mu^2 a

with ``a = exp(-2 l)``, ``b = mu a`` and C computed on the host in float64 and rounded once to float32. With
TENSOR_CORES, float32 (and half: they accumulate in float32) Gaussians with K >= TC_MIN_K compute each score
tile ``log pi_k + c_k - Q/2`` from two ``tl.dot`` of [TC_BLOCK_N, TC_BLOCK_D] x [TC_BLOCK_D, TC_BLOCK_K] per
feature chunk, in ``input_precision="tf32x3"`` (each operand split into big + small TF32 parts, three
products, float32 accumulation per chunk, chunks summed on the CUDA cores: about 2^-22 of each operand kept; bf16x3 keeps 2^-16 and fails the rule
everywhere, bf16x6 measures as tf32x3 at twice the products). float64 (no float64 tensor cores) and logistic
components (no quadratic form) stay direct.

Why not always: the expansion's error is set by the size of the terms that cancel, not of the result. Its
float32 accumulation rounds terms of size ``M_nk = sum_d (x^2 a + 2 |x b| + mu^2 a)`` to a result of size
Q_nk, so for a row near a component relative to |x| (data drawn from the mixture: what fitting sees) it
is 5x-360x further from the truth than the direct form even with IEEE float32 products (the study below,
kept from before this path existed). Hence the per-tile **cancellation criterion**
(``_expanded_score_tile``): a tile keeps its expanded scores only if for every row n and component k in it

    w_nk M_nk <= RHO (|m_n| + D)          (and the expansion is finite: no x^2 or exp(-2 l) overflow)

with ``M_nk <= (sqrt(P_nk) + sqrt(C_k))^2`` (Cauchy-Schwarz, no extra product), ``m_n`` the row's running
maximum score (tile included: a lower bound of the row's final maximum) and ``w_nk = exp(min(score - m_n,
0))`` an upper bound of the responsibility: a component that cannot weigh in the log-sum-exp may cancel
freely. Otherwise the whole tile is recomputed in the direct form (a uniform branch: no divergence). A
kept tile's rounding error is then a small multiple (growing with the accumulation length) of RHO float32
ulps of the row's scale ``|log p| + D``: the order of eager float32's own error, whose rounding of the
scores is of that scale. That is an estimate, not a bound: what is claimed is measured, on a float64 model
of the GPU's tf32x3 rounding (tests/test_mixture_shared_tensor_cores.py; table in benchmarks/NOTES.md).
With RHO = CANCELLATION_RHO = 8, every tile is expanded on the unfitted verify, GPU-tier and benchmark
data, (almost) none on data drawn from the mixture with sigma from 1e-3 to 1 (with sigma in [2, 5] against
means ~ N(0, 1) little cancels, and it is expanded), and the rule (<= 2x eager float32's error + 1e-5)
holds on all of them.

The backward stays the direct form (below). It weighs each recomputed direct score by exp(score - log p);
after an expanded forward, log p is within the rule but not the log-sum-exp of those scores to the last
ulps, and every weight of a row would be off by that difference - modelled at 3x-10x eager's gradient
error, past the rule. So :func:`shared_backward` recomputes log p with the direct forward whenever the
forward may have expanded; and ``fastdensity.ops`` asks for the direct forward at once wherever a gradient
will be needed (the op's ``tensor_cores`` argument), so a training step costs what it did before the
expansion existed and only inference and evaluation gain. The backward as matrix products of the
responsibilities W [N, K]
(``dmu = a (W^T x - mu W^T 1)``, ``dl = a (W^T x^2 - 2 mu W^T x + mu^2 W^T 1) - W^T 1``, ``dx = W b - x (W a)``)
cancels the same way (the variance-as-E[x^2]-E[x]^2 kind; table below) and would need a criterion of its
own: not done.

The study behind the criterion, on CPU against a float64 evaluation of the direct form, all paths from the
same float32-rounded inputs, N=4096 rows, K=256 components, D=64 features, means ~ N(0, 1) per feature,
scales uniform in log space, data drawn from the mixture ("near") or with extra N(0, 5^2) noise ("far").
Max |error| of the per-row log-likelihood (|log p| ~ 50-60 near, ~2400 far):

    data                          eager fp32   expansion fp32   fp32 centred   tf32x3   tf32 (1 pass)
    near, sigma in [0.3, 1]          1.3e-5        1.1e-4          1.3e-4       1.3e-4      1.2e-1
    near, sigma in [0.05, 0.2]       1.1e-5        4.0e-3          3.7e-3       4.3e-3      4.8e+0
    far,  sigma in [0.3, 1]          5.7e-4        2.6e-3          2.4e-3       2.4e-3      7.9e-1

("centred" subtracts the mean of the component means from x and mu before expanding: no help when the
components are narrow relative to their spread.) The backward as matrix products, in float32 and fed the
exact responsibilities, max |error| against eager float32's:

    data                          dx (eager / matmul)   dmu (eager / matmul)   dl (eager / matmul)
    near, sigma in [0.3, 1]          1.5e-6 / 2.2e-6       7.9e-6 / 8.3e-5        9.8e-6 / 5.4e-4
    near, sigma in [0.05, 0.2]       1.0e-5 / 1.1e-4       4.6e-5 / 2.5e-3        1.1e-5 / 1.3e-2

``tests/test_mixture.py::test_matmul_expansion_is_less_accurate_than_the_direct_form`` re-measures the
forward claim at a smaller size on every run. None of this has been timed on a GPU: the expanded forward's
throughput, and the cost of tiles that fall back (their products are wasted), are outstanding.

Minimum traffic and work, N rows, e = bytes per element of x (parameters are K(3D+1), negligible):

    forward             read x (N D e), write N log-likelihoods                 ~ N D e
    backward            read x, g, lp; write dx                                 ~ 2 N D e
    flops               Gaussian ~4 N K D forward, ~12 N K D backward (two recomputations of the
                        scores); logistic adds 2 transcendentals per (n, k, d) - compute-bound
                        for K >~ 8.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .logsumexp import LOG2E, lse_update_tile, lse_value
from .utils import FP_FUSION, INTERPRETED, acc_dtype, empty, next_pow2, target_programs, tl_dtype

__all__ = ["INTERPRETED", "KIND_CODES", "LOG_SCALE_CAP", "std_log_density", "inverse_scale", "times_inverse_scale",
           "shared_forward", "shared_backward"]

KIND_CODES = {"gaussian": 0, "logistic": 1}
_GAUSSIAN = tl.constexpr(0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
HALF_LOG_2PI = tl.constexpr(_HALF_LOG_2PI)

#: The largest whole exponent whose exp is finite, per accumulation dtype: :func:`inverse_scale` splits
#: exp(-l) into two factors past it (the reference's ``log_scale_cap``; a test checks they agree).
LOG_SCALE_CAP = {torch.float32: 88.0, torch.float64: 709.0}

#: Tile sizes (tests lower them to reach multi-tile paths).
BLOCK_N = 64
BLOCK_K = 32
LOGISTIC_PARAMS_BLOCK_N = 32  # rows per step of the logistic parameter backward (see shared_backward)

#: The expanded (tensor-core) forward for float32 Gaussians; see "The tensor-core forward" above.
TENSOR_CORES = True
#: Its tiles: ``tl.dot`` needs every dimension >= 16, so K below TC_MIN_K (tiles mostly padding) stays direct.
#: Feature chunks of 16, not 32: at 64 x 32 x 32 the kernel (expansion and direct fallback together) compiled
#: to 236-254 registers on sm_90, at 64 x 32 x 16 to 132 (occupancy 0.188), Triton 3.6 and 3.9 alike.
TC_BLOCK_N = 64
TC_BLOCK_K = 32
TC_BLOCK_D = 16
TC_MIN_K = 16
#: The cancellation criterion's rho: a tile keeps its expanded scores when, for every row n and component
#: k of it, ``w_nk M_nk <= rho (|m_n| + D)``. 8 is the least power of two that takes the unfitted verify and
#: benchmark data onto tensor cores (4 left 41% of the benchmark data's tiles direct, N = 2048); the errors
#: it allows are in benchmarks/NOTES.md.
CANCELLATION_RHO = 8.0
#: ``tl.dot`` operand precision of the expansion: three TF32 products per pair (Triton's split-operand mode).
#: The interpreter ignores it and multiplies in IEEE float32; the rounding it would add on a GPU is modelled
#: in tests/test_mixture_shared_tensor_cores.py.
TC_PRECISION = "tf32x3"


@triton.jit
def std_log_density(u, KIND: tl.constexpr):
    """``(f(u), f'(u))`` of the standardised component (location 0, scale 1), elementwise.

    Gaussian: f = -u^2/2 - log(2 pi)/2, f' = -u. Logistic: f = -|u| - 2 log(1 + exp(-|u|)), the same as
    -u - 2 softplus(-u) but without overflow for either sign, and f' = -tanh(u/2) written with the same
    t = exp(-|u|) in (0, 1] (no libdevice, so the interpreter runs it).
    """
    if KIND == _GAUSSIAN:
        f = -0.5 * u * u - HALF_LOG_2PI
        df = -u
    else:
        au = tl.abs(u)
        t = tl.exp(-au)
        f = -au - 2.0 * tl.log(1.0 + t)
        q = (1.0 - t) / (1.0 + t)  # tanh(|u| / 2)
        df = tl.where(u > 0, -q, q)
    return f, df


@triton.jit
def inverse_scale(ls, ACC: tl.constexpr):
    """``(e, big)`` for :func:`times_inverse_scale`: with ``t = -ls`` and ``c`` = :data:`LOG_SCALE_CAP` of ACC,
    ``big = t > c`` (exp(-ls) overflows) and ``e = exp(t)``, or ``exp(min(t - c, c))`` where big. One exp and
    a predicate per element: the reference's two factors ``a = exp(min(t, c))``, ``b = exp(min(t - min(t, c), c))``
    are ``(e, 1)`` and, where big, ``(exp(c), e)``."""
    if ACC == tl.float64:
        cap = 709.0
    else:
        cap = 88.0
    t = -ls
    big = t > cap
    return tl.exp(tl.minimum(tl.where(big, t - cap, t), cap)), big


@triton.jit
def times_inverse_scale(v, e, big, ACC: tl.constexpr):
    """``v exp(-ls)`` from :func:`inverse_scale`'s ``(e, big)``, rounded as the reference's ``(v a) b``: ``v e``
    (exactly ``v exp(-ls)``) wherever exp(-ls) is finite, ``(v exp(c)) e`` past it, which stays finite
    (``u = 0`` at ``v = 0``, not ``0 * inf``) wherever the product is representable."""
    if ACC == tl.float64:
        exp_cap = 8.218407461554972e307  # exp(709), rounded to float64
    else:
        exp_cap = 1.6516363e38  # exp(88), rounded to float32
    return (v * tl.where(big, exp_cap, 1.0)) * e  # v * 1 is exact: v e where not big


@triton.jit
def _times_inv_scale(v, isd, ild):
    """``v exp(-l)`` for a [BLOCK_N, BLOCK_K] tile v and one feature's two factors [BLOCK_K] (host-split as
    :func:`inverse_scale` splits it): ``(v a) b``, with ``b = 1`` exactly unless exp(-l) overflows."""
    return (v * isd[None, :]) * ild[None, :]


@triton.jit
def _feature_u(xp, mp, ip, lop, rmask, kmask, ACC: tl.constexpr):
    """One feature d: ``(u [BLOCK_N, BLOCK_K], a [BLOCK_K], b [BLOCK_K])`` from x[:, d], mu[:, d] and the two
    inverse-scale factors a[:, d], b[:, d]."""
    xd = tl.load(xp, mask=rmask, other=0.0).to(ACC)
    mud = tl.load(mp, mask=kmask, other=0.0)
    isd = tl.load(ip, mask=kmask, other=0.0)
    ild = tl.load(lop, mask=kmask, other=1.0)
    return _times_inv_scale(xd[:, None] - mud[None, :], isd, ild), isd, ild


@triton.jit
def _score_tile(x_rows, rmask, sx_d, mu_ptr, is_ptr, il_ptr, c_ptr, ks, kmask, D,
                KIND: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] log pi_k + log p_k(x_n): one rank-1 update per feature d."""
    acc = tl.zeros([BLOCK_N, BLOCK_K], ACC)
    xp = x_rows
    mp = mu_ptr + ks * D
    ip = is_ptr + ks * D
    lop = il_ptr + ks * D
    for d in range(0, D):
        u, _, _ = _feature_u(xp, mp, ip, lop, rmask, kmask, ACC)
        if KIND == _GAUSSIAN:
            acc += u * u  # the -1/2 and the constants are applied once per tile below
        else:
            f, _ = std_log_density(u, KIND)
            acc += f
        xp += sx_d
        mp += 1
        ip += 1
        lop += 1
    # c_k = log pi_k - sum_d l_kd (- D log(2 pi)/2): -inf for lanes past K, so they weigh nothing.
    c = tl.load(c_ptr + ks, mask=kmask, other=float("-inf"))
    if KIND == _GAUSSIAN:
        return -0.5 * acc + c[None, :]
    return acc + c[None, :]


@triton.jit
def _expanded_products(x_rows, rmask, sx_d, a_ptr, bm_ptr, ks, kmask, D,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr):
    """``(P, XB)`` [BLOCK_N, BLOCK_K] float32: ``P = x^2 . a_k`` and ``XB = x . b_k`` over the D features, in
    chunks of BLOCK_D, on tensor cores (a = exp(-2 l), b = mu a: [K, D] float32, read as [BLOCK_D, BLOCK_K]).

    Each chunk's ``tl.dot`` starts from zero and is added to the running sums on the CUDA cores, rounded to
    nearest (Triton 3.6 and 3.9 keep that add rather than folding it into the accumulator): the tensor
    cores' accumulator - which may truncate - then rounds sums of BLOCK_D features only. Modelled, with a
    truncating accumulator over all 64 features the far-data case of NOTES broke the rule (1.2e-3 against
    1.1e-3); in chunks of 16 it keeps it."""
    p = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    xb = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < D
        xt = tl.load(x_rows[:, None] + ds[None, :] * sx_d, mask=rmask[:, None] & dmask[None, :],
                     other=0.0).to(tl.float32)
        offs = ks[None, :] * D + ds[:, None]
        pmask = kmask[None, :] & dmask[:, None]
        at = tl.load(a_ptr + offs, mask=pmask, other=0.0)
        bt = tl.load(bm_ptr + offs, mask=pmask, other=0.0)
        p += tl.dot(xt * xt, at, input_precision=PRECISION)
        xb += tl.dot(xt, bt, input_precision=PRECISION)
    return p, xb


@triton.jit
def _expanded_score_tile(x_rows, rmask, sx_d, a_ptr, bm_ptr, cq_ptr, c_ptr, ks, kmask, D, m,
                         RHO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                         PRECISION: tl.constexpr):
    """``(score, at_risk)``: the [BLOCK_N, BLOCK_K] Gaussian scores from the expansion
    ``log pi_k + const_k - (P - 2 XB + C_k) / 2``, and how many elements of the tile may not keep them.

    ``m`` [BLOCK_N] is the running row maximum of the scores so far (-inf before the first tile). With the
    tile's own maximum it is a lower bound of the row's final maximum, so ``w = exp(min(score - m', 0))``
    bounds the responsibility of each component from above. An element is at risk when the magnitude of the
    cancelling terms, ``M = (sqrt(P) + sqrt(C))^2 >= sum_d (x^2 a + 2 |x b| + mu^2 a)``, weighted by w, exceeds
    RHO times the scale of the row's result ``|m'| + D``; or when the expansion is not finite (x^2 or
    exp(-2 l) overflows, inf - inf): the direct form handles those as the reference does."""
    p, xb = _expanded_products(x_rows, rmask, sx_d, a_ptr, bm_ptr, ks, kmask, D, BLOCK_N, BLOCK_K, BLOCK_D,
                               PRECISION)
    cq = tl.load(cq_ptr + ks, mask=kmask, other=0.0)
    # c_k = log pi_k - sum_d l_kd - D log(2 pi)/2: -inf for lanes past K, so they weigh nothing.
    c = tl.load(c_ptr + ks, mask=kmask, other=float("-inf"))
    q = (p - 2.0 * xb) + cq[None, :]
    score = -0.5 * q + c[None, :]
    m_tile = tl.maximum(m, tl.max(score, axis=1))
    w = tl.exp2(tl.minimum(score - m_tile[:, None], 0.0) * LOG2E)
    root = tl.sqrt(tl.maximum(p, 0.0)) + tl.sqrt(cq)[None, :]
    scale = tl.abs(m_tile) + D * 1.0
    at_risk = (w * (root * root) > RHO * scale[:, None]) | (tl.abs(q) == float("inf")) | (q != q)
    at_risk = at_risk & rmask[:, None] & kmask[None, :]
    return score, tl.sum(tl.sum(at_risk.to(tl.int32), axis=1), axis=0)


@triton.jit
def _shared_fwd_kernel(
    x_ptr, mu_ptr, is_ptr, il_ptr, c_ptr, a_ptr, bm_ptr, cq_ptr, out_ptr,
    N, K, D, sx_n, sx_d,
    KIND: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TENSOR_CORES: tl.constexpr = False, BLOCK_D: tl.constexpr = 16, RHO: tl.constexpr = 8.0,
    PRECISION: tl.constexpr = "tf32x3",
):
    """log p [N]. With TENSOR_CORES (float32 Gaussians) each score tile comes from the expansion and is
    recomputed in the direct form only where the cancellation criterion says the expansion is not exact
    enough (a_ptr, bm_ptr, cq_ptr are only read then)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < N
    x_rows = x_ptr + rows * sx_n
    m = tl.full([BLOCK_N], float("-inf"), ACC)
    s = tl.zeros([BLOCK_N], ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        if TENSOR_CORES:
            score, at_risk = _expanded_score_tile(x_rows, rmask, sx_d, a_ptr, bm_ptr, cq_ptr, c_ptr, ks, kmask,
                                                  D, m, RHO, BLOCK_N, BLOCK_K, BLOCK_D, PRECISION)
            if at_risk > 0:
                score = _score_tile(x_rows, rmask, sx_d, mu_ptr, is_ptr, il_ptr, c_ptr, ks, kmask, D, KIND, ACC,
                                    BLOCK_N, BLOCK_K)
        else:
            score = _score_tile(x_rows, rmask, sx_d, mu_ptr, is_ptr, il_ptr, c_ptr, ks, kmask, D, KIND, ACC,
                                BLOCK_N, BLOCK_K)
        m, s = lse_update_tile(m, s, score)
    tl.store(out_ptr + rows, lse_value(m, s), mask=rmask)


@triton.jit
def _weights(score, lp, g, rmask):
    """g_n * responsibility_nk = g_n exp(score - lp_n); rows past N weigh 0."""
    w = g[:, None] * tl.exp2((score - lp[:, None]) * LOG2E)
    return tl.where(rmask[:, None], w, 0.0)


@triton.jit
def _shared_bwd_x_kernel(
    x_ptr, mu_ptr, is_ptr, il_ptr, c_ptr, lp_ptr, g_ptr, gx_ptr,
    N, K, D, sx_n, sx_d,
    KIND: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gx [N, D] (contiguous, accumulation dtype) = sum_k w f'(u) exp(-l), one column per feature."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < N
    x_rows = x_ptr + rows * sx_n
    lp = tl.load(lp_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        score = _score_tile(x_rows, rmask, sx_d, mu_ptr, is_ptr, il_ptr, c_ptr, ks, kmask, D, KIND, ACC,
                            BLOCK_N, BLOCK_K)
        w = _weights(score, lp, g, rmask)
        live = w != 0  # as in kernels/mixture.py: a weightless component adds exactly 0, not 0 * inf
        xp = x_rows
        mp = mu_ptr + ks * D
        ip = is_ptr + ks * D
        lop = il_ptr + ks * D
        gp = gx_ptr + rows * D
        for d in range(0, D):
            u, isd, ild = _feature_u(xp, mp, ip, lop, rmask, kmask, ACC)
            _, df = std_log_density(u, KIND)
            col = tl.sum(tl.where(live, _times_inv_scale(w * df, isd, ild), 0.0), axis=1)
            # The first component tile writes the column, later ones add to it (read back below).
            prev = tl.load(gp, mask=rmask & (k0 > 0), other=0.0)
            tl.store(gp, prev + col, mask=rmask)
            xp += sx_d
            mp += 1
            ip += 1
            lop += 1
            gp += 1
        # Make this tile's columns visible to every thread of the program before the next tile reads
        # them back (a column's load and store need not be issued by the same thread).
        tl.debug_barrier()


@triton.jit
def _shared_bwd_params_kernel(
    x_ptr, mu_ptr, is_ptr, il_ptr, c_ptr, lp_ptr, g_ptr, ga_ptr, gm_ptr, gl_ptr,
    N, K, D, sx_n, sx_d, tiles_per_split,
    KIND: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial sums over one split of the rows, for one tile of components.

    ga [splits, K] gets sum_n w; gm, gl [splits, K, D] get -sum_n w f'(u) exp(-l) and sum_n w (-u f'(u) - 1).
    """
    split = tl.program_id(1).to(tl.int64)
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    ga = tl.zeros([BLOCK_K], ACC)
    for t in range(0, tiles_per_split):
        rows = (split * tiles_per_split + t) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        rmask = rows < N
        x_rows = x_ptr + rows * sx_n
        lp = tl.load(lp_ptr + rows, mask=rmask, other=0.0)
        g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
        score = _score_tile(x_rows, rmask, sx_d, mu_ptr, is_ptr, il_ptr, c_ptr, ks, kmask, D, KIND, ACC,
                            BLOCK_N, BLOCK_K)
        w = _weights(score, lp, g, rmask)
        live = w != 0  # as in kernels/mixture.py: a weightless component adds exactly 0, not 0 * inf
        ga += tl.sum(w, axis=0)
        xp = x_rows
        mp = mu_ptr + ks * D
        ip = is_ptr + ks * D
        lop = il_ptr + ks * D
        gmp = gm_ptr + (split * K + ks) * D
        glp = gl_ptr + (split * K + ks) * D
        for d in range(0, D):
            u, isd, ild = _feature_u(xp, mp, ip, lop, rmask, kmask, ACC)
            _, df = std_log_density(u, KIND)
            gmu = -tl.sum(tl.where(live, _times_inv_scale(w * df, isd, ild), 0.0), axis=0)
            gls = tl.sum(tl.where(live, w * (-u * df - 1.0), 0.0), axis=0)
            # Own slice of the partial buffers: the first row tile writes, later ones accumulate.
            accumulate = kmask & (t > 0)
            tl.store(gmp, tl.load(gmp, mask=accumulate, other=0.0) + gmu, mask=kmask)
            tl.store(glp, tl.load(glp, mask=accumulate, other=0.0) + gls, mask=kmask)
            xp += sx_d
            mp += 1
            ip += 1
            lop += 1
            gmp += 1
            glp += 1
        tl.debug_barrier()
    tl.store(ga_ptr + split * K + ks, ga, mask=kmask)


# ---------------------------------------------------------------------------------------------------
# Launchers (called by kernels/mixture.py, which validates, broadcasts and registers the op)
# ---------------------------------------------------------------------------------------------------


def _component_constants(logits, means, log_scales, kind: str, acc: torch.dtype):
    """Host-side, once per call (K (3D + 1) numbers): ``(mu, a, b, c)`` - the means; ``exp(-l) = a * b``,
    the reference's ``inverse_scale_factors`` (b = 1 unless exp(-l) overflows); and the constants c_k."""
    mu = means.to(acc).contiguous()
    ls = log_scales.to(acc)
    cap = LOG_SCALE_CAP[acc]
    t = -ls
    t_hi = t.clamp(max=cap)
    inv_hi = torch.exp(t_hi).contiguous()
    inv_lo = torch.exp((t - t_hi).clamp(max=cap)).contiguous()
    c = torch.log_softmax(logits.to(acc), dim=-1) - ls.sum(dim=-1)
    if kind == "gaussian":
        c = c - means.shape[-1] * _HALF_LOG_2PI
    return mu, inv_hi, inv_lo, c.contiguous()


def _tiles(N: int, K: int, acc: torch.dtype):
    # float64 takes half the rows: at 64 x 32 on 4 warps the direct forward reaches 128-168 registers and
    # spills 4-8 B (sm_90, Triton 3.6 / 3.9); at 32 x 32, 78-94 registers and no spill.
    block_n = min(BLOCK_N if acc != torch.float64 else BLOCK_N // 2, next_pow2(N))
    block_k = min(BLOCK_K, next_pow2(K))
    return block_n, block_k, 4 if block_n * block_k >= 1024 else 2


def use_tensor_cores(kind: str, acc: torch.dtype, K: int) -> bool:
    """Whether :func:`shared_forward` takes the expanded (tensor-core) path: float32 Gaussians with K >=
    TC_MIN_K. float64 stays direct (no float64 tensor cores in Triton; the expansion's error would be
    cancellation-bound there too) and so do logistic components (no quadratic form)."""
    return TENSOR_CORES and kind == "gaussian" and acc == torch.float32 and K >= TC_MIN_K


def _expansion_constants(means: torch.Tensor, log_scales: torch.Tensor):
    """``(a, b, C)`` float32: ``a = exp(-2 l)``, ``b = mu a`` [K, D], ``C_k = sum_d mu^2 a`` [K], each
    computed in float64 and rounded once (K (2D + 1) numbers, so the host's error is one rounding of each)."""
    mu, ls = means.double(), log_scales.double()
    a = torch.exp(-2.0 * ls)
    return a.float().contiguous(), (mu * a).float().contiguous(), (mu * mu * a).sum(dim=-1).float().contiguous()


def shared_forward(x: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
                   kind: str, tensor_cores: bool = True) -> torch.Tensor:
    """log p(x) [N] in the accumulation dtype for x [N >= 1, D] (any strides), logits [K], means/log_scales
    [K, D]. ``tensor_cores=False`` keeps the direct form where :func:`use_tensor_cores` would expand."""
    N, D = x.shape
    K = logits.shape[-1]
    acc = acc_dtype(x.dtype)
    out = empty((N,), dtype=acc, device=x.device)
    mu, inv_hi, inv_lo, c = _component_constants(logits, means, log_scales, kind, acc)
    if tensor_cores and use_tensor_cores(kind, acc, K):
        a, bm, cq = _expansion_constants(means, log_scales)
        # tl.dot needs 16 or more along every dimension; padding rows, components and features are masked.
        block_n = max(16, min(TC_BLOCK_N, next_pow2(N)))
        block_k = max(16, min(TC_BLOCK_K, next_pow2(K)))
        block_d = max(16, min(TC_BLOCK_D, next_pow2(D)))
        tc = dict(TENSOR_CORES=True, BLOCK_D=block_d, RHO=CANCELLATION_RHO, PRECISION=TC_PRECISION)
        warps = 4
    else:
        a, bm, cq = inv_hi, inv_hi, c  # not read
        block_n, block_k, warps = _tiles(N, K, acc)
        tc = {}
    _shared_fwd_kernel[(triton.cdiv(N, block_n),)](
        x, mu, inv_hi, inv_lo, c, a, bm, cq, out, N, K, D, x.stride(0), x.stride(1),
        KIND=KIND_CODES[kind], ACC=tl_dtype(acc), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        enable_fp_fusion=FP_FUSION, **tc,
    )
    return out


def shared_backward(grad: torch.Tensor, x: torch.Tensor, logits: torch.Tensor, means: torch.Tensor,
                    log_scales: torch.Tensor, log_prob: torch.Tensor, kind: str, need_grad_x: bool = True,
                    forward_tensor_cores: bool = True):
    """Gradients ``(dx [N, D], dlogits [K], dmeans [K, D], dlog_scales [K, D])`` in the accumulation dtype
    for N >= 1 rows; dx is None unless ``need_grad_x`` (its kernel, a whole extra pass over the rows, is
    then skipped: fitting a mixture to data needs no gradient for the data). ``forward_tensor_cores``:
    whether the forward that made ``log_prob`` may have expanded (False: it is the direct form's already)."""
    N, D = x.shape
    K = logits.shape[-1]
    acc = acc_dtype(x.dtype)
    if forward_tensor_cores and use_tensor_cores(kind, acc, K):
        # The forward expanded: its log p keeps the rule, but is not, to the last ulps, the log-sum-exp of the
        # direct-form scores recomputed below, and every weight exp(score - log p) of a row would be off by
        # that difference - several times eager's gradient error (measured in NOTES). The direct log p
        # makes the weights of each row sum to 1 as eager's do.
        log_prob = shared_forward(x, logits, means, log_scales, kind, tensor_cores=False)
    mu, inv_hi, inv_lo, c = _component_constants(logits, means, log_scales, kind, acc)
    g = grad.to(acc).contiguous()
    lp = log_prob.to(acc).contiguous()
    block_n, block_k, warps = _tiles(N, K, acc)
    meta = dict(KIND=KIND_CODES[kind], ACC=tl_dtype(acc), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                enable_fp_fusion=FP_FUSION)
    gx = None
    if need_grad_x:
        gx = empty((N, D), dtype=acc, device=x.device)
        _shared_bwd_x_kernel[(triton.cdiv(N, block_n),)](
            x, mu, inv_hi, inv_lo, c, lp, g, gx, N, K, D, x.stride(0), x.stride(1), **meta)

    # The logistic parameter gradient keeps more live values per (row, component) than the Gaussian's: at
    # 64 x 32 on 4 warps ptxas caps it at 128 registers and spills 28 B (Triton 3.9, sm_90); half the rows
    # per step fit in 80 registers without a spill (occupancy 0.375).
    if kind == "logistic" and block_n > LOGISTIC_PARAMS_BLOCK_N:
        meta["BLOCK_N"] = block_n = LOGISTIC_PARAMS_BLOCK_N
    n_tiles, k_tiles = triton.cdiv(N, block_n), triton.cdiv(K, block_k)
    n_split = min(n_tiles, max(1, triton.cdiv(target_programs(x.device), k_tiles)))
    per = triton.cdiv(n_tiles, n_split)
    n_split = triton.cdiv(n_tiles, per)  # no split without rows
    ga = empty((n_split, K), dtype=acc, device=x.device)
    gm = empty((n_split, K, D), dtype=acc, device=x.device)
    gl = empty((n_split, K, D), dtype=acc, device=x.device)
    _shared_bwd_params_kernel[(k_tiles, n_split)](
        x, mu, inv_hi, inv_lo, c, lp, g, ga, gm, gl, N, K, D, x.stride(0), x.stride(1), per, **meta)
    pi = torch.softmax(logits.to(acc), dim=-1)
    return gx, ga.sum(dim=0) - pi * g.sum(), gm.sum(dim=0), gl.sum(dim=0)


#: Least occupancy (resident warps / 64) each kernel needs on a Hopper SM (sm_90) and why; the static sm_90 tier
#: (fastdensity.sm90, tests/test_sm90_compile.py) checks every launch against it.
SM90_OCCUPANCY_FLOOR = {name: (0.125, "compute-bound, not memory-bound: every x element meets all K shared "
                                      "components (FMA and MUFU pipes; the forward's expanded tiles also tensor "
                                      "cores); 8 warps (2 per scheduler) keep them issuing")
                        for name in ("_shared_fwd_kernel", "_shared_bwd_x_kernel", "_shared_bwd_params_kernel")}
