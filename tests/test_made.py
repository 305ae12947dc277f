"""MADE: the autoregressive property through the Jacobian, nflows' degrees, reproducible random orderings,
the kernel path against the reference, and a GPU tier."""
from __future__ import annotations

import pytest
import torch

import fastdensity
from fastdensity.nn import MADE
from fastdensity.testing import compare
from helpers import assert_compiles_like_reference, requires_cuda

ORDERINGS = ["sequential", "random", "explicit"]


def _made(ordering, D=6, H=16, m=1, context=None, num_blocks=2, dtype=torch.float64, seed=None):
    if ordering == "explicit":
        ordering = torch.tensor([3, 0, 5, 1, 4, 2][:D]) if D == 6 else torch.randperm(D)
    elif ordering == "random" and seed is None:
        seed = 11
    return MADE(D, H, num_blocks=num_blocks, output_multiplier=m, context_features=context, ordering=ordering,
                seed=seed).to(dtype)


def _input_jacobian(made, x, context=None):
    """[D * m, D]: d out / d x for one sample."""
    c = None if context is None else context[None]
    return torch.autograd.functional.jacobian(lambda v: made(v[None], c)[0], x)


# ------------------------------------------------------------------------------------------------
# Reference tier (CPU tensors under 'auto' run the reference op)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ordering", ORDERINGS)
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("context", [None, 2])
def test_autoregressive_property(ordering, m, context):
    made = _made(ordering, m=m, context=context)
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
    for layer in [*made.hidden_layers, made.output_layer]:
        paths = layer.mask.double() @ paths
    connected = (paths > 0).view(D, m, D)
    assert not connected.permute(1, 0, 2)[:, forbidden].any()
    if ordering != "random":
        assert connected.permute(1, 0, 2)[:, ~forbidden].all(), "an allowed dependency is missing (masks too strict)"


def test_first_feature_is_unconditional_and_context_reaches_every_output():
    made = _made("explicit", m=2, context=3)
    x, c = torch.randn(6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    first = int(made.generation_order[0])
    jac_x = _input_jacobian(made, x, c).view(6, 2, 6)
    assert torch.count_nonzero(jac_x[first]) == 0
    jac_c = torch.autograd.functional.jacobian(lambda v: made(x[None], v[None])[0], c)
    assert (jac_c.abs().sum(1) > 0).all()


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
def test_kernel_path_matches_reference(dtype):
    made = _made("random", D=9, H=40, m=2, context=3, dtype=dtype)
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
    with pytest.raises(ValueError, match="seed is only used with ordering='random'"):
        MADE(4, 8, seed=3)
    made = MADE(4, 8, context_features=2)
    with pytest.raises(ValueError, match=r"context must have shape \[..., context_features=2\]; got None"):
        made(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"context must have shape \[..., context_features=2\]; got \(3, 5\)"):
        made(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"inputs must have shape \[..., features=4\]; got \(3, 5\)"):
        made(torch.randn(3, 5), torch.randn(3, 2))
    with pytest.raises(ValueError, match="context was given but this MADE was built with context_features=None"):
        MADE(4, 8)(torch.randn(3, 4), torch.randn(3, 2))


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
