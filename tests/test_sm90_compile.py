"""Compile tier: every kernel launch the CPU tiers make also compiles for an H100 (sm_90).

Triton's interpreter runs a kernel's body as NumPy and never invokes the compiler, so type errors,
layout conversions the backend rejects or constructs a Triton version no longer lowers would first
show up on a GPU, where time is scarce. This test records every distinct launch (kernel, argument
types, constexprs, warps, stages) that ``fastdensity verify`` makes through the interpreter, adds a
bf16 variant of each fp32 launch (the interpreter cannot run bf16 faithfully) and the GPU-only tile
configurations a kernel module lists in ``SM90_VARIANTS``, and compiles them all to sm_90 machine code
with Triton's real compiler in a subprocess without the interpreter. No GPU is needed, only Triton's
bundled ptxas. It checks that the code compiles, not that it is right: that is the GPU tier's job.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from fastdensity import verify  # noqa: E402
from helpers import requires_interpreter  # noqa: E402

# Launches are recorded by running the kernels in the interpreter.
pytestmark = requires_interpreter


def _encode(value):
    if isinstance(value, torch.Tensor):
        return ["ptr", str(value.dtype).replace("torch.", "")]
    if isinstance(value, triton.language.dtype):
        return ["dtype", value.name]
    if value is None or isinstance(value, (bool, int, float, str)):
        return ["val", value]
    raise TypeError(f"unrecorded kernel argument type {type(value).__name__}")


def _is_constexpr(param: inspect.Parameter) -> bool:
    # Kernel modules use `from __future__ import annotations`, so the annotation may be the string.
    ann = param.annotation
    return ann is triton.language.constexpr or (isinstance(ann, str) and ann.split(".")[-1] == "constexpr")


def _scalar_type(value):
    if isinstance(value, bool):
        return ["type", "i1"]
    if isinstance(value, int):
        return ["type", "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"]
    if isinstance(value, float):
        return ["type", "fp32"]
    return _encode(value)


def _record_launches(monkeypatch) -> list:
    records: dict[str, list] = {}
    original = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        values = {**dict(zip(params, args)), **kwargs}
        # Runtime scalars compile by type, not value: record "i32"/"i64"/"fp32" so launches that
        # differ only in sizes and strides count once.
        encoded = {n: (_encode(v) if _is_constexpr(params[n]) else _scalar_type(v)) for n, v in values.items()}
        record = [self.fn.__module__, self.fn.__name__, encoded, options]
        records[json.dumps(record, sort_keys=True)] = record
        return original(self, *args, grid=grid, warmup=warmup, **kwargs, **options)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    outcomes = verify.verify(torch.device("cpu"), dtypes=[torch.float32, torch.float64])
    assert all(o.passed for o in outcomes), "verify failed on CPU; see tests/test_verify.py"
    return list(records.values())


def _with_half_precision(records: list) -> list:
    """Each fp32 launch again with every fp32 pointer as bf16 (fp16 takes the same code paths; bf16 is
    the one with extra conversion rules, e.g. no bf16 atomics)."""
    out = list(records)
    for module, name, args, options in records:
        if ["ptr", "float32"] in args.values():
            swapped = {k: (["ptr", "bfloat16"] if v == ["ptr", "float32"] else v) for k, v in args.items()}
            out.append([module, name, swapped, options])
    return out


def _with_gpu_tiles(records: list) -> list:
    """Apply each kernel module's ``SM90_VARIANTS[kernel](dtype name) -> [(constexpr overrides, options)]``:
    the tile configurations its launcher only picks on a GPU (dtype name: that of the first pointer)."""
    import importlib

    out = list(records)
    seen = set()
    for module, name, args, options in records:
        variants = getattr(importlib.import_module(module), "SM90_VARIANTS", {}).get(name)
        dtype_name = next(v for kind, v in args.values() if kind == "ptr")
        if variants is None or (name, dtype_name) in seen:
            continue  # the tiles of one launch per kernel and dtype: compile time, not coverage, grows after
        seen.add((name, dtype_name))
        listed = variants(dtype_name)
        # First and last of each list (largest and smallest tiles, typically): compile time stays ~1 min.
        for overrides, opts in listed[:1] + listed[1:][-1:]:
            out.append([module, name, {**args, **{k: _encode(v) for k, v in overrides.items()}}, opts])
    unique = {json.dumps(r, sort_keys=True): r for r in out}
    return list(unique.values())


def _all_kernels() -> list[tuple[str, str]]:
    """(module, name) of every top-level ``@triton.jit`` kernel (``*_kernel``) in fastdensity.kernels."""
    import importlib
    import pkgutil

    import fastdensity.kernels as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and isinstance(obj, InterpretedFunction) and obj.fn.__module__ == module.__name__:
                found.append((module.__name__, name))
    return found


@pytest.mark.slow
def test_every_recorded_launch_compiles_for_sm90(monkeypatch, tmp_path):
    records = _with_gpu_tiles(_with_half_precision(_record_launches(monkeypatch)))
    recorded = {(m, n) for m, n, _, _ in records}
    missing = sorted(set(_all_kernels()) - recorded)
    assert not missing, f"verify's CPU cases never launch {missing}: add a case that does"
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(records))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    script = Path(__file__).with_name("sm90_compile.py")
    result = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True,
                            timeout=600)
    failures = [line for line in result.stdout.splitlines() if line.startswith(("FAIL", "     "))]
    assert result.returncode == 0, "\n".join(failures) or result.stderr[-4000:]
