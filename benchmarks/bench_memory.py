"""Backprop by inversion: training steps with ``memory="store"`` against ``memory="invert"`` (issue 15).

A step is the flow's negative log-likelihood and its gradients with respect to every parameter, as in
:mod:`.bench_models`. Each case times the same weights both ways, and every row carries the bytes the
forward pass leaves saved for backward (``saved_mb``, counted with ``saved_tensors_hooks`` on any device;
see :func:`.measure.saved_bytes`) and, on CUDA, the step's peak allocated memory (``peak_mem_mb``).

=====================  ============================================================================
provider               what runs
=====================  ============================================================================
fastdensity            GPU: ``memory="store"``, the fused kernels (backend auto)
fastdensity_invert     GPU: ``memory="invert"``, the same kernels
eager                  CPU: ``memory="store"``, the reference path (what fastdensity runs on a CPU)
eager_invert           CPU: ``memory="invert"``
=====================  ============================================================================

Cases (the issue's sizes; quick runs shrink them):

* ``memory_coupling_stack``: 32 Glow steps (ActNorm, InvConv1x1, affine coupling whose conditioner is
  3x3 conv -> residual block -> 3x3 conv, 64 channels wide) on x [64, 12, 16, 16], one run of 96
  transforms, standard-normal base;
* ``memory_glow``: ``Glow([3, 32, 32], num_steps=16, num_scales=3)``, batch 64 (levels of 1 + 48
  transforms between learned-prior splits).

Targets (issue 15): saved bytes with invert at most 1/8 of store's; step time at most 1.5x store's on
CPU, 1.35x on a GPU. ``python -m fastdensity.benchmarks.bench_memory --largest-batch`` (CUDA) finds the
largest batch whose training step fits a memory budget, for each mode: the issue asks for 4x.
"""
from __future__ import annotations

import argparse
import copy
import math

import torch
from torch import nn

from .harness import Case, Provider, Runner, Settings, randn
from .measure import peak_memory_mb

OP = "memory"


class _Stack(nn.Module):
    """A CompositeTransform of Glow steps on examples of ``shape`` = [C, H, W] under a standard-normal
    base: ``log_prob(x) -> [B]``."""

    def __init__(self, shape, steps: int, hidden: int):
        super().__init__()
        self.shape = tuple(shape)
        channels = self.shape[0]
        from fastdensity import nn as fnn
        from fastdensity.distributions import StandardNormal
        from fastdensity.models.base import ConvNet
        from fastdensity.models.realnvp import channel_mask

        layers = []
        for _ in range(steps):
            layers += [fnn.ActNorm(channels), fnn.InvConv1x1(channels),
                       fnn.AffineCoupling(channel_mask(channels, 0), lambda i, o: ConvNet(i, o, hidden, 1))]
        self.flow = fnn.CompositeTransform(layers)
        self.base = StandardNormal(self.shape)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, logdet = self.flow(x)
        return self.base.log_prob(z) + logdet

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        self.train()
        self.log_prob(x)


def _build(kind: str, shape, config: dict) -> nn.Module:
    if kind == "stack":
        return _Stack(shape, config["steps"], config["hidden"])
    from fastdensity.models import build_model

    return build_model(kind, shape, **config)


def _perturb_couplings(model: nn.Module, generator: torch.Generator) -> None:
    """Small weights in the zero-initialised last layers: a coupling that is exactly the identity would
    make the rebuild trivial (the timing is the same either way; the drift check is not)."""
    from fastdensity.models.base import ConvNet

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ConvNet):
                m.last.weight.copy_(1e-3 * torch.randn(m.last.weight.shape, generator=generator))


def _case(settings: Settings, op: str, kind: str, shape, batch: int, config: dict, label: str) -> Case:
    from fastdensity.nn.invertible_memory import set_memory

    state: dict = {}

    def setup():
        if "store" not in state:
            torch.manual_seed(0)
            model = _build(kind, shape, config).to(settings.device)
            _perturb_couplings(model, torch.Generator().manual_seed(0))
            model.initialize(randn((batch, *shape), settings, torch.float32, grad=False))  # ActNorm, once
            invert = copy.deepcopy(model)
            set_memory(invert, "invert")
            state.update(store=model, invert=invert)

    def provider(name: str, memory: str, backend: str) -> Provider:
        def build():
            setup()
            model = state[memory]
            return Runner(lambda x: -model.log_prob(x).mean(), wrt=lambda inputs: list(model.parameters()))

        return Provider(name, build, backend=backend)

    if settings.cuda:
        providers = [provider("fastdensity", "store", "auto"), provider("fastdensity_invert", "invert", "auto")]
    else:
        providers = [provider("eager", "store", "reference"), provider("eager_invert", "invert", "reference")]
    return Case(op=op, shape=f"{'x'.join(map(str, shape))} B={batch} {label}", dtype=torch.float32,
                make_inputs=lambda: (randn((batch, *shape), settings, torch.float32, grad=False),),
                providers=providers)


def stack_case(settings: Settings, quick: bool = False) -> Case:
    shape, batch, steps, hidden = ((12, 8, 8), 8, 8, 16) if quick else ((12, 16, 16), 64, 32, 64)
    return _case(settings, "memory_coupling_stack", "stack", shape, batch, {"steps": steps, "hidden": hidden},
                 f"steps={steps} H={hidden}")


def glow_case(settings: Settings, quick: bool = False) -> Case:
    shape, batch, config = (((3, 16, 16), 8, {"num_steps": 4, "num_scales": 2, "hidden": 16}) if quick else
                            ((3, 32, 32), 64, {"num_steps": 16, "num_scales": 3}))
    label = f"levels={config['num_scales']}x{config['num_steps']}"
    return _case(settings, "memory_glow", "glow", shape, batch, config, label)


def cases(settings: Settings) -> list[Case]:
    return [stack_case(settings, settings.quick), glow_case(settings, settings.quick)]


# --------------------------------------------------------------------------------------------------
# The largest batch that fits a memory budget (CUDA)
# --------------------------------------------------------------------------------------------------


def largest_true(fits, start: int = 1, limit: int = 1 << 20) -> int:
    """The largest n in [start, limit] with ``fits(n)``, for a ``fits`` that holds up to some n and fails
    beyond (0 when ``fits(start)`` fails): doubling, then bisection - O(log n) calls."""
    if not fits(start):
        return 0
    good, bad = start, None
    while bad is None:
        n = min(2 * good, limit)
        if n == good:
            return good
        if fits(n):
            good = n
        else:
            bad = n
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def step_peak_bytes(model: nn.Module, batch: int, device: torch.device) -> float:
    """Peak bytes allocated by one training step (loss, backward into .grad) beyond what was allocated
    before it; inf when it runs out of memory."""
    shape = model.shape
    x = torch.randn(batch, *shape, device=device)
    for p in model.parameters():  # the gradients' memory is the model's, allocated before the step
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
    try:
        peak = peak_memory_mb(lambda: (-model.log_prob(x).mean()).backward(), device) * 2**20
    except torch.OutOfMemoryError:
        peak = math.inf
    x = None  # the batch is freed before the cache is emptied
    torch.cuda.empty_cache()
    return peak


def largest_batch(memory: str, budget_bytes: float, device: torch.device, config: dict | None = None) -> int:
    """The largest batch whose Glow 3x32x32 training step (default: 3 levels x 16 steps) peaks within
    ``budget_bytes`` of CUDA memory beyond the model, its gradients and the batch."""
    from fastdensity.models import build_model

    torch.manual_seed(0)
    model = build_model("glow", (3, 32, 32), **(config or {"num_steps": 16, "num_scales": 3}), memory=memory)
    model = model.to(device)
    model.initialize(torch.randn(16, 3, 32, 32, device=device))
    return largest_true(lambda b: step_peak_bytes(model, b, device) <= budget_bytes)


def _main() -> None:
    parser = argparse.ArgumentParser(description="Largest Glow 3x32x32 training batch in a CUDA memory budget, "
                                                 "memory='store' against memory='invert'")
    parser.add_argument("--largest-batch", action="store_true", required=True)
    parser.add_argument("--budget-gib", type=float, default=8.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA (on CPU, compare the saved_mb column of `fastdensity bench --op memory`)")
    device = torch.device("cuda")
    found = {m: largest_batch(m, args.budget_gib * 2**30, device) for m in ("store", "invert")}
    print(f"budget {args.budget_gib:g} GiB: largest batch store {found['store']}, invert {found['invert']} "
          f"({found['invert'] / max(found['store'], 1):.2f}x)")


if __name__ == "__main__":
    _main()
