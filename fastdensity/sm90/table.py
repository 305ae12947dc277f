"""The static sm_90 table: record the launches, compile them under one or more Tritons, judge each.

A launch passes when it compiles, spills nothing, needs at most 227 KiB of shared memory per block and
reaches its kernel's occupancy floor: ``SM90_OCCUPANCY_FLOOR = {"_kernel": (fraction, "reason")}``
beside the kernel in its module (``"_kernel[float64]"``: for that dtype only), or :data:`DEFAULT_FLOOR`.

Both steps run as subprocesses (:func:`measure`): the dry run needs the kernels interpreted, the
compile needs them compiled, and the compile may run under another Python environment - the GPU
machine's Triton 3.6 beside CI's. Such an environment needs only torch and triton: the child finds
this fastdensity's source (and ``fastdensity.kernels``, which setup.py maps from ``kernels/``) through
a path entry and an import hook set up by :data:`_BOOTSTRAP`, no install.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastdensity.atomic_io import atomic_write_bytes

from .compile import cache_dir, locked
from .occupancy import SHARED_PER_BLOCK

#: Occupancy floor of a kernel whose module gives none: 8 of 64 warps, 2 per scheduler (an SM has 4).
#: With fewer, each scheduler has at most one warp to switch to while the other waits on memory, and
#: a memory-bound kernel cannot keep enough loads in flight to approach the H100's bandwidth.
DEFAULT_FLOOR = (0.125, "default: 2 warps per scheduler, the least that overlaps one warp's loads with another's work")

_BOOTSTRAP = r"""
import importlib.util, os, sys
root, kernels, benchmarks, command, *rest = sys.argv[1:]
os.environ.pop("TRITON_INTERPRET", None)
if command == "record":
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
sys.path.insert(0, root)
class MappedPackages:  # setup.py's package_dir, for a source tree that is not installed here
    where = {"fastdensity.kernels": kernels, "fastdensity.benchmarks": benchmarks}
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name in cls.where:
            folder = cls.where[name]
            return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                          submodule_search_locations=[folder])
sys.meta_path.insert(0, MappedPackages)
from fastdensity.sm90.__main__ import main
sys.exit(main([command, *rest]))
"""


def _child_argv(python: str, command: list[str]) -> list[str]:
    import fastdensity
    import fastdensity.benchmarks
    import fastdensity.kernels

    folders = [Path(m.__file__).parent for m in (fastdensity, fastdensity.kernels, fastdensity.benchmarks)]
    return [python, "-c", _BOOTSTRAP, str(folders[0].parent), str(folders[1]), str(folders[2]), *command]


def _child(python: str, command: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(_child_argv(python, command), capture_output=True, text=True, timeout=timeout)


def _sources_hash(quick: bool) -> str:
    """What the recorded launches depend on: fastdensity's, the kernels' and the benchmarks' sources, and
    the torch and Triton versions that run the dry run."""
    import torch
    import triton

    import fastdensity
    import fastdensity.benchmarks
    import fastdensity.kernels

    digest = hashlib.sha256(f"{torch.__version__} {triton.__version__} quick={quick}".encode())
    for module in (fastdensity, fastdensity.kernels, fastdensity.benchmarks):
        folder = Path(module.__file__).parent
        for path in sorted(folder.rglob("*.py")):
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def record(quick: bool = False, timeout: float = 3600) -> tuple[list[dict], list[str]]:
    """The launches of :func:`.launches.record_launches`, recorded in a fresh interpreted process, or read
    back from the cache when no source they depend on has changed. Concurrent callers (pytest workers)
    wait for one another, so the dry run happens once."""
    memo = cache_dir() / f"records-{_sources_hash(quick)}.json"
    with locked(cache_dir() / "records.lock"):
        if not memo.exists():
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "records.json"
                result = _child(sys.executable, ["record", str(path)] + (["--quick"] if quick else []), timeout)
                if result.returncode != 0:
                    raise RuntimeError(f"recording the launches failed:\n{result.stderr[-4000:]}")
                atomic_write_bytes(memo, path.read_bytes())
        data = json.loads(memo.read_text())
    return data["records"], data["errors"]


def default_jobs() -> int:
    """Compiling processes: ``FASTDENSITY_SM90_JOBS``, else half the CPUs (the other half for pytest's
    other worker or the machine's user)."""
    return int(os.environ.get("FASTDENSITY_SM90_JOBS") or max(1, (os.cpu_count() or 2) // 2))


def compile_records(records: list[dict], python: str | None = None, jobs: int | None = None,
                    timeout: float = 3600) -> dict:
    """``{"triton": version, "results": [figures per record], "seconds": s, "log": ...}``, compiled by
    ``python`` (default: this interpreter) in ``jobs`` processes (default :func:`default_jobs`)."""
    python = python or sys.executable
    jobs = max(1, min(jobs or default_jobs(), len(records) or 1))
    with tempfile.TemporaryDirectory() as tmp:
        children = []
        for i in range(jobs):
            share = Path(tmp) / f"records-{i}.json", Path(tmp) / f"results-{i}.json"
            share[0].write_text(json.dumps(records[i::jobs]))
            command = ["compile", str(share[0]), str(share[1]), f"--part={i}of{jobs}"]
            children.append((share, subprocess.Popen(_child_argv(python, command), stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.PIPE, text=True)))
        merged: list = [None] * len(records)
        logs, triton_version, seconds = [], "?", 0.0
        for i, (share, child) in enumerate(children):
            _, log = child.communicate(timeout=timeout)
            logs.append(log)
            if child.returncode != 0 or not share[1].exists():
                raise RuntimeError(f"compiling under {python} failed:\n{log[-4000:]}")
            data = json.loads(share[1].read_text())
            merged[i::jobs] = data["results"]
            triton_version, seconds = data["triton"], max(seconds, data["seconds"])
    return {"triton": triton_version, "results": merged, "seconds": seconds, "log": "".join(logs)}


# ----------------------------------------------------------------------------------------------------
# Judging
# ----------------------------------------------------------------------------------------------------


def floor_of(module: str, kernel: str, dtype: str | None = None) -> tuple[float, str]:
    """The kernel's ``(fraction, reason)`` from its module's SM90_OCCUPANCY_FLOOR - the entry for this dtype
    (``"_kernel[float64]"``, the dtype of the launch's first pointer, as :attr:`Row.dtype`) where there is
    one, else the kernel's - or DEFAULT_FLOOR."""
    floors = getattr(importlib.import_module(module), "SM90_OCCUPANCY_FLOOR", {})
    return floors.get(f"{kernel}[{dtype}]") or floors.get(kernel, DEFAULT_FLOOR)


def data_dtype(record: dict, default: str | None = "-") -> str | None:
    """The dtype of a launch's first pointer argument (``default`` for none)."""
    return next((v[1] for v in record["args"].values() if v[0] == "ptr"), default)


def problems(figures: dict, floor: float) -> list[str]:
    """Why a compiled launch is over the budget (empty when it is within it)."""
    if "error" in figures:
        return [f"does not compile: {figures['error'].splitlines()[0][:200]}"]
    out = []
    spills = figures["spill_stores"] + figures["spill_loads"]
    if spills:
        out.append(f"spills {figures['spill_stores']} B stored / {figures['spill_loads']} B loaded per thread")
    if figures["shared"] > SHARED_PER_BLOCK:
        out.append(f"needs {figures['shared']} B of shared memory; a block may have {SHARED_PER_BLOCK}")
    if figures["occupancy"] < floor:
        out.append(f"occupancy {figures['occupancy']:.3f} < floor {floor:.3f}")
    return out


@dataclass
class Row:
    """One launch compiled under one Triton, judged."""

    record: dict
    figures: dict
    triton: str
    floor: float
    problems: list[str]

    @property
    def kernel(self) -> str:
        return kernel_name(self.record)

    @property
    def dtype(self) -> str:
        return data_dtype(self.record)

    @property
    def config(self) -> str:
        """The constexprs (tl.dtype ones and None left out) and the launch options."""
        args = self.record["args"].items()
        parts = [f"{k}={_short(v[1])}" for k, v in args if v[0] == "val" and v[1] is not None]
        parts += [f"{k.replace('num_', '')}={v}" for k, v in sorted(self.record["options"].items())]
        return " ".join(parts)


def _short(value) -> str:
    return {True: "T", False: "F"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def judge(records: list[dict], compiled: dict) -> list[Row]:
    rows = []
    for record, figures in zip(records, compiled["results"]):
        floor = floor_of(record["module"], record["kernel"], data_dtype(record))[0]
        rows.append(Row(record, figures, compiled["triton"], floor, problems(figures, floor)))
    return rows


def kernel_name(record: dict) -> str:
    """``module.kernel`` as the table prints it (``coupling._coupling_fwd_kernel``)."""
    return f"{record['module'].rsplit('.', 1)[-1]}.{record['kernel']}"


def measure(pythons: list[str | None], quick: bool = False,
            only: str | None = None) -> tuple[list[dict], list[str], list[list[Row]]]:
    """Record once, then compile and judge under each interpreter (None: this one); ``only``: just the
    launches whose kernel name (:func:`kernel_name`) contains this string."""
    records, errors = record(quick)
    if only:
        records = [r for r in records if only in kernel_name(r)]
    return records, errors, [judge(records, compile_records(records, python)) for python in pythons]


# ----------------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------------

HEADER = ("kernel", "dtype", "config", "regs", "spill st/ld", "smem KiB", "occ", "floor", "verdict")


def format_rows(rows: list[Row], only_problems: bool = False) -> str:
    """A markdown table: kernel, dtype, config, registers, spills, shared memory, occupancy, floor, verdict."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in sorted(rows, key=lambda r: (r.kernel, r.dtype, r.config)):
        if only_problems and not row.problems:
            continue
        f = row.figures
        verdict = "FAIL: " + "; ".join(row.problems) if row.problems else "ok"
        if "error" in f:
            cells = ["-", "-", "-", "-"]
        else:
            cells = [str(f["registers"]), f"{f['spill_stores']}/{f['spill_loads']}", f"{f['shared'] / 1024:.1f}",
                     f"{f['occupancy']:.3f}"]
        lines.append("| " + " | ".join([row.kernel, row.dtype, row.config, *cells, f"{row.floor:.3f}", verdict]) + " |")
    return "\n".join(lines)


def report(pythons: list[str | None], quick: bool = False, only_problems: bool = False,
           only: str | None = None) -> tuple[str, int]:
    """The text ``fastdensity info --kernels`` prints - per Triton a summary line and the table - and its
    exit status (1 when a launch is over the budget or a case could not be recorded). ``only``: as
    :func:`measure`."""
    records, errors, per_triton = measure(pythons, quick, only)
    lines = [f"{len(records)} distinct kernel launches ({'the quick CI set' if quick else 'the full set'}"
             f"{f', kernels matching {only!r}' if only else ''}): "
             "verify's cases at CPU and GPU shapes, the GPU benchmark suite, each module's SM90_VARIANTS; "
             "compiled for sm_90 (H100), no GPU needed"]
    lines += [f"could not record: {e}" for e in errors]
    failed = bool(errors)
    for python, rows in zip(pythons, per_triton):
        over = [r for r in rows if r.problems]
        failed |= bool(over)
        lines += ["", f"Triton {rows[0].triton if rows else '?'} ({python or sys.executable}): "
                      f"{len(over)} of {len(rows)} launches over the budget (spills, shared memory > 227 KiB, "
                      "occupancy below the kernel's floor, or no compile)", ""]
        lines.append(format_rows(rows, only_problems))
    return "\n".join(lines), int(failed)
