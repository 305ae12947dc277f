"""Benchmark harness of fastdensity (installed as ``fastdensity.benchmarks``).

``harness`` is the measuring core (cases, providers, timers, rotation, the results CSV), ``bench_<op>``
one module per op and ``bench_models`` the models' training steps, ``suite`` the list of them,
``report`` the tables and plots drawn from a CSV. Run it with ``fastdensity bench`` (or
``pytest benchmarks/ --benchmark-only``); ``benchmarks/run_gpu.sh`` runs everything on a GPU machine.
See ``benchmarks/NOTES.md`` for each op's minimum traffic and the floors it implies.
"""
