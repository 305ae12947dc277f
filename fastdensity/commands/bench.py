"""``fastdensity bench``: the benchmark suite (``fastdensity.benchmarks``) with a progress bar and a table.

Runs every benchmark module (or those named by ``--op``) on one device, appends the measured rows to
``<results>/<device-slug>.csv`` and prints the comparison table. Where results go:

* ``--results DIR``: ``DIR/<device-slug>.csv``;
* otherwise a full run writes to ``benchmarks/results/`` of the source checkout (the folder the
  committed results live in), or ``./fastdensity-bench/`` for an installed copy without it;
* ``--quick`` (a smoke test: small shapes, few repetitions, 90 s budget by default) writes nothing
  unless ``--results`` is given, so smoke runs never mix with committed results; ``--no-save`` writes
  nothing in any case.

On a machine without a GPU the ``fastdensity`` provider is skipped (the Triton kernels need one;
on CPU fastdensity runs its reference, which is the ``eager`` provider), and the run compares the
reference with ``torch.compile`` and the peer libraries at small shapes.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fastdensity.benchmarks import suite

MODES = ("forward", "backward", "forward+backward")
DTYPES = ("float32", "bfloat16", "float16", "float64")

if TYPE_CHECKING:
    from fastdensity.benchmarks.measure import Skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", nargs="+", metavar="NAME", default=None,
                        help=f"benchmarks to run (default: all): {' '.join(suite.names())}")
    parser.add_argument("--headline", action="store_true",
                        help="one case per benchmark module: the first compared with a yardstick (a peer library, "
                             "torch's own op, dense cuDNN/cuBLAS), else the first; the short GPU run uses this")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and short timings (a smoke test: under two minutes on a CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=None,
                        help="dtypes to run (default: each case's own, e.g. bf16 and fp32 on a GPU, fp32 on CPU)")
    parser.add_argument("--provider", nargs="+", metavar="NAME", default=None,
                        help="only these providers (fastdensity, eager, compiled, nflows, zuko, normflows, ...)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=None, help="default: all three")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="time for the whole run, shared among the ops (default: 90 with --quick, else none)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's; use 1 on a machine other jobs are loading)")
    parser.add_argument("--results", type=Path, default=None, metavar="DIR", help="folder of <device-slug>.csv")
    parser.add_argument("--no-save", action="store_true", help="write no CSV")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar; each measurement and skip is printed as it happens instead")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")


def results_path(args: argparse.Namespace, slug: str) -> Path | None:
    """The CSV this run appends to, or None (see the module docstring)."""
    if args.no_save:
        return None
    if args.results is not None:
        return args.results / f"{slug}.csv"
    if args.quick:
        return None
    import fastdensity.benchmarks as pkg

    committed = Path(pkg.__file__).resolve().parent / "results"
    return (committed if committed.is_dir() else Path("fastdensity-bench")) / f"{slug}.csv"


def run(args: argparse.Namespace) -> int:
    import torch

    from fastdensity.benchmarks import cases as bench_cases
    from fastdensity.benchmarks import record, report, suite

    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        print("fastdensity bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(device_name)
    dtypes = tuple(getattr(torch, d) for d in args.dtype) if args.dtype else None
    settings = bench_cases.Settings(device, quick=args.quick, dtypes=dtypes)
    try:
        cases = suite.load_cases(args.op, settings, headline=args.headline)
    except ValueError as exc:
        print(f"fastdensity bench: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for op, op_cases in cases.items():
            for c in op_cases:
                names = ", ".join(p.name for p in c.providers)
                note = f"  [unavailable: {c.unavailable}]" if c.unavailable else ""
                print(f"{op:<17} {c.op:<28} {c.shape:<40} {bench_cases.dtype_name(c.dtype):<9} {names}{note}")
        return 0
    if device.type == "cpu":
        print("No GPU here: the Triton kernels need one, so the fastdensity provider is skipped. On CPU fastdensity "
              "runs its reference (the eager provider); comparing it with torch.compile and the peer libraries at "
              "small shapes.")
    path = results_path(args, record.device_slug(device))
    writer = record.ResultsWriter(path) if path else None
    budget = args.budget if args.budget is not None else (90.0 if args.quick else None)
    result = run_and_record(cases, device=device, quick=args.quick, budget_s=budget, writer=writer,
                            providers=args.provider, modes=args.mode, progress=not args.no_progress)
    print()
    print(report.text_table(result.rows))
    _print_skips(result.skips)
    if path:
        print(f"\n{len(result.rows)} rows appended to {path}")
    return 1 if result.errors else 0


@dataclass
class RunResult:
    """What one run recorded: its CSV rows (the yardstick's first) and what it did not measure."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)

    @property
    def errors(self) -> list[Skip]:
        return [s for s in self.skips if s.kind == "error"]


def run_and_record(cases_by_op, *, device, quick: bool = False, budget_s: float | None = None, writer=None,
                   providers=None, modes=None, progress: bool = True, timer=None, copy_bytes: int | None = None,
                   compile_reserve_s: float | None = None, log: Callable[[str], None] = print) -> RunResult:
    """Run the benchmark schedule (``fastdensity.benchmarks.schedule``) and record and show what it yields.

    Each measurement becomes a row, appended to ``writer`` (when given) as soon as it is taken, so a
    run cut short keeps what it measured. A progress bar shows the run; without one (``progress``
    False) every row and skip is logged as it happens, so a run that is killed still says what it did.
    ``timer``, ``copy_bytes`` and ``compile_reserve_s`` go to ``schedule.run`` (tests set them).
    """
    from tqdm.auto import tqdm

    from fastdensity.benchmarks import measure, record, schedule

    meta = record.run_metadata(device)
    steps = schedule.plan(cases_by_op, providers=providers, modes=modes)
    result = RunResult()
    bar = tqdm(total=schedule.size(steps), desc="bench", unit="meas", disable=not progress, leave=False)
    echo = (lambda text: None) if progress else log
    try:
        for outcome in schedule.run(steps, device=device, quick=quick, budget_s=budget_s, timer=timer,
                                    copy_bytes=copy_bytes, compile_reserve_s=compile_reserve_s):
            if isinstance(outcome, schedule.Running):
                bar.set_postfix_str(str(outcome)[:60])
                continue
            if isinstance(outcome, measure.Skip):
                result.skips.append(outcome)
                echo(f"not measured: {outcome}")
                bar.update(1)
                continue
            row = record.measurement_row(outcome, meta)
            result.rows.append(row)
            if writer is not None:
                writer.append(row)
            if outcome.op == measure.COPY_OP:  # the yardstick: not one of the bar's measurements
                log(f"device copy bandwidth: {outcome.gbps:.1f} GB/s (copy_ of {outcome.shape} float32, "
                    "bytes read + written)")
                continue
            echo(f"{row['op']} {row['shape']} {row['dtype']} {row['provider']} {row['mode']}: "
                 f"median {row['median_ms']:.4g} ms")
            bar.update(1)
    finally:
        bar.close()
    return result


def _print_skips(skips) -> None:
    """Skips grouped by (provider, kind, reason); errors listed one by one."""
    if not skips:
        return
    groups: dict[tuple, list] = {}
    for s in skips:
        if s.kind == "error":
            continue
        groups.setdefault((s.provider, s.kind, s.reason), []).append(s)
    print("\nnot measured:")
    for (provider, kind, reason), items in groups.items():
        ops = sorted({s.op for s in items})
        print(f"  {provider}: {kind} ({len(items)} measurements; {', '.join(ops)}) - {reason}")
    for s in skips:
        if s.kind == "error":
            print(f"  ERROR {s}")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="fastdensity bench", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
