"""Discretized mixture of logistics: reference against PixelCNN++ and the math, kernel against the
reference (interpreter), the sampler against the exact probabilities, GPU tier by the rule."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fastdensity
from fastdensity import ops
from fastdensity.kernels import dmol as kdmol
from fastdensity.nn import DiscretizedLogisticMixture
from fastdensity.reference import dmol as ref
from fastdensity.testing import ATOL, compare
from helpers import assert_compiles_like_reference, assert_kernel_matches_reference, leaves, requires_cuda


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def grid_values(shape, num_bits=8, dtype=torch.float64, edges=True):
    """Random data on the bit grid, with (when ``edges``) the lowest and highest values planted."""
    levels = ref.num_levels(num_bits)
    v = torch.randint(0, levels + 1, shape)
    if edges and v.numel() >= 4:
        flat = v.view(-1)
        flat[0], flat[1], flat[-1] = 0, levels, levels
        flat[flat.numel() // 2] = 0
    return (2.0 * v.double() / levels - 1.0).to(dtype)


def random_params(B, C, K, H, W, dtype=torch.float64, log_scale=(-8.0, 1.0), mean_scale=0.7):
    """PixelCNN++-shaped parameters that reach every branch: log-scales from below the -7 clamp to
    broad components, means spread so that some bins are far out in a component's tail."""
    params = torch.empty(B, ref.num_params(K, C), H, W, dtype=torch.float64)
    logits, means, log_scales, coeffs = ref.split_params(params, C)  # views into params
    logits.copy_(2.0 * torch.randn_like(logits))
    means.copy_(mean_scale * torch.randn_like(means))
    log_scales.uniform_(*log_scale)
    if coeffs is not None:
        coeffs.copy_(torch.randn_like(coeffs))
    return params.to(dtype)


def branch_masks(x, params, num_bits=8):
    """Which of PixelCNN++'s four cases each (b, c, k, h, w) takes, in float64: lower, upper, mass, centre."""
    x, params = x.double(), params.double()
    _, means, log_scales, coeffs = ref.split_params(params, x.shape[1])
    mu = ref.coupled_means(means, coeffs, x)
    s = log_scales.clamp(min=ref.LOG_SCALE_MIN).exp()
    h, edge = ref.bin_half_width(num_bits), ref.edge_threshold(num_bits)
    xk = x.unsqueeze(2).expand_as(mu)
    mass = torch.sigmoid((xk - mu + h) / s) - torch.sigmoid((xk - mu - h) / s)
    lower, upper = xk < -edge, xk > edge
    inner = ~lower & ~upper
    return lower, upper, inner & (mass > ref.MIN_BIN_MASS), inner & (mass <= ref.MIN_BIN_MASS)


# ------------------------------------------------------------------------------------------------
# A deliberately literal port of PixelCNN++'s discretized_mix_logistic_loss (openai/pixel-cnn,
# nn.py): NHWC, the naive CDF difference, the nested selects and the 8-bit constants spelled out.
# Written from its semantics for these tests; it returns per-pixel log-likelihoods [B, H, W] (the
# loss is minus their sum) and the per-channel log-probabilities [B, H, W, C, K].
# ------------------------------------------------------------------------------------------------


def softplus(t):
    # TensorFlow's softplus, log(1 + e^t) to full precision. torch's F.softplus returns t itself above
    # t = 20, an absolute error of e^-20 ~ 2e-9 that a float64 comparison would see.
    return torch.logaddexp(t, torch.zeros_like(t))


def pixelcnnpp_log_prob_literal(x_nhwc, l_nhwc):
    B, H, W, C = x_nhwc.shape
    n_mix = l_nhwc.shape[-1] // (10 if C == 3 else 3)
    logit_probs = l_nhwc[..., :n_mix]
    rest = l_nhwc[..., n_mix:].reshape(B, H, W, C, (3 if C == 3 else 2) * n_mix)
    means = rest[..., :n_mix]
    log_scales = torch.maximum(rest[..., n_mix:2 * n_mix], torch.tensor(-7.0, dtype=rest.dtype))
    xr = x_nhwc.reshape(B, H, W, C, 1) + torch.zeros(B, H, W, C, n_mix, dtype=x_nhwc.dtype)
    if C == 3:
        coeffs = torch.tanh(rest[..., 2 * n_mix:3 * n_mix])
        m2 = (means[..., 1, :] + coeffs[..., 0, :] * xr[..., 0, :]).reshape(B, H, W, 1, n_mix)
        m3 = (means[..., 2, :] + coeffs[..., 1, :] * xr[..., 0, :]
              + coeffs[..., 2, :] * xr[..., 1, :]).reshape(B, H, W, 1, n_mix)
        means = torch.cat([means[..., 0:1, :], m2, m3], dim=3)
    centered = xr - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / 255.0)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered - 1.0 / 255.0)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - softplus(plus_in)  # the value 0
    log_one_minus_cdf_min = -softplus(min_in)  # the value 255
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * softplus(mid_in)
    log_probs = torch.where(
        xr < -0.999, log_cdf_plus,
        torch.where(xr > 0.999, log_one_minus_cdf_min,
                    torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-12)),
                                log_pdf_mid - math.log(127.5))))
    per_component = log_probs.sum(dim=3) + torch.log_softmax(logit_probs, dim=-1)
    return torch.logsumexp(per_component, dim=-1), log_probs


def to_nhwc(t):
    return t.permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------------
# Reference tier
# ------------------------------------------------------------------------------------------------


def test_constants_are_pixelcnnpps():
    assert ref.bin_half_width(8) == 1.0 / 255.0
    assert ref.edge_threshold(8) == 0.999
    assert ref.log_half_levels(8) == math.log(127.5)
    assert ref.edge_threshold(1) == 1.0 - 0.255 and ref.bin_half_width(1) == 1.0
    # For every bit depth the thresholds sit strictly between the two outermost grid values.
    for bits in range(1, 17):
        second = 1.0 - 2.0 * ref.bin_half_width(bits)
        assert second < ref.edge_threshold(bits) < 1.0
    # The kernel spells the same constants out (it does not import the reference).
    assert (kdmol.LOG_SCALE_MIN, kdmol.MIN_BIN_MASS, kdmol.EDGE_MARGIN_BINS) == (
        ref.LOG_SCALE_MIN, ref.MIN_BIN_MASS, ref.EDGE_MARGIN_BINS)
    assert ref.num_params(10) == 100 and ref.num_params(5, channels=1) == 15


@pytest.mark.parametrize("C,K", [(3, 5), (1, 4)])
def test_reference_matches_literal_pixelcnnpp(C, K):
    """float64, random parameters, data including the values 0 and 255: values and gradients agree
    with the literal port, and each of the four cases occurs."""
    B, H, W = 3, 6, 7
    x = grid_values((B, C, H, W))
    params = random_params(B, C, K, H, W)
    counts = [int(m.sum()) for m in branch_masks(x, params)]
    assert min(counts) > 5, f"every case must occur (lower, upper, mass, centre): {counts}"

    xr, pr = leaves(x, params)
    ours = ref.dmol_log_prob(xr, pr, reduction="none")
    xl, pl = leaves(x, params)
    theirs, theirs_per_channel = pixelcnnpp_log_prob_literal(to_nhwc(xl), to_nhwc(pl))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    # Per channel and component too, so a case that carries little weight in the mixture still counts.
    _, means, log_scales, coeffs = ref.split_params(params, C)
    per_channel = ref.discretized_logistic_log_prob(
        x.unsqueeze(2), ref.coupled_means(means, coeffs, x), log_scales.clamp(min=-7.0))
    torch.testing.assert_close(per_channel, theirs_per_channel.permute(0, 3, 4, 1, 2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref.dmol_log_prob(x, params), theirs.sum(dim=(1, 2)), rtol=1e-10, atol=1e-10)

    g = torch.randn_like(ours)
    grads_ours = torch.autograd.grad((ours * g).sum(), (xr, pr))
    grads_theirs = torch.autograd.grad((theirs * g).sum(), (xl, pl))
    for got, want in zip(grads_ours, grads_theirs):
        # A log-scale exactly at -7 would split torch.maximum's gradient; uniform draws never land there.
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def test_interior_mass_does_not_cancel_in_float32():
    """Bins in a component's upper tail, where both sigmoids round towards 1: the stable identity keeps
    float32 close to float64; the literal CDF difference does not (the reason the reference uses it)."""
    mu, log_s = torch.tensor(0.0), torch.tensor(-4.0)  # s = 0.018: bins 0.43 scales wide
    x = torch.tensor([0.1, 0.13, 0.15, 0.18])  # 5-10 scales out: masses 1e-2 .. 2e-5, sigmoids ~ 1 - mass
    exact = ref.discretized_logistic_log_prob(x.double(), mu.double(), log_s.double())
    ours = ref.discretized_logistic_log_prob(x, mu, log_s)
    a = (x - mu + 1 / 255) * torch.exp(-log_s)
    b = (x - mu - 1 / 255) * torch.exp(-log_s)
    literal = torch.log(torch.sigmoid(a) - torch.sigmoid(b))
    assert (exact > math.log(1e-5)).all()  # all four take the mass branch
    err_ours = (ours.double() - exact).abs().max().item()
    err_literal = (literal.double() - exact).abs().max().item()
    assert err_ours < 1e-5 and err_literal > 10 * err_ours, (err_ours, err_literal)


@pytest.mark.parametrize("num_bits", [1, 4, 8])
def test_one_channel_probabilities_sum_to_one(num_bits):
    """Summed over all 2^bits values of a one-channel pixel, the probabilities are 1.

    Below 1e-5 a bin's mass is replaced by the density at its centre (PixelCNN++); for 8-bit bins that
    is accurate to ~(2h/s)^2/24 relative on masses below 1e-5, so the sum is 1 to ~1e-6.
    """
    levels = ref.num_levels(num_bits)
    K = 4
    params = random_params(1, 1, K, 1, 1, log_scale=(-5.0, 0.0)).expand(1, 3 * K, 1, levels + 1)
    x = (2.0 * torch.arange(levels + 1, dtype=torch.float64) / levels - 1.0).view(1, 1, 1, -1)
    total = ref.dmol_log_prob(x, params, num_bits=num_bits, reduction="none").exp().sum()
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rgb_probabilities_sum_to_one(backend):
    """All 16^3 joint values of a 4-bit RGB pixel: the coupled channels form one distribution.

    The components are broad enough (s >= e^-1.5, |mean| <= 0.6) that no bin drops below 1e-5, so
    the sum is exact up to rounding. The kernel reads the broadcast (stride-0) params in place.
    """
    num_bits, K, levels = 4, 3, 15
    params = random_params(1, 3, K, 1, 1, log_scale=(-1.5, 0.0), mean_scale=0.2)
    _, means, _, coeffs = ref.split_params(params, 3)
    means.clamp_(-0.6, 0.6)
    coeffs.clamp_(-0.5, 0.5)
    grid = 2.0 * torch.arange(levels + 1, dtype=torch.float64) / levels - 1.0
    r, g, b = torch.meshgrid(grid, grid, grid, indexing="ij")
    x = torch.stack([r, g, b]).reshape(1, 3, 64, 64)
    _, _, mass, centre = branch_masks(x, params.expand(1, 10 * K, 64, 64), num_bits)
    assert int(centre.sum()) == 0 and int(mass.sum()) > 0
    with fastdensity.set_backend(backend):
        log_p = ops.dmol_log_prob(x, params.expand(1, 10 * K, 64, 64), num_bits=num_bits, reduction="none")
    torch.testing.assert_close(log_p.exp().sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)


def test_centre_fallback_is_the_logistic_density():
    """Far in a component's tail the log-prob is the logistic log-density at x times the bin width 2/255."""
    mu, log_s = torch.tensor([0.1, -0.3], dtype=torch.float64), torch.tensor([-6.0, -5.0], dtype=torch.float64)
    x = torch.tensor([0.5, 0.2], dtype=torch.float64)
    logistic = torch.distributions.TransformedDistribution(
        torch.distributions.Uniform(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)),
        [torch.distributions.SigmoidTransform().inv, torch.distributions.AffineTransform(mu, log_s.exp())])
    expected = logistic.log_prob(x) + math.log(2.0 / 255.0)
    torch.testing.assert_close(ref.discretized_logistic_log_prob(x, mu, log_s), expected)


@pytest.mark.parametrize("C", [3, 1])
def test_reference_gradcheck(C):
    x = grid_values((1, C, 2, 3))
    params = random_params(1, C, 2, 2, 3, log_scale=(-6.0, 0.5))
    x, params = leaves(x, params)
    assert torch.autograd.gradcheck(lambda a, p: ref.dmol_log_prob(a, p, reduction="none"), (x, params))


# ------------------------------------------------------------------------------------------------
# Interpreter tier: the Triton kernel (interpreted on CPU) against the reference
# ------------------------------------------------------------------------------------------------

# (name, C, K, B, H, W, layout)
CASES = [
    ("B=1 one pixel K=1 RGB", 3, 1, 1, 1, 1, "contiguous"),
    ("odd K=3 5x7 RGB", 3, 3, 2, 5, 7, "contiguous"),
    ("one channel K=5 3x11", 1, 5, 2, 3, 11, "contiguous"),
    ("channels-last params and x", 3, 2, 2, 3, 5, "channels_last"),
    ("params a slice of a wider output, x strided", 3, 2, 2, 3, 4, "strided"),
    ("two pixel blocks per image", 1, 2, 1, 13, 11, "contiguous"),
]


def log_scale_range(compute_dtype):
    """Log-scales drawn for kernel-vs-reference runs: the whole range in float64, >= -5 otherwise.

    At s = e^-7 a coefficient's last ulp moves a mean by ulp * |x| and the log-prob by 1/s times that,
    so the posteriors - and every gradient - carry ~1e-5 relative error in any float32 implementation
    (the kernel's tanh, ~1 ulp, against torch's correctly rounded one on CPU). On a few dozen pixels
    one such element decides the rule's maxima, which makes its factor of 2 a coin toss. float64 runs,
    the clamp test and the GPU tier's thousands of pixels cover that corner instead.
    """
    return (-8.0, 1.0) if compute_dtype == torch.float64 else (-5.0, 1.0)


def _case_inputs(C, K, B, H, W, layout, dtype):
    """``make(cast)`` -> (args, leaves): fresh leaves of ``cast`` applied to one fixed draw of x and
    params, laid out as ``layout`` says (the args are views of the leaves where the layout needs it)."""
    x = grid_values((B, C, H, W), dtype=dtype)
    params = random_params(B, C, K, H, W, dtype=dtype, log_scale=log_scale_range(dtype))
    if layout == "strided":
        wide = torch.randn(B, params.shape[1] + 3, H, W, dtype=dtype)
        wide[:, 2:2 + params.shape[1]] = params
        x_wide = torch.zeros(B, C, H, 2 * W, dtype=dtype)
        x_wide[..., ::2] = x
        x, params = x_wide, wide

    def make(cast):
        xl, pl = leaves(cast(x), cast(params))
        if layout == "channels_last":
            xl = xl.detach().to(memory_format=torch.channels_last).requires_grad_()
            pl = pl.detach().to(memory_format=torch.channels_last).requires_grad_()
            return (xl, pl), [xl, pl]
        if layout == "strided":
            return (xl[..., ::2], pl[:, 2:2 + ref.num_params(K, C)]), [xl, pl]
        return (xl, pl), [xl, pl]

    return make


def fresh_leaves(*tensors):
    """``make(cast)`` for plain tensors: each one cast, a fresh leaf, and an argument."""
    def make(cast):
        args = leaves(*(cast(t) for t in tensors))
        return tuple(args), args
    return make


def same(t):
    return t


def rule_floor(ref64, dtype, compute_dtype):
    """The rule's floor for one output: ``ATOL`` is a few ulps of O(1) values, and these outputs are not
    O(1) (gradients reach ~1e3 through 1/s <= e^7, per-image sums ~1e4), so it is raised to 16 ulps (of
    the compute dtype) of the output's largest magnitude; a wrong formula is off by O(1) relative. Half
    outputs (gradients of half params) keep ATOL: eager rounds them to the same format."""
    if dtype not in (torch.float32, torch.float64):
        return ATOL[dtype]
    scale = ref64.detach().abs().max().item() if ref64.numel() else 0.0
    return max(ATOL[dtype], 16 * torch.finfo(compute_dtype).eps * scale)


def assert_kernel_within_rule(fn, make, names=("log_prob", "grad_x", "grad_params")):
    """The GPU tier's rule (``fastdensity.testing.compare``), also applied to float32 in the interpreter:
    on the same inputs, the kernel's values and gradients may be at most twice as far from the float64 reference
    as the reference in the kernel's own dtype is, plus a floor. In float32 a gradient can be ~2e3
    (1/s up to e^7) and both paths carry the same ~1e-6 relative rounding of the posteriors, so a
    fixed tolerance would be either loose on the values or tight on the gradients; the rule is neither.
    NaN-poisoned outputs fail it (NaN must appear exactly where the reference has NaN)."""
    runs = []
    upstream = None
    for backend, cast in [("triton", same), ("reference", same), ("reference", lambda t: t.double())]:
        args, grad_leaves = make(cast)
        with fastdensity.set_backend(backend):
            out = fn(*args)
        if upstream is None:
            upstream = torch.randn(out.shape, dtype=torch.float64, device=out.device)
        grads = torch.autograd.grad((out.double() * upstream).sum(), grad_leaves)
        runs.append([out, *grads])
    compute_dtype = runs[0][0].dtype  # the log-prob comes out in the dtype the kernel computed in
    for name, k, e, r in zip(names, *runs):
        result = compare(name, k, e, r, atol=rule_floor(r, k.dtype, compute_dtype))
        assert result.passed, str(result)


def assert_kernel_matches(fn, make, dtype):
    """float64: kernel and reference agree to assert_close's float64 defaults; otherwise by the rule."""
    if dtype == torch.float64:
        assert_kernel_matches_reference(fn, lambda: make(same))
    else:
        assert_kernel_within_rule(fn, make)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("name,C,K,B,H,W,layout", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(name, C, K, B, H, W, layout, reduction, dtype):
    make = _case_inputs(C, K, B, H, W, layout, dtype)
    fn = lambda x, p: ops.dmol_log_prob(x, p, reduction=reduction)  # noqa: E731
    assert_kernel_matches(fn, make, dtype)


# log(0) and 0/0 where 1/s underflows (log-scale 120 in float32) are computed and discarded by tl.where;
# the interpreter's numpy warns about them, a GPU does not.
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_every_case_and_the_clamp(dtype):
    """Parameters placed on each case: both edges, the mass and the centre fallback, log-scales below,
    at (gradient passes, as torch.clamp) and far above -7 (1/s underflowing in float32)."""
    x = torch.tensor([-1.0, 1.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2], dtype=dtype).view(1, 1, 1, 8)
    means = torch.tensor([0.3, -0.2, 0.2, 0.21, 0.9, 0.2, 0.2, -0.5], dtype=dtype)
    log_s = torch.tensor([-3.0, -2.0, -9.0, -7.0, -6.0, 3.0, 120.0, -5.5], dtype=dtype)
    params = torch.stack([torch.zeros_like(means), means, log_s]).view(1, 3, 1, 8)
    lower, upper, mass, centre = branch_masks(x, params)
    assert lower.any() and upper.any() and mass.any() and centre.any()
    fn = lambda x, p: ops.dmol_log_prob(x, p, reduction="none")  # noqa: E731
    assert_kernel_matches(fn, fresh_leaves(x, params), dtype)
    xp, pp = leaves(x, params)
    with fastdensity.set_backend("triton"):
        (grad_p,) = torch.autograd.grad(ops.dmol_log_prob(xp, pp).sum(), (pp,))
    assert grad_p[0, 2, 0, 2] == 0 and grad_p[0, 2, 0, 3] != 0  # -9 clamped away, -7 passes


def test_kernel_gradcheck():
    """float64 gradcheck of the kernel's backward for params and x: every entry of the Jacobian on one
    RGB pixel with K=2 (each interpreted forward costs ~0.1 s), then gradcheck's fast mode (random
    projections of the Jacobian) on a 2x2 image with K=3 and a per-pixel output."""
    torch.manual_seed(2)
    # The data avoid the edges: gradcheck nudges x by 1e-6, and -1 - 1e-6 is outside [-1, 1].
    x, params = leaves(grid_values((1, 3, 1, 1), edges=False), random_params(1, 3, 2, 1, 1, log_scale=(-6.0, 0.5)))
    with fastdensity.set_backend("triton"):
        assert torch.autograd.gradcheck(lambda a, p: ops.dmol_log_prob(a, p), (x, params))
    x, params = leaves(grid_values((1, 3, 2, 2), edges=False), random_params(1, 3, 3, 2, 2, log_scale=(-6.0, 0.5)))
    with fastdensity.set_backend("triton"):
        assert torch.autograd.gradcheck(lambda a, p: ops.dmol_log_prob(a, p, reduction="none"), (x, params),
                                        fast_mode=True)


# float16 runs correctly in the interpreter (loads upcast, stores round); bfloat16 does not (GPU tier).
@triton.jit
def _tanh_probe(z_ptr, c_ptr, dc_ptr, N: tl.constexpr, SERIES_TERMS: tl.constexpr):
    offs = tl.arange(0, N)
    c, dc = kdmol._tanh(tl.load(z_ptr + offs), SERIES_TERMS)
    tl.store(c_ptr + offs, c)
    tl.store(dc_ptr + offs, dc)


@pytest.mark.skipif(not kdmol.INTERPRETED, reason="on a GPU Triton's fp32 exp is ex2.approx; the GPU tier "
                                                  "checks the op's results instead")
def test_kernel_tanh_is_accurate():
    """The kernel's tanh (coefficients shift means, so their last ulps matter): within 3 ulps, and its
    derivative 1 - tanh^2 within 5, in float32 and float64, against torch in float64."""
    for dtype, terms in [(torch.float32, 9), (torch.float64, 15)]:
        z = torch.cat([torch.linspace(-3.0, 3.0, 4093, dtype=dtype), torch.tensor([0.0, 1e-30, 20.0], dtype=dtype)])
        c, dc = torch.empty_like(z), torch.empty_like(z)
        _tanh_probe[(1,)](z, c, dc, N=z.numel(), SERIES_TERMS=terms)
        for got, want, ulps in [(c, torch.tanh(z.double()), 3.0), (dc, torch.cosh(z.double()) ** -2, 5.0)]:
            ulp = torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(want.abs().clamp_min(1e-300)))
            err = ((got.double() - want).abs() / ulp).max().item()
            assert err <= ulps, (dtype, err)


@pytest.mark.parametrize("x_dtype,p_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                             (torch.float32, torch.float16), (torch.float16, torch.float16)])
def test_kernel_mixed_dtypes(x_dtype, p_dtype):
    """x and params in different dtypes: computed in params' compute dtype (float32 for half params),
    gradients in each one's own dtype."""
    compute = ref.compute_dtype(p_dtype)
    x = grid_values((2, 3, 3, 4), dtype=x_dtype)
    params = random_params(2, 3, 2, 3, 4, dtype=p_dtype, log_scale=log_scale_range(compute))
    fn = lambda x, p: ops.dmol_log_prob(x, p)  # noqa: E731
    assert_kernel_matches(fn, fresh_leaves(x, params), compute)
    with fastdensity.set_backend("triton"):
        out = ops.dmol_log_prob(x, params)
    assert out.dtype == ref.compute_dtype(p_dtype)


def test_kernel_without_grad_for_x():
    """x as plain data (the usual case): no x gradient is computed, params' gradient is unchanged."""
    x, params = grid_values((2, 3, 3, 3)), random_params(2, 3, 3, 3, 3)
    p_ref, p_ker = leaves(params, params)
    (g_ref,) = torch.autograd.grad(ref.dmol_log_prob(x, p_ref).sum(), (p_ref,))
    with fastdensity.set_backend("triton"):
        (g_ker,) = torch.autograd.grad(ops.dmol_log_prob(x, p_ker).sum(), (p_ker,))
    torch.testing.assert_close(g_ker, g_ref)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_kernel_int64_offsets_match_int32_offsets(monkeypatch, reduction):
    """The WIDE launches (int64 offsets within an image, which the launcher picks when one could pass
    2^31 - 1) give bit for bit what the int32 launches give; forced here by lowering the limit, with
    channels-last params and x requiring a gradient, so that every offset of both kernels is exercised."""
    x = grid_values((2, 3, 3, 5)).requires_grad_()
    params = random_params(2, 3, 3, 3, 5).to(memory_format=torch.channels_last).requires_grad_()

    def run():
        with fastdensity.set_backend("triton"):
            out = ops.dmol_log_prob(x, params, reduction=reduction)
            return (out, *torch.autograd.grad((out * out).sum(), (x, params)))

    narrow = run()
    assert not kdmol._needs_wide(15, 16, 3, 5, (5, 1), (15, 3))
    monkeypatch.setattr(kdmol, "_INT32_MAX", 0)
    assert kdmol._needs_wide(15, 16, 3, 5, (5, 1), (15, 3))
    for got, want in zip(run(), narrow):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# The interpreter runs both sides of every tl.where in numpy, which warns about the -inf - -inf it computes
# (and discards) in the log-sum-exp step; on a GPU nothing is reported.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_kernel_nan_stays_in_its_pixel_and_minus_inf_logits():
    x, params = grid_values((1, 3, 2, 3)), random_params(1, 3, 3, 2, 3)
    params[0, 0, :, :] = float("-inf")  # component 0 switched off everywhere
    params[0, 16, 1, 2] = float("nan")  # one pixel's G log-scale of component 1 (K=3: G's block is 12..20)
    with fastdensity.set_backend("triton"):
        out = ops.dmol_log_prob(x, params, reduction="none")
    expected = ref.dmol_log_prob(x, params, reduction="none")
    assert torch.isnan(out[0, 1, 2]) and torch.isfinite(out.flatten()[:-1]).all()
    torch.testing.assert_close(out, expected, equal_nan=True)


def test_kernel_empty_inputs():
    with fastdensity.set_backend("triton"):
        assert ops.dmol_log_prob(torch.zeros(0, 3, 4, 4), torch.zeros(0, 20, 4, 4)).shape == (0,)
        out = ops.dmol_log_prob(torch.zeros(2, 1, 0, 4), torch.zeros(2, 3, 0, 4))
        assert out.shape == (2,) and (out == 0).all()
        assert ops.dmol_log_prob(torch.zeros(2, 1, 0, 4), torch.zeros(2, 3, 0, 4), reduction="none").shape == (2, 0, 4)


def test_compile_fullgraph_runs_the_kernel():
    """torch.compile(fullgraph=True) of a tiny PixelCNN++-style head and its loss: no graph break, same
    loss and gradients as eager."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    net = torch.nn.Conv2d(3, 20, 1).double()
    head = DiscretizedLogisticMixture(num_mixtures=2)

    def nll(x):
        return -head.log_prob(x, net(x)).mean()

    assert_compiles_like_reference(nll, (grid_values((2, 3, 3, 3)),), net.parameters())


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_messages(backend):
    x, p = grid_values((2, 3, 4, 4), dtype=torch.float32), torch.randn(2, 30, 4, 4)
    with fastdensity.set_backend(backend):
        with pytest.raises(ValueError, match=r"x must lie in \[-1, 1\].*got values from -1.0 to 1.5"):
            bad = x.clone()
            bad[0, 0, 0, 0] = 1.5
            ops.dmol_log_prob(bad, p)
        with pytest.raises(ValueError, match="params must have 10K channels for x with three colour channels.*got 37$"):
            ops.dmol_log_prob(x, torch.randn(2, 37, 4, 4))
        with pytest.raises(ValueError, match="params must have 3K channels for x with one channel.*got 10"):
            ops.dmol_log_prob(x[:, :1], torch.randn(2, 10, 4, 4))
        with pytest.raises(ValueError, match="must have 10K channels.*got 9; 9 = 3K would suit x with one channel"):
            ops.dmol_log_prob(x, torch.randn(2, 9, 4, 4))
        with pytest.raises(ValueError, match=r"x must be \[B, C, H, W\] with C = 3 \(RGB\) or 1; got shape \(2, 2,"):
            ops.dmol_log_prob(x[:, :2], p)
        with pytest.raises(ValueError, match=r"params must be \[B, P, H, W\] with x's B, H, W = 2, 4, 4; got shape"):
            ops.dmol_log_prob(x, torch.randn(2, 30, 4, 5))
        with pytest.raises(ValueError, match="x must be float32, float64 or params' dtype"):
            ops.dmol_log_prob(x.bfloat16(), p)
        with pytest.raises(ValueError, match="x must be on the same device as params"):
            ops.dmol_log_prob(x, p.to("meta"))
        with pytest.raises(ValueError, match="num_bits must be an integer from 1 to 16; got 0"):
            ops.dmol_log_prob(x, p, num_bits=0)
        with pytest.raises(ValueError, match="reduction must be one of 'sum', 'none'; got 'mean'"):
            ops.dmol_log_prob(x, p, reduction="mean")
        with pytest.raises(ValueError, match="x must have 4 dims"):
            ops.dmol_log_prob(x[0], p)
        # validate_args=False skips only the range check (the one that reads data back to the host).
        out = ops.dmol_log_prob(x * 1.01, p, validate_args=False)
        assert out.shape == (2,)


def test_meta_tensors_give_the_shape_with_validate_args():
    """validate_args=True reads x's range back to the host; meta tensors have no data to read, so the
    check is skipped for them (as inside torch.compile) and shape inference works."""
    x, p = torch.empty(2, 3, 4, 4, device="meta"), torch.empty(2, 30, 4, 4, device="meta")
    assert ops.dmol_log_prob(x, p).shape == (2,)
    assert ops.dmol_log_prob(x, p, reduction="none", validate_args=True).shape == (2, 4, 4)


def test_module_validates_its_arguments():
    with pytest.raises(ValueError, match="channels must be 1 or 3; got 2"):
        DiscretizedLogisticMixture(4, channels=2)
    with pytest.raises(ValueError, match="num_mixtures must be a positive integer"):
        DiscretizedLogisticMixture(0)
    head = DiscretizedLogisticMixture(4)
    with pytest.raises(ValueError, match=r"params must be \[B, 40, H, W\] for 4 mixture components over 3"):
        head.sample(torch.randn(1, 30, 2, 2))


# ------------------------------------------------------------------------------------------------
# The module and its sampler
# ------------------------------------------------------------------------------------------------


def test_module_log_prob_is_the_op():
    head = DiscretizedLogisticMixture(num_mixtures=3, channels=1, num_bits=5)
    assert head.out_channels == 9 == DiscretizedLogisticMixture.num_params(3, channels=1)
    x, params = grid_values((2, 1, 3, 3), num_bits=5), random_params(2, 1, 3, 3, 3)
    torch.testing.assert_close(head(x, params), ref.dmol_log_prob(x, params, num_bits=5))
    torch.testing.assert_close(head.log_prob(x, params, reduction="none"),
                               ref.dmol_log_prob(x, params, num_bits=5, reduction="none"))
    assert "num_mixtures=3, channels=1, num_bits=5" in repr(head)


def _chi_square_ok(samples_codes, probs, n):
    """Pearson's chi-square of the empirical histogram against ``probs``, cells with < 5 expected
    pooled; accepted below df + 6 sqrt(2 df) (the statistic has mean df and sd sqrt(2 df))."""
    counts = torch.bincount(samples_codes, minlength=probs.numel()).double()
    expected = probs * n
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    exp = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    stat = ((obs - exp) ** 2 / exp.clamp_min(1e-12)).sum().item()
    df = int(keep.sum())
    return stat < df + 6 * math.sqrt(2 * df), stat, df


def test_sampler_matches_exact_probabilities_rgb():
    """3-bit RGB, strong channel coupling: the joint histogram of 2^17 draws matches the op's 512
    joint probabilities (which sum to 1 up to the 1e-5 fallback)."""
    num_bits, K, levels = 3, 3, 7
    head = DiscretizedLogisticMixture(K, channels=3, num_bits=num_bits)
    params = random_params(1, 3, K, 1, 1, log_scale=(-2.5, -0.5), mean_scale=0.5)
    _, _, _, coeffs = ref.split_params(params, 3)
    coeffs.copy_(torch.tensor([1.5, -1.2, 0.9]).view(1, 3, 1, 1, 1).expand_as(coeffs))
    grid = 2.0 * torch.arange(levels + 1, dtype=torch.float64) / levels - 1.0
    r, g, b = torch.meshgrid(grid, grid, grid, indexing="ij")
    x_all = torch.stack([r, g, b]).reshape(1, 3, 8, 64)
    probs = ref.dmol_log_prob(x_all, params.expand(1, 10 * K, 8, 64), num_bits=num_bits,
                              reduction="none").exp().flatten()
    assert abs(probs.sum().item() - 1.0) < 1e-4
    n = 2 ** 17
    gen = torch.Generator().manual_seed(3)
    draws = head.sample(params.expand(1, 10 * K, 256, 512), generator=gen)  # [1, 3, 256, 512]
    assert draws.dtype == torch.float64 and draws.shape == (1, 3, 256, 512)
    v = torch.round((draws + 1.0) * levels / 2.0).long()
    torch.testing.assert_close(draws, 2.0 * v.double() / levels - 1.0, rtol=0, atol=1e-12)  # on the grid
    codes = (v[0, 0] * 64 + v[0, 1] * 8 + v[0, 2]).flatten()
    ok, stat, df = _chi_square_ok(codes, probs, n)
    assert ok, f"chi-square {stat:.1f} with {df} degrees of freedom"


def test_sampler_matches_exact_probabilities_one_channel():
    num_bits, K = 8, 4
    head = DiscretizedLogisticMixture(K, channels=1, num_bits=num_bits)
    params = random_params(1, 1, K, 1, 1, dtype=torch.float32, log_scale=(-4.0, -1.0))
    x_all = (2.0 * torch.arange(256, dtype=torch.float32) / 255 - 1.0).view(1, 1, 1, 256)
    probs = ref.dmol_log_prob(x_all, params.expand(1, 3 * K, 1, 256), reduction="none").exp().flatten().double()
    n = 2 ** 17
    draws = head.sample(params.expand(1, 3 * K, 256, 512), generator=torch.Generator().manual_seed(5))
    assert draws.dtype == torch.float32
    codes = torch.round((draws + 1.0) * 127.5).long().flatten()
    ok, stat, df = _chi_square_ok(codes, probs, n)
    assert ok, f"chi-square {stat:.1f} with {df} degrees of freedom"


def test_sampler_is_reproducible_with_a_generator():
    head = DiscretizedLogisticMixture(2)
    params = random_params(2, 3, 2, 4, 4, dtype=torch.float32)
    a = head.sample(params, generator=torch.Generator().manual_seed(0))
    b = head.sample(params, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 3, 4, 4) and a.abs().max() <= 1


# ------------------------------------------------------------------------------------------------
# GPU tier: fp32 / bf16 / fp16 params against float64 by the rule of fastdensity.testing
# ------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("C,K,B,H,W,layout", [(3, 10, 64, 32, 32, "contiguous"), (1, 5, 7, 33, 31, "contiguous"),
                                              (3, 3, 16, 17, 19, "channels_last")])
def test_gpu_matches_fp64_reference(C, K, B, H, W, layout, reduction, dtype):
    torch.manual_seed(11)
    # Log-scales kept >= -5 so the centre fallback approximates a mass near 1e-5 well: an element whose
    # mass sits within rounding of the threshold may switch case between float32 and float64.
    x = grid_values((B, C, H, W), dtype=torch.float32).cuda()
    params = random_params(B, C, K, H, W, dtype=torch.float32, log_scale=(-5.0, 0.5)).to("cuda", dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        params = params.to(memory_format=torch.channels_last)

    fn = lambda a, p: ops.dmol_log_prob(a, p, reduction=reduction, validate_args=False)  # noqa: E731
    assert_kernel_within_rule(fn, fresh_leaves(x, params))


@requires_cuda
@pytest.mark.gpu
def test_gpu_past_int32_offsets():
    """params with more than 2**31 elements: the last image's last channels sit past int32 offsets."""
    B, K, H, W = 2, 10, 3300, 3300  # 2 * 100 * 3300^2 = 2.18e9 elements
    free, _ = torch.cuda.mem_get_info()
    need = 2 * B * 10 * K * H * W * 2 + 4 * B * H * W * 16  # bf16 params and grad, x and statistics
    if free < 1.5 * need:
        pytest.skip(f"needs ~{1.5 * need / 2**30:.0f} GiB free on the GPU, has {free / 2**30:.0f}")
    torch.manual_seed(0)
    params = torch.randn(B, 10 * K, H, W, device="cuda", dtype=torch.bfloat16).requires_grad_()
    x = (torch.randint(0, 256, (B, 3, H, W), device="cuda").float() * (2 / 255) - 1)
    with fastdensity.set_backend("triton"):
        out = ops.dmol_log_prob(x, params, reduction="none", validate_args=False)
    (grad,) = torch.autograd.grad(out.sum(), (params,))
    tail = (slice(1, 2), slice(None), slice(H - 2, H), slice(W - 64, W))
    p_tail = params.detach()[tail].double().requires_grad_()
    out_ref = ref.dmol_log_prob(x[tail].double(), p_tail, reduction="none")
    (grad_ref,) = torch.autograd.grad(out_ref.sum(), (p_tail,))
    torch.testing.assert_close(out[tail[0], tail[2], tail[3]].double(), out_ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad[tail].double(), grad_ref, rtol=2e-2, atol=2e-2)  # bf16 gradients
