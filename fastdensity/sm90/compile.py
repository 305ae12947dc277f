"""Compile recorded launches for an H100 (sm_90) with Triton's real compiler and read ptxas' figures.

No GPU is needed: ``triton.compile`` runs Triton's passes and the ptxas bundled with Triton for a
``GPUTarget("cuda", 90, 32)``. Each record (see :mod:`.launches`) is replayed through the compiling
Triton's own argument binder with stand-in values of the recorded classes, so the compile sees the
same signature, constants (arguments equal to 1) and 16-byte divisibility hints a GPU launch would,
whichever Triton (3.6, 3.9) runs this.

Figures of one compile (a dict): ``registers`` per thread, ``spill_stores`` / ``spill_loads`` bytes per
thread, ``stack`` frame bytes, ``shared`` bytes per block (Triton's dynamic shared memory plus ptxas'
static), ``num_warps``, ``occupancy`` (:func:`.occupancy.occupancy`), or ``error``. Registers and
spills are not in the compiled kernel's metadata without a GPU (the driver reports them when it loads
the cubin), so they are read from ptxas' ``-v`` report of the compile itself (Triton prints it with
``TRITON_DUMP_PTXAS_LOG``); where that report is missing, ptxas runs again on the PTX.

Successful results are cached per record, compiling Triton version and the kernel's source hash (Triton's
``JITFunction.cache_key``: the kernel, the jit functions it calls and the constexpr globals it reads)
in ``$FASTDENSITY_SM90_CACHE`` (default ``~/.cache/fastdensity/sm90``).

Run as ``python -m fastdensity.sm90 compile RECORDS.json RESULTS.json`` (or through
:func:`.table.compile_records`, which also runs it under another interpreter). It must run without
``TRITON_INTERPRET``, so that the kernel modules hold compiled ``JITFunction``s.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .occupancy import occupancy

#: bump when what a cached result means changes
CACHE_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("FASTDENSITY_SM90_CACHE") or Path.home() / ".cache" / "fastdensity" / "sm90")


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on ``path`` (created as needed): concurrent pytest workers compile once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, at worst two processes compile the same launch
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def jit_function(module: str, name: str):
    import triton

    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # unwrap autotune/heuristics wrappers
        fn = fn.fn
    return fn


def _standin(encoded: list):
    """A value Triton specialises exactly as the recorded one (see :mod:`.launches`)."""
    import torch
    import triton.language as tl

    kind = encoded[0]
    if kind == "val":
        return encoded[1]
    if kind == "dtype":
        return tl.dtype(encoded[1])
    if kind == "ptr":
        dtype = getattr(torch, encoded[1])
        base = torch.empty(32, dtype=dtype)  # the CPU allocator aligns to 64 bytes
        return base[:16] if encoded[2] else base[1:17]  # one element in: not a multiple of 16 bytes
    if kind == "int":
        return encoded[1]
    return {"float": 1.5, "bool": True, "none": None}[kind]


_PTXAS_FIGURES = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "static_shared": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas_report(report: str) -> dict[str, int] | None:
    """Registers, spills, stack and static shared memory from ``ptxas -v``'s report (None if there is
    none). A Triton kernel is one entry function; any other function's figures count at their maximum."""
    figures = {}
    for name, pattern in _PTXAS_FIGURES.items():
        values = [int(v) for v in pattern.findall(report)]
        figures[name] = max(values, default=0)
    return figures if _PTXAS_FIGURES["registers"].search(report) else None


def _rerun_ptxas(ptx: str, arch: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        result = subprocess.run([get_ptxas(90).path, "-v", f"--gpu-name={arch}", str(src), "-o", str(src) + ".o"],
                                capture_output=True, text=True)
    return result.stdout + result.stderr


def compile_record(record: dict) -> dict:
    """The figures of one launch compiled for sm_90 (see the module docstring)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    start = time.time()
    try:
        fn = jit_function(record["module"], record["kernel"])
        backend = make_backend(target)
        # The launch path of JITFunction.run: bind, specialise, pack - with the compiling Triton's rules.
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        args = [_standin(record["args"][p.name]) for p in fn.params]
        kwargs = dict(record["options"])
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        report = io.StringIO()
        with contextlib.redirect_stdout(report):
            compiled = triton.compile(source, target=target, options=options.__dict__)
        figures = parse_ptxas_report(report.getvalue())
        if figures is None:  # a cache hit, or a Triton that no longer prints the report
            figures = parse_ptxas_report(_rerun_ptxas(compiled.asm["ptx"], f"sm_{target.arch}a"))
        if figures is None:
            raise RuntimeError("ptxas gave no register report")
    except Exception as exc:  # a compile failure is a result: report it with the others
        message = str(exc).strip()
        return {"error": f"{type(exc).__name__}: {message[:1500]}", "seconds": round(time.time() - start, 2)}
    num_warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared + figures.pop("static_shared")
    return {**figures, "shared": shared, "num_warps": num_warps,
            "occupancy": occupancy(figures["registers"], shared, num_warps),
            "seconds": round(time.time() - start, 2)}


def _cache_key(record: dict) -> str:
    import triton

    from .launches import record_key

    source = jit_function(record["module"], record["kernel"]).cache_key
    text = json.dumps([CACHE_VERSION, triton.__version__, source, record_key(record)])
    return hashlib.sha256(text.encode()).hexdigest()


def compile_records(records: list[dict], log=None) -> list[dict]:
    """:func:`compile_record` of each record, from the cache where it holds the result."""
    cache = cache_dir()
    results = []
    for record in records:
        try:
            key = _cache_key(record)
        except Exception:  # the kernel cannot be imported: compile_record reports why, and it is not cached
            key = None
        path = cache / key[:2] / f"{key}.json" if key else None
        result = None
        if path is not None and path.exists():
            with contextlib.suppress(OSError, ValueError):
                result = {**json.loads(path.read_text()), "cached": True}
        if result is None:
            result = compile_record(record)
            # Failures are compiled again next time: one could be the machine's (out of memory), not the code's.
            if path is not None and "error" not in result:
                from fastdensity.atomic_io import atomic_write_bytes

                with contextlib.suppress(OSError):
                    atomic_write_bytes(path, json.dumps(result).encode())
        results.append(result)
        if log is not None:
            state = "FAIL" if "error" in result else "ok  "
            print(f"{state} {result['seconds']:5.2f}s {record['module'].rsplit('.', 1)[-1]}.{record['kernel']} "
                  f"{record['origin']}", file=log, flush=True)
    return results


def main(records_path: str, results_path: str, part: str = "") -> int:
    """Compile the records of ``records_path``; write ``{"triton": version, "results": [...]}``. ``part``
    names the share of a larger set this is (processes compiling the same share wait for each other)."""
    import triton

    # The compile must run make_cubin (and so ptxas, whose report is read) rather than reuse a cached
    # cubin, and leaves nothing in the user's Triton cache.
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="fastdensity-sm90-") as tmp:
        os.environ["TRITON_CACHE_DIR"] = tmp
        records = json.loads(Path(records_path).read_text())
        with locked(cache_dir() / f"compile-triton-{triton.__version__}-{part or 'all'}.lock"):
            results = compile_records(records, log=sys.stderr)
    Path(results_path).write_text(json.dumps({"triton": triton.__version__, "results": results,
                                              "seconds": round(time.time() - start, 1)}))
    return 0
