"""The benchmark suite's cases as pytest-benchmark tests, for people who live in pytest.

    pytest benchmarks/ --benchmark-only                      # quick cases on CPU, full cases on CUDA
    FASTDENSITY_BENCH=full pytest benchmarks/ --benchmark-only -k "coupling and eager"

Each (case, provider, mode) of ``fastdensity.benchmarks`` is one test, built by the same code
(``measure.input_sets``, ``measure.make_call``) as ``fastdensity bench``, warmed up the same way and
timed by pytest-benchmark (with a CUDA synchronisation inside the timed call on a GPU). Providers that cannot
run here (fastdensity without a GPU, peers not installed, ops not in this build) are skipped with
the reason. These tests write no results CSV: only ``fastdensity bench`` does. The default
``pytest`` run (``testpaths = tests``) does not collect them.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from fastdensity.benchmarks import cases, measure, suite

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("FASTDENSITY_BENCH", "quick" if DEVICE.type == "cpu" else "full") == "quick"
SETTINGS = cases.Settings(DEVICE, quick=QUICK)


def _params():
    for op_cases in suite.load_cases(None, SETTINGS).values():
        for case in op_cases:
            for provider in case.providers:
                for mode in case.modes:
                    name = f"{case.op}-{case.shape}-{cases.dtype_name(case.dtype)}-{provider.name}-{mode}"
                    yield pytest.param(case, provider, mode, id=re.sub(r"[^\w.+=\-\[\],>]+", "_", name))


@pytest.mark.parametrize("case,provider,mode", list(_params()))
def test_benchmark(benchmark, case, provider, mode):
    if case.unavailable:
        pytest.skip(case.unavailable)
    try:
        runner = provider.build()
    except cases.Unavailable as exc:
        pytest.skip(str(exc))
    sets = measure.input_sets(case, measure.last_level_cache_bytes(DEVICE))
    with cases.backend_context(provider.backend):
        try:
            call = measure.make_call(runner, sets, mode)
            for _ in range(measure.WARMUP_CALLS):  # compilation, autotuning
                call()
        except cases.Unavailable as exc:
            pytest.skip(str(exc))
        except torch.OutOfMemoryError:  # a result (eager mixtures at the largest shapes), not a failure
            pytest.skip("out of memory")
        if DEVICE.type == "cuda":
            def timed():
                call()
                torch.cuda.synchronize()
        else:
            timed = call
        benchmark.extra_info.update(op=case.op, shape=case.shape, dtype=str(case.dtype), provider=provider.name,
                                    mode=mode, min_bytes=case.min_bytes.get(mode))
        benchmark(timed)
