"""fastdensity.models: densities that normalise, log-dets against autograd, exact inverses and samplers,
autoregressive structure, both backends, sizes matched to peers, and bad input."""
from __future__ import annotations

import importlib.util
import itertools
import math
import re

import pytest
import torch

import fastdensity
from fastdensity.models import MAF, MODELS, GaussianMixture, Glow, PixelCNN, RealNVP, build_model
from fastdensity.models.maf import MaskedAffineAutoregressive
from fastdensity.models.multiscale import CheckerboardCoupling, checkerboard_mask
from helpers import requires_cuda


def perturb(model, scale=0.1, seed=1):
    """Move every parameter off its initialisation (zero-initialised last layers make flows start as
    near-identities, which would let a wrong log-det pass unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def ready(model, x, scale=0.1):
    """Data-dependent initialisation on ``x``, perturbed parameters, eval mode."""
    model.initialize(x)
    return perturb(model, scale).eval()


# ------------------------------------------------------------------------------------------------
# Continuous models on 2-D data: the density integrates to one
# ------------------------------------------------------------------------------------------------

MODELS_2D = [
    ("realnvp", {"hidden": 16, "num_layers": 4}),
    ("glow", {"hidden": 16, "num_steps": 3}),
    ("maf", {"hidden": 16, "num_layers": 3}),
    ("gmm", {"components": 5}),
]


@pytest.mark.parametrize("name,kwargs", MODELS_2D, ids=[m for m, _ in MODELS_2D])
def test_2d_density_integrates_to_one(name, kwargs):
    torch.manual_seed(0)
    model = build_model(name, (2,), **kwargs).double()
    data = torch.randn(512, 2, dtype=torch.float64) * torch.tensor([1.5, 0.5], dtype=torch.float64) + 0.3
    ready(model, data, scale=0.2)
    xs = torch.linspace(-9, 9, 361, dtype=torch.float64)  # spacing 0.05
    X, Y = torch.meshgrid(xs, xs, indexing="ij")
    grid = torch.stack([X.flatten(), Y.flatten()], 1)
    with torch.no_grad():
        lp = torch.cat([model.log_prob(g) for g in grid.split(20_000)])
    mass = lp.exp().sum().item() * (xs[1] - xs[0]).item() ** 2
    assert abs(mass - 1) < 5e-3, mass
    # Not vacuous: the density is far from the standard normal a fresh flow starts as.
    log_normal = -0.5 * grid.pow(2).sum(1) - math.log(2 * math.pi)
    inner = grid.norm(dim=1) < 2
    assert (lp - log_normal)[inner].abs().max() > 0.2


# ------------------------------------------------------------------------------------------------
# Flows: log-det = log|det d eps / dx| by autograd; from_noise inverts to_noise
# ------------------------------------------------------------------------------------------------

FLOWS = [
    ("realnvp vector", RealNVP, (3,), {"hidden": 8, "num_layers": 3}),
    ("realnvp vector sigmoid", RealNVP, (4,), {"hidden": 8, "num_layers": 2, "scale": "sigmoid"}),
    ("realnvp image 2 scales", RealNVP, (1, 4, 4), {"hidden": 4, "num_layers": 2, "num_scales": 2}),
    ("realnvp image exp, 2 channels", RealNVP, (2, 4, 4), {"hidden": 4, "num_layers": 1, "num_scales": 2,
                                                            "scale": "exp"}),
    ("glow vector", Glow, (3,), {"hidden": 8, "num_steps": 2}),
    ("glow image 2 scales", Glow, (1, 4, 4), {"hidden": 4, "num_steps": 2, "num_scales": 2}),
    ("maf vector", MAF, (4,), {"hidden": 8, "num_layers": 2}),
    ("maf image, random permutation", MAF, (1, 2, 2), {"hidden": 8, "num_layers": 2, "permutation": "random"}),
]


@pytest.mark.parametrize("name,cls,shape,kwargs", FLOWS, ids=[f[0] for f in FLOWS])
def test_flow_log_prob_matches_jacobian(name, cls, shape, kwargs):
    torch.manual_seed(0)
    model = ready(cls(shape, **kwargs).double(), torch.randn(64, *shape, dtype=torch.float64) * 2 + 0.5)
    x = torch.randn(3, *shape, dtype=torch.float64)
    eps, logdet = model.to_noise(x)
    D = eps.shape[1]
    assert D == math.prod(shape)
    torch.testing.assert_close(model.log_prob(x), -0.5 * eps.pow(2).sum(1) - 0.5 * D * math.log(2 * math.pi) + logdet)
    for b in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda xb: model.to_noise(xb[None])[0][0], x[b])
        sign, logabs = torch.linalg.slogdet(jac.reshape(D, D))
        assert sign != 0
        torch.testing.assert_close(logdet[b], logabs)


@pytest.mark.parametrize("name,cls,shape,kwargs", FLOWS, ids=[f[0] for f in FLOWS])
def test_flow_from_noise_inverts_to_noise(name, cls, shape, kwargs):
    torch.manual_seed(0)
    model = ready(cls(shape, **kwargs).double(), torch.randn(64, *shape, dtype=torch.float64))
    x = torch.randn(5, *shape, dtype=torch.float64)
    eps, _ = model.to_noise(x)
    torch.testing.assert_close(model.from_noise(eps), x)
    torch.manual_seed(7)
    s = model.sample(4)
    torch.manual_seed(7)
    assert torch.equal(model.sample(4), s) and s.shape == (4, *shape)  # seeded draws repeat
    assert torch.isfinite(model.log_prob(s)).all()


def test_checkerboard_coupling_leaves_staying_pixels_bit_exact():
    torch.manual_seed(0)
    net = perturb(torch.nn.Conv2d(3, 4, 3, padding=1), 0.5)
    layer = CheckerboardCoupling(2, parity=1, net=net)
    x = torch.randn(2, 2, 5, 5)
    y, logdet = layer(x)
    stay = checkerboard_mask(5, 5, 1, x).bool().expand_as(x)
    assert torch.equal(y[stay], x[stay]) and not torch.equal(y[~stay], x[~stay])
    x_back, logdet_inv = layer.inverse(y)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(logdet_inv, -logdet)


def test_maf_transform_is_autoregressive():
    """dz_i/dx_j = 0 for j > i (sequential MADE order): the Jacobian is lower-triangular, and not diagonal."""
    torch.manual_seed(0)
    layer = perturb(MaskedAffineAutoregressive(5, 16, num_hidden=2).double(), 0.3)
    x = torch.randn(5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x)
    assert torch.count_nonzero(torch.triu(jac, 1)) == 0
    assert torch.count_nonzero(torch.tril(jac, -1)) > 0


def test_maf_inverse_takes_one_pass_per_feature():
    torch.manual_seed(0)
    layer = perturb(MaskedAffineAutoregressive(6, 16).double(), 0.3)
    calls = []
    layer.made.register_forward_hook(lambda *a: calls.append(1))
    z = torch.randn(4, 6, dtype=torch.float64)
    x, logdet = layer.inverse(z)
    assert len(calls) == 6
    z_again, logdet_fwd = layer(x)
    torch.testing.assert_close(z_again, z)
    torch.testing.assert_close(logdet, -logdet_fwd)


# ------------------------------------------------------------------------------------------------
# PixelCNN: exact probabilities, autoregressive structure, sampling
# ------------------------------------------------------------------------------------------------


def _pixelcnn(shape=(1, 2, 2), levels=3, **kwargs):
    torch.manual_seed(0)
    opts = dict(hidden=8, num_blocks=1, num_mixtures=2, kernel_size=3)
    opts.update(kwargs)
    return perturb(PixelCNN(shape, levels=levels, **opts).double(), 0.3).eval()


@pytest.mark.parametrize("levels", [3, 4])
def test_pixelcnn_probabilities_sum_to_one(levels):
    """Every image of a 2 x 2 grid: 3 levels (renormalised head) and 4 = 2^2 (the head's own grid)."""
    model = _pixelcnn(levels=levels)
    assert model.renormalize == (levels == 3)
    images = torch.tensor(list(itertools.product(range(levels), repeat=4))).view(-1, 1, 2, 2)
    with torch.no_grad():
        total = model.log_prob(images).exp().sum().item()
    # Renormalised: exact. Power-of-two levels: PixelCNN++'s head replaces bin masses below 1e-5 by a
    # density estimate, so the sum is 1 up to that substitution.
    assert abs(total - 1) < (1e-12 if levels == 3 else 1e-4), total


def test_pixelcnn_parameters_depend_only_on_earlier_pixels():
    model = _pixelcnn((1, 4, 5), levels=17)
    v = torch.randint(0, 17, (1, 1, 4, 5))
    base = model.network(v)
    for i, j in [(0, 0), (1, 2), (3, 4), (2, 0)]:
        w = v.clone()
        w[0, 0, i, j] = (w[0, 0, i, j] + 7) % 17
        changed = (model.network(w) - base).abs().amax(dim=1)[0]  # [H, W]
        later = torch.zeros(4, 5, dtype=torch.bool)
        later.view(-1)[i * 5 + j + 1:] = True
        assert changed[~later].max() == 0, f"pixel ({i}, {j}) leaks into itself or earlier pixels"
        if (i, j) != (3, 4):
            assert changed[later].max() > 0  # and the next pixels do see it


def test_pixelcnn_window_parameters_equal_full_network():
    model = _pixelcnn((1, 9, 11), levels=17)
    assert model.reach == 2  # windows of 3 rows x 5 columns: smaller than the image
    v = torch.randint(0, 17, (2, 1, 9, 11))
    full = model.network(v)
    for i in range(9):
        for j in range(11):
            torch.testing.assert_close(model._window_params(v, i, j)[:, :, 0, 0], full[:, :, i, j])


@pytest.mark.parametrize("levels", [3, 4])
def test_pixelcnn_samples_follow_its_probabilities(levels):
    model = _pixelcnn((1, 1, 2), levels=levels)
    images = torch.tensor(list(itertools.product(range(levels), repeat=2))).view(-1, 1, 1, 2)
    with torch.no_grad():
        probs = model.log_prob(images).exp()
    torch.manual_seed(3)
    n = 20_000
    s = model.sample(n)
    assert s.dtype == torch.long and s.shape == (n, 1, 1, 2)
    freq = torch.bincount(s[:, 0, 0, 0] * levels + s[:, 0, 0, 1], minlength=levels ** 2).double() / n
    tol = 5 * (probs * (1 - probs) / n).sqrt() + 1e-3
    assert ((freq - probs).abs() <= tol).all(), (freq, probs)


def test_pixelcnn_rgb_with_power_of_two_levels():
    model = _pixelcnn((3, 3, 3), levels=4, num_mixtures=1)
    v = torch.randint(0, 4, (2, 3, 3, 3))
    lp = model.log_prob(v)
    assert lp.shape == (2,) and torch.isfinite(lp).all() and (lp < 0).all()
    assert model.sample(2).shape == (2, 3, 3, 3)


def test_pixelcnn_rgb_probabilities_sum_to_one():
    """Every RGB image of 1 x 2 pixels at 2 levels (64 images): the type-A mask hides the whole current
    pixel from its parameters and the head couples G to R and B to R, G inside it, so the model is a
    distribution over images."""
    model = _pixelcnn((3, 1, 2), levels=2)
    images = torch.tensor(list(itertools.product(range(2), repeat=6))).view(-1, 3, 1, 2)
    with torch.no_grad():
        total = model.log_prob(images).exp().sum().item()
    # At 2 levels both bins are the open-ended edge bins (no small-mass substitution): exact up to
    # float64 rounding.
    assert abs(total - 1) < 1e-12, total


def test_pixelcnn_takes_levels_in_any_integer_dtype():
    """uint8 (how digits and 8-bit image files arrive), int32, int64 and integral floats: the same result."""
    model = _pixelcnn((1, 3, 3), levels=5)
    v = torch.randint(0, 5, (4, 1, 3, 3))
    with torch.no_grad():
        expected = model.log_prob(v)
        for dtype in (torch.uint8, torch.int32, torch.float32):
            assert torch.equal(model.log_prob(v.to(dtype)), expected), dtype


# ------------------------------------------------------------------------------------------------
# Gaussian mixture
# ------------------------------------------------------------------------------------------------


def test_gmm_matches_torch_distributions_and_seeds_from_data():
    torch.manual_seed(0)
    centers = torch.tensor([[-4.0, 0.0, 1.0], [4.0, 1.0, -1.0], [0.0, 5.0, 2.0]])
    data = centers[torch.randint(0, 3, (600,))] + 0.3 * torch.randn(600, 3)
    model = GaussianMixture((3,), components=3)
    model.initialize(data)
    found = model.mixture.means.detach()
    assert torch.cdist(centers, found).min(dim=1).values.max() < 0.3  # k-means++ found the clusters
    perturb(model)
    mix = model.mixture
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=mix.logits),
        torch.distributions.Independent(torch.distributions.Normal(mix.means, mix.log_scales.exp()), 1))
    x = torch.randn(7, 3) * 3
    torch.testing.assert_close(model.log_prob(x), reference.log_prob(x), rtol=1e-5, atol=1e-5)
    img = GaussianMixture((1, 2, 2), components=2)
    img.initialize(torch.randn(10, 1, 2, 2))
    assert img.log_prob(torch.randn(4, 1, 2, 2)).shape == (4,) and img.sample(3).shape == (3, 1, 2, 2)


# ------------------------------------------------------------------------------------------------
# Both backends: the Triton kernels (interpreted on CPU) give the reference's log-densities
# ------------------------------------------------------------------------------------------------

TINY = [
    ("realnvp", (2,), {"hidden": 8, "num_layers": 2}),
    ("realnvp", (1, 4, 4), {"hidden": 4, "num_layers": 1, "num_scales": 2}),
    ("glow", (1, 4, 4), {"hidden": 4, "num_steps": 1}),
    ("maf", (3,), {"hidden": 8, "num_layers": 2}),
    ("gmm", (2,), {"components": 3}),
    ("pixelcnn", (1, 3, 3), {"levels": 5, "hidden": 4, "num_blocks": 1, "num_mixtures": 2, "kernel_size": 3}),
]


@pytest.mark.parametrize("name,shape,kwargs", TINY, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s, _ in TINY])
def test_log_prob_agrees_across_backends(name, shape, kwargs):
    torch.manual_seed(0)
    model = build_model(name, shape, **kwargs)
    x = torch.randint(0, 5, (3, *shape)) if name == "pixelcnn" else torch.randn(3, *shape)
    ready(model, x, scale=0.2)

    def run(backend):
        model.zero_grad()
        with fastdensity.set_backend(backend):
            lp = model.log_prob(x)
        (lp * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        return lp.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    lp_ref, grads_ref = run("reference")
    lp_ker, grads_ker = run("triton")
    # fp32, fused vs separate rounding through a few layers: a few ulps of values of size ~10-100.
    torch.testing.assert_close(lp_ker, lp_ref, rtol=1e-5, atol=1e-4)
    assert len(grads_ker) == len(grads_ref) > 0
    for gk, gr in zip(grads_ker, grads_ref):
        torch.testing.assert_close(gk, gr, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Config -> construct; sizes matched to peers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape,kwargs", TINY, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s, _ in TINY])
def test_config_rebuilds_the_model(name, shape, kwargs):
    torch.manual_seed(0)
    model = build_model(name, shape, **kwargs)
    x = torch.randint(0, 5, (4, *shape)) if name == "pixelcnn" else torch.randn(4, *shape)
    ready(model, x)
    config = model.config
    assert all(isinstance(v, (int, float, str, list, type(None))) for v in config.values()), config
    again = build_model(name, **config)
    again.load_state_dict(model.state_dict())
    again.eval()
    assert torch.equal(again.log_prob(x), model.log_prob(x))
    assert again.config == config and type(again) is MODELS[name]


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.skipif(importlib.util.find_spec("zuko") is None, reason="zuko (a peer, the 'peers' extra) not installed")
def test_sizes_match_zuko():
    import zuko

    D, H, L = 8, 32, 3
    actnorm = 2 * D
    ours = MAF([D], num_layers=L, hidden=H, num_hidden=2, scale="sigmoid")
    assert _count(ours) - actnorm == _count(zuko.flows.MAF(D, transforms=L, hidden_features=[H, H]))
    ours = RealNVP([D], num_layers=L, hidden=H, num_hidden=2, scale="sigmoid")
    assert _count(ours) - actnorm == _count(zuko.flows.RealNVP(D, transforms=L, hidden_features=[H, H]))
    # actnorm=False: exactly the peers' architecture (what the size-matched benchmark builds).
    for cls, peer in ((MAF, zuko.flows.MAF), (RealNVP, zuko.flows.RealNVP)):
        ours = cls([D], num_layers=L, hidden=H, num_hidden=2, scale="sigmoid", actnorm=False)
        assert _count(ours) == _count(peer(D, transforms=L, hidden_features=[H, H]))


@pytest.mark.skipif(importlib.util.find_spec("nflows") is None,
                    reason="nflows (a peer, the 'peers' extra) not installed")
def test_sizes_match_nflows():
    from nflows.flows import MaskedAutoregressiveFlow
    from nflows.flows.realnvp import SimpleRealNVP

    D, H, L = 8, 32, 3
    ours = MAF([D], num_layers=L, hidden=H, num_hidden=2, scale="sigmoid")
    peer = MaskedAutoregressiveFlow(D, H, L, num_blocks_per_layer=1, use_residual_blocks=False)
    assert _count(ours) - 2 * D == _count(peer)
    ours = RealNVP([D], num_layers=L, hidden=H, num_hidden=5, scale="sigmoid")
    assert _count(ours) - 2 * D == _count(SimpleRealNVP(D, H, L, num_blocks_per_layer=2))


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_wrong_input_shape_names_the_expected_one():
    model = RealNVP((3,), hidden=4, num_layers=1)
    with pytest.raises(ValueError, match=r"RealNVP expects inputs of shape \[B, 3\]; got \[5, 2\]"):
        model.log_prob(torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"MAF expects inputs of shape \[B, 1, 2, 2\]"):
        MAF((1, 2, 2), hidden=4, num_layers=1).log_prob(torch.randn(5, 4))


def test_pixelcnn_input_checks():
    model = PixelCNN((1, 3, 3), levels=4, hidden=4, num_blocks=0)
    with pytest.raises(ValueError, match="integer levels; got non-integer values"):
        model.log_prob(torch.rand(2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"levels must lie in 0..3; got values from 0 to 4"):
        model.log_prob(torch.tensor([0, 4, 1, 2, 3, 0, 0, 0, 0]).view(1, 1, 3, 3))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        PixelCNN((2, 4, 4), levels=4)
    with pytest.raises(ValueError, match="power-of-two number of levels"):
        PixelCNN((3, 4, 4), levels=17)
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        PixelCNN((4,), levels=4)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer"):
        PixelCNN((1, 4, 4), levels=4, kernel_size=4)


def test_bad_model_options():
    with pytest.raises(ValueError, match=f"unknown model 'flowpp'; choose one of {', '.join(MODELS)}$"):
        build_model("flowpp", (2,))
    with pytest.raises(ValueError, match=r"maf: unknown option\(s\) depth; its options are num_layers, hidden, "
                                         r"num_hidden"):
        build_model("maf", (2,), depth=3)
    with pytest.raises(ValueError, match=r"num_scales applies to images \(\[C, H, W\]\) only"):
        RealNVP((2,), num_scales=2)
    with pytest.raises(ValueError, match=r"num_hidden applies to vectors \(\[D\]\) only"):
        Glow((1, 4, 4), num_hidden=2)
    with pytest.raises(ValueError, match="divisible by 4"):
        Glow((1, 6, 6), num_scales=2)
    with pytest.raises(ValueError, match="at least 2 features"):
        RealNVP((1,))
    with pytest.raises(ValueError, match="checkerboard coupling needs s\\(0\\) = 1"):
        RealNVP((1, 4, 4), scale="sigmoid")
    with pytest.raises(ValueError, match=r"models data of shape \[D\] or \[C, H, W\]"):
        MAF((2, 3))


@pytest.mark.parametrize("kwargs,message", [
    ({"hidden": "wide"}, "maf: hidden must be an integer; got 'wide' (str)"),  # --set hidden=wide
    ({"hidden": 2.5}, "maf: hidden must be an integer; got 2.5 (float)"),  # int() would truncate it to 2
    ({"num_layers": True}, "maf: num_layers must be an integer; got True (bool)"),
    ({"actnorm": "false"}, "maf: actnorm must be true or false; got 'false' (str)"),  # bool("false") is True
    ({"scale": 3}, "maf: scale must be a string; got 3 (int)"),
])
def test_build_model_names_bad_option_values(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_model("maf", (3,), **kwargs)


def test_build_model_takes_whole_floats_and_names_missing_options():
    assert build_model("maf", (3,), hidden=8.0, num_layers=1e0).config["hidden"] == 8  # JSON's 1e3 is a float
    with pytest.raises(ValueError, match="pixelcnn: option.s. levels must be given; its options are levels, "):
        build_model("pixelcnn", (1, 4, 4))


def test_build_model_refuses_sizes_past_memory_without_allocating_them():
    """hidden=1e9 (--set hidden=1e9) asks for ~10^19 parameters: a ValueError giving the size, at once,
    instead of an allocator crash or the machine swapping. The big tensors are never allocated: the
    build becomes a dry run on the meta device."""
    with pytest.raises(ValueError, match=r"maf with hidden=1000000000 for shape \[3\] would need [\d.]+ PiB for its "
                                         r"[\d,]+ parameter and buffer values, more than this machine's .* of memory"):
        build_model("maf", (3,), hidden=1e9)
    with pytest.raises(ValueError, match=r"realnvp with hidden=1000000 for shape \[3, 8, 8\] would need [\d.]+ TiB"):
        build_model("realnvp", (3, 8, 8), hidden=10 ** 6)


def test_build_model_size_check_uses_the_machine_memory(monkeypatch):
    import fastdensity.models as models

    monkeypatch.setattr(models, "_memory_bytes", lambda: 100_000)
    with pytest.raises(ValueError, match=r"would need 253.9 KiB for its 65,000 parameter and buffer values, more "
                                         r"than this machine's 97.7 KiB of memory"):
        build_model("gmm", (2, 4, 4), components=1000)  # K + 2 K D float32 values, D = 32
    assert build_model("gmm", (2, 4, 4), components=10).num_parameters() == 10 + 2 * 10 * 32


@pytest.mark.parametrize("name,shape,kwargs", [
    ("maf", (5,), {"hidden": 8}), ("maf", (5,), {"hidden": 8, "permutation": "random"}),
    ("realnvp", (3, 8, 8), {"hidden": 8}), ("glow", (2, 8, 8), {"hidden": 8}), ("gmm", (3,), {}),
    ("pixelcnn", (1, 8, 8), {"levels": 4}),
])
@pytest.mark.parametrize("always_real", [0, 1 << 20])
def test_build_model_after_a_dry_run_is_the_direct_construction(monkeypatch, name, shape, kwargs, always_real):
    """Past the dry-run threshold the model is built twice (sized on the meta device, then for real): the
    result and the RNG state after it must be exactly those of constructing it directly."""
    import fastdensity.models as models

    monkeypatch.setattr(models, "_DRY_RUN_ABOVE", 0)  # every build becomes a dry run first
    monkeypatch.setattr(models, "_ALWAYS_REAL", always_real)  # 0: even a seed read back is meta (fails)
    torch.manual_seed(3)
    built, after_built = build_model(name, shape, **kwargs), torch.rand(4)
    torch.manual_seed(3)
    direct, after_direct = MODELS[name](shape, **kwargs), torch.rand(4)
    a, b = built.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(after_built, after_direct)
    assert not any(t.is_meta for t in (*built.parameters(), *built.buffers()))


EMPTY_CASES = [
    ("realnvp", (3,), {"hidden": 8, "num_layers": 2}), ("realnvp", (1, 4, 4), {"hidden": 4, "num_layers": 1}),
    ("glow", (3,), {"hidden": 8, "num_steps": 2}), ("glow", (1, 4, 4), {"hidden": 4, "num_steps": 1}),
    ("maf", (3,), {"hidden": 8, "num_layers": 2}), ("maf", (1, 2, 2), {"hidden": 8, "num_layers": 1}),
    ("gmm", (3,), {"components": 2}), ("pixelcnn", (1, 4, 4), {"levels": 4, "hidden": 4, "num_blocks": 1}),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name,shape,kwargs", EMPTY_CASES, ids=[f"{n}-{len(s)}d" for n, s, _ in EMPTY_CASES])
def test_log_prob_of_an_empty_batch_is_empty(name, shape, kwargs, backend):
    """A batch of zero examples gives zero log-densities: RealNVP and Glow raised IndexError (u[0] of
    an empty batch), MAF and GMM a reshape error (-1 is ambiguous with 0 rows). In training mode an
    uninitialised ActNorm must not initialise itself from no data (it would be NaN for good)."""
    model = build_model(name, shape, **kwargs)
    empty = torch.zeros(0, *shape, dtype=torch.long if name == "pixelcnn" else torch.float32)
    with fastdensity.set_backend(backend):
        for mode in (True, False):
            model.train(mode)
            out = model.log_prob(empty)
            assert out.shape == (0,)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name,shape,kwargs", EMPTY_CASES[::2], ids=[n for n, _, _ in EMPTY_CASES[::2]])
def test_sample_counts_must_be_non_negative_integers(name, shape, kwargs):
    model = build_model(name, shape, **kwargs).eval()
    with pytest.raises(ValueError, match="num_samples must be an integer >= 0; got -1$"):
        model.sample(-1)
    with pytest.raises(TypeError, match=r"num_samples must be an integer >= 0; got 2.5 \(float\)"):
        model.sample(2.5)  # int() would have drawn 2
    assert model.sample(0).shape == (0, *shape)


# ------------------------------------------------------------------------------------------------
# GPU tier: every model's log-density and parameter gradients, kernels against the float64 reference
# ------------------------------------------------------------------------------------------------

GPU_CASES = [
    ("realnvp", (2,), {}, 4096),
    ("realnvp", (3, 32, 32), {"hidden": 64}, 16),
    ("glow", (3, 32, 32), {"hidden": 64}, 16),
    ("maf", (64,), {"hidden": 256}, 1024),
    ("gmm", (64,), {"components": 64}, 1024),
    ("pixelcnn", (3, 32, 32), {"levels": 256, "hidden": 64, "num_mixtures": 5}, 8),
    ("pixelcnn", (1, 8, 8), {"levels": 17}, 64),
]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name,shape,kwargs,batch", GPU_CASES,
                         ids=[f"{n}-{'x'.join(map(str, s))}" for n, s, _, _ in GPU_CASES])
def test_gpu_model_matches_fp64_reference(name, shape, kwargs, batch):
    import copy

    from fastdensity.testing import compare

    torch.manual_seed(0)
    levels = kwargs.get("levels")
    make = (lambda: torch.randint(0, levels, (batch, *shape))) if levels else (lambda: torch.randn(batch, *shape))
    model = ready(build_model(name, shape, **kwargs), make(), scale=0.05)
    x = make().cuda()
    m32, m64 = model.cuda(), copy.deepcopy(model).double().cuda()

    def run(m, backend, inputs):
        m.zero_grad()
        with fastdensity.set_backend(backend):
            lp = m.log_prob(inputs)
        lp.double().sum().backward()
        return [lp.detach()] + [p.grad.detach() for p in m.parameters()]

    kernel = run(m32, "triton", x)
    eager = run(m32, "reference", x)
    ref64 = run(m64, "reference", x.double() if not levels else x)
    names = ["log_prob"] + [n for n, _ in m32.named_parameters()]
    for n, k, e, r in zip(names, kernel, eager, ref64):
        # Whole models sum thousands of terms: the floor scales with the reference's magnitude.
        result = compare(n, k, e.to(k.dtype), r, atol=1e-5 * max(1.0, r.abs().max().item()))
        assert result.passed, str(result)
