"""Tables and plots drawn from results CSVs - never from anything else.

For each (device, op, shape, dtype, mode) the rows of the newest run that measured it are kept (runs
are told apart by the ``date`` column, the run's start), so a speed-up never divides figures from two
runs, and a later run of some ops updates those and leaves the others be. The **subject** of a
comparison is ``fastdensity`` where it was measured; on a machine without a GPU, where fastdensity
runs its reference path, it is ``eager`` and the tables say so. Speed-up = other provider's median
time / the subject's, so above 1 the subject is faster; losses are printed as plainly as wins
(``0.71x slower``, in bold in Markdown).

Command line (writes ``<slug>.md``, ``speedup-<slug>.png`` and, where peak memory was measured,
``memory-<slug>.png`` next to the CSV or into ``--out``)::

    python -m fastdensity.benchmarks.report benchmarks/results/nvidia-h100-80gb-hbm3.csv \\
        [--out DIR] [--readme README.md] [--mode forward+backward]

``--readme`` replaces the text between ``<!-- fastdensity-bench:begin -->`` and
``<!-- fastdensity-bench:end -->`` in that file with the table of ``--mode`` (default
forward+backward), so README.md always shows the generated table.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from .harness import MODES, read_rows

BEGIN = "<!-- fastdensity-bench:begin -->"
END = "<!-- fastdensity-bench:end -->"

# Providers that are not peers: the subject's own family (plus variants such as fastdensity_kernel).
OWN = ("fastdensity", "eager", "compiled")


def _own(provider: str) -> bool:
    return provider in OWN or provider.startswith("fastdensity")


def _num(value: str) -> float:
    try:
        return float(value) if value not in ("", None) else math.nan
    except ValueError:
        return math.nan


def _group(row: dict) -> tuple:
    return row["device"], row["op"], row["shape"], row["dtype"], row["mode"]


def latest(rows: Iterable[dict]) -> list[dict]:
    """The rows of the newest run in each (device, op, shape, dtype, mode), one per provider (a later
    row of the same run wins). Older runs' rows of that group are dropped even for providers the
    newest run did not measure: their figures came from other code, versions or machine state."""
    rows = list(rows)
    newest: dict[tuple, str] = {}
    for row in rows:
        newest[_group(row)] = max(row["date"], newest.get(_group(row), ""))
    best: dict[tuple, dict] = {}
    for row in rows:
        if row["date"] == newest[_group(row)]:
            best[(*_group(row), row["provider"])] = row
    return list(best.values())


def comparisons(rows: Iterable[dict], modes: Sequence[str] | None = None) -> list[dict]:
    """Group the latest rows into one comparison per (device, op, shape, dtype, mode).

    Each comparison: ``key`` fields, ``by`` (provider -> row), ``subject`` (provider name or None).
    Ordered as first seen (the harness writes ops in suite order), modes in :data:`MODES` order.
    """
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    order: list[tuple] = []
    for row in latest(rows):
        if row["op"] == "device_copy" or (modes and row["mode"] not in modes):
            continue
        key = _group(row)
        if key not in groups:
            order.append(key)
        groups[key][row["provider"]] = row
    mode_rank = {m: i for i, m in enumerate(MODES)}
    case_rank: dict[tuple, int] = {}
    for key in order:
        case_rank.setdefault(key[:4], len(case_rank))
    order.sort(key=lambda k: (case_rank[k[:4]], mode_rank.get(k[4], len(MODES))))
    out = []
    for key in order:
        by = groups[key]
        subject = "fastdensity" if "fastdensity" in by else ("eager" if "eager" in by else None)
        out.append({"device": key[0], "op": key[1], "shape": key[2], "dtype": key[3], "mode": key[4],
                    "by": by, "subject": subject})
    return out


def speedup(comp: dict, other: str) -> float:
    """other's median time / the subject's (> 1: the subject is faster); NaN when either is missing."""
    subject = comp["subject"]
    if subject is None or other not in comp["by"] or other == subject:
        return math.nan
    return _num(comp["by"][other]["median_ms"]) / _num(comp["by"][subject]["median_ms"])


def best_peer(comp: dict) -> str | None:
    peers = [p for p in comp["by"] if not _own(p) and math.isfinite(_num(comp["by"][p]["median_ms"]))]
    return min(peers, key=lambda p: _num(comp["by"][p]["median_ms"])) if peers else None


def _fmt_ms(row: dict | None) -> str:
    if row is None:
        return "-"
    ms = _num(row["median_ms"])
    return "-" if not math.isfinite(ms) else (f"{ms:.3g}" if ms < 100 else f"{ms:.0f}")


def _fmt_x(x: float, markdown: bool) -> str:
    if not math.isfinite(x):
        return "-"
    text = f"{x:.2f}x" if x < 10 else f"{x:.1f}x"
    if x < 0.995:
        text += " slower"
        return f"**{text}**" if markdown else text
    return text


def _subject_cell(sub: dict | None, subject: str | None, by: dict) -> str:
    if sub is None:
        return "-"
    if subject != "fastdensity":
        return f"{_fmt_ms(sub)} ({subject})"
    # Where the op dispatches among implementations, the kernel alone is measured too.
    kernel = by.get("fastdensity_kernel")
    return _fmt_ms(sub) + (f" (kernel {_fmt_ms(kernel)})" if kernel else "")


def _table_rows(comps: list[dict], markdown: bool) -> tuple[list[str], list[list[str]]]:
    header = ["op", "shape", "dtype", "mode", "subject ms", "eager ms", "compiled ms", "best peer ms",
              "vs eager", "vs compiled", "vs best peer", "GB/s (copy %)", "peak MB (eager MB)"]
    lines = []
    for c in comps:
        by, subject = c["by"], c["subject"]
        sub = by.get(subject) if subject else None
        peer = best_peer(c)
        gbps = _num(sub["gbps"]) if sub else math.nan
        frac = _num(sub["bw_fraction"]) if sub else math.nan
        peak = _num(sub["peak_mem_mb"]) if sub else math.nan
        peak_eager = _num(by["eager"]["peak_mem_mb"]) if "eager" in by else math.nan
        lines.append([
            c["op"], c["shape"], c["dtype"], c["mode"],
            _subject_cell(sub, subject, by),
            _fmt_ms(by.get("eager")) if subject != "eager" else "(subject)",
            _fmt_ms(by.get("compiled")),
            f"{_fmt_ms(by[peer])} ({peer})" if peer else "-",
            _fmt_x(speedup(c, "eager"), markdown),
            _fmt_x(speedup(c, "compiled"), markdown),
            _fmt_x(speedup(c, peer), markdown) if peer else "-",
            f"{gbps:.3g} ({frac:.0%})" if math.isfinite(gbps) and math.isfinite(frac) else "-",
            (f"{peak:.0f} ({peak_eager:.0f})" if math.isfinite(peak_eager) else f"{peak:.0f}")
            if math.isfinite(peak) else "-",
        ])
    return header, lines


def _devices_note(comps: list[dict], rows: list[dict]) -> str:
    """One line per (device, run) the table draws on: versions, commit, the run's copy bandwidth."""
    run_row = {(r["device"], r["date"]): r for r in rows}  # every row of a run carries its versions
    copies = {(r["device"], r["date"]): r for r in rows if r["op"] == "device_copy"}
    runs: dict[str, set[str]] = defaultdict(set)
    for c in comps:
        runs[c["device"]].update(row["date"] for row in c["by"].values())
    parts = []
    for device, dates in runs.items():
        subjects = {c["subject"] for c in comps if c["device"] == device}
        who = ("fastdensity = the Triton kernels" if "fastdensity" in subjects else
               "no fastdensity rows (kernels need a GPU): the subject is eager, the reference path fastdensity "
               "runs on CPU")
        for date in sorted(dates, reverse=True):
            r, copy = run_row[(device, date)], copies.get((device, date))
            copy_txt = f", device copy {float(copy['gbps']):.0f} GB/s" if copy else ""
            parts.append(f"{device}: torch {r['torch']}, Triton {r['triton']}, commit {r['commit']}, "
                         f"run {date}{copy_txt}; {who}.")
    return "\n".join(f"- {p}" for p in parts)


def markdown_table(rows: list[dict], modes: Sequence[str] | None = None) -> str:
    """A Markdown table of the latest results; times are medians in ms, speed-ups of the subject."""
    comps = comparisons(rows, modes)
    if not comps:
        return "_No benchmark rows._\n"
    header, lines = _table_rows(comps, markdown=True)
    out = [_devices_note(comps, rows), "",
           "Speed-ups are the other provider's median time over the subject's (above 1: the subject is "
           "faster). GB/s counts the op's minimum bytes (see benchmarks/NOTES.md) over the subject's "
           "median time. Peak memory: the call's own footprint on CUDA; not measured on CPU.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines]
    return "\n".join(out) + "\n"


def text_table(rows: list[dict], modes: Sequence[str] | None = None) -> str:
    """The same table as plain aligned text, for the terminal."""
    comps = comparisons(rows, modes)
    if not comps:
        return "(no results)"
    header, lines = _table_rows(comps, markdown=False)
    keep = [i for i in range(len(header)) if any(line[i] not in ("-", "") for line in lines) or i < 4]
    header = [header[i] for i in keep]
    lines = [[line[i] for i in keep] for line in lines]
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*l) for l in lines])


def update_readme(readme: Path, table: str) -> None:
    """Replace the block between the markers in ``readme`` with ``table``; the markers must exist."""
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {BEGIN} ... {END} block to fill")
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}{END}", text), encoding="utf-8")


def _label(c: dict) -> str:
    return f"{c['op']}\n{c['shape']}\n{c['dtype']}"


def plot(rows: list[dict], out_dir: Path, slug: str, mode: str = "forward+backward") -> list[Path]:
    """Speed-up (over eager, compiled and the best peer) and peak-memory bar charts, one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = [c for c in comparisons(rows, [mode]) if c["subject"]]
    written = []
    if not comps:
        return written
    out_dir.mkdir(parents=True, exist_ok=True)
    subject_names = sorted({c["subject"] for c in comps})
    series = [("vs eager", lambda c: speedup(c, "eager")), ("vs compiled", lambda c: speedup(c, "compiled")),
              ("vs best peer", lambda c: speedup(c, best_peer(c)) if best_peer(c) else math.nan)]
    values = {name: [fn(c) for c in comps] for name, fn in series}
    values = {name: v for name, v in values.items() if any(math.isfinite(x) for x in v)}
    width = 0.8 / max(1, len(values))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(comps) + 2), 5.5))
    finite = [x for v in values.values() for x in v if math.isfinite(x)]
    for i, (name, vals) in enumerate(values.items()):
        xs = [j + (i - (len(values) - 1) / 2) * width for j in range(len(comps))]
        # Bars grow from 1: up where the subject wins, down where it loses.
        ax.bar(xs, [v - 1 if math.isfinite(v) else 0 for v in vals], width, bottom=1, label=name)
        for x, v in zip(xs, vals):
            if math.isfinite(v):
                ax.annotate(f"{v:.2g}", (x, v), ha="center", va="bottom" if v >= 1 else "top", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    if finite:
        ax.set_ylim(min(0.8, min(finite) / 1.5), max(1.25, max(finite) * 1.5))
    ax.set_ylabel("speed-up: other median / subject median")
    ax.set_xticks(range(len(comps)))
    ax.set_xticklabels([_label(c) for c in comps], fontsize=6, rotation=90)
    ax.set_title(f"{comps[0]['device']}, {mode}\nsubject: {'/'.join(subject_names)} "
                 "(above 1 it is faster, below 1 slower)", fontsize=9)
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / f"speedup-{slug}.png"))

    mem = [c for c in comps if math.isfinite(_num(c["by"][c["subject"]]["peak_mem_mb"]))]
    if mem:
        providers = sorted({p for c in mem for p in c["by"] if math.isfinite(_num(c["by"][p]["peak_mem_mb"]))},
                           key=lambda p: (not _own(p), OWN.index(p) if p in OWN else len(OWN), p))
        width = 0.8 / len(providers)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(mem) + 2), 5))
        for i, p in enumerate(providers):
            values = [_num(c["by"][p]["peak_mem_mb"]) if p in c["by"] else math.nan for c in mem]
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(mem))]
            ax.bar(xs, [v if math.isfinite(v) else 0 for v in values], width, label=p)
        ax.set_yscale("log")
        ax.set_ylabel("peak memory of one call, MiB (above what was allocated before it)")
        ax.set_xticks(range(len(mem)))
        ax.set_xticklabels([_label(c) for c in mem], fontsize=6, rotation=90)
        ax.set_title(f"{mem[0]['device']}, {mode}: peak memory", fontsize=9)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / f"memory-{slug}.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(csv_paths: Sequence[Path], out_dir: Path | None = None, readme: Path | None = None,
           mode: str = "forward+backward") -> list[Path]:
    """Markdown (all modes) and plots for each CSV; the README block gets ``mode``'s table of all CSVs.
    Without matplotlib the plots are left out (with a note on stderr) and the rest is still written."""
    written = []
    all_rows = []
    for csv_path in csv_paths:
        rows = read_rows(csv_path)
        all_rows += rows
        slug = Path(csv_path).stem
        target = out_dir or Path(csv_path).parent
        target.mkdir(parents=True, exist_ok=True)
        md = target / f"{slug}.md"
        md.write_text(f"# Benchmark results: {slug}\n\nGenerated by `python -m fastdensity.benchmarks.report` "
                      f"from `{Path(csv_path).name}`; do not edit.\n\n" + markdown_table(rows), encoding="utf-8")
        written.append(md)
        try:
            written += plot(rows, target, slug, mode)
        except ImportError as exc:  # the table is the result; plots are an extra (pip install matplotlib)
            print(f"no plots for {slug}: {exc}", file=sys.stderr)
    if readme is not None:
        update_readme(readme, markdown_table(all_rows, [mode]))
        written.append(readme)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdensity.benchmarks.report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", type=Path, help="results CSV(s) written by the harness")
    parser.add_argument("--out", type=Path, default=None, help="folder for the .md and .png (default: beside each CSV)")
    parser.add_argument("--readme", type=Path, default=None, help="fill this file's benchmark block with the table")
    parser.add_argument("--mode", default="forward+backward", choices=MODES, help="mode of the plots and README table")
    args = parser.parse_args(argv)
    for path in render(args.csv, args.out, args.readme, args.mode):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
