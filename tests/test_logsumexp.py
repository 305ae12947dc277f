"""Log-sum-exp: reference against the math and torch, kernel against the reference, GPU tier by the rule."""
from __future__ import annotations

import pytest
import torch

import fastdensity
from fastdensity import ops
from fastdensity.reference import logsumexp as ref
from fastdensity.testing import compare
from helpers import assert_compiles_like_reference, assert_kernel_matches_reference, leaves, requires_cuda

# The interpreter evaluates exp2/log2 of infinities with numpy, which warns; those values are the point.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

INF, NAN = float("inf"), float("nan")


def _special_rows(dtype=torch.float32):
    """Rows covering every non-finite case, 9 entries each (odd, so chunking leaves a ragged tail)."""
    x = torch.randn(10, 9, dtype=dtype)
    x[0] = -INF                      # all -inf -> -inf
    x[1, 4] = INF                    # one +inf -> +inf
    x[2, 8] = NAN                    # NaN -> NaN
    x[3, 0], x[3, 5] = INF, NAN      # +inf and NaN -> NaN
    x[4, :8] = -INF                  # -inf except the last entry -> that entry
    x[5, 1:] = -INF                  # -inf except the first entry
    x[6] = x[6] + 1000.0             # exp would overflow without the shift
    x[7] = x[7] - 1000.0             # exp would underflow to 0 without the shift
    x[8, ::2] = -INF                 # -inf spread over every chunk
    x[9, :5] = -INF                  # -inf first, then values near -1000: exp(0 - m) would overflow
    x[9, 5:] -= 1000.0               # if the rescale of the empty sum were not forced to 0
    return x


# ------------------------------------------------------------------------------------------------
# Reference tier
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,dim,keepdim", [((4, 7), -1, False), ((3, 5, 6), 1, True), ((5, 2), 0, False)])
def test_reference_is_log_of_sum_of_exp(shape, dim, keepdim):
    x = 3 * torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ref.logsumexp(x, dim, keepdim), torch.log(torch.exp(x).sum(dim, keepdim=keepdim)))


def test_reference_matches_torch_on_special_values():
    x = _special_rows(torch.float64).requires_grad_()
    out = ref.logsumexp(x, 1)
    expected = torch.logsumexp(x, 1)
    torch.testing.assert_close(out, expected, equal_nan=True)
    assert out[0] == -INF and out[1] == INF and out[2].isnan() and out[3].isnan()
    torch.testing.assert_close(out[6] - 1000.0, torch.logsumexp(x[6].detach() - 1000.0, 0))
    up = torch.randn(10, dtype=torch.float64)
    (g,) = torch.autograd.grad((out * up).sum(), x)
    (g_torch,) = torch.autograd.grad((expected * up).sum(), x)
    torch.testing.assert_close(g, g_torch, equal_nan=True)  # NaN exactly where torch has NaN


def test_reference_gradcheck_and_dtypes():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ref.logsumexp(t, 1), (x,))
    assert ref.logsumexp(torch.randn(3, 4).half(), -1).dtype == torch.float16
    assert ref.logsumexp(torch.randn(3, 0), 1).eq(-INF).all()


# ------------------------------------------------------------------------------------------------
# Interpreter tier
# ------------------------------------------------------------------------------------------------


def _make(base, view=None):
    def make():
        (leaf,) = leaves(base)
        return ((view(leaf) if view else leaf),), [leaf]

    return make


# (name, base shape, view of the leaf, dim, keepdim)
CASES = [
    ("single element", (1, 1), None, -1, False),
    ("many short rows per program", (37, 5), None, -1, False),
    ("long rows, chunked and split over programs", (3, 9001), None, 1, False),
    ("middle dim, rows along the contiguous axis", (4, 6, 5), None, 1, True),
    ("first dim", (6, 5), None, 0, False),
    ("4-d, keepdim", (2, 3, 4, 5), None, 2, True),
    ("transposed view", (5, 7), lambda t: t.t(), 1, False),
    ("strided slice", (4, 12), lambda t: t[:, ::3], -1, False),
    ("permuted, not collapsible: copied", (3, 4, 5), lambda t: t.permute(1, 0, 2), 2, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,shape,view,dim,keepdim", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(name, shape, view, dim, keepdim, dtype):
    fn = lambda t: ops.logsumexp(t, dim, keepdim)  # noqa: E731
    # fp32: the kernel sums in chunk order with exp2, the reference in torch's order with exp: a few
    # ulps of the result (|lse| < 12 here) and of the softmax gradients.
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    assert_kernel_matches_reference(fn, _make(3 * torch.randn(shape, dtype=dtype), view), **tol)


@pytest.mark.parametrize("shape,dim", [((3, 37), 1), ((2, 19, 3), 1), ((1, 50), 0)])
def test_kernel_tiny_chunks_and_splits(monkeypatch, shape, dim):
    """Chunks of 4 entries: online merges across chunks, rows split over programs, the combine launch."""
    from fastdensity.kernels import logsumexp as klse

    monkeypatch.setattr(klse, "MAX_BLOCK_N", 4)
    x = torch.randn(shape, dtype=torch.float64)
    assert_kernel_matches_reference(lambda t: ops.logsumexp(t, dim), _make(x))


@pytest.mark.parametrize("max_block_n", [4096, 2])
def test_kernel_special_values_match_torch(monkeypatch, max_block_n):
    from fastdensity.kernels import logsumexp as klse

    monkeypatch.setattr(klse, "MAX_BLOCK_N", max_block_n)  # 2: every special value crosses chunks and splits
    x = _special_rows().requires_grad_()
    with fastdensity.set_backend("triton"):
        out = ops.logsumexp(x, 1)
    expected = torch.logsumexp(x, 1)
    # fp32 with different summation orders: a few ulps of the result (up to |lse| ~ 1000, ulp 6e-5) and
    # of the softmax gradients (<= 1 in magnitude).
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=1e-6, atol=1e-5)
    up = torch.randn(10)
    (g,) = torch.autograd.grad((out * up).sum(), x)
    (g_torch,) = torch.autograd.grad((expected * up).sum(), x)
    torch.testing.assert_close(g, g_torch, equal_nan=True, rtol=1e-5, atol=1e-6)


def test_kernel_gradcheck():
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    with fastdensity.set_backend("triton"):
        assert torch.autograd.gradcheck(lambda t: ops.logsumexp(t, 1, True), (x,))
        assert torch.autograd.gradcheck(lambda t: ops.logsumexp(t, -1), (x,))


def test_kernel_half_input_keeps_dtype_and_fp32_accuracy():
    x = (4 * torch.randn(6, 33)).half()
    with fastdensity.set_backend("triton"):
        out = ops.logsumexp(x, -1)
    assert out.dtype == torch.float16
    # Computed in fp32 from the fp16 inputs: equal to the fp32 result rounded once to fp16.
    torch.testing.assert_close(out, torch.logsumexp(x.float(), -1).half(), rtol=0, atol=0)


def test_kernel_empty_and_scalar():
    with fastdensity.set_backend("triton"):
        assert ops.logsumexp(torch.randn(3, 0), 1).eq(-INF).all()
        assert ops.logsumexp(torch.randn(0, 4), 1).shape == (0,)
        s = torch.tensor(2.5, requires_grad=True)
        out = ops.logsumexp(s, 0)
        assert out.shape == () and out.item() == 2.5
        (g,) = torch.autograd.grad(out, s)
        assert g.item() == 1.0


def test_compile_fullgraph_runs_the_kernel():
    torch._dynamo.reset()
    w = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)

    def nll(x):  # a softmax classifier's loss, written through log-sum-exp
        logits = x @ w
        return (ops.logsumexp(logits, -1) - logits[:, 0]).mean()

    assert_compiles_like_reference(nll, (torch.randn(5, 6, dtype=torch.float64),), [w])


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input(backend):
    x = torch.randn(2, 3)
    with fastdensity.set_backend(backend):
        with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\] for x of shape \(2, 3\); got 2"):
            ops.logsumexp(x, 2)
        with pytest.raises(TypeError, match="dim must be an int; got tuple"):
            ops.logsumexp(x, (0, 1))
        with pytest.raises(ValueError, match="x must be float16, bfloat16, float32 or float64; got torch.int64"):
            ops.logsumexp(torch.ones(2, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# GPU tier
# ------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,dim", [((65536, 1024), -1), ((1024, 65536), -1), ((64, 1000, 33), 1),
                                       ((4, 2 ** 20 + 3), 1), ((257, 3), 0)])
def test_gpu_matches_fp64_reference(shape, dim, dtype):
    base = (4 * torch.randn(shape, device="cuda")).to(dtype)  # rounded inputs shared by every path

    def run(backend, cast):
        (leaf,) = leaves(cast(base))
        with fastdensity.set_backend(backend):
            out = ops.logsumexp(leaf, dim)
        up = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        (g,) = torch.autograd.grad((out.double() * up.double()).sum(), leaf)
        return out, g

    kernel = run("triton", lambda a: a)
    eager = run("reference", lambda a: a)
    ref64 = run("reference", lambda a: a.double())
    for name, k, e, r in zip(["lse", "grad_x"], kernel, eager, ref64):
        result = compare(name, k, e, r)
        assert result.passed, str(result)


@requires_cuda
@pytest.mark.gpu
def test_gpu_past_int32_offsets():
    free, _ = torch.cuda.mem_get_info()
    n = 2 ** 30 + 7  # two rows -> 2**31 + 14 elements
    if free < 12 * 2 * n:
        pytest.skip(f"needs ~{12 * 2 * n / 2**30:.0f} GiB free on the GPU, has {free / 2**30:.0f}")
    x = torch.randn(2, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with fastdensity.set_backend("triton"):
        out = ops.logsumexp(x, 1)
    (g,) = torch.autograd.grad(out.float().sum(), x)
    expected = torch.logsumexp(x[1].detach().float(), 0)
    # out is bf16 (8 significant bits: 4e-3 relative); the gradient is a bf16 rounding of exp(x - lse).
    torch.testing.assert_close(out[1].float(), expected, rtol=1e-2, atol=1e-2)
    tail = slice(n - 4096, n)
    torch.testing.assert_close(g[1, tail].float(), torch.exp(x[1, tail].detach().float() - expected),
                               rtol=2e-2, atol=1e-9)
