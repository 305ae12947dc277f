"""Gaussian and logistic mixtures: reference against torch.distributions, kernels (per-sample and
shared-parameter paths) against the reference, the GaussianMixture module, GPU tier by the rule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as dist

import fastdensity
from fastdensity import ops
from fastdensity.kernels import mixture as kmix
from fastdensity.kernels import mixture_shared as kshared
from fastdensity.nn import GaussianMixture
from fastdensity.reference import mixture as ref
from fastdensity.testing import compare
from helpers import assert_compiles_like_reference, assert_kernel_matches_reference, leaves, requires_cuda

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on infinities, interpreter only

KINDS = ["gaussian", "logistic"]
OPS = {"gaussian": ops.gaussian_mixture_log_prob, "logistic": ops.logistic_mixture_log_prob}


def _params(batch_logits, batch_params, K, D, dtype=torch.float64, scale_spread=0.5):
    logits = torch.randn(*batch_logits, K, dtype=dtype)
    means = torch.randn(*batch_params, K, D, dtype=dtype)
    log_scales = scale_spread * torch.randn(*batch_params, K, D, dtype=dtype)
    return logits, means, log_scales


def _torch_mixture(kind, logits, means, log_scales):
    """The same mixture built from torch.distributions (the field's definition)."""
    scales = log_scales.exp()
    if kind == "gaussian":
        comp = dist.Normal(means, scales)
    else:  # logistic: the inverse-CDF transform of a uniform, as torch documents it
        base = dist.Uniform(torch.zeros_like(means), torch.ones_like(means), validate_args=False)
        comp = dist.TransformedDistribution(
            base, [dist.SigmoidTransform().inv, dist.AffineTransform(means, scales)], validate_args=False)
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Independent(comp, 1), validate_args=False)


# ------------------------------------------------------------------------------------------------
# Reference tier
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_x,batch_logits,batch_params", [
    ((6,), (6,), (6,)),          # per sample
    ((6,), (), ()),              # shared
    ((2, 3), (3,), (1, 3)),      # broadcast over a leading dim
])
def test_reference_matches_torch_distributions(kind, batch_x, batch_logits, batch_params):
    K, D = 4, 3
    logits, means, log_scales = _params(batch_logits, batch_params, K, D)
    x = 1.5 * torch.randn(*batch_x, D, dtype=torch.float64)
    expected = _torch_mixture(kind, logits, means, log_scales).log_prob(x)
    torch.testing.assert_close(ref.mixture_log_prob(x, logits, means, log_scales, kind), expected)


def test_reference_logistic_density_integrates_to_one():
    # One feature, two components: the trapezoid rule over a wide grid recovers total mass 1.
    grid = torch.linspace(-60, 60, 200001, dtype=torch.float64)[:, None]
    logits = torch.tensor([0.3, -1.0], dtype=torch.float64)
    means = torch.tensor([[-2.0], [3.0]], dtype=torch.float64)
    log_scales = torch.tensor([[0.2], [-0.7]], dtype=torch.float64)
    p = ref.logistic_mixture_log_prob(grid, logits, means, log_scales).exp()
    assert abs(torch.trapezoid(p, grid[:, 0]).item() - 1.0) < 1e-8


@pytest.mark.parametrize("kind", KINDS)
def test_reference_gradcheck(kind):
    logits, means, log_scales = _params((3,), (3,), 2, 3)
    x = torch.randn(3, 3, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, logits, means, log_scales)]
    assert torch.autograd.gradcheck(lambda *a: ref.mixture_log_prob(*a, kind), args)


def test_reference_half_inputs_give_fp32():
    logits, means, log_scales = (t.half() for t in _params((), (), 3, 2))
    out = ref.gaussian_mixture_log_prob(torch.randn(5, 2).half(), logits, means, log_scales)
    assert out.dtype == torch.float32 and out.shape == (5,)


# ------------------------------------------------------------------------------------------------
# Interpreter tier
# ------------------------------------------------------------------------------------------------


def _inputs(x, logits, means, log_scales, views=None):
    """Fresh leaves per call; ``views`` maps each leaf to the argument passed (strided views)."""
    base = (x, logits, means, log_scales)

    def make():
        ls = leaves(*base)
        args = [v(t) for v, t in zip(views, ls)] if views else ls
        return tuple(args), ls

    return make


def _case_inputs(name, dtype):
    """(tensors, views) for one layout of LAYOUTS."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))

    def rnd(*shape, scale=1.0):
        return scale * torch.randn(*shape, dtype=dtype, generator=g)

    if name == "B=1 K=1 D=1":
        return (rnd(1, 1), rnd(1, 1), rnd(1, 1, 1), rnd(1, 1, 1, scale=0.3)), None
    if name == "per-sample, odd K and D":
        return (rnd(7, 5), rnd(7, 3), rnd(7, 3, 5), rnd(7, 3, 5, scale=0.3)), None
    if name == "shared [K], [K, D], many programs":
        return (rnd(11, 3), rnd(5), rnd(5, 3), rnd(5, 3, scale=0.3)), None
    if name == "per-sample logits, shared means, [1, K, D] scales":
        return (rnd(9, 4), rnd(9, 3), rnd(3, 4), rnd(1, 3, 4, scale=0.3)), None
    if name == "S draws: x [S, B, D], params [B, K, D]":
        return (rnd(2, 5, 3), rnd(5, 2), rnd(5, 2, 3), rnd(5, 2, 3, scale=0.3)), None
    if name == "one x [D] under many parameter sets":
        return (rnd(3), rnd(4, 2), rnd(4, 2, 3), rnd(4, 2, 3, scale=0.3)), None
    if name == "strided views":
        # x transposed; logits every other entry; means/log_scales interleaved in one tensor's last dim
        views = [lambda t: t.t(), lambda t: t[:, ::2], lambda t: t[..., 0::2], lambda t: t[..., 1::2]]
        return (rnd(3, 6), rnd(6, 6), rnd(6, 3, 6), rnd(6, 3, 6, scale=0.3)), views
    if name == "three batch dims, mixed broadcasting (copied)":
        return (rnd(2, 3, 2, 3), rnd(2, 1, 2, 2), rnd(1, 3, 1, 2, 3), rnd(2, 2, 3, scale=0.3)), None
    raise KeyError(name)


LAYOUTS = [
    "B=1 K=1 D=1",
    "per-sample, odd K and D",
    "shared [K], [K, D], many programs",
    "per-sample logits, shared means, [1, K, D] scales",
    "S draws: x [S, B, D], params [B, K, D]",
    "one x [D] under many parameter sets",
    "strided views",
    "three batch dims, mixed broadcasting (copied)",
]

# fp32: kernel and reference sum D and K terms in different orders (and the kernel uses exp2): a few
# ulps of |log p| <~ 30 and of gradients up to ~50 (1/sigma^2 with sigma down to ~0.4).
TOL = {torch.float64: {}, torch.float32: {"rtol": 2e-5, "atol": 2e-5}}


@pytest.fixture
def small_tiles(monkeypatch):
    """Two or three rows per program, so partial sums over programs and ragged last blocks are exercised."""
    monkeypatch.setattr(kmix, "TILE_ELEMS", 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", LAYOUTS)
def test_kernel_matches_reference(name, kind, dtype, small_tiles):
    tensors, views = _case_inputs(name, dtype)
    assert_kernel_matches_reference(OPS[kind], _inputs(*tensors, views=views), **TOL[dtype])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
def test_kernel_feature_chunks(monkeypatch, kind, shared):
    """D = 11 in chunks of 4: the chunked forward sum and the two-pass backward with its scratch."""
    monkeypatch.setattr(kmix, "MAX_BLOCK_D", 4)
    batch = () if shared else (6,)
    logits, means, log_scales = _params(batch, batch, 3, 11)
    x = torch.randn(6, 11, dtype=torch.float64)
    assert_kernel_matches_reference(OPS[kind], _inputs(x, logits, means, log_scales))


@pytest.fixture
def shared_path(monkeypatch):
    """Route every fully shared mixture to kernels/mixture_shared.py, with tiles of 4 rows x 2 components."""
    monkeypatch.setattr(kmix, "SHARED_MIN_KD", 1)
    monkeypatch.setattr(kshared, "BLOCK_N", 4)
    monkeypatch.setattr(kshared, "BLOCK_K", 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_shared_kernel_matches_reference(kind, dtype, shared_path):
    # 13 rows x 5 components: 4 row tiles (the last ragged) x 3 component tiles (the last half empty),
    # rows split over 2 programs in the parameter-gradient kernel; x transposed (strided rows).
    logits, means, log_scales = _params((), (), 5, 3, dtype=dtype)
    x = torch.randn(3, 13, dtype=dtype)
    views = [lambda t: t.t()] + [lambda t: t] * 3
    assert_kernel_matches_reference(OPS[kind], _inputs(x, logits, means, log_scales, views=views), **TOL[dtype])


def test_shared_path_is_taken(monkeypatch, shared_path):
    calls = []
    monkeypatch.setattr(kmix, "shared_forward", lambda *a: calls.append("fwd") or kshared.shared_forward(*a))
    monkeypatch.setattr(kmix, "shared_backward", lambda *a: calls.append("bwd") or kshared.shared_backward(*a))
    logits, means, log_scales = _params((), (), 3, 2)
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    with fastdensity.set_backend("triton"):
        ops.gaussian_mixture_log_prob(x, logits, means, log_scales).sum().backward()
    assert calls == ["fwd", "bwd"]


@pytest.mark.parametrize("kind,path", [("gaussian", "per-sample"), ("logistic", "per-sample"), ("gaussian", "shared")])
def test_kernel_float32_within_the_gpu_rule(monkeypatch, kind, path):
    """The GPU tier's rule (fastdensity.testing.compare) in float32, where the interpreter computes like a
    GPU up to its exp/log: |log p| ~ 100 (D = 32 narrow-ish Gaussians), so the weights exp(v_k - log p)
    are only as good as the cancellation of the dominant score's rounding, which eager gets by computing
    log p from the very scores it differentiates. The backward must round its scores as the forward did."""
    monkeypatch.setattr(kmix, "SHARED_MIN_KD", 1 if path == "shared" else 10 ** 9)
    B, K, D = 32, 4, 32
    g = torch.Generator().manual_seed(0)
    batch = () if path == "shared" else (B,)
    base = (torch.randn(B, D, generator=g), torch.randn(*batch, K, generator=g),
            torch.randn(*batch, K, D, generator=g), 0.5 * torch.randn(*batch, K, D, generator=g))
    upstream = torch.randn(B, dtype=torch.float64, generator=g)
    runs = []
    for backend, cast in [("triton", lambda t: t), ("reference", lambda t: t), ("reference", lambda t: t.double())]:
        args = leaves(*(cast(t) for t in base))
        with fastdensity.set_backend(backend):
            out = OPS[kind](*args)
        runs.append([out, *torch.autograd.grad((out.double() * upstream).sum(), args)])
    for name, k, e, r in zip(["log_prob", "grad_x", "grad_logits", "grad_means", "grad_log_scales"], *runs):
        result = compare(name, k, e, r)
        assert result.passed, str(result)


@pytest.mark.parametrize("path", ["per-sample", "shared"])
def test_kernel_parameters_as_expanded_views(monkeypatch, path):
    """Parameters passed as ``expand()`` views of [K] / [K, D] tensors (stride 0 along the batch): the
    gradients with respect to the views are per row, as for any [B, K, D] input, and reach the bases."""
    monkeypatch.setattr(kmix, "SHARED_MIN_KD", 1 if path == "shared" else 10 ** 9)
    B, K, D = 5, 3, 2
    logits, means, log_scales = _params((), (), K, D)
    x = torch.randn(B, D, dtype=torch.float64)

    def make():
        xl, *bases = leaves(x, logits, means, log_scales)
        views = [bases[0].expand(B, K), bases[1].expand(B, K, D), bases[2].expand(B, K, D)]
        return (xl, *views), [xl, *views, *bases]

    assert_kernel_matches_reference(ops.gaussian_mixture_log_prob, make)


@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
def test_kernel_without_grad_for_x(monkeypatch, shared):
    """x as plain data (fitting a mixture): the parameters' gradients are unchanged, and the shared path
    skips the kernel that would compute the unused x gradient."""
    monkeypatch.setattr(kmix, "SHARED_MIN_KD", 1 if shared else 10 ** 9)

    class Unlaunchable:  # stands in for the x-gradient kernel: launching it, kernel[grid](...), fails
        def __getitem__(self, grid):
            raise AssertionError("the x-gradient kernel ran although x needs no gradient")

    monkeypatch.setattr(kshared, "_shared_bwd_x_kernel", Unlaunchable())
    batch = () if shared else (6,)
    x = torch.randn(6, 3, dtype=torch.float64)
    params = _params(batch, batch, 4, 3)
    p_ref, p_ker = leaves(*params), leaves(*params)
    upstream = torch.randn(6, dtype=torch.float64)
    g_ref = torch.autograd.grad((ref.gaussian_mixture_log_prob(x, *p_ref) * upstream).sum(), p_ref)
    with fastdensity.set_backend("triton"):
        g_ker = torch.autograd.grad((ops.gaussian_mixture_log_prob(x, *p_ker) * upstream).sum(), p_ker)
    for k, r in zip(g_ker, g_ref):
        torch.testing.assert_close(k, r)


@pytest.mark.parametrize("path", ["per-sample", "shared"])
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_extreme_values(monkeypatch, kind, path, small_tiles):
    """Far tails (|u| up to ~1e3), a zero-weight component (-inf logit), narrow and wide scales."""
    monkeypatch.setattr(kmix, "SHARED_MIN_KD", 1 if path == "shared" else 10 ** 9)
    batch = () if path == "shared" else (5,)
    logits, means, log_scales = _params(batch, batch, 3, 4)
    logits[..., 1] = -math.inf
    log_scales[0] = -6.0
    log_scales[1] = 4.0
    x = torch.randn(5, 4, dtype=torch.float64)
    x[2] = 40.0
    x[3] = -25.0
    assert_kernel_matches_reference(OPS[kind], _inputs(x, logits, means, log_scales))


def _log_space_log_prob(x, logits, means, log_scales, kind):
    """The mixture log-likelihood in float64 with u = sign(r) exp(log|r| - l): an independent yardstick
    that stays exact where exp(-l) overflows even float64."""
    x, logits, means, log_scales = (t.double() for t in (x, logits, means, log_scales))
    r = x.unsqueeze(-2) - means
    u = torch.sign(r) * torch.exp(torch.log(r.abs()) - log_scales)  # r = 0 gives sign 0 * exp(-inf) = 0
    if kind == "gaussian":
        per_dim = -0.5 * u * u - log_scales - ref.HALF_LOG_2PI
    else:
        per_dim = -u.abs() - 2 * torch.log1p(torch.exp(-u.abs())) - log_scales
    return torch.logsumexp(torch.log_softmax(logits, -1) + per_dim.sum(-1), -1)


@pytest.mark.parametrize("path", ["reference", "per-sample", "shared"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,narrow", [(torch.float32, -100.0), (torch.float64, -750.0)])
def test_log_scales_past_the_exp_range_stay_finite(monkeypatch, kind, path, dtype, narrow):
    """A component narrower than exp(-l) can represent (l = -100 in float32: exp(100) overflows) gave
    NaN at x = mu (0 * inf) and -inf for tiny residuals. The result, and every gradient, must be finite
    and right wherever the exact answer is representable."""
    monkeypatch.setattr(kmix, "SHARED_MIN_KD", 1 if path == "shared" else 10 ** 9)
    tiny = torch.finfo(dtype).tiny  # a normal residual whose u = tiny * exp(-l) is moderate
    x = torch.tensor([[0.0, 0.0, 0.0],          # exactly at the narrow component's mean
                      [tiny, 0.0, -tiny],       # residuals of a few ulps of 0
                      [1e4 * tiny, 0.0, 0.0],   # u ~ 1e4 tiny e^-l: far out, finite score
                      [0.3, -1.2, 2.0]], dtype=dtype)  # the narrow component weighs nothing here
    logits = torch.tensor([0.0, -1.0], dtype=dtype)
    means = torch.tensor([[0.0, 0.0, 0.0], [0.5, -1.0, 1.5]], dtype=dtype)
    log_scales = torch.tensor([[narrow] * 3, [0.2, -0.3, 0.1]], dtype=dtype)
    if path != "shared":  # per-sample parameters: one set per row
        logits, means, log_scales = (t.expand(4, *t.shape).contiguous() for t in (logits, means, log_scales))
    exact = _log_space_log_prob(x, logits, means, log_scales, kind)
    assert torch.isfinite(exact).all() and exact.abs().max() < torch.finfo(dtype).max
    args = [t.clone().requires_grad_() for t in (x, logits, means, log_scales)]
    with fastdensity.set_backend("reference" if path == "reference" else "triton"):
        out = OPS[kind](*args)
    grads = torch.autograd.grad(out.sum(), args)
    # The narrow component's score is ~ -3 l ~ 300 (float32) or 2250 (float64): a few ulps of it.
    torch.testing.assert_close(out.double(), exact, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    for g in grads:
        assert torch.isfinite(g).all(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_log_scale_cap_matches_the_reference(dtype):
    """The kernels split exp(-l) at the same exponent as the reference, so both round alike."""
    assert kshared.LOG_SCALE_CAP[dtype] == ref.log_scale_cap(dtype)
    assert math.isfinite(math.exp(ref.log_scale_cap(dtype))) and torch.isfinite(
        torch.exp(torch.tensor(ref.log_scale_cap(dtype), dtype=dtype)))
    a, b = ref.inverse_scale_factors(torch.tensor([0.0, -50.0, -150.0], dtype=dtype))
    assert b[0] == 1 and b[1] == 1 and torch.isfinite(a * b)[:2].all() and torch.isfinite(a).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["per-sample", "shared"])
def test_kernel_gradcheck(monkeypatch, kind, path):
    # Two rows, two components, two features: gradcheck perturbs every input element one at a time.
    if path == "shared":
        monkeypatch.setattr(kmix, "SHARED_MIN_KD", 1)
        logits, means, log_scales = _params((), (), 2, 2)
    else:
        logits, means, log_scales = _params((2,), (2,), 2, 2)
    x = torch.randn(2, 2, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (x, logits, means, log_scales)]
    with fastdensity.set_backend("triton"):
        assert torch.autograd.gradcheck(OPS[kind], args)


@pytest.mark.parametrize("shared", [False, True])
def test_nan_stays_in_its_row(monkeypatch, shared):
    monkeypatch.setattr(kmix, "SHARED_MIN_KD", 1 if shared else 10 ** 9)
    batch = () if shared else (4,)
    logits, means, log_scales = _params(batch, batch, 3, 2, dtype=torch.float32)
    x = torch.randn(4, 2)
    x[1, 0] = math.nan
    with fastdensity.set_backend("triton"):
        out = ops.gaussian_mixture_log_prob(x, logits, means, log_scales)
    assert out[1].isnan() and torch.isfinite(out[[0, 2, 3]]).all()


def test_empty_batch():
    logits, means, log_scales = _params((), (), 3, 2)
    x = torch.randn(0, 2, dtype=torch.float64, requires_grad=True)
    with fastdensity.set_backend("triton"):
        out = ops.gaussian_mixture_log_prob(x, logits, means, log_scales)
        (g,) = torch.autograd.grad(out.sum(), x)
    assert out.shape == (0,) and g.shape == (0, 2)


def test_compile_fullgraph_runs_the_kernel():
    """A tiny mixture density network: per-sample parameters from a linear layer, compiled fullgraph."""
    torch._dynamo.reset()
    K, D = 3, 2
    net = torch.nn.Linear(4, K + 2 * K * D).double()

    def nll(h, x):
        out = net(h)
        logits, means, log_scales = out[:, :K], out[:, K:K + K * D], out[:, K + K * D:]
        lp = ops.gaussian_mixture_log_prob(x, logits, means.view(-1, K, D), log_scales.view(-1, K, D))
        return -lp.mean()

    h, x = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, D, dtype=torch.float64)
    assert_compiles_like_reference(nll, (h, x), net.parameters())


# ------------------------------------------------------------------------------------------------
# The precision study behind kernels/mixture_shared.py (pure torch, small)
# ------------------------------------------------------------------------------------------------


def test_matmul_expansion_is_less_accurate_than_the_direct_form():
    """The reason the shared kernel expands the quadratic form only where its cancellation criterion allows.

    Narrow components (sigma in [0.05, 0.2]) spread over N(0, 1), data drawn from them: the float32
    expansion's error exceeds the GPU-tier bound (2x eager float32 + 1e-5) by a wide margin, while
    the direct form (the reference in float32, which is the kernel's arithmetic) is eager itself.
    """
    g = torch.Generator().manual_seed(0)
    N, K, D = 512, 64, 32
    means = torch.randn(K, D, dtype=torch.float64, generator=g)
    log_scales = torch.empty(K, D, dtype=torch.float64).uniform_(math.log(0.05), math.log(0.2), generator=g)
    logits = torch.randn(K, dtype=torch.float64, generator=g)
    comp = torch.randint(0, K, (N,), generator=g)
    x = means[comp] + log_scales[comp].exp() * torch.randn(N, D, dtype=torch.float64, generator=g)
    x32, l32, m32, s32 = (t.float() for t in (x, logits, means, log_scales))
    ref64 = ref.gaussian_mixture_log_prob(*(t.double() for t in (x32, l32, m32, s32)))
    eager_err = (ref.gaussian_mixture_log_prob(x32, l32, m32, s32).double() - ref64).abs().max().item()

    P = torch.exp(-2 * s32)
    scores = (x32 * x32) @ (-0.5 * P).T + x32 @ (m32 * P).T - 0.5 * (m32 * m32 * P).sum(1) - s32.sum(1) \
        - D * ref.HALF_LOG_2PI + torch.log_softmax(l32, 0)
    expansion_err = (torch.logsumexp(scores, 1).double() - ref64).abs().max().item()
    assert expansion_err > 10 * (2 * eager_err + 1e-5), (expansion_err, eager_err)


# ------------------------------------------------------------------------------------------------
# GaussianMixture module
# ------------------------------------------------------------------------------------------------


def test_module_log_prob_and_gradients_reach_every_parameter():
    gmm = GaussianMixture(3, 4).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    lp = gmm.log_prob(x)
    torch.testing.assert_close(lp, ref.gaussian_mixture_log_prob(x, gmm.logits, gmm.means, gmm.log_scales))
    assert torch.equal(gmm(x), lp)
    grads = torch.autograd.grad(lp.sum(), list(gmm.parameters()))
    assert all(gr.abs().sum() > 0 for gr in grads)
    with fastdensity.set_backend("triton"):
        torch.testing.assert_close(gmm.log_prob(x), lp)


def test_module_samples_follow_the_mixture():
    gmm = GaussianMixture(2, 3).double()
    with torch.no_grad():
        gmm.logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
        gmm.means.copy_(torch.tensor([[-4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]))
        gmm.log_scales.fill_(math.log(0.5))
    s = gmm.sample(20000, generator=torch.Generator().manual_seed(0))
    assert s.shape == (20000, 2) and s.dtype == torch.float64
    pi = torch.softmax(gmm.logits.detach(), 0)
    # The sample mean is within ~5 standard errors (std of the mixture is < 4) of sum_k pi_k mu_k.
    torch.testing.assert_close(s.mean(0), pi @ gmm.means.detach(), rtol=0, atol=0.15)
    assert gmm.sample(0).shape == (0, 2)


def test_module_kmeanspp_seeding_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[-10.0, 0.0], [0.0, 10.0], [10.0, 0.0]])
    sizes = [300, 200, 100]
    x = torch.cat([c + 0.3 * torch.randn(n, 2, generator=g) for c, n in zip(centers, sizes)])
    gmm = GaussianMixture(2, 3, data=x, generator=torch.Generator().manual_seed(1))
    nearest = torch.cdist(centers, gmm.means.detach()).argmin(dim=1)
    assert sorted(nearest.tolist()) == [0, 1, 2]  # one seed per cluster
    torch.testing.assert_close(gmm.means.detach()[nearest], centers, rtol=0, atol=0.1)
    torch.testing.assert_close(gmm.logits.detach().exp()[nearest], torch.tensor([0.5, 1 / 3, 1 / 6]))
    torch.testing.assert_close(gmm.log_scales.detach().exp()[nearest], torch.full((3, 2), 0.3), rtol=0, atol=0.05)


def test_module_training_lowers_the_nll():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100, 2, generator=g) - 3, torch.randn(100, 2, generator=g) + 3])
    gmm = GaussianMixture(2, 2, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(gmm.parameters(), lr=0.1)
    first = None
    for _ in range(30):
        loss = -gmm.log_prob(x).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0


def test_module_bad_input():
    with pytest.raises(ValueError, match="components must be a positive integer; got 0"):
        GaussianMixture(2, 0)
    gmm = GaussianMixture(3, 4)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 3\] \(features=3\); got \(5, 2\)"):
        gmm.log_prob(torch.randn(5, 2))
    with pytest.raises(ValueError, match="data must have at least components=4 rows to seed from; got 3"):
        gmm.init_from_data(torch.randn(3, 3))


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mismatches_name_the_tensors(backend):
    x, logits = torch.randn(4, 3), torch.randn(4, 2)
    means, log_scales = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    f = ops.gaussian_mixture_log_prob
    with fastdensity.set_backend(backend):
        with pytest.raises(ValueError, match=r"means must have shape \[\.\.\., K, D\] = \[\.\.\., 2, 3\] "
                                             r"\(K from logits \(4, 2\), D from x \(4, 3\)\); got \(4, 5, 3\)"):
            f(x, logits, torch.randn(4, 5, 3), log_scales)
        with pytest.raises(ValueError, match=r"log_scales must have shape \[\.\.\., K, D\] = \[\.\.\., 2, 3\] "
                                             r"\(K from logits \(4, 2\), D from x \(4, 3\)\); got \(4, 2, 4\)"):
            ops.logistic_mixture_log_prob(x, logits, means, torch.randn(4, 2, 4))
        with pytest.raises(ValueError, match=r"the batch dims do not broadcast: x \(4,\), logits \(5,\), "
                                             r"means \(4,\), log_scales \(4,\)"):
            f(x, torch.randn(5, 2), means, log_scales)
        with pytest.raises(ValueError, match="means must have at least 2 dims; got shape"):
            f(x, logits, torch.randn(3), log_scales)
        with pytest.raises(ValueError, match="log_scales must have the same dtype as x, torch.float32; "
                                             "got torch.float64"):
            f(x, logits, means, log_scales.double())
        with pytest.raises(ValueError, match=r"a mixture needs K >= 1 components"):
            f(x, torch.randn(4, 0), torch.randn(4, 0, 3), torch.randn(4, 0, 3))


# ------------------------------------------------------------------------------------------------
# GPU tier
# ------------------------------------------------------------------------------------------------


def _gpu_case(shape_case, dtype):
    g = torch.Generator("cuda").manual_seed(0)
    (bx, bp, K, D) = shape_case

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device="cuda", generator=g)).to(dtype)

    return rnd(*bx, D), rnd(*bp, K), rnd(*bp, K, D), rnd(*bp, K, D, scale=0.5)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape_case", [((65536,), (65536,), 16, 32), ((1000,), (1000,), 7, 33),
                                        ((8192,), (), 256, 64), ((4096,), (), 5, 3),
                                        ((3, 512), (512,), 4, 2000)],
                         ids=["mdn-65536x16x32", "mdn-odd", "shared-8192x256x64", "shared-small", "chunked-D"])
def test_gpu_matches_fp64_reference(shape_case, kind, dtype):
    base = _gpu_case(shape_case, dtype)  # rounded inputs shared by every path

    def run(backend, cast):
        args = leaves(*[cast(t) for t in base])
        with fastdensity.set_backend(backend):
            out = OPS[kind](*args)
        up = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        grads = torch.autograd.grad((out.double() * up.double()).sum(), args)
        return [out, *grads]

    kernel = run("triton", lambda a: a)
    eager = run("reference", lambda a: a)
    ref64 = run("reference", lambda a: a.double())
    names = ["log_prob", "grad_x", "grad_logits", "grad_means", "grad_log_scales"]
    for name, k, e, r in zip(names, kernel, eager, ref64):
        result = compare(name, k, e, r)
        assert result.passed, str(result)


@requires_cuda
@pytest.mark.gpu
def test_gpu_past_int32_offsets():
    """Per-sample parameters with B K D > 2**31: int32 offsets would wrap in the last rows."""
    B, K, D = 2 ** 21 + 3, 32, 32
    free, _ = torch.cuda.mem_get_info()
    need = 2 * B * K * D * 2 * 3  # means, log_scales and their gradients in bf16, plus headroom
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB free on the GPU, has {free / 2**30:.0f}")
    x, logits, means, log_scales = _gpu_case(((B,), (B,), K, D), torch.bfloat16)
    means.requires_grad_()
    with fastdensity.set_backend("triton"):
        out = ops.gaussian_mixture_log_prob(x, logits, means, log_scales)
    (gm,) = torch.autograd.grad(out.sum(), means)
    tail = slice(B - 64, B)
    args = [t[tail].detach().double() for t in (x, logits, means, log_scales)]
    args[2].requires_grad_()
    expected = ref.gaussian_mixture_log_prob(*args)
    (gm_ref,) = torch.autograd.grad(expected.sum(), args[2])
    torch.testing.assert_close(out[tail].double(), expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gm[tail].double(), gm_ref, rtol=2e-2, atol=2e-2)  # bf16 gradient storage
