"""fastdensity.accelerate: nflows, zuko and normflows models keep their parameters, state_dict, log_prob,
samples (same seed) and gradients - compared with an untouched deep copy of the peer model, in float64,
on the reference and the kernel path - while their supported pieces run fastdensity's fused ops."""
from __future__ import annotations

import copy

import pytest
import torch

import fastdensity
from fastdensity.peers import HANDLERS, AccelerationReport
from helpers import requires_interpreter

nflows = pytest.importorskip("nflows")
zuko = pytest.importorskip("zuko")
nf = pytest.importorskip("normflows")

from nflows.distributions.normal import ConditionalDiagonalNormal, StandardNormal  # noqa: E402
from nflows.flows import MaskedAutoregressiveFlow  # noqa: E402
from nflows.flows.base import Flow  # noqa: E402
from nflows.nn.nets import ResidualNet  # noqa: E402
from nflows.transforms import (ActNorm, AdditiveCouplingTransform, AffineCouplingTransform,  # noqa: E402
                               CompositeTransform, LULinear, MaskedAffineAutoregressiveTransform,
                               MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
                               PiecewiseRationalQuadraticCouplingTransform, RandomPermutation,
                               ReversePermutation)
from nflows.transforms.coupling import PiecewiseLinearCouplingTransform  # noqa: E402

BACKENDS = ["reference", pytest.param("triton", marks=requires_interpreter)]
D, C = 4, 2


@pytest.fixture(autouse=True)
def float64_default():
    """The peers draw base samples in the default dtype: float64 models need float64 draws."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def perturb(model, scale=0.2, seed=1):
    """Parameters off their initialisation (identity-initialised layers would hide a wrong scale or layout)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# ------------------------------------------------------------------------------------------------
# Peer models and how to run them: (build, log_prob(model, x, c), sample(model, n, c), conditional)
# ------------------------------------------------------------------------------------------------


def nflows_couplings():
    """ActNorm, LULinear, affine and additive couplings with a conditional ResidualNet, a permutation, and a
    conditional MAF layer (whose MADE adds the context into its masked layers' outputs in place)."""
    net = lambda i, o: ResidualNet(i, o, 16, context_features=C, num_blocks=1)  # noqa: E731
    transform = CompositeTransform([
        ActNorm(D), LULinear(D, identity_init=False), AffineCouplingTransform(torch.tensor([1, 0, 1, 0]), net),
        RandomPermutation(D), AdditiveCouplingTransform(torch.tensor([0, 1, 0, 1]), net),
        MaskedAffineAutoregressiveTransform(D, 16, context_features=C, num_blocks=1)])
    flow = perturb(Flow(transform, StandardNormal([D])))
    flow.log_prob(torch.randn(16, D) * 2, torch.randn(16, C))  # ActNorm's data-dependent initialisation
    return flow.eval()


def nflows_maf():
    """nflows' MaskedAutoregressiveFlow with its defaults (residual MADE blocks, softplus scale)."""
    return perturb(MaskedAutoregressiveFlow(D, 16, num_layers=2, num_blocks_per_layer=2)).eval()


def nflows_conditional_maf():
    """Plain MADE blocks with a context, batch norm inside (eval mode), the conditional base."""
    transforms = []
    for _ in range(2):
        transforms += [ReversePermutation(D), MaskedAffineAutoregressiveTransform(
            D, 16, context_features=C, use_residual_blocks=False, use_batch_norm=True)]
    flow = Flow(CompositeTransform(transforms), ConditionalDiagonalNormal([D], torch.nn.Linear(C, 2 * D)))
    return perturb(flow).eval()


def nflows_nsf():
    """Neural spline flow pieces, conditional: a spline coupling whose kept features go through a learned
    PiecewiseRationalQuadraticCDF, and an autoregressive spline layer. A tail bound of 1.5 puts part of
    the standard-normal inputs and samples on the identity tails."""
    net = lambda i, o: ResidualNet(i, o, 16, context_features=C, num_blocks=1)  # noqa: E731
    spline = {"num_bins": 4, "tails": "linear", "tail_bound": 1.5}
    transform = CompositeTransform([
        PiecewiseRationalQuadraticCouplingTransform(torch.tensor([1, 0, 1, 0]), net,
                                                    apply_unconditional_transform=True, **spline),
        ReversePermutation(D),
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform(D, 16, context_features=C, num_blocks=1, **spline)])
    return perturb(Flow(transform, StandardNormal([D]))).eval()


def zuko_nsf():
    """zuko's NSF (autoregressive; bound 5, so the inputs stay inside: zuko_coupling_nsf reaches the tails)."""
    return perturb(zuko.flows.NSF(D, C, bins=4, transforms=2, hidden_features=[16]))


def zuko_coupling_nsf():
    """zuko's coupling NSF (passes=2), its splines on [-1, 1] through functools.partial keywords."""
    from functools import partial

    from zuko.transforms import MonotonicRQSTransform

    flow = zuko.flows.NSF(D, C, bins=4, transforms=2, hidden_features=[16], passes=2)
    for t in flow.transform.transforms:
        t.univariate = partial(MonotonicRQSTransform, bound=1.0, slope=1e-2)
    return perturb(flow)


def zuko_maf():
    return perturb(zuko.flows.MAF(D, C, transforms=2, hidden_features=[16, 16]))


def zuko_residual_maf():
    return perturb(zuko.flows.MAF(D, C, transforms=2, hidden_features=[16, 16], residual=True))


def zuko_realnvp():
    return perturb(zuko.flows.RealNVP(D, C, transforms=2, hidden_features=[16]))


def normflows_flow():
    flows = []
    for scale_map in ("exp", "sigmoid", "sigmoid_inv"):
        flows += [nf.flows.AffineCouplingBlock(nf.nets.MLP([D // 2, 16, D]), scale_map=scale_map),
                  nf.flows.Permute(D, mode="swap")]
    flows.append(nf.flows.AffineCouplingBlock(nf.nets.MLP([D // 2, 16, D // 2]), scale=False))
    return perturb(nf.NormalizingFlow(nf.distributions.DiagGaussian(D), flows))


def _nflows_log_prob(model, x, c):
    return model.log_prob(x, c)


def _nflows_sample(model, n, c):
    return model.sample(n, None if c is None else c[:2])


def _zuko_log_prob(model, x, c):
    return model(c).log_prob(x)


def _zuko_sample(model, n, c):
    return model(c[0]).rsample((n,))


def _normflows_log_prob(model, x, c):
    return model.log_prob(x)


def _normflows_sample(model, n, c):
    return model.sample(n)[0]


MODELS = {
    "nflows couplings": (nflows_couplings, _nflows_log_prob, _nflows_sample, True),
    "nflows maf": (nflows_maf, _nflows_log_prob, _nflows_sample, False),
    "nflows conditional maf": (nflows_conditional_maf, _nflows_log_prob, _nflows_sample, True),
    "nflows nsf": (nflows_nsf, _nflows_log_prob, _nflows_sample, True),
    "zuko maf": (zuko_maf, _zuko_log_prob, _zuko_sample, True),
    "zuko nsf": (zuko_nsf, _zuko_log_prob, _zuko_sample, True),
    "zuko coupling nsf": (zuko_coupling_nsf, _zuko_log_prob, _zuko_sample, True),
    "zuko residual maf": (zuko_residual_maf, _zuko_log_prob, _zuko_sample, True),
    "zuko realnvp": (zuko_realnvp, _zuko_log_prob, _zuko_sample, True),
    "normflows couplings": (normflows_flow, _normflows_log_prob, _normflows_sample, False),
}

# What accelerate must replace in each (fused class name -> count).
EXPECTED = {
    "nflows couplings": {"FusedActNorm": 1, "FusedLULinear": 1, "FusedAffineCouplingTransform": 1,
                         "FusedAdditiveCouplingTransform": 1, "FusedMaskedAffineAutoregressiveTransform": 1,
                         "FusedMaskedLinear": 4},
    "nflows maf": {"FusedMaskedAffineAutoregressiveTransform": 2, "FusedMaskedLinear": 12},
    "nflows conditional maf": {"FusedMaskedAffineAutoregressiveTransform": 2, "FusedMaskedLinear": 8},
    "nflows nsf": {"FusedPiecewiseRationalQuadraticCouplingTransform": 1, "FusedPiecewiseRationalQuadraticCDF": 1,
                   "FusedMaskedPiecewiseRationalQuadraticAutoregressiveTransform": 1, "FusedMaskedLinear": 4},
    "zuko maf": {"FusedMaskedAutoregressiveTransform": 2, "FusedMaskedLinear": 6},
    "zuko nsf": {"FusedMaskedAutoregressiveTransform": 2, "FusedMaskedLinear": 4},
    "zuko coupling nsf": {"FusedMaskedAutoregressiveTransform": 2, "FusedMaskedLinear": 4},
    "zuko residual maf": {"FusedMaskedAutoregressiveTransform": 2, "FusedMaskedLinear": 12},
    "zuko realnvp": {"FusedGeneralCouplingTransform": 2},
    "normflows couplings": {"FusedAffineCoupling": 4},
}


def _fused_counts(report: AccelerationReport, entries=None) -> dict:
    counts: dict[str, int] = {}
    for e in report.replaced if entries is None else entries:
        name = e.detail.split(" ")[0]
        counts[name] = counts.get(name, 0) + 1
    return counts


def _inputs(conditional, n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    return x, (torch.randn(n, C, generator=g) if conditional else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_accelerated_model_equals_the_untouched_one(name, backend):
    build, log_prob, sample, conditional = MODELS[name]
    torch.manual_seed(0)
    original = build()
    model = copy.deepcopy(original)
    params_before = {n: p for n, p in model.named_parameters()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    report = fastdensity.accelerate(model)

    assert _fused_counts(report) == EXPECTED[name], str(report)
    # Same Parameter objects and the same state_dict: optimizers and checkpoints carry over.
    assert all(p is params_before[n] for n, p in model.named_parameters())
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())

    x, c = _inputs(conditional)
    with fastdensity.set_backend(backend):
        lp = log_prob(model, x, c)
        lp_original = log_prob(original, x, c)
        torch.testing.assert_close(lp, lp_original)  # float64: agreement to round-off
        upstream = torch.randn(lp.shape, generator=torch.Generator().manual_seed(4))
        grads = torch.autograd.grad((lp * upstream).sum(), list(model.parameters()), allow_unused=True)
        grads_original = torch.autograd.grad((lp_original * upstream).sum(), list(original.parameters()),
                                             allow_unused=True)
        assert sum(g is not None for g in grads) > 0
        for (n, _), g, g0 in zip(model.named_parameters(), grads, grads_original):
            assert (g is None) == (g0 is None), n
            if g is not None:
                torch.testing.assert_close(g, g0, msg=lambda m: f"gradient of {n}: {m}")
        with torch.no_grad():
            torch.manual_seed(11)
            s = sample(model, 3, c)
            torch.manual_seed(11)
            s_original = sample(original, 3, c)
        torch.testing.assert_close(s, s_original)


def test_the_fused_ops_really_run(monkeypatch):
    """Not vacuous: after accelerate, the nflows MAF's log_prob goes through fastdensity's ops."""
    calls = []
    for op in ("affine_coupling", "masked_linear"):
        real = getattr(fastdensity.ops, op)
        monkeypatch.setattr(fastdensity.ops, op, lambda *a, _r=real, _n=op, **k: calls.append(_n) or _r(*a, **k))
    model = nflows_maf()
    model.log_prob(torch.randn(3, D))
    assert calls == []
    fastdensity.accelerate(model)
    with fastdensity.set_backend("triton"):  # the kernel path, as on CUDA (here through the interpreter)
        model.log_prob(torch.randn(3, D))
    assert calls.count("affine_coupling") == 2 and calls.count("masked_linear") == 12
    calls.clear()
    with fastdensity.set_backend("reference"):
        model.log_prob(torch.randn(3, D))
    # where the op would run its reference, the MADE's layers run nflows' own product
    assert calls.count("affine_coupling") == 2 and calls.count("masked_linear") == 0


def test_the_fused_spline_really_runs(monkeypatch):
    """Not vacuous: the accelerated spline flows call fastdensity's spline op, once per spline layer."""
    calls = []
    real = fastdensity.ops.rational_quadratic_spline
    monkeypatch.setattr(fastdensity.ops, "rational_quadratic_spline",
                        lambda *a, **k: calls.append(k["parameterization"]) or real(*a, **k))
    x, c = _inputs(True)
    for build, log_prob, expected in ((nflows_nsf, _nflows_log_prob, ["nflows"] * 3),
                                      (zuko_nsf, _zuko_log_prob, ["zuko"] * 2)):
        model = build()
        log_prob(model, x, c)
        assert calls == []
        fastdensity.accelerate(model)
        log_prob(model, x, c)
        assert calls == expected
        calls.clear()


def test_spline_options_the_op_does_not_compute_are_left():
    """nflows' default tails=None (a spline on [0, 1] that rejects other inputs) is not the fused op's:
    those layers are left, with the reason, and still compute as nflows does."""
    net = lambda i, o: ResidualNet(i, o, 8)  # noqa: E731
    model = CompositeTransform([
        PiecewiseRationalQuadraticCouplingTransform(torch.tensor([1, 0, 1, 0]), net, num_bins=3),
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform(D, 8, num_bins=3, tails=None),
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform(D, 8, num_bins=3, tails="linear")])
    x = torch.rand(5, D)  # inside [0, 1], where nflows' tails=None spline is defined
    expected = model(x)
    report = fastdensity.accelerate(model)
    left = {e.name: e.detail for e in report.left}
    for name in ("_transforms.0", "_transforms.1"):
        assert left[name].startswith("tails=None: the fused op computes only tails='linear'"), left[name]
    assert "_transforms.2" in {e.name for e in report.replaced}
    for got, want in zip(model(x), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accelerated_nflows_spline_flow_compiles_where_the_original_cannot(backend):
    """nflows' spline indexes with boolean masks and checks its inputs on the host, which
    torch.compile(fullgraph=True) refuses; the accelerated flow compiles to one graph and gives the
    untouched flow's log-density."""
    torch.manual_seed(0)
    original = nflows_nsf()
    model = copy.deepcopy(original)
    fastdensity.accelerate(model)
    x, c = _inputs(True)
    expected = original.log_prob(x, c)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)data-dependent"):
        torch.compile(lambda x, c: original.log_prob(x, c), fullgraph=True, backend="aot_eager")(x, c)
    torch._dynamo.reset()
    with fastdensity.set_backend(backend):
        compiled = torch.compile(lambda x, c: model.log_prob(x, c), fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, c), expected)


class ConvNet(torch.nn.Module):
    """A conditioner for image couplings with nflows' net signature, forward(x, context=None)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(in_channels, 8, 3, padding=1), torch.nn.Tanh(),
                                       torch.nn.Conv2d(8, out_channels, 3, padding=1))

    def forward(self, x, context=None):
        return self.net(x)


def test_images_through_nflows_actnorm_and_coupling():
    """[B, C, H, W]: ActNorm per channel (stride-0 broadcast views) and a channel coupling with a conv net."""
    net = ConvNet
    transform = perturb(CompositeTransform([ActNorm(4), AffineCouplingTransform(torch.tensor([0, 1, 0, 1]), net),
                                            ActNorm(4)]))
    x = torch.randn(3, 4, 5, 3)
    transform(x)
    transform.eval()
    model = copy.deepcopy(transform)
    fastdensity.accelerate(model)
    for direction in ("forward", "inverse"):
        (z, ld), (z0, ld0) = getattr(model, direction)(x), getattr(transform, direction)(x)
        torch.testing.assert_close(z, z0)
        torch.testing.assert_close(ld, ld0)


def test_images_through_the_nflows_spline_coupling():
    """[B, C, H, W]: the conv net's [B, C (3K - 1), H, W] read as a permuted [B, C, H, W, 3K - 1] view. This
    net has no hidden_channels: nflows warns that the logits are not scaled, and so does the fused class."""
    original = perturb(PiecewiseRationalQuadraticCouplingTransform(torch.tensor([0, 1, 0, 1]), ConvNet, num_bins=3,
                                                                   tails="linear", tail_bound=1.5))
    model = copy.deepcopy(original)
    fastdensity.accelerate(model)
    assert type(model).__name__ == "FusedPiecewiseRationalQuadraticCouplingTransform"
    x = torch.randn(3, 4, 5, 3)
    for direction in ("forward", "inverse"):
        with pytest.warns(UserWarning, match="not scaled"):
            z0, ld0 = getattr(original, direction)(x)
        with pytest.warns(UserWarning, match="not scaled"):
            z, ld = getattr(model, direction)(x)
        torch.testing.assert_close(z, z0)
        torch.testing.assert_close(ld, ld0)


def test_actnorm_still_initialises_from_data():
    original = ActNorm(3)
    model = copy.deepcopy(original)
    fastdensity.accelerate(model)
    x = 3 * torch.randn(64, 3) + 1
    z, _ = model(x)
    torch.testing.assert_close(z, original(x)[0])
    assert bool(model.initialized) and torch.equal(model.shift, original.shift)


def test_lulinear_inverse_and_cache():
    original = perturb(LULinear(5, identity_init=False, using_cache=True))
    model = copy.deepcopy(original)
    fastdensity.accelerate(model)
    x = torch.randn(6, 5)
    for mode in ("train", "eval"):  # eval uses nflows' cache, which stays nflows' own
        getattr(model, mode)()
        getattr(original, mode)()
        for direction in ("forward", "inverse"):
            (y, ld), (y0, ld0) = getattr(model, direction)(x), getattr(original, direction)(x)
            torch.testing.assert_close(y, y0)
            torch.testing.assert_close(ld, ld0)


def test_training_continues_with_the_same_optimizer():
    """An optimizer built before accelerate keeps stepping the same parameters: a few Adam steps on the
    accelerated model and on an untouched copy end at the same weights."""
    original = nflows_maf().train()
    model = copy.deepcopy(original)
    opt, opt_original = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(original.parameters(), lr=1e-2)
    x = torch.randn(32, D)
    for step in range(3):
        if step == 1:
            fastdensity.accelerate(model)  # mid-training: the optimizer's state carries on
        for m, o in ((model, opt), (original, opt_original)):
            o.zero_grad()
            (-m.log_prob(x).mean()).backward()
            o.step()
    for (n, p), p0 in zip(model.named_parameters(), original.parameters()):
        torch.testing.assert_close(p, p0, msg=lambda m: f"{n}: {m}")


def test_checkpoints_load_both_ways():
    trained = nflows_maf()
    fastdensity.accelerate(trained)
    fresh = MaskedAutoregressiveFlow(D, 16, num_layers=2, num_blocks_per_layer=2).eval()
    fresh.load_state_dict(trained.state_dict())  # an accelerated model's checkpoint loads into plain nflows
    x = torch.randn(5, D)
    torch.testing.assert_close(fresh.log_prob(x), trained.log_prob(x))
    again = MaskedAutoregressiveFlow(D, 16, num_layers=2, num_blocks_per_layer=2).eval()
    fastdensity.accelerate(again)
    again.load_state_dict(fresh.state_dict())  # and a plain one into an accelerated model
    torch.testing.assert_close(again.log_prob(x), trained.log_prob(x))
    torch.save(again, buffer := __import__("io").BytesIO())  # whole-model pickling: fused classes import by name
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded.log_prob(x), trained.log_prob(x))


def test_calling_twice_is_harmless_and_dry_run_only_reports():
    model = nflows_couplings()
    x, c = _inputs(True)
    expected = model.log_prob(x, c)
    classes = {n: type(m) for n, m in model.named_modules()}
    dry = fastdensity.accelerate(model, dry_run=True)
    assert dry.dry_run and _fused_counts(dry) == EXPECTED["nflows couplings"]
    assert {n: type(m) for n, m in model.named_modules()} == classes  # nothing changed
    assert "would replace 9" in str(dry)
    first = fastdensity.accelerate(model)
    second = fastdensity.accelerate(model)
    assert second.replaced == [] and _fused_counts(second, second.already_fused) == EXPECTED["nflows couplings"]
    assert [e.name for e in second.left] == [e.name for e in first.left]
    torch.testing.assert_close(model.log_prob(x, c), expected)
    flow = zuko_maf()
    fastdensity.accelerate(flow)
    again = fastdensity.accelerate(flow)
    assert again.replaced == [] and {e.peer for e in again.already_fused} == {
        "zuko.flows.autoregressive.MaskedAutoregressiveTransform", "zuko.nn.MaskedLinear"}


@pytest.mark.parametrize("name", ["nflows nsf", "zuko nsf"])
def test_spline_flows_dry_run_then_twice(name):
    """The spline handlers through the same motions: a dry run reports and changes nothing, a second call
    finds everything fused and leaves the model computing what it did."""
    build, log_prob, _, conditional = MODELS[name]
    model = build()
    x, c = _inputs(conditional)
    expected = log_prob(model, x, c)
    classes = {n: type(m) for n, m in model.named_modules()}
    dry = fastdensity.accelerate(model, dry_run=True)
    assert dry.dry_run and _fused_counts(dry) == EXPECTED[name]
    assert {n: type(m) for n, m in model.named_modules()} == classes
    fastdensity.accelerate(model)
    second = fastdensity.accelerate(model)
    assert second.replaced == [] and _fused_counts(second, second.already_fused) == EXPECTED[name]
    torch.testing.assert_close(log_prob(model, x, c), expected)


def test_report_names_what_it_left_and_why():
    class MyCoupling(AffineCouplingTransform):  # a user's subclass: it may override the computing methods
        pass

    net = lambda i, o: ResidualNet(i, o, 8)  # noqa: E731
    model = CompositeTransform([
        ReversePermutation(D), MyCoupling(torch.tensor([1, 0, 1, 0]), net),
        PiecewiseLinearCouplingTransform(torch.tensor([0, 1, 0, 1]), net),
        AffineCouplingTransform(torch.tensor([1, 1, 0, 0]), net)])
    model._transforms[3].scale_activation = lambda u: torch.exp(u)  # newer nflows' option, not the default
    model.add_module("zuko_bpf", zuko.flows.BPF(D, transforms=1))  # Bernstein polynomials: not fused
    report = fastdensity.accelerate(model)
    left = {e.name: e.detail for e in report.left}
    assert "a subclass of supported nflows.transforms.coupling.AffineCouplingTransform" in left["_transforms.1"]
    assert "no fused implementation registered" in left["_transforms.2"]
    assert "a custom scale_activation" in left["_transforms.3"]
    assert "permutation" in left["_transforms.0"]
    assert "univariate transform BoundedBernsteinTransform: no fused version registered" in \
        left["zuko_bpf.transform.transforms.0"]
    assert "zuko_bpf.transform.transforms.0.hyper.0" in {e.name for e in report.replaced}  # its MaskedMLP still
    assert type(model._transforms[1]) is MyCoupling and type(model._transforms[3]) is AffineCouplingTransform
    text = str(report)
    assert "left" in text and "MyCoupling" in text
    with pytest.raises(TypeError, match="accelerate expects a torch.nn.Module"):
        fastdensity.accelerate(lambda x: x)


def test_every_handler_names_an_importable_fused_subclass_of_its_peer():
    from fastdensity.peers import _fused_class, qualified_name

    for peer, target in HANDLERS.items():
        fused = _fused_class(target)
        assert qualified_name(fused.__mro__[1]) == peer or peer in {qualified_name(b) for b in fused.__mro__}
        assert fused._fastdensity_fused and fused.fused_ops


@requires_interpreter
@pytest.mark.parametrize("name", ["nflows couplings", "normflows couplings"])
def test_compiles_fullgraph_where_the_original_does(name):
    """torch.compile(fullgraph=True) traces the accelerated model, the fused ops inside the graph, and
    gives the untouched model's log-density (the original compiles too: checked first)."""
    build, log_prob, _, conditional = MODELS[name]
    torch.manual_seed(0)
    original = build()
    model = copy.deepcopy(original)
    fastdensity.accelerate(model)
    x, c = _inputs(conditional)
    expected = log_prob(original, x, c)
    with fastdensity.set_backend("triton"):
        for m in (original, model):
            torch._dynamo.reset()
            compiled = torch.compile(lambda x, c, m=m: log_prob(m, x, c), fullgraph=True, backend="aot_eager")
            torch.testing.assert_close(compiled(x, c), expected)


@requires_interpreter
def test_coupling_with_an_unconditional_transform_on_the_kernel_path():
    """nflows adds the unconditional transform's log-det into the coupling's log-det in place: the fused
    op's log-det must be a tensor of its own, not a view of a kernel buffer (autograd refuses the latter)."""
    net = lambda i, o: ResidualNet(i, o, 8, num_blocks=1)  # noqa: E731
    coupling = AffineCouplingTransform(torch.tensor([1, 0, 1, 0]), net, unconditional_transform=ActNorm)
    model = perturb(Flow(CompositeTransform([coupling]), StandardNormal([D])))
    x = torch.randn(6, D)
    model.log_prob(x)  # ActNorm's data-dependent initialisation
    original = copy.deepcopy(model)
    fastdensity.accelerate(model)
    with fastdensity.set_backend("triton"):
        log_prob = model.log_prob(x)
        log_prob.sum().backward()
    torch.testing.assert_close(log_prob, original.log_prob(x), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# The incremental inverse of accelerated nflows MADE transforms (sampling)
# ------------------------------------------------------------------------------------------------

MADE_VARIANTS = {  # name: MADE options of the nflows transform
    "residual": dict(use_residual_blocks=True),
    "plain": dict(use_residual_blocks=False),
    "plain random masks": dict(use_residual_blocks=False, random_mask=True),
}


def _nflows_made_transform(kind, variant, conditional, batch_norm):
    options = dict(features=5, hidden_features=12, num_blocks=2, context_features=C if conditional else None,
                   use_batch_norm=batch_norm, **MADE_VARIANTS[variant])
    if kind == "spline":
        transform = MaskedPiecewiseRationalQuadraticAutoregressiveTransform(num_bins=4, tails="linear",
                                                                            tail_bound=3.0, **options)
    else:
        transform = MaskedAffineAutoregressiveTransform(**options)
    perturb(transform, scale=0.3)
    if batch_norm:  # running statistics off their initial 0 / 1, from one training-mode pass
        g = torch.Generator().manual_seed(7)
        transform(torch.randn(64, 5, generator=g), torch.randn(64, C, generator=g) if conditional else None)
    return transform.eval()


@pytest.mark.parametrize("batch_norm", [False, True], ids=["", "batch-norm"])
@pytest.mark.parametrize("conditional", [False, True], ids=["", "conditional"])
@pytest.mark.parametrize("variant", list(MADE_VARIANTS))
@pytest.mark.parametrize("kind", ["affine", "spline"])
def test_accelerated_nflows_made_inverse_is_incremental_and_equals_nflows(kind, variant, conditional, batch_norm):
    """nflows inverts a MADE transform by D full MADE passes; accelerated, the inverse computes each hidden
    unit once (no MADE call at all) and gives nflows' answer to float64 round-off - with nflows' unsorted
    hidden degrees, its two block structures, its context wiring and batch norm in eval mode."""
    original = _nflows_made_transform(kind, variant, conditional, batch_norm)
    model = copy.deepcopy(original)
    fastdensity.accelerate(model)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(9, 5, generator=g)
    c = torch.randn(9, C, generator=g) if conditional else None
    calls = []
    hook = model.autoregressive_net.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        x, logdet = model.inverse(z, c)
        x_nflows, logdet_nflows = original.inverse(z, c)
    assert calls == []  # incremental: not one full MADE pass
    torch.testing.assert_close(x, x_nflows, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(logdet, logdet_nflows, rtol=1e-11, atol=1e-11)
    # and it is the inverse: the forward maps x back to z
    torch.testing.assert_close(model(x, c)[0], z, rtol=1e-10, atol=1e-10)
    # Where autograd needs a graph (grad mode, parameters that require grad), nflows' D passes run.
    calls.clear()
    x_graph, _ = model.inverse(z, c)
    hook.remove()
    assert len(calls) == 5 and x_graph.requires_grad
    torch.testing.assert_close(x_graph, x_nflows, rtol=1e-11, atol=1e-11)


def test_accelerated_nflows_made_in_training_mode_with_batch_norm_keeps_nflows_passes():
    """Batch norm in training mode normalises by each pass's batch: no single pass equals the D passes, so
    the accelerated inverse runs nflows' D passes there (and matches it)."""
    original = _nflows_made_transform("affine", "residual", False, batch_norm=True).train()
    model = copy.deepcopy(original)
    fastdensity.accelerate(model)
    z = torch.randn(6, 5)
    calls = []
    model.autoregressive_net.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        x, _ = model.inverse(z)
        x_nflows, _ = original.inverse(z)
    assert len(calls) == 5
    torch.testing.assert_close(x, x_nflows)


ZUKO_FLOWS = {
    "MAF": lambda **kw: zuko.flows.MAF(**kw),
    "MAF random order, uneven widths":
        lambda **kw: zuko.flows.MAF(randperm=True, **{**kw, "hidden_features": (12, 20, 8)}),
    "NSF": lambda **kw: zuko.flows.NSF(bins=4, **kw),
}


@pytest.mark.parametrize("conditional", [False, True], ids=["", "conditional"])
@pytest.mark.parametrize("name", list(ZUKO_FLOWS))
def test_accelerated_zuko_autoregressive_inverse_is_incremental_and_equals_zuko(name, conditional):
    """zuko inverts a fully autoregressive transform by D hyper-network passes; accelerated, each hidden unit
    is computed once (no hyper-network call at all), with the degrees read off zuko's masks, and the samples
    equal zuko's to float64 round-off - batched or unbatched context, random orders, uneven hidden widths."""
    torch.manual_seed(0)
    original = perturb(ZUKO_FLOWS[name](features=5, context=C if conditional else 0, transforms=2,
                                        hidden_features=(16, 16)), scale=0.3)
    model = copy.deepcopy(original)
    fastdensity.accelerate(model)
    calls = []
    for module in model.modules():
        if isinstance(module, zuko.nn.MaskedMLP):
            module.register_forward_hook(lambda *args: calls.append(1))
    g = torch.Generator().manual_seed(5)
    z = torch.randn(9, 5, generator=g)
    contexts = [torch.randn(9, C, generator=g), torch.randn(C, generator=g)] if conditional else [None]
    for c in contexts:
        with torch.no_grad():
            x = model(c).transform.inv(z)
            x_zuko = original(c).transform.inv(z)
            torch.manual_seed(3)
            samples = model(c).sample((4,))
            torch.manual_seed(3)
            samples_zuko = original(c).sample((4,))
        torch.testing.assert_close(x, x_zuko, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(samples, samples_zuko, rtol=1e-11, atol=1e-11)
    assert calls == []  # incremental: not one full hyper-network pass
    # Where autograd needs a graph (grad mode, parameters that require grad), zuko's passes run.
    x_graph = model(contexts[0]).transform.inv(z)
    assert x_graph.requires_grad and len(calls) == 2 * 5
    torch.testing.assert_close(x_graph, original(contexts[0]).transform.inv(z), rtol=1e-11, atol=1e-11)


def test_zuko_transforms_the_incremental_inverse_does_not_read_keep_zukos_passes():
    from fastdensity.peers.zuko import incremental_unsupported

    residual = zuko.flows.MAF(features=4, transforms=1, residual=True)
    coupling = zuko.flows.NSF(features=4, transforms=1, passes=2)
    for flow, reason in ((residual, "residual blocks"), (coupling, "passes=2")):
        original = copy.deepcopy(flow)
        fastdensity.accelerate(flow)
        transform = flow.transform.transforms[0]
        assert reason in incremental_unsupported(transform)
        z = torch.randn(3, 4)
        with torch.no_grad():
            torch.testing.assert_close(flow().transform.inv(z), original().transform.inv(z))
