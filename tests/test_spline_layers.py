"""Spline flow layers against nflows' and against the math.

* Equivalence: nflows' ``PiecewiseRationalQuadraticCouplingTransform`` and
  ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform`` are built, their weights copied into ours
  (a state_dict mapping), and outputs and log-dets compared in float64, forward and inverse, on the
  reference path and (coupling, tiny shape) on the Triton kernel under the interpreter.
* Reference tier: log-dets against ``jacobian`` + ``slogdet``, inverse after forward, gradients reaching
  every parameter, the autoregressive structure through the Jacobian, argument and context errors.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastdensity
from fastdensity.nn import CompositeTransform
from fastdensity.nn.spline import (MaskedPiecewiseRationalQuadraticAutoregressive, PiecewiseRationalQuadraticCDF,
                                   PiecewiseRationalQuadraticCoupling)

from helpers import requires_interpreter

nflows_coupling = pytest.importorskip("nflows.transforms.coupling")
nflows_autoregressive = pytest.importorskip("nflows.transforms.autoregressive")
nflows_nets = pytest.importorskip("nflows.nn.nets")

# float64 on both sides, the same arithmetic up to the order of a few operations (knots from a cumsum
# scaled once here, a cumsum then a pad, scale and difference in nflows; the MADE's sums over hidden
# units in sorted rather than nflows' order): measured at most ~1e-15 relative for the coupling and
# ~2e-13 for the autoregressive inverse (D passes through steep splines). Anything wrong in the layout,
# the scaling or the math is O(1).
TIGHT = {"rtol": 1e-12, "atol": 1e-12}


# ------------------------------------------------------------------------------------------------
# nflows -> fastdensity weights
# ------------------------------------------------------------------------------------------------


def coupling_state_from_nflows(theirs: nn.Module) -> dict:
    """nflows' coupling state_dict for ours: the same names (transform_net.*, unconditional_transform.*)
    less nflows' index buffers, which ours rebuilds from the mask."""
    return {k: v for k, v in theirs.state_dict().items() if k not in ("identity_features", "transform_features")}


def made_state_from_nflows(theirs: nn.Module, ours: nn.Module, prefix: str = "autoregressive_net.") -> dict:
    """nflows' residual MADE state for ours. Our hidden units are sorted by degree (fastdensity.nn.made),
    so every axis over hidden units is permuted by the stable argsort of nflows' hidden degrees (the
    same in every layer of a residual MADE); initial_layer -> input_layer, final_layer -> output_layer."""
    net = theirs.autoregressive_net
    order = torch.argsort(net.initial_layer.degrees, stable=True)

    def permuted(name, value):
        if name.startswith("final_layer"):  # outputs x hidden: only the columns are hidden units
            return value[:, order] if name.endswith("weight") else value
        if value.dim() == 0:  # BatchNorm's num_batches_tracked
            return value
        if ".linear_layers." in name and name.endswith("weight"):  # hidden x hidden
            return value[order][:, order]
        return value[order]  # first axis over hidden units: first layer, context maps, biases, norms

    state = dict(ours.state_dict())  # our degree and mask buffers stay ours
    for name, value in net.state_dict().items():
        if not name.endswith(("mask", "degrees")):
            ours_name = name.replace("initial_layer", "input_layer").replace("final_layer", "output_layer")
            state[prefix + ours_name] = permuted(name, value)
    return state


def _close(ours, theirs, what):
    torch.testing.assert_close(ours, theirs, **TIGHT, msg=lambda m: f"{what}: {m}")


def _both_directions_match(ours, theirs, x, z, context=None):
    for direction, inputs in (("forward", x), ("inverse", z)):
        args = (inputs,) if context is None else (inputs, context)
        y_o, ld_o = getattr(ours, direction)(*args)
        y_t, ld_t = getattr(theirs, direction)(*args)
        _close(y_o, y_t, f"{direction} outputs")
        _close(ld_o, ld_t, f"{direction} log-dets")
        assert ld_o.shape == (inputs.shape[0],)


# ------------------------------------------------------------------------------------------------
# Coupling against nflows
# ------------------------------------------------------------------------------------------------


def _vector_pair(mask, num_bins, tail_bound, unconditional, context_features=None, hidden=16):
    def net(i, o):
        return nflows_nets.ResidualNet(i, o, hidden, context_features=context_features, num_blocks=2)

    kwargs = dict(num_bins=num_bins, tails="linear", tail_bound=tail_bound,
                  apply_unconditional_transform=unconditional)
    theirs = nflows_coupling.PiecewiseRationalQuadraticCouplingTransform(mask, net, **kwargs).double()
    ours = PiecewiseRationalQuadraticCoupling(mask, net, **kwargs).double()
    ours.load_state_dict(coupling_state_from_nflows(theirs))
    return ours, theirs


@pytest.mark.parametrize("mask,unconditional,context", [
    ([1, 0, 1, 0, 1, 0], False, False),       # interleaved: strided views
    ([0, 1, 1, 0, 1], True, False),           # irregular: gathers; the unconditional spline on the kept part
    ([1, 1, 0, 0, 0, 1, 0], False, True),     # a conditional net
])
def test_vector_coupling_matches_nflows(mask, unconditional, context):
    tail_bound, ctx_features = 2.0, 3
    ours, theirs = _vector_pair(mask, 5, tail_bound, unconditional, ctx_features if context else None)
    B, D = 11, len(mask)
    x = 1.2 * tail_bound * torch.randn(B, D, dtype=torch.float64)  # some beyond the bound: the tails
    z = 1.2 * tail_bound * torch.randn(B, D, dtype=torch.float64)
    c = torch.randn(B, ctx_features, dtype=torch.float64) if context else None
    _both_directions_match(ours, theirs, x, z, c)


def test_image_coupling_matches_nflows_layout():
    """[B, C, H, W]: the net returns [B, n (3K - 1), H, W], reshaped and permuted to [B, n, H, W, 3K - 1];
    ConvResidualNet's ``hidden_channels`` scales the logits."""
    C, H, W, K = 4, 3, 2, 4
    mask = [1, 0, 0, 1]

    def net(i, o):
        return nflows_nets.ConvResidualNet(i, o, hidden_channels=8, num_blocks=1)

    kwargs = dict(num_bins=K, tails="linear", tail_bound=1.5, apply_unconditional_transform=True, img_shape=[H, W])
    theirs = nflows_coupling.PiecewiseRationalQuadraticCouplingTransform(mask, net, **kwargs).double()
    ours = PiecewiseRationalQuadraticCoupling(mask, net, **kwargs).double()
    ours.load_state_dict(coupling_state_from_nflows(theirs))
    x = 1.5 * torch.randn(5, C, H, W, dtype=torch.float64)
    z = 1.5 * torch.randn(5, C, H, W, dtype=torch.float64)
    _both_directions_match(ours, theirs, x, z)


class _PlainNet(nn.Module):
    """A conditioner without ``hidden_features``: logits unscaled, in both libraries."""

    def __init__(self, i, o):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(i, 8), nn.Tanh(), nn.Linear(8, o))

    def forward(self, x, context=None):
        return self.net(x)


def test_net_without_hidden_features_is_unscaled_as_in_nflows():
    mask = [0, 1, 0, 1]
    theirs = nflows_coupling.PiecewiseRationalQuadraticCouplingTransform(mask, _PlainNet, num_bins=3,
                                                                         tails="linear").double()
    with pytest.warns(UserWarning, match="not scaled down"):
        ours = PiecewiseRationalQuadraticCoupling(mask, _PlainNet, num_bins=3).double()
    ours.load_state_dict(coupling_state_from_nflows(theirs))
    x, z = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nflows warns on every call
        _both_directions_match(ours, theirs, x, z)


def test_coupling_defaults_are_nflows_values():
    layer = PiecewiseRationalQuadraticCoupling([1, 0], lambda i, o: nflows_nets.ResidualNet(i, o, 4))
    assert (layer.num_bins, layer.tails, layer.tail_bound) == (10, "linear", 1.0)
    assert (layer.min_bin_width, layer.min_bin_height, layer.min_derivative) == (1e-3, 1e-3, 1e-3)
    assert layer.transform_net.final_layer.out_features == 29  # 3K - 1 per transformed feature
    assert layer.unconditional_transform is None


# ------------------------------------------------------------------------------------------------
# Autoregressive against nflows
# ------------------------------------------------------------------------------------------------


def _autoregressive_pair(D, hidden, context_features, **kwargs):
    theirs = nflows_autoregressive.MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
        D, hidden, context_features=context_features, tails="linear", **kwargs).double()
    ours = MaskedPiecewiseRationalQuadraticAutoregressive(D, hidden, context_features=context_features,
                                                          tails="linear", **kwargs).double()
    ours.load_state_dict(made_state_from_nflows(theirs, ours))
    return ours, theirs


@pytest.mark.parametrize("context_features,num_blocks,batch_norm", [(3, 2, False), (None, 1, False), (2, 2, True)])
def test_autoregressive_matches_nflows(context_features, num_blocks, batch_norm):
    D, B, bound = 5, 9, 2.5
    ours, theirs = _autoregressive_pair(D, 12, context_features, num_bins=4, tail_bound=bound, num_blocks=num_blocks,
                                        use_batch_norm=batch_norm)
    with torch.no_grad():  # nflows' residual blocks start near zero: make every layer count
        for p in theirs.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for norm in theirs.modules():  # running statistics of their own; compared in eval mode
            if isinstance(norm, nn.BatchNorm1d):
                norm.running_mean.uniform_(-0.5, 0.5)
                norm.running_var.uniform_(0.5, 2.0)
    ours.load_state_dict(made_state_from_nflows(theirs, ours))
    if batch_norm:
        ours.eval(), theirs.eval()
    x = 1.2 * bound * torch.randn(B, D, dtype=torch.float64)
    z = 1.2 * bound * torch.randn(B, D, dtype=torch.float64)
    c = None if context_features is None else torch.randn(B, context_features, dtype=torch.float64)
    _both_directions_match(ours, theirs, x, z, c)


def test_autoregressive_defaults_are_nflows_values():
    layer = MaskedPiecewiseRationalQuadraticAutoregressive(4, 8)
    made = layer.autoregressive_net
    assert (layer.num_bins, layer.tails, layer.tail_bound) == (10, "linear", 1.0)
    assert made.use_residual_blocks and made.num_blocks == 2 and made.output_multiplier == 29


# ------------------------------------------------------------------------------------------------
# Interpreter tier: the coupling layer on the Triton kernel against nflows
# ------------------------------------------------------------------------------------------------


@requires_interpreter
@pytest.mark.parametrize("unconditional", [False, True])
def test_kernel_coupling_matches_nflows(unconditional):
    ours, theirs = _vector_pair([1, 0, 1], 3, 1.5, unconditional, hidden=4)
    x = 1.5 * torch.randn(3, 3, dtype=torch.float64)
    z = 1.5 * torch.randn(3, 3, dtype=torch.float64)
    with fastdensity.set_backend("triton"):
        _both_directions_match(ours, theirs, x, z)


@requires_interpreter
def test_kernel_autoregressive_gradients_match_reference():
    layer = MaskedPiecewiseRationalQuadraticAutoregressive(3, 4, context_features=2, num_bins=3, num_blocks=1)
    layer = layer.double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 2, dtype=torch.float64)
    leaves = [x, *layer.parameters()]
    grads = {}
    for backend in ("reference", "triton"):
        with fastdensity.set_backend(backend):
            z, logdet = layer(x, c)
        grads[backend] = (z, logdet, torch.autograd.grad((z.sum(1) + logdet).sum(), leaves))
    for a, b in zip(grads["triton"][:2], grads["reference"][:2]):
        torch.testing.assert_close(a, b, **TIGHT)
    for i, (a, b) in enumerate(zip(grads["triton"][2], grads["reference"][2])):
        torch.testing.assert_close(a, b, **TIGHT, msg=lambda m: f"leaf {i}: {m}")


# ------------------------------------------------------------------------------------------------
# Reference tier: the math
# ------------------------------------------------------------------------------------------------


def _layers(context_features=None):
    """A small float64 layer of each kind, with weights far from their near-identity initialisation."""
    def net(i, o):
        return nflows_nets.ResidualNet(i, o, 8, context_features=context_features, num_blocks=1)

    layers = {
        "coupling": PiecewiseRationalQuadraticCoupling([1, 0, 1, 0], net, num_bins=4, tail_bound=2.0,
                                                       apply_unconditional_transform=True),
        "autoregressive": MaskedPiecewiseRationalQuadraticAutoregressive(4, 8, context_features=context_features,
                                                                         num_bins=4, tail_bound=2.0, num_blocks=1),
        "cdf": PiecewiseRationalQuadraticCDF(4, num_bins=4, tail_bound=2.0),
    }
    for layer in layers.values():
        layer.double()
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return layers


@pytest.mark.parametrize("kind", ["coupling", "autoregressive", "cdf"])
def test_logdet_is_log_abs_det_jacobian(kind):
    layer = _layers()[kind]
    x = 2.4 * torch.randn(3, 4, dtype=torch.float64)  # some beyond the bound
    _, logdet = layer(x)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x[b])
        torch.testing.assert_close(logdet[b], torch.linalg.slogdet(jac).logabsdet)
    z, _ = layer(x)
    _, inv_logdet = layer.inverse(z)
    torch.testing.assert_close(inv_logdet, -logdet)


@pytest.mark.parametrize("kind", ["coupling", "autoregressive", "cdf"])
def test_inverse_undoes_forward(kind):
    layer = _layers()[kind]
    x = 2.4 * torch.randn(7, 4, dtype=torch.float64)
    z, logdet = layer(x)
    back, inv_logdet = layer.inverse(z)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(logdet + inv_logdet, torch.zeros_like(logdet), atol=1e-12, rtol=0)


@pytest.mark.parametrize("grad", [True, False], ids=["d-passes", "incremental"])
def test_autoregressive_inverse_checks_its_arguments_on_either_path(grad):
    """``inverse`` dispatches to the D passes (a graph is needed) or the incremental scheme (no grad):
    the arguments are checked before either, and both undo the forward."""
    unconditional, conditional = _layers()["autoregressive"], _layers(context_features=2)["autoregressive"]
    x, c = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        with pytest.raises(ValueError, match="built without context_features: it takes no context"):
            unconditional.inverse(x, c)
        with pytest.raises(ValueError, match=r"built with context_features=2: it needs a context \[B, 2\]; got None"):
            conditional.inverse(x)
        with pytest.raises(ValueError, match=r"it needs a context \[B, 2\]; got \[3, 5\]"):
            conditional.inverse(x, torch.randn(3, 5, dtype=torch.float64))
        with pytest.raises(ValueError, match="context must have one row per input row"):
            conditional.inverse(x, c[:2])
        with pytest.raises(ValueError, match=r"inputs must be \[B, 4\]"):
            conditional.inverse(x[:, :3], c)
        z, logdet = conditional(x, c)
        back, inv_logdet = conditional.inverse(z, c)
    assert back.requires_grad == grad
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(inv_logdet, -logdet)


def test_autoregressive_jacobian_is_triangular_in_its_ordering():
    order = torch.tensor([2, 0, 3, 1])  # ordering[i]: position of feature i
    layer = MaskedPiecewiseRationalQuadraticAutoregressive(4, 8, num_bins=3, ordering=order).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x)
    for i in range(4):
        for j in range(4):
            if order[j] > order[i]:  # z_i may depend only on x_j earlier in the order (or itself)
                assert jac[i, j] == 0, f"z_{i} depends on x_{j}"
    assert (jac.diagonal() > 0).all()
    back, _ = layer.inverse(layer(x[None])[0])
    torch.testing.assert_close(back[0], x)


@pytest.mark.parametrize("kind", ["coupling", "autoregressive"])
def test_gradients_reach_every_parameter(kind):
    layer = _layers(context_features=2)[kind]
    x = 1.5 * torch.randn(6, 4, dtype=torch.float64)
    c = torch.randn(6, 2, dtype=torch.float64)
    z, logdet = layer(x, c)
    (z.pow(2).sum() - logdet.sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_context_changes_the_output_and_is_routed_by_composites():
    layers = _layers(context_features=2)
    flow = CompositeTransform([layers["coupling"], layers["autoregressive"], layers["cdf"]])
    x = torch.randn(5, 4, dtype=torch.float64)
    c1, c2 = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    z1, ld1 = flow(x, c1)
    z2, _ = flow(x, c2)
    assert not torch.allclose(z1, z2)
    back, ld_back = flow.inverse(z1, c1)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(ld_back, -ld1)


def test_context_errors():
    layers = _layers()  # nets that take a context argument but were built without context features
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="context"):
        layers["autoregressive"](x, torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not use a context"):
        layers["cdf"](x, torch.randn(3, 2, dtype=torch.float64))
    plain = PiecewiseRationalQuadraticCoupling([1, 0], lambda i, o: _named_mlp(i, o), num_bins=3)
    with pytest.raises(ValueError, match="takes none"):
        plain(torch.randn(3, 2), torch.randn(3, 1))
    conditional = _layers(context_features=2)
    for kind in ("coupling", "autoregressive"):
        with pytest.raises(ValueError, match="one row per input row|leading dims"):
            conditional[kind](x, torch.randn(4, 2, dtype=torch.float64))


def _named_mlp(i, o):
    net = nn.Sequential(nn.Linear(i, 8), nn.ReLU(), nn.Linear(8, o))
    net.hidden_features = 8
    return net


def test_argument_errors():
    with pytest.raises(ValueError, match="tails must be 'linear'"):
        PiecewiseRationalQuadraticCoupling([1, 0], _named_mlp, tails=None)
    with pytest.raises(ValueError, match="tails must be 'linear'"):
        MaskedPiecewiseRationalQuadraticAutoregressive(3, 8, tails="circular")
    with pytest.raises(ValueError, match="num_bins"):
        PiecewiseRationalQuadraticCDF(3, num_bins=0)
    with pytest.raises(ValueError, match="tail_bound must be a positive finite number"):
        MaskedPiecewiseRationalQuadraticAutoregressive(3, 8, tail_bound=-1.0)
    layer = PiecewiseRationalQuadraticCoupling([1, 0, 1], lambda i, o: _named_mlp(i, o + 1), num_bins=3)
    with pytest.raises(ValueError, match=r"transform net must return \[B, 16, \.\.\.\]"):
        layer(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"inputs must be \[B, 4\]"):
        MaskedPiecewiseRationalQuadraticAutoregressive(4, 8)(torch.randn(2, 3))


def test_single_bin_and_float32():
    layer = PiecewiseRationalQuadraticCoupling([0, 1], _named_mlp, num_bins=1, tail_bound=3.0)
    x = torch.randn(4, 2)
    z, logdet = layer(x)
    assert z.dtype == logdet.dtype == torch.float32 and logdet.shape == (4,)
    back, _ = layer.inverse(z)
    torch.testing.assert_close(back, x)
