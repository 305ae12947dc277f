"""Layers and flows: log-dets against Jacobians, invertibility, kernel/reference agreement, compile, the
context rules, and the base distributions against torch.distributions and nflows'."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastdensity
from fastdensity import ConditionalDiagonalNormal, DiagonalNormal, Flow, StandardNormal
from fastdensity.nn import (ActNorm, AdditiveCoupling, AffineCoupling, CompositeTransform, InvConv1x1,
                            RandomPermutation, ReversePermutation, Squeeze)
from helpers import assert_compiles_like_reference, requires_interpreter


def mlp(hidden=8):
    return lambda n_in, n_out: nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


def conv_net(hidden=4):
    return lambda c_in, c_out: nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.Tanh(),
                                             nn.Conv2d(hidden, c_out, 3, padding=1))


def _perturb(module: nn.Module):
    """Random parameters, so that identity-initialised layers are tested away from the identity."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


def vector_layers():
    D = 5
    return {
        "affine sigmoid, interleaved mask": AffineCoupling(torch.tensor([1, 0, 1, 0, 1]), mlp()),
        "affine exp, half mask": AffineCoupling(torch.tensor([0, 0, 1, 1, 1]), mlp(), scale="exp"),
        # neither a range nor evenly spaced: the gather / index_copy path
        "affine sigmoid, irregular mask": AffineCoupling(torch.tensor([1, 0, 0, 1, 1]), mlp()),
        "affine softclamp, first half": AffineCoupling(torch.tensor([1, 1, 0, 0, 0]), mlp(), scale="softclamp"),
        "additive": AdditiveCoupling(torch.tensor([0, 1, 0, 1, 0]), mlp()),
        "actnorm": ActNorm(D),
        "invconv": InvConv1x1(D),
        "reverse": ReversePermutation(D),
        "random permutation": RandomPermutation(D),
    }


def image_layers():
    C = 4
    return {
        "affine on channels": AffineCoupling(torch.tensor([0, 1, 0, 1]), conv_net()),
        "additive on channels": AdditiveCoupling(torch.tensor([1, 1, 0, 0]), conv_net()),
        "actnorm": ActNorm(C),
        "invconv": InvConv1x1(C),
        "squeeze": Squeeze(),
    }


def _check_logdet_against_jacobian(layer, x):
    z, logdet = layer(x)
    for b in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda xb: layer(xb[None])[0][0], x[b])
        n = x[b].numel()
        sign, logabs = torch.linalg.slogdet(jac.reshape(n, n))
        assert sign != 0
        torch.testing.assert_close(logdet[b], logabs, rtol=1e-9, atol=1e-9)


def _check_inverse(layer, x):
    z, logdet = layer(x)
    x_back, logdet_inv = layer.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(vector_layers()))
def test_vector_layer_logdet_and_inverse(name):
    layer = _perturb(vector_layers()[name]).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    layer(x)  # ActNorm's data-dependent initialisation happens here
    x = torch.randn(3, 5, dtype=torch.float64)
    _check_logdet_against_jacobian(layer, x)
    _check_inverse(layer, x)


@pytest.mark.parametrize("name", list(image_layers()))
def test_image_layer_logdet_and_inverse(name):
    layer = _perturb(image_layers()[name]).double()
    x = torch.randn(2, 4, 4, 2, dtype=torch.float64)
    layer(x)
    _check_logdet_against_jacobian(layer, x)
    _check_inverse(layer, x)


def glow_like_flow(C=4):
    steps = []
    for i in range(2):
        steps += [ActNorm(C), InvConv1x1(C),
                  AffineCoupling(torch.tensor([i % 2, 1 - i % 2] * (C // 2)), conv_net(), scale="sigmoid")]
    return CompositeTransform(steps)


def test_composite_logdet_matches_jacobian_and_inverts():
    transform = _perturb(CompositeTransform([Squeeze(), glow_like_flow(C=8)])).double()
    x = torch.randn(2, 2, 4, 2, dtype=torch.float64)
    transform(x)
    _check_logdet_against_jacobian(transform, x)
    _check_inverse(transform, x)


def test_flow_density_integrates_to_one():
    torch.manual_seed(3)
    transform = _perturb(CompositeTransform([
        AffineCoupling(torch.tensor([1, 0]), mlp(16), scale="exp"), ReversePermutation(2),
        AffineCoupling(torch.tensor([1, 0]), mlp(16), scale="softclamp"), InvConv1x1(2)])).double()
    flow = Flow(transform, StandardNormal([2])).double()
    # The perturbed flow puts mass out to |x| ~ 30 (checked by sampling), so the grid must reach that far.
    grid = torch.linspace(-30, 30, 1201, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    with torch.no_grad():
        mass = flow.log_prob(pts).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(mass.item() - 1.0) < 2e-3  # Riemann-sum error of a 0.05 grid


def test_flow_sample_and_log_prob_agree():
    flow = Flow(CompositeTransform([AffineCoupling(torch.tensor([1, 0, 1]), mlp()), RandomPermutation(3),
                                    ActNorm(3)]), DiagonalNormal(3)).double()
    flow(torch.randn(16, 3, dtype=torch.float64))
    _perturb(flow)
    samples, log_prob = flow.sample_and_log_prob(7)
    assert samples.shape == (7, 3) and log_prob.shape == (7,)
    torch.testing.assert_close(flow.log_prob(samples), log_prob)
    assert flow.sample(4).shape == (4, 3)
    torch.testing.assert_close(flow.transform_to_noise(samples), flow._transform(samples)[0])


def test_conditional_flow_with_context():
    net = lambda n_in, n_out: ContextNet(n_in, n_out, context_features=2)  # noqa: E731
    flow = Flow(CompositeTransform([AffineCoupling(torch.tensor([1, 0, 1]), net),
                                    AffineCoupling(torch.tensor([0, 1, 0]), net)]), StandardNormal(3)).double()
    context = torch.randn(4, 2, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    lp = flow.log_prob(x, context)
    assert lp.shape == (4,)
    assert not torch.allclose(lp, flow.log_prob(x, context.flip(0)))  # the context matters
    samples, log_prob = flow.sample_and_log_prob(5, context)
    assert samples.shape == (4, 5, 3) and log_prob.shape == (4, 5)
    torch.testing.assert_close(flow.log_prob(samples.reshape(20, 3), context.repeat_interleave(5, 0)),
                               log_prob.reshape(20))


class ContextNet(nn.Module):
    def __init__(self, n_in, n_out, context_features):
        super().__init__()
        self.inp = nn.Linear(n_in, 8)
        self.ctx = nn.Linear(context_features, 8)
        self.out = nn.Linear(8, n_out)

    def forward(self, x, context):
        return self.out(torch.tanh(self.inp(x) + self.ctx(context)))


def test_actnorm_initialises_once_and_survives_state_dict():
    layer = ActNorm(3)
    x = 4 * torch.randn(256, 3, 5, 5) + 2
    z, _ = layer(x)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    before = layer.loc.detach().clone()
    layer(x + 10)  # a second batch must not re-initialise
    torch.testing.assert_close(layer.loc.detach(), before)
    fresh = ActNorm(3)
    fresh.load_state_dict(layer.state_dict())
    fresh(x + 10)
    torch.testing.assert_close(fresh.loc.detach(), before)


def test_invconv_weight_and_inverse_weight():
    layer = _perturb(InvConv1x1(6)).double()
    torch.testing.assert_close(layer.weight() @ layer.inverse_weight(), torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.slogdet(layer.weight())[1], layer.log_abs_s.sum())


def test_squeeze_moves_patches_to_channels():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    z, _ = Squeeze()(x)
    assert z.shape == (1, 8, 2, 2)
    # channel c*4 + i*2 + j holds pixel (2y + i, 2x + j) of input channel c
    assert z[0, 1 * 4 + 1 * 2 + 0, 1, 0] == x[0, 1, 3, 0]
    assert z[0, 0 * 4 + 0 * 2 + 1, 0, 1] == x[0, 0, 0, 3]


@requires_interpreter
@pytest.mark.parametrize("make", [lambda: AffineCoupling(torch.tensor([0, 1, 0, 1]), conv_net()),
                                  lambda: AffineCoupling(torch.tensor([1, 0, 1]), mlp())])
def test_coupling_layer_kernel_matches_reference(make):
    layer = _perturb(make())
    x = torch.randn(3, 4, 3, 5) if layer.features == 4 else torch.randn(5, 3)
    results = {}
    for backend in ("reference", "triton"):
        layer.zero_grad()
        xl = x.clone().requires_grad_(True)
        with fastdensity.set_backend(backend):
            z, logdet = layer(xl)
            x_back, _ = layer.inverse(z)
        (z.pow(2).sum() + logdet.sum() + x_back.sum()).backward()
        results[backend] = [z, logdet, x_back, xl.grad] + [p.grad.clone() for p in layer.parameters()]
    for k, r in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-5)


@requires_interpreter
def test_compiled_glow_step_has_no_graph_break():
    flow = Flow(glow_like_flow(C=4), StandardNormal([4, 3, 3]))
    x = torch.randn(6, 4, 3, 3)
    flow.log_prob(x)  # ActNorm initialisation outside the compiled graph
    # fp32 through a dozen layers; Inductor fuses the eager ops differently: a few ulps of |log p| ~ 50.
    assert_compiles_like_reference(lambda t: flow.log_prob(t).sum(), (x,), flow.parameters(), rtol=1e-4, atol=1e-5)


def test_coupling_under_autocast_follows_the_input_dtype():
    """Under autocast the conditioner returns bfloat16 while x stays float32 (nflows works there too): the
    layer computes in x's dtype, the net's output cast up as type promotion would."""
    layer = _perturb(AffineCoupling(torch.tensor([1, 0, 1, 0]), mlp()))
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, logdet = layer(x)
        h = layer.transform_net(x[:, 1::2])  # what the layer's net returned
    assert h.dtype == torch.bfloat16 and z.dtype == torch.float32 and logdet.dtype == torch.float32
    h = h.float()
    s = torch.sigmoid(h[:, 2:] + 2) + 1e-3
    torch.testing.assert_close(z[:, 0::2], x[:, 0::2] * s + h[:, :2])
    torch.testing.assert_close(logdet, s.log().sum(1))
    torch.testing.assert_close(z[:, 1::2], x[:, 1::2], rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: ActNorm(3), lambda: InvConv1x1(3)], ids=["actnorm", "invconv"])
def test_per_channel_layers_take_an_empty_batch_and_return_a_real_logdet(make):
    layer = make().eval()  # eval: no data-dependent initialisation from an empty batch
    z, logdet = layer(torch.randn(0, 3, 4, 4))
    assert z.shape == (0, 3, 4, 4) and logdet.shape == (0,)
    z, logdet = layer(torch.randn(2, 3, 4, 4))
    logdet += 1.0  # a real [B] tensor: a stride-0 expand would refuse this in-place update
    assert logdet.shape == (2,)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="mask must be 1-D"):
        AffineCoupling(torch.ones(2, 2), mlp())
    with pytest.raises(ValueError, match="at least one feature to transform"):
        AffineCoupling(torch.zeros(3), mlp())
    with pytest.raises(ValueError, match="use AdditiveCoupling"):
        AffineCoupling(torch.tensor([1, 0]), mlp(), scale="additive")
    with pytest.raises(ValueError, match=r"inputs must be \[B, 3\] or \[B, 3, H, W\]; got shape \(2, 4\)"):
        AffineCoupling(torch.tensor([1, 0, 1]), mlp())(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"transform net must return \[B, 4, ...\]"):
        AffineCoupling(torch.tensor([1, 0, 1]), lambda i, o: nn.Linear(i, 3))(torch.randn(2, 3))
    with pytest.raises(ValueError, match="divisible by 2"):
        Squeeze()(torch.randn(1, 1, 3, 4))
    with pytest.raises(ValueError, match="permutation of 0..2"):
        fastdensity.nn.Permutation(torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"inputs must be \[B, 3\]"):
        StandardNormal(3).log_prob(torch.randn(2, 4))


def test_standard_normal_matches_torch_distributions():
    z = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum((1, 2))
    torch.testing.assert_close(StandardNormal([2, 3]).log_prob(z), expected)
    d = _perturb(DiagonalNormal([2, 3])).double()
    ref = torch.distributions.Normal(d.loc, d.log_std.exp()).log_prob(z).sum((1, 2))
    torch.testing.assert_close(d.log_prob(z), ref)
    assert math.isclose(StandardNormal(4)._log_z, 2 * math.log(2 * math.pi))
    torch.testing.assert_close(d.mean(), d.loc)
    c = torch.randn(4, 7, dtype=torch.float64)  # only its number of rows matters to the unconditional ones
    assert d.mean(c).shape == (4, 2, 3) and torch.equal(d.mean(c)[2], d.loc)
    assert torch.equal(StandardNormal([2, 3]).double().mean(c), torch.zeros(4, 2, 3, dtype=torch.float64))


def _nflows_distributions():
    return pytest.importorskip("nflows.distributions.normal")


@pytest.fixture
def float64_default():
    """nflows draws its base samples in the default dtype: float64 runs compare float64 draws."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_standard_normal_matches_nflows(float64_default):
    theirs, ours = _nflows_distributions().StandardNormal([3]), StandardNormal([3]).double()
    z, c = torch.randn(5, 3), torch.randn(2, 4)
    torch.testing.assert_close(ours.log_prob(z), theirs.log_prob(z))
    for context in (None, c):
        torch.manual_seed(3)
        s_theirs, lp_theirs = theirs.sample_and_log_prob(6, context)
        torch.manual_seed(3)
        s_ours, lp_ours = ours.sample_and_log_prob(6, context)
        assert s_ours.shape == ((6, 3) if context is None else (2, 6, 3))
        torch.testing.assert_close(s_ours, s_theirs, rtol=0, atol=0)  # the same draws, in the same layout
        torch.testing.assert_close(lp_ours, lp_theirs)
        torch.testing.assert_close(ours.mean(context), theirs.mean(context))


def test_conditional_diagonal_normal_matches_nflows(float64_default):
    torch.manual_seed(0)
    encoder = nn.Linear(2, 6)
    theirs = _nflows_distributions().ConditionalDiagonalNormal([3], context_encoder=encoder)
    ours = ConditionalDiagonalNormal([3], context_encoder=encoder)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # nflows' keys: _context_encoder.*
    z, c = torch.randn(5, 3), torch.randn(5, 2)
    torch.testing.assert_close(ours.log_prob(z, c), theirs.log_prob(z, c))
    torch.testing.assert_close(ours.mean(c), theirs.mean(c))
    torch.manual_seed(4)
    s_theirs, lp_theirs = theirs.sample_and_log_prob(7, c[:2])
    torch.manual_seed(4)
    s_ours, lp_ours = ours.sample_and_log_prob(7, c[:2])
    assert s_ours.shape == (2, 7, 3) and lp_ours.shape == (2, 7)
    torch.testing.assert_close(s_ours, s_theirs)
    torch.testing.assert_close(lp_ours, lp_theirs)
    # Not vacuous: the density moves with the context, and matches torch.distributions.
    mean, log_std = encoder(c).chunk(2, dim=1)
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(z).sum(1)
    torch.testing.assert_close(ours.log_prob(z, c), expected)
    assert not torch.allclose(ours.log_prob(z, c), ours.log_prob(z, c.flip(0)))
    # context_encoder=None: the context holds the parameters.
    params = torch.randn(5, 6)
    torch.testing.assert_close(ConditionalDiagonalNormal([3]).log_prob(z, params),
                               _nflows_distributions().ConditionalDiagonalNormal([3]).log_prob(z, params))


def test_distribution_context_errors():
    with pytest.raises(ValueError, match="ConditionalDiagonalNormal needs a context"):
        ConditionalDiagonalNormal([3], nn.Linear(2, 6)).log_prob(torch.randn(4, 3))
    with pytest.raises(ValueError, match="ConditionalDiagonalNormal needs a context"):
        ConditionalDiagonalNormal([3], nn.Linear(2, 6)).sample(2)
    with pytest.raises(ValueError, match=r"context encoder must return \[B, 2 \* 3\]"):
        ConditionalDiagonalNormal([3], nn.Linear(2, 4)).log_prob(torch.randn(4, 3), torch.randn(4, 2))
    for dist in (StandardNormal(3), DiagonalNormal(3), ConditionalDiagonalNormal([3], nn.Linear(2, 6))):
        with pytest.raises(ValueError, match=r"context must have one row per input row: inputs have batch size 4"):
            dist.log_prob(torch.randn(4, 3), torch.randn(5, 2))


# ------------------------------------------------------------------------------------------------
# The context rules: used, or refused - never silently ignored
# ------------------------------------------------------------------------------------------------


def _context_jacobian(fn, context):
    """d fn(context) / d context for a function returning a tensor (z or a log-density)."""
    return torch.autograd.functional.jacobian(fn, context)


def test_coupling_with_a_context_net_depends_on_the_context():
    net = lambda n_in, n_out: ContextNet(n_in, n_out, context_features=2)  # noqa: E731
    layer = _perturb(AffineCoupling(torch.tensor([1, 0, 1]), net)).double()
    assert layer.conditional
    x, c = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    jac = _context_jacobian(lambda v: layer(x, v)[0], c)  # [4, 3, 4, 2]
    assert jac[:, [0, 2]].abs().sum() > 0 and torch.count_nonzero(jac[:, 1]) == 0  # identity part untouched
    jac_ld = _context_jacobian(lambda v: layer(x, v)[1], c)
    assert jac_ld.abs().sum() > 0
    x_back, _ = layer.inverse(layer(x, c)[0], c)
    torch.testing.assert_close(x_back, x)


@pytest.mark.parametrize("make", [
    lambda: ActNorm(3), lambda: InvConv1x1(3), lambda: ReversePermutation(3), lambda: RandomPermutation(3),
    lambda: AffineCoupling(torch.tensor([1, 0, 1]), mlp()), lambda: AdditiveCoupling(torch.tensor([1, 0, 1]), mlp()),
    lambda: CompositeTransform([ActNorm(3), ReversePermutation(3)]),
], ids=["actnorm", "invconv", "reverse", "random-permutation", "affine-unconditional-net",
        "additive-unconditional-net", "composite-of-unconditional"])
def test_layers_that_cannot_use_a_context_refuse_one(make):
    layer = make().double()
    assert not layer.conditional
    x, c = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    layer(x)  # fine without one (ActNorm initialises here)
    for direction in (layer.forward, layer.inverse):
        with pytest.raises(ValueError, match="context"):
            direction(x, c)


def test_squeeze_refuses_a_context():
    with pytest.raises(ValueError, match="Squeeze does not use a context"):
        Squeeze()(torch.randn(2, 1, 4, 4), torch.randn(2, 3))


def test_composite_hands_the_context_to_the_members_that_use_it():
    net = lambda n_in, n_out: ContextNet(n_in, n_out, context_features=2)  # noqa: E731
    transform = _perturb(CompositeTransform([ActNorm(3), AffineCoupling(torch.tensor([1, 0, 1]), net),
                                             ReversePermutation(3), AffineCoupling(torch.tensor([0, 1, 0]), net),
                                             InvConv1x1(3)])).double()
    assert transform.conditional
    x, c = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    transform(x, c)  # ActNorm's initialisation
    jac = _context_jacobian(lambda v: transform(x, v)[0], c)
    assert (jac.abs().sum((0, 2, 3)) > 0).all()  # every output feature moves with the context
    z, logdet = transform(x, c)
    x_back, logdet_inv = transform.inverse(z, c)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(logdet_inv, -logdet)
    with pytest.raises(ValueError, match=r"context must have one row per input row: inputs have batch size 5"):
        transform(x, c[:3])


def test_coupling_context_batch_mismatch_is_an_error():
    net = lambda n_in, n_out: ContextNet(n_in, n_out, context_features=2)  # noqa: E731
    layer = AffineCoupling(torch.tensor([1, 0, 1]), net)
    with pytest.raises(ValueError, match=r"AffineCoupling: context must have one row per input row"):
        layer(torch.randn(4, 3), torch.randn(2, 2))
    with pytest.raises(ValueError, match="its transform net \\(Sequential\\) takes none"):
        AffineCoupling(torch.tensor([1, 0, 1]), mlp())(torch.randn(4, 3), torch.randn(4, 2))


def test_flow_refuses_a_context_nothing_uses_and_checks_its_rows():
    flow = Flow(CompositeTransform([AffineCoupling(torch.tensor([1, 0]), mlp()), ActNorm(2)]), StandardNormal(2))
    assert not flow.conditional
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="neither its transform nor its distribution uses one"):
        flow.log_prob(x, torch.randn(4, 1))
    with pytest.raises(ValueError, match="neither its transform nor its distribution uses one"):
        flow.sample(3, torch.randn(2, 1))
    conditional = Flow(CompositeTransform([AffineCoupling(torch.tensor([1, 0]), mlp()), ActNorm(2)]),
                       ConditionalDiagonalNormal([2], nn.Linear(1, 4)))
    assert conditional.conditional
    with pytest.raises(ValueError, match=r"Flow: context must have one row per input row"):
        conditional.log_prob(x, torch.randn(3, 1))


def test_conditional_base_makes_the_flow_conditional():
    """A flow whose only conditional part is its base: log_prob and samples depend on the context."""
    torch.manual_seed(0)
    flow = _perturb(Flow(CompositeTransform([AffineCoupling(torch.tensor([1, 0]), mlp()), ReversePermutation(2)]),
                         ConditionalDiagonalNormal([2], nn.Linear(1, 4)))).double()
    x, c = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    assert _context_jacobian(lambda v: flow.log_prob(x, v), c).abs().sum() > 0
    samples, log_prob = flow.sample_and_log_prob(3, c)
    assert samples.shape == (4, 3, 2)
    torch.testing.assert_close(flow.log_prob(samples.reshape(12, 2), c.repeat_interleave(3, 0)), log_prob.reshape(12))
