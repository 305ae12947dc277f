"""Compile recorded kernel launches for an H100 (sm_90) with Triton's real compiler, no GPU needed.

Usage: ``python tests/sm90_compile.py RECORDS.json`` (run by ``tests/test_sm90_compile.py``). Must run
without ``TRITON_INTERPRET``, so that ``fastdensity.kernels`` holds compiled ``JITFunction``s.

Each record is ``[module, kernel, {arg: [kind, value]}, {num_warps, num_stages}]`` as written by the
test from interpreter launches: ``["ptr", dtype]`` for a tensor, ``["type", "i32" | "i64" | "fp32" |
"i1"]`` for a runtime scalar, ``["val", v]`` / ``["dtype", name]`` for constexpr values. Prints one
line per compile and exits 1 if any failed or needs more shared memory than an H100 block has.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_MEMORY = 232448  # bytes per block (227 KiB) with the opt-in carve-out, sm_90
POINTER_TYPES = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16", "int32": "i32",
                 "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def jit_function(module: str, name: str):
    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # unwrap autotune/heuristics wrappers
        fn = fn.fn
    return fn


def signature(fn, args: dict) -> tuple[dict, dict]:
    sig, constexprs = {}, {}
    for p in fn.params:
        kind, value = args.get(p.name, ["val", p.default])
        if kind == "dtype":
            value = tl.dtype(value)  # e.g. "fp32"
        if kind == "type":  # a runtime scalar recorded by type
            sig[p.name] = value
        elif p.is_constexpr or value is None:
            sig[p.name] = "constexpr"
            constexprs[p.name] = value
        elif kind == "ptr":
            sig[p.name] = "*" + POINTER_TYPES[value]
        elif isinstance(value, bool):
            sig[p.name] = "i1"
        elif isinstance(value, int):
            sig[p.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={value!r}")
    return sig, constexprs


def main(path: str) -> int:
    records = json.load(open(path))
    failures = 0
    start = time.time()
    for module, name, args, options in records:
        fn = jit_function(module, name)
        label = f"{module.rsplit('.', 1)[-1]}.{name} {json.dumps(args, sort_keys=True)} {options}"
        t = time.time()
        try:
            sig, constexprs = signature(fn, args)
            compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                      target=H100, options=options)
            # Shared memory is checked only at launch, on the GPU: a config over the H100's per-block
            # limit compiles fine here and then fails to launch there.
            shared = compiled.metadata.shared
            if shared > H100_SHARED_MEMORY:
                raise RuntimeError(f"needs {shared} bytes of shared memory; an H100 block has {H100_SHARED_MEMORY}")
            print(f"ok   {time.time() - t:5.2f}s shared {shared:6d} {label}", flush=True)
        except Exception as exc:  # report every failure, not just the first
            failures += 1
            print(f"FAIL {label}\n     {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    print(f"{len(records)} compiles, {failures} failed, {time.time() - start:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
