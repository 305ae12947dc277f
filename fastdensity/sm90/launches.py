"""Record the kernel launches a GPU would make, without a GPU: a dry run of the launchers.

Runs in a process where ``TRITON_INTERPRET=1`` was set before fastdensity was imported (the kernels are
then ``InterpretedFunction``s and backend "triton" accepts CPU tensors; ``python -m fastdensity.sm90
record`` is refused otherwise; :mod:`.table` starts that process). Within :func:`dry_run`:

* a launch ``kernel[grid](...)`` records its arguments and returns without running the kernel, so
  benchmark-sized problems cost only the host-side work (allocations, the launchers' decisions);
* the launchers decide as on an H100: each kernel module's ``INTERPRETED`` reads False (the interpreter's
  small fixed tiles give way to the GPU tiles and ``triton.autotune`` lists) and ``target_programs``
  answers 4 programs for each of the H100's 132 SMs;
* an autotuned kernel records every configuration it would benchmark (each is compiled on the GPU).

A record is a dict ``{"module", "kernel", "args", "options", "origin", "sources"}``. ``args`` maps each parameter
to ``["val", v]`` / ``["dtype", "fp32"]`` for constexprs and, for runtime arguments, to the class of
value Triton specialises on (so launches differing only in sizes count once): ``["ptr", dtype,
aligned]`` (data pointer a multiple of 16 bytes), ``["int", r]`` with ``r`` a stand-in of the same class
(1: specialised to a constant; 16: a multiple of 16; 17: neither; 2**32 and 2**32 + 1 the same for
64-bit values), ``["float"]``, ``["bool"]``, ``["none"]``. ``origin`` names the first case that made it,
``sources`` every kind of case that did ("verify cpu", "verify gpu", "bench", "variants").

What is launched: ``fastdensity verify``'s cases at their CPU and GPU shapes in float32, bfloat16,
float16 and float64 (the GPU tier's dtypes; the small CPU shapes stand in for the GPU tests' awkward
ones), the benchmark cases the suite runs on a GPU (``fastdensity bench``, full size), forward and
backward, then each kernel module's ``SM90_VARIANTS`` (GPU tiles its launcher picks only for shapes
none of these reach).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import pkgutil
from typing import Callable, Iterator

import torch

from .table import data_dtype

#: SMs of an H100 SXM (the GPU machine's H200 has the same 132); launchers size split grids from it.
H100_SMS = 132
#: dtypes the GPU tier and ``fastdensity verify --device cuda`` run
GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------------------------------
# Encoding one launch
# ----------------------------------------------------------------------------------------------------


def _int_class(value: int) -> int:
    """A stand-in for ``value`` that Triton specialises the same way (type, == 1, divisible by 16)."""
    if -2 ** 31 <= value < 2 ** 31:
        return 1 if value == 1 else (16 if value % 16 == 0 else 17)
    return 2 ** 32 if value % 16 == 0 else 2 ** 32 + 1


def encode_runtime(value) -> list:
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return ["ptr", str(value.dtype).replace("torch.", ""), value.data_ptr() % 16 == 0]
    if isinstance(value, bool):
        return ["bool"]
    if isinstance(value, int):
        return ["int", _int_class(value)]
    if isinstance(value, float):
        return ["float"]
    if value is None:
        return ["none"]
    if isinstance(value, tl.dtype):
        return ["dtype", value.name]
    raise TypeError(f"unrecorded runtime kernel argument of type {type(value).__name__}")


def encode_constexpr(value) -> list:
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return ["dtype", value.name]
    if isinstance(value, tl.constexpr):
        value = value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return ["val", value]
    raise TypeError(f"unrecorded constexpr kernel argument of type {type(value).__name__}")


def _is_constexpr(param: inspect.Parameter) -> bool:
    import triton.language as tl

    # Kernel modules use `from __future__ import annotations`: the annotation may be the string.
    ann = param.annotation
    return ann is tl.constexpr or (isinstance(ann, str) and ann.split(".")[-1] == "constexpr")


def record_key(record: dict) -> str:
    """What makes two launches the same compile: kernel, argument classes and options (not the origin)."""
    return json.dumps([record["module"], record["kernel"], record["args"], record["options"]], sort_keys=True)


class Recorder:
    """Collects distinct launches. ``origin`` names the case running now (kept with each launch's first
    recording), ``source`` its kind ("verify cpu", "verify gpu", "bench"), listed with every launch
    under ``sources``."""

    def __init__(self):
        self.records: dict[str, dict] = {}
        self.origin = ""
        self.source = ""
        self.errors: list[str] = []

    def add(self, fn: Callable, args: tuple, kwargs: dict) -> None:
        params = inspect.signature(fn).parameters
        values = {**dict(zip(params, args)), **{k: v for k, v in kwargs.items() if k in params}}
        options = {k: v for k, v in kwargs.items() if k not in params and k not in ("grid", "warmup")}
        encoded = {}
        for name, param in params.items():
            if name not in values:
                if param.default is inspect.Parameter.empty:
                    raise TypeError(f"{fn.__name__}: launch without argument {name}")
                values[name] = param.default
            value = values[name]
            encoded[name] = encode_constexpr(value) if _is_constexpr(param) else encode_runtime(value)
        record = {"module": fn.__module__, "kernel": fn.__name__, "args": encoded, "options": options,
                  "origin": self.origin, "sources": []}
        record = self.records.setdefault(record_key(record), record)
        if self.source not in record["sources"]:
            record["sources"].append(self.source)


# ----------------------------------------------------------------------------------------------------
# The dry run
# ----------------------------------------------------------------------------------------------------


def kernel_modules() -> list:
    import fastdensity.kernels as package

    names = [info.name for info in pkgutil.iter_modules(package.__path__)]
    return [importlib.import_module(f"{package.__name__}.{name}") for name in names]


def all_kernels() -> list[tuple[str, str]]:
    """(module, name) of every top-level ``@triton.jit`` kernel (``*_kernel``) defined in fastdensity.kernels."""
    found = []
    for module in kernel_modules():
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if name.endswith("_kernel") and inspect.isfunction(fn) and fn.__module__ == module.__name__:
                found.append((module.__name__, name))
    return found


@contextlib.contextmanager
def dry_run(recorder: Recorder) -> Iterator[None]:
    """Launches record instead of running; launchers decide as on an H100 (see the module docstring)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    from fastdensity.kernels import utils

    if not utils.INTERPRETED:
        raise RuntimeError("the dry run needs the kernels interpreted: set TRITON_INTERPRET=1 before importing "
                           "fastdensity (fastdensity.sm90.table records in such a process)")

    def record_run(self, *args, grid, warmup, **kwargs):
        recorder.add(self.fn, args, kwargs)

    def record_every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):  # a GPU compiles each to benchmark it
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    def gpu_programs(device) -> int:
        return 4 * H100_SMS

    zeros = torch.zeros

    def randn(*size, generator=None, **kwargs):  # values are never read: skip drawing GB of them
        return zeros(*size, **kwargs)

    saved = []

    def patch(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    try:
        patch(InterpretedFunction, "run", record_run)
        patch(Autotuner, "run", record_every_config)
        patch(torch, "randn", randn)
        for module in kernel_modules():
            if hasattr(module, "INTERPRETED"):
                patch(module, "INTERPRETED", False)
            if hasattr(module, "target_programs"):
                patch(module, "target_programs", gpu_programs)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def _forward_backward(fn: Callable, inputs, wrt) -> None:
    """``fn(*inputs)`` under backend "triton", then the gradients of its floating outputs w.r.t. ``wrt``."""
    import fastdensity

    with fastdensity.set_backend("triton"):
        outs = fn(*inputs)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        loss = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()
                   and o.requires_grad)
        targets = [t for t in wrt if t.requires_grad]
        if targets and isinstance(loss, torch.Tensor):
            torch.autograd.grad(loss, targets, allow_unused=True)


@contextlib.contextmanager
def _case(recorder: Recorder, source: str, origin: str) -> Iterator[None]:
    """Launches within are the case ``origin``'s; an error ends the case, not the recording (it is listed)."""
    recorder.source, recorder.origin = source, origin
    torch.manual_seed(0)
    try:
        yield
    except Exception as exc:
        recorder.errors.append(f"{origin}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _verify_launches(recorder: Recorder, dtypes) -> None:
    from fastdensity import verify

    for build in verify.builders().values():
        for cuda in (False, True):
            for case in build(cuda):
                for dtype in dtypes:
                    source = f"verify {'gpu' if cuda else 'cpu'}"
                    with _case(recorder, source, f"{source}: {case.function} {case.label} {dtype}"):
                        args = []
                        for i, a in enumerate(case.make(torch.device("cpu"))):
                            if isinstance(a, torch.Tensor) and a.is_floating_point():  # as verify rounds them
                                half = dtype in (torch.float16, torch.bfloat16)
                                a = a.to(torch.float32 if half and i in case.keep_fp32 else dtype)
                                a.requires_grad_(i in case.grad_args)
                            args.append(a)
                        _forward_backward(case.call, args, [a for a in args if isinstance(a, torch.Tensor)])


def _gpu_settings():
    """Benchmark settings that say "CUDA" (the GPU suite's cases and shapes) with tensors on the CPU."""
    from fastdensity.benchmarks.harness import Settings

    class GpuShapes(Settings):
        @property
        def cuda(self) -> bool:
            return True

    return GpuShapes(device=torch.device("cpu"))


def _bench_launches(recorder: Recorder, names, dtypes) -> None:
    """The fastdensity providers of the benchmark modules ``names``' GPU cases in ``dtypes``."""
    from fastdensity.benchmarks import cases as bench_cases
    from fastdensity.benchmarks import suite

    settings = _gpu_settings()
    check = bench_cases._kernel_check
    bench_cases._kernel_check = lambda device, kernel: None  # "CUDA only": the dry run is as good here
    try:
        for name in names:
            with _case(recorder, "bench", f"bench {name}: building the cases"):
                cases = suite.load_cases([name], settings)[name]
                for case in cases:
                    if case.unavailable or case.dtype not in dtypes:
                        continue
                    for provider in case.providers:
                        if not provider.name.startswith("fastdensity"):
                            continue
                        origin = f"bench: {case.op} {case.shape} {str(case.dtype).replace('torch.', '')}"
                        with _case(recorder, "bench", origin):
                            runner = provider.build()
                            inputs = case.make_inputs()
                            _forward_backward(runner.fn, inputs, runner.grad_targets(inputs))
    finally:
        bench_cases._kernel_check = check


def _with_variants(records: dict[str, dict]) -> dict[str, dict]:
    """Apply each kernel module's ``SM90_VARIANTS[kernel](dtype name) -> [(constexpr overrides, options)]`` to
    one recorded launch per kernel and dtype (that of its first pointer)."""
    out = dict(records)
    seen = set()
    for record in list(records.values()):
        module = importlib.import_module(record["module"])
        variants = getattr(module, "SM90_VARIANTS", {}).get(record["kernel"])
        dtype = data_dtype(record, None)
        if variants is None or (record["kernel"], dtype) in seen:
            continue
        seen.add((record["kernel"], dtype))
        for overrides, options in variants(dtype):
            args = {**record["args"], **{k: encode_constexpr(v) for k, v in overrides.items()}}
            variant = {**record, "args": args, "options": {**record["options"], **options}, "sources": ["variants"],
                       "origin": f"{module.__name__.rsplit('.', 1)[-1]}.SM90_VARIANTS {dtype}"}
            out.setdefault(record_key(variant), variant)
    return out


#: What the quick (CI) set leaves out of the full one: float16 (bfloat16 takes the same code paths) and
#: the whole-model benchmarks (their kernels' launches are the op benchmarks' at other sizes, and their
#: host-side work is the slowest part of the dry run).
QUICK_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
QUICK_SKIPPED_BENCH = ("models",)


def _configuration(record: dict, *, tiles: bool) -> str:
    """Kernel, data dtype and constexprs (with ``tiles``: all, and the launch options; without: only the
    feature flags, leaving out tile sizes ``BLOCK_*`` / ``GROUP_*``)."""
    dtype = data_dtype(record, None)
    constexprs = {k: v for k, v in record["args"].items()
                  if v[0] in ("val", "dtype") and (tiles or not k.startswith(("BLOCK", "GROUP")))}
    return json.dumps([record["kernel"], dtype, constexprs, record["options"] if tiles else None], sort_keys=True)


def quick_subset(records: list[dict]) -> list[dict]:
    """The CI set: each compile-time configuration (constexprs, warps, stages) a GPU benchmark launches,
    once; and for the launches only verify or SM90_VARIANTS make, each kernel's feature-flag combination
    (constexprs but tile sizes) once per dtype, so every code path compiles under each Triton. What it
    leaves out - the same configurations with other argument alignments, other tiles of verify's
    shapes - the full set compiles."""
    chosen: dict[str, dict] = {}
    for record in records:
        if "bench" in record["sources"]:
            chosen.setdefault(_configuration(record, tiles=True), record)
    flags = {_configuration(r, tiles=False) for r in chosen.values()}
    for record in records:
        key = _configuration(record, tiles=False)
        if key not in flags:
            flags.add(key)
            chosen.setdefault(_configuration(record, tiles=True), record)
    return [r for r in records if any(r is c for c in chosen.values())]


def record_launches(quick: bool = False) -> tuple[list[dict], list[str]]:
    """Every distinct launch of the cases listed in the module docstring, in first-seen order, and the
    errors of cases that could not be built. ``quick``: the CI subset (:func:`quick_subset` of the
    launches in :data:`QUICK_DTYPES`, without :data:`QUICK_SKIPPED_BENCH`)."""
    from fastdensity.benchmarks import suite
    from fastdensity.testing import poisoned_outputs

    dtypes = QUICK_DTYPES if quick else GPU_DTYPES
    bench = [n for n in suite.names() if not (quick and n in QUICK_SKIPPED_BENCH)]
    recorder = Recorder()
    with dry_run(recorder), poisoned_outputs(False):
        _verify_launches(recorder, dtypes)
        _bench_launches(recorder, bench, dtypes)
    records = list(_with_variants(recorder.records).values())
    if quick:
        records = quick_subset([r for r in records if not any(v[:2] == ["ptr", "float16"] for v in r["args"].values())])
    return records, recorder.errors
