"""Sampling whole autoregressive models: the fast samplers against the naive ones (``fastdensity bench --op sampling``).

One call draws a batch of B samples from a fixed model (``forward`` mode only: sampling has no
backward). Providers:

==============================  ===================================================================
provider                        what runs
==============================  ===================================================================
fastdensity                     the default sampler: ``PixelCNN.sample(B)`` (cached, each activation
                                once) or the MAF's incremental inverse (each MADE unit once), through
                                :mod:`fastdensity.sampling`
eager                           the naive reference sampler: the whole PixelCNN per pixel (H * W
                                passes), D MADE passes per MAF transform (nflows' scheme)
compiled                        the naive sampler with the network ``torch.compile``'d (PixelCNN's
                                ``network``, each MADE's ``forward``): what a user would try first
fastdensity_window              PixelCNN only: fastdensity's previous sampler, the network on each
                                pixel's window
nflows, zuko                    MAF only: the peers' MAF of the same size sampling as they do (D
                                passes)
fastdensity.accelerate[nflows]  MAF only: that nflows MAF after ``fastdensity.accelerate``, whose MADE
                                transforms then invert incrementally (each unit once) under the
                                ``no_grad`` the peers sample in
fastdensity.accelerate[zuko]    MAF only: the same for zuko's MAF
==============================  ===================================================================

All run under the run's backend (on CPU, the reference ops). Cases:

* ``sample_pixelcnn`` at the issue's target: the default architecture (k = 7, F = 32, 4 blocks,
  K = 5, 256 levels) on 1x28x28 images, B = 16;
* ``sample_pixelcnn`` for the growth curve: the same network (k = 7 at every size) on 1xSxS for
  S = 8, 16, 24, 32, B = 4 (``benchmarks/plot_sampling.py`` draws the curve). At B = 1 a CPU pass of
  the network costs about the same at every one of these sizes (per-layer overhead, not pixels), which
  hides the naive sampler's quadratic growth; at B = 16 its 32x32 point alone would take ~25 minutes;
* ``sample_maf``: MAF with D = 64, 5 transforms of two hidden layers of 128 (the peers' size, nflows'
  sigmoid scale, no ActNorm, as in ``bench_models``) at B = 256 and 1024.

``--quick`` shrinks every case to seconds. The naive samplers are slow by design: a full CPU run of
this module takes on the order of 20 minutes (the 28x28 naive point alone ~10), so give it
``--budget`` or ``--provider`` to trim.
"""
from __future__ import annotations

import copy

import torch

from .cases import Case, Provider, Runner, Settings, peer_pair

OP_PIXELCNN, OP_MAF = "sample_pixelcnn", "sample_maf"

#: the growth curve's image sizes (S x S) and batch
CURVE_SIZES, CURVE_BATCH = (8, 16, 24, 32), 4


def _token(settings: Settings):
    """The cases' one input: a non-zero placeholder (sampling reads nothing; the harness rotates inputs)."""
    return lambda: (torch.ones(1, device=settings.device),)


def _providers(build_model, fast, naive, compile_model, extra=()) -> list[Provider]:
    """fastdensity / eager / compiled (+ extra) over one shared model built on first use."""
    state: dict = {}

    def model():
        if "model" not in state:
            state["model"] = build_model()
        return state["model"]

    def runner(draw):
        def build():
            m = model()
            return Runner(lambda _token: draw(m))

        return build

    def compiled_runner():
        m = compile_model(copy.deepcopy(model()))  # its own copy: the others keep the eager network
        return Runner(lambda _token: naive(m))

    return [Provider("fastdensity", runner(fast)), Provider("eager", runner(naive)),
            Provider("compiled", compiled_runner, compiles=True, compile_reserve_s=60.0),
            *[Provider(name, runner(draw)) for name, draw in extra]]


# --------------------------------------------------------------------------------------------------
# PixelCNN
# --------------------------------------------------------------------------------------------------


def _pixelcnn_case(settings: Settings, size: int, batch: int, config: dict, window: bool = False) -> Case:
    shape = (1, size, size)

    def build():
        from fastdensity.models import PixelCNN

        torch.manual_seed(0)
        return PixelCNN(shape, levels=256, **config).to(settings.device).eval()

    def compile_network(m):
        m.network = torch.compile(m.network, dynamic=False)  # instance attribute: the naive loop calls it
        return m

    extra = [("fastdensity_window", lambda m: m.sample(batch, method="window"))] if window else []
    label = " ".join(f"{k}={v}" for k, v in config.items())
    return Case(
        op=OP_PIXELCNN,
        shape=f"1x{size}x{size} B={batch}" + (f" {label}" if label else ""),
        dtype=torch.float32,
        make_inputs=_token(settings),
        providers=_providers(build, lambda m: m.sample(batch, method="cached"),
                             lambda m: m.sample(batch, method="naive"), compile_network, extra),
        modes=("forward",),
    )


# --------------------------------------------------------------------------------------------------
# MAF
# --------------------------------------------------------------------------------------------------


def _maf_case(settings: Settings, d: int, layers: int, hidden: int, batch: int) -> Case:
    def build():
        from fastdensity.models import MAF

        torch.manual_seed(0)
        m = MAF([d], num_layers=layers, hidden=hidden, num_hidden=2, scale="sigmoid", actnorm=False)
        with torch.no_grad():  # off the zero-initialised output layers, so the inverses do real work
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        return m.to(settings.device).eval()

    def sample(method):
        return lambda m: _maf_sample(m, method, batch)

    def compile_mades(m):
        from fastdensity.nn.made import MADE

        for made in m.modules():
            if isinstance(made, MADE):
                made.forward = torch.compile(made.forward, dynamic=False)
        return m

    def nflows_flow():
        from nflows.distributions.normal import StandardNormal
        from nflows.flows.base import Flow
        from nflows.transforms import CompositeTransform
        from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform
        from nflows.transforms.permutations import ReversePermutation

        transforms = []
        for k in range(layers):
            transforms.append(MaskedAffineAutoregressiveTransform(d, hidden, num_blocks=1, use_residual_blocks=False))
            if k < layers - 1:
                transforms.append(ReversePermutation(d))
        return Flow(CompositeTransform(transforms), StandardNormal([d])).to(settings.device).eval()

    def zuko_flow():
        import zuko

        return zuko.flows.MAF(d, transforms=layers, hidden_features=(hidden, hidden)).to(settings.device).eval()

    providers = _providers(build, sample("incremental"), sample("naive"), compile_mades)
    # the peers sample as they do (D passes), their accelerated twins incrementally; all under no_grad
    providers += peer_pair("nflows", nflows_flow, lambda f: Runner(lambda _token: _no_grad(lambda: f.sample(batch))))
    providers += peer_pair("zuko", zuko_flow, lambda f: Runner(lambda _token: _no_grad(lambda: f().sample((batch,)))))
    return Case(
        op=OP_MAF,
        shape=f"D={d} L={layers} H={hidden} B={batch}",
        dtype=torch.float32,
        make_inputs=_token(settings),
        providers=providers,
        modes=("forward",),
    )


def _maf_sample(model, method: str, batch: int) -> torch.Tensor:
    """``model.sample(batch, method=method)``: ``"incremental"`` (the default) or ``"naive"``, both without
    autograd (the naive sampler keeps the caller's grad mode, and a graph over D passes would be charged
    to it; the peers sample under ``no_grad`` too)."""
    return _no_grad(lambda: model.sample(batch, method=method))


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def cases(settings: Settings) -> list[Case]:
    if settings.quick:
        small = {"hidden": 8, "num_blocks": 1, "num_mixtures": 2, "kernel_size": 3}
        return [_pixelcnn_case(settings, 6, 2, small, window=True), _maf_case(settings, 8, 2, 16, 64)]
    out = [_pixelcnn_case(settings, 28, 16, {}, window=True)]
    out += [_pixelcnn_case(settings, s, CURVE_BATCH, {"kernel_size": 7}) for s in CURVE_SIZES]
    out += [_maf_case(settings, 64, 5, 128, b) for b in (256, 1024)]
    return out
