"""``fastdensity info``: versions, devices, and which backend ``auto`` picks and why."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", action="store_true",
                        help="print the op table (each op's functions and files) as markdown instead")
    parser.add_argument("--readme", metavar="PATH", default=None,
                        help="with --ops: rewrite the op table between the markers of this README instead")
    parser.add_argument("--kernels", action="store_true",
                        help="compile every kernel launch of the verify and GPU benchmark cases for sm_90 (no GPU needed) "
                             "and print registers, spills, shared memory and occupancy per launch (minutes; cached)")
    parser.add_argument("--triton-python", metavar="PYTHON", action="append", default=[],
                        help="with --kernels: also compile under this interpreter's Triton (e.g. the GPU machine's 3.6; "
                             "it needs only torch and triton installed); repeatable")
    parser.add_argument("--quick", action="store_true", help="with --kernels: only the CI subset of the launches")
    parser.add_argument("--problems", action="store_true", help="with --kernels: only the launches over the budget")
    parser.add_argument("--only", metavar="SUBSTRING", default=None,
                        help="with --kernels: only the kernels whose name (e.g. coupling._coupling_fwd_kernel) "
                             "contains SUBSTRING; the others are not compiled")


def _version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    if args.ops:
        return _ops_table(args.readme)
    if args.kernels:
        from fastdensity.sm90 import table

        text, status = table.report([None, *args.triton_python], quick=args.quick, only_problems=args.problems,
                                    only=args.only)
        print(text)
        return status
    if args.readme:
        print("fastdensity info: --readme goes with --ops", file=sys.stderr)
        return 2
    import platform

    import torch

    import fastdensity
    from fastdensity import backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"fastdensity  {fastdensity.__version__}",
        f"python       {platform.python_version()} ({platform.platform()})",
        f"torch        {torch.__version__}",
        f"triton       {triton_version}",
        f"CUDA         {torch.version.cuda or 'none (CPU build of torch)'}"
        + (f", cuDNN {torch.backends.cudnn.version()}" if torch.cuda.is_available() else ""),
        f"CPU          {_cpu()} - torch uses {torch.get_num_threads()} threads",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}        {p.name}, compute capability {p.major}.{p.minor}, "
                         f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    else:
        lines.append("GPU          none visible to torch")
    lines.append("peers        " + ", ".join(f"{m} {_version(m)}" for m in ("nflows", "zuko", "normflows")))
    lines.append("")
    lines.append(backend.describe())
    print("\n".join(lines))
    return 0


def _ops_table(readme: str | None) -> int:
    from fastdensity import op_table

    if readme is None:
        print(op_table.markdown_table())
        return 0
    try:
        changed = op_table.update_readme(readme)
    except (OSError, ValueError) as exc:
        print(f"fastdensity info: {exc}", file=sys.stderr)
        return 2
    print(f"{readme}: {'op table updated' if changed else 'op table already up to date'}")
    return 0


def _cpu() -> str:
    from fastdensity.benchmarks.record import cpu_model

    return cpu_model()


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="fastdensity info")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
