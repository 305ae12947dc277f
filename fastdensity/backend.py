"""Which path runs an op: the Triton kernels or the pure-PyTorch reference.

=============  ===================================================================================
backend        what runs
=============  ===================================================================================
``auto``       CUDA tensors and importable kernels -> the kernels; anything else (and everything
               when the kernels run interpreted) -> the reference.
``triton``     always the kernels. CUDA tensors run them compiled; CPU tensors under Triton's
               interpreter, which must then have been chosen (slow; for testing the kernels' own
               code on machines without a GPU).
``reference``  always the pure-PyTorch reference (``fastdensity.reference``).
=============  ===================================================================================

Choose it globally with ``fastdensity.set_backend(name)``, for a block with
``with fastdensity.set_backend(name): ...`` (the previous choice comes back on exit), or for a whole
process with the environment variable ``FASTDENSITY_BACKEND``.

Triton decides when a kernel module is imported whether its ``@triton.jit`` kernels are compiled for
the GPU or run by its interpreter (``TRITON_INTERPRET=1``). fastdensity imports its kernels with
itself, so set ``TRITON_INTERPRET=1`` before ``import fastdensity`` to run the kernels on CPU tensors;
the test suite's ``conftest.py`` does this on machines without CUDA.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_kernels", "load_kernels", "describe"]

BACKENDS = ("auto", "triton", "reference")


def _validated(name: str, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    return name.lower()


_backend = _validated(os.environ.get("FASTDENSITY_BACKEND", "auto"), "FASTDENSITY_BACKEND")

# find_spec does not import Triton; load_kernels does, once, when fastdensity.ops is imported.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_kernel_errors: dict[str, str] = {}  # op -> why its kernel module could not be imported
_interpreted = False  # set by load_kernels: were the kernels decorated under TRITON_INTERPRET=1?


def get_backend() -> str:
    """The backend in force: ``"auto"``, ``"triton"`` or ``"reference"``."""
    return _backend


class set_backend:
    """Select the backend; works as a plain call and as a context manager.

    >>> fastdensity.set_backend("reference")          # from now on
    >>> with fastdensity.set_backend("triton"):       # inside the block only
    ...     y, logdet = fastdensity.ops.affine_coupling(x, shift, scale_raw)
    """

    def __init__(self, name: str):
        global _backend
        self.previous = _backend
        self.name = _validated(name, "backend")
        _backend = self.name

    def __enter__(self) -> "set_backend":
        return self

    def __exit__(self, *exc) -> None:
        global _backend
        _backend = self.previous

    def __repr__(self) -> str:
        return f"set_backend({self.name!r})"


def load_kernels(*ops: str) -> None:
    """Import ``fastdensity.kernels.<op>`` for each op, registering its ``torch.ops.fastdensity`` ops.

    A failure (Triton missing, or a Triton too old for a kernel) is recorded rather than raised:
    ``auto`` then uses the reference for that op, and a forced ``triton`` raises with the reason.
    """
    global _interpreted
    for op in ops:
        if not _TRITON_INSTALLED:
            _kernel_errors[op] = "the triton package is not installed (pip install triton; Linux only)"
            continue
        try:
            module = importlib.import_module(f"fastdensity.kernels.{op}")
        except Exception as exc:  # an incompatible Triton must not make the reference unusable
            _kernel_errors[op] = f"importing fastdensity.kernels.{op} failed: {type(exc).__name__}: {exc}"
            warnings.warn(f"fastdensity: {_kernel_errors[op]}; the reference path will be used", stacklevel=2)
            continue
        _interpreted = bool(module.INTERPRETED)


def use_kernels(tensor: torch.Tensor, op: str) -> bool:
    """True when ``op`` on ``tensor`` should run the Triton kernel, False for the reference.

    Plain Python over module globals and the tensor's device, so ``torch.compile`` treats it as a
    guard, not a graph break. Raises ``RuntimeError`` when ``triton`` is forced where no kernel can run.
    """
    if _backend == "reference":
        return False
    device = tensor.device.type
    if _backend == "auto":
        return device == "cuda" and op not in _kernel_errors and not _interpreted
    if op in _kernel_errors:
        raise RuntimeError(f"backend 'triton' was forced but the {op} kernel is unavailable: {_kernel_errors[op]}")
    if device == "cuda":
        return True
    if device == "cpu":
        if not _interpreted:
            raise RuntimeError(
                "backend 'triton' on CPU tensors runs the kernels in Triton's interpreter, which must be chosen "
                "before the kernels are imported: set TRITON_INTERPRET=1 before `import fastdensity` (or move "
                "the tensors to CUDA, or use set_backend('reference'))"
            )
        return True
    raise RuntimeError(
        f"backend 'triton' was forced but fastdensity has no Triton path for {device} tensors; "
        "use CUDA tensors (or CPU tensors under TRITON_INTERPRET=1) or set_backend('auto')"
    )


def describe() -> str:
    """What ``auto`` picks on this machine, and why (for ``fastdensity info``)."""
    lines = [f"backend in force: {_backend}"]
    if not _TRITON_INSTALLED:
        lines.append("auto -> reference: the triton package is not installed")
    elif _interpreted:
        lines.append("auto -> reference: TRITON_INTERPRET=1, so the kernels run only when 'triton' is forced "
                     "(interpreted, for testing)")
    elif not torch.cuda.is_available():
        lines.append("auto -> reference: no CUDA device (the kernels need a GPU; force 'triton' with "
                     "TRITON_INTERPRET=1 set before import to run them interpreted on CPU)")
    else:
        lines.append(f"auto -> Triton kernels on CUDA tensors ({torch.cuda.get_device_name()}), "
                     "reference on CPU tensors")
    for op, why in sorted(_kernel_errors.items()):
        lines.append(f"  {op}: reference only - {why}")
    return "\n".join(lines)
