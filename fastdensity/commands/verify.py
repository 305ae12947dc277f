"""``fastdensity verify``: every kernel against the float64 reference, values and gradients.

Prints one line per output and per input gradient - the kernel's and eager PyTorch's max error
against the float64 reference and the bound of the tolerance rule (docs/design.md, Tests) - and exits with status 1 when any
check fails. On CUDA it checks realistic shapes in float32, bfloat16, float16 and float64; on a CPU
the kernels run in Triton's interpreter at tiny shapes in float32 and float64. The cases live in
:mod:`fastdensity.verify`.

Triton chooses its interpreter when the kernels are imported, which happens with ``import
fastdensity`` - before any command runs. So on a CPU, unless the process was started with
``TRITON_INTERPRET=1``, the command runs itself again in a child process with that variable set.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from fastdensity import op_table

DTYPES = ("float32", "bfloat16", "float16", "float64")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where the kernels run (default: cuda when available, else cpu via the interpreter)")
    parser.add_argument("--op", nargs="+", metavar="NAME", default=None,
                        help=f"ops to check (default: all): {' '.join(op_table.names())} "
                             "(or their functions' names, e.g. affine_coupling)")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=None,
                        help="dtypes to check (default: every dtype the device supports)")


def _argv(args: argparse.Namespace) -> list[str]:
    argv = ["--device", args.device or "cpu"]
    if args.op:
        argv += ["--op", *args.op]
    if args.dtype:
        argv += ["--dtype", *args.dtype]
    return argv


def run(args: argparse.Namespace) -> int:
    import torch

    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        print("fastdensity verify: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        from fastdensity.kernels import utils as kernel_utils
    except ImportError as exc:
        print(f"fastdensity verify: the kernels cannot be imported ({exc}); is Triton installed?", file=sys.stderr)
        return 2
    if device_name == "cpu" and not kernel_utils.INTERPRETED:
        if os.environ.get("TRITON_INTERPRET") == "1":  # set, yet the kernels were imported before it was
            print("fastdensity verify: the kernels were imported without Triton's interpreter; "
                  "set TRITON_INTERPRET=1 before importing fastdensity", file=sys.stderr)
            return 2
        env = dict(os.environ, TRITON_INTERPRET="1")
        args.device = "cpu"
        # `python -m` puts its working folder first on sys.path. Started from a source checkout, the
        # child would import the source folder fastdensity/, which lacks the kernels/ mapping of an
        # installed copy; from the folder that holds the package this process imported, it gets that.
        import fastdensity

        home = os.path.dirname(os.path.dirname(os.path.abspath(fastdensity.__file__)))
        return subprocess.call([sys.executable, "-m", "fastdensity.commands.verify", *_argv(args)], env=env,
                               cwd=home)

    from fastdensity import verify

    device = torch.device(device_name)
    dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else None
    try:
        case_list = verify.cases(device, args.op)
    except ValueError as exc:
        print(f"fastdensity verify: {exc}", file=sys.stderr)
        return 2
    how = "Triton's interpreter on CPU, tiny shapes" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"fastdensity verify: {len(case_list)} cases on {how}; "
          "rule: |kernel - ref64| <= 2 |eager - ref64| + atol(dtype)", flush=True)
    print(verify.format_row(verify.HEADER))
    print(verify.format_rule(), flush=True)

    def show(outcome):  # row by row, so a run cut short still shows what it checked
        for row in verify.outcome_rows(outcome):
            print(verify.format_row(row), flush=True)

    outcomes = verify.verify(device, args.op, dtypes, on_outcome=show)
    failed = [o for o in outcomes if not o.passed]
    skipped = [o for o in outcomes if o.skipped]
    checked = sum(len(o.comparisons) for o in outcomes)
    print(f"\n{checked} comparisons in {len(outcomes) - len(skipped)} (case, dtype) runs: "
          f"{len(failed)} failed, {len(skipped)} skipped (op not in this build)")
    return 1 if failed else 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="fastdensity verify", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
