"""Backend selection: the three names, the environment variable, and the errors a forced backend raises."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastdensity
from fastdensity import backend
from helpers import INTERPRETED


def _python(code: str, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (backend state and TRITON_INTERPRET are per process)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDENSITY_BACKEND")}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True,
                          text=True, timeout=120)


def test_auto_uses_reference_on_cpu_tensors():
    x = torch.randn(2, 3)
    assert not backend.use_kernels(x, "coupling")
    with fastdensity.set_backend("triton"):
        if INTERPRETED:  # conftest sets TRITON_INTERPRET=1 on machines without CUDA
            assert backend.use_kernels(x, "coupling")
        else:
            with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before `import fastdensity`"):
                backend.use_kernels(x, "coupling")
    with fastdensity.set_backend("reference"):
        assert not backend.use_kernels(x, "coupling")


def test_forced_triton_on_an_unsupported_device_says_why():
    with fastdensity.set_backend("triton"), pytest.raises(RuntimeError, match="no Triton path for meta tensors"):
        backend.use_kernels(torch.empty(2, device="meta"), "coupling")


def test_unavailable_kernel_falls_back_under_auto_and_raises_when_forced(monkeypatch):
    monkeypatch.setitem(backend._kernel_errors, "made_up_op", "importing it failed: SyntaxError")
    x = torch.randn(2)
    assert not backend.use_kernels(x, "made_up_op")
    with fastdensity.set_backend("triton"), pytest.raises(RuntimeError, match="made_up_op kernel is unavailable"):
        backend.use_kernels(x, "made_up_op")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message; this machine has CUDA")
def test_forced_triton_on_cpu_without_the_interpreter_explains_the_fix():
    result = _python("""
        import torch, fastdensity
        x = torch.randn(2, 3)
        with fastdensity.set_backend("triton"):
            fastdensity.ops.affine_coupling(x, x, x)
    """)
    assert result.returncode != 0
    assert "set TRITON_INTERPRET=1 before `import fastdensity`" in result.stderr


def test_environment_variable_selects_the_backend():
    result = _python("import fastdensity; print(fastdensity.get_backend())", FASTDENSITY_BACKEND="reference")
    assert result.returncode == 0 and result.stdout.strip() == "reference"
    result = _python("import fastdensity", FASTDENSITY_BACKEND="gpu")
    assert result.returncode != 0
    assert "FASTDENSITY_BACKEND must be one of 'auto', 'triton', 'reference'; got 'gpu'" in result.stderr


def test_describe_names_the_reason():
    text = backend.describe()
    assert "backend in force: auto" in text
    assert "auto -> " in text
