"""``python -m fastdensity.sm90 record RECORDS.json [--quick]`` | ``compile RECORDS.json RESULTS.json``.

``record`` runs the dry run of :mod:`.launches` (it sets ``TRITON_INTERPRET=1`` itself, before fastdensity
is imported); ``compile`` compiles the records for sm_90 (:mod:`.compile`, without the interpreter).
Both are subprocess steps of :func:`fastdensity.sm90.table.measure`, which runs ``compile`` under each
Triton to compare; use ``fastdensity info --kernels`` for the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdensity.sm90")
    commands = parser.add_subparsers(dest="command", required=True)
    record = commands.add_parser("record", help="record the launches a GPU would make (a dry run on CPU)")
    record.add_argument("records")
    record.add_argument("--quick", action="store_true", help="the CI subset (see fastdensity.sm90.table.QUICK)")
    compile_ = commands.add_parser("compile", help="compile recorded launches for sm_90 and read ptxas' figures")
    compile_.add_argument("records")
    compile_.add_argument("results")
    compile_.add_argument("--part", default="", help="which share of a set split across processes this is")
    args = parser.parse_args(argv)

    if args.command == "record":
        if "fastdensity" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("record: fastdensity was imported without TRITON_INTERPRET=1; run it as a fresh process")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
        from .launches import record_launches

        records, errors = record_launches(quick=args.quick)
        with open(args.records, "w") as f:
            json.dump({"records": records, "errors": errors}, f)
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    from .compile import main as compile_main

    return compile_main(args.records, args.results, args.part)


if __name__ == "__main__":
    sys.exit(main())
