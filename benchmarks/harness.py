"""The measuring core every benchmark module shares: cases, providers, timers, rotation, CSV rows.

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

Each (case, provider) is measured in three **modes**:

* ``forward``: the forward pass as it runs in training - inputs that require grad do, so autograd
  records what backward needs (that is part of the cost a user pays);
* ``backward``: gradients of every differentiable output (with a fixed random upstream gradient)
  with respect to every input that requires grad, or the parameters for layers and models, from a
  graph built beforehand (``torch.autograd.grad(..., retain_graph=True)``);
* ``forward+backward``: both, as one training step (without the optimizer update).

Figures per measurement, after warm-up (which also absorbs compilation and autotuning):

* median, 20th and 80th percentile time: ``triton.testing.do_bench`` on CUDA (CUDA events, L2
  flushed between calls; ``torch.backends.cudnn.benchmark`` on, so every convolution provider runs
  its fastest cuDNN algorithm); on CPU ``torch.utils.benchmark.Timer`` with all of torch's threads,
  the percentiles taken over blocks of calls (each block ~1 ms or one call);
* effective GB/s = the op's *minimum* bytes for the mode (stated in each bench module: every input
  read once, every output written once) / median time, and its share of the device-copy bandwidth
  measured in the same run (``device_copy`` row: a large ``copy_``, bytes read + written);
* peak memory: on CUDA, ``max_memory_allocated`` during one call minus what was allocated before
  it - the call's own footprint (outputs, saved activations, temporaries; not its inputs). PyTorch
  keeps no peak counter for CPU tensors, so on CPU the column is left empty rather than guessed.

Inputs are never zeros (builders draw random values, and :func:`check_inputs` rejects an all-zero
floating tensor). No call may find its inputs already cached: on CUDA ``do_bench`` flushes L2 before
every call, so one input set suffices; on CPU, when one input set is smaller than twice the
last-level cache, the harness builds several and rotates through them.

A time budget is shared among the ops, and within an op :data:`COMPILE_SHARE` of it is kept for
``torch.compile`` (see :func:`run_suite`). Results go to a CSV with the columns in
:data:`CSV_COLUMNS`, one row per measurement, appended as soon as it is taken (a run cut short keeps
what it measured). Only this module writes those files.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import gc
import io
import itertools
import math
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "MODES", "COMPILE_SHARE", "MAX_GRAPHS", "CSV_COLUMNS", "Unavailable", "Runner", "Provider", "Case", "Settings",
    "Timing", "Measurement", "Skip", "percentile", "timing_from_samples", "rotation_count", "check_inputs",
    "make_timer", "device_name", "device_slug", "last_level_cache_bytes", "run_metadata",
    "ResultsWriter", "read_rows", "op_providers", "compiled", "peer", "element_size", "randn", "op_unavailable",
    "traffic", "input_sets", "make_call", "backend_context", "run_suite",
]

MODES = ("forward", "backward", "forward+backward")

#: The part of each op's time budget kept for the providers that compile (see :func:`run_suite`).
COMPILE_SHARE = 0.4

#: The results file's columns, in order (issue 5). ``shape`` is a human-readable label of the case.
CSV_COLUMNS = (
    "op", "provider", "mode", "dtype", "shape", "device", "median_ms", "p20_ms", "p80_ms", "gbps",
    "bw_fraction", "peak_mem_mb", "torch", "triton", "commit", "date",
)


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
    with ``compiles=True`` are measured after the others of their op, so that compile time, the
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


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


@dataclass
class Measurement:
    case: Case
    provider: str
    mode: str
    timing: Timing
    gbps: float
    bw_fraction: float
    peak_mem_mb: float


@dataclass
class Skip:
    """A measurement that did not happen, and why (``kind``: unavailable, budget, oom, error)."""

    op: str
    shape: str
    dtype: str
    provider: str
    mode: str
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op} {self.shape} {self.dtype} {self.provider} {self.mode}: {self.kind} - {self.reason}"


# --------------------------------------------------------------------------------------------------
# Small pure helpers (tested directly)
# --------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be within [0, 100]; got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def timing_from_samples(samples_ms: Sequence[float]) -> Timing:
    return Timing(percentile(samples_ms, 50), percentile(samples_ms, 20), percentile(samples_ms, 80))


def rotation_count(set_bytes: int, cache_bytes: int, max_sets: int = 64) -> int:
    """How many input sets to rotate through so that together they exceed twice the cache."""
    if set_bytes <= 0:
        return max_sets
    return max(1, min(max_sets, math.ceil(2 * cache_bytes / set_bytes)))


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def check_inputs(inputs: Sequence[Any], where: str) -> None:
    """Reject an all-zero floating-point input: zeros make many kernels trivially fast."""
    for i, t in enumerate(_tensors(inputs)):
        if t.is_floating_point() and t.numel() > 0 and not bool(t.detach().ne(0).any()):
            raise ValueError(f"{where}: input {i} of shape {tuple(t.shape)} is all zeros; benchmark inputs "
                             "must carry real values")


def traffic(forward: float, backward: float) -> dict[str, float]:
    """A case's ``min_bytes``: each pass's minimum bytes, forward + backward being their sum."""
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def randn(shape, settings: "Settings", dtype: torch.dtype, *, grad: bool = True, scale: float = 1.0) -> torch.Tensor:
    """A standard-normal input (times ``scale``) on the settings' device; a leaf requiring grad if ``grad``."""
    t = (torch.randn(shape, device=settings.device, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(grad)


def op_unavailable(name: str) -> str | None:
    """Why ``fastdensity.ops.<name>`` cannot be benchmarked (not in this build), or None."""
    from fastdensity import ops

    return None if callable(getattr(ops, name, None)) else f"fastdensity.ops.{name} is not in this build"


def _input_bytes(inputs) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(inputs))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------------
# The machine: names, cache size, versions
# --------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """The device as the CSV names it: the GPU's name, or the CPU model with torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """File-name slug of the device: ``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {_cpu_model()}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or device.type


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 of the GPU, or the largest cache level of CPU 0 (32 MiB when it cannot be read)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    best = 0
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in root.glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match:
            best = max(best, int(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2)])
    return best or 32 * 2**20


def _git_commit() -> str:
    """Short commit of the checkout the harness runs from, ``+dirty`` with uncommitted changes to
    tracked files; ``FASTDENSITY_COMMIT`` when there is no git checkout (a copied tree)."""
    root = Path(__file__).resolve().parent.parent
    try:
        top, sha = subprocess.run(["git", "rev-parse", "--show-toplevel", "--short", "HEAD"], cwd=root,
                                  capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
        # An installed copy (site-packages) may sit inside some other repository, e.g. a project's
        # .venv: that repository's commit says nothing about this code.
        if Path(top).resolve() != root:
            raise FileNotFoundError(f"{root} is not the top of a git checkout")
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, ValueError, subprocess.SubprocessError):
        return os.environ.get("FASTDENSITY_COMMIT", "unknown")


def run_metadata(device: torch.device) -> dict[str, str]:
    """The columns every row of one run shares: device, versions, commit, date (UTC, run start)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# --------------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------------


class ResultsWriter:
    """Appends rows to one results CSV, writing the header when the file is new.

    An existing file with a different header is refused rather than mixed with new rows.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != CSV_COLUMNS:
                raise ValueError(f"{self.path} has columns {header}, expected {list(CSV_COLUMNS)}; "
                                 "write to another --results folder")

    def append(self, row: dict[str, Any]) -> None:
        missing = [c for c in CSV_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"row lacks columns {missing}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="raise")
        if new:
            writer.writeheader()
        writer.writerow({c: _format(row[c]) for c in CSV_COLUMNS})
        # One write per row, the file closed after it: a run killed between two rows (``timeout``
        # on the GPU machine) leaves whole rows behind, never half of one.
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            f.write(text.getvalue())


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a results CSV (strings; empty cells for figures that were not measured)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path} has columns {reader.fieldnames}, expected {list(CSV_COLUMNS)}")
        return list(reader)


def measurement_row(m: Measurement, meta: dict[str, str]) -> dict[str, Any]:
    return {
        "op": m.case.op, "provider": m.provider, "mode": m.mode, "dtype": _dtype_name(m.case.dtype),
        "shape": m.case.shape, "median_ms": m.timing.median_ms, "p20_ms": m.timing.p20_ms,
        "p80_ms": m.timing.p80_ms, "gbps": m.gbps, "bw_fraction": m.bw_fraction, "peak_mem_mb": m.peak_mem_mb,
        **meta,
    }


# --------------------------------------------------------------------------------------------------
# Timers
# --------------------------------------------------------------------------------------------------


class CudaTimer:
    """``triton.testing.do_bench`` (CUDA events, L2 flushed before each call), 20/50/80th percentiles."""

    flushes_cache = True  # so the harness need not rotate input sets (see input_sets)

    def __init__(self, warmup_ms: float = 10.0, rep_ms: float = 50.0):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def __call__(self, fn: Callable[[], Any]) -> Timing:
        from triton.testing import do_bench

        median, p20, p80 = do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(median), float(p20), float(p80))

    def sync(self) -> None:
        torch.cuda.synchronize()


class CpuTimer:
    """``torch.utils.benchmark.Timer`` with torch's own thread count (its default would be one thread).

    Calls are timed in blocks of about ``block_ms`` (one call per block when a call is slower), for
    at least ``min_blocks`` blocks and about ``min_run_ms`` in all; percentiles are over the blocks.
    Caches are left as they are: the harness rotates input sets instead.
    """

    flushes_cache = False

    def __init__(self, min_run_ms: float = 200.0, block_ms: float = 1.0, min_blocks: int = 5, max_blocks: int = 200):
        self.min_run_ms, self.block_ms, self.min_blocks, self.max_blocks = min_run_ms, block_ms, min_blocks, max_blocks

    def __call__(self, fn: Callable[[], Any]) -> Timing:
        from torch.utils.benchmark import Timer

        timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        one_ms = timer.timeit(1).mean * 1e3
        per_block = max(1, int(self.block_ms / max(one_ms, 1e-6)))
        block_ms = one_ms * per_block
        blocks = int(min(self.max_blocks, max(self.min_blocks, self.min_run_ms / max(block_ms, 1e-6))))
        samples = [timer.timeit(per_block).mean * 1e3 for _ in range(blocks)]
        return timing_from_samples(samples)

    def sync(self) -> None:
        pass


def make_timer(device: torch.device, quick: bool):
    if device.type == "cuda":
        return CudaTimer(warmup_ms=5.0, rep_ms=20.0) if quick else CudaTimer()
    return CpuTimer(min_run_ms=40.0, min_blocks=3) if quick else CpuTimer()


def copy_bandwidth(device: torch.device, timer, nbytes: int) -> tuple[float, Timing]:
    """GB/s of a ``copy_`` of ``nbytes`` (counting bytes read and written) and its timing: the run's
    bandwidth yardstick."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    timer.sync()
    t = timer(lambda: dst.copy_(src))
    return 2 * n * 4 / (t.median_ms * 1e-3) / 1e9, t


# --------------------------------------------------------------------------------------------------
# Providers shared by the op benchmarks
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


# --------------------------------------------------------------------------------------------------
# Measuring one (case, provider)
# --------------------------------------------------------------------------------------------------


def backend_context(name: str | None):
    """``fastdensity.set_backend(name)`` as a context manager, or nothing for ``None``."""
    if name is None:
        return contextlib.nullcontext()
    import fastdensity

    return fastdensity.set_backend(name)


def _upstream(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A fixed random upstream gradient per differentiable output (ones for a scalar loss)."""
    return [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs]


def _differentiable(outs) -> list[torch.Tensor]:
    return [o for o in _tensors(outs) if o.requires_grad]


def input_sets(case: Case, cache_bytes: int) -> list[tuple]:
    """The case's input sets to rotate through: one, or as many as it takes to exceed twice the cache
    (``cache_bytes`` = 0: the timer flushes the cache itself, one set)."""
    first = case.make_inputs()
    check_inputs(first, f"{case.op} {case.shape}")
    return [first] + [case.make_inputs() for _ in range(rotation_count(_input_bytes(first), cache_bytes) - 1)]


#: Backward calls rotate through at most this many recorded graphs. Each holds its saved tensors,
#: which can dwarf the inputs the rotation count was sized by (eager mixtures save [B, K, D]
#: temporaries), and such graphs are far larger than any cache anyway.
MAX_GRAPHS = 8


def make_call(runner: Runner, sets: list[tuple], mode: str) -> Callable[[], Any]:
    """A zero-argument callable running ``mode`` once; each call takes the next input set in turn.

    For ``backward`` the graphs are built here, one per input set (at most :data:`MAX_GRAPHS`), and
    kept (``retain_graph``) so that every timed call runs the same backward; they are freed with the
    callable. Gradients are returned, never accumulated into ``.grad``, so repeated calls do the same
    work. One fixed random upstream gradient serves every set (they share their shapes).
    """
    counter = itertools.count()
    if mode == "forward":
        return lambda: runner.fn(*sets[next(counter) % len(sets)])
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if mode == "backward":
        sets = sets[:MAX_GRAPHS]
    n = len(sets)
    targets = [runner.grad_targets(s) for s in sets]
    if not targets[0]:
        raise Unavailable("nothing requires grad, so there is no backward to measure")
    graphs = [_differentiable(runner.fn(*s)) for s in (sets if mode == "backward" else sets[:1])]
    if not graphs[0]:
        raise Unavailable("no output requires grad")
    upstream = _upstream(graphs[0])
    if mode == "backward":
        def backward():
            i = next(counter) % n
            return torch.autograd.grad(graphs[i], targets[i], upstream, retain_graph=True, allow_unused=True)

        return backward
    del graphs  # forward+backward records its own graph each call; this one only gave the shapes

    def step():
        i = next(counter) % n
        outs = _differentiable(runner.fn(*sets[i]))
        return torch.autograd.grad(outs, targets[i], upstream, allow_unused=True)

    return step


def _peak_memory_mb(call: Callable[[], Any], device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    copy_gbps: float = float("nan")

    @property
    def errors(self) -> list[Skip]:
        return [s for s in self.skips if s.kind == "error"]


def run_suite(
    cases_by_op: dict[str, list[Case]],
    *,
    device: torch.device,
    quick: bool = False,
    budget_s: float | None = None,
    writer: ResultsWriter | None = None,
    providers: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
    progress: bool = True,
    timer=None,
    copy_bytes: int | None = None,
    compile_reserve_s: float | None = None,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Measure every (case, provider, mode), op by op, within ``budget_s`` seconds in all.

    Each op gets an equal share of the time still left when it starts (time an op leaves unused
    passes to the next). Within an op, the non-compiling providers of every case run first, then
    the compiling ones, each only while ``compile_reserve_s`` seconds (default: 30 for a full CPU
    run, where Inductor compiles C++; 10 otherwise) are left of the op's share: a compilation cannot
    be stopped once started. Where ``COMPILE_SHARE`` of the op's share is at least that reserve, the
    non-compiling providers stop when only that part is left, so that it goes to compilation. Whatever
    the budget leaves out is reported as a ``budget`` skip. Rows go to ``writer`` as they are
    measured; without a progress bar every row and skip is also logged as it happens, so a run that
    is killed still says what it did.
    """
    from tqdm.auto import tqdm

    timer = timer or make_timer(device, quick)
    meta = run_metadata(device)
    result = RunResult()
    start = time.perf_counter()
    deadline = math.inf if budget_s is None else start + budget_s

    copy_bytes = copy_bytes or (2**28 if device.type == "cuda" else 2**26)
    result.copy_gbps, t = copy_bandwidth(device, timer, copy_bytes)
    copy_row = {"op": "device_copy", "provider": "torch", "mode": "forward", "dtype": "float32",
                "shape": f"{copy_bytes // 4} elements", "median_ms": t.median_ms, "p20_ms": t.p20_ms,
                "p80_ms": t.p80_ms, "gbps": result.copy_gbps, "bw_fraction": 1.0, "peak_mem_mb": float("nan"),
                **meta}
    result.rows.append(copy_row)
    if writer is not None:
        writer.append(copy_row)
    log(f"device copy bandwidth: {result.copy_gbps:.1f} GB/s (read + write, {copy_bytes / 2**20:.0f} MiB)")

    cache = 0 if getattr(timer, "flushes_cache", False) else last_level_cache_bytes(device)
    if compile_reserve_s is None:
        compile_reserve_s = 30.0 if device.type == "cpu" and not quick else 10.0
    plan: list[tuple[str, list[tuple[Case, Provider]]]] = []
    for op, cases in cases_by_op.items():
        pairs = []
        for case in cases:
            chosen = [p for p in case.providers if providers is None or p.name in providers]
            pairs += [(case, p) for p in chosen if not p.compiles]
        for case in cases:
            chosen = [p for p in case.providers if providers is None or p.name in providers]
            pairs += [(case, p) for p in chosen if p.compiles]
        plan.append((op, pairs))

    def case_modes(case: Case) -> list[str]:
        return [m for m in case.modes if modes is None or m in modes]

    total = sum(len(case_modes(c)) for _, pairs in plan for c, _ in pairs)
    bar = tqdm(total=total, desc="bench", unit="meas", disable=not progress, leave=False)
    echo = (lambda text: None) if progress else log

    def skip(case: Case, provider: str, mode_list, kind: str, reason: str) -> None:
        for mode in mode_list:
            result.skips.append(Skip(case.op, case.shape, _dtype_name(case.dtype), provider, mode, kind, reason))
            echo(f"not measured: {result.skips[-1]}")
        bar.update(len(mode_list))

    def reserve_of(provider: Provider) -> float:
        if not provider.compiles:
            return 0.0
        return compile_reserve_s if provider.compile_reserve_s is None else provider.compile_reserve_s

    def record(row: dict[str, Any]) -> None:
        result.rows.append(row)
        if writer is not None:
            writer.append(row)
        echo(f"{row['op']} {row['shape']} {row['dtype']} {row['provider']} {row['mode']}: "
             f"median {row['median_ms']:.4g} ms")
        bar.update(1)

    # On a GPU every convolution provider (eager, compiled, the dense peers, the op's own cuDNN
    # candidate) gets cuDNN's fastest algorithm for its shape, searched during the warm-up, as a
    # tuned training script would; heuristics alone could flatter the masked kernels.
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark or device.type == "cuda"
    try:
        for index, (op, pairs) in enumerate(plan):
            now = time.perf_counter()
            share = (deadline - now) / (len(plan) - index)
            op_deadline = now + share
            # Measured last, torch.compile would otherwise get only what the others leave, often
            # nothing; its part is kept only where it is enough to start a compilation at all.
            needs = [reserve_of(p) for c, p in pairs if p.compiles and not c.unavailable]
            keep = COMPILE_SHARE * share if needs and COMPILE_SHARE * share >= min(needs) else 0.0
            split = op_deadline - keep if math.isfinite(op_deadline) else op_deadline
            for case, provider in pairs:
                mode_list = case_modes(case)
                if case.unavailable:
                    skip(case, provider.name, mode_list, "unavailable", case.unavailable)
                    continue
                bar.set_postfix_str(f"{case.op} {case.shape} {provider.name}"[:60])
                spent = ("time budget of this op spent" if provider.compiles or not keep else
                         "this op's time for providers that do not compile is spent (the rest is torch.compile's)")
                _measure(case, provider, mode_list, device=device, timer=timer, cache=cache,
                         copy_gbps=result.copy_gbps, deadline=op_deadline if provider.compiles else split,
                         spent=spent, reserve=reserve_of(provider), meta=meta, record=record, skip=skip)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        bar.close()
    return result


def _measure(case, provider, mode_list, *, device, timer, cache, copy_gbps, deadline, spent, reserve, meta,
             record, skip) -> None:
    """Measure one (case, provider) in each mode: build it (unavailable ones say why), then, while
    time is left before ``deadline`` (``reserve`` seconds of it for a provider that compiles), time
    each mode and ``record`` its row; past the deadline, skip with the reason ``spent``."""
    def failed(modes, exc: BaseException) -> None:
        if isinstance(exc, Unavailable):
            skip(case, provider.name, modes, "unavailable", str(exc))
            return
        # One failing provider must not end the suite: the run reports it (and the command's exit
        # status counts errors; running out of memory is a result, not an error).
        text = str(exc).splitlines()[0] if str(exc) else ""
        skip(case, provider.name, modes, "oom" if _is_oom(exc) else "error", f"{type(exc).__name__}: {text}"[:300])

    try:
        runner = provider.build()
    except Exception as exc:
        failed(mode_list, exc)
        return
    left = deadline - time.perf_counter()
    if left <= 0 or left < reserve:
        skip(case, provider.name, mode_list, "budget", spent if left <= 0 else
             f"under {reserve:.0f} s of this op's budget left, too little to compile")
        return
    try:
        sets = input_sets(case, cache)
    except Exception as exc:
        failed(mode_list, exc)
        return
    with backend_context(provider.backend):
        for mode in mode_list:
            if time.perf_counter() >= deadline:
                skip(case, provider.name, [mode], "budget", spent)
                continue
            done = False
            try:
                call = make_call(runner, sets, mode)
                for _ in range(3):  # warm-up: compilation, autotuning, allocator growth
                    call()
                timer.sync()
                timing = timer(call)
                peak = _peak_memory_mb(call, device)
                done = True
            except Exception as exc:
                failed([mode], exc)
                continue
            finally:
                call = None  # frees the graphs a backward callable holds
                if device.type == "cuda":
                    # A failed call's frames can keep tensors alive in reference cycles; after running
                    # out of memory they would make the next case run out of memory too.
                    if not done:
                        gc.collect()
                    torch.cuda.empty_cache()
            nbytes = case.min_bytes.get(mode)
            gbps = nbytes / (timing.median_ms * 1e-3) / 1e9 if nbytes else float("nan")
            record(measurement_row(Measurement(case, provider.name, mode, timing, gbps, gbps / copy_gbps, peak),
                                   meta))
