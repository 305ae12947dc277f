"""TarFlow: a training step (fastdensity vs the eager reference vs torch.compile), and sampling (the KV-cached
inverse vs the uncached one, and the Jacobi sampler).

Training step (op ``train_step_tarflow``): ``loss = -log_prob(x).mean()`` and its gradients with respect to
every parameter, as in :mod:`.bench_models`; providers ``fastdensity`` (the model with fastdensity's fused
affine op, the Triton kernel; GPU only), ``eager`` (the same model under the reference backend) and
``compiled`` (``torch.compile`` of the eager step). Attention is ``scaled_dot_product_attention`` in all
three, so the fastdensity / eager gap is the affine step's share of the step: expect a small one.

* GPU: ImageNet-64-like, batch 64 of 3x64x64 images, patch 4: T = 256 tokens of 48 values; 4 blocks of
  2 layers, width 256, 4 heads;
* CPU: batch 16 of 3x16x16, patch 2 (T = 64 tokens of 12); 2 blocks of 2 layers, width 64
  (quick: batch 8 of 1x8x8, T = 16).

Sampling (op ``sample_tarflow``, forward mode only, under ``no_grad``): inverting every block of a model
from noise z [n, D] to images, at T = 256 tokens. Providers:

=====================  ================================================================================
fastdensity            ``from_noise(z, method="kv_cache")``: one transformer step per token, attending over
                       cached keys and values (backend auto: the affine kernel on a GPU)
eager                  ``method="naive"``: the uncached reference inverse, the transformer re-run over the
                       whole prefix for every token (backend reference)
fastdensity_jacobi     ``method="jacobi"`` with the default threshold (1e-4): parallel fixed-point passes.
                       Its iteration count depends on the weights; these are random (a small perturbation
                       of the zero output layers), so its figure is indicative only
compiled               unavailable: a token-by-token loop of T steps is not a torch.compile target (it
                       would unroll, or recompile for every cache length)
=====================  ================================================================================

* GPU: 16 samples of 3x64x64, patch 4 (T = 256 tokens of 48); the training case's 4 x 2 layers, width 256;
* CPU: 16 samples of 1x32x32, patch 2 (T = 256 tokens of 4); 2 blocks of 1 layer, width 64
  (quick: T = 64, 1x16x16, width 32).

What the cache saves is compute: about T / 2 times fewer token passes. On a CPU a single-token step is
dominated by per-call overhead (~25 small ops), so the measured ratio grows with the work per token
and shrinks when other jobs preempt those small calls. The CPU case's harness rows on the 2-core
development machine, one thread (2026-12-03): KV-cached 347 ms, uncached 8339 ms, 24x (load ~15 from
other jobs); 10.5x in a run at load ~20; with the value spline (``spline=32``, an idle machine) 167.9 ms
against 3709 ms, 22x, and the Jacobi sampler 198.1 ms. The quick case (T = 64, batch 4, width 32) measured only 1.9x
(40 ms against 75): at that size a whole-prefix pass costs little more than one token, and every step
is overhead.

No GB/s for either: a model has no single minimum-traffic figure.
"""
from __future__ import annotations

import torch

from .harness import Case, Provider, Runner, Settings, Unavailable, op_providers, randn

OP = "tarflow"


def _unavailable() -> str | None:
    try:
        from fastdensity.models import MODELS
    except ImportError:
        return "fastdensity.models is not in this build"
    return None if "tarflow" in MODELS else "fastdensity.models has no 'tarflow' model in this build"


def _build(settings: Settings, shape, config: dict, perturb: bool) -> torch.nn.Module:
    from fastdensity.models import build_model

    model = build_model("tarflow", shape, **config).to(settings.device)
    if perturb:
        # The output layers start at zero (each block the identity): give them small random weights so the
        # samplers invert a map that is not trivially the identity (their cost is the same either way).
        with torch.no_grad():
            for block in model.blocks:
                block.proj_out.weight.normal_(std=1e-2)
    return model.eval()


def _label(shape, batch: int, config: dict, tokens: int) -> str:
    """The case's shape column; ``spline=K`` when the model has a value spline (the default since
    2026-12-03: rows without it are of the model before)."""
    import inspect

    from fastdensity.models import TarFlow

    spline = config.get("spline_bins", inspect.signature(TarFlow).parameters["spline_bins"].default)
    dims = "x".join(map(str, shape))
    return (f"{dims} B={batch} p={config['patch_size']} T={tokens} blocks={config['num_blocks']}x"
            f"{config['layers_per_block']} W={config['width']}" + (f" spline={spline}" if spline else ""))


def _tokens(shape, patch: int) -> int:
    return (shape[1] // patch) * (shape[2] // patch)


def _train_case(settings: Settings, shape, batch: int, config: dict) -> Case:
    state: dict = {}

    def setup():
        if "model" not in state:
            state["model"] = _build(settings, shape, config, perturb=False).train()

    def step(x):
        return -state["model"].log_prob(x).mean()

    providers = op_providers(step, settings.device, "coupling", setup=setup, compile_reserve_s=90.0,
                             wrt=lambda inputs: list(state["model"].parameters()))
    if settings.quick:  # compiling a whole model takes minutes on a CPU
        providers = [p for p in providers if not p.compiles]
    return Case(
        op="train_step_tarflow",
        shape=_label(shape, batch, config, _tokens(shape, config["patch_size"])),
        dtype=torch.float32,
        make_inputs=lambda: (randn((batch, *shape), settings, torch.float32, grad=False),),
        providers=providers,
        unavailable=_unavailable(),
    )


def _sample_case(settings: Settings, shape, batch: int, config: dict) -> Case:
    state: dict = {}

    def sampler(method: str):
        def build():
            if "model" not in state:
                state["model"] = _build(settings, shape, config, perturb=True)
            model = state["model"]
            return Runner(lambda z: model.from_noise(z, method=method))

        return build

    def not_compiled():
        raise Unavailable("a token-by-token sampling loop is not a torch.compile target (it would unroll T steps "
                          "or recompile for every cache length)")

    dim = shape[0] * shape[1] * shape[2]
    return Case(
        op="sample_tarflow",
        shape=_label(shape, batch, config, _tokens(shape, config["patch_size"])),
        dtype=torch.float32,
        make_inputs=lambda: (randn((batch, dim), settings, torch.float32, grad=False),),
        providers=[Provider("fastdensity", sampler("kv_cache"), backend="auto"),
                   Provider("eager", sampler("naive"), backend="reference"),
                   Provider("fastdensity_jacobi", sampler("jacobi"), backend="auto"),
                   Provider("compiled", not_compiled, backend="reference", compiles=True)],
        modes=("forward",),
        unavailable=_unavailable(),
    )


def cases(settings: Settings) -> list[Case]:
    if settings.cuda:
        big = {"patch_size": 4, "num_blocks": 4, "layers_per_block": 2, "width": 256, "heads": 4}
        return [_train_case(settings, (3, 64, 64), 64, big), _sample_case(settings, (3, 64, 64), 16, big)]
    if settings.quick:
        train = {"patch_size": 2, "num_blocks": 2, "layers_per_block": 1, "width": 32, "heads": 2}
        sample = {"patch_size": 2, "num_blocks": 2, "layers_per_block": 1, "width": 32, "heads": 2}
        return [_train_case(settings, (1, 8, 8), 8, train), _sample_case(settings, (1, 16, 16), 4, sample)]
    train = {"patch_size": 2, "num_blocks": 2, "layers_per_block": 2, "width": 64, "heads": 4}
    sample = {"patch_size": 2, "num_blocks": 2, "layers_per_block": 1, "width": 64, "heads": 4}
    return [_train_case(settings, (3, 16, 16), 16, train), _sample_case(settings, (1, 32, 32), 16, sample)]
