"""Affine coupling: reference against the math, kernel against the reference, GPU tier by the rule."""
from __future__ import annotations

import pytest
import torch

import fastdensity
from fastdensity import ops
from fastdensity.reference import coupling as ref
from fastdensity.testing import compare
from helpers import assert_kernel_matches_reference, leaves, requires_cuda

SCALES = ["exp", "softclamp", "sigmoid", "additive"]
AFFINE = ["exp", "softclamp", "sigmoid"]


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


def _make_inputs(shape, layout, dtype, h_scale=1.0):
    """Fresh leaves: x and the conditioner output h, with shift/scale_raw as views into h."""
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

    def make():
        x, h = leaves(base_x, base_h)
        if layout == "transposed":
            xv, hv = x.transpose(1, 2), h.transpose(1, 2)
            t, s = hv[:, :, 0::2], hv[:, :, 1::2]
            return (xv, t, s), [x, h]
        t, s = (h[:, 0::2], h[:, 1::2]) if layout == "interleave" else h.chunk(2, dim=1)
        return (x, t, s), [x, h]

    return make


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


@pytest.mark.parametrize("scale", AFFINE)
def test_kernel_saturating_scales_match_reference(scale):
    # |h| up to ~60: exp overflows to inf in fp32, sigmoid saturates at 0 and 1.
    make = _make_inputs((3, 4, 5), "chunk", torch.float32, h_scale=30.0)
    fn = lambda x, t, s: ops.affine_coupling(x, t, s, scale=scale)  # noqa: E731
    assert_kernel_matches_reference(fn, make, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", ["softclamp", "sigmoid"])
@pytest.mark.parametrize("inverse", [False, True])
def test_kernel_gradcheck(scale, inverse):
    x, t, h = (torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with fastdensity.set_backend("triton"):
        assert torch.autograd.gradcheck(lambda *a: ops.affine_coupling(*a, scale=scale, inverse=inverse), (x, t, h))


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


def test_nan_inputs_propagate():
    x, t, h = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    x[0, 1] = float("nan")
    h[2, 3] = float("nan")
    with fastdensity.set_backend("triton"):
        y, logdet = ops.affine_coupling(x, t, h)
    assert torch.isnan(y[0, 1]) and torch.isnan(y[2, 3]) and torch.isnan(logdet[2])
    assert not torch.isnan(logdet[0]) and not torch.isnan(logdet[1])
    assert torch.isfinite(y[1]).all()


def test_empty_batch():
    x = torch.randn(0, 4)
    with fastdensity.set_backend("triton"):
        y, logdet = ops.affine_coupling(x, x, x)
    assert y.shape == (0, 4) and logdet.shape == (0,)


def test_compile_fullgraph_runs_the_kernel():
    """torch.compile(fullgraph=True) of a small flow through the op: no graph break, same values/grads."""
    torch._dynamo.reset()
    net = torch.nn.Linear(3, 6).double()

    def flow_nll(x):
        x1, x2 = x.chunk(2, dim=1)
        h = net(x1)
        y2, logdet = ops.affine_coupling(x2, h[:, 0::2], h[:, 1::2], scale="sigmoid")
        y1, logdet1 = ops.affine_coupling(x1, y2, -y2, scale="softclamp")
        z = torch.cat([y1, y2], dim=1)
        return (0.5 * z.pow(2).sum(1) - logdet - logdet1).mean()

    x = torch.randn(5, 6, dtype=torch.float64)
    with fastdensity.set_backend("triton"):
        compiled = torch.compile(flow_nll, fullgraph=True, backend="inductor")
        loss_c = compiled(x)
        grads_c = torch.autograd.grad(loss_c, list(net.parameters()))
    loss_r = flow_nll(x)
    grads_r = torch.autograd.grad(loss_r, list(net.parameters()))
    torch.testing.assert_close(loss_c, loss_r)
    for gc, gr in zip(grads_c, grads_r):
        torch.testing.assert_close(gc, gr)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_unknown_scale_lists_valid_names():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="'exp', 'softclamp', 'sigmoid', 'additive'.*'tanh'"):
        ops.affine_coupling(x, x, x, scale="tanh")


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
    make = _make_inputs(shape, layout, torch.float32)
    (x32, t32, s32), _ = make()
    base = [a.detach().to("cuda", dtype) for a in (x32, t32, s32)]  # rounded inputs shared by all paths

    def run(backend, cast):
        args = leaves(*[cast(a) for a in base])
        with fastdensity.set_backend(backend):
            y, ld = ops.affine_coupling(*args, scale=scale, inverse=inverse)
        gy, gl = torch.randn_like(y, dtype=torch.float64).to(y.dtype), torch.randn_like(ld)
        grads = torch.autograd.grad((y.double() * gy.double()).sum() + (ld.double() * gl.double()).sum(), args)
        return [y, ld, *grads]

    torch.manual_seed(7)
    kernel = run("triton", lambda a: a)
    torch.manual_seed(7)
    eager = run("reference", lambda a: a)
    torch.manual_seed(7)
    ref64 = run("reference", lambda a: a.double())
    for name, k, e, r in zip(["y", "logdet", "grad_x", "grad_shift", "grad_scale_raw"], kernel, eager, ref64):
        result = compare(name, k, e, r)
        assert result.passed, str(result)


@requires_cuda
@pytest.mark.gpu
def test_gpu_past_int32_offsets():
    """More than 2**31 elements: int32 offsets would wrap and corrupt the last rows."""
    free, _ = torch.cuda.mem_get_info()
    n = 2 ** 30 + 7  # two rows -> 2**31 + 14 elements
    if free < 40 * 2 * n:  # x, t, h, y, grads in bf16 plus headroom
        pytest.skip(f"needs ~{40 * 2 * n / 2**30:.0f} GiB free on the GPU, has {free / 2**30:.0f}")
    x = torch.randn(2, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(2, n, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(2, n, device="cuda", dtype=torch.bfloat16)
    with fastdensity.set_backend("triton"):
        y, logdet = ops.affine_coupling(x, t, h, scale="exp")
    (gx,) = torch.autograd.grad(y.float().sum(), x)
    tail = slice(n - 4096, n)
    y_ref, _ = ref.affine_coupling(x[1:, tail].double(), t[1:, tail].double(), h[1:, tail].double(), scale="exp")
    torch.testing.assert_close(y[1:, tail].double(), y_ref, rtol=1e-2, atol=1e-2)  # bf16 storage
    torch.testing.assert_close(gx[1:, tail].double(), h[1:, tail].double().exp(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(logdet[1], h[1].float().sum(), rtol=1e-4, atol=1e-1)
