"""Affine coupling: reference against the math, kernel against the reference, GPU tier by the rule."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdensity
from fastdensity import ops
from fastdensity.reference import coupling as ref
from fastdensity.testing import compare
from helpers import (assert_compiles_like_reference, assert_kernel_matches_reference, leaves,
                     requires_cuda, requires_interpreter)

SCALES = ["exp", "softclamp", "sigmoid", "softplus", "additive"]
AFFINE = ["exp", "softclamp", "sigmoid", "softplus"]


# ------------------------------------------------------------------------------------------------
# Reference tier: the reference against the math
# ------------------------------------------------------------------------------------------------


def test_scale_functions_match_their_definitions():
    h = torch.linspace(-6, 6, 101, dtype=torch.float64)
    s, log_s = ref.scale_and_log_scale(h, "sigmoid")
    torch.testing.assert_close(s, torch.sigmoid(h + 2) + 1e-3)  # nflows' and Glow's choice
    torch.testing.assert_close(log_s, torch.log(s))
    s, log_s = ref.scale_and_log_scale(h, "exp")
    torch.testing.assert_close(s, torch.exp(h))
    torch.testing.assert_close(log_s, h)
    s, log_s = ref.scale_and_log_scale(h, "softclamp", clamp=1.5)
    torch.testing.assert_close(log_s, 1.5 * torch.tanh(h / 1.5))
    assert log_s.abs().max() < 1.5
    s, log_s = ref.scale_and_log_scale(h, "softplus")
    torch.testing.assert_close(s, F.softplus(h) + 1e-3)  # nflows' MAF
    torch.testing.assert_close(log_s, torch.log(s))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("inverse", [False, True])
def test_reference_gradcheck(scale, inverse):
    x, t, h = (torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    args = (x, t) if scale == "additive" else (x, t, h)
    fn = lambda *a: ref.affine_coupling(*a, **({"scale_raw": None} if scale == "additive" else {}),  # noqa: E731
                                        scale=scale, inverse=inverse)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("scale", AFFINE)
def test_reference_logdet_is_log_abs_det_jacobian(scale):
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    t, h = torch.randn_like(x), 2 * torch.randn_like(x)
    y, logdet = ref.affine_coupling(x, t, h, scale=scale)
    for b in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(
            lambda xb: ref.affine_coupling(xb[None], t[b:b + 1], h[b:b + 1], scale=scale)[0][0], x[b])
        sign, logabs = torch.linalg.slogdet(jac.reshape(x[b].numel(), -1))
        assert sign != 0
        torch.testing.assert_close(logdet[b], logabs)


@pytest.mark.parametrize("scale", SCALES)
def test_reference_inverse_undoes_forward(scale):
    x, t, h = (torch.randn(4, 3, 5, 5, dtype=torch.float64) for _ in range(3))
    y, ld = ref.affine_coupling(x, t, h, scale=scale)
    x_back, ld_inv = ref.affine_coupling(y, t, h, scale=scale, inverse=True)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(ld_inv, -ld)


def test_logdet_dtype_is_fp32_for_half_inputs():
    for dtype, expected in [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        x = torch.randn(2, 8).to(dtype)
        assert ops.affine_coupling(x, x, x)[1].dtype == expected


# ------------------------------------------------------------------------------------------------
# Interpreter tier: the Triton kernel (interpreted on CPU) against the reference
# ------------------------------------------------------------------------------------------------

# (name, x shape, how shift/scale_raw are cut out of a conditioner output h)
LAYOUTS = [
    ("B=1 odd C 7x9, chunk", (1, 3, 7, 9), "chunk"),
    ("odd C, interleaved h[:, 0::2]", (2, 5, 7, 9), "interleave"),
    ("vector, many rows per program", (37, 3), "interleave"),
    ("vector, chunk", (5, 11), "chunk"),
    ("long row split over column blocks", (2, 4099), "chunk"),
    ("channels-last x and h", (2, 3, 4, 5), "channels_last"),
    ("transposed (non-contiguous) x", (3, 6, 5), "transposed"),
]


def _make_inputs(shape, layout, dtype, h_scale=1.0, device="cpu"):
    """x and the conditioner output h, drawn once in ``dtype`` on ``device``.

    ``make(as_dtype=None)`` returns fresh leaves ``[x, h]`` (cast to ``as_dtype`` if given: the same
    rounded values in float64, for the GPU tier's reference) and the op's arguments, with shift and
    scale_raw as views into h, so that gradients land in h.
    """
    C = shape[1]
    if layout == "transposed":
        base_x = torch.randn(shape[0], shape[2], shape[1], dtype=dtype)
        base_h = h_scale * torch.randn(shape[0], 2 * shape[2], shape[1], dtype=dtype)
    else:
        base_x = torch.randn(shape, dtype=dtype)
        base_h = h_scale * torch.randn((shape[0], 2 * C, *shape[2:]), dtype=dtype)
    if layout == "channels_last":
        base_x = base_x.to(memory_format=torch.channels_last)
        base_h = base_h.to(memory_format=torch.channels_last)
    base_x, base_h = base_x.to(device), base_h.to(device)

    def make(as_dtype=None):
        x, h = leaves(*(b if as_dtype is None else b.to(as_dtype) for b in (base_x, base_h)))
        if layout == "transposed":
            xv, hv = x.transpose(1, 2), h.transpose(1, 2)
            t, s = hv[:, :, 0::2], hv[:, :, 1::2]
            return (xv, t, s), [x, h]
        t, s = (h[:, 0::2], h[:, 1::2]) if layout == "interleave" else h.chunk(2, dim=1)
        return (x, t, s), [x, h]

    return make


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("name,shape,layout", LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
def test_kernel_matches_reference(name, shape, layout, scale, inverse, dtype):
    fn = lambda x, t, s: ops.affine_coupling(x, t, s, scale=scale, inverse=inverse)  # noqa: E731
    # fp32: the kernel and the reference round differently (fused vs separate ops); a log-det of up to
    # 4099 terms carries ~1e-5 relative rounding, so rtol 1e-5 with a 1e-5 floor.
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    assert_kernel_matches_reference(fn, _make_inputs(shape, layout, dtype), **tol)


# exp's inverse is left out: at |h| ~ 100 it divides by inf or 0, where the fp32 reference's autograd
# meets 0 * inf and an overflowing s**2 (NaN, inf) while the kernel's closed form gives the finite limit.
@requires_interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NumPy, inside the interpreter
@pytest.mark.parametrize("scale,inverse", [("exp", False), ("softclamp", False), ("sigmoid", False),
                                           ("softplus", False), ("softclamp", True), ("sigmoid", True),
                                           ("softplus", True)])
def test_kernel_saturating_scales_match_reference(scale, inverse):
    # h = 40 randn reaches +-100 here: exp overflows to inf in fp32, sigmoid saturates at 0 and 1,
    # softplus reaches its linear branch (u > 20) and its floor 1e-3.
    make = _make_inputs((3, 4, 5), "chunk", torch.float32, h_scale=40.0)
    fn = lambda x, t, s: ops.affine_coupling(x, t, s, scale=scale, inverse=inverse)  # noqa: E731
    assert_kernel_matches_reference(fn, make, rtol=1e-5, atol=1e-5)


@requires_interpreter
@pytest.mark.parametrize("scale", AFFINE)
@pytest.mark.parametrize("inverse", [False, True])
def test_kernel_gradcheck(scale, inverse):
    x, t, h = (torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with fastdensity.set_backend("triton"):
        assert torch.autograd.gradcheck(lambda *a: ops.affine_coupling(*a, scale=scale, inverse=inverse), (x, t, h))


@requires_interpreter
@pytest.mark.parametrize("inverse", [False, True])
def test_kernel_softplus_is_accurate_where_it_is_tiny(inverse):
    """s = softplus(u) + 1e-3 in fp32 against float64 over u in [-40, 40]. Where u << 0, softplus(u) ~ exp(u)
    sits next to the 1e-3 floor: log(1 + exp(u)) with 1 + exp(u) rounded would be off by up to 6e-8, a
    relative 6e-5 of s at u = -15; the kernel's log1p keeps every s within a few fp32 ulps."""
    u = torch.linspace(-40, 40, 4001)[None]
    want = F.softplus(u.double()) + 1e-3  # of the same fp32 values of u
    with fastdensity.set_backend("triton"):
        s, _ = ops.affine_coupling(torch.ones_like(u), torch.zeros_like(u), u, scale="softplus", inverse=inverse)
    s = 1 / s.double() if inverse else s.double()  # y = 1 * s, or 1 / s for the inverse
    # A handful of fp32 roundings (exp, log1p, the sums, the division), each 2^-24 relative: 1e-6 is
    # about 8 ulps. The naive log(1 + exp(u)) is 60 times further off at u = -15.
    torch.testing.assert_close(s, want, rtol=1e-6, atol=0)


@requires_interpreter
@pytest.mark.parametrize("inverse", [False, True])
def test_kernel_int64_offsets_match_int32_offsets(monkeypatch, inverse):
    """The WIDE launches (int64 offsets within a tile, which the launcher picks when one could pass
    2^31 - 1) give bit for bit what the int32 launches give. Forced here by lowering the limit, on strided
    views that take the (r, s) split and a backward that reads every input."""
    from fastdensity.kernels import coupling as kernel

    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, 6, requires_grad=True)
    th = torch.randn(5, 6, 4, 6, requires_grad=True)

    def run():
        with fastdensity.set_backend("triton"):
            y, logdet = ops.affine_coupling(x, th[:, 0::2], th[:, 1::2], scale="softclamp", inverse=inverse)
            grads = torch.autograd.grad((y * y).sum() + logdet.sum(), (x, th))
        return (y, logdet, *grads)

    narrow = run()
    assert not kernel._needs_wide(5, 72, 128, 3, 24, [(144, 24, 1)])
    monkeypatch.setattr(kernel, "_INT32_MAX", 0)
    assert kernel._needs_wide(5, 72, 128, 3, 24, [(144, 24, 1)])
    for got, want in zip(run(), narrow):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@requires_interpreter
def test_kernel_with_unused_logdet_or_output():
    x, t, h = (torch.randn(3, 6, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for pick in (0, 1):
        with fastdensity.set_backend("triton"):
            grads_k = torch.autograd.grad(ops.affine_coupling(x, t, h)[pick].sum(), (x, t, h), allow_unused=True)
        grads_r = torch.autograd.grad(ref.affine_coupling(x, t, h)[pick].sum(), (x, t, h), allow_unused=True)
        for gk, gr in zip(grads_k, grads_r):
            if gr is None:  # the log-det does not depend on x or shift
                assert gk is None or torch.count_nonzero(gk) == 0
            else:
                torch.testing.assert_close(gk, gr)


@requires_interpreter
def test_nan_inputs_propagate():
    x, t, h = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    x[0, 1] = float("nan")
    h[2, 3] = float("nan")
    with fastdensity.set_backend("triton"):
        y, logdet = ops.affine_coupling(x, t, h)
    assert torch.isnan(y[0, 1]) and torch.isnan(y[2, 3]) and torch.isnan(logdet[2])
    assert not torch.isnan(logdet[0]) and not torch.isnan(logdet[1])
    assert torch.isfinite(y[1]).all()


@requires_interpreter
@pytest.mark.parametrize("inverse", [False, True])
def test_empty_inputs(inverse):
    """B = 0, and zero-element views whose strides no collapse can merge: nothing to launch, right shapes."""
    odd = torch.randn(2, 4, 0, 3).permute(0, 3, 2, 1)  # [2, 3, 0, 4] with strides (12, 1, 3, 3)
    for x in (torch.randn(0, 4, requires_grad=True), odd.requires_grad_()):
        t, h = torch.randn_like(x, requires_grad=True), torch.randn_like(x, requires_grad=True)
        with fastdensity.set_backend("triton"):
            y, logdet = ops.affine_coupling(x, t, h, inverse=inverse)
        assert y.shape == x.shape and logdet.shape == (x.shape[0],) and not logdet.any()
        grads = torch.autograd.grad(y.sum() + logdet.sum(), (x, t, h))
        assert [g.shape for g in grads] == [x.shape] * 3


@requires_interpreter
def test_fake_and_autograd_registrations_match_the_kernel():
    """torch.library.opcheck: the fake implementations give the real outputs' shapes, dtypes and strides
    (channels-last in, channels-last out), the schema is honest, and autograd is registered."""
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    h = torch.randn(2, 6, 4, 5, requires_grad=True)
    for scale, inverse in (("sigmoid", False), ("exp", True), ("softplus", True), ("additive", False)):
        args = (x, h[:, 0::2], None if scale == "additive" else h[:, 1::2], scale, inverse, 2.0)
        torch.library.opcheck(torch.ops.fastdensity.affine_coupling, args)


@requires_interpreter
def test_compile_fullgraph_runs_the_kernel():
    """torch.compile(fullgraph=True) of a small flow through the op: no graph break, same values/grads."""
    net = torch.nn.Linear(3, 6).double()

    def flow_nll(x):
        x1, x2 = x.chunk(2, dim=1)
        h = net(x1)
        y2, logdet = ops.affine_coupling(x2, h[:, 0::2], h[:, 1::2], scale="sigmoid")
        y1, logdet1 = ops.affine_coupling(x1, y2, -y2, scale="softclamp")
        z = torch.cat([y1, y2], dim=1)
        return (0.5 * z.pow(2).sum(1) - logdet - logdet1).mean()

    assert_compiles_like_reference(flow_nll, (torch.randn(5, 6, dtype=torch.float64),), net.parameters())


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_unknown_scale_lists_valid_names():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="'exp', 'softclamp', 'sigmoid', 'softplus', 'additive'.*'tanh'"):
        ops.affine_coupling(x, x, x, scale="tanh")


@pytest.mark.parametrize("clamp", [0.0, -1.0, float("inf"), float("nan")])
def test_softclamp_needs_a_positive_finite_clamp(clamp):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="clamp must be a positive finite number for scale='softclamp'"):
        ops.affine_coupling(x, x, x, scale="softclamp", clamp=clamp)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("scale", ["softclamp", "exp"])
@pytest.mark.parametrize("clamp", [None, "3", True])
def test_clamp_must_be_a_real_number_on_both_backends(backend, scale, clamp):
    """clamp=None crashed inside float(); clamp="3" ran on the kernel path (float("3")) and failed in the
    reference (a tensor divided by a str). Both backends now refuse it alike, naming the argument."""
    x = torch.randn(2, 3)
    with fastdensity.set_backend(backend):
        with pytest.raises(TypeError, match=f"clamp must be a real number; got {clamp!r}"):
            ops.affine_coupling(x, x, x, scale=scale, clamp=clamp)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mismatches_name_the_tensors(backend):
    x = torch.randn(2, 3)
    with fastdensity.set_backend(backend):
        with pytest.raises(ValueError, match=r"shift must have the same shape as x, \(2, 3\); got \(2, 4\)"):
            ops.affine_coupling(x, torch.randn(2, 4), x)
        with pytest.raises(ValueError, match="scale_raw must have the same dtype as x, torch.float32; got torch.float64"):
            ops.affine_coupling(x, x, x.double())
        with pytest.raises(ValueError, match="scale_raw must be on the same device as x, cpu; got meta"):
            ops.affine_coupling(x, x, torch.empty(2, 3, device="meta"))
        with pytest.raises(ValueError, match="scale_raw is required for scale='exp'"):
            ops.affine_coupling(x, x, None, scale="exp")
        with pytest.raises(ValueError, match="x must be float16, bfloat16, float32 or float64; got torch.int64"):
            ops.affine_coupling(torch.ones(2, 3, dtype=torch.long), x, x)


def test_backend_switch_forms(monkeypatch):
    assert fastdensity.get_backend() == "auto"
    with fastdensity.set_backend("reference"):
        assert fastdensity.get_backend() == "reference"
        with fastdensity.set_backend("triton"):
            assert fastdensity.get_backend() == "triton"
        assert fastdensity.get_backend() == "reference"
    assert fastdensity.get_backend() == "auto"
    fastdensity.set_backend("reference")
    try:
        assert fastdensity.get_backend() == "reference"
    finally:
        fastdensity.set_backend("auto")
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'triton', 'reference'; got 'cuda'"):
        fastdensity.set_backend("cuda")


# ------------------------------------------------------------------------------------------------
# GPU tier: fp32 / bf16 / fp16 against float64 by the rule of fastdensity.testing
# ------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", AFFINE)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape,layout", [((256, 6, 32, 32), "chunk"), ((65536, 64), "interleave"),
                                          ((64, 6, 32, 32), "channels_last"), ((7, 3, 33, 31), "interleave")])
def test_gpu_matches_fp64_reference(shape, layout, scale, inverse, dtype):
    # Inputs drawn once in `dtype` on the GPU, shift and scale_raw cut from h there (the strided views
    # the kernel reads in place); the float64 reference gets the same rounded values.
    make = _make_inputs(shape, layout, dtype, device="cuda")
    gen = torch.Generator("cuda").manual_seed(7)
    # One upstream gradient for all three runs, in the outputs' dtypes (y: dtype, logdet: float32), so
    # the float64 reference differentiates with exactly the values the kernel and eager PyTorch see.
    gy = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    gl = torch.randn(shape[0], device="cuda", generator=gen)

    def run(backend, as_dtype=None):
        args, grad_leaves = make(as_dtype)
        with fastdensity.set_backend(backend):
            y, ld = ops.affine_coupling(*args, scale=scale, inverse=inverse)
        loss = (y.double() * gy.double()).sum() + (ld.double() * gl.double()).sum()
        return [y, ld, *torch.autograd.grad(loss, grad_leaves)]

    kernel, eager, ref64 = run("triton"), run("reference"), run("reference", torch.float64)
    for name, k, e, r in zip(["y", "logdet", "grad_x", "grad_h"], kernel, eager, ref64):
        result = compare(name, k, e, r)
        assert result.passed, str(result)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_gpu_tensors_on_another_device_than_the_current_one():
    """Triton launches on the current device; the launcher must switch to the tensors' own GPU."""
    make = _make_inputs((8, 3, 5, 7), "interleave", torch.float32, device="cuda:1")
    results = []
    for backend in ("triton", "reference"):
        args, grad_leaves = make()
        with torch.cuda.device(0), fastdensity.set_backend(backend):
            y, logdet = ops.affine_coupling(*args, scale="exp")
            results.append([y, logdet, *torch.autograd.grad(y.sum() + logdet.sum(), grad_leaves)])
    for k, r in zip(*results):
        torch.testing.assert_close(k, r)


@requires_cuda
@pytest.mark.gpu
def test_gpu_past_int32_offsets():
    """Past 2**31 elements: int32 offsets would wrap and corrupt (or fault on) the elements beyond."""
    n = 2 ** 30 + 2 ** 20 + 3  # two rows of n: the last 2**21 + 6 elements lie past offset 2**31
    tensor_bytes = 2 * n * 2  # one [2, n] bf16 tensor, 4 GiB
    # Live at the peak (the backward): x, t, h, y, grad_x and grad_scale_raw. The upstream gradient is an
    # expanded scalar (stride 0: no memory, and it checks that path too). Two tensors of headroom.
    need = 8 * tensor_bytes
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB free on the GPU, has {free / 2**30:.0f}")
    x = torch.randn(2, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(2, n, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(2, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with fastdensity.set_backend("triton"):
        y, logdet = ops.affine_coupling(x, t, h, scale="exp")
    gx, gh = torch.autograd.grad(y, (x, h), torch.ones((), device="cuda", dtype=y.dtype).expand_as(y))
    tail = slice(2 ** 31 - n - 4096, n)  # row 1 from 4096 elements before offset 2**31 to its end
    xt, tt, ht = (a[1, tail].double() for a in (x, t, h))
    y_ref, _ = ref.affine_coupling(xt, tt, ht, scale="exp")
    # bf16 storage: outputs carry up to half an ulp, 2**-9 relative.
    torch.testing.assert_close(y[1, tail].double(), y_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gx[1, tail].double(), ht.exp(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gh[1, tail].double(), xt * ht.exp(), rtol=1e-2, atol=1e-2)
    # Sums of ~1e9 bf16 draws (|sum| ~ 3e4) in two fp32 orders: rounding ~1e-3, so rtol 1e-4 is loose.
    torch.testing.assert_close(logdet, h.sum(dim=1, dtype=torch.float32), rtol=1e-4, atol=1e-1)
