"""Scoring a model on a split: the mean negative log-likelihood per example and its standard error.

For N examples with per-example NLL ``l_i = -(log q(y_i) + log|dy_i/dx_i|)`` (nats, data units; the
preprocessing's Jacobian makes a dequantized model's figure an upper bound on the discrete NLL) the
result is ``mean(l)``, ``se = sqrt(var(l) / N)`` with the unbiased variance, and bits/dim
``mean(l) / (D log 2)``. For the 2-D densities whose true ``p`` is known it adds the paired KL gap
``mean(log p(x_i) + l_i)`` (an estimate of ``KL(p || q)``) and its standard error.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import data as fdata
from ..models import DensityModel
from .conditioning import label_context, model_classes
from .distributed import World
from .seeds import EVAL_NOISE, generator

__all__ = ["EVAL_SEED_OFFSET", "evaluate", "check_data_matches", "nll_kind"]

#: The dequantization noise that scores a split is seeded by the run's seed plus this offset, in training
#: and in ``fastdensity evaluate`` alike, so that evaluating a checkpoint reproduces the reported figures.
EVAL_SEED_OFFSET = {"valid": 1, "test": 2, "train": 3}


def _eval_batch_size(data: fdata.Data) -> int:
    return 256 if data.is_image else 8192


@torch.no_grad()
def evaluate(model: DensityModel, x: torch.Tensor, data: fdata.Data, preprocess: fdata.Preprocess, *,
             device="cpu", seed: int = 0, world: Optional[World] = None,
             labels: Optional[torch.Tensor] = None) -> dict:
    """NLL of ``model`` on the examples ``x`` [N, *shape] (a split of ``data``): a dict with ``nll``,
    ``nll_stderr``, ``bits_per_dim``, ``examples`` and, for the 2-D densities, ``kl_gap`` and
    ``kl_gap_stderr``. With ``labels`` [N] (a class-conditional model) each example is scored given its
    label: -log p(x | label).

    Dequantization noise is drawn from a generator seeded by ``seed``, so the figure is reproducible.
    Under DDP (``world``) each rank scores its share of ``x`` and the sums are all-reduced.
    """
    world = world or World()
    was_training = model.training
    model.eval()
    n = x.shape[0]
    lo, hi = n * world.rank // world.size, n * (world.rank + 1) // world.size
    sums = torch.zeros(5, dtype=torch.float64)  # count, sum nll, sum nll^2, sum gap, sum gap^2
    bs = _eval_batch_size(data)
    g = generator(seed, EVAL_NOISE)
    for start in range(0, n, bs):
        chunk = x[start:start + bs]
        # Draw noise for every chunk on every rank (same stream whatever the world size), use our rows.
        y, logdet = preprocess.encode(chunk, g)
        a, b = max(lo - start, 0), min(hi - start, chunk.shape[0])
        if a >= b:
            continue
        context = None if labels is None else label_context(model, labels[start + a:start + b])
        nll = -(model(y[a:b].to(device), context) + logdet[a:b].to(device)).double().cpu()
        sums[0] += nll.numel()
        sums[1] += nll.sum()
        sums[2] += nll.pow(2).sum()
        if data.density is not None:
            gap = data.density.log_prob(chunk[a:b].double()) + nll
            sums[3] += gap.sum()
            sums[4] += gap.pow(2).sum()
    model.train(was_training)
    if world.size > 1:
        sums = world.all_sum(sums.to(device)).cpu()
    count = sums[0].item()

    def mean_se(s, s2):
        mean = s / count
        var = max(s2 / count - mean * mean, 0.0) * count / max(count - 1, 1)
        return mean, math.sqrt(var / count)

    nll_mean, nll_se = mean_se(sums[1].item(), sums[2].item())
    out = {"nll": nll_mean, "nll_stderr": nll_se, "bits_per_dim": fdata.bits_per_dim(nll_mean, data.dim),
           "examples": int(count)}
    if data.density is not None:
        out["kl_gap"], out["kl_gap_stderr"] = mean_se(sums[3].item(), sums[4].item())
    return out


def check_data_matches(model: DensityModel, preprocess: fdata.Preprocess, data: fdata.Data,
                       conditional: bool = False) -> None:
    """ValueError unless ``data`` is the kind of data ``model`` (with ``preprocess``) was trained on; a
    ``conditional`` model (trained with --conditional) also needs labels within its classes."""
    if tuple(data.shape) != tuple(model.shape):
        raise ValueError(f"the checkpoint's {model.name} models examples of shape {list(model.shape)}; "
                         f"{data.name} has shape {list(data.shape)}")
    trained_discrete = model.discrete or isinstance(preprocess, fdata.Dequantize)
    if trained_discrete != (data.kind == "discrete"):
        was, now = ("discrete", "continuous") if trained_discrete else ("continuous", "discrete")
        raise ValueError(f"the checkpoint's {model.name} was trained on {was} data; {data.name} is {now}")
    levels = model.config.get("levels") if model.discrete else getattr(preprocess, "levels", None)
    if levels is not None and data.levels != levels:
        raise ValueError(f"the checkpoint's {model.name} models {levels} levels; {data.name} has {data.levels}")
    if conditional:
        if data.labels is None:
            raise ValueError(f"the checkpoint's {model.name} is class-conditional; {data.name} has no labels to "
                             "score it with")
        classes = model_classes(model)
        if data.num_classes > classes:
            raise ValueError(f"the checkpoint's {model.name} knows {classes} classes; {data.name} has labels up "
                             f"to {data.num_classes - 1}")


def nll_kind(model: DensityModel, data: fdata.Data) -> str:
    """What the NLL of ``model`` on ``data`` measures, for reports."""
    if data.kind == "continuous":
        return "differential NLL (nats per example)"
    if model.discrete:
        return "exact discrete NLL (nats per example)"
    return "dequantized NLL, an upper bound on the discrete NLL (nats per example)"
