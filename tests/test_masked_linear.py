"""Masked linear: reference against F.linear, tile tables against brute force, kernel against the
reference (interpreter), GPU tier by the rule of fastdensity.testing."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import fastdensity
from fastdensity import ops
from fastdensity.kernels import masked_linear as kml
from fastdensity.nn import MaskedLinear
from fastdensity.reference import masked_linear as ref
from fastdensity.testing import compare
from helpers import assert_kernel_matches_reference, leaves, requires_cuda, requires_interpreter


def made_hidden_mask(n_out: int, n_in: int, features: int) -> torch.Tensor:
    """A MADE hidden-layer mask with sorted degrees: block-triangular, as MADE builds it."""
    deg_out = (torch.arange(n_out) % max(1, features - 1) + 1).sort().values
    deg_in = (torch.arange(n_in) % max(1, features - 1) + 1).sort().values
    return deg_out[:, None] >= deg_in[None, :]


def random_mask(n_out: int, n_in: int, density: float = 0.5) -> torch.Tensor:
    return torch.rand(n_out, n_in) < density


# ------------------------------------------------------------------------------------------------
# Reference tier
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float64, torch.int64])
def test_reference_is_f_linear_on_the_masked_weight(mask_dtype):
    x = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    mask = random_mask(7, 9).to(mask_dtype)
    g = torch.randn(2, 3, 7, dtype=torch.float64)
    y = ref.masked_linear(x, w, mask, b)
    grads = torch.autograd.grad(y, (x, w, b), g)
    dense = F.linear(x, w * mask.to(w.dtype), b)
    dense_grads = torch.autograd.grad(dense, (x, w, b), g)
    torch.testing.assert_close(y, dense)
    for got, want in zip(grads, dense_grads):
        torch.testing.assert_close(got, want)
    assert torch.count_nonzero(grads[1][mask == 0]) == 0


def test_reference_double_backward():
    """Second derivatives through the reference (gradgradcheck): the masking is differentiable twice."""
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    mask = random_mask(5, 6)
    assert torch.autograd.gradgradcheck(lambda x, w: ref.masked_linear(x, w, mask).pow(2), (x, w))


def test_reference_gradcheck():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    mask = random_mask(5, 6)
    assert torch.autograd.gradcheck(lambda x, w, b: ref.masked_linear(x, w, mask, b), (x, w, b))


# ------------------------------------------------------------------------------------------------
# Tile tables (host side of the kernel): against a brute-force loop
# ------------------------------------------------------------------------------------------------


def _brute_force_kinds(mask, tn, tk):
    N, K = mask.shape
    nN, nK = -(-N // tn), -(-K // tk)
    kinds = torch.empty(nN, nK, dtype=torch.int32)
    for j in range(nN):
        for k in range(nK):
            tile = mask[j * tn:(j + 1) * tn, k * tk:(k + 1) * tk] != 0
            kinds[j, k] = kml.FULL if tile.all() else (kml.DEAD if not tile.any() else kml.PARTIAL)
    return kinds


def _check_lists(kinds, order, count):
    for j in range(kinds.shape[0]):
        full = torch.nonzero(kinds[j] == kml.FULL).flatten().tolist()
        partial = torch.nonzero(kinds[j] == kml.PARTIAL).flatten().tolist()
        dead = torch.nonzero(kinds[j] == kml.DEAD).flatten().tolist()
        assert count[j].tolist() == [len(full), len(full) + len(partial)]
        assert order[j].tolist() == full + partial + dead


@pytest.mark.parametrize("shape,tiles", [((37, 53), (16, 16)), ((45, 45), (16, 32)), ((5, 70), (16, 16)),
                                         ((64, 64), (32, 16))])
def test_tile_tables_match_brute_force(shape, tiles):
    tn, tk = tiles
    mask = random_mask(*shape, density=0.3)  # interior tiles: PARTIAL
    mask[:tn, :tk] = False  # first tile: DEAD
    mask[(shape[0] - 1) // tn * tn:, (shape[1] - 1) // tk * tk:] = True  # last (ragged) tile: FULL
    kinds = _brute_force_kinds(mask, *tiles)
    assert set(kinds.flatten().tolist()) == {kml.FULL, kml.PARTIAL, kml.DEAD}
    t = kml.mask_tiles(mask, *tiles)
    assert torch.equal(t.kind, kinds)
    _check_lists(kinds, t.fwd_order, t.fwd_count)
    _check_lists(kinds.t(), t.bwd_order, t.bwd_count)
    # A float 0/1 mask gives the same tables.
    assert torch.equal(kml.mask_tiles(mask.double(), *tiles).kind, kinds)


def test_made_hidden_mask_is_half_dead():
    """The premise of the op: sorted-degree MADE masks leave about half their tiles dead."""
    t = kml.mask_tiles(made_hidden_mask(2048, 2048, 2048), 128, 64)
    assert 0.5 <= t.live_fraction <= 0.55


def test_tile_cache_hits_and_follows_in_place_edits():
    mask = random_mask(40, 40)
    first = kml.mask_tiles(mask, 16, 16)
    assert kml.mask_tiles(mask, 16, 16) is first  # cached
    assert kml.mask_tiles(mask.clone(), 16, 16) is not first  # another tensor, another entry
    mask[:16, :16] = False  # bumps the version counter
    second = kml.mask_tiles(mask, 16, 16)
    assert second is not first and second.kind[0, 0] == kml.DEAD
    key = (id(mask), 16, 16)
    assert key in kml._TILE_CACHE
    del mask
    gc.collect()
    assert key not in kml._TILE_CACHE  # the entry dies with its mask


def test_the_documented_cache_contract_is_the_implemented_one():
    """ops.masked_linear's docstring tells users when a mask edit is seen: on CPU always (the contents are
    compared on every call, as the test below checks), on CUDA only through the version counter."""
    doc = " ".join(ops.masked_linear.__doc__.split())
    assert "On CPU the cached pattern is compared with the mask's contents on every call" in doc
    assert "on CUDA, change a mask only through PyTorch ops on the tensor itself" in doc
    assert "version counter" in doc


def test_op_sees_in_place_mask_edits():
    x = torch.randn(3, 33)
    w = torch.randn(20, 33)
    mask = torch.ones(20, 33, dtype=torch.bool)
    with fastdensity.set_backend("triton"):
        y_full = ops.masked_linear(x, w, mask)
        mask[:, 16:] = False  # the cached tables said FULL here: they must be rebuilt
        y_half = ops.masked_linear(x, w, mask)
    torch.testing.assert_close(y_full, F.linear(x, w), rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(y_half, F.linear(x[:, :16], w[:, :16]), rtol=1e-5, atol=5e-5)


def test_op_sees_edits_that_bypass_the_version_counter():
    """A mask made with torch.from_numpy shares the array's memory: editing the array bumps no version
    counter, nor does a write through .data. On CPU the cache compares contents, so neither is missed."""
    import numpy as np

    x = torch.randn(3, 33)
    w = torch.randn(20, 33)
    arr = np.ones((20, 33), dtype=np.float32)
    mask = torch.from_numpy(arr)
    with fastdensity.set_backend("triton"):
        ops.masked_linear(x, w, mask)  # caches the all-FULL tables
        arr[:, 16:] = 0.0
        y_numpy_edit = ops.masked_linear(x, w, mask)
        mask.data[:5] = 0.0
        y_data_edit = ops.masked_linear(x, w, mask)
    # Tolerances: fp32 sums of 33 products (the kernel's order differs from F.linear's).
    torch.testing.assert_close(y_numpy_edit, F.linear(x[:, :16], w[:, :16]), rtol=1e-5, atol=5e-5)
    expected = F.linear(x[:, :16], w[:, :16])
    expected[:, :5] = 0.0
    torch.testing.assert_close(y_data_edit, expected, rtol=1e-5, atol=5e-5)


@requires_interpreter
def test_bf16_under_the_interpreter_matches_the_reference():
    """The interpreter's tl.dot multiplies bf16 bit patterns (values ~1e10); the kernel widens its
    operands to fp32 there, so bf16 gives the reference's answer (forward and both gradients)."""
    x = torch.randn(5, 40).bfloat16()
    w = torch.randn(24, 40).bfloat16()
    mask = made_hidden_mask(24, 40, 8)  # FULL, PARTIAL and DEAD tiles

    def inputs():
        xl, wl = leaves(x, w)
        return (xl, wl, mask), [xl, wl]

    # bf16 results: both paths accumulate in fp32 and round once to bf16 (8 bits), so they differ by at
    # most an ulp or two of the output, 2^-7 relative; sums of 40 products of N(0, 1) reach ~20.
    assert_kernel_matches_reference(ops.masked_linear, inputs, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------
# Interpreter tier: the kernels against the reference
# ------------------------------------------------------------------------------------------------

# (name, leading dims of x, in, out, mask builder, layout)
CASES = [
    ("B=1 odd sizes random mask", (1,), 37, 53, lambda n, k: random_mask(n, k), "plain"),
    ("MADE hidden mask 45x45", (6,), 45, 45, lambda n, k: made_hidden_mask(n, k, 9), "plain"),
    ("leading dims [2, 3]", (2, 3), 20, 17, lambda n, k: random_mask(n, k, 0.7), "plain"),
    ("all-zero mask rows and columns", (5,), 40, 36, None, "plain"),
    ("all-zero mask", (4,), 19, 18, lambda n, k: torch.zeros(n, k, dtype=torch.bool), "plain"),
    ("all-one mask", (3,), 21, 35, lambda n, k: torch.ones(n, k, dtype=torch.bool), "plain"),
    ("float 0/1 mask", (7,), 29, 31, lambda n, k: random_mask(n, k).float(), "plain"),
    ("in < 16, out = 1", (9,), 3, 1, lambda n, k: torch.ones(n, k, dtype=torch.bool), "plain"),
    ("transposed x, weight and mask, strided bias", (5,), 34, 18, lambda n, k: random_mask(n, k), "transposed"),
    ("no bias", (4,), 33, 17, lambda n, k: made_hidden_mask(n, k, 5), "nobias"),
]


def _zero_rows_and_cols(n, k):
    mask = random_mask(n, k, 0.6)
    mask[[0, 7, 20, 35]] = False
    mask[:, [1, 2, 17, 39]] = False
    return mask


def _make_inputs(lead, k, n, mask_fn, layout, dtype):
    mask = (mask_fn or _zero_rows_and_cols)(n, k)
    if layout == "transposed":
        base_x = torch.randn(k, *lead, dtype=dtype)
        base_w = torch.randn(k, n, dtype=dtype)
        mask = mask.t().contiguous().t()
    else:
        base_x = torch.randn(*lead, k, dtype=dtype)
        base_w = torch.randn(n, k, dtype=dtype)
    if layout == "nobias":
        base_b = None
    else:  # "transposed": the bias is a column of a wider tensor (stride 2), e.g. params[:, 0]
        base_b = torch.randn(n, 2, dtype=dtype) if layout == "transposed" else torch.randn(n, dtype=dtype)

    def make():
        x, w, b = leaves(base_x, base_w, base_b)
        xv, wv, bv = (x.movedim(0, -1), w.t(), b[:, 1]) if layout == "transposed" else (x, w, b)
        return (xv, wv, mask, bv), [t for t in (x, w, b) if t is not None]

    return make


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,lead,k,n,mask_fn,layout", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(name, lead, k, n, mask_fn, layout, dtype):
    # fp32: kernel (numpy matmul in the interpreter, tile by tile) and reference (torch) sum up to 53
    # products of O(1) values in different orders: ~1e-6 relative, a few 1e-6 absolute near zero.
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 5e-5}
    assert_kernel_matches_reference(ops.masked_linear, _make_inputs(lead, k, n, mask_fn, layout, dtype), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_weights_are_never_read_and_get_exact_zero_gradients(dtype):
    N, K = 48, 40
    mask = made_hidden_mask(N, K, 8)
    x = torch.randn(6, K, dtype=dtype, requires_grad=True)
    w = torch.randn(N, K, dtype=dtype)
    w[mask == 0] = float("nan")  # garbage under the mask must not matter
    w.requires_grad_(True)
    with fastdensity.set_backend("triton"):
        y = ops.masked_linear(x, w, mask)
        gx, gw = torch.autograd.grad(y, (x, w), torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()
    assert torch.equal(gw[mask == 0], torch.zeros_like(gw[mask == 0]))  # exact zeros, NaN-poisoned buffer
    w_clean = torch.where(mask, w.detach(), 0.0)
    torch.testing.assert_close(y, F.linear(x.detach(), w_clean), rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dead_tiles_are_skipped(dtype):
    """A NaN in input column k reaches output n exactly when mask tile (n, k) is live: the kernel never
    multiplies a dead tile (a dense product with zeros would spread the NaN to every output)."""
    N = K = 64
    mask = made_hidden_mask(N, K, 12)
    cfg = kml.launch_config(2, N, K, dtype)
    kinds = kml.mask_tiles(mask, cfg.tile_n, cfg.tile_k).kind
    w = torch.randn(N, K, dtype=dtype)
    for k in (0, K // 2, K - 1):
        x = torch.randn(2, K, dtype=dtype)
        x[:, k] = float("nan")
        with fastdensity.set_backend("triton"):
            y = ops.masked_linear(x, w, mask)
        live = kinds[torch.arange(N) // cfg.tile_n, k // cfg.tile_k] != kml.DEAD
        assert torch.equal(torch.isnan(y).all(0), live), f"column {k}"
        if k > 0:
            assert not live.all()  # the test means something only where some tiles are dead


def test_kernel_gradcheck():
    x = torch.randn(3, 19, dtype=torch.float64, requires_grad=True)
    w = torch.randn(21, 19, dtype=torch.float64, requires_grad=True)
    b = torch.randn(21, dtype=torch.float64, requires_grad=True)
    mask = made_hidden_mask(21, 19, 6)
    # fast_mode: finite differences along random directions instead of one per input element (~1000
    # interpreted launches otherwise); any wrong gradient entry still shows up in the projection.
    with fastdensity.set_backend("triton"):
        assert torch.autograd.gradcheck(lambda x, w, b: ops.masked_linear(x, w, mask, b), (x, w, b), fast_mode=True)


@requires_interpreter
def test_registration_passes_opcheck():
    """torch.library.opcheck: the schema, the autograd registration, and fake (meta) outputs with
    exactly the real outputs' shapes, dtypes and strides, also under dynamic-shape AOT tracing."""
    x = torch.randn(3, 2, 20, dtype=torch.float64).transpose(0, 1)  # leading dims that do not flatten
    x, w, b_wide = leaves(x, torch.randn(17, 20, dtype=torch.float64), torch.randn(17, 2, dtype=torch.float64))
    torch.library.opcheck(torch.ops.fastdensity.masked_linear.default, (x, w, random_mask(17, 20), b_wide[:, 1]))


@requires_interpreter
@pytest.mark.parametrize("lead", [(4,), (2, 3)])
def test_outputs_are_their_own_tensors_and_take_in_place_edits(lead):
    """The op returns the buffer it allocated, never a view of it: autograd refuses an in-place edit of a
    custom op's output that is a view (nflows' conditional MADE adds its context into a masked layer's
    output in place). The same for the backward op's grad_x."""
    x, w, b = leaves(torch.randn(*lead, 20), torch.randn(17, 20), torch.randn(17))
    mask = random_mask(17, 20)
    y = torch.ops.fastdensity.masked_linear(x, w, mask, b)
    assert y._base is None and y.shape == (*lead, 17)
    gx, gw = torch.ops.fastdensity.masked_linear_backward(torch.randn_like(y), x, w, mask, True, True)
    assert gx._base is None and gx.shape == x.shape and gw._base is None
    with fastdensity.set_backend("triton"):
        y = ops.masked_linear(x, w, mask, b)
    context = torch.randn(17, requires_grad=True)
    y += context  # what nflows' MADE does with its context
    grads = torch.autograd.grad(y.sum(), (x, w, b, context))
    want = torch.autograd.grad((ref.masked_linear(x, w, mask, b) + context).sum(), (x, w, b, context))
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("need", ["x", "weight", "bias"])
def test_only_requested_gradients(need):
    x, w, b = torch.randn(4, 20), torch.randn(17, 20), torch.randn(17)
    mask = random_mask(17, 20)
    wanted = {"x": x, "weight": w, "bias": b}[need].requires_grad_(True)
    g = torch.randn(4, 17)
    with fastdensity.set_backend("triton"):
        (got,) = torch.autograd.grad(ops.masked_linear(x, w, mask, b), (wanted,), g)
    (want,) = torch.autograd.grad(ref.masked_linear(x, w, mask, b), (wanted,), g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("shape", [(0, 12), (2, 0, 12)])
def test_empty_batch(shape):
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(5, 12, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    with fastdensity.set_backend("triton"):
        y = ops.masked_linear(x, w, random_mask(5, 12), b)
        gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert y.shape == (*shape[:-1], 5) and gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))


def test_zero_in_features_gives_the_bias():
    x = torch.randn(3, 0, requires_grad=True)
    w = torch.randn(4, 0, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    with fastdensity.set_backend("triton"):
        y = ops.masked_linear(x, w, torch.ones(4, 0, dtype=torch.bool), b)
        (gb,) = torch.autograd.grad(y.sum(), (b,))
    torch.testing.assert_close(y, b.detach().expand(3, 4))
    torch.testing.assert_close(gb, torch.full((4,), 3.0))


@pytest.mark.parametrize("precision,features", [("highest", 512), ("high", 1024)])
def test_fp32_tiles_reduced_in_chunks_match_reference(precision, features):
    """fp32 multiplies each mask tile in steps narrower than the tile (launch_config: 16 columns for
    IEEE, 32 for TF32, which the compiled kernels need to stay out of local memory); with tiles of 32
    (512 features) and 64 (1024) both paths take several steps per tile, through FULL and PARTIAL
    tiles, forward, grad_x and grad_W (over rows in steps of the same width)."""
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        M = 40  # > the grad_W row step: several steps there too
        cfg = kml.launch_config(M, features, features, torch.float32)
        assert cfg.chunk_r < min(cfg.tile_n, cfg.tile_k) and cfg.gw_rows < M
        # fp32 sums of up to 1024 products in different orders: ~1e-5 relative, 1e-4 absolute near zero.
        assert_kernel_matches_reference(
            ops.masked_linear,
            _make_inputs((M,), features, features, lambda n, k: made_hidden_mask(n, k, 9), "plain", torch.float32),
            rtol=1e-4, atol=2e-4)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_fp32_precision_follows_torch_switch():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert kml._fp32_precision() == "ieee"
        torch.set_float32_matmul_precision("high")
        assert kml._fp32_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_masked_linear_module():
    mask = made_hidden_mask(12, 10, 5)
    layer = MaskedLinear(10, 12, mask.float()).double()
    assert isinstance(layer, torch.nn.Linear)
    assert layer.mask.dtype == torch.bool and torch.equal(layer.mask, mask)  # stays bool under .double()
    assert "mask" in layer.state_dict()
    x = torch.randn(3, 10, dtype=torch.float64)
    before = layer.weight.detach().clone()
    with fastdensity.set_backend("triton"):
        y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.weight * mask, layer.bias))
    assert torch.equal(layer.weight, before)  # the weight itself is never masked in place
    # A new mask loaded in place reaches the (cached) kernel tables.
    other = MaskedLinear(10, 12, torch.ones(12, 10, dtype=torch.bool)).double()
    other.load_state_dict(layer.state_dict())
    layer.load_state_dict({**layer.state_dict(), "mask": torch.ones(12, 10, dtype=torch.bool)})
    with fastdensity.set_backend("triton"):
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        torch.testing.assert_close(other(x), y)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_inputs_name_the_argument(backend):
    x, w, mask, b = torch.randn(2, 3), torch.randn(4, 3), torch.ones(4, 3, dtype=torch.bool), torch.randn(4)
    with fastdensity.set_backend(backend):
        with pytest.raises(ValueError, match=r"mask must have weight's shape \[out, in\] = \(4, 3\); got \(3, 4\)"):
            ops.masked_linear(x, w, mask.t(), b)
        with pytest.raises(ValueError, match=r"x must have in_features = weight.shape\[1\] = 3 in its last dim; "
                                             r"got shape \(2, 5\)"):
            ops.masked_linear(torch.randn(2, 5), w, mask, b)
        with pytest.raises(ValueError, match=r"bias must have shape \[out\] = \(4,\); got \(3,\)"):
            ops.masked_linear(x, w, mask, torch.randn(3))
        with pytest.raises(ValueError, match="weight must have the same dtype as x, torch.float32; got torch.float64"):
            ops.masked_linear(x, w.double(), mask, b)
        with pytest.raises(ValueError, match="bias must have the same dtype as x"):
            ops.masked_linear(x, w, mask, b.double())
        with pytest.raises(ValueError, match="mask must be on the same device as weight, cpu; got meta"):
            ops.masked_linear(x, w, torch.empty(4, 3, device="meta"), b)
        with pytest.raises(ValueError, match="weight must have 2 dims; got shape"):
            ops.masked_linear(x, torch.randn(3), mask, b)
        with pytest.raises(ValueError, match="mask must be bool or a real 0/1 tensor"):
            ops.masked_linear(x, w, mask.to(torch.complex64), b)
        with pytest.raises(TypeError, match="mask must be a torch.Tensor; got list"):
            ops.masked_linear(x, w, [[1, 0, 1]] * 4, b)


def test_module_rejects_bad_masks():
    with pytest.raises(ValueError, match=r"mask must have shape \[out_features, in_features\] = \(4, 3\); "
                                         r"got \(3, 4\)"):
        MaskedLinear(3, 4, torch.ones(3, 4))
    with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
        MaskedLinear(3, 4, torch.full((4, 3), 0.5))


# ------------------------------------------------------------------------------------------------
# GPU tier: fp32 / bf16 / fp16 against float64 by the rule of fastdensity.testing
# ------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,k,n,mask_kind", [
    ((4096,), 2048, 2048, "made"),  # the MADE hidden layer (batch halved to keep the test short)
    ((333,), 777, 1000, "random"),  # odd sizes, random mask
    ((8, 64), 784, 1024, "made"),  # leading dims, a MADE first layer's shape
    ((257,), 512, 1536, "made_out"),  # an output layer: 3 parameters per feature
])
def test_gpu_matches_fp64_reference(lead, k, n, mask_kind, dtype):
    if mask_kind == "random":
        mask = random_mask(n, k)
    elif mask_kind == "made_out":
        deg_h = (torch.arange(k) % 511 + 1).sort().values
        mask = torch.arange(1, 513).repeat_interleave(3)[:, None] > deg_h[None, :]
    else:
        mask = made_hidden_mask(n, k, min(n, k))
    mask = mask.cuda()
    base = [(torch.randn(*lead, k) / 4).to("cuda", dtype), (torch.randn(n, k) / k ** 0.5).to("cuda", dtype),
            torch.randn(n).to("cuda", dtype)]
    upstream = torch.randn(*lead, n, device="cuda")

    def run(backend, cast):
        args = leaves(*[cast(a) for a in base])
        with fastdensity.set_backend(backend):
            y = ops.masked_linear(args[0], args[1], mask, args[2])
        grads = torch.autograd.grad((y.double() * upstream.double()).sum(), args)
        return [y, *grads]

    kernel = run("triton", lambda a: a)
    eager = run("reference", lambda a: a)
    ref64 = run("reference", lambda a: a.double())
    assert torch.count_nonzero(kernel[2][mask == 0]) == 0  # grad_weight exactly zero under the mask
    for name, kv, ev, rv in zip(["y", "grad_x", "grad_weight", "grad_bias"], kernel, eager, ref64):
        result = compare(name, kv, ev, rv)
        assert result.passed, str(result)


@requires_cuda
@pytest.mark.gpu
def test_gpu_dead_tiles_are_skipped():
    N = K = 1024
    mask = made_hidden_mask(N, K, N).cuda()
    cfg = kml.launch_config(64, N, K, torch.bfloat16)
    kinds = kml.mask_tiles(mask, cfg.tile_n, cfg.tile_k).kind.cpu()
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, K, device="cuda", dtype=torch.bfloat16)
    x[:, 700] = float("nan")
    with fastdensity.set_backend("triton"):
        y = ops.masked_linear(x, w, mask)
    live = kinds[torch.arange(N) // cfg.tile_n, 700 // cfg.tile_k] != kml.DEAD
    assert torch.equal(torch.isnan(y).all(0).cpu(), live) and not live.all()


@requires_cuda
@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    torch._dynamo.reset()
    layer = MaskedLinear(256, 384, made_hidden_mask(384, 256, 64)).cuda()
    x = torch.randn(128, 256, device="cuda")
    with fastdensity.set_backend("triton"):
        compiled = torch.compile(lambda t: torch.relu(layer(t)).sum(), fullgraph=True)
        loss = compiled(x)
        (gw,) = torch.autograd.grad(loss, (layer.weight,))
    with fastdensity.set_backend("reference"):
        loss_r = torch.relu(layer(x)).sum()
        (gw_r,) = torch.autograd.grad(loss_r, (layer.weight,))
    torch.testing.assert_close(loss, loss_r, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gw, gw_r, rtol=1e-4, atol=1e-3)


@requires_cuda
@pytest.mark.gpu
def test_gpu_past_int32_offsets():
    """x with more than 2**31 elements: int32 row offsets would wrap and corrupt the last rows."""
    K, N = 1024, 64
    M = 2 ** 31 // K + 3
    free, _ = torch.cuda.mem_get_info()
    need = 3 * M * K * 2 + (4 << 30)  # x, grad_x in bf16, a reduction temporary, headroom
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB free on the GPU, has {free / 2**30:.0f}")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(torch.bfloat16).requires_grad_(True)
    x.requires_grad_(True)
    mask = made_hidden_mask(N, K, 64).cuda()
    with fastdensity.set_backend("triton"):
        y = ops.masked_linear(x, w, mask)
    tail = slice(M - 512, M)
    y_ref = ref.masked_linear(x[tail].detach().double(), w.detach().double(), mask)
    torch.testing.assert_close(y[tail].double(), y_ref, rtol=2e-2, atol=2e-2)  # bf16 output rounding
    g = torch.zeros_like(y)
    g[tail] = 1
    gx, gw = torch.autograd.grad(y, (x, w), g)
    gx_ref = torch.ones(512, N, dtype=torch.float64, device="cuda") @ ref.masked_weight(w.detach().double(), mask)
    torch.testing.assert_close(gx[tail].double(), gx_ref, rtol=2e-2, atol=2e-2)
    gw_ref = (torch.ones(512, N, dtype=torch.float64, device="cuda").t() @ x[tail].detach().double()) * mask
    torch.testing.assert_close(gw.double(), gw_ref, rtol=2e-2, atol=1e-1)  # sums of 512 bf16 values
