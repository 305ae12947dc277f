"""Conditional densities: every transform and model uses its context (non-zero Jacobian with respect to
it) or refuses it; nflows' conditional MAF and its conditional-moons example port by changing imports
and give nflows' numbers; a conditional model learns a conditional 2-D density with a known
log-density to within 0.1 nats of KL, averaged over contexts."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fastdensity
from fastdensity.data import CONDITIONAL_DENSITIES_2D, conditional_density_2d
from fastdensity.models import MAF, NSF, Glow, RealNVP
from fastdensity.nn import MaskedAffineAutoregressive, MaskedAffineAutoregressiveTransform
from test_made import copy_nflows_made


def perturb(module, scale=0.1, seed=1):
    """Move every parameter off its initialisation (zero-initialised output layers start as identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# ------------------------------------------------------------------------------------------------
# The autoregressive transforms
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"use_residual_blocks": True, "num_hidden": 3, "scale": "softplus"},
                                     {"scale": "sigmoid", "dropout_probability": 0.1, "use_batch_norm": True}],
                         ids=["plain", "residual-softplus", "sigmoid-dropout-bn"])
def test_maf_transform_uses_its_context(options):
    """The issue's case: t(x, zeros) must differ from t(x, 100 * ones), through every output."""
    torch.manual_seed(0)
    layer = perturb(MaskedAffineAutoregressive(4, 16, context_features=2, **options).double(), 0.3).eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    z0, ld0 = layer(x, torch.zeros(5, 2, dtype=torch.float64))
    z1, ld1 = layer(x, 100 * torch.ones(5, 2, dtype=torch.float64))
    assert not torch.allclose(z0, z1) and not torch.allclose(ld0, ld1)
    c = torch.randn(5, 2, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(x, v)[0], c)  # [5, 4, 5, 2]
    per_output = jac.abs().sum((2, 3))  # [example, feature]
    if options.get("use_residual_blocks"):  # nflows' residual MADE: the first feature's parameters are constants
        assert torch.count_nonzero(per_output[:, 0]) == 0 and (per_output[:, 1:] > 0).all()
    else:
        assert (per_output > 0).all()
    z, logdet = layer(x, c)
    x_back, logdet_inv = layer.inverse(z, c)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(logdet_inv, -logdet)
    jac_x = torch.autograd.functional.jacobian(lambda v: layer(v[None], c[:1])[0][0], x[0])
    torch.testing.assert_close(torch.linalg.slogdet(jac_x)[1], logdet[0])


def test_maf_transform_context_errors():
    unconditional = MaskedAffineAutoregressive(3, 8)
    assert not unconditional.conditional
    with pytest.raises(ValueError, match="built without context_features: it takes no context"):
        unconditional(torch.randn(4, 3), torch.zeros(4, 2))
    conditional = MaskedAffineAutoregressive(3, 8, context_features=2)
    with pytest.raises(ValueError, match=r"built with context_features=2: it needs a context \[B, 2\]"):
        conditional(torch.randn(4, 3))
    with pytest.raises(ValueError, match="context must have one row per input row: inputs have batch size 4"):
        conditional.inverse(torch.randn(4, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="with use_residual_blocks, num_hidden counts the first layer"):
        MaskedAffineAutoregressive(3, 8, num_hidden=2, use_residual_blocks=True)
    with pytest.raises(ValueError, match="scale must be one of"):
        MaskedAffineAutoregressive(3, 8, scale="tanh")


def _nflows():
    return pytest.importorskip("nflows")


@pytest.mark.parametrize("options", [{}, {"context_features": 2}, {"use_residual_blocks": False},
                                     {"context_features": 2, "use_batch_norm": True, "dropout_probability": 0.1}],
                         ids=["defaults", "context", "plain", "context-bn-dropout"])
def test_nflows_maf_transform_equals_nflows(options):
    """fastdensity.nn.MaskedAffineAutoregressiveTransform has nflows' signature, defaults and layout:
    with nflows' weights copied across, forward, inverse and log-dets agree to float64 round-off."""
    _nflows()
    from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform as Theirs

    torch.manual_seed(0)
    theirs = perturb(Theirs(features=4, hidden_features=12, **options).double(), 0.3).eval()
    ours = MaskedAffineAutoregressiveTransform(features=4, hidden_features=12, **options).double().eval()
    copy_nflows_made(theirs.autoregressive_net, ours.made)
    x = torch.randn(6, 4, dtype=torch.float64)
    c = torch.randn(6, 2, dtype=torch.float64) if options.get("context_features") else None
    for direction in ("forward", "inverse"):
        (y_ours, ld_ours), (y_theirs, ld_theirs) = getattr(ours, direction)(x, c), getattr(theirs, direction)(x, c)
        torch.testing.assert_close(y_ours, y_theirs)
        torch.testing.assert_close(ld_ours, ld_theirs)


def _conditional_moons_flow(lib):
    """nflows' conditional two-moons example (its README), line for line; ``lib`` supplies the classes."""
    num_layers = 5
    base_dist = lib.ConditionalDiagonalNormal(shape=[2], context_encoder=nn.Linear(1, 4))
    transforms = []
    for _ in range(num_layers):
        transforms.append(lib.ReversePermutation(features=2))
        transforms.append(lib.MaskedAffineAutoregressiveTransform(features=2, hidden_features=4, context_features=1))
    transform = lib.CompositeTransform(transforms)
    return lib.Flow(transform, base_dist)


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # nflows draws base samples in the default dtype
    yield
    torch.set_default_dtype(previous)


def test_nflows_conditional_moons_example_ports_by_changing_imports(float64_default):
    _nflows()
    from nflows.distributions.normal import ConditionalDiagonalNormal
    from nflows.flows.base import Flow
    from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform as NflowsMAF
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.permutations import ReversePermutation

    nflows_lib = SimpleNamespace(ConditionalDiagonalNormal=ConditionalDiagonalNormal, Flow=Flow,
                                 MaskedAffineAutoregressiveTransform=NflowsMAF,
                                 CompositeTransform=CompositeTransform, ReversePermutation=ReversePermutation)
    ours_lib = SimpleNamespace(ConditionalDiagonalNormal=fastdensity.ConditionalDiagonalNormal, Flow=fastdensity.Flow,
                               MaskedAffineAutoregressiveTransform=MaskedAffineAutoregressiveTransform,
                               CompositeTransform=fastdensity.CompositeTransform,
                               ReversePermutation=fastdensity.nn.ReversePermutation)
    torch.manual_seed(0)
    theirs = perturb(_conditional_moons_flow(nflows_lib), 0.3)
    ours = _conditional_moons_flow(ours_lib)
    with torch.no_grad():
        ours._distribution._context_encoder.load_state_dict(theirs._distribution._context_encoder.state_dict())
    for t, o in zip(theirs._transform._transforms[1::2], ours._transform._transforms[1::2]):
        copy_nflows_made(t.autoregressive_net, o.made)

    x, y = torch.randn(32, 2), torch.randint(0, 2, (32, 1)).double()  # moons points and their labels
    lp_theirs, lp_ours = theirs.log_prob(inputs=x, context=y), ours.log_prob(inputs=x, context=y)
    torch.testing.assert_close(lp_ours, lp_theirs)
    assert torch.autograd.functional.jacobian(lambda v: ours.log_prob(x, v), y).abs().sum() > 0
    grads_theirs = torch.autograd.grad(-lp_theirs.mean(), theirs._distribution._context_encoder.weight)
    grads_ours = torch.autograd.grad(-lp_ours.mean(), ours._distribution._context_encoder.weight)
    torch.testing.assert_close(grads_ours, grads_theirs)
    grid_context = torch.tensor([[0.0], [1.0]])
    torch.manual_seed(5)
    s_theirs = theirs.sample(3, context=grid_context)
    torch.manual_seed(5)
    s_ours = ours.sample(3, context=grid_context)
    assert s_ours.shape == (2, 3, 2)
    torch.testing.assert_close(s_ours, s_theirs)


# ------------------------------------------------------------------------------------------------
# Conditional models
# ------------------------------------------------------------------------------------------------

CONDITIONAL_MODELS = [
    ("maf", MAF, {"hidden": 12, "num_layers": 2}),
    ("maf nflows-style", MAF, {"hidden": 12, "num_layers": 2, "num_hidden": 3, "residual": True,
                               "scale": "softplus"}),
    ("realnvp", RealNVP, {"hidden": 12, "num_layers": 3}),
    ("glow", Glow, {"hidden": 12, "num_steps": 2}),
    ("nsf coupling", NSF, {"hidden": 12, "num_layers": 3, "num_bins": 4}),
    ("nsf autoregressive", NSF, {"kind": "autoregressive", "hidden": 12, "num_layers": 2, "num_bins": 4,
                                 "num_blocks": 1}),
]


def _ready(cls, kwargs, D=3, C=2):
    torch.manual_seed(0)
    model = cls([D], context_features=C, **kwargs).double()
    model.initialize(torch.randn(64, D, dtype=torch.float64) * 2 + 0.5, torch.randn(64, C, dtype=torch.float64))
    return perturb(model, 0.2).eval()


@pytest.mark.parametrize("name,cls,kwargs", CONDITIONAL_MODELS, ids=[m[0] for m in CONDITIONAL_MODELS])
def test_conditional_model_depends_on_context_and_its_log_det_is_right(name, cls, kwargs):
    model = _ready(cls, kwargs)
    assert model.config["context_features"] == 2 and model.context_features == 2
    x, c = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: model.log_prob(x, v), c)  # [4, 4, 2]
    own = torch.eye(4, dtype=torch.bool)
    assert (jac[own].abs().sum(-1) > 0).all()  # each example's density moves with its own context ...
    assert torch.count_nonzero(jac[~own]) == 0  # ... and with no other example's
    eps, logdet = model.to_noise(x, c)
    torch.testing.assert_close(model.log_prob(x, c), -0.5 * eps.pow(2).sum(1) - 1.5 * math.log(2 * math.pi) + logdet)
    for b in range(2):
        jac_x = torch.autograd.functional.jacobian(lambda xb: model.to_noise(xb[None], c[b:b + 1])[0][0], x[b])
        torch.testing.assert_close(torch.linalg.slogdet(jac_x)[1], logdet[b])
    torch.testing.assert_close(model.from_noise(eps, c), x)


@pytest.mark.parametrize("name,cls,kwargs", CONDITIONAL_MODELS, ids=[m[0] for m in CONDITIONAL_MODELS])
def test_conditional_sampling_follows_nflows_layout(name, cls, kwargs):
    model = _ready(cls, kwargs)
    c = torch.randn(3, 2, dtype=torch.float64)
    torch.manual_seed(7)
    s = model.sample(5, c)
    assert s.shape == (3, 5, 3)
    torch.manual_seed(7)
    assert torch.equal(model.sample(5, c), s)  # seeded draws repeat
    # Sample (i, j) comes from context i: mapping it to noise with that context gives N(0, I) draws, and
    # with another context it would not invert to the same point.
    eps, _ = model.to_noise(s.reshape(15, 3), c.repeat_interleave(5, 0))
    torch.testing.assert_close(model.from_noise(eps, c.repeat_interleave(5, 0)), s.reshape(15, 3))
    assert not torch.allclose(model.from_noise(eps, c.repeat(5, 1)), s.reshape(15, 3))
    assert torch.isfinite(model.log_prob(s.reshape(15, 3), c.repeat_interleave(5, 0))).all()


def test_conditional_density_integrates_to_one_for_each_context():
    torch.manual_seed(0)
    model = MAF([2], hidden=12, num_layers=3, context_features=1).double()
    model.initialize(torch.randn(64, 2, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64))
    perturb(model, 0.1).eval()
    xs = torch.linspace(-15, 15, 601, dtype=torch.float64)  # spacing 0.05; samples reach |x| ~ 10 at c = -1
    X, Y = torch.meshgrid(xs, xs, indexing="ij")
    grid = torch.stack([X.flatten(), Y.flatten()], 1)
    masses = []
    for c in (-1.0, 1.0):
        with torch.no_grad():
            lp = model.log_prob(grid, torch.full((grid.shape[0], 1), c, dtype=torch.float64))
        masses.append(lp.exp().sum().item() * 0.05 ** 2)
        assert abs(masses[-1] - 1) < 5e-3, masses
    assert not torch.allclose(model.log_prob(grid[:50], torch.full((50, 1), -1.0, dtype=torch.float64)),
                              model.log_prob(grid[:50], torch.full((50, 1), 1.0, dtype=torch.float64)))


def test_model_context_errors():
    unconditional = MAF([3], hidden=8, num_layers=1)
    with pytest.raises(ValueError, match="MAF was built without context_features: it takes no context"):
        unconditional.log_prob(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="MAF was built without context_features: it takes no context"):
        unconditional.sample(2, torch.randn(4, 2))
    conditional = MAF([3], hidden=8, num_layers=1, context_features=2)
    with pytest.raises(ValueError, match=r"MAF was built with context_features=2: it needs a context tensor \[B, 2\]"):
        conditional.log_prob(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"MAF: context must have shape \[4, 2\] \(one row per example\); got \[3"):
        conditional.log_prob(torch.randn(4, 3), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"MAF: context must have shape \[B, 2\]"):
        conditional.sample(2, torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"context_features applies to vectors \(\[D\]\) only"):
        RealNVP([1, 4, 4], context_features=2)
    with pytest.raises(ValueError, match="context_features must be >= 1"):
        Glow([3], context_features=0)
    with pytest.raises(ValueError, match="with use_residual_blocks, num_hidden counts the first layer"):
        MAF([3], residual=True)


# ------------------------------------------------------------------------------------------------
# The conditional 2-D density and learning it
# ------------------------------------------------------------------------------------------------


def test_banana_log_density_is_exact():
    density = conditional_density_2d("banana")
    assert set(CONDITIONAL_DENSITIES_2D) == {"banana"}
    xs = torch.linspace(-8, 8, 641, dtype=torch.float64)  # spacing 0.025: the ridge is 0.5 wide
    X, Y = torch.meshgrid(xs, torch.linspace(-12, 12, 961, dtype=torch.float64), indexing="ij")
    grid = torch.stack([X.flatten(), Y.flatten()], 1)
    for c in (-1.0, 0.3, 1.0):
        lp = density.log_prob(grid, torch.full((grid.shape[0], 1), c, dtype=torch.float64))
        assert abs(lp.exp().sum().item() * 0.025 ** 2 - 1) < 1e-3  # Riemann sum of a smooth density
    x, c = density.sample_joint(100_000, torch.Generator().manual_seed(0))
    assert c.min() >= -1 and c.max() <= 1 and c.shape == (100_000, 1)
    nll = -density.log_prob(x, c)
    entropy, _ = density.true_nll()
    assert abs(nll.mean().item() - entropy) < 4 * nll.std().item() / math.sqrt(1e5)  # samples follow log_prob
    # The context matters: the second coordinate's mean at x_1 = c + 2 is 3c.
    near = (x[:, 0] - c[:, 0] - 2).abs() < 0.1
    slope = torch.linalg.lstsq(c[near], x[near, 1:]).solution.item()
    assert abs(slope - 3) < 0.2


def _train_conditional(model, density, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, c = density.sample_joint(20_000, g)
    x, c = x.float(), c.float()
    model.initialize(x[:512], c[:512])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (256,), generator=g)
        loss = -model.log_prob(x[idx], c[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


def _kl_gaps(model, density, contexts, n=2000, seed=5):
    """Per context c: mean over x ~ p(. | c) of log p(x | c) - log q(x | c), an unbiased estimate of
    KL(p(. | c) || q(. | c))."""
    g = torch.Generator().manual_seed(seed)
    gaps = []
    for value in contexts:
        c = torch.full((n, 1), float(value), dtype=torch.float64)
        x = density.sample(c, g)
        with torch.no_grad():
            q = model.log_prob(x.float(), c.float()).double()
        gaps.append((density.log_prob(x, c) - q).mean().item())
    return gaps


def test_conditional_maf_learns_the_conditional_banana():
    """KL gap <= 0.1 nats averaged over contexts spanning the context's range (measured: ~0.01 after 800
    steps, ~15 s on one core). Fed the wrong contexts, the same model is far off (~3.7 nats): it uses them."""
    torch.manual_seed(0)
    density = conditional_density_2d("banana")
    model = _train_conditional(MAF([2], num_layers=4, hidden=32, context_features=1), density, steps=800)
    gaps = _kl_gaps(model, density, torch.linspace(-1, 1, 9))
    assert sum(gaps) / len(gaps) <= 0.1, gaps
    g = torch.Generator().manual_seed(9)
    x, c = density.sample_joint(4000, g)
    with torch.no_grad():
        shuffled = model.log_prob(x.float(), c[torch.randperm(4000, generator=g)].float()).double()
    assert (density.log_prob(x, c) - shuffled).mean().item() > 1.0
