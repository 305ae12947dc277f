"""Diagonal mixture log-likelihood (Gaussian or logistic components), fused: one pass over the data
forward, one backward, and no [B, K, D] intermediate ever stored.

The math (reference: ``fastdensity/reference/mixture.py``), for one sample x [D]::

    log p(x) = logsumexp_k (log pi_k + C_k),   log pi = logits - logsumexp(logits)
    C_k      = sum_d f(u_kd) - l_kd,           u_kd = (x_d - mu_kd) exp(-l_kd)   (exp(-l) as two factors
                                                                            where it would overflow)

    f(u)  gaussian  -u^2/2 - log(2 pi)/2      f'(u) = -u
          logistic  -|u| - 2 log(1 + e^-|u|)  f'(u) = -tanh(u/2)

Gradients, with upstream g per sample and r_k = exp(log pi_k + C_k - log p) the responsibilities
(w_k = g r_k), using that every component is location-scale (dC/dmu = -dC/dx, dc/dl = -u f'(u) - 1)::

    d/dx_d       =  sum_k w_k f'(u_kd) exp(-l_kd)
    d/dmu_kd     = -w_k f'(u_kd) exp(-l_kd)
    d/dl_kd      =  w_k (-u_kd f'(u_kd) - 1)
    d/dlogits_k  =  g (r_k - pi_k)

Forward computes the logits' normaliser of a block of rows (an online log-sum-exp over K; see
``kernels/logsumexp.py``), then walks the K components with a second one over the scores
v_k = log pi_k + C_k, and stores only log p [B]. Backward recomputes the normaliser and every score
from the inputs, rounded exactly as the forward rounded them, takes w_k = g exp(v_k - log p) with the
saved log p, and writes the gradients of the three parameters (and of x, when x requires one) in the
same pass.

Shapes and broadcasting: x [..., D], logits [..., K], means and log_scales [..., K, D]; the batch dims
broadcast. The launcher expands the four to the broadcast batch and collapses its dims into at most two
strided dims [B_out, B_in] (stride 0 where a tensor is broadcast), so per-sample parameters ([B, K, D],
mixture density networks), shared ones ([K, D]) and mixes such as per-sample parameters reused over
S draws (x [S, B, D] with means [B, K, D]) are all read in place. Layouts needing more than two batch
dims are copied to one (said so in ``_batch_view``). Gradients:

    parameter read by every row (shared: [K], [K, D]   per-program partial sums [programs, ...], summed
    broadcast by the op)                               on the host (deterministic, no atomics)
    parameter with its own row per sample (including   written per row, in place
    an expand() view: stride 0, but its own shape)
    partially broadcast (e.g. [B, K, D] over S draws)  written per row in fp32 (fp64 for fp64), then
                                                       summed over the broadcast dims on the host

Parameters shared by all rows with a large K D go to ``kernels/mixture_shared.py`` instead, whose
backward reduces over rows without per-program [K, D] partials (see ``SHARED_MIN_KD``).

Features: D <= MAX_BLOCK_D keeps a row's features in registers for the whole
component loop; longer rows loop over feature chunks (the forward sums C_k chunk by chunk; the backward
first writes w [B, K] to a scratch buffer, then walks the chunks).

Minimum traffic, B rows, e = bytes per element, per-sample parameters (shared ones add ~nothing):

    forward     read x (B D), logits (B K), means and log_scales (2 B K D); write B        ~ 2 B K D e
    backward    read those again and g, log p; write dx (B D), dlogits (B K),
                dmeans and dlog_scales (2 B K D)                                           ~ 4 B K D e
    flops       ~6 per (row, component, feature) forward and ~12 backward, 1 exp each (logistic:
                +2 transcendentals); memory-bound for per-sample parameters.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .logsumexp import LOG2E, lse_update, lse_value
from .mixture_shared import (KIND_CODES, inverse_scale, shared_backward, shared_forward, std_log_density,
                             times_inverse_scale)
from .utils import (FP_FUSION, INTERPRETED, acc_dtype, collapse_inner_dims, empty, next_pow2, on_device_of,
                    refuse_double_backward, tl_dtype)

__all__ = ["INTERPRETED", "KIND_CODES", "mixture_forward", "mixture_backward", "mixture_log_prob_op"]

#: Launcher limits (tests lower them to reach every path).
MAX_BLOCK_D = 512     # longer rows loop over feature chunks
TILE_ELEMS = 512      # rows per program = TILE_ELEMS / BLOCK_D
ELEMS_PER_THREAD = 4  # of a tile (fp64: half, in twice the warps): warps = tile / (32 ELEMS_PER_THREAD)
MAX_WARPS = 8
SHARED_MIN_KD = 512   # fully shared parameters with K * D at least this use kernels/mixture_shared.py


@triton.jit
def _standardised(x, mu_ptrs, ls_ptrs, mask, ACC: tl.constexpr):
    """``(u, l, e, big)`` for a [rows, features] tile of one component: u = (x - mu) exp(-l), with exp(-l)
    given by ``(e, big)`` (:func:`inverse_scale`) so that it stays finite where exp(-l) overflows; the
    plain product, bit for bit, everywhere else."""
    mu = tl.load(mu_ptrs, mask=mask, other=0.0).to(ACC)
    ls = tl.load(ls_ptrs, mask=mask, other=0.0).to(ACC)
    e, big = inverse_scale(ls, ACC)
    return times_inverse_scale(x - mu, e, big, ACC), ls, e, big


@triton.jit
def _component_sum(x, mu_ptrs, ls_ptrs, mask, KIND: tl.constexpr, ACC: tl.constexpr):
    """sum over the tile's features of f(u) - l: [rows] partial C_k."""
    u, ls, _, _ = _standardised(x, mu_ptrs, ls_ptrs, mask, ACC)
    f, _ = std_log_density(u, KIND)
    return tl.sum(tl.where(mask, f - ls, 0.0), axis=1)


@triton.jit
def _component_sum_chunked(x_row, mu_p, ls_p, rmask, cols, D, sx_d, sm_d, sl_d,
                           KIND: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """C_k [rows] of one component for rows longer than a tile: the features in chunks of BLOCK_D."""
    C = tl.zeros([x_row.shape[0]], ACC)
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + cols
        mask = rmask[:, None] & (dc < D)[None, :]
        xc = tl.load(x_row[:, None] + dc[None, :] * sx_d, mask=mask, other=0.0).to(ACC)
        C += _component_sum(xc, mu_p[:, None] + dc[None, :] * sm_d, ls_p[:, None] + dc[None, :] * sl_d,
                            mask, KIND, ACC)
    return C


@triton.jit
def _log_normaliser(a_row, rmask, K, sa_k, ACC: tl.constexpr):
    """logsumexp_k logits[row, k] for a block of rows (K reads per row, 1/D of the means' traffic)."""
    m = tl.full(a_row.shape, float("-inf"), ACC)
    s = tl.zeros(a_row.shape, ACC)
    a_p = a_row
    for k in range(0, K):
        m, s = lse_update(m, s, tl.load(a_p, mask=rmask, other=0.0).to(ACC))
        a_p += sa_k
    return lse_value(m, s)


@triton.jit
def _mixture_fwd_kernel(
    x_ptr, a_ptr, mu_ptr, ls_ptr, out_ptr,
    B, B_in, K, D,
    sx_o, sx_i, sx_d, sa_o, sa_i, sa_k,
    sm_o, sm_i, sm_k, sm_d, sl_o, sl_i, sl_k, sl_d,
    KIND: tl.constexpr, ACC: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    rmask = rows < B
    bo, bi = rows // B_in, rows % B_in
    x_row = x_ptr + bo * sx_o + bi * sx_i
    a_p = a_ptr + bo * sa_o + bi * sa_i  # advanced by one component per iteration
    mu_p = mu_ptr + bo * sm_o + bi * sm_i
    ls_p = ls_ptr + bo * sl_o + bi * sl_i
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    if ONE_CHUNK:
        mask = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(x_row[:, None] + cols[None, :] * sx_d, mask=mask, other=0.0).to(ACC)
    # The normaliser first, so that the scores v_k = (a_k - log_norm) + C_k are rounded exactly as the
    # backward recomputes them: exp(v_k - log p) then cancels the rounding of the dominant v_k, as
    # eager's softmax does (log p = lse(a + C) - log_norm would leave ~2 ulps of |log p| in the weights).
    log_norm = _log_normaliser(a_p, rmask, K, sa_k, ACC)
    m = tl.full([BLOCK_B], float("-inf"), ACC)
    s = tl.zeros([BLOCK_B], ACC)
    for k in range(0, K):
        a = tl.load(a_p, mask=rmask, other=0.0).to(ACC)
        if ONE_CHUNK:
            C = _component_sum(x, mu_p[:, None] + cols[None, :] * sm_d, ls_p[:, None] + cols[None, :] * sl_d,
                               mask, KIND, ACC)
        else:
            C = _component_sum_chunked(x_row, mu_p, ls_p, rmask, cols, D, sx_d, sm_d, sl_d, KIND, ACC, BLOCK_D)
        m, s = lse_update(m, s, (a - log_norm) + C)
        a_p += sa_k
        mu_p += sm_k
        ls_p += sl_k
    tl.store(out_ptr + rows, lse_value(m, s), mask=rmask)


@triton.jit
def _param_grad_store(ptr, cols, val, mask, cols_mask, SHARED: tl.constexpr):
    """Store a [rows, cols] gradient tile per row (``ptr`` [rows] points at each row's feature 0), or
    (SHARED: ``ptr`` is one pointer, the program's partial row) its column sums."""
    if SHARED:
        tl.store(ptr + cols, tl.sum(tl.where(mask, val, 0.0), axis=0).to(ptr.dtype.element_ty), mask=cols_mask)
    else:
        tl.store(ptr[:, None] + cols[None, :], val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _logit_grad_store(ptr, ga, rmask, SHARED: tl.constexpr):
    """Store component k's logit gradient [rows] per row, or (SHARED) its sum as the program's partial."""
    if SHARED:
        tl.store(ptr, tl.sum(ga, axis=0).to(ptr.dtype.element_ty))
    else:
        tl.store(ptr, ga.to(ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _feature_grads(w, u, df, e, big, gm_p, gl_p, cols, mask, dmask, SHARED_M: tl.constexpr,
                   SHARED_L: tl.constexpr, ACC: tl.constexpr):
    """Component k on a [rows, features] tile (u, f'(u), exp(-l) as (e, big)), weights w [rows]: stores the
    gradients of its means and log-scales and returns the tile's x gradient, w f'(u) exp(-l)."""
    # A component that weighs nothing in a row (w = 0: its density there underflowed, as where |u| overflows
    # to inf) contributes exactly 0 to that row's gradients, not the NaN of 0 * inf (the reference agrees).
    live = w[:, None] != 0
    dx = tl.where(live, times_inverse_scale(w[:, None] * df, e, big, ACC), 0.0)
    _param_grad_store(gm_p, cols, -dx, mask, dmask, SHARED_M)
    _param_grad_store(gl_p, cols, tl.where(live, w[:, None] * (-u * df - 1.0), 0.0), mask, dmask, SHARED_L)
    return dx


@triton.jit
def _mixture_bwd_kernel(
    x_ptr, a_ptr, mu_ptr, ls_ptr, lp_ptr, g_ptr,
    gx_ptr, ga_ptr, gm_ptr, gl_ptr, w_ptr,
    B, B_in, K, D,
    sx_o, sx_i, sx_d, sa_o, sa_i, sa_k,
    sm_o, sm_i, sm_k, sm_d, sl_o, sl_i, sl_k, sl_d,
    KIND: tl.constexpr, ACC: tl.constexpr, ONE_CHUNK: tl.constexpr, GRAD_X: tl.constexpr,
    SHARED_A: tl.constexpr, SHARED_M: tl.constexpr, SHARED_L: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradients of the parameters and, with GRAD_X, of x. gx [B, D]; ga [B, K] or, when SHARED_A, partial
    sums [programs, K]; gm, gl [B, K, D] or [programs, K, D] likewise; w [B, K] is scratch for the chunked
    path only."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    rmask = rows < B
    bo, bi = rows // B_in, rows % B_in
    x_row = x_ptr + bo * sx_o + bi * sx_i
    a_row = a_ptr + bo * sa_o + bi * sa_i
    mu_row = mu_ptr + bo * sm_o + bi * sm_i
    ls_row = ls_ptr + bo * sl_o + bi * sl_i
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    lp = tl.load(lp_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)

    log_norm = _log_normaliser(a_row, rmask, K, sa_k, ACC)  # as the forward computed it

    # Output pointers, advanced by one component per iteration.
    if SHARED_A:
        ga_base = ga_ptr + pid * K
    else:
        ga_base = ga_ptr + rows * K
    if SHARED_M:
        gm_base = gm_ptr + pid * K * D
    else:
        gm_base = gm_ptr + rows * K * D
    if SHARED_L:
        gl_base = gl_ptr + pid * K * D
    else:
        gl_base = gl_ptr + rows * K * D

    if ONE_CHUNK:
        dmask = cols < D
        mask = rmask[:, None] & dmask[None, :]
        x = tl.load(x_row[:, None] + cols[None, :] * sx_d, mask=mask, other=0.0).to(ACC)
        gx = tl.zeros([BLOCK_B, BLOCK_D], ACC)
        a_p, mu_p, ls_p = a_row, mu_row, ls_row
        ga_p, gm_p, gl_p = ga_base, gm_base, gl_base
        for k in range(0, K):
            a = tl.load(a_p, mask=rmask, other=0.0).to(ACC)
            u, ls, e, big = _standardised(x, mu_p[:, None] + cols[None, :] * sm_d,
                                          ls_p[:, None] + cols[None, :] * sl_d, mask, ACC)
            f, df = std_log_density(u, KIND)
            C = tl.sum(tl.where(mask, f - ls, 0.0), axis=1)
            log_pi = a - log_norm
            w = tl.where(rmask, g * tl.exp2((log_pi + C - lp) * LOG2E), 0.0)
            _logit_grad_store(ga_p, tl.where(rmask, w - g * tl.exp2(log_pi * LOG2E), 0.0), rmask, SHARED_A)
            dx = _feature_grads(w, u, df, e, big, gm_p, gl_p, cols, mask, dmask, SHARED_M, SHARED_L, ACC)
            if GRAD_X:
                gx += dx
            a_p += sa_k
            mu_p += sm_k
            ls_p += sl_k
            ga_p += 1
            gm_p += D
            gl_p += D
        if GRAD_X:
            tl.store(gx_ptr + rows[:, None] * D + cols[None, :], gx.to(gx_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: C_k needs every feature before w_k is known. Keep w in scratch [B, K].
        a_p, mu_p, ls_p, ga_p = a_row, mu_row, ls_row, ga_base
        w_p = w_ptr + rows * K
        for k in range(0, K):
            a = tl.load(a_p, mask=rmask, other=0.0).to(ACC)
            C = _component_sum_chunked(x_row, mu_p, ls_p, rmask, cols, D, sx_d, sm_d, sl_d, KIND, ACC, BLOCK_D)
            log_pi = a - log_norm
            w = tl.where(rmask, g * tl.exp2((log_pi + C - lp) * LOG2E), 0.0)
            _logit_grad_store(ga_p, tl.where(rmask, w - g * tl.exp2(log_pi * LOG2E), 0.0), rmask, SHARED_A)
            tl.store(w_p, w, mask=rmask)
            a_p += sa_k
            mu_p += sm_k
            ls_p += sl_k
            ga_p += 1
            w_p += 1
        # Pass 2 reads w values that other threads of this program stored.
        tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            dc = d0 + cols
            dmask = dc < D
            mask = rmask[:, None] & dmask[None, :]
            xc = tl.load(x_row[:, None] + dc[None, :] * sx_d, mask=mask, other=0.0).to(ACC)
            gx = tl.zeros([BLOCK_B, BLOCK_D], ACC)
            mu_p, ls_p = mu_row, ls_row
            gm_p, gl_p = gm_base + d0, gl_base + d0
            w_p = w_ptr + rows * K
            for k in range(0, K):
                w = tl.load(w_p, mask=rmask, other=0.0)
                u, _, e, big = _standardised(xc, mu_p[:, None] + dc[None, :] * sm_d,
                                             ls_p[:, None] + dc[None, :] * sl_d, mask, ACC)
                _, df = std_log_density(u, KIND)
                dx = _feature_grads(w, u, df, e, big, gm_p, gl_p, cols, mask, dmask, SHARED_M, SHARED_L, ACC)
                if GRAD_X:
                    gx += dx
                mu_p += sm_k
                ls_p += sl_k
                gm_p += D
                gl_p += D
                w_p += 1
            if GRAD_X:
                tl.store(gx_ptr + rows[:, None] * D + dc[None, :], gx.to(gx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _expand(x, logits, means, log_scales):
    """Broadcast batch shape, K, D and the four tensors expanded to it (views, no copies)."""
    batch = torch.broadcast_shapes(x.shape[:-1], logits.shape[:-1], means.shape[:-2], log_scales.shape[:-2])
    K, D = logits.shape[-1], x.shape[-1]
    return tuple(batch), K, D, (x.expand(*batch, D), logits.expand(*batch, K),
                                means.expand(*batch, K, D), log_scales.expand(*batch, K, D))


def _batch_view(batch, tensors):
    """Collapse the batch dims of the expanded tensors to [B_out, B_in].

    Returns ``(B, B_in, tensors, [(s_o, s_i) per tensor])``. When four layouts need more than two
    batch dims (mixed broadcasting over three or more dims), the batch is flattened with ``reshape``,
    which copies the tensors that cannot be viewed that way - correct, but it materialises them.
    """
    nb = len(batch)
    found = collapse_inner_dims((1, *batch), [(0, *t.stride()[:nb]) for t in tensors], max_dims=2)
    if found is not None:
        (b_out, b_in), per = found
        return b_out * b_in, b_in, tensors, [tuple(p) for p in per]
    B = math.prod(batch)
    flat = [t.reshape(B, *t.shape[nb:]) for t in tensors]
    return B, 1, flat, [(t.stride(0), 0) for t in flat]


def _shared_flags(strides, params, B: int, B_in: int) -> list[bool]:
    """For logits, means and log_scales: is this one parameter set, read alike by every row?

    That needs stride 0 along every batch dim with more than one index, and no batch extent of the
    tensor's own: a parameter passed as an ``expand()`` view reads the same memory in every row, but its
    gradient has the view's shape and is written row by row like a per-sample parameter's.
    """
    flags = []
    for (s_o, s_i), t, tail in zip(strides, params, (1, 2, 2)):
        same_elements = (s_o == 0 or B <= B_in) and (s_i == 0 or B_in == 1)
        flags.append(same_elements and math.prod(t.shape[:-tail]) == 1)
    return flags


def _blocks(B: int, D: int, acc: torch.dtype):
    """``(BLOCK_B, BLOCK_D, one chunk?, warps)``, the same for the forward and the backward: the backward
    recomputes each C_k summed exactly as the forward summed it, which takes the same tile and layout.

    Sized for the backward, whose component loop keeps about a dozen values per element live (x, its
    gradient, u, f'(u), exp(-l) and its overflow flag, the parameter gradients on their way out): at 4
    elements per thread its sm_90 compiles take 64-100 registers, at 8 140-180 or spill (measured with
    ptxas, both Tritons). An fp64 value takes two registers: fp64 tiles have 2 elements per thread, the
    same tile in twice the warps (at 4 per thread they take 116-140 registers, or spill a few bytes).
    Memory-bound as the kernels are, more resident warps beat wider tiles.
    """
    per_thread = ELEMS_PER_THREAD // 2 if acc == torch.float64 else ELEMS_PER_THREAD
    block_d = min(next_pow2(D), MAX_BLOCK_D)
    block_b = max(1, min(next_pow2(B), TILE_ELEMS // block_d))
    warps = max(1, min(MAX_WARPS, block_b * block_d // (32 * per_thread)))
    return block_b, block_d, D <= block_d, warps


def _use_shared_path(shared: list[bool], K: int, D: int) -> bool:
    return all(shared) and K * D >= SHARED_MIN_KD


def mixture_forward(x, logits, means, log_scales, kind: str, tensor_cores: bool = True) -> torch.Tensor:
    """log p(x) with the broadcast batch shape, in the accumulation dtype (fp32 for half, fp64 for fp64).
    ``tensor_cores=False`` keeps the shared-parameter path in the direct form (see :func:`shared_forward`)."""
    batch, K, D, expanded = _expand(x, logits, means, log_scales)
    acc = acc_dtype(x.dtype)
    B, B_in, (xe, ae, me, le), st = _batch_view(batch, expanded)
    if B == 0:
        return empty(batch, dtype=acc, device=x.device)
    if _use_shared_path(_shared_flags(st[1:], (logits, means, log_scales), B, B_in), K, D):
        return shared_forward(xe.reshape(B, D), logits.reshape(K), means.reshape(K, D),
                              log_scales.reshape(K, D), kind, tensor_cores).view(batch)
    out = empty(batch, dtype=acc, device=x.device)
    block_b, block_d, one_chunk, warps = _blocks(B, D, acc)
    _mixture_fwd_kernel[(triton.cdiv(B, block_b),)](
        xe, ae, me, le, out, B, B_in, K, D,
        *st[0], xe.stride(-1), *st[1], ae.stride(-1),
        *st[2], me.stride(-2), me.stride(-1), *st[3], le.stride(-2), le.stride(-1),
        KIND=KIND_CODES[kind], ACC=tl_dtype(acc), ONE_CHUNK=one_chunk,
        BLOCK_B=block_b, BLOCK_D=block_d, num_warps=warps, enable_fp_fusion=FP_FUSION,
    )
    return out


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a gradient over the dims ``like`` was broadcast along and cast it to ``like``'s dtype."""
    if grad.shape != like.shape:
        grad = grad.sum_to_size(like.shape)
    return grad.to(like.dtype)


def mixture_backward(grad, x, logits, means, log_scales, log_prob, kind: str, need_grad_x: bool,
                     forward_tensor_cores: bool = True):
    """Gradients ``(dx, dlogits, dmeans, dlog_scales)``, each with its input's shape and dtype; dx is None
    unless ``need_grad_x`` (x is usually data). ``forward_tensor_cores``: whether the forward that made
    ``log_prob`` was allowed the tensor-core form (if not, its direct log p is used as it is)."""
    batch, K, D, expanded = _expand(x, logits, means, log_scales)
    acc = acc_dtype(x.dtype)
    B, B_in, (xe, ae, me, le), st = _batch_view(batch, expanded)
    inputs = (x, logits, means, log_scales)
    if B == 0:
        grads = tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in inputs)
        return (grads[0] if need_grad_x else None, *grads[1:])
    g = grad.to(acc).reshape(B).contiguous()
    lp = log_prob.to(acc).reshape(B).contiguous()
    shared = _shared_flags(st[1:], inputs[1:], B, B_in)
    if _use_shared_path(shared, K, D):
        gx, *param_grads = shared_backward(g, xe.reshape(B, D), logits.reshape(K), means.reshape(K, D),
                                           log_scales.reshape(K, D), lp, kind, need_grad_x,
                                           forward_tensor_cores)
        gx = _reduce_to(gx.view(*batch, D), x) if need_grad_x else None
        return (gx, *(_reduce_to(gr.reshape(t.shape), t) for gr, t in zip(param_grads, inputs[1:])))

    block_b, block_d, one_chunk, warps = _blocks(B, D, acc)
    programs = triton.cdiv(B, block_b)
    # A per-row gradient that is final (the input has the full batch shape) is stored in the input's
    # dtype; one that is summed afterwards (partial sums, broadcast inputs) in the accumulation dtype.
    full = [e.numel() == t.numel() for e, t in zip((xe, ae, me, le), inputs)]
    dt = [acc if (i and shared[i - 1]) or not full[i] else t.dtype for i, t in enumerate(inputs)]
    gx = empty((B, D), dtype=dt[0], device=x.device) if need_grad_x else None
    ga = empty((programs if shared[0] else B, K), dtype=dt[1], device=x.device)
    gm = empty((programs if shared[1] else B, K, D), dtype=dt[2], device=x.device)
    gl = empty((programs if shared[2] else B, K, D), dtype=dt[3], device=x.device)
    w = lp if one_chunk else empty((B, K), dtype=acc, device=x.device)  # scratch of the chunked path
    _mixture_bwd_kernel[(programs,)](
        xe, ae, me, le, lp, g, gx if need_grad_x else lp, ga, gm, gl, w, B, B_in, K, D,  # lp: never written
        *st[0], xe.stride(-1), *st[1], ae.stride(-1),
        *st[2], me.stride(-2), me.stride(-1), *st[3], le.stride(-2), le.stride(-1),
        KIND=KIND_CODES[kind], ACC=tl_dtype(acc), ONE_CHUNK=one_chunk, GRAD_X=need_grad_x,
        SHARED_A=shared[0], SHARED_M=shared[1], SHARED_L=shared[2],
        BLOCK_B=block_b, BLOCK_D=block_d, num_warps=warps, enable_fp_fusion=FP_FUSION,
    )
    per_param = []
    for gr, is_sh, t, tail in zip((ga, gm, gl), shared, inputs[1:], ((K,), (K, D), (K, D))):
        gr = gr.sum(dim=0).reshape(t.shape) if is_sh else gr.view(*batch, *tail)
        per_param.append(_reduce_to(gr, t))
    return (_reduce_to(gx.view(*batch, D), x) if need_grad_x else None, *per_param)


#: Launches ``fastdensity verify``'s CPU cases never make, compiled for sm_90 by tests/test_sm90_compile.py:
#: rows longer than one tile (D > MAX_BLOCK_D), with a mix of shared and per-row parameters, and the
#: backward without the x gradient (verify always asks for it; this one keeps the recorded launch's tile).
def _chunked(dtype_name: str) -> tuple[dict, dict]:
    """The tiles and options the launcher picks for rows of 2 MAX_BLOCK_D features in ``dtype_name``."""
    block_b, block_d, _, warps = _blocks(1 << 20, 2 * MAX_BLOCK_D, acc_dtype(getattr(torch, dtype_name)))
    return ({"ONE_CHUNK": False, "BLOCK_B": block_b, "BLOCK_D": block_d},
            {"num_warps": warps, "enable_fp_fusion": FP_FUSION})


def _bwd_variants(dtype_name: str) -> list[tuple[dict, dict]]:
    tiles, options = _chunked(dtype_name)
    return [({**tiles, "SHARED_A": True, "SHARED_M": False, "SHARED_L": True}, options),
            ({"GRAD_X": False, "SHARED_A": False, "SHARED_M": True, "SHARED_L": False}, {})]


SM90_VARIANTS = {"_mixture_fwd_kernel": lambda dtype_name: [_chunked(dtype_name)],
                 "_mixture_bwd_kernel": _bwd_variants}


# ---------------------------------------------------------------------------------------------------
# torch.library registration: custom_op + register_fake + register_autograd (see kernels/coupling.py
# for why this form). One op for both component kinds and both paths (per-sample and shared).
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdensity::mixture_log_prob", mutates_args=())
def mixture_log_prob_op(x: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
                        kind: str, tensor_cores: bool = True) -> torch.Tensor:
    with on_device_of(x):
        return mixture_forward(x, logits, means, log_scales, kind, tensor_cores)


@mixture_log_prob_op.register_fake
def _(x, logits, means, log_scales, kind, tensor_cores=True):
    batch = torch.broadcast_shapes(x.shape[:-1], logits.shape[:-1], means.shape[:-2], log_scales.shape[:-2])
    return x.new_empty(batch, dtype=acc_dtype(x.dtype))


@torch.library.custom_op("fastdensity::mixture_log_prob_backward", mutates_args=())
def mixture_log_prob_backward_op(
    grad: torch.Tensor, x: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
    log_prob: torch.Tensor, kind: str, need_grad_x: bool, forward_tensor_cores: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with on_device_of(x):
        gx, *param_grads = mixture_backward(grad, x, logits, means, log_scales, log_prob, kind, need_grad_x,
                                            forward_tensor_cores)
    # A custom op cannot return None: an empty tensor stands for "x needs no gradient".
    return (gx if need_grad_x else x.new_empty(0), *param_grads)


@mixture_log_prob_backward_op.register_fake
def _(grad, x, logits, means, log_scales, log_prob, kind, need_grad_x, forward_tensor_cores=True):
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_grad_x else x.new_empty(0)
    return (gx, *(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (logits, means, log_scales)))


def _setup_context(ctx, inputs, output):
    x, logits, means, log_scales, kind, tensor_cores = inputs
    # Inputs plus the per-row result: everything else is recomputed in the backward pass.
    ctx.save_for_backward(x, logits, means, log_scales, output)
    ctx.kind, ctx.tensor_cores = kind, tensor_cores


def _backward(ctx, grad):
    x, logits, means, log_scales, log_prob = ctx.saved_tensors
    need_x = bool(ctx.needs_input_grad[0])
    gx, *param_grads = mixture_log_prob_backward_op(grad, x, logits, means, log_scales, log_prob, ctx.kind, need_x,
                                                    ctx.tensor_cores)
    return (gx if need_x else None, *param_grads, None, None)


mixture_log_prob_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(mixture_log_prob_backward_op, "the mixture log-likelihoods")

#: Least occupancy (resident warps / 64) each kernel needs on a Hopper SM (sm_90) and why; the static sm_90 tier
#: (fastdensity.sm90, tests/test_sm90_compile.py) checks every launch against it.
SM90_OCCUPANCY_FLOOR = {name: (0.25, "memory-bound with per-sample parameters (each [B, K, D] element read once "
                                     "for a few flops): 16 warps keep ~30 KB per SM in flight, as 4.8 TB/s needs")
                        for name in ("_mixture_fwd_kernel", "_mixture_bwd_kernel")}
