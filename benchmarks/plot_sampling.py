"""PixelCNN sampling time against image size, drawn from the harness's results CSV (never typed in).

Reads the ``sample_pixelcnn`` rows of the growth curve (``bench_sampling``: 1xSxS, B = 1, k = 7) of
the newest run per case, and plots median time (20th-80th percentile bars) against the number of
pixels H * W for each sampler on log-log axes, with the slopes 1 (linear) and 2 (quadratic) drawn
through each curve's first point for reference::

    python -m fastdensity.benchmarks.plot_sampling benchmarks/results/<slug>.csv -o curve.png

The title names the device and the run date of the rows, so a picture says where it was measured.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from .bench_sampling import CURVE_BATCH, OP_PIXELCNN
from .record import read_rows
from .report import latest

#: sampler names in the legend, by provider
LABELS = {"fastdensity": "cached (fastdensity default)", "eager": "naive (whole network per pixel)",
          "compiled": "naive, torch.compile'd network"}

_CURVE_SHAPE = re.compile(rf"^1x(\d+)x(\d+) B={CURVE_BATCH} kernel_size=7$")


def curve_points(rows) -> dict[str, list[tuple[int, float, float, float]]]:
    """provider -> [(pixels, median, p20, p80) in ms], sorted by pixels, from the newest run of each case."""
    points: dict[str, list] = {}
    for row in latest(rows):
        match = _CURVE_SHAPE.match(row["shape"])
        if row["op"] != OP_PIXELCNN or not match or row["provider"] not in LABELS or not row["median_ms"]:
            continue
        pixels = int(match.group(1)) * int(match.group(2))
        points.setdefault(row["provider"], []).append(
            (pixels, float(row["median_ms"]), float(row["p20_ms"]), float(row["p80_ms"])))
    return {p: sorted(v) for p, v in points.items()}


def plot(rows, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    points = curve_points(rows)
    if not points:
        raise ValueError(f"no {OP_PIXELCNN} growth-curve rows (shape 1xSxS B={CURVE_BATCH} kernel_size=7) in the CSV")
    curve_rows = [r for r in latest(rows) if r["op"] == OP_PIXELCNN and _CURVE_SHAPE.match(r["shape"])]
    devices = sorted({r["device"] for r in curve_rows})
    dates = sorted({r["date"] for r in curve_rows})
    fig, ax = plt.subplots(figsize=(7, 5))
    for provider, pts in points.items():
        px = [p[0] for p in pts]
        med = [p[1] for p in pts]
        err = [[m - p[2] for m, p in zip(med, pts)], [p[3] - m for m, p in zip(med, pts)]]
        line = ax.errorbar(px, med, yerr=err, marker="o", capsize=3, label=LABELS[provider])
        for slope, style in ((1, ":"), (2, "--")):
            ref = [med[0] * (x / px[0]) ** slope for x in px]
            ax.plot(px, ref, style, color=line[0].get_color(), alpha=0.4, linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    sizes = sorted({int(math.isqrt(p[0])) for pts in points.values() for p in pts})
    ax.set_xticks([s * s for s in sizes], [f"{s}x{s}" for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("image size (H x W pixels, log scale)")
    ax.set_ylabel(f"time per batch of {CURVE_BATCH} (ms, log scale)")
    ax.plot([], [], "k:", alpha=0.4, label="slope 1 (linear in H*W)")
    ax.plot([], [], "k--", alpha=0.4, label="slope 2 (quadratic in H*W)")
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(f"PixelCNN sampling time vs image size (k=7, F=32, 4 blocks)\n"
                 f"harness rows measured on {', '.join(devices)}; run {', '.join(dates)}", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdensity.benchmarks.plot_sampling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path, help="a results CSV written by fastdensity bench")
    parser.add_argument("-o", "--out", type=Path, default=None, help="PNG (default: sampling-curve-<csv stem>.png "
                                                                      "beside the CSV)")
    args = parser.parse_args(argv)
    out = args.out or args.csv.with_name(f"sampling-curve-{args.csv.stem}.png")
    print(plot(read_rows(args.csv), out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
