"""Subcommands of the ``fastdensity`` command, one module each (see ``fastdensity/cli.py``).

Each module defines ``add_arguments(parser)`` and ``run(args) -> int``. Modules import heavy
dependencies (fastdensity itself, matplotlib, the benchmark harness) inside ``run``, not at the top.
"""
