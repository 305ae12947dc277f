"""Measuring one (case, provider, mode): timers, input rotation, the timed call, GB/s and peak memory.

The three **modes** (:data:`~.cases.MODES`):

* ``forward``: the forward pass as it runs in training - inputs that require grad do, so autograd
  records what backward needs (that is part of the cost a user pays);
* ``backward``: gradients of every differentiable output (with a fixed random upstream gradient)
  with respect to every input that requires grad, or the parameters for layers and models, from a
  graph built beforehand (``torch.autograd.grad(..., retain_graph=True)``);
* ``forward+backward``: both, as one training step (without the optimizer update).

Figures of one :class:`Measurement`, after :data:`WARMUP_CALLS` untimed calls (which absorb
compilation, autotuning and allocator growth):

* median, 20th and 80th percentile time: ``triton.testing.do_bench`` on CUDA (CUDA events, L2
  flushed between calls; cuDNN's autotuner on, see :func:`tuned_convolutions`); on CPU
  ``torch.utils.benchmark.Timer`` with all of torch's threads, the percentiles taken over blocks of
  calls (each block ~1 ms or one call);
* effective GB/s = the case's ``min_bytes[mode]`` / median time, and its share of the device-copy
  bandwidth measured in the same run (:func:`copy_measurement`: a large ``copy_``, bytes read +
  written, reported as the op ``device_copy``);
* peak memory: on CUDA, ``max_memory_allocated`` during one call minus what was allocated before
  it - the call's own footprint (outputs, saved activations, temporaries; not its inputs). PyTorch
  keeps no peak counter for CPU tensors, so on CPU it is NaN rather than guessed;
* bytes saved for backward (``forward`` and ``forward+backward`` modes, on any device): what the
  forward pass leaves autograd holding until backward runs, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (:func:`saved_bytes`): the storages of the saved
  tensors, each once, leaving out the inputs and the tensors gradients are taken for (parameters),
  which exist anyway. NaN in ``backward`` mode, whose timed call runs no forward.

Inputs are never zeros (:func:`check_inputs` rejects an all-zero floating tensor). No call may find
its inputs already cached: on CUDA ``do_bench`` flushes L2 before every call, so one input set
suffices; on CPU, when one input set is smaller than twice the last-level cache, :func:`input_sets`
builds several and each call takes the next. A call that fails gives a :class:`Skip` instead of a
:class:`Measurement`; this module neither decides what runs when nor records anything.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import math
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .cases import MODES, Case, Provider, Runner, Unavailable, backend_context, dtype_name

__all__ = [
    "WARMUP_CALLS", "MAX_GRAPHS", "COPY_OP", "Timing", "Measurement", "Skip", "percentile", "timing_from_samples",
    "rotation_count", "check_inputs", "last_level_cache_bytes", "CudaTimer", "CpuTimer", "make_timer",
    "copy_bandwidth", "copy_measurement", "input_sets", "make_call", "peak_memory_mb", "saved_bytes",
    "tuned_convolutions", "skip_for_error", "measure",
]

#: Untimed calls before timing: compilation, autotuning, allocator growth.
WARMUP_CALLS = 3

#: Backward calls rotate through at most this many recorded graphs. Each holds its saved tensors,
#: which can dwarf the inputs the rotation count was sized by (eager mixtures save [B, K, D]
#: temporaries), and such graphs are far larger than any cache anyway.
MAX_GRAPHS = 8

#: The op name of the bandwidth yardstick (:func:`copy_measurement`).
COPY_OP = "device_copy"


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


@dataclass
class Measurement:
    """One measured (op, shape, dtype, provider, mode); ``gbps``, ``peak_mem_mb`` and ``saved_mb`` (MiB
    saved for backward, :func:`saved_bytes`) are NaN where not known."""

    op: str
    shape: str
    dtype: str
    provider: str
    mode: str
    timing: Timing
    gbps: float
    bw_fraction: float
    peak_mem_mb: float
    saved_mb: float = math.nan


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

    @classmethod
    def of(cls, case: Case, provider: str, mode: str, kind: str, reason: str) -> "Skip":
        return cls(case.op, case.shape, dtype_name(case.dtype), provider, mode, kind, reason)

    def __str__(self) -> str:
        return f"{self.op} {self.shape} {self.dtype} {self.provider} {self.mode}: {self.kind} - {self.reason}"


# --------------------------------------------------------------------------------------------------
# Small pure helpers
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


# --------------------------------------------------------------------------------------------------
# Timers: ``timer(fn) -> Timing``, ``timer.sync()``, ``timer.flushes_cache``
# --------------------------------------------------------------------------------------------------


class CudaTimer:
    """``triton.testing.do_bench`` (CUDA events, L2 flushed before each call), 20/50/80th percentiles."""

    flushes_cache = True  # so one input set suffices (see input_sets)

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
    Caches are left as they are: callers rotate input sets instead.
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
    for _ in range(WARMUP_CALLS):
        dst.copy_(src)
    timer.sync()
    t = timer(lambda: dst.copy_(src))
    return 2 * n * 4 / (t.median_ms * 1e-3) / 1e9, t


def copy_measurement(device: torch.device, timer, nbytes: int | None = None) -> Measurement:
    """The yardstick as a :class:`Measurement` of op :data:`COPY_OP` (its own ``bw_fraction`` is 1).
    ``nbytes`` defaults to 256 MiB on a GPU (far past L2), 64 MiB on CPU."""
    nbytes = nbytes or (2**28 if device.type == "cuda" else 2**26)
    gbps, timing = copy_bandwidth(device, timer, nbytes)
    return Measurement(COPY_OP, f"{nbytes // 4} elements", "float32", "torch", "forward", timing, gbps, 1.0,
                       float("nan"))


# --------------------------------------------------------------------------------------------------
# The timed call
# --------------------------------------------------------------------------------------------------


def input_sets(case: Case, cache_bytes: int) -> list[tuple]:
    """The case's input sets to rotate through: one, or as many as it takes to exceed twice the cache
    (``cache_bytes`` = 0: the timer flushes the cache itself, one set)."""
    first = case.make_inputs()
    check_inputs(first, f"{case.op} {case.shape}")
    set_bytes = sum(t.numel() * t.element_size() for t in _tensors(first))
    return [first] + [case.make_inputs() for _ in range(rotation_count(set_bytes, cache_bytes) - 1)]


def _upstream(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A fixed random upstream gradient per differentiable output (ones for a scalar loss)."""
    return [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs]


def _differentiable(outs) -> list[torch.Tensor]:
    return [o for o in _tensors(outs) if o.requires_grad]


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


def peak_memory_mb(call: Callable[[], Any], device: torch.device) -> float:
    """MiB allocated during one ``call()`` beyond what was allocated before it (CUDA; NaN on CPU)."""
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


def _storage_key(t: torch.Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()


def saved_bytes(call: Callable[[], Any], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes that autograd holds for backward once ``call()`` has returned: the storages of the tensors
    saved for backward during the call (``torch.autograd.graph.saved_tensors_hooks``), each storage
    counted once and whole (a saved view keeps all of its storage alive), leaving out the storages of
    ``exclude`` (inputs, parameters: they exist whether or not anything is saved).

    Only tensors still alive when the call returns count (weak references): a graph branch that was
    dropped during the call holds nothing. Any device; nothing is timed.
    """
    excluded = {_storage_key(t) for t in exclude if isinstance(t, torch.Tensor)}
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor):
        # Detached: the same storage without a grad_fn. Kept as given, an op's saved output would hold its
        # own grad_fn, a reference cycle through C++ that nothing frees.
        kept = t.detach()
        saved.append(weakref.ref(kept))
        return kept

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    storages: dict[tuple, int] = {}
    for ref in saved:
        t = ref()
        if t is not None and t.untyped_storage().nbytes() and _storage_key(t) not in excluded:
            storages[_storage_key(t)] = t.untyped_storage().nbytes()
    del out
    return sum(storages.values())


@contextlib.contextmanager
def tuned_convolutions(device: torch.device):
    """On a GPU every convolution provider (eager, compiled, the dense peers, the op's own cuDNN
    candidate) gets cuDNN's fastest algorithm for its shape, searched during the warm-up, as a tuned
    training script would; heuristics alone could flatter the masked kernels."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def skip_for_error(case: Case, provider: str, mode: str, exc: BaseException) -> Skip:
    """The :class:`Skip` for a provider that raised: ``unavailable`` (it said why), ``oom`` (running
    out of memory is a result, not an error) or ``error`` (the first line of the message)."""
    if isinstance(exc, Unavailable):
        return Skip.of(case, provider, mode, "unavailable", str(exc))
    text = str(exc).splitlines()[0] if str(exc) else ""
    return Skip.of(case, provider, mode, "oom" if _is_oom(exc) else "error", f"{type(exc).__name__}: {text}"[:300])


def measure(case: Case, provider: Provider, runner: Runner, sets: list[tuple], mode: str, *,
            device: torch.device, timer, copy_gbps: float) -> Measurement | Skip:
    """Warm up, time and size one (case, provider, mode) under the provider's backend.

    Never raises for a failing provider: one must not end the run, so it comes back as a
    :class:`Skip` (see :func:`skip_for_error`). ``copy_gbps`` is the run's yardstick for ``bw_fraction``.
    """
    call = None
    try:
        with backend_context(provider.backend):
            call = make_call(runner, sets, mode)
            for _ in range(WARMUP_CALLS):
                call()
            timer.sync()
            timing = timer(call)
            peak = peak_memory_mb(call, device)
            saved_mb = math.nan
            if mode != "backward":  # the forward's figure; the backward mode's timed call runs none
                inputs = sets[0]
                exclude = _tensors(inputs) + runner.grad_targets(inputs)
                saved_mb = saved_bytes(lambda: runner.fn(*inputs), exclude) / 2**20
    except Exception as exc:
        outcome: Measurement | Skip = skip_for_error(case, provider.name, mode, exc)
    else:
        nbytes = case.min_bytes.get(mode)
        gbps = nbytes / (timing.median_ms * 1e-3) / 1e9 if nbytes else float("nan")
        outcome = Measurement(case.op, case.shape, dtype_name(case.dtype), provider.name, mode, timing, gbps,
                              gbps / copy_gbps, peak, saved_mb)
    call = None  # frees the graphs a backward callable holds
    if device.type == "cuda":
        # A failed call's frames can keep tensors alive in reference cycles (collected only now that
        # the exception is gone); after running out of memory they would make the next case run out too.
        if isinstance(outcome, Skip):
            gc.collect()
        torch.cuda.empty_cache()
    return outcome
