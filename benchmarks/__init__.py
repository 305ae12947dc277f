"""Benchmark harness of fastdensity (installed as ``fastdensity.benchmarks``).

One job per module: ``cases`` (what a benchmark is: cases, providers, settings), ``measure`` (timing
one case with one provider in one mode), ``schedule`` (what runs in which order within a time budget),
``record`` (the results CSV and its metadata); ``harness`` gathers their names for the bench modules.
``bench_<op>`` is one module per op of the op table (its benchmark cases and the shapes ``fastdensity
verify`` checks), ``bench_models`` the models' training steps, ``suite`` the list of them, ``report``
the tables and plots drawn from a CSV. Run it with ``fastdensity bench`` (or
``pytest benchmarks/ --benchmark-only``); ``benchmarks/run_gpu.sh`` runs everything on a GPU machine.
See ``benchmarks/NOTES.md`` for each op's minimum traffic and the floors it implies.
"""
