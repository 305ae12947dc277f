"""Masked linear layer that skips the all-zero tiles of its mask: ``y = x @ (W * M)^T + b``.

The math (reference: ``fastdensity/reference/masked_linear.py``), with x [M, K] (any leading dims
flattened into M), weight W [N, K], mask M [N, K] (bool or 0/1; non-zero keeps the weight) and bias [N]::

    forward    y      = x @ Wm^T + b                 Wm = where(M != 0, W, 0)
    backward   grad_x = g @ Wm                       g = dL/dy  [M, N]
               grad_W = (g^T @ x) * [M != 0]         exactly 0 wherever the mask is 0
               grad_b = sum over rows of g           (the mask gets no gradient)

MADE's masks, with degrees sorted, are block-triangular: about half of the [TILE_N x TILE_K] tiles of
the mask are entirely zero for its hidden layers. The host summarises the mask once per tile shape:

    kind[j, k] = FULL     every entry of tile (j, k) is non-zero   -> no mask read at all
                 PARTIAL  some are                                  -> mask applied elementwise
                 DEAD     none are                                  -> never visited

and orders, for every output tile j, its live input tiles "FULL first, then PARTIAL" (``order[j, :]``,
with ``count[j] = (#full, #live)``); the transposed table serves grad_x. These tables are built with a
handful of device ops (no host synchronisation) and cached per mask tensor (by identity, data pointer
and version counter, so an in-place edit of the mask rebuilds them). Writes the version counter cannot
see - into the NumPy array behind ``torch.from_numpy``, through ``.data``, a DLPack alias or a Triton
kernel - are caught on CPU, where the cache also compares the mask's contents with a copy (cheap next
to an interpreted kernel), but not on CUDA, where that comparison would cost a host synchronisation
per call: there, change a mask only through PyTorch ops on the tensor itself. The kernels then:

    forward  C[M, N] = x[M, K] @ Wm^T   program (m-tile, n-tile) loops over the live K-tiles of n-tile
    grad_x   C[M, K] = g[M, N] @ Wm     program (m-tile, k-tile) loops over the live N-tiles of k-tile
    grad_W   tile (j, k) = g[:, j]^T @ x[:, k] over all rows, masked; DEAD tiles store zeros, no loop

Forward and grad_x are the same kernel (``_masked_matmul_kernel``: C = A @ (B * mask) over a tile list)
with B = W^T or W given by strides. The FULL tiles run in a loop of their own, free of the mask load
and the select, so Triton pipelines them like a plain matmul; only PARTIAL tiles (the diagonal of a
triangular mask) pay for the mask. A masked-out weight is never multiplied in: NaN or inf stored there
does not reach the output. (A non-finite *input* x[:, k] still reaches the outputs whose tile row has
a live tile over column k, through 0 * inf; the dense reference would spread it to every output.)

fp32 operands: ``tl.dot`` on fp32 defaults to TF32 on NVIDIA GPUs (10-bit mantissa inputs), about
1e-3 relative error. The kernels follow PyTorch's own switch instead: ``input_precision="ieee"`` under
``torch.get_float32_matmul_precision() == "highest"`` (PyTorch's default, what F.linear does on fp32),
``"tf32"`` when the user has chosen "high" or "medium". bf16/fp16 use the tensor cores with fp32
accumulation; fp64 uses an exact outer-product sum over 16-wide tiles instead of ``tl.dot`` (fp64 dot
lowers only on some Triton versions and GPUs; fp64 is for verification, not speed). Under Triton's
interpreter, 16-bit tiles are widened to fp32 before ``tl.dot``: the interpreter hands bf16 tiles to
NumPy as their raw uint16 bit patterns and would multiply those (results ~1e10; a Triton limitation).

Minimum work, f = fraction of live tiles (about 0.5 + 1/(2 * tiles per side) for a MADE hidden layer),
e = bytes per element:

    forward    flops 2 M N K f     bytes  x (M K e) + live W (f N K e) + y (M N e)
    backward   flops 4 M N K f     bytes  g, x (M N e + M K e) + live W + grad_x (M K e) + grad_W (N K e)
    (plus one byte per mask entry of the PARTIAL tiles; dense cuBLAS does the same with f = 1)

Block sizes are launcher heuristics (``launch_config``), not autotuned: one tile shape per problem
serves all three kernels so that one cached tile table serves them too. Each mask tile is multiplied
in one or more steps along the reduction (``CHUNK_R`` columns for forward and grad_x, ``BLOCK_M`` rows
for grad_W), narrow enough for the operands of one step to stay in registers.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .utils import FP_FUSION, INTERPRETED, acc_dtype, empty, next_pow2, on_device_of, refuse_double_backward, tl_dtype

__all__ = [
    "INTERPRETED", "FULL", "PARTIAL", "DEAD", "LaunchConfig", "MaskTiles", "launch_config", "mask_tiles",
    "masked_linear_forward", "masked_linear_backward", "masked_linear_op",
]

# Tile kinds, in the order a tile list visits them (the values are the sort key).
FULL, PARTIAL, DEAD = 0, 1, 2
_DEAD = tl.constexpr(DEAD)
# The interpreter's tl.dot multiplies bf16 bit patterns as integers: widen its operands first there.
_WIDEN_DOT_OPERANDS = tl.constexpr(INTERPRETED)


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _mma(acc, a, b, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` for tiles a [BM, BR] and b [BR, BP], accumulating in acc's dtype."""
    if USE_DOT:
        if _WIDEN_DOT_OPERANDS:  # exact for 16-bit floats; a no-op for fp32
            a = a.to(acc.dtype)
            b = b.to(acc.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        # fp64: every product and sum in fp64 over a small 3-D tile (the launcher keeps tiles at 16).
        acc += tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
    return acc


@triton.jit
def _masked_matmul_kernel(
    a_ptr, b_ptr, mask_ptr, bias_ptr, c_ptr, order_ptr, count_ptr,
    M, P, R,
    s_am, s_ar, s_br, s_bp, s_mr, s_mp, s_bias, s_cm, s_cp, s_order,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[M, P] = A[M, R] @ (B * mask)[R, P] (+ bias[P]), visiting only the live R-tiles of each P-tile.

    ``order_ptr[p, :]`` lists the R-tile indices of P-tile p, FULL ones first; ``count_ptr[p]`` holds
    (#FULL, #FULL + #PARTIAL). B and the mask share their (r, p) indexing, given by strides. Each
    R-tile is multiplied in BLOCK_R / CHUNK_R steps of CHUNK_R columns (see ``launch_config``).
    """
    # Grouped launch order (as in Triton's matmul tutorial): GROUP_M consecutive row tiles sweep the
    # column tiles together, so the B tiles they share are still in L2 when the next row tile needs them.
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_p = tl.cdiv(P, BLOCK_P)
    per_group = GROUP_M * n_p
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_p = (pid % per_group) // group_rows

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    rr = tl.arange(0, CHUNK_R)
    m_ok = rm < M
    p_ok = rp < P
    a_rows = a_ptr + rm[:, None] * s_am
    b_cols = b_ptr + rp[None, :] * s_bp
    keep_cols = mask_ptr + rp[None, :] * s_mp
    tiles = order_ptr + pid_p.to(tl.int64) * s_order
    n_full = tl.load(count_ptr + 2 * pid_p)
    n_live = tl.load(count_ptr + 2 * pid_p + 1)

    # One flat loop over (live tile, chunk) steps, as one loop pipelines where two nested ones would not;
    # with CHUNK_R == BLOCK_R the divisions by STEPS fold away.
    STEPS: tl.constexpr = BLOCK_R // CHUNK_R
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=ACC)
    # FULL tiles: a plain matmul step, no mask traffic.
    for it in range(0, n_full * STEPS):
        r = tl.load(tiles + it // STEPS).to(tl.int64) * BLOCK_R + (it % STEPS) * CHUNK_R + rr
        r_ok = r < R
        a = tl.load(a_rows + r[None, :] * s_ar, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_cols + r[:, None] * s_br, mask=r_ok[:, None] & p_ok[None, :], other=0.0)
        acc = _mma(acc, a, b, USE_DOT, PRECISION)
    # PARTIAL tiles: zero the masked-out weights before the product (a select, not a multiply, so a
    # NaN stored under a zero of the mask stays out).
    for it in range(n_full * STEPS, n_live * STEPS):
        r = tl.load(tiles + it // STEPS).to(tl.int64) * BLOCK_R + (it % STEPS) * CHUNK_R + rr
        r_ok = r < R
        rp_ok = r_ok[:, None] & p_ok[None, :]
        a = tl.load(a_rows + r[None, :] * s_ar, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_cols + r[:, None] * s_br, mask=rp_ok, other=0.0)
        keep = tl.load(keep_cols + r[:, None] * s_mr, mask=rp_ok, other=0)
        b = tl.where(keep != 0, b, tl.zeros_like(b))
        acc = _mma(acc, a, b, USE_DOT, PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rp * s_bias, mask=p_ok, other=0.0).to(ACC)[None, :]
    c_offs = rm[:, None] * s_cm + rp[None, :] * s_cp
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & p_ok[None, :])


@triton.jit
def _masked_grad_weight_kernel(
    g_ptr, x_ptr, mask_ptr, kind_ptr, gw_ptr,
    M, N, K,
    s_gm, s_gn, s_xm, s_xk, s_mn, s_mk, s_wn, s_wk, n_k_tiles,
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_W tile (j, k) = (g[:, j-tile]^T @ x[:, k-tile]) * [mask != 0], summed over all M rows.

    One program per mask tile; ``kind_ptr`` is the contiguous [n_n_tiles, n_k_tiles] tile-kind table.
    """
    pid = tl.program_id(0)
    pid_n = pid // n_k_tiles
    pid_k = pid % n_k_tiles
    kind = tl.load(kind_ptr + pid)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = rn < N
    k_ok = rk < K

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    # A DEAD tile runs no iteration: its accumulator stays exactly 0.0, which is what it stores.
    steps = tl.where(kind == _DEAD, 0, tl.cdiv(M, BLOCK_M))
    rm = tl.arange(0, BLOCK_M).to(tl.int64)  # carried in int64: M * stride may pass 2**31
    for _ in range(0, steps):
        m_ok = rm < M
        g_t = tl.load(g_ptr + rn[:, None] * s_gn + rm[None, :] * s_gm, mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        x_t = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(acc, g_t, x_t, USE_DOT, PRECISION)
        rm += BLOCK_M

    valid = n_ok[:, None] & k_ok[None, :]
    # Once per tile, after the reduction: the masked-out entries of PARTIAL tiles become exact zeros
    # (even where g or x held NaN). For FULL and DEAD tiles this select changes nothing.
    keep = tl.load(mask_ptr + rn[:, None] * s_mn + rk[None, :] * s_mk, mask=valid, other=0)
    acc = tl.where(keep != 0, acc, tl.zeros_like(acc))
    tl.store(gw_ptr + rn[:, None] * s_wn + rk[None, :] * s_wk, acc.to(gw_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------------
# Host side: block sizes, the tile tables and their cache, launchers
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes of one problem. ``tile_n x tile_k`` is the mask tile of the tile table, which is also
    the output tile of the forward (tile_n columns), of grad_x (tile_k columns) and of grad_W.

    block_m:  rows of x (forward) or g (grad_x) per program
    chunk_r:  reduction columns per product step of forward and grad_x (None: one whole mask tile)
    gw_rows:  rows of g and x per product step of grad_W
    """

    tile_n: int
    tile_k: int
    block_m: int
    chunk_r: Optional[int]
    gw_rows: int
    use_dot: bool
    num_warps: int
    num_stages: int
    group_m: int = 8


#: Reduction steps: of fp32 IEEE products, and of the tensor cores' (bf16, fp16, TF32); see ``launch_config``.
IEEE_CHUNK = 16
MMA_CHUNK = 32


def launch_config(M: int, N: int, K: int, dtype: torch.dtype, precision: Optional[str] = None) -> LaunchConfig:
    """Heuristic block sizes. ``precision``: fp32's tl.dot
    precision, PyTorch's current choice (:func:`_fp32_precision`) when None.

    Tiles aim at ~16 per side of the mask (fine enough to follow a triangle's edge, at least 16 for
    ``tl.dot``), capped at 64 x 64. Every choice below keeps the compiled kernels out of local memory:
    the figures are ptxas' for sm_90 under Triton 3.6 and 3.9 (registers per thread; the static tier,
    ``fastdensity.sm90``, checks every launch that verify and the benchmarks make).

    * tensor cores (bf16, fp16, TF32): outputs of up to 128 rows x 64 columns over 32-wide steps
      (:data:`MMA_CHUNK`; grad_W over 32 rows), 8 warps for 64 x 64 mask tiles, 3 stages (2 for fp32,
      whose tiles take twice the bytes): at most ~200 registers, also where odd strides keep the loads
      from vectorising. Before, 128 x 128 outputs on 8 warps and 128 x 64 on 4 over whole 64-wide tiles
      reached 255 registers and spilled 0.5-1.9 KB: each thread holds the 64-bit addresses of its share
      of both operand tiles, and Triton did not pipeline the 128 x 128 loads.
    * fp32 IEEE (``torch.get_float32_matmul_precision() == "highest"``, PyTorch's default) has no
      tensor-core form: tl.dot becomes CUDA-core FMAs, and that lowering holds in registers every A and B
      element a thread needs for the whole step (a 128 x 64 output on 4 warps over a 64-wide step: 16 x 64
      of A and 64 x 4 of B, ~1300 values), which ptxas spilled as 28-37 KB of local memory per thread
      (at 32 registers). IEEE therefore multiplies 16-wide steps (:data:`IEEE_CHUNK`; Triton 3.6 rejects
      a narrower fp32 tl.dot) into outputs of at most 64 x 64 on 8 warps, unpipelined: 32-128
      registers, occupancy 0.25-1 (2 stages, or 4 warps on narrow tiles, spilled 4 bytes under 3.9).
    * fp64 keeps every tile at 16: its outer-product sum holds a [16, 16, 16] block in registers
      (grad_W sums 8 rows per step: over 16, Triton 3.6 spilled 4 bytes).
    """
    if dtype == torch.float64:
        return LaunchConfig(tile_n=16, tile_k=16, block_m=16, chunk_r=None, gw_rows=8, use_dot=False,
                            num_warps=4, num_stages=1)
    tile_n = min(max(next_pow2(N) // 16, 16), 64)
    tile_k = min(max(next_pow2(K) // 16, 16), 64)
    rows = max(next_pow2(M), 16)
    if dtype == torch.float32 and (precision or _fp32_precision()) == "ieee":
        return LaunchConfig(tile_n=tile_n, tile_k=tile_k, block_m=min(rows, 64), chunk_r=IEEE_CHUNK,
                            gw_rows=min(rows, IEEE_CHUNK), use_dot=True, num_warps=8, num_stages=1)
    return LaunchConfig(tile_n=tile_n, tile_k=tile_k, block_m=min(rows, 128), chunk_r=MMA_CHUNK,
                        gw_rows=min(rows, MMA_CHUNK), use_dot=True, num_warps=8 if tile_n * tile_k >= 64 * 64 else 4,
                        num_stages=2 if dtype == torch.float32 else 3)


def _fp32_precision() -> str:
    """tl.dot's input precision for fp32 operands, following PyTorch's matmul precision switch."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@dataclass(frozen=True)
class MaskTiles:
    """Tile summary of one mask for one tile shape.

    kind:       [nN, nK] int32, FULL / PARTIAL / DEAD per mask tile
    fwd_order:  [nN, nK] int32, per output tile: its K-tiles, FULL first, then PARTIAL, then DEAD
    fwd_count:  [nN, 2]  int32, (#FULL, #FULL + #PARTIAL) of each row of fwd_order
    bwd_order, bwd_count: the same for the transposed table (per K-tile: its N-tiles), for grad_x
    """

    tile_n: int
    tile_k: int
    kind: torch.Tensor
    fwd_order: torch.Tensor
    fwd_count: torch.Tensor
    bwd_order: torch.Tensor
    bwd_count: torch.Tensor

    @property
    def live_fraction(self) -> float:
        """Fraction of the tiles that the kernels visit (host sync: for reports, not hot paths)."""
        return (self.kind != DEAD).float().mean().item() if self.kind.numel() else 0.0


def _tile_kinds(mask: torch.Tensor, tile_n: int, tile_k: int) -> torch.Tensor:
    N, K = mask.shape
    nN, nK = triton.cdiv(N, tile_n), triton.cdiv(K, tile_k)
    padded = torch.zeros((nN * tile_n, nK * tile_k), dtype=torch.int32, device=mask.device)
    padded[:N, :K] = mask != 0
    nonzero = padded.view(nN, tile_n, nK, tile_k).sum(dim=(1, 3))
    # Entries of each tile inside the matrix (edge tiles are smaller).
    rows = (N - tile_n * torch.arange(nN, device=mask.device)).clamp(max=tile_n)
    cols = (K - tile_k * torch.arange(nK, device=mask.device)).clamp(max=tile_k)
    size = rows[:, None] * cols[None, :]
    kind = torch.where(nonzero == size, FULL, PARTIAL)
    kind = torch.where(nonzero == 0, DEAD, kind)
    return kind.to(torch.int32).contiguous()


def _tile_lists(kind: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``kind``: column indices ordered FULL, PARTIAL, DEAD (ascending within each), and
    the (#FULL, #live) counts. Sorting the key kind * n_cols + col needs no host synchronisation."""
    n_rows, n_cols = kind.shape
    col = torch.arange(n_cols, device=kind.device, dtype=torch.int64)
    order = torch.argsort(kind.to(torch.int64) * n_cols + col, dim=1).to(torch.int32)
    count = torch.stack([(kind == FULL).sum(dim=1), (kind != DEAD).sum(dim=1)], dim=1).to(torch.int32)
    return order.contiguous(), count.contiguous()


def _build_tiles(mask: torch.Tensor, tile_n: int, tile_k: int) -> MaskTiles:
    kind = _tile_kinds(mask, tile_n, tile_k)
    fwd_order, fwd_count = _tile_lists(kind)
    bwd_order, bwd_count = _tile_lists(kind.t())
    return MaskTiles(tile_n, tile_k, kind, fwd_order, fwd_count, bwd_order, bwd_count)


# (id(mask), tile_n, tile_k) -> (weakref to mask, (data_ptr, shape, stride, version), MaskTiles,
# snapshot). The weakref both proves identity (ids are reused after death) and drops the entry when the
# mask dies; the snapshot (CPU masks only) is a copy of which entries were non-zero.
_TILE_CACHE: dict = {}


def _snapshot(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """What a CPU mask's cache entry compares on every hit: a copy of ``mask != 0``. A CPU tensor may share
    memory that PyTorch does not watch (``torch.from_numpy(arr)``: editing ``arr`` bumps no version
    counter), and on CPU the comparison costs nothing next to the interpreted kernel. None on CUDA, where
    it would synchronise the host with the device on every call."""
    return (mask != 0) if mask.device.type == "cpu" else None


def mask_tiles(mask: torch.Tensor, tile_n: int, tile_k: int) -> MaskTiles:
    """The tile tables of ``mask`` [N, K] for ``tile_n x tile_k`` tiles, cached per mask tensor.

    A hit needs the same tensor object, storage, shape, strides and version counter: any in-place op
    on the mask (``mask[i] = 0``, ``copy_``, ``load_state_dict``) bumps the version and rebuilds them.
    A CPU mask must also still hold the same pattern (see :func:`_snapshot`), so writes that bypass the
    version counter rebuild them too.
    """
    if mask.is_inference():  # inference tensors carry no version counter: rebuild every time
        return _build_tiles(mask, tile_n, tile_k)
    key = (id(mask), tile_n, tile_k)
    stamp = (mask.data_ptr(), tuple(mask.shape), mask.stride(), mask._version)
    hit = _TILE_CACHE.get(key)
    if (hit is not None and hit[0]() is mask and hit[1] == stamp
            and (hit[3] is None or torch.equal(hit[3], mask != 0))):
        return hit[2]
    tiles = _build_tiles(mask, tile_n, tile_k)
    _TILE_CACHE[key] = (weakref.ref(mask, lambda _ref, key=key: _TILE_CACHE.pop(key, None)), stamp, tiles,
                        _snapshot(mask))
    return tiles


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """[..., width] as [M, width] (a view when the leading dims allow; ``-1`` fails when width is 0)."""
    return t.reshape(math.prod(t.shape[:-1]), width)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for ``dtype`` operands (ignored for 16-bit ones)."""
    return _fp32_precision() if dtype == torch.float32 else "tf32"


def _matmul_launch(a, b_strides, weight, mask, mask_strides, bias, out, order, count, P, R,
                   cfg: LaunchConfig, precision: str, block_p: int, block_r: int):
    M = a.shape[0]
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(P, block_p),)
    _masked_matmul_kernel[grid](
        a, weight, mask, out if bias is None else bias, out, order, count,
        M, P, R,
        a.stride(0), a.stride(1), *b_strides, *mask_strides, 0 if bias is None else bias.stride(0),
        out.stride(0), out.stride(1), order.stride(0),
        HAS_BIAS=bias is not None, USE_DOT=cfg.use_dot, PRECISION=precision, ACC=tl_dtype(acc_dtype(a.dtype)),
        BLOCK_M=cfg.block_m, BLOCK_P=block_p, BLOCK_R=block_r, CHUNK_R=min(cfg.chunk_r or block_r, block_r),
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
    )


def masked_linear_forward(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                          bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y [..., N] = x [..., K] @ (weight * mask)^T + bias. Inputs are validated by ``fastdensity.ops``.

    x is read through its strides when its leading dims flatten to one without a copy (``reshape``);
    weight, mask and bias through theirs (a bias such as ``params[:, 0]`` is read in place). y is
    contiguous, in x's dtype, and is the allocation itself, not a view of one: a custom op's output
    that is a view cannot be edited in place under autograd (nflows' MADE adds its context that way).
    """
    N, K = weight.shape
    x2 = _rows(x, K)
    M = x2.shape[0]
    precision = _precision(x.dtype)
    cfg = launch_config(M, N, K, x.dtype, precision)
    y = empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    if M > 0 and N > 0:  # K == 0 still launches: no live tiles, y = bias (or 0)
        tiles = mask_tiles(mask, cfg.tile_n, cfg.tile_k)
        _matmul_launch(x2, (weight.stride(1), weight.stride(0)), weight, mask, (mask.stride(1), mask.stride(0)),
                       bias, y.view(M, N), tiles.fwd_order, tiles.fwd_count, N, K, cfg, precision, cfg.tile_n,
                       cfg.tile_k)
    return y


def masked_linear_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                           need_x: bool, need_weight: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(grad_x, grad_weight)``, each None when not asked for. grad_x is x-shaped and contiguous (its own
    allocation, not a view); grad_weight [N, K] contiguous, exactly zero where the mask is zero.
    Accumulates in fp32 (fp64)."""
    N, K = weight.shape
    g2 = _rows(grad_y, N)
    x2 = _rows(x, K)
    M = x2.shape[0]
    precision = _precision(x.dtype)
    cfg = launch_config(M, N, K, x.dtype, precision)
    tiles = mask_tiles(mask, cfg.tile_n, cfg.tile_k) if N > 0 and K > 0 else None
    grad_x = grad_w = None
    if need_x:
        grad_x = empty(x.shape, dtype=x.dtype, device=x.device)
        if M > 0 and K > 0:
            if tiles is None:  # N == 0: nothing flows back
                grad_x.zero_()
            else:
                _matmul_launch(g2, (weight.stride(0), weight.stride(1)), weight, mask,
                               (mask.stride(0), mask.stride(1)), None, grad_x.view(M, K), tiles.bwd_order,
                               tiles.bwd_count, K, N, cfg, precision, cfg.tile_k, cfg.tile_n)
    if need_weight:
        grad_w = empty((N, K), dtype=weight.dtype, device=weight.device)
        if tiles is not None:
            n_k_tiles = tiles.kind.shape[1]
            _masked_grad_weight_kernel[(tiles.kind.numel(),)](
                g2, x2, mask, tiles.kind, grad_w,
                M, N, K,
                g2.stride(0), g2.stride(1), x2.stride(0), x2.stride(1), mask.stride(0), mask.stride(1),
                grad_w.stride(0), grad_w.stride(1), n_k_tiles,
                USE_DOT=cfg.use_dot, PRECISION=precision, ACC=tl_dtype(acc_dtype(x.dtype)),
                BLOCK_M=cfg.gw_rows, BLOCK_N=cfg.tile_n, BLOCK_K=cfg.tile_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
            )
    return grad_x, grad_w


# ---------------------------------------------------------------------------------------------------
# torch.library registration (see kernels/coupling.py for why custom_op rather than triton_op): two
# opaque ops with known output shapes, so torch.compile(fullgraph=True) runs through a MADE unbroken.
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdensity::masked_linear", mutates_args=())
def masked_linear_op(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    with on_device_of(x):
        return masked_linear_forward(x, weight, mask, bias)


@masked_linear_op.register_fake
def _(x, weight, mask, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fastdensity::masked_linear_backward", mutates_args=())
def masked_linear_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                              need_x: bool, need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device_of(x):
        grad_x, grad_w = masked_linear_backward(grad_y, x, weight, mask, need_x, need_weight)
    # A custom op cannot return None: an empty tensor stands for "not asked for".
    return (grad_x if grad_x is not None else x.new_empty(0),
            grad_w if grad_w is not None else weight.new_empty(0))


@masked_linear_backward_op.register_fake
def _(grad_y, x, weight, mask, need_x, need_weight):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, mask, bias = inputs
    # The inputs are all backward needs; Wm = W * M is never materialised.
    ctx.save_for_backward(x, weight, mask)


def _backward(ctx, grad_y):
    x, weight, mask = ctx.saved_tensors
    need_x, need_w, _, need_b = ctx.needs_input_grad
    grad_x = grad_w = grad_b = None
    if need_x or need_w:
        gx, gw = masked_linear_backward_op(grad_y, x, weight, mask, need_x, need_w)
        grad_x = gx if need_x else None
        grad_w = gw if need_w else None
    if need_b:
        grad_b = _rows(grad_y, weight.shape[0]).sum(0, dtype=acc_dtype(grad_y.dtype)).to(grad_y.dtype)
    return grad_x, grad_w, None, grad_b


masked_linear_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(masked_linear_backward_op, "masked_linear")


def _sm90_variants(dtype_name: str, grad_weight: bool):
    """Tiles the launcher picks for GPU-sized problems (MADE's 2048 x 2048 at batch 8192, and a narrow
    layer), under each fp32 precision, for the compile tier (tests/test_sm90_compile.py)."""
    dtype = getattr(torch, dtype_name)
    out = []
    for M, N, K in ((8192, 2048, 2048), (512, 64, 32)):
        for p in ("ieee", "tf32") if dtype == torch.float32 else ("tf32",):
            cfg = launch_config(M, N, K, dtype, p)
            options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": FP_FUSION}
            if grad_weight:
                tiles = {"BLOCK_M": cfg.gw_rows, "BLOCK_N": cfg.tile_n, "BLOCK_K": cfg.tile_k}
                out.append(({**tiles, "USE_DOT": cfg.use_dot, "PRECISION": p}, options))
            else:  # the forward (P = N, R = K) and grad_x (P = K, R = N) tilings
                for bp, br in ((cfg.tile_n, cfg.tile_k), (cfg.tile_k, cfg.tile_n)):
                    tiles = {"BLOCK_M": cfg.block_m, "BLOCK_P": bp, "BLOCK_R": br,
                             "CHUNK_R": min(cfg.chunk_r or br, br), "GROUP_M": cfg.group_m}
                    out.append(({**tiles, "USE_DOT": cfg.use_dot, "PRECISION": p}, options))
    return out


#: kernel name -> (data dtype name -> [(constexpr overrides, launch options)]): GPU-only tile configs.
SM90_VARIANTS = {
    _masked_matmul_kernel.__name__: lambda dtype_name: _sm90_variants(dtype_name, grad_weight=False),
    _masked_grad_weight_kernel.__name__: lambda dtype_name: _sm90_variants(dtype_name, grad_weight=True),
}

#: Least occupancy (resident warps / 64) each kernel needs on a Hopper SM (sm_90) and why; the static sm_90 tier
#: (fastdensity.sm90, tests/test_sm90_compile.py) checks every launch against it.
SM90_OCCUPANCY_FLOOR = {name: (0.125, "tensor-core GEMM tiles: the num_stages-deep load pipeline and the MMAs' "
                                      "own parallelism hide latency, so one 8-warp or two 4-warp blocks per SM suffice"
                                      "; the CUDA-core paths (fp32 IEEE, fp64) stay above it: "
                                      "IEEE (64 x 64 on 8 warps, unpipelined) and fp64 measure 0.25-1")
                        for name in ("_masked_matmul_kernel", "_masked_grad_weight_kernel")}
