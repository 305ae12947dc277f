"""fastdensity.sampling: the fast samplers return what the naive ones return from the same seed.

PixelCNN: the cached sampler against the naive one (the whole network per pixel) - identical images
in float64, and in float32 identical except for draws that a near-tie flips, each such flip checked to
come from parameters that agree to float32 round-off. The masked-conv split it rests on is checked
position by position against the op. MADE: the incremental inverse against the transforms' own D-pass
inverse, for every MADE structure (plain, residual, batch norm, dropout, random degrees, orderings,
context) and for the affine (fastdensity's and nflows' layout) and spline transforms; whole MAF and
NSF models with several layers and orderings.
"""
from __future__ import annotations

import io
import sys

import pytest
import torch

from fastdensity import ops, sampling
from fastdensity.models import MAF, NSF, PixelCNN
from fastdensity.nn import (MaskedAffineAutoregressive, MaskedAffineAutoregressiveTransform, MaskedConv2d,
                            MaskedPiecewiseRationalQuadraticAutoregressive)
from fastdensity.sampling.pixelcnn_cache import CachedMaskedConv


def perturb(module, scale, seed=1):
    """Parameters off their initialisation (zero-initialised output layers would hide wrong wiring);
    batch norms get running statistics that are not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for bn in module.modules():
            if isinstance(bn, torch.nn.BatchNorm1d):
                bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g, dtype=bn.running_mean.dtype))
                bn.running_var.uniform_(0.5, 2.0, generator=g)
    return module


# ------------------------------------------------------------------------------------------------
# PixelCNN
# ------------------------------------------------------------------------------------------------


def _pixelcnn(shape, levels, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    opts = dict(hidden=8, num_blocks=2, num_mixtures=2, kernel_size=5)
    opts.update(kwargs)
    return perturb(PixelCNN(shape, levels=levels, **opts).to(dtype), 0.3).eval()


def _recording_draw(log):
    """The samplers' draw, keeping each step's parameters [B, P]."""
    def draw(model, params):
        log.append(params[:, :, 0, 0].clone())
        return sampling.draw_pixel(model, params)

    return draw


def _sample(model, method, n, seed=7):
    log = []
    torch.manual_seed(seed)
    images = sampling.PIXELCNN_METHODS[method](model, n, draw=_recording_draw(log))
    return images, torch.stack(log, dim=1)  # [B, steps, P]


PIXELCNN_CASES = {
    "1ch-17-levels": ((1, 6, 5), 17, {}),  # renormalised categorical draw
    "1ch-16-levels": ((1, 5, 6), 16, {}),  # the mixture's own draw
    "rgb-4-levels": ((3, 4, 5), 4, {}),  # three coupled channels
    "rgb-256-levels-k3": ((3, 5, 4), 256, {"kernel_size": 3, "num_blocks": 3}),
    "no-blocks": ((1, 5, 6), 16, {"num_blocks": 0}),
    "1x1-first-layer": ((1, 4, 4), 8, {"kernel_size": 1}),  # the type-A layer sees nothing: bias only
}


@pytest.mark.parametrize("case", PIXELCNN_CASES)
def test_pixelcnn_cached_equals_naive_in_float64(case):
    shape, levels, kwargs = PIXELCNN_CASES[case]
    model = _pixelcnn(shape, levels, **kwargs)
    naive, naive_params = _sample(model, "naive", 6)
    cached, cached_params = _sample(model, "cached", 6)
    assert cached.dtype == torch.long and cached.shape == (6, *shape)
    assert torch.equal(cached, naive)
    # Same parameters at every step up to the order of float64 sums.
    torch.testing.assert_close(cached_params, naive_params, rtol=1e-12, atol=1e-12)
    window, _ = _sample(model, "window", 6)
    assert torch.equal(window, naive)
    assert len(set(cached.flatten().tolist())) > 1  # real draws, not a constant image


@pytest.mark.parametrize("shape,levels", [((1, 7, 6), 256), ((1, 6, 6), 17), ((3, 5, 5), 256)])
def test_pixelcnn_cached_float32_differs_only_at_near_ties(shape, levels):
    """float32: every image either equals the naive one or first differs at a pixel whose parameters
    (computed by both samplers from the same earlier pixels) agree to float32 round-off, where the
    draw straddled a decision boundary. Flips are counted; they must stay rare."""
    model = _pixelcnn(shape, levels, dtype=torch.float32, hidden=16)
    n = 48
    naive, naive_params = _sample(model, "naive", n)
    cached, cached_params = _sample(model, "cached", n)
    c, h, w = shape
    differs = (naive != cached).view(n, c, h * w).any(dim=1)  # [n, pixels]
    flips = 0
    for b in range(n):
        where = differs[b].nonzero()
        last = h * w - 1 if where.numel() == 0 else int(where[0])
        flips += where.numel() > 0
        # Up to and including the first differing pixel both samplers saw the same earlier pixels.
        # Tolerance: float32 sums of a few hundred products in a different order (and a different
        # convolution algorithm), relative to parameters of order 1-10.
        torch.testing.assert_close(cached_params[b, :last + 1], naive_params[b, :last + 1], rtol=1e-4, atol=1e-4)
    print(f"float32 {shape} L={levels}: {flips} of {n} images flipped by a near-tie")
    assert flips <= n // 8, f"{flips} of {n} images differ: more than near-ties explain"


def test_pixelcnn_sample_method_switch_and_default():
    model = _pixelcnn((1, 4, 4), 16)
    for method in ("cached", "naive", "window"):
        torch.manual_seed(3)
        got = model.sample(3, method=method)
        torch.manual_seed(3)
        assert torch.equal(got, model.sample(3))  # the default draws the same
    with pytest.raises(ValueError, match="method must be one of 'cached', 'naive', 'window'"):
        model.sample(2, method="fast")
    assert model.sample(0).shape == (0, 1, 4, 4)


def test_pixelcnn_progress_ticks_once_per_pixel():
    model = _pixelcnn((1, 3, 5), 16)
    ticks = []
    with sampling.reporting(lambda: ticks.append(1)):
        model.sample(2)
    assert len(ticks) == 15 == sampling.sequential_steps(model)
    model.sample(1)  # outside the block nothing is reported
    assert len(ticks) == 15


@pytest.mark.parametrize("kernel,mask_type,groups,dilation", [
    (5, "A", 1, 1), (3, "B", 1, 1), (3, "B", 3, 1), (5, "A", 1, 2), (3, "B", 1, (2, 3)), (1, "B", 1, 1)])
def test_masked_conv_splits_into_row_term_and_current_row(kernel, mask_type, groups, dilation):
    """Row term + current-row product at (i, j) = the masked conv's output at (i, j), every position."""
    torch.manual_seed(1)
    conv = MaskedConv2d(6, 9, kernel, mask_type=mask_type, color_groups=groups, dilation=dilation).double()
    with torch.no_grad():
        conv.weight[~conv.mask] = float("nan")  # dead weights are never read
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    expected = ops.masked_conv2d(x, conv.weight, conv.bias, mask_type=mask_type, color_groups=groups,
                                 dilation=dilation)
    cached = CachedMaskedConv(conv, strict=mask_type == "A")
    buffer = cached.buffer(2, 5, 7, conv.weight)
    for i in range(5):
        for j in range(7):
            cached.store(buffer, i, j).copy_(x[:, :, i, j])
    for i in range(5):
        row = cached.row_term(buffer, i, 7)
        for j in range(7):
            torch.testing.assert_close(cached.at(buffer, row, i, j), expected[:, :, i, j], rtol=1e-12, atol=1e-12)


def test_cached_conv_refuses_a_mask_that_reads_ahead():
    with pytest.raises(ValueError, match="strictly causal"):
        CachedMaskedConv(MaskedConv2d(3, 6, 3, mask_type="B"), strict=True)  # centre tap live
    with pytest.raises(ValueError, match="strictly causal"):
        CachedMaskedConv(MaskedConv2d(3, 6, 3, mask_type="A", color_groups=3), strict=True)  # G sees R
    conv = MaskedConv2d(2, 2, 3, mask_type="B")
    conv.mask[:, :, 2, 0] = True  # a tap in the row below
    with pytest.raises(ValueError, match="causal order"):
        CachedMaskedConv(conv, strict=False)


# ------------------------------------------------------------------------------------------------
# MADE: the incremental inverse
# ------------------------------------------------------------------------------------------------

D, C = 7, 3


def _transforms():
    g = torch.Generator().manual_seed(4)
    perm = torch.randperm(D, generator=g)
    return {
        "plain": lambda: MaskedAffineAutoregressive(D, 16, 2),
        "plain-context": lambda: MaskedAffineAutoregressive(D, 16, 3, context_features=C, scale="sigmoid"),
        "random-ordering": lambda: MaskedAffineAutoregressive(D, 16, 2, ordering="random", scale="exp"),
        "random-degrees-context": lambda: MaskedAffineAutoregressive(D, 16, 3, random_mask=True, context_features=C),
        "permutation-ordering": lambda: MaskedAffineAutoregressive(D, 16, 2, ordering=perm),
        "batchnorm-dropout-tanh": lambda: MaskedAffineAutoregressive(D, 16, 3, use_batch_norm=True,
                                                                     dropout_probability=0.2, activation=torch.tanh),
        "residual-context": lambda: MaskedAffineAutoregressive(D, 16, 3, use_residual_blocks=True, context_features=C,
                                                               ordering=perm),
        "residual-batchnorm": lambda: MaskedAffineAutoregressive(D, 16, 5, use_residual_blocks=True,
                                                                 use_batch_norm=True),
        "nflows-layout": lambda: MaskedAffineAutoregressiveTransform(D, 16, context_features=C),
        "nflows-plain-batchnorm": lambda: MaskedAffineAutoregressiveTransform(D, 16, num_blocks=2,
                                                                              use_residual_blocks=False,
                                                                              use_batch_norm=True),
        "spline-residual": lambda: MaskedPiecewiseRationalQuadraticAutoregressive(D, 16, num_bins=5, tail_bound=3.0),
        "spline-plain-context": lambda: MaskedPiecewiseRationalQuadraticAutoregressive(
            D, 16, context_features=C, num_bins=4, use_residual_blocks=False, tail_bound=3.0, ordering=perm),
    }


def _made_of(transform):
    return transform.made if hasattr(transform, "made") else transform.autoregressive_net


def _incremental(transform, z, context):
    inverse = (sampling.affine_autoregressive_inverse if hasattr(transform, "made")
               else sampling.spline_autoregressive_inverse)
    return inverse(transform, z, context)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(_transforms()))
def test_incremental_inverse_equals_d_passes(name, dtype):
    torch.manual_seed(2)
    # 0.1: off the initialisation, yet scales stay away from nflows' 1e-3 floor, where the inverse is
    # ill-conditioned and any two summation orders drift apart (in both samplers alike).
    transform = perturb(_transforms()[name]().to(dtype), 0.1).eval()
    z = torch.randn(9, D, dtype=dtype)
    context = torch.randn(9, C, dtype=dtype) if _made_of(transform).context_features else None
    with torch.no_grad():
        x_naive, logdet_naive = transform.inverse_by_passes(z, context)
        x, logdet = _incremental(transform, z, context)
        z_back, _ = transform(x, context)
    # float64: the same parameters up to the order of sums (1e-15 relative, a few such steps deep);
    # float32: round-off, the same sums in float32.
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(x, x_naive, rtol=tol, atol=tol)
    torch.testing.assert_close(logdet, logdet_naive, rtol=tol, atol=tol)
    torch.testing.assert_close(z_back, z, rtol=tol, atol=tol)  # and it is the inverse
    assert x.abs().max() > 0.5  # a real inversion, not zeros


def test_incremental_inverse_ticks_once_per_feature():
    transform = perturb(MaskedAffineAutoregressive(D, 16, 2).double(), 0.1)
    ticks = []
    with sampling.reporting(lambda: ticks.append(1)), torch.no_grad():
        sampling.affine_autoregressive_inverse(transform, torch.randn(3, D, dtype=torch.float64))
    assert len(ticks) == D


def test_incremental_needs_eval_mode_for_dropout_and_batchnorm():
    transform = perturb(MaskedAffineAutoregressive(D, 16, 3, dropout_probability=0.3).double(), 0.1)
    z = torch.randn(4, D, dtype=torch.float64)
    assert "training mode" in sampling.made_incremental.incremental_unsupported(transform.made)
    with pytest.raises(ValueError, match="training mode"), torch.no_grad():
        sampling.affine_autoregressive_inverse(transform, z)
    calls = []
    with torch.no_grad():
        sampling.autoregressive_inverse(transform, z, None, naive=lambda *a: calls.append(a) or (z, None))
    assert len(calls) == 1  # the hook falls back to the D passes
    transform.eval()
    assert sampling.made_incremental.incremental_unsupported(transform.made) is None


def test_hook_keeps_autograd_and_honours_the_method():
    transform = perturb(MaskedAffineAutoregressive(D, 16, 2).double(), 0.1)
    z = torch.randn(4, D, dtype=torch.float64)

    def naive(inputs, context):
        return ("naive",)

    assert sampling.autoregressive_inverse(transform, z, None, naive) == ("naive",)  # parameters need a graph
    with torch.no_grad():
        x, _ = sampling.autoregressive_inverse(transform, z, None, naive)
        assert isinstance(x, torch.Tensor)
        with sampling.autoregressive_method(transform, "naive"):
            assert sampling.autoregressive_inverse(transform, z, None, naive) == ("naive",)
        assert "inverse_method" not in transform.__dict__  # restored
    with pytest.raises(ValueError, match="method must be one of 'incremental', 'naive'"):
        with sampling.autoregressive_method(transform, "cached"):
            pass


def test_incremental_refuses_masks_outside_the_degree_rule():
    transform = MaskedAffineAutoregressive(D, 16, 2).double()
    made = transform.made
    order = torch.argsort(made.hidden_degrees[0])
    made.input_layer.mask[order[0], D - 1] = True  # a degree-1 unit reading the last feature
    with pytest.raises(ValueError, match="degree rule"), torch.no_grad():
        sampling.affine_autoregressive_inverse(transform, torch.randn(2, D, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# Whole models: MAF and the autoregressive NSF, several layers and orderings
# ------------------------------------------------------------------------------------------------


def test_transform_inverse_is_incremental_without_a_graph(monkeypatch):
    """``inverse`` of the MADE-based transforms: the incremental scheme where no graph is needed, the
    D passes (``inverse_by_passes``, differentiable) where autograd needs them."""
    real, calls = sampling.made_incremental.incremental_made_inverse, []
    monkeypatch.setattr(sampling.made_incremental, "incremental_made_inverse",
                        lambda *args: calls.append(1) or real(*args))
    for name in ("plain-context", "nflows-layout", "spline-plain-context"):
        torch.manual_seed(3)
        transform = perturb(_transforms()[name]().double(), 0.1).eval()
        z, context = torch.randn(5, D, dtype=torch.float64), torch.randn(5, C, dtype=torch.float64)
        calls.clear()
        with torch.no_grad():
            x, logdet = transform.inverse(z, context)
            x_passes, logdet_passes = transform.inverse_by_passes(z, context)
        assert len(calls) == 1, name
        # float64: the same parameters up to the order of sums (see test_incremental_inverse_equals_d_passes)
        torch.testing.assert_close(x, x_passes, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logdet, logdet_passes, rtol=1e-12, atol=1e-12)
        x_graph, _ = transform.inverse(z, context)  # parameters require grad: the passes, under autograd
        assert len(calls) == 1 and x_graph.requires_grad, name
        assert torch.equal(x_graph.detach(), x_passes)


MODEL_BUILDS = {
    "maf": lambda: MAF([6], num_layers=3, hidden=12),  # natural / reversed / natural orderings
    "maf-random-context": lambda: MAF([6], num_layers=3, hidden=12, permutation="random", context_features=2,
                                      scale="sigmoid"),
    "maf-residual": lambda: MAF([6], num_layers=2, hidden=12, num_hidden=3, residual=True, scale="softplus"),
    "nsf-autoregressive": lambda: NSF([6], kind="autoregressive", num_layers=2, hidden=12, num_bins=4),
    "nsf-autoregressive-context": lambda: NSF([6], kind="autoregressive", num_layers=2, hidden=12, num_bins=4,
                                              context_features=2, num_blocks=1),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(MODEL_BUILDS))
def test_models_sample_the_same_with_either_method(name, dtype):
    torch.manual_seed(0)
    model = perturb(MODEL_BUILDS[name]().to(dtype), 0.1).eval()
    context = torch.randn(3, 2, dtype=dtype) if model.context_features else None
    draws = {}
    for method in ("naive", "incremental"):
        torch.manual_seed(11)
        draws[method] = model.sample(4, context, method=method)
    # float64: one base draw, then the same inverse up to the order of sums in each layer. float32: the
    # same sums rounded in float32; through two or three layers of splines (slopes up to ~10 here) the
    # samples measured up to 3.5e-6 apart (worst of 5 seeds, 50 samples each), so 2e-5.
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(draws["incremental"], draws["naive"], rtol=tol, atol=tol)
    assert draws["incremental"].shape == ((3, 4, 6) if context is not None else (4, 6))
    assert not draws["incremental"].requires_grad  # the fast default builds no graph
    assert draws["naive"].requires_grad  # the reference runs under the caller's grad mode
    torch.manual_seed(11)
    assert torch.equal(model.sample(4, context), draws["incremental"])  # the default is the incremental sampler
    ticks = []
    with sampling.reporting(lambda: ticks.append(1)):
        model.sample(2, context, method="incremental")
    assert len(ticks) == sampling.sequential_steps(model) == 6 * sum(
        1 for m in model.modules() if m.__class__.__name__ == "MADE")
    with pytest.raises(ValueError, match="method must be one of 'incremental', 'naive'"):
        model.sample(2, context, method="cached")


def test_coupling_nsf_takes_the_method_and_samples_alike():
    """The coupling kind inverts in one pass per layer: ``method`` is accepted and changes nothing."""
    torch.manual_seed(0)
    model = perturb(NSF([4], num_layers=2, hidden=8, num_bins=3).double(), 0.1).eval()
    draws = []
    for method in ("naive", "incremental"):
        torch.manual_seed(5)
        draws.append(model.sample(3, method=method))
    assert torch.equal(draws[0].detach(), draws[1]) and sampling.sequential_steps(model) == 0


# ------------------------------------------------------------------------------------------------
# `fastdensity sample` on MAF / NSF checkpoints: the incremental sampler, a progress bar, a PNG
# ------------------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self):  # tqdm shows its bar on terminals only
        return True


@pytest.mark.parametrize("model,options", [("maf", []), ("nsf", ["--set", "kind=autoregressive"])])
def test_sample_command_uses_the_incremental_sampler_with_a_progress_bar(tmp_path, monkeypatch, capsys, model,
                                                                         options):
    from fastdensity import cli
    from fastdensity.commands.sample import sample_checkpoint

    code = cli.main(["train", "--model", model, "--data", "digits", "--steps", "2", "--batch-size", "16",
                     "--out", str(tmp_path), "--set", "hidden=8", "--set", "num_layers=2", *options,
                     "--no-progress", "--no-plots"])
    assert code == 0, capsys.readouterr().err
    real, calls = sampling.made_incremental.incremental_made_inverse, []
    monkeypatch.setattr(sampling.made_incremental, "incremental_made_inverse",
                        lambda *args: calls.append(1) or real(*args))
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    out = sample_checkpoint(str(tmp_path), 5, str(tmp_path / "s.png"), progress=True)
    monkeypatch.undo()
    assert len(calls) == 2  # one incremental inversion per autoregressive layer
    bar = terminal.getvalue()
    # 64 features x 2 layers (tqdm redraws at most every 0.1 s, so the last count shown varies)
    assert f"sampling {model}" in bar and "/128 [" in bar and "feature/s" in bar
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# The growth-curve plot reads harness rows only
# ------------------------------------------------------------------------------------------------


def test_plot_reads_the_newest_curve_rows():
    from fastdensity.benchmarks import bench_sampling, plot_sampling

    def row(shape, provider, median, date):
        return {"op": bench_sampling.OP_PIXELCNN, "shape": shape, "provider": provider, "mode": "forward",
                "dtype": "float32", "device": "CPU x", "median_ms": str(median), "p20_ms": str(median * 0.9),
                "p80_ms": str(median * 1.1), "date": date}

    b = bench_sampling.CURVE_BATCH
    rows = [row(f"1x8x8 B={b} kernel_size=7", "eager", 10.0, "2026-01-01"),
            row(f"1x8x8 B={b} kernel_size=7", "eager", 12.0, "2026-01-02"),  # newer run wins
            row(f"1x16x16 B={b} kernel_size=7", "eager", 150.0, "2026-01-02"),
            row(f"1x16x16 B={b} kernel_size=7", "fastdensity", 4.0, "2026-01-02"),
            row("1x28x28 B=16", "eager", 1e5, "2026-01-02")]  # not a curve case
    points = plot_sampling.curve_points(rows)
    assert points["eager"] == [(64, 12.0, 12.0 * 0.9, 12.0 * 1.1), (256, 150.0, 135.0, 165.0)]
    assert [p[0] for p in points["fastdensity"]] == [256]
