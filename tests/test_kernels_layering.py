"""``kernels/`` holds Triton only: no kernel module imports from fastdensity above the shared helpers.

Arrows point one way (DESIGN.md, "Layers of the code"): the package (ops, the choice between
implementations, the autotune cache) imports the kernels, never the reverse. Every import statement of
every ``kernels/*.py`` - at module level or inside a function - is read from its syntax tree, resolved
to an absolute module name, and checked against what a kernel module may use from fastdensity.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fastdensity.kernels

#: What a kernel module may import from fastdensity besides the other kernel modules.
SHARED_HELPERS = ("fastdensity._dtypes", "fastdensity._validation")
PACKAGE = "fastdensity.kernels"  # the package the kernel modules are installed as (setup.py, package_dir)

KERNEL_FILES = sorted(Path(fastdensity.kernels.__path__[0]).glob("*.py"))


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module an ``from X import ...`` statement reads, with relative levels resolved."""
    if node.level == 0:
        return node.module or ""
    parts = package.split(".")
    if node.level > len(parts):
        raise ImportError(f"relative import beyond the top-level package (line {node.lineno})")
    base = parts[:len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _allowed(module: str) -> bool:
    if module != "fastdensity" and not module.startswith("fastdensity."):
        return True  # torch, triton, the standard library
    return any(module == ok or module.startswith(ok + ".") for ok in (PACKAGE, *SHARED_HELPERS))


def upward_imports(source: str, package: str = PACKAGE) -> list[str]:
    """The imports in ``source`` (a module of ``package``) that reach into fastdensity above the kernels
    and the shared helpers, as ``"line N: module"``."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, package)
            # ``from fastdensity import _dtypes`` names the package only to reach a helper: where the module
            # itself is out of bounds, judge what the statement brings in (a name may be a submodule).
            names = [module] if _allowed(module) else [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        bad += [f"line {node.lineno}: {name}" for name in names if not _allowed(name)]
    return bad


def test_the_kernel_files_are_found():
    names = {path.stem for path in KERNEL_FILES}
    assert {"__init__", "utils", "masked_conv", "coupling"} <= names, names


@pytest.mark.parametrize("path", KERNEL_FILES, ids=[p.name for p in KERNEL_FILES])
def test_kernel_module_imports_nothing_above_the_shared_helpers(path):
    bad = upward_imports(path.read_text(encoding="utf-8"))
    assert not bad, (f"{path.name} imports from fastdensity above {', '.join(SHARED_HELPERS)} (kernels/ holds "
                     f"Triton only; the package imports the kernels, not the reverse): {'; '.join(bad)}")


@pytest.mark.parametrize("source,upward", [
    ("from fastdensity import dispatch", True),
    ("from fastdensity.autotune import CachedAutotuner", True),
    ("import fastdensity.ops", True),
    ("import fastdensity", True),
    ("from .. import backend", True),
    ("from ..reference import masked_conv", True),
    ("from ..reference.masked_conv import pixelcnn_mask", True),
    ("from fastdensity import *", True),
    ("def f():\n    from .. import ops\n", True),  # a function-level import counts as much as any
    ("from .._dtypes import acc_dtype", False),
    ("from .. import _dtypes, _validation", False),
    ("from fastdensity._validation import check_tensor", False),
    ("import fastdensity._dtypes", False),
    ("from .utils import empty", False),
    ("from . import utils", False),
    ("from fastdensity.kernels.utils import INTERPRETED", False),
    ("import torch\nimport triton.language as tl\nfrom typing import Optional", False),
])
def test_the_check_tells_upward_imports_from_allowed_ones(source, upward):
    assert bool(upward_imports(source)) == upward, upward_imports(source)
