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


class _no_drift_replay(warnings.catch_warnings):
    """Fails when backward had to recompute a segment from its stored input: the gradients would then
    equal store's without the inversion being tested at all."""

    def __init__(self):
        super().__init__(record=True)

    def __enter__(self):
        self.log = super().__enter__()
        warnings.simplefilter("always")
        return self.log

    def __exit__(self, *exc):
        super().__exit__(*exc)
        replays = [str(w.message) for w in self.log if "rebuilt from their output is off" in str(w.message)]
        assert not replays, replays[0]
        for w in self.log:  # the others go on as they came
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _compare_transforms(store: CompositeTransform, x, context=None, rtol=RTOL, **invert_options):
    """The store and invert copies of ``store`` give the same outputs and the same gradients."""
    invert = copy.deepcopy(store)
    invert.memory = "invert"
    for name, value in invert_options.items():
        setattr(invert, name, value)
    results = []
    for t in (store, invert):
        leaves = [x.detach().clone().requires_grad_()]
        if context is not None:
            leaves.append(context.detach().clone().requires_grad_())
        fn = (lambda: t(leaves[0])) if context is None else (lambda: t(leaves[0], leaves[1]))
        with torch.no_grad():
            values = fn()
        with _no_drift_replay():
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


@pytest.mark.parametrize("anchor_every", [None, 24, 4, 1])
def test_vector_stack_gradients_equal_store(anchor_every):
    stack = _perturb(_vector_stack()).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    _compare_transforms(_initialised(stack, x), x, anchor_every=anchor_every)


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
    """The hook that gives spline couplings the one-conditioner-pass rebuild: a ``_couple``, and
    ``rebuild_from_kept_part`` saying that forward = merge(x_kept, _couple(x_tr, _params(x_kept)))
    (true without the unconditional transform on the kept part)."""

    def _couple(self, x_tr, h, inverse):
        return self._spline_from(x_tr, h, inverse, self._logit_scale)

    @property
    def rebuild_from_kept_part(self):
        return self.unconditional_transform is None


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
    # With the unconditional transform on the kept part the kept parts of x and y differ: generic rebuild.
    unconditional = _SplitFormSplineCoupling(_half(6), _mlp, num_bins=4, tail_bound=2.0, scale_logits=False,
                                             apply_unconditional_transform=True)
    assert not invertible_memory._is_coupling(unconditional)
    _compare_transforms(_perturb(CompositeTransform([unconditional, steps[1]]), std=0.5).double(), x)


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
    assert invert.config["memory"] == "invert" and "memory" not in store.config  # store: configs as before
    grads = []
    for model in (store, invert):
        leaves = [x.clone().requires_grad_()] + ([c.clone().requires_grad_()] if c is not None else [])
        with _no_drift_replay():
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


def test_compiled_model_with_inverted_runs_gives_stores_gradients():
    # backend="eager": dynamo's tracing and graph breaks without Inductor's minutes of compilation.
    torch.manual_seed(0)
    store = _perturb(build_model("glow", (6,), num_steps=3, hidden=8), std=0.05)
    x = torch.randn(16, 6)
    store.initialize(x)
    invert = copy.deepcopy(store)
    invertible_memory.set_memory(invert, "invert")
    expected = torch.autograd.grad(-store.log_prob(x).mean(), list(store.parameters()))
    compiled = torch.compile(lambda x: -invert.log_prob(x).mean(), backend="eager")
    found = torch.autograd.grad(compiled(x), list(invert.parameters()))
    _assert_same_gradients(expected, found, rtol=1e-5)  # float32: one inverse's round-off per step


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
    # (hidden 16 wide); invert keeps its anchors only. The bound: invert <= store / 8.
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
    # What invert keeps: one output per 12 transforms (the default anchors), two [8, 8, 8, 8] float32
    # tensors for these 24.
    assert invert == 2 * x.numel() * 4


def test_invert_saves_one_output_per_anchor_whatever_the_depth():
    figures = []
    for depth, anchor_every in ((2, None), (8, None), (20, 24), (8, 2), (9, 2)):
        x = torch.randn(4, 6, requires_grad=True)
        stack = CompositeTransform([AffineCoupling(_half(6, k % 2 == 1), _mlp) for k in range(depth)],
                                   memory="invert", anchor_every=anchor_every)
        figures.append(_saved(stack, x) // (4 * 6 * 4))  # in [4, 6] float32 tensors
    assert figures == [1, 1, 1, 4, 5]  # 9 steps every 2 at most: 5 segments of 1 or 2
    assert CompositeTransform([]).anchor_every == invertible_memory.DEFAULT_ANCHOR_EVERY
    with pytest.raises(ValueError, match="anchor_every"):
        CompositeTransform([ActNorm(2)], anchor_every=0)


def test_memory_benchmark_cases_save_at_least_eightfold_less():
    # The benchmark's quick cases (a Glow-step stack, a two-level Glow), through the harness's counter.
    from fastdensity.benchmarks import bench_memory, harness

    for case in bench_memory.cases(harness.Settings(torch.device("cpu"), quick=True)):
        (x,) = case.make_inputs()
        figures = {}
        for provider in case.providers:
            runner = provider.build()
            with fastdensity.set_backend(provider.backend):
                figures[provider.name] = saved_bytes(lambda: runner.fn(x), [x, *runner.grad_targets((x,))])
        assert figures["eager_invert"] <= figures["eager"] / 8, (case.op, figures)


def test_largest_true_finds_the_edge():
    from fastdensity.benchmarks.bench_memory import largest_true

    for edge in (1, 2, 3, 64, 100, 1000):
        calls = []
        found = largest_true(lambda n: calls.append(n) or n <= edge)
        assert found == edge and len(calls) <= 2 * edge.bit_length() + 2
    assert largest_true(lambda n: False) == 0
    assert largest_true(lambda n: True, limit=50) == 50


# --------------------------------------------------------------------------------------------------
# Float32: rebuilt inputs drift with depth; the gradients stay close to float64's
# --------------------------------------------------------------------------------------------------


def _relative_error(grads, reference):
    num = sum(((g.double() - r).pow(2).sum() for g, r in zip(grads, reference) if r is not None))
    den = sum((r.pow(2).sum() for r in reference if r is not None))
    return (num / den).sqrt().item()


def _float32_case(depth, std):
    """Steps of ActNorm, InvConv1x1 and a sigmoid affine coupling with a ReLU MLP (the drift table's
    stack, NOTES.md "Backprop by inversion"), weights perturbed by N(0, std^2), ActNorm initialised."""
    torch.manual_seed(0)
    d = 16
    net = lambda i, o: nn.Sequential(nn.Linear(i, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),  # noqa: E731
                                     nn.Linear(64, o))
    steps = []
    for k in range(depth):
        steps += [ActNorm(d), InvConv1x1(d), AffineCoupling(_half(d, k % 2 == 1), net)]
    stack = _perturb(CompositeTransform(steps), std=std)
    x = torch.randn(256, d) * 2 + 1
    return _initialised(stack, x), x


def _nll_gradients(stack, x):
    """Parameter gradients of the flow's negative log-likelihood (up to a constant), the training loss."""
    y, logdet = stack(x)
    return torch.autograd.grad(0.5 * y.pow(2).sum() - logdet.sum(), list(stack.parameters()))


def test_float32_drift_over_32_steps_stays_near_store(monkeypatch):
    # 32 steps (96 transforms) in float32 against float64 store; the module docstring of
    # fastdensity.nn.invertible_memory has the table. Measured here: invert with the default anchors
    # 1.1x store's error (median over 10 seeds: 1.1x). Bound 3x store's: room for round-off differences
    # between machines, and far below what a rebuild off by 1e-5 gives (shown below: ~100x).
    stack, x = _float32_case(32, std=0.05)
    reference = _nll_gradients(copy.deepcopy(stack).double(), x.double())
    store_err = _relative_error(_nll_gradients(stack, x), reference)
    stack.memory = "invert"
    with _no_drift_replay():
        invert_err = _relative_error(_nll_gradients(stack, x), reference)
    assert invert_err <= 3 * store_err, (store_err, invert_err)
    # The bound catches a rebuild that is off by 1e-5 relative, under the drift check's 1e-4.
    inverse = ActNorm.inverse
    monkeypatch.setattr(ActNorm, "inverse", lambda self, z, context=None: (
        inverse(self, z)[0] * (1 + 1e-5), inverse(self, z)[1]))
    with _no_drift_replay():
        off_err = _relative_error(_nll_gradients(stack, x), reference)
    assert off_err > 3 * store_err, (store_err, off_err)


def test_ill_conditioned_runs_are_caught_and_recomputed():
    # N(0, 0.2^2) weights: the couplings contract by up to 1000x, so rebuilding multiplies round-off by
    # as much per step (off by ~1e12 after 8 steps). The drift check must notice and recompute from the
    # stored input: the same float32 gradients as store's, up to the summation order of the recomputation.
    stack, x = _float32_case(8, std=0.2)
    store = _nll_gradients(stack, x)
    stack.memory = "invert"
    with pytest.warns(RuntimeWarning, match=r"rebuilt from their output is off by .* recomputed"):
        invert = _nll_gradients(stack, x)
    _assert_same_gradients(store, invert, rtol=1e-5)  # float32: both are the stored computation


# --------------------------------------------------------------------------------------------------
# Through the fused op's kernel (interpreter tier)
# --------------------------------------------------------------------------------------------------


@requires_interpreter
def test_invert_through_the_coupling_kernel():
    stack = _perturb(CompositeTransform([AffineCoupling(_half(4, k % 2 == 1), _mlp) for k in range(3)]))
    x = torch.randn(3, 4)
    with fastdensity.set_backend("triton"):
        _compare_transforms(stack, x, rtol=1e-5)  # float32: one inverse's round-off per step
