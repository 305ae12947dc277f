"""The results CSV: its columns, the run's metadata (device, versions, git commit, date), writing and reading rows.

One row per measurement, with the columns :data:`CSV_COLUMNS`: a :class:`~.measure.Measurement`
(:func:`measurement_row`) plus the columns every row of one run shares (:func:`run_metadata`).
Results go to ``<results>/<device_slug>.csv``, appended one row at a time (:class:`ResultsWriter`),
so a run cut short keeps what it measured. Only this module writes those files; ``fastdensity
bench`` decides which file and appends each row as :func:`~.schedule.run` yields it.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from .measure import Measurement

__all__ = ["CSV_COLUMNS", "cpu_model", "device_name", "device_slug", "git_commit", "run_metadata", "measurement_row",
           "ResultsWriter", "read_rows"]

#: The results file's columns, in order (issue 5). ``shape`` is a human-readable label of the case;
#: ``saved_mb`` the MiB a forward pass leaves saved for backward (issue 15, :func:`.measure.saved_bytes`).
CSV_COLUMNS = (
    "op", "provider", "mode", "dtype", "shape", "device", "median_ms", "p20_ms", "p80_ms", "gbps",
    "bw_fraction", "peak_mem_mb", "saved_mb", "torch", "triton", "commit", "date",
)


# --------------------------------------------------------------------------------------------------
# The machine and the code: names, versions, commit
# --------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows of it."""
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
    return f"CPU {cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """File-name slug of the device: ``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {cpu_model()}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or device.type


def git_commit() -> str:
    """Short commit of the checkout the benchmarks run from, ``+dirty`` with uncommitted changes to
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
    """The columns every row of one run shares: device, versions, commit, date (UTC, run start).

    ``FASTDENSITY_RUN_DATE`` overrides the date, so that several ``fastdensity bench`` calls of one GPU
    run (``benchmarks/run_gpu.sh`` runs one per stage) count as one run in the report."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": git_commit(),
        "date": (os.environ.get("FASTDENSITY_RUN_DATE")
                 or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")),
    }


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


def measurement_row(m: Measurement, meta: dict[str, str]) -> dict[str, Any]:
    """The CSV row of one measurement; ``meta`` is the run's :func:`run_metadata`."""
    return {
        "op": m.op, "provider": m.provider, "mode": m.mode, "dtype": m.dtype, "shape": m.shape,
        "median_ms": m.timing.median_ms, "p20_ms": m.timing.p20_ms, "p80_ms": m.timing.p80_ms,
        "gbps": m.gbps, "bw_fraction": m.bw_fraction, "peak_mem_mb": m.peak_mem_mb, "saved_mb": m.saved_mb, **meta,
    }


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
