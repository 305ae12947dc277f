"""``python -m fastdensity.sm90 record RECORDS.json [--quick]`` | ``compile RECORDS.json RESULTS.json``.

``record`` runs the dry run of :mod:`.launches` and needs ``TRITON_INTERPRET=1`` in the environment;
``compile`` compiles the records for sm_90 (:mod:`.compile`) and needs it unset (the mode is fixed when
fastdensity, and with it the kernels, is imported, before this runs). Both are subprocess steps of
:mod:`.table`, which sets the environment and runs ``compile`` under each Triton to compare; use
``fastdensity info --kernels`` for the table.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdensity.sm90")
    commands = parser.add_subparsers(dest="command", required=True)
    record = commands.add_parser("record", help="record the launches a GPU would make (a dry run on CPU)")
    record.add_argument("records")
    record.add_argument("--quick", action="store_true", help="the CI subset (fastdensity.sm90.launches.quick_subset)")
    compile_ = commands.add_parser("compile", help="compile recorded launches for sm_90 and read ptxas' figures")
    compile_.add_argument("records")
    compile_.add_argument("results")
    compile_.add_argument("--part", default="", help="which share of a set split across processes this is")
    args = parser.parse_args(argv)

    from fastdensity.kernels.utils import INTERPRETED

    if INTERPRETED != (args.command == "record"):
        raise SystemExit(f"{args.command}: run with TRITON_INTERPRET {'=1' if args.command == 'record' else 'unset'}")
    if args.command == "record":
        from .launches import record_launches

        records, errors = record_launches(quick=args.quick)
        with open(args.records, "w") as f:
            json.dump({"records": records, "errors": errors}, f)
        return 0
    from .compile import main as compile_main

    return compile_main(args.records, args.results, args.part)


if __name__ == "__main__":
    sys.exit(main())
