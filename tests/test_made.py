"""MADE: the autoregressive property through the Jacobian, nflows' degrees and block structures (plain and
residual, random masks, dropout, batch norm) against nflows' own MADE, the context, reproducible random
orderings, the kernel path against the reference, and a GPU tier."""
from __future__ import annotations

import pytest
import torch

import fastdensity
from fastdensity.nn import MADE
from fastdensity.testing import compare
from helpers import assert_compiles_like_reference, requires_cuda


def _made(ordering, D=6, H=16, m=1, context=None, num_blocks=2, dtype=torch.float64, seed=None, **options):
    if ordering == "explicit":
        ordering = torch.tensor([3, 0, 5, 1, 4, 2][:D]) if D == 6 else torch.randperm(D)
    elif (ordering == "random" or options.get("random_mask")) and seed is None:
        seed = 11
    return MADE(D, H, num_blocks=num_blocks, output_multiplier=m, context_features=context, ordering=ordering,
                seed=seed, **options).to(dtype)


def _perturbed(made, scale=0.3):
    """Parameters moved off their initialisation (nflows' residual blocks start near zero, which would
    let a missing path through them pass unnoticed)."""
    with torch.no_grad():
        for p in made.parameters():
            p.add_(scale * torch.randn_like(p))
    return made


# Block structures: (ordering, options); the residual one needs non-random degrees.
STRUCTURES = [
    ("sequential", {}),
    ("random", {}),
    ("explicit", {}),
    ("sequential", {"random_mask": True}),
    ("explicit", {"use_residual_blocks": True}),
    ("sequential", {"use_residual_blocks": True, "use_batch_norm": True, "dropout_probability": 0.2}),
    ("explicit", {"use_batch_norm": True, "dropout_probability": 0.2}),
]
STRUCTURE_IDS = ["sequential", "random", "explicit", "random-mask", "residual", "residual-bn-dropout",
                 "plain-bn-dropout"]


def _input_jacobian(made, x, context=None):
    """[D * m, D]: d out / d x for one sample."""
    c = None if context is None else context[None]
    return torch.autograd.functional.jacobian(lambda v: made(v[None], c)[0], x)


# ------------------------------------------------------------------------------------------------
# Reference tier (CPU tensors under 'auto' run the reference op)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ordering,options", STRUCTURES, ids=STRUCTURE_IDS)
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("context", [None, 2])
def test_autoregressive_property(ordering, options, m, context):
    made = _perturbed(_made(ordering, m=m, context=context, **options)).eval()  # eval: dropout off, BN fixed
    D = made.features
    order = made.ordering
    c = None if context is None else torch.randn(context, dtype=torch.float64)
    forbidden = order[None, :] >= order[:, None]  # [d, i]: input i is not before feature d
    for _ in range(3):
        jac = _input_jacobian(made, torch.randn(D, dtype=torch.float64), c).view(D, m, D)  # [feature, r, input]
        # Output (d, r) may depend only on inputs i before d in the ordering: exactly zero elsewhere.
        assert torch.count_nonzero(jac.permute(1, 0, 2)[:, forbidden]) == 0
    # The other way round, exactly: the masks leave a path from every earlier input to every output
    # (with cycling degrees and H >= D - 1; random degrees may leave some out, never add one).
    paths = made.input_layer.mask.double()
    if made.use_residual_blocks:  # each block adds its two layers' paths to the skip connection's
        for block in made.blocks:
            inner = block.linear_layers[1].mask.double() @ block.linear_layers[0].mask.double()
            paths = paths + inner @ paths
    else:
        for layer in made.hidden_layers:
            paths = layer.mask.double() @ paths
    paths = made.output_layer.mask.double() @ paths
    connected = (paths > 0).view(D, m, D)
    assert not connected.permute(1, 0, 2)[:, forbidden].any()
    if ordering != "random" and not options.get("random_mask"):
        assert connected.permute(1, 0, 2)[:, ~forbidden].all(), "an allowed dependency is missing (masks too strict)"


def test_first_feature_is_unconditional_and_context_reaches_every_output():
    made = _made("explicit", m=2, context=3)
    x, c = torch.randn(6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    first = int(made.generation_order[0])
    jac_x = _input_jacobian(made, x, c).view(6, 2, 6)
    assert torch.count_nonzero(jac_x[first]) == 0
    jac_c = torch.autograd.functional.jacobian(lambda v: made(x[None], v[None])[0], c)
    assert (jac_c.abs().sum(1) > 0).all()


def test_residual_context_follows_nflows():
    """Residual blocks take the context as nflows does (first layer and each block, not the output layer):
    every output but the first feature's depends on it; the first feature's parameters are constants."""
    made = _perturbed(_made("explicit", m=2, context=3, use_residual_blocks=True))
    x, c = torch.randn(6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    first = int(made.generation_order[0])
    jac_c = torch.autograd.functional.jacobian(lambda v: made(x[None], v[None])[0], c).view(6, 2, 3)
    assert torch.count_nonzero(jac_c[first]) == 0
    others = [d for d in range(6) if d != first]
    assert (jac_c[others].abs().sum(-1) > 0).all()


def copy_nflows_made(theirs, ours):
    """Copy nflows' MADE parameters (and batch-norm statistics) into ours. Our hidden units are nflows'
    sorted by degree (a stable argsort), so every hidden-sized axis is permuted by that order; the masks
    must then agree exactly."""
    D = ours.features
    perm = torch.argsort(theirs.initial_layer.degrees, stable=True)  # all hidden layers share degrees here
    pairs = [(theirs.initial_layer, ours.input_layer, perm, torch.arange(D))]
    if ours.use_residual_blocks:
        for tb, ob in zip(theirs.blocks, ours.blocks):
            pairs += [(tl, ol, perm, perm) for tl, ol in zip(tb.linear_layers, ob.linear_layers)]
    else:
        pairs += [(tb.linear, ol, perm, perm) for tb, ol in zip(theirs.blocks, ours.hidden_layers)]
    pairs.append((theirs.final_layer, ours.output_layer, torch.arange(ours.output_layer.out_features), perm))
    with torch.no_grad():
        for t, o, rows, cols in pairs:
            assert torch.equal(o.mask, t.mask[rows][:, cols].bool()), "masks differ beyond the permutation"
            o.weight.copy_(t.weight[rows][:, cols])
            o.bias.copy_(t.bias[rows])
        if ours.use_residual_blocks:
            if ours.context_layer is not None:
                ours.context_layer.weight.copy_(theirs.context_layer.weight[perm])
                ours.context_layer.bias.copy_(theirs.context_layer.bias[perm])
            for tb, ob in zip(theirs.blocks, ours.blocks):
                if ob.context_layer is not None:
                    ob.context_layer.weight.copy_(tb.context_layer.weight[perm])
                    ob.context_layer.bias.copy_(tb.context_layer.bias[perm])
                if ob.batch_norm_layers is not None:
                    for tn, on in zip(tb.batch_norm_layers, ob.batch_norm_layers):
                        _copy_norm(tn, on, perm)
        else:
            for tb, on in zip(theirs.blocks, ours.batch_norms or []):
                _copy_norm(tb.batch_norm, on, perm)


def _copy_norm(theirs, ours, perm):
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(ours, name).copy_(getattr(theirs, name)[perm])


@pytest.mark.parametrize("options", [
    {"use_residual_blocks": True},
    {"use_residual_blocks": True, "context_features": 3},
    {"use_residual_blocks": True, "context_features": 3, "use_batch_norm": True},
    {"use_residual_blocks": False, "use_batch_norm": True},
    {"use_residual_blocks": False, "activation": torch.tanh},
], ids=["residual", "residual-context", "residual-context-bn", "plain-bn", "plain-tanh"])
def test_residual_and_plain_made_equal_nflows_made(options):
    """nflows' MADE with weights copied across (hidden units sorted) gives the same outputs to float64
    round-off. (nflows' plain MADE takes its context differently - first layer only - so the plain
    structure is compared without one.)"""
    nflows_made = pytest.importorskip("nflows.transforms.made")
    torch.manual_seed(0)
    D, H, C = 5, 12, options.get("context_features")
    theirs = _perturbed(nflows_made.MADE(D, H, num_blocks=2, output_multiplier=2, **options).double()).eval()
    ours = MADE(D, H, num_blocks=2, output_multiplier=2, **options).double().eval()
    if options.get("use_batch_norm"):  # non-trivial running statistics
        for norm in [m for m in theirs.modules() if isinstance(m, torch.nn.BatchNorm1d)]:
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    copy_nflows_made(theirs, ours)
    x = torch.randn(7, D, dtype=torch.float64)
    c = None if C is None else torch.randn(7, C, dtype=torch.float64)
    torch.testing.assert_close(ours(x, c), theirs(x, c))


def test_random_mask_draws_nflows_degrees():
    """random_mask keeps the natural order and draws each layer's degrees uniformly in [min(previous), D-1]."""
    made = MADE(6, 40, num_blocks=3, random_mask=True, seed=2)
    assert torch.equal(made.ordering, torch.arange(6))
    previous = made.degrees
    for deg in made.hidden_degrees:
        assert deg.min() >= min(int(previous.min()), 5) and deg.max() <= 5
        previous = deg
    again = MADE(6, 40, num_blocks=3, random_mask=True, seed=2)
    assert torch.equal(again.hidden_degrees, made.hidden_degrees)
    assert not torch.equal(MADE(6, 40, num_blocks=3).hidden_degrees, made.hidden_degrees)


def test_dropout_acts_in_training_only():
    made = _perturbed(_made("sequential", m=2, dropout_probability=0.5, use_residual_blocks=True))
    x = torch.randn(4, 6, dtype=torch.float64)
    made.train()
    assert not torch.equal(made(x), made(x))
    made.eval()
    assert torch.equal(made(x), made(x))


def test_output_layout_and_degrees():
    made = _made("explicit", m=3)
    assert torch.equal(made.degrees, made.ordering + 1)
    assert torch.equal(made.output_degrees, made.degrees.repeat_interleave(3))  # [d0 x m, d1 x m, ...]
    assert torch.equal(made.ordering[made.generation_order], torch.arange(6))
    for deg in made.hidden_degrees:
        assert torch.equal(deg, deg.sort().values)
    out = made(torch.randn(5, 6, dtype=torch.float64))
    assert out.shape == (5, 18) and out.view(5, 6, 3).shape == (5, 6, 3)


def test_same_function_as_nflows_made_up_to_a_hidden_permutation():
    nflows_made = pytest.importorskip("nflows.transforms.made")
    D, H, blocks = 5, 12, 2
    theirs = nflows_made.MADE(D, H, num_blocks=blocks, output_multiplier=2, use_residual_blocks=False).double()
    ours = MADE(D, H, num_blocks=blocks, output_multiplier=2).double()
    their_layers = [theirs.initial_layer, *[b.linear for b in theirs.blocks], theirs.final_layer]
    our_layers = [ours.input_layer, *ours.hidden_layers, ours.output_layer]
    perms = [torch.argsort(layer.degrees, stable=True) for layer in their_layers[:-1]]
    prev = torch.arange(D)
    for i, (t, o) in enumerate(zip(their_layers, our_layers)):
        rows = perms[i] if i < len(perms) else torch.arange(t.weight.shape[0])
        assert torch.equal(o.mask, t.mask[rows][:, prev].bool()), f"layer {i}: masks differ beyond the permutation"
        with torch.no_grad():
            o.weight.copy_(t.weight[rows][:, prev])
            o.bias.copy_(t.bias[rows])
        prev = rows
    x = torch.randn(7, D, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))


def test_random_ordering_is_reproducible_and_saved():
    torch.manual_seed(3)
    a = MADE(8, 20, ordering="random")
    torch.manual_seed(3)
    b = MADE(8, 20, ordering="random")
    assert torch.equal(a.ordering, b.ordering) and torch.equal(a.hidden_degrees, b.hidden_degrees)
    c = MADE(8, 20, ordering="random", seed=5)
    d = MADE(8, 20, ordering="random", seed=5)
    e = MADE(8, 20, ordering="random", seed=6)
    assert torch.equal(c.ordering, d.ordering) and torch.equal(c.hidden_degrees, d.hidden_degrees)
    assert not (torch.equal(c.ordering, e.ordering) and torch.equal(c.hidden_degrees, e.hidden_degrees))
    # A differently drawn MADE becomes the saved one on load: ordering, degrees, masks, weights.
    e.load_state_dict(c.state_dict())
    assert torch.equal(e.ordering, c.ordering) and torch.equal(e.input_layer.mask, c.input_layer.mask)
    x = torch.randn(4, 8)
    torch.testing.assert_close(e(x), c(x))


def test_single_feature_is_constant_in_the_input():
    made = MADE(1, 8, output_multiplier=2).double()
    jac = _input_jacobian(made, torch.randn(1, dtype=torch.float64))
    assert torch.count_nonzero(jac) == 0


def test_leading_dims():
    made = _made("sequential", m=2, context=3)
    x, c = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    out = made(x, c)
    assert out.shape == (2, 4, 12)
    torch.testing.assert_close(out[1, 2], made(x[1, 2:3], c[1, 2:3])[0])


# ------------------------------------------------------------------------------------------------
# Interpreter tier: MADE on the Triton kernels against MADE on the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_kernel_path_matches_reference(dtype, residual):
    made = _made("sequential" if residual else "random", D=9, H=40, m=2, context=3, dtype=dtype,
                 use_residual_blocks=residual)
    x = torch.randn(5, 9, dtype=dtype, requires_grad=True)
    c = torch.randn(5, 3, dtype=dtype, requires_grad=True)
    g = torch.randn(5, 18, dtype=dtype)
    leaves = [x, c, *made.parameters()]
    results = {}
    for backend in ("reference", "triton"):
        with fastdensity.set_backend(backend):
            out = made(x, c)
        results[backend] = (out, torch.autograd.grad(out, leaves, g))
    # fp32: each layer sums up to 40 products in a different order than torch: ~1e-6 relative per
    # layer, compounded over 4 layers.
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 5e-5}
    torch.testing.assert_close(results["triton"][0], results["reference"][0], **tol)
    for i, (k, r) in enumerate(zip(results["triton"][1], results["reference"][1])):
        torch.testing.assert_close(k, r, **tol, msg=lambda msg: f"leaf {i}: {msg}")


def test_kernel_path_is_autoregressive():
    made = _made("explicit", m=2, context=None)
    with fastdensity.set_backend("triton"):
        jac = _input_jacobian(made, torch.randn(6, dtype=torch.float64)).view(6, 2, 6)
    forbidden = made.ordering[None, :] >= made.ordering[:, None]
    assert torch.count_nonzero(jac.permute(1, 0, 2)[:, forbidden]) == 0
    assert torch.count_nonzero(jac.permute(1, 0, 2)[:, ~forbidden]) > 0


def test_compile_fullgraph_runs_the_kernel(monkeypatch):
    from fastdensity.kernels import masked_linear as kml

    launches = []
    forward = kml.masked_linear_forward
    monkeypatch.setattr(kml, "masked_linear_forward", lambda *a: launches.append(1) or forward(*a))
    torch._dynamo.reset()
    made = _made("sequential", D=5, H=24, m=2, context=2)
    x, c = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)

    def nll(x, c):
        shift, log_scale = made(x, c).view(3, 5, 2).unbind(-1)
        z = (x - shift) * torch.exp(-log_scale)
        return (0.5 * z.pow(2) + log_scale).sum()

    assert_compiles_like_reference(nll, (x, c), made.parameters())
    assert len(launches) == 4  # input, 2 hidden and output layers ran the kernel inside the graph


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="ordering tensor must be a permutation of 0..3"):
        MADE(4, 8, ordering=torch.tensor([0, 1, 1, 3]))
    with pytest.raises(ValueError, match="ordering tensor must be a permutation of 0..3"):
        MADE(4, 8, ordering=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="ordering tensor must be a permutation of 0..3"):
        MADE(4, 8, ordering=torch.tensor([0.0, 1.0, 2.0, 3.0]))
    # Any integer dtype (or a list) is a valid permutation.
    assert MADE(4, 8, ordering=torch.tensor([2, 0, 3, 1], dtype=torch.int32)).ordering.tolist() == [2, 0, 3, 1]
    assert MADE(4, 8, ordering=[2, 0, 3, 1]).ordering.dtype == torch.long
    with pytest.raises(ValueError, match="ordering must be 'sequential', 'random' or a permutation tensor; got 'rev"):
        MADE(4, 8, ordering="reverse")
    with pytest.raises(ValueError, match="features must be an integer >= 1; got 0"):
        MADE(0, 8)
    with pytest.raises(ValueError, match="output_multiplier must be an integer >= 1; got 0"):
        MADE(4, 8, output_multiplier=0)
    with pytest.raises(ValueError, match="num_blocks must be an integer >= 0; got -1"):
        MADE(4, 8, num_blocks=-1)
    with pytest.raises(ValueError, match=r"seed is only used with random degrees \(ordering='random' or random_mask"):
        MADE(4, 8, seed=3)
    with pytest.raises(ValueError, match="use_residual_blocks needs the same degrees"):
        MADE(4, 8, use_residual_blocks=True, random_mask=True)
    with pytest.raises(ValueError, match="use_residual_blocks needs the same degrees"):
        MADE(4, 8, use_residual_blocks=True, ordering="random")
    with pytest.raises(ValueError, match=r"dropout_probability must lie in \[0, 1\); got 1.0"):
        MADE(4, 8, dropout_probability=1.0)
    made = MADE(4, 8, context_features=2)
    with pytest.raises(ValueError, match=r"context must have shape \[..., context_features=2\]; got None"):
        made(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"context must have shape \[..., context_features=2\]; got \(3, 5\)"):
        made(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"inputs must have shape \[..., features=4\]; got \(3, 5\)"):
        made(torch.randn(3, 5), torch.randn(3, 2))
    with pytest.raises(ValueError, match="context was given but this MADE was built with context_features=None"):
        MADE(4, 8)(torch.randn(3, 4), torch.randn(3, 2))
    for residual in (False, True):
        with pytest.raises(ValueError, match=r"context must have the inputs' leading dims \(3,\)"):
            MADE(4, 8, context_features=2, use_residual_blocks=residual)(torch.randn(3, 4), torch.randn(5, 2))


# ------------------------------------------------------------------------------------------------
# GPU tier
# ------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ordering", ["sequential", "random"])
def test_gpu_made_matches_fp64_reference(dtype, ordering):
    torch.manual_seed(0)
    made64 = MADE(256, 1024, num_blocks=2, output_multiplier=2, context_features=8, ordering=ordering,
                  seed=1 if ordering == "random" else None).cuda().double()
    made = MADE(256, 1024, num_blocks=2, output_multiplier=2, context_features=8, ordering=ordering,
                seed=1 if ordering == "random" else None).cuda().to(dtype)
    made.load_state_dict(made64.state_dict())  # rounds the weights to dtype ...
    made64.load_state_dict(made.state_dict())  # ... and the fp64 reference takes the rounded values (the rule)
    x = torch.randn(2048, 256, device="cuda").to(dtype)
    c = torch.randn(2048, 8, device="cuda").to(dtype)
    g = torch.randn(2048, 512, device="cuda")

    def run(model, backend, cast):
        xs = cast(x).requires_grad_(True)
        with fastdensity.set_backend(backend):
            out = model(xs, cast(c))
        grads = torch.autograd.grad((out.double() * g.double()).sum(), [xs, *model.parameters()])
        return [out, *grads]

    kernel = run(made, "triton", lambda t: t)
    eager = run(made, "reference", lambda t: t)
    ref64 = run(made64, "reference", lambda t: t.double())
    names = ["out", "grad_x", *[n for n, _ in made.named_parameters()]]
    for name, k, e, r in zip(names, kernel, eager, ref64):
        result = compare(name, k, e, r)
        assert result.passed, str(result)


@requires_cuda
@pytest.mark.gpu
def test_gpu_made_is_autoregressive():
    made = MADE(10, 64, output_multiplier=2, ordering="random", seed=4).cuda().double()
    x = torch.randn(10, device="cuda", dtype=torch.float64)
    with fastdensity.set_backend("triton"):
        jac = torch.autograd.functional.jacobian(lambda v: made(v[None])[0], x).view(10, 2, 10)
    forbidden = made.ordering[None, :] >= made.ordering[:, None]
    assert torch.count_nonzero(jac.permute(1, 0, 2)[:, forbidden]) == 0
