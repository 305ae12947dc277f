"""What defines a training run: :class:`TrainConfig`, its data-dependent defaults, the model's arguments,
and which settings a resumed run keeps from its checkpoint.

A config is stored in every checkpoint as a plain dict (:meth:`TrainConfig.to_dict`); fields a
checkpoint lacks (it was written before they existed) take their defaults, so old runs still resume.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from .. import data as fdata
from ..models import MODELS
from .conditioning import conditioning_option
from .optimizer import DEFAULT_WEIGHT_DECAY, OPTIMIZERS

__all__ = ["TrainConfig", "resolve_defaults", "check_settings", "SEED_LIMIT", "model_args_for", "config_for_resume"]


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    ``None`` means "the default for this data" (or for this optimizer): see :func:`resolve_defaults`.
    """

    model: str = "realnvp"
    data: str = "checkerboard"
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    warmup_steps: int = 100
    grad_clip: float = 10.0
    optimizer: Optional[str] = None  # "adam" (the default) or "adamw"
    weight_decay: Optional[float] = None  # default: 0 for adam, 0.01 for adamw
    seed: int = 0
    split_seed: int = 0
    eval_every: Optional[int] = None
    checkpoint_every: Optional[int] = None
    device: str = "auto"
    out: Optional[str] = None
    model_args: dict = field(default_factory=dict)
    logit_alpha: Optional[float] = 0.01
    num_samples: Optional[int] = None
    threads: Optional[int] = None
    conditional: bool = False  # p(x | class label): needs data with labels (digits, a file with labels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def resolve_defaults(config: TrainConfig, data: fdata.Data) -> TrainConfig:
    """Fill the ``None`` fields of ``config`` for ``data`` and check them (returns a new config).

    2-D densities: 3000 steps of 512 at lr 2e-3 (the budget the quality bars are measured with).
    Images: 2000 steps of 64 at lr 1e-3. Other vectors: 3000 steps of 256 at lr 1e-3.
    """
    c = TrainConfig.from_dict(config.to_dict())
    two_d = data.density is not None
    steps, batch, lr = (3000, 512, 2e-3) if two_d else (2000, 64, 1e-3) if data.is_image else (3000, 256, 1e-3)
    c.steps = steps if c.steps is None else int(c.steps)
    c.batch_size = batch if c.batch_size is None else int(c.batch_size)
    c.lr = lr if c.lr is None else float(c.lr)
    c.eval_every = max(1, c.steps // 10) if c.eval_every is None else int(c.eval_every)
    c.checkpoint_every = c.eval_every if c.checkpoint_every is None else int(c.checkpoint_every)
    c.num_samples = (2000 if not data.is_image else 64) if c.num_samples is None else int(c.num_samples)
    c.optimizer = "adam" if c.optimizer is None else c.optimizer
    if c.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {c.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    c.weight_decay = DEFAULT_WEIGHT_DECAY[c.optimizer] if c.weight_decay is None else float(c.weight_decay)
    if c.out is None:
        c.out = os.path.join("runs", f"{c.model}-{data.name}")
    check_settings(c)
    return c


#: Seeds are integers in [0, SEED_LIMIT): what torch.manual_seed and the int64 seed streams accept alike.
SEED_LIMIT = 2 ** 63


def check_settings(config: TrainConfig) -> None:
    """ValueError, in one line naming the setting, for a value no run can use; ``None`` (a default still to
    be filled in) passes. Called before a run starts anything, and again on the resolved configuration.

    lr: finite and > 0. grad_clip: > 0 (``inf``: no clipping; NaN is refused). warmup_steps >= 0.
    steps, batch_size, eval_every, checkpoint_every, num_samples, threads: integers >= 1. seed, split_seed:
    integers in [0, 2**63). weight_decay: finite and >= 0. logit_alpha: in [0, 0.5).
    """
    def number(name: str) -> Optional[float]:
        value = getattr(config, name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number; got {value!r}")
        return float(value)

    def integer(name: str, low: int, high: Optional[int] = None, high_text: str = "") -> None:
        value = getattr(config, name)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer; got {value!r}")
        if value < low or (high is not None and value >= high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high_text or high})"
            raise ValueError(f"{name} must be {bounds}; got {value}")

    for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "num_samples", "threads"):
        integer(name, 1)
    if not isinstance(config.conditional, bool):
        raise ValueError(f"conditional must be True or False; got {config.conditional!r}")
    integer("warmup_steps", 0)
    integer("seed", 0, SEED_LIMIT, "2**63")
    integer("split_seed", 0, SEED_LIMIT, "2**63")
    lr = number("lr")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0; got {lr}")
    clip = number("grad_clip")
    if clip is not None and not clip > 0:  # NaN fails this too
        raise ValueError(f"grad_clip must be > 0 (inf for no clipping); got {clip}")
    decay = number("weight_decay")
    if decay is not None and not (math.isfinite(decay) and decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0; got {decay}")
    alpha = number("logit_alpha")
    if alpha is not None and not 0 <= alpha < 0.5:
        raise ValueError(f"logit_alpha must be in [0, 0.5) (0: no logit); got {alpha}")


def model_args_for(model_name: str, data: fdata.Data, model_args: dict, conditional: bool = False) -> dict:
    """The keyword arguments to build ``model_name`` for ``data``: ``model_args`` plus what the data fixes
    (``levels`` for discrete models; with ``conditional``, the number of classes through the model's
    conditioning option, :mod:`.conditioning`); raises ValueError when the model cannot model this data."""
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(MODELS)}")
    cls = MODELS[model_name]
    if getattr(cls, "image_only", False) and not data.is_image:
        raise ValueError(f"{model_name} models images ([C, H, W] per example); {data.name} has shape "
                         f"{list(data.shape)} per example")
    args = dict(model_args)
    if cls.discrete:
        if data.kind != "discrete":
            raise ValueError(f"{model_name} models discrete data (integer levels, e.g. digits or a uint8 image "
                             f"file); {data.name} is continuous")
        if args.setdefault("levels", data.levels) != data.levels:
            raise ValueError(f"levels={args['levels']} does not match the data's {data.levels} levels")
    if conditional:
        if data.labels is None:
            raise ValueError(f"--conditional trains p(x | class label), and {data.name} has no labels: use digits, or "
                             "a .npz file with 'labels' (one class per example) beside its array, or 'train_labels' "
                             "(and 'valid_labels', 'test_labels') beside 'train'")
        option = conditioning_option(cls)
        if option is None:
            able = ", ".join(name for name, c in MODELS.items() if conditioning_option(c) is not None)
            raise ValueError(f"{model_name} cannot be conditioned on class labels; models that can: {able}")
        if args.setdefault(option, data.num_classes) != data.num_classes:
            raise ValueError(f"{option}={args[option]} does not match the data's {data.num_classes} classes")
    return args


def config_for_resume(given: TrainConfig, stored: dict) -> TrainConfig:
    """The configuration a resumed run continues with: the checkpoint's (``stored``), except ``steps``
    (to train longer), ``eval_every`` and ``checkpoint_every`` when ``given`` sets them, and where it
    runs (``device``, ``out``, ``threads``), always from ``given``.

    An optimizer in ``given`` other than the checkpoint's is a ValueError: the stored optimizer state
    (Adam's moments, and the decay mode in its parameter groups) belongs to the stored optimizer.
    """
    config = TrainConfig.from_dict(stored)
    ran_with = config.optimizer or "adam"  # checkpoints from before the choice existed are Adam's
    if given.optimizer is not None and given.optimizer != ran_with:
        raise ValueError(f"cannot resume with optimizer {given.optimizer!r}: the checkpoint's run trains with "
                         f"{ran_with!r}, whose state it holds; start a new run (another --out) to use "
                         f"{given.optimizer!r}")
    for name in ("steps", "eval_every", "checkpoint_every"):
        if getattr(given, name) is not None:
            setattr(config, name, getattr(given, name))
    config.device, config.out, config.threads = given.device, given.out, given.threads
    return config
