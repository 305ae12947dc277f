"""Static sm_90 tier: every kernel launch a GPU makes compiles for an H100 within its budget.

Triton's interpreter runs a kernel's body as NumPy and never invokes the compiler, so type errors,
layouts the backend rejects, register spills and shared memory a block cannot have would first show
up on a GPU, where time is scarce. This tier records the launches the launchers make at
``fastdensity verify``'s CPU and GPU shapes and at the GPU benchmark shapes - a dry run on the CPU in
which the launchers decide as on an H100 (``fastdensity.sm90.launches``) - compiles each for sm_90 with
Triton's real compiler and its bundled ptxas, no GPU needed, and requires of each launch:

* it compiles;
* ptxas spills no register (every spilled byte is local-memory traffic on the hot path);
* its shared memory fits one block (227 KiB: more compiles, then fails at launch);
* its occupancy on a Hopper SM reaches the floor its module states beside the kernel
  (``SM90_OCCUPANCY_FLOOR``; an entry ``"_kernel[float64]"`` holds for that dtype only), or
  ``DEFAULT_FLOOR`` (0.125: 2 warps per scheduler).

It runs under CI's Triton and, where ``FASTDENSITY_TRITON36_PYTHON`` names an interpreter with torch and
Triton 3.6.0 installed (the GPU machine's Triton; .ci/run makes one), under that Triton too. CI compiles
the quick set (``fastdensity.sm90.launches.QUICK_DTYPES``: no float16, no whole-model benchmarks);
``FASTDENSITY_SM90_FULL=1`` compiles every launch, as ``fastdensity info --kernels`` does. Results are
cached per launch, Triton version and kernel source hash (``FASTDENSITY_SM90_CACHE``, default
``~/.cache/fastdensity/sm90``), so a rerun compiles only what changed.

Launches over the budget today are listed in :data:`KNOWN_OVER_BUDGET` with their measured figures:
each entry is a strict xfail, so the fix that brings its launches within budget fails the test until
the entry is removed, and a launch over budget that no entry names fails the suite.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

pytest.importorskip("triton")

from fastdensity.sm90 import table  # noqa: E402
from fastdensity.sm90.launches import all_kernels  # noqa: E402

FULL = os.environ.get("FASTDENSITY_SM90_FULL", "") == "1"
#: label -> interpreter whose Triton compiles (None: this one, CI's)
TRITONS = {"ci": None, "3.6": os.environ.get("FASTDENSITY_TRITON36_PYTHON") or ""}


@dataclass(frozen=True)
class OverBudget:
    """Launches of ``kernel`` in one of ``dtypes`` with the tile sizes and launch options ``where``
    ("BLOCK_M=64 BLOCK_N=128 warps=4 stages=3") that are over the budget under the Tritons whose version
    starts with one of ``tritons``."""

    kernel: str
    dtypes: tuple[str, ...]
    tritons: tuple[str, ...]
    where: str
    measured: str

    def matches(self, row: table.Row) -> bool:
        if row.kernel != self.kernel or row.dtype not in self.dtypes:
            return False
        values = _values(row)
        return all(str(values.get(k)) == v for k, v in (item.split("=") for item in self.where.split()))

    def applies_to(self, triton_version: str) -> bool:
        return any(triton_version.startswith(t) for t in self.tritons)

    def __str__(self) -> str:
        return f"{self.kernel}[{'|'.join(self.dtypes)},{self.where.replace(' ', ',')}]@{'|'.join(self.tritons)}"


def _values(row: table.Row) -> dict:
    """A launch's constexpr values and launch options by name (``num_warps`` as ``warps``), as an entry's
    ``where`` names them."""
    values = {k: v[1] for k, v in row.record["args"].items() if v[0] == "val"}
    values.update({k.replace("num_", ""): v for k, v in row.record["options"].items()})
    return values


def _where(row: table.Row) -> str:
    """The ``where`` of an entry naming ``row``: its tile constexprs (``BLOCK_*``, ``GROUP_*``), warps, stages."""
    values = _values(row)
    tiles = [f"{k}={v}" for k, v in values.items() if k.startswith(("BLOCK", "GROUP"))]
    options = [f"{k}={values[k]}" for k in ("stages", "warps") if k in values]
    return " ".join(tiles + options)


def _suggestions(rows: list[table.Row], version: str) -> str:
    """Ready-to-paste KNOWN_OVER_BUDGET entries for ``rows``, one per kernel, dtype and tiles."""
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row.kernel, row.dtype, _where(row)), []).append(row)
    lines = []
    for (kernel, dtype, where), members in sorted(groups.items()):
        figures = [r.figures for r in members if "error" not in r.figures]
        if not figures:
            measured = "no compile"
        else:
            regs = sorted(f["registers"] for f in figures)
            spills = sorted(f["spill_stores"] for f in figures)
            occ = sorted(f["occupancy"] for f in figures)
            measured = (f"{version}: {regs[0]}-{regs[-1]} regs, spill {spills[0]}-{spills[-1]} B, "
                        f"occ {occ[0]:.3f}-{occ[-1]:.3f}")
        lines.append(f'    OverBudget("{kernel}", ("{dtype}",), ("{version}",), "{where}",\n'
                     f'               "{measured}"),')
    return "\n".join(lines)


#: Launches over the budget when this list was written, with what was measured (registers per thread,
#: spill stores/loads in bytes per thread, occupancy). Keep it exact: remove an entry when its xfail passes.
KNOWN_OVER_BUDGET: list[OverBudget] = []


# ----------------------------------------------------------------------------------------------------
# Recording and compiling, once per pytest worker (and once per machine: both are cached on disk)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launches():
    return table.record(quick=not FULL)


@pytest.fixture(scope="module")
def compiled(launches) -> dict[str, list[table.Row]]:
    """Label -> judged rows, for every Triton configured here, compiled side by side (one process each,
    so both CPUs of a CI machine work while another pytest worker waits for the cached results)."""
    from concurrent.futures import ThreadPoolExecutor

    records, _ = launches
    labels = [label for label, python in TRITONS.items() if python != ""]
    with ThreadPoolExecutor(len(labels)) as pool:
        futures = {label: pool.submit(table.compile_records, records, TRITONS[label], 1) for label in labels}
        return {label: table.judge(records, future.result()) for label, future in futures.items()}


def rows_for(label: str, compiled) -> list[table.Row]:
    if label not in compiled:
        pytest.skip("FASTDENSITY_TRITON36_PYTHON is unset: set it to a python with torch and triton==3.6.0 "
                    "(.ci/run makes one) to compile under the GPU machine's Triton too")
    return compiled[label]


# ----------------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_kernel_is_launched(launches):
    records, errors = launches
    assert not errors, "\n".join(errors)
    missing = sorted(set(all_kernels()) - {(r["module"], r["kernel"]) for r in records})
    assert not missing, f"no verify or benchmark case launches {missing}: add a case that does"


@pytest.mark.slow
@pytest.mark.parametrize("label", TRITONS)
def test_no_launch_over_budget_unless_known(label, compiled):
    rows = rows_for(label, compiled)
    version = rows[0].triton
    known = [e for e in KNOWN_OVER_BUDGET if e.applies_to(version)]
    unknown = [r for r in rows if r.problems and not any(e.matches(r) for e in known)]
    assert not unknown, (f"Triton {version}: {len(unknown)} launches over the budget. Fix the kernel or its launch "
                         "config; or, knowingly, list them in KNOWN_OVER_BUDGET:\n" + _suggestions(unknown, version)
                         + "\n\n" + table.format_rows(unknown))
    if FULL:  # the quick set holds only some launches of each entry
        stale = [str(e) for e in known if not any(e.matches(r) for r in rows)]
        assert not stale, f"KNOWN_OVER_BUDGET entries that match no launch under Triton {version}: {stale}"


def _known_cases() -> list:
    return [pytest.param(entry, label, id=f"{entry}-{label}", marks=pytest.mark.xfail(
                strict=True, reason=f"over budget when listed: {entry.measured}"))
            for entry in KNOWN_OVER_BUDGET for label in TRITONS]


@pytest.mark.slow
@pytest.mark.parametrize("entry,label", _known_cases())
def test_known_over_budget(entry, label, compiled):
    """Fails (xfail) while any launch the entry names is over the budget; passes, failing the run as a
    strict xfail, once all are within it - then remove the entry."""
    rows = rows_for(label, compiled)
    if not entry.applies_to(rows[0].triton):
        pytest.skip(f"listed for Triton {entry.tritons}, not {rows[0].triton}")
    over = [r for r in rows if entry.matches(r) and r.problems]
    if not FULL and not over:  # the quick set holds only some of an entry's launches
        pytest.skip("none of its launches in the quick set is over budget; FASTDENSITY_SM90_FULL=1 checks the rest")
    assert not over, table.format_rows(over)
