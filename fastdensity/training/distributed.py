"""The processes of a run: one, or N under ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` > 1).

Distributed runs use DistributedDataParallel, NCCL on GPUs and gloo on CPUs. ``batch_size`` is the
*global* batch: rank r takes rows ``[r * B/N, (r + 1) * B/N)`` of the same global batch of B examples a
single process would use, and DDP averages the N gradients, so N processes follow the single-process
run up to floating-point summation order. Only rank 0 prints, logs and writes files; each of its writes
goes through :meth:`World.on_main`, which tells every rank whether the write failed, so that a full disk
on rank 0 stops all ranks at once instead of leaving them waiting in the next collective until its
timeout (tens of minutes). Every method is a no-op (or the identity) in a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "RankZeroFailed", "setup_distributed"]

T = TypeVar("T")


class RankZeroFailed(RuntimeError):
    """Raised on ranks other than 0 when rank 0 failed at something only it does (writing the run's files)."""


@dataclass
class World:
    """This process's place in the run: ``rank`` of ``size`` processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we started the process group, so we end it

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints and writes files."""
        return self.rank == 0

    def shard(self, batch_size: int) -> slice:
        """This rank's rows of a global batch (``batch_size`` must be divisible by ``size``)."""
        if batch_size % self.size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes, {self.size}")
        per_rank = batch_size // self.size
        return slice(per_rank * self.rank, per_rank * (self.rank + 1))

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` under DistributedDataParallel when there are several processes, else itself."""
        if self.size == 1:
            return module
        return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes, in place."""
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean(self, *scalars: torch.Tensor, device: torch.device) -> list[float]:
        """The processes' mean of each 0-d tensor, in float64, as Python floats."""
        stacked = torch.stack([s.detach().double() for s in scalars]).to(device)
        return (self.all_sum(stacked) / self.size).tolist()

    def on_main(self, what: str, action: Callable[[], T], device: torch.device) -> Optional[T]:
        """``action()`` on rank 0 only (its result there, None elsewhere), then every rank learns whether it
        failed: rank 0 re-raises its error, the others raise :class:`RankZeroFailed` naming ``what``.

        One broadcast of a flag per call: cheap beside the writes it guards. Every rank must call it at the
        same point (it is a collective)."""
        result, error = None, None
        if self.main:
            try:
                result = action()
            except BaseException as exc:  # noqa: B036 - re-raised below, after the other ranks are told
                error = exc
        if self.size > 1:
            failed = torch.tensor([0.0 if error is None else 1.0], device=device)
            dist.broadcast(failed, src=0)
            if failed.item() and not self.main:
                raise RankZeroFailed(f"rank {self.rank}: stopping because rank 0 failed while {what} (its error "
                                     "is reported by rank 0)")
        if error is not None:
            raise error
        return result

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def setup_distributed(device: str) -> World:
    """This process's :class:`World` from the environment torchrun sets; joins the process group (NCCL
    for a CUDA ``device``, gloo otherwise) unless the caller already has."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        owns = True
    return World(rank=rank, size=size, local_rank=local, owns_group=owns)
