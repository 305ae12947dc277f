"""Masked convolution: reference against the math, kernel and the other candidates against the reference,
the measured choice among them with injected timings, the module, bad input, and the GPU tier by the rule."""
from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastdensity
from fastdensity import autotune, ops
from fastdensity import masked_conv_impls as impls
from fastdensity.kernels import masked_conv as km
from fastdensity.nn import MaskedConv2d
from fastdensity.reference import masked_conv as ref
from fastdensity.testing import compare
from helpers import (assert_compiles_like_reference, assert_kernel_matches_reference, leaves,
                     requires_cuda, requires_interpreter)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These tests run thousands of tiny CPU convolutions, for which OpenMP's thread start-up and
    spinning cost 1000x the arithmetic on a busy 2-core machine; one thread, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _allowed_at_centre(mask_type, g_in, g_out):
    return g_in < g_out if mask_type == "A" else g_in <= g_out


def _naive_masked_conv(x, weight, bias, mask_type, color_groups, padding):
    """The definition, spelled out without any mask tensor: a sum of shifted 1x1 products over the live
    taps (rows above the centre, the centre row's left part, the centre's allowed group blocks)."""
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    cy, cx = KH // 2, KW // 2
    ph, pw = padding
    xp = F.pad(x, (pw, pw, ph, ph))
    H_out, W_out = H + 2 * ph - KH + 1, W + 2 * pw - KW + 1
    out = torch.zeros(N, C_out, H_out, W_out, dtype=x.dtype)
    gi, go = C_in // color_groups, C_out // color_groups
    for ky in range(KH):
        for kx in range(KW):
            window = xp[:, :, ky:ky + H_out, kx:kx + W_out]
            if ky < cy or (ky == cy and kx < cx):
                out += torch.einsum("oi,nihw->nohw", weight[:, :, ky, kx], window)
            elif ky == cy and kx == cx:
                for a in range(color_groups):  # output group
                    for b in range(color_groups):  # input group
                        if _allowed_at_centre(mask_type, b, a):
                            out[:, a * go:(a + 1) * go] += torch.einsum(
                                "oi,nihw->nohw", weight[a * go:(a + 1) * go, b * gi:(b + 1) * gi, ky, kx],
                                window[:, b * gi:(b + 1) * gi])
    return out if bias is None else out + bias[:, None, None]


def _jacobian_of_linear(fn, C, H, W, dtype=torch.float64):
    """J[o, i] of a linear, bias-free map of one [C, H, W] image: one batched call on the basis images."""
    D = C * H * W
    basis = torch.eye(D, dtype=dtype).view(D, C, H, W)
    out = fn(basis)
    return out.reshape(D, -1).T  # [outputs, inputs]


def _assert_autoregressive(J, C_in, C_out, H, W, mask_type, color_groups, *, exact_pattern=True, strict=False):
    """Output (pixel p, group a) depends on no later pixel, and at pixel p only on allowed groups.

    ``exact_pattern``: for one layer with a 3x3 kernel, also require every allowed dependence on the
    pixel itself and its raster neighbours within reach to be present (a conv of zeros would pass the
    first half). ``strict``: no dependence on the same pixel at all in the same or a later group
    (a stack starting with type A)."""
    J = J.reshape(C_out, H * W, C_in, H * W)
    go, gi = C_out // color_groups, C_in // color_groups
    group_out = torch.arange(C_out) // go
    group_in = torch.arange(C_in) // gi
    later = torch.arange(H * W)[None, :] > torch.arange(H * W)[:, None]  # [out pixel, in pixel]
    assert J.permute(0, 2, 1, 3)[:, :, later].abs().max() == 0, "an output depends on a later pixel"
    same = J.diagonal(dim1=1, dim2=3)  # [C_out, C_in, pixel]
    forbidden = ~_allowed_at_centre(mask_type, group_in[None, :], group_out[:, None])
    if strict:
        forbidden = group_in[None, :] >= group_out[:, None]
    if forbidden.any():
        assert same[forbidden].abs().max() == 0, "a forbidden same-pixel dependence"
    if exact_pattern:
        allowed = ~forbidden
        if allowed.any():
            assert (same[allowed] != 0).all(), "an allowed same-pixel dependence is missing"
        p = W + 1  # an interior pixel: its left and upper neighbours are within a 3x3 kernel's reach
        for q in (p - 1, p - W - 1, p - W, p - W + 1):
            assert (J[:, p, :, q] != 0).all(), f"dependence of pixel {p} on earlier pixel {q} is missing"


# ------------------------------------------------------------------------------------------------
# Reference tier: the reference against the math
# ------------------------------------------------------------------------------------------------


def test_mask_matches_its_definition():
    expected_a = torch.tensor([[1., 1., 1.], [1., 0., 0.], [0., 0., 0.]])
    torch.testing.assert_close(ref.pixelcnn_mask(2, 2, 3, 3, "A")[1, 0], expected_a)
    expected_b = expected_a.clone()
    expected_b[1, 1] = 1
    torch.testing.assert_close(ref.pixelcnn_mask(2, 2, 3, 3, "B")[0, 1], expected_b)
    # RGB with one channel per colour: R sees nothing of the current pixel (A), G sees R, B sees R and G.
    centre_a = ref.pixelcnn_mask(3, 3, 5, 5, "A", 3)[:, :, 2, 2]
    torch.testing.assert_close(centre_a, torch.tensor([[0., 0., 0.], [1., 0., 0.], [1., 1., 0.]]))
    centre_b = ref.pixelcnn_mask(3, 3, 5, 5, "B", 3)[:, :, 2, 2]
    torch.testing.assert_close(centre_b, torch.tensor([[1., 0., 0.], [1., 1., 0.], [1., 1., 1.]]))
    # Contiguous groups with several channels each: output channels 4..7 (group 1 of 3 with 4 each)
    # see input channels 0..1 (group 0 of 3 with 2 each) under A, 0..3 under B.
    m = ref.pixelcnn_mask(12, 6, 3, 5, "A", 3)
    assert m[4:8, :2, 1, 2].eq(1).all() and m[4:8, 2:, 1, 2].eq(0).all()
    assert m[:, :, 1, 3:].eq(0).all() and m[:, :, 2:].eq(0).all() and m[:, :, 0].eq(1).all()
    m = ref.pixelcnn_mask(12, 6, 3, 5, "B", 3)
    assert m[4:8, :4, 1, 2].eq(1).all() and m[4:8, 4:, 1, 2].eq(0).all()


def test_kernel_live_taps_are_the_reference_mask():
    # The kernel's own description of the live set (raster prefix + centre block) is the reference mask.
    for kh, kw, mask_type, groups in [(3, 3, "A", 1), (3, 3, "B", 1), (1, 1, "A", 1), (1, 5, "B", 3),
                                      (7, 3, "A", 3), (5, 5, "B", 3)]:
        x, w = torch.empty(1, 6, 9, 9), torch.empty(9, 6, kh, kw)
        g = km.geometry(x, w, mask_type, groups, (1, 1), (kh // 2, kw // 2), (1, 1))
        expected = ref.pixelcnn_mask(9, 6, kh, kw, mask_type, groups, dtype=torch.bool)
        assert torch.equal(km.live_mask(g, "cpu"), expected), (kh, kw, mask_type, groups)


@pytest.mark.parametrize("mask_type", ["A", "B"])
@pytest.mark.parametrize("groups,k,padding", [(1, 3, "same"), (3, 5, "same"), (3, 3, 0), (1, 7, (2, 3))])
def test_reference_is_the_sum_over_live_taps(mask_type, groups, k, padding):
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    w = torch.randn(9, 6, k, k, dtype=torch.float64)
    b = torch.randn(9, dtype=torch.float64)
    pad = ref.resolve_padding(padding, (k, k), (1, 1))
    expected = _naive_masked_conv(x, w, b, mask_type, groups, pad)
    torch.testing.assert_close(ref.masked_conv2d(x, w, b, mask_type=mask_type, color_groups=groups,
                                                 padding=padding), expected)


@pytest.mark.parametrize("mask_type,groups", [("A", 1), ("B", 1), ("A", 3), ("B", 3)])
def test_reference_is_autoregressive_through_the_jacobian(mask_type, groups):
    C, H, W = 6, 5, 5
    w = torch.randn(6, C, 3, 3, dtype=torch.float64)
    J = _jacobian_of_linear(lambda xb: ref.masked_conv2d(xb, w, mask_type=mask_type, color_groups=groups), C, H, W)
    _assert_autoregressive(J, C, 6, H, W, mask_type, groups)
    # The Jacobian by autograd agrees with the batched basis trick (the map is linear).
    x = torch.randn(C, H, W, dtype=torch.float64)
    J_ad = torch.autograd.functional.jacobian(
        lambda v: ref.masked_conv2d(v[None], w, mask_type=mask_type, color_groups=groups)[0], x)
    torch.testing.assert_close(J_ad.reshape(J.shape), J)


@pytest.mark.parametrize("groups", [1, 3])
def test_reference_stack_a_then_b_is_strictly_causal(groups):
    # The PixelCNN recipe: type A first, then any number of type B layers; the stack never sees the
    # current pixel's own or later colour groups.
    C, H, W = 3, 5, 5
    w1 = torch.randn(6, C, 3, 3, dtype=torch.float64)
    w2 = torch.randn(3, 6, 3, 3, dtype=torch.float64)

    def stack(xb):
        h = ref.masked_conv2d(xb, w1, mask_type="A", color_groups=groups)
        return ref.masked_conv2d(h, w2, mask_type="B", color_groups=groups)

    J = _jacobian_of_linear(stack, C, H, W)
    _assert_autoregressive(J, C, 3, H, W, "A", groups, exact_pattern=False, strict=True)


def test_reference_gradcheck():
    x = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ref.masked_conv2d(*a, mask_type="A", color_groups=3), (x, w, b))


def test_same_padding_keeps_the_size_for_any_dilation_and_defines_strides():
    x = torch.randn(1, 2, 9, 10)
    w = torch.randn(4, 2, 3, 5)
    assert ref.masked_conv2d(x, w, dilation=2).shape == (1, 4, 9, 10)
    assert ref.masked_conv2d(x, w, dilation=(1, 3)).shape == (1, 4, 9, 10)
    assert ref.masked_conv2d(x, w, stride=2).shape == (1, 4, 5, 5)  # F.conv2d's "same" refuses strides
    assert ref.masked_conv2d(x, w, padding="valid").shape == (1, 4, 7, 6)


# ------------------------------------------------------------------------------------------------
# Interpreter tier: the Triton kernel (interpreted on CPU) against the reference
# ------------------------------------------------------------------------------------------------

# (name, N, C_in, C_out, H, W, kernel, mask_type, color_groups, conv kwargs, layout)
CASES = [
    ("B=1 odd channels 3x3 B", 1, 5, 7, 6, 5, (3, 3), "B", 1, {}, "nchw"),
    ("1x1 B", 2, 5, 3, 4, 3, (1, 1), "B", 1, {}, "nchw"),
    ("1x1 A: nothing live, output is the bias", 2, 4, 3, 3, 3, (1, 1), "A", 1, {}, "nchw"),
    ("5x5 A RGB, groups cross channel tiles", 2, 18, 33, 5, 4, (5, 5), "A", 3, {}, "nchw"),
    ("3x3 B RGB, groups cross channel tiles", 1, 33, 18, 4, 5, (3, 3), "B", 3, {}, "nchw"),
    ("7x7 B RGB", 1, 3, 6, 8, 7, (7, 7), "B", 3, {}, "nchw"),
    ("3x5 A dilation 2", 2, 4, 5, 7, 9, (3, 5), "A", 1, {"dilation": 2}, "nchw"),
    ("stride 2, padding 1", 2, 3, 4, 7, 8, (3, 3), "B", 1, {"stride": 2, "padding": 1}, "nchw"),
    ("stride (2, 1) dilation (1, 2)", 1, 3, 6, 7, 8, (5, 3), "B", 3, {"stride": (2, 1), "dilation": (1, 2)}, "nchw"),
    ("valid padding", 2, 3, 5, 6, 7, (3, 3), "B", 1, {"padding": "valid"}, "nchw"),
    ("channels_last", 2, 6, 9, 5, 6, (3, 3), "A", 3, {}, "channels_last"),
    ("strided view of a wider tensor", 2, 5, 4, 6, 5, (5, 5), "B", 1, {}, "view"),
    ("no bias", 2, 4, 6, 5, 5, (3, 3), "B", 2, {"bias": False}, "nchw"),
]
CASE_IDS = [c[0] for c in CASES]


def _case_inputs(case, dtype):
    _, N, C_in, C_out, H, W, (kh, kw), mask_type, groups, kwargs, layout = case
    kwargs = dict(kwargs)
    has_bias = kwargs.pop("bias", True)
    if layout == "view":  # x is every other channel of a wider tensor, offset by one column
        base_x = torch.randn(N, 2 * C_in, H, W + 1, dtype=dtype)
    else:
        base_x = torch.randn(N, C_in, H, W, dtype=dtype)
        if layout == "channels_last":
            base_x = base_x.to(memory_format=torch.channels_last)
    base_w = torch.randn(C_out, C_in, kh, kw, dtype=dtype) / math.sqrt(C_in * kh * kw)
    base_b = torch.randn(C_out, dtype=dtype) if has_bias else None

    def make():
        x, w, b = leaves(base_x, base_w, base_b)
        xv = x[:, ::2, :, 1:] if layout == "view" else x
        return (xv, w, b), [t for t in (x, w, b) if t is not None]

    fn = lambda x, w, b: ops.masked_conv2d(x, w, b, mask_type=mask_type, color_groups=groups, **kwargs)  # noqa: E731
    return make, fn, kwargs, mask_type, groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernel_matches_reference(case, dtype):
    make, fn, *_ = _case_inputs(case, dtype)
    # fp32: the kernel and oneDNN sum the (up to ~300-term) reductions in different orders; values are
    # O(1), so a few 1e-6 of rounding difference is expected. fp64 keeps assert_close's defaults.
    tol = {} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    assert_kernel_matches_reference(fn, make, **tol)


@requires_interpreter
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bf16_under_the_interpreter_matches_the_reference(layout):
    """The interpreter's tl.dot multiplies bf16 bit patterns (results ~1e10); the kernels widen their
    operands to fp32 there, so bf16 gives the reference's answer: forward, grad input and grad weight,
    over full taps and a grouped centre that crosses channel tiles."""
    case = ("5x5 A RGB", 2, 18, 21, 5, 4, (5, 5), "A", 3, {}, layout)
    make, fn, *_ = _case_inputs(case, torch.bfloat16)
    # bf16 results: both paths accumulate in fp32 and round once to bf16 (8 significant bits), so they
    # differ by an ulp or two, 2^-7 relative; gradient sums reach ~10, hence the absolute floor too.
    assert_kernel_matches_reference(fn, make, rtol=2e-2, atol=2e-2)


def _run_impl(impl, args, leaves_, mask_type, groups, kwargs, upstream):
    x, w, b = args
    kh, kw = w.shape[2:]
    stride = ref.pair("stride", kwargs.get("stride", 1), minimum=1)
    dilation = ref.pair("dilation", kwargs.get("dilation", 1), minimum=1)
    padding = ref.resolve_padding(kwargs.get("padding", "same"), (kh, kw), dilation)
    out = torch.ops.fastdensity.masked_conv2d(x, w, b, mask_type, groups, list(stride), list(padding),
                                              list(dilation), impl, True)
    grads = torch.autograd.grad((out.double() * upstream).sum(), leaves_)
    return out, grads


@pytest.mark.parametrize("impl", ["dense", "split"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pytorch_candidates_match_reference(case, impl):
    """The kernel's two PyTorch alternatives are exact rearrangements of the same sums (fp64)."""
    make, fn, kwargs, mask_type, groups = _case_inputs(case, torch.float64)
    args, leaves_r = make()
    with fastdensity.set_backend("reference"):
        expected = fn(*args)
    upstream = torch.randn(expected.shape, dtype=torch.float64)
    grads_r = torch.autograd.grad((expected * upstream).sum(), leaves_r)
    args, leaves_c = make()
    out, grads = _run_impl(impl, args, leaves_c, mask_type, groups, kwargs, upstream)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if case[-1] == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()
    for g, gr in zip(grads, grads_r):
        torch.testing.assert_close(g, gr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=requires_interpreter), "dense", "split"])
def test_output_follows_the_input_memory_format(impl):
    x = torch.randn(2, 6, 5, 4).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(9, 6, 3, 3, requires_grad=True)
    out = torch.ops.fastdensity.masked_conv2d(x, w, None, "B", 3, [1, 1], [1, 1], [1, 1], impl, True)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert gx.is_contiguous(memory_format=torch.channels_last) and not gx.is_contiguous()
    out = torch.ops.fastdensity.masked_conv2d(x.contiguous(), w, None, "B", 3, [1, 1], [1, 1], [1, 1], impl, True)
    assert out.is_contiguous()


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=requires_interpreter), "dense", "split"])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("padding", [1, 0])
def test_outputs_are_their_own_tensors_and_take_in_place_edits(impl, memory_format, padding):
    """A custom op's output that is a view (a channels_last tensor made as a permuted NHWC buffer, the
    unpadded window of a padded gradient) cannot be edited in place under autograd, as a residual
    ``h += conv(h)`` does: the ops return allocations of their own."""
    x = torch.randn(2, 6, 5, 4).to(memory_format=memory_format).requires_grad_()
    w = torch.randn(9, 6, 3, 3, requires_grad=True)
    args = (x, w, None, "B", 3, [1, 1], [padding] * 2, [1, 1])
    ops_ = [torch.ops.fastdensity.masked_conv2d_triton] if impl == "triton" else []
    for op in ops_ + [lambda *a: torch.ops.fastdensity.masked_conv2d(*a, impl, True)]:
        out = op(*args)
        assert out._base is None
        out += 1.0
        gx, gw = torch.autograd.grad(out.square().sum(), (x, w))
        want = torch.autograd.grad((ref.masked_conv2d(x, w, color_groups=3, padding=padding) + 1.0).square().sum(),
                                   (x, w))
        torch.testing.assert_close(gx, want[0], rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(gw, want[1], rtol=2e-5, atol=2e-5)
    backward_op = (torch.ops.fastdensity.masked_conv2d_triton_backward if impl == "triton"
                   else lambda *a: torch.ops.fastdensity.masked_conv2d_backward(*a[:-2], impl, *a[-2:]))
    gx, gw = backward_op(torch.randn_like(out), *args[:2], *args[3:], True, True)
    assert gx._base is None and gw._base is None


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=requires_interpreter), "dense", "split"])
def test_dead_weights_get_exact_zero_gradient_and_are_never_read(impl):
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    w = torch.randn(6, 6, 5, 5)
    live = ref.pixelcnn_mask(6, 6, 5, 5, "A", 3, dtype=torch.bool)
    w_nan = torch.where(live, w, float("nan")).requires_grad_()  # poison every dead weight
    if impl == "reference":  # the CPU path of the public op must keep the same promise
        out = ref.masked_conv2d(x, w_nan, mask_type="A", color_groups=3)
    else:
        out = torch.ops.fastdensity.masked_conv2d(x, w_nan, None, "A", 3, [1, 1], [2, 2], [1, 1], impl, True)
    expected = ref.masked_conv2d(x.detach(), w, mask_type="A", color_groups=3)
    torch.testing.assert_close(out.detach(), expected, rtol=2e-5, atol=2e-5)
    gx, gw = torch.autograd.grad((out * torch.randn_like(out)).sum(), (x, w_nan))
    assert torch.isfinite(gx).all()
    assert torch.equal(gw[~live], torch.zeros_like(gw[~live]))  # exactly zero, not just small
    assert (gw[live] != 0).all()


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=requires_interpreter), "dense", "split"])
def test_tap_major_weight_is_read_never_written(impl):
    # A weight whose memory is [KH, KW, C_out, C_in] (e.g. converted from a framework that stores HWOI)
    # already has the layout of the kernel's packed live taps. Packing must still copy it: zeroing the
    # forbidden centre pairs in place would write into the caller's parameter.
    hwoi = torch.randn(3, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    before = hwoi.detach().clone()
    w = hwoi.permute(2, 3, 0, 1)
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    out = torch.ops.fastdensity.masked_conv2d(x, w, None, "A", 3, [1, 1], [1, 1], [1, 1], impl, True)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), (x, hwoi))
    assert torch.equal(hwoi.detach(), before), "the op wrote into its weight"
    x_r, w_r = leaves(x, before.permute(2, 3, 0, 1).contiguous())
    out_r = ref.masked_conv2d(x_r, w_r, mask_type="A", color_groups=3)
    grads_r = torch.autograd.grad((out_r * upstream).sum(), (x_r, w_r))
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(grads[0], grads_r[0])
    torch.testing.assert_close(grads[1], grads_r[1].permute(2, 3, 0, 1))


def test_launchers_refuse_samples_past_int32_offsets():
    # One sample of 4 x 2**16 x 2**15 = 2**33 elements: offsets within a sample are int32 in the kernels,
    # so every launcher must refuse it rather than wrap (meta tensors: nothing is allocated or run).
    x = torch.empty(1, 4, 2**16, 2**15, device="meta")
    w = torch.empty(4, 4, 3, 3, device="meta")
    g = km.geometry(x, w, "B", 1, (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="int32 offsets; this one spans 8589934592 elements"):
        km.triton_forward(x, w, None, g)
    for need_x, need_w in ((True, False), (False, True)):
        with pytest.raises(ValueError, match="int32 offsets"):
            km.triton_backward(torch.empty_like(x), x, w, g, need_x, need_w)


def test_grad_weight_split_into_partial_sums(monkeypatch):
    # On a GPU the pixel sum of grad-weight is split to fill the machine; force that path here.
    monkeypatch.setattr(km, "GRAD_WEIGHT_SPLIT", 3)
    make, fn, *_ = _case_inputs(CASES[3], torch.float64)  # 5x5 A RGB across channel tiles
    assert_kernel_matches_reference(fn, make)


@pytest.mark.parametrize("kind", ["fwd", "bwd_input", "bwd_weight"])
def test_autotune_list_is_pruned_to_the_shapes_a_launch_compiles_in(kind):
    """On a GPU each launch tries only the tiles that stay out of local memory for it (_gemm_shapes):
    the wide tensor-core tiles for channel counts that are multiples of 16, the narrow one otherwise
    and for fp32 IEEE products (bf16's PRECISION is "ieee" too, and means nothing there); fp64 its own."""
    names = km._KERNELS[kind][1]

    def tried(family, c_in, c_out, precision):
        configs = km._gemm_configs(family, *names)
        kept = km._pruner(family, names)(configs, {"C_in": c_in, "C_out": c_out}, PRECISION=precision)
        return [(c.kwargs[names[0]], c.kwargs[names[1]], c.kwargs[names[2]], c.num_warps, c.num_stages) for c in kept]

    for family in (torch.float16, torch.float32):
        wide, narrow = km._gemm_shapes(family, narrow=False), km._gemm_shapes(family, narrow=True)
        assert not set(wide) & set(narrow)
        precision = "tf32" if family == torch.float32 else "ieee"
        assert tried(family, 64, 128, precision) == wide
        assert tried(family, 30, 45, precision) == tried(family, 4, 64, precision) == narrow
    assert tried(torch.float32, 64, 128, "ieee") == km._gemm_shapes(torch.float32, narrow=True)
    assert tried(torch.float64, 64, 128, "ieee") == tried(torch.float64, 30, 45, "ieee") == [(32, 32, 4, 4, 1)]


def test_kernel_with_larger_tiles(monkeypatch):
    # One tile covering every channel and K-chunk longer than C_in: the other extreme of the bounds.
    monkeypatch.setitem(km.INTERPRETER_BLOCKS, "fwd", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64})
    monkeypatch.setitem(km.INTERPRETER_BLOCKS, "bwd_input", {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32})
    monkeypatch.setitem(km.INTERPRETER_BLOCKS, "bwd_weight", {"BLOCK_CI": 64, "BLOCK_CO": 32, "BLOCK_P": 16})
    for case in (CASES[3], CASES[4]):
        make, fn, *_ = _case_inputs(case, torch.float64)
        assert_kernel_matches_reference(fn, make)


def test_kernel_reading_channels_last_copies_of_nchw_activations(monkeypatch):
    # What the GPU does by default (STAGE_CHANNELS_LAST): NCHW x and grad_out are read from
    # channels_last copies while the outputs keep the caller's NCHW layout.
    monkeypatch.setattr(km, "STAGE_CHANNELS_LAST", True)
    make, fn, *_ = _case_inputs(CASES[3], torch.float64)  # 18 -> 33 channels, NCHW
    assert_kernel_matches_reference(fn, make)
    (x, w, b), _ = make()
    with fastdensity.set_backend("triton"):
        assert fn(x, w, b).is_contiguous()


@pytest.mark.parametrize("mask_type,groups", [("A", 3), ("B", 3), ("B", 1)])
def test_kernel_is_autoregressive_through_the_jacobian(mask_type, groups):
    C, H, W = 3, 4, 4
    w = torch.randn(6, C, 3, 3, dtype=torch.float64)
    with fastdensity.set_backend("triton"):
        J = _jacobian_of_linear(lambda xb: ops.masked_conv2d(xb, w, mask_type=mask_type, color_groups=groups),
                                C, H, W)
    _assert_autoregressive(J, C, 6, H, W, mask_type, groups)


def test_kernel_gradcheck():
    # Fast mode (finite differences along random directions, checked against the analytic vector-
    # Jacobian products): the interpreter is too slow for full Jacobians, and every gradient element
    # is compared with the fully gradchecked reference in test_kernel_matches_reference anyway.
    with fastdensity.set_backend("triton"):
        x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
        w = torch.randn(6, 3, 3, 3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(6, dtype=torch.float64, requires_grad=True)
        for mask_type in ("A", "B"):
            assert torch.autograd.gradcheck(lambda *a: ops.masked_conv2d(*a, mask_type=mask_type, color_groups=3),
                                            (x, w, b), fast_mode=True)
        x2 = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
        w2 = torch.randn(2, 2, 3, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda *a: ops.masked_conv2d(*a, stride=2, dilation=(1, 2)), (x2, w2),
                                        fast_mode=True)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=requires_interpreter), "dense"])
def test_backward_skips_gradients_nobody_asked_for(monkeypatch, impl):
    """The kernel's own op (forced backend "triton") and the choosing op (impl "dense") alike."""
    calls = []

    def spying(real):
        def spy(grad_out, x, weight, g, need_x, need_w):
            calls.append((need_x, need_w))
            return real(grad_out, x, weight, g, need_x, need_w)
        return spy

    x = torch.randn(1, 3, 4, 4)
    w = torch.randn(6, 3, 3, 3, requires_grad=True)
    if impl == "triton":
        monkeypatch.setattr(km, "triton_backward", spying(km.triton_backward))
        with fastdensity.set_backend("triton"):
            out = ops.masked_conv2d(x, w, mask_type="A", color_groups=3)  # x: data, no gradient wanted
    else:
        forward, backward = impls.IMPLEMENTATIONS[impl]
        monkeypatch.setitem(impls.IMPLEMENTATIONS, impl, (forward, spying(backward)))
        out = torch.ops.fastdensity.masked_conv2d(x, w, None, "A", 3, [1, 1], [1, 1], [1, 1], impl, True)
    (gw,) = torch.autograd.grad(out.square().sum(), w)
    assert calls == [(False, True)]
    torch.testing.assert_close(gw, torch.autograd.grad(
        ref.masked_conv2d(x, w, mask_type="A", color_groups=3).square().sum(), w)[0], rtol=2e-5, atol=2e-5)


def test_empty_batch():
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    w = torch.randn(6, 3, 3, 3, requires_grad=True)
    with fastdensity.set_backend("triton"):
        out = ops.masked_conv2d(x, w, torch.zeros(6), mask_type="A", color_groups=3)
    assert out.shape == (0, 6, 4, 4)
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(gw))


def test_nan_input_propagates_only_forward_in_raster_order():
    x = torch.randn(1, 1, 4, 4)
    x[0, 0, 1, 2] = float("nan")
    w = torch.randn(1, 1, 3, 3)
    with fastdensity.set_backend("triton"):
        out = ops.masked_conv2d(x, w, mask_type="A")
    nan = torch.isnan(out[0, 0])
    # Reached: the next pixel (1, 3) and the row below at columns 1..3; nothing earlier in raster order.
    assert nan[1, 3] and nan[2, 1:].all() and nan.sum() == 4


@pytest.mark.parametrize("op", [pytest.param("kernel", marks=requires_interpreter), "dense", "split"])
def test_registration_passes_opcheck(op):
    """torch.library.opcheck of the kernel's own op and of the choosing op (with each PyTorch
    alternative): the schema, the autograd registration, and fake (meta) outputs with exactly the
    real outputs' shapes, dtypes and strides (channels_last here), also under dynamic-shape AOT
    tracing."""
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64).to(memory_format=torch.channels_last)
    x, w, b = leaves(x, torch.randn(9, 6, 3, 3, dtype=torch.float64), torch.randn(9, dtype=torch.float64))
    args = (x, w, b, "A", 3, [1, 1], [1, 1], [1, 1])
    if op == "kernel":
        torch.library.opcheck(torch.ops.fastdensity.masked_conv2d_triton.default, args)
    else:
        torch.library.opcheck(torch.ops.fastdensity.masked_conv2d.default, (*args, op, True))


@pytest.mark.parametrize("impl", ["dense", "split"])
def test_double_backward_through_the_choosing_op_says_what_to_do(impl):
    """The package-layer op's backward is opaque too: a gradient of a gradient through it names the op and
    the way out (the kernel's own op: tests/test_hostile_inputs.py) instead of PyTorch's "no autograd
    formula was registered" for an internal op."""
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    out = torch.ops.fastdensity.masked_conv2d(x, w, None, "B", 3, [1, 1], [1, 1], [1, 1], impl, True)
    grads = torch.autograd.grad(out.sin().sum(), (x, w), create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward .* for masked_conv2d is not supported.*"
                                           r"set_backend\('reference'\)"):
        torch.autograd.grad(sum(g.pow(2).sum() for g in grads), (x, w))


def test_compile_fullgraph_runs_the_kernel():
    torch._dynamo.reset()
    layers = torch.nn.ModuleList([MaskedConv2d(3, 6, 5, "A", color_groups=3),
                                  MaskedConv2d(6, 6, 3, "B", color_groups=3)]).double()

    def nll(x):
        h = torch.relu(layers[0](x))
        return layers[1](h).square().mean()

    # aot_eager: forward and backward traced through the fake implementations, as Inductor does
    # (Inductor passes too; it is the GPU default, and slow to compile on a CPU).
    assert_compiles_like_reference(nll, (torch.randn(2, 3, 5, 5, dtype=torch.float64),), layers.parameters(),
                                   backend="aot_eager")


@requires_interpreter
def test_compile_fullgraph_through_the_choosing_op(monkeypatch):
    """The "auto" backend's path (ops.masked_conv2d -> the package layer's choosing op, forward and
    backward) compiles without a graph break. Off the GPU "auto" runs the reference, so use_kernels is
    told otherwise here; the choosing op then resolves "auto" to the kernel (nothing to time on a CPU)."""
    seen = []
    real_resolve = impls.resolve_impl

    def resolve(impl, *args):
        seen.append(impl)
        return real_resolve(impl, *args)

    monkeypatch.setattr(impls, "resolve_impl", resolve)
    monkeypatch.setattr(fastdensity.backend, "use_kernels", lambda tensor, op: True)
    torch._dynamo.reset()
    layer = MaskedConv2d(3, 6, 3, "A", color_groups=3).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with fastdensity.set_backend("auto"):
        loss = torch.compile(lambda v: layer(v).square().mean(), fullgraph=True, backend="aot_eager")(x)
        grads = torch.autograd.grad(loss, list(layer.parameters()))
    torch._dynamo.reset()
    assert seen == ["auto", "auto"]  # the forward, then the backward op, each chose at run time
    loss_r = ref.masked_conv2d(x, layer.weight, layer.bias, mask_type="A", color_groups=3).square().mean()
    torch.testing.assert_close(loss, loss_r)
    for g, g_r in zip(grads, torch.autograd.grad(loss_r, list(layer.parameters()))):
        torch.testing.assert_close(g, g_r)


@requires_interpreter
def test_compile_imports_the_choosing_op_while_tracing():
    """ops.masked_conv2d imports the package layer's op on the "auto" path, so a program that compiles
    before it ever runs the op eagerly makes Dynamo trace that import: it must register the op and
    compile without a graph break. A fresh interpreter, where nothing has imported it yet."""
    code = textwrap.dedent("""
        import sys
        import torch
        from fastdensity import backend, ops
        from fastdensity.reference import masked_conv as ref
        assert "fastdensity.masked_conv_impls" not in sys.modules
        backend.use_kernels = lambda tensor, op: True  # CPU tensors, but take the kernel side under "auto"
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        w = torch.randn(6, 3, 3, 3, dtype=torch.float64, requires_grad=True)
        fn = lambda x, w: ops.masked_conv2d(x, w, mask_type="A", color_groups=3).square().mean()
        loss = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w)
        assert "fastdensity.masked_conv_impls" in sys.modules
        loss_r = ref.masked_conv2d(x, w, mask_type="A", color_groups=3).square().mean()
        torch.testing.assert_close(loss, loss_r)
        torch.testing.assert_close(torch.autograd.grad(loss, w)[0], torch.autograd.grad(loss_r, w)[0])
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTDENSITY_BACKEND": "auto"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# The measured choice: the cached autotuner with injected timings (no GPU needed)
# ------------------------------------------------------------------------------------------------


def _fake_timer(times):
    """A timer that runs the candidate (so it must work) and reports the next of ``times``."""
    it = iter(times)

    def timer(fn):
        fn()
        return next(it)

    return timer


def test_tuner_picks_the_fastest_and_caches_it_in_memory_and_on_disk(tmp_path, monkeypatch):
    monkeypatch.delenv(autotune.ENV_AUTOTUNE, raising=False)
    runs = []
    candidates = {name: (lambda name=name: runs.append(name)) for name in ("kernel", "cudnn", "split")}
    tuner = autotune.CachedAutotuner("demo", default="kernel", timer=_fake_timer([3.0, 1.5, 2.0]), directory=tmp_path)
    key = {"shape": [64, 256, 32, 32], "dtype": "bfloat16"}
    assert tuner.choose(key, candidates) == "cudnn"
    assert runs == ["kernel", "cudnn", "split"]
    assert tuner.choose(key, candidates) == "cudnn" and len(runs) == 3  # memory hit: nothing re-timed
    assert tuner.entry(key)["times_ms"] == {"kernel": 3.0, "cudnn": 1.5, "split": 2.0}
    # A fresh tuner (a new process) reads the choice from disk without timing anything.
    fresh = autotune.CachedAutotuner("demo", default="kernel", timer=_fake_timer([]), directory=tmp_path)
    assert fresh.choose(key, candidates) == "cudnn" and len(runs) == 3
    data = json.loads((tmp_path / "autotune-demo.json").read_text())
    assert data["format"] == 1 and len(data["entries"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["autotune-demo.json"]  # no temporary files left
    # A different key is measured on its own; both survive in the file.
    fresh.timer = _fake_timer([1.0, 2.0, 3.0])
    assert fresh.choose({**key, "dtype": "float32"}, candidates) == "kernel" and len(runs) == 6
    assert len(json.loads((tmp_path / "autotune-demo.json").read_text())["entries"]) == 2


def test_tuner_merges_entries_written_by_another_process(tmp_path):
    a = autotune.CachedAutotuner("demo", default="x", timer=_fake_timer([1.0, 2.0]), directory=tmp_path)
    b = autotune.CachedAutotuner("demo", default="x", timer=_fake_timer([2.0, 1.0]), directory=tmp_path)
    cands = {"x": lambda: None, "y": lambda: None}
    assert a.choose({"k": 1}, cands) == "x"
    assert b.choose({"k": 2}, cands) == "y"  # b never saw key 1 in memory, but must not drop it
    entries = json.loads((tmp_path / "autotune-demo.json").read_text())["entries"]
    assert sorted(v["choice"] for v in entries.values()) == ["x", "y"]


def test_tuner_disable_switch_uses_the_default_without_timing(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "0")
    tuner = autotune.CachedAutotuner("demo", default="kernel", timer=_fake_timer([]), directory=tmp_path)
    assert tuner.choose({"k": 1}, {"kernel": lambda: None, "cudnn": lambda: None}) == "kernel"
    assert not (tmp_path / "autotune-demo.json").exists()


def test_tuner_rules_out_a_failing_candidate_and_survives_a_corrupt_file(tmp_path):
    (tmp_path / "autotune-demo.json").write_text("{not json")

    def broken():
        raise RuntimeError("no kernel for this GPU")

    tuner = autotune.CachedAutotuner("demo", default="kernel", timer=lambda fn: (fn(), 1.0)[1], directory=tmp_path)
    with pytest.warns(RuntimeWarning) as record:
        assert tuner.choose({"k": 1}, {"kernel": broken, "cudnn": lambda: None}) == "cudnn"
    messages = " ".join(str(r.message) for r in record)
    assert "ignoring unreadable cache" in messages and "'kernel' failed" in messages
    assert tuner.entry({"k": 1})["times_ms"] == {"kernel": None, "cudnn": 1.0}


def test_tuner_keys_carry_the_library_versions():
    text = autotune.CachedAutotuner.key_string({"a": 1})
    assert json.loads(text) == {"a": 1, "fastdensity": fastdensity.__version__, "torch": torch.__version__,
                                "triton": __import__("triton").__version__}


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path / "here"))
    assert autotune.cache_dir() == tmp_path / "here"
    monkeypatch.delenv(autotune.ENV_CACHE_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_dir() == tmp_path / "xdg" / "fastdensity"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune.cache_dir() == tmp_path / "home" / ".cache" / "fastdensity"


def test_cache_dir_without_a_home_directory_falls_back_to_the_temp_dir(monkeypatch, tmp_path):
    # As in a container whose user has no $HOME and no passwd entry: Path.home() raises.
    monkeypatch.delenv(autotune.ENV_CACHE_DIR, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(autotune.tempfile, "gettempdir", lambda: str(tmp_path))

    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(autotune.Path, "home", classmethod(no_home))
    folder = autotune.cache_dir()
    assert folder.parent == tmp_path and folder.name.startswith("fastdensity-cache-")
    # ... and the tuner uses it.
    tuner = autotune.CachedAutotuner("demo", default="x", timer=_fake_timer([2.0, 1.0]))
    assert tuner.choose({"k": 1}, {"x": lambda: None, "y": lambda: None}) == "y"
    assert (folder / "autotune-demo.json").is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_tuner_file_is_created_like_open_would_create_it(tmp_path):
    # The shared atomic writer makes the file 0o666 less the umask, readable by whoever may read the
    # folder; a private mkstemp file (0o600) renamed into place would not be.
    previous = os.umask(0o022)
    try:
        tuner = autotune.CachedAutotuner("demo", default="x", timer=_fake_timer([1.0]), directory=tmp_path / "new")
        tuner.choose({"k": 1}, {"x": lambda: None})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(tuner.path.stat().st_mode) == 0o644


def test_tuner_that_cannot_write_keeps_its_choices_in_memory(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    tuner = autotune.CachedAutotuner("demo", default="x", timer=_fake_timer([2.0, 1.0]), directory=blocker / "sub")
    with pytest.warns(RuntimeWarning) as record:  # reading warns too: the folder's parent is a file
        assert tuner.choose({"k": 1}, {"x": lambda: None, "y": lambda: None}) == "y"
    assert any("kept in memory for this process only" in str(r.message) for r in record)
    assert tuner.lookup({"k": 1}) == "y"
    assert [p.name for p in tmp_path.iterdir()] == ["a file"]


@requires_interpreter
def test_masked_conv_choice_times_all_three_candidates_and_keeps_the_winner(tmp_path, monkeypatch):
    """The op's own key and candidate closures (forward + backward of each implementation), with the
    timings injected: the choice, the cache round trip and the disable switch."""
    monkeypatch.delenv(autotune.ENV_AUTOTUNE, raising=False)
    x, w, b = torch.randn(1, 3, 4, 4), torch.randn(6, 3, 3, 3), torch.randn(6)
    g = km.geometry(x, w, "B", 3, (1, 1), (1, 1), (1, 1))
    tuner = autotune.CachedAutotuner("masked_conv2d", default="triton", timer=_fake_timer([5.0, 9.0, 2.0]),
                                     directory=tmp_path)
    assert impls.choose_impl(x, w, b, g, True, tuner=tuner) == "split"
    key = impls.tuning_key(x, w, g, True)
    assert key["training"] and key["dtype"] == "float32" and key["layout"] == "contiguous"
    assert tuner.entry(key)["times_ms"] == {"triton": 5.0, "dense": 9.0, "split": 2.0}
    again = autotune.CachedAutotuner("masked_conv2d", default="triton", timer=_fake_timer([]), directory=tmp_path)
    assert impls.choose_impl(x, w, b, g, True, tuner=again) == "split"
    # Inference is a different problem (forward only), measured on its own.
    infer = autotune.CachedAutotuner("masked_conv2d", default="triton", timer=_fake_timer([1.0, 2.0, 3.0]),
                                     directory=tmp_path)
    assert impls.choose_impl(x, w, b, g, False, tuner=infer) == "triton"
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "0")
    assert impls.choose_impl(x, w, b, g, True, tuner=again) == "triton"


def test_auto_off_the_gpu_is_the_kernel_and_unknown_impls_are_refused():
    x, w = torch.randn(1, 3, 4, 4), torch.randn(6, 3, 3, 3)
    g = km.geometry(x, w, "B", 1, (1, 1), (1, 1), (1, 1))
    assert impls.resolve_impl("auto", x, w, None, g, True) == "triton"
    with pytest.raises(ValueError, match="impl must be 'auto' or one of 'triton', 'dense', 'split'; got 'cudnn'"):
        torch.ops.fastdensity.masked_conv2d(x, w, None, "B", 1, [1, 1], [1, 1], [1, 1], "cudnn", False)


def test_auto_backend_on_cpu_runs_the_reference(monkeypatch):
    def fail(*args):
        raise AssertionError("a kernel-side op ran on CPU tensors under the auto backend")

    monkeypatch.setattr(impls, "resolve_impl", fail)
    monkeypatch.setattr(km, "triton_forward", fail)
    x, w = torch.randn(1, 3, 4, 4), torch.randn(6, 3, 3, 3)
    torch.testing.assert_close(ops.masked_conv2d(x, w), ref.masked_conv2d(x, w))


# ------------------------------------------------------------------------------------------------
# Module
# ------------------------------------------------------------------------------------------------


def test_module_is_a_state_dict_compatible_conv2d():
    m = MaskedConv2d(6, 9, 5, "A", color_groups=3)
    assert isinstance(m, torch.nn.Conv2d) and m.padding == (2, 2)
    plain = torch.nn.Conv2d(6, 9, 5, padding=2)
    plain.load_state_dict(m.state_dict())  # strict: identical keys
    m.load_state_dict(torch.nn.Conv2d(6, 9, 5).state_dict())
    assert list(m.state_dict()) == ["weight", "bias"] and "mask" in dict(m.named_buffers())
    assert torch.equal(m.mask, ref.pixelcnn_mask(9, 6, 5, 5, "A", 3, dtype=torch.bool))
    assert "mask_type='A', color_groups=3" in repr(m)


def test_module_forward_is_the_op_and_leaves_the_weight_dense():
    m = MaskedConv2d(3, 6, (3, 5), "B", color_groups=3, dilation=2).double()
    before = m.weight.detach().clone()
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    out = m(x)
    assert out.shape == (2, 6, 7, 8)  # centre padding 2 * (k // 2) keeps the size
    torch.testing.assert_close(out, ref.masked_conv2d(x, m.weight, m.bias, mask_type="B", color_groups=3,
                                                      dilation=2))
    assert torch.equal(m.weight, before) and (before * ~m.mask).abs().sum() > 0
    with fastdensity.set_backend("triton"):
        torch.testing.assert_close(m(x), out)
    out.sum().backward()
    assert torch.equal(m.weight.grad[~m.mask], torch.zeros_like(m.weight.grad[~m.mask]))


def test_module_refuses_what_breaks_the_mask():
    with pytest.raises(ValueError, match=r"kernel_size must be odd.*\(4, 4\)"):
        MaskedConv2d(3, 3, 4)
    with pytest.raises(ValueError, match="mask_type must be one of 'A', 'B'; got 'C'"):
        MaskedConv2d(3, 3, 3, mask_type="C")
    with pytest.raises(ValueError, match=r"out_channels \(4\) must be divisible by color_groups \(3\)"):
        MaskedConv2d(3, 4, 3, color_groups=3)
    with pytest.raises(ValueError, match="groups must be 1"):
        MaskedConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode must be 'zeros'"):
        MaskedConv2d(4, 4, 3, padding_mode="reflect")


# ------------------------------------------------------------------------------------------------
# Bad input through the op
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_names_the_argument(backend):
    x, w = torch.randn(2, 6, 5, 5), torch.randn(9, 6, 3, 3)
    with fastdensity.set_backend(backend):
        with pytest.raises(ValueError, match=r"kernel_size must be odd in both dims .*; got \(3, 2\)"):
            ops.masked_conv2d(x, torch.randn(9, 6, 3, 2))
        with pytest.raises(ValueError, match="mask_type must be one of 'A', 'B'; got 'a'"):
            ops.masked_conv2d(x, w, mask_type="a")
        with pytest.raises(ValueError, match=r"in_channels \(6\) must be divisible by color_groups \(4\)"):
            ops.masked_conv2d(x, torch.randn(8, 6, 3, 3), color_groups=4)
        with pytest.raises(ValueError, match=r"out_channels \(9\) must be divisible by color_groups \(2\)"):
            ops.masked_conv2d(x, w, color_groups=2)
        with pytest.raises(ValueError, match="color_groups must be an int >= 1; got 0"):
            ops.masked_conv2d(x, w, color_groups=0)
        with pytest.raises(ValueError, match=r"x must have C_in = weight.shape\[1\] = 6 channels"):
            ops.masked_conv2d(torch.randn(2, 5, 5, 5), w)
        with pytest.raises(ValueError, match=r"x must have 4 dims; got shape \(6, 5, 5\)"):
            ops.masked_conv2d(x[0], w)
        with pytest.raises(ValueError, match=r"bias must have shape \[C_out\] = \(9,\); got \(6,\)"):
            ops.masked_conv2d(x, w, torch.randn(6))
        with pytest.raises(ValueError, match="weight must have the same dtype as x, torch.float32; got torch.float64"):
            ops.masked_conv2d(x, w.double())
        with pytest.raises(ValueError, match=r"stride must be >= 1; got \(0, 0\)"):
            ops.masked_conv2d(x, w, stride=0)
        with pytest.raises(ValueError, match="padding must be 'same', 'valid', an int or a pair of ints; got 'full'"):
            ops.masked_conv2d(x, w, padding="full")
        with pytest.raises(ValueError, match=r"too small for kernel \(3, 3\).*output would be \(0, 0\)"):
            ops.masked_conv2d(torch.randn(1, 6, 2, 2), w, padding=0)


# ------------------------------------------------------------------------------------------------
# GPU tier: fp32 / bf16 / fp16 against float64 by the rule of fastdensity.testing
# ------------------------------------------------------------------------------------------------

GPU_CASES = [
    # (N, C_in, C_out, H, W, kernel, mask_type, groups, kwargs, channels_last)
    (8, 64, 64, 16, 16, 7, "A", 1, {}, False),
    (8, 96, 96, 16, 16, 5, "B", 3, {}, True),
    (4, 128, 128, 16, 16, 3, "B", 1, {}, False),
    (3, 3, 96, 17, 19, 7, "A", 3, {}, False),  # a PixelCNN's first layer on RGB
    (5, 33, 45, 13, 11, 3, "B", 3, {"stride": 2, "dilation": 2}, False),
]


def _gpu_run(impl_or_backend, dtype_cast, base, upstream, case, use_op_impl):
    _, _, _, _, _, _, mask_type, groups, kwargs, _ = case
    args = leaves(*[dtype_cast(a) for a in base])
    if use_op_impl:
        x, w, b = args
        stride = ref.pair("stride", kwargs.get("stride", 1), minimum=1)
        dilation = ref.pair("dilation", kwargs.get("dilation", 1), minimum=1)
        padding = ref.resolve_padding("same", tuple(w.shape[2:]), dilation)
        out = torch.ops.fastdensity.masked_conv2d(x, w, b, mask_type, groups, list(stride), list(padding),
                                                  list(dilation), impl_or_backend, True)
    else:
        with fastdensity.set_backend(impl_or_backend):
            out = ops.masked_conv2d(*args, mask_type=mask_type, color_groups=groups, **kwargs)
    grads = torch.autograd.grad((out.double() * upstream).sum(), args)
    return [out, *grads]


def _gpu_check(case, precision, kernel_path, use_op_impl):
    """``precision``: "fp32-ieee" / "fp32-tf32" (fp32 with torch.backends.cudnn.allow_tf32 off / on, which
    both cuDNN and the kernel follow), "bf16" or "fp16"."""
    N, C_in, C_out, H, W, k, mask_type, groups, kwargs, channels_last = case
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    x = torch.randn(N, C_in, H, W, device="cuda")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    base = [x.to(dtype), (torch.randn(C_out, C_in, k, k, device="cuda") / math.sqrt(C_in * k * k)).to(dtype),
            torch.randn(C_out, device="cuda").to(dtype)]
    probe = _gpu_run("reference", lambda a: a.double(), base, 0, case, False)[0]
    upstream = torch.randn(probe.shape, device="cuda", dtype=torch.float64)
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = precision == "fp32-tf32"
    try:
        kernel = _gpu_run(kernel_path, lambda a: a, base, upstream, case, use_op_impl)
        eager = _gpu_run("reference", lambda a: a, base, upstream, case, False)
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    ref64 = _gpu_run("reference", lambda a: a.double(), base, upstream, case, False)
    for name, k_, e_, r_ in zip(["out", "grad_x", "grad_weight", "grad_bias"], kernel, eager, ref64):
        if precision == "fp32-tf32":
            # TF32 keeps 10 mantissa bits (unit roundoff 2**-11 ~ 4.9e-4); a sum of products with random
            # signs then has a relative 2-norm error of ~1e-3. cuDNN may or may not pick a TF32 algorithm,
            # so the eager error is no yardstick here: bound the kernel's relative error by 5e-3 instead.
            rel = ((k_.double() - r_).norm() / r_.norm()).item()
            assert rel < 5e-3, f"{name}: relative error {rel:.2e} with TF32"
        else:
            result = compare(name, k_, e_, r_)
            assert result.passed, str(result)


PRECISIONS = ["fp32-ieee", "fp32-tf32", "bf16", "fp16"]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_kernel_matches_fp64_reference(case, precision):
    _gpu_check(case, precision, "triton", use_op_impl=False)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["dense", "split"])
@pytest.mark.parametrize("precision", ["fp32-ieee", "bf16"])
def test_gpu_candidates_match_fp64_reference(impl, precision):
    _gpu_check(GPU_CASES[1], precision, impl, use_op_impl=True)


@requires_cuda
@pytest.mark.gpu
def test_gpu_auto_choice_measures_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.delenv(autotune.ENV_AUTOTUNE, raising=False)
    tuner = autotune.CachedAutotuner("masked_conv2d", default="triton", directory=tmp_path)
    monkeypatch.setattr(impls, "TUNER", tuner)
    layer = MaskedConv2d(64, 64, 5, "B").cuda()
    x = torch.randn(8, 64, 16, 16, device="cuda")
    out = layer(x)  # auto backend on CUDA: measured now
    torch.testing.assert_close(out, ref.masked_conv2d(x, layer.weight, layer.bias), rtol=2e-2, atol=2e-2)
    entries = json.loads(tuner.path.read_text())["entries"]
    assert len(entries) == 1
    (entry,) = entries.values()
    assert entry["choice"] in impls.IMPLS and all(v is not None for v in entry["times_ms"].values())
    out.sum().backward()  # the backward finds the same key in the cache: nothing new is measured
    assert len(json.loads(tuner.path.read_text())["entries"]) == 1


@requires_cuda
@pytest.mark.gpu
def test_gpu_past_int32_offsets():
    """More than 2**31 elements in x: the batch offset must be 64-bit or the last samples are garbage.
    The upstream gradient is non-zero on the last sample only, so grad_weight (a sum over every pixel
    of every sample) is that sample's alone and checks the grad-weight kernel's offsets too."""
    C, H, W = 64, 64, 64
    N = 2**31 // (C * H * W) + 2
    free, _ = torch.cuda.mem_get_info()
    need = 7 * N * C * H * W * 2  # x, out, grad_out, grad_x, channels_last copies of x and grad_out, bf16
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB free on the GPU, has {free / 2**30:.0f}")
    x = torch.randn(N, C, H, W, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(C, C, 3, 3, device="cuda") / 24).to(torch.bfloat16).requires_grad_(True)
    with fastdensity.set_backend("triton"):
        out = ops.masked_conv2d(x, w)
    upstream = torch.zeros_like(out)
    upstream[-1] = 1
    gx, gw = torch.autograd.grad(out, (x, w), upstream)
    del upstream
    last, w64 = leaves(x[-1:].double(), w.double())
    out_ref = ref.masked_conv2d(last, w64)
    # bf16 outputs of O(1) values: a rounding of 2**-9 relative, well inside 2e-2.
    torch.testing.assert_close(out[-1:].double(), out_ref.detach(), rtol=2e-2, atol=2e-2)
    gx_ref, gw_ref = torch.autograd.grad(out_ref.sum(), (last, w64))
    torch.testing.assert_close(gx[-1:].double(), gx_ref, rtol=2e-2, atol=5e-2)
    assert torch.count_nonzero(gx[:-1]) == 0  # no other sample received anything
    # grad_weight: fp32 sums of up to 4096 bf16 products (|value| ~ 64), rounded once to bf16.
    torch.testing.assert_close(gw.double(), gw_ref, rtol=2e-2, atol=1e-1)
