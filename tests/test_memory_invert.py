"""Backprop by inversion (``memory="invert"``): the same gradients as ``"store"``, far fewer saved bytes.

Gradients are compared in float64, where the only difference between the two modes is the round-off
of rebuilding each input with an inverse: 1e-10 relative leaves five orders of magnitude above float64's
~1e-16 for that, and is far below any real error (a missing or doubled term is O(1) relative).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fastdensity
from fastdensity.benchmarks.measure import saved_bytes
from fastdensity.commands.train import _key_value
from fastdensity.models import build_model
from fastdensity.models.base import ContextMLP, ConvNet
from fastdensity.nn import (ActNorm, AdditiveCoupling, AffineCoupling, CompositeTransform, InvConv1x1,
                            MaskedAffineAutoregressive, PiecewiseRationalQuadraticCoupling, RandomPermutation,
                            ReversePermutation, Squeeze)
from fastdensity.nn import invertible_memory
from fastdensity.nn.coupling import _Coupling
from helpers import requires_interpreter

RTOL = 1e-10  # float64; see the module docstring


def _half(c, first=False):
    mask = torch.zeros(c, dtype=torch.int64)
    mask[: c // 2] = 1 if first else 0
    mask[c // 2:] = 0 if first else 1
    return mask


def _mlp(i, o, hidden=8):
    return nn.Sequential(nn.Linear(i, hidden), nn.Tanh(), nn.Linear(hidden, o))


def _conv(i, o, hidden=8):
    return ConvNet(i, o, hidden, num_blocks=1)


def _perturb(module, std=0.2):
    """Random parameters: zero-initialised last layers would make every coupling the identity."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))
    return module


def _initialised(transform, x, context=None):
    """Run one plain forward in training mode, so every ActNorm is initialised."""
    with torch.no_grad():
        transform(x) if context is None else transform(x, context)
    return transform


def _gradients(fn, leaves, params):
    """Gradients of a random projection of every output of ``fn()`` w.r.t. ``leaves`` and ``params``."""
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    return torch.autograd.grad(loss, list(leaves) + list(params), allow_unused=True)


def _assert_same_gradients(store_grads, invert_grads, rtol=RTOL):
    assert len(store_grads) == len(invert_grads)
    for k, (a, b) in enumerate(zip(store_grads, invert_grads)):
        if a is None or b is None:
            assert a is None and b is None, f"gradient {k}: one mode gives None"
            continue
        scale = a.abs().max().clamp(min=1e-300)
        err = ((a - b).abs().max() / scale).item()
        assert err <= rtol, f"gradient {k} of shape {tuple(a.shape)}: relative error {err:.3g}"


def _compare_transforms(store: CompositeTransform, x, context=None, rtol=RTOL):
    """The store and invert copies of ``store`` give the same outputs and the same gradients."""
    invert = copy.deepcopy(store)
    invert.memory = "invert"
    results = []
    for t in (store, invert):
        leaves = [x.detach().clone().requires_grad_()]
        if context is not None:
            leaves.append(context.detach().clone().requires_grad_())
        fn = (lambda: t(leaves[0])) if context is None else (lambda: t(leaves[0], leaves[1]))
        with torch.no_grad():
            values = fn()
        results.append((values, _gradients(fn, leaves, list(t.parameters()))))
    (y_s, ld_s), grads_s = results[0]
    (y_i, ld_i), grads_i = results[1]
    assert torch.equal(y_s, y_i) and torch.equal(ld_s, ld_i)
    _assert_same_gradients(grads_s, grads_i, rtol)
    return grads_s


# --------------------------------------------------------------------------------------------------
# Layer stacks: every invertible step kind, vectors and images, with and without context
# --------------------------------------------------------------------------------------------------


def _vector_stack(d=6, depth=3, context_features=None):
    net = (lambda i, o: ContextMLP(nn.Linear(i + context_features, 8), nn.Tanh(), nn.Linear(8, o))) \
        if context_features else _mlp
    steps = [ActNorm(d)]
    for k in range(depth):
        steps += [InvConv1x1(d),
                  AffineCoupling(_half(d, k % 2 == 1), net, scale=("sigmoid", "exp", "softclamp")[k % 3]),
                  AdditiveCoupling(torch.tensor([1, 0] * (d // 2)), net),  # interleaved mask: strided merge
                  AffineCoupling(torch.tensor([1, 1, 0, 1, 0, 0][:d]), net),  # irregular mask: index_copy
                  RandomPermutation(d) if k % 2 else ReversePermutation(d)]
    return CompositeTransform(steps)


def _image_stack(c=4, depth=2):
    steps = [Squeeze()]
    c = 4 * c
    for k in range(depth):
        steps += [ActNorm(c), InvConv1x1(c), AffineCoupling(_half(c, k % 2 == 1), _conv, scale="sigmoid"),
                  AdditiveCoupling(_half(c, k % 2 == 0), _conv), ReversePermutation(c)]
    return CompositeTransform(steps)


def test_vector_stack_gradients_equal_store():
    stack = _perturb(_vector_stack()).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    _compare_transforms(_initialised(stack, x), x)


def test_image_stack_gradients_equal_store():
    stack = _perturb(_image_stack()).double()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    _compare_transforms(_initialised(stack, x), x)


def test_context_gradients_equal_store():
    stack = _perturb(_vector_stack(context_features=3)).double()
    x, c = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    grads = _compare_transforms(_initialised(stack, x, c), x, c)
    assert grads[1].abs().max() > 0  # the context's gradient is a real one, and it matched


def test_spline_coupling_gradients_equal_store():
    # nn.spline's coupling overrides _run: the generic rebuild (inverse, then forward under autograd).
    steps = [PiecewiseRationalQuadraticCoupling(_half(6, k % 2 == 1), _mlp, num_bins=4, tail_bound=2.0,
                                                scale_logits=False) for k in range(4)]
    stack = _perturb(CompositeTransform(steps), std=0.5).double()
    assert not invertible_memory._is_coupling(steps[0])
    _compare_transforms(stack, torch.randn(6, 6, dtype=torch.float64) * 1.5)


class _SplitFormSplineCoupling(PiecewiseRationalQuadraticCoupling):
    """The hook that gives spline couplings the one-conditioner-pass rebuild: a ``_couple`` and the
    plain ``_Coupling._run`` (right when there is no unconditional transform)."""

    _run = _Coupling._run

    def _couple(self, x_tr, h, inverse):
        return self._spline_from(x_tr, h, inverse, self._logit_scale)


def test_spline_coupling_with_the_split_form_hook_takes_the_one_pass_rebuild():
    steps = [_SplitFormSplineCoupling(_half(6, k % 2 == 1), _mlp, num_bins=4, tail_bound=2.0, scale_logits=False)
             for k in range(4)]
    stack = _perturb(CompositeTransform(steps), std=0.5).double()
    assert invertible_memory._is_coupling(steps[0])
    calls = []
    steps[0].transform_net.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(6, 6, dtype=torch.float64) * 1.5
    _compare_transforms(stack, x)
    # store: one forward under no_grad + one with grad; invert: the same two, plus one in backward.
    assert len(calls) == 5


def test_coupling_rebuild_runs_the_conditioner_once_in_backward():
    stack = _perturb(CompositeTransform([AffineCoupling(_half(4), _mlp), AffineCoupling(_half(4, True), _mlp)],
                                        memory="invert")).double()
    calls = []
    stack[1].transform_net.register_forward_hook(lambda *a: calls.append(1))
    y, ld = stack(torch.randn(3, 4, dtype=torch.float64, requires_grad=True))
    assert len(calls) == 1
    (y.sum() + ld.sum()).backward()
    assert len(calls) == 2  # the generic rebuild would take two (inverse, then forward)


# --------------------------------------------------------------------------------------------------
# Models: Glow (multi-scale, learned split priors), RealNVP (images, vectors with context)
# --------------------------------------------------------------------------------------------------


def _compare_models(name, shape, config, batch=4, context_features=None):
    torch.manual_seed(3)
    store = build_model(name, shape, **config).double()
    x = torch.randn(batch, *shape, dtype=torch.float64)
    c = torch.randn(batch, context_features, dtype=torch.float64) if context_features else None
    store.initialize(x, c)
    _perturb(store, std=0.05)
    invert = build_model(name, shape, **config, memory="invert").double()
    invert.load_state_dict(store.state_dict())
    assert invert.config["memory"] == "invert" and store.config["memory"] == "store"
    grads = []
    for model in (store, invert):
        leaves = [x.clone().requires_grad_()] + ([c.clone().requires_grad_()] if c is not None else [])
        grads.append(_gradients(lambda: model.log_prob(*leaves), leaves, list(model.parameters())))
    _assert_same_gradients(*grads)
    return store, invert


def test_glow_multiscale_gradients_equal_store():
    store, invert = _compare_models("glow", (3, 8, 8), {"num_steps": 3, "hidden": 8, "num_scales": 2})
    assert all(level.memory == "invert" for level in invert.flow.levels)
    assert len(invert.flow.splits) == 1  # the learned split prior sits between the two inverted runs


def test_realnvp_image_gradients_equal_store():
    # Checkerboard couplings (the generic rebuild), squeeze, channel couplings, a standard-normal split.
    _compare_models("realnvp", (2, 8, 8), {"num_layers": 2, "hidden": 8, "num_scales": 2})


def test_conditional_vector_models_gradients_equal_store():
    _compare_models("realnvp", (6,), {"num_layers": 5, "hidden": 8, "context_features": 3}, context_features=3)
    _compare_models("glow", (6,), {"num_steps": 4, "hidden": 8, "context_features": 3}, context_features=3)


def test_nsf_coupling_by_setting_memory_on_its_composite():
    torch.manual_seed(0)
    store = _perturb(build_model("nsf", (6,), num_layers=3, hidden=8, num_bins=4), std=0.1).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    store.initialize(x)
    _compare_transforms(store.flow.levels[0], x)


def test_memory_option_reaches_the_models_from_the_command_line():
    key, value = _key_value("memory=invert")
    model = build_model("glow", (1, 8, 8), num_steps=1, hidden=4, **{key: value})
    assert model.config["memory"] == "invert" and all(level.memory == "invert" for level in model.flow.levels)
    assert type(model)(**model.config).flow.levels[0].memory == "invert"  # rebuilt from a checkpoint's config
    with pytest.raises(ValueError, match="memory must be one of 'store', 'invert'"):
        build_model("realnvp", (4,), memory="recompute")
    with pytest.raises(ValueError, match="memory must be one of"):
        CompositeTransform([ActNorm(2)], memory=True)


# --------------------------------------------------------------------------------------------------
# Fallbacks, initialisation, gradient-free calls
# --------------------------------------------------------------------------------------------------


def test_steps_that_cannot_be_rebuilt_are_stored_and_named():
    steps = [AffineCoupling(_half(4), _mlp), MaskedAffineAutoregressive(4, 8), AffineCoupling(_half(4, True), _mlp)]
    stack = _perturb(CompositeTransform(steps)).double()
    with pytest.warns(RuntimeWarning, match=r"step 1 \(MaskedAffineAutoregressive's inverse takes one pass per "
                                            r"feature\)"):
        invert = copy.deepcopy(stack)
        invert.memory = "invert"
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="step 1"):
        _compare_transforms(stack, x)


class _Opaque(nn.Module):
    """A user's layer with a forward and no inverse."""

    conditional = False

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x, context=None):
        return x * self.scale, torch.log(self.scale.abs()).expand(x.shape[0]) * x.shape[1]


def test_declared_and_missing_inverses():
    assert "has no inverse" in invertible_memory.rebuild_problem(_Opaque())
    layer = ActNorm(3)
    layer.cheap_inverse = False
    assert "cheap_inverse = False" in invertible_memory.rebuild_problem(layer)
    assert invertible_memory.rebuild_problem(CompositeTransform([ActNorm(3), Squeeze()])) is None
    with pytest.warns(RuntimeWarning, match=r"step 0 \(_Opaque has no inverse\)"):
        stack = CompositeTransform([_Opaque(), AffineCoupling(_half(4), _mlp)], memory="invert")
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.warns(RuntimeWarning):
        y, ld = stack(x)
    (y.sum() + ld.sum()).backward()
    assert stack[0].scale.grad is not None and x.grad is not None


def test_dropout_in_training_mode_is_stored_with_a_warning_and_inverted_in_eval():
    net = lambda i, o: nn.Sequential(nn.Linear(i, 8), nn.Dropout(0.5), nn.Linear(8, o))  # noqa: E731
    stack = CompositeTransform([AffineCoupling(_half(4), net), AffineCoupling(_half(4, True), _mlp)],
                               memory="invert")
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=r"step 0 \(AffineCoupling has dropout in training mode\)"):
        y, _ = stack(x)
    assert invertible_memory.call_problem(stack[1]) is None
    stack.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, _ = stack(x)
    assert type(y.grad_fn).__name__ == "_InvertibleRunBackward"


def test_batch_norm_in_training_mode_is_stored():
    net = lambda i, o: nn.Sequential(nn.Linear(i, 8), nn.BatchNorm1d(8), nn.Linear(8, o))  # noqa: E731
    assert "batch norm" in invertible_memory.call_problem(AffineCoupling(_half(4), net))


def test_actnorm_initialises_in_a_plain_first_pass_then_inverts():
    torch.manual_seed(1)
    store = CompositeTransform([ActNorm(4), AffineCoupling(_half(4), _mlp), ActNorm(4)]).double()
    invert = copy.deepcopy(store)
    invert.memory = "invert"
    x = 3.0 + 2.0 * torch.randn(16, 4, dtype=torch.float64)
    first = []
    for t in (store, invert):
        leaf = x.clone().requires_grad_()
        y, ld = t(leaf)
        first.append((y, ld))
        assert all(m._initialized for m in t.modules() if isinstance(m, ActNorm))
    assert type(first[1][0].grad_fn).__name__ != "_InvertibleRunBackward"  # the initialising call is plain
    for a, b in zip(store.parameters(), invert.parameters()):
        assert torch.equal(a, b)  # the same statistics
    y, _ = invert(x.clone().requires_grad_())
    assert type(y.grad_fn).__name__ == "_InvertibleRunBackward"
    _compare_transforms(_perturb(store), x)


def test_gradient_free_calls_are_the_plain_forward():
    stack = _initialised(_perturb(_image_stack()), torch.randn(2, 4, 8, 8))
    invert = copy.deepcopy(stack)
    invert.memory = "invert"
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(stack(x), invert(x)))
    z, _ = stack(x)
    assert all(torch.equal(a, b) for a, b in zip(stack.inverse(z.detach()), invert.inverse(z.detach())))
    # Nothing wants a gradient (frozen parameters, an input without grad): no Function either.
    for p in invert.parameters():
        p.requires_grad_(False)
    y, _ = invert(x)
    assert y.grad_fn is None


def test_double_backward_is_refused():
    stack = CompositeTransform([AffineCoupling(_half(4), _mlp), AffineCoupling(_half(4, True), _mlp)],
                               memory="invert")
    x = torch.randn(3, 4, requires_grad=True)
    y, ld = stack(x)
    (g,) = torch.autograd.grad(ld.sum() + y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|does not require grad"):
        g.sum().backward()


# --------------------------------------------------------------------------------------------------
# Memory: what the forward leaves saved for backward
# --------------------------------------------------------------------------------------------------


def _saved(stack, x):
    return saved_bytes(lambda: stack(x), exclude=[x, *stack.parameters()])


def test_saved_bytes_shrink_at_least_eightfold_on_a_deep_stack():
    # 8 Glow-like steps at [8, 8, 8, 8]: store keeps every step's input and its conditioner's activations
    # (hidden 16 wide); invert keeps the stack's output only. The bound: invert <= store / 8.
    c = 8
    steps = []
    for k in range(8):
        steps += [ActNorm(c), InvConv1x1(c),
                  AffineCoupling(_half(c, k % 2 == 1), lambda i, o: ConvNet(i, o, 16, num_blocks=1))]
    x = torch.randn(8, c, 8, 8, requires_grad=True)
    stack = _initialised(CompositeTransform(steps), x)
    store = _saved(stack, x)
    stack.memory = "invert"
    invert = _saved(stack, x)
    assert invert <= store / 8, (store, invert)
    # What invert keeps: the run's output, one [8, 8, 8, 8] float32 tensor.
    assert invert == x.numel() * 4


def test_invert_saves_the_same_whatever_the_depth():
    figures = []
    for depth in (2, 8):
        x = torch.randn(4, 6, requires_grad=True)
        stack = CompositeTransform([AffineCoupling(_half(6, k % 2 == 1), _mlp) for k in range(depth)],
                                   memory="invert")
        figures.append(_saved(stack, x))
    assert figures[0] == figures[1] == 4 * 6 * 4


# --------------------------------------------------------------------------------------------------
# Float32: rebuilt inputs drift with depth; the gradients stay close to float64's
# --------------------------------------------------------------------------------------------------


def _relative_error(grads, reference):
    num = sum(((g.double() - r).pow(2).sum() for g, r in zip(grads, reference) if r is not None))
    den = sum((r.pow(2).sum() for r in reference if r is not None))
    return (num / den).sqrt().item()


def test_float32_drift_over_32_steps_stays_near_store():
    # Parameter gradients of a 32-step stack in float32, against float64 store. Rebuilding adds one
    # inverse's round-off per step; measured (NOTES.md, "Backprop by inversion") the invert error is within
    # a small factor of store's own float32 error. Bound: 10x store's error + 1e-5 - well above the
    # measured ratio, far below a wrong gradient (O(1)).
    torch.manual_seed(0)
    steps = []
    for k in range(32):
        steps += [ActNorm(6), AffineCoupling(_half(6, k % 2 == 1), _mlp, scale="softclamp"), ReversePermutation(6)]
    stack = _perturb(CompositeTransform(steps), std=0.3)
    x = torch.randn(64, 6)
    _initialised(stack, x)
    reference = _gradients(lambda: stack.double()(x.double()), [], list(stack.parameters()))
    stack.float()
    store = _gradients(lambda: stack(x), [], list(stack.parameters()))
    stack.memory = "invert"
    invert = _gradients(lambda: stack(x), [], list(stack.parameters()))
    store_err, invert_err = _relative_error(store, reference), _relative_error(invert, reference)
    assert invert_err <= 10 * store_err + 1e-5, (store_err, invert_err)


# --------------------------------------------------------------------------------------------------
# Through the fused op's kernel (interpreter tier)
# --------------------------------------------------------------------------------------------------


@requires_interpreter
def test_invert_through_the_coupling_kernel():
    stack = _perturb(CompositeTransform([AffineCoupling(_half(4, k % 2 == 1), _mlp) for k in range(3)]))
    x = torch.randn(3, 4)
    with fastdensity.set_backend("triton"):
        _compare_transforms(stack, x, rtol=1e-5)  # float32: one inverse's round-off per step
