"""The op table is complete: every op has its four files, its functions and its cases, and nothing
in the op folders lacks an entry. README's op table is the generated one."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from fastdensity import backend, op_table, ops
from fastdensity.benchmarks import suite

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("op", op_table.OPS, ids=lambda op: op.name)
def test_each_op_has_its_four_files(op):
    for role, path in op.files().items():
        assert (ROOT / path).is_file(), f"op {op.name!r} has no {role} file {path}"


@pytest.mark.parametrize("op", op_table.OPS, ids=lambda op: op.name)
def test_each_op_has_its_functions_reference_and_cases(op):
    for function in op.functions:
        assert callable(getattr(ops, function, None)), f"fastdensity.ops.{function} is missing"
        assert getattr(ops, function).__doc__, f"fastdensity.ops.{function} has no docstring"
    importlib.import_module(op.reference_module)
    bench = importlib.import_module(op.bench_module)
    assert callable(getattr(bench, "cases", None)), f"{op.bench_module} defines no cases(settings)"
    assert callable(getattr(bench, "verify_cases", None)), f"{op.bench_module} defines no verify_cases(cuda)"


@pytest.mark.parametrize("op", op_table.OPS, ids=lambda op: op.name)
def test_each_kernel_module_loads(op):
    """The kernel module imported (with Triton present) - otherwise 'auto' silently falls back."""
    pytest.importorskip("triton")
    assert op.name not in backend._kernel_errors, backend._kernel_errors.get(op.name)
    importlib.import_module(op.kernel_module)


def test_nothing_in_the_op_folders_lacks_an_entry():
    entries = set(op_table.names())
    parts = {p for op in op_table.OPS for p in op.kernel_parts}
    kernels = {p.stem for p in (ROOT / "kernels").glob("*.py")} - {"__init__", "utils"}
    assert kernels - entries - parts == set(), "kernel modules without an op-table entry"
    references = {p.stem for p in (ROOT / "fastdensity" / "reference").glob("*.py")} - {"__init__"}
    assert references - entries == set(), "reference modules without an op-table entry"
    benches = {p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py")}
    assert benches - entries - set(suite.WHOLE_MODEL_MODULES) == set(), "bench modules without an entry"


def test_everything_derives_from_the_table():
    assert ops.__all__ == op_table.public_functions()
    assert list(suite.MODULES)[:len(op_table.OPS)] == op_table.names()
    assert len(set(op_table.public_functions())) == len(op_table.public_functions())


def test_resolve_accepts_op_and_function_names():
    assert op_table.resolve(None) is None
    assert op_table.resolve(["affine_coupling", "coupling", "logistic_mixture_log_prob"]) == ["coupling", "mixture"]
    with pytest.raises(ValueError, match="unknown op nope; choose from coupling"):
        op_table.resolve(["nope"])


def test_readme_op_table_is_the_generated_one():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    begin, end = text.index(op_table.README_BEGIN), text.index(op_table.README_END)
    block = text[begin + len(op_table.README_BEGIN):end].strip()
    assert block == op_table.markdown_table(), "run: fastdensity info --ops --readme README.md"
