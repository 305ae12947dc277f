"""Test configuration shared by every tier.

On a machine without CUDA the kernels can only run in Triton's interpreter, which must be chosen
before fastdensity (and with it the kernels) is imported - hence the environment variable is set
here, at collection time, before any test module imports fastdensity. On a CUDA machine it is left
as it is: unset, the GPU tier runs the compiled kernels, and interpreter-tier tests, which force
backend "triton" on CPU tensors, are skipped (marked ``requires_interpreter`` in helpers.py, or caught
by ``pytest_runtest_call`` below from the error the backend raises); ``TRITON_INTERPRET=1`` flips both.
"""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh Inductor cache per run: the on-disk cache has been seen replaying a compiled backward whose
# custom op's schema had changed since (a stale graph, not a test failure of the code under test).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastdensity-inductor-"))

import pytest  # noqa: E402

import fastdensity  # noqa: E402,F401

# Tests run tiny ops, often two pytest workers on two cores: intra-op threads only add contention
# (tiny CPU convolutions were measured ~1000x slower with 2 threads per worker on a busy machine).
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--quality", action="store_true",
                     help="also run the quality tier (tests/test_quality.py): full-length default training runs "
                          "against the stated quality bars, minutes each")


def pytest_collection_modifyitems(config, items):
    """Quality-tier tests are skipped unless ``--quality`` asks for them (they train for minutes)."""
    if config.getoption("--quality"):
        return
    skip = pytest.mark.skip(reason="quality tier: full-length training runs; run with --quality")
    for item in items:
        if "quality" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_poison():
    """Fresh seed per test; kernel outputs start as NaN so unwritten elements fail (docs/design.md, Tests)."""
    torch.manual_seed(0)
    from fastdensity.testing import poisoned_outputs

    with poisoned_outputs(True):
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """On a machine whose kernels are compiled (CUDA, no TRITON_INTERPRET), an interpreter-tier test
    forcing backend "triton" on CPU tensors meets the backend's "needs Triton's interpreter" error:
    report it as a skip of that tier rather than a failure of the code."""
    try:
        return (yield)
    except RuntimeError as exc:
        if "runs the kernels in Triton's interpreter" in str(exc):
            pytest.skip("interpreter tier: kernels are compiled in this process (run with TRITON_INTERPRET=1)")
        raise
