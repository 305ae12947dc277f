"""Test configuration shared by every tier.

On a machine without CUDA the kernels can only run in Triton's interpreter, which must be chosen
before fastdensity (and with it the kernels) is imported - hence the environment variable is set
here, at collection time, before any test module imports fastdensity. On a CUDA machine it is left
as it is: unset, the GPU tier runs the compiled kernels and interpreter-tier tests, which force
backend "triton" on CPU tensors, must be marked ``requires_interpreter`` (helpers.py) to be skipped;
``TRITON_INTERPRET=1`` flips both.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastdensity  # noqa: E402,F401

# Tests run tiny ops, often two pytest workers on two cores: intra-op threads only add contention
# (tiny CPU convolutions were measured ~1000x slower with 2 threads per worker on a busy machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_poison():
    """Fresh seed per test; kernel outputs start as NaN so unwritten elements fail (DESIGN §6)."""
    torch.manual_seed(0)
    from fastdensity.testing import poisoned_outputs

    with poisoned_outputs(True):
        yield
