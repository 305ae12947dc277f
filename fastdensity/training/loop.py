"""Maximum-likelihood training: :func:`train`, the loop itself.

The objective is the mean negative log-likelihood per example in nats, ``-(log q(y) + log|dy/dx|)``
with ``y`` the preprocessed batch (for discrete data, the dequantization Jacobian is included; see
:mod:`fastdensity.data`), reported also in bits/dim. Each step: set the scheduled learning rate, take
the step's batch, compute the loss, backpropagate, clip the gradient norm to ``grad_clip``, stop if the
loss or the norm is not finite, then let the optimizer (Adam or AdamW, :mod:`.optimizer`) step.
Every ``eval_every`` steps the validation NLL is logged; every ``checkpoint_every`` steps (and at the
end) a checkpoint is written; at the end the test split is scored and the metrics and PNGs written.

Reproducibility, and ``resume``
    Everything random in step ``s`` is a pure function of ``(seed, s)`` (:mod:`.seeds`), and a checkpoint
    holds all other state (:mod:`.checkpoint`), so a run resumed from the checkpoint of step ``k``
    computes exactly the steps ``k+1..`` that the uninterrupted run computes: the final parameters are
    bit-for-bit the same (the tests check this against a run killed with SIGKILL).

Non-finite loss
    A NaN or infinite loss (or gradient norm) stops the run before the optimizer applies it, with a
    message naming the step; so do weights or optimizer moments that became non-finite in a step (a huge
    learning rate), found when the checkpoint is due: a checkpoint with a non-finite tensor is never
    written, so the last one kept is always good.

Files
    Rank 0 writes everything, under the output folder's lock (:mod:`.run_lock`), atomically, and tells
    the other ranks whether each write worked (:meth:`.distributed.World.on_main`), so a failure there
    (a full disk: :class:`fastdensity.atomic_io.DiskFull`, one line) stops every rank at once.

Distributed
    Under ``torchrun`` the same code runs on every rank with the model under DDP; see :mod:`.distributed`.
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch
from torch import nn

from .. import data as fdata
from ..atomic_io import DiskFull
from ..models import DensityModel, stored_model_args
from .batches import Batches, training_batch
from .conditioning import label_context
from .checkpoint import (NonFiniteState, checkpoint_exists, checkpoint_to_resume, restore_training_state,
                         save_checkpoint)
from .config import TrainConfig, check_settings, config_for_resume, model_args_for, resolve_defaults
from .device import resolve_device, set_cpu_threads
from .distributed import World, setup_distributed
from .evaluation import EVAL_SEED_OFFSET, evaluate
from .model_setup import initial_model
from .optimizer import learning_rate, make_optimizer, schedule_change, set_learning_rate
from .plots import write_run_plots
from .reporting import ProgressBar, log, run_header, run_metrics, summary
from .run_directory import RunDirectory, check_output_folder

__all__ = ["train", "TrainingDiverged", "Objective"]


class TrainingDiverged(RuntimeError):
    """The loss, the gradient or the weights became non-finite; the message names the step and the kept
    checkpoint."""


class Objective(nn.Module):
    """Per-example NLL [B] in data units, ``-(log q(y) + logdet)``: the module DDP wraps."""

    def __init__(self, model: DensityModel):
        super().__init__()
        self.model = model

    def forward(self, y: torch.Tensor, logdet: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return -(self.model(y, context) + logdet)  # DensityModel.forward: log_prob, given the context if any


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True, plots: bool = True) -> dict:
    """Train ``config.model`` on ``config.data``; returns the metrics also written to ``OUT/metrics.json``.

    With ``resume=True`` the run continues from ``OUT/checkpoint.pt`` (or, when that is damaged,
    ``OUT/checkpoint.prev.pt``) with the configuration stored there; only ``steps`` (to train longer or
    shorter; see :mod:`.optimizer` for the schedule), ``device``, ``eval_every`` and ``checkpoint_every``
    are taken from ``config`` when set, and an ``optimizer`` other than the stored one is a ValueError.

    Settings no run can use (a non-finite ``lr``, a NaN ``grad_clip``, a device this machine lacks, an
    ``out`` that is a file...) are a ValueError before anything starts; a folder another run is using is
    :class:`.run_lock.OutputFolderInUse`. Raises :class:`TrainingDiverged` on a non-finite loss, gradient or
    weight, and :class:`fastdensity.atomic_io.DiskFull` when the disk fills up.
    """
    check_settings(config)
    resolve_device(config.device)  # a device this machine lacks: say so now, not after loading the data
    if config.out is not None:
        check_output_folder(config.out)
    if resume:
        checkpoint_exists(config.out)
    world = setup_distributed(config.device)
    threads = torch.get_num_threads()
    try:
        return _train(config, resume=resume, progress=progress and world.main, plots=plots, world=world)
    finally:
        torch.set_num_threads(threads)  # the run's CPU thread choice does not outlive it
        world.close()


def _train(config: TrainConfig, *, resume: bool, progress: bool, plots: bool, world: World) -> dict:
    device = resolve_device(config.device, world.local_rank if world.size > 1 else None)
    run_dir = None
    try:
        # The run: its folder (locked before anything in it is read or written), its configuration (the
        # checkpoint's, when resuming) and data.
        ckpt = None
        if resume:
            run_dir = _open_run_directory(config.out, world, device)
            ckpt = checkpoint_to_resume(config.out, notify=lambda message: log(f"warning: {message}", world))
            planned = TrainConfig.from_dict(ckpt["config"])
            config = config_for_resume(config, ckpt["config"])
        data = fdata.load_data(config.data, split_seed=config.split_seed)
        # A resumed run rebuilds the model its checkpoint holds, not today's defaults for its options.
        model_args = model_args_for(config.model, data, config.model_args if ckpt is None else
                                    stored_model_args(ckpt["model"]["name"], _without_shape(ckpt["model"]["args"])),
                                    config.conditional)
        config = resolve_defaults(config, data)
        if run_dir is None:
            run_dir = _open_run_directory(config.out, world, device)
        if ckpt is not None:
            note = schedule_change(int(ckpt["step"]), planned, config)
            if note:
                log(note, world)
        return _run(config, ckpt, data, model_args, run_dir, device, progress=progress, plots=plots, world=world)
    finally:
        if run_dir is not None and world.main:
            run_dir.close()


def _without_shape(model_config: dict) -> dict:
    return {k: v for k, v in model_config.items() if k != "shape"}


def _open_run_directory(out: str, world: World, device: torch.device) -> RunDirectory:
    run_dir = RunDirectory(out)
    note = world.on_main("taking the output folder's lock", run_dir.open, device)
    if note:
        log(f"{out}: {note}", world)
    return run_dir


def _run(config: TrainConfig, ckpt: Optional[dict], data: fdata.Data, model_args: dict, run_dir: RunDirectory,
         device: torch.device, *, progress: bool, plots: bool, world: World) -> dict:
    if device.type == "cpu":
        set_cpu_threads(config.threads, data)
    shard = world.shard(config.batch_size)

    # Model, optimizer, and where a checkpoint left them.
    model, preprocess = initial_model(config, data, model_args, device, initialize=ckpt is None)
    optimizer = make_optimizer(config.optimizer, model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start_step, elapsed, smooth = 0, 0.0, None
    if ckpt is not None:
        start_step, elapsed, smooth = restore_training_state(ckpt, model, optimizer)
    objective = world.wrap(Objective(model), device)

    world.on_main("preparing the output folder",
                  lambda: run_dir.prepare(resumed_from=start_step if ckpt is not None else None), device)
    log(run_header(config, model, data, device, world, start_step), world)

    batches = Batches(data.train.shape[0], config.batch_size, config.seed)
    last_saved = start_step if ckpt is not None else None
    valid_nll = None
    t0 = time.perf_counter()
    with ProgressBar(progress, start_step, config.steps, data.dim) as bar:
        for step in range(start_step, config.steps):
            lr = learning_rate(step, config)
            set_learning_rate(optimizer, lr)
            y, logdet, labels = training_batch(data, preprocess, batches, step, labels=config.conditional)
            y, logdet = y[shard].to(device), logdet[shard].to(device)
            context = None if labels is None else label_context(model, labels[shard])

            loss = objective(y, logdet, context).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            loss_value, norm_value = world.mean(loss, grad_norm, device=device)
            _stop_unless_finite(loss_value, norm_value, step, last_saved, run_dir.checkpoint)
            optimizer.step()

            done = step + 1
            smooth = loss_value if smooth is None else 0.98 * smooth + 0.02 * loss_value
            bar.step(smooth, valid_nll)
            if done % config.eval_every == 0 or done == config.steps:
                valid = evaluate(model, data.valid, data, preprocess, device=device,
                                 seed=config.seed + EVAL_SEED_OFFSET["valid"], world=world,
                                 labels=data.split_labels("valid") if config.conditional else None)
                valid_nll = valid["nll"]
                record = {"step": done, "train_nll": smooth, "valid_nll": valid_nll,
                          "valid_bits_per_dim": valid["bits_per_dim"], "lr": lr,
                          "seconds": elapsed + time.perf_counter() - t0}
                if "kl_gap" in valid:
                    record["valid_kl_gap"] = valid["kl_gap"]
                world.on_main(f"appending step {done} to {run_dir.log}", lambda: run_dir.append_log(record), device)
            if done % config.checkpoint_every == 0 or done == config.steps:
                seconds = elapsed + time.perf_counter() - t0
                world.on_main(f"saving the checkpoint of step {done}",
                              lambda: _save(run_dir, config, model, optimizer, done, data, preprocess, seconds,
                                            smooth, last_saved), device)
                last_saved = done
    seconds = elapsed + time.perf_counter() - t0

    # The test score, the metrics and the pictures.
    test = evaluate(model, data.test, data, preprocess, device=device, seed=config.seed + EVAL_SEED_OFFSET["test"],
                    world=world, labels=data.split_labels("test") if config.conditional else None)
    metrics = run_metrics(config, model, data, test, valid_nll, seconds, device, world)
    world.on_main(f"writing {run_dir.metrics}", lambda: run_dir.write_metrics(metrics), device)
    log(summary(metrics), world)
    if plots:
        world.on_main("drawing the PNGs", lambda: _write_plots(model, data, preprocess, config, run_dir, world),
                      device)
    world.barrier()
    return metrics


def _save(run_dir: RunDirectory, config: TrainConfig, model: DensityModel, optimizer: torch.optim.Optimizer,
          step: int, data: fdata.Data, preprocess: fdata.Preprocess, seconds: float, smooth: Optional[float],
          last_saved: Optional[int]) -> None:
    """The checkpoint of ``step``; a state that is not finite stops the run (it is never written), and a
    full disk says which checkpoint is kept."""
    kept = _kept(last_saved, run_dir.checkpoint)
    try:
        save_checkpoint(run_dir.checkpoint, config=config, model=model, optimizer=optimizer, step=step, data=data,
                        preprocess=preprocess, elapsed=seconds, train_nll=smooth)
    except NonFiniteState as exc:
        raise TrainingDiverged(f"training stopped: the weights or optimizer state became non-finite in step {step} "
                               f"({exc}), so its checkpoint was not written; {kept}. Try a lower --lr.") from None
    except DiskFull as exc:
        raise exc.with_note(kept) from None


def _kept(last_saved: Optional[int], checkpoint_path: str) -> str:
    return (f"the last good checkpoint (step {last_saved}) is kept at {checkpoint_path}" if last_saved is not None
            else "no checkpoint had been written yet")


def _stop_unless_finite(loss: float, grad_norm: float, step: int, last_saved: Optional[int],
                        checkpoint_path: str) -> None:
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
    raise TrainingDiverged(f"training stopped: the {what} became non-finite ({value}) at step {step + 1}; "
                           f"{_kept(last_saved, checkpoint_path)}. Try a lower --lr or a smaller --grad-clip.")


def _write_plots(model: DensityModel, data: fdata.Data, preprocess: fdata.Preprocess, config: TrainConfig,
                 run_dir: RunDirectory, world: World) -> None:
    written = write_run_plots(model, data, preprocess, config, run_dir.path)
    if written is None:
        log("  (no PNGs: matplotlib is not installed; pip install \"fastdensity[plot]\")", world)
        return
    paths = [run_dir.metrics, run_dir.checkpoint, *(os.path.join(run_dir.path, name) for name in written)]
    log(f"  wrote {', '.join(paths)}", world)
