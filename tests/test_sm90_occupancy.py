"""Hopper occupancy and ptxas report parsing of the static sm_90 tier, against hand-computed cases."""
from __future__ import annotations

import pytest

from fastdensity.sm90.compile import parse_ptxas_report
from fastdensity.sm90.occupancy import occupancy, resident_blocks
from fastdensity.sm90.table import DEFAULT_FLOOR, problems

# (registers per thread, shared bytes per block, warps per block) -> resident blocks, worked by hand:
CASES = [
    # 32 regs: 1024 per warp, 64 warps' worth; 16 blocks of 4 warps by warps and by registers -> 64 warps
    ((32, 0, 4), 16),
    # 130 regs round up to 136: 4352 per warp, 65536 // (4 * 4352) = 3 blocks (15 warps' worth of registers)
    ((130, 0, 4), 3),
    # 255 regs round up to 256: 8192 per warp, one block of 8 warps
    ((255, 0, 8), 1),
    # 100 KiB + the 1 KiB reserved per block: 233472 // 103424 = 2 blocks
    ((32, 100 * 1024, 4), 2),
    # one warp, few registers: the 32-blocks-per-SM limit binds, 32 warps
    ((16, 0, 1), 32),
    # 227 KiB is the most a block may have, and then only one fits
    ((32, 227 * 1024, 4), 1),
    # one byte more cannot launch; nor can 256 registers or 64 warps
    ((32, 227 * 1024 + 1, 4), 0),
    ((256, 0, 4), 0),
    ((32, 0, 64), 0),
    # 32 warps of 64 regs: 2048 per warp x 32 = 65536, exactly one block
    ((64, 0, 32), 1),
    # 72 regs: 2304 per warp; 65536 // (8 * 2304) = 3 blocks of 8 warps
    ((72, 0, 8), 3),
]


@pytest.mark.parametrize("figures,blocks", CASES)
def test_resident_blocks_and_occupancy(figures, blocks):
    registers, shared, warps = figures
    assert resident_blocks(registers, shared, warps) == blocks
    assert occupancy(registers, shared, warps) == blocks * warps / 64


def test_parse_ptxas_report():
    report = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _fwd_kernel
    1056 bytes stack frame, 1232 bytes spill stores, 2376 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem, 496 bytes cmem[0]
"""
    assert parse_ptxas_report(report) == {"registers": 255, "spill_stores": 1232, "spill_loads": 2376, "stack": 1056,
                                          "static_shared": 16}
    assert parse_ptxas_report("ptxas info    : 0 bytes gmem\n") is None


def test_problems_name_every_breach():
    fine = {"registers": 64, "spill_stores": 0, "spill_loads": 0, "shared": 1024, "occupancy": 0.5}
    assert problems(fine, DEFAULT_FLOOR[0]) == []
    spilling = {**fine, "spill_stores": 8}
    assert problems(spilling, 0.1)[0].startswith("spills 8 B")
    assert "shared memory" in problems({**fine, "shared": 227 * 1024 + 4}, 0.0)[0]
    assert problems({**fine, "occupancy": 0.0625}, 0.125) == ["occupancy 0.062 < floor 0.125"]
    error = {"error": "CompilationError: at 3:4\nmore"}
    assert problems(error, 0.125) == ["does not compile: CompilationError: at 3:4"]


def test_occupancy_floors_name_kernels_of_their_module_with_a_reason():
    pytest.importorskip("triton")
    from fastdensity.sm90.launches import all_kernels, kernel_modules

    kernels = set(all_kernels())
    dtypes = {"float32", "bfloat16", "float16", "float64"}
    for module in kernel_modules():
        for name, (fraction, reason) in getattr(module, "SM90_OCCUPANCY_FLOOR", {}).items():
            kernel, _, dtype = name.partition("[")  # "_kernel" or "_kernel[float64]"
            assert (module.__name__, kernel) in kernels, f"{module.__name__}.SM90_OCCUPANCY_FLOOR names no kernel {name}"
            assert not dtype or dtype[:-1] in dtypes and dtype.endswith("]"), f"{module.__name__}: {name}"
            assert 0 < fraction <= 1 and reason.strip(), f"{module.__name__}.{name}: floor {fraction!r}, {reason!r}"


def test_a_dtype_floor_overrides_the_kernel_floor(monkeypatch):
    from fastdensity.sm90 import table

    class Module:
        SM90_OCCUPANCY_FLOOR = {"_k": (0.25, "memory-bound"), "_k[float64]": (0.1875, "compute-bound in fp64")}

    monkeypatch.setattr(table.importlib, "import_module", lambda name: Module)
    assert table.floor_of("m", "_k", "float64") == (0.1875, "compute-bound in fp64")
    assert table.floor_of("m", "_k", "float32") == (0.25, "memory-bound")
    assert table.floor_of("m", "_other", "float64") == DEFAULT_FLOOR


def test_only_filters_the_launches_before_they_compile(monkeypatch):
    """``fastdensity info --kernels --only SUBSTRING``: the other kernels' launches are not compiled."""
    from fastdensity.sm90 import table

    records = [{"module": "fastdensity.kernels.coupling", "kernel": "_coupling_fwd_kernel", "args": {}, "options": {}},
               {"module": "fastdensity.kernels.dmol", "kernel": "_dmol_bwd_kernel", "args": {}, "options": {}}]
    compiled = []

    def compile_records(recs, python=None):
        compiled.extend(recs)
        return {"triton": "3.9.0", "results": [{"error": "not compiled here"} for _ in recs]}

    monkeypatch.setattr(table, "record", lambda quick: (records, []))
    monkeypatch.setattr(table, "compile_records", compile_records)
    kept, _, (rows,) = table.measure([None], only="_dmol")
    assert kept == compiled == records[1:] and [r.kernel for r in rows] == ["dmol._dmol_bwd_kernel"]
