"""Maximum-likelihood training of the density models, one job per module:

    config.py         TrainConfig, its data-dependent defaults and checks, the model's arguments, resume settings
    optimizer.py      the optimizer by name (adam, adamw) and the warm-up + cosine learning rate
    seeds.py          every random stream of a run as a pure function of its seed
    batches.py        the training batch of a step
    conditioning.py   class-conditional runs (--conditional): the model's option and context for the labels
    device.py         the torch device and CPU threads
    distributed.py    the processes of a torchrun run (DDP)
    model_setup.py    the model as a run starts it, and the data's preprocessing
    evaluation.py     NLL, standard error, bits/dim and KL gap on a split
    checkpoint.py     save, load and restore checkpoints (good, checksummed, atomic, one previous copy)
    integrity.py      a checkpoint's checksum, and its tensors' finiteness
    run_lock.py       one run at a time per output folder
    run_directory.py  the run's output files (lock, log, metrics, clean-up after a kill)
    plots.py          sample and density PNGs
    reporting.py      what a run prints, and its final metrics
    loop.py           train(): the training loop

``from fastdensity.training import TrainConfig, train`` is the entry point.
"""
from .batches import Batches
from .checkpoint import (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, CorruptCheckpoint, load_checkpoint,
                         model_from_checkpoint)
from .conditioning import label_context, model_classes, sample_labels
from .config import SEED_LIMIT, TrainConfig, check_settings, model_args_for, resolve_defaults
from .device import resolve_device
from .distributed import RankZeroFailed
from .evaluation import EVAL_SEED_OFFSET, check_data_matches, evaluate, nll_kind
from .loop import TrainingDiverged, train
from .model_setup import initial_model, preprocess_for
from .optimizer import OPTIMIZERS, learning_rate, make_optimizer
from .plots import draw_samples, save_density_png, save_samples_png
from .reporting import standard_json
from .run_lock import OutputFolderInUse, RunLock

__all__ = [
    "TrainConfig", "TrainingDiverged", "train", "resolve_defaults", "check_settings", "SEED_LIMIT", "model_args_for",
    "OPTIMIZERS", "make_optimizer", "learning_rate", "Batches", "initial_model", "preprocess_for", "resolve_device",
    "evaluate", "check_data_matches", "nll_kind", "EVAL_SEED_OFFSET", "CHECKPOINT_NAME", "PREVIOUS_CHECKPOINT_NAME",
    "CorruptCheckpoint", "load_checkpoint", "model_from_checkpoint", "draw_samples", "save_samples_png",
    "save_density_png", "standard_json", "OutputFolderInUse", "RunLock", "RankZeroFailed", "label_context",
    "model_classes", "sample_labels",
]
