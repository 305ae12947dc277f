"""What a benchmark is made of: cases, the providers they compare, and the helpers bench modules build them with.

A **case** is one op (or one model's training step) at one shape and dtype. It builds a fresh set of
inputs on demand and lists its **providers** - the implementations it compares:

=============  =====================================================================================
provider       what runs
=============  =====================================================================================
fastdensity    the public op (or module) under ``fastdensity.set_backend("triton")``: the Triton
               kernels. CUDA only - on CPU it is reported as unavailable, never run interpreted.
eager          the same call under ``set_backend("reference")``: the pure-PyTorch reference.
compiled       ``torch.compile`` of that same reference call (one compiled callable per function,
               shared by every shape, dtype and mode, so each graph compiles once; static shapes,
               one graph per shape, as a training loop with fixed shapes compiles it).
<peer>         what a user would run instead: nflows, zuko, normflows layers and flows; cuDNN dense
               convolution and a PixelCNN++-style shifted/cropped convolution for masked conv;
               cuBLAS dense matmul for masked linear. Reported as unavailable where not installed.
=============  =====================================================================================

Each (case, provider) is measured in the :data:`MODES` (see :mod:`.measure`). A case's ``min_bytes``
is the op's minimum traffic per mode - every input read once, every output written once - which
:mod:`.measure` divides by the median time to give GB/s; :func:`traffic` builds it from the two passes.
Nothing here measures, schedules or writes anything.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "MODES", "Unavailable", "Runner", "Provider", "Case", "Settings", "traffic", "element_size", "randn",
    "dtype_name", "op_unavailable", "op_providers", "compiled", "peer", "peer_pair", "backend_context",
]

MODES = ("forward", "backward", "forward+backward")


class Unavailable(Exception):
    """A provider (or a whole case) that cannot run here; the message says why."""


@dataclass
class Runner:
    """What a provider runs: ``fn(*inputs)`` returns a tensor or a tuple of tensors.

    ``wrt(inputs)`` lists the tensors gradients are taken with respect to (the model's parameters,
    say); by default, the inputs that require grad.
    """

    fn: Callable[..., Any]
    wrt: Callable[[Sequence[Any]], list[torch.Tensor]] | None = None

    def grad_targets(self, inputs: Sequence[Any]) -> list[torch.Tensor]:
        if self.wrt is not None:
            return list(self.wrt(inputs))
        return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


@dataclass
class Provider:
    """One implementation to compare. ``build()`` returns a :class:`Runner` or raises :class:`Unavailable`.

    ``backend`` is the fastdensity backend in force while it runs (None: leave it alone). Providers
    with ``compiles=True`` are scheduled after the others of their op, so that compile time, the
    largest unknown, cannot crowd out the fastdensity and eager figures when a time budget runs out;
    they start only while ``compile_reserve_s`` (or the run's default) is left of the op's budget.
    """

    name: str
    build: Callable[[], Runner]
    backend: str | None = None
    compiles: bool = False
    compile_reserve_s: float | None = None


@dataclass
class Case:
    """One op or model at one shape and dtype.

    ``make_inputs()`` returns one fresh input set on the device (tensors that should receive
    gradients already require them). ``min_bytes`` maps a mode to the op's minimum traffic in bytes
    for it; a mode without an entry gets no GB/s. ``unavailable`` marks a case whose op is not in
    this build of fastdensity (reported, not run).
    """

    op: str
    shape: str
    dtype: torch.dtype
    make_inputs: Callable[[], tuple]
    providers: list[Provider]
    min_bytes: dict[str, float] = field(default_factory=dict)
    modes: tuple[str, ...] = MODES
    unavailable: str | None = None


@dataclass
class Settings:
    """What a bench module builds its cases for."""

    device: torch.device
    quick: bool = False
    dtypes: tuple[torch.dtype, ...] | None = None  # None: each case's own defaults

    def pick_dtypes(self, defaults: Iterable[torch.dtype]) -> list[torch.dtype]:
        return list(self.dtypes) if self.dtypes else list(defaults)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def traffic(forward: float, backward: float) -> dict[str, float]:
    """A case's ``min_bytes``: each pass's minimum bytes, forward + backward being their sum."""
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def randn(shape, settings: Settings, dtype: torch.dtype, *, grad: bool = True, scale: float = 1.0) -> torch.Tensor:
    """A standard-normal input (times ``scale``) on the settings' device; a leaf requiring grad if ``grad``."""
    t = (torch.randn(shape, device=settings.device, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(grad)


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``: how tables and the results CSV name a dtype."""
    return str(dtype).replace("torch.", "")


def op_unavailable(name: str) -> str | None:
    """Why ``fastdensity.ops.<name>`` cannot be benchmarked (not in this build), or None."""
    from fastdensity import ops

    return None if callable(getattr(ops, name, None)) else f"fastdensity.ops.{name} is not in this build"


def backend_context(name: str | None):
    """``fastdensity.set_backend(name)`` as a context manager, or nothing for ``None``."""
    if name is None:
        return contextlib.nullcontext()
    import fastdensity

    return fastdensity.set_backend(name)


# --------------------------------------------------------------------------------------------------
# Providers shared by the bench modules
# --------------------------------------------------------------------------------------------------

_COMPILED: dict[Any, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, one per function object, so every shape, dtype and mode share its cache."""
    if fn not in _COMPILED:
        cfg = torch._dynamo.config
        # Several shapes and dtypes per function are expected; past the limit dynamo would silently
        # fall back to eager and the "compiled" figures would be eager ones.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        # The backward mode replays one retained graph (retain_graph=True), which AOTAutograd refuses
        # for a backward compiled with donated buffers; without them the compiled code is the same
        # but may hold its saved tensors a little longer. Read when a graph compiles: set it before.
        import torch._functorch.config as functorch_cfg

        if hasattr(functorch_cfg, "donated_buffer"):
            functorch_cfg.donated_buffer = False
        # dynamic=False: a static graph per shape, what a training loop with fixed shapes gets. By
        # default the second shape of a function would recompile it for any size, and the later
        # cases would time that generic code, which can be slower than the specialised one.
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def _kernel_check(device: torch.device, kernel: str) -> None:
    if device.type != "cuda":
        raise Unavailable("Triton kernels need a GPU (not benchmarked through the CPU interpreter)")
    from fastdensity import backend

    try:
        with backend.set_backend("triton"):
            backend.use_kernels(torch.empty(0, device=device), kernel)
    except RuntimeError as exc:
        raise Unavailable(str(exc)) from None


def op_providers(fn: Callable, device: torch.device, kernel: str, *, wrt=None, setup: Callable[[], None] | None = None,
                 compile_reserve_s: float | None = None, fastdensity_backend: str = "triton") -> list[Provider]:
    """fastdensity / eager / compiled for a call ``fn(*inputs)`` of a public op or module.

    ``kernel`` is the kernel module the op dispatches to (``backend.use_kernels(x, kernel)``).
    ``setup()``, if given, runs when a provider is built, before ``fn`` is first called (a layer or
    model that ``fn`` uses is constructed there, so that torch.compile never traces a constructor).
    ``fastdensity_backend`` is "triton" (the kernels) or "auto" for an op whose CUDA path chooses
    among implementations (masked conv's dispatcher): what a user of the op gets.
    """
    def runner(f):
        def build():
            if setup is not None:
                setup()
            return Runner(f, wrt)

        return build

    def kernels():
        _kernel_check(device, kernel)
        return runner(fn)()

    return [
        Provider("fastdensity", kernels, backend=fastdensity_backend),
        Provider("eager", runner(fn), backend="reference"),
        Provider("compiled", lambda: runner(compiled(fn))(), backend="reference", compiles=True,
                 compile_reserve_s=compile_reserve_s),
    ]


def peer(name: str, module: str, build: Callable[[], Runner]) -> Provider:
    """A peer library's provider, unavailable (with the pip name) when ``module`` is not installed."""
    def checked():
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"{module} is not installed (pip install {module})")
        return build()

    return Provider(name, checked)


def peer_pair(library: str, make_flow: Callable[[], Any], runner: Callable[[Any], Runner], *,
              twin_backend: str | None = None) -> list[Provider]:
    """The peer library's provider and its accelerated twin, ``fastdensity.accelerate[<library>]``, timing
    ``runner(flow)``: one flow, built once (seeded 0, the global RNG restored after) when the first of the
    two is built; the twin times a deep copy of it after ``fastdensity.accelerate`` (an error when that
    replaces nothing), so both start from the same weights. ``twin_backend``: the twin's fastdensity
    backend (None: the run's)."""
    import copy

    state: dict = {}

    def flow():
        if "flow" not in state:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                state["flow"] = make_flow()
        return state["flow"]

    def accelerated():
        import fastdensity

        model = copy.deepcopy(flow())
        report = fastdensity.accelerate(model)
        if not report.replaced:
            raise RuntimeError(f"fastdensity.accelerate replaced nothing in the {library} flow:\n{report}")
        return runner(model)

    twin = peer(f"fastdensity.accelerate[{library}]", library, accelerated)
    twin.backend = twin_backend
    return [peer(library, library, lambda: runner(flow())), twin]
