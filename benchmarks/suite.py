"""The benchmark modules by name: ``fastdensity bench --op NAME`` and the pytest-benchmark cases use this."""
from __future__ import annotations

import importlib

from .harness import Case, Settings

#: --op name -> module of fastdensity.benchmarks; each defines ``cases(settings) -> list[Case]``.
MODULES = {
    "coupling": "bench_coupling",
    "logsumexp": "bench_logsumexp",
    "gaussian_mixture": "bench_gaussian_mixture",
    "logistic_mixture": "bench_logistic_mixture",
    "dmol": "bench_dmol",
    "masked_conv": "bench_masked_conv",
    "masked_linear": "bench_masked_linear",
    "models": "bench_models",
}


def load_cases(names: list[str] | None, settings: Settings) -> dict[str, list[Case]]:
    """The cases of each named module (all modules when ``names`` is None), in :data:`MODULES` order."""
    unknown = sorted(set(names or ()) - set(MODULES))
    if unknown:
        raise ValueError(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    out = {}
    for name, module in MODULES.items():
        if names is None or name in names:
            out[name] = importlib.import_module(f"fastdensity.benchmarks.{module}").cases(settings)
    return out
