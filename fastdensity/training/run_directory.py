"""A run's output directory and the files in it::

    OUT/.lock                the lock a running run holds (:mod:`.run_lock`); gone when it ends
    OUT/checkpoint.pt        the latest checkpoint (:mod:`.checkpoint`)
    OUT/checkpoint.prev.pt   the one before it, kept for when the latest is damaged
    OUT/log.jsonl            one JSON line per evaluation: step, train/valid NLL, lr, seconds
    OUT/metrics.json         the final test metrics
    OUT/samples.png          and, for 2-D data, OUT/density.png (:mod:`.plots`)

Everything but the log's appended lines is written atomically, and every JSON file is standard JSON (a
non-finite number is written as ``null``; see :func:`.reporting.standard_json`). A kill can still leave
behind a temporary file of a write it cut short, and log lines for evaluations after the last
checkpoint; :meth:`RunDirectory.prepare` removes both before a run (re)starts, so the resumed run's log
reads as if it had never stopped. It runs only under the folder's lock, so it never sweeps away another
live run's temporary files.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from ..atomic_io import TEMP_PREFIX, atomic_write_bytes, disk_full_error
from .checkpoint import CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME
from .plots import DENSITY_NAME, SAMPLES_NAME
from .reporting import standard_json
from .run_lock import RunLock

__all__ = ["RunDirectory", "LOG_NAME", "METRICS_NAME", "log_lines_through", "check_output_folder"]

LOG_NAME = "log.jsonl"
METRICS_NAME = "metrics.json"


def check_output_folder(path: str) -> None:
    """ValueError unless ``path`` is a folder or can become one (nothing but folders above it)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path!r} is an existing file; the output must be a folder (it will hold "
                         f"{CHECKPOINT_NAME}, {METRICS_NAME}, {LOG_NAME}, ...)")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {path!r} cannot be a folder: {parent!r} is a file")


class RunDirectory:
    """The paths of a run's files in ``path``, and the writes the training loop makes there."""

    def __init__(self, path: str):
        self.path = path
        self.checkpoint = os.path.join(path, CHECKPOINT_NAME)
        self.log = os.path.join(path, LOG_NAME)
        self.metrics = os.path.join(path, METRICS_NAME)
        self.lock = RunLock(path)

    def open(self) -> Optional[str]:
        """Create the folder and take its lock (:class:`.run_lock.OutputFolderInUse` when another run holds
        it). Returns a note when a stale lock was taken over."""
        check_output_folder(self.path)
        os.makedirs(self.path, exist_ok=True)
        return self.lock.acquire()

    def close(self) -> None:
        self.lock.release()

    def prepare(self, resumed_from: Optional[int]) -> None:
        """Sweep temporary files of our writes that a kill cut short; when resuming from the checkpoint of
        step ``resumed_from``, drop the log lines after it (they are redone). Needs :meth:`open` first."""
        ours = tuple(f"{TEMP_PREFIX}{name}-" for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, METRICS_NAME,
                                                         LOG_NAME, SAMPLES_NAME, DENSITY_NAME))
        for name in os.listdir(self.path):
            if name.startswith(ours):
                os.remove(os.path.join(self.path, name))
        if resumed_from is not None and os.path.exists(self.log):
            atomic_write_bytes(self.log, "".join(log_lines_through(self.log, resumed_from)).encode())

    def append_log(self, record: dict) -> None:
        line = standard_json(record) + "\n"
        try:
            with open(self.log, "a") as f:
                f.write(line)
        except OSError as exc:
            full = disk_full_error(exc, self.log, len(line.encode()))
            if full is not None:
                raise full from None
            raise

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_bytes(self.metrics, (standard_json(metrics, indent=2) + "\n").encode())


def log_lines_through(path: str, step: int) -> list[str]:
    """The lines of ``log.jsonl`` for steps <= ``step``; a line a crash cut short (it does not parse) is
    dropped rather than stopping the resume."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    return kept
