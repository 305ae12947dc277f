"""Rational-quadratic spline: reference against nflows, zuko and the math; kernel against the reference;
GPU tier by the rule."""
from __future__ import annotations

import pytest
import torch

import fastdensity
from fastdensity import ops
from fastdensity.reference import spline as ref
from fastdensity.testing import compare
from helpers import (assert_compiles_like_reference, assert_kernel_matches_reference, leaves, requires_cuda,
                     requires_interpreter)

PARAMETERIZATIONS = ["nflows", "zuko"]


def _params(lead, K, dtype=torch.float64, scale=2.0):
    """Random unconstrained widths, heights [*lead, K] and derivatives [*lead, K - 1]: spread wide (logits
    up to ~+-6), so bins range from the minimum width to most of the interval."""
    return (scale * torch.randn(*lead, K, dtype=dtype), scale * torch.randn(*lead, K, dtype=dtype),
            scale * torch.randn(*lead, K - 1, dtype=dtype))


def _special_points(w, h, d, parameterization, bound, inverse):
    """For each element's own spline: its interior knots (of x, or of y for the inverse), +-bound, just
    inside and outside them, far outside and 0. Returns x [n, m] for parameters [n, K]."""
    xs, ys, _ = ref.knots(w, h, d, parameterization=parameterization, bound=bound)
    knots = (ys if inverse else xs)[:, 1:-1]
    edge = torch.tensor([-bound, bound, -bound * (1 - 1e-15), bound * (1 - 1e-15), -bound * (1 + 1e-15),
                         bound * (1 + 1e-15), -1e30, 1e30, -4 * bound, 4 * bound, 0.0], dtype=w.dtype)
    return torch.cat([knots, edge.expand(w.shape[0], -1)], dim=1)


def _assert_relative(actual, expected, what, rtol=1e-12):
    """Relative error <= rtol, taken against max(|expected|, 1): a value near 0 (a log-det of a bin
    close to the identity, y near the centre) has no meaningful relative error at round-off level."""
    if expected.numel() == 0:
        return
    err = ((actual - expected).abs() / expected.abs().clamp(min=1.0)).max().item()
    assert err <= rtol, f"{what}: relative error {err:.2e}"


def _nflows(x, w, h, d, bound, inverse):
    from nflows.transforms.splines.rational_quadratic import unconstrained_rational_quadratic_spline

    return unconstrained_rational_quadratic_spline(x, w, h, d.clone(), inverse=inverse, tails="linear",
                                                   tail_bound=bound)


def _zuko(x, w, h, d, bound, inverse):
    from zuko.transforms import MonotonicRQSTransform

    t = MonotonicRQSTransform(w, h, d, bound=bound)
    if inverse:  # zuko's inverse log-det: minus the forward's at the inverse's output
        x_out = t.inv(x)
        return x_out, -t.log_abs_det_jacobian(x_out, x)
    return t.call_and_ladj(x)


LIBRARY = {"nflows": _nflows, "zuko": _zuko}


# ------------------------------------------------------------------------------------------------
# Reference tier: against nflows and zuko, and against the math
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("K", [1, 2, 5, 8, 32])
def test_reference_equals_the_library(parameterization, inverse, K):
    """float64: values, log-dets and gradients equal the library's to 1e-12 at random points across and
    beyond the interval; at each spline's own knots and at +-bound too (the inverse's log-det to 1e-9)."""
    pytest.importorskip(parameterization)
    bound, n = 1.7, 300
    w, h, d = _params((n,), K)
    x = 1.4 * bound * (2 * torch.rand(n, 8, dtype=torch.float64) - 1)
    wb, hb, db = (t[:, None].expand(n, 8, t.shape[-1]) for t in (w, h, d))
    args = leaves(x, wb, hb, db)
    y, ld = ref.rational_quadratic_spline(*args, inverse=inverse, bound=bound, parameterization=parameterization,
                                          reduction="none")
    lib_args = leaves(x, wb, hb, db)
    y_lib, ld_lib = LIBRARY[parameterization](*lib_args, bound, inverse)
    _assert_relative(y, y_lib, "y")
    _assert_relative(ld, ld_lib, "log-det")
    gy, gl = torch.randn_like(x), torch.randn_like(x)
    grads = torch.autograd.grad((y * gy).sum() + (ld * gl).sum(), args, allow_unused=True)
    grads_lib = torch.autograd.grad((y_lib * gy).sum() + (ld_lib * gl).sum(), lib_args, allow_unused=True)
    for name, g, g_lib in zip(("x", "widths", "heights", "derivatives"), grads, grads_lib):
        if g_lib is None:  # K = 1: no derivatives (a zuko built without them never uses the tensor)
            assert g is None or not g.any(), name
        else:
            # The inverse's gradients come out of differently composed expressions (zuko's inverse
            # log-det is minus the forward's at x(y), differentiated through x(y)), whose round-off
            # the steepest bins amplify: measured up to 3e-11 for zuko, 1.3e-12 for nflows.
            _assert_relative(g, g_lib, f"gradient of {name}", rtol=1e-10 if inverse else 1e-12)

    # Knots and +-bound (and one rounding either side of it). Gradients are left out: the log-det's slope
    # jumps at a knot, and which side a library takes there is a convention, not a value to match.
    special = _special_points(w, h, d, parameterization, bound, inverse)
    m = special.shape[1]
    wb, hb, db = (t[:, None].expand(n, m, t.shape[-1]) for t in (w, h, d))
    y, ld = ref.rational_quadratic_spline(special, wb, hb, db, inverse=inverse, bound=bound,
                                          parameterization=parameterization, reduction="none")
    y_lib, ld_lib = LIBRARY[parameterization](special, wb, hb, db, bound, inverse)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    _assert_relative(y, y_lib, "y at knots and bounds")
    # Forward: 1e-12 (measured 2e-15). Inverse: on a y-knot of a steep bin the recovered x sits where a
    # rounding decides its bin, and the log-det's error is that rounding times its slope in z, ~1e3-1e4
    # there (zuko's inverse log-det is also evaluated at its own x(y); nflows' batch rounds differently
    # from one element alone): measured up to 2.6e-10 over 6 seeds.
    _assert_relative(ld, ld_lib, "log-det at knots and bounds", rtol=1e-9 if inverse else 1e-12)


def test_nflows_boundary_derivative_is_one():
    """nflows pads the derivatives with log(exp(1 - m) - 1), whose m + softplus is 1 up to a rounding:
    the reference uses 1 exactly."""
    import math

    m = 1e-3
    constant = torch.tensor(math.log(math.exp(1 - m) - 1), dtype=torch.float64)
    assert abs(m + torch.nn.functional.softplus(constant).item() - 1.0) <= 2.3e-16
    _, _, ds = ref.knots(*_params((4,), 5), parameterization="nflows", bound=1.0)
    assert (ds[:, 0] == 1).all() and (ds[:, -1] == 1).all()


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reference_gradcheck(parameterization, inverse, reduction):
    w, h, d = _params((2, 3), 4, scale=1.0)
    x = 1.3 * (2 * torch.rand(2, 3, dtype=torch.float64) - 1)  # some beyond the bound 1.1
    args = leaves(x, w, h, d)

    def fn(*a):
        return ref.rational_quadratic_spline(*a, inverse=inverse, bound=1.1, parameterization=parameterization,
                                             reduction=reduction)

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("inverse", [False, True])
def test_reference_is_twice_differentiable(parameterization, inverse):
    """The reference writes some backwards out (softmax, zuko's soft clip) for speed; they are made of
    differentiable ops, so second derivatives (gradient penalties, Hessians; and the way out the kernel's
    double-backward error names) stay right."""
    w, h, d = _params((2, 3), 4, scale=1.0)
    x = 1.3 * (2 * torch.rand(2, 3, dtype=torch.float64) - 1)
    args = leaves(x, w, h, d)

    def fn(*a):
        return ref.rational_quadratic_spline(*a, inverse=inverse, bound=1.1, parameterization=parameterization)

    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("inverse", [False, True])
def test_reference_logdet_is_log_abs_det_jacobian(parameterization, inverse):
    shape = (2, 3, 2)
    w, h, d = _params(shape, 5, scale=1.0)
    x = 2.5 * torch.randn(shape, dtype=torch.float64)  # bound 2: some in the identity tails
    y, logdet = ref.rational_quadratic_spline(x, w, h, d, inverse=inverse, bound=2.0,
                                              parameterization=parameterization)
    for b in range(shape[0]):
        jac = torch.autograd.functional.jacobian(
            lambda xb: ref.rational_quadratic_spline(xb[None], w[b:b + 1], h[b:b + 1], d[b:b + 1], inverse=inverse,
                                                     bound=2.0, parameterization=parameterization)[0][0], x[b])
        sign, logabs = torch.linalg.slogdet(jac.reshape(x[b].numel(), -1))
        assert sign > 0  # monotonically increasing
        torch.testing.assert_close(logdet[b], logabs)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_inverse_undoes_forward(parameterization, dtype):
    n, bound = 20000, 3.0
    w, h, d = _params((n,), 8, dtype=dtype, scale=1.0)
    x = 1.2 * bound * (2 * torch.rand(n, dtype=dtype) - 1)
    y, ld = ref.rational_quadratic_spline(x[:, None], w[:, None], h[:, None], d[:, None], bound=bound,
                                          parameterization=parameterization, reduction="none")
    x_back, ld_back = ref.rational_quadratic_spline(y, w[:, None], h[:, None], d[:, None], bound=bound, inverse=True,
                                                    parameterization=parameterization, reduction="none")
    # The inverse's error in x is that of y (an ulp of the bound) divided by the slope dy/dx, so it is
    # measured in y: |x_back - x| * min(dy/dx, 1) in ulps of the bound. Measured over 10 seeds: <= 11
    # (the root of a nearly degenerate quadratic in a steep bin), typically < 1.
    eps = torch.finfo(dtype).eps
    err = ((x_back[:, 0] - x).abs() * ld[:, 0].exp().clamp(max=1.0)).max().item() / (eps * bound)
    assert err <= 16, f"round trip off by {err:.1f} ulps of the bound"
    outside = x.abs() > bound
    assert torch.equal(x_back[outside, 0], x[outside])  # the identity tails are exact
    # log|dx/dy| = -log|dy/dx| at the recovered x: its few ulps of z times the log-det's z-derivative,
    # which reaches ~1e3-1e4 in a steep bin (measured over 10 seeds: up to 2.3e4 ulps).
    torch.testing.assert_close(ld_back, -ld, rtol=0, atol=5e4 * eps)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_is_finite_everywhere(parameterization, inverse, dtype):
    """Knots, +-bound, just inside and outside, far outside, and extreme logits (+-60): finite values
    and finite gradients for x and all three parameter tensors (flowjax#239)."""
    n, K, bound = 40, 6, 2.0
    w, h, d = _params((n,), K, scale=3.0)
    w[:4], h[4:8], d[8:12] = 60.0, -60.0, 60.0
    w[12:16, 0], h[16:20, -1], d[20:24] = -60.0, -60.0, -60.0
    x = _special_points(w, h, d, parameterization, bound, inverse)
    m = x.shape[1]
    args = leaves(*(t.to(dtype) for t in (x, w[:, None].expand(n, m, K), h[:, None].expand(n, m, K),
                                          d[:, None].expand(n, m, K - 1))))
    y, ld = ref.rational_quadratic_spline(*args, inverse=inverse, bound=bound, parameterization=parameterization)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    grads = torch.autograd.grad(y.sum() + ld.sum(), args)
    for name, g in zip(("x", "widths", "heights", "derivatives"), grads):
        assert torch.isfinite(g).all(), f"non-finite gradient of {name}"


def test_reference_compiles_to_one_graph():
    """No host syncs, boolean-mask indexing or data-dependent shapes: one graph, no break."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w, h, d = leaves(*_params((4, 5), 8))

    def loss(x, w, h, d):
        total = 0
        for parameterization in PARAMETERIZATIONS:
            for inverse in (False, True):
                y, ld = ref.rational_quadratic_spline(x, w, h, d, inverse=inverse, parameterization=parameterization)
                total = total + y.sum() + ld.sum()
        return total

    out = torch.compile(loss, backend=counter, fullgraph=True)(x, w, h, d)
    out.backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(out, loss(x, w, h, d))


def test_reductions_and_defaults():
    x = 4 * torch.randn(3, 2, 5)
    w, h, d = _params((3, 2, 5), 4, dtype=torch.float32)
    y, ld = ops.rational_quadratic_spline(x, w, h, d)
    y_none, ld_none = ops.rational_quadratic_spline(x, w, h, d, reduction="none")
    assert ld.shape == (3,) and ld_none.shape == x.shape
    torch.testing.assert_close(y_none, y)
    torch.testing.assert_close(ld_none.sum(dim=(1, 2)), ld)
    # Default bounds: nflows' tail_bound 1.0, zuko's bound 5.0.
    inside_zuko = (x.abs() < 5) & (x.abs() > 1)
    assert torch.equal(y[x.abs() > 1], x[x.abs() > 1])
    y_zuko, _ = ops.rational_quadratic_spline(x, w, h, d, parameterization="zuko")
    assert (x.abs() > 5).any() and torch.equal(y_zuko[x.abs() > 5], x[x.abs() > 5])
    assert not torch.equal(y_zuko[inside_zuko], x[inside_zuko])


def test_logdet_dtype_is_fp32_for_half_inputs():
    for dtype, expected in [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        x = torch.randn(2, 3).to(dtype)
        w, h, d = (t.to(dtype) for t in _params((2, 3), 4))
        y, ld = ops.rational_quadratic_spline(x, w, h, d)
        assert y.dtype == dtype and ld.dtype == expected


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_bad_arguments_name_what_was_expected(backend_name):
    x = torch.randn(2, 3)
    w, h, d = _params((2, 3), 4, dtype=torch.float32)
    call = ops.rational_quadratic_spline
    with fastdensity.set_backend(backend_name):
        with pytest.raises(ValueError, match=r"widths must have shape \[\*x.shape, K\] = \(2, 3, K\)"):
            call(x, w[0], h, d)
        with pytest.raises(ValueError, match=r"heights must have the same shape as widths, \(2, 3, 4\).*\(2, 3, 5\)"):
            call(x, w, torch.randn(2, 3, 5), d)
        with pytest.raises(ValueError, match=r"derivatives must have shape .* \(2, 3, 3\).*got \(2, 3, 4\)"):
            call(x, w, h, torch.randn(2, 3, 4))
        with pytest.raises(ValueError, match="bound must be a positive finite number; got 0.0"):
            call(x, w, h, d, bound=0.0)
        with pytest.raises(ValueError, match="bound must be a positive finite number; got -1"):
            call(x, w, h, d, bound=-1)
        with pytest.raises(ValueError, match=r"min_bin_width must be >= 0 with min_bin_width \* K < 1 \(K = 4"):
            call(x, w, h, d, min_bin_width=0.25)
        with pytest.raises(ValueError, match=r"min_bin_height must be >= 0 with min_bin_height \* K < 1"):
            call(x, w, h, d, min_bin_height=-0.1)
        with pytest.raises(ValueError, match="min_derivative must be a finite number >= 0; got -0.001"):
            call(x, w, h, d, min_derivative=-1e-3)
        with pytest.raises(ValueError, match=r"slope must lie in \(0, 1\) for parameterization='zuko'; got 1.0"):
            call(x, w, h, d, parameterization="zuko", slope=1.0)
        with pytest.raises(ValueError, match="parameterization must be one of 'nflows', 'zuko'; got 'rqs'"):
            call(x, w, h, d, parameterization="rqs")
        with pytest.raises(ValueError, match="reduction must be one of 'sum', 'none'; got 'mean'"):
            call(x, w, h, d, reduction="mean")
        with pytest.raises(ValueError, match="heights must have the same dtype as x, torch.float32; got torch.float64"):
            call(x, w, h.double(), d)
        with pytest.raises(ValueError, match="derivatives must be on the same device as x, cpu; got meta"):
            call(x, w, h, torch.empty(2, 3, 3, device="meta"))
        with pytest.raises(ValueError, match="x must be float16, bfloat16, float32 or float64; got torch.int64"):
            call(torch.ones(2, 3, dtype=torch.long), w, h, d)
        # zuko does not use the minimum sizes: a K * min_bin_width >= 1 is not an error there. nflows
        # accepts zero minimums, and so does the op.
        call(x, w, h, d, parameterization="zuko", min_bin_width=0.5)
        call(x, w, h, d, min_bin_width=0.0, min_bin_height=0.0, min_derivative=0.0)


# ------------------------------------------------------------------------------------------------
# Interpreter tier: the Triton kernel (interpreted on CPU) against the reference
# ------------------------------------------------------------------------------------------------

# (name, x shape, K, layout of the conditioner output the parameters are sliced from)
LAYOUTS = [
    ("B=1 [B, D, 3K-1]", (1, 7), 5, "last"),
    ("odd [B, D*(3K-1)] viewed", (3, 5), 2, "flat"),
    ("conv [B, C(3K-1), H, W] permuted", (2, 3, 3, 5), 8, "conv"),
    ("transposed x, params [B, 3K-1, D] transposed", (3, 4), 5, "transposed"),
    ("many rows per program", (37, 3), 8, "last"),
    ("long row over column blocks", (2, 70), 5, "last"),
]


def _make_inputs(shape, K, layout, dtype, bound, device="cpu", spread=1.3, scale=2.0):
    """x (uniform over ``spread`` times the interval) and one conditioner output h (``scale`` times
    standard normal), drawn once; ``make(as_dtype)`` returns fresh leaves [x, h] and the op's arguments
    (x, widths, heights, derivatives) with the parameters as strided views of h."""
    P = 3 * K - 1
    B, *rest = shape
    base_x = spread * bound * (2 * torch.rand(shape, dtype=torch.float64) - 1)
    if layout == "conv":
        base_h = scale * torch.randn(B, rest[0] * P, *rest[1:], dtype=torch.float64)
    elif layout == "transposed":  # x column-major, parameters with K stride D
        base_x = base_x.t().contiguous().t()
        base_h = scale * torch.randn(B, P, *rest, dtype=torch.float64)
    else:
        base_h = scale * torch.randn(B, *rest, P, dtype=torch.float64)
    base_x, base_h = base_x.to(device=device, dtype=dtype), base_h.to(device=device, dtype=dtype)

    def make(as_dtype=None):
        x, h = leaves(*(b if as_dtype is None else b.to(as_dtype) for b in (base_x, base_h)))
        if layout == "conv":
            hv = h.view(B, rest[0], P, *rest[1:]).movedim(2, -1)
        elif layout == "transposed":
            hv = h.movedim(1, -1)
        elif layout == "flat":
            hv = h.reshape(B, -1).view(B, *rest, P)
        else:
            hv = h
        return (x, hv[..., :K], hv[..., K:2 * K], hv[..., 2 * K:]), [x, h]

    return make


def _spline_fn(parameterization, inverse, reduction, bound):
    def fn(x, w, h, d):
        return ops.rational_quadratic_spline(x, w, h, d, inverse=inverse, parameterization=parameterization,
                                             bound=bound, reduction=reduction)

    return fn


def _assert_matches_by_rule(fn, make, device="cpu"):
    """The kernel in the inputs' dtype against the float64 reference, by the rule of fastdensity.testing
    (|kernel - ref64| <= 2 |eager - ref64| + atol): outputs and the gradients of x and h."""
    args, _ = make()
    with torch.no_grad(), fastdensity.set_backend("reference"):
        y, ld = fn(*args)
    gen = torch.Generator(device).manual_seed(7)
    # One upstream gradient for all three runs, in the outputs' dtypes (y: x's dtype, logdet: float32).
    gy = torch.randn(y.shape, device=device, generator=gen).to(y.dtype)
    gl = torch.randn(ld.shape, device=device, generator=gen).to(ld.dtype)

    def run(backend_name, as_dtype=None):
        args, grad_leaves = make(as_dtype)
        with fastdensity.set_backend(backend_name):
            y, ld = fn(*args)
        loss = (y.double() * gy.double()).sum() + (ld.double() * gl.double()).sum()
        return [y, ld, *torch.autograd.grad(loss, grad_leaves)]

    kernel, eager, ref64 = run("triton"), run("reference"), run("reference", torch.float64)
    for name, k, e, r in zip(["y", "logdet", "grad_x", "grad_h"], kernel, eager, ref64):
        result = compare(name, k, e, r)
        assert result.passed, str(result)


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("name,shape,K,layout", LAYOUTS, ids=[n for n, *_ in LAYOUTS])
def test_kernel_matches_reference(name, shape, K, layout, inverse, parameterization, dtype):
    bound = 1.5
    reduction = "none" if layout in ("conv", "flat") else "sum"
    fn = _spline_fn(parameterization, inverse, reduction, bound)
    if dtype == torch.float64:
        assert_kernel_matches_reference(fn, _make_inputs(shape, K, layout, dtype, bound))
    else:
        # fp32 is judged by the design's rule against float64. With logits ~ 2 N(0, 1) some bins are a few
        # thousandths wide and slopes near their minimum, where a 1-ulp rounding of an exp is amplified
        # ~1e3-fold in the gradients: kernel and eager then land anywhere within that, and the max of a
        # few dozen elements decides the rule (kernel within 2x of eager failed ~2% of draws, though the
        # kernel's 99.9th-percentile error is 3-10x below eager's). Unit-scale logits keep the test about
        # the kernel (0 failures in 96 draws); float64 above covers the steep bins exactly.
        _assert_matches_by_rule(fn, _make_inputs(shape, K, layout, dtype, bound, scale=1.0))


@requires_interpreter
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("inverse", [False, True])
def test_kernel_with_32_bins(parameterization, inverse):
    fn = _spline_fn(parameterization, inverse, "sum", 2.0)
    assert_kernel_matches_reference(fn, _make_inputs((2, 3), 32, "last", torch.float64, 2.0))


@requires_interpreter
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("inverse", [False, True])
def test_kernel_on_knots_bounds_and_extremes(parameterization, inverse):
    """The special points of the reference tier through the kernel: same values and log-dets, finite
    gradients everywhere, and the gradients of y (continuous across knots, unlike the log-det's) equal."""
    n, K, bound = 6, 5, 1.5
    w, h, d = _params((n,), K, scale=3.0)
    w[0], h[1], d[2], w[3, 0] = 60.0, -60.0, 60.0, -60.0
    x = _special_points(w, h, d, parameterization, bound, inverse)
    m = x.shape[1]
    base = (x, w[:, None].expand(n, m, K), h[:, None].expand(n, m, K), d[:, None].expand(n, m, K - 1))
    fn = _spline_fn(parameterization, inverse, "none", bound)
    results = {}
    for backend_name in ("triton", "reference"):
        args = leaves(*base)
        with fastdensity.set_backend(backend_name):
            y, ld = fn(*args)
        grads_all = torch.autograd.grad(y.sum() + ld.sum(), args, retain_graph=True)
        for name, g in zip(("x", "widths", "heights", "derivatives"), grads_all):
            assert torch.isfinite(g).all(), f"{backend_name}: non-finite gradient of {name}"
        results[backend_name] = (y, ld, *torch.autograd.grad(y.sum(), args))
    for k, r in zip(results["triton"], results["reference"]):
        # Values equal to float64 round-off; a knot computed in another summation order may put a point
        # in the neighbouring bin, where the (same) value comes out of the other bin's formula with the
        # bin's conditioning (measured: up to 4e-10 in the gradients at the knots of steep bins).
        torch.testing.assert_close(k, r, rtol=1e-8, atol=1e-8)


@requires_interpreter
@pytest.mark.parametrize("parameterization,inverse", [("nflows", False), ("zuko", True)])
def test_kernel_gradcheck(parameterization, inverse):
    x = 1.3 * (2 * torch.rand(2, 3, dtype=torch.float64) - 1)
    args = leaves(x, *_params((2, 3), 3, scale=1.0))
    # fast_mode: one random projection of the Jacobian instead of every column (the interpreter runs ~0.1 s
    # a call); every input's gradient is also checked against the reference above.
    with fastdensity.set_backend("triton"):
        assert torch.autograd.gradcheck(_spline_fn(parameterization, inverse, "sum", 1.1), args, fast_mode=True)


@requires_interpreter
def test_kernel_with_unused_logdet_or_output():
    x = 2 * torch.randn(3, 4, dtype=torch.float64)
    w, h, d = _params((3, 4), 4)
    for pick in (0, 1):
        grads = {}
        for backend_name in ("triton", "reference"):
            args = leaves(x, w, h, d)
            with fastdensity.set_backend(backend_name):
                out = ops.rational_quadratic_spline(*args)[pick]
            grads[backend_name] = torch.autograd.grad(out.sum(), args, allow_unused=True)
        for gk, gr in zip(grads["triton"], grads["reference"]):
            gr = torch.zeros_like(gk) if gr is None else gr
            torch.testing.assert_close(gk, gr)


@requires_interpreter
def test_nan_inputs_propagate_like_the_reference():
    x = torch.randn(3, 4)
    w, h, d = _params((3, 4), 4, dtype=torch.float32)
    x[0, 1] = float("nan")
    h[2, 3, 1] = float("nan")
    outs = {}
    for backend_name in ("triton", "reference"):
        with fastdensity.set_backend(backend_name):
            outs[backend_name] = ops.rational_quadratic_spline(x, w, h, d, reduction="none")
    for k, r in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(k, r, equal_nan=True)
    y, ld = outs["triton"]
    assert torch.isnan(y[0, 1]) and torch.isnan(y[2, 3]) and torch.isnan(ld[2, 3])
    assert torch.isfinite(y[1]).all() and torch.isfinite(ld[1]).all()


@requires_interpreter
@pytest.mark.parametrize("inverse", [False, True])
def test_empty_inputs(inverse):
    for shape in ((0, 4), (2, 0, 3)):
        x = torch.randn(shape, requires_grad=True)
        w, h, d = leaves(*_params(shape, 4, dtype=torch.float32))
        with fastdensity.set_backend("triton"):
            y, logdet = ops.rational_quadratic_spline(x, w, h, d, inverse=inverse)
        assert y.shape == x.shape and logdet.shape == (shape[0],) and not logdet.any()
        grads = torch.autograd.grad(y.sum() + logdet.sum(), (x, w, h, d))
        assert [g.shape for g in grads] == [x.shape, w.shape, h.shape, d.shape]


@requires_interpreter
def test_fake_and_autograd_registrations_match_the_kernel():
    """torch.library.opcheck: fake outputs (shapes, dtypes, strides - channels-last in, channels-last out),
    the schema, and the autograd registration, on strided views of one conditioner output."""
    K = 3
    x = torch.randn(2, 3, 2, 2).to(memory_format=torch.channels_last).requires_grad_()
    h = torch.randn(2, 3, 2, 2, 3 * K - 1, requires_grad=True)
    for inverse, parameterization, per_element in ((False, "nflows", False), (True, "zuko", True)):
        args = (x, h[..., :K], h[..., K:2 * K], h[..., 2 * K:], inverse, parameterization, 1.5, 1e-3, 1e-3, 1e-3,
                1e-3, per_element)
        torch.library.opcheck(torch.ops.fastdensity.rational_quadratic_spline, args)


@requires_interpreter
def test_compile_fullgraph_runs_the_kernel():
    """torch.compile(fullgraph=True) of a small spline coupling: no graph break, same loss and gradients."""
    K = 4
    net = torch.nn.Linear(2, 2 * (3 * K - 1)).double()

    def flow_nll(x):
        x1, x2 = x.chunk(2, dim=1)
        h = net(x1).view(x.shape[0], 2, 3 * K - 1)
        z2, logdet = ops.rational_quadratic_spline(x2, h[..., :K], h[..., K:2 * K], h[..., 2 * K:], bound=2.0)
        z = torch.cat([x1, z2], dim=1)
        return (0.5 * z.pow(2).sum(1) - logdet).mean()

    assert_compiles_like_reference(flow_nll, (2 * torch.randn(5, 4, dtype=torch.float64),), net.parameters(),
                                   backend="aot_eager")


# ------------------------------------------------------------------------------------------------
# GPU tier: fp32 / bf16 / fp16 against float64 by the rule of fastdensity.testing
# ------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape,K,layout", [((65536, 16), 8, "last"), ((256, 1536), 8, "last"),
                                            ((7, 3, 33, 31), 5, "conv"), ((64, 40), 32, "flat")])
def test_gpu_matches_fp64_reference(shape, K, layout, inverse, parameterization, dtype):
    bound = 3.0
    fn = _spline_fn(parameterization, inverse, "sum", bound)
    # Unit-scale logits, as in the interpreter tier's fp32 test (see there).
    make = _make_inputs(shape, K, layout, dtype, bound, device="cuda", spread=1.2, scale=1.0)
    _assert_matches_by_rule(fn, make, "cuda")


@requires_cuda
@pytest.mark.gpu
def test_gpu_past_int32_offsets():
    """Parameters past 2**31 elements: int32 offsets would wrap on the last elements' parameters."""
    K, P = 8, 23
    n = 2 ** 31 // P + 4096  # [1, n] x: its last ~4096 elements' parameters lie past offset 2**31
    need = 3 * n * P * 2 + 8 * n * 2  # h and its gradient (bf16), headroom for a third; x, y, gx
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB free on the GPU, has {free / 2**30:.0f}")
    x = (2 * torch.randn(1, n, device="cuda")).to(torch.bfloat16).requires_grad_()
    h = torch.randn(1, n, P, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with fastdensity.set_backend("triton"):
        y, _ = ops.rational_quadratic_spline(x, h[..., :K], h[..., K:2 * K], h[..., 2 * K:], bound=3.0,
                                             reduction="none")
    gx, gh = torch.autograd.grad(y, (x, h), torch.ones((), device="cuda", dtype=y.dtype).expand_as(y))
    tail = slice(n - 8192, n)
    xt, ht = x[:, tail].detach().double(), h[:, tail].detach().double().requires_grad_()
    xt.requires_grad_()
    y_ref, _ = ref.rational_quadratic_spline(xt, ht[..., :K], ht[..., K:2 * K], ht[..., 2 * K:], bound=3.0,
                                             reduction="none")
    gx_ref, gh_ref = torch.autograd.grad(y_ref.sum(), (xt, ht))
    # bf16 storage: values and gradients carry half a bf16 ulp (2**-9) of rounding, plus the steepest
    # bins' amplification; the failure this guards against (wrapped offsets) gives O(1) errors.
    torch.testing.assert_close(y[:, tail].double(), y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx[:, tail].double(), gx_ref, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(gh[:, tail].double(), gh_ref, rtol=5e-2, atol=5e-2)
