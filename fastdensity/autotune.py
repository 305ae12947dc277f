"""Cached autotuning: time each implementation of an op once per problem, then remember the fastest.

Some ops have several correct implementations whose ranking depends on the shape, the dtype and the
machine - a masked convolution can run a Triton kernel that skips the dead taps, cuDNN on the masked
dense weight, or a split into smaller dense convolutions. Rules of thumb lose somewhere; a measurement
does not. :class:`CachedAutotuner` times every candidate the first time it sees a problem key, keeps
the winner in memory and in a JSON file, and answers from that cache ever after - in later processes
too, so a training job pays for the measurement once per machine, not once per run.

Where the cache lives: ``$FASTDENSITY_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/fastdensity``, else
``~/.cache/fastdensity``, else (no home directory, as in some containers and CI sandboxes)
``<temp dir>/fastdensity-cache-<uid>``; one file per tuner, ``autotune-<name>.json``, holding for each
key the choice and the measured milliseconds of every candidate (so a surprising choice can be
inspected). The file is rewritten with :func:`fastdensity.atomic_io.atomic_write_bytes` after merging
in what other processes wrote meanwhile, so concurrent jobs never leave a torn file. A missing,
unreadable or corrupt file is treated as empty; a folder that cannot be written to keeps the cache in
memory only.

Every key is stored together with the fastdensity, torch and Triton versions, so upgrading any of
them (a faster kernel, a new cuDNN) re-measures.
Callers put whatever else decides the ranking into the key (shapes, dtype, layout, device name, ...).

``FASTDENSITY_AUTOTUNE=0`` (or ``false``/``off``/``no``) turns measuring off: :meth:`CachedAutotuner.choose`
then returns the tuner's default candidate without timing or reading the cache.

Timing (:func:`cuda_event_timer`) runs a candidate a couple of times to warm up (compilation, Triton's
own config search, cuDNN's algorithm choice), then takes the median of a few runs bracketed by CUDA
events on the current stream. Measure eagerly, before capturing CUDA graphs: timing cannot happen
inside a capture.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from .atomic_io import atomic_write_bytes

__all__ = ["ENV_AUTOTUNE", "ENV_CACHE_DIR", "autotune_enabled", "cache_dir", "cuda_event_timer",
           "CachedAutotuner"]

ENV_AUTOTUNE = "FASTDENSITY_AUTOTUNE"
ENV_CACHE_DIR = "FASTDENSITY_CACHE_DIR"
_FORMAT = 1  # bump when the file layout changes; files of another format are ignored


def autotune_enabled() -> bool:
    """False when ``FASTDENSITY_AUTOTUNE`` is ``0``/``false``/``off``/``no`` (read on every call)."""
    return os.environ.get(ENV_AUTOTUNE, "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    """The folder of the on-disk caches (see the module docstring for the order of precedence)."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fastdensity"
    try:
        return Path.home() / ".cache" / "fastdensity"
    except (RuntimeError, KeyError, OSError):  # no $HOME and no passwd entry for this user
        # Per user, so two users of one machine never share (or fight over the permissions of) a folder.
        user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
        return Path(tempfile.gettempdir()) / f"fastdensity-cache-{user}"


def cuda_event_timer(fn: Callable[[], object], *, warmup: int = 2, reps: int = 5) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    events = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


class CachedAutotuner:
    """Choose the fastest of several candidates per problem key, measuring each key once.

    Args:
        name: names the cache file (``autotune-<name>.json``); one tuner per op.
        default: the candidate used when tuning is switched off, and when every candidate failed.
        timer: ``timer(fn) -> milliseconds``; :func:`cuda_event_timer` unless given (tests inject fakes).
        directory: the cache folder; :func:`cache_dir` (read at each use) unless given.

    >>> tuner = CachedAutotuner("my_op", default="kernel")
    >>> tuner.choose({"shape": [64, 256]}, {"kernel": run_kernel, "eager": run_eager})
    'kernel'
    """

    def __init__(self, name: str, *, default: str, timer: Optional[Callable[[Callable[[], object]], float]] = None,
                 directory: Optional[os.PathLike] = None):
        self.name = name
        self.default = default
        self.timer = timer if timer is not None else cuda_event_timer
        self._directory = None if directory is None else Path(directory)
        self._memory: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._warned_write = False

    @property
    def path(self) -> Path:
        """The JSON file this tuner reads and writes."""
        return (self._directory or cache_dir()) / f"autotune-{self.name}.json"

    @staticmethod
    def key_string(key: Mapping[str, object]) -> str:
        """The canonical text of ``key`` (JSON, sorted, with the library versions added)."""
        from fastdensity import __version__  # here, not at the top: fastdensity imports us before defining it

        full = {**key, "fastdensity": __version__, "torch": torch.__version__, "triton": _triton_version()}
        return json.dumps(full, sort_keys=True, separators=(",", ":"), default=str)

    def lookup(self, key: Mapping[str, object]) -> Optional[str]:
        """The cached choice for ``key`` (memory, then disk), or None if it was never measured."""
        text = self.key_string(key)
        with self._lock:
            entry = self._memory.get(text)
            if entry is None:
                entry = self._read_file().get(text)
                if entry is not None:
                    self._memory[text] = entry
        return None if entry is None else entry["choice"]

    def entry(self, key: Mapping[str, object]) -> Optional[dict]:
        """The whole cached record for ``key``: ``{"choice": ..., "times_ms": {candidate: ms or None}}``."""
        if self.lookup(key) is None:
            return None
        return dict(self._memory[self.key_string(key)])

    def choose(self, key: Mapping[str, object], candidates: Mapping[str, Callable[[], object]]) -> str:
        """The fastest candidate for ``key``: from the cache, or measured now and cached.

        ``candidates`` maps names to zero-argument callables that each run the work being compared once
        (for a layer in training: its forward and backward). A candidate that raises while being timed
        is reported in a warning and ruled out; if all fail, :attr:`default` is returned.
        """
        if not autotune_enabled():
            return self.default
        cached = self.lookup(key)
        if cached is not None and cached in candidates:
            return cached
        with self._lock:
            times: dict[str, Optional[float]] = {}
            for name, fn in candidates.items():
                try:
                    ms = float(self.timer(fn))
                except Exception as exc:  # a candidate that cannot run here must not take the op down
                    warnings.warn(f"fastdensity autotune ({self.name}): candidate {name!r} failed and is ruled "
                                  f"out: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
                    ms = math.inf
                times[name] = ms if math.isfinite(ms) else None
            finite = {name: ms for name, ms in times.items() if ms is not None}
            choice = min(finite, key=finite.get) if finite else self.default
            text = self.key_string(key)
            entry = {"choice": choice, "times_ms": times}
            self._memory[text] = entry
            self._write_entry(text, entry)
        return choice

    def clear(self, *, disk: bool = False) -> None:
        """Forget the in-memory choices (and delete the cache file too with ``disk=True``)."""
        with self._lock:
            self._memory.clear()
            if disk:
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass

    # -- the file -------------------------------------------------------------------------------------

    def _read_file(self) -> dict[str, dict]:
        path = self.path
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            warnings.warn(f"fastdensity autotune ({self.name}): ignoring unreadable cache {path}: {exc}",
                          RuntimeWarning, stacklevel=3)
            return {}
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("entries"), dict):
            return {}
        return {k: v for k, v in data["entries"].items() if isinstance(v, dict) and isinstance(v.get("choice"), str)}

    def _write_entry(self, text: str, entry: dict) -> None:
        path = self.path
        try:
            entries = self._read_file()  # merge: another process may have added keys since we last read
            entries[text] = entry
            data = json.dumps({"format": _FORMAT, "entries": entries}, indent=1, sort_keys=True)
            atomic_write_bytes(path, data.encode("utf-8"))
        except OSError as exc:
            if not self._warned_write:
                warnings.warn(f"fastdensity autotune ({self.name}): cannot write {path} ({exc}); choices are "
                              f"kept in memory for this process only", RuntimeWarning, stacklevel=3)
                self._warned_write = True
