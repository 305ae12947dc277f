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
  (``SM90_OCCUPANCY_FLOOR``), or ``DEFAULT_FLOOR`` (0.125: 2 warps per scheduler).

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
from dataclasses import dataclass, field

import pytest

pytest.importorskip("triton")

from fastdensity.sm90 import table  # noqa: E402
from fastdensity.sm90.launches import all_kernels  # noqa: E402

FULL = os.environ.get("FASTDENSITY_SM90_FULL", "") == "1"
#: label -> interpreter whose Triton compiles (None: this one, CI's)
TRITONS = {"ci": None, "3.6": os.environ.get("FASTDENSITY_TRITON36_PYTHON") or ""}


@dataclass(frozen=True)
class OverBudget:
    """Launches of ``kernel`` in one of ``dtypes``, narrowed by constexpr / option values ``where``, that
    are over the budget under the Tritons whose version starts with one of ``tritons``."""

    kernel: str
    dtypes: tuple[str, ...]
    tritons: tuple[str, ...]
    measured: str
    where: tuple[tuple[str, object], ...] = field(default=())

    def matches(self, row: table.Row) -> bool:
        if row.kernel != self.kernel or row.dtype not in self.dtypes:
            return False
        values = {**{k: v[1] for k, v in row.record["args"].items()}, **row.record["options"]}
        return all(values.get(k) == v for k, v in self.where)

    def applies_to(self, triton_version: str) -> bool:
        return any(triton_version.startswith(t) for t in self.tritons)

    def __str__(self) -> str:
        where = ",".join(f"{k}={v}" for k, v in self.where)
        return f"{self.kernel}[{'|'.join(self.dtypes)}{',' + where if where else ''}]@{'|'.join(self.tritons)}"


FP16 = ("bfloat16", "float16")

#: Launches over the budget when this list was written, with what was measured (registers per thread,
#: spill stores/loads in bytes per thread, occupancy). Keep it exact: remove an entry when its xfail passes.
KNOWN_OVER_BUDGET: list[OverBudget] = [
]


# ----------------------------------------------------------------------------------------------------
# Recording and compiling, once per pytest worker (and once per machine: both are cached on disk)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launches():
    return table.record(quick=not FULL)


_ROWS: dict[str, list] = {}


def rows_for(label: str, launches) -> list[table.Row]:
    python = TRITONS[label]
    if python == "":
        pytest.skip("FASTDENSITY_TRITON36_PYTHON is unset: set it to a python with torch and triton==3.6.0 "
                    "(.ci/run makes one) to compile under the GPU machine's Triton too")
    if label not in _ROWS:
        records, _ = launches
        _ROWS[label] = table.judge(records, table.compile_records(records, python))
    return _ROWS[label]


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
def test_no_launch_over_budget_unless_known(label, launches):
    rows = rows_for(label, launches)
    version = rows[0].triton
    known = [e for e in KNOWN_OVER_BUDGET if e.applies_to(version)]
    unknown = [r for r in rows if r.problems and not any(e.matches(r) for e in known)]
    assert not unknown, (f"Triton {version}: {len(unknown)} launches over the budget "
                         "(fix the kernel or its launch config; list it in KNOWN_OVER_BUDGET only with a reason):\n"
                         + table.format_rows(unknown))
    stale = [str(e) for e in known if not any(e.matches(r) for r in rows)]
    assert not stale, f"KNOWN_OVER_BUDGET entries that match no launch under Triton {version}: {stale}"


def _known_cases() -> list:
    return [pytest.param(entry, label, id=f"{entry}-{label}", marks=pytest.mark.xfail(
                strict=True, reason=f"over budget when listed: {entry.measured}"))
            for entry in KNOWN_OVER_BUDGET for label in TRITONS]


@pytest.mark.slow
@pytest.mark.parametrize("entry,label", _known_cases())
def test_known_over_budget(entry, label, launches):
    """Fails (xfail) while any launch the entry names is over the budget; passes, failing the run as a
    strict xfail, once all are within it - then remove the entry."""
    rows = rows_for(label, launches)
    if not entry.applies_to(rows[0].triton):
        pytest.skip(f"listed for Triton {entry.tritons}, not {rows[0].triton}")
    over = [r for r in rows if entry.matches(r) and r.problems]
    assert not over, table.format_rows(over)
