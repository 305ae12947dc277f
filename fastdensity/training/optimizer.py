"""The optimizer, chosen by name, and its learning rate over the run.

Optimizers
    ``adam``   Adam; ``weight_decay`` adds ``wd * theta`` to the gradient (an L2 penalty, so it is
               rescaled by Adam's per-parameter step size like the rest of the gradient). Default 0.
    ``adamw``  AdamW; ``weight_decay`` shrinks the parameters directly, ``theta -= lr * wd * theta``,
               beside the Adam step (decoupled decay, Loshchilov & Hutter). Default 0.01, PyTorch's.

Learning rate
    Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to 0 at ``steps``:
    ``lr(s) = lr * (s + 1) / W`` for ``s < W``, else ``lr * (1 + cos(pi * (s - W) / (steps - W))) / 2``.

Resuming with another ``steps``
    The rate is always that of the run's current plan: ``lr(s)`` above with ``steps`` the new total. A run
    resumed at step ``k`` with ``--steps N`` therefore continues on the schedule of a run planned for N
    steps from the start: the cosine is re-stretched over N, so the rate jumps at step k from the old
    plan's value to the new plan's (a finished run, whose rate had decayed to ~0, resumes near
    ``lr * (1 + cos(pi * (k - W) / (N - W))) / 2``). The steps already taken are not redone, so the result
    is not the N-step run's; resuming with the same ``steps`` is bit-identical to never stopping.
    :func:`schedule_change` says this in a line when a run resumes with a new plan.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Optional

import torch

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["OPTIMIZERS", "DEFAULT_WEIGHT_DECAY", "make_optimizer", "learning_rate", "set_learning_rate",
           "schedule_change"]

#: ``--optimizer`` name -> the torch optimizer it builds.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}

#: The weight decay each optimizer gets when the configuration leaves it unset.
DEFAULT_WEIGHT_DECAY = {"adam": 0.0, "adamw": 0.01}


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` (a key of :data:`OPTIMIZERS`) over ``params``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)


def learning_rate(step: int, config: "TrainConfig") -> float:
    """The learning rate of (0-based) ``step``: linear warm-up over ``warmup_steps``, then cosine decay
    to 0 at ``steps``. The warm-up is cut short to leave at least one step of decay."""
    warm = min(config.warmup_steps, max(config.steps - 1, 0))
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(config.steps - warm, 1)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def schedule_change(step: int, planned: "TrainConfig", resumed: "TrainConfig") -> Optional[str]:
    """What resuming at ``step`` under ``resumed`` does to the schedule a run ``planned`` (its checkpoint's
    configuration): None when ``steps`` is unchanged, else a line giving the new plan and the jump in the
    learning rate. ValueError when the new ``steps`` is below ``step`` (those steps are already taken)."""
    if resumed.steps == planned.steps:
        return None
    if resumed.steps < step:
        raise ValueError(f"cannot resume with steps={resumed.steps}: the checkpoint is at step {step} already")
    before, after = learning_rate(step, planned), learning_rate(step, resumed)
    verb = "extending" if resumed.steps > planned.steps else "shortening"
    return (f"{verb} the run from {planned.steps} to {resumed.steps} steps: the cosine schedule is re-planned to "
            f"end at step {resumed.steps}, so the learning rate of step {step + 1} is {after:.4g} (the "
            f"{planned.steps}-step plan had {before:.4g})")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
