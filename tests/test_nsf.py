"""fastdensity.models.NSF: both kinds on vectors and flattened images - shapes, log-dets against autograd,
exact inverses, gradients for every parameter, the identity start, a normalised 2-D density, the registry
and training with its plots; a slow test that short training reaches a loose quality bound."""
from __future__ import annotations

import math

import pytest
import torch

from fastdensity.models import MODELS, NSF, build_model
from fastdensity.nn import ActNorm
from fastdensity.training import TrainConfig, train

KINDS = ["coupling", "autoregressive"]
TINY = {"coupling": {"hidden": 8, "num_layers": 3, "num_bins": 4},
        "autoregressive": {"hidden": 8, "num_layers": 2, "num_bins": 4, "num_blocks": 1}}


def _ready(model: NSF, x: torch.Tensor, scale: float = 0.3) -> NSF:
    """ActNorm's data-dependent initialisation, then every parameter moved off its identity start."""
    model.initialize(x)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(5,), (1, 2, 3)], ids=["vector", "image"])
def test_shapes_and_exact_inverse(kind, shape):
    model = _ready(NSF(shape, kind=kind, **TINY[kind]).double(), torch.randn(64, *shape, dtype=torch.float64))
    x = 2 * torch.randn(7, *shape, dtype=torch.float64)
    assert model.log_prob(x).shape == (7,)
    eps, logdet = model.to_noise(x)
    assert eps.shape == (7, math.prod(shape)) and logdet.shape == (7,)
    torch.testing.assert_close(model.from_noise(eps), x)
    with torch.no_grad():
        samples = model.sample(4)
    assert samples.shape == (4, *shape) and torch.isfinite(samples).all()


@pytest.mark.parametrize("kind", KINDS)
def test_logdet_is_log_abs_det_jacobian(kind):
    model = _ready(NSF((4,), kind=kind, **TINY[kind]).double(), torch.randn(64, 4, dtype=torch.float64))
    x = 2 * torch.randn(3, 4, dtype=torch.float64)
    _, logdet = model.to_noise(x)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: model.to_noise(v[None])[0][0], x[b])
        torch.testing.assert_close(logdet[b], torch.linalg.slogdet(jac).logabsdet)
    log_normal = -0.5 * model.to_noise(x)[0].pow(2).sum(1) - 2 * math.log(2 * math.pi)
    torch.testing.assert_close(model.log_prob(x), log_normal + logdet)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind):
    model = _ready(NSF((4,), kind=kind, **TINY[kind]).double(), torch.randn(64, 4, dtype=torch.float64))
    model.train()
    (-model.log_prob(2 * torch.randn(16, 4, dtype=torch.float64)).mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("kind", KINDS)
def test_starts_as_the_identity(kind):
    """Every spline starts with equal bins and unit slopes: without ActNorm, a fresh flow is y = x."""
    model = NSF((6,), kind=kind, actnorm=False, tail_bound=3.0, **TINY[kind]).double()
    x = 4 * torch.randn(9, 6, dtype=torch.float64)  # inside and outside the bound
    eps, logdet = model.to_noise(x)
    # The unit-slope bias is stored in float32 (the model is built in float32, then cast): slopes are 1
    # to ~1e-8, which moves y by ~1e-9 here. A start off the identity would be off by O(0.1).
    torch.testing.assert_close(eps, x, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(logdet, torch.zeros(9, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_2d_density_integrates_to_one(kind):
    # Bound 3 for both kinds: the grid below (+-9 at spacing 0.05) must hold the mass and resolve the bins.
    model = NSF((2,), kind=kind, tail_bound=3.0, **TINY[kind]).double()
    data = torch.randn(512, 2, dtype=torch.float64) * torch.tensor([1.5, 0.5], dtype=torch.float64) + 0.3
    _ready(model, data, scale=0.2)
    xs = torch.linspace(-9, 9, 361, dtype=torch.float64)  # spacing 0.05
    X, Y = torch.meshgrid(xs, xs, indexing="ij")
    grid = torch.stack([X.flatten(), Y.flatten()], 1)
    with torch.no_grad():
        lp = torch.cat([model.log_prob(g) for g in grid.split(20_000)])
    mass = lp.exp().sum().item() * (xs[1] - xs[0]).item() ** 2
    assert abs(mass - 1) < 5e-3, mass
    log_normal = -0.5 * grid.pow(2).sum(1) - math.log(2 * math.pi)
    assert (lp - log_normal)[grid.norm(dim=1) < 2].abs().max() > 0.2  # not the standard normal


def test_registry_config_and_option_errors():
    assert MODELS["nsf"] is NSF
    model = build_model("nsf", (3,), kind="autoregressive", **TINY["autoregressive"])
    rebuilt = NSF(**model.config)
    assert rebuilt.config == model.config and rebuilt.num_parameters() == model.num_parameters()
    assert NSF((3,)).config["kind"] == "coupling"
    with pytest.raises(ValueError, match="kind must be one of 'coupling', 'autoregressive'"):
        NSF((3,), kind="spline")
    with pytest.raises(ValueError, match="num_blocks applies to kind='autoregressive' only"):
        NSF((3,), num_blocks=2)
    with pytest.raises(ValueError, match="num_hidden applies to kind='coupling' only"):
        NSF((3,), kind="autoregressive", num_hidden=2)
    with pytest.raises(ValueError, match="at least 2 features"):
        NSF((1,))
    with pytest.raises(ValueError, match="tail_bound"):
        NSF((3,), tail_bound=0)


def test_training_writes_metrics_and_plots(tmp_path):
    config = TrainConfig(model="nsf", data="checkerboard", steps=20, batch_size=64, eval_every=20, device="cpu",
                         model_args=dict(TINY["coupling"]), out=str(tmp_path))
    metrics = train(config, progress=False, plots=True)
    assert math.isfinite(metrics["kl_gap"])
    for name in ("metrics.json", "checkpoint.pt", "samples.png", "density.png"):
        assert (tmp_path / name).stat().st_size > 0, name


@pytest.mark.slow
@pytest.mark.parametrize("kind,data,steps,bound", [
    # Measured: KL gap 0.112 nats after 600 steps (0.041 after the default 3000), and 2.06 bits/dim after
    # 300 steps at width 64 (1.91 with the defaults); the bounds leave room for other machines' round-off
    # and thread counts, and the digits one still asks for clearly better than independent pixels (2.42).
    ("coupling", "checkerboard", 600, 0.2),
    ("autoregressive", "digits", 300, 2.25),
])
def test_short_training_reaches_a_loose_bound(tmp_path, kind, data, steps, bound):
    args = {"kind": kind, **({"hidden": 64} if kind == "autoregressive" else {})}
    config = TrainConfig(model="nsf", data=data, steps=steps, eval_every=steps, device="cpu", model_args=args,
                         out=str(tmp_path))
    metrics = train(config, progress=False, plots=False)
    figure = metrics["kl_gap"] if data == "checkerboard" else metrics["bits_per_dim"]
    assert figure < bound, metrics


# ------------------------------------------------------------------------------------------------
# Conditional NSF (context_features) and memory="invert"
# ------------------------------------------------------------------------------------------------


def _conditional(kind, shape=(4,), C=2, **options):
    """A conditional NSF, ActNorm initialised and every parameter moved off its identity start."""
    torch.manual_seed(0)
    model = NSF(shape, kind=kind, context_features=C, **{**TINY[kind], **options}).double()
    model.initialize(torch.randn(64, *shape, dtype=torch.float64), torch.randn(64, C, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_context_reaches_every_spline_layer(kind):
    model = _conditional(kind)
    assert model.config["context_features"] == 2 and model.context_features == 2
    x, c = 2 * torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    layers = [t for t in model.flow.levels[0] if not isinstance(t, ActNorm)]
    assert len(layers) == TINY[kind]["num_layers"]
    for layer in layers:
        jac = torch.autograd.functional.jacobian(lambda v: layer(x, v)[0], c)  # [5, 4, 5, 2]
        assert jac.abs().sum() > 0, type(layer).__name__
    jac = torch.autograd.functional.jacobian(lambda v: model.log_prob(x, v), c)  # [5, 5, 2]
    own = torch.eye(5, dtype=torch.bool)
    assert (jac[own].abs().sum(-1) > 0).all() and torch.count_nonzero(jac[~own]) == 0
    samples = model.sample(3, c[:2])
    assert samples.shape == (2, 3, 4)  # nflows' [num_contexts, n, ...]
    eps, _ = model.to_noise(samples.reshape(6, 4), c[:2].repeat_interleave(3, 0))
    torch.testing.assert_close(model.from_noise(eps, c[:2].repeat_interleave(3, 0)), samples.reshape(6, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_conditional_model_starts_as_the_identity_for_every_context(kind):
    model = NSF((4,), kind=kind, actnorm=False, tail_bound=3.0, context_features=3, **TINY[kind]).double().eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    for c in (torch.zeros(6, 3, dtype=torch.float64), 10 * torch.randn(6, 3, dtype=torch.float64)):
        eps, logdet = model.to_noise(x, c)
        # the unit-slope bias is stored in float32 (see test_starts_as_the_identity)
        torch.testing.assert_close(eps, x, rtol=0, atol=1e-6)
        torch.testing.assert_close(logdet, torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_context_errors(kind):
    conditional, plain = _conditional(kind), NSF((4,), kind=kind, **TINY[kind])
    x = torch.randn(4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"NSF: context must have shape \[4, 2\] \(one row per example\); got \[3"):
        conditional.log_prob(x, torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"NSF was built with context_features=2: it needs a context tensor"):
        conditional.log_prob(x)
    with pytest.raises(ValueError, match=r"NSF: context must have shape \[B, 2\]"):
        conditional.sample(2, torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="NSF was built without context_features: it takes no context"):
        plain.log_prob(x.float(), torch.randn(4, 2))
    with pytest.raises(ValueError, match="context_features must be >= 1"):
        NSF((4,), kind=kind, context_features=0)


def _parameter_gradients(model, x, c):
    """Gradients of a fixed random projection of log p(x | c) w.r.t. x, c and every parameter."""
    leaves = [x.clone().requires_grad_(), c.clone().requires_grad_()]
    weights = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    loss = (model.log_prob(*leaves) * weights).sum()
    return torch.autograd.grad(loss, leaves + list(model.parameters()))


def test_memory_invert_gives_stores_gradients_and_saves_less():
    from fastdensity.benchmarks.measure import saved_bytes

    store = _conditional("coupling", num_layers=6)
    invert = NSF((4,), kind="coupling", context_features=2, **{**TINY["coupling"], "num_layers": 6},
                 memory="invert").double()
    invert.load_state_dict(store.state_dict())
    assert invert.config["memory"] == "invert" and "memory" not in store.config  # store: configs as before
    assert NSF(**invert.config).flow.levels[0].memory == "invert"  # rebuilt from a checkpoint's config
    x, c = 2 * torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    for a, b in zip(_parameter_gradients(store, x, c), _parameter_gradients(invert, x, c)):
        # float64: the rebuilt inputs differ from the stored ones by round-off only (module docstring of
        # fastdensity.nn.invertible_memory: 1e-10 relative)
        assert b.abs().max() > 0 and ((a - b).abs().max() / a.abs().max()).item() <= 1e-10
    params = list(store.parameters())
    stored = saved_bytes(lambda: store.log_prob(x, c), exclude=[x, c, *params])
    inverted = saved_bytes(lambda: invert.log_prob(x, c), exclude=[x, c, *invert.parameters()])
    assert inverted < stored / 8, (inverted, stored)  # the bound; measured 2 kB against 202 kB here


def test_memory_invert_is_refused_for_the_autoregressive_kind():
    with pytest.raises(ValueError, match="memory='invert' applies to kind='coupling' only"):
        NSF((4,), kind="autoregressive", memory="invert")
    with pytest.raises(ValueError, match="memory must be one of 'store', 'invert'"):
        NSF((4,), memory="recompute")
