"""Checkpoints: everything a run needs to continue exactly where it stopped, in one file.

``OUT/checkpoint.pt`` holds the model's weights and build arguments, the optimizer's state, the step,
the torch RNG states, the data's and preprocessing's descriptions and the run's configuration
(:class:`~fastdensity.training.config.TrainConfig` as a dict, which names the optimizer). Restoring all
of it and replaying steps ``k+1..`` computes what the uninterrupted run computed, bit for bit (the
batches and noise of a step depend only on the seed and the step; see :mod:`.seeds`).

What a checkpoint file guarantees
    * Good: every floating tensor in it is finite; :func:`save_checkpoint` refuses to write any other
      (:class:`NonFiniteState`), so "the last good checkpoint" is never a NaN-filled one.
    * Checksummed: it stores the SHA-256 of its contents (:mod:`.integrity`), recomputed and compared on
      every load; a flipped bit or a truncated file is :class:`CorruptCheckpoint`, never silently used.
    * Atomic, with one previous copy: written through :func:`fastdensity.atomic_io.atomic_write` as
      write new -> verify (read back, checksum compared) -> rotate, the replaced file kept as
      ``OUT/checkpoint.prev.pt``. A kill at any moment leaves a good latest checkpoint; when the latest
      is missing or corrupt, :func:`load_checkpoint` falls back to the previous one and says so.
    * Code-free: only tensors, numbers, strings, lists and dicts, read with ``torch.load(...,
      weights_only=True)``: loading runs no code from the file.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import torch

from .. import data as fdata
from ..atomic_io import atomic_write
from ..models import DensityModel, build_model, stored_model_args
from .config import TrainConfig
from .integrity import ALGORITHM, named_tensors, non_finite_tensors, payload_digest

__all__ = ["CHECKPOINT_NAME", "PREVIOUS_CHECKPOINT_NAME", "FORMAT", "CorruptCheckpoint", "NonFiniteState",
           "save_checkpoint", "load_checkpoint", "read_checkpoint_file", "previous_checkpoint_path",
           "checkpoint_exists", "checkpoint_to_resume", "restore_training_state", "model_from_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pt"
FORMAT = "fastdensity-checkpoint-2"
#: Written before checksums existed: read as they are (still refused when a tensor is not finite).
LEGACY_FORMATS = ("fastdensity-checkpoint-1",)
_SERIALISATION_OVERHEAD = 1 << 16  # bytes of zip headers and pickle beside the tensors' own, for DiskFull


class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be trusted: unreadable, truncated, not ours, failing its checksum, or
    holding non-finite tensors. The message names the file and what is wrong with it."""


class NonFiniteState(ValueError):
    """The state to be saved holds NaN or infinite values: it is not a good checkpoint."""

    def __init__(self, names: list[str], count: int):
        self.names, self.count = names, count
        super().__init__(f"{len(names)} of its {count} tensors hold NaN or infinite values (e.g. {names[0]})")


def previous_checkpoint_path(path: str) -> str:
    """Where the checkpoint that ``path`` replaced is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.prev{ext}"


def save_checkpoint(path: str, *, config: TrainConfig, model: DensityModel, optimizer: torch.optim.Optimizer,
                    step: int, data: fdata.Data, preprocess: fdata.Preprocess, elapsed: float,
                    train_nll: Optional[float]) -> None:
    """Write the state after ``step`` steps (``elapsed`` seconds of training, smoothed loss ``train_nll``),
    keeping the checkpoint it replaces as :func:`previous_checkpoint_path`.

    Raises :class:`NonFiniteState` (and writes nothing) when a weight or optimizer tensor is not finite,
    and :class:`fastdensity.atomic_io.DiskFull` when the disk fills up (the old files are kept).
    """
    state = {
        "format": FORMAT,
        "config": config.to_dict(),
        "model": {"name": model.name, "args": dict(model.config)},
        "data": data.spec(),
        "preprocess": preprocess.config(),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": int(step),
        "elapsed": float(elapsed),
        "train_nll_ema": None if train_nll is None else float(train_nll),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    bad, count = non_finite_tensors(state)
    if bad:
        raise NonFiniteState(bad, count)
    digest = payload_digest(state)
    state["checksum"] = {"algorithm": ALGORITHM, "digest": digest}

    def verify(written: str) -> None:
        if read_checkpoint_file(written)["checksum"]["digest"] != digest:
            raise CorruptCheckpoint(f"{path!r} read back differently from what was written; the old checkpoint "
                                    "is kept")

    size = sum(t.numel() * t.element_size() for _, t in named_tensors(state)) + _SERIALISATION_OVERHEAD
    atomic_write(path, lambda f: torch.save(state, f), verify=verify, keep_previous=previous_checkpoint_path(path),
                 size_hint=size)


def read_checkpoint_file(path: str) -> dict:
    """One checkpoint file, read (``weights_only``) and checked: :class:`CorruptCheckpoint` unless it is a
    fastdensity checkpoint whose checksum matches and whose tensors are finite."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise CorruptCheckpoint(f"{path!r} is not a readable fastdensity checkpoint (truncated, damaged or not "
                                f"written by fastdensity): {type(exc).__name__}: {first_line}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (FORMAT, *LEGACY_FORMATS):
        raise CorruptCheckpoint(f"{path!r} is not a fastdensity checkpoint (format {FORMAT!r})")
    if ckpt["format"] == FORMAT:
        stored = ckpt.pop("checksum", None)
        if not isinstance(stored, dict) or stored.get("algorithm") != ALGORITHM:
            raise CorruptCheckpoint(f"{path!r} is corrupt: its {ALGORITHM} checksum is missing")
        try:
            actual = payload_digest(ckpt)
        except TypeError as exc:
            raise CorruptCheckpoint(f"{path!r} is corrupt: {exc}") from None
        if actual != stored.get("digest"):
            raise CorruptCheckpoint(f"{path!r} is corrupt: its contents do not match the checksum stored when it "
                                    "was written (a changed bit, or an edited file)")
        ckpt["checksum"] = stored
    bad, count = non_finite_tensors(ckpt)
    if bad:
        raise CorruptCheckpoint(f"{path!r} is not a good checkpoint: {len(bad)} of its {count} tensors hold NaN "
                                f"or infinite values (e.g. {bad[0]})")
    return ckpt


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_checkpoint(path: str, *, notify: Optional[Callable[[str], None]] = _warn) -> dict:
    """Read a checkpoint (``path`` is the file or the run directory holding ``checkpoint.pt``).

    When the file is missing or corrupt and the previous checkpoint beside it is good, that one is
    returned and ``notify`` (default: a warning on stderr) is told which file was bad and why. Raises
    FileNotFoundError when neither exists, :class:`CorruptCheckpoint` (a ValueError) when neither is good.
    """
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    previous = previous_checkpoint_path(path)
    if not os.path.exists(path) and not os.path.exists(previous):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        if not os.path.exists(path):
            raise CorruptCheckpoint(f"{path!r} does not exist")
        return read_checkpoint_file(path)
    except CorruptCheckpoint as exc:
        if not os.path.exists(previous):
            raise
        problem = str(exc)
    try:
        ckpt = read_checkpoint_file(previous)
    except CorruptCheckpoint as exc:
        raise CorruptCheckpoint(f"{problem}; the previous checkpoint is no better: {exc}") from None
    if notify is not None:
        notify(f"{problem}; using the previous checkpoint {previous!r} (step {int(ckpt['step'])}) instead")
    return ckpt


def checkpoint_exists(out: Optional[str]) -> str:
    """The path of the checkpoint ``--resume`` would continue from in ``out``; an error saying what
    ``--resume`` needs when there is none (neither it nor the previous one)."""
    if out is None:
        raise ValueError("resume needs the run's output directory (--out DIR) to find its checkpoint")
    path = os.path.join(out, CHECKPOINT_NAME)
    if not os.path.exists(path) and not os.path.exists(previous_checkpoint_path(path)):
        raise FileNotFoundError(f"cannot resume: no checkpoint at {path!r}")
    return path


def checkpoint_to_resume(out: Optional[str], *, notify: Optional[Callable[[str], None]] = _warn) -> dict:
    """The checkpoint of the run in ``out``, with errors that say what ``--resume`` needs."""
    return load_checkpoint(checkpoint_exists(out), notify=notify)


def restore_training_state(ckpt: dict, model: DensityModel,
                           optimizer: torch.optim.Optimizer) -> tuple[int, float, Optional[float]]:
    """Load the weights, the optimizer state and the RNG states; returns ``(step, elapsed seconds,
    smoothed training loss)`` to continue from.

    The optimizer must be the one the checkpoint's config names (:func:`.config.config_for_resume`
    checks): ``load_state_dict`` would otherwise take the other one's moments and decay mode silently.
    """
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return int(ckpt["step"]), float(ckpt["elapsed"]), ckpt.get("train_nll_ema")


def model_from_checkpoint(ckpt: dict, device="cpu") -> tuple[DensityModel, fdata.Preprocess]:
    """The trained model (in eval mode, on ``device``) and its preprocessing, from a loaded checkpoint."""
    spec = ckpt["model"]
    model = build_model(spec["name"], **stored_model_args(spec["name"], spec["args"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), fdata.make_preprocess(ckpt["preprocess"])
