"""Where a run computes: the ``torch.device`` for ``--device``, and the CPU thread count."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import data as fdata

__all__ = ["resolve_device", "set_cpu_threads"]


def resolve_device(device: str, local_rank: Optional[int] = None) -> torch.device:
    """The ``torch.device`` for ``--device`` (``auto``: CUDA when available, else CPU).

    ``local_rank`` (a distributed run) picks ``cuda:local_rank`` for a plain ``cuda``. A name PyTorch
    does not know, a device this machine does not have (CUDA where there is none, ``cuda:N`` past the
    last GPU, ``cpu:1``) or another kind (``mps``, ``meta``) is a ValueError that says what to use instead.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name PyTorch knows; use auto, cpu, cuda or cuda:N") \
            from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported: fastdensity runs on CPUs and CUDA GPUs; use auto, "
                         "cpu, cuda or cuda:N")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ValueError(f"device {device!r} does not exist: there is one CPU device, 'cpu'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", local_rank)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} was asked for but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return dev


def set_cpu_threads(threads: Optional[int], data: fdata.Data) -> None:
    """CPU intra-op threads: ``threads`` when given; else 1 for low-dimensional data and half the cores
    otherwise.

    Measured on a shared 2-core machine: a second thread made a 2-D RealNVP step 14x slower (its
    512 x 128 matrices are too small to split, and the threads spin-wait on a busy core) and the digits
    models' steps 5-20x slower; one thread was never slower. Leaving half the cores free keeps that
    collapse away on bigger machines.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1; got {threads}")
        torch.set_num_threads(threads)
    elif data.dim <= 16:
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) // 2)))
