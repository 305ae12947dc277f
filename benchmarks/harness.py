"""The names bench modules (and older callers) import, gathered from the modules that define them.

The measuring core is split by job:

* :mod:`.cases` - what a benchmark is: :class:`Case`, :class:`Provider`, :class:`Runner`,
  :class:`Settings`, and the helpers bench modules build cases with (:func:`randn`,
  :func:`traffic`, :func:`op_providers`, :func:`peer`, ...);
* :mod:`.measure` - measuring one (case, provider, mode): timers, input rotation, the timed call;
* :mod:`.schedule` - which measurements run in which order within a time budget, yielded one by one;
* :mod:`.record` - the results CSV: columns, run metadata, writing and reading rows.

``fastdensity bench`` (``fastdensity/commands/bench.py``) drives :func:`schedule.run` and records and
shows what it yields. New code may import from those modules directly.
"""
from __future__ import annotations

from .cases import (MODES, Case, Provider, Runner, Settings, Unavailable, backend_context, compiled, dtype_name,
                    element_size, op_providers, op_unavailable, peer, peer_pair, randn, traffic)
from .measure import (MAX_GRAPHS, CpuTimer, CudaTimer, Measurement, Skip, Timing, check_inputs, copy_bandwidth,
                      input_sets, last_level_cache_bytes, make_call, make_timer, percentile, rotation_count,
                      timing_from_samples)
from .record import CSV_COLUMNS, ResultsWriter, device_name, device_slug, measurement_row, read_rows, run_metadata
from .record import cpu_model as _cpu_model  # fastdensity.commands.info's name for it
from .schedule import COMPILE_SHARE

__all__ = [
    "MODES", "COMPILE_SHARE", "MAX_GRAPHS", "CSV_COLUMNS", "Unavailable", "Runner", "Provider", "Case", "Settings",
    "Timing", "Measurement", "Skip", "CudaTimer", "CpuTimer", "percentile", "timing_from_samples", "rotation_count",
    "check_inputs", "make_timer", "copy_bandwidth", "device_name", "device_slug", "last_level_cache_bytes",
    "run_metadata", "measurement_row", "ResultsWriter", "read_rows", "op_providers", "compiled", "peer", "peer_pair",
    "element_size", "randn", "dtype_name", "op_unavailable", "traffic", "input_sets", "make_call", "backend_context",
]
