"""The benchmark modules by name: ``fastdensity bench --op NAME`` and the pytest-benchmark cases use this.

One module per op of the op table (``bench_<op>``, see ``fastdensity.op_table``), then the modules that
measure whole models rather than one op. Each defines ``cases(settings) -> list[Case]``.
"""
from __future__ import annotations

import importlib

from fastdensity import op_table

from .harness import Case, Settings

#: benchmark modules that are not one op's
WHOLE_MODEL_MODULES = {"models": "bench_models", "sampling": "bench_sampling", "tarflow": "bench_tarflow",
                       "memory": "bench_memory"}


#: --op name -> module of fastdensity.benchmarks: the ops in table order, then the model benchmarks
MODULES = {**{op.name: f"bench_{op.name}" for op in op_table.OPS}, **WHOLE_MODEL_MODULES}


def names() -> list[str]:
    return list(MODULES)


def load_cases(names: list[str] | None, settings: Settings, *, headline: bool = False) -> dict[str, list[Case]]:
    """The cases of each named module (all modules when ``names`` is None), in :data:`MODULES` order.
    An op may also be named by one of its public functions (``affine_coupling`` for ``coupling``).
    ``headline``: only each module's :func:`headline_case` (``fastdensity bench --headline``)."""
    table = MODULES
    if names is not None:
        by_function = {f: op.name for op in op_table.OPS for f in op.functions}
        names = [by_function.get(n, n) for n in names]
        unknown = sorted(set(names) - set(table))
        if unknown:
            raise ValueError(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(table)}")
    out = {}
    for name, module in table.items():
        if names is None or name in names:
            cases = importlib.import_module(f"fastdensity.benchmarks.{module}").cases(settings)
            out[name] = [headline_case(cases)] if headline and cases else cases
    return out


#: Providers that are fastdensity or its own baselines rather than a yardstick from outside it (the
#: names starting with "fastdensity" are fastdensity's too, e.g. masked conv's fastdensity_kernel).
OWN_BASELINES = ("eager", "compiled")


def is_yardstick(provider_name: str) -> bool:
    """A provider that is what a user would run instead of fastdensity: a peer library (nflows, zuko,
    normflows), torch's own function (torch.logsumexp) or the dense cuDNN / cuBLAS op."""
    return not provider_name.startswith("fastdensity") and provider_name not in OWN_BASELINES


def headline_case(cases: list[Case]) -> Case:
    """A module's one case for a short run: the first compared with a yardstick (:func:`is_yardstick`),
    else the first. Taken after the ``--dtype`` filter: its dtype is the module's first default dtype
    unless ``--dtype`` names others."""
    return next((c for c in cases if any(is_yardstick(p.name) for p in c.providers)), cases[0])
