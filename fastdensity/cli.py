"""The ``fastdensity`` command (console script and ``python -m fastdensity``).

Each subcommand lives in ``fastdensity/commands/<name>.py`` with two functions,
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status); this file only wires them up.
Subcommand modules are imported when their command runs, so ``fastdensity --help`` stays fast and
``verify`` can choose Triton's interpreter before any kernel is imported.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> one-line help; the module fastdensity.commands.<name> implements it.
COMMANDS = {
    "train": "train a density model by maximum likelihood",
    "evaluate": "test NLL and bits/dim of a trained checkpoint on a dataset",
    "sample": "draw samples from a trained checkpoint to a PNG or .npy file",
    "bench": "benchmark the kernels against eager PyTorch, torch.compile and peer libraries",
    "verify": "check every kernel's values and gradients against the float64 reference",
    "info": "versions, device, and which backend 'auto' picks and why",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdensity", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"fastdensity.commands.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(f"fastdensity.commands.{args.command}")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
